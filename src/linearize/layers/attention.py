"""The attention layer: projections, RoPE, feature map, local/global/conv parts, form dispatch."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from linearize.layers.config import FORMS, AttentionConfig, Form, attention_config
from linearize.layers.feature_maps import build_feature_map
from linearize.layers.rope import RotaryEmbedding
from linearize.ops import causal_conv, linear_attn, linear_attn_rows, linformer, softmax
from linearize.ops.tree import Tree


@dataclass
class AttentionState:
    """One layer's decoding state: the attention part and the convolution tail."""

    attn: linear_attn.LinearAttnState | softmax.KVCache
    conv: Tensor | None = None

    @property
    def pos(self) -> int:
        """Tokens seen so far; the next token's position."""
        return self.attn.pos

    def nbytes(self) -> int:
        conv = 0 if self.conv is None else self.conv.numel() * self.conv.element_size()
        return self.attn.nbytes() + conv


@dataclass
class AttentionRows:
    """One layer's states of the sequences decoded together (rows ``0..n-1`` in use), written
    in place by :meth:`Attention.step_rows`: one batched ring state and conv tails
    ``[R, Hkv, P-1, V]`` where the attention has a batched step, else one state per row."""

    spec: linear_attn.LinearAttnSpec | None
    attn: linear_attn_rows.LinearAttnRows | None
    conv: Tensor | None = None
    states: list[AttentionState] = field(default_factory=list)

    @property
    def batched(self) -> bool:
        return self.attn is not None

    def put(self, i: int, state: AttentionState) -> None:
        """Row ``i`` (at most one past the last) becomes ``state`` (batch 1)."""
        if not self.batched:
            self.states[i : i + 1] = [state]
            return
        linear_attn_rows.write_row(self.spec, self.attn, i, state.attn)
        if self.conv is not None:
            self.conv[i] = state.conv[0]

    def get(self, i: int) -> AttentionState:
        """Row ``i`` as a batch-1 state (a copy where the rows are batched)."""
        if not self.batched:
            return self.states[i]
        conv = None if self.conv is None else self.conv[i : i + 1].clone()
        return AttentionState(linear_attn_rows.read_row(self.spec, self.attn, i), conv)

    def move(self, src: int, dst: int) -> None:
        """Row ``dst`` becomes row ``src`` (a row leaving makes room this way)."""
        if not self.batched:
            self.states[dst] = self.states[src]
            return
        linear_attn_rows.copy_row(self.attn, src, dst)
        if self.conv is not None:
            self.conv[dst] = self.conv[src]

    def truncate(self, n: int) -> None:
        """Rows ``n..`` are no longer in use."""
        del self.states[n:]

    def resize(self, capacity: int) -> None:
        """Room for ``capacity`` rows (the first rows kept)."""
        if self.batched:
            self.attn = linear_attn_rows.resize_rows(self.attn, capacity)
            if self.conv is not None:
                conv = self.conv.new_zeros(capacity, *self.conv.shape[1:])
                n = min(capacity, self.conv.shape[0])
                conv[:n] = self.conv[:n]
                self.conv = conv

    def nbytes(self, n: int) -> int:
        """Bytes of the states of rows ``0..n-1``."""
        if not self.batched:
            return sum(state.nbytes() for state in self.states[:n])
        conv = 0 if self.conv is None else self.conv[0].numel() * self.conv.element_size()
        return n * (self.attn.row_nbytes() + conv)


@dataclass
class TreeKV:
    """The keys, feature-mapped keys and values a tree pass computed per node, so an accepted
    path commits without recomputation: ``k: [B, Hkv, N, K]``, ``fk: [B, Hkv, N, F]``,
    ``v: [B, Hkv, N, V]``."""

    k: Tensor
    fk: Tensor
    v: Tensor
    # With a retained cache the committed state depends on the queries too ([B, N, H, ·]).
    q: Tensor | None = None
    fq: Tensor | None = None
    q_sink: Tensor | None = None


# The parameters a conversion adds to a softmax layer (attributes set in ``Attention.__init__``
# beside the q/k/v/o projections it keeps): what attention transfer trains.
NEW_PARAMETERS = ("feature_map", "alpha", "conv", "output_norm", "seq_proj_k", "seq_proj_v")


