"""Colour end to end: ivvae reads sources as players show them (their tags, else what players
assume for the size), writes YUV with an explicit matrix and range and tags it, and the ffmpeg
binary, honouring those tags, reads back the colours meant to within 2 levels."""

from __future__ import annotations

import json
import subprocess
from dataclasses import replace
from fractions import Fraction

import numpy as np
import pytest
from safetensors import safe_open

from ivvae_cli.colour import Colour
from ivvae_cli.latent_file import read_latent_file
from ivvae_cli.metrics import compare_videos
from ivvae_cli.video import VideoWriter, output_format, read_frames, unit_float

from .media import FFMPEG, ffmpeg_colour, ffmpeg_frames, ffmpeg_yuv_clip, patch_colours, patches, write_frames
from .test_cli import ivvae

HD, SD = (1280, 720), (640, 480)
LEVEL = 1 / 255
DECLARED = {
    "bt709-tv": Colour("bt709", "bt709", "bt709", "tv"),
    "bt709-pc": Colour("bt709", "bt709", "bt709", "pc"),
    "bt601-tv": Colour("smpte170m", "smpte170m", "smpte170m", "tv"),
    "bt601-pal-pc": Colour("bt470bg", "bt470bg", "smpte170m", "pc"),
    "untagged": Colour(),
    "untagged-pc": Colour(range="pc"),
    "bt2020-pq": Colour("bt2020nc", "bt2020", "smpte2084", "tv"),
}


def expected_tags(colour: Colour, height: int) -> dict[str, str]:
    """The spec: primaries and transfer as declared, else as players assume (Chromium: BT.709 from
    720 lines, else BT.601 as SMPTE 170M); matrix and range as players assume for the size whatever
    was declared (limited), so that players ignoring tags agree, except a BT.2020 matrix, kept."""
    guess = "bt709" if height >= 720 else "smpte170m"
    wide = colour.matrix == "bt2020nc"
    return {
        "matrix": colour.matrix if wide else guess,
        "primaries": colour.primaries or guess,
        "transfer": colour.transfer or guess,
        "range": colour.range or "tv" if wide else "tv",
    }


def error_levels(ours: np.ndarray, meant: np.ndarray) -> float:
    """The largest difference between the patches of two frames, in 8-bit levels (to 0.001: float32)."""
    return round(float(np.abs(patch_colours(ours) - patch_colours(meant)).max() / LEVEL), 3)


@pytest.mark.parametrize("depth", [8, 10])
@pytest.mark.parametrize("declared", list(DECLARED))
@pytest.mark.parametrize("size", [HD, SD], ids=["720p", "480p"])
def test_written_colours_read_back_as_meant(tmp_path, size, declared, depth):
    width, height = size
    image = patches(width, height)
    # Lossless YUV coding (H.264 at CRF 0, FFV1), so that only the conversion is measured.
    path = tmp_path / ("out.mp4" if depth == 8 else "out.mkv")
    fmt = output_format(
        path, width, height, codec="ffv1" if depth > 8 else None, colour=DECLARED[declared], source_depth=depth,
        chroma="420",
    )  # fmt: skip
    with VideoWriter(path, replace(fmt, crf=0), frame_rate=Fraction(25), time_base=Fraction(1, 25)) as writer:
        writer.write(image[None], [0])
    tags = ffmpeg_colour(path)
    assert tags == {"pix_fmt": "yuv420p" if depth == 8 else "yuv420p10le", **expected_tags(DECLARED[declared], height)}
    back = ffmpeg_frames(path, width, height, deep=depth > 8, exact=True)[0]
    assert error_levels(back, image) <= 2


@pytest.mark.parametrize(
    ("size", "matrix", "full", "tagged", "deep"),
    [
        (HD, "bt709", False, False, False),  # untagged HD: players take BT.709 (ffmpeg alone, BT.601)
        (SD, "bt601", False, False, False),  # untagged SD: BT.601
        (HD, "bt601", False, True, False),  # tagged: as tagged, whatever the size
        (SD, "bt709", True, True, False),
        (HD, "bt709", True, True, True),  # 10 bits, full range
    ],
)
def test_sources_are_read_as_players_show_them(tmp_path, size, matrix, full, tagged, deep):
    width, height = size
    image = patches(width, height)
    src = tmp_path / "src.mkv"
    ffmpeg_yuv_clip(src, image, matrix, full, tagged, deep)
    frames, _ = next(read_frames(src))
    assert frames.dtype == (np.uint16 if deep else np.uint8)
    assert error_levels(unit_float(frames[0]), image) <= 2
    if not tagged and size == HD:  # the assumption matters: read as ffmpeg reads it, the colours are off
        assert error_levels(ffmpeg_frames(src, width, height)[0], image) > 10


