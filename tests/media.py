"""Test clips made with PyAV, and an independent decoder: the ffmpeg binary imageio-ffmpeg ships."""

from __future__ import annotations

import re
import subprocess
from fractions import Fraction
from pathlib import Path

import av
import imageio_ffmpeg
import numpy as np

FFMPEG = imageio_ffmpeg.get_ffmpeg_exe()


def pattern(frames: int, width: int, height: int, seed: int = 0) -> np.ndarray:
    """Smooth colour gradients with a moving square: uint8 ``(frames, height, width, 3)``."""
    y, x = np.mgrid[0:height, 0:width]
    out = np.empty((frames, height, width, 3), np.uint8)
    for t in range(frames):
        r = 128 + 100 * np.sin(x / (7 + seed) + t / 3)
        g = 128 + 100 * np.cos(y / 5 - t / 4)
        b = (x + y + 9 * t) % 256
        img = np.stack([r, g, b], axis=-1)
        s = max(2, min(width, height) // 4)
        x0, y0 = (3 * t) % max(1, width - s), (2 * t) % max(1, height - s)
        img[y0 : y0 + s, x0 : x0 + s] = (240, 30, 60)
        out[t] = np.clip(img, 0, 255).astype(np.uint8)
    return out


def make_clip(
    path: Path,
    frames: int = 9,
    width: int = 64,
    height: int = 48,
    *,
    fps: Fraction = Fraction(25),
    codec: str = "libx264",
    pix_fmt: str = "yuv420p",
    audio: bool = False,
    pts: list[int] | None = None,
    colorspace: str | None = None,
    options: dict[str, str] | None = None,
) -> np.ndarray:
    """Write a clip and return the RGB frames it was made from."""
    images = pattern(frames, width, height)
    with av.open(str(path), "w") as out:
        stream = out.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
        stream.options = options or ({"crf": "10"} if codec == "libx264" else {})
        if colorspace:
            stream.codec_context.colorspace = getattr(av.video.reformatter.Colorspace, colorspace)
        if pts is not None:
            stream.codec_context.time_base = stream.time_base = Fraction(1, 1000)
        sound = out.add_stream("aac", rate=44100) if audio else None
        for i, image in enumerate(images):
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            if pts is not None:
                frame.pts, frame.time_base = pts[i], Fraction(1, 1000)
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
        if sound is not None:
            seconds = frames / float(fps)
            t = np.arange(int(44100 * seconds)) / 44100
            wave = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
            for start in range(0, len(wave), 1024):
                chunk = np.stack([wave[start : start + 1024]] * 2)
                af = av.AudioFrame.from_ndarray(chunk, format="fltp", layout="stereo")
                af.sample_rate, af.pts = 44100, start
                out.mux(sound.encode(af))
            out.mux(sound.encode(None))
    return images


def write_frames(path: Path, frames: np.ndarray, fps: Fraction = Fraction(25)) -> None:
    """Write uint8 RGB frames losslessly (FFV1 in Matroska)."""
    with av.open(str(path), "w") as out:
        stream = out.add_stream("ffv1", rate=fps)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "bgr0"
        for image in frames:
            out.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        out.mux(stream.encode(None))


def ffmpeg_frames(
    path: Path,
    width: int,
    height: int,
    deep: bool = False,
    frames: int | None = None,
    filters: str | None = None,
    exact: bool = False,
) -> np.ndarray:
    """RGB frames decoded by the ffmpeg binary, as float32 in [0, 1]. ffmpeg converts with the
    file's colour tags (BT.601, limited range, where it has none); ``filters`` go before that
    conversion; ``exact`` converts with accurate rounding and full chroma, as a player's shader does."""
    args = [FFMPEG, "-v", "error", "-i", str(path)]
    if frames:
        args += ["-frames:v", str(frames)]
    if filters:
        args += ["-vf", filters]
    if exact:
        args += ["-sws_flags", "accurate_rnd+full_chroma_int"]
    args += ["-f", "rawvideo", "-pix_fmt", "rgb48le" if deep else "rgb24", "-"]
    raw = subprocess.run(args, capture_output=True, check=True).stdout
    dtype, scale = (np.uint16, 65535.0) if deep else (np.uint8, 255.0)
    return np.frombuffer(raw, dtype).reshape(-1, height, width, 3).astype(np.float32) / scale


def add_rotation(source: Path, target: Path, degrees: int) -> None:
    subprocess.run(
        [FFMPEG, "-v", "error", "-display_rotation", str(degrees), "-i", str(source), "-c", "copy", str(target)],
        check=True,
    )


def stream_facts(path: Path) -> dict:
    """Frame count, size, rate, timestamps and audio of a file, read by PyAV."""
    with av.open(str(path)) as c:
        v = c.streams.video[0]
        width, height, rate, time_base = v.codec_context.width, v.codec_context.height, v.average_rate, v.time_base
        pts = [f.pts for f in c.decode(v)]
    with av.open(str(path)) as c:
        audio = [a.codec_context.codec.canonical_name for a in c.streams.audio]
        audio_seconds = None
        if audio:
            a = c.streams.audio[0]
            samples = sum(f.samples for f in c.decode(a))
            audio_seconds = samples / a.codec_context.sample_rate
        return {
            "frames": len(pts),
            "width": width,
            "height": height,
            "rate": rate,
            "time_base": time_base,
            "pts": pts,
            "audio": audio,
            "audio_seconds": audio_seconds,
        }


# Solid colours to check conversions on: saturated primaries and secondaries, skin tones, greys.
PATCHES = np.array(
    [
        (255, 0, 0), (0, 255, 0), (0, 0, 255), (200, 50, 50), (0, 255, 255), (255, 0, 255),
        (255, 224, 189), (224, 172, 105), (141, 85, 36), (0, 0, 0), (128, 128, 128), (255, 255, 255),
    ],
    dtype=np.float64,
) / 255  # fmt: skip
PATCH_COLUMNS, PATCH_ROWS, PATCH_MARGIN = 6, 2, 4


def patches(width: int, height: int) -> np.ndarray:
    """One frame of ``PATCHES`` in a grid: float64 ``(height, width, 3)`` in [0, 1]."""
    image = np.zeros((height, width, 3))
    for (x, y), colour in zip(_patch_boxes(width, height), PATCHES, strict=True):
        image[y, x] = colour
    return image


def patch_colours(image: np.ndarray) -> np.ndarray:
    """Each patch's pixels away from its edges (where 4:2:0 chroma mixes neighbours): ``(patches, n, 3)``."""
    height, width = image.shape[:2]
    m = PATCH_MARGIN
    return np.stack(
        [
            image[y.start + m : y.stop - m, x.start + m : x.stop - m].reshape(-1, 3)
            for x, y in _patch_boxes(width, height)
        ]
    )


def _patch_boxes(width: int, height: int) -> list[tuple[slice, slice]]:
    w, h = width // PATCH_COLUMNS // 2 * 2, height // PATCH_ROWS // 2 * 2  # even: 4:2:0 chroma pairs stay inside
    return [
        (slice(c * w, (c + 1) * w), slice(r * h, (r + 1) * h)) for r in range(PATCH_ROWS) for c in range(PATCH_COLUMNS)
    ]


def ffmpeg_yuv_clip(path: Path, image: np.ndarray, matrix: str, full: bool, tagged: bool, deep: bool = False) -> None:
    """A one-frame clip of ``image`` (float RGB) converted to YUV 4:2:0 by the ffmpeg binary with ``matrix``
    (its ``scale`` filter's name) and range, losslessly coded (H.264 at QP 0, or FFV1 when ``deep``);
    ``tagged`` declares the matrix and range, else the file declares no colour at all."""
    height, width = image.shape[:2]
    peak, dtype = (65535, np.uint16) if deep else (255, np.uint8)
    raw = np.clip(np.rint(image * peak), 0, peak).astype(dtype).tobytes()
    convert = f"scale=out_color_matrix={matrix}:out_range={'pc' if full else 'tv'}:flags=accurate_rnd+full_chroma_int"
    convert += ",format=" + ("yuv420p10le" if deep else "yuv420p")
    if not tagged:
        convert += ",setparams=colorspace=unknown:range=unknown"
    codec = ["-c:v", "ffv1"] if deep else ["-c:v", "libx264", "-qp", "0"]
    args = [FFMPEG, "-v", "error", "-f", "rawvideo", "-pix_fmt", "rgb48le" if deep else "rgb24"]
    args += ["-s", f"{width}x{height}", "-r", "25", "-i", "-", "-vf", convert, *codec, str(path)]
    subprocess.run(args, input=raw, check=True)


def ffmpeg_colour(path: Path) -> dict[str, str | None]:
    """The first video stream's pixel format and colour tags as the ffmpeg binary reports them
    (``yuv420p(tv, bt709)``, or ``matrix/primaries/transfer`` when they differ); None: undeclared."""
    banner = subprocess.run([FFMPEG, "-hide_banner", "-i", str(path)], capture_output=True, text=True).stderr
    line = next(line for line in banner.splitlines() if "Video:" in line)
    found = re.search(r", ([a-z0-9]+)(?:\(([^)]*)\))?, \d+x\d+", line)
    assert found, line
    pix_fmt = found[1].replace("yuvj", "yuv")  # the names ffmpeg's H.264 decoder gives full range
    facts: dict[str, str | None] = {"pix_fmt": pix_fmt, "range": None, "matrix": None, "primaries": None}
    facts["transfer"] = None
    for part in (found[2] or "").split(", "):
        if part in ("tv", "pc"):
            facts["range"] = part
        elif "/" in part or part in ("bt709", "smpte170m", "bt470bg", "smpte240m"):
            names = part.split("/") if "/" in part else [part] * 3
            for key, name in zip(("matrix", "primaries", "transfer"), names, strict=True):
                facts[key] = None if name == "unknown" else name
    return facts
