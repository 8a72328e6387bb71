"""Where eager time goes in ivvae's encode and decode: a torch.profiler table by op kind.

    python benchmarks/profile_step.py --frames 9 --size 256 --threads 2

Runs the full-size model (z16_dim64, random weights, float32, CPU) once per direction under the
profiler and sums each aten op's self time into a kind: convolution, the element-wise kinds the
issue asks about (norm, SiLU, add, copies), attention, and the rest. "untraced" is wall time that no
op accounts for (Python and dispatch overhead). ``--top N`` also lists the N costliest ops.
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict

import torch
from bench_speed import add_clip_arguments, inputs, our_model  # beside this file
from torch.profiler import ProfilerActivity, profile

from ivvae_cli import IVVAE, decode, encode

# aten op (self time) -> kind; ops not listed fall into "other".
KINDS = {
    "conv": ("aten::mkldnn_convolution", "aten::convolution", "aten::_convolution", "aten::conv2d"),
    "norm": ("aten::rms_norm", "aten::_fused_rms_norm", "aten::rsqrt", "aten::sum", "aten::clamp_min",
             "aten::mul", "aten::mul_", "aten::norm", "aten::linalg_vector_norm", "aten::mean", "aten::pow"),
    "silu": ("aten::silu", "aten::silu_"),
    "add": ("aten::add", "aten::add_"),
    "cat/copy": ("aten::cat", "aten::copy_", "aten::clone", "aten::contiguous", "aten::constant_pad_nd",
                 "aten::repeat_interleave", "aten::index", "aten::empty_like", "aten::fill_", "aten::zero_"),
    "attention": ("aten::scaled_dot_product_attention", "aten::_scaled_dot_product_flash_attention_for_cpu",
                  "aten::bmm", "aten::_softmax", "aten::baddbmm"),
    "upsample": ("aten::_upsample_nearest_exact2d", "aten::upsample_nearest2d"),
}  # fmt: skip
KIND_OF = {op: kind for kind, ops in KINDS.items() for op in ops}


def profile_direction(model: IVVAE, direction: str, x: torch.Tensor, top: int) -> dict:
    """Run one direction under the profiler; seconds per kind and the costliest ops."""
    run = (lambda v: encode(model, v)) if direction == "encode" else (lambda z: decode(model, z))
    with torch.inference_mode():
        run(x[:, :, :1])  # warm-up: kernels and their plans
        start = time.perf_counter()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            run(x)
        wall = time.perf_counter() - start
    by_kind: dict[str, float] = defaultdict(float)
    by_op = []
    for event in prof.key_averages():
        seconds = event.self_cpu_time_total / 1e6
        by_kind[KIND_OF.get(event.key, "other")] += seconds
        by_op.append((seconds, event.key, event.count))
    by_kind["untraced"] = max(0.0, wall - sum(by_kind.values()))
    return {"wall": wall, "kinds": dict(by_kind), "ops": sorted(by_op, reverse=True)[:top]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_clip_arguments(parser, frames=9)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--top", type=int, default=0, help="also list the N costliest ops")
    parser.add_argument("--directions", default="encode,decode")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = our_model(args)
    video, latent = inputs(args)
    results = {d: profile_direction(model, d, video if d == "encode" else latent, args.top)
               for d in args.directions.split(",")}  # fmt: skip
    kinds = [*KINDS, "other", "untraced"]
    print(f"z{args.z_dim}_dim{args.dim}, {args.frames}x{args.size}x{args.size}, float32, {args.threads} threads\n")
    print("| kind | " + " | ".join(f"{d} s | {d} share" for d in results) + " |")
    print("|---|" + "---|---|" * len(results))
    for kind in kinds:
        seconds = [r["kinds"].get(kind, 0.0) for r in results.values()]
        cells = [f"{s:.2f} | {s / r['wall']:.1%}" for s, r in zip(seconds, results.values(), strict=True)]
        print(f"| {kind} | " + " | ".join(cells) + " |")
    print("| total (wall) | " + " | ".join(f"{r['wall']:.2f} | 100%" for r in results.values()) + " |")
    for direction, result in results.items():
        if result["ops"]:
            print(f"\n{direction}: costliest ops (self s, calls)")
            for seconds, key, count in result["ops"]:
                print(f"  {seconds:8.3f}  {count:6d}  {key}")


if __name__ == "__main__":
    main()
