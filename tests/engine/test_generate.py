"""Generation on the fast engine: the same tokens as the PyTorch reference, clear refusals."""

from __future__ import annotations

import json

import pytest
import torch

from linearize.cli import main
from linearize.engine import build_engine, resolve_engine
from linearize.generation import MedusaHeads
from linearize.generation.config import GenerationConfig
from linearize.generation.decode import generate
from linearize.generation.planner import Calibration
from linearize.models.quantize import quantize
from linearize.ops.tree import Tree
from tests.engine.conftest import engine_model
from tests.generation.conftest import tiny_model

pytest.importorskip("onnxruntime")

from linearize.engine.onnx import OnnxEngine  # noqa: E402

# Every test with a user cache of its own (calibrations, timings; the session's kernels).
pytestmark = pytest.mark.usefixtures("user_cache")


@pytest.mark.parametrize("kind", ["augmented", "paper", "hybrid", "softmax", "retain"])
def test_greedy_on_engine_equals_reference(kind):
    model = quantize(engine_model(kind, text=True).eval(), "int4")
    config = GenerationConfig(max_new_tokens=40)
    reference = generate(model, "It is a truth universally acknowledged", config)
    assert resolve_engine("auto", model) == "onnx"
    engine = build_engine("onnx", model, max_context=64, threads=1, accuracy="fp32")
    fast = generate(model, "It is a truth universally acknowledged", config, engine=engine)
    assert fast.token_ids == reference.token_ids
    assert fast.forward_passes == reference.forward_passes


def test_long_prompts_prefill_on_chains():
    """What generate builds (build_engine): a prompt of PREFILL_CHUNK tokens or more prefills
    in chains on the engine, every chunk on the one graph of PREFILL_CHUNK nodes (the last one
    padded), a shorter one in the reference; the reference's tokens either way."""
    from linearize.engine.onnx import PREFILL_CHUNK

    model = quantize(engine_model("augmented").eval(), "int4")
    config = GenerationConfig(max_new_tokens=12)
    torch.manual_seed(0)
    for length, graphs in ((PREFILL_CHUNK - 1, set()), (PREFILL_CHUNK + 3, {64})):
        prompt = torch.randint(0, 128, (length,)).tolist()
        engine = build_engine("onnx", model, max_context=128, threads=1, accuracy="fp32")
        assert engine.prefill_chunk == PREFILL_CHUNK
        fast = generate(model, prompt, config, engine=engine)
        assert {size for size, chain in engine.trees if chain} == graphs
        assert fast.token_ids == generate(model, prompt, config).token_ids


def test_cli_engines_agree(tmp_path, capsys):
    path = tmp_path / "q4"
    quantize(engine_model("augmented", text=True), "int4").save(path)
    outputs = {}
    for engine in ("torch", "onnx", "auto"):
        argv = ["generate", "--model", str(path), "--prompt", "Hi", "--max-new-tokens", "24"]
        assert main([*argv, "--engine", engine, "--json"]) == 0
        outputs[engine] = json.loads(capsys.readouterr().out)["token_ids"]
    # auto picks the onnx engine for a quantized model; the reference ran too (its tokens may
    # differ in near-ties: the engine's default arithmetic rounds activations to int8).
    assert outputs["onnx"] == outputs["auto"] and outputs["torch"]


def test_refusals(tmp_path):
    default = quantize(tiny_model("augmented").float(), "int4")
    assert resolve_engine("auto", default) == "onnx"  # the default layer runs on the engine
    model = engine_model("augmented", text=True)
    assert resolve_engine("auto", model) == "torch"  # fp32 weights: the reference
    with pytest.raises(ValueError, match="allowed"):
        resolve_engine("tensorrt", model)
    engine = OnnxEngine(model, max_context=64, threads=1, cache=tmp_path, max_tree=8)
    engine.prefill([1, 2, 3])
    with pytest.raises(ValueError, match="past what the engine's tree graphs take"):
        engine.forward_tree([5] * 9, Tree.from_parents(list(range(-1, 8))))


