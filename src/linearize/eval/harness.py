"""lm-evaluation-harness: our models as the lm-eval model ``linearize``.

``lm_eval`` has no plugin discovery, so the model is registered when this module is imported:
run lm-eval through it (as fla does) —

    TASKS=$(python -c "import linearize.eval.tasks as t; print(t.TASKS_DIR)")
    python -m linearize.eval.harness --model linearize --model_args pretrained=DIR \\
        --tasks linearize --include_path $TASKS

— or through ``linearize eval harness`` (:func:`evaluate`). Scoring runs on our recurrent state:

- ``loglikelihood``: requests sharing a context prefill it once; every continuation is scored
  from a copy of that state (``reuse_state=False`` recomputes each request from scratch).
- ``loglikelihood_rolling``: our streaming perplexity, one pass with the state carried.
- ``generate_until``: our ``generate`` (greedy unless the task samples), cut at stop strings.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model

from linearize.eval.tasks import TAG, TASKS, TASKS_DIR
from linearize.generation import GenerationConfig, generate
from linearize.models import linearize, load
from linearize.models.decoder import Decoder
from linearize.models.quantize import apply_quant
from linearize.models.state import copy_state
from linearize.train.perplexity import streaming_nll

logger = logging.getLogger(__name__)

SEGMENT = 1024  # tokens per forward pass of the rolling (streaming) log-likelihood
DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}


@register_model("linearize")
class LinearizeLM(TemplateLM):
    """``--model_args pretrained=NAME_OR_DIR[,attention=NAME][,quant=int4][,device=cpu]
    [,dtype=float32][,max_length=N][,reuse_state=True]`` (``attention`` linearizes, untrained,
    after loading; ``quant`` quantizes as ``--quant`` does; a quantized directory loads as it
    is)."""

    def __init__(
        self,
        pretrained: str | Decoder = "smollm2-135m",
        attention: str | dict[str, Any] | None = None,
        quant: str | None = None,
        device: str = "cpu",
        dtype: str = "float32",
        max_length: int | None = None,
        reuse_state: bool = True,
        **unused: Any,
    ) -> None:
        super().__init__()
        if dtype not in DTYPES:
            raise ValueError(f"dtype={dtype!r}; allowed: {list(DTYPES)}")
        model = pretrained if isinstance(pretrained, Decoder) else load(pretrained)
        if attention:
            linearize(model, attention)
        apply_quant(model, quant, str(pretrained))
        if model.tokenizer is None:
            raise ValueError(f"{pretrained}: lm-eval needs a model with a tokenizer")
        self.model = model.to(device=device, dtype=DTYPES[dtype]).eval()
        self.tokenizer = model.tokenizer
        self.max_length = int(max_length or model.config.max_position_embeddings)
        self.reuse_state = str(reuse_state).lower() not in ("false", "0", "no")
        ignored = sorted(k for k in unused if k not in ("batch_size", "max_batch_size"))
        if ignored:
            logger.warning("ignoring model_args %s", ignored)

    # --- tokens -----------------------------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.eot_token_id

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kw) -> list[int]:
        return self.tokenizer(string, add_special_tokens=bool(add_special_tokens))["input_ids"]

    def tok_decode(self, tokens: Sequence[int]) -> str:
        return self.tokenizer.decode(list(tokens))

    # --- log-likelihood ---------------------------------------------------------------------

    @torch.no_grad()
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kw):
        """``[(logprob, is_greedy)]`` of ``[((context, continuation), ctx_ids, cont_ids)]``."""
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, (_, context, continuation) in enumerate(requests):
            if not continuation:
                raise ValueError(f"request {i}: empty continuation")
            groups.setdefault(tuple(context), []).append(i)
        for context, members in groups.items():
            for i, score in zip(
                members, self._score_group(context, members, requests), strict=True
            ):
                results[i] = score
                self.cache_hook.add_partial("loglikelihood", requests[i][0], score)
        return results

    def _score_group(self, context, members, requests) -> list[tuple[float, bool]]:
        longest = max(len(requests[i][2]) for i in members)
        if not self.reuse_state or len(context) + longest > self.max_length + 1:
            return [self._score_from_scratch(list(context), requests[i][2]) for i in members]
        ids = torch.tensor([context], device=self.model.device)
        hidden, state = self.model.forward_hidden(ids)
        first = self.model.lm_head(hidden[:, -1:])  # predicts each continuation's first token
        scores = []
        for i in members:
            continuation = requests[i][2]
            logits = first
            if len(continuation) > 1:
                rest = torch.tensor([continuation[:-1]], device=self.model.device)
                more, _ = self.model(rest, state=copy_state(state))
                logits = torch.cat([first, more], 1)
            scores.append(_score(logits[0], continuation))
        return scores

    def _score_from_scratch(self, context: list[int], continuation: list[int]):
        """One plain forward over context + continuation (left-truncated to ``max_length``)."""
        whole = (context + continuation)[-(self.max_length + 1) :]
        ids = torch.tensor([whole[:-1]], device=self.model.device)
        logits, _ = self.model(ids)
        return _score(logits[0, -len(continuation) :], continuation)

    @torch.no_grad()
    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Summed log-probability of each whole text, the first token predicted from the prefix
        token: one streaming pass (segments of ``SEGMENT`` tokens, state carried)."""
        results = []
        for request in requests:
            (text,) = request.args
            tokens = torch.tensor([self.prefix_token_id, *self.tok_encode(text)])
            total, _ = streaming_nll(self.model, tokens, SEGMENT)
            results.append(-total)
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), -total)
        return results

    # --- generation -------------------------------------------------------------------------

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        results = []
        for request in requests:
            context, options = request.args
            options = dict(options or {})
            until = options.pop("until", None) or [self.tok_decode([self.eot_token_id])]
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(options.pop("max_gen_toks", 256))
            sample = options.pop("do_sample", False) and options.get("temperature", 0) > 0
            config = GenerationConfig(
                max_new_tokens=max_new,
                temperature=float(options.get("temperature", 0.0)) if sample else 0.0,
                stop=until,
            )
            prompt = self.tok_encode(context)[-max(self.max_length - max_new, 1) :]
            text = generate(self.model, prompt, config).text or ""
            for stop in until:
                text = text.split(stop)[0]
            results.append(text)
            self.cache_hook.add_partial("generate_until", (context, request.args[1]), text)
        return results


