"""Test clips made with PyAV, and an independent decoder: the ffmpeg binary imageio-ffmpeg ships."""

from __future__ import annotations

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


def ffmpeg_frames(path: Path, width: int, height: int, deep: bool = False, frames: int | None = None) -> np.ndarray:
    """RGB frames decoded by the ffmpeg binary, as float32 in [0, 1]."""
    args = [FFMPEG, "-v", "error", "-i", str(path)]
    if frames:
        args += ["-frames:v", str(frames)]
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
