from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import pytest
import yaml

from sama import config
from sama.config import ConfigError


@dataclass
class Optim:
    lr: float = 2e-5
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_frac: float = 0.1


@dataclass
class Data:
    shards: list[str] = field(default_factory=list)
    batch_size: int = 4
    shuffle: bool = True
    weights: dict[str, float] = field(default_factory=dict)
    mode: Literal["video", "image", "mixed"] = "mixed"
    limit: int | None = None


@dataclass
class Root:
    name: str = "run"
    seed: int = 0
    optim: Optim = field(default_factory=Optim)
    data: Data = field(default_factory=Data)

    def validate(self) -> None:
        if self.data.batch_size < 1:
            raise ConfigError("data.batch_size must be >= 1")


def test_defaults_then_file_then_overrides(tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text('name = "exp"\n[optim]\nlr = 1e-4\n[data]\nshards = ["a", "b"]\nbatch_size = 8\n')
    cfg = config.load(Root, recipe, ["data.batch_size=16", "optim.betas=0.8,0.95", "data.limit=none"])
    assert cfg.name == "exp"
    assert cfg.optim.lr == pytest.approx(1e-4)
    assert cfg.optim.betas == (0.8, 0.95)
    assert cfg.optim.warmup_frac == pytest.approx(0.1)  # default survives
    assert cfg.data.shards == ["a", "b"]
    assert cfg.data.batch_size == 16
    assert cfg.data.limit is None


def test_yaml_recipe_and_typed_overrides(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("seed: 3\ndata:\n  mode: video\n  weights: {pretext: 0.7, image: 0.3}\n")
    cfg = config.load(
        Root,
        recipe,
        ["data.shuffle=false", 'data.shards=["s3://b/x", "s3://b/y"]', 'data.weights={"a": 1}', "seed=7"],
    )
    assert cfg.seed == 7
    assert cfg.data.mode == "video"
    assert cfg.data.shuffle is False
    assert cfg.data.shards == ["s3://b/x", "s3://b/y"]
    assert cfg.data.weights == {"a": 1.0}


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("data.batchsize=3", "unknown config key data.batchsize"),
        ("nope=1", "unknown config key nope"),
        ("data.batch_size=three", "data.batch_size: expected an integer"),
        ("data.shuffle=maybe", "data.shuffle: expected a boolean"),
        ("optim.lr=fast", "optim.lr: expected a number"),
        ("data.mode=audio", "data.mode: must be one of"),
        ("optim=3", "optim: is a section"),
        ("optim.betas=1,2,3", "optim.betas: expected 2"),
        ("seed", "must look like key.path=value"),
        ("name.first=x", "is a value, not a section"),
        ("data.batch_size=0", "data.batch_size must be >= 1"),
    ],
)
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.").replace("(", r"\(")):
        config.load(Root, None, [override])


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[optim]\nlr = 'fast'\n", "optim.lr: expected a number"),
        ("[optim]\nlrr = 1.0\n", "unknown config key optim.lrr"),
        ("[data]\nshards = 'a'\n", "data.shards: expected a list"),
        ("[data]\nshards = [1]\n", r"data.shards\[0\]: expected a string"),
        ("seed = true\n", "seed: expected an integer"),
        ("optim = 1\n", "optim: expected a section"),
    ],
)
def test_bad_recipe_values_name_the_key(tmp_path, text, message):
    recipe = tmp_path / "bad.toml"
    recipe.write_text(text)
    with pytest.raises(ConfigError, match=message):
        config.load(Root, recipe)


def test_unreadable_or_malformed_recipe(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config file"):
        config.load(Root, tmp_path / "missing.toml")
    broken = tmp_path / "broken.toml"
    broken.write_text("[optim\nlr=1")
    with pytest.raises(ConfigError, match="broken.toml is not valid"):
        config.load(Root, broken)
    other = tmp_path / "x.ini"
    other.write_text("a=1")
    with pytest.raises(ConfigError, match="unknown format"):
        config.load(Root, other)


def test_dump_save_and_reload_round_trip(tmp_path):
    cfg = config.load(Root, None, ["data.shards=a,b", "optim.lr=0.5", "data.limit=10"])
    path = tmp_path / "resolved.yaml"
    config.save(cfg, str(path))
    assert yaml.safe_load(path.read_text())["optim"]["lr"] == 0.5
    assert config.load(Root, path) == cfg
    flat = config.flatten(cfg)
    assert flat["optim.lr"] == 0.5
    assert flat["data.shards"] == ["a", "b"]
    assert flat["data.limit"] == 10
