"""The one per-unit loop of every data job: inputs in, samples to shards, a reject or a failure out.

A job's ``process_unit`` names its inputs and how one input becomes samples; :func:`run_unit` does
the rest the same way for every job:

* every input is accounted for once: its samples are written (``accepted``) or it is recorded in
  ``rejects`` with a reason; a source that turns out unreadable part-way (a tar cut short) is
  recorded by :class:`RejectSource`;
* an input that is bad in itself (corrupt, too short, a poisoned caption) is a reject and the unit
  goes on; a failure of the *environment* (storage unavailable after the storage library's
  retries, a full disk, a shard that cannot be written) is not the input's fault, so the unit
  fails with :class:`UnitFailed`, writes no marker, and the next run retries it;
* the shards are committed, then the completion marker is written last (see :mod:`sama.prep.ledger`).

A job whose samples are made in batches across inputs (``sama precompute`` runs its encoders on
equal-shaped samples together) passes a :class:`Batching`: ``make_samples`` then prepares one
input (a reject still raises there), and the batch's ``finish`` turns the prepared inputs of one
batch into their samples, or the exception rejecting each; everything else is the same loop.
"""

from __future__ import annotations

import errno
import logging
import time
from collections.abc import Callable, Hashable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from sama import schema, storage
from sama.prep import ledger
from sama.prep.common import reject_from

log = logging.getLogger(__name__)

# OSErrors that say the machine or the storage is in trouble, whatever the input.
_ENVIRONMENT_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.ENOMEM})


class UnitFailed(RuntimeError):
    """A unit could not finish for a reason outside its inputs; a rerun retries it."""

    def __init__(self, unit_id: str, reason: str):
        super().__init__(f"unit {unit_id} failed: {reason}")
        self.unit_id = unit_id
        self.reason = reason

    def __reduce__(self):
        return (type(self), (self.unit_id, self.reason))


class RejectSource(Exception):
    """Raised by a unit's input iterator when its source cannot be read past this point (a
    damaged tar): the source itself is recorded as a reject, the inputs already read stay."""

    def __init__(self, input_id: str, reason: str, detail: str):
        super().__init__(detail)
        self.input_id = input_id
        self.reason = reason
        self.detail = detail


@dataclass
class Batching:
    """How :func:`run_unit` batches prepared inputs (see the module docstring).

    ``key(prepared)`` groups inputs that can share a batch (equal shapes); a group is finished
    when it holds ``size`` inputs, and every group left is finished, in the order the groups
    began, once the inputs run out. ``finish(prepared_list)`` returns, per prepared input in
    order, its samples or the exception that rejects it; an environment failure (raised, or
    returned) fails the unit.
    """

    key: Callable[[Any], Hashable]
    size: int
    finish: Callable[[list[Any]], list[list[Any] | Exception]]

    def __post_init__(self) -> None:
        if self.size < 1:
            raise ValueError(f"batch size must be >= 1, got {self.size}")


def is_environment_failure(exc: BaseException) -> bool:
    """Whether ``exc`` is the environment's fault (retry the unit) rather than the input's."""
    if isinstance(exc, storage.StorageUnavailable | MemoryError):
        return True
    return isinstance(exc, OSError) and exc.errno in _ENVIRONMENT_ERRNOS


def run_unit(
    unit_id: str,
    sources: list[str],
    output_uri: str,
    shards: schema.ShardConfig,
    inputs: Iterable[tuple[str, Any]],
    make_samples: Callable[[Any, list[ledger.Reject]], Any],
    batching: Batching | None = None,
    records: list[dict] | None = None,
) -> ledger.UnitResult:
    """Turn a unit's ``inputs`` (``(input_id, item)`` pairs) into shards and a completion marker.

    ``make_samples(item, dropped)`` returns an input's samples (with ``batching``: the prepared
    input its batch's ``finish`` takes) or raises for a bad input; it may append to ``dropped``
    the parts of an accepted input it left out (kept in the marker). Raises :class:`UnitFailed`
    (no marker written, shards of this attempt discarded or left as orphans for the next run)
    when the environment fails.
    """
    started = time.monotonic()
    result = ledger.UnitResult(unit_id=unit_id, sources=list(sources))
    writer = ledger.UnitWriter(output_uri, unit_id, shards)
    # With batching: group key -> [(input_id, prepared, dropped)], in the order groups began.
    pending: dict[Hashable, list[tuple[str, Any, list[ledger.Reject]]]] = {}

    def reject(input_id: str, exc: Exception) -> None:
        if is_environment_failure(exc):
            raise exc
        entry = reject_from(exc, input_id)
        if entry.reason == "duplicate":
            result.duplicates += 1
        log.info("rejected %s: %s", input_id, entry.reason)
        result.rejects.append(entry)

    def accept(input_id: str, samples: list[Any], dropped: list[ledger.Reject]) -> None:
        for sample in samples:
            writer.write(sample)
            result.add_sample(sample)
        result.accepted.append(input_id)
        result.dropped.extend(dropped)

    def finish(group: list[tuple[str, Any, list[ledger.Reject]]]) -> None:
        assert batching is not None
        try:
            outcomes = batching.finish([prepared for _, prepared, _ in group])
        except Exception as exc:
            if is_environment_failure(exc):
                raise
            outcomes = [exc] * len(group)  # the batch as a whole failed: each input says why
        if len(outcomes) != len(group):
            raise RuntimeError(f"a batch of {len(group)} inputs finished with {len(outcomes)} outcomes")
        for (input_id, _, dropped), outcome in zip(group, outcomes, strict=True):
            if isinstance(outcome, Exception):
                reject(input_id, outcome)
            else:
                accept(input_id, outcome, dropped)

    try:
        for input_id, item in _guarded(iter(inputs), result):
            result.inputs.append(input_id)
            dropped: list[ledger.Reject] = []
            try:
                made = make_samples(item, dropped)
            except Exception as exc:
                reject(input_id, exc)
                continue
            if batching is None:
                accept(input_id, made, dropped)
                continue
            key = batching.key(made)
            group = pending.setdefault(key, [])
            group.append((input_id, made, dropped))
            if len(group) >= batching.size:
                del pending[key]
                finish(group)
        for group in list(pending.values()):
            finish(group)
        pending.clear()
        writer.close(result)
    except BaseException as exc:
        writer.abort()
        if isinstance(exc, Exception) and not isinstance(exc, UnitFailed):
            raise UnitFailed(unit_id, f"{type(exc).__name__}: {exc}") from exc
        raise
    result.seconds = round(time.monotonic() - started, 3)
    if records:
        result.records = sorted(records, key=lambda r: str(r.get("key", "")))
    try:
        ledger.write_marker(output_uri, result)
    except Exception as exc:
        raise UnitFailed(unit_id, f"cannot write its completion marker: {exc}") from exc
    return result


def _guarded(inputs: Iterator[tuple[str, Any]], result: ledger.UnitResult) -> Iterator[tuple[str, Any]]:
    """``inputs``, with a :class:`RejectSource` turned into the source's reject (iteration ends)."""
    while True:
        try:
            pair = next(inputs)
        except StopIteration:
            return
        except RejectSource as exc:
            result.inputs.append(exc.input_id)
            result.rejects.append(ledger.Reject(exc.input_id, exc.reason, exc.detail))
            log.info("rejected %s: %s", exc.input_id, exc.reason)
            return
        yield pair
