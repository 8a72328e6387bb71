"""Reading sources: the work list of a job (manifest rows, or the videos of a folder or glob), and
which of it this process takes."""

from __future__ import annotations

import csv
import glob
import hashlib
import itertools
import json
import math
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ivvae_cli.errors import InputError
from ivvae_cli.latent_file import glob_root
from ivvae_cli.outputs import name_problem

VIDEO_EXTENSIONS = frozenset(
    {".mp4", ".m4v", ".mkv", ".webm", ".mov", ".avi", ".mpg", ".mpeg", ".ts", ".mts", ".m2ts", ".264", ".h264",
     ".265", ".hevc", ".flv", ".wmv", ".ogv", ".3gp", ".y4m"}
)  # fmt: skip
# Output names a source's own path never takes: a source outside the collection's folder goes under
# _outside/ by its absolute path, one with no safe name under _unplaceable/ by a digest, and one
# inside whose path starts with any of these under _inside/, so no two sources share an output.
OUTSIDE, UNPLACEABLE, INSIDE = "_outside", "_unplaceable", "_inside"
# -- who does what ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class World:
    """This process's place among those sharing the job."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    launch: str = field(default="", compare=False)  # what this job's processes share; "" for one alone

    @classmethod
    def from_environment(cls, env: dict[str, str] | None = None) -> World:
        """torchrun's variables, else SLURM's, else a single process. The launch is torchrun's run
        id (its --rdzv-id) or srun's job step."""
        env = os.environ if env is None else env
        launch = ""
        if "TORCHELASTIC_RUN_ID" in env:
            launch = f"torchrun {env['TORCHELASTIC_RUN_ID']}"
        elif "SLURM_PROCID" in env and "SLURM_STEP_ID" in env:
            launch = f"srun {env.get('SLURM_JOB_ID', '')}.{env['SLURM_STEP_ID']}"
        names = (("RANK", "WORLD_SIZE", "LOCAL_RANK"), ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"))
        for rank, size, local in names:
            if rank in env and size in env:
                try:
                    world = cls(int(env[rank]), int(env[size]), int(env.get(local, "0")), launch)
                except ValueError:
                    raise InputError(f"{rank}/{size} are not integers: {env[rank]!r}, {env[size]!r}") from None
                if not 0 <= world.rank < world.size:
                    raise InputError(f"{rank}={world.rank} is outside {size}={world.size}")
                return world
        return cls(launch=launch)

    def share(self, sources: list[Source], units: int) -> list[tuple[int, Source]]:
        """The sources this process takes, with their places in the work list: those of work units
        ``rank, rank + size, ...``."""
        return [(i, s) for i, s in enumerate(sources) if work_unit(s, units) % self.size == self.rank]

    def __str__(self) -> str:
        return f"rank {self.rank}/{self.size}"


def work_unit(source: Source, units: int) -> int:
    """Which of ``units`` work units a source belongs to, by a stable hash of its name: it stays put
    whatever rows a manifest gains or loses, so a process keeps its sources and only new ones are new."""
    digest = hashlib.sha256(source.name.encode("utf-8", "surrogateescape")).digest()
    return int.from_bytes(digest[:8], "big") % units


# -- the work list ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Columns:
    """Manifest column names, and the unit of the clip span columns (``frames`` or ``seconds``)."""

    path: str = "path"
    id: str = "id"
    start: str = "start"
    end: str = "end"
    span_unit: str = "frames"


@dataclass
class Source:
    """One video of the work list, or a span of one, with the manifest columns it carries."""

    path: Path
    key: str  # the path relative to the collection's folder: outputs mirror it
    id: str | None = None
    start: float | None = None  # in ``unit``
    end: float | None = None
    unit: str = "frames"
    columns: dict[str, Any] = field(default_factory=dict)
    problem: str | None = None  # why it has no safe output name: it fails without being read

    @property
    def name(self) -> str:
        """Unique in the work list: the key, and the span when the manifest gives one."""
        if self.start is None and self.end is None:
            return self.key
        unit = "f" if self.unit == "frames" else "s"
        return f"{self.key}@{_number(self.start or 0)}-{'' if self.end is None else _number(self.end)}{unit}"


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def read_sources(spec: str | Path, columns: Columns | None = None) -> list[Source]:
    """The work list: a manifest (.csv, .tsv, .jsonl, .parquet), a folder (searched recursively for
    videos) or a glob pattern, sorted by key and span. Paths in a manifest are relative to its folder."""
    columns = columns or Columns()
    if columns.span_unit not in ("frames", "seconds"):
        raise InputError(f"the span unit is frames or seconds, not '{columns.span_unit}'")
    text = str(spec)
    path = Path(text)
    if path.is_dir():
        sources = [_plain_source(p, path) for p in sorted(path.rglob("*")) if _is_video(p)]
    elif path.is_file():
        rows = _manifest_rows(path)
        sources = [_manifest_source(row, i, path, columns) for i, row in enumerate(rows)]
    elif glob.has_magic(text):
        root = glob_root(text)
        sources = [_plain_source(Path(p), root) for p in sorted(glob.glob(text, recursive=True)) if _is_video(Path(p))]
    else:
        raise InputError(f"input not found: {spec}")
    if not sources:
        raise InputError(f"no videos in {spec}")
    sources = [_placeable(s) for s in sources]
    sources.sort(key=lambda s: (s.key, s.start or 0, math.inf if s.end is None else s.end))
    names = [s.name for s in sources]
    duplicate = next((a for a, b in itertools.pairwise(names) if a == b), None)
    if duplicate is not None:
        raise InputError(f"{spec} lists {duplicate} twice; each video (or span of one) once")
    return sources


def _is_video(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in VIDEO_EXTENSIONS


def _plain_source(path: Path, root: Path) -> Source:
    return Source(path.absolute(), _key(path, root))


def _key(path: Path, root: Path) -> str:
    """``path`` relative to ``root``, both with ``..`` resolved lexically; a path outside it keeps
    its whole absolute form under ``_outside/``."""
    absolute = os.path.normpath(path.absolute())
    try:
        key = Path(absolute).relative_to(os.path.normpath(root.absolute())).as_posix()
    except ValueError:
        return f"{OUTSIDE}/{absolute.lstrip('/')}"
    return f"{INSIDE}/{key}" if key.split("/")[0] in (OUTSIDE, UNPLACEABLE, INSIDE) else key


def _placeable(source: Source) -> Source:
    """``source``; or when it cannot be encoded (a manifest row's span is not one) or its outputs
    cannot be named after it (a control character, a name too long), the same under a digest of
    its name and problem, with the problem said: it fails into errors.jsonl, unread."""
    problem = source.problem
    if problem is None:
        named = name_problem(f"{source.name}.json")  # its record's name: the longest a source has
        if named is None:
            return source
        problem = f"no safe output name for it: {named}"
    digest = hashlib.sha256(f"{source.name}\0{problem}".encode("utf-8", "surrogateescape")).hexdigest()[:16]
    return replace(source, key=f"{UNPLACEABLE}/{digest}", problem=problem)


def _manifest_rows(path: Path) -> list[dict[str, Any]]:
    suffix = path.suffix.lower()
    try:
        if suffix in (".csv", ".tsv"):
            with path.open(newline="") as f:
                return list(csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ","))
        if suffix in (".jsonl", ".ndjson"):
            with path.open() as f:
                rows = [json.loads(line) for line in f if line.strip()]
            if not all(isinstance(r, dict) for r in rows):
                raise InputError(f"{path}: every line must be a JSON object")
            return rows
        if suffix == ".parquet":
            try:
                import pyarrow.parquet as pq
            except ImportError:
                raise InputError("Parquet manifests need pyarrow: pip install 'ivvae-cli[parquet]'") from None
            return pq.read_table(path).to_pylist()
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, csv.Error) as e:
        raise InputError(f"cannot read the manifest {path} ({e.__class__.__name__}: {e})") from None
    raise InputError(f"{path}: a manifest is .csv, .tsv, .jsonl or .parquet (or give a folder or a glob)")


