"""Unit tests for sama.prep.pretext_job: clip planning, checks, per-video samples and per-unit processing."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import re
import tarfile

import numpy as np
import pytest

from sama import schema, storage, synthetic, video
from sama.buckets import Bucket
from sama.config import apply_override
from sama.prep import inputs, ledger
from sama.prep.inputs import InputConfig, VideoInput, WorkUnit
from sama.prep.pretext_job import (
    ClipConfig,
    PrepPretextConfig,
    RejectInput,
    check_video,
    plan_clips,
    process_unit,
    video_samples,
)
from sama.pretext import PREFIXES, apply_task, choose_task, instruction_for, task_rng, unshuffle_tubes

FPS = 8.0
SECONDS = 3.0  # 24 frames at 8 fps
# 4:3-ish, 5:4 and 1:2 (tall): the first two land in the 64x96 bucket, the last in 128x64.
GOOD_SIZES = [(64, 96), (128, 160), (128, 64)]
SEED = 11


def small_cfg(output_uri: str = "", num_frames: int = 9, max_clips: int = 1, **pretext) -> PrepPretextConfig:
    cfg = PrepPretextConfig()
    cfg.output.uri = output_uri
    cfg.clips.num_frames = num_frames
    cfg.clips.fps = FPS
    cfg.clips.min_side = 32
    cfg.clips.max_clips_per_video = max_clips
    # The paper's seven ratios at a small area: the bucket names below are written for them.
    cfg.buckets.preset = "paper"
    cfg.buckets.base_height = 64
    cfg.buckets.base_width = 112
    cfg.encode.preset = "ultrafast"
    for name, value in pretext.items():
        setattr(cfg.pretext, name, value)
    cfg.validate()
    return cfg


def expected_caption(index: int, seed: int = SEED) -> str:
    return synthetic.caption(synthetic.random_scene(synthetic.derive_seed(seed, index)))


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def mean_abs(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


@pytest.fixture(scope="module")
def one_video(tmp_path_factory) -> tuple[str, str]:
    """A 128x160, 3 s, 8 fps video with a .txt sidecar; returns (video URI, sidecar URI)."""
    root = tmp_path_factory.mktemp("one")
    (uri,) = synthetic.write_raw_videos(
        str(root), 1, seed=SEED, fps=FPS, seconds=SECONDS, sizes=[(128, 160)], captions="txt"
    )
    return uri, uri[: -len(".mp4")] + ".txt"


@pytest.fixture(scope="module")
def mixed_input(tmp_path_factory) -> tuple[str, list[str], dict[str, str]]:
    """Good videos (txt, json, txt sidecars) and every bad-input kind in one folder."""
    root = str(tmp_path_factory.mktemp("mixed"))
    good = synthetic.write_raw_videos(root, 3, seed=SEED, fps=FPS, seconds=SECONDS, sizes=GOOD_SIZES)
    bad = synthetic.write_bad_inputs(root)
    return root, good, bad


# --------------------------------------------------------------------------------------------
# plan_clips and ClipConfig


@pytest.mark.parametrize(
    ("duration", "overrides", "expected"),
    [
        # 9 frames at 8 fps: a clip lasts 1.125 s; the margin is half a frame (0.0625 s).
        (3.0, {}, [0.0]),
        (3.0, {"max_clips_per_video": 10}, [0.0, 1.125]),
        (2.25, {"max_clips_per_video": 10}, [0.0, 1.125]),  # exactly two clips' duration
        (10.0, {"max_clips_per_video": 5}, [0.0, 1.125, 2.25, 3.375, 4.5]),
        (3.0, {"max_clips_per_video": 10, "stride_s": 0.5}, [0.0, 0.5, 1.0, 1.5]),
        (3.0, {"max_clips_per_video": 10, "stride_s": 1.0, "start_offset_s": 0.5}, [0.5, 1.5]),
        (1.425, {"max_clips_per_video": 10, "stride_s": 0.1}, [0.0, 0.1, 0.2, 0.3]),  # rounded starts
        (3.0, {"max_clips_per_video": 3, "stride_s": 5.0}, [0.0]),
        (3.0, {"start_offset_s": 2.0}, []),  # the offset leaves less than one clip
        (1.0, {}, []),
        (0.0, {}, []),
    ],
)
def test_plan_clips_exact_starts(duration, overrides, expected):
    cfg = dataclasses.replace(ClipConfig(num_frames=9, fps=8.0), **overrides)
    cfg.validate()
    assert plan_clips(duration, cfg) == expected


def test_plan_clips_margin_at_exactly_one_clip():
    cfg = ClipConfig(num_frames=9, fps=8.0, max_clips_per_video=10)
    assert cfg.duration_s == 1.125
    assert plan_clips(1.125, cfg) == [0.0]  # exactly one clip
    assert plan_clips(1.125 + 1.0, cfg) == [0.0]  # just short of two clips
    assert plan_clips(1.0625, cfg) == [0.0]  # short by exactly the half-frame margin
    assert plan_clips(1.0625 - 1e-6, cfg) == []  # short by more than the margin
    assert plan_clips(2.25 - 0.0625, cfg) == [0.0, 1.125]
    assert plan_clips(2.25 - 0.0626, cfg) == [0.0]
    # The paper's setting: 49 frames at 16 fps = 3.0625 s, margin 1/32 s.
    default = ClipConfig()
    assert (default.num_frames, default.fps, default.duration_s) == (49, 16.0, 3.0625)
    assert plan_clips(3.0625, default) == [0.0]
    assert plan_clips(3.04, default) == [0.0]
    assert plan_clips(3.0, default) == []
    assert plan_clips(100.0, default) == [0.0]  # one clip per video by default


@pytest.mark.parametrize("frames", [0, 2, 8, 10, 48, 50, 80])
def test_clip_config_rejects_frame_counts_not_4k_plus_1(frames):
    with pytest.raises(ValueError, match=f"4k\\+1.*got {frames}"):
        ClipConfig(num_frames=frames).validate()


@pytest.mark.parametrize("frames", [1, 5, 9, 17, 49, 81])
def test_clip_config_accepts_4k_plus_1(frames):
    ClipConfig(num_frames=frames).validate()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"fps": 0.0}, "fps"),
        ({"max_clips_per_video": 0}, "max_clips_per_video"),
        ({"stride_s": 0.0}, "stride_s"),
        ({"stride_s": -1.0}, "stride_s"),
        ({"start_offset_s": -0.5}, "start_offset_s"),
    ],
)
def test_clip_config_rejects_bad_values(overrides, message):
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(ClipConfig(), **overrides).validate()


# --------------------------------------------------------------------------------------------
# check_video


def info(**overrides) -> video.VideoInfo:
    fields = {
        "uri": "/in/v.mp4",
        "duration_s": 3.0,
        "fps": 8.0,
        "num_frames": 24,
        "width": 160,
        "height": 128,
        "codec": "h264",
        "has_video": True,
        "has_audio": False,
    }
    fields.update(overrides)
    return video.VideoInfo(**fields)


def test_check_video_accepts_and_returns_planned_starts():
    assert check_video(info(), small_cfg(max_clips=3)) == [0.0, 1.125]
    assert check_video(info(width=32, height=32), small_cfg()) == [0.0]  # min_side is inclusive


@pytest.mark.parametrize(
    ("overrides", "reason", "detail"),
    [
        (
            {"has_video": False, "width": 0, "height": 0, "fps": 0.0, "num_frames": 0},
            "no_video_stream",
            "no video",
        ),
        ({"width": 200, "height": 30}, "too_small", "200x30 is below clips.min_side=32"),
        ({"width": 31, "height": 300}, "too_small", "31x300"),
        ({"duration_s": 1.0, "num_frames": 8}, "too_short", "1.00s (8 frames) is shorter than one clip of 9"),
        # A file without video is reported as such even though it is also "too small" and "too short".
        ({"has_video": False, "width": 0, "height": 0, "duration_s": 0.0}, "no_video_stream", "no video"),
        # Too small wins over too short.
        ({"width": 16, "height": 16, "duration_s": 0.1}, "too_small", "16x16"),
    ],
)
def test_check_video_rejects_with_reason(overrides, reason, detail):
    with pytest.raises(RejectInput) as caught:
        check_video(info(**overrides), small_cfg())
    assert caught.value.reason == reason
    assert caught.value.detail.startswith("/in/v.mp4: ")
    assert detail in caught.value.detail
    assert str(caught.value) == caught.value.detail


# --------------------------------------------------------------------------------------------
# video_samples


def test_video_samples_clips_bucket_keys_and_metadata(one_video):
    uri, sidecar = one_video
    cfg = small_cfg(max_clips=3)
    cfg.dataset = "unit-test"
    samples = video_samples(uri, VideoInput(uri, caption_uri=sidecar), cfg)
    caption = expected_caption(0)
    assert caption and open(sidecar).read().strip() == caption
    bucket = cfg.buckets.nearest(128, 160)
    assert bucket == Bucket(64, 96)  # 5:4 is nearest to the 3:2 bucket of this small base
    starts = [0.0, 1.125]
    assert len(samples) == len(starts)
    for index, (sample, start) in enumerate(zip(samples, starts, strict=True)):
        meta = sample.meta
        assert meta.key == schema.sample_key(uri, index, start)
        assert meta.task == choose_task(task_rng(cfg.seed, meta.key), cfg.pretext.weights)
        assert meta.media == "video" and meta.dataset == "unit-test"
        assert meta.caption == caption
        assert meta.instruction == instruction_for(meta.task, caption)
        expected_instruction = caption if meta.task == "t2v" else f"{PREFIXES[meta.task]} {caption}"
        assert meta.instruction == expected_instruction
        assert meta.span == [start, start + 1.125]
        assert (meta.fps, meta.num_frames, meta.height, meta.width, meta.bucket) == (8.0, 9, 64, 96, "64x96")
        assert meta.source_uri == uri
        target = sample.decode_target()
        assert target.shape == (9, 64, 96, 3)
        # The target is the clip at its span, resized and cropped to the bucket.
        reference = video.decode_clip(uri, start_s=start, num_frames=9, fps=8.0, size=(64, 96))
        other = video.decode_clip(uri, start_s=starts[1 - index], num_frames=9, fps=8.0, size=(64, 96))
        assert mean_abs(target, reference) < 6.0
        assert mean_abs(target, other) > 2 * mean_abs(target, reference)
        sample.members()  # validates against the schema
    assert samples[0].key != samples[1].key


@pytest.mark.parametrize("materialize", [False, True])
@pytest.mark.parametrize(
    ("task", "num_frames", "source_frames"),
    [("t2v", 9, None), ("cube_inpaint", 9, 9), ("speed", 9, 5), ("speed", 17, 9), ("tube_shuffle", 9, 9)],
)
def test_video_samples_source_per_task(one_video, task, num_frames, source_frames, materialize):
    uri, _ = one_video
    cfg = small_cfg(num_frames=num_frames, weights={task: 1.0}, materialize_source=materialize)
    (sample,) = video_samples(uri, VideoInput(uri, caption="a caption"), cfg)
    meta = sample.meta
    assert meta.task == task and meta.num_frames == num_frames
    assert meta.instruction == (f"{PREFIXES[task]} a caption" if PREFIXES[task] else "a caption")
    assert meta.source_num_frames == source_frames
    target = sample.decode_target()
    source = sample.decode_source()
    assert target.shape == (num_frames, 64, 96, 3)
    if task == "t2v":
        assert sample.source is None and source is None and meta.pretext == {}
        assert sample.decode_pair()[1] is None
        return
    # Stored only when materialized; otherwise rebuilt from the decoded target and meta.pretext.
    assert (sample.source is not None) == materialize
    assert (schema.SOURCE_VIDEO in sample.members()) == materialize
    assert source.shape == (source_frames, 64, 96, 3)
    pair_target, pair_source = sample.decode_pair()
    assert np.array_equal(pair_target, target) and np.array_equal(pair_source, source)
    # The job's own draw, replayed on the decoded target: the same parameters, and without a
    # stored source, bit-exactly the same source.
    rng = task_rng(cfg.seed, meta.key)
    assert choose_task(rng, cfg.pretext.weights) == task
    replayed = apply_task(task, target, rng, cfg.pretext)
    assert replayed.params == meta.pretext
    if not materialize:
        assert np.array_equal(source, replayed.source)
    else:
        assert mean_abs(source, replayed.source) < 6.0  # an encoded source: up to coding noise
    if task == "speed":
        assert meta.pretext == {"speed_factor": 2, "source_frames": source_frames}
        # Every 2nd frame of the target (up to coding noise), not the target's first frames.
        every_2nd = mean_abs(source, target[::2][:source_frames])
        assert every_2nd < 6.0
        assert mean_abs(source, target[:source_frames]) > 2 * every_2nd + 1
    elif task == "cube_inpaint":
        start, length = meta.pretext["mask_start"], meta.pretext["mask_length"]
        assert start >= 1 and length == round(0.3 * num_frames) and meta.pretext["mask_value"] == 0
        masked = list(range(start, start + length))
        kept = [i for i in range(num_frames) if i not in masked]
        assert source[masked].mean() < 8.0  # whole frames blacked out
        assert mean_abs(source[kept], target[kept]) < 6.0
    else:
        perm = meta.pretext["permutation"]
        assert sorted(perm) == list(range(8)) and perm != list(range(8))
        restored = unshuffle_tubes(source, perm, meta.pretext["tube_first_frame"])
        assert mean_abs(restored, target) < 6.0
        assert mean_abs(source, target) > 2 * mean_abs(restored, target) + 1


@pytest.mark.parametrize("materialize", [False, True])
def test_shards_hold_a_source_member_only_when_materialized(tmp_path, one_video, materialize):
    uri, _ = one_video
    members = {}
    for task in ("t2v", "cube_inpaint", "speed", "tube_shuffle"):
        out = str(tmp_path / f"{task}-{materialize}")
        cfg = apply_override(
            small_cfg(out, max_clips=2, weights={task: 1.0}),
            f"pretext.materialize_source={str(materialize).lower()}",
        )
        assert cfg.pretext.materialize_source is materialize
        unit = WorkUnit(unit_id=inputs.unit_id_for([uri]), videos=[VideoInput(uri, caption="c")])
        result = process_unit(unit, cfg)
        assert result.samples == 2
        (shard,) = schema.list_shards(ledger.shards_uri(out))
        with tarfile.open(shard) as tar:
            members[task] = sorted(name.split(".", 1)[1] for name in tar.getnames())
        for sample in read_shards(out):
            assert sample.meta.source_num_frames == (None if task == "t2v" else {"speed": 5}.get(task, 9))
            source = sample.decode_source()
            if task == "t2v":
                assert source is None
                continue
            target = sample.decode_target()
            rng = task_rng(cfg.seed, sample.key)
            choose_task(rng, cfg.pretext.weights)
            expected = apply_task(task, target, rng, cfg.pretext).source
            if materialize:
                assert mean_abs(source, expected) < 6.0
            else:
                assert np.array_equal(source, expected)
    stored = ["json", "src.mp4", "tgt.mp4"] if materialize else ["json", "tgt.mp4"]
    assert members == {
        "t2v": ["json", "json", "tgt.mp4", "tgt.mp4"],  # a text-to-video sample never has a source
        **{task: sorted(stored * 2) for task in ("cube_inpaint", "speed", "tube_shuffle")},
    }


def test_store_once_shards_are_smaller_than_materialized_ones(tmp_path, one_video):
    uri, _ = one_video
    sizes = {}
    for materialize in (False, True):
        out = str(tmp_path / str(materialize))
        cfg = small_cfg(out, max_clips=2, weights={"tube_shuffle": 1.0}, materialize_source=materialize)
        unit = WorkUnit(unit_id=inputs.unit_id_for([uri]), videos=[VideoInput(uri, caption="c")])
        sizes[materialize] = process_unit(unit, cfg).bytes
        # Identical samples otherwise: same keys, tasks and parameters.
        sizes[(materialize, "meta")] = [s.meta.to_json() for s in read_shards(out)]
    assert sizes[(False, "meta")] == sizes[(True, "meta")]
    assert sizes[False] < 0.75 * sizes[True]


def test_video_samples_are_deterministic_and_tasks_follow_the_seed(one_video):
    uri, _ = one_video
    cfg = small_cfg(max_clips=2)
    first = video_samples(uri, VideoInput(uri, caption="c"), cfg)
    second = video_samples(uri, VideoInput(uri, caption="c"), cfg)
    assert [s.key for s in first] == [s.key for s in second]
    assert [s.meta.to_json() for s in first] == [s.meta.to_json() for s in second]
    keys = [s.key for s in first]
    for seed in (1, 2):
        cfg.seed = seed
        tasks = [s.meta.task for s in video_samples(uri, VideoInput(uri, caption="c"), cfg)]
        assert tasks == [choose_task(task_rng(seed, k), cfg.pretext.weights) for k in keys]
    # The draw itself: over many clip ids the 1:2:3:4 mix is visible and reproducible.
    draws = [choose_task(task_rng(0, f"clip-{i}"), cfg.pretext.weights) for i in range(2000)]
    assert draws == [choose_task(task_rng(0, f"clip-{i}"), cfg.pretext.weights) for i in range(2000)]
    counts = {t: draws.count(t) / len(draws) for t in ("t2v", "cube_inpaint", "speed", "tube_shuffle")}
    for task, share in zip(counts, (0.1, 0.2, 0.3, 0.4), strict=True):
        assert abs(counts[task] - share) < 0.04


def test_video_samples_rejects_unusable_videos(one_video):
    uri, _ = one_video
    cfg = small_cfg()
    cfg.clips.min_side = 200
    with pytest.raises(RejectInput) as caught:
        video_samples(uri, VideoInput(uri), cfg)
    assert caught.value.reason == "too_small" and "160x128" in caught.value.detail
    with pytest.raises(RejectInput) as caught:
        video_samples(uri, VideoInput(uri), small_cfg(num_frames=33))  # 4.125 s > 3 s
    assert caught.value.reason == "too_short"
    with pytest.raises(video.VideoDecodeError) as caught:
        video_samples(uri + ".missing", VideoInput(uri + ".missing"), small_cfg())
    assert caught.value.kind == "missing"


# --------------------------------------------------------------------------------------------
# process_unit


def read_shards(output_uri: str) -> list[schema.Sample]:
    return list(schema.iter_samples(ledger.shards_uri(output_uri)))


def test_process_unit_mixed_good_and_bad_inputs(tmp_path, mixed_input):
    root, good, bad = mixed_input
    assert sorted(bad.values()) == sorted(synthetic.BAD_INPUT_KINDS.values())
    out = str(tmp_path / "out")
    cfg = small_cfg(out, max_clips=2)
    cfg.shards.max_samples = 2
    cfg.seed = 3
    (unit,), skipped = inputs.list_units(InputConfig(uri=root))
    assert skipped == 0 and unit.input_ids == sorted(good + list(bad))
    result = process_unit(unit, cfg)

    assert result.unit_id == unit.unit_id
    assert result.sources == unit.input_ids and result.inputs == unit.input_ids
    assert result.accepted == good
    assert {r.input: r.reason for r in result.rejects} == bad
    assert all(r.detail for r in result.rejects)
    assert len(result.accepted) + len(result.rejects) == len(result.inputs)
    assert set(result.accepted) | {r.input for r in result.rejects} == set(result.inputs)

    # 3 good videos x 2 clips; the tall one is alone in its bucket.
    assert result.samples == 6
    assert result.per_bucket == {"64x96": 4, "128x64": 2}
    assert sum(result.per_task.values()) == 6
    shards_root = ledger.shards_uri(out)
    assert [(s["path"], s["samples"]) for s in result.shards] == [
        (f"shards/video/128x64/{unit.unit_id}-000000.tar", 2),
        (f"shards/video/64x96/{unit.unit_id}-000000.tar", 2),
        (f"shards/video/64x96/{unit.unit_id}-000001.tar", 2),
    ]
    assert schema.list_shards(shards_root) == sorted(ledger.shard_uri(out, s) for s in result.shards)
    for shard in result.shards:
        assert re.fullmatch(rf"shards/video/\d+x\d+/{unit.unit_id}-\d{{6}}\.tar", shard["path"])
        assert shard["bytes"] > 0
    assert result.bytes == sum(s["bytes"] for s in result.shards)

    samples = read_shards(out)
    assert len(samples) == result.samples
    expected_keys = {schema.sample_key(uri, i, start) for uri in good for i, start in enumerate([0.0, 1.125])}
    assert {s.key for s in samples} == expected_keys
    per_shard = {
        s["path"]: [x.key for x in schema.iter_samples([ledger.shard_uri(out, s)])] for s in result.shards
    }
    for shard_uri, keys in per_shard.items():
        assert len(keys) == 2
        bucket = shard_uri.split("/")[-2]
        assert {x.meta.bucket for x in samples if x.key in keys} == {bucket}
    captions = {uri: expected_caption(i) for i, uri in enumerate(good)}
    tasks: dict[str, int] = {}
    for sample in samples:
        meta = sample.meta
        assert meta.caption == captions[meta.source_uri]
        assert meta.instruction == instruction_for(meta.task, meta.caption)
        assert meta.task == choose_task(task_rng(3, meta.key), cfg.pretext.weights)
        tasks[meta.task] = tasks.get(meta.task, 0) + 1
        height, width = Bucket.parse(meta.bucket).height, Bucket.parse(meta.bucket).width
        assert sample.decode_target().shape == (9, height, width, 3)
    assert tasks == result.per_task

    marker = ledger.marker_uri(out, unit.unit_id)
    assert os.path.isfile(marker)
    assert ledger.UnitResult.from_json(storage.read_text(marker)) == result
    assert ledger.read_markers(out) == [result]
    # No temporary files are left behind.
    leftovers = [n for _, _, names in os.walk(out) for n in names if n.startswith(".")]
    assert leftovers == []


def test_process_unit_is_idempotent(tmp_path, mixed_input):
    _, good, _ = mixed_input
    out = str(tmp_path / "out")
    cfg = small_cfg(out, max_clips=2)
    cfg.shards.max_samples = 3
    unit = WorkUnit(unit_id=inputs.unit_id_for(good), videos=[VideoInput(u) for u in good])
    first = process_unit(WorkUnit.from_json(unit.to_json()), cfg)
    keys_first = [s.key for s in read_shards(out)]
    metas_first = [s.meta.to_json() for s in read_shards(out)]
    second = process_unit(WorkUnit.from_json(unit.to_json()), cfg)
    keys_second = [s.key for s in read_shards(out)]
    assert keys_first == keys_second and len(keys_first) == 6
    assert [s.meta.to_json() for s in read_shards(out)] == metas_first
    assert [s["path"] for s in first.shards] == [s["path"] for s in second.shards]
    assert [s["samples"] for s in first.shards] == [s["samples"] for s in second.shards] == [2, 3, 1]
    assert schema.list_shards(ledger.shards_uri(out)) == sorted(
        ledger.shard_uri(out, s) for s in second.shards
    )

    def stable(r: ledger.UnitResult) -> dict:
        # Encoded byte sizes and timing may vary between runs; everything else must not.
        return {k: v for k, v in dataclasses.asdict(r).items() if k not in ("seconds", "bytes", "shards")}

    assert stable(first) == stable(second)
    assert ledger.read_markers(out) == [second]


def test_process_unit_reads_a_tar_unit_with_captions(tmp_path, mixed_input):
    _, good, _ = mixed_input
    in_dir = tmp_path / "in"
    in_dir.mkdir()
    tar_uri = str(in_dir / "videos.tar")
    with tarfile.open(tar_uri, "w") as tar:
        add_member(tar, "k1.txt", b"first caption\n")  # caption before the video
        add_member(tar, "k1.mp4", open(good[0], "rb").read())
        add_member(tar, "k2.mp4", open(good[2], "rb").read())
        add_member(tar, "k2.json", json.dumps({"caption": "second caption"}).encode())  # after
    (unit,), _ = inputs.list_units(InputConfig(uri=str(in_dir)))
    assert unit.tar_uri == tar_uri and unit.videos == []
    out = str(tmp_path / "out")
    result = process_unit(WorkUnit.from_json(unit.to_json()), small_cfg(out))
    members = [f"{tar_uri}#k1.mp4", f"{tar_uri}#k2.mp4"]
    assert result.sources == [tar_uri]
    assert result.inputs == members and result.accepted == members and result.rejects == []
    assert result.samples == 2 and result.per_bucket == {"64x96": 1, "128x64": 1}
    samples = {s.meta.source_uri: s for s in read_shards(out)}
    assert sorted(samples) == members
    assert samples[members[0]].meta.caption == "first caption"
    assert samples[members[1]].meta.caption == "second caption"
    for member, sample in samples.items():
        assert sample.key == schema.sample_key(member, 0, 0.0)
        assert sample.meta.instruction == instruction_for(sample.meta.task, sample.meta.caption)
    assert samples[members[0]].decode_target().shape == (9, 64, 96, 3)
    assert samples[members[1]].decode_target().shape == (9, 128, 64, 3)
    assert ledger.read_markers(out) == [result]


def test_process_unit_records_a_corrupt_tar_as_bad_tar(tmp_path):
    tar_uri = str(tmp_path / "in" / "corrupt.tar")
    storage.write_bytes(tar_uri, b"this is not a tar archive\n" * 50)
    unit = WorkUnit(unit_id=inputs.unit_id_for([tar_uri]), tar_uri=tar_uri)
    out = str(tmp_path / "out")
    result = process_unit(unit, small_cfg(out))
    assert result.sources == [tar_uri] and result.inputs == [tar_uri]
    assert result.accepted == [] and result.samples == 0 and result.shards == [] and result.bytes == 0
    assert [(r.input, r.reason) for r in result.rejects] == [(tar_uri, "bad_tar")]
    assert result.rejects[0].detail.startswith(f"{tar_uri}: ")
    assert schema.list_shards(ledger.shards_uri(out)) == []
    assert ledger.read_markers(out) == [result]


def test_process_unit_keeps_the_members_before_a_tar_breaks(tmp_path, mixed_input):
    _, good, _ = mixed_input
    whole = io.BytesIO()
    with tarfile.open(fileobj=whole, mode="w") as tar:
        add_member(tar, "k1.mp4", open(good[0], "rb").read())
        add_member(tar, "k1.txt", b"kept")
        add_member(tar, "k2.mp4", open(good[1], "rb").read())
    data = whole.getvalue()
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        second = tar.getmember("k2.mp4")
    # Cut in the middle of the second video's data.
    tar_uri = str(tmp_path / "in" / "cut.tar")
    storage.write_bytes(tar_uri, data[: second.offset_data + second.size // 2])
    unit = WorkUnit(unit_id=inputs.unit_id_for([tar_uri]), tar_uri=tar_uri)
    out = str(tmp_path / "out")
    result = process_unit(unit, small_cfg(out))
    assert result.inputs == [f"{tar_uri}#k1.mp4", tar_uri]
    assert result.accepted == [f"{tar_uri}#k1.mp4"]
    assert [(r.input, r.reason) for r in result.rejects] == [(tar_uri, "bad_tar")]
    assert len(result.accepted) + len(result.rejects) == len(result.inputs)
    (sample,) = read_shards(out)
    assert sample.meta.caption == "kept" and result.samples == 1


def test_process_unit_records_an_unreadable_sidecar(tmp_path, mixed_input):
    _, good, _ = mixed_input
    missing = str(tmp_path / "gone.txt")
    unit = WorkUnit(
        unit_id=inputs.unit_id_for(good[:2]),
        videos=[VideoInput(good[0], caption_uri=missing), VideoInput(good[1], caption="ok")],
    )
    out = str(tmp_path / "out")
    result = process_unit(unit, small_cfg(out))
    assert result.accepted == [good[1]]
    assert [(r.input, r.reason) for r in result.rejects] == [(good[0], "unreadable")]
    assert "gone.txt" in result.rejects[0].detail
    assert [s.meta.source_uri for s in read_shards(out)] == [good[1]]


def test_streams_the_decoder_conceals_are_rejected_as_corrupt_stream(tmp_path):
    root = tmp_path / "in"
    root.mkdir()
    clean = video.encode_mp4(synthetic.render(synthetic.random_scene(3), 36, 12.0, 96, 128), 12.0, gop=12)
    files = {"clean.mp4": clean, "truncated.mp4": clean[: len(clean) // 3]}
    for seed in range(3):  # a few flipped bytes in the middle of the stream
        files[f"bitrot{seed}.mp4"] = synthetic.damage_stream(clean, seed, flips=4)
    # Damage after the only clip (1 s at 8 fps from t=0): the clip itself decodes clean.
    files["late_damage.mp4"] = synthetic.damage_stream(clean, 0, start=0.8, end=0.95, flips=4)
    for name, data in files.items():
        (root / name).write_bytes(data)
    zeroed = bytearray(clean)
    at = int(len(clean) * 0.3)
    zeroed[at : at + 512] = bytes(512)  # a zeroed block in the stream, inside the clip's span
    files["zeroed.mp4"] = bytes(zeroed)
    (root / "zeroed.mp4").write_bytes(files["zeroed.mp4"])
    (unit,), _ = inputs.list_units(InputConfig(uri=str(root)))
    result = process_unit(unit, small_cfg(str(tmp_path / "out")))
    reasons = {os.path.basename(r.input): r.reason for r in result.rejects}
    assert sorted(os.path.basename(a) for a in result.accepted) == ["clean.mp4", "late_damage.mp4"]
    # Damage the decoder conceals and damage it stops at mid-stream are both "corrupt_stream".
    assert reasons == {
        **{f"bitrot{seed}.mp4": "corrupt_stream" for seed in range(3)},
        "zeroed.mp4": "corrupt_stream",
        "truncated.mp4": "truncated",
    }
    details = [r.detail for r in result.rejects if r.reason == "corrupt_stream"]
    assert all(("damaged data" in d and "bitrot" in d) or "zeroed" in d for d in details)
    assert any("concealed damaged data" in d and "decode.max_errors" in d for d in details)
    assert sorted(result.accepted + [r.input for r in result.rejects]) == sorted(result.inputs)
    # The policy is configurable: with the check off the damaged clips go through.
    lenient = small_cfg(str(tmp_path / "lenient"))
    lenient.decode.max_errors = None
    lenient_result = process_unit(unit, lenient)
    concealed = {os.path.basename(a) for a in lenient_result.accepted} - {"clean.mp4", "late_damage.mp4"}
    assert concealed and concealed <= {"bitrot0.mp4", "bitrot1.mp4", "bitrot2.mp4", "zeroed.mp4"}


def test_a_corrupt_clip_is_dropped_while_the_clean_clips_of_its_video_are_kept(tmp_path):
    root = tmp_path / "in"
    root.mkdir()
    clean = video.encode_mp4(synthetic.render(synthetic.random_scene(3), 36, 12.0, 96, 128), 12.0, gop=12)
    # Two clips of 1.125 s (9 frames at 8 fps) at 0 and 1.125 s; damage only in the last GOP (2-3 s).
    (root / "late.mp4").write_bytes(synthetic.damage_stream(clean, 0, start=0.8, end=0.95, flips=4))
    cfg = small_cfg(str(tmp_path / "out"), max_clips=2)
    cfg.clips.stride_s = 1.875  # second clip at 1.875 s: inside the damaged GOP
    (unit,), _ = inputs.list_units(InputConfig(uri=str(root)))
    result = process_unit(unit, cfg)
    assert result.accepted == [str(root / "late.mp4")] and result.rejects == [] and result.samples == 1
    assert [(d.input, d.reason) for d in result.dropped] == [
        (f"{root / 'late.mp4'}@1.875s", "corrupt_stream")
    ]
    summary = ledger.summarize([result], [result], 1.0)
    assert summary.dropped == 1 and summary.dropped_per_reason == {"corrupt_stream": 1}
    ledger.write_summary(cfg.output.uri, [result], summary)
    lines = storage.read_text(storage.join(cfg.output.uri, ledger.REJECTS_FILE)).splitlines()
    assert [json.loads(line)["reason"] for line in lines] == ["corrupt_stream"]
    assert ledger.read_markers(cfg.output.uri)[0].dropped == result.dropped
