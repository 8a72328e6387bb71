"""IV-VAE building blocks.

Activations are laid out frames-major, ``(B, T, C, H, W)``, so that the per-frame 2D work, which is
most of the model, sees a free ``(B*T, C, H, W)`` view; in memory channels are innermost
(``(B, T, H, W, C)``), the channels-last layout the convolutions run fastest on, and every layer
keeps it. Channels come in two halves (KTC): the first half is the 2D (keyframe) path, the second
the 3D (temporal) path. Attribute names follow the published checkpoints so their state dicts load
unchanged.

Without autograd (inference) the layers normalise, activate and sum in place into the buffers their
convolutions return, which are theirs alone; with autograd (training) they work out of place.
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


def records_grad(*tensors: Tensor) -> bool:
    """Whether autograd records ops on any of ``tensors``: training avoids in-place writes, whose
    backward costs more than they save (or which it cannot differentiate)."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def cat_channels(parts: list[Tensor]) -> Tensor:
    """``torch.cat(parts, dim=2)`` of ``(B, T, C, H, W)`` tensors, channels innermost in memory (a
    plain cat of 5D tensors makes them outermost, and the next convolution would copy it back)."""
    return torch.cat([p.movedim(2, -1) for p in parts], dim=-1).movedim(-1, 2)


def add_skip(x: Tensor, skip: Tensor) -> Tensor:
    """A residual sum, into ``x`` (a block's own new tensor) unless autograd records."""
    return x + skip if records_grad(x) else x.add_(skip)


def frame_conv(conv: nn.Conv2d, x: Tensor) -> Tensor:
    """Apply a 2D layer to every frame of a ``(B, T, C, H, W)`` tensor."""
    return conv(channels_last(x.flatten(0, 1))).unflatten(0, x.shape[:2])


