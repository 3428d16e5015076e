"""The training data stream without Ray: decoding shard rows, splitting shards, shuffling, batching.

``build_pass`` (the one function that starts Ray Data) is replaced with a fake whose ``iter_rows``
yields decoded rows, so :class:`SourceStream` and :class:`MixedBatchIterator` run in-process.
"""

from __future__ import annotations

import collections
import json

import numpy as np
import pytest

from sama import schema, synthetic, video
from sama.schema import Sample, SampleMeta, ShardConfig, ShardWriter
from sama.train import data as data_lib
from sama.train.data import (
    DataConfig,
    DataPosition,
    MixedBatchIterator,
    SourceConfig,
    SourceStream,
    TrainingRow,
    collate,
    decode_row,
    load_validation,
    shape_key,
    worker_shards,
)

# ----------------------------------------------------------------------------------------------
# Real shards


def _clip(seed: int, frames: int = 5, height: int = 32, width: int = 32) -> np.ndarray:
    return synthetic.render(synthetic.random_scene(seed), frames, 8.0, height, width)


def _sample(index: int, kind: str, height: int = 32, width: int = 32) -> tuple[Sample, dict]:
    """A real sample (H.264 mp4 or png members) and the frames it was made from."""
    media = "image" if kind == "image_edit" else "video"
    frames = 1 if media == "image" else 5
    target = _clip(index, frames, height, width)
    source = None if kind == "t2v" else _clip(1000 + index, frames, height, width)
    if media == "image":
        encode = video.encode_image
        target_bytes = encode(target[0])
        source_bytes = encode(source[0])
    else:
        target_bytes = video.encode_mp4(target, 8.0, crf=10, preset="ultrafast")
        source_bytes = None if source is None else video.encode_mp4(source, 8.0, crf=10, preset="ultrafast")
    meta = SampleMeta(
        key=schema.sample_key("test", kind, index),
        task=kind,
        media=media,
        instruction="" if kind == "t2v" else f"[Video edit] make shape {index} red",
        caption="a shape moves" if kind == "t2v" else "",
        fps=8.0,
        num_frames=frames,
        height=height,
        width=width,
        bucket=f"{height}x{width}",
        source_uri=f"raw/{index}.mp4",
    )
    sample = Sample(meta=meta, target=target_bytes, source=source_bytes)
    return sample, {"target": target, "source": source}


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory):
    """Shards of video edits, a text-to-video clip and image edits; returns (prefix, originals by key)."""
    prefix = str(tmp_path_factory.mktemp("shards"))
    originals = {}
    with ShardWriter(prefix, "part", ShardConfig(max_samples=2)) as writer:
        for index, kind in enumerate(["video_edit", "t2v", "image_edit", "video_edit", "image_edit"]):
            sample, frames = _sample(index, kind)
            writer.write(sample)
            originals[sample.key] = (sample, frames)
    return prefix, originals


def _rows(prefix: str) -> list[dict]:
    return [row for shard in schema.list_shards(prefix) for row in schema.iter_members(shard)]


def test_decode_row_of_real_shard_samples(shard_dir):
    prefix, originals = shard_dir
    rows = _rows(prefix)
    assert len(rows) == 5
    for raw in rows:
        row = decode_row(raw)
        sample, frames = originals[row["key"]]
        assert row["error"] == ""
        assert row["task"] == sample.meta.task and row["media"] == sample.meta.media
        assert row["instruction"] == sample.meta.instruction and row["bucket"] == "32x32"
        assert row["target"].dtype == np.uint8
        if row["media"] == "image":
            assert row["target"].shape == (1, 32, 32, 3)
            assert np.array_equal(row["target"], frames["target"])  # png is lossless
            assert np.array_equal(row["source"], frames["source"])
        else:
            assert row["target"].shape == (5, 32, 32, 3)
            error = np.abs(row["target"].astype(int) - frames["target"].astype(int)).mean()
            assert error < 8, error  # H.264 at crf 10: close to the rendered frames
        if row["task"] == "t2v":
            assert row["source"].shape == (0, 0, 0, 3) and row["source"].size == 0
        else:
            assert row["source"].shape == row["target"].shape


def test_decode_row_turns_a_corrupt_member_into_an_error_row(shard_dir):
    prefix, _ = shard_dir
    raw = next(r for r in _rows(prefix) if "tgt.mp4" in r)
    raw["tgt.mp4"] = b"\x00\x00\x00\x18ftypmp42 this is not a video"
    row = decode_row(raw)
    assert row["error"]
    assert raw["__key__"] in row["error"] and raw["__url__"] in row["error"]
    assert row["key"] == raw["__key__"]
    assert row["media"] == "" and row["target"].size == 0 and row["source"].size == 0


