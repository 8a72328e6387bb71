"""Untrusted input (issue 37): hand-edited and damaged latent files, damaged videos and broken
timestamps get a result or a one-line error with its exit code, never a traceback, and leave no
output behind. The fuzz tests run a few hundred examples in all; IVVAE_FUZZ_EXAMPLES=N runs N per
test (and random ones, where CI's are the same every run)."""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from datetime import timedelta
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ivvae_cli.errors import InputError, IvvaeWarning
from ivvae_cli.latent_file import LatentHeader, inspect_latent_file
from ivvae_cli.video import read_frames

from .media import FFMPEG, make_clip, stream_facts
from .test_cli import ivvae, leftovers

FUZZ_EXAMPLES = os.environ.get("IVVAE_FUZZ_EXAMPLES")
DOCUMENTED_EXIT_CODES = {3, 4, 5}  # input, output (a container that cannot hold it), weights (a fingerprint)


def fuzz_settings(examples: int):
    """``examples`` in CI, the same each run; IVVAE_FUZZ_EXAMPLES random ones locally."""
    return settings(
        max_examples=int(FUZZ_EXAMPLES) if FUZZ_EXAMPLES else examples,
        derandomize=not FUZZ_EXAMPLES,
        deadline=timedelta(seconds=120),  # per example: a hang or a crawl fails
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture, HealthCheck.data_too_large],
    )


@pytest.fixture(scope="module")
def small(tmp_path_factory, checkpoint) -> dict[str, Path]:
    """A 2-frame clip with audio and its latent file: small enough to decode in a blink."""
    folder = tmp_path_factory.mktemp("small")
    clip = folder / "clip.mp4"
    make_clip(clip, 2, 16, 16, audio=True)
    latent = folder / "clip.latent"
    code, _, err = ivvae("encode", clip, latent, "-w", checkpoint, "-q")
    assert code == 0, err
    return {"clip": clip, "latent": latent}


def edited(source: Path, target: Path, meta: dict[str, str | None] | None = None, **tensors) -> Path:
    """A copy of a latent file with metadata fields replaced (None: removed) and tensors replaced."""
    with safe_open(str(source), "pt") as f:
        metadata = f.metadata()
    for key, value in (meta or {}).items():
        if value is None:
            metadata.pop(key, None)
        else:
            metadata[key] = value
    save_file(load_file(str(source)) | tensors, str(target), metadata=metadata)
    return target


def run(*args: str | Path) -> tuple[int, str]:
    """The exit code and stderr of an ivvae command."""
    code, _, err = ivvae(*args)
    return code, err


def assert_refused(code: int, err: str, output: Path, message: str) -> None:
    """A refusal: exit code 3, one line naming the problem, no traceback, nothing left behind."""
    assert code == 3, err
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: "), err
    assert message in err and "Traceback" not in err, err
    assert not output.exists() and leftovers(output.parent) == []


def assert_allowed(code: int, err: str, output: Path | None) -> None:
    """Success, or a one-line error with a documented exit code, and no output left behind."""
    if code == 0:
        assert err == "", err  # -q: nothing to say
    else:
        assert code in DOCUMENTED_EXIT_CODES, err
        assert len(err.strip().splitlines()) == 1 and err.startswith("error: "), err
        assert output is None or not output.exists()
    if output is not None:
        assert leftovers(output.parent) == []


# -- latent files -----------------------------------------------------------------------------------


