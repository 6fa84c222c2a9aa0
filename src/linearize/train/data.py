"""Training and evaluation text: the embedded corpora, user text, tokenization and packing.

The embedded corpora are R data files inside Debian packages (Jane Austen's novels in
`r-cran-janeaustenr`, Moby Dick in `r-cran-tokenizers`), read without R: `fetch_deb` unpacks a
package into the user cache and `read_rdata` reads R's lazy-load database (`Rdata.rdb` + its
`Rdata.rdx` index) with a small reader of R's XDR serialization format.
"""

import hashlib
import json
import logging
import os
import random
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from linearize.train.rdata import read_rdata, unserialize_r  # noqa: F401 (re-exported)

log = logging.getLogger(__name__)

PathLike = str | os.PathLike[str]


def cache_dir(override: PathLike | None = None) -> Path:
    """The user cache folder: `override`, else `$XDG_CACHE_HOME/linearize`, else
    `~/.cache/linearize`; created on demand."""
    if override is not None:
        root = Path(override)
    else:
        base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
        root = Path(base) / "linearize"
    root.mkdir(parents=True, exist_ok=True)
    return root


# --- Debian packages -------------------------------------------------------------------------

_DEB_NAME = re.compile(r"[a-z0-9][a-z0-9+.-]+")


def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    log.info("running %s", " ".join(cmd))
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False)


def fetch_deb(package: str, cache: PathLike | None = None) -> Path:
    """Download and unpack a Debian package (without installing it) into
    `<cache>/debs/<package>/`; return that folder. Already unpacked packages are reused."""
    if not _DEB_NAME.fullmatch(package):
        raise ValueError(f"not a Debian package name: {package!r}")
    debs = cache_dir(cache) / "debs"
    dest = debs / package
    if dest.is_dir():
        return dest
    by_hand = f"apt-get update && apt-get download {package} && dpkg-deb -x {package}_*.deb {dest}"
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        raise RuntimeError(f"apt-get and dpkg-deb are needed to fetch {package}; run: {by_hand}")
    debs.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=debs, prefix=f".{package}-") as tmp_name:
        tmp = Path(tmp_name)
        done = _run(["apt-get", "download", package], tmp)
        if done.returncode != 0:
            # A fresh container has an empty package list: fill it once and retry.
            log.info("apt-get download failed (%s); running apt-get update", done.stderr.strip())
            update = _run(["apt-get", "update"], tmp)
            done = update if update.returncode != 0 else _run(["apt-get", "download", package], tmp)
        archives = sorted(tmp.glob("*.deb"))
        if done.returncode != 0 or not archives:
            raise RuntimeError(
                f"could not download Debian package {package}: {done.stderr.strip()}\n"
                f"fetch it by hand with: {by_hand}"
            )
        root = tmp / "root"
        unpack = _run(["dpkg-deb", "-x", str(archives[0]), str(root)], tmp)
        if unpack.returncode != 0:
            raise RuntimeError(f"dpkg-deb -x {archives[0].name} failed: {unpack.stderr.strip()}")
        try:
            root.rename(dest)
        except OSError:
            # Another process unpacked it first; its copy is complete (renames are atomic).
            if not dest.is_dir():
                raise
    log.info("unpacked %s into %s", package, dest)
    return dest


# --- R serialization (XDR format, versions 2 and 3) ------------------------------------------


@dataclass(frozen=True)
class Corpus:
    """A built-in corpus: R character vectors inside a Debian package."""

    package: str
    rdata: str
    objects: tuple[str, ...]
    gutenberg: bool = False


_AUSTEN = ("r-cran-janeaustenr", "usr/lib/R/site-library/janeaustenr/data/Rdata.rdb")
_NOVELS = (
    "emma",
    "mansfieldpark",
    "northangerabbey",
    "persuasion",
    "prideprejudice",
    "sensesensibility",
)
CORPORA: dict[str, Corpus] = {
    # Pride and Prejudice is held out for evaluation.
    "austen": Corpus(*_AUSTEN, tuple(n for n in _NOVELS if n != "prideprejudice")),
    **{novel: Corpus(*_AUSTEN, (novel,)) for novel in _NOVELS},
    "mobydick": Corpus(
        "r-cran-tokenizers", "usr/lib/R/site-library/tokenizers/data/Rdata.rdb", ("mobydick",), True
    ),
}
CORPORA["austen:eval"] = CORPORA["prideprejudice"]
_ALIASES = {"austen:eval": "prideprejudice"}
TEXT_SUFFIXES = (".txt", ".md", ".jsonl")


