//! Broken model folders: absurd values in every network's config, missing, extra, misshapen
//! and mistyped tensors, truncated and empty weights, garbage JSON, NaN and Inf weights, a
//! folder where a file should be. Each must fail to load with an error naming the file (and the
//! key or tensor at fault); none may panic or abort the process.
//!
//! Every case is loaded in a child process (this test binary re-run on the single test
//! `child_loads_one_case`), so a case that aborts (an allocation sized by a config value that
//! fails, as `layers_per_block: 1000000000` once did) shows up as that case's failure instead
//! of killing the whole run.
//!
//! A reload of an Engine to a broken copy keeps the previous pipeline serving, with
//! `last_error` naming the problem.

use crate::common;

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};
use common::{copy_dir, fixture, scratch_dir, tiny_settings};
use sdstream::model::bundle::StableDiffusionModels;
use sdstream::params::VaeChoice;
use sdstream::{
    DropPolicy, Engine, EngineOptions, EngineSettings, EngineState, Frame, PixelFormat,
    StreamDiffusionParams,
};
use serde_json::{Value, json};

/// Which fixture a case breaks, and how the broken copy is loaded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Target {
    /// tests/fixtures/tiny-sd-turbo, loaded with the tiny TAESD.
    Checkpoint,
    /// tests/fixtures/tiny-sd-turbo, loaded with its own AutoencoderKL (`vae: full`).
    CheckpointFullVae,
    /// tests/fixtures/tiny-taesd, loaded as the `vae` of the tiny checkpoint.
    Taesd,
    /// tests/fixtures/tiny-controlnet-a, loaded as a ControlNet of the tiny checkpoint.
    ControlNet,
}

impl Target {
    fn fixture(self) -> &'static str {
        match self {
            Target::Checkpoint | Target::CheckpointFullVae => "tiny-sd-turbo",
            Target::Taesd => "tiny-taesd",
            Target::ControlNet => "tiny-controlnet-a",
        }
    }
}

/// One broken folder: `breaks` edits a fresh copy of the target's fixture and returns the
/// substrings the load error must contain (the file, then the key or tensor).
struct Case {
    name: &'static str,
    target: Target,
    breaks: fn(&Path) -> Vec<String>,
}

const UNET_WEIGHTS: &str = "unet/diffusion_pytorch_model.safetensors";
const TEXT_WEIGHTS: &str = "text_encoder/model.safetensors";
const VAE_WEIGHTS: &str = "vae/diffusion_pytorch_model.safetensors";
const TAESD_WEIGHTS: &str = "diffusion_pytorch_model.safetensors";
const NET_WEIGHTS: &str = "diffusion_pytorch_model.fp16.safetensors";

fn strings(items: &[&str]) -> Vec<String> {
    items.iter().map(|s| s.to_string()).collect()
}

/// Sets `key` of the JSON file `dir/rel` to `value`.
fn set_key(dir: &Path, rel: &str, key: &str, value: Value) {
    let path = dir.join(rel);
    let text = std::fs::read_to_string(&path).unwrap();
    let mut json: Value = serde_json::from_str(&text).unwrap();
    json[key] = value;
    std::fs::write(&path, json.to_string()).unwrap();
}

/// Replaces the file `dir/rel` by `bytes`.
fn write(dir: &Path, rel: &str, bytes: &[u8]) {
    std::fs::write(dir.join(rel), bytes).unwrap();
}

/// Replaces the file `dir/rel` by an empty folder of the same name.
fn make_dir_of(dir: &Path, rel: &str) {
    let path = dir.join(rel);
    std::fs::remove_file(&path).unwrap();
    std::fs::create_dir(&path).unwrap();
}

/// Replaces the file `dir/rel` by a sparse file of 8 GiB (no disk space taken): a metadata file
/// that large must be refused by its size, never read.
fn huge(dir: &Path, rel: &str) {
    let file = std::fs::File::create(dir.join(rel)).unwrap();
    file.set_len(8 << 30).unwrap();
}

/// Replaces the file `dir/rel` by a FIFO no one writes: opening it would block the load.
fn fifo(dir: &Path, rel: &str) {
    let path = dir.join(rel);
    std::fs::remove_file(&path).unwrap();
    let made = Command::new("mkfifo").arg(&path).status().unwrap();
    assert!(made.success(), "mkfifo {}", path.display());
}

