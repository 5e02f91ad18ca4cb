"""Plain data -> typed dataclasses: the one builder recipes and model configs are checked by.

`build_dataclass(cls, raw, where)` builds a (nested) dataclass from parsed YAML/JSON, checking
every key against the fields (an unknown key gets a did-you-mean) and every value against the
field's type hint (`coerce`). Errors are `trim.errors.ConfigError` naming the full dotted key,
e.g. ``model.vision.widht is not a known key (did you mean 'width'?)``. A class with a
``validate()`` method checks its values after building; that is where rules about values live.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from trim.errors import ConfigError

_NONE = type(None)


def build_dataclass(cls: type, raw: Any, where: str, *, extra_allowed: Sequence[str] = ()) -> Any:
    """Build a (nested) dataclass from plain data, checking every key and type.

    ``where`` is the dotted key of ``raw`` (``model``, ``data``, ...); ``extra_allowed`` names keys
    the caller handles itself and that are not passed on.
    """
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where} must be a mapping of keys ({', '.join(field_names(cls))}); "
                          f"got {type(raw).__name__} {raw!r}")
    reject_unknown(raw, field_names(cls), where, extra_allowed=extra_allowed)
    hints = typing.get_type_hints(cls)
    kwargs = {f.name: coerce(hints[f.name], raw[f.name], f"{where}.{f.name}")
              for f in dataclasses.fields(cls) if f.init and f.name in raw}
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{where}: {err}") from err


def field_names(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls) if f.init]


def reject_unknown(raw: Mapping[str, Any], allowed: Sequence[str], prefix: str, *,
                   extra_allowed: Sequence[str] = ()) -> None:
    """Raise for the first key of ``raw`` not in ``allowed``, with the closest allowed key."""
    for key in raw:
        if not isinstance(key, str):
            raise ConfigError(f"{prefix or 'recipe'}: key {key!r} is not a string")
        if key not in allowed and key not in extra_allowed:
            full = f"{prefix}.{key}" if prefix else key
            close = difflib.get_close_matches(key, list(allowed), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            section = f"in {prefix}" if prefix else "at the top level"
            raise ConfigError(f"{full} is not a known key{hint}; allowed {section}: {', '.join(allowed)}")


def deep_merge(base: Mapping[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with ``top`` laid over it, section by section."""
    out = dict(base)
    for k, v in top.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def coerce(tp: Any, value: Any, key: str) -> Any:
    """``value`` checked (and converted where lossless) as type ``tp``; errors name ``key``."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        return _coerce_union(tp, value, key)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{key}={value!r} is not allowed; choose one of {', '.join(map(str, choices))}")
        return value
    if origin in (list, Sequence, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}={value!r} must be a list ({type_name(tp)})")
        (item,) = typing.get_args(tp)[:1] or (Any,)
        return [coerce(item, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin in (dict, Mapping):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}={value!r} must be a mapping")
        _, item = typing.get_args(tp) or (str, Any)
        return {k: coerce(item, v, f"{key}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return build_dataclass(tp, value, key)
    if value is None:
        raise ConfigError(f"{key} is null but must be {type_name(tp)}")
    return _coerce_scalar(tp, value, key)


def _coerce_union(tp: Any, value: Any, key: str) -> Any:
    arms = typing.get_args(tp)
    if value is None:
        if _NONE in arms:
            return None
        raise ConfigError(f"{key} is null but must be {type_name(tp)}")
    for arm in (a for a in arms if a is not _NONE):
        try:
            return coerce(arm, value, key)
        except ConfigError:
            continue
    raise ConfigError(f"{key}={value!r} must be {type_name(tp)}")


def _coerce_scalar(tp: Any, value: Any, key: str) -> Any:
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}={value!r} must be true or false")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}={value!r} must be a whole number")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out = float(value)
        elif isinstance(value, str):  # YAML 1.1 reads 3e-4 (no dot) as a string
            try:
                out = float(value)
            except ValueError:
                raise ConfigError(f"{key}={value!r} must be a number") from None
        else:
            raise ConfigError(f"{key}={value!r} must be a number")
        if not math.isfinite(out):
            raise ConfigError(f"{key}={value!r} must be a finite number")
        return out
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}={value!r} must be a string")
    if isinstance(tp, type) and not isinstance(value, tp):
        raise ConfigError(f"{key}={value!r} must be {type_name(tp)}")
    return value


def type_name(tp: Any) -> str:
    """How an error message names a type: "a whole number or null", "one of a, b", ..."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        arms = [a for a in typing.get_args(tp) if a is not _NONE]
        name = " or ".join(type_name(a) for a in arms)
        return name + (" or null" if _NONE in typing.get_args(tp) else "")
    if origin is Literal:
        return "one of " + ", ".join(map(str, typing.get_args(tp)))
    if origin in (list, Sequence, tuple):
        args = typing.get_args(tp)
        return f"a list of {type_name(args[0])}" if args else "a list"
    return {bool: "true or false", int: "a whole number", float: "a number", str: "a string"}.get(
        tp, getattr(tp, "__name__", str(tp)))
