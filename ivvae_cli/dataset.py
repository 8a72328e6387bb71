"""Latent datasets: a video collection in, one latent file per clip and an index out, on as many
processes as there are devices; and a torch ``Dataset`` that reads them back for training.

The work list is the sorted sources (manifest rows, or the videos of a folder or glob). Process
``rank`` of ``world`` takes sources ``rank, rank + world, ...`` (torchrun's ``RANK``/``WORLD_SIZE``/
``LOCAL_RANK``, else SLURM's ``SLURM_PROCID``/``SLURM_NTASKS``/``SLURM_LOCALID``), so no process
ever waits on another. Every clip is written atomically, and a source is done when its record (the
index rows of its clips) is written, also atomically; a failed source leaves an error record
instead, which a later success removes. So a stopped job resumes where it stopped with any number
of processes, and whichever process finds every source accounted for writes the index.

Decoding, resizing and cropping run in worker processes (a torch ``DataLoader``) that hand the
model uint8 frames a piece at a time, so decoding overlaps the model and memory stays bounded
whatever the videos' lengths.
"""

from __future__ import annotations

import csv
import glob
import hashlib
import itertools
import json
import math
import os
import signal
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ivvae_cli.colour import Colour
from ivvae_cli.errors import InputError, IvvaeError, IvvaeWarning, OutputError, WriteError
from ivvae_cli.latent_file import (
    LatentFile,
    LatentHeader,
    glob_root,
    read_latent_file,
    read_latent_header,
    write_latent_file,
)
from ivvae_cli.model import SPATIAL_STRIDE, TEMPORAL_STRIDE, VideoSize
from ivvae_cli.outputs import atomic_output, check_writable, folder_guard, name_problem, place_under
from ivvae_cli.pipeline import MemoryOptions, encoded_fields
from ivvae_cli.stream import StreamEncoder
from ivvae_cli.video import VideoInfo, probe, read_frames, resized
from ivvae_cli.weights import LoadedModel

VIDEO_EXTENSIONS = frozenset(
    {".mp4", ".m4v", ".mkv", ".webm", ".mov", ".avi", ".mpg", ".mpeg", ".ts", ".mts", ".m2ts", ".264", ".h264",
     ".265", ".hevc", ".flv", ".wmv", ".ogv", ".3gp", ".y4m"}
)  # fmt: skip
CLIP_MODES = ("head", "chunk", "slide", "full")
POSTERIORS = ("mean", "sample", "both")
FORMAT_NAME = "ivvae-dataset"
FORMAT_VERSION = 1
PIECE_FRAMES = 32  # frames a worker hands the model at a time
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

    def share(self, count: int) -> range:
        """The indices of the work list this process takes."""
        return range(self.rank, count, self.size)

    def __str__(self) -> str:
        return f"rank {self.rank}/{self.size}"


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


# -- cutting clips ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClipOptions:
    """What decides the clips and their latents; its fingerprint guards resumption."""

    frames: int | None = 33  # per clip, 1 + 4k; None with mode "full"
    mode: str = "head"  # head: the first clip; chunk: consecutive; slide: every ``stride`` frames; full
    stride: int | None = None
    target_fps: Fraction | None = None  # frames dropped or repeated by timestamp to this rate
    short_side: int | None = None
    buckets: tuple[tuple[int, int], ...] = ()  # (width, height): nearest aspect, resized to cover, centre-cropped
    posterior: str = "mean"  # mean, sample, or both (mean and log variance stored)
    seed: int = 0  # with sample: noise seeded by (seed, source, clip start)

    def __post_init__(self) -> None:
        if self.mode not in CLIP_MODES:
            raise IvvaeError(f"clips are taken by {', '.join(CLIP_MODES)}; not '{self.mode}'")
        if self.mode == "full":
            if self.frames is not None:
                raise IvvaeError("--clips full takes whole videos: leave --frames out")
        elif self.frames is None or self.frames < 1 or (self.frames - 1) % TEMPORAL_STRIDE:
            hint = f"1 + {TEMPORAL_STRIDE}k"
            raise IvvaeError(f"frames per clip must be {hint} (e.g. 17, 33, 65), got {self.frames}")
        if self.mode == "slide" and (self.stride is None or self.stride < 1):
            raise IvvaeError("--clips slide needs --stride N: frames between clip starts")
        if self.mode != "slide" and self.stride is not None:
            raise IvvaeError("--stride is for --clips slide")
        if self.target_fps is not None and self.target_fps <= 0:
            raise IvvaeError(f"--target-fps must be positive, got {self.target_fps}")
        if self.buckets and self.short_side is not None:
            raise IvvaeError("give --buckets or --short-side, not both")
        for width, height in self.buckets:
            if width <= 0 or height <= 0 or width % SPATIAL_STRIDE or height % SPATIAL_STRIDE:
                raise IvvaeError(f"bucket {width}x{height}: sides must be positive multiples of {SPATIAL_STRIDE}")
        if self.posterior not in POSTERIORS:
            raise IvvaeError(f"--posterior is {', '.join(POSTERIORS)}; not '{self.posterior}'")

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(self.describe(), sort_keys=True).encode()).hexdigest()[:16]

    def describe(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self), default=str))


