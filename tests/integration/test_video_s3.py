"""Video I/O against object storage: encode, store on loopback S3 and locally, decode back."""

from __future__ import annotations

import numpy as np
import pytest

from sama import storage, synthetic, video

pytestmark = pytest.mark.integration


@pytest.fixture(params=["local", "s3"])
def prefix(request, tmp_path):
    return str(tmp_path) if request.param == "local" else request.getfixturevalue("s3_bucket")


def test_round_trip_and_seek_through_storage(prefix):
    frames = synthetic.render(synthetic.random_scene(3), 96, 24.0, 64, 96)  # 4 s at 24 fps
    uri = storage.join(prefix, "clips", "long.mp4")
    storage.write_bytes(uri, video.encode_mp4(frames, 24.0, gop=24))

    info = video.probe(uri)
    assert (info.num_frames, info.width, info.height) == (96, 96, 64)
    assert info.fps == pytest.approx(24.0)
    assert video.decode_clip(uri).shape == (96, 64, 96, 3)

    # A 1 s clip from the middle decodes about one GOP plus the clip, not the whole file.
    stats = video.DecodeStats()
    clip = video.decode_clip(uri, start_s=2.0, num_frames=24, stats=stats)
    assert clip.shape == (24, 64, 96, 3) and stats.seeks >= 1
    assert stats.frames_decoded < 60
    assert np.abs(clip.astype(float) - frames[48:72].astype(float)).mean() < 8
    # Resampled and resized on the way out.
    small = video.decode_clip(uri, start_s=1.0, num_frames=9, fps=8.0, size=(32, 32))
    assert small.shape == (9, 32, 32, 3)


def test_missing_object_is_a_typed_error_naming_the_uri(prefix):
    uri = storage.join(prefix, "nope.mp4")
    with pytest.raises(video.VideoDecodeError, match="nope.mp4") as caught:
        video.probe(uri)
    assert caught.value.kind == "missing"
