//! Every network through candle's portable ops only (the code path GPUs take), checked on the
//! CPU against the same goldens as tests/{unet,vae,taesd,clip}.rs with the same tolerances. One
//! test in its own binary, because `SDSTREAM_PORTABLE_KERNELS` is process-wide and read once.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use sdstream::model::clip::ClipTextModel;
use sdstream::model::taesd::AutoencoderTiny;
use sdstream::model::unet::{ControlResiduals, UNet2DConditionModel, UNetInputs};
use sdstream::model::vae::AutoencoderKl;

fn fixture(rel: &str) -> PathBuf {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures")).join(rel)
}

fn load(path: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(path, &Device::Cpu)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

fn golden(name: &str) -> HashMap<String, Tensor> {
    load(&fixture(&format!("golden/{name}")))
}

/// Prints and bounds the max abs error of `got` against `want`.
fn check(what: &str, got: &Tensor, want: &Tensor, tol: f32) {
    assert_eq!(got.dims(), want.dims(), "{what}: shape");
    let err = (got - want)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    println!("portable kernels, {what}: max abs err {err:.3e}");
    assert!(err <= tol, "{what}: max abs error {err} > {tol}");
}

#[test]
fn portable_kernels_match_references() {
    // SAFETY: the only test of this binary sets the variable before any other thread exists.
    unsafe { std::env::set_var("SDSTREAM_PORTABLE_KERNELS", "1") };
    let cpu = Device::Cpu;

    let unet = UNet2DConditionModel::load(&fixture("tiny-sd-turbo/unet"), DType::F32, &cpu)
        .expect("load unet");
    let g = golden("unet.safetensors");
    let (sample, t, ctx) = (&g["sample"], &g["timesteps"], &g["encoder_hidden_states"]);
    let out = unet.forward(UNetInputs::new(sample, t, ctx)).unwrap();
    check("unet, per-row timesteps", &out, &g["output"], 1e-4);
    let control = ControlResiduals {
        down: (0..12)
            .map(|i| g[&format!("control_down_residual_{i:02}")].clone())
            .collect(),
        mid: g["control_mid_residual"].clone(),
    };
    let out = unet
        .forward(UNetInputs::new(sample, t, ctx).control(Some(&control)))
        .unwrap();
    check(
        "unet, additional residuals",
        &out,
        &g["output_control"],
        1e-4,
    );

    // The variant with 1x1-conv projections, odd sizes and upcast attention.
    let dir = fixture("unet-variants/conv_proj_odd_size");
    let unet = UNet2DConditionModel::load(&dir, DType::F32, &cpu).expect("load unet variant");
    let g = load(&dir.join("io.safetensors"));
    let (sample, t, ctx) = (&g["sample"], &g["timesteps"], &g["encoder_hidden_states"]);
    let out = unet.forward(UNetInputs::new(sample, t, ctx)).unwrap();
    check("unet conv_proj_odd_size", &out, &g["output"], 1e-4);

    let vae =
        AutoencoderKl::load(&fixture("tiny-sd-turbo/vae"), DType::F32, &cpu).expect("load vae");
    let g = golden("vae.safetensors");
    let (mean, _) = vae.encode_moments(&g["image"]).unwrap();
    check("vae posterior mean", &mean, &g["posterior_mean"], 1e-4);
    let decoded = vae.decode(&g["latent"]).unwrap();
    check("vae decoded", &decoded, &g["decoded"], 1e-4);

    // Odd latent sizes: the stride-2 convolutions' one-sided padding.
    let vae = AutoencoderKl::load(&fixture("nets-vae-odd"), DType::F32, &cpu).expect("load vae");
    let g = golden("nets_vae_odd.safetensors");
    let (mean, _) = vae.encode_moments(&g["image"]).unwrap();
    check("odd vae posterior mean", &mean, &g["posterior_mean"], 1e-4);
    let decoded = vae.decode(&g["latent"]).unwrap();
    check("odd vae decoded", &decoded, &g["decoded"], 1e-4);

    let taesd = AutoencoderTiny::load(&fixture("tiny-taesd"), DType::F32, &cpu).expect("taesd");
    let g = golden("taesd.safetensors");
    let latents = taesd.encode(&g["image"]).unwrap();
    check("taesd latents", &latents, &g["latents"], 1e-4);
    let decoded = taesd.decode(&g["latent"]).unwrap();
    check("taesd decoded", &decoded, &g["decoded"], 1e-4);

    let clip = ClipTextModel::load(&fixture("tiny-sd-turbo/text_encoder"), DType::F32, &cpu)
        .expect("load text encoder");
    let g = golden("text_encoder.safetensors");
    let ids = g["input_ids"].to_dtype(DType::U32).unwrap();
    let out = clip.forward(&ids).unwrap();
    check("text encoder", &out, &g["last_hidden_state"], 1e-5);
}
