//! CLIP text encoder against transformers' `CLIPTextModel` (goldens from tests/reference/).

use crate::common;

use common::{abs_err, edited_config, fixture, golden, scratch_dir};

use candle_core::{DType, Device, Tensor};
use sdstream::model::clip::ClipTextModel;

fn ids_u32(t: &Tensor) -> Tensor {
    t.to_dtype(DType::U32).unwrap()
}

/// SD2.1-style encoder (exact gelu, `text_model.` keys, float16 file loaded as f32).
#[test]
fn last_hidden_state_matches_transformers() {
    let model = ClipTextModel::load(
        &fixture("tiny-sd-turbo/text_encoder"),
        DType::F32,
        &Device::Cpu,
    )
    .expect("load text encoder");
    let g = golden("golden/text_encoder.safetensors");
    let out = model.forward(&ids_u32(&g["input_ids"])).expect("forward");
    let (max, mean) = abs_err(&out, &g["last_hidden_state"]);
    println!("text encoder (gelu) last_hidden_state: max {max:.3e} mean {mean:.3e}");
    assert!(max <= 1e-5, "max abs error {max}");
}

/// SD1.5-style encoder (quick_gelu, keys without prefix as transformers 5 saves them), and the
/// penultimate hidden state.
#[test]
fn quick_gelu_and_penultimate_match_transformers() {
    let model = ClipTextModel::load(&fixture("nets-clip-quick-gelu"), DType::F32, &Device::Cpu)
        .expect("load text encoder");
    let g = golden("golden/nets_clip_quick_gelu.safetensors");
    let (last, penultimate) = model
        .forward_with_penultimate(&ids_u32(&g["input_ids"]))
        .expect("forward");
    let (max, mean) = abs_err(&last, &g["last_hidden_state"]);
    println!("text encoder (quick_gelu) last_hidden_state: max {max:.3e} mean {mean:.3e}");
    assert!(max <= 1e-5, "last hidden state max abs error {max}");
    let (max, mean) = abs_err(&penultimate, &g["penultimate_hidden_state"]);
    println!("text encoder (quick_gelu) hidden_states[-2]: max {max:.3e} mean {mean:.3e}");
    assert!(max <= 1e-5, "penultimate max abs error {max}");
    let plain = model.forward(&ids_u32(&g["input_ids"])).expect("forward");
    assert_eq!(abs_err(&plain, &last).0, 0.0);
}

/// SDXL's second encoder (`CLIPTextModelWithProjection`, eos_token_id 2: the pooled token is
/// the largest id): the penultimate hidden state and the projected pooled output, and the same
/// pooled rows when the config names the end token itself.
#[test]
fn projection_and_pooled_output_match_transformers() {
    let model = ClipTextModel::load(&fixture("nets-clip-projection"), DType::F32, &Device::Cpu)
        .expect("load text encoder with projection");
    let g = golden("golden/nets_clip_projection.safetensors");
    let out = model
        .forward_all(&ids_u32(&g["input_ids"]))
        .expect("forward");
    for (what, got, want, tol) in [
        (
            "last_hidden_state",
            &out.last_hidden_state,
            "last_hidden_state",
            1e-5,
        ),
        (
            "hidden_states[-2]",
            &out.penultimate,
            "penultimate_hidden_state",
            1e-5,
        ),
        ("text_embeds", &out.pooled, "text_embeds", 1e-5),
    ] {
        let (max, mean) = abs_err(got, &g[want]);
        println!("text encoder with projection, {what}: max {max:.3e} mean {mean:.3e}");
        assert!(max <= tol, "{what}: max abs error {max}");
    }
    assert_eq!(out.pooled.dims(), [3, 12]);

    // The same weights with the end token named (63): the same pooled rows.
    let dir = scratch_dir("clip-eos");
    std::fs::write(
        dir.join("config.json"),
        edited_config(
            "nets-clip-projection/config.json",
            "eos_token_id",
            63.into(),
        ),
    )
    .unwrap();
    std::fs::copy(
        fixture("nets-clip-projection/model.safetensors"),
        dir.join("model.safetensors"),
    )
    .unwrap();
    let named = ClipTextModel::load(&dir, DType::F32, &Device::Cpu).expect("load");
    let again = named
        .forward_all(&ids_u32(&g["input_ids"]))
        .expect("forward");
    assert_eq!(abs_err(&again.pooled, &out.pooled).0, 0.0);
    // A row without that token is an error naming it, not a silent pick.
    let no_end = Tensor::zeros((1, 77), DType::U32, &Device::Cpu).unwrap();
    let err = named.forward_all(&no_end).expect_err("no end token");
    assert!(
        err.to_string().contains("no end-of-text token (63)"),
        "{err}"
    );
}

/// Half precision runs and stays close (f16 arithmetic, so a loose bound).
#[test]
fn runs_in_half_precision() {
    for dtype in [DType::F16, DType::BF16] {
        let model =
            ClipTextModel::load(&fixture("tiny-sd-turbo/text_encoder"), dtype, &Device::Cpu)
                .expect("load text encoder");
        let g = golden("golden/text_encoder.safetensors");
        let out = model.forward(&ids_u32(&g["input_ids"])).expect("forward");
        assert_eq!(out.dtype(), dtype);
        let (max, mean) = abs_err(&out, &g["last_hidden_state"]);
        println!("text encoder {dtype:?}: max {max:.3e} mean {mean:.3e}");
        assert!(max < 0.1 && mean < 0.01, "{dtype:?}: max {max} mean {mean}");
    }
}

#[test]
fn unsupported_activation_is_named() {
    let dir = scratch_dir("clip-act");
    std::fs::write(
        dir.join("config.json"),
        edited_config(
            "tiny-sd-turbo/text_encoder/config.json",
            "hidden_act",
            "gelu_10".into(),
        ),
    )
    .unwrap();
    std::fs::copy(
        fixture("tiny-sd-turbo/text_encoder/model.safetensors"),
        dir.join("model.safetensors"),
    )
    .unwrap();
    let err = ClipTextModel::load(&dir, DType::F32, &Device::Cpu)
        .expect_err("config must be rejected")
        .to_string();
    assert!(
        err.contains("hidden_act") && err.contains("gelu_10"),
        "{err}"
    );
    assert!(err.contains("config.json"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn missing_weights_name_the_folder() {
    let dir = scratch_dir("clip-noweights");
    std::fs::write(
        dir.join("config.json"),
        edited_config(
            "tiny-sd-turbo/text_encoder/config.json",
            "hidden_act",
            "gelu".into(),
        ),
    )
    .unwrap();
    let err = ClipTextModel::load(&dir, DType::F32, &Device::Cpu)
        .expect_err("must fail without weights")
        .to_string();
    assert!(err.contains(&dir.display().to_string()), "{err}");
    assert!(err.contains("model.safetensors"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn wrong_shapes_name_the_file() {
    let dir = scratch_dir("clip-shape");
    std::fs::write(
        dir.join("config.json"),
        edited_config(
            "tiny-sd-turbo/text_encoder/config.json",
            "hidden_size",
            48.into(),
        ),
    )
    .unwrap();
    std::fs::copy(
        fixture("tiny-sd-turbo/text_encoder/model.safetensors"),
        dir.join("model.safetensors"),
    )
    .unwrap();
    let err = ClipTextModel::load(&dir, DType::F32, &Device::Cpu)
        .expect_err("mismatched shapes must be rejected")
        .to_string();
    assert!(err.contains("model.safetensors"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}
