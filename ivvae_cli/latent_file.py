"""The latent file: one video's latent and everything needed to decode it, in plain safetensors.

Tensors: ``latent`` (1, z_dim, T', h, w); ``frame_pts`` (T,) int64, each source frame's timestamp
in ``time_base`` units; ``audio`` (N,) uint8, optional, the source's audio remuxed into Matroska;
``logvar`` (as ``latent``), with posterior "both": the posterior's log variance, to draw samples.
Metadata (all strings) holds the fields of ``LatentHeader``; docs/latent-format.md describes each.

Latent files are untrusted input: every header field is checked for type and range, then the
tensors' dtypes and shapes against the header, before any tensor is read; then the timestamps and
the latent's values. Whatever the bytes, reading gives a ``LatentFile`` or an ``InputError``.
"""

from __future__ import annotations

import glob
import json
import math
import os
import re
import warnings
from collections.abc import Callable
from dataclasses import MISSING, asdict, dataclass, field, fields
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load, save, save_file

from ivvae_cli.colour import MATRICES, PRIMARIES, RANGES, TRANSFERS, Colour, written_colour
from ivvae_cli.errors import InputError, IvvaeWarning
from ivvae_cli.model import TEMPORAL_STRIDE, VideoSize
from ivvae_cli.version import __version__

FORMAT_NAME = "ivvae-latent"
FORMAT_VERSION = 1
TICKS_PER_FRAME = 8  # outputs put timestamps on a grid of 1/8 frame at the file's rate
MAX_TICKS = 2**31  # how far from the first frame a timestamp may be, in ticks: what 32-bit container fields hold


def writer_ticks(pts: int, time_base: Fraction, frame_rate: Fraction) -> Fraction:
    """A timestamp in ticks of the writer's grid: 1/8 frame at ``frame_rate``."""
    return pts * time_base * frame_rate * TICKS_PER_FRAME


@dataclass
class LatentHeader:
    """The metadata of a latent file. Each field is checked by its type when read (``check_metadata``),
    and by its rule in ``FIELD_RULES`` if it has one; a new optional field is one line here."""

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
    def check_metadata(cls, meta: dict[str, str]) -> tuple[dict[str, Any], list[str]]:
        """The fields that parse and pass their rules, and a problem for each that does not
        (missing, wrong type, out of range), then for sizes that do not fit each other."""
        values: dict[str, Any] = {}
        problems = []
        for f in fields(cls):
            if f.name not in meta:
                if f.default is MISSING and f.default_factory is MISSING:
                    problems.append(f"the header lacks the field '{f.name}'")
                continue
            raw = meta[f.name]
            try:
                value = _parse(f.type, raw)
                FIELD_RULES.get(f.name, _any)(value)
            except (ValueError, RecursionError) as e:
                problems.append(f"header field '{f.name}' is {_shown(raw)}: {e}")
                continue
            values[f.name] = value
        sizes = ("frames", "height", "width")
        if all(f"{kind}_{s}" in values for kind in ("source", "padded") for s in sizes):
            source = VideoSize(*(values[f"source_{s}"] for s in sizes))
            padded = VideoSize(*(values[f"padded_{s}"] for s in sizes))
            if padded != source.padded():
                problems.append(
                    f"padded size {_size(padded)} does not fit source size {_size(source)}: it must be "
                    f"{_size(source.padded())} (frames 1 + 4k, sides multiples of 8, the least that hold the source)"
                )
        return values, problems


def _shown(raw: str) -> str:
    """A metadata string quoted for a one-line message: escaped, and cut short when long."""
    return json.dumps(raw if len(raw) <= 40 else raw[:37] + "...")


def _parse(kind: str, raw: str) -> Any:
    """A metadata string as the field's type: strings as they are, the rest strict JSON."""
    if kind.startswith("str"):
        return raw
    value = json.loads(raw, parse_constant=_not_a_number)
    if kind.startswith("int") and (type(value) is not int or not -(2**63) <= value < 2**63):
        raise ValueError("not a 64-bit integer")
    if kind.startswith("float") and (type(value) not in (int, float) or not math.isfinite(value)):
        raise ValueError("not a finite number")
    if kind.startswith("dict") and type(value) is not dict:
        raise ValueError("not a JSON object")
    return value


def _not_a_number(name: str) -> None:
    """Python's JSON reads NaN and Infinity; the format has neither."""
    raise ValueError(f"{name} is not a number")


def _any(value: Any) -> None:
    """Fields whose type is all there is to check."""


def _positive(value: int | float) -> None:
    if value <= 0:
        raise ValueError("not positive")


