"""A ``sama quickstart`` run as the e2e tests see it: its work directory and what it printed."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

BIN = Path(sys.executable).parent


def tail(path: Path, chars: int = 6000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError as exc:
        return f"<{path}: {exc}>"


@dataclass
class Quickstart:
    workdir: Path
    output: str  # what the command printed

    @property
    def tracking_db(self) -> Path:
        return self.workdir / "runs" / "mlruns" / "mlflow.db"

    @property
    def artifacts(self) -> Path:
        return self.workdir / "runs" / "mlruns" / "artifacts"

    @property
    def tracking_uri(self) -> str:
        return f"sqlite:///{self.tracking_db}"
