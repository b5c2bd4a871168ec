//! LoRA: low-rank weight deltas fused into the UNet and the text encoder when they load.
//!
//! A LoRA layer holds `down` (r×in, or r×in×kh×kw for a convolution), `up` (out×r, or out×r×1×1)
//! and α; fused with a stream's weight w, it turns the base weight W of its module into
//! W + w·(α/r)·(up·down), reshaped to W's shape. That is what diffusers' `load_lora_weights` +
//! `fuse_lora` compute (docs/ALGORITHM.md §5a). Several LoRAs add up, in the order given.
//!
//! The formats LoRAs are published in, told apart by their keys:
//! - diffusers/peft: `unet.<module>.lora_A.weight` / `.lora_B.weight`, `text_encoder.<module>…`;
//!   α from the file's `lora_adapter_metadata` (`unet.lora_alpha`, `text_encoder.lora_alpha`),
//!   else α = r, as diffusers reads it;
//! - diffusers before peft: `unet.<module>.lora.down.weight` / `.lora.up.weight`;
//! - kohya: `lora_unet_<module, dots as _>.lora_down.weight` / `.lora_up.weight` / `.alpha`,
//!   `lora_te_…` (or SDXL's `lora_te1_…`) for the text encoder and `lora_te2_…` for SDXL's
//!   second (the published LCM-LoRAs are in this form).
//!
//! Text-encoder module names are compared without their `text_model` level, which transformers
//! 4 and 5 spell differently. Anything a file holds that is not one of these (LoHa/LoKr factors,
//! a second text encoder on a checkpoint without one, a layer the network does not have) is an
//! error naming the key,
//! never skipped: a LoRA half applied is a different picture.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::Tensor;

use crate::weights::WeightsFile;
use crate::{Error, Result};

/// The file name diffusers saves LoRAs under, and looks for first in a LoRA folder.
pub const DIFFUSERS_LORA_FILE: &str = "pytorch_lora_weights.safetensors";

/// The network a LoRA layer patches.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum LoraTarget {
    /// The denoising UNet.
    Unet,
    /// The (first) CLIP text encoder.
    TextEncoder,
    /// SDXL's second text encoder.
    TextEncoder2,
}

impl LoraTarget {
    fn describe(self) -> &'static str {
        match self {
            LoraTarget::Unet => "UNet",
            LoraTarget::TextEncoder => "text encoder",
            LoraTarget::TextEncoder2 => "second text encoder",
        }
    }
}

/// One module's low-rank pair.
#[derive(Debug)]
struct LoraLayer {
    target: LoraTarget,
    /// The module's name in the comparable form (see [`module_key`]).
    module: String,
    /// The down key as the file spells it, for messages.
    name: String,
    /// r×in or r×in×kh×kw, f32 on the CPU.
    down: Tensor,
    /// out×r or out×r×1×1, f32 on the CPU.
    up: Tensor,
    /// α/r.
    scale: f64,
}

/// A LoRA file, read and checked: every key understood, every pair complete, ranks agreeing,
/// values finite.
#[derive(Debug)]
pub struct LoraFile {
    path: PathBuf,
    layers: Vec<LoraLayer>,
}

/// Which part of a layer a key holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Part {
    Down,
    Up,
    Alpha,
}

/// Key endings of the three formats.
const SUFFIXES: [(&str, Part); 7] = [
    (".lora_A.weight", Part::Down),
    (".lora_B.weight", Part::Up),
    (".lora.down.weight", Part::Down),
    (".lora.up.weight", Part::Up),
    (".lora_down.weight", Part::Down),
    (".lora_up.weight", Part::Up),
    (".alpha", Part::Alpha),
];

/// Key beginnings: (prefix, target, peft metadata component).
const PREFIXES: [(&str, LoraTarget, &str); 7] = [
    ("unet.", LoraTarget::Unet, "unet"),
    ("text_encoder.", LoraTarget::TextEncoder, "text_encoder"),
    (
        "text_encoder_2.",
        LoraTarget::TextEncoder2,
        "text_encoder_2",
    ),
    ("lora_unet_", LoraTarget::Unet, "unet"),
    ("lora_te_", LoraTarget::TextEncoder, "text_encoder"),
    ("lora_te1_", LoraTarget::TextEncoder, "text_encoder"),
    ("lora_te2_", LoraTarget::TextEncoder2, "text_encoder_2"),
];

/// `module` (dotted or kohya's underscored form) as compared with a network's tensor names:
/// dots as underscores, the text encoder's `text_model` level dropped.
fn module_key(target: LoraTarget, module: &str) -> String {
    let module = match target {
        LoraTarget::TextEncoder | LoraTarget::TextEncoder2 => module
            .strip_prefix("text_model.")
            .or_else(|| module.strip_prefix("text_model_"))
            .unwrap_or(module),
        LoraTarget::Unet => module,
    };
    module.replace('.', "_")
}

