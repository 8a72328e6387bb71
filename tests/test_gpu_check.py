"""benchmarks/gpu_check.py's smoke mode: every part's code path at tiny sizes on the CPU, so that the
check works the first time a GPU is lent; each part reports figures or why it has none."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import SHARED

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"
AUTHORS = ROOT / ".authors" / "iv-vae"  # the authors' code, in an ignored folder where a developer put it
PARTS = ["env", "parity", "dtype", "drift", "speed", "their_setting", "large_decode", "dataset", "compile"]
# The script as the device machine runs it: without PyAV (ivvae_cli imports it lazily).
WITHOUT_PYAV = (
    "import runpy, sys; sys.modules['av'] = None; sys.argv = sys.argv[1:]; "
    "sys.path.insert(0, sys.argv[0].rsplit('/', 1)[0]); runpy.run_path(sys.argv[0], run_name='__main__')"
)


def _check(tmp_path: Path, *args: str, prefix: tuple[str, ...] = ()) -> dict:
    out = tmp_path / "out"
    # --data: an empty folder, so that frames or clips a developer prepared for a GPU run stay out of it.
    command = [sys.executable, *prefix, str(SCRIPT), "--smoke", "--out", str(out), "--data", str(tmp_path), *args]
    done = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((out / "gpu_check.json").read_text())
    markdown = (out / "gpu_check.md").read_text()
    assert all(f"## {name}:" in markdown for name in report["parts"])
    return report


def test_smoke_runs_every_part(tmp_path):
    authors = ["--authors-code", str(AUTHORS)] if AUTHORS.is_dir() else []
    report = _check(tmp_path, *authors)
    parts = report["parts"]
    assert list(parts) == PARTS
    for name, part in parts.items():
        assert part["rows"] or part["reason"], name
        # A bare clone has no parity vectors or clips: those parts say so; everything else runs.
        needs_shared = name in ("parity", "dtype", "drift", "dataset")
        assert part["status"] == ("skipped" if needs_shared and not SHARED.is_dir() else "ok"), (name, part)
    assert all(r["within_1e_4"] for r in parts["parity"]["rows"] if r["dtype"] == "float32")
    assert all(r["decode_psnr_db"] > 30 for r in parts["parity"]["rows"] if r["dtype"] == "bfloat16")
    assert all(r["loss_db"] < 0.5 for r in parts["dtype"]["rows"])
    drift = parts["drift"]["rows"]
    assert [r["model"] for r in drift] == (["bundled", "z16_dim8-random"] if SHARED.is_dir() else [])
    assert all(r["frames"] == 9 and r["psnr_decode_bf16_first"] > 30 for r in drift)
    theirs = [r for r in parts["speed"]["rows"] if r["path"] == "authors"]
    assert theirs and all(("steady_s" in r) == bool(authors) for r in theirs)
    assert all("skipped" in r for r in theirs) != bool(authors)
    assert {r["size"] for r in parts["large_decode"]["rows"]} == {"1080p", "4K"}
    assert any("tiles" in r["tiling"] for r in parts["large_decode"]["rows"])  # the budget made one tile
    assert all(r["clips"] > 0 and r["failed"] == 0 for r in parts["dataset"]["rows"])
    assert parts["compile"]["rows"][0]["max_abs_diff_vs_eager"] == 0  # dynamo alone changes no arithmetic
    assert report["verdicts"]


def test_without_pyav_the_dataset_part_says_why(tmp_path):
    report = _check(tmp_path, "--parts", "env,large_decode,dataset", prefix=("-c", WITHOUT_PYAV))
    parts = report["parts"]
    assert parts["env"]["rows"][0]["pyav"] is None
    assert parts["large_decode"]["status"] == "ok"
    assert parts["dataset"]["status"] == "skipped" and "PyAV" in parts["dataset"]["reason"]
