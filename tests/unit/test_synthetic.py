from __future__ import annotations

import csv
import dataclasses
import importlib
import json
import os

import numpy as np
import pytest

from sama import synthetic
from sama.synthetic import EDIT_KINDS, Background, Scene, Shape

FPS = 24.0
H, W = 96, 160


def _video():
    # sama.video is a sibling module; only the file-writing tests need it.
    return importlib.import_module("sama.video")


def _plain_scene(*shapes: Shape, style: str = "natural") -> Scene:
    # A flat grey background (same tone twice) makes every shape pixel easy to find.
    background = Background("gradient", "blue", rgb=(90, 90, 90), rgb2=(90, 90, 90))
    return Scene(background=background, shapes=shapes, style=style)


def _centroid(mask: np.ndarray) -> tuple[float, float]:
    ys, xs = np.nonzero(mask)
    return float(xs.mean()) + 0.5, float(ys.mean()) + 0.5


# --------------------------------------------------------------------------------------------------
# Scenes and rendering


def test_random_scene_is_deterministic_and_varied():
    assert synthetic.random_scene(7) == synthetic.random_scene(7)
    np.testing.assert_array_equal(
        synthetic.render(synthetic.random_scene(7), 5, FPS, H, W),
        synthetic.render(synthetic.random_scene(7), 5, FPS, H, W),
    )
    scenes = [synthetic.random_scene(seed) for seed in range(40)]
    assert len(set(scenes)) == 40
    assert {len(s.shapes) for s in scenes} == {1, 2, 3}
    assert {s.background.kind for s in scenes} == set(synthetic.BACKGROUND_KINDS)
    assert {shape.kind for s in scenes for shape in s.shapes} == set(synthetic.SHAPE_KINDS)
    assert len({round(shape.size, 3) for s in scenes for shape in s.shapes}) > 20
    for scene in scenes:
        colors = [shape.color for shape in scene.shapes]
        assert len(set(colors)) == len(colors)
        assert not set(colors) & {scene.background.color, scene.background.color2}
        assert all(np.hypot(*shape.velocity) >= 0.08 for shape in scene.shapes)
        assert scene.style == "natural"
    with pytest.raises(ValueError, match="non-negative"):
        synthetic.random_scene(-1)


def test_shape_sizes_set_the_diameters_of_scene_and_added_shapes():
    """Another size range draws the same scene otherwise (same seed, same kinds, colours, motion),
    and an added shape takes its size from the same range."""
    low, high = synthetic.SHAPE_SIZES
    for seed in range(20):
        small, large = synthetic.random_scene(seed), synthetic.random_scene(seed, (0.4, 0.6))
        assert all(low <= shape.size <= high for shape in small.shapes)
        assert all(0.4 <= shape.size <= 0.6 for shape in large.shapes)
        assert [(s.kind, s.color, s.velocity) for s in small.shapes] == [
            (s.kind, s.color, s.velocity) for s in large.shapes
        ]
        added, _ = synthetic.make_edit(large, "add", seed, shape_sizes=(0.4, 0.6))
        assert 0.4 <= added.shapes[-1].size <= 0.6
    for bad in ((0.0, 0.3), (0.5, 0.4), (0.2, 1.5)):
        with pytest.raises(ValueError, match="shape_sizes"):
            synthetic.random_scene(1, bad)


def test_render_shape_dtype_and_image():
    scene = synthetic.random_scene(3)
    video = synthetic.render(scene, 9, FPS, H, W)
    assert video.shape == (9, H, W, 3) and video.dtype == np.uint8
    image = synthetic.render(scene, 1, FPS, H, W)
    assert image.shape == (1, H, W, 3)
    np.testing.assert_array_equal(image[0], video[0])
    masks = synthetic.render_masks(scene, 9, FPS, H, W)
    assert masks.shape == (len(scene.shapes), 9, H, W) and masks.dtype == bool
    for bad in ((0, FPS, H, W), (3, 0.0, H, W), (3, FPS, 0, W)):
        with pytest.raises(ValueError):
            synthetic.render(scene, *bad)


