"""The model's one-token step with a fixed-shape state: what a fast engine exports and runs.

Every layer's state becomes explicit tensors of fixed shape. The exact part (a linear layer's
kept tokens, a softmax layer's KV cache) is a **ring buffer** of ``C`` slots with a ``times``
array (−1 = empty): the host writes the new token's key/value into a free slot after the step,
so nothing is concatenated or re-allocated per token, and the graph reads the buffer in place.
Which slots a query sees and which tokens leave for ``S, z`` (with the weight
``decay^age`` each joins them with) come from the layer's own
:class:`~linearize.ops.linear_attn.LinearAttnSpec` (``is_local``), computed on the host and passed
in as small control tensors (``mask``, ``fold_index``, ``fold_weight``, ``fold_new``, and the
rotation of the sink query ``sink_rotation``), shared by every layer with the same layout.

A softmax layer is the spec "everything is local" over a cache of ``max_context`` slots. A
retained cache (``spec.retain = M``) takes the ``M`` ring slots after the sinks: the graph reads
them with the window and returns each slot's in-window attention (``score``); which tokens
they hold the host decides (:class:`~linearize.engine.ring.RingState`).

The norms, feature maps (their ``grouped`` form), output norm, down / o projections and the
head are the model's own modules; q/k/v and gate/up are the model's weights stacked into one
linear each (:mod:`linearize.engine.fuse`), RoPE a ``[K, K]`` rotation matrix built on the host;
the attention readout is the fixed-shape twin of :func:`linear_attn.step` (scores of the buffer
and of the new token concatenated, never the buffer itself). The graph is shaped for few nodes
(onnxruntime pays a few µs per node on one token). The PyTorch decoder stays the reference this
step is tested against.

:class:`RowsStep` is the same step for ``B`` rows at once (axis 0 of every input and output):
each row is a sequence of its own, with its own state and control tensors (its own position,
window and folds), so a server steps its sequences in one run and reads the weights once for all
of them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Literal, get_args

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from linearize.engine.fuse import fuse_linears
from linearize.layers.attention import Attention
from linearize.models.decoder import Decoder
from linearize.models.quantize import QuantizedLinear, linear_output_type, on_half_grid, unpack
from linearize.ops import linear_attn


@dataclass(frozen=True)
class Layout:
    """One layer's fixed-shape state: ring capacity ``C``, fold width ``J``, which parts."""

    spec: linear_attn.LinearAttnSpec
    capacity: int
    folds: int
    use_global: bool
    conv_taps: int
    kv_heads: int
    key_dim: int
    feature_dim: int
    self_global: bool
    # Sink keys scored by the query rotated at its position inside the kept cache
    # (``sink_positions="cache"``); the sinks always sit in the ring's first slots.
    cache_sinks: bool = False
    # Whether the new token can leave for S, z in its own step (groups, windows of one, pure
    # linear attention); a sliding window of W >= 2 keeps it, so the graph skips that term.
    new_folds: bool = True
    # The retained cache's M slots (ops/retain.py), in the ring right after the sinks: read in
    # the window's softmax like any slot (by the sink query, with sinks at cache positions).
    retained: int = 0
    # The element type of the ring's keys and values (KV_TYPES): float16 halves the bytes a
    # step reads, int8 codes with a float32 scale per group of KV_GROUP (llama.cpp's q8_0)
    # nearly halves them again; RingAttention reads them as they are, everything else through
    # ``widened``. See FixedStep.
    kv_type: str = "float32"

    @property
    def front(self) -> int:
        """The ring's first slots that never hold window tokens: the sinks, then the retained."""
        return self.spec.sinks + self.retained

    @property
    def key(self) -> tuple:
        """Layers with equal keys share their control tensors."""
        return (self.spec, self.capacity)


# The element types a softmax ring's keys and values can be stored in (Layout.kv_type).
KvType = Literal["float32", "float16", "int8"]
KV_TYPES = get_args(KvType)


def check_kv_type(kv_type: str) -> str:
    """``kv_type`` if it is one of :data:`KV_TYPES`, else a ``ValueError`` naming them."""
    if kv_type not in KV_TYPES:
        raise ValueError(f"kv_type={kv_type!r}; allowed: {list(KV_TYPES)}")
    return kv_type


# int8 rings: one scale per this many consecutive entries of a row (llama.cpp's q8_0 block).
KV_GROUP = 32


def unsupported(attn: Attention) -> str | None:
    """Why the fixed-shape step cannot run this attention (``None``: it can)."""
    kind = attn.config.kind
    if kind in ("softmax", "linear"):
        return None
    return f"{kind} attention has no decoding step"


