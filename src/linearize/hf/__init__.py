"""transformers integration: a config, a ``...ForCausalLM`` and a ``Cache`` for linearized models.

Importing this package (``import linearize`` does) registers the classes with transformers'
``AutoConfig`` / ``AutoModelForCausalLM``; an exported directory (``linearize export-hf``) also
names them in its ``auto_map``, so ``from_pretrained(dir, trust_remote_code=True)`` works in a
process that never imported ``linearize``.

The model class is imported on first use, not here: it pulls in transformers' model classes
(``PreTrainedModel``, generation), ~2 s that every ``linearize`` command paid before reading a
flag. ``AutoModelForCausalLM`` holds :class:`_LinearizeForCausalLM`, which hands
``from_pretrained`` / ``from_config`` to the real class; ``linearize.hf.LinearizeForCausalLM``
and ``export_hf`` import it when first named.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from transformers import AutoConfig, AutoModelForCausalLM

from linearize.hf.cache import LinearizeCache
from linearize.hf.configuration_linearize import MODEL_TYPE, LinearizeConfig

if TYPE_CHECKING:
    from linearize.hf.export import export_hf
    from linearize.hf.modeling_linearize import LinearizeForCausalLM

# Names this package gives from its modules when first asked for.
_LAZY = {
    "LinearizeForCausalLM": "linearize.hf.modeling_linearize",
    "export_hf": "linearize.hf.export",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class _LinearizeForCausalLM:
    """What ``AutoModelForCausalLM`` holds for :class:`LinearizeConfig`: the model class's
    name and config, and its two constructors, which import the real class and call it."""

    config_class = LinearizeConfig

    @classmethod
    def from_pretrained(cls, *args: Any, **kwargs: Any):
        return __getattr__("LinearizeForCausalLM").from_pretrained(*args, **kwargs)

    @classmethod
    def _from_config(cls, *args: Any, **kwargs: Any):
        return __getattr__("LinearizeForCausalLM")._from_config(*args, **kwargs)


# (transformers names a registered class by __name__, e.g. a pipeline checking the model type.)
_LinearizeForCausalLM.__name__ = _LinearizeForCausalLM.__qualname__ = "LinearizeForCausalLM"

AutoConfig.register(MODEL_TYPE, LinearizeConfig, exist_ok=True)
AutoModelForCausalLM.register(LinearizeConfig, _LinearizeForCausalLM, exist_ok=True)

__all__ = ["LinearizeCache", "LinearizeConfig", "LinearizeForCausalLM", "export_hf"]
