"""Decoding what a diffusion model generates (issue 57): bare latent tensors in every format a
sampler saves them in decode to the frames ivvae's own latent file of the same latent gives."""

from __future__ import annotations

import json
import os
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from ivvae_cli import decode_tensor, load_model, read_latent_file
from ivvae_cli.bare_latent import BareOptions

from .media import make_clip
from .test_dataset import ivvae


def frames_of(path: Path) -> np.ndarray:
    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def rate_of(path: Path) -> Fraction:
    with av.open(str(path)) as container:
        return container.streams.video[0].average_rate


@pytest.fixture(scope="module")
def encoded(tmp_path_factory, checkpoint) -> tuple[Path, torch.Tensor, Path]:
    """A real clip's latent file, its latent ``(1, 16, 3, 6, 8)``, and its decode (lossless FFV1)."""
    folder = tmp_path_factory.mktemp("encoded")
    make_clip(folder / "clip.mkv", 9, 64, 48, codec="ffv1", pix_fmt="bgr0")
    assert ivvae("encode", folder / "clip.mkv", folder / "clip.latent", "-w", checkpoint, "-q")[0] == 0
    assert ivvae("decode", folder / "clip.latent", folder / "ref.mkv", "--lossless", "-w", checkpoint, "-q")[0] == 0
    return folder / "clip.latent", read_latent_file(folder / "clip.latent").latent, folder / "ref.mkv"


def _save(path: Path, latent: torch.Tensor, key: str | None = None) -> None:
    """``latent`` saved bare, as a sampler's code would: under ``key`` beside another tensor, or alone."""
    other = torch.zeros(3)
    suffix = path.suffix
    if suffix == ".safetensors":
        save_file({key: latent, "timesteps": other} if key else {"latents": latent}, str(path))
    elif suffix in (".pt", ".pth"):
        torch.save({key: latent, "timesteps": other} if key else latent, path)
    elif suffix == ".npy":
        np.save(path, latent.numpy())
    else:
        np.savez(path, **({key: latent.numpy(), "timesteps": other.numpy()} if key else {"arr_0": latent.numpy()}))


@pytest.mark.e2e
@pytest.mark.parametrize(
    ("name", "key", "rank"),
    [
        ("gen.safetensors", None, 5),
        ("gen.safetensors", "latents", 5),
        ("gen.pt", None, 5),
        ("gen.pt", "samples", 4),
        ("gen.pth", None, 4),
        ("gen.npy", None, 5),
        ("gen.npz", None, 4),
        ("gen.npz", "latents", 5),
    ],
)
def test_a_bare_tensor_decodes_to_the_frames_of_its_latent_file(tmp_path, encoded, checkpoint, name, key, rank):
    _, latent, reference = encoded
    _save(tmp_path / name, latent if rank == 5 else latent[0], key)
    args = ["decode", tmp_path / name, tmp_path / "out.mkv", "--lossless", "-w", checkpoint, "--fps", "25", "-q"]
    code, _, err = ivvae(*args, *(["--key", key] if key else []))
    assert code == 0, err
    assert np.array_equal(frames_of(tmp_path / "out.mkv"), frames_of(reference))
    assert rate_of(tmp_path / "out.mkv") == 25


@pytest.mark.e2e
def test_unscaled_latents_a_batch_a_crop_and_the_default_rate(tmp_path, encoded, checkpoint):
    _, latent, reference = encoded
    model = load_model(checkpoint).model
    torch.save(model.unscale_latent(latent), tmp_path / "z.pt")
    args = ["--lossless", "-w", checkpoint, "-q"]
    assert ivvae("decode", tmp_path / "z.pt", tmp_path / "z.mkv", "--latent-space", "unscaled", *args)[0] == 0
    difference = np.abs(frames_of(tmp_path / "z.mkv").astype(int) - frames_of(reference).astype(int))
    assert difference.max() <= 1 and difference.mean() < 0.01  # the same but for float rounding of the scaling
    assert rate_of(tmp_path / "z.mkv") == 24  # the default rate

    torch.save(torch.cat([latent, latent.flip(-1)]), tmp_path / "batch.pt")
    code, report, err = ivvae("decode", tmp_path / "batch.pt", tmp_path / "b.mkv", *args, "--json", "-")
    assert code == 0, err
    assert json.loads(report)["outputs"] == [str(tmp_path / "b_0.mkv"), str(tmp_path / "b_1.mkv")]
    assert np.array_equal(frames_of(tmp_path / "b_0.mkv"), frames_of(reference))
    assert not np.array_equal(frames_of(tmp_path / "b_1.mkv"), frames_of(reference))

    assert ivvae("decode", tmp_path / "batch.pt", tmp_path / "c.mkv", *args, "--size", "60x44")[0] == 0
    assert np.array_equal(frames_of(tmp_path / "c_0.mkv"), frames_of(reference)[:, :44, :60])


def test_the_library_call_decodes_a_tensor_as_the_command_does(tmp_path, encoded, checkpoint):
    _, latent, reference = encoded
    from ivvae_cli import WriteOptions

    loaded = load_model(checkpoint)
    written = decode_tensor(
        latent, tmp_path / "lib.mkv", loaded, BareOptions(fps=Fraction(25)), WriteOptions(lossless=True)
    )
    assert written == [tmp_path / "lib.mkv"]
    assert np.array_equal(frames_of(tmp_path / "lib.mkv"), frames_of(reference))


