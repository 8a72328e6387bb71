"""Peak memory of `ivvae reconstruct` against frame count and resolution, tiled and untiled, and the
agreement of tiled with untiled output.

    python benchmarks/bench_memory.py --weights tiny.safetensors --runs 17x256x256 257x256x256 \\
        5x3840x2160:3GB --agreement clip.mp4

Each run is `FRAMESxWIDTHxHEIGHT[:MAX_MEMORY]` on a synthetic lossless clip, in a fresh process
whose peak RSS is reported. Without --weights a random z16_dim8 checkpoint is made. --agreement
reconstructs real clips untiled and with each of --agreement-tiles (default overlap, a quarter; auto
is the tiling ivvae picks by itself here), and reports the PSNR between tiled and untiled output
(meaningful only with trained weights).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.media import make_clip

RUNNER = (
    "import json, resource, sys, time\n"
    "from ivvae_cli.cli import app\n"
    "start = time.perf_counter()\n"
    "app(sys.argv[1:], standalone_mode=False)\n"
    "print(json.dumps({'peak_rss': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,"
    " 'seconds': time.perf_counter() - start}))\n"
)


def ivvae(*args: str) -> dict:
    result = subprocess.run([sys.executable, "-c", RUNNER, *args], capture_output=True, text=True)
    if result.returncode:
        raise SystemExit(f"ivvae {' '.join(args)} failed:\n{result.stderr}")
    lines = result.stdout.strip().splitlines()
    return json.loads(lines[-1]) | {"report": json.loads("\n".join(lines[:-1]) or "{}")}


def random_checkpoint(folder: Path) -> Path:
    import torch
    from safetensors.torch import save_file

    from ivvae_cli.model import IVVAE

    torch.manual_seed(0)
    path = folder / "random_z16_dim8.safetensors"
    save_file(IVVAE(16, 8).state_dict(), str(path))
    return path


def psnr_between(a: Path, b: Path) -> float:
    from ivvae_cli.metrics import psnr
    from ivvae_cli.video import read_frames, unit_float

    pairs = zip(read_frames(a), read_frames(b), strict=True)
    values = [psnr(unit_float(x), unit_float(y)) for (x, _), (y, _) in pairs]
    return float(np.mean(np.concatenate(values)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", type=Path)
    parser.add_argument("--runs", nargs="*", default=["17x256x256", "65x256x256", "257x256x256"])
    parser.add_argument("--agreement", type=Path, nargs="*", default=[], help="real clips for tiled/untiled PSNR")
    parser.add_argument("--agreement-frames", type=int, default=17)
    parser.add_argument(
        "--agreement-tiles",
        nargs="*",
        default=["auto", "32", "64"],
        help="latent pixels, or auto: the tiling ivvae picks by default on this machine",
    )
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        weights = args.weights or random_checkpoint(folder)
        rows = []
        for run in args.runs:
            shape, _, budget = run.partition(":")
            frames, width, height = (int(v) for v in shape.split("x"))
            clip = folder / f"{shape}.mkv"
            make_clip(clip, frames, width, height, codec="ffv1", pix_fmt="bgr0")
            extra = ["--max-memory", budget] if budget else []
            out = ivvae("reconstruct", str(clip), str(folder / "out.mkv"), "--lossless", "-w", str(weights), "-q",
                        "--force", "--json", "-", *extra)  # fmt: skip
            rows.append({
                "frames": frames, "size": f"{width}x{height}", "max_memory": budget or "auto",
                "encode_tiling": out["report"]["encode_tiling"], "decode_tiling": out["report"]["decode_tiling"],
                "peak_rss_mib": round(out["peak_rss"] / 2**20), "seconds": round(out["seconds"], 1),
            })  # fmt: skip
            print(json.dumps(rows[-1]), flush=True)
        for clip in args.agreement:
            common = ["-w", str(weights), "-q", "--force", "--lossless", "--frames", str(args.agreement_frames)]
            ivvae("reconstruct", str(clip), str(folder / "untiled.mkv"), *common, "--max-memory", "20GB")
            for tile in args.agreement_tiles:
                forced = [] if tile == "auto" else ["--tile-size", tile]
                tiled = ivvae("reconstruct", str(clip), str(folder / "tiled.mkv"), *common, "--json", "-", *forced)
                print(json.dumps({
                    "clip": clip.name, "tiles": tile,
                    **{k: tiled["report"][k] for k in ("encode_tiling", "decode_tiling")},
                    "psnr_tiled_vs_untiled_db": round(psnr_between(folder / "untiled.mkv", folder / "tiled.mkv"), 2),
                }), flush=True)  # fmt: skip
        print("\n| frames | size | budget | encode tiling | decode tiling | peak RSS (MiB) | s |")
        print("|---|---|---|---|---|---|---|")
        for r in rows:
            tiles = [r[k].get("tiles", "untiled") for k in ("encode_tiling", "decode_tiling")]
            print(f"| {r['frames']} | {r['size']} | {r['max_memory']} | {tiles[0]} | {tiles[1]} | "
                  f"{r['peak_rss_mib']} | {r['seconds']} |")  # fmt: skip


if __name__ == "__main__":
    main()
