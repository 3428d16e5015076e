"""Look inside a set of shards: counts per task, bucket and source, one sample's metadata, media export."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from collections import Counter
from dataclasses import dataclass, field

from sama import schema, storage


@dataclass
class ShardReport:
    """What ``sama inspect`` found under a shard prefix."""

    prefix: str
    shards: list[str] = field(default_factory=list)
    samples: int = 0
    bytes: int = 0
    per_task: Counter = field(default_factory=Counter)
    per_bucket: Counter = field(default_factory=Counter)
    per_source: Counter = field(default_factory=Counter)
    per_media: Counter = field(default_factory=Counter)
    per_dataset: Counter = field(default_factory=Counter)
    example: schema.SampleMeta | None = None
    exported: list[str] = field(default_factory=list)
    # From the job's summary.json when the prefix is (under) a data-job output.
    rejected_per_reason: dict[str, int] = field(default_factory=dict)
    dropped_per_reason: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "prefix": self.prefix,
            "shards": len(self.shards),
            "samples": self.samples,
            "bytes": self.bytes,
            "per_task": dict(sorted(self.per_task.items())),
            "per_bucket": dict(sorted(self.per_bucket.items())),
            "per_source": dict(self.per_source.most_common()),
            "per_media": dict(sorted(self.per_media.items())),
            "per_dataset": dict(sorted(self.per_dataset.items())),
            "example": dataclasses.asdict(self.example) if self.example else None,
            "exported": self.exported,
            "rejected_per_reason": self.rejected_per_reason,
            "dropped_per_reason": self.dropped_per_reason,
        }

    def format(self, top_sources: int = 10) -> str:
        lines = [
            f"shards:  {len(self.shards)} under {self.prefix}",
            f"samples: {self.samples}  ({self.bytes / 1e6:.1f} MB of members)",
        ]
        groups = (
            ("task", self.per_task),
            ("bucket", self.per_bucket),
            ("media", self.per_media),
            ("dataset", self.per_dataset),
        )
        for title, counts in groups:
            lines.append(f"per {title}:")
            lines.extend(f"  {name:<24} {count}" for name, count in sorted(counts.items()))
        for title, counts in (
            ("rejected inputs", self.rejected_per_reason),
            ("dropped clips", self.dropped_per_reason),
        ):
            if counts:
                lines.append(f"{title} per reason (the job's summary):")
                lines.extend(f"  {name:<24} {count}" for name, count in sorted(counts.items()))
        lines.append(f"per source (top {top_sources} of {len(self.per_source)}):")
        lines.extend(f"  {name:<48} {count}" for name, count in self.per_source.most_common(top_sources))
        if self.example is not None:
            lines.append(f"sample {self.example.key}:")
            meta = json.dumps(dataclasses.asdict(self.example), indent=2, sort_keys=True, ensure_ascii=False)
            lines.extend("  " + line for line in meta.splitlines())
        if self.exported:
            lines.append("written for viewing:")
            lines.extend(f"  {path}" for path in self.exported)
        return "\n".join(lines)


def source_label(meta: schema.SampleMeta) -> str:
    """How samples are grouped 'per source': the folder (or tar) the input came from."""
    uri = meta.source_uri.split("#", 1)[0] if "#" in meta.source_uri else os.path.dirname(meta.source_uri)
    return uri or meta.source_uri


def inspect_shards(
    prefix: str,
    sample: str | int | None = 0,
    export_dir: str | None = None,
) -> ShardReport:
    """Scan every shard under ``prefix`` (or one shard URI).

    ``sample`` picks the example to show: a key, or a position in reading order (0 = first); None
    shows none. With ``export_dir``, that sample's source and target media are written there as
    ``<key>.source.mp4`` / ``<key>.target.mp4`` (``.png`` for images), playable as they are; a
    source the shards do not store (a store-once pretext sample) is rebuilt and encoded for it.
    """
    shards = [prefix] if prefix.endswith(schema.SHARD_SUFFIX) else schema.list_shards(prefix)
    if not shards:
        raise FileNotFoundError(f"no shards (*.tar) under {prefix}")
    report = ShardReport(prefix=prefix, shards=shards)
    chosen: schema.Sample | schema.LatentSample | None = None
    for position, item in enumerate(schema.iter_samples(shards)):
        meta = item.meta
        report.samples += 1
        report.bytes += item.nbytes()
        report.per_task[meta.task] += 1
        report.per_bucket[meta.bucket] += 1
        report.per_media[meta.media] += 1
        report.per_source[source_label(meta)] += 1
        report.per_dataset[meta.dataset or "-"] += 1
        if chosen is None and sample is not None and (sample == position or sample == meta.key):
            chosen = item
    if sample is not None and chosen is None:
        raise KeyError(f"no sample {sample!r} in {prefix} ({report.samples} samples)")
    summary = _job_summary(prefix)
    if summary:
        report.rejected_per_reason = dict(summary.get("rejected_per_reason", {}))
        report.dropped_per_reason = dict(summary.get("dropped_per_reason", {}))
    if chosen is not None:
        report.example = chosen.meta
        if export_dir:
            if isinstance(chosen, schema.LatentSample):
                raise ValueError(
                    f"{prefix} holds latent shards (sama precompute): its samples are tensors, not media; "
                    "export from the pixel shards they were made from"
                )
            report.exported = export_media(chosen, export_dir)
    return report


def _job_summary(prefix: str) -> dict | None:
    """The ``summary.json`` of the data-job output ``prefix`` is, or lies under, if any."""
    from sama.prep import ledger

    root = prefix.rstrip("/")
    # ".../out/shards/video" -> ".../out": what precedes ledger.shard_path's tail. Without a
    # shards/ segment (ValueError) the prefix itself may be the output root.
    with contextlib.suppress(ValueError):
        root = root[: len(root) - len(ledger.shard_path(root))].rstrip("/")
    uri = storage.join(root, ledger.SUMMARY_FILE)
    try:
        return json.loads(storage.read_text(uri))
    except (storage.StorageError, ValueError):
        return None


def export_media(sample: schema.Sample | schema.EvalSample, export_dir: str) -> list[str]:
    """Write a sample's encoded source/target as files a person can open; returns their URIs.

    Stored members are written as they are. A pretext sample stored without its source gets the
    source rebuilt from the target (:meth:`schema.Sample.decode_source`), encoded as H.264 (or PNG
    for an image) at the sample's frame rate; a sample without source (t2v) gets the target only.
    An evaluated sample (``sama eval``) gets its source, edit and reference (when it had one).
    """
    suffix = ".mp4" if sample.meta.media == "video" else ".png"
    if isinstance(sample, schema.EvalSample):  # sama eval's output: source, edit and reference
        roles = (("source", sample.source), ("edit", sample.edit), ("reference", sample.reference))
        return _write_roles(sample.key, roles, suffix, export_dir)
    source = sample.source
    if source is None:
        frames = sample.decode_source()
        if frames is not None:
            source = _encode_preview(frames, sample.meta)
    return _write_roles(sample.key, (("source", source), ("target", sample.target)), suffix, export_dir)


def _write_roles(key: str, roles, suffix: str, export_dir: str) -> list[str]:
    """Write each ``(role, bytes)`` present as ``<key>.<role><suffix>``; returns the URIs."""
    written = []
    for role, data in roles:
        if data is None:
            continue
        uri = storage.join(export_dir, f"{key}.{role}{suffix}")
        storage.write_bytes(uri, data)
        written.append(uri)
    return written


def _encode_preview(frames, meta: schema.SampleMeta) -> bytes:
    """Frames rebuilt at read time -> a file to watch (near-lossless, so the seams stay visible)."""
    from sama import video

    if meta.media == "image":
        return video.encode_image(frames[0])
    return video.encode_mp4(frames, meta.fps, crf=12)
