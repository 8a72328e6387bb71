"""Shrink the train split for the GPU machine: first 240 frames, short side 256 (as FrameBank does),
RGB H.264 (libx264rgb: no YUV matrix, no chroma subsampling) at a given CRF."""
import sys
from pathlib import Path

import av
import torch

from ivvae_cli.train import _resize, manifest_videos
from ivvae_cli.video import read_frames, unit_float

manifest, out, crf = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
out.mkdir(parents=True, exist_ok=True)
for i, path in enumerate(manifest_videos(manifest, "train")):
    chunks = read_frames(path, max_frames=240, chunk=16)
    frames = torch.cat([_resize(torch.from_numpy(unit_float(f)), 256) for f, _ in chunks])
    t, h, w, _ = frames.shape
    dst = out / f"{i:02d}.mp4"
    with av.open(str(dst), "w") as c:
        s = c.add_stream("libx264rgb", rate=25)
        s.width, s.height, s.pix_fmt, s.options = w, h, "rgb24", {"crf": crf, "preset": "slow"}
        for f in frames.numpy():
            c.mux(s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
        c.mux(s.encode())
    print(dst.name, t, h, w, dst.stat().st_size, Path(path).name, flush=True)
