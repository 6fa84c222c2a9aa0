"""Where and how linearize writes its files: the user cache folder (models, Debian packages,
tokens) and the atomic writers (a reader never sees a half-written file or directory, and an
output directory that is not ours is never replaced unless asked: ``atomic_dir``; a cache folder
is built once, a second process asking for it meanwhile waiting for it: ``build_once``)."""

import contextlib
import errno
import fcntl
import logging
import os
import shutil
import signal
import tempfile
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

logger = logging.getLogger(__name__)

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


class OutputError(ValueError):
    """An output path that cannot be written (not ours, a file, locked, or not writable)."""


Replaceable = Callable[[Path], bool]


def check_target(
    directory: PathLike, *, overwrite: bool = False, replaceable: Replaceable | None = None
) -> Path:
    """Raise :class:`OutputError` unless ``directory`` may be (re)written: it does not exist, is
    empty, or ``replaceable(directory)`` (e.g. it holds one of our models), or ``overwrite``."""
    directory = Path(directory)
    if overwrite or not directory.exists() and not directory.is_symlink():
        return directory
    if not directory.is_dir():
        raise OutputError(
            f"output {directory} exists and is a file, not a directory; choose another path or "
            "pass --overwrite to replace it"
        )
    if any(directory.iterdir()) and not (replaceable is not None and replaceable(directory)):
        raise OutputError(
            f"output directory {directory} is not empty and does not hold a model saved by "
            "linearize; choose another path or pass --overwrite to replace its contents"
        )
    return directory


def _temp_prefix(directory: Path) -> str:
    return f".{directory.name}.partial-"


def _old(directory: Path) -> Path:
    return directory.with_name(f".{directory.name}.old")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


# What a model save writes; a temp folder holding only these is ours to remove.
MODEL_FILES = ("config.json", "model.safetensors", "medusa.safetensors", "medusa.json")


def _only_model_files(folder: Path) -> bool:
    names = [p.name for p in folder.iterdir()]
    return bool(names) and all(
        n in MODEL_FILES or n.startswith(("tokenizer", "special_tokens", "chat_template"))
        for n in names
    )


def _recover(directory: Path) -> None:
    """Undo what a killed writer left beside ``directory`` (we hold its lock)."""
    old = _old(directory)
    if old.exists() or old.is_symlink():
        if directory.exists() or directory.is_symlink():
            _remove(old)
        else:
            # Killed between the two renames: the old directory is the last complete one.
            os.replace(old, directory)
            logger.warning("restored %s from an interrupted replace", directory)
    for stale in directory.parent.glob(_temp_prefix(directory) + "*"):
        logger.info("removing %s, left by an interrupted run", stale)
        _remove(stale)
    # Earlier versions wrote into ``.NAME.XXXXXXXX`` (mkdtemp): remove those holding our files.
    for stale in directory.parent.glob(f".{directory.name}.{'?' * 8}"):
        if stale.is_dir() and _only_model_files(stale):
            logger.info("removing %s, left by an interrupted run", stale)
            _remove(stale)


def _acquire(path: Path, directory: Path, wait: bool):
    """An open, flocked handle on the lock file ``path`` that is still linked at ``path``
    (``wait``: until the holder lets go, else :class:`OutputError` at once)."""
    while True:
        handle = open(path, "a+")  # noqa: SIM115 (closed by _lock)
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except OSError as e:
            handle.close()
            if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise
            raise OutputError(
                f"another process is writing {directory} (it holds {path}); wait for it to "
                "finish or choose another output path"
            ) from None
        try:
            same = os.stat(path).st_ino == os.fstat(handle.fileno()).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return handle
        # The previous holder removed the file as we opened it: lock the new one instead.
        handle.close()


@contextlib.contextmanager
def _lock(directory: Path, wait: bool = False) -> Iterator[None]:
    path = directory.with_name(f".{directory.name}.lock")
    handle = _acquire(path, directory, wait)
    try:
        yield
    finally:
        # Unlinked while still held, so no other writer can hold a lock on a stale file.
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        handle.close()


@contextlib.contextmanager
def _terminate_as_interrupt() -> Iterator[None]:
    """SIGTERM raises KeyboardInterrupt while we write, so temp files are removed on the way
    out (only the main thread may set handlers; elsewhere the next run cleans up)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _make_parent(directory: Path) -> None:
    try:
        directory.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        blocked = next((p for p in directory.parents if p.exists() and not p.is_dir()), None)
        reason = f"{blocked} is a file" if blocked is not None else e.strerror
        raise OutputError(f"cannot create the folder {directory.parent}: {reason}") from None
    if not os.access(directory.parent, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write to {directory.parent}: permission denied")


@contextlib.contextmanager
def atomic_dir(
    directory: PathLike, *, overwrite: bool = False, replaceable: Replaceable | None = None
) -> Iterator[Path]:
    """Yield an empty temp folder beside ``directory``; when the block ends without error it
    replaces ``directory`` (renames), else it is removed: readers never see a half-written one.

    Never destroys what is not ours: an existing ``directory`` is replaced only if it is empty
    or ``replaceable(directory)``, unless ``overwrite`` (else :class:`OutputError`, before
    anything is written). A lock file (``.NAME.lock``, flock) makes a second writer to the same
    ``directory`` fail at once; leftovers of a killed writer (``.NAME.partial-*``, and a
    ``.NAME.old`` whose replacement never arrived) are cleaned or restored by the next one;
    SIGTERM while writing removes the temp folder on the way out."""
    directory = check_target(directory, overwrite=overwrite, replaceable=replaceable)
    _make_parent(directory)
    with _lock(directory), _terminate_as_interrupt():
        _recover(directory)
        # Checked again under the lock: another writer may have finished in between.
        check_target(directory, overwrite=overwrite, replaceable=replaceable)
        with _temp_beside(directory) as tmp:
            yield tmp
            # Some writers (safetensors) make their files private (0600): outputs are ordinary.
            for path in tmp.rglob("*"):
                if path.is_file() and not path.is_symlink():
                    path.chmod(0o644)
            if directory.exists() or directory.is_symlink():
                os.replace(directory, _old(directory))
            os.replace(tmp, directory)
        _remove(_old(directory))


def build_once(directory: PathLike, build: Callable[[Path], object]) -> bool:
    """A cache folder, built once: ``build(tmp)`` writes it into a temp folder renamed to
    ``directory`` when complete (so a ``directory`` that exists is whole). A process that asks
    for the same folder while another builds it waits for that build (a blocking lock) and then
    uses it instead of failing or building it twice. True if this call built it."""
    directory = Path(directory)
    if directory.is_dir():
        return False
    _make_parent(directory)
    with _lock(directory, wait=True), _terminate_as_interrupt():
        _recover(directory)
        if directory.is_dir():  # built by the process we waited for
            return False
        with _temp_beside(directory) as tmp:
            build(tmp)
            os.replace(tmp, directory)
    return True


@contextlib.contextmanager
def _temp_beside(directory: Path) -> Iterator[Path]:
    """An empty temp folder beside ``directory`` (we hold its lock), removed if the block fails;
    the block renames it into place."""
    tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(directory), dir=directory.parent))
    try:
        # mkdtemp makes the folder private (0700); an output is an ordinary folder.
        tmp.chmod(0o755)
        yield tmp
    except BaseException:
        _remove(tmp)
        raise


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
