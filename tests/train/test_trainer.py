"""The trainer loop on tiny random models: learning, schedule, evaluation, metrics, guards."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch

import linearize
from linearize import Decoder, ModelConfig
from linearize.train.config import TrainConfig
from linearize.train.losses import next_token_nll
from linearize.train.perplexity import windowed_nll
from linearize.train.schedule import WarmupCosine
from linearize.train.stages import StageSetup
from linearize.train.trainer import Trainer, TrainingDiverged

AUGMENTED = {"name": "augmented", "size": 8, "conv": "causal", "conv_size": 4}


def tiny_model(attention=AUGMENTED, seed: int = 0) -> Decoder:
    torch.manual_seed(seed)
    config = ModelConfig(
        vocab_size=128,
        hidden_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        intermediate_size=128,
    )
    model = Decoder(config)
    with torch.no_grad():
        model.embed_tokens.weight.mul_(0.1)
    return linearize.linearize(model, attention) if attention else model


def tiny_config(**overrides) -> TrainConfig:
    values = dict(
        model="tiny",
        attention="augmented",
        attention_options={"size": 8, "conv": "causal", "conv_size": 4},
        stage="finetune",
        tokens=8 * 32 * 4,
        block_size=32,
        batch_size=4,
        micro_batch_size=2,
        eval_tokens=128,
        checkpoint_every=0,
        device="cpu",
    )
    return TrainConfig(**{**values, **overrides})


def tokens(n: int = 2048, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 128, (n,), generator=torch.Generator().manual_seed(seed))


def losses(metrics_path) -> list[dict]:
    return [json.loads(line) for line in metrics_path.read_text().splitlines()]


@pytest.mark.parametrize("stage", ["transfer", "finetune"])
def test_loss_decreases_on_a_repeated_batch(tmp_path, stage):
    # Two blocks and a batch of two: every step sees the same batch.
    config = tiny_config(
        stage=stage,
        tokens=12 * 64,
        block_size=32,
        batch_size=2,
        micro_batch_size=1,
        lr=1e-2,
        transfer_lr=3e-2,
        warmup=0.0,
    )
    model = tiny_model()
    with torch.no_grad():
        # Start α and the conv taps away from their optimum, so stage 1 has something to fix.
        for layer in model.layers:
            layer.self_attn.alpha.fill_(0.5)
            layer.self_attn.conv.normal_(0, 0.3)
    result = Trainer(model, config, tokens(64), out=tmp_path / "run").fit()
    records = [r for r in losses(result.metrics) if r["stage"] == stage]
    assert len(records) == 12
    first, last = records[0]["loss"], records[-1]["loss"]
    assert last < 0.7 * first, f"loss {first} -> {last}"


def test_writes_model_metrics_and_config(tmp_path):
    config = tiny_config(stage="both", lora=True, eval_every=2)
    result = Trainer(tiny_model(), config, tokens(), tokens(256, seed=2), out=tmp_path).fit()
    assert result.model_dir == tmp_path / "model"
    records = losses(result.metrics)
    steps = config.stage_steps()
    assert [r["step"] for r in records] == [
        *range(1, steps["transfer"] + 1),
        *range(1, steps["finetune"] + 1),
    ]
    assert all(r["tokens_per_s"] > 0 and math.isfinite(r["loss"]) for r in records)
    assert sum("eval_ppl" in r for r in records) >= 2
    assert set(result.evals) == {"transfer", "finetune"}
    saved = json.loads((tmp_path / "config.json").read_text())
    assert TrainConfig.from_dict(saved) == config
    loaded = linearize.load(tmp_path / "model")
    ids = tokens(40, seed=3)[None]
    torch.testing.assert_close(loaded(ids)[0], result.model(ids)[0], rtol=0, atol=0)


def test_eval_perplexity_is_exp_mean_nll():
    model = tiny_model().double()
    data = tokens(100, seed=4)
    nll, count = windowed_nll(model, data, 32, batch_size=2)
    # Three full windows and the 4-token tail, each scoring all but its first token.
    assert count == 3 * 31 + 3
    blocks = [data[i : i + 32] for i in range(0, 100, 32)]
    with torch.no_grad():
        expected = sum(float(next_token_nll(model(b[None])[0], b[None])) for b in blocks)
    assert math.isclose(nll, expected, rel_tol=1e-12)


def test_warmup_cosine_schedule():
    schedule = WarmupCosine(warmup=4, total=20, min_ratio=0.1)
    values = [schedule(s) for s in range(21)]
    assert values[:4] == sorted(values[:4]) and values[0] > 0
    assert values[4] == pytest.approx(1.0)
    assert values[4:] == sorted(values[4:], reverse=True)
    assert values[20] == pytest.approx(0.1)


def test_micro_batches_do_not_change_the_update(tmp_path):
    runs = []
    for micro in (1, 4):
        config = tiny_config(micro_batch_size=micro, tokens=2 * 32 * 4)
        runs.append(Trainer(tiny_model().double(), config, tokens()).fit().model.state_dict())
    for name, value in runs[0].items():
        torch.testing.assert_close(runs[1][name], value, rtol=1e-10, atol=1e-12, msg=name)


def test_the_seed_alone_sets_lora_adapters(tmp_path):
    """The trained model depends on TrainConfig.seed, not on what the process drew before."""

    def fit(seed: int, draws: int):
        config = tiny_config(lora=True, seed=seed, tokens=2 * 32 * 4)
        model = tiny_model()
        torch.rand(draws)  # randomness drawn elsewhere in the process
        state = torch.random.get_rng_state()
        trained = Trainer(model, config, tokens()).fit().model.state_dict()
        # Seeding the adapters leaves the caller's random state where it was.
        assert torch.equal(torch.random.get_rng_state(), state)
        return trained

    first, second, other = fit(0, 1), fit(0, 1000), fit(1, 1)
    for name, value in first.items():
        torch.testing.assert_close(second[name], value, rtol=0, atol=0, msg=name)
    assert any(not torch.equal(other[name], value) for name, value in first.items())


@pytest.mark.parametrize("form", ["parallel", "chunk"])
def test_gradient_checkpointing_recomputes_layers_and_keeps_the_update(tmp_path, form):
    runs, calls = [], []
    for recompute in (False, True):
        config = tiny_config(gradient_checkpointing=recompute, form=form, tokens=2 * 32 * 4)
        model = tiny_model().double()
        model.layers[0].register_forward_pre_hook(lambda *args, r=recompute: calls.append(r))
        runs.append(Trainer(model, config, tokens()).fit().model.state_dict())
    # Each layer runs again in backward (once per micro-batch), and the weights end the same.
    assert calls.count(True) > calls.count(False) > 0
    for name, value in runs[0].items():
        torch.testing.assert_close(runs[1][name], value, rtol=1e-10, atol=1e-12, msg=name)


class NaNAtStep(Trainer):
    """Turns the loss into NaN from call ``at`` on (a divergence, on demand)."""

    at = 3

    def setup_stage(self, name: str) -> StageSetup:
        stage = super().setup_stage(name)
        loss, calls = stage.loss, []

        def poisoned(ids, state):
            calls.append(1)
            value, parts, state = loss(ids, state)
            return (value * (math.nan if len(calls) >= self.at else 1), parts, state)

        stage.loss = poisoned
        return stage


def test_nan_guard_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    # Two micro-batches per step: call 3 is step 2; the checkpoint of step 1 stays in charge.
    config = tiny_config(checkpoint_every=1, tokens=4 * 32 * 4)
    trainer = NaNAtStep(tiny_model(), config, tokens(), out=tmp_path)
    with pytest.raises(TrainingDiverged, match="step 2.*last good checkpoint.*step00000001"):
        trainer.fit()
    assert (tmp_path / "checkpoints" / "latest").read_text().strip().endswith("step00000001")
    assert not (tmp_path / "model").exists()
    assert [r["step"] for r in losses(tmp_path / "metrics.jsonl")] == [1]


def test_both_stages_split_the_budget():
    """By default the transfer stage gets a twelfth of the tokens with a windowed attention, a
    third with a pure linear one (or an attention the config does not name), at least a step."""
    assert TrainConfig(tokens=24_576).validate().stage_tokens() == {
        "transfer": 2048,
        "finetune": 22_528,
    }
    for attention in ("hedgehog", "elu", None):
        config = TrainConfig(tokens=24_576, attention=attention).validate()
        assert config.stage_tokens() == {"transfer": 8192, "finetune": 16_384}, attention
    paper = TrainConfig(tokens=24_576, attention="augmented_paper").validate()
    assert paper.stage_tokens()["transfer"] == 2048
    small = TrainConfig(tokens=3 * 1024, block_size=1024, batch_size=1).validate()
    assert small.stage_steps() == {"transfer": 1, "finetune": 2}
    assert TrainConfig(stage="finetune", tokens=4096).validate().stage_tokens() == {
        "finetune": 4096
    }


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"stage": "distill"}, "stage="),
        ({"batch_size": 3, "micro_batch_size": 2}, "multiple of micro_batch_size"),
        ({"tokens": 10}, "less than one step"),
        ({"warmup": 1.5}, "warmup"),
        ({"lr": 0.0}, "lr must be > 0"),
        ({"transfer_tokens": 100}, "transfer_tokens splits --stage both"),
        ({"precision": "fp8"}, "precision="),
    ],
)
def test_bad_config(overrides, match):
    with pytest.raises(ValueError, match=match):
        tiny_config(**overrides).validate()


def test_corpus_shorter_than_one_block():
    with pytest.raises(ValueError, match="shorter than one block"):
        Trainer(tiny_model(), tiny_config(), tokens(20))


def test_unknown_config_key():
    with pytest.raises(ValueError, match="unknown training config keys"):
        TrainConfig.from_dict({"learning_rate": 1.0})


# --- the command line, end to end, on a tiny model with a byte tokenizer ---------------------


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    backend = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(alphabet)}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    torch.manual_seed(0)
    model = Decoder(
        ModelConfig(
            vocab_size=256,
            hidden_size=32,
            num_layers=2,
            num_heads=2,
            num_kv_heads=1,
            intermediate_size=64,
        )
    )
    model.tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend)
    path = tmp_path_factory.mktemp("models") / "tiny"
    model.save(path)
    return path


@pytest.fixture
def cli(tiny_dir, tmp_path, monkeypatch, capsys):
    from linearize.cli import main

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    base = [
        "train",
        "--model",
        str(tiny_dir),
        "--attention",
        "augmented",
        "--group-size",
        "8",
        "--block-size",
        "32",
        "--batch-size",
        "2",
        "--tokens",
        "384",
        "--eval-tokens",
        "64",
        "--device",
        "cpu",
    ]

    def run(*args):
        code = main([*base, *args])
        return code, capsys.readouterr()

    return run


def test_cli_trains_and_says_where_things_went(cli, tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("It is a truth universally acknowledged. " * 40)
    run = tmp_path / "run"
    code, out = cli("--data", str(corpus), "--out", str(run), "--lora", "--conv-size", "4")
    assert code == 0, out.err
    assert f"model: {run / 'model'}" in out.out
    assert f"metrics: {run / 'metrics.jsonl'}" in out.out
    trained = linearize.load(run / "model")
    assert trained.attention_names() == ["augmented"] * 2
    # --conv-size turns the conv on V on (the preset has none)
    assert trained.layers[0].self_attn.conv.shape[-1] == 4
    saved = json.loads((run / "config.json").read_text())
    assert saved["lora"] and saved["attention_options"] == {
        "size": 8,
        "conv": "causal",
        "conv_size": 4,
    }


@pytest.mark.parametrize(
    "name, content, match",
    [
        ("missing.txt", None, "neither a built-in corpus"),
        ("empty.txt", b"", "holds no text"),
        ("latin1.txt", b"caf\xe9 " * 100, "not UTF-8"),
        ("short.txt", b"too short", "shorter than one block"),
        ("folder", "a folder", "holds no"),
    ],
)
def test_cli_bad_data(cli, tmp_path, name, content, match):
    data = tmp_path / name
    if content == "a folder":
        data.mkdir()
    elif content is not None:
        data.write_bytes(content)
    code, out = cli("--data", str(data), "--out", str(tmp_path / "run"))
    assert code == 2
    assert out.err.startswith("error: ") and re.search(match, out.err), out.err
    assert not (tmp_path / "run").exists(), "a failing run wrote its --out"


def test_cli_stage1_with_nothing_to_train(cli, tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("plain text " * 100)
    code, out = cli("--data", str(corpus), "--out", str(tmp_path / "run"), "--attention", "elu")
    assert code == 2 and "nothing to train; use --stage finetune" in out.err
    assert not (tmp_path / "run").exists()
