"""Typed configuration: dataclasses filled from TOML presets and `--set key=value` overrides.

A preset is a TOML file under `configs/`. It may name another preset with `base = "name"`; the
base is loaded first and the preset's tables are merged over it. Overrides address any field by its
dotted name (`model.num_layers=4`); values are parsed as TOML literals, so `4`, `1e-3`, `true`,
`"text"` and `[1, 2]` all work, and a bare word is taken as a string.

Every error is a `ConfigError` whose message names the offending field.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import tomllib

from archipelago.errors import UserError

T = TypeVar("T")

CONFIGS_DIR_ENV = "ARCHIPELAGO_CONFIGS"


class ConfigError(UserError):
    """A configuration problem a user can fix; the message names the field or file."""


def configs_dir() -> Path:
    """The folder of TOML presets: `$ARCHIPELAGO_CONFIGS`, else `configs/` next to the packages."""
    env = os.environ.get(CONFIGS_DIR_ENV)
    if env:
        return Path(env)
    return Path(__file__).resolve().parent.parent / "configs"


def available_presets() -> list[str]:
    return sorted(p.stem for p in configs_dir().glob("*.toml"))


def load_preset(name: str) -> dict[str, Any]:
    """The merged table of preset `name` (a name under configs/ or a path to a .toml file)."""
    return _load_preset(name, seen=())


def _load_preset(name: str, seen: tuple[str, ...]) -> dict[str, Any]:
    path = Path(name) if name.endswith(".toml") else configs_dir() / f"{name}.toml"
    if not path.is_file():
        raise ConfigError(
            f"unknown preset '{name}' (available: {', '.join(available_presets()) or 'none'})"
        )
    if name in seen:
        raise ConfigError(f"preset '{name}' includes itself through 'base' ({' -> '.join(seen)})")
    try:
        table = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"preset file {path} is not valid TOML: {exc}") from exc
    base = table.pop("base", None)
    if base is None:
        return table
    return deep_merge(_load_preset(base, seen + (name,)), table)


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b=c` -> (['a', 'b'], parsed c)."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like key=value (e.g. model.num_layers=4)")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override '{text}' has an empty key")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return key.split("."), value


def apply_overrides(table: dict[str, Any], overrides: list[str] | None) -> dict[str, Any]:
    """A copy of `table` with each `key=value` override set (structure is checked by `build`)."""
    out = json.loads(json.dumps(table))
    for text in overrides or []:
        path, value = parse_override(text)
        node = out
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override '{text}': '{part}' is a value, not a table")
            node = child
        node[path[-1]] = value
    return out


def build(cls: type[T], table: dict[str, Any] | None, prefix: str = "") -> T:
    """Fill dataclass `cls` from `table`, checking every key and type.

    Unknown keys, missing required fields and values of the wrong type raise `ConfigError`
    naming the dotted field.
    """
    table = dict(table or {})
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(table) - set(fields))
    if unknown:
        names = ", ".join(f"'{prefix}{k}'" for k in unknown)
        raise ConfigError(f"unknown config key {names} (known in '{prefix or cls.__name__}': "
                          f"{', '.join(sorted(fields))})")
    kwargs: dict[str, Any] = {}
    for name, field in fields.items():
        dotted = f"{prefix}{name}"
        if name not in table:
            if field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
                raise ConfigError(f"config field '{dotted}' is required")
            continue
        kwargs[name] = _coerce(hints[name], table[name], dotted)
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as exc:
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(f"{prefix.rstrip('.') or cls.__name__}: {exc}") from exc


def _coerce(tp: Any, value: Any, dotted: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, dotted)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"config field '{dotted}' cannot be None")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"config field '{dotted}' must be a table, got {_describe(value)}")
        return build(tp, value, prefix=f"{dotted}.")
    if origin in (list, tuple):
        if not isinstance(value, list | tuple):
            raise ConfigError(f"config field '{dotted}' must be a list, got {_describe(value)}")
        inner = args[0] if args else Any
        items = [_coerce(inner, v, f"{dotted}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config field '{dotted}' must be a table, got {_describe(value)}")
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"config field '{dotted}' must be true or false, got {_describe(value)}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"config field '{dotted}' must be an integer, got {_describe(value)}")
    if tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"config field '{dotted}' must be a number, got {_describe(value)}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"config field '{dotted}' must be a string, got {_describe(value)}")
    if typing.get_origin(tp) is typing.Literal:
        if value in args:
            return value
        raise ConfigError(f"config field '{dotted}' must be one of {list(args)}, got {value!r}")
    raise ConfigError(f"config field '{dotted}' has an unsupported type {tp!r}")


def _describe(value: Any) -> str:
    return f"{type(value).__name__} {value!r}"


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def config_hash(cfg: Any) -> str:
    """A stable short hash of a config (or any JSON-able table)."""
    table = to_dict(cfg) if dataclasses.is_dataclass(cfg) else cfg
    blob = json.dumps(table, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def load(cls: type[T], preset: str, overrides: list[str] | None = None) -> T:
    """Preset + overrides -> a checked `cls`.

    A preset may carry tables for other commands (a simulation preset has `[sim]`, which local
    training does not use); those are dropped. Overrides are strict: `--set` of a table `cls`
    does not have is an error.
    """
    known = {f.name for f in dataclasses.fields(cls)}
    table = {k: v for k, v in load_preset(preset).items() if k in known}
    return build(cls, apply_overrides(table, overrides))


def dump_toml(table: dict[str, Any]) -> str:
    """TOML text for a table of scalars, lists and nested tables (enough for our configs)."""
    lines: list[str] = []

    def scalar(value: Any) -> str:
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, int | float):
            return repr(value)
        if isinstance(value, str):
            return json.dumps(value)
        if isinstance(value, list | tuple):
            return "[" + ", ".join(scalar(v) for v in value) + "]"
        raise ConfigError(f"cannot write {type(value).__name__} {value!r} as TOML")

    def emit(prefix: str, node: dict[str, Any]) -> None:
        plain = {k: v for k, v in node.items() if not isinstance(v, dict)}
        if prefix and plain:
            lines.append(f"[{prefix}]")
        lines.extend(f"{k} = {scalar(v)}" for k, v in plain.items() if v is not None)
        for key, value in node.items():
            if isinstance(value, dict):
                emit(f"{prefix}.{key}" if prefix else key, value)

    emit("", table)
    return "\n".join(lines) + "\n"
