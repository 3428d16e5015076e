"""Unit tests for sama.prep.inputs: listing raw videos, captions and grouping into work units."""

from __future__ import annotations

import io
import json
import os
import tarfile

import pytest

from sama import storage, synthetic, video
from sama.prep import inputs
from sama.prep.inputs import InputConfig, VideoInput, WorkUnit

# Tiny real videos (8 fps, 3 s = 24 frames) for the tar tests; listing never reads video bytes.
VIDEO_SIZES = [(64, 96), (128, 160), (96, 128)]


def touch(path, data: bytes = b"x") -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as handle:
        handle.write(data)
    return str(path)


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="module")
def raw_videos(tmp_path_factory) -> list[str]:
    root = tmp_path_factory.mktemp("raw")
    return synthetic.write_raw_videos(str(root), 3, seed=5, fps=8.0, seconds=3.0, sizes=VIDEO_SIZES)


# --------------------------------------------------------------------------------------------
# Grouping and unit ids


def test_list_units_groups_sorted_uris_into_units_with_deterministic_ids(tmp_path):
    names = ["c.mp4", "a.mp4", "b.mov", "e.mkv", "d.webm", "F.MP4"]
    for name in names:
        touch(tmp_path / name)
    touch(tmp_path / "notes.md")
    touch(tmp_path / "thumb.jpg")
    touch(tmp_path / "sub" / "g.mp4")
    cfg = InputConfig(uri=str(tmp_path), videos_per_unit=3)
    units, skipped = inputs.list_units(cfg)
    assert skipped == 0
    expected = sorted(str(tmp_path / n) for n in [*names, "sub/g.mp4"])
    # Sorted by URI ("F.MP4" sorts before lower case; the sub-folder is listed recursively).
    assert [v.input_id for u in units for v in u.videos] == expected
    assert [len(u.videos) for u in units] == [3, 3, 1]
    for unit in units:
        assert unit.tar_uri is None
        assert unit.input_ids == [v.input_id for v in unit.videos]
        assert unit.unit_id == inputs.unit_id_for(unit.input_ids)
        assert len(unit.unit_id) == 32 and all(c in "0123456789abcdef" for c in unit.unit_id)
    assert len({u.unit_id for u in units}) == 3
    # Same input -> same ids.
    again, _ = inputs.list_units(InputConfig(uri=str(tmp_path), videos_per_unit=3))
    assert [u.unit_id for u in again] == [u.unit_id for u in units]
    assert [u.to_json() for u in again] == [u.to_json() for u in units]
    # Different membership -> different id (the first unit gains/loses a member).
    two, _ = inputs.list_units(InputConfig(uri=str(tmp_path), videos_per_unit=2))
    assert two[0].input_ids == expected[:2]
    assert two[0].unit_id != units[0].unit_id
    assert two[0].unit_id == inputs.unit_id_for(expected[:2])


def test_unit_id_depends_on_the_set_of_inputs_only():
    a = inputs.unit_id_for(["/x/a.mp4", "/x/b.mp4"])
    assert a == inputs.unit_id_for(["/x/b.mp4", "/x/a.mp4"])
    assert a != inputs.unit_id_for(["/x/a.mp4"])
    assert a != inputs.unit_id_for(["/x/a.mp4", "/x/c.mp4"])
    assert "." not in a and "-" not in a


def test_suffixes_filter_is_case_insensitive(tmp_path):
    for name in ["a.mp4", "b.MP4", "c.mov", "d.webm"]:
        touch(tmp_path / name)
    units, _ = inputs.list_units(InputConfig(uri=str(tmp_path), suffixes=[".MP4"]))
    assert [v.input_id for v in units[0].videos] == [str(tmp_path / "a.mp4"), str(tmp_path / "b.MP4")]


def test_done_inputs_are_skipped_and_counted(tmp_path):
    for name in ["a.mp4", "b.mp4", "c.mp4", "d.mp4", "e.mp4", "t.tar"]:
        touch(tmp_path / name)
    uri = {n: str(tmp_path / n) for n in ["a.mp4", "b.mp4", "c.mp4", "d.mp4", "e.mp4", "t.tar"]}
    done = {uri["a.mp4"], uri["c.mp4"], uri["t.tar"], str(tmp_path / "not-listed.mp4")}
    units, skipped = inputs.list_units(InputConfig(uri=str(tmp_path), videos_per_unit=2), done)
    assert skipped == 3  # only listed inputs count
    assert [u.input_ids for u in units] == [[uri["b.mp4"], uri["d.mp4"]], [uri["e.mp4"]]]
    assert units[0].unit_id == inputs.unit_id_for([uri["b.mp4"], uri["d.mp4"]])


