"""Result files and the results page.

Every benchmark saves one record ``<out>/<stem>.json`` (kind, command, machine, rows, extra),
a markdown table ``<stem>.md`` and a plot ``<stem>.png``. :func:`render_page` rebuilds
``docs/results.md`` from all the records of a results folder: the tables, the plots (copied next
to the page), the goals of the evaluation issue measured against the rows, the machine and the
commands.
"""

from __future__ import annotations

import datetime
import json
import logging
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from linearize.bench.memory import format_bytes, machine_info
from linearize.bench.speed import physical_bound, step_read_bytes
from linearize.paths import atomic_write

logger = logging.getLogger(__name__)

KINDS = (
    "ppl",
    "harness",
    "ppl_position",
    "passkey",
    "decode",
    "prefill",
    "speculative",
    "serve",
    "study",
)


def _num(x: Any, digits: int = 1) -> str:
    return "—" if x is None else f"{x:,.{digits}f}"


def _int(x: Any) -> str:
    return "—" if x is None else f"{x:,}"


def _k(n: int) -> str:
    """Token counts as 0, 516, 1k, 4k, 12.5k where a multiple of 512, else exactly: 8,000,
    167,890 (not 7.8125k)."""
    return f"{n / 1024:g}k" if n >= 1024 and n % 512 == 0 else f"{n:,}"


# Columns per kind: (header, how to format a row).
Column = tuple[str, Callable[[dict[str, Any]], str]]
COLUMNS: dict[str, list[Column]] = {
    "harness": [
        ("model", lambda r: r["model"]),
        ("task", lambda r: r["task"]),
        ("examples", lambda r: _int(r["examples"])),
        ("acc", lambda r: _num(r.get("acc"), 3)),
        ("acc_norm", lambda r: _num(r.get("acc_norm"), 3)),
        ("perplexity", lambda r: _num(r.get("perplexity"), 2)),
        ("run seconds", lambda r: _num(r["seconds"])),
    ],
    "decode": [
        ("model", lambda r: r["model"]),
        ("weights", lambda r: r.get("quant", "—")),
        ("engine", lambda r: r.get("engine", "—")),
        ("keys / values", lambda r: r.get("kv_type") or "—"),
        ("context", lambda r: _int(r["context"])),
        ("tokens/s", lambda r: _num(r["tokens_per_s"])),
        ("ms/token", lambda r: _num(r["ms_per_token"])),
        ("state", lambda r: format_bytes(r["state_bytes"])),
        ("peak RSS", lambda r: format_bytes(r["peak_rss_bytes"])),
    ],
    "prefill": [
        ("model", lambda r: r["model"]),
        ("weights", lambda r: r.get("quant", "—")),
        ("engine", lambda r: r.get("engine", "—")),
        ("tokens", lambda r: _int(r["context"])),
        ("seconds", lambda r: _num(r["seconds"], 2)),
        ("tokens/s", lambda r: _num(r["tokens_per_s"])),
        ("state", lambda r: format_bytes(r["state_bytes"])),
        ("peak RSS", lambda r: format_bytes(r["peak_rss_bytes"])),
        ("prefill RSS", lambda r: format_bytes(r["activation_bytes"])),
    ],
    "ppl": [
        ("model", lambda r: r["model"]),
        ("data", lambda r: r["data"]),
        ("form", lambda r: r["form"]),
        ("window", lambda r: _int(r["window"])),
        ("scored tokens", lambda r: _int(r["tokens"])),
        ("NLL", lambda r: _num(r["nll"], 4)),
        ("PPL", lambda r: _num(r["ppl"], 3)),
        ("seconds", lambda r: _num(r["seconds"])),
    ],
    "ppl_position": [
        ("model", lambda r: r["model"]),
        ("data", lambda r: r["data"]),
        ("scored as", lambda r: r["scored_as"]),
        ("tokens", lambda r: _int(r["tokens"])),
        ("PPL", lambda r: _num(r["ppl"], 2)),
        (
            "PPL by position",
            lambda r: "; ".join(
                f"{_k(b['from'])}–{_k(b['to'])}: {_num(b['ppl'], 1)}" for b in r["buckets"]
            ),
        ),
    ],
    "passkey": [
        ("model", lambda r: r["model"]),
        ("trials per length", lambda r: _int(r["trials"])),
        (
            "accuracy by length",
            lambda r: "; ".join(f"{_k(int(n))}: {a:.0%}" for n, a in r["accuracy"].items()),
        ),
        ("skipped", lambda r: ", ".join(map(_k, r["skipped"])) or "—"),
    ],
    "speculative": [
        ("model", lambda r: r["model"]),
        ("method", lambda r: r["method"]),
        ("setting", lambda r: r["setting"]),
        ("engine", lambda r: engine_label(r)),
        ("tokens/s", lambda r: _num(r["tokens_per_s"], 2)),
        ("decode tokens/s", lambda r: _num(r["decode_tokens_per_s"], 2)),
        ("speedup", lambda r: _num(r["speedup"], 2) + "×"),
        ("mean accepted", lambda r: _num(r["mean_accepted"], 2)),
        ("identical to plain", lambda r: "yes" if r["identical"] else "**no**"),
        ("chosen", lambda r: "; ".join(r.get("chosen", []))),
    ],
    "serve": [
        ("measure", lambda r: r["measure"]),
        ("model", lambda r: r["model"]),
        ("setting", lambda r: r["setting"]),
        ("result", lambda r: r["result"]),
        ("goal", lambda r: r["goal"]),
    ],
    "study": [
        ("variant", lambda r: r["variant"]),
        ("attention", lambda r: r["attention"]),
        ("trained tokens", lambda r: _int(r["train_tokens"])),
        ("PPL", lambda r: _num(r["ppl"], 2)),
        ("× original", lambda r: _num(r["ratio"], 2)),
        ("train seconds", lambda r: _num(r["train_seconds"])),
    ],
}


