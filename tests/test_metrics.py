"""Metrics against hand-computable cases and an independent implementation; the report's schema."""

from __future__ import annotations

import json
import math
import subprocess

import numpy as np
import pytest
from typer.testing import CliRunner

from ivvae_cli.cli import app
from ivvae_cli.weights import SAMPLE

from .media import FFMPEG, ffmpeg_frames, pattern, write_frames

pytestmark = pytest.mark.e2e  # measured through `ivvae compare`


def compare(*args) -> tuple[int, dict, str]:
    result = CliRunner().invoke(app, ["compare", *map(str, args), "-q", "--json", "-"])
    return result.exit_code, json.loads(result.stdout) if result.exit_code == 0 else {}, result.stderr


@pytest.fixture
def source(tmp_path) -> np.ndarray:
    frames = (pattern(13, 48, 32).astype(np.int16) * 200 // 255 + 10).astype(np.uint8)  # headroom both ways
    write_frames(tmp_path / "a.mkv", frames)
    return frames


def test_identical_videos(tmp_path, source):
    code, report, _ = compare(tmp_path / "a.mkv", tmp_path / "a.mkv")
    m = report["metrics"]
    assert code == 0 and m["frames"] == 13 and report["frames"] == {"a": 13, "b": 13}
    assert m["psnr_db"] == 100.0 and m["ssim"] == pytest.approx(1.0) and m["flicker"] == 0.0


def test_constant_offset(tmp_path, source):
    write_frames(tmp_path / "b.mkv", source + 10)
    _, report, _ = compare(tmp_path / "a.mkv", tmp_path / "b.mkv")
    expected = 20 * math.log10(255 / 10)
    assert all(r["psnr_db"] == pytest.approx(expected, abs=1e-6) for r in report["per_frame"])
    assert report["metrics"]["flicker"] == pytest.approx(0.0, abs=1e-4)  # one offset everywhere: motion intact


def test_known_noise(tmp_path, source):
    noise = np.random.default_rng(0).integers(-6, 7, source.shape)
    write_frames(tmp_path / "b.mkv", (source + noise).astype(np.uint8))
    _, report, _ = compare(tmp_path / "a.mkv", tmp_path / "b.mkv")
    for i, row in enumerate(report["per_frame"]):
        assert row["psnr_db"] == pytest.approx(10 * math.log10(255**2 / np.mean(noise[i] ** 2)), abs=1e-6)
    # Independent noise each frame: flicker is the mean |n_i - n_(i-1)|.
    expected = np.mean(np.abs(np.diff(noise, axis=0)))
    assert report["metrics"]["flicker"] == pytest.approx(expected, rel=1e-6)


def test_error_planted_in_one_position(tmp_path, source):
    other = source.copy()
    other[3::4] += 20  # frames 3, 7, 11: position 2 of their groups
    write_frames(tmp_path / "b.mkv", other)
    _, report, _ = compare(tmp_path / "a.mkv", tmp_path / "b.mkv")
    positions = report["metrics"]["positions"]
    assert {p: v["frames"] for p, v in positions.items()} == {"first": 1, "0": 3, "1": 3, "2": 3, "3": 3}
    assert positions["2"]["psnr_db"] == pytest.approx(20 * math.log10(255 / 20))
    assert all(positions[p]["psnr_db"] == 100.0 for p in ("first", "0", "1", "3"))
    assert report["metrics"]["position_spread"]["psnr_db"] == pytest.approx(100 - 20 * math.log10(255 / 20))
    assert {r["index"] for r in report["metrics"]["worst_frames"][:3]} == {3, 7, 11}


def test_the_tables_and_the_psnr_picture_are_printed_unless_quiet_or_json_takes_stdout(tmp_path, source):
    other = source.copy()
    other[5] += 20  # frame 5, a keyframe (position 0), is the one dip
    write_frames(tmp_path / "b.mkv", other)
    pair = [str(tmp_path / "a.mkv"), str(tmp_path / "b.mkv")]
    shown = CliRunner().invoke(app, ["compare", *pair]).stdout.splitlines()
    header = shown.index(f"PSNR per frame (▁ {20 * math.log10(255 / 20):.2f} to █ 100.00 dB; ^ keyframe):")
    assert shown[0].strip() == "what was lost" and shown[header + 1 :] == ["█████▁███████", "^^   ^   ^"]
    quiet = CliRunner().invoke(app, ["compare", *pair, "-q"]).stdout
    assert "what was lost" in quiet and "PSNR per frame" not in quiet
    assert json.loads(CliRunner().invoke(app, ["compare", *pair, "--json", "-"]).stdout)["metrics"]["frames"] == 13


def test_report_schema(tmp_path, source):
    write_frames(tmp_path / "b.mkv", source + 1)
    _, report, _ = compare(tmp_path / "a.mkv", tmp_path / "b.mkv")
    m = report["metrics"]
    expected = {"frames", "psnr_db", "ssim", "psnr_db_min", "ssim_min", "flicker", "positions", "position_spread"}
    assert expected | {"worst_frames"} == set(m)
    assert set(m["position_spread"]) == {"psnr_db", "ssim"}
    assert all(set(v) == {"frames", "psnr_db", "ssim"} for v in m["positions"].values())
    assert [set(r) for r in report["per_frame"]] == [{"index", "position", "psnr_db", "ssim", "flicker"}] * 13
    assert report["per_frame"][0]["flicker"] is None  # no previous frame: null in JSON


def test_agrees_with_scikit_image_on_a_real_clip(tmp_path):
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    src = SAMPLE
    lossy = tmp_path / "lossy.mp4"
    subprocess.run(
        [FFMPEG, "-v", "error", "-i", str(src), "-frames:v", "6", "-c:v", "libx264", "-crf", "35", str(lossy)],
        check=True,
    )
    _, report, _ = compare(src, lossy, "--frames", 6)
    a, b = ffmpeg_frames(src, 640, 272, frames=6), ffmpeg_frames(lossy, 640, 272)
    for i, row in enumerate(report["per_frame"]):
        psnr = peak_signal_noise_ratio(a[i], b[i], data_range=1.0)
        ssim = structural_similarity(
            a[i], b[i], channel_axis=2, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1.0
        )
        assert row["psnr_db"] == pytest.approx(psnr, abs=1e-3)
        assert row["ssim"] == pytest.approx(ssim, abs=1e-4)


def test_comparison_video(tmp_path, source):
    from .media import stream_facts

    write_frames(tmp_path / "b.mkv", source + 5)
    code, _, err = compare(tmp_path / "a.mkv", tmp_path / "b.mkv", "--compare-video", tmp_path / "side.mp4")
    assert code == 0, err
    facts = stream_facts(tmp_path / "side.mp4")
    assert (facts["frames"], facts["width"], facts["height"]) == (13, 3 * 48, 32)


def test_refusals(tmp_path, source):
    write_frames(tmp_path / "small.mkv", source[:, :16, :16])
    code, _, err = compare(tmp_path / "a.mkv", tmp_path / "small.mkv")
    assert code == 3 and "48x32" in err
    try:
        import lpips  # noqa: F401

        pytest.skip("lpips is installed here; the refusal is for machines without it")
    except ImportError:
        code, _, err = compare(tmp_path / "a.mkv", tmp_path / "a.mkv", "--lpips")
        assert code == 1 and "LPIPS" in err and "never downloads" in err


def test_plot_or_a_clear_refusal(tmp_path, source):
    code, _, err = compare(tmp_path / "a.mkv", tmp_path / "a.mkv", "--plot", tmp_path / "p.png")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert code == 1 and "matplotlib" in err and not (tmp_path / "p.png").exists()
    else:
        assert code == 0 and (tmp_path / "p.png").stat().st_size > 0
