"""The ivvae command end to end: real clips in, real files out, checked by an independent reader."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open
from typer.testing import CliRunner

from ivvae_cli.cli import app
from ivvae_cli.latent_file import LatentHeader

from .conftest import VIDEOS
from .media import ffmpeg_frames, make_clip, stream_facts

pytestmark = pytest.mark.e2e
runner = CliRunner()


def ivvae(*args: str | Path) -> tuple[int, str, str]:
    result = runner.invoke(app, [str(a) for a in args])
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout, result.stderr


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".partial" in p.name)


@pytest.mark.parametrize("frames", [1, 2, 6, 17])
def test_round_trip_keeps_count_size_and_rate(tmp_path, checkpoint, frames):
    src = tmp_path / "in.mp4"
    make_clip(src, frames, 40, 24, fps=Fraction(30000, 1001))
    code, _, err = ivvae("encode", src, tmp_path / "c.latent", "--weights", checkpoint, "-q")
    assert code == 0, err
    code, _, err = ivvae("decode", tmp_path / "c.latent", tmp_path / "out.mp4", "--weights", checkpoint, "-q")
    assert code == 0, err
    a, b = stream_facts(src), stream_facts(tmp_path / "out.mp4")
    assert (b["frames"], b["width"], b["height"]) == (frames, 40, 24)
    assert b["rate"] == Fraction(30000, 1001)
    assert [p * b["time_base"] for p in b["pts"]] == [p * a["time_base"] for p in a["pts"]]
    assert leftovers(tmp_path) == []


def test_odd_size_comes_back_exactly(tmp_path, checkpoint):
    src = tmp_path / "odd.mkv"
    make_clip(src, 2, 853, 481, codec="ffv1", pix_fmt="yuv444p")
    assert ivvae("encode", src, tmp_path / "odd.latent", "-w", checkpoint, "-q")[0] == 0
    with safe_open(str(tmp_path / "odd.latent"), "pt") as f:
        meta = f.metadata()
        assert f.get_slice("latent").get_shape() == [1, 16, 2, 61, 107]
    assert (meta["source_width"], meta["source_height"], meta["padded_width"], meta["padded_height"]) == (
        "853",
        "481",
        "856",
        "488",
    )
    assert ivvae("decode", tmp_path / "odd.latent", tmp_path / "odd.mp4", "-w", checkpoint, "-q")[0] == 0
    facts = stream_facts(tmp_path / "odd.mp4")
    assert (facts["frames"], facts["width"], facts["height"]) == (2, 853, 481)


def test_latent_file_is_plain_safetensors_with_complete_metadata(tmp_path, checkpoint):
    src = tmp_path / "in.mp4"
    make_clip(src, 5, 32, 32, audio=True)
    code, out, _ = ivvae("encode", src, tmp_path / "a.latent", "-w", checkpoint, "-q", "--json", "-")
    assert code == 0
    report = json.loads(out)
    assert report["latent_shape"] == [1, 16, 2, 4, 4]
    with safe_open(str(tmp_path / "a.latent"), "pt") as f:
        meta = f.metadata()
        assert set(f.keys()) == {"latent", "frame_pts", "audio"}
    required = {"format", "format_version", "model", "scale_factor", "shift_factor", "weights_fingerprint"}
    required |= {"source_frames", "source_height", "source_width", "frame_rate", "time_base", "padded_frames"}
    required |= {"dtype", "posterior", "tool_version", "audio_codec"}
    assert required <= set(meta)
    assert meta["format"] == "ivvae-latent" and meta["posterior"] == "mean" and meta["audio_codec"] == "aac"
    assert set(meta) <= set(LatentHeader.__dataclass_fields__)


def test_audio_survives(tmp_path, checkpoint):
    src = tmp_path / "talk.mp4"
    make_clip(src, 17, 32, 32, audio=True)
    assert ivvae("encode", src, tmp_path / "t.latent", "-w", checkpoint, "-q")[0] == 0
    for name in ("t.mp4", "t.mkv", "t.webm"):
        assert ivvae("decode", tmp_path / "t.latent", tmp_path / name, "-w", checkpoint, "-q")[0] == 0
        facts = stream_facts(tmp_path / name)
        assert facts["audio"] == (["opus"] if name.endswith("webm") else ["aac"])
        assert facts["audio_seconds"] == pytest.approx(17 / 25, abs=0.1)


@pytest.mark.shared
@pytest.mark.parametrize(
    ("clip", "frames"),
    [
        ("gradio-app_gradio/world.mp4", 5),
        ("mdn_shared-assets/tears-of-steel-battle-clip-medium.webm", 2),
        ("ffmpegwasm_testdata/Big_Buck_Bunny_180_10s.webm", 6),
    ],
)
def test_real_clips(tmp_path, checkpoint, clip, frames):
    src = VIDEOS / clip
    a = stream_facts(src)
    assert ivvae("encode", src, tmp_path / "r.latent", "-w", checkpoint, "-q", "--frames", frames)[0] == 0
    assert ivvae("decode", tmp_path / "r.latent", tmp_path / "r.mp4", "-w", checkpoint, "-q")[0] == 0
    b = stream_facts(tmp_path / "r.mp4")
    assert (b["frames"], b["width"], b["height"]) == (frames, a["width"], a["height"])
    assert b["rate"] == a["rate"]
    assert bool(b["audio"]) == bool(a["audio"])


def test_time_range(tmp_path, checkpoint):
    src = tmp_path / "in.mp4"
    make_clip(src, 30, 32, 32)
    assert ivvae("encode", src, tmp_path / "r.latent", "-w", checkpoint, "-q", "--start", "0.4", "--frames", 6)[0] == 0
    with safe_open(str(tmp_path / "r.latent"), "pt") as f:
        assert f.metadata()["source_frames"] == "6"
        pts = f.get_tensor("frame_pts").tolist()
    assert pts[0] == 0 and len(pts) == 6
    code, _, _ = ivvae("encode", src, tmp_path / "d.latent", "-w", checkpoint, "-q", "--duration", "0.2")
    assert code == 0
    with safe_open(str(tmp_path / "d.latent"), "pt") as f:
        assert f.metadata()["source_frames"] == "5"


def test_variable_frame_rate_timestamps_are_kept(tmp_path, checkpoint):
    src = tmp_path / "vfr.mkv"
    stamps = [0, 40, 80, 200, 240, 500, 540]
    make_clip(src, len(stamps), 32, 32, pts=stamps)
    assert ivvae("encode", src, tmp_path / "v.latent", "-w", checkpoint, "-q")[0] == 0
    assert ivvae("decode", tmp_path / "v.latent", tmp_path / "v.mkv", "-w", checkpoint, "-q")[0] == 0
    a, b = stream_facts(src), stream_facts(tmp_path / "v.mkv")
    # Kept to the writer's grid of 1/8 frame at the average rate (the file's 1 ms ticks here).
    tolerance = max(1 / (16 * a["rate"]), b["time_base"])
    for ours, theirs in zip(b["pts"], a["pts"], strict=True):
        assert abs(ours * b["time_base"] - theirs * a["time_base"]) <= tolerance


def test_lossless_output_and_metrics_agree_with_an_independent_computation(tmp_path, checkpoint):
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    src = tmp_path / "in.mkv"
    make_clip(src, 5, 48, 32, codec="ffv1", pix_fmt="bgr0")
    report_path = tmp_path / "report.json"
    code, _, err = ivvae(
        "reconstruct", src, tmp_path / "out.mkv", "--lossless", "--metrics", "--json", report_path, "-w", checkpoint
    )
    assert code == 0, err
    report = json.loads(report_path.read_text())
    original = ffmpeg_frames(src, 48, 32)
    recon = ffmpeg_frames(tmp_path / "out.mkv", 48, 32)
    for i in range(5):
        psnr = peak_signal_noise_ratio(original[i], recon[i], data_range=1.0)
        ssim = structural_similarity(
            original[i],
            recon[i],
            channel_axis=2,
            gaussian_weights=True,
            sigma=1.5,
            use_sample_covariance=False,
            data_range=1.0,
        )
        assert report["per_frame"][i]["psnr_db"] == pytest.approx(psnr, abs=1e-3)
        assert report["per_frame"][i]["ssim"] == pytest.approx(ssim, abs=1e-4)


def test_reconstruct_equals_encode_then_decode(tmp_path, checkpoint):
    src = tmp_path / "in.mkv"
    make_clip(src, 7, 40, 24, codec="ffv1", pix_fmt="bgr0")
    assert ivvae("reconstruct", src, tmp_path / "one.mkv", "--lossless", "-w", checkpoint, "-q")[0] == 0
    assert ivvae("encode", src, tmp_path / "x.latent", "-w", checkpoint, "-q")[0] == 0
    assert ivvae("decode", tmp_path / "x.latent", tmp_path / "two.mkv", "--lossless", "-w", checkpoint, "-q")[0] == 0
    one, two = ffmpeg_frames(tmp_path / "one.mkv", 40, 24), ffmpeg_frames(tmp_path / "two.mkv", 40, 24)
    assert one.shape == (7, 24, 40, 3)
    assert np.abs(one - two).max() <= 1 / 255 + 1e-6


def test_info_describes_latents_and_videos(tmp_path, checkpoint):
    src = tmp_path / "in.mp4"
    make_clip(src, 9, 32, 32)
    ivvae("encode", src, tmp_path / "a.latent", "-w", checkpoint, "-q")
    code, out, _ = ivvae("info", tmp_path / "a.latent", "--json", "-")
    report = json.loads(out)
    assert code == 0 and report["kind"] == "latent" and report["source_frames"] == 9
    assert report["raw_rgb8_bytes"] == 9 * 32 * 32 * 3 and report["compression_vs_rgb8"] > 0
    code, out, _ = ivvae("info", src, "--json", "-")
    assert code == 0 and json.loads(out)["frames"] == 9
    code, out, _ = ivvae("info", tmp_path / "a.latent")
    assert code == 0 and "ivvae-latent" in out


# -- errors -----------------------------------------------------------------------------------------


@pytest.fixture
def clip(tmp_path) -> Path:
    make_clip(tmp_path / "in.mp4", 5, 32, 32)
    return tmp_path / "in.mp4"


@pytest.fixture
def latent(tmp_path, clip, checkpoint) -> Path:
    assert ivvae("encode", clip, tmp_path / "in.latent", "-w", checkpoint, "-q")[0] == 0
    return tmp_path / "in.latent"


def _newer_version(latent: Path, target: Path) -> None:
    from safetensors.torch import load_file, save_file

    with safe_open(str(latent), "pt") as f:
        meta = f.metadata() | {"format_version": "99"}
    save_file(load_file(str(latent)), str(target), metadata=meta)


@pytest.mark.parametrize(
    ("case", "code", "message"),
    [
        ("missing input", 3, "input not found"),
        ("not a video", 3, "not a video"),
        ("no frames", 3, "no video frames after 60 s"),
        ("output exists", 4, "output exists"),
        ("no output folder", 4, "output folder does not exist"),
        ("missing weights", 5, "searched --weights FILE, then"),
        ("no cuda", 6, "no CUDA device"),
    ],
)
def test_encode_errors(tmp_path, clip, checkpoint, case, code, message):
    out = tmp_path / "out.latent"
    args = [clip, out, "-w", checkpoint, "-q"]
    if case == "missing input":
        args[0] = tmp_path / "absent.mp4"
    elif case == "not a video":
        args[0] = tmp_path / "notes.txt"
        args[0].write_text("just some text\n" * 20)
    elif case == "no frames":
        args += ["--start", "60"]  # the clip is 0.2 s long
    elif case == "output exists":
        out.write_text("keep me")
    elif case == "no output folder":
        args[1] = tmp_path / "nowhere" / "out.latent"
    elif case == "missing weights":
        args[2:4] = ["--model", "z16_dim64"]
    elif case == "no cuda":
        args += ["--device", "cuda"]
    before = sorted(p.name for p in tmp_path.iterdir())
    exit_code, _, err = ivvae("encode", *args)
    assert exit_code == code, err
    assert message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    if case == "output exists":
        assert out.read_text() == "keep me"


def test_force_overwrites(tmp_path, clip, checkpoint):
    out = tmp_path / "out.latent"
    out.write_text("old")
    assert ivvae("encode", clip, out, "-w", checkpoint, "-q", "--force")[0] == 0
    assert out.stat().st_size > 100


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("not a latent", "no 'ivvae-latent' format tag"),
        ("newer version", "newer than this ivvae"),
        ("truncated", "truncated"),
        ("other model", "was encoded with"),
    ],
)
def test_decode_errors(tmp_path, latent, checkpoint, case, message):
    from safetensors.torch import save_file

    from .conftest import random_model

    bad = tmp_path / "bad.latent"
    weights = checkpoint
    if case == "not a latent":
        save_file({"x": __import__("torch").zeros(2)}, str(bad))
    elif case == "newer version":
        _newer_version(latent, bad)
    elif case == "truncated":
        bad.write_bytes(latent.read_bytes()[:-500])
    elif case == "other model":
        bad = latent
        weights = tmp_path / "other.safetensors"
        save_file(random_model(16, 8, seed=99).state_dict(), str(weights))
    code, _, err = ivvae("decode", bad, tmp_path / "out.mp4", "-w", weights, "-q")
    assert code == (5 if case == "other model" else 3), err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out.mp4").exists() and leftovers(tmp_path) == []


def test_console_script_exit_codes_and_no_traceback(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "ivvae_cli", "encode", str(tmp_path / "absent.mp4"), str(tmp_path / "x.latent")],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 3
    assert result.stderr.strip().startswith("error: input not found") and "Traceback" not in result.stderr


def test_interrupt_leaves_nothing_that_looks_complete(tmp_path, checkpoint):
    src = tmp_path / "long.mkv"
    make_clip(src, 200, 320, 240, codec="ffv1", pix_fmt="bgr0")
    out = tmp_path / "out.mp4"
    proc = subprocess.Popen(
        [sys.executable, "-m", "ivvae_cli", "reconstruct", str(src), str(out), "-w", str(checkpoint), "-q"],
        stderr=subprocess.PIPE,
        text=True,
        env=os.environ | {"PYTHONUNBUFFERED": "1", "PYTHONFAULTHANDLER": "1"},
        # A test run started in the background (`pytest &`) ignores SIGINT, and a child that
        # inherits that ignores Ctrl-C too; give it a terminal's default, as a user's shell would.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.time() + 600  # generous: a loaded CPU (CI beside other work) is slow to the first frame
    while not leftovers(tmp_path) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.1)
    assert leftovers(tmp_path), f"no partial output appeared (exit code {proc.poll()})"
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    try:
        _, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGABRT)  # the fault handler prints where every thread is
        pytest.fail(f"still running 60 s after SIGINT:\n{proc.communicate(timeout=60)[1][-4000:]}")
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    assert not out.exists() and leftovers(tmp_path) == []
