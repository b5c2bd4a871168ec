//! TAESD (diffusers' AutoencoderTiny) against diffusers (goldens from tests/reference/).

use crate::common;

use common::{abs_err, check, edited_config, fixture, golden, scratch_dir};

use candle_core::{DType, Device};
use sdstream::model::taesd::AutoencoderTiny;

#[test]
fn encode_and_decode_match_diffusers() {
    let taesd = AutoencoderTiny::load(&fixture("tiny-taesd"), DType::F32, &Device::Cpu)
        .expect("load taesd");
    assert_eq!(taesd.spatial_scale_factor(), 8);
    assert_eq!(taesd.decoder_scale_factor(), 8);
    assert_eq!(taesd.scaling_factor(), 1.0);
    let g = golden("golden/taesd.safetensors");
    let latents = taesd.encode(&g["image"]).expect("encode");
    check("taesd latents", &latents, &g["latents"], 1e-4);
    let decoded = taesd.decode(&g["latent"]).expect("decode");
    check("taesd decoded", &decoded, &g["decoded"], 1e-4);
}

/// Half precision runs end to end (loose bound: f16/bf16 arithmetic).
#[test]
fn runs_in_half_precision() {
    let g = golden("golden/taesd.safetensors");
    for dtype in [DType::F16, DType::BF16] {
        let taesd =
            AutoencoderTiny::load(&fixture("tiny-taesd"), dtype, &Device::Cpu).expect("load taesd");
        let latents = taesd
            .encode(&g["image"].to_dtype(dtype).unwrap())
            .expect("encode");
        assert_eq!(latents.dtype(), dtype);
        let (max_l, mean_l) = abs_err(&latents, &g["latents"]);
        let decoded = taesd
            .decode(&g["latent"].to_dtype(dtype).unwrap())
            .expect("decode");
        let (max_d, mean_d) = abs_err(&decoded, &g["decoded"]);
        println!(
            "taesd {dtype:?}: latents max {max_l:.3e} mean {mean_l:.3e}, \
             decoded max {max_d:.3e} mean {mean_d:.3e}"
        );
        assert!(
            mean_l < 0.05 && mean_d < 0.05,
            "{dtype:?}: {mean_l} {mean_d}"
        );
    }
}

#[test]
fn unsupported_upsampling_is_named() {
    let dir = scratch_dir("taesd-upsample");
    std::fs::write(
        dir.join("config.json"),
        edited_config("tiny-taesd/config.json", "upsample_fn", "bicubic".into()),
    )
    .unwrap();
    std::fs::copy(
        fixture("tiny-taesd/diffusion_pytorch_model.safetensors"),
        dir.join("diffusion_pytorch_model.safetensors"),
    )
    .unwrap();
    let err = AutoencoderTiny::load(&dir, DType::F32, &Device::Cpu)
        .expect_err("config must be rejected")
        .to_string();
    assert!(
        err.contains("upsample_fn") && err.contains("bicubic"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn missing_weights_name_the_folder() {
    let dir = scratch_dir("taesd-noweights");
    std::fs::write(
        dir.join("config.json"),
        edited_config("tiny-taesd/config.json", "act_fn", "relu".into()),
    )
    .unwrap();
    let err = AutoencoderTiny::load(&dir, DType::F32, &Device::Cpu)
        .expect_err("must fail without weights")
        .to_string();
    assert!(err.contains(&dir.display().to_string()), "{err}");
    assert!(err.contains("diffusion_pytorch_model"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}