NEW = 24


@pytest.mark.parametrize("kind", ["augmented", "paper", "hybrid", "retain"])
def test_speculative_on_engine_equals_plain_on_engine(kind):
    """Greedy Medusa / lookup / draft on the fast path give the tokens of greedy plain decoding
    on the same fast path (both with the same int4 weights)."""
    model = quantize(engine_model(kind), "int4")
    # fp32 arithmetic: with int8 activations (the plain-decoding default) a tree pass and a step
    # round differently, and greedy near-ties may then break differently.
    engine = build_engine("onnx", model, max_context=128, threads=1, accuracy="fp32")
    heads = MedusaHeads.from_model(model, num_heads=3)
    with torch.no_grad():
        for head in heads.heads:
            head.blocks[0].linear.weight.normal_(0, 0.05)
    prompt = [5, 9, 17, 3, 5, 9, 17, 3, 5]
    plain = generate(model, prompt, GenerationConfig(max_new_tokens=NEW), engine=engine)
    # (an fp32 engine's steps in int8 arithmetic read its float32 rings: the reference is an
    # int8 engine with float32 rings too, not the default's float16 ones)
    fast = build_engine(
        "onnx", model, max_context=128, threads=1, accuracy="int8", kv_type="float32"
    )
    plain_int8 = generate(model, prompt, GenerationConfig(max_new_tokens=NEW), engine=fast)
    references = {"fp32": plain.token_ids, "int8": plain_int8.token_ids}
    cases = [
        (
            GenerationConfig(max_new_tokens=NEW, speculative="medusa", tree="tree-8"),
            {"heads": heads},
        ),
        (GenerationConfig(max_new_tokens=NEW, speculative="medusa"), {"heads": heads}),
        (GenerationConfig(max_new_tokens=NEW, speculative="lookup", gamma=3), {}),
        (GenerationConfig(max_new_tokens=NEW, speculative="draft", draft_layers=1, gamma=2), {}),
        (GenerationConfig(max_new_tokens=NEW, speculative="draft", gamma=3), {"draft": model}),
    ]
    for config, options in cases:
        result = generate(model, prompt, config, engine=engine, **options)
        # A planner that leaves speculation off decodes plainly with int8 arithmetic.
        expected = references[result.arithmetic]
        assert result.token_ids == expected, (config.speculative, config.tree, result.arithmetic)
    # The target drafting for itself: every draft accepted, so the tree step really ran.
    assert result.mean_accepted == 4


def test_planner_off_decodes_with_the_faster_arithmetic():
    """On an engine built for exact speculation (fp32), speculation the planner leaves off from
    the start decodes with int8 arithmetic: plain ``generate``'s tokens, at its speed. When it
    speculates, steps and trees stay fp32 (plain decoding at fp32 is the exact fallback)."""
    model = quantize(engine_model("augmented"), "int4")
    engine = build_engine("onnx", model, max_context=128, threads=1, accuracy="fp32")
    # (an fp32 engine's steps in int8 arithmetic read its float32 rings: the reference is an
    # int8 engine with float32 rings too, not the default's float16 ones)
    fast = build_engine(
        "onnx", model, max_context=128, threads=1, accuracy="int8", kv_type="float32"
    )
    prompt = [5, 9, 17, 3, 5, 9, 17, 3, 5]
    config = GenerationConfig(max_new_tokens=NEW, speculative="lookup")
    plain = {
        "fp32": generate(model, prompt, GenerationConfig(max_new_tokens=NEW), engine=engine),
        "int8": generate(model, prompt, GenerationConfig(max_new_tokens=NEW), engine=fast),
    }
    assert plain["fp32"].arithmetic == "fp32" and plain["int8"].arithmetic == "int8"
    # Trees cost too much against an int8 step (though not against an fp32 one): off, int8.
    off = Calibration(step=1.0, verify={2: 1.1, 9: 1.2}, fast_step=0.3)
    result = generate(model, prompt, config, engine=engine, calibration=off)
    assert result.plan["nodes"] == 1 and "int8 arithmetic" in result.plan["reason"]
    assert result.arithmetic == "int8" and result.token_ids == plain["int8"].token_ids
    # The next generation starts from the engine's own arithmetic again.
    again = generate(model, prompt, GenerationConfig(max_new_tokens=NEW), engine=engine)
    assert again.arithmetic == "fp32" and again.token_ids == plain["fp32"].token_ids
    # Cheap trees: speculation on, fp32 throughout, plain fp32's tokens.
    on = Calibration(step=1.0, verify={2: 0.01, 9: 0.02}, fast_step=0.3)
    result = generate(model, prompt, config, engine=engine, calibration=on)
    assert result.plans[0]["nodes"] > 1
    assert result.arithmetic == "fp32" and result.token_ids == plain["fp32"].token_ids
    # A calibration on the engine times both steps.
    measured = generate(model, prompt, GenerationConfig(max_new_tokens=2, speculative="lookup"),
                        engine=engine).calibration  # fmt: skip
    assert measured.fast_step is not None and measured.fast_step > 0