def test_input_config_validate():
    with pytest.raises(ValueError, match="videos_per_unit"):
        InputConfig(uri="/x", videos_per_unit=0).validate()
    with pytest.raises(ValueError, match="suffixes"):
        InputConfig(uri="/x", suffixes=[]).validate()


def test_missing_input_prefix_raises_storage_error_naming_it(tmp_path):
    missing = str(tmp_path / "nowhere")
    with pytest.raises(storage.StorageError, match="nowhere") as info:
        inputs.list_units(InputConfig(uri=missing))
    assert info.value.uri == missing
    # An existing but empty prefix is not an error: there is just nothing to do.
    (tmp_path / "empty").mkdir()
    assert inputs.list_units(InputConfig(uri=str(tmp_path / "empty"))) == ([], 0)


# --------------------------------------------------------------------------------------------
# Captions


def test_sidecar_captions_are_found_while_listing_and_read_lazily(tmp_path):
    touch(tmp_path / "a.mp4")
    touch(tmp_path / "a.txt", b"  a red ball bounces \n")
    touch(tmp_path / "b.mp4")
    touch(tmp_path / "b.json", json.dumps({"caption": " a blue square "}).encode())
    touch(tmp_path / "c.mp4")
    touch(tmp_path / "d.mp4")
    touch(tmp_path / "d.txt", b"from txt")
    touch(tmp_path / "d.json", json.dumps({"caption": "from json"}).encode())
    units, _ = inputs.list_units(InputConfig(uri=str(tmp_path)))
    (unit,) = units
    by_name = {os.path.basename(v.input_id): v for v in unit.videos}
    assert sorted(by_name) == ["a.mp4", "b.mp4", "c.mp4", "d.mp4"]
    # Listing only records where the caption is; nothing is read yet.
    assert by_name["a.mp4"].caption == "" and by_name["a.mp4"].caption_uri == str(tmp_path / "a.txt")
    assert by_name["b.mp4"].caption == "" and by_name["b.mp4"].caption_uri == str(tmp_path / "b.json")
    assert by_name["c.mp4"].caption == "" and by_name["c.mp4"].caption_uri is None
    assert by_name["d.mp4"].caption_uri == str(tmp_path / "d.txt")  # .txt before .json
    # Lazy: a sidecar changed after listing is read as it is when the worker resolves it.
    touch(tmp_path / "a.txt", b"  a red ball rolls \n")
    assert by_name["a.mp4"].resolve_caption() == "a red ball rolls"
    assert by_name["a.mp4"].caption == "a red ball rolls" and by_name["a.mp4"].caption_uri is None
    assert by_name["b.mp4"].resolve_caption() == "a blue square"
    assert by_name["c.mp4"].resolve_caption() == ""
    assert by_name["d.mp4"].resolve_caption() == "from txt"
    # Resolved once: the sidecar is not read again.
    os.remove(tmp_path / "a.txt")
    assert by_name["a.mp4"].resolve_caption() == "a red ball rolls"


def test_resolve_caption_keeps_an_explicit_caption(tmp_path):
    item = VideoInput("/x/a.mp4", caption="given", caption_uri=str(tmp_path / "missing.txt"))
    assert item.resolve_caption() == "given"


@pytest.mark.parametrize(
    ("data", "suffix", "expected"),
    [
        (b"  plain text \n", ".txt", "plain text"),
        (b'{"caption": " c "}', ".json", "c"),
        (b'{"text": "t"}', ".json", "t"),
        (b'{"prompt": "p", "description": "d"}', ".json", "p"),
        (b'{"description": "d"}', ".json", "d"),
        (b'{"caption": 5, "text": "fallback"}', ".json", "fallback"),
        (b'"a json string"', ".json", "a json string"),
        (b'{"other": "x"}', ".json", ""),
        (b"[1, 2]", ".json", ""),
        (b"not json {", ".json", ""),
        (b"", ".txt", ""),
        ("caf\u00e9".encode(), ".txt", "caf\u00e9"),
    ],
)
def test_parse_caption(data, suffix, expected):
    assert inputs.parse_caption(data, suffix) == expected


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
def test_caption_manifest_relative_and_absolute_paths_win_over_sidecars(tmp_path, fmt):
    videos = tmp_path / "videos"
    for name in ["a.mp4", "b.mp4", "c.mp4", "d.mp4"]:
        touch(videos / name)
    touch(videos / "a.txt", b"sidecar a")
    touch(videos / "c.txt", b"sidecar c")
    # The manifest lives in another folder: relative paths resolve against the manifest's folder.
    manifest = str(tmp_path / "meta" / f"captions.{fmt}")
    os.makedirs(os.path.dirname(manifest))
    rows = [
        {"path": "../videos/a.mp4", "caption": " manifest a "},
        {"path": str(videos / "b.mp4"), "caption": "manifest b"},
        {"path": "../videos/./nothere.mp4", "caption": "ignored"},
    ]
    synthetic.write_manifest(rows, manifest, format=fmt)
    assert inputs.load_caption_manifest(InputConfig(uri=str(videos), captions_manifest=manifest)) == {
        str(videos / "a.mp4"): "manifest a",
        str(videos / "b.mp4"): "manifest b",
        str(videos / "nothere.mp4"): "ignored",
    }
    units, _ = inputs.list_units(InputConfig(uri=str(videos), captions_manifest=manifest))
    got = {os.path.basename(v.input_id): (v.caption, v.caption_uri) for v in units[0].videos}
    assert got == {
        "a.mp4": ("manifest a", None),  # the manifest wins over the sidecar
        "b.mp4": ("manifest b", None),
        "c.mp4": ("", str(videos / "c.txt")),  # not in the manifest: the sidecar
        "d.mp4": ("", None),  # no caption anywhere
    }
    assert [v.resolve_caption() for v in units[0].videos] == ["manifest a", "manifest b", "sidecar c", ""]


