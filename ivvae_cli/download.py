"""Fetching published checkpoints: resumable HTTP downloads, verified before they take their name.

The bytes go to a hidden ``.NAME.part`` beside the target; a cut connection is resumed with a
``Range`` request (by this run's retries or by the next run), and only a file that passes
verification is renamed to ``NAME.pth``.
"""

from __future__ import annotations

import http.client
import os
import re
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

from ivvae_cli.errors import DownloadError, OutputError, WeightsError
from ivvae_cli.version import __version__
from ivvae_cli.weights import CheckpointReport, Variant, verify_checkpoint

__all__ = ["DownloadError", "download_variant"]

CHUNK = 1 << 20
ATTEMPTS = 5  # per URL; each resumes where the last stopped
TIMEOUT_S = 60


def partial_path(target: Path) -> Path:
    """Where the bytes of an unfinished download wait."""
    return target.with_name(f".{target.name}.part")


def _fetch(url: str, part: Path, progress: Callable[[int, int | None], None]) -> None:
    """Append the rest of ``url`` to ``part``; raise ``OSError`` if the connection breaks."""
    have = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"User-Agent": f"ivvae/{__version__}"})
    if have:
        request.add_header("Range", f"bytes={have}-")
    try:
        response = urllib.request.urlopen(request, timeout=TIMEOUT_S)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:  # nothing left to send: the part is whole
            return
        raise
    with response:
        if response.status == 206:
            match = re.search(r"/(\d+)$", response.headers.get("Content-Range", ""))
            total = int(match.group(1)) if match else None
        else:  # the server ignored the range: start over
            have = 0
            length = response.headers.get("Content-Length")
            total = int(length) if length else None
        progress(have, total)
        with part.open("ab" if have else "wb") as f:
            while chunk := response.read(CHUNK):
                f.write(chunk)
                have += len(chunk)
                progress(have, total)
    if total is not None and have < total:
        raise http.client.IncompleteRead(b"", total - have)


def _download(
    url: str, part: Path, progress: Callable[[int, int | None], None], failures: list[str], retry_wait_s: float
) -> bool:
    """Try ``url`` a few times, each try resuming the last; record why each failed."""
    for attempt in range(ATTEMPTS):
        try:
            _fetch(url, part, progress)
            return True
        except urllib.error.HTTPError as e:
            failures.append(f"HTTP {e.code} from {url}")
            return False  # the server answered: trying again would get the same
        except (OSError, http.client.HTTPException) as e:
            failures.append(f"{getattr(e, 'reason', None) or e!r} from {url}")
            if attempt + 1 < ATTEMPTS:
                time.sleep(retry_wait_s * 2**attempt)
    return False


def download_variant(
    variant: Variant,
    folder: Path,
    *,
    force: bool = False,
    urls: list[str] | None = None,
    progress: Callable[[int, int | None], None] = lambda done, total: None,
    retry_wait_s: float = 1.0,
) -> CheckpointReport:
    """Download ``variant`` into ``folder`` as ``NAME.pth`` and verify it by structure.

    A file already there is verified and kept unless ``force``; a corrupt download is deleted.
    """
    if not folder.is_dir():
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise OutputError(f"cannot create {folder}: {e.strerror}") from None
    target = folder / variant.file
    if target.exists() and not force:
        try:
            return verify_checkpoint(target, expect=variant)
        except WeightsError as e:
            raise WeightsError(f"{e}; --force downloads it again") from None
    part = partial_path(target)
    failures: list[str] = []
    if not any(_download(url, part, progress, failures, retry_wait_s) for url in urls or variant.urls()):
        kept = f"; {part.stat().st_size} bytes kept in {part} to resume from" if part.exists() else ""
        raise DownloadError(f"could not download {variant.file}: {failures[-1] if failures else 'no URL'}{kept}")
    try:
        report = verify_checkpoint(part, expect=variant)
    except WeightsError as e:
        part.unlink(missing_ok=True)
        raise WeightsError(f"the downloaded {variant.file} is corrupt and was deleted: {e}") from None
    os.replace(part, target)
    report.path = target
    return report
