"""The tree step (speculative verification) on the fixed-shape state, and its commit.

``TreeStep`` verifies up to ``max_nodes`` candidate tokens at once on top of the ring-buffer
state without changing it, through the shared core of every linear attention
(:func:`linear_attn.attend`: explicit keys with their times and a visibility mask) and the
unfolded tree convolution (:func:`causal_conv.tree_taps`). Smaller trees are padded with nodes
that see only themselves (their outputs are ignored). The host builds the visibility and tap
index from the :class:`~linearize.ops.tree.Tree`; the accepted path is committed on the host
(:meth:`RingState.commit_tree`), from the nodes' keys, features and values the pass returned.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from linearize.engine.fuse import fuse_linears
from linearize.engine.step import Layout, layout, widened
from linearize.models.decoder import Decoder
from linearize.ops import causal_conv, linear_attn
from linearize.ops.tree import Tree


def tree_inputs(i: int, lay: Layout) -> list[str]:
    names = []
    if lay.capacity:
        names += [f"k.{i}", f"v.{i}", f"times.{i}"]
        if lay.kv_type == "int8":
            names += [f"k_scale.{i}", f"v_scale.{i}"]
        if lay.use_global:
            names.append(f"fk.{i}")
    if lay.retained:
        names += [f"score.{i}", f"rtimes.{i}", f"rscore.{i}"]
    if lay.use_global:
        names += [f"S.{i}", f"z.{i}"]
    if lay.conv_taps:
        names += [f"conv.{i}", f"conv_index.{i}"]
    return names


def tree_outputs(i: int, lay: Layout) -> list[str]:
    names = [f"node_k.{i}", f"node_v.{i}"]
    names += [f"node_fk.{i}"] if lay.use_global else []
    return names + ([f"node_attention.{i}"] if lay.retained else [])


class TreeStep(nn.Module):
    """``tree(x, cos, sin, t_nodes, pos, scored, visible, sink_cos, sink_sin, *state)
    -> (logits, hidden, *node k/v/fk)``.

    ``x: [1, N, D]`` the nodes' embeddings, ``cos, sin: [N, K]``, ``t_nodes: [N]`` their times,
    ``pos: []`` the committed length (the time ``S, z`` are decayed to), ``scored: [R]`` the
    nodes whose logits ``[1, R, V]`` are computed (``hidden`` is every node's), per distinct layout
    ``visible: [N, C + N]`` (ring slots, then nodes: ancestors and self) and, for sinks at
    cache positions, the sink query's rotation ``sink_cos, sink_sin: [N, K]``.

    With ``chain``, the graph takes only chains (node ``i``'s parent ``i − 1``, then padding
    nodes): prefill chunks and draft or lookup proposals. The same outputs; a retained cache
    ranks the tokens that leave by their totals (``linear_attn.Retaining.chain``), since along
    a chain a node's ancestors are every node before it. ``kv_type``: the rings' keys and
    values as the step's state holds them (:class:`~linearize.engine.step.Layout`).
    """

    def __init__(
        self, model: Decoder, max_context: int, chain: bool = False, kv_type: str = "float32"
    ) -> None:
        super().__init__()
        self.model = model
        self.chain = chain
        # (``kv_type``: the step's rings', Layout.kv_type: int8 rings come with their scales)
        self.layouts = [layout(layer.self_attn, max_context, kv_type) for layer in model.layers]
        # As in the step (engine.fuse): q/k/v, and gate/up, as one linear each.
        self.qkv = nn.ModuleList(
            fuse_linears([a.q_proj, a.k_proj, a.v_proj])
            for a in (layer.self_attn for layer in model.layers)
        )
        self.gate_up = nn.ModuleList(
            fuse_linears([layer.mlp.gate_proj, layer.mlp.up_proj]) for layer in model.layers
        )

        # One visibility input per distinct layout (they share the ring's times), and one sink
        # rotation per distinct layout with sinks at cache positions.
        self.keys = list(dict.fromkeys(lay.key for lay in self.layouts))
        self.sink_keys = list(dict.fromkeys(lay.key for lay in self.layouts if lay.cache_sinks))
        # Per distinct layout with a retained cache, the key columns that may leave the window.
        self.retain_keys = list(dict.fromkeys(lay.key for lay in self.layouts if lay.retained))

    def input_names(self) -> list[str]:
        names = ["x", "cos", "sin", "t_nodes", "pos", "scored"]
        names += [f"visible.{j}" for j in range(len(self.keys))]
        for j in range(len(self.sink_keys)):
            names += [f"sink_cos.{j}", f"sink_sin.{j}"]
        names += [f"leave.{j}" for j in range(len(self.retain_keys))]
        for i, lay in enumerate(self.layouts):
            names += tree_inputs(i, lay)
        return names

    def output_names(self) -> list[str]:
        names = ["logits", "hidden"]
        for i, lay in enumerate(self.layouts):
            names += tree_outputs(i, lay)
        return names

    def forward(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        t_nodes: Tensor,
        pos: Tensor,
        scored: Tensor,
        *rest: Tensor,
    ):
        visible = dict(zip(self.keys, rest[: len(self.keys)], strict=True))
        rest = list(rest[len(self.keys) :])
        sinks = {key: (rest[2 * j], rest[2 * j + 1]) for j, key in enumerate(self.sink_keys)}
        rest = rest[2 * len(self.sink_keys) :]
        leave = dict(zip(self.retain_keys, rest[: len(self.retain_keys)], strict=True))
        rest = rest[len(self.retain_keys) :]
        controls = (t_nodes, pos, visible, sinks, leave)
        outputs: list[Tensor] = []
        for i, (layer, lay) in enumerate(zip(self.model.layers, self.layouts, strict=True)):
            names = tree_inputs(i, lay)
            s = {n.split(".")[0]: t for n, t in zip(names, rest, strict=False)}
            rest = rest[len(names) :]
            qkv = self.qkv[i](layer.input_layernorm(x))
            h, node = _attention_tree(layer.self_attn, lay, qkv, cos, sin, controls, s, self.chain)
            x = x + h
            gate, up = self.gate_up[i](layer.post_attention_layernorm(x)).chunk(2, -1)
            x = x + layer.mlp.down_proj(F.silu(gate) * up)
            outputs += [node[name.split(".")[0]] for name in tree_outputs(i, lay)]
        hidden = self.model.norm(x)
        # The LM head on the nodes whose logits are wanted (a prefill chunk: its last).
        logits = self.model.lm_head(hidden.index_select(1, scored))
        return (logits, hidden, *outputs)


def _attention_tree(attn, lay: Layout, qkv: Tensor, cos, sin, controls, s, chain: bool):
    """``qkv: [B, N, (H + 2·Hkv)·K]`` the nodes' q, k, v projections, concatenated."""
    t_nodes, pos, visible, sinks, leave = controls
    c = attn.config
    B, N, _ = qkv.shape
    H, Hkv, K = c.num_heads, c.num_kv_heads, c.head_dim
    q, k, v = qkv.split([H * K, Hkv * K, Hkv * K], -1)
    q, k, v = q.view(B, N, H, K), k.view(B, N, Hkv, K), v.view(B, N, Hkv, K)
    # As Attention._project: features before or after RoPE, the sink query rotated apart.
    has_map = attn.feature_map is not None
    early = has_map and not c.global_rope
    fq, fk = (attn.feature_map(q), attn.feature_map(k)) if early else (None, None)
    q_sink = None
    if attn.rope is not None:
        if lay.cache_sinks:
            sink_cos, sink_sin = sinks[lay.key]
            q_sink = attn.rope.rotate(q, sink_cos[:, None], sink_sin[:, None])
        q, k = (
            attn.rope.rotate(q, cos[:, None], sin[:, None]),
            attn.rope.rotate(k, cos[:, None], sin[:, None]),
        )
    if not early:
        fq, fk = (attn.feature_map(q), attn.feature_map(k)) if has_map else (q, k)
    kn, fkn, vn = (t.transpose(1, 2) for t in (k, fk, v))  # [B, Hkv, N, ·]
    if lay.capacity:
        keys = torch.cat([widened(s["k"], s.get("k_scale")), kn], 2)
        values = torch.cat([widened(s["v"], s.get("v_scale")), vn], 2)
        feats = torch.cat([s["fk"], fkn], 2) if lay.use_global else keys
        t_keys = torch.cat([s["times"], t_nodes])
    else:
        keys, values, feats, t_keys = kn, vn, fkn, t_nodes
    S = s["S"] if lay.use_global else None
    z = s["z"] if lay.use_global else None
    R = H // Hkv
    group = lambda t: t.transpose(1, 2).reshape(B, Hkv, R, N, t.shape[-1])  # noqa: E731
    retaining = None
    if lay.retained:
        # Each node reads the cache (the ring's slots after the sinks, which the ring's own
        # columns hide: their times say "retained") and the ring tokens that left before it,
        # ranked by the attention of its own ancestors (linear_attn._retained_readout).
        base = torch.cat([s["score"][..., :-1], s["score"].new_zeros(B, Hkv, N)], 2)
        inv_freq = attn.rope.inv_freq if lay.cache_sinks else None
        front = slice(lay.spec.sinks, lay.front)
        rk, rv = (
            widened(s[x][:, :, front], s[f"{x}_scale"][:, :, front] if f"{x}_scale" in s else None)
            for x in ("k", "v")
        )
        cache = (rk, rv, s["rtimes"], s["rscore"])
        retaining = linear_attn.Retaining(*cache, base, inv_freq, False, leave[lay.key], chain)
    o, attention = linear_attn.attend(
        lay.spec, group(q), keys, values, group(fq), feats, t_nodes, t_keys,
        visible[lay.key] > 0, S, z, attn._alpha(), s_time=pos,
        q_sink=None if q_sink is None else group(q_sink), retaining=retaining,
        sinks_at_ends=bool(lay.capacity), global_cols=leave.get(lay.key),
    )  # fmt: skip
    o = o.reshape(B, H, N, K).transpose(1, 2)
    if lay.conv_taps:
        o = o + causal_conv.tree_taps(v, attn.conv, s["conv"], s["conv_index"])
    node = {"node_k": kn, "node_v": vn, "node_fk": fkn, "node_attention": attention}
    return attn._output(o), node


def leave_width(lay: Layout, nodes: int) -> int:
    """How many key columns (ring slots, then nodes) may leave a retained layer's window during
    a tree of ``nodes`` nodes: on a sliding window one ring token per level and the nodes a
    deeper node no longer sees, at most ``2 · nodes``; a group can empty the ring."""
    return 2 * nodes if lay.spec.window == "sliding" else lay.capacity + nodes


def leaving_columns(
    lay: Layout, times: np.ndarray, t_nodes: np.ndarray, visible: np.ndarray, width: int
) -> np.ndarray:
    """The key columns (ring slots with ``times``, then nodes at ``t_nodes``) that leave the
    window for some node that sees them, sinks excluded, in the order they leave (by time: what
    a chain's ranking takes), padded to ``width`` with −1."""
    t_keys = np.concatenate([times, t_nodes])
    local = lay.spec.is_local(t_keys, t_nodes)  # [N, C + N]
    leaving = (visible > 0) & ~local & (t_keys >= lay.spec.sinks)
    cols = np.flatnonzero(leaving.any(0))
    cols = cols[np.argsort(t_keys[cols], kind="stable")]
    if len(cols) > width:
        raise AssertionError(f"{len(cols)} columns leave the window; the graph takes {width}")
    out = np.full(width, -1, dtype=np.int64)
    out[: len(cols)] = cols
    return out


def tree_controls(
    tree: Tree, max_nodes: int, pos: int, rings: list[np.ndarray], taps: set[int]
) -> dict[str, np.ndarray]:
    """The host-side tree inputs: node times, visibility per distinct layout (``rings``: each
    one's ``times``), conv tap indices per tap count, all padded to ``max_nodes`` (a padded node
    sees only itself)."""
    N = len(tree)
    if max_nodes < N:
        raise ValueError(
            f"a tree of {N} nodes is past what the exported tree graph takes ({max_nodes}); "
            "use a smaller tree or rebuild the engine with a larger max_tree"
        )
    depths = np.zeros(max_nodes, dtype=np.int64)
    depths[:N] = tree.depths.numpy()
    ancestors = np.eye(max_nodes, dtype=bool)
    ancestors[:N, :N] = tree.ancestors.numpy()
    out = {"t_nodes": pos + depths}
    for j, times in enumerate(rings):
        # A padded node sees itself alone, not the ring: what it attends must not count in a
        # chain's totals (a retained cache's ranking).
        ring = np.zeros((max_nodes, len(times)), dtype=bool)
        ring[:N] = times >= 0
        out[f"visible.{j}"] = np.concatenate([ring, ancestors], 1).astype(np.float32)
    padded = Tree.from_parents([*tree.parents.tolist(), *([-1] * (max_nodes - N))])
    for P in taps:
        out[f"conv_index.{P}"] = causal_conv.tree_index(padded, P).numpy().astype(np.int64)
    return out