def engine_label(row: dict[str, Any]) -> str:
    """``torch``, or ``onnx, fp32`` / ``onnx, int8``: the engine and its matmul arithmetic."""
    engine = row.get("engine", "torch")
    return engine if engine == "torch" else f"{engine}, {row.get('arithmetic', 'fp32')}"


# Decode rows measured in rounds (``bench decode --repeat``): each round's median step.
ROUNDS: Column = (
    "ms/token by round",
    lambda r: " / ".join(_num(ms) for ms in r.get("round_ms") or []),
)


def markdown_table(kind: str, rows: list[dict[str, Any]]) -> str:
    """The rows of a record as a markdown table (any kind: unknown kinds show every field)."""
    columns = COLUMNS.get(kind)
    if columns is None:
        keys = list(rows[0]) if rows else []
        columns = [(k, lambda r, k=k: str(r.get(k, "—"))) for k in keys]
    elif kind == "decode" and any(r.get("round_ms") for r in rows):
        after = [h for h, _ in columns].index("ms/token") + 1  # (each round's beside the median)
        columns = [*columns[:after], ROUNDS, *columns[after:]]
    lines = [
        "| " + " | ".join(h for h, _ in columns) + " |",
        "|" + "|".join("---" for _ in columns) + "|",
    ]
    lines += ["| " + " | ".join(f(row) for _, f in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


# --- plots -----------------------------------------------------------------------------------


def _series(rows: list[dict[str, Any]], x: str, y: str) -> dict[str, tuple[list, list]]:
    out: dict[str, tuple[list, list]] = {}
    for r in rows:
        if r.get(y) is not None:
            xs, ys = out.setdefault(r["model"], ([], []))
            xs.append(r[x])
            ys.append(r[y])
    return out


def _line_plot(rows: list[dict[str, Any]], path: Path, panels: list[tuple[str, str, bool]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.2))
    for ax, (y, label, log_y) in zip(axes, panels, strict=True):
        for model, (xs, ys) in _series(rows, "context", y).items():
            ax.plot(xs, ys, marker="o", label=model)
        ax.set_xscale("log", base=2)
        if log_y:
            ax.set_yscale("log")
        ax.set_xlabel("context (tokens)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


@contextmanager
def _figure(path: Path, figsize: tuple[float, float]) -> Iterator[Any]:
    """One off-screen matplotlib axes, saved to ``path`` when the block ends."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=figsize)
    try:
        yield ax
        fig.tight_layout()
        fig.savefig(path, dpi=80)
    finally:
        plt.close(fig)


def _bar_plot(rows: list[dict[str, Any]], path: Path) -> None:
    rows = [r for r in rows if r.get("ppl") is not None]
    with _figure(path, (8, 3.6)) as ax:
        names = [r["variant"] for r in rows]
        colors = ["tab:gray" if r["attention"] == "softmax" else "tab:blue" for r in rows]
        ax.bar(names, [r["ppl"] for r in rows], color=colors)
        ax.set_yscale("log")
        ax.set_ylabel("perplexity (log)")
        ax.tick_params(axis="x", labelrotation=60, labelsize=7)
        ax.grid(axis="y", alpha=0.3)


def _speedup_plot(rows: list[dict[str, Any]], path: Path) -> None:
    with _figure(path, (7, 3.2)) as ax:
        names = [f"{r['method']} {r['setting']}".replace(" -", "") for r in rows]
        ax.barh(names, [r["tokens_per_s"] for r in rows], color="tab:blue")
        ax.set_xlabel("tokens/s (prefill included)")
        ax.tick_params(axis="y", labelsize=7)
        ax.invert_yaxis()
        ax.grid(axis="x", alpha=0.3)


def _position_plot(rows: list[dict[str, Any]], path: Path) -> None:
    """Perplexity against position: one line per model and text, a point per bucket (at its
    middle); a model keeps its colour, a text its line style."""
    models = list(dict.fromkeys(r["model"] for r in rows))
    texts = list(dict.fromkeys(r.get("data", "?") for r in rows))
    styles = ["-", "--", ":", "-."]
    with _figure(path, (6.5, 3.6)) as ax:
        for r in rows:
            buckets = r["buckets"]
            xs = [max((b["from"] + b["to"]) / 2, 1) for b in buckets]
            data = r.get("data", "?")
            ax.plot(
                xs,
                [b["ppl"] for b in buckets],
                styles[texts.index(data) % len(styles)],
                marker="o",
                color=f"C{models.index(r['model']) % 10}",
                label=f"{r['model']} ({data})" if len(texts) > 1 else r["model"],
            )
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("position in the text (tokens)")
        ax.set_ylabel("perplexity (log)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)


PLOTS: dict[str, Callable[[list[dict[str, Any]], Path], None]] = {
    "ppl_position": _position_plot,
    "speculative": _speedup_plot,
    "decode": lambda rows, path: _line_plot(
        rows,
        path,
        [("tokens_per_s", "decode tokens/s", False), ("state_bytes", "state bytes", True)],
    ),
    "prefill": lambda rows, path: _line_plot(
        rows, path, [("seconds", "prefill seconds", True), ("peak_rss_bytes", "peak RSS", True)]
    ),
    "study": _bar_plot,
}


# --- records ---------------------------------------------------------------------------------


def save_results(
    out: str | Path,
    stem: str,
    kind: str,
    rows: list[dict[str, Any]],
    command: str,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write ``<out>/<stem>.json`` (+ ``.md`` table, + ``.png`` plot for kinds that have one)."""
    if kind not in KINDS:
        raise ValueError(f"unknown result kind {kind!r}; valid: {list(KINDS)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    record = {
        "kind": kind,
        "command": command,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "rows": rows,
        "extra": extra or {},
    }
    path = out / f"{stem}.json"
    path.write_text(json.dumps(record, indent=1) + "\n")
    (out / f"{stem}.md").write_text(f"`{command}`\n\n" + markdown_table(kind, rows))
    if kind in PLOTS and rows:
        PLOTS[kind](rows, out / f"{stem}.png")
    logger.info("wrote %s", path)
    return path


def load_records(results: str | Path) -> list[tuple[Path, dict[str, Any]]]:
    """Every result record (``*.json`` with a known ``kind``) under ``results``, sorted by kind
    then name."""
    records = []
    for path in sorted(Path(results).rglob("*.json")):
        try:
            record = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if isinstance(record, dict) and record.get("kind") in KINDS and "rows" in record:
            records.append((path, record))
    return sorted(records, key=lambda pr: (KINDS.index(pr[1]["kind"]), str(pr[0])))


# --- the goals of the evaluation issue -------------------------------------------------------


def _info(record: dict[str, Any], model: str) -> dict[str, Any] | None:
    """What ``record`` says of ``model`` (``bench.speed.describe``), ``None`` where it does not
    (records saved before ``eval`` kept it)."""
    return record.get("extra", {}).get("models", {}).get(model)


def _family(record: dict[str, Any], model: str) -> str:
    return (_info(record, model) or {}).get("family", "unknown")


def _first(
    record: dict[str, Any], family: str, context: int, field: str, model: str | None = None
) -> tuple[str, Any] | None:
    """``(model, field)`` of the record's first row of ``family`` at ``context`` with ``field``
    measured (of ``model`` when given)."""
    for row in record["rows"]:
        if (
            _family(record, row["model"]) == family
            and row["context"] == context
            and row.get(field) is not None
            and model in (None, row["model"])
        ):
            return row["model"], row[field]
    return None


def _pair(
    records: list[dict[str, Any]],
    num: tuple[str, int],
    den: tuple[str, int],
    field: str,
    same_model: bool = False,
) -> tuple[float | None, float | None]:
    """``field`` of the first row of family ``num[0]`` at context ``num[1]`` and of the first
    row matching ``den``, taken from one record (one run: a ratio never mixes runs);
    ``same_model``: both rows of one model."""
    for record in records:
        top = _first(record, *num, field)
        if top is not None:
            bottom = _first(record, *den, field, model=top[0] if same_model else None)
            if bottom is not None:
                return top[1], bottom[1]
    return None, None


def _ratio_goal(name: str, target: float, pair: tuple[float | None, float | None]) -> list[str]:
    num, den = pair
    if num is None or den is None:
        return [name, f"≥ {target:g}×", "not measured", "—"]
    ratio = num / den
    verdict = "yes" if ratio >= target else "**no**"
    return [name, f"≥ {target:g}×", f"{ratio:.2f}× ({num:.3g} vs {den:.3g})", verdict]


def _bound_goal(decode: list[dict[str, Any]], context: int, target: float) -> list[str]:
    """The first linear row at ``context`` of each run as a share of its bandwidth bound:
    streaming what a step reads (the row's ``read_bytes``; records without it: the model's
    weights and the whole state) once per token at the run's measured bandwidth (the bound the
    ``bench decode`` notes print). Met when every run meets it."""
    name = f"linear decode at {_k(context)}: share of its bandwidth bound"
    shares = []
    for record in decode:
        bandwidth = record.get("extra", {}).get("bandwidth_bytes_per_s")
        for row in record["rows"]:
            info = _info(record, row["model"]) or {}
            read, tps = row.get("read_bytes"), row["tokens_per_s"]
            read = step_read_bytes(read, info.get("weight_bytes"), row["state_bytes"])
            if (
                info.get("family") != "linear"
                or row["context"] != context
                or None in (bandwidth, read, tps)
            ):
                continue
            bound = physical_bound(read, bandwidth)
            when = record.get("created", "?")[:16].replace("T", " ")
            shares.append(
                (tps / bound, f"{tps / bound:.0%} ({tps:.3g} of {bound:.3g} tok/s, {when})")
            )
            break
    if shares:
        met = sum(share >= target for share, _ in shares)
        verdict = {len(shares): "yes", 0: "**no**"}.get(met, f"in {met} of {len(shares)} runs")
        return [name, f"≥ {target:.0%}", "; ".join(text for _, text in shares), verdict]
    return [name, f"≥ {target:.0%}", "not measured", "—"]


def goals(records: list[dict[str, Any]]) -> list[list[str]]:
    """``[goal, target, measured, met]`` rows, from the decode and prefill records: the first
    evaluation issue's, with issue 14's targets where it raised them (decode against llama.cpp:
    ≥ 1× at 1k, ≥ 3× at 8k; 128k as flat as 32k)."""
    decode = [r for r in records if r["kind"] == "decode"]
    prefill = [r for r in records if r["kind"] == "prefill"]
    rows = [
        _ratio_goal(
            f"linear decode tokens/s: {_k(context)} vs its own 1k",
            0.9,
            _pair(decode, ("linear", context), ("linear", 1024), "tokens_per_s", same_model=True),
        )
        for context in (32768, 131072)
    ]
    rows += [
        _ratio_goal(
            f"linear vs {peer} decode tokens/s at {_k(context)}",
            target,
            _pair(decode, ("linear", context), (peer, context), "tokens_per_s"),
        )
        for peer, context, target in (
            ("softmax", 8192, 4),
            ("llama.cpp", 1024, 1),
            ("llama.cpp", 8192, 3),
        )
    ]
    rows.append(_bound_goal(decode, 1024, 0.5))
    # Per model of each run: one state size at every context.
    sizes: dict[tuple[int, str], set[int]] = {}
    for i, record in enumerate(decode):
        for row in record["rows"]:
            if _family(record, row["model"]) == "linear" and row["state_bytes"] is not None:
                sizes.setdefault((i, row["model"]), set()).add(row["state_bytes"])
    flat = all(len(s) == 1 for s in sizes.values())
    every = sorted(set().union(*sizes.values())) if sizes else []
    rows.append(
        [
            "linear state bytes at every context",
            "identical",
            ", ".join(format_bytes(s) for s in every) or "not measured",
            "—" if not sizes else ("yes" if flat else "**no**"),
        ]
    )
    rows.append(
        _ratio_goal(
            "prefill speed at 16k: linear vs softmax",
            3,
            _pair(prefill, ("softmax", 16384), ("linear", 16384), "seconds"),
        )
    )
    return rows + position_goals(records) + accuracy_goals(records)


def _bucket(row: dict[str, Any], start: int) -> float | None:
    return next((b["ppl"] for b in row["buckets"] if b["from"] == start), None)


def position_goals(records: list[dict[str, Any]]) -> list[list[str]]:
    """Issue 12's goals, per streamed linear model: its 1–4k and 4–8k perplexity against the
    original's (scored in windows of its positions) and every bucket past 8k against its own
    4–8k; the last also with each bucket over the original's same bucket, which divides out how
    hard the text itself gets further in (the original's windows restart every 8k, so its
    buckets past 8k measure the text, not a long context). Lower is better here, so the ratio
    must stay *under* the target."""
    rows = [row for r in records if r["kind"] == "ppl_position" for row in r["rows"]]
    originals = [r for r in rows if r["scored_as"].startswith("windows")]
    rows_out = []
    for row in (r for r in rows if r["scored_as"] == "stream"):
        base = next((o for o in originals if o["data"] == row["data"]), None)
        who = f"{row['model']} on {row['data']}"
        for start in (1024, 4096):
            ours, theirs = _bucket(row, start), base and _bucket(base, start)
            if ours is not None and theirs is not None:
                ratio = ours / theirs
                rows_out.append(
                    [
                        f"{who}: ppl from {_k(start)} vs the original",
                        "≤ 1.10×",
                        f"{ratio:.2f}× ({ours:.2f} vs {theirs:.2f})",
                        "yes" if ratio <= 1.10 else "**no**",
                    ]
                )
        mid = _bucket(row, 4096)
        later = [b for b in row["buckets"] if b["from"] >= 8192]
        if mid is not None and later:
            worst = max(b["ppl"] for b in later) / mid
            rows_out.append(
                [
                    f"{who}: every bucket past 8k vs its 4–8k",
                    "≤ 1.05×",
                    f"{worst:.2f}× at worst ({len(later)} buckets)",
                    "yes" if worst <= 1.05 else "**no**",
                ]
            )
            theirs = base and _bucket(base, 4096)
            pairs = [(b["ppl"], base and _bucket(base, b["from"])) for b in later]
            if theirs and all(o is not None for _, o in pairs):
                relative = max(ours / o for ours, o in pairs) / (mid / theirs)
                rows_out.append(
                    [
                        f"{who}: every bucket past 8k vs its 4–8k, each over the "
                        "original's same bucket",
                        "≤ 1.05×",
                        f"{relative:.2f}× at worst ({len(later)} buckets)",
                        "yes" if relative <= 1.05 else "**no**",
                    ]
                )
    return rows_out


# Issue 12: the 1k-window perplexity on the Austen slice must not pass the model's of 2026-11-29.
AUSTEN_BEFORE = 25.16


def _rows_by(records: list[dict[str, Any]], kind: str) -> list[tuple[dict[str, Any], dict]]:
    """``(row, what the record says of its model)`` of every ``kind`` row whose record says it."""
    pairs = [
        (row, _info(r, row["model"])) for r in records if r["kind"] == kind for row in r["rows"]
    ]
    return [(row, info) for row, info in pairs if info is not None]


def accuracy_goals(records: list[dict[str, Any]]) -> list[list[str]]:
    """Issues 12's and 14's accuracy goals from ``eval`` records: each linear model's passkey
    accuracy at 4k and longer against the softmax original's (lengths both measured), its
    Austen-slice perplexity in 1k windows against :data:`AUSTEN_BEFORE`, and an int4 model's
    perplexity against the fp32 linear model's on the same data and windows (paired only where
    one fp32 model is there to pair with)."""
    out = []
    keys = _rows_by(records, "passkey")
    originals = [(r, i) for r, i in keys if i["family"] == "softmax"]
    for row, info in keys:
        if info["family"] != "linear" or not originals:
            continue
        theirs, _ = originals[0]
        for length, ours in row["accuracy"].items():
            if int(length) < 4096 or length not in theirs["accuracy"]:
                continue
            base = theirs["accuracy"][length]
            n, m = row["trials"], theirs["trials"]
            out.append(
                [
                    f"{row['model']}: passkey at {_k(int(length))} vs the original",
                    "≥ the original's",
                    f"{round(ours * n)}/{n} vs {round(base * m)}/{m}",
                    "yes" if ours >= base else "**no**",
                ]
            )
    ppl = _rows_by(records, "ppl")
    for row, info in ppl:
        if info["family"] != "linear":
            continue
        if info.get("quant") == "none" and row["data"] == "austen:eval" and row["window"] == 1024:
            out.append(
                [
                    f"{row['model']}: Austen slice, 1k windows",
                    f"≤ {AUSTEN_BEFORE}",
                    f"{row['ppl']:.3f}",
                    "yes" if row["ppl"] <= AUSTEN_BEFORE else "**no**",
                ]
            )
        if info.get("quant") != "int4":
            continue
        fp32 = [
            other
            for other, i in ppl
            if i["family"] == "linear"
            and i.get("quant") == "none"
            and (other["data"], other["window"]) == (row["data"], row["window"])
        ]
        if len(fp32) == 1:
            cost = row["ppl"] / fp32[0]["ppl"] - 1
            out.append(
                [
                    f"{row['model']} (int4) vs {fp32[0]['model']}: ppl on {row['data']}",
                    "≤ +3 %",
                    f"{cost:+.2%} ({row['ppl']:.3f} vs {fp32[0]['ppl']:.3f})",
                    "yes" if cost <= 0.03 else "**no**",
                ]
            )
    return out


# --- the page --------------------------------------------------------------------------------


def _machine_section(records: list[dict[str, Any]]) -> str:
    machine = records[0]["machine"]
    runs = ", ".join(
        f"{r['kind']} {r.get('created', '?')[:10]}: {r['machine'].get('torch_threads')} / "
        f"{r['machine'].get('load_average')}"
        for r in records
        if "machine" in r
    )
    return (
        f"- CPU: {machine['cpu']} ({machine['cores']} cores)\n"
        f"- memory: {format_bytes(machine['memory_bytes'])}\n"
        f"- torch {machine['torch']}, Python {machine['python']}, {machine['platform']}\n"
        f"- when each record was written, torch threads / 1-minute load average: {runs}\n"
    )


def _record_section(path: Path, record: dict[str, Any], plots: Path, page: Path) -> str:
    text = f"### {path.stem}\n\n`{record['command']}`\n\n"
    text += markdown_table(record["kind"], record["rows"]) + "\n"
    for note in record.get("extra", {}).get("notes", []):
        text += f"- {note}\n"
    png = path.with_suffix(".png")
    if png.exists():
        plots.mkdir(parents=True, exist_ok=True)
        target = plots / png.name
        shutil.copyfile(png, target)
        text += f"\n![{path.stem}]({target.relative_to(page.parent).as_posix()})\n"
    return text + "\n"


TITLES = {
    "ppl": "Perplexity",
    "ppl_position": "Perplexity by position (long context, streamed)",
    "passkey": "Passkey retrieval",
    "harness": "lm-evaluation-harness (local tasks, `linearize eval harness`)",
    "decode": "Decode speed and memory",
    "prefill": "Prefill latency and memory (Table 4 protocol)",
    "speculative": "Speculative decoding (Table 8 protocol)",
    "serve": "Serving (`linearize serve`: continuous batching, prefix state cache)",
    "study": "Linear attentions on a real LLM (the paper's study)",
}


# Everything of a results page from this line on is written by hand and kept when the page is
# rebuilt (placed before the commands).
NOTES_MARKER = "<!-- notes written by hand below: kept by `linearize bench report` -->"


def _kept_notes(page: Path) -> str:
    """The hand-written part of an existing ``page``, from :data:`NOTES_MARKER` to the
    generated commands (empty when the page or its marker is absent)."""
    if not page.is_file():
        return ""
    text = page.read_text()
    start = text.find(NOTES_MARKER)
    if start < 0:
        return ""
    end = text.rfind("## Commands\n")
    return text[start : end if end > start else len(text)].rstrip("\n") + "\n\n"


def render_page(results: str | Path, page: str | Path) -> Path:
    """Rebuild ``page`` (``docs/results.md``) from the records under ``results``; the plots are
    copied into ``<page dir>/<page stem>/``. What the page holds from :data:`NOTES_MARKER` on
    (notes written by hand) is kept, before the commands."""
    found = load_records(results)
    if not found:
        raise ValueError(f"no result records (*.json) under {results}: run `linearize bench ...`")
    page = Path(page)
    plots = page.parent / page.stem
    records = [r for _, r in found]
    text = (
        "# Results\n\nGenerated by `linearize bench report` from the JSON records in "
        f"`{Path(results).as_posix()}/`; edit by hand only the notes after the marker further "
        "down (a rebuild keeps them). CPU timings are noisy: read the ratios measured within one "
        "run.\n\n## Machine\n\n" + _machine_section(records)
    )
    text += "\n## Goals\n\n| goal | target | measured | met |\n|---|---|---|---|\n"
    text += "".join("| " + " | ".join(row) + " |\n" for row in goals(records))
    for kind in KINDS:
        section = [(p, r) for p, r in found if r["kind"] == kind]
        if section and kind in ("ppl", "harness", "ppl_position", "passkey"):
            # Records of one row each: one table of all of them (and one plot).
            rows = [row for _, r in section for row in r["rows"]]
            text += f"\n## {TITLES[kind]}\n\n" + markdown_table(kind, rows) + "\n"
            if kind in PLOTS:
                plots.mkdir(parents=True, exist_ok=True)
                PLOTS[kind](rows, plots / f"{kind}.png")
                target = (plots / f"{kind}.png").relative_to(page.parent).as_posix()
                text += f"![{kind}]({target})\n\n"
        elif section:
            text += f"\n## {TITLES[kind]}\n\n"
            text += "".join(_record_section(p, r, plots, page) for p, r in section)
    text += _kept_notes(page)
    text += "## Commands\n\n```\n" + "".join(f"{r['command']}\n" for r in records) + "```\n"
    page.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(page, lambda tmp: tmp.write_text(text))
    logger.info("wrote %s", page)
    return page
