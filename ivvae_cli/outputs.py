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


@contextmanager
def atomic_output(path: Path, force: bool, *, sole_writer: bool = False) -> Iterator[Path]:
    """Yield a temporary path with the same extension; rename it to ``path`` on success.

    ``sole_writer``: no other process writes ``path`` meanwhile, so the temporary's name is fixed
    and what a killed writer left of it is overwritten and renamed away by the next write (no scan
    of the folder, which a dataset of a million clips cannot afford). Otherwise the name carries
    the process id, so that processes writing the same path do not meet."""
    check_output(path, force)
    tag = "" if sole_writer else f"-{os.getpid()}"
    temporary = path.with_name(f".{path.stem}.partial{tag}{path.suffix}")
    try:
        yield temporary
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