def test_decode_row_skips_a_stream_the_decoder_had_to_conceal():
    """A shard whose video was damaged after prep (bit rot in storage) decodes with smeared
    macroblocks; the loader treats it like any undecodable sample."""
    frames = synthetic.render(synthetic.random_scene(3), 48, 12.0, 128, 160)
    clean = video.encode_mp4(frames, 12.0, gop=12)
    meta = SampleMeta(
        key="k", task="t2v", media="video", instruction="a clip", caption="a clip", fps=12.0,
        num_frames=48, height=128, width=160, bucket="128x160", source_uri="raw.mp4",
    )  # fmt: skip
    members = Sample(meta=meta, target=clean).members()
    good = decode_row({"__key__": "k", "__url__": "shard.tar", **members})
    assert good["error"] == "" and good["target"].shape == (48, 128, 160, 3)
    members["tgt.mp4"] = synthetic.damage_stream(clean, 1, flips=4)
    row = decode_row({"__key__": "k", "__url__": "shard.tar", **members})
    # Concealed ("corrupt_stream"), or, with frame threads, sometimes given up on outright.
    assert ("corrupt_stream" in row["error"] or "decode_failed" in row["error"]) and row["target"].size == 0


@pytest.mark.parametrize(
    "damage",
    [
        lambda r: r.pop("json"),
        lambda r: r.update(json=b"{not json"),
        lambda r: r.update({"__key__": "another-key"}),
        lambda r: r.pop("tgt.png"),
        lambda r: r.update({"tgt.png": b"\x89PNG\r\n\x1a\n truncated"}),
    ],
    ids=["no-metadata", "bad-json", "key-mismatch", "no-target", "corrupt-png"],
)
def test_decode_row_never_raises(shard_dir, damage):
    prefix, _ = shard_dir
    raw = next(r for r in _rows(prefix) if "tgt.png" in r)
    damage(raw)
    row = decode_row(raw)
    assert row["error"] and row["target"].shape == (0, 0, 0, 3)


def test_load_validation_reads_decoded_rows_and_skips_broken_ones(tmp_path):
    good = [_sample(i, "video_edit") for i in range(3)]
    broken, _ = _sample(9, "video_edit")
    broken = Sample(meta=broken.meta, target=b"not an mp4", source=broken.source)
    with ShardWriter(str(tmp_path), "val") as writer:
        writer.write(broken)
        for sample, _ in good:
            writer.write(sample)
    rows, render = load_validation(
        DataConfig(sources=[SourceConfig("a", "x")], val_uri=str(tmp_path), val_samples=2)
    )
    assert [r.key for r in rows] == [good[0][0].key, good[1][0].key]
    assert all(r.target.shape == (5, 32, 32, 3) and r.error == "" for r in rows)
    assert render == []
    everything, _ = load_validation(DataConfig(val_uri=str(tmp_path), val_samples=10))
    assert len(everything) == 3
    assert load_validation(DataConfig(val_uri=None), render_samples=1) == ([], [])


def _short_source_sample(index: int) -> Sample:
    """A video sample whose source is shorter than its target, as the speed task writes."""
    import dataclasses

    sample, _ = _sample(index, "video_edit")
    short = video.encode_mp4(_clip(1000 + index, 3), 8.0, crf=10, preset="ultrafast")
    return Sample(
        meta=dataclasses.replace(sample.meta, source_num_frames=3), target=sample.target, source=short
    )


def test_load_validation_reads_on_for_renderable_samples(tmp_path):
    """The loss set is the first val_samples; sample edits need a source (a speed sample's shorter
    one will do), found past the loss set when its first samples are text-to-video clips."""
    samples = [
        _sample(0, "t2v")[0],
        _sample(1, "t2v")[0],
        _short_source_sample(2),
        _sample(3, "video_edit")[0],
        _sample(4, "video_edit")[0],
    ]
    with ShardWriter(str(tmp_path), "val") as writer:
        for sample in samples:
            writer.write(sample)
    cfg = DataConfig(val_uri=str(tmp_path), val_samples=2)
    rows, render = load_validation(cfg, render_samples=2)
    assert [r.key for r in rows] == [samples[0].key, samples[1].key]
    assert [r.key for r in render] == [samples[2].key, samples[3].key]
    assert all(data_lib.renderable(r) for r in render)
    assert not any(data_lib.renderable(r) for r in rows)
    _, none = load_validation(DataConfig(val_uri=str(tmp_path), val_samples=1), render_samples=0)
    assert none == []


# ----------------------------------------------------------------------------------------------
# collate


def _row(key: str, media: str = "video", shape=(5, 8, 8), source: bool = True, value: int = 0, error=""):
    frames = 1 if media == "image" else shape[0]
    target = np.full((frames, shape[1], shape[2], 3), value, dtype=np.uint8)
    if error:
        return TrainingRow(key=key, error=error)
    return TrainingRow(
        key=key,
        task="t2v" if not source else ("image_edit" if media == "image" else "video_edit"),
        media=media,
        instruction=f"edit {key}",
        bucket=f"{shape[1]}x{shape[2]}",
        target=target,
        source=(255 - target) if source else None,
    )


