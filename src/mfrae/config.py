"""Typed configuration: nested dataclasses filled from YAML presets, files and `--set key=value` overrides.

Every value is checked against its type hint before anything runs; an unknown key or a bad value raises
`ConfigError` naming the dotted key. Sections that configure a component with its own constructor
(`objective`, model architectures) are plain mappings validated against that constructor's signature
by `build_from_options`, so the component's own type hints stay the single source of truth.
A numeric field may carry its range in its hint, `Annotated[float, Bounds(gt=0)]`, checked with the key.

Preset files hold `common` and `stages` at the top level, plus any number of anchor-only keys starting with
`_` (blocks shared through YAML anchors, e.g. `_dit: &dit`); any other top-level key is refused
(`split_preset`, docs/input_checks.md).
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import types
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml

from mfrae.errors import ConfigError

#################################################################################
#                            Values against types                               #
#################################################################################


def _type_name(tp) -> str:
    if get_origin(tp) is Annotated:
        tp = get_args(tp)[0]
    if get_origin(tp) in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in get_args(tp))
    if tp is type(None):
        return "None"
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


@dataclasses.dataclass(frozen=True)
class Bounds:
    """The range of a numeric field, given in its hint: `Annotated[int, Bounds(ge=1)]`.

    `coerce` checks it after the type, so the error names the dotted key and the value. Values must also be
    finite (NaN never passes) unless `finite=False`, which still refuses NaN but lets +-inf through.
    """

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    finite: bool = True

    def describe(self, integer: bool = False) -> str:
        parts = [f"{op} {v:g}" for op, v in ((">=", self.ge), (">", self.gt), ("<=", self.le), ("<", self.lt)) if v is not None]
        kind = "an integer" if integer else "a finite number" if self.finite else "a number"
        return " ".join([kind, " and ".join(parts)]).strip()

    def check(self, value: Any, key: str) -> None:
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            return  # the type check has spoken already (e.g. None of an optional field)
        ok = not math.isnan(value) and (not self.finite or math.isfinite(value))
        ok = ok and (self.ge is None or value >= self.ge) and (self.gt is None or value > self.gt)
        ok = ok and (self.le is None or value <= self.le) and (self.lt is None or value < self.lt)
        if not ok:
            raise ConfigError(f"{key}: must be {self.describe(isinstance(value, int))}, got {value!r}")


def _reason(err: ConfigError, key: str) -> str:
    """The message of a nested error without its leading `key: ` (for listing the options tried)."""
    text = str(err)
    return text[len(key) + 2 :] if text.startswith(f"{key}: ") else text


def coerce(value: Any, tp: Any, key: str) -> Any:
    """Check / convert `value` to type `tp` (YAML gives ints for floats, lists for tuples); ConfigError on failure."""
    if tp is Any or tp is inspect.Parameter.empty:
        return value
    origin, args = get_origin(tp), get_args(tp)
    if origin is Annotated:
        value = coerce(value, args[0], key)
        for extra in tp.__metadata__:
            if isinstance(extra, Bounds):
                extra.check(value, key)
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        tried = []
        for option in (a for a in args if a is not type(None)):
            try:
                return coerce(value, option, key)
            except ConfigError as err:
                tried.append(f"as {_type_name(option)}: {_reason(err, key)}")
        raise ConfigError(f"{key}: {value!r} is not a valid {_type_name(tp)} ({'; '.join(tried)})")
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
    hints = get_type_hints(cls, include_extras=True)  # keep the Bounds of Annotated hints
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"unknown config key {_join(prefix, unknown[0])!r}; known keys here: {sorted(fields)}")
    values = {name: coerce(value, hints[name], _join(prefix, name)) for name, value in data.items()}
    try:
        obj = cls(**values)
    except ConfigError as err:
        if not prefix:  # a top-level config's own checks name their dotted keys already
            raise
        raise ConfigError(f"{where}: {err}") from None
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
    hints = get_type_hints(func, include_extras=True)
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


# A section holding `options` next to a `kind` (datasets) or `name` (encoders) configures one component: the
# options belong to that kind. A layer (a stage over `common`, a `--set`) that changes the kind therefore starts
# the options afresh instead of keeping the options of the kind it replaces.
COMPONENT_SELECTORS = ("kind", "name")
COMPONENT_OPTIONS = "options"


def _selects_new_component(node: dict, key: str, value: Any) -> bool:
    """Does setting `node[key] = value` switch the component that `node[COMPONENT_OPTIONS]` configures?"""
    return key in COMPONENT_SELECTORS and COMPONENT_OPTIONS in node and node.get(key) != value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Set dotted keys in a nested mapping (validation happens when the dataclass is built).

    Setting a section's `kind` / `name` to another value drops the options of the old component; options given
    by other overrides in the same list are kept, whatever their order (`--set data.kind=latents --set
    data.options.cache_dir=DIR`)."""
    data = _deep_copy(data)
    parsed = [parse_override(text) for text in overrides]
    for index, (path, value) in enumerate(parsed):
        node = data
        for i, part in enumerate(path[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"--set {'.'.join(path)}: {'.'.join(path[: i + 1])!r} is a value, not a section")
            node = child
        if _selects_new_component(node, path[-1], value):
            options = path[:-1] + [COMPONENT_OPTIONS]
            node[COMPONENT_OPTIONS] = {}
            for other, other_value in parsed:  # the new component's options given on the same command line
                if other[: len(options)] == options and other != options:
                    _set_path(node[COMPONENT_OPTIONS], other[len(options):], other_value)
                elif other == options:
                    node[COMPONENT_OPTIONS] = _deep_copy(other_value)
        node[path[-1]] = value
    return data


def _set_path(node: dict, path: list[str], value: Any) -> None:
    for part in path[:-1]:
        child = node.get(part)
        node = node[part] = child if isinstance(child, dict) else {}
    node[path[-1]] = _deep_copy(value)


def deep_merge(base: dict, update: dict) -> dict:
    """`update` over `base`, mapping by mapping; a section whose `kind` / `name` changes takes its `options` from
    `update` alone (the old component's options do not apply to the new one)."""
    out = _deep_copy(base)
    update = update or {}
    if any(_selects_new_component(out, key, update[key]) for key in COMPONENT_SELECTORS if key in update):
        out.pop(COMPONENT_OPTIONS, None)
    for key, value in update.items():
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
    "Bounds",
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
    "split_preset",
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


PRESET_SECTIONS = ("common", "stages")


def is_anchor_key(key: Any) -> bool:
    """Top-level keys starting with `_` only hold YAML anchors (blocks reused with `*name`), never config."""
    return isinstance(key, str) and key.startswith("_")


def split_preset(preset: dict, source: str) -> tuple[dict, dict]:
    """(common, stages) of a preset mapping; a file with neither section is one stage's config: (it, {}).

    The top level of a preset may hold only `common`, `stages` and anchor-only keys (`_name`); anything else
    (a misspelt `comon:` or `stage:`) is refused naming the key and `source`, so no section is silently lost.
    """
    body = {k: v for k, v in preset.items() if not is_anchor_key(k)}
    if not any(k in body for k in PRESET_SECTIONS):
        return body, {}
    unknown = sorted(str(k) for k in body if k not in PRESET_SECTIONS)
    if unknown:
        raise ConfigError(
            f"{source}: unknown top-level section {unknown[0]!r}; a preset holds {' and '.join(PRESET_SECTIONS)} "
            "(YAML anchors go under top-level keys starting with '_')"
        )
    common, stages = body.get("common") or {}, body.get("stages") or {}
    sections = {"common": common, "stages": stages}
    if isinstance(stages, dict):
        sections.update({f"stages.{k}": v or {} for k, v in stages.items()})
    for name, value in sections.items():
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: section {name!r} must be a mapping, got {value!r}")
    return common, {k: v or {} for k, v in stages.items()}
