"""Video I/O: frames read as the ffmpeg command reads them, rotation applied, sizes kept in aspect."""

from __future__ import annotations

import numpy as np
import pytest

from ivvae_cli.errors import InputError
from ivvae_cli.video import probe, read_frames, resized, unit_float
from ivvae_cli.weights import SAMPLE

from .conftest import VIDEOS
from .media import add_rotation, ffmpeg_frames, make_clip


@pytest.mark.parametrize(
    ("name", "kwargs", "deep"),
    [
        ("bt709.mp4", {"colorspace": "ITU709"}, False),
        ("deep.mp4", {"pix_fmt": "yuv420p10le"}, True),
        ("alpha.mov", {"codec": "png", "pix_fmt": "rgba", "options": {}}, False),
        ("full.mp4", {"pix_fmt": "yuvj420p"}, False),
        ("yuv444.mkv", {"codec": "ffv1", "pix_fmt": "yuv444p"}, False),
    ],
)
def test_decoded_frames_match_ffmpeg(tmp_path, name, kwargs, deep):
    src = tmp_path / name
    make_clip(src, 3, 48, 32, **kwargs)
    ours = unit_float(np.concatenate([f for f, _ in read_frames(src)]))
    theirs = ffmpeg_frames(src, 48, 32, deep=deep)
    assert ours.shape == theirs.shape
    assert np.array_equal(ours, theirs)


def test_the_sample_clip_decodes_whole_and_alike_in_pyav_and_ffmpeg():
    """The packaged sample, stream-copied out of a longer clip: every frame decodes, in both readers."""
    info = probe(SAMPLE)
    ours = unit_float(np.concatenate([f for f, _ in read_frames(SAMPLE)]))
    assert (info.frames, info.width, info.height) == (76, 640, 272) and len(ours) == 76
    assert np.array_equal(ours, ffmpeg_frames(SAMPLE, info.width, info.height))


@pytest.mark.parametrize(("width", "height", "as_tagged"), [(1280, 720, "bt709"), (96, 718, None)])
def test_untagged_frames_are_read_as_players_read_them(tmp_path, width, height, as_tagged):
    """ffmpeg alone reads untagged video as BT.601 at any size; players, and ivvae, as BT.709 from 720 lines."""
    src = tmp_path / "untagged.mp4"
    make_clip(src, 2, width, height)
    ours = unit_float(np.concatenate([f for f, _ in read_frames(src)]))
    assert np.array_equal(
        ours, ffmpeg_frames(src, width, height, filters=f"setparams=colorspace={as_tagged or 'bt470bg'}")
    )
    assert np.array_equal(ours, ffmpeg_frames(src, width, height)) == (as_tagged is None)


@pytest.mark.shared
def test_real_clip_frames_match_ffmpeg():
    src = VIDEOS / "intel-iot-devkit_sample-videos/book.mkv"
    info = probe(src)
    ours = unit_float(next(read_frames(src, max_frames=3, chunk=3))[0])
    assert np.array_equal(ours, ffmpeg_frames(src, info.width, info.height, frames=3))


def test_rotation_is_applied_like_players_do(tmp_path):
    make_clip(tmp_path / "flat.mp4", 2, 48, 32)
    add_rotation(tmp_path / "flat.mp4", tmp_path / "turned.mp4", 90)
    info = probe(tmp_path / "turned.mp4")
    assert (info.width, info.height, info.rotation) == (32, 48, 90)
    ours = unit_float(np.concatenate([f for f, _ in read_frames(tmp_path / "turned.mp4")]))
    assert np.array_equal(ours, ffmpeg_frames(tmp_path / "turned.mp4", 32, 48))


# 1920x1080 at short side 256 was 455x256 before both sides were kept even (issue 41): 455.1 rounds to 456.
@pytest.mark.parametrize(
    ("width", "height", "short", "expected"),
    [
        (640, 272, 256, (602, 256)),
        (272, 640, 256, (256, 602)),
        (1920, 1080, 256, (456, 256)),
        (1080, 1920, 256, (256, 456)),
        (64, 48, 48, (64, 48)),
        (853, 480, 480, (854, 480)),  # already at the short side, but odd: made even, as ffmpeg's scale=-2
        (700, 100, 16, (112, 16)),  # 112.0 exactly
        (900, 800, 256, (288, 256)),  # 288.0
        (1000, 800, 256, (320, 256)),
        (1010, 800, 256, (324, 256)),  # 323.2 -> 324
        (15, 10, 6, (10, 6)),  # 9 exactly: odd, halfway between 8 and 10, rounded up as ffmpeg rounds
    ],
)
def test_resized_keeps_the_aspect_with_even_sides(width, height, short, expected):
    assert resized(width, height, short) == expected
    assert expected[0] % 2 == expected[1] % 2 == 0


def test_resized_refuses_an_odd_short_side():
    with pytest.raises(InputError, match="odd"):
        resized(640, 480, 255)
