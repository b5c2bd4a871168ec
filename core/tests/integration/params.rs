//! The parameter contract: defaults, JSON round trips, unknown fields, every validation rule with
//! its message, engine settings, and hot / swap / reload classification.

use std::collections::BTreeSet;

use sdstream::params::{
    Acceleration, CfgType, ControlNetConfig, ControlNetField, DTypeChoice, DeviceSpec, HotChange,
    IPAdapterConfig, InterpolationMethod, IpAdapterField, IpAdapterType, ProcessingConfig,
    ProcessorConfig, Prompt, Seed, VaeChoice,
};
use sdstream::{EngineSettings, Error, StreamDiffusionParams, Update, classify};
use serde_json::{Value, json};

/// A folder that certainly exists: stands in for a local model folder.
const LOCAL_DIR: &str = env!("CARGO_MANIFEST_DIR");

/// Daydream's sd-turbo body with its five sd21 ControlNets, as its service documents it.
const SD_TURBO_FIVE_CONTROLNETS: &str = r#"{
  "model_id": "stabilityai/sd-turbo",
  "prompt": "flowers",
  "prompt_interpolation_method": "slerp",
  "normalize_prompt_weights": true,
  "negative_prompt": "blurry, low quality, flat, 2d",
  "guidance_scale": 1.0,
  "delta": 0.7,
  "num_inference_steps": 50,
  "t_index_list": [12, 20, 32],
  "width": 512,
  "height": 512,
  "lora_dict": null,
  "use_lcm_lora": true,
  "lcm_lora_id": "latent-consistency/lcm-lora-sdv1-5",
  "acceleration": "tensorrt",
  "use_safety_checker": true,
  "safety_checker_threshold": 0.5,
  "use_denoising_batch": true,
  "do_add_noise": true,
  "skip_diffusion": false,
  "seed": 789,
  "seed_interpolation_method": "linear",
  "normalize_seed_weights": true,
  "enable_similar_image_filter": false,
  "similar_image_filter_threshold": 0.98,
  "similar_image_filter_max_skip_frame": 10,
  "controlnets": [
    {"model_id": "thibaud/controlnet-sd21-openpose-diffusers", "conditioning_scale": 0.711,
     "preprocessor": "pose_tensorrt", "preprocessor_params": {}, "enabled": true,
     "control_guidance_start": 0.0, "control_guidance_end": 1.0},
    {"model_id": "thibaud/controlnet-sd21-hed-diffusers", "conditioning_scale": 0.2,
     "preprocessor": "soft_edge", "preprocessor_params": {}, "enabled": true,
     "control_guidance_start": 0.0, "control_guidance_end": 1.0},
    {"model_id": "thibaud/controlnet-sd21-canny-diffusers", "conditioning_scale": 0.2,
     "preprocessor": "canny", "preprocessor_params": {"low_threshold": 100, "high_threshold": 200},
     "enabled": true, "control_guidance_start": 0.0, "control_guidance_end": 1.0},
    {"model_id": "thibaud/controlnet-sd21-depth-diffusers", "conditioning_scale": 0.5,
     "preprocessor": "depth_tensorrt", "preprocessor_params": {}, "enabled": true,
     "control_guidance_start": 0.0, "control_guidance_end": 1.0},
    {"model_id": "thibaud/controlnet-sd21-color-diffusers", "conditioning_scale": 0.2,
     "preprocessor": "passthrough", "preprocessor_params": {}, "enabled": true,
     "control_guidance_start": 0.0, "control_guidance_end": 1.0}
  ],
  "ip_adapter": {"enabled": false},
  "ip_adapter_style_image_url": "https://storage.googleapis.com/lp-ai-assets/ipadapter_style_imgs/textures/vortex.jpeg"
}"#;

/// Daydream's SDXL body (without its TemporalNet), IPAdapter on.
const SDXL_BODY: &str = r#"{
  "model_id": "stabilityai/sdxl-turbo",
  "prompt": [["neon glass shards", 0.7], ["liquid smoke", 0.3]],
  "t_index_list": [36],
  "seed": [[42, 0.25], [7, 0.75]],
  "controlnets": [
    {"model_id": "xinsir/controlnet-depth-sdxl-1.0", "conditioning_scale": 0.7,
     "preprocessor": "depth_tensorrt"},
    {"model_id": "xinsir/controlnet-canny-sdxl-1.0", "conditioning_scale": 0.2,
     "preprocessor": "canny", "conditioning_channels": 3},
    {"model_id": "xinsir/controlnet-tile-sdxl-1.0", "conditioning_scale": 0.15,
     "preprocessor": "feedback", "control_guidance_start": 0.1, "control_guidance_end": 0.9}
  ],
  "ip_adapter": {"scale": 0.6, "enabled": true, "type": "faceid", "weight_type": "style transfer"},
  "image_preprocessing": {"enabled": true, "processors": [{"type": "blur", "params": {"radius": 2}}]},
  "image_postprocessing": {"processors": [{"type": "upscale", "enabled": false}]},
  "latent_preprocessing": {"enabled": false, "processors": [{"type": "latent_feedback"}]},
  "lora_dict": {"some/lora": 0.8, "other/lora": -0.25},
  "acceleration": "xformers",
  "show_reloading_frame": false
}"#;

fn params(body: &str) -> StreamDiffusionParams {
    match StreamDiffusionParams::from_json(body) {
        Ok(p) => p,
        Err(e) => panic!("body should parse: {e}\n{body}"),
    }
}

/// The (field, message) of an InvalidParam error; panics on success or another error kind.
fn invalid(result: Result<StreamDiffusionParams, Error>, what: &str) -> (String, String) {
    match result {
        Err(Error::InvalidParam { field, message }) => (field, message),
        Err(other) => panic!("{what}: expected InvalidParam, got {other:?}"),
        Ok(p) => panic!("{what}: expected an error, parsed {p:?}"),
    }
}

fn any_resolution() -> EngineSettings {
    EngineSettings {
        allow_any_resolution: true,
        ..EngineSettings::default()
    }
}

#[test]
fn empty_object_gives_documented_defaults() {
    let p = params("{}");
    assert_eq!(p, StreamDiffusionParams::default());
    assert_eq!(p.model_id, "stabilityai/sd-turbo");
    assert_eq!(p.prompt, Prompt::Text("flowers".into()));
    assert_eq!(p.prompt_interpolation_method, InterpolationMethod::Slerp);
    assert!(p.normalize_prompt_weights);
    assert_eq!(p.negative_prompt, "blurry, low quality, flat, 2d");
    assert_eq!(p.guidance_scale, 1.0);
    assert_eq!(p.delta, 0.7);
    assert_eq!(p.num_inference_steps, 50);
    assert_eq!(p.t_index_list, vec![12, 20, 32]);
    assert_eq!((p.width, p.height), (512, 512));
    assert_eq!(p.lora_dict, None);
    assert!(p.use_lcm_lora);
    assert_eq!(p.lcm_lora_id, "latent-consistency/lcm-lora-sdv1-5");
    assert_eq!(p.acceleration, Acceleration::Tensorrt);
    assert!(p.use_safety_checker);
    assert_eq!(p.safety_checker_threshold, 0.5);
    assert!(p.use_denoising_batch);
    assert!(p.do_add_noise);
    assert!(!p.skip_diffusion);
    assert_eq!(p.seed, Seed::Single(789));
    assert_eq!(p.seed_interpolation_method, InterpolationMethod::Linear);
    assert!(p.normalize_seed_weights);
    assert!(!p.enable_similar_image_filter);
    assert_eq!(p.similar_image_filter_threshold, 0.98);
    assert_eq!(p.similar_image_filter_max_skip_frame, 10);
    assert!(p.controlnets.is_empty());
    assert!(!p.ip_adapter.enabled);
    assert_eq!(p.ip_adapter.kind, IpAdapterType::Regular);
    assert_eq!(p.ip_adapter.scale, 1.0);
    assert_eq!(p.ip_adapter.weight_type.as_deref(), Some("linear"));
    assert_eq!(
        p.ip_adapter.insightface_model_name.as_deref(),
        Some("buffalo_l")
    );
    assert_eq!(p.ip_adapter.ipadapter_model_path, None);
    assert_eq!(p.ip_adapter.image_encoder_path, None);
    assert_eq!(
        p.ip_adapter_style_image_url,
        "https://storage.googleapis.com/lp-ai-assets/ipadapter_style_imgs/textures/vortex.jpeg"
    );
    assert_eq!(p.image_preprocessing, None);
    assert_eq!(p.image_postprocessing, None);
    assert_eq!(p.latent_preprocessing, None);
    assert_eq!(p.latent_postprocessing, None);
    assert!(p.show_reloading_frame);
    assert!(p.validate(&EngineSettings::default()).is_ok());
}

