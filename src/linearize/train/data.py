"""Training and evaluation text: the embedded corpora, user text, tokenization and packing.

The embedded corpora are R data files inside Debian packages (Jane Austen's novels in
`r-cran-janeaustenr`, Moby Dick in `r-cran-tokenizers`), read without R: `fetch_deb` unpacks a
package into the user cache and `read_rdata` reads R's lazy-load database (`Rdata.rdb` + its
`Rdata.rdx` index) with a small reader of R's XDR serialization format.
"""

import bz2
import gzip
import hashlib
import json
import logging
import lzma
import os
import random
import re
import shutil
import struct
import subprocess
import tempfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

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

_NA_INT = -(2**31)
_LISTSXP, _CHARSXP, _STRSXP, _VECSXP = 2, 9, 16, 19
_R_CONSTANTS = {
    254: None,  # NILVALUE_SXP
    253: "<globalenv>",
    252: "<unbound>",
    251: "<missing-arg>",
    250: "<base-namespace>",
    242: "<emptyenv>",
    241: "<baseenv>",
}


@dataclass(frozen=True)
class RSymbol:
    """An R symbol (a name)."""

    name: str


@dataclass
class RObject:
    """An R vector or pairlist: its type code, its elements and its attributes.

    A pairlist's elements are `(tag, value)` pairs (tag `None` when absent)."""

    type: int
    value: list[Any]
    attributes: dict[str, Any] = field(default_factory=dict)


class _RReader:
    """Reads one R serialization stream (`serialize()` / `saveRDS()` in XDR format)."""

    def __init__(self, data: bytes, where: str) -> None:
        self.data, self.pos, self.where = data, 0, where
        self.refs: list[Any] = []
        if data[:2] != b"X\n":
            raise ValueError(f"{where}: not an R XDR serialization (starts with {data[:2]!r})")
        self.pos = 2
        version = self.int()
        self.int(), self.int()  # writer's R version, oldest R version that can read it
        if version not in (2, 3):
            raise ValueError(f"{where}: R serialization version {version}; 2 and 3 are supported")
        self.native = self.take(self.int()).decode("ascii") if version == 3 else "latin-1"

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise ValueError(f"{self.where}: truncated R data (wanted {n} bytes at {self.pos})")
        self.pos += n
        return self.data[self.pos - n : self.pos]

    def int(self) -> int:
        return struct.unpack(">i", self.take(4))[0]

    def length(self) -> int:
        n = self.int()
        return n if n != -1 else (self.int() << 32) + self.int()

    def item(self) -> Any:
        flags = self.int()
        kind, levels = flags & 0xFF, flags >> 12
        has_attr = bool(flags & (1 << 9))
        if kind in _R_CONSTANTS:
            return _R_CONSTANTS[kind]
        if kind == 255:  # REFSXP: 1-based index packed in the flags, or in the next int
            index = (flags >> 8) or self.int()
            return self.refs[index - 1]
        if kind == 1:  # SYMSXP: a CHARSXP, remembered for later REFSXPs
            symbol = RSymbol(self.item())
            self.refs.append(symbol)
            return symbol
        if kind == _LISTSXP:
            return self.pairlist(flags)
        if kind == _CHARSXP:
            return self.charsxp(levels)
        if kind in (10, 13):  # LGLSXP, INTSXP
            n = self.length()
            ints = struct.unpack(f">{n}i", self.take(4 * n))
            value: list[Any] = [
                None if i == _NA_INT else (bool(i) if kind == 10 else i) for i in ints
            ]
        elif kind == 14:  # REALSXP
            n = self.length()
            value = list(struct.unpack(f">{n}d", self.take(8 * n)))
        elif kind == 24:  # RAWSXP
            value = list(self.take(self.length()))
        elif kind in (_STRSXP, _VECSXP, 20):  # STRSXP, VECSXP, EXPRSXP
            value = [self.item() for _ in range(self.length())]
        else:
            raise ValueError(f"{self.where}: unsupported R type code {kind} at byte {self.pos - 4}")
        return RObject(kind, value, self.attributes() if has_attr else {})

    def charsxp(self, levels: int) -> str | None:
        n = self.int()
        if n == -1:
            return None
        raw = self.take(n)
        if levels & 8:  # UTF8_MASK
            return raw.decode("utf-8")
        if levels & (4 | 2):  # LATIN1_MASK, BYTES_MASK
            return raw.decode("latin-1")
        return raw.decode(self.native, errors="replace")

    def pairlist(self, flags: int) -> RObject:
        # Read iteratively: a long pairlist would otherwise recurse once per element.
        out = RObject(_LISTSXP, [])
        while flags & 0xFF == _LISTSXP:
            attrs = self.attributes() if flags & (1 << 9) else {}
            tag = self.item() if flags & (1 << 10) else None
            out.value.append((tag.name if isinstance(tag, RSymbol) else tag, self.item()))
            out.attributes.update(attrs)
            flags = self.int()
        if flags & 0xFF != 254:
            raise ValueError(f"{self.where}: pairlist ends in R type {flags & 0xFF}, not NULL")
        return out

    def attributes(self) -> dict[str, Any]:
        attrs = self.item()
        if not isinstance(attrs, RObject) or attrs.type != _LISTSXP:
            raise ValueError(f"{self.where}: attributes are not a pairlist")
        return {str(tag): value for tag, value in attrs.value}


