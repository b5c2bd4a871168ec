//! What a stream costs when its weights are shared: the process's resident memory with 1, 5 and
//! 20 `Engine`s on one model (each has processed frames, so its stream state and buffers
//! exist), compared with the size of the weights the model pool holds, and after every engine
//! is dropped.
//!
//! ```text
//! cargo run --example pool_memory -- [--model DIR] [--vae DIR] [--size N]
//!     [--streams 1,5,20] [--frames N] [--dtype f32|f16|bf16] [--max-share 0.10]
//! ```
//!
//! Defaults: the tiny test checkpoint (tests/fixtures/tiny-sd-turbo, tiny-taesd) at 64×64, one
//! frame per stream. For real figures give a full-size checkpoint (tests/reference/
//! make_full_size.py writes random weights in sd-turbo's shapes) and `--size 256` or more.
//!
//! Prints one row per stream count: RSS, its anonymous part (heap; the rest is the program's code
//! and mapped files), RSS above the process before any model was loaded, and the RSS each stream
//! after the first added, in MiB and as a share of the weights' size. Then the RSS after
//! dropping every engine, and again after asking the allocator to give its free pages back
//! (glibc `malloc_trim`; freed memory can stay in the allocator's arenas, counted in RSS, until
//! then). Exits non-zero when the pool still holds an entry after the engines are gone, or,
//! with `--max-share S`, when a stream after the first costs more than S times the weights (the
//! tiny checkpoint's 16 MiB of weights are smaller than a stream's fixed costs, so the rule is
//! only meaningful for real-sized weights).

use std::process::ExitCode;

#[path = "support/mod.rs"]
mod support;

use support::{anon_rss_kib, fixture, peak_rss_kib, rss_kib};

use sdstream::model::pool::ModelPool;
use sdstream::params::{DTypeChoice, Prompt, VaeChoice};
use sdstream::{Engine, EngineOptions, EngineSettings, Frame, PixelFormat, StreamDiffusionParams};

const USAGE: &str = "usage: pool_memory [--model DIR] [--vae DIR] [--size N] [--streams 1,5,20] \
                     [--frames N] [--dtype f32|f16|bf16] [--max-share S]";

struct Args {
    model: String,
    vae: String,
    size: usize,
    streams: Vec<usize>,
    frames: usize,
    dtype: DTypeChoice,
    /// The most a stream after the first may add, as a share of the weights.
    max_share: Option<f64>,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        model: fixture("tiny-sd-turbo"),
        vae: fixture("tiny-taesd"),
        size: 64,
        streams: vec![1, 5, 20],
        frames: 1,
        dtype: DTypeChoice::F32,
        max_share: None,
    };
    for (flag, value) in support::flag_values(USAGE)? {
        let number = |v: &str| v.parse::<usize>().map_err(|e| format!("{flag} {v}: {e}"));
        match flag.as_str() {
            "--model" => args.model = value,
            "--vae" => args.vae = value,
            "--size" => args.size = number(&value)?,
            "--frames" => args.frames = number(&value)?,
            "--streams" => {
                args.streams = value
                    .split(',')
                    .map(|v| number(v.trim()))
                    .collect::<Result<_, _>>()?;
                args.streams.sort_unstable();
                args.streams.dedup();
                if args.streams.first() != Some(&1) {
                    return Err(format!("--streams must start at 1\n{USAGE}"));
                }
            }
            "--max-share" => {
                args.max_share = Some(value.parse().map_err(|e| format!("{flag} {value}: {e}"))?)
            }
            "--dtype" => {
                args.dtype = serde_json::from_value(serde_json::Value::String(value.clone()))
                    .map_err(|e| format!("--dtype {value}: {e}"))?
            }
            other => return Err(format!("unknown flag {other}\n{USAGE}")),
        }
    }
    Ok(args)
}

