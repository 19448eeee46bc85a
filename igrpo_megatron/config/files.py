"""Files and directories that appear whole or not at all: written under a temporary name, then renamed.

The one way the package writes a file someone else may read while it is written (a recipe, a
report, metrics, a checkpoint). It lives in ``config``, the lowest package, because the recipe
loader writes ``recipe.yaml`` and every other package may import ``config``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def atomic_write(path: str | os.PathLike, write: Callable[[Path], object]) -> Path:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then rename it to ``path``.

    ``path``'s parent is created. A failing ``write`` leaves ``path`` as it was and no temporary
    file behind. Returns ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_figure(path: str | os.PathLike, fig: Any, dpi: int = 100) -> Path:
    """Save a Matplotlib figure to ``path`` as PNG atomically, then close it (pyplot keeps it otherwise)."""
    import matplotlib.pyplot as plt

    try:
        return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=dpi))
    finally:
        plt.close(fig)


def replace_directory(staged: str | os.PathLike, final: str | os.PathLike) -> Path:
    """Move a completely written directory ``staged`` to ``final``, replacing what was there."""
    final = Path(final)
    if final.exists():
        shutil.rmtree(final)
    os.replace(staged, final)
    return final
