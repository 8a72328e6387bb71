"""Streaming engine: IV-VAE over videos of any length and size, a few frame groups at a time.

A stream is pushed chunks of any length and returns what they complete, carrying the causal cache
between steps, so no caller ever holds a whole video. The first frame is a step of its own; after
it each step takes ``groups_per_step`` groups (4 frames, one latent frame, each), which changes
speed and memory but not the result. ``encode`` and ``decode`` run whole tensors through a stream;
``encode_clip`` and ``decode_clip`` run a clip in two steps, the form training differentiates.

Frames too large for memory are split into overlapping tiles (``Tiling``), each with its own causal
cache, and the tiles' outputs are blended with linear ramps across the overlaps. The caches span the
whole frame whatever the tiling, so with ``offload`` each tile's cache waits on disk between steps.
"""

from __future__ import annotations

import shutil
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from ivvae_cli.layers import CausalCache
from ivvae_cli.model import IVVAE, SPATIAL_STRIDE, TEMPORAL_STRIDE, Posterior, VideoSize


@dataclass(frozen=True)
class Tiling:
    """Square tiles of ``tile`` latent pixels (8 video pixels each), overlapping by ``overlap``.

    ``tile=None`` is one tile covering the frame (the untiled model). ``offload`` keeps each tile's
    causal cache in a temporary folder between steps (``TMPDIR`` chooses where).
    """

    tile: int | None = None
    overlap: int = 0
    offload: bool = False

    def __post_init__(self) -> None:
        if self.tile is not None and not 0 <= self.overlap < self.tile:
            raise ValueError(f"tile overlap must be in [0, tile), got tile {self.tile}, overlap {self.overlap}")

    def spans(self, length: int) -> list[tuple[int, int]]:
        """Tile extents ``[start, stop)`` along an axis of ``length`` latent pixels."""
        if self.tile is None or length <= self.tile:
            return [(0, length)]
        stride = self.tile - self.overlap
        starts = [*range(0, length - self.tile, stride), length - self.tile]
        return [(a, a + self.tile) for a in starts]

    def weights(self, length: int, scale: int) -> list[Tensor]:
        """Blend weights along an axis, at ``scale`` pixels per latent pixel: one ramp per tile,
        up across its overlap with the previous tile and down across the next, normalised so that
        they sum to one at every position."""
        spans = self.spans(length)
        ramp = max(1, self.overlap * scale)
        raw = []
        for i, (a, b) in enumerate(spans):
            pos = torch.arange(a * scale, b * scale, dtype=torch.float64) + 0.5
            up = (pos - a * scale) / ramp if i > 0 else torch.ones_like(pos)
            down = (b * scale - pos) / ramp if i < len(spans) - 1 else torch.ones_like(pos)
            raw.append(torch.minimum(up, down).clamp(max=1.0))
        total = torch.zeros(length * scale, dtype=torch.float64)
        for (a, b), w in zip(spans, raw, strict=True):
            total[a * scale : b * scale] += w
        return [(w / total[a * scale : b * scale]).float() for (a, b), w in zip(spans, raw, strict=True)]

    def describe(self, latent: VideoSize) -> dict:
        """What the latent metadata and reports record, for frames of ``latent``'s size (in latent pixels)."""
        rows, cols = len(self.spans(latent.height)), len(self.spans(latent.width))
        if self.tile is None or rows == cols == 1:
            return {"tiled": False, "offload": self.offload}
        tiles = [rows, cols]
        return {"tiled": True, "tile": self.tile, "overlap": self.overlap, "tiles": tiles, "offload": self.offload}


# Memory per unit of the model's ``dim``, measured on CPU in float32 (dim 8 and 16, 4-frame steps at 512x512):
# a step's working set per pixel-frame at full resolution, and the causal caches per pixel.
WORK_BYTES_PER_PIXEL_FRAME = 100
CACHE_BYTES_PER_PIXEL = {"encode": 55, "decode": 91}
TILE_CHOICES = (128, 96, 64, 48, 32, 24, 16)  # latent pixels, largest first


