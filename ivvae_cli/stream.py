"""Streaming engine: IV-VAE over videos of any length and size, a few frame groups at a time.

A stream is pushed chunks of any length and returns what they complete, carrying the causal cache
between steps, so no caller ever holds a whole video. The first frame is a step of its own; after
it each step takes ``groups_per_step`` groups (4 frames, one latent frame, each), which changes
speed and memory but not the result.

Frames too large for memory are split into overlapping tiles (``Tiling``), each with its own causal
cache, and the tiles' outputs are blended with linear ramps across the overlaps. The caches span the
whole frame whatever the tiling, so with ``offload`` each tile's cache waits on disk between steps.
"""

from __future__ import annotations

import math
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from ivvae_cli.layers import CausalCache

if TYPE_CHECKING:
    from ivvae_cli.model import IVVAE

GROUP = 4  # frames per latent frame, after the first
STRIDE = 8  # pixels per latent pixel


@dataclass(frozen=True)
class VideoSize:
    """Frame count and frame size of a video."""

    frames: int
    height: int
    width: int

    def latent(self) -> VideoSize:
        """The latent's size: 1 + ceil((T - 1) / 4) frames of ceil(H / 8) x ceil(W / 8)."""
        return VideoSize(
            1 + math.ceil((self.frames - 1) / GROUP), math.ceil(self.height / STRIDE), math.ceil(self.width / STRIDE)
        )

    def padded(self) -> VideoSize:
        """The size the model runs at: 1 + 4k frames, H and W multiples of 8."""
        lat = self.latent()
        return VideoSize(1 + GROUP * (lat.frames - 1), STRIDE * lat.height, STRIDE * lat.width)


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

    def describe(self, height: int, width: int) -> dict:
        """What the latent metadata and reports record (sizes in latent pixels)."""
        if self.tile is None or (len(self.spans(height)) == 1 and len(self.spans(width)) == 1):
            return {"tiled": False, "offload": self.offload}
        return {
            "tiled": True,
            "tile": self.tile,
            "overlap": self.overlap,
            "tiles": [len(self.spans(height)), len(self.spans(width))],
            "offload": self.offload,
        }


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

    caches = per_value * CACHE_BYTES_PER_PIXEL[direction] * dim * height * width
    if tile is None:
        if working(height, width) + caches + frames <= budget:
            return Tiling()
        side = max(height, width) // STRIDE
        fitting = [t for t in TILE_CHOICES if t < side and working(8 * t, 8 * t) + frames <= budget]
        tile = fitting[0] if fitting else TILE_CHOICES[-1]
    overlap = tile // 4 if overlap is None else overlap
    tiled_caches = caches * (1 + overlap / tile) ** 2
    return Tiling(tile, overlap, offload=working(8 * tile, 8 * tile) + frames + tiled_caches > budget)


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
        si, so = self.scale_in, self.scale_out
        out: list[Tensor] = []
        for index, ((r0, r1), (c0, c1), weight) in enumerate(self.tiles):
            cache = self._load(index)
            ys = step(x[..., r0 * si : r1 * si, c0 * si : c1 * si], cache)
            self._store(index, cache)
            ys = ys if isinstance(ys, tuple) else (ys,)
            if weight is None:
                return list(ys)
            if not out:
                out = [y.new_zeros(*y.shape[:-2], self.height * so, self.width * so) for y in ys]
            w = weight.to(ys[0])
            for acc, y in zip(out, ys, strict=True):
                acc[..., r0 * so : r1 * so, c0 * so : c1 * so] += y * w
        return out

    def _load(self, index: int) -> CausalCache:
        cache = self.caches[index]
        path = self.folder and self.folder / f"{index}.pt"
        if path and path.exists():
            cache.last_frames = dict(zip(cache.last_frames, torch.load(path, weights_only=True), strict=True))
        return cache

    def _store(self, index: int, cache: CausalCache) -> None:
        if self.folder:
            torch.save(list(cache.last_frames.values()), self.folder / f"{index}.pt")
            cache.last_frames = dict.fromkeys(cache.last_frames)  # keep the keys, in order

    def close(self) -> None:
        if self.folder:
            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder = None

    def __del__(self) -> None:
        self.close()