def test_caption_manifest_custom_columns_and_file_uri(tmp_path):
    touch(tmp_path / "v" / "a.mp4")
    touch(tmp_path / "v" / "b.mp4")
    manifest = str(tmp_path / "v" / "caps.jsonl")
    rows = [{"file": "a.mp4", "text": "cap a"}, {"file": f"file://{tmp_path}/v/b.mp4", "text": None}]
    synthetic.write_manifest(rows, manifest)
    cfg = InputConfig(
        uri=str(tmp_path / "v"),
        captions_manifest=manifest,
        manifest_path_column="file",
        manifest_caption_column="text",
    )
    units, _ = inputs.list_units(cfg)
    assert [(v.caption, v.caption_uri) for v in units[0].videos] == [("cap a", None), ("", None)]


def test_caption_manifest_without_the_path_column_names_the_manifest(tmp_path):
    touch(tmp_path / "v" / "a.mp4")
    manifest = str(tmp_path / "caps.csv")
    synthetic.write_manifest([{"video": "v/a.mp4", "caption": "c"}], manifest)
    with pytest.raises(ValueError, match=r"caps\.csv.*'path'"):
        inputs.list_units(InputConfig(uri=str(tmp_path / "v"), captions_manifest=manifest))


def test_resolve_relative():
    assert inputs.resolve_relative("a/b.mp4", "/data/meta/m.csv") == "/data/meta/a/b.mp4"
    assert inputs.resolve_relative("../v/b.mp4", "/data/meta/m.csv") == "/data/v/b.mp4"
    assert inputs.resolve_relative("/abs/x.mp4", "/data/meta/m.csv") == "/abs/x.mp4"
    assert inputs.resolve_relative("file:///abs/x.mp4", "/data/m.csv") == "/abs/x.mp4"
    assert inputs.resolve_relative("v/x.mp4", "s3://bucket/meta/m.csv") == "s3://bucket/meta/v/x.mp4"
    assert inputs.resolve_relative("s3://other/x.mp4", "s3://bucket/m.csv") == "s3://other/x.mp4"


# --------------------------------------------------------------------------------------------
# read_table


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
def test_read_table_rows(tmp_path, fmt):
    uri = str(tmp_path / f"t.{fmt}")
    synthetic.write_manifest([{"path": "a.mp4", "caption": "x"}, {"path": "b.mp4", "caption": "y"}], uri)
    assert inputs.read_table(uri) == [{"path": "a.mp4", "caption": "x"}, {"path": "b.mp4", "caption": "y"}]


