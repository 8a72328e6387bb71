"""Dataset encoding throughput: `ivvae dataset encode` against a shell loop of `ivvae encode` over
the same clips (bit-identical latents checked), 2 torchrun processes against 1, and the layouts and
batch sizes against each other.

    python benchmarks/bench_dataset.py                      # 40 clips of 33 frames, short side 256
    python benchmarks/bench_dataset.py --runs dataset,shards,dataset-b4,shards-b4 --frames 17 --short-side 128
    python benchmarks/bench_dataset.py --clips 4 --short-side 64 --weights tiny.safetensors   # a smoke run

The clips are the first 33 frames of the first ``--clips`` videos of ../shared/videos (sorted, those
long enough). Runs, each in fresh processes with the default (bundled) model unless ``--weights``:
- ``loop``: one `ivvae encode` process per clip (each loads the model), 2 threads;
- ``dataset``: one `ivvae dataset encode` process with ``--workers`` decoding beside the model;
- ``torchrun``: `torchrun --nproc-per-node 2`, one thread per process, the same decoding workers;
- ``shards``, ``dataset-b4``, ``shards-b4``: as ``dataset`` with ``--layout shards`` and/or
  ``--batch-size 4`` (their latents checked against ``dataset``'s: equal, or within 1e-5 batched).
Reported: seconds, clips/s, the share of wall time the model was busy (dataset runs; rank 0's for
torchrun), and the peak RSS of the largest process (DataLoader workers included as processes).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from ivvae_cli.dataset import LatentDataset
from ivvae_cli.latent_file import read_latent_file
from ivvae_cli.video import probe

SHARED_VIDEOS = Path(__file__).resolve().parents[2] / "shared" / "videos"
# Dataset runs: the layout and batch size each gives `ivvae dataset encode`.
DATASET_RUNS = {
    "dataset": ("files", 1),
    "shards": ("shards", 1),
    "dataset-b4": ("files", 4),
    "shards-b4": ("shards", 4),
}


# Runs a command and then says the largest peak RSS among it and every process it waited for.
WRAPPER = (
    "import resource, subprocess, sys\n"
    "code = subprocess.run(sys.argv[1:]).returncode\n"
    "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr)\n"
    "sys.exit(code)\n"
)


def timed(command: list[str], env: dict[str, str]) -> tuple[float, str, int]:
    """Seconds a command took, its stdout, and its peak RSS in MiB (its largest process); exits on failure."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", WRAPPER, *command], env=env, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"{' '.join(command[:6])}... failed:\n{done.stderr[-3000:]}")
    return time.perf_counter() - start, done.stdout, round(int(done.stderr.split()[-1]) / 1024)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clips", type=int, default=40)
    parser.add_argument("--frames", type=int, default=33)
    parser.add_argument("--short-side", type=int, default=256)
    parser.add_argument("--weights", help="checkpoint file or model name (default: as ivvae chooses)")
    parser.add_argument("--workers", type=int, default=1, help="decoding workers of the dataset runs")
    parser.add_argument("--runs", default="loop,dataset,torchrun")
    args = parser.parse_args()

    with (SHARED_VIDEOS / "MANIFEST.tsv").open() as f:
        files = sorted(SHARED_VIDEOS / row["file"] for row in csv.DictReader(f, delimiter="\t"))
    clips = [p for p in files if (probe(p).frames or 0) >= args.frames][: args.clips]
    weights = ["--weights", args.weights] if args.weights else []
    common = ["--frames", str(args.frames), "--short-side", str(args.short_side), "-q", *weights]
    ivvae = [sys.executable, "-m", "ivvae_cli"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        manifest = folder / "manifest.csv"
        manifest.write_text("path\n" + "".join(f"{p}\n" for p in clips))
        env = os.environ | {"OMP_NUM_THREADS": str(torch.get_num_threads())}
        runs = args.runs.split(",")
        if "loop" in runs:
            seconds, peak = 0.0, 0
            for i, clip in enumerate(clips):
                took, _, rss = timed([*ivvae, "encode", str(clip), str(folder / f"loop-{i}.latent"), *common], env)
                seconds, peak = seconds + took, max(peak, rss)
            rows.append({"run": "loop", "seconds": seconds, "peak_rss_mib": peak})
        dataset = ["dataset", "encode", str(manifest), *common, "--workers", str(args.workers), "--json", "-"]
        for run in (*DATASET_RUNS, "torchrun"):
            if run not in runs:
                continue
            out = folder / run
            if run in DATASET_RUNS:
                layout, batch = DATASET_RUNS[run]
                how = ["--layout", layout, "--batch-size", str(batch)]
                seconds, stdout, peak = timed([*ivvae, *dataset[:3], str(out), *dataset[3:], *how], env)
            else:
                launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
                seconds, stdout, peak = timed([*launch, "-m", "ivvae_cli", *dataset[:3], str(out), *dataset[3:]],
                                              env | {"OMP_NUM_THREADS": "1"})  # fmt: skip
            reports = [json.loads(part) for part in stdout.replace("}\n{", "}\x00{").split("\x00") if part.strip()]
            report = next(r for r in reports if r["rank"] == 0)
            rows.append({"run": run, "seconds": seconds, "model_busy": report["model_busy"], "peak_rss_mib": peak})
        if "loop" in runs and "dataset" in runs:
            index = [json.loads(line) for line in (folder / "dataset" / "index.jsonl").read_text().splitlines()]
            by_source = {row["source_path"]: folder / "dataset" / row["latent"] for row in index}
            same = all(
                torch.equal(read_latent_file(folder / f"loop-{i}.latent").latent, read_latent_file(path).latent)
                for i, path in enumerate(by_source[str(c)] for c in clips)
            )
            print(json.dumps({"latents_bit_identical_to_ivvae_encode": same}))
        if "dataset" in runs:
            for run in (r for r in DATASET_RUNS if r != "dataset" and r in runs):
                pairs = zip(LatentDataset(folder / "dataset"), LatentDataset(folder / run), strict=True)
                worst = max(float((a["latent"] - b["latent"]).abs().max()) for a, b in pairs)
                print(json.dumps({"run": run, "largest_difference_from_dataset": worst}))
    for row in rows:
        row["clips_per_s"] = round(len(clips) / row["seconds"], 3)
        row["seconds"] = round(row["seconds"], 1)
        print(json.dumps(row), flush=True)
    print(f"\n{len(clips)} clips of {args.frames} frames at short side {args.short_side}, "
          f"{torch.get_num_threads()} threads, {os.cpu_count()} CPUs\n")  # fmt: skip
    print("| run | s | clips/s | model busy | peak RSS (MiB) |\n|---|---|---|---|---|")
    for r in rows:
        busy = f"{r['model_busy']:.0%}" if "model_busy" in r else "-"
        print(f"| {r['run']} | {r['seconds']} | {r['clips_per_s']} | {busy} | {r['peak_rss_mib']} |")


if __name__ == "__main__":
    main()