def test_speculative_benchmark_on_engine_after_a_document(tmp_path, capsys):
    """``bench speculative --engine onnx --context N``: every method on the engine, speculation
    exact against plain decoding with the same (fp32) arithmetic, the int8 plain row beside."""
    model = quantize(engine_model("augmented", text=True), "int4")
    path = tmp_path / "q4"
    model.save(path)
    document = tmp_path / "document.txt"
    document.write_text("It is a truth universally acknowledged, that a single man. " * 8)
    record = tmp_path / "results" / "spec.json"
    argv = [
        "bench", "speculative", "--model", str(path), "--prompts", "2", "--max-new-tokens", "8",
        "--draft-layers", "1", "--no-chat", "--engine", "onnx", "--threads", "1",
        "--context", "64", "--context-data", str(document), "--out", str(record),
    ]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "every method identical" in out and "| onnx, fp32 |" in out
    data = json.loads(record.read_text())
    rows = data["rows"]
    assert [(r["method"], r["arithmetic"]) for r in rows[:2]] == [
        ("plain", "fp32"),
        ("plain", "int8"),
    ]
    assert [r["method"] for r in rows[2:]] == ["lookup", "draft"]
    # Each method against plain decoding at the arithmetic it ran (int8 where the planner left
    # speculation off from the start).
    assert all(r["arithmetic"] in ("fp32", "int8") for r in rows)
    assert all(r["engine"] == "onnx" and r["quant"] == "int4" for r in rows)
    assert all(r["identical"] for r in rows)
    assert data["extra"]["setup"]["context"] == 64
    # The document goes before each prompt (byte tokens: 64 of them, a blank line, the prompt).
    assert all(r["prompt_tokens"] > 64 + 2 for r in rows)
    assert main([*argv[:-2], "--context", "10000"]) == 2
    assert "has only" in capsys.readouterr().err


def test_speculative_benchmark_engine_refusals(tmp_path, capsys):
    path = tmp_path / "tiny"
    engine_model("augmented", text=True).save(path)
    argv = ["bench", "speculative", "--model", str(path), "--prompts", "1", "--no-chat"]
    assert main([*argv, "--context", "-1"]) == 2
    assert "--context must be >= 0" in capsys.readouterr().err


