"""The lm-eval model ``linearize`` and our local tasks (tiny models, tiny task files)."""

from __future__ import annotations

import json
import math
import re
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from linearize.cli import main
from linearize.eval.harness import LinearizeLM, evaluate
from linearize.eval.tasks import TASKS, cloze_examples, lambada_examples, read_task_data
from linearize.generation import GenerationConfig, generate
from tests.generation.conftest import text_model

CONTEXTS = ["It is a truth", "Anne said: yes", "x"]
CONTINUATIONS = [" universally", " acknowledged.", " no", "y"]
SENTENCES = " ".join(
    f"Sentence number {i} tells of Anne and the garden {'once' if i % 2 else 'again'}."
    for i in range(120)
)


def lm_of(kind: str, **options) -> LinearizeLM:
    return LinearizeLM(text_model(kind), dtype="float64", **options)


def requests(lm: LinearizeLM) -> list:
    """Several continuations per context, so a shared prefill is reused (and must be copied)."""
    out = []
    for context in CONTEXTS:
        for continuation in CONTINUATIONS:
            ids = lm.tok_encode(context + continuation)
            n = len(lm.tok_encode(context))
            out.append(((context, continuation), ids[:n], ids[n:]))
    return out


@pytest.mark.parametrize("kind", ["softmax", "augmented", "hybrid"])
def test_loglikelihood_is_the_sum_of_plain_forward_logprobs(kind):
    lm = lm_of(kind)
    reqs = requests(lm)
    scores = lm._loglikelihood_tokens(reqs)
    for (_, context, continuation), (total, greedy) in zip(reqs, scores, strict=True):
        ids = torch.tensor([context + continuation[:-1]])
        logprobs = F.log_softmax(lm.model(ids)[0][0, -len(continuation) :], -1)
        target = torch.tensor(continuation)
        assert total == pytest.approx(logprobs[range(len(target)), target].sum().item(), abs=1e-9)
        assert greedy == bool((logprobs.argmax(-1) == target).all())


@pytest.mark.parametrize("kind", ["softmax", "augmented", "hybrid"])
def test_state_reuse_equals_recomputing_from_scratch(kind):
    reused = lm_of(kind)._loglikelihood_tokens(requests(lm_of(kind)))
    scratch = lm_of(kind, reuse_state=False)._loglikelihood_tokens(requests(lm_of(kind)))
    for (a, greedy_a), (b, greedy_b) in zip(reused, scratch, strict=True):
        assert a == pytest.approx(b, abs=1e-9)
        assert greedy_a == greedy_b


def test_loglikelihood_rolling_streams_the_whole_text():
    lm = lm_of("augmented")
    text = "It is a truth universally acknowledged, that a single man " * 30
    (total,) = lm.loglikelihood_rolling([SimpleNamespace(args=(text,))])
    ids = torch.tensor([[lm.prefix_token_id, *lm.tok_encode(text)]])
    assert ids.shape[1] > 1024  # more than one streaming segment
    logprobs = F.log_softmax(lm.model(ids)[0][0, :-1], -1)
    expected = logprobs[range(ids.shape[1] - 1), ids[0, 1:]].sum().item()
    assert total == pytest.approx(expected, rel=1e-9)


def test_generate_until_stops_at_the_stop_string():
    lm = lm_of("augmented")
    free = generate(lm.model, "It is", GenerationConfig(max_new_tokens=12)).text
    stop = free[3:5]
    (text,) = lm.generate_until([SimpleNamespace(args=("It is", {"until": [stop]}))])
    assert text == free.split(stop)[0]
    assert stop not in text


def write_tiny_tasks(directory) -> None:
    for task, (kind, _) in TASKS.items():
        build = lambada_examples if kind == "lambada" else cloze_examples
        rows = build(SENTENCES, 3, min_words=20) if kind == "lambada" else build(SENTENCES, 3)
        (directory / f"{task}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_a_tiny_task_runs_end_to_end_through_simple_evaluate(tmp_path):
    write_tiny_tasks(tmp_path)
    model = text_model("augmented")
    tasks = ["linearize_lambada_austen", "linearize_cloze_mobydick"]
    out = evaluate(model, tasks, data_dir=str(tmp_path))
    lambada, cloze = out["results"][tasks[0]], out["results"][tasks[1]]
    # The perplexity lm-eval reports is exp(-mean log-prob) of our own scores.
    lm = LinearizeLM(model)
    rows = [json.loads(line) for line in (tmp_path / f"{tasks[0]}.jsonl").read_text().splitlines()]
    scores = lm.loglikelihood(
        [SimpleNamespace(args=(r["context"], " " + r["target"])) for r in rows]
    )
    mean = sum(s for s, _ in scores) / len(scores)
    # (float32 scores of a random model: ~-40 nats each, so compare in log space)
    assert math.log(lambada["perplexity,none"]) == pytest.approx(-mean, abs=1e-5)
    assert lambada["acc,none"] == sum(g for _, g in scores) / len(scores)
    assert 0 <= cloze["acc,none"] <= 1


def test_task_builders():
    for row in lambada_examples(SENTENCES, 5, min_words=20):
        assert re.search(rf"\b{row['target']}\b", row["context"])
        assert f"{row['context']} {row['target']}." in SENTENCES
    rows = cloze_examples(SENTENCES, 5)
    assert rows == cloze_examples(SENTENCES, 5)  # deterministic
    for row in rows:
        assert len(row["choices"]) == 4
        truth = row["choices"][row["label"]]
        assert SENTENCES.index(row["context"]) + len(row["context"]) + 1 == SENTENCES.index(truth)


def test_a_missing_task_file_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="linearize_cloze_austen.jsonl is missing.*--write-data"):
        read_task_data("linearize_cloze_austen", tmp_path)
    with pytest.raises(ValueError, match="unknown task"):
        read_task_data("hellaswag", tmp_path)


def test_cli_eval_harness(tmp_path, capsys):
    write_tiny_tasks(tmp_path)
    model = text_model("augmented")
    model.save(tmp_path / "model")
    args = ["eval", "harness", "--model", str(tmp_path / "model"), "--data-dir", str(tmp_path)]
    tasks = "linearize_cloze_austen,linearize_lambada_austen"
    out = tmp_path / "results"
    assert main([*args, "--tasks", tasks, "--limit", "2", "--json", "--out", str(out)]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert [r["task"] for r in rows] == tasks.split(",")
    assert rows[0]["examples"] == 2 and rows[0]["perplexity"] is None
    assert rows[1]["acc_norm"] is None and rows[1]["perplexity"] > 0
    (record,) = out.glob("harness-*.json")
    assert json.loads(record.read_text())["rows"] == rows
    # --quant: the same tasks on int4 weights, named in the rows.
    assert main([*args, "--tasks", tasks, "--limit", "2", "--json", "--quant", "int4"]) == 0
    quantized = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert all(r["model"].endswith("+int4") for r in quantized)
    assert quantized[1]["perplexity"] != rows[1]["perplexity"]
    assert main([*args, "--tasks", "no_such_task"]) == 2
    assert "unknown lm-eval tasks" in capsys.readouterr().err