def plan_tiling(
    dim: int,
    height: int,
    width: int,
    *,
    frames_per_step: int,
    budget: int,
    direction: str,
    bytes_per_value: int = 4,
    tile: int | None = None,
    overlap: int | None = None,
) -> Tiling:
    """The tiling for ``height`` x ``width`` video pixels within ``budget`` bytes (weights aside).

    Untiled when the whole frame fits; else the largest tile from ``TILE_CHOICES`` that fits,
    overlapping by a quarter; caches go to disk when they do not fit beside the working set.
    ``tile``/``overlap`` (latent pixels) override the choice.
    """
    per_value = bytes_per_value / 4
    frames = frames_per_step * height * width * 3 * 4 * 3  # the step's frames, blended output, I/O copies

    def working(h: int, w: int) -> float:
        return per_value * WORK_BYTES_PER_PIXEL_FRAME * dim * frames_per_step * min(h, height) * min(w, width)

    def working_tiled(tile: int) -> float:
        return working(SPATIAL_STRIDE * tile, SPATIAL_STRIDE * tile)

    caches = per_value * CACHE_BYTES_PER_PIXEL[direction] * dim * height * width
    if tile is None:
        if working(height, width) + caches + frames <= budget:
            return Tiling()
        side = max(height, width) // SPATIAL_STRIDE
        fitting = [t for t in TILE_CHOICES if t < side and working_tiled(t) + frames <= budget]
        tile = fitting[0] if fitting else TILE_CHOICES[-1]
    overlap = tile // 4 if overlap is None else overlap
    tiled_caches = caches * (1 + overlap / tile) ** 2
    return Tiling(tile, overlap, offload=working_tiled(tile) + frames + tiled_caches > budget)


class _TileRunner:
    """Runs a model step over the tiles of a frame, each with its own cache, and blends outputs."""

    def __init__(self, tiling: Tiling, height: int, width: int, scale_in: int, scale_out: int):
        self.scale_in, self.scale_out = scale_in, scale_out
        rows, cols = tiling.spans(height), tiling.spans(width)
        w_rows, w_cols = tiling.weights(height, scale_out), tiling.weights(width, scale_out)
        self.tiles = [
            (r, c, w_r[:, None] * w_c[None, :] if len(rows) * len(cols) > 1 else None)
            for r, w_r in zip(rows, w_rows, strict=True)
            for c, w_c in zip(cols, w_cols, strict=True)
        ]
        self.caches = [CausalCache() for _ in self.tiles]
        self.folder = Path(tempfile.mkdtemp(prefix="ivvae-cache-")) if tiling.offload else None
        self.height, self.width = height, width

    def __call__(self, x: Tensor, step: Callable[[Tensor, CausalCache], Tensor | tuple[Tensor, ...]]) -> list[Tensor]:
        """``step`` over every tile of ``x``; its outputs (a tensor, or a tuple of them) blended."""
        si, so = self.scale_in, self.scale_out
        out: list[Tensor] = []
        for index, ((r0, r1), (c0, c1), weight) in enumerate(self.tiles):
            cache = self.caches[index]
            if self.folder:
                cache.restore(self.folder / f"{index}.pt")
            ys = step(x[..., r0 * si : r1 * si, c0 * si : c1 * si], cache)
            if self.folder:
                cache.offload(self.folder / f"{index}.pt")
            ys = ys if isinstance(ys, tuple) else (ys,)
            if weight is None:
                return list(ys)
            if not out:
                out = [y.new_zeros(*y.shape[:-2], self.height * so, self.width * so) for y in ys]
            w = weight.to(ys[0])
            for acc, y in zip(out, ys, strict=True):
                acc[..., r0 * so : r1 * so, c0 * so : c1 * so] += y * w
        return out

    def close(self) -> None:
        if self.folder:
            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder = None

    def __del__(self) -> None:
        self.close()


