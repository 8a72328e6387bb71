"""Reading a dataset back, in either layout: its clips as training examples, or one clip by key."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from ivvae_cli.dataset.store import located
from ivvae_cli.errors import InputError
from ivvae_cli.latent_file import LatentFile, describe_latent, inspect_latent_bytes, read_latent_bytes, read_latent_file

OPEN_SHARDS = 64


def read_index(folder: Path) -> list[dict[str, Any]]:
    """The rows of a dataset's ``index.jsonl``, each checked to say where its clip is."""
    index = folder / "index.jsonl"
    if not index.is_file():
        raise InputError(f"{folder} has no index.jsonl (run `ivvae dataset merge {folder}`)")
    rows = []
    for number, line in enumerate(index.read_text().splitlines(), 1):
        try:
            row = json.loads(line) if line.strip() else None
        except ValueError:
            row = ""
        if row is not None and not located(row):
            raise InputError(f"{index} is damaged at line {number}: `ivvae dataset merge {folder}` rewrites it")
        if row is not None:
            rows.append(row)
    return rows


class ClipReader:
    """Reads clips by their index rows: a latent file, or one positioned read of a shard (no tar
    scan, no extraction) through a descriptor kept open per shard (the last ``OPEN_SHARDS``). Safe
    to share with DataLoader workers: descriptors are opened again in each process."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.files: dict[str, int] = {}
        self.pid = os.getpid()

    def read(self, row: dict[str, Any], *, strict: bool = False) -> LatentFile:
        if "shard" not in row:
            return read_latent_file(self.folder / row["latent"], strict=strict)
        return read_latent_bytes(self.bytes(row), self.name(row), strict=strict)

    def name(self, row: dict[str, Any]) -> str:
        """Where a clip is, as errors say it."""
        if "shard" not in row:
            return str(self.folder / row["latent"])
        return f"{self.folder / row['shard']}:{row.get('member', row.get('key'))}"

    def bytes(self, row: dict[str, Any]) -> bytes:
        """A clip's latent file, as bytes."""
        if "shard" not in row:
            try:
                return (self.folder / row["latent"]).read_bytes()
            except OSError as e:
                raise InputError(f"cannot read {self.folder / row['latent']}: {e.strerror}") from None
        if self.pid != os.getpid():
            self.files, self.pid = {}, os.getpid()
        shard = row["shard"]
        if shard not in self.files:
            if len(self.files) >= OPEN_SHARDS:  # the longest open goes
                os.close(self.files.pop(next(iter(self.files))))
            try:
                self.files[shard] = os.open(self.folder / shard, os.O_RDONLY)
            except OSError as e:
                raise InputError(f"cannot read {self.folder / shard}: {e.strerror}") from None
        return os.pread(self.files[shard], row["length"], row["offset"])

    def close(self) -> None:
        for fd in self.files.values():
            os.close(fd)
        self.files = {}

    def __getstate__(self) -> dict[str, Any]:
        return {"folder": self.folder, "files": {}, "pid": -1}


def _row(folder: Path, key: str) -> dict[str, Any]:
    row = next((row for row in read_index(folder) if row.get("key") == key), None)
    if row is None:
        raise InputError(f"{folder}: no clip with the key '{key}' in its index (its 'key' column)")
    return row


def read_clip(folder: Path, key: str, *, strict: bool = False) -> LatentFile:
    """One clip of a dataset in either layout, by its key (the index's ``key`` column)."""
    reader = ClipReader(folder)
    try:
        return reader.read(_row(folder, key), strict=strict)
    finally:
        reader.close()


def describe_clip(folder: Path, key: str) -> dict[str, Any]:
    """``describe_latent_file`` of one clip of a dataset, by its key; and where it is."""
    row, reader = _row(folder, key), ClipReader(folder)
    try:
        data = reader.bytes(row)
    finally:
        reader.close()
    where = {k: row[k] for k in ("shard", "member", "offset", "length", "latent") if k in row}
    return {"key": key, **where} | describe_latent(inspect_latent_bytes(data, reader.name(row)), len(data))


class LatentDataset(torch.utils.data.Dataset):
    """The clips of a latent dataset folder, by its ``index.jsonl``, as training examples; either
    layout alike.

    Each item is ``{"latent": (z_dim, T', h, w), "metadata": index row}`` (the row holds the
    manifest's columns too). With posterior ``both`` and ``sample``, ``latent`` is a fresh draw
    ``mean + scale * exp(logvar / 2) * noise`` at every access (a new sample each epoch), and
    ``mean`` and ``logvar`` are given as well. ``bucket`` (``"256x256"``) keeps one bucket's clips,
    whose latents share a shape and so batch together. ``collate`` batches items for a DataLoader.
    """

    def __init__(self, folder: str | Path, *, bucket: str | None = None, sample: bool = False):
        self.folder = Path(folder)
        self.rows = [r for r in read_index(self.folder) if bucket is None or r.get("bucket") == bucket]
        self.sample = sample
        self.reader = ClipReader(self.folder)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, Any]:
        row = self.rows[i]
        data = self.reader.read(row)
        item = {"latent": data.latent[0], "metadata": row}
        if data.logvar is not None:
            item |= {"mean": data.latent[0], "logvar": data.logvar[0]}
            if self.sample:
                noise = torch.randn_like(data.latent[0])
                item["latent"] = data.latent[0] + data.header.scale_factor * torch.exp(0.5 * data.logvar[0]) * noise
        elif self.sample:
            raise InputError(
                f"{row.get('key', row.get('latent'))} holds no log variance: sampling needs --posterior both"
            )
        return item

    @staticmethod
    def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
        """Tensors stacked, metadata as a list of rows."""
        batch = {k: torch.stack([item[k] for item in items]) for k in items[0] if k != "metadata"}
        return batch | {"metadata": [item["metadata"] for item in items]}
