//! Flicker with and without cached attention: the mean absolute difference between consecutive
//! outputs (8-bit levels, over every pixel and channel) for a still input and for one that moves
//! slowly (the picture shifted one pixel further right every frame, per 64 pixels of width).
//!
//! ```text
//! cargo run --release -p sdstream --example flicker -- [--model DIR] [--taesd DIR] \
//!     [--size 64] [--frames 12] [--t-index-list 20]
//! ```
//! The defaults are the tiny fixture (tests/fixtures/tiny-sd-turbo with tiny-taesd, 64²). For
//! full-size random weights, pass the folders tests/reference/make_full_size.py writes and
//! `--size 512`. The first `len(t_index_list)` outputs (the pipeline filling) are not counted.
//! The last column is the mean time of a frame after the first (both inputs). Random weights
//! draw no picture, so the figures say how much the bank steadies the network's
//! output, not how a real model's video looks.

use std::path::PathBuf;
use std::process::ExitCode;

use sdstream::{EngineSettings, Frame, PixelFormat, StreamDiffusion, StreamDiffusionParams};
use serde_json::{Value, json};

fn repo(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(rel)
}

fn run() -> Result<(), String> {
    let mut model = repo("tests/fixtures/tiny-sd-turbo");
    let mut taesd = repo("tests/fixtures/tiny-taesd");
    let mut size = 64usize;
    let mut frames = 12usize;
    let mut t_index: Vec<u32> = vec![20];
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = || args.next().ok_or(format!("{a} needs a value"));
        match a.as_str() {
            "--model" => model = value()?.into(),
            "--taesd" => taesd = value()?.into(),
            "--size" => size = value()?.parse().map_err(|e| format!("--size: {e}"))?,
            "--frames" => frames = value()?.parse().map_err(|e| format!("--frames: {e}"))?,
            "--t-index-list" => {
                t_index = value()?
                    .split(',')
                    .map(|s| s.trim().parse().map_err(|e| format!("--t-index-list: {e}")))
                    .collect::<Result<_, _>>()?
            }
            other => return Err(format!("unknown argument {other}")),
        }
    }
    let settings = EngineSettings::from_json(
        &json!({"vae": taesd, "cfg_type": "self", "allow_any_resolution": true}).to_string(),
    )
    .map_err(|e| e.to_string())?;
    let img = image::open(repo("examples/frames/000.png"))
        .map_err(|e| e.to_string())?
        .resize_exact(
            size as u32,
            size as u32,
            image::imageops::FilterType::Triangle,
        )
        .to_rgb8();
    let still = img.as_raw().clone();
    // One pixel per 64 of width per frame, wrapping around.
    let shifted = |f: usize| -> Vec<u8> {
        let step = (size / 64).max(1) * f;
        let mut out = vec![0u8; still.len()];
        for y in 0..size {
            for x in 0..size {
                let sx = (x + size - step % size) % size;
                let (o, s) = ((y * size + x) * 3, (y * size + sx) * 3);
                out[o..o + 3].copy_from_slice(&still[s..s + 3]);
            }
        }
        out
    };
    let configs: [(&str, Value); 3] = [
        ("off", json!({"enabled": false})),
        (
            "1 frame, every frame",
            json!({"max_frames": 1, "interval": 1}),
        ),
        (
            "4 frames, every frame",
            json!({"max_frames": 4, "interval": 1}),
        ),
    ];
    println!(
        "| cached attention ({}², t_index_list {t_index:?}, {frames} frames) | still input | moving input | ms per frame |",
        size
    );
    println!("|---|---:|---:|---:|");
    for (name, cached) in configs {
        let mut row = Vec::new();
        let mut spent = std::time::Duration::ZERO;
        let mut timed = 0u32;
        for moving in [false, true] {
            let params = StreamDiffusionParams::from_json_with(
                &json!({
                    "model_id": model, "prompt": "flowers", "seed": 789,
                    "t_index_list": t_index, "width": size, "height": size,
                    "use_safety_checker": false, "cached_attention": cached,
                })
                .to_string(),
                &settings,
            )
            .map_err(|e| e.to_string())?;
            let mut stream =
                StreamDiffusion::new(params, settings.clone()).map_err(|e| e.to_string())?;
            let mut previous: Option<Vec<u8>> = None;
            let (mut total, mut pairs) = (0.0f64, 0usize);
            for f in 0..frames {
                let data = if moving { shifted(f) } else { still.clone() };
                let frame = Frame::packed(&data, size, size, PixelFormat::Rgb8)
                    .map_err(|e| e.to_string())?;
                let start = std::time::Instant::now();
                let out = stream.process(&frame).map_err(|e| e.to_string())?.data;
                if f > 0 {
                    spent += start.elapsed();
                    timed += 1;
                }
                if f >= t_index.len()
                    && let Some(p) = &previous
                {
                    let diff: u64 = out
                        .iter()
                        .zip(p)
                        .map(|(a, b)| u64::from(a.abs_diff(*b)))
                        .sum();
                    total += diff as f64 / out.len() as f64;
                    pairs += 1;
                }
                previous = Some(out);
            }
            row.push(total / pairs.max(1) as f64);
        }
        println!(
            "| {name} | {:.3} | {:.3} | {:.1} |",
            row[0],
            row[1],
            spent.as_secs_f64() * 1e3 / f64::from(timed.max(1))
        );
    }
    Ok(())
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("flicker: {e}");
            ExitCode::FAILURE
        }
    }
}