/// Rewrites the safetensors file `dir/rel` after `edit` changed its tensors.
fn edit_tensors(dir: &Path, rel: &str, edit: impl FnOnce(&mut HashMap<String, Tensor>)) {
    let path = dir.join(rel);
    let mut tensors = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
    edit(&mut tensors);
    candle_core::safetensors::save(&tensors, &path).unwrap();
}

/// (header, byte offset of the data) of a safetensors file.
fn header(bytes: &[u8]) -> (serde_json::Map<String, Value>, usize) {
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    (header.as_object().unwrap().clone(), 8 + n)
}

/// Overwrites the first `count` values of `tensor` in `dir/rel` with `value` (as stored: f32 or
/// f16), leaving everything else byte for byte.
fn poison(dir: &Path, rel: &str, tensor: &str, value: f32, count: usize) {
    let path = dir.join(rel);
    let mut bytes = std::fs::read(&path).unwrap();
    let (header, data) = header(&bytes);
    let info = &header[tensor];
    let start = data + info["data_offsets"][0].as_u64().unwrap() as usize;
    let encoded: Vec<u8> = match info["dtype"].as_str().unwrap() {
        "F32" => value.to_le_bytes().to_vec(),
        "F16" => half::f16::from_f32(value).to_le_bytes().to_vec(),
        other => panic!("{tensor} is {other}"),
    };
    for i in 0..count {
        let at = start + i * encoded.len();
        bytes[at..at + encoded.len()].copy_from_slice(&encoded);
    }
    std::fs::write(&path, bytes).unwrap();
}

/// Cuts `cut` bytes off the end of `dir/rel`; returns the name of the tensor stored last (the
/// one the cut reaches).
fn truncate(dir: &Path, rel: &str, cut: usize) -> String {
    let path = dir.join(rel);
    let bytes = std::fs::read(&path).unwrap();
    let (header, _) = header(&bytes);
    let last = header
        .iter()
        .filter(|(k, _)| k.as_str() != "__metadata__")
        .max_by_key(|(_, v)| v["data_offsets"][1].as_u64().unwrap())
        .map(|(k, _)| k.clone())
        .unwrap();
    std::fs::write(&path, &bytes[..bytes.len() - cut]).unwrap();
    last
}

