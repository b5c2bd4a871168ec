//! AutoencoderKL against diffusers (goldens from tests/reference/).

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use sdstream::model::vae::AutoencoderKl;

fn fixture(rel: &str) -> PathBuf {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures")).join(rel)
}

fn golden(name: &str) -> std::collections::HashMap<String, Tensor> {
    let path = fixture(&format!("golden/{name}"));
    candle_core::safetensors::load(&path, &Device::Cpu)
        .unwrap_or_else(|e| panic!("cannot read golden {}: {e}", path.display()))
}

/// (max, mean) absolute difference, computed in f32.
fn abs_err(got: &Tensor, want: &Tensor) -> (f32, f32) {
    assert_eq!(got.dims(), want.dims(), "shape");
    let diff = (got.to_dtype(DType::F32).unwrap() - want.to_dtype(DType::F32).unwrap())
        .unwrap()
        .abs()
        .unwrap();
    let max = diff.max_all().unwrap().to_scalar::<f32>().unwrap();
    let mean = diff.mean_all().unwrap().to_scalar::<f32>().unwrap();
    (max, mean)
}

fn check(what: &str, got: &Tensor, want: &Tensor, tol: f32) {
    let (max, mean) = abs_err(got, want);
    println!("{what}: max {max:.3e} mean {mean:.3e}");
    assert!(max <= tol, "{what}: max abs error {max} > {tol}");
}

/// The tiny sd-turbo VAE: posterior moments, a posterior sample, and decoding.
#[test]
fn tiny_sd_turbo_vae_matches_diffusers() {
    let vae = AutoencoderKl::load(&fixture("tiny-sd-turbo/vae"), DType::F32, &Device::Cpu)
        .expect("load vae");
    assert_eq!(vae.spatial_scale_factor(), 8);
    assert_eq!(vae.scaling_factor(), 0.18215);
    let g = golden("vae.safetensors");
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
    let g = golden("nets_vae_odd.safetensors");
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
    let g = golden("vae.safetensors");
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

fn scratch_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("sdstream-vae-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn edited_config(key: &str, value: serde_json::Value) -> String {
    let text = std::fs::read_to_string(fixture("tiny-sd-turbo/vae/config.json")).unwrap();
    let mut json: serde_json::Value = serde_json::from_str(&text).unwrap();
    json[key] = value;
    json.to_string()
}

#[test]
fn unsupported_block_type_is_named() {
    let dir = scratch_dir("blocks");
    let types = serde_json::json!([
        "DownEncoderBlock2D",
        "AttnDownEncoderBlock2D",
        "DownEncoderBlock2D",
        "DownEncoderBlock2D"
    ]);
    std::fs::write(
        dir.join("config.json"),
        edited_config("down_block_types", types),
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
    let dir = scratch_dir("noweights");
    std::fs::write(
        dir.join("config.json"),
        edited_config("act_fn", "silu".into()),
    )
    .unwrap();
    let err = AutoencoderKl::load(&dir, DType::F32, &Device::Cpu)
        .expect_err("must fail without weights")
        .to_string();
    assert!(err.contains(&dir.display().to_string()), "{err}");
    assert!(err.contains("diffusion_pytorch_model"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}