class _Stream(ABC):
    """What both directions share: input buffered until a step's worth has arrived, the lone first
    step, one causal cache per tile, and finishing.

    Subclasses give ``inputs_per_step`` (after the first), the spatial scale from input to output
    (``scale_in`` to ``scale_out`` pixels per latent pixel), ``_step`` and ``_output_shape``.
    """

    scale_in: int
    scale_out: int

    def __init__(self, model: IVVAE, groups_per_step: int, tiling: Tiling | None, inputs_per_step: int):
        if groups_per_step < 1:
            raise ValueError(f"groups_per_step must be at least 1, got {groups_per_step}")
        self.model, self.groups_per_step = model, groups_per_step
        self.tiling = tiling or Tiling()
        self.inputs_per_step = inputs_per_step
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.tiles: _TileRunner | None = None
        self.pending: Tensor | None = None  # frames-major, (B, t, C, H, W), on the model's device

    def _run(self, x: Tensor):
        """Buffer ``x`` (frames-major) and run every step it completes; outputs as ``(B, C, t, H, W)``."""
        if self.pending is not None and self.pending.shape[1]:
            x = torch.cat([self.pending, x], dim=1)
        self.pending = x
        parts = []
        if self.tiles is None and x.shape[1]:
            height, width = (n // self.scale_in for n in x.shape[-2:])
            self.tiles = _TileRunner(self.tiling, height, width, self.scale_in, self.scale_out)
            parts.append(self._step(self._take(1)))
        while self.pending.shape[1] >= self.inputs_per_step:
            parts.append(self._step(self._take(self.inputs_per_step)))
        return self._collect(parts)

    def _close(self, last: Tensor):
        """Run ``last`` (frames-major, possibly empty) as the final step and release the tiles."""
        parts = [self._step(last)] if last.shape[1] else []
        if self.pending is not None:
            self.pending = self.pending[:, :0]
        if self.tiles is not None:
            self.tiles.close()
        return self._collect(parts)

    def _take(self, n: int) -> Tensor:
        assert self.pending is not None
        taken, self.pending = self.pending[:, :n], self.pending[:, n:]
        return taken

    def _collect(self, parts: list[Tensor]):
        """Step outputs ``(B, T, C, H, W)`` -> ``(B, C, T, H, W)``."""
        if parts:
            return torch.cat(parts, dim=1).transpose(1, 2)
        assert self.pending is not None
        b, _, _, h, w = self.pending.shape
        channels, height, width = self._output_shape(h, w)
        return self.pending.new_empty(b, channels, 0, height, width)

    @abstractmethod
    def _step(self, x: Tensor) -> Tensor:
        """One model step over every tile: frames-major in, frames-major out."""

    @abstractmethod
    def _output_shape(self, height: int, width: int) -> tuple[int, int, int]:
        """Channels, height and width out for inputs of ``height`` x ``width``."""


class StreamEncoder(_Stream):
    """Frames in, latent frames out.

    ``push(video)`` takes ``(B, 3, t, H, W)`` in [-1, 1] (any t, the same B, H, W every time) and
    returns the latent frames ``(B, z_dim, t', ceil(H/8), ceil(W/8))`` it completes; ``finish()``
    repeats the last frame to close the last group and returns the rest. Latents are the posterior
    mean unless ``sample``; sampled noise is drawn frame by frame, so it too does not depend on
    ``groups_per_step``. With ``with_logvar`` both return a ``Posterior`` of the latent and the
    posterior's log variance, so that samples can be drawn later (a training set drawing anew each
    epoch).
    """

    scale_in, scale_out = SPATIAL_STRIDE, 1

    def __init__(
        self,
        model: IVVAE,
        *,
        sample: bool = False,
        generator: torch.Generator | None = None,
        groups_per_step: int = 1,
        tiling: Tiling | None = None,
        with_logvar: bool = False,
    ):
        super().__init__(model, groups_per_step, tiling, TEMPORAL_STRIDE * groups_per_step)
        self.sample, self.generator, self.with_logvar = sample, generator, with_logvar
        self.frames_in = 0
        self.shape: tuple[int, int, int] | None = None  # batch, height, width

    @property
    def size(self) -> VideoSize:
        """The size of the video pushed so far."""
        if self.shape is None:
            raise ValueError("no frames were pushed")
        return VideoSize(self.frames_in, self.shape[1], self.shape[2])

    def push(self, video: Tensor) -> Tensor | Posterior:
        b, c, t, h, w = video.shape
        if c != 3:
            raise ValueError(f"expected 3 colour channels, got {c}")
        if self.shape is None:
            self.shape = (b, h, w)
        elif self.shape != (b, h, w):
            raise ValueError(f"chunk of batch, height, width {(b, h, w)} after {self.shape}")
        frames = video.to(device=self.device, dtype=self.dtype).transpose(1, 2)
        padded = VideoSize(1, h, w).padded()
        if (padded.height, padded.width) != (h, w):
            pad = (0, padded.width - w, 0, padded.height - h)
            frames = F.pad(frames.flatten(0, 1), pad, mode="replicate").unflatten(0, (b, t))
        self.frames_in += t
        return self._run(frames)

    def finish(self) -> Tensor | Posterior:
        """Encode what is left, padding the last group by repeating the last frame."""
        if self.pending is None or self.frames_in == 0:
            raise ValueError("no frames were pushed")
        rest = self.pending
        missing = -rest.shape[1] % TEMPORAL_STRIDE
        if rest.shape[1]:
            rest = torch.cat([rest, rest[:, -1:].expand(-1, missing, -1, -1, -1)], dim=1)
        return self._close(rest)

    def _step(self, frames: Tensor) -> Tensor:
        assert self.tiles is not None
        posterior = Posterior(*self.tiles(frames, self.model.encode_step))
        z = posterior.sample(self.generator, frame_by_frame=True) if self.sample else posterior.mode()
        latent = self.model.scale_latent(z)
        # Mean and log variance side by side on channels, so that they stream as one tensor.
        return torch.cat([latent, posterior.logvar], dim=2) if self.with_logvar else latent

    def _collect(self, parts: list[Tensor]) -> Tensor | Posterior:
        out = super()._collect(parts)
        return Posterior(*out.chunk(2, dim=1)) if self.with_logvar else out

    def _output_shape(self, height: int, width: int) -> tuple[int, int, int]:
        channels = 2 * self.model.z_dim if self.with_logvar else self.model.z_dim
        return channels, height // SPATIAL_STRIDE, width // SPATIAL_STRIDE


class StreamDecoder(_Stream):
    """Latent frames in, video frames out.

    ``push(latent)`` takes ``(B, z_dim, t', h, w)`` and returns the frames ``(B, 3, t, H, W)`` it
    completes: 1 for the first latent frame, 4 for each after it. With ``size``, frames are cropped
    to that size and no frame past ``size.frames`` is returned; ``finish()`` checks the count.
    """

    scale_in, scale_out = 1, SPATIAL_STRIDE

    def __init__(
        self,
        model: IVVAE,
        *,
        size: VideoSize | tuple[int, int, int] | None = None,
        groups_per_step: int = 1,
        tiling: Tiling | None = None,
    ):
        super().__init__(model, groups_per_step, tiling, groups_per_step)
        self.size = VideoSize(*size) if size is not None else None
        self.frames_out = 0

    def push(self, latent: Tensor) -> Tensor:
        _, z, _, h, w = latent.shape
        if z != self.model.z_dim:
            raise ValueError(f"latent has {z} channels, the model expects {self.model.z_dim}")
        want = self.size.latent() if self.size is not None else None
        if want is not None and (h, w) != (want.height, want.width):
            raise ValueError(
                f"latent is {h}x{w}, but a {self.size.height}x{self.size.width} video needs {want.height}x{want.width}"
            )
        return self._run(latent.to(device=self.device, dtype=self.dtype).transpose(1, 2))

    def finish(self) -> Tensor:
        """Decode what is left; with ``size``, check that every frame was produced."""
        if self.pending is None:
            raise ValueError("no latent frames were pushed")
        out = self._close(self.pending)
        if self.size is not None and self.frames_out < self.size.frames:
            raise ValueError(f"latent decodes to {self.frames_out} frames, fewer than the {self.size.frames} expected")
        return out

    def _step(self, latents: Tensor) -> Tensor:
        assert self.tiles is not None
        (frames,) = self.tiles(latents, self.model.decode_step)
        if self.size is not None:
            keep = max(0, self.size.frames - self.frames_out)
            frames = frames[:, :keep, :, : self.size.height, : self.size.width]
        self.frames_out += frames.shape[1]
        return frames

    def _output_shape(self, height: int, width: int) -> tuple[int, int, int]:
        if self.size is not None:
            return 3, self.size.height, self.size.width
        return 3, height * SPATIAL_STRIDE, width * SPATIAL_STRIDE


def encode(
    model: IVVAE,
    video: Tensor,
    *,
    sample: bool = False,
    generator: torch.Generator | None = None,
    groups_per_step: int = 1,
    tiling: Tiling | None = None,
) -> Tensor:
    """Video ``(B, 3, T, H, W)`` in [-1, 1] -> latent ``(B, z_dim, T', h, w)``, in one stream.

    The posterior mean unless ``sample``. Any T >= 1, H, W: the last frame is repeated up to
    1 + 4k frames and edges are replicated up to multiples of 8; ``decode(..., size=(T, H, W))``
    gives the exact size back.
    """
    stream = StreamEncoder(model, sample=sample, generator=generator, groups_per_step=groups_per_step, tiling=tiling)
    return torch.cat([stream.push(video), stream.finish()], dim=2)


def decode(
    model: IVVAE,
    latent: Tensor,
    *,
    size: VideoSize | tuple[int, int, int] | None = None,
    groups_per_step: int = 1,
    tiling: Tiling | None = None,
) -> Tensor:
    """Latent ``(B, z_dim, T', h, w)`` -> video ``(B, 3, T, H, W)``, not clamped, in one stream.

    Without ``size``, T = 1 + 4 (T' - 1), H = 8h, W = 8w; with it, cropped to ``(T, H, W)``.
    """
    stream = StreamDecoder(model, size=size, groups_per_step=groups_per_step, tiling=tiling)
    return torch.cat([stream.push(latent), stream.finish()], dim=2)


def encode_clip(model: IVVAE, clip: Tensor) -> Posterior:
    """The posterior of a clip ``(B, T, 3, H, W)`` (T = 1 + 4k; H, W multiples of 8), frames-major,
    in two steps: the first frame, then every group at once. No padding, no tiles: the form
    training differentiates, and the same function as a stream."""
    cache = CausalCache()
    steps = [model.encode_step(clip[:, :1], cache)]
    if clip.shape[1] > 1:
        steps.append(model.encode_step(clip[:, 1:], cache))
    return Posterior(*(torch.cat(parts, dim=1) for parts in zip(*steps, strict=True)))


def decode_clip(model: IVVAE, latent: Tensor) -> Tensor:
    """Frames ``(B, T, 3, H, W)`` of a scaled latent ``(B, T', z_dim, h, w)``, frames-major, in two
    steps (see ``encode_clip``)."""
    cache = CausalCache()
    frames = [model.decode_step(latent[:, :1], cache)]
    if latent.shape[1] > 1:
        frames.append(model.decode_step(latent[:, 1:], cache))
    return torch.cat(frames, dim=1)
