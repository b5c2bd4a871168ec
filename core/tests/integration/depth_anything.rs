//! Depth Anything V2 (transformers' `DepthAnythingForDepthEstimation`) against transformers
//! (goldens from tests/reference/make_depth_fixtures.py).

use crate::common;

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use sdstream::model::depth_anything::{Config, DepthAnything};
use sdstream::model::dinov2;

/// The tiny checkpoint, where the model root tests/fixtures/model-root finds it under
/// Depth-Anything-V2-Small-hf's id.
const TINY: &str = "model-root/depth-anything/Depth-Anything-V2-Small-hf";

fn fixture(rel: &str) -> PathBuf {
    common::fixture(rel)
}

fn golden() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixture("depth-anything/golden.safetensors"), &Device::Cpu)
        .expect("golden")
}

fn tiny_config_json() -> serde_json::Value {
    let text = std::fs::read_to_string(fixture(&format!("{TINY}/config.json"))).expect("config");
    serde_json::from_str(&text).expect("json")
}

fn load(config: &Config) -> DepthAnything {
    let weights =
        candle_core::safetensors::load(fixture(&format!("{TINY}/model.safetensors")), &Device::Cpu)
            .expect("weights");
    let vb = VarBuilder::from_tensors(weights, DType::F32, &Device::Cpu);
    DepthAnything::new(config, vb).expect("build")
}

fn tiny() -> DepthAnything {
    load(&serde_json::from_value(tiny_config_json()).expect("config"))
}

/// The script's integer test image, `[3, H, W]` bytes.
fn pattern(height: usize, width: usize) -> Vec<u8> {
    let mut v = Vec::with_capacity(3 * height * width);
    for c in 0..3 {
        for y in 0..height {
            for x in 0..width {
                v.push(((3 * x + 5 * y + 40 * c + ((x * y) >> 4) + ((x ^ y) & 31)) & 255) as u8);
            }
        }
    }
    v
}

/// The pattern as the network's input `[1, 3, H, W]`: `(v − 128) / 128`, exact in f32.
fn pixels(height: usize, width: usize) -> Tensor {
    let v = pattern(height, width)
        .into_iter()
        .map(|b| (f32::from(b) - 128.0) / 128.0)
        .collect();
    Tensor::from_vec(v, (1, 3, height, width), &Device::Cpu).unwrap()
}

/// Max and mean absolute error, and the reference's max magnitude.
fn errors(got: &Tensor, want: &Tensor) -> (f32, f32, f32) {
    assert_eq!(got.dims(), want.dims(), "shape");
    let d = (got - want).unwrap().abs().unwrap();
    let max = d.max_all().unwrap().to_scalar::<f32>().unwrap();
    let mean = d.mean_all().unwrap().to_scalar::<f32>().unwrap();
    let scale = common::max_magnitude(want);
    (max, mean, scale)
}

/// Asserts max abs error ≤ 1e-4 × the reference's max magnitude.
fn check(what: &str, got: &Tensor, want: &Tensor) {
    let (max, mean, scale) = errors(got, want);
    println!("{what}: max {max:.3e} mean {mean:.3e} (reference max |.| {scale:.3e})");
    assert!(scale > 0.0, "{what}: degenerate reference");
    assert!(
        max <= 1e-4 * scale,
        "{what}: max abs error {max} > 1e-4 × {scale}"
    );
}

#[test]
fn input_pattern_is_the_scripts() {
    let stored = golden()["input_70x98"]
        .flatten_all()
        .unwrap()
        .to_vec1::<u8>()
        .unwrap();
    assert_eq!(stored, pattern(70, 98));
}

#[test]
fn matches_transformers_at_518() {
    let depth = tiny().forward(&pixels(518, 518)).unwrap();
    check(
        "predicted_depth 518x518",
        &depth,
        &golden()["predicted_depth_518x518"],
    );
}

/// 14×20 patches: the position embeddings are resampled bicubically from 37×37.
#[test]
fn matches_transformers_at_196x280() {
    let depth = tiny().forward(&pixels(196, 280)).unwrap();
    check(
        "predicted_depth 196x280",
        &depth,
        &golden()["predicted_depth_196x280"],
    );
}