class Payload:
    """A pickle that would run a command when loaded."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.e2e
def test_every_bad_tensor_is_one_line_and_writes_nothing(tmp_path, encoded, checkpoint):
    latent_file, latent, _ = encoded
    bad = latent.clone()
    bad[0, 2, 1, 3, 4] = float("nan")
    torch.save(bad, tmp_path / "nan.pt")
    torch.save(latent[0, 0], tmp_path / "rank3.pt")
    torch.save(latent.to(torch.int32), tmp_path / "ints.pt")
    torch.save(latent[:, :8], tmp_path / "eight.pt")
    torch.save({"a": latent, "b": latent}, tmp_path / "two.pt")
    marker = tmp_path / "payload-ran"
    torch.save(Payload(marker), tmp_path / "evil.pt")
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    header = b"{'descr': '<f4', 'fortran_order': False, 'shape': (1, 16, 100000, 100000, 100000), }"
    header = header + b" " * (118 - len(header)) + b"\n"
    (tmp_path / "absurd.npy").write_bytes(
        b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header + b"\0" * 64
    )
    (tmp_path / "junk.pt").write_bytes(os.urandom(300))
    expected = {
        "nan.pt": "1 NaN or infinite value(s), in latent frame(s) 1 (video frames 1-4), channel(s) 2",
        "rank3.pt": "a latent is (C, T, h, w) or (B, C, T, h, w)",
        "ints.pt": "the tensor is int32; a latent is floating point",
        "eight.pt": "has 8 latent channels, but ivvae_z16_dim8 takes 16",
        "two.pt": "holds 2 tensors (a, b): --key names the latent",
        "evil.pt": "cannot be read as a .pt tensor (UnpicklingError",
        "objects.npy": "the tensor is object; a latent is floating point",
        "absurd.npy": "is empty or past what ivvae decodes",
        "junk.pt": "cannot be read as a .pt tensor",
    }
    for name, message in expected.items():
        code, _, err = ivvae("decode", tmp_path / name, tmp_path / "out.mp4", "-w", checkpoint, "-q")
        assert code == 3 and len(err.strip().splitlines()) == 1 and message in err, (name, err)
        assert not (tmp_path / "out.mp4").exists() and not list(tmp_path.glob(".out*"))
    assert not marker.exists(), "a pickled payload ran"
    torch.save(latent, tmp_path / "gen.pt")
    code, _, err = ivvae("decode", tmp_path / "gen.pt", tmp_path / "out.mp4", "-w", checkpoint, "--size", "50x44")
    assert code == 3 and "--size 50x44 does not fit a latent of 8x6, which decodes to 64x48" in err, err
    code, _, err = ivvae("decode", latent_file, tmp_path / "out.mp4", "-w", checkpoint, "--fps", "30")
    assert code == 3 and "--fps, --size, --key and --latent-space are for bare tensors" in err, err


@pytest.mark.e2e
def test_a_folder_of_bare_tensors_and_latent_files_with_one_model_load(tmp_path, encoded, checkpoint):
    latent_file, latent, reference = encoded
    generated = tmp_path / "generated"
    (generated / "sub").mkdir(parents=True)
    torch.save(torch.cat([latent, latent.flip(-1)]), generated / "batch.pt")
    np.save(generated / "sub" / "one.npy", latent[0].numpy())
    (generated / "clip.latent").write_bytes(latent_file.read_bytes())
    (generated / "notes.txt").write_text("not a latent")
    code, _, err = ivvae("decode", generated, tmp_path / "videos", "-w", checkpoint, "--ext", "mkv", "--lossless")
    assert code == 0 and err.count("model ") == 1, err
    videos = tmp_path / "videos"
    assert sorted(p.relative_to(videos).as_posix() for p in videos.rglob("*.mkv")) == [
        "batch_0.mkv",
        "batch_1.mkv",
        "clip.mkv",
        "sub/one.mkv",
    ]
    for name in ("batch_0.mkv", "clip.mkv", "sub/one.mkv"):
        assert np.array_equal(frames_of(videos / name), frames_of(reference)), name


def test_info_of_a_bare_tensor(tmp_path, encoded):
    _, latent, _ = encoded
    torch.save(torch.cat([latent, latent]).half(), tmp_path / "gen.pt")
    code, report, err = ivvae("info", tmp_path / "gen.pt", "--fps", "25", "--json", "-")
    assert code == 0, err
    report = json.loads(report)
    assert report["shape"] == [2, 16, 3, 6, 8] and report["dtype"] == "float16" and report["finite"] is True
    assert (report["videos"], report["frames"], report["width"], report["height"]) == (2, 9, 64, 48)
    assert report["seconds"] == 0.36 and report["problems"] == []
    bad = latent.clone()
    bad[0, 0, 0, 0, 0] = float("inf")
    np.savez(tmp_path / "bad.npz", latents=bad.numpy(), steps=np.arange(3))
    code, report, err = ivvae("info", tmp_path / "bad.npz", "--key", "latents", "--json", "-")
    assert code == 3 and json.loads(report)["finite"] is False and "1 NaN or infinite value(s)" in err, err
    assert len(err.strip().splitlines()) == 1