def parse_buckets(text: str) -> tuple[tuple[int, int], ...]:
    """``256x256,320x192`` -> ((256, 256), (320, 192))."""
    buckets = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        try:
            width, height = (int(v) for v in part.lower().split("x"))
        except ValueError:
            raise IvvaeError(f"not a bucket: '{part}' (use WIDTHxHEIGHT, e.g. 256x256)") from None
        buckets.append((width, height))
    return tuple(buckets)


@dataclass(frozen=True)
class Geometry:
    """How a source's frames become the model's: resized (bicubic, as ``--short-side`` resizes),
    then centre-cropped."""

    resized: tuple[int, int]  # width, height
    crop: tuple[int, int, int, int]  # left, top, width, height, in resized pixels
    bucket: tuple[int, int] | None

    @classmethod
    def plan(cls, width: int, height: int, options: ClipOptions) -> Geometry:
        if not options.buckets:
            size = resized(width, height, options.short_side)
            return cls(size, (0, 0, *size), None)
        aspect = math.log(width / height)
        bucket = min(options.buckets, key=lambda b: abs(math.log(b[0] / b[1]) - aspect))
        scale = max(bucket[0] / width, bucket[1] / height)  # cover the bucket, then crop the rest
        size = (max(bucket[0], round(width * scale)), max(bucket[1], round(height * scale)))
        left, top = (size[0] - bucket[0]) // 2, (size[1] - bucket[1]) // 2
        return cls(size, (left, top, *bucket), bucket)

    def apply(self, frames: np.ndarray) -> np.ndarray:
        left, top, width, height = self.crop
        if (width, height) == self.resized:
            return frames
        return np.ascontiguousarray(frames[:, top : top + height, left : left + width])


def _indexed_frames(
    source: Source, info: VideoInfo, geometry: Geometry, options: ClipOptions
) -> Iterator[tuple[int, np.ndarray, int]]:
    """``(frame index, frame, pts)`` over the source's span, resized and cropped. Indices count
    frames from the video's start at its average rate; with ``target_fps``, ticks of that rate, each
    taking the latest source frame at or before it (so frames drop or repeat)."""
    rate = Fraction(info.frame_rate)
    # Manifest numbers are decimals as written (0.56 s is 14/25, not the float nearest it).
    start_s, end_s = (
        None if v is None else Fraction(str(v)) / (rate if source.unit == "frames" else 1)
        for v in (source.start, source.end)
    )
    reader = read_frames(source.path, start=float(start_s or 0), chunk=8, size=geometry.resized, info=info)
    try:
        frames = (
            (frame, pts, pts * info.time_base)
            for chunk, stamps in reader
            for frame, pts in zip(geometry.apply(chunk), stamps, strict=True)
        )
        in_span = itertools.takewhile(lambda f: end_s is None or f[2] < end_s, frames)
        if not options.target_fps:
            for frame, pts, seconds in in_span:
                yield round(seconds * rate), frame, pts
            return
        tick = 1 / options.target_fps
        index, held = None, None
        for frame, _, seconds in in_span:
            index = math.ceil(seconds / tick) if index is None else index
            while held is not None and index * tick < seconds:
                yield index, held[0], round(index * tick / info.time_base)
                index += 1
            held = (frame, seconds)
        if held is None:
            return
        # The last frame lasts one source frame, up to the span's end.
        until = held[1] + 1 / rate if end_s is None else min(held[1] + 1 / rate, end_s)
        while index * tick < until:
            yield index, held[0], round(index * tick / info.time_base)
            index += 1
    finally:
        reader.close()


Piece = tuple[int, int | None, np.ndarray, list[int], bool]  # clip start and end indices, frames, pts, last


