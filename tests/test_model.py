"""The model is the authors' function: parity vectors, published shapes, causality, padding."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from ivvae_cli.model import IVVAE, VideoSize
from ivvae_cli.stream import decode, decode_clip, encode, encode_clip
from ivvae_cli.weights import PUBLISHED

from .conftest import REFERENCE

# The parity vectors in ../shared/reference, computed with the authors' code (named, so that one
# going missing fails its test).
GOLDEN = [REFERENCE / f"golden_{case}.safetensors" for case in ("z16_dim8_t9", "z4_dim8_t5", "z8_dim8_t1")]
TOLERANCE = 1e-4


@pytest.mark.shared
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
        mu, logvar = (moment.transpose(1, 2) for moment in encode_clip(model, video.transpose(1, 2)))
        latent = encode(model, video)
        decoded = decode(model, tensors["latent"])
    for name, ours in (("mu", mu), ("logvar", logvar), ("latent", latent), ("decoded", decoded)):
        ref = tensors[name]
        assert ours.shape == ref.shape, name
        err = (ours - ref).abs().max().item()
        assert err <= TOLERANCE, f"{name}: max abs error {err:.2e}"


@pytest.mark.shared
@pytest.mark.parametrize("path", GOLDEN, ids=lambda p: p.stem)
def test_training_path_matches_reference(path):
    """With autograd recording, the layers sum out of place: the same outputs, and gradients flow."""
    model, tensors = _golden(path.stem)
    mu, logvar = encode_clip(model, tensors["input"].transpose(1, 2))
    decoded = decode_clip(model, tensors["latent"].transpose(1, 2))
    assert decoded.requires_grad
    for name, ours in (("mu", mu), ("logvar", logvar), ("decoded", decoded)):
        err = (ours.detach().transpose(1, 2) - tensors[name]).abs().max().item()
        assert err <= TOLERANCE, f"{name}: max abs error {err:.2e}"
    decoded.square().mean().backward()
    grads = [p.grad for p in model.decoder.parameters() if p.grad is not None]
    assert grads and all(g.isfinite().all() for g in grads)
    if decoded.shape[1] > 1:  # a lone frame never reaches the temporal resamplers, so they get no gradient
        assert len(grads) == len(list(model.decoder.parameters()))


def _golden(name: str) -> tuple[IVVAE, dict[str, torch.Tensor]]:
    path = REFERENCE / f"{name}.safetensors"
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    tensors = load_file(str(path))
    model = IVVAE(int(meta["z_dim"]), int(meta["dim"]), float(meta["scale_factor"]), float(meta["shift_factor"]))
    model.load_state_dict({k.removeprefix("state."): v for k, v in tensors.items() if k.startswith("state.")})
    return model.eval(), tensors


@pytest.mark.shared
@pytest.mark.parametrize(
    ("dtype", "groups_per_step", "tolerance"),
    [(torch.float32, 1, TOLERANCE), (torch.float32, 2, TOLERANCE), (torch.bfloat16, 1, 0.05), (torch.float16, 2, 5e-3)],
)
def test_every_option_gives_the_same_shapes_and_close_values(dtype, groups_per_step, tolerance):
    """Reduced precision and chunking against the reference vectors (relative RMS error)."""
    model, tensors = _golden("golden_z16_dim8_t9")
    model = model.to(dtype)
    with torch.inference_mode():
        latent = encode(model, tensors["input"].to(dtype), groups_per_step=groups_per_step).float()
        decoded = decode(model, tensors["latent"].to(dtype), groups_per_step=groups_per_step).float()
    for name, ours in (("latent", latent), ("decoded", decoded)):
        ref = tensors[name]
        assert ours.shape == ref.shape and ours.isfinite().all(), name
        error = ((ours - ref).norm() / ref.norm()).item()
        assert error <= tolerance, f"{dtype} {name}: relative error {error:.2e}"


@pytest.mark.shared
@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_published_names_and_shapes(name):
    spec = json.loads((REFERENCE / "official_variants.json").read_text())[name]
    with torch.device("meta"):
        model = IVVAE(spec["z_dim"], spec["dim"], spec["scale_factor"], spec["shift_factor"])
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert ours == {k: list(v) for k, v in spec["keys"].items()}
    assert sum(p.numel() for p in model.parameters()) == spec["params"]


@pytest.mark.parametrize("frames", [1, 2, 3, 6, 7])
def test_padding_gives_back_the_exact_size(small_model, frames):
    torch.manual_seed(3)
    height, width = 13, 21
    video = torch.rand(1, 3, frames, height, width) * 2 - 1
    with torch.no_grad():
        latent = encode(small_model, video)
        lat = VideoSize(frames, height, width).latent()
        assert latent.shape == (1, small_model.z_dim, lat.frames, lat.height, lat.width)
        # Padding repeats the last frame and the edge pixels.
        padded = VideoSize(frames, height, width).padded()
        manual = torch.cat([video, video[:, :, -1:].expand(-1, -1, padded.frames - frames, -1, -1)], dim=2)
        manual = torch.nn.functional.pad(
            manual, (0, padded.width - width, 0, padded.height - height, 0, 0), mode="replicate"
        )
        torch.testing.assert_close(latent, encode(small_model, manual), atol=1e-5, rtol=0)
        out = decode(small_model, latent, size=(frames, height, width))
        assert out.shape == video.shape
        torch.testing.assert_close(out, decode(small_model, latent)[:, :, :frames, :height, :width])


def test_frames_in_a_group_are_causal_across_groups(small_model):
    """A later group never changes the latents or frames of earlier ones."""
    torch.manual_seed(4)
    video = torch.rand(1, 3, 13, 16, 16) * 2 - 1
    changed = video.clone()
    changed[:, :, 9:] = 0
    with torch.no_grad():
        a, b = encode(small_model, video), encode(small_model, changed)
        torch.testing.assert_close(a[:, :, :3], b[:, :, :3])
        assert (a[:, :, 3] - b[:, :, 3]).abs().max() > 1e-4


def test_bad_arguments_are_explained():
    with pytest.raises(ValueError, match="even"):
        IVVAE(z_dim=5, dim=8)
