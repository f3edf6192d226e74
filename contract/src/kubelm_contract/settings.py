"""Loading camelCase mappings (CR specs, runtime configuration files) into typed dataclasses.

Pure and dependency-free, shared by the operator and the runtime so that both
read the same documents the same way: unknown keys and wrong types are errors
that name the offending path, with a suggestion for likely typos.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import re
import types
import typing
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

T = TypeVar("T")


class SettingsError(ValueError):
    """A configuration document does not fit its schema; the message names the path."""


def camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part[:1].upper() + part[1:] for part in rest)


def snake(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


def _describe(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return " or ".join(repr(a) for a in get_args(tp))
    return getattr(tp, "__name__", str(tp))


def _convert(tp: Any, value: Any, where: str) -> Any:
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        options = get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _convert(option, value, where)
            except SettingsError as e:
                errors.append(str(e))
        raise SettingsError(errors[0] if len(errors) == 1 else f"{where}: {value!r} fits none of the allowed forms")
    if origin is Literal:
        if value not in get_args(tp):
            raise SettingsError(f"{where}: {value!r} is not one of {', '.join(repr(a) for a in get_args(tp))}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, list | tuple):
            raise SettingsError(f"{where}: expected a list, got {type(value).__name__}")
        (item_type, *_) = get_args(tp) or (Any,)
        items = [_convert(item_type, v, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise SettingsError(f"{where}: expected a mapping, got {type(value).__name__}")
        _, value_type = get_args(tp) or (str, Any)
        return {str(k): _convert(value_type, v, f"{where}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return load(tp, value, where)  # type: ignore[arg-type]
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise SettingsError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise SettingsError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise SettingsError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise SettingsError(f"{where}: expected a string, got {value!r}")
        return value
    raise SettingsError(f"{where}: unsupported type {_describe(tp)}")


@functools.cache
def _schema(cls: type) -> tuple[dict[str, Any], dict[str, dataclasses.Field[Any]]]:
    """Type hints and camelCase fields of a dataclass, resolved once: resolving string annotations
    is by far the slowest part of loading, and an operator loads the same classes for every object."""
    hints = typing.get_type_hints(cls)
    fields = {camel(f.name): f for f in dataclasses.fields(cls) if f.init}  # type: ignore[arg-type]
    return hints, fields


def load(cls: type[T], data: Any, where: str = "") -> T:
    """Builds dataclass `cls` from a camelCase mapping; missing keys take the dataclass defaults."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise SettingsError(f"{where or 'document'}: expected a mapping, got {type(data).__name__}")
    hints, fields = _schema(cls)  # type: ignore[arg-type]
    unknown = [k for k in data if k not in fields]
    if unknown:
        key = unknown[0]
        hint = difflib.get_close_matches(str(key), list(fields), n=1)
        suggestion = f" (did you mean {hint[0]!r}?)" if hint else f"; known: {', '.join(sorted(fields))}"
        raise SettingsError(f"{_join(where, key)}: unknown setting{suggestion}")
    values = {}
    for key, field in fields.items():
        path = _join(where, key)
        if key in data:
            values[field.name] = _convert(hints[field.name], data[key], path)
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise SettingsError(f"{path}: required setting is missing")
    try:
        return cls(**values)
    except (TypeError, ValueError) as e:
        raise SettingsError(f"{where or 'document'}: {e}") from e


def dump(obj: Any) -> Any:
    """The camelCase mapping of a dataclass tree (inverse of load), omitting None."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {camel(f.name): dump(getattr(obj, f.name)) for f in dataclasses.fields(obj)
                if getattr(obj, f.name) is not None}
    if isinstance(obj, list | tuple):
        return [dump(v) for v in obj]
    if isinstance(obj, dict):
        return {k: dump(v) for k, v in obj.items()}
    return obj


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else str(key)
