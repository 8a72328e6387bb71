"""Reconstruction metrics, computed frame by frame as a stream goes by.

Frames are RGB in [0, 1] (8-bit sources are exact multiples of 1/255; reconstructions are rounded
to 8 bits first, as they are written). PSNR: 10 log10(1 / MSE) over all pixels and channels of a
frame, capped at 100 dB for identical frames; a video's PSNR is the mean over frames. SSIM: Wang et
al. 2004 on each RGB channel with an 11x11 Gaussian window (sigma 1.5), K1 = 0.01, K2 = 0.03, data
range 1, population covariances, averaged over the window positions that lie wholly inside the
frame and then over channels (scikit-image's ``structural_similarity(gaussian_weights=True,
use_sample_covariance=False, data_range=1)``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from fractions import Fraction
from itertools import zip_longest
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ivvae_cli.colour import Colour
from ivvae_cli.errors import InputError
from ivvae_cli.model import TEMPORAL_STRIDE

# The video module (PyAV) is imported where videos are read or written, so that training, which
# needs only ssim_torch, runs where PyAV is absent.
PSNR_CAP = 100.0
_SIGMA, _RADIUS = 1.5, 5


def _gaussian_window() -> torch.Tensor:
    x = torch.arange(-_RADIUS, _RADIUS + 1, dtype=torch.float64)
    w = torch.exp(-0.5 * (x / _SIGMA) ** 2)
    return w / w.sum()


def psnr(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-frame PSNR of ``(t, H, W, C)`` arrays in [0, 1]."""
    diff = a.astype(np.float64) - b.astype(np.float64)
    mse = (diff**2).reshape(len(a), -1).mean(axis=1)
    with np.errstate(divide="ignore"):
        return np.minimum(10 * np.log10(1.0 / mse), PSNR_CAP)


