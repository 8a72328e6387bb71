"""Colour descriptions: what a stream declares, what players assume where it declares nothing, and
what ivvae writes.

A stream may declare its matrix (YUV <-> RGB), primaries, transfer function and range; each is
named as ffmpeg names it (``bt709``, ``smpte170m``, ``tv`` for limited range, ``pc`` for full).
Where a stream declares no matrix, players guess from its size, as Chromium does: BT.709 for
pictures 720 lines high or more, BT.601 (SMPTE 170M) below, limited range. ivvae reads untagged
sources the same way. It writes every video tagged with all four, and codes it with the matrix
and range players assume for its size, so that players which ignore the tags show it right too.
"""

from __future__ import annotations

from dataclasses import astuple, dataclass, replace

# ffmpeg's names of the values a stream can declare (libavutil/pixdesc.c), by number; the numbers
# that mean "unspecified" or "reserved" are absent.
MATRICES = {
    0: "gbr", 1: "bt709", 4: "fcc", 5: "bt470bg", 6: "smpte170m", 7: "smpte240m", 8: "ycgco", 9: "bt2020nc",
    10: "bt2020c", 11: "smpte2085", 12: "chroma-derived-nc", 13: "chroma-derived-c", 14: "ictcp",
}  # fmt: skip
PRIMARIES = {
    1: "bt709", 4: "bt470m", 5: "bt470bg", 6: "smpte170m", 7: "smpte240m", 8: "film", 9: "bt2020", 10: "smpte428",
    11: "smpte431", 12: "smpte432", 22: "ebu3213",
}  # fmt: skip
TRANSFERS = {
    1: "bt709", 4: "bt470m", 5: "bt470bg", 6: "smpte170m", 7: "smpte240m", 8: "linear", 9: "log100", 10: "log316",
    11: "iec61966-2-4", 12: "bt1361e", 13: "iec61966-2-1", 14: "bt2020-10", 15: "bt2020-12", 16: "smpte2084",
    17: "smpte428", 18: "arib-std-b67",
}  # fmt: skip
RANGES = {1: "tv", 2: "pc"}
UNSPECIFIED = 2  # AVCOL_SPC_UNSPECIFIED, AVCOL_PRI_UNSPECIFIED, AVCOL_TRC_UNSPECIFIED

# The matrices ivvae codes YUV with, by the name libavfilter's ``scale`` takes for each.
SCALE_MATRICES = {"bt709": "bt709", "smpte170m": "smpte170m", "bt2020nc": "bt2020"}
WIDE_MATRICES = {"bt2020nc"}  # kept as the source declares it: wide-gamut video is played by its tags
HD_LINES = 720  # from this height on, untagged video is taken as BT.709


@dataclass(frozen=True)
class Colour:
    """A stream's colour description; None where the stream declares nothing."""

    matrix: str | None = None
    primaries: str | None = None
    transfer: str | None = None
    range: str | None = None  # "tv" (limited) or "pc" (full)

    @classmethod
    def declared_by(cls, source) -> Colour:
        """What a codec context (or frame) declares."""
        return cls(
            MATRICES.get(source.colorspace),
            PRIMARIES.get(source.color_primaries),
            TRANSFERS.get(source.color_trc),
            RANGES.get(source.color_range),
        )

    def assumed(self, height: int) -> Colour:
        """Each undeclared field as players take it for a picture ``height`` lines high."""
        guess = ASSUMED_HD if height >= HD_LINES else ASSUMED_SD
        return Colour(*(mine or theirs for mine, theirs in zip(astuple(self), astuple(guess), strict=True)))

    def tag(self, target) -> None:
        """Declare this description on a codec context (or frame); None leaves a field unspecified."""
        target.colorspace = number_of(MATRICES, self.matrix)
        target.color_primaries = number_of(PRIMARIES, self.primaries)
        target.color_trc = number_of(TRANSFERS, self.transfer)
        target.color_range = number_of(RANGES, self.range, unspecified=0)


UNTAGGED = Colour()
ASSUMED_HD = Colour("bt709", "bt709", "bt709", "tv")
ASSUMED_SD = Colour("smpte170m", "smpte170m", "smpte170m", "tv")


def number_of(names: dict[int, str], name: str | None, unspecified: int = UNSPECIFIED) -> int:
    """ffmpeg's number for a name in ``names``; ``unspecified`` for None."""
    return next((number for number, known in names.items() if known == name), unspecified)


def written_colour(source: Colour, height: int, rgb: bool) -> Colour:
    """What a video ivvae writes, ``height`` lines high, is tagged as and converted with. Primaries
    and transfer describe the picture: the source's where it declared them, else what players
    assume for the height. Matrix and range only say how RGB was coded, which ivvae chooses: what
    players assume for the height (BT.709 from 720 lines, else BT.601; limited), so that players
    which ignore tags (Chromium's H.264 path, for one) show it right too; a BT.2020 matrix is kept.
    RGB streams are tagged ``gbr``, full range."""
    colour = source.assumed(height)
    if rgb:
        return replace(colour, matrix="gbr", range="pc")
    if source.matrix in WIDE_MATRICES:
        return colour
    guess = UNTAGGED.assumed(height)
    return replace(colour, matrix=guess.matrix, range=guess.range)
