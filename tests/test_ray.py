"""The Ray engine on a local Ray, on the CPU: the same dataset as the plain engine."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ivvae_cli.dataset import LatentDataset

from .media import make_clip
from .test_dataset import index, ivvae, located, partials

ray = pytest.importorskip("ray")

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray for the module's jobs (each job joins it rather than starting its own)."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> Path:
    """Four small videos, a text file and a missing path."""
    folder = tmp_path_factory.mktemp("ray")
    for i in range(4):
        make_clip(folder / f"v{i}.mkv", 19, 96, 48, codec="ffv1", pix_fmt="bgr0")
    (folder / "notes.txt").write_text("not a video\n" * 50)
    names = [*(f"v{i}.mkv" for i in range(4)), "notes.txt", "gone.mp4"]
    (folder / "m.csv").write_text("path,caption\n" + "".join(f"{n},clip {i}\n" for i, n in enumerate(names)))
    return folder / "m.csv"


ARGS = ["--clips", "chunk", "--frames", "9", "-q", "--max-errors", "2"]


@pytest.mark.parametrize("layout", ["files", "shards"])
def test_the_ray_engine_makes_what_the_plain_engine_makes(tmp_path, manifest, checkpoint, local_ray, layout):
    outs = {}
    for engine in ("plain", "ray"):
        out = outs[engine] = tmp_path / engine
        code, report, err = ivvae("dataset", "encode", manifest, out, "-w", checkpoint, *ARGS, "--layout", layout,
                                  "--engine", engine, "--json", "-")  # fmt: skip
        assert code == 0, err
        assert json.loads(report)["clips_written"] == 8
    assert located(index(outs["ray"])) == located(index(outs["plain"]))
    errors = [(tmp_path / e / "errors.jsonl").read_text() for e in outs]
    assert errors[0] == errors[1] and errors[0].count("\n") == 2
    for a, b in zip(LatentDataset(outs["ray"]), LatentDataset(outs["plain"]), strict=True):
        assert torch.equal(a["latent"], b["latent"])
    assert partials(outs["ray"]) == []


def test_an_encoding_actor_killed_mid_job_has_its_work_done_again(tmp_path, manifest, checkpoint):
    out = tmp_path / "out"
    command = [sys.executable, "-m", "ivvae_cli", "dataset", "encode", str(manifest), str(out), "-w", str(checkpoint),
               *ARGS, "--engine", "ray", "--ray-address", "local"]  # fmt: skip
    proc = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not list(out.rglob("*.latent")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    killed = subprocess.run(["pkill", "-9", "-f", r"MapWorker\(MapBatches"], check=False).returncode == 0
    _, err = proc.communicate(timeout=600)
    assert killed and proc.returncode == 0, err
    plain = tmp_path / "plain"
    assert ivvae("dataset", "encode", manifest, plain, "-w", checkpoint, *ARGS)[0] == 0
    assert located(index(out)) == located(index(plain)) and len(list(out.rglob("*.latent"))) == 8
    for a, b in zip(LatentDataset(out), LatentDataset(plain), strict=True):
        assert torch.equal(a["latent"], b["latent"])
    assert partials(out) == []


def test_a_job_begun_by_one_engine_is_finished_by_the_other(tmp_path, manifest, checkpoint, local_ray):
    rows = manifest.read_text().splitlines()
    part = tmp_path / "part.csv"
    part.write_text("\n".join(rows[:3]) + "\n")
    (tmp_path / "all.csv").write_text("\n".join(rows) + "\n")
    for name in ("v0.mkv", "v1.mkv", "v2.mkv", "v3.mkv", "notes.txt"):
        (tmp_path / name).symlink_to(manifest.parent / name)
    out = tmp_path / "out"
    args = ["-w", checkpoint, *ARGS, "--layout", "shards"]
    assert ivvae("dataset", "encode", part, out, *args, "--engine", "ray")[0] == 0
    code, report, err = ivvae("dataset", "encode", tmp_path / "all.csv", out, *args, "--engine", "plain", "--json", "-")
    assert code == 0 and json.loads(report)["clips_written"] == 4, err  # v2 and v3, two clips each
    straight = tmp_path / "straight"
    assert ivvae("dataset", "encode", tmp_path / "all.csv", straight, *args)[0] == 0
    assert located(index(out)) == located(index(straight))


def test_without_ray_the_engine_says_how_to_get_it(tmp_path, manifest, checkpoint):
    hide = "import sys; sys.modules['ray'] = None; from ivvae_cli.cli import app; app()"
    run = subprocess.run(
        [sys.executable, "-c", hide, "dataset", "encode", str(manifest), str(tmp_path / "out"), "-w", str(checkpoint),
         "--engine", "ray"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode != 0 and "Traceback" not in run.stderr, run.stderr
    assert run.stderr.strip().splitlines() == ["error: --engine ray needs Ray Data: pip install 'ivvae-cli[ray]'"]
    assert not (tmp_path / "out").exists()