def clip_pieces(source: Source, options: ClipOptions, info: VideoInfo | None = None) -> Iterator[Piece]:
    """A source's clips in pieces of at most ``PIECE_FRAMES`` frames: ``(first frame index, last
    index + 1, frames (t, H, W, C), pts, last piece)``. head, chunk and slide clips are held until
    complete, so a clip that runs short never reaches the model (and head stops decoding after its
    clip); a ``full`` clip streams, since it always completes (its end is known with its last piece).
    ``info``: the source's ``probe``, when the caller has it."""
    info = info or probe(source.path)
    frames_in = _indexed_frames(source, info, Geometry.plan(info.width, info.height, options), options)
    if options.mode == "full":
        start, frames, pts, index = None, [], [], 0
        for index, frame, stamp in frames_in:
            start = index if start is None else start
            if len(frames) == PIECE_FRAMES:
                yield start, None, np.stack(frames), pts, False
                frames, pts = [], []
            frames.append(frame)
            pts.append(stamp)
        if frames:
            yield start, index + 1, np.stack(frames), pts, True
        return
    length = options.frames
    every = {"head": math.inf, "chunk": length, "slide": options.stride}[options.mode]
    open_clips: list[tuple[int, list[np.ndarray], list[int]]] = []
    for count, (index, frame, stamp) in enumerate(frames_in):
        if count % every == 0:  # head: only the first, as every is infinite
            open_clips.append((index, [], []))
        for _, frames, pts in open_clips:
            frames.append(frame)
            pts.append(stamp)
        while open_clips and len(open_clips[0][1]) == length:
            start, frames, pts = open_clips.pop(0)
            for at in range(0, length, PIECE_FRAMES):
                piece = np.stack(frames[at : at + PIECE_FRAMES])
                yield start, index + 1, piece, pts[at : at + PIECE_FRAMES], at + PIECE_FRAMES >= length
            if options.mode == "head":
                return


def clip_name(source: Source, options: ClipOptions, start: int, end: int | None) -> str:
    """A clip's file name: its first and last frame index + 1, or for a whole video, its span."""
    if options.mode == "full":
        return "full" if source.name == source.key else "full" + source.name[len(source.key) :]
    return f"f{start:07d}-{end:07d}"


# -- the job's records -------------------------------------------------------------------------------


class Layout:
    """Where a job keeps what it writes under its folder."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.spec = folder / "dataset.json"
        self.index = folder / "index.jsonl"
        self.errors = folder / "errors.jsonl"

    def latent(self, source: Source, name: str) -> Path:
        return place_under(self.folder, f"latents/{source.key}/{name}.latent")

    def record(self, source: Source) -> Path:
        """Written when every clip of ``source`` is: the index rows of its clips."""
        return place_under(self.folder, f"records/{source.name}.json")

    def failure(self, source: Source) -> Path:
        return place_under(self.folder, f"failures/{source.name}.json")


def _write_json(path: Path, value: Any) -> None:
    """Atomically, creating the folder; an existing file is replaced. No other process writes it
    meanwhile (or the caller holds ``folder_guard``), so its temporary has one name, and what a
    killed process left of it is replaced by the next write."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(path, force=True, sole_writer=True) as tmp:
        tmp.write_text(json.dumps(value, default=str) + "\n")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


@dataclass(frozen=True)
class JobSpec:
    """What a job's outputs were made with: resuming needs the same, or ``overwrite``."""

    source: str
    columns: Columns
    options: ClipOptions
    model: str
    weights_fingerprint: str

    @property
    def fingerprint(self) -> str:
        """Of what decides the latents: the clip options and the weights (not where sources are listed)."""
        return hashlib.sha256(f"{self.options.fingerprint()}:{self.weights_fingerprint}".encode()).hexdigest()[:16]

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT_NAME, "format_version": FORMAT_VERSION, "source": self.source,
            "columns": asdict(self.columns), "options": self.options.describe(), "model": self.model,
            "weights_fingerprint": self.weights_fingerprint, "fingerprint": self.fingerprint,
        }  # fmt: skip

    @classmethod
    def read(cls, folder: Path) -> JobSpec | None:
        """The job recorded in ``folder``; None where there is none; ``DamagedSpecError`` where its
        dataset.json is cut short or garbled (a crash on a network filesystem)."""
        path = Layout(folder).spec
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
                       str(raw["weights_fingerprint"]))  # fmt: skip
        except (TypeError, ValueError, KeyError, IvvaeError) as e:
            raise DamagedSpecError(f"{path} is cut short or garbled ({e.__class__.__name__})") from None
        if raw.get("fingerprint") != spec.fingerprint:
            raise DamagedSpecError(f"{path} is garbled (its settings do not give its fingerprint)")
        return spec


