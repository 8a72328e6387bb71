"""The store's side of a job, whichever engine runs the model: each clip's latent file kept, each
source finished (its rows, in clip order) or failed, and the tally of it. The plain engine hands
these straight to a ``Keeper``; a Ray actor hands them to a ``Collector``, whose ``outcomes`` go
back to the driver, which hands them to its ``Keeper``: one writer, one store, either engine."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ivvae_cli.dataset.messages import SourceEnd
from ivvae_cli.dataset.sources import Source
from ivvae_cli.dataset.store import SourceRecord, Store, clip_key
from ivvae_cli.latent_file import LatentFile, LatentHeader

Sources = Sequence[Source] | Mapping[int, Source]  # by place in the work list


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


class Keeper:
    """Writes what a job makes through its store, and counts it."""

    def __init__(self, sources: Sources, store: Store, tally: Tally):
        self.sources, self.store, self.tally = sources, store, tally
        self.rows: dict[int, list[dict[str, Any]]] = {}

    def existing(self, index: int, name: str, header: LatentHeader) -> None:
        """A clip an earlier run kept (the files layout reuses them)."""
        source = self.sources[index]
        where = self.store.existing(source, name)
        self.rows.setdefault(index, []).append(index_row(source, name, header, where))
        self.tally.existing += 1

    def keep(self, index: int, name: str, data: LatentFile) -> None:
        source = self.sources[index]
        where = self.store.put(source, name, data, index_row(source, name, data.header, {}))
        self.rows.setdefault(index, []).append(index_row(source, name, data.header, where))
        self.tally.written += 1

    def finish(self, index: int, end: SourceEnd) -> None:
        rows = sorted(self.rows.pop(index, []), key=lambda row: row["start_frame"])  # batches may reorder them
        self.store.finish(self.sources[index], SourceRecord(rows, end.skipped, end.warnings))
        self.tally.done += 1
        self.tally.skipped += end.skipped is not None

    def fail(self, index: int, stage: str, reason: str) -> None:
        self.rows.pop(index, None)
        self.store.fail(self.sources[index], stage, reason)
        self.tally.failed += 1
        self.tally.done += 1

    def apply(self, outcome: Outcome) -> None:
        """What a ``Collector`` gathered, kept here."""
        if isinstance(outcome, Kept):
            self.keep(outcome.source, outcome.name, outcome.data)
        elif isinstance(outcome, Finished):
            self.finish(outcome.source, outcome.end)
        else:
            self.fail(outcome.source, outcome.stage, outcome.reason)


@dataclass(frozen=True)
class Kept:
    source: int
    name: str
    data: LatentFile


@dataclass(frozen=True)
class Finished:
    source: int
    end: SourceEnd


@dataclass(frozen=True)
class Failed:
    source: int
    stage: str
    reason: str


Outcome = Kept | Finished | Failed


class Collector:
    """A keeper that writes nothing: what it is handed, in order, for a ``Keeper`` elsewhere."""

    def __init__(self) -> None:
        self.tally = Tally()
        self.outcomes: list[Outcome] = []

    def keep(self, index: int, name: str, data: LatentFile) -> None:
        self.outcomes.append(Kept(index, name, data))

    def finish(self, index: int, end: SourceEnd) -> None:
        self.outcomes.append(Finished(index, end))

    def fail(self, index: int, stage: str, reason: str) -> None:
        self.outcomes.append(Failed(index, stage, reason))


def index_row(source: Source, name: str, header: LatentHeader, where: dict[str, Any]) -> dict[str, Any]:
    """A clip's index row: its key, where its latent is (``where``, as the store says), what it
    holds, and the manifest's columns."""
    clip = header.clip or {}
    lat = header.padded_size.latent()
    row = {
        "key": clip_key(source, name), **where,
        "id": source.id if source.id is not None else f"{source.name}#{clip.get('start_frame')}",
        "source": source.key, "source_path": str(source.path),
        "latent_shape": [header.z_dim, lat.frames, lat.height, lat.width], "start_frame": clip.get("start_frame"),
        "frames": header.source_frames, "frame_rate": header.frame_rate,
        "size": [header.source_width, header.source_height], "resized": clip.get("resized"), "crop": clip.get("crop"),
        "bucket": clip.get("bucket"), "posterior": header.posterior, "seconds": clip.get("seconds"),
    }  # fmt: skip
    return row | {(k if k not in row else f"manifest_{k}"): v for k, v in source.columns.items()}
