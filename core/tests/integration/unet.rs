//! UNet2DConditionModel against diffusers (f32, CPU): the tiny sd-turbo-shaped checkpoint made
//! by tests/reference/make_fixtures.py, and the architecture variants made by
//! tests/reference/make_unet_variants.py.

use crate::common;

use common::{abs_err, fixture, golden};

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use sdstream::model::unet::{
    AddedConditioning, ControlResiduals, UNet2DConditionModel, UNetConfig, UNetInputs,
};

fn get<'a>(g: &'a HashMap<String, Tensor>, key: &str) -> &'a Tensor {
    g.get(key)
        .unwrap_or_else(|| panic!("golden has no `{key}`"))
}

fn check(name: &str, ours: &Tensor, theirs: &Tensor, max_tol: f32) {
    let (max, mean) = abs_err(ours, theirs);
    let scale = theirs
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    println!("{name}: max abs err {max:.3e}, mean abs err {mean:.3e} (output max |x| {scale:.3})");
    assert!(
        max <= max_tol,
        "{name}: max abs error {max:e} > {max_tol:e}"
    );
}

fn tiny_unet() -> UNet2DConditionModel {
    UNet2DConditionModel::load(&fixture("tiny-sd-turbo/unet"), DType::F32, &Device::Cpu)
        .expect("load tiny sd-turbo UNet")
}

#[test]
fn tiny_sd_turbo_matches_diffusers() {
    let unet = tiny_unet();
    let g = golden("golden/unet.safetensors");
    let sample = get(&g, "sample");
    let context = get(&g, "encoder_hidden_states");

    // One timestep per row (the stream batch), as int64 like StreamDiffusion passes them.
    let out = unet
        .forward(UNetInputs::new(sample, get(&g, "timesteps"), context))
        .unwrap();
    check("per-row timesteps", &out, get(&g, "output"), 1e-4);

    // The same rows given as f32 timesteps must give the same result.
    let t_f32 = get(&g, "timesteps").to_dtype(DType::F32).unwrap();
    let out_f32 = unet
        .forward(UNetInputs::new(sample, &t_f32, context))
        .unwrap();
    check("per-row timesteps (f32)", &out_f32, get(&g, "output"), 1e-4);

    // A single timestep broadcast to every row.
    let out = unet
        .forward(UNetInputs::new(sample, get(&g, "single_timestep"), context))
        .unwrap();
    check(
        "single timestep",
        &out,
        get(&g, "output_single_timestep"),
        1e-4,
    );

    // ControlNet residuals on the 12 skips and the mid block.
    assert_eq!(unet.down_residual_count(), 12);
    let golden_channels: Vec<usize> = (0..12)
        .map(|i| {
            get(&g, &format!("control_down_residual_{i:02}"))
                .dim(1)
                .unwrap()
        })
        .collect();
    assert_eq!(unet.down_residual_channels(), golden_channels);
    let control = common::control_residuals_of(&g);
    assert_eq!(control.down.len(), 12);
    let out = unet
        .forward(UNetInputs::new(sample, get(&g, "timesteps"), context).control(Some(&control)))
        .unwrap();
    check(
        "additional residuals",
        &out,
        get(&g, "output_control"),
        1e-4,
    );

    // A non-square latent reaching 2×3 at the deepest level.
    let out = unet
        .forward(UNetInputs::new(
            get(&g, "wide_sample"),
            get(&g, "wide_timesteps"),
            get(&g, "wide_encoder_hidden_states"),
        ))
        .unwrap();
    check("wide 16x24 latent", &out, get(&g, "wide_output"), 1e-4);
}

/// Cross-attention keys and values are projected once per context: a call with equal values
/// in a new tensor (the stream builds its context afresh every frame) reuses them, another
/// context projects again, and every output equals a fresh network's bit for bit.
#[test]
fn cross_attention_projects_a_context_once_while_it_holds() {
    let unet = tiny_unet();
    let layers = unet.cross_attention_widths().len();
    assert!(layers > 0);
    let g = golden("golden/unet.safetensors");
    let (sample, t) = (get(&g, "sample"), get(&g, "timesteps"));
    let context = get(&g, "encoder_hidden_states");
    let same_bits = |a: &Tensor, b: &Tensor| {
        let (a, b) = (flat_bits(a), flat_bits(b));
        a.len() == b.len() && a == b
    };
    assert_eq!(unet.cross_attention_projections(), 0);
    let first = unet.forward(UNetInputs::new(sample, t, context)).unwrap();
    assert_eq!(unet.cross_attention_projections(), layers);

    let second = unet
        .forward(UNetInputs::new(sample, t, &context.copy().unwrap()))
        .unwrap();
    assert_eq!(
        unet.cross_attention_projections(),
        layers,
        "equal values projected again"
    );
    assert!(same_bits(&first, &second));

    let other = (context * 0.5).unwrap();
    let third = unet.forward(UNetInputs::new(sample, t, &other)).unwrap();
    assert_eq!(unet.cross_attention_projections(), 2 * layers);
    let fresh = tiny_unet()
        .forward(UNetInputs::new(sample, t, &other))
        .unwrap();
    assert!(same_bits(&third, &fresh), "a memo changed the output");

    let again = unet.forward(UNetInputs::new(sample, t, context)).unwrap();
    assert_eq!(unet.cross_attention_projections(), 3 * layers);
    assert!(same_bits(&first, &again));
}

