//! Single-file checkpoints in the original Stable Diffusion layout (CompVis' and Stability's
//! "LDM" names, as model sites distribute fine-tunes: `v1-5-pruned-emaonly.safetensors`,
//! `v2-1_768-ema-pruned.ckpt`, `sd_xl_base_1.0.safetensors`), split into diffusers' components.
//!
//! A file holds the UNet (`model.diffusion_model.`), the autoencoder (`first_stage_model.`) and
//! the text encoder(s): CLIP under HF names for SD 1.x (`cond_stage_model.transformer.`) and
//! SDXL's first encoder (`conditioner.embedders.0.transformer.`), OpenCLIP for SD 2.x
//! (`cond_stage_model.model.`) and SDXL's second (`conditioner.embedders.1.model.`). The family
//! is read from which of those prefixes the file has ([`Family::detect`]); the sizes the names
//! depend on (layers per UNet level, autoencoder levels, text layers) come from the family's
//! configs ([`Layout`]), which a single file does not hold. The renaming follows diffusers'
//! `convert_ldm_unet_checkpoint`, `convert_ldm_vae_checkpoint` and `convert_open_clip_checkpoint`
//! (docs/CHECKPOINTS.md): the same tensors under diffusers' names, with the autoencoder's 1×1
//! attention convolutions as linear weights, OpenCLIP's fused `in_proj` split into q, k and v,
//! and its `text_projection` transposed into a linear weight.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle_core::{Device, Tensor};

use crate::unet::{PerLevel, UNetConfig};
use crate::weights::WeightsFile;
use crate::{Error, Result, clip, read_config, vae};

/// The model family a single file holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// SD 1.x: CLIP ViT-L text encoder.
    Sd1,
    /// SD 2.x: OpenCLIP ViT-H text encoder (its penultimate layer).
    Sd2,
    /// SDXL: CLIP ViT-L and OpenCLIP ViT-bigG.
    Sdxl,
}

/// Where each part of a file lies.
const UNET: &str = "model.diffusion_model.";
const VAE: &str = "first_stage_model.";
const SD1_TEXT: &str = "cond_stage_model.transformer.";
const SD2_TEXT: &str = "cond_stage_model.model.";
const SDXL_TEXT: &str = "conditioner.embedders.0.transformer.";
const SDXL_TEXT_2: &str = "conditioner.embedders.1.model.";

impl Family {
    /// The family whose text-encoder prefix the tensor names carry; `None` for a file that is
    /// not a whole Stable Diffusion checkpoint (a lone UNet, a ControlNet, a LoRA).
    pub fn detect<'a>(names: impl IntoIterator<Item = &'a str>) -> Option<Self> {
        let (mut sd1, mut sd2, mut sdxl, mut unet) = (false, false, false, false);
        for name in names {
            sd1 |= name.starts_with(SD1_TEXT);
            sd2 |= name.starts_with(SD2_TEXT);
            sdxl |= name.starts_with(SDXL_TEXT_2);
            unet |= name.starts_with(UNET);
        }
        match (unet, sdxl, sd2, sd1) {
            (false, ..) => None,
            (true, true, ..) => Some(Self::Sdxl),
            (true, false, true, _) => Some(Self::Sd2),
            (true, false, false, true) => Some(Self::Sd1),
            _ => None,
        }
    }

    /// The diffusers repository whose configs and tokenizers the family's single files go with,
    /// as diffusers' `from_single_file` picks it.
    pub fn config_repo(self) -> &'static str {
        match self {
            Self::Sd1 => "stable-diffusion-v1-5/stable-diffusion-v1-5",
            Self::Sd2 => "stabilityai/stable-diffusion-2-1",
            Self::Sdxl => "stabilityai/stable-diffusion-xl-base-1.0",
        }
    }

    /// A short name for messages.
    pub fn name(self) -> &'static str {
        match self {
            Self::Sd1 => "SD 1.x",
            Self::Sd2 => "SD 2.x",
            Self::Sdxl => "SDXL",
        }
    }
}

/// The sizes the LDM names depend on, read from the family's configs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    /// The UNet's `layers_per_block`.
    pub unet_layers_per_block: usize,
    /// The autoencoder's levels (`len(block_out_channels)`): its decoder's levels are numbered
    /// the other way round in the LDM layout.
    pub vae_levels: usize,
    /// The first (or only) text encoder's `num_hidden_layers`: an SD 2.x file holds one layer
    /// more, which SD 2.x does not use.
    pub text_layers: usize,
    /// SDXL's second text encoder's `num_hidden_layers`.
    pub text_2_layers: Option<usize>,
}

