"""Tests for sama.video: every video is synthesised here with numpy + PyAV, small and fast."""

from __future__ import annotations

import io
import pickle
from fractions import Fraction

import av
import numpy as np
import pytest
from PIL import Image

from sama import synthetic, video
from sama.video import DecodeStats, VideoDecodeError

STEP = 4  # brightness step per frame index in ramp videos; codec error stays well under STEP/2


def ramp(num: int, height: int = 48, width: int = 64) -> np.ndarray:
    """Uniform frames whose brightness encodes the frame index (index * STEP)."""
    values = (np.arange(num) * STEP % 256).astype(np.uint8)
    return np.broadcast_to(values[:, None, None, None], (num, height, width, 3)).copy()


def indices(frames: np.ndarray) -> list[int]:
    """Recover ramp indices from decoded frames (the mean of the frame's centre)."""
    h, w = frames.shape[1:3]
    centre = frames[:, h // 4 : 3 * h // 4, w // 4 : 3 * w // 4].astype(float).mean(axis=(1, 2, 3))
    return [round(v / STEP) for v in centre]


def write_with_av(
    path, frames: np.ndarray, fps: int, fmt: str, codec: str, options=None, rotation=None, gop=None
) -> None:
    """Encode with PyAV directly, for containers and flags encode_mp4 does not produce."""
    _, height, width, _ = frames.shape
    with av.open(str(path), "w", format=fmt, options=options or {}) as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        if codec == "libvpx-vp9":
            stream.options = {"deadline": "realtime", "cpu-used": "8", "crf": "20", "b:v": "0"}
        if gop:
            stream.codec_context.gop_size = gop
        if rotation is not None:
            stream.set_display_rotation(rotation)
        for i, rgb in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
            frame.pts, frame.time_base = i, Fraction(1, fps)
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))


def expect_error(kind: str, fn, *args, name: str | None = None, **kwargs) -> VideoDecodeError:
    with pytest.raises(VideoDecodeError) as info:
        fn(*args, **kwargs)
    err = info.value
    assert err.kind == kind, f"expected {kind}, got {err.kind}: {err}"
    if name is not None:
        assert name in str(err)
        assert err.uri == name
    assert err.reason and err.reason in str(err)
    return err


@pytest.fixture(scope="module")
def ramp_mp4() -> bytes:
    """2 s at 30 fps, 64x48, frame i has brightness 4*i."""
    return video.encode_mp4(ramp(60), fps=30, gop=30)


# --------------------------------------------------------------------------------------------
# Round trips


def test_encode_probe_decode_roundtrip(tmp_path):
    frames = ramp(48, height=64, width=96)
    path = tmp_path / "clip.mp4"
    path.write_bytes(video.encode_mp4(frames, fps=24))

    info = video.probe(str(path))
    assert info == video.VideoInfo(
        uri=str(path),
        duration_s=pytest.approx(2.0),
        fps=pytest.approx(24.0),
        num_frames=48,
        width=96,
        height=64,
        codec="h264",
        has_video=True,
        has_audio=False,
    )

    decoded = video.decode_clip(str(path))
    assert decoded.shape == (48, 64, 96, 3) and decoded.dtype == np.uint8
    assert indices(decoded) == list(range(48))
    assert np.abs(decoded.astype(int) - frames.astype(int)).mean() < 2.0

    # file:// URIs go through sama.storage as well.
    assert video.decode_clip(f"file://{path}", num_frames=3).shape == (3, 64, 96, 3)


def test_decode_from_bytes_matches_file(tmp_path, ramp_mp4):
    path = tmp_path / "ramp.mp4"
    path.write_bytes(ramp_mp4)
    from_bytes = video.decode_clip(ramp_mp4, start_s=0.5, num_frames=10)
    from_file = video.decode_clip(str(path), start_s=0.5, num_frames=10)
    np.testing.assert_array_equal(from_bytes, from_file)
    assert indices(from_bytes) == list(range(15, 25))
    assert video.decode_video_bytes(ramp_mp4).shape == (60, 48, 64, 3)
    assert video.probe(ramp_mp4).uri == "<bytes>"
    assert video.probe(ramp_mp4, uri="s3://bucket/x.mp4").uri == "s3://bucket/x.mp4"


