"""Training: the loss goes down, a resumed run is the same run, the result loads as weights."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from ivvae_cli.cli import app
from ivvae_cli.model import IVVAE
from ivvae_cli.stream import decode, encode
from ivvae_cli.train import FrameBank, TrainConfig, Trainer, learning_rate, loss_terms, reconstruct_clip, widen
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
    bank = FrameBank([str(clip)], short_side=24, max_frames=9, min_frames=5)
    measured = np.concatenate([f for f, _ in read_frames(clip, size=(32, 24))])
    assert bank.videos[0].shape == (9, 24, 32, 3)
    assert np.array_equal(bank.videos[0].numpy(), measured)


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
