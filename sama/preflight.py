"""Checks a job runs on its driver before it asks a cluster for anything.

A check is a named function that returns what it found (a short text) when all is well, or raises
:class:`CheckFailed` / :class:`CheckWarning` carrying what it found and how to fix it. Checks run
concurrently, each within a deadline, so a slow or unreachable service costs seconds, not the
minutes of its client's retries. :func:`run_checks` collects every result (one failure does not
hide the next); :func:`require` raises :class:`PreflightError` listing the failures.

Training (:mod:`sama.train.preflight`) and the data jobs (:mod:`pipelines.common`) use it.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

from sama import storage

Status = Literal["ok", "warn", "fail"]

# Each check's deadline: enough for a first page of an object-store listing and one small read,
# short enough that `sama train --check` answers in well under a minute when a service is down.
DEFAULT_CHECK_TIMEOUT_S = 20.0


class CheckFailed(Exception):
    """A check found something that will make the job fail."""

    def __init__(self, found: str, fix: str = ""):
        super().__init__(found)
        self.found = found
        self.fix = fix


class CheckWarning(CheckFailed):
    """A check found something worth telling but that does not stop the job."""


@dataclass(frozen=True)
class Check:
    """``name`` says what is checked (e.g. ``data source 'pretext'``); ``run`` returns what it found."""

    name: str
    run: Callable[[], str]


@dataclass(frozen=True)
class CheckResult:
    name: str
    status: Status
    found: str
    fix: str = ""
    seconds: float = 0.0

    def format(self) -> str:
        mark = {"ok": "ok  ", "warn": "WARN", "fail": "FAIL"}[self.status]
        lines = [f"  [{mark}] {self.name}: {self.found}"]
        if self.fix:
            lines.append(f"         fix: {self.fix}")
        return "\n".join(lines)


class PreflightError(RuntimeError):
    """Checks failed before the job requested any resources; the message lists each failure."""

    def __init__(self, what: str, results: Sequence[CheckResult]):
        self.what = what
        self.results = list(results)
        failed = failures(self.results)
        lines = [f"{what}: {len(failed)} preflight check(s) failed, nothing was started:"]
        lines += [r.format() for r in failed]
        super().__init__("\n".join(lines))


def run_check(check: Check) -> CheckResult:
    """Run one check in this thread."""
    started = time.monotonic()
    try:
        found = check.run()
        status: Status = "ok"
        fix = ""
    except CheckWarning as exc:
        status, found, fix = "warn", exc.found, exc.fix
    except CheckFailed as exc:
        status, found, fix = "fail", exc.found, exc.fix
    except Exception as exc:  # an unexpected error is still an answer: the job would hit it too
        status, found, fix = "fail", describe_error(exc), ""
    return CheckResult(check.name, status, found, fix, time.monotonic() - started)


def run_checks(checks: Sequence[Check], timeout_s: float = DEFAULT_CHECK_TIMEOUT_S) -> list[CheckResult]:
    """Run ``checks`` concurrently; results in the checks' order. A check still running after
    ``timeout_s`` fails as unanswered; its daemon thread is abandoned, so it delays nothing, not
    even the process's exit."""
    answers: list[CheckResult | None] = [None] * len(checks)

    def answer(index: int, check: Check) -> None:
        answers[index] = run_check(check)

    threads = [
        threading.Thread(target=answer, args=(i, check), name=f"preflight-{i}", daemon=True)
        for i, check in enumerate(checks)
    ]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + timeout_s
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    results = []
    for check, result in zip(checks, answers, strict=True):
        if result is None:
            result = CheckResult(
                check.name,
                "fail",
                f"no answer within {timeout_s:g} s",
                "check that the service is reachable from this machine (network, endpoint, credentials)",
                timeout_s,
            )
        results.append(result)
    return results


def failures(results: Sequence[CheckResult]) -> list[CheckResult]:
    """The checks that failed (warnings are not failures)."""
    return [r for r in results if r.status == "fail"]


def format_report(what: str, results: Sequence[CheckResult]) -> str:
    failed = len(failures(results))
    warned = sum(r.status == "warn" for r in results)
    verdict = "FAILED" if failed else "passed"
    lines = [f"{what} preflight:"] + [r.format() for r in results]
    lines.append(f"{verdict}: {len(results) - failed - warned} ok, {warned} warning(s), {failed} failure(s)")
    return "\n".join(lines)


def require(what: str, results: Sequence[CheckResult]) -> None:
    """Raise :class:`PreflightError` when any check failed."""
    if failures(results):
        raise PreflightError(what, results)


def describe_error(exc: BaseException) -> str:
    """``Type: first line of the message`` (at most 300 characters): an error in one line."""
    first = (str(exc).strip().splitlines() or [""])[0][:300]
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


@contextlib.contextmanager
def storage_access(action: str, uri: str, key: str):
    """Report a storage failure in the block as :class:`CheckFailed`: ``cannot {action} {uri}``,
    with how to fix it (``key``, the setting or flag that names ``uri``)."""
    try:
        yield
    except CheckFailed:
        raise
    except Exception as exc:
        raise CheckFailed(
            f"cannot {action} {storage.redact(uri)}: {describe_error(exc)}",
            f"check {key} and, for s3://, the bucket and the AWS_* credentials",
        ) from None


def writable(uri: str) -> str:
    """Write a probe object under ``uri`` and remove it; raises CheckFailed naming the problem."""
    import uuid

    probe = storage.join(uri, f"_preflight-{uuid.uuid4().hex}")
    local = storage.local_path(uri)
    created = []
    if local is not None:
        # Directories the probe needs are removed with it: a check leaves nothing behind.
        path = os.path.abspath(local)
        while not os.path.exists(path) and os.path.dirname(path) != path:
            created.append(path)
            path = os.path.dirname(path)
    try:
        storage.makedirs(uri)
        storage.write_bytes(probe, b"sama preflight probe\n")
        storage.delete(probe)
        for directory in created:
            with contextlib.suppress(OSError):
                os.rmdir(directory)
    except Exception as exc:
        raise CheckFailed(
            f"cannot write under {storage.redact(uri)}: {describe_error(exc)}",
            "point it at a location this job may write to (for s3://, check the bucket exists and "
            "the AWS_* credentials allow PutObject and DeleteObject)",
        ) from None
    return f"{storage.redact(uri)} is writable"