/// (target, module key, metadata component, part) of a key, or why it is not a LoRA key.
fn parse_key(key: &str) -> std::result::Result<(LoraTarget, String, &'static str, Part), String> {
    let Some(&(prefix, target, component)) = PREFIXES.iter().find(|(p, ..)| key.starts_with(p))
    else {
        return Err(format!(
            "key `{key}` is not a LoRA key sdstream reads (expected unet./text_encoder. keys as \
             diffusers saves them, or kohya's lora_unet_/lora_te_ keys)"
        ));
    };
    let rest = &key[prefix.len()..];
    let Some(&(suffix, part)) = SUFFIXES.iter().find(|(s, _)| rest.ends_with(s)) else {
        return Err(format!(
            "key `{key}` is not a low-rank pair's down, up or alpha (LoHa, LoKr and other \
             adapter kinds are not supported)"
        ));
    };
    let module = &rest[..rest.len() - suffix.len()];
    if module.is_empty() {
        return Err(format!("key `{key}` names no module"));
    }
    Ok((target, module_key(target, module), component, part))
}

/// The peft metadata's α for `component`, if the file records one.
fn peft_alpha(file: &WeightsFile, component: &str) -> std::result::Result<Option<f64>, String> {
    let Some(text) = file.metadata("lora_adapter_metadata") else {
        return Ok(None);
    };
    let meta: serde_json::Value = serde_json::from_str(text)
        .map_err(|e| format!("lora_adapter_metadata is not JSON: {e}"))?;
    let pattern = format!("{component}.alpha_pattern");
    if meta
        .get(&pattern)
        .and_then(serde_json::Value::as_object)
        .is_some_and(|m| !m.is_empty())
    {
        return Err(format!(
            "lora_adapter_metadata has a per-module {pattern}, which sdstream does not read"
        ));
    }
    match meta.get(format!("{component}.lora_alpha")) {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(value) => value
            .as_f64()
            .filter(|a| a.is_finite())
            .map(Some)
            .ok_or_else(|| format!("{component}.lora_alpha is not a finite number: {value}")),
    }
}

impl LoraFile {
    /// Reads and checks `path` (see the module's documentation for the formats).
    pub fn open(path: &Path) -> Result<Self> {
        let fail = |detail: String| Error::ModelLoad {
            path: path.to_path_buf(),
            detail,
        };
        let file = WeightsFile::open(path)?;
        file.check_all_finite()?;
        #[derive(Default)]
        struct Parts {
            down: Option<(String, Tensor)>,
            up: Option<(String, Tensor)>,
            alpha: Option<f64>,
            component: &'static str,
        }
        let mut modules: BTreeMap<(LoraTarget, String), Parts> = BTreeMap::new();
        let names: Vec<String> = file.tensors().map(|(n, _)| n.to_string()).collect();
        for key in names {
            let (target, module, component, part) = parse_key(&key).map_err(fail)?;
            let tensor = match part {
                Part::Alpha => file.load_numeric_f32(&key)?,
                Part::Down | Part::Up => file.load_f32(&key)?,
            };
            let entry = modules.entry((target, module)).or_default();
            entry.component = component;
            match part {
                Part::Down => entry.down = Some((key, tensor)),
                Part::Up => entry.up = Some((key, tensor)),
                Part::Alpha => {
                    let value = match tensor.elem_count() {
                        1 => f64::from(tensor.flatten_all()?.to_vec1::<f32>()?[0]),
                        n => {
                            return Err(fail(format!(
                                "`{key}` holds {n} values; an alpha is one number"
                            )));
                        }
                    };
                    if !value.is_finite() {
                        return Err(fail(format!("`{key}` is {value}; an alpha is finite")));
                    }
                    entry.alpha = Some(value);
                }
            }
        }
        let mut alphas: HashMap<&str, Option<f64>> = HashMap::new();
        let mut layers = Vec::with_capacity(modules.len());
        for ((target, module), parts) in modules {
            let (Some((name, down)), Some((up_name, up))) = (parts.down, parts.up) else {
                return Err(fail(format!(
                    "the {} module `{module}` has no complete down/up pair (a key is missing)",
                    target.describe()
                )));
            };
            let rank = down.dim(0)?;
            let fits = matches!(down.rank(), 2 | 4)
                && match up.dims() {
                    [_, r] => *r == rank,
                    [_, r, 1, 1] => *r == rank,
                    _ => false,
                }
                && rank > 0;
            if !fits {
                return Err(fail(format!(
                    "`{name}` has shape {:?} and `{up_name}` {:?}: not a rank-r pair \
                     (down r×in or r×in×kh×kw, up out×r or out×r×1×1)",
                    down.dims(),
                    up.dims()
                )));
            }
            let alpha = match parts.alpha {
                Some(alpha) => alpha,
                None => {
                    let component = parts.component;
                    let recorded = match alphas.get(component) {
                        Some(a) => *a,
                        None => {
                            let a = peft_alpha(&file, component).map_err(fail)?;
                            alphas.insert(component, a);
                            a
                        }
                    };
                    recorded.unwrap_or(rank as f64)
                }
            };
            layers.push(LoraLayer {
                target,
                module,
                name,
                down,
                up,
                scale: alpha / rank as f64,
            });
        }
        if layers.is_empty() {
            return Err(fail("the file holds no LoRA layers".into()));
        }
        Ok(Self {
            path: path.to_path_buf(),
            layers,
        })
    }

