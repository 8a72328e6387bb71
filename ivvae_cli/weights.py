"""IV-VAE checkpoints: the published variants, reading state dicts safely, building the model.

A checkpoint is data, never code: ``.pth`` files go through ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import hashlib
import os
import pickle
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open
from torch import Tensor

from ivvae_cli.errors import WeightsError
from ivvae_cli.model import IVVAE

__all__ = ["PUBLISHED", "LoadedModel", "Variant", "WeightsError", "load_model", "published_variant"]


@dataclass(frozen=True)
class Variant:
    """A published IV-VAE checkpoint."""

    name: str
    z_dim: int
    dim: int
    scale_factor: float
    shift_factor: float


PUBLISHED = {
    v.name: v
    for v in (
        Variant("ivvae_z4_dim64", 4, 64, 1.3196, 0.1250),
        Variant("ivvae_z8_dim64", 8, 64, 1.0940, -0.0322),
        Variant("ivvae_z16_dim64", 16, 64, 0.9697, -0.1553),
        Variant("ivvae_z16_dim96", 16, 96, 0.7619, -0.0483),
    )
}


def published_variant(z_dim: int, dim: int) -> Variant | None:
    """The published variant with this architecture, if any."""
    return next((v for v in PUBLISHED.values() if (v.z_dim, v.dim) == (z_dim, dim)), None)


def read_checkpoint(path: str | Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    """A state dict and its metadata (safetensors only) from a ``.pth``/``.pt`` or ``.safetensors`` file."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        try:
            with safe_open(str(path), "pt") as f:
                metadata = f.metadata() or {}
            return load_file(str(path)), metadata
        except (SafetensorError, OSError, ValueError) as e:
            raise WeightsError(f"{path} is not a readable safetensors file ({e})") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        reason = str(e).splitlines()[0]
        raise WeightsError(
            f"refusing {path}: it is not a plain tensor checkpoint, loading it could run code ({reason})"
        ) from None
    except Exception as e:  # torch.load fails on foreign bytes with many error types
        reason = (str(e).splitlines() or [type(e).__name__])[0]
        raise WeightsError(f"{path} is not a readable PyTorch checkpoint ({reason})") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise WeightsError(f"{path} holds no state dict of tensors")
    return state, {}


def architecture(state: dict[str, Tensor], source: str = "checkpoint") -> tuple[int, int]:
    """``(z_dim, dim)`` read off the tensor shapes."""
    try:
        dim = state["encoder.conv1.conv_2d.weight"].shape[0]
        z_dim = state["conv1.conv_2d.weight"].shape[0]
    except KeyError as e:
        raise WeightsError(f"{source} is not an IV-VAE checkpoint: it has no {e.args[0]}") from None
    return z_dim, dim


def check_fit(model: IVVAE, state: dict[str, Tensor], source: str = "checkpoint") -> None:
    """Raise naming every missing, unexpected or mis-shaped parameter."""
    expected = model.state_dict()
    problems = []
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        f"{k} is {list(state[k].shape)}, needs {list(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    for label, names in (("missing", missing), ("unexpected", unexpected), ("wrong shape", shapes)):
        if names:
            more = f" and {len(names) - 3} more" if len(names) > 3 else ""
            problems.append(f"{label}: {', '.join(names[:3])}{more}")
    if problems:
        raise WeightsError(f"{source} does not fit IV-VAE z{model.z_dim}_dim{model.dim}: " + "; ".join(problems))


def fingerprint(state: dict[str, Tensor]) -> str:
    """A short SHA-256 of the parameter names, shapes, dtypes and values."""
    digest = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        digest.update(f"{name}:{list(t.shape)}:{t.dtype}".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()[:16]


@dataclass
class LoadedModel:
    """A model with what is known of its weights."""

    model: IVVAE
    name: str
    fingerprint: str
    path: Path


def load_model(
    path: str | Path,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    scale_factor: float | None = None,
    shift_factor: float | None = None,
) -> LoadedModel:
    """Build the model a checkpoint describes and load it strictly.

    Scale and shift come from the arguments, else the file's metadata, else the published variant
    with the same shapes, else 1 and 0.
    """
    path = Path(path)
    state, metadata = read_checkpoint(path)
    z_dim, dim = architecture(state, str(path))
    variant = published_variant(z_dim, dim)
    name = metadata.get("variant") or (variant.name if variant else f"ivvae_z{z_dim}_dim{dim}")
    if scale_factor is None:
        scale_factor = float(metadata.get("scale_factor", variant.scale_factor if variant else 1.0))
    if shift_factor is None:
        shift_factor = float(metadata.get("shift_factor", variant.shift_factor if variant else 0.0))
    with torch.device("meta"):
        model = IVVAE(z_dim, dim, scale_factor, shift_factor)
    check_fit(model, state, str(path))
    model.load_state_dict(state, strict=True, assign=True)
    model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
    return LoadedModel(model, name, fingerprint(state), path)


MODELSCOPE = "https://modelscope.cn/models/wpy1999/iv-vae"
WEIGHTS_ENV = "IVVAE_WEIGHTS"


def search_folders() -> list[Path]:
    """Where named models are looked for, in order: $IVVAE_WEIGHTS, ./weights, the user's cache."""
    folders = [Path(os.environ[WEIGHTS_ENV])] if os.environ.get(WEIGHTS_ENV) else []
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ivvae"
    return [*folders, Path("weights"), cache]


def canonical_name(name: str) -> str:
    """``z16_dim64`` and ``ivvae_z16_dim64`` both name ``ivvae_z16_dim64``."""
    return name if name.startswith("ivvae_") else f"ivvae_{name}"


def find_weights(weights: Path | None = None, model: str | None = None) -> Path:
    """The checkpoint to use: ``weights`` if given, else the named (or any published) model found
    in ``search_folders()``."""
    if weights is not None:
        if not weights.is_file():
            raise WeightsError(f"weights file not found: {weights}")
        return weights
    names = [canonical_name(model)] if model else list(PUBLISHED)
    folders = search_folders()
    for name in names:
        for folder in folders:
            for suffix in (".safetensors", ".pth"):
                if (folder / f"{name}{suffix}").is_file():
                    return folder / f"{name}{suffix}"
    wanted = names[0] if model else "any of " + ", ".join(names)
    raise WeightsError(
        f"no weights for {wanted}: looked in {', '.join(str(f) for f in folders)}; download "
        f"{names[0]}.pth from {MODELSCOPE} into one of them, or pass --weights FILE"
    )
