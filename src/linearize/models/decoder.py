"""Our decoder: LLaMA family and GPT-2 family, with a registry attention in every layer.

Parameter names follow transformers' LLaMA files (``embed_tokens``, ``layers.i.self_attn.q_proj``,
``mlp.gate_proj``, ``input_layernorm``, ``norm``, ``lm_head``) without the ``model.`` prefix, so
LLaMA-family checkpoints map one to one; GPT-2's fused and transposed weights are mapped in
``convert.py``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Hashable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from linearize.layers.attention import Attention, AttentionRows, AttentionState, TreeKV
from linearize.layers.meta import building_on_meta
from linearize.models.config import ModelConfig
from linearize.models.directory import save
from linearize.models.numerics import finite_flag, raise_if_non_finite
from linearize.ops import softmax
from linearize.ops.tree import Tree

logger = logging.getLogger(__name__)

# Tokens per segment when a prompt is fed for decoding (``Decoder.prefill``): the state is carried
# from segment to segment, so a prompt's activations take one segment's memory at any length.
PREFILL_SEGMENT = 8192


@dataclass
class ModelState:
    """The whole model's decoding state: one :class:`AttentionState` per layer."""

    layers: list[AttentionState]

    @property
    def pos(self) -> int:
        return self.layers[0].pos

    def nbytes(self) -> int:
        return sum(layer.nbytes() for layer in self.layers)


class MLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        D, M, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gated = config.architecture == "llama"
        if self.gated:
            self.gate_proj = nn.Linear(D, M, bias=bias)
        self.up_proj = nn.Linear(D, M, bias=bias)
        self.down_proj = nn.Linear(M, D, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        if self.gated:
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        return self.down_proj(F.gelu(self.up_proj(x), approximate="tanh"))


def _embedding(num: int, dim: int) -> nn.Embedding:
    """``nn.Embedding(num, dim)``, without its random init on the meta device
    (:func:`~linearize.layers.meta.building_on_meta`)."""
    if building_on_meta():
        return nn.Embedding(num, dim, _weight=torch.empty(num, dim))
    return nn.Embedding(num, dim)


def _norm(config: ModelConfig) -> nn.Module:
    if config.architecture == "llama":
        return nn.RMSNorm(config.hidden_size, eps=config.norm_eps)
    return nn.LayerNorm(config.hidden_size, eps=config.norm_eps)


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, index: int) -> None:
        super().__init__()
        self.input_layernorm = _norm(config)
        self.self_attn = Attention(config.attention_config(index))
        self.post_attention_layernorm = _norm(config)
        self.mlp = MLP(config)

    def forward(
        self, x: Tensor, state: AttentionState | None, form: str
    ) -> tuple[Tensor, AttentionState]:
        h, state = self.self_attn(self.input_layernorm(x), state=state, form=form)
        x = x + h
        return x + self.mlp(self.post_attention_layernorm(x)), state

    def step_rows(self, x: Tensor, rows: AttentionRows, positions: Tensor) -> Tensor:
        x = x + self.self_attn.step_rows(self.input_layernorm(x), rows, positions)
        return x + self.mlp(self.post_attention_layernorm(x))

    def tree_step(self, x: Tensor, tree: Tree, state: AttentionState) -> tuple[Tensor, TreeKV]:
        h, draft = self.self_attn.tree_step(self.input_layernorm(x), tree, state)
        x = x + h
        return x + self.mlp(self.post_attention_layernorm(x)), draft


