"""Output files are written atomically: to a hidden temporary beside the target, renamed into place
only when complete, and removed on any failure or interrupt."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ivvae_cli.errors import OutputError


def check_output(path: Path, force: bool) -> None:
    """Fail before any work when ``path`` cannot be written."""
    if path.is_dir():
        raise OutputError(f"output is a folder: {path}")
    if path.exists() and not force:
        raise OutputError(f"output exists: {path} (use --force to overwrite)")
    if not path.parent.is_dir():
        raise OutputError(f"output folder does not exist: {path.parent}")


def _partial(path: Path, pid: int | str) -> Path:
    return path.with_name(f".{path.stem}.partial-{pid}{path.suffix}")


def remove_stale_partials(path: Path) -> None:
    """Remove what killed processes left while writing ``path`` (for outputs only one process
    writes at a time: another's temporary file may be in progress otherwise)."""
    mine = _partial(path, os.getpid())
    for leftover in path.parent.glob(_partial(path, "*").name):
        if leftover != mine:
            leftover.unlink(missing_ok=True)


@contextmanager
def atomic_output(path: Path, force: bool) -> Iterator[Path]:
    """Yield a temporary path with the same extension; rename it to ``path`` on success."""
    check_output(path, force)
    temporary = _partial(path, os.getpid())
    try:
        yield temporary
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
