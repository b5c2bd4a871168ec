//! A soak of the threaded Engine: frames from several producer threads, hot updates, reloads,
//! refused updates, flushes and process calls at random for a fixed time, while the process's
//! resident memory is sampled once a second. It prints the counters (which must add up), the
//! errors seen, and the resident-memory slope over the second half of the run, where a leak
//! shows as a steady climb and a healthy engine as noise around zero.
//!
//! ```text
//! cargo run --release --example soak -- [--seconds N] [--seed S] [--model DIR] [--vae DIR]
//! ```
//!
//! Defaults: 900 s on the tiny test checkpoint (tests/fixtures/tiny-sd-turbo, tiny-taesd) at
//! 64×64. Exits non-zero when the counters do not add up or a call panicked.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

#[path = "support/mod.rs"]
mod support;

use support::{fixture, rss_kib};

use sdstream::params::Prompt;
use sdstream::{
    DropPolicy, Engine, EngineOptions, EngineSettings, Frame, PixelFormat, StreamDiffusionParams,
    Submission,
};

const USAGE: &str = "usage: soak [--seconds N] [--seed S] [--model DIR] [--vae DIR]";

struct Args {
    seconds: u64,
    seed: u64,
    model: String,
    vae: String,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        seconds: 900,
        seed: 1,
        model: fixture("tiny-sd-turbo"),
        vae: fixture("tiny-taesd"),
    };
    for (flag, value) in support::flag_values(USAGE)? {
        let number = |v: &str| v.parse::<u64>().map_err(|e| format!("{flag} {v}: {e}"));
        match flag.as_str() {
            "--seconds" => args.seconds = number(&value)?.max(4),
            "--seed" => args.seed = number(&value)?,
            "--model" => args.model = value,
            "--vae" => args.vae = value,
            other => return Err(format!("unknown flag {other}\n{USAGE}")),
        }
    }
    Ok(args)
}

/// xorshift64*: the soak's only source of choices, so a seed replays a run's decisions.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Calls made, refused with an error, and panicked (caught here; there must be none).
#[derive(Default)]
struct Counts {
    calls: AtomicU64,
    refused: AtomicU64,
    panics: AtomicU64,
}