class GroupCausalConv3d(nn.Conv3d):
    """GCConv: a 3D convolution run inside each group of ``frames_per_group`` frames.

    In time each group is padded in front with the frame before it (the previous group's last
    frame, or the cache from the previous step; the first frame of a stream pads with itself) and
    behind with zeros. Frames of a group therefore see each other symmetrically, and a stream needs
    only one cached frame per layer. Spatial padding is zero, as in the reference.

    By linearity the kernel runs as 2D convolutions of the frames with each time tap (see
    ``KTCConv3d``), and ``add_neighbours`` sums each frame's taps from the frames around it: no
    stacked copies of the input, and the cache holds the last frame's projection onto the
    previous-frame tap, which is all the next step needs of it.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, frames_per_group: int):
        super().__init__(in_channels, out_channels, kernel_size)
        if kernel_size not in (1, 3):
            raise ValueError("GroupCausalConv3d supports kernel sizes 1 and 3")
        self.frames_per_group = frames_per_group

    def add_neighbours(
        self, current: Tensor, previous: Tensor, following: Tensor | None, cache: CausalCache | None = None
    ) -> Tensor:
        """``current`` (the current-frame tap's output) plus the previous frame's ``previous`` tap
        output and, inside a group, the next frame's ``following`` tap output. ``current`` and
        ``previous`` are ``(B, T, O, H, W)`` for a chunk that starts at a group boundary;
        ``following`` covers its frames 1 to T-1 (None when T = 1: no frame has a next one).
        Sums into ``current`` unless autograd records."""
        t, group = current.shape[1], self.frames_per_group
        first = previous[:, :1] if cache is None or self not in cache.last_frames else cache.last_frames[self]
        if cache is not None:
            # A dense channels-last copy, strided the same at every step (torch.compile guards on strides).
            frame = previous[:, -1]
            cache.last_frames[self] = torch.empty_like(frame, memory_format=torch.channels_last).copy_(frame)[:, None]
        if records_grad(current, previous):  # following comes from the same weights and input as previous
            y = current + torch.cat([first, previous[:, :-1]], dim=1)
            if following is None:
                return y
            in_group = torch.arange(1, t, device=current.device) % group != 0
            return y + F.pad(following * in_group.view(1, t - 1, 1, 1, 1), (0, 0, 0, 0, 0, 0, 0, 1))
        current[:, :1] += first
        current[:, 1:] += previous[:, :-1]
        for start in range(0, t if following is not None else 0, group):
            end = min(start + group, t)
            current[:, start : end - 1] += following[:, start : end - 1]  # frames start+1 .. end-1
        return current


class KTCConv3d(nn.Module):
    """A KTC convolution: per-frame 2D conv (keyframe half) beside a GCConv (temporal half).

    Both read every input channel; their outputs are concatenated, 2D half first. The 2D half and
    the 3D half's current-frame tap run as one 2D convolution, whose output is the layer's; the
    previous-frame tap runs on every frame and the next-frame tap on all but the first (no frame
    before it takes it), as two more, and they are summed in from the frames around. Narrower
    convolutions run as fast per output channel on CPU, and the output needs no copy out of a
    wider one.
    """

    def __init__(self, in_channels: int, out_2d: int, out_3d: int, kernel_size: int, frames_per_group: int):
        super().__init__()
        self.conv_2d = nn.Conv2d(in_channels, out_2d, kernel_size, padding=kernel_size // 2)
        self.conv_3d = GroupCausalConv3d(in_channels, out_3d, kernel_size, frames_per_group)

    def forward(self, x: Tensor, cache: CausalCache | None = None) -> Tensor:
        b, t = x.shape[:2]
        frames, padding = channels_last(x.flatten(0, 1)), self.conv_2d.padding
        taps = self.conv_3d.weight.unbind(2)  # previous, current, next frame (or only current)
        weight = torch.cat([self.conv_2d.weight, taps[len(taps) // 2]])
        bias = torch.cat([self.conv_2d.bias, self.conv_3d.bias])
        y = F.conv2d(frames, weight, bias, padding=padding).unflatten(0, (b, t))
        if len(taps) == 1:
            return y
        previous = F.conv2d(frames, taps[0], None, padding=padding).unflatten(0, (b, t))
        following = None
        if t > 1:
            later = channels_last(x[:, 1:].flatten(0, 1))  # a view for one clip
            following = F.conv2d(later, taps[2], None, padding=padding).unflatten(0, (b, t - 1))
        y_2d, y_3d = y.split(self.conv_2d.out_channels, dim=2)
        y_3d = self.conv_3d.add_neighbours(y_3d, previous, following, cache)
        return cat_channels([y_2d, y_3d]) if records_grad(y) else y  # else summed in place


def padded_conv(layers: nn.Sequential, x: Tensor) -> Tensor:
    """A resampler's (padding, strided convolution) on every frame: the padding writes the
    channels-last copy the convolution reads (no separate conversion first)."""
    pad, conv = layers
    return conv(pad(x.flatten(0, 1))).unflatten(0, x.shape[:2])


# Which 3x3 kernel rows (or columns) fall on which input row, for the two output rows an input row
# turns into under nearest 2x upsampling: output row 2i reads rows (i-1, i, i) through kernel rows
# 0, 1, 2, output row 2i+1 reads (i, i, i+1). Indexed (phase, tap of the 2x2 kernel, 3x3 row).
_UPSAMPLE_TAPS = ((1.0, 0.0, 0.0), (0.0, 1.0, 1.0)), ((1.0, 1.0, 0.0), (0.0, 0.0, 1.0))


def upsampled_conv(layers: nn.Sequential, x: Tensor) -> Tensor:
    """A resampler's (nearest 2x upsampling, 3x3 convolution) on every frame, as one 2x2
    convolution of the frames themselves: the upsampled copies share their neighbours, so their
    taps add up into one 2x2 kernel for each of the four output phases. 16 multiply-adds per
    output value instead of 36, and no upsampled copy of the input; the phases are interleaved as
    the output is written."""
    conv = layers[1]
    n, c, h, w = x.flatten(0, 1).shape
    o = conv.out_channels
    taps = torch.tensor(_UPSAMPLE_TAPS, dtype=conv.weight.dtype, device=conv.weight.device)
    kernels = torch.einsum("pry,ocyx,qsx->pqocrs", taps, conv.weight, taps).reshape(4 * o, c, 2, 2)
    y = F.conv2d(channels_last(x.flatten(0, 1)), kernels, conv.bias.repeat(4), padding=1)
    y = channels_last(y)  # (N, 4*O, H+1, W+1): phase (py, px) at channels [(2py+px)*O, ...)
    # Output pixel (2i+py, 2j+px) is phase (py, px) at (i+py, j+px): one strided view of y.
    sn, _, sh, sw = y.stride()
    phases = y.as_strided((n, h, 2, w, 2, o), (sn, sh, sh + 2 * o, sw, sw + o, 1))
    return phases.reshape(n, 2 * h, 2 * w, o).permute(0, 3, 1, 2).unflatten(0, x.shape[:2])


class FrameConv2d(nn.Module):
    """One 2D convolution over both halves of every frame (the levels that no longer mix time)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, dilation: int = 1):
        super().__init__()
        padding = dilation * (kernel_size // 2)
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=padding, dilation=dilation)

    def forward(self, x: Tensor, cache: CausalCache | None = None) -> Tensor:
        """``cache``: taken, and unused, so that blocks call either kind of convolution alike."""
        return frame_conv(self.conv, x)