class DamagedSpecError(InputError):
    """A dataset.json that cannot be read back: ``encode`` writes it anew, ``merge`` refuses."""


def check_folder(folder: Path) -> None:
    """Fail in one line, before the model loads, when ``folder`` cannot take a dataset."""
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"output is not a folder: {folder}")
    if not folder.parent.is_dir():
        raise OutputError(f"output folder's parent does not exist: {folder.parent}")
    check_writable(folder if folder.is_dir() else folder.parent)


def prepare_folder(folder: Path, spec: JobSpec, overwrite: bool) -> None:
    """Refuse to mix options or weights in one folder (unless ``overwrite``), then record the job."""
    check_folder(folder)
    try:
        old = JobSpec.read(folder)
    except DamagedSpecError as e:  # nothing is lost: every record and latent carries the settings it was made with
        redone = "records and clips made with other settings are redone"
        warnings.warn(f"{e}: written anew; {redone}", IvvaeWarning, stacklevel=2)
        old = None
    if old is not None and old.fingerprint != spec.fingerprint and not overwrite:
        changed = [k for k, v in asdict(spec.options).items() if getattr(old.options, k) != v]
        if old.weights_fingerprint != spec.weights_fingerprint:
            changed.append(f"weights ({old.model} {old.weights_fingerprint} before)")
        raise OutputError(
            f"{folder} holds latents made with other settings ({', '.join(changed)}); "
            "use the same options, another folder, or --overwrite"
        )
    folder.mkdir(exist_ok=True)
    with folder_guard(folder):  # every process writes it alike, one at a time
        _write_json(Layout(folder).spec, spec.to_json())


def _record(layout: Layout, source: Source, fingerprint: str) -> dict | None:
    """The source's record, if it is done with this job's settings; a record cut short or garbled
    (a crash on a network filesystem) is none, and its source is done again."""
    record = _read_json(layout.record(source))
    if not isinstance(record, dict) or record.get("fingerprint") != fingerprint:
        return None
    rows, skipped, warned = record.get("rows"), record.get("skipped"), record.get("warnings", [])
    if not isinstance(rows, list) or not isinstance(skipped, str | None) or not isinstance(warned, list):
        return None
    for row in rows:
        latent = row.get("latent") if isinstance(row, dict) else None
        if not isinstance(latent, str) or not latent.startswith("latents/") or name_problem(latent) is not None:
            return None
    return record


def _sizes(layout: Layout, rows: list[dict]) -> list[int]:
    return [(layout.folder / row["latent"]).stat().st_size for row in rows]


def _whole(layout: Layout, record: dict) -> bool:
    """Whether every clip a record lists is there at the size it says (a stat each: a clip torn by
    a crash on a network filesystem is found without reading it)."""
    try:
        sizes = _sizes(layout, record["rows"])
    except OSError:
        return False
    return record.get("bytes", sizes) == sizes


def merge_index(folder: Path, sources: list[Source] | None = None) -> dict[str, int]:
    """Join the records of every source into ``index.jsonl`` (and ``index.parquet`` when pyarrow is
    installed) and the failures into ``errors.jsonl``, in work-list order. Returns the counts."""
    try:
        spec = JobSpec.read(folder)
    except DamagedSpecError as e:
        raise InputError(f"{e}: run the encode command again, which writes it anew, then merge") from None
    if spec is None:
        raise InputError(f"{folder} holds no ivvae dataset (no dataset.json)")
    sources = sources if sources is not None else read_sources(spec.source, spec.columns)
    layout = Layout(folder)
    rows, errors, pending, skipped, warned = [], [], 0, 0, 0
    for source in sources:
        record = _record(layout, source, spec.fingerprint)
        if record is not None:
            rows += record["rows"]
            skipped += record.get("skipped") is not None
            warned += bool(record.get("warnings"))
            continue
        failure = _read_json(layout.failure(source))
        if isinstance(failure, dict):
            errors.append(failure)
        else:
            pending += 1
    with folder_guard(folder):  # the last processes of a job may merge at once: one at a time
        for path, items in ((layout.index, rows), (layout.errors, errors)):
            with atomic_output(path, force=True, sole_writer=True) as tmp:
                tmp.write_text("".join(json.dumps(item, default=str) + "\n" for item in items))
        parquet = _write_parquet(folder / "index.parquet", rows)
    return {"clips": len(rows), "sources_failed": len(errors), "sources_pending": pending,
            "sources_skipped": skipped, "sources_warned": warned, "parquet": parquet}  # fmt: skip


