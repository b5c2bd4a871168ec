//! SDXL ControlNets, TAESDXL and the SDXL VAE against diffusers and the reference stream
//! arithmetic (goldens: tests/reference/make_sdxl_fixtures.py): the net alone with SDXL's added
//! conditioning; both autoencoders; streams with the net (every cfg type, the step-by-step path,
//! TAESDXL and the full VAE); the f16 rule for SDXL's VAE; and the camera app's body
//! (`stabilityai/sdxl-turbo` + `xinsir/controlnet-canny-sdxl-1.0` at 0.3) streaming through the
//! Engine on tiny stand-ins found under a model root by those ids.

use crate::common;

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, IndexOp, Tensor};
use common::{WorstFrame, abs_err, copy_dir, fixture, golden, scratch_dir};
use sdstream::model::bundle::{Autoencoder, StableDiffusionModels};
use sdstream::model::controlnet::ControlNetModel;
use sdstream::model::taesd::AutoencoderTiny;
use sdstream::model::unet::AddedConditioning;
use sdstream::model::vae::AutoencoderKl;
use sdstream::params::ModelFamily;
use sdstream::{
    Engine, EngineOptions, EngineSettings, Frame, PixelFormat, StreamDiffusion,
    StreamDiffusionParams,
};
use serde_json::{Value, json};

/// Tolerance of network outputs against diffusers (f32).
const NET_MAX_ABS: f32 = 1e-5;

fn path_of(name: &str) -> String {
    fixture(name).display().to_string()
}

// ---------------------------------------------------------------------------------------------
// Networks
// ---------------------------------------------------------------------------------------------

#[test]
fn sdxl_controlnet_residuals_match_diffusers() {
    let g = golden("golden/sdxl_controlnet_net.safetensors");
    let net = ControlNetModel::load(&fixture("tiny-sdxl-controlnet"), DType::F32, &Device::Cpu)
        .expect("the tiny SDXL ControlNet loads");
    assert_eq!(net.config().family_label(), "SDXL");
    let added = AddedConditioning {
        text_embeds: g["text_embeds"].clone(),
        time_ids: g["time_ids"].clone(),
    };
    let out = net
        .forward(
            &g["sample"],
            &g["timesteps"],
            &g["encoder_hidden_states"],
            Some(&added),
            &g["controlnet_cond"],
        )
        .unwrap();
    let expected = g.keys().filter(|k| k.starts_with("down_")).count();
    assert_eq!(out.down.len(), expected);
    assert!(expected >= 4, "the golden holds {expected} down residuals");
    let mut worst = 0f32;
    for (i, got) in out.down.iter().enumerate() {
        let (max, mean) = abs_err(got, &g[&format!("down_{i:02}")]);
        println!("down {i:02}: max {max:.2e} mean {mean:.2e}");
        worst = worst.max(max);
    }
    let (max, mean) = abs_err(&out.mid, &g["mid"]);
    println!("mid: max {max:.2e} mean {mean:.2e}");
    worst = worst.max(max);
    assert!(worst <= NET_MAX_ABS, "SDXL ControlNet max abs {worst:.3e}");

    // Without its added conditioning an SDXL net cannot run: a clear error, not a guess.
    let err = net
        .forward(
            &g["sample"],
            &g["timesteps"],
            &g["encoder_hidden_states"],
            None,
            &g["controlnet_cond"],
        )
        .expect_err("an SDXL net needs text_embeds and time_ids");
    assert!(err.to_string().contains("text_time"), "{err}");
}

