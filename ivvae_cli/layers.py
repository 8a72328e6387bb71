"""IV-VAE building blocks.

Activations are laid out frames-major, ``(B, T, C, H, W)``, so that the per-frame 2D work, which is
most of the model, sees a free ``(B*T, C, H, W)`` view. Channels come in two halves (KTC): the first
half is the 2D (keyframe) path, the second the 3D (temporal) path. Attribute names follow the
published checkpoints so their state dicts load unchanged.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class CausalCache:
    """What a stream carries between steps: the last input frame of every group causal conv.

    ``first_step`` holds until a step has run: the lone first frame (or first latent frame), where
    there is no previous group and the temporal resamplers stay idle. A tiled stream keeps one cache
    per tile; ``offload`` and ``restore`` let those wait on disk between steps.
    """

    def __init__(self) -> None:
        self.last_frames: dict[nn.Module, Tensor] = {}
        self.first_step = True

    def offload(self, path: Path) -> None:
        """Move the cached frames to ``path``, keeping which layer each belongs to."""
        torch.save(list(self.last_frames.values()), path)
        self.last_frames = dict.fromkeys(self.last_frames)

    def restore(self, path: Path) -> None:
        """Bring back what ``offload`` wrote (nothing to do before the first offload)."""
        if path.exists():
            self.last_frames = dict(zip(self.last_frames, torch.load(path, weights_only=True), strict=True))


def channels_last(x: Tensor) -> Tensor:
    """Images with channels innermost: oneDNN's convolutions run about 20% faster on them."""
    return x.contiguous(memory_format=torch.channels_last)


def records_grad(x: Tensor) -> bool:
    """Whether autograd records ops on ``x``: training avoids in-place writes into slices, whose
    backward costs more than they save."""
    return torch.is_grad_enabled() and x.requires_grad


def frame_conv(conv: nn.Conv2d, x: Tensor) -> Tensor:
    """Apply a 2D layer to every frame of a ``(B, T, C, H, W)`` tensor."""
    return conv(channels_last(x.flatten(0, 1))).unflatten(0, x.shape[:2])


class GroupCausalConv3d(nn.Conv3d):
    """GCConv: a 3D convolution run inside each group of ``frames_per_group`` frames.

    In time each group is padded in front with the frame before it (the previous group's last
    frame, or the cache from the previous step; the first frame of a stream pads with itself) and
    behind with zeros. Frames of a group therefore see each other symmetrically, and a stream needs
    only one cached frame per layer. Spatial padding is zero, as in the reference.

    By linearity the kernel runs as a 2D convolution of every frame with each time tap
    (``tap_weights``), and ``add_neighbours`` sums each frame's taps from the frames around it: no
    stacked copies of the input, and the cache holds the last frame's projection onto the
    previous-frame tap, which is all the next step needs of it.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, frames_per_group: int):
        super().__init__(in_channels, out_channels, kernel_size)
        if kernel_size not in (1, 3):
            raise ValueError("GroupCausalConv3d supports kernel sizes 1 and 3")
        self.frames_per_group = frames_per_group

    def tap_weights(self) -> Tensor:
        """``(taps * O, C, kh, kw)``: the current frame's tap first, then the previous and the next."""
        taps = self.weight.movedim(2, 0)
        return (taps if len(taps) == 1 else taps[[1, 0, 2]]).flatten(0, 1)

    def add_neighbours(self, taps: Tensor, cache: CausalCache | None = None) -> Tensor:
        """The current tap ``taps[:, :, :O]`` plus the previous frame's previous-tap output and,
        inside a group, the next frame's next-tap output. ``taps``: ``(B, T, taps * O, H, W)`` for a
        chunk that starts at a group boundary. Sums in place unless autograd records."""
        o, t, group = self.out_channels, taps.shape[1], self.frames_per_group
        if self.kernel_size[0] == 1:
            return taps
        current, previous, following = taps.split(o, dim=2)  # split, not slices: a cheaper backward
        first = previous[:, :1] if cache is None or self not in cache.last_frames else cache.last_frames[self]
        if cache is not None:
            cache.last_frames[self] = previous[:, -1:].clone()
        if records_grad(taps):
            in_group = torch.tensor([(i + 1) % group != 0 and i + 1 < t for i in range(t)], device=taps.device)
            ahead = F.pad(following[:, 1:], (0, 0, 0, 0, 0, 0, 0, 1)) * in_group.view(1, t, 1, 1, 1)
            return current + torch.cat([first, previous[:, :-1]], dim=1) + ahead
        current[:, :1] += first
        current[:, 1:] += previous[:, :-1]
        for start in range(0, t, group):
            end = min(start + group, t)
            current[:, start : end - 1] += following[:, start + 1 : end]
        return current