def rms_rows(rows: Tensor, weight: Tensor, inplace: bool = False) -> Tensor:
    """RMS norm of ``rows`` over the last dim, times ``weight`` (broadcast over the last dims):
    ``F.normalize(rows, dim=-1) * weight``. Without autograd: one reduction and two passes, into
    ``rows`` with ``inplace``."""
    inverse = 1 / torch.linalg.vector_norm(rows, dim=-1, keepdim=True).clamp_min(1e-12)
    if records_grad(rows, weight):
        return rows * inverse * weight
    out = rows.mul_(inverse) if inplace else rows * inverse
    return out.mul_(weight)


class SplitRMSNorm(nn.Module):
    """RMS norm over channels, computed separately for the 2D and the 3D half."""

    def __init__(self, half_channels: int):
        super().__init__()
        self.scale = half_channels**0.5
        self.gamma = nn.Parameter(torch.ones(2 * half_channels, 1, 1, 1))

    def forward(self, x: Tensor, inplace: bool = False) -> Tensor:
        """``x``: ``(..., C, H, W)``, normalised over a channels-innermost view; ``inplace`` lets it
        overwrite ``x`` (when autograd does not record)."""
        halves = x.movedim(-3, -1).unflatten(-1, (2, -1))  # (..., H, W, 2, C/2)
        return rms_rows(halves, self.gamma.view(2, -1) * self.scale, inplace).flatten(-2).movedim(-1, -3)

    def silu(self, x: Tensor, inplace: bool = False) -> Tensor:
        """``F.silu(self(x))``, activated in place unless autograd records."""
        y = self(x, inplace)
        return F.silu(y, inplace=not records_grad(y))


class RMSNorm2d(nn.Module):
    """RMS norm over the channels of pixel rows ``(..., C)``."""

    def __init__(self, channels: int):
        super().__init__()
        self.scale = channels**0.5
        self.gamma = nn.Parameter(torch.ones(channels, 1, 1))

    def forward(self, rows: Tensor) -> Tensor:
        """``rows``: ``(..., C)``, channels last."""
        return rms_rows(rows, self.gamma.view(-1) * self.scale)


