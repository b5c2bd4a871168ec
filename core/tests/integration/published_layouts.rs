//! Networks in the layouts their repositories publish (tests/fixtures/published-root and
//! tiny-sdxl-sharded, written by tests/reference/make_published_layouts.py with torch and
//! diffusers) load and stream exactly like the same networks in today's diffusers layout:
//! a ControlNet as thibaud's lone fp16 `.bin` with a diffusers 0.15 config, the OpenPose body
//! network in torch's legacy format, an SDXL pipeline whose UNet and text encoders are sharded.

use crate::common;

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use common::{abs_err, fixture, scratch_dir};
use sdstream::model::weight_names;
use sdstream::params::VaeChoice;
use sdstream::preprocess::networks::{Network, NetworkKind};
use sdstream::{Engine, EngineOptions, EngineSettings, Frame, PixelFormat, StreamDiffusionParams};
use serde_json::json;

const THIBAUD_OPENPOSE: &str = "thibaud/controlnet-sd21-openpose-diffusers";

fn published_settings() -> EngineSettings {
    EngineSettings {
        model_root: Some(fixture("published-root")),
        vae: VaeChoice::Custom(fixture("tiny-taesd").display().to_string()),
        allow_any_resolution: true,
        ..EngineSettings::default()
    }
}

/// sd-turbo (from the published root) at 64², with one ControlNet `net` at scale 0.8.
fn params_with_net(net: Option<&str>) -> StreamDiffusionParams {
    let mut body = json!({
        "model_id": "stabilityai/sd-turbo",
        "prompt": "a lighthouse in a storm",
        "width": 64,
        "height": 64,
        "seed": 5,
    });
    if let Some(net) = net {
        body["controlnets"] = json!([{
            "model_id": net,
            "conditioning_scale": 0.8,
            "preprocessor": "passthrough",
        }]);
    }
    StreamDiffusionParams::from_json_with(&body.to_string(), &published_settings())
        .unwrap_or_else(|e| panic!("the body validates: {e}"))
}

fn frames() -> Vec<Vec<u8>> {
    common::rgb8_frames(3)
}

fn frame(data: &[u8]) -> Frame<'_> {
    Frame::packed(data, 64, 64, PixelFormat::Rgb8).unwrap()
}

fn stream(params: StreamDiffusionParams, settings: EngineSettings) -> Vec<Vec<u8>> {
    common::stream_outputs(params, settings, &frames())
}

#[test]
fn a_thibaud_net_as_a_lone_fp16_bin_with_its_old_config_streams_like_the_modern_folder() {
    let published = fixture("published-root").join(THIBAUD_OPENPOSE);
    assert!(
        published.join("diffusion_pytorch_model.bin").is_file()
            && !published
                .join("diffusion_pytorch_model.safetensors")
                .exists()
            && !published
                .join("diffusion_pytorch_model.fp16.safetensors")
                .exists(),
        "the fixture holds the .bin only, as the repository does"
    );
    // The same fp16 values in diffusers' layout of today.
    let modern = fixture("tiny-controlnet-a").display().to_string();
    let want = stream(params_with_net(Some(&modern)), published_settings());

    // Through the Engine, by its hub id, from the published root.
    let options = EngineOptions {
        warmup: false,
        ..EngineOptions::default()
    };
    let engine = Engine::new(
        params_with_net(Some(THIBAUD_OPENPOSE)),
        published_settings(),
        options,
    )
    .expect("the engine starts with the .bin net");
    for (i, (data, want)) in frames().iter().zip(&want).enumerate() {
        let got = engine.process(frame(data)).expect("a frame");
        assert!(&got.image.data == want, "frame {i}: .bin = safetensors");
    }
    engine.close();

    // The net acts: without it the pictures differ.
    let plain = stream(params_with_net(None), published_settings());
    let moved = plain
        .last()
        .unwrap()
        .iter()
        .zip(want.last().unwrap())
        .filter(|(a, b)| a != b)
        .count();
    assert!(moved > 100, "the ControlNet changes {moved} bytes");
}

#[test]
fn the_legacy_body_pose_model_computes_like_its_safetensors_twin() {
    let legacy = fixture("published-root/lllyasviel/Annotators/body_pose_model.pth");
    let head = std::fs::read(&legacy).unwrap();
    assert_eq!(head[..3], [0x80, 0x02, 0x8a], "a legacy pickle, not a zip");
    let modern = fixture("model-root/lllyasviel/Annotators/body_pose_model.safetensors");
    let load =
        |path: &Path| match Network::load(NetworkKind::BodyPose, path, DType::F32, &Device::Cpu)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        {
            Network::BodyPose(net) => net,
            _ => panic!("not a body pose network"),
        };
    let (a, b) = (load(&legacy), load(&modern));
    let x = Tensor::rand(-0.5f32, 0.5, (1, 3, 48, 40), &Device::Cpu).unwrap();
    let ((pafs_a, heat_a), (pafs_b, heat_b)) = (a.forward(&x).unwrap(), b.forward(&x).unwrap());
    assert_eq!(pafs_a.dims(), [1, 38, 6, 5]);
    assert_eq!(abs_err(&pafs_a, &pafs_b).0, 0.0);
    assert_eq!(abs_err(&heat_a, &heat_b).0, 0.0);
}