def layout(attn: Attention, max_context: int, kv_type: str = "float32") -> Layout:
    """The layer's fixed-shape state; ``kv_type``: its ring's keys and values in that type
    where RingAttention reads it (:func:`uses_kernel`; int8 for head sizes a multiple of
    :data:`KV_GROUP`), else float32."""
    check_kv_type(kv_type)
    c = attn.config
    reason = unsupported(attn)
    if reason is not None:
        raise ValueError(
            f"the onnx engine does not run attention {c.name!r} ({reason}): use --engine torch"
        )
    if c.kind == "softmax":
        # Every token stays local (a window longer than any context): the cache never folds.
        spec = linear_attn.LinearAttnSpec(
            local="softmax", window="sliding", size=2**40, use_global=False
        )
        capacity = max_context
    else:
        spec, capacity = attn.spec, attn.spec.capacity
        if spec.use_global and spec.local != "none" and _global_off(attn):
            # α = 0: the window's output is (num + 0·g) / (den + 0·g) = num / den (or
            # num / den + 0·g), exactly what the window alone computes, so the step skips the
            # feature map, S, z and the feature ring (a converted model; the wide layers,
            # whose global part never runs on training blocks shorter than their window).
            spec = replace(spec, use_global=False)
    # Sliding windows lose at most one token per step; a completed group leaves all at once.
    folds = (
        0 if not spec.use_global or capacity == 0 else 1 if spec.window == "sliding" else capacity
    )
    far = torch.tensor([10**9])
    self_global = not bool(spec.is_local(far, far)[0, 0])
    feature_dim = attn.feature_map.feature_dim if attn.feature_map is not None else c.head_dim
    cache_sinks = (
        c.kind == "linear"
        and spec.sinks > 0
        and c.sink_positions == "cache"
        and attn.rope is not None
    )
    new_folds = spec.use_global and (spec.window == "group" or spec.size < 2)
    lay = Layout(
        spec,
        capacity + spec.retain,
        folds,
        spec.use_global,
        c.conv_size if c.conv == "causal" else 0,
        c.num_kv_heads,
        c.head_dim,
        feature_dim,
        self_global,
        cache_sinks,
        new_folds,
        spec.retain,
    )
    if kv_type == "float32" or not uses_kernel(lay, attn):
        return lay
    if kv_type == "int8" and lay.key_dim % KV_GROUP:
        return replace(lay, kv_type="float16")
    return replace(lay, kv_type=kv_type)


def _global_off(attn: Attention) -> bool:
    """Whether the layer's global part is weighted 0 (as its forward clamps α)."""
    return bool(torch.as_tensor(attn._alpha()).eq(0).all())


def state_inputs(i: int, lay: Layout) -> list[str]:
    """Names of layer ``i``'s state and control inputs, in the step's argument order."""
    names = []
    if lay.capacity:
        names += [f"k.{i}", f"v.{i}", f"mask.{i}"]
        if lay.kv_type == "int8":
            names += [f"k_scale.{i}", f"v_scale.{i}"]
        if lay.use_global:
            names.append(f"fk.{i}")
        if lay.cache_sinks:
            names.append(f"sink_rotation.{i}")
    if lay.retained:
        names += [f"score.{i}", f"inwindow.{i}", f"window_mask.{i}"]
    if lay.use_global:
        names += [f"S.{i}", f"z.{i}"]
        if lay.new_folds:
            names.append(f"fold_new.{i}")
        if lay.folds:
            names += [f"fold_index.{i}", f"fold_weight.{i}"]
    if lay.conv_taps:
        names.append(f"conv.{i}")
    return names


def state_outputs(i: int, lay: Layout) -> list[str]:
    names = []
    if lay.capacity:
        names += [f"new_k.{i}", f"new_v.{i}"]
        if lay.use_global:
            names.append(f"new_fk.{i}")
    if lay.retained:
        names.append(f"score_out.{i}")
    if lay.use_global:
        names += [f"S_out.{i}", f"z_out.{i}"]
    if lay.conv_taps:
        names.append(f"conv_out.{i}")
    return names


