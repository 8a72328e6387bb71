"""The streaming engine: one contract over dtype, frame groups per step, tiling and offloaded caches;
exact when one tile covers the frame; blend weights that partition unity; a budget that picks tiles."""

from __future__ import annotations

import copy
import itertools
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ivvae_cli.model import VideoSize
from ivvae_cli.stream import StreamDecoder, StreamEncoder, Tiling, decode, encode, plan_tiling


@pytest.fixture(scope="module")
def clip():
    torch.manual_seed(7)
    return torch.rand(2, 3, 9, 48, 80) * 2 - 1  # two videos in a batch


def _pushed(stream, x: torch.Tensor, cuts: list[int]) -> torch.Tensor:
    """Push ``x`` in chunks cut along time at ``cuts``, then finish."""
    bounds = [0, *cuts, x.shape[2]]
    parts = [stream.push(x[:, :, a:b]) for a, b in itertools.pairwise(bounds)]
    return torch.cat([*parts, stream.finish()], dim=2)


TILINGS = {"untiled": None, "tiled": Tiling(tile=4, overlap=1), "offloaded": Tiling(tile=4, overlap=1, offload=True)}


@pytest.mark.parametrize("tiling", list(TILINGS))
@pytest.mark.parametrize("groups_per_step", [1, 2, 7])
@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.float32, 1e-5), (torch.bfloat16, 0.05)])
def test_stream_contract(small_model, clip, dtype, tolerance, groups_per_step, tiling):
    """Whatever the dtype, step size, tiling and cache offload, pushing uneven chunks gives what one
    float32 pass of one group a step gives with the same tiles: exactly for offloading, to float32
    rounding for step size and chunking, and within bfloat16's error (relative RMS) for the dtype."""
    tiles = TILINGS[tiling]
    model = copy.deepcopy(small_model).to(dtype)
    with torch.inference_mode():
        encoder = StreamEncoder(model, groups_per_step=groups_per_step, tiling=tiles)
        latent = _pushed(encoder, clip.to(dtype), [2, 3, 7]).float()
        decoder = StreamDecoder(model, size=(9, 48, 80), groups_per_step=groups_per_step, tiling=tiles)
        frames = _pushed(decoder, latent.to(dtype), [1, 2]).float()
    with torch.inference_mode():
        plain_tiles = Tiling(tiles.tile, tiles.overlap) if tiles else None
        reference = encode(small_model, clip, tiling=plain_tiles)
        reference_frames = decode(small_model, reference, size=(9, 48, 80), tiling=plain_tiles)
    assert latent.shape == (2, small_model.z_dim, 3, 6, 10) and frames.shape == clip.shape
    for name, ours, ref in (("latent", latent, reference), ("frames", frames, reference_frames)):
        if dtype == torch.float32:
            torch.testing.assert_close(ours, ref, atol=tolerance, rtol=0, msg=name)
        else:
            error = ((ours - ref).norm() / ref.norm()).item()
            assert error <= tolerance, f"{name}: relative error {error:.2e}"


def test_offloaded_caches_change_nothing(small_model, clip):
    with torch.inference_mode():
        latent = encode(small_model, clip, tiling=TILINGS["tiled"], groups_per_step=2)
        assert not torch.equal(latent, encode(small_model, clip, groups_per_step=2))  # really tiled
        assert torch.equal(encode(small_model, clip, tiling=TILINGS["offloaded"], groups_per_step=2), latent)
        on_disk = decode(small_model, latent, tiling=TILINGS["offloaded"])
        assert torch.equal(on_disk, decode(small_model, latent, tiling=TILINGS["tiled"]))


def test_a_tile_covering_the_frame_is_the_untiled_model(small_model, clip):
    with torch.inference_mode():
        latent = encode(small_model, clip, groups_per_step=2)
        assert torch.equal(encode(small_model, clip, tiling=Tiling(tile=10, overlap=2), groups_per_step=2), latent)
        assert torch.equal(decode(small_model, latent, tiling=Tiling(tile=10, overlap=2)), decode(small_model, latent))


def test_sampling_is_seeded_and_independent_of_step_size(small_model):
    video = torch.rand(1, 3, 9, 16, 16) * 2 - 1
    with torch.no_grad():
        mean = encode(small_model, video)
        a = encode(small_model, video, sample=True, generator=torch.Generator().manual_seed(5))
        b = encode(small_model, video, sample=True, generator=torch.Generator().manual_seed(5), groups_per_step=2)
        c = encode(small_model, video, sample=True, generator=torch.Generator().manual_seed(6))
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    assert (a - mean).abs().max() > 1e-3
    assert (a - c).abs().max() > 1e-3


def test_bad_arguments_are_explained(small_model):
    with pytest.raises(ValueError, match="colour channels"):
        encode(small_model, torch.zeros(1, 1, 1, 8, 8))
    with pytest.raises(ValueError, match="channels"):
        decode(small_model, torch.zeros(1, 3, 1, 1, 1))
    with pytest.raises(ValueError, match="fewer than"):
        decode(small_model, torch.zeros(1, small_model.z_dim, 2, 1, 1), size=(9, 8, 8))
    with pytest.raises(ValueError, match="no frames"):
        StreamEncoder(small_model).finish()
    with pytest.raises(ValueError, match="groups_per_step"):
        StreamDecoder(small_model, groups_per_step=0)


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


def test_the_readme_library_example_runs(monkeypatch, tmp_path):
    """The README's Python example, as a user would paste it (the default model: the bundled one here)."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    example = readme.split("```python\n", 1)[1].split("```", 1)[0]
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.delenv("IVVAE_WEIGHTS", raising=False)
    monkeypatch.chdir(tmp_path)
    exec(compile(example, "README.md", "exec"), {})


def test_decode_takes_a_video_size(small_model, clip):
    """``size`` is a ``VideoSize`` or a tuple, as its type says."""
    with torch.inference_mode():
        latent = encode(small_model, clip[:, :, :6, :45, :77])
        as_tuple = decode(small_model, latent, size=(6, 45, 77))
        assert as_tuple.shape[2:] == (6, 45, 77)
        assert torch.equal(decode(small_model, latent, size=VideoSize(6, 45, 77)), as_tuple)