def test_compare_scores_what_a_player_shows(tmp_path):
    """The same YUV samples, converted with BT.601: right when tagged so; with a cast when untagged
    at 720p, where players take BT.709. ``compare`` reads them as players do, so the cast scores lower."""
    width, height = HD
    image = patches(width, height)
    write_frames(tmp_path / "ref.mkv", np.rint(image * 255).astype(np.uint8)[None])  # lossless RGB
    ffmpeg_yuv_clip(tmp_path / "tagged.mkv", image, "bt601", full=False, tagged=True)
    ffmpeg_yuv_clip(tmp_path / "untagged.mkv", image, "bt601", full=False, tagged=False)
    tagged, _ = compare_videos(tmp_path / "ref.mkv", tmp_path / "tagged.mkv")
    untagged, _ = compare_videos(tmp_path / "ref.mkv", tmp_path / "untagged.mkv")
    assert tagged.summary()["psnr_db"] > 40
    assert untagged.summary()["psnr_db"] < tagged.summary()["psnr_db"] - 10


@pytest.mark.e2e
@pytest.mark.parametrize(
    ("size", "matrix", "full", "tagged", "deep"),
    [
        ((96, 64), "bt601", True, True, False),  # declared BT.601, full range
        ((96, 64), "bt601", False, False, False),  # untagged SD
        ((96, 720), "bt709", False, False, False),  # untagged HD (720 lines; narrow, to be quick)
        ((96, 64), "bt709", False, True, True),  # 10 bits
    ],
)
def test_decode_writes_what_it_decoded_tagged_as_the_source(tmp_path, checkpoint, size, matrix, full, tagged, deep):
    """The model is not what is measured: the file ``decode`` writes, read by the ffmpeg binary
    through its tags, against what ivvae decoded (its lossless RGB output)."""
    width, height = size
    src = tmp_path / "src.mkv"
    ffmpeg_yuv_clip(src, patches(width, height), matrix, full, tagged, deep)
    assert ivvae("encode", src, tmp_path / "p.latent", "-w", checkpoint, "-q")[0] == 0
    with safe_open(str(tmp_path / "p.latent"), "pt") as f:
        meta = f.metadata()
    declared = ffmpeg_colour(src)
    recorded = {key: meta.get(f"colour_{key}") for key in ("matrix", "primaries", "transfer", "range")}
    assert recorded == {key: declared[key] for key in recorded}  # absent stays absent
    assert meta["bit_depth"] == ("10" if deep else "8")
    exact, out = tmp_path / "exact.mkv", tmp_path / ("out.mkv" if deep else "out.mp4")
    assert ivvae("decode", tmp_path / "p.latent", exact, "--lossless", "-w", checkpoint, "-q")[0] == 0
    near = ["--codec", "ffv1"] if deep else ["--crf", "0"]  # lossless YUV
    code, _, err = ivvae("decode", tmp_path / "p.latent", out, "--chroma", "444", *near, "-w", checkpoint, "-q")
    assert code == 0, err
    colour = Colour(**{key: declared[key] for key in ("matrix", "primaries", "transfer", "range")})
    pix_fmt = "yuv444p10le" if deep else "yuv444p"
    assert ffmpeg_colour(out) == {"pix_fmt": pix_fmt, **expected_tags(colour, height)}
    rgb = {**expected_tags(colour, height), "matrix": "gbr", "range": "pc"}
    assert ffmpeg_colour(exact) == {"pix_fmt": "gbrp10le" if deep else "bgr0", **rgb}
    written = ffmpeg_frames(out, width, height, deep=deep, exact=True)
    decoded = ffmpeg_frames(exact, width, height, deep=deep)
    assert np.abs(written - decoded).max() <= 2.001 * LEVEL


@pytest.mark.e2e
def test_odd_sizes_say_once_how_to_get_a_file_browsers_play(tmp_path, checkpoint):
    src = tmp_path / "odd.mkv"
    write_frames(src, np.rint(patches(97, 65) * 255).astype(np.uint8)[None])
    assert ivvae("encode", src, tmp_path / "o.latent", "-w", checkpoint, "-q")[0] == 0
    code, _, err = ivvae("decode", tmp_path / "o.latent", tmp_path / "a.mp4", "-w", checkpoint)
    assert code == 0, err
    assert err.count("--chroma 420") == 1 and "few browsers" in err
    assert ffmpeg_colour(tmp_path / "a.mp4")["pix_fmt"] == "yuv444p"
    code, _, err = ivvae(
        "decode", tmp_path / "o.latent", tmp_path / "b.mp4", "--chroma", "420", "--crf", "0", "-w", checkpoint
    )
    assert code == 0, err
    assert ffmpeg_colour(tmp_path / "b.mp4")["pix_fmt"] == "yuv420p"
    code, out, _ = ivvae("info", tmp_path / "b.mp4", "--json", "-")
    report = json.loads(out)
    assert report["size"] == [98, 66] and "the picture is 97x65" in report["comment"]
    raw = subprocess.run(
        [FFMPEG, "-v", "error", "-i", tmp_path / "b.mp4", "-f", "rawvideo", "-pix_fmt", "yuv420p", "-"],
        capture_output=True,
        check=True,
    ).stdout
    luma = np.frombuffer(raw, np.uint8)[: 98 * 66].reshape(66, 98)  # lossless (CRF 0): the samples written
    assert np.array_equal(luma[:, -1], luma[:, -2]) and np.array_equal(luma[-1], luma[-2])  # repeated


