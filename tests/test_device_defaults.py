"""Defaults by device: what ``--dtype auto`` and an unset ``--groups-per-step`` resolve to. The CUDA
choices are tested as functions (no GPU needed); on the CPU, the defaults keep outputs bit-identical."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ivvae_cli.latent_file import read_latent_file
from ivvae_cli.pipeline import (
    CUDA_DTYPE,
    CUDA_MAX_GROUPS_PER_STEP,
    MemoryOptions,
    default_dtype,
    default_groups_per_step,
    prepare_device,
)
from ivvae_cli.stream import Tiling, plan_tiling
from ivvae_cli.weights import LoadedModel

from .media import make_clip

CPU, CUDA = torch.device("cpu"), torch.device("cuda", 0)
GIB = 2**30


def test_auto_dtype_is_float32_on_cpu_and_the_cuda_choice_on_cuda():
    assert default_dtype(CPU) is torch.float32
    assert default_dtype(CUDA) is CUDA_DTYPE is torch.bfloat16


def _planner(height: int, width: int, budget: int, direction: str = "decode"):
    """Tiling by groups per step for the published z16_dim64 in bfloat16, as ``MemoryOptions`` plans it."""

    def tiling(groups: int) -> Tiling:
        return plan_tiling(64, height, width, frames_per_step=4 * groups, budget=budget, direction=direction,
                           bytes_per_value=2)  # fmt: skip

    return tiling


def test_one_group_per_step_on_cpu():
    assert default_groups_per_step(CPU, _planner(256, 256, 64 * GIB)) == 1


@pytest.mark.parametrize(
    ("height", "width", "budget", "direction", "groups"),
    [
        (256, 256, 24 * GIB, "decode", CUDA_MAX_GROUPS_PER_STEP),  # small frames: as many as allowed
        (720, 1280, 24 * GIB, "decode", 1),  # two groups would need tiles where one needs none
        (720, 1280, 24 * GIB, "encode", 2),
        (1088, 1920, 64 * GIB, "decode", 2),
        (2160, 3840, 24 * GIB, "decode", 1),  # tiled already: more groups would shrink the tiles
    ],
)
def test_cuda_takes_the_most_groups_that_keep_one_groups_tiling(height, width, budget, direction, groups):
    tiling = _planner(height, width, budget, direction)
    assert default_groups_per_step(CUDA, tiling) == groups
    assert tiling(groups) == tiling(1)
    assert groups == CUDA_MAX_GROUPS_PER_STEP or tiling(groups + 1) != tiling(1)


def test_memory_options_plan_by_device_unless_asked(small_model):
    loaded = LoadedModel(small_model, "small", "fingerprint", Path("small"))
    assert MemoryOptions().plan(loaded, 64, 96, "encode") == (1, Tiling())
    groups, tiling = MemoryOptions(max_memory=1, groups_per_step=3).plan(loaded, 64, 96, "decode")
    assert groups == 3 and tiling.tile is not None and tiling.offload


def test_prepare_device_autotunes_cudnn_on_cuda_only(monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    prepare_device(CPU)
    assert not torch.backends.cudnn.benchmark
    prepare_device(CUDA)  # a flag, set without touching a GPU
    assert torch.backends.cudnn.benchmark


@pytest.mark.e2e
def test_cli_defaults_on_cpu_are_float32_and_one_group(tmp_path, checkpoint):
    """``auto`` and the groups' default change nothing on the CPU: the same latent, bit for bit."""
    from typer.testing import CliRunner

    from ivvae_cli.cli import app

    make_clip(tmp_path / "in.mp4", 9, 48, 32)
    common = ["encode", str(tmp_path / "in.mp4"), "-w", str(checkpoint), "--device", "cpu", "-q"]
    for name, extra in (("default", []), ("explicit", ["--dtype", "float32", "--groups-per-step", "1"])):
        result = CliRunner().invoke(app, [*common[:2], str(tmp_path / f"{name}.latent"), *common[2:], *extra])
        assert result.exit_code == 0, result.stderr
    default, explicit = (read_latent_file(tmp_path / f"{n}.latent") for n in ("default", "explicit"))
    assert default.header.dtype == "float32"
    assert torch.equal(default.latent, explicit.latent)
