//! What a parameter change costs (docs/ALGORITHM.md §8): nothing, a hot update between two frames,
//! a ControlNet swap (only those nets load or unload), or a reload of the base pipeline.

use super::fields::StreamDiffusionParams;
use super::nested::{ControlNetConfig, IPAdapterConfig};

/// A per-ControlNet field whose change is hot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ControlNetField {
    /// `conditioning_scale`: multiply the residuals differently.
    ConditioningScale,
    /// `enabled`: include or skip the net (it stays loaded).
    Enabled,
    /// `preprocessor`: make the control image another way.
    Preprocessor,
    /// `preprocessor_params`: the preprocessor's settings.
    PreprocessorParams,
    /// `control_guidance_start`: first fraction of the schedule the net acts on.
    ControlGuidanceStart,
    /// `control_guidance_end`: last fraction of the schedule the net acts on.
    ControlGuidanceEnd,
}

/// An `ip_adapter` field whose change is hot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum IpAdapterField {
    /// `enabled`.
    Enabled,
    /// `scale`.
    Scale,
    /// `weight_type`.
    WeightType,
}

/// One hot change: enough for a pipeline to recompute only what it touches (it reads the new
/// values from the new parameters).
#[derive(Debug, Clone, PartialEq)]
pub enum HotChange {
    /// `prompt` changed. `texts_changed`: some text differs (re-encode it); false means only the
    /// weights or the string/list form changed (re-blend cached embeddings).
    Prompt {
        /// Whether any text (not just a weight) changed, or the number of texts.
        texts_changed: bool,
    },
    /// `prompt_interpolation_method`: re-blend prompt embeddings.
    PromptInterpolationMethod,
    /// `normalize_prompt_weights`: re-blend prompt embeddings.
    NormalizePromptWeights,
    /// `negative_prompt`: re-encode the unconditional embedding.
    NegativePrompt,
    /// `guidance_scale`. `cfg_toggled`: it crossed 1.0, which turns classifier-free guidance on
    /// or off, so the embedding batch (negative prompt included or not) must be rebuilt.
    GuidanceScale {
        /// Whether `old > 1.0` differs from `new > 1.0`.
        cfg_toggled: bool,
    },
    /// `delta`: the RCFG stock-noise factor.
    Delta,
    /// `num_inference_steps`: rebuild the scheduler grid (and everything indexed by it:
    /// timesteps, alphas, betas, c_skip, c_out).
    NumInferenceSteps,
    /// `t_index_list`. `same_len`: recompute the per-step coefficients (timesteps, alphas,
    /// betas, c_skip, c_out) only; otherwise also the batch buffers (zeroed), init_noise
    /// (redrawn) and stock noise (zeroed).
    TIndexList {
        /// Whether the new list has the old one's length.
        same_len: bool,
    },
    /// `seed`. `seeds_changed`: some seed differs (redraw its noise); false means only the
    /// weights or the int/list form changed (re-blend). Either way init_noise and stock follow.
    Seed {
        /// Whether any seed value (not just a weight) changed, or the number of seeds.
        seeds_changed: bool,
    },
    /// `seed_interpolation_method`: re-blend seed noise.
    SeedInterpolationMethod,
    /// `normalize_seed_weights`: re-blend seed noise.
    NormalizeSeedWeights,
    /// Hot fields of the ControlNet at `index` of the *new* list changed.
    ControlNet {
        /// Position in the new `controlnets`.
        index: usize,
        /// Its model id.
        model_id: String,
        /// Which of its fields changed.
        fields: Vec<ControlNetField>,
    },
    /// The ControlNets that stay were reordered; apply them in the new list's order. (The
    /// residuals are summed, so only the float summation order changes.)
    ControlNetOrder,
    /// Hot `ip_adapter` fields changed.
    IpAdapter {
        /// Which ones.
        fields: Vec<IpAdapterField>,
    },
    /// `ip_adapter_style_image_url`: fetch and embed the new style image.
    IpAdapterStyleImageUrl,
    /// `image_preprocessing`: rebuild that chain.
    ImagePreprocessing,
    /// `image_postprocessing`: rebuild that chain.
    ImagePostprocessing,
    /// `latent_preprocessing`: rebuild that chain.
    LatentPreprocessing,
    /// `latent_postprocessing`: rebuild that chain.
    LatentPostprocessing,
    /// `use_safety_checker`.
    UseSafetyChecker,
    /// `safety_checker_threshold`.
    SafetyCheckerThreshold,
    /// `show_reloading_frame`: Daydream's overlay switch; nothing to recompute here.
    ShowReloadingFrame,
    /// `cached_attention.max_frames` or `.interval`: resize or re-pace the bank.
    CachedAttention,
}

