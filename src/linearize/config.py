"""The one config base: typed dataclass configs with help text in field metadata, a strict
``from_dict`` and a ``to_dict`` (à la transformers' ``PretrainedConfig``); the CLI builds its
flags from the fields (``cli/options.py add_config_arguments``)."""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from collections.abc import Callable
from typing import Any, ClassVar, TypeVar

C = TypeVar("C", bound="Config")
_NO_DEFAULT = dataclasses.MISSING


def option(
    help: str, default: Any = _NO_DEFAULT, *, factory: Callable[[], Any] | None = None
) -> Any:
    """A config field with its help text (shown by ``--help``)."""
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata={"help": help})
    return dataclasses.field(default=default, metadata={"help": help})


def matches(value: Any, hint: Any) -> bool:
    """Whether ``value`` has the type ``hint`` (the subset of typing our configs use)."""
    if hint is Any:
        return True
    if hint is None or hint is type(None):
        return value is None
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin is typing.Literal:
        return any(value == a and type(value) is type(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return any(matches(value, a) for a in args)
    if origin in (list, tuple):
        # JSON has no tuples: a list stands for one.
        if not isinstance(value, list | tuple):
            return False
        if origin is tuple and args and args[-1] is not Ellipsis:
            return len(value) == len(args) and all(map(matches, value, args))
        return not args or all(matches(v, args[0]) for v in value)
    if origin is dict:
        return isinstance(value, dict) and all(
            matches(k, args[0]) and matches(v, args[1]) for k, v in value.items()
        )
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(hint, type):
        return isinstance(value, hint)
    # Anything rarer (Callable, a TypeVar): not checked here.
    return True


def describe(hint: Any) -> str:
    """``int | None`` → ``'int or null'``: the expected type, in words."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if hint is type(None) or hint is None:
        return "null"
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(describe(a) for a in args)
    if origin is not None:
        return f"{origin.__name__} of " + ", ".join(describe(a) for a in args)
    return getattr(hint, "__name__", str(hint))


def _literal_values(hint: Any) -> tuple[Any, ...]:
    if typing.get_origin(hint) is typing.Literal:
        return typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return tuple(v for a in typing.get_args(hint) for v in _literal_values(a))
    return ()


def check_value(owner: type, name: str, value: Any, hint: Any) -> None:
    """Raise ``TypeError`` naming ``owner.name`` if ``value`` does not have the type ``hint``
    (``ValueError`` for a value of the right type outside a ``Literal``)."""
    if matches(value, hint):
        return
    allowed = _literal_values(hint)
    if any(type(value) is type(a) for a in allowed):
        raise ValueError(
            f"{owner.__name__}.{name}={value!r}; allowed: {', '.join(map(repr, allowed))}"
        )
    raise TypeError(
        f"{owner.__name__}.{name} must be {describe(hint)}, got {type(value).__name__} {value!r}"
    )


class Config:
    """Base of the dataclass configs. Subclasses are ``@dataclass``es that override
    ``validate`` (raise ``ValueError`` naming the bad value and what is allowed; return self)."""

    # How an unknown key is named in from_dict's error, e.g. "model config keys".
    keys_name: ClassVar[str] = "config keys"

    def validate(self: C) -> C:
        return self

    def check_types(self) -> None:
        """Every field against its type hint (``TypeError`` naming the field)."""
        hints = typing.get_type_hints(type(self))
        for field in dataclasses.fields(self):
            check_value(type(self), field.name, getattr(self, field.name), hints[field.name])

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls: type[C], data: dict[str, Any]) -> C:
        """The config of ``data`` (as ``to_dict`` wrote it), validated; unknown keys are refused."""
        if not isinstance(data, dict):
            raise TypeError(f"a {cls.__name__} must be a JSON object, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown {cls.keys_name} {unknown}; valid: {sorted(known)}")
        # Types first (a file or a flag can hold anything), so no check below meets a str.
        hints = typing.get_type_hints(cls)
        for name, value in data.items():
            check_value(cls, name, value, hints[name])
        return cls(**data).validate()


def parse_options(pairs: list[str], flag: str = "--option") -> dict[str, Any]:
    """``KEY=VALUE`` pairs (``flag``'s repeated values) as a dict; a value is read as JSON, else
    kept as the string it is."""
    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"{flag} {pair!r}: expected KEY=VALUE")
        try:
            options[key] = json.loads(raw)
        except json.JSONDecodeError:
            options[key] = raw
    return options