#[test]
fn taesdxl_and_the_sdxl_vae_match_diffusers() {
    let g = golden("golden/sdxl_autoencoders.safetensors");
    let taesdxl = AutoencoderTiny::load(&fixture("tiny-taesdxl"), DType::F32, &Device::Cpu)
        .expect("tiny TAESDXL loads");
    let checks = [
        (
            "taesdxl encode",
            taesdxl.encode(&g["image"]).unwrap(),
            "taesdxl_latents",
        ),
        (
            "taesdxl decode",
            taesdxl.decode(&g["latent"]).unwrap(),
            "taesdxl_decoded",
        ),
    ];
    let vae = AutoencoderKl::load(&fixture("tiny-sdxl/vae"), DType::F32, &Device::Cpu)
        .expect("the tiny SDXL VAE loads");
    assert_eq!(vae.scaling_factor(), 0.13025, "SDXL's scaling factor");
    assert!(vae.config().force_upcast);
    let (mean, _) = vae.encode_moments(&g["image"]).unwrap();
    let decoded = vae
        .decode(&(&g["latent"] / vae.scaling_factor()).unwrap())
        .unwrap();
    for (what, got, key) in checks.into_iter().chain([
        ("vae mean", mean, "vae_mean"),
        ("vae decode", decoded, "vae_decoded"),
    ]) {
        // On the outputs' own scale: the fixture's posterior mean has std ~7 (its quant_conv
        // is scaled up so that frames matter), the others ~0.1-0.5.
        let want = &g[key];
        let scale = want.flatten_all().unwrap().var(0).unwrap().sqrt().unwrap();
        let scale = scale.to_scalar::<f32>().unwrap().max(1.0);
        let (max, mean) = abs_err(&got, want);
        println!("{what}: max {max:.2e} mean {mean:.2e} (values' std {scale:.2})");
        assert!(max <= NET_MAX_ABS * scale, "{what}: max abs {max:.3e}");
    }
}

/// In f16 an SDXL checkpoint's VAE (force_upcast) computes in f32, as diffusers' SDXL
/// pipelines upcast it; an SD 2.1 checkpoint's stays in f16, and bf16 needs no upcast (on the
/// CPU, where these run, bf16 is f32 maps with bf16 GEMMs: every network loads in f32).
#[test]
fn the_sdxl_vae_is_upcast_in_f16_only() {
    let dtype_of = |model: &str, dtype: &str| -> (DType, DType, bool) {
        let settings = EngineSettings::from_json(
            &json!({"vae": "full", "dtype": dtype, "allow_any_resolution": true}).to_string(),
        )
        .unwrap();
        let models = StableDiffusionModels::load(path_of(model).as_str(), &settings, &mut |_| {})
            .expect("loads");
        match &models.autoencoder {
            Autoencoder::Kl(vae) => (models.unet.dtype(), vae.dtype(), models.unet.bf16_gemms()),
            Autoencoder::Tiny(_) => panic!("asked for the full VAE"),
        }
    };
    assert_eq!(
        dtype_of("tiny-sdxl", "f16"),
        (DType::F16, DType::F32, false)
    );
    assert_eq!(
        dtype_of("tiny-sdxl", "bf16"),
        (DType::F32, DType::F32, true)
    );
    assert_eq!(
        dtype_of("tiny-sd-turbo", "f16"),
        (DType::F16, DType::F16, false)
    );
    assert_eq!(
        dtype_of("tiny-sd-turbo", "f32"),
        (DType::F32, DType::F32, false)
    );
}

// ---------------------------------------------------------------------------------------------
// Streams against the reference arithmetic
// ---------------------------------------------------------------------------------------------

fn case(name: &str) -> &'static Value {
    common::golden_case("golden/streams_sdxl_controlnet.json", name)
}

fn settings_for(case: &Value) -> EngineSettings {
    let vae = match case["vae"].as_str().unwrap() {
        "taesdxl" => path_of("tiny-taesdxl"),
        "taesd" => path_of("tiny-taesd"),
        "full" => "full".to_string(),
        other => panic!("unknown vae {other}"),
    };
    EngineSettings::from_json(
        &json!({
            "cfg_type": case["cfg_type"],
            "vae": vae,
            "allow_any_resolution": true,
        })
        .to_string(),
    )
    .unwrap()
}

fn body_for(case: &Value) -> Value {
    let nets: Vec<Value> = case["controlnets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|net| {
            let mut net = net.clone();
            net["model_id"] = json!(path_of(net["model_id"].as_str().unwrap()));
            net
        })
        .collect();
    json!({
        "model_id": path_of("tiny-sdxl"),
        "prompt": case["prompt"],
        "negative_prompt": case["negative_prompt"],
        "seed": case["seed"],
        "t_index_list": case["t_index_list"],
        "num_inference_steps": case["num_inference_steps"],
        "guidance_scale": case["guidance_scale"],
        "delta": case["delta"],
        "do_add_noise": case["do_add_noise"],
        "use_denoising_batch": case["use_denoising_batch"],
        "width": case["width"],
        "height": case["height"],
        "controlnets": nets,
    })
}

