"""Video I/O through PyAV: streaming frame reads and writes, audio carried as-is.

Policies (documented in README.md):
- Frames are converted to RGB by libavfilter, exactly as the ffmpeg command converts them: with
  the matrix and range the stream declares (BT.601 when it declares none), 16 bits per channel
  when the source has more than 8.
- Rotation metadata is applied: frames come out upright, as players show them.
- Alpha is dropped: the model codes colour only.
- Variable frame rate is kept: every decoded frame is used once and keeps its timestamp; outputs
  put timestamps on a grid of 1/8 frame at the average rate, so a constant rate comes back exactly.
- Timestamps that are missing (raw H.264), repeated or going backwards are not trusted: from the
  first such frame on, frames are timed by the stream's declared rate, and written at that rate.
- Damage: a frame the decoder refuses stops reading with an ``InputError`` that names it, or, with
  ``skip_errors``, is left out and counted. No bytes make these functions fail otherwise.
"""

from __future__ import annotations

import io
import itertools
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from ivvae_cli.errors import InputError, IvvaeWarning, OutputError
from ivvae_cli.latent_file import MAX_TICKS, TICKS_PER_FRAME, writer_ticks

DECODE_ERRORS = (av.FFmpegError, ValueError)  # what PyAV raises on damaged data (ValueError: 'missing format')


@dataclass
class VideoInfo:
    """What a video file holds, sizes as displayed (after rotation)."""

    path: Path
    width: int
    height: int
    frames: int | None  # None when the container does not say
    frame_rate: Fraction
    time_base: Fraction
    duration: float | None
    codec: str
    pixel_format: str
    bit_depth: int
    rotation: int
    audio: list[str] = field(default_factory=list)


@contextmanager
def _open(path: Path) -> Iterator[av.container.InputContainer]:
    """The file opened for reading; damage met while it is open becomes an ``InputError``."""
    if not path.exists():
        raise InputError(f"input not found: {path}")
    if not path.is_file():
        raise InputError(f"input is not a file: {path}")
    try:
        container = av.open(str(path))
    except (av.FFmpegError, UnicodeDecodeError, ValueError) as e:
        raise InputError(f"{path} is not a video ffmpeg can read ({_reason(e)})") from None
    except PermissionError:
        raise InputError(f"no permission to read {path}") from None
    with container:
        try:
            yield container
        except DECODE_ERRORS as e:
            raise InputError(f"{path} is damaged: {_reason(e)}") from None


NOT_VIDEO_FORMATS = {"tty"}  # ffmpeg renders any text file as "video" through tty


def _reason(error: Exception) -> str:
    """An exception's message for a one-line error (PyAV's carry the ffmpeg message in ``strerror``)."""
    text = getattr(error, "strerror", None) or str(error) or error.__class__.__name__
    return " ".join(text.split())


def _video_stream(container: av.container.InputContainer, path: Path) -> av.video.stream.VideoStream:
    if not container.streams.video or container.format.name in NOT_VIDEO_FORMATS:
        raise InputError(f"{path} is not a video (no video stream)")
    stream = container.streams.video[0]
    if stream.codec_context is None:
        raise InputError(f"{path}: no decoder for its video stream (unknown codec, or a damaged header)")
    if not stream.codec_context.width or not stream.codec_context.height:
        raise InputError(f"{path}: its video stream has no picture size (a damaged header?)")
    return stream


