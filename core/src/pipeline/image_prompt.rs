//! IP-Adapter in a stream (docs/ALGORITHM.md §5f): which checkpoint the parameters ask for, the
//! style picture's tokens (encoded once per picture), and each layer's scale.

use std::sync::Arc;

use crate::model::bundle::StableDiffusionModels;
use crate::model::ip_adapter::{ImageTokens, IpAdapter, layer_scales};
use crate::model::unet::ImagePrompt;
use crate::params::{EngineSettings, StreamDiffusionParams};
use crate::pipeline::style_image::{self, FetchPolicy, StyleImage};
use crate::preprocess::networks::{Network, NetworkPool, NetworkRequest};
use crate::{Error, Result};

/// Where the style picture comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum StyleSource {
    /// `ip_adapter_style_image_url`.
    Url(String),
    /// Handed in by the host ([`crate::StreamDiffusion::set_style_image`]).
    Host(StyleImage),
}

/// An active adapter: its network, the tokens of the current picture, the layers' scales.
#[derive(Debug, Clone)]
pub(crate) struct ImagePromptState {
    network: Arc<Network>,
    source: StyleSource,
    /// In the models' dtype, laid out by the stream like the text embeddings.
    pub(crate) tokens: ImageTokens,
    scales: Vec<f64>,
}

impl ImagePromptState {
    fn adapter(&self) -> &IpAdapter {
        match &*self.network {
            Network::IpAdapter(adapter) => adapter,
            // `build` only keeps IP-Adapter networks.
            _ => unreachable!("an image prompt holds an IP-Adapter network"),
        }
    }

    /// What the UNet takes for this state.
    pub(crate) fn unet_input(&self) -> ImagePrompt<'_> {
        let adapter = self.adapter();
        ImagePrompt {
            adapter: adapter.layers(),
            tokens: adapter.config().tokens,
            scales: &self.scales,
        }
    }

    /// Each cross-attention layer's scale.
    pub(crate) fn scales(&self) -> &[f64] {
        &self.scales
    }
}

/// The checkpoint `params` asks for, when the adapter is on: h94's SD 1.5 or SDXL adapter by the
/// pipeline's family (SDXL has a second text encoder), or the one `ipadapter_model_path` names.
pub(crate) fn request(
    models: &StableDiffusionModels,
    params: &StreamDiffusionParams,
) -> Result<Option<NetworkRequest>> {
    let ip = &params.ip_adapter;
    if !ip.enabled {
        return Ok(None);
    }
    let by_family = if models.second.is_some() {
        NetworkRequest::IP_ADAPTER_SDXL
    } else {
        NetworkRequest::IP_ADAPTER_SD15
    };
    let Some(path) = &ip.ipadapter_model_path else {
        return Ok(Some(by_family));
    };
    let named = NetworkRequest::IP_ADAPTERS
        .into_iter()
        .find(|r| path.ends_with(&format!("{}.bin", r.stem)));
    match named {
        Some(r) if family_name(r) == family_name(by_family) => Ok(Some(r)),
        Some(r) => Err(Error::param(
            "ip_adapter.ipadapter_model_path",
            format!(
                "{path} is the adapter for {} models, this pipeline is {}",
                family_name(r),
                family_name(by_family)
            ),
        )),
        None => Err(Error::param(
            "ip_adapter.ipadapter_model_path",
            format!(
                "{path}: FaceID adapters need ip_adapter.type faceid, which sdstream does not run"
            ),
        )),
    }
}

fn family_name(r: NetworkRequest) -> &'static str {
    if r.stem.starts_with("sdxl_models/") {
        "SDXL"
    } else {
        "SD 1.5"
    }
}

/// The adapter's network, from the process-wide pool (loaded unless some stream holds it).
pub(crate) fn load(
    models: &StableDiffusionModels,
    params: &StreamDiffusionParams,
    settings: &EngineSettings,
) -> Result<Option<Arc<Network>>> {
    let Some(request) = request(models, params)? else {
        return Ok(None);
    };
    let net = NetworkPool::global().get(
        request,
        &settings.hub_options(),
        models.dtype,
        &models.device,
        &mut crate::log::progress,
    )?;
    Ok(Some(net))
}

/// Whether what `params` asks of the adapter is at hand without disk or network: its weights
/// loaded and its style picture fetched (or nothing asked).
pub(crate) fn ready(
    models: &StableDiffusionModels,
    params: &StreamDiffusionParams,
    settings: &EngineSettings,
) -> bool {
    match request(models, params) {
        Ok(Some(request)) => {
            NetworkPool::global()
                .find(
                    request,
                    &settings.hub_options(),
                    models.dtype,
                    &models.device,
                )
                .is_some()
                && style_image::cached(
                    &params.ip_adapter_style_image_url,
                    FetchPolicy::of(settings),
                )
                .is_some()
        }
        Ok(None) => true,
        // Let the build report it.
        Err(_) => false,
    }
}

/// Fetches the style picture `params` names into the cache (the engine's builder thread does
/// this before a change needs it).
pub(crate) fn prefetch(params: &StreamDiffusionParams, settings: &EngineSettings) -> Result<()> {
    if params.ip_adapter.enabled {
        style_image::fetch_cached(
            &params.ip_adapter_style_image_url,
            FetchPolicy::of(settings),
        )?;
    }
    Ok(())
}

/// The adapter state `params` asks for (none when off): `host` overrides the URL's picture;
/// tokens are reused from `previous` when network and picture are the same.
pub(crate) fn build(
    models: &StableDiffusionModels,
    params: &StreamDiffusionParams,
    settings: &EngineSettings,
    host: Option<&StyleImage>,
    previous: Option<&ImagePromptState>,
) -> Result<Option<ImagePromptState>> {
    let Some(network) = load(models, params, settings)? else {
        return Ok(None);
    };
    let Network::IpAdapter(adapter) = &*network else {
        return Err(Error::State(
            "the IP-Adapter slot holds another network".into(),
        ));
    };
    let widths = models.unet.cross_attention_widths();
    let text_width = models.unet.text_width();
    if adapter.layers().widths() != widths || Some(adapter.config().dim) != text_width {
        return Err(Error::ModelLoad {
            path: adapter.path().to_path_buf(),
            detail: format!(
                "this IP-Adapter fits a UNet with cross-attention layers {:?} over {}-wide text; \
                 the pipeline's UNet has {widths:?} over {text_width:?}: it belongs to another \
                 model family",
                adapter.layers().widths(),
                adapter.config().dim
            ),
        });
    }
    let source = match host {
        Some(picture) => StyleSource::Host(picture.clone()),
        None => StyleSource::Url(params.ip_adapter_style_image_url.clone()),
    };
    let tokens = match previous {
        Some(p) if Arc::ptr_eq(&p.network, &network) && p.source == source => p.tokens.clone(),
        _ => {
            let picture = match &source {
                StyleSource::Host(picture) => picture.clone(),
                StyleSource::Url(url) => style_image::fetch_cached(url, FetchPolicy::of(settings))?,
            };
            let t = adapter.encode(&picture.rgb, picture.width, picture.height)?;
            ImageTokens {
                cond: t.cond.to_dtype(models.dtype)?,
                uncond: t.uncond.to_dtype(models.dtype)?,
            }
        }
    };
    let scales = layer_scales(
        adapter.layers().len(),
        params.ip_adapter.scale,
        params.ip_adapter.weight_type.as_deref(),
    );
    Ok(Some(ImagePromptState {
        network,
        source,
        tokens,
        scales,
    }))
}
