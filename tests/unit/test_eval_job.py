"""Unit tests of `sama eval`'s stages (no Ray): manifests and their column presets, units and
resume, and one unit evaluated in process by a tiny export."""

from __future__ import annotations

import json

import numpy as np
import pytest

from sama import config, schema, storage, video
from sama.eval.job import (
    EvalColumns,
    EvalConfig,
    Evaluator,
    EvalUnit,
    list_eval_units,
    plain_instruction,
    process_unit,
    read_eval_manifest,
)
from sama.prep import ledger


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_column_presets_recognise_benchmark_layouts():
    columns = EvalColumns()
    assert columns.resolve(["src_video", "tgt_video", "prompt", "edit_type"], "m") == {
        "source": "src_video",
        "instruction": "prompt",
        "target": "tgt_video",
        "category": "edit_type",
    }
    generic = columns.resolve(["source", "instruction"], "m")
    assert generic == {"source": "source", "instruction": "instruction", "target": None, "category": None}
    explicit = EvalColumns(source="clip", instruction="edit", category="kind")
    assert explicit.resolve(["clip", "edit", "kind"], "m")["category"] == "kind"
    with pytest.raises(ValueError, match="cannot find the source and instruction columns"):
        columns.resolve(["video_file", "text"], "bench.csv")
    with pytest.raises(ValueError, match="columns.preset 'nope' is unknown"):
        EvalColumns(preset="nope").validate()


def test_manifest_rows_resolve_paths_and_name_their_problems(tmp_path):
    (tmp_path / "a.mp4").write_bytes(b"")
    manifest = write_jsonl(
        tmp_path / "bench.jsonl",
        [
            {"video": "a.mp4", "instruction": "make it blue", "category": "recolor", "target": "b.mp4"},
            {"video": "a.mp4", "instruction": "  "},
            {"video": "../../etc/passwd", "instruction": "x"},
            {"video": "https://example.com/v.mp4?X-Amz-Signature=abc", "instruction": "x"},
        ],
    )
    rows = read_eval_manifest(manifest, EvalConfig())
    assert [r.row_id for r in rows] == [f"{manifest}#{i}" for i in range(4)]
    first = rows[0]
    assert first.source == str(tmp_path / "a.mp4") and first.target == str(tmp_path / "b.mp4")
    assert first.category == "recolor" and first.problem is None and first.dataset == "bench"
    assert rows[1].problem == "row 1 has no instruction"
    assert rows[2].problem_reason == "bad_location" and rows[3].problem_reason == "bad_location"
    assert "abc" not in rows[3].problem  # the presigned signature is never recorded
    # The key depends on what is edited, not on the row's position.
    assert first.key == schema.sample_key(first.source, "make it blue", first.target)


def test_units_cover_every_row_once_and_skip_finished_inputs(tmp_path):
    manifest = write_jsonl(
        tmp_path / "m.jsonl", [{"source": f"v{i}.mp4", "instruction": "x"} for i in range(5)]
    )
    cfg = config.load(EvalConfig, None, [f"data={json.dumps([manifest])}", "rows_per_unit=2"])
    units, skipped = list_eval_units(cfg, set())
    assert [len(u.rows) for u in units] == [2, 2, 1] and skipped == 0
    assert EvalUnit.from_json(units[0].to_json()) == units[0]
    done = {r.row_id for r in units[0].rows}
    again, skipped = list_eval_units(cfg, done)
    assert skipped == 2 and sorted(r.row_id for u in again for r in u.rows) == sorted(
        r.row_id for u in units[1:] for r in u.rows
    )
    # Unit ids are deterministic: the same rows make the same unit.
    assert [u.unit_id for u in list_eval_units(cfg, set())[0]] == [u.unit_id for u in units]


def test_plain_instruction_drops_the_task_prefix():
    assert plain_instruction("[Video edit] Turn the red square cyan.") == "Turn the red square cyan."
    assert plain_instruction("make it blue") == "make it blue"