def test_every_kind_texture_background_and_style_renders_visibly():
    for i, kind in enumerate(synthetic.SHAPE_KINDS):
        for texture in synthetic.TEXTURES:
            shape = Shape(kind, "red", 0.4, (0.5, 0.5), (0.1, 0.0), texture=texture, rotation=20.0 * i)
            mask = synthetic.render_masks(_plain_scene(shape), 1, FPS, H, W)[0, 0]
            # A visible, compact blob: at least a fifth of its bounding circle's area.
            radius = 0.5 * 0.4 * min(H, W)
            assert mask.sum() > 0.2 * np.pi * radius**2, (kind, texture)
            frame = synthetic.render(_plain_scene(shape), 1, FPS, H, W)[0]
            assert (frame[mask] != 90).any(axis=-1).all(), (kind, texture)
            assert (frame[~mask] == 90).all(), (kind, texture)
            tones = np.unique(frame[mask].reshape(-1, 3), axis=0)
            assert len(tones) == (1 if texture == "solid" else 2), (kind, texture)
    for kind in synthetic.BACKGROUND_KINDS:
        background = Background(kind, "green", color2="blue", drift=(0.1, 0.05), scale=0.3, seed=5)
        frames = synthetic.render(Scene(background), 2, FPS, H, W).astype(int)
        assert frames.std() > 5, kind
        assert (frames[0] != frames[1]).any(), f"{kind} background does not pan"
    shape = Shape("star", "yellow", 0.5, (0.5, 0.5), (0.0, 0.0))
    natural = synthetic.render(_plain_scene(shape), 1, FPS, H, W)
    for style in synthetic.STYLES[1:]:
        styled = synthetic.render(_plain_scene(shape, style=style), 1, FPS, H, W)
        assert (styled != natural).any(), style


def test_objects_move_along_their_velocity():
    shape = Shape("square", "red", 0.3, (0.3, 0.6), (0.25, -0.15), texture="stripes", spin=45.0)
    scene = _plain_scene(shape)
    video = synthetic.render(scene, 13, FPS, H, W)
    assert all((video[i] != video[i + 1]).any() for i in range(12))
    masks = synthetic.render_masks(scene, 13, FPS, H, W)[0]
    # The drawn pixels are exactly the mask (flat background, opaque shape).
    np.testing.assert_array_equal((video != 90).any(axis=-1), masks)
    (x0, y0), (x1, y1) = _centroid(masks[0]), _centroid(masks[12])
    dt = 12 / FPS
    assert x1 - x0 == pytest.approx(0.25 * W * dt, abs=1.0)
    assert y1 - y0 == pytest.approx(-0.15 * H * dt, abs=1.0)
    for i in (0, 6, 12):
        cx, cy = synthetic.shape_center(shape, i / FPS, H, W)
        assert _centroid(masks[i]) == pytest.approx((cx, cy), abs=0.75)


def test_random_scene_objects_move_and_stay_inside():
    for seed in range(10):
        scene = synthetic.random_scene(seed)
        masks = synthetic.render_masks(scene, 48, FPS, H, W)
        for s, shape in enumerate(scene.shapes):
            cx0, cy0 = synthetic.shape_center(shape, 0.0, H, W)
            cx1, cy1 = synthetic.shape_center(shape, 2 / FPS, H, W)
            assert np.hypot(cx1 - cx0, cy1 - cy0) > 0.05, (seed, s)
            assert masks[s].any(axis=(1, 2)).all()
            # Bouncing keeps every shape whole: its area is the same in every frame.
            areas = masks[s].sum(axis=(1, 2))
            assert areas.min() > 0.8 * areas.max()


def test_bounce_keeps_shape_inside_the_frame():
    shape = Shape("circle", "red", 0.3, (0.8, 0.5), (0.5, 0.0))
    xs = [synthetic.shape_center(shape, t, H, W)[0] for t in np.linspace(0, 4, 97)]
    radius = 0.15 * min(H, W)
    assert min(xs) >= radius - 1e-6 and max(xs) <= W - radius + 1e-6
    # It turns back at the right edge: first increasing, later decreasing.
    assert xs[1] > xs[0] and xs[20] < xs[10]


