//! Times the CPU convolution kernels at the networks' shapes, channels-first (the UNet's and the
//! VAE's layout) beside channels-last (TAESD's), in GFLOP/s of the nominal 3×3 work (an
//! upsampled convolution counts the work at the upsampled size, which the channels-last kernel
//! does in 4 taps instead of 9: its figure can exceed the machine's peak).
//!
//! `cargo run --release -p sdstream --example conv_bench -- [iterations] [layer name filter] [batch] [f32|bf16]`
//! (a batch of three is what a three-step stream gives the UNet; `bf16`: f32 maps multiplied on
//! bf16 operands, what `dtype: "bf16"` means on the CPU)

use std::time::Instant;

// As the C ABI, the Python module and the server have it (sdstream::alloc); `SDSTREAM_REUSE_MB=0`
// times the system allocator alone.
#[global_allocator]
static ALLOCATOR: sdstream::alloc::ReusingAllocator = sdstream::alloc::ReusingAllocator::new();

use candle_core::{Device, Tensor};
use sdstream::model::kernels::conv::{Conv2d, Padding};
use sdstream::model::kernels::gemm_bf16;

/// Best wall time of `iterations` calls after one warm-up, in seconds.
fn best_of<F: FnMut() -> candle_core::Result<()>>(
    iterations: usize,
    mut f: F,
) -> candle_core::Result<f64> {
    f()?;
    let mut best = f64::MAX;
    for _ in 0..iterations {
        let t = Instant::now();
        f()?;
        best = best.min(t.elapsed().as_secs_f64());
    }
    Ok(best)
}

fn main() -> candle_core::Result<()> {
    let iterations = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(4);
    // Only the layers whose name contains this (all of them by default).
    let filter = std::env::args().nth(2).unwrap_or_default();
    let batch: usize = std::env::args()
        .nth(3)
        .and_then(|s| s.parse().ok())
        .unwrap_or(1);
    let bf16 = std::env::args().nth(4).is_some_and(|a| a == "bf16");
    let dev = Device::Cpu;
    println!("batch {batch}{}", if bf16 { ", bf16 products" } else { "" });
    println!(
        "| layer | input | stride | upsample | GFLOP | channels-first ms | GFLOP/s | channels-last ms | GFLOP/s |"
    );
    println!("|---|---|---:|---:|---:|---:|---:|---:|---:|");
    // (name, c_in, c_out, input size, stride, upsample)
    let shapes = [
        ("TAESD block, 512²", 64, 64, 512, 1, 1),
        ("TAESD upsampling, to 512²", 64, 64, 256, 1, 2),
        ("TAESD to image, 512²", 64, 3, 512, 1, 1),
        ("TAESD from image, 512²", 3, 64, 512, 1, 1),
        ("TAESD downsampling, 512²", 64, 64, 512, 2, 1),
        ("TAESD block, 256²", 64, 64, 256, 1, 1),
        ("TAESD block, 64²", 64, 64, 64, 1, 1),
        ("VAE decoder, 512² × 128", 128, 128, 512, 1, 1),
        ("VAE decoder upsampling, to 512² × 256", 256, 256, 256, 1, 2),
        ("VAE decoder, 256² × 256", 256, 256, 256, 1, 1),
        ("VAE decoder, 128² × 512", 512, 512, 128, 1, 1),
        ("UNet, 64² × 320", 320, 320, 64, 1, 1),
        ("UNet, 32² × 640", 640, 640, 32, 1, 1),
        ("UNet, 16² × 1280", 1280, 1280, 16, 1, 1),
        ("UNet, 8² × 1280", 1280, 1280, 8, 1, 1),
        ("UNet up, 64² × 960 → 320", 960, 320, 64, 1, 1),
        ("UNet up, 16² × 2560 → 1280", 2560, 1280, 16, 1, 1),
        ("UNet upsampling, to 32² × 1280", 1280, 1280, 16, 1, 2),
        ("VAE, 512² × 256 → 128", 256, 128, 512, 1, 1),
    ];
    for (name, c, co, hw, s, up) in shapes {
        if !name.contains(filter.as_str()) {
            continue;
        }
        let out = hw * up / s;
        let gflop = 2.0 * (batch * c * 9 * co * out * out) as f64 / 1e9;
        let weight = Tensor::randn(0f32, 0.1, (co, c, 3, 3), &dev)?;
        let bias = Tensor::randn(0f32, 0.1, co, &dev)?;
        let first = Conv2d::from_tensors(weight, Some(bias), s, Padding::uniform(1))?;
        let last = first.clone().into_channels_last()?;
        let x_first = Tensor::randn(0f32, 1.0, (batch, c, hw, hw), &dev)?;
        let x_last = x_first.permute((0, 2, 3, 1))?.contiguous()?;
        let t_first = best_of(iterations, || {
            gemm_bf16::scoped(bf16, || first.forward_upsampled(&x_first, up)).map(drop)
        })?;
        let t_last = best_of(iterations, || {
            gemm_bf16::scoped(bf16, || last.forward_upsampled(&x_last, up)).map(drop)
        })?;
        println!(
            "| {name} | {c}→{co} {hw}² | {s} | {up} | {gflop:.2} | {:.1} | {:.0} | {:.1} | {:.0} |",
            t_first * 1e3,
            gflop / t_first,
            t_last * 1e3,
            gflop / t_last
        );
    }
    Ok(())
}
