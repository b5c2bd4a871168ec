//! Many streams on one machine: aggregate fps and per-frame latency of N streams, each an
//! [`Engine`] fed flat out by its own host thread, with their UNet calls batched across streams
//! (`cross_stream_batching`, the default) against one engine per stream running its own calls
//! (batching off). Both modes share the same loaded weights (one model pool); they run
//! alternately, each N `--repeats` times, so that drift of the machine (heat, other load) falls
//! on both.
//!
//! Run as `examples/multi_stream_bench.rs`, or as `bench multi-stream FLAGS` (the GPU kit
//! carries the one bench binary):
//!
//! ```text
//! cargo run --release -p sdstream --example multi_stream_bench -- --model MODEL_DIR \
//!     --taesd TAESD_DIR [--streams 1,2,4,8] [--size 256] [--t-index-list 32] [--frames 6] \
//!     [--warmup 2] [--repeats 1] [--device cpu] [--dtype f32] [--budget-ms MS] \
//!     [--controlnet DIR [--preprocessor passthrough]]
//! ```
//! `--model` and `--taesd` default to `SDSTREAM_BENCH_MODEL` and `SDSTREAM_BENCH_TAESD`, the
//! full-size random weights tests/reference/make_full_size.py makes. Each stream gets its own
//! prompt and seed; `--budget-ms` sets every stream's `frame_budget_ms` (default: none, each
//! stream's budget is the spacing of its frames). `--controlnet` steers every stream with that
//! ControlNet (scale 0.8; its control image made by `--preprocessor`, default `passthrough`,
//! so that the rows time the networks), whose calls are batched across streams as the UNet's
//! are. Latency is a frame's time from `Engine::process` in to its output out; the percentiles
//! are over every measured frame of every stream. The batched rows also print how many UNet
//! calls ran, in how many batches, how many streams' calls the widest batch held, with a
//! ControlNet its calls and batches, and the encoder's and decoder's batches (a round in step
//! has one of each), and how busy the batches kept the device (their device time, where
//! measured on their own, over the row's wall time); the counters cover the measured frames
//! only.

use std::process::ExitCode;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use sdstream::engine::Submission;
use sdstream::model::bundle::StableDiffusionModels;
use sdstream::model::cuda_graph::CudaGraphCounts;
use sdstream::model::pool::ModelPool;
use sdstream::pipeline::cross_stream::{
    BatchCounts, BatchTrace, CrossStreamBatcher, SharedNetwork,
};
use sdstream::{Engine, EngineOptions, EngineSettings, Frame, PixelFormat, StreamDiffusionParams};
use serde_json::json;

struct Args {
    model: String,
    taesd: String,
    streams: Vec<usize>,
    size: usize,
    t_index_list: Vec<usize>,
    frames: usize,
    warmup: usize,
    repeats: usize,
    device: String,
    dtype: String,
    budget_ms: Option<f64>,
    controlnet: Option<String>,
    preprocessor: String,
}

fn env_var(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

fn list(v: &str, flag: &str) -> Result<Vec<usize>, String> {
    v.split(',')
        .map(|x| {
            x.trim()
                .parse()
                .map_err(|_| format!("{flag}: not a list of counts: {v:?}"))
        })
        .collect()
}

fn parse(argv: Vec<String>) -> Result<Args, String> {
    let mut a = Args {
        model: env_var("SDSTREAM_BENCH_MODEL").unwrap_or_default(),
        taesd: env_var("SDSTREAM_BENCH_TAESD").unwrap_or_default(),
        streams: vec![1, 2, 4, 8],
        size: 256,
        t_index_list: vec![32],
        frames: 6,
        warmup: 2,
        repeats: 1,
        device: "cpu".into(),
        dtype: "f32".into(),
        budget_ms: None,
        controlnet: None,
        preprocessor: "passthrough".into(),
    };
    let mut it = argv.into_iter();
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--model" => a.model = value()?,
            "--taesd" => a.taesd = value()?,
            "--streams" => a.streams = list(&value()?, "--streams")?,
            "--size" => a.size = list(&value()?, "--size")?[0],
            "--t-index-list" => a.t_index_list = list(&value()?, "--t-index-list")?,
            "--frames" => a.frames = list(&value()?, "--frames")?[0],
            "--warmup" => a.warmup = list(&value()?, "--warmup")?[0],
            "--repeats" => a.repeats = list(&value()?, "--repeats")?[0].max(1),
            "--device" => a.device = value()?,
            "--dtype" => a.dtype = value()?,
            "--budget-ms" => {
                a.budget_ms = Some(
                    value()?
                        .parse()
                        .map_err(|_| "--budget-ms: not a number".to_string())?,
                )
            }
            "--controlnet" => a.controlnet = Some(value()?),
            "--preprocessor" => a.preprocessor = value()?,
            "-h" | "--help" => {
                return Err("see the comment at the top of examples/multi_stream_bench.rs".into());
            }
            other => return Err(format!("unknown flag {other:?}")),
        }
    }
    if a.model.is_empty() || a.taesd.is_empty() {
        return Err(
            "--model and --taesd (or SDSTREAM_BENCH_MODEL and SDSTREAM_BENCH_TAESD) \
                    name the full-size random weights of tests/reference/make_full_size.py"
                .into(),
        );
    }
    if a.streams.is_empty() || a.streams.contains(&0) || a.frames == 0 {
        return Err("--streams needs counts of at least 1, --frames at least 1".into());
    }
    Ok(a)
}

