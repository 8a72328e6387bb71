"""The IV-VAE model (Wu et al., CVPR 2025): 4x8x8 compression with keyframe-based temporal
compression (KTC) and group causal convolution (GCConv).

The model knows one step: the first frame alone, then groups of ``TEMPORAL_STRIDE`` frames (one
latent frame each), carried across steps by a ``CausalCache``. Whole videos and streams are run by
``ivvae_cli.stream``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor, nn

from ivvae_cli.layers import (
    AtrousPyramidHead,
    CausalCache,
    FrameConv2d,
    FrameResidualBlock,
    KTCAttention,
    KTCConv3d,
    KTCDownsample,
    KTCResidualBlock,
    KTCUpsample,
    SplitRMSNorm,
)

TEMPORAL_STRIDE = 4  # frames per latent frame after the first, and frames per GCConv group at full rate
SPATIAL_STRIDE = 8  # video pixels per latent pixel, each way


@dataclass(frozen=True)
class VideoSize:
    """Frame count and frame size of a video."""

    frames: int
    height: int
    width: int

    def latent(self) -> VideoSize:
        """The latent's size: 1 + ceil((T - 1) / 4) frames of ceil(H / 8) x ceil(W / 8)."""
        return VideoSize(
            1 + math.ceil((self.frames - 1) / TEMPORAL_STRIDE),
            math.ceil(self.height / SPATIAL_STRIDE),
            math.ceil(self.width / SPATIAL_STRIDE),
        )

    def padded(self) -> VideoSize:
        """The size the model runs at: 1 + 4k frames, H and W multiples of 8."""
        return self.latent().upsampled()

    def upsampled(self) -> VideoSize:
        """For a latent's size, the size of the video it decodes to (before any crop)."""
        t, s = TEMPORAL_STRIDE, SPATIAL_STRIDE
        return VideoSize(1 + t * (self.frames - 1), s * self.height, s * self.width)


class Posterior(NamedTuple):
    """The encoder's diagonal Gaussian over latents, ``(B, T', z_dim, h, w)`` each, before scaling."""

    mean: Tensor
    logvar: Tensor

    def mode(self) -> Tensor:
        return self.mean

    def sample(self, generator: torch.Generator | None = None, *, frame_by_frame: bool = False) -> Tensor:
        """A draw from the posterior. ``frame_by_frame`` draws the noise one latent frame at a time
        (in the posterior's dtype), so that a stream's samples do not depend on how many frames
        each step holds; otherwise in one float32 draw, as training does."""
        mean = self.mean
        if frame_by_frame:
            draws = [
                torch.randn(mean[:, i].shape, generator=generator, device=mean.device, dtype=mean.dtype)
                for i in range(mean.shape[1])
            ]
            noise = torch.stack(draws, dim=1)
        else:
            noise = torch.randn(mean.shape, generator=generator, device=mean.device)
        return mean + torch.exp(0.5 * self.logvar) * noise

    def kl(self) -> Tensor:
        """Mean KL divergence from the unit Gaussian, per latent value."""
        return 0.5 * (self.mean.pow(2) + self.logvar.exp() - 1 - self.logvar).mean()


