"""The tracker's background sender (sama.tracking._Sender) against a fake store that goes down."""

from __future__ import annotations

import logging
import time

import pytest

pytest.importorskip("mlflow")

from mlflow.exceptions import MlflowException

from sama import tracking
from sama.tracking import _Sender, _Write


class FakeStore:
    def __init__(self):
        self.up = True
        self.sent: list[int] = []

    def write(self, value: int) -> _Write:
        def send():
            if not self.up:
                raise ConnectionError("connection refused")
            self.sent.append(value)

        return _Write(f"write {value}", send)

    def probe(self):
        if not self.up:
            raise ConnectionError("connection refused")


@pytest.fixture(autouse=True)
def fast_retries(monkeypatch):
    monkeypatch.setattr(tracking, "RETRY_MIN_S", 0.01)
    monkeypatch.setattr(tracking, "RETRY_MAX_S", 0.05)


def _messages(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "sama.tracking"]


def test_writes_are_held_through_an_outage_the_oldest_dropped_past_the_limit(caplog):
    caplog.set_level(logging.WARNING, logger="sama.tracking")
    store = FakeStore()
    sender = _Sender("http://store", store.probe, limit=3)
    sender.put(store.write(0))
    assert sender.flush(5) and store.sent == [0]
    store.up = False
    for value in range(1, 7):
        began = time.monotonic()
        sender.put(store.write(value))
        assert time.monotonic() - began < 0.5  # never waits for the store
    assert not sender.flush(0.3)
    assert sender.pending() == 3 and sender.dropped == 3  # 1, 2, 3 dropped; 4, 5, 6 held
    store.up = True
    assert sender.flush(5)
    assert store.sent == [0, 4, 5, 6]  # in order, each once
    messages = _messages(caplog)
    assert sum("is unreachable" in m for m in messages) == 1, messages
    assert sum("is reachable again" in m for m in messages) == 1, messages
    assert sum("is full" in m for m in messages) == 1, messages
    assert sender.close(1) == 3  # the dropped ones are reported at the end
    assert "were never sent (3 dropped" in caplog.text


def test_a_write_the_store_refuses_is_dropped_and_the_rest_go_on(caplog):
    caplog.set_level(logging.WARNING, logger="sama.tracking")
    store = FakeStore()
    calls = []

    def refused():
        calls.append(1)
        raise MlflowException("changing param values is not allowed", error_code="INVALID_PARAMETER_VALUE")

    sender = _Sender("http://store", store.probe)
    sender.put(_Write("params", refused))
    sender.put(store.write(1))
    assert sender.flush(5)
    assert len(calls) == tracking.REFUSED_ATTEMPTS and store.sent == [1]
    assert "params was refused" in caplog.text and "is unreachable" not in caplog.text
    sender.close(1)


def test_close_during_an_outage_is_bounded_and_never_raises(caplog):
    caplog.set_level(logging.WARNING, logger="sama.tracking")
    store = FakeStore()
    store.up = False
    cleaned = []
    sender = _Sender("http://store", store.probe)
    for value in range(3):
        write = store.write(value)
        write.cleanup = lambda v=value: cleaned.append(v)
        sender.put(write)
    began = time.monotonic()
    assert sender.close(0.5) == 3
    assert time.monotonic() - began < 3
    assert "3 still held when the run ended" in caplog.text
    assert _wait(lambda: sorted(cleaned) == [0, 1, 2])  # held artifacts are deleted
    sender.put(store.write(9))  # after the end: not sent, not raised
    assert store.sent == []


def _wait(condition, timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True