def test_time_based_motion_is_fps_and_resolution_independent():
    scene = synthetic.random_scene(5)
    fast = synthetic.render(scene, 25, 24.0, H, W)
    slow = synthetic.render(scene, 13, 12.0, H, W)
    np.testing.assert_array_equal(fast[::2], slow)
    big = synthetic.render_masks(scene, 13, 12.0, 2 * H, 2 * W).astype(np.float32)
    small = synthetic.render_masks(scene, 13, 12.0, H, W).astype(np.float32)
    pooled = big.reshape(*small.shape[:2], H, 2, W, 2).mean(axis=(3, 5))
    # Same layout at both sizes: the masks agree except along the edges.
    assert np.abs(pooled - small).mean() < 0.01


def test_caption_names_objects_and_background():
    for seed in range(20):
        scene = synthetic.random_scene(seed)
        text = synthetic.caption(scene)
        assert text == synthetic.caption(synthetic.random_scene(seed))
        assert text[0].isupper() and text.endswith(".")
        for shape in scene.shapes:
            assert shape.kind in text and shape.color in text
        assert scene.background.color in text and "background" in text
    shapes = (
        Shape("circle", "red", 0.3, (0.5, 0.5), (-0.2, 0.0), texture="stripes"),
        Shape("square", "blue", 0.15, (0.5, 0.5), (0.0, 0.1)),
    )
    scene = Scene(Background("checker", "green", drift=(0.05, 0.0)), shapes)
    assert synthetic.caption(scene) == (
        "A red striped circle moves left and a small blue square drifts down over a green checkered "
        "background, as the camera pans left."
    )
    sketch = synthetic.caption(dataclasses.replace(scene, style="sketch"))
    assert sketch.endswith("rendered as a pencil sketch.")
    assert synthetic.caption(Scene(Background("noise", "pink"))).startswith("An empty scene")


# --------------------------------------------------------------------------------------------------
# Edits


def _multi_shape_scene(min_shapes: int = 2) -> Scene:
    return next(s for seed in range(100) if len((s := synthetic.random_scene(seed)).shapes) >= min_shapes)


def _motion(shape: Shape) -> tuple:
    return (shape.kind, shape.size, shape.position, shape.velocity, shape.rotation, shape.spin)


def test_edits_are_deterministic_and_keep_untouched_motion():
    for seed in range(15):
        scene = synthetic.random_scene(seed)
        for kind in EDIT_KINDS:
            target, instruction = synthetic.make_edit(scene, kind, seed)
            assert (target, instruction) == synthetic.make_edit(scene, kind, seed)
            assert target != scene and instruction.endswith(".")
            motion = {_motion(s) for s in scene.shapes}
            kept = [s for s in target.shapes if _motion(s) in motion]
            expected_kept = {"remove": len(scene.shapes) - 1}.get(kind, len(scene.shapes))
            assert len(kept) == expected_kept, (seed, kind)
            if kind != "background":
                assert target.background == scene.background
    kinds_seen = {synthetic.make_edit(synthetic.random_scene(0), "style", s)[0].style for s in range(30)}
    assert kinds_seen == set(synthetic.STYLES) - {"natural"}


def test_recolor_twin_names_another_colour_for_the_same_object_and_wording():
    for seed in range(20):
        scene = synthetic.random_scene(seed)
        target, instruction = synthetic.make_edit(scene, "recolor", seed)
        twin, twin_instruction = synthetic.recolor_twin(scene, seed)
        changed = [i for i, (a, b) in enumerate(zip(target.shapes, twin.shapes, strict=True)) if a != b]
        assert len(changed) == 1
        (i,) = changed
        assert target.shapes[i].color != twin.shapes[i].color
        assert twin.shapes[i].color not in {s.color for s in scene.shapes}
        assert twin.shapes[i].color not in {scene.background.color, scene.background.color2}
        original = scene.shapes[i]
        assert dataclasses.replace(twin.shapes[i], color=original.color, rgb=original.rgb) == original
        # Same words but the named colour.
        assert instruction.replace(target.shapes[i].color, twin.shapes[i].color) == twin_instruction
        assert synthetic.recolor_twin(scene, seed) == (twin, twin_instruction)