impl Layout {
    /// The sizes from the configs of a diffusers pipeline folder (the family's repository).
    /// Each config is held to its network's checks and limits before its sizes are used, as a
    /// load of the converted folder would hold it.
    pub fn read(dir: &Path, family: Family) -> Result<Self> {
        let at = |path: &Path| {
            let path = path.to_path_buf();
            move |e: Error| Error::ModelLoad {
                path,
                detail: e.to_string(),
            }
        };
        let unet_path = dir.join("unet/config.json");
        let unet: UNetConfig = read_config(&unet_path)?;
        unet.plan("UNet").map_err(at(&unet_path))?;
        let vae_path = dir.join("vae/config.json");
        let vae: vae::Config = read_config(&vae_path)?;
        // (Among its checks: at least one level, which the decoder's numbering needs.)
        vae.validate().map_err(at(&vae_path))?;
        let text_layers = |rel: &str| {
            let path = dir.join(rel);
            let config = read_config::<clip::Config>(&path)?;
            config.validate().map_err(at(&path))?;
            Ok::<_, Error>(config.num_hidden_layers)
        };
        Ok(Self {
            unet_layers_per_block: layers_per_block(&unet).map_err(|detail| Error::ModelLoad {
                path: unet_path,
                detail,
            })?,
            vae_levels: vae.block_out_channels.len(),
            text_layers: text_layers("text_encoder/config.json")?,
            text_2_layers: match family {
                Family::Sdxl => Some(text_layers("text_encoder_2/config.json")?),
                Family::Sd1 | Family::Sd2 => None,
            },
        })
    }
}

/// The one `layers_per_block` of `unet`: the LDM layout numbers blocks across levels, which a
/// per-level count would make ambiguous (no released checkpoint has one).
pub fn layers_per_block(unet: &UNetConfig) -> std::result::Result<usize, String> {
    match &unet.layers_per_block {
        PerLevel::One(n) => Ok(*n),
        PerLevel::Each(levels) => match levels.first() {
            Some(&first) if levels.iter().all(|&n| n == first) => Ok(first),
            _ => Err("a single file's UNet needs one layers_per_block for every level".into()),
        },
    }
}

/// A diffusers component of a converted file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Component {
    /// `unet/`.
    Unet,
    /// `vae/`.
    Vae,
    /// `text_encoder/`.
    TextEncoder,
    /// `text_encoder_2/` (SDXL).
    TextEncoder2,
}

impl Component {
    /// The component's folder in a diffusers pipeline.
    pub fn folder(self) -> &'static str {
        match self {
            Self::Unet => "unet",
            Self::Vae => "vae",
            Self::TextEncoder => "text_encoder",
            Self::TextEncoder2 => "text_encoder_2",
        }
    }

    /// The weights file's name in that folder.
    pub fn weights_file(self) -> &'static str {
        match self {
            Self::Unet | Self::Vae => "diffusion_pytorch_model.safetensors",
            Self::TextEncoder | Self::TextEncoder2 => "model.safetensors",
        }
    }
}

/// What becomes of one stored tensor.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Target {
    /// Stored under a new name, unchanged.
    Same(String),
    /// A 1×1 convolution weight `[C, C, 1, 1]` stored as a linear weight `[C, C]`.
    ConvAsLinear(String),
    /// A matrix stored transposed.
    Transposed(String),
    /// OpenCLIP's fused q/k/v projection, split in three along its first dimension.
    SplitQkv([String; 3]),
    /// Not a weight of any component (the schedule, EMA counters, `position_ids`, SD 2.x's
    /// unused last text layer and projection, OpenCLIP's `logit_scale`).
    Dropped,
}

/// Maps every stored name of `names` to its component and diffusers name; a name under a
/// component's prefix that the layout does not know is an error naming it (an unknown variant
/// of the layout, refused rather than half read).
fn plan<'a>(
    names: impl IntoIterator<Item = &'a str>,
    family: Family,
    layout: &Layout,
) -> Result<Vec<(String, Component, Target)>> {
    let mut planned = Vec::new();
    let mut unknown = Vec::new();
    for name in names {
        let mapped = if let Some(rest) = name.strip_prefix(UNET) {
            Some((
                Component::Unet,
                unet_name(rest, layout.unet_layers_per_block),
            ))
        } else if let Some(rest) = name.strip_prefix(VAE) {
            Some((Component::Vae, vae_target(rest, layout.vae_levels)))
        } else {
            match family {
                Family::Sd1 => name
                    .strip_prefix(SD1_TEXT)
                    .map(|rest| (Component::TextEncoder, clip_target(rest))),
                Family::Sd2 => name.strip_prefix(SD2_TEXT).map(|rest| {
                    let target = open_clip_target(rest, layout.text_layers, false);
                    (Component::TextEncoder, target)
                }),
                Family::Sdxl => {
                    if let Some(rest) = name.strip_prefix(SDXL_TEXT) {
                        Some((Component::TextEncoder, clip_target(rest)))
                    } else {
                        name.strip_prefix(SDXL_TEXT_2).map(|rest| {
                            let layers = layout.text_2_layers.unwrap_or(0);
                            (
                                Component::TextEncoder2,
                                open_clip_target(rest, layers, true),
                            )
                        })
                    }
                }
            }
        };
        match mapped {
            Some((component, Some(target))) => planned.push((name.to_string(), component, target)),
            Some((_, None)) => unknown.push(name.to_string()),
            // Outside every component: the schedule buffers, `model_ema.*`, and the like.
            None => {}
        }
    }
    if !unknown.is_empty() {
        unknown.sort();
        let shown: Vec<&str> = unknown.iter().take(5).map(String::as_str).collect();
        return Err(Error::State(format!(
            "{} tensors of this {} single file have names its layout does not have ({}{})",
            unknown.len(),
            family.name(),
            shown.join(", "),
            if unknown.len() > shown.len() {
                ", …"
            } else {
                ""
            }
        )));
    }
    Ok(planned)
}

