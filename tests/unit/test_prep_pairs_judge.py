"""Unit tests for ``sama prep-pairs --judge``: rows without scores are judged on their aligned clips
by a loopback OpenAI-compatible server, then filtered by SAMA.md's thresholds."""

from __future__ import annotations

import json
import os
import threading
from collections import Counter

import pytest

from sama import schema, synthetic
from sama.eval.judge import Judge
from sama.prep import ledger, pairs_job
from sama.prep.inputs import read_table
from sama.prep.pairs_job import PrepPairsConfig, list_pair_units, process_pairs_unit
from tests.unit.test_judge import FakeChatServer, Reply, decode_data_url, images_of, text_of
from tests.unit.test_prep_pairs_job import small_cfg

SIZE = (64, 96)  # the bucket small_cfg picks for it, so the judge sees the aligned size
FPS, SECONDS = 8.0, 1.0  # 8 frames -> 5 aligned frames (4k+1)
ALIGNED_FRAMES = 5
RUNS = 3

# Per row: instruction, the manifest's scores (None = empty cell), what the judge answers per run.
ROWS = [
    # 0 video, no scores: the judge passes it.
    ("Row 0: paint the ball red.", {}, [{"IF": 9, "VQ": 9, "CP": 9, "MC": 9}] * RUNS),
    # 1 image, no scores: runs give IF 9, 9, 6 -> mean 8 < 9 (the image threshold).
    ("Row 1: remove the star.", {}, [{"IF": i, "VQ": 10, "CP": 9} for i in (9, 9, 6)]),
    # 2 video, IF from the manifest (10) and the rest missing: the judge's IF=3 must not win.
    ("Row 2: add a square.", {"if": 10}, [{"IF": 3, "VQ": 9, "CP": 8, "MC": 10}] * RUNS),
    # 3 image, every score in the manifest: the judge is not asked.
    ("Row 3: make it sketchy.", {"if": 9, "vq": 9, "cp": 9}, []),
    # 4 video, no scores, the judge's server fails: judge_failed, the unit goes on.
    ("Row 4: judge breaks here.", {}, []),
    # 5 image, a manifest score already fails: rejected without asking the judge.
    ("Row 5: turn it blue.", {"vq": 5}, []),
    # 6 video, no scores: runs give MC 8, 7, 7 -> mean 7.33 < 8 (the video threshold).
    ("Row 6: add a diamond.", {}, [{"IF": 9, "VQ": 9, "CP": 9, "MC": m} for m in (8, 7, 7)]),
    # 7 image, no scores: the judge passes it.
    ("Row 7: swap the circle for a star.", {}, [{"IF": 10, "VQ": 9, "CP": 9}] * RUNS),
]


@pytest.fixture(scope="module")
def server():
    fake = FakeChatServer().start()
    yield fake
    fake.stop()


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> str:
    """ROWS over synthetic pairs (even rows videos, odd rows images), scores as ROWS say."""
    root = str(tmp_path_factory.mktemp("judge_pairs"))
    written = synthetic.write_edit_pairs(
        root, len(ROWS), seed=5, media="mixed", fps=FPS, seconds=SECONDS, sizes=[SIZE]
    )
    rows = read_table(written)
    for row, (instruction, scores, _) in zip(rows, ROWS, strict=True):
        row["instruction"] = instruction
        for name in ("if", "vq", "cp", "mc"):
            row[f"score_{name}"] = scores.get(name)
    return synthetic.write_manifest(
        rows, os.path.join(root, "judged.csv"), columns=synthetic.MANIFEST_COLUMNS
    )


def row_in(text: str) -> int:
    """The index of the row whose instruction ``text`` carries."""
    return next(i for i, (instruction, _, _) in enumerate(ROWS) if instruction in text)


def scripted_judge(server: FakeChatServer) -> None:
    """Answer each row's requests from ROWS, in turn; row 4 gets HTTP 500."""
    lock = threading.Lock()
    asked: Counter[int] = Counter()

    def responder(body, index):
        row = row_in(json.dumps(body["messages"][1]["content"]))
        if row == 4:
            return Reply(status=500, body={"error": {"message": "the judge model crashed"}})
        with lock:
            turn = asked[row]
            asked[row] += 1
        return Reply(content=json.dumps(ROWS[row][2][turn % RUNS]))

    server.reset(responder)


def judged_cfg(server: FakeChatServer, manifest: str, output: str) -> PrepPairsConfig:
    cfg = small_cfg(output)
    cfg.input.manifests = [manifest]
    cfg.judge.enabled = True
    cfg.judge.base_url = server.base_url
    cfg.judge.model = "judge-vlm"
    cfg.judge.runs = RUNS
    cfg.judge.max_retries = 0
    cfg.judge.timeout_s = 10.0
    cfg.validate()
    return cfg


