"""One time-boxed `ivvae train` run on the GPU machine, which has no PyAV: frames are decoded by
OpenCV's FFmpeg from the shrunk RGB H.264 train split (prep_data.py) instead. Everything else is
the library's Trainer. Usage: gpu_train.py DATA_DIR OUT_DIR DEADLINE_S BATCH LR LR_FINAL, run from
the repository root; from the environment: INIT (default: the bundled model), STEPS (default: as
many as a probe says fit before DEADLINE_S), and CROP, MSE_WEIGHT, PSNR_WEIGHT, BF16, SEED, whose
defaults are the settings of runs A and B."""

import json
import os
import sys
import tempfile
import time
import types
from dataclasses import asdict, replace
from pathlib import Path

START = time.time()
sys.modules["av"] = types.ModuleType("av")  # only video.py imports it; the decoder below replaces it

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

import ivvae_cli.train as train  # noqa: E402
from ivvae_cli.weights import convert_checkpoint  # noqa: E402

data, out, deadline = Path(sys.argv[1]), Path(sys.argv[2]), float(sys.argv[3])
batch, lr, lr_final = int(sys.argv[4]), float(sys.argv[5]), float(sys.argv[6])
_cache: dict[str, np.ndarray] = {}


def _decoded(path) -> np.ndarray:
    if path not in _cache:
        cap, frames = cv2.VideoCapture(path), []
        while True:
            ok, frame = cap.read()
            if not ok:
                break
            frames.append(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB))
        _cache[path] = np.stack(frames)
    return _cache[path]


def probe(path):
    _, height, width, _ = _decoded(path).shape
    return types.SimpleNamespace(width=width, height=height)


def read_frames(path, *, max_frames=None, chunk=8, size=None, **_):
    frames = _decoded(path)[:max_frames]
    if size is not None and size != (frames.shape[2], frames.shape[1]):
        shape = f"{frames.shape[2]}x{frames.shape[1]}"
        raise ValueError(f"{path} holds {shape} frames, training asks for {size}: rerun prep_data.py")
    for i in range(0, len(frames), chunk):
        yield frames[i : i + chunk], None


train.probe, train.read_frames = probe, read_frames  # FrameBank's only uses of PyAV
torch.backends.cudnn.benchmark = True
torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
device = torch.device(os.environ.get("DEVICE", "cuda"))
print(torch.__version__, device, flush=True)
videos = sorted(str(p) for p in data.glob("*.mp4"))
config = train.TrainConfig(
    videos=videos,
    z_dim=16,
    dim=16,
    init=os.environ.get("INIT", "ivvae_cli/bundled/ivvae_z16_dim16.safetensors"),
    clip_frames=9,
    crop=int(os.environ.get("CROP", 256)),
    batch=batch,
    lr=lr,
    lr_final=lr_final,
    mse_weight=float(os.environ.get("MSE_WEIGHT", 10)),
    psnr_weight=float(os.environ.get("PSNR_WEIGHT", 0)),
    bf16=os.environ.get("BF16", "1") == "1",
    seed=int(os.environ.get("SEED", 11)),
    steps=24,
    checkpoint_every=10**9,
)
t0 = time.time()
probe = train.Trainer(config, Path(tempfile.mkdtemp()), device)  # fresh folders: a Trainer resumes
print(
    f"bank {len(probe.bank.videos)} videos, {sum(len(v) for v in probe.bank.videos)} frames, "
    f"load {time.time() - t0:.1f}s",
    flush=True,
)
times = []
probe.run(lambda s, r: times.append(time.time()))
if device.type == "cuda":
    torch.cuda.synchronize()
step_s = (times[-1] - times[11]) / (len(times) - 12)  # after cuDNN's autotuning
mem = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else 0.0
del probe
if device.type == "cuda":
    torch.cuda.empty_cache()
budget = deadline - (time.time() - START) - 45
steps = int(os.environ.get("STEPS", 0)) or max(1, int(budget / step_s))
print(f"probe: {step_s:.3f} s/step, {mem:.1f} GiB peak; training {steps} steps in {budget:.0f} s", flush=True)
config = replace(config, steps=steps, checkpoint_every=max(1, steps // 4))
run = Path(tempfile.mkdtemp())
trainer = train.Trainer(config, run, device)
t0 = time.time()


def progress(step, record):
    if step % 50 == 0 or step == steps:
        print(json.dumps({**record, "elapsed_s": round(time.time() - t0, 1)}), flush=True)
    if step % config.checkpoint_every == 0 or step == steps:
        convert_checkpoint(run / "model.safetensors", out / "model-fp16.safetensors", torch.float16, force=True)


trainer.run(progress)
(out / "log.jsonl").write_bytes((run / "log.jsonl").read_bytes())
(out / "config.json").write_text(json.dumps(asdict(config), indent=2) + "\n")
print(f"done: {steps} steps in {time.time() - t0:.0f} s, total {time.time() - START:.0f} s", flush=True)