#[test]
fn nested_defaults() {
    // Inside an object that is present, the nested class defaults apply (Daydream semantics):
    // `ip_adapter: {}` is an enabled adapter, a ControlNet needs only its model_id.
    let p = params(
        r#"{"model_id": "Lykon/dreamshaper-8", "ip_adapter": {},
            "controlnets": [{"model_id": "lllyasviel/control_v11p_sd15_canny"}],
            "image_preprocessing": {}, "image_postprocessing": {"processors": [{"type": "sharpen"}]}}"#,
    );
    assert_eq!(p.ip_adapter, IPAdapterConfig::default());
    assert!(p.ip_adapter.enabled);
    let net = &p.controlnets[0];
    assert_eq!(
        net,
        &ControlNetConfig::new("lllyasviel/control_v11p_sd15_canny")
    );
    assert_eq!(net.conditioning_scale, 1.0);
    assert_eq!(net.conditioning_channels, None);
    assert_eq!(net.preprocessor, "passthrough");
    assert!(net.preprocessor_params.is_empty());
    assert!(net.enabled);
    assert_eq!(
        (net.control_guidance_start, net.control_guidance_end),
        (0.0, 1.0)
    );
    assert_eq!(p.image_preprocessing, Some(ProcessingConfig::default()));
    let post = p
        .image_postprocessing
        .as_ref()
        .map(|c| c.processors.clone());
    assert_eq!(post, Some(vec![ProcessorConfig::new("sharpen")]));
}

#[test]
fn weighted_prompt_and_seed_parse() {
    let p = params(r#"{"prompt": [["a", 0.5], ["b", 0.5]], "seed": [[1, 0.3], [2, 0.7]]}"#);
    assert_eq!(
        p.prompt,
        Prompt::Weighted(vec![("a".into(), 0.5), ("b".into(), 0.5)])
    );
    assert_eq!(p.seed, Seed::Weighted(vec![(1, 0.3), (2, 0.7)]));
    assert_eq!(p.prompt.weighted(), vec![("a", 0.5), ("b", 0.5)]);
    assert_eq!(p.seed.seeds(), vec![1, 2]);
    // Single forms read as weight 1, as Daydream feeds them to the blender.
    assert_eq!(Prompt::from("x").weighted(), vec![("x", 1.0)]);
    assert_eq!(Seed::from(5).weighted(), vec![(5, 1.0)]);
    // Integer weights are numbers too.
    let p = params(r#"{"prompt": [["a", 1]], "seed": [[3, 2]]}"#);
    assert_eq!(p.prompt, Prompt::Weighted(vec![("a".into(), 1.0)]));
    assert_eq!(p.seed, Seed::Weighted(vec![(3, 2.0)]));
}

#[test]
fn realistic_daydream_body_parses() {
    let p = params(SD_TURBO_FIVE_CONTROLNETS);
    assert_eq!(p.controlnets.len(), 5);
    let ids: Vec<&str> = p.controlnets.iter().map(|c| c.model_id.as_str()).collect();
    assert_eq!(
        ids,
        [
            "thibaud/controlnet-sd21-openpose-diffusers",
            "thibaud/controlnet-sd21-hed-diffusers",
            "thibaud/controlnet-sd21-canny-diffusers",
            "thibaud/controlnet-sd21-depth-diffusers",
            "thibaud/controlnet-sd21-color-diffusers",
        ]
    );
    assert_eq!(p.controlnets[0].conditioning_scale, 0.711);
    assert_eq!(p.controlnets[2].preprocessor, "canny");
    assert_eq!(
        p.controlnets[2].preprocessor_params["low_threshold"],
        json!(100)
    );
    assert_eq!(
        p.controlnets[2].preprocessor_params["high_threshold"],
        json!(200)
    );
    assert!(!p.ip_adapter.enabled);

    let x = params(SDXL_BODY);
    assert_eq!(x.controlnets.len(), 3);
    assert_eq!(x.controlnets[1].conditioning_channels, Some(3));
    assert_eq!(x.ip_adapter.kind, IpAdapterType::Faceid);
    assert_eq!(x.acceleration, Acceleration::Xformers);
    assert_eq!(x.lora_dict.as_ref().map(|l| l.len()), Some(2));
    let pre = x
        .image_preprocessing
        .as_ref()
        .map(|c| c.processors[0].kind.as_str());
    assert_eq!(pre, Some("blur"));
}

/// Every key/value of `original` appears unchanged in `written` (which may add defaults).
fn assert_subset(original: &Value, written: &Value, path: &str) {
    match (original, written) {
        (Value::Object(a), Value::Object(b)) => {
            for (key, value) in a {
                let Some(other) = b.get(key) else {
                    panic!("{path}.{key} missing from the written JSON");
                };
                assert_subset(value, other, &format!("{path}.{key}"));
            }
        }
        (Value::Array(a), Value::Array(b)) => {
            assert_eq!(a.len(), b.len(), "{path}: length changed");
            for (i, (x, y)) in a.iter().zip(b).enumerate() {
                assert_subset(x, y, &format!("{path}[{i}]"));
            }
        }
        // 1 and 1.0 are the same number to Daydream.
        (Value::Number(a), Value::Number(b)) => {
            assert_eq!(a.as_f64(), b.as_f64(), "{path}: number changed")
        }
        (a, b) => assert_eq!(a, b, "{path}: value changed"),
    }
}

#[test]
fn json_round_trip_is_stable() {
    let bodies = [
        "{}",
        SD_TURBO_FIVE_CONTROLNETS,
        SDXL_BODY,
        r#"{"prompt": [["a", 0.5], ["b", 0.5]], "seed": [[1, 0.3], [2, 0.7]]}"#,
        r#"{"ip_adapter": {"enabled": false, "weight_type": null, "insightface_model_name": null}}"#,
    ];
    for body in bodies {
        let first = params(body);
        let written = first.to_json();
        let second = params(&written);
        assert_eq!(first, second, "struct changed through JSON: {body}");
        assert_eq!(written, second.to_json(), "JSON not stable: {body}");
        let original: Value = serde_json::from_str(body).unwrap();
        let written: Value = serde_json::from_str(&written).unwrap();
        assert_subset(&original, &written, "");
    }
    // Every field is written out, so a reader needs no defaults table.
    let written: Value = serde_json::from_str(&StreamDiffusionParams::default().to_json()).unwrap();
    assert_eq!(written.as_object().map(|o| o.len()), Some(35));
    assert_eq!(
        written["cached_attention"],
        json!({"enabled": false, "max_frames": 1, "interval": 1})
    );
    assert_eq!(written["prompt"], json!("flowers"));
    assert_eq!(written["seed"], json!(789));
    assert_eq!(written["lora_dict"], Value::Null);
    assert_eq!(written["ip_adapter"]["enabled"], json!(false));
}

#[test]
fn unknown_fields_rejected_at_every_level() {
    let cases: &[(&str, &str)] = &[
        (r#"{"bogus": 1}"#, "bogus"),
        (
            r#"{"cached_attention": {"enabled": true, "frames": 2}}"#,
            "cached_attention.frames",
        ),
        (
            r#"{"controlnets": [{"model_id": "thibaud/controlnet-sd21-hed-diffusers", "scale": 1}]}"#,
            "controlnets[0].scale",
        ),
        (
            r#"{"controlnets": [{"model_id": "thibaud/controlnet-sd21-hed-diffusers"},
                {"model_id": "thibaud/controlnet-sd21-canny-diffusers", "order": 2}]}"#,
            "controlnets[1].order",
        ),
        (r#"{"ip_adapter": {"strength": 1}}"#, "ip_adapter.strength"),
        (
            r#"{"image_preprocessing": {"chain": []}}"#,
            "image_preprocessing.chain",
        ),
        (
            r#"{"image_postprocessing": {"processors": [{"type": "blur", "order": 1}]}}"#,
            "image_postprocessing.processors[0].order",
        ),
        (
            r#"{"latent_postprocessing": {"processors": [{"type": "latent_feedback", "x": 1}]}}"#,
            "latent_postprocessing.processors[0].x",
        ),
    ];
    for (body, path) in cases {
        let (field, message) = invalid(StreamDiffusionParams::from_json(body), body);
        assert_eq!(&field, path, "{body}");
        assert!(message.contains("unknown field"), "{body}: {message}");
    }
    let settings = EngineSettings::from_json(r#"{"device": "cpu", "threads": 4}"#);
    match settings {
        Err(Error::InvalidParam { field, message }) => {
            assert_eq!(field, "threads");
            assert!(message.contains("unknown field"), "{message}");
        }
        other => panic!("expected unknown-field error, got {other:?}"),
    }
}

#[test]
fn type_errors_name_the_path() {
    let cases: &[(&str, &str, &str)] = &[
        (
            r#"{"guidance_scale": "high"}"#,
            "guidance_scale",
            "invalid type",
        ),
        (
            r#"{"controlnets": [{"model_id": "thibaud/controlnet-sd21-hed-diffusers"},
                {"model_id": "thibaud/controlnet-sd21-canny-diffusers", "conditioning_scale": "x"}]}"#,
            "controlnets[1].conditioning_scale",
            "invalid type",
        ),
        (
            r#"{"controlnets": [{}]}"#,
            "controlnets[0]",
            "missing field `model_id`",
        ),
        (
            r#"{"prompt": 5}"#,
            "prompt",
            "prompt string or a list of [text, weight]",
        ),
        (
            r#"{"prompt": [["a", "b"]]}"#,
            "prompt[0][1]",
            "invalid type",
        ),
        (
            r#"{"seed": "789"}"#,
            "seed",
            "integer seed or a list of [seed, weight]",
        ),
        (r#"{"seed": [[1.5, 1.0]]}"#, "seed[0][0]", "invalid type"),
        (
            r#"{"prompt_interpolation_method": "cubic"}"#,
            "prompt_interpolation_method",
            "unknown variant",
        ),
        (
            r#"{"acceleration": "cuda"}"#,
            "acceleration",
            "unknown variant",
        ),
        (
            r#"{"ip_adapter": {"type": "plus"}}"#,
            "ip_adapter.type",
            "unknown variant",
        ),
        (
            r#"{"t_index_list": [1, 2.5]}"#,
            "t_index_list[1]",
            "invalid type",
        ),
        (
            r#"{"ip_adapter": null}"#,
            "ip_adapter",
            "invalid type: null",
        ),
    ];
    for (body, path, fragment) in cases {
        let (field, message) = invalid(StreamDiffusionParams::from_json(body), body);
        assert_eq!(&field, path, "{body}: {message}");
        assert!(message.contains(fragment), "{body}: {message}");
    }
    // Not JSON at all, or not an object: a JSON error, not a field error.
    for body in ["{", "[1, 2]", "{} trailing", ""] {
        match StreamDiffusionParams::from_json(body) {
            Err(Error::Json(_)) => {}
            other => panic!("{body:?}: expected Error::Json, got {other:?}"),
        }
    }
}

/// One validation rule: a body (or an edit of the defaults), the field and message expected.
struct Rule {
    name: &'static str,
    body: String,
    settings: EngineSettings,
    field: &'static str,
    fragments: &'static [&'static str],
}

fn rule(
    name: &'static str,
    body: Value,
    field: &'static str,
    fragments: &'static [&'static str],
) -> Rule {
    Rule {
        name,
        body: body.to_string(),
        settings: EngineSettings::default(),
        field,
        fragments,
    }
}