@pytest.mark.e2e
def test_deep_sources_come_back_deep_where_the_codec_holds_it(tmp_path, checkpoint):
    src = tmp_path / "deep.mkv"
    ffmpeg_yuv_clip(src, patches(96, 64), "bt709", full=False, tagged=True, deep=True)
    assert ivvae("encode", src, tmp_path / "d.latent", "-w", checkpoint, "-q")[0] == 0
    latent = tmp_path / "d.latent"
    assert ivvae("decode", latent, tmp_path / "d.mkv", "--codec", "h265", "-w", checkpoint)[0] == 0
    assert ffmpeg_colour(tmp_path / "d.mkv")["pix_fmt"] == "yuv420p10le"
    code, _, err = ivvae("decode", latent, tmp_path / "d.mp4", "-w", checkpoint)  # H.264: 8 bits, and says so
    assert code == 0 and ffmpeg_colour(tmp_path / "d.mp4")["pix_fmt"] == "yuv420p"
    assert err.count("--bit-depth 10") == 1
    code, _, err = ivvae("decode", latent, tmp_path / "e.mp4", "--bit-depth", "10", "-w", checkpoint, "-q")
    assert code == 0 and ffmpeg_colour(tmp_path / "e.mp4")["pix_fmt"] == "yuv420p10le"
    code, _, err = ivvae("decode", latent, tmp_path / "f.mkv", "--codec", "h265", "--bit-depth", "8", "-w", checkpoint)
    assert code == 0 and ffmpeg_colour(tmp_path / "f.mkv")["pix_fmt"] == "yuv420p"
    for bad in (["--lossless", "--bit-depth", "10"], ["--bit-depth", "12"], ["--chroma", "422"]):
        code, _, err = ivvae("decode", latent, tmp_path / "g.mp4", *bad, "-w", checkpoint, "-q")
        assert code == 4 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
        assert not (tmp_path / "g.mp4").exists()


@pytest.mark.e2e
def test_info_shows_the_colour_of_latents_and_videos(tmp_path, checkpoint):
    src = tmp_path / "src.mkv"
    ffmpeg_yuv_clip(src, patches(96, 64), "bt709", full=True, tagged=True)
    code, out, _ = ivvae("info", src, "--json", "-")
    report = json.loads(out)
    assert code == 0 and report["colour"] == {"matrix": "bt709", "primaries": None, "transfer": None, "range": "pc"}
    assert report["colour_read_as"]["matrix"] == "bt709"
    assert ivvae("encode", src, tmp_path / "c.latent", "-w", checkpoint, "-q")[0] == 0
    code, out, _ = ivvae("info", tmp_path / "c.latent", "--json", "-")
    report = json.loads(out)
    assert (report["colour_matrix"], report["colour_primaries"], report["colour_range"]) == ("bt709", None, "pc")
    sd = "smpte170m"  # 96x64: BT.601, limited, whatever the source coded with (see expected_tags)
    assert report["decode_colour"] == {"matrix": sd, "primaries": sd, "transfer": sd, "range": "tv"}
    code, out, _ = ivvae("info", tmp_path / "c.latent")
    assert code == 0 and "decode_colour" in out


@pytest.mark.e2e
def test_an_odd_short_side_is_refused_in_one_line(tmp_path, checkpoint):
    src = tmp_path / "src.mkv"
    ffmpeg_yuv_clip(src, patches(96, 64), "bt601", full=False, tagged=False)
    code, _, err = ivvae("encode", src, tmp_path / "x.latent", "--short-side", "33", "-w", checkpoint, "-q")
    assert code == 3 and "odd" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x.latent").exists()


@pytest.mark.e2e
def test_dataset_latents_record_the_colour_too(tmp_path, checkpoint):
    (tmp_path / "in").mkdir()
    ffmpeg_yuv_clip(tmp_path / "in" / "a.mkv", patches(96, 64), "bt709", full=True, tagged=True)
    code, _, err = ivvae(
        "dataset", "encode", tmp_path / "in", tmp_path / "out", "-w", checkpoint, "--frames", "1", "-q"
    )
    assert code == 0, err
    (latent,) = (tmp_path / "out").rglob("*.latent")
    h = read_latent_file(latent).header
    assert (h.colour_matrix, h.colour_primaries, h.colour_transfer, h.colour_range, h.bit_depth) == (
        "bt709", None, None, "pc", 8,
    )  # fmt: skip
