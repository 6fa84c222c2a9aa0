"""Tiny models the onnx engine runs: the default ``augmented`` layer (shared denominator, decay,
sinks at cache positions, Hedgehog features before RoPE), the paper's layer, plain linear,
hybrid, grouped and softmax."""

from __future__ import annotations

import pytest
import torch

import linearize
from tests.generation.conftest import CONV, GROUP, byte_tokenizer, tiny_model

# A decay of 0.9 (not the preset's 1 − 1/1024) so that aging S, z is visible within 1,000 steps.
AUGMENTED = {"name": "augmented", "size": GROUP, "conv": "causal", "conv_size": CONV, "decay": 0.9}
PAPER = {"name": "augmented_paper", "size": GROUP, "conv_size": CONV, "sink_positions": "absolute"}
GROUPED = {"name": "augmented_paper", "window": "group", "size": 4, "sinks": 0, "conv_size": CONV}
# The window alone (`--option use_global=false`): tokens leaving the window are dropped.
LOCAL = {**AUGMENTED, "use_global": False}
# Groups of relu² attention, no global part (FLASH's local half): a whole group drops at once.
FLASH_LOCAL = {"name": "flash_local", "size": 4}
# A window longer than the engine's first reach (reach_step 16 in the tests): its rings grow.
WIDE = {**AUGMENTED, "size": 60, "retain": 0}
# The retained cache (ops/retain.py): 3 tokens per key head past the window, with a half-life;
# in the paper's layer (sinks at absolute positions) the retained keys keep their rotation.
RETAIN = {**AUGMENTED, "retain": 3, "retain_halflife": 8.0}
RETAIN_PAPER = {**PAPER, "retain": 2}
# The default layer without its retained cache (32 tokens past the window by default).
NO_RETAIN = {**AUGMENTED, "retain": 0}
WIDE_RETAIN = {**WIDE, "retain": 3, "retain_halflife": 8.0}
# Groups with a retained cache: a whole group, the new token included, leaves at once.
GROUP_RETAIN = {**GROUPED, "retain": 2}
OPTIONS = {
    "augmented": AUGMENTED,
    "paper": PAPER,
    "hybrid": AUGMENTED,
    "group": GROUPED,
    "local": LOCAL,
    "flash_local": FLASH_LOCAL,
    "wide": WIDE,
    "retain": RETAIN,
    "retain_paper": RETAIN_PAPER,
    "wide_retain": WIDE_RETAIN,
    "no_retain": NO_RETAIN,
    "group_retain": GROUP_RETAIN,
}


def engine_model(
    kind: str, *, vocab_size: int = 128, text: bool = False, head_dim: int = 16
) -> linearize.Decoder:
    """A float32 tiny model the engine runs (``kind``: softmax, elu, or a key of ``OPTIONS``),
    with α > 0, random conv taps and feature maps; ``text``: with the byte tokenizer
    (vocabulary 258); heads of ``head_dim``."""
    if text:
        vocab_size = 258
    if kind in ("softmax", "elu"):
        model = tiny_model(kind, vocab_size=vocab_size, head_dim=head_dim)
    else:
        model = tiny_model("softmax", vocab_size=vocab_size, head_dim=head_dim)
        layers = [1] if kind == "hybrid" else None
        linearize.linearize(model, OPTIONS[kind], layers=layers)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("conv"):
                    p.normal_(0, 0.3)
                elif name.endswith("alpha"):
                    p.fill_(0.7)
                elif "feature_map" in name:
                    p.add_(torch.randn_like(p) * 0.3)
                elif p.dim() == 2 and "self_attn" in name:
                    p.normal_(0, 0.2)
    model = model.float().eval()
    if text:
        model.tokenizer = byte_tokenizer()
        model.config.eos_token_id = 1
    return model


# The kernel libraries the kernels' tests run: this CPU's build and, where that one is built for
# AVX-512 (kernels.flags), the AVX2-only build a CPU without it runs.
KERNEL_BUILDS = ["cpu", "avx2"]


@pytest.fixture(scope="session")
def kernel_builds(tmp_path_factory) -> dict[str, str]:
    """``{build: library path}`` for :data:`KERNEL_BUILDS` (``avx2``: compiled with
    ``kernels.FLAGS`` alone into a folder of its own; the same as ``cpu`` on a CPU without
    AVX-512)."""
    from linearize.engine import kernels

    if kernels.unavailable() is not None:
        pytest.skip(f"no kernels here: {kernels.unavailable()}")
    builds = {"cpu": str(kernels.library())}
    if kernels.flags() == kernels.FLAGS:
        builds["avx2"] = builds["cpu"]
        return builds
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(kernels, "flags", lambda: kernels.FLAGS)
        builds["avx2"] = str(kernels._library(str(tmp_path_factory.mktemp("avx2"))))
    return builds
