"""Entry point: ``python -m jobs.precompute --input SHARDS --output URI --model PRESET_OR_EXPORT
[--config F] [--set k=v]``.

The same arguments as ``sama precompute``; this is what ``ray job submit`` runs on a cluster.
"""

from __future__ import annotations

import sys

from sama.cli import main

if __name__ == "__main__":
    sys.exit(main(["precompute", *sys.argv[1:]]))