def test_recolor_twin_refuses_a_scene_without_a_second_free_colour_or_without_shapes():
    scene = _multi_shape_scene()
    used = {scene.background.color, scene.background.color2} | {s.color for s in scene.shapes}
    fillers = [c for c in synthetic.COLORS if c not in used][:-1]  # every colour but one taken
    crowded = dataclasses.replace(
        scene,
        shapes=scene.shapes + tuple(dataclasses.replace(scene.shapes[0], color=c, rgb=None) for c in fillers),
    )
    synthetic.make_edit(crowded, "recolor", 0)  # the edit itself still has its one colour
    with pytest.raises(ValueError, match="only one free colour"):
        synthetic.recolor_twin(crowded, 0)
    with pytest.raises(ValueError, match="at least one shape"):
        synthetic.recolor_twin(dataclasses.replace(scene, shapes=()), 0)


def test_recolor_changes_only_that_object():
    scene = _multi_shape_scene()
    target, instruction = synthetic.make_edit(scene, "recolor", 1)
    changed = [i for i, (a, b) in enumerate(zip(scene.shapes, target.shapes, strict=True)) if a != b]
    assert len(changed) == 1
    (i,) = changed
    old, new = scene.shapes[i], target.shapes[i]
    assert dataclasses.replace(new, color=old.color, rgb=old.rgb) == old
    assert old.color in instruction and old.kind in instruction and new.color in instruction
    src = synthetic.render(scene, 12, FPS, H, W)
    dst = synthetic.render(target, 12, FPS, H, W)
    masks = synthetic.render_masks(scene, 12, FPS, H, W)
    differs = (src != dst).any(axis=-1)
    assert differs.any()
    assert not (differs & ~masks[i]).any()
    # Where nothing is drawn over it, the object now has exactly its new colour's pixels.
    visible = masks[i] & ~masks[i + 1 :].any(axis=0)
    if new.texture == "solid":
        assert (dst[visible] == new.rgb).all()


def test_remove_reveals_the_background():
    scene = _multi_shape_scene()
    target, instruction = synthetic.make_edit(scene, "remove", 0)
    (removed,) = [s for s in scene.shapes if s not in target.shapes]
    i = scene.shapes.index(removed)
    assert len(target.shapes) == len(scene.shapes) - 1
    assert removed.color in instruction and removed.kind in instruction
    src = synthetic.render(scene, 12, FPS, H, W)
    dst = synthetic.render(target, 12, FPS, H, W)
    empty = synthetic.render(Scene(scene.background), 12, FPS, H, W)
    masks = synthetic.render_masks(scene, 12, FPS, H, W)
    others = np.delete(masks, i, axis=0).any(axis=0)
    np.testing.assert_array_equal(dst[~masks[i]], src[~masks[i]])
    revealed = masks[i] & ~others
    assert revealed.any()
    np.testing.assert_array_equal(dst[revealed], empty[revealed])
    # A one-shape scene keeps only its background; an empty one cannot lose anything.
    single = _plain_scene(Shape("circle", "red", 0.3, (0.5, 0.5), (0.1, 0.1)))
    only_background, _ = synthetic.make_edit(single, "remove", 0)
    assert only_background.shapes == ()
    with pytest.raises(ValueError, match="at least one shape"):
        synthetic.make_edit(only_background, "remove", 0)
    with pytest.raises(ValueError, match="at least one shape"):
        synthetic.make_edit(only_background, "recolor", 0)


