//! Attention alone, on the shapes sd-turbo's UNet meets at 512² (and SD 1.5's 64²
//! self-attention): sdstream's kernel (attention.cu on a CUDA device in f16 or bf16, the CPU
//! kernel in f32 on the CPU; on a CUDA device also the register-level kernel that the kernel
//! policy's `cuda_flash_attention` picks, and, built with `cudnn`, cuDNN's fused attention that
//! `cuda_cudnn_attention` picks, "refused" where cuDNN does not take the shape, static and, for
//! several images, from its kernel cache as `cuda_cudnn_kernel_cache` builds it) beside the
//! unfused path it replaced (candle's products
//! and softmax, the heads merged after), in milliseconds per call: the mean of `--reps` calls after warm-up
//! calls, the device synchronised before and after them. `scripts/gpu-kit/sdpa_reference.py`
//! gives torch's kernels (flash, cuDNN, memory-efficient, math) on the same shapes.
//!
//! ```text
//! cargo run --release -p sdstream --example attention_bench -- [--device cpu|cuda] \
//!     [--dtype f32|f16|bf16] [--reps 50]
//! ```

use std::process::ExitCode;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use sdstream::model::kernels::{KernelPolicy, attention};

/// (label, batch, heads, queries, keys, head dim), as sdpa_reference.py lists them. The rows of
/// 8 images are a cross-stream batch of eight streams (issue 44).
const SHAPES: [(&str, usize, usize, usize, usize, usize); 10] = [
    ("64² self", 1, 5, 4096, 4096, 64),
    ("64² cross", 1, 5, 4096, 77, 64),
    ("32² self", 1, 10, 1024, 1024, 64),
    ("32² cross", 1, 10, 1024, 77, 64),
    ("16² self", 1, 20, 256, 256, 64),
    ("16² cross", 1, 20, 256, 77, 64),
    ("8² self", 1, 20, 64, 64, 64),
    ("SD1.5 64² self", 1, 8, 4096, 4096, 40),
    ("64² self, 8 images", 8, 5, 4096, 4096, 64),
    ("64² cross, 8 images", 8, 5, 4096, 77, 64),
];

struct Args {
    device: String,
    dtype: String,
    reps: usize,
}

fn parse() -> Result<Args, String> {
    let mut a = Args {
        device: "cpu".into(),
        dtype: "f32".into(),
        reps: 50,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let v = it.next().ok_or(format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--device" => a.device = v,
            "--dtype" => a.dtype = v,
            "--reps" => a.reps = v.parse().map_err(|e| format!("--reps: {e}"))?,
            other => return Err(format!("unknown flag {other}")),
        }
    }
    if a.reps == 0 {
        return Err("--reps: at least 1".into());
    }
    Ok(a)
}

/// Mean milliseconds of `f` over `reps` calls, after 3 warm-up calls, `device` synchronised
/// before and after.
fn time_ms(
    device: &Device,
    reps: usize,
    f: impl Fn() -> candle_core::Result<Tensor>,
) -> candle_core::Result<f64> {
    for _ in 0..3 {
        f()?;
    }
    device.synchronize()?;
    let start = Instant::now();
    for _ in 0..reps {
        f()?;
    }
    device.synchronize()?;
    Ok(start.elapsed().as_secs_f64() * 1e3 / reps as f64)
}