def _write_parquet(path: Path, rows: list[dict]) -> bool:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        return False
    with atomic_output(path, force=True, sole_writer=True) as tmp:
        pq.write_table(pa.Table.from_pylist(rows), tmp)
    return True


def _complete(layout: Layout, sources: list[Source]) -> bool:
    """Whether every source has a record or a failure (the last process to finish writes the index).
    Existence alone, cheap over millions: ``merge_index`` checks each record's settings."""
    return all(layout.record(s).exists() or layout.failure(s).exists() for s in sources)


# -- decoding, in worker processes -----------------------------------------------------------------


class _ClipReader(IterableDataset):
    """This process's sources decoded into clip pieces by DataLoader workers (worker w of n takes
    every n-th source), as messages for the model's process: ``piece``, ``exists`` (a clip written
    by an earlier run), ``end`` (a source done) and ``failed``."""

    def __init__(self, todo: list[tuple[int, Source]], options: ClipOptions, layout: Layout, fingerprint: str):
        self.todo, self.options, self.layout, self.fingerprint = todo, options, layout, fingerprint

    def __iter__(self) -> Iterator[dict[str, Any]]:
        worker = get_worker_info()
        if worker is not None:
            torch.set_num_threads(1)  # decoding is the workers' work; the model has the process's threads
        for index, source in self.todo if worker is None else self.todo[worker.id :: worker.num_workers]:
            yield from self._source(index, source)

    def _source(self, index: int, source: Source) -> Iterator[dict[str, Any]]:
        """One source's messages; what ivvae warns of while reading it (e.g. broken timestamps
        replaced by the declared rate) goes into its record instead of the terminal."""
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", IvvaeWarning)
            yield from self._pieces(index, source, caught)

    def _pieces(self, index: int, source: Source, caught: list) -> Iterator[dict[str, Any]]:
        clips, done = 0, None
        if source.problem is not None:
            yield {"kind": "failed", "source": index, "stage": "output", "reason": source.problem}
            return
        try:
            info = probe(source.path)
            geometry = Geometry.plan(info.width, info.height, self.options)
            rate = self.options.target_fps or Fraction(info.frame_rate)
            about = {  # what every piece of this source carries
                "rate": str(rate), "time_base": str(info.time_base), "geometry": asdict(geometry),
                "source_size": [info.width, info.height], "colour": asdict(info.colour), "bit_depth": info.bit_depth,
            }  # fmt: skip
            skip: str | None = None
            for start, end, frames, pts, last in clip_pieces(source, self.options, info):
                name = clip_name(source, self.options, start, end)
                if name != skip and name != done:
                    header = self._existing(source, name)
                    skip = name if header is not None else None
                    if skip is not None:
                        yield {"kind": "exists", "source": index, "name": name, "header": header}
                if name == skip:
                    clips += last
                    continue
                done = name if last else None
                clips += last
                yield {
                    "kind": "piece", "source": index, "name": name, "start": start,
                    "frames": torch.from_numpy(frames if frames.dtype == np.uint8 else frames.astype(np.int32)),
                    "scale": float(np.iinfo(frames.dtype).max), "pts": torch.tensor(pts, dtype=torch.int64),
                    "last": last, **about,
                }  # fmt: skip
        except IvvaeError as e:
            yield {"kind": "failed", "source": index, "stage": "decode", "reason": str(e)}
            return
        except Exception as e:  # a damaged file can fail deep in a decoder with any error
            yield {"kind": "failed", "source": index, "stage": "decode", "reason": f"{e.__class__.__name__}: {e}"}
            return
        short = None
        if clips == 0:
            needs = "a frame" if self.options.mode == "full" else f"{self.options.frames} frames"
            short = f"too short: no clip of {needs} in its span"
        said = list(dict.fromkeys(str(w.message) for w in caught if issubclass(w.category, IvvaeWarning)))
        yield {"kind": "end", "source": index, "skipped": short, "warnings": said}

    def _existing(self, source: Source, name: str) -> LatentHeader | None:
        """The header of this clip's latent if an earlier run wrote it with the same settings (a
        resumed job)."""
        path = self.layout.latent(source, name)
        if not path.is_file():
            return None
        try:
            header = read_latent_header(path)
        except IvvaeError:
            return None
        clip = header.clip
        return header if isinstance(clip, dict) and clip.get("job") == self.fingerprint else None


