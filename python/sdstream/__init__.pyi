from os import PathLike
from typing import Any, Dict, List, Literal, Mapping, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np
import numpy.typing as npt

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

__version__: str

class ValidationError(ValueError):
    """Invalid parameters; the message is sdstream's own (field path, value, rule)."""

class QueueFullError(RuntimeError):
    """The engine's input queue is full (drop policy "lossless")."""

UpdateKind = Literal["unchanged", "hot", "controlnet_swap", "reload"]
Prompt = Union[str, List[Tuple[str, float]]]
Seed = Union[int, List[Tuple[int, float]]]

class _Model:
    @classmethod
    def model_validate(cls, obj: Any, *, context: Optional[Mapping[str, Any]] = ...) -> Any: ...
    @classmethod
    def model_validate_json(
        cls, json_data: Union[str, bytes], *, context: Optional[Mapping[str, Any]] = ...
    ) -> Any: ...
    def model_dump(self, *, mode: str = ..., exclude_none: bool = ..., **_: Any) -> Dict[str, Any]: ...
    def model_dump_json(self, *, indent: Optional[int] = ..., exclude_none: bool = ..., **_: Any) -> str: ...
    def model_copy(self, *, update: Optional[Mapping[str, Any]] = ..., deep: bool = ...) -> Any: ...
    def __eq__(self, other: object) -> bool: ...

class ControlNetConfig(_Model):
    model_id: str
    conditioning_scale: float
    conditioning_channels: Optional[int]
    preprocessor: str
    preprocessor_params: Dict[str, Any]
    enabled: bool
    control_guidance_start: float
    control_guidance_end: float
    def __init__(
        self,
        *,
        model_id: str,
        conditioning_scale: float = 1.0,
        conditioning_channels: Optional[int] = None,
        preprocessor: str = "passthrough",
        preprocessor_params: Mapping[str, Any] = ...,
        enabled: bool = True,
        control_guidance_start: float = 0.0,
        control_guidance_end: float = 1.0,
    ) -> None: ...
    @classmethod
    def model_validate(cls, obj: Any, *, context: Optional[Mapping[str, Any]] = ...) -> "ControlNetConfig": ...
    @classmethod
    def model_validate_json(
        cls, json_data: Union[str, bytes], *, context: Optional[Mapping[str, Any]] = ...
    ) -> "ControlNetConfig": ...
    def model_copy(self, *, update: Optional[Mapping[str, Any]] = ..., deep: bool = ...) -> "ControlNetConfig": ...

class IPAdapterConfig(_Model):
    type: Literal["regular", "faceid"]
    ipadapter_model_path: Optional[str]
    image_encoder_path: Optional[str]
    insightface_model_name: Optional[str]
    scale: float
    weight_type: Optional[str]
    enabled: bool
    def __init__(
        self,
        *,
        type: Literal["regular", "faceid"] = "regular",
        ipadapter_model_path: Optional[str] = None,
        image_encoder_path: Optional[str] = None,
        insightface_model_name: Optional[str] = "buffalo_l",
        scale: float = 1.0,
        weight_type: Optional[str] = "linear",
        enabled: bool = True,
    ) -> None: ...
    @classmethod
    def model_validate(cls, obj: Any, *, context: Optional[Mapping[str, Any]] = ...) -> "IPAdapterConfig": ...
    @classmethod
    def model_validate_json(
        cls, json_data: Union[str, bytes], *, context: Optional[Mapping[str, Any]] = ...
    ) -> "IPAdapterConfig": ...
    def model_copy(self, *, update: Optional[Mapping[str, Any]] = ..., deep: bool = ...) -> "IPAdapterConfig": ...