def test_collate_stacks_rows_of_one_shape():
    rows = [_row("a", value=1), _row("b", value=2), _row("c", value=3)]
    batch = collate(rows)
    assert tuple(batch.target.shape) == (3, 5, 8, 8, 3)
    assert batch.target.dtype.is_floating_point is False
    assert [int(batch.target[i, 0, 0, 0, 0]) for i in range(3)] == [1, 2, 3]
    assert tuple(batch.source.shape) == (3, 5, 8, 8, 3)
    assert int(batch.source[1, 0, 0, 0, 0]) == 253
    assert batch.prompts == ["edit a", "edit b", "edit c"]
    assert batch.keys == ["a", "b", "c"] and batch.tasks == ["video_edit"] * 3
    assert batch.media == "video"


def test_collate_gives_no_source_for_text_to_video_rows():
    batch = collate([_row("a", source=False), _row("b", source=False)])
    assert batch.source is None
    assert tuple(batch.target.shape) == (2, 5, 8, 8, 3)
    assert batch.tasks == ["t2v", "t2v"]


def test_shape_key_separates_media_sizes_and_sources():
    assert shape_key(_row("a")) == shape_key(_row("b", value=9))
    assert shape_key(_row("a")) != shape_key(_row("a", shape=(5, 8, 16)))
    assert shape_key(_row("a")) != shape_key(_row("a", source=False))
    assert shape_key(_row("a", media="image")) != shape_key(_row("a", shape=(1, 8, 8)))


# ----------------------------------------------------------------------------------------------
# Splitting across workers


def _empty_shards(tmp_path, count: int) -> list[str]:
    for index in range(count):
        (tmp_path / schema.shard_name("part", index)).write_bytes(b"")
    return schema.list_shards(str(tmp_path))


def test_worker_shards_split_by_rank(tmp_path):
    shards = _empty_shards(tmp_path, 5)
    parts = [worker_shards(str(tmp_path), rank, 2) for rank in range(2)]
    assert parts[0] == (shards[0::2], False) and parts[1] == (shards[1::2], False)
    three = [worker_shards(str(tmp_path), rank, 3)[0] for rank in range(3)]
    assert sorted(s for part in three for s in part) == shards
    assert [len(p) for p in three] == [2, 2, 1]
    assert worker_shards(str(tmp_path), 4, 5) == ([shards[4]], False)


def test_fewer_shards_than_workers_falls_back_to_key_filtering(tmp_path):
    shards = _empty_shards(tmp_path, 2)
    for rank in range(3):
        assert worker_shards(str(tmp_path), rank, 3) == (shards, True)


def test_worker_shards_without_shards(tmp_path):
    with pytest.raises(FileNotFoundError, match="no shards"):
        worker_shards(str(tmp_path), 0, 1)


@pytest.mark.parametrize("world_size", [1, 2, 3, 8])
def test_key_filter_partitions_keys_across_ranks(world_size):
    keys = [schema.sample_key("clip", i) for i in range(400)]
    # Ray's read_webdataset may prefix the key with a path: the filter looks at the last segment.
    rows = [{"__key__": key if i % 2 else f"some/dir/{key}"} for i, key in enumerate(keys)]
    keeps = [data_lib._keep_for_rank(rank, world_size) for rank in range(world_size)]
    owners = [[rank for rank, keep in enumerate(keeps) if keep(row)] for row in rows]
    assert all(len(o) == 1 for o in owners)  # every key is kept by exactly one rank
    counts = collections.Counter(o[0] for o in owners)
    assert set(counts) == set(range(world_size))
    assert min(counts.values()) > 400 / world_size * 0.6  # uuid5 hex keys spread evenly
    # Stable: the same key always goes to the same rank.
    assert owners == [[r for r, keep in enumerate(keeps) if keep(row)] for row in rows]


def test_key_filter_accepts_every_schema_valid_key():
    keys = [schema.check_key(f"clip_{i:04d}") for i in range(100)]
    keeps = [data_lib._keep_for_rank(rank, 2) for rank in range(2)]
    owners = [[rank for rank, keep in enumerate(keeps) if keep({"__key__": key})] for key in keys]
    assert all(len(o) == 1 for o in owners)


# ----------------------------------------------------------------------------------------------
# Shuffling and positions