def _not_negative(value: int | float) -> None:
    if value < 0:
        raise ValueError("negative")


def _nonzero(value: float) -> None:
    if value == 0:
        raise ValueError("zero")


def _one_of(*allowed: object) -> Callable[[object], None]:
    def check(value: object) -> None:
        if value not in allowed:
            raise ValueError(f"not one of {', '.join(map(str, allowed))}")

    return check


def _bits(value: int) -> None:
    if not 8 <= value <= 16:
        raise ValueError("not a bit depth from 8 to 16")


def _model_name(value: str) -> None:
    """A name to look weights up by (``decode`` does), never a path."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,99}", value):
        raise ValueError("not a model name (letters, digits, _ . + -)")


def _fingerprint(value: str) -> None:
    if not re.fullmatch(r"[0-9a-f]{16}", value):
        raise ValueError("not 16 hexadecimal digits")


def fraction(text: str) -> Fraction:
    """A positive fraction whose terms fit the 32-bit rationals of containers ("30000/1001", "25")."""
    try:
        value = Fraction(text)
    except (ValueError, ZeroDivisionError):
        raise ValueError("not a fraction such as 30000/1001") from None
    if value <= 0:
        raise ValueError("not positive")
    if value.numerator >= 2**31 or value.denominator >= 2**31:
        raise ValueError("its terms do not fit in 32 bits")
    return value


def _frame_rate(text: str) -> None:
    """The writer ticks 8 times a frame, in a time base of 1 / (8 x rate): that too must fit."""
    if fraction(text).numerator * TICKS_PER_FRAME >= 2**31:
        raise ValueError("too high for the writer's time base (1/8 frame)")


FIELD_RULES: dict[str, Callable[[Any], None]] = {
    "model": _model_name,
    "z_dim": _positive,
    "dim": _positive,
    "scale_factor": _nonzero,
    "weights_fingerprint": _fingerprint,
    "source_frames": _positive,
    "source_height": _positive,
    "source_width": _positive,
    "frame_rate": _frame_rate,
    "time_base": fraction,
    "start_time": _not_negative,
    "padded_frames": _positive,
    "padded_height": _positive,
    "padded_width": _positive,
    "dtype": _one_of("float32", "bfloat16", "float16"),
    "posterior": _one_of("mean", "sample", "both"),
    "seed": _not_negative,
    "colour_matrix": _one_of(*MATRICES.values()),
    "colour_primaries": _one_of(*PRIMARIES.values()),
    "colour_transfer": _one_of(*TRANSFERS.values()),
    "colour_range": _one_of(*RANGES.values()),
    "bit_depth": _bits,
}
LATENT_DTYPES = ("F32", "BF16", "F16")  # safetensors' names of the dtypes a latent may have


def _size(size: VideoSize) -> str:
    return f"{size.frames}x{size.height}x{size.width}"


@dataclass
class LatentFile:
    header: LatentHeader
    latent: torch.Tensor
    frame_pts: np.ndarray
    audio: bytes | None = None
    logvar: torch.Tensor | None = None


def _tensors(data: LatentFile) -> dict[str, torch.Tensor]:
    tensors = {
        "latent": data.latent.detach().to("cpu").contiguous(),
        "frame_pts": torch.from_numpy(np.asarray(data.frame_pts, dtype=np.int64)),
    }
    if data.audio:
        tensors["audio"] = torch.frombuffer(bytearray(data.audio), dtype=torch.uint8)
    if data.logvar is not None:
        tensors["logvar"] = data.logvar.detach().to("cpu").contiguous()
    return tensors


def write_latent_file(path: Path, data: LatentFile) -> None:
    """Write ``data`` to ``path`` (callers write to a temporary path, see ``ivvae_cli.outputs``)."""
    try:
        save_file(_tensors(data), str(path), metadata=data.header.to_metadata())
    except SafetensorError as e:  # its I/O errors, e.g. a full disk, as Python's own
        code = re.search(r"os error (\d+)", str(e))
        if code is None:
            raise
        raise OSError(int(code[1]), os.strerror(int(code[1])), str(path)) from None


def latent_file_bytes(data: LatentFile) -> bytes:
    """``data`` as the bytes of a latent file (a member of a tar shard)."""
    return save(_tensors(data), metadata=data.header.to_metadata())


@dataclass
class LatentReport:
    """What could be read of a latent file, and what is wrong with it."""

    path: Path
    fields: dict[str, Any] = field(default_factory=dict)  # the header fields that passed their checks
    tensors: dict[str, dict] = field(default_factory=dict)  # name -> dtype and shape, as the file declares
    problems: list[str] = field(default_factory=list)  # each one refuses the file
    audio_problem: str | None = None  # why the audio cannot be read: the video still can
    data: LatentFile | None = None  # when there is no problem


def inspect_latent_file(path: str | Path) -> LatentReport:
    """Check a latent file, cheapest first, reading a tensor only once everything declared about
    it (the header, its dtype and shape) has passed, so no claim in a header costs memory."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"latent file not found: {path}")
    report = LatentReport(path)
    try:
        with safe_open(str(path), "pt") as f:
            _inspect(f, report)
    except (SafetensorError, OSError) as e:
        report.problems.append(_not_safetensors(e))
    return report


