"""Faults that lose nothing (issue 45): a disk that fills up mid-job and a read-only output folder,
each on a real filesystem (a small tmpfs mounted in a user and mount namespace of the test's own,
which vanishes with it)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ivvae_cli.latent_file import read_latent_file

from .media import make_clip
from .test_dataset import index, ivvae, partials

IVVAE = f"{sys.executable} -m ivvae_cli"


def _can_mount() -> bool:
    if shutil.which("unshare") is None:
        return False
    return subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode == 0


needs_mount = pytest.mark.skipif(not _can_mount(), reason="needs a user and mount namespace (unshare -rm)")


def in_namespace(script: str, mount: Path) -> subprocess.CompletedProcess:
    """Run ``script`` (bash) in a mount namespace where it may mount a tmpfs on ``mount``."""
    mount.mkdir(exist_ok=True)
    return subprocess.run(
        ["unshare", "--user", "--map-root-user", "--mount", "bash", "-c", script],
        capture_output=True, text=True, timeout=540, env=os.environ | {"OMP_NUM_THREADS": "1"},
    )  # fmt: skip


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> Path:
    """Eight small clips."""
    folder = tmp_path_factory.mktemp("clips")
    for i in range(8):
        make_clip(folder / f"c{i}.mkv", 5, 96, 48, codec="ffv1", pix_fmt="bgr0")
    return folder


def _read(path: Path) -> str:
    return path.read_text() if path.exists() else ""


@pytest.mark.e2e
@pytest.mark.timeout(600)
@needs_mount
def test_a_full_disk_stops_the_job_in_one_line_and_the_same_command_resumes(tmp_path, clips, checkpoint):
    args = f"dataset encode {clips} {{out}} -w {checkpoint} --frames 5 -q --workers 1"
    straight = tmp_path / "straight"
    code = subprocess.run(f"{IVVAE} {args.format(out=straight)}", shell=True, env=os.environ | {"OMP_NUM_THREADS": "1"})
    assert code.returncode == 0
    need = sum(p.stat().st_size for p in straight.rglob("*") if p.is_file())
    mount, logs = tmp_path / "disk", tmp_path / "logs"
    logs.mkdir()
    out = mount / "out"
    script = f"""
        mount -t tmpfs -o size={need // 2 // 1024}k tmpfs {mount}
        {IVVAE} {args.format(out=out)} 2> {logs}/first.err; echo $? > {logs}/first.rc
        find {out} -type f | sort > {logs}/first.files
        mount -o remount,size=64m {mount}
        {IVVAE} {args.format(out=out)} 2> {logs}/second.err; echo $? > {logs}/second.rc
        cp -a {out} {tmp_path}/resumed
    """
    run = in_namespace(script, mount)
    assert run.returncode == 0, run.stderr
    first = _read(logs / "first.err")
    assert _read(logs / "first.rc").strip() == "4", first
    assert len(first.strip().splitlines()) == 1 and "No space left on device" in first, first
    files = _read(logs / "first.files").splitlines()
    latents = [f for f in files if f.endswith(".latent")]
    assert 0 < len(latents) < 8, "the disk filled too early or too late to test"
    assert not [f for f in files if ".partial" in Path(f).name], files
    for name in latents:  # what the full disk left is whole: the second run keeps it
        assert name.replace(str(out), str(tmp_path / "resumed")) in {str(p) for p in (tmp_path / "resumed").rglob("*")}
    assert _read(logs / "second.rc").strip() == "0", _read(logs / "second.err")
    resumed = tmp_path / "resumed"
    assert index(resumed) == index(straight)
    for row in index(straight):
        a, b = (read_latent_file(folder / row["latent"]).latent for folder in (resumed, straight))
        assert torch.equal(a, b)
    assert partials(resumed) == []


@pytest.mark.e2e
@pytest.mark.timeout(600)
@needs_mount
def test_a_read_only_output_folder_is_refused_in_one_line_before_the_model_loads(tmp_path, clips, checkpoint):
    latent = tmp_path / "c0.latent"
    assert ivvae("encode", clips / "c0.mkv", latent, "-w", checkpoint, "-q")[0] == 0
    mount, logs = tmp_path / "ro", tmp_path / "logs"
    logs.mkdir()
    commands = {
        "dataset": f"dataset encode {clips} {mount}/out -w {checkpoint} --frames 5",
        "dataset-new": f"dataset encode {clips} {mount}/new/out -w {checkpoint} --frames 5",
        "encode": f"encode {clips}/c0.mkv {mount}/out/c0.latent -w {checkpoint}",
        "decode": f"decode {latent} {mount}/out/c0.mp4 -w {checkpoint}",
        "decode-folder": f"decode {tmp_path} {mount}/out/videos -w {checkpoint}",
    }
    script = f"mount -t tmpfs tmpfs {mount} && mkdir -p {mount}/out {mount}/new && mount -o remount,ro {mount}\n"
    script += "".join(f"{IVVAE} {c} 2> {logs}/{k}.err; echo $? > {logs}/{k}.rc\n" for k, c in commands.items())
    run = in_namespace(script, mount)
    assert run.returncode == 0, run.stderr
    for name in commands:
        err = _read(logs / f"{name}.err")
        assert _read(logs / f"{name}.rc").strip() == "4", (name, err)
        assert len(err.strip().splitlines()) == 1 and "Read-only file system" in err, (name, err)
        assert "model " not in err, (name, err)  # said before any model was loaded