fn cases() -> Vec<Case> {
    vec![
        // --- model_index.json ---
        Case {
            name: "model_index.json is not JSON",
            target: Target::Checkpoint,
            breaks: |d| {
                write(d, "model_index.json", b"{\"_class_name\": \"StableDiff");
                strings(&["model_index.json"])
            },
        },
        Case {
            name: "model_index.json of 8 GiB",
            target: Target::Checkpoint,
            breaks: |d| {
                huge(d, "model_index.json");
                strings(&["model_index.json", "8589934592 bytes", "at most 4194304"])
            },
        },
        Case {
            name: "model_index.json is empty",
            target: Target::Checkpoint,
            breaks: |d| {
                write(d, "model_index.json", b"");
                strings(&["model_index.json"])
            },
        },
        Case {
            name: "model_index.json is a list",
            target: Target::Checkpoint,
            breaks: |d| {
                write(d, "model_index.json", b"[\"unet\", \"vae\"]");
                strings(&["model_index.json", "object"])
            },
        },
        Case {
            name: "model_index.json names no pipeline class",
            target: Target::Checkpoint,
            breaks: |d| {
                let text = std::fs::read_to_string(d.join("model_index.json")).unwrap();
                let mut json: Value = serde_json::from_str(&text).unwrap();
                json.as_object_mut().unwrap().remove("_class_name");
                write(d, "model_index.json", json.to_string().as_bytes());
                strings(&["model_index.json", "_class_name"])
            },
        },
        Case {
            name: "model_index.json: unet entry is not [library, class]",
            target: Target::Checkpoint,
            breaks: |d| {
                set_key(d, "model_index.json", "unet", json!(42));
                strings(&["model_index.json", "unet"])
            },
        },
        Case {
            name: "model_index.json says there is no unet",
            target: Target::Checkpoint,
            breaks: |d| {
                set_key(d, "model_index.json", "unet", json!([null, null]));
                strings(&["model_index.json", "unet"])
            },
        },
        // --- UNet config ---
        Case {
            name: "unet layers_per_block 1e9",
            target: Target::Checkpoint,
            breaks: |d| {
                set_key(
                    d,
                    "unet/config.json",
                    "layers_per_block",
                    json!(1_000_000_000),
                );
                strings(&["unet/config.json", "layers_per_block", "1000000000"])
            },
        },
        Case {
            name: "unet block_out_channels 1e9",
            target: Target::Checkpoint,
            breaks: |d| {
                set_key(
                    d,
                    "unet/config.json",
                    "block_out_channels",
                    json!(vec![1_000_000_000u64; 4]),
                );
                strings(&["unet/config.json", "block_out_channels", "1000000000"])
            },
        },
        Case {
            name: "unet transformer_layers_per_block 1e9",
            target: Target::Checkpoint,
            breaks: |d| {
                set_key(
                    d,
                    "unet/config.json",
                    "transformer_layers_per_block",
                    json!(1_000_000_000),
                );
                strings(&["unet/config.json", "transformer_layers_per_block"])
            },
        },
        Case {
            name: "unet cross_attention_dim 1e12",
            target: Target::Checkpoint,
            breaks: |d| {
                set_key(
                    d,
                    "unet/config.json",
                    "cross_attention_dim",
                    json!(1_000_000_000_000u64),
                );
                strings(&["unet/config.json", "cross_attention_dim"])
            },
        },
        Case {
            name: "unet addition_time_embed_dim 1e12 (SDXL text_time)",
            target: Target::Checkpoint,
            breaks: |d| {
                let rel = "unet/config.json";
                set_key(d, rel, "addition_embed_type", json!("text_time"));
                set_key(
                    d,
                    rel,
                    "addition_time_embed_dim",
                    json!(1_000_000_000_000u64),
                );
                set_key(d, rel, "projection_class_embeddings_input_dim", json!(2816));
                strings(&["unet/config.json", "addition_time_embed_dim"])
            },
        },
        Case {
            name: "unet conv_in_kernel 1e9+1",
            target: Target::Checkpoint,
            breaks: |d| {
                set_key(
                    d,
                    "unet/config.json",
                    "conv_in_kernel",
                    json!(1_000_000_001),
                );
                strings(&["unet/config.json", "conv_in_kernel"])
            },
        },
        Case {
            name: "unet mid_block_scale_factor 0 (a divisor)",
            target: Target::Checkpoint,
            breaks: |d| {
                set_key(d, "unet/config.json", "mid_block_scale_factor", json!(0));
                strings(&["unet/config.json", "mid_block_scale_factor"])
            },
        },
        Case {
            name: "unet reads text 64 wide, the text encoder makes it 32 wide",
            target: Target::Checkpoint,
            breaks: |d| {
                // A consistent UNet (config and weights agree) for another text encoder.
                set_key(d, "unet/config.json", "cross_attention_dim", json!(64));
                edit_tensors(d, UNET_WEIGHTS, |t| {
                    for (name, w) in t.iter_mut() {
                        if name.ends_with("attn2.to_k.weight")
                            || name.ends_with("attn2.to_v.weight")
                        {
                            *w = Tensor::cat(&[&*w, &*w], 1).unwrap();
                        }
                    }
                });
                strings(&["unet/config.json", "cross_attention_dim", "hidden_size"])
            },
        },
        Case {
            name: "unet takes 8 channels, the autoencoder makes 4",
            target: Target::Checkpoint,
            breaks: |d| {
                set_key(d, "unet/config.json", "in_channels", json!(8));
                edit_tensors(d, UNET_WEIGHTS, |t| {
                    let w = t["conv_in.weight"].clone();
                    t.insert("conv_in.weight".into(), Tensor::cat(&[&w, &w], 1).unwrap());
                });
                strings(&["unet/config.json", "in_channels", "latent"])
            },
        },
        Case {
            name: "unet config.json is not JSON",
            target: Target::Checkpoint,
            breaks: |d| {
                write(d, "unet/config.json", b"{\"in_channels\": 4,");
                strings(&["unet/config.json"])
            },
        },
        Case {
            name: "unet config.json has a string for a count",
            target: Target::Checkpoint,
            breaks: |d| {
                set_key(d, "unet/config.json", "layers_per_block", json!("two"));
                strings(&["unet/config.json", "layers_per_block"])
            },
        },
        Case {
            name: "unet config.json of 8 GiB",
            target: Target::Checkpoint,
            breaks: |d| {
                huge(d, "unet/config.json");
                strings(&["unet/config.json", "8589934592 bytes", "at most 4194304"])
            },
        },
        Case {
            name: "text_encoder config.json is a FIFO",
            target: Target::Checkpoint,
            breaks: |d| {
                // Found wanting when the id is resolved (a required file must be a regular
                // file), before anything opens it.
                fifo(d, "text_encoder/config.json");
                strings(&["text_encoder/config.json", "lacks"])
            },
        },
        Case {
            name: "unet config.json is a folder",
            target: Target::Checkpoint,
            breaks: |d| {
                make_dir_of(d, "unet/config.json");
                strings(&["unet/config.json"])
            },
        },
        // --- UNet weights ---
        Case {
            name: "unet weights empty",
            target: Target::Checkpoint,
            breaks: |d| {
                write(d, UNET_WEIGHTS, b"");
                strings(&[UNET_WEIGHTS])
            },
        },
        Case {
            name: "unet weights are a folder",
            target: Target::Checkpoint,
            breaks: |d| {
                make_dir_of(d, UNET_WEIGHTS);
                strings(&[UNET_WEIGHTS])
            },
        },
        Case {
            name: "unet weights truncated",
            target: Target::Checkpoint,
            breaks: |d| {
                let last = truncate(d, UNET_WEIGHTS, 100);
                vec![UNET_WEIGHTS.into(), last]
            },
        },
        Case {
            name: "unet weights header length beyond the file",
            target: Target::Checkpoint,
            breaks: |d| {
                let path = d.join(UNET_WEIGHTS);
                let mut bytes = std::fs::read(&path).unwrap();
                bytes[..8].copy_from_slice(&(1u64 << 40).to_le_bytes());
                std::fs::write(&path, bytes).unwrap();
                strings(&[UNET_WEIGHTS, "header"])
            },
        },
        Case {
            name: "unet weights lack a tensor",
            target: Target::Checkpoint,
            breaks: |d| {
                let name = "down_blocks.1.resnets.0.conv1.weight";
                edit_tensors(d, UNET_WEIGHTS, |t| {
                    t.remove(name).unwrap();
                });
                strings(&[UNET_WEIGHTS, name])
            },
        },
        Case {
            name: "unet weights: a tensor of the wrong shape",
            target: Target::Checkpoint,
            breaks: |d| {
                let name = "mid_block.attentions.0.proj_in.weight";
                edit_tensors(d, UNET_WEIGHTS, |t| {
                    let w = t[name].clone();
                    t.insert(name.into(), w.narrow(0, 0, 8).unwrap());
                });
                strings(&[UNET_WEIGHTS, name, "shape"])
            },
        },
        Case {
            name: "unet weights: an integer tensor",
            target: Target::Checkpoint,
            breaks: |d| {
                let name = "conv_in.weight";
                edit_tensors(d, UNET_WEIGHTS, |t| {
                    let w = t[name].to_dtype(DType::I64).unwrap();
                    t.insert(name.into(), w);
                });
                strings(&[UNET_WEIGHTS, name, "I64"])
            },
        },
        Case {
            name: "unet weights: an extra resnet",
            target: Target::Checkpoint,
            breaks: |d| {
                let name = "down_blocks.0.resnets.2.conv1.weight";
                edit_tensors(d, UNET_WEIGHTS, |t| {
                    let w = t["down_blocks.0.resnets.1.conv1.weight"].clone();
                    t.insert(name.into(), w);
                });
                strings(&[UNET_WEIGHTS, name])
            },
        },
        Case {
            name: "unet weights: NaN",
            target: Target::Checkpoint,
            breaks: |d| {
                let name = "up_blocks.1.attentions.0.proj_out.weight";
                poison(d, UNET_WEIGHTS, name, f32::NAN, 3);
                strings(&[UNET_WEIGHTS, name, "3 non-finite values"])
            },
        },
        Case {
            name: "unet weights: Inf",
            target: Target::Checkpoint,
            breaks: |d| {
                let name = "conv_out.bias";
                poison(d, UNET_WEIGHTS, name, f32::INFINITY, 1);
                strings(&[UNET_WEIGHTS, name])
            },
        },
        // --- text encoder ---
        Case {
            name: "text_encoder num_hidden_layers 1e9",
            target: Target::Checkpoint,
            breaks: |d| {
                set_key(
                    d,
                    "text_encoder/config.json",
                    "num_hidden_layers",
                    json!(1_000_000_000),
                );
                strings(&["text_encoder/config.json", "num_hidden_layers"])
            },
        },
        Case {
            name: "text_encoder max_position_embeddings 1e9",
            target: Target::Checkpoint,
            breaks: |d| {
                set_key(
                    d,
                    "text_encoder/config.json",
                    "max_position_embeddings",
                    json!(1_000_000_000),
                );
                strings(&["text_encoder/config.json", "max_position_embeddings"])
            },
        },
        Case {
            name: "text_encoder layer_norm_eps negative",
            target: Target::Checkpoint,
            breaks: |d| {
                set_key(d, "text_encoder/config.json", "layer_norm_eps", json!(-1.0));
                strings(&["text_encoder/config.json", "layer_norm_eps"])
            },
        },
        Case {
            name: "text_encoder hidden_size doubled",
            target: Target::Checkpoint,
            breaks: |d| {
                set_key(d, "text_encoder/config.json", "hidden_size", json!(64));
                strings(&[TEXT_WEIGHTS, "token_embedding.weight", "shape"])
            },
        },
        Case {
            name: "text_encoder weights: f16 NaN",
            target: Target::Checkpoint,
            breaks: |d| {
                let name = "text_model.encoder.layers.0.mlp.fc1.weight";
                poison(d, TEXT_WEIGHTS, name, f32::NAN, 5);
                strings(&[TEXT_WEIGHTS, name, "5 non-finite values"])
            },
        },
        // --- tokenizer and scheduler ---
        Case {
            name: "tokenizer.json is not JSON",
            target: Target::Checkpoint,
            breaks: |d| {
                write(d, "tokenizer/tokenizer.json", b"{\"model\": {\"vocab\"");
                strings(&["tokenizer/tokenizer.json"])
            },
        },
        Case {
            name: "tokenizer.json of 8 GiB",
            target: Target::Checkpoint,
            breaks: |d| {
                huge(d, "tokenizer/tokenizer.json");
                strings(&["tokenizer/tokenizer.json", "at most 67108864"])
            },
        },
        Case {
            name: "special_tokens_map.json is a FIFO",
            target: Target::Checkpoint,
            breaks: |d| {
                fifo(d, "tokenizer/special_tokens_map.json");
                strings(&["tokenizer/special_tokens_map.json", "not a regular file"])
            },
        },
        Case {
            name: "tokenizer_config.json is not JSON",
            target: Target::Checkpoint,
            breaks: |d| {
                write(
                    d,
                    "tokenizer/tokenizer_config.json",
                    b"model_max_length = 77",
                );
                strings(&["tokenizer/tokenizer_config.json"])
            },
        },
        Case {
            name: "tokenizer longer than the text encoder's positions",
            target: Target::Checkpoint,
            breaks: |d| {
                set_key(
                    d,
                    "tokenizer/tokenizer_config.json",
                    "model_max_length",
                    json!(1024),
                );
                strings(&["tokenizer/tokenizer_config.json", "model_max_length"])
            },
        },
        Case {
            name: "scheduler num_train_timesteps 1e12",
            target: Target::Checkpoint,
            breaks: |d| {
                set_key(
                    d,
                    "scheduler/scheduler_config.json",
                    "num_train_timesteps",
                    json!(1_000_000_000_000u64),
                );
                strings(&["scheduler/scheduler_config.json", "num_train_timesteps"])
            },
        },
        Case {
            name: "scheduler_config.json is not JSON",
            target: Target::Checkpoint,
            breaks: |d| {
                write(d, "scheduler/scheduler_config.json", b"\x00\x01garbage");
                strings(&["scheduler/scheduler_config.json"])
            },
        },
        // --- AutoencoderKL ---
        Case {
            name: "vae layers_per_block 1e9",
            target: Target::CheckpointFullVae,
            breaks: |d| {
                set_key(
                    d,
                    "vae/config.json",
                    "layers_per_block",
                    json!(1_000_000_000),
                );
                strings(&["vae/config.json", "layers_per_block"])
            },
        },
        Case {
            name: "vae latent_channels 1e9",
            target: Target::CheckpointFullVae,
            breaks: |d| {
                set_key(
                    d,
                    "vae/config.json",
                    "latent_channels",
                    json!(1_000_000_000),
                );
                strings(&["vae/config.json", "latent_channels"])
            },
        },
        Case {
            name: "vae weights lack a tensor",
            target: Target::CheckpointFullVae,
            breaks: |d| {
                let name = "decoder.up_blocks.0.resnets.1.conv2.weight";
                edit_tensors(d, VAE_WEIGHTS, |t| {
                    t.remove(name).unwrap();
                });
                strings(&[VAE_WEIGHTS, name])
            },
        },
        Case {
            name: "vae weights: NaN",
            target: Target::CheckpointFullVae,
            breaks: |d| {
                let name = "decoder.conv_out.weight";
                poison(d, VAE_WEIGHTS, name, f32::NAN, 1);
                strings(&[VAE_WEIGHTS, name])
            },
        },
        // --- TAESD ---
        Case {
            name: "taesd num_encoder_blocks 1e9",
            target: Target::Taesd,
            breaks: |d| {
                set_key(
                    d,
                    "config.json",
                    "num_encoder_blocks",
                    json!([1, 1_000_000_000, 3, 3]),
                );
                strings(&["config.json", "num_encoder_blocks"])
            },
        },
        Case {
            name: "taesd 64 levels",
            target: Target::Taesd,
            breaks: |d| {
                set_key(
                    d,
                    "config.json",
                    "encoder_block_out_channels",
                    json!(vec![64; 64]),
                );
                set_key(d, "config.json", "num_encoder_blocks", json!(vec![1; 64]));
                strings(&["config.json", "encoder_block_out_channels"])
            },
        },
        Case {
            name: "taesd config.json empty",
            target: Target::Taesd,
            breaks: |d| {
                write(d, "config.json", b"");
                strings(&["config.json"])
            },
        },
        Case {
            name: "taesd config.json is a folder",
            target: Target::Taesd,
            breaks: |d| {
                make_dir_of(d, "config.json");
                strings(&["config.json"])
            },
        },
        Case {
            name: "taesd weights truncated",
            target: Target::Taesd,
            breaks: |d| {
                let last = truncate(d, TAESD_WEIGHTS, 4);
                vec![TAESD_WEIGHTS.into(), last]
            },
        },
        // --- ControlNet ---
        Case {
            name: "controlnet layers_per_block 1e9",
            target: Target::ControlNet,
            breaks: |d| {
                set_key(d, "config.json", "layers_per_block", json!(1_000_000_000));
                strings(&["config.json", "layers_per_block"])
            },
        },
        Case {
            name: "controlnet conditioning_channels 1e9",
            target: Target::ControlNet,
            breaks: |d| {
                set_key(
                    d,
                    "config.json",
                    "conditioning_channels",
                    json!(1_000_000_000),
                );
                strings(&["config.json", "conditioning_channels"])
            },
        },
        Case {
            name: "controlnet 100 conditioning embedding widths",
            target: Target::ControlNet,
            breaks: |d| {
                set_key(
                    d,
                    "config.json",
                    "conditioning_embedding_out_channels",
                    json!(vec![16; 100]),
                );
                strings(&["config.json", "conditioning_embedding_out_channels"])
            },
        },
        Case {
            name: "controlnet weights: a zero conv of the wrong shape",
            target: Target::ControlNet,
            breaks: |d| {
                let name = "controlnet_down_blocks.3.weight";
                edit_tensors(d, NET_WEIGHTS, |t| {
                    let w = t[name].narrow(1, 0, 1).unwrap().contiguous().unwrap();
                    t.insert(name.into(), w);
                });
                strings(&[NET_WEIGHTS, name, "shape"])
            },
        },
        Case {
            name: "controlnet weights: f16 Inf",
            target: Target::ControlNet,
            breaks: |d| {
                let name = "controlnet_mid_block.weight";
                poison(d, NET_WEIGHTS, name, f32::NEG_INFINITY, 2);
                strings(&[NET_WEIGHTS, name, "2 non-finite values"])
            },
        },
    ]
}