def test_shuffled_is_a_deterministic_permutation():
    rows = [{"i": i} for i in range(50)]
    first = [r["i"] for r in data_lib._shuffled(iter(rows), 8, seed=1)]
    again = [r["i"] for r in data_lib._shuffled(iter(rows), 8, seed=1)]
    other = [r["i"] for r in data_lib._shuffled(iter(rows), 8, seed=2)]
    assert sorted(first) == list(range(50))
    assert first == again
    assert first != other and sorted(other) == list(range(50))
    assert first != list(range(50))
    # A buffer of one (or zero) keeps the order.
    assert [r["i"] for r in data_lib._shuffled(iter(rows), 1, seed=1)] == list(range(50))
    assert [r["i"] for r in data_lib._shuffled(iter(rows), 0, seed=1)] == list(range(50))
    # A buffer larger than the stream still yields every row once.
    assert sorted(r["i"] for r in data_lib._shuffled(iter(rows), 500, seed=3)) == list(range(50))


def test_shuffle_buffer_is_local():
    # A row can move back at most buffer_size - 1 places from where it arrived.
    rows = [{"i": i} for i in range(200)]
    out = [r["i"] for r in data_lib._shuffled(iter(rows), 4, seed=5)]
    assert all(position >= value - 3 for position, value in enumerate(out))


def test_data_position_json_round_trip():
    position = DataPosition(
        step=12,
        passes={"video": 3, "image": 1},
        batches={"video": 9, "image": 3},
        skipped=2,
        pass_batches={"video": 2, "image": 3},
        repeats={"video": 1, "image": 4},
        salt=5,
    )
    text = position.to_json()
    assert json.loads(text) == {
        "step": 12,
        "passes": {"video": 3, "image": 1},
        "batches": {"video": 9, "image": 3},
        "skipped": 2,
        "pass_batches": {"video": 2, "image": 3},
        "repeats": {"video": 1, "image": 4},
        "salt": 5,
    }
    assert DataPosition.from_json(text) == position
    assert DataPosition.from_json(DataPosition().to_json()) == DataPosition()


def test_an_old_data_position_loads_with_fresh_passes_salted_by_its_step():
    """A position written before exact replay (no pass_batches): its passes counted passes a
    background thread had started, so every source starts a new pass, salted by the step."""
    old = json.dumps({"step": 12, "passes": {"video": 3}, "batches": {"video": 9}, "skipped": 2})
    position = DataPosition.from_json(old)
    assert position == DataPosition(
        step=12, passes={"video": 3}, batches={"video": 9}, skipped=2, pass_batches={}, repeats={}, salt=12
    )


# ----------------------------------------------------------------------------------------------
# MixedBatchIterator.choose


def _config(*weights: float, seed: int = 0, **kwargs) -> DataConfig:
    sources = [SourceConfig(f"s{i}", f"uri{i}", "video", w) for i, w in enumerate(weights)]
    return DataConfig(sources=sources, seed=seed, **kwargs)


def test_choose_follows_the_weights():
    mixed = MixedBatchIterator(_config(3.0, 1.0, 4.0))
    picks = collections.Counter(mixed.choose(step) for step in range(8000))
    assert set(picks) == {0, 1, 2}
    for index, share in enumerate([3 / 8, 1 / 8, 4 / 8]):
        assert abs(picks[index] / 8000 - share) < 0.02, (index, picks)


def test_choose_is_a_function_of_seed_and_step():
    a, b = MixedBatchIterator(_config(1.0, 1.0)), MixedBatchIterator(_config(1.0, 1.0))
    sequence = [a.choose(s) for s in range(200)]
    assert sequence == [b.choose(s) for s in range(200)]
    # Order of calls does not matter (a resumed run picks the same source for step 150).
    assert [a.choose(s) for s in reversed(range(200))] == sequence[::-1]
    other = MixedBatchIterator(_config(1.0, 1.0, seed=1))
    assert [other.choose(s) for s in range(200)] != sequence


def test_single_source_is_always_chosen():
    mixed = MixedBatchIterator(_config(0.5))
    assert {mixed.choose(s) for s in range(100)} == {0}


def test_invalid_data_config_is_rejected():
    with pytest.raises(ValueError, match="at least one source"):
        MixedBatchIterator(DataConfig())


# ----------------------------------------------------------------------------------------------
# SourceStream with a fake build_pass


class FakeDataset:
    def __init__(self, rows: list[dict]):
        self.rows = rows

    def iter_rows(self):
        return iter(self.rows)  # Ray rows, as Ray Data yields them


class FakePasses:
    """Stands in for build_pass: every pass yields ``rows`` (``repeats`` times), records its arguments."""

    def __init__(self, rows_by_source: dict[str, list[dict]], max_passes: int = 50):
        self.rows_by_source = rows_by_source
        self.calls: list[dict] = []
        self.max_passes = max_passes

    def __call__(self, source, cfg, rank, world_size, pass_index, repeats, salt):
        self.calls.append(
            {"source": source.name, "pass": pass_index, "repeats": repeats, "salt": salt, "rank": rank}
        )
        if len(self.calls) > self.max_passes:
            raise AssertionError(f"the stream started more than {self.max_passes} passes")
        return FakeDataset([r.to_ray() for r in self.rows_by_source[source.name]] * repeats)


