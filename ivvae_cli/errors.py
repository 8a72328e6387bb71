"""Errors a user can meet, each with its documented exit code (README.md, "Exit codes")."""


class IvvaeError(Exception):
    """A failure explained in one line."""

    exit_code = 1


class InputError(IvvaeError):
    """Missing, unreadable or unsuitable input: a video, a latent file."""

    exit_code = 3


class OutputError(IvvaeError):
    """The output exists, its folder is missing, or it cannot be written."""

    exit_code = 4


class WriteError(OutputError):
    """An output could not be written: the disk or quota is full, the folder read-only or refused.
    Jobs stop at it (every later write would fail too); the same command resumes once it is fixed."""


class WeightsError(IvvaeError):
    """Weights that cannot be found, read, or that do not fit."""

    exit_code = 5


class DeviceError(IvvaeError):
    """The device asked for is not available."""

    exit_code = 6


class DownloadError(IvvaeError):
    """A download that could not complete (what was fetched is kept to resume from)."""

    exit_code = 7


class IvvaeWarning(UserWarning):
    """Something the user should know, said once in one line, while the work goes on (the CLI
    prints each as ``warning: ...`` unless --quiet)."""
