//! CLIP text encoder against transformers' `CLIPTextModel` (goldens from tests/reference/).

mod common;

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
