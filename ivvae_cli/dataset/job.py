"""Running this process's share: the model's side, one stream per clip in flight, written when it ends."""

from __future__ import annotations

import hashlib
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from ivvae_cli.dataset.decoding import _ClipReader, _quiet_worker
from ivvae_cli.dataset.messages import ClipDone, FramePiece, Message, SourceEnd, reader_stops
from ivvae_cli.dataset.sources import Source, World
from ivvae_cli.dataset.spec import JobSpec
from ivvae_cli.dataset.store import SourceRecord, Store, clip_key, merge_index, open_store
from ivvae_cli.errors import IvvaeError, WriteError
from ivvae_cli.latent_file import (
    LatentFile,
    LatentHeader,
)
from ivvae_cli.model import VideoSize
from ivvae_cli.pipeline import MemoryOptions, encoded_fields
from ivvae_cli.stream import StreamEncoder
from ivvae_cli.weights import LoadedModel

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
    share = world.share(sources, spec.work_units)
    tally = Tally(sources=len(share))
    with open_store(folder, spec, world.rank) as store:
        done = store.records(source for _, source in share)
        todo = [(i, source) for i, source in share if source.name not in done]
        tally.done = len(done)
        tally.skipped = sum(record.skipped is not None for record in done.values())
        job = _Job(sources, store, loaded, spec, memory or MemoryOptions(), max(1, workers), tally)
        loader = DataLoader(
            _ClipReader(todo, spec.options, store.reusable(), spec.fingerprint), batch_size=None, num_workers=workers,
            pin_memory=job.device.type == "cuda", prefetch_factor=4 if workers else None, worker_init_fn=_quiet_worker,
        )  # fmt: skip
        with _StopOnSigterm(), torch.inference_mode():
            for message in loader if todo else ():
                job.take(message)
                if progress:
                    progress(tally)
    merged = merge_index(folder, sources) if store.accounted(sources) else None
    return tally, merged


class _Job:
    """The model's side of ``encode_dataset``: one stream per clip in flight, written when it ends."""

    def __init__(self, sources: list[Source], store: Store, loaded: LoadedModel, spec: JobSpec,
                 memory: MemoryOptions, streams: int, tally: Tally):  # fmt: skip
        self.sources, self.store, self.loaded, self.spec = sources, store, loaded, spec
        self.memory, self.streams, self.tally = memory, streams, tally
        self.open: dict[tuple[int, str], _OpenStream] = {}
        self.rows: dict[int, list[dict]] = {}
        self.failed: set[int] = set()
        self.device = next(loaded.model.parameters()).device

    def take(self, message: Message) -> None:
        index = message.source
        source = self.sources[index]
        if index in self.failed:  # the reader goes on after a failure here: drop the rest of the source
            if isinstance(message, SourceEnd):
                self.failed.discard(index)
            return
        try:
            if isinstance(message, FramePiece):
                self._piece(index, source, message)
            elif isinstance(message, ClipDone):
                where = self.store.existing(source, message.name)
                self.rows.setdefault(index, []).append(_row(source, message.name, message.header, where))
                self.tally.existing += 1
            elif isinstance(message, SourceEnd):
                record = SourceRecord(self.rows.pop(index, []), message.skipped, message.warnings)
                self.store.finish(source, record)
                self.tally.done += 1
                self.tally.skipped += message.skipped is not None
            else:
                self._fail(index, source, message.stage, message.reason)
        except WriteError:  # the disk, not the source: every later write would fail too
            raise
        except IvvaeError as e:
            self._fail(index, source, "encode", str(e))

    def _fail(self, index: int, source: Source, stage: str, reason: str) -> None:
        for key in [k for k in self.open if k[0] == index]:
            del self.open[key]
        self.rows.pop(index, None)
        if not reader_stops(stage):
            self.failed.add(index)
        self.store.fail(source, stage, reason)
        self.tally.failed += 1
        self.tally.done += 1

    def _piece(self, index: int, source: Source, message: FramePiece) -> None:
        key = (index, message.name)
        started = time.perf_counter()
        opened = self.open.get(key)
        if opened is None:
            opened = self.open[key] = self._stream(source, message)
        frames = message.frames.to(self.device, non_blocking=True)
        video = frames.float().div_(message.scale).mul_(2).sub_(1).permute(3, 0, 1, 2).unsqueeze(0)
        opened.parts.append(opened.stream.push(video))
        opened.pts += message.pts.tolist()
        if not message.last:
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
            raise IvvaeError(f"clip {message.name}: the latent has {bad} NaN or infinite values; not written")
        header = self._header(source, message, opened, time.perf_counter() - opened.started)
        pts = np.asarray(opened.pts, dtype=np.int64)
        data = LatentFile(header, latent, pts - pts[0], None, logvar)
        where = self.store.put(source, message.name, data, _row(source, message.name, header, {}))
        self.rows.setdefault(index, []).append(_row(source, message.name, header, where))
        self.tally.written += 1

    def _stream(self, source: Source, message: FramePiece) -> _OpenStream:
        crop = message.facts.geometry.crop
        padded = VideoSize(1, crop[3], crop[2]).padded()
        groups, tiling = self.memory.plan(self.loaded, padded.height, padded.width, "encode", share=1 / self.streams)
        options = self.spec.options
        seed = clip_seed(options.seed, source, message.start) if options.posterior == "sample" else None
        generator = None if seed is None else torch.Generator(self.device).manual_seed(seed)
        stream = StreamEncoder(
            self.loaded.model, sample=options.posterior == "sample", generator=generator,
            groups_per_step=groups, tiling=tiling, with_logvar=options.posterior == "both",
        )  # fmt: skip
        return _OpenStream(stream, time.perf_counter(), seed)

    def _header(self, source: Source, message: FramePiece, opened: _OpenStream, seconds: float) -> LatentHeader:
        options, size, facts = self.spec.options, opened.stream.size, message.facts
        time_base, bucket = Fraction(facts.time_base), facts.geometry.bucket
        return LatentHeader(
            **encoded_fields(self.loaded, opened.stream, facts.colour, facts.bit_depth),
            source_name=source.path.name, frame_rate=facts.rate, time_base=str(time_base),
            start_time=float(opened.pts[0] * time_base), posterior=options.posterior, seed=opened.seed,
            clip={
                "source": source.key, "id": source.id, "start_frame": message.start,
                "end_frame": message.start + size.frames if options.mode != "full" else None,
                "source_size": list(facts.source_size), "resized": list(facts.geometry.resized),
                "crop": list(facts.geometry.crop), "bucket": None if bucket is None else f"{bucket[0]}x{bucket[1]}",
                "job": self.spec.fingerprint, "seconds": round(seconds, 3),
            },
        )  # fmt: skip


def _row(source: Source, name: str, header: LatentHeader, where: dict[str, Any]) -> dict[str, Any]:
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