@pytest.fixture
def fake_passes(monkeypatch):
    def install(rows_by_source, max_passes=50):
        fake = FakePasses(rows_by_source, max_passes)
        monkeypatch.setattr(data_lib, "build_pass", fake)
        return fake

    return install


def _stream(name="src", media="video", batch=2, buffer=1, position=None, min_rows=1, rank=0, world=1):
    cfg = DataConfig(
        sources=[SourceConfig(name, "uri", media)],
        video_batch_size=batch,
        image_batch_size=batch,
        shuffle_buffer=buffer,
        min_rows_per_pass=min_rows,
    )
    return SourceStream(cfg.sources[0], cfg, position or DataPosition(), rank, world)


def test_stream_batches_rows_of_one_shape(fake_passes):
    rows = [_row(f"a{i}") for i in range(6)] + [_row(f"b{i}", shape=(5, 8, 16)) for i in range(4)]
    rows = [rows[i] for i in (0, 6, 1, 7, 2, 3, 8, 4, 9, 5)]  # shapes interleaved
    fake_passes({"src": rows})
    stream = _stream(batch=2, buffer=4)
    batches = [stream.next_batch() for _ in range(5)]
    for batch in batches:
        assert len(batch) == 2
        assert len({shape_key(r) for r in batch}) == 1
    assert sorted(r.key for b in batches for r in b) == sorted(r.key for r in rows)
    # The position follows the batches drawn, not the producer (which may run the next pass ahead).
    assert stream.position.passes == {"src": 1} and stream.position.pass_batches == {"src": 5}
    assert stream.position.batches == {"src": 5} and stream.position.repeats == {"src": 1}


def test_stream_emits_a_partial_batch_at_the_end_of_a_pass(fake_passes):
    fake = fake_passes({"src": [_row(f"a{i}", value=i) for i in range(5)]})
    stream = _stream(batch=2, buffer=1, min_rows=1)
    sizes = [len(stream.next_batch()) for _ in range(3)]
    assert sizes == [2, 2, 1]
    assert stream.position.passes == {"src": 1} and stream.position.batches == {"src": 3}
    # The next batch comes from a second pass.
    assert [r.key for r in stream.next_batch()] == ["a0", "a1"]
    assert stream.position.passes == {"src": 2} and stream.position.pass_batches == {"src": 1}
    assert [c["pass"] for c in fake.calls][:2] == [0, 1]
    stream.close()


def test_small_sources_repeat_within_a_pass(fake_passes):
    fake = fake_passes({"src": [_row(f"a{i}") for i in range(4)]})
    stream = _stream(batch=4, buffer=1, min_rows=10)
    for _ in range(5):
        assert len(stream.next_batch()) == 4
    # Pass 0 had 4 rows; later passes list the shards ceil(10 / 4) = 3 times.
    stream.close()
    assert [c["repeats"] for c in fake.calls][:3] == [1, 3, 3]
    assert [c["pass"] for c in fake.calls][:3] == [0, 1, 2]


def test_undecodable_rows_are_skipped_and_counted(fake_passes):
    rows = [_row("a0"), _row("bad0", error="x: boom"), _row("a1"), _row("bad1", error="y: boom"), _row("a2")]
    fake_passes({"src": rows})
    stream = _stream(batch=3, buffer=1)
    batch = stream.next_batch()
    assert [r.key for r in batch] == ["a0", "a1", "a2"]
    assert stream.position.skipped == 2


def test_media_mismatch_names_the_source(fake_passes):
    fake_passes({"video_edits": [_row("a0"), _row("img", media="image")]})
    stream = _stream(name="video_edits", batch=4)
    with pytest.raises(ValueError, match="video_edits") as info:
        stream.next_batch()
    assert "img" in str(info.value) and "shards/video" in str(info.value)


def test_empty_source_is_an_error(fake_passes):
    fake_passes({"empty": []})
    stream = _stream(name="empty")
    with pytest.raises(RuntimeError, match="'empty'.*no samples"):
        stream.next_batch()


def test_a_source_of_only_undecodable_rows_is_an_error_not_a_hang(fake_passes):
    fake_passes({"broken": [_row("bad0", error="e"), _row("bad1", error="e")]}, max_passes=5)
    stream = _stream(name="broken")
    with pytest.raises(RuntimeError, match="broken"):
        stream.next_batch()