@pytest.mark.e2e
@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("frame_rate", "0/0", "header field 'frame_rate' is \"0/0\": not a fraction"),
        ("frame_rate", "1/0", "not a fraction"),
        ("frame_rate", "abc", "not a fraction"),
        ("frame_rate", "-25", "not positive"),
        ("frame_rate", "1000000000", "too high for the writer's time base"),
        ("time_base", "1/4294967296", "do not fit in 32 bits"),
        ("source_width", "-16", "header field 'source_width' is \"-16\": not positive"),
        ("source_width", "17", "padded size 5x16x16 does not fit source size 2x16x17: it must be 5x16x24"),
        ("source_frames", "1000000000000", "padded size 5x16x16 does not fit source size 1000000000000x16x16"),
        ("z_dim", "16.0", "not a 64-bit integer"),
        ("z_dim", "true", "not a 64-bit integer"),
        ("z_dim", "99999999999999999999", "not a 64-bit integer"),
        ("z_dim", "8", "tensor 'latent' has shape [1, 16, 2, 2, 2]; the header makes it [1, 8, 2, 2, 2]"),
        ("scale_factor", "NaN", "NaN is not a number"),
        ("scale_factor", "0", "zero"),
        ("start_time", "1e999", "not a finite number"),
        ("start_time", "{", "header field 'start_time'"),
        ("tiling", "[1]", "not a JSON object"),
        ("tiling", "[" * 100000, "header field 'tiling'"),
        ("dtype", "float64", "not one of float32, bfloat16, float16"),
        ("posterior", "median", "not one of mean, sample, both"),
        ("colour_matrix", "rainbow", "header field 'colour_matrix' is \"rainbow\": not one of gbr, bt709"),
        ("colour_range", "full", "not one of tv, pc"),
        ("bit_depth", "99", "not a bit depth from 8 to 16"),
        ("posterior", "both", "posterior 'both' with no tensor 'logvar'"),
        ("model", "../../etc/passwd", "not a model name"),
        ("weights_fingerprint", "[/]", "not 16 hexadecimal digits"),
        ("format_version", "two", "not a version number"),
        ("format_version", "99", "newer than this ivvae"),
        ("format", "[/bold]\nline", "a \"[/bold]\\nline\" file (no 'ivvae-latent' format tag)"),
        ("frame_rate", None, "the header lacks the field 'frame_rate'"),
    ],
)
def test_header_fields_are_checked(tmp_path, small, checkpoint, field, value, message):
    bad = edited(small["latent"], tmp_path / "bad.latent", {field: value})
    out = tmp_path / "out.mp4"
    assert_refused(*run("decode", bad, out, "-w", checkpoint, "-q"), out, message=message)
    code, report, err = ivvae("info", bad, "--json", "-")
    assert code == 3 and len(err.strip().splitlines()) == 1, err
    report = json.loads(report)
    assert any(message in p for p in report["problems"]), report["problems"]
    if field not in ("format", "format_version", "model"):
        assert report["model"] == "ivvae_z16_dim8"  # what it could read


@pytest.mark.e2e
def test_a_header_claiming_an_enormous_video_is_refused_from_the_header(tmp_path, small, checkpoint):
    huge = {"source_frames": "1000000001", "source_height": "100000", "source_width": "100000"}
    huge |= {"padded_frames": "1000000001", "padded_height": "100000", "padded_width": "100000"}
    bad = edited(small["latent"], tmp_path / "huge.latent", huge)
    report = inspect_latent_file(bad)
    assert report.data is None  # no tensor was read
    claim = "the tensor 'latent' has shape [1, 16, 2, 2, 2]; the header makes it [1, 16, 250000001, 12500, 12500]"
    assert claim in report.problems
    out = tmp_path / "out.mp4"
    assert_refused(*run("decode", bad, out, "-w", checkpoint, "-q"), out, message=claim)


@pytest.mark.e2e
@pytest.mark.parametrize(
    ("name", "tensor", "message"),
    [
        ("frame_pts", torch.tensor([0.0, 1.0]), "the tensor 'frame_pts' is F32, not I64"),
        (
            "latent",
            torch.zeros(1, 16, 2, 2, 2, dtype=torch.int32),
            "the tensor 'latent' is I32, not F32 or BF16 or F16",
        ),
        ("audio", torch.zeros(4, 4, dtype=torch.uint8), "the tensor 'audio' has shape [4, 4], not one dimension"),
        ("logvar", torch.zeros(1, 16, 2, 2, 2), "posterior 'mean' with tensor 'logvar'"),
        ("frame_pts", torch.tensor([0, 2**62]), "past what containers hold"),
        ("frame_pts", torch.tensor([0, -40]), "frame 1's timestamp is negative"),
        ("frame_pts", torch.tensor([40, 40]), "frame 1's timestamp (40) is not after frame 0's (40)"),
    ],
)
def test_tensors_are_checked(tmp_path, small, checkpoint, name, tensor, message):
    bad = edited(small["latent"], tmp_path / "bad.latent", **{name: tensor})
    out = tmp_path / "out.mp4"
    assert_refused(*run("decode", bad, out, "-w", checkpoint, "-q"), out, message=message)


