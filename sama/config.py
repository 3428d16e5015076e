"""Typed configuration: nested dataclasses, recipe files (TOML or YAML) and ``--set a.b=c`` overrides.

Each component owns a ``@dataclass`` config; a job's root config nests them. A configuration is
resolved in three layers: the dataclass defaults, then a recipe file, then ``--set`` overrides in
order. Every layer is checked against the dataclass types: an unknown key or a value of the wrong
type is a :class:`ConfigError` naming the full dotted key. The resolved configuration can be dumped
(YAML, since TOML has no null) next to a job's outputs and logged to experiment tracking.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tomllib
import types
from collections.abc import Iterable, Mapping
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

T = TypeVar("T")

_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}
_NONE = {"none", "null", "~"}


class ConfigError(ValueError):
    """A configuration value or key is invalid; the message names the dotted key."""


def _type_name(tp: Any) -> str:
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _is_optional(tp: Any) -> tuple[bool, Any]:
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) != len(get_args(tp)):
            inner = args[0] if len(args) == 1 else Union[tuple(args)]  # noqa: UP007
            return True, inner
    return False, tp


def _field_types(cls: type) -> dict[str, Any]:
    hints = get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init}


def _parse_text(key: str, text: str, tp: Any) -> Any:
    """Turn the string of a ``--set`` override into a value of type ``tp``."""
    optional, inner = _is_optional(tp)
    if optional and text.strip().lower() in _NONE:
        return None
    tp = inner
    origin = get_origin(tp)
    if tp is str:
        return text
    if tp is bool:
        lowered = text.strip().lower()
        if lowered in _TRUE:
            return True
        if lowered in _FALSE:
            return False
        raise ConfigError(f"{key}: expected a boolean (true/false), got {text!r}")
    if tp is int:
        try:
            return int(text)
        except ValueError:
            raise ConfigError(f"{key}: expected an integer, got {text!r}") from None
    if tp is float:
        try:
            return float(text)
        except ValueError:
            raise ConfigError(f"{key}: expected a number, got {text!r}") from None
    if origin is Literal:
        return _check_value(key, text, tp)
    if origin in (list, tuple, dict) or tp in (list, tuple, dict):
        stripped = text.strip()
        if stripped.startswith(("[", "{")):
            try:
                raw = json.loads(stripped)
            except json.JSONDecodeError:
                try:
                    raw = tomllib.loads(f"v = {stripped}")["v"]
                except tomllib.TOMLDecodeError:
                    raise ConfigError(f"{key}: cannot parse {text!r} as {_type_name(tp)}") from None
        elif origin is dict or tp is dict:
            raise ConfigError(f'{key}: expected a JSON object like {{"a": 1}}, got {text!r}')
        else:
            raw = [] if not stripped else [part.strip() for part in stripped.split(",")]
            args = get_args(tp)
            elem = args[0] if args else str
            if origin is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
                if len(raw) != len(args):
                    raise ConfigError(f"{key}: expected {len(args)} comma-separated values, got {text!r}")
                return tuple(
                    _parse_text(f"{key}[{i}]", v, a) for i, (v, a) in enumerate(zip(raw, args, strict=True))
                )
            parsed = [_parse_text(f"{key}[{i}]", v, elem) for i, v in enumerate(raw)]
            return tuple(parsed) if origin is tuple else parsed
        return _check_value(key, raw, tp)
    if dataclasses.is_dataclass(tp):
        raise ConfigError(
            f"{key}: is a section ({tp.__name__}); set one of its fields, e.g. {key}.<field>=..."
        )
    # Unknown annotation: accept YAML scalars as a last resort.
    return yaml.safe_load(text)


def _check_value(key: str, value: Any, tp: Any) -> Any:
    """Check (and lightly coerce) ``value`` loaded from a file against the annotation ``tp``."""
    optional, inner = _is_optional(tp)
    if value is None:
        if optional or tp is Any:
            return None
        raise ConfigError(f"{key}: may not be null (expected {_type_name(tp)})")
    tp = inner
    origin = get_origin(tp)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a section (table) for {tp.__name__}, got {value!r}")
        return from_dict(tp, value, prefix=key)
    if origin is Literal:
        allowed = get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{key}: must be one of {list(allowed)}, got {value!r}")
        return value
    if origin in (Union, types.UnionType):
        errors = []
        for arg in get_args(tp):
            try:
                return _check_value(key, value, arg)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(f"{key}: {value!r} matches none of {_type_name(tp)}")
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected a boolean, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    if origin in (list, tuple) or tp in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        args = get_args(tp)
        if origin is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
            if len(value) != len(args):
                raise ConfigError(f"{key}: expected {len(args)} items, got {len(value)}")
            return tuple(
                _check_value(f"{key}[{i}]", v, a) for i, (v, a) in enumerate(zip(value, args, strict=True))
            )
        elem = args[0] if args else Any
        items = [_check_value(f"{key}[{i}]", v, elem) for i, v in enumerate(value)]
        return tuple(items) if (origin is tuple or tp is tuple) else items
    if origin is dict or tp is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        args = get_args(tp)
        value_type = args[1] if len(args) == 2 else Any
        return {str(k): _check_value(f"{key}.{k}", v, value_type) for k, v in value.items()}
    if isinstance(tp, type) and not isinstance(value, tp):
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    return value


def from_dict(cls: type[T], data: Mapping[str, Any], prefix: str = "") -> T:
    """Build ``cls`` from a (nested) mapping, checking every key and type.

    Missing keys take the dataclass defaults; unknown keys raise :class:`ConfigError`.
    """
    if not isinstance(data, Mapping):
        raise ConfigError(f"{prefix or '<root>'}: expected a table/mapping, got {data!r}")
    fields = _field_types(cls)
    unknown = sorted(set(data) - set(fields))
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(
            f"unknown config key {where}{unknown[0]!s} (valid keys of {prefix or cls.__name__}: "
            f"{', '.join(sorted(fields))})"
        )
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else name
        kwargs[name] = _check_value(key, value, fields[name])
    try:
        obj = cls(**kwargs)
    except TypeError as exc:  # a required field without default was not given
        raise ConfigError(f"{prefix or cls.__name__}: {exc}") from None
    return obj


def to_dict(obj: Any) -> Any:
    """A plain nested dict/list/scalar view of a config (tuples become lists)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, Mapping):
        return {str(k): to_dict(v) for k, v in obj.items()}
    return obj


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a.b.c": value}`` for every leaf (the form experiment trackers take as params)."""
    data = to_dict(obj) if dataclasses.is_dataclass(obj) else obj
    flat: dict[str, Any] = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else str(name)
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, key))
        else:
            flat[key] = value
    return flat