/// What applying new parameters over old ones costs. Precedence: a reload field makes it a
/// [`Reload`](Update::Reload) whatever else changed; otherwise an added / removed / replaced
/// ControlNet makes it a [`ControlNetSwap`](Update::ControlNetSwap) carrying the hot changes
/// beside it; otherwise [`Hot`](Update::Hot), or [`Unchanged`](Update::Unchanged).
#[derive(Debug, Clone, PartialEq)]
pub enum Update {
    /// Nothing changed.
    Unchanged,
    /// Applied in place between two frames.
    Hot {
        /// Every change, in field order.
        changes: Vec<HotChange>,
    },
    /// ControlNets were added, removed or replaced (a different model_id, or different
    /// conditioning_channels, at a position): only those nets load (in the background) or
    /// unload; the base pipeline keeps streaming. Afterwards the nets are used in the new
    /// list's order.
    ControlNetSwap {
        /// Nets to load, in new-list order.
        added: Vec<ControlNetConfig>,
        /// Model ids of nets to unload, in old-list order.
        removed: Vec<String>,
        /// Hot changes that ride along (kept nets' fields, reordering, prompt, …).
        hot: Vec<HotChange>,
    },
    /// A new base pipeline must be built (beside the running one).
    Reload {
        /// The fields that force it (`"model_id"`, `"width"`, `"ip_adapter.type"`, …).
        fields: Vec<&'static str>,
    },
}

/// What an [`Update`] is, without its details; the one spelling every surface uses (Rust,
/// C's `SdsUpdateKind`, Python's strings, the server's JSON).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum UpdateKind {
    /// [`Update::Unchanged`].
    Unchanged,
    /// [`Update::Hot`].
    Hot,
    /// [`Update::ControlNetSwap`].
    ControlNetSwap,
    /// [`Update::Reload`].
    Reload,
}

impl UpdateKind {
    /// `"unchanged"`, `"hot"`, `"controlnet_swap"` or `"reload"`.
    pub fn as_str(self) -> &'static str {
        match self {
            UpdateKind::Unchanged => "unchanged",
            UpdateKind::Hot => "hot",
            UpdateKind::ControlNetSwap => "controlnet_swap",
            UpdateKind::Reload => "reload",
        }
    }
}

impl std::fmt::Display for UpdateKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Update {
    /// Its kind.
    pub fn kind(&self) -> UpdateKind {
        match self {
            Update::Unchanged => UpdateKind::Unchanged,
            Update::Hot { .. } => UpdateKind::Hot,
            Update::ControlNetSwap { .. } => UpdateKind::ControlNetSwap,
            Update::Reload { .. } => UpdateKind::Reload,
        }
    }

    /// Whether applying it in place leaves the stream batch at its zero state: a new number of
    /// steps (`t_index_list` of another length) gives the stream fresh buffers, so the next
    /// n − 1 outputs come from them unless it is primed again (warm-up). A reload builds a new
    /// stream, which starts zeroed too.
    pub fn resets_stream_batch(&self) -> bool {
        self.needs_reload()
            || self
                .hot_changes()
                .iter()
                .any(|c| matches!(c, HotChange::TIndexList { same_len: false }))
    }

    /// The model ids of the ControlNets a swap adds (empty for any other kind).
    pub fn added_controlnet_ids(&self) -> Vec<&str> {
        match self {
            Update::ControlNetSwap { added, .. } => {
                added.iter().map(|c| c.model_id.as_str()).collect()
            }
            _ => Vec::new(),
        }
    }