@pytest.mark.e2e
def test_a_gap_a_container_cannot_hold_is_a_one_line_output_error(tmp_path, small, checkpoint):
    # 2**32 ticks of 1/12800 s: 3.9 days between two frames, within the format's reach (2**26 of
    # the writer's ticks at 25 fps) but more than an MP4 holds between two samples.
    bad = edited(small["latent"], tmp_path / "gap.latent", frame_pts=torch.tensor([0, 2**32]))
    code, err = run("decode", bad, tmp_path / "gap.mp4", "-w", checkpoint, "-q")
    assert code == 4 and err.startswith("error: cannot write the frame at 335544 s into .mp4"), err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "gap.mp4").exists() and leftovers(tmp_path) == []
    assert run("decode", bad, tmp_path / "gap.mkv", "-w", checkpoint, "-q")[0] == 0


@pytest.mark.e2e
def test_a_latent_with_nan_or_inf_is_refused_saying_where(tmp_path, checkpoint):
    make_clip(tmp_path / "in.mp4", 9, 16, 16)
    assert ivvae("encode", tmp_path / "in.mp4", tmp_path / "in.latent", "-w", checkpoint, "-q")[0] == 0
    latent = load_file(str(tmp_path / "in.latent"))["latent"]
    latent[0, 3, 1, 0, 0] = float("nan")
    latent[0, 3, 2, 1, 1] = float("inf")
    latent[0, 5, 2, 0, 1] = -float("inf")
    bad = edited(tmp_path / "in.latent", tmp_path / "bad.latent", latent=latent)
    out = tmp_path / "out.mp4"
    where = "3 NaN or infinite value(s), in latent frame(s) 1-2 (video frames 1-8), channel(s) 3, 5"
    assert_refused(*run("decode", bad, out, "-w", checkpoint, "-q"), out, message=where)
    code, out, _ = ivvae("info", bad, "--json", "-")
    assert code == 3 and any(where in p for p in json.loads(out)["problems"])


@pytest.mark.e2e
def test_unreadable_audio_is_left_out_with_a_warning_or_refused_with_strict(tmp_path, small, checkpoint):
    junk = torch.from_numpy(np.random.default_rng(0).integers(0, 256, 3000, dtype=np.uint8))
    bad = edited(small["latent"], tmp_path / "bad.latent", audio=junk)
    out = tmp_path / "out.mp4"
    code, _, err = ivvae("decode", bad, out, "-w", checkpoint)
    assert code == 0, err
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "its audio cannot be read" in warnings[0] and "leaving it out" in warnings[0]
    facts = stream_facts(out)
    assert facts["frames"] == 2 and facts["audio"] == []
    out = tmp_path / "strict.mp4"
    assert_refused(
        *run("decode", bad, out, "-w", checkpoint, "-q", "--strict"), out, message="its audio cannot be read"
    )
    code, report, _ = ivvae("info", bad, "--json", "-")
    report = json.loads(report)
    assert code == 0 and report["problems"] == [] and report["audio_problem"]
    assert ivvae("decode", small["latent"], tmp_path / "ok.mp4", "-w", checkpoint, "-q", "--strict")[0] == 0


@pytest.mark.e2e
def test_info_on_a_truncated_latent_says_what_is_wrong(tmp_path, small):
    bad = tmp_path / "cut.latent"
    bad.write_bytes(small["latent"].read_bytes()[:-100])
    code, out, err = ivvae("info", bad)
    assert code == 3 and "problem" in out and "truncated or not a safetensors file" in out
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1


# -- damaged videos ---------------------------------------------------------------------------------


def damaged_png_clip(path: Path, frames: int, bad_frame: int) -> None:
    """A PNG clip (each frame a packet the decoder checks) with one frame's signature broken."""
    make_clip(path, frames, 24, 16, codec="png", pix_fmt="rgb24", options={})
    with av.open(str(path)) as container:
        packets = [(p.pos, p.size) for p in container.demux(video=0) if p.size]
    data = bytearray(path.read_bytes())
    data[packets[bad_frame][0] : packets[bad_frame][0] + 8] = bytes(8)
    path.write_bytes(bytes(data))


def test_a_damaged_frame_stops_reading_or_is_left_out_and_counted(tmp_path):
    src = tmp_path / "damaged.mov"
    damaged_png_clip(src, 9, 4)
    with pytest.raises(InputError, match=r"damaged\.mov is damaged at frame 4: .*--skip-errors"):
        list(read_frames(src))
    with pytest.warns(IvvaeWarning, match=r"1 damaged frame\(s\) left out"):
        reader = read_frames(src, skip_errors=True)
        frames = np.concatenate([f for f, _ in reader])
    assert len(frames) == 8 and reader.lost == 1


