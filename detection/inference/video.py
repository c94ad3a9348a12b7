"""Video files in and out, one frame at a time, with PyAV (FFmpeg's libraries in a wheel).

PyAV rather than OpenCV: its wheel reads and writes H.264 MP4 (OpenCV's headless wheel writes
only MPEG-4 Part 2 into MP4; torchvision's own video API, which wrapped PyAV, is gone from
torchvision 0.24 on). Frames are decoded and encoded as they come, so a video of any length
needs the memory of a few frames.

Written videos are MP4: H.264 (libx264, yuv420p, CRF 20) when the frame size is even, MPEG-4
Part 2 otherwise (4:2:0 H.264 needs even sizes), at the input's average frame rate and size;
frames are numbered as decoded, so a variable-frame-rate input comes out constant-rate; audio
is not copied.
"""

from __future__ import annotations

import contextlib
import os
from fractions import Fraction
from typing import Any, Iterator

import numpy as np

from cluster.errors import DataError
from cluster.files import atomic_path
from detection.inference.sources import short_reason


def _av() -> Any:
    try:
        import av
    except ImportError:
        raise DataError("reading videos needs PyAV: pip install av") from None
    return av


class VideoReader:
    """The first video stream of ``path``: ``fps`` (a Fraction), ``width``, ``height``,
    ``frames`` (from the header; 0 when the container does not say). Iterating yields
    ``uint8 [H, W, 3]`` RGB frames. DataError when the file cannot be opened or decoded."""

    def __init__(self, path: str) -> None:
        av = _av()
        self.path = path
        try:
            self._container = av.open(path)
        except (av.error.FFmpegError, OSError) as err:
            raise DataError(f"{path}: cannot open the video ({short_reason(err)}); is it a complete video file?") from None
        if not self._container.streams.video:
            self._container.close()
            raise DataError(f"{path}: has no video stream")
        stream = self._stream = self._container.streams.video[0]
        stream.thread_type = "AUTO"  # frame-parallel decoding
        rate = stream.average_rate or stream.guessed_rate
        self.fps = Fraction(rate) if rate else Fraction(25)
        self.width, self.height = stream.codec_context.width, stream.codec_context.height
        self.frames = int(stream.frames or 0)
        if not (self.width and self.height):
            self.close()
            raise DataError(f"{path}: the video stream has no frame size; is it a complete video file?")

    def __iter__(self) -> Iterator[np.ndarray]:
        av = _av()
        count = 0
        try:
            for packet in self._container.demux(self._stream):
                # A file cut short ends in a packet the demuxer marks corrupt ("partial file");
                # decoding would just stop early, and the video would look complete.
                if packet.is_corrupt:
                    raise DataError(f"{self.path}: frame {count} is cut short or corrupt; the file is truncated "
                                    "or damaged")
                for frame in packet.decode():
                    yield frame.to_ndarray(format="rgb24")
                    count += 1
        except av.error.FFmpegError as err:
            raise DataError(f"{self.path}: cannot decode frame {count} ({short_reason(err)}); the file is truncated "
                            "or corrupt") from None

    def close(self) -> None:
        """Release the file."""
        self._container.close()

    def __enter__(self) -> "VideoReader":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class _Aborted(Exception):
    """Thrown into the atomic write of an aborted video so that it removes its temporary file."""


class VideoWriter:
    """An MP4 at ``path`` (see the module docstring), written to a temporary file beside it and
    renamed by :meth:`commit` (called when a ``with`` block ends normally); :meth:`abort` (called
    when it ends by an exception) removes the temporary file, so ``path`` is never half-written.
    Nothing, not even the folder, is made before the first frame."""

    def __init__(self, path: str, fps: Fraction, width: int, height: int) -> None:
        self.path, self.fps, self.width, self.height = path, fps, width, height
        even = width % 2 == 0 and height % 2 == 0
        self.codec = "libx264" if even and "libx264" in _av().codecs_available else "mpeg4"
        self.frames = 0
        self._container: Any = None
        self._file = contextlib.ExitStack()  # the atomic write, entered at the first frame

    def _open(self) -> None:
        folder = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(folder, exist_ok=True)
        tmp = self._file.enter_context(atomic_path(self.path))
        self._container = _av().open(tmp, "w", format="mp4")
        stream = self._stream = self._container.add_stream(self.codec, rate=self.fps)
        stream.width, stream.height, stream.pix_fmt = self.width, self.height, "yuv420p"
        if self.codec == "libx264":
            stream.options = {"crf": "20", "preset": "veryfast"}
        else:
            stream.bit_rate = max(1_000_000, self.width * self.height * 4)  # mpeg4's default is blurry

    def write(self, frame: np.ndarray) -> None:
        """Encode one ``uint8 [H, W, 3]`` RGB frame."""
        if self._container is None:
            self._open()
        picture = _av().VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
        for packet in self._stream.encode(picture):
            self._container.mux(packet)
        self.frames += 1

    def commit(self) -> None:
        """Flush the encoder, close the file and move it to ``path``."""
        if self._container is None:
            raise DataError(f"{self.path}: no frame to write; the input video has no decodable frame")
        for packet in self._stream.encode():
            self._container.mux(packet)
        self._container.close()
        self._file.close()  # moves the temporary file to ``path``

    def abort(self) -> None:
        """Close and remove the temporary file."""
        if self._container is not None:
            try:
                self._container.close()
            except Exception:  # noqa: BLE001 - closing a broken encoder; the file goes anyway
                pass
        with contextlib.suppress(_Aborted):
            self._file.__exit__(_Aborted, _Aborted(), None)  # removes the temporary file

    def __enter__(self) -> "VideoWriter":
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        if exc_type is None:
            try:
                self.commit()
            except BaseException:
                self.abort()
                raise
        else:
            self.abort()
