"""The ``ivvae`` command: parses, calls the library, prints. Errors are one line on stderr with the
exit code of their kind (README.md, "Exit codes")."""

from __future__ import annotations

import glob
import json
import math
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Annotated, Any

import torch
import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from ivvae_cli.bare_latent import (
    BARE_SUFFIXES,
    DEFAULT_FPS,
    BareOptions,
    batch_outputs,
    check_channels,
    decoded_size,
    describe_bare_latent,
    is_bare_latent,
    parse_frame_size,
    read_bare_latent,
)
from ivvae_cli.colour import Colour
from ivvae_cli.errors import InputError, IvvaeError, IvvaeWarning, OutputError, WriteError
from ivvae_cli.latent_file import (
    LatentFile,
    describe_latent_file,
    find_latent_files,
    looks_like_latent_file,
    read_latent_file,
    read_latent_header,
    write_latent_file,
)
from ivvae_cli.metrics import ERROR_GAIN, Metrics, compare_videos, plot_per_frame
from ivvae_cli.outputs import FolderLock, atomic_output, check_output, check_writable, place_under, write_error
from ivvae_cli.pipeline import (
    EncodeOptions,
    MemoryOptions,
    WriteOptions,
    check_model_matches,
    decode_format,
    decode_latent,
    decode_tensor,
    default_dtype,
    encode_video,
    expected_frames,
    prepare_device,
    reconstruct_video,
    select_device,
)
from ivvae_cli.version import __version__
from ivvae_cli.video import OutputFormat, describe_video, probe, resized
from ivvae_cli.weights import (
    BUNDLED,
    BUNDLED_NAME,
    PUBLISHED,
    SAMPLE,
    CheckpointReport,
    LoadedModel,
    cache_folder,
    canonical_name,
    convert_checkpoint,
    find_weights,
    load_model,
    locate,
    search_order,
    verify_checkpoint,
)

