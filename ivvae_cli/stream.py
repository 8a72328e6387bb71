"""Streaming engine: IV-VAE over videos of any length and size, a few frame groups at a time.

A stream is pushed chunks of any length and returns what they complete, carrying the causal cache
between steps, so no caller ever holds a whole video. The first frame is a step of its own; after
it each step takes ``groups_per_step`` groups (4 frames, one latent frame, each), which changes
speed and memory but not the result.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
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
    ):
        self.model, self.sample, self.generator = model, sample, generator
        self.groups_per_step = _check_groups(groups_per_step)
        self.cache = CausalCache()
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
        self.pending = frames if self.pending is None else torch.cat([self.pending, frames], dim=1)
        parts = []
        if self.cache.first_step and self.pending.shape[1] >= 1:
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
        if rest.shape[1] == 0:
            return _collect([], self._empty())
        missing = -rest.shape[1] % GROUP
        rest = torch.cat([rest, rest[:, -1:].expand(-1, missing, -1, -1, -1)], dim=1)
        return _collect([self._step(rest)], self._empty())

    def _step(self, frames: Tensor) -> Tensor:
        mu, logvar = self.model.encode_step(frames, self.cache)
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

    def __init__(self, model: IVVAE, *, size: VideoSize | tuple[int, int, int] | None = None, groups_per_step: int = 1):
        self.model = model
        self.size = VideoSize(*size) if size is not None else None
        self.groups_per_step = _check_groups(groups_per_step)
        self.cache = CausalCache()
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
        self.pending = latent if self.pending is None else torch.cat([self.pending, latent], dim=1)
        parts = []
        if self.cache.first_step and self.pending.shape[1] >= 1:
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
        out = _collect(parts, self._empty())
        if self.size is not None and self.frames_out < self.size.frames:
            raise ValueError(f"latent decodes to {self.frames_out} frames, fewer than the {self.size.frames} expected")
        return out

    def _step(self, latents: Tensor) -> Tensor:
        frames = self.model.decode_step(latents, self.cache)
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
