"""Where and how linearize writes its files: the user cache folder (models, Debian packages,
tokens) and the atomic writers (a reader never sees a half-written file or directory)."""

import contextlib
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

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


@contextlib.contextmanager
def atomic_dir(directory: PathLike) -> Iterator[Path]:
    """Yield an empty temp folder beside `directory`; when the block ends without error it
    replaces `directory` (a rename), else it is removed: readers never see a half-written one."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        yield tmp
        if directory.exists():
            old = directory.with_name(f".{directory.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(directory, old)
            os.replace(tmp, directory)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, directory)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def atomic_write(path: PathLike, write: Callable[[Path], object]) -> None:
    """`write(tmp)` a plain file beside `path` (default permissions), renamed over `path` when
    complete."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