    /// The file it was read from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether some layer patches `target`.
    pub fn patches(&self, target: LoraTarget) -> bool {
        self.layers.iter().any(|l| l.target == target)
    }
}

/// LoRAs with the weights a stream fuses them at, in order.
pub type LoraStack = [(Arc<LoraFile>, f64)];

/// One layer of one LoRA, at its stream weight.
#[derive(Debug)]
struct Delta {
    file: Arc<LoraFile>,
    layer: usize,
    weight: f64,
}

impl Delta {
    fn layer(&self) -> &LoraLayer {
        &self.file.layers[self.layer]
    }
}

/// What one network's load fuses: the deltas of every LoRA in a stack that patch it, by module.
#[derive(Debug)]
pub struct LoraDeltas {
    target: LoraTarget,
    by_module: HashMap<String, Vec<Delta>>,
}

impl LoraDeltas {
    /// The deltas of `stack` for `target`; `None` when no layer patches it.
    pub fn new(target: LoraTarget, stack: &LoraStack) -> Option<Arc<Self>> {
        let mut by_module: HashMap<String, Vec<Delta>> = HashMap::new();
        for (file, weight) in stack {
            for (i, layer) in file.layers.iter().enumerate() {
                if layer.target == target {
                    by_module
                        .entry(layer.module.clone())
                        .or_default()
                        .push(Delta {
                            file: file.clone(),
                            layer: i,
                            weight: *weight,
                        });
                }
            }
        }
        (!by_module.is_empty()).then(|| Arc::new(Self { target, by_module }))
    }

    /// The module key of a network's tensor name (`….weight` only: LoRA patches weights).
    fn key_of(&self, tensor: &str) -> Option<String> {
        tensor
            .strip_suffix(".weight")
            .map(|module| module_key(self.target, module))
    }

    fn deltas(&self, tensor: &str) -> Option<&[Delta]> {
        self.by_module.get(&self.key_of(tensor)?).map(Vec::as_slice)
    }

    /// Whether some delta patches the tensor `name`.
    pub fn targets(&self, name: &str) -> bool {
        self.deltas(name).is_some()
    }

    /// Checks that every delta for `name` has the shape of the stored tensor (`shape`).
    pub fn check_fits(&self, name: &str, shape: &[usize]) -> std::result::Result<(), String> {
        for delta in self.deltas(name).unwrap_or_default() {
            let layer = delta.layer();
            let (out, r) = (layer.up.dims()[0], layer.down.dims()[0]);
            let per_rank = layer.down.elem_count() / r;
            // A 1×1 convolution and a linear layer hold the same numbers: either form of the
            // pair fits either form of the weight; kernels larger than 1×1 must agree.
            let kernels_agree = !(layer.down.rank() == 4 && shape.len() == 4)
                || layer.down.dims()[1..] == shape[1..];
            let fits = shape.first() == Some(&out)
                && shape[1..].iter().product::<usize>() == per_rank
                && kernels_agree;
            if !fits {
                return Err(format!(
                    "LoRA {}: layer `{}` (down {:?}, up {:?}) does not fit `{name}` of shape \
                     {shape:?}: the LoRA was made for another model",
                    delta.file.path.display(),
                    layer.name,
                    layer.down.dims(),
                    layer.up.dims()
                ));
            }
        }
        Ok(())
    }

    /// `base` (f32) with every delta for `name` added: W + Σ w·(α/r)·(up·down).
    pub fn fuse(&self, name: &str, base: &Tensor) -> candle_core::Result<Tensor> {
        self.add_deltas(name, base, 1.0)
    }