app = typer.Typer(
    name="ivvae",
    help="Compress video into IV-VAE latents and back.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
stderr = Console(stderr=True)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

ModelOpt = Annotated[
    str | None, typer.Option("--model", "-m", help="Model name, e.g. z16_dim64, found in the weights folders.")
]
WeightsOpt = Annotated[
    Path | None, typer.Option("--weights", "-w", help="Checkpoint file (.pth or .safetensors) or model name.")
]
DeviceOpt = Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")]
DtypeOpt = Annotated[str, typer.Option(help="auto (float32 on CPU, bfloat16 on CUDA), float32, bfloat16 or float16.")]
GroupsOpt = Annotated[
    int | None,
    typer.Option(
        min=1,
        help="Frame groups (4 frames each) per model step (default: 1 on CPU; on CUDA up to 4, "
        "as many as need no finer tiles than 1).",
    ),
]
MemoryOpt = Annotated[
    str | None, typer.Option(help="Memory budget beside the weights, e.g. 4GB (default: most of what is free).")
]
TileOpt = Annotated[
    int | None,
    typer.Option("--tile-size", min=4, help="Tile side in latent pixels (x8 video pixels); default: by budget."),
]
OverlapOpt = Annotated[int | None, typer.Option("--tile-overlap", min=0, help="Tile overlap in latent pixels.")]
ForceOpt = Annotated[bool, typer.Option("--force", "-f", help="Overwrite an existing output.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar or messages.")]
ClipOpt = Annotated[
    str | None, typer.Option("--clip", help="With a dataset folder: the clip with this key (the index's key column).")
]
JsonOpt = Annotated[Path | None, typer.Option("--json", help="Write a JSON report to this file ('-': stdout).")]
StartOpt = Annotated[float, typer.Option(min=0, help="Start this many seconds into the video.")]
FramesOpt = Annotated[int | None, typer.Option("--frames", min=1, help="Encode at most this many frames.")]
DurationOpt = Annotated[float | None, typer.Option(min=0, help="Encode at most this many seconds.")]
ShortSideOpt = Annotated[
    int | None,
    typer.Option(
        "--short-side", min=8, help="Resize first: short side this many pixels (even), long side to the nearest even."
    ),
]
SampleOpt = Annotated[bool, typer.Option("--sample/--mean", help="Sample the posterior instead of its mean.")]
SeedOpt = Annotated[int | None, typer.Option(help="Seed for --sample.")]
CodecOpt = Annotated[
    str | None, typer.Option(help="Video codec: h264, h265, vp9, av1, ffv1, ... (default: by extension).")
]
CrfOpt = Annotated[int, typer.Option("--crf", min=0, max=63, help="Quality (CRF) of lossy codecs; lower is better.")]
ComparisonOpt = Annotated[
    Path | None, typer.Option("--compare-video", help="Write source | result | amplified error side by side.")
]
PlotOpt = Annotated[Path | None, typer.Option("--plot", help="Per-frame plot (PNG; needs matplotlib).")]
LpipsOpt = Annotated[bool, typer.Option("--lpips", help="Also LPIPS, if its package and weights are installed.")]
LosslessOpt = Annotated[bool, typer.Option(help="Lossless output: FFV1 (.mkv, .avi) or H.264 RGB (.mp4, .mov).")]
SkipErrorsOpt = Annotated[
    bool,
    typer.Option("--skip-errors", help="Damaged video: leave out the frames that do not decode, instead of stopping."),
]
StrictOpt = Annotated[
    bool, typer.Option("--strict", help="Refuse a latent file whose audio cannot be read (default: leave it out).")
]
BitDepthOpt = Annotated[
    int | None,
    typer.Option(
        "--bit-depth", help="8 or 10 bits per channel (default: 10 for deep sources where the codec holds it)."
    ),
]
ChromaOpt = Annotated[
    str,
    typer.Option(
        help="auto (4:2:0; 4:4:4 for an odd side, which few browsers play), 420 (last odd column/row repeated), 444."
    ),
]


def _explain(fmt: OutputFormat, quiet: bool) -> None:
    """Say once, before any work, what about the output a user should know (``output_format``)."""
    if not quiet:
        for note in fmt.notes:
            stderr.print(f"note: {note}", highlight=False, soft_wrap=True)


def _fail(error: IvvaeError) -> typer.Exit:
    stderr.print(f"[bold red]error:[/] {escape(str(error))}", highlight=False, soft_wrap=True)
    return typer.Exit(error.exit_code)


@contextmanager
def _errors(quiet: bool = False) -> Iterator[None]:
    """Turn expected failures into one line and an exit code, and the library's warnings
    (``IvvaeWarning``) into one line each, none with --quiet."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore" if quiet else "always", IvvaeWarning)
        show = warnings.showwarning

        def one_line(message, category, *args, **kwargs) -> None:
            if not issubclass(category, IvvaeWarning):
                show(message, category, *args, **kwargs)
                return
            stderr.print(f"[bold yellow]warning:[/] {escape(str(message))}", highlight=False, soft_wrap=True)

        warnings.showwarning = one_line
        try:
            yield
        except IvvaeError as e:
            raise _fail(e) from None
        except KeyboardInterrupt:
            stderr.print("[bold red]interrupted[/]")
            raise typer.Exit(130) from None
        except torch.cuda.OutOfMemoryError:
            raise _fail(IvvaeError("out of GPU memory; try --groups-per-step 1 or --device cpu")) from None
        except OSError as e:  # a full disk, a read-only folder, wherever it is met
            error = write_error(e)
            if error is None:
                raise
            raise _fail(error) from None


class _FramesPerSecond(ProgressColumn):
    def render(self, task) -> Text:
        return Text(f"{task.speed:.2f} fps" if task.speed else "- fps", style="progress.data.speed")


@contextmanager
def _progress(label: str, total: int | None, quiet: bool) -> Iterator[Callable[[int], None]]:
    if quiet:
        yield lambda n: None
        return
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("frames")]
    with Progress(*columns, _FramesPerSecond(), TimeRemainingColumn(), console=stderr, transient=False) as bar:
        task = bar.add_task(label, total=total)
        yield lambda n: bar.advance(task, n)


def _size(text: str, option: str) -> int:
    try:
        return parse_size(text)
    except ValueError as e:
        raise IvvaeError(f"{option}: {e}") from None


def _memory(max_memory: str | None, tile: int | None, overlap: int | None, groups: int | None) -> MemoryOptions:
    """The memory options every command that runs the model takes alike, checked before any loading."""
    budget = _size(max_memory, "--max-memory") if max_memory is not None else None
    if tile is not None and overlap is not None and overlap >= tile:
        raise IvvaeError(f"--tile-overlap ({overlap}) must be smaller than --tile-size ({tile})")
    return MemoryOptions(budget, tile, overlap, groups)


def _load(weights: Path | None, model: str | None, device: str, dtype: str, quiet: bool) -> LoadedModel:
    """The model, on its device and in its dtype; says once which model it uses."""
    torch_dtype = None if dtype == "auto" else _dtype(dtype)
    target = select_device(device)
    prepare_device(target)
    torch_dtype = torch_dtype or default_dtype(target)
    loaded = load_model(find_weights(weights, model), device=target, dtype=torch_dtype)
    if not quiet:
        where = "the bundled small model" if loaded.path == BUNDLED else loaded.path
        stderr.print(
            f"model {loaded.name} ({where}) on {target}, {str(torch_dtype).removeprefix('torch.')}", highlight=False
        )
    return loaded


def _dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise IvvaeError(f"unknown dtype '{name}' (use {', '.join(DTYPES)})")
    return DTYPES[name]


def parse_size(text: str) -> int:
    """``4GB``, ``512M``, ``1.5GiB`` or plain bytes -> bytes (K, M, G, T: powers of 1024)."""
    units = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
    value = text.strip().upper().removesuffix("B").removesuffix("I")
    number, unit = (value[:-1], value[-1]) if value and value[-1] in units else (value, "")
    try:
        size = float(number) * units[unit]
    except ValueError:
        raise ValueError(f"not a size: '{text}' (use e.g. 4GB or 512MB)") from None
    if size <= 0:
        raise ValueError(f"size must be positive: '{text}'")
    return int(size)


def _finite(value: Any) -> Any:
    """JSON has no NaN or infinity: they become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def _report(report: dict[str, Any], json_path: Path | None, force: bool = True) -> None:
    if json_path is None:
        return
    text = json.dumps(_finite(report), indent=2, allow_nan=False, default=str) + "\n"
    if str(json_path) == "-":
        sys.stdout.write(text)
        return
    with atomic_output(json_path, force) as tmp:
        tmp.write_text(text)


def _input_file(path: Path) -> Path:
    if not path.exists():
        raise InputError(f"input not found: {path}")
    return path


@app.command()
def encode(
    input: Annotated[Path, typer.Argument(help="Video file.")],
    output: Annotated[Path, typer.Argument(help="Latent file to write (safetensors).")],
    model: ModelOpt = None,
    weights: WeightsOpt = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    start: StartOpt = 0.0,
    frames: FramesOpt = None,
    duration: DurationOpt = None,
    short_side: ShortSideOpt = None,
    sample: SampleOpt = False,
    seed: SeedOpt = None,
    max_memory: MemoryOpt = None,
    tile_size: TileOpt = None,
    tile_overlap: OverlapOpt = None,
    groups_per_step: GroupsOpt = None,
    skip_errors: SkipErrorsOpt = False,
    force: ForceOpt = False,
    quiet: QuietOpt = False,
    json_path: JsonOpt = None,
) -> None:
    """Encode a video into a latent file."""
    with _errors(quiet):
        info = probe(_input_file(input))
        check_output(output, force)
        memory = _memory(max_memory, tile_size, tile_overlap, groups_per_step)
        loaded = _load(weights, model, device, dtype, quiet)
        options = EncodeOptions(start, frames, duration, sample, seed, short_side, skip_errors)
        with _progress("encode", expected_frames(info, options), quiet) as progress:
            data = encode_video(input, loaded, options, memory=memory, progress=progress)
        with atomic_output(output, force) as tmp:
            write_latent_file(tmp, data)
        h = data.header
        summary = {
            "input": str(input),
            "output": str(output),
            "frames": h.source_frames,
            "size": [h.source_width, h.source_height],
            "latent_shape": list(data.latent.shape),
            "latent_bytes": output.stat().st_size,
            "model": h.model,
            "posterior": h.posterior,
            "audio": h.audio_codec,
            "tiling": h.tiling,
        }
        if not quiet:
            stderr.print(
                f"wrote {output}: {h.source_frames} frames {h.source_width}x{h.source_height} -> latent "
                f"{'x'.join(map(str, data.latent.shape[1:]))}",
                highlight=False,
            )
        _report(summary, json_path)


@app.command()
def decode(
    input: Annotated[Path, typer.Argument(help="Latent file, or a folder or glob of them.")],
    output: Annotated[
        Path, typer.Argument(help="Video file to write (the extension picks the container), or a folder for many.")
    ],
    model: ModelOpt = None,
    weights: WeightsOpt = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    codec: CodecOpt = None,
    crf: CrfOpt = 18,
    lossless: LosslessOpt = False,
    bit_depth: BitDepthOpt = None,
    chroma: ChromaOpt = "auto",
    max_memory: MemoryOpt = None,
    tile_size: TileOpt = None,
    tile_overlap: OverlapOpt = None,
    groups_per_step: GroupsOpt = None,
    ext: Annotated[str, typer.Option(help="With a folder or glob: the container of the videos written.")] = "mp4",
    fps: Annotated[
        str | None, typer.Option(help=f"Bare tensors: the video's frames per second (default {DEFAULT_FPS}).")
    ] = None,
    latent_space: Annotated[
        str, typer.Option(help="Bare tensors: scaled (as ivvae stores latents) or unscaled (the posterior's own).")
    ] = "scaled",
    size: Annotated[
        str | None,
        typer.Option(help="Bare tensors: WIDTHxHEIGHT, the frames cropped by under 8 pixels a side (1088 to 1080)."),
    ] = None,
    key: Annotated[str | None, typer.Option(help="Bare tensors: the tensor's name in a file of several.")] = None,
    clip: ClipOpt = None,
    strict: StrictOpt = False,
    force: ForceOpt = False,
    quiet: QuietOpt = False,
    json_path: JsonOpt = None,
) -> None:
    """Decode a latent file into a video with the source's frame count, size, timing and audio; or a
    bare latent tensor as a diffusion model's sampler saves it (.safetensors, .pt, .npy, .npz:
    (C, T, h, w), or (B, C, T, h, w) for a video per item); or every latent file of a folder or glob
    into a folder of videos, with one model load; or a clip of a dataset (either layout) by its key."""
    with _errors(quiet):
        write = WriteOptions(codec, crf, lossless, bit_depth, chroma)
        memory = _memory(max_memory, tile_size, tile_overlap, groups_per_step)
        bare = BareOptions(_fraction(fps, "--fps") or DEFAULT_FPS, latent_space, size and parse_frame_size(size), key)
        run = _Decoding(weights, model, device, dtype, memory, write, bare, force, quiet, json_path, strict)
        if clip is not None:
            _decode_clip(input, clip, output, run)
            return
        if input.is_dir() or glob.has_magic(str(input)):
            _decode_many(str(input), output, ext, run)
            return
        if is_bare_latent(input):
            _decode_bare(input, output, run)
            return
        if fps is not None or size is not None or key is not None or latent_space != "scaled":
            raise InputError(
                f"{input} is an ivvae latent file, which records its rate, size and latent space: "
                "--fps, --size, --key and --latent-space are for bare tensors"
            )
        _decode_latent(read_latent_file(input, strict=strict), str(input), output, run)


def _decode_clip(folder: Path, key: str, output: Path, run: _Decoding) -> None:
    """A clip of a dataset folder, by its key, as one latent file is decoded."""
    from ivvae_cli.dataset.reading import read_clip

    _input_file(folder)
    _decode_latent(read_clip(folder, _clip_key(folder, key), strict=run.strict), f"{folder}:{key}", output, run)


def _clip_key(folder: Path, key: str | None) -> str:
    if not folder.is_dir():
        raise InputError(f"--clip names a clip of a dataset folder; {folder} is not a folder")
    if key is None:
        raise InputError(f"{folder} is a folder: give a dataset folder and --clip KEY (the index's key column)")
    return key


def _decode_latent(data: LatentFile, name: str, output: Path, run: _Decoding) -> None:
    check_output(output, run.force)
    _explain(decode_format(data.header, output, run.write), run.quiet)
    loaded = run.load(data.header.model)
    check_model_matches(data, loaded, name)
    with (
        _progress("decode", data.header.source_frames, run.quiet) as progress,
        atomic_output(output, run.force) as tmp,
    ):
        tiling = decode_latent(data, tmp, loaded, run.write, memory=run.memory, progress=progress)
    if not run.quiet:
        stderr.print(f"wrote {output}", highlight=False)
    _report({"input": name, "output": str(output), "frames": data.header.source_frames, "tiling": tiling},
            run.json_path)  # fmt: skip


@dataclass(frozen=True)
class _Decoding:
    """What ``decode`` does with whatever it is given: one file, a bare tensor, a folder."""

    weights: Path | None
    model: str | None
    device: str
    dtype: str
    memory: MemoryOptions
    write: WriteOptions
    bare: BareOptions
    force: bool
    quiet: bool
    json_path: Path | None
    strict: bool

    def load(self, recorded: str | None = None) -> LoadedModel:
        """The model asked for, else the one a latent file records, else the default."""
        return _load(self.weights, self.model or recorded, self.device, self.dtype, self.quiet)

    def tensor(
        self, latent: torch.Tensor, output: Path, loaded: LoadedModel, progress: Callable[[int], None]
    ) -> list[Path]:
        """A bare tensor's videos, as ``decode_tensor`` writes them with these settings."""
        return decode_tensor(
            latent, output, loaded, self.bare, self.write, memory=self.memory, progress=progress, force=self.force
        )


def _decode_bare(input: Path, output: Path, run: _Decoding) -> None:
    """A bare latent tensor into a video per batch item, everything checked before the model loads."""
    bare = read_bare_latent(input, run.bare.key)
    size = decoded_size(bare.latent.shape, run.bare.size)
    outputs = batch_outputs(output, bare.latent.shape[0])
    for path in outputs:
        check_output(path, run.force)
    _explain(run.write.format(outputs[0], size.width, size.height, Colour(), 8), run.quiet)
    loaded = run.load()
    check_channels(bare.latent, loaded, str(input))
    with _progress("decode", size.frames * len(outputs), run.quiet) as progress:
        written = run.tensor(bare.latent, output, loaded, progress)
    if not run.quiet:
        stderr.print(f"wrote {', '.join(map(str, written))}", highlight=False, soft_wrap=True)
    _report({"input": str(input), "outputs": [str(p) for p in written], "frames": size.frames,
             "size": [size.width, size.height], "fps": str(run.bare.fps)}, run.json_path)  # fmt: skip


def _decode_bare_into(
    path: Path, target: Path, folder: Path, run: _Decoding, loaded: LoadedModel, progress: Progress
) -> list[Path]:
    """One bare tensor of a folder decode, its batch's videos placed under ``folder`` too."""
    data = read_bare_latent(path, run.bare.key)
    check_channels(data.latent, loaded, str(path))
    for item in batch_outputs(target, data.latent.shape[0]):
        place_under(folder, item.relative_to(folder).as_posix())
    target.parent.mkdir(parents=True, exist_ok=True)
    return run.tensor(data.latent, target, loaded, progress)


def _decode_many(spec: str, folder: Path, ext: str, run: _Decoding) -> None:
    """Every latent file (or bare tensor) of a folder or glob into ``folder``, mirroring their
    paths; a file that fails, or whose mirrored path cannot be placed safely under ``folder``, is
    reported and the rest go on."""
    files = find_latent_files(spec, (".latent", *BARE_SUFFIXES))
    if not files:
        raise InputError(f"no latent files in {spec}")
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"with many latent files the output is a folder: {folder} is a file")
    suffix = ext.lstrip(".")
    if not suffix.isalnum():
        raise OutputError(f"--ext is a container's extension, such as mp4 or mkv; not {ext!r}")
    targets, failures, taken = [], [], set()
    for path, relative in files:
        try:
            target = place_under(folder, f"{relative.with_suffix('').as_posix()}.{suffix}")
            if target in taken:
                raise OutputError(f"{target} is another latent file's output too")
        except OutputError as e:
            failures.append({"input": str(path), "reason": str(e)})
            stderr.print(f"[red]failed:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
            continue
        taken.add(target)
        targets.append((path, target))
    if not targets:
        raise OutputError(f"none of the {len(files)} latent files can be placed under {folder}")
    existing = [t for _, t in targets if t.exists()]
    if existing and not run.force:
        raise OutputError(f"{len(existing)} outputs exist, e.g. {existing[0]} (use --force to overwrite)")
    check_writable(folder if folder.is_dir() else folder.parent)
    first = next((read_latent_header(path) for path, _ in targets if not is_bare_latent(path)), None)
    loaded = run.load(first and first.model)
    folder.mkdir(exist_ok=True)
    written = []
    with _progress(f"decode {len(files)} files", None, run.quiet) as progress:
        for path, target in targets:
            try:
                if is_bare_latent(path):
                    written += [str(video) for video in _decode_bare_into(path, target, folder, run, loaded, progress)]
                    continue
                data = read_latent_file(path, strict=run.strict)
                check_model_matches(data, loaded, str(path))
                target.parent.mkdir(parents=True, exist_ok=True)
                with atomic_output(target, run.force) as tmp:
                    decode_latent(data, tmp, loaded, run.write, memory=run.memory, progress=progress)
                written.append(str(target))
            except WriteError:  # the disk, not the file: every later write would fail too
                raise
            except IvvaeError as e:
                failures.append({"input": str(path), "reason": str(e)})
                stderr.print(f"[red]failed:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
    if not run.quiet:
        stderr.print(f"wrote {len(written)} videos into {folder}", highlight=False)
    _report({"inputs": len(files), "written": written, "failed": failures}, run.json_path)
    if failures:
        raise InputError(f"{len(failures)} of {len(files)} latent files failed")


@app.command()
def reconstruct(
    input: Annotated[Path, typer.Argument(help="Video file.")],
    output: Annotated[Path | None, typer.Argument(help="Reconstructed video to write (optional).")] = None,
    metrics: Annotated[bool, typer.Option("--metrics/--no-metrics", help="Measure PSNR and SSIM.")] = False,
    compare_video: ComparisonOpt = None,
    plot: PlotOpt = None,
    lpips: LpipsOpt = False,
    model: ModelOpt = None,
    weights: WeightsOpt = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    start: StartOpt = 0.0,
    frames: FramesOpt = None,
    duration: DurationOpt = None,
    short_side: ShortSideOpt = None,
    sample: SampleOpt = False,
    seed: SeedOpt = None,
    codec: CodecOpt = None,
    crf: CrfOpt = 18,
    lossless: LosslessOpt = False,
    bit_depth: BitDepthOpt = None,
    chroma: ChromaOpt = "auto",
    max_memory: MemoryOpt = None,
    tile_size: TileOpt = None,
    tile_overlap: OverlapOpt = None,
    groups_per_step: GroupsOpt = None,
    skip_errors: SkipErrorsOpt = False,
    force: ForceOpt = False,
    quiet: QuietOpt = False,
    json_path: JsonOpt = None,
) -> None:
    """Encode and decode in one streaming pass; write the result and/or measure what was lost."""
    with _errors(quiet):
        info = probe(_input_file(input))
        metrics = metrics or lpips or plot is not None or (output is None and compare_video is None)
        lpips_net = _prepare_outputs([output, compare_video, plot], force, lpips)
        write = WriteOptions(codec, crf, lossless, bit_depth, chroma)
        if output is not None:
            _explain(
                write.format(output, *resized(info.width, info.height, short_side), info.colour, info.bit_depth), quiet
            )
        memory = _memory(max_memory, tile_size, tile_overlap, groups_per_step)
        loaded = _load(weights, model, device, dtype, quiet)
        options = EncodeOptions(start, frames, duration, sample, seed, short_side, skip_errors)
        with (
            _progress("reconstruct", expected_frames(info, options), quiet) as progress,
            _maybe_atomic(output, force) as tmp,
            _maybe_atomic(compare_video, force) as side,
        ):
            result = reconstruct_video(
                input, loaded, options, tmp, write_options=write, memory=memory,
                measure=metrics, lpips=lpips_net, comparison=side, progress=progress,
            )  # fmt: skip
        h = result.header
        report: dict[str, Any] = {
            "input": str(input),
            "output": str(output) if output else None,
            "model": loaded.name,
            "frames": h.source_frames,
            "encode_tiling": h.tiling,
            "decode_tiling": result.decode_tiling,
            "sizes": result.sizes,
        }
        if result.metrics is not None:
            _metrics_report(result.metrics, report, plot, force, quiet, json_path)
        _report(report, json_path)


@app.command()
def compare(
    reference: Annotated[Path, typer.Argument(help="The original video.")],
    other: Annotated[Path, typer.Argument(help="The video to judge against it (any codec).")],
    frames: FramesOpt = None,
    compare_video: ComparisonOpt = None,
    plot: PlotOpt = None,
    lpips: LpipsOpt = False,
    force: ForceOpt = False,
    quiet: QuietOpt = False,
    json_path: JsonOpt = None,
) -> None:
    """The same metrics between any two videos of the same size, frame by frame."""
    with _errors():
        info = probe(_input_file(reference))
        probe(_input_file(other))
        lpips_net = _prepare_outputs([compare_video, plot], force, lpips)
        total = min(info.frames, frames) if info.frames and frames else info.frames or frames
        with _progress("compare", total, quiet) as progress, _maybe_atomic(compare_video, force) as side:
            metrics, counts = compare_videos(
                reference, other, max_frames=frames, comparison=side, lpips=lpips_net, progress=progress
            )
        report: dict[str, Any] = {"reference": str(reference), "other": str(other), "frames": counts}
        if counts["a"] != counts["b"] and not quiet:
            stderr.print(f"note: {counts['a']} frames against {counts['b']}; compared the first {len(metrics.psnr)}")
        _metrics_report(metrics, report, plot, force, quiet, json_path)
        _report(report, json_path)


@contextmanager
def _maybe_atomic(path: Path | None, force: bool) -> Iterator[Path | None]:
    if path is None:
        yield None
        return
    with atomic_output(path, force) as tmp:
        yield tmp


def _prepare_outputs(paths: list[Path | None], force: bool, lpips: bool):
    """Check every output before any work, and load LPIPS if asked (it may refuse)."""
    for path in paths:
        if path is not None:
            check_output(path, force)
    return _lpips() if lpips else None


def _lpips():
    from ivvae_cli.metrics import load_lpips

    try:
        return load_lpips()
    except RuntimeError as e:
        raise IvvaeError(f"{e}; LPIPS not computed (ivvae never downloads networks)") from None


def _metrics_report(
    metrics: Metrics, report: dict, plot: Path | None, force: bool, quiet: bool, json_path: Path | None
) -> None:
    """Add the metrics to ``report``, plot them if asked, and print them: the tables unless the JSON
    report is all that was asked for or takes stdout, the picture only when not --quiet."""
    summary = metrics.summary()
    report["metrics"] = summary
    report["per_frame"] = metrics.per_frame()
    if plot is not None:
        try:
            with atomic_output(plot, force) as tmp:
                plot_per_frame(metrics, tmp)
        except RuntimeError as e:
            raise IvvaeError(str(e)) from None
    if str(json_path) != "-" and (not quiet or json_path is None):
        _print_metrics(summary, report.get("sizes"), None if quiet else report["per_frame"])


SPARKS = "▁▂▃▄▅▆▇█"


def lowest_per_column(values: list[float], width: int) -> list[int]:
    """The index of the frame each of at most ``width`` columns shows: every frame when they fit,
    else the lowest of each run of ceil(n / width) frames, so that a dip is never averaged away."""
    per = max(1, math.ceil(len(values) / max(1, width)))
    return [min(range(i, min(i + per, len(values))), key=values.__getitem__) for i in range(0, len(values), per)]


def sparkline(values: list[float]) -> str:
    """One bar per value, from ▁ at the lowest to █ at the highest (eight equal steps)."""
    lo, hi = min(values, default=0.0), max(values, default=0.0)
    return "".join(SPARKS[min(7, int((v - lo) / (hi - lo) * 8)) if hi > lo else 3] for v in values)


def _print_psnr_picture(console: Console, per_frame: list[dict]) -> None:
    """Per-frame PSNR as a sparkline binned to the terminal, '^' under the keyframes' columns."""
    values = [row["psnr_db"] for row in per_frame]
    shown = lowest_per_column(values, console.width)
    per = math.ceil(len(values) / len(shown))
    lo, hi = min(values[i] for i in shown), max(values[i] for i in shown)
    column = "" if per == 1 else f"; a column: the lowest of {per} frames"
    console.print(f"PSNR per frame (▁ {lo:.2f} to █ {hi:.2f} dB{column}; ^ keyframe):", highlight=False, soft_wrap=True)
    console.print(sparkline([values[i] for i in shown]), highlight=False)
    console.print("".join("^" if per_frame[i]["position"] in ("first", "0") else " " for i in shown).rstrip())


def _print_metrics(summary: dict, sizes: dict | None, per_frame: list[dict] | None = None) -> None:
    """The tables; with ``per_frame``, the PSNR picture under them."""
    console = Console()
    table = Table(title="what was lost", show_header=True)
    for name in ("frames", "PSNR (dB)", "SSIM", "worst PSNR", "worst SSIM", "flicker (levels)"):
        table.add_column(name, justify="right")
    table.add_row(
        str(summary["frames"]),
        f"{summary['psnr_db']:.2f}",
        f"{summary['ssim']:.4f}",
        f"{summary['psnr_db_min']:.2f}",
        f"{summary['ssim_min']:.4f}",
        f"{summary['flicker']:.3f}",
    )
    console.print(table)
    positions = Table(title="by position in group (0: keyframe)", show_header=True)
    for name in ("position", "frames", "PSNR (dB)", "SSIM"):
        positions.add_column(name, justify="right")
    for position, row in summary["positions"].items():
        positions.add_row(position, str(row["frames"]), f"{row['psnr_db']:.2f}", f"{row['ssim']:.4f}")
    console.print(positions)
    spread = summary["position_spread"]
    console.print(f"spread over positions 0-3: {spread['psnr_db']:.3f} dB, SSIM {spread['ssim']:.4f}", highlight=False)
    worst = ", ".join(f"#{r['index']} ({r['psnr_db']:.2f} dB)" for r in summary["worst_frames"])
    console.print(f"worst frames: {worst}", highlight=False)
    if sizes:
        console.print(
            f"latent {sizes['latent_bytes']:,} bytes: raw RGB is {sizes['raw_to_latent']}x larger"
            + (f", the source file {sizes['source_to_latent']}x" if "source_to_latent" in sizes else ""),
            highlight=False,
        )
    if per_frame:
        _print_psnr_picture(console, per_frame)


DEMO_FILES = ("reconstruction.mp4", "comparison.mp4", "metrics.json")


@app.command()
def demo(
    folder: Annotated[Path, typer.Argument(help="Folder to write into (made if absent).")] = Path("ivvae-demo"),
    frames: Annotated[int, typer.Option(min=1, help="Frames of the sample to reconstruct (76 in all).")] = 33,
    short_side: Annotated[int, typer.Option(min=8, help="Resize first to this short side (272: as it is).")] = 128,
    model: ModelOpt = None,
    weights: WeightsOpt = None,
    device: DeviceOpt = "auto",
    force: ForceOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """The main job on the sample clip shipped in the package (needs nothing else): reconstruct it with
    the default model, write the reconstruction, a side-by-side comparison and metrics.json into
    FOLDER, and print what was lost. The defaults take about 15 seconds on two CPU cores."""
    with _errors():
        if folder.exists() and not folder.is_dir():
            raise OutputError(f"not a folder: {folder}")
        there = [name for name in DEMO_FILES if (folder / name).exists()]
        if there and not force:
            raise OutputError(f"{folder} holds {', '.join(there)} already (use --force to overwrite)")
        made = not folder.exists()
        folder.mkdir(parents=True, exist_ok=True)
    try:
        reconstruct(
            SAMPLE, folder / DEMO_FILES[0], metrics=True, compare_video=folder / DEMO_FILES[1], model=model,
            weights=weights, device=device, frames=frames, short_side=short_side, force=force, quiet=quiet,
            json_path=folder / DEMO_FILES[2],
        )  # fmt: skip
    except BaseException:
        if made:
            with suppress(OSError):
                folder.rmdir()  # only if the run left it empty
        raise
    if not quiet:
        stderr.print(
            f"wrote {folder}: {DEMO_FILES[0]}, {DEMO_FILES[1]} (source | reconstruction | error x{ERROR_GAIN}) "
            f"and {DEMO_FILES[2]}",
            highlight=False,
        )


@app.command()
def info(
    file: Annotated[Path, typer.Argument(help="A latent file, a bare latent tensor, a video, or a dataset folder.")],
    fps: Annotated[
        str | None, typer.Option(help=f"Bare tensors: the rate its seconds are given at (default {DEFAULT_FPS}).")
    ] = None,
    key: Annotated[str | None, typer.Option(help="Bare tensors: the tensor's name in a file of several.")] = None,
    clip: ClipOpt = None,
    json_path: JsonOpt = None,
) -> None:
    """Show what a latent file, a bare latent tensor (or a video) holds, or a clip of a dataset by
    its key; of a damaged latent file, what could be read and what is wrong with it (exit code 3)."""
    with _errors():
        _input_file(file)
        if clip is not None or file.is_dir():
            from ivvae_cli.dataset.reading import describe_clip

            report = describe_clip(file, _clip_key(file, clip))
        elif is_bare_latent(file):
            report = describe_bare_latent(file, key, _fraction(fps, "--fps") or DEFAULT_FPS)
        elif looks_like_latent_file(file):
            report = describe_latent_file(file)
        else:
            report = describe_video(file)
        problems = report.pop("problems", [])
        if json_path is None:
            table = Table(show_header=False, title=escape(str(file)))
            for key, value in report.items():
                table.add_row(key, Text(json.dumps(value) if isinstance(value, list | dict) else str(value)))
            for problem in problems:
                table.add_row(Text("problem", style="bold red"), Text(problem))
            Console().print(table)
        _report(report | ({"problems": problems} if report["kind"] != "video" else {}), json_path)
        if problems and report["kind"] == "bare latent":
            raise InputError(problems[0])
        if problems:
            more = f" and {len(problems) - 1} more" if len(problems) > 1 else ""
            raise InputError(f"{file} is not a valid latent file: {problems[0]}{more}")


@app.command()
def train(
    videos: Annotated[list[Path] | None, typer.Argument(help="Training videos (or use --manifest).")] = None,
    out: Annotated[Path, typer.Option(help="Run folder: state.pt, model.safetensors, log.jsonl.")] = Path("run"),
    manifest: Annotated[Path | None, typer.Option(help="A MANIFEST.tsv with split and file columns.")] = None,
    split: Annotated[str, typer.Option(help="Manifest split to train on.")] = "train",
    eval_split: Annotated[str | None, typer.Option(help="Manifest split for held-out PSNR.")] = "eval",
    resume: Annotated[bool, typer.Option(help="Continue the run in --out (its settings; --steps may grow).")] = False,
    phase: Annotated[str, typer.Option(help="image (single frames) or video (clips).")] = "video",
    steps: Annotated[int | None, typer.Option(min=1, help="Total optimizer steps.")] = None,
    z_dim: Annotated[int, typer.Option(help="Latent channels.")] = 16,
    dim: Annotated[int, typer.Option(help="Base width (an --init of half this width is widened to it).")] = 8,
    init: Annotated[Path | None, typer.Option(help="Start from this checkpoint (fine-tuning).")] = None,
    crop: Annotated[int, typer.Option(min=16, help="Square crop, pixels (multiple of 8).")] = 128,
    batch: Annotated[int, typer.Option(min=1)] = 4,
    clip_frames: Annotated[int, typer.Option(min=1, help="Frames per clip, 1 + 4k.")] = 9,
    short_side: Annotated[int, typer.Option(min=0, help="Resize videos to this short side (0: as they are).")] = 256,
    lr: Annotated[float, typer.Option(help="Learning rate.")] = 3e-4,
    lr_final: Annotated[
        float | None, typer.Option(help="Decay the rate along a cosine to this by the last step (default: constant).")
    ] = None,
    mse_weight: Annotated[
        float, typer.Option(min=0, help="Weight of an MSE term beside L1 (PSNR weighs large errors as MSE does).")
    ] = 0.0,
    psnr_weight: Annotated[
        float, typer.Option(min=0, help="Weight of a term minus the mean per-frame PSNR (as benchmarks average).")
    ] = 0.0,
    ssim_weight: Annotated[float, typer.Option(min=0, help="Weight of the structural term, 1 - SSIM.")] = 0.2,
    fp32: Annotated[bool, typer.Option(help="Train in float32 on CUDA too (default: bf16 autocast there).")] = False,
    decoder_only: Annotated[
        bool, typer.Option(help="Keep the --init encoder: latents made with that checkpoint stay valid.")
    ] = False,
    checkpoint_every: Annotated[
        int, typer.Option(min=1, help="Save the weights and the state to resume from every this many steps.")
    ] = 250,
    frame_cache: Annotated[
        Path | None,
        typer.Option(help="Keep the decoded frames in this folder: later runs and --resume read them (no PyAV)."),
    ] = None,
    time_limit: Annotated[
        float | None,
        typer.Option(min=0, help="Stop at the last checkpoint that ends within this many seconds; --resume continues."),
    ] = None,
    seed: Annotated[int, typer.Option()] = 0,
    device: DeviceOpt = "auto",
    quiet: QuietOpt = False,
) -> None:
    """Train or fine-tune IV-VAE on videos; resumable, exactly."""
    from ivvae_cli.train import TrainConfig, Trainer, manifest_videos, run_config

    deadline = None if time_limit is None else time.monotonic() + time_limit
    cache = str(frame_cache) if frame_cache else None
    with _errors():
        new = None
        if not resume:
            files = [str(v) for v in videos or []]
            evals: list[str] = []
            if manifest is not None:
                files += manifest_videos(_input_file(manifest), split)
                evals = manifest_videos(manifest, eval_split) if eval_split else []
            if not files:
                raise InputError("no training videos: give files or --manifest")
            new = TrainConfig(
                videos=files, eval_videos=evals, z_dim=z_dim, dim=dim, init=str(init) if init else None,
                phase=phase, steps=steps or 1000, clip_frames=clip_frames, crop=crop, batch=batch,
                short_side=short_side, lr=lr, lr_final=lr_final, mse_weight=mse_weight, psnr_weight=psnr_weight,
                ssim_weight=ssim_weight, bf16=not fp32, decoder_only=decoder_only, seed=seed,
                checkpoint_every=checkpoint_every, frame_cache=cache,
            )  # fmt: skip
        config = run_config(out, new, steps, cache)
        trainer = Trainer(config, out, select_device(device))
        if not quiet:
            stderr.print(f"training {trainer.model.z_dim}x{trainer.model.dim} from step {trainer.step} in {out}")
        columns = [TextColumn("train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[status]}")]
        with Progress(*columns, TimeRemainingColumn(), console=stderr, disable=quiet) as bar:
            task = bar.add_task("train", total=config.steps, completed=trainer.step, status="")

            def show(step: int, record: dict) -> None:
                status = f"loss {record['loss']:.4f}"
                if "eval_psnr_db" in record:
                    status += f"  held-out {record['eval_psnr_db']:.2f} dB"
                bar.update(task, completed=step, status=status)

            record = trainer.run(show, deadline)
        if trainer.step < config.steps:
            stderr.print(f"stopped by --time-limit at step {trainer.step} of {config.steps}; --resume continues")
        if not quiet:
            stderr.print(f"step {trainer.step}: {record}; weights in {out / 'model.safetensors'}", highlight=False)


dataset_app = typer.Typer(
    help="Turn a video collection into a latent dataset, on one device or many (torchrun, srun).",
    no_args_is_help=True,
)
app.add_typer(dataset_app, name="dataset")


@dataset_app.command("encode")
def dataset_encode(
    source: Annotated[str, typer.Argument(help="A manifest (.csv, .tsv, .jsonl, .parquet), a folder or a glob.")],
    out: Annotated[Path, typer.Argument(help="The dataset folder; running the same command again resumes.")],
    frames: Annotated[
        int | None, typer.Option("--frames", help="Frames per clip, 1 + 4k (default 33; none with --clips full).")
    ] = None,
    clips: Annotated[str, typer.Option(help="head (first clip), chunk (consecutive), slide, full (whole).")] = "head",
    stride: Annotated[int | None, typer.Option(min=1, help="--clips slide: frames between clip starts.")] = None,
    target_fps: Annotated[
        str | None, typer.Option(help="Drop or repeat frames by timestamp to this rate, e.g. 24 or 30000/1001.")
    ] = None,
    short_side: ShortSideOpt = None,
    buckets: Annotated[
        str | None, typer.Option(help="WxH,WxH,...: each clip to the nearest aspect, resized to cover, centre-cropped.")
    ] = None,
    posterior: Annotated[str, typer.Option(help="mean, sample, or both (mean and log variance stored).")] = "mean",
    seed: Annotated[int, typer.Option(help="With --posterior sample: the seed of every clip's noise.")] = 0,
    layout: Annotated[
        str, typer.Option(help="files: a latent file per clip; shards: tar files (WebDataset) with an index.")
    ] = "files",
    shard_size: Annotated[str, typer.Option(help="--layout shards: bytes a shard holds, e.g. 1GB or 256MB.")] = "1GB",
    work_units: Annotated[
        int | None, typer.Option(help="What the work list is cut into, by a hash of each source (fixed at the start).")
    ] = None,
    path_column: Annotated[str, typer.Option(help="Manifest column of video paths.")] = "path",
    id_column: Annotated[str, typer.Option(help="Manifest column of clip ids.")] = "id",
    start_column: Annotated[str, typer.Option(help="Manifest column where a span starts.")] = "start",
    end_column: Annotated[str, typer.Option(help="Manifest column where a span ends.")] = "end",
    span_unit: Annotated[str, typer.Option(help="Unit of the span columns: frames or seconds.")] = "frames",
    model: ModelOpt = None,
    weights: WeightsOpt = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    max_memory: MemoryOpt = None,
    tile_size: TileOpt = None,
    tile_overlap: OverlapOpt = None,
    groups_per_step: GroupsOpt = None,
    workers: Annotated[int, typer.Option(min=0, help="Processes decoding video beside the model (0: in turn).")] = 2,
    batch_size: Annotated[
        int, typer.Option(min=1, help="Clips of one shape (frames, height, width) encoded together per model call.")
    ] = 1,
    engine: Annotated[
        str, typer.Option(help="plain: this process's share (torchrun or srun start more); ray: a Ray Data pipeline.")
    ] = "plain",
    ray_address: Annotated[
        str | None,
        typer.Option(help="--engine ray: the cluster to join ('auto': this machine's; none or 'local': a new one)."),
    ] = None,
    ray_actors: Annotated[
        int, typer.Option(min=1, help="--engine ray without GPUs: encoding actors (with GPUs: one per GPU).")
    ] = 1,
    max_errors: Annotated[int, typer.Option(min=0, help="Exit non-zero when more sources than this fail.")] = 0,
    overwrite: Annotated[
        bool, typer.Option(help="Re-encode into a folder made with other options or weights.")
    ] = False,
    log_every: Annotated[float, typer.Option(help="Seconds between each process's log lines (0: none).")] = 60.0,
    quiet: QuietOpt = False,
    json_path: JsonOpt = None,
) -> None:
    """Encode every clip of a collection into latent files and an index, resumably, on every device
    torchrun (or srun) starts: each process takes its share of the work units."""
    from ivvae_cli import dataset

    with _errors():
        world = dataset.World.from_environment()
        columns = dataset.Columns(path_column, id_column, start_column, end_column, span_unit)
        sources = dataset.read_sources(source, columns)
        options = dataset.ClipOptions(
            frames=frames if frames is not None or clips == "full" else 33, mode=clips, stride=stride,
            target_fps=_fraction(target_fps, "--target-fps"), short_side=short_side,
            buckets=dataset.parse_buckets(buckets) if buckets else (), posterior=posterior, seed=seed,
        )  # fmt: skip
        storage = dataset.Storage(layout, _size(shard_size, "--shard-size"))
        dataset.check_batch(options, batch_size)
        if engine not in ("plain", "ray"):
            raise IvvaeError(f"--engine is plain or ray, not '{engine}'")
        if engine == "ray":
            from ivvae_cli.dataset import ray_engine

            ray_engine.import_ray()
            if world.size > 1:
                raise InputError("--engine ray runs the whole job from one driver: start it once, not under torchrun")
        units = dataset.work_units(out, work_units, overwrite)
        share = world.share(sources, units)
        talk = not quiet and world.local_rank == 0
        if not share:
            if talk:
                stderr.print(f"{world}: no work ({len(sources)} sources for {world.size} processes)")
            return
        if device in ("auto", "cuda") and torch.cuda.is_available():
            device = f"cuda:{world.local_rank % torch.cuda.device_count()}"
        memory = _memory(max_memory, tile_size, tile_overlap, groups_per_step)
        dataset.check_folder(out)
        with FolderLock(out, world.launch):  # before the model loads: a busy folder is said at once
            # Ray's actors load the model where they run: the driver's copy only names it.
            loaded = _load(weights, model, "cpu", "float32", True) if engine == "ray" else None
            loaded = loaded or _load(weights, model, device, dtype, not talk)
            where = source if glob.has_magic(source) else str(Path(source).absolute())
            spec = dataset.JobSpec(where, columns, options, loaded.name, loaded.fingerprint, storage, units)
            dataset.prepare_folder(out, spec, overwrite)
            with _dataset_progress(world, len(share), talk, 0 if quiet else log_every) as progress:
                if engine == "ray":
                    tally, merged = ray_engine.encode_with_ray(
                        sources, out, loaded, spec, address=ray_address, actors=ray_actors,
                        dtype=None if dtype == "auto" else _dtype(dtype), memory=memory, batch_size=batch_size,
                        progress=progress,
                    )  # fmt: skip
                else:
                    tally, merged = dataset.encode_dataset(
                        sources, out, loaded, spec, world=world, memory=memory, workers=workers,
                        batch_size=batch_size, progress=progress,
                    )  # fmt: skip
        report = {
            "rank": world.rank, "world_size": world.size, "sources": tally.sources, "clips_written": tally.written,
            "clips_existing": tally.existing, "sources_skipped": tally.skipped, "sources_failed": tally.failed,
            "seconds": round(tally.seconds, 2), "clips_per_s": round(tally.clips_per_s, 3),
            "model_busy": round(tally.model_busy, 3), "index": merged,
        }  # fmt: skip
        if not quiet:
            stderr.print(_dataset_line(world, tally), highlight=False)
            if merged is not None:
                stderr.print(_index_line(out, merged), highlight=False)
        _report(report, json_path)
        if tally.failed > max_errors:
            raise InputError(f"{tally.failed} sources failed (more than --max-errors {max_errors}); see {out}/failures")


@dataset_app.command("merge")
def dataset_merge(
    out: Annotated[Path, typer.Argument(help="A dataset folder.")],
    json_path: JsonOpt = None,
) -> None:
    """Write the index of a dataset folder from what its processes have finished (each job's last
    process does this by itself)."""
    from ivvae_cli.dataset import merge_index

    with _errors():
        counts = merge_index(out)
        if json_path is None:
            stderr.print(_index_line(out, counts), highlight=False)
        _report(counts, json_path)


def _index_line(out: Path, counts: dict) -> str:
    line = (
        f"index: {counts['clips']} clips in {out / 'index.jsonl'}; {counts['sources_failed']} sources failed "
        f"(errors.jsonl), {counts['sources_skipped']} too short, "
        f"{counts['sources_warned']} with warnings (in their records)"
    )
    return line + (f", {counts['sources_pending']} not done yet" if counts["sources_pending"] else "")


def _fraction(text: str | None, option: str) -> Fraction | None:
    if text is None:
        return None
    try:
        return Fraction(text)
    except (ValueError, ZeroDivisionError):
        raise IvvaeError(f"{option}: not a number or fraction: '{text}'") from None


def _dataset_line(world, tally) -> str:
    return (
        f"[{world}] {tally.done}/{tally.sources} sources: {tally.written} clips written, {tally.existing} "
        f"already there, {tally.skipped} sources too short, {tally.failed} failed; {tally.clips_per_s:.2f} clips/s, "
        f"model busy {tally.model_busy:.0%}"
    )


@contextmanager
def _dataset_progress(world, total: int, bar: bool, log_every: float) -> Iterator[Callable]:
    """A progress bar on each node's first process, and every process's log line now and then."""
    last_log = time.perf_counter()

    def log(tally) -> None:
        nonlocal last_log
        if log_every and time.perf_counter() - last_log >= log_every:
            last_log = time.perf_counter()
            stderr.print(_dataset_line(world, tally), highlight=False)

    if not bar:
        yield log
        return
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("sources"),
               TextColumn("{task.fields[status]}"), TimeRemainingColumn()]  # fmt: skip
    with Progress(*columns, console=stderr) as progress:
        task = progress.add_task(f"encode {world}" if world.size > 1 else "encode", total=total, status="")

        def update(tally) -> None:
            status = f"{tally.written} clips ({tally.clips_per_s:.2f}/s), {tally.existing} there, "
            progress.update(task, completed=tally.done, status=f"{status}{tally.skipped} short, {tally.failed} failed")
            log(tally)

        yield update


weights_app = typer.Typer(help="Find, download, verify and convert IV-VAE checkpoints.", no_args_is_help=True)
app.add_typer(weights_app, name="weights")


def _checkpoint_record(report: CheckpointReport) -> dict[str, Any]:
    record = {k: v for k, v in vars(report).items()}
    return record | {"path": str(report.path), "status": "ok"}


def _print_checkpoint(record: dict[str, Any]) -> None:
    stderr.print(
        f"{record['path']}: ok, {record['name']} (z{record['z_dim']} dim{record['dim']}, "
        f"{record['params'] / 1e6:.1f}M {record['dtype']} parameters, fingerprint {record['fingerprint']})",
        highlight=False,
    )


@weights_app.command("list")
def weights_list(
    check: Annotated[bool, typer.Option("--check/--no-check", help="Verify each file found (reads it).")] = True,
    json_path: JsonOpt = None,
) -> None:
    """The known models, where each is found (search order below) and whether it is intact."""
    with _errors():
        rows = []
        for name in [*PUBLISHED, BUNDLED_NAME]:
            path = locate(name)
            row: dict[str, Any] = {"name": name, "path": str(path) if path else None, "bytes": None, "status": "absent"}
            if name in PUBLISHED:
                row["approx_bytes"] = PUBLISHED[name].approx_bytes
            if path is not None:
                row["bytes"] = path.stat().st_size
                row["status"] = "found"
                if check:
                    try:
                        row |= _checkpoint_record(verify_checkpoint(path, PUBLISHED.get(name)))
                    except IvvaeError as e:
                        row["status"] = f"corrupt: {e}"
            rows.append(row)
        if json_path is None:
            table = Table("model", "file", "size", "status")
            for row in rows:
                size = row["bytes"] or row.get("approx_bytes")
                size_text = f"{size / 1e6:.0f} MB" if size else "-"
                if row["bytes"] is None and size:
                    size_text = f"~{size_text}"
                table.add_row(row["name"], row["path"] or "-", size_text, row["status"])
            Console().print(table)
            Console().print(f"search order: {search_order()}", highlight=False)
        _report({"models": rows, "search_order": search_order()}, json_path)


@weights_app.command("download")
def weights_download(
    names: Annotated[list[str], typer.Argument(help="Published models, e.g. z16_dim64 (or 'all').")],
    folder: Annotated[
        Path | None, typer.Option("--dir", help="Where to put them (default: the user's cache folder).")
    ] = None,
    force: Annotated[bool, typer.Option("--force", "-f", help="Download again even if present.")] = False,
    quiet: QuietOpt = False,
    json_path: JsonOpt = None,
) -> None:
    """Download published checkpoints from ModelScope: resumable, verified, then renamed into place."""
    from rich.progress import DownloadColumn, TransferSpeedColumn

    from ivvae_cli.download import download_variant

    with _errors():
        wanted = list(PUBLISHED) if names == ["all"] else [canonical_name(n) for n in names]
        unknown = [n for n in wanted if n not in PUBLISHED]
        if unknown:
            raise IvvaeError(f"unknown model {unknown[0]}: published are {', '.join(PUBLISHED)}")
        records = []
        for name in wanted:
            columns = [TextColumn(name), BarColumn(), DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn()]
            with Progress(*columns, console=stderr, disable=quiet) as bar:
                task = bar.add_task(name, total=PUBLISHED[name].approx_bytes)
                report = download_variant(
                    PUBLISHED[name],
                    folder or cache_folder(),
                    force=force,
                    progress=lambda done, total, task=task: bar.update(task, completed=done, total=total),
                )
            records.append(_checkpoint_record(report))
            if not quiet:
                _print_checkpoint(records[-1])
        _report({"downloaded": records}, json_path)


@weights_app.command("verify")
def weights_verify(
    weights: Annotated[Path, typer.Argument(help="A checkpoint file or model name.")],
    json_path: JsonOpt = None,
) -> None:
    """Check a checkpoint by structure: every parameter name and shape, one float dtype, no NaN."""
    with _errors():
        path = find_weights(weights)
        name = canonical_name(str(weights)) if path != weights else path.stem
        record = _checkpoint_record(verify_checkpoint(path, PUBLISHED.get(name)))
        if json_path is None:
            _print_checkpoint(record)
        _report(record, json_path)


@weights_app.command("convert")
def weights_convert(
    source: Annotated[Path, typer.Argument(help="A .pth checkpoint (or a model name).")],
    target: Annotated[Path, typer.Argument(help="The .safetensors file to write.")],
    dtype: Annotated[str, typer.Option(help="float32 (bit-identical), bfloat16 or float16.")] = "float32",
    force: ForceOpt = False,
    json_path: JsonOpt = None,
) -> None:
    """Convert a checkpoint to safetensors, with its variant, scale and shift as metadata."""
    with _errors():
        record = _checkpoint_record(convert_checkpoint(find_weights(source), target, _dtype(dtype), force))
        if json_path is None:
            _print_checkpoint(record)
        _report(record, json_path)


def _version(value: bool) -> None:
    if value:
        print(f"ivvae {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version.")
    ] = False,
) -> None:
    """Compress video into IV-VAE latents and back."""
