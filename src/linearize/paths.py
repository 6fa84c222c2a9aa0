"""Where linearize keeps its files: the user cache folder (models, Debian packages, tokens)."""

import os
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