class DecodeRows:
    """The states of sequences decoded together (continuous batching), owned by one caller and
    advanced in place by :meth:`Decoder.step_rows`. Each row has a key; rows join and leave
    between steps (a leaving row's place goes to the last row, so rows stay ``0..n-1``).
    Capacity doubles as rows join; a row's memory is fixed whatever its position."""

    def __init__(self, model: Decoder, capacity: int = 8) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1 row, got {capacity}")
        self.model = model
        self.layers = [
            layer.self_attn.init_rows(capacity, dtype=model.dtype, device=model.device)
            for layer in model.layers
        ]
        self.capacity = capacity
        self.keys: list[Hashable] = []
        self.positions: list[int] = []

    def __len__(self) -> int:
        return len(self.keys)

    def __contains__(self, key: Hashable) -> bool:
        return key in self.keys

    def join(self, key: Hashable, state: ModelState) -> None:
        """A new row ``key`` continuing ``state`` (batch 1; copied where rows are batched)."""
        if key in self.keys:
            raise ValueError(f"row {key!r} is already decoding")
        self.model._check_state(state, 1)
        i = len(self.keys)
        if i == self.capacity:
            self.capacity *= 2
            for layer_rows in self.layers:
                layer_rows.resize(self.capacity)
        for layer_rows, layer_state in zip(self.layers, state.layers, strict=True):
            layer_rows.put(i, layer_state)
        self.keys.append(key)
        self.positions.append(state.pos)

    def leave(self, key: Hashable) -> None:
        """Row ``key`` stops decoding; its state is dropped (read it first with :meth:`state`)."""
        i, last = self.keys.index(key), len(self.keys) - 1
        for layer_rows in self.layers:
            if i != last:
                layer_rows.move(last, i)
            layer_rows.truncate(last)
        self.keys[i], self.positions[i] = self.keys[last], self.positions[last]
        self.keys.pop()
        self.positions.pop()

    def state(self, key: Hashable) -> ModelState:
        """Row ``key``'s state as a batch-1 :class:`ModelState` (a copy where batched)."""
        i = self.keys.index(key)
        return ModelState([layer_rows.get(i) for layer_rows in self.layers])

    def nbytes(self) -> int:
        """Bytes of the rows' states (not of the unused capacity)."""
        return sum(layer_rows.nbytes(len(self.keys)) for layer_rows in self.layers)