def test_an_old_position_resumes_with_a_fresh_pass_salted_by_the_step(fake_passes):
    fake = fake_passes({"src": [_row(f"a{i}") for i in range(8)]})
    old = json.dumps({"step": 7, "passes": {"src": 3}, "batches": {"src": 6}, "skipped": 0})
    position = DataPosition.from_json(old)
    stream = _stream(position=position, batch=2, buffer=4, rank=1, world=2)
    stream.next_batch()
    assert fake.calls[0] == {"source": "src", "pass": 3, "repeats": 1, "salt": 7, "rank": 1}
    assert position.passes == {"src": 4} and position.batches == {"src": 7}
    # From here on the position is of the new kind: a later resume replays the salted pass.
    assert position.pass_batches == {"src": 1} and position.salt == 7
    stream.close()


def test_shuffle_order_depends_on_pass_and_restart_step(fake_passes):
    fake_passes({"src": [_row(f"a{i:02d}") for i in range(40)]})

    def first_pass(step: int | None) -> list[str]:
        position = DataPosition(step=step or 0)
        if step is not None:
            position.restart_passes(step)
        stream = _stream(position=position, batch=40, buffer=16)
        return [r.key for r in stream.next_batch()]

    assert first_pass(None) == first_pass(None) == first_pass(0)
    assert first_pass(0) != first_pass(5)
    assert sorted(first_pass(5)) == sorted(first_pass(0))


# ----------------------------------------------------------------------------------------------
# MixedBatchIterator.next


def test_mixed_iterator_interleaves_sources_and_tracks_the_position(fake_passes):
    fake_passes(
        {
            "videos": [_row(f"v{i}", value=i) for i in range(6)],
            "images": [_row(f"i{i}", media="image", value=i) for i in range(8)],
        }
    )
    cfg = DataConfig(
        sources=[SourceConfig("videos", "u1", "video", 1.0), SourceConfig("images", "u2", "image", 1.0)],
        video_batch_size=2,
        image_batch_size=4,
        shuffle_buffer=2,
        seed=3,
    )
    mixed = MixedBatchIterator(cfg)
    expected = [cfg.sources[mixed.choose(step)].name for step in range(12)]
    seen = []
    for step in range(12):
        batch = mixed.next()
        seen.append(batch.source_name)
        if batch.source_name == "videos":
            assert batch.media == "video" and tuple(batch.target.shape) == (2, 5, 8, 8, 3)
        else:
            assert batch.media == "image" and tuple(batch.target.shape) == (4, 1, 8, 8, 3)
        assert mixed.position.step == step + 1
    assert seen == expected
    assert set(seen) == {"videos", "images"}
    assert mixed.position.batches == dict(collections.Counter(seen))
    assert mixed.wait_s > 0
    restored = DataPosition.from_json(mixed.position.to_json())
    assert restored == mixed.position


# ----------------------------------------------------------------------------------------------
# Gradient accumulation: one source per optimizer step


def _mixed_media(seed: int = 3, video_weight: float = 1.0, image_weight: float = 1.0, **kwargs):
    """A video and an image source over rows in memory (RowStream: no Ray, no fakes)."""
    cfg = DataConfig(
        sources=[
            SourceConfig("videos", "u1", "video", video_weight),
            SourceConfig("images", "u2", "image", image_weight),
        ],
        video_batch_size=2,
        image_batch_size=4,
        shuffle_buffer=2,
        seed=seed,
    )
    rows = {
        "videos": [_row(f"v{i}", value=i) for i in range(6)],
        "images": [_row(f"i{i}", media="image", value=i) for i in range(8)],
    }
    return cfg, MixedBatchIterator(cfg, rows=rows, **kwargs)


def _step_sources(mixed: MixedBatchIterator, steps, grad_accum: int) -> list[str]:
    """Draw ``grad_accum`` micro-batches per step like Trainer.train_step; one name per step,
    after checking that all the step's micro-batches came from it."""
    names = []
    for step in steps:
        micro = [mixed.next(step) for _ in range(grad_accum)]
        assert len({b.source_name for b in micro}) == 1, (step, [b.source_name for b in micro])
        assert len({b.media for b in micro}) == 1
        assert mixed.position.step == step + 1
        names.append(micro[0].source_name)
    return names


def test_micro_batches_of_a_step_share_one_source():
    cfg, mixed = _mixed_media()
    try:
        names = _step_sources(mixed, range(24), grad_accum=7)
    finally:
        mixed.close()
    assert names == [cfg.sources[mixed.choose(step)].name for step in range(24)]
    assert set(names) == {"videos", "images"}  # both media, never within one step
    counts = collections.Counter(names)
    assert mixed.position.batches == {name: 7 * n for name, n in counts.items()}


