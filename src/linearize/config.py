"""The one config base: typed dataclass configs with help text in field metadata, a strict
``from_dict`` and a ``to_dict`` (à la transformers' ``PretrainedConfig``); the CLI builds its
flags from the fields (``cli/options.py add_config_arguments``)."""

from __future__ import annotations

import dataclasses
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


class Config:
    """Base of the dataclass configs. Subclasses are ``@dataclass``es that override
    ``validate`` (raise ``ValueError`` naming the bad value and what is allowed; return self)."""

    # How an unknown key is named in from_dict's error, e.g. "model config keys".
    keys_name: ClassVar[str] = "config keys"

    def validate(self: C) -> C:
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls: type[C], data: dict[str, Any]) -> C:
        """The config of ``data`` (as ``to_dict`` wrote it), validated; unknown keys are refused."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown {cls.keys_name} {unknown}; valid: {sorted(known)}")
        return cls(**data).validate()