fn cn(id: &str) -> Value {
    json!({"model_id": id})
}

#[test]
fn every_validation_rule_has_its_message() {
    let hed = "thibaud/controlnet-sd21-hed-diffusers";
    let canny21 = "thibaud/controlnet-sd21-canny-diffusers";
    let sdxl_ids = [
        "xinsir/controlnet-depth-sdxl-1.0",
        "xinsir/controlnet-canny-sdxl-1.0",
        "xinsir/controlnet-tile-sdxl-1.0",
    ];
    let mut rules = vec![
        rule(
            "t_index_list empty",
            json!({"t_index_list": []}),
            "t_index_list",
            &["t_index_list must have between 1 and 4 elements", "got 0"],
        ),
        rule(
            "t_index_list too long",
            json!({"t_index_list": [1, 2, 3, 4, 5]}),
            "t_index_list",
            &["t_index_list must have between 1 and 4 elements", "got 5"],
        ),
        rule(
            "t_index_list value = steps",
            json!({"t_index_list": [12, 20, 50]}),
            "t_index_list[2]",
            &[
                "Each t_index_list value must be between 0 and num_inference_steps (50). Found 50 at index 2.",
            ],
        ),
        rule(
            "t_index_list negative",
            json!({"t_index_list": [-1, 20]}),
            "t_index_list[0]",
            &[
                "Each t_index_list value must be between 0 and num_inference_steps (50). Found -1 at index 0.",
            ],
        ),
        rule(
            "t_index_list vs smaller grid",
            json!({"num_inference_steps": 10, "t_index_list": [3, 10]}),
            "t_index_list[1]",
            &["num_inference_steps (10). Found 10 at index 1."],
        ),
        rule(
            "t_index_list decreasing",
            json!({"t_index_list": [12, 32, 20]}),
            "t_index_list[2]",
            &["t_index_list must be in non-decreasing order. 20 < 32"],
        ),
        rule(
            "num_inference_steps 0",
            json!({"num_inference_steps": 0, "t_index_list": [0]}),
            "num_inference_steps",
            &["num_inference_steps must be between 1 and 100", "got 0"],
        ),
        rule(
            "num_inference_steps 101",
            json!({"num_inference_steps": 101}),
            "num_inference_steps",
            &["num_inference_steps must be between 1 and 100", "got 101"],
        ),
        rule(
            "width not x64",
            json!({"width": 500}),
            "width",
            &[
                "width must be between 384 and 1024 and a multiple of 64",
                "got 500",
            ],
        ),
        rule(
            "width too small",
            json!({"width": 320}),
            "width",
            &[
                "width must be between 384 and 1024 and a multiple of 64",
                "got 320",
            ],
        ),
        rule(
            "height too large",
            json!({"height": 1088}),
            "height",
            &[
                "height must be between 384 and 1024 and a multiple of 64",
                "got 1088",
            ],
        ),
        rule(
            "height not x64",
            json!({"height": 520}),
            "height",
            &[
                "height must be between 384 and 1024 and a multiple of 64",
                "got 520",
            ],
        ),
        rule(
            "seed negative",
            json!({"seed": -1}),
            "seed",
            &["0 <= seed < 2^53", "got -1"],
        ),
        rule(
            "seed 2^53",
            json!({"seed": 9007199254740992_i64}),
            "seed",
            &["0 <= seed < 2^53", "got 9007199254740992"],
        ),
        rule(
            "weighted seed negative",
            json!({"seed": [[1, 0.5], [-3, 0.5]]}),
            "seed[1][0]",
            &["0 <= seed < 2^53", "got -3"],
        ),
        rule(
            "weighted seed empty",
            json!({"seed": []}),
            "seed",
            &["non-empty list", "got []"],
        ),
        rule(
            "seed weights sum 0",
            json!({"seed": [[1, 0.5], [2, -0.5]]}),
            "seed",
            &["seed weights sum to 0", "normalize_seed_weights"],
        ),
        rule(
            "prompt empty",
            json!({"prompt": ""}),
            "prompt",
            &["prompt text must not be empty"],
        ),
        rule(
            "prompt blank",
            json!({"prompt": "   "}),
            "prompt",
            &["prompt text must not be empty"],
        ),
        rule(
            "weighted prompt empty text",
            json!({"prompt": [["a", 0.5], ["", 0.5]]}),
            "prompt[1][0]",
            &["prompt[1] text must not be empty"],
        ),
        rule(
            "weighted prompt empty list",
            json!({"prompt": []}),
            "prompt",
            &["non-empty list of [text, weight] pairs", "got []"],
        ),
        rule(
            "prompt weights sum 0",
            json!({"prompt": [["a", 0], ["b", 0]]}),
            "prompt",
            &["prompt weights sum to 0", "normalize_prompt_weights"],
        ),
        rule(
            "model_id unknown",
            json!({"model_id": "runwayml/stable-diffusion-v1-5"}),
            "model_id",
            &[
                "Invalid model_id: runwayml/stable-diffusion-v1-5",
                "'stabilityai/sd-turbo'",
                "local folder",
            ],
        ),
        rule(
            "controlnet duplicate",
            json!({"controlnets": [cn(hed), cn(canny21), cn(hed)]}),
            "controlnets[2].model_id",
            &["Duplicate controlnet model_id: thibaud/controlnet-sd21-hed-diffusers"],
        ),
        rule(
            "controlnet wrong family",
            json!({"controlnets": [cn(hed), cn(sdxl_ids[0])]}),
            "controlnets[1].model_id",
            &[
                "Invalid ControlNets for model stabilityai/sd-turbo: ['xinsir/controlnet-depth-sdxl-1.0']",
                "sd21 models accept",
            ],
        ),
        rule(
            "sd15 net on sdxl",
            json!({"model_id": "stabilityai/sdxl-turbo",
                "controlnets": [cn("lllyasviel/control_v11p_sd15_canny")]}),
            "controlnets[0].model_id",
            &[
                "Invalid ControlNets for model stabilityai/sdxl-turbo: ['lllyasviel/control_v11p_sd15_canny']",
            ],
        ),
        rule(
            "controlnet unknown id",
            json!({"controlnets": [cn("someone/controlnet-x")]}),
            "controlnets[0].model_id",
            &["unknown ControlNet 'someone/controlnet-x'"],
        ),
        rule(
            "temporalnet of another family",
            json!({"controlnets": [cn("daydreamlive/TemporalNet2-stable-diffusion-v1-5")]}),
            "controlnets[0].model_id",
            &["Invalid ControlNets for model stabilityai/sd-turbo"],
        ),
        rule(
            "sdxl more than 3 enabled",
            json!({"model_id": "stabilityai/sdxl-turbo",
                "controlnets": [cn(sdxl_ids[0]), cn(sdxl_ids[1]), cn(sdxl_ids[2]), cn(LOCAL_DIR)]}),
            "controlnets",
            &["SDXL models support a maximum of 3 enabled ControlNets, found 4."],
        ),
        rule(
            "ip_adapter on sd21",
            json!({"ip_adapter": {"enabled": true}}),
            "ip_adapter.enabled",
            &["IPAdapter is not supported for stabilityai/sd-turbo"],
        ),
        rule(
            "ip_adapter weight_type",
            json!({"model_id": "Lykon/dreamshaper-8",
                "ip_adapter": {"weight_type": "heavy"}}),
            "ip_adapter.weight_type",
            &["unknown weight type 'heavy'", "'ease in-out'"],
        ),
        rule(
            "ip_adapter model path",
            json!({"ip_adapter": {"enabled": false,
                "ipadapter_model_path": "x.bin"}}),
            "ip_adapter.ipadapter_model_path",
            &["unknown IPAdapter model path 'x.bin'"],
        ),
        rule(
            "ip_adapter encoder path",
            json!({"ip_adapter": {"enabled": false,
                "image_encoder_path": "y"}}),
            "ip_adapter.image_encoder_path",
            &["unknown image encoder path 'y'"],
        ),
        rule(
            "ip_adapter insightface",
            json!({"ip_adapter": {"enabled": false,
                "insightface_model_name": "antelope"}}),
            "ip_adapter.insightface_model_name",
            &["unknown InsightFace model 'antelope'"],
        ),
        rule(
            "guidance start > 1",
            json!({"controlnets": [{"model_id": hed, "control_guidance_start": 1.5}]}),
            "controlnets[0].control_guidance_start",
            &[
                "controlnets[0].control_guidance_start must be between 0 and 1",
                "got 1.5",
            ],
        ),
        rule(
            "guidance end < 0",
            json!({"controlnets": [cn(canny21),
                {"model_id": hed, "control_guidance_end": -0.1}]}),
            "controlnets[1].control_guidance_end",
            &[
                "controlnets[1].control_guidance_end must be between 0 and 1",
                "got -0.1",
            ],
        ),
        rule(
            "guidance start > end",
            json!({"controlnets": [{"model_id": hed,
                "control_guidance_start": 0.8, "control_guidance_end": 0.2}]}),
            "controlnets[0].control_guidance_end",
            &["control_guidance_start (0.8) must be <= control_guidance_end (0.2)"],
        ),
        rule(
            "conditioning_channels 7",
            json!({"controlnets": [{"model_id": hed, "conditioning_channels": 7}]}),
            "controlnets[0].conditioning_channels",
            &["must be between 1 and 6", "got 7"],
        ),
        rule(
            "conditioning_channels 0",
            json!({"controlnets": [{"model_id": hed, "conditioning_channels": 0}]}),
            "controlnets[0].conditioning_channels",
            &["must be between 1 and 6", "got 0"],
        ),
        rule(
            "preprocessor unknown",
            json!({"controlnets": [{"model_id": hed, "preprocessor": "sobel"}]}),
            "controlnets[0].preprocessor",
            &["unknown preprocessor 'sobel'", "'canny'"],
        ),
        rule(
            "similar threshold > 1",
            json!({"similar_image_filter_threshold": 1.5}),
            "similar_image_filter_threshold",
            &[
                "similar_image_filter_threshold must be between 0 and 1",
                "got 1.5",
            ],
        ),
        rule(
            "similar threshold < 0",
            json!({"similar_image_filter_threshold": -0.01}),
            "similar_image_filter_threshold",
            &["must be between 0 and 1", "got -0.01"],
        ),
        rule(
            "max skip frame < 0",
            json!({"similar_image_filter_max_skip_frame": -1}),
            "similar_image_filter_max_skip_frame",
            &["similar_image_filter_max_skip_frame must be >= 0", "got -1"],
        ),
        rule(
            "image processor unknown",
            json!({"image_preprocessing": {"processors": [
                {"type": "blur"}, {"type": "vignette"}]}}),
            "image_preprocessing.processors[1].type",
            &["unknown processor 'vignette'"],
        ),
        rule(
            "image-domain processor in latent chain",
            json!({"latent_preprocessing": {"processors": [
                {"type": "blur"}]}}),
            "latent_preprocessing.processors[0].type",
            &["unknown processor 'blur'", "'latent_feedback'"],
        ),
        rule(
            "lora id empty",
            json!({"lora_dict": {"": 1.0}}),
            "lora_dict",
            &["lora_dict keys must be non-empty"],
        ),
    ];
    // The relaxed resolution rule.
    for (name, body, field, fragments) in [
        (
            "any-res width 60",
            json!({"width": 60}),
            "width",
            &[
                "width must be between 64 and 2048 and a multiple of 8",
                "got 60",
            ][..],
        ),
        (
            "any-res height 2056",
            json!({"height": 2056}),
            "height",
            &[
                "height must be between 64 and 2048 and a multiple of 8",
                "got 2056",
            ][..],
        ),
        (
            "any-res width 100",
            json!({"width": 100}),
            "width",
            &["multiple of 8", "got 100"][..],
        ),
    ] {
        rules.push(Rule {
            name,
            body: body.to_string(),
            settings: any_resolution(),
            field,
            fragments,
        });
    }

    for r in &rules {
        let result = StreamDiffusionParams::from_json_with(&r.body, &r.settings);
        let (field, message) = invalid(result, r.name);
        assert_eq!(
            field, r.field,
            "{}: wrong field; message: {message}",
            r.name
        );
        for fragment in r.fragments {
            assert!(
                message.contains(fragment),
                "{}: message {message:?} lacks {fragment:?}",
                r.name
            );
        }
        // The error's text carries the path too.
        let shown = Error::InvalidParam {
            field: field.clone(),
            message,
        }
        .to_string();
        assert!(shown.contains(&field), "{}: {shown}", r.name);
    }
    assert_eq!(rules.len(), 49);
}