def test_the_step_draw_survives_a_resume_and_ignores_the_rank():
    """The source of a step is a function of (seed, step): a run resumed at step 10 (a fresh
    iterator over the checkpointed position, as Trainer.load_state_dict builds it) draws what the
    uninterrupted run drew, and so does every other rank."""
    _, whole = _mixed_media()
    try:
        uninterrupted = _step_sources(whole, range(20), grad_accum=3)
    finally:
        whole.close()
    _, first = _mixed_media()
    try:
        before = _step_sources(first, range(10), grad_accum=3)
        saved = first.position.to_json()
    finally:
        first.close()
    position = DataPosition.from_json(saved)
    assert position.step == 10  # the optimizer step, not the micro-batches drawn
    _, resumed = _mixed_media(position=position)
    try:
        after = _step_sources(resumed, range(10, 20), grad_accum=3)
    finally:
        resumed.close()
    assert before + after == uninterrupted
    _, other_rank = _mixed_media(rank=1, world_size=2)
    _, other_seed = _mixed_media(seed=4)
    try:
        assert [other_rank.choose(s) for s in range(20)] == [whole.choose(s) for s in range(20)]
        assert [other_seed.choose(s) for s in range(200)] != [whole.choose(s) for s in range(200)]
    finally:
        other_rank.close()
        other_seed.close()


# ----------------------------------------------------------------------------------------------
# Exact replay on resume


def _replay_setup(rank: int = 1, world_size: int = 2, **kwargs):
    """Two sources of several shapes each (so batches group by shape, leaving partial batches at
    the ends of passes), an undecodable row, passes of a few batches: cut points fall mid-pass
    with rows held per shape, and across pass boundaries."""
    cfg = DataConfig(
        sources=[
            SourceConfig("videos", "u1", "video", 2.0),
            SourceConfig("images", "u2", "image", 1.0),
        ],
        video_batch_size=3,
        image_batch_size=4,
        shuffle_buffer=3,
        seed=3,
    )
    rows = {
        "videos": [_row(f"v{i}", value=i) for i in range(7)]
        + [_row(f"w{i}", shape=(3, 8, 16)) for i in range(4)]
        + [_row("bad", error="x: boom")],
        "images": [_row(f"i{i}", media="image") for i in range(9)]
        + [_row(f"j{i}", media="image", shape=(1, 8, 16)) for i in range(3)],
    }
    return MixedBatchIterator(cfg, rank=rank, world_size=world_size, rows=rows, **kwargs)


def _draw(mixed: MixedBatchIterator, steps, grad_accum: int) -> list[tuple[str, ...]]:
    """The keys of every micro-batch of ``steps``, drawn like Trainer.train_step."""
    return [tuple(mixed.next(step).keys) for step in steps for _ in range(grad_accum)]


@pytest.mark.parametrize("grad_accum", [1, 3])
def test_a_resumed_iterator_replays_the_uninterrupted_stream(grad_accum):
    """Draw N steps, save the position as JSON, build a new iterator from it (as a resumed trainer
    does) and draw on: the batches are the uninterrupted run's N.., at every cut point (mid-pass
    with rows held per shape, at and across pass boundaries), and so is the final position."""
    total = 36 // grad_accum
    whole = _replay_setup()
    try:
        expected = _draw(whole, range(total), grad_accum)
        final = whole.position.to_json()
    finally:
        whole.close()
    held_rows = later_passes = 0
    for cut in range(total + 1):
        first = _replay_setup()
        try:
            before = _draw(first, range(cut), grad_accum)
            saved = first.position.to_json()
            held_rows += any(stream.pending for stream in first.streams)
            later_passes += any(n > 1 for n in first.position.passes.values())
        finally:
            first.close()
        resumed = _replay_setup(position=DataPosition.from_json(saved))
        try:
            after = _draw(resumed, range(cut, total), grad_accum)
            assert before + after == expected, cut
            assert resumed.position.to_json() == final, cut  # skipped rows are not counted twice
        finally:
            resumed.close()
    # The cut points covered the hard cases.
    assert held_rows >= 3 and later_passes >= 3, (held_rows, later_passes)
    assert json.loads(final)["skipped"] >= 2 and max(json.loads(final)["passes"].values()) >= 3


def test_replay_restores_the_pass_its_repeats_and_seeds(fake_passes):
    """A small source repeats its shards (learned from pass 0): a stream resumed inside a later
    pass rebuilds that pass with its index, repeats and seeds (no salt), skips the batches already
    drawn without returning them, and continues like the uninterrupted stream."""
    rows = [_row(f"a{i}") for i in range(4)] + [_row(f"b{i}", shape=(5, 8, 16)) for i in range(2)]
    fake = fake_passes({"src": rows}, max_passes=10_000)

    def stream(position=None):
        return _stream(batch=3, buffer=3, min_rows=10, position=position, rank=1, world=2)

    whole = stream()
    expected = [[r.key for r in whole.next_batch()] for _ in range(20)]
    whole.close()
    resumed_in_later_pass = 0
    for cut in range(20):
        first = stream()
        before = [[r.key for r in first.next_batch()] for _ in range(cut)]
        saved = first.position.to_json()
        first.close()
        position = DataPosition.from_json(saved)
        calls = len(fake.calls)
        resumed = stream(position)
        after = [[r.key for r in resumed.next_batch()] for _ in range(20 - cut)]
        resumed.close()
        assert before + after == expected, cut
        current = json.loads(saved)["passes"].get("src", 0) - 1
        if current > 0:
            resumed_in_later_pass += 1
            # Pass 0 had 6 rows; later passes list the shards ceil(10 / 6) = 2 times. (The first
            # stream's producer may still append a call after close: look among the new ones.)
            assert resumed.first_pass == current
            assert {
                "source": "src",
                "pass": current,
                "repeats": 2,
                "salt": 0,
                "rank": 1,
            } in fake.calls[calls:]
            assert json.loads(saved)["repeats"] == {"src": 2}
    assert resumed_in_later_pass >= 5