class FrameAttention(nn.Module):
    """Single-head self-attention over the pixels of each frame, with a residual connection."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = RMSNorm2d(channels)
        self.to_qkv = nn.Conv2d(channels, channels * 3, 1)
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        b, t, _, h, w = x.shape
        # Pixels as rows, (N, H*W, C): a view of channels-last frames, where the 1x1 convolutions are
        # matrix products and the queries, keys and values come out in the attention kernel's layout.
        rows = x.movedim(2, -1).flatten(0, 1).flatten(1, 2)
        qkv = F.linear(self.norm(rows), self.to_qkv.weight.flatten(1), self.to_qkv.bias)
        y = F.scaled_dot_product_attention(*qkv.unsqueeze(1).chunk(3, dim=-1)).squeeze(1)
        y = add_skip(F.linear(y, self.proj.weight.flatten(1), self.proj.bias), rows)
        return y.unflatten(1, (h, w)).unflatten(0, (b, t)).movedim(-1, 2)


class KTCAttention(nn.Module):
    """Per-frame attention, one for each half."""

    def __init__(self, half_channels: int):
        super().__init__()
        self.half_channels = half_channels
        self.Attention_2d = FrameAttention(half_channels)
        self.Attention_3d = FrameAttention(half_channels)

    def forward(self, x: Tensor, cache: CausalCache | None = None) -> Tensor:
        x_2d, x_3d = x.split(self.half_channels, dim=2)
        return cat_channels([self.Attention_2d(x_2d), self.Attention_3d(x_3d)])


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
        norm_in, _, conv_in, norm_out, _, _, conv_out = self.residual
        skip = x if self.shortcut is None else self.shortcut(x)
        y = conv_in(norm_in.silu(x), cache)
        return add_skip(conv_out(norm_out.silu(y, inplace=True), cache), skip)


class FrameResidualBlock(nn.Module):
    """Residual block of per-frame 2D convolutions over both halves."""

    def __init__(self, in_half: int, out_half: int):
        super().__init__()
        self.residual = _residual_layers(
            in_half, FrameConv2d(2 * in_half, 2 * out_half, 3), out_half, FrameConv2d(2 * out_half, 2 * out_half, 3)
        )
        self.shortcut = FrameConv2d(2 * in_half, 2 * out_half, 1) if in_half != out_half else None

    forward = KTCResidualBlock.forward


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
        temporal = self.time_conv is not None and not (cache is not None and cache.first_step)
        if temporal:
            x_2d = x_2d[:, ::2]  # the keyframes: the only frames of the 2D half that are kept
        x_2d, x_3d = padded_conv(self.resample_2d, x_2d), padded_conv(self.resample_3d, x_3d)
        if temporal:
            b, t, c, h, w = x_3d.shape
            pairs = x_3d.reshape(b * t // 2, 2 * c, h, w)  # frame pairs side by side on channels
            x_3d = F.conv2d(pairs, self.time_conv.weight.transpose(1, 2).flatten(1, 2), self.time_conv.bias)
            x_3d = x_3d.unflatten(0, (b, t // 2))
        return cat_channels([x_2d, x_3d])


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
        temporal = self.time_conv is not None and not (cache is not None and cache.first_step)
        if temporal:
            b, t, c, h, w = x_3d.shape
            x_3d = F.conv2d(x_3d.flatten(0, 1), self.time_conv.weight.flatten(1, 2), self.time_conv.bias)
            # Output channels [frame 2j | frame 2j+1], regrouped as frames, channels innermost.
            x_3d = x_3d.movedim(1, -1).unflatten(-1, (2, c)).movedim(-2, 1).reshape(b, 2 * t, h, w, c).movedim(-1, 2)
        y_2d, y_3d = upsampled_conv(self.resample_2d, x_2d), upsampled_conv(self.resample_3d, x_3d)
        if not temporal:
            return cat_channels([y_2d, y_3d])
        # The 2D half repeats each frame: convolved once, repeated as the output is written.
        y_2d = y_2d.movedim(2, -1).unsqueeze(2).expand(-1, -1, 2, -1, -1, -1)
        y_3d = y_3d.movedim(2, -1).unflatten(1, (t, 2))
        return torch.cat([y_2d, y_3d], dim=-1).flatten(1, 2).movedim(-1, 2)


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
        return self.PAC_conv(cat_channels([half for i in (0, 1) for half in (br[i] for br in branches)]))
