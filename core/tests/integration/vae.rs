//! AutoencoderKL against diffusers (goldens from tests/reference/).

use crate::common;

use common::{abs_err, check, edited_config, fixture, golden, scratch_dir};

use candle_core::{DType, Device};
use sdstream::model::vae::AutoencoderKl;

/// The tiny sd-turbo VAE: posterior moments, a posterior sample, and decoding.
#[test]
fn tiny_sd_turbo_vae_matches_diffusers() {
    let vae = AutoencoderKl::load(&fixture("tiny-sd-turbo/vae"), DType::F32, &Device::Cpu)
        .expect("load vae");
    assert_eq!(vae.spatial_scale_factor(), 8);
    assert_eq!(vae.scaling_factor(), 0.18215);
    let g = golden("golden/vae.safetensors");
    let (mean, logvar) = vae.encode_moments(&g["image"]).expect("encode");
    check("vae posterior mean", &mean, &g["posterior_mean"], 1e-4);
    check(
        "vae posterior logvar",
        &logvar,
        &g["posterior_logvar"],
        1e-4,
    );

    // The golden sample used torch's generator; recover its standard-normal draw from the
    // reference's own mean and std, then check our sampling formula reproduces the sample.
    let noise = ((&g["posterior_sample_seed7"] - &g["posterior_mean"]).unwrap()
        / &g["posterior_std"])
        .unwrap();
    let sample = AutoencoderKl::sample_posterior(&mean, &logvar, &noise).expect("sample");
    check(
        "vae posterior sample",
        &sample,
        &g["posterior_sample_seed7"],
        1e-4,
    );

    let decoded = vae.decode(&g["latent"]).expect("decode");
    check("vae decoded", &decoded, &g["decoded"], 1e-4);
}

/// Three levels, two ResNets per level, 2 groups, affine norms, fp16-only weights file,
/// a batch of two non-square images with odd latent sizes.
#[test]
fn odd_shaped_vae_matches_diffusers() {
    let vae =
        AutoencoderKl::load(&fixture("nets-vae-odd"), DType::F32, &Device::Cpu).expect("load vae");
    assert_eq!(vae.spatial_scale_factor(), 4);
    assert_eq!(vae.scaling_factor(), 0.5);
    let g = golden("golden/nets_vae_odd.safetensors");
    let (mean, logvar) = vae.encode_moments(&g["image"]).expect("encode");
    check("odd vae posterior mean", &mean, &g["posterior_mean"], 1e-4);
    check(
        "odd vae posterior logvar",
        &logvar,
        &g["posterior_logvar"],
        1e-4,
    );
    let decoded = vae.decode(&g["latent"]).expect("decode");
    check("odd vae decoded", &decoded, &g["decoded"], 1e-4);
}

/// Half precision runs end to end (loose bound: f16/bf16 arithmetic).
#[test]
fn runs_in_half_precision() {
    let g = golden("golden/vae.safetensors");
    for dtype in [DType::F16, DType::BF16] {
        let vae = AutoencoderKl::load(&fixture("tiny-sd-turbo/vae"), dtype, &Device::Cpu)
            .expect("load vae");
        let (mean, _) = vae
            .encode_moments(&g["image"].to_dtype(dtype).unwrap())
            .expect("encode");
        assert_eq!(mean.dtype(), dtype);
        let (max_m, _) = abs_err(&mean, &g["posterior_mean"]);
        let decoded = vae
            .decode(&g["latent"].to_dtype(dtype).unwrap())
            .expect("decode");
        let (max_d, mean_d) = abs_err(&decoded, &g["decoded"]);
        println!("vae {dtype:?}: mean max {max_m:.3e}, decoded max {max_d:.3e} mean {mean_d:.3e}");
        assert!(max_m < 0.5 && max_d < 0.1, "{dtype:?}: {max_m} {max_d}");
    }
}

#[test]
fn unsupported_block_type_is_named() {
    let dir = scratch_dir("vae-blocks");
    let types = serde_json::json!([
        "DownEncoderBlock2D",
        "AttnDownEncoderBlock2D",
        "DownEncoderBlock2D",
        "DownEncoderBlock2D"
    ]);
    std::fs::write(
        dir.join("config.json"),
        edited_config("tiny-sd-turbo/vae/config.json", "down_block_types", types),
    )
    .unwrap();
    std::fs::copy(
        fixture("tiny-sd-turbo/vae/diffusion_pytorch_model.safetensors"),
        dir.join("diffusion_pytorch_model.safetensors"),
    )
    .unwrap();
    let err = AutoencoderKl::load(&dir, DType::F32, &Device::Cpu)
        .expect_err("config must be rejected")
        .to_string();
    assert!(
        err.contains("down_block_types") && err.contains("AttnDownEncoderBlock2D"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn missing_weights_name_the_folder() {
    let dir = scratch_dir("vae-noweights");
    std::fs::write(
        dir.join("config.json"),
        edited_config("tiny-sd-turbo/vae/config.json", "act_fn", "silu".into()),
    )
    .unwrap();
    let err = AutoencoderKl::load(&dir, DType::F32, &Device::Cpu)
        .expect_err("must fail without weights")
        .to_string();
    assert!(err.contains(&dir.display().to_string()), "{err}");
    assert!(err.contains("diffusion_pytorch_model"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}