def probe(path: str | Path) -> VideoInfo:
    """Read a video's properties, decoding at most its first frame (for the rotation)."""
    path = Path(path)
    with _open(path) as container:
        stream = _video_stream(container, path)
        ctx = stream.codec_context
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate or Fraction(25)
        duration = None
        if stream.duration is not None and stream.time_base:
            duration = float(stream.duration * stream.time_base)
        elif container.duration:
            duration = container.duration / av.time_base
        frames = stream.frames or (round(duration * rate) if duration else None)
        fmt = av.VideoFormat(ctx.pix_fmt) if ctx.pix_fmt else None
        depth = max((c.bits for c in fmt.components), default=8) if fmt else 8
        rotation = _stream_rotation(container, stream)
        width, height = (ctx.height, ctx.width) if rotation % 180 else (ctx.width, ctx.height)
        return VideoInfo(
            path=path,
            width=width,
            height=height,
            frames=frames,
            frame_rate=Fraction(rate),
            time_base=Fraction(stream.time_base or Fraction(1, 90000)),
            duration=duration,
            codec=ctx.name,
            pixel_format=ctx.pix_fmt or "unknown",
            bit_depth=depth,
            rotation=rotation,
            audio=[_codec_name(a) for a in container.streams.audio],
        )


def describe_video(path: Path) -> dict:
    """What ``ivvae info`` shows of a video."""
    v = probe(path)
    return {
        "kind": "video",
        "file": str(path),
        "codec": v.codec,
        "pixel_format": v.pixel_format,
        "bit_depth": v.bit_depth,
        "size": [v.width, v.height],
        "frames": v.frames,
        "frame_rate": str(v.frame_rate),
        "duration_s": v.duration,
        "rotation": v.rotation,
        "audio": v.audio,
        "file_bytes": path.stat().st_size,
    }


def _codec_name(stream: av.stream.Stream) -> str:
    """The format's name for a stream's codec (``mp3``, not the decoder's ``mp3float``)."""
    return stream.codec_context.codec.canonical_name if stream.codec_context else "unknown"


def _stream_rotation(container: av.container.InputContainer, stream: av.video.stream.VideoStream) -> int:
    """The display rotation of the first frame, in degrees counter-clockwise (0, 90, 180 or 270)."""
    try:
        frame = next(container.decode(stream))
    except (StopIteration, *DECODE_ERRORS):
        return 0
    return round(frame.rotation) % 360 if frame.rotation else 0


class _RGBConverter:
    """Frames to upright RGB (uint8, or uint16 for deep sources) through libavfilter's format
    conversion, the one the ffmpeg command uses, so declared matrix and range are honoured alike."""

    def __init__(self, stream: av.video.stream.VideoStream, deep: bool, size: tuple[int, int] | None = None):
        self.deep = deep
        self.graph = av.filter.Graph()
        chain = [self.graph.add_buffer(template=stream)]
        if size is not None:  # (width, height) before rotation
            chain.append(self.graph.add("scale", f"w={size[0]}:h={size[1]}:flags=bicubic+accurate_rnd+full_chroma_int"))
        chain += [self.graph.add("format", "rgb48le" if deep else "rgb24"), self.graph.add("buffersink")]
        for a, b in itertools.pairwise(chain):
            a.link_to(b)
        self.graph.configure()

    def __call__(self, frame: av.VideoFrame) -> np.ndarray:
        self.graph.push(frame)
        rgb = self.graph.pull().to_ndarray()
        turns = round(frame.rotation / 90) % 4 if frame.rotation else 0
        return np.rot90(rgb, k=turns) if turns else rgb


def unit_float(frames: np.ndarray) -> np.ndarray:
    """uint8 or uint16 RGB -> float32 in [0, 1]."""
    return frames.astype(np.float32) / np.float32(np.iinfo(frames.dtype).max)


def resized(width: int, height: int, short_side: int | None) -> tuple[int, int]:
    """``(width, height)`` scaled so the short side is ``short_side`` (aspect kept, long side rounded)."""
    if not short_side or min(width, height) == short_side:
        return width, height
    scale = short_side / min(width, height)
    return (short_side, round(height * scale)) if width <= height else (round(width * scale), short_side)