/// tiny-sdxl-sharded: the UNet in diffusers' safetensors shards, the first text encoder in
/// transformers' sharded torch pickles, the second in transformers' safetensors shards.
#[test]
fn a_sharded_sdxl_streams_like_the_single_files() {
    let settings = common::tiny_settings("self");
    let run = |id: &str| {
        let body = json!({
            "model_id": fixture(id).display().to_string(),
            "prompt": "a red fox",
            "width": 64,
            "height": 64,
            "seed": 3,
        });
        let params = StreamDiffusionParams::from_json_with(&body.to_string(), &settings).unwrap();
        stream(params, settings.clone())
    };
    let shards = |component: &str| -> Vec<String> {
        let mut names: Vec<String> =
            std::fs::read_dir(fixture(&format!("tiny-sdxl-sharded/{component}")))
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .filter(|n| n.contains("-of-") || n.contains(".index."))
                .collect();
        names.sort();
        names
    };
    assert_eq!(shards("unet").len(), 4);
    assert_eq!(
        shards("text_encoder"),
        [
            "pytorch_model-00001-of-00002.bin",
            "pytorch_model-00002-of-00002.bin",
            "pytorch_model.bin.index.json"
        ]
    );
    assert_eq!(
        shards("text_encoder_2"),
        [
            "model-00001-of-00002.safetensors",
            "model-00002-of-00002.safetensors",
            "model.safetensors.index.json"
        ]
    );
    assert_eq!(run("tiny-sdxl-sharded"), run("tiny-sdxl"));
}

#[test]
fn a_bad_shard_index_is_refused_naming_what_is_wrong() {
    let load = |dir: &Path| {
        sdstream::model::unet::UNet2DConditionModel::load(dir, DType::F32, &Device::Cpu)
            .map(|_| ())
            .expect_err("refused")
            .to_string()
    };
    let fresh = |tag: &str| {
        let dir = scratch_dir(tag);
        common::copy_dir(&fixture("tiny-sdxl-sharded/unet"), &dir);
        dir
    };
    let index = "diffusion_pytorch_model.safetensors.index.json";
    let edit = |dir: &Path, f: &dyn Fn(&mut serde_json::Value)| {
        let path = dir.join(index);
        let mut json: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        f(&mut json);
        std::fs::write(&path, json.to_string()).unwrap();
    };

    // A shard gone.
    let dir = fresh("shard-gone");
    std::fs::remove_file(dir.join("diffusion_pytorch_model-00002-of-00003.safetensors")).unwrap();
    let err = load(&dir);
    assert!(
        err.contains("diffusion_pytorch_model-00002-of-00003.safetensors"),
        "{err}"
    );

    // A shard named outside the folder.
    let dir = fresh("shard-escape");
    edit(&dir, &|j| {
        let map = j["weight_map"].as_object_mut().unwrap();
        let first = map.keys().next().unwrap().clone();
        map[&first] = json!("../../etc/passwd");
    });
    let err = load(&dir);
    assert!(
        err.contains("../../etc/passwd") && err.contains("not a weights file name"),
        "{err}"
    );

    // The index puts a tensor in another shard than the one holding it.
    let dir = fresh("shard-moved");
    let moved = {
        let text = std::fs::read_to_string(dir.join(index)).unwrap();
        let json: serde_json::Value = serde_json::from_str(&text).unwrap();
        let (name, _) = json["weight_map"]
            .as_object()
            .unwrap()
            .iter()
            .find(|(_, s)| s.as_str() == Some("diffusion_pytorch_model-00001-of-00003.safetensors"))
            .map(|(n, s)| (n.clone(), s.clone()))
            .unwrap();
        name
    };
    edit(&dir, &|j| {
        j["weight_map"][&moved] = json!("diffusion_pytorch_model-00002-of-00003.safetensors");
    });
    let err = load(&dir);
    assert!(err.contains(&moved), "{err}");

    // Not an index at all.
    let dir = fresh("shard-garbage");
    std::fs::write(dir.join(index), b"{\"metadata\": {}}").unwrap();
    let err = load(&dir);
    assert!(err.contains("no `weight_map`"), "{err}");

    // No weights in any form: the error lists the forms.
    let dir = scratch_dir("no-weights-at-all");
    std::fs::copy(
        fixture("tiny-sdxl-sharded/unet/config.json"),
        dir.join("config.json"),
    )
    .unwrap();
    let err = load(&dir);
    assert!(
        err.contains("diffusion_pytorch_model.bin")
            && err.contains("diffusion_pytorch_model.safetensors.index.json"),
        "{err}"
    );
}

#[test]
fn bf16_takes_the_full_precision_file_and_f16_the_fp16_variant() {
    // A folder with both: f16 reads the fp16 file, bf16 and f32 the full one (fp16 values
    // rounded again to bf16 would differ from the full ones rounded once).
    let dir = scratch_dir("both-precisions");
    for name in [
        "diffusion_pytorch_model.safetensors",
        "diffusion_pytorch_model.fp16.safetensors",
    ] {
        std::fs::write(dir.join(name), b"").unwrap();
    }
    let pick = |dtype| {
        sdstream::model::weights_file(
            &dir,
            "diffusion_pytorch_model",
            weight_names::prefers_fp16(dtype),
        )
        .unwrap()
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned()
    };
    assert_eq!(pick(DType::F16), "diffusion_pytorch_model.fp16.safetensors");
    assert_eq!(pick(DType::BF16), "diffusion_pytorch_model.safetensors");
    assert_eq!(pick(DType::F32), "diffusion_pytorch_model.safetensors");
    // A lone .bin is taken in any precision.
    let dir = scratch_dir("bin-only");
    std::fs::write(dir.join("diffusion_pytorch_model.bin"), b"").unwrap();
    for dtype in [DType::F16, DType::BF16, DType::F32] {
        let got = sdstream::model::weights_file(
            &dir,
            "diffusion_pytorch_model",
            weight_names::prefers_fp16(dtype),
        )
        .unwrap();
        assert!(got.ends_with("diffusion_pytorch_model.bin"));
    }
}
