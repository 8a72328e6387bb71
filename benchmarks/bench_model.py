"""Time encode and decode of the full-size IV-VAE (random weights) on a short clip.

    python benchmarks/bench_model.py --frames 5 --size 256 --device cpu

Prints frames/s, achieved GFLOP/s (convolution and attention FLOPs counted on the meta device) and
peak memory (process RSS on CPU, allocator peak on CUDA).
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from ivvae_cli.model import IVVAE


def count_flops(fn) -> float:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def figures(frames: int, seconds: float, flops: float, peak_gpu: int | None) -> dict:
    return {
        "seconds": round(seconds, 2),
        "frames_per_s": round(frames / seconds, 3),
        "gflop_per_frame": round(flops / frames / 1e9, 1),
        "gflop_per_s": round(flops / seconds / 1e9, 1),
        "peak_gpu_mib": peak_gpu and round(peak_gpu / 2**20),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=5)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--z-dim", type=int, default=16)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--groups-per-step", type=int, default=1)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    shape = (1, 3, args.frames, args.size, args.size)

    with torch.device("meta"):
        meta_model = IVVAE(args.z_dim, args.dim)
        meta_video = torch.empty(shape)
        meta_latent = meta_model.encode(meta_video)
        encode_flops = count_flops(lambda: meta_model.encode(meta_video, groups_per_step=args.groups_per_step))
        decode_flops = count_flops(lambda: meta_model.decode(meta_latent, groups_per_step=args.groups_per_step))

    torch.manual_seed(0)
    model = IVVAE(args.z_dim, args.dim).to(args.device, dtype).eval()
    video = (torch.rand(shape) * 2 - 1).to(args.device, dtype)
    cuda = args.device.startswith("cuda")

    def timed(fn):
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        with torch.inference_mode():
            out = fn()
        if cuda:
            torch.cuda.synchronize()
        return out, time.perf_counter() - start

    latent, encode_s = timed(lambda: model.encode(video, groups_per_step=args.groups_per_step))
    encode_peak = torch.cuda.max_memory_allocated() if cuda else None
    _, decode_s = timed(lambda: model.decode(latent, groups_per_step=args.groups_per_step))
    decode_peak = torch.cuda.max_memory_allocated() if cuda else None
    rss_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    report = {
        "model": f"z{args.z_dim}_dim{args.dim}",
        "clip": f"{args.frames}x{args.size}x{args.size}",
        "device": torch.cuda.get_device_name() if cuda else f"cpu ({torch.get_num_threads()} threads)",
        "dtype": args.dtype,
        "groups_per_step": args.groups_per_step,
        "encode": figures(args.frames, encode_s, encode_flops, encode_peak),
        "decode": figures(args.frames, decode_s, decode_flops, decode_peak),
        "peak_rss_mib": round(rss_peak / 2**20),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
