"""Shared fixtures: paths to ../shared and small random-weight models; tests marked ``shared`` are
left out, and counted, where ../shared is absent (a bare clone)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ivvae_cli.model import IVVAE

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
REFERENCE = SHARED / "reference"
VIDEOS = SHARED / "videos"
LEFT_OUT = pytest.StashKey[int]()


@pytest.hookimpl(trylast=True)  # after -m and -k have deselected: count only what would have run
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Without ../shared, skip the tests that need it (CI has it and runs them all)."""
    needing = [item for item in items if item.get_closest_marker("shared")]
    config.stash[LEFT_OUT] = 0 if SHARED.is_dir() else len(needing)
    if not SHARED.is_dir():
        for item in needing:
            item.add_marker(pytest.mark.skip(reason=f"needs ../shared (absent at {SHARED})"))


def pytest_terminal_summary(terminalreporter, config: pytest.Config) -> None:
    left_out = config.stash.get(LEFT_OUT, 0)
    if left_out and not config.option.collectonly:
        terminalreporter.write_line(f"left out {left_out} tests that need ../shared (absent at {SHARED})")


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