#[test]
fn non_finite_floats_rejected() {
    // JSON cannot carry NaN or infinity; structs built in code (C, Python) can.
    type Edit = fn(&mut StreamDiffusionParams);
    let cases: &[(&str, Edit)] = &[
        ("guidance_scale", |p| p.guidance_scale = f64::NAN),
        ("delta", |p| p.delta = f64::INFINITY),
        ("safety_checker_threshold", |p| {
            p.safety_checker_threshold = f64::NEG_INFINITY
        }),
        ("controlnets[2].conditioning_scale", |p| {
            p.controlnets[2].conditioning_scale = f64::NAN
        }),
        ("controlnets[1].control_guidance_start", |p| {
            p.controlnets[1].control_guidance_start = f64::NAN
        }),
        ("ip_adapter.scale", |p| p.ip_adapter.scale = f64::INFINITY),
        ("prompt[1][1]", |p| {
            p.prompt = Prompt::Weighted(vec![("a".into(), 1.0), ("b".into(), f64::NAN)])
        }),
        ("seed[0][1]", |p| {
            p.seed = Seed::Weighted(vec![(1, f64::INFINITY)])
        }),
        ("lora_dict.x/y", |p| {
            p.lora_dict = Some([("x/y".to_owned(), f64::NAN)].into_iter().collect())
        }),
        ("similar_image_filter_threshold", |p| {
            p.similar_image_filter_threshold = f64::NAN
        }),
    ];
    for (path, edit) in cases {
        let mut p = params(SD_TURBO_FIVE_CONTROLNETS);
        edit(&mut p);
        let (field, message) = invalid(
            p.validate(&EngineSettings::default()).map(|_| p.clone()),
            path,
        );
        assert_eq!(&field, path);
        assert!(
            message.contains("finite") || message.contains("between 0 and 1"),
            "{path}: {message}"
        );
        assert!(
            message.contains("NaN") || message.contains("inf"),
            "{path}: {message}"
        );
    }
}

#[test]
fn boundary_values_accepted() {
    let ok = [
        json!({"t_index_list": [0]}),
        json!({"t_index_list": [49]}),
        json!({"t_index_list": [5, 5, 5, 5]}),
        json!({"num_inference_steps": 1, "t_index_list": [0]}),
        json!({"num_inference_steps": 100, "t_index_list": [99]}),
        json!({"width": 384, "height": 1024}),
        json!({"seed": 0}),
        json!({"seed": 9007199254740991_i64}),
        json!({"prompt": [["a", 1.0], ["b", -1.0]], "normalize_prompt_weights": false}),
        json!({"similar_image_filter_threshold": 0.0, "similar_image_filter_max_skip_frame": 0}),
        json!({"controlnets": [{"model_id": "thibaud/controlnet-sd21-hed-diffusers",
            "control_guidance_start": 0.5, "control_guidance_end": 0.5, "conditioning_channels": 6}]}),
        json!({"model_id": "Lykon/dreamshaper-8", "ip_adapter": {"enabled": true}}),
        json!({"model_id": "stabilityai/sdxl-turbo", "ip_adapter": {"enabled": true}}),
        json!({"ip_adapter": {"enabled": false, "type": "faceid"}}),
        // Daydream counts only enabled nets with a positive scale towards the SDXL limit.
        json!({"model_id": "stabilityai/sdxl-turbo", "controlnets": [
            {"model_id": "xinsir/controlnet-depth-sdxl-1.0"},
            {"model_id": "xinsir/controlnet-canny-sdxl-1.0"},
            {"model_id": "xinsir/controlnet-tile-sdxl-1.0"},
            {"model_id": LOCAL_DIR, "conditioning_scale": 0.0}]}),
    ];
    for body in ok {
        params(&body.to_string());
    }
    for body in [
        json!({"width": 64, "height": 2048}),
        json!({"width": 72, "height": 136}),
    ] {
        let body = body.to_string();
        assert!(
            StreamDiffusionParams::from_json_with(&body, &any_resolution()).is_ok(),
            "{body}"
        );
        assert!(StreamDiffusionParams::from_json(&body).is_err(), "{body}");
    }
}