class StreamDiffusionParams(_Model):
    model_id: str
    prompt: Prompt
    prompt_interpolation_method: Literal["linear", "slerp"]
    normalize_prompt_weights: bool
    negative_prompt: str
    guidance_scale: float
    delta: float
    num_inference_steps: int
    t_index_list: List[int]
    width: int
    height: int
    lora_dict: Optional[Dict[str, float]]
    use_lcm_lora: bool
    lcm_lora_id: str
    acceleration: Literal["none", "xformers", "tensorrt"]
    use_safety_checker: bool
    safety_checker_threshold: float
    use_denoising_batch: bool
    do_add_noise: bool
    skip_diffusion: bool
    seed: Seed
    seed_interpolation_method: Literal["linear", "slerp"]
    normalize_seed_weights: bool
    enable_similar_image_filter: bool
    similar_image_filter_threshold: float
    similar_image_filter_max_skip_frame: int
    controlnets: List[ControlNetConfig]
    ip_adapter: IPAdapterConfig
    ip_adapter_style_image_url: str
    image_preprocessing: Optional[Dict[str, Any]]
    image_postprocessing: Optional[Dict[str, Any]]
    latent_preprocessing: Optional[Dict[str, Any]]
    latent_postprocessing: Optional[Dict[str, Any]]
    show_reloading_frame: bool
    cached_attention: Dict[str, Any]
    def __init__(
        self,
        *,
        model_id: str = "stabilityai/sd-turbo",
        prompt: Prompt = "flowers",
        prompt_interpolation_method: Literal["linear", "slerp"] = "slerp",
        normalize_prompt_weights: bool = True,
        negative_prompt: str = "blurry, low quality, flat, 2d",
        guidance_scale: float = 1.0,
        delta: float = 0.7,
        num_inference_steps: int = 50,
        t_index_list: List[int] = ...,
        width: int = 512,
        height: int = 512,
        lora_dict: Optional[Mapping[str, float]] = None,
        use_lcm_lora: bool = True,
        lcm_lora_id: str = "latent-consistency/lcm-lora-sdv1-5",
        acceleration: Literal["none", "xformers", "tensorrt"] = "tensorrt",
        use_safety_checker: bool = True,
        safety_checker_threshold: float = 0.5,
        use_denoising_batch: bool = True,
        do_add_noise: bool = True,
        skip_diffusion: bool = False,
        seed: Seed = 789,
        seed_interpolation_method: Literal["linear", "slerp"] = "linear",
        normalize_seed_weights: bool = True,
        enable_similar_image_filter: bool = False,
        similar_image_filter_threshold: float = 0.98,
        similar_image_filter_max_skip_frame: int = 10,
        controlnets: List[Union[ControlNetConfig, Mapping[str, Any]]] = ...,
        ip_adapter: Union[IPAdapterConfig, Mapping[str, Any]] = ...,
        ip_adapter_style_image_url: str = ...,
        image_preprocessing: Optional[Mapping[str, Any]] = None,
        image_postprocessing: Optional[Mapping[str, Any]] = None,
        latent_preprocessing: Optional[Mapping[str, Any]] = None,
        latent_postprocessing: Optional[Mapping[str, Any]] = None,
        show_reloading_frame: bool = True,
        cached_attention: Mapping[str, Any] = ...,
    ) -> None: ...
    @classmethod
    def model_validate(
        cls, obj: Any, *, context: Optional[Mapping[str, Any]] = ...
    ) -> "StreamDiffusionParams": ...
    @classmethod
    def model_validate_json(
        cls, json_data: Union[str, bytes], *, context: Optional[Mapping[str, Any]] = ...
    ) -> "StreamDiffusionParams": ...
    def model_copy(
        self, *, update: Optional[Mapping[str, Any]] = ..., deep: bool = ...
    ) -> "StreamDiffusionParams": ...

ParamsLike = Union[StreamDiffusionParams, Mapping[str, Any], str]
FrameLike = Union[npt.NDArray[np.uint8], npt.NDArray[np.float32], Any]
ControlsLike = Mapping[Union[str, PathLike[str]], FrameLike]
TransitionLike = Union[int, Mapping[str, Any]]

def as_frame(frame: FrameLike) -> np.ndarray: ...

