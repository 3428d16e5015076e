"""Entry point: ``python -m jobs.prep_pairs --manifest URI [...] --output URI [--config F] [--set k=v]``.

The same arguments as ``sama prep-pairs``; this is what ``ray job submit`` runs on a cluster.
"""

from __future__ import annotations

import sys

from sama.cli import main

if __name__ == "__main__":
    sys.exit(main(["prep-pairs", *sys.argv[1:]]))
