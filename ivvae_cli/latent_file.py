"""The latent file: one video's latent and everything needed to decode it, in plain safetensors.

Tensors: ``latent`` (1, z_dim, T', h, w); ``frame_pts`` (T,) int64, each source frame's timestamp
in ``time_base`` units; ``audio`` (N,) uint8, optional, the source's audio remuxed into Matroska;
``logvar`` (as ``latent``), with posterior "both": the posterior's log variance, to draw samples.
Metadata (all strings) holds the fields of ``LatentHeader``; docs/latent-format.md describes each.
"""

from __future__ import annotations

import glob
import json
import math
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ivvae_cli.colour import Colour, written_colour
from ivvae_cli.errors import InputError
from ivvae_cli.model import VideoSize
from ivvae_cli.version import __version__

FORMAT_NAME = "ivvae-latent"
FORMAT_VERSION = 1


@dataclass
class LatentHeader:
    """The metadata of a latent file."""

    model: str
    z_dim: int
    dim: int
    scale_factor: float
    shift_factor: float
    weights_fingerprint: str
    source_name: str
    source_frames: int
    source_height: int
    source_width: int
    frame_rate: str  # a fraction, e.g. "30000/1001"
    time_base: str  # a fraction
    start_time: float
    padded_frames: int
    padded_height: int
    padded_width: int
    dtype: str
    posterior: str  # "mean", "sample", or "both" (the mean as ``latent``, and ``logvar``)
    seed: int | None = None
    tiling: dict = field(default_factory=dict)
    audio_codec: str | None = None
    # The source's colour description as it declared it (absent: undeclared), and its bits per channel.
    colour_matrix: str | None = None
    colour_primaries: str | None = None
    colour_transfer: str | None = None
    colour_range: str | None = None
    bit_depth: int | None = None
    clip: dict | None = None  # a dataset clip: its source, span, geometry and the job's options
    tool_version: str = __version__
    format: str = FORMAT_NAME
    format_version: int = FORMAT_VERSION

    @property
    def source_size(self) -> VideoSize:
        """The size ``decode`` gives back."""
        return VideoSize(self.source_frames, self.source_height, self.source_width)

    @property
    def padded_size(self) -> VideoSize:
        """The size the model ran at."""
        return VideoSize(self.padded_frames, self.padded_height, self.padded_width)

    @property
    def colour(self) -> Colour:
        return Colour(self.colour_matrix, self.colour_primaries, self.colour_transfer, self.colour_range)

    def to_metadata(self) -> dict[str, str]:
        """Strings as they are, other values as JSON; None is left out."""
        return {k: v if isinstance(v, str) else json.dumps(v) for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_metadata(cls, meta: dict[str, str], path: Path) -> LatentHeader:
        values = {}
        for f in fields(cls):
            if f.name in meta:
                raw = meta[f.name]
                values[f.name] = raw if f.type.startswith("str") else json.loads(raw)
            elif f.default is MISSING and f.default_factory is MISSING:
                raise InputError(f"{path} lacks the header field '{f.name}'")
        return cls(**values)


@dataclass
class LatentFile:
    header: LatentHeader
    latent: torch.Tensor
    frame_pts: np.ndarray
    audio: bytes | None = None
    logvar: torch.Tensor | None = None


def write_latent_file(path: Path, data: LatentFile) -> None:
    """Write ``data`` to ``path`` (callers write to a temporary path, see ``ivvae_cli.outputs``)."""
    tensors = {
        "latent": data.latent.detach().to("cpu").contiguous(),
        "frame_pts": torch.from_numpy(np.asarray(data.frame_pts, dtype=np.int64)),
    }
    if data.audio:
        tensors["audio"] = torch.frombuffer(bytearray(data.audio), dtype=torch.uint8)
    if data.logvar is not None:
        tensors["logvar"] = data.logvar.detach().to("cpu").contiguous()
    save_file(tensors, str(path), metadata=data.header.to_metadata())


def read_latent_file(path: str | Path) -> LatentFile:
    """Read and check a latent file; every problem is an ``InputError`` saying what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"latent file not found: {path}")
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            names = set(f.keys())
            fmt = meta.get("format")
            if fmt != FORMAT_NAME:
                what = f"a '{fmt}' file" if fmt else "not an ivvae latent file"
                raise InputError(f"{path} is {what} (no '{FORMAT_NAME}' format tag)")
            version = int(meta.get("format_version", "0"))
            if version > FORMAT_VERSION:
                raise InputError(
                    f"{path} has latent format version {version}, newer than this ivvae "
                    f"({__version__}) reads (up to {FORMAT_VERSION}); upgrade ivvae"
                )
            missing = {"latent", "frame_pts"} - names
            if missing:
                raise InputError(f"{path} lacks the tensor(s) {', '.join(sorted(missing))}")
            latent = f.get_tensor("latent")
            pts = f.get_tensor("frame_pts").numpy()
            audio = f.get_tensor("audio").numpy().tobytes() if "audio" in names else None
            logvar = f.get_tensor("logvar") if "logvar" in names else None
    except (SafetensorError, OSError, ValueError) as e:
        raise InputError(f"{path} is truncated or not a safetensors file ({e})") from None
    header = LatentHeader.from_metadata(meta, path)
    lat = header.padded_size.latent()
    expected = (1, header.z_dim, lat.frames, lat.height, lat.width)
    if tuple(latent.shape) != expected:
        raise InputError(f"{path}: latent shape {tuple(latent.shape)} does not match its header {expected}")
    if len(pts) != header.source_frames:
        raise InputError(f"{path}: {len(pts)} timestamps for {header.source_frames} frames")
    if (header.posterior == "both") != (logvar is not None) or (logvar is not None and logvar.shape != latent.shape):
        raise InputError(f"{path}: posterior '{header.posterior}' with {'a' if logvar is not None else 'no'} logvar")
    return LatentFile(header, latent, pts, audio, logvar)


def read_latent_header(path: Path) -> LatentHeader:
    """The header alone (no tensor is read): enough to tell what made a latent file."""
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise InputError(f"{path} is truncated or not a safetensors file ({e})") from None
    if meta.get("format") != FORMAT_NAME:
        raise InputError(f"{path} is not an ivvae latent file (no '{FORMAT_NAME}' format tag)")
    return LatentHeader.from_metadata(meta, path)


def looks_like_latent_file(path: Path) -> bool:
    """Whether ``path`` is a latent file by its name or, whatever its name, a safetensors header."""
    if path.suffix in (".latent", ".safetensors"):
        return True
    with path.open("rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{"


def describe_latent_file(path: Path) -> dict:
    """What ``ivvae info`` shows of a latent file: its header, shape and sizes, and the colour
    ``decode`` writes (YUV; lossless RGB outputs are tagged ``gbr``, full range)."""
    data = read_latent_file(path)
    h = data.header
    raw_bytes = h.source_frames * h.source_height * h.source_width * 3
    file_bytes = path.stat().st_size
    return {
        "kind": "latent",
        "file": str(path),
        "latent_shape": list(data.latent.shape),
        **asdict(h),
        "file_bytes": file_bytes,
        "raw_rgb8_bytes": raw_bytes,
        "compression_vs_rgb8": round(raw_bytes / file_bytes, 2),
        "elements_ratio": round(raw_bytes / math.prod(data.latent.shape), 2),
        "audio_bytes": len(data.audio) if data.audio else 0,
        "decode_colour": asdict(written_colour(h.colour, h.source_height, rgb=False)),
    }


def find_latent_files(spec: str | Path) -> list[tuple[Path, Path]]:
    """The latent files (``*.latent``, ``*.safetensors``) under a folder, recursively, or matching a
    glob pattern: ``(path, path relative to the folder or the pattern's fixed part)``, sorted."""
    text = str(spec)
    if Path(text).is_dir():
        root = Path(text)
        paths = [p for p in root.rglob("*") if p.suffix in (".latent", ".safetensors") and p.is_file()]
    else:
        fixed = Path(text.split("*")[0].split("?")[0].split("[")[0] or ".")
        root = fixed if fixed.is_dir() else fixed.parent
        paths = [Path(p) for p in glob.glob(text, recursive=True) if Path(p).is_file()]
    return sorted((p, p.relative_to(root)) for p in paths)
