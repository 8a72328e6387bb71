"""The store: where a job keeps its clips, its records of which sources are done, its failures, and
its index.

Two layouts behind one interface, ``Store``: ``files`` (``FileStore``: a latent file per clip, a
record per source) and ``shards`` (``ivvae_cli.dataset.shards``: tar files of about a gigabyte with
an index part each). The job calls ``records`` to find what is done, ``put`` for each clip,
``finish`` or ``fail`` for each source and ``close`` at the end, and never learns which it writes
to. Failures are a file per source in both layouts (they are few, and a later success removes
them); ``merge_index`` joins either layout's records into ``index.jsonl`` and ``index.parquet``.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, ClassVar

from ivvae_cli.dataset.sources import Source, read_sources
from ivvae_cli.dataset.spec import DamagedSpecError, JobSpec, read_json, write_json
from ivvae_cli.errors import InputError
from ivvae_cli.latent_file import LatentFile, write_latent_file
from ivvae_cli.outputs import atomic_output, folder_guard, name_problem, place_under


@dataclass(frozen=True)
class SourceRecord:
    """A source done: the index rows of its clips, or why it has none."""

    rows: list[dict[str, Any]]
    skipped: str | None = None  # why it gave no clip (too short)
    warnings: tuple[str, ...] = ()

    @classmethod
    def read(cls, raw: Any, row_ok: Callable[[dict[str, Any]], bool]) -> SourceRecord | None:
        """A record as stored (a record file, an index part's entry); None where it is cut short or
        garbled (a crash on a network filesystem) or a row fails ``row_ok``: its source is done again."""
        if not isinstance(raw, dict):
            return None
        rows, skipped, warned = raw.get("rows"), raw.get("skipped"), raw.get("warnings", [])
        if not isinstance(rows, list) or not isinstance(skipped, str | None) or not isinstance(warned, list):
            return None
        if not all(located(row) and row_ok(row) for row in rows):
            return None
        return cls(rows, skipped, tuple(map(str, warned)))


def located(row: Any) -> bool:
    """Whether an index row says where its clip is in a form that stays inside the folder: a latent
    file under latents/, or a byte range of a tar under shards/."""
    if not isinstance(row, dict):
        return False
    if "shard" in row:
        shard = row["shard"]
        return (
            isinstance(shard, str) and shard.startswith("shards/") and name_problem(shard) is None
            and all(isinstance(row.get(k), int) and row[k] >= 0 for k in ("offset", "length"))
        )  # fmt: skip
    latent = row.get("latent")
    return isinstance(latent, str) and latent.startswith("latents/") and name_problem(latent) is None


def clip_key(source: Source, name: str) -> str:
    """A clip's key, unique in the dataset: its source's key, then its name."""
    return f"{source.key}/{name}"


class Store(ABC):
    """Where one process of a job puts its clips and records, in one layout."""

    layout: ClassVar[str]

    def __init__(self, folder: Path, fingerprint: str):
        self.folder, self.fingerprint = folder, fingerprint

    @abstractmethod
    def records(self, sources: Iterable[Source]) -> dict[str, SourceRecord]:
        """The records of those of ``sources`` done with this job's settings, by source name; one
        whose clips are not all there whole counts as not done."""

    @abstractmethod
    def put(self, source: Source, name: str, data: LatentFile, row: dict[str, Any]) -> dict[str, Any]:
        """Keep a clip (``row``: its index row, less where it is); returns where it is, the fields
        its index row begins with."""

    @abstractmethod
    def finish(self, source: Source, record: SourceRecord) -> None:
        """Every clip of ``source`` is put: it is done once this is kept."""

    @abstractmethod
    def accounted(self, sources: Iterable[Source]) -> bool:
        """Whether every one of ``sources`` is done or failed, by what is cheapest to look at."""

    def existing(self, source: Source, name: str) -> dict[str, Any] | None:
        """Where a clip an earlier run kept is, to reuse it; None where clips are not reused."""
        return None

    def reusable(self) -> FileLayout | None:
        """What decoding workers look in for clips an earlier run kept (picklable); None if none."""
        return None

    @abstractmethod
    def close(self) -> None:
        """What is finished stays; called when the job ends or is stopped (Ctrl-C, SIGTERM)."""

    @abstractmethod
    def abandon(self) -> None:
        """The job failed: leave nothing that looks finished but is not."""

    def __enter__(self) -> Store:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None):
        if kind is None or issubclass(kind, KeyboardInterrupt):
            self.close()
        else:
            self.abandon()

    def failure_path(self, source: Source) -> Path:
        return place_under(self.folder, f"failures/{source.name}.json")

    def fail(self, source: Source, stage: str, reason: str) -> None:
        failure = {"path": str(source.path), "source": source.name, "stage": stage, "reason": reason.splitlines()[0]}
        write_json(self.failure_path(source), failure)

    def failure(self, source: Source) -> dict[str, Any] | None:
        failure = read_json(self.failure_path(source))
        return failure if isinstance(failure, dict) else None


class FileLayout:
    """Where the files layout keeps a clip: picklable, for the decoding workers."""

    def __init__(self, folder: Path):
        self.folder = folder

    def latent(self, source: Source, name: str) -> Path:
        return place_under(self.folder, f"latents/{source.key}/{name}.latent")


class FileStore(Store):
    """A latent file per clip under ``latents/``, and per source a record under ``records/``
    (written when every clip of it is: the index rows of its clips and their sizes)."""

    layout = "files"

    def __init__(self, folder: Path, fingerprint: str):
        super().__init__(folder, fingerprint)
        self.paths = FileLayout(folder)

    def record_path(self, source: Source) -> Path:
        return place_under(self.folder, f"records/{source.name}.json")

    def records(self, sources: Iterable[Source]) -> dict[str, SourceRecord]:
        records = {}
        for source in sources:
            raw = read_json(self.record_path(source))
            record = self._record(raw)
            if record is not None and self._whole(record, raw.get("bytes")):
                records[source.name] = record
        return records

    def _record(self, raw: Any) -> SourceRecord | None:
        if not isinstance(raw, dict) or raw.get("fingerprint") != self.fingerprint:
            return None
        return SourceRecord.read(raw, lambda row: "shard" not in row)

    def _sizes(self, rows: list[dict[str, Any]]) -> list[int]:
        return [(self.folder / row["latent"]).stat().st_size for row in rows]

    def _whole(self, record: SourceRecord, sizes: Any) -> bool:
        """Whether every clip a record lists is there at the size it says (a stat each: a clip torn by
        a crash on a network filesystem is found without reading it)."""
        try:
            found = self._sizes(record.rows)
        except OSError:
            return False
        return sizes is None or sizes == found

    def existing(self, source: Source, name: str) -> dict[str, Any]:
        return {"latent": self.paths.latent(source, name).relative_to(self.folder).as_posix()}

    def reusable(self) -> FileLayout:
        return self.paths

    def put(self, source: Source, name: str, data: LatentFile, row: dict[str, Any]) -> dict[str, Any]:
        path = self.paths.latent(source, name)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_output(path, force=True, sole_writer=True) as tmp:
            write_latent_file(tmp, data)
        return self.existing(source, name)

    def finish(self, source: Source, record: SourceRecord) -> None:
        write_json(self.record_path(source), {
            "fingerprint": self.fingerprint, "rows": record.rows, "bytes": self._sizes(record.rows),
            "skipped": record.skipped, "warnings": list(record.warnings),
        })  # fmt: skip
        self.failure_path(source).unlink(missing_ok=True)

    def close(self) -> None:
        """Every clip and record was written whole as it came: nothing is open."""

    def abandon(self) -> None:
        """Every clip and record was written whole as it came: nothing is open."""

    def accounted(self, sources: Iterable[Source]) -> bool:
        """Existence alone, cheap over millions: ``merge_index`` checks each record's settings."""
        return all(self.record_path(s).exists() or self.failure_path(s).exists() for s in sources)


def open_store(folder: Path, spec: JobSpec, rank: int = 0) -> Store:
    """The store of ``spec``'s layout in ``folder``, for process ``rank``."""
    if spec.storage.layout == "shards":
        from ivvae_cli.dataset.shards import ShardStore  # it imports this module

        return ShardStore(folder, spec.fingerprint, spec.storage.shard_size, rank)
    return FileStore(folder, spec.fingerprint)


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
    store = open_store(folder, spec)
    records = store.records(sources)
    rows, errors, pending, skipped, warned = [], [], 0, 0, 0
    for source in sources:
        record = records.get(source.name)
        if record is not None:
            rows += record.rows
            skipped += record.skipped is not None
            warned += bool(record.warnings)
            continue
        failure = store.failure(source)
        if failure is not None:
            errors.append(failure)
        else:
            pending += 1
    with folder_guard(folder):  # the last processes of a job may merge at once: one at a time
        for path, items in ((folder / "index.jsonl", rows), (folder / "errors.jsonl", errors)):
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
