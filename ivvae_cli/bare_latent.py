"""Bare latent tensors, as a diffusion model's sampler saves them: ``.safetensors`` without ivvae's
header, ``.pt``/``.pth`` (``torch.save``), ``.npy``/``.npz``; ``(C, T, h, w)`` or ``(B, C, T, h, w)``,
in ivvae's latent space (``scaled``: ``scale_factor * (z - shift_factor)``, what latent files and
``LatentDataset`` give) or the posterior's own (``unscaled``).

They are untrusted input: nothing is unpickled (``torch.load(weights_only=True)``, numpy without
pickle), and each tensor's declared shape and dtype are checked before its values are read, then
its values for NaN and infinity. What a bare tensor cannot say (the rate, the output size) the
caller gives; the model is the caller's too, and must have the tensor's channel count.
"""

from __future__ import annotations

import re
import zipfile
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open

from ivvae_cli.errors import InputError
from ivvae_cli.latent_file import FORMAT_NAME, LatentFile, LatentHeader, non_finite
from ivvae_cli.model import SPATIAL_STRIDE, TEMPORAL_STRIDE, VideoSize
from ivvae_cli.weights import LoadedModel

BARE_SUFFIXES = frozenset({".safetensors", ".pt", ".pth", ".npy", ".npz"})
LATENT_SPACES = ("scaled", "unscaled")
DEFAULT_FPS = Fraction(24)  # what most open video diffusion models sample at; --fps says otherwise
MAX_ELEMENTS = 2**31  # 8 GiB of float32: far past any clip a diffusion model samples
MAX_SIDE = 2**16
FLOAT_DTYPES = {"float16", "bfloat16", "float32", "float64"}
_SAFETENSORS_DTYPES = {"F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64"}


@dataclass(frozen=True)
class BareLatent:
    """A bare latent as read: ``latent`` is ``(B, C, T, h, w)`` float32, whatever it was stored as."""

    path: Path
    latent: torch.Tensor


@dataclass(frozen=True)
class BareOptions:
    """What a bare tensor cannot say of itself."""

    fps: Fraction = DEFAULT_FPS
    space: str = "scaled"  # or "unscaled": the posterior's own space
    size: tuple[int, int] | None = None  # width, height: the decoded frames cropped to it
    key: str | None = None  # which tensor of a file that holds several

    def __post_init__(self) -> None:
        if self.space not in LATENT_SPACES:
            raise InputError(f"--latent-space is {' or '.join(LATENT_SPACES)}, not '{self.space}'")
        if self.fps <= 0:
            raise InputError(f"--fps must be positive, got {self.fps}")


def decoded_size(latent_shape: tuple[int, ...] | torch.Size, size: tuple[int, int] | None = None) -> VideoSize:
    """What a latent of ``(..., T, h, w)`` decodes to: 1 + 4 (T - 1) frames of 8h x 8w, or cropped
    to ``size`` (width, height), by less than 8 pixels a side."""
    frames, height, width = latent_shape[-3:]
    padded = VideoSize(1 + TEMPORAL_STRIDE * (frames - 1), SPATIAL_STRIDE * height, SPATIAL_STRIDE * width)
    if size is None:
        return padded
    cropped = VideoSize(padded.frames, size[1], size[0])
    if cropped.padded() != padded:
        raise InputError(
            f"--size {size[0]}x{size[1]} does not fit a latent of {width}x{height}, which decodes to "
            f"{padded.width}x{padded.height}: each side may be cropped by up to {SPATIAL_STRIDE - 1} pixels"
        )
    return cropped


def parse_frame_size(text: str) -> tuple[int, int]:
    """``1920x1080`` -> (1920, 1080)."""
    match = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", text)
    if match is None or 0 in (int(match[1]), int(match[2])):
        raise InputError(f"--size is WIDTHxHEIGHT, e.g. 1920x1080; not '{text}'")
    return int(match[1]), int(match[2])


def is_bare_latent(path: Path) -> bool:
    """Whether ``path`` is a bare tensor by its name, and not one of ivvae's latent files (whose
    safetensors header says so; a ``.safetensors`` that cannot be read is left to their checks)."""
    if path.suffix.lower() not in BARE_SUFFIXES:
        return False
    if path.suffix.lower() != ".safetensors":
        return True
    try:
        with safe_open(str(path), "pt") as f:
            return (f.metadata() or {}).get("format") != FORMAT_NAME
    except (SafetensorError, OSError):
        return False