/// Env vars that tell the child which case to load from where.
const CASE_VAR: &str = "SDSTREAM_BROKEN_CASE";
const DIR_VAR: &str = "SDSTREAM_BROKEN_DIR";
/// The child's answer on stdout: `OUTCOME ok`, or `OUTCOME error <message on one line>`.
const OUTCOME: &str = "OUTCOME ";

/// Loads the broken copy `dir` as `target` says.
fn load(target: Target, dir: &Path) -> sdstream::Result<()> {
    let tiny = fixture("tiny-sd-turbo").display().to_string();
    let dir_id = dir.display().to_string();
    match target {
        Target::Checkpoint => {
            StableDiffusionModels::load(&dir_id, &tiny_settings("self"), &mut |_| {})?;
        }
        Target::CheckpointFullVae => {
            let settings = EngineSettings {
                vae: VaeChoice::Full,
                ..tiny_settings("self")
            };
            StableDiffusionModels::load(&dir_id, &settings, &mut |_| {})?;
        }
        Target::Taesd => {
            let settings = EngineSettings {
                vae: VaeChoice::Custom(dir_id),
                ..tiny_settings("self")
            };
            StableDiffusionModels::load(&tiny, &settings, &mut |_| {})?;
        }
        Target::ControlNet => {
            let models = StableDiffusionModels::load(&tiny, &tiny_settings("self"), &mut |_| {})?;
            models.controlnet(&dir_id, &mut |_| {})?;
        }
    }
    Ok(())
}