def read_frames(
    path: str | Path,
    *,
    start: float = 0.0,
    max_frames: int | None = None,
    chunk: int = 8,
    size: tuple[int, int] | None = None,
    info: VideoInfo | None = None,
    skip_errors: bool = False,
) -> FrameReader:
    """Yield ``(frames, pts)``: RGB ``(t, H, W, 3)``, uint8 (uint16 for sources deeper than 8 bits;
    ``unit_float`` converts), and each frame's timestamp in the stream's time base, ``chunk``
    frames at a time, from ``start`` seconds on; resized (bicubic) to ``size`` (width, height as
    displayed) if given. ``info``: the file's ``probe``, when the caller has it already. The
    iterator also tells the rate to write the frames at (``frame_rate``) and how many damaged
    frames ``skip_errors`` left out (``lost``)."""
    path = Path(path)
    return FrameReader(path, info or probe(path), start, max_frames, chunk, size, skip_errors)


class FrameReader:
    """The iterator ``read_frames`` returns. It decodes packet by packet, so that damage is named
    (or, with ``skip_errors``, left out and counted), and checks each frame's timestamp: from the
    first one missing, repeated, going backwards or out of containers' reach, frames are timed by
    the stream's declared rate (said once), those not yet handed out included."""

    def __init__(
        self,
        path: Path,
        info: VideoInfo,
        start: float,
        max_frames: int | None,
        chunk: int,
        size: tuple[int, int] | None,
        skip_errors: bool,
    ):
        self.path, self.info, self.skip_errors = path, info, skip_errors
        self.frame_rate = self.info.frame_rate  # the declared rate once timestamps are not trusted
        self.lost = 0
        self.decoded = 0  # frames out of the decoder
        self.retimed = False
        self._first: int | None = None  # the first frame's timestamp: where the declared rate's grid starts
        self._last: int | None = None  # the last frame's timestamp
        self._handed: int | None = None  # the last timestamp handed out
        self._unreadable_from: int | None = None  # the frame where damage to the file's structure ended reading
        self._chunks = self._read(start, max_frames, chunk, size)

    def __iter__(self) -> FrameReader:
        return self

    def __next__(self) -> tuple[np.ndarray, list[int]]:
        return next(self._chunks)

    def close(self) -> None:
        """Stop reading and release the file, as a generator's ``close`` does."""
        self._chunks.close()

    def _read(self, start: float, max_frames: int | None, chunk: int, size: tuple[int, int] | None):
        path, info = self.path, self.info
        if size == (info.width, info.height):
            size = None
        shape = (info.height, info.width) if size is None else (size[1], size[0])
        if size is not None and info.rotation in (90, 270):
            size = size[::-1]
        with _open(path) as container:
            stream = _video_stream(container, path)
            stream.thread_type = "AUTO"
            to_rgb = _RGBConverter(stream, deep=info.bit_depth > 8, size=size)
            declared = Fraction(stream.codec_context.framerate or stream.guessed_rate or info.frame_rate)
            # Streams without timestamps (raw H.264, say) are read from the start, never sought.
            if start > 0 and stream.start_time is not None:
                container.seek(int(start / stream.time_base), stream=stream, backward=True)
            frames: list[np.ndarray] = []
            stamps: list[int] = []
            count = 0
            for frame in self._frames(container, stream):
                if max_frames is not None and count >= max_frames:
                    break
                pts = self._stamp(frame.pts, stamps, declared)
                if pts * info.time_base < start - 1e-6:
                    continue
                try:
                    rgb = to_rgb(frame)
                    if rgb.shape[:2] != shape:
                        raise ValueError(f"a {rgb.shape[1]}x{rgb.shape[0]} frame in a {shape[1]}x{shape[0]} video")
                except DECODE_ERRORS as e:
                    self._damaged(e)
                    continue
                frames.append(rgb)
                stamps.append(pts)
                count += 1
                if len(frames) == chunk:
                    self._handed = stamps[-1]
                    yield np.stack(frames), stamps
                    frames, stamps = [], []
            if frames:
                yield np.stack(frames), stamps
        if count == 0:
            raise InputError(f"{path} has no video frames" + (f" after {start:g} s" if start else ""))
        if self.lost:
            ending = f"; unreadable from frame {self._unreadable_from} on" if self._unreadable_from is not None else ""
            warnings.warn(IvvaeWarning(f"{path}: {self.lost} damaged frame(s) left out{ending}"), stacklevel=2)

    def _frames(self, container: av.container.InputContainer, stream: av.video.stream.VideoStream):
        """Decoded frames, packet by packet; damage in the file's structure ends them."""
        packets = container.demux(stream)
        while True:
            try:
                packet = next(packets)
            except StopIteration:
                return
            except DECODE_ERRORS as e:
                self._damaged(e)
                self._unreadable_from = self.decoded
                return
            try:
                decoded = packet.decode()
            except DECODE_ERRORS as e:
                self._damaged(e)
                continue
            for frame in decoded:
                self.decoded += 1
                yield frame

    def _damaged(self, error: Exception) -> None:
        """Stop at damage, naming the frame, or count it and go on (``skip_errors``)."""
        if not self.skip_errors:
            raise InputError(
                f"{self.path} is damaged at frame {self.decoded}: {_reason(error)} "
                "(--skip-errors keeps the frames that decode)"
            )
        self.lost += 1

    def _stamp(self, pts: int | None, pending: list[int], declared: Fraction) -> int:
        """The timestamp of the frame just decoded; ``pending``, those not yet handed out, are
        retimed along when the stream's timestamps stop being trusted."""
        index = self.decoded - 1
        if self._first is None:
            self._first = pts if pts is not None else 0
        if not self.retimed:
            problem = self._timestamp_problem(pts)
            if problem is None:
                self._last = pts
                return pts
            self.retimed, self.frame_rate = True, declared
            warnings.warn(
                IvvaeWarning(
                    f"{self.path}: timestamps {problem} at frame {index}; timing frames by the declared rate, "
                    f"{float(declared):.6g} fps"
                ),
                stacklevel=2,
            )
            self._last = self._handed
            for i in range(len(pending)):
                pending[i] = self._last = self._grid(index - len(pending) + i)
        self._last = self._grid(index)
        return self._last

    def _timestamp_problem(self, pts: int | None) -> str | None:
        if pts is None:
            return "missing"
        if self._last is not None and pts <= self._last:
            return "repeated" if pts == self._last else "going backwards"
        if writer_ticks(pts - self._first, self.info.time_base, self.frame_rate) >= MAX_TICKS:
            return "out of containers' reach"
        return None

    def _grid(self, index: int) -> int:
        """Frame ``index`` on the declared rate's grid from the first frame, after the last."""
        pts = self._first + round(index / self.frame_rate / self.info.time_base)
        return pts if self._last is None else max(pts, self._last + 1)


