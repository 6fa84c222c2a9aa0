"""Local lm-evaluation-harness tasks built from corpora we already read (nothing from the hub).

Two kinds, each on *Pride and Prejudice* (the Austen evaluation novel) and *Moby Dick*:

- ``linearize_lambada_*``: LAMBADA-style last word. A passage of ≥ 60 words ends one word before
  the end of a sentence; the target is that word, chosen only when it already occurs in the
  passage (LAMBADA's "needs the broad context" in spirit). Metrics: accuracy (the word is the
  greedy continuation) and perplexity.
- ``linearize_cloze_*``: story cloze. Three sentences, then four candidate next sentences: the
  true one and three of similar length from far away in the same book. Metrics: acc, acc_norm.

The YAML files in this folder (``--include_path`` it) read JSON-lines data written by
:func:`write_task_data` into ``<cache>/tasks/`` (or a folder of your choosing, passed to lm-eval
as ``--metadata '{"data_dir": "..."}'``).
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
from pathlib import Path
from typing import Any

from linearize.data import load_text
from linearize.paths import atomic_write, cache_dir

logger = logging.getLogger(__name__)

TASKS_DIR = Path(__file__).parent
# task name -> (kind, built-in corpus)
TASKS = {
    "linearize_lambada_austen": ("lambada", "austen:eval"),
    "linearize_lambada_mobydick": ("lambada", "mobydick"),
    "linearize_cloze_austen": ("cloze", "austen:eval"),
    "linearize_cloze_mobydick": ("cloze", "mobydick"),
}
TAG = "linearize"
EXAMPLES = 300
# A sentence ends at . ! ? (and a closing quote) before a capital, but not after Mr. and the like.
_SENTENCE_END = re.compile(
    r"(?<!\bMr\.)(?<!\bMrs\.)(?<!\bDr\.)(?<!\bSt\.)(?<=[.!?])[\"']?\s+(?=[\"']?[A-Z])"
)
_WORD = re.compile(r"^([A-Za-z]{3,})([.!?,;:\"']*)$")


def task_data_dir(directory: str | os.PathLike | None = None) -> Path:
    return Path(directory) if directory is not None else cache_dir() / "tasks"


def _sentences(text: str) -> list[str]:
    flat = " ".join(text.split())
    return [s for s in _SENTENCE_END.split(flat) if s]


def lambada_examples(text: str, count: int, seed: int = 0, min_words: int = 60) -> list[dict]:
    """``[{"context", "target"}]``: ``context`` ends before ``target``, its sentence's last word."""
    sentences = _sentences(text)
    candidates = []
    for i in range(3, len(sentences)):
        words = sentences[i].split()
        match = _WORD.match(words[-1]) if len(words) >= 4 else None
        if match is None:
            continue
        target = match.group(1)
        before = []
        j = i - 1
        while j >= 0 and len(before) < min_words:
            before = sentences[j].split() + before
            j -= 1
        context = " ".join(before + words[:-1])
        if len(before) >= min_words and re.search(rf"\b{target}\b", context):
            candidates.append({"context": context, "target": target})
    return _sample(candidates, count, seed)


def cloze_examples(text: str, count: int, seed: int = 0, choices: int = 4) -> list[dict]:
    """``[{"context", "choices", "label"}]``: which sentence comes next."""
    sentences = _sentences(text)
    lengths = [len(s.split()) for s in sentences]
    eligible = [
        i
        for i in range(3, len(sentences))
        if 6 <= lengths[i] <= 40 and sum(lengths[i - 3 : i]) >= 30
    ]
    rng = random.Random(seed)
    rows = []
    for i in _sample(eligible, count, seed):
        similar = [
            j
            for j in range(len(sentences))
            if abs(j - i) > 50 and abs(lengths[j] - lengths[i]) <= max(2, lengths[i] // 4)
        ]
        options = [sentences[j] for j in rng.sample(similar, choices - 1)]
        label = rng.randrange(choices)
        options.insert(label, sentences[i])
        rows.append({"context": " ".join(sentences[i - 3 : i]), "choices": options, "label": label})
    return rows


def _sample(candidates: list, count: int, seed: int) -> list:
    if len(candidates) < count:
        raise ValueError(f"only {len(candidates)} candidate examples, {count} asked for")
    picked = sorted(random.Random(seed).sample(range(len(candidates)), count))
    return [candidates[i] for i in picked]


_BUILDERS = {"lambada": lambada_examples, "cloze": cloze_examples}


def write_task_data(
    directory: str | os.PathLike | None = None, examples: int = EXAMPLES, seed: int = 0
) -> list[Path]:
    """Write every task's ``<task>.jsonl`` (atomically) and return the paths."""
    out = task_data_dir(directory)
    out.mkdir(parents=True, exist_ok=True)
    texts: dict[str, str] = {}
    paths = []
    for task, (kind, corpus) in TASKS.items():
        if corpus not in texts:
            texts[corpus] = load_text(corpus)
        rows = _BUILDERS[kind](texts[corpus], examples, seed)
        path = out / f"{task}.jsonl"
        lines = "".join(json.dumps(row) + "\n" for row in rows)
        atomic_write(path, lambda tmp, lines=lines: tmp.write_text(lines))
        logger.info("wrote %d examples to %s", len(rows), path)
        paths.append(path)
    return paths


def read_task_data(task: str, directory: str | os.PathLike | None = None) -> Any:
    """The ``datasets.DatasetDict`` (one ``test`` split) of ``task``, read from local JSON lines."""
    import datasets

    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; valid: {sorted(TASKS)}")
    path = task_data_dir(directory) / f"{task}.jsonl"
    if not path.is_file():
        raise ValueError(
            f"task data file {path} is missing: write it with `linearize eval harness "
            "--write-data` (or linearize.eval.tasks.write_task_data())"
        )
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})
