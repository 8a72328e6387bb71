"""Running this process's share: the model's side, clips encoded one at a time as their frames stream
in, or in batches of one shape, each written when it ends."""

from __future__ import annotations

import hashlib
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from ivvae_cli.dataset.clips import ClipOptions
from ivvae_cli.dataset.decoding import SourceDecoder, _quiet_worker
from ivvae_cli.dataset.keeping import Collector, Keeper, Sources, Tally
from ivvae_cli.dataset.messages import ClipDone, FramePiece, Message, SourceEnd, reader_stops
from ivvae_cli.dataset.sources import Source, World
from ivvae_cli.dataset.spec import JobSpec
from ivvae_cli.dataset.store import merge_index, open_store
from ivvae_cli.errors import IvvaeError, WriteError
from ivvae_cli.latent_file import LatentFile, LatentHeader
from ivvae_cli.model import VideoSize
from ivvae_cli.pipeline import MemoryOptions, encoded_fields
from ivvae_cli.stream import StreamEncoder
from ivvae_cli.weights import LoadedModel


@dataclass
class _OpenStream:
    stream: StreamEncoder
    started: float
    seed: int | None  # with --posterior sample: the clip's noise seed
    parts: list = field(default_factory=list)
    pts: list[int] = field(default_factory=list)


@dataclass
class _HeldClip:
    """A clip's frames, held until a batch of its shape is full (``--batch-size`` above 1)."""

    index: int
    first: FramePiece  # its first piece: the clip's name, start and source facts
    frames: list[torch.Tensor] = field(default_factory=list)
    pts: list[int] = field(default_factory=list)


def check_batch(options: ClipOptions, batch: int) -> None:
    """Refuse a batch size that cannot work with ``options``, before any model loads."""
    if batch < 1:
        raise IvvaeError(f"--batch-size must be at least 1, got {batch}")
    if batch > 1 and options.mode == "full":
        raise IvvaeError("--clips full streams whole videos of any length one at a time: leave --batch-size at 1")
    if batch > 1 and options.posterior == "sample":
        raise IvvaeError("--batch-size above 1 takes --posterior mean or both (a sampled clip draws its own noise)")


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
    batch_size: int = 1,
    progress: Callable[[Tally], None] | None = None,
) -> tuple[Tally, dict[str, int] | None]:
    """Encode this process's share of ``sources`` into ``folder`` (``prepare_folder`` first),
    ``batch_size`` clips of one shape per model call. Returns what it did, and the index's counts
    when it found every source accounted for and so wrote the index."""
    check_batch(spec.options, batch_size)
    world = world or World()
    share = world.share(sources, spec.work_units)
    tally = Tally(sources=len(share))
    with open_store(folder, spec, world.rank) as store:
        done = store.records(source for _, source in share)
        todo = [(i, source) for i, source in share if source.name not in done]
        tally.done = len(done)
        tally.skipped = sum(record.skipped is not None for record in done.values())
        keeper = Keeper(sources, store, tally)
        job = _Job(sources, keeper, loaded, spec, memory or MemoryOptions(), max(1, workers), batch_size)
        loader = DataLoader(
            SourceDecoder(todo, spec.options, store.reusable(), spec.fingerprint), batch_size=None, num_workers=workers,
            pin_memory=job.device.type == "cuda", prefetch_factor=4 if workers else None, worker_init_fn=_quiet_worker,
        )  # fmt: skip
        with _StopOnSigterm(), torch.inference_mode():
            for message in loader if todo else ():
                job.take(message)
                if progress:
                    progress(tally)
            job.flush()
            if progress:
                progress(tally)
    merged = merge_index(folder, sources) if store.accounted(sources) else None
    return tally, merged


