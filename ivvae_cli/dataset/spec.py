"""What a job is: the settings its outputs were made with, recorded in the folder's dataset.json,
which every later run of the job checks before it adds to the folder."""

from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import asdict, dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

from ivvae_cli.dataset.clips import ClipOptions
from ivvae_cli.dataset.sources import Columns
from ivvae_cli.errors import InputError, IvvaeError, IvvaeWarning, OutputError
from ivvae_cli.outputs import atomic_output, check_writable, folder_guard

FORMAT_NAME = "ivvae-dataset"
FORMAT_VERSION = 1
LAYOUTS = ("files", "shards")
SHARD_SIZE = 2**30  # bytes a shard holds before the next is begun
WORK_UNITS = 4096  # what the work list is cut into, by a hash of each source: ample for thousands of processes


def write_json(path: Path, value: Any) -> None:
    """Atomically, creating the folder; an existing file is replaced. No other process writes it
    meanwhile (or the caller holds ``folder_guard``), so its temporary has one name, and what a
    killed process left of it is replaced by the next write."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(path, force=True, sole_writer=True) as tmp:
        tmp.write_text(json.dumps(value, default=str) + "\n")


def read_json(path: Path) -> Any:
    """The JSON in ``path``; None where it is missing, cut short or garbled."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


@dataclass(frozen=True)
class Storage:
    """How a job's clips are kept: it does not change what they hold."""

    layout: str = "files"  # files: a latent file per clip; shards: tar files of about shard_size
    shard_size: int = SHARD_SIZE

    def __post_init__(self) -> None:
        if self.layout not in LAYOUTS:
            raise IvvaeError(f"--layout is {' or '.join(LAYOUTS)}; not '{self.layout}'")
        if self.shard_size < 1:
            raise IvvaeError(f"--shard-size must be positive, got {self.shard_size}")


@dataclass(frozen=True)
class JobSpec:
    """What a job's outputs were made with: resuming needs the same, or ``overwrite``."""

    source: str
    columns: Columns
    options: ClipOptions
    model: str
    weights_fingerprint: str
    storage: Storage = Storage()
    work_units: int = WORK_UNITS  # fixed when the job starts: process rank takes units rank, rank + world, ...

    @property
    def fingerprint(self) -> str:
        """Of what decides the latents: the clip options and the weights (not where sources are listed)."""
        return hashlib.sha256(f"{self.options.fingerprint()}:{self.weights_fingerprint}".encode()).hexdigest()[:16]

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT_NAME, "format_version": FORMAT_VERSION, "source": self.source,
            "columns": asdict(self.columns), "options": self.options.describe(), "model": self.model,
            "weights_fingerprint": self.weights_fingerprint, "fingerprint": self.fingerprint,
            "layout": self.storage.layout, "shard_size": self.storage.shard_size, "work_units": self.work_units,
        }  # fmt: skip

    @classmethod
    def read(cls, folder: Path) -> JobSpec | None:
        """The job recorded in ``folder``; None where there is none; ``DamagedSpecError`` where its
        dataset.json is cut short or garbled (a crash on a network filesystem)."""
        path = folder / "dataset.json"
        if not path.exists():
            return None
        try:
            raw = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise DamagedSpecError(f"{path} is cut short or garbled ({e.__class__.__name__})") from None
        if isinstance(raw, dict) and raw.get("format") not in (None, FORMAT_NAME):
            raise InputError(f"{path} is not an ivvae dataset description")
        try:
            options = dict(raw["options"])
            options["buckets"] = tuple((int(w), int(h)) for w, h in options["buckets"])
            options["target_fps"] = None if options["target_fps"] is None else Fraction(options["target_fps"])
            spec = cls(str(raw["source"]), Columns(**raw["columns"]), ClipOptions(**options), str(raw["model"]),
                       str(raw["weights_fingerprint"]),
                       Storage(str(raw.get("layout", "files")), int(raw.get("shard_size", SHARD_SIZE))),
                       int(raw.get("work_units", WORK_UNITS)))  # fmt: skip
            if spec.work_units < 1:
                raise ValueError("no work units")
        except (TypeError, ValueError, KeyError, IvvaeError) as e:
            raise DamagedSpecError(f"{path} is cut short or garbled ({e.__class__.__name__})") from None
        if raw.get("fingerprint") != spec.fingerprint:
            raise DamagedSpecError(f"{path} is garbled (its settings do not give its fingerprint)")
        return spec


class DamagedSpecError(InputError):
    """A dataset.json that cannot be read back: ``encode`` writes it anew, ``merge`` refuses."""


def work_units(folder: Path, requested: int | None, overwrite: bool) -> int:
    """How many work units the job in ``folder`` has: what it recorded when it started (a run
    asking for another count is refused, unless ``overwrite``), else ``requested`` or the default."""
    if requested is not None and requested < 1:
        raise IvvaeError(f"--work-units must be positive, got {requested}")
    try:
        old = JobSpec.read(folder)
    except DamagedSpecError:  # prepare_folder says so
        old = None
    if old is None or overwrite:
        return requested or WORK_UNITS
    if requested is not None and requested != old.work_units:
        raise OutputError(
            f"{folder} cuts its work into {old.work_units} units; leave --work-units out, or use --overwrite"
        )
    return old.work_units


def check_folder(folder: Path) -> None:
    """Fail in one line, before the model loads, when ``folder`` cannot take a dataset."""
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"output is not a folder: {folder}")
    if not folder.parent.is_dir():
        raise OutputError(f"output folder's parent does not exist: {folder.parent}")
    check_writable(folder if folder.is_dir() else folder.parent)


def prepare_folder(folder: Path, spec: JobSpec, overwrite: bool) -> None:
    """Refuse to mix options, weights or layouts in one folder (unless ``overwrite``), then record the job."""
    check_folder(folder)
    try:
        old = JobSpec.read(folder)
    except DamagedSpecError as e:  # nothing is lost: every record and latent carries the settings it was made with
        redone = "records and clips made with other settings are redone"
        warnings.warn(f"{e}: written anew; {redone}", IvvaeWarning, stacklevel=2)
        old = None
    if old is not None and not overwrite:
        if old.fingerprint != spec.fingerprint:
            changed = [k for k, v in asdict(spec.options).items() if getattr(old.options, k) != v]
            if old.weights_fingerprint != spec.weights_fingerprint:
                changed.append(f"weights ({old.model} {old.weights_fingerprint} before)")
            raise OutputError(
                f"{folder} holds latents made with other settings ({', '.join(changed)}); "
                "use the same options, another folder, or --overwrite"
            )
        if old.storage.layout != spec.storage.layout:
            was = old.storage.layout
            raise OutputError(
                f"{folder} holds a dataset in the {was} layout; give --layout {was}, another folder, or --overwrite"
            )
    folder.mkdir(exist_ok=True)
    with folder_guard(folder):  # every process writes it alike, one at a time
        write_json(folder / "dataset.json", spec.to_json())
