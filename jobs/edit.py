"""Entry point: ``python -m jobs.edit ...``, the same arguments as ``sama edit``.

This is what ``ray job submit --working-dir . -- python -m jobs.edit ...`` runs on a cluster.
"""

from __future__ import annotations

import sys

from sama.cli import main

if __name__ == "__main__":
    sys.exit(main(["edit", *sys.argv[1:]]))
