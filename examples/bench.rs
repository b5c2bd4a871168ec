//! The benchmark table of docs/ARCHITECTURE.md ("Performance"): per-stage milliseconds and fps
//! of the synchronous pipeline for each resolution × step count × autoencoder, with the machine's
//! measured f32 matmul peak beside it. Same settings as tests/reference/bench_reference.py (cfg
//! self, guidance 1.2, delta 0.7, 50-step grid, prompt "flowers", seed 789), so the two tables
//! compare.
//!
//! ```text
//! cargo run --release -p sdstream --example bench -- --model MODEL_DIR --taesd TAESD_DIR \
//!     [--sizes 256,512] [--frames 3] [--warmup 1] [--dtype f32] [--against f32] [--device cpu] \
//!     [--controlnet CONTROLNET_DIR --controlnet-counts 0,1,2,5] [--sync-stages on|off]
//! ```
//! `bench multi-stream FLAGS` and `bench processors FLAGS` run examples/multi_stream_bench and
//! examples/processors_bench instead (the GPU kit carries this one binary).
//! `--model` and `--taesd` default to the environment variables `SDSTREAM_BENCH_MODEL` and
//! `SDSTREAM_BENCH_TAESD` (`--taesd` is needed only when the TAESD rows run). Full-size random
//! weights are made by tests/reference/make_full_size.py (never committed), which reads the same
//! variables for where to write them.
//! With `--controlnet`, each row is repeated per ControlNet count: N copies of that net (linked
//! under N folder names, so they load as N distinct nets), scale 0.5, canny preprocessing.
//! `--against f32` (or another dtype) also runs every row's frames through the networks loaded in
//! that dtype and prints how far this dtype's pictures are from those, in 8-bit levels (worst
//! frame's max and mean absolute difference): bf16 against f32, say.
//! `--sync-stages` (default: on for a GPU, off for the CPU) waits for the device at the end of
//! every stage so that the per-stage columns measure each stage's own work
//! (`StreamDiffusion::set_stage_sync`); off, a GPU's stages only queue work and the total is the
//! honest figure. Columns: upload (frame resize and conversion, copy to the device), encode,
//! UNet, ControlNet (preprocessors and nets), decode, download (copy back, 8-bit quantisation),
//! the total as the host saw it (mean, best, and the median and 99th-percentile frame: host
//! frame in to host frame out), and on a GPU the memory in use after the row's frames (the
//! device's total less its free memory). docs/GPU.md runs it on a GPU.

use std::process::ExitCode;

#[path = "support/multi_stream.rs"]
mod multi_stream;
#[path = "support/processors.rs"]
mod processors;
#[path = "support/mod.rs"]
mod support;
use std::time::{Duration, Instant};

use candle_core::{Device, Tensor};
use sdstream::{EngineSettings, Frame, PixelFormat, StreamDiffusion, StreamDiffusionParams};
use serde_json::json;

// As the C ABI, the Python module and the server have it: large freed blocks kept for reuse
// (sdstream::alloc; `SDSTREAM_REUSE_MB=0` runs on the system allocator alone).
#[global_allocator]
static ALLOCATOR: sdstream::alloc::ReusingAllocator = sdstream::alloc::ReusingAllocator::new();

struct Args {
    model: String,
    taesd: Option<String>,
    sizes: Vec<usize>,
    frames: usize,
    warmup: usize,
    dtype: String,
    against: Option<String>,
    device: String,
    vaes: Vec<String>,
    t_index_lists: Vec<Vec<usize>>,
    controlnet: Option<String>,
    controlnet_counts: Vec<usize>,
    sync_stages: Option<bool>,
}

/// The environment variables that stand in for `--model` and `--taesd`.
const MODEL_VAR: &str = "SDSTREAM_BENCH_MODEL";
const TAESD_VAR: &str = "SDSTREAM_BENCH_TAESD";