def test_speculation_timings_are_stored_and_read_back(tmp_path):
    """A calibration measured on an engine is stored under its key and read back by the next
    generation (a fresh engine, as in a new process): the planner then uses it without timing
    (no tree graph loaded); ``refresh`` times again; another key times on its own."""
    from linearize.generation.calibrations import CalibrationStore

    model = quantize(engine_model("augmented"), "int4")
    prompt = [5, 9, 17, 3, 5, 9, 17, 3, 5]
    config = GenerationConfig(max_new_tokens=NEW, speculative="lookup")
    store = CalibrationStore(tmp_path / "timings")

    def run(store, threads=1):
        engine = build_engine("onnx", model, max_context=128, threads=threads, accuracy="fp32")
        return engine, generate(model, prompt, config, engine=engine, calibrations=store)

    engine, first = run(store)
    [stored] = (tmp_path / "timings").glob("*.json")
    assert engine.trees  # timed: tree graphs loaded
    engine, second = run(store)
    assert second.calibration == first.calibration and second.token_ids == first.token_ids
    if not second.plan["nodes"] > 1:
        assert not engine.trees  # read, not timed: no tree graph loaded for plain decoding
    # What is stored is what the planner uses: trees made cheap in the file turn speculation on.
    data = json.loads(stored.read_text())
    data["calibration"].update(verify={"2": 1e-6, "9": 2e-6}, fast_step=None)
    stored.write_text(json.dumps(data))
    _, cheap = run(store)
    assert cheap.plans[0]["nodes"] > 1 and cheap.calibration.verify == {2: 1e-6, 9: 2e-6}
    plain = build_engine("onnx", model, max_context=128, threads=1, accuracy="fp32")
    plain = generate(model, prompt, GenerationConfig(max_new_tokens=NEW), engine=plain)
    assert cheap.token_ids == plain.token_ids  # speculation stays exact
    # refresh: timed again and stored over the edited file.
    _, fresh = run(CalibrationStore(tmp_path / "timings", refresh=True))
    assert fresh.calibration.verify != {2: 1e-6, 9: 2e-6}
    assert Calibration.from_dict(json.loads(stored.read_text())["calibration"]) == fresh.calibration
    # Another thread count is another key: timed, and stored beside the first.
    run(store, threads=2)
    assert len(list((tmp_path / "timings").glob("*.json"))) == 2


def test_cli_generate_reads_stored_timings(tmp_path, capsys):
    path = tmp_path / "q4"
    quantize(engine_model("augmented", text=True), "int4").save(path)
    argv = ["generate", "--model", str(path), "--prompt", "Hi", "--max-new-tokens", "8"]
    argv += ["--engine", "onnx", "--speculative", "lookup", "--json"]
    calibrations = []
    for extra in ([], [], ["--recalibrate"]):
        assert main([*argv, *extra]) == 0
        calibrations.append(json.loads(capsys.readouterr().out)["calibration"])
    assert len(list((tmp_path / "cache" / "linearize" / "calibrations").glob("*.json"))) == 1
    assert calibrations[1] == calibrations[0]  # read back
    assert calibrations[2] != calibrations[0]  # timed again
    assert main(["generate", "--model", str(path), "--prompt", "Hi", "--recalibrate"]) == 2
    assert "--recalibrate times speculation" in capsys.readouterr().err


def test_sampling_between_engine_steps_runs_on_one_torch_thread(monkeypatch):
    """Plain steps on the engine sample with PyTorch on one thread (its pool would spin on the
    cores onnxruntime's threads hold); the caller's thread count is back afterwards, and the
    tokens are the same."""
    from linearize.engine import one_torch_thread
    from linearize.generation.sampling import Sampler

    model = quantize(engine_model("augmented"), "int4")
    engine = build_engine("onnx", model, max_context=128, threads=2, accuracy="int8")
    prompt = [5, 9, 17, 3, 5, 9, 17, 3, 5]
    seen = []
    probs = Sampler.probs

    def spy(self, logits, history=()):
        seen.append(torch.get_num_threads())
        return probs(self, logits, history)

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        reference = generate(model, prompt, GenerationConfig(max_new_tokens=8), engine=engine)
        monkeypatch.setattr(Sampler, "probs", spy)
        result = generate(model, prompt, GenerationConfig(max_new_tokens=8), engine=engine)
        assert torch.get_num_threads() == 2
        with one_torch_thread():
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
    assert result.token_ids == reference.token_ids
    # The first token is sampled after the prefill (every thread), the others between steps.
    assert seen[0] == 2 and seen[1:] == [1] * (len(seen) - 1) and len(seen) == 8