    /// `fused` (f32) with every delta for `name` taken away again: W − Σ w·(α/r)·(up·down),
    /// in the reverse order of [`fuse`](Self::fuse).
    pub fn unfuse(&self, name: &str, fused: &Tensor) -> candle_core::Result<Tensor> {
        self.add_deltas(name, fused, -1.0)
    }

    fn add_deltas(&self, name: &str, base: &Tensor, sign: f64) -> candle_core::Result<Tensor> {
        let deltas = self.deltas(name).unwrap_or_default();
        let mut out = base.clone();
        let mut apply = |delta: &Delta| -> candle_core::Result<()> {
            let layer = delta.layer();
            let product = layer
                .up
                .flatten_from(1)?
                .matmul(&layer.down.flatten_from(1)?)?
                .reshape(base.shape())?;
            out = (&out + (product * (sign * delta.weight * layer.scale))?)?;
            Ok(())
        };
        if sign > 0.0 {
            deltas.iter().try_for_each(&mut apply)?;
        } else {
            deltas.iter().rev().try_for_each(&mut apply)?;
        }
        Ok(out)
    }

    /// Fails, naming the first, when some layer patched no tensor of the network (`used`: the
    /// tensor names its constructor asked for).
    pub fn check_all_targeted(&self, used: &BTreeSet<String>) -> Result<()> {
        let found: BTreeSet<String> = used.iter().filter_map(|n| self.key_of(n)).collect();
        let mut stray: Vec<&Delta> = self
            .by_module
            .iter()
            .filter(|(module, _)| !found.contains(*module))
            .flat_map(|(_, deltas)| deltas)
            .collect();
        stray.sort_by(|a, b| a.layer().name.cmp(&b.layer().name));
        let Some(first) = stray.first() else {
            return Ok(());
        };
        Err(Error::ModelLoad {
            path: first.file.path.clone(),
            detail: format!(
                "LoRA layer `{}` patches `{}`, which this checkpoint's {} does not have ({} of \
                 its layers match nothing): the LoRA was made for another model",
                first.layer().name,
                first.layer().module,
                self.target.describe(),
                stray.len()
            ),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_of_the_three_formats_name_the_same_modules() {
        let cases = [
            (
                "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight",
                LoraTarget::Unet,
                "down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
                Part::Down,
            ),
            (
                "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_up.weight",
                LoraTarget::Unet,
                "down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
                Part::Up,
            ),
            (
                "unet.mid_block.resnets.0.conv1.lora.down.weight",
                LoraTarget::Unet,
                "mid_block_resnets_0_conv1",
                Part::Down,
            ),
            (
                "text_encoder.text_model.encoder.layers.1.self_attn.q_proj.lora_B.weight",
                LoraTarget::TextEncoder,
                "encoder_layers_1_self_attn_q_proj",
                Part::Up,
            ),
            (
                "text_encoder.encoder.layers.1.self_attn.q_proj.lora_A.weight",
                LoraTarget::TextEncoder,
                "encoder_layers_1_self_attn_q_proj",
                Part::Down,
            ),
            (
                "lora_te_text_model_encoder_layers_1_self_attn_q_proj.alpha",
                LoraTarget::TextEncoder,
                "encoder_layers_1_self_attn_q_proj",
                Part::Alpha,
            ),
            (
                "lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight",
                LoraTarget::TextEncoder2,
                "encoder_layers_0_mlp_fc1",
                Part::Down,
            ),
            (
                "text_encoder_2.text_model.encoder.layers.0.mlp.fc1.lora_A.weight",
                LoraTarget::TextEncoder2,
                "encoder_layers_0_mlp_fc1",
                Part::Down,
            ),
        ];
        for (key, target, module, part) in cases {
            let (t, m, _, p) = parse_key(key).unwrap();
            assert_eq!((t, m.as_str(), p), (target, module, part), "{key}");
        }
        // The base network's tensor names map to the same keys.
        assert_eq!(
            module_key(
                LoraTarget::TextEncoder,
                "text_model.encoder.layers.1.self_attn.q_proj"
            ),
            "encoder_layers_1_self_attn_q_proj"
        );
    }

    #[test]
    fn keys_it_cannot_apply_are_named() {
        for (key, says) in [
            ("lora_unet_mid_block_attentions_0_proj_in.hada_w1_a", "LoHa"),
            (
                "model.diffusion_model.input_blocks.1.weight",
                "not a LoRA key",
            ),
            ("unet..lora_A.weight", "names no module"),
        ] {
            let err = parse_key(key).unwrap_err();
            assert!(err.contains(key.split('.').next().unwrap()), "{err}");
            assert!(err.contains(says), "{key}: {err}");
        }
    }
}