/// The child side: loads the case named by the environment and reports the outcome. Does
/// nothing when run as an ordinary test.
#[test]
fn child_loads_one_case() {
    let (Ok(name), Ok(dir)) = (std::env::var(CASE_VAR), std::env::var(DIR_VAR)) else {
        return;
    };
    let case = cases()
        .into_iter()
        .find(|c| c.name == name)
        .unwrap_or_else(|| panic!("no case {name:?}"));
    let outcome = match load(case.target, Path::new(&dir)) {
        Ok(()) => "ok".to_string(),
        Err(e) => format!("error {}", e.to_string().replace('\n', " ")),
    };
    println!("{OUTCOME}{outcome}");
}

/// How a child run ended.
#[derive(Debug)]
enum Ending {
    /// The load returned this error.
    Error(String),
    /// The load succeeded: the broken folder was accepted.
    Accepted,
    /// The child panicked (exit code 101) or ended otherwise without an outcome.
    Panicked(String),
    /// The child was killed by a signal (an abort is SIGABRT).
    Aborted(String),
}

/// The child test's name as the harness knows it: its module path without the binary's name
/// (`broken_models::child_loads_one_case` in the integration binary).
fn child_test_name() -> String {
    match module_path!().split_once("::") {
        Some((_, module)) => format!("{module}::child_loads_one_case"),
        None => "child_loads_one_case".to_string(),
    }
}