def test_prep_pairs_judges_rows_without_scores(server, manifest, tmp_path, monkeypatch):
    built = []

    class CountingJudge(Judge):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            built.append(self)

    monkeypatch.setattr(pairs_job, "Judge", CountingJudge)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-prep-test")
    scripted_judge(server)
    out = str(tmp_path / "out")
    cfg = judged_cfg(server, manifest, out)
    (unit,), _ = list_pair_units(cfg, set())
    result = process_pairs_unit(unit, cfg)

    ids = unit.input_ids
    assert len(built) == 1  # one judge for the whole unit
    assert result.accepted == [ids[0], ids[2], ids[3], ids[7]]
    rejects = {ids.index(r.input): r for r in result.rejects}
    assert {i: r.reason for i, r in rejects.items()} == {
        1: "low_score",
        4: "judge_failed",
        5: "low_score",
        6: "low_score",
    }
    assert rejects[1].detail == f"{ids[1]}: score if=8 is below 9"
    assert rejects[6].detail == f"{ids[6]}: score mc=7.33333 is below 8"
    assert rejects[5].detail == f"{ids[5]}: score vq=5 is below 9"
    assert rejects[4].detail.startswith(f"{ids[4]}: all 3 judge runs failed: HTTP 500")
    assert "the judge model crashed" in rejects[4].detail

    # Rows 3 (all scores given) and 5 (already failing) were never sent to the judge.
    asked = Counter(row_in(text_of(request)) for request in server.requests)
    assert asked == {0: RUNS, 1: RUNS, 2: RUNS, 4: RUNS, 6: RUNS, 7: RUNS}
    for request in server.requests:
        assert request.headers["authorization"] == "Bearer sk-prep-test"
        images = images_of(request)
        # The aligned clips: 4 evenly sampled frames of 5 for a video, one image each for an image.
        video = row_in(text_of(request)) % 2 == 0
        assert len(images) == (8 if video else 2)
        assert all(decode_data_url(url).shape == (*SIZE, 3) for url in images)

    samples = {s.meta.extra["manifest_row"]: s for s in schema.iter_samples(ledger.shards_uri(out))}
    assert sorted(samples) == sorted(result.accepted)
    judged = samples[ids[0]].meta
    assert judged.scores == {"if": 9.0, "vq": 9.0, "cp": 9.0, "mc": 9.0}
    assert judged.extra["judge_runs"] == [{"if": 9, "vq": 9, "cp": 9, "mc": 9}] * RUNS
    assert judged.extra["judge_model"] == "judge-vlm" and judged.extra["judge_rubric"] == "sama"
    assert judged.num_frames == ALIGNED_FRAMES
    # The manifest's IF=10 wins over the judge's 3; the judge fills the rest.
    assert samples[ids[2]].meta.scores == {"if": 10.0, "vq": 9.0, "cp": 8.0, "mc": 10.0}
    assert samples[ids[3]].meta.scores == {"if": 9.0, "vq": 9.0, "cp": 9.0}
    assert "judge_runs" not in samples[ids[3]].meta.extra
    image = samples[ids[7]].meta
    assert image.media == "image" and image.scores == {"if": 10.0, "vq": 9.0, "cp": 9.0}
    assert [sorted(run) for run in image.extra["judge_runs"]] == [["cp", "if", "vq"]] * RUNS
    assert ledger.read_markers(out) == [result]


def test_without_the_judge_rows_without_scores_pass_untouched(server, manifest, tmp_path):
    scripted_judge(server)
    out = str(tmp_path / "out")
    cfg = small_cfg(out)
    cfg.input.manifests = [manifest]
    (unit,), _ = list_pair_units(cfg, set())
    result = process_pairs_unit(unit, cfg)
    ids = unit.input_ids
    # Missing scores pass the filter unless required; only row 5's failing score rejects.
    assert [(ids.index(r.input), r.reason) for r in result.rejects] == [(5, "low_score")]
    assert server.requests == []
    for sample in schema.iter_samples(ledger.shards_uri(out)):
        assert set(sample.meta.extra) == {"manifest_row"}


def test_judged_scores_satisfy_require_scores(server, manifest, tmp_path):
    scripted_judge(server)
    out = str(tmp_path / "out")
    cfg = judged_cfg(server, manifest, out)
    cfg.filter.require_scores = True
    (unit,), _ = list_pair_units(cfg, set())
    result = process_pairs_unit(unit, cfg)
    ids = unit.input_ids
    # The same outcome as without require_scores: every missing score was judged.
    assert result.accepted == [ids[0], ids[2], ids[3], ids[7]]


def test_prep_pairs_config_validates_the_judge():
    cfg = PrepPairsConfig()
    cfg.judge.enabled = True
    with pytest.raises(ValueError, match="judge.base_url"):
        cfg.validate()
    cfg.judge.base_url = "http://localhost:8000/v1"
    with pytest.raises(ValueError, match="judge.model"):
        cfg.validate()
    cfg.judge.model = "Qwen/Qwen2.5-VL-7B-Instruct"
    cfg.validate()
