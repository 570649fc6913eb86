"""Typed reading of JSON artifacts: a dataclass built from a JSON object, each field checked
against its annotation (strings, integers, numbers, booleans, None, lists, string-keyed
dicts, nested dataclasses), a wrong one named by its path (``stages[0].nodes``)."""
from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, TypeVar

T = TypeVar("T")


class SchemaError(ValueError):
    """A JSON value does not have the type its field is declared with."""


def from_json(cls: type[T], data: Any, path: str = "") -> T:
    """``cls`` built from ``data``, every field checked (extra keys are ignored, missing ones
    take their defaults).

    Example:
        >>> from_json(PlanInput, {"name": "x", "role": "latent", "shape": [1], "dtype": "float32"})
        PlanInput(name='x', role='latent', shape=[1], dtype='float32')
        >>> from_json(PlanInput, {"name": "x", "role": "latent", "shape": 5, "dtype": "f"})
        Traceback (most recent call last):
        SchemaError: shape must be a list of integers, got 5
    """
    if not isinstance(data, dict):
        raise SchemaError(f"{path or 'the file'} must be an object, got {_shown(data)}")
    hints = typing.get_type_hints(cls)
    values = {}
    for field in dataclasses.fields(cls):
        where = f"{path}.{field.name}" if path else field.name
        if field.name in data:
            values[field.name] = _checked(hints[field.name], data[field.name], where)
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise SchemaError(f"{where} is missing")
    return cls(**values)


def _checked(hint: Any, value: Any, path: str) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return _union(args, value, path)
    if origin is list:
        _require(isinstance(value, list), hint, value, path)
        return [_checked(args[0], item, f"{path}[{i}]") for i, item in enumerate(value)]
    if origin is dict:
        _require(isinstance(value, dict) and all(isinstance(k, str) for k in value), hint, value, path)
        return {key: _checked(args[1], item, f"{path}[{key!r}]") for key, item in value.items()}
    if dataclasses.is_dataclass(hint):
        return from_json(hint, value, path)
    if hint is Any:
        return value
    if hint is float:
        _require(isinstance(value, (int, float)) and not isinstance(value, bool), hint, value, path)
        return float(value)
    _require(isinstance(value, hint) and (hint is bool or not isinstance(value, bool)), hint, value, path)
    return value


def _union(options: tuple, value: Any, path: str) -> Any:
    if value is None and type(None) in options:
        return None
    for option in options:
        if option is not type(None):
            try:
                return _checked(option, value, path)
            except SchemaError:
                continue
    raise SchemaError(f"{path} must be {_described(typing.Union[options])}, got {_shown(value)}")


def _require(ok: bool, hint: Any, value: Any, path: str) -> None:
    if not ok:
        raise SchemaError(f"{path} must be {_described(hint)}, got {_shown(value)}")


def _described(hint: Any) -> str:
    """``list[int]`` -> ``'a list of integers'``."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _described(a) for a in args)
    if origin is list:
        return f"a list of {_plural(args[0])}"
    if origin is dict:
        return f"an object of {_plural(args[1])}"
    names = {str: "a string", int: "an integer", float: "a number", bool: "true or false"}
    return names.get(hint, "an object")


def _plural(hint: Any) -> str:
    names = {str: "strings", int: "integers", float: "numbers", bool: "booleans"}
    if typing.get_origin(hint) is list:
        return f"lists of {_plural(typing.get_args(hint)[0])}"
    return names.get(hint, "objects")


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:37]}..."