class Encoder(nn.Module):
    """Video frames -> 2*z_dim channels: the posterior moments of both halves, before mixing."""

    def __init__(self, z_dim: int, dim: int):
        super().__init__()
        d1, d2, d4 = dim, 2 * dim, 4 * dim
        self.conv1 = KTCConv3d(3, d1, d1, 3, frames_per_group=TEMPORAL_STRIDE)
        self.downsamples = nn.ModuleList(
            [
                KTCResidualBlock(d1, d1, TEMPORAL_STRIDE),
                KTCResidualBlock(d1, d1, TEMPORAL_STRIDE),
                KTCDownsample(d1, temporal=False),
                KTCResidualBlock(d1, d2, TEMPORAL_STRIDE),
                KTCResidualBlock(d2, d2, TEMPORAL_STRIDE),
                KTCDownsample(d2, temporal=True),  # groups of 4 frames -> 2
                KTCResidualBlock(d2, d4, TEMPORAL_STRIDE // 2),
                KTCResidualBlock(d4, d4, TEMPORAL_STRIDE // 2),
                KTCDownsample(d4, temporal=True),  # groups of 2 frames -> 1
                KTCAttention(d4),
                FrameResidualBlock(d4, d4),
                KTCAttention(d4),
                FrameResidualBlock(d4, d4),
                KTCAttention(d4),
            ]
        )
        self.middle = nn.ModuleList([FrameResidualBlock(d4, d4), KTCAttention(d4), FrameResidualBlock(d4, d4)])
        self.head = nn.Sequential(SplitRMSNorm(d4), nn.SiLU(), AtrousPyramidHead(d4, z_dim))

    def forward(self, x: Tensor, cache: CausalCache) -> Tensor:
        x = self.conv1(x, cache)
        for layer in [*self.downsamples, *self.middle]:
            x = layer(x, cache)
        norm, _, pyramid = self.head
        return pyramid(norm.silu(x, inplace=True))  # x: the last block's own output


class Decoder(nn.Module):
    """Latent frames -> 6 channels per frame: a keyframe (2D half) and a residual frame (3D half)."""

    def __init__(self, z_dim: int, dim: int):
        super().__init__()
        d1, d2, d4 = dim, 2 * dim, 4 * dim
        self.conv1 = FrameConv2d(z_dim, 2 * d4, 3)
        self.middle = nn.ModuleList([FrameResidualBlock(d4, d4), KTCAttention(d4), FrameResidualBlock(d4, d4)])
        self.upsamples = nn.ModuleList(
            [
                *(m for _ in range(3) for m in (FrameResidualBlock(d4, d4), KTCAttention(d4))),
                KTCUpsample(d4, temporal=True),  # 1 frame -> 2
                KTCResidualBlock(d2, d4, TEMPORAL_STRIDE // 2),
                KTCResidualBlock(d4, d4, TEMPORAL_STRIDE // 2),
                KTCResidualBlock(d4, d4, TEMPORAL_STRIDE // 2),
                KTCUpsample(d4, temporal=True),  # 2 frames -> 4
                KTCResidualBlock(d2, d2, TEMPORAL_STRIDE),
                KTCResidualBlock(d2, d2, TEMPORAL_STRIDE),
                KTCResidualBlock(d2, d2, TEMPORAL_STRIDE),
                KTCUpsample(d2, temporal=False),
                KTCResidualBlock(d1, d1, TEMPORAL_STRIDE),
                KTCResidualBlock(d1, d1, TEMPORAL_STRIDE),
                KTCResidualBlock(d1, d1, TEMPORAL_STRIDE),
            ]
        )
        head = KTCConv3d(2 * d1, 3, 3, 3, frames_per_group=TEMPORAL_STRIDE)
        self.head = nn.Sequential(SplitRMSNorm(d1), nn.SiLU(), head)

    def forward(self, x: Tensor, cache: CausalCache) -> Tensor:
        x = self.conv1(x)
        for layer in [*self.middle, *self.upsamples]:
            x = layer(x, cache)
        norm, _, conv = self.head
        return conv(norm.silu(x, inplace=True), cache)  # x: the last block's own output


class IVVAE(nn.Module):
    """IV-VAE with ``z_dim`` latent channels (half from each KTC half) and base width ``dim``.

    Latents are ``scale_factor * (z - shift_factor)`` (``scale_latent``). Videos are float tensors in
    [-1, 1]; ``VideoSize.latent`` gives a latent's size for a video's.
    """

    def __init__(self, z_dim: int = 16, dim: int = 64, scale_factor: float = 1.0, shift_factor: float = 0.0):
        super().__init__()
        if z_dim % 2 or z_dim <= 0 or dim <= 0:
            raise ValueError(f"z_dim must be a positive even number and dim positive, got z_dim={z_dim}, dim={dim}")
        self.z_dim, self.dim = z_dim, dim
        self.scale_factor, self.shift_factor = scale_factor, shift_factor
        half = z_dim // 2
        self.encoder = Encoder(z_dim, dim)
        self.conv1 = KTCConv3d(2 * z_dim, z_dim, z_dim, 1, frames_per_group=1)
        self.conv2 = KTCConv3d(z_dim, half, half, 1, frames_per_group=1)
        self.decoder = Decoder(z_dim, dim)

    def scale_latent(self, z: Tensor) -> Tensor:
        """Posterior values -> latents as stored and as diffusion models see them."""
        return self.scale_factor * (z - self.shift_factor)

    def unscale_latent(self, latent: Tensor) -> Tensor:
        return latent / self.scale_factor + self.shift_factor

    def encode_step(self, frames: Tensor, cache: CausalCache) -> Posterior:
        """Frames ``(B, T, 3, H, W)`` (T = 1 on the first step, else a multiple of 4; H, W multiples
        of 8) -> the posterior of ``(B, T', z_dim, H/8, W/8)`` latent frames.
        """
        x = self.conv1(self.encoder(frames, cache))
        cache.first_step = False
        # Channels are [2D: mu | logvar, 3D: mu | logvar]; each half gives half the latent channels.
        mu_2d, logvar_2d, mu_3d, logvar_3d = x.chunk(4, dim=2)
        return Posterior(torch.cat([mu_2d, mu_3d], dim=2), torch.cat([logvar_2d, logvar_3d], dim=2))

    def decode_step(self, latents: Tensor, cache: CausalCache) -> Tensor:
        """Scaled latents ``(B, T', z_dim, h, w)`` (T' = 1 on the first step) -> frames
        ``(B, T, 3, 8h, 8w)``: 1 frame on the first step, else 4 per latent frame.
        """
        first = cache.first_step
        out = self.decoder(self.conv2(self.unscale_latent(latents)), cache)
        cache.first_step = False
        keyframes, residuals = out.chunk(2, dim=2)
        if first:
            return keyframes
        # Each group takes its first frame from the 2D (keyframe) half, the other three from the 3D.
        keyframes = keyframes.unflatten(1, (-1, TEMPORAL_STRIDE))
        residuals = residuals.unflatten(1, (-1, TEMPORAL_STRIDE))
        return torch.cat([keyframes[:, :, :1], residuals[:, :, 1:]], dim=2).flatten(1, 2)
