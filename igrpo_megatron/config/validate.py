"""Check a plain (resolved) mapping against the recipe dataclasses and build them.

Every problem is collected, with the key and the file its value came from, and reported at
once: unknown keys, wrong types, values outside a field's ``choices``, and the rules each
section states in its own ``errors(prefix)`` method.

The convention for every section: ``errors(prefix)`` returns the list of broken rules (empty when
valid) and never raises; the loader raises (all sections at once), and code that builds a section
itself (command-line flags, tests) calls :func:`raise_errors`.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from typing import Any, Union

from igrpo_megatron.config.errors import UserError

MISSING_MARK = "???"


class SchemaError(UserError, ValueError):
    """One or more recipe values do not fit the schema (message: one line per problem)."""


def raise_errors(section: Any, prefix: str) -> None:
    """Raise :class:`SchemaError` listing every rule ``section.errors(prefix)`` reports, if any."""
    errors = section.errors(prefix)
    if errors:
        raise SchemaError(f"invalid {prefix} settings:\n" + "\n".join(f"  - {e}" for e in errors))


def schema_defaults(cls: type) -> dict[str, Any]:
    """The schema's defaults as a nested plain dict (required fields appear as ``???``)."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            value = f.default
        elif f.default_factory is not dataclasses.MISSING:
            value = f.default_factory()
        else:
            out[f.name] = MISSING_MARK
            continue
        out[f.name] = dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value
    return out


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _check_value(tp: Any, value: Any, key: str, where: str, errors: list[str]) -> Any:
    """Return ``value`` converted to ``tp`` (int -> float only), or record an error."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        non_none = [a for a in args if a is not type(None)]
        for arg in non_none:
            trial: list[str] = []
            converted = _check_value(arg, value, key, where, trial)
            if not trial:
                return converted
        errors.append(f"{key} (from {where}): expected {' or '.join(_type_name(a) for a in args)}, "
                      f"got {value!r}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            errors.append(f"{key} (from {where}): expected a list, got {value!r}")
            return value
        (item_tp, *_) = typing.get_args(tp) or (Any,)
        return [_check_value(item_tp, v, f"{key}[{i}]", where, errors) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            errors.append(f"{key} (from {where}): expected a mapping, got {value!r}")
            return value
        _, val_tp = typing.get_args(tp) or (str, Any)
        return {str(k): _check_value(val_tp, v, f"{key}.{k}", where, errors) for k, v in value.items()}
    if tp is Any:
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)  # `run.name=7` on the command line parses as an int; OmegaConf does the same
    if tp in (int, float) and isinstance(value, bool):
        errors.append(f"{key} (from {where}): expected {tp.__name__}, got the boolean {value!r}")
        return value
    if isinstance(tp, type) and not isinstance(value, tp):
        errors.append(f"{key} (from {where}): expected {tp.__name__}, got {type(value).__name__} {value!r}")
    return value


def _origin_of(key: str, origin: dict[str, str]) -> str:
    """Where ``key`` (or, for a section or mapping, the keys below it) was set."""
    if key in origin:
        return origin[key]
    below = sorted({v for k, v in origin.items() if k.startswith(key + ".")})
    return ", ".join(below) if below else "the schema"


def _build(cls: type, data: Any, prefix: str, origin: dict[str, str], errors: list[str]) -> Any:
    if not isinstance(data, dict):
        errors.append(f"{prefix} (from {origin.get(prefix, 'the schema')}): expected a section (mapping), "
                      f"got {data!r}")
        return cls()
    hints = _hints(cls)
    names = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            full = f"{prefix}.{key}" if prefix else str(key)
            where = _origin_of(full, origin)
            errors.append(f"{full} (from {where}): unknown key; {prefix or 'the recipe'} has: "
                          f"{', '.join(sorted(names))}")
    kwargs: dict[str, Any] = {}
    for name, f in names.items():
        full = f"{prefix}.{name}" if prefix else name
        if name not in data:
            continue
        tp = hints[name]
        value = data[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value, full, origin, errors)
            continue
        where = _origin_of(full, origin)
        kwargs[name] = _check_value(tp, value, full, where, errors)
        choices = f.metadata.get("choices")
        if choices is not None and kwargs[name] not in choices:
            errors.append(f"{full} (from {where}): {value!r} is not one of {list(choices)}")
    try:
        return cls(**kwargs)
    except TypeError as exc:
        errors.append(f"{prefix}: {exc}")
        return None


def _with_origin(message: str, origin: dict[str, str]) -> str:
    """Append where the most specific key quoted in a section's message was set."""
    quoted = [k for k in origin if k in message]
    if not quoted:
        return message
    key = max(quoted, key=len)
    return f"{message} [{key} set in {origin[key]}]"


def build_dataclass(cls: type, data: dict[str, Any], origin: dict[str, str] | None = None) -> Any:
    """Build ``cls`` from ``data``; raise :class:`SchemaError` listing every problem."""
    errors: list[str] = []
    obj = _build(cls, data, "", origin or {}, errors)
    if not errors and obj is not None:
        for f in dataclasses.fields(obj):
            section = getattr(obj, f.name)
            if hasattr(section, "errors"):
                errors.extend(_with_origin(msg, origin or {}) for msg in section.errors(f.name))
        if hasattr(obj, "errors"):  # rules that span sections (e.g. the parallel layout against the model)
            errors.extend(_with_origin(msg, origin or {}) for msg in obj.errors())
    if errors:
        unique = list(dict.fromkeys(errors))
        raise SchemaError("\n".join(f"  - {e}" for e in unique))
    return obj