fn frame_tensor(rel: &str) -> Tensor {
    let img = image::open(fixture(rel)).unwrap().to_rgb8();
    let (w, h) = (img.width() as usize, img.height() as usize);
    let frame = Frame::packed(img.as_raw(), w, h, PixelFormat::Rgb8).unwrap();
    frame.to_tensor(w, h, &Device::Cpu).unwrap()
}

fn check_case(name: &str) {
    let case = case(name);
    let gold = golden(case["file"].as_str().unwrap());
    let settings = settings_for(case);
    let params = StreamDiffusionParams::from_json_with(&body_for(case).to_string(), &settings)
        .expect("the case's body is valid");
    let mut stream = StreamDiffusion::new(params, settings).expect("the SDXL stream starts");
    assert_eq!(stream.models().family, ModelFamily::Sdxl);
    assert_eq!(
        stream.controlnets().len(),
        case["controlnets"].as_array().unwrap().len()
    );
    assert_eq!(
        abs_err(stream.state().init_noise(), &gold["init_noise"]).0,
        0.0,
        "{name}: init_noise differs from torch's"
    );
    // The step-by-step path re-noises from torch's global generator: feed its recorded draws.
    if let Some(step_noise) = gold.get("step_noise") {
        let mut draws = (0..step_noise.dim(0).unwrap())
            .flat_map(|f| {
                let per_frame = step_noise.i(f).unwrap();
                (0..per_frame.dim(0).unwrap())
                    .map(|k| per_frame.i(k).unwrap())
                    .collect::<Vec<_>>()
            })
            .collect::<Vec<_>>()
            .into_iter();
        stream.set_renoise_source(Some(Box::new(move |shape| {
            let t = draws
                .next()
                .expect("more re-noise draws than the reference");
            assert_eq!(t.dims(), shape);
            Ok(t)
        })));
    }
    let frames = case["frames"].as_array().unwrap();
    let n = gold["output"].dim(0).unwrap();
    assert!(n >= 6 && frames.len() >= n, "{name}: {n} frames");
    let mut worst = WorstFrame::default();
    for (i, rel) in frames.iter().take(n).enumerate() {
        let out = stream
            .process_tensor(&frame_tensor(rel.as_str().unwrap()))
            .unwrap();
        worst.add(
            name,
            i,
            &out,
            &gold["output"].i(i).unwrap().unsqueeze(0).unwrap(),
        );
    }
    worst.check(name, n);
}

macro_rules! stream_cases {
    ($($name:ident),* $(,)?) => {
        $(#[test] fn $name() { check_case(stringify!($name)); })*
    };
}

stream_cases!(
    cn_self_t3_taesdxl,
    cn_window_full_t2,
    cn_initialize_t3_fullvae,
    none_t2_fullvae,
    cn_none_t3_nobatch_taesdxl,
);

// ---------------------------------------------------------------------------------------------
// The camera app's body on tiny stand-ins
// ---------------------------------------------------------------------------------------------

/// A model root whose `stabilityai/sdxl-turbo`, `xinsir/controlnet-canny-sdxl-1.0` and
/// `madebyollin/taesdxl` (the `taesd` choice for SDXL) are the tiny stand-ins.
fn stand_in_root(tag: &str) -> PathBuf {
    let root = scratch_dir(tag);
    for (id, folder) in [
        ("stabilityai/sdxl-turbo", "tiny-sdxl"),
        ("xinsir/controlnet-canny-sdxl-1.0", "tiny-sdxl-controlnet"),
        ("madebyollin/taesdxl", "tiny-taesdxl"),
    ] {
        copy_dir(&fixture(folder), &root.join(id));
    }
    root
}

/// The camera app's create body: sdxl-turbo with xinsir's canny ControlNet at 0.3.
fn camera_body(scale: f64) -> Value {
    json!({
        "model_id": "stabilityai/sdxl-turbo",
        "prompt": "a portrait in the style of a stained glass window",
        "negative_prompt": "blurry, low quality",
        "seed": 42,
        "width": 512,
        "height": 512,
        "t_index_list": [20],
        "controlnets": [{
            "model_id": "xinsir/controlnet-canny-sdxl-1.0",
            "conditioning_scale": scale,
            "preprocessor": "canny",
            "preprocessor_params": {"low_threshold": 100, "high_threshold": 200},
            "enabled": true,
        }],
    })
}

/// A 512² picture with edges for canny to find: rings and bars.
fn camera_frame() -> Vec<u8> {
    let mut data = Vec::with_capacity(512 * 512 * 3);
    for y in 0..512i32 {
        for x in 0..512i32 {
            let (dx, dy) = (x - 256, y - 200);
            let ring = ((dx * dx + dy * dy) as f64).sqrt() as i32 / 24 % 2 == 0;
            let bar = (x / 64) % 2 == 0 && y > 400;
            let v = if ring || bar { 220 } else { 30 };
            data.extend_from_slice(&[v, v / 2 + (x % 50) as u8, 255 - v]);
        }
    }
    data
}

fn camera_settings(root: &Path) -> EngineSettings {
    EngineSettings {
        model_root: Some(root.to_path_buf()),
        ..EngineSettings::default()
    }
}

fn mean_levels(a: &[u8], b: &[u8]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (*x as f64 - *y as f64).abs())
        .sum::<f64>()
        / a.len() as f64
}

