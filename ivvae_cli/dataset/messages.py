"""What the decoding workers hand the model's process: one small frozen dataclass per kind of
message, and the one rule for what a failure ends.

A source's messages come in order from one worker: ``ClipDone`` or ``FramePiece`` for each clip,
then ``SourceEnd``; or, at any point, ``SourceFailed``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from ivvae_cli.colour import Colour
from ivvae_cli.dataset.clips import Geometry
from ivvae_cli.latent_file import LatentHeader

# Failures the reader finds: it sends nothing more of that source. A failure on the model's side
# ("encode") cannot stop the reader, which goes on sending the source's pieces up to its end: they
# are dropped.
READER_STAGES = ("output", "decode")


def reader_stops(stage: str) -> bool:
    """Whether a failure at ``stage`` is the last message of its source."""
    return stage in READER_STAGES


@dataclass(frozen=True)
class SourceFacts:
    """What a source's every piece carries: how its frames were made and what they were."""

    rate: str  # the clips' frame rate, a fraction
    time_base: str
    geometry: Geometry
    source_size: tuple[int, int]  # width, height
    colour: Colour
    bit_depth: int


@dataclass(frozen=True)
class FramePiece:
    """Up to ``PIECE_FRAMES`` frames of one clip, in order; ``last`` ends the clip."""

    source: int  # its index in the work list
    name: str  # the clip's name
    start: int  # the clip's first frame index
    frames: torch.Tensor  # (t, H, W, C): uint8, or int32 for deeper video
    scale: float  # the frames' largest value: frames / scale is in [0, 1]
    pts: torch.Tensor  # int64, one per frame
    last: bool
    facts: SourceFacts

    def pin_memory(self) -> FramePiece:
        """For a DataLoader with ``pin_memory``: the frames pinned, so they go to the GPU without a copy."""
        return replace(self, frames=self.frames.pin_memory())


@dataclass(frozen=True)
class ClipDone:
    """A clip an earlier run wrote with this job's settings."""

    source: int
    name: str
    header: LatentHeader


@dataclass(frozen=True)
class SourceEnd:
    """Every clip of the source has been sent."""

    source: int
    skipped: str | None  # why it gave no clip (too short), or None
    warnings: tuple[str, ...]  # what ivvae warned of while reading it


@dataclass(frozen=True)
class SourceFailed:
    source: int
    stage: str  # output (no safe name), decode, or encode
    reason: str


Message = FramePiece | ClipDone | SourceEnd | SourceFailed