def apply_override(obj: T, assignment: str) -> T:
    """Return a copy of ``obj`` with one ``a.b.c=value`` override applied (typed, checked)."""
    if "=" not in assignment:
        raise ConfigError(f"override {assignment!r} must look like key.path=value")
    dotted, text = assignment.split("=", 1)
    dotted = dotted.strip()
    parts = dotted.split(".")
    if not all(parts):
        raise ConfigError(f"override {assignment!r}: empty key segment")
    return _set_path(obj, parts, text, prefix="")


def _set_path(obj: Any, parts: list[str], text: str, prefix: str) -> Any:
    name = parts[0]
    key = f"{prefix}.{name}" if prefix else name
    if not (dataclasses.is_dataclass(obj) and not isinstance(obj, type)):
        raise ConfigError(f"{prefix}: is a value, not a section; cannot set {key}")
    fields = _field_types(type(obj))
    if name not in fields:
        raise ConfigError(
            f"unknown config key {key} (valid keys of {prefix or type(obj).__name__}: "
            f"{', '.join(sorted(fields))})"
        )
    tp = fields[name]
    if len(parts) == 1:
        value = _parse_text(key, text, tp)
        value = _check_value(key, value, tp)
    else:
        child = getattr(obj, name)
        _, inner = _is_optional(tp)
        if child is None and dataclasses.is_dataclass(inner):
            child = inner()
        value = _set_path(child, parts[1:], text, key)
    return dataclasses.replace(obj, **{name: value})


def read_recipe(path: str | os.PathLike) -> dict[str, Any]:
    """Parse a TOML or YAML recipe file into a mapping (by extension)."""
    from sama import storage

    text_path = os.fspath(path)
    try:
        text = storage.read_text(text_path)
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read config file {text_path}: {exc}") from None
    suffix = os.path.splitext(text_path)[1].lower()
    try:
        if suffix == ".toml":
            data = tomllib.loads(text)
        elif suffix in (".yaml", ".yml"):
            data = yaml.safe_load(text) or {}
        elif suffix == ".json":
            data = json.loads(text)
        else:
            raise ConfigError(f"config file {text_path}: unknown format (use .toml, .yaml or .json)")
    except (tomllib.TOMLDecodeError, yaml.YAMLError, json.JSONDecodeError) as exc:
        raise ConfigError(f"config file {text_path} is not valid: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {text_path}: the top level must be a table/mapping")
    return data


def load(cls: type[T], config_file: str | os.PathLike | None = None, overrides: Iterable[str] = ()) -> T:
    """Resolve a config: dataclass defaults, then ``config_file``, then each ``a.b=c`` override."""
    obj = from_dict(cls, read_recipe(config_file)) if config_file else cls()
    for assignment in overrides:
        obj = apply_override(obj, assignment)
    validate = getattr(obj, "validate", None)
    if callable(validate):
        try:
            validate()
        except ConfigError:
            raise
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
    return obj


def dumps(obj: Any) -> str:
    """The resolved configuration as YAML (keys in declaration order), credentials redacted
    (:func:`sama.redaction.redact_config`: URI userinfo and query strings, credential environment
    values, credential-named keys); URIs without credentials stay as they are."""
    from sama.redaction import redact_config

    # Every dumped config is written somewhere others read (config.yaml, MLflow, --print-config).
    return yaml.safe_dump(redact_config(to_dict(obj)), sort_keys=False, default_flow_style=False)


def save(obj: Any, uri: str) -> None:
    """Atomically write the resolved configuration as YAML (:func:`dumps`: credentials redacted)
    to ``uri`` (local or s3://)."""
    from sama import storage

    storage.write_text(uri, dumps(obj))


__all__ = [
    "ConfigError",
    "apply_override",
    "dumps",
    "flatten",
    "from_dict",
    "load",
    "read_recipe",
    "save",
    "to_dict",
]