def _manifest_source(row: dict[str, Any], index: int, manifest: Path, columns: Columns) -> Source:
    where = f"{manifest}, row {index + 1}"
    value = row.get(columns.path)
    if not value:
        have = ", ".join(map(str, row)) or "none"
        raise InputError(f"{where}: no '{columns.path}' column (columns: {have}; --path-column names another)")
    path = Path(str(value))
    path = path if path.is_absolute() else manifest.parent / path

    problems = []

    def number(name: str) -> float | None:
        raw = row.get(name)
        if raw is None or raw == "":
            return None
        try:
            number = float(raw)
        except (TypeError, ValueError):
            problems.append(f"'{name}' is not a number: {raw!r}")
            return None
        if not math.isfinite(number) or number < 0:
            problems.append(f"'{name}' must be a finite number >= 0, got {raw!r}")
            return None
        return number

    start, end = number(columns.start), number(columns.end)
    if start is not None and end is not None and end <= start:
        problems.append(f"the span ends ({end:g}) before it starts ({start:g})")
    used = {columns.path, columns.id, columns.start, columns.end}
    carried = {k: v for k, v in row.items() if k not in used}
    identifier = row.get(columns.id)
    return Source(
        path, _key(path, manifest.parent), None if identifier in (None, "") else str(identifier),
        start, end, columns.span_unit, carried, f"{where}: {'; '.join(problems)}" if problems else None,
    )  # fmt: skip