class _Job:
    """The model's side of ``encode_dataset``. At batch 1, one stream per clip in flight, fed each
    piece as it comes (memory bounded whatever a clip's length); above 1, each clip's frames are
    held until ``batch`` clips of its shape are, then encoded together in one stream. A source is
    finished once its every clip is written."""

    def __init__(self, sources: Sources, keeper: Keeper | Collector, loaded: LoadedModel, spec: JobSpec,
                 memory: MemoryOptions, streams: int, batch: int):  # fmt: skip
        self.sources, self.keeper, self.loaded, self.spec = sources, keeper, loaded, spec
        self.memory, self.streams, self.batch, self.tally = memory, streams, batch, keeper.tally
        self.open: dict[tuple[int, str], _OpenStream] = {}
        self.held: dict[tuple[int, str], _HeldClip] = {}  # clips whose frames are still arriving
        self.batches: dict[tuple, list[_HeldClip]] = {}  # whole clips, by shape, waiting for their batch
        self.waiting: dict[int, int] = {}  # per source, its clips in a batch not yet encoded
        self.ended: dict[int, SourceEnd] = {}  # sources whose end came while clips of theirs wait
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
            if isinstance(message, FramePiece) and self.batch == 1:
                self._piece(index, source, message)
            elif isinstance(message, FramePiece):
                self._hold(index, message)
            elif isinstance(message, ClipDone):
                self.keeper.existing(index, message.name, message.header)
            elif isinstance(message, SourceEnd):
                if self.waiting.get(index):
                    self.ended[index] = message
                else:
                    self.keeper.finish(index, message)
            else:
                self._fail(index, source, message.stage, message.reason)
        except WriteError:  # the disk, not the source: every later write would fail too
            raise
        except IvvaeError as e:
            self._fail(index, source, "encode", str(e))

    def flush(self) -> None:
        """Encode the batches not yet full (the work list is done)."""
        while self.batches:
            self._encode_batch(self.batches.pop(next(iter(self.batches))))

    def _fail(self, index: int, source: Source, stage: str, reason: str) -> None:
        for key in [k for k in (*self.open, *self.held) if k[0] == index]:
            self.open.pop(key, None)
            self.held.pop(key, None)
        for shape, clips in list(self.batches.items()):
            self.batches[shape] = [c for c in clips if c.index != index]
            if not self.batches[shape]:
                del self.batches[shape]
        self.waiting.pop(index, None)
        if self.ended.pop(index, None) is None and not reader_stops(stage):
            self.failed.add(index)
        self.keeper.fail(index, stage, reason)

    def _piece(self, index: int, source: Source, message: FramePiece) -> None:
        key = (index, message.name)
        started = time.perf_counter()
        opened = self.open.get(key)
        if opened is None:
            opened = self.open[key] = self._stream(source, message)
        opened.parts.append(opened.stream.push(self._video(message.frames.unsqueeze(0), message.scale)))
        opened.pts += message.pts.tolist()
        if not message.last:
            self.tally.model_seconds += time.perf_counter() - started
            return
        del self.open[key]
        opened.parts.append(opened.stream.finish())
        latent, logvar = self._latents(opened.parts)
        self.tally.model_seconds += time.perf_counter() - started
        seconds = time.perf_counter() - opened.started
        self._keep(index, source, message, opened.stream, opened.pts, latent, logvar, opened.seed, seconds)

    def _video(self, frames: torch.Tensor, scale: float) -> torch.Tensor:
        """uint8 (or deeper) frames ``(B, t, H, W, C)`` -> the model's ``(B, C, t, H, W)`` in [-1, 1]."""
        frames = frames.to(self.device, non_blocking=True)
        return frames.float().div_(scale).mul_(2).sub_(1).permute(0, 4, 1, 2, 3)

    def _latents(self, parts: list) -> tuple[torch.Tensor, torch.Tensor | None]:
        both = self.spec.options.posterior == "both"
        latent = torch.cat([p.mean if both else p for p in parts], dim=2).cpu()
        return latent, torch.cat([p.logvar for p in parts], dim=2).cpu() if both else None

    def _hold(self, index: int, message: FramePiece) -> None:
        key = (index, message.name)
        held = self.held.setdefault(key, _HeldClip(index, message))
        held.frames.append(message.frames)
        held.pts += message.pts.tolist()
        if not message.last:
            return
        del self.held[key]
        shape = (len(held.pts), *message.frames.shape[1:], message.scale)
        batch = self.batches.setdefault(shape, [])
        batch.append(held)
        self.waiting[index] = self.waiting.get(index, 0) + 1
        if len(batch) == self.batch:
            self._encode_batch(self.batches.pop(shape))

    def _encode_batch(self, clips: list[_HeldClip]) -> None:
        """Clips of one shape through one stream; each is written, or fails its source, alone."""
        started = time.perf_counter()
        first = clips[0].first
        try:
            video = self._video(torch.stack([torch.cat(c.frames) for c in clips]), first.scale)
            stream = self._encoder(first, len(clips), None)
            latent, logvar = self._latents([stream.push(video), stream.finish()])
        except IvvaeError as e:
            for clip in clips:
                self._fail(clip.index, self.sources[clip.index], "encode", str(e))
            return
        self.tally.model_seconds += time.perf_counter() - started
        seconds = (time.perf_counter() - started) / len(clips)
        for i, clip in enumerate(clips):
            source = self.sources[clip.index]
            try:
                one = None if logvar is None else logvar[i : i + 1]
                self._keep(clip.index, source, clip.first, stream, clip.pts, latent[i : i + 1], one, None, seconds)
            except WriteError:
                raise
            except IvvaeError as e:
                self._fail(clip.index, source, "encode", str(e))
                continue
            self.waiting[clip.index] -= 1
            if not self.waiting[clip.index]:
                del self.waiting[clip.index]
                if clip.index in self.ended:
                    self.keeper.finish(clip.index, self.ended.pop(clip.index))

    def _keep(self, index: int, source: Source, first: FramePiece, stream: StreamEncoder, pts: list[int],
              latent: torch.Tensor, logvar: torch.Tensor | None, seed: int | None, seconds: float) -> None:  # fmt: skip
        """Hand a clip's latent file to the keeper (one with NaN or Inf fails its source)."""
        bad = int((~latent.isfinite()).sum()) + (0 if logvar is None else int((~logvar.isfinite()).sum()))
        if bad:
            raise IvvaeError(f"clip {first.name}: the latent has {bad} NaN or infinite values; not written")
        header = self._header(source, first, stream, pts[0], seed, seconds)
        stamps = np.asarray(pts, dtype=np.int64)
        data = LatentFile(header, latent, stamps - stamps[0], None, logvar)
        self.keeper.keep(index, first.name, data)

    def _stream(self, source: Source, message: FramePiece) -> _OpenStream:
        options = self.spec.options
        seed = clip_seed(options.seed, source, message.start) if options.posterior == "sample" else None
        return _OpenStream(self._encoder(message, self.streams, seed), time.perf_counter(), seed)

    def _encoder(self, message: FramePiece, share: int, seed: int | None) -> StreamEncoder:
        """A stream for clips like ``message``'s, planned within 1/``share`` of the memory budget."""
        crop = message.facts.geometry.crop
        padded = VideoSize(1, crop[3], crop[2]).padded()
        groups, tiling = self.memory.plan(self.loaded, padded.height, padded.width, "encode", share=1 / share)
        generator = None if seed is None else torch.Generator(self.device).manual_seed(seed)
        return StreamEncoder(
            self.loaded.model, sample=seed is not None, generator=generator,
            groups_per_step=groups, tiling=tiling, with_logvar=self.spec.options.posterior == "both",
        )  # fmt: skip

    def _header(self, source: Source, first: FramePiece, stream: StreamEncoder, pts0: int, seed: int | None,
                seconds: float) -> LatentHeader:  # fmt: skip
        options, size, facts = self.spec.options, stream.size, first.facts
        time_base, bucket = Fraction(facts.time_base), facts.geometry.bucket
        return LatentHeader(
            **encoded_fields(self.loaded, stream, facts.colour, facts.bit_depth),
            source_name=source.path.name, frame_rate=facts.rate, time_base=str(time_base),
            start_time=float(pts0 * time_base), posterior=options.posterior, seed=seed,
            clip={
                "source": source.key, "id": source.id, "start_frame": first.start,
                "end_frame": first.start + size.frames if options.mode != "full" else None,
                "source_size": list(facts.source_size), "resized": list(facts.geometry.resized),
                "crop": list(facts.geometry.crop), "bucket": None if bucket is None else f"{bucket[0]}x{bucket[1]}",
                "job": self.spec.fingerprint, "seconds": round(seconds, 3),
            },
        )  # fmt: skip


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