def ssim_torch(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """SSIM of image batches ``(N, C, H, W)`` in [0, 1], one value per image (see the module
    docstring); differentiable, so training uses it too."""
    n, c, h, w = x.shape
    if min(h, w) < 2 * _RADIUS + 1:
        raise ValueError(f"SSIM needs frames of at least {2 * _RADIUS + 1} pixels each way, got {w}x{h}")
    g = _gaussian_window().to(x)
    x, y = x.reshape(n * c, 1, h, w), y.reshape(n * c, 1, h, w)

    def blur(z: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.conv2d(z, g.view(1, 1, -1, 1)), g.view(1, 1, 1, -1))

    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx * mx, blur(y * y) - my * my, blur(x * y) - mx * my
    c1, c2 = 0.01**2, 0.03**2
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return s.mean(dim=(1, 2, 3)).view(n, c).mean(dim=1)


def ssim(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-frame SSIM of ``(t, H, W, C)`` arrays in [0, 1], in float64."""
    x = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float64)).permute(0, 3, 1, 2)
    y = torch.from_numpy(np.ascontiguousarray(b, dtype=np.float64)).permute(0, 3, 1, 2)
    return ssim_torch(x, y).numpy()


def group_position(index: int) -> str:
    """Where a frame sits in IV-VAE's time structure: ``first`` (the lone first frame), else its
    position 0-3 in its group of four (0: the keyframe, from the 2D half)."""
    return "first" if index == 0 else str((index - 1) % TEMPORAL_STRIDE)


POSITIONS = ("first", *(str(i) for i in range(TEMPORAL_STRIDE)))


def _signed(frames: np.ndarray) -> torch.Tensor:
    """``(t, H, W, 3)`` in [0, 1] -> ``(t, 3, H, W)`` in [-1, 1], as LPIPS takes them."""
    return torch.from_numpy(np.ascontiguousarray(frames, np.float32)).permute(0, 3, 1, 2) * 2 - 1


def _mean(values: list[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return float(np.mean(finite)) if finite else math.nan


@dataclass
class Metrics:
    """Per-frame PSNR, SSIM and flicker of a stream of frame pairs, and their summary.

    Flicker of frame i: the mean absolute difference, in 8-bit levels, between the reconstruction's
    change from frame i-1 to i and the source's (0 when motion is reproduced exactly).
    """

    psnr: list[float] = field(default_factory=list)
    ssim: list[float] = field(default_factory=list)
    flicker: list[float] = field(default_factory=list)
    lpips: list[float] = field(default_factory=list)
    lpips_net: torch.nn.Module | None = field(default=None, repr=False)
    _last: tuple[np.ndarray, np.ndarray] | None = field(default=None, repr=False)

    def update(self, source: np.ndarray, reconstruction: np.ndarray) -> None:
        """Frames ``(t, H, W, 3)`` in [0, 1]; the reconstruction is rounded to 8 bits first."""
        recon = np.rint(np.clip(reconstruction, 0, 1) * 255) / 255
        self.psnr.extend(psnr(source, recon).tolist())
        small = min(source.shape[1:3]) < 2 * _RADIUS + 1
        self.ssim.extend([math.nan] * len(source) if small else ssim(source, recon).tolist())
        if self.lpips_net is not None:
            with torch.no_grad():
                self.lpips.extend(self.lpips_net(_signed(source), _signed(recon)).flatten().tolist())
        for src, rec in zip(source, recon, strict=True):
            if self._last is None:
                self.flicker.append(math.nan)
            else:
                change = (rec.astype(np.float64) - self._last[1]) - (src.astype(np.float64) - self._last[0])
                self.flicker.append(float(np.abs(change).mean() * 255))
            self._last = (src.astype(np.float64), rec.astype(np.float64))

    def per_frame(self) -> list[dict]:
        rows = [
            {"index": i, "position": group_position(i), "psnr_db": p, "ssim": s, "flicker": f}
            for i, (p, s, f) in enumerate(zip(self.psnr, self.ssim, self.flicker, strict=True))
        ]
        for row, value in zip(rows, self.lpips, strict=False):
            row["lpips"] = value
        return rows

    @staticmethod
    def positions(rows: list[dict]) -> dict[str, dict]:
        """Mean PSNR and SSIM of the first frame and of each position in a group, from ``per_frame()``."""
        out = {}
        for position in POSITIONS:
            mine = [r for r in rows if r["position"] == position]
            if mine:
                out[position] = {
                    "frames": len(mine),
                    "psnr_db": _mean([r["psnr_db"] for r in mine]),
                    "ssim": _mean([r["ssim"] for r in mine]),
                }
        return out

    def summary(self, worst: int = 5) -> dict:
        rows = self.per_frame()
        positions = self.positions(rows)
        in_groups = [positions[p] for p in POSITIONS[1:] if p in positions]
        spread = {
            key: (max(v[key] for v in in_groups) - min(v[key] for v in in_groups)) if len(in_groups) > 1 else math.nan
            for key in ("psnr_db", "ssim")
        }
        worst_frames = sorted(rows, key=lambda r: r["psnr_db"])[:worst]
        return {
            "frames": len(self.psnr),
            "psnr_db": _mean(self.psnr),
            "ssim": _mean(self.ssim),  # NaN for frames under 11x11 pixels
            "psnr_db_min": min(self.psnr, default=math.nan),
            "ssim_min": min((v for v in self.ssim if not math.isnan(v)), default=math.nan),
            "flicker": _mean(self.flicker),
            **({"lpips": _mean(self.lpips)} if self.lpips else {}),
            "positions": positions,
            "position_spread": spread,
            "worst_frames": [{k: r[k] for k in ("index", "position", "psnr_db", "ssim")} for r in worst_frames],
        }


def load_lpips() -> torch.nn.Module:
    """The LPIPS (AlexNet) network, from the ``lpips`` package and weights already on this machine;
    ivvae never downloads them, and says so rather than report a made-up figure."""
    try:
        import lpips  # optional: pip install lpips
    except ImportError:
        raise RuntimeError("LPIPS needs the 'lpips' package and its AlexNet weights on this machine") from None
    try:
        return lpips.LPIPS(net="alex", verbose=False).eval()
    except Exception as e:  # a download attempt without network, a missing file
        raise RuntimeError(f"LPIPS weights are not available on this machine ({e.__class__.__name__})") from None


def sizes(latent_bytes: int, frames: int, height: int, width: int, source_bytes: int | None) -> dict:
    """How the latent's size compares with the raw 8-bit RGB frames and the source file."""
    raw = frames * height * width * 3
    out = {"latent_bytes": latent_bytes, "raw_rgb8_bytes": raw, "raw_to_latent": round(raw / latent_bytes, 2)}
    if source_bytes:
        out |= {"source_bytes": source_bytes, "source_to_latent": round(source_bytes / latent_bytes, 3)}
    return out


def plot_per_frame(metrics: Metrics, path: Path) -> None:
    """PSNR and SSIM per frame, coloured by position in group (needs matplotlib: the plot extra)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise RuntimeError("--plot needs matplotlib (pip install 'ivvae-cli[plot]')") from None
    rows = metrics.per_frame()
    figure, axes = plt.subplots(2, 1, sharex=True, figsize=(10, 5))
    for axis, key in zip(axes, ("psnr_db", "ssim"), strict=True):
        axis.plot([r["index"] for r in rows], [r[key] for r in rows], color="0.6", linewidth=0.8)
        for position in POSITIONS:
            mine = [r for r in rows if r["position"] == position]
            axis.scatter([r["index"] for r in mine], [r[key] for r in mine], s=8, label=f"position {position}")
        axis.set_ylabel("PSNR (dB)" if key == "psnr_db" else "SSIM")
    axes[0].legend(fontsize="small", ncol=5)
    axes[1].set_xlabel("frame")
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


ERROR_GAIN = 8  # the comparison video's error map: |source - reconstruction| times this


class ComparisonWriter:
    """A video of source | reconstruction | amplified error, side by side, converted and tagged as
    the source's ``colour`` says (``output_format``)."""

    def __init__(self, path: Path, width: int, height: int, frame_rate: Fraction, time_base: Fraction, colour: Colour):
        from ivvae_cli.video import VideoWriter, output_format

        fmt = output_format(path, 3 * width, height, colour=colour)
        self.writer = VideoWriter(path, fmt, frame_rate=frame_rate, time_base=time_base)

    def write(self, source: np.ndarray, reconstruction: np.ndarray, pts: list[int]) -> None:
        recon = np.rint(np.clip(reconstruction, 0, 1) * 255) / 255
        error = np.clip(np.abs(source - recon) * ERROR_GAIN, 0, 1)
        self.writer.write(np.concatenate([source, recon, error], axis=2), pts)

    def __enter__(self) -> ComparisonWriter:
        return self

    def __exit__(self, *error) -> None:
        self.writer.__exit__(*error)


def compare_videos(
    a: Path,
    b: Path,
    *,
    max_frames: int | None = None,
    comparison: Path | None = None,
    lpips: torch.nn.Module | None = None,
    progress: Callable[[int], None] | None = None,
) -> tuple[Metrics, dict]:
    """Metrics of video ``b`` against video ``a``, frame by frame (any two videos, any codec).
    Returns the metrics and the frame counts; frames past the shorter video are not compared."""
    from ivvae_cli.video import probe, read_frames, unit_float

    info_a, info_b = probe(a), probe(b)
    if (info_a.width, info_a.height) != (info_b.width, info_b.height):
        raise InputError(f"{a} is {info_a.width}x{info_a.height} but {b} is {info_b.width}x{info_b.height}")
    metrics = Metrics(lpips_net=lpips)
    counts = {"a": 0, "b": 0}
    first_pts = None
    side = (
        ComparisonWriter(comparison, info_a.width, info_a.height, info_a.frame_rate, info_a.time_base, info_a.colour)
        if comparison
        else nullcontext()
    )
    with side as writer:
        # Both readers yield chunks of the same length, so chunks pair up frame for frame.
        for chunk_a, chunk_b in zip_longest(
            read_frames(a, max_frames=max_frames, info=info_a), read_frames(b, max_frames=max_frames, info=info_b)
        ):
            counts["a"] += len(chunk_a[0]) if chunk_a else 0
            counts["b"] += len(chunk_b[0]) if chunk_b else 0
            if not (chunk_a and chunk_b):
                continue
            n = min(len(chunk_a[0]), len(chunk_b[0]))
            x, y = unit_float(chunk_a[0][:n]), unit_float(chunk_b[0][:n])
            metrics.update(x, y)
            first_pts = chunk_a[1][0] if first_pts is None else first_pts
            if writer:
                writer.write(x, y, [p - first_pts for p in chunk_a[1][:n]])
            if progress:
                progress(n)
    return metrics, counts