/// `prefix` followed by a number and a dot at the start of `rest`: the number and what follows.
fn numbered<'a>(rest: &'a str, prefix: &str) -> Option<(usize, &'a str)> {
    let rest = rest.strip_prefix(prefix)?;
    let (number, tail) = rest.split_once('.')?;
    Some((number.parse().ok()?, tail))
}

/// `name` with the first prefix of `table` it starts with replaced by that prefix's new name.
fn renamed(name: &str, table: &[(&str, &str)]) -> Option<String> {
    table
        .iter()
        .find_map(|(ldm, ours)| name.strip_prefix(ldm).map(|tail| format!("{ours}{tail}")))
}

/// A UNet resnet's LDM names inside the block.
fn unet_resnet(tail: &str) -> Option<String> {
    const NAMES: [(&str, &str); 6] = [
        ("in_layers.0.", "norm1."),
        ("in_layers.2.", "conv1."),
        ("out_layers.0.", "norm2."),
        ("out_layers.3.", "conv2."),
        ("emb_layers.1.", "time_emb_proj."),
        ("skip_connection.", "conv_shortcut."),
    ];
    renamed(tail, &NAMES)
}

/// The diffusers name of a UNet tensor (`rest` after `model.diffusion_model.`).
fn unet_name(rest: &str, layers_per_block: usize) -> Option<Target> {
    const FIXED: [(&str, &str); 7] = [
        ("time_embed.0.", "time_embedding.linear_1."),
        ("time_embed.2.", "time_embedding.linear_2."),
        ("label_emb.0.0.", "add_embedding.linear_1."),
        ("label_emb.0.2.", "add_embedding.linear_2."),
        ("input_blocks.0.0.", "conv_in."),
        ("out.0.", "conv_norm_out."),
        ("out.2.", "conv_out."),
    ];
    if let Some(name) = renamed(rest, &FIXED) {
        return Some(Target::Same(name));
    }
    // A level holds `layers_per_block` resnets on the way down and one more on the way up; the
    // LDM layout numbers them (and the resamplers) consecutively across the levels.
    let per_level = layers_per_block.checked_add(1)?;
    let name = if let Some((i, tail)) = numbered(rest, "input_blocks.") {
        let (level, layer) = ((i.checked_sub(1)?) / per_level, (i - 1) % per_level);
        let (part, tail) = tail.split_once('.')?;
        match part {
            "0" => match tail.strip_prefix("op.") {
                Some(t) => format!("down_blocks.{level}.downsamplers.0.conv.{t}"),
                None => format!("down_blocks.{level}.resnets.{layer}.{}", unet_resnet(tail)?),
            },
            "1" => format!("down_blocks.{level}.attentions.{layer}.{tail}"),
            _ => return None,
        }
    } else if let Some((part, tail)) = numbered(rest, "middle_block.") {
        match part {
            0 => format!("mid_block.resnets.0.{}", unet_resnet(tail)?),
            1 => format!("mid_block.attentions.0.{tail}"),
            2 => format!("mid_block.resnets.1.{}", unet_resnet(tail)?),
            _ => return None,
        }
    } else if let Some((i, tail)) = numbered(rest, "output_blocks.") {
        let (level, layer) = (i / per_level, i % per_level);
        let (part, tail) = tail.split_once('.')?;
        match (part, tail.strip_prefix("conv.")) {
            ("0", _) => format!("up_blocks.{level}.resnets.{layer}.{}", unet_resnet(tail)?),
            ("1" | "2", Some(t)) => format!("up_blocks.{level}.upsamplers.0.conv.{t}"),
            ("1", None) => format!("up_blocks.{level}.attentions.{layer}.{tail}"),
            _ => return None,
        }
    } else {
        return None;
    };
    Some(Target::Same(name))
}

