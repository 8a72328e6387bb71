"""Checkpoints load from .pth and .safetensors; wrong or unsafe files are refused with clear reasons."""

from __future__ import annotations

import io
import os
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from ivvae_cli.errors import OutputError
from ivvae_cli.stream import decode, encode
from ivvae_cli.weights import (
    BUNDLED,
    PUBLISHED,
    WeightsError,
    convert_checkpoint,
    find_weights,
    load_model,
    published_variant,
    verify_checkpoint,
)

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
        torch.testing.assert_close(encode(from_pth.model, video), encode(model, video), atol=0, rtol=0)
        latent = encode(model, video)
        torch.testing.assert_close(
            decode(from_st.model, 0.5 * (latent - 0.25)), decode(from_pth.model, latent), atol=1e-4, rtol=0
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


def evil_pickle(marker: Path, legacy: bool = False) -> bytes:
    """A .pth that runs ``touch marker`` when unpickled carelessly: torch's zip format, or a bare pickle."""
    state = {"encoder.conv1.conv_2d.weight": _Payload(str(marker))}
    if legacy:
        return pickle.dumps(state)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


@pytest.mark.parametrize(
    "legacy", [False, pytest.param(True, marks=pytest.mark.filterwarnings("ignore:Detected pickle protocol"))]
)
def test_malicious_pickle_is_refused_and_never_runs(tmp_path, legacy):
    marker = tmp_path / "pwned"
    (tmp_path / "evil.pth").write_bytes(evil_pickle(marker, legacy))
    with pytest.raises(WeightsError, match="refusing"):
        load_model(tmp_path / "evil.pth")
    assert not marker.exists()


@pytest.mark.e2e
def test_every_command_that_takes_weights_refuses_a_malicious_pickle(tmp_path, checkpoint):
    from .media import make_clip
    from .test_cli import ivvae

    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pth"
    evil.write_bytes(evil_pickle(marker))
    clip = tmp_path / "in.mp4"
    make_clip(clip, frames=2, width=16, height=16)
    assert ivvae("encode", clip, tmp_path / "ok.latent", "-w", checkpoint, "-q")[0] == 0
    commands = [
        ("encode", clip, tmp_path / "a.latent", "-w", evil),
        ("decode", tmp_path / "ok.latent", tmp_path / "a.mp4", "-w", evil),
        ("reconstruct", clip, tmp_path / "b.mp4", "-w", evil, "--metrics"),
        ("train", clip, "--out", tmp_path / "run", "--init", evil, "--steps", "1", "--crop", "16"),
        ("weights", "verify", evil),
        ("weights", "convert", evil, tmp_path / "c.safetensors"),
    ]
    for command in commands:
        code, _, err = ivvae(*command, "-q") if command[0] in ("encode", "decode", "reconstruct") else ivvae(*command)
        assert code == 5 and "refusing" in err and "could run code" in err, (command, err)
    assert not marker.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["evil.pth", "in.mp4", "ok.latent"]


def test_converted_checkpoint_gives_bit_identical_outputs(tmp_path, model):
    torch.save(model.state_dict(), tmp_path / "m.pth")
    report = convert_checkpoint(tmp_path / "m.pth", tmp_path / "m.safetensors")
    assert report.dtype == "float32" and report.name == "ivvae_z4_dim8"
    pth, converted = load_model(tmp_path / "m.pth"), load_model(tmp_path / "m.safetensors")
    assert pth.fingerprint == converted.fingerprint
    video = torch.rand(1, 3, 9, 24, 32) * 2 - 1
    with torch.no_grad():
        latent = encode(pth.model, video)
        assert torch.equal(encode(converted.model, video), latent)
        assert torch.equal(decode(converted.model, latent), decode(pth.model, latent))
    with pytest.raises(OutputError, match="exists"):
        convert_checkpoint(tmp_path / "m.pth", tmp_path / "m.safetensors")


def test_converted_published_variant_keeps_its_name_scale_and_shift(tmp_path):
    torch.save(random_model(16, 8).state_dict(), tmp_path / "x.pth")
    convert_checkpoint(tmp_path / "x.pth", tmp_path / "x.safetensors", torch.bfloat16)
    report = verify_checkpoint(tmp_path / "x.safetensors")
    assert (report.dtype, report.name, report.scale_factor, report.shift_factor) == (
        "bfloat16",
        "ivvae_z16_dim8",
        1.0,
        0.0,
    )


def test_verify_names_what_is_wrong(tmp_path, model):
    state = model.state_dict()
    broken = dict(state)
    broken["decoder.head.2.conv_3d.bias"] = broken["decoder.head.2.conv_3d.bias"] * torch.inf
    torch.save(broken, tmp_path / "inf.pth")
    with pytest.raises(WeightsError, match=r"NaN or infinite values in decoder\.head\.2\.conv_3d\.bias"):
        verify_checkpoint(tmp_path / "inf.pth")
    mixed = dict(state)
    mixed["encoder.conv1.conv_2d.bias"] = mixed["encoder.conv1.conv_2d.bias"].half()
    torch.save(mixed, tmp_path / "mixed.pth")
    with pytest.raises(WeightsError, match="mixes"):
        verify_checkpoint(tmp_path / "mixed.pth")
    torch.save(state, tmp_path / "ok.pth")
    with pytest.raises(WeightsError, match="is IV-VAE z4_dim8, not ivvae_z16_dim64"):
        verify_checkpoint(tmp_path / "ok.pth", expect=PUBLISHED["ivvae_z16_dim64"])


def test_search_order(tmp_path, monkeypatch, model):
    """--weights, then $IVVAE_WEIGHTS, ./weights, the user's cache, the bundled model."""
    env, local, cache = tmp_path / "env", tmp_path / "work" / "weights", tmp_path / "cache" / "ivvae"
    for folder in (env, local, cache):
        folder.mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "work")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("IVVAE_WEIGHTS", str(env))
    assert find_weights() == BUNDLED  # nothing published anywhere
    with pytest.raises(WeightsError, match=r"no weights for ivvae_z16_dim64: searched --weights FILE, then .*env"):
        find_weights(model="z16_dim64")
    torch.save(model.state_dict(), cache / "ivvae_z4_dim64.pth")
    assert find_weights() == cache / "ivvae_z4_dim64.pth"
    torch.save(model.state_dict(), local / "ivvae_z4_dim64.pth")
    assert find_weights(model="z4_dim64") == local / "ivvae_z4_dim64.pth"
    torch.save(model.state_dict(), env / "ivvae_z4_dim64.pth")
    assert find_weights(model="ivvae_z4_dim64") == env / "ivvae_z4_dim64.pth"
    torch.save(model.state_dict(), cache / "ivvae_z8_dim64.pth")
    assert find_weights() == cache / "ivvae_z8_dim64.pth"  # with no name, the preferred variant comes first
    torch.save(model.state_dict(), cache / "ivvae_z16_dim64.pth")
    assert find_weights() == cache / "ivvae_z16_dim64.pth"
    assert find_weights(env / "ivvae_z4_dim64.pth", model="z16_dim64") == env / "ivvae_z4_dim64.pth"
    assert find_weights("z8_dim64", model="z4_dim64") == cache / "ivvae_z8_dim64.pth"  # --weights takes a name too
    assert find_weights(model="z16_dim16") == BUNDLED
    with pytest.raises(WeightsError, match="weights file not found"):
        find_weights(tmp_path / "absent.pth")
