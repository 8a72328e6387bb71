"""Memory end to end: the command records the tiling a budget chose, and a process's peak memory
does not grow with the number of frames."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from .media import make_clip

pytestmark = pytest.mark.e2e


def test_cli_records_the_tiling(tmp_path, checkpoint):
    from typer.testing import CliRunner

    from ivvae_cli.cli import app

    make_clip(tmp_path / "in.mp4", 5, 160, 96)
    args = ["encode", str(tmp_path / "in.mp4"), str(tmp_path / "a.latent"), "-w", str(checkpoint), "-q"]
    result = CliRunner().invoke(app, [*args, "--tile-size", "4", "--tile-overlap", "1", "--json", "-"])
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["tiling"] == {
        "tiled": True,
        "tile": 4,
        "overlap": 1,
        "tiles": [4, 7],
        "offload": False,
    }
    result = CliRunner().invoke(app, [*args, "--force", "--max-memory", "1KB", "--json", "-"])
    assert result.exit_code == 0, result.stderr
    tiling = json.loads(result.stdout)["tiling"]
    assert tiling["tiled"] and tiling["offload"]
    result = CliRunner().invoke(app, [*args, "--force", "--max-memory", "lots"])
    assert result.exit_code == 1 and "not a size" in result.stderr


def _peak_rss_of(args: list[str]) -> int:
    """Peak RSS in bytes of a fresh process running ``ivvae`` with ``args``."""
    code = (
        "import resource, sys\n"
        "from ivvae_cli.cli import app\n"
        "try:\n    app(sys.argv[1:], standalone_mode=False)\n"
        "finally:\n    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)\n"
    )
    result = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, check=True)
    return int(result.stdout.strip().splitlines()[-1])


def test_memory_does_not_grow_with_length(tmp_path, checkpoint):
    for frames in (17, 129):
        make_clip(tmp_path / f"{frames}.mkv", frames, 160, 120, codec="ffv1", pix_fmt="bgr0")
    peaks = {
        frames: _peak_rss_of(
            [
                "reconstruct",
                str(tmp_path / f"{frames}.mkv"),
                str(tmp_path / f"{frames}.mp4"),
                "-w",
                str(checkpoint),
                "-q",
            ]
        )
        for frames in (17, 129)
    }
    # A generous margin keeps this from being flaky; benchmarks/bench_memory.py has the tight figure.
    assert peaks[129] < 1.25 * peaks[17], peaks