def test_read_table_errors_name_the_file(tmp_path):
    bad_jsonl = touch(tmp_path / "bad.jsonl", b'{"path": "a.mp4"}\n\nnot json\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl: line 3 is not valid JSON"):
        inputs.read_table(bad_jsonl)
    odd = touch(tmp_path / "table.xlsx", b"x")
    with pytest.raises(ValueError, match=r"table\.xlsx: unsupported table format '\.xlsx'"):
        inputs.read_table(odd)
    with pytest.raises(storage.StorageError, match=r"missing\.csv: no such file"):
        inputs.read_table(str(tmp_path / "missing.csv"))
    with pytest.raises(storage.StorageError, match=r"missing\.parquet: no such file"):
        inputs.read_table(str(tmp_path / "missing.parquet"))


def test_read_table_corrupt_parquet_names_the_file(tmp_path):
    corrupt = touch(tmp_path / "corrupt.parquet", b"this is not parquet at all")
    with pytest.raises(ValueError, match=r"corrupt\.parquet: not a readable parquet file"):
        inputs.read_table(corrupt)


# --------------------------------------------------------------------------------------------
# Tar inputs


def test_each_tar_is_a_unit_of_its_own(tmp_path):
    for name in ["b.tar", "a.tar", "x.mp4", "y.mp4", "z.mp4"]:
        touch(tmp_path / name)
    units, _ = inputs.list_units(InputConfig(uri=str(tmp_path), videos_per_unit=2))
    assert [u.input_ids for u in units] == [
        [str(tmp_path / "x.mp4"), str(tmp_path / "y.mp4")],
        [str(tmp_path / "z.mp4")],
        [str(tmp_path / "a.tar")],
        [str(tmp_path / "b.tar")],
    ]
    for unit in units[2:]:
        assert unit.videos == [] and unit.tar_uri == unit.input_ids[0]
        assert unit.unit_id == inputs.unit_id_for([unit.tar_uri])
    assert len({u.unit_id for u in units}) == 4


def test_iter_tar_videos_pairs_captions_before_or_after_and_spools_members(tmp_path, raw_videos):
    data = [open(u, "rb").read() for u in raw_videos]
    tar_uri = str(tmp_path / "shard.tar")
    with tarfile.open(tar_uri, "w") as tar:
        add_member(tar, "k1.txt", b" caption one \n")  # caption before its video
        add_member(tar, "k1.mp4", data[0])
        add_member(tar, "dir/k2.mp4", data[1])
        add_member(tar, "dir/k2.json", json.dumps({"caption": "caption two"}).encode())  # after
        add_member(tar, "readme.md", b"not a video")
        add_member(tar, "k3.jpg", b"\xff\xd8 not a video either")
        add_member(tar, "k4.MP4", data[2])  # no caption
        add_member(tar, "k5.txt", b"a caption without a video")
    seen = []
    previous_path = None
    for item, path in inputs.iter_tar_videos(tar_uri, (".mp4",)):
        if previous_path is not None:
            assert not os.path.exists(previous_path)  # the previous spool file is gone
        assert os.path.isfile(path) and path != tar_uri
        info = video.probe(path, uri=item.input_id)
        seen.append((item.input_id, item.caption, item.caption_uri, info.height, info.width, info.num_frames))
        previous_path = path
    assert not os.path.exists(previous_path)
    (h0, w0), (h1, w1), (h2, w2) = VIDEO_SIZES
    assert seen == [
        (f"{tar_uri}#k1.mp4", "caption one", None, h0, w0, 24),
        (f"{tar_uri}#dir/k2.mp4", "caption two", None, h1, w1, 24),
        (f"{tar_uri}#k4.MP4", "", None, h2, w2, 24),
    ]


def test_iter_tar_videos_spooled_member_is_the_members_bytes(tmp_path, raw_videos):
    data = open(raw_videos[0], "rb").read()
    tar_uri = str(tmp_path / "one.tar")
    with tarfile.open(tar_uri, "w") as tar:
        add_member(tar, "clip.mov", data)
        add_member(tar, "clip.txt", b"c")
    (item, path), *rest = [(i, open(p, "rb").read()) for i, p in inputs.iter_tar_videos(tar_uri, (".mov",))]
    assert rest == []
    assert item.input_id == f"{tar_uri}#clip.mov" and item.caption == "c"
    assert path == data
    # With only .mp4 accepted, the .mov member is not a video.
    assert list(inputs.iter_tar_videos(tar_uri, (".mp4",))) == []


def test_iter_tar_videos_corrupt_tar_raises_tar_error(tmp_path):
    corrupt = touch(tmp_path / "corrupt.tar", b"not a tar file " * 100)
    with pytest.raises(tarfile.TarError):
        list(inputs.iter_tar_videos(corrupt, (".mp4",)))


# --------------------------------------------------------------------------------------------
# Serialisation


def test_work_unit_json_round_trip():
    unit = WorkUnit(
        unit_id=inputs.unit_id_for(["/d/a.mp4", "/d/b.mp4"]),
        videos=[
            VideoInput("/d/a.mp4", caption="cap \u00e9", caption_uri=None),
            VideoInput("/d/b.mp4", caption="", caption_uri="/d/b.json"),
        ],
    )
    back = WorkUnit.from_json(unit.to_json())
    assert back == unit
    assert all(isinstance(v, VideoInput) for v in back.videos)
    assert back.input_ids == ["/d/a.mp4", "/d/b.mp4"]
    tar_unit = WorkUnit(unit_id=inputs.unit_id_for(["s3://b/x.tar"]), tar_uri="s3://b/x.tar")
    tar_back = WorkUnit.from_json(tar_unit.to_json())
    assert tar_back == tar_unit and tar_back.input_ids == ["s3://b/x.tar"] and tar_back.videos == []
    # Listing output survives the round trip (what the pipeline ships to workers).
    assert json.loads(unit.to_json())["videos"][1] == {
        "input_id": "/d/b.mp4",
        "caption": "",
        "caption_uri": "/d/b.json",
    }