def read_audio(
    path: str | Path, start: float = 0.0, end: float | None = None, skip_errors: bool = False
) -> bytes | None:
    """The first audio stream between ``start`` and ``end`` seconds, remuxed unchanged into a
    Matroska file in memory; None when there is no audio. Damage stops with an ``InputError``, or,
    with ``skip_errors``, leaves the audio out (said once)."""
    path = Path(path)
    with _open(path) as container:
        if not container.streams.audio or container.streams.audio[0].codec_context is None:
            return None
        source = container.streams.audio[0]
        buffer = io.BytesIO()
        t = start
        try:
            with av.open(buffer, "w", format="matroska") as out:
                target = out.add_stream_from_template(source)
                first_pts = None
                for packet in container.demux(source):
                    if packet.pts is None or packet.dts is None:
                        continue
                    t = float(packet.pts * source.time_base)
                    if t < start - 1e-6 or (end is not None and t >= end):
                        continue
                    first_pts = packet.pts if first_pts is None else first_pts
                    packet.pts -= first_pts
                    packet.dts -= first_pts
                    packet.stream = target
                    out.mux(packet)
        except DECODE_ERRORS as e:
            if not skip_errors:
                raise InputError(
                    f"{path}: its audio is damaged at {t:.3f} s: {_reason(e)} (--skip-errors leaves it out)"
                ) from None
            warnings.warn(IvvaeWarning(f"{path}: its audio is damaged at {t:.3f} s; left out"), stacklevel=2)
            return None
        return buffer.getvalue() if first_pts is not None else None


