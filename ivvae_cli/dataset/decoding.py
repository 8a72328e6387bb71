"""Decoding, in worker processes: a source's clips in pieces of frames, as messages for the model's process."""

from __future__ import annotations

import sys
import warnings
from collections.abc import Iterator
from fractions import Fraction

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from ivvae_cli.dataset.clips import ClipOptions, Geometry, clip_name, clip_pieces
from ivvae_cli.dataset.messages import ClipDone, FramePiece, Message, SourceEnd, SourceFacts, SourceFailed
from ivvae_cli.dataset.sources import Source
from ivvae_cli.dataset.store import FileLayout
from ivvae_cli.errors import IvvaeError, IvvaeWarning
from ivvae_cli.latent_file import LatentHeader, read_latent_header
from ivvae_cli.video import probe


class SourceDecoder(IterableDataset):
    """This process's sources decoded into clip pieces by DataLoader workers (worker w of n takes
    every n-th source), as ``messages`` for the model's process."""

    def __init__(
        self, todo: list[tuple[int, Source]], options: ClipOptions, reusable: FileLayout | None, fingerprint: str
    ):
        self.todo, self.options, self.reusable, self.fingerprint = todo, options, reusable, fingerprint

    def __iter__(self) -> Iterator[Message]:
        worker = get_worker_info()
        if worker is not None:
            torch.set_num_threads(1)  # decoding is the workers' work; the model has the process's threads
        for index, source in self.todo if worker is None else self.todo[worker.id :: worker.num_workers]:
            yield from self.messages(index, source)

    def messages(self, index: int, source: Source) -> Iterator[Message]:
        """One source's messages; what ivvae warns of while reading it (e.g. broken timestamps
        replaced by the declared rate) goes into its record instead of the terminal."""
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", IvvaeWarning)
            yield from self._pieces(index, source, caught)

    def _pieces(self, index: int, source: Source, caught: list) -> Iterator[Message]:
        clips, done = 0, None
        if source.problem is not None:
            yield SourceFailed(index, "output", source.problem)
            return
        try:
            info = probe(source.path)
            geometry = Geometry.plan(info.width, info.height, self.options)
            rate = self.options.target_fps or Fraction(info.frame_rate)
            facts = SourceFacts(
                str(rate), str(info.time_base), geometry, (info.width, info.height), info.colour, info.bit_depth
            )
            skip: str | None = None
            for start, end, frames, pts, last in clip_pieces(source, self.options, info):
                name = clip_name(source, self.options, start, end)
                if name != skip and name != done:
                    header = self._existing(source, name)
                    skip = name if header is not None else None
                    if header is not None:
                        yield ClipDone(index, name, header)
                if name == skip:
                    clips += last
                    continue
                done = name if last else None
                clips += last
                scale = float(np.iinfo(frames.dtype).max)
                frames = frames if frames.dtype == np.uint8 else frames.astype(np.int32)
                pts = torch.tensor(pts, dtype=torch.int64)
                yield FramePiece(index, name, start, torch.from_numpy(frames), scale, pts, last, facts)
        except IvvaeError as e:
            yield SourceFailed(index, "decode", str(e))
            return
        except Exception as e:  # a damaged file can fail deep in a decoder with any error
            yield SourceFailed(index, "decode", f"{e.__class__.__name__}: {e}")
            return
        short = None
        if clips == 0:
            needs = "a frame" if self.options.mode == "full" else f"{self.options.frames} frames"
            short = f"too short: no clip of {needs} in its span"
        said = tuple(dict.fromkeys(str(w.message) for w in caught if issubclass(w.category, IvvaeWarning)))
        yield SourceEnd(index, short, said)

    def _existing(self, source: Source, name: str) -> LatentHeader | None:
        """The header of this clip's latent if an earlier run wrote it with the same settings (a
        resumed job)."""
        if self.reusable is None:
            return None
        path = self.reusable.latent(source, name)
        if not path.is_file():
            return None
        try:
            header = read_latent_header(path)
        except IvvaeError:
            return None
        clip = header.clip
        return header if isinstance(clip, dict) and clip.get("job") == self.fingerprint else None


def _quiet_worker(worker_id: int) -> None:
    """A decoding worker whose parent stopped reading (Ctrl-C, SIGTERM) has nothing to report: the
    thread that hands frames over would otherwise print the broken connection's traceback."""

    def hook(kind, value, traceback) -> None:
        if not issubclass(kind, ConnectionError):
            sys.__excepthook__(kind, value, traceback)

    sys.excepthook = hook
