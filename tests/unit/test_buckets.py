from __future__ import annotations

import pytest

from sama.buckets import Bucket, BucketConfig, ceil_4k_plus_1, floor_4k_plus_1, is_4k_plus_1


def test_default_buckets_are_the_release_enumeration():
    # The authors' list (get_all_resolution(480 * 832, factor=32, min_ar=0.5, max_ar=2.0)), as
    # (width, height) pairs written out by hand.
    release = [
        (448, 896), (448, 864), (480, 832), (512, 800), (512, 768), (544, 736), (576, 704),
        (608, 672), (640, 640), (672, 608), (704, 576), (736, 544), (768, 512), (832, 480),
        (896, 448),
    ]  # fmt: skip
    assert [(b.width, b.height) for b in BucketConfig().buckets()] == release
    assert BucketConfig().nearest(1080, 1920) == Bucket(480, 832)  # 16:9 is no longer cropped to 2:1
    assert BucketConfig().nearest(144, 176) == Bucket(576, 704)


def test_release_preset_picks_by_absolute_aspect_difference():
    # Aspect 1.5 lies between 736/544 = 1.353 and 768/512 = 1.5: exact; 1.45 is 0.097 from 1.353
    # and 0.05 from 1.5 (absolute), the release's rule.
    assert BucketConfig().nearest(1000, 1450) == Bucket(512, 768)
    # Aspect 0.50922 lies between 0.5 (896x448) and 0.51852 (864x448): 0.00922 vs 0.00930 apart
    # in absolute terms (-> 896x448), but nearer 0.51852 in log terms (the paper preset's rule).
    assert BucketConfig().nearest(100000, 50922) == Bucket(896, 448)


def test_paper_buckets_are_sama_480p():
    buckets = BucketConfig(preset="paper").buckets()
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
def test_nearest_paper_bucket(size, ratio):
    assert BucketConfig(preset="paper").nearest(*size) == Bucket(*ratio)


def test_bucket_names_round_trip():
    b = Bucket(480, 832)
    assert b.name == "480x832" and "." not in b.name
    assert Bucket.parse(b.name) == b
    with pytest.raises(ValueError, match="HEIGHTxWIDTH"):
        Bucket.parse("480-832")


def test_bad_bucket_config():
    with pytest.raises(ValueError, match="W:H"):
        BucketConfig(preset="paper", aspect_ratios=["wide"]).buckets()
    with pytest.raises(ValueError, match='preset="paper"'):
        BucketConfig(aspect_ratios=["4:3"]).buckets()
    with pytest.raises(ValueError, match="preset"):
        BucketConfig(preset="square").buckets()
    with pytest.raises(ValueError, match="even"):
        BucketConfig(multiple=3).buckets()
    with pytest.raises(ValueError, match="size 0x10"):
        BucketConfig().nearest(0, 10)


def test_4k_plus_1_rules():
    assert [n for n in range(1, 20) if is_4k_plus_1(n)] == [1, 5, 9, 13, 17]
    assert floor_4k_plus_1(49) == 49 and floor_4k_plus_1(48) == 45 and floor_4k_plus_1(0) == 0
    assert ceil_4k_plus_1(30) == 33 and ceil_4k_plus_1(33) == 33 and ceil_4k_plus_1(1) == 1
