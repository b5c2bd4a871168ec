"""The pipeline objects: `StreamDiffusion` (synchronous), `Engine` (threaded) and
`ImageProcessor` (one image processor on its own)."""

from __future__ import annotations

import json
import os
from typing import Any, Dict, Mapping, NamedTuple, Optional, Tuple, Union

import numpy as np
import numpy.typing as npt

from . import _sdstream
from ._models import StreamDiffusionParams, ValidationError, _text_or_path, _to_json

ParamsLike = Union[StreamDiffusionParams, Mapping[str, Any], str]
FrameLike = Union["npt.NDArray[np.uint8]", "npt.NDArray[np.float32]", Any]
"""A frame: an HxWx3 / HxWx4 uint8 or HxWx3 float32 numpy array, or a PIL image."""
ControlsLike = Mapping[Union[str, "os.PathLike[str]"], FrameLike]
TransitionLike = Union[int, Mapping[str, Any]]
"""A transition: a frame count, or `{"num_steps": N, "temporal_interpolation_method":
"linear" | "slerp"}` (Daydream Scope's shape, without target prompts)."""


def _settings_body(settings: Mapping[str, Any]) -> str:
    body = {k: (_text_or_path(v, k) if isinstance(v, os.PathLike) else v) for k, v in settings.items()}
    return _sdstream.validate_settings(_to_json(body))


def _params_body(params: Optional[ParamsLike], model: Optional[str], settings: str,
                 changes: Optional[Mapping[str, Any]] = None) -> str:
    """The canonical body of `params` (a model, a dict or a JSON text), with `model` as its
    model_id and `changes` merged in as JSON Merge Patch (core's merge: nested objects merge,
    None restores a default), validated under `settings`."""
    if params is None:
        data: Dict[str, Any] = {}
    elif isinstance(params, StreamDiffusionParams):
        data = params.model_dump()
    elif isinstance(params, (str, bytes, bytearray)):
        data = json.loads(_sdstream.validate_params(params, settings))
    elif isinstance(params, Mapping):
        data = dict(params)
    else:
        raise ValidationError(
            f"params must be a StreamDiffusionParams, a dict or a JSON text, got {type(params).__name__}"
        )
    if model is not None:
        data["model_id"] = _text_or_path(model, "model")
    body = _to_json(data)
    if changes:
        body = _sdstream.merge_patch(body, _to_json(changes))
    return _sdstream.validate_params(body, settings)


def _transition_body(transition: Optional[TransitionLike]) -> Optional[str]:
    """The JSON of a transition (the native code validates it), or None."""
    if transition is None:
        return None
    if isinstance(transition, bool) or not isinstance(transition, (int, Mapping)):
        raise ValidationError(
            "transition must be a frame count or a dict {num_steps, temporal_interpolation_method}, "
            f"got {type(transition).__name__}"
        )
    if isinstance(transition, int):
        transition = {"num_steps": transition}
    return _to_json(dict(transition))


def as_frame(frame: Any) -> np.ndarray:
    """A frame as the native code takes it: a C-contiguous HxWx3 / HxWx4 uint8 array or an
    HxWx3 float32 array in [0, 1]. PIL images are converted (RGB, RGBA kept; other modes to
    RGB); a float32 HxWx4 array loses its alpha. Contiguous arrays are not copied."""
    if not isinstance(frame, np.ndarray):
        mode = getattr(frame, "mode", None)
        if mode is not None and hasattr(frame, "convert"):  # a PIL image
            if mode not in ("RGB", "RGBA"):
                frame = frame.convert("RGB")
            frame = np.asarray(frame)
        else:
            raise TypeError(f"expected a numpy array or a PIL image, got {type(frame).__name__}")
    if frame.dtype == np.float32 and frame.ndim == 3 and frame.shape[2] == 4:
        frame = frame[:, :, :3]
    return np.ascontiguousarray(frame)


