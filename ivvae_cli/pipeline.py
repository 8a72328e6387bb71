"""The library's file-level jobs: video file -> latent, latent -> video file, and both in one pass.

Each streams: frames are read, pushed through the model and written a few groups at a time.
``progress`` (optional) is called with the number of frames each piece of work completed.
"""

from __future__ import annotations

import itertools
import os
import secrets
from collections import deque
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, replace
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch

from ivvae_cli.bare_latent import BareOptions, bare_latent_file, batch_outputs, check_channels, checked_latent
from ivvae_cli.colour import Colour
from ivvae_cli.errors import DeviceError, WeightsError
from ivvae_cli.latent_file import LatentFile, LatentHeader
from ivvae_cli.metrics import ComparisonWriter, Metrics, sizes
from ivvae_cli.model import TEMPORAL_STRIDE, VideoSize
from ivvae_cli.outputs import atomic_output
from ivvae_cli.stream import StreamDecoder, StreamEncoder, Tiling, plan_tiling
from ivvae_cli.video import (
    OutputFormat,
    VideoInfo,
    VideoWriter,
    output_format,
    probe,
    read_audio,
    read_frames,
    resized,
    unit_float,
)
from ivvae_cli.weights import LoadedModel

Progress = Callable[[int], None]


def select_device(name: str) -> torch.device:
    """``auto`` (CUDA when present, else CPU), ``cpu``, ``cuda`` or ``cuda:N``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise DeviceError(f"unknown device '{name}' (use auto, cpu, cuda or cuda:N)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"{name} was asked for, but this torch sees no CUDA device")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise DeviceError(f"{name} was asked for, but there are {torch.cuda.device_count()} CUDA devices")
    elif device.type != "cpu":
        raise DeviceError(f"unsupported device '{name}' (use auto, cpu, cuda or cuda:N)")
    return device


# Defaults by device. On CPU they are measured (README "Speed"): float32, one frame group per step.
# CUDA's were chosen before any GPU ran this model, from CPU measurements of bfloat16's loss on real
# clips (README "GPU defaults"), and await confirmation by benchmarks/gpu_check.py on a GPU.
CUDA_DTYPE = torch.bfloat16
CUDA_MAX_GROUPS_PER_STEP = 4


def default_dtype(device: torch.device) -> torch.dtype:
    """``--dtype auto``: float32 on CPU (bfloat16 is slower there, and outputs stay bit-identical to
    earlier releases), ``CUDA_DTYPE`` on CUDA, where tensor cores run it and its loss was negligible."""
    return CUDA_DTYPE if device.type == "cuda" else torch.float32


def default_groups_per_step(device: torch.device, tiling: Callable[[int], Tiling]) -> int:
    """Groups per step when none were asked for: one on CPU (more are slower there); on CUDA, where a
    few frames leave the GPU idle, the most up to ``CUDA_MAX_GROUPS_PER_STEP`` that cut the frame no
    finer than one group does (``tiling(groups)``), since smaller tiles cost more than they gain."""
    if device.type != "cuda":
        return 1
    one = tiling(1)
    return next(g for g in range(CUDA_MAX_GROUPS_PER_STEP, 0, -1) if g == 1 or tiling(g) == one)


def prepare_device(device: torch.device) -> None:
    """cuDNN autotuning on CUDA: a stream repeats the same few convolution shapes (the first step,
    then full steps, per tile), so timing each shape's algorithms once pays back within a video."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True


@dataclass
class EncodeOptions:
    """Which part of the source to encode, and how."""

    start: float = 0.0
    max_frames: int | None = None
    duration: float | None = None
    sample: bool = False
    seed: int | None = None
    short_side: int | None = None  # resize so the short side has this many pixels (as benchmarks do)
    skip_errors: bool = False  # leave out what a damaged video cannot decode, instead of stopping there


@dataclass
class MemoryOptions:
    """How the work is cut to fit memory; never what it computes, except through tiling."""

    max_memory: int | None = None  # bytes beside the weights; None: most of what the device has free
    tile: int | None = None  # latent pixels; None: chosen from the budget
    overlap: int | None = None  # latent pixels
    groups_per_step: int | None = None  # None: by device (default_groups_per_step)

    def plan(
        self, loaded: LoadedModel, height: int, width: int, direction: str, share: float = 1.0
    ) -> tuple[int, Tiling]:
        """Groups per step and tiling for frames of ``height`` x ``width`` (padded) pixels within
        ``share`` of the budget."""
        param = next(loaded.model.parameters())
        budget = self.max_memory if self.max_memory is not None else int(0.8 * available_memory(param.device))

        def tiling(groups: int) -> Tiling:
            return plan_tiling(
                loaded.model.dim,
                height,
                width,
                frames_per_step=TEMPORAL_STRIDE * groups,
                budget=int(budget * share),
                direction=direction,
                bytes_per_value=param.element_size(),
                tile=self.tile,
                overlap=self.overlap,
            )

        groups = self.groups_per_step
        if groups is None:
            groups = default_groups_per_step(param.device, tiling)
        return groups, tiling(groups)


