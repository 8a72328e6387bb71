"""Faults that lose nothing (issue 45): a disk that fills up mid-job and a read-only output folder,
each on a real filesystem (a small tmpfs mounted in a user and mount namespace of the test's own,
which vanishes with it)."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ivvae_cli.dataset import LatentDataset
from ivvae_cli.errors import InputError
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


@pytest.mark.e2e
def test_torn_records_clips_index_and_description_are_redone_or_refused_in_one_line(tmp_path, clips, checkpoint):
    """What a crash on a network filesystem can leave (a file renamed into place before its bytes
    reached the server): each is found, and the same command puts the folder right."""
    straight, out = tmp_path / "straight", tmp_path / "out"
    args = [clips, "-w", checkpoint, "--frames", "5", "-q", "--workers", "0"]
    assert ivvae("dataset", "encode", args[0], straight, *args[1:])[0] == 0
    shutil.copytree(straight, out)
    records = out / "records"
    (records / "c0.mkv.json").write_bytes((records / "c0.mkv.json").read_bytes()[:40])
    fingerprint = json.loads((records / "c1.mkv.json").read_text())["fingerprint"]
    (records / "c1.mkv.json").write_text(json.dumps({"fingerprint": fingerprint, "rows": "x", "skipped": None}))
    climbing = {"fingerprint": fingerprint, "rows": [{"latent": "../../../etc/passwd"}], "skipped": None}
    (records / "c2.mkv.json").write_text(json.dumps(climbing))
    torn = out / "latents" / "c3.mkv" / "f0000000-0000005.latent"
    torn.write_bytes(torn.read_bytes()[:-64])
    (out / "latents" / "c4.mkv" / "f0000000-0000005.latent").unlink()
    lines = (out / "index.jsonl").read_bytes()
    (out / "index.jsonl").write_bytes(lines[: lines.index(b"\n") + 40])  # cut in its second line
    (out / "dataset.json").write_bytes((out / "dataset.json").read_bytes()[:50])

    with pytest.raises(InputError, match=r"index.jsonl is damaged at line 2: `ivvae dataset merge"):
        LatentDataset(out)
    code, _, err = ivvae("dataset", "merge", out)
    assert code == 3 and len(err.strip().splitlines()) == 1, err
    assert "dataset.json is cut short or garbled" in err and "run the encode command again" in err, err

    code, report, err = ivvae("dataset", "encode", args[0], out, *args[1:3], "--frames", "5", "--json", "-")
    assert code == 0, err
    assert "dataset.json is cut short or garbled (JSONDecodeError): written anew" in err
    report = json.loads(report)
    assert (report["clips_existing"], report["clips_written"]) == (3, 2)  # c0-c2 read again, c3 and c4 made again
    assert index(out) == index(straight)
    for row in index(straight):
        a, b = (read_latent_file(folder / row["latent"]).latent for folder in (out, straight))
        assert torch.equal(a, b)
    assert len(LatentDataset(out)) == 8 and partials(out) == []

    (out / "dataset.json").write_text(json.dumps({"format": "ivvae-dataset", "options": 3}))
    code, _, err = ivvae("dataset", "merge", out)
    assert code == 3 and "garbled (TypeError)" in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.e2e
@pytest.mark.timeout(600)
def test_a_second_job_on_a_busy_folder_is_refused_and_a_dead_one_holds_nothing(tmp_path, checkpoint):
    for i in range(6):
        make_clip(tmp_path / f"long{i}.mkv", 97, 96, 48, codec="ffv1", pix_fmt="bgr0")
    out = tmp_path / "out"
    command = [sys.executable, "-m", "ivvae_cli", "dataset", "encode", str(tmp_path), str(out), "-w", str(checkpoint),
               "--clips", "chunk", "--frames", "5", "--workers", "1"]  # fmt: skip
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    first = subprocess.Popen([*command, "-q"], env=env, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not list(out.rglob("*.latent")) and time.time() < deadline and first.poll() is None:
            time.sleep(0.05)
        for extra in ([], ["--frames", "9"]):  # the same settings, and others
            second = subprocess.run([*command, *extra], env=env, capture_output=True, text=True, timeout=120)
            err = second.stderr
            assert second.returncode == 4 and len(err.strip().splitlines()) == 1, err
            assert "is being written by another job" in err and "model " not in err, err
        assert first.poll() is None, "the first job ended too early to test"
    finally:
        first.kill()
        first.communicate(timeout=60)
    assert first.returncode == -signal.SIGKILL
    assert 0 < len(list(out.rglob("*.latent"))) < 6 * 19
    again = subprocess.run([*command, "-q"], env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr  # the dead job's lock went with it
    assert len(index(out)) == 6 * 19 and partials(out) == []


@pytest.mark.e2e
@pytest.mark.timeout(900)
def test_killed_at_random_moments_again_and_again_then_run_once_more_gives_an_unstopped_run(tmp_path, checkpoint):
    """SIGKILL to the whole process group (the job and its decoding workers, as when a node dies),
    once while it starts and three times at random moments of its work, each run resuming the
    last; then a run to the end."""
    for i in range(8):
        make_clip(tmp_path / f"v{i}.mkv", 37, 96, 48, codec="ffv1", pix_fmt="bgr0")
    (tmp_path / "broken.mp4").write_bytes(b"\0" * 5000)  # a source that fails: errors.jsonl is compared too
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    total = 8 * 4

    def command(out: Path) -> list[str]:
        return [sys.executable, "-m", "ivvae_cli", "dataset", "encode", str(tmp_path), str(out), "-w", str(checkpoint),
                "--clips", "chunk", "--frames", "9", "--workers", "1", "-q", "--max-errors", "1"]  # fmt: skip

    assert subprocess.run(command(tmp_path / "straight"), env=env, timeout=300).returncode == 0
    out, chance = tmp_path / "killed", random.Random(45)
    targets = sorted(chance.sample(range(1, total), 3))
    for target in [0, *targets]:  # 0: while it starts, at a random moment
        run = subprocess.Popen(command(out), env=env, start_new_session=True, stderr=subprocess.DEVNULL)
        deadline = time.time() + (chance.uniform(0.2, 2.5) if target == 0 else 300)
        while time.time() < deadline and run.poll() is None and len(list(out.rglob("*.latent"))) < max(target, 1):
            time.sleep(0.01)
        time.sleep(chance.uniform(0, 0.2))
        assert run.poll() is None, "the run ended before it could be killed"
        os.killpg(run.pid, signal.SIGKILL)
        run.wait(timeout=60)
    assert 0 < len(list(out.rglob("*.latent"))) < total
    assert subprocess.run(command(out), env=env, timeout=300).returncode == 0

    def files(folder: Path) -> list[str]:
        return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())

    assert files(out) == files(tmp_path / "straight")  # no partial file, nothing more, nothing less
    assert index(out) == index(tmp_path / "straight") and len(index(out)) == total
    assert (out / "errors.jsonl").read_text() == (tmp_path / "straight" / "errors.jsonl").read_text()
    for row in index(out):
        a, b = (read_latent_file(folder / row["latent"]).latent for folder in (out, tmp_path / "straight"))
        assert torch.equal(a, b)
