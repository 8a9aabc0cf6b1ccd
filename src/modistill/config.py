"""Typed configs: dataclasses mirrored 1:1 by YAML, with `key.sub=value` overrides.

A YAML file is read into a plain dict, overrides are applied to that dict, and the result is
converted into the dataclass tree by `from_dict`, which rejects unknown keys and wrong types with a
message naming the key path and the file. `to_dict` goes the other way (for writing the resolved
config next to a checkpoint).
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, cast

import yaml

from modistill.errors import UserError

_SCIENTIFIC = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")

T = TypeVar("T")


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: config file not found (check the path)")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        raise UserError(f"{where}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: the top level must be a mapping of keys, got {type(data).__name__}")
    return data


def apply_overrides(data: dict[str, Any], overrides: list[str], source: str = "command line") -> dict[str, Any]:
    """Apply `a.b.c=value` overrides (value parsed as YAML) to a nested dict, in place."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise UserError(f"{source}: override {item!r} is not of the form key.sub=value")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise UserError(f"{source}: cannot set {key!r}: {part!r} is not a section")
            node = child
        node[parts[-1]] = value
    return data


def from_dict(cls: type[T], data: Any, source: str = "<config>", _path: str = "") -> T:
    """Build dataclass `cls` from a dict, checking keys and types (recursively)."""
    where = _path or "top level"
    if isinstance(data, cls):
        return data
    if not isinstance(data, dict):
        raise UserError(f"{source}: {where} must be a mapping, got {_describe(data)}")
    fields = {f.name: f for f in dataclasses.fields(cast(Any, cls)) if f.init}
    unknown = [k for k in data if k not in fields]
    if unknown:
        prefix = f"{_path}." if _path else ""
        raise UserError(f"{source}: unknown key {prefix}{unknown[0]!r}; valid keys here: {', '.join(sorted(fields))}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in data.items():
        key_path = f"{_path}.{name}" if _path else name
        kwargs[name] = _convert(hints[name], value, source, key_path)
    missing = [
        n
        for n, f in fields.items()
        if n not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        prefix = f"{_path}." if _path else ""
        raise UserError(f"{source}: missing required key {prefix}{missing[0]!r}")
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as exc:  # __post_init__ validation
        raise UserError(f"{source}: {where}: {exc}") from None


def _describe(value: Any) -> str:
    return f"{type(value).__name__} {value!r}" if not isinstance(value, (dict, list)) else type(value).__name__


def _convert(tp: Any, value: Any, source: str, path: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(arg, value, source, path)
            except UserError as exc:
                errors.append(str(exc))
        raise UserError(errors[0] if len(errors) == 1 else f"{source}: {path}: {_describe(value)} fits none of {tp}")
    if origin is Literal:
        if value not in args:
            raise UserError(f"{source}: {path}: {value!r} is not one of {', '.join(repr(a) for a in args)}")
        return value
    if dataclasses.is_dataclass(tp):
        return from_dict(cast(type, tp), value, source, path)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            # A single value where a list is expected is a one-element list (e.g. `train: a.json`).
            value = [value]
        item_tp = args[0] if args else Any
        return [_convert(item_tp, v, source, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise UserError(f"{source}: {path}: expected a mapping, got {_describe(value)}")
        val_tp = args[1] if len(args) == 2 else Any
        return {k: _convert(val_tp, v, source, f"{path}.{k}") for k, v in value.items()}
    if tp is float:
        if isinstance(value, str) and _SCIENTIFIC.fullmatch(value.strip()):
            # PyYAML (YAML 1.1) reads `1e-3` as a string; everyone means the number.
            value = float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UserError(f"{source}: {path}: expected a number, got {_describe(value)}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise UserError(f"{source}: {path}: expected an integer, got {_describe(value)}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise UserError(f"{source}: {path}: expected true or false, got {_describe(value)}")
        return value
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise UserError(f"{source}: {path}: expected a string, got {_describe(value)}")
        return str(value)
    raise TypeError(f"config type {tp!r} at {path} is not supported")  # a bug in our dataclasses


def to_dict(obj: Any) -> Any:
    """The plain-data (YAML-ready) form of a config dataclass tree."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.init}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def dump_yaml(obj: Any) -> str:
    return yaml.safe_dump(to_dict(obj), sort_keys=False)


def load_config(cls: type[T], path: str | Path, overrides: list[str] | None = None) -> T:
    """Read YAML `path`, apply `key=value` overrides, and build dataclass `cls`."""
    data = load_yaml(path)
    apply_overrides(data, overrides or [])
    return from_dict(cls, data, source=str(path))
