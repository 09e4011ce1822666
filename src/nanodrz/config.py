"""Typed configs: dataclasses filled from YAML or dicts, where an unknown or mistyped key is an error.

The original prototype silently ignored misspelt YAML keys; here `from_dict` names the bad key and the
keys that would have been accepted. Every problem is a `ConfigError`, the configs' own range checks
included, so the command line prints one line whatever the mistake.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from nanodrz.errors import ConfigError, NanodrzError

T = TypeVar("T")


def _convert(value: Any, annotation: Any, where: str) -> Any:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if annotation is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in args:
            if option is type(None):
                continue
            try:
                return _convert(value, option, where)
            except ConfigError as error:
                errors.append(str(error))
        raise ConfigError(errors[0] if errors else f"{where}: bad value {value!r}")
    if dataclasses.is_dataclass(annotation):
        if isinstance(value, annotation):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return from_dict(annotation, value, where)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(f"{where}: expected {len(args)} values, got {len(value)}")
            return tuple(_convert(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else Any
        converted = [_convert(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(converted) if origin is tuple else converted
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        key_type, value_type = args if args else (Any, Any)
        return {
            _convert(k, key_type, where): _convert(v, value_type, f"{where}.{k}") for k, v in value.items()
        }
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not one of {', '.join(map(repr, args))}")
        return value
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):  # YAML reads .nan and .inf as numbers; no setting means them
                raise ConfigError(f"{where}: expected a finite number, got {value!r}")
            return float(value)
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if annotation is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    return value


def check_range(name: str, value: tuple[float, float], low: float | None = None, high: float | None = None) -> None:
    """A [min, max] pair: increasing, within [low, high] where given."""
    if value[0] > value[1]:
        raise ConfigError(f"{name} {list(value)}: minimum is above maximum")
    if low is not None and value[0] < low:
        raise ConfigError(f"{name} {list(value)}: values must be at least {low}")
    if high is not None and value[1] > high:
        raise ConfigError(f"{name} {list(value)}: values must be at most {high}")


def check_probability(name: str, value: float) -> None:
    """A probability, in [0, 1]."""
    if not 0.0 <= value <= 1.0:
        raise ConfigError(f"{name} = {value}: a probability must lie in [0, 1]")


def check_positive(name: str, value: float, allow_zero: bool = False) -> None:
    """Above zero, or at least zero with `allow_zero`."""
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{name} = {value}: must be {'non-negative' if allow_zero else 'positive'}")


def check_weights(name: str, weights: dict[str, float], known: tuple[str, ...]) -> None:
    """Weights of a random choice among `known` entries: non-negative, at least one positive."""
    for key, weight in weights.items():
        if key not in known:
            raise ConfigError(f"{name}: unknown entry {key!r} (choose from {', '.join(known)})")
        check_positive(f"{name}.{key}", weight, allow_zero=True)
    if sum(weights.values()) <= 0:
        raise ConfigError(f"{name}: at least one weight must be positive")


def from_dict(cls: type[T], data: dict[str, Any], where: str = "config") -> T:
    """Build dataclass `cls` from `data`, recursing into nested dataclasses; unknown keys are errors."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"{where}: unknown key {unknown[0]!r} (valid keys: {', '.join(sorted(fields))})"
        )
    kwargs = {name: _convert(value, hints[name], f"{where}.{name}") for name, value in data.items()}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError, NanodrzError) as error:
        raise ConfigError(f"{where}: {error}") from None


def to_dict(obj: Any) -> Any:
    """A plain dict (lists for tuples) of a dataclass, ready for YAML or JSON."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping, with one-line errors for a missing file or bad syntax."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}:{line} is not valid YAML") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return data


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `key.sub=value` strings (values parsed as YAML) to a nested dict, returning a copy."""
    result = _deep_copy(data)
    for override in overrides:
        if "=" not in override:
            raise ConfigError(f"override {override!r} must look like key=value")
        dotted, raw = override.split("=", 1)
        keys = dotted.strip().split(".")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            raise ConfigError(f"override {override!r}: value is not valid YAML") from None
        node = result
        for key in keys[:-1]:
            child = node.get(key)
            if child is None:
                child = node[key] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override {override!r}: {key!r} is not a section")
            node = child
        node[keys[-1]] = value
    return result


def _deep_copy(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: _deep_copy(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_deep_copy(v) for v in data]
    return data


def load_config(cls: type[T], path: str | Path | None, overrides: list[str] | None = None) -> T:
    """Load dataclass `cls` from a YAML file (or defaults when `path` is None) plus `key=value` overrides."""
    data = read_yaml(path) if path is not None else {}
    data = apply_overrides(data, overrides or [])
    return from_dict(cls, data, str(path) if path is not None else "config")