/// An autoencoder resnet's LDM names inside the block (the same but the shortcut).
fn vae_resnet(tail: &str) -> Option<String> {
    match tail.strip_prefix("nin_shortcut.") {
        Some(t) => Some(format!("conv_shortcut.{t}")),
        None => ["norm1.", "conv1.", "norm2.", "conv2."]
            .iter()
            .any(|p| tail.starts_with(p))
            .then(|| tail.to_string()),
    }
}

/// The mid block of the encoder or decoder (`rest` after `mid.`).
fn vae_mid(coder: &str, rest: &str) -> Option<Target> {
    if let Some(tail) = rest.strip_prefix("block_1.") {
        return Some(Target::Same(format!(
            "{coder}.mid_block.resnets.0.{}",
            vae_resnet(tail)?
        )));
    }
    if let Some(tail) = rest.strip_prefix("block_2.") {
        return Some(Target::Same(format!(
            "{coder}.mid_block.resnets.1.{}",
            vae_resnet(tail)?
        )));
    }
    let tail = rest.strip_prefix("attn_1.")?;
    if let Some(t) = tail.strip_prefix("norm.") {
        return Some(Target::Same(format!(
            "{coder}.mid_block.attentions.0.group_norm.{t}"
        )));
    }
    let (ldm, t) = tail.split_once('.')?;
    let ours = match ldm {
        "q" => "to_q",
        "k" => "to_k",
        "v" => "to_v",
        "proj_out" => "to_out.0",
        _ => return None,
    };
    let name = format!("{coder}.mid_block.attentions.0.{ours}.{t}");
    Some(if t == "weight" {
        Target::ConvAsLinear(name)
    } else {
        Target::Same(name)
    })
}

/// The diffusers target of an autoencoder tensor (`rest` after `first_stage_model.`).
fn vae_target(rest: &str, levels: usize) -> Option<Target> {
    if rest.starts_with("loss.") {
        // The training loss's discriminator, which some older files still carry.
        return Some(Target::Dropped);
    }
    for same in ["quant_conv.", "post_quant_conv."] {
        if rest.starts_with(same) {
            return Some(Target::Same(rest.to_string()));
        }
    }
    let (coder, rest) = rest.split_once('.')?;
    if coder != "encoder" && coder != "decoder" {
        return None;
    }
    for same in ["conv_in.", "conv_out."] {
        if rest.starts_with(same) {
            return Some(Target::Same(format!("{coder}.{rest}")));
        }
    }
    if let Some(t) = rest.strip_prefix("norm_out.") {
        return Some(Target::Same(format!("{coder}.conv_norm_out.{t}")));
    }
    if let Some(mid) = rest.strip_prefix("mid.") {
        return vae_mid(coder, mid);
    }
    let name = match coder {
        "encoder" => {
            let (i, tail) = numbered(rest, "down.")?;
            if let Some((j, t)) = numbered(tail, "block.") {
                format!("encoder.down_blocks.{i}.resnets.{j}.{}", vae_resnet(t)?)
            } else {
                let t = tail.strip_prefix("downsample.conv.")?;
                format!("encoder.down_blocks.{i}.downsamplers.0.conv.{t}")
            }
        }
        _ => {
            let (i, tail) = numbered(rest, "up.")?;
            // The LDM decoder numbers its levels from the smallest map up; diffusers' up_blocks
            // start at the largest.
            let level = levels.checked_sub(1)?.checked_sub(i)?;
            if let Some((j, t)) = numbered(tail, "block.") {
                format!("decoder.up_blocks.{level}.resnets.{j}.{}", vae_resnet(t)?)
            } else {
                let t = tail.strip_prefix("upsample.conv.")?;
                format!("decoder.up_blocks.{level}.upsamplers.0.conv.{t}")
            }
        }
    };
    Some(Target::Same(name))
}

/// A CLIP text encoder stored under HF's names (`rest` after the prefix); older files lack the
/// `text_model.` level.
fn clip_target(rest: &str) -> Option<Target> {
    if rest.ends_with("position_ids") {
        return Some(Target::Dropped);
    }
    Some(Target::Same(if rest.starts_with("text_model.") {
        rest.to_string()
    } else {
        format!("text_model.{rest}")
    }))
}

