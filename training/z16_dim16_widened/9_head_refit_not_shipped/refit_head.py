"""Refit the decoder's last convolution in closed form, by least squares on the train split.

The decoder ends in a KTC convolution: each group's keyframe comes from its 2D half, the other
frames from its GCConv half. Given the features that enter it, its output is linear in its
weights, so the squared error is a quadratic in them and the best weights solve a linear system.
Training used L1, SSIM and a PSNR term on 9-frame 128x128 crops; this fits the layer to squared
error (what PSNR counts) on whole frames at the size it is measured: the first FRAMES frames of
every train-split clip, short side 256 (bicubic), posterior-mean latents. Every frame weighs the
same (its normal equations are divided by its pixel count), each is sampled on a random PIXELS
fraction of its pixels, and a ridge of RIDGE times the mean diagonal pulls toward the trained
weights. Nothing else in the model changes. From the repository root:

    PYTHONPATH=. python training/z16_dim16_widened/9_head_refit_not_shipped/refit_head.py INIT OUT \
        [--frames 17] [--pixels 0.25] [--ridge 1e-3]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from ivvae_cli.layers import KTCConv3d
from ivvae_cli.outputs import atomic_output
from ivvae_cli.train import FrameBank, manifest_videos, reconstruct_clip
from ivvae_cli.weights import load_model, read_checkpoint

MANIFEST = Path(__file__).resolve().parents[4] / "shared" / "videos" / "MANIFEST.tsv"


def head_parameters(head: KTCConv3d) -> tuple[torch.Tensor, torch.Tensor]:
    """The 2D and GCConv halves as ``(features, 3)`` matrices, bias last, in the order of
    ``frame_features``: (channel, row, column), and for the GCConv previous, current, next frame."""
    w3 = head.conv_3d.weight.permute(0, 2, 1, 3, 4).flatten(1)
    key = torch.cat([head.conv_2d.weight.flatten(1), head.conv_2d.bias[:, None]], 1)
    rest = torch.cat([w3, head.conv_3d.bias[:, None]], 1)
    return key.T.double(), rest.T.double()


def set_head_parameters(head: KTCConv3d, key: torch.Tensor, rest: torch.Tensor) -> None:
    """The inverse of ``head_parameters``."""
    out, channels = head.conv_2d.out_channels, head.conv_2d.in_channels
    head.conv_2d.weight.copy_(key[:-1].T.reshape(out, channels, 3, 3))
    head.conv_2d.bias.copy_(key[-1])
    head.conv_3d.weight.copy_(rest[:-1].T.reshape(out, 3, channels, 3, 3).permute(0, 2, 1, 3, 4))
    head.conv_3d.bias.copy_(rest[-1])


def frame_features(features: torch.Tensor, t: int, pixels: torch.Tensor) -> tuple[bool, torch.Tensor]:
    """Whether frame ``t`` is a keyframe, and the head's inputs for it at ``pixels``: ``(pixels, features)``."""
    keyframe = t == 0 or (t - 1) % 4 == 0

    def patches(i: int) -> torch.Tensor:
        return F.unfold(features[i : i + 1], 3, padding=1)[0][:, pixels]

    current = patches(t)
    if keyframe:
        columns = [current]
    else:  # inside a group: the frame before is in it, the frame after only if t is not its last
        following = patches(t + 1) if (t - 1) % 4 != 3 else torch.zeros_like(current)
        columns = [patches(t - 1), current, following]
    return keyframe, torch.cat([*columns, torch.ones(1, len(pixels))]).T


def error_term(theta: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> float:
    """The summed per-frame MSE under ``theta`` on the [-1, 1] scale, less its constant term."""
    return ((theta * (a @ theta)).sum() - 2 * (theta * b).sum()).item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("init", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--manifest", type=Path, default=MANIFEST)
    parser.add_argument("--frames", type=int, default=17)
    parser.add_argument("--pixels", type=float, default=0.25)
    parser.add_argument("--ridge", type=float, default=1e-3)
    args = parser.parse_args()

    model = load_model(args.init).model
    head = model.decoder.head[2]
    captured: list[torch.Tensor] = []
    head.register_forward_pre_hook(lambda _, inputs: captured.append(inputs[0]))
    generator = torch.Generator().manual_seed(0)
    sums = {True: [0.0, 0.0, 0.0], False: [0.0, 0.0, 0.0]}  # A, B, frames for keyframes and others
    for path in manifest_videos(args.manifest, "train"):
        start = time.time()
        video = FrameBank([path], short_side=256, max_frames=args.frames, min_frames=1).videos[0]
        t = 1 + 4 * ((len(video) - 1) // 4)
        h, w = video.shape[1] // 8 * 8, video.shape[2] // 8 * 8
        clip = video[None, :t, :h, :w].permute(0, 1, 4, 2, 3).float() / 127.5 - 1
        captured.clear()
        with torch.no_grad():
            reconstruct_clip(model, clip, None)
            features = torch.cat(captured, 1)[0]
            for i in range(t):
                pixels = torch.randperm(h * w, generator=generator)[: max(1, int(h * w * args.pixels))]
                keyframe, x = frame_features(features, i, pixels)
                y = clip[0, i].flatten(1)[:, pixels].T
                n = 3 * len(pixels)
                sums[keyframe][0] += (x.T @ x).double() / n
                sums[keyframe][1] += (x.T @ y).double() / n
                sums[keyframe][2] += 1
        print(json.dumps({"clip": Path(path).name, "frames": t, "size": [w, h], "s": round(time.time() - start)}))

    solved = []
    for keyframe, trained in zip((True, False), head_parameters(head), strict=True):
        a, b, count = sums[keyframe]
        ridge = args.ridge * a.diagonal().mean()
        weights = torch.linalg.solve(a + ridge * torch.eye(len(a), dtype=a.dtype), b + ridge * trained)
        change = (error_term(weights, a, b) - error_term(trained, a, b)) / count
        print(json.dumps({"keyframes" if keyframe else "other_frames": int(count), "mean_mse_change": change}))
        solved.append(weights)
    with torch.no_grad():
        set_head_parameters(head, *solved)
    metadata = read_checkpoint(args.init)[1]
    settings = {"init": args.init.name, "frames": args.frames, "pixels": args.pixels, "ridge": args.ridge}
    metadata["head_refit"] = json.dumps(settings)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(args.out, force=True) as tmp:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp), metadata)


if __name__ == "__main__":
    main()