def read_bare_latent(path: Path, key: str | None = None) -> BareLatent:
    """Read and check a bare latent tensor; every problem is one ``InputError``."""
    latent, _, _ = _read(path, key)
    return BareLatent(path, checked_latent(latent, str(path)))


def describe_bare_latent(path: Path, key: str | None = None, fps: Fraction = DEFAULT_FPS) -> dict:
    """What ``ivvae info`` shows of a bare tensor: its shape and dtype, whether every value is
    finite, and what it decodes to at ``fps``; ``problems`` is empty when ``decode`` would take it."""
    latent, dtype, key = _read(path, key)
    try:
        checked_latent(latent, str(path))
        problems = []
    except InputError as e:
        problems = [str(e)]
    size = decoded_size(latent.shape)
    batch = latent.shape[0] if latent.dim() == 5 else 1
    return {
        "kind": "bare latent", "file": str(path), "tensor": key, "shape": list(latent.shape), "dtype": dtype,
        "finite": not problems, "videos": batch, "frames": size.frames, "width": size.width, "height": size.height,
        "fps": str(fps), "seconds": round(float(size.frames / Fraction(fps)), 3), "problems": problems,
    }  # fmt: skip


def _read(path: Path, key: str | None) -> tuple[torch.Tensor, str, str | None]:
    """A bare tensor as stored, its declared shape and dtype checked; every problem one ``InputError``."""
    if not path.is_file():
        raise InputError(f"latent file not found: {path}")
    suffix = path.suffix.lower()
    readers = {".safetensors": _safetensors, ".pt": _torch, ".pth": _torch, ".npy": _npy, ".npz": _npz}
    if suffix not in readers:
        raise InputError(f"{path}: a bare latent is .safetensors, .pt, .pth, .npy or .npz")
    try:
        return readers[suffix](path, key)
    except InputError:
        raise
    except Exception as e:  # whatever a damaged or hostile file raises from deep in its reader
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise InputError(f"{path}: cannot be read as a {suffix} tensor ({e.__class__.__name__}: {first})") from None


def checked_latent(latent: torch.Tensor, where: str) -> torch.Tensor:
    """``latent`` as ``(B, C, T, h, w)`` float32, refused in one line if it is not a latent or holds
    NaN or infinity (saying where)."""
    _check_declared(where, tuple(latent.shape), str(latent.dtype).removeprefix("torch."))
    latent = latent.float()
    latent = latent.unsqueeze(0) if latent.dim() == 4 else latent
    for i, item in enumerate(latent):
        problem = non_finite("latent", item.unsqueeze(0), decoded_size(latent.shape).frames)
        if problem:
            raise InputError(f"{where}: {problem}{f' (batch item {i})' if latent.shape[0] > 1 else ''}")
    return latent


def _check_declared(where: Path | str, shape: tuple[int, ...], dtype: str) -> None:
    """A tensor's shape and dtype as its file declares them, before any value is read."""
    if dtype not in FLOAT_DTYPES:
        raise InputError(f"{where}: the tensor is {dtype}; a latent is floating point (float16, bfloat16, float32)")
    if len(shape) not in (4, 5):
        raise InputError(f"{where}: the tensor has shape {list(shape)}; a latent is (C, T, h, w) or (B, C, T, h, w)")
    if min(shape) < 1 or max(shape[-3:]) > MAX_SIDE or int(np.prod(shape, dtype=np.float64)) > MAX_ELEMENTS:
        raise InputError(f"{where}: the tensor's shape {list(shape)} is empty or past what ivvae decodes")


def _one_key(path: Path, keys: list[str], key: str | None) -> str:
    if key is not None:
        if key not in keys:
            raise InputError(f"{path} has no tensor '{key}' (it has: {', '.join(sorted(keys)) or 'none'})")
        return key
    if len(keys) != 1:
        have = ", ".join(sorted(keys)[:8]) + (", ..." if len(keys) > 8 else "")
        raise InputError(f"{path} holds {len(keys)} tensors ({have}): --key names the latent")
    return keys[0]