def unserialize_r(data: bytes, where: str = "<bytes>") -> Any:
    """Decode one R XDR serialization (an uncompressed `.rds` stream) into Python values:
    `RObject`, `RSymbol`, `str` (CHARSXP) or `None` (NULL)."""
    return _RReader(data, where).item()


def _decompress_file(raw: bytes) -> bytes:
    """`saveRDS` output: gzip, bzip2, xz or uncompressed."""
    if raw[:2] == b"\x1f\x8b":
        return gzip.decompress(raw)
    if raw[:3] == b"BZh":
        return bz2.decompress(raw)
    if raw[:6] == b"\xfd7zXZ\x00":
        return lzma.decompress(raw)
    return zlib.decompress(raw) if raw[:1] == b"\x78" else raw


def _decompress_record(blob: bytes, method: Any, where: str) -> bytes:
    """One lazy-load record: big-endian uncompressed length, [type byte,] compressed data."""
    if len(blob) < 5:
        raise ValueError(f"{where}: record of {len(blob)} bytes is too short")
    size = struct.unpack(">I", blob[:4])[0]
    if method is True or method == 1:
        data = zlib.decompress(blob[4:])
    else:
        codecs = {b"Z": lzma.decompress, b"2": bz2.decompress, b"1": zlib.decompress}
        codec = codecs.get(blob[4:5], lambda b: b)
        data = codec(blob[5:])
    if len(data) != size:
        raise ValueError(f"{where}: record holds {len(data)} bytes, its header says {size}")
    return data


def _names(obj: Any, where: str) -> list[str]:
    names = obj.attributes.get("names") if isinstance(obj, RObject) else None
    if not isinstance(names, RObject) or len(names.value) != len(obj.value):
        raise ValueError(f"{where}: expected a named R list")
    return names.value


def read_rdata(path: PathLike) -> dict[str, list[str | None]]:
    """Read the character vectors of an R lazy-load database (`Rdata.rdb`).

    The object names and record positions come from the companion index `Rdata.rdx`. NA elements
    are `None`. Objects that are not character vectors are left out (logged)."""
    rdb = Path(path)
    rdx = rdb.with_suffix(".rdx")
    for needed in (rdb, rdx):
        if not needed.is_file():
            raise ValueError(f"R lazy-load database file not found: {needed}")
    index = unserialize_r(_decompress_file(rdx.read_bytes()), str(rdx))
    parts = dict(zip(_names(index, str(rdx)), index.value, strict=True))
    if "variables" not in parts:
        raise ValueError(f"{rdx}: index has no 'variables' entry (has {sorted(parts)})")
    method = parts.get("compressed", RObject(10, [True])).value[0]
    variables = parts["variables"]
    blob = rdb.read_bytes()
    out: dict[str, list[str | None]] = {}
    for name, pos in zip(_names(variables, str(rdx)), variables.value, strict=True):
        offset, length = pos.value
        where = f"{rdb} (object {name!r})"
        if offset + length > len(blob):
            raise ValueError(
                f"{where}: needs bytes {offset}..{offset + length}, file has {len(blob)}"
            )
        obj = unserialize_r(
            _decompress_record(blob[offset : offset + length], method, where), where
        )
        if isinstance(obj, RObject) and obj.type == _STRSXP:
            out[name] = obj.value
        else:
            log.warning("%s is not a character vector; skipped", where)
    return out


# --- corpora ---------------------------------------------------------------------------------


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
    # The line just before `*** END` is Gutenberg's own closing line.
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
    for number, line in enumerate(_read_utf8(path).splitlines(), start=1):
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
            return load_file(path)["tokens"]
        if text is None:
            text = load_text(source, cache=self.cache)
        tokens = tokenize_text(text, tokenizer)
        self.root.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=self.root, suffix=".tmp", delete=False) as tmp:
            tmp_path = Path(tmp.name)
        try:
            save_file({"tokens": tokens}, tmp_path, metadata={"source": str(source)})
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
