"""A training run from a :class:`TrainConfig`: the model, the data, the trainer.

Everything a run can refuse (a bad option, missing or unreadable data, a corpus shorter than one
block, nothing to train in stage 1, an ``--out`` that holds another run) is checked before
anything is written.
"""

from __future__ import annotations

import logging
from pathlib import Path

from torch import Tensor

from linearize.data import pack_blocks, split_tokens
from linearize.models import Decoder, linearize, load
from linearize.models.wide import widen_best
from linearize.train import checkpointing as ckpt
from linearize.train.config import TrainConfig
from linearize.train.trainer import Callback, Trainer, TrainResult

logger = logging.getLogger(__name__)


def build_model(config: TrainConfig) -> Decoder:
    """The base model of ``config``, linearized (new parameters untrained; layers that already
    use the attention keep theirs), with ``wide_layers`` wide (see :mod:`linearize.models.wide`)."""
    return widen_layers(_linearized(config), config)


def _linearized(config: TrainConfig) -> Decoder:
    model = load(config.model)
    spec = config.attention_spec()
    if spec is not None:
        # A model trained before trains on: its layers already linearized keep their
        # parameters (and wide windows).
        linearize(model, spec, layers=config.layers, keep_trained=True)
    return model


def widen_layers(model: Decoder, config: TrainConfig) -> Decoder:
    """``config.wide_layers`` sliding-window layers of ``model`` widened to ``config.wide_size``
    (chosen by recall probes: a few minutes on a CPU for SmolLM2)."""
    widen_best(model, config.wide_layers, config.wide_size)
    return model


def load_data(config: TrainConfig, tokenizer) -> tuple[Tensor, Tensor | None]:
    """Training and held-out token ids ``[T]``, ``[E]`` of ``config.data`` (see
    :func:`linearize.data.split_tokens`)."""
    return split_tokens(config.data, tokenizer, config.eval_tokens, text_field=config.text_field)


def run(
    config: TrainConfig,
    out: str | Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
    callback: Callback | None = None,
) -> TrainResult:
    """Train ``config`` into the run directory ``out`` (see ``checkpointing.py``);
    ``overwrite`` starts over in an ``out`` that holds anything else (it is emptied first)."""
    config.validate()
    out = Path(out)
    ckpt.check_run_dir(out, config, resume, overwrite=overwrite)
    model = _linearized(config)
    # The data is checked before the wide layers are chosen (minutes): a bad corpus fails at once.
    train, held_out = load_data(config, model.tokenizer)
    pack_blocks(train, config.block_size)
    widen_layers(model, config)
    if overwrite and not resume:
        ckpt.clear_run_dir(out)
    trainer = Trainer(model, config, train, held_out, out=out, callback=callback)
    return trainer.fit(resume=resume)