def _novel_text(lines: list[str | None]) -> str:
    return "\n".join(line or "" for line in lines)


def _strip_gutenberg(text: str, where: str) -> str:
    """The text between the `*** START ...` and `*** END ...` lines of a Project Gutenberg file."""
    lines = text.replace("\r\n", "\n").lstrip("\ufeff").split("\n")
    starts = [i for i, line in enumerate(lines) if line.startswith("*** START")]
    ends = [i for i, line in enumerate(lines) if line.startswith("*** END")]
    if not starts or not ends or ends[0] <= starts[0]:
        raise ValueError(f"{where}: no '*** START' ... '*** END' lines around the text")
    body = "\n".join(lines[starts[0] + 1 : ends[0]]).strip("\n")
    # The last line before `*** END` is often Gutenberg's own closing line.
    head, _, last = body.rpartition("\n")
    return (
        head.rstrip("\n")
        if last.startswith(("End of Project Gutenberg", "End of the Project"))
        else body
    )


def _builtin_text(name: str, cache: PathLike | None) -> str:
    corpus = CORPORA[name]
    rdata = fetch_deb(corpus.package, cache) / corpus.rdata
    vectors = read_rdata(rdata)
    missing = [obj for obj in corpus.objects if obj not in vectors]
    if missing:
        raise ValueError(f"{rdata} lacks {missing}; it holds {sorted(vectors)}")
    texts = [_novel_text(vectors[obj]) for obj in corpus.objects]
    if corpus.gutenberg:
        texts = [_strip_gutenberg(text, f"{rdata} ({name})") for text in texts]
    return "\n\n".join(texts)


def _read_utf8(path: Path) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8").lstrip("\ufeff")
    except UnicodeDecodeError as err:
        raise ValueError(
            f"{path} is not UTF-8 text: byte 0x{raw[err.start]:02x} at offset {err.start}"
        ) from None


def _read_jsonl(path: Path, text_field: str) -> str:
    texts = []
    # Split on "\n" only: str.splitlines would also cut at U+2028 inside a JSON string.
    for number, line in enumerate(_read_utf8(path).split("\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}, line {number}: not JSON ({err.msg})") from None
        text = record.get(text_field) if isinstance(record, dict) else None
        if not isinstance(text, str):
            raise ValueError(f"{path}, line {number}: no string field {text_field!r}")
        texts.append(text)
    return "\n\n".join(texts)


def _read_user_file(path: Path, text_field: str) -> str:
    if path.suffix not in TEXT_SUFFIXES:
        raise ValueError(
            f"{path}: unsupported file type {path.suffix!r}; use one of {TEXT_SUFFIXES}"
        )
    return _read_jsonl(path, text_field) if path.suffix == ".jsonl" else _read_utf8(path)


def load_text(source: PathLike, *, text_field: str = "text", cache: PathLike | None = None) -> str:
    """The text of a built-in corpus (see `CORPORA`) or of user files.

    `source` is a corpus name, a .txt/.md file, a .jsonl file (one JSON object per line, its text
    in `text_field`) or a folder (every .txt/.md/.jsonl file under it, in sorted order). Novels and
    files are joined with a blank line."""
    if isinstance(source, str) and source in CORPORA:
        return _builtin_text(_ALIASES.get(source, source), cache)
    path = Path(source)
    if not path.exists():
        raise ValueError(
            f"{str(source)!r} is neither a built-in corpus ({', '.join(sorted(CORPORA))}) "
            "nor an existing file or folder"
        )
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)
        if not files:
            raise ValueError(f"folder {path} holds no {'/'.join(TEXT_SUFFIXES)} files")
        texts = (_read_user_file(file, text_field) for file in files)
        text = "\n\n".join(t for t in texts if t.strip())
    else:
        text = _read_user_file(path, text_field)
    if not text.strip():
        raise ValueError(f"{path} holds no text")
    return text


# --- tokenization and the token cache --------------------------------------------------------