class KTCConv3d(nn.Module):
    """A KTC convolution: per-frame 2D conv (keyframe half) beside a GCConv (temporal half).

    Both read every input channel; their outputs are concatenated, 2D half first. Both halves and
    every time tap run as one 2D convolution, whose first channels are then the output.
    """

    def __init__(self, in_channels: int, out_2d: int, out_3d: int, kernel_size: int, frames_per_group: int):
        super().__init__()
        self.conv_2d = nn.Conv2d(in_channels, out_2d, kernel_size, padding=kernel_size // 2)
        self.conv_3d = GroupCausalConv3d(in_channels, out_3d, kernel_size, frames_per_group)

    def forward(self, x: Tensor, cache: CausalCache | None = None) -> Tensor:
        b, t = x.shape[:2]
        weight = torch.cat([self.conv_2d.weight, self.conv_3d.tap_weights()])
        out = self.conv_2d.out_channels + self.conv_3d.out_channels
        bias = F.pad(torch.cat([self.conv_2d.bias, self.conv_3d.bias]), (0, len(weight) - out))
        y = F.conv2d(channels_last(x.flatten(0, 1)), weight, bias, padding=self.conv_2d.padding).unflatten(0, (b, t))
        y_2d, y_taps = y.split([self.conv_2d.out_channels, len(weight) - self.conv_2d.out_channels], dim=2)
        y_3d = self.conv_3d.add_neighbours(y_taps, cache)
        return torch.cat([y_2d, y_3d], dim=2) if records_grad(y) else y[:, :, :out]  # else summed in place


class FrameConv2d(nn.Module):
    """One 2D convolution over both halves of every frame (the levels that no longer mix time)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, dilation: int = 1):
        super().__init__()
        padding = dilation * (kernel_size // 2)
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=padding, dilation=dilation)

    def forward(self, x: Tensor) -> Tensor:
        return frame_conv(self.conv, x)


def unit_norm(x: Tensor, dim: int) -> Tensor:
    """``F.normalize(x, dim=dim)`` (x / max(||x||, 1e-12)), about twice as fast on CPU."""
    return x * torch.rsqrt((x * x).sum(dim, keepdim=True).clamp_min(1e-24))


class SplitRMSNorm(nn.Module):
    """RMS norm over channels, computed separately for the 2D and the 3D half."""

    def __init__(self, half_channels: int):
        super().__init__()
        self.scale = half_channels**0.5
        self.gamma = nn.Parameter(torch.ones(2 * half_channels, 1, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        halves = unit_norm(x.unflatten(2, (2, -1)), dim=3).flatten(2, 3)
        return halves.mul_(self.gamma.view(-1, 1, 1) * self.scale)  # in place: one pass over the frames


class RMSNorm2d(nn.Module):
    """RMS norm over the channels of ``(N, C, H, W)`` images."""

    def __init__(self, channels: int):
        super().__init__()
        self.scale = channels**0.5
        self.gamma = nn.Parameter(torch.ones(channels, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return unit_norm(x, dim=1).mul_(self.gamma * self.scale)


class FrameAttention(nn.Module):
    """Single-head self-attention over the pixels of each frame, with a residual connection."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = RMSNorm2d(channels)
        self.to_qkv = nn.Conv2d(channels, channels * 3, 1)
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        b, t, _, h, w = x.shape
        frames = x.flatten(0, 1)
        # Contiguous (N, 1, H*W, C) queries, keys and values: the layout of the fused kernels.
        q, k, v = self.to_qkv(self.norm(frames)).flatten(2).transpose(1, 2).unsqueeze(1).chunk(3, dim=-1)
        y = F.scaled_dot_product_attention(q.contiguous(), k.contiguous(), v.contiguous())
        y = self.proj(y.squeeze(1).transpose(1, 2).unflatten(2, (h, w)))
        return x + y.unflatten(0, (b, t))


class KTCAttention(nn.Module):
    """Per-frame attention, one for each half."""

    def __init__(self, half_channels: int):
        super().__init__()
        self.half_channels = half_channels
        self.Attention_2d = FrameAttention(half_channels)
        self.Attention_3d = FrameAttention(half_channels)

    def forward(self, x: Tensor, cache: CausalCache | None = None) -> Tensor:
        x_2d, x_3d = x.split(self.half_channels, dim=2)
        return torch.cat([self.Attention_2d(x_2d), self.Attention_3d(x_3d)], dim=2)


def _residual_layers(norm_in: int, conv_in: nn.Module, norm_out: int, conv_out: nn.Module) -> nn.Sequential:
    # Indices 1, 4 and 5 (SiLU, SiLU, dropout) hold no weights but fix the checkpoint's names.
    return nn.Sequential(
        SplitRMSNorm(norm_in), nn.SiLU(), conv_in, SplitRMSNorm(norm_out), nn.SiLU(), nn.Identity(), conv_out
    )


class KTCResidualBlock(nn.Module):
    """Residual block of KTC convolutions: channels ``2*in_half`` -> ``2*out_half``."""

    def __init__(self, in_half: int, out_half: int, frames_per_group: int):
        super().__init__()
        self.residual = _residual_layers(
            in_half,
            KTCConv3d(2 * in_half, out_half, out_half, 3, frames_per_group),
            out_half,
            KTCConv3d(2 * out_half, out_half, out_half, 3, frames_per_group),
        )
        self.shortcut = KTCConv3d(2 * in_half, out_half, out_half, 1, frames_per_group) if in_half != out_half else None

    def forward(self, x: Tensor, cache: CausalCache | None = None) -> Tensor:
        skip = x if self.shortcut is None else self.shortcut(x)
        for layer in self.residual:
            x = layer(x, cache) if isinstance(layer, KTCConv3d) else layer(x)
        return x + skip


class FrameResidualBlock(nn.Module):
    """Residual block of per-frame 2D convolutions over both halves."""

    def __init__(self, in_half: int, out_half: int):
        super().__init__()
        self.residual = _residual_layers(
            in_half, FrameConv2d(2 * in_half, 2 * out_half, 3), out_half, FrameConv2d(2 * out_half, 2 * out_half, 3)
        )
        self.shortcut = FrameConv2d(2 * in_half, 2 * out_half, 1) if in_half != out_half else None

    def forward(self, x: Tensor, cache: CausalCache | None = None) -> Tensor:
        skip = x if self.shortcut is None else self.shortcut(x)
        return self.residual(x) + skip


class KTCDownsample(nn.Module):
    """Halve H and W in each half; with ``temporal``, also halve time after the first step.

    In time the 2D half keeps every other frame (the keyframes) and the 3D half merges frame pairs
    with a stride-2 convolution.
    """

    def __init__(self, half_channels: int, temporal: bool):
        super().__init__()
        self.half_channels = half_channels
        self.resample_2d = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(half_channels, half_channels, 3, 2))
        self.resample_3d = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(half_channels, half_channels, 3, 2))
        self.time_conv = nn.Conv3d(half_channels, half_channels, (2, 1, 1), stride=(2, 1, 1)) if temporal else None

    def forward(self, x: Tensor, cache: CausalCache | None = None) -> Tensor:
        x_2d, x_3d = x.split(self.half_channels, dim=2)
        x_2d, x_3d = frame_conv(self.resample_2d, x_2d), frame_conv(self.resample_3d, x_3d)
        if self.time_conv is None or (cache is not None and cache.first_step):
            return torch.cat([x_2d, x_3d], dim=2)
        b, t, c, h, w = x_3d.shape
        pairs = x_3d.reshape(b * t // 2, 2 * c, h, w)  # frame pairs side by side on channels
        x_3d = F.conv2d(pairs, self.time_conv.weight.transpose(1, 2).flatten(1, 2), self.time_conv.bias)
        return torch.cat([x_2d[:, ::2], x_3d.unflatten(0, (b, t // 2))], dim=2)


class KTCUpsample(nn.Module):
    """Double H and W in each half, ``half_channels`` -> ``half_channels // 2``; with ``temporal``,
    first double time after the first step.

    In time the 2D half repeats each frame and the 3D half predicts two frames from each.
    """

    def __init__(self, half_channels: int, temporal: bool):
        super().__init__()
        self.half_channels = half_channels
        out = half_channels // 2
        self.resample_2d = nn.Sequential(
            nn.Upsample(scale_factor=2.0, mode="nearest-exact"), nn.Conv2d(half_channels, out, 3, padding=1)
        )
        self.resample_3d = nn.Sequential(
            nn.Upsample(scale_factor=2.0, mode="nearest-exact"), nn.Conv2d(half_channels, out, 3, padding=1)
        )
        self.time_conv = nn.Conv3d(half_channels, 2 * half_channels, 1) if temporal else None

    def forward(self, x: Tensor, cache: CausalCache | None = None) -> Tensor:
        x_2d, x_3d = x.split(self.half_channels, dim=2)
        if self.time_conv is not None and not (cache is not None and cache.first_step):
            b, t, c, h, w = x_3d.shape
            x_2d = x_2d.repeat_interleave(2, dim=1)
            x_3d = F.conv2d(x_3d.flatten(0, 1), self.time_conv.weight.flatten(1, 2), self.time_conv.bias)
            x_3d = x_3d.reshape(b, t * 2, c, h, w)  # output channels [frame 2j | frame 2j+1]
        return torch.cat([frame_conv(self.resample_2d, x_2d), frame_conv(self.resample_3d, x_3d)], dim=2)


class AtrousPyramidHead(nn.Module):
    """The encoder's output head: parallel 1x1, 3x3 and dilated 3x3 (3, 6, 9, 12) convolutions over
    the whole frame, fused by a 1x1 convolution; each branch and the result have a 2D and a 3D half.
    """

    dilations = (0, 1, 3, 6, 9, 12)  # 0: the 1x1 branch

    def __init__(self, in_half: int, out_half: int):
        super().__init__()
        for d in self.dilations:
            branch = FrameConv2d(2 * in_half, 2 * out_half, 1 if d == 0 else 3, dilation=max(d, 1))
            self.add_module(f"PAC_{d}", branch)
        self.PAC_conv = FrameConv2d(12 * out_half, 2 * out_half, 1)
        self.out_half = out_half

    def forward(self, x: Tensor) -> Tensor:
        branches = [getattr(self, f"PAC_{d}")(x).split(self.out_half, dim=2) for d in self.dilations]
        # All 2D halves first, then all 3D halves.
        return self.PAC_conv(torch.cat([half for i in (0, 1) for half in (br[i] for br in branches)], dim=2))
