"""The shards layout: each process writes tar files of about ``shard_size`` bytes under ``shards/``,
each clip's latent file (as bytes) and its index row as members named by the clip's key, in the
form the ``webdataset`` package reads as it is (``<key>.latent``, ``<key>.json``).

A shard is written under a temporary name, locked by its writer, and renamed when closed; then its
index part (``<shard>.json``: per source done, the rows of its clips, each with the byte offset and
length of its latent inside the tar) is written atomically. A shard is final when its part is there
and the tar has the size the part says; nothing else is ever read. So a closed shard is final, and
what a stopped process had in its open shard is encoded again; a temporary nobody holds locked is
a dead process's, and is removed.
"""

from __future__ import annotations

import fcntl
import io
import json
import os
import secrets
import tarfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from ivvae_cli.dataset.sources import Source
from ivvae_cli.dataset.spec import read_json, write_json
from ivvae_cli.dataset.store import SourceRecord, Store, clip_key
from ivvae_cli.latent_file import LatentFile, latent_file_bytes
from ivvae_cli.outputs import name_problem, write_error

PART_FORMAT = "ivvae-shard-index"
TEMPORARY = ".tar.partial"


def member_name(key: str) -> str:
    """A clip key as the stem of its tar members: webdataset takes what precedes the first dot of a
    member's file name as its key, so dots there (a span in seconds) become commas."""
    folder, _, name = key.rpartition("/")
    return f"{folder}/{name.replace('.', ',')}" if folder else name.replace(".", ",")


@dataclass
class _OpenShard:
    """The shard this process is writing, and the sources finished while it is open."""

    name: str  # shards/<name>.tar once closed
    file: IO[bytes]
    tar: tarfile.TarFile
    finished: list[tuple[Source, SourceRecord]] = field(default_factory=list)


class ShardStore(Store):
    layout = "shards"

    def __init__(self, folder: Path, fingerprint: str, shard_size: int, rank: int = 0):
        super().__init__(folder, fingerprint)
        self.shards = folder / "shards"
        self.shard_size, self.rank = shard_size, rank
        self.token = secrets.token_hex(4)  # this process's shards' names, unlike any other's
        self.count = 0
        self.open: _OpenShard | None = None
        self._swept = False

    # -- what is done ---------------------------------------------------------------------------------

    def records(self, sources: Iterable[Source]) -> dict[str, SourceRecord]:
        done = final_records(self.folder, self.fingerprint)
        return {s.name: done[s.name] for s in sources if s.name in done}

    def accounted(self, sources: Iterable[Source]) -> bool:
        done = final_records(self.folder, self.fingerprint)
        return all(s.name in done or self.failure_path(s).exists() for s in sources)

    # -- writing --------------------------------------------------------------------------------------

    def put(self, source: Source, name: str, data: LatentFile, row: dict[str, Any]) -> dict[str, Any]:
        shard = self._shard()
        member = member_name(clip_key(source, name))
        latent = latent_file_bytes(data)
        try:
            offset = self._add(shard.tar, f"{member}.latent", latent)
            self._add(shard.tar, f"{member}.json", json.dumps(row, default=str).encode())
        except OSError as e:
            raise write_error(e, shard.file.name) or e from None
        where = {"shard": f"shards/{shard.name}.tar", "member": f"{member}.latent", "offset": offset,
                 "length": len(latent)}  # fmt: skip
        if shard.tar.offset >= self.shard_size:
            self.close()
        return where

    @staticmethod
    def _add(tar: tarfile.TarFile, name: str, data: bytes) -> int:
        """Append a member; the offset of its data in the tar."""
        info = tarfile.TarInfo(name)
        info.size, info.mode, info.mtime = len(data), 0o644, 0
        tar.addfile(info, io.BytesIO(data))
        return tar.offset - -(-len(data) // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE

    def finish(self, source: Source, record: SourceRecord) -> None:
        self._shard().finished.append((source, record))

    def _shard(self) -> _OpenShard:
        if self.open is None:
            self._sweep()
            self.shards.mkdir(parents=True, exist_ok=True)
            name = f"{self.rank:05d}-{self.token}-{self.count:05d}"
            self.count += 1
            try:
                file = (self.shards / f"{name}{TEMPORARY}").open("xb")
                fcntl.lockf(file, fcntl.LOCK_EX | fcntl.LOCK_NB)  # held while it is written: not a dead one's
            except OSError as e:
                raise write_error(e, self.shards / name) or e from None
            self.open = _OpenShard(name, file, tarfile.TarFile(fileobj=file, mode="w", format=tarfile.PAX_FORMAT))
        return self.open

    def _sweep(self) -> None:
        """Remove the temporaries of processes that died writing them (no lock held on them)."""
        if self._swept or not self.shards.is_dir():
            return
        self._swept = True
        for path in self.shards.glob(f"*{TEMPORARY}"):
            try:
                with path.open("rb+") as f:
                    fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    path.unlink()
            except OSError:
                continue  # another process is writing it, or it is gone already

    def close(self) -> None:
        """The open shard renamed final, then its index part written; the failures of the sources it
        finished are removed."""
        shard, self.open = self.open, None
        if shard is None:
            return
        temporary = self.shards / f"{shard.name}{TEMPORARY}"
        final = self.shards / f"{shard.name}.tar"
        try:
            shard.tar.close()
            shard.file.flush()
            os.fsync(shard.file.fileno())
            size = shard.file.tell()
            os.rename(temporary, final)
            shard.file.close()
            write_json(self.shards / f"{shard.name}.json", {
                "format": PART_FORMAT, "fingerprint": self.fingerprint, "shard": final.name, "bytes": size,
                "sources": [{"source": s.name, "rows": r.rows, "skipped": r.skipped, "warnings": list(r.warnings)}
                            for s, r in shard.finished],
            })  # fmt: skip
        except OSError as e:
            shard.file.close()
            raise write_error(e, final) or e from None
        for source, _ in shard.finished:
            self.failure_path(source).unlink(missing_ok=True)

    def abandon(self) -> None:
        shard, self.open = self.open, None
        if shard is not None:
            shard.file.close()
            (self.shards / f"{shard.name}{TEMPORARY}").unlink(missing_ok=True)


def final_records(folder: Path, fingerprint: str) -> dict[str, SourceRecord]:
    """Every source done in a final shard with these settings, by name, from the index parts: one
    read per shard, whatever the number of clips."""
    shards = folder / "shards"
    parts = sorted(shards.glob("*.json")) if shards.is_dir() else []
    final: set[str] = set()
    listed: list[dict] = []
    for path in parts:
        part = read_json(path)
        if not (
            isinstance(part, dict) and part.get("format") == PART_FORMAT and part.get("fingerprint") == fingerprint
        ):
            continue
        shard = part.get("shard")
        if not isinstance(shard, str) or name_problem(shard) is not None or "/" in shard:
            continue
        try:
            whole = (shards / shard).stat().st_size == part.get("bytes")
        except OSError:
            whole = False
        if whole and isinstance(part.get("sources"), list):
            final.add(f"shards/{shard}")
            listed += part["sources"]
    done = {}
    for entry in listed:
        record = SourceRecord.read(entry, lambda row: row.get("shard") in final)
        if record is not None and isinstance(entry["source"], str):
            done.setdefault(entry["source"], record)
    return done
