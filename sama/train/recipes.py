"""Named training recipes: ``configs/train_<name>.toml``."""

from __future__ import annotations

import os

from sama.config import ConfigError

CONFIG_DIR = os.path.join(
    os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "configs"
)


def available() -> list[str]:
    if not os.path.isdir(CONFIG_DIR):
        return []
    names = [f[len("train_") : -len(".toml")] for f in os.listdir(CONFIG_DIR) if f.startswith("train_")]
    return sorted(n for n in names if n)


def recipe_path(recipe: str) -> str:
    """A recipe file: ``recipe`` itself when it is a file, else ``configs/train_<recipe>.toml``."""
    if os.path.isfile(recipe):
        return recipe
    path = os.path.join(CONFIG_DIR, f"train_{recipe}.toml")
    if not os.path.isfile(path):
        raise ConfigError(f"unknown recipe {recipe!r}: not a file, and not one of {', '.join(available())}")
    return path
