"""Training Medusa heads with the base model frozen, and measuring how often they are right.

Head ``m`` at position ``t`` learns token ``t + m + 2`` (cross-entropy, weighted ``decay^m`` as
in Medusa). Data: ``corpus`` (corpus text, labels = the text), ``model_labels`` (corpus text,
labels = the base model's own argmax at each position: cheap teacher-forced distillation) or
``self_distill`` (the base model's greedy continuations of corpus prompts, so inputs and labels
are what the model itself says; costs a generation). The base runs under ``no_grad`` once per
batch; only the heads get gradients.

:func:`evaluate_heads` reports per-head top-1/top-5 accuracy against the text and the
rank-agreement table against the base model's own greedy predictions (``rank_agreement[m][i]``:
how often head ``m``'s ``i``-th ranked token is the base model's argmax) — the table the tree
builder and the speculation planner read, since greedy verification accepts exactly the base
model's argmax.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from linearize.config import Config, option
from linearize.data import block_order, pack_blocks
from linearize.generation.batch import generate_batch
from linearize.generation.config import GenerationConfig
from linearize.generation.medusa import MedusaHeads
from linearize.models.decoder import Decoder
from linearize.seeding import seeded
from linearize.train.schedule import WarmupCosine

logger = logging.getLogger(__name__)

Progress = Callable[[int, int, dict], None]
TRAINING_DATA = ("corpus", "model_labels", "self_distill")


@dataclass
class MedusaTrainConfig(Config):
    """How Medusa heads are trained (defaults: a short CPU run)."""

    num_heads: int = option("Medusa heads (head m predicts the token m + 2 ahead)", 4)
    num_blocks: int = option("residual blocks per head", 1)
    tokens: int = option("training tokens", 50_000)
    block_size: int = option("tokens per training sequence", 256)
    batch_size: int = option("sequences per optimizer step", 2)
    lr: float = option("peak learning rate", 1e-3)
    weight_decay: float = option("AdamW weight decay", 0.0)
    head_decay: float = option("loss weight of head m is head_decay ** m", 0.8)
    shared_proj: bool = option(
        "heads project with the model's frozen LM head instead of their own copies "
        "(M times less vocabulary work per token, and M copies of the head less to save)",
        True,
    )
    data: Literal["corpus", "model_labels", "self_distill"] = option(
        "labels: the text, the model's argmax on the text, or the model's own generations",
        "corpus",
    )
    prompt_tokens: int = option("self_distill: prompt tokens before each generation", 32)
    eval_tokens: int = option("held-out tokens", 4096)
    top_k: int = option("top-k accuracies reported per head", 10)
    seed: int = option("random seed", 0)

    def validate(self) -> MedusaTrainConfig:
        positive = ("num_heads", "num_blocks", "tokens", "batch_size", "eval_tokens", "top_k")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.block_size < self.num_heads + 3:
            raise ValueError(
                f"block_size={self.block_size} is too short for {self.num_heads} heads "
                f"(needs >= num_heads + 3)"
            )
        if self.data not in TRAINING_DATA:
            raise ValueError(f"data={self.data!r}; allowed: {list(TRAINING_DATA)}")
        if not 0 < self.prompt_tokens < self.block_size:
            raise ValueError(f"prompt_tokens must lie in [1, block_size), got {self.prompt_tokens}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        return self


def self_distill_tokens(
    model: Decoder,
    corpus: Tensor,
    num_blocks: int,
    block_size: int,
    prompt_tokens: int,
    *,
    seed: int = 0,
    batch_size: int = 8,
) -> Tensor:
    """``[num_blocks, block_size]``: corpus prompts of ``prompt_tokens`` tokens, each followed by
    the model's greedy continuation (EOS ignored)."""
    blocks = pack_blocks(corpus, prompt_tokens)
    order = block_order(len(blocks), seed, 0)
    config = GenerationConfig(max_new_tokens=block_size - prompt_tokens, stop_token_ids=[])
    out = []
    for s in range(0, num_blocks, batch_size):
        prompts = [
            blocks[order[i % len(order)]].tolist()
            for i in range(s, min(s + batch_size, num_blocks))
        ]
        for prompt, result in zip(prompts, generate_batch(model, prompts, config), strict=True):
            out.append(prompt + result.token_ids)
    return torch.tensor(out, dtype=torch.long)


def _targets(model: Decoder, hidden: Tensor, ids: Tensor, data: str, num_heads: int):
    """Per head ``m``: the tokens it should predict at positions ``0 .. T - m - 3``."""
    if data == "model_labels":
        with torch.no_grad():
            base = model.lm_head(hidden).argmax(-1)  # base[:, t] predicts token t + 1
        return [base[:, m + 1 : -1] for m in range(num_heads)]
    return [ids[:, m + 2 :] for m in range(num_heads)]


