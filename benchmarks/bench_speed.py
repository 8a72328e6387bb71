"""Encode and decode speed of the full-size IV-VAE, ours against a plain path, side by side.

    python benchmarks/bench_speed.py --frames 17 --size 256
    python benchmarks/bench_speed.py --frames 17 --size 256 --authors-code ~/src/iv-vae   # also theirs

Paths, all on the same random weights and the same input:
- ``authors``: the authors' ``models/vae3d.py`` (a checkout given with ``--authors-code``; needs
  einops), as their ``rec_video.py`` runs it (posterior mean, so the outputs compare);
- ``plain``: our model run as the authors run theirs: one frame group at a time, whole frames, float32;
- ``fast``: our model as ``ivvae`` runs it (``--groups-per-step``, default 1 as in ``ivvae``: more
  groups per step cost memory and, on CPU, speed; on CUDA, bfloat16 decode and optional ``--compile``,
  whose first call, tracing and compiling every step shape, is reported apart as ``compile_s``).
Each path and direction runs in its own process, so peak memory is its own. Reported: seconds,
frames/s, achieved GFLOP/s (the model's convolution and attention FLOPs, counted once on the meta
device, the same for every path), that as a share of this machine's measured float32 matrix-multiply
peak, peak memory, and the largest difference from the plain path's output.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from ivvae_cli import IVVAE, decode, encode
from ivvae_cli.model import VideoSize

SCALE, SHIFT = 0.9697, -0.1553  # the published z16_dim64 factors


def matmul_peak_gflops(device: str, dtype: torch.dtype, seconds: float = 3.0) -> float:
    """The best sustained matrix-multiply rate over a few square sizes."""
    best = 0.0
    for n in (1024, 2048, 4096):
        a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
        torch.mm(a, b)
        reps, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds / 3:
            torch.mm(a, b)
            reps += 1
            if device.startswith("cuda"):
                torch.cuda.synchronize()
        best = max(best, 2 * n**3 * reps / (time.perf_counter() - start) / 1e9)
    return best


def inputs(args) -> tuple[torch.Tensor, torch.Tensor]:
    """The video and the latent every path gets (seeded, so each process makes the same)."""
    generator = torch.Generator().manual_seed(1)
    video = torch.rand(1, 3, args.frames, args.size, args.size, generator=generator) * 2 - 1
    size = VideoSize(args.frames, args.size, args.size).latent()
    latent = torch.randn(1, args.z_dim, size.frames, size.height, size.width, generator=generator)
    return video, latent


def add_clip_arguments(parser: argparse.ArgumentParser, frames: int) -> None:
    """The model and clip a speed script measures: z16_dim64 on ``frames`` x 256 x 256 by default."""
    parser.add_argument("--frames", type=int, default=frames)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--z-dim", type=int, default=16)
    parser.add_argument("--dim", type=int, default=64)


def our_model(args) -> IVVAE:
    torch.manual_seed(0)
    return IVVAE(args.z_dim, args.dim, SCALE, SHIFT).eval()


def authors_model(args, state: dict) -> torch.nn.Module:
    sys.path.insert(0, str(Path(args.authors_code).expanduser()))
    from models.vae3d import VAutoencoder3d  # the authors' code, never part of this project

    model = VAutoencoder3d(dim=args.dim, z_dim=args.z_dim, scale_factor=SCALE, shift_factor=SHIFT).eval()
    model.load_state_dict(state, strict=True)
    model.sample = lambda mu, log_var, deterministic=False: mu
    return model


def worker(args) -> None:
    """Time one path in one direction; write the figures and the output."""
    device = args.device
    cuda = device.startswith("cuda")
    ours = our_model(args)
    model = authors_model(args, ours.state_dict()) if args.path == "authors" else ours
    dtype = torch.float32
    if args.path == "fast" and cuda and args.direction == "decode":
        dtype = torch.bfloat16
    model = model.to(device, dtype)
    if args.path == "fast" and args.compile:
        model.encode_step = torch.compile(model.encode_step)
        model.decode_step = torch.compile(model.decode_step)
    video, latent = inputs(args)
    x = (video if args.direction == "encode" else latent).to(device, dtype)
    groups = args.groups_per_step if args.path == "fast" else 1
    if args.path == "authors":
        run = model.encode if args.direction == "encode" else model.decode
    elif args.direction == "encode":

        def run(v):
            return encode(model, v, groups_per_step=groups)
    else:

        def run(z):
            return decode(model, z, groups_per_step=groups)

    compiled = args.path == "fast" and args.compile
    with torch.inference_mode():
        start = time.perf_counter()
        run(x if compiled else x[:, :, :1])  # warm-up: kernels and their plans; compiled, every step's graph
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        compile_seconds = time.perf_counter() - start if compiled else None
        start = time.perf_counter()
        out = run(x)
        if cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    torch.save(out.float().cpu(), args.output)
    print(json.dumps({
        "seconds": seconds,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "peak_gpu_mib": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
        "dtype": str(dtype).removeprefix("torch."),
        "compile_seconds": compile_seconds,
    }))  # fmt: skip


def count_flops(args) -> dict[str, float]:
    with torch.device("meta"):
        model = IVVAE(args.z_dim, args.dim)
        video = torch.empty(1, 3, args.frames, args.size, args.size)
        latent = encode(model, video)
        counts = {}
        for direction, fn in (("encode", lambda: encode(model, video)), ("decode", lambda: decode(model, latent))):
            with FlopCounterMode(display=False) as counter:
                fn()
            counts[direction] = counter.get_total_flops()
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_clip_arguments(parser, frames=17)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--groups-per-step", type=int, default=1, help="for the fast path")
    parser.add_argument("--compile", action="store_true", help="torch.compile the fast path")
    parser.add_argument("--authors-code", help="a checkout of github.com/ali-vilab/iv-vae")
    parser.add_argument("--paths", default="authors,plain,fast")
    parser.add_argument("--path", help=argparse.SUPPRESS)
    parser.add_argument("--direction", help=argparse.SUPPRESS)
    parser.add_argument("--output", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.path:
        worker(args)
        return

    paths = [p for p in args.paths.split(",") if p != "authors" or args.authors_code]
    flops = count_flops(args)
    cuda = args.device.startswith("cuda")
    peak = matmul_peak_gflops(args.device, torch.float32)
    peak_bf16 = matmul_peak_gflops(args.device, torch.bfloat16) if cuda else None
    results, outputs = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for direction in ("encode", "decode"):
            for path in paths:
                output = Path(tmp) / f"{path}-{direction}.pt"
                command = [sys.executable, __file__, *sys.argv[1:], "--path", path, "--direction", direction,
                           "--output", str(output)]  # fmt: skip
                done = subprocess.run(command, capture_output=True, text=True, check=False)
                if done.returncode:
                    sys.exit(f"{path} {direction} failed:\n{done.stderr}")
                figures = json.loads(done.stdout.strip().splitlines()[-1])
                outputs[path, direction] = torch.load(output)
                achieved = flops[direction] / figures["seconds"] / 1e9
                reference = peak_bf16 if figures["dtype"] == "bfloat16" else peak
                row = {
                    "path": path,
                    "direction": direction,
                    "dtype": figures["dtype"],
                    "seconds": round(figures["seconds"], 2),
                    "frames_per_s": round(args.frames / figures["seconds"], 3),
                    "gflop_per_s": round(achieved, 1),
                    "share_of_peak": round(achieved / reference, 3),
                    "peak_rss_mib": round(figures["peak_rss_mib"]),
                    "peak_gpu_mib": figures["peak_gpu_mib"] and round(figures["peak_gpu_mib"]),
                }
                if figures["compile_seconds"] is not None:  # the first call, apart from the steady one above
                    row["compile_s"] = round(figures["compile_seconds"], 2)
                results.append(row)
                print(json.dumps(row), file=sys.stderr)
            reference = "plain" if "plain" in paths else "authors"
            for row in results[-len(paths) :]:
                if reference in paths and row["path"] != reference:
                    difference = outputs[row["path"], direction] - outputs[reference, direction]
                    row[f"max_abs_diff_vs_{reference}"] = float(difference.abs().max())
    report = {
        "model": f"z{args.z_dim}_dim{args.dim}",
        "clip": f"{args.frames}x{args.size}x{args.size}",
        "device": torch.cuda.get_device_name() if cuda else f"cpu ({torch.get_num_threads()} threads)",
        "torch": torch.__version__,
        "matmul_peak_gflop_per_s": {"float32": round(peak, 1)} | ({"bfloat16": round(peak_bf16, 1)} if cuda else {}),
        "gflop_per_frame": {k: round(v / args.frames / 1e9, 1) for k, v in flops.items()},
        "fast_groups_per_step": args.groups_per_step,
        "results": results,
    }
    for direction in ("encode", "decode"):
        times = {r["path"]: r["seconds"] for r in results if r["direction"] == direction}
        if "authors" in times and "fast" in times:
            report[f"{direction}_speedup_vs_authors"] = round(times["authors"] / times["fast"], 2)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
