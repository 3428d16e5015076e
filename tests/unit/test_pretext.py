from __future__ import annotations

import json

import numpy as np
import pytest

from sama import pretext
from sama.pretext import PretextConfig


def clip(t: int = 49, h: int = 32, w: int = 48) -> np.ndarray:
    rng = np.random.default_rng(0)
    frames = rng.integers(1, 255, size=(t, h, w, 3), dtype=np.uint8)
    frames[:, 0, 0, 0] = np.arange(t, dtype=np.uint8)  # frame index tag
    return frames


@pytest.mark.parametrize("seed", range(20))
def test_cube_mask_is_one_contiguous_30pct_span_never_frame_0(seed):
    frames = clip()
    out, params = pretext.cube_inpaint(frames, np.random.default_rng(seed), PretextConfig())
    masked = [i for i in range(len(frames)) if np.all(out[i] == 0)]
    assert masked == list(range(params["mask_start"], params["mask_start"] + params["mask_length"]))
    assert len(masked) == round(0.3 * 49) == 15
    assert 0 not in masked
    untouched = [i for i in range(len(frames)) if i not in masked]
    assert np.array_equal(out[untouched], frames[untouched])


def test_cube_mask_partial_spatial_extent():
    frames = clip()
    out, params = pretext.cube_inpaint(
        frames, np.random.default_rng(1), PretextConfig(mask_spatial_extent=0.5)
    )
    top, left, mh, mw = params["mask_box"]
    assert (mh, mw) == (16, 24)
    block = out[params["mask_start"] : params["mask_start"] + params["mask_length"]]
    assert np.all(block[:, top : top + mh, left : left + mw] == 0)
    assert (block != 0).any()


def test_speed_is_every_second_frame_trimmed_to_4k_plus_1():
    frames = clip(49)
    out, params = pretext.speed_up(frames, PretextConfig())
    assert len(out) == 25 and params == {"speed_factor": 2, "source_frames": 25}
    assert np.array_equal(out, frames[::2][:25])
    out33, _ = pretext.speed_up(clip(33), PretextConfig())
    assert len(out33) == 17
    out45, _ = pretext.speed_up(clip(45), PretextConfig())  # 23 frames -> trimmed to 21
    assert len(out45) == 21 and np.array_equal(out45[:, 0, 0, 0], np.arange(0, 42, 2))


