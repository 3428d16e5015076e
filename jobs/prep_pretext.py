"""Entry point: ``python -m jobs.prep_pretext --input URI --output URI [--config F] [--set k=v]``.

The same arguments as ``sama prep-pretext``; this is what ``ray job submit`` runs on a cluster.
"""

from __future__ import annotations

import sys

from sama.cli import main

if __name__ == "__main__":
    sys.exit(main(["prep-pretext", *sys.argv[1:]]))
