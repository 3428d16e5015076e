"""Print the pip requirements of the project's core plus the given extras, one per line.

Used by infra/docker/Dockerfile to install the dependencies in a layer of their own (cached until
pyproject.toml changes) before the source is copied in:

    python infra/docker/requirements.py --extras all > /tmp/requirements.txt

Extras may be comma-separated (``prep,train``); self-references such as ``all = ["sama[prep,train]"]``
are expanded. Only the standard library is used: it runs before anything is installed.
"""

from __future__ import annotations

import argparse
import re
import sys
import tomllib
from pathlib import Path

_SELF_REF = re.compile(r"^\s*(?P<name>[A-Za-z0-9_.-]+)\s*\[(?P<extras>[^\]]*)\]\s*$")


def requirements(pyproject: dict, extras: list[str]) -> list[str]:
    """Core dependencies plus those of ``extras``, in order, without duplicates."""
    project = pyproject["project"]
    name = project["name"].lower()
    optional = project.get("optional-dependencies", {})
    out: list[str] = []
    seen_extras: set[str] = set()

    def add(spec: str) -> None:
        if spec not in out:
            out.append(spec)

    def expand(extra: str) -> None:
        if extra in seen_extras:
            return
        if extra not in optional:
            known = ", ".join(sorted(optional))
            raise SystemExit(f"unknown extra {extra!r} (pyproject.toml defines: {known})")
        seen_extras.add(extra)
        for spec in optional[extra]:
            match = _SELF_REF.match(spec)
            if match and match["name"].lower() == name:
                for sub in match["extras"].split(","):
                    if sub.strip():
                        expand(sub.strip())
            else:
                add(spec)

    for spec in project.get("dependencies", []):
        add(spec)
    for extra in extras:
        expand(extra)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pyproject", default="pyproject.toml")
    parser.add_argument("--extras", default="", help="comma-separated extras, e.g. all or prep")
    args = parser.parse_args(argv)
    data = tomllib.loads(Path(args.pyproject).read_text())
    extras = [e.strip() for e in args.extras.split(",") if e.strip()]
    sys.stdout.write("".join(f"{spec}\n" for spec in requirements(data, extras)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
