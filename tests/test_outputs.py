"""Where ivvae writes (issue 45): every name derived from input (a manifest's paths, ids and spans,
the mirrored paths of a folder decode) lands under the output folder it was asked for, or the input
it came from fails in one line while the rest goes on."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from ivvae_cli.dataset import read_sources
from ivvae_cli.errors import OutputError
from ivvae_cli.outputs import name_problem, place_under

from .media import make_clip
from .test_dataset import ivvae, partials


@pytest.mark.parametrize(
    ("name", "problem"),
    [
        ("a/b.latent", None),
        ("a//./b/../c.latent", None),  # empty, . and .. segments resolved lexically, staying inside
        ("../a.latent", "climbs out"),
        ("a/../../b.latent", "climbs out"),
        ("/etc/passwd", "absolute"),
        ("", "names no file"),
        ("a/..", "names no file"),
        ("a\x00b", "control character"),
        ("a\nb/c", "control character"),
        ("a/" + "x" * 256, "longer than 255 bytes"),
        ("é" * 128, "longer than 255 bytes"),  # 256 bytes in UTF-8
        ("x" * 255, None),
    ],
)
def test_a_derived_name_is_placed_under_its_folder_or_refused(tmp_path, name, problem):
    said = name_problem(name)
    assert said is None if problem is None else problem in said
    if problem is None:
        assert place_under(tmp_path, name).resolve().is_relative_to(tmp_path.resolve())
    else:
        with pytest.raises(OutputError, match=problem):
            place_under(tmp_path, name)


def test_a_link_under_the_folder_that_leads_out_is_refused(tmp_path):
    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    (out / "inner").mkdir(parents=True)
    elsewhere.mkdir()
    (out / "away").symlink_to(elsewhere)
    (out / "here").symlink_to(out / "inner")  # a link that stays inside is fine
    with pytest.raises(OutputError, match="a link there leads out"):
        place_under(out, "away/clip.latent")
    with pytest.raises(OutputError, match="a link there leads out"):
        place_under(out, "away")
    assert place_under(out, "here/clip.latent") == out / "here" / "clip.latent"
    link_to_out = tmp_path / "link-to-out"
    link_to_out.symlink_to(out)  # the output folder named through a link
    assert place_under(link_to_out, "inner/a") == link_to_out / "inner" / "a"


def _hostile_collection(tmp_path: Path) -> tuple[Path, dict[str, str], set[str]]:
    """A JSONL manifest of hostile rows over real clips; returns it, the output name (key) each row
    that can be encoded must get, and the paths of the rows that must fail."""
    collection, outside = tmp_path / "collection", tmp_path / "outside"
    for folder in (collection / "sub", collection / "_outside", collection / "linked", outside):
        folder.mkdir(parents=True)
    for name in ("v0.mkv", "v1.mkv", "v2.mkv", "_outside/v3.mkv", "linked/v4.mkv", "bad\nname.mkv", "x" * 250 + ".mkv"):
        make_clip(collection / name, 5, 48, 32, codec="ffv1", pix_fmt="bgr0")
    for name in ("o1.mkv", "o2.mkv", "o3.mkv"):
        make_clip(outside / name, 5, 48, 32, codec="ffv1", pix_fmt="bgr0")
    rows = [
        {"path": "v0.mkv", "id": "../../../../escape/id", "caption": "an id that climbs"},
        {"path": "v1.mkv", "id": "/etc/passwd", "start": 0, "end": 5},
        {"path": "../outside/o1.mkv"},
        {"path": str(outside / "o2.mkv")},
        {"path": "sub/../../outside/o3.mkv"},
        {"path": "_outside/v3.mkv"},  # inside, in a folder named like the one for sources outside
        {"path": "linked/v4.mkv"},  # its output folder will be a link that leads out
        {"path": "v2.mkv", "start": "../1"},
        {"path": "v2.mkv", "start": "5/../..", "end": "1"},
        {"path": "bad\nname.mkv"},
        {"path": "x" * 250 + ".mkv", "start": 0, "end": 5},  # its record's name would be too long
    ]
    manifest = collection / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    absolute = str(outside.resolve()).lstrip("/")
    encoded = {
        "v0.mkv": "v0.mkv",
        "v1.mkv": "v1.mkv",
        "../outside/o1.mkv": f"_outside/{absolute}/o1.mkv",
        str(outside / "o2.mkv"): f"_outside/{absolute}/o2.mkv",
        "sub/../../outside/o3.mkv": f"_outside/{absolute}/o3.mkv",
        "_outside/v3.mkv": "_inside/_outside/v3.mkv",
    }
    failing = {"linked/v4.mkv", "v2.mkv", "bad\nname.mkv", "x" * 250 + ".mkv"}
    return manifest, encoded, failing


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file() and not p.is_symlink()}


def test_hostile_rows_get_safe_names_or_fail_alone(tmp_path):
    manifest, encoded, failing = _hostile_collection(tmp_path.resolve())
    by_path = {}
    for source in read_sources(manifest):
        by_path.setdefault(os.path.relpath(source.path, manifest.parent), []).append(source)
    assert by_path["v0.mkv"][0].key == "v0.mkv" and by_path["v0.mkv"][0].problem is None
    assert by_path[os.path.join("..", "outside", "o3.mkv")][0].key == encoded["sub/../../outside/o3.mkv"]
    for path in failing - {"linked/v4.mkv"}:  # the link is the output folder's, not the row's
        assert by_path[path] and all(s.problem is not None for s in by_path[path]), path
    assert len(by_path["v2.mkv"]) == 2 and by_path["linked/v4.mkv"][0].problem is None
    assert all(s.key.startswith("_unplaceable/") for s in by_path["v2.mkv"])
    assert "'start' is not a number: '../1'" in by_path["v2.mkv"][0].problem + by_path["v2.mkv"][1].problem
    assert "control character" in by_path["bad\nname.mkv"][0].problem
    assert "longer than 255 bytes" in by_path["x" * 250 + ".mkv"][0].problem


@pytest.mark.e2e
def test_a_hostile_manifest_writes_nothing_outside_its_output_folder(tmp_path, checkpoint):
    root = tmp_path.resolve()
    manifest, encoded, failing = _hostile_collection(root)
    out, elsewhere = root / "out", root / "elsewhere"
    (out / "latents").mkdir(parents=True)
    elsewhere.mkdir()
    (out / "latents" / "linked").symlink_to(elsewhere)
    before = {k: v for k, v in _files(root).items() if not k.startswith(str(out))}
    args = ["dataset", "encode", manifest, out, "-w", checkpoint, "--frames", "5", "-q", "--max-errors", "20"]
    code, _, err = ivvae(*args)
    assert code == 0, err
    after = {k: v for k, v in _files(root).items() if not k.startswith(str(out))}
    assert after == before, "a file outside the output folder was written or changed"
    assert list(elsewhere.iterdir()) == []
    written = [p for p in out.rglob("*") if p.is_file()]
    assert written and all(p.resolve().is_relative_to(out) for p in written)
    rows = [json.loads(line) for line in (out / "index.jsonl").read_text().splitlines()]
    by_source = {os.path.relpath(r["source_path"], manifest.parent): r for r in rows}
    expected = {os.path.normpath(p) if not os.path.isabs(p) else os.path.relpath(p, manifest.parent): key
                for p, key in encoded.items()}  # fmt: skip
    assert {p: r["source"] for p, r in by_source.items()} == expected
    for row in rows:
        assert (out / row["latent"]).resolve().is_relative_to(out / "latents")
        assert row["latent"].startswith(f"latents/{row['source']}/")
    assert by_source["v0.mkv"]["id"] == "../../../../escape/id"  # carried as data, never a path
    errors = [json.loads(line) for line in (out / "errors.jsonl").read_text().splitlines()]
    assert sorted(os.path.relpath(e["path"], manifest.parent) for e in errors) == sorted(
        [*failing, "v2.mkv"]  # two rows of v2.mkv, both with spans that are not spans
    )
    assert all("\n" not in e["reason"] for e in errors)
    linked = next(e for e in errors if e["path"].endswith("v4.mkv"))
    assert "a link there leads out" in linked["reason"]
    assert partials(out) == []
    again = ivvae(*args)  # a second run redoes only what failed, and fails it the same way
    assert again[0] == 0 and (out / "index.jsonl").read_text().count("\n") == len(rows)
    assert list(elsewhere.iterdir()) == []


@pytest.mark.e2e
def test_decode_of_a_folder_mirrors_only_inside_its_output_folder(tmp_path, checkpoint, monkeypatch):
    root = tmp_path.resolve()
    latents = root / "a" / "latents"
    for name in ("keep/one.latent", "away/two.latent", "three.latent"):
        (latents / name).parent.mkdir(parents=True, exist_ok=True)
        assert ivvae("encode", _clip(root), latents / name, "-w", checkpoint, "-q")[0] == 0
    videos, elsewhere = root / "videos", root / "elsewhere"
    videos.mkdir()
    elsewhere.mkdir()
    (videos / "away").symlink_to(elsewhere)
    code, _, err = ivvae("decode", latents, videos, "-w", checkpoint, "-q")
    assert code == 3 and "1 of 3 latent files failed" in err and "a link there leads out" in err, err
    assert sorted(p.relative_to(videos).as_posix() for p in videos.rglob("*.mp4")) == ["keep/one.mp4", "three.mp4"]
    assert list(elsewhere.iterdir()) == []
    # A glob whose matches climb above the folder it is taken from.
    (root / "a" / "b" / "c").mkdir(parents=True)
    monkeypatch.chdir(root / "a" / "b")
    code, _, err = ivvae("decode", "*/../../latents/*.latent", root / "more", "-w", checkpoint, "-q")
    assert code == 4 and "climbs out" in err and not (root / "three.mp4").exists(), err
    assert not (root / "more").exists()
    code, _, err = ivvae("decode", latents, root / "more", "-w", checkpoint, "--ext", "../x")
    assert code == 4 and "--ext" in err and len(err.strip().splitlines()) == 1, err


def _clip(root: Path) -> Path:
    path = root / "clip.mkv"
    if not path.exists():
        make_clip(path, 5, 48, 32, codec="ffv1", pix_fmt="bgr0")
    return path
