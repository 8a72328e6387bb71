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
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

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


@dataclass
class Metrics:
    """Per-frame PSNR and SSIM of a stream, and their summary."""

    psnr: list[float] = field(default_factory=list)
    ssim: list[float] = field(default_factory=list)

    def update(self, source: np.ndarray, reconstruction: np.ndarray) -> None:
        recon = np.rint(np.clip(reconstruction, 0, 1) * 255) / 255
        self.psnr.extend(psnr(source, recon).tolist())
        small = min(source.shape[1:3]) < 2 * _RADIUS + 1
        self.ssim.extend([math.nan] * len(source) if small else ssim(source, recon).tolist())

    def summary(self) -> dict[str, float]:
        return {
            "frames": len(self.psnr),
            "psnr_db": float(np.mean(self.psnr)) if self.psnr else math.nan,
            "ssim": float(np.mean(self.ssim)) if self.ssim else math.nan,  # NaN below 11x11 frames
            "psnr_db_min": float(np.min(self.psnr)) if self.psnr else math.nan,
            "ssim_min": float(np.min(self.ssim)) if self.ssim else math.nan,
        }