def _controls(controls: Optional[ControlsLike]) -> Optional[Dict[str, np.ndarray]]:
    """Control images for `external` ControlNets as the native code takes them: a dict
    {ControlNet model_id: frame}, each frame converted as `as_frame` does; path-like ids become
    text (a ControlNet's model_id may be a folder)."""
    if controls is None:
        return None
    if not isinstance(controls, Mapping):
        raise TypeError(
            f"controls must be a dict {{ControlNet model_id: frame}}, got {type(controls).__name__}"
        )
    return {(k if isinstance(k, str) else os.fspath(k)): as_frame(v) for k, v in controls.items()}


class StreamDiffusion:
    """A StreamDiffusion stream: ``out = stream(frame)``.

    ``StreamDiffusion(params, model=None, **settings)``: `params` is a `StreamDiffusionParams`,
    a dict or a JSON text (validated under `settings`); `model` (an id or a local folder)
    replaces its `model_id`; `settings` are engine settings (``cfg_type``, ``vae``,
    ``device``, ``dtype``, ``model_root``, ``frame_buffer_size``, ``allow_any_resolution``,
    ``allow_model_paths``, ``allowed_models``, ``allow_private_network``,
    ``cross_stream_batching``, ``frame_budget_ms``).
    Loading and inference release the GIL. Calls from several threads are serialised.
    """

    def __init__(self, params: Optional[ParamsLike] = None, model: Optional[str] = None,
                 **settings: Any) -> None:
        self._settings = _settings_body(settings)
        body = _params_body(params, model, self._settings)
        self._native = _sdstream._StreamDiffusion(body, self._settings)

    def __call__(self, frame: Any, controls: Optional[ControlsLike] = None) -> np.ndarray:
        """Processes one frame (HxWx3 / HxWx4 uint8, HxWx3 float32 in [0, 1], or a PIL image)
        and returns the output at the stream's size: uint8 with the input's channel count
        (alpha 255), or float32 HxWx3 in [0, 1].

        `controls` gives control images to ControlNets whose preprocessor is "external":
        ``{controlnet model_id: image}``, images as frames (any size: resized like them). A net
        uses the most recent image given for it; before the first one it contributes nothing.
        An id naming no configured ControlNet raises `ValidationError` naming it, and then
        nothing changes."""
        return self._native.process(as_frame(frame), _controls(controls))

    process = __call__

    @property
    def params(self) -> StreamDiffusionParams:
        """The current parameters."""
        return StreamDiffusionParams.model_validate_json(
            self._native.params_json(), context=json.loads(self._settings))

    @property
    def settings(self) -> Dict[str, Any]:
        """The engine settings."""
        return json.loads(self._native.settings_json())

    def set_style_image(self, picture: Any = None) -> None:
        """Hands in IP-Adapter's style picture: an ``(H, W, 3)`` or ``(H, W, 4)`` uint8 array
        (or float32 RGB in [0, 1]) like a frame, copied and encoded before returning; used
        instead of ``ip_adapter_style_image_url``'s picture, across updates and reloads.
        ``None`` goes back to the URL's picture."""
        self._native.set_style_image(picture)

    def update_params(self, params: Optional[ParamsLike] = None, *,
                      transition: Optional[TransitionLike] = None, **changes: Any) -> str:
        """Applies new parameters: `params` is a complete set (omitted fields take the
        defaults, as in Daydream); keyword `changes` are merged into `params`, or into the
        current parameters when `params` is omitted. With `transition` (a frame count, or
        `{"num_steps": N, "temporal_interpolation_method": "linear" | "slerp"}`) a prompt or
        seed change glides over that many frames instead of switching at once. Returns
        "unchanged", "hot" (applied on the next frame) or "reload" (rebuilt before
        returning). Raises `ValidationError` and keeps the previous state when invalid."""
        if params is None:
            params = json.loads(self._native.params_json())
        return self._native.update(_params_body(params, None, self._settings, changes),
                                   _transition_body(transition))

    def status(self) -> Dict[str, Any]:
        """The status report in the Engine's schema (`Engine.status`): Daydream's fields (state,
        fps, last_params, last_error, ...), the size, frame counters and the last frame's stage
        timings in ms."""
        return json.loads(self._native.status_json())

    def close(self) -> None:
        """Frees the pipeline. Idempotent."""
        self._native.close()

    @property
    def closed(self) -> bool:
        return self._native.closed

    def __enter__(self) -> "StreamDiffusion":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        return f"<sdstream.StreamDiffusion {state}>"