def test_encode_mp4_keeps_ntsc_rate():
    info = video.probe(video.encode_mp4(ramp(30, 16, 16), fps=30000 / 1001))
    assert info.fps == pytest.approx(30000 / 1001, rel=1e-6)
    assert info.num_frames == 30


@pytest.mark.parametrize(
    "bad, match",
    [
        (np.zeros((2, 16, 16, 3), np.float32), "uint8"),
        (np.zeros((16, 16, 3), np.uint8), r"\(T, H, W, 3\)"),
        (np.zeros((2, 16, 16, 4), np.uint8), r"\(T, H, W, 3\)"),
        (np.zeros((0, 16, 16, 3), np.uint8), "at least one frame"),
        (np.zeros((2, 15, 16, 3), np.uint8), "even"),
        (np.zeros((2, 16, 17, 3), np.uint8), "even"),
        ([[0]], "numpy array"),
    ],
)
def test_encode_mp4_rejects_bad_arrays(bad, match):
    with pytest.raises(ValueError, match=match):
        video.encode_mp4(bad, fps=30)


@pytest.mark.parametrize("fps", [0, -1, float("nan"), float("inf")])
def test_encode_mp4_rejects_bad_fps(fps):
    with pytest.raises(ValueError, match="fps"):
        video.encode_mp4(ramp(2, 16, 16), fps=fps)


# --------------------------------------------------------------------------------------------
# Timing: start, resampling


def test_resample_30_to_15_picks_every_other_frame(ramp_mp4):
    clip = video.decode_clip(ramp_mp4, num_frames=30, fps=15)
    assert clip.shape == (30, 48, 64, 3)
    assert indices(clip) == list(range(0, 60, 2))

    clip = video.decode_clip(ramp_mp4, start_s=0.5, num_frames=10, fps=15)
    assert indices(clip) == list(range(15, 35, 2))


def test_resample_non_integer_ratio_and_upsampling(ramp_mp4):
    # 30 -> 12 fps: target i is at i/12 s, shown by source frame floor(2.5 * i).
    assert indices(video.decode_clip(ramp_mp4, num_frames=10, fps=12)) == [int(2.5 * i) for i in range(10)]
    # 30 -> 60 fps: every frame twice; the repeats are independent arrays.
    up = video.decode_clip(ramp_mp4, start_s=1.0, num_frames=8, fps=60)
    assert indices(up) == [30, 30, 31, 31, 32, 32, 33, 33]
    # To the end at 15 fps: targets 0 .. 1.9333 s -> 30 frames.
    assert len(video.decode_clip(ramp_mp4, fps=15)) == 30


def test_start_between_frames_uses_the_frame_on_screen(ramp_mp4):
    # 0.51 s lies inside frame 15's display interval [0.5, 0.5333).
    assert indices(video.decode_clip(ramp_mp4, start_s=0.51, num_frames=3)) == [15, 16, 17]
    assert indices(video.decode_clip(ramp_mp4, start_s=0.51, num_frames=3, fps=10)) == [15, 18, 21]
    # The last frame is on screen until 2.0 s.
    assert indices(video.decode_clip(ramp_mp4, start_s=1.98)) == [59]


def test_nonzero_stream_start_time(tmp_path):
    # MPEG-TS streams start at a non-zero timestamp; clip times are relative to the first frame.
    path = tmp_path / "clip.ts"
    write_with_av(path, ramp(60), 30, "mpegts", "libx264", gop=30)
    with av.open(str(path)) as container:
        assert container.streams.video[0].start_time > 0
    info = video.probe(str(path))
    assert info.duration_s == pytest.approx(2.0, abs=0.05) and info.num_frames == 60
    assert indices(video.decode_clip(str(path), num_frames=3)) == [0, 1, 2]
    stats = DecodeStats()
    # mpegts has no index: the seek may land late and is retried earlier.
    assert indices(video.decode_clip(str(path), start_s=1.0, num_frames=3, stats=stats)) == [30, 31, 32]
    assert stats.seeks >= 1