def _take(pending: Tensor, n: int) -> tuple[Tensor, Tensor]:
    return pending[:, :n], pending[:, n:]


def _collect(parts: list[Tensor], empty: Tensor) -> Tensor:
    """Concatenate step outputs ``(B, T, C, H, W)`` into ``(B, C, T, H, W)``."""
    return torch.cat(parts, dim=1).transpose(1, 2) if parts else empty.transpose(1, 2)


def _check_groups(groups_per_step: int) -> int:
    if groups_per_step < 1:
        raise ValueError(f"groups_per_step must be at least 1, got {groups_per_step}")
    return groups_per_step


class StreamEncoder:
    """Frames in, latent frames out.

    ``push(video)`` takes ``(B, 3, t, H, W)`` in [-1, 1] (any t, the same B, H, W every time) and
    returns the latent frames ``(B, z_dim, t', ceil(H/8), ceil(W/8))`` it completes; ``finish()``
    repeats the last frame to close the last group and returns the rest. Latents are the posterior
    mean unless ``sample``; sampled noise is drawn frame by frame, so it too does not depend on
    ``groups_per_step``.
    """

    def __init__(
        self,
        model: IVVAE,
        *,
        sample: bool = False,
        generator: torch.Generator | None = None,
        groups_per_step: int = 1,
        tiling: Tiling | None = None,
    ):
        self.model, self.sample, self.generator = model, sample, generator
        self.groups_per_step = _check_groups(groups_per_step)
        self.tiling = tiling or Tiling()
        self.tiles: _TileRunner | None = None
        self.frames_in = 0
        self.shape: tuple[int, int, int] | None = None  # batch, height, width
        self.pending: Tensor | None = None

    @property
    def size(self) -> VideoSize:
        """The size of the video pushed so far."""
        if self.shape is None:
            raise ValueError("no frames were pushed")
        return VideoSize(self.frames_in, self.shape[1], self.shape[2])

    def push(self, video: Tensor) -> Tensor:
        b, c, t, h, w = video.shape
        if c != 3:
            raise ValueError(f"expected 3 colour channels, got {c}")
        if self.shape is None:
            self.shape = (b, h, w)
        elif self.shape != (b, h, w):
            raise ValueError(f"chunk of batch, height, width {(b, h, w)} after {self.shape}")
        param = next(self.model.parameters())
        frames = video.to(device=param.device, dtype=param.dtype).transpose(1, 2)
        pad_h, pad_w = -h % STRIDE, -w % STRIDE
        if pad_h or pad_w:
            frames = F.pad(frames.flatten(0, 1), (0, pad_w, 0, pad_h), mode="replicate").unflatten(0, (b, t))
        self.frames_in += t
        self.pending = (
            frames if self.pending is None or not self.pending.shape[1] else torch.cat([self.pending, frames], 1)
        )
        parts = []
        if self.tiles is None and self.pending.shape[1] >= 1:
            height, width = (n // STRIDE for n in self.pending.shape[-2:])
            self.tiles = _TileRunner(self.tiling, height, width, scale_in=STRIDE, scale_out=1)
            first, self.pending = _take(self.pending, 1)
            parts.append(self._step(first))
        step = GROUP * self.groups_per_step
        while self.pending.shape[1] >= step:
            chunk, self.pending = _take(self.pending, step)
            parts.append(self._step(chunk))
        return _collect(parts, self._empty())

    def finish(self) -> Tensor:
        """Encode what is left, padding the last group by repeating the last frame."""
        if self.pending is None or self.frames_in == 0:
            raise ValueError("no frames were pushed")
        rest, self.pending = self.pending, self.pending[:, :0]
        parts = []
        if rest.shape[1]:
            missing = -rest.shape[1] % GROUP
            parts.append(self._step(torch.cat([rest, rest[:, -1:].expand(-1, missing, -1, -1, -1)], dim=1)))
        if self.tiles is not None:
            self.tiles.close()
        return _collect(parts, self._empty())

    def _step(self, frames: Tensor) -> Tensor:
        assert self.tiles is not None
        mu, logvar = self.tiles(frames, self.model.encode_step)
        z = mu
        if self.sample:
            noise = torch.stack(
                [
                    torch.randn(mu[:, i].shape, generator=self.generator, device=mu.device, dtype=mu.dtype)
                    for i in range(mu.shape[1])
                ],
                dim=1,
            )
            z = mu + torch.exp(0.5 * logvar) * noise
        return self.model.scale_factor * (z - self.model.shift_factor)

    def _empty(self) -> Tensor:
        assert self.pending is not None
        b, _, _, h, w = self.pending.shape
        return self.pending.new_empty(b, 0, self.model.z_dim, h // STRIDE, w // STRIDE)


class StreamDecoder:
    """Latent frames in, video frames out.

    ``push(latent)`` takes ``(B, z_dim, t', h, w)`` and returns the frames ``(B, 3, t, H, W)`` it
    completes: 1 for the first latent frame, 4 for each after it. With ``size``, frames are cropped
    to that size and no frame past ``size.frames`` is returned; ``finish()`` checks the count.
    """

    def __init__(
        self,
        model: IVVAE,
        *,
        size: VideoSize | tuple[int, int, int] | None = None,
        groups_per_step: int = 1,
        tiling: Tiling | None = None,
    ):
        self.model = model
        self.size = VideoSize(*size) if size is not None else None
        self.groups_per_step = _check_groups(groups_per_step)
        self.tiling = tiling or Tiling()
        self.tiles: _TileRunner | None = None
        self.frames_out = 0
        self.pending: Tensor | None = None

    def push(self, latent: Tensor) -> Tensor:
        _, z, _, h, w = latent.shape
        if z != self.model.z_dim:
            raise ValueError(f"latent has {z} channels, the model expects {self.model.z_dim}")
        want = self.size.latent() if self.size is not None else None
        if want is not None and (h, w) != (want.height, want.width):
            raise ValueError(
                f"latent is {h}x{w}, but a {self.size.height}x{self.size.width} video needs {want.height}x{want.width}"
            )
        param = next(self.model.parameters())
        latent = latent.to(device=param.device, dtype=param.dtype).transpose(1, 2)
        self.pending = (
            latent if self.pending is None or not self.pending.shape[1] else torch.cat([self.pending, latent], 1)
        )
        parts = []
        if self.tiles is None and self.pending.shape[1] >= 1:
            self.tiles = _TileRunner(self.tiling, *self.pending.shape[-2:], scale_in=1, scale_out=STRIDE)
            first, self.pending = _take(self.pending, 1)
            parts.append(self._step(first))
        while self.pending.shape[1] >= self.groups_per_step:
            chunk, self.pending = _take(self.pending, self.groups_per_step)
            parts.append(self._step(chunk))
        return _collect(parts, self._empty())

    def finish(self) -> Tensor:
        """Decode what is left; with ``size``, check that every frame was produced."""
        if self.pending is None:
            raise ValueError("no latent frames were pushed")
        parts = [self._step(self.pending)] if self.pending.shape[1] else []
        self.pending = self.pending[:, :0]
        if self.tiles is not None:
            self.tiles.close()
        out = _collect(parts, self._empty())
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

    def _empty(self) -> Tensor:
        assert self.pending is not None
        b, _, _, h, w = self.pending.shape
        if self.size is not None:
            return self.pending.new_empty(b, 0, 3, self.size.height, self.size.width)
        return self.pending.new_empty(b, 0, 3, h * STRIDE, w * STRIDE)
