"""Loading a config: presets that extend each other, `--set` overrides, and the typed coercion of every value
into the dataclasses of `rlbooth.config`, with `ConfigError` naming the dotted key."""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from rlbooth.config import CONFIG_DIR, Config, ConfigError, _check


def resolve_preset(name: str | Path, relative_to: Path | None = None) -> Path:
    """A preset is a path (absolute, or relative to the file that extends it) or a name in `configs/`."""
    candidates = [Path(name)]
    if relative_to is not None:
        candidates.insert(0, relative_to / name)
    candidates += [CONFIG_DIR / str(name), CONFIG_DIR / f"{name}.yaml"]
    for path in candidates:
        if path.is_file():
            return path
    known = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
    raise ConfigError(f"config file {name!r} not found (presets in {CONFIG_DIR}: {known})")


def read_preset(name: str | Path, relative_to: Path | None = None, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The preset's mapping merged over its `extends` chain."""
    path = resolve_preset(name, relative_to).resolve()
    if path in _seen:
        raise ConfigError(f"{path}: `extends` loops back to itself")
    from rlbooth.files import read_yaml

    data = read_yaml(path, "config file", "`rlbooth config -c tiny` prints a valid one", ConfigError,
                     allow_empty=True) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: must hold a mapping at the top level")
    parent = data.pop("extends", None)
    if parent is None:
        return data
    return deep_merge(read_preset(parent, path.parent, _seen + (path,)), data)


def deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b.c=value` strings; the value is parsed as YAML (`1e-4`, `true`, `[1, 2]`, `null`)."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r}: expected KEY=VALUE, e.g. personalize.max_train_steps=400")
        update: dict[str, Any] = {}
        node = update
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        try:
            node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as err:
            raise ConfigError(f"override {item!r}: the value is not valid YAML ({err.problem}); quote strings "
                              "that hold braces or commas, e.g. \"['a {identifier} {class_noun}']\"") from None
        data = deep_merge(data, update)
    return data


def load_config(preset: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    data = read_preset(preset) if preset is not None else {}
    return from_dict(Config, apply_overrides(data, overrides or []))


T = typing.TypeVar("T")


def from_dict(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    """Build dataclass `cls` from a mapping, checking every key and type."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    for key in data:
        if key not in fields:
            raise ConfigError(f"unknown key '{prefix}{key}' (known keys: {', '.join(sorted(fields))})")
    kwargs = {key: _coerce(value, hints[key], f"{prefix}{key}") for key, value in data.items()}
    return cls(**kwargs)


def type_name(tp: Any) -> str:
    """`int`, `list[str]`, `str | None`, `Literal['no', 'fp16', 'bf16']`: as the annotation reads."""
    if dataclasses.is_dataclass(tp):
        return tp.__name__
    if isinstance(tp, type) and not typing.get_args(tp):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, f"{key}.")
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            _check(type(None) in args, key, "must not be null")
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0])
    if origin is Literal:
        choices = typing.get_args(tp)
        if isinstance(value, bool) and all(isinstance(c, str) for c in choices):
            # YAML 1.1 reads an unquoted `no`/`off`/`yes`/`on` as a bool: map it back to the word offered.
            words = ("no", "off", "false") if not value else ("yes", "on", "true")
            value = next((w for w in words if w in choices), value)
        _check(value in choices, key, f"must be one of {list(choices)}, got {value!r}")
        return value
    if origin is list:
        _check(isinstance(value, list), key, f"expected a list, got {type(value).__name__} {value!r}")
        (item_type,) = typing.get_args(tp)
        return [_coerce(v, item_type, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        _check(isinstance(value, dict), key, f"expected a mapping, got {type(value).__name__} {value!r}")
        key_type, value_type = typing.get_args(tp)
        return {_coerce(k, key_type, key): _coerce(v, value_type, f"{key}.{k}") for k, v in value.items()}
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads `1e-4` (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        _check(isinstance(value, (int, float)) and not isinstance(value, bool), key,
               f"expected a number, got {type(value).__name__} {value!r}")
        return float(value)
    if tp is int:
        _check(isinstance(value, int) and not isinstance(value, bool), key,
               f"expected an integer, got {type(value).__name__} {value!r}")
        return value
    if tp is bool:
        _check(isinstance(value, bool), key, f"expected true or false, got {value!r}")
        return value
    if tp is str:
        _check(isinstance(value, str), key, f"expected a string, got {type(value).__name__} {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported field type {tp}")  # a bug in the dataclass, not in the YAML
