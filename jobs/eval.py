"""Entry point: ``python -m jobs.eval --model DIR|models:/NAME/VERSION --data URI [--data URI ...]
--output URI [--judge] [--config F] [--set k=v]``.

The same arguments as ``sama eval``; this is what ``ray job submit`` runs on a cluster.
"""

from __future__ import annotations

import sys

from sama.cli import main

if __name__ == "__main__":
    sys.exit(main(["eval", *sys.argv[1:]]))
