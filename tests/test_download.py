"""Downloads against a local HTTP server with ModelScope's URL layout: cut connections, resumes,
corrupt files. No outside network."""

from __future__ import annotations

import hashlib
import io
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from ivvae_cli.download import download_variant, partial_path
from ivvae_cli.errors import DownloadError, WeightsError
from ivvae_cli.model import IVVAE
from ivvae_cli.weights import PUBLISHED, Variant

from .conftest import REFERENCE, random_model
from .test_cli import ivvae
from .test_weights import evil_pickle

PREFIX = "/models/wpy1999/iv-vae/resolve/master/"


class Server:
    """Serves ``files`` under ModelScope's layout with ``Range`` support; can cut a response after
    ``cut_after`` bytes and then answer 503 for ``fail_after_cut`` requests."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.ranges: list[str | None] = []
        self.cut_after: int | None = None
        self.fail_after_cut = 0
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:
                body = server.files.get(self.path.removeprefix(PREFIX)) if self.path.startswith(PREFIX) else None
                server.ranges.append(self.headers.get("Range"))
                if body is None:
                    self.send_error(404)
                    return
                if server.cut_after is None and server.fail_after_cut:
                    server.fail_after_cut -= 1
                    self.send_error(503)
                    return
                start = int(self.headers["Range"].split("=")[1].rstrip("-")) if self.headers.get("Range") else 0
                self.send_response(206 if start else 200)
                if start:
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                self.send_header("Content-Length", str(len(body) - start))
                self.end_headers()
                end = len(body)
                if server.cut_after is not None:
                    end, server.cut_after = start + server.cut_after, None
                self.wfile.write(body[start:end])
                self.wfile.flush()
                self.close_connection = True

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def url(self, name: str) -> str:
        return f"{self.base}{PREFIX}{name}"


@pytest.fixture
def server() -> Iterator[Server]:
    s = Server()
    yield s
    s.httpd.shutdown()


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch) -> None:
    """No user cache or environment folder leaks into the search."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("IVVAE_WEIGHTS", raising=False)
    monkeypatch.chdir(tmp_path)


def pth_bytes(state: dict[str, torch.Tensor]) -> bytes:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


SMALL = Variant("ivvae_z16_dim8", 16, 8, 1.0, 0.0, sum(p.numel() for p in random_model(16, 8).parameters()))


def test_a_cut_connection_is_resumed_in_the_same_run(tmp_path, server):
    body = pth_bytes(random_model(16, 8, seed=1).state_dict())
    server.files[SMALL.file] = body
    server.cut_after = len(body) // 3
    report = download_variant(SMALL, tmp_path / "w", urls=[server.url(SMALL.file)], retry_wait_s=0)
    assert server.ranges == [None, f"bytes={len(body) // 3}-"]
    assert (tmp_path / "w" / SMALL.file).read_bytes() == body
    assert report.name == "ivvae_z16_dim8" and report.dtype == "float32"
    assert not partial_path(tmp_path / "w" / SMALL.file).exists()


@pytest.mark.parametrize(
    "case",
    ["truncated", "wrong variant", "nan", "half precision", "not a checkpoint", "malicious"],
)
def test_a_corrupt_download_is_rejected_and_deleted(tmp_path, server, case):
    state = random_model(16, 8, seed=1).state_dict()
    nan = {"decoder.head.2.conv_3d.weight": state["decoder.head.2.conv_3d.weight"] * torch.nan}
    body = {
        "truncated": lambda: pth_bytes(state)[:-5000],
        "wrong variant": lambda: pth_bytes(random_model(8, 8).state_dict()),
        "nan": lambda: pth_bytes(state | nan),
        "half precision": lambda: pth_bytes({k: v.half() for k, v in state.items()}),
        "not a checkpoint": lambda: b"<html>Rate limited</html>",
        "malicious": lambda: evil_pickle(tmp_path / "pwned"),
    }[case]()
    server.files[SMALL.file] = body
    with pytest.raises(WeightsError, match="corrupt and was deleted"):
        download_variant(SMALL, tmp_path / "w", urls=[server.url(SMALL.file)], retry_wait_s=0)
    assert list((tmp_path / "w").iterdir()) == []
    assert not (tmp_path / "pwned").exists()


def test_missing_file_fails_cleanly(tmp_path, server):
    with pytest.raises(DownloadError, match="HTTP 404"):
        download_variant(SMALL, tmp_path / "w", urls=[server.url(SMALL.file)], retry_wait_s=0)
    assert list((tmp_path / "w").iterdir()) == []


def published_state(name: str) -> dict[str, torch.Tensor]:
    """A random checkpoint with exactly the names and shapes of a published variant (the model's,
    which test_model.py checks against the authors' files)."""
    variant = PUBLISHED[name]
    with torch.device("meta"):
        keys = {k: v.shape for k, v in IVVAE(variant.z_dim, variant.dim).state_dict().items()}
    generator = torch.Generator().manual_seed(0)
    return {k: torch.randn(shape, generator=generator) * 0.02 for k, shape in keys.items()}


@pytest.mark.e2e
def test_cli_download_of_a_published_variant_resumes_across_runs(tmp_path, server, monkeypatch):
    """The real z4_dim64 layout (107M parameters): the first run is cut and the server then fails;
    the second run resumes from the kept bytes; the result is bit-identical and verified."""
    body = pth_bytes(published_state("ivvae_z4_dim64"))
    server.files["ivvae_z4_dim64.pth"] = body
    server.cut_after, server.fail_after_cut = len(body) // 2, 1
    monkeypatch.setenv("IVVAE_MIRROR", server.base)
    target = tmp_path / "cache" / "ivvae" / "ivvae_z4_dim64.pth"

    code, _, err = ivvae("weights", "download", "z4_dim64", "-q")
    assert code == 7 and "HTTP 503" in err and "to resume from" in err
    assert partial_path(target).stat().st_size == len(body) // 2 and not target.exists()

    code, out, err = ivvae("weights", "download", "z4_dim64", "-q", "--json", "-")
    assert code == 0, err
    assert server.ranges[-1] == f"bytes={len(body) // 2}-"
    assert hashlib.sha256(target.read_bytes()).digest() == hashlib.sha256(body).digest()
    record = json.loads(out)["downloaded"][0]
    assert (record["name"], record["params"], record["status"]) == ("ivvae_z4_dim64", 107_170_842, "ok")

    code, out, _ = ivvae("weights", "list", "--json", "-")
    rows = {r["name"]: r for r in json.loads(out)["models"]}
    assert rows["ivvae_z4_dim64"]["status"] == "ok" and rows["ivvae_z4_dim64"]["path"] == str(target)
    assert rows["ivvae_z16_dim64"]["status"] == "absent"

    code, _, err = ivvae("weights", "download", "z4_dim64", "-q")  # present and intact: kept
    assert code == 0 and len(server.ranges) == 3


@pytest.mark.e2e
def test_cli_download_refuses_unknown_names(tmp_path):
    code, _, err = ivvae("weights", "download", "z32_dim64")
    assert code == 1 and "published are ivvae_z16_dim64" in err


@pytest.mark.shared
def test_published_variant_sizes_match_the_reference():
    variants = json.loads((REFERENCE / "official_variants.json").read_text())
    for name, variant in PUBLISHED.items():
        assert variant.params == variants[name]["params"]
        assert variant.urls()[0].endswith(f"/models/wpy1999/iv-vae/resolve/master/{name}.pth")