/// An OpenCLIP text encoder's tensor (`rest` after the prefix) under CLIPTextModel's names;
/// `layers` of its resblocks are used, and its projection only `with_projection`.
fn open_clip_target(rest: &str, layers: usize, with_projection: bool) -> Option<Target> {
    const FIXED: [(&str, &str); 3] = [
        (
            "token_embedding.weight",
            "embeddings.token_embedding.weight",
        ),
        (
            "positional_embedding",
            "embeddings.position_embedding.weight",
        ),
        ("ln_final.", "final_layer_norm."),
    ];
    if let Some(name) = renamed(rest, &FIXED) {
        return Some(Target::Same(format!("text_model.{name}")));
    }
    match rest {
        "logit_scale" => return Some(Target::Dropped),
        "text_projection" if with_projection => {
            return Some(Target::Transposed("text_projection.weight".into()));
        }
        "text_projection" => return Some(Target::Dropped),
        _ => {}
    }
    let (i, tail) = numbered(rest, "transformer.resblocks.")?;
    if i >= layers {
        // SD 2.x uses the penultimate layer: its files hold one more than the encoder has.
        return Some(Target::Dropped);
    }
    let layer = format!("text_model.encoder.layers.{i}");
    const RENAMED: [(&str, &str); 5] = [
        ("ln_1.", "layer_norm1."),
        ("ln_2.", "layer_norm2."),
        ("mlp.c_fc.", "mlp.fc1."),
        ("mlp.c_proj.", "mlp.fc2."),
        ("attn.out_proj.", "self_attn.out_proj."),
    ];
    if let Some(name) = renamed(tail, &RENAMED) {
        return Some(Target::Same(format!("{layer}.{name}")));
    }
    let part = match tail {
        "attn.in_proj_weight" => "weight",
        "attn.in_proj_bias" => "bias",
        _ => return None,
    };
    Some(Target::SplitQkv(
        ["q_proj", "k_proj", "v_proj"].map(|p| format!("{layer}.self_attn.{p}.{part}")),
    ))
}

/// The tensors of one component of a single file under diffusers' names, in their stored dtype
/// on the CPU.
pub type ComponentTensors = HashMap<String, Tensor>;

/// Reads `file`'s tensors of `component` (a [`Family::detect`]ed `family`, sizes from `layout`)
/// under diffusers' names. One component at a time, so that converting a file holds at most one
/// component's tensors beside it.
pub fn component(
    file: &WeightsFile,
    family: Family,
    layout: &Layout,
    component: Component,
) -> Result<ComponentTensors> {
    let names: Vec<&str> = file.tensors().map(|(name, _)| name).collect();
    let mut out = HashMap::new();
    for (name, of, target) in plan(names, family, layout)? {
        if of != component {
            continue;
        }
        let load = || file.load_stored(&name, &Device::Cpu).map_err(Error::from);
        match target {
            Target::Same(ours) => {
                out.insert(ours, load()?);
            }
            Target::ConvAsLinear(ours) => {
                let t = load()?;
                let dims = t.dims().to_vec();
                if dims.len() != 4 || dims[2] != 1 || dims[3] != 1 {
                    return Err(Error::State(format!(
                        "{name}: expected a 1×1 convolution weight, found shape {dims:?}"
                    )));
                }
                out.insert(ours, t.reshape((dims[0], dims[1]))?);
            }
            Target::Transposed(ours) => {
                out.insert(ours, load()?.t()?.contiguous()?);
            }
            Target::SplitQkv(ours) => {
                let t = load()?;
                let rows = t.dim(0)?;
                if rows % 3 != 0 {
                    return Err(Error::State(format!(
                        "{name}: a fused q/k/v projection needs 3·D rows, found {rows}"
                    )));
                }
                for (k, ours) in ours.into_iter().enumerate() {
                    out.insert(ours, t.narrow(0, k * rows / 3, rows / 3)?.contiguous()?);
                }
            }
            Target::Dropped => {}
        }
    }
    if out.is_empty() {
        return Err(Error::State(format!(
            "this {} single file holds no tensors of its {}",
            family.name(),
            component.folder()
        )));
    }
    Ok(out)
}

/// The components a family's file holds, in the order they are converted.
pub fn components(family: Family) -> &'static [Component] {
    match family {
        Family::Sdxl => &[
            Component::Unet,
            Component::Vae,
            Component::TextEncoder,
            Component::TextEncoder2,
        ],
        Family::Sd1 | Family::Sd2 => &[Component::Unet, Component::Vae, Component::TextEncoder],
    }
}

/// Where a ControlNet lies in a file of the original ControlNet training code (`cldm`).
const CONTROL: &str = "control_model.";

/// Whether `names` hold a ControlNet in the original layout (`control_model.input_hint_block.*`).
pub fn is_controlnet<'a>(names: impl IntoIterator<Item = &'a str>) -> bool {
    names
        .into_iter()
        .any(|name| name.starts_with("control_model.input_hint_block."))
}

