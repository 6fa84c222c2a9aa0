"""Decode-step engines side by side: ``python benchmarks/engines.py [--context N] [--steps N]``.

One model (default: SmolLM2-135M linearized with the default augmented attention; untrained:
speed does not depend on training),
one context, 1 thread. Rows: the PyTorch reference step (the decoder,
fp32), the fixed-shape step (``linearize.engine.step.FixedStep``) in PyTorch eager and under
``torch.compile`` (inductor), fp32, and the ONNX Runtime engine with fp32, int8 and int4 weights;
then the prompt's prefill, int4, in the PyTorch reference and in the engine's chained tree graph.
PyTorch's own int8/int4 CPU kernels are not rows: on AVX2 they are 12-26x slower than fp32
(docs/fast-decoding.md). Prints one JSON object per row; measure on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import torch

import linearize
from linearize.engine.onnx import OnnxEngine
from linearize.engine.ring import RingState
from linearize.engine.step import FixedStep, fill_rotation
from linearize.models.quantize import quantize


def _median_ms(step, token: int, steps: int, warmup: int = 3) -> tuple[float, float]:
    """Median wall and CPU (this process) milliseconds per step; on a shared machine the CPU
    time is the steadier of the two."""
    wall, cpu = [], []
    for i in range(warmup + steps):
        start, start_cpu = time.perf_counter(), time.process_time()
        token = step(token)
        if i >= warmup:
            wall.append(time.perf_counter() - start)
            cpu.append(time.process_time() - start_cpu)
    return 1000 * statistics.median(wall), 1000 * statistics.median(cpu)


def _fixed_step_runner(model, state, context: int, compiled: bool):
    module = FixedStep(model, max_context=context).eval()
    run = torch.compile(module) if compiled else module
    names = module.input_names()[2:]
    rope = model.layers[0].self_attn.rope
    ring = RingState(module.layouts)
    ring.load(state)
    outputs = module.output_names()

    matrix = np.zeros((rope.inv_freq.numel() * 2,) * 2, dtype=np.float32)

    @torch.no_grad()
    def step(token: int) -> int:
        x = model.embed_tokens(torch.tensor([[token]]))
        cos, sin = rope.cos_sin(ring.pos)
        fill_rotation(matrix, cos.numpy(), sin.numpy())
        rotation = torch.from_numpy(matrix)
        ring.prepare()
        # The current buffers (S, z and the tails trade places every step); a timing row: the
        # sink query's rotation stays the identity here (the engine sets it).
        tensors = [torch.from_numpy(ring.inputs[n]) for n in names]
        result = run(x, rotation, *tensors)
        for name, value in zip(outputs[1:], result[1:], strict=True):
            ring.outputs[name][...] = value.numpy()
        ring.commit()
        return int(result[0].argmax())

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--attention", default="augmented")
    parser.add_argument(
        "--option", action="append", default=[], help="attention option KEY=VALUE (repeatable)"
    )
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=32)
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = linearize.load(args.model)
    options = dict(pair.split("=", 1) for pair in args.option)
    linearize.linearize(model, {"name": args.attention, **options})
    model.eval()
    ids = torch.randint(model.config.vocab_size, (1, args.context - args.steps - 3))
    with torch.no_grad():
        logits, state = model(ids)
    token = int(logits[0, -1].argmax())

    current = {"state": state}

    @torch.no_grad()
    def reference(token: int) -> int:
        out, current["state"] = model(torch.tensor([[token]]), state=current["state"])
        return int(out[0, -1].argmax())

    rows = [("torch reference", "none", reference)]
    for name, compiled in (("fixed step, eager", False), ("fixed step, torch.compile", True)):
        rows.append((name, "none", _fixed_step_runner(model, state, args.context, compiled)))
    for quant, accuracy in (("none", "int8"), ("int8", "int8"), ("int4", "int8"), ("int4", "fp32")):
        target = model if quant == "none" else quantize(_copy(model), quant)
        engine = OnnxEngine(target, max_context=args.context, threads=1, accuracy=accuracy)
        if quant == "none":
            engine.load_state(state)
        else:
            _, qstate = _prefilled(target, ids)
            engine.load_state(qstate)
        label = f"onnx, {accuracy} arithmetic"
        rows.append((label, quant, lambda t, e=engine: int(e.step(t).argmax())))
    for name, quant, step in rows:
        start = time.perf_counter()
        ms, cpu_ms = _median_ms(step, token, args.steps)
        row = {"engine": name, "quant": quant, "context": args.context, "ms_per_token": ms}
        row.update(tokens_per_s=1000 / ms, cpu_ms_per_token=cpu_ms)
        row["wall_s"] = time.perf_counter() - start
        print(json.dumps(row), flush=True)
    # Prefill of the same prompt, int4: the PyTorch reference (chunk form, dequantizing on the
    # fly) against the engine's tree graph in chains of 32 / 64 tokens.
    target = quantize(_copy(model), "int4")
    prompt = ids[0].tolist()
    for chunk in (0, 32, 64):
        engine = OnnxEngine(target, max_context=args.context, threads=1, prefill_chunk=chunk)
        engine.prefill(prompt[:64])  # warm-up (and the export, once)
        start = time.perf_counter()
        engine.prefill(prompt)
        seconds = time.perf_counter() - start
        name = "prefill, torch reference" if chunk == 0 else f"prefill, onnx chains of {chunk}"
        row = {"engine": name, "quant": "int4", "tokens": len(prompt), "seconds": seconds}
        print(json.dumps(row), flush=True)


def _copy(model):
    import copy

    return copy.deepcopy(model)


@torch.no_grad()
def _prefilled(model, ids):
    return model(ids)


if __name__ == "__main__":
    main()