class FixedStep(nn.Module):
    """``step(x, rotation, *state) -> (logits, *new_state)`` for one token, batch 1.

    ``x: [1, 1, D]`` the token's embedding (the host looks it up), ``rotation: [K, K]`` its
    rotary embedding as a matrix (:func:`fill_rotation`); the state tensors as named by
    :func:`state_inputs` / :func:`state_outputs` (the control tensors without a row axis:
    ``mask: [C]``, ``fold_index, fold_weight: [J]``, ``fold_new: [1]``, ``sink_rotation: [K,
    K]``).
    """

    def __init__(
        self, model: Decoder, max_context: int, kernels: bool = False, kv_type: str = "float32"
    ) -> None:
        super().__init__()
        self.model = model
        # With ``kernels``, the rings RingAttention reads hold keys and values of ``kv_type``
        # (Layout.kv_type), as llama.cpp's KV cache (float16, or q8_0): at 8k the wide windows'
        # rings are most of what a step reads besides the weights.
        self.layouts = [
            layout(layer.self_attn, max_context, kv_type if kernels else "float32")
            for layer in model.layers
        ]
        # Linears that read the same input run as one (engine.fuse): q/k/v, and gate/up; with
        # ``kernels``, 4-bit ones in groups of 32 as linearize's MatMul4Bit op, 8-bit ones (and
        # the head) as its MatMul8Bit.
        linear = kernel_linear if kernels else (lambda module: module)
        self.qkv = nn.ModuleList(
            linear(
                fuse_linears(
                    [a.q_proj, a.k_proj, a.v_proj],
                    qkv_order(a.config.num_heads, a.config.num_kv_heads, a.config.head_dim),
                )
            )
            for a in (layer.self_attn for layer in model.layers)
        )
        self.gate_up = nn.ModuleList(
            linear(fuse_linears([layer.mlp.gate_proj, layer.mlp.up_proj])) for layer in model.layers
        )
        self.o_proj = nn.ModuleList(linear(layer.self_attn.o_proj) for layer in model.layers)
        self.down_proj = nn.ModuleList(linear(layer.mlp.down_proj) for layer in model.layers)
        self.lm_head = linear(model.lm_head)
        # With ``kernels``, softmax windows read by linearize's RingAttention op and 4-/8-bit
        # linears run by its MatMul4Bit / MatMul8Bit (engine.kernels); the reference (and the
        # tree graphs) keep the graph's own ops. ``self.kernels``: the graph holds any of them.
        self.kernels = kernels and (
            any(
                uses_kernel(lay, layer.self_attn)
                for lay, layer in zip(self.layouts, model.layers, strict=True)
            )
            or any(isinstance(module, (Kernel4Bit, Kernel8Bit)) for module in self.modules())
        )

    def input_names(self) -> list[str]:
        names = ["x", "rotation"]
        for i, lay in enumerate(self.layouts):
            names += state_inputs(i, lay)
        return names

    def output_names(self) -> list[str]:
        names = ["logits"]
        for i, lay in enumerate(self.layouts):
            names += state_outputs(i, lay)
        return names

    def forward(self, x: Tensor, rotation: Tensor, *state: Tensor) -> tuple[Tensor, ...]:
        return self.run(x, rotation, state, rows=False)

    def run(self, x: Tensor, rotation: Tensor, state, rows: bool) -> tuple[Tensor, ...]:
        """The step of one sequence, or with ``rows``, of :class:`RowsStep`'s rows."""
        outputs: list[Tensor] = []
        rest = list(state)
        # Activations as [B, D]: onnxruntime fuses a 4-bit offset term (MatMul + Add) into
        # one Gemm on 2-D tensors only.
        x = x[:, 0]
        for i, (layer, lay) in enumerate(zip(self.model.layers, self.layouts, strict=True)):
            names = state_inputs(i, lay)
            taken = {n.split(".")[0]: t for n, t in zip(names, rest, strict=False)}
            rest = rest[len(names) :]
            qkv = self.qkv[i](layer.input_layernorm(x))
            kernel = self.kernels and uses_kernel(lay, layer.self_attn)
            o, new = _attention_step(layer.self_attn, lay, qkv, rotation, taken, rows, kernel)
            x = x + self.o_proj[i](o)
            # (split at a constant: chunk would take the width from the tensor's shape)
            half = layer.mlp.gate_proj.out_features
            gate, up = self.gate_up[i](layer.post_attention_layernorm(x)).split(half, -1)
            x = x + self.down_proj[i](F.silu(gate) * up)
            outputs += [new[name.split(".")[0]] for name in state_outputs(i, lay)]
        logits = self.lm_head(self.model.norm(x))
        return (logits, *outputs)


class RowsStep(nn.Module):
    """:class:`FixedStep` for ``B`` rows at once, each a sequence of its own: ``x: [B, 1, D]``,
    ``rotation: [B, K, K]``, every state and control tensor with the rows on axis 0 (a layout's
    ``inwindow`` and ``window_mask`` excepted: the same for every row): ``mask: [B, C]``,
    ``fold_index: [B, Hkv·J]`` (each key head's leaving slots as rows of the rings flattened to
    ``[B·Hkv·C, ·]``), ``fold_weight: [B, J]``, ``fold_new: [B, 1]``, ``sink_rotation: [B, K,
    K]``. (A graph of its own: exported with the rows' number unknown, the one-sequence step
    ran 3–5 % slower, 10.46 against 10.13 ms at 1k in one process.)"""

    def __init__(self, step: FixedStep) -> None:
        super().__init__()
        self.step = step

    def input_names(self) -> list[str]:
        return self.step.input_names()

    def output_names(self) -> list[str]:
        return self.step.output_names()

    def forward(self, x: Tensor, rotation: Tensor, *state: Tensor) -> tuple[Tensor, ...]:
        return self.step.run(x, rotation, state, rows=True)


