"""What the dataset pipeline itself costs, apart from the model, in both layouts.

    python benchmarks/bench_store.py                                    # the README's figures
    python benchmarks/bench_store.py --pipeline-clips 40 --store-clips 2000   # a smoke run

- pipeline: ``--pipeline-clips`` short clips made here (9 frames of 32x32 noise, H.264) through
  ``encode_dataset`` with a z16 dim-8 random model, whose step costs almost nothing, and 2 decoding
  workers; per layout, at batch 1 and 4: clips/s of the process, and the milliseconds per clip the
  main process spends outside the model (wall time less the model's, over the clips).
- store: ``--store-clips`` synthetic clips (each the same small latent file, 16x3x4x4 for 9 frames
  of 32x32, made by one real encode) kept through each layout's store as a job keeps them; then the files created, the
  seconds to merge the index, the seconds ``encode_dataset`` takes to find every clip done (what a
  resume does: records read, nothing decoded, the index merged again), ``LatentDataset`` random
  reads per second (2000 items, one process) and, for shards, the ``webdataset`` package's streaming
  reads per second; and how even the work units leave the processes (the largest share against the
  mean, for 8, 64 and 512 processes).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time
from collections import Counter
from pathlib import Path

import av
import numpy as np
import torch

from ivvae_cli.dataset import (
    ClipOptions,
    Columns,
    JobSpec,
    LatentDataset,
    Source,
    SourceRecord,
    Storage,
    encode_dataset,
    merge_index,
    open_store,
    prepare_folder,
    read_sources,
    work_unit,
)
from ivvae_cli.dataset.keeping import index_row
from ivvae_cli.latent_file import LatentFile, read_latent_file
from ivvae_cli.model import IVVAE
from ivvae_cli.weights import LoadedModel, fingerprint

LAYOUTS = ("files", "shards")
FRAMES = 9


def tiny_model() -> LoadedModel:
    torch.manual_seed(0)
    model = IVVAE(16, 8, 1.0, 0.0).eval().requires_grad_(False)
    return LoadedModel(model, "z16_dim8-random", fingerprint(model.state_dict()), Path("random"))


def make_clips(folder: Path, count: int) -> None:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        with av.open(str(folder / f"c{i:06d}.mp4"), "w") as container:
            stream = container.add_stream("libx264", rate=25)
            stream.width = stream.height = 32
            stream.pix_fmt = "yuv420p"
            for _ in range(FRAMES):
                frame = av.VideoFrame.from_ndarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8), format="rgb24")
                container.mux(stream.encode(frame))
            container.mux(stream.encode())


def job(folder: Path, loaded: LoadedModel, layout: str) -> JobSpec:
    options = ClipOptions(frames=FRAMES)
    return JobSpec(str(folder), Columns(), options, loaded.name, loaded.fingerprint, Storage(layout))


def pipeline(tmp: Path, loaded: LoadedModel, count: int) -> list[dict]:
    clips = tmp / "clips"
    make_clips(clips, count)
    sources = read_sources(clips)
    rows = []
    for layout in LAYOUTS:
        for batch in (1, 4):
            out = tmp / f"pipeline-{layout}-{batch}"
            spec = job(clips, loaded, layout)
            prepare_folder(out, spec, overwrite=False)
            tally, _ = encode_dataset(sources, out, loaded, spec, workers=2, batch_size=batch)
            assert tally.written == count and tally.failed == 0, tally
            outside = (tally.seconds - tally.model_seconds) / tally.written
            rows.append({"part": "pipeline", "layout": layout, "batch_size": batch, "clips": tally.written,
                         "clips_per_s": round(tally.clips_per_s, 1), "model_busy": round(tally.model_busy, 3),
                         "ms_outside_model_per_clip": round(1e3 * outside, 2)})  # fmt: skip
            print(json.dumps(rows[-1]), flush=True)
    return rows


def template(tmp: Path, loaded: LoadedModel) -> LatentFile:
    """One real clip's latent file, whose header every synthetic clip shares."""
    make_clips(tmp / "one", 1)
    spec = job(tmp / "one", loaded, "files")
    prepare_folder(tmp / "one-out", spec, overwrite=False)
    encode_dataset(read_sources(tmp / "one"), tmp / "one-out", loaded, spec, workers=0)
    return read_latent_file(next((tmp / "one-out" / "latents").rglob("*.latent")))


def store(tmp: Path, loaded: LoadedModel, count: int) -> list[dict]:
    data = template(tmp, loaded)
    sources = [Source(tmp / f"v/{i:07d}.mp4", f"{i:07d}.mp4") for i in range(count)]
    rows = []
    for layout in LAYOUTS:
        out = tmp / f"store-{layout}"
        spec = job(tmp / "v", loaded, layout)
        prepare_folder(out, spec, overwrite=False)
        started = time.perf_counter()
        with open_store(out, spec) as kept:
            for source in sources:
                row = index_row(source, "f0000000-0000009", data.header, {})
                where = kept.put(source, "f0000000-0000009", data, row)
                kept.finish(source, SourceRecord([index_row(source, "f0000000-0000009", data.header, where)]))
        written = time.perf_counter() - started
        files = sum(len(names) for _, _, names in os.walk(out))
        started = time.perf_counter()
        counts = merge_index(out, sources)
        merged = time.perf_counter() - started
        assert counts["clips"] == count, counts
        started = time.perf_counter()
        tally, _ = encode_dataset(sources, out, loaded, spec, workers=0)
        resumed = time.perf_counter() - started
        assert tally.done == count and tally.written == 0
        dataset = LatentDataset(out)
        picks = random.Random(0).sample(range(count), min(2000, count))
        started = time.perf_counter()
        for i in picks:
            dataset[i]
        random_reads = len(picks) / (time.perf_counter() - started)
        row = {"part": "store", "layout": layout, "clips": count, "files": files, "seconds_to_write": round(written, 1),
               "seconds_to_merge": round(merged, 2), "seconds_to_resume_all_done": round(resumed, 2),
               "random_reads_per_s": round(random_reads)}  # fmt: skip
        if layout == "shards":
            import webdataset as wds

            started = time.perf_counter()
            shards = sorted(str(p) for p in (out / "shards").glob("*.tar"))
            streamed = sum(1 for _ in wds.WebDataset(shards, shardshuffle=False))
            assert streamed == count
            row["webdataset_reads_per_s"] = round(streamed / (time.perf_counter() - started))
        rows.append(row)
        print(json.dumps(row), flush=True)
    balance = {}
    for world in (8, 64, 512):
        shares = Counter(work_unit(s, 4096) % world for s in sources)
        balance[world] = round(max(shares.values()) / (count / world), 3)
    rows.append({"part": "balance", "clips": count, "largest_share_over_mean": balance})
    print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pipeline-clips", type=int, default=400)
    parser.add_argument("--store-clips", type=int, default=100_000)
    parser.add_argument("--parts", default="pipeline,store")
    args = parser.parse_args()
    loaded = tiny_model()
    with tempfile.TemporaryDirectory() as tmp:
        if "pipeline" in args.parts:
            pipeline(Path(tmp), loaded, args.pipeline_clips)
        if "store" in args.parts:
            store(Path(tmp), loaded, args.store_clips)
    print(f"{torch.get_num_threads()} threads, {os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()