class Output(NamedTuple):
    """A processed frame from `Engine.poll` / `Engine.recv`."""

    id: int
    """Id `submit` returned for its input."""
    timestamp: int
    """The input's timestamp (the caller's, else microseconds since the epoch)."""
    image: np.ndarray
    """The picture, in the input's layout at the stream's size."""
    params_version: int
    """Version of the parameters it was made with."""
    latency: float
    """Seconds from submit to ready."""


class Engine:
    """The pipeline on its own threads: `submit` queues a copy of a frame and returns at once;
    `poll` / `recv` collect outputs in submission order. Parameter updates are applied between
    frames (hot) or built in the background (reload).

    ``Engine(params, model=None, *, options=None, wait=True, **settings)``: `options` holds
    ``queue_capacity``, ``output_capacity``, ``drop_policy`` ("latest" / "lossless"),
    ``warmup``, ``input_timeout_ms``, ``fps_window_ms``. With ``wait=False`` the constructor
    returns while the model loads (see `status()` and `wait_ready`).
    """

    def __init__(self, params: Optional[ParamsLike] = None, model: Optional[str] = None, *,
                 options: Optional[Mapping[str, Any]] = None, wait: bool = True,
                 **settings: Any) -> None:
        self._settings = _settings_body(settings)
        body = _params_body(params, model, self._settings)
        options_body = None if options is None else _sdstream.validate_options(_to_json(options))
        self._native = _sdstream._Engine(body, self._settings, options_body, wait)

    def wait_ready(self, timeout: Optional[float] = None) -> None:
        """Waits until the pipeline serves; raises the load error if it failed."""
        self._native.wait_ready(timeout)

    def submit(self, frame: Any, timestamp: Optional[int] = None,
               controls: Optional[ControlsLike] = None) -> int:
        """Queues a copy of `frame` and returns its id; never waits for inference. `timestamp`
        (any unit) comes back with the output; `controls` gives control images to "external"
        ControlNets as in `StreamDiffusion.__call__` (copied too). An id naming no configured
        ControlNet raises `ValidationError` naming it, and nothing is queued."""
        return self._native.submit(as_frame(frame), timestamp, _controls(controls))

    def process(self, frame: Any, controls: Optional[ControlsLike] = None,
                timestamp: Optional[int] = None) -> Output:
        """Submits `frame` and waits for its own output (with the GIL released): the
        synchronous call on the engine's threads, giving what `StreamDiffusion.__call__` gives
        for the same frames, as an `Output`. The output never reaches `poll` / `recv`, and
        outputs of earlier `submit` calls stay there. `controls` and `timestamp` as in `submit`;
        an id naming no configured ControlNet raises `ValidationError` and nothing is queued.
        Raises `RuntimeError` when the frame is dropped before it is processed (a newer frame
        took its place in a full "latest" queue, `flush`, `close`) or fails in the pipeline."""
        return Output(*self._native.process(as_frame(frame), _controls(controls), timestamp))

    def poll(self) -> Optional[Output]:
        """The oldest output not yet collected, or None; never waits."""
        out = self._native.poll()
        return None if out is None else Output(*out)

    def recv(self, timeout: float = 60.0) -> Optional[Output]:
        """The oldest output, waiting up to `timeout` seconds; None when none came."""
        out = self._native.recv(timeout)
        return None if out is None else Output(*out)

    def flush(self) -> int:
        """Drops the frames waiting in the input queue; returns how many."""
        return self._native.flush()

    def update_params(self, params: Optional[ParamsLike] = None, *,
                      transition: Optional[TransitionLike] = None, **changes: Any) -> str:
        """As `StreamDiffusion.update_params`, but never waits: "reload" builds in the
        background while the current pipeline keeps serving (a reload ignores `transition`:
        the new pipeline starts from the new values)."""
        if params is None:
            params = json.loads(self._native.params_json())
        return self._native.update(_params_body(params, None, self._settings, changes),
                                   _transition_body(transition))

    def restart(self) -> None:
        """Builds a fresh pipeline with the current parameters."""
        self._native.restart()

    def set_style_image(self, picture: Any = None) -> None:
        """As `StreamDiffusion.set_style_image`, applied by the engine before its next frame
        (a picture it cannot encode is reported in ``status()["last_error"]``)."""
        self._native.set_style_image(picture)

    @property
    def params(self) -> StreamDiffusionParams:
        """The last accepted parameters."""
        return StreamDiffusionParams.model_validate_json(
            self._native.params_json(), context=json.loads(self._settings))

    def status(self) -> Dict[str, Any]:
        """Daydream's status fields and the engine's own counters."""
        return json.loads(self._native.status_json())

    def close(self) -> None:
        """Stops the engine and joins its threads. Idempotent."""
        self._native.close()

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<sdstream.Engine state={self.status().get('state')}>"


