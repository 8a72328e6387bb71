"""The bundled model: shipped in the package, the default when no published checkpoint is found,
and good enough on real footage it never saw."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from ivvae_cli.video import probe, resized
from ivvae_cli.weights import BUNDLED, SAMPLE, verify_checkpoint

from .media import make_clip
from .test_cli import ivvae

ROOT = Path(__file__).resolve().parents[1]
# The bundled model measures 30.8 dB and SSIM 0.944 on the sample's first 9 frames at short side 256,
# and 29.1 dB and 0.898 in the demo (33 frames at short side 128, a scene cut among them); the floors
# leave a margin for other torch builds and CPUs, and fail a model that is merely untrained.
pytestmark = pytest.mark.e2e
PSNR_FLOOR_DB = 27.5
SSIM_FLOOR = 0.91
DEMO_PSNR_FLOOR_DB, DEMO_SSIM_FLOOR = 28.0, 0.87


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
    """The evaluation protocol on the sample, a clip of the eval split: resized to short side 256."""
    code, out, err = ivvae("reconstruct", SAMPLE, tmp_path / "r.mp4", "--metrics", "--frames", "9",
                           "--short-side", "256", "--json", "-", "-q")  # fmt: skip
    assert code == 0, err
    summary = json.loads(out)["metrics"]
    assert summary["frames"] == 9
    assert summary["psnr_db"] >= PSNR_FLOOR_DB and summary["ssim"] >= SSIM_FLOOR, summary
    info = probe(tmp_path / "r.mp4")
    assert (info.width, info.height, info.frames) == (602, 256, 9)


def readme_main_job() -> list[str]:
    """The ivvae part of README.md's first command (under "Set up"), as arguments."""
    text = (ROOT / "README.md").read_text()
    command = text.split("## Set up", 1)[1].split("```sh\n", 1)[1].split("\n", 1)[0]
    (main_job,) = [part for part in command.split(" && ") if part.startswith("ivvae ")]
    return shlex.split(main_job)


def test_the_readme_main_job_runs_with_nothing_beside_the_checkout(tmp_path):
    """README.md's first command, as a newcomer runs it: from a folder with no ../shared, with the
    installed ivvae, no published weights; then again, refused rather than overwriting."""
    here = tmp_path / "newcomer"
    here.mkdir()
    assert not (here.parent / "shared").exists()
    args = readme_main_job()
    assert args[:2] == ["ivvae", "demo"]
    command = [str(Path(sys.executable).parent / "ivvae"), *args[1:]]
    done = subprocess.run(command, cwd=here, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr
    assert "bundled small model" in done.stderr and "Traceback" not in done.stderr
    shown = done.stdout.splitlines()
    assert shown[0].strip() == "what was lost" and any(line.startswith("PSNR per frame") for line in shown)
    folder = here / "ivvae-demo"
    assert sorted(p.name for p in folder.iterdir()) == ["comparison.mp4", "metrics.json", "reconstruction.mp4"]
    width, height = resized(640, 272, 128)
    recon, side = probe(folder / "reconstruction.mp4"), probe(folder / "comparison.mp4")
    assert (recon.frames, recon.width, recon.height) == (33, width, height)
    assert (side.frames, side.width, side.height) == (33, 3 * width, height)
    summary = json.loads((folder / "metrics.json").read_text())["metrics"]
    assert summary["psnr_db"] >= DEMO_PSNR_FLOOR_DB and summary["ssim"] >= DEMO_SSIM_FLOOR, summary
    again = subprocess.run(command, cwd=here, capture_output=True, text=True, timeout=900)
    assert again.returncode == 4 and "--force" in again.stderr and "Traceback" not in again.stderr


def test_a_demo_that_cannot_run_leaves_no_folder_and_a_file_is_no_folder(tmp_path):
    code, _, err = ivvae("demo", tmp_path / "demo", "--model", "z99_dim1")
    assert code == 5 and "no weights" in err and not (tmp_path / "demo").exists()
    (tmp_path / "taken").write_text("")
    code, _, err = ivvae("demo", tmp_path / "taken")
    assert code == 4 and "not a folder" in err