def is_new_parameter(name: str) -> bool:
    """True for parameters the linearization added (``name`` relative to the layer or model)."""
    leaf = name.split("self_attn.", 1)[-1]
    return leaf.split(".", 1)[0] in NEW_PARAMETERS


def has_new_parameters(module: nn.Module) -> bool:
    """Whether ``module`` (a model or a layer) has anything for attention transfer to train."""
    return any(is_new_parameter(n) and p.is_floating_point() for n, p in module.named_parameters())


class Attention(nn.Module):
    """``layer(x, *, state=None, form="auto") -> (y, state)``, ``x, y: [B, T, D]``.

    ``state=None`` starts a sequence; positions come from the state. ``attend_tree`` verifies
    a tree of candidate tokens without touching the state; ``commit`` appends an accepted path.
    """

    def __init__(self, config: AttentionConfig) -> None:
        super().__init__()
        self.config = config = config.validate()
        D, H, Hkv, K = config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim
        self.q_proj = nn.Linear(D, H * K, bias=config.qkv_bias)
        self.k_proj = nn.Linear(D, Hkv * K, bias=config.qkv_bias)
        self.v_proj = nn.Linear(D, Hkv * K, bias=config.qkv_bias)
        self.o_proj = nn.Linear(H * K, D, bias=config.o_bias)
        self.rope = RotaryEmbedding(K, config.rope_theta) if config.rope_theta else None
        self.feature_map = None
        if config.kind == "linear":
            self.spec = config.linear_spec()
            if config.use_global:
                self.feature_map = build_feature_map(config.feature_map, Hkv, K, config.feature_dim)
        if config.learn_alpha and config.kind == "linear" and config.use_global:
            # α weighs the global part: without one it would be a parameter nothing reads.
            self.alpha = nn.Parameter(torch.tensor(float(config.alpha)))
        else:
            self.alpha = float(config.alpha)
        if config.conv != "none":
            # Zero taps: the converted layer starts as its attention part alone.
            self.conv = nn.Parameter(torch.zeros(H, config.conv_size))
        self.output_norm = nn.RMSNorm(K, eps=1e-6) if config.output_norm else None
        if config.kind == "linformer":
            scale = 1 / math.sqrt(config.landmarks)
            self.seq_proj_k = nn.Parameter(torch.randn(config.landmarks, config.max_length) * scale)
            self.seq_proj_v = nn.Parameter(torch.randn(config.landmarks, config.max_length) * scale)

    @property
    def is_causal(self) -> bool:
        return self.config.is_causal

    # --- state ------------------------------------------------------------------------------

    def _require_state(self) -> None:
        if not self.is_causal:
            raise ValueError(
                f"attention {self.config.name!r} is not causal: it has no decoding state "
                "(parallel form only, not usable in a decoder)"
            )

    def init_state(
        self,
        batch_size: int,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> AttentionState:
        self._require_state()
        c = self.config
        Hkv, K = c.num_kv_heads, c.head_dim
        if c.kind == "softmax":
            attn = softmax.init_state(batch_size, Hkv, K, K, dtype=dtype, device=device)
        else:
            F = self.feature_map.feature_dim if self.feature_map is not None else K
            attn = linear_attn.init_state(
                self.spec, batch_size, Hkv, K, F, K, dtype=dtype, device=device
            )
        conv = None
        if c.conv == "causal":
            conv = causal_conv.init_state(
                batch_size, Hkv, K, c.conv_size, dtype=dtype, device=device
            )
        return AttentionState(attn, conv)

    @property
    def batches_rows(self) -> bool:
        """Whether rows decode in one batched step (:mod:`linearize.ops.linear_attn_rows`);
        otherwise :meth:`step_rows` runs each row on its own state."""
        c = self.config
        return c.kind == "linear" and self.is_causal and linear_attn_rows.supports_rows(self.spec)

    def init_rows(
        self,
        capacity: int,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> AttentionRows:
        """Empty states for up to ``capacity`` rows decoded together (see :meth:`step_rows`)."""
        self._require_state()
        if not self.batches_rows:
            return AttentionRows(None, None)
        c = self.config
        Hkv, K = c.num_kv_heads, c.head_dim
        F = self.feature_map.feature_dim if self.feature_map is not None else K
        zeros = dict(dtype=dtype, device=device)
        attn = linear_attn_rows.init_rows(self.spec, capacity, Hkv, K, F, K, **zeros)
        conv = None
        if c.conv == "causal":
            conv = causal_conv.init_state(capacity, Hkv, K, c.conv_size, **zeros)
        return AttentionRows(self.spec, attn, conv)

    def step_rows(self, x: Tensor, rows: AttentionRows, positions: Tensor) -> Tensor:
        """One token for each of rows ``0..B-1`` of ``rows``, which are advanced in place:
        ``x: [B, 1, D]``, ``positions: [B, 1]`` (each row's). The same as ``forward`` on each
        row alone; one batched attention step where :attr:`batches_rows`."""
        B = x.shape[0]
        if not rows.batched:
            y, rows.states[:B] = self.forward_rows(x, rows.states[:B])
            return y
        q, k, v, fq, fk, q_sink = self._project(x, positions)
        o, _ = linear_attn_rows.step_rows(
            self.spec,
            q[:, 0],
            k[:, 0],
            v[:, 0],
            fq[:, 0],
            fk[:, 0],
            rows.attn,
            self._alpha(),
            q_sink=None if q_sink is None else q_sink[:, 0],
            inv_freq=self._inv_freq(q_sink),
        )
        o = o[:, None]
        if rows.conv is not None:
            c, tail = causal_conv.parallel(v, self.conv, rows.conv[:B])
            rows.conv[:B] = tail
            o = o + c
        return self._output(o)

    def commit(self, state: AttentionState, draft: TreeKV, path: Tensor) -> AttentionState:
        """The state after the tree nodes ``path`` (a root→node chain), as if decoded one by one."""
        path = path.to(draft.k.device)
        k, fk, v = draft.k[:, :, path], draft.fk[:, :, path], draft.v[:, :, path]
        if self.config.kind == "softmax":
            attn = softmax.advance(state.attn, k, v)
        elif self.spec.retain:  # the path's queries decide what is retained: run the path
            q_sink = None if draft.q_sink is None else draft.q_sink[:, path]
            tokens = [x.transpose(1, 2) for x in (k, v, fk)]  # [B, N, Hkv, ·]
            _, attn = linear_attn.parallel(
                self.spec, draft.q[:, path], *tokens[:2], draft.fq[:, path], tokens[2],
                state.attn, self._alpha(), q_sink=q_sink, inv_freq=self._inv_freq(q_sink),
            )  # fmt: skip
        else:
            attn = linear_attn.advance(self.spec, state.attn, k, fk, v)
        conv = state.conv
        if conv is not None:
            _, conv = causal_conv.parallel(v.transpose(1, 2), self.conv, conv)
        return AttentionState(attn, conv)

    # --- forms ------------------------------------------------------------------------------

    def _project(self, x: Tensor, positions: Tensor) -> tuple[Tensor, ...]:
        """``q, k, v, fq, fk`` and the sink queries (``None`` when sinks use ``q``)."""
        c = self.config
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, c.num_heads, c.head_dim)
        k = self.k_proj(x).view(B, T, c.num_kv_heads, c.head_dim)
        v = self.v_proj(x).view(B, T, c.num_kv_heads, c.head_dim)
        fq, fk, q_sink = q, k, None
        if self.feature_map is not None and not c.global_rope:
            fq, fk = self.feature_map(q), self.feature_map(k)
        if self.rope is not None:
            if c.kind == "linear" and c.sinks and c.sink_positions == "cache":
                q_sink = self.rope(q, self._sink_positions(positions))
            cos, sin = self.rope.cos_sin_at(positions, q.dtype)
            cos, sin = cos[..., None, :], sin[..., None, :]
            q, k = self.rope.rotate(q, cos, sin), self.rope.rotate(k, cos, sin)
        if self.feature_map is not None and c.global_rope:
            fq, fk = self.feature_map(q), self.feature_map(k)
        elif self.feature_map is None:
            fq, fk = q, k
        return q, k, v, fq, fk, q_sink

    def _sink_positions(self, positions: Tensor) -> Tensor:
        """Each query's position inside the kept cache (sinks at ``0..S-1``, then its window or
        group): the sinks stay at most ``sinks + size`` positions away at any length. RoPE
        scores depend on differences only, so rotating the query back by its distance past
        that cache equals storing the sinks rotated at cache positions."""
        c = self.config
        start = positions - c.size + 1 if c.window == "sliding" else positions - positions % c.size
        return positions - (start - c.sinks).clamp_min(0)

    def _inv_freq(self, q_sink: Tensor | None) -> Tensor | None:
        """The RoPE frequencies that store retained keys un-rotated, read by the sink queries
        (``None``: retained keys keep their rotation and are read by ``q``)."""
        if not self.spec.retain or q_sink is None:
            return None
        return self.rope.inv_freq

    def _alpha(self) -> Tensor | float:
        # A shared denominator needs a non-negative global weight.
        if self.config.combine == "shared" and isinstance(self.alpha, Tensor):
            return self.alpha.clamp_min(0)
        return max(self.alpha, 0.0) if self.config.combine == "shared" else self.alpha

    def _output(self, o: Tensor) -> Tensor:
        if self.output_norm is not None:
            o = self.output_norm(o)
        return self.o_proj(o.flatten(2))

    def resolve_form(self, form: str, num_tokens: int) -> Form:
        if form not in FORMS:
            raise ValueError(f"form={form!r}; allowed: {list(FORMS)}")
        if not self.is_causal and form not in ("auto", "parallel"):
            raise ValueError(
                f"attention {self.config.name!r} is not causal: it has a parallel form only, "
                f"form={form!r} is not available"
            )
        if form != "auto":
            return form
        if self.config.kind != "linear":
            return "parallel"
        if num_tokens == 1:
            return "recurrent"
        if num_tokens <= self.config.chunk_size:
            return "parallel"
        return "chunk"

    def forward(
        self, x: Tensor, *, state: AttentionState | None = None, form: str = "auto"
    ) -> tuple[Tensor, AttentionState | None]:
        B, T, _ = x.shape
        form = self.resolve_form(form, T)
        if not self.is_causal:
            if state is not None:
                raise ValueError(f"attention {self.config.name!r} is not causal: it takes no state")
            return self._forward_noncausal(x), None
        if state is None:
            state = self.init_state(B, dtype=x.dtype, device=x.device)
        positions = torch.arange(state.pos, state.pos + T, device=x.device)
        q, k, v, fq, fk, q_sink = self._project(x, positions)
        o, state = self._attend(q, k, v, fq, fk, state, form, q_sink)
        return self._output(o), state

    def _attend(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        fq: Tensor,
        fk: Tensor,
        state: AttentionState,
        form: Form,
        q_sink: Tensor | None = None,
    ) -> tuple[Tensor, AttentionState]:
        """Projected tokens on top of ``state`` in ``form`` → ``o: [B, T, H, V]`` and the state."""
        if self.config.kind == "softmax":
            o, attn = softmax.parallel(q, k, v, state.attn)
        elif form == "chunk":
            chunk_size, alpha = self.config.chunk_size, self._alpha()
            o, attn = linear_attn.chunk(
                self.spec, q, k, v, fq, fk, state.attn, alpha, chunk_size,
                q_sink=q_sink, inv_freq=self._inv_freq(q_sink),
            )  # fmt: skip
        else:
            op = linear_attn.parallel if form == "parallel" else linear_attn.recurrent
            o, attn = op(
                self.spec, q, k, v, fq, fk, state.attn, self._alpha(),
                q_sink=q_sink, inv_freq=self._inv_freq(q_sink),
            )  # fmt: skip
        conv = state.conv
        if conv is not None:
            step = causal_conv.recurrent if form == "recurrent" else causal_conv.parallel
            c, conv = step(v, self.conv, conv)
            o = o + c
        return o, AttentionState(attn, conv)

    def forward_rows(
        self, x: Tensor, states: list[AttentionState]
    ) -> tuple[Tensor, list[AttentionState]]:
        """One token for each of ``B`` independent sequences: ``x: [B, 1, D]``, row ``i``
        continuing ``states[i]`` (a batch-1 state at its own position).

        The projections run as one batch; each row attends on its own state, exactly as
        ``forward`` would with that row alone. Rows may join and leave between calls.
        """
        if not self.is_causal:
            raise ValueError(f"attention {self.config.name!r} is not causal: it takes no state")
        if x.shape[1] != 1 or x.shape[0] != len(states):
            raise ValueError(f"forward_rows takes [len(states), 1, D], got {tuple(x.shape)}")
        positions = torch.tensor([[s.pos] for s in states], device=x.device)  # [B, 1]
        q, k, v, fq, fk, q_sink = self._project(x, positions)
        form = self.resolve_form("auto", 1)
        outputs, new_states = [], []
        for i, state in enumerate(states):
            row = slice(i, i + 1)
            sink = None if q_sink is None else q_sink[row]
            o, state = self._attend(q[row], k[row], v[row], fq[row], fk[row], state, form, sink)
            outputs.append(o)
            new_states.append(state)
        return self._output(torch.cat(outputs)), new_states

    def _forward_noncausal(self, x: Tensor) -> Tensor:
        positions = torch.arange(x.shape[1], device=x.device)
        q, k, v, fq, fk, q_sink = self._project(x, positions)
        if self.config.kind == "linformer":
            o = linformer.parallel(q, k, v, self.seq_proj_k, self.seq_proj_v)
        else:
            o, _ = linear_attn.parallel(
                self.spec, q, k, v, fq, fk, self._unused_state(x), self._alpha(),
                q_sink=q_sink, inv_freq=self._inv_freq(q_sink),
            )  # fmt: skip
        if self.config.conv == "symmetric":
            o = o + causal_conv.symmetric(v, self.conv)
        return self._output(o)

    def _unused_state(self, x: Tensor) -> linear_attn.LinearAttnState:
        c = self.config
        F = self.feature_map.feature_dim if self.feature_map is not None else c.head_dim
        return linear_attn.init_state(
            self.spec,
            x.shape[0],
            c.num_kv_heads,
            c.head_dim,
            F,
            c.head_dim,
            dtype=x.dtype,
            device=x.device,
        )

    def tree_step(self, x: Tensor, tree: Tree, state: AttentionState) -> tuple[Tensor, TreeKV]:
        """``x: [B, N, D]`` tree nodes on top of ``state`` → outputs and what commit needs."""
        if not self.is_causal:
            raise ValueError(f"attention {self.config.name!r} is not causal: no tree form")
        positions = state.pos + tree.depths.to(x.device)
        q, k, v, fq, fk, q_sink = self._project(x, positions)
        if self.config.kind == "softmax":
            o, _ = softmax.tree(q, k, v, state.attn, tree=tree)
        else:
            o, _ = linear_attn.tree(
                self.spec, q, k, v, fq, fk, state.attn, self._alpha(),
                tree=tree, q_sink=q_sink, inv_freq=self._inv_freq(q_sink),
            )  # fmt: skip
        if state.conv is not None:
            c, _ = causal_conv.tree(v, self.conv, state.conv, tree=tree)
            o = o + c
        draft = TreeKV(k.transpose(1, 2), fk.transpose(1, 2), v.transpose(1, 2))
        if self.config.kind == "linear" and self.spec.retain:
            draft = TreeKV(draft.k, draft.fk, draft.v, q, fq, q_sink)
        return self._output(o), draft

    def attend_tree(
        self, x: Tensor, parents: Tensor | list[int] | Tree, state: AttentionState
    ) -> Tensor:
        """Node ``i`` of ``x: [B, N, D]`` attends to the committed state and its ancestors
        (``parents[i]``, −1 = child of the state). ``state`` is not modified."""
        tree = parents if isinstance(parents, Tree) else Tree.from_parents(parents)
        return self.tree_step(x, tree, state)[0]


def build_attention(
    name: str, *, hidden_size: int, num_heads: int, num_kv_heads: int, **options
) -> Attention:
    """A randomly initialised attention layer from the registry (see ``list_attentions()``)."""
    config = attention_config(
        name,
        hidden_size=hidden_size,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        **options,
    )
    return Attention(config)
