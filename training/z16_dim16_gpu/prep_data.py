"""Shrink the train split for the GPU machine: the frames FrameBank holds (first 240 frames, short
side 256), as RGB H.264 (libx264rgb: no YUV matrix, no chroma subsampling) at a given CRF."""

import sys
from pathlib import Path

import av

from ivvae_cli.train import FrameBank, TrainConfig, manifest_videos

manifest, out, crf = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
out.mkdir(parents=True, exist_ok=True)
paths = manifest_videos(manifest, "train")
bank = FrameBank(paths, TrainConfig.short_side, TrainConfig.max_video_frames, min_frames=1)
for i, (path, frames) in enumerate(zip(paths, bank.videos, strict=True)):
    t, h, w, _ = frames.shape
    dst = out / f"{i:02d}.mp4"
    with av.open(str(dst), "w") as c:
        s = c.add_stream("libx264rgb", rate=25)
        s.width, s.height, s.pix_fmt, s.options = w, h, "rgb24", {"crf": crf, "preset": "slow"}
        for f in frames.numpy():
            c.mux(s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
        c.mux(s.encode())
    print(dst.name, t, h, w, dst.stat().st_size, Path(path).name, flush=True)
