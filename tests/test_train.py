"""Training: the loss goes down, a resumed run is the same run, the result loads as weights."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import asdict, replace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from ivvae_cli.cli import app
from ivvae_cli.errors import InputError, OutputError
from ivvae_cli.model import IVVAE
from ivvae_cli.stream import decode, encode
from ivvae_cli.train import TrainConfig, Trainer, decode_videos, learning_rate, loss_terms, reconstruct_clip, widen
from ivvae_cli.video import read_frames
from ivvae_cli.weights import load_model

from .media import make_clip


def _config(clip, steps: int) -> TrainConfig:
    return TrainConfig(
        videos=[str(clip)], z_dim=4, dim=4, steps=steps, clip_frames=5, crop=32, batch=2, short_side=0,
        lr=2e-3, checkpoint_every=2, eval_every=1000,
    )  # fmt: skip


def test_training_frames_are_resized_as_reconstruct_resizes_them(tmp_path):
    """The model is measured on frames `--short-side` resized; training on a softer resize of the
    same footage would teach it blurrier frames."""
    clip = tmp_path / "clip.mp4"
    make_clip(clip, 9, 64, 48)
    (frames,) = decode_videos([str(clip)], short_side=24, max_frames=9)
    measured = np.concatenate([f for f, _ in read_frames(clip, size=(32, 24))])
    assert frames.shape == (9, 24, 32, 3)
    assert np.array_equal(frames, measured)


def test_training_lowers_the_loss(tmp_path):
    clip = tmp_path / "clip.mp4"
    make_clip(clip, 12, 48, 40)
    trainer = Trainer(_config(clip, 30), tmp_path / "run", torch.device("cpu"))
    trainer.run()
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert len(losses) == 30
    assert sum(losses[-5:]) / 5 < 0.9 * sum(losses[:5]) / 5, losses


def test_resuming_continues_exactly(tmp_path):
    clip = tmp_path / "clip.mp4"
    make_clip(clip, 12, 48, 40)
    Trainer(_config(clip, 4), tmp_path / "straight", torch.device("cpu")).run()
    Trainer(_config(clip, 2), tmp_path / "resumed", torch.device("cpu")).run()
    Trainer(_config(clip, 4), tmp_path / "resumed", torch.device("cpu")).run()
    a = load_file(str(tmp_path / "straight" / "model.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_an_interrupted_cosine_run_resumes_exactly(tmp_path):
    clip = tmp_path / "clip.mp4"
    make_clip(clip, 12, 48, 40)
    config = replace(_config(clip, 4), lr_final=2e-4)
    Trainer(config, tmp_path / "straight", torch.device("cpu")).run()

    def interrupt(step: int, record: dict) -> None:
        if step == 3:  # a step after the checkpoint of step 2, logged but not saved
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        Trainer(config, tmp_path / "resumed", torch.device("cpu")).run(interrupt)
    Trainer(config, tmp_path / "resumed", torch.device("cpu")).run()
    a = load_file(str(tmp_path / "straight" / "model.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    log = (tmp_path / "straight" / "log.jsonl").read_text()
    assert (tmp_path / "resumed" / "log.jsonl").read_text() == log  # step 3 logged once, as redone
    rates = [json.loads(line)["lr"] for line in log.splitlines()]
    assert rates[0] == 2e-3 and rates == sorted(rates, reverse=True) and rates[-1] > 2e-4
    assert learning_rate(config, 4) == pytest.approx(2e-4) and learning_rate(config, 2) == pytest.approx(1.1e-3)


def _loss_with(tmp_path, **weights) -> tuple[dict, dict, torch.Tensor, torch.Tensor]:
    """Loss terms of one batch without and with ``weights``; the batch and its reconstruction."""
    clip = tmp_path / "clip.mp4"
    make_clip(clip, 12, 48, 40)
    config = _config(clip, 1)
    trainer = Trainer(config, tmp_path / "run", torch.device("cpu"))
    batch = trainer.bank.sample(np.random.default_rng(0), 2, 5, 32)
    plain = loss_terms(trainer.model, batch, config, torch.Generator().manual_seed(0))
    weighted = loss_terms(trainer.model, batch, replace(config, **weights), torch.Generator().manual_seed(0))
    recon = reconstruct_clip(trainer.model, batch, torch.Generator().manual_seed(0))[0]
    return plain, weighted, batch, recon


def test_the_mse_term_adds_its_weight_times_the_squared_error(tmp_path):
    plain, weighted, batch, recon = _loss_with(tmp_path, mse_weight=3.0)
    mse = (recon - batch).pow(2).mean()
    assert mse > 0 and torch.allclose(weighted["mse"], mse)
    assert torch.allclose(weighted["loss"] - plain["loss"], 3 * mse)


def test_the_psnr_term_subtracts_its_weight_times_the_mean_frame_psnr(tmp_path):
    plain, weighted, batch, recon = _loss_with(tmp_path, psnr_weight=0.5)
    frames = [(r - b).pow(2).mean() / 4 for r, b in zip(recon.flatten(0, 1), batch.flatten(0, 1), strict=True)]
    psnr = torch.stack([-10 * torch.log10(m + 1e-5) for m in frames]).mean()
    assert 0 < psnr < 50 and torch.allclose(weighted["psnr"], psnr)
    assert torch.allclose(weighted["loss"] - plain["loss"], -0.5 * psnr)


@pytest.mark.e2e
def test_cli_trains_resumes_and_the_result_loads(tmp_path):
    clip = tmp_path / "clip.mp4"
    make_clip(clip, 12, 48, 40)
    (tmp_path / "MANIFEST.tsv").write_text("split\tfile\ntrain\tclip.mp4\neval\tclip.mp4\n")
    args = ["train", "--manifest", str(tmp_path / "MANIFEST.tsv"), "--out", str(tmp_path / "run"), "-q"]
    small = ["--dim", "4", "--z-dim", "4", "--crop", "32", "--clip-frames", "5", "--batch", "1", "--short-side", "0"]
    small += ["--mse-weight", "2", "--psnr-weight", "0.01", "--ssim-weight", "0.1", "--fp32", "--checkpoint-every", "2"]
    result = CliRunner().invoke(app, [*args, *small, "--steps", "2", "--device", "cpu"])
    assert result.exit_code == 0, result.stderr
    again = CliRunner().invoke(app, [*args, "--steps", "3"])
    assert again.exit_code == 4 and "--resume" in again.stderr
    resumed = CliRunner().invoke(app, [*args, "--resume", "--steps", "3", "--device", "cpu"])
    assert resumed.exit_code == 0, resumed.stderr
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3] and "eval_psnr_db" in log[-1]
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["mse_weight"] == 2 and saved["psnr_weight"] == 0.01 and saved["ssim_weight"] == 0.1
    assert saved["bf16"] is False and saved["checkpoint_every"] == 2
    loaded = load_model(tmp_path / "run" / "model.safetensors")
    assert (loaded.model.z_dim, loaded.model.dim) == (4, 4) and loaded.model.scale_factor != 1.0


def test_widening_keeps_what_the_model_computes():
    torch.manual_seed(0)
    narrow = IVVAE(4, 4).eval()
    wide = IVVAE(4, 8).eval()
    wide.load_state_dict(widen(narrow.state_dict(), torch.Generator().manual_seed(1)))
    video = torch.rand(1, 3, 9, 32, 24) * 2 - 1
    with torch.no_grad():
        latent = encode(narrow, video)
        assert torch.allclose(encode(wide, video), latent, atol=1e-5)
        # The wide model sums twice the terms in another order: float32 rounding, which the decoder's
        # depth grows to 1.5e-5 on some CPUs (AMD EPYC); without the queries' 1/sqrt(2) it is off by 0.2.
        assert torch.allclose(decode(wide, latent), decode(narrow, latent), atol=1e-4)


def test_training_a_wider_model_from_a_narrow_checkpoint_separates_the_copies(tmp_path):
    clip = tmp_path / "clip.mp4"
    make_clip(clip, 12, 48, 40)
    torch.manual_seed(0)
    save_file(IVVAE(4, 4).state_dict(), str(tmp_path / "narrow.safetensors"))
    config = replace(_config(clip, 1), dim=8, init=str(tmp_path / "narrow.safetensors"))
    trainer = Trainer(config, tmp_path / "run", torch.device("cpu"))
    first = trainer.model.encoder.conv1.conv_2d.weight
    assert torch.equal(first[:4], first[4:])  # each channel and its copy
    trainer.run()
    first = trainer.model.encoder.conv1.conv_2d.weight
    assert not torch.allclose(first[:4], first[4:])


def test_training_the_decoder_only_keeps_the_latents_of_its_init(tmp_path):
    clip = tmp_path / "clip.mp4"
    make_clip(clip, 12, 48, 40)
    torch.manual_seed(0)
    init = tmp_path / "init.safetensors"
    save_file(IVVAE(4, 4).state_dict(), str(init), {"scale_factor": "0.5", "shift_factor": "0.25"})
    Trainer(replace(_config(clip, 3), init=str(init), decoder_only=True), tmp_path / "run", torch.device("cpu")).run()
    before, after = load_model(init).model, load_model(tmp_path / "run" / "model.safetensors").model
    assert (after.scale_factor, after.shift_factor) == (0.5, 0.25)
    assert not torch.equal(after.decoder.head[2].conv_2d.weight, before.decoder.head[2].conv_2d.weight)
    video = torch.rand(1, 3, 5, 32, 32) * 2 - 1
    with torch.no_grad():
        assert torch.equal(encode(after, video), encode(before, video))


@pytest.mark.e2e
def test_training_the_decoder_only_needs_a_checkpoint(tmp_path):
    clip = tmp_path / "clip.mp4"
    make_clip(clip, 12, 48, 40)
    args = ["train", str(clip), "--out", str(tmp_path / "run"), "--decoder-only", "--dim", "4", "--z-dim", "4"]
    result = CliRunner().invoke(app, [*args, "--crop", "32", "--clip-frames", "5", "--short-side", "0", "-q"])
    assert result.exit_code == 3 and "--init" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()


def _weights_and_log(folder) -> tuple[dict, str]:
    return load_file(str(folder / "model.safetensors")), (folder / "log.jsonl").read_text()


def test_a_frame_cache_gives_the_same_run_and_trains_without_pyav_or_the_videos(tmp_path):
    clip, held_out = tmp_path / "clip.mp4", tmp_path / "eval.mp4"
    make_clip(clip, 12, 48, 40)
    make_clip(held_out, 7, 40, 48)
    plain = replace(_config(clip, 4), eval_videos=[str(held_out)], eval_every=2)
    cached = replace(plain, frame_cache=str(tmp_path / "cache"))
    Trainer(plain, tmp_path / "plain", torch.device("cpu")).run()
    Trainer(cached, tmp_path / "fresh", torch.device("cpu")).run()
    index = json.loads((tmp_path / "cache" / "index.json").read_text())
    assert (index["format_version"], index["short_side"], index["max_video_frames"]) == (1, 0, 240)
    assert [(s["path"], s["bytes"], s["frames"]) for s in index["sources"]] == [
        (str(clip), clip.stat().st_size, 12), (str(held_out), held_out.stat().st_size, 7)
    ]  # fmt: skip
    assert np.load(tmp_path / "cache" / index["sources"][0]["file"]).shape == (12, 40, 48, 3)
    assert [p.name for p in tmp_path.iterdir() if "partial" in p.name] == []

    # From the cache alone: the videos gone, and PyAV not importable.
    clip.rename(tmp_path / "away.mp4")
    held_out.rename(tmp_path / "away_eval.mp4")
    (tmp_path / "config.json").write_text(json.dumps(asdict(cached)))
    code = (
        "import json, sys; sys.modules['av'] = None\n"
        "from pathlib import Path; import torch\n"
        "from ivvae_cli.train import TrainConfig, Trainer\n"
        "config = TrainConfig(**json.loads(Path(sys.argv[1]).read_text()))\n"
        "Trainer(config, Path(sys.argv[2]), torch.device('cpu')).run()\n"
        "assert 'ivvae_cli.video' not in sys.modules\n"
    )
    args = [sys.executable, "-c", code, str(tmp_path / "config.json"), str(tmp_path / "from_cache")]
    done = subprocess.run(args, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    weights, log = _weights_and_log(tmp_path / "plain")
    assert "eval_psnr_db" in log
    for run in ("fresh", "from_cache"):
        other_weights, other_log = _weights_and_log(tmp_path / run)
        assert other_log == log and all(torch.equal(weights[k], other_weights[k]) for k in weights)


def test_a_frame_cache_of_other_settings_or_videos_is_refused(tmp_path):
    clip, other = tmp_path / "clip.mp4", tmp_path / "other.mp4"
    make_clip(clip, 12, 48, 40)
    make_clip(other, 12, 48, 40)
    config = replace(_config(clip, 1), frame_cache=str(tmp_path / "cache"))
    Trainer(config, tmp_path / "run", torch.device("cpu"))
    refusals = [
        (replace(config, short_side=32), "short_side 0 (this run: 32)"),
        (replace(config, max_video_frames=8), "max_video_frames 240 (this run: 8)"),
        (replace(config, videos=[str(other)]), f"other videos ({other} is not in it)"),
        (replace(config, videos=[str(clip), str(clip)]), "other videos (it holds others too, or in another order)"),
    ]
    for changed, message in refusals:
        with pytest.raises(InputError, match=message.replace("(", r"\(").replace(")", r"\)")):
            Trainer(changed, tmp_path / "again", torch.device("cpu"))
    with clip.open("ab") as f:
        f.write(b"more")
    with pytest.raises(InputError, match="has changed since"):
        Trainer(config, tmp_path / "again", torch.device("cpu"))
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(OutputError, match="not a frame cache"):
        Trainer(replace(config, frame_cache=str(tmp_path / "busy")), tmp_path / "again", torch.device("cpu"))
    assert not (tmp_path / "again").exists()


def test_a_time_limit_stops_at_the_last_checkpoint_that_fits_and_resuming_is_the_same_run(tmp_path):
    clip = tmp_path / "clip.mp4"
    make_clip(clip, 12, 48, 40)
    config = _config(clip, 6)  # checkpoints at steps 2, 4, 6
    Trainer(config, tmp_path / "straight", torch.device("cpu")).run()
    trainer = Trainer(config, tmp_path / "limited", torch.device("cpu"))
    # Each step takes 10 s by this clock: after step 2 (20 s), step 4 would end at 40 s, in time;
    # after step 4, step 6 would end at 60 s, too late.
    trainer.run(deadline=40.0, clock=lambda: 10.0 * trainer.step)
    stop = 4
    assert trainer.step == stop
    assert torch.load(tmp_path / "limited" / "state.pt", weights_only=True)["step"] == stop
    assert len((tmp_path / "limited" / "log.jsonl").read_text().splitlines()) == stop
    Trainer(config, tmp_path / "limited", torch.device("cpu")).run()
    weights, log = _weights_and_log(tmp_path / "straight")
    resumed_weights, resumed_log = _weights_and_log(tmp_path / "limited")
    assert resumed_log == log and all(torch.equal(weights[k], resumed_weights[k]) for k in weights)


@pytest.mark.e2e
def test_cli_time_limit_and_frame_cache_carry_over_to_resume(tmp_path):
    clip = tmp_path / "clip.mp4"
    make_clip(clip, 12, 48, 40)
    small = ["--dim", "4", "--z-dim", "4", "--crop", "32", "--clip-frames", "5", "--batch", "1", "--short-side", "0"]
    args = ["train", str(clip), "--out", str(tmp_path / "run"), "--device", "cpu", "-q", *small]
    cache = ["--frame-cache", str(tmp_path / "cache")]
    # A limit of 0 s: the first checkpoint is always reached, and no later one fits.
    result = CliRunner().invoke(app, [*args, *cache, "--steps", "4", "--checkpoint-every", "2", "--time-limit", "0"])
    assert result.exit_code == 0, result.stderr
    assert "stopped by --time-limit at step 2 of 4; --resume continues" in result.stderr
    assert json.loads((tmp_path / "run" / "config.json").read_text())["frame_cache"] == str(tmp_path / "cache")
    clip.unlink()  # resuming reads the saved run's frame cache
    resumed = CliRunner().invoke(app, ["train", "--out", str(tmp_path / "run"), "--resume", "--device", "cpu", "-q"])
    assert resumed.exit_code == 0, resumed.stderr
    assert "stopped" not in resumed.stderr
    assert [json.loads(line)["step"] for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()] == [
        1,
        2,
        3,
        4,
    ]
    refused = CliRunner().invoke(
        app, [*args, "--out", str(tmp_path / "run2"), "--frame-cache", str(clip.parent / "run")]
    )
    assert refused.exit_code == 4 and "not a frame cache" in refused.stderr and "Traceback" not in refused.stderr