#[test]
fn the_camera_apps_body_streams_through_the_engine() {
    let root = stand_in_root("camera-app");
    let settings = camera_settings(&root);
    let params = StreamDiffusionParams::from_json_with(&camera_body(0.3).to_string(), &settings)
        .expect("the camera app's body validates");
    let data = camera_frame();
    let frame = || Frame::packed(&data, 512, 512, PixelFormat::Rgb8).unwrap();

    let mut direct = StreamDiffusion::new(params.clone(), settings.clone()).expect("starts");
    assert_eq!(direct.models().family, ModelFamily::Sdxl);
    assert_eq!(
        direct.models().dir,
        root.join("stabilityai/sdxl-turbo"),
        "the id resolves under the model root"
    );
    assert_eq!(direct.controlnets().len(), 1);
    assert_eq!(direct.controlnets()[0].config().family_label(), "SDXL");
    let want: Vec<_> = (0..3)
        .map(|_| direct.process(&frame()).unwrap().data)
        .collect();

    let options = EngineOptions {
        warmup: false,
        ..EngineOptions::default()
    };
    let engine = Engine::new(params, settings.clone(), options.clone()).expect("engine starts");
    for (i, want) in want.iter().enumerate() {
        let got = engine.process(frame()).expect("a frame comes back");
        assert_eq!(got.image.width, 512);
        assert!(
            &got.image.data == want,
            "frame {i}: Engine = StreamDiffusion, byte for byte"
        );
    }

    // The net acts: the same stream without it, and with it at twice the scale (a hot update
    // on the running engine), give other pictures.
    let mut no_net = camera_body(0.3);
    no_net["controlnets"] = json!([]);
    let no_net = StreamDiffusionParams::from_json_with(&no_net.to_string(), &settings).unwrap();
    let mut plain = StreamDiffusion::new(no_net, settings.clone()).unwrap();
    let plain_out = (0..3).map(|_| plain.process(&frame()).unwrap().data).last();
    let moved = mean_levels(&plain_out.unwrap(), want.last().unwrap());
    println!("the canny net at 0.3 moves the picture by {moved:.2} levels (mean)");
    assert!(moved > 0.5, "the ControlNet changes the output: {moved}");

    let stronger =
        StreamDiffusionParams::from_json_with(&camera_body(0.6).to_string(), &settings).unwrap();
    let applied = engine
        .update_params(stronger)
        .expect("a scale change applies");
    assert!(applied.is_hot(), "a scale change is hot: {applied:?}");
    let after = engine.process(frame()).unwrap();
    let changed = mean_levels(&after.image.data, want.last().unwrap());
    println!("scale 0.3 -> 0.6 moves the picture by {changed:.2} levels (mean)");
    assert!(changed > 0.1, "{changed}");
}