fn run_child(case: &Case, dir: &Path) -> Ending {
    let out = Command::new(std::env::current_exe().expect("test binary"))
        .args([
            "--exact",
            &child_test_name(),
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CASE_VAR, case.name)
        .env(DIR_VAR, dir)
        .output()
        .expect("run the child");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let tail = |s: &str| s.lines().rev().take(3).collect::<Vec<_>>().join(" | ");
    #[cfg(unix)]
    {
        use std::os::unix::process::ExitStatusExt;
        if let Some(signal) = out.status.signal() {
            return Ending::Aborted(format!("signal {signal}: {}", tail(&stderr)));
        }
    }
    let outcome = stdout
        .lines()
        .find_map(|l| l.find(OUTCOME).map(|at| &l[at + OUTCOME.len()..]))
        .map(str::to_string);
    match (out.status.success(), outcome) {
        (true, Some(o)) if o == "ok" => Ending::Accepted,
        (true, Some(o)) => Ending::Error(o.strip_prefix("error ").unwrap_or(&o).to_string()),
        _ => Ending::Panicked(format!("{}: {}", out.status, tail(&stderr))),
    }
}

#[test]
fn every_broken_folder_fails_with_a_message_naming_the_file() {
    let scratch = scratch_dir("broken-models");
    let cases = cases();
    let mut named = 0;
    let mut failures = Vec::new();
    let (mut panics, mut aborts, mut accepted) = (0, 0, 0);
    for (i, case) in cases.iter().enumerate() {
        let dir = scratch.join(format!("case-{i:02}"));
        copy_dir(&fixture(case.target.fixture()), &dir);
        let expected = (case.breaks)(&dir);
        let ending = run_child(case, &dir);
        println!("[{i:02}] {}: {ending:?}", case.name);
        match &ending {
            Ending::Error(message) => {
                // Paths are checked with the separator of this platform.
                let missing: Vec<&String> = expected
                    .iter()
                    .filter(|s| !message.contains(&s.replace('/', std::path::MAIN_SEPARATOR_STR)))
                    .collect();
                if missing.is_empty() {
                    named += 1;
                } else {
                    failures.push(format!("{}: {missing:?} not in {message:?}", case.name));
                }
            }
            Ending::Accepted => {
                accepted += 1;
                failures.push(format!("{}: accepted", case.name));
            }
            Ending::Panicked(why) => {
                panics += 1;
                failures.push(format!("{}: panicked: {why}", case.name));
            }
            Ending::Aborted(why) => {
                aborts += 1;
                failures.push(format!("{}: aborted: {why}", case.name));
            }
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
    let _ = std::fs::remove_dir_all(&scratch);
    println!(
        "broken models: {} cases, {named} errors naming the file and key/tensor, {accepted} \
         accepted, panics={panics}, aborts={aborts}",
        cases.len()
    );
    assert!(cases.len() >= 20);
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert_eq!((named, panics, aborts), (cases.len(), 0, 0));
}

// --- The engine keeps serving through a reload to a broken folder ---

fn frame(data: &[u8]) -> Frame<'_> {
    Frame::packed(data, 64, 64, PixelFormat::Rgb8).expect("64×64 RGB frame")
}

#[test]
fn a_reload_to_a_broken_folder_keeps_the_old_pipeline_serving() {
    let scratch = scratch_dir("broken-reload");
    let broken = scratch.join("model");
    copy_dir(&fixture("tiny-sd-turbo"), &broken);
    set_key(
        &broken,
        "unet/config.json",
        "layers_per_block",
        json!(1_000_000_000),
    );

    let settings = EngineSettings {
        vae: VaeChoice::Custom(fixture("tiny-taesd").display().to_string()),
        allow_any_resolution: true,
        ..EngineSettings::default()
    };
    let params = StreamDiffusionParams {
        model_id: fixture("tiny-sd-turbo").display().to_string(),
        width: 64,
        height: 64,
        ..StreamDiffusionParams::default()
    };
    // No input arrives while the reload fails, and that must not read as DEGRADED_INPUT: the
    // input timeout is the longest there is, so the state depends on no clock.
    let options = EngineOptions {
        drop_policy: DropPolicy::Latest,
        input_timeout_ms: EngineOptions::MAX_INPUT_TIMEOUT_MS,
        ..EngineOptions::default()
    };
    let engine = Engine::new(params.clone(), settings, options).expect("engine");
    let pixels = vec![128u8; 64 * 64 * 3];
    let before = engine
        .process(frame(&pixels))
        .expect("a frame before the reload");

    let update = engine
        .update_params(StreamDiffusionParams {
            model_id: broken.display().to_string(),
            ..params
        })
        .expect("accepted: the folder exists");
    assert!(update.needs_reload());
    let deadline = Instant::now() + Duration::from_secs(120);
    while engine.status().reload_failures == 0 {
        assert!(
            Instant::now() < deadline,
            "the reload neither failed nor finished"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let status = engine.status();
    assert_eq!(status.state, EngineState::Online);
    assert_eq!(status.reload_failures, 1);
    // The failed update (version 1) reverted to the serving parameters under version 2.
    assert_eq!(
        (status.params_version, status.serving_params_version),
        (2, Some(2))
    );
    let error = status.last_error.unwrap_or_default();
    println!("last_error: {error}");
    let config = broken.join("unet").join("config.json");
    assert!(error.contains(&config.display().to_string()), "{error}");
    assert!(error.contains("layers_per_block"), "{error}");

    let after = engine
        .process(frame(&pixels))
        .expect("a frame after the failed reload");
    assert_eq!(after.params_version, 2);
    assert_eq!(
        (after.image.width, after.image.height),
        (before.image.width, before.image.height)
    );
    drop(engine);
    let _ = std::fs::remove_dir_all(&scratch);
}
