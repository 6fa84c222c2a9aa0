"""``export_hf``: write a model as a transformers directory (``AutoModelForCausalLM`` loads it).

The directory holds ``config.json`` (transformers' fields and our full config), the weights as
``model.safetensors``, ``generation_config.json``, the tokenizer files and the two remote-code
files of ``auto_map``; nothing pickled. It is written into a temporary sibling and renamed.
Medusa heads (files beside a saved model) are not part of it: transformers cannot use them.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from linearize.hf.modeling_linearize import LinearizeForCausalLM
from linearize.models.decoder import Decoder
from linearize.paths import atomic_dir

logger = logging.getLogger(__name__)


def export_hf(model: Decoder, directory: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write ``model`` to ``directory`` as a transformers model directory (atomically; an
    existing non-empty ``directory`` is replaced only with ``overwrite``). Quantized weights are
    written dequantized to float32."""
    noncausal = [a.self_attn.config.name for a in model.layers if not a.self_attn.is_causal]
    if noncausal:
        raise ValueError(
            f"attention {noncausal[0]!r} is not causal: it cannot decode, so it cannot be "
            "exported for transformers' generate()"
        )
    with atomic_dir(directory, overwrite=overwrite) as tmp:
        tmp.chmod(0o755)
        LinearizeForCausalLM.from_decoder(model).save_pretrained(tmp, safe_serialization=True)
        if model.tokenizer is not None:
            model.tokenizer.save_pretrained(tmp)
    logger.info("exported %s as a transformers directory", directory)
    return Path(directory)