fn flat_bits(t: &Tensor) -> Vec<u32> {
    t.flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .into_iter()
        .map(f32::to_bits)
        .collect()
}

#[test]
fn tiny_sd_turbo_half_precision_runs_close() {
    // f16 on the CPU: not bit-comparable with the f32 reference, but must stay close. (bf16 is a
    // GPU dtype: candle's CPU matmul does not implement it.)
    let g = golden("golden/unet.safetensors");
    let dtype = DType::F16;
    let unet = UNet2DConditionModel::load(&fixture("tiny-sd-turbo/unet"), dtype, &Device::Cpu)
        .expect("load tiny UNet in f16");
    assert_eq!(unet.dtype(), dtype);
    let out = unet
        .forward(UNetInputs::new(
            get(&g, "sample"),
            get(&g, "timesteps"),
            get(&g, "encoder_hidden_states"),
        ))
        .unwrap();
    assert_eq!(out.dtype(), dtype);
    check("f16", &out, get(&g, "output"), 1e-2);
}

fn variant(name: &str) -> (UNet2DConditionModel, HashMap<String, Tensor>) {
    let dir = fixture(&format!("unet-variants/{name}"));
    let unet = UNet2DConditionModel::load(&dir, DType::F32, &Device::Cpu)
        .unwrap_or_else(|e| panic!("load variant {name}: {e}"));
    let g = candle_core::safetensors::load(dir.join("io.safetensors"), &Device::Cpu)
        .unwrap_or_else(|e| panic!("golden of variant {name}: {e}"));
    (unet, g)
}

/// Every variant: per-row timesteps, a single timestep and additional residuals.
fn check_variant(name: &str) {
    let (unet, g) = variant(name);
    let added = g.get("text_embeds").map(|text_embeds| AddedConditioning {
        text_embeds: text_embeds.clone(),
        time_ids: get(&g, "time_ids").clone(),
    });
    let run = |t: &Tensor, control: Option<&ControlResiduals>| {
        unet.forward(
            UNetInputs::new(get(&g, "sample"), t, get(&g, "encoder_hidden_states"))
                .added(added.as_ref())
                .control(control),
        )
        .unwrap()
    };
    let out = run(get(&g, "timesteps"), None);
    check(
        &format!("{name}: per-row timesteps"),
        &out,
        get(&g, "output"),
        1e-4,
    );
    let out = run(get(&g, "single_timestep"), None);
    check(
        &format!("{name}: single timestep"),
        &out,
        get(&g, "output_single_timestep"),
        1e-4,
    );
    let control = common::control_residuals_of(&g);
    assert_eq!(control.down.len(), unet.down_residual_count());
    let channels: Vec<usize> = control.down.iter().map(|t| t.dim(1).unwrap()).collect();
    assert_eq!(unet.down_residual_channels(), channels);
    let out = run(get(&g, "timesteps"), Some(&control));
    check(
        &format!("{name}: additional residuals"),
        &out,
        get(&g, "output_control"),
        1e-4,
    );
}

#[test]
fn variant_conv_projection_odd_latent() {
    check_variant("conv_proj_odd_size");
}

#[test]
fn variant_options() {
    check_variant("options");
}

#[test]
fn variant_sdxl_text_time() {
    check_variant("sdxl_text_time");
}

#[test]
fn sdxl_config_without_added_conditioning_is_an_error() {
    let (unet, g) = variant("sdxl_text_time");
    let err = unet
        .forward(UNetInputs::new(
            get(&g, "sample"),
            get(&g, "timesteps"),
            get(&g, "encoder_hidden_states"),
        ))
        .unwrap_err()
        .to_string();
    assert!(err.contains("addition_embed_type"), "{err}");
}