# -- encoding, in the model's process --------------------------------------------------------------


@dataclass
class Tally:
    """What this process has done of its share of the work list."""

    sources: int = 0  # in its share
    done: int = 0  # finished, now or by an earlier run
    written: int = 0  # clips encoded now
    existing: int = 0  # clips an earlier run wrote
    skipped: int = 0  # sources with no clip (too short)
    failed: int = 0
    model_seconds: float = 0.0  # inside the model (and moving frames to it)
    started: float = field(default_factory=time.perf_counter)

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.started

    @property
    def clips_per_s(self) -> float:
        return self.written / max(self.seconds, 1e-9)

    @property
    def model_busy(self) -> float:
        """The share of the wall time spent in the model."""
        return self.model_seconds / max(self.seconds, 1e-9)


@dataclass
class _OpenStream:
    stream: StreamEncoder
    started: float
    seed: int | None  # with --posterior sample: the clip's noise seed
    parts: list = field(default_factory=list)
    pts: list[int] = field(default_factory=list)


def clip_seed(seed: int, source: Source, start: int) -> int:
    """The noise seed of a sampled clip: the same whichever process encodes it, and however often."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{source.name}:{start}".encode()).digest()[:4], "big") >> 1


def encode_dataset(
    sources: list[Source],
    folder: Path,
    loaded: LoadedModel,
    spec: JobSpec,
    *,
    world: World | None = None,
    memory: MemoryOptions | None = None,
    workers: int = 2,
    progress: Callable[[Tally], None] | None = None,
) -> tuple[Tally, dict[str, int] | None]:
    """Encode this process's share of ``sources`` into ``folder`` (``prepare_folder`` first).
    Returns what it did, and the index's counts when it found every source accounted for and so
    wrote the index."""
    world = world or World()
    layout = Layout(folder)
    share = [(i, sources[i]) for i in world.share(len(sources))]
    tally = Tally(sources=len(share))
    todo = []
    for i, source in share:
        record = _record(layout, source, spec.fingerprint)
        if record is not None and not _whole(layout, record):
            record = None  # a clip it lists is gone or cut short: the source is done again
        if record is None:
            todo.append((i, source))
        else:
            tally.done += 1
            tally.skipped += record.get("skipped") is not None
    job = _Job(sources, layout, loaded, spec, memory or MemoryOptions(), max(1, workers), tally)
    loader = DataLoader(
        _ClipReader(todo, spec.options, layout, spec.fingerprint), batch_size=None, num_workers=workers,
        pin_memory=job.device.type == "cuda", prefetch_factor=4 if workers else None, worker_init_fn=_quiet_worker,
    )  # fmt: skip
    with _StopOnSigterm(), torch.inference_mode():
        for message in loader if todo else ():
            job.take(message)
            if progress:
                progress(tally)
    merged = merge_index(folder, sources) if _complete(layout, sources) else None
    return tally, merged


class _Job:
    """The model's side of ``encode_dataset``: one stream per clip in flight, written when it ends."""

    def __init__(self, sources, layout, loaded, spec, memory, streams, tally):
        self.sources, self.layout, self.loaded, self.spec = sources, layout, loaded, spec
        self.memory, self.streams, self.tally = memory, streams, tally
        self.open: dict[tuple[int, str], _OpenStream] = {}
        self.rows: dict[int, list[dict]] = {}
        self.failed: set[int] = set()
        self.device = next(loaded.model.parameters()).device

    def take(self, message: dict[str, Any]) -> None:
        index, kind = message["source"], message["kind"]
        source = self.sources[index]
        if index in self.failed:
            if kind == "end":
                self.failed.discard(index)
            return
        try:
            if kind == "piece":
                self._piece(index, source, message)
            elif kind == "exists":
                path = self.layout.latent(source, message["name"])
                self.rows.setdefault(index, []).append(_row(source, message["header"], path, self.layout))
                self.tally.existing += 1
            elif kind == "end":
                rows = self.rows.pop(index, [])
                _write_json(self.layout.record(source), {"fingerprint": self.spec.fingerprint, "rows": rows,
                                                         "bytes": _sizes(self.layout, rows),
                                                         "skipped": message["skipped"],
                                                         "warnings": message["warnings"]})  # fmt: skip
                self.layout.failure(source).unlink(missing_ok=True)
                self.tally.done += 1
                self.tally.skipped += message["skipped"] is not None
            else:
                self._fail(index, source, message["stage"], message["reason"])
        except WriteError:  # the disk, not the source: every later write would fail too
            raise
        except IvvaeError as e:
            self._fail(index, source, "encode", str(e))

    def _fail(self, index: int, source: Source, stage: str, reason: str) -> None:
        for key in [k for k in self.open if k[0] == index]:
            del self.open[key]
        self.rows.pop(index, None)
        if stage == "encode":  # the worker goes on sending this source's pieces: ignore them until its end
            self.failed.add(index)
        _write_json(self.layout.failure(source), {"path": str(source.path), "source": source.name,
                                                  "stage": stage, "reason": reason.splitlines()[0]})  # fmt: skip
        self.tally.failed += 1
        self.tally.done += 1

    def _piece(self, index: int, source: Source, message: dict[str, Any]) -> None:
        key = (index, message["name"])
        started = time.perf_counter()
        opened = self.open.get(key)
        if opened is None:
            opened = self.open[key] = self._stream(source, message)
        frames = message["frames"].to(self.device, non_blocking=True)
        video = frames.float().div_(message["scale"]).mul_(2).sub_(1).permute(3, 0, 1, 2).unsqueeze(0)
        opened.parts.append(opened.stream.push(video))
        opened.pts += message["pts"].tolist()
        if not message["last"]:
            self.tally.model_seconds += time.perf_counter() - started
            return
        del self.open[key]
        opened.parts.append(opened.stream.finish())
        both = self.spec.options.posterior == "both"
        latent = torch.cat([p.mean if both else p for p in opened.parts], dim=2).cpu()
        logvar = torch.cat([p.logvar for p in opened.parts], dim=2).cpu() if both else None
        self.tally.model_seconds += time.perf_counter() - started
        bad = int((~latent.isfinite()).sum()) + (0 if logvar is None else int((~logvar.isfinite()).sum()))
        if bad:
            raise IvvaeError(f"clip {message['name']}: the latent has {bad} NaN or infinite values; not written")
        header = self._header(source, message, opened, time.perf_counter() - opened.started)
        path = self.layout.latent(source, message["name"])
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_output(path, force=True, sole_writer=True) as tmp:
            pts = np.asarray(opened.pts, dtype=np.int64)
            write_latent_file(tmp, LatentFile(header, latent, pts - pts[0], None, logvar))
        self.rows.setdefault(index, []).append(_row(source, header, path, self.layout))
        self.tally.written += 1

    def _stream(self, source: Source, message: dict[str, Any]) -> _OpenStream:
        crop = message["geometry"]["crop"]
        padded = VideoSize(1, crop[3], crop[2]).padded()
        groups, tiling = self.memory.plan(self.loaded, padded.height, padded.width, "encode", share=1 / self.streams)
        options = self.spec.options
        seed = clip_seed(options.seed, source, message["start"]) if options.posterior == "sample" else None
        generator = None if seed is None else torch.Generator(self.device).manual_seed(seed)
        stream = StreamEncoder(
            self.loaded.model, sample=options.posterior == "sample", generator=generator,
            groups_per_step=groups, tiling=tiling, with_logvar=options.posterior == "both",
        )  # fmt: skip
        return _OpenStream(stream, time.perf_counter(), seed)

    def _header(self, source: Source, message: dict[str, Any], opened: _OpenStream, seconds: float) -> LatentHeader:
        options, size, geometry = self.spec.options, opened.stream.size, message["geometry"]
        time_base = Fraction(message["time_base"])
        bucket = geometry["bucket"]
        colour = Colour(**message["colour"])
        return LatentHeader(
            **encoded_fields(self.loaded, opened.stream, colour, message["bit_depth"]),
            source_name=source.path.name, frame_rate=message["rate"], time_base=str(time_base),
            start_time=float(opened.pts[0] * time_base), posterior=options.posterior, seed=opened.seed,
            clip={
                "source": source.key, "id": source.id, "start_frame": message["start"],
                "end_frame": message["start"] + size.frames if options.mode != "full" else None,
                "source_size": message["source_size"], "resized": geometry["resized"], "crop": geometry["crop"],
                "bucket": None if bucket is None else f"{bucket[0]}x{bucket[1]}", "job": self.spec.fingerprint,
                "seconds": round(seconds, 3),
            },
        )  # fmt: skip