/// The convolutions of the control image's embedding, by their index in `input_hint_block`
/// (a Sequential of convolutions and SiLUs): `(index, [out, in, kh, kw])`, in order.
fn hint_convolutions(file: &WeightsFile) -> Vec<(usize, Vec<usize>)> {
    let mut convs: Vec<(usize, Vec<usize>)> = file
        .tensors()
        .filter_map(|(name, shape)| {
            let rest = name.strip_prefix("control_model.input_hint_block.")?;
            let (index, tail) = rest.split_once('.')?;
            (tail == "weight").then(|| Some((index.parse().ok()?, shape.to_vec())))?
        })
        .collect();
    convs.sort();
    convs
}

/// The control image's channels and the widths of its embedding
/// (`conditioning_embedding_out_channels`), read from the hint block's shapes: its first
/// convolution takes the image; then each width has a convolution that keeps it and one that
/// halves the size into the next, and a last one leads into the UNet's first width.
pub fn controlnet_conditioning(file: &WeightsFile) -> Result<(usize, Vec<usize>)> {
    let convs = hint_convolutions(file);
    let bad = |detail: String| Error::State(format!("the ControlNet's input_hint_block: {detail}"));
    if convs.len() < 2 || !convs.len().is_multiple_of(2) {
        return Err(bad(format!(
            "{} convolutions, where the layout has an even number, at least 2",
            convs.len()
        )));
    }
    if convs.iter().any(|(_, shape)| shape.len() != 4) {
        return Err(bad("a weight that is not a convolution's".into()));
    }
    let channels = convs[0].1[1];
    let mut widths = vec![convs[0].1[0]];
    // convs[1..len-1] are the blocks: odd blocks change the width.
    for (block, (_, shape)) in convs[1..convs.len() - 1].iter().enumerate() {
        if block % 2 == 1 {
            widths.push(shape[0]);
        }
    }
    Ok((channels, widths))
}

/// The diffusers name of a ControlNet tensor (`rest` after `control_model.`); `last_hint` is
/// the index of the hint block's last convolution.
fn controlnet_name(rest: &str, layers_per_block: usize, last_hint: usize) -> Option<Target> {
    if let Some((i, tail)) = numbered(rest, "zero_convs.") {
        let tail = tail.strip_prefix("0.")?;
        return Some(Target::Same(format!("controlnet_down_blocks.{i}.{tail}")));
    }
    if let Some(tail) = rest.strip_prefix("middle_block_out.0.") {
        return Some(Target::Same(format!("controlnet_mid_block.{tail}")));
    }
    if let Some((k, tail)) = numbered(rest, "input_hint_block.") {
        let conv = match k {
            0 => "conv_in".to_string(),
            k if k == last_hint => "conv_out".to_string(),
            k if k % 2 == 0 => format!("blocks.{}", k / 2 - 1),
            _ => return None,
        };
        return Some(Target::Same(format!(
            "controlnet_cond_embedding.{conv}.{tail}"
        )));
    }
    if rest.starts_with("output_blocks.") || rest.starts_with("out.") {
        return None;
    }
    unet_name(rest, layers_per_block)
}

/// A single file's ControlNet (`control_model.*`; a training checkpoint's frozen base model
/// beside it is not read) under diffusers' names, in the stored dtype on the CPU.
/// `layers_per_block` is the base UNet's, which a ControlNet's encoder copies.
pub fn controlnet(file: &WeightsFile, layers_per_block: usize) -> Result<ComponentTensors> {
    let last_hint = hint_convolutions(file)
        .last()
        .map(|(k, _)| *k)
        .ok_or_else(|| Error::State("the file holds no ControlNet (control_model.*)".into()))?;
    let mut out = HashMap::new();
    let mut unknown = Vec::new();
    let names: Vec<String> = file
        .tensors()
        .filter(|(name, _)| name.starts_with(CONTROL))
        .map(|(name, _)| name.to_string())
        .collect();
    for name in names {
        let rest = &name[CONTROL.len()..];
        match controlnet_name(rest, layers_per_block, last_hint) {
            Some(Target::Same(ours)) => {
                out.insert(ours, file.load_stored(&name, &Device::Cpu)?);
            }
            _ => unknown.push(name),
        }
    }
    if !unknown.is_empty() {
        unknown.sort();
        return Err(Error::State(format!(
            "{} tensors of this ControlNet have names its layout does not have ({})",
            unknown.len(),
            unknown
                .iter()
                .take(5)
                .cloned()
                .collect::<Vec<_>>()
                .join(", ")
        )));
    }
    Ok(out)
}

