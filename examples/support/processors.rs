//! Milliseconds per frame of each image processor at a given size (512² by default), with
//! full-size networks of random weights (the real architectures' sizes: HED, the lineart
//! generator and the anime one, the OpenPose body, hand and face networks, Depth Anything V2 Small,
//! DPT-Large, RAFT-small, Real-ESRGAN ×2),
//! the timing docs/PREPROCESSORS.md reports.
//!
//! Run as `examples/processors_bench.rs`, or as `bench processors FLAGS` (the GPU kit carries the
//! one bench binary):
//!
//! ```text
//! cargo run --release -p sdstream --example processors_bench -- [--size 512] [--frames 5] \
//!     [--device cpu] [--dtype f32] [--only hed,depth_tensorrt] [--frame PNG]
//! ```
//! The frame defaults to examples/frames/000.png resized to the size. Each processor runs once
//! to warm up, then `--frames` times; the table gives the median and the best time of those, and
//! the processor's own conversions (frame to tensor and back are not counted). On a GPU each run
//! waits for the device; the pixel processors run there by default (with
//! `SDSTREAM_CUDA_PREPROCESS=0` they download the frame, run on the host and upload the
//! result). Random weights make the networks' work what it is with real weights; what follows a
//! network and depends on what it finds (OpenPose's keypoint grouping and drawing) may cost more
//! or less with real weights on a real scene.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use sdstream::model::{
    depth_anything, dpt, hed, lineart, lineart_anime, openpose_body, openpose_cpm, raft, rrdbnet,
};
use sdstream::preprocess::networks::{Network, NetworkRequest, ProcessorNetworks};
use sdstream::preprocess::{Processor, ProcessorInputs};
use serde_json::{Value, json};

struct Args {
    size: usize,
    frames: usize,
    device: String,
    dtype: String,
    only: Option<Vec<String>>,
    frame: Option<String>,
}

fn parse(args: Vec<String>) -> Result<Args, String> {
    let mut a = Args {
        size: 512,
        frames: 5,
        device: "cpu".into(),
        dtype: "f32".into(),
        only: None,
        frame: None,
    };
    let mut it = args.into_iter();
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--size" => a.size = value()?.parse().map_err(|e| format!("--size: {e}"))?,
            "--frames" => a.frames = value()?.parse().map_err(|e| format!("--frames: {e}"))?,
            "--device" => a.device = value()?,
            "--dtype" => a.dtype = value()?,
            "--only" => a.only = Some(value()?.split(',').map(str::to_owned).collect()),
            "--frame" => a.frame = Some(value()?),
            other => return Err(format!("unknown flag {other}")),
        }
    }
    if a.frames == 0 || a.size < 64 {
        return Err("--frames must be positive and --size at least 64".into());
    }
    Ok(a)
}

/// Random weights for every variable the network asked for: matrices and kernels He-scaled by
/// their fan-in, vectors named `*weight` (norm scales) near 1, other vectors small.
fn randomise(varmap: &VarMap) -> candle_core::Result<()> {
    let vars = varmap.data().lock().expect("varmap");
    for (name, var) in vars.iter() {
        let dims = var.dims().to_vec();
        let device = var.device();
        let t = if dims.len() >= 2 {
            let fan_in: usize = dims[1..].iter().product();
            Tensor::randn(
                0f32,
                (1.0 / fan_in.max(1) as f64).sqrt() as f32,
                dims,
                device,
            )?
        } else if name.ends_with("weight") || name.ends_with("lambda1") || name.ends_with("gamma") {
            (Tensor::randn(0f32, 0.1, dims, device)? + 1.0)?
        } else {
            Tensor::randn(0f32, 0.01, dims, device)?
        };
        var.set(&t.to_dtype(var.dtype())?)?;
    }
    Ok(())
}