def _attention_step(
    attn: Attention,
    lay: Layout,
    qkv: Tensor,
    rotation: Tensor,
    s: dict[str, Tensor],
    rows: bool = False,
    kernel: bool = False,
) -> tuple[Tensor, dict[str, Tensor]]:
    """``qkv: [B, (H + 2·Hkv)·K]`` the token's projections in :func:`qkv_order` → the heads'
    output ``[B, H·K]`` (what ``o_proj`` reads) and the layer's new state. Each key head sits
    after its ``R`` query heads, so RoPE and the feature map (``grouped``: ``[B, Hkv, R+1,
    K]``, each group reading its key / value head's weights) run once on the query and key
    heads together. ``kernel``: the softmax window as one ``RingAttention`` node
    (:func:`uses_kernel`)."""
    c = attn.config
    H, Hkv, K = c.num_heads, c.num_kv_heads, c.head_dim
    R = H // Hkv
    qk, v = qkv.split([H * K + Hkv * K, Hkv * K], -1)
    qk, v = qk.view(-1, Hkv, R + 1, K), v.view(-1, Hkv, 1, K)
    features = q_sink = None
    has_map = attn.feature_map is not None
    if has_map and not c.global_rope:
        features = attn.feature_map.grouped(qk)
    if attn.rope is not None:
        if lay.cache_sinks:
            q_sink = _rotated(qk, s["sink_rotation"], rows)[:, :, :R]
        qk = _rotated(qk, rotation, rows)
    if features is None:
        features = attn.feature_map.grouped(qk) if has_map else qk
    q5, k = qk.split([R, 1], 2)  # [B, Hkv, R, K], [B, Hkv, 1, K]
    fq5, fk = features.split([R, 1], 2)
    new: dict[str, Tensor] = {}
    spec = lay.spec
    num = den = None
    if spec.local != "none":
        num, den, attention = _local(lay, q5, k, v, s, q_sink, rows, kernel)
        if attention is not None:
            # Each slot's in-window attention so far, and last the new token's own: the host
            # reads a leaving token's final score and moves the new one's into its slot.
            new["score_out"] = s["score"] + attention
    if lay.use_global:
        S, z = s["S"], s["z"]
        g_num = torch.matmul(fq5, S)
        g_den = torch.matmul(fq5, z.unsqueeze(-1))  # [B, Hkv, R, 1]
        if lay.self_global:
            score = (fq5 * fk).sum(-1, keepdim=True)
            g_num = g_num + score * v
            g_den = g_den + score
        alpha = attn._alpha()
        if spec.combine == "shared":
            # One denominator for the window and the global part (linear_attn.step).
            o = (num + alpha * g_num) / (den + alpha * g_den)
        else:
            if spec.normalize:
                g_num = g_num / (g_den + spec.eps)
            o = alpha * g_num if num is None else _normalized(num, den) + alpha * g_num
        S, z = _fold(lay, s, fk, v, S, z, rows)
        new.update(S_out=S, z_out=z)
        if lay.capacity:
            new["new_fk"] = fk
    else:
        o = _normalized(num, den)
    if lay.conv_taps:
        conv, tail = _conv_step(attn, v, s["conv"])
        o = o + conv
        new["conv_out"] = tail
    if lay.capacity:
        new.update(new_k=k, new_v=v)
    # As Attention._output, on [B, Hkv, R, V].
    if attn.output_norm is not None:
        o = attn.output_norm(o)
    return o.reshape(-1, H * K), new