/// How many of `names` each component takes (a summary for logs and tests).
pub fn census<'a>(
    names: impl IntoIterator<Item = &'a str>,
    family: Family,
    layout: &Layout,
) -> Result<BTreeMap<Component, usize>> {
    let mut counts = BTreeMap::new();
    for (_, component, target) in plan(names, family, layout)? {
        let n = match target {
            Target::Dropped => 0,
            Target::SplitQkv(_) => 3,
            _ => 1,
        };
        *counts.entry(component).or_insert(0) += n;
    }
    Ok(counts)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn same(t: Option<Target>) -> String {
        match t {
            Some(Target::Same(name)) => name,
            other => panic!("expected a plain rename, got {other:?}"),
        }
    }

    /// A config's `layers_per_block` at the top of its type names no block (the count of a
    /// level's blocks would overflow), and the configs a layout is read from are held to the
    /// networks' limits before their sizes are used.
    #[test]
    fn layout_sizes_past_the_networks_limits_are_refused() {
        assert_eq!(
            unet_name("input_blocks.1.0.in_layers.0.weight", usize::MAX),
            None
        );
        assert_eq!(
            unet_name("output_blocks.4.1.proj_in.weight", usize::MAX),
            None
        );
        assert_eq!(
            controlnet_name("input_blocks.1.0.in_layers.0.weight", usize::MAX, 14),
            None
        );

        let source = Path::new(env!("CARGO_MANIFEST_DIR")).join(
            "../tests/fixtures/single-file/model-root/stable-diffusion-v1-5/stable-diffusion-v1-5",
        );
        let dir =
            std::env::temp_dir().join(format!("sdstream-layout-limits-{}", std::process::id()));
        for (folder, key, value) in [
            ("unet", "layers_per_block", serde_json::json!(u64::MAX)),
            ("vae", "block_out_channels", serde_json::json!(vec![4; 100])),
            (
                "text_encoder",
                "num_hidden_layers",
                serde_json::json!(u64::MAX),
            ),
        ] {
            let _ = std::fs::remove_dir_all(&dir);
            for f in ["unet", "vae", "text_encoder"] {
                std::fs::create_dir_all(dir.join(f)).unwrap();
                let mut config: serde_json::Value = serde_json::from_slice(
                    &std::fs::read(source.join(f).join("config.json")).unwrap(),
                )
                .unwrap();
                if f == folder {
                    config[key] = value.clone();
                }
                std::fs::write(dir.join(f).join("config.json"), config.to_string()).unwrap();
            }
            let err = Layout::read(&dir, Family::Sd1).expect_err(key).to_string();
            assert!(err.contains(key) && err.contains(folder), "{key}: {err}");
        }
        std::fs::remove_dir_all(&dir).ok();
    }

    /// The UNet names of SD 1.5's real layout (2 resnets a level, 4 levels) land where diffusers
    /// puts them: resnets, attentions and resamplers counted per level.
    #[test]
    fn unet_names_follow_the_levels() {
        let n = |rest| same(unet_name(rest, 2));
        assert_eq!(n("input_blocks.0.0.weight"), "conv_in.weight");
        assert_eq!(
            n("input_blocks.1.0.in_layers.0.weight"),
            "down_blocks.0.resnets.0.norm1.weight"
        );
        assert_eq!(
            n("input_blocks.2.1.proj_in.weight"),
            "down_blocks.0.attentions.1.proj_in.weight"
        );
        assert_eq!(
            n("input_blocks.3.0.op.weight"),
            "down_blocks.0.downsamplers.0.conv.weight"
        );
        assert_eq!(
            n("input_blocks.4.0.skip_connection.bias"),
            "down_blocks.1.resnets.0.conv_shortcut.bias"
        );
        assert_eq!(
            n("middle_block.2.emb_layers.1.weight"),
            "mid_block.resnets.1.time_emb_proj.weight"
        );
        assert_eq!(
            n("output_blocks.2.1.conv.weight"),
            "up_blocks.0.upsamplers.0.conv.weight"
        );
        assert_eq!(
            n("output_blocks.5.2.conv.bias"),
            "up_blocks.1.upsamplers.0.conv.bias"
        );
        assert_eq!(
            n("output_blocks.5.1.transformer_blocks.0.attn1.to_q.weight"),
            "up_blocks.1.attentions.2.transformer_blocks.0.attn1.to_q.weight"
        );
        assert_eq!(
            n("output_blocks.11.0.out_layers.3.weight"),
            "up_blocks.3.resnets.2.conv2.weight"
        );
        assert_eq!(n("label_emb.0.2.bias"), "add_embedding.linear_2.bias");
        assert_eq!(n("out.2.weight"), "conv_out.weight");
        assert_eq!(unet_name("input_blocks.1.7.weight", 2), None);
        assert_eq!(unet_name("output_blocks.1.0.bogus.weight", 2), None);
    }

    #[test]
    fn autoencoder_names_reverse_the_decoder_levels_and_flatten_attention() {
        let t = |rest| vae_target(rest, 4);
        assert_eq!(
            same(t("decoder.up.0.block.2.nin_shortcut.weight")),
            "decoder.up_blocks.3.resnets.2.conv_shortcut.weight"
        );
        assert_eq!(
            same(t("decoder.up.3.upsample.conv.bias")),
            "decoder.up_blocks.0.upsamplers.0.conv.bias"
        );
        assert_eq!(
            same(t("encoder.down.1.downsample.conv.weight")),
            "encoder.down_blocks.1.downsamplers.0.conv.weight"
        );
        assert_eq!(
            t("encoder.mid.attn_1.q.weight"),
            Some(Target::ConvAsLinear(
                "encoder.mid_block.attentions.0.to_q.weight".into()
            ))
        );
        assert_eq!(
            same(t("decoder.mid.attn_1.proj_out.bias")),
            "decoder.mid_block.attentions.0.to_out.0.bias"
        );
        assert_eq!(
            same(t("encoder.norm_out.weight")),
            "encoder.conv_norm_out.weight"
        );
        assert_eq!(t("decoder.up.4.block.0.conv1.weight"), None);
    }

    #[test]
    fn open_clip_splits_qkv_drops_the_unused_layer_and_transposes_the_projection() {
        assert_eq!(
            open_clip_target("transformer.resblocks.1.attn.in_proj_bias", 2, false),
            Some(Target::SplitQkv([
                "text_model.encoder.layers.1.self_attn.q_proj.bias".into(),
                "text_model.encoder.layers.1.self_attn.k_proj.bias".into(),
                "text_model.encoder.layers.1.self_attn.v_proj.bias".into(),
            ]))
        );
        assert_eq!(
            open_clip_target("transformer.resblocks.2.ln_1.weight", 2, false),
            Some(Target::Dropped)
        );
        assert_eq!(
            open_clip_target("text_projection", 2, true),
            Some(Target::Transposed("text_projection.weight".into()))
        );
        assert_eq!(
            open_clip_target("text_projection", 2, false),
            Some(Target::Dropped)
        );
        assert_eq!(
            same(open_clip_target("positional_embedding", 2, false)),
            "text_model.embeddings.position_embedding.weight"
        );
        assert_eq!(
            open_clip_target("transformer.resblocks.0.attn.bogus", 2, false),
            None
        );
    }

    #[test]
    fn controlnet_names_take_the_zero_convs_and_the_hint_block() {
        let n = |rest| match controlnet_name(rest, 2, 14) {
            Some(Target::Same(name)) => name,
            other => panic!("{rest}: {other:?}"),
        };
        assert_eq!(
            n("zero_convs.11.0.weight"),
            "controlnet_down_blocks.11.weight"
        );
        assert_eq!(n("middle_block_out.0.bias"), "controlnet_mid_block.bias");
        assert_eq!(
            n("input_hint_block.0.weight"),
            "controlnet_cond_embedding.conv_in.weight"
        );
        assert_eq!(
            n("input_hint_block.12.bias"),
            "controlnet_cond_embedding.blocks.5.bias"
        );
        assert_eq!(
            n("input_hint_block.14.weight"),
            "controlnet_cond_embedding.conv_out.weight"
        );
        assert_eq!(
            n("input_blocks.4.1.proj_in.weight"),
            "down_blocks.1.attentions.0.proj_in.weight"
        );
        assert_eq!(controlnet_name("input_hint_block.3.weight", 2, 14), None);
        assert_eq!(
            controlnet_name("output_blocks.0.0.in_layers.0.weight", 2, 14),
            None
        );
    }

    #[test]
    fn the_family_comes_from_the_text_encoders() {
        let sd1 = [
            "model.diffusion_model.out.0.weight",
            "cond_stage_model.transformer.x",
        ];
        let sd2 = [
            "model.diffusion_model.out.0.weight",
            "cond_stage_model.model.x",
        ];
        let sdxl = [
            "model.diffusion_model.out.0.weight",
            "conditioner.embedders.0.transformer.x",
            "conditioner.embedders.1.model.x",
        ];
        assert_eq!(Family::detect(sd1), Some(Family::Sd1));
        assert_eq!(Family::detect(sd2), Some(Family::Sd2));
        assert_eq!(Family::detect(sdxl), Some(Family::Sdxl));
        assert_eq!(
            Family::detect(["control_model.input_blocks.0.0.weight"]),
            None
        );
        assert_eq!(Family::detect(["model.diffusion_model.out.0.weight"]), None);
    }

    #[test]
    fn an_unknown_name_under_a_component_is_refused_by_name() {
        let layout = Layout {
            unet_layers_per_block: 2,
            vae_levels: 4,
            text_layers: 2,
            text_2_layers: None,
        };
        let err = plan(
            [
                "model.diffusion_model.out.0.weight",
                "model.diffusion_model.strange.weight",
                "betas",
            ],
            Family::Sd1,
            &layout,
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("model.diffusion_model.strange.weight"),
            "{err}"
        );
    }
}