def tokenize_text(text: str, tokenizer: Any) -> torch.Tensor:
    """Token ids `[T]` of `text` as one string: no BOS, no special tokens.

    The whole text is encoded at once (fast tokenizers handle megabytes), so the ids equal those
    of any window cut from them; the too-long-for-the-model warning is off on purpose."""
    ids = tokenizer.encode(text, add_special_tokens=False, verbose=False)
    return torch.tensor(ids, dtype=torch.long)


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """sha256 (16 hex digits) of the tokenizer's serialization (vocab, merges, added tokens)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    spec = (
        backend.to_str()
        if backend is not None
        else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    )
    return hashlib.sha256(spec.encode("utf-8")).hexdigest()[:16]


class TokenCache:
    """Tokenized corpora on disk: `<cache>/tokens/<corpus>-<tokenizer fingerprint>.safetensors`.

    User text is keyed by the sha256 of its content."""

    def __init__(self, cache: PathLike | None = None) -> None:
        self.cache = cache_dir(cache)
        self.root = self.cache / "tokens"

    def path(self, key: str, tokenizer: Any) -> Path:
        return self.root / f"{key}-{tokenizer_fingerprint(tokenizer)}.safetensors"

    def tokens(self, source: PathLike, tokenizer: Any, *, text_field: str = "text") -> torch.Tensor:
        """Token ids `[T]` of `source` (as for `load_text`), tokenized once and then cached."""
        text = None
        if isinstance(source, str) and source in CORPORA:
            key = _ALIASES.get(source, source).replace(":", "_")
        else:
            text = load_text(source, text_field=text_field)
            key = "text-" + hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]
        path = self.path(key, tokenizer)
        if path.is_file():
            try:
                return load_file(path)["tokens"]
            except (SafetensorError, KeyError) as err:
                log.warning("unreadable token cache %s (%s); tokenizing again", path, err)
        if text is None:
            text = load_text(source, cache=self.cache)
        tokens = tokenize_text(text, tokenizer)
        self.root.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=self.root, suffix=".tmp", delete=False) as tmp:
            tmp_path = Path(tmp.name)
        try:
            save_file({"tokens": tokens}, tmp_path, metadata={"source": str(source)})
            tmp_path.chmod(0o644)  # NamedTemporaryFile makes it private (0600)
            os.replace(tmp_path, path)
        finally:
            tmp_path.unlink(missing_ok=True)
        log.info("cached %d tokens of %s in %s", len(tokens), source, path)
        return tokens


EVAL_TOKENS = 50_176


def eval_tokens(
    tokenizer: Any, n: int = EVAL_TOKENS, cache: PathLike | None = None
) -> torch.Tensor:
    """The evaluation split `[n]`: the first `n` tokens of Pride and Prejudice."""
    tokens = TokenCache(cache).tokens("prideprejudice", tokenizer)
    if not 0 < n <= len(tokens):
        raise ValueError(f"n={n} evaluation tokens asked; Pride and Prejudice has {len(tokens)}")
    return tokens[:n].clone()


def train_tokens(tokenizer: Any, cache: PathLike | None = None) -> torch.Tensor:
    """The training split `[T]`: the five other Austen novels."""
    return TokenCache(cache).tokens("austen", tokenizer)


# --- packing and order -----------------------------------------------------------------------


def pack_blocks(tokens: torch.Tensor, block_size: int) -> torch.Tensor:
    """Cut `tokens: [T]` into `[T // block_size, block_size]` training blocks, dropping the tail."""
    if tokens.dim() != 1:
        raise ValueError(f"tokens must be 1-D, got shape {tuple(tokens.shape)}")
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    n = len(tokens) // block_size
    if n == 0:
        raise ValueError(
            f"corpus of {len(tokens)} tokens is shorter than one block of {block_size}"
        )
    return tokens[: n * block_size].view(n, block_size)


def block_order(n_blocks: int, seed: int, epoch: int) -> list[int]:
    """A permutation of `range(n_blocks)` that depends only on `(seed, epoch)`."""
    if n_blocks < 1:
        raise ValueError(f"n_blocks must be >= 1, got {n_blocks}")
    digest = hashlib.sha256(f"{seed}:{epoch}".encode()).digest()
    order = list(range(n_blocks))
    random.Random(int.from_bytes(digest[:8], "big")).shuffle(order)
    return order


@dataclass
class BlockSampler:
    """Endless, resumable walk over blocks: epoch after epoch, each in `block_order`.

    Position `step` (counted in blocks) is epoch `step // n_blocks`; a trainer resuming after
    `s` optimizer steps of `b` blocks calls `positions(s * b)`."""

    n_blocks: int
    seed: int = 0

    def positions(self, start: int = 0) -> Iterator[tuple[int, int]]:
        """Yield `(epoch, block index)` from position `start` on."""
        if start < 0:
            raise ValueError(f"start must be >= 0, got {start}")
        epoch, offset = divmod(start, self.n_blocks)
        while True:
            for index in block_order(self.n_blocks, self.seed, epoch)[offset:]:
                yield epoch, index
            epoch, offset = epoch + 1, 0

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return self.positions()
