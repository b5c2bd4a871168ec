//! What IP-Adapter costs on the CPU (or a GPU): encoding a style picture, once per picture —
//! the CLIP image processing (Lanczos, 512² → 224²), h94's ViT-H/14 image encoder (1280 wide,
//! 32 layers, projection 1024) and the image projection (4 tokens) — and, every frame, the UNet
//! with the adapter's attention in each cross-attention layer against the UNet without it, at
//! 512² (a 64×64 latent, one row). Random weights of the full sizes; the UNet is sd-turbo's
//! (SD 2.1's config, random weights made in memory) or the one in `--unet` (a diffusers UNet
//! folder, e.g. made by tests/reference/make_full_size.py); the adapter is sized for it (its text
//! width, its cross-attention layers).
//!
//! ```text
//! cargo run --release -p sdstream --example ip_adapter_bench -- [--unet DIR] [--frames 3] [--device cpu]
//! ```
//! Each part runs once to warm up, then `--frames` times; the table gives the median and best.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use sdstream::model::ip_adapter::{
    AdapterConfig, ImageEncoder, ImageEncoderConfig, ImageProjection, IpAdapterLayers,
};
use sdstream::model::unet::{ImagePrompt, UNet2DConditionModel, UNetConfig, UNetInputs};
use sdstream::preprocess::resize::Filter;
use serde_json::json;

#[path = "support/mod.rs"]
mod support;
use support::median_and_best;

/// stabilityai/sd-turbo's UNet config (SD 2.1): the graph-shaping keys; the rest take
/// diffusers' defaults, as in the real file.
fn sd_turbo_unet() -> serde_json::Value {
    json!({
        "attention_head_dim": [5, 10, 20, 20],
        "block_out_channels": [320, 640, 1280, 1280],
        "cross_attention_dim": 1024,
        "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
        "layers_per_block": 2,
        "norm_num_groups": 32,
        "use_linear_projection": true,
        "sample_size": 64
    })
}

fn run() -> Result<(), String> {
    let mut frames = 3;
    let mut device = "cpu".to_string();
    let mut unet_dir: Option<PathBuf> = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = || args.next().ok_or(format!("{a} needs a value"));
        match a.as_str() {
            "--frames" => frames = value()?.parse().map_err(|e| format!("--frames: {e}"))?,
            "--device" => device = value()?,
            "--unet" => unet_dir = Some(PathBuf::from(value()?)),
            other => return Err(format!("unknown argument {other}")),
        }
    }
    let device = support::device(&device)?;
    let e = |e: sdstream::Error| e.to_string();
    let c = |e: candle_core::Error| e.to_string();
    let sync = |d: &Device| d.synchronize().unwrap();

    // h94's SD 1.5 image encoder (models/image_encoder): OpenCLIP ViT-H/14.
    let encoder_config: ImageEncoderConfig = serde_json::from_value(json!({
        "hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32,
        "num_attention_heads": 16, "image_size": 224, "patch_size": 14,
        "projection_dim": 1024, "hidden_act": "gelu"
    }))
    .map_err(|e| e.to_string())?;
    let varmap = VarMap::new();
    // The VarMap makes every tensor asked for (random normal weights).
    let encoder = ImageEncoder::new(
        &encoder_config,
        VarBuilder::from_varmap(&varmap, DType::F32, &device),
    )
    .map_err(e)?;
    let unet_map = VarMap::new();
    let unet = match &unet_dir {
        Some(dir) => UNet2DConditionModel::load(dir, DType::F32, &device).map_err(e)?,
        None => {
            let config: UNetConfig =
                serde_json::from_value(sd_turbo_unet()).map_err(|e| e.to_string())?;
            UNet2DConditionModel::new(
                &config,
                VarBuilder::from_varmap(&unet_map, DType::F32, &device),
            )
            .map_err(e)?
        }
    };
    let text_width = unet.text_width().ok_or("the UNet has no cross-attention")?;
    let adapter_config = AdapterConfig {
        tokens: 4,
        dim: text_width,
        embed_dim: 1024,
        widths: unet.cross_attention_widths().to_vec(),
        resampler: None,
    };
    let adapter_map = VarMap::new();
    let vb = VarBuilder::from_varmap(&adapter_map, DType::F32, &device);
    let projection = ImageProjection::new(&adapter_config, vb.pp("image_proj")).map_err(e)?;
    let layers = IpAdapterLayers::new(&adapter_config, vb.pp("ip_adapter")).map_err(e)?;

    let rgb: Vec<u8> = (0..512 * 512 * 3).map(|i| (i * 37 % 251) as u8).collect();
    let (pre_med, pre_best) = median_and_best(frames, || {
        sdstream::model::clip_vision::clip_input(&rgb, 512, 512, 224, Filter::Lanczos, &device)
            .unwrap();
    });
    let pixels =
        sdstream::model::clip_vision::clip_input(&rgb, 512, 512, 224, Filter::Lanczos, &device)
            .map_err(e)?;
    let (enc_med, enc_best) = median_and_best(frames, || {
        encoder.image_embeds(&pixels).unwrap();
        sync(&device);
    });
    let embeds = encoder.image_embeds(&pixels).map_err(e)?;
    let (proj_med, proj_best) = median_and_best(frames, || {
        projection.forward(&embeds).unwrap();
        sync(&device);
    });
    let tokens = projection.forward(&embeds).map_err(e)?;

    let sample = Tensor::randn(0f32, 1f32, (1, 4, 64, 64), &device).map_err(c)?;
    let t = Tensor::new(&[999f32], &device).map_err(c)?;
    let text = Tensor::randn(0f32, 1f32, (1, 77, text_width), &device).map_err(c)?;
    let with_tokens = Tensor::cat(&[&text, &tokens], 1).map_err(c)?;
    let scales = vec![1.0; layers.len()];
    let (plain_med, plain_best) = median_and_best(frames, || {
        unet.forward(UNetInputs::new(&sample, &t, &text)).unwrap();
        sync(&device);
    });
    let (ip_med, ip_best) = median_and_best(frames, || {
        unet.forward(
            UNetInputs::new(&sample, &t, &with_tokens).image(Some(ImagePrompt {
                adapter: &layers,
                tokens: 4,
                scales: &scales,
            })),
        )
        .unwrap();
        sync(&device);
    });
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!(
        "| part ({device:?}, f32, {} IP layers) | median ms | best ms |",
        layers.len()
    );
    println!("|---|---:|---:|");
    let row = |name: &str, med: Duration, best: Duration| {
        println!("| {name} | {:.1} | {:.1} |", ms(med), ms(best));
    };
    row(
        "per picture: CLIP image processing (512² → 224², Lanczos)",
        pre_med,
        pre_best,
    );
    row(
        "per picture: ViT-H/14 image encoder + projection",
        enc_med,
        enc_best,
    );
    row(
        "per picture: image projection (4 tokens)",
        proj_med,
        proj_best,
    );
    row(
        "per frame: UNet, 512², 1 row, no adapter",
        plain_med,
        plain_best,
    );
    row(
        "per frame: UNet, 512², 1 row, adapter at scale 1",
        ip_med,
        ip_best,
    );
    Ok(())
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ip_adapter_bench: {e}");
            ExitCode::FAILURE
        }
    }
}
