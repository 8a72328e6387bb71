"""Reading a dataset back: its clips as training examples."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ivvae_cli.errors import InputError
from ivvae_cli.latent_file import (
    read_latent_file,
)
from ivvae_cli.outputs import name_problem

# -- reading a dataset back --------------------------------------------------------------------------


class LatentDataset(torch.utils.data.Dataset):
    """The clips of a latent dataset folder, by its ``index.jsonl``, as training examples.

    Each item is ``{"latent": (z_dim, T', h, w), "metadata": index row}`` (the row holds the
    manifest's columns too). With posterior ``both`` and ``sample``, ``latent`` is a fresh draw
    ``mean + scale * exp(logvar / 2) * noise`` at every access (a new sample each epoch), and
    ``mean`` and ``logvar`` are given as well. ``bucket`` (``"256x256"``) keeps one bucket's clips,
    whose latents share a shape and so batch together. ``collate`` batches items for a DataLoader.
    """

    def __init__(self, folder: str | Path, *, bucket: str | None = None, sample: bool = False):
        self.folder = Path(folder)
        index = self.folder / "index.jsonl"
        if not index.is_file():
            raise InputError(f"{self.folder} has no index.jsonl (run `ivvae dataset merge {self.folder}`)")
        rows = []
        for number, line in enumerate(index.read_text().splitlines(), 1):
            try:
                row = json.loads(line) if line.strip() else None
            except ValueError:
                row = ""
            if row is not None and not (isinstance(row, dict) and name_problem(str(row.get("latent", ""))) is None):
                merge = f"`ivvae dataset merge {self.folder}` rewrites it"
                raise InputError(f"{index} is damaged at line {number}: {merge}")
            if row is not None:
                rows.append(row)
        self.rows = [r for r in rows if bucket is None or r.get("bucket") == bucket]
        self.sample = sample

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, Any]:
        row = self.rows[i]
        data = read_latent_file(self.folder / row["latent"])
        item = {"latent": data.latent[0], "metadata": row}
        if data.logvar is not None:
            item |= {"mean": data.latent[0], "logvar": data.logvar[0]}
            if self.sample:
                noise = torch.randn_like(data.latent[0])
                item["latent"] = data.latent[0] + data.header.scale_factor * torch.exp(0.5 * data.logvar[0]) * noise
        elif self.sample:
            raise InputError(f"{row['latent']} holds no log variance: sampling needs --posterior both")
        return item

    @staticmethod
    def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
        """Tensors stacked, metadata as a list of rows."""
        batch = {k: torch.stack([item[k] for item in items]) for k in items[0] if k != "metadata"}
        return batch | {"metadata": [item["metadata"] for item in items]}
