"""sdstream: real-time StreamDiffusion on candle, from Python.

* `StreamDiffusionParams`, `ControlNetConfig`, `IPAdapterConfig`: Daydream's parameter models,
  validated by sdstream's Rust core (invalid input raises `ValidationError`, a `ValueError`).
* `StreamDiffusion`: ``out = stream(frame)`` on numpy arrays (or PIL images).
* `Engine`: the same pipeline on its own threads, ``submit`` / ``poll``.
* `ImageProcessor`: one image processor (depth, pose, HED, canny, ...) on its own.
"""

from ._sdstream import QueueFullError, ValidationError, __version__
from ._models import ControlNetConfig, IPAdapterConfig, Prompt, Seed, StreamDiffusionParams, UpdateKind
from ._stream import (
    ControlsLike, Engine, FrameLike, ImageProcessor, Output, ParamsLike, StreamDiffusion, TransitionLike,
    as_frame,
)

__all__ = [
    "ControlNetConfig",
    "Engine",
    "IPAdapterConfig",
    "ImageProcessor",
    "Output",
    "QueueFullError",
    "StreamDiffusion",
    "StreamDiffusionParams",
    "ValidationError",
    "__version__",
    "as_frame",
]