def audio_problem(data: bytes) -> str | None:
    """Why an audio track held in memory (a Matroska file, as ``read_audio`` makes) cannot be
    copied into a video, found by decoding all of it; None when it can."""
    try:
        with av.open(io.BytesIO(data)) as container:
            if not container.streams.audio or container.streams.audio[0].codec_context is None:
                return "no audio stream ffmpeg can decode"
            stream = container.streams.audio[0]
            if not stream.codec_context.sample_rate:
                return "no sample rate"
            last = None
            for packet in container.demux(stream):
                if packet.dts is not None and last is not None and packet.dts < last:
                    return "its timestamps go backwards"
                last = packet.dts if packet.dts is not None else last
                packet.decode()
    except (*DECODE_ERRORS, UnicodeDecodeError) as e:
        return _reason(e)
    return None


MAX_GAP = 2**31  # the most between two frames, in the container's time base (MP4 wraps past it, silently)

LOSSLESS = {".mkv": "ffv1", ".avi": "ffv1", ".mp4": "libx264rgb", ".mov": "libx264rgb"}
DEFAULT_CODEC = {".webm": "libvpx-vp9"}  # everything else: H.264
CODEC_NAMES = {"h264": "libx264", "h265": "libx265", "hevc": "libx265", "vp9": "libvpx-vp9", "av1": "libsvtav1"}


