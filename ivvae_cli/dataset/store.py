"""The store: where a job keeps its latents, its records of what is done, its failures and its index."""

from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import asdict, dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

from ivvae_cli.dataset.clips import ClipOptions
from ivvae_cli.dataset.sources import Columns, Source, read_sources
from ivvae_cli.errors import InputError, IvvaeError, IvvaeWarning, OutputError
from ivvae_cli.outputs import atomic_output, check_writable, folder_guard, name_problem, place_under

FORMAT_NAME = "ivvae-dataset"
FORMAT_VERSION = 1
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