class _LatentBytes:
    """A latent file held in memory, read as ``safe_open`` reads one on disk: the header's metadata,
    each tensor's dtype and shape, then the tensors."""

    def __init__(self, data: bytes):
        self.tensors = load(data)  # checks the whole layout (offsets within the bytes) first
        size = int.from_bytes(data[:8], "little")
        self.header = json.loads(data[8 : 8 + size])

    def metadata(self) -> dict[str, str]:
        return self.header.get("__metadata__") or {}

    def keys(self) -> list[str]:
        return list(self.tensors)

    def get_slice(self, name: str) -> _Declared:
        return _Declared(self.header[name]["dtype"], list(self.tensors[name].shape))

    def get_tensor(self, name: str) -> torch.Tensor:
        return self.tensors[name]


@dataclass(frozen=True)
class _Declared:
    dtype: str
    shape: list[int]

    def get_dtype(self) -> str:
        return self.dtype

    def get_shape(self) -> list[int]:
        return self.shape


def inspect_latent_bytes(data: bytes, name: str) -> LatentReport:
    """``inspect_latent_file`` of a latent file's bytes (``name`` says where they came from)."""
    report = LatentReport(Path(name))
    try:
        _inspect(_LatentBytes(data), report)
    except (SafetensorError, ValueError, KeyError, TypeError) as e:
        report.problems.append(_not_safetensors(e))
    return report


def _not_safetensors(error: Exception) -> str:
    return f"truncated or not a safetensors file ({' '.join(str(error).split())})"


def _check_header(meta: dict[str, str]) -> tuple[dict[str, Any], list[str]]:
    """The header's fields that passed, and its problems: the format tag and version first (past
    them nothing else is checked), then every field."""
    fmt = meta.get("format")
    if fmt != FORMAT_NAME:
        what = f"a {_shown(fmt)} file" if fmt else "not an ivvae latent file"
        return {}, [f"{what} (no '{FORMAT_NAME}' format tag)"]
    try:
        version = _parse("int", meta.get("format_version", ""))
    except (ValueError, RecursionError):
        version = None
    if version is None or version < 1:
        return {}, ["its latent format version is not a version number (the header field 'format_version')"]
    if version > FORMAT_VERSION:
        return {}, [
            f"it has latent format version {version}, newer than this ivvae ({__version__}) reads "
            f"(up to {FORMAT_VERSION}); upgrade ivvae"
        ]
    return LatentHeader.check_metadata(meta)


def _inspect(f, report: LatentReport) -> None:
    report.fields, report.problems = _check_header(f.metadata() or {})
    if not report.fields:
        return
    slices = {name: f.get_slice(name) for name in f.keys()}  # noqa: SIM118 (safe_open is no mapping)
    report.tensors = {name: {"dtype": s.get_dtype(), "shape": s.get_shape()} for name, s in slices.items()}
    report.problems += _tensor_problems(report.tensors, report.fields)
    if report.problems:
        return
    header = LatentHeader(**report.fields)
    pts = f.get_tensor("frame_pts").numpy()
    problem = _timestamp_problem(pts, Fraction(header.time_base), Fraction(header.frame_rate))
    if problem:
        report.problems.append(problem)
        return
    latent = f.get_tensor("latent")
    logvar = f.get_tensor("logvar") if "logvar" in report.tensors else None
    for name, values in (("latent", latent), ("logvar", logvar)):
        problem = None if values is None else non_finite(name, values, header.source_frames)
        if problem:
            report.problems.append(problem)
            return
    audio = f.get_tensor("audio").numpy().tobytes() if "audio" in report.tensors else None
    if audio is not None:
        from ivvae_cli.video import audio_problem  # PyAV: needed for audio only, and not by the package's import

        report.audio_problem = audio_problem(audio)
    report.data = LatentFile(header, latent, pts, None if report.audio_problem else audio, logvar)


