//! The golden streams on a CUDA device: the tiny checkpoint's stream cases and ControlNet stream
//! cases (CLIP, UNet, ControlNets, TAESD and the full VAE, all on the device) in f32 against the
//! reference's outputs within the CPU's bounds, and in f16 and bf16 against the device's own f32
//! run within stated bounds in 8-bit levels.
//!
//! The tests run when this build has the `cuda` feature and CUDA device 0 opens. Without the
//! feature they are ignored (libtest lists them as such; `--include-ignored` runs them, and they
//! then say why they skip). With the feature but no device, each says on stderr that it was
//! SKIPPED and why, having checked nothing; with
//! `SDSTREAM_REQUIRE_CUDA=1` (as scripts/gpu-kit/run.sh sets) a missing device fails instead, so a
//! run on a GPU machine cannot pass by skipping.

mod common;
mod streams;

use candle_core::{DType, Device, Tensor};
use streams::{CASES, CONTROLNET_CASES, Levels, Target, check_case_against_golden, run_case};

const CUDA_F32: Target = Target {
    device: "cuda",
    dtype: "f32",
};

/// f16 against f32 on the device, worst frame of any case, in 8-bit levels: the bound the CPU's
/// portable path is held to (tests/stream_portable.rs: measured max 7.65, mean 0.70 there).
const F16_MAX_LEVELS: f32 = 10.0;
/// See [`F16_MAX_LEVELS`].
const F16_MEAN_LEVELS: f32 = 1.0;
/// bf16 against f32 on the device: provisional, 8× the f16 bounds for bf16's 3 fewer mantissa
/// bits (the CPU cannot run bf16 to measure it); the first GPU run prints the figures to tighten
/// it with.
const BF16_MAX_LEVELS: f32 = 80.0;
/// See [`BF16_MAX_LEVELS`].
const BF16_MEAN_LEVELS: f32 = 8.0;

/// Whether CUDA device 0 opens; if not, says so (or fails under `SDSTREAM_REQUIRE_CUDA=1`).
fn cuda_or_skip(test: &str) -> bool {
    let why = match candle_core::Device::new_cuda(0) {
        Ok(_) => return true,
        Err(e) if cfg!(feature = "cuda") => format!("CUDA device 0 does not open: {e}"),
        Err(_) => "this build has no `cuda` feature (cargo test --features cuda)".to_string(),
    };
    if std::env::var_os("SDSTREAM_REQUIRE_CUDA").is_some_and(|v| !v.is_empty() && v != "0") {
        panic!("{test}: SDSTREAM_REQUIRE_CUDA is set but {why}");
    }
    // Straight to stderr, past the test harness's output capture, so that it shows in a plain
    // `cargo test` too.
    use std::io::Write;
    let _ = writeln!(
        std::io::stderr(),
        "SKIPPED {test}: {why}; nothing was checked"
    );
    false
}

fn all_cases() -> Vec<&'static str> {
    CASES.iter().chain(CONTROLNET_CASES).copied().collect()
}

#[test]
#[cfg_attr(
    not(feature = "cuda"),
    ignore = "needs the cuda feature and a CUDA device"
)]
fn cuda_f32_streams_match_goldens() {
    if !cuda_or_skip("cuda_f32_streams_match_goldens") {
        return;
    }
    for name in all_cases() {
        check_case_against_golden(name, CUDA_F32);
    }
}

#[test]
#[cfg_attr(
    not(feature = "cuda"),
    ignore = "needs the cuda feature and a CUDA device"
)]
fn cuda_half_precision_streams_stay_close_to_f32() {
    if !cuda_or_skip("cuda_half_precision_streams_stay_close_to_f32") {
        return;
    }
    let cases = all_cases();
    let f32_outputs: Vec<Vec<Tensor>> = cases.iter().map(|n| run_case(n, CUDA_F32)).collect();
    let bounds = [
        ("f16", F16_MAX_LEVELS, F16_MEAN_LEVELS),
        ("bf16", BF16_MAX_LEVELS, BF16_MEAN_LEVELS),
    ];
    for (dtype, max_levels, mean_levels) in bounds {
        let mut worst = Levels::default();
        for (name, reference) in cases.iter().zip(&f32_outputs) {
            let got = run_case(
                name,
                Target {
                    device: "cuda",
                    dtype,
                },
            );
            let levels = Levels::between(&got, reference);
            println!(
                "cuda {dtype} vs f32, {name}: max {:.2} levels, mean {:.3} levels",
                levels.max, levels.mean
            );
            worst = worst.worst(levels);
        }
        println!(
            "cuda {dtype} vs f32, worst case: max {:.2} levels (≤ {max_levels}), mean {:.3} levels (≤ {mean_levels})",
            worst.max, worst.mean
        );
        assert!(
            worst.max <= max_levels && worst.mean <= mean_levels,
            "cuda {dtype}: max {:.2} levels (≤ {max_levels}), mean {:.3} (≤ {mean_levels})",
            worst.max,
            worst.mean
        );
    }
}

