"""One trainer loop for both stages, on one CPU or many GPUs.

AdamW with linear warm-up and a cosine schedule per stage, gradient accumulation over
micro-batches, gradient clipping, fp32 on CPU and bf16 autocast on GPU, periodic held-out
perplexity, metrics as JSONL, a NaN/inf guard, atomic checkpoints and exact resume (model,
optimizer, schedule, data position, RNG and carried states: an interrupted run resumed from its
last checkpoint reaches bit-identical weights). With ``carry_state`` the finetune stage reads the
text in order and each sequence continues the state its previous block left (detached). Under
``torchrun`` / ``accelerate launch`` every process takes its share of each global batch (see
``distributed.py``); nothing else changes.

Progress goes to an optional ``callback(event: dict)``, called on the main process only (the CLI
draws a progress bar with it); the library only logs.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from linearize.data import BlockSampler, StreamSampler, pack_blocks
from linearize.models.decoder import Decoder, ModelState
from linearize.models.numerics import NonFiniteError
from linearize.models.state import detach_state, state_from_dict, state_to_dict
from linearize.train import checkpointing as ckpt
from linearize.train.config import TrainConfig
from linearize.train.distributed import STRATEGIES, DistContext, init_distributed
from linearize.train.finetune import merge_lora
from linearize.train.perplexity import exp_mean, windowed_nll
from linearize.train.schedule import WarmupCosine
from linearize.train.stages import STAGE_SETUPS, StageSetup
from linearize.train.transfer import transfer_parameters, windows_cover

logger = logging.getLogger(__name__)

Callback = Callable[[dict[str, Any]], None]


class TrainingDiverged(NonFiniteError):
    """The loss, the gradient or an activation became NaN/inf; the last good checkpoint is
    kept."""


@dataclass
class TrainResult:
    """The trained model and where things went."""

    model: Decoder
    out: Path | None
    model_dir: Path | None
    metrics: Path | None
    evals: dict[str, float] = field(default_factory=dict)
    tokens_per_s: dict[str, float] = field(default_factory=dict)


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def _full_tensor(t: Tensor) -> Tensor:
    # FSDP parameters are DTensors: gather the whole tensor (a collective: every rank calls it).
    return t.full_tensor() if hasattr(t, "full_tensor") else t


class Trainer:
    """``Trainer(model, config, train_tokens, eval_tokens, out=DIR).fit(resume=False)``.

    ``model`` is the linearized model as built from ``config`` (base weights + linearization,
    untrained); ``train_tokens: [T]`` are packed into ``config.block_size`` blocks;
    ``eval_tokens: [E]`` (optional) are scored in windows of ``block_size`` tokens. With ``out``
    the run writes its config, metrics, checkpoints and final model there."""

    def __init__(
        self,
        model: Decoder,
        config: TrainConfig,
        train_tokens: Tensor,
        eval_tokens: Tensor | None = None,
        *,
        out: str | Path | None = None,
        callback: Callback | None = None,
        ctx: DistContext | None = None,
    ) -> None:
        self.config = config.validate()
        self.ctx = ctx or init_distributed(config.device)
        self.model = model.to(self.ctx.device)
        self.model.gradient_checkpointing = config.gradient_checkpointing
        self.blocks = pack_blocks(train_tokens, config.block_size)
        self.eval_tokens = eval_tokens
        self.out = None if out is None else Path(out)
        self.callback = callback or (lambda event: None)
        self.metrics = None if self.out is None else ckpt.MetricsLog(self.out)
        self.evals: dict[str, float] = {}
        self.speeds: dict[str, float] = {}
        self.position = 0  # blocks of the training order consumed so far
        # With carry_state: the state each micro-batch of this process's rows left, or None.
        self.carried: list[ModelState | None] = []
        self.last_checkpoint: Path | None = None
        if config.parallel == "fsdp" and "transfer" in config.stages():
            raise ValueError("parallel='fsdp' shards the finetune stage only; use ddp for transfer")
        self.strategy = STRATEGIES[config.parallel if self.ctx.active else "ddp"](self.ctx)
        if "transfer" in config.stages():
            transfer_parameters(self.model)  # raises when stage 1 has nothing to train
            if windows_cover(self.model, config.block_size):
                logger.warning(
                    "every linearized layer's window covers a whole block of %d tokens: on these "
                    "blocks each equals softmax attention and attention transfer learns nothing "
                    "(use longer --block-size, or --stage finetune)",
                    config.block_size,
                )
        if config.carry_state:
            self._check_carry()
        self.ctx.share(config.batch_size)
        if (config.batch_size // self.ctx.world_size) % config.micro_batch_size:
            raise ValueError(
                f"each of {self.ctx.world_size} processes gets "
                f"{config.batch_size // self.ctx.world_size} sequences per step, not a multiple "
                f"of micro_batch_size={config.micro_batch_size}"
            )

    def _check_carry(self) -> None:
        grows = self.model.softmax_layers()
        if grows:
            raise ValueError(
                f"carry_state needs a fixed-size state in every layer; layers {grows} are softmax "
                "attention, whose KV cache would grow with every block"
            )
        if self.ctx.world_size > 1:
            raise ValueError(
                f"carry_state trains on one process ({self.ctx.world_size} here): checkpoints "
                "hold the main process's carried states only"
            )
        StreamSampler(len(self.blocks), self.config.batch_size)  # enough blocks for the streams
        long = {
            i: layer.self_attn.spec.capacity
            for i, layer in enumerate(self.model.layers)
            if getattr(layer.self_attn, "spec", None) is not None
            and layer.self_attn.spec.capacity > self.config.block_size
        }
        if long and not self.config.gradient_checkpointing:
            logger.warning(
                "layers %s carry windows of up to %d tokens into every block, each chunk "
                "keeping a copy for backward (SmolLM2 with 8k-token windows passed 24 GB): "
                "consider --gradient-checkpointing",
                sorted(long),
                max(long.values()),
            )

    # --- precision ----------------------------------------------------------------------------

    def autocast(self) -> contextlib.AbstractContextManager:
        device = self.ctx.device.type
        precision = self.config.precision
        if precision == "auto":
            precision = "bf16" if device == "cuda" else "fp32"
        if precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(device, dtype=torch.bfloat16)

    # --- stages -------------------------------------------------------------------------------

    def setup_stage(self, name: str) -> StageSetup:
        """Freeze/unfreeze, add adapters and bind the loss of stage ``name``."""
        return STAGE_SETUPS[name](self.model, self.config, self.autocast, self.strategy.prepare)

    # --- data ---------------------------------------------------------------------------------

    def batches(self, start: int) -> Iterator[Tensor]:
        """This process's share ``[b, block_size]`` of each global batch, from block ``start``
        of the seeded training order on."""
        c = self.config
        order = BlockSampler(len(self.blocks), c.seed).positions(start)
        mine = self.ctx.share(c.batch_size)
        while True:
            indices = [next(order)[1] for _ in range(c.batch_size)]
            yield self.blocks[indices[mine]].to(self.ctx.device)

    def streams(self, first: int) -> Iterator[tuple[bool, Tensor]]:
        """With ``carry_state``: from stage step ``first`` on, whether the streams start over at
        this step, and this process's share ``[b, block_size]`` of the streams' blocks."""
        c = self.config
        sampler = StreamSampler(len(self.blocks), c.batch_size)
        mine = self.ctx.share(c.batch_size)
        step = first
        while True:
            indices = sampler.blocks(step)
            yield sampler.starts(step), self.blocks[indices[mine]].to(self.ctx.device)
            step += 1

    # --- evaluation -----------------------------------------------------------------------------

    def evaluate(self) -> float | None:
        """Perplexity on the held-out tokens (windows of ``block_size``), over all processes."""
        tokens = None if self.eval_tokens is None else self.eval_tokens[: self.config.eval_tokens]
        if tokens is None or len(tokens) < 2:
            return None
        shard = (self.ctx.rank, self.ctx.world_size)
        nll, count = windowed_nll(
            self.model,
            tokens,
            min(self.config.block_size, len(tokens)),
            form=self.config.form,
            shard=shard,
            batch_size=self.config.micro_batch_size,
            autocast=self.autocast,
        )
        nll, count = self.ctx.sum([nll, count])
        return exp_mean(nll, int(count))

    # --- checkpoints ----------------------------------------------------------------------------

    def save_checkpoint(
        self, stage: StageSetup, index: int, step: int, optimizer, scheduler
    ) -> Path | None:
        """Every process takes part (FSDP gathers); the main process writes."""
        params = self.strategy.full_params(stage.params)
        optimizer_state = self.strategy.optimizer_state(self.model, optimizer)
        path = None
        if self.out is not None and self.ctx.is_main:
            state = {
                "optimizer": optimizer_state,
                "scheduler": scheduler.state_dict(),
                "rng": _rng_state(),
            }
            if stage.carry_state:
                state["carried"] = [None if s is None else state_to_dict(s) for s in self.carried]
            path = ckpt.save_checkpoint(
                self.out,
                stage_index=index,
                stage=stage.name,
                step=step,
                position=self.position,
                params=params,
                state=state,
            )
        self.ctx.barrier()
        return path

    def load_checkpoint(self, stage: StageSetup, checkpoint: ckpt.Checkpoint, optimizer) -> None:
        missing = sorted(set(stage.params) - set(checkpoint.params))
        unexpected = sorted(set(checkpoint.params) - set(stage.params))
        if missing or unexpected:
            raise ValueError(
                f"checkpoint {checkpoint.path} does not match the {stage.name} stage's "
                f"parameters: missing {missing[:6]}, unexpected {unexpected[:6]}"
            )
        self.strategy.load(
            self.model, stage.params, checkpoint.params, optimizer, checkpoint.state["optimizer"]
        )
        if stage.carry_state:
            self.carried = [
                None if s is None else state_from_dict(s) for s in checkpoint.state["carried"]
            ]

    # --- the loop -----------------------------------------------------------------------------

    def fit(self, resume: bool = False) -> TrainResult:
        """Run every stage of the config (continuing from the last checkpoint with ``resume``),
        then save the final model (adapters merged) to ``out/model``."""
        c = self.config
        # 1. the run directory: refuse to clobber another run; find where to continue from
        start = (0, 0)
        checkpoint = None
        if self.out is not None:
            ckpt.check_run_dir(self.out, c, resume)
            self.ctx.barrier()
            if resume:
                checkpoint = ckpt.load_checkpoint(self.out, self.ctx.device)
            if checkpoint is not None:
                start = (c.stages().index(checkpoint.stage), checkpoint.step)
                self.position = checkpoint.position
                self.last_checkpoint = checkpoint.path
                logger.info("resuming from %s", checkpoint.path)
            elif self.ctx.is_main:
                ckpt.write_config(self.out, c)
            if self.ctx.is_main and self.metrics is not None:
                self.metrics.truncate_after(start)
        # 2. the stages, each from its first step or from the checkpoint's
        for index, name in enumerate(c.stages()):
            if index < start[0]:
                continue
            first = start[1] if index == start[0] else 0
            self.run_stage(index, name, first, checkpoint if index == start[0] else None)
            checkpoint = None
        # 3. the final model: adapters merged, saved atomically
        model_dir = None
        if self.out is not None and self.ctx.is_main:
            model_dir = self.out / ckpt.MODEL
            self.model.save(model_dir)
        self.ctx.barrier()
        return TrainResult(
            self.model,
            self.out,
            model_dir,
            None if self.metrics is None else self.metrics.path,
            self.evals,
            self.speeds,
        )

    def run_stage(self, index: int, name: str, first: int, checkpoint) -> None:
        """Train stage ``name`` from step ``first`` to its last step (the top-level loop)."""
        c = self.config
        # 1. what trains, the optimizer and the schedule
        stage = self.setup_stage(name)
        params = list(stage.params.values())
        optimizer = torch.optim.AdamW(stage.groups, betas=(0.9, 0.95), eps=1e-8)
        warmup = int(c.warmup * stage.steps)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, WarmupCosine(warmup, stage.steps, c.min_lr_ratio)
        )
        if checkpoint is not None:
            self.load_checkpoint(stage, checkpoint, optimizer)
            scheduler.load_state_dict(checkpoint.state["scheduler"])
            _set_rng_state(checkpoint.state["rng"])
        else:
            self.strategy.start(params)
        if self.ctx.is_main:
            self.callback({"event": "stage", "stage": name, "steps": stage.steps, "first": first})
        if stage.carry_state:
            batches = self.streams(first)
        else:
            batches = ((False, batch) for batch in self.batches(self.position))
        tokens_per_step = c.batch_size * c.block_size
        stage_time, stage_steps = 0.0, 0
        for step in range(first, stage.steps):
            started = time.perf_counter()
            # 2. this process's share of the global batch, in micro-batches
            starts, batch = next(batches)
            self.position += c.batch_size
            micros = batch.split(c.micro_batch_size)
            if starts or not self.carried:
                self.carried = [None] * len(micros)
            parts: dict[str, float] = {}
            for i, micro in enumerate(micros):
                try:
                    loss, terms, state = stage.loss(micro, self.carried[i])
                except NonFiniteError as e:
                    optimizer.zero_grad(set_to_none=True)
                    raise TrainingDiverged(
                        f"training stopped at {name} step {step + 1}: {e}; the last good "
                        f"checkpoint is {self.last_checkpoint or 'none (nothing was saved)'}"
                    ) from None
                loss.backward()
                if stage.carry_state:
                    self.carried[i] = detach_state(state)
                for key, value in terms.items():
                    parts[key] = parts.get(key, 0.0) + float(value.detach())
            # 3. gradients summed over processes; stop on NaN/inf; clip
            self.strategy.reduce_grads(params)
            keys = sorted(parts)
            parts = dict(zip(keys, self.ctx.sum([parts[k] for k in keys]), strict=True))
            max_norm = c.clip if c.clip > 0 else math.inf
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
            values = [*parts.values(), grad_norm]
            if not all(math.isfinite(v) for v in values):
                optimizer.zero_grad(set_to_none=True)
                raise TrainingDiverged(
                    f"training stopped at {name} step {step + 1}: loss {parts} and gradient norm "
                    f"{grad_norm} are not all finite; the last good checkpoint is "
                    f"{self.last_checkpoint or 'none (nothing was saved)'}; lower the learning "
                    f"rate (lr={c.lr}, transfer_lr={c.transfer_lr}) or check the data"
                )
            # 4. the update
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            # 5. report, evaluate, checkpoint
            seconds = time.perf_counter() - started
            stage_time, stage_steps = stage_time + seconds, stage_steps + 1
            done = step + 1
            record = {
                "stage": name,
                "stage_index": index,
                "step": done,
                "steps": stage.steps,
                "loss": sum(parts.values()),
                **parts,
                "grad_norm": grad_norm,
                "lr": lr,
                "tokens": self.position * c.block_size,
                "tokens_per_s": tokens_per_step / seconds,
            }
            if (c.eval_every and done % c.eval_every == 0) or done == stage.steps:
                record["eval_ppl"] = self.evaluate()
                self.evals[name] = record["eval_ppl"]
            self._report(record)
            if (c.checkpoint_every and done % c.checkpoint_every == 0) or done == stage.steps:
                self.last_checkpoint = self.save_checkpoint(
                    stage, index, done, optimizer, scheduler
                )
        if stage_steps:
            self.speeds[name] = tokens_per_step * stage_steps / stage_time
        # 6. a plain model again: gathered if sharded, adapters merged (after the last
        # checkpoint, which holds them to resume from)
        if self.strategy.sharded:
            self.model, stage.lora = self.strategy.unwrap(self.model, stage.lora)
        if stage.lora is not None:
            self.model = merge_lora(stage.lora)

    def _report(self, record: dict[str, Any]) -> None:
        if self.ctx.is_main:
            if self.metrics is not None:
                self.metrics.write(record)
            self.callback({"event": "step", **record})