@pytest.mark.e2e
def test_damaged_video_fails_naming_the_frame_unless_skip_errors(tmp_path, checkpoint):
    src = tmp_path / "damaged.mov"
    damaged_png_clip(src, 9, 4)
    for command, out in (("encode", tmp_path / "d.latent"), ("reconstruct", tmp_path / "d.mkv")):
        assert_refused(
            *run(command, src, out, "-w", checkpoint, "-q"), out, message="damaged.mov is damaged at frame 4"
        )
    code, _, err = ivvae("encode", src, tmp_path / "d.latent", "-w", checkpoint, "--skip-errors")
    assert code == 0, err
    assert [line for line in err.splitlines() if line.startswith("warning:")] == [
        f"warning: {src}: 1 damaged frame(s) left out"
    ]
    with safe_open(str(tmp_path / "d.latent"), "pt") as f:
        assert f.metadata()["source_frames"] == "8"


# -- timestamps -------------------------------------------------------------------------------------


def all_at_zero(source: Path, target: Path) -> None:
    """A copy of a clip with every packet's timestamps set to 0 (ffmpeg's setts filter)."""
    subprocess.run(
        [FFMPEG, "-v", "error", "-i", str(source), "-c", "copy", "-bsf:v", "setts=pts=0:dts=0", str(target)], check=True
    )


@pytest.mark.e2e
@pytest.mark.parametrize(
    ("source", "kwargs", "broken"),
    [
        ("in.mkv", {"codec": "ffv1", "pix_fmt": "yuv444p"}, "same.mkv"),  # every frame at 0
        ("in.mp4", {}, "same.mp4"),  # the MP4 muxer makes them distinct, then decoding reorders them
    ],
)
def test_broken_timestamps_fall_back_to_the_declared_rate(tmp_path, checkpoint, source, kwargs, broken):
    make_clip(tmp_path / source, 9, 16, 16, **kwargs)
    src = tmp_path / broken
    all_at_zero(tmp_path / source, src)
    facts = stream_facts(src)
    assert facts["pts"] != sorted(set(facts["pts"]))  # broken indeed
    code, _, err = ivvae("encode", src, tmp_path / "s.latent", "-w", checkpoint)
    assert code == 0, err
    said = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(said) == 1 and "timing frames by the declared rate, 25 fps" in said[0], err
    assert ivvae("decode", tmp_path / "s.latent", tmp_path / "d.mkv", "-w", checkpoint, "-q")[0] == 0
    assert ivvae("reconstruct", src, tmp_path / "r.mkv", "-w", checkpoint, "-q")[0] == 0
    for out in ("d.mkv", "r.mkv"):
        facts = stream_facts(tmp_path / out)
        assert facts["frames"] == 9 and facts["rate"] == 25
        assert [p * facts["time_base"] for p in facts["pts"]] == [Fraction(i, 25) for i in range(9)]


@pytest.mark.e2e
def test_a_dataset_keeps_each_sources_warnings_in_its_record(tmp_path, checkpoint):
    make_clip(tmp_path / "in.mkv", 9, 16, 16, codec="ffv1", pix_fmt="yuv444p")
    (tmp_path / "videos").mkdir()
    all_at_zero(tmp_path / "in.mkv", tmp_path / "videos" / "same.mkv")
    out = tmp_path / "out"
    code, _, err = ivvae("dataset", "encode", tmp_path / "videos", out, "-w", checkpoint, "--frames", "5")
    assert code == 0 and "warning" not in err.lower().replace("1 with warnings", ""), err
    assert "1 with warnings (in their records)" in err
    record = json.loads((out / "records" / "same.mkv.json").read_text())
    assert len(record["warnings"]) == 1 and "declared rate, 25 fps" in record["warnings"][0]
    assert len(record["rows"]) == 1


@pytest.mark.e2e
def test_missing_timestamps_take_the_declared_rate(tmp_path, checkpoint):
    make_clip(tmp_path / "in.mp4", 5, 16, 16, fps=Fraction(30))
    subprocess.run([FFMPEG, "-v", "error", "-i", str(tmp_path / "in.mp4"), "-c", "copy", str(tmp_path / "raw.h264")])
    assert ivvae("reconstruct", tmp_path / "raw.h264", tmp_path / "r.mkv", "-w", checkpoint, "-q")[0] == 0
    facts = stream_facts(tmp_path / "r.mkv")
    assert facts["frames"] == 5 and facts["rate"] == 30