/// Builds a network twice over one VarMap: once to create its variables, once (after they are
/// randomised) to use them.
fn random_network<C, M>(
    config: &C,
    dtype: DType,
    device: &Device,
    build: impl Fn(&C, VarBuilder<'static>) -> sdstream::Result<M>,
) -> sdstream::Result<M> {
    let varmap = VarMap::new();
    build(config, VarBuilder::from_varmap(&varmap, dtype, device))?;
    randomise(&varmap)?;
    build(config, VarBuilder::from_varmap(&varmap, dtype, device))
}

fn networks(dtype: DType, device: &Device) -> sdstream::Result<ProcessorNetworks> {
    let mut nets: Vec<(NetworkRequest, Network)> = Vec::new();
    let t = Instant::now();
    nets.push((
        NetworkRequest::HED,
        Network::Hed(random_network(
            &hed::Config::default(),
            dtype,
            device,
            hed::Hed::new,
        )?),
    ));
    let generator = |_: &()| {
        random_network(
            &lineart::Config::default(),
            dtype,
            device,
            lineart::LineartGenerator::new,
        )
    };
    nets.push((
        NetworkRequest::LINEART_COARSE,
        Network::Lineart(generator(&())?),
    ));
    nets.push((
        NetworkRequest::LINEART_ANIME,
        Network::LineartAnime(random_network(
            &lineart_anime::Config::anime2sketch(),
            dtype,
            device,
            lineart_anime::LineartAnimeGenerator::new,
        )?),
    ));
    nets.push((
        NetworkRequest::BODY_POSE,
        Network::BodyPose(random_network(
            &openpose_body::Config::default(),
            dtype,
            device,
            |c, vb| Ok(openpose_body::BodyPoseNet::new(c, vb)?),
        )?),
    ));
    for (request, heatmaps) in [
        (NetworkRequest::HAND_POSE, 22),
        (NetworkRequest::FACE_POSE, 71),
    ] {
        nets.push((
            request,
            Network::Keypoints(random_network(
                &openpose_cpm::Config::published(heatmaps),
                dtype,
                device,
                openpose_cpm::KeypointNet::new,
            )?),
        ));
    }
    nets.push((
        NetworkRequest::DEPTH_ANYTHING_V2_SMALL,
        Network::DepthAnything(random_network(
            &depth_anything::Config::v2_small(),
            dtype,
            device,
            |c, vb| Ok(depth_anything::DepthAnything::new(c, vb)?),
        )?),
    ));
    nets.push((
        NetworkRequest::DPT_LARGE,
        Network::Dpt(dpt::DptDepth {
            net: random_network(&dpt::Config::dpt_large(), dtype, device, dpt::Dpt::new)?,
            processor: dpt::ProcessorConfig::default(),
        }),
    ));
    nets.push((
        NetworkRequest::RAFT_SMALL,
        Network::Raft(random_network(
            &raft::Config::default(),
            dtype,
            device,
            |c, vb| Ok(raft::Raft::new(c, vb)?),
        )?),
    ));
    nets.push((
        NetworkRequest::REAL_ESRGAN_X2,
        Network::RealEsrgan(random_network(
            &rrdbnet::Config::default(),
            dtype,
            device,
            rrdbnet::RrdbNet::new,
        )?),
    ));
    eprintln!(
        "made 10 full-size random networks in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    Ok(ProcessorNetworks::from_networks(
        nets.into_iter().map(|(r, n)| (r, Arc::new(n))),
    ))
}