def fill_rotation(R: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> None:
    """Write ``R: [K, K]`` (zero off its three diagonals) in place, with ``x @ R ==
    RotaryEmbedding.rotate(x, cos, sin)`` (``cos, sin: [K]``): rotating is ``x·cos +
    rotate_half(x)·sin``, and ``rotate_half`` is a signed permutation. One matmul in the graph
    instead of the six nodes of slicing, negating and concatenating; each output sums the same
    two products, so the numbers are the same."""
    K = cos.shape[-1]
    half = K // 2
    diagonal = R.reshape(-1)[:: K + 1]
    diagonal[:] = cos
    # x[i + half] · (−sin[i]) → out[i];  x[i] · sin[i + half] → out[i + half]
    R.reshape(-1)[half * K :: K + 1][:half] = -sin[:half]
    R.reshape(-1)[half :: K + 1][:half] = sin[half:]


def _rotated(qk: Tensor, rotation: Tensor, rows: bool) -> Tensor:
    """``qk: [B, Hkv, G, K]`` times ``rotation: [K, K]``, or with ``rows`` each row's
    ``rotation: [B, K, K]`` (one ``[Hkv·G, K]`` product per row: a broadcast over the heads
    would run one per head)."""
    if not rows:
        return torch.matmul(qk, rotation)
    _, Hkv, G, K = (int(n) for n in qk.shape)
    return torch.matmul(qk.reshape(-1, Hkv * G, K), rotation).view(-1, Hkv, G, K)


def _normalized(num: Tensor, den: Tensor | None) -> Tensor:
    return num if den is None else num / den


def qkv_order(H: int, Hkv: int, K: int) -> Tensor:
    """Rows of ``cat([q_proj, k_proj, v_proj])`` in the step's order: per key head ``g``, its
    ``R = H / Hkv`` query heads then the key head; then the value heads."""
    R = H // Hkv
    heads = [h for g in range(Hkv) for h in (*range(g * R, (g + 1) * R), H + g)]
    heads += range(H + Hkv, H + 2 * Hkv)
    return (torch.tensor(heads)[:, None] * K + torch.arange(K)).flatten()


def _local(
    lay: Layout,
    q5: Tensor,
    k: Tensor,
    v: Tensor,
    s: dict[str, Tensor],
    q_sink,
    rows: bool = False,
    kernel: bool = False,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """``q5: [B,Hkv,R,K]`` over the ring (keys ``s["k"]: [B,Hkv,C,K]``, values ``s["v"]:
    [B,Hkv,C,V]``, ``s["mask"]: [C]`` (``rows``: ``[B, C]``): added to softmax scores, multiplied
    into relu2 weights)
    and itself (``k, v: [B,Hkv,1,·]``): numerator ``[B,Hkv,R,V]`` and, for softmax, denominator
    ``[B,Hkv,R,1]`` (weights ``e^{s−m}``). ``q_sink`` (like ``q5``) scores the sinks, in the
    ring's first slots. Nothing here reads the ring's length ``C``: the exported graph takes
    rings of any length.

    With a retained cache (:mod:`~linearize.ops.retain`) its ``M`` tokens sit in the ring's
    slots after the sinks (``mask`` hides the empty ones), read in the same softmax by the sink
    query (keys stored un-rotated) or by ``q5`` (keys kept rotated): the readout needs nothing
    more. The third output is then each slot's and, last, the token's own in-window attention,
    summed over the ``R`` query heads, ``[B,Hkv,C+1]``: the softmax renormalised over the window
    (``s["inwindow"]: [C+1, 1]``, 0 on the retained slots; ``s["window_mask"]``: the same, 0 /
    −inf, for the window's largest score), whose entries on the retained slots mean nothing.

    Each query head is its own one-row product against the ring (``[1,K] @ [K,C]`` and
    ``[1,C] @ [C,V]``, the ring broadcast over the ``R`` heads, never copied): onnxruntime runs a
    one-row product as a streaming kernel over the ring's rows, and the ``R`` heads of a key
    head read the same ring while it is in cache. Per product on rings not in cache (scratch
    benchmark, 3 key heads): 31–32 / 70 / 379–397 µs at 516 / 1,280 / 8,192 slots, against 46–51 /
    94–102 / 549–705 µs for one ``R``-column product with the ring as the tall operand (its
    kernel pads 3 columns to 16) and more as the wide one (packed, copied, first). The scores
    come out as ``[R, C]`` rows, so the elementwise softmax runs along contiguous rows."""
    kb, vb = s["k"], s["v"]
    if lay.spec.local == "softmax":
        scale = 1 / math.sqrt(q5.shape[-1])
        # The sinks and the retained tokens (the ring's first slots) are read by the sink query.
        q_sink, front = (q5, 0) if q_sink is None else (q_sink * scale, lay.front)
        window = (s["window_mask"], s["inwindow"]) if lay.retained else (None, None)
        args = (q5 * scale, q_sink, kb, vb, s["mask"], k, v, *window, front)
        if kernel:
            scales = (s["k_scale"], s["v_scale"]) if lay.kv_type == "int8" else (None, None)
            num, den, attention = RingAttention.apply(*args, *scales)
            return num, den, attention if lay.retained else None
        return _softmax_readout(*args)
    mask = s["mask"][:, None, None] if rows else s["mask"]
    qn = linear_attn._unit(q5)
    keys = linear_attn._unit(kb).unsqueeze(2).transpose(-1, -2)
    scores = torch.relu(torch.matmul(qn.unsqueeze(-2), keys)[..., 0, :]) ** 2
    own = torch.relu((qn * linear_attn._unit(k)).sum(-1, keepdim=True)) ** 2
    weights = torch.cat([scores * mask, own], -1)
    ring = torch.matmul(weights[..., :-1].unsqueeze(-2), vb.unsqueeze(2))[..., 0, :]
    return ring + weights[..., -1:] * v, None, None


def uses_kernel(lay: Layout, attn: Attention) -> bool:
    """Whether the step can read this layer's ring with ``RingAttention``
    (:mod:`linearize.engine.kernels`): a softmax window (or cache) over a ring, head sizes a
    multiple of 8 floats, at most 8 query heads per key head."""
    return (
        lay.spec.local == "softmax"
        and attn.config.num_heads // attn.config.num_kv_heads <= 8
        and lay.capacity > 0
        and lay.key_dim % 8 == 0
        and lay.key_dim <= 512
    )


def _softmax_readout(
    q5: Tensor,
    q_sink: Tensor,
    kb: Tensor,
    vb: Tensor,
    mask: Tensor,
    k: Tensor,
    v: Tensor,
    window_mask: Tensor | None,
    inwindow: Tensor | None,
    front: int,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """The softmax window's numerator, denominator and (with a retained cache: ``window_mask``
    and ``inwindow`` given) each slot's in-window attention, from the queries scaled (``q_sink``
    scores the ring's first ``front`` slots) in the graph's own ops: the reference of
    ``RingAttention`` (``engine/kernels/ring_attention.cc``). ``mask``: ``[C]``, or each row's,
    ``[B, C]`` (the rows' step)."""
    if mask.dim() == 2:
        mask = mask[:, None, None]
    keys = kb.unsqueeze(2).transpose(-1, -2)  # [B,Hkv,1,K,C]: a view, fused into the product
    scores = torch.matmul(q5.unsqueeze(-2), keys)[..., 0, :]  # [B, Hkv, R, C]
    if front:
        sinks = torch.matmul(q_sink, kb[:, :, :front].transpose(-1, -2))
        scores = torch.cat([sinks, scores[..., front:]], -1)
    own = (q5 * k).sum(-1, keepdim=True)
    scores = torch.cat([scores + mask, own], -1)  # [B, Hkv, R, C+1]
    attention = None
    if window_mask is not None:
        # Weights e^{s−m} with m the window's own largest score, as the reference: a shared
        # denominator weighs the global part relative to it (linear_attn._retained_readout).
        m = (scores + window_mask).amax(-1, keepdim=True)
    else:
        m = scores.amax(-1, keepdim=True)
    weights = torch.exp(scores - m)
    den = weights.sum(-1, keepdim=True)
    if window_mask is not None:
        attention = (weights / torch.matmul(weights, inwindow)).sum(2)
    ring = torch.matmul(weights[..., :-1].unsqueeze(-2), vb.unsqueeze(2))[..., 0, :]
    return ring + weights[..., -1:] * v, den, attention


class RingAttention(torch.autograd.Function):
    """:func:`_softmax_readout` as one node of the exported graph, ``linearize::RingAttention``
    (run by :mod:`linearize.engine.kernels`' library); in PyTorch it computes the reference.
    ``mask``: ``[C]``, or ``[B, C]`` (the rows' step). Without a retained cache its third
    output is empty (``[B, Hkv, 0]``)."""

    @staticmethod
    def forward(
        ctx, q5, q_sink, kb, vb, mask, k, v, window_mask, inwindow, front, k_scale, v_scale
    ):
        kb, vb = widened(kb, k_scale), widened(vb, v_scale)
        num, den, attention = _softmax_readout(
            q5, q_sink, kb, vb, mask, k, v, window_mask, inwindow, front
        )
        if attention is None:
            attention = q5.new_zeros(q5.shape[0], q5.shape[1], 0)
        return num, den, attention

    @staticmethod
    def symbolic(g, q5, q_sink, kb, vb, mask, k, v, window_mask, inwindow, front, k_scale, v_scale):
        from linearize.engine.kernels import DOMAIN

        retained = window_mask is not None and not _is_none(window_mask)
        if not retained:
            window_mask = inwindow = mask  # read only with a retained cache
        codes = k_scale is not None and not _is_none(k_scale)  # int8 rings and their scales
        num, den, attention = g.op(
            f"{DOMAIN}::RingAttentionInt8" if codes else f"{DOMAIN}::RingAttention",
            q5,
            q_sink,
            kb,
            vb,
            mask,
            k,
            v,
            window_mask,
            inwindow,
            *((k_scale, v_scale) if codes else ()),
            front_i=front,
            retained_i=int(retained),
            outputs=3,
        )
        # The outputs' types and shapes (the exporter's shape inference cannot see into the op).
        B, H, R, K = q5.type().varyingSizes()
        num.setType(q5.type())
        den.setType(q5.type().with_sizes([B, H, R, 1]))
        attention.setType(q5.type().with_sizes([B, H, None]))
        return num, den, attention


def _is_none(value) -> bool:
    """Whether a symbolic function's argument is a ``None`` passed through the exporter."""
    return value.node().mustBeNone()


def _fold(
    lay: Layout, s: dict[str, Tensor], fk: Tensor, v: Tensor, S: Tensor, z: Tensor, rows: bool
):
    """``S, z`` after the leaving tokens: aged by ``decay``, then ring slots ``fold_index`` and
    the new token join with the host's weights (``decay^age``; 0 for padding)."""
    if lay.spec.decay < 1:
        S, z = S * lay.spec.decay, z * lay.spec.decay
    if lay.new_folds:
        w = s["fold_new"][:, :, None] if rows else s["fold_new"]  # rows: [B, 1] -> [B, 1, 1]
        S = S + (w[..., None] if rows else w) * torch.matmul(fk.transpose(-1, -2), v)
        z = z + w * fk[:, :, 0]
    if lay.folds:
        if rows:
            # Each row's own slots: ``fold_index: [B, Hkv·J]`` rows of the rings flattened to
            # ``[B·Hkv·C, ·]`` (the host's: row, head and slot), ``fold_weight: [B, J]``. (One
            # Gather of whole rows: a GatherElements of each entry took 0.4 ms of a 1k step.)
            index, weight = s["fold_index"].reshape(-1), s["fold_weight"][:, None, :, None]
            H, J = lay.kv_heads, lay.folds
            rows_of = lambda x, width: (  # noqa: E731
                x.reshape(-1, width).index_select(0, index).view(-1, H, J, width)
            )
            gk, gv = rows_of(s["fk"], lay.feature_dim), rows_of(s["v"], lay.key_dim)
            gs = rows_of(s["v_scale"], lay.key_dim // KV_GROUP) if "v_scale" in s else None
            gk, gv = gk * weight, widened(gv, gs)  # [B, Hkv, J, F]; gv: [B, Hkv, J, V]
        else:
            index, weight = s["fold_index"], s["fold_weight"]
            gk = s["fk"].index_select(2, index) * weight[:, None]
            gs = s["v_scale"].index_select(2, index) if "v_scale" in s else None
            gv = widened(s["v"].index_select(2, index), gs)  # [B, Hkv, J, V]
        S = S + torch.matmul(gk.transpose(-1, -2), gv)
        z = z + gk.sum(2)
    return S, z


def widened(x: Tensor, scales: Tensor | None = None) -> Tensor:
    """``x`` in float32: a ring's float16 rows (Layout.kv_type) through a Cast, read where they
    are (an export sees the dtype: a float32 ring gets no node); int8 codes times ``scales``
    (``[..., K / KV_GROUP]``, one per group of :data:`KV_GROUP` entries)."""
    if scales is not None:
        groups = x.float().unflatten(-1, (-1, KV_GROUP))
        return (groups * scales.unsqueeze(-1)).flatten(-2)
    return x if x.dtype == torch.float32 else x.float()


def kv_codes(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float32 rows ``x: [..., K]`` as int8 codes and their scales ``[..., K / KV_GROUP]``
    (llama.cpp's q8_0: a group's largest magnitude is ±127); :func:`widened` reads them back."""
    groups = x.reshape(*x.shape[:-1], -1, KV_GROUP)
    scales = np.abs(groups).max(-1) / np.float32(127)
    inverse = np.divide(1, scales, out=np.zeros_like(scales), where=scales > 0)
    codes = np.rint(groups * inverse[..., None]).astype(np.int8)
    return codes.reshape(x.shape), scales.astype(np.float32)


def kv_values(codes: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """:func:`kv_codes` undone, in numpy: float32 ``[..., K]``."""
    groups = codes.reshape(*codes.shape[:-1], -1, KV_GROUP).astype(np.float32)
    return (groups * scales[..., None]).reshape(codes.shape)


def _conv_step(attn: Attention, v: Tensor, tail: Tensor) -> tuple[Tensor, Tensor]:
    """The causal convolution's newest output and tail, ``tail: [B, Hkv, P-1, V]``."""
    window = torch.cat([tail, v], 2)  # [B, Hkv, P, V], oldest first
    B, Hkv, P, V = window.shape
    taps = attn.conv.flip(-1).view(Hkv, -1, P)
    return torch.matmul(taps, window), window[:, :, 1:]  # [B, Hkv, R, V]


def rows_in_blocks(*arrays: Tensor) -> tuple[Tensor, ...]:
    """A weight's per-group arrays, ``[N, K/32, ...]`` (codes, scales, bases), in the kernels'
    layout (``MatMul4Bit``, ``MatMul8Bit``): ``[N/8, K/32, 8, ...]``, row ``8b + r``'s group
    ``g`` at ``[b, g, r]``, so that a step reads the weight as one stream, each group's 8 rows
    side by side."""
    blocked = []
    for a in arrays:
        N, G, *rest = a.shape
        blocked.append(a.reshape(N // 8, 8, G, *rest).transpose(1, 2).contiguous())
    return tuple(blocked)


def rows_from_blocks(a: Tensor) -> Tensor:
    """:func:`rows_in_blocks`' inverse for one array: ``[N/8, K/32, 8, ...]`` → ``[N, K/32,
    ...]``."""
    B, G, _, *rest = a.shape
    return a.transpose(1, 2).reshape(8 * B, G, *rest)


class MatMul4Bit(torch.autograd.Function):
    """``x · Wᵀ`` for 4-bit codes in groups of 32, ``w = q·s + b`` per group, as one node of the
    exported graph, ``linearize::MatMul4Bit`` (:mod:`linearize.engine.kernels`); in PyTorch the
    dequantized product. ``codes: [N/8, K/32, 8, 16]`` (each row's group packed as
    ``MatMulNBits`` packs it, in blocks of 8 rows: :func:`rows_in_blocks`), ``scales, bases:
    [N/8, K/32, 8]`` (float32, or float16: the op reads either), ``sizes`` x's shape at export.
    Its arithmetic (``accuracy_level``, as ``MatMulNBits``') is set on the exported graph
    (``engine.onnx.export``)."""

    @staticmethod
    def forward(ctx, x, codes, scales, bases, sizes):
        codes, scales, bases = (rows_from_blocks(a) for a in (codes, scales, bases))
        N, groups, _ = codes.shape
        q = unpack(codes.reshape(N, -1), 4).reshape(N, groups, -1).float()
        weight = q * scales.float()[..., None] + bases.float()[..., None]
        return F.linear(x, weight.reshape(N, -1).to(x.dtype))

    @staticmethod
    def symbolic(g, x, codes, scales, bases, sizes):
        from linearize.engine.kernels import DOMAIN

        y = g.op(f"{DOMAIN}::MatMul4Bit", x, codes, scales, bases)
        y.setType(linear_output_type(x, sizes, 8 * codes.type().sizes()[0]))
        return y


class Kernel4Bit(nn.Module):
    """A 4-bit linear in groups of 32 run by ``MatMul4Bit`` in the exported graph (any zero
    points: the bases ``−z·s``, so Q4_1's float grid needs no offset term beside it); in
    PyTorch, the linear itself (the reference). Scales and bases on float16 values (Q4_1's
    grid as ``linearize quantize`` writes it, or a Q4_1 GGUF's) go to the op as float16: 20
    bytes a group of 32 read per token, not 24. All three go to the op in its blocks of 8 rows
    (:func:`rows_in_blocks`)."""

    def __init__(self, linear: QuantizedLinear) -> None:
        super().__init__()
        self.linear = linear
        q = linear.qweight
        groups = q.in_features // q.group_size
        codes = q.codes.reshape(q.out_features, groups, q.group_size // 2)
        scales = q.scale.detach().float()
        bases = -q.zero.detach().float() * scales
        if on_half_grid(scales, bases):
            scales, bases = scales.half(), bases.half()
        self.register_buffer("codes", codes, persistent=False)
        self.register_buffer("scales", scales, persistent=False)
        self.register_buffer("bases", bases, persistent=False)

    @staticmethod
    def runs(linear: nn.Module) -> bool:
        """Whether ``MatMul4Bit`` runs ``linear``: 4-bit codes in groups of 32, its rows a
        multiple of 8."""
        return (
            isinstance(linear, QuantizedLinear)
            and linear.qweight.bits == 4
            and linear.qweight.group_size == 32
            and linear.out_features % 8 == 0
        )

    def forward(self, x: Tensor) -> Tensor:
        if not torch.onnx.is_in_onnx_export():
            return self.linear(x)
        # (The op's blocks made as the graph is exported, once per model: the export folds
        # them into its weights, and an engine keeps no second copy of the codes.)
        blocks = rows_in_blocks(self.codes, self.scales, self.bases)
        y = MatMul4Bit.apply(x, *blocks, tuple(x.shape))
        return y if self.linear.bias is None else y + self.linear.bias


class MatMul8Bit(torch.autograd.Function):
    """``x · Wᵀ`` for 8-bit codes on Q8_0's grid in groups of 32, ``w = (q − 128)·s``, as one
    node of the exported graph, ``linearize::MatMul8Bit``; in PyTorch the dequantized product.
    ``codes: [N/8, K/32, 8, 32]``, ``scales: [N/8, K/32, 8]``: blocks of 8 rows, each group's
    rows side by side (:func:`rows_in_blocks`); ``sizes`` x's shape at export."""

    @staticmethod
    def forward(ctx, x, codes, scales, sizes):
        codes, scales = rows_from_blocks(codes), rows_from_blocks(scales)
        weight = (codes.float() - 128) * scales.float()[..., None]  # [N, K/32, 32]
        return F.linear(x, weight.flatten(1).to(x.dtype))

    @staticmethod
    def symbolic(g, x, codes, scales, sizes):
        from linearize.engine.kernels import DOMAIN

        y = g.op(f"{DOMAIN}::MatMul8Bit", x, codes, scales)
        y.setType(linear_output_type(x, sizes, 8 * codes.type().sizes()[0]))
        return y


class Kernel8Bit(nn.Module):
    """An 8-bit linear on Q8_0's grid in groups of 32 (an int4 model's head, an int8 model's
    every linear) run by ``MatMul8Bit`` in the exported graph; in PyTorch, the linear itself
    (the reference). Its codes and scales are the linear's, given to the op in its blocks of 8
    rows as the graph is exported."""

    def __init__(self, linear: QuantizedLinear) -> None:
        super().__init__()
        self.linear = linear
        q = linear.qweight
        self.register_buffer("codes", q.codes.reshape(q.out_features, -1, q.group_size), False)
        self.register_buffer("scales", q.scale.detach().float(), persistent=False)

    @staticmethod
    def runs(linear: nn.Module) -> bool:
        """Whether ``MatMul8Bit`` runs ``linear``: 8-bit codes in groups of 32 around 128
        (quantize's symmetric grid), its rows a multiple of 8."""
        if not isinstance(linear, QuantizedLinear):
            return False
        q = linear.qweight
        return (
            q.bits == 8
            and q.group_size == 32
            and q.out_features % 8 == 0
            and bool((q.zero == 128).all())
        )

    def forward(self, x: Tensor) -> Tensor:
        if not torch.onnx.is_in_onnx_export():
            return self.linear(x)
        y = MatMul8Bit.apply(x, *rows_in_blocks(self.codes, self.scales), tuple(x.shape))
        return y if self.linear.bias is None else y + self.linear.bias


def kernel_linear(linear: nn.Module) -> nn.Module:
    """``linear`` as the kernel's module that runs it (:class:`Kernel4Bit`,
    :class:`Kernel8Bit`), else as it is."""
    for kind in (Kernel4Bit, Kernel8Bit):
        if kind.runs(linear):
            return kind(linear)
    return linear