#[test]
fn backbone_matches_transformers_at_70x98() {
    let model = tiny();
    assert_eq!(model.backbone().out_stages(), &[1, 2, 3, 4]);
    let maps = model.backbone().forward(&pixels(70, 98)).unwrap();
    let want = &golden()["backbone_features_70x98"];
    assert_eq!(maps.len(), 4);
    for (i, map) in maps.iter().enumerate() {
        check(
            &format!("backbone stage {}", i + 1),
            map,
            &want.get(i).unwrap(),
        );
    }
}

#[test]
fn metric_head_matches_transformers() {
    let mut json = tiny_config_json();
    json["depth_estimation_type"] = "metric".into();
    json["max_depth"] = 20.into();
    let depth = load(&serde_json::from_value(json).unwrap())
        .forward(&pixels(70, 98))
        .unwrap();
    check(
        "metric depth 70x98",
        &depth,
        &golden()["predicted_depth_metric_70x98"],
    );
}

/// Rows of a batch are computed independently (two different images in one call).
#[test]
fn batch_rows_match_single_runs() {
    let model = tiny();
    let a = pixels(70, 98);
    let b = a.flip(&[3]).unwrap().neg().unwrap();
    let both = model.forward(&Tensor::cat(&[&a, &b], 0).unwrap()).unwrap();
    for (i, one) in [&a, &b].into_iter().enumerate() {
        let single = model.forward(one).unwrap();
        let (max, _, _) = errors(&both.narrow(0, i, 1).unwrap(), &single);
        assert!(max <= 1e-5, "row {i}: {max}");
    }
}

#[test]
fn rejects_inputs_off_the_patch_grid() {
    let model = tiny();
    let x = Tensor::zeros((1, 3, 70, 100), DType::F32, &Device::Cpu).unwrap();
    let err = model.forward(&x).unwrap_err().to_string();
    assert!(err.contains("multiples of 14"), "{err}");
}

#[test]
fn reads_the_tiny_config() {
    let config: Config = serde_json::from_value(tiny_config_json()).unwrap();
    config.validate().unwrap();
    let b = &config.backbone_config;
    assert_eq!(
        (b.hidden_size, b.num_hidden_layers, b.num_attention_heads),
        (32, 4, 4)
    );
    assert_eq!(b.out_stages().unwrap(), vec![1, 2, 3, 4]);
    assert_eq!(b.layer_norm_eps, 1e-6);
    assert!(b.apply_layernorm && !b.reshape_hidden_states);
    assert_eq!(config.reassemble_factors, vec![4.0, 2.0, 1.0, 0.5]);
    assert_eq!(config.neck_hidden_sizes, vec![8, 16, 24, 32]);
    assert_eq!((config.fusion_hidden_size, config.head_hidden_size), (8, 8));
}

