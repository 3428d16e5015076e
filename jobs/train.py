"""Entry point: ``python -m jobs.train ...``, the same arguments as ``sama train``.

This is what ``ray job submit --working-dir . -- python -m jobs.train ...`` runs on a cluster.
"""

from __future__ import annotations

import sys

from sama.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
