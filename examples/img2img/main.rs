//! Streams a folder of PNG frames through one StreamDiffusion pipeline and writes the results.
//!
//! ```text
//! cargo run --release --example img2img -- --model DIR_OR_ID --params params.json \
//!     [--settings settings.json] [--cfg-type self] [--vae taesd|full|DIR] \
//!     [--device cpu|cuda|cuda:N] [--dtype f32|f16|bf16] --input DIR --output DIR
//! ```
//!
//! `params.json` is a StreamDiffusionParams body (Daydream's), `settings.json` an EngineSettings
//! body; flags override both. Frames are read in name order and written under the same names
//! (8-bit RGB, the [0, 1] output rounded to the nearest level). Per-stage timings go to stdout.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

#[path = "../support/mod.rs"]
mod support;

use sdstream::{EngineSettings, Frame, PixelFormat, StreamDiffusion, StreamDiffusionParams};

// As the C ABI, the Python module and the server have it: large freed blocks kept for reuse
// (sdstream::alloc; `SDSTREAM_REUSE_MB=0` runs on the system allocator alone).
#[global_allocator]
static ALLOCATOR: sdstream::alloc::ReusingAllocator = sdstream::alloc::ReusingAllocator::new();

const USAGE: &str = "usage: img2img --input DIR --output DIR [--model DIR_OR_ID] [--params FILE] \
[--settings FILE] [--cfg-type none|full|self|initialize] [--vae taesd|full|DIR] \
[--device cpu|cuda|cuda:N|metal] [--dtype f32|f16|bf16]";

#[derive(Default)]
struct Args {
    model: Option<String>,
    params: Option<PathBuf>,
    settings: Option<PathBuf>,
    cfg_type: Option<String>,
    vae: Option<String>,
    device: Option<String>,
    dtype: Option<String>,
    input: Option<PathBuf>,
    output: Option<PathBuf>,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args::default();
    for (flag, value) in support::flag_values(USAGE)? {
        match flag.as_str() {
            "--model" => args.model = Some(value),
            "--params" => args.params = Some(value.into()),
            "--settings" => args.settings = Some(value.into()),
            "--cfg-type" => args.cfg_type = Some(value),
            "--vae" => args.vae = Some(value),
            "--device" => args.device = Some(value),
            "--dtype" => args.dtype = Some(value),
            "--input" => args.input = Some(value.into()),
            "--output" => args.output = Some(value.into()),
            other => return Err(format!("unknown flag {other}\n{USAGE}")),
        }
    }
    Ok(args)
}

fn read(path: &Path) -> Result<String, String> {
    std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))
}

/// Merges the flags into the JSON bodies, so that validation happens once, in the library.
fn configure(args: &Args) -> Result<(StreamDiffusionParams, EngineSettings), String> {
    let mut settings: serde_json::Value = match &args.settings {
        Some(p) => serde_json::from_str(&read(p)?).map_err(|e| format!("{}: {e}", p.display()))?,
        None => serde_json::json!({}),
    };
    for (key, value) in [
        ("cfg_type", &args.cfg_type),
        ("vae", &args.vae),
        ("device", &args.device),
        ("dtype", &args.dtype),
    ] {
        if let Some(v) = value {
            settings[key] = serde_json::Value::String(v.clone());
        }
    }
    let settings = EngineSettings::from_json(&settings.to_string()).map_err(|e| e.to_string())?;
    let mut params: serde_json::Value = match &args.params {
        Some(p) => serde_json::from_str(&read(p)?).map_err(|e| format!("{}: {e}", p.display()))?,
        None => serde_json::json!({}),
    };
    if let Some(model) = &args.model {
        params["model_id"] = serde_json::Value::String(model.clone());
    }
    let params = StreamDiffusionParams::from_json_with(&params.to_string(), &settings)
        .map_err(|e| e.to_string())?;
    Ok((params, settings))
}

fn png_frames(dir: &Path) -> Result<Vec<PathBuf>, String> {
    let entries =
        std::fs::read_dir(dir).map_err(|e| format!("cannot list {}: {e}", dir.display()))?;
    let mut frames: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x.eq_ignore_ascii_case("png")))
        .collect();
    frames.sort();
    if frames.is_empty() {
        return Err(format!("no .png frames in {}", dir.display()));
    }
    Ok(frames)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn run() -> Result<(), String> {
    let args = parse_args()?;
    let input = args
        .input
        .clone()
        .ok_or_else(|| format!("--input is required\n{USAGE}"))?;
    let output = args
        .output
        .clone()
        .ok_or_else(|| format!("--output is required\n{USAGE}"))?;
    let (params, settings) = configure(&args)?;
    let frames = png_frames(&input)?;
    std::fs::create_dir_all(&output)
        .map_err(|e| format!("cannot create {}: {e}", output.display()))?;

    let load = Instant::now();
    let mut stream = StreamDiffusion::new(params, settings).map_err(|e| e.to_string())?;
    let (width, height) = stream.output_size();
    println!(
        "loaded {} in {:.1} s; {}x{}, t_index_list {:?}, cfg {}, vae {}, {} frames",
        stream.params().model_id,
        load.elapsed().as_secs_f64(),
        width,
        height,
        stream.params().t_index_list,
        stream.settings().cfg_type,
        stream.settings().vae,
        frames.len()
    );
    println!("| frame | encode ms | unet ms | decode ms | total ms |");
    println!("|---|---|---|---|---|");
    let mut totals = Vec::with_capacity(frames.len());
    for path in &frames {
        let img = image::open(path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?
            .to_rgb8();
        let (w, h) = img.dimensions();
        let frame = Frame::packed(img.as_raw(), w as usize, h as usize, PixelFormat::Rgb8)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        let out = stream
            .process(&frame)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        let t = stream.timings();
        totals.push(t.total);
        println!(
            "| {} | {:.1} | {:.1} | {:.1} | {:.1} |",
            path.file_name()
                .map(|n| n.to_string_lossy())
                .unwrap_or_default(),
            ms(t.encode),
            ms(t.unet),
            ms(t.decode),
            ms(t.total)
        );
        let name = path.file_name().ok_or("frame without a file name")?;
        let rgb = image::RgbImage::from_raw(out.width as u32, out.height as u32, out.data)
            .ok_or("output buffer does not match its size")?;
        rgb.save(output.join(name))
            .map_err(|e| format!("cannot write {}: {e}", output.join(name).display()))?;
    }
    // The first frame pays for lazy allocations; report steady state from the second on.
    let steady = if totals.len() > 1 {
        &totals[1..]
    } else {
        &totals[..]
    };
    let mean = steady.iter().sum::<Duration>() / steady.len() as u32;
    println!(
        "steady state: {:.1} ms/frame, {:.2} fps over {} frames; wrote {}",
        ms(mean),
        1.0 / mean.as_secs_f64(),
        steady.len(),
        output.display()
    );
    Ok(())
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("img2img: {e}");
            ExitCode::FAILURE
        }
    }
}
