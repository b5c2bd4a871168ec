//! With the `cuda` feature, compiles sdstream's own CUDA kernels (kernels/src/*.cu) to
//! PTX in OUT_DIR, which the crate embeds and the driver compiles for the GPU it meets at run
//! time. Without the feature it does nothing: a CPU-only build needs no CUDA toolkit.
//!
//! nvcc is `$NVCC` or the one on PATH (scripts/cuda-toolchain.sh installs one). The PTX targets
//! compute capability `$CUDA_COMPUTE_CAP` (the one candle's kernels are built for; letters such
//! as the `a` of `90a` dropped), else 8.0, the lowest with the bf16 arithmetic the kernels use.

use std::path::PathBuf;
use std::process::Command;

/// The kernels, by file stem.
const KERNELS: &[&str] = &[
    "attention",
    "canny",
    "group_norm",
    "layer_norm",
    "ops",
    "transfer",
];

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=NVCC");
    println!("cargo:rerun-if-env-changed=CUDA_COMPUTE_CAP");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let nvcc = std::env::var("NVCC").unwrap_or_else(|_| "nvcc".to_string());
    let cap = std::env::var("CUDA_COMPUTE_CAP")
        .ok()
        .map(|c| {
            c.trim()
                .trim_end_matches(|ch: char| ch.is_ascii_alphabetic())
                .to_string()
        })
        .filter(|c| !c.is_empty() && c.bytes().all(|b| b.is_ascii_digit()))
        .unwrap_or_else(|| "80".to_string());
    // The header every kernel includes.
    println!("cargo:rerun-if-changed=src/storage.cuh");
    for name in KERNELS {
        let src = format!("src/{name}.cu");
        println!("cargo:rerun-if-changed={src}");
        let ptx = out.join(format!("{name}.ptx"));
        let status = Command::new(&nvcc)
            .args([
                "--ptx",
                "-O3",
                "-std=c++17",
                &format!("-arch=compute_{cap}"),
                "-o",
            ])
            .arg(&ptx)
            .arg(&src)
            .status();
        match status {
            Ok(s) if s.success() => {}
            Ok(s) => panic!("{nvcc} failed on {src} ({s})"),
            Err(e) => panic!(
                "the cuda feature compiles {src} with nvcc ($NVCC or PATH; \
                 scripts/cuda-toolchain.sh installs one): {nvcc}: {e}"
            ),
        }
    }
}