fn run() -> Result<(), String> {
    let args = parse()?;
    let device = match args.device.as_str() {
        "cpu" => Device::Cpu,
        "cuda" => Device::new_cuda(0).map_err(|e| format!("--device cuda: {e}"))?,
        other => return Err(format!("--device: cpu or cuda, not {other:?}")),
    };
    let dtype = match args.dtype.as_str() {
        "f32" => DType::F32,
        "f16" => DType::F16,
        "bf16" => DType::BF16,
        other => return Err(format!("--dtype: f32, f16 or bf16, not {other:?}")),
    };
    let e = |e: candle_core::Error| e.to_string();
    println!(
        "attention on {} in {}, ms per call (mean of {} calls after 3 warm-up calls)",
        args.device, args.dtype, args.reps
    );
    println!(
        "| shape | B×H | N | M | d | sdstream ms | sdstream registers ms | cuDNN ms | \
         cuDNN, kernel cache ms | unfused ms |"
    );
    println!("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    let policy = KernelPolicy::current();
    let wmma = KernelPolicy {
        cuda_flash_attention: false,
        ..policy
    };
    let registers = KernelPolicy {
        cuda_flash_attention: true,
        ..policy
    };
    for (label, batch, heads, n, m, d) in SHAPES {
        let pairs = batch * heads;
        let draw = |tokens: usize| {
            Tensor::randn(0f32, 1.0, (pairs, tokens, d), &device)
                .and_then(|t| t.to_dtype(dtype))
                .map_err(e)
        };
        let (q, k, v) = (draw(n)?, draw(m)?, draw(m)?);
        let scale = (d as f64).powf(-0.5);
        // sdstream's kernel under `policy`, if it runs for these tensors.
        let time_ours = |policy: KernelPolicy| -> Result<String, String> {
            policy.scoped(|| {
                if !attention::runs_for(&q, d) {
                    return Ok("–".to_string());
                }
                let ms = time_ms(&device, args.reps, || {
                    attention::attention(&q, &k, &v, heads, scale)
                })
                .map_err(e)?;
                Ok(format!("{ms:.4}"))
            })
        };
        let ours = time_ours(wmma)?;
        let ours_registers = if attention::fused_on_cuda(&q, d) {
            time_ours(registers)?
        } else {
            "–".to_string()
        };
        // cuDNN's fused attention, where this build has it and cuDNN takes the shape (its
        // call count moves); attention.cu's kernel runs in its place where it does not.
        // With `kernel_cache`, a call of several images gets a dynamic-shape plan from its
        // geometry's kernel cache (one image keeps the static plan: "–"), which must be no
        // slower than the static plan beside it to pay.
        #[cfg(feature = "cudnn")]
        let time_cudnn = |kernel_cache: bool| -> Result<String, String> {
            use sdstream::model::kernels::cudnn_attention;
            if !attention::fused_on_cuda(&q, d) || (kernel_cache && batch == 1) {
                return Ok("–".to_string());
            }
            let before = cudnn_attention::calls();
            let ms = time_ours(KernelPolicy {
                cuda_cudnn_attention: true,
                cuda_cudnn_kernel_cache: kernel_cache,
                ..policy
            })?;
            Ok(if cudnn_attention::calls() > before {
                ms
            } else {
                "refused".to_string()
            })
        };
        #[cfg(feature = "cudnn")]
        let (cudnn, cudnn_kernel_cache) = (time_cudnn(false)?, time_cudnn(true)?);
        #[cfg(not(feature = "cudnn"))]
        let (cudnn, cudnn_kernel_cache) = ("–", "–");
        let unfused = time_ms(&device, args.reps, || {
            let scores = (q.matmul(&k.t()?)? * scale)?;
            candle_nn::ops::softmax_last_dim(&scores)?
                .matmul(&v)?
                .reshape((batch, heads, n, d))?
                .transpose(1, 2)?
                .reshape((batch, n, heads * d))
        })
        .map_err(e)?;
        println!(
            "| {label} | {batch}×{heads} | {n} | {m} | {d} | {ours} | {ours_registers} | {cudnn} | \
             {cudnn_kernel_cache} | {unfused:.4} |"
        );
    }
    #[cfg(feature = "cudnn")]
    {
        let plans = sdstream::model::kernels::cudnn_attention::plan_builds();
        println!("\ncuDNN attention: {plans}");
    }
    Ok(())
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("attention_bench: {e}");
            ExitCode::FAILURE
        }
    }
}