@pytest.mark.parametrize("seed", range(20))
def test_tube_shuffle_is_a_non_identity_permutation_of_8_equal_tubes(seed):
    frames = clip()
    out, params = pretext.tube_shuffle(frames, np.random.default_rng(seed), PretextConfig())
    perm = params["permutation"]
    assert sorted(perm) == list(range(8)) and perm != list(range(8))
    assert np.array_equal(out[0], frames[0])  # frame 0 is kept
    # Each output tube equals exactly the source tube the permutation names, and all are equal-sized.
    t, h, w = 48, 16, 24
    for dst, src in enumerate(perm):
        ti, yi, xi = dst // 4, (dst // 2) % 2, dst % 2
        sti, syi, sxi = src // 4, (src // 2) % 2, src % 2
        got = out[1 + ti * 24 : 1 + (ti + 1) * 24, yi * h : (yi + 1) * h, xi * w : (xi + 1) * w]
        want = frames[1 + sti * 24 : 1 + (sti + 1) * 24, syi * h : (syi + 1) * h, sxi * w : (sxi + 1) * w]
        assert got.shape == (t // 2, h, w, 3)
        assert np.array_equal(got, want)
    assert np.array_equal(pretext.unshuffle_tubes(out, perm, params["tube_first_frame"]), frames)


def test_tube_shuffle_whole_clip_variant_and_bad_sizes():
    frames = clip(48)
    out, params = pretext.tube_shuffle(
        frames, np.random.default_rng(0), PretextConfig(tube_keep_first_frame=False)
    )
    assert params["tube_first_frame"] == 0
    assert np.array_equal(pretext.unshuffle_tubes(out, params["permutation"], 0), frames)
    with pytest.raises(ValueError, match="even"):
        pretext.tube_shuffle(clip(48), np.random.default_rng(0), PretextConfig())


def test_task_mix_matches_1_2_3_4():
    cfg = PretextConfig()
    counts = dict.fromkeys(pretext.PRETEXT_TASKS, 0)
    n = 20000
    for i in range(n):
        counts[pretext.choose_task(pretext.task_rng(7, f"clip-{i}"), cfg.weights)] += 1
    for task, weight in zip(pretext.PRETEXT_TASKS, (1, 2, 3, 4), strict=True):
        assert counts[task] / n == pytest.approx(weight / 10, abs=0.015)
    # Deterministic per (seed, clip id); a different seed gives a different assignment.
    draws = [pretext.choose_task(pretext.task_rng(7, f"clip-{i}"), cfg.weights) for i in range(50)]
    assert draws == [pretext.choose_task(pretext.task_rng(7, f"clip-{i}"), cfg.weights) for i in range(50)]
    assert draws != [pretext.choose_task(pretext.task_rng(8, f"clip-{i}"), cfg.weights) for i in range(50)]


def test_instructions_and_config_validation():
    assert (
        pretext.instruction_for("speed", " a cat ") == "[Restore the video to normal playback speed.] a cat"
    )
    assert pretext.instruction_for("t2v", "a cat") == "a cat"
    assert pretext.instruction_for("cube_inpaint", "") == "[Complete the missing regions in the video.]"
    with pytest.raises(ValueError, match="unknown task"):
        PretextConfig(weights={"dance": 1.0}).validate()
    with pytest.raises(ValueError, match="mask_ratio"):
        PretextConfig(mask_ratio=1.5).validate()
    with pytest.raises(ValueError, match="unknown pretext task"):
        pretext.apply_task("dance", clip(), np.random.default_rng(0), PretextConfig())
    result = pretext.apply_task("t2v", clip(), np.random.default_rng(0), PretextConfig())
    assert result.source is None and result.params == {}


def random_clip(seed: int, t: int = 49, h: int = 32, w: int = 48) -> np.ndarray:
    return np.random.default_rng(1000 + seed).integers(0, 256, size=(t, h, w, 3), dtype=np.uint8)


DERIVE_CASES = [
    ("cube_inpaint", PretextConfig(), 49),
    ("cube_inpaint", PretextConfig(mask_spatial_extent=0.4, mask_value=200), 49),
    ("cube_inpaint", PretextConfig(mask_ratio=0.5, mask_spatial_extent=0.75, mask_value=17), 17),
    ("speed", PretextConfig(), 49),
    ("speed", PretextConfig(speed_factor=3), 49),
    ("speed", PretextConfig(), 45),  # 23 frames trimmed to 21
    ("tube_shuffle", PretextConfig(), 49),
    ("tube_shuffle", PretextConfig(tube_keep_first_frame=False), 48),
]


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize(("task", "cfg", "frames"), DERIVE_CASES)
def test_derive_source_is_bit_exactly_apply_tasks_source(task, cfg, frames, seed):
    target = random_clip(seed, t=frames)
    before = target.copy()
    result = pretext.apply_task(task, target, np.random.default_rng(seed), cfg)
    # The parameters travel through the sample's JSON metadata.
    params = json.loads(json.dumps(result.params))
    derived = pretext.derive_source(task, target, params)
    assert derived.dtype == np.uint8 and derived.flags.c_contiguous
    assert derived.shape == result.source.shape
    assert np.array_equal(derived, result.source)
    assert np.array_equal(target, before)  # the target is never written to
    if task == "cube_inpaint":
        assert params["mask_value"] == cfg.mask_value
        start, length = params["mask_start"], params["mask_length"]
        top, left, mh, mw = params["mask_box"]
        assert np.all(derived[start : start + length, top : top + mh, left : left + mw] == cfg.mask_value)
        if cfg.mask_spatial_extent < 1:
            assert (mh, mw) != (target.shape[1], target.shape[2])
            assert not np.array_equal(derived[start], np.full_like(derived[start], cfg.mask_value))


def test_derive_source_of_old_cube_metadata_without_mask_value_masks_with_0():
    target = random_clip(0)
    result = pretext.apply_task("cube_inpaint", target, np.random.default_rng(3), PretextConfig())
    old = {k: v for k, v in result.params.items() if k != "mask_value"}
    assert np.array_equal(pretext.derive_source("cube_inpaint", target, old), result.source)


def test_derive_source_t2v_has_none_and_bad_inputs_are_named():
    target = random_clip(0)
    assert pretext.derive_source("t2v", target, {}) is None
    with pytest.raises(ValueError, match="'dance'"):
        pretext.derive_source("dance", target, {})
    with pytest.raises(ValueError, match="video_edit"):
        pretext.derive_source("video_edit", target, {})
    with pytest.raises(ValueError, match=r"cube_inpaint.*\['mask_box'\] are missing"):
        pretext.derive_source("cube_inpaint", target, {"mask_start": 1, "mask_length": 3})
    with pytest.raises(ValueError, match=r"speed.*\['source_frames'\] are missing"):
        pretext.derive_source("speed", target, {"speed_factor": 2})
    with pytest.raises(ValueError, match=r"tube_shuffle.*\['permutation', 'tube_first_frame'\] are missing"):
        pretext.derive_source("tube_shuffle", target, {})
    # Parameters drawn for another clip size are refused rather than silently clipped.
    speed = pretext.apply_task("speed", target, np.random.default_rng(0), PretextConfig())
    with pytest.raises(ValueError, match="speed: 25 source frames .* got 33"):
        pretext.derive_source("speed", target[:33], speed.params)
    cube = pretext.apply_task("cube_inpaint", target, np.random.default_rng(0), PretextConfig())
    with pytest.raises(ValueError, match="mask_box .* does not fit frames of 16x48"):
        pretext.derive_source("cube_inpaint", target[:, :16], cube.params)
    tube = pretext.apply_task("tube_shuffle", target, np.random.default_rng(0), PretextConfig())
    with pytest.raises(ValueError, match="even"):
        pretext.derive_source("tube_shuffle", target[:48], tube.params)
    with pytest.raises(ValueError, match="permutation"):
        pretext.derive_source("tube_shuffle", target, {**tube.params, "permutation": [0] * 8})
    with pytest.raises(ValueError, match="mask_value"):
        PretextConfig(mask_value=256).validate()