def available_memory(device: torch.device) -> int:
    """Bytes free on a CUDA device, or the RAM the system reports available."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f)
        return int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


@dataclass
class WriteOptions:
    """How decoded frames are written."""

    codec: str | None = None
    quality: int = 18
    lossless: bool = False
    bit_depth: int | None = None  # None: 10 for deep sources where the codec holds it, else 8
    chroma: str = "auto"  # auto, 420 or 444

    def format(self, path: Path, width: int, height: int, colour: Colour, source_depth: int) -> OutputFormat:
        """How a ``width`` x ``height`` video from a source with ``colour`` and ``source_depth`` bits
        will be written to ``path``."""
        fmt = output_format(
            path, width, height, codec=self.codec, lossless=self.lossless, colour=colour, source_depth=source_depth,
            bit_depth=self.bit_depth, chroma=self.chroma,
        )  # fmt: skip
        return replace(fmt, crf=self.quality)


def _frame_limit(info: VideoInfo, options: EncodeOptions) -> int | None:
    if options.duration is None:
        return options.max_frames
    by_duration = max(1, round(options.duration * info.frame_rate))
    return by_duration if options.max_frames is None else min(by_duration, options.max_frames)


def expected_frames(info: VideoInfo, options: EncodeOptions) -> int | None:
    """How many frames an encode of ``info`` with ``options`` will read, when that can be known."""
    limit, total = _frame_limit(info, options), info.frames
    if total is not None and options.start:
        total = max(0, total - round(options.start * info.frame_rate))
    if total is None or limit is None:
        return total if limit is None else limit
    return min(total, limit)


def _to_model(frames: np.ndarray) -> torch.Tensor:
    """Integer RGB ``(t, H, W, 3)`` -> ``(1, 3, t, H, W)`` in [-1, 1] (in place: frames can be 4K)."""
    return torch.from_numpy(unit_float(frames)).mul_(2).sub_(1).permute(3, 0, 1, 2).unsqueeze(0)


def _from_model(video: torch.Tensor) -> np.ndarray:
    """``(1, 3, t, H, W)`` in [-1, 1] -> ``(t, H, W, 3)`` float32 in [0, 1], in place where it can."""
    frames = video[0].to("cpu", torch.float32)
    return frames.clamp_(-1, 1).add_(1).mul_(0.5).permute(1, 2, 3, 0).numpy()


def encoded_fields(loaded: LoadedModel, stream: StreamEncoder, colour: Colour, bit_depth: int) -> dict:
    """The latent header's fields that the model, the stream that encoded and the source's colour
    decide: the same for ``encode`` and for a dataset's clips."""
    model, size = loaded.model, stream.size
    padded = size.padded()
    return {
        "model": loaded.name, "z_dim": model.z_dim, "dim": model.dim, "scale_factor": model.scale_factor,
        "shift_factor": model.shift_factor, "weights_fingerprint": loaded.fingerprint,
        "source_frames": size.frames, "source_height": size.height, "source_width": size.width,
        "padded_frames": padded.frames, "padded_height": padded.height, "padded_width": padded.width,
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "tiling": stream.tiling.describe(padded.latent()), "colour_matrix": colour.matrix,
        "colour_primaries": colour.primaries, "colour_transfer": colour.transfer, "colour_range": colour.range,
        "bit_depth": bit_depth,
    }  # fmt: skip