    /// True when the update applies in place without loading anything: [`Update::Hot`] and, as
    /// the trivial case, [`Update::Unchanged`]. False for a ControlNet swap and a reload.
    pub fn is_hot(&self) -> bool {
        matches!(self, Update::Hot { .. } | Update::Unchanged)
    }

    /// True for [`Update::Unchanged`].
    pub fn is_unchanged(&self) -> bool {
        matches!(self, Update::Unchanged)
    }

    /// True for [`Update::ControlNetSwap`].
    pub fn is_controlnet_swap(&self) -> bool {
        matches!(self, Update::ControlNetSwap { .. })
    }

    /// True for [`Update::Reload`].
    pub fn needs_reload(&self) -> bool {
        matches!(self, Update::Reload { .. })
    }

    /// The hot changes this update carries (those of `Hot`, or those riding a swap).
    pub fn hot_changes(&self) -> &[HotChange] {
        match self {
            Update::Hot { changes } => changes,
            Update::ControlNetSwap { hot, .. } => hot,
            Update::Unchanged | Update::Reload { .. } => &[],
        }
    }
}

/// Classifies the change from `old` to `new` (both already validated).
///
/// Engine settings are not parameters: any change to [`super::EngineSettings`] is a reload.
pub fn classify(old: &StreamDiffusionParams, new: &StreamDiffusionParams) -> Update {
    // Destructuring without `..` makes a new field a compile error here until it is classified.
    let StreamDiffusionParams {
        model_id,
        prompt,
        prompt_interpolation_method,
        normalize_prompt_weights,
        negative_prompt,
        guidance_scale,
        delta,
        num_inference_steps,
        t_index_list,
        width,
        height,
        lora_dict,
        use_lcm_lora,
        lcm_lora_id,
        acceleration,
        use_safety_checker,
        safety_checker_threshold,
        use_denoising_batch,
        do_add_noise,
        skip_diffusion,
        seed,
        seed_interpolation_method,
        normalize_seed_weights,
        enable_similar_image_filter,
        similar_image_filter_threshold,
        similar_image_filter_max_skip_frame,
        controlnets,
        ip_adapter,
        ip_adapter_style_image_url,
        image_preprocessing,
        image_postprocessing,
        latent_preprocessing,
        latent_postprocessing,
        show_reloading_frame,
        cached_attention,
    } = old;

    let mut reload: Vec<&'static str> = Vec::new();
    let mut note = |changed: bool, name: &'static str| {
        if changed {
            reload.push(name);
        }
    };
    note(*model_id != new.model_id, "model_id");
    note(*width != new.width, "width");
    note(*height != new.height, "height");
    note(*lora_dict != new.lora_dict, "lora_dict");
    note(*use_lcm_lora != new.use_lcm_lora, "use_lcm_lora");
    note(*lcm_lora_id != new.lcm_lora_id, "lcm_lora_id");
    note(*acceleration != new.acceleration, "acceleration");
    note(
        *use_denoising_batch != new.use_denoising_batch,
        "use_denoising_batch",
    );
    note(*do_add_noise != new.do_add_noise, "do_add_noise");
    note(*skip_diffusion != new.skip_diffusion, "skip_diffusion");
    note(
        *enable_similar_image_filter != new.enable_similar_image_filter,
        "enable_similar_image_filter",
    );
    note(
        *similar_image_filter_threshold != new.similar_image_filter_threshold,
        "similar_image_filter_threshold",
    );
    note(
        *similar_image_filter_max_skip_frame != new.similar_image_filter_max_skip_frame,
        "similar_image_filter_max_skip_frame",
    );
    note(
        cached_attention.enabled != new.cached_attention.enabled,
        "cached_attention.enabled",
    );
    reload.extend(ip_adapter_reload_fields(ip_adapter, &new.ip_adapter));
    if !reload.is_empty() {
        return Update::Reload { fields: reload };
    }

    let mut hot = Vec::new();
    if *prompt != new.prompt {
        hot.push(HotChange::Prompt {
            texts_changed: prompt.texts() != new.prompt.texts(),
        });
    }
    let mut push = |changed: bool, change: HotChange| {
        if changed {
            hot.push(change);
        }
    };
    push(
        *prompt_interpolation_method != new.prompt_interpolation_method,
        HotChange::PromptInterpolationMethod,
    );
    push(
        *normalize_prompt_weights != new.normalize_prompt_weights,
        HotChange::NormalizePromptWeights,
    );
    push(
        *negative_prompt != new.negative_prompt,
        HotChange::NegativePrompt,
    );
    push(
        *guidance_scale != new.guidance_scale,
        HotChange::GuidanceScale {
            cfg_toggled: (*guidance_scale > 1.0) != (new.guidance_scale > 1.0),
        },
    );
    push(*delta != new.delta, HotChange::Delta);
    push(
        *num_inference_steps != new.num_inference_steps,
        HotChange::NumInferenceSteps,
    );
    push(
        *t_index_list != new.t_index_list,
        HotChange::TIndexList {
            same_len: t_index_list.len() == new.t_index_list.len(),
        },
    );
    push(
        *seed != new.seed,
        HotChange::Seed {
            seeds_changed: seed.seeds() != new.seed.seeds(),
        },
    );
    push(
        *seed_interpolation_method != new.seed_interpolation_method,
        HotChange::SeedInterpolationMethod,
    );
    push(
        *normalize_seed_weights != new.normalize_seed_weights,
        HotChange::NormalizeSeedWeights,
    );
    let swap = diff_controlnets(controlnets, &new.controlnets, &mut hot);
    let ip_fields = ip_adapter_hot_fields(ip_adapter, &new.ip_adapter);
    if !ip_fields.is_empty() {
        hot.push(HotChange::IpAdapter { fields: ip_fields });
    }
    let mut push = |changed: bool, change: HotChange| {
        if changed {
            hot.push(change);
        }
    };
    push(
        *ip_adapter_style_image_url != new.ip_adapter_style_image_url,
        HotChange::IpAdapterStyleImageUrl,
    );
    push(
        *image_preprocessing != new.image_preprocessing,
        HotChange::ImagePreprocessing,
    );
    push(
        *image_postprocessing != new.image_postprocessing,
        HotChange::ImagePostprocessing,
    );
    push(
        *latent_preprocessing != new.latent_preprocessing,
        HotChange::LatentPreprocessing,
    );
    push(
        *latent_postprocessing != new.latent_postprocessing,
        HotChange::LatentPostprocessing,
    );
    push(
        *use_safety_checker != new.use_safety_checker,
        HotChange::UseSafetyChecker,
    );
    push(
        *safety_checker_threshold != new.safety_checker_threshold,
        HotChange::SafetyCheckerThreshold,
    );
    push(
        *show_reloading_frame != new.show_reloading_frame,
        HotChange::ShowReloadingFrame,
    );
    push(
        cached_attention.max_frames != new.cached_attention.max_frames
            || cached_attention.interval != new.cached_attention.interval,
        HotChange::CachedAttention,
    );

    match swap {
        Some((added, removed)) => Update::ControlNetSwap {
            added,
            removed,
            hot,
        },
        None if hot.is_empty() => Update::Unchanged,
        None => Update::Hot { changes: hot },
    }
}