def _head_losses(
    heads: MedusaHeads, model: Decoder, hidden: Tensor, targets: list[Tensor], decay: float
) -> list[float]:
    """Backpropagate the weighted loss of every head, one head at a time (memory: one
    ``[B, T, V]`` logits tensor); return the per-head losses."""
    losses = []
    for m, (head, target) in enumerate(zip(heads.heads, targets, strict=True)):
        logits = heads.project(m, head.blocks(hidden[:, : target.shape[1]]), model.lm_head)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), target.flatten())
        (decay**m * loss).backward()
        losses.append(float(loss.detach()))
    return losses


def train_medusa(
    model: Decoder,
    tokens: Tensor,
    config: MedusaTrainConfig | None = None,
    *,
    heads: MedusaHeads | None = None,
    held_out: Tensor | None = None,
    progress: Progress | None = None,
) -> MedusaHeads:
    """Train (fresh or given) heads on ``tokens: [T]`` with ``model`` frozen; when ``held_out``
    is given, measure them (``heads.metrics``, ``heads.rank_accuracy``). Everything drawn at
    random (fresh heads, the data's order) comes from ``config.seed`` alone; the caller's
    random state is left as it was."""
    config = (config or MedusaTrainConfig()).validate()
    with seeded(config.seed):
        return _train_medusa(model, tokens, config, heads, held_out, progress)


def _train_medusa(
    model: Decoder,
    tokens: Tensor,
    config: MedusaTrainConfig,
    heads: MedusaHeads | None,
    held_out: Tensor | None,
    progress: Progress | None,
) -> MedusaHeads:
    if heads is None:
        heads = MedusaHeads.from_model(
            model, config.num_heads, config.num_blocks, shared_proj=config.shared_proj
        )
    heads.check_model(model)
    heads.to(device=model.device, dtype=model.dtype).train()
    model.eval()
    # 1. data: blocks of corpus text, or the model's own continuations of corpus prompts
    num_blocks = max(1, math.ceil(config.tokens / config.block_size))
    if config.data == "self_distill":
        blocks = self_distill_tokens(
            model, tokens, num_blocks, config.block_size, config.prompt_tokens, seed=config.seed
        )
    else:
        packed = pack_blocks(tokens, config.block_size)
        order = block_order(len(packed), config.seed, 0)
        blocks = packed[[order[i % len(order)] for i in range(num_blocks)]]
    optimizer = torch.optim.AdamW(
        heads.parameters(), lr=config.lr, weight_decay=config.weight_decay
    )
    steps = math.ceil(len(blocks) / config.batch_size)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, WarmupCosine(warmup=steps // 10, total=steps, min_ratio=0.0)
    )
    # 2. train: frozen base → hidden states → heads
    for step in range(steps):
        ids = blocks[step * config.batch_size : (step + 1) * config.batch_size].to(model.device)
        with torch.no_grad():
            hidden, _ = model.forward_hidden(ids)
        optimizer.zero_grad(set_to_none=True)
        targets = _targets(model, hidden, ids, config.data, len(heads))
        losses = _head_losses(heads, model, hidden, targets, config.head_decay)
        optimizer.step()
        schedule.step()
        if progress is not None:
            progress(step + 1, steps, {"loss": losses})
    heads.eval()
    heads.metrics = {"train": {**asdict(config), "steps": steps, "final_loss": losses}}
    # 3. measure
    if held_out is not None:
        metrics = evaluate_heads(model, heads, held_out, config.block_size, config.top_k)
        heads.metrics["eval"] = metrics
        heads.rank_accuracy = metrics["rank_agreement"]
    return heads


@torch.no_grad()
def evaluate_heads(
    model: Decoder, heads: MedusaHeads, tokens: Tensor, block_size: int = 256, top_k: int = 10
) -> dict:
    """Per-head top-1/top-5 accuracy against the text, and the rank tables against the text
    (``rank_accuracy``) and against the base model's argmax (``rank_agreement``)."""
    M = len(heads)
    blocks = pack_blocks(tokens, min(block_size, len(tokens)))
    vs_text = torch.zeros(M, top_k)
    vs_model = torch.zeros(M, top_k)
    counts = torch.zeros(M)
    for block in blocks:
        ids = block[None].to(model.device)
        hidden, _ = model.forward_hidden(ids)
        base = model.lm_head(hidden[0]).argmax(-1)  # base[t] predicts token t + 1
        logits = heads(hidden[0], model.lm_head)
        for m in range(M):
            shift = m + 2
            ranked = logits[m, :-shift].topk(top_k, dim=-1).indices  # [T - shift, k]
            vs_text[m] += (ranked == ids[0, shift:, None]).sum(0).cpu().float()
            vs_model[m] += (ranked == base[shift - 1 : -1, None]).sum(0).cpu().float()
            counts[m] += ranked.shape[0]
    rank_text = vs_text / counts[:, None]
    rank_model = vs_model / counts[:, None]
    return {
        "positions": counts.tolist(),
        "top1": rank_text[:, 0].tolist(),
        "top5": rank_text[:, :5].sum(1).tolist(),
        "top1_agreement": rank_model[:, 0].tolist(),
        "top5_agreement": rank_model[:, :5].sum(1).tolist(),
        "rank_accuracy": rank_text.tolist(),
        "rank_agreement": rank_model.tolist(),
    }