/// A non-empty environment variable.
fn env_var(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

fn parse() -> Result<Args, String> {
    let mut model = env_var(MODEL_VAR);
    let mut a = Args {
        model: String::new(),
        taesd: env_var(TAESD_VAR),
        sizes: vec![256, 512],
        frames: 3,
        warmup: 1,
        dtype: "f32".into(),
        against: None,
        device: "cpu".into(),
        vaes: vec!["taesd".into(), "full".into()],
        t_index_lists: vec![vec![32], vec![12, 20, 32]],
        controlnet: None,
        controlnet_counts: vec![0, 1, 2, 5],
        sync_stages: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let v = it.next().ok_or(format!("{flag} needs a value"))?;
        let list = |v: &str| -> Result<Vec<usize>, String> {
            v.split(',')
                .map(|x| x.trim().parse().map_err(|e| format!("{flag}: {x}: {e}")))
                .collect()
        };
        match flag.as_str() {
            "--model" => model = Some(v),
            "--taesd" => a.taesd = Some(v),
            "--sizes" => a.sizes = list(&v)?,
            "--frames" => a.frames = v.parse().map_err(|e| format!("--frames: {e}"))?,
            "--warmup" => a.warmup = v.parse().map_err(|e| format!("--warmup: {e}"))?,
            "--dtype" => a.dtype = v,
            "--against" => a.against = Some(v),
            "--device" => a.device = v,
            "--controlnet" => a.controlnet = Some(v),
            "--controlnet-counts" => a.controlnet_counts = list(&v)?,
            "--vaes" => a.vaes = v.split(',').map(String::from).collect(),
            "--sync-stages" => {
                a.sync_stages = Some(match v.as_str() {
                    "on" => true,
                    "off" => false,
                    _ => return Err(format!("--sync-stages: on or off, not {v:?}")),
                })
            }
            "--t-index-lists" => {
                a.t_index_lists = v.split(';').map(list).collect::<Result<_, _>>()?
            }
            other => return Err(format!("unknown flag {other}")),
        }
    }
    a.model = model.ok_or(format!(
        "no model: pass --model DIR or set {MODEL_VAR} (a diffusers folder shaped like \
         stabilityai/sd-turbo; tests/reference/make_full_size.py writes one with random weights)"
    ))?;
    if a.taesd.is_none() && a.vaes.iter().any(|v| v == "taesd") {
        return Err(format!(
            "no TAESD: pass --taesd DIR or set {TAESD_VAR} (a madebyollin/taesd-shaped folder), \
             or leave taesd out of --vaes"
        ));
    }
    Ok(a)
}

/// Best f32 GFLOP/s of a 2048² matmul on `device` (what the machine can do at best).
fn matmul_peak(device: &Device) -> Result<f64, String> {
    let n = 2048;
    let a = Tensor::randn(0f32, 1.0, (n, n), device).map_err(|e| e.to_string())?;
    let b = Tensor::randn(0f32, 1.0, (n, n), device).map_err(|e| e.to_string())?;
    let mut best = Duration::MAX;
    for _ in 0..5 {
        let t = Instant::now();
        let c = a.matmul(&b).map_err(|e| e.to_string())?;
        c.sum_all()
            .and_then(|s| s.to_scalar::<f32>())
            .map_err(|e| e.to_string())?;
        best = best.min(t.elapsed());
    }
    Ok(2.0 * (n as f64).powi(3) / best.as_secs_f64() / 1e9)
}

/// GiB of the GPU's memory in use (device total less free, so other processes' too): what a
/// stream holds once its frames have run. None on the CPU.
fn gpu_memory_gib(device: &Device) -> Option<f64> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(d) = device {
        let (free, total) = d.cuda_stream().context().mem_get_info().ok()?;
        return Some((total - free) as f64 / (1u64 << 30) as f64);
    }
    let _ = device;
    None
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// `count` distinct ControlNet ids for one net folder: symbolic links under a scratch folder.
fn controlnet_ids(dir: &str, count: usize) -> Result<Vec<String>, String> {
    let target = std::fs::canonicalize(dir).map_err(|e| format!("{dir}: {e}"))?;
    let scratch = std::env::temp_dir().join(format!("sdstream-bench-{}", std::process::id()));
    std::fs::create_dir_all(&scratch).map_err(|e| format!("{}: {e}", scratch.display()))?;
    (0..count)
        .map(|i| {
            let link = scratch.join(format!("controlnet-{i}"));
            if !link.exists() {
                std::os::unix::fs::symlink(&target, &link)
                    .map_err(|e| format!("{}: {e}", link.display()))?;
            }
            Ok(link.display().to_string())
        })
        .collect()
}

fn run() -> Result<(), String> {
    let args = parse()?;
    let counts = match &args.controlnet {
        Some(_) => args.controlnet_counts.clone(),
        None => vec![0],
    };
    let settings_in = |vae: &str, dtype: &str| -> Result<EngineSettings, String> {
        let vae = match (vae, &args.taesd) {
            ("taesd", Some(dir)) => dir.clone(),
            _ => vae.to_string(),
        };
        EngineSettings::from_json(
            &json!({"vae": vae, "dtype": dtype, "device": args.device, "cfg_type": "self", "allow_any_resolution": true})
                .to_string(),
        )
        .map_err(|e| e.to_string())
    };
    let settings = |vae: &str| settings_in(vae, &args.dtype);
    let device = settings("full")?
        .device
        .device()
        .map_err(|e| e.to_string())?;
    let sync_stages = args.sync_stages.unwrap_or(!device.is_cpu());
    let peak_before = matmul_peak(&device)?;
    // The most memory Winograd's kernel kept for its weights' transforms after any row.
    let mut winograd_gb_max = 0f64;
    let mut rows = Vec::new();
    for vae in &args.vaes {
        // One load per autoencoder; streams of every size and step count share it.
        let s = settings(vae)?;
        let load = Instant::now();
        let models = std::sync::Arc::new(
            sdstream::model::bundle::StableDiffusionModels::load(&args.model, &s, &mut |l| {
                eprintln!("{l}")
            })
            .map_err(|e| e.to_string())?,
        );
        eprintln!(
            "loaded with vae {vae} in {:.1} s",
            load.elapsed().as_secs_f64()
        );
        let against = match &args.against {
            Some(dtype) => {
                let s = settings_in(vae, dtype)?;
                let models = sdstream::model::bundle::StableDiffusionModels::load(
                    &args.model,
                    &s,
                    &mut |l| eprintln!("{l}"),
                )
                .map_err(|e| e.to_string())?;
                Some((std::sync::Arc::new(models), s))
            }
            None => None,
        };
        for &size in &args.sizes {
            for t_index in &args.t_index_lists {
                for &nets in &counts {
                    let ids = match &args.controlnet {
                        Some(dir) => controlnet_ids(dir, nets)?,
                        None => Vec::new(),
                    };
                    let controlnets: Vec<serde_json::Value> = ids
                    .iter()
                    .map(|id| json!({"model_id": id, "conditioning_scale": 0.5, "preprocessor": "canny"}))
                    .collect();
                    let params = StreamDiffusionParams::from_json_with(
                        &json!({
                            "model_id": args.model, "prompt": "flowers",
                            "negative_prompt": "blurry, low quality, flat, 2d", "seed": 789,
                            "num_inference_steps": 50, "t_index_list": t_index,
                            "guidance_scale": 1.2, "delta": 0.7, "width": size, "height": size,
                            "controlnets": controlnets,
                            // The reference runs no checker; its cost is in
                            // examples/safety_checker_bench.
                            "use_safety_checker": false,
                        })
                        .to_string(),
                        &s,
                    )
                    .map_err(|e| e.to_string())?;
                    let mut stream =
                        StreamDiffusion::with_models(models.clone(), params, s.clone())
                            .map_err(|e| e.to_string())?;
                    stream.set_stage_sync(sync_stages);
                    let pixels: Vec<u8> =
                        (0..size * size * 3).map(|i| (i * 7 % 251) as u8).collect();
                    let frame = Frame::packed(&pixels, size, size, PixelFormat::Rgb8)
                        .map_err(|e| e.to_string())?;
                    let mut outputs = Vec::new();
                    for _ in 0..args.warmup {
                        outputs.push(stream.process(&frame).map_err(|e| e.to_string())?.data);
                    }
                    let mut sum = [Duration::ZERO; 7];
                    let mut best = Duration::MAX;
                    let mut totals = Vec::with_capacity(args.frames);
                    for _ in 0..args.frames {
                        outputs.push(stream.process(&frame).map_err(|e| e.to_string())?.data);
                        let t = stream.timings();
                        for (acc, d) in sum.iter_mut().zip([
                            t.encode,
                            t.unet,
                            t.controlnet,
                            t.decode,
                            t.preprocess,
                            t.postprocess,
                            t.total,
                        ]) {
                            *acc += d;
                        }
                        best = best.min(t.total);
                        totals.push(t.total);
                    }
                    let (p50, p99) = (percentile(&mut totals, 0.50), percentile(&mut totals, 0.99));
                    let mean: Vec<f64> = sum.iter().map(|d| ms(*d) / args.frames as f64).collect();
                    let levels = match &against {
                        Some((models, s)) => {
                            let mut other = StreamDiffusion::with_models(
                                models.clone(),
                                stream.params().clone(),
                                s.clone(),
                            )
                            .map_err(|e| e.to_string())?;
                            let (mut max, mut mean_levels) = (0u8, 0f64);
                            for ours in &outputs {
                                let theirs = other.process(&frame).map_err(|e| e.to_string())?.data;
                                let diffs = ours.iter().zip(&theirs).map(|(a, b)| a.abs_diff(*b));
                                let (m, total) = diffs
                                    .fold((0u8, 0u64), |(m, t), d| (m.max(d), t + u64::from(d)));
                                max = max.max(m);
                                mean_levels = mean_levels.max(total as f64 / ours.len() as f64);
                            }
                            format!(" {max} / {mean_levels:.2} |")
                        }
                        None => String::new(),
                    };
                    let memory = gpu_memory_gib(&device)
                        .map_or_else(|| "-".to_string(), |g| format!("{g:.2}"));
                    let winograd_gb =
                        sdstream::model::kernels::winograd_weight_bytes() as f64 / 1e9;
                    winograd_gb_max = winograd_gb_max.max(winograd_gb);
                    eprintln!(
                        "{size}² {t_index:?} {vae} {nets} ControlNets: {:.2} ms/frame \
                         (Winograd's weight transforms held: {winograd_gb:.2} GB)",
                        mean[6]
                    );
                    rows.push(format!(
                    "| {size}² | {} ({}) | {vae} | {nets} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {:.1} | {:.2} | {:.2} | {:.2} | {memory} |{levels}",
                    t_index.len(),
                    t_index.iter().map(|t| t.to_string()).collect::<Vec<_>>().join(","),
                    mean[4],
                    mean[0],
                    mean[1],
                    mean[2],
                    mean[3],
                    mean[5],
                    mean[6],
                    1e3 / mean[6],
                    ms(best),
                    ms(p50),
                    ms(p99),
                ));
                }
            }
        }
    }
    let peak_after = matmul_peak(&device)?;
    println!(
        "sdstream {}, {} {}, {} threads, cfg self, guidance 1.2, delta 0.7; {} timed frames after {} warm-up; \
         stage sync {}; f32 matmul peak {:.0} GFLOP/s before, {:.0} after; Winograd's weight \
         transforms up to {winograd_gb_max:.2} GB; kernel policy: {}",
        env!("CARGO_PKG_VERSION"),
        args.device,
        args.dtype,
        candle_core::utils::get_num_threads(),
        args.frames,
        args.warmup,
        if sync_stages { "on" } else { "off" },
        peak_before,
        peak_after,
        multi_stream::policy_summary(device.is_cuda()),
    );
    let (against_header, against_rule) = match &args.against {
        Some(dtype) => (format!(" vs {dtype}: max / mean levels |"), "---|"),
        None => (String::new(), ""),
    };
    println!(
        "| size | steps (t_index_list) | VAE | ControlNets | upload ms | encode ms | UNet ms | ControlNet ms | decode ms | download ms | total ms | fps | best total ms | p50 ms | p99 ms | GPU memory GiB |{against_header}"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|{against_rule}");
    for r in rows {
        println!("{r}");
    }
    if let Some(line) = multi_stream::cudnn_attention_summary() {
        println!("{line}");
    }
    if let Some(line) = multi_stream::conv_engines_summary() {
        println!("{line}");
    }
    Ok(())
}

/// The frame time at quantile `q` of `times` (nearest rank: the smallest time that at least
/// `q` of the frames do not exceed); zero for no frames.
fn percentile(times: &mut [Duration], q: f64) -> Duration {
    if times.is_empty() {
        return Duration::ZERO;
    }
    times.sort_unstable();
    let rank = (q * times.len() as f64).ceil() as usize;
    times[rank.clamp(1, times.len()) - 1]
}

fn main() -> ExitCode {
    // `bench multi-stream FLAGS`: N streams batched across streams (the GPU kit carries one
    // bench binary).
    if std::env::args().nth(1).as_deref() == Some("multi-stream") {
        return multi_stream::main(std::env::args().skip(2).collect());
    }
    // `bench processors FLAGS`: each image processor's time a frame (examples/processors_bench).
    if std::env::args().nth(1).as_deref() == Some("processors") {
        return processors::main(std::env::args().skip(2).collect());
    }
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench: {e}");
            ExitCode::FAILURE
        }
    }
}
