"""The demo's report: one table for the terminal, a markdown page with plots for the folder."""

from __future__ import annotations

import json
import platform
from dataclasses import asdict
from pathlib import Path

import torch

MIB = 2**20


def summary_rows(report) -> list[tuple[str, str]]:
    """(label, value) rows of the headline numbers, in reading order."""
    rows = []
    budget = report.config["budget"]
    for label in ("original", "plain", "augmented"):
        p = report.ppl.get(label)
        if p is None:
            continue
        name = {
            "original": "original (softmax)",
            "plain": f"plain ({report.config['plain']})",
            "augmented": "augmented"
            if report.config["attention"] == "augmented"
            else f"augmented ({report.config['attention']})",
        }[label]
        trained = "" if label == "original" else f", after {budget:,} training tokens"
        rows.append((f"perplexity: {name}{trained}", f"{p['ppl']:.2f}"))
    for label in ("original", "augmented"):
        for r in report.decode.get(label, []):
            context = r["context"]
            size = f"{context // 1024}k" if context % 1024 == 0 else str(context)
            key = f"decode {label} @ {size}"
            if not r["supported"]:
                rows.append((key, "context beyond the model's positions"))
                continue
            # Rows of an older report carry no engine: fp32 on torch.
            quant, engine = r.get("quant", "none"), r.get("engine", "torch")
            weights = "fp32" if quant == "none" else quant
            rows.append(
                (
                    key,
                    f"{r['tokens_per_s']:.1f} tok/s, state {r['state_bytes'] / MIB:.2f} MiB "
                    f"({weights}, {engine} engine)",
                )
            )
    spec = report.speculative
    if spec:
        plain = spec["plain"]
        # Generation runs on the PyTorch reference in fp32, the arithmetic under which Medusa's
        # tree and plain steps agree (on the engine: `linearize bench speculative --engine onnx`).
        rows.append(
            ("generation without Medusa", f"{plain['tokens_per_s']:.1f} tok/s (fp32, torch engine)")
        )
        for name, label in (("medusa", "auto tree"), ("medusa_tree8", "8-node tree")):
            m = spec.get(name)
            if m is None:
                continue
            plan = m.get("plan") or {}
            chosen = plan.get("reason", "")
            # Reports written before "speculated" existed: the first prompt's plan.
            if not m.get("speculated", plan.get("nodes", 2) > 1):
                # Plain decoding throughout: a ratio would compare two timings of the same
                # decoding, which says only how the machine's load moved between them.
                value = (
                    f"plain decoding chosen ({chosen}): {m['tokens_per_s']:.1f} tok/s, "
                    "the row above timed again"
                )
            else:
                speedup = m["tokens_per_s"] / plain["tokens_per_s"]
                value = (
                    f"{m['tokens_per_s']:.1f} tok/s ({speedup:.2f}x), mean accepted "
                    f"{m['mean_accepted']:.2f}, output "
                    f"{'identical' if m['identical'] else 'DIFFERENT'}"
                    + (f"; {chosen}" if chosen else "")
                )
            rows.append((f"generation with Medusa ({label})", value))
    rows.append(("time of all steps (over resumed runs too)", f"{report.seconds / 60:.1f} min"))
    return rows


def _plots(report, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = []
    labels = [k for k in ("original", "plain", "augmented") if k in report.ppl]
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.bar(labels, [report.ppl[k]["ppl"] for k in labels], color=["#777", "#c66", "#36a"])
    ax.set_ylabel("perplexity (lower is better)")
    ax.set_title("Austen evaluation slice")
    fig.tight_layout()
    fig.savefig(out / "perplexity.png", dpi=100)
    plt.close(fig)
    names.append("perplexity.png")
    fig, ax = plt.subplots(figsize=(5, 3))
    for label, rows in report.decode.items():
        points = [(r["context"], r["tokens_per_s"]) for r in rows if r["supported"]]
        if points:
            ax.plot(*zip(*points, strict=True), marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context (tokens)")
    ax.set_ylabel("decode tokens/s")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "decode.png", dpi=100)
    plt.close(fig)
    names.append("decode.png")
    return names


def render_markdown(report, plots: list[str]) -> str:
    c = report.config
    lines = [
        "# linearize demo report",
        "",
        f"Model `{c['model']}` linearized with `{c['attention']}` (compared with the plain "
        f"`{c['plain']}` linear attention), each trained on {c['budget']:,} tokens of "
        f"`{c['data']}` (attention transfer where it has parameters to train, then LoRA).",
        f"Perplexity: the first {c['eval_tokens']:,} tokens of `{c['eval_data']}`, windows of "
        f"{c['eval_window']}.",
        "",
        "| measurement | value |",
        "|---|---|",
        *[f"| {k} | {v} |" for k, v in summary_rows(report)],
        "",
        *[f"![{p}]({p})" for p in plots],
        "",
        *position_table(report.by_position, c["position_tokens"], c["position_data"]),
        "## Samples (greedy, first prompt)",
        "",
    ]
    for label, text in report.samples.items():
        lines += [f"**{label}**:", "", "> " + (text or "").replace("\n", " "), ""]
    lines += [
        "## Medusa heads",
        "",
        *medusa_table(report.medusa),
        "",
        "## Machine",
        "",
        f"{platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; the saved model is `{report.model_dir}`.",
        "",
    ]
    return "\n".join(lines)


def position_table(by_position: dict[str, dict], tokens: int, data: str) -> list[str]:
    """Perplexity by position: each model streams the first ``tokens`` of ``data`` (the
    original: windows of its max positions)."""
    if not by_position:
        return []
    first = next(iter(by_position.values()))
    spans = [f"{b['from']:,}–{b['to']:,}" for b in first["buckets"]]
    lines = [
        "## Perplexity by position (long context)",
        "",
        f"The first {tokens:,} tokens of `{data}` streamed through each model, state "
        "carried (the demo stops there to keep its time; `linearize eval ppl --stream` goes on "
        "to the end of the novel).",
        "",
        "| model | scored as | " + " | ".join(spans) + " |",
        "|---" * (len(spans) + 2) + "|",
    ]
    for label, row in by_position.items():
        cells = [f"{b['ppl']:.2f}" for b in row["buckets"]]
        cells += ["—"] * (len(spans) - len(cells))
        lines.append(f"| {label} | {row['scored_as']} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def medusa_table(metrics: dict) -> list[str]:
    """Held-out accuracy of each Medusa head (head k predicts the token k + 2 ahead): against
    the text, and agreement with the model's own greedy choice (what acceptance depends on)."""
    columns = [
        ("top1", "top-1 vs text"),
        ("top5", "top-5 vs text"),
        ("top1_agreement", "top-1 agrees with model"),
        ("top5_agreement", "top-5 agrees with model"),
    ]
    columns = [(key, title) for key, title in columns if key in metrics]
    if not columns:
        return ["(no Medusa metrics)"]
    heads = len(metrics[columns[0][0]])
    lines = [
        "| head | " + " | ".join(title for _, title in columns) + " |",
        "|---" * (len(columns) + 1) + "|",
    ]
    for i in range(heads):
        cells = [f"{metrics[key][i]:.3f}" for key, _ in columns]
        lines.append(f"| {i} (+{i + 2}) | " + " | ".join(cells) + " |")
    return lines


def write_report(report, out: Path) -> Path:
    plots = _plots(report, out)
    (out / "report.json").write_text(json.dumps(asdict(report), indent=2, default=str))
    path = out / "report.md"
    path.write_text(render_markdown(report, plots))
    return path