#[test]
fn local_folder_models() {
    // A local folder's family is unknown here: any known ControlNet and the IPAdapter pass
    // (the loader checks them against config.json).
    let body = json!({"model_id": LOCAL_DIR, "ip_adapter": {"enabled": true}, "controlnets": [
        {"model_id": "thibaud/controlnet-sd21-hed-diffusers"},
        {"model_id": "xinsir/controlnet-depth-sdxl-1.0"},
        {"model_id": LOCAL_DIR}]});
    let p = params(&body.to_string());
    assert!(matches!(
        p.model_kind(&EngineSettings::default()),
        Ok(sdstream::params::ModelKind::LocalFolder(_))
    ));
    // Duplicates are still duplicates.
    let dup = json!({"model_id": LOCAL_DIR, "controlnets": [{"model_id": LOCAL_DIR}, {"model_id": LOCAL_DIR}]});
    let (field, message) = invalid(StreamDiffusionParams::from_json(&dup.to_string()), "dup");
    assert_eq!(field, "controlnets[1].model_id");
    assert!(message.starts_with("Duplicate controlnet model_id"));

    // Ids are looked up under model_root first.
    let root = std::path::Path::new(LOCAL_DIR).join("..");
    let settings = EngineSettings {
        model_root: Some(root),
        ..EngineSettings::default()
    };
    assert!(StreamDiffusionParams::from_json_with(r#"{"model_id": "core"}"#, &settings).is_ok());
    let (field, message) = invalid(
        StreamDiffusionParams::from_json_with(r#"{"model_id": "no-such-model-dir"}"#, &settings),
        "missing folder",
    );
    assert_eq!(field, "model_id");
    assert!(message.contains("Invalid model_id: no-such-model-dir"));
}

#[test]
fn engine_settings_json() {
    let s = EngineSettings::from_json("{}").unwrap();
    assert_eq!(s, EngineSettings::default());
    assert_eq!(s.cfg_type, CfgType::SelfNegative);
    assert_eq!(s.frame_buffer_size, 1);
    assert_eq!(s.device, DeviceSpec::Cpu);
    assert_eq!(s.dtype, DTypeChoice::F32);
    assert_eq!(s.vae, VaeChoice::Taesd);
    assert_eq!(s.model_root, None);
    assert!(!s.allow_any_resolution);
    assert_eq!(
        serde_json::from_str::<Value>(&s.to_json()).unwrap(),
        json!({"cfg_type": "self", "frame_buffer_size": 1, "device": "cpu", "dtype": "f32",
               "vae": "taesd", "model_root": null, "allow_any_resolution": false,
               "allow_model_paths": true, "allowed_models": [], "allow_private_network": false,
               "cross_stream_batching": true, "frame_budget_ms": null})
    );

    let full = r#"{"cfg_type": "initialize", "frame_buffer_size": 2, "device": "cuda:1",
        "dtype": "bf16", "vae": "madebyollin/taesdxl", "model_root": "/models",
        "allow_any_resolution": true, "cross_stream_batching": false, "frame_budget_ms": 40}"#;
    let s = EngineSettings::from_json(full).unwrap();
    assert!(!s.cross_stream_batching);
    assert_eq!(s.frame_budget(), Some(std::time::Duration::from_millis(40)));
    assert_eq!(s.cfg_type, CfgType::Initialize);
    assert_eq!(s.frame_buffer_size, 2);
    assert_eq!(s.device, DeviceSpec::Cuda(1));
    assert_eq!(s.dtype, DTypeChoice::Bf16);
    assert_eq!(s.dtype.dtype(), candle_core::DType::BF16);
    assert_eq!(s.vae, VaeChoice::Custom("madebyollin/taesdxl".into()));
    assert_eq!(
        s.model_root.as_deref(),
        Some(std::path::Path::new("/models"))
    );
    assert!(s.allow_any_resolution);
    assert_eq!(EngineSettings::from_json(&s.to_json()).unwrap(), s);

    for (text, expected) in [
        ("cpu", DeviceSpec::Cpu),
        ("cuda", DeviceSpec::Cuda(0)),
        ("cuda:0", DeviceSpec::Cuda(0)),
        ("cuda:3", DeviceSpec::Cuda(3)),
        ("metal", DeviceSpec::Metal),
    ] {
        assert_eq!(text.parse::<DeviceSpec>().unwrap(), expected, "{text}");
    }
    assert_eq!(DeviceSpec::Cuda(2).to_string(), "cuda:2");
    assert_eq!("full".parse::<VaeChoice>().unwrap(), VaeChoice::Full);
    assert_eq!("none".parse::<CfgType>().unwrap(), CfgType::None);
    assert_eq!(CfgType::SelfNegative.to_string(), "self");
    assert_eq!("f16".parse::<DTypeChoice>().unwrap(), DTypeChoice::F16);
    assert!(DeviceSpec::Cpu.device().is_ok());

    let bad: &[(&str, &str, &[&str])] = &[
        (
            r#"{"cfg_type": "half"}"#,
            "cfg_type",
            &["unknown variant `half`", "`initialize`"],
        ),
        (
            r#"{"device": "gpu"}"#,
            "device",
            &[
                "device must be \"cpu\", \"cuda\", \"cuda:N\" or \"metal\"",
                "\"gpu\"",
            ],
        ),
        (r#"{"device": "cuda:"}"#, "device", &["cuda:N", "\"cuda:\""]),
        (r#"{"device": "cuda:+1"}"#, "device", &["\"cuda:+1\""]),
        (r#"{"dtype": "f64"}"#, "dtype", &["unknown variant `f64`"]),
        (
            r#"{"vae": ""}"#,
            "vae",
            &["vae must be \"taesd\", \"full\" or a folder / model id"],
        ),
        (
            r#"{"frame_budget_ms": 0.5}"#,
            "frame_budget_ms",
            &["frame_budget_ms must be from 1 to 60000 milliseconds, or null; got 0.5"],
        ),
        (
            r#"{"frame_budget_ms": 1e9}"#,
            "frame_budget_ms",
            &["frame_budget_ms must be from 1 to 60000 milliseconds"],
        ),
        (
            r#"{"cross_stream_batching": "yes"}"#,
            "cross_stream_batching",
            &["invalid type: string \"yes\", expected a boolean"],
        ),
        (
            r#"{"frame_buffer_size": 0}"#,
            "frame_buffer_size",
            &["frame_buffer_size must be at least 1; got 0"],
        ),
        (
            r#"{"frame_buffer_size": -2}"#,
            "frame_buffer_size",
            &["invalid value: integer `-2`"],
        ),
        (
            r#"{"model_root": ""}"#,
            "model_root",
            &["model_root must be a folder path"],
        ),
        (
            r#"{"allow_any_resolution": "yes"}"#,
            "allow_any_resolution",
            &["invalid type"],
        ),
    ];
    for (body, path, fragments) in bad {
        match EngineSettings::from_json(body) {
            Err(Error::InvalidParam { field, message }) => {
                assert_eq!(&field, path, "{body}: {message}");
                for fragment in *fragments {
                    assert!(message.contains(fragment), "{body}: {message}");
                }
            }
            other => panic!("{body}: expected InvalidParam, got {other:?}"),
        }
    }
    for text in ["gpu", "cuda:x", "cuda:-1", "CPU"] {
        assert!(text.parse::<DeviceSpec>().is_err(), "{text}");
    }
}

// ---------------------------------------------------------------------------------------------
// classify

const SD15_DEPTH: &str = "lllyasviel/control_v11f1p_sd15_depth";
const SD15_CANNY: &str = "lllyasviel/control_v11p_sd15_canny";
const SD15_TILE: &str = "lllyasviel/control_v11f1e_sd15_tile";

/// An sd15 stream with two ControlNets and an enabled IPAdapter, so every field can change
/// validly.
fn base() -> StreamDiffusionParams {
    params(
        &json!({
            "model_id": "Lykon/dreamshaper-8",
            "prompt": [["a cat", 0.6], ["a dog", 0.4]],
            "seed": [[1, 0.5], [2, 0.5]],
            "guidance_scale": 1.5,
            "controlnets": [
                {"model_id": SD15_DEPTH, "conditioning_scale": 0.5, "preprocessor": "depth"},
                {"model_id": SD15_CANNY, "conditioning_scale": 0.3, "preprocessor": "canny"}
            ],
            "ip_adapter": {"enabled": true, "scale": 0.5}
        })
        .to_string(),
    )
}

fn changed(edit: impl FnOnce(&mut StreamDiffusionParams)) -> (StreamDiffusionParams, Update) {
    let old = base();
    let mut new = old.clone();
    edit(&mut new);
    if let Err(e) = new.validate(&EngineSettings::default()) {
        panic!("edited params must stay valid: {e}");
    }
    let update = classify(&old, &new);
    (new, update)
}

type Edit = Box<dyn Fn(&mut StreamDiffusionParams)>;

fn processing() -> Option<ProcessingConfig> {
    Some(ProcessingConfig {
        enabled: true,
        processors: vec![ProcessorConfig::new("sharpen")],
    })
}

fn latent_processing() -> Option<ProcessingConfig> {
    Some(ProcessingConfig {
        enabled: true,
        processors: vec![ProcessorConfig::new("latent_feedback")],
    })
}

#[test]
fn unchanged_is_unchanged() {
    let update = classify(&base(), &base());
    assert_eq!(update, Update::Unchanged);
    assert!(update.is_hot() && update.is_unchanged() && !update.needs_reload());
}

#[test]
fn every_hot_field_alone_is_hot() {
    use HotChange as H;
    let cases: Vec<(&str, Edit, Vec<HotChange>)> = vec![
        (
            "prompt",
            Box::new(|p| p.prompt = Prompt::Text("a bird".into())),
            vec![H::Prompt {
                texts_changed: true,
            }],
        ),
        (
            "prompt",
            Box::new(|p| {
                p.prompt = Prompt::Weighted(vec![("a cat".into(), 0.1), ("a dog".into(), 0.9)])
            }),
            vec![H::Prompt {
                texts_changed: false,
            }],
        ),
        (
            "prompt_interpolation_method",
            Box::new(|p| p.prompt_interpolation_method = InterpolationMethod::Linear),
            vec![H::PromptInterpolationMethod],
        ),
        (
            "normalize_prompt_weights",
            Box::new(|p| p.normalize_prompt_weights = false),
            vec![H::NormalizePromptWeights],
        ),
        (
            "negative_prompt",
            Box::new(|p| p.negative_prompt = "ugly".into()),
            vec![H::NegativePrompt],
        ),
        (
            "guidance_scale",
            Box::new(|p| p.guidance_scale = 2.0),
            vec![H::GuidanceScale { cfg_toggled: false }],
        ),
        (
            "guidance_scale",
            Box::new(|p| p.guidance_scale = 1.0),
            vec![H::GuidanceScale { cfg_toggled: true }],
        ),
        ("delta", Box::new(|p| p.delta = 0.5), vec![H::Delta]),
        (
            "num_inference_steps",
            Box::new(|p| p.num_inference_steps = 40),
            vec![H::NumInferenceSteps],
        ),
        (
            "t_index_list",
            Box::new(|p| p.t_index_list = vec![10, 20, 30]),
            vec![H::TIndexList { same_len: true }],
        ),
        (
            "t_index_list",
            Box::new(|p| p.t_index_list = vec![10, 30]),
            vec![H::TIndexList { same_len: false }],
        ),
        (
            "seed",
            Box::new(|p| p.seed = Seed::Single(3)),
            vec![H::Seed {
                seeds_changed: true,
            }],
        ),
        (
            "seed",
            Box::new(|p| p.seed = Seed::Weighted(vec![(1, 0.2), (2, 0.8)])),
            vec![H::Seed {
                seeds_changed: false,
            }],
        ),
        (
            "seed_interpolation_method",
            Box::new(|p| p.seed_interpolation_method = InterpolationMethod::Slerp),
            vec![H::SeedInterpolationMethod],
        ),
        (
            "normalize_seed_weights",
            Box::new(|p| p.normalize_seed_weights = false),
            vec![H::NormalizeSeedWeights],
        ),
        (
            "use_safety_checker",
            Box::new(|p| p.use_safety_checker = false),
            vec![H::UseSafetyChecker],
        ),
        (
            "safety_checker_threshold",
            Box::new(|p| p.safety_checker_threshold = 0.9),
            vec![H::SafetyCheckerThreshold],
        ),
        (
            "ip_adapter",
            Box::new(|p| p.ip_adapter.scale = 0.8),
            vec![H::IpAdapter {
                fields: vec![IpAdapterField::Scale],
            }],
        ),
        (
            "ip_adapter",
            Box::new(|p| p.ip_adapter.enabled = false),
            vec![H::IpAdapter {
                fields: vec![IpAdapterField::Enabled],
            }],
        ),
        (
            "ip_adapter",
            Box::new(|p| p.ip_adapter.weight_type = Some("composition".into())),
            vec![H::IpAdapter {
                fields: vec![IpAdapterField::WeightType],
            }],
        ),
        (
            "ip_adapter_style_image_url",
            Box::new(|p| p.ip_adapter_style_image_url = "https://example.com/s.png".into()),
            vec![H::IpAdapterStyleImageUrl],
        ),
        (
            "image_preprocessing",
            Box::new(|p| p.image_preprocessing = processing()),
            vec![H::ImagePreprocessing],
        ),
        (
            "image_postprocessing",
            Box::new(|p| p.image_postprocessing = processing()),
            vec![H::ImagePostprocessing],
        ),
        (
            "latent_preprocessing",
            Box::new(|p| p.latent_preprocessing = latent_processing()),
            vec![H::LatentPreprocessing],
        ),
        (
            "latent_postprocessing",
            Box::new(|p| p.latent_postprocessing = latent_processing()),
            vec![H::LatentPostprocessing],
        ),
        (
            "show_reloading_frame",
            Box::new(|p| p.show_reloading_frame = false),
            vec![H::ShowReloadingFrame],
        ),
        (
            "cached_attention",
            Box::new(|p| p.cached_attention.max_frames = 3),
            vec![H::CachedAttention],
        ),
        (
            "cached_attention",
            Box::new(|p| p.cached_attention.interval = 8),
            vec![H::CachedAttention],
        ),
        (
            "controlnets",
            Box::new(|p| p.controlnets[1].conditioning_scale = 0.9),
            vec![H::ControlNet {
                index: 1,
                model_id: SD15_CANNY.into(),
                fields: vec![ControlNetField::ConditioningScale],
            }],
        ),
        (
            "controlnets",
            Box::new(|p| p.controlnets[0].enabled = false),
            vec![H::ControlNet {
                index: 0,
                model_id: SD15_DEPTH.into(),
                fields: vec![ControlNetField::Enabled],
            }],
        ),
        (
            "controlnets",
            Box::new(|p| p.controlnets[0].preprocessor = "passthrough".into()),
            vec![H::ControlNet {
                index: 0,
                model_id: SD15_DEPTH.into(),
                fields: vec![ControlNetField::Preprocessor],
            }],
        ),
        (
            "controlnets",
            Box::new(|p| {
                p.controlnets[1]
                    .preprocessor_params
                    .insert("low_threshold".into(), json!(50));
            }),
            vec![H::ControlNet {
                index: 1,
                model_id: SD15_CANNY.into(),
                fields: vec![ControlNetField::PreprocessorParams],
            }],
        ),
        (
            "controlnets",
            Box::new(|p| p.controlnets[0].control_guidance_start = 0.2),
            vec![H::ControlNet {
                index: 0,
                model_id: SD15_DEPTH.into(),
                fields: vec![ControlNetField::ControlGuidanceStart],
            }],
        ),
        (
            "controlnets",
            Box::new(|p| p.controlnets[0].control_guidance_end = 0.8),
            vec![H::ControlNet {
                index: 0,
                model_id: SD15_DEPTH.into(),
                fields: vec![ControlNetField::ControlGuidanceEnd],
            }],
        ),
        (
            "controlnets",
            Box::new(|p| {
                p.controlnets[1].conditioning_scale = 0.0;
                p.controlnets[1].enabled = false;
            }),
            vec![H::ControlNet {
                index: 1,
                model_id: SD15_CANNY.into(),
                fields: vec![ControlNetField::ConditioningScale, ControlNetField::Enabled],
            }],
        ),
        // Same nets, other order: hot (the residual sum is order-free up to rounding).
        (
            "controlnets",
            Box::new(|p| p.controlnets.swap(0, 1)),
            vec![H::ControlNetOrder],
        ),
        (
            "guidance_scale+prompt",
            Box::new(|p| {
                p.guidance_scale = 3.0;
                p.negative_prompt = "x".into();
            }),
            vec![H::NegativePrompt, H::GuidanceScale { cfg_toggled: false }],
        ),
    ];
    let mut covered = BTreeSet::new();
    for (field, edit, expected) in &cases {
        let (_, update) = changed(edit);
        assert_eq!(
            update,
            Update::Hot {
                changes: expected.clone()
            },
            "{field}"
        );
        assert!(update.is_hot(), "{field}");
        assert_eq!(update.hot_changes(), &expected[..]);
        covered.insert(*field);
    }
    assert_eq!(cases.len(), 37);
    covered.remove("guidance_scale+prompt");
    check_coverage(covered, "hot");
}

#[test]
fn every_reload_field_alone_reloads() {
    let cases: Vec<(&str, Edit)> = vec![
        (
            "model_id",
            Box::new(|p| p.model_id = "prompthero/openjourney-v4".into()),
        ),
        ("width", Box::new(|p| p.width = 768)),
        ("height", Box::new(|p| p.height = 384)),
        (
            "lora_dict",
            Box::new(|p| p.lora_dict = Some([("a/lora".to_owned(), 0.5)].into_iter().collect())),
        ),
        ("use_lcm_lora", Box::new(|p| p.use_lcm_lora = false)),
        (
            "lcm_lora_id",
            Box::new(|p| p.lcm_lora_id = "latent-consistency/lcm-lora-sdxl".into()),
        ),
        (
            "acceleration",
            Box::new(|p| p.acceleration = Acceleration::None),
        ),
        (
            "use_denoising_batch",
            Box::new(|p| p.use_denoising_batch = false),
        ),
        ("do_add_noise", Box::new(|p| p.do_add_noise = false)),
        ("skip_diffusion", Box::new(|p| p.skip_diffusion = true)),
        (
            "enable_similar_image_filter",
            Box::new(|p| p.enable_similar_image_filter = true),
        ),
        (
            "similar_image_filter_threshold",
            Box::new(|p| p.similar_image_filter_threshold = 0.9),
        ),
        (
            "similar_image_filter_max_skip_frame",
            Box::new(|p| p.similar_image_filter_max_skip_frame = 3),
        ),
        (
            "ip_adapter.type",
            Box::new(|p| p.ip_adapter.kind = IpAdapterType::Faceid),
        ),
        (
            "ip_adapter.ipadapter_model_path",
            Box::new(|p| {
                p.ip_adapter.ipadapter_model_path =
                    Some("h94/IP-Adapter/models/ip-adapter_sd15.bin".into())
            }),
        ),
        (
            "ip_adapter.image_encoder_path",
            Box::new(|p| {
                p.ip_adapter.image_encoder_path = Some("h94/IP-Adapter/models/image_encoder".into())
            }),
        ),
        (
            "ip_adapter.insightface_model_name",
            Box::new(|p| p.ip_adapter.insightface_model_name = None),
        ),
        (
            "cached_attention.enabled",
            Box::new(|p| p.cached_attention.enabled = true),
        ),
    ];
    let mut covered = BTreeSet::new();
    for (field, edit) in &cases {
        let (_, update) = changed(edit);
        assert_eq!(
            update,
            Update::Reload {
                fields: vec![*field]
            },
            "{field}"
        );
        assert!(!update.is_hot() && update.needs_reload(), "{field}");
        covered.insert(field.split('.').next().unwrap_or(field));
    }
    check_coverage(covered, "reload");
}

/// The hot and reload tables together name every top-level field of the body.
fn check_coverage(covered: BTreeSet<&str>, table: &str) {
    let hot = [
        "prompt",
        "prompt_interpolation_method",
        "normalize_prompt_weights",
        "negative_prompt",
        "guidance_scale",
        "delta",
        "num_inference_steps",
        "t_index_list",
        "seed",
        "seed_interpolation_method",
        "normalize_seed_weights",
        "use_safety_checker",
        "safety_checker_threshold",
        "ip_adapter",
        "ip_adapter_style_image_url",
        "image_preprocessing",
        "image_postprocessing",
        "latent_preprocessing",
        "latent_postprocessing",
        "show_reloading_frame",
        "controlnets",
        "cached_attention",
    ];
    let reload = [
        "model_id",
        "width",
        "height",
        "lora_dict",
        "use_lcm_lora",
        "lcm_lora_id",
        "acceleration",
        "use_denoising_batch",
        "do_add_noise",
        "skip_diffusion",
        "enable_similar_image_filter",
        "similar_image_filter_threshold",
        "similar_image_filter_max_skip_frame",
        "ip_adapter",
        "cached_attention",
    ];
    let expected: BTreeSet<&str> = if table == "hot" {
        hot.into()
    } else {
        reload.into()
    };
    assert_eq!(covered, expected, "{table} table");
    let written: Value = serde_json::from_str(&StreamDiffusionParams::default().to_json()).unwrap();
    let all: BTreeSet<&str> = written
        .as_object()
        .unwrap()
        .keys()
        .map(|k| k.as_str())
        .collect();
    let both: BTreeSet<&str> = hot.iter().chain(&reload).copied().collect();
    assert_eq!(both, all, "hot + reload tables must cover every field");
}

#[test]
fn controlnet_add_remove_replace_is_a_swap() {
    let tile = ControlNetConfig::new(SD15_TILE);
    // Added.
    let (_, update) = changed(|p| p.controlnets.push(ControlNetConfig::new(SD15_TILE)));
    assert_eq!(
        update,
        Update::ControlNetSwap {
            added: vec![tile.clone()],
            removed: vec![],
            hot: vec![]
        }
    );
    assert!(!update.is_hot() && update.is_controlnet_swap() && !update.needs_reload());
    // Removed.
    let (_, update) = changed(|p| {
        p.controlnets.remove(0);
    });
    assert_eq!(
        update,
        Update::ControlNetSwap {
            added: vec![],
            removed: vec![SD15_DEPTH.into()],
            hot: vec![]
        }
    );
    assert!(!update.is_hot());
    // All removed.
    let (_, update) = changed(|p| p.controlnets.clear());
    assert_eq!(
        update,
        Update::ControlNetSwap {
            added: vec![],
            removed: vec![SD15_DEPTH.into(), SD15_CANNY.into()],
            hot: vec![]
        }
    );
    // Replaced: another model_id at position 1.
    let (_, update) = changed(|p| p.controlnets[1] = ControlNetConfig::new(SD15_TILE));
    assert_eq!(
        update,
        Update::ControlNetSwap {
            added: vec![tile.clone()],
            removed: vec![SD15_CANNY.into()],
            hot: vec![]
        }
    );
    // Other conditioning channels: another network under the same id.
    let (new, update) = changed(|p| p.controlnets[0].conditioning_channels = Some(3));
    assert_eq!(
        update,
        Update::ControlNetSwap {
            added: vec![new.controlnets[0].clone()],
            removed: vec![SD15_DEPTH.into()],
            hot: vec![]
        }
    );
    // A swap carries the hot changes beside it, with indices into the new list.
    let (_, update) = changed(|p| {
        p.controlnets.insert(0, ControlNetConfig::new(SD15_TILE));
        p.controlnets[2].conditioning_scale = 0.7;
        p.prompt = Prompt::Text("a bird".into());
    });
    assert_eq!(
        update,
        Update::ControlNetSwap {
            added: vec![tile],
            removed: vec![],
            hot: vec![
                HotChange::Prompt {
                    texts_changed: true
                },
                HotChange::ControlNet {
                    index: 2,
                    model_id: SD15_CANNY.into(),
                    fields: vec![ControlNetField::ConditioningScale]
                },
            ]
        }
    );
    assert!(!update.is_hot());
    // Remove one and reorder none: kept nets still in order, so no ControlNetOrder.
    let (_, update) = changed(|p| {
        p.controlnets.insert(0, ControlNetConfig::new(SD15_TILE));
        p.controlnets.swap(1, 2);
    });
    assert_eq!(update.hot_changes(), &[HotChange::ControlNetOrder]);
}

#[test]
fn reload_wins_over_swap_and_hot() {
    let (_, update) = changed(|p| {
        p.width = 640;
        p.prompt = Prompt::Text("x".into());
        p.controlnets[0].conditioning_scale = 0.1;
        p.controlnets.push(ControlNetConfig::new(SD15_TILE));
        p.ip_adapter.scale = 0.9;
    });
    assert_eq!(
        update,
        Update::Reload {
            fields: vec!["width"]
        }
    );
    let (_, update) = changed(|p| {
        p.model_id = "prompthero/openjourney-v4".into();
        p.do_add_noise = false;
        p.ip_adapter.kind = IpAdapterType::Faceid;
        p.seed = Seed::Single(9);
    });
    assert_eq!(
        update,
        Update::Reload {
            fields: vec!["model_id", "do_add_noise", "ip_adapter.type"]
        }
    );
    assert!(update.hot_changes().is_empty());
}

/// splitmix64: a seeded source of bit patterns, so a failure names a reproducible value.
struct BitSource(u64);

impl BitSource {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

/// Finite doubles of every bit-pattern class: any pattern, subnormals, magnitudes near 1 (where
/// real guidance scales and weights live), huge ones, and the edges (±0, the smallest and largest
/// of each kind, 2^53 ± 1 and their neighbours).
fn float_samples(per_class: usize) -> Vec<f64> {
    const SIGN: u64 = 1 << 63;
    const MANTISSA: u64 = (1 << 52) - 1;
    let mut bits = BitSource(0x5d5_7e4a);
    let mut samples = vec![
        0.0,
        -0.0,
        f64::MIN_POSITIVE,
        f64::from_bits(1),
        f64::from_bits(MANTISSA),
        f64::MAX,
        f64::MIN,
        f64::EPSILON,
        9007199254740991.0,
        9007199254740992.0,
        9007199254740994.0,
        -9007199254740991.0,
        0.1,
        0.7,
        1.0 + f64::EPSILON,
        1.0 - f64::EPSILON / 2.0,
    ];
    let with_exponent = |exponent: u64, bits: &mut BitSource| {
        let b = bits.next();
        f64::from_bits((b & SIGN) | (exponent << 52) | (b & MANTISSA))
    };
    for _ in 0..per_class {
        let any = f64::from_bits(bits.next());
        if any.is_finite() {
            samples.push(any);
        }
        samples.push(with_exponent(0, &mut bits));
        let near_one = 1023 - 10 + bits.next() % 20;
        samples.push(with_exponent(near_one, &mut bits));
        let huge = 2046 - bits.next() % 64;
        samples.push(with_exponent(huge, &mut bits));
        let tiny_normal = 1 + bits.next() % 64;
        samples.push(with_exponent(tiny_normal, &mut bits));
    }
    samples
}

/// Every float of `p` that may hold any finite value, with its path.
fn free_floats(p: &StreamDiffusionParams) -> Vec<(&'static str, f64)> {
    let Prompt::Weighted(prompts) = &p.prompt else {
        panic!("weighted prompt expected")
    };
    let Seed::Weighted(seeds) = &p.seed else {
        panic!("weighted seed expected")
    };
    vec![
        ("guidance_scale", p.guidance_scale),
        ("delta", p.delta),
        ("safety_checker_threshold", p.safety_checker_threshold),
        ("prompt[0][1]", prompts[0].1),
        ("seed[0][1]", seeds[0].1),
        ("lora_dict.a", p.lora_dict.as_ref().unwrap()["a"]),
        (
            "controlnets[0].conditioning_scale",
            p.controlnets[0].conditioning_scale,
        ),
        (
            "controlnets[0].preprocessor_params.k",
            p.controlnets[0].preprocessor_params["k"].as_f64().unwrap(),
        ),
        ("ip_adapter.scale", p.ip_adapter.scale),
    ]
}

/// Issue #20 item 6: a double written in its shortest form (as Rust, Python and JavaScript write
/// it) parses to the very same bits, and from_json → to_json → from_json changes no bit, for
/// every class of bit pattern. Without serde_json's exact float parsing about one value in six
/// came back one ulp off.
#[test]
fn floats_round_trip_exactly() {
    let samples = float_samples(4000);
    let mut checked = 0usize;
    let mut changed = Vec::new();
    for &x in &samples {
        // `{:?}` writes the shortest decimal that reads back as `x` (exponent form when large or
        // small), which JSON accepts as it is.
        let body = format!(
            r#"{{"guidance_scale": {x:?}, "delta": {x:?}, "safety_checker_threshold": {x:?},
               "prompt": [["a", {x:?}], ["b", 1.0]], "normalize_prompt_weights": false,
               "seed": [[1, {x:?}], [2, 1.0]], "normalize_seed_weights": false,
               "lora_dict": {{"a": {x:?}}},
               "controlnets": [{{"model_id": "thibaud/controlnet-sd21-depth-diffusers",
                                "conditioning_scale": {x:?}, "preprocessor_params": {{"k": {x:?}}}}}],
               "ip_adapter": {{"enabled": false, "scale": {x:?}}}}}"#
        );
        let first = params(&body);
        let second = params(&first.to_json());
        for ((path, parsed), (_, again)) in
            free_floats(&first).into_iter().zip(free_floats(&second))
        {
            checked += 1;
            if parsed.to_bits() != x.to_bits() || again.to_bits() != x.to_bits() {
                changed.push(format!("{path}: {x:?} -> {parsed:?} -> {again:?}"));
            }
        }
        if first != second {
            changed.push(format!("{x:?}: the parameters differ after a round trip"));
        }
    }
    assert!(samples.len() > 20_000, "{} samples", samples.len());
    assert!(
        changed.is_empty(),
        "{} of {checked} floats changed; first: {:?}",
        changed.len(),
        &changed[..changed.len().min(5)]
    );
}

/// The integers next to 2^53 written without a fraction: 2^53 − 1 is a double and stays itself
/// (it once came back as 2^53 − 2 on the second parse, from "9007199254740991.0"); 2^53 + 1 is
/// not, and reads as the nearest double, 2^53, both times.
#[test]
fn integers_near_two_to_the_53_round_trip() {
    for (text, want) in [
        ("9007199254740991", 9007199254740991.0_f64),
        ("9007199254740992", 9007199254740992.0),
        ("9007199254740993", 9007199254740992.0),
        ("-9007199254740991", -9007199254740991.0),
        ("18446744073709551616", 18446744073709551616.0),
        ("9007199254740991.0", 9007199254740991.0),
        ("9007199254740991e0", 9007199254740991.0),
    ] {
        let first = params(&format!(r#"{{"delta": {text}}}"#));
        let second = params(&first.to_json());
        assert_eq!(first.delta.to_bits(), want.to_bits(), "{text}");
        assert_eq!(
            second.delta.to_bits(),
            want.to_bits(),
            "{text} after a round trip"
        );
    }
}

/// Issue #20 item 8: prompt count and length are bounded before any text reaches the tokenizer,
/// with errors naming the field, the count or length, and the limit; the limits themselves pass.
#[test]
fn prompt_and_seed_limits() {
    use sdstream::params::{MAX_PROMPT_CHARS, MAX_WEIGHTED_PROMPTS, MAX_WEIGHTED_SEEDS};
    let body = |members: Value| {
        let mut body = json!({"normalize_prompt_weights": true});
        for (name, value) in members.as_object().unwrap() {
            body[name] = value.clone();
        }
        body.to_string()
    };
    let prompts = |n: usize, text: &dyn Fn(usize) -> String| {
        Value::Array((0..n).map(|i| json!([text(i), 1.0])).collect())
    };
    let seeds = |n: usize| Value::Array((0..n).map(|i| json!([i, 1.0])).collect());
    let at_limit = "x".repeat(MAX_PROMPT_CHARS);
    // A character, not a byte, is the unit: 2048 three-byte characters pass.
    let wide_at_limit = "€".repeat(MAX_PROMPT_CHARS);
    let over = "x".repeat(MAX_PROMPT_CHARS + 1);

    for ok in [
        json!({"prompt": prompts(MAX_WEIGHTED_PROMPTS, &|i| format!("prompt {i}"))}),
        json!({"prompt": at_limit, "negative_prompt": at_limit}),
        json!({"prompt": wide_at_limit, "negative_prompt": wide_at_limit}),
        json!({"prompt": prompts(MAX_WEIGHTED_PROMPTS, &|_| at_limit.clone())}),
        json!({"seed": seeds(MAX_WEIGHTED_SEEDS)}),
    ] {
        params(&body(ok));
    }

    let cases: Vec<(Value, &str, Vec<String>)> = vec![
        (
            json!({"prompt": prompts(MAX_WEIGHTED_PROMPTS + 1, &|i| format!("p{i}"))}),
            "prompt",
            vec!["33 [text, weight] pairs".into(), "at most 32".into()],
        ),
        // The count is checked before the items: blank texts past the limit are not reported.
        (
            json!({"prompt": prompts(10_000, &|_| String::new())}),
            "prompt",
            vec!["10000 [text, weight] pairs".into(), "at most 32".into()],
        ),
        (
            json!({"prompt": over}),
            "prompt",
            vec!["2049 characters".into(), "at most 2048".into()],
        ),
        (
            json!({"prompt": "€".repeat(MAX_PROMPT_CHARS + 1)}),
            "prompt",
            vec!["2049 characters".into()],
        ),
        (
            json!({"prompt": "x".repeat(10 << 20)}),
            "prompt",
            vec![format!("{} characters", 10 << 20), "at most 2048".into()],
        ),
        (
            json!({"prompt": prompts(3, &|i| if i == 1 { over.clone() } else { "ok".into() })}),
            "prompt[1][0]",
            vec!["prompt[1][0] is 2049 characters long".into()],
        ),
        (
            json!({"negative_prompt": over}),
            "negative_prompt",
            vec!["negative_prompt is 2049 characters long; at most 2048 are allowed".into()],
        ),
        (
            json!({"seed": seeds(MAX_WEIGHTED_SEEDS + 1)}),
            "seed",
            vec!["seed has 33 [seed, weight] pairs; at most 32 are allowed".into()],
        ),
    ];
    for (members, want_field, want_parts) in cases {
        let text = body(members);
        let what: String = text.chars().take(80).collect();
        let what = what.as_str();
        let (field, message) = invalid(StreamDiffusionParams::from_json(&text), what);
        assert_eq!(field, want_field, "{what}");
        for part in want_parts {
            assert!(
                message.contains(&part),
                "{what}: {message:?} lacks {part:?}"
            );
        }
    }
}