def test_add_draws_a_new_object_only():
    scene = synthetic.random_scene(2)
    target, instruction = synthetic.make_edit(scene, "add", 3)
    assert target.shapes[:-1] == scene.shapes
    added = target.shapes[-1]
    assert added.color not in {s.color for s in scene.shapes}
    assert added.color in instruction and added.kind in instruction and "moving" in instruction
    _, still = synthetic.make_edit(scene, "add", 3, video=False)
    assert "moving" not in still and added.kind in still
    src = synthetic.render(scene, 12, FPS, H, W)
    dst = synthetic.render(target, 12, FPS, H, W)
    added_mask = synthetic.render_masks(target, 12, FPS, H, W)[-1]
    np.testing.assert_array_equal(dst[~added_mask], src[~added_mask])
    assert (dst[added_mask] != src[added_mask]).any(axis=-1).mean() > 0.5


def test_background_edit_keeps_objects():
    scene = _multi_shape_scene()
    target, instruction = synthetic.make_edit(scene, "background", 4)
    assert target.shapes == scene.shapes and target.style == scene.style
    assert target.background.color != scene.background.color
    assert target.background.drift == scene.background.drift
    assert target.background.color in instruction and "background" in instruction.lower()
    src = synthetic.render(scene, 12, FPS, H, W)
    dst = synthetic.render(target, 12, FPS, H, W)
    objects = synthetic.render_masks(scene, 12, FPS, H, W).any(axis=0)
    np.testing.assert_array_equal(dst[objects], src[objects])
    assert (dst[~objects] != src[~objects]).any(axis=-1).mean() > 0.5


def test_style_edit_restyles_everything_but_keeps_layout():
    scene = synthetic.random_scene(9)
    for seed in range(6):
        target, instruction = synthetic.make_edit(scene, "style", seed)
        assert target.style != "natural" and instruction
        assert dataclasses.replace(target, style="natural") == scene
        np.testing.assert_array_equal(
            synthetic.render_masks(target, 6, FPS, H, W), synthetic.render_masks(scene, 6, FPS, H, W)
        )
        assert (synthetic.render(target, 2, FPS, H, W) != synthetic.render(scene, 2, FPS, H, W)).any()
        again, _ = synthetic.make_edit(target, "style", seed)
        assert again.style not in ("natural", target.style)
    sketch = next(t for s in range(50) if (t := synthetic.make_edit(scene, "style", s))[0].style == "sketch")
    assert "sketch" in sketch[1] or "drawing" in sketch[1]


def test_invalid_edit_kind():
    with pytest.raises(ValueError, match="'blur'"):
        synthetic.make_edit(synthetic.random_scene(0), "blur", 0)


def test_invalid_scene_values():
    with pytest.raises(ValueError, match="hexagon"):
        Shape("hexagon", "red", 0.2, (0.5, 0.5), (0.1, 0.0))
    with pytest.raises(ValueError, match="mauve"):
        Shape("circle", "mauve", 0.2, (0.5, 0.5), (0.1, 0.0))
    assert Shape("circle", "mauve", 0.2, (0.5, 0.5), (0.1, 0.0), rgb=(200, 150, 200)).rgb == (200, 150, 200)
    with pytest.raises(ValueError, match="size"):
        Shape("circle", "red", 0.0, (0.5, 0.5), (0.1, 0.0))
    with pytest.raises(ValueError, match="style"):
        Scene(Background("noise", "red"), style="oil")


# --------------------------------------------------------------------------------------------------
# Files


ROWS = [
    {"source": "pairs/a.mp4", "target": "pairs/b.mp4", "instruction": 'Say "hi", twice.',
     "category": "add", "score_if": 9.33, "score_vq": 10.0, "score_cp": 8.67, "score_mc": 9.0},
    {"source": "pairs/c.png", "target": "pairs/d.png", "instruction": "Entfärbe den Hut.",
     "category": "style", "score_if": 5.0, "score_vq": 9.67, "score_cp": 9.0, "score_mc": None},
]  # fmt: skip


def _read_manifest(uri: str) -> list[dict]:
    if uri.endswith(".csv"):
        with open(uri, newline="", encoding="utf-8") as handle:
            return list(csv.DictReader(handle))
    if uri.endswith(".jsonl"):
        with open(uri, encoding="utf-8") as handle:
            return [json.loads(line) for line in handle]
    import pyarrow.parquet as pq

    return pq.read_table(uri).to_pylist()


