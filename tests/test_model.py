"""The model is the authors' function: parity vectors, published shapes, streaming, padding."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from ivvae_cli.layers import CausalCache
from ivvae_cli.model import IVVAE
from ivvae_cli.stream import StreamDecoder, StreamEncoder, VideoSize
from ivvae_cli.train import encode_clip

from .conftest import REFERENCE

GOLDEN = sorted(REFERENCE.glob("golden_*.safetensors"))
TOLERANCE = 1e-4


def test_reference_cases_present():
    assert len(GOLDEN) >= 3, f"parity vectors missing under {REFERENCE}"


@pytest.mark.parametrize("path", GOLDEN, ids=lambda p: p.stem)
def test_parity_with_reference(path):
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    tensors = load_file(str(path))
    state = {k.removeprefix("state."): v for k, v in tensors.items() if k.startswith("state.")}
    model = IVVAE(int(meta["z_dim"]), int(meta["dim"]), float(meta["scale_factor"]), float(meta["shift_factor"]))
    model.load_state_dict(state, strict=True)
    model.eval()
    video = tensors["input"]
    with torch.no_grad():
        cache = CausalCache()
        frames = video.transpose(1, 2)
        steps = [model.encode_step(frames[:, :1], cache)]
        if frames.shape[1] > 1:
            steps.append(model.encode_step(frames[:, 1:], cache))
        mu = torch.cat([s[0] for s in steps], dim=1).transpose(1, 2)
        logvar = torch.cat([s[1] for s in steps], dim=1).transpose(1, 2)
        latent = model.encode(video)
        decoded = model.decode(tensors["latent"])
    for name, ours in (("mu", mu), ("logvar", logvar), ("latent", latent), ("decoded", decoded)):
        ref = tensors[name]
        assert ours.shape == ref.shape, name
        err = (ours - ref).abs().max().item()
        assert err <= TOLERANCE, f"{name}: max abs error {err:.2e}"


@pytest.mark.parametrize("path", GOLDEN, ids=lambda p: p.stem)
def test_training_path_matches_reference(path):
    """With autograd recording, the layers sum out of place: the same outputs, and gradients flow."""
    model, tensors = _golden(path.stem)
    mu, logvar = encode_clip(model, tensors["input"].transpose(1, 2))
    latent = tensors["latent"].transpose(1, 2)
    cache = CausalCache()
    decoded = torch.cat([model.decode_step(latent[:, :1], cache), model.decode_step(latent[:, 1:], cache)], dim=1)
    assert decoded.requires_grad
    for name, ours in (("mu", mu), ("logvar", logvar), ("decoded", decoded)):
        err = (ours.detach().transpose(1, 2) - tensors[name]).abs().max().item()
        assert err <= TOLERANCE, f"{name}: max abs error {err:.2e}"
    decoded.square().mean().backward()
    assert all(p.grad is not None and p.grad.isfinite().all() for p in model.decoder.parameters())


def _golden(name: str) -> tuple[IVVAE, dict[str, torch.Tensor]]:
    path = REFERENCE / f"{name}.safetensors"
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    tensors = load_file(str(path))
    model = IVVAE(int(meta["z_dim"]), int(meta["dim"]), float(meta["scale_factor"]), float(meta["shift_factor"]))
    model.load_state_dict({k.removeprefix("state."): v for k, v in tensors.items() if k.startswith("state.")})
    return model.eval(), tensors


@pytest.mark.parametrize(
    ("dtype", "groups_per_step", "tolerance"),
    [(torch.float32, 1, TOLERANCE), (torch.float32, 2, TOLERANCE), (torch.bfloat16, 1, 0.05), (torch.float16, 2, 5e-3)],
)
def test_every_option_gives_the_same_shapes_and_close_values(dtype, groups_per_step, tolerance):
    """Reduced precision and chunking against the reference vectors (relative RMS error)."""
    model, tensors = _golden("golden_z16_dim8_t9")
    model = model.to(dtype)
    with torch.inference_mode():
        latent = model.encode(tensors["input"].to(dtype), groups_per_step=groups_per_step).float()
        decoded = model.decode(tensors["latent"].to(dtype), groups_per_step=groups_per_step).float()
    for name, ours in (("latent", latent), ("decoded", decoded)):
        ref = tensors[name]
        assert ours.shape == ref.shape and ours.isfinite().all(), name
        error = ((ours - ref).norm() / ref.norm()).item()
        assert error <= tolerance, f"{dtype} {name}: relative error {error:.2e}"


VARIANTS = json.loads((REFERENCE / "official_variants.json").read_text())


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_published_names_and_shapes(name):
    spec = VARIANTS[name]
    with torch.device("meta"):
        model = IVVAE(spec["z_dim"], spec["dim"], spec["scale_factor"], spec["shift_factor"])
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert ours == {k: list(v) for k, v in spec["keys"].items()}
    assert sum(p.numel() for p in model.parameters()) == spec["params"]


@pytest.mark.parametrize("groups_per_step", [2, 3, 7])
def test_groups_per_step_does_not_change_result(small_model, groups_per_step):
    torch.manual_seed(1)
    video = torch.rand(1, 3, 21, 16, 24) * 2 - 1
    with torch.no_grad():
        base = small_model.encode(video)
        other = small_model.encode(video, groups_per_step=groups_per_step)
        torch.testing.assert_close(other, base, atol=1e-5, rtol=0)
        frames = small_model.decode(base)
        torch.testing.assert_close(small_model.decode(base, groups_per_step=groups_per_step), frames, atol=1e-5, rtol=0)


def test_pushing_uneven_chunks_equals_one_pass(small_model):
    torch.manual_seed(2)
    video = torch.rand(2, 3, 14, 16, 16) * 2 - 1
    with torch.no_grad():
        whole = small_model.encode(video)
        stream = StreamEncoder(small_model, groups_per_step=2)
        parts = [stream.push(video[:, :, a:b]) for a, b in ((0, 3), (3, 4), (4, 4), (4, 13), (13, 14))]
        parts.append(stream.finish())
        torch.testing.assert_close(torch.cat(parts, dim=2), whole, atol=1e-5, rtol=0)

        decoder = StreamDecoder(small_model, size=(14, 16, 16))
        frames = [decoder.push(whole[:, :, i : i + 1]) for i in range(whole.shape[2])]
        frames.append(decoder.finish())
        torch.testing.assert_close(torch.cat(frames, dim=2), small_model.decode(whole, size=(14, 16, 16)))


@pytest.mark.parametrize("frames", [1, 2, 3, 6, 7])
def test_padding_gives_back_the_exact_size(small_model, frames):
    torch.manual_seed(3)
    height, width = 13, 21
    video = torch.rand(1, 3, frames, height, width) * 2 - 1
    with torch.no_grad():
        latent = small_model.encode(video)
        lat = VideoSize(frames, height, width).latent()
        assert latent.shape == (1, small_model.z_dim, lat.frames, lat.height, lat.width)
        # Padding repeats the last frame and the edge pixels.
        padded = VideoSize(frames, height, width).padded()
        manual = torch.cat([video, video[:, :, -1:].expand(-1, -1, padded.frames - frames, -1, -1)], dim=2)
        manual = torch.nn.functional.pad(
            manual, (0, padded.width - width, 0, padded.height - height, 0, 0), mode="replicate"
        )
        torch.testing.assert_close(latent, small_model.encode(manual), atol=1e-5, rtol=0)
        out = small_model.decode(latent, size=(frames, height, width))
        assert out.shape == video.shape
        torch.testing.assert_close(out, small_model.decode(latent)[:, :, :frames, :height, :width])


def test_sampling_is_seeded_and_independent_of_step_size(small_model):
    video = torch.rand(1, 3, 9, 16, 16) * 2 - 1
    with torch.no_grad():
        mean = small_model.encode(video)
        a = small_model.encode(video, sample=True, generator=torch.Generator().manual_seed(5))
        b = small_model.encode(video, sample=True, generator=torch.Generator().manual_seed(5), groups_per_step=2)
        c = small_model.encode(video, sample=True, generator=torch.Generator().manual_seed(6))
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    assert (a - mean).abs().max() > 1e-3
    assert (a - c).abs().max() > 1e-3


def test_frames_in_a_group_are_causal_across_groups(small_model):
    """A later group never changes the latents or frames of earlier ones."""
    torch.manual_seed(4)
    video = torch.rand(1, 3, 13, 16, 16) * 2 - 1
    changed = video.clone()
    changed[:, :, 9:] = 0
    with torch.no_grad():
        a, b = small_model.encode(video), small_model.encode(changed)
        torch.testing.assert_close(a[:, :, :3], b[:, :, :3])
        assert (a[:, :, 3] - b[:, :, 3]).abs().max() > 1e-4


def test_bad_arguments_are_explained(small_model):
    with pytest.raises(ValueError, match="even"):
        IVVAE(z_dim=5, dim=8)
    with pytest.raises(ValueError, match="colour channels"):
        small_model.encode(torch.zeros(1, 1, 1, 8, 8))
    with pytest.raises(ValueError, match="channels"):
        small_model.decode(torch.zeros(1, 3, 1, 1, 1))
    with pytest.raises(ValueError, match="fewer than"):
        small_model.decode(torch.zeros(1, small_model.z_dim, 2, 1, 1), size=(9, 8, 8))
    with pytest.raises(ValueError, match="no frames"):
        StreamEncoder(small_model).finish()
