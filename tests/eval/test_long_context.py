"""Long-context probes: perplexity by position and passkey retrieval, on tiny models."""

from __future__ import annotations

import json
import math

import pytest
import torch

import linearize
from linearize import Decoder
from linearize.cli import main
from linearize.eval import long_context
from linearize.models.quantize import quantize
from linearize.train.perplexity import PerplexityConfig, perplexity, window_spans
from tests.eval.conftest import tiny_augmented, tiny_config


def _tokens(n: int, vocab: int = 128, seed: int = 1) -> torch.Tensor:
    return torch.randint(vocab, (n,), generator=torch.Generator().manual_seed(seed))


def _close(a: float, b: float, rtol: float = 1e-9) -> None:
    assert abs(a - b) <= rtol * abs(b), f"{a} vs {b}"


@pytest.mark.parametrize("segment", [7, 16, 100])
def test_buckets_cover_every_target_once_and_match_windows(segment):
    model = tiny_augmented()
    tokens = _tokens(100)
    result = long_context.stream_perplexity(model, tokens, (0, 16, 40), segment)
    assert [(b.start, b.end) for b in result.buckets] == [(0, 16), (16, 40), (40, 100)]
    assert sum(b.tokens for b in result.buckets) == result.tokens == 99
    # The first bucket is exactly the first window of 16 tokens scored on its own.
    window = perplexity(model, tokens[:16], PerplexityConfig(window=16, form="parallel"))
    _close(result.buckets[0].ppl, window.ppl)
    # And the whole stream is today's streaming perplexity.
    stream = perplexity(model, tokens, PerplexityConfig(window=segment, stream=True))
    _close(result.nll, stream.nll)


@pytest.mark.parametrize("stride", [None, 12])
def test_in_window_buckets_pool_each_windows_positions(stride):
    """Windowed evaluation grouped by position inside the window equals scoring each window on
    its own and pooling its targets by position; the callback changes nothing else."""
    model = tiny_augmented()
    tokens = _tokens(100)
    config = PerplexityConfig(window=16, stride=stride, form="parallel")
    collect = long_context.InWindowBuckets((0, 4, 10), 16)
    result = perplexity(model, tokens, config, on_targets=collect)
    _close(result.nll, perplexity(model, tokens, config).nll)
    buckets = collect.buckets()
    assert [(b.start, b.end) for b in buckets] == [(0, 4), (4, 10), (10, 16)]
    # Windows of their own score all but their first token; overlapping ones every target.
    assert sum(b.tokens for b in buckets) == result.tokens == (93 if stride is None else 99)
    pooled: dict[int, list[float]] = {0: [], 4: [], 10: []}
    with torch.no_grad():
        for span in window_spans(100, 16, stride):
            logits = model(tokens[None, span.start : span.end])[0][0]
            for t in range(span.score_from, span.end):
                nll = torch.nn.functional.cross_entropy(logits[t - span.start - 1], tokens[t])
                position = t - span.start
                pooled[max(e for e in pooled if e <= position)].append(float(nll))
    for b in buckets:
        assert b.tokens == len(pooled[b.start])
        _close(b.ppl, math.exp(sum(pooled[b.start]) / b.tokens), 1e-9)
    with pytest.raises(ValueError, match="not inside a window of 16"):
        long_context.InWindowBuckets((0, 8, 16), 16)
    with pytest.raises(ValueError, match="strictly increasing"):
        long_context.InWindowBuckets((0, 8, 8), 16)


def test_softmax_model_is_scored_in_windows_of_its_positions():
    model = Decoder(tiny_config(max_position_embeddings=32)).double().eval()
    tokens = _tokens(80)
    result = long_context.stream_perplexity(model, tokens, (0, 32, 64))
    windowed = perplexity(model, tokens, PerplexityConfig(window=32, form="parallel"))
    assert result.scored_as == "windows of 32"
    assert result.tokens == windowed.tokens == 80 - 3
    _close(result.nll, windowed.nll)
    first = perplexity(model, tokens[:32], PerplexityConfig(window=32, form="parallel"))
    _close(result.buckets[0].ppl, first.ppl)


@pytest.mark.parametrize("kind", ["augmented", "softmax"])
def test_progress_counts_tokens_up_to_the_last_target(kind):
    """Progress is in tokens, as the engine's stream reports it: increasing, ending at T − 1."""
    if kind == "augmented":
        model = tiny_augmented()
    else:
        model = Decoder(tiny_config(max_position_embeddings=32)).double().eval()
    calls = []
    long_context.stream_perplexity(
        model, _tokens(80), (0, 16), 24, progress=lambda *a: calls.append(a)
    )
    assert len(calls) == (4 if kind == "augmented" else 3)
    assert all(total == 79 for _, total in calls)
    done = [d for d, _ in calls]
    assert done == sorted(set(done)) and done[-1] == 79


