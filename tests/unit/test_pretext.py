from __future__ import annotations

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