# -- fuzz -------------------------------------------------------------------------------------------

HEADER_FIELDS = [f.name for f in LatentHeader.__dataclass_fields__.values()]
TEXT_VALUES = st.one_of(
    st.sampled_from(["0", "-1", "0/0", "1/0", "abc", "", "NaN", "-Infinity", "1e999", "null", "true", "[1]", "{}"]),
    st.sampled_from(["[/]", '"25"', "25", "30000/1001", "float32", "sample", "ffffffffffffffff", "../x", "9" * 5000]),
    st.integers(-(2**70), 2**70).map(str),
    st.floats().map(json.dumps),
    st.fractions().map(str),
    st.text(max_size=12),
)


@pytest.mark.e2e
@fuzz_settings(80)
@given(
    changes=st.dictionaries(st.sampled_from(HEADER_FIELDS), st.one_of(st.none(), TEXT_VALUES), max_size=4),
    pts=st.one_of(st.none(), st.lists(st.integers(-(2**63), 2**63 - 1), min_size=2, max_size=2)),
)
def test_fuzz_header_values(small, checkpoint, changes, pts):
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        tensors = {} if pts is None else {"frame_pts": torch.tensor(pts, dtype=torch.int64)}
        bad = edited(small["latent"], folder / "bad.latent", changes, **tensors)
        out = folder / "out.mp4"
        assert_allowed(*run("decode", bad, out, "-w", checkpoint, "-q"), out)
        assert_allowed(*run("info", bad, "--json", "-"), None)


@st.composite
def damage(draw, data: bytes) -> bytes:
    """``data`` truncated, or with bytes flipped (scattered, or a run of them)."""
    data = bytearray(data)
    kind = draw(st.sampled_from(["truncate", "flip", "run"]))
    if kind == "truncate":
        return bytes(data[: draw(st.integers(0, len(data) - 1))])
    if kind == "flip":
        for position in draw(st.lists(st.integers(0, len(data) - 1), min_size=1, max_size=16)):
            data[position] ^= draw(st.integers(1, 255))
    else:
        start = draw(st.integers(0, len(data) - 1))
        data[start : start + 64] = draw(st.binary(min_size=64, max_size=64))
    return bytes(data)


@pytest.mark.e2e
@fuzz_settings(80)
@given(data=st.data())
def test_fuzz_latent_bytes(small, checkpoint, data):
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        bad = folder / "bad.latent"
        bad.write_bytes(data.draw(damage(small["latent"].read_bytes())))
        out = folder / "out.webm"
        assert_allowed(*run("decode", bad, out, "-w", checkpoint, "-q"), out)
        assert_allowed(*run("info", bad, "--json", "-"), None)


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> list[Path]:
    """Small clips in the containers and codecs users bring: H.264 and AAC in MP4, VP9 in WebM,
    FFV1 in Matroska, PNG in QuickTime."""
    folder = tmp_path_factory.mktemp("clips")
    make_clip(folder / "a.mp4", 3, 16, 16, audio=True)
    make_clip(folder / "b.webm", 3, 16, 16, codec="libvpx-vp9", pix_fmt="yuv420p", options={})
    make_clip(folder / "c.mkv", 3, 16, 16, codec="ffv1", pix_fmt="yuv444p")
    make_clip(folder / "d.mov", 3, 16, 16, codec="png", pix_fmt="rgb24", options={})
    return sorted(folder.iterdir())


@pytest.mark.e2e
@fuzz_settings(30)
@given(data=st.data(), skip_errors=st.booleans())
def test_fuzz_video_bytes(clips, checkpoint, data, skip_errors):
    clip = data.draw(st.sampled_from(clips))
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        bad = folder / f"bad{clip.suffix}"
        bad.write_bytes(data.draw(damage(clip.read_bytes())))
        options = ["-w", checkpoint, "-q", *(["--skip-errors"] if skip_errors else [])]
        out = folder / "out.latent"
        assert_allowed(*run("encode", bad, out, *options), out)
        out = folder / "out.mkv"
        assert_allowed(*run("reconstruct", bad, out, *options), out)
        assert_allowed(*run("info", bad, "--json", "-"), None)