def _safetensors(path: Path, key: str | None) -> tuple[torch.Tensor, str, str]:
    with safe_open(str(path), "pt") as f:
        name = _one_key(path, list(f.keys()), key)
        declared = f.get_slice(name)
        dtype = _SAFETENSORS_DTYPES.get(declared.get_dtype(), declared.get_dtype().lower())
        _check_declared(path, tuple(declared.get_shape()), dtype)
        return f.get_tensor(name), dtype, name


def _torch(path: Path, key: str | None) -> tuple[torch.Tensor, str, str | None]:
    # weights_only: a pickle that would build any object but tensors and plain containers is refused
    # unrun; mmap: no value is read before its shape is checked.
    value = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    name = None
    if isinstance(value, dict):
        tensors = {str(k): v for k, v in value.items() if isinstance(v, torch.Tensor)}
        name = _one_key(path, list(tensors), key)
        value = tensors[name]
    elif key is not None:
        raise InputError(f"{path} holds one tensor, not a dict: leave --key out")
    if not isinstance(value, torch.Tensor):
        raise InputError(f"{path} holds a {type(value).__name__}; save a tensor, or a dict of tensors")
    dtype = str(value.dtype).removeprefix("torch.")
    _check_declared(path, tuple(value.shape), dtype)
    return value, dtype, name


def _npy(path: Path, key: str | None) -> tuple[torch.Tensor, str, None]:
    if key is not None:
        raise InputError(f"{path} holds one array: leave --key out")
    with path.open("rb") as f:
        dtype = _declared_array(path, f)
    return torch.from_numpy(np.load(path, allow_pickle=False)), dtype, None


def _npz(path: Path, key: str | None) -> tuple[torch.Tensor, str, str]:
    with zipfile.ZipFile(path) as archive:
        names = [n.removesuffix(".npy") for n in archive.namelist() if n.endswith(".npy")]
        name = _one_key(path, names, key)
        with archive.open(f"{name}.npy") as member:
            dtype = _declared_array(path, member)
    with np.load(path, allow_pickle=False) as arrays:
        return torch.from_numpy(arrays[name]), dtype, name


def _declared_array(path: Path, f) -> str:
    """An .npy stream's declared shape and dtype, checked before numpy reads (or allocates) any value."""
    version = np.lib.format.read_magic(f)
    header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, _, dtype = header(f)
    _check_declared(path, shape, str(dtype))
    return str(dtype)


def check_channels(latent: torch.Tensor, loaded: LoadedModel, where: str) -> None:
    """A latent's channels must be the model's."""
    channels, wanted = latent.shape[-4], loaded.model.z_dim
    if channels != wanted:
        raise InputError(
            f"{where} has {channels} latent channels, but {loaded.name} takes {wanted}: "
            "give the model it was made for (--model or --weights)"
        )


def bare_latent_file(latent: torch.Tensor, name: str, loaded: LoadedModel, options: BareOptions) -> LatentFile:
    """One latent ``(1, C, T, h, w)`` (``checked_latent``'s, channels checked) as a latent file to
    decode with ``loaded``: in its scaled space, timed at ``options.fps`` from 0, sized by
    ``options.size``; ``name`` stands for its source."""
    model = loaded.model
    size = decoded_size(latent.shape, options.size)
    padded = size.padded()
    if options.space == "unscaled":
        latent = model.scale_latent(latent)
    rate = Fraction(options.fps)
    header = LatentHeader(
        model=loaded.name, z_dim=model.z_dim, dim=model.dim, scale_factor=model.scale_factor,
        shift_factor=model.shift_factor, weights_fingerprint=loaded.fingerprint, source_name=name,
        source_frames=size.frames, source_height=size.height, source_width=size.width, frame_rate=str(rate),
        time_base=str(1 / rate), start_time=0.0, padded_frames=padded.frames, padded_height=padded.height,
        padded_width=padded.width, dtype="float32", posterior="sample",
    )  # fmt: skip
    return LatentFile(header, latent, np.arange(size.frames, dtype=np.int64))


def batch_outputs(output: Path, count: int) -> list[Path]:
    """Where a batch's videos go: ``output`` for one item; else ``NAME_0.EXT``, ``NAME_1.EXT``, ...,
    the index zero-padded to the batch's width, beside it."""
    if count == 1:
        return [output]
    width = len(str(count - 1))
    return [output.with_name(f"{output.stem}_{i:0{width}d}{output.suffix}") for i in range(count)]
