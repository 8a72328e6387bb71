"""Training and fine-tuning IV-VAE on one's own footage.

Videos are decoded once, resized so their short side is ``short_side`` exactly as ``ivvae
reconstruct --short-side`` resizes them (libswscale bicubic: a softer resize would train the model
on blurrier frames than it is measured on), and held as uint8; each
step draws random clips of ``clip_frames`` (1 + 4k) frames and random square crops from them, as a
deterministic function of (seed, step), so a resumed run continues exactly where it stopped.
The loss is L1 + ``mse_weight`` * MSE - ``psnr_weight`` * PSNR + ``ssim_weight`` * (1 - SSIM) +
``kl_weight`` * KL, with AdamW. The MSE term weighs large errors more than L1 does; the PSNR term
(mean over frames, as benchmarks average it) weighs each frame's squared error by the inverse of
its mean, so a 10% gain counts alike on a clean frame and on a hard one; the learning rate
is constant or decays along a cosine to ``lr_final``, also a function of the step alone.

``decoder_only`` freezes the encoder of the init checkpoint and keeps its latent scale and shift, so
latents made with it stay valid for the fine-tuned decoder.

Phases (the KTC recipe: the 2D half is an image model first): ``image`` trains on single frames,
which run only the first-step path of the model, cheaply; ``video`` trains on clips.

``frame_cache`` keeps the decoded frames in a folder (``frame_cache()``), so that later runs, and a
machine without PyAV, train without decoding: this module imports the video module only to decode.
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from ivvae_cli.errors import InputError, IvvaeError, OutputError
from ivvae_cli.metrics import ssim_torch
from ivvae_cli.model import IVVAE, SPATIAL_STRIDE, TEMPORAL_STRIDE, Posterior
from ivvae_cli.stream import decode_clip, encode_clip
from ivvae_cli.weights import architecture, check_fit, latent_factors, read_checkpoint


@dataclass
class TrainConfig:
    """Everything that defines a run; saved with its checkpoints."""

    videos: list[str]
    eval_videos: list[str] = field(default_factory=list)
    z_dim: int = 16
    dim: int = 8
    init: str | None = None  # a checkpoint to start from
    phase: str = "video"  # "image" or "video"
    steps: int = 1000
    clip_frames: int = 9
    crop: int = 128
    batch: int = 4
    short_side: int = 256
    max_video_frames: int = 240
    lr: float = 3e-4
    lr_final: float | None = None  # cosine decay from lr to this over the run; None: constant
    weight_decay: float = 0.01
    mse_weight: float = 0.0
    psnr_weight: float = 0.0
    ssim_weight: float = 0.2
    kl_weight: float = 1e-6
    bf16: bool = True  # bf16 autocast on CUDA (CPU always trains in float32)
    decoder_only: bool = False  # the encoder stays the init's, so latents made with it stay valid
    seed: int = 0
    eval_every: int = 250
    checkpoint_every: int = 250
    frame_cache: str | None = None  # a folder of the decoded frames (frame_cache()); the same run without it

    def __post_init__(self) -> None:
        if self.phase not in ("image", "video"):
            raise IvvaeError(f"the phase is image or video, not '{self.phase}'")
        if (self.clip_frames - 1) % TEMPORAL_STRIDE or self.crop % SPATIAL_STRIDE:
            raise IvvaeError(
                f"clips take 1 + {TEMPORAL_STRIDE}k frames and crops a multiple of {SPATIAL_STRIDE} pixels, "
                f"got {self.clip_frames} frames and {self.crop}"
            )


def learning_rate(config: TrainConfig, step: int) -> float:
    """The rate of optimizer step ``step`` (0-based)."""
    if config.lr_final is None:
        return config.lr
    return config.lr_final + (config.lr - config.lr_final) * 0.5 * (1 + math.cos(math.pi * step / config.steps))


def saved_config(folder: Path) -> TrainConfig | None:
    """The configuration of the run in ``folder``, if there is one."""
    path = folder / "config.json"
    return TrainConfig(**json.loads(path.read_text())) if path.exists() else None


def run_config(
    folder: Path, new: TrainConfig | None, steps: int | None = None, frame_cache: str | None = None
) -> TrainConfig:
    """What runs in ``folder``: ``new``, refused over a run already there; or with ``new`` None, the
    saved run resumed, its total ``steps`` grown and its ``frame_cache`` moved if given."""
    existing = saved_config(folder)
    if new is not None:
        if existing is not None:
            raise OutputError(f"{folder} holds a run already: --resume continues it, or choose another --out")
        return new
    if existing is None:
        raise InputError(f"nothing to resume in {folder}")
    existing.steps = steps or existing.steps
    existing.frame_cache = frame_cache or existing.frame_cache
    return existing


def manifest_videos(manifest: Path, split: str) -> list[str]:
    """The files of one split of a MANIFEST.tsv (columns ``split`` and ``file``)."""
    with manifest.open() as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    return [str(manifest.parent / r["file"]) for r in rows if r["split"] == split]


def decode_videos(paths: list[str], short_side: int, max_frames: int) -> list[np.ndarray]:
    """Each video's first ``max_frames`` frames, resized to ``short_side`` (0: as they are) as
    ``reconstruct --short-side`` resizes them: uint8 ``(T, H, W, 3)``."""
    from ivvae_cli.video import probe, read_frames, resized, unit_float  # PyAV, here only

    videos = []
    for path in paths:
        info = probe(path)
        size = resized(info.width, info.height, short_side)
        chunks = read_frames(path, max_frames=max_frames, chunk=16, size=size, info=info)
        videos.append(np.concatenate([np.rint(unit_float(f) * 255).astype(np.uint8) for f, _ in chunks]))
    return videos


FRAME_CACHE_FORMAT, FRAME_CACHE_VERSION = "ivvae-frame-cache", 1


def frame_cache(folder: Path, paths: list[str], short_side: int, max_frames: int) -> list[np.ndarray]:
    """``decode_videos(paths, short_side, max_frames)``, kept in ``folder``: ``index.json`` (format
    version, settings, each source's path, bytes and frame count) and one ``.npy`` of frames per
    video. Written whole or not at all the first time; read back memory-mapped, the first time as
    every later one, without decoding. A cache of other settings or videos, or of a source that has
    changed size since, is refused; a source absent here counts as cached (a cache may travel alone)."""
    wanted = {
        "format": FRAME_CACHE_FORMAT,
        "format_version": FRAME_CACHE_VERSION,
        "short_side": short_side,
        "max_video_frames": max_frames,
    }
    if not (folder / "index.json").is_file():
        if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
            raise OutputError(f"--frame-cache {folder} exists and is not a frame cache (no index.json)")
        _write_frame_cache(folder, paths, wanted)
    try:
        index = json.loads((folder / "index.json").read_text())
        recorded, sources = {key: index.get(key) for key in wanted}, index["sources"]
    except (ValueError, KeyError, TypeError) as e:
        raise InputError(f"{folder / 'index.json'} is not a frame cache index ({e})") from None
    if recorded != wanted:
        differ = ", ".join(
            f"{key} {recorded[key]} (this run: {wanted[key]})" for key in wanted if recorded[key] != wanted[key]
        )
        raise InputError(f"frame cache {folder} was made with {differ}; use another --frame-cache")
    cached = [source["path"] for source in sources]
    if cached != paths:
        missing = [path for path in paths if path not in cached]
        what = f"{missing[0]} is not in it" if missing else "it holds others too, or in another order"
        raise InputError(f"frame cache {folder} was made for other videos ({what}); use another --frame-cache")
    for source in sources:
        path = Path(source["path"])
        size = path.stat().st_size if path.is_file() else source["bytes"]
        if size != source["bytes"]:
            raise InputError(f"{path} has changed since {folder} cached it ({source['bytes']} bytes then, {size} now)")
    return [np.load(folder / source["file"], mmap_mode="r") for source in sources]


def _write_frame_cache(folder: Path, paths: list[str], settings: dict) -> None:
    """Decode one video at a time into a hidden folder beside ``folder``, renamed to it when complete."""
    partial = folder.with_name(f".{folder.name}.partial-{os.getpid()}")
    index = {**settings, "sources": []}
    try:
        partial.mkdir(parents=True)
        for i, path in enumerate(paths):
            (frames,) = decode_videos([path], index["short_side"], index["max_video_frames"])
            np.save(partial / f"{i:04d}.npy", frames)
            index["sources"].append(
                {"path": path, "bytes": Path(path).stat().st_size, "frames": len(frames), "file": f"{i:04d}.npy"}
            )
        (partial / "index.json").write_text(json.dumps(index, indent=2) + "\n")
        if folder.exists():
            folder.rmdir()  # empty: checked
        partial.replace(folder)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise


class FrameBank:
    """Training videos held as uint8 at training resolution, and random clips of them."""

    def __init__(self, videos: list[np.ndarray], min_frames: int):
        self.videos = [torch.from_numpy(v) for v in videos if len(v) >= min_frames]
        if not self.videos:
            raise InputError(f"no training video has {min_frames} frames or more")

    def sample(self, rng: np.random.Generator, batch: int, frames: int, crop: int) -> torch.Tensor:
        """A batch ``(B, T, 3, crop, crop)`` in [-1, 1]."""
        clips = []
        for _ in range(batch):
            video = self.videos[rng.integers(len(self.videos))]
            t, h, w, _ = video.shape
            start, top, left = (int(rng.integers(n + 1)) for n in (t - frames, max(0, h - crop), max(0, w - crop)))
            clip = video[start : start + frames, top : top + crop, left : left + crop]
            if rng.random() < 0.5:
                clip = clip.flip(2)
            clips.append(clip)
        return torch.stack(clips).permute(0, 1, 4, 2, 3).float() / 127.5 - 1


def reconstruct_clip(
    model: IVVAE, clip: torch.Tensor, generator: torch.Generator | None
) -> tuple[torch.Tensor, Posterior]:
    """Encode and decode a clip ``(B, T, 3, H, W)`` with gradients; returns the frames and the
    posterior. With ``generator`` the latent is a posterior sample, else the mean."""
    posterior = encode_clip(model, clip)
    z = posterior.mode() if generator is None else posterior.sample(generator)
    return decode_clip(model, model.scale_latent(z)), posterior


def _unit_frames(clip: torch.Tensor) -> torch.Tensor:
    """``(B, T, 3, H, W)`` in [-1, 1] -> ``(B*T, 3, H, W)`` in [0, 1]."""
    return (clip.flatten(0, 1).float() + 1) / 2


PSNR_FLOOR_MSE = 1e-5  # caps the PSNR term near 50 dB, so flat crops do not take all the weight


def loss_terms(model: IVVAE, clip: torch.Tensor, config: TrainConfig, generator: torch.Generator) -> dict:
    recon, posterior = reconstruct_clip(model, clip, generator)
    error = recon - clip
    frame_mse = error.float().pow(2).flatten(2).mean(dim=2)  # (B, T): frames are of one size
    l1, mse = error.abs().mean(), frame_mse.mean()
    psnr = (-10 * torch.log10(frame_mse / 4 + PSNR_FLOOR_MSE)).mean()  # /4: the [0, 1] scale
    ssim = ssim_torch(_unit_frames(recon).clamp(0, 1), _unit_frames(clip)).mean()
    kl = posterior.kl()
    total = l1 + config.mse_weight * mse - config.psnr_weight * psnr + config.ssim_weight * (1 - ssim)
    total = total + config.kl_weight * kl
    return {"loss": total, "l1": l1, "mse": mse, "psnr": psnr, "ssim": ssim, "kl": kl}


def evaluate(model: IVVAE, clips: list[torch.Tensor]) -> dict[str, float]:
    """Mean PSNR and SSIM of posterior-mean reconstructions, frames rounded to 8 bits."""
    psnrs, ssims = [], []
    with torch.no_grad():
        for clip in clips:
            recon, _ = reconstruct_clip(model, clip, None)
            a = ((clip + 1) * 127.5).round() / 255
            b = ((recon.clamp(-1, 1) + 1) * 127.5).round() / 255
            mse = (a - b).pow(2).flatten(2).mean(dim=2)
            psnrs.append((10 * torch.log10(1 / mse.clamp_min(1e-10))).mean().item())
            ssims.append(ssim_torch(a.flatten(0, 1), b.flatten(0, 1)).mean().item())
    return {"psnr_db": float(np.mean(psnrs)), "ssim": float(np.mean(ssims))}


def _channel_blocks(name: str) -> tuple[int, int]:
    """How many equal blocks the output and the input channels of a parameter are made of: a
    block is one KTC half, or q, k or v, or one of the two frames an upsampling conv predicts."""
    if ".to_qkv." in name:
        return 3, 1
    if ".time_conv." in name:
        return (2 if name.startswith("decoder.") else 1), 1  # in the decoder: two frames out
    if any(f".{part}." in name for part in ("proj", "norm", "resample_2d", "resample_3d")):
        return 1, 1
    if ".conv_2d." in name or ".conv_3d." in name:
        return 1, 2
    return 2, 2  # FrameConv2d over both halves, SplitRMSNorm gammas


def _interleave_blocks(a: torch.Tensor, b: torch.Tensor, dim: int, blocks: int) -> torch.Tensor:
    """Each of the ``blocks`` blocks of ``a`` along ``dim`` followed by the same block of ``b``."""
    parts = [x.unflatten(dim, (blocks, 1, -1)) for x in (a, b)]
    return torch.cat(parts, dim=dim + 1).flatten(dim, dim + 2)


def widen(state: dict[str, torch.Tensor], generator: torch.Generator, jitter: float = 0.1) -> dict[str, torch.Tensor]:
    """A checkpoint of base width ``dim`` -> one of width ``2 * dim`` that computes the same function
    (Net2WiderNet, Chen et al. 2016), so that a wider model starts from a trained narrow one.

    Every channel is duplicated. A layer reading duplicated channels gets each weight split in two
    parts that sum to it, unequal by ``jitter`` so that the copies learn apart. RMS norms see the
    same mean square; queries are scaled by 1/sqrt(2) against attention's 1/sqrt(channels).
    """
    z_dim, dim = architecture(state)
    with torch.device("meta"):  # shapes only
        wide = IVVAE(z_dim, 2 * dim).state_dict()
    out: dict[str, torch.Tensor] = {}
    for name, value in state.items():
        t, target = value.float(), wide[name].shape
        out_blocks, in_blocks = _channel_blocks(name)
        if t.shape[0] != target[0]:
            t = _interleave_blocks(t, t, 0, out_blocks)
            if ".to_qkv." in name:
                t[: len(t) // 3] /= math.sqrt(2)
        if t.dim() > 1 and t.shape[1] != target[1]:
            split = jitter * t.std() / 2 * torch.randn(t.shape, generator=generator)
            t = _interleave_blocks(t / 2 + split, t / 2 - split, 1, in_blocks)
        out[name] = t.to(value.dtype)
    return out


class Trainer:
    """One training run in ``folder``: ``state.pt`` (weights, optimizer, step, config) to resume,
    ``model.safetensors`` (the weights ivvae loads), ``log.jsonl``."""

    def __init__(self, config: TrainConfig, folder: Path, device: torch.device):
        self.config, self.folder, self.device = config, folder, device
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            self.model = IVVAE(config.z_dim, config.dim).to(device)
        state_path = folder / "state.pt"
        resuming = state_path.exists()
        # Read once: its weights start a new run, its scale and shift stay with a frozen encoder.
        init_file = read_checkpoint(config.init) if config.init and (config.decoder_only or not resuming) else None
        self.init_factors: tuple[float, float] | None = None
        if config.decoder_only:
            if init_file is None:
                raise InputError("training the decoder only needs a checkpoint to start from (--init)")
            self.model.encoder.requires_grad_(False)
            self.model.conv1.requires_grad_(False)
            self.init_factors = latent_factors(*architecture(init_file[0], config.init), init_file[1])[1:]
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(trainable, lr=config.lr, weight_decay=config.weight_decay)
        self.step = 0
        if resuming:
            state = torch.load(state_path, map_location=device, weights_only=True)
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.step = state["step"]
        elif init_file is not None:
            init = init_file[0]
            if 2 * architecture(init, config.init)[1] == config.dim:
                init = widen(init, torch.Generator().manual_seed(config.seed))
            check_fit(self.model, init, config.init)
            self.model.load_state_dict(init)
        self.frames = 1 if config.phase == "image" else config.clip_frames
        videos, evals = self._videos()
        self.bank = FrameBank(videos, self.frames)
        self.eval_clips = self._eval_clips(evals)
        folder.mkdir(parents=True, exist_ok=True)  # only once everything above has worked
        (folder / "config.json").write_text(json.dumps(asdict(config), indent=2) + "\n")
        if self.step:
            self._forget_logged_steps_after_checkpoint()

    def _forget_logged_steps_after_checkpoint(self) -> None:
        """A run stopped between checkpoints logged steps that resuming redoes; keep each step once."""
        log = self.folder / "log.jsonl"
        if not log.exists():
            return
        lines = log.read_text().splitlines(keepends=True)
        tmp = self.folder / ".log.jsonl.partial"
        tmp.write_text("".join(line for line in lines if json.loads(line)["step"] <= self.step))
        tmp.replace(log)

    def _videos(self) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """The training videos and the first clip of each eval video: decoded, or from the frame cache
        (which holds the eval videos as it holds the others)."""
        c = self.config
        if c.frame_cache is None:
            return (
                decode_videos(c.videos, c.short_side, c.max_video_frames),
                decode_videos(c.eval_videos, c.short_side, c.clip_frames),
            )
        cached = frame_cache(Path(c.frame_cache), [*c.videos, *c.eval_videos], c.short_side, c.max_video_frames)
        n = len(c.videos)  # into memory: the training videos whole, the eval videos' first clip only
        return [np.array(v) for v in cached[:n]], [np.array(v[: c.clip_frames]) for v in cached[n:]]

    def _eval_clips(self, videos: list[np.ndarray]) -> list[torch.Tensor]:
        if not videos:
            return []
        bank = FrameBank(videos, self.frames)
        rng = np.random.default_rng(12345)
        return [bank.sample(rng, 1, self.frames, self.config.crop).to(self.device) for _ in range(8)]

    def run(
        self,
        progress: Callable[[int, dict], None] | None = None,
        deadline: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> dict:
        """Train to ``config.steps``, or with ``deadline`` (a ``clock()`` time) stop at the last
        checkpoint that ends before it: after each checkpoint, go on only if the next one would,
        at the mean time per step so far (the first is always reached). ``self.step`` tells which."""
        config, model = self.config, self.model
        started, first = clock(), self.step
        autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda" and config.bf16)
        record: dict = {}
        model.train()
        while self.step < config.steps:
            rng = np.random.default_rng([config.seed, self.step])
            generator = torch.Generator(self.device).manual_seed(config.seed * 1_000_003 + self.step)
            clip = self.bank.sample(rng, config.batch, self.frames, config.crop).to(self.device)
            with autocast:
                terms = loss_terms(model, clip, config, generator)
            self.optimizer.zero_grad(set_to_none=True)
            terms["loss"].backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            lr = learning_rate(config, self.step)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            self.optimizer.step()
            self.step += 1
            record = {"step": self.step, "lr": lr, **{k: round(v.item(), 5) for k, v in terms.items()}}
            if self.eval_clips and (self.step % config.eval_every == 0 or self.step == config.steps):
                model.eval()
                record |= {f"eval_{k}": round(v, 4) for k, v in evaluate(model, self.eval_clips).items()}
                model.train()
            saved = self.step % config.checkpoint_every == 0 or self.step == config.steps
            if saved:
                self.save()
            with (self.folder / "log.jsonl").open("a") as log:
                log.write(json.dumps(record) + "\n")
            if progress:
                progress(self.step, record)
            if saved and deadline is not None and self.step < config.steps:
                now = clock()
                following = min(config.steps, (self.step // config.checkpoint_every + 1) * config.checkpoint_every)
                if now + (following - self.step) * (now - started) / (self.step - first) > deadline:
                    break
        model.eval()
        return record

    def save(self) -> None:
        """Write the resumable state and the loadable weights, each atomically."""
        state = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(), "step": self.step}
        tmp = self.folder / ".state.pt.partial"
        torch.save(state, tmp)
        tmp.replace(self.folder / "state.pt")
        scale, shift = self.latent_statistics()
        metadata = {
            "variant": f"ivvae_z{self.config.z_dim}_dim{self.config.dim}",
            "scale_factor": f"{scale:.4f}",
            "shift_factor": f"{shift:.4f}",
            "step": str(self.step),
            "train_config": json.dumps(asdict(self.config)),
        }
        tmp = self.folder / ".model.safetensors.partial"
        save_file({k: v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()}, str(tmp), metadata)
        tmp.replace(self.folder / "model.safetensors")

    def latent_statistics(self) -> tuple[float, float]:
        """Scale and shift that give latents of unit variance and zero mean, from a fixed sample; with
        the encoder frozen, the init's, so that its latents keep their values."""
        if self.init_factors is not None:
            return self.init_factors
        rng = np.random.default_rng(999)
        with torch.no_grad():
            clip = self.bank.sample(rng, 4, self.frames, self.config.crop).to(self.device)
            values = encode_clip(self.model, clip).mean.float()
        std = values.std().item()
        return (1 / std if std > 0 and math.isfinite(std) else 1.0), values.mean().item()
