"""Unit tests for sama.prep.pairs_job: manifests, duplicates, units, filters, alignment and pair samples."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from dataclasses import dataclass

import numpy as np
import pytest

from sama import schema, storage, synthetic, video
from sama.prep import ledger
from sama.prep.pairs_job import (
    AlignConfig,
    ColumnConfig,
    FilterConfig,
    PairRow,
    PairsUnit,
    PrepPairsConfig,
    RejectInput,
    align_videos,
    check_scores,
    list_pair_units,
    mark_duplicates,
    pair_sample,
    process_pairs_unit,
    read_manifest,
    with_prefix,
)

SEED = 23
SRC_FPS, TGT_FPS = 12.0, 8.0
SRC_FRAMES, TGT_FRAMES = 24, 14  # 2.0 s and 1.75 s: 12.5% apart, within the 25% tolerance
SRC_HW = (64, 96)
TGT_HW = (128, 192)  # twice the source's size, same 3:2 aspect
BUCKET = (64, 96)
# min(12, 8, 16) = 8 fps over min(2.0, 1.75) = 1.75 s -> 14 frames -> the largest 4k+1 is 13.
ALIGNED_FPS, ALIGNED_FRAMES = 8.0, 13
PREFIX = "[Video edit] "
GOOD_SCORES = {"if": 9.0, "vq": 9.5, "cp": 9.0, "mc": 8.0}  # passes the image and video thresholds


def small_cfg(output_uri: str = "") -> PrepPairsConfig:
    cfg = PrepPairsConfig()
    cfg.output.uri = output_uri
    cfg.align.min_side = 32
    # The paper's seven ratios at a small area: the bucket names below are written for them.
    cfg.buckets.preset = "paper"
    cfg.buckets.base_height = 64
    cfg.buckets.base_width = 112
    cfg.encode.preset = "ultrafast"
    cfg.validate()
    return cfg


def mean_abs(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


@dataclass
class Media:
    root: str
    src_mp4: str
    tgt_mp4: str
    short_mp4: str  # the target scene, half as long as the source
    src_png: str
    tgt_png: str
    square_png: str  # the target scene at 1:1, where the source is 3:2
    corrupt_mp4: str
    corrupt_png: str
    missing_mp4: str
    missing_png: str
    source_scene: synthetic.Scene
    target_scene: synthetic.Scene
    instruction: str


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> Media:
    root = str(tmp_path_factory.mktemp("pairs"))
    source = synthetic.random_scene(synthetic.derive_seed(SEED, 0))
    # A background edit changes most pixels, so source and target are told apart easily.
    target, instruction = synthetic.make_edit(source, "background", synthetic.derive_seed(SEED, 0, "edit"))

    def mp4(name: str, scene, frames: int, fps: float, hw: tuple[int, int]) -> str:
        uri = os.path.join(root, "media", name)
        pixels = synthetic.render(scene, frames, fps, *hw)
        storage.write_bytes(uri, video.encode_mp4(pixels, fps, preset="ultrafast"))
        return uri

    def png(name: str, scene, hw: tuple[int, int]) -> str:
        uri = os.path.join(root, "media", name)
        storage.write_bytes(uri, video.encode_image(synthetic.render(scene, 1, 1.0, *hw)[0], "png"))
        return uri

    corrupt = {}
    for name in ("corrupt.mp4", "corrupt.png"):
        corrupt[name] = os.path.join(root, "media", name)
        storage.write_bytes(corrupt[name], b"\x00\x01 definitely not media \xff" * 64)
    return Media(
        root=root,
        src_mp4=mp4("src.mp4", source, SRC_FRAMES, SRC_FPS, SRC_HW),
        tgt_mp4=mp4("tgt.mp4", target, TGT_FRAMES, TGT_FPS, TGT_HW),
        short_mp4=mp4("short.mp4", target, 8, TGT_FPS, SRC_HW),
        src_png=png("src.png", source, SRC_HW),
        tgt_png=png("tgt.png", target, TGT_HW),
        square_png=png("square.png", target, (64, 64)),
        corrupt_mp4=corrupt["corrupt.mp4"],
        corrupt_png=corrupt["corrupt.png"],
        missing_mp4=os.path.join(root, "media", "missing.mp4"),
        missing_png=os.path.join(root, "media", "missing.png"),
        source_scene=source,
        target_scene=target,
        instruction=instruction,
    )


def make_row(source: str, target: str, instruction: str = "Make it blue.", **fields) -> PairRow:
    fields.setdefault("row_id", "/m/manifest.csv#0")
    fields.setdefault("scores", dict(GOOD_SCORES))
    return PairRow(source=source, target=target, instruction=instruction, **fields)


# --------------------------------------------------------------------------------------------
# ColumnConfig.resolve


GENERIC = {"source": "source", "target": "target", "instruction": "instruction"}


@pytest.mark.parametrize(
    ("header", "config", "expected"),
    [
        (["source", "target", "instruction"], {}, GENERIC),
        (["category", "instruction", "target", "source", "score_if"], {}, GENERIC),
        (["source", "target", "instruction"], {"preset": "generic"}, GENERIC),
        # DiffSynth-Studio's metadata.csv: the edited clip is `video`, the conditioning clip a control.
        (
            ["video", "prompt", "vace_video"],
            {},
            {"source": "vace_video", "target": "video", "instruction": "prompt"},
        ),
        (
            ["video", "prompt", "control_video"],
            {},
            {"source": "control_video", "target": "video", "instruction": "prompt"},
        ),
        (
            ["video", "prompt", "control_video"],
            {"preset": "diffsynth"},
            {"source": "control_video", "target": "video", "instruction": "prompt"},
        ),
        # vace_video comes first among the control columns.
        (
            ["control_video", "video", "vace_video", "prompt"],
            {},
            {"source": "vace_video", "target": "video", "instruction": "prompt"},
        ),
        (
            ["image", "prompt", "input_image"],
            {},
            {"source": "input_image", "target": "image", "instruction": "prompt"},
        ),
        # Explicit columns override the preset's candidates.
        (
            ["clip_in", "clip_out", "edit"],
            {"source": "clip_in", "target": "clip_out", "instruction": "edit"},
            {"source": "clip_in", "target": "clip_out", "instruction": "edit"},
        ),
        (
            ["source", "target", "instruction", "prompt_v2"],
            {"instruction": "prompt_v2"},
            {"source": "source", "target": "target", "instruction": "prompt_v2"},
        ),
        # A single override completes the DiffSynth layout when no known control column exists.
        (
            ["video", "prompt", "reference_clip"],
            {"source": "reference_clip"},
            {"source": "reference_clip", "target": "video", "instruction": "prompt"},
        ),
    ],
)
def test_column_config_resolves_headers(header, config, expected):
    assert ColumnConfig(**config).resolve(header, "/data/m.csv") == expected


@pytest.mark.parametrize(
    ("header", "config"),
    [
        (["path", "edited", "text"], {}),
        (["video", "prompt"], {}),  # DiffSynth without any control (source) column
        (["video", "prompt", "vace_video"], {"preset": "generic"}),
        (["source", "target", "instruction"], {"preset": "diffsynth"}),
        (["source", "target", "instruction"], {"source": "src_path"}),  # override not in the header
    ],
)
def test_column_config_unrecognisable_header_names_manifest_and_header(header, config):
    with pytest.raises(ValueError) as caught:
        ColumnConfig(**config).resolve(header, "/data/edits/m.csv")
    message = str(caught.value)
    assert message.startswith("/data/edits/m.csv: ")
    assert str(header) in message
    assert repr(ColumnConfig(**config).preset) in message


def test_column_config_unknown_preset():
    with pytest.raises(
        ValueError, match=r"columns\.preset 'wan' is unknown \(known: auto, generic, diffsynth\)"
    ):
        ColumnConfig(preset="wan").resolve(["source", "target", "instruction"], "/data/m.csv")


# --------------------------------------------------------------------------------------------
# read_manifest


def manifest_rows(folder: str) -> list[dict]:
    return [
        # Relative paths, every score (one an int-like string in csv), a category.
        {
            "source": "pairs/a_src.mp4",
            "target": "pairs/a_tgt.mp4",
            "instruction": "Remove the red circle.",
            "category": "remove",
            "score_if": 9.5,
            "score_vq": 9.0,
            "score_cp": 8.25,
            "score_mc": 10.0,
        },
        # Absolute paths, a NaN and an empty score, no category; '..' is normalised away.
        {
            "source": os.path.join(folder, "abs", "b_src.png"),
            "target": "../elsewhere/b_tgt.png",
            "instruction": "Add a cat.",
            "category": None,
            "score_if": float("nan"),
            "score_vq": None,
            "score_cp": 9.0,
            "score_mc": None,
        },
        {
            "source": "pairs/c_src.mp4",
            "target": None,
            "instruction": "no target",
            "category": "add",
            "score_if": None,
            "score_vq": None,
            "score_cp": None,
            "score_mc": None,
        },
        {
            "source": None,
            "target": "pairs/d_tgt.mp4",
            "instruction": None,
            "category": None,
            "score_if": 7.0,
            "score_vq": None,
            "score_cp": None,
            "score_mc": None,
        },
    ]


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
def test_read_manifest_formats_paths_scores_and_problems(tmp_path, fmt):
    folder = str(tmp_path / "edits")
    uri = synthetic.write_manifest(manifest_rows(folder), os.path.join(folder, f"manifest.{fmt}"))
    parent = str(tmp_path)
    cfg = small_cfg()
    cfg.input.allowed_prefixes = [parent]  # "../elsewhere" is outside the manifest's folder
    rows = read_manifest(uri, cfg)
    assert [r.row_id for r in rows] == [f"{uri}#{i}" for i in range(4)]
    assert [r.dataset for r in rows] == ["manifest"] * 4
    assert [r.duplicate_of for r in rows] == [None] * 4

    first, second, no_target, no_source = rows
    assert (first.source, first.target) == (f"{folder}/pairs/a_src.mp4", f"{folder}/pairs/a_tgt.mp4")
    assert first.instruction == "Remove the red circle."
    assert first.category == "remove"
    assert first.scores == {"if": 9.5, "vq": 9.0, "cp": 8.25, "mc": 10.0}
    assert all(type(v) is float for v in first.scores.values())
    assert first.problem is None

    assert (second.source, second.target) == (f"{folder}/abs/b_src.png", f"{parent}/elsewhere/b_tgt.png")
    assert second.category is None
    assert second.scores == {"cp": 9.0}  # NaN and empty scores are absent, not zero
    assert second.problem is None

    assert no_target.source == f"{folder}/pairs/c_src.mp4" and no_target.target == ""
    assert no_target.problem == "row 2 has no target path"
    assert no_target.scores == {} and no_target.category == "add"

    assert no_source.source == "" and no_source.target == f"{folder}/pairs/d_tgt.mp4"
    assert no_source.problem == "row 3 has no source path"
    assert no_source.instruction == ""
    assert no_source.scores == {"if": 7.0}


def test_manifest_rows_may_point_only_under_allowed_prefixes(tmp_path):
    folder = tmp_path / "edits"
    folder.mkdir()
    secret = "X-Amz-Signature=deadbeef0123"
    targets = {
        "pairs/ok.mp4": None,
        "/etc/passwd": "outside the manifest's folder",
        "../../other-bucket/x.mp4": "outside the manifest's folder",
        f"file://{folder}/pairs/ok.mp4": "file:// locations are not read",
        f"https://user:pw@cdn.example.com/v.mp4?{secret}&X-Amz-Credential=AKIA": "https:// locations",
        "http://example.com/v.mp4": "http:// locations",
        "~/videos/v.mp4": "home-relative",
    }
    rows = [{"source": "pairs/src.mp4", "target": t, "instruction": "Add a cat."} for t in targets]
    uri = synthetic.write_manifest(
        rows, str(folder / "manifest.jsonl"), columns=("source", "target", "instruction")
    )
    read = read_manifest(uri, small_cfg())
    for row, (target, problem) in zip(read, targets.items(), strict=True):
        if problem is None:
            assert row.problem is None and row.target == f"{folder}/pairs/ok.mp4"
        else:
            assert row.problem_reason == "bad_location" and problem in row.problem, (target, row.problem)
            assert row.target == ""
    # Nothing of the signed URL's secrets is kept.
    assert not any(secret in (r.problem or "") or "pw@" in (r.problem or "") for r in read)
    assert not any("AKIA" in (r.problem or "") for r in read)

    # Widening: an allowed prefix admits paths under it, and only those.
    cfg = small_cfg()
    cfg.input.allowed_prefixes = ["/etc"]
    widened = read_manifest(uri, cfg)
    assert widened[1].problem is None and widened[1].target == "/etc/passwd"
    assert widened[2].problem_reason == "bad_location"


def test_read_manifest_dataset_override_and_stem(tmp_path):
    uri = synthetic.write_manifest(
        [{"source": "a.mp4", "target": "b.mp4", "instruction": "x"}], str(tmp_path / "edits.v2.jsonl")
    )
    assert read_manifest(uri, small_cfg())[0].dataset == "edits.v2"
    cfg = small_cfg()
    cfg.dataset = "my-set"
    assert read_manifest(uri, cfg)[0].dataset == "my-set"


def test_read_manifest_diffsynth_metadata_csv(tmp_path):
    uri = synthetic.write_manifest(
        [
            {"video": "videos/out_0.mp4", "prompt": "Make the sky red.", "control_video": "videos/in_0.mp4"},
            {"video": "/abs/out_1.mp4", "prompt": "Remove the dog.", "control_video": "/abs/in_1.mp4"},
        ],
        str(tmp_path / "metadata.csv"),
    )
    cfg = small_cfg()
    cfg.input.allowed_prefixes = ["/abs"]
    rows = read_manifest(uri, cfg)
    assert [(r.source, r.target, r.instruction) for r in rows] == [
        (f"{tmp_path}/videos/in_0.mp4", f"{tmp_path}/videos/out_0.mp4", "Make the sky red."),
        ("/abs/in_1.mp4", "/abs/out_1.mp4", "Remove the dog."),
    ]
    assert all(r.scores == {} and r.category is None and r.problem is None for r in rows)
    assert {r.dataset for r in rows} == {"metadata"}


def test_read_manifest_custom_columns_and_errors(tmp_path):
    uri = synthetic.write_manifest(
        [{"in": "a.mp4", "out": "b.mp4", "edit": "Do it.", "kind": "style", "judge_if": "8.5"}],
        str(tmp_path / "custom.csv"),
    )
    with pytest.raises(ValueError, match=re.escape(f"{uri}: cannot find source/target/instruction columns")):
        read_manifest(uri, small_cfg())
    cfg = small_cfg()
    cfg.columns = ColumnConfig(source="in", target="out", instruction="edit", category="kind")
    cfg.columns.scores = {"if": "judge_if"}
    (row,) = read_manifest(uri, cfg)
    assert (row.source, row.target, row.instruction) == (f"{tmp_path}/a.mp4", f"{tmp_path}/b.mp4", "Do it.")
    assert row.category == "style" and row.scores == {"if": 8.5}
    # An empty manifest has no rows (and needs no header).
    empty = synthetic.write_manifest([], str(tmp_path / "empty.jsonl"))
    assert read_manifest(empty, small_cfg()) == []


def test_read_manifest_jsonl_first_row_without_target_key(tmp_path):
    uri = str(tmp_path / "sparse.jsonl")
    storage.write_text(
        uri,
        json.dumps({"source": "a.mp4", "instruction": "x"})
        + "\n"
        + json.dumps({"source": "b.mp4", "target": "c.mp4", "instruction": "y"})
        + "\n",
    )
    rows = read_manifest(uri, small_cfg())
    assert rows[0].problem == "row 0 has no target path"
    assert rows[1].problem is None and rows[1].target == f"{tmp_path}/c.mp4"


def test_read_manifest_non_numeric_score_is_a_row_problem(tmp_path):
    uri = synthetic.write_manifest(
        [
            {"source": "a.mp4", "target": "b.mp4", "instruction": "x", "score_if": "high"},
            {"source": "a.mp4", "target": "c.mp4", "instruction": "y", "score_if": "9"},
        ],
        str(tmp_path / "scores.csv"),
    )
    rows = read_manifest(uri, small_cfg())
    assert rows[0].problem == "row 0 has a non-numeric score_if score 'high'"
    assert rows[1].problem is None and rows[1].scores == {"if": 9.0}


def test_prefixed_and_plain_copies_of_an_edit_are_duplicates(tmp_path):
    uri = synthetic.write_manifest(
        [
            {"source": "a.mp4", "target": "b.mp4", "instruction": "Remove the cat."},
            {"source": "a.mp4", "target": "b.mp4", "instruction": "[Video edit] Remove the cat."},
        ],
        str(tmp_path / "dups.csv"),
    )
    rows = read_manifest(uri, small_cfg())
    assert rows[1].instruction == "Remove the cat."
    assert mark_duplicates(rows) == 1 and rows[1].duplicate_of == rows[0].row_id


# --------------------------------------------------------------------------------------------
# mark_duplicates, list_pair_units, PairsUnit


def two_manifests(tmp_path) -> tuple[str, str]:
    folder = str(tmp_path / "m")
    m1 = synthetic.write_manifest(
        [
            {"source": "p/a.mp4", "target": "p/a_t.mp4", "instruction": "Edit A."},  # 0
            {"source": "p/b.mp4", "target": "p/b_t.mp4", "instruction": "Edit B."},  # 1
            {"source": "p/a.mp4", "target": "p/a_t.mp4", "instruction": "  Edit A. "},  # 2: dup of 0
            {"source": "p/x.mp4", "target": "", "instruction": "Bad."},  # 3: bad row
        ],
        os.path.join(folder, "one.csv"),
    )
    m2 = synthetic.write_manifest(
        [
            {"source": f"{folder}/p/a.mp4", "target": f"{folder}/p/a_t.mp4", "instruction": "Edit A."},  # dup
            {"source": "p/c.mp4", "target": "p/c_t.mp4", "instruction": "Edit C."},
            {"source": "p/a.mp4", "target": "p/a_t.mp4", "instruction": "Edit A differently."},
            {"source": "p/x.mp4", "target": None, "instruction": "Bad."},  # bad rows are never dups
        ],
        os.path.join(folder, "two.jsonl"),
    )
    return m1, m2


def test_mark_duplicates_across_manifests_keeps_the_first(tmp_path):
    m1, m2 = two_manifests(tmp_path)
    cfg = small_cfg()
    rows = read_manifest(m1, cfg) + read_manifest(m2, cfg)
    assert mark_duplicates(rows) == 2
    assert [r.duplicate_of for r in rows] == [None, None, f"{m1}#0", None, f"{m1}#0", None, None, None]
    assert rows[2].key == rows[4].key == rows[0].key
    assert rows[0].key == schema.sample_key(rows[0].source, rows[0].target, "Edit A.")
    assert rows[6].key != rows[0].key
    assert [r.problem is not None for r in rows] == [False, False, False, True] * 2


def test_list_pair_units_groups_rows_deterministically_and_skips_done(tmp_path):
    m1, m2 = two_manifests(tmp_path)
    cfg = small_cfg()
    cfg.input.manifests = [m1, m2]
    cfg.input.rows_per_unit = 3
    all_ids = [f"{m1}#{i}" for i in range(4)] + [f"{m2}#{i}" for i in range(4)]

    units, skipped = list_pair_units(cfg, set())
    assert skipped == 0
    assert [u.input_ids for u in units] == [all_ids[0:3], all_ids[3:6], all_ids[6:8]]
    assert all(re.fullmatch(r"[0-9a-f]{32}", u.unit_id) for u in units)
    assert len({u.unit_id for u in units}) == 3
    assert [u.unit_id for u in list_pair_units(cfg, set())[0]] == [u.unit_id for u in units]
    flat = [r for u in units for r in u.rows]
    assert [r.row_id for r in flat if r.duplicate_of] == [all_ids[2], all_ids[4]]

    # Rows covered by a completed unit are skipped; ids that match no row are not counted.
    done = set(all_ids[:3]) | {"/elsewhere/gone.csv#0"}
    resumed, skipped = list_pair_units(cfg, done)
    assert skipped == 3
    assert [u.input_ids for u in resumed] == [all_ids[3:6], all_ids[6:8]]
    # Same chunks -> same unit ids as in the first listing.
    assert [u.unit_id for u in resumed] == [u.unit_id for u in units[1:]]
    # The original is done, yet its repeat in the pending rows is still a duplicate.
    assert resumed[0].rows[1].duplicate_of == all_ids[0]

    cfg.input.rows_per_unit = 8
    (single,), _ = list_pair_units(cfg, set())
    assert single.input_ids == all_ids and single.unit_id not in {u.unit_id for u in units}
    cfg.input.rows_per_unit = 0
    with pytest.raises(ValueError, match="rows_per_unit"):
        list_pair_units(cfg, set())


def test_pairs_unit_json_round_trip():
    rows = [
        make_row("/a.mp4", "/b.mp4", "Edit.", row_id="m#0", category="add", dataset="d"),
        make_row("/a.mp4", "/b.mp4", "Edit.", row_id="m#1", duplicate_of="m#0", scores={}),
        make_row("/x.mp4", "", "Bad.", row_id="m#2", problem="row 2 has no target path"),
    ]
    unit = PairsUnit(unit_id="0" * 32, rows=rows)
    again = PairsUnit.from_json(unit.to_json())
    assert again == unit
    assert isinstance(again.rows[0], PairRow)
    assert again.input_ids == ["m#0", "m#1", "m#2"]
    assert again.rows[0].scores == GOOD_SCORES and again.rows[1].duplicate_of == "m#0"


# --------------------------------------------------------------------------------------------
# check_scores and with_prefix


IMAGE_OK = {"if": 9.0, "vq": 9.0, "cp": 9.0}
VIDEO_OK = {"if": 8.0, "vq": 9.0, "cp": 8.0, "mc": 8.0}


@pytest.mark.parametrize(
    ("media", "scores", "failing"),
    [
        ("image", IMAGE_OK, None),  # every threshold is inclusive
        ("image", {**IMAGE_OK, "mc": 0.0}, None),  # mc is not an image threshold
        ("image", {**IMAGE_OK, "if": 8.99}, "score if=8.99 is below 9"),
        ("image", {**IMAGE_OK, "vq": 8.5}, "score vq=8.5 is below 9"),
        ("image", {**IMAGE_OK, "cp": 8.0}, "score cp=8 is below 9"),
        ("image", VIDEO_OK, "score if=8 is below 9"),  # a video-grade pair is too low for images
        ("video", VIDEO_OK, None),
        ("video", {"if": 10.0, "vq": 10.0, "cp": 10.0, "mc": 10.0}, None),
        ("video", {**VIDEO_OK, "if": 7.99}, "score if=7.99 is below 8"),
        ("video", {**VIDEO_OK, "vq": 8.99}, "score vq=8.99 is below 9"),
        ("video", {**VIDEO_OK, "cp": 7.5}, "score cp=7.5 is below 8"),
        ("video", {**VIDEO_OK, "mc": 7.0}, "score mc=7 is below 8"),
        ("video", {}, None),  # missing scores pass unless required
        ("video", {"vq": 9.0}, None),
        ("image", {}, None),
    ],
)
def test_check_scores_thresholds(media, scores, failing):
    row = make_row("/a", "/b", scores=scores, row_id="m.csv#7")
    if failing is None:
        check_scores(row, media, FilterConfig())
        return
    with pytest.raises(RejectInput) as caught:
        check_scores(row, media, FilterConfig())
    assert caught.value.reason == "low_score"
    assert caught.value.detail == f"m.csv#7: {failing}"


def test_check_scores_require_and_disable():
    required = FilterConfig(require_scores=True)
    check_scores(make_row("/a", "/b", scores=dict(VIDEO_OK)), "video", required)
    check_scores(make_row("/a", "/b", scores=dict(IMAGE_OK)), "image", required)  # no mc needed
    with pytest.raises(RejectInput) as caught:
        check_scores(make_row("/a", "/b", scores=dict(IMAGE_OK), row_id="r#1"), "video", required)
    assert caught.value.reason == "missing_score"
    assert caught.value.detail == "r#1: no mc score and filter.require_scores"
    with pytest.raises(RejectInput) as caught:
        check_scores(make_row("/a", "/b", scores={}), "image", required)
    assert caught.value.reason == "missing_score" and "no if score" in caught.value.detail

    disabled = FilterConfig(enabled=False, require_scores=True)
    for scores in ({}, {"if": 0.0, "vq": 0.0, "cp": 0.0, "mc": 0.0}):
        for media in ("image", "video"):
            check_scores(make_row("/a", "/b", scores=scores), media, disabled)


@pytest.mark.parametrize(
    ("instruction", "prefix", "expected"),
    [
        ("Remove the cat.", PREFIX, "[Video edit] Remove the cat."),
        ("  Remove the cat.\n", PREFIX, "[Video edit] Remove the cat."),
        ("[Video edit] Remove the cat.", PREFIX, "[Video edit] Remove the cat."),
        ("  [Video edit] Remove the cat.", PREFIX, "[Video edit] Remove the cat."),
        ("[Video edit]Remove the cat.", PREFIX, "[Video edit]Remove the cat."),
        ("Remove the cat.", "", "Remove the cat."),
        ("Remove the cat.", "[Image edit] ", "[Image edit] Remove the cat."),
    ],
)
def test_with_prefix(instruction, prefix, expected):
    assert with_prefix(instruction, prefix) == expected
    assert with_prefix(with_prefix(instruction, prefix), prefix) == expected  # never twice


# --------------------------------------------------------------------------------------------
# align_videos


def info(
    duration_s: float = 2.0, fps: float = 8.0, width: int = 96, height: int = 64, **kw
) -> video.VideoInfo:
    fields = {
        "uri": "/in/v.mp4",
        "duration_s": duration_s,
        "fps": fps,
        "num_frames": round(duration_s * fps),
        "width": width,
        "height": height,
        "codec": "h264",
        "has_video": True,
        "has_audio": False,
    }
    fields.update(kw)
    return video.VideoInfo(**fields)


def align_cfg(**overrides) -> AlignConfig:
    cfg = dataclasses.replace(AlignConfig(min_side=32), **overrides)
    cfg.validate()
    return cfg


@pytest.mark.parametrize(
    ("src", "tgt", "overrides", "expected"),
    [
        # The fixture pair: 12 fps 2 s and 8 fps 1.75 s at twice the size.
        (info(2.0, 12.0), info(1.75, 8.0, 192, 128), {}, (8.0, 13)),
        (info(1.75, 8.0), info(2.0, 12.0), {}, (8.0, 13)),  # symmetric
        # Rates above align.max_fps are capped; long clips are capped at align.max_frames.
        (info(10.0, 30.0), info(10.0, 24.0), {}, (16.0, 81)),
        (info(10.0, 30.0), info(10.0, 25.0), {"max_frames": 49}, (16.0, 49)),
        (info(10.0, 30.0), info(10.0, 24.0), {"max_fps": 30.0, "max_frames": 101}, (24.0, 101)),
        # 49 frames at 16 fps (3.0625 s) exactly, and within half a frame of it.
        (info(3.0625, 16.0), info(3.0625, 16.0), {}, (16.0, 49)),
        (info(3.04, 16.0), info(3.1, 16.0), {}, (16.0, 49)),  # 48.64 frames + slack
        (info(3.02, 16.0), info(3.1, 16.0), {}, (16.0, 45)),  # 48.32 frames: not quite 49
        # The shorter clip bounds the length: 1.5 s at 10 fps = 15 frames -> 13.
        (info(2.0, 10.0), info(1.5, 25.0), {}, (10.0, 13)),
        # Durations 25% apart is still alignable (the tolerance is inclusive).
        (info(2.0, 8.0), info(1.5, 8.0), {}, (8.0, 9)),
        # Aspect within 5% in log space (104x100 vs 100x100: log 1.04 = 0.039).
        (info(2.0, 8.0, 100, 100), info(2.0, 8.0, 104, 100), {}, (8.0, 13)),
        # Exactly align.min_frames, and a 1-frame clip when min_frames allows it.
        (info(0.625, 8.0), info(0.625, 8.0), {}, (8.0, 5)),
        (info(0.5, 8.0), info(0.5, 8.0), {"min_frames": 1}, (8.0, 1)),
        # align.min_side is inclusive.
        (info(2.0, 8.0, 48, 32), info(2.0, 8.0, 48, 32), {}, (8.0, 13)),
    ],
)
def test_align_videos_rate_and_frames(src, tgt, overrides, expected):
    fps, frames = align_videos(src, tgt, "m#0", align_cfg(**overrides))
    assert (fps, frames) == expected
    assert (frames - 1) % 4 == 0


@pytest.mark.parametrize(
    ("src", "tgt", "overrides", "reason", "detail"),
    [
        (
            info(2.0, 8.0),
            info(1.49, 8.0),
            {},
            "unalignable",
            "durations differ by 26% (source 2.00s, target 1.49s",
        ),
        (info(2.0, 8.0), info(1.0, 8.0), {}, "unalignable", "durations differ by 50%"),
        (info(1.0, 8.0), info(2.0, 8.0), {}, "unalignable", "durations differ by 50%"),
        (info(2.0, 8.0), info(1.7, 8.0), {"max_duration_mismatch": 0.1}, "unalignable", "differ by 15%"),
        (info(2.0, 8.0, 96, 64), info(2.0, 8.0, 128, 64), {}, "unalignable", "source 96x64, target 128x64"),
        (info(2.0, 8.0, 96, 64), info(2.0, 8.0, 64, 96), {}, "unalignable", "aspect ratios differ"),
        (info(2.0, 8.0, 100, 100), info(2.0, 8.0, 106, 100), {}, "unalignable", "aspect ratios differ"),
        (
            info(0.5, 8.0),
            info(0.5, 8.0),
            {},
            "too_short",
            "only 1 aligned frames at 8 fps (align.min_frames=5)",
        ),
        (info(2.0, 8.0), info(2.0, 8.0), {"min_frames": 17}, "too_short", "only 13 aligned frames"),
        (info(0.0, 8.0), info(0.0, 8.0), {}, "too_short", "only 0 aligned frames"),
        (info(2.0, 8.0, 200, 30), info(2.0, 8.0, 200, 30), {}, "too_small", "source 200x30 is below"),
        (info(2.0, 8.0, 31, 64), info(2.0, 8.0, 62, 128), {}, "too_small", "source 31x64"),
        (info(2.0, 8.0, 64, 96), info(2.0, 8.0, 8, 12), {}, "too_small", "target 8x12 is below"),
        # Too small is reported before a length or aspect mismatch.
        (info(2.0, 8.0, 16, 16), info(0.5, 8.0, 32, 16), {}, "too_small", "16x16"),
        (
            info(2.0, 8.0),
            info(0.0, 0.0, 0, 0, has_video=False, has_audio=True, uri="/in/t.mp4"),
            {},
            "no_video_stream",
            "target /in/t.mp4 has no video stream",
        ),
    ],
)
def test_align_videos_rejects(src, tgt, overrides, reason, detail):
    with pytest.raises(RejectInput) as caught:
        align_videos(src, tgt, "m.csv#4", align_cfg(**overrides))
    assert caught.value.reason == reason
    assert caught.value.detail.startswith("m.csv#4: ")
    assert detail in caught.value.detail


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"max_frames": 80}, "4k\\+1, got 80"),
        ({"min_frames": 0}, "min_frames"),
        ({"min_frames": 85}, "min_frames"),
        ({"max_fps": 0.0}, "max_fps"),
        ({"max_duration_mismatch": 1.0}, "max_duration_mismatch"),
        ({"max_aspect_mismatch": -0.1}, "max_aspect_mismatch"),
    ],
)
def test_align_config_validate(overrides, message):
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(AlignConfig(), **overrides).validate()


# --------------------------------------------------------------------------------------------
# pair_sample


def test_pair_sample_video_pair_is_aligned(media):
    cfg = small_cfg()
    row = make_row(
        media.src_mp4,
        media.tgt_mp4,
        media.instruction,
        row_id="/m/edits.csv#3",
        category="background",
        dataset="edits",
    )
    sample = pair_sample(row, cfg)
    meta = sample.meta
    assert meta.key == schema.sample_key(media.src_mp4, media.tgt_mp4, media.instruction)
    assert meta.key == row.key
    assert (meta.task, meta.media) == ("video_edit", "video")
    assert meta.instruction == PREFIX + media.instruction
    assert (meta.fps, meta.num_frames) == (ALIGNED_FPS, ALIGNED_FRAMES)
    assert (meta.height, meta.width, meta.bucket) == (*BUCKET, "64x96")
    assert meta.span == [0.0, ALIGNED_FRAMES / ALIGNED_FPS]
    assert (meta.source_uri, meta.target_uri) == (media.src_mp4, media.tgt_mp4)
    assert meta.category == "background" and meta.dataset == "edits"
    assert meta.scores == GOOD_SCORES
    assert meta.extra == {"manifest_row": "/m/edits.csv#3"}
    assert meta.source_num_frames is None and meta.pretext == {}
    assert list(sample.members()) == ["json", "src.mp4", "tgt.mp4"]

    source, target = sample.decode_source(), sample.decode_target()
    assert source.shape == target.shape == (ALIGNED_FRAMES, *BUCKET, 3)
    # The 2x target is resized to the bucket and resampled to 8 fps: it shows the target scene at
    # t = i / 8, like a render at the bucket size.
    want_target = synthetic.render(media.target_scene, ALIGNED_FRAMES, ALIGNED_FPS, *BUCKET)
    want_source = synthetic.render(media.source_scene, ALIGNED_FRAMES, ALIGNED_FPS, *BUCKET)
    assert mean_abs(target, want_target) < 10.0
    assert mean_abs(target, want_source) > 2 * mean_abs(target, want_target)
    assert mean_abs(source, want_source) < 10.0
    assert mean_abs(source, want_target) > 2 * mean_abs(source, want_source)
    # Both follow the common 8 fps timeline: frame i is the scene at t = i / 8, not a frame later
    # (the 12 fps source shows its latest frame at or before i / 8).
    assert mean_abs(target[:-1], want_target[:-1]) < 0.75 * mean_abs(target[:-1], want_target[1:])
    assert mean_abs(source[:-1], want_source[:-1]) < 0.75 * mean_abs(source[:-1], want_source[1:])


def test_pair_sample_image_pair(media):
    cfg = small_cfg()
    row = make_row(
        media.src_png,
        media.tgt_png,
        f"  {PREFIX}{media.instruction} ",
        row_id="/m/img.jsonl#0",
        dataset="img",
    )
    sample = pair_sample(row, cfg)
    meta = sample.meta
    assert meta.key == schema.sample_key(media.src_png, media.tgt_png, f"{PREFIX}{media.instruction}")
    assert (meta.task, meta.media, meta.num_frames, meta.fps) == ("image_edit", "image", 1, 0.0)
    assert meta.instruction == PREFIX + media.instruction  # already prefixed: not doubled
    assert (meta.height, meta.width, meta.bucket) == (*BUCKET, "64x96")
    assert meta.span is None
    assert meta.target_uri == media.tgt_png and meta.extra == {"manifest_row": "/m/img.jsonl#0"}
    assert list(sample.members()) == ["json", "src.png", "tgt.png"]
    source, target = sample.decode_source(), sample.decode_target()
    assert source.shape == target.shape == (1, *BUCKET, 3)
    # The source is already at the bucket size, and png is lossless.
    np.testing.assert_array_equal(source[0], synthetic.render(media.source_scene, 1, 1.0, *BUCKET)[0])
    want_target = synthetic.render(media.target_scene, 1, 1.0, *BUCKET)
    assert mean_abs(target, want_target) < 10.0
    assert mean_abs(target, source) > 2 * mean_abs(target, want_target)

    cfg.image_prefix = "[Image edit] "
    assert pair_sample(make_row(media.src_png, media.tgt_png, "Swap it."), cfg).meta.instruction == (
        "[Image edit] Swap it."
    )


def test_pair_sample_duplicate_row_has_the_same_key(tmp_path, media):
    rel_src = os.path.relpath(media.src_png, media.root)
    rel_tgt = os.path.relpath(media.tgt_png, media.root)
    uri = synthetic.write_manifest(
        [
            {"source": rel_src, "target": rel_tgt, "instruction": "Swap it."},
            {"source": media.src_png, "target": media.tgt_png, "instruction": "Swap it. "},
        ],
        os.path.join(media.root, "dups.csv"),
    )
    rows = read_manifest(uri, small_cfg())
    assert mark_duplicates(rows) == 1
    assert rows[0].key == rows[1].key == schema.sample_key(media.src_png, media.tgt_png, "Swap it.")
    assert pair_sample(rows[0], small_cfg()).key == rows[1].key
    with pytest.raises(RejectInput) as caught:
        pair_sample(rows[1], small_cfg())
    assert caught.value.reason == "duplicate"
    assert caught.value.detail == f"{uri}#1: same source, target and instruction as {uri}#0"


# name -> ((source, target, row fields), expected reason, the bad file); paths are Media attributes.
REJECT_CASES = {
    "missing_source": (("missing_mp4", "tgt_mp4", {}), "missing", "missing_mp4"),
    "missing_target": (("src_mp4", "missing_mp4", {}), "missing", "missing_mp4"),
    "missing_image": (("src_png", "missing_png", {}), "missing", "missing_png"),
    "corrupt": (("corrupt_mp4", "tgt_mp4", {}), "not_video", "corrupt_mp4"),
    "corrupt_target": (("src_mp4", "corrupt_mp4", {}), "not_video", "corrupt_mp4"),
    "corrupt_image": (("src_png", "corrupt_png", {}), "bad_image", "corrupt_png"),
    "image_aspect": (("src_png", "square_png", {}), "unalignable", None),
    "empty_instruction": (("src_mp4", "tgt_mp4", {"instruction": "  \n"}), "empty_instruction", None),
    "unalignable": (("src_mp4", "short_mp4", {}), "unalignable", None),
    "low_score": (("src_mp4", "tgt_mp4", {"scores": {**GOOD_SCORES, "mc": 7.5}}), "low_score", None),
    "low_image_score": (("src_png", "tgt_png", {"scores": dict(VIDEO_OK)}), "low_score", None),
    "media_mismatch": (("src_mp4", "tgt_png", {}), "media_mismatch", None),
    "media_mismatch_image": (("src_png", "tgt_mp4", {}), "media_mismatch", None),
    "duplicate": (("src_mp4", "tgt_mp4", {"duplicate_of": "/m/edits.csv#0"}), "duplicate", None),
    "bad_row": (("src_mp4", "", {"problem": "row 9 has no target path"}), "bad_row", None),
}


def reject_row(media: Media, name: str, row_id: str) -> PairRow:
    (source, target, fields), _, _ = REJECT_CASES[name]
    fields = {"instruction": media.instruction, **fields}
    return make_row(getattr(media, source), getattr(media, target) if target else "", row_id=row_id, **fields)


@pytest.mark.parametrize("name", list(REJECT_CASES))
def test_pair_sample_rejects(media, name):
    _, reason, names = REJECT_CASES[name]
    row = reject_row(media, name, "/m/edits.csv#9")
    with pytest.raises((RejectInput, video.VideoDecodeError)) as caught:
        pair_sample(row, small_cfg())
    exc = caught.value
    if isinstance(exc, video.VideoDecodeError):
        assert exc.kind == reason
        assert exc.uri == getattr(media, names)
    else:
        assert names is None
        assert exc.reason == reason
        assert exc.detail.startswith("/m/edits.csv#9: ")


def test_pair_sample_reject_details(media):
    cfg = small_cfg()
    row = reject_row(media, "unalignable", "r#1")
    with pytest.raises(RejectInput, match=r"r#1: durations differ by 50% \(source 2\.00s, target 1\.00s"):
        pair_sample(row, cfg)
    with pytest.raises(RejectInput, match=r"r#2: score mc=7\.5 is below 8"):
        pair_sample(reject_row(media, "low_score", "r#2"), cfg)
    with pytest.raises(RejectInput) as caught:
        pair_sample(reject_row(media, "media_mismatch", "r#3"), cfg)
    assert caught.value.detail == f"r#3: source {media.src_mp4} and target {media.tgt_png} differ"
    with pytest.raises(RejectInput) as caught:
        pair_sample(reject_row(media, "bad_row", "r#4"), cfg)
    assert caught.value.detail == "r#4: row 9 has no target path"
    with pytest.raises(RejectInput) as caught:
        pair_sample(reject_row(media, "empty_instruction", "r#5"), cfg)
    assert caught.value.detail == f"r#5: empty instruction ({media.src_mp4})"
    with pytest.raises(RejectInput) as caught:
        pair_sample(reject_row(media, "image_aspect", "r#7"), cfg)
    assert caught.value.detail == "r#7: aspect ratios differ (source 96x64, target 64x64)"
    cfg.align.min_side = 65
    for source, target in ((media.src_png, media.tgt_png), (media.src_mp4, media.tgt_mp4)):
        with pytest.raises(RejectInput) as caught:
            pair_sample(make_row(source, target, row_id="r#8"), cfg)
        assert caught.value.reason == "too_small"
        assert caught.value.detail == "r#8: source 96x64 is below align.min_side"
    cfg.align.min_side = 32
    # The filter is skipped when disabled: the low-score pair is then accepted.
    cfg.filter.enabled = False
    assert pair_sample(reject_row(media, "low_score", "r#6"), cfg).meta.scores["mc"] == 7.5


# --------------------------------------------------------------------------------------------
# process_pairs_unit


def unit_manifest(media: Media) -> tuple[str, dict[int, str]]:
    """A manifest mixing good pairs and every bad kind; returns its URI and row index -> reason."""

    def rel(path: str) -> str:
        return os.path.relpath(path, media.root)

    ok = {f"score_{k}": v for k, v in GOOD_SCORES.items()}
    video_pair = {
        "source": rel(media.src_mp4),
        "target": rel(media.tgt_mp4),
        "instruction": media.instruction,
    }
    image_pair = {
        "source": rel(media.src_png),
        "target": rel(media.tgt_png),
        "instruction": media.instruction,
    }
    rows = [
        {**video_pair, "category": "background", **ok},  # 0 good video
        {**image_pair, "category": "background", **ok},  # 1 good image
        {**video_pair, "category": "background", **ok},  # 2 duplicate of 0
        {**video_pair, "source": rel(media.missing_mp4), **ok},  # 3 missing
        {**video_pair, "source": rel(media.corrupt_mp4), **ok},  # 4 corrupt
        {**video_pair, "instruction": "   ", **ok},  # 5 empty instruction
        {**video_pair, "target": rel(media.short_mp4), **ok},  # 6 target half as long
        {**video_pair, "instruction": "Low-scored edit.", **ok, "score_vq": 8.5},  # 7 low score
        {**video_pair, "target": rel(media.tgt_png), **ok},  # 8 mp4 vs png
        {**video_pair, "target": "", **ok},  # 9 bad row
        {**video_pair, "instruction": "Something else entirely.", **ok},  # 10 good video
    ]
    uri = synthetic.write_manifest(
        rows, os.path.join(media.root, "unit.csv"), columns=synthetic.MANIFEST_COLUMNS
    )
    reasons = {
        2: "duplicate",
        3: "missing",
        4: "not_video",
        5: "empty_instruction",
        6: "unalignable",
        7: "low_score",
        8: "media_mismatch",
        9: "bad_row",
    }
    return uri, reasons


def shard_bytes(output_uri: str) -> dict[str, bytes]:
    root = ledger.shards_uri(output_uri)
    return {os.path.relpath(u, root): storage.read_bytes(u) for u in schema.list_shards(root)}


def test_process_pairs_unit_mixed_rows(tmp_path, media):
    manifest, reasons = unit_manifest(media)
    out = str(tmp_path / "out")
    cfg = small_cfg(out)
    cfg.input.manifests = [manifest]
    cfg.shards.max_samples = 1
    (unit,), skipped = list_pair_units(cfg, set())
    assert skipped == 0
    ids = [f"{manifest}#{i}" for i in range(11)]
    assert unit.input_ids == ids
    result = process_pairs_unit(PairsUnit.from_json(unit.to_json()), cfg)

    assert result.unit_id == unit.unit_id
    assert result.sources == ids and result.inputs == ids
    assert result.accepted == [ids[0], ids[1], ids[10]]
    assert {r.input: r.reason for r in result.rejects} == {ids[i]: reason for i, reason in reasons.items()}
    assert [r.input for r in result.rejects] == [ids[i] for i in sorted(reasons)]
    assert len(result.accepted) + len(result.rejects) == len(result.inputs) == 11
    assert result.duplicates == 1
    decode_errors = {"missing": media.missing_mp4, "not_video": media.corrupt_mp4}
    for reject in result.rejects:
        if reject.reason in decode_errors:
            # A decode error's detail is the decoder's message, naming the bad file.
            assert decode_errors[reject.reason] in reject.detail
        else:
            assert reject.detail.startswith(f"{reject.input}: ")

    assert result.samples == 3
    assert result.per_task == {"video_edit": 2, "image_edit": 1}
    assert result.per_bucket == {"64x96": 3}
    root = ledger.shards_uri(out)
    uid = unit.unit_id
    assert [(s["path"], s["samples"]) for s in result.shards] == [
        (f"shards/image/64x96/{uid}-000000.tar", 1),
        (f"shards/video/64x96/{uid}-000000.tar", 1),
        (f"shards/video/64x96/{uid}-000001.tar", 1),
    ]
    uris = [ledger.shard_uri(out, s) for s in result.shards]
    assert schema.list_shards(root) == uris
    # A shard's bytes count its members' payloads (the tar adds headers and padding).
    assert all(0 < s["bytes"] < os.path.getsize(u) for s, u in zip(result.shards, uris, strict=True))
    assert result.bytes == sum(s["bytes"] for s in result.shards)

    samples = list(schema.iter_samples(root))
    assert len(samples) == result.samples
    by_media = {m: [s for s in samples if s.meta.media == m] for m in ("image", "video")}
    assert [s.meta.extra["manifest_row"] for s in by_media["image"]] == [ids[1]]
    assert [s.meta.extra["manifest_row"] for s in by_media["video"]] == [ids[0], ids[10]]
    assert [s.key for s in by_media["video"]] == [
        schema.sample_key(media.src_mp4, media.tgt_mp4, media.instruction),
        schema.sample_key(media.src_mp4, media.tgt_mp4, "Something else entirely."),
    ]
    for sample in samples:
        meta = sample.meta
        assert meta.dataset == "unit" and meta.category in ("background", None)
        assert meta.scores == GOOD_SCORES
        assert meta.instruction.startswith(PREFIX) and not meta.instruction.startswith(PREFIX * 2)
        frames = ALIGNED_FRAMES if meta.media == "video" else 1
        assert sample.decode_source().shape == sample.decode_target().shape == (frames, *BUCKET, 3)

    marker = ledger.marker_uri(out, uid)
    assert os.path.isfile(marker)
    assert ledger.UnitResult.from_json(storage.read_text(marker)) == result
    assert ledger.read_markers(out) == [result]
    leftovers = [n for _, _, names in os.walk(out) for n in names if n.startswith(".")]
    assert leftovers == []


def test_process_pairs_unit_is_reproducible(tmp_path, media):
    manifest, _ = unit_manifest(media)
    out = str(tmp_path / "out")
    cfg = small_cfg(out)
    cfg.input.manifests = [manifest]
    assert cfg.encode.threads == 1
    (unit,), _ = list_pair_units(cfg, set())
    first = process_pairs_unit(unit, cfg)
    first_bytes = shard_bytes(out)
    assert sorted(first_bytes) == [
        f"image/64x96/{unit.unit_id}-000000.tar",
        f"video/64x96/{unit.unit_id}-000000.tar",
    ]
    second = process_pairs_unit(PairsUnit.from_json(unit.to_json()), cfg)
    assert shard_bytes(out) == first_bytes
    assert dataclasses.replace(first, seconds=0.0) == dataclasses.replace(second, seconds=0.0)
    assert ledger.read_markers(out) == [second]
    # A fresh output directory gets the same bytes too.
    other = str(tmp_path / "other")
    cfg.output.uri = other
    third = process_pairs_unit(unit, cfg)
    assert shard_bytes(other) == first_bytes
    assert third.bytes == first.bytes and third.samples == first.samples == 3


def test_process_pairs_unit_all_rejected_writes_no_shards(tmp_path, media):
    out = str(tmp_path / "out")
    rows = [
        reject_row(media, "bad_row", "m#0"),
        reject_row(media, "duplicate", "m#1"),
        reject_row(media, "missing_source", "m#2"),
    ]
    result = process_pairs_unit(PairsUnit(unit_id="f" * 32, rows=rows), small_cfg(out))
    assert result.accepted == [] and result.samples == 0 and result.shards == [] and result.bytes == 0
    assert [(r.input, r.reason) for r in result.rejects] == [
        ("m#0", "bad_row"),
        ("m#1", "duplicate"),
        ("m#2", "missing"),
    ]
    assert result.duplicates == 1
    assert schema.list_shards(ledger.shards_uri(out)) == []
    assert ledger.read_markers(out) == [result]
    assert not math.isnan(result.seconds) and result.seconds >= 0


def test_a_pair_with_a_stream_the_decoder_conceals_is_rejected_as_corrupt_stream(tmp_path):
    folder = tmp_path / "edits"
    folder.mkdir()
    scene = synthetic.random_scene(5)
    edited, instruction = synthetic.make_edit(scene, "recolor", 1)
    source = video.encode_mp4(synthetic.render(scene, 36, 12.0, 96, 128), 12.0, gop=12)
    target = video.encode_mp4(synthetic.render(edited, 36, 12.0, 96, 128), 12.0, gop=12)
    (folder / "src.mp4").write_bytes(source)
    (folder / "tgt.mp4").write_bytes(target)
    damaged = next(d for seed in range(8) if _concealed(d := synthetic.damage_stream(target, seed, flips=4)))
    (folder / "tgt_bitrot.mp4").write_bytes(damaged)
    rows = [
        {"source": "src.mp4", "target": "tgt.mp4", "instruction": instruction},
        {"source": "src.mp4", "target": "tgt_bitrot.mp4", "instruction": instruction + " "},
    ]
    manifest = synthetic.write_manifest(
        rows, str(folder / "m.jsonl"), columns=("source", "target", "instruction")
    )
    cfg = small_cfg(str(tmp_path / "out"))
    cfg.input.manifests = [manifest]
    cfg.filter.enabled = False
    (unit,), _ = list_pair_units(cfg, set())
    result = process_pairs_unit(unit, cfg)
    assert result.accepted == [f"{manifest}#0"]
    assert [(r.input, r.reason) for r in result.rejects] == [(f"{manifest}#1", "corrupt_stream")]
    assert "tgt_bitrot.mp4" in result.rejects[0].detail


def _concealed(data: bytes) -> bool:
    """Whether the decoder gets through ``data`` by concealing damage (rather than failing)."""
    stats = video.DecodeStats()
    try:
        video.decode_clip(data, stats=stats, threads=1)  # one thread, as the job decodes
    except video.VideoDecodeError:
        return False
    return stats.corrupt_frames > 0
