//! Times the UNet forward pass on sd-turbo-shaped (SD 2.1) random weights.
//!
//! `cargo run --release -p sdstream --example unet_bench -- [latent_size] [batch] [iters] [f32|f16|bf16]`
//! (`bf16`: f32 weights and maps with the GEMMs on bf16 operands, what `dtype: "bf16"` means on
//! the CPU)
//! e.g. `-- 32 1 3` for 256×256 images with one denoising step.

use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use sdstream::model::unet::{UNet2DConditionModel, UNetConfig, UNetInputs};

// As the C ABI, the Python module and the server have it (sdstream::alloc); `SDSTREAM_REUSE_MB=0`
// times the system allocator alone.
#[global_allocator]
static ALLOCATOR: sdstream::alloc::ReusingAllocator = sdstream::alloc::ReusingAllocator::new();

const SD_TURBO_UNET: &str = r#"{
  "attention_head_dim": [5, 10, 20, 20],
  "block_out_channels": [320, 640, 1280, 1280],
  "cross_attention_dim": 1024,
  "use_linear_projection": true,
  "upcast_attention": null
}"#;

fn main() -> sdstream::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg =
        |i: usize, default: usize| args.get(i).and_then(|s| s.parse().ok()).unwrap_or(default);
    let (size, batch, iters) = (arg(0, 32), arg(1, 1), arg(2, 3));
    let dtype = match args.get(3).map(String::as_str) {
        Some("f16") => DType::F16,
        _ => DType::F32,
    };
    let bf16_gemms = args.get(3).is_some_and(|a| a == "bf16");
    let device = Device::Cpu;
    let config: UNetConfig =
        serde_json::from_str(SD_TURBO_UNET).map_err(|e| sdstream::Error::Json(e.to_string()))?;
    // Zero weights: the values do not change the work done.
    let vb = VarBuilder::zeros(dtype, &device);
    let unet = UNet2DConditionModel::new(&config, vb)?.with_bf16_gemms(bf16_gemms);
    let sample = Tensor::randn(0f32, 1., (batch, 4, size, size), &device)?.to_dtype(dtype)?;
    let context = Tensor::randn(0f32, 1., (batch, 77, 1024), &device)?.to_dtype(dtype)?;
    let t: Vec<f32> = (0..batch).map(|i| 999.0 - 200.0 * i as f32).collect();
    let t = Tensor::new(t.as_slice(), &device)?;
    let _ = unet.forward(UNetInputs::new(&sample, &t, &context))?;
    let mut times = Vec::new();
    for _ in 0..iters {
        let start = Instant::now();
        let out = unet.forward(UNetInputs::new(&sample, &t, &context))?;
        let _ = out.sum_all()?.to_dtype(DType::F32)?.to_scalar::<f32>()?;
        times.push(start.elapsed().as_secs_f64() * 1e3);
    }
    times.sort_by(f64::total_cmp);
    println!(
        "UNet {size}x{size} latent, batch {batch}, {dtype:?}{}, {} threads: median {:.0} ms (min {:.0})",
        if bf16_gemms { " (bf16 GEMMs)" } else { "" },
        candle_core::utils::get_num_threads(),
        times[times.len() / 2],
        times[0]
    );
    Ok(())
}
