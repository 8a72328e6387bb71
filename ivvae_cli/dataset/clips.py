"""Cutting clips: which frames of a source make each clip, resized and cropped as the model takes them."""

from __future__ import annotations

import hashlib
import itertools
import json
import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from fractions import Fraction
from typing import Any

import numpy as np

from ivvae_cli.dataset.sources import Source
from ivvae_cli.errors import IvvaeError
from ivvae_cli.model import SPATIAL_STRIDE, TEMPORAL_STRIDE
from ivvae_cli.video import VideoInfo, probe, read_frames, resized

CLIP_MODES = ("head", "chunk", "slide", "full")
POSTERIORS = ("mean", "sample", "both")
PIECE_FRAMES = 32  # frames a worker hands the model at a time


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
