//! What the threaded Engine costs per frame over calling `StreamDiffusion::process` directly.
//!
//! ```text
//! cargo run --release --example engine_overhead -- [--frames N] [--size PIXELS]
//!     [--model DIR_OR_ID] [--vae taesd|full|DIR]
//! ```
//!
//! Defaults: the tiny test checkpoint (tests/fixtures/tiny-sd-turbo with tiny-taesd) at 64×64,
//! 200 frames after 10 warm-up frames. Per frame, the overhead is the time from `submit` to the
//! output coming out of `recv_timeout`, minus the pipeline call's own time inside the worker
//! (`Output::timings.total`): the frame copy, queueing, two thread hand-offs and the output
//! hand-back. The direct loop's per-frame time is printed beside it for scale.

use std::process::ExitCode;
use std::time::{Duration, Instant};

#[path = "support/mod.rs"]
mod support;

use support::fixture;

use sdstream::{
    DropPolicy, Engine, EngineOptions, EngineSettings, Frame, PixelFormat, StreamDiffusion,
    StreamDiffusionParams,
};

const USAGE: &str = "usage: engine_overhead [--frames N] [--size PIXELS] [--model DIR_OR_ID] [--vae taesd|full|DIR]";

struct Args {
    frames: usize,
    size: usize,
    model: String,
    vae: String,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        frames: 200,
        size: 64,
        model: fixture("tiny-sd-turbo"),
        vae: fixture("tiny-taesd"),
    };
    for (flag, value) in support::flag_values(USAGE)? {
        let number = |v: &str| v.parse::<usize>().map_err(|e| format!("{flag} {v}: {e}"));
        match flag.as_str() {
            "--frames" => args.frames = number(&value)?.max(1),
            "--size" => args.size = number(&value)?,
            "--model" => args.model = value,
            "--vae" => args.vae = value,
            other => return Err(format!("unknown flag {other}\n{USAGE}")),
        }
    }
    Ok(args)
}

/// A moving test pattern, so consecutive frames differ.
fn pattern(size: usize, t: usize) -> Vec<u8> {
    let mut data = Vec::with_capacity(size * size * 3);
    for y in 0..size {
        for x in 0..size {
            data.push(((x + t) * 255 / size) as u8);
            data.push(((y + 2 * t) * 255 / size) as u8);
            data.push(((x + y + t) * 127 / size) as u8);
        }
    }
    data
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// (median, p95) in ms of signed millisecond samples.
fn median_p95(mut v: Vec<f64>) -> (f64, f64) {
    v.sort_by(f64::total_cmp);
    let at = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize];
    (at(0.5), at(0.95))
}

fn run() -> Result<(), String> {
    let args = parse_args()?;
    let settings = EngineSettings {
        vae: args.vae.clone().into(),
        allow_any_resolution: true,
        ..EngineSettings::default()
    };
    let params = StreamDiffusionParams {
        model_id: args.model.clone(),
        width: args.size as i64,
        height: args.size as i64,
        ..StreamDiffusionParams::default()
    };
    let warm = 10;
    let inputs: Vec<Vec<u8>> = (0..warm + args.frames)
        .map(|t| pattern(args.size, t))
        .collect();
    let frame = |i: usize| Frame::packed(&inputs[i], args.size, args.size, PixelFormat::Rgb8);

    let mut direct =
        StreamDiffusion::new(params.clone(), settings.clone()).map_err(|e| e.to_string())?;
    let mut direct_ms = Vec::with_capacity(args.frames);
    for i in 0..warm + args.frames {
        let f = frame(i).map_err(|e| e.to_string())?;
        let t = Instant::now();
        direct.process(&f).map_err(|e| e.to_string())?;
        if i >= warm {
            direct_ms.push(ms(t.elapsed()));
        }
    }
    drop(direct);

    let options = EngineOptions {
        drop_policy: DropPolicy::Lossless,
        warmup: false,
        ..EngineOptions::default()
    };
    let engine = Engine::new(params, settings, options).map_err(|e| e.to_string())?;
    let mut round_trip_ms = Vec::with_capacity(args.frames);
    let mut overhead_ms = Vec::with_capacity(args.frames);
    for i in 0..warm + args.frames {
        let f = frame(i).map_err(|e| e.to_string())?;
        let t = Instant::now();
        engine.submit(f).map_err(|e| e.to_string())?;
        let out = engine
            .recv_timeout(Duration::from_secs(60))
            .map_err(|e| e.to_string())?
            .ok_or("no output within 60 s")?;
        let round_trip = t.elapsed();
        if i >= warm {
            round_trip_ms.push(ms(round_trip));
            overhead_ms.push(ms(round_trip) - ms(out.timings.total));
        }
    }
    engine.close();

    let (d50, d95) = median_p95(direct_ms);
    let (r50, r95) = median_p95(round_trip_ms);
    let (o50, o95) = median_p95(overhead_ms);
    println!(
        "engine overhead, {} frames of {}×{} ({}), CPU, f32",
        args.frames, args.size, args.size, args.model
    );
    println!("{:<40} {:>10} {:>10}", "", "median ms", "p95 ms");
    println!(
        "{:<40} {:>10.3} {:>10.3}",
        "StreamDiffusion::process (direct)", d50, d95
    );
    println!(
        "{:<40} {:>10.3} {:>10.3}",
        "Engine submit → recv_timeout", r50, r95
    );
    println!(
        "{:<40} {:>10.3} {:>10.3}",
        "Engine overhead (round trip − pipeline)", o50, o95
    );
    Ok(())
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("engine_overhead: {e}");
            ExitCode::FAILURE
        }
    }
}