def _tensor_problems(tensors: dict[str, dict], header: dict[str, Any]) -> list[str]:
    """The tensors' declared dtypes and shapes against the format and the header."""
    problems = [f"the tensor '{name}' is missing" for name in ("latent", "frame_pts") if name not in tensors]
    expected: dict[str, tuple[tuple[str, ...], list[int] | None]] = {
        "latent": (LATENT_DTYPES, None),
        "frame_pts": (("I64",), [header["source_frames"]] if "source_frames" in header else None),
        "audio": (("U8",), None),
        "logvar": (LATENT_DTYPES, None),
    }
    if {"z_dim", "padded_frames", "padded_height", "padded_width"} <= header.keys():
        lat = VideoSize(header["padded_frames"], header["padded_height"], header["padded_width"]).latent()
        expected["latent"] = expected["logvar"] = (
            LATENT_DTYPES,
            [1, header["z_dim"], lat.frames, lat.height, lat.width],
        )
    if "posterior" in header and (header["posterior"] == "both") != ("logvar" in tensors):
        problems.append(f"posterior {header['posterior']!r} with{'' if 'logvar' in tensors else ' no'} tensor 'logvar'")
    for name, (dtypes, shape) in expected.items():
        if name not in tensors:
            continue
        declared = tensors[name]
        if declared["dtype"] not in dtypes:
            problems.append(f"the tensor '{name}' is {declared['dtype']}, not {' or '.join(dtypes)}")
        if shape is not None and declared["shape"] != shape:
            problems.append(f"the tensor '{name}' has shape {declared['shape']}; the header makes it {shape}")
        if name == "audio" and len(declared["shape"]) != 1:
            problems.append(f"the tensor 'audio' has shape {declared['shape']}, not one dimension")
    return problems


def _timestamp_problem(pts: np.ndarray, time_base: Fraction, frame_rate: Fraction) -> str | None:
    """Timestamps must not be negative, must increase, and must stay where containers reach."""
    if pts.min() < 0:
        return f"frame {int(np.argmax(pts < 0))}'s timestamp is negative"
    backwards = np.flatnonzero(np.diff(pts) <= 0)
    if backwards.size:
        i = int(backwards[0]) + 1
        return f"frame {i}'s timestamp ({pts[i]}) is not after frame {i - 1}'s ({pts[i - 1]}): timestamps must increase"
    last = int(pts[-1])
    if writer_ticks(last, time_base, frame_rate) >= MAX_TICKS:
        limit = MAX_TICKS / (TICKS_PER_FRAME * frame_rate)
        return (
            f"its last timestamp, {float(last * time_base):.6g} s, is past what containers hold at "
            f"{float(frame_rate):.6g} fps ({float(limit):.6g} s: 2**31 ticks of 1/8 frame)"
        )
    return None


def non_finite(name: str, latent: torch.Tensor, source_frames: int) -> str | None:
    """Where a latent (or its log variance) holds NaN or infinity: how many values, in which latent
    frames (and the video frames they decode to) and channels."""
    bad = ~torch.isfinite(latent[0])  # (channels, T', h, w)
    count = int(bad.sum())
    if not count:
        return None
    per_channel = bad.sum(dim=(1, 2, 3))
    per_frame = bad.sum(dim=(0, 2, 3))
    frames = torch.nonzero(per_frame).flatten().tolist()
    channels = torch.nonzero(per_channel).flatten().tolist()
    video = sorted(
        {t for i in frames for t in range(TEMPORAL_STRIDE * i - 3, TEMPORAL_STRIDE * i + 1) if 0 <= t < source_frames}
    )
    return (
        f"the {name} holds {count} NaN or infinite value(s), in latent frame(s) {_ranges(frames)} "
        f"(video frames {_ranges(video)}), channel(s) {_ranges(channels)}"
    )


def _ranges(values: list[int], most: int = 4) -> str:
    """Sorted integers as runs, ``0-3, 7, 9-12``; past ``most`` runs, how many more."""
    runs: list[list[int]] = []
    for v in values:
        if runs and v == runs[-1][1] + 1:
            runs[-1][1] = v
        else:
            runs.append([v, v])
    text = ", ".join(f"{a}-{b}" if b > a else f"{a}" for a, b in runs[:most])
    return text + (f" and {len(runs) - most} more run(s)" if len(runs) > most else "")


def read_latent_file(path: str | Path, *, strict: bool = False) -> LatentFile:
    """Read and check a latent file; every problem is an ``InputError`` saying what is wrong (all of
    them: ``inspect_latent_file``). Audio that cannot be read is left out with an ``IvvaeWarning``
    (the pictures are the user's data), or, ``strict``, refused."""
    return _checked(inspect_latent_file(path), strict)


