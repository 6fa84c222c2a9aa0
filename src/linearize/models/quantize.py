"""Group-wise weight quantization (int8, int4) of every linear layer and the embedding / LM head.

A weight ``w: [N, K]`` (out × in) is cut along ``K`` into groups of ``group_size`` (32, like
GGUF's Q4_0/Q4_1 blocks and onnxruntime's ``MatMulNBits``). Each group keeps a float32 ``scale``
and a float32 ``zero`` point; a code ``q`` stands for ``(q − zero) · scale``:

- ``int4``: asymmetric, codes 0..15, ``scale = (max − min) / 15``; with
  ``zero_points="integer"`` over the group's range stretched to hold 0 and ``zero =
  round(−min / scale)``, a whole number in 0..15 (GPTQ's grid; ``MatMulNBits`` reads such zero
  points itself), with ``zero_points="float"`` on Q4_1's grid, ``zero = −min / scale``
  unrounded (weights that came from a Q4_1 GGUF land back on their own grid; the engine then
  adds an offset term to every linear). ``"auto"`` (the default) takes Q4_1's grid for a model
  whose weights already lie on it (:func:`choose_zero_points`), else whole zero points;
- ``int8``: symmetric, codes 1..255 around ``zero = 128``, ``scale = max|w| / 127`` (Q8_0).

``bf16`` is the one format without codes: every weight rounded to bfloat16 (embedding and head
included), each matmul run in bfloat16 with fp32 accumulation on the fp32 activations. On CPUs
with AVX512-BF16 (and on GPUs) oneDNN's bf16 matmul reads half the bytes of fp32 and is not
compute bound at a few rows: what a server decoding many streams together wants
(:class:`BF16Linear`).

Codes are stored packed the way ``MatMulNBits`` reads them (``[N, K · bits / 8]`` uint8; for 4 bits
the even element in the low nibble), so the fast engine uses the very codes the PyTorch reference
dequantizes. The reference path (:class:`QuantizedLinear`, :class:`QuantizedEmbedding`)
dequantizes on the fly, so every code path of :class:`Decoder` runs unchanged on a quantized model.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from linearize.config import Config, option
from linearize.models.decoder import Decoder

logger = logging.getLogger(__name__)

# --quant values and their bit widths; "none" keeps fp32 weights.
QUANTS: dict[str, int | None] = {"none": None, "int8": 8, "int4": 4, "bf16": 16}
GROUP_SIZE = 32
# How codes are chosen: the nearest code of each weight, or GPTQ on calibration text.
METHODS = ("round", "gptq")
# 4-bit zero points: whole numbers (MatMulNBits' own), floats (GGUF Q4_1's grid), or whichever
# the model's weights already lie on (auto; resolved when the model is quantized).
ZERO_POINTS = ("auto", "integer", "float")
Progress = Callable[[int, int], None]
# quantize's progress: (stage, done, total), stage "calibration" (blocks read) or "codes"
# (weights coded; GPTQ's about half of `linearize quantize`).
StageProgress = Callable[[str, int, int], None]


def check_quant(quant: str) -> str:
    """``quant`` if it is a ``--quant`` value, else a ``ValueError`` naming the allowed ones."""
    if quant not in QUANTS:
        raise ValueError(f"quant={quant!r}; allowed: {list(QUANTS)}")
    return quant


@dataclass
class QuantConfig(Config):
    """How a model's weights are quantized; recorded in a quantized directory's config.json."""

    keys_name: ClassVar[str] = "quantization keys"

    quant: str = option("weights of the linear layers: int8, int4 or bf16", "int4")
    group_size: int = option("weights per scale / zero point, along the input", GROUP_SIZE)
    # 8 bits by default, like GGUF's Q4_1 files (Q8_0 embeddings): at 4 bits the tied head
    # costs SmolLM2 +7 % perplexity, at 8 bits nothing measurable.
    head_quant: str = option("bit width of the embedding / LM head: int8 or int4", "int8")
    method: str = option(
        "how the codes are chosen: round (the nearest code of each weight) or gptq (each "
        "rounding error carried onto the weights not yet coded, weighted by calibration inputs)",
        "round",
    )
    zero_points: str = option(
        "int4 zero points: integer (whole codes 0..15, read by onnxruntime's MatMulNBits "
        "itself), float (GGUF Q4_1's grid: Q4_1 weights re-quantize losslessly; the engine "
        "adds an offset term to every linear) or auto (float for weights that lie on Q4_1's "
        "grid, such as a Q4_1 GGUF's, else integer; a quantized model records which)",
        "auto",
    )

    @classmethod
    def named(cls, quant: str) -> QuantConfig:
        """The default config of ``--quant quant`` (bf16: the head in bf16 as well)."""
        return cls(quant, head_quant="bf16" if quant == "bf16" else "int8")

    def validate(self) -> QuantConfig:
        allowed = [name for name, bits in QUANTS.items() if bits is not None]
        for key in ("quant", "head_quant"):
            value = getattr(self, key)
            if value not in allowed:
                raise ValueError(
                    f"{key}={value!r} is not a supported bit width; allowed: {allowed}"
                )
        if self.method not in METHODS:
            raise ValueError(f"method={self.method!r}; allowed: {list(METHODS)}")
        if self.zero_points not in ZERO_POINTS:
            raise ValueError(f"zero_points={self.zero_points!r}; allowed: {list(ZERO_POINTS)}")
        if (self.quant == "bf16") != (self.head_quant == "bf16"):
            raise ValueError(
                f"quant={self.quant!r} with head_quant={self.head_quant!r}: bf16 goes with bf16 "
                "(the whole model in bfloat16), int8 / int4 with an int8 / int4 head"
            )
        if self.group_size < 2 or self.group_size % 2:
            raise ValueError(f"group_size must be an even number >= 2, got {self.group_size}")
        return self

    @property
    def coded(self) -> bool:
        """Stored as codes + scales + zero points (int8 / int4), not as bfloat16 tensors."""
        return self.quant != "bf16"

    @property
    def bits(self) -> int:
        return QUANTS[self.quant]

    def head(self) -> QuantConfig:
        """The config of the embedding / LM head."""
        return dataclasses.replace(self, quant=self.head_quant)


# --- the codes --------------------------------------------------------------------------------


def quantize_weight(w: Tensor, config: QuantConfig) -> tuple[Tensor, Tensor, Tensor]:
    """``w: [N, K]`` → packed codes ``[N, K·bits/8]`` uint8, ``scale, zero: [N, K/group]``."""
    N, K = w.shape
    g = _groups(K, config)
    groups = w.detach().float().reshape(N, K // g, g)
    scale, zero, base = group_grid(groups, config.bits, _grid(config))
    codes = encode(groups, scale[..., None], base[..., None], config.bits)
    return pack(codes.to(torch.uint8).reshape(N, K), config.bits), scale, zero


def _groups(K: int, config: QuantConfig) -> int:
    """The group size, once ``K`` inputs are checked to split into whole groups."""
    if K % config.group_size:
        raise ValueError(
            f"in_features={K} is not a multiple of the quantization group ({config.group_size}): "
            "this layer cannot be quantized group-wise"
        )
    return config.group_size


def _grid(config: QuantConfig) -> str:
    """The zero points a lone weight is coded with (``"auto"`` is resolved for a whole model
    by :func:`quantize`; a weight coded alone takes whole ones)."""
    return "integer" if config.zero_points == "auto" else config.zero_points


def group_grid(
    groups: Tensor, bits: int, zero_points: str = "integer"
) -> tuple[Tensor, Tensor, Tensor]:
    """``scale, zero`` of each group of ``groups: [..., g]``, and ``base``, the value code 0
    stands for (int4: the group's minimum, or with integer ``zero_points`` the grid point at
    or below it)."""
    if bits == 4 and zero_points == "float":
        # Q4_1's grid (scale and minimum per group, float16 values as a Q4_1 file holds them),
        # with the minimum as a float zero point: weights dequantized from a Q4_1 GGUF
        # re-quantize onto their own grid, losslessly, and the engine reads the scales and
        # bases as float16 (engine.step.Kernel4Bit: 20 bytes a group, not 24).
        lo, hi = _half(groups.amin(-1)), groups.amax(-1)
        scale = _half((hi - lo) / 15)
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        return scale, -lo / scale, lo
    if bits == 4:
        # GPTQ's asymmetric grid: the range stretched to hold 0, so that a whole zero point
        # (code 0 at −zero·scale) reaches both ends to within half a step.
        lo, hi = groups.amin(-1).clamp(max=0), groups.amax(-1).clamp(min=0)
        scale = (hi - lo) / 15
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        zero = torch.round(-lo / scale).clamp(0, 15)
        return scale, zero, -zero * scale
    scale = groups.abs().amax(-1) / 127
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return scale, torch.full_like(scale, 128), -128 * scale


def _half(x: Tensor) -> Tensor:
    """``x`` rounded to float16 values (kept in its dtype), where float16 holds them."""
    rounded = x.half().to(x.dtype)
    return torch.where(rounded.isfinite(), rounded, x)


def on_half_grid(scale: Tensor, base: Tensor) -> bool:
    """Whether a weight's ``scale`` and ``base = −zero·scale`` (fp32) are float16 values, as
    Q4_1's grid puts them: the scales exactly, the bases to within the fp32 rounding of
    ``zero·scale`` (two ulps; float16 keeps 11 bits of them)."""
    s16, b16 = scale.half().float(), base.half().float()
    return bool(
        torch.equal(s16, scale)
        and s16.isfinite().all()
        and b16.isfinite().all()
        and ((b16 - base).abs() <= base.abs() * 2**-22).all()
    )


def encode(x: Tensor, scale: Tensor, base: Tensor, bits: int) -> Tensor:
    """The nearest codes (as floats) of ``x`` on a group's grid (``scale``, ``base`` broadcast)."""
    if bits == 4:
        return torch.round((x - base) / scale).clamp(0, 15)
    return torch.round(x / scale).clamp(-127, 127) + 128