/// One mode's figures for N streams.
struct Row {
    fps: f64,
    p50: Duration,
    p99: Duration,
    calls: u64,
    batches: u64,
    widest: u64,
    /// ControlNet calls and the batches they ran in.
    controlnet: (u64, u64),
    /// The encoder's and the decoder's batches (the rounds' calls of each are one a frame).
    autoencoder: (u64, u64),
    /// The batches' device time (those measured on their own, every network's) over the
    /// run's wall time, and how many of its batches were measured so.
    busy: (f64, u64, u64),
    /// The run's last batches as they ran (batched rows of several streams).
    trace: Vec<BatchTrace>,
    /// CUDA graphs captured, replays, and captures that failed during the row (every
    /// network's): whether its calls ran from graphs or op by op.
    graphs: (usize, usize, usize),
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn settings(args: &Args, batched: bool) -> Result<EngineSettings, String> {
    EngineSettings::from_json(
        &json!({
            "device": args.device,
            "dtype": args.dtype,
            "vae": args.taesd,
            "allow_any_resolution": true,
            "cross_stream_batching": batched,
            "frame_budget_ms": args.budget_ms,
        })
        .to_string(),
    )
    .map_err(|e| e.to_string())
}

fn params(
    args: &Args,
    k: usize,
    settings: &EngineSettings,
) -> Result<StreamDiffusionParams, String> {
    StreamDiffusionParams::from_json_with(
        &json!({
            "model_id": args.model,
            "prompt": format!("a watercolor painting, variation {k}"),
            "seed": 789 + k as i64,
            "t_index_list": args.t_index_list,
            "guidance_scale": 1.2,
            "delta": 0.7,
            // The checker's weights are not among the random stand-ins; its cost is per stream
            // and the same in both modes.
            "use_safety_checker": false,
            "width": args.size,
            "height": args.size,
            "controlnets": args.controlnet.iter().map(|net| json!({
                "model_id": net,
                "conditioning_scale": 0.8,
                "preprocessor": args.preprocessor,
            })).collect::<Vec<_>>(),
        })
        .to_string(),
        settings,
    )
    .map_err(|e| e.to_string())
}

fn run(
    args: &Args,
    pool: &Arc<ModelPool>,
    models: &StableDiffusionModels,
    n: usize,
    batched: bool,
) -> Result<Row, String> {
    let settings = settings(args, batched)?;
    let engines: Vec<Engine> = (0..n)
        .map(|k| {
            let params = params(args, k, &settings)?;
            Engine::builder(params)
                .settings(settings.clone())
                .options(EngineOptions {
                    warmup: false,
                    ..EngineOptions::default()
                })
                .pool(pool.clone())
                .load()
                .map_err(|e| e.to_string())
        })
        .collect::<Result<_, _>>()?;
    let batcher = models.batcher();
    let frame: Vec<u8> = (0..args.size * args.size * 3)
        .map(|i| ((i * 37) % 251) as u8)
        .collect();
    // Every host thread warms up, then all start the measured frames together, once the
    // counters are read: they count the measured frames' batches only.
    let warmed = Arc::new(Barrier::new(n + 1));
    let start = Arc::new(Barrier::new(n + 1));
    let mut before = None;
    let latencies = std::thread::scope(|scope| -> Result<(Vec<Duration>, Duration), String> {
        let handles: Vec<_> = engines
            .iter()
            .map(|engine| {
                let (warmed, start) = (warmed.clone(), start.clone());
                let frame = &frame;
                scope.spawn(move || -> Result<Vec<Duration>, String> {
                    let picture = Frame::packed(frame, args.size, args.size, PixelFormat::Rgb8)
                        .map_err(|e| e.to_string());
                    let warm = picture.clone().and_then(|picture| {
                        (0..args.warmup).try_for_each(|_| {
                            engine
                                .process(Submission::new(picture))
                                .map(drop)
                                .map_err(|e| e.to_string())
                        })
                    });
                    // Past both barriers even after a failed warm-up, which the others and the
                    // main thread would otherwise wait for for ever.
                    warmed.wait();
                    start.wait();
                    warm?;
                    let picture = picture?;
                    let mut times = Vec::with_capacity(args.frames);
                    for _ in 0..args.frames {
                        let t = Instant::now();
                        engine
                            .process(Submission::new(picture))
                            .map_err(|e| e.to_string())?;
                        times.push(t.elapsed());
                    }
                    Ok(times)
                })
            })
            .collect();
        warmed.wait();
        batcher.reset_widest();
        batcher.trace(TRACED_BATCHES);
        before = Some(Counters::read(batcher));
        start.wait();
        let began = Instant::now();
        let mut all = Vec::new();
        for h in handles {
            all.extend(
                h.join()
                    .map_err(|_| "a host thread panicked".to_string())??,
            );
        }
        Ok((all, began.elapsed()))
    })?;
    let (mut times, wall) = latencies;
    times.sort();
    let before = before.ok_or("the counters were not read")?;
    let after = Counters::read(batcher);
    let trace = batcher.take_trace();
    batcher.trace(0);
    let (busy_after, timed_after, batches_after) = after.timed_batches();
    let (busy_before, timed_before, batches_before) = before.timed_batches();
    Ok(Row {
        fps: times.len() as f64 / wall.as_secs_f64(),
        p50: percentile(&times, 0.5),
        p99: percentile(&times, 0.99),
        calls: after.all.calls - before.all.calls,
        batches: after.all.batches - before.all.batches,
        widest: after.all.widest,
        controlnet: (
            after.controlnet.calls - before.controlnet.calls,
            after.controlnet.batches - before.controlnet.batches,
        ),
        autoencoder: (
            after.encode.batches - before.encode.batches,
            after.decode.batches - before.decode.batches,
        ),
        busy: (
            (busy_after - busy_before).as_secs_f64() / wall.as_secs_f64(),
            timed_after - timed_before,
            batches_after - batches_before,
        ),
        trace: if batched && n > 1 { trace } else { Vec::new() },
        graphs: (
            after.graphs.captured - before.graphs.captured,
            after.graphs.replayed - before.graphs.replayed,
            after.graphs.failed - before.graphs.failed,
        ),
    })
}

/// The batches a batched row keeps for its timeline (the last rounds of 8 streams: encode,
/// UNet and decode, about three batches a round).
const TRACED_BATCHES: usize = 12;

/// Prints the last traced batches of a row: when each started after its first call came, how
/// far apart its calls came, how long it ran (host times: with the default hand-back, its run
/// includes the runner's wait for the device), and the gap since the batch before it ended,
/// in which nothing of the batcher's was running.
fn print_trace(n: usize, trace: &[BatchTrace]) {
    if trace.is_empty() {
        return;
    }
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!();
    println!(
        "The last {} batches of {n} streams batched (host times):",
        trace.len()
    );
    println!();
    println!(
        "| batch | network | calls | rows | first call to start ms | calls spread ms | run ms | gap before ms |"
    );
    println!("|---:|---|---:|---:|---:|---:|---:|---:|");
    let mut previous: Option<Instant> = None;
    for (i, b) in trace.iter().enumerate() {
        let gap = previous.map_or("-".to_string(), |end| {
            format!("{:.2}", ms(b.started.saturating_duration_since(end)))
        });
        println!(
            "| {} | {} | {} | {} | {:.2} | {:.2} | {:.2} | {gap} |",
            i + 1,
            b.network.as_str(),
            b.calls,
            b.rows,
            ms(b.started.saturating_duration_since(b.first_call)),
            ms(b.last_call.saturating_duration_since(b.first_call)),
            ms(b.ended.saturating_duration_since(b.started)),
        );
        previous = Some(previous.map_or(b.ended, |end| end.max(b.ended)));
    }
}

/// A batcher's counters and the process's CUDA graph counts, read at once.
struct Counters {
    all: BatchCounts,
    controlnet: BatchCounts,
    encode: BatchCounts,
    decode: BatchCounts,
    graphs: CudaGraphCounts,
}

impl Counters {
    fn read(batcher: &CrossStreamBatcher) -> Self {
        Counters {
            all: batcher.counts(),
            controlnet: batcher.counts_of(SharedNetwork::ControlNet),
            encode: batcher.counts_of(SharedNetwork::Encode),
            decode: batcher.counts_of(SharedNetwork::Decode),
            graphs: sdstream::model::cuda_graph::counts(),
        }
    }