class VideoWriter:
    """Write float RGB frames in [0, 1] to a video file, with timestamps and optional audio.

    H.264 (CRF ``quality``) by default, VP9 for .webm; ``lossless`` picks FFV1 (.mkv, .avi) or
    H.264 RGB at CRF 0 (.mp4, .mov). Odd frame sizes use 4:4:4 chroma, since 4:2:0 cannot hold them.
    """

    def __init__(
        self,
        path: Path,
        *,
        width: int,
        height: int,
        frame_rate: Fraction,
        time_base: Fraction,
        codec: str | None = None,
        quality: int = 18,
        lossless: bool = False,
        audio: bytes | None = None,
    ):
        self.source_time_base = time_base
        suffix = path.suffix.lower()
        if lossless:
            if suffix not in LOSSLESS:
                raise OutputError(f"no lossless codec for {suffix or 'files without extension'}; use .mkv or .mp4")
            codec = LOSSLESS[suffix]
        codec = CODEC_NAMES.get(codec or "", codec) or DEFAULT_CODEC.get(suffix, "libx264")
        try:
            self.container = av.open(str(path), "w", format=_format_for(suffix))
        except (av.FFmpegError, ValueError) as e:
            raise OutputError(f"cannot write {path}: {e}") from None
        try:
            self.stream = self.container.add_stream(codec, rate=frame_rate)
        except (av.FFmpegError, ValueError) as e:
            self.container.close()
            raise OutputError(f"cannot encode {codec} into {path.name}: {e}") from None
        self.stream.width, self.stream.height = width, height
        # Timestamps go on a grid of 1/8 frame: a constant rate comes back exactly, variable
        # timing to within 1/16 of a frame.
        self.time_base = 1 / (frame_rate * TICKS_PER_FRAME)
        self.stream.time_base = self.stream.codec_context.time_base = self.time_base
        self.last_pts = -1
        odd = width % 2 or height % 2
        if codec == "ffv1":
            self.stream.pix_fmt = "bgr0"
        elif codec == "libx264rgb":
            self.stream.pix_fmt, self.stream.options = "rgb24", {"crf": "0"}
        else:
            self.stream.pix_fmt = "yuv444p" if odd else "yuv420p"
            self.stream.options = {"crf": str(quality)}
            if codec == "libvpx-vp9":
                self.stream.options |= {"b": "0"}
        self.audio = _AudioCopy(self.container, audio) if audio else None
        try:
            self.container.start_encoding()  # the container's own time base is known from here on
        except DECODE_ERRORS as e:
            self.container.close()
            raise OutputError(
                f"cannot encode {codec} at {float(frame_rate):.6g} fps into {path.name}: {_reason(e)}"
            ) from None

    def write(self, frames: np.ndarray, pts: list[int]) -> None:
        """Frames ``(t, H, W, 3)`` float in [0, 1] with their source timestamps."""
        for image, stamp in zip(frames, pts, strict=True):
            rgb = np.clip(np.rint(image * 255.0), 0, 255).astype(np.uint8)
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
            previous = self.last_pts
            self.last_pts = max(self.last_pts + 1, round(stamp * self.source_time_base / self.time_base))
            frame.pts, frame.time_base, frame.duration = self.last_pts, self.time_base, TICKS_PER_FRAME
            seconds = float(stamp * self.source_time_base)
            if previous >= 0 and (self.last_pts - previous) * self.time_base >= MAX_GAP * self.stream.time_base:
                raise OutputError(
                    f"cannot write the frame at {seconds:.6g} s {self._into()}: it comes "
                    f"{float((self.last_pts - previous) * self.time_base):.6g} s after the one before, "
                    "more than the container holds between two frames"
                )
            try:
                self.container.mux(self.stream.encode(frame))
            except DECODE_ERRORS as e:
                raise OutputError(f"cannot write the frame at {seconds:.6g} s {self._into()}: {_reason(e)}") from None

    def __enter__(self) -> VideoWriter:
        return self

    def __exit__(self, error_type, error, traceback) -> None:
        """Finish the file; after an error only release it (the caller discards it)."""
        try:
            if error_type is None:
                self.container.mux(self.stream.encode(None))
                if self.audio:
                    self.audio.copy()
            elif self.audio:
                self.audio.source.close()
            self.container.close()
        except DECODE_ERRORS as e:
            if error_type is None:
                raise OutputError(f"cannot finish writing {self._into()}: {_reason(e)}") from None

    def _into(self) -> str:
        """The output named by its kind (its name is a temporary one, see ``ivvae_cli.outputs``)."""
        return f"into {Path(self.container.name).suffix or 'the output'}"


def _format_for(suffix: str) -> str | None:
    return {".mkv": "matroska", ".webm": "webm", ".mp4": "mp4", ".mov": "mov", ".avi": "avi"}.get(suffix)


class _AudioCopy:
    """Carries an audio stream from an in-memory Matroska file into the output, copied when the
    output container takes its codec, else re-encoded (AAC, or Opus for WebM)."""

    def __init__(self, container: av.container.OutputContainer, data: bytes):
        self.source = av.open(io.BytesIO(data))
        self.input = self.source.streams.audio[0]
        self.container = container
        self.transcode = not _container_takes(container, _codec_name(self.input))
        if self.transcode:
            opus = container.format.name == "webm"
            rate = 48000 if opus else self.input.codec_context.sample_rate or 48000
            self.output = container.add_stream("libopus" if opus else "aac", rate=rate)
        else:
            self.output = container.add_stream_from_template(self.input)

    def copy(self) -> None:
        if self.transcode:
            for frame in self.source.decode(self.input):
                frame.pts = None
                self.container.mux(self.output.encode(frame))
            self.container.mux(self.output.encode(None))
        else:
            for packet in self.source.demux(self.input):
                if packet.dts is None:
                    continue
                packet.stream = self.output
                self.container.mux(packet)
        self.source.close()


def _container_takes(container: av.container.OutputContainer, codec: str) -> bool:
    if container.format.name in ("matroska", "mov"):
        return True
    if container.format.name == "webm":
        return codec in ("opus", "vorbis")
    return codec in ("aac", "mp3", "ac3", "eac3", "opus", "alac", "flac")
