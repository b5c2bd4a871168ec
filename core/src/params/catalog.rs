//! What Daydream's model knows by name: base models and their family, the ControlNets each family
//! accepts, processor names, and the IPAdapter literals. Validation and the loaders read these
//! tables; nothing else should spell the ids out again.

use std::fmt;

/// The architecture family of a base model; it decides which ControlNets and adapters fit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ModelFamily {
    /// Stable Diffusion 1.5 (768-wide CLIP-L text encoder).
    Sd15,
    /// Stable Diffusion 2.1 (1024-wide OpenCLIP-H text encoder); sd-turbo.
    Sd21,
    /// Stable Diffusion XL (two text encoders, added conditioning); sdxl-turbo.
    Sdxl,
}

impl ModelFamily {
    /// The family of a known base model id, `None` for anything else (a local folder, say).
    pub fn of_model(model_id: &str) -> Option<ModelFamily> {
        KNOWN_MODELS
            .iter()
            .find(|(id, _)| *id == model_id)
            .map(|(_, family)| *family)
    }

    /// Daydream's short name: `sd15`, `sd21` or `sdxl`.
    pub fn as_str(self) -> &'static str {
        match self {
            ModelFamily::Sd15 => "sd15",
            ModelFamily::Sd21 => "sd21",
            ModelFamily::Sdxl => "sdxl",
        }
    }

    /// The TAESD that decodes this family's latents.
    pub fn taesd_id(self) -> &'static str {
        match self {
            ModelFamily::Sd15 | ModelFamily::Sd21 => "madebyollin/taesd",
            ModelFamily::Sdxl => "madebyollin/taesdxl",
        }
    }

    /// The ControlNet ids Daydream accepts for this family.
    pub fn controlnets(self) -> &'static [&'static str] {
        match self {
            ModelFamily::Sd15 => SD15_CONTROLNETS,
            ModelFamily::Sd21 => SD21_CONTROLNETS,
            ModelFamily::Sdxl => SDXL_CONTROLNETS,
        }
    }

    /// Whether Daydream's IPAdapter works with this family (sd15 and sdxl only).
    pub fn supports_ip_adapter(self) -> bool {
        matches!(self, ModelFamily::Sd15 | ModelFamily::Sdxl)
    }

    /// The LCM LoRA that fits this family, where there is one (turbo models do not need it).
    pub fn lcm_lora(self) -> Option<&'static str> {
        match self {
            ModelFamily::Sd15 => Some(KNOWN_LORAS[0]),
            ModelFamily::Sdxl => Some(KNOWN_LORAS[1]),
            ModelFamily::Sd21 => None,
        }
    }
}

impl fmt::Display for ModelFamily {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Base model ids Daydream accepts, with their family.
pub const KNOWN_MODELS: &[(&str, ModelFamily)] = &[
    ("stabilityai/sd-turbo", ModelFamily::Sd21),
    ("stabilityai/sdxl-turbo", ModelFamily::Sdxl),
    ("prompthero/openjourney-v4", ModelFamily::Sd15),
    ("Lykon/dreamshaper-8", ModelFamily::Sd15),
];

/// LoRA ids served without being listed in the settings' `allowed_models` (`lcm_lora_id` and
/// `lora_dict` keys alike): the LCM-LoRAs of the families that use one, `lcm_lora_id`'s default
/// first.
pub const KNOWN_LORAS: &[&str] = &[
    "latent-consistency/lcm-lora-sdv1-5",
    "latent-consistency/lcm-lora-sdxl",
];

/// ControlNets for sd21 models (sd-turbo).
pub const SD21_CONTROLNETS: &[&str] = &[
    "thibaud/controlnet-sd21-openpose-diffusers",
    "thibaud/controlnet-sd21-hed-diffusers",
    "thibaud/controlnet-sd21-canny-diffusers",
    "thibaud/controlnet-sd21-depth-diffusers",
    "thibaud/controlnet-sd21-color-diffusers",
    "daydreamlive/TemporalNet2-stable-diffusion-2-1",
];

/// ControlNets for sd15 models.
pub const SD15_CONTROLNETS: &[&str] = &[
    "lllyasviel/control_v11f1p_sd15_depth",
    "lllyasviel/control_v11f1e_sd15_tile",
    "lllyasviel/control_v11p_sd15_canny",
    "daydreamlive/TemporalNet2-stable-diffusion-v1-5",
    "CiaraRowles/TemporalNet2",
];

/// ControlNets for sdxl models.
pub const SDXL_CONTROLNETS: &[&str] = &[
    "xinsir/controlnet-depth-sdxl-1.0",
    "xinsir/controlnet-canny-sdxl-1.0",
    "xinsir/controlnet-tile-sdxl-1.0",
    "daydreamlive/TemporalNet2-stable-diffusion-xl-base-1.0",
];

/// The family a known ControlNet id belongs to.
pub fn controlnet_family(controlnet_id: &str) -> Option<ModelFamily> {
    [ModelFamily::Sd21, ModelFamily::Sd15, ModelFamily::Sdxl]
        .into_iter()
        .find(|family| family.controlnets().contains(&controlnet_id))
}

/// Every known ControlNet id, all families.
pub fn all_controlnets() -> impl Iterator<Item = &'static str> {
    SD21_CONTROLNETS
        .iter()
        .chain(SD15_CONTROLNETS)
        .chain(SDXL_CONTROLNETS)
        .copied()
}