class ImageProcessor:
    """One image processor on its own: ``control = processor(frame)``.

    ``ImageProcessor(name, params=None, **settings)``: `name` is a Daydream image-processor
    name (``"depth_tensorrt"``, ``"pose_tensorrt"``, ``"hed"``, ``"canny"``, ...), `params` its
    ``preprocessor_params`` (a dict or a JSON text), `settings` engine settings (``device``,
    ``dtype``, ``model_root``, ...). A model-based processor loads its network (found like
    models: ``model_root``, the Hugging Face cache, a download). Invalid input raises
    `ValidationError` naming the field. Processing releases the GIL; calls from several
    threads are serialised.
    """

    def __init__(self, name: str, params: Optional[Union[Mapping[str, Any], str]] = None,
                 **settings: Any) -> None:
        if not isinstance(name, str):
            raise ValidationError(f"name must be a processor name (a str), got {type(name).__name__}")
        if params is None:
            body = "{}"
        elif isinstance(params, (str, bytes, bytearray)):
            body = params if isinstance(params, str) else bytes(params).decode()
        elif isinstance(params, Mapping):
            body = _to_json(dict(params))
        else:
            raise ValidationError(f"params must be a dict or a JSON text, got {type(params).__name__}")
        self._native = _sdstream._ImageProcessor(name, body, _settings_body(settings))

    def __call__(self, frame: Any) -> np.ndarray:
        """The control image of `frame` (as for `StreamDiffusion`): an HxWxC uint8 array, C = 3
        (RGB) or 6 (temporal_net_tensorrt's concat: the previous frame, then the flow). A
        temporal processor keeps the frame for the next call."""
        return self.process(frame)

    def process(self, frame: Any) -> np.ndarray:
        """Same as calling the processor."""
        return self._native.process(as_frame(frame))

    @property
    def name(self) -> str:
        """The processor's name."""
        return self._native.name

    @property
    def output_channels(self) -> int:
        """Channels of its images."""
        return self._native.output_channels

    def output_size(self, width: int, height: int) -> Tuple[int, int]:
        """(width, height) of its image for a `width` x `height` frame."""
        return self._native.output_size(width, height)

    @property
    def last_ms(self) -> Optional[float]:
        """Milliseconds the last call took (None before the first)."""
        return self._native.last_ms

    def reset(self) -> None:
        """Forgets the previous frame (a temporal processor starts over)."""
        self._native.reset()