class _Source:
    """Streams a video file into a ``StreamEncoder`` and records what the latent file needs."""

    def __init__(
        self, path: Path, loaded: LoadedModel, options: EncodeOptions, memory: MemoryOptions, share: float = 1.0
    ):
        self.path, self.loaded, self.options, self.memory = path, loaded, options, memory
        info = probe(path)
        width, height = resized(info.width, info.height, options.short_side)
        self.info = replace(info, width=width, height=height)  # what the model sees
        self.limit = _frame_limit(self.info, options)
        self.padded = VideoSize(1, self.info.height, self.info.width).padded()  # frame size the model runs at
        self.groups, self.tiling = memory.plan(loaded, self.padded.height, self.padded.width, "encode", share)
        device = next(loaded.model.parameters()).device
        self.seed = options.seed if options.seed is not None else secrets.randbits(31)
        generator = torch.Generator(device=device).manual_seed(self.seed) if options.sample else None
        self.stream = StreamEncoder(
            loaded.model,
            sample=options.sample,
            generator=generator,
            groups_per_step=self.groups,
            tiling=self.tiling,
        )
        self.pts: list[int] = []
        chunk = TEMPORAL_STRIDE * self.groups
        size = (self.info.width, self.info.height)
        self.reader = read_frames(
            path, start=options.start, max_frames=self.limit, chunk=chunk, size=size, skip_errors=options.skip_errors,
            info=info,
        )  # fmt: skip

    def chunks(self):
        """Yield ``(frames, latent part)`` as frames are read and encoded."""
        for frames, stamps in self.reader:
            self.pts.extend(stamps)
            yield frames, self.stream.push(_to_model(frames))
        yield None, self.stream.finish()

    def header(self) -> LatentHeader:
        return LatentHeader(
            **encoded_fields(self.loaded, self.stream, self.info.colour, self.info.bit_depth),
            source_name=self.path.name,
            frame_rate=str(self.reader.frame_rate),
            time_base=str(self.info.time_base),
            start_time=self.options.start,
            posterior="sample" if self.options.sample else "mean",
            seed=self.seed if self.options.sample else None,
        )

    def relative_pts(self) -> np.ndarray:
        pts = np.asarray(self.pts, dtype=np.int64)
        return pts - pts[0]

    def audio(self) -> bytes | None:
        """The source's audio over the frames asked for."""
        end = self.options.start + self.limit / self.info.frame_rate if self.limit is not None else None
        end = None if end is None else float(end)
        return read_audio(self.path, start=self.options.start, end=end, skip_errors=self.options.skip_errors)

    def writer(self, path: Path, options: WriteOptions, audio: bytes | None) -> VideoWriter:
        """A writer at the reader's rate: call it once the first frames are read, which settle it."""
        info = self.info
        fmt = options.format(path, info.width, info.height, info.colour, info.bit_depth)
        return VideoWriter(path, fmt, frame_rate=self.reader.frame_rate, time_base=info.time_base, audio=audio)


def encode_video(
    source: Path,
    loaded: LoadedModel,
    options: EncodeOptions,
    *,
    memory: MemoryOptions | None = None,
    progress: Progress | None = None,
) -> LatentFile:
    """Encode a video file into a ``LatentFile`` (the latent is small; frames are streamed)."""
    src = _Source(source, loaded, options, memory or MemoryOptions())
    parts = []
    for frames, latent in src.chunks():
        parts.append(latent.cpu())
        if progress and frames is not None:
            progress(len(frames))
    audio = src.audio()
    header = src.header()
    if audio:
        header.audio_codec = src.info.audio[0]
    return LatentFile(header, torch.cat(parts, dim=2), src.relative_pts(), audio)


def check_model_matches(data: LatentFile, loaded: LoadedModel, name: str) -> None:
    """Refuse to decode with weights other than those that encoded the latent."""
    h = data.header
    if h.weights_fingerprint != loaded.fingerprint:
        raise WeightsError(
            f"{name} was encoded with {h.model} (weights {h.weights_fingerprint}), but the weights given are "
            f"{loaded.name} ({loaded.fingerprint}); decode with the same weights (--model {h.model} or --weights)"
        )


def decode_format(header: LatentHeader, path: Path, options: WriteOptions) -> OutputFormat:
    """How ``decode`` writes the latent with ``header`` to ``path``."""
    return options.format(path, header.source_width, header.source_height, header.colour, header.bit_depth or 8)


def _decoded(stream: StreamDecoder, latent: torch.Tensor):
    """Decoded frames as ``(t, H, W, 3)`` arrays, one latent frame at a time."""
    for i in range(latent.shape[2]):
        yield _from_model(stream.push(latent[:, :, i : i + 1]))
    yield _from_model(stream.finish())


def decode_latent(
    data: LatentFile,
    output: Path,
    loaded: LoadedModel,
    options: WriteOptions,
    *,
    memory: MemoryOptions | None = None,
    progress: Progress | None = None,
) -> dict:
    """Decode a latent file into a video file: frame count, size, timestamps and audio restored.
    Returns the tiling used, as ``Tiling.describe`` says it."""
    h = data.header
    memory = memory or MemoryOptions()
    groups, tiling = memory.plan(loaded, h.padded_height, h.padded_width, "decode")
    stream = StreamDecoder(loaded.model, size=h.source_size, groups_per_step=groups, tiling=tiling)
    fmt = decode_format(h, output, options)
    rate, time_base = Fraction(h.frame_rate), Fraction(h.time_base)
    done = 0
    with VideoWriter(output, fmt, frame_rate=rate, time_base=time_base, audio=data.audio) as writer:
        for frames in _decoded(stream, data.latent):
            writer.write(frames, data.frame_pts[done : done + len(frames)].tolist())
            done += len(frames)
            if progress and len(frames):
                progress(len(frames))
    return tiling.describe(h.padded_size.latent())


