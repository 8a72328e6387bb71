"""The IV-VAE model (Wu et al., CVPR 2025): 4x8x8 compression with keyframe-based temporal
compression (KTC) and group causal convolution (GCConv).

The model is run in steps: the first frame alone, then groups of four frames (one latent frame
each). ``encode_step`` and ``decode_step`` run one step with a ``CausalCache``; ``encode`` and
``decode`` stream a whole tensor through them (see ``ivvae_cli.stream`` for the chunked form).
"""

from __future__ import annotations

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
from ivvae_cli.stream import StreamDecoder, StreamEncoder


class Encoder(nn.Module):
    """Video frames -> 2*z_dim channels: the posterior moments of both halves, before mixing."""

    def __init__(self, z_dim: int, dim: int):
        super().__init__()
        d1, d2, d4 = dim, 2 * dim, 4 * dim
        self.conv1 = KTCConv3d(3, d1, d1, 3, frames_per_group=4)
        self.downsamples = nn.ModuleList(
            [
                KTCResidualBlock(d1, d1, 4),
                KTCResidualBlock(d1, d1, 4),
                KTCDownsample(d1, temporal=False),
                KTCResidualBlock(d1, d2, 4),
                KTCResidualBlock(d2, d2, 4),
                KTCDownsample(d2, temporal=True),  # groups of 4 frames -> 2
                KTCResidualBlock(d2, d4, 2),
                KTCResidualBlock(d4, d4, 2),
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
        return self.head(x)


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
                KTCResidualBlock(d2, d4, 2),
                KTCResidualBlock(d4, d4, 2),
                KTCResidualBlock(d4, d4, 2),
                KTCUpsample(d4, temporal=True),  # 2 frames -> 4
                KTCResidualBlock(d2, d2, 4),
                KTCResidualBlock(d2, d2, 4),
                KTCResidualBlock(d2, d2, 4),
                KTCUpsample(d2, temporal=False),
                KTCResidualBlock(d1, d1, 4),
                KTCResidualBlock(d1, d1, 4),
                KTCResidualBlock(d1, d1, 4),
            ]
        )
        self.head = nn.Sequential(SplitRMSNorm(d1), nn.SiLU(), KTCConv3d(2 * d1, 3, 3, 3, frames_per_group=4))

    def forward(self, x: Tensor, cache: CausalCache) -> Tensor:
        x = self.conv1(x)
        for layer in [*self.middle, *self.upsamples]:
            x = layer(x, cache)
        norm, act, conv = self.head
        return conv(act(norm(x)), cache)


class IVVAE(nn.Module):
    """IV-VAE with ``z_dim`` latent channels (half from each KTC half) and base width ``dim``.

    Latents are ``scale_factor * (mu - shift_factor)``. Videos are float tensors ``(B, 3, T, H, W)``
    in [-1, 1]; latents are ``(B, z_dim, 1 + ceil((T - 1) / 4), ceil(H / 8), ceil(W / 8))``.
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

    # -- one step ---------------------------------------------------------------------------------

    def encode_step(self, frames: Tensor, cache: CausalCache) -> tuple[Tensor, Tensor]:
        """Frames ``(B, T, 3, H, W)`` (T = 1 on the first step, else a multiple of 4; H, W multiples
        of 8) -> posterior ``(mu, logvar)``, each ``(B, T', z_dim, H/8, W/8)``.
        """
        x = self.conv1(self.encoder(frames, cache))
        cache.step += 1
        # Channels are [2D: mu | logvar, 3D: mu | logvar]; the posterior takes mu of both halves.
        mu_2d, logvar_2d, mu_3d, logvar_3d = x.chunk(4, dim=2)
        return torch.cat([mu_2d, mu_3d], dim=2), torch.cat([logvar_2d, logvar_3d], dim=2)

    def decode_step(self, latents: Tensor, cache: CausalCache) -> Tensor:
        """Scaled latents ``(B, T', z_dim, h, w)`` (T' = 1 on the first step) -> frames
        ``(B, T, 3, 8h, 8w)``: 1 frame on the first step, else 4 per latent frame.
        """
        first = cache.first_step
        out = self.decoder(self.conv2(latents / self.scale_factor + self.shift_factor), cache)
        cache.step += 1
        keyframes, residuals = out.chunk(2, dim=2)
        if first:
            return keyframes
        # Each group takes its first frame from the 2D (keyframe) half, the other three from the 3D.
        keyframes, residuals = keyframes.unflatten(1, (-1, 4)), residuals.unflatten(1, (-1, 4))
        return torch.cat([keyframes[:, :, :1], residuals[:, :, 1:]], dim=2).flatten(1, 2)

    # -- whole tensors ----------------------------------------------------------------------------

    def encode(
        self,
        video: Tensor,
        *,
        sample: bool = False,
        generator: torch.Generator | None = None,
        groups_per_step: int = 1,
    ) -> Tensor:
        """Video ``(B, 3, T, H, W)`` in [-1, 1] -> latent ``(B, z_dim, T', h, w)``.

        The posterior mean unless ``sample``. Any T >= 1, H, W: the last frame is repeated up to
        1 + 4k frames and edges are replicated up to multiples of 8; ``decode(..., size=(T, H, W))``
        gives the exact size back.
        """
        stream = StreamEncoder(self, sample=sample, generator=generator, groups_per_step=groups_per_step)
        return torch.cat([stream.push(video), stream.finish()], dim=2)

    def decode(self, latent: Tensor, *, size: tuple[int, int, int] | None = None, groups_per_step: int = 1) -> Tensor:
        """Latent ``(B, z_dim, T', h, w)`` -> video ``(B, 3, T, H, W)``, not clamped.

        Without ``size``, T = 1 + 4 (T' - 1), H = 8h, W = 8w; with it, cropped to ``(T, H, W)``.
        """
        stream = StreamDecoder(self, size=size, groups_per_step=groups_per_step)
        return torch.cat([stream.push(latent), stream.finish()], dim=2)