def _score(logits: torch.Tensor, continuation: list[int]) -> tuple[float, bool]:
    """``logits: [N, V]`` predicting ``continuation`` (N tokens) → (summed log-prob, greedy?)."""
    logprobs = F.log_softmax(logits.double(), -1)
    target = torch.tensor(continuation, device=logits.device)
    total = float(logprobs.gather(-1, target[:, None]).sum())
    return total, bool((logprobs.argmax(-1) == target).all())


def evaluate(
    model: str | Decoder,
    tasks: list[str],
    *,
    attention: str | dict[str, Any] | None = None,
    quant: str | None = None,
    limit: int | None = None,
    num_fewshot: int | None = None,
    data_dir: str | None = None,
    reuse_state: bool = True,
) -> dict[str, Any]:
    """``lm_eval.simple_evaluate`` on our model with this package's tasks included."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    ours = [TAG, *TASKS]
    manager = TaskManager(
        include_path=str(TASKS_DIR),
        # Indexing lm-eval's own thousands of task files takes a while: only when asked for.
        include_defaults=not set(tasks) <= set(ours),
        metadata={"data_dir": str(data_dir)} if data_dir else None,
    )
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise ValueError(f"unknown lm-eval tasks {unknown}; ours: {ours}")
    lm = LinearizeLM(model, attention=attention, quant=quant, reuse_state=reuse_state)
    return simple_evaluate(
        model=lm,
        tasks=tasks,
        limit=limit,
        num_fewshot=num_fewshot,
        task_manager=manager,
        log_samples=False,
        bootstrap_iters=0,
    )


if __name__ == "__main__":
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()
