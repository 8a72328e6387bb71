"""Checkpoints load from .pth and .safetensors; wrong or unsafe files are refused with clear reasons."""

from __future__ import annotations

import os
import pickle

import pytest
import torch
from safetensors.torch import save_file

from ivvae_cli.weights import PUBLISHED, WeightsError, load_model, published_variant

from .conftest import random_model


@pytest.fixture(scope="module")
def model():
    return random_model(z_dim=4, dim=8, seed=11, scale=1.0, shift=0.0)


def test_pth_and_safetensors_load_to_the_same_function(tmp_path, model):
    state = model.state_dict()
    torch.save(state, tmp_path / "m.pth")
    save_file(state, str(tmp_path / "m.safetensors"), metadata={"scale_factor": "0.5", "shift_factor": "0.25"})
    video = torch.rand(1, 3, 5, 16, 16) * 2 - 1
    from_pth = load_model(tmp_path / "m.pth")
    from_st = load_model(tmp_path / "m.safetensors")
    assert (from_pth.model.z_dim, from_pth.model.dim) == (4, 8)
    assert from_pth.name == "ivvae_z4_dim8"
    assert from_pth.fingerprint == from_st.fingerprint
    assert (from_st.model.scale_factor, from_st.model.shift_factor) == (0.5, 0.25)
    with torch.no_grad():
        torch.testing.assert_close(from_pth.model.encode(video), model.encode(video), atol=0, rtol=0)
        latent = model.encode(video)
        torch.testing.assert_close(
            from_st.model.decode(0.5 * (latent - 0.25)), from_pth.model.decode(latent), atol=1e-4, rtol=0
        )


def test_published_factors_are_known():
    assert published_variant(16, 64) is PUBLISHED["ivvae_z16_dim64"]
    assert (PUBLISHED["ivvae_z4_dim64"].scale_factor, PUBLISHED["ivvae_z4_dim64"].shift_factor) == (1.3196, 0.125)
    assert (PUBLISHED["ivvae_z16_dim96"].scale_factor, PUBLISHED["ivvae_z16_dim96"].shift_factor) == (0.7619, -0.0483)
    assert published_variant(16, 8) is None


def test_mismatched_checkpoints_name_what_is_wrong(tmp_path, model):
    state = dict(model.state_dict())
    del state["decoder.head.0.gamma"]
    state["encoder.extra.weight"] = torch.zeros(1)
    state["decoder.conv1.conv.bias"] = torch.zeros(3)
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(WeightsError) as e:
        load_model(tmp_path / "bad.pth")
    message = str(e.value)
    assert "missing: decoder.head.0.gamma" in message
    assert "unexpected: encoder.extra.weight" in message
    assert "decoder.conv1.conv.bias is [3], needs [64]" in message


@pytest.mark.parametrize(
    ("name", "content", "reason"),
    [
        ("notes.pth", b"hello, not a checkpoint", "not a readable PyTorch checkpoint"),
        ("broken.safetensors", b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage", "not a readable safetensors file"),
    ],
)
def test_unreadable_files(tmp_path, name, content, reason):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(WeightsError, match=reason):
        load_model(tmp_path / name)


def test_missing_file_and_foreign_state_dict(tmp_path):
    with pytest.raises(WeightsError, match="not found"):
        load_model(tmp_path / "absent.pth")
    torch.save({"fc.weight": torch.zeros(2, 2)}, tmp_path / "other.pth")
    with pytest.raises(WeightsError, match="not an IV-VAE checkpoint"):
        load_model(tmp_path / "other.pth")


class _Payload:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    with open(tmp_path / "evil.pth", "wb") as f:
        pickle.dump({"encoder.conv1.conv_2d.weight": _Payload(str(marker))}, f)
    with pytest.raises(WeightsError, match="refusing"):
        load_model(tmp_path / "evil.pth")
    assert not marker.exists()