/// The processors of the table, with the params each runs with.
fn cases() -> Vec<(&'static str, Value)> {
    vec![
        ("canny", json!({})),
        ("soft_edge", json!({})),
        ("blur", json!({})),
        ("sharpen", json!({})),
        ("upscale", json!({})),
        ("standard_lineart", json!({})),
        ("hed", json!({})),
        ("lineart", json!({"coarse": true})),
        ("lineart", json!({"anime_style": true})),
        ("pose_tensorrt", json!({})),
        ("depth_tensorrt", json!({})),
        ("depth", json!({})),
        ("temporal_net_tensorrt", json!({})),
        ("realesrgan_trt", json!({})),
    ]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn run(args: Vec<String>) -> Result<(), String> {
    let args = parse(args)?;
    let device = crate::support::device(&args.device)?;
    let dtype = match args.dtype.as_str() {
        "f32" => DType::F32,
        "f16" => DType::F16,
        "bf16" => DType::BF16,
        other => return Err(format!("--dtype {other}: f32, f16 or bf16")),
    };
    let path = args.frame.clone().unwrap_or_else(|| {
        concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/frames/000.png").to_owned()
    });
    let img = image::open(&path)
        .map_err(|e| format!("{path}: {e}"))?
        .resize_exact(
            args.size as u32,
            args.size as u32,
            image::imageops::FilterType::Lanczos3,
        )
        .to_rgb8();
    let (w, h) = (img.width() as usize, img.height() as usize);
    let frame = Tensor::from_vec(img.into_raw(), (h, w, 3), &device)
        .and_then(|t| t.permute((2, 0, 1))?.unsqueeze(0)?.to_dtype(DType::F32))
        .and_then(|t| t / 255.0)
        .map_err(|e| e.to_string())?;
    // A second frame, shifted, for the temporal processor's previous input.
    let previous = frame
        .roll(3, 3)
        .and_then(|t| t.roll(2, 2))
        .map_err(|e| e.to_string())?;
    let nets = networks(dtype, &device).map_err(|e| e.to_string())?;
    println!(
        "processors at {w}x{h}, {} {:?}, median and best of {} frames after one warm-up",
        args.device, dtype, args.frames
    );
    println!("| processor | network | median ms | best ms |");
    println!("|---|---|---:|---:|");
    for (name, params) in cases() {
        if args
            .only
            .as_ref()
            .is_some_and(|o| !o.iter().any(|n| n == name))
        {
            continue;
        }
        let map = params.as_object().cloned().unwrap_or_default();
        let processor = Processor::parse(name, &map, name, name).map_err(|e| e.to_string())?;
        let inputs = ProcessorInputs {
            previous_input: Some(&previous),
            networks: Some(&nets),
            ..Default::default()
        };
        let mut times = Vec::with_capacity(args.frames);
        for k in 0..=args.frames {
            let t = Instant::now();
            let out = processor
                .run(&frame, &inputs)
                .map_err(|e| format!("{name}: {e}"))?;
            device.synchronize().map_err(|e| e.to_string())?;
            drop(out);
            if k > 0 {
                times.push(t.elapsed());
            }
        }
        times.sort();
        let networks: Vec<String> = processor
            .networks()
            .iter()
            .map(|r| format!("{} ({})", r.kind.name(), r.stem))
            .collect();
        let network = if networks.is_empty() {
            "-".to_owned()
        } else {
            networks.join(", ")
        };
        println!(
            "| {name} | {network} | {:.1} | {:.1} |",
            ms(times[times.len() / 2]),
            ms(times[0])
        );
    }
    // OpenPose's network alone on what a 512² detection feeds it (184² after the scaling), to
    // tell the network from the host's resizes, grouping and drawing.
    if let Ok(Network::BodyPose(net)) = nets.get(NetworkRequest::BODY_POSE) {
        let input = Tensor::zeros((1, 3, 184, 184), dtype, &device).map_err(|e| e.to_string())?;
        let mut times = Vec::with_capacity(args.frames);
        for k in 0..=args.frames {
            let t = Instant::now();
            net.forward(&input).map_err(|e| e.to_string())?;
            device.synchronize().map_err(|e| e.to_string())?;
            if k > 0 {
                times.push(t.elapsed());
            }
        }
        times.sort();
        println!(
            "OpenPose body network alone at 184x184: median {:.1} ms, best {:.1} ms",
            ms(times[times.len() / 2]),
            ms(times[0])
        );
    }
    // The hand network at the four sizes one hand runs it at, and the face network: what
    // `include_hands`/`include_face` add per hand and per face found (a real scene decides how
    // many; random weights find arbitrary people, so the whole processor is not timed).
    for (request, what, sides) in [
        (
            NetworkRequest::HAND_POSE,
            "hand",
            &[184usize, 368, 552, 736][..],
        ),
        (NetworkRequest::FACE_POSE, "face", &[384][..]),
    ] {
        let Ok(Network::Keypoints(net)) = nets.get(request) else {
            continue;
        };
        let inputs = sides
            .iter()
            .map(|&s| Tensor::zeros((1, 3, s, s), dtype, &device))
            .collect::<candle_core::Result<Vec<_>>>()
            .map_err(|e| e.to_string())?;
        let mut times = Vec::with_capacity(args.frames);
        for k in 0..=args.frames {
            let t = Instant::now();
            for input in &inputs {
                net.forward(input).map_err(|e| e.to_string())?;
            }
            device.synchronize().map_err(|e| e.to_string())?;
            if k > 0 {
                times.push(t.elapsed());
            }
        }
        times.sort();
        println!(
            "OpenPose {what} network at {sides:?}: median {:.1} ms, best {:.1} ms",
            ms(times[times.len() / 2]),
            ms(times[0])
        );
    }
    Ok(())
}

/// The benchmark with its flags (the program's arguments after its name).
pub fn main(args: Vec<String>) -> ExitCode {
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("processors_bench: {e}");
            ExitCode::FAILURE
        }
    }
}