def read_latent_bytes(data: bytes, name: str, *, strict: bool = False) -> LatentFile:
    """``read_latent_file`` of a latent file's bytes (a clip in a tar shard; ``name`` says which)."""
    return _checked(inspect_latent_bytes(data, name), strict)


def _checked(report: LatentReport, strict: bool) -> LatentFile:
    if report.problems:
        raise _refusal(report.path, report.problems)
    if report.audio_problem:
        if strict:
            raise InputError(f"{report.path}: its audio cannot be read ({report.audio_problem}); --strict refuses it")
        warnings.warn(
            IvvaeWarning(f"{report.path}: its audio cannot be read ({report.audio_problem}); leaving it out"),
            stacklevel=3,
        )
    assert report.data is not None
    return report.data


def _refusal(path: Path, problems: list[str]) -> InputError:
    """The first problem in one line, and how many more."""
    more = f" (and {len(problems) - 1} more: `ivvae info` lists them)" if len(problems) > 1 else ""
    return InputError(f"{path}: {problems[0]}{more}")


def read_latent_header(path: Path) -> LatentHeader:
    """The header alone (no tensor is read), checked as ``read_latent_file`` checks it: enough to
    tell what made a latent file."""
    try:
        with safe_open(str(path), "pt") as f:
            fields, problems = _check_header(f.metadata() or {})
    except (SafetensorError, OSError) as e:
        fields, problems = {}, [_not_safetensors(e)]
    if problems:
        raise _refusal(path, problems)
    return LatentHeader(**fields)


def looks_like_latent_file(path: Path) -> bool:
    """Whether ``path`` is a latent file by its name or, whatever its name, a safetensors header."""
    if not path.is_file():
        return False
    if path.suffix in (".latent", ".safetensors"):
        return True
    with path.open("rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{"


def describe_latent_file(path: Path) -> dict:
    """What ``ivvae info`` shows of a latent file: its header, shape and sizes, and the colour
    ``decode`` writes (YUV; lossless RGB outputs are tagged ``gbr``, full range); of a damaged one,
    what could be read, and its problems (``problems`` is empty when ``decode`` would take it)."""
    return describe_latent(inspect_latent_file(path), path.stat().st_size)


def describe_latent(report: LatentReport, file_bytes: int) -> dict:
    """``describe_latent_file`` of what ``inspect_latent_file`` or ``inspect_latent_bytes`` found."""
    described: dict[str, Any] = {"kind": "latent", "file": str(report.path)}
    if report.data is None:
        declared = {name: f"{t['dtype']} {t['shape']}" for name, t in report.tensors.items()}
        return described | report.fields | {"tensors": declared, "file_bytes": file_bytes, "problems": report.problems}
    data = report.data
    h = data.header
    raw_bytes = h.source_frames * h.source_height * h.source_width * 3
    audio_bytes = math.prod(report.tensors["audio"]["shape"]) if "audio" in report.tensors else 0
    return described | {
        "latent_shape": list(data.latent.shape),
        **asdict(h),
        "file_bytes": file_bytes,
        "raw_rgb8_bytes": raw_bytes,
        "compression_vs_rgb8": round(raw_bytes / file_bytes, 2),
        "elements_ratio": round(raw_bytes / math.prod(data.latent.shape), 2),
        "audio_bytes": audio_bytes,
        "audio_problem": report.audio_problem,
        "decode_colour": asdict(written_colour(h.colour, h.source_height, rgb=False)),
        "problems": [],
    }


def glob_root(pattern: str) -> Path:
    """The folder a glob pattern's fixed part names, that matches are taken relative to."""
    fixed = Path(pattern.split("*")[0].split("?")[0].split("[")[0] or ".")
    return fixed if fixed.is_dir() else fixed.parent


def find_latent_files(
    spec: str | Path, suffixes: tuple[str, ...] = (".latent", ".safetensors")
) -> list[tuple[Path, Path]]:
    """The latent files (named with one of ``suffixes``) under a folder, recursively, or matching a
    glob pattern: ``(path, path relative to the folder or the pattern's fixed part)``, sorted."""
    text = str(spec)
    if Path(text).is_dir():
        root = Path(text)
        paths = [p for p in root.rglob("*") if p.suffix.lower() in suffixes and p.is_file()]
    else:
        root = glob_root(text)
        paths = [Path(p) for p in glob.glob(text, recursive=True) if Path(p).is_file()]
    return sorted((p, p.relative_to(root)) for p in paths)
