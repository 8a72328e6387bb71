"""Tiled chunking: exact when one tile covers the frame, blend weights that partition unity, caches
that can wait on disk, a budget that picks tiles, and memory that does not grow with length."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ivvae_cli.stream import StreamDecoder, StreamEncoder, Tiling, plan_tiling

from .media import make_clip


def _encode(model, video, tiling):
    stream = StreamEncoder(model, tiling=tiling, groups_per_step=2)
    return torch.cat([stream.push(video), stream.finish()], dim=2)


def _decode(model, latent, tiling):
    stream = StreamDecoder(model, tiling=tiling)
    return torch.cat([stream.push(latent), stream.finish()], dim=2)


@pytest.fixture(scope="module")
def clip():
    torch.manual_seed(7)
    return torch.rand(1, 3, 9, 48, 80) * 2 - 1


def test_a_tile_covering_the_frame_is_the_untiled_model(small_model, clip):
    with torch.inference_mode():
        latent = _encode(small_model, clip, None)
        assert torch.equal(_encode(small_model, clip, Tiling(tile=10, overlap=2)), latent)
        assert torch.equal(_decode(small_model, latent, Tiling(tile=10, overlap=2)), _decode(small_model, latent, None))


def test_offloaded_caches_change_nothing(small_model, clip):
    with torch.inference_mode():
        tiling = Tiling(tile=4, overlap=1)
        on_disk = Tiling(tile=4, overlap=1, offload=True)
        latent = _encode(small_model, clip, tiling)
        assert not torch.equal(latent, _encode(small_model, clip, None))  # really tiled
        assert torch.equal(_encode(small_model, clip, on_disk), latent)
        assert torch.equal(_decode(small_model, latent, on_disk), _decode(small_model, latent, tiling))


def test_tiled_streams_are_invariant_to_chunking(small_model, clip):
    tiling = Tiling(tile=4, overlap=2)
    with torch.inference_mode():
        whole = _encode(small_model, clip, tiling)
        stream = StreamEncoder(small_model, tiling=tiling)
        parts = [stream.push(clip[:, :, a:b]) for a, b in ((0, 2), (2, 7), (7, 9))] + [stream.finish()]
        torch.testing.assert_close(torch.cat(parts, dim=2), whole, atol=1e-5, rtol=0)


@settings(max_examples=200, deadline=None)
@given(
    length=st.integers(1, 300),
    tile=st.integers(1, 64),
    overlap_share=st.floats(0, 0.99),
    scale=st.sampled_from([1, 8]),
)
def test_blend_weights_sum_to_one_everywhere(length, tile, overlap_share, scale):
    tiling = Tiling(tile=tile, overlap=int(overlap_share * tile))
    spans = tiling.spans(length)
    assert spans[0][0] == 0 and spans[-1][1] == length
    assert all(b - a == min(tile, length) for a, b in spans)
    total = torch.zeros(length * scale, dtype=torch.float64)
    for (a, b), w in zip(spans, tiling.weights(length, scale), strict=True):
        assert w.shape == ((b - a) * scale,) and bool((w > 0).all())
        total[a * scale : b * scale] += w.double()
    torch.testing.assert_close(total, torch.ones_like(total), atol=1e-6, rtol=0)


def test_budget_chooses_tiling():
    gib = 2**30
    untiled = plan_tiling(8, 256, 256, frames_per_step=4, budget=4 * gib, direction="decode")
    assert untiled == Tiling()
    uhd = plan_tiling(8, 2160, 3840, frames_per_step=4, budget=3 * gib, direction="decode")
    assert uhd.tile is not None and uhd.offload
    assert plan_tiling(8, 720, 1280, frames_per_step=4, budget=2 * gib, direction="encode").tile is not None
    forced = plan_tiling(8, 256, 256, frames_per_step=4, budget=4 * gib, direction="encode", tile=16, overlap=4)
    assert (forced.tile, forced.overlap, forced.offload) == (16, 4, False)
    with pytest.raises(ValueError, match="overlap"):
        Tiling(tile=8, overlap=8)


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
