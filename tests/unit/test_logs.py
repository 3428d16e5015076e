"""sama.logs' logging of a data job's Ray workers: at the driver's level, redacted, and the process
left as it was found."""

from __future__ import annotations

import contextlib
import logging

from sama import logs
from sama.redaction import RedactingFilter

CRED_URI = "s3://AKIAFAKEKEY:fakeSecretValue123@bucket/x.mp4"


@contextlib.contextmanager
def bare_root():
    """The root logger as Ray leaves it in a worker: no handlers, at WARNING. Entered in the test's
    body: pytest adds its capturing handlers to the root for the body and removes them after."""
    root = logging.getLogger()
    saved = root.handlers, root.filters, root.level
    root.handlers, root.filters, root.level = [], [], logging.WARNING
    try:
        yield root
    finally:
        root.handlers, root.filters, root.level = saved


def test_worker_logging_redacts_at_the_level_and_restores_the_root(capsys):
    log = logging.getLogger("sama.prep.unit")
    with bare_root() as root:
        with logs.worker_logging(logging.INFO):
            log.info("rejected %s: missing", CRED_URI)
            log.debug("not at this level")
        err = capsys.readouterr().err
        # A process Ray reuses (a later task, a Ray Train worker's basicConfig) finds it as it was.
        assert root.handlers == [] and root.level == logging.WARNING
    assert "INFO sama.prep.unit: rejected s3://bucket/x.mp4: missing" in err, err
    assert "AKIAFAKEKEY" not in err and "fakeSecretValue123" not in err
    assert "not at this level" not in err


def test_worker_logging_redacts_a_root_that_has_handlers():
    handler = logging.StreamHandler()
    with bare_root() as root:
        root.addHandler(handler)
        with logs.worker_logging(logging.INFO):
            assert root.handlers == [handler]  # no second handler: each line once
        assert any(isinstance(f, RedactingFilter) for f in handler.filters)


def test_worker_level_follows_verbose(monkeypatch):
    monkeypatch.setitem(logs._state, "verbose", False)
    assert logs.worker_level() == logging.WARNING
    monkeypatch.setitem(logs._state, "verbose", True)
    assert logs.worker_level() == logging.INFO