    /// Every network's batches timed on their own: their summed time, how many, and how
    /// many batches ran in all.
    fn timed_batches(&self) -> (Duration, u64, u64) {
        [self.all, self.controlnet, self.encode, self.decode]
            .iter()
            .fold((Duration::ZERO, 0, 0), |(time, timed, all), c| {
                (time + c.device_time, timed + c.timed, all + c.batches)
            })
    }
}

/// Runs the benchmark on `argv` (the flags, without the program's name).
pub fn main(argv: Vec<String>) -> ExitCode {
    let args = match parse(argv) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("multi_stream_bench: {e}");
            return ExitCode::from(2);
        }
    };
    let pool = Arc::new(ModelPool::new());
    // Held for the whole run, so the engines of every row share one load.
    let models = match settings(&args, true)
        .and_then(|s| Ok((params(&args, 0, &s)?, s)))
        .and_then(|(p, s)| pool.get(&p, &s, &mut |_| {}).map_err(|e| e.to_string()))
    {
        Ok(m) => m,
        Err(e) => {
            eprintln!("multi_stream_bench: loading {}: {e}", args.model);
            return ExitCode::FAILURE;
        }
    };
    println!(
        "{} streams at {}², t_index_list {:?}, TAESD, {}, {} {}; {} measured frames per stream \
         after {} warm-up; {} cores; kernel policy: {}",
        args.streams
            .iter()
            .map(|n| n.to_string())
            .collect::<Vec<_>>()
            .join("/"),
        args.size,
        args.t_index_list,
        match &args.controlnet {
            Some(_) => format!("1 ControlNet ({})", args.preprocessor),
            None => "no ControlNet".into(),
        },
        args.device,
        args.dtype,
        args.frames,
        args.warmup,
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        policy_summary(args.device.starts_with("cuda")),
    );
    println!(
        "| streams | mode | aggregate fps | fps per stream | p50 ms | p99 ms | UNet calls | batches | widest | ControlNet calls / batches | encode / decode batches | device busy (batches timed) | graphs captured / replayed / failed |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    // The timeline of the last batched row of several streams.
    let mut traced = None;
    for &n in &args.streams {
        for repeat in 0..args.repeats {
            // Alternate which mode goes first.
            let order = if repeat % 2 == 0 {
                [true, false]
            } else {
                [false, true]
            };
            for batched in order {
                match run(&args, &pool, &models, n, batched) {
                    Ok(r) => {
                        println!(
                            "| {n} | {} | {:.2} | {:.2} | {:.0} | {:.0} | {} | {} | {} | {} | {} | {} | {} / {} / {} |",
                            if batched {
                                "batched"
                            } else {
                                "engine per stream"
                            },
                            r.fps,
                            r.fps / n as f64,
                            r.p50.as_secs_f64() * 1e3,
                            r.p99.as_secs_f64() * 1e3,
                            if batched {
                                r.calls.to_string()
                            } else {
                                "-".into()
                            },
                            if batched {
                                r.batches.to_string()
                            } else {
                                "-".into()
                            },
                            if batched {
                                r.widest.to_string()
                            } else {
                                "-".into()
                            },
                            if batched && args.controlnet.is_some() {
                                format!("{} / {}", r.controlnet.0, r.controlnet.1)
                            } else {
                                "-".into()
                            },
                            if batched {
                                format!("{} / {}", r.autoencoder.0, r.autoencoder.1)
                            } else {
                                "-".into()
                            },
                            if batched && r.busy.1 > 0 {
                                format!("{:.0} % ({} of {})", r.busy.0 * 100.0, r.busy.1, r.busy.2)
                            } else {
                                "-".into()
                            },
                            r.graphs.0,
                            r.graphs.1,
                            r.graphs.2,
                        );
                        if !r.trace.is_empty() {
                            traced = Some((n, r.trace));
                        }
                    }
                    Err(e) => {
                        eprintln!("multi_stream_bench: {n} streams: {e}");
                        return ExitCode::FAILURE;
                    }
                }
            }
        }
    }
    if let Some((n, trace)) = &traced {
        print_trace(*n, trace);
    }
    // Where a round's time goes: the batches' own device time by network and rows (the
    // batcher's averages, measured where several streams shared it).
    let costs = models.batcher().measured_costs();
    if !costs.is_empty() {
        println!();
        println!("| network | per-row shape | rows | batch ms | ms per row |");
        println!("|---|---|---:|---:|---:|");
        for c in costs {
            let ms = c.time.as_secs_f64() * 1e3;
            println!(
                "| {} | {:?} | {} | {:.2} | {:.2} |",
                c.network.as_str(),
                c.sample,
                c.rows,
                ms,
                ms / c.rows as f64
            );
        }
    }
    // The plans cuDNN's attention built for the rounds' row counts, and their compile time.
    if let Some(line) = cudnn_attention_summary() {
        println!();
        println!("{line}");
    }
    if let Some(line) = conv_engines_summary() {
        println!("{line}");
    }
    ExitCode::SUCCESS
}

