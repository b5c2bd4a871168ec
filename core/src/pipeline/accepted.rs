//! What a stream accepts beyond the parameter contract: the features this version runs, and
//! which control images a frame may carry. The stream and the engine share these rules.

use crate::params::{IpAdapterType, StreamDiffusionParams};
use crate::preprocess;
use crate::{Error, Result};

/// Rejects parameters that ask for features this version does not implement, rather than
/// silently streaming without them, and checks every ControlNet's preprocessor and its
/// parameters with [`preprocess::validate`].
pub(crate) fn check_supported(params: &StreamDiffusionParams) -> Result<()> {
    for (i, net) in params.controlnets.iter().enumerate() {
        preprocess::validate(
            &net.preprocessor,
            &net.preprocessor_params,
            &format!("controlnets[{i}].preprocessor"),
        )?;
    }
    if params.ip_adapter.enabled && params.ip_adapter.kind == IpAdapterType::Faceid {
        return Err(Error::param(
            "ip_adapter.type",
            "faceid is not supported by sdstream: it needs InsightFace's buffalo_l face detector \
             and recogniser (ONNX networks) and the FaceID checkpoints' LoRA layers; use type \
             regular (style from the whole picture)",
        ));
    }
    preprocess::validate_chain(
        params.image_preprocessing.as_ref(),
        "image_preprocessing",
        false,
    )?;
    preprocess::validate_chain(
        params.image_postprocessing.as_ref(),
        "image_postprocessing",
        true,
    )?;
    preprocess::latent::validate_chain(
        params.latent_preprocessing.as_ref(),
        "latent_preprocessing",
    )?;
    preprocess::latent::validate_chain(
        params.latent_postprocessing.as_ref(),
        "latent_postprocessing",
    )?;
    Ok(())
}

/// Fails, naming the id, when a control image is given for an id that names none of
/// `params.controlnets` (the stream and the engine's submit share this rule).
pub(crate) fn check_control_ids<'a>(
    params: &StreamDiffusionParams,
    ids: impl IntoIterator<Item = &'a str>,
) -> Result<()> {
    let configured = || {
        params
            .controlnets
            .iter()
            .map(|c| c.model_id.as_str())
            .collect::<Vec<_>>()
    };
    for id in ids {
        if !params.controlnets.iter().any(|c| c.model_id == id) {
            return Err(Error::param(
                "controls",
                format!(
                    "control image given for {id:?}, which is not a configured ControlNet \
                     (configured: {:?})",
                    configured()
                ),
            ));
        }
    }
    Ok(())
}