/// The Small checkpoint's values and transformers' defaults for an almost empty config.
#[test]
fn small_and_default_configs() {
    let small = Config::v2_small();
    small.validate().unwrap();
    assert_eq!(
        small.backbone_config.out_stages().unwrap(),
        vec![3, 6, 9, 12]
    );
    assert_eq!(small.backbone_config.mlp_hidden_size(), 1536);
    assert_eq!(small.backbone_config.position_grid(), 37);
    let empty: Config = serde_json::from_str("{}").unwrap();
    empty.validate().unwrap();
    assert_eq!(
        empty.backbone_config.out_stages().unwrap(),
        vec![9, 10, 11, 12]
    );
    let with_backbone: Config =
        serde_json::from_str(r#"{"reassemble_hidden_size": 768, "backbone_config": {"out_indices": [-4, -3, -2, -1], "reshape_hidden_states": false}}"#)
            .unwrap();
    with_backbone.validate().unwrap();
    // Dinov2Config's own defaults inside backbone_config: ViT-B/14 at 224.
    assert_eq!(with_backbone.backbone_config.hidden_size, 768);
    assert_eq!(with_backbone.backbone_config.position_grid(), 16);
    assert_eq!(
        with_backbone.backbone_config.out_stages().unwrap(),
        vec![9, 10, 11, 12]
    );
}

/// Unsupported or inconsistent options are refused with the key named.
#[test]
fn unsupported_options_name_their_key() {
    let cases: [(&str, serde_json::Value, &str); 9] = [
        (
            "/backbone_config/use_swiglu_ffn",
            true.into(),
            "backbone_config.use_swiglu_ffn",
        ),
        (
            "/backbone_config/hidden_act",
            "gelu_new".into(),
            "backbone_config.hidden_act",
        ),
        (
            "/backbone_config/model_type",
            "dinov2_with_registers".into(),
            "backbone_config.model_type",
        ),
        (
            "/backbone_config/reshape_hidden_states",
            true.into(),
            "backbone_config.reshape_hidden_states",
        ),
        (
            "/backbone_config/out_indices",
            serde_json::json!([1, 2, 3, 5]),
            "backbone_config.out_indices",
        ),
        (
            "/backbone_config/out_features",
            serde_json::json!(["stage1", "stage2", "stage4", "stage3"]),
            "backbone_config.out_features",
        ),
        (
            "/depth_estimation_type",
            "absolute".into(),
            "depth_estimation_type",
        ),
        (
            "/reassemble_factors",
            serde_json::json!([4, 2, 1, 0]),
            "reassemble_factors",
        ),
        ("/max_depth", serde_json::Value::Null, "max_depth"),
    ];
    for (pointer, value, key) in cases {
        let mut json = tiny_config_json();
        *json.pointer_mut(pointer).unwrap() = value;
        if pointer == "/backbone_config/out_features" {
            json["backbone_config"]["out_indices"] = serde_json::Value::Null;
        }
        let config: Config = serde_json::from_value(json).unwrap();
        let err = config.validate().unwrap_err().to_string();
        assert!(err.contains(&format!("`{key}`")), "{pointer}: {err}");
    }
}

/// The bicubic weights: the identity on the learned grid, rows summing to 1, and the taps of
/// torch's kernel for 37 → 14 at one row (from `F.interpolate` on one-hot inputs).
#[test]
fn bicubic_weights() {
    let id = dinov2::bicubic_matrix(37, 37);
    for o in 0..37 {
        for i in 0..37 {
            assert_eq!(id[o * 37 + i], if o == i { 1.0 } else { 0.0 });
        }
    }
    for (n_in, n_out) in [(37, 14), (37, 20), (37, 50), (4, 7)] {
        let w = dinov2::bicubic_matrix(n_in, n_out);
        for row in w.chunks(n_in) {
            let sum: f32 = row.iter().sum();
            assert!((sum - 1.0).abs() < 1e-5, "{n_in}->{n_out}: {sum}");
        }
    }
}

/// Half precision runs end to end (loose bound: f16 arithmetic through 4 blocks). bf16 is not
/// tried: candle's CPU matmul has no bf16.
#[test]
fn runs_in_half_precision() {
    let want = &golden()["predicted_depth_metric_70x98"];
    let mut json = tiny_config_json();
    json["depth_estimation_type"] = "metric".into();
    json["max_depth"] = 20.into();
    let metric: Config = serde_json::from_value(json).unwrap();
    {
        let dtype = DType::F16;
        let weights = candle_core::safetensors::load(
            fixture(&format!("{TINY}/model.safetensors")),
            &Device::Cpu,
        )
        .unwrap();
        let model = DepthAnything::new(
            &metric,
            VarBuilder::from_tensors(weights, dtype, &Device::Cpu),
        )
        .unwrap();
        let depth = model.forward(&pixels(70, 98)).unwrap();
        assert_eq!(depth.dtype(), dtype);
        let (max, mean, scale) = errors(&depth.to_dtype(DType::F32).unwrap(), want);
        println!("metric depth {dtype:?}: max {max:.3e} mean {mean:.3e} (scale {scale:.3e})");
        assert!(mean <= 0.02 * scale, "{dtype:?}: mean abs error {mean}");
    }
}