def gptq_weight(
    w: Tensor, moments: Tensor, config: QuantConfig, *, damp: float = 0.01, block: int = 128
) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`quantize_weight` with the codes chosen by GPTQ (Frantar et al., 2023): column by
    column, each column's rounding error carried onto the columns not yet quantized, weighted
    by ``moments = Xᵀ X`` (``[K, K]``, the calibration inputs' second moments), so that the
    layer's outputs ``X wᵀ`` move least. A group's grid is set from its weights as they stand
    when its first column comes. Weights already on the grid keep their codes (no error to
    carry); weights a fine-tune moved by less than a code's step keep that move in the outputs,
    where rounding each to its nearest code would undo it."""
    N, K = w.shape
    g = _groups(K, config)
    w = w.detach().double().clone()
    H = moments.double().clone()
    dead = torch.diag(H) == 0  # inputs that never fire: their weights do not matter
    H[dead, dead] = 1
    w[:, dead] = 0
    H += damp * torch.diag(H).mean() * torch.eye(K, dtype=H.dtype)
    # Rows of the upper Cholesky factor of H⁻¹: how column j's error spreads to the later ones.
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    codes = torch.zeros(N, K)
    scale, zero = torch.zeros(N, K // g), torch.zeros(N, K // g)
    for b0 in range(0, K, block):
        b1 = min(b0 + block, K)
        err = torch.zeros(N, b1 - b0, dtype=w.dtype)
        for c in range(b0, b1):
            if c % g == 0:
                s, z, lo = group_grid(w[:, c : c + g].float(), config.bits, _grid(config))
                scale[:, c // g], zero[:, c // g] = s, z
                s, lo = s.double(), lo.double()
            codes[:, c] = encode(w[:, c], s, lo, config.bits)
            e = (w[:, c] - (codes[:, c] * s + lo)) / U[c, c]
            w[:, c:b1] -= e[:, None] * U[c, c:b1]
            err[:, c - b0] = e
        w[:, b1:] -= err @ U[b0:b1, b1:]
    return pack(codes.to(torch.uint8), config.bits), scale, zero


@torch.no_grad()
def input_moments(
    model: Decoder, tokens: Tensor, *, block: int = 1024, progress: Progress | None = None
) -> dict[nn.Module, Tensor]:
    """``Xᵀ X`` (float64, ``[K, K]``) of the inputs of every linear :func:`quantize` codes and
    of the LM head, by module, while ``model`` reads ``tokens: [T]`` in blocks of ``block``."""
    if tokens.dim() != 1 or len(tokens) < 2:
        raise ValueError(
            f"calibration tokens must be 1-D with >= 2 tokens, got shape {tuple(tokens.shape)}"
        )
    moments: dict[nn.Module, Tensor] = {}
    last: list[Tensor] = []  # [input, its XᵀX]: q/k/v and gate/up read one input in turn

    def hook(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        if not last or last[0] is not inputs[0]:
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).float()
            last[:] = [inputs[0], (x.T @ x).double()]
        xtx = last[1]
        moments[module] = moments[module] + xtx if module in moments else xtx.clone()

    linears = [linear for _, _, linear in _linears(model)] + [model.lm_head]
    hooks = [linear.register_forward_hook(hook) for linear in linears]
    was_training = model.training
    model.eval()
    try:
        starts = range(0, len(tokens) - 1, block)
        for i, start in enumerate(starts):
            model(tokens[start : start + block][None])
            if progress is not None:
                progress(i + 1, len(starts))
    finally:
        for hook in hooks:
            hook.remove()
        last.clear()
        model.train(was_training)
    return moments


def pack(codes: Tensor, bits: int) -> Tensor:
    """``[N, K]`` codes → ``[N, K·bits/8]`` bytes (4 bits: element 2i in the low nibble)."""
    if bits == 8:
        return codes.contiguous()
    return (codes[:, 0::2] | (codes[:, 1::2] << 4)).contiguous()


def unpack(packed: Tensor, bits: int) -> Tensor:
    """The inverse of :func:`pack`: ``[N, K]`` codes."""
    if bits == 8:
        return packed
    low, high = packed & 0x0F, packed >> 4
    return torch.stack([low, high], -1).reshape(packed.shape[0], -1)


def dequantize(packed: Tensor, scale: Tensor, zero: Tensor, bits: int) -> Tensor:
    """The weight the codes stand for, ``[N, K]`` in ``scale``'s dtype."""
    codes = unpack(packed, bits)
    N, K = codes.shape
    groups = codes.reshape(N, scale.shape[1], -1).to(scale.dtype)
    return ((groups - zero[..., None].to(scale.dtype)) * scale[..., None]).reshape(N, K)


# --- the reference modules --------------------------------------------------------------------


class QuantizedWeight(nn.Module):
    """Packed codes, scales and zero points of one ``[N, K]`` weight (buffers, so they save)."""

    def __init__(self, out_features: int, in_features: int, config: QuantConfig) -> None:
        super().__init__()
        self.bits, self.group_size = config.bits, config.group_size
        self.in_features, self.out_features = in_features, out_features
        groups = in_features // config.group_size
        self.register_buffer(
            "codes", torch.zeros(out_features, in_features * self.bits // 8, dtype=torch.uint8)
        )
        self.register_buffer("scale", torch.ones(out_features, groups))
        self.register_buffer("zero", torch.zeros(out_features, groups))

    def set(self, w: Tensor, config: QuantConfig, moments: Tensor | None = None) -> None:
        """Code ``w``: nearest codes, or GPTQ's given its inputs' ``moments`` (``Xᵀ X``)."""
        if moments is None:
            codes, scale, zero = quantize_weight(w, config)
        else:
            codes, scale, zero = gptq_weight(w, moments, config)
        self.codes.copy_(codes)
        self.scale.copy_(scale)
        self.zero.copy_(zero)

    def dequantize(self, rows: Tensor | None = None) -> Tensor:
        """The weight (or only its ``rows``), dequantized."""
        if rows is None:
            return dequantize(self.codes, self.scale, self.zero, self.bits)
        return dequantize(self.codes[rows], self.scale[rows], self.zero[rows], self.bits)


class _NBitsLinear(torch.autograd.Function):
    """``x @ dequantize(codes)ᵀ``, run eagerly as the dequantized matmul; exported to ONNX as
    ``com.microsoft::MatMulNBits`` reading the codes as they are.

    onnxruntime's fast kernels take only integer zero points (float ones run ~70x slower).
    8-bit codes and whole 4-bit zero points run as they are (8 bits: no zero-point input, 128
    is its default; 4 bits: the zero points packed two to a byte). 4-bit float zero points
    (Q4_1's grid) go into a separate term: ``(q − z)·s = (q − 8)·s + o`` with the offset
    ``o = (8 − z)·s``, and ``x·Wᵀ = MatMulNBits(x, q, s) + (x summed per group)·Oᵀ``, a matmul
    32 times smaller that reads fp32 offsets (a fifth of the node's time: docs/results.md,
    "Whole zero points")."""

    @staticmethod
    def forward(ctx, x, codes, scale, zero, zero_points, offset_t, bits, group_size, N, K, sizes):
        return F.linear(x, dequantize(codes, scale, zero, bits).to(x.dtype))

    @staticmethod
    def symbolic(g, x, codes, scale, zero, zero_points, offset_t, bits, group_size, N, K, sizes):
        blocks = K // group_size
        blob = g.op(
            "Constant", value_t=torch.tensor([N, blocks, group_size * bits // 8], dtype=torch.long)
        )
        inputs = [x, g.op("Reshape", codes, blob)]
        inputs.append(g.op("Reshape", scale, g.op("Constant", value_t=torch.tensor([-1]))))
        if zero_points is not None:
            inputs.append(zero_points)
        out = g.op(
            "com.microsoft::MatMulNBits",
            *inputs,
            K_i=K,
            N_i=N,
            bits_i=bits,
            block_size_i=group_size,
        )
        out.setType(linear_output_type(x, sizes, N))
        if offset_t is not None:
            # x's last axis into groups, the others as x has them at run time (−1 the first,
            # 0 copies an axis: a tree's scored rows vary from run to run).
            middle = [0] * (len(sizes) - 2)
            shape = torch.tensor([-1, *middle, blocks, group_size], dtype=torch.long)
            grouped = g.op("Reshape", x, g.op("Constant", value_t=shape))
            axis = g.op("Constant", value_t=torch.tensor([-1]))
            sums = g.op("ReduceSum", grouped, axis, keepdims_i=0)
            out = g.op("Add", out, g.op("MatMul", sums, offset_t))
            out.setType(linear_output_type(x, sizes, N))
        return out


def linear_output_type(x, sizes: tuple[int, ...], N: int):
    """The exported type of a linear's output ``[..., N]`` from its input ``x`` (a graph value;
    ``sizes``: its shape at export): the leading axes as ``x`` has them (None: any length at
    run time, a step's rows)."""
    known = x.type().varyingSizes()
    leading = list(known[:-1]) if known is not None else [None, *sizes[1:-1]]
    return x.type().with_sizes([*leading, N])


# A weight lies on Q4_1's grid when its float-grid codes err by less than this fraction of the
# whole-zero-point codes' error (measured: SmolLM2's linears, from a Q4_1 GGUF, 0 as shipped and
# 0–0.022 after the demo's training; Gaussian weights 0.96–0.97).
ON_GRID = 0.25


def choose_zero_points(model: Decoder, config: QuantConfig) -> str:
    """``config.zero_points``, with ``"auto"`` resolved for ``model``: ``"float"`` when its
    linears' weights lie on Q4_1's grid (a model from a Q4_1 GGUF, fine-tuned or not: there the
    nearest float-grid codes err by ~0.1 % of a weight's norm, whole zero points by ~8 %, a
    second rounding that cost SmolLM2's linearized model +18 % perplexity through the engine
    against +1.4 %), else ``"integer"`` (other weights, e.g. from fp16 / fp32 checkpoints: on
    Gaussian weights the two grids' errors are within 4 %, and whole zero points run a 1k step
    11 % faster on the engine)."""
    if config.zero_points != "auto":
        return config.zero_points
    if config.bits != 4:
        return "integer"
    on_grid = []
    for _, _, linear in _linears(model):
        w = linear.weight.detach().float()
        error = {}
        for grid in ("float", "integer"):
            coded = quantize_weight(w, dataclasses.replace(config, zero_points=grid))
            error[grid] = float((dequantize(*coded, 4) - w).norm())
        on_grid.append(error["float"] < ON_GRID * error["integer"])
    return "float" if on_grid and sum(on_grid) > len(on_grid) / 2 else "integer"


def whole_zero_points(zero: Tensor, bits: int) -> bool:
    """Whether ``zero`` (a weight's zero points) are whole numbers of the codes' range, which
    ``MatMulNBits`` reads itself (``zero_points="integer"``; 8 bits: always 128)."""
    return bool(((zero == zero.round()) & (zero >= 0) & (zero < 2**bits)).all())


def _export_zero_points(
    zero: Tensor, scale: Tensor, bits: int
) -> tuple[Tensor | None, Tensor | None]:
    """``(zero_points, offset_t)`` of a weight's export (computed in numpy, so the export
    records constants): 8 bits, neither (128 is ``MatMulNBits``' default); 4 bits with whole
    zero points, the zero points packed as ``MatMulNBits`` reads them (``[N · ⌈blocks / 2⌉]``
    uint8, the even block in the low nibble); with float ones, the offsets ``(8 − z)·s``
    transposed, ``[K/group, N]``."""
    z = zero.detach().float().cpu().numpy()
    if bits == 8:
        if not np.all(z == 128):  # (our 8-bit grid is symmetric: quantize writes 128)
            raise ValueError(f"8-bit zero points must all be 128, got values in {np.unique(z)}")
        return None, None
    if whole_zero_points(zero, bits):
        codes = torch.from_numpy(z.astype(np.uint8))
        codes = F.pad(codes, (0, codes.shape[1] % 2))  # (pack takes pairs)
        return pack(codes, 4).reshape(-1), None
    offset_t = np.ascontiguousarray(((8 - z) * scale.detach().float().cpu().numpy()).T)
    return None, torch.from_numpy(offset_t.astype(np.float32))


class QuantizedLinear(nn.Module):
    """``nn.Linear`` with a quantized weight, dequantized on every call (the reference path),
    or once, kept beside the codes (:func:`keep_dequantized`)."""

    def __init__(
        self, linear: nn.Linear, config: QuantConfig, shared: QuantizedWeight | None = None
    ) -> None:
        super().__init__()
        N, K = linear.out_features, linear.in_features
        self.in_features, self.out_features = K, N
        self.qweight = shared if shared is not None else QuantizedWeight(N, K, config)
        self.bias = linear.bias
        # The weight dequantized once (keep_dequantized): not saved, the same numbers.
        self.register_buffer("dense", None, persistent=False)

    @property
    def weight(self) -> Tensor:
        return self.qweight.dequantize()

    def forward(self, x: Tensor) -> Tensor:
        if torch.onnx.is_in_onnx_export():
            q = self.qweight
            zero_points, offset_t = _export_zero_points(q.zero, q.scale, q.bits)
            scale = q.scale.float()
            shape = (q.bits, q.group_size, q.out_features, q.in_features, tuple(x.shape))
            y = _NBitsLinear.apply(x, q.codes, scale, q.zero, zero_points, offset_t, *shape)
            return y if self.bias is None else y + self.bias
        weight = self.weight if self.dense is None else self.dense
        return F.linear(x, weight.to(x.dtype), self.bias)


class BF16Linear(nn.Module):
    """``nn.Linear`` with bfloat16 weights: ``x`` is rounded to bf16 for the matmul (fp32
    accumulation) and the output comes back in ``x``'s dtype; the bias stays as it was."""

    def __init__(self, linear: nn.Linear, weight: nn.Parameter | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        if weight is None:
            weight = nn.Parameter(linear.weight.detach().to(torch.bfloat16), requires_grad=False)
        self.weight = weight
        self.bias = linear.bias

    def forward(self, x: Tensor) -> Tensor:
        # (the weight's own dtype: a model moved to another dtype as a whole computes in that)
        y = F.linear(x.to(self.weight.dtype), self.weight).to(x.dtype)
        return y if self.bias is None else y + self.bias


class BF16Embedding(nn.Module):
    """``nn.Embedding`` with a bfloat16 table; lookups come back in the original table's dtype."""

    def __init__(self, embedding: nn.Embedding) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = embedding.weight.shape
        self.dtype = embedding.weight.dtype
        table = embedding.weight.detach().to(torch.bfloat16)
        self.weight = nn.Parameter(table, requires_grad=False)

    def forward(self, ids: Tensor) -> Tensor:
        return F.embedding(ids, self.weight).to(self.dtype)


class QuantizedEmbedding(nn.Module):
    """``nn.Embedding`` with a quantized table; a lookup dequantizes only the rows it reads."""

    def __init__(self, embedding: nn.Embedding, config: QuantConfig) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = embedding.weight.shape
        self.qweight = QuantizedWeight(self.num_embeddings, self.embedding_dim, config)

    @property
    def weight(self) -> Tensor:
        return self.qweight.dequantize()

    def forward(self, ids: Tensor) -> Tensor:
        flat = ids.reshape(-1)
        return self.qweight.dequantize(flat).reshape(*ids.shape, self.embedding_dim)


# --- whole models -----------------------------------------------------------------------------


def quant_config(model: Decoder) -> QuantConfig | None:
    """The model's quantization, or ``None`` for fp weights."""
    return getattr(model, "quantization", None)


def check_unquantized(model: Decoder, source: str = "this model") -> None:
    """A ``ValueError`` naming ``source`` if ``model`` is already quantized."""
    current = quant_config(model)
    if current is not None:
        raise ValueError(
            f"{source} is already quantized ({current.quant}); quantize its fp32 original instead"
        )


def _linears(model: Decoder) -> list[tuple[nn.Module, str, nn.Linear]]:
    """Every decoder-layer projection and MLP linear, as ``(parent, attribute, module)``."""
    found = []
    for layer in model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            found.append((attn, name, getattr(attn, name)))
        for name in ("gate_proj", "up_proj", "down_proj"):
            if hasattr(mlp, name):
                found.append((mlp, name, getattr(mlp, name)))
    return found


def _check_shapes(model: Decoder, config: QuantConfig) -> None:
    g = config.group_size
    for parent, name, linear in _linears(model):
        if linear.in_features % g:
            raise ValueError(
                f"{type(parent).__name__}.{name} has in_features={linear.in_features}, not a "
                f"multiple of the quantization group {g}: this model cannot be quantized"
            )
    if model.config.hidden_size % g:
        raise ValueError(
            f"hidden_size={model.config.hidden_size} is not a multiple of the quantization "
            f"group {g}: the embedding / LM head cannot be quantized"
        )


def quantize(
    model: Decoder,
    quant: str | QuantConfig,
    *,
    empty: bool = False,
    calibration: Tensor | None = None,
    progress: StageProgress | None = None,
) -> Decoder:
    """Quantize ``model``'s linears (at ``quant``), embedding and LM head (at ``head_quant``) in
    place (``empty``: only build the quantized modules, for loading saved codes). Returns it.

    With ``calibration`` tokens (``[T]``) the codes are GPTQ's (``method="gptq"``), fitted to
    the inputs the model's linears and head meet on them; a tied embedding takes the head's
    codes. Without, each weight takes its nearest code. ``progress(stage, i, n)``: per block
    of calibration read (stage ``"calibration"``), then per weight coded (``"codes"``)."""
    config = QuantConfig.named(quant) if isinstance(quant, str) else quant
    if calibration is not None:
        config = dataclasses.replace(config, method="gptq")
    config.validate()
    check_unquantized(model)
    if config.quant == "bf16":
        if calibration is not None:
            raise ValueError("bf16 has no codes to choose: calibration is for int8 / int4")
        return _to_bf16(model, config)
    if config.method == "gptq" and calibration is None and not empty:
        raise ValueError("method='gptq' chooses codes on calibration tokens: pass calibration")
    _check_shapes(model, config)
    if not empty:  # (empty: a saved model's config, resolved when it was quantized)
        config = dataclasses.replace(config, zero_points=choose_zero_points(model, config))
    moments = {}
    if calibration is not None:
        read = None if progress is None else functools.partial(progress, "calibration")
        moments = input_moments(model, calibration, progress=read)
    linears = list(_linears(model))
    tied = model.config.tie_embeddings
    total = len(linears) + (1 if tied else 2)
    coded = 0

    def code(weight: QuantizedWeight, w: Tensor, c: QuantConfig, table: Tensor | None) -> None:
        nonlocal coded
        if empty:
            return
        weight.set(w, c, table)
        coded += 1
        if progress is not None:
            progress("codes", coded, total)

    with torch.no_grad():
        for parent, name, linear in linears:
            module = QuantizedLinear(linear, config)
            code(module.qweight, linear.weight, config, moments.get(linear))
            setattr(parent, name, module)
        embedding = QuantizedEmbedding(model.embed_tokens, config.head())
        table = moments.get(model.lm_head) if tied else None
        code(embedding.qweight, model.embed_tokens.weight, config.head(), table)
        shared = embedding.qweight if tied else None
        head = QuantizedLinear(model.lm_head, config.head(), shared)
        if not tied:
            code(head.qweight, model.lm_head.weight, config.head(), moments.get(model.lm_head))
    model.embed_tokens, model.lm_head = embedding, head
    # Scales and zero points in the model's dtype, so dequantized weights match its activations.
    for module in model.modules():
        if isinstance(module, QuantizedWeight):
            module.to(model.dtype)
    model.quantization = config
    if not empty:  # (empty: the layout of a quantized directory being loaded)
        logger.info(
            "quantized the model's weights to %s (groups of %d, %s codes)",
            config.quant,
            config.group_size,
            config.method,
        )
    return model


def _to_bf16(model: Decoder, config: QuantConfig) -> Decoder:
    """Every linear, the embedding and the head in bfloat16 (the rest stays as it is)."""
    with torch.no_grad():
        for parent, name, linear in _linears(model):
            setattr(parent, name, BF16Linear(linear))
        embedding = BF16Embedding(model.embed_tokens)
        tied = model.config.tie_embeddings
        head = BF16Linear(model.lm_head, embedding.weight if tied else None)
    model.embed_tokens, model.lm_head = embedding, head
    model.quantization = config
    logger.info("rounded the model's weights to bfloat16")
    return model


def apply_quant(model: Decoder, quant: str | None, source: str = "this model") -> Decoder:
    """``--quant`` on a loaded model: ``None`` keeps it as it is, ``"none"`` keeps fp weights,
    ``"int8"`` / ``"int4"`` / ``"bf16"`` quantize fp weights; an already-quantized model passes
    only when asked for its own quantization."""
    if quant is None:
        return model
    check_quant(quant)
    current = quant_config(model)
    if current is None:
        return model if quant == "none" else quantize(model, quant)
    if quant != current.quant:
        raise ValueError(
            f"{source} is already quantized ({current.quant}); it cannot be used as {quant!r}: "
            "drop --quant, or quantize its fp32 original"
        )
    return model


def keep_dequantized(model: nn.Module) -> int:
    """Keep each quantized linear's weight dequantized beside its codes, so that a PyTorch path
    running many small steps (the server's batched rows) multiplies by it instead of
    dequantizing the whole matrix on every call: the same numbers, bit for bit, for the memory
    of the float weights. Nothing changes on disk; embedding lookups still dequantize only their
    rows. Returns the bytes added (0 when already kept, or for a model without codes)."""
    added = 0
    for module in model.modules():
        if isinstance(module, QuantizedLinear) and module.dense is None:
            module.dense = module.weight.detach()
            added += module.dense.numel() * module.dense.element_size()
    return added


def dequantized_state_dict(model: Decoder) -> dict[str, Tensor]:
    """``model``'s state dict with every int8 / int4 weight dequantized to float32 (what an fp
    model of the same architecture loads; bf16 weights stay as they are)."""
    state = {k: v for k, v in model.state_dict().items() if ".qweight." not in k}
    for name, module in model.named_modules():
        if isinstance(module, QuantizedLinear | QuantizedEmbedding):
            state[f"{name}.weight"] = module.weight.detach().float()
    return state


def quantized_numel(model: nn.Module) -> int:
    """Weights stored quantized (not parameters any more), each tied tensor once."""
    weights = {id(m): m for m in model.modules() if isinstance(m, QuantizedWeight)}
    return sum(w.out_features * w.in_features for w in weights.values())


def weight_bytes(model: Decoder) -> int:
    """Bytes of weights one decode step reads (every parameter and buffer, tied ones once)."""
    seen, total = set(), 0
    for tensor in [*model.parameters(), *model.buffers()]:
        if tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        total += tensor.numel() * tensor.element_size()
    return total
