"""Video I/O through PyAV: streaming frame reads and writes, audio carried as-is.

Policies (documented in README.md):
- Frames are converted to RGB by libavfilter, as the ffmpeg command converts them: with the
  matrix and range the stream declares; an untagged YUV stream with the matrix players assume for
  its size (BT.709 from 720 lines, else BT.601; ``ivvae_cli.colour``), where ffmpeg alone would
  take BT.601 at any size. 16 bits per channel when the source has more than 8.
- Written videos are tagged with matrix, primaries, transfer and range, and converted from RGB with
  that matrix and range: those players assume for the output's size (so that players ignoring
  tags agree), primaries and transfer as the source declared them (``written_colour``).
- Sizes with an odd side are written 4:4:4 unless 4:2:0 is asked for, which repeats the last
  column or row and says so in the file's comment.
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
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from pathlib import Path

import numpy as np

from ivvae_cli.colour import MATRICES, SCALE_MATRICES, UNSPECIFIED, UNTAGGED, Colour, number_of, written_colour
from ivvae_cli.errors import InputError, IvvaeWarning, OutputError
from ivvae_cli.latent_file import MAX_TICKS, TICKS_PER_FRAME, writer_ticks

try:
    import av

    DECODE_ERRORS: tuple[type[Exception], ...] = (av.FFmpegError, ValueError)  # ValueError: 'missing format'
except ImportError as missing:  # the model, streams and latent files need no PyAV (a GPU box without it, say)
    _AV_MISSING = str(missing)

    class _NoPyAV:
        """Stands in for PyAV where it is not installed: video I/O fails at its first use, saying why."""

        def __getattr__(self, name: str):
            raise ModuleNotFoundError(f"reading or writing video needs PyAV (pip install av): {_AV_MISSING}")

    av = _NoPyAV()
    DECODE_ERRORS = (ValueError,)


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
    colour: Colour = UNTAGGED  # as declared
    comment: str | None = None  # the container's; says so when ivvae padded an odd size


@contextmanager
def _open(path: Path) -> Iterator[av.container.InputContainer]:
    """The file opened for reading; damage met while it is open becomes an ``InputError``."""
    if not path.exists():
        raise InputError(f"input not found: {path}")
    if not path.is_file():
        raise InputError(f"input is not a file: {path}")
    try:
        container = av.open(str(path))
    except (*DECODE_ERRORS, UnicodeDecodeError) as e:
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
            colour=Colour.declared_by(ctx),
            comment=container.metadata.get("comment"),
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
        "colour": asdict(v.colour),
        "colour_read_as": asdict(v.colour.assumed(v.height if v.rotation % 180 == 0 else v.width)),
        "size": [v.width, v.height],
        "frames": v.frames,
        "frame_rate": str(v.frame_rate),
        "duration_s": v.duration,
        "rotation": v.rotation,
        "audio": v.audio,
        "file_bytes": path.stat().st_size,
    } | ({"comment": v.comment} if v.comment else {})


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
    conversion, the one the ffmpeg command uses, so declared matrix and range are honoured alike;
    untagged YUV frames are first tagged with the matrix players assume for the stream's height."""

    def __init__(self, stream: av.video.stream.VideoStream, deep: bool, size: tuple[int, int] | None = None):
        self.deep = deep
        ctx = stream.codec_context
        yuv = ctx.pix_fmt is not None and not av.VideoFormat(ctx.pix_fmt).is_rgb
        self.assumed_matrix = number_of(MATRICES, UNTAGGED.assumed(ctx.height).matrix) if yuv else None
        self.graph = av.filter.Graph()
        chain = [self.graph.add_buffer(template=stream)]
        if size is not None:  # (width, height) before rotation
            chain.append(self.graph.add("scale", f"w={size[0]}:h={size[1]}:flags=bicubic+accurate_rnd+full_chroma_int"))
        chain += [self.graph.add("format", "rgb48le" if deep else "rgb24"), self.graph.add("buffersink")]
        _connect(self.graph, chain)

    def __call__(self, frame: av.VideoFrame) -> np.ndarray:
        if self.assumed_matrix is not None and frame.colorspace == UNSPECIFIED:
            frame.colorspace = self.assumed_matrix
        self.graph.push(frame)
        rgb = self.graph.pull().to_ndarray()
        turns = round(frame.rotation / 90) % 4 if frame.rotation else 0
        return np.rot90(rgb, k=turns) if turns else rgb