def _row(source: Source, header: LatentHeader, path: Path, layout: Layout) -> dict[str, Any]:
    """A clip's index row: where its latent is, what it holds, and the manifest's columns."""
    clip = header.clip or {}
    lat = header.padded_size.latent()
    row = {
        "id": source.id if source.id is not None else f"{source.name}#{clip.get('start_frame')}",
        "source": source.key, "source_path": str(source.path), "latent": path.relative_to(layout.folder).as_posix(),
        "latent_shape": [header.z_dim, lat.frames, lat.height, lat.width], "start_frame": clip.get("start_frame"),
        "frames": header.source_frames, "frame_rate": header.frame_rate,
        "size": [header.source_width, header.source_height], "resized": clip.get("resized"), "crop": clip.get("crop"),
        "bucket": clip.get("bucket"), "posterior": header.posterior, "seconds": clip.get("seconds"),
    }  # fmt: skip
    return row | {(k if k not in row else f"manifest_{k}"): v for k, v in source.columns.items()}


def _quiet_worker(worker_id: int) -> None:
    """A decoding worker whose parent stopped reading (Ctrl-C, SIGTERM) has nothing to report: the
    thread that hands frames over would otherwise print the broken connection's traceback."""

    def hook(kind, value, traceback) -> None:
        if not issubclass(kind, ConnectionError):
            sys.__excepthook__(kind, value, traceback)

    sys.excepthook = hook