def test_raw_h264_without_timestamps_or_seeking(tmp_path):
    # An elementary stream has no container timestamps, no duration and cannot seek.
    path = tmp_path / "clip.h264"
    write_with_av(path, ramp(60), 30, "h264", "libx264", gop=30)
    info = video.probe(str(path))
    assert (info.num_frames, info.fps, info.duration_s) == (60, pytest.approx(30), pytest.approx(2.0))
    stats = DecodeStats()
    assert indices(video.decode_clip(str(path), start_s=1.0, num_frames=4, stats=stats)) == [30, 31, 32, 33]
    assert stats.seeks == 0  # the failed seek fell back to decoding from the start
    assert indices(video.decode_clip(str(path), start_s=1.0, num_frames=3, fps=15)) == [30, 32, 34]


def test_iter_frames_is_lazy(ramp_mp4):
    stats = DecodeStats()
    frames = video.iter_frames(ramp_mp4, start_s=1.0, stats=stats)
    first = [next(frames) for _ in range(3)]
    frames.close()
    assert indices(np.stack(first)) == [30, 31, 32]
    assert stats.frames_decoded < 20


# --------------------------------------------------------------------------------------------
# Seeking


@pytest.fixture(scope="module")
def long_mp4(tmp_path_factory) -> str:
    """20 s at 30 fps, 128x72, keyframe every 30 frames; the index is readable from the pixels."""
    num, height, width = 600, 72, 128
    frames = np.empty((num, height, width, 3), np.uint8)
    for i in range(num):
        frames[i, :, : width // 2] = (i % 50) * 5
        frames[i, :, width // 2 :] = (i // 50) * 20
    path = tmp_path_factory.mktemp("long") / "long.mp4"
    path.write_bytes(video.encode_mp4(frames, fps=30, gop=30, preset="ultrafast"))
    return str(path)


def long_indices(frames: np.ndarray) -> list[int]:
    left = frames[:, 36, 32, 0].astype(int)
    right = frames[:, 36, 96, 0].astype(int)
    return [round(r / 20) * 50 + round(v / 5) for v, r in zip(left, right, strict=True)]


def test_seek_decodes_only_the_clip(long_mp4):
    info = video.probe(long_mp4)
    assert info.num_frames == 600 and info.duration_s == pytest.approx(20.0)

    stats = DecodeStats()
    clip = video.decode_clip(long_mp4, start_s=10.0, num_frames=60, stats=stats)
    assert long_indices(clip) == list(range(300, 360))
    assert stats.seeks >= 1
    # One GOP (30 frames) of lead-in at most, plus the clip, plus frame-threading lookahead.
    assert stats.frames_decoded <= 30 + 60 + 20, stats
    assert stats.frames_decoded < info.num_frames / 4, stats

    full = DecodeStats()
    everything = video.decode_clip(long_mp4, stats=full)
    assert len(everything) == 600
    assert full.frames_decoded == 600 and full.seeks == 0
    np.testing.assert_array_equal(clip, everything[300:360])


def test_clip_reads_only_part_of_the_file(tmp_path, monkeypatch):
    # Noise does not compress, so the clip's bytes are a small, known share of the file.
    noise = np.random.default_rng(0).integers(0, 256, (300, 72, 128, 3), dtype=np.uint8)
    path = tmp_path / "noise.mp4"
    path.write_bytes(video.encode_mp4(noise, fps=30, gop=30, preset="ultrafast"))
    size = path.stat().st_size

    read = {"bytes": 0}

    class CountingFile(io.FileIO):
        def read(self, n=-1):
            data = super().read(n)
            read["bytes"] += len(data)
            return data

        def readinto(self, buffer):
            count = super().readinto(buffer)
            read["bytes"] += count or 0
            return count

    monkeypatch.setattr(video.storage, "open_read", lambda uri, **_: CountingFile(uri, "rb"))
    clip = video.decode_clip(str(path), start_s=5.0, num_frames=30)
    assert clip.shape == (30, 72, 128, 3)
    assert 0 < read["bytes"] < 0.25 * size, (read["bytes"], size)


def test_seek_with_resample_and_resize(long_mp4):
    stats = DecodeStats()
    clip = video.decode_clip(long_mp4, start_s=15.0, num_frames=16, fps=8, size=(32, 32), stats=stats)
    assert clip.shape == (16, 32, 32, 3)
    assert stats.frames_decoded < 150


# --------------------------------------------------------------------------------------------
# Geometry


@pytest.mark.parametrize(
    "shape, size",
    [
        ((2, 40, 120, 3), (32, 32)),  # wide source, square target: crop the sides
        ((2, 120, 40, 3), (32, 32)),  # tall source, square target: crop top and bottom
        ((1, 40, 60, 3), (90, 160)),  # upscale
        ((30, 20, 3), (10, 10)),  # HWC
        ((2, 30, 20, 1), (16, 16)),  # gray
    ],
)
def test_resize_center_crop_shapes(shape, size):
    frames = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    out = video.resize_center_crop(frames, *size)
    expected = (*shape[:-3], *size, shape[-1])
    assert out.shape == expected and out.dtype == np.uint8


def test_resize_center_crop_keeps_the_centre():
    # Wide: a white centre square between black side bands; a square crop keeps only white.
    wide = np.zeros((40, 120, 3), np.uint8)
    wide[:, 40:80] = 255
    # Equivalent to resize-then-crop: the filter's reach blends the outermost pixels slightly.
    out = video.resize_center_crop(wide, 20, 20)
    assert out[:, 1:-1].min() >= 250 and out.min() >= 200
    # Tall: the same, rotated.
    tall = np.zeros((120, 40, 3), np.uint8)
    tall[40:80] = 255
    out = video.resize_center_crop(tall, 20, 20)
    assert out[1:-1].min() >= 250 and out.min() >= 200
    # Same size: an unchanged copy.
    same = video.resize_center_crop(wide, 40, 120)
    assert same is not wide and np.array_equal(same, wide)
    with pytest.raises(ValueError):
        video.resize_center_crop(np.zeros((4, 4), np.uint8), 2, 2)


@pytest.mark.parametrize("src, size", [((48, 128), (32, 32)), ((128, 48), (32, 32)), ((48, 64), (60, 100))])
def test_decode_clip_resize(tmp_path, src, size):
    height, width = src
    frames = np.zeros((4, height, width, 3), np.uint8)
    # Centre band white, the rest black: after cover + centre crop only the band survives.
    if width > height:
        frames[:, :, (width - height) // 2 : (width + height) // 2] = 255
    else:
        frames[:, (height - width) // 2 : (height + width) // 2, :] = 255
    data = video.encode_mp4(frames, fps=10)
    clip = video.decode_clip(data, size=size)
    assert clip.shape == (4, *size, 3)
    if size[0] == size[1]:
        assert clip[:, 2:-2, 2:-2].min() >= 235


def test_display_rotation_is_applied(tmp_path):
    frames = np.zeros((3, 48, 64, 3), np.uint8)
    frames[:, :12, :12] = 255  # marker in the stored top-left corner
    path = tmp_path / "rotated.mp4"
    write_with_av(path, frames, 30, "mp4", "libx264", rotation=90)
    info = video.probe(str(path))
    assert (info.height, info.width) == (64, 48)
    clip = video.decode_clip(str(path))
    assert clip.shape == (3, 64, 48, 3)
    # 90 degrees counter-clockwise: the top-left corner ends up bottom-left.
    assert clip[0, -6, 6, 0] > 200 and clip[0, 6, 6, 0] < 50
    assert video.decode_clip(str(path), size=(32, 16)).shape == (3, 32, 16, 3)


# --------------------------------------------------------------------------------------------
# Containers


def test_mkv_probe_and_decode(tmp_path):
    path = tmp_path / "clip.mkv"
    write_with_av(path, ramp(60), 30, "matroska", "libx264", gop=30)
    info = video.probe(str(path))
    assert (info.codec, info.num_frames, info.width, info.height) == ("h264", 60, 64, 48)
    assert info.fps == pytest.approx(30) and info.duration_s == pytest.approx(2.0)
    assert indices(video.decode_clip(str(path))) == list(range(60))
    stats = DecodeStats()
    assert indices(video.decode_clip(str(path), start_s=1.2, num_frames=5, fps=15, stats=stats)) == [
        36,
        38,
        40,
        42,
        44,
    ]
    assert stats.seeks == 1


def test_webm_vp9_probe_and_decode(tmp_path):
    try:
        av.codec.Codec("libvpx-vp9", "w")
    except Exception:
        pytest.skip("PyAV's bundled FFmpeg has no libvpx-vp9 encoder")
    path = tmp_path / "clip.webm"
    write_with_av(path, ramp(30, 48, 64), 30, "webm", "libvpx-vp9", gop=15)
    info = video.probe(str(path))
    assert (info.codec, info.num_frames, info.width, info.height) == ("vp9", 30, 64, 48)
    assert info.duration_s == pytest.approx(1.0)
    clip = video.decode_clip(str(path))
    assert clip.shape == (30, 48, 64, 3)
    assert indices(clip) == list(range(30))
    assert indices(video.decode_clip(str(path), start_s=0.5, num_frames=4)) == [15, 16, 17, 18]


# --------------------------------------------------------------------------------------------
# Bad input


def test_missing_file(tmp_path):
    path = str(tmp_path / "nope.mp4")
    expect_error("missing", video.probe, path, name=path)
    expect_error("missing", video.decode_clip, path, name=path)
    expect_error("missing", video.read_image, str(tmp_path / "nope.png"), name=str(tmp_path / "nope.png"))


def test_empty_file(tmp_path):
    path = tmp_path / "empty.mp4"
    path.write_bytes(b"")
    expect_error("empty", video.probe, str(path), name=str(path))
    expect_error("empty", video.decode_clip, str(path), name=str(path))
    expect_error("empty", video.decode_clip, b"", uri="mem://empty", name="mem://empty")
    image = tmp_path / "empty.png"
    image.write_bytes(b"")
    expect_error("empty", video.read_image, str(image), name=str(image))


def test_text_file_is_not_video(tmp_path):
    path = tmp_path / "notes.mp4"
    path.write_text("this is a text file, not a video\n" * 50)
    expect_error("not_video", video.probe, str(path), name=str(path))
    expect_error("not_video", video.decode_clip, str(path), name=str(path))


def test_png_named_mp4_is_not_video(tmp_path):
    path = tmp_path / "still.mp4"
    path.write_bytes(video.encode_image(np.zeros((16, 16, 3), np.uint8), "png"))
    err = expect_error("not_video", video.decode_clip, str(path), name=str(path))
    assert "read_image" in err.reason


def test_truncated_mp4_without_index(tmp_path, ramp_mp4):
    # encode_mp4 writes moov last, so the first 40% has no index at all.
    path = tmp_path / "cut.mp4"
    path.write_bytes(ramp_mp4[: int(len(ramp_mp4) * 0.4)])
    err = expect_error("truncated", video.probe, str(path), name=str(path))
    assert "mdat" in err.reason or "moov" in err.reason
    expect_error("truncated", video.decode_clip, str(path), name=str(path))


def test_truncated_mp4_that_still_opens(tmp_path):
    # +faststart puts the index first: the cut file opens and declares 3 s, but the data stops.
    noise = np.random.default_rng(0).integers(0, 256, (90, 48, 64, 3), dtype=np.uint8)
    full = tmp_path / "full.mp4"
    write_with_av(full, noise, 30, "mp4", "libx264", options={"movflags": "+faststart"})
    data = full.read_bytes()
    path = tmp_path / "cut.mp4"
    path.write_bytes(data[: len(data) // 2])

    info = video.probe(str(path))  # metadata only: still reports the declared length
    assert info.num_frames == 90
    # The frames that exist decode ...
    assert video.decode_clip(str(path), num_frames=10).shape == (10, 48, 64, 3)
    # ... but a clip that runs into the missing half is "truncated", not "too_short".
    err = expect_error("truncated", video.decode_clip, str(path), num_frames=80, name=str(path))
    assert "3.000s" in err.reason
    expect_error("truncated", video.decode_clip, str(path), name=str(path))


def test_truncated_mkv(tmp_path):
    source = tmp_path / "full.mkv"
    noise = np.random.default_rng(1).integers(0, 256, (60, 48, 64, 3), dtype=np.uint8)
    write_with_av(source, noise, 30, "matroska", "libx264")
    data = source.read_bytes()
    path = tmp_path / "cut.mkv"
    path.write_bytes(data[: len(data) // 2])
    expect_error("truncated", video.decode_clip, str(path), name=str(path))
    # Cut inside the header: the container cannot even be opened.
    path.write_bytes(data[:200])
    expect_error("truncated", video.probe, str(path), name=str(path))


def test_corrupt_container_header_is_decode_failed(tmp_path):
    # Matroska magic followed by garbage: a recognised container that is broken, not cut short.
    junk = np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8).tobytes()
    path = tmp_path / "broken.mkv"
    path.write_bytes(b"\x1a\x45\xdf\xa3" + junk)
    expect_error("decode_failed", video.probe, str(path), name=str(path))
    expect_error("decode_failed", video.decode_clip, str(path), name=str(path))


def test_audio_only_has_no_video_stream(tmp_path):
    path = tmp_path / "audio.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("aac", rate=16000, layout="mono")
        tone = np.sin(np.arange(16000) * 0.05).astype(np.float32)[None]
        frame = av.AudioFrame.from_ndarray(tone, format="fltp", layout="mono")
        frame.sample_rate, frame.pts = 16000, 0
        container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    info = video.probe(str(path))
    assert (info.has_video, info.has_audio, info.num_frames, info.width) == (False, True, 0, 0)
    assert info.duration_s == pytest.approx(1.0, abs=0.1)
    err = expect_error("no_video_stream", video.decode_clip, str(path), name=str(path))
    assert "audio" in err.reason


def test_unknown_codec_is_unsupported(tmp_path):
    # An AVI whose fourcc names no codec FFmpeg knows: the stream exists but has no decoder.
    source = tmp_path / "ok.avi"
    write_with_av(source, ramp(10, 32, 32), 10, "avi", "mpeg4")
    data = source.read_bytes()
    assert data.count(b"FMP4") >= 1
    path = tmp_path / "weird.avi"
    path.write_bytes(data.replace(b"FMP4", b"ZQX9"))
    expect_error("unsupported_codec", video.probe, str(path), name=str(path))
    expect_error("unsupported_codec", video.decode_clip, str(path), name=str(path))


def test_too_short(ramp_mp4):
    err = expect_error("too_short", video.decode_clip, ramp_mp4, num_frames=61, name="<bytes>")
    assert "61" in err.reason and "60" in err.reason
    expect_error("too_short", video.decode_clip, ramp_mp4, start_s=1.5, num_frames=16)
    expect_error("too_short", video.decode_clip, ramp_mp4, num_frames=31, fps=15)
    expect_error(
        "too_short", video.decode_clip, ramp_mp4, start_s=5.0, uri="s3://b/k.mp4", name="s3://b/k.mp4"
    )
    # Exactly what exists is fine.
    assert video.decode_clip(ramp_mp4, start_s=1.5, num_frames=15).shape[0] == 15


@pytest.mark.parametrize(
    "kwargs", [{"start_s": -1}, {"num_frames": 0}, {"fps": 0}, {"size": (0, 4)}, {"size": (4,)}]
)
def test_bad_arguments_are_value_errors(ramp_mp4, kwargs):
    with pytest.raises(ValueError) as info:
        video.decode_clip(ramp_mp4, **kwargs)
    assert not isinstance(info.value, VideoDecodeError)


def test_error_pickles_and_is_a_value_error():
    err = VideoDecodeError("s3://b/k.mp4", "truncated", "data ends early")
    clone = pickle.loads(pickle.dumps(err))
    assert (clone.uri, clone.kind, clone.reason, str(clone)) == (err.uri, err.kind, err.reason, str(err))
    assert isinstance(err, ValueError)
    with pytest.raises(ValueError):
        VideoDecodeError("x", "no_such_kind", "y")


# --------------------------------------------------------------------------------------------
# Images


def gradient(height: int = 32, width: int = 48) -> np.ndarray:
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([x * 5, y * 7, (x + y) * 3], axis=-1).astype(np.uint8)


@pytest.mark.parametrize("fmt, tolerance", [("png", 0), ("jpg", 6), ("jpeg", 6), ("webp", 6)])
def test_image_roundtrip(tmp_path, fmt, tolerance):
    image = gradient()
    data = video.encode_image(image, fmt)
    path = tmp_path / f"img.{fmt}"
    path.write_bytes(data)
    for source in (str(path), data):
        decoded = video.read_image(source)
        assert decoded.shape == image.shape and decoded.dtype == np.uint8
        assert np.abs(decoded.astype(int) - image.astype(int)).mean() <= tolerance
    assert video.read_image(data, size=(16, 16)).shape == (16, 16, 3)
    assert video.is_image_uri(str(path))


def test_read_image_modes():
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., 3] = 0  # fully transparent: composited over white
    assert video.read_image(video.encode_image(rgba, "png")).min() == 255
    gray = np.full((8, 8), 77, np.uint8)
    out = video.read_image(video.encode_image(gray, "png"))
    assert out.shape == (8, 8, 3) and (out == 77).all()
    buffer = io.BytesIO()
    Image.fromarray(np.full((8, 8), 0x8000, np.uint16)).save(buffer, format="PNG")
    assert (video.read_image(buffer.getvalue()) == 128).all()


def test_bad_images(tmp_path):
    path = tmp_path / "fake.png"
    path.write_text("not an image")
    expect_error("bad_image", video.read_image, str(path), name=str(path))
    data = video.encode_image(gradient(64, 64), "png")
    path.write_bytes(data[: len(data) // 2])
    expect_error("bad_image", video.read_image, str(path), name=str(path))
    with pytest.raises(ValueError, match="format"):
        video.encode_image(gradient(), "gif")
    with pytest.raises(ValueError, match="alpha"):
        video.encode_image(np.zeros((4, 4, 4), np.uint8), "jpg")


def test_uri_suffixes():
    assert video.is_image_uri("s3://bucket/a/b.JPG")
    assert video.is_image_uri("/x/y.webp")
    assert not video.is_image_uri("s3://bucket/a/b.mp4")
    assert not video.is_image_uri("/x/png")
    for suffix in ("mp4", "mov", "mkv", "webm", "avi"):
        assert f".{suffix}" in video.VIDEO_SUFFIXES
        assert video.is_video_uri(f"s3://b/clip.{suffix}")


# --------------------------------------------------------------------------------------------
# Damage the decoder conceals


@pytest.fixture(scope="module")
def gop_clip() -> bytes:
    """48 frames at 12 fps, a keyframe every 12 frames."""
    return video.encode_mp4(synthetic.render(synthetic.random_scene(3), 48, 12.0, 128, 160), 12.0, gop=12)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_concealed_damage_is_a_corrupt_stream(gop_clip, seed):
    # A few flipped bytes mid-stream; one decoder thread, as the prep jobs decode (with frame
    # threads, whether FFmpeg conceals a damaged slice or gives up on it can vary from run to run).
    damaged = synthetic.damage_stream(gop_clip, seed, flips=4)
    stats = video.DecodeStats()
    frames = video.decode_clip(damaged, stats=stats, threads=1)  # no check: decoded, smeared
    assert len(frames) == 48 and stats.corrupt_frames > 0
    with pytest.raises(video.VideoDecodeError, match="concealed damaged data") as info:
        video.decode_clip(damaged, max_errors=0, uri="bitrot.mp4", threads=1)
    assert info.value.kind == "corrupt_stream" and str(info.value).startswith("bitrot.mp4: ")
    with pytest.raises(video.VideoDecodeError) as loader:
        video.decode_video_bytes(damaged)  # the training loader's default: none allowed
    assert loader.value.kind in ("corrupt_stream", "decode_failed")
    assert video.decode_clip(damaged, max_errors=stats.corrupt_frames, threads=1).shape == frames.shape


def test_the_check_is_per_clip(gop_clip):
    clean = video.DecodeStats()
    assert len(video.decode_clip(gop_clip, max_errors=0, stats=clean)) == 48 and clean.corrupt_frames == 0
    damaged = synthetic.damage_stream(gop_clip, 0, start=0.75, end=0.95, flips=4)  # the last GOP
    assert video.decode_clip(damaged, 0.0, 12, max_errors=0, threads=1).shape[0] == 12  # 1st second
    with pytest.raises(video.VideoDecodeError, match="corrupt_stream"):
        video.decode_clip(damaged, 3.0, 12, max_errors=0, threads=1)  # the last second
