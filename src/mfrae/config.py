"""Typed configuration: nested dataclasses filled from YAML presets, files and `--set key=value` overrides.

Every value is checked against its type hint before anything runs; an unknown key or a bad value raises
`ConfigError` naming the dotted key. Sections that configure a component with its own constructor
(`objective`, model architectures) are plain mappings validated against that constructor's signature
by `build_from_options`, so the component's own type hints stay the single source of truth.
"""

from __future__ import annotations

import dataclasses
import inspect
import types
from importlib import resources
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml

from mfrae.errors import ConfigError

#################################################################################
#                            Values against types                               #
#################################################################################


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def coerce(value: Any, tp: Any, key: str) -> Any:
    """Check / convert `value` to type `tp` (YAML gives ints for floats, lists for tuples); ConfigError on failure."""
    if tp is Any or tp is inspect.Parameter.empty:
        return value
    origin, args = get_origin(tp), get_args(tp)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for option in (a for a in args if a is not type(None)):
            try:
                return coerce(value, option, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: {value!r} is not a valid {_type_name(tp)}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: {value!r} is not one of {list(args)}")
        return value
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{key}: expected {len(args)} values, got {len(value)}")
            return tuple(coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else Any
        out = [coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, key)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)  # YAML reads "1e-4" as a string
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    if isinstance(tp, type) and not isinstance(value, tp):
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    return value


def from_dict(cls, data: Any, prefix: str = ""):
    """Build dataclass `cls` from a mapping: unknown keys and bad values name their dotted key."""
    where = prefix or cls.__name__
    if isinstance(data, cls):
        return data
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {data!r}")
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"unknown config key {_join(prefix, unknown[0])!r}; known keys here: {sorted(fields)}")
    values = {name: coerce(value, hints[name], _join(prefix, name)) for name, value in data.items()}
    try:
        obj = cls(**values)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{where}: {err}") from None
    return obj


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def to_dict(obj) -> Any:
    """Dataclasses -> plain dicts / lists (tuples become lists), for YAML and JSON."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def build_from_options(target, options: dict, prefix: str, fixed: dict | None = None):
    """Call `target(**fixed, **options)` after checking every option against the signature's type hints.

    Unknown options and badly typed values raise ConfigError naming `prefix.key`.
    """
    fixed = fixed or {}
    params, hints = signature_options(target)
    unknown = sorted(set(options) - set(params))
    if unknown:
        raise ConfigError(f"unknown config key {_join(prefix, unknown[0])!r}; known keys here: {sorted(params)}")
    values = {k: coerce(v, hints.get(k, Any), _join(prefix, k)) for k, v in options.items()}
    try:
        return target(**fixed, **values)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{prefix}: {err}") from None


def check_options(target, options: dict, prefix: str, skip: tuple[str, ...] = ()) -> None:
    """Validate option names and value types against `target`'s signature without calling it."""
    params, hints = signature_options(target)
    accepts_any = any(p.kind is p.VAR_KEYWORD for p in inspect.signature(
        target.__init__ if inspect.isclass(target) else target).parameters.values())
    for key, value in options.items():
        if key in skip:
            continue
        if key not in params:
            if accepts_any:
                continue
            raise ConfigError(f"unknown config key {_join(prefix, key)!r}; known keys here: {sorted(set(params) - set(skip))}")
        coerce(value, hints.get(key, Any), _join(prefix, key))


def signature_options(target) -> tuple[dict[str, inspect.Parameter], dict[str, Any]]:
    """Keyword options of a class or function: {name: Parameter} and their resolved type hints."""
    func = target.__init__ if inspect.isclass(target) else target
    hints = get_type_hints(func)
    params = {
        name: p
        for name, p in inspect.signature(func).parameters.items()
        if name != "self" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    }
    return params, hints


def option_defaults(target, skip: tuple[str, ...] = ()) -> dict:
    """The defaults of a constructor's keyword options (to write a fully resolved config)."""
    params, _ = signature_options(target)
    return {k: to_dict(p.default) for k, p in params.items() if k not in skip and p.default is not p.empty}


#################################################################################
#                          Overrides and YAML files                             #
#################################################################################


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b.c=value` -> (["a", "b", "c"], YAML-parsed value)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set expects key=value, got {text!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"--set {key}: cannot parse value {raw!r}: {err}") from None
    return key.strip().split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Set dotted keys in a nested mapping (validation happens when the dataclass is built)."""
    data = _deep_copy(data)
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for i, part in enumerate(path[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"--set {'.'.join(path)}: {'.'.join(path[: i + 1])!r} is a value, not a section")
            node = child
        node[path[-1]] = value
    return data


def deep_merge(base: dict, update: dict) -> dict:
    out = _deep_copy(base)
    for key, value in (update or {}).items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = _deep_copy(value)
    return out


def _deep_copy(value):
    if isinstance(value, dict):
        return {k: _deep_copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_deep_copy(v) for v in value]
    return value


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"no such config file: {path}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return data


def write_yaml(data: dict, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(data), sort_keys=False))


__all__ = [
    "ConfigError",
    "apply_overrides",
    "build_from_options",
    "check_options",
    "coerce",
    "deep_merge",
    "from_dict",
    "option_defaults",
    "parse_override",
    "read_yaml",
    "signature_options",
    "to_dict",
    "write_yaml",
]


#################################################################################
#                                   Presets                                     #
#################################################################################


def preset_names() -> list[str]:
    """The bundled presets (`mfrae/configs/*.yaml`), by name."""
    return sorted(p.name[: -len(".yaml")] for p in resources.files("mfrae.configs").iterdir() if p.name.endswith(".yaml"))


def read_preset(name_or_path: str) -> tuple[dict, str]:
    """(mapping, where it came from) for a bundled preset name or a YAML file path."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        return read_yaml(path), str(path)
    bundled = resources.files("mfrae.configs") / f"{name_or_path}.yaml"
    if not bundled.is_file():
        raise ConfigError(f"no config file or preset named {name_or_path!r}; presets: {', '.join(preset_names())}")
    return read_yaml(Path(str(bundled))), f"preset {name_or_path}"