def _csv_value(column: str, text: str):
    if not text:
        return None
    return float(text) if column.startswith("score_") else text


@pytest.mark.parametrize("fmt", synthetic.MANIFEST_FORMATS)
def test_write_manifest_round_trips(tmp_path, fmt):
    uri = synthetic.write_manifest(ROWS, str(tmp_path / f"manifest.{fmt}"))
    rows = _read_manifest(uri)
    assert [list(r) for r in rows] == [list(synthetic.MANIFEST_COLUMNS)] * 2
    if fmt == "csv":
        # csv has no types or nulls: numbers come back as text, None as "".
        assert rows[1]["score_mc"] == "" and float(rows[0]["score_cp"]) == 8.67
        rows = [{k: _csv_value(k, v) for k, v in r.items()} for r in rows]
    assert rows == ROWS
    explicit = synthetic.write_manifest(ROWS, str(tmp_path / "rows.dat"), format=fmt)
    assert os.path.getsize(explicit) > 0
    with pytest.raises(ValueError, match="xml"):
        synthetic.write_manifest(ROWS, str(tmp_path / "m.xml"), format="xml")


def test_write_raw_videos(tmp_path):
    video = _video()
    out = f"file://{tmp_path}/raw"  # a URI, not a bare path: writers go through sama.storage
    sizes = ((64, 96), (96, 64), (64, 64))
    uris = synthetic.write_raw_videos(out, 5, seed=3, fps=12.0, seconds=1.0, sizes=sizes)
    assert uris == [f"{out}/video_{i:04d}.mp4" for i in range(5)]
    for i, uri in enumerate(uris):
        info = video.probe(uri)
        assert (info.num_frames, info.height, info.width) == (12, *sizes[i % 3])
        assert info.fps == pytest.approx(12.0)
    names = sorted(os.listdir(tmp_path / "raw"))
    assert names == [
        "video_0000.mp4", "video_0000.txt", "video_0001.json", "video_0001.mp4", "video_0002.mp4",
        "video_0002.txt", "video_0003.json", "video_0003.mp4", "video_0004.mp4",
    ]  # fmt: skip
    scene = synthetic.random_scene(synthetic.derive_seed(3, 0))
    assert (tmp_path / "raw/video_0000.txt").read_text().strip() == synthetic.caption(scene)
    caption1 = synthetic.caption(synthetic.random_scene(synthetic.derive_seed(3, 1)))
    assert json.loads((tmp_path / "raw/video_0001.json").read_text()) == {"caption": caption1}
    # The decoded clip is the render, up to compression.
    decoded = video.decode_video_bytes((tmp_path / "raw/video_0000.mp4").read_bytes())
    rendered = synthetic.render(scene, 12, 12.0, 64, 96)
    assert decoded.shape == rendered.shape
    assert np.abs(decoded.astype(int) - rendered).mean() < 6
    # Same seed, same content; another seed, other content. libx264 output is not bit-stable across
    # encoder runs, so compare decoded frames with a tolerance rather than bytes.
    again = synthetic.write_raw_videos(str(tmp_path / "again"), 1, seed=3, fps=12.0, seconds=1.0, sizes=sizes)
    other = synthetic.write_raw_videos(str(tmp_path / "other"), 1, seed=4, fps=12.0, seconds=1.0, sizes=sizes)
    assert np.abs(video.decode_clip(again[0]).astype(int) - decoded).mean() < 2
    assert np.abs(video.decode_clip(other[0]).astype(int) - decoded).mean() > 10
    for policy, suffix in (("txt", ".txt"), ("json", ".json"), ("none", None)):
        base = tmp_path / policy
        synthetic.write_raw_videos(str(base), 2, fps=12.0, seconds=0.5, sizes=sizes, captions=policy)
        sidecars = sorted(n for n in os.listdir(base) if not n.endswith(".mp4"))
        assert sidecars == ([f"video_000{i}{suffix}" for i in range(2)] if suffix else [])
    with pytest.raises(ValueError, match="captions"):
        synthetic.write_raw_videos(str(tmp_path / "x"), 1, captions="srt")
    with pytest.raises(ValueError, match="even"):
        synthetic.write_raw_videos(str(tmp_path / "x"), 1, sizes=((63, 64),))


