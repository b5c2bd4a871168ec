//! Single-file checkpoints in the original Stable Diffusion layout (tests/fixtures/single-file,
//! written by tests/reference/make_single_file.py from the tiny diffusers folders and checked
//! there against diffusers' `from_single_file`): an SD 1.x `.safetensors`, an SD 2.x `.ckpt` with
//! OpenCLIP's fused projections and one unused text layer, and an SDXL `.safetensors` with both
//! text encoders. Each converts into exactly its source folders' tensors and streams like them.

use crate::common;

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use common::fixture;
use sdstream::model::single_file::diffusers_folder;
use sdstream::params::VaeChoice;
use sdstream::{Engine, EngineOptions, EngineSettings, Frame, PixelFormat, StreamDiffusionParams};
use serde_json::{Value, json};

fn manifest() -> Value {
    let path = fixture("single-file/manifest.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path:?}: {e}"));
    serde_json::from_str(&text).expect("manifest JSON")
}

/// The tiny settings with the canonical config repositories' stand-ins as the model root.
fn settings(vae: VaeChoice) -> EngineSettings {
    EngineSettings {
        model_root: Some(fixture("single-file/model-root")),
        vae,
        allow_any_resolution: true,
        ..EngineSettings::default()
    }
}

fn load_f32(path: &std::path::Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(path, &Device::Cpu)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .into_iter()
        .map(|(k, v)| (k, v.to_dtype(DType::F32).unwrap()))
        .collect()
}

fn same_values(a: &Tensor, b: &Tensor) -> bool {
    a.dims() == b.dims()
        && a.flatten_all().unwrap().to_vec1::<f32>().unwrap()
            == b.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

#[test]
fn each_single_file_converts_into_exactly_its_source_folders_tensors() {
    let manifest = manifest();
    let files = manifest["files"].as_object().expect("files");
    assert_eq!(files.len(), 3);
    let opts = settings(VaeChoice::Full).hub_options();
    for (name, entry) in files {
        let file = fixture(&format!("single-file/{name}"));
        let folder = diffusers_folder(&file, &opts).unwrap_or_else(|e| panic!("{name}: {e}"));
        // The second load finds the conversion.
        assert_eq!(diffusers_folder(&file, &opts).expect("again"), folder);
        let components = entry["components"].as_object().expect("components");
        for (component, expected) in components {
            let weights = if component.starts_with("text_encoder") {
                "model.safetensors"
            } else {
                "diffusion_pytorch_model.safetensors"
            };
            let converted = load_f32(&folder.join(component).join(weights));
            let source_dir = fixture(entry["sources"][component].as_str().expect("source"));
            let source = load_f32(&source_dir.join(weights));
            assert_eq!(
                converted.len(),
                expected["tensors"].as_u64().unwrap() as usize,
                "{name} {component}: tensor count"
            );
            let mut missing: Vec<&String> = source
                .keys()
                .filter(|k| !converted.contains_key(*k))
                .collect();
            missing.sort();
            assert!(
                missing.is_empty(),
                "{name} {component}: missing {missing:?}"
            );
            for (key, want) in &source {
                assert!(
                    same_values(&converted[key], want),
                    "{name} {component}: {key} differs"
                );
            }
            println!("{name}: {component} {} tensors equal", source.len());
        }
        for config in [
            "model_index.json",
            "unet/config.json",
            "scheduler/scheduler_config.json",
        ] {
            assert!(folder.join(config).is_file(), "{name}: no {config}");
        }
    }
}

fn body_of(model_id: PathBuf, settings: &EngineSettings, seed: u64) -> StreamDiffusionParams {
    let body = json!({
        "model_id": model_id.display().to_string(),
        "prompt": "a lighthouse in a storm",
        "width": 64,
        "height": 64,
        "seed": seed,
        // The converted folder has no safety_checker/ of its own (a single file holds none).
        "use_safety_checker": false,
        // SD 1.x would fuse the LCM-LoRA from the hub; the tiny folders are LCM already.
        "use_lcm_lora": false,
    });
    StreamDiffusionParams::from_json_with(&body.to_string(), settings)
        .unwrap_or_else(|e| panic!("the body validates: {e}"))
}

/// The folder's frames through a StreamDiffusion.
fn stream_of(model_id: PathBuf, settings: &EngineSettings, seed: u64) -> Vec<Vec<u8>> {
    let params = body_of(model_id, settings, seed);
    common::stream_outputs(params, settings.clone(), &common::rgb8_frames(3))
}

/// The single file's frames through an Engine.
fn engine_of(model_id: PathBuf, settings: &EngineSettings, seed: u64) -> Vec<Vec<u8>> {
    let options = EngineOptions {
        warmup: false,
        ..EngineOptions::default()
    };
    let engine = Engine::new(body_of(model_id, settings, seed), settings.clone(), options)
        .expect("the engine starts on the single file");
    let outputs = common::rgb8_frames(3)
        .iter()
        .map(|data| {
            let frame = Frame::packed(data, 64, 64, PixelFormat::Rgb8).unwrap();
            engine.process(frame).expect("a frame").image.data
        })
        .collect();
    engine.close();
    outputs
}

/// A model_id naming a file streams (through the Engine) what its source folders stream: SD 2.x
/// and SDXL with their own autoencoder, SD 1.x (whose tiny folder has none) through TAESD.
#[test]
fn a_single_file_streams_like_its_diffusers_folders() {
    let full = settings(VaeChoice::Full);
    assert_eq!(
        engine_of(fixture("single-file/sd21.ckpt"), &full, 11),
        stream_of(fixture("tiny-sd-turbo"), &full, 11),
    );
    let sdxl = engine_of(fixture("single-file/sdxl.safetensors"), &full, 12);
    assert_eq!(sdxl, stream_of(fixture("tiny-sdxl"), &full, 12));
    let taesd = settings(VaeChoice::Custom(
        fixture("tiny-taesd").display().to_string(),
    ));
    assert_eq!(
        engine_of(fixture("single-file/sd15.safetensors"), &taesd, 13),
        stream_of(fixture("tiny-sd15"), &taesd, 13),
    );
    // The frames are pictures, not a constant.
    assert!(sdxl[0].iter().any(|&v| v != sdxl[0][0]));
}

/// A file that is not a whole checkpoint, and a file whose family's configs cannot be found,
/// are refused naming what is missing.
#[test]
fn a_single_file_without_a_checkpoint_or_configs_is_refused_by_name() {
    let opts = settings(VaeChoice::Full).hub_options();
    let lone = fixture("tiny-sd-turbo/unet/diffusion_pytorch_model.safetensors");
    let err = diffusers_folder(&lone, &opts).unwrap_err().to_string();
    assert!(
        err.contains("not a whole Stable Diffusion checkpoint"),
        "{err}"
    );

    let mut no_configs = opts.clone();
    no_configs.model_root = Some(fixture("published-root"));
    no_configs.offline = true;
    no_configs.cache_dir = Some(common::scratch_dir("single-file-no-configs"));
    let err = diffusers_folder(&fixture("single-file/sdxl.safetensors"), &no_configs)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("stabilityai/stable-diffusion-xl-base-1.0"),
        "{err}"
    );
}

