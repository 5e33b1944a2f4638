"""Video decoding for feature extraction: PyAV, resampled to a fixed frame rate, resized and centre-cropped.

Why PyAV: it is maintained, ships binary wheels with FFmpeg bundled (no system FFmpeg needed), reads
every container/codec FFmpeg reads, and works beside any torch build. torchvision's video reader is
deprecated, needs a torchvision built against the exact installed torch (the PyPI wheel does not work with
ccluster's torch build), and would only wrap the same FFmpeg.

The published I3D features were made from frames at 25 fps; :func:`iter_frames` resamples any source
rate to ``fps`` the way FFmpeg's ``fps`` filter does (each source frame is placed at its nearest output
tick, frames are duplicated to fill gaps and dropped when several land on one tick), then resizes the
short side to ``short_side`` (bilinear) and takes the centre ``crop`` x ``crop`` square.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Iterator, Optional, Tuple

import numpy as np

__all__ = ["require_av", "VideoInfo", "probe", "resized_shape", "center_crop_box", "iter_frames",
           "VIDEO_EXTENSIONS", "VideoDecodeError"]

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mkv", ".mov", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv", ".flv",
                    ".3gp", ".ts")

INSTALL_HINT = "pip install 'ccluster[features]'  (or: pip install av opencv-contrib-python-headless)"


class VideoDecodeError(RuntimeError):
    """A video could not be opened or decoded (corrupt file, no video stream, no frames)."""


def require_av():
    """Import and return PyAV, or raise ImportError saying what to install."""
    try:
        import av  # noqa: F401
    except ImportError as e:
        raise ImportError(f"video decoding needs PyAV (the 'av' package), which is not installed: {e}. "
                          f"Install it with: {INSTALL_HINT}") from None
    return av


@dataclass
class VideoInfo:
    """What the container says about a video's first video stream."""
    path: str
    width: int
    height: int
    fps: Optional[float]        # the stream's average frame rate, if known
    duration: Optional[float]   # seconds, if the container knows it
    frames: Optional[int]       # frame count, if the container knows it (often 0/None)


def _open(path: str):
    av = require_av()
    if not os.path.isfile(path):
        raise VideoDecodeError(f"{path}: no such file")
    try:
        container = av.open(path)
    except Exception as e:  # noqa: BLE001 - av raises many error types for bad input
        raise VideoDecodeError(f"{path}: cannot open ({type(e).__name__}: {e})") from None
    if not container.streams.video:
        container.close()
        raise VideoDecodeError(f"{path}: has no video stream")
    return container


def probe(path: str) -> VideoInfo:
    """Read a video's size, frame rate and duration from its header (no decoding)."""
    container = _open(path)
    try:
        s = container.streams.video[0]
        rate = s.average_rate or s.guessed_rate
        duration = None
        if s.duration is not None and s.time_base is not None:
            duration = float(s.duration * s.time_base)
        elif container.duration is not None:
            duration = container.duration / 1_000_000
        return VideoInfo(path, s.codec_context.width, s.codec_context.height,
                         float(rate) if rate else None, duration, s.frames or None)
    finally:
        container.close()


def resized_shape(height: int, width: int, short_side: int) -> Tuple[int, int]:
    """(height, width) after scaling so that the shorter side is ``short_side`` (aspect kept, rounded)."""
    if height <= 0 or width <= 0:
        raise ValueError(f"resized_shape: frame size must be positive, got {height}x{width}")
    if height <= width:
        return short_side, max(short_side, int(round(width * short_side / height)))
    return max(short_side, int(round(height * short_side / width))), short_side


def center_crop_box(height: int, width: int, crop: int) -> Tuple[int, int]:
    """Top-left (y, x) of the centred ``crop`` x ``crop`` square in a height x width frame."""
    if crop > height or crop > width:
        raise ValueError(f"center_crop_box: crop {crop} does not fit in a {height}x{width} frame "
                         f"(short side must be >= crop)")
    return (height - crop) // 2, (width - crop) // 2


def iter_frames(path: str, fps: float = 25.0, short_side: int = 256,
                crop: Optional[int] = 224) -> Iterator[np.ndarray]:
    """Decode ``path`` and yield RGB frames (uint8 [H, W, 3]) at ``fps`` frames per second.

    Each frame is resized (bilinear, by FFmpeg's swscale) so its short side is ``short_side``; if ``crop``
    is given, the centre ``crop`` x ``crop`` square is yielded, else the whole resized frame.

    Resampling: source frame i with presentation time t_i (relative to the first frame) is placed on
    output tick ``round(t_i * fps)``; output tick k shows the latest source frame placed at or before k.
    Output ends at the end of the last source frame (its time plus one source frame period), so a video
    of D seconds gives about ``D * fps`` frames whatever its own frame rate.

    Raises:
        VideoDecodeError: the file cannot be opened, has no video stream, fails while decoding, or
            decodes to no frames. Frames already yielded stay valid.
        ImportError: PyAV is not installed.
    """
    if fps <= 0:
        raise ValueError(f"iter_frames: fps must be positive, got {fps}")
    if crop is not None and crop > short_side:
        raise ValueError(f"iter_frames: crop ({crop}) must not exceed short_side ({short_side})")
    container = _open(path)
    try:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        rate = stream.average_rate or stream.guessed_rate
        src_period = 1.0 / float(rate) if rate else 1.0 / fps
        size = None            # (out_h, out_w), fixed from the first frame
        held = None            # the av.VideoFrame shown until the next one's tick
        held_array = None      # held, converted (only when it is actually emitted)
        t0 = None
        next_tick = 0
        last_time = 0.0
        index = 0

        def convert(frame):
            nonlocal size
            if size is None:
                size = resized_shape(frame.height, frame.width, short_side)
            img = frame.to_ndarray(width=size[1], height=size[0], format="rgb24", interpolation="BILINEAR")
            if crop is not None:
                y, x = center_crop_box(img.shape[0], img.shape[1], crop)
                img = img[y:y + crop, x:x + crop]
            return np.ascontiguousarray(img)

        try:
            for frame in container.decode(stream):
                t = frame.time
                if t is None:  # no timestamp: assume a constant rate
                    t = index * src_period
                if t0 is None:
                    t0 = t
                t -= t0
                index += 1
                tick = int(math.floor(t * fps + 0.5))
                if held is not None:
                    while next_tick < tick:
                        if held_array is None:
                            held_array = convert(held)
                        yield held_array
                        next_tick += 1
                held, held_array = frame, None
                last_time = max(last_time, t)
        except VideoDecodeError:
            raise
        except Exception as e:  # noqa: BLE001 - a decode error mid-stream: report, do not crash the run
            raise VideoDecodeError(f"{path}: decoding failed after {index} frame(s) "
                                   f"({type(e).__name__}: {e})") from None
        if held is None:
            raise VideoDecodeError(f"{path}: decoded no frames")
        end_tick = max(next_tick + 1, int(math.floor((last_time + src_period) * fps + 0.5)))
        while next_tick < end_tick:
            if held_array is None:
                held_array = convert(held)
            yield held_array
            next_tick += 1
    finally:
        container.close()
