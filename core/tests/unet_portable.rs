//! The UNet through candle's portable ops only (the code path GPUs take), checked on the CPU
//! against the same diffusers goldens as tests/unet.rs. Its own test binary, because the switch
//! is process-wide and read once.

mod common;

use candle_core::{DType, Device};
use common::{abs_err, fixture};
use sdstream::model::unet::{ControlResiduals, UNet2DConditionModel};

#[test]
fn portable_kernels_match_diffusers() {
    // SAFETY: the only test of this binary sets the variable before any other thread exists.
    unsafe { std::env::set_var("SDSTREAM_PORTABLE_KERNELS", "1") };
    let dir = fixture("tiny-sd-turbo/unet");
    let unet = UNet2DConditionModel::load(&dir, DType::F32, &Device::Cpu).unwrap();
    let g =
        candle_core::safetensors::load(fixture("golden/unet.safetensors"), &Device::Cpu).unwrap();
    let (sample, t, ctx) = (&g["sample"], &g["timesteps"], &g["encoder_hidden_states"]);
    let out = unet.forward(sample, t, ctx, None).unwrap();
    let err = abs_err(&out, &g["output"]).0;
    println!("portable kernels, per-row timesteps: max abs err {err:.3e}");
    assert!(err <= 1e-4, "{err}");
    let control = ControlResiduals {
        down: (0..12)
            .map(|i| g[&format!("control_down_residual_{i:02}")].clone())
            .collect(),
        mid: g["control_mid_residual"].clone(),
    };
    let out = unet.forward(sample, t, ctx, Some(&control)).unwrap();
    let err = abs_err(&out, &g["output_control"]).0;
    println!("portable kernels, additional residuals: max abs err {err:.3e}");
    assert!(err <= 1e-4, "{err}");

    // The variant with 1x1-conv projections, odd sizes and upcast attention.
    let dir = fixture("unet-variants/conv_proj_odd_size");
    let unet = UNet2DConditionModel::load(&dir, DType::F32, &Device::Cpu).unwrap();
    let g = candle_core::safetensors::load(dir.join("io.safetensors"), &Device::Cpu).unwrap();
    let out = unet
        .forward(
            &g["sample"],
            &g["timesteps"],
            &g["encoder_hidden_states"],
            None,
        )
        .unwrap();
    let err = abs_err(&out, &g["output"]).0;
    println!("portable kernels, conv_proj_odd_size: max abs err {err:.3e}");
    assert!(err <= 1e-4, "{err}");
}
