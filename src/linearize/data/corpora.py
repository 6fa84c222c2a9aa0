"""The corpora: Debian-packaged R data (Jane Austen's novels, Moby Dick) and user text files.

The embedded corpora are R data files inside Debian packages (Jane Austen's novels in
`r-cran-janeaustenr`, Moby Dick in `r-cran-tokenizers`), read without R: `fetch_deb` unpacks a
package into the user cache and `read_rdata` (`data/rdata.py`) reads R's lazy-load database.
"""

import json
import logging
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from linearize.data.rdata import read_rdata
from linearize.paths import PathLike, cache_dir

log = logging.getLogger(__name__)


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


# --- corpora -------------------------------------------------------------------------------


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


def read_utf8(path: Path) -> str:
    """The text of a UTF-8 file (a leading BOM dropped); anything else: a clear error."""
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
    for number, line in enumerate(read_utf8(path).split("\n"), start=1):
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
    return _read_jsonl(path, text_field) if path.suffix == ".jsonl" else read_utf8(path)


def check_source(source: PathLike) -> None:
    """Raise unless `source` is a built-in corpus or an existing file or folder."""
    if not (isinstance(source, str) and source in CORPORA) and not Path(source).exists():
        raise ValueError(
            f"{str(source)!r} is neither a built-in corpus ({', '.join(sorted(CORPORA))}) "
            "nor an existing file or folder"
        )


def load_text(source: PathLike, *, text_field: str = "text", cache: PathLike | None = None) -> str:
    """The text of a built-in corpus (see `CORPORA`) or of user files.

    `source` is a corpus name, a .txt/.md file, a .jsonl file (one JSON object per line, its text
    in `text_field`) or a folder (every .txt/.md/.jsonl file under it, in sorted order). Novels and
    files are joined with a blank line."""
    check_source(source)
    if isinstance(source, str) and source in CORPORA:
        return _builtin_text(_ALIASES.get(source, source), cache)
    path = Path(source)
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