class StreamDiffusion:
    def __init__(
        self,
        params: Optional[ParamsLike] = ...,
        model: Optional[Union[str, PathLike[str]]] = ...,
        *,
        cfg_type: Literal["none", "full", "self", "initialize"] = ...,
        frame_buffer_size: int = ...,
        device: str = ...,
        dtype: Literal["f32", "f16", "bf16"] = ...,
        vae: Union[str, PathLike[str]] = ...,
        model_root: Optional[Union[str, PathLike[str]]] = ...,
        allow_any_resolution: bool = ...,
        allow_model_paths: bool = ...,
        allowed_models: Sequence[str] = ...,
        allow_private_network: bool = ...,
        cross_stream_batching: bool = ...,
        frame_budget_ms: Optional[float] = ...,
    ) -> None: ...
    def __call__(self, frame: FrameLike, controls: Optional[ControlsLike] = ...) -> np.ndarray: ...
    def process(self, frame: FrameLike, controls: Optional[ControlsLike] = ...) -> np.ndarray: ...
    @property
    def params(self) -> StreamDiffusionParams: ...
    @property
    def settings(self) -> Dict[str, Any]: ...
    @property
    def closed(self) -> bool: ...
    def set_style_image(self, picture: Any = ...) -> None: ...
    def update_params(self, params: Optional[ParamsLike] = ..., *, transition: Optional[TransitionLike] = ...,
                      **changes: Any) -> UpdateKind: ...
    def status(self) -> Dict[str, Any]: ...
    def close(self) -> None: ...
    def __enter__(self) -> "StreamDiffusion": ...
    def __exit__(self, *exc: Any) -> None: ...

class Output(NamedTuple):
    id: int
    timestamp: int
    image: np.ndarray
    params_version: int
    latency: float

class Engine:
    def __init__(
        self,
        params: Optional[ParamsLike] = ...,
        model: Optional[Union[str, PathLike[str]]] = ...,
        *,
        options: Optional[Mapping[str, Any]] = ...,
        wait: bool = ...,
        cfg_type: Literal["none", "full", "self", "initialize"] = ...,
        frame_buffer_size: int = ...,
        device: str = ...,
        dtype: Literal["f32", "f16", "bf16"] = ...,
        vae: Union[str, PathLike[str]] = ...,
        model_root: Optional[Union[str, PathLike[str]]] = ...,
        allow_any_resolution: bool = ...,
        allow_model_paths: bool = ...,
        allowed_models: Sequence[str] = ...,
        allow_private_network: bool = ...,
        cross_stream_batching: bool = ...,
        frame_budget_ms: Optional[float] = ...,
    ) -> None: ...
    def wait_ready(self, timeout: Optional[float] = ...) -> None: ...
    def submit(
        self,
        frame: FrameLike,
        timestamp: Optional[int] = ...,
        controls: Optional[ControlsLike] = ...,
    ) -> int: ...
    def process(
        self,
        frame: FrameLike,
        controls: Optional[ControlsLike] = ...,
        timestamp: Optional[int] = ...,
    ) -> Output: ...
    def poll(self) -> Optional[Output]: ...
    def recv(self, timeout: float = ...) -> Optional[Output]: ...
    def flush(self) -> int: ...
    def update_params(self, params: Optional[ParamsLike] = ..., *, transition: Optional[TransitionLike] = ...,
                      **changes: Any) -> UpdateKind: ...
    def restart(self) -> None: ...
    def set_style_image(self, picture: Any = ...) -> None: ...
    @property
    def params(self) -> StreamDiffusionParams: ...
    def status(self) -> Dict[str, Any]: ...
    def close(self) -> None: ...
    def __enter__(self) -> "Engine": ...
    def __exit__(self, *exc: Any) -> None: ...

class ImageProcessor:
    def __init__(
        self,
        name: str,
        params: Optional[Union[Mapping[str, Any], str]] = ...,
        *,
        cfg_type: Literal["none", "full", "self", "initialize"] = ...,
        frame_buffer_size: int = ...,
        device: str = ...,
        dtype: Literal["f32", "f16", "bf16"] = ...,
        vae: Union[str, PathLike[str]] = ...,
        model_root: Optional[Union[str, PathLike[str]]] = ...,
        allow_any_resolution: bool = ...,
        allow_model_paths: bool = ...,
        allowed_models: Sequence[str] = ...,
        allow_private_network: bool = ...,
        cross_stream_batching: bool = ...,
        frame_budget_ms: Optional[float] = ...,
    ) -> None: ...
    def __call__(self, frame: FrameLike) -> np.ndarray: ...
    def process(self, frame: FrameLike) -> np.ndarray: ...
    @property
    def name(self) -> str: ...
    @property
    def output_channels(self) -> int: ...
    def output_size(self, width: int, height: int) -> Tuple[int, int]: ...
    @property
    def last_ms(self) -> Optional[float]: ...
    def reset(self) -> None: ...