/// The `ip_adapter` fields that select weights (everything but enabled / scale / weight_type).
fn ip_adapter_reload_fields(old: &IPAdapterConfig, new: &IPAdapterConfig) -> Vec<&'static str> {
    let IPAdapterConfig {
        kind,
        ipadapter_model_path,
        image_encoder_path,
        insightface_model_name,
        scale: _,
        weight_type: _,
        enabled: _,
    } = old;
    let mut fields = Vec::new();
    if *kind != new.kind {
        fields.push("ip_adapter.type");
    }
    if *ipadapter_model_path != new.ipadapter_model_path {
        fields.push("ip_adapter.ipadapter_model_path");
    }
    if *image_encoder_path != new.image_encoder_path {
        fields.push("ip_adapter.image_encoder_path");
    }
    if *insightface_model_name != new.insightface_model_name {
        fields.push("ip_adapter.insightface_model_name");
    }
    fields
}

fn ip_adapter_hot_fields(old: &IPAdapterConfig, new: &IPAdapterConfig) -> Vec<IpAdapterField> {
    let mut fields = Vec::new();
    if old.enabled != new.enabled {
        fields.push(IpAdapterField::Enabled);
    }
    if old.scale != new.scale {
        fields.push(IpAdapterField::Scale);
    }
    if old.weight_type != new.weight_type {
        fields.push(IpAdapterField::WeightType);
    }
    fields
}