def test_write_edit_pairs(tmp_path):
    video = _video()
    sizes = ((64, 96), (96, 64))
    kwargs = {"fps": 12.0, "seconds": 1.0, "sizes": sizes}
    manifest = synthetic.write_edit_pairs(str(tmp_path), 8, seed=1, media="mixed", **kwargs)
    assert manifest == str(tmp_path / "manifest.csv")
    with open(manifest, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        assert tuple(reader.fieldnames) == synthetic.MANIFEST_COLUMNS
        rows = list(reader)
    assert len(rows) == 8
    assert [r["category"] for r in rows] == [EDIT_KINDS[i % 5] for i in range(8)]
    for i, row in enumerate(rows):
        source, target = tmp_path / row["source"], tmp_path / row["target"]
        assert source.is_file() and target.is_file() and row["instruction"]
        scores = [float(row[c]) for c in synthetic.SCORE_COLUMNS if row[c]]
        assert all(1.0 <= s <= 10.0 for s in scores)
        assert (min(scores) < 8.0) == (i % 4 == 3)
        if i % 2 == 0:
            assert row["source"].endswith(".mp4") and len(scores) == 4
            src, dst = video.probe(str(source)), video.probe(str(target))
            assert (src.num_frames, src.height, src.width) == (12, *sizes[i % 2])
            assert (dst.num_frames, dst.height, dst.width) == (src.num_frames, src.height, src.width)
        else:
            assert row["source"].endswith(".png") and row["score_mc"] == "" and len(scores) == 3
            assert video.read_image(str(source)).shape == (*sizes[i % 2], 3)
            assert video.read_image(str(target)).shape == (*sizes[i % 2], 3)
    # A pure image set, with the manifest as parquet.
    pq_uri = synthetic.write_edit_pairs(
        str(tmp_path / "img"), 3, media="image", sizes=sizes, manifest_format="parquet"
    )
    rows = _read_manifest(pq_uri)
    assert [r["score_mc"] for r in rows] == [None] * 3
    assert all(r["target"].endswith(".png") for r in rows)
    with pytest.raises(ValueError, match="media"):
        synthetic.write_edit_pairs(str(tmp_path / "x"), 1, media="audio")


def test_write_bad_inputs(tmp_path):
    import av

    video = _video()
    expected = synthetic.write_bad_inputs(str(tmp_path))
    assert {os.path.basename(uri): kind for uri, kind in expected.items()} == synthetic.BAD_INPUT_KINDS
    assert set(expected.values()) <= set(video.ERROR_KINDS)
    assert all(os.path.isfile(uri) for uri in expected)
    assert os.path.getsize(tmp_path / "zero_byte.mp4") == 0
    assert b"plain text" in (tmp_path / "not_a_video.mp4").read_bytes()
    with av.open(str(tmp_path / "audio_only.mp4")) as container:
        assert len(container.streams.audio) == 1 and len(container.streams.video) == 0
        assert container.streams.audio[0].codec_context.name == "aac"
    with av.open(str(tmp_path / "one_frame.mp4")) as container:
        assert sum(1 for _ in container.decode(video=0)) == 1
    # Every file is rejected, with the kind the writer promised, when a 2-frame clip is asked for.
    for uri, kind in expected.items():
        with pytest.raises(video.VideoDecodeError) as info:
            video.decode_clip(uri, num_frames=2)
        assert info.value.kind == kind, (uri, info.value)


def test_derive_seed():
    assert synthetic.derive_seed(0, 1) == synthetic.derive_seed(0, 1)
    assert len({synthetic.derive_seed(0, i) for i in range(100)} | {synthetic.derive_seed(1, 0)}) == 101
    assert synthetic.derive_seed(0, 1, "edit") != synthetic.derive_seed(0, 1)
    assert 0 <= synthetic.derive_seed(2**40, "x") < 2**63