/// cuDNN's attention in this process (its calls, and the plans it built or refused, with their
/// time), where it built or refused any (feature `cudnn`): the line the benches print after their
/// tables.
pub fn cudnn_attention_summary() -> Option<String> {
    #[cfg(feature = "cudnn")]
    {
        use sdstream::model::kernels::cudnn_attention;
        let plans = cudnn_attention::plan_builds();
        if plans.built + plans.refused > 0 {
            return Some(format!(
                "cuDNN attention: {} calls; {plans}",
                cudnn_attention::calls()
            ));
        }
    }
    None
}

/// The convolution engines chosen from cuDNN's graph API in this process (kernel policy
/// `cuda_conv_engines`: the calls through them, the geometries chosen and refused, the time the
/// choices took), where any was chosen or refused: a line the benches print after their tables.
pub fn conv_engines_summary() -> Option<String> {
    let choices = sdstream::model::kernels::conv::conv_engine_choices();
    (choices.chosen + choices.refused > 0).then(|| format!("cuDNN convolution engines: {choices}"))
}

/// The switches of the process's kernel policy that change what a GPU runs, so that a table
/// says what it measured (`SDSTREAM_CHANNELS_LAST` and the others, docs/GPU.md). `cuda`: whether
/// the bench's device is a CUDA device, which decides what the channels-last choice gives
/// (on there by default, off elsewhere).
pub fn policy_summary(cuda: bool) -> String {
    let p = sdstream::model::kernels::KernelPolicy::process();
    let on_off = |on: bool| if on { "on" } else { "off" };
    let attention = match (
        p.cuda_attention,
        p.cuda_cudnn_attention,
        p.cuda_cudnn_kernel_cache,
        p.cuda_flash_attention,
    ) {
        (false, ..) => "off",
        (true, true, false, false) => "on (cuDNN, else WMMA)",
        (true, true, false, true) => "on (cuDNN, else registers)",
        (true, true, true, false) => "on (cuDNN with kernel caches, else WMMA)",
        (true, true, true, true) => "on (cuDNN with kernel caches, else registers)",
        (true, false, _, false) => "on (WMMA)",
        (true, false, _, true) => "on (registers)",
    };
    format!(
        "CUDA kernels {}, fused attention {}, CUDA graphs {}, channels last {} ({}), \
         pinned transfers {}, preprocessing on the device {}, fused convolution epilogue {}, \
         phase convolutions {}, GroupNorm rows kernels {}, LayerNorm kernel {}, \
         fused linear epilogue {}, 16-byte adds {}, event tracking {}, batch hand-back by events {}, \
         fused time projections {}, convolution engines chosen by timing {}",
        on_off(p.cuda_kernels),
        attention,
        on_off(p.cuda_graphs),
        on_off(p.channels_last.on(cuda)),
        p.channels_last.name(),
        on_off(p.cuda_pinned),
        on_off(p.cuda_preprocess),
        on_off(p.cuda_fused_conv),
        on_off(p.cuda_phase_conv),
        on_off(p.cuda_group_norm_rows),
        on_off(p.cuda_layer_norm),
        on_off(p.cuda_fused_linear),
        on_off(p.cuda_vector_adds),
        on_off(p.cuda_event_tracking),
        on_off(p.cuda_batch_events),
        on_off(p.fused_time_projections),
        on_off(p.cuda_conv_engines),
    )
}
