"""Reconstruction quality on a manifest split, as published video VAE benchmarks measure it: the
first 33 frames of each clip, resized so the short side is 256, PSNR and SSIM per clip.

    python benchmarks/eval_quality.py                       # the default model, eval split
    python benchmarks/eval_quality.py --weights run/model.safetensors --split eval --frames 33
    python benchmarks/eval_quality.py other.mp4 more.mpg --short-side 0   # any clips, native size

Prints one row per clip and the mean, and encode/decode frames/s of the whole pass (CPU unless
--device says otherwise).
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path

import torch

from ivvae_cli.pipeline import EncodeOptions, reconstruct_video, select_device
from ivvae_cli.weights import find_weights, load_model

SHARED_VIDEOS = Path(__file__).resolve().parents[2] / "shared" / "videos"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("clips", nargs="*", type=Path, help="clips to measure instead of a manifest split")
    parser.add_argument("--weights", help="checkpoint file or model name (default: as ivvae chooses)")
    parser.add_argument("--manifest", type=Path, default=SHARED_VIDEOS / "MANIFEST.tsv")
    parser.add_argument("--split", default="eval")
    parser.add_argument("--frames", type=int, default=33)
    parser.add_argument("--short-side", type=int, default=256, help="0: native size")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    loaded = load_model(find_weights(args.weights), device=select_device(args.device))
    clips = args.clips
    if not clips:
        with args.manifest.open() as f:
            reader = csv.DictReader(f, delimiter="\t")
            clips = [args.manifest.parent / row["file"] for row in reader if row["split"] == args.split]
    options = EncodeOptions(max_frames=args.frames, short_side=args.short_side or None)
    rows = []
    for clip in clips:
        start = time.perf_counter()
        with torch.inference_mode():
            result = reconstruct_video(clip, loaded, options)
        summary = result.metrics.summary()
        rows.append({
            "clip": str(clip.relative_to(args.manifest.parent) if clip.is_relative_to(args.manifest.parent) else clip),
            "size": f"{result.header.source_width}x{result.header.source_height}",
            "frames": summary["frames"],
            "psnr_db": round(summary["psnr_db"], 2),
            "ssim": round(summary["ssim"], 4),
            "seconds": round(time.perf_counter() - start, 1),
        })  # fmt: skip
        print(json.dumps(rows[-1]), flush=True)
    frames = sum(r["frames"] for r in rows)
    report = {
        "model": loaded.name,
        "weights": str(loaded.path),
        "fingerprint": loaded.fingerprint,
        "protocol": f"first {args.frames} frames, short side {args.short_side or 'native'}"
        + ("" if args.clips else f", split {args.split}"),
        "clips": rows,
        "mean_psnr_db": round(sum(r["psnr_db"] for r in rows) / len(rows), 2),
        "mean_ssim": round(sum(r["ssim"] for r in rows) / len(rows), 4),
        "reconstruct_frames_per_s": round(frames / sum(r["seconds"] for r in rows), 2),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