def decode_tensor(
    latent: torch.Tensor,
    output: Path,
    loaded: LoadedModel,
    options: BareOptions | None = None,
    write_options: WriteOptions | None = None,
    *,
    memory: MemoryOptions | None = None,
    progress: Progress | None = None,
    force: bool = False,
) -> list[Path]:
    """Decode what a diffusion model's sampler gives, ``(C, T, h, w)`` or ``(B, C, T, h, w)`` in
    ivvae's scaled latent space (or ``options.space``), into one video per item: ``output``, or for a
    batch ``NAME_0.EXT``, ``NAME_1.EXT``, ... (``batch_outputs``), each written atomically, at
    ``options.fps``. Returns the paths written."""
    options = options or BareOptions()
    latent = checked_latent(latent.detach().cpu(), "the latent")
    check_channels(latent, loaded, "the latent")
    paths = batch_outputs(output, latent.shape[0])
    for item, path in enumerate(paths):
        data = bare_latent_file(latent[item : item + 1], path.stem, loaded, options)
        with atomic_output(path, force) as tmp:
            decode_latent(data, tmp, loaded, write_options or WriteOptions(), memory=memory, progress=progress)
    return paths


@dataclass
class ReconstructResult:
    header: LatentHeader
    metrics: Metrics | None
    decode_tiling: dict  # Tiling.describe
    sizes: dict


def _source_bytes(info: VideoInfo, frames: int) -> int | None:
    """The source file's bytes, pro rata when only part of it was used."""
    size = info.path.stat().st_size
    return round(size * min(1.0, frames / info.frames)) if info.frames else size


def reconstruct_video(
    source: Path,
    loaded: LoadedModel,
    options: EncodeOptions,
    output: Path | None = None,
    *,
    write_options: WriteOptions | None = None,
    memory: MemoryOptions | None = None,
    measure: bool = True,
    lpips: torch.nn.Module | None = None,
    comparison: Path | None = None,
    progress: Progress | None = None,
) -> ReconstructResult:
    """Encode and decode in one streaming pass; optionally write the result and measure it.

    Reconstructed frames lag the source by at most one step; the source frames in between are
    the only ones held.
    """
    memory = memory or MemoryOptions()
    src = _Source(source, loaded, options, memory, share=0.5)  # encoder and decoder run side by side
    groups, tiling = memory.plan(loaded, src.padded.height, src.padded.width, "decode", share=0.5)
    decoder = StreamDecoder(loaded.model, groups_per_step=groups, tiling=tiling)
    metrics = Metrics(lpips_net=lpips) if measure else None
    waiting: deque[np.ndarray] = deque()  # source frames (integers) awaiting their reconstruction
    chunks = src.chunks()
    first = next(chunks)  # the first frames settle the rate to write at (see ``read_frames``)
    writer = src.writer(output, write_options or WriteOptions(), src.audio()) if output is not None else None
    info = src.info
    side = None
    if comparison:
        side = ComparisonWriter(comparison, info.width, info.height, src.reader.frame_rate, info.time_base, info.colour)
    done = 0
    with writer or nullcontext(), side or nullcontext():
        for frames, latent in itertools.chain([first], chunks):
            if frames is not None:
                waiting.extend(frames)
            recon = _from_model(
                decoder.push(latent)
                if frames is not None
                else torch.cat([decoder.push(latent), decoder.finish()], dim=2)
            )
            # Crop the edge padding, and drop frames that only the time padding made.
            recon = recon[: len(waiting), : src.info.height, : src.info.width]
            if not len(recon):
                continue
            originals = unit_float(np.stack([waiting.popleft() for _ in recon]))
            pts = [p - src.pts[0] for p in src.pts[done : done + len(recon)]]
            if metrics:
                metrics.update(originals, recon)
            if writer:
                writer.write(recon, pts)
            if side:
                side.write(originals, recon, pts)
            done += len(recon)
            if progress:
                progress(len(recon))
    header = src.header()
    lat = header.padded_size.latent()
    latent_bytes = 4 * header.z_dim * lat.frames * lat.height * lat.width  # float32, as a latent file holds it
    size = sizes(
        latent_bytes,
        header.source_frames,
        header.source_height,
        header.source_width,
        _source_bytes(info, header.source_frames),
    )
    return ReconstructResult(header, metrics, tiling.describe(lat), size)