def pair_shard(root: str, count: int) -> str:
    """A shard of ``count`` video edit pairs (9 frames, 48x64) whose target shifts the source."""
    rng = np.random.default_rng(0)
    writer = schema.ShardWriter(storage.join(root, "shards", "video", "48x64"), "unit", schema.ShardConfig())
    for index in range(count):
        source = rng.integers(0, 255, (9, 48, 64, 3), dtype=np.uint8)
        target = np.roll(source, 4, axis=2)
        meta = schema.SampleMeta(
            key=f"pair{index}",
            task="video_edit",
            media="video",
            instruction="[Video edit] move it right",
            fps=8.0,
            num_frames=9,
            height=48,
            width=64,
            bucket="48x64",
            source_uri=f"s{index}.mp4",
            category="move",
        )
        writer.write(schema.Sample(meta, video.encode_mp4(target, 8.0), video.encode_mp4(source, 8.0)))
    (info,) = writer.close()
    return info.uri


def test_a_unit_is_edited_measured_and_committed_with_its_records(tmp_path, tiny_edit_export):
    shard = pair_shard(str(tmp_path / "pairs"), 2)
    out = str(tmp_path / "eval")
    cfg = config.load(
        EvalConfig, None, [f"model={tiny_edit_export}", f"data={json.dumps([shard])}", f"output.uri={out}"]
    )
    evaluator = Evaluator(cfg, device="cpu")
    (unit,) = list_eval_units(cfg, set())[0]
    result = process_unit(unit, evaluator)

    assert result.accepted == [f"{shard}#pair0", f"{shard}#pair1"] and result.rejects == []
    assert [r["key"] for r in result.records] == ["pair0", "pair1"]
    record = result.records[0]
    assert (record["frames"], record["height"], record["width"]) == (9, 48, 64)
    assert record["instruction"] == "[Video edit] move it right" and record["category"] == "move"
    assert {"mse", "psnr", "ssim", "copy_mse", "flow_epe"} <= set(record["metrics"])
    # The marker commits the records; the evaluated samples read back with source, edit, reference.
    (marker,) = ledger.read_markers(out)
    assert marker.records == result.records
    samples = list(schema.iter_samples(ledger.shard_uri(out, marker.shards[0])))
    assert all(isinstance(s, schema.EvalSample) and s.reference is not None for s in samples)
    edited = video.decode_video_bytes(samples[0].edit)
    reference = video.decode_video_bytes(samples[0].reference)
    assert edited.shape == reference.shape == (9, 48, 64, 3)
    assert samples[0].meta.extra["eval"]["metrics"] == record["metrics"]
    # Seeded: the same unit edits to the same result.
    again = process_unit(unit, evaluator)
    assert [r["metrics"] for r in again.records] == [r["metrics"] for r in result.records]


def test_the_judge_scores_each_edit_and_a_failure_is_recorded_not_fatal(
    tmp_path, tiny_edit_export, monkeypatch
):
    from tests.unit.test_judge import FakeChatServer, Reply, scores_reply

    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-never-stored")
    shard = pair_shard(str(tmp_path / "pairs"), 2)
    server = FakeChatServer().start()
    try:
        # The second sample's three runs all fail with 500s: recorded in its record.
        server.reset(lambda body, index: scores_reply(IF=7) if index < 3 else Reply(status=500, body={}))
        cfg = config.load(
            EvalConfig,
            None,
            [
                f"model={tiny_edit_export}",
                f"data={json.dumps([shard])}",
                f"output.uri={tmp_path / 'eval'}",
                "judge.enabled=true",
                f"judge.base_url={server.base_url}",
                "judge.model=judge-vl",
                "judge.max_retries=0",
                "judge.concurrency=1",
            ],
        )
        evaluator = Evaluator(cfg, device="cpu")
        (unit,) = list_eval_units(cfg, set())[0]
        result = process_unit(unit, evaluator)
    finally:
        server.stop()
    assert len(result.accepted) == 2 and result.rejects == []
    judged, failed = result.records
    assert judged["judge"] == {"if": 7.0, "vq": 9.0, "cp": 9.0, "mc": 8.0} and len(judged["judge_runs"]) == 3
    assert judged["judge_error"] is None
    assert failed["judge"] == {} and "500" in failed["judge_error"]
    # The judge read the instruction without its task prefix; the key never reached the output.
    assert all("[Video edit]" not in json.dumps(r.body) for r in server.requests)
    assert "sk-test-never-stored" not in json.dumps(result.records)