/// Validation takes a file path as a model_id where paths are allowed, and not where they are not.
#[test]
fn a_single_file_is_a_model_id_only_where_paths_are() {
    let file = fixture("single-file/sd15.safetensors")
        .display()
        .to_string();
    let body = json!({"model_id": file, "width": 64, "height": 64}).to_string();
    let allowed = settings(VaeChoice::Taesd);
    StreamDiffusionParams::from_json_with(&body, &allowed).expect("a file is a model_id");
    let served = EngineSettings {
        allow_model_paths: false,
        ..allowed
    };
    let err = StreamDiffusionParams::from_json_with(&body, &served)
        .unwrap_err()
        .to_string();
    assert!(!err.contains(&file), "the path is echoed: {err}");
}

/// Real single files are mostly fp16 (sd_xl_base_1.0, most fine-tunes): the converted folder
/// keeps the stored dtype, and holds the source tensors rounded once to f16.
#[test]
fn an_fp16_single_file_keeps_its_half_precision_tensors() {
    let stored =
        candle_core::safetensors::load(fixture("single-file/sd15.safetensors"), &Device::Cpu)
            .expect("sd15");
    let half: HashMap<String, Tensor> = stored
        .into_iter()
        .map(|(k, v)| {
            let v = if v.dtype() == DType::F32 {
                v.to_dtype(DType::F16).unwrap()
            } else {
                v
            };
            (k, v)
        })
        .collect();
    let dir = common::scratch_dir("single-file-fp16");
    let file = dir.join("sd15-fp16.safetensors");
    candle_core::safetensors::save(&half, &file).expect("write the fp16 file");
    let folder = diffusers_folder(&file, &settings(VaeChoice::Full).hub_options()).expect("fp16");
    let sources = &manifest()["files"]["sd15.safetensors"]["sources"];
    for (component, weights) in [
        ("unet", "diffusion_pytorch_model.safetensors"),
        ("vae", "diffusion_pytorch_model.safetensors"),
        ("text_encoder", "model.safetensors"),
    ] {
        let path = folder.join(component).join(weights);
        let converted = candle_core::safetensors::load(&path, &Device::Cpu).expect("converted");
        assert!(
            converted.values().all(|t| t.dtype() == DType::F16),
            "{component}: not f16"
        );
        let source_dir = fixture(sources[component].as_str().unwrap());
        for (key, want) in load_f32(&source_dir.join(weights)) {
            let want = want
                .to_dtype(DType::F16)
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap();
            let got = converted[&key].to_dtype(DType::F32).unwrap();
            assert!(same_values(&got, &want), "{component}: {key} differs");
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// TemporalNet2 as its repository publishes it: no diffusers weights, one `.ckpt` in ControlNet's
/// own training layout (`control_model.*`, with the frozen base UNet beside it). By its hub id it
/// converts into exactly the net's diffusers tensors, with the config of the base it steers and
/// the 6 control channels read from the file, and streams like the diffusers folder.
#[test]
fn temporalnet2_as_its_lone_ckpt_steers_like_its_diffusers_folder() {
    const ID: &str = "CiaraRowles/TemporalNet2";
    let entry = &manifest()["controlnets"][ID];
    let published = EngineSettings {
        model_root: Some(fixture("published-root")),
        vae: VaeChoice::Custom(fixture("tiny-taesd").display().to_string()),
        allow_any_resolution: true,
        ..EngineSettings::default()
    };
    let folder = sdstream::model::single_file::controlnet_folder(
        ID,
        &published.hub_options(),
        &fixture("tiny-sd-turbo/unet/config.json"),
    )
    .expect("converts")
    .expect("a single file");
    let converted = load_f32(&folder.join("diffusion_pytorch_model.safetensors"));
    let source_dir = fixture(entry["source"].as_str().unwrap());
    let source = load_f32(&source_dir.join("diffusion_pytorch_model.safetensors"));
    assert_eq!(converted.len(), entry["tensors"].as_u64().unwrap() as usize);
    assert_eq!(converted.len(), source.len());
    for (key, want) in &source {
        assert!(same_values(&converted[key], want), "{key} differs");
    }
    let config: Value =
        serde_json::from_str(&std::fs::read_to_string(folder.join("config.json")).unwrap())
            .unwrap();
    assert_eq!(config["conditioning_channels"], 6);
    assert_eq!(
        config["conditioning_embedding_out_channels"],
        entry["conditioning_embedding_out_channels"]
    );

    // The flow network (RAFT) is in the tiny model root; the net goes by its file there.
    let with_raft = EngineSettings {
        model_root: Some(fixture("model-root")),
        ..published.clone()
    };
    let ckpt = fixture(entry["file"].as_str().unwrap())
        .display()
        .to_string();
    let run = |net: String, scale: f64| {
        let body = json!({
            "model_id": fixture("tiny-sd-turbo").display().to_string(),
            "prompt": "a lighthouse in a storm",
            "width": 64,
            "height": 64,
            "seed": 21,
            "use_safety_checker": false,
            "controlnets": [{
                "model_id": net,
                "conditioning_scale": scale,
                "preprocessor": "temporal_net_tensorrt",
                "preprocessor_params": {"flow_strength": 0.4, "height": 256, "width": 256},
                "conditioning_channels": 6,
            }],
        });
        let params = StreamDiffusionParams::from_json_with(&body.to_string(), &with_raft)
            .unwrap_or_else(|e| panic!("the body validates: {e}"));
        common::stream_outputs(params, with_raft.clone(), &common::rgb8_frames(3))
    };
    let published_net = run(ckpt.clone(), 0.8);
    assert_eq!(
        published_net,
        run(source_dir.display().to_string(), 0.8),
        "the lone .ckpt streams otherwise than its diffusers folder"
    );
    assert_ne!(published_net, run(ckpt, 0.0), "the net does not act");
}
