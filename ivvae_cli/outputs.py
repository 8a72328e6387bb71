"""Output files are written atomically: to a hidden temporary beside the target, renamed into place
only when complete, and removed on any failure or interrupt. A name derived from input (a manifest's
path, a latent file's place in a folder) becomes a path only through ``place_under``, so that no
input chooses where ivvae writes."""

from __future__ import annotations

import errno
import fcntl
import os
import posixpath
import re
import socket
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ivvae_cli.errors import IvvaeWarning, OutputError, WriteError

MAX_SEGMENT_BYTES = 255  # a file name's limit on ext4, XFS, btrfs, ZFS, NFS and Lustre
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO})


def name_problem(name: str) -> str | None:
    """Why the relative ``/``-separated ``name`` cannot be a path under a folder, or None. ``..``
    is resolved lexically first, and empty and ``.`` segments dropped; what still climbs out, an
    absolute or empty name, a control character or a segment longer than a file name can be is
    refused."""
    if _CONTROL.search(name):
        return "it holds a control character"
    if name.startswith("/"):
        return "it is an absolute path"
    normal = posixpath.normpath(name) if name else "."
    if normal == ".":
        return "it names no file"
    if normal == ".." or normal.startswith("../"):
        return "it climbs out of the folder"
    longest = max(normal.split("/"), key=lambda s: len(s.encode("utf-8", "surrogateescape")))
    if len(longest.encode("utf-8", "surrogateescape")) > MAX_SEGMENT_BYTES:
        return f"a part of it is longer than {MAX_SEGMENT_BYTES} bytes"
    return None


def place_under(folder: Path, name: str) -> Path:
    """``name`` (derived from input) as a path under ``folder``, or OutputError: the lexical rules of
    ``name_problem``, then no link already under ``folder`` may lead the path out of it."""
    problem = name_problem(name)
    if problem is not None:
        raise OutputError(f"cannot write {name!r} under {folder}: {problem}")
    path = folder / posixpath.normpath(name)
    if not path.resolve().is_relative_to(folder.resolve()):
        raise OutputError(f"cannot write {name!r} under {folder}: a link there leads out of the folder")
    return path


def check_output(path: Path, force: bool) -> None:
    """Fail before any work when ``path`` cannot be written."""
    _check_target(path, force)
    check_writable(path.parent)


def check_writable(folder: Path) -> None:
    """Fail in one line, before any work, when nothing can be written in ``folder``: a probe file is
    made and removed (``os.access`` says yes to root on a read-only mount, and knows no full disk)."""
    if not folder.is_dir():
        raise OutputError(f"output folder does not exist: {folder}")
    probe = folder / ".ivvae.probe"  # one name: what a killed process left, the next probe removes
    try:
        descriptor = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(descriptor, b"\0")
        finally:
            os.close(descriptor)
            probe.unlink(missing_ok=True)  # processes started together probe alike
    except OSError as e:
        raise write_error(e, folder) or OutputError(f"cannot write in {folder}: {e.strerror or e}") from None


def write_error(error: OSError, path: Path | str | None = None) -> WriteError | None:
    """``error`` in one line when it says that an output cannot be written (a full disk or quota, a
    read-only or refused folder), else None."""
    if error.errno not in WRITE_ERRNOS:
        return None
    return WriteError(f"cannot write {path or error.filename}: {error.strerror or error}")


def _check_target(path: Path, force: bool) -> None:
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
    _check_target(path, force)
    tag = "" if sole_writer else f"-{os.getpid()}"
    temporary = path.with_name(f".{path.stem}.partial{tag}{path.suffix}")
    try:
        yield temporary
        os.replace(temporary, path)
    except BaseException as e:
        temporary.unlink(missing_ok=True)
        if isinstance(e, OSError) and (error := write_error(e, path)) is not None:
            raise error from None
        raise


NO_LOCKS = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)  # a filesystem without locks


@contextmanager
def folder_guard(folder: Path) -> Iterator[None]:
    """One process at a time in ``folder`` for a moment: joining a job (``FolderLock``), or writing
    a file that several of its processes write (a dataset's index and description), which may then
    keep one temporary name that the next write replaces, instead of one per process that a killed
    one would leave behind."""
    guard = os.open(folder / ".ivvae.guard", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.lockf(guard, fcntl.LOCK_EX)
        except OSError as e:
            if e.errno not in NO_LOCKS:
                raise
        yield
    finally:
        os.close(guard)  # and with it the lock


class FolderLock:
    """Keeps two jobs out of one output folder while letting the processes of one job (a torchrun
    or srun launch, named by ``launch``) share it. Each holds a shared POSIX lock on ``.ivvae.lock``
    while it runs, and the first of a launch writes the launch's name there; a process of another
    launch is refused while any lock is held. The kernel, or the NFS lock manager, drops a dead
    process's lock, so a crash never blocks the next run; and POSIX locks are not inherited by
    forked workers. Where the filesystem has no locks, a warning says that jobs are not kept apart."""

    def __init__(self, folder: Path, launch: str = ""):
        self.folder = folder
        self.launch = launch or f"{socket.gethostname()}:{os.getpid()}"
        self.descriptor: int | None = None

    def __enter__(self) -> FolderLock:
        self.folder.mkdir(exist_ok=True)
        try:
            with folder_guard(self.folder):
                self._join()
        except OSError as e:
            if e.errno not in NO_LOCKS:
                raise
            warnings.warn(
                f"{self.folder} cannot be locked ({e.strerror}): two jobs started on it are not kept apart",
                IvvaeWarning, stacklevel=2,
            )  # fmt: skip
        return self

    def _join(self) -> None:
        self.descriptor = os.open(self.folder / ".ivvae.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.lockf(self.descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            holder = os.pread(self.descriptor, 1024, 0).decode(errors="replace")
            if holder != self.launch:
                self.__exit__()
                raise OutputError(
                    f"{self.folder} is being written by another job ({holder}): wait for it to end, "
                    "or use another folder (the processes of one torchrun or srun launch share it)"
                ) from None
        else:  # no process holds it: this launch is the first
            os.ftruncate(self.descriptor, 0)
            os.pwrite(self.descriptor, self.launch.encode(), 0)
        fcntl.lockf(self.descriptor, fcntl.LOCK_SH)

    def __exit__(self, *error) -> None:
        if self.descriptor is not None:
            os.close(self.descriptor)  # and with it the lock
            self.descriptor = None