class _StopOnSigterm:
    """SIGTERM (a preempted cluster job) stops the work as Ctrl-C does: cleanly, resumable."""

    def __enter__(self) -> None:
        self.previous = signal.getsignal(signal.SIGTERM)
        try:
            signal.signal(signal.SIGTERM, self._raise)
        except ValueError:  # not the main thread: leave signals alone
            self.previous = None

    def __exit__(self, *error) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)

    @staticmethod
    def _raise(signum, frame) -> None:
        raise KeyboardInterrupt


# -- reading a dataset back --------------------------------------------------------------------------


class LatentDataset(torch.utils.data.Dataset):
    """The clips of a latent dataset folder, by its ``index.jsonl``, as training examples.

    Each item is ``{"latent": (z_dim, T', h, w), "metadata": index row}`` (the row holds the
    manifest's columns too). With posterior ``both`` and ``sample``, ``latent`` is a fresh draw
    ``mean + scale * exp(logvar / 2) * noise`` at every access (a new sample each epoch), and
    ``mean`` and ``logvar`` are given as well. ``bucket`` (``"256x256"``) keeps one bucket's clips,
    whose latents share a shape and so batch together. ``collate`` batches items for a DataLoader.
    """

    def __init__(self, folder: str | Path, *, bucket: str | None = None, sample: bool = False):
        self.folder = Path(folder)
        index = self.folder / "index.jsonl"
        if not index.is_file():
            raise InputError(f"{self.folder} has no index.jsonl (run `ivvae dataset merge {self.folder}`)")
        rows = []
        for number, line in enumerate(index.read_text().splitlines(), 1):
            try:
                row = json.loads(line) if line.strip() else None
            except ValueError:
                row = ""
            if row is not None and not (isinstance(row, dict) and name_problem(str(row.get("latent", ""))) is None):
                merge = f"`ivvae dataset merge {self.folder}` rewrites it"
                raise InputError(f"{index} is damaged at line {number}: {merge}")
            if row is not None:
                rows.append(row)
        self.rows = [r for r in rows if bucket is None or r.get("bucket") == bucket]
        self.sample = sample

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, Any]:
        row = self.rows[i]
        data = read_latent_file(self.folder / row["latent"])
        item = {"latent": data.latent[0], "metadata": row}
        if data.logvar is not None:
            item |= {"mean": data.latent[0], "logvar": data.logvar[0]}
            if self.sample:
                noise = torch.randn_like(data.latent[0])
                item["latent"] = data.latent[0] + data.header.scale_factor * torch.exp(0.5 * data.logvar[0]) * noise
        elif self.sample:
            raise InputError(f"{row['latent']} holds no log variance: sampling needs --posterior both")
        return item

    @staticmethod
    def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
        """Tensors stacked, metadata as a list of rows."""
        batch = {k: torch.stack([item[k] for item in items]) for k in items[0] if k != "metadata"}
        return batch | {"metadata": [item["metadata"] for item in items]}