#[test]
#[cfg_attr(
    not(feature = "cuda"),
    ignore = "needs the cuda feature and a CUDA device"
)]
fn cuda_networks_load_on_the_device_in_the_chosen_dtype() {
    if !cuda_or_skip("cuda_networks_load_on_the_device_in_the_chosen_dtype") {
        return;
    }
    for name in ["self_t3", "self_t3_fullvae"] {
        let case = streams::case(name);
        let f32_bytes = streams::models(case, CUDA_F32).weight_bytes();
        for (dtype, want) in [
            ("f32", DType::F32),
            ("f16", DType::F16),
            ("bf16", DType::BF16),
        ] {
            let target = Target {
                device: "cuda",
                dtype,
            };
            let models = streams::models(case, target);
            assert!(models.device.is_cuda(), "{name} {dtype}: not on CUDA");
            assert_eq!(models.dtype, want, "{name} {dtype}");
            // Every weight was converted: half the bytes of f32 in f16 and bf16.
            let bytes = models.weight_bytes() * (4 / want.size_in_bytes() as u64);
            assert_eq!(bytes, f32_bytes, "{name} {dtype}: weight bytes");
        }
    }
}

/// Without the feature, asking for CUDA says which feature to build with.
#[cfg(not(feature = "cuda"))]
#[test]
fn cuda_without_the_feature_names_it() {
    let settings = sdstream::EngineSettings::from_json(r#"{"device": "cuda:1"}"#).unwrap();
    let err = settings.device.device().unwrap_err().to_string();
    assert!(
        err.contains("device \"cuda:1\"") && err.contains("`cuda` feature"),
        "{err}"
    );
}

/// sdstream's GroupNorm (+ SiLU) kernel against its portable twin on the device, in every dtype,
/// on shapes of the UNet and the VAE (odd sizes and a large mean included).
#[test]
#[cfg_attr(
    not(feature = "cuda"),
    ignore = "needs the cuda feature and a CUDA device"
)]
fn cuda_group_norm_kernel_matches_the_portable_twin() {
    use sdstream::model::kernels::norm::GroupNorm;
    if !cuda_or_skip("cuda_group_norm_kernel_matches_the_portable_twin") {
        return;
    }
    let device = Device::new_cuda(0).unwrap();
    // (batch, channels, height, width, groups, offset, f32 bound)
    let shapes = [
        (2, 320, 64, 64, 32, 0.0, 2e-5f32),
        (1, 128, 257, 129, 32, 0.0, 2e-5),
        (3, 64, 9, 7, 4, 100.0, 2e-4),
        (1, 512, 1, 1, 32, 0.0, 2e-5),
    ];
    for (b, c, h, w, groups, offset, bound) in shapes {
        let x = ((Tensor::randn(0f32, 1.0, (b, c, h, w), &Device::Cpu).unwrap() * 3.0).unwrap()
            + offset)
            .unwrap();
        let weight = Tensor::randn(1f32, 0.2, c, &Device::Cpu).unwrap();
        let bias = Tensor::randn(0f32, 0.2, c, &Device::Cpu).unwrap();
        // f32: both sum in f32, in different orders; f16 and bf16: both compute in f32 and round
        // once, so a rounding may differ by an ulp at |y| up to 8 (2 ulps allowed).
        for (dtype, limit) in [
            (DType::F32, bound),
            (DType::F16, 8e-3),
            (DType::BF16, 6.25e-2),
        ] {
            let tensors = std::collections::HashMap::from([
                ("weight".to_string(), weight.to_dtype(dtype).unwrap()),
                ("bias".to_string(), bias.to_dtype(dtype).unwrap()),
            ]);
            let vb = candle_nn::VarBuilder::from_tensors(tensors, dtype, &device);
            let norm = GroupNorm::new(groups, c, 1e-5, vb).unwrap();
            let x = x.to_dtype(dtype).unwrap().to_device(&device).unwrap();
            for silu in [false, true] {
                let ours = if silu {
                    norm.forward_silu(&x)
                } else {
                    norm.forward(&x)
                }
                .unwrap();
                let twin = norm.forward_portable(&x, silu).unwrap();
                let (max, mean) = common::abs_err(
                    &ours.to_device(&Device::Cpu).unwrap(),
                    &twin.to_device(&Device::Cpu).unwrap(),
                );
                println!(
                    "group norm [{b}, {c}, {h}, {w}] / {groups} {dtype:?} silu {silu}: max {max:.2e} mean {mean:.2e}"
                );
                assert!(
                    max <= limit,
                    "{dtype:?} [{b}, {c}, {h}, {w}] silu {silu}: max {max} > {limit}"
                );
            }
        }
    }
}
