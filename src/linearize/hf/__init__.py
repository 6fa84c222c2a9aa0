"""transformers integration: a config, a ``...ForCausalLM`` and a ``Cache`` for linearized models.

Importing this package (``import linearize`` does) registers the classes with transformers'
``AutoConfig`` / ``AutoModelForCausalLM``; an exported directory (``linearize export-hf``) also
names them in its ``auto_map``, so ``from_pretrained(dir, trust_remote_code=True)`` works in a
process that never imported ``linearize``.
"""

from transformers import AutoConfig, AutoModelForCausalLM

from linearize.hf.cache import LinearizeCache
from linearize.hf.configuration_linearize import MODEL_TYPE, LinearizeConfig
from linearize.hf.export import export_hf
from linearize.hf.modeling_linearize import LinearizeForCausalLM

AutoConfig.register(MODEL_TYPE, LinearizeConfig, exist_ok=True)
AutoModelForCausalLM.register(LinearizeConfig, LinearizeForCausalLM, exist_ok=True)

__all__ = ["LinearizeCache", "LinearizeConfig", "LinearizeForCausalLM", "export_hf"]
