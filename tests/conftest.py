"""Shared fixtures: paths to ../shared and small random-weight models."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ivvae_cli.model import IVVAE

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
REFERENCE = SHARED / "reference"
VIDEOS = SHARED / "videos"


def random_model(z_dim: int = 8, dim: int = 8, seed: int = 0, scale: float = 0.9, shift: float = 0.1) -> IVVAE:
    """A small model with every weight random (norm gains too, so none is trivial)."""
    torch.manual_seed(seed)
    model = IVVAE(z_dim, dim, scale, shift)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


@pytest.fixture(scope="session")
def small_model() -> IVVAE:
    return random_model()


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory) -> Path:
    """A small (z16, dim 8) random-weight checkpoint, as users pass with --weights."""
    from safetensors.torch import save_file

    path = tmp_path_factory.mktemp("weights") / "tiny.safetensors"
    save_file(
        random_model(16, 8, seed=3).state_dict(), str(path), metadata={"scale_factor": "1.0", "shift_factor": "0.0"}
    )
    return path
