from __future__ import annotations

import pytest

from sama.buckets import Bucket, BucketConfig, ceil_4k_plus_1, floor_4k_plus_1, is_4k_plus_1


def test_default_buckets_are_sama_480p():
    buckets = BucketConfig().buckets()
    assert len(buckets) == 7
    for b in buckets:
        assert b.height % 32 == 0 and b.width % 32 == 0
        # Every bucket keeps about the 480x832 pixel budget.
        assert abs(b.height * b.width / (480 * 832) - 1) < 0.08
    aspects = [b.aspect for b in buckets]
    assert aspects == sorted(aspects)
    assert pytest.approx(aspects[0], rel=0.05) == 0.5 and pytest.approx(aspects[-1], rel=0.05) == 2.0


@pytest.mark.parametrize(
    ("size", "ratio"),
    [
        ((720, 1280), (448, 896)),
        ((1080, 1080), (640, 640)),
        ((1280, 720), (896, 448)),
        ((480, 640), (544, 736)),
    ],
)
def test_nearest_bucket(size, ratio):
    assert BucketConfig().nearest(*size) == Bucket(*ratio)


def test_bucket_names_round_trip():
    b = Bucket(480, 832)
    assert b.name == "480x832" and "." not in b.name
    assert Bucket.parse(b.name) == b
    with pytest.raises(ValueError, match="HEIGHTxWIDTH"):
        Bucket.parse("480-832")


def test_bad_bucket_config():
    with pytest.raises(ValueError, match="W:H"):
        BucketConfig(aspect_ratios=["wide"]).buckets()
    with pytest.raises(ValueError, match="even"):
        BucketConfig(multiple=3).buckets()
    with pytest.raises(ValueError, match="size 0x10"):
        BucketConfig().nearest(0, 10)


def test_4k_plus_1_rules():
    assert [n for n in range(1, 20) if is_4k_plus_1(n)] == [1, 5, 9, 13, 17]
    assert floor_4k_plus_1(49) == 49 and floor_4k_plus_1(48) == 45 and floor_4k_plus_1(0) == 0
    assert ceil_4k_plus_1(30) == 33 and ceil_4k_plus_1(33) == 33 and ceil_4k_plus_1(1) == 1