def test_bad_buckets_and_short_texts():
    model = tiny_augmented()
    for edges in ([0, 16, 16], [0, 32, 8], [-1, 8], []):
        with pytest.raises(ValueError, match="bucket"):
            long_context.stream_perplexity(model, _tokens(50), edges)
    with pytest.raises(ValueError, match="shorter than the first bucket"):
        long_context.stream_perplexity(model, _tokens(50), (0, 1024))


class _Chars:
    """A character tokenizer: one id per character."""

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict:
        return {"input_ids": [ord(c) for c in text]}

    def decode(self, ids: list[int]) -> str:
        return "".join(map(chr, ids))


def test_passkey_prompt_hides_the_key_at_its_depth():
    tokenizer = _Chars()
    for depth in (0.0, 0.5, 1.0):
        ids = long_context.passkey_prompt(tokenizer, 3000, depth, "12345")
        assert len(ids) == 3000
        text = tokenizer.decode(ids.tolist())
        assert text.count("12345") == 2
        at = text.find("12345") / len(text)
        assert abs(at - depth) < 0.2, (depth, at)
    with pytest.raises(ValueError, match=r"depth must be in \[0, 1\]"):
        long_context.passkey_prompt(tokenizer, 3000, 1.5, "12345")


def test_passkey_runs_and_skips_lengths_past_softmax_positions(tiny_dirs, capsys, tmp_path):
    argv = ["eval", "passkey", "--lengths", "300,400", "--trials", "2", "--json"]
    assert main(argv + ["--model", tiny_dirs["softmax"]]) == 0
    captured = capsys.readouterr()
    row = json.loads(captured.out)
    # The tiny softmax model has 64 positions: both lengths are skipped, with a message.
    assert row["skipped"] == [300, 400] and row["accuracy"] == {}
    assert "400 skipped" in captured.err
    out = ["--out", str(tmp_path / "results")]
    assert main(argv + ["--model", tiny_dirs["augmented"], "--seed", "3", *out]) == 0
    row = json.loads(capsys.readouterr().out)
    assert set(row["accuracy"]) == {"300", "400"}
    # The record's command reproduces the run: its trials and seed included.
    (record,) = (tmp_path / "results").glob("passkey-*.json")
    saved = json.loads(record.read_text())
    assert saved["command"].endswith("--lengths 300,400 --trials 2 --seed 3")
    # ... and says what it measured (the report pairs a linear model with the original by it).
    (info,) = saved["extra"]["models"].values()
    assert info["family"] == "linear" and info["quant"] == "none"
    assert all(0 <= a <= 1 for a in row["accuracy"].values())
    bad = ["eval", "passkey", "--model", tiny_dirs["augmented"], "--depths", "0.5,2"]
    assert main(bad) == 2
    assert "[0, 1]" in capsys.readouterr().err
    # --quant quantizes as the model loads, named in the row; a quantized model keeps its own.
    assert main(argv + ["--model", tiny_dirs["augmented"], "--quant", "int4"]) == 0
    assert json.loads(capsys.readouterr().out)["model"].endswith("+int4")
    quantized = linearize.load(tiny_dirs["augmented"])
    quantize(quantized, "int4")
    quantized.save(tmp_path / "q4")
    assert main(argv + ["--model", str(tmp_path / "q4"), "--quant", "int8"]) == 2
    assert "already quantized (int4)" in capsys.readouterr().err


def test_eval_ppl_stream_json_has_buckets(tiny_dirs, capsys, tmp_path):
    argv = ["eval", "ppl", "--model", tiny_dirs["augmented"], "--data", tiny_dirs["text"]]
    argv += ["--stream", "--window", "32", "--buckets", "0,32,64", "--json", "--out", str(tmp_path)]
    assert main(argv) == 0
    row = json.loads(capsys.readouterr().out)
    assert [b["from"] for b in row["buckets"]] == [0, 32, 64]
    assert sum(b["tokens"] for b in row["buckets"]) == row["tokens"]
    assert math.isclose(row["ppl"], math.exp(row["nll"]), rel_tol=1e-9)
    assert list(tmp_path.glob("*.png"))
    (record,) = tmp_path.glob("ppl-*.json")
    (info,) = json.loads(record.read_text())["extra"]["models"].values()
    assert info["family"] == "linear" and info["weight_bytes"] > 0
    assert main(argv[:-3] + ["--buckets", "0,64,32"]) == 2
    assert "strictly increasing" in capsys.readouterr().err


def test_results_page_has_the_position_table_plot_and_goals(tiny_dirs, capsys, tmp_path):
    from linearize.bench import report

    for model in ("softmax", "augmented"):
        argv = ["eval", "ppl", "--model", tiny_dirs[model], "--data", tiny_dirs["text"]]
        argv += ["--stream", "--window", "16", "--buckets", "0,8,32", "--out", str(tmp_path)]
        assert main(argv) == 0
    page = report.render_page(tmp_path, tmp_path / "docs" / "results.md")
    text = page.read_text()
    assert "## Perplexity by position" in text
    assert (tmp_path / "docs" / "results" / "ppl_position.png").stat().st_size > 0
    # The tiny models have no 1k bucket: no ratio to the original, no false verdict.
    assert "vs the original" not in text