def _connect(graph: av.filter.Graph, chain: list[av.filter.context.FilterContext]) -> None:
    """Link the filters of ``graph`` one after another and configure it."""
    for a, b in itertools.pairwise(chain):
        a.link_to(b)
    graph.configure()


def unit_float(frames: np.ndarray) -> np.ndarray:
    """uint8 or uint16 RGB -> float32 in [0, 1]."""
    return frames.astype(np.float32) / np.float32(np.iinfo(frames.dtype).max)


def resized(width: int, height: int, short_side: int | None) -> tuple[int, int]:
    """``(width, height)`` scaled so the short side is ``short_side`` and the long side is the even
    number nearest the aspect (as ffmpeg's ``scale=-2``), so that 4:2:0 video holds the result."""
    if not short_side:
        return width, height
    if short_side % 2:
        raise InputError(f"short side {short_side} is odd; use an even one (4:2:0 video needs even sides)")
    short, long = min(width, height), max(width, height)
    long_side = max(2, 2 * ((long * short_side + short) // (2 * short)))  # rounded half up, as ffmpeg does
    return (short_side, long_side) if width <= height else (long_side, short_side)


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
RGB_CODECS = {"ffv1": {8: "bgr0", 10: "gbrp10le"}, "libx264rgb": {8: "rgb24"}}  # RGB unless --chroma says
DEEP_CODECS = {"libx265", "libvpx-vp9", "libsvtav1", "libaom-av1", "ffv1"}  # 10 bits for deep sources
CHROMA = ("auto", "420", "444")
QUIET_OPTIONS = {"libvpx-vp9": {"b": "0"}, "libx265": {"x265-params": "log-level=error"}}  # constant quality, no log


@dataclass(frozen=True)
class OutputFormat:
    """How a video will be written; decided before any frame, so a command can say so first."""

    codec: str
    pix_fmt: str
    bit_depth: int
    colour: Colour  # converted with and tagged as; matrix "gbr" for RGB
    width: int  # the picture
    height: int
    coded_width: int  # the picture padded to even sides for 4:2:0, else the same
    coded_height: int
    notes: tuple[str, ...] = ()
    crf: int = 18  # the constant rate factor of lossy codecs (RGB H.264 is lossless at 0)

    @property
    def comment(self) -> str | None:
        """What the file's comment says of padding, if any."""
        if (self.coded_width, self.coded_height) == (self.width, self.height):
            return None
        return (
            f"ivvae: the picture is {self.width}x{self.height}; its last column/row is repeated to "
            f"{self.coded_width}x{self.coded_height} for 4:2:0"
        )


def output_format(
    path: Path,
    width: int,
    height: int,
    *,
    codec: str | None = None,
    lossless: bool = False,
    colour: Colour = UNTAGGED,
    source_depth: int = 8,
    bit_depth: int | None = None,
    chroma: str = "auto",
) -> OutputFormat:
    """The codec, pixel format, bit depth, colour and size of a ``width`` x ``height`` video to
    write to ``path`` from a source with ``colour`` and ``source_depth`` bits (the policies in the
    module docstring). H.264 (or VP9 for .webm) by default; ``lossless`` picks FFV1 RGB (.mkv, .avi)
    or H.264 RGB at CRF 0 (.mp4, .mov). ``bit_depth`` None: 10 for deep sources where the codec
    holds it (H.265, VP9, AV1, FFV1), else 8. ``chroma`` auto: 4:2:0, or 4:4:4 for an odd side."""
    suffix = path.suffix.lower()
    if lossless:
        if suffix not in LOSSLESS:
            raise OutputError(f"no lossless codec for {suffix or 'files without extension'}; use .mkv or .mp4")
        codec = LOSSLESS[suffix]
    codec = CODEC_NAMES.get(codec or "", codec) or DEFAULT_CODEC.get(suffix, "libx264")
    if bit_depth not in (None, 8, 10):
        raise OutputError(f"bit depth {bit_depth}: use 8 or 10")
    if chroma not in CHROMA:
        raise OutputError(f"chroma '{chroma}': use {', '.join(CHROMA)}")
    try:
        takes = {f.name for f in av.codec.Codec(codec, "w").video_formats or ()}
    except ValueError:
        raise OutputError(f"no video encoder '{codec}' in this ffmpeg") from None
    deep = source_depth > 8 and codec in DEEP_CODECS
    depths = [bit_depth] if bit_depth else [10, 8] if deep else [8]
    odd = bool(width % 2 or height % 2)
    layouts = [chroma]
    if chroma == "auto":
        layouts = ["rgb"] if codec in RGB_CODECS else ["444", "420"] if odd else ["420"]
    choices = [(d, c, _pix_fmt(codec, d, c)) for d in depths for c in layouts]
    depth, layout, pix_fmt = next(((d, c, p) for d, c, p in choices if p in takes), (None, None, None))
    if pix_fmt is None:
        what = f"{depths[0]}-bit " + ("RGB" if layouts[0] == "rgb" else f"4:{layouts[0][1]}:{layouts[0][2]}")
        raise OutputError(f"{codec} cannot write {what} video; choose another --codec (ffv1 and h265 take all)")
    padded = layout == "420" and odd
    coded = (width + width % 2, height + height % 2) if padded else (width, height)
    notes = []
    if source_depth > 8 and depth == 8 and bit_depth is None:
        high10 = " (so does --bit-depth 10: H.264 High 10, which few browsers play)" if codec == "libx264" else ""
        notes.append(
            f"the source has {source_depth} bits per channel, this {codec} output 8; --codec h265, av1 or ffv1 "
            f"keeps 10{high10}"
        )
    if odd and chroma == "auto" and layout == "444":
        notes.append(
            f"{width}x{height} has an odd side, so the output is 4:4:4, which few browsers play; --chroma 420 "
            f"writes 4:2:0 at {width + width % 2}x{height + height % 2}, the last column/row repeated"
        )
    if padded:
        notes.append(
            f"4:2:0 needs even sides: written at {coded[0]}x{coded[1]}, the last column/row of the {width}x{height} "
            "picture repeated (the file's comment says so)"
        )
    return OutputFormat(
        codec, pix_fmt, depth, written_colour(colour, height, rgb=layout == "rgb"), width, height, *coded, tuple(notes)
    )


def _pix_fmt(codec: str, depth: int, layout: str) -> str | None:
    if layout == "rgb":
        return RGB_CODECS[codec].get(depth)
    return f"yuv{layout}p" + ("10le" if depth == 10 else "")


class VideoWriter:
    """Write float RGB frames in [0, 1] to a video file as ``fmt`` says (``output_format``), with
    timestamps and optional audio."""

    def __init__(
        self, path: Path, fmt: OutputFormat, frame_rate: Fraction, time_base: Fraction, audio: bytes | None = None
    ):
        self.fmt = fmt
        self.source_time_base = time_base
        try:
            self.container = av.open(str(path), "w", format=_format_for(path.suffix.lower()))
        except DECODE_ERRORS as e:
            raise OutputError(f"cannot write {path}: {e}") from None
        try:
            self.stream = self.container.add_stream(fmt.codec, rate=frame_rate)
        except DECODE_ERRORS as e:
            self.container.close()
            raise OutputError(f"cannot encode {fmt.codec} into {path.name}: {e}") from None
        self.stream.width, self.stream.height = fmt.coded_width, fmt.coded_height
        self.stream.pix_fmt = fmt.pix_fmt
        fmt.colour.tag(self.stream.codec_context)
        # Timestamps go on a grid of 1/8 frame: a constant rate comes back exactly, variable
        # timing to within 1/16 of a frame.
        self.time_base = 1 / (frame_rate * TICKS_PER_FRAME)
        self.stream.time_base = self.stream.codec_context.time_base = self.time_base
        self.last_pts = -1
        if fmt.codec == "libx264rgb":
            self.stream.options = {"crf": "0"}
        elif fmt.codec != "ffv1":
            self.stream.options = {"crf": str(fmt.crf)} | QUIET_OPTIONS.get(fmt.codec, {})
        if fmt.comment:
            self.container.metadata["comment"] = fmt.comment
        self.to_output = self._converter()
        self.audio = _AudioCopy(self.container, audio) if audio else None
        try:
            self.container.start_encoding()  # the container's own time base is known from here on
        except DECODE_ERRORS as e:
            self.container.close()
            raise OutputError(
                f"cannot encode {fmt.codec} at {float(frame_rate):.6g} fps into {path.name}: {_reason(e)}"
            ) from None
        self.max_step = MAX_GAP * self.stream.time_base / self.time_base  # in ticks of self.time_base

    def _converter(self) -> av.filter.Graph:
        """RGB -> the output's pixel format with its matrix and range, by libavfilter's ``scale``."""
        fmt, graph = self.fmt, av.filter.Graph()
        args = "flags=accurate_rnd+full_chroma_int"
        if fmt.colour.matrix != "gbr":
            args += f":out_color_matrix={SCALE_MATRICES[fmt.colour.matrix]}:out_range={fmt.colour.range}"
        source = "rgb48le" if fmt.bit_depth > 8 else "rgb24"
        size = {"width": fmt.coded_width, "height": fmt.coded_height}
        chain = [graph.add_buffer(**size, format=source, time_base=self.time_base), graph.add("scale", args)]
        chain += [graph.add("format", fmt.pix_fmt), graph.add("buffersink")]
        _connect(graph, chain)
        return graph

    def write(self, frames: np.ndarray, pts: list[int]) -> None:
        """Frames ``(t, H, W, 3)`` float in [0, 1] with their source timestamps."""
        fmt = self.fmt
        deep = fmt.bit_depth > 8
        peak = 65535 if deep else 255
        pad = ((0, fmt.coded_height - fmt.height), (0, fmt.coded_width - fmt.width), (0, 0))
        padded = (fmt.coded_width, fmt.coded_height) != (fmt.width, fmt.height)
        for image, stamp in zip(frames, pts, strict=True):
            rgb = np.clip(np.rint(image * np.float32(peak)), 0, peak).astype(np.uint16 if deep else np.uint8)
            if padded:
                rgb = np.pad(rgb, pad, mode="edge")
            previous = self.last_pts
            self.last_pts = max(self.last_pts + 1, round(stamp * self.source_time_base / self.time_base))
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb48le" if deep else "rgb24")
            frame.pts, frame.time_base = self.last_pts, self.time_base
            self.to_output.push(frame)
            frame = self.to_output.pull()
            frame.pts, frame.time_base, frame.duration = self.last_pts, self.time_base, TICKS_PER_FRAME
            if previous >= 0 and self.last_pts - previous >= self.max_step:
                seconds = float(stamp * self.source_time_base)
                raise OutputError(
                    f"cannot write the frame at {seconds:.6g} s {self._into()}: it comes "
                    f"{float((self.last_pts - previous) * self.time_base):.6g} s after the one before, "
                    "more than the container holds between two frames"
                )
            try:
                self.container.mux(self.stream.encode(frame))
            except DECODE_ERRORS as e:
                seconds = float(stamp * self.source_time_base)
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
