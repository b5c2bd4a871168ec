//! Milliseconds per frame of the features issue #16 adds to every frame when they are on: the
//! Stable Diffusion safety checker (full-size: CLIP ViT-L/14 at 224², projection 768, random
//! weights) on a 512² output, and `latent_feedback` on a 64×64 latent (a 512² stream). Off, each
//! costs nothing: the stream does not call them.
//!
//! ```text
//! cargo run --release -p sdstream --example safety_checker_bench -- [--frames 5] [--device cpu]
//! ```
//! Each part runs once to warm up, then `--frames` times; the table gives the median and best.
//! tests/reference/bench_safety_checker_reference.py times diffusers' checker the same way.

use std::process::ExitCode;
use std::time::Duration;

use candle_core::{DType, Tensor};
use candle_nn::{VarBuilder, VarMap};
use sdstream::model::safety_checker::{Config, SafetyChecker};
use sdstream::params::{ProcessingConfig, ProcessorConfig};
use sdstream::preprocess::ProcessorTimes;
use sdstream::preprocess::latent::LatentChain;
use serde_json::json;

#[path = "support/mod.rs"]
mod support;
use support::median_and_best;

fn run() -> Result<(), String> {
    let mut frames = 5;
    let mut device = "cpu".to_string();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = || args.next().ok_or(format!("{a} needs a value"));
        match a.as_str() {
            "--frames" => frames = value()?.parse().map_err(|e| format!("--frames: {e}"))?,
            "--device" => device = value()?,
            other => return Err(format!("unknown argument {other}")),
        }
    }
    let device = support::device(&device)?;
    let e = |e: sdstream::Error| e.to_string();
    let config: Config = serde_json::from_value(json!({
        "projection_dim": 768,
        "vision_config": {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
                          "num_attention_heads": 16, "image_size": 224, "patch_size": 14}
    }))
    .map_err(|e| e.to_string())?;
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &device);
    // The VarMap makes every tensor the checker asks for (random normal weights).
    let checker = SafetyChecker::new(&config, vb).map_err(e)?;
    let image = Tensor::rand(0f32, 1f32, (1, 3, 512, 512), &device).map_err(|e| e.to_string())?;
    let rgb: Vec<u8> = (0..512 * 512 * 3).map(|i| (i * 37 % 251) as u8).collect();
    let (pre_med, pre_best) = median_and_best(frames, || {
        checker.clip_input(&rgb, 512, 512, &device).unwrap();
    });
    let input = checker.clip_input(&rgb, 512, 512, &device).map_err(e)?;
    let (net_med, net_best) = median_and_best(frames, || {
        checker.image_embeds(&input).unwrap();
        device.synchronize().unwrap();
    });
    let (all_med, all_best) = median_and_best(frames, || {
        checker.check(&image, 0.5).unwrap();
    });
    let mut feedback = ProcessorConfig::new("latent_feedback");
    feedback
        .params
        .insert("feedback_strength".into(), json!(0.5));
    let chain_config = ProcessingConfig {
        enabled: true,
        processors: vec![feedback],
    };
    let mut chain = LatentChain::new(Some(&chain_config), "latent_postprocessing").map_err(e)?;
    let latent = Tensor::randn(0f32, 1f32, (1, 4, 64, 64), &device).map_err(|e| e.to_string())?;
    let previous = Tensor::randn(0f32, 1f32, (1, 4, 64, 64), &device).map_err(|e| e.to_string())?;
    let mut times = ProcessorTimes::default();
    let (fb_med, fb_best) = median_and_best(frames, || {
        chain.apply(&latent, Some(&previous), &mut times).unwrap();
        device.synchronize().unwrap();
    });
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!("| part ({device:?}, f32) | median ms | best ms |");
    println!("|---|---:|---:|");
    println!(
        "| safety checker: CLIP image processing (512² → 224²) | {:.2} | {:.2} |",
        ms(pre_med),
        ms(pre_best)
    );
    println!(
        "| safety checker: ViT-L/14 + projection | {:.1} | {:.1} |",
        ms(net_med),
        ms(net_best)
    );
    println!(
        "| safety checker: whole check of a 512² output | {:.1} | {:.1} |",
        ms(all_med),
        ms(all_best)
    );
    println!(
        "| latent_feedback on [1, 4, 64, 64] | {:.3} | {:.3} |",
        ms(fb_med),
        ms(fb_best)
    );
    Ok(())
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("safety_checker_bench: {e}");
            ExitCode::FAILURE
        }
    }
}