fn tiny_config_json() -> serde_json::Value {
    let path = fixture("tiny-sd-turbo/unet/config.json");
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
}

/// Writes `config` next to a link to the tiny weights, in a fresh temporary folder.
fn folder_with(config: &serde_json::Value, weights: Option<&[u8]>, tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("sdstream-unet-test-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_vec_pretty(config).unwrap(),
    )
    .unwrap();
    let bytes = match weights {
        Some(b) => b.to_vec(),
        None => std::fs::read(fixture(
            "tiny-sd-turbo/unet/diffusion_pytorch_model.safetensors",
        ))
        .unwrap(),
    };
    std::fs::write(dir.join("diffusion_pytorch_model.safetensors"), bytes).unwrap();
    dir
}

#[test]
fn unsupported_options_are_rejected_by_name() {
    let cases: &[(&str, serde_json::Value)] = &[
        ("addition_embed_type", serde_json::json!("text_image")),
        ("class_embed_type", serde_json::json!("timestep")),
        ("dual_cross_attention", serde_json::json!(true)),
        ("time_embedding_type", serde_json::json!("fourier")),
        ("resnet_time_scale_shift", serde_json::json!("ada_group")),
        ("encoder_hid_dim_type", serde_json::json!("text_proj")),
        ("act_fn", serde_json::json!("mish")),
        ("attention_type", serde_json::json!("gated")),
        (
            "mid_block_type",
            serde_json::json!("UNetMidBlock2DSimpleCrossAttn"),
        ),
        (
            "transformer_layers_per_block",
            serde_json::json!([[1, 1], [1, 1], [1, 1], [1, 1]]),
        ),
    ];
    for (i, (option, value)) in cases.iter().enumerate() {
        let mut config = tiny_config_json();
        config[*option] = value.clone();
        let dir = folder_with(&config, None, &format!("opt{i}"));
        let err = UNet2DConditionModel::load(&dir, DType::F32, &Device::Cpu)
            .expect_err(&format!("{option} = {value} must be rejected"))
            .to_string();
        println!("{option}: {err}");
        assert!(
            err.contains(option),
            "error for {option} does not name it: {err}"
        );
        assert!(
            err.contains("config.json"),
            "error for {option} does not name the file: {err}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
    // Also when building from a parsed config directly.
    let mut config = tiny_config_json();
    config["down_block_types"][0] = serde_json::json!("AttnDownBlock2D");
    let config: UNetConfig = serde_json::from_value(config).unwrap();
    let vb = candle_nn::VarBuilder::zeros(DType::F32, &Device::Cpu);
    let err = UNet2DConditionModel::new(&config, vb)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("down_block_types") && err.contains("AttnDownBlock2D"),
        "{err}"
    );
}

#[test]
fn truncated_weights_name_the_file() {
    let full = std::fs::read(fixture(
        "tiny-sd-turbo/unet/diffusion_pytorch_model.safetensors",
    ))
    .unwrap();
    let dir = folder_with(
        &tiny_config_json(),
        Some(&full[..full.len() / 2]),
        "truncated",
    );
    let err = UNet2DConditionModel::load(&dir, DType::F32, &Device::Cpu)
        .expect_err("a truncated weights file must be rejected")
        .to_string();
    println!("{err}");
    assert!(err.contains("diffusion_pytorch_model.safetensors"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn wrong_inputs_are_abs_err() {
    let unet = tiny_unet();
    let g = golden("golden/unet.safetensors");
    let sample = get(&g, "sample");
    let context = get(&g, "encoder_hidden_states");
    // Two timesteps for three rows.
    let t = Tensor::new(&[1f32, 2.], &Device::Cpu).unwrap();
    let err = unet
        .forward(UNetInputs::new(sample, &t, context))
        .unwrap_err()
        .to_string();
    assert!(err.contains("timesteps"), "{err}");
    // Text embeddings of the wrong width.
    let narrow = context.narrow(2, 0, 16).unwrap();
    let err = unet
        .forward(UNetInputs::new(sample, get(&g, "timesteps"), &narrow))
        .unwrap_err()
        .to_string();
    assert!(err.contains("encoder_hidden_states"), "{err}");
    // Missing residuals.
    let control = ControlResiduals {
        down: vec![get(&g, "control_down_residual_00").clone()],
        mid: get(&g, "control_mid_residual").clone(),
    };
    let err = unet
        .forward(UNetInputs::new(sample, get(&g, "timesteps"), context).control(Some(&control)))
        .unwrap_err()
        .to_string();
    assert!(err.contains("residual"), "{err}");
}