class Decoder(nn.Module):
    """``model(input_ids, *, state=None, form="auto") -> (logits, state)``.

    ``state=None`` starts a sequence; the returned :class:`ModelState` continues it (prefill with
    the chunk form, then decode token by token with the recurrent form). Softmax layers keep a KV
    cache inside the same state, so teacher and student decode through one code path.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config = config.validate()
        self.embed_tokens = _embedding(config.vocab_size, config.hidden_size)
        if config.architecture == "gpt2":
            self.embed_positions = _embedding(config.max_position_embeddings, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_layers))
        self.norm = _norm(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if not building_on_meta():  # (a skeleton the loader fills)
            self.apply(self._init_weights)
        self.tie_weights()
        self.tokenizer = None
        # Set by models.quantize when the weights are quantized (a QuantConfig).
        self.quantization = None
        # Training: each layer's activations are recomputed in backward instead of kept, so
        # long blocks fit in memory (set by the trainer from TrainConfig).
        self.gradient_checkpointing = False

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        # A random model (tests, training from scratch) gets the usual GPT/LLaMA init; pretrained
        # weights overwrite all of this. Attention layers initialise their own new parameters.
        if isinstance(module, nn.Linear | nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    @property
    def device(self) -> torch.device:
        # The final norm's weight: always a plain tensor, even when the others are quantized.
        return self.norm.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.norm.weight.dtype

    def softmax_layers(self) -> list[int]:
        """Indices of the layers with softmax attention (a KV cache that grows with the text)."""
        return [
            i for i, layer in enumerate(self.layers) if layer.self_attn.config.kind == "softmax"
        ]

    def init_state(self, batch_size: int = 1) -> ModelState:
        return ModelState(
            [
                layer.self_attn.init_state(batch_size, dtype=self.dtype, device=self.device)
                for layer in self.layers
            ]
        )

    def _embed(self, input_ids: Tensor, positions: Tensor) -> Tensor:
        x = self.embed_tokens(input_ids)
        if self.config.architecture == "gpt2":
            limit = self.config.max_position_embeddings
            if int(positions.max()) >= limit:
                raise ValueError(
                    f"position {int(positions.max())} is past this model's learned positions "
                    f"(max_position_embeddings={limit})"
                )
            x = x + self.embed_positions(positions)
        return x

    def _check_ids(self, input_ids: Tensor) -> None:
        if not isinstance(input_ids, Tensor):
            raise TypeError(
                f"input_ids must be a torch.Tensor of token ids [batch, tokens], got "
                f"{type(input_ids).__name__}; e.g. torch.tensor([ids])"
            )
        if input_ids.is_floating_point() or input_ids.is_complex() or input_ids.dtype == torch.bool:
            raise TypeError(f"input_ids must be integer token ids, got dtype {input_ids.dtype}")
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, tokens], got {tuple(input_ids.shape)}")
        if input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
            raise ValueError(
                f"input_ids {tuple(input_ids.shape)} is empty: give at least one token per row"
            )
        if input_ids.min() < 0 or input_ids.max() >= self.config.vocab_size:
            raise ValueError(
                f"token ids must lie in [0, {self.config.vocab_size}), got "
                f"[{int(input_ids.min())}, {int(input_ids.max())}]"
            )

    def _check_state(self, state: ModelState, batch_size: int) -> None:
        """``state`` was made by this model (its layers' shapes) for this batch size."""
        if not isinstance(state, ModelState):
            raise TypeError(f"state must be a ModelState (from a model call), got {type(state)}")
        if len(state.layers) != len(self.layers):
            raise ValueError(
                f"state has {len(state.layers)} layers, this model {len(self.layers)}: "
                "it comes from another model"
            )
        for i, (layer, layer_state) in enumerate(zip(self.layers, state.layers, strict=True)):
            c = layer.self_attn.config
            if layer_state is None:
                continue
            k = layer_state.attn.k
            if k.shape[0] != batch_size:
                raise ValueError(
                    f"state is for batch size {k.shape[0]}, input_ids has {batch_size} rows"
                )
            if (k.shape[1], k.shape[-1]) != (c.num_kv_heads, c.head_dim):
                raise ValueError(
                    f"layer {i}: state holds {k.shape[1]} heads of dim {k.shape[-1]}, this "
                    f"layer {c.num_kv_heads} of dim {c.head_dim}: it comes from another model"
                )
            kind = "softmax" if isinstance(layer_state.attn, softmax.KVCache) else "linear"
            if kind != c.kind:
                raise ValueError(
                    f"layer {i}: state is a {kind} state, this layer is {c.name} ({c.kind}): "
                    "it comes from another model"
                )

    def _raise_if_non_finite(self, flags: list[Tensor], positions: Callable[[], str]) -> None:
        """``flags``: one per layer, then (optionally) the logits'. One sync; the names of the
        layers are built only when one broke."""
        raise_if_non_finite(
            flags,
            lambda: [
                *(f"layer {i} ({name})" for i, name in enumerate(self.attention_names())),
                "the LM head (logits)",
            ],
            positions,
        )

    def _run_layers(
        self, input_ids: Tensor, state: ModelState | None, form: str
    ) -> tuple[Tensor, ModelState, list[Tensor]]:
        """The final (normed) hidden states, the new state, and one finite flag per layer."""
        self._check_ids(input_ids)
        if state is not None:
            self._check_state(state, input_ids.shape[0])
        start = 0 if state is None else state.pos
        positions = torch.arange(start, start + input_ids.shape[1], device=input_ids.device)
        x = self._embed(input_ids, positions)
        states = [None] * len(self.layers) if state is None else state.layers
        new_states, flags = [], []
        recompute = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for layer, layer_state in zip(self.layers, states, strict=True):
            if recompute:
                x, layer_state = checkpoint(layer, x, layer_state, form, use_reentrant=False)
            else:
                x, layer_state = layer(x, layer_state, form)
            new_states.append(layer_state)
            flags.append(finite_flag(x, normalized=True))
        return self.norm(x), ModelState(new_states), flags

    def _positions(self, input_ids: Tensor, state: ModelState | None) -> str:
        start = 0 if state is None else state.pos
        return f"{start}..{start + input_ids.shape[1] - 1}"

    def forward_hidden(
        self, input_ids: Tensor, *, state: ModelState | None = None, form: str = "auto"
    ) -> tuple[Tensor, ModelState]:
        """The final (normed) hidden states ``[B, T, D]`` and the new state.

        Raises :class:`NonFiniteError` naming the first layer whose output holds NaN or inf."""
        h, new_state, flags = self._run_layers(input_ids, state, form)
        self._raise_if_non_finite(flags, lambda: self._positions(input_ids, state))
        return h, new_state

    @torch.no_grad()
    def prefill(
        self,
        input_ids: Tensor,
        *,
        state: ModelState | None = None,
        segment: int = PREFILL_SEGMENT,
    ) -> tuple[Tensor, ModelState]:
        """Feed a prompt for decoding: the last position's final hidden state ``[B, D]`` and
        the state after it. The prompt runs in segments of ``segment`` tokens, the state
        carried from one to the next, and only the last hidden state is kept, so the memory a
        prompt takes does not grow with its length (a linear model's state is fixed; a softmax
        layer's cache still grows)."""
        if segment < 1:
            raise ValueError(f"segment={segment}: a prefill segment holds at least one token")
        if input_ids.ndim != 2 or input_ids.shape[1] == 0:
            shape = tuple(input_ids.shape)
            raise ValueError(f"prefill takes input_ids [B, T] with T ≥ 1, got {shape}")
        for start in range(0, input_ids.shape[1], segment):
            hidden, state = self.forward_hidden(input_ids[:, start : start + segment], state=state)
            last = hidden[:, -1]
        return last, state

    def forward(
        self, input_ids: Tensor, *, state: ModelState | None = None, form: str = "auto"
    ) -> tuple[Tensor, ModelState]:
        h, new_state, flags = self._run_layers(input_ids, state, form)
        logits = self.lm_head(h)
        flags.append(finite_flag(logits))
        self._raise_if_non_finite(flags, lambda: self._positions(input_ids, state))
        return logits, new_state

    def forward_rows(
        self, input_ids: Tensor, states: list[ModelState]
    ) -> tuple[Tensor, list[ModelState]]:
        """One token for each of ``B`` independent sequences: ``input_ids: [B, 1]``, row ``i``
        continuing ``states[i]``, a batch-1 state at its own position. Returns logits
        ``[B, 1, V]`` and each row's new state, the same as ``B`` separate ``forward`` calls.
        (:meth:`step_rows` on a :class:`DecodeRows` does this in place, without copies.)"""
        self._check_ids(input_ids)
        if input_ids.shape != (len(states), 1):
            raise ValueError(
                f"forward_rows takes input_ids [{len(states)}, 1] (one token per state), "
                f"got {tuple(input_ids.shape)}"
            )
        rows = DecodeRows(self, max(len(states), 1))
        for i, state in enumerate(states):
            rows.join(i, state)
        logits = self.step_rows(input_ids, rows)
        return logits, [rows.state(i) for i in range(len(states))]

    def step_rows(self, input_ids: Tensor, rows: DecodeRows) -> Tensor:
        """One token for each row of ``rows`` (continuous batching), advanced in place:
        ``input_ids: [len(rows), 1]`` in row order → logits ``[len(rows), 1, V]``, the same as
        a separate ``forward`` per row (the weight matmuls run once for all rows)."""
        self._check_ids(input_ids)
        if input_ids.shape != (len(rows), 1):
            raise ValueError(
                f"step_rows takes input_ids [{len(rows)}, 1] (one token per row), "
                f"got {tuple(input_ids.shape)}"
            )
        positions = torch.tensor(rows.positions, device=input_ids.device)[:, None]
        x = self._embed(input_ids, positions)
        flags = []
        for layer, layer_rows in zip(self.layers, rows.layers, strict=True):
            x = layer.step_rows(x, layer_rows, positions)
            flags.append(finite_flag(x, normalized=True))
        rows.positions = [p + 1 for p in rows.positions]
        logits = self.lm_head(self.norm(x))
        flags.append(finite_flag(logits))
        self._raise_if_non_finite(flags, lambda: "rows")
        return logits

    def forward_tree(
        self, input_ids: Tensor, tree: Tree, state: ModelState
    ) -> tuple[Tensor, Tensor, list[TreeKV]]:
        """Verify tree nodes ``input_ids: [B, N]`` on top of ``state`` (left untouched):
        logits ``[B, N, V]``, final hidden states ``[B, N, D]`` and what :meth:`commit` needs."""
        self._check_ids(input_ids)
        self._check_state(state, input_ids.shape[0])
        positions = state.pos + tree.depths.to(input_ids.device)
        x = self._embed(input_ids, positions)
        drafts, flags = [], []
        for layer, layer_state in zip(self.layers, state.layers, strict=True):
            x, draft = layer.tree_step(x, tree, layer_state)
            drafts.append(draft)
            flags.append(finite_flag(x, normalized=True))
        h = self.norm(x)
        logits = self.lm_head(h)
        flags.append(finite_flag(logits))
        self._raise_if_non_finite(flags, lambda: f"tree at {state.pos}")
        return logits, h, drafts

    def commit(self, state: ModelState, drafts: list[TreeKV], path: Tensor) -> ModelState:
        """The state after the accepted tree nodes ``path`` (root→node order)."""
        return ModelState(
            [
                layer.self_attn.commit(s, d, path)
                for layer, s, d in zip(self.layers, state.layers, drafts, strict=True)
            ]
        )

    def save(self, directory, *, overwrite: bool = False) -> None:
        """Write config.json, model.safetensors and the tokenizer to ``directory`` atomically;
        a directory that is not one of our models is refused unless ``overwrite``."""
        save(self, directory, overwrite=overwrite)

    def tie_weights(self) -> None:
        if self.config.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def state_nbytes(self, context: int, batch_size: int = 1) -> int:
        """Bytes of the decoding state after ``context`` tokens, without running the model."""
        total = 0
        fixed = self.init_state(batch_size)
        for layer, state in zip(self.layers, fixed.layers, strict=True):
            c = layer.self_attn.config
            if c.kind == "softmax":
                per_token = 2 * batch_size * c.num_kv_heads * c.head_dim * self.dtype.itemsize
                total += per_token * context
            else:
                total += state.nbytes()
        return total

    def attention_names(self) -> list[str]:
        return [layer.self_attn.config.name for layer in self.layers]
