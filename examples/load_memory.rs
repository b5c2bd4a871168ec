//! What loading a ControlNet folder costs in memory: the process's peak anonymous memory (heap:
//! what can run a machine out of memory; sampled every 2 ms while it loads) against the tensors
//! it ends up holding, and its peak resident set (which also counts the weights file's pages in
//! the page cache while they are read where they lie, memory-mapped: pages the kernel takes
//! back at will).
//!
//! ```text
//! cargo run --release --example load_memory -- [--controlnet DIR] [--dtype f32|f16|bf16]
//!     [--max-extra-mib N]
//! ```
//!
//! Default: tests/fixtures/published-root/thibaud/controlnet-sd21-openpose-diffusers (a tiny
//! lone fp16 `.bin`). For the real figure, write a full-size one as thibaud publishes it:
//! `python tests/reference/make_full_size.py --controlnet-only --controlnet-as-published
//! --controlnet-out DIR` (a 729 MB fp16 `diffusion_pytorch_model.bin`).
//!
//! Prints the weights file's size, the bytes of the loaded tensors, the anonymous memory and the
//! resident set before, after and at their peaks. With `--max-extra-mib N` it exits non-zero
//! when the anonymous peak exceeds the tensors by more than N MiB (room for the allocator's and
//! the program's own overheads).

use std::process::ExitCode;

#[path = "support/mod.rs"]
mod support;

use candle_core::{DType, Device};
use sdstream::model::controlnet::ControlNetModel;
use sdstream::model::{checked_backend, weight_names, weights_file};
use support::{anon_rss_kib, fixture, flag_values, peak_rss_kib, rss_kib};

const USAGE: &str =
    "usage: load_memory [--controlnet DIR] [--dtype f32|f16|bf16] [--max-extra-mib N]";

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1 << 20) as f64
}

fn main() -> ExitCode {
    let pairs = match flag_values(USAGE) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    let mut max_extra: Option<u64> = None;
    let mut dir = fixture("published-root/thibaud/controlnet-sd21-openpose-diffusers");
    let mut dtype = DType::F32;
    for (flag, value) in pairs {
        match flag.as_str() {
            "--controlnet" => dir = value,
            "--max-extra-mib" => match value.parse::<u64>() {
                Ok(n) => max_extra = Some(n << 20),
                Err(_) => {
                    eprintln!("--max-extra-mib {value}: a whole number\n{USAGE}");
                    return ExitCode::from(2);
                }
            },
            "--dtype" => {
                dtype = match value.as_str() {
                    "f32" => DType::F32,
                    "f16" => DType::F16,
                    "bf16" => DType::BF16,
                    other => {
                        eprintln!("--dtype {other}: f32, f16 or bf16\n{USAGE}");
                        return ExitCode::from(2);
                    }
                }
            }
            other => {
                eprintln!("unknown flag {other}\n{USAGE}");
                return ExitCode::from(2);
            }
        }
    }
    let dir = std::path::PathBuf::from(dir);
    let file = match weights_file(
        &dir,
        "diffusion_pytorch_model",
        weight_names::prefers_fp16(dtype),
    ) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::FAILURE;
        }
    };
    let file_bytes = std::fs::metadata(&file).map(|m| m.len()).unwrap_or(0);
    let before = rss_kib().unwrap_or(0) * 1024;
    let anon_before = anon_rss_kib().unwrap_or(0) * 1024;
    let loaded_before = checked_backend::loaded_bytes();
    // The anonymous memory's peak, sampled while the load runs (the kernel keeps no peak of it).
    let loading = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let sampler = {
        let loading = loading.clone();
        std::thread::spawn(move || {
            let mut peak = 0u64;
            while loading.load(std::sync::atomic::Ordering::Relaxed) {
                peak = peak.max(anon_rss_kib().unwrap_or(0) * 1024);
                std::thread::sleep(std::time::Duration::from_millis(2));
            }
            peak
        })
    };
    let start = std::time::Instant::now();
    let loaded = ControlNetModel::load(&dir, dtype, &Device::Cpu);
    let seconds = start.elapsed().as_secs_f64();
    loading.store(false, std::sync::atomic::Ordering::Relaxed);
    let anon_peak = sampler
        .join()
        .unwrap_or(0)
        .max(anon_rss_kib().unwrap_or(0) * 1024);
    let net = match loaded {
        Ok(net) => net,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::FAILURE;
        }
    };
    let tensors = checked_backend::loaded_bytes() - loaded_before;
    let after = rss_kib().unwrap_or(0) * 1024;
    let peak = peak_rss_kib().unwrap_or(0) * 1024;
    let anon_above = anon_peak.saturating_sub(anon_before);
    println!(
        "file            {} ({:.1} MiB)",
        file.display(),
        mib(file_bytes)
    );
    println!("dtype           {dtype:?}, loaded in {seconds:.2} s");
    println!("tensors         {:.1} MiB", mib(tensors));
    println!(
        "anonymous       {:.1} MiB before, {:.1} MiB at the peak: {:.1} MiB above, {:.2}x the \
         tensors",
        mib(anon_before),
        mib(anon_peak),
        mib(anon_above),
        anon_above as f64 / tensors.max(1) as f64
    );
    println!(
        "resident        {:.1} MiB before, {:.1} MiB after, {:.1} MiB at the peak: {:.1} MiB \
         above (the file's pages among them)",
        mib(before),
        mib(after),
        mib(peak),
        mib(peak.saturating_sub(before))
    );
    drop(net);
    if let Some(extra) = max_extra
        && anon_above > tensors + extra
    {
        eprintln!(
            "the load's anonymous peak exceeds the tensors by more than {:.0} MiB",
            mib(extra)
        );
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}