def test_a_pass_leaves_no_partial_batch_behind(fake_passes):
    """At the end of a pass every partial batch is emitted, fullest first: the next pass starts
    from empty groups (which a replay from the pass's start needs)."""
    rows = [_row("a0"), _row("b0", shape=(5, 8, 16)), _row("a1"), _row("c0", shape=(3, 8, 8))]
    fake_passes({"src": rows})
    stream = _stream(batch=4, buffer=1)
    sizes = [sorted(r.key for r in stream.next_batch()) for _ in range(3)]
    assert sizes == [["a0", "a1"], ["b0"], ["c0"]]
    assert stream.pending == {} and stream.position.pass_batches == {"src": 3}
    assert sorted(r.key for r in stream.next_batch()) == ["a0", "a1"]  # pass 1 alone
    assert stream.position.passes == {"src": 2} and stream.position.pass_batches == {"src": 1}
    stream.close()


def test_the_long_run_mix_of_steps_follows_the_weights():
    _, mixed = _mixed_media(video_weight=1.0, image_weight=3.0)
    try:
        names = _step_sources(mixed, range(1200), grad_accum=2)
    finally:
        mixed.close()
    share = collections.Counter(names)["images"] / len(names)
    assert abs(share - 0.75) < 0.05, share
    # Micro-batches follow the same mix (each step draws grad_accum of its source).
    assert mixed.position.batches["images"] == 2 * collections.Counter(names)["images"]


# ----------------------------------------------------------------------------------------------
# Decode priority


def test_decode_niceness_is_checked():
    cfg = DataConfig(sources=[SourceConfig(name="s", uri="/x")], decode_niceness=20)
    with pytest.raises(ValueError, match="decode_niceness"):
        cfg.validate()


def test_decoding_lowers_its_process_priority_once():
    """A decode worker runs many tasks; its niceness rises by the increment once, not per task."""
    import subprocess
    import sys

    script = (
        "import os\n"
        "from sama.train.data import lower_priority\n"
        "before = os.nice(0)\n"
        "lower_priority(3); lower_priority(3)\n"
        "print(os.nice(0) - before)\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "3"
    script_off = script.replace("lower_priority(3); lower_priority(3)", "lower_priority(0)")
    out = subprocess.run([sys.executable, "-c", script_off], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "0"


def test_row_stream_batches_rows_held_in_memory_pass_after_pass():
    """RowStream: the same shape grouping and passes as SourceStream, over rows in memory; every
    pass is a seeded permutation of the rows."""
    from sama.train.data import MixedBatchIterator, RowStream

    rows = [_row(f"a{i}") for i in range(6)] + [_row(f"b{i}", shape=(5, 8, 16)) for i in range(4)]
    cfg = DataConfig(sources=[SourceConfig("mem", "unused", "video")], video_batch_size=2, shuffle_buffer=1)
    stream = RowStream(cfg.sources[0], rows, cfg, DataPosition())
    first_pass = [stream.next_batch() for _ in range(5)]
    assert all(len({shape_key(r) for r in batch}) == 1 for batch in first_pass)
    assert sorted(r.key for b in first_pass for r in b) == sorted(r.key for r in rows)
    second_pass = [stream.next_batch() for _ in range(5)]
    assert sorted(r.key for b in second_pass for r in b) == sorted(r.key for r in rows)
    assert [r.key for b in first_pass for r in b] != [r.key for b in second_pass for r in b]
    stream.close()
    again = RowStream(cfg.sources[0], rows, cfg, DataPosition())
    assert [r.key for r in again.next_batch()] == [r.key for r in first_pass[0]]
    again.close()

    mixed = MixedBatchIterator(cfg, rows={"mem": rows})
    assert len(mixed.next().keys) == 2 and mixed.next().source_name == "mem"
    mixed.close()
    with pytest.raises(ValueError, match="no rows given"):
        MixedBatchIterator(cfg, rows={"other": rows})