/// Image-domain processor names (ControlNet preprocessors, image pre/postprocessing), as in
/// Daydream's `ImageProcessorName`. Naming one here does not mean sdstream implements it; the
/// preprocess module says which it runs.
pub const IMAGE_PROCESSORS: &[&str] = &[
    "blur",
    "canny",
    "depth",
    "depth_tensorrt",
    "external",
    "feedback",
    "hed",
    "lineart",
    "mediapipe_pose",
    "mediapipe_segmentation",
    "openpose",
    "passthrough",
    "pose_tensorrt",
    "realesrgan_trt",
    "sharpen",
    "soft_edge",
    "standard_lineart",
    "temporal_net_tensorrt",
    "upscale",
];

/// Latent-domain processor names (latent pre/postprocessing), as in Daydream.
pub const LATENT_PROCESSORS: &[&str] = &["latent_feedback"];

/// IPAdapter per-layer weight distributions Daydream accepts.
pub const IP_ADAPTER_WEIGHT_TYPES: &[&str] = &[
    "linear",
    "ease in",
    "ease out",
    "ease in-out",
    "reverse in-out",
    "weak input",
    "weak output",
    "weak middle",
    "strong middle",
    "style transfer",
    "composition",
    "strong style transfer",
    "style and composition",
    "style transfer precise",
    "composition precise",
];

/// Values Daydream accepts for the deprecated `ip_adapter.ipadapter_model_path`.
pub const IP_ADAPTER_MODEL_PATHS: &[&str] = &[
    "h94/IP-Adapter/models/ip-adapter_sd15.bin",
    "h94/IP-Adapter/sdxl_models/ip-adapter_sdxl.bin",
    "h94/IP-Adapter-FaceID/ip-adapter-faceid_sd15.bin",
    "h94/IP-Adapter-FaceID/ip-adapter-faceid_sdxl.bin",
];

/// h94's Plus checkpoints, which sdstream accepts for `ip_adapter.ipadapter_model_path` beyond
/// Daydream's values (the SDXL ones are made for the ViT-H encoder of `models/image_encoder`).
pub const IP_ADAPTER_PLUS_MODEL_PATHS: &[&str] = &[
    "h94/IP-Adapter/models/ip-adapter-plus_sd15.bin",
    "h94/IP-Adapter/models/ip-adapter-plus-face_sd15.bin",
    "h94/IP-Adapter/sdxl_models/ip-adapter-plus_sdxl_vit-h.bin",
    "h94/IP-Adapter/sdxl_models/ip-adapter-plus-face_sdxl_vit-h.bin",
];

/// Values Daydream accepts for the deprecated `ip_adapter.image_encoder_path`.
pub const IP_ADAPTER_IMAGE_ENCODER_PATHS: &[&str] = &[
    "h94/IP-Adapter/models/image_encoder",
    "h94/IP-Adapter/sdxl_models/image_encoder",
];

/// Values Daydream accepts for `ip_adapter.insightface_model_name`.
pub const INSIGHTFACE_MODEL_NAMES: &[&str] = &["buffalo_l"];

/// Formats ids the way Daydream's messages do (a Python list repr): `['a', 'b']`.
pub(crate) fn python_list<'a>(items: impl IntoIterator<Item = &'a str>) -> String {
    let quoted: Vec<String> = items.into_iter().map(|s| format!("'{s}'")).collect();
    format!("[{}]", quoted.join(", "))
}
