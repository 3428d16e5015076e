"""The preflight check runner: results, warnings, unexpected errors, deadlines, the write probe."""

from __future__ import annotations

import os
import time

import pytest

from sama import preflight
from sama.preflight import Check, CheckFailed, CheckWarning, PreflightError


def _fails():
    raise CheckFailed("no shards under s3://b/x", "run prep first")


def _warns():
    raise CheckWarning("server does not answer", "start it")


def _breaks():
    raise KeyError("schema_version")


def test_every_check_answers_in_order_and_one_failure_does_not_hide_the_next():
    results = preflight.run_checks(
        [Check("a", lambda: "fine"), Check("b", _fails), Check("c", _warns), Check("d", _breaks)]
    )
    assert [(r.name, r.status) for r in results] == [("a", "ok"), ("b", "fail"), ("c", "warn"), ("d", "fail")]
    assert results[1].found == "no shards under s3://b/x" and results[1].fix == "run prep first"
    assert results[3].found == "KeyError: 'schema_version'"
    with pytest.raises(PreflightError) as caught:
        preflight.require("sama train", results)
    message = str(caught.value)
    assert "2 preflight check(s) failed" in message
    assert "b: no shards under s3://b/x" in message and "fix: run prep first" in message
    assert "server does not answer" not in message  # warnings do not fail a job
    report = preflight.format_report("sama train", results)
    assert "[WARN] c: server does not answer" in report and report.endswith(
        "1 ok, 1 warning(s), 2 failure(s)"
    )


def test_a_check_that_does_not_answer_fails_at_its_deadline():
    started = time.monotonic()
    results = preflight.run_checks(
        [Check("slow", lambda: time.sleep(5) or "late"), Check("quick", lambda: "ok")], 0.5
    )
    assert time.monotonic() - started < 2
    assert (results[0].status, results[0].found) == ("fail", "no answer within 0.5 s")
    assert results[1].status == "ok"
    preflight.require("job", results[1:])  # passes: nothing failed


def test_writable_probe_leaves_nothing_behind(tmp_path):
    target = tmp_path / "runs" / "new-run"
    assert "is writable" in preflight.writable(str(target))
    assert not (tmp_path / "runs").exists()
    existing = tmp_path / "existing"
    existing.mkdir()
    preflight.writable(str(existing))
    assert os.listdir(existing) == []


def test_writable_names_the_location_it_cannot_write(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(CheckFailed, match="cannot write under .*a-file/runs"):
        preflight.writable(str(blocker / "runs"))