impl Counts {
    fn tally(&self, outcome: std::thread::Result<sdstream::Result<()>>) {
        self.calls.fetch_add(1, Ordering::Relaxed);
        let counter = match outcome {
            Ok(Ok(())) => return,
            Ok(Err(_)) => &self.refused,
            Err(_) => &self.panics,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// Least-squares slope of `(seconds, KiB)` samples, in KiB per minute.
fn slope_kib_per_minute(samples: &[(f64, f64)]) -> f64 {
    let n = samples.len() as f64;
    if n < 2.0 {
        return 0.0;
    }
    let (mx, my) = samples
        .iter()
        .fold((0.0, 0.0), |(a, b), (x, y)| (a + x / n, b + y / n));
    let (num, den) = samples.iter().fold((0.0, 0.0), |(num, den), (x, y)| {
        (num + (x - mx) * (y - my), den + (x - mx) * (x - mx))
    });
    if den == 0.0 { 0.0 } else { num / den * 60.0 }
}

fn params(model: &str, prompt: &str, width: i64, steps: &[i64]) -> StreamDiffusionParams {
    StreamDiffusionParams {
        model_id: model.to_owned(),
        prompt: Prompt::Text(prompt.to_owned()),
        width,
        height: width,
        t_index_list: steps.to_vec(),
        ..StreamDiffusionParams::default()
    }
}

fn run(args: &Args) -> Result<bool, String> {
    let settings = EngineSettings::from_json(
        &serde_json::json!({"vae": args.vae, "allow_any_resolution": true}).to_string(),
    )
    .map_err(|e| e.to_string())?;
    let engine = Engine::new(
        params(&args.model, "a cat", 64, &[20, 35]),
        settings,
        EngineOptions {
            drop_policy: DropPolicy::Latest,
            queue_capacity: 4,
            ..EngineOptions::default()
        },
    )
    .map_err(|e| e.to_string())?;
    let stop = AtomicBool::new(false);
    let counts = Counts::default();
    let start = Instant::now();
    let run_for = Duration::from_secs(args.seconds);
    let mut samples: Vec<(f64, f64)> = Vec::new();
    thread::scope(|scope| {
        for producer in 0..3u64 {
            let (engine, stop, counts) = (&engine, &stop, &counts);
            let seed = args.seed.wrapping_add(producer + 1) | 1;
            scope.spawn(move || {
                let mut rng = Rng(seed);
                let mut pixels = vec![0u8; 96 * 96 * 4];
                while !stop.load(Ordering::Relaxed) {
                    let side = [48usize, 64, 96][rng.below(3) as usize];
                    let format = [PixelFormat::Rgb8, PixelFormat::Rgba8, PixelFormat::Bgra8]
                        [rng.below(3) as usize];
                    let len = side * side * format.bytes_per_pixel();
                    for b in &mut pixels[..len] {
                        *b = rng.next() as u8;
                    }
                    let outcome = catch_unwind(AssertUnwindSafe(|| {
                        let frame = Frame::packed(&pixels[..len], side, side, format)?;
                        match rng.below(10) {
                            0 => engine
                                .process(Submission::new(frame).timestamp(7))
                                .map(|_| ()),
                            _ => engine.submit(frame).map(|_| ()),
                        }
                    }));
                    counts.tally(outcome);
                    while engine.poll().is_some() {}
                    thread::sleep(Duration::from_millis(rng.below(20)));
                }
            });
        }
        let (engine, stop, counts) = (&engine, &stop, &counts);
        let model = args.model.as_str();
        let seed = args.seed;
        scope.spawn(move || {
            let mut rng = Rng(seed.wrapping_mul(31) | 1);
            while !stop.load(Ordering::Relaxed) {
                let prompts = ["a cat", "a dog", "a boat", "flowers"];
                let prompt = prompts[rng.below(4) as usize];
                let outcome = catch_unwind(AssertUnwindSafe(|| match rng.below(20) {
                    // Reloads: another size or another number of steps.
                    0 => engine
                        .update_params(params(model, prompt, 96, &[20, 35]))
                        .map(|_| ()),
                    1 => engine
                        .update_params(params(model, prompt, 64, &[10, 20, 35]))
                        .map(|_| ()),
                    // Refused: a missing model and an invalid value; nothing may change.
                    2 => engine
                        .update_params(params("no/such-model", prompt, 64, &[20]))
                        .map(|_| ()),
                    3 => engine
                        .update_params(params(model, "", 64, &[20]))
                        .map(|_| ()),
                    4 => {
                        engine.flush();
                        Ok(())
                    }
                    _ => engine
                        .update_params(params(model, prompt, 64, &[20, 35]))
                        .map(|_| ()),
                }));
                counts.tally(outcome);
                let _ = engine.status_json();
                thread::sleep(Duration::from_millis(200 + rng.below(800)));
            }
        });
        while start.elapsed() < run_for {
            thread::sleep(Duration::from_secs(1));
            if let Some(kib) = rss_kib() {
                samples.push((start.elapsed().as_secs_f64(), kib as f64));
            }
        }
        stop.store(true, Ordering::Relaxed);
    });
    engine.close();
    let status = engine.status();
    let queued = status.queue_depth as u64 + status.frames_in_flight;
    let balanced = status.frames_submitted
        == status.frames_processed + status.frames_failed + status.frames_dropped + queued;
    let second_half = &samples[samples.len() / 2..];
    let (first_kib, last_kib) = (
        samples.first().map_or(0.0, |s| s.1),
        samples.last().map_or(0.0, |s| s.1),
    );
    println!(
        "soak: {} s, {} calls ({} refused with an error, {} panics)",
        args.seconds,
        counts.calls.load(Ordering::Relaxed),
        counts.refused.load(Ordering::Relaxed),
        counts.panics.load(Ordering::Relaxed)
    );
    println!(
        "frames: submitted {} = processed {} + failed {} + dropped {} + queued {} ({}); \
         restarts {}, reload failures {}, errors {}",
        status.frames_submitted,
        status.frames_processed,
        status.frames_failed,
        status.frames_dropped,
        queued,
        if balanced { "balanced" } else { "NOT BALANCED" },
        status.restart_count,
        status.reload_failures,
        status.error_count
    );
    println!(
        "rss: {:.1} MiB at 1 s, {:.1} MiB at the end; slope over the second half {:.1} KiB/min \
         ({} samples)",
        first_kib / 1024.0,
        last_kib / 1024.0,
        slope_kib_per_minute(second_half),
        second_half.len()
    );
    Ok(balanced && counts.panics.load(Ordering::Relaxed) == 0)
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    match run(&args) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("soak: {e}");
            ExitCode::FAILURE
        }
    }
}