/// Two configs name the same loaded network when model id and conditioning channels agree.
fn same_network(a: &ControlNetConfig, b: &ControlNetConfig) -> bool {
    a.model_id == b.model_id && a.conditioning_channels == b.conditioning_channels
}

fn controlnet_hot_fields(old: &ControlNetConfig, new: &ControlNetConfig) -> Vec<ControlNetField> {
    let ControlNetConfig {
        model_id: _,
        conditioning_channels: _,
        conditioning_scale,
        preprocessor,
        preprocessor_params,
        enabled,
        control_guidance_start,
        control_guidance_end,
    } = old;
    let mut fields = Vec::new();
    let mut push = |changed: bool, field: ControlNetField| {
        if changed {
            fields.push(field);
        }
    };
    push(
        *conditioning_scale != new.conditioning_scale,
        ControlNetField::ConditioningScale,
    );
    push(*enabled != new.enabled, ControlNetField::Enabled);
    push(
        *preprocessor != new.preprocessor,
        ControlNetField::Preprocessor,
    );
    push(
        *preprocessor_params != new.preprocessor_params,
        ControlNetField::PreprocessorParams,
    );
    push(
        *control_guidance_start != new.control_guidance_start,
        ControlNetField::ControlGuidanceStart,
    );
    push(
        *control_guidance_end != new.control_guidance_end,
        ControlNetField::ControlGuidanceEnd,
    );
    fields
}

/// Matches nets by identity (model id + channels), pushes hot changes of the kept ones into
/// `hot`, and returns `(added, removed)` when the set of networks changed.
///
/// Ids are unique in validated parameters; should duplicates slip in, each old net is matched at
/// most once, so nothing is lost or double-counted.
fn diff_controlnets(
    old: &[ControlNetConfig],
    new: &[ControlNetConfig],
    hot: &mut Vec<HotChange>,
) -> Option<(Vec<ControlNetConfig>, Vec<String>)> {
    let mut old_taken = vec![false; old.len()];
    // For each new net, the index of the old net it keeps, if any.
    let mut kept_from: Vec<Option<usize>> = Vec::with_capacity(new.len());
    for net in new {
        let found = old
            .iter()
            .enumerate()
            .position(|(j, o)| !old_taken[j] && same_network(o, net));
        if let Some(j) = found {
            old_taken[j] = true;
        }
        kept_from.push(found);
    }

    let mut added = Vec::new();
    for (index, (net, from)) in new.iter().zip(&kept_from).enumerate() {
        match from {
            Some(j) => {
                let fields = controlnet_hot_fields(&old[*j], net);
                if !fields.is_empty() {
                    hot.push(HotChange::ControlNet {
                        index,
                        model_id: net.model_id.clone(),
                        fields,
                    });
                }
            }
            None => added.push(net.clone()),
        }
    }
    // Kept nets in new order must reference old positions in increasing order, or they moved.
    let kept_old_positions: Vec<usize> = kept_from.iter().flatten().copied().collect();
    if kept_old_positions.windows(2).any(|w| w[0] > w[1]) {
        hot.push(HotChange::ControlNetOrder);
    }
    let removed: Vec<String> = old
        .iter()
        .zip(&old_taken)
        .filter(|(_, taken)| !**taken)
        .map(|(net, _)| net.model_id.clone())
        .collect();

    if added.is_empty() && removed.is_empty() {
        None
    } else {
        Some((added, removed))
    }
}