def test_latent_held_out_shards_are_decoded_and_evaluated(tmp_path, tiny_edit_export):
    from sama.prep.precompute_job import PrecomputeConfig, ShardUnit, load_encoders, model_config_of
    from sama.prep.precompute_job import process_unit as precompute_unit

    shard = pair_shard(str(tmp_path / "pairs"), 1)
    latents = str(tmp_path / "latents")
    pcfg = config.load(
        PrecomputeConfig,
        None,
        [f"inputs={json.dumps([shard])}", f"output.uri={latents}", f"model.init_from={tiny_edit_export}"],
    )
    model_config = model_config_of(pcfg.model)
    components = load_encoders(pcfg.model, model_config)
    precompute_unit(ShardUnit("u", shard), pcfg, components)
    (latent_shard,) = schema.list_shards(latents)

    cfg = config.load(
        EvalConfig,
        None,
        [
            f"model={tiny_edit_export}",
            f"data={json.dumps([latent_shard])}",
            f"output.uri={tmp_path / 'eval'}",
        ],
    )
    (unit,) = list_eval_units(cfg, set())[0]
    result = process_unit(unit, Evaluator(cfg, device="cpu"))
    (record,) = result.records
    assert (record["frames"], record["height"], record["width"]) == (9, 48, 64)
    assert record["reference"] and {"psnr", "copy_psnr"} <= set(record["metrics"])
    # Source and reference are the stored latents decoded: the tiny autoencoder (space-to-depth)
    # gives back the pixels they were encoded from, so the copy baseline is the pixel shard's.
    from sama.eval import metrics

    (pixels,) = schema.iter_samples(shard)
    target, source = pixels.decode_pair()
    assert record["metrics"]["copy_psnr"] == pytest.approx(metrics.psnr(source, target), abs=0.2)


def test_cli_flags_resolve_into_the_configs(capsys):
    import yaml

    from sama import cli

    judge = ["--judge", "--set", "judge.base_url=http://judge:8000/v1", "--set", "judge.model=qwen-vl"]
    argv = ["eval", "--model", "models:/sama/3", "--data", "a/shards", "--data", "b.jsonl", "--output", "out"]
    assert cli.main([*argv, *judge, "--print-config"]) == 0
    resolved = yaml.safe_load(capsys.readouterr().out)
    assert resolved["model"] == "models:/sama/3" and resolved["data"] == ["a/shards", "b.jsonl"]
    assert resolved["output"]["uri"] == "out" and resolved["judge"]["enabled"] is True
    assert resolved["tracking"]["experiment"] == "sama-eval"
    # --judge without an endpoint is refused, naming the keys to set.
    assert cli.main([*argv, "--judge", "--print-config"]) == 2
    assert "judge.base_url" in capsys.readouterr().err
    pairs = ["prep-pairs", "--manifest", "m.csv", "--output", "out", *judge, "--print-config"]
    assert cli.main(pairs) == 0
    assert yaml.safe_load(capsys.readouterr().out)["judge"]["enabled"] is True


def test_a_registered_model_resolves_to_its_export_per_store(tmp_path, tiny_edit_export, monkeypatch):
    """models:/NAME/VERSION: the pyfunc model's pipeline artifact, downloaded once; the same name and
    version in another store is another model, never served from the first one's cache."""
    from sama.eval.job import resolve_model
    from sama.pipeline_edit import SamaEditPipeline
    from sama.tracking import Tracker, TrackingConfig

    monkeypatch.setenv("SAMA_CACHE_DIR", str(tmp_path / "cache"))
    resolved = []
    for store in ("a", "b"):
        (tmp_path / store).mkdir()
        uri = f"sqlite:///{tmp_path / store / 'mlflow.db'}"
        tracker = Tracker(TrackingConfig(uri=uri, experiment="e", system_metrics=False), enabled=True)
        tracker.start(f"run-{store}")
        assert tracker.log_model(tiny_edit_export, 1, registered_model="sama-tiny")["version"] in (1, "1")
        tracker.end("FINISHED")
        resolved.append(resolve_model("models:/sama-tiny/1", uri))
        assert resolve_model("models:/sama-tiny/1", uri) == resolved[-1]  # cached
    assert resolved[0] != resolved[1]
    pipeline = SamaEditPipeline.from_pretrained(resolved[0])
    assert pipeline.config.buckets.base_height == 48
    with pytest.raises(config.ConfigError, match="expected models:/NAME/VERSION"):
        resolve_model("models:/sama-tiny", "sqlite:///x.db")