/// Returns the allocator's free pages to the OS where the allocator can be asked (glibc).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn trim_allocator() -> bool {
    unsafe extern "C" {
        fn malloc_trim(pad: usize) -> std::ffi::c_int;
    }
    // SAFETY: malloc_trim takes no pointers; it only releases free memory at the top of the
    // heap and whole free pages inside the arenas.
    unsafe { malloc_trim(0) };
    true
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn trim_allocator() -> bool {
    false
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// A smooth RGB test picture, different for each stream so no two inputs are equal.
fn test_frame(size: usize, stream: usize) -> Vec<u8> {
    let mut data = Vec::with_capacity(size * size * 3);
    for y in 0..size {
        for x in 0..size {
            data.push((x * 255 / size) as u8);
            data.push((y * 255 / size) as u8);
            data.push(((x + y + 37 * stream) % 256) as u8);
        }
    }
    data
}

fn run(args: &Args) -> Result<bool, String> {
    let rss = || rss_kib().ok_or("no /proc/self/status: RSS is read on Linux only");
    let anon = || anon_rss_kib().unwrap_or(0);
    let settings = EngineSettings {
        vae: VaeChoice::Custom(args.vae.clone()),
        dtype: args.dtype,
        allow_any_resolution: true,
        ..EngineSettings::default()
    };
    let params = StreamDiffusionParams {
        model_id: args.model.clone(),
        prompt: Prompt::Text("a watercolor of a lighthouse".into()),
        width: args.size as i64,
        height: args.size as i64,
        ..StreamDiffusionParams::default()
    };
    let options = EngineOptions {
        warmup: false,
        ..EngineOptions::default()
    };
    let pool = ModelPool::global();
    let before = rss()?;
    let before_anon = anon();
    println!(
        "model {} ({}, TAESD {}), {}×{}, {} frame(s) per stream",
        args.model, args.dtype, args.vae, args.size, args.size, args.frames
    );
    println!(
        "RSS before loading: {:.1} MiB (anon {:.1} MiB)",
        mib(before),
        mib(before_anon)
    );

    let mut engines: Vec<Engine> = Vec::new();
    let mut rows: Vec<(usize, u64, u64)> = Vec::new();
    for &target in &args.streams {
        while engines.len() < target {
            let n = engines.len();
            let engine = Engine::new(params.clone(), settings.clone(), options.clone())
                .map_err(|e| format!("stream {n}: {e}"))?;
            let input = test_frame(args.size, n);
            let frame = Frame::packed(&input, args.size, args.size, PixelFormat::Rgb8)
                .map_err(|e| e.to_string())?;
            for _ in 0..args.frames {
                engine
                    .process(frame)
                    .map_err(|e| format!("stream {n}: {e}"))?;
            }
            engines.push(engine);
        }
        rows.push((target, rss()?, anon()));
    }

    let entries = pool.entries();
    let [entry] = entries.as_slice() else {
        return Err(format!("expected one pool entry, found {}", entries.len()));
    };
    let weights_kib = entry.total_bytes() / 1024;
    println!(
        "weights in the pool: {:.1} MiB ({} holders, {} load(s), {} reuse(s))",
        mib(weights_kib),
        entry.holders,
        pool.stats().loads,
        pool.stats().reuses
    );
    println!();
    println!(
        "| streams | RSS MiB | anon MiB | above start MiB | per extra stream MiB | per extra \
         stream % of weights |"
    );
    println!("|---:|---:|---:|---:|---:|---:|");
    let (_, one, _) = rows[0];
    let mut worst_share: f64 = 0.0;
    for &(n, kib, anon_kib) in &rows {
        let (extra, share) = if n > 1 {
            let per = (kib as f64 - one as f64) / (n - 1) as f64;
            let share = per / weights_kib as f64;
            worst_share = worst_share.max(share);
            (
                format!("{:.1}", per / 1024.0),
                format!("{:.2} %", share * 100.0),
            )
        } else {
            ("–".into(), "–".into())
        };
        println!(
            "| {n} | {:.1} | {:.1} | {:.1} | {extra} | {share} |",
            mib(kib),
            mib(anon_kib),
            mib(kib.saturating_sub(before))
        );
    }
    println!();
    println!(
        "peak RSS so far: {:.1} MiB",
        peak_rss_kib().map_or(f64::NAN, mib)
    );

    drop(engines);
    let dropped = rss()?;
    let left = pool.entries().len();
    println!(
        "after dropping every engine: RSS {:.1} MiB (anon {:.1} MiB; {:.1} MiB above start), \
         {left} pool entries",
        mib(dropped),
        mib(anon()),
        mib(dropped.saturating_sub(before))
    );
    if trim_allocator() {
        let trimmed = rss()?;
        println!(
            "after malloc_trim(0): RSS {:.1} MiB (anon {:.1} MiB; {:.1} MiB above start)",
            mib(trimmed),
            mib(anon()),
            mib(trimmed.saturating_sub(before))
        );
    }
    let within = args.max_share.is_none_or(|max| worst_share <= max);
    if !within {
        println!(
            "FAIL: a stream after the first costs {:.2} % of the weights, over {:.2} %",
            worst_share * 100.0,
            args.max_share.unwrap_or_default() * 100.0
        );
    }
    if left != 0 {
        println!("FAIL: the pool still holds {left} entries with no engine left");
    }
    Ok(within && left == 0)
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(args) => args,
        Err(message) => {
            eprintln!("{message}");
            return ExitCode::from(2);
        }
    };
    match run(&args) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(message) => {
            eprintln!("pool_memory: {message}");
            ExitCode::FAILURE
        }
    }
}
