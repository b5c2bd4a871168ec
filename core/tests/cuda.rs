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

/// f16 against f32 on the device, worst frame of any case, in 8-bit levels. Measured on an H100
/// with cuDNN's convolutions, channels-first: worst max 18.81 and mean 1.21
/// (none_t4_fullvae_nonoise, four noiseless steps through the tiny random full VAE, which
/// amplifies rounding); the TAESD cases at most 2.4 and 0.28. Held to about 1.3× that. On an
/// H200 channels-last (a CUDA device's default since): worst max 16.14. (The CPU's portable path, candle's im2col
/// convolutions, measured 7.65 and 0.70: core/tests/integration/kernel_variants.rs.)
const F16_MAX_LEVELS: f32 = 24.0;
/// See [`F16_MAX_LEVELS`].
const F16_MEAN_LEVELS: f32 = 1.6;
/// bf16 against f32 on the device. Measured on an H100: worst max 55.32 and mean 6.09 levels
/// (none_t4_fullvae_nonoise again; the TAESD cases at most 10.1 and 1.2), bf16 keeping three
/// mantissa bits fewer than f16. Held to about 1.25× that.
const BF16_MAX_LEVELS: f32 = 70.0;
/// See [`BF16_MAX_LEVELS`].
const BF16_MEAN_LEVELS: f32 = 7.5;

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

/// A norm layer's `weight` and `bias` (given in f32) as stored in `dtype`, on `device`.
fn affine_vars(
    weight: &Tensor,
    bias: &Tensor,
    dtype: DType,
    device: &Device,
) -> candle_nn::VarBuilder<'static> {
    let tensors = std::collections::HashMap::from([
        ("weight".to_string(), weight.to_dtype(dtype).unwrap()),
        ("bias".to_string(), bias.to_dtype(dtype).unwrap()),
    ]);
    candle_nn::VarBuilder::from_tensors(tensors, dtype, device)
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
    // The frames after each stream's first ran as CUDA graphs (UNet, TAESD), unless turned off.
    let counts = sdstream::model::cuda_graph::counts();
    println!("CUDA graphs: {counts:?}");
    if std::env::var_os("SDSTREAM_CUDA_GRAPHS").is_none_or(|v| v != "0") {
        assert_eq!(counts.failed, 0, "{counts:?}");
        assert!(
            counts.captured > 0 && counts.replayed > counts.captured,
            "{counts:?}"
        );
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
    let mut failures = Vec::new();
    for (dtype, max_levels, mean_levels) in bounds {
        let mut worst = Levels::default();
        for (name, reference) in cases.iter().zip(&f32_outputs) {
            let target = Target {
                device: "cuda",
                dtype,
            };
            worst = worst.worst(Levels::of_case(name, target, reference, "cuda"));
        }
        // Both dtypes are measured before either is judged, so that a run prints every figure.
        let what = format!("cuda {dtype} vs f32, worst case");
        if let Err(over) = worst.within(&what, max_levels, mean_levels) {
            failures.push(over);
        }
    }
    assert!(failures.is_empty(), "{failures:?}");
}

/// The same stream cases with the UNet, the ControlNets and the autoencoders keeping their maps
/// channels-first (SDSTREAM_CHANNELS_LAST=0: cuDNN's NCHW convolutions, GroupNorm's
/// channels-first kernel), the layout a CUDA device runs only when asked since channels-last
/// became its default (which every other stream test here runs): f32 against the reference's
/// outputs within the CPU's bounds, f16 against that f32 run within the same bound as the
/// default layout.
#[test]
#[cfg_attr(
    not(feature = "cuda"),
    ignore = "needs the cuda feature and a CUDA device"
)]
fn cuda_channels_first_streams_match_goldens() {
    use sdstream::model::kernels::{ChannelsLast, KernelPolicy};
    use sdstream::model::unet::UNet2DConditionModel;
    if !cuda_or_skip("cuda_channels_first_streams_match_goldens") {
        return;
    }
    KernelPolicy {
        channels_last: ChannelsLast::Off,
        ..KernelPolicy::process()
    }
    .scoped(|| {
        let cuda = Device::new_cuda(0).unwrap();
        let unet =
            UNet2DConditionModel::load(&common::fixture("tiny-sd-turbo/unet"), DType::F16, &cuda)
                .unwrap();
        assert!(!unet.maps_channels_last(), "the layout was not taken");
        drop(unet);
        let cases = all_cases();
        let f32_outputs: Vec<Vec<Tensor>> = cases
            .iter()
            .map(|name| check_case_against_golden(name, CUDA_F32))
            .collect();
        let mut worst = Levels::default();
        for (name, reference) in cases.iter().zip(&f32_outputs) {
            let target = Target {
                device: "cuda",
                dtype: "f16",
            };
            worst = worst.worst(Levels::of_case(
                name,
                target,
                reference,
                "cuda channels first",
            ));
        }
        worst.assert_within(
            "cuda channels-first f16 vs f32, worst case",
            F16_MAX_LEVELS,
            F16_MEAN_LEVELS,
        );
    });
    let counts = sdstream::model::cuda_graph::counts();
    println!("CUDA graphs: {counts:?}");
    if std::env::var_os("SDSTREAM_CUDA_GRAPHS").is_none_or(|v| v != "0") {
        assert_eq!(counts.failed, 0, "{counts:?}");
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

/// sdstream's GroupNorm (+ SiLU) kernels against their portable twin on the device, in every
/// dtype, on shapes of the UNet and the VAE (odd sizes and a large mean included): channels
/// first, channels last, and channels last through the `_rows` kernels.
#[test]
#[cfg_attr(
    not(feature = "cuda"),
    ignore = "needs the cuda feature and a CUDA device"
)]
fn cuda_group_norm_kernel_matches_the_portable_twin() {
    use sdstream::model::kernels::KernelPolicy;
    use sdstream::model::kernels::norm::{GroupNorm, group_norm_rows_calls};
    if !cuda_or_skip("cuda_group_norm_kernel_matches_the_portable_twin") {
        return;
    }
    let device = Device::new_cuda(0).unwrap();
    // (batch, channels, height, width, groups, offset, f32 bound)
    // The UNet's widest and narrowest maps, the VAE's, a large mean, one pixel, and a group of
    // 3 channels (the `_rows` kernels' single-channel runs).
    let shapes = [
        (2, 320, 64, 64, 32, 0.0, 2e-5f32),
        (1, 1280, 8, 8, 32, 0.0, 2e-5),
        (1, 128, 257, 129, 32, 0.0, 2e-5),
        (3, 64, 9, 7, 4, 100.0, 2e-4),
        (1, 512, 1, 1, 32, 0.0, 2e-5),
        (2, 96, 5, 6, 32, 0.0, 2e-5),
    ];
    let rows_before = group_norm_rows_calls();
    let mut rows_runs = 0;
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
            let vb = affine_vars(&weight, &bias, dtype, &device);
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
                // The kernel's channels-last entry points on the same values laid out
                // [B, H, W, C], against the same twin: the two-pass kernels and the `_rows`
                // ones (kernel policy `cuda_group_norm_rows`).
                let last = norm.clone().into_channels_last();
                let x_last = x.permute((0, 2, 3, 1)).unwrap().contiguous().unwrap();
                for rows in [false, true] {
                    let ours_last = KernelPolicy {
                        cuda_group_norm_rows: rows,
                        ..KernelPolicy::process()
                    }
                    .scoped(|| {
                        if silu {
                            last.forward_silu(&x_last)
                        } else {
                            last.forward(&x_last)
                        }
                    })
                    .unwrap()
                    .permute((0, 3, 1, 2))
                    .unwrap();
                    rows_runs += usize::from(rows);
                    let (max, mean) = common::abs_err(
                        &ours_last.to_device(&Device::Cpu).unwrap(),
                        &twin.to_device(&Device::Cpu).unwrap(),
                    );
                    let kernels = if rows { "rows" } else { "two-pass" };
                    println!(
                        "group norm channels last ({kernels}) [{b}, {h}, {w}, {c}] / {groups} {dtype:?} silu {silu}: max {max:.2e} mean {mean:.2e}"
                    );
                    assert!(
                        max <= limit,
                        "{dtype:?} channels last ({kernels}) [{b}, {h}, {w}, {c}] silu {silu}: max {max} > {limit}"
                    );
                }
            }
        }
    }
    // Every shape here fits the `_rows` kernels: none fell back to the two-pass ones.
    assert_eq!(group_norm_rows_calls() - rows_before, rows_runs as u64);
}

/// A resnet's time embedding added in the `_rows` kernels' reads (`GroupNorm::forward_with_added`,
/// kernel policy `cuda_group_norm_rows`) against the separate in-place add followed by the same
/// kernels: the same bits, in f32, f16 and bf16, with and without SiLU, on the UNet's maps of
/// several images (each with its own embedding) and a tiny checkpoint's odd groups.
#[test]
#[cfg_attr(
    not(feature = "cuda"),
    ignore = "needs the cuda feature and a CUDA device"
)]
fn cuda_group_norm_with_an_added_embedding_matches_the_separate_add() {
    use sdstream::model::kernels::KernelPolicy;
    use sdstream::model::kernels::norm::{GroupNorm, group_norm_rows_calls};
    use sdstream::model::kernels::ops::add_fresh_per_batch;
    if !cuda_or_skip("cuda_group_norm_with_an_added_embedding_matches_the_separate_add") {
        return;
    }
    let device = Device::new_cuda(0).unwrap();
    let rows = KernelPolicy {
        cuda_group_norm_rows: true,
        ..KernelPolicy::process()
    };
    // (batch, height, width, channels, groups)
    let shapes = [(2, 64, 64, 320, 32), (3, 8, 8, 1280, 32), (2, 5, 6, 24, 8)];
    let rows_before = group_norm_rows_calls();
    let mut runs = 0u64;
    // How many values of `a` and `b` differ.
    let count_differing = |a: &Tensor, b: &Tensor| {
        common::f32_on_cpu(a)
            .ne(&common::f32_on_cpu(b))
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    };
    for (b, h, w, c, groups) in shapes {
        let x = (Tensor::randn(0f32, 1.0, (b, h, w, c), &Device::Cpu).unwrap() * 3.0).unwrap();
        let t = Tensor::randn(0f32, 1.0, (b, c), &Device::Cpu).unwrap();
        let weight = Tensor::randn(1f32, 0.2, c, &Device::Cpu).unwrap();
        let bias = Tensor::randn(0f32, 0.2, c, &Device::Cpu).unwrap();
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            let vb = affine_vars(&weight, &bias, dtype, &device);
            let norm = GroupNorm::new(groups, c, 1e-5, vb)
                .unwrap()
                .into_channels_last();
            let xs = x.to_dtype(dtype).unwrap().to_device(&device).unwrap();
            let ts = t.to_dtype(dtype).unwrap().to_device(&device).unwrap();
            // The same values as columns of a wider product (a resnet's of every resnet's
            // time projection): rows c + 10 apart, which the kernels read without a copy.
            let pad = |n: usize| Tensor::full(1e3f32, (b, n), &Device::Cpu).unwrap();
            let wide = Tensor::cat(&[pad(3), t.clone(), pad(7)], 1)
                .unwrap()
                .to_dtype(dtype)
                .unwrap()
                .to_device(&device)
                .unwrap();
            let columns = wide.narrow(1, 3, c).unwrap();
            assert!(!columns.is_contiguous());
            for silu in [false, true] {
                let (fused, from_columns, separate) = rows.scoped(|| {
                    let fresh = (&xs * 1.0).unwrap();
                    let fused = norm.forward_with_added(fresh, &ts, silu).unwrap();
                    let from_columns = norm
                        .forward_with_added((&xs * 1.0).unwrap(), &columns, silu)
                        .unwrap();
                    let summed = add_fresh_per_batch(
                        (&xs * 1.0).unwrap(),
                        &ts.reshape((b, 1, 1, c)).unwrap(),
                        1,
                    )
                    .unwrap();
                    let separate = if silu {
                        norm.forward_silu(&summed)
                    } else {
                        norm.forward(&summed)
                    }
                    .unwrap();
                    (fused, from_columns, separate)
                });
                runs += 3;
                assert_eq!(
                    count_differing(&fused, &from_columns),
                    0.0,
                    "{dtype:?} [{b}, {h}, {w}, {c}] silu {silu}: the add read as columns"
                );
                let differ = count_differing(&fused, &separate);
                println!(
                    "group norm with an added embedding [{b}, {h}, {w}, {c}] / {groups} {dtype:?} silu {silu}: {differ} values differ"
                );
                assert_eq!(differ, 0.0, "{dtype:?} [{b}, {h}, {w}, {c}] silu {silu}");
            }
        }
    }
    // All three ways ran the `_rows` kernels every time.
    assert_eq!(group_norm_rows_calls() - rows_before, runs);
}

/// layer_norm.cu's kernel (kernel policy `cuda_layer_norm`) against the CPU kernel on the same
/// values (moments in f64), on the transformers' rows (320, 640 and 1,280 values, a batch of
/// 64² and 32² maps), a text encoder's (77 × 1,024), values far from zero and the narrowest row
/// it takes; candle's kernel, which runs without the switch, measured beside it.
#[test]
#[cfg_attr(
    not(feature = "cuda"),
    ignore = "needs the cuda feature and a CUDA device"
)]
fn cuda_layer_norm_kernel_matches_the_cpu_kernel() {
    use candle_core::Module;
    use sdstream::model::kernels::KernelPolicy;
    use sdstream::model::kernels::norm::{LayerNorm, layer_norm_kernel_calls};
    if !cuda_or_skip("cuda_layer_norm_kernel_matches_the_cpu_kernel") {
        return;
    }
    let device = Device::new_cuda(0).unwrap();
    // (rows, dim, offset)
    let shapes = [
        (2 * 4096, 320, 0.0f32),
        (2 * 1024, 640, 0.0),
        (256, 1280, 0.0),
        (77, 1024, 0.0),
        (13, 320, 50.0),
        (3, 8, 0.0),
    ];
    let calls_before = layer_norm_kernel_calls();
    let mut ours_runs = 0u64;
    for (rows, dim, offset) in shapes {
        let x = ((Tensor::randn(0f32, 1.0, (rows, dim), &Device::Cpu).unwrap() * 2.0).unwrap()
            + f64::from(offset))
        .unwrap();
        let weight = Tensor::randn(1f32, 0.2, dim, &Device::Cpu).unwrap();
        let bias = Tensor::randn(0f32, 0.2, dim, &Device::Cpu).unwrap();
        // f32: sums in f32 against f64 (and, far from zero, x − μ only as exact as x's f32 ulp);
        // f16 and bf16: both compute in f32 and the kernel rounds once (|y| below 8: an ulp).
        for (dtype, limit) in [
            (DType::F32, 2e-5f32 + offset.abs() * 2e-7),
            (DType::F16, 8e-3),
            (DType::BF16, 6.25e-2),
        ] {
            let stored = x.to_dtype(dtype).unwrap();
            // The CPU kernel in f32 on the values as stored, with the weights as stored.
            let stored_weight = weight.to_dtype(dtype).unwrap();
            let stored_bias = bias.to_dtype(dtype).unwrap();
            let twin = LayerNorm::new(
                dim,
                1e-5,
                affine_vars(&stored_weight, &stored_bias, DType::F32, &Device::Cpu),
            )
            .unwrap()
            .forward(&stored.to_dtype(DType::F32).unwrap())
            .unwrap();
            let norm =
                LayerNorm::new(dim, 1e-5, affine_vars(&weight, &bias, dtype, &device)).unwrap();
            let on_device = stored.to_device(&device).unwrap();
            for own in [true, false] {
                let out = KernelPolicy {
                    cuda_layer_norm: own,
                    ..KernelPolicy::process()
                }
                .scoped(|| norm.forward(&on_device))
                .unwrap();
                let (max, mean) = common::abs_err(&common::f32_on_cpu(&out), &twin);
                let kernel = if own { "layer_norm.cu" } else { "candle" };
                println!(
                    "layer norm ({kernel}) [{rows}, {dim}] offset {offset} {dtype:?}: max {max:.2e} mean {mean:.2e}"
                );
                if own {
                    ours_runs += 1;
                    assert!(
                        max <= limit,
                        "{dtype:?} [{rows}, {dim}] offset {offset}: max {max} > {limit}"
                    );
                }
            }
        }
    }
    // Every shape here fits the kernel: none fell back to candle's.
    assert_eq!(layer_norm_kernel_calls() - calls_before, ours_runs);
}

/// A frame crosses to the device as packed RGB8 and comes back as 8-bit pixels, converted on the
/// device (transfer.cu): the same bits as the host's conversions, for every pixel format, with
/// and without a resize, and for outputs in f32, f16 and bf16 with ties, values out of [0, 1]
/// and NaN among them.
#[test]
#[cfg_attr(
    not(feature = "cuda"),
    ignore = "needs the cuda feature and a CUDA device"
)]
fn cuda_frames_cross_in_8_bits_as_the_host_converts() {
    if !cuda_or_skip("cuda_frames_cross_in_8_bits_as_the_host_converts") {
        return;
    }
    let cuda = sdstream::EngineSettings::from_json(r#"{"device": "cuda"}"#)
        .unwrap()
        .device
        .device()
        .unwrap();
    // Through pageable memory (the default), then through the pinned buffers
    // (SDSTREAM_CUDA_PINNED), each run twice so that the buffers are reused.
    for pinned in [false, false, true, true] {
        let policy = sdstream::model::kernels::KernelPolicy {
            cuda_pinned: pinned,
            ..sdstream::model::kernels::KernelPolicy::process()
        };
        let compared = policy.scoped(|| frames_cross_in_8_bits(&cuda));
        println!(
            "8-bit transfers (pinned {pinned}): {compared} values and bytes compared, all equal"
        );
    }
}

/// The body of [`cuda_frames_cross_in_8_bits_as_the_host_converts`] under the current policy:
/// how many values and bytes it compared.
fn frames_cross_in_8_bits(cuda: &Device) -> usize {
    use sdstream::{Frame, Image, PixelFormat};
    let (w, h) = (67, 45);
    let formats = [PixelFormat::Rgb8, PixelFormat::Rgba8, PixelFormat::Bgra8];
    let mut compared = 0usize;
    for format in formats {
        let bytes: Vec<u8> = (0..w * h * format.bytes_per_pixel())
            .map(|i| (i * 97 % 256) as u8)
            .collect();
        let frame = Frame::packed(&bytes, w, h, format).unwrap();
        for (tw, th) in [(w, h), (32, 24)] {
            let host = frame.to_tensor(tw, th, &Device::Cpu).unwrap();
            let device = frame.to_tensor(tw, th, cuda).unwrap();
            assert_eq!(device.dims(), host.dims());
            let host: Vec<f32> = host.flatten_all().unwrap().to_vec1().unwrap();
            let device: Vec<f32> = device
                .to_device(&Device::Cpu)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let differing = host
                .iter()
                .zip(&device)
                .filter(|(a, b)| a.to_bits() != b.to_bits())
                .count();
            assert_eq!(
                differing, 0,
                "{format} to {tw}x{th}: {differing} values differ"
            );
            compared += host.len();
        }
    }
    // Outputs: every tie (k + 0.5) / 255, a ramp, values out of range and NaN.
    let plane = w * h;
    let values: Vec<f32> = (0..3 * plane)
        .map(|i| match i % 7 {
            0 => ((i / 7) % 256) as f32 / 255.0 + 0.5 / 255.0,
            1 => (i % 1000) as f32 / 999.0,
            2 => -0.25,
            3 => 1.5,
            4 if i % 11 == 0 => f32::NAN,
            _ => (i % 255) as f32 / 255.0,
        })
        .collect();
    let planes = Tensor::from_vec(values, (1, 3, h, w), &Device::Cpu).unwrap();
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        let planes = planes.to_dtype(dtype).unwrap();
        for format in formats {
            let host = Image::from_tensor(&planes, format).unwrap();
            let device = Image::from_tensor(&planes.to_device(cuda).unwrap(), format).unwrap();
            assert_eq!((device.width, device.height), (host.width, host.height));
            let differing = host
                .data
                .iter()
                .zip(&device.data)
                .filter(|(a, b)| a != b)
                .count();
            assert_eq!(device.data.len(), host.data.len());
            assert_eq!(differing, 0, "{dtype:?} {format}: {differing} bytes differ");
            compared += host.data.len();
        }
    }
    compared
}

/// A convolution the GPU tests check on the networks' shapes: 3×3 stride 1 and 2 (with the VAE's
/// uneven padding), 1×1, upsample-then-convolve, and a narrow input.
#[derive(Clone, Copy)]
struct ConvCase {
    b: usize,
    c_in: usize,
    c_out: usize,
    h: usize,
    w: usize,
    k: usize,
    stride: usize,
    padding: sdstream::model::kernels::conv::Padding,
    up: usize,
}

impl ConvCase {
    fn new(
        (b, c_in, c_out, h, w): (usize, usize, usize, usize, usize),
        (k, stride, padding, up): (usize, usize, sdstream::model::kernels::conv::Padding, usize),
    ) -> Self {
        ConvCase {
            b,
            c_in,
            c_out,
            h,
            w,
            k,
            stride,
            padding,
            up,
        }
    }

    fn all() -> [ConvCase; 5] {
        use sdstream::model::kernels::conv::Padding;
        [
            ConvCase::new((2, 320, 320, 64, 64), (3, 1, Padding::uniform(1), 1)),
            ConvCase::new((1, 64, 64, 128, 96), (3, 1, Padding::uniform(1), 2)),
            ConvCase::new((1, 128, 128, 64, 64), (3, 2, Padding::bottom_right(1), 1)),
            ConvCase::new((2, 640, 320, 32, 32), (1, 1, Padding::uniform(0), 1)),
            ConvCase::new((1, 4, 64, 17, 13), (3, 2, Padding::uniform(1), 1)),
        ]
    }

    /// A random channels-last input of the case's shape, a random residual of its output's
    /// shape (both on the CPU, f32), and the layer ([`ConvCase::layer`]) laid out channels-last.
    fn channels_last_inputs(
        &self,
    ) -> (
        Tensor,
        Tensor,
        impl Fn(DType, &Device) -> sdstream::model::kernels::conv::Conv2d,
    ) {
        let x =
            Tensor::randn(0f32, 1.0, (self.b, self.h, self.w, self.c_in), &Device::Cpu).unwrap();
        let make = self.layer();
        let layer =
            move |dtype: DType, device: &Device| make(dtype, device).into_channels_last().unwrap();
        let plain = layer(DType::F32, &Device::Cpu)
            .forward_upsampled(&x, self.up)
            .unwrap();
        let residual = Tensor::randn(0f32, 0.5, plain.dims(), &Device::Cpu).unwrap();
        (x, residual, layer)
    }

    /// The layer with random weights (scaled by the fan-in) and bias, drawn once: a function
    /// making it in a dtype on a device, channels first.
    fn layer(&self) -> impl Fn(DType, &Device) -> sdstream::model::kernels::conv::Conv2d {
        let c = *self;
        let weight = (Tensor::randn(0f32, 1.0, (c.c_out, c.c_in, c.k, c.k), &Device::Cpu).unwrap()
            / ((c.c_in * c.k * c.k) as f64).sqrt())
        .unwrap();
        let bias = Tensor::randn(0f32, 0.1, c.c_out, &Device::Cpu).unwrap();
        move |dtype: DType, device: &Device| {
            let tensors = std::collections::HashMap::from([
                ("weight".to_string(), weight.to_dtype(dtype).unwrap()),
                ("bias".to_string(), bias.to_dtype(dtype).unwrap()),
            ]);
            let vb = candle_nn::VarBuilder::from_tensors(tensors, dtype, device);
            sdstream::model::kernels::conv::Conv2d::new(
                c.c_in, c.c_out, c.k, c.stride, c.padding, true, vb,
            )
            .unwrap()
        }
    }
}

/// A convolution's epilogue: the residual `r` where asked for, and the ReLU.
fn epilogue(
    r: &Tensor,
    with_residual: bool,
    relu: bool,
) -> sdstream::model::kernels::conv::Epilogue<'_> {
    sdstream::model::kernels::conv::Epilogue {
        residual: Some(r).filter(|_| with_residual),
        relu,
    }
}

/// Convolutions on the device (cuDNN with f32 accumulation under the `cudnn` feature, else
/// candle's im2col) against the CPU's kernel, on the networks' shapes: 3×3 stride 1 and 2, 1×1,
/// the asymmetric padding of the VAE's downsampler, the decoders' upsample-then-convolve; f32
/// within 1e-4 of the output's scale, f16 and bf16 within their rounding of it.
#[test]
#[cfg_attr(
    not(feature = "cuda"),
    ignore = "needs the cuda feature and a CUDA device"
)]
fn cuda_convolutions_match_the_cpu_kernel() {
    if !cuda_or_skip("cuda_convolutions_match_the_cpu_kernel") {
        return;
    }
    let cuda = Device::new_cuda(0).unwrap();
    for case in ConvCase::all() {
        let ConvCase {
            b,
            c_in,
            c_out,
            h,
            w,
            k,
            stride,
            up,
            ..
        } = case;
        let x = Tensor::randn(0f32, 1.0, (b, c_in, h, w), &Device::Cpu).unwrap();
        let layer = case.layer();
        let want = layer(DType::F32, &Device::Cpu)
            .forward_upsampled(&x, up)
            .unwrap();
        let scale = common::max_magnitude(&want);
        for (dtype, limit) in [
            (DType::F32, 1e-4f32),
            (DType::F16, 1e-2),
            (DType::BF16, 8e-2),
        ] {
            let xs = x.to_dtype(dtype).unwrap().to_device(&cuda).unwrap();
            // Channels first, then channels last: cuDNN's NHWC kernels with the filter laid
            // out at load (the layout a CUDA device's networks take by default).
            for channels_last in [false, true] {
                let got = if channels_last {
                    let layer = layer(dtype, &cuda).into_channels_last().unwrap();
                    let xs = xs.permute((0, 2, 3, 1)).unwrap().contiguous().unwrap();
                    layer
                        .forward_upsampled(&xs, up)
                        .unwrap()
                        .permute((0, 3, 1, 2))
                        .unwrap()
                } else {
                    layer(dtype, &cuda).forward_upsampled(&xs, up).unwrap()
                };
                assert_eq!(got.dims(), want.dims());
                let got = got
                    .to_dtype(DType::F32)
                    .unwrap()
                    .to_device(&Device::Cpu)
                    .unwrap();
                let (max, mean) = common::abs_err(&got, &want);
                println!(
                    "conv [{b}, {c_in}, {h}, {w}] -> {c_out} k{k} s{stride} up{up} {dtype:?} channels last {channels_last}: max {:.2e} mean {:.2e} of scale {scale:.2}",
                    max / scale,
                    mean / scale
                );
                assert!(
                    max <= limit * scale,
                    "{dtype:?} channels last {channels_last}: max {max} > {limit} × {scale}"
                );
            }
        }
    }
}

/// The upsample-then-convolve layers through the phase path (kernel policy `cuda_phase_conv`:
/// cuDNN's 2×2 convolution of the map itself with the four phase filters, then ops.cu's phase
/// interleave with the bias) against the CPU's f32 upsampled convolution, beside the path it
/// replaces (the upsampled map convolved by cuDNN), on TAESD's and the UNet's upsamplers, with
/// and without a bias, in f32, f16 and bf16; a layer whose output channels are no whole 16-byte
/// vector keeps the upsampled path.
#[test]
#[cfg_attr(
    not(feature = "cuda"),
    ignore = "needs the cuda feature and a CUDA device"
)]
fn cuda_phase_conv_matches_the_upsampled_convolution() {
    use sdstream::model::kernels::KernelPolicy;
    use sdstream::model::kernels::conv::{Conv2d, Padding};
    use sdstream::model::kernels::ops::phase_interleave_calls;
    if !cuda_or_skip("cuda_phase_conv_matches_the_upsampled_convolution") {
        return;
    }
    let cuda = Device::new_cuda(0).unwrap();
    // (batch, c_in, c_out, h, w, bias, takes the phase path)
    let cases = [
        (1, 64, 64, 64, 48, false, true),
        (2, 1280, 1280, 8, 8, true, true),
        (1, 640, 640, 32, 32, true, true),
        (1, 64, 3, 16, 16, true, false),
    ];
    for (b, c_in, c_out, h, w, with_bias, phases) in cases {
        let weight = (Tensor::randn(0f32, 1.0, (c_out, c_in, 3, 3), &Device::Cpu).unwrap()
            / ((c_in * 9) as f64).sqrt())
        .unwrap();
        let bias = Tensor::randn(0f32, 0.1, c_out, &Device::Cpu).unwrap();
        let layer = |dtype: DType, device: &Device| {
            let mut tensors = std::collections::HashMap::from([(
                "weight".to_string(),
                weight.to_dtype(dtype).unwrap(),
            )]);
            if with_bias {
                tensors.insert("bias".to_string(), bias.to_dtype(dtype).unwrap());
            }
            let vb = candle_nn::VarBuilder::from_tensors(tensors, dtype, device);
            Conv2d::new(c_in, c_out, 3, 1, Padding::uniform(1), with_bias, vb).unwrap()
        };
        let x = Tensor::randn(0f32, 1.0, (b, c_in, h, w), &Device::Cpu).unwrap();
        let want = layer(DType::F32, &Device::Cpu)
            .forward_upsampled(&x, 2)
            .unwrap();
        let scale = common::max_magnitude(&want);
        for (dtype, limit) in [
            (DType::F32, 1e-4f32),
            (DType::F16, 1e-2),
            (DType::BF16, 8e-2),
        ] {
            let conv = layer(dtype, &cuda).into_channels_last().unwrap();
            let xs = x
                .to_dtype(dtype)
                .unwrap()
                .to_device(&cuda)
                .unwrap()
                .permute((0, 2, 3, 1))
                .unwrap()
                .contiguous()
                .unwrap();
            let mut errors = Vec::new();
            for phase_conv in [true, false] {
                let before = phase_interleave_calls();
                let got = KernelPolicy {
                    cuda_phase_conv: phase_conv,
                    ..KernelPolicy::process()
                }
                .scoped(|| conv.forward_upsampled(&xs, 2))
                .unwrap()
                .permute((0, 3, 1, 2))
                .unwrap();
                let took_phases = phase_interleave_calls() - before;
                assert_eq!(
                    took_phases,
                    u64::from(phase_conv && phases),
                    "{c_in}→{c_out} {dtype:?}: phase path taken {took_phases} times"
                );
                assert_eq!(got.dims(), want.dims());
                let (max, mean) = common::abs_err(&common::f32_on_cpu(&got), &want);
                println!(
                    "upsampled conv [{b}, {c_in}, {h}, {w}] -> {c_out} bias {with_bias} {dtype:?} phases {phase_conv}: max {:.2e} mean {:.2e} of scale {scale:.2}",
                    max / scale,
                    mean / scale
                );
                assert!(
                    max <= limit * scale,
                    "{dtype:?} phases {phase_conv}: max {max} > {limit} × {scale}"
                );
                errors.push(max);
            }
            // The phase filters round their summed taps once more: no further from f32 than
            // twice the upsampled path's error, or a tenth of the bound.
            assert!(
                errors[0] <= (2.0 * errors[1]).max(0.1 * limit * scale),
                "{dtype:?}: phases {} against the upsampled path's {}",
                errors[0],
                errors[1]
            );
        }
    }
}

/// A channels-last convolution with its bias, residual and ReLU in cuDNN's call (kernel policy
/// `cuda_fused_conv`, `cudnnConvolutionBiasActivationForward`) against the same layer with them
/// as separate ops, and both against the CPU's f32 convolution with the epilogue: every
/// combination of residual and ReLU, on the networks' shapes (3×3 stride 1 and 2 with uneven
/// padding, 1×1, upsample-then-convolve), in f32, f16 and bf16. The fused call rounds once where
/// the separate ops round after each step: within three roundings of the output's scale. Fails
/// where cuDNN refuses an f32 or f16 configuration (the layer would then run the separate ops;
/// the test says which). A bf16 refusal is said and counted, not failed: whether the fused call
/// takes bf16 is not settled until a GPU runs it, and the layer's answer must then be the
/// separate ops' (checked the same way), so that one refused bf16 case does not leave the
/// switch unproven for the f16 frames it is for.
#[test]
#[cfg_attr(
    not(feature = "cuda"),
    ignore = "needs the cuda feature and a CUDA device"
)]
fn cuda_fused_conv_epilogue_matches_the_separate_ops() {
    use sdstream::model::kernels::KernelPolicy;
    use sdstream::model::kernels::conv::cudnn_fused_calls;
    if !cuda_or_skip("cuda_fused_conv_epilogue_matches_the_separate_ops") {
        return;
    }
    let cuda = Device::new_cuda(0).unwrap();
    let to_cpu = common::f32_on_cpu;
    let mut fused_runs = 0u64;
    let mut bf16_refused = 0u64;
    let before = cudnn_fused_calls();
    for case in ConvCase::all() {
        let ConvCase {
            b,
            c_in,
            c_out,
            h,
            w,
            k,
            stride,
            up,
            ..
        } = case;
        let (x, residual, layer) = case.channels_last_inputs();
        for (with_residual, relu) in [(false, false), (false, true), (true, false), (true, true)] {
            let want = layer(DType::F32, &Device::Cpu)
                .forward_with(&x, up, epilogue(&residual, with_residual, relu))
                .unwrap();
            let scale = common::max_magnitude(&want).max(1e-3);
            for (dtype, fused_limit, cpu_limit) in [
                (DType::F32, 1e-5f32, 1e-4f32),
                (DType::F16, 3e-3, 1e-2),
                (DType::BF16, 2.4e-2, 8e-2),
            ] {
                let layer = layer(dtype, &cuda);
                let xs = x.to_dtype(dtype).unwrap().to_device(&cuda).unwrap();
                let rs = residual.to_dtype(dtype).unwrap().to_device(&cuda).unwrap();
                let run = |fused: bool| {
                    // The phase convolutions would take the upsampling cases without an
                    // epilogue away from the call under test.
                    KernelPolicy {
                        cuda_fused_conv: fused,
                        cuda_phase_conv: false,
                        ..KernelPolicy::process()
                    }
                    .scoped(|| {
                        layer
                            .forward_with(&xs, up, epilogue(&rs, with_residual, relu))
                            .unwrap()
                    })
                };
                let separate = to_cpu(&run(false));
                let calls = cudnn_fused_calls();
                let fused = to_cpu(&run(true));
                let ran_fused = cudnn_fused_calls() - calls;
                if ran_fused == 0 && dtype == DType::BF16 {
                    println!(
                        "cuDNN refused [{b}, {h}, {w}, {c_in}] -> {c_out} k{k} s{stride} up{up} \
                         {dtype:?} residual {with_residual} ReLU {relu}: the separate ops ran"
                    );
                    bf16_refused += 1;
                } else {
                    assert_eq!(
                        ran_fused, 1,
                        "cuDNN refused [{b}, {h}, {w}, {c_in}] -> {c_out} k{k} s{stride} up{up} \
                         {dtype:?} residual {with_residual} ReLU {relu} (see the warning above)"
                    );
                    fused_runs += 1;
                }
                assert_eq!(fused.dims(), want.dims());
                let (max, mean) = common::abs_err(&fused, &separate);
                let (cpu_max, _) = common::abs_err(&fused, &want);
                println!(
                    "fused conv [{b}, {h}, {w}, {c_in}] -> {c_out} k{k} s{stride} up{up} {dtype:?} residual {with_residual} ReLU {relu}: \
                     against the separate ops max {:.2e} mean {:.2e}, against the CPU's f32 max {:.2e} (of scale {scale:.2})",
                    max / scale,
                    mean / scale,
                    cpu_max / scale
                );
                assert!(
                    max <= fused_limit * scale && cpu_max <= cpu_limit * scale,
                    "{dtype:?} residual {with_residual} ReLU {relu}: {max} (separate ops) > {fused_limit} × {scale} \
                     or {cpu_max} (CPU) > {cpu_limit} × {scale}"
                );
            }
        }
    }
    let cases = ConvCase::all().len() as u64 * 4;
    println!("fused conv: {fused_runs} calls fused, {bf16_refused} bf16 cases refused");
    assert_eq!(fused_runs + bf16_refused, cases * 3);
    assert!(fused_runs >= cases * 2, "an f32 or f16 case ran unfused");
    assert_eq!(cudnn_fused_calls() - before, fused_runs);
}

/// Convolutions through the engines chosen from cuDNN's graph API (kernel policy
/// `cuda_conv_engines`, `cudnn_conv_graph`) against the legacy call they replace and the CPU's
/// f32, on the networks' shapes, plain and with each epilogue the layers ask for (bias; bias
/// and ReLU; bias and residual; all three), in f32, f16 and bf16. The chosen engine sums in
/// another order than the legacy one and rounds its epilogue once: within the fused call's
/// bounds. Fails where an f16 case of whole 16-byte channel vectors did not run through a
/// chosen engine (the frames' dtype); the other refusals are said and counted (the legacy call
/// runs those). Then times the legacy call against the chosen engines on sd-turbo's UNet and
/// TAESD shapes in f16 (printed, not asserted), and prints what the choices cost.
#[test]
#[cfg_attr(
    not(feature = "cuda"),
    ignore = "needs the cuda feature and a CUDA device"
)]
fn cuda_conv_engines_match_the_legacy_call() {
    use sdstream::model::kernels::KernelPolicy;
    use sdstream::model::kernels::conv::{Epilogue, conv_engine_choices};
    if !cuda_or_skip("cuda_conv_engines_match_the_legacy_call") {
        return;
    }
    let cuda = Device::new_cuda(0).unwrap();
    let to_cpu = common::f32_on_cpu;
    let policy = |engines: bool, fused: bool| KernelPolicy {
        cuda_conv_engines: engines,
        cuda_fused_conv: fused,
        // The phase convolutions would take the upsampling cases away from the call under test.
        cuda_phase_conv: false,
        ..KernelPolicy::process()
    };
    let mut chosen_runs = 0u64;
    let mut refused = 0u64;
    for case in ConvCase::all() {
        let ConvCase {
            b,
            c_in,
            c_out,
            h,
            w,
            k,
            stride,
            up,
            ..
        } = case;
        let (x, residual, layer) = case.channels_last_inputs();
        // (epilogue in cuDNN's call, residual, ReLU); without the first the bias is a separate
        // add after a plain convolution.
        for (fused, with_residual, relu) in [
            (false, false, false),
            (true, false, false),
            (true, false, true),
            (true, true, false),
            (true, true, true),
        ] {
            let want = layer(DType::F32, &Device::Cpu)
                .forward_with(&x, up, epilogue(&residual, with_residual, relu))
                .unwrap();
            let scale = common::max_magnitude(&want).max(1e-3);
            for (dtype, limit, cpu_limit) in [
                (DType::F32, 1e-5f32, 1e-4f32),
                (DType::F16, 3e-3, 1e-2),
                (DType::BF16, 2.4e-2, 8e-2),
            ] {
                let layer = layer(dtype, &cuda);
                let xs = x.to_dtype(dtype).unwrap().to_device(&cuda).unwrap();
                let rs = residual.to_dtype(dtype).unwrap().to_device(&cuda).unwrap();
                let run = |engines: bool| {
                    policy(engines, fused).scoped(|| {
                        layer
                            .forward_with(&xs, up, epilogue(&rs, with_residual, relu))
                            .unwrap()
                    })
                };
                let legacy = to_cpu(&run(false));
                let calls = conv_engine_choices().calls;
                let chosen = to_cpu(&run(true));
                let ran = conv_engine_choices().calls - calls;
                let what = format!(
                    "[{b}, {h}, {w}, {c_in}] -> {c_out} k{k} s{stride} up{up} {dtype:?} fused \
                     {fused} residual {with_residual} ReLU {relu}"
                );
                let whole_vectors = c_in % 8 == 0 && c_out % 8 == 0;
                if ran == 0 {
                    assert!(
                        dtype != DType::F16 || !whole_vectors,
                        "{what}: no chosen engine ran (see the warning above)"
                    );
                    println!("{what}: no chosen engine; the legacy call ran");
                    refused += 1;
                } else {
                    assert_eq!(ran, 1, "{what}: one convolution a call");
                    chosen_runs += 1;
                }
                assert_eq!(chosen.dims(), want.dims());
                let (max, mean) = common::abs_err(&chosen, &legacy);
                let (cpu_max, _) = common::abs_err(&chosen, &want);
                println!(
                    "conv engines {what}: against the legacy call max {:.2e} mean {:.2e}, \
                     against the CPU's f32 max {:.2e} (of scale {scale:.2})",
                    max / scale,
                    mean / scale,
                    cpu_max / scale
                );
                assert!(
                    max <= limit * scale && cpu_max <= cpu_limit * scale,
                    "{what}: {max} (legacy call) > {limit} × {scale} or {cpu_max} (CPU) > \
                     {cpu_limit} × {scale}"
                );
            }
        }
    }
    let cases = ConvCase::all().len() as u64 * 5 * 3;
    println!("conv engines: {chosen_runs} calls through chosen engines, {refused} refused");
    assert_eq!(chosen_runs + refused, cases);
    println!("conv engines: {}", conv_engine_choices());

    // A thread meeting a geometry this one timed builds the chosen plan alone (no timing), and
    // the same engine gives the same bits.
    let case = ConvCase::all()[0];
    let layer = case.layer()(DType::F16, &cuda)
        .into_channels_last()
        .unwrap();
    let x = Tensor::randn(0f32, 1.0, (case.b, case.h, case.w, case.c_in), &Device::Cpu)
        .unwrap()
        .to_dtype(DType::F16)
        .unwrap()
        .to_device(&cuda)
        .unwrap();
    let run = || {
        policy(true, true).scoped(|| {
            let y = layer
                .forward_with(
                    &x,
                    1,
                    Epilogue {
                        residual: None,
                        relu: false,
                    },
                )
                .unwrap();
            to_cpu(&y)
        })
    };
    let here = run();
    let before = conv_engine_choices();
    let there = std::thread::scope(|s| s.spawn(run).join().unwrap());
    let after = conv_engine_choices();
    assert_eq!(after.chosen - before.chosen, 1, "the other thread's plan");
    assert_eq!(
        after.shared - before.shared,
        1,
        "taken from this thread's choice"
    );
    assert_eq!(after.timed, before.timed, "nothing timed again");
    let (max, _) = common::abs_err(&here, &there);
    assert_eq!(max, 0.0, "the same engine, the same bits");

    // Time a call of each in the frame's f16, the legacy call against the chosen engine, with
    // the bias (and TAESD's ReLU) in cuDNN's call and as separate ops after a plain
    // convolution: cuDNN's heuristic offers other engines for a plain convolution than for one
    // with an epilogue (deviceless_convolution_engines_exist), so either may be faster.
    // Printed, not asserted.
    use sdstream::model::kernels::conv::Padding;
    for (name, (b, c_in, c_out, hw), relu) in [
        ("UNet 64² resnet", (1, 320, 320, 64), false),
        ("UNet 64² up resnet", (1, 960, 320, 64), false),
        ("UNet 32² resnet", (1, 640, 640, 32), false),
        ("UNet 16² resnet", (1, 1280, 1280, 16), false),
        ("UNet 8² up resnet", (1, 2560, 1280, 8), false),
        ("UNet 64² resnet, 8 rows", (8, 320, 320, 64), false),
        ("TAESD 512² block", (1, 64, 64, 512), true),
        ("TAESD 256² block", (1, 64, 64, 256), true),
    ] {
        let case = ConvCase::new((b, c_in, c_out, hw, hw), (3, 1, Padding::uniform(1), 1));
        let layer = case.layer()(DType::F16, &cuda)
            .into_channels_last()
            .unwrap();
        let xs = Tensor::randn(0f32, 1.0, (b, hw, hw, c_in), &cuda)
            .unwrap()
            .to_dtype(DType::F16)
            .unwrap();
        let time = |engines: bool, fused: bool| {
            policy(engines, fused).scoped(|| {
                let call = || {
                    layer
                        .forward_with(
                            &xs,
                            1,
                            Epilogue {
                                residual: None,
                                relu,
                            },
                        )
                        .unwrap()
                };
                // The first calls choose the engine and load the kernels.
                for _ in 0..3 {
                    call();
                }
                cuda.synchronize().unwrap();
                let runs = 20;
                let began = std::time::Instant::now();
                for _ in 0..runs {
                    call();
                }
                cuda.synchronize().unwrap();
                began.elapsed().as_secs_f64() * 1e6 / runs as f64
            })
        };
        let flops = 2.0 * (b * hw * hw * c_in * c_out * 9) as f64;
        for (fused, form) in [(true, "epilogue in the call"), (false, "separate epilogue")] {
            let (legacy, chosen) = (time(false, fused), time(true, fused));
            println!(
                "conv engines timing {name} [{b}, {hw}, {hw}, {c_in}] -> {c_out} f16, {form}: \
                 legacy {legacy:.1} µs ({:.0} TFLOP/s), chosen {chosen:.1} µs ({:.0} TFLOP/s), \
                 {:.2}×",
                flops / legacy / 1e6,
                flops / chosen / 1e6,
                legacy / chosen
            );
        }
    }
    println!("conv engines: {}", conv_engine_choices());
}

/// Every resnet's time projection in one product (kernel policy `fused_time_projections`,
/// read when a network is built) on the device: the tiny UNet on the golden's inputs (rows with
/// timesteps of their own) built with it against the same network built without it, in f32
/// (within 1e-5 of the output's scale) and f16 (5e-3), with GroupNorm's `_rows` kernels reading
/// each resnet's columns of the product in place and with the separate add; the fused path is
/// counted. Then the full-size projections (sd-turbo's 22 resnets, 1 and 8 rows, f16): one
/// product against 22 products and their bias adds, timed and printed, their values compared.
#[test]
#[cfg_attr(
    not(feature = "cuda"),
    ignore = "needs the cuda feature and a CUDA device"
)]
fn cuda_fused_time_projections_match_each_resnets_own() {
    use candle_core::Module;
    use sdstream::model::kernels::KernelPolicy;
    use sdstream::model::unet::{UNet2DConditionModel, UNetInputs};
    use sdstream::model::unet_blocks::{Linear, time_columns_taken};
    if !cuda_or_skip("cuda_fused_time_projections_match_each_resnets_own") {
        return;
    }
    let cuda = Device::new_cuda(0).unwrap();
    let g = common::golden("golden/unet.safetensors");
    let on_device = |name: &str| g[name].to_device(&cuda).unwrap();
    let (sample, t, ctx) = (
        on_device("sample"),
        on_device("timesteps"),
        on_device("encoder_hidden_states"),
    );
    assert!(sample.dim(0).unwrap() > 1, "several rows");
    let path = common::fixture("tiny-sd-turbo/unet");
    for rows in [false, true] {
        for (dtype, limit) in [(DType::F32, 1e-5f32), (DType::F16, 5e-3)] {
            let base = KernelPolicy {
                cuda_group_norm_rows: rows,
                ..KernelPolicy::process()
            };
            let plain = base.scoped(|| {
                let unet = UNet2DConditionModel::load(&path, dtype, &cuda).unwrap();
                assert!(!unet.fuses_time_projections());
                common::f32_on_cpu(&unet.forward(UNetInputs::new(&sample, &t, &ctx)).unwrap())
            });
            let (fused, taken) = KernelPolicy {
                fused_time_projections: true,
                ..base
            }
            .scoped(|| {
                let unet = UNet2DConditionModel::load(&path, dtype, &cuda).unwrap();
                assert!(unet.fuses_time_projections());
                let before = time_columns_taken();
                let out = unet.forward(UNetInputs::new(&sample, &t, &ctx)).unwrap();
                (common::f32_on_cpu(&out), time_columns_taken() - before)
            });
            // 22 resnets a pass: the eager pass, and its capture where graphs are on.
            assert!(
                taken >= 22 && taken % 22 == 0,
                "{taken} resnet calls took columns"
            );
            let scale = common::max_magnitude(&plain).max(1e-3);
            let diff = common::max_magnitude(&(&fused - &plain).unwrap()) / scale;
            println!(
                "fused time projections, {dtype:?}, GroupNorm rows kernels {rows}: max {diff:.3e} \
                 of the output's scale against each resnet's own"
            );
            assert!(diff <= limit, "{dtype:?} rows {rows}: {diff} > {limit}");
        }
    }

    // sd-turbo's resnets: 320, 320, 640, 640, 1280 × 4 down, 1280 × 2 mid, 1280 × 6, 640 × 3,
    // 320 × 3 up, each projecting the 1,280-wide embedding.
    let widths: Vec<usize> = [320, 320, 640, 640]
        .into_iter()
        .chain([1280; 12])
        .chain([640; 3])
        .chain([320; 3])
        .collect();
    assert_eq!(widths.len(), 22);
    let randn = |dims: &[usize], s: f64| {
        (Tensor::randn(0f32, 1.0, dims, &Device::Cpu).unwrap() * s)
            .unwrap()
            .to_dtype(DType::F16)
            .unwrap()
            .to_device(&cuda)
            .unwrap()
    };
    let layers: Vec<(Tensor, Tensor)> = widths
        .iter()
        .map(|&w| (randn(&[w, 1280], 1280f64.powf(-0.5)), randn(&[w], 0.5)))
        .collect();
    let separate: Vec<Linear> = layers
        .iter()
        .map(|(w, b)| Linear::new(w.clone(), Some(b.clone())).unwrap())
        .collect();
    let weights: Vec<&Tensor> = layers.iter().map(|(w, _)| w).collect();
    let biases: Vec<&Tensor> = layers.iter().map(|(_, b)| b).collect();
    let fused = Linear::new(
        Tensor::cat(&weights, 0).unwrap(),
        Some(Tensor::cat(&biases, 0).unwrap()),
    )
    .unwrap();
    let time = |f: &dyn Fn() -> Tensor| {
        for _ in 0..10 {
            f();
        }
        cuda.synchronize().unwrap();
        let reps = 200;
        let start = std::time::Instant::now();
        for _ in 0..reps {
            f();
        }
        cuda.synchronize().unwrap();
        start.elapsed().as_secs_f64() * 1e6 / reps as f64
    };
    for batch in [1, 8] {
        let temb = randn(&[batch, 1280], 1.0);
        let apart = || {
            let outs: Vec<Tensor> = separate.iter().map(|l| l.forward(&temb).unwrap()).collect();
            Tensor::cat(&outs, 1).unwrap()
        };
        let together = || fused.forward(&temb).unwrap();
        let (a, b) = (
            common::f32_on_cpu(&apart()),
            common::f32_on_cpu(&together()),
        );
        let diff = common::max_magnitude(&(&a - &b).unwrap());
        let scale = common::max_magnitude(&a);
        println!(
            "time projections, {batch} rows, f16: fused within {diff:.3e} of 22 apart (scale {scale:.2})"
        );
        assert!(diff <= 4e-3 * scale.max(1.0), "{batch} rows: {diff}");
        let per_layer = time(&|| {
            for l in &separate {
                l.forward(&temb).unwrap();
            }
            temb.clone()
        });
        let one = time(&together);
        println!(
            "time projections, {batch} rows, f16 (host time a call, the device waited for at \
             the end): 22 products with their bias adds {per_layer:.1} µs, one product {one:.1} µs"
        );
    }
}

/// Linear layers with their bias and residual in cuBLASLt's epilogue (kernel policy
/// `cuda_fused_linear`, kernels/cublaslt_linear.rs) against the separate ops on the device and
/// the CPU's f32 arithmetic, on the UNet's shapes (the attentions' and the feed-forward's output
/// projections at each level, a batch of two, the tiny checkpoints' widths), with and without
/// the residual, in f32, f16 and bf16. The fused call rounds once where the separate ops round
/// three times, so it must be no further from f32 than they are (beyond a rounding).
#[test]
#[cfg_attr(
    not(feature = "cuda"),
    ignore = "needs the cuda feature and a CUDA device"
)]
fn cuda_fused_linear_matches_the_separate_ops() {
    use sdstream::model::kernels::KernelPolicy;
    use sdstream::model::kernels::ops::{linear_fused, linear_fused_calls};
    if !cuda_or_skip("cuda_fused_linear_matches_the_separate_ops") {
        return;
    }
    let cuda = Device::new_cuda(0).unwrap();
    let to_cpu = common::f32_on_cpu;
    let randn = |dims: &[usize], s: f64| {
        (Tensor::randn(0f32, 1.0, dims, &Device::Cpu).unwrap() * s).unwrap()
    };
    // (batch, tokens, in, out)
    let shapes = [
        (1, 4096, 320, 320),
        (1, 1024, 640, 640),
        (1, 64, 5120, 1280),
        (2, 256, 1280, 1280),
        (1, 77, 1024, 320),
        (3, 37, 32, 48),
    ];
    let before = linear_fused_calls();
    let mut runs = 0u64;
    for (batch, tokens, k, n) in shapes {
        let x = randn(&[batch, tokens, k], 1.0);
        let w = randn(&[n, k], (k as f64).powf(-0.5));
        let b = randn(&[n], 0.5);
        let r = randn(&[batch, tokens, n], 1.0);
        for with_residual in [false, true] {
            let want = {
                let y = x
                    .reshape((batch * tokens, k))
                    .unwrap()
                    .matmul(&w.t().unwrap())
                    .unwrap()
                    .broadcast_add(&b)
                    .unwrap()
                    .reshape((batch, tokens, n))
                    .unwrap();
                if with_residual { (y + &r).unwrap() } else { y }
            };
            for (dtype, limit) in [
                (DType::F32, 1e-5f32),
                (DType::F16, 4e-3),
                (DType::BF16, 3e-2),
            ] {
                let dev = |t: &Tensor| t.to_dtype(dtype).unwrap().to_device(&cuda).unwrap();
                let (xs, ws, bs, rs) = (dev(&x), dev(&w), dev(&b), dev(&r));
                let residual = with_residual.then_some(&rs);
                let separate = {
                    let y = xs
                        .reshape((batch * tokens, k))
                        .unwrap()
                        .matmul(&ws.t().unwrap())
                        .unwrap()
                        .broadcast_add(&bs)
                        .unwrap()
                        .reshape((batch, tokens, n))
                        .unwrap();
                    to_cpu(&if with_residual { (y + &rs).unwrap() } else { y })
                };
                let calls = linear_fused_calls();
                let fused = KernelPolicy {
                    cuda_fused_linear: true,
                    ..KernelPolicy::process()
                }
                .scoped(|| linear_fused(&xs, &ws, &bs, residual).unwrap());
                let fused = to_cpu(&fused.unwrap_or_else(|| {
                    panic!(
                        "cuBLASLt refused [{batch}, {tokens}, {k}] -> {n} {dtype:?} residual \
                         {with_residual} (see the warning above)"
                    )
                }));
                assert_eq!(linear_fused_calls(), calls + 1);
                runs += 1;
                assert_eq!(fused.dims(), want.dims());
                let scale = common::max_magnitude(&want).max(1e-3);
                let (max, mean) = common::abs_err(&fused, &want);
                let (s_max, s_mean) = common::abs_err(&separate, &want);
                println!(
                    "fused linear [{batch}, {tokens}, {k}] -> {n} {dtype:?} residual {with_residual}: \
                     against f32 max {:.2e} mean {:.2e}; separate ops max {:.2e} mean {:.2e} (of scale {scale:.2})",
                    max / scale,
                    mean / scale,
                    s_max / scale,
                    s_mean / scale
                );
                assert!(
                    max <= limit * scale,
                    "{dtype:?} [{batch}, {tokens}, {k}] -> {n}: max {max} > {limit} × {scale}"
                );
                assert!(
                    mean <= s_mean * 1.05 + 1e-6 * scale,
                    "{dtype:?} [{batch}, {tokens}, {k}] -> {n}: the fused call's mean error {mean} \
                     exceeds the separate ops' {s_mean}"
                );
            }
        }
    }
    // The switch off: nothing runs fused.
    let off = KernelPolicy {
        cuda_fused_linear: false,
        ..KernelPolicy::process()
    }
    .scoped(|| {
        let dev = |t: Tensor| t.to_device(&cuda).unwrap();
        linear_fused(
            &dev(randn(&[1, 4, 8], 1.0)),
            &dev(randn(&[8, 8], 1.0)),
            &dev(randn(&[8], 1.0)),
            None,
        )
        .unwrap()
    });
    assert!(off.is_none());
    assert_eq!(runs, shapes.len() as u64 * 2 * 3);
    assert_eq!(linear_fused_calls() - before, runs);
}

/// The fused attention kernels (attention.cu: the WMMA kernel, the default, and the register
/// kernel of the kernel policy's `cuda_flash_attention`) against softmax(scale·q·kᵀ)·v in f32 on the CPU,
/// on the same values rounded to f16 or bf16, for the arrangements the UNet uses (heads-major,
/// and token-major read in place from self-attention's fused q/k/v projection and from
/// cross-attention's key/value projection) and the shapes it meets: SD 2.1's 4,096 tokens of
/// 64, SD 1.5's heads of 40, 80 and 160, 77 text keys, 4 IP-Adapter keys, a bank's doubled keys,
/// odd counts that leave partial tiles, and scores large enough that the running maximum moves.
/// The unfused path it replaces (candle's products and softmax in the same dtype) is measured
/// beside it on the same values: the fused kernel must be no further from f32.
#[test]
#[cfg_attr(
    not(feature = "cuda"),
    ignore = "needs the cuda feature and a CUDA device"
)]
fn cuda_fused_attention_matches_the_f32_formula() {
    use sdstream::model::kernels::KernelPolicy;
    if !cuda_or_skip("cuda_fused_attention_matches_the_f32_formula") {
        return;
    }
    // Both kernels (the kernel policy's `cuda_flash_attention`), each on both arrangements.
    let kernels = [false, true].map(|registers| KernelPolicy {
        cuda_flash_attention: registers,
        ..KernelPolicy::process()
    });
    let cases = attention_against_f32(
        &Device::new_cuda(0).unwrap(),
        &ATTENTION_SHAPES,
        &[("WMMA", kernels[0]), ("registers", kernels[1])],
        &|| 0,
    );
    // Every shape, in both dtypes, under both kernels, in order.
    assert_eq!(cases.len(), ATTENTION_SHAPES.len() * 2 * 2);
    for (i, case) in cases.iter().enumerate() {
        assert_eq!(case.shape, ATTENTION_SHAPES[i / 4], "case {i}");
        assert_eq!(case.dtype, [DType::F16, DType::BF16][i / 2 % 2], "case {i}");
        assert_eq!(case.kernel, ["WMMA", "registers"][i % 2], "case {i}");
        assert_eq!(case.observed, 0, "case {i}: nothing is observed");
    }
}

/// (batch, heads, queries, keys, head dim, spread of q and k): an attention call's shape.
type AttentionShape = (usize, usize, usize, usize, usize, f32);

/// The shapes the fused attention kernels are checked on ([`attention_against_f32`]).
const ATTENTION_SHAPES: [AttentionShape; 11] = [
    (1, 5, 4096, 4096, 64, 1.0),
    (2, 5, 4096, 77, 64, 1.0),
    (1, 8, 1024, 1024, 40, 1.0),
    (2, 8, 256, 77, 80, 1.0),
    (1, 8, 64, 77, 160, 1.0),
    (3, 2, 37, 29, 64, 1.0),
    (1, 10, 1024, 2048, 64, 1.0),
    (1, 5, 300, 4, 64, 1.0),
    (2, 4, 200, 130, 16, 1.0),
    (1, 2, 100, 300, 8, 1.0),
    (1, 5, 256, 256, 64, 4.0),
];

/// One checked case of [`attention_against_f32`]: its shape (as [`ATTENTION_SHAPES`] has it),
/// dtype and kernel, and how far `observe`'s count moved while the kernel ran both
/// arrangements.
struct AttentionCase {
    shape: AttentionShape,
    dtype: DType,
    kernel: &'static str,
    observed: u64,
}

/// Runs attention on `cuda` under each of `kernels` (a name and the kernel policy that picks
/// it), in both arrangements, on every one of `shapes` in f16 and bf16, and asserts each output
/// against the f32 formula (and against the unfused path's error on the same values); returns
/// the cases checked.
fn attention_against_f32(
    cuda: &Device,
    shapes: &[AttentionShape],
    kernels: &[(&'static str, sdstream::model::kernels::KernelPolicy)],
    observe: &dyn Fn() -> u64,
) -> Vec<AttentionCase> {
    use sdstream::model::kernels::attention::{self, TokenMajor};
    let cuda = cuda.clone();
    let cpu = Device::Cpu;
    let heads_major = |t: &Tensor, parts: usize, part: usize, heads: usize, d: usize| {
        let (b, tokens, _) = t.dims3().unwrap();
        t.reshape((b, tokens, parts, heads, d))
            .unwrap()
            .permute((2, 0, 3, 1, 4))
            .unwrap()
            .contiguous()
            .unwrap()
            .get(part)
            .unwrap()
            .reshape((b * heads, tokens, d))
            .unwrap()
    };
    let to_f32_cpu = common::f32_on_cpu;
    let mut checked = Vec::new();
    for &shape in shapes {
        let (batch, heads, n, m, d, spread) = shape;
        let hd = heads * d;
        let scale = (d as f64).powf(-0.5);
        let draw = |shape: (usize, usize, usize), s: f32| {
            (Tensor::randn(0f32, 1.0, shape, &cpu).unwrap() * s as f64).unwrap()
        };
        // Self-attention's shape when n == m (one fused projection), cross-attention's else.
        let (q_src, kv_src, fused) = if n == m {
            let qkv = Tensor::cat(
                &[draw((batch, n, 2 * hd), spread), draw((batch, n, hd), 1.0)],
                2,
            )
            .unwrap();
            (qkv.clone(), qkv, true)
        } else {
            let q = draw((batch, n, hd), spread);
            let kv = Tensor::cat(
                &[draw((batch, m, hd), spread), draw((batch, m, hd), 1.0)],
                2,
            )
            .unwrap();
            (q, kv, false)
        };
        for (dtype, max_limit, mean_limit) in
            [(DType::F16, 4e-3f32, 4e-4f32), (DType::BF16, 3e-2, 3e-3)]
        {
            let round = |t: &Tensor| t.to_dtype(dtype).unwrap();
            let (q_dev, kv_dev) = (
                round(&q_src).to_device(&cuda).unwrap(),
                round(&kv_src).to_device(&cuda).unwrap(),
            );
            assert!(
                std::env::var_os("SDSTREAM_CUDA_ATTENTION").is_some_and(|v| v == "0")
                    || attention::fused_on_cuda(&q_dev, d),
                "the fused kernel should run for {dtype:?}, head dim {d}"
            );
            // The reference: f32 on the CPU, on the rounded values.
            let (q_parts, k_at, v_at) = if fused { (3, hd, 2 * hd) } else { (1, 0, hd) };
            let kv_parts = if fused { 3 } else { 2 };
            let (k_part, v_part) = if fused { (1, 2) } else { (0, 1) };
            let q32 = heads_major(&to_f32_cpu(&q_dev), q_parts, 0, heads, d);
            let k32 = heads_major(&to_f32_cpu(&kv_dev), kv_parts, k_part, heads, d);
            let v32 = heads_major(&to_f32_cpu(&kv_dev), kv_parts, v_part, heads, d);
            let want = attention::attention(&q32, &k32, &v32, heads, scale).unwrap();
            let view = |tensor, offset| TokenMajor { tensor, offset };
            // Heads-major, as the bank's path hands them over.
            let (q_h, k_h, v_h) = (
                heads_major(&q_dev, q_parts, 0, heads, d),
                heads_major(&kv_dev, kv_parts, k_part, heads, d),
                heads_major(&kv_dev, kv_parts, v_part, heads, d),
            );
            let mut outputs = Vec::new();
            let mut observed = Vec::new();
            for &(kernel, policy) in kernels {
                let before = observe();
                let (token_major, heads_major_out) = policy.scoped(|| {
                    // Token-major, read in place.
                    let token_major = attention::attention_token_major(
                        view(&q_dev, 0),
                        view(&kv_dev, k_at),
                        view(&kv_dev, v_at),
                        heads,
                        d,
                        scale,
                    )
                    .unwrap();
                    let heads_major_out =
                        attention::attention(&q_h, &k_h, &v_h, heads, scale).unwrap();
                    (token_major, heads_major_out)
                });
                observed.push((kernel, observe() - before));
                outputs.push((kernel, "token-major", token_major));
                outputs.push((kernel, "heads-major", heads_major_out));
            }
            // The unfused path on the device in the same dtype.
            let probs = candle_nn::ops::softmax_last_dim(
                &(q_h.matmul(&k_h.t().unwrap()).unwrap() * scale).unwrap(),
            )
            .unwrap();
            let unfused = probs
                .matmul(&v_h)
                .unwrap()
                .reshape((batch, heads, n, d))
                .unwrap()
                .transpose(1, 2)
                .unwrap()
                .reshape((batch, n, hd))
                .unwrap();
            let (u_max, u_mean) = common::abs_err(&to_f32_cpu(&unfused), &want);
            for (kernel, arrangement, got) in &outputs {
                assert_eq!(got.dims(), &[batch, n, hd]);
                let (max, mean) = common::abs_err(&to_f32_cpu(got), &want);
                println!(
                    "attention {kernel} {arrangement} [{batch}×{heads}, {n} × {m} keys, d {d}, spread {spread}] {dtype:?}: \
                     fused max {max:.2e} mean {mean:.2e}; unfused max {u_max:.2e} mean {u_mean:.2e}"
                );
                assert!(
                    max.is_finite() && max <= max_limit,
                    "{kernel} {dtype:?} {arrangement} [{batch}, {heads}, {n}, {m}, {d}]: max {max} > {max_limit}"
                );
                assert!(
                    mean <= mean_limit,
                    "{kernel} {dtype:?} {arrangement} [{batch}, {heads}, {n}, {m}, {d}]: mean {mean} > {mean_limit}"
                );
                assert!(
                    mean <= u_mean * 1.05 + 1e-6,
                    "{kernel} {dtype:?} {arrangement}: the fused kernel's mean error {mean} exceeds the unfused path's {u_mean}"
                );
            }
            for (kernel, observed) in observed {
                checked.push(AttentionCase {
                    shape,
                    dtype,
                    kernel,
                    observed,
                });
            }
        }
    }
    checked
}

/// Held by the tests that count cuDNN's attention calls and plans (process-wide counters), so
/// that a parallel run does not count one test's calls in the other's.
#[cfg(feature = "cudnn")]
static CUDNN_ATTENTION_COUNTERS: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// For a test of cuDNN's attention named `test`: `None` where it is skipped (no device), else
/// the counters' lock, held while it runs.
#[cfg(feature = "cudnn")]
fn cudnn_attention_counters(test: &str) -> Option<std::sync::MutexGuard<'static, ()>> {
    cuda_or_skip(test).then(|| {
        CUDNN_ATTENTION_COUNTERS
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    })
}

/// cuDNN's fused attention (kernels/src/cudnn_attention.rs, kernel policy
/// `cuda_cudnn_attention`) against the f32 formula on the same shapes and bounds as the
/// kernels of attention.cu ([`attention_against_f32`]). It must have run, not fallen back to
/// attention.cu, in both arrangements of every shape a real checkpoint's frame has (heads of 40
/// to 160 values, queries a multiple of 64, keys too or the prompt's 77); the others (the tiny
/// checkpoints' heads of 8 and 16, odd counts, IP-Adapter's 4 keys) may fall back, which is
/// said below and is correct either way.
#[cfg(feature = "cudnn")]
#[test]
fn cuda_cudnn_attention_matches_the_f32_formula() {
    use sdstream::model::kernels::{KernelPolicy, cudnn_attention};
    let Some(_counters) = cudnn_attention_counters("cuda_cudnn_attention_matches_the_f32_formula")
    else {
        return;
    };
    let policy = KernelPolicy {
        cuda_cudnn_attention: true,
        ..KernelPolicy::process()
    };
    // The calls through cuDNN, and, as the cases go (a stage that times out still shows it),
    // the plans built so far and the time their kernels took to compile.
    let observe = || {
        eprintln!("cuDNN attention so far: {}", cudnn_attention::plan_builds());
        cudnn_attention::calls()
    };
    let cases = attention_against_f32(
        &Device::new_cuda(0).unwrap(),
        &ATTENTION_SHAPES,
        &[("cuDNN", policy)],
        &observe,
    );
    assert_eq!(cases.len(), ATTENTION_SHAPES.len() * 2);
    println!("cuDNN attention: {}", cudnn_attention::plan_builds());
    let mut fell_back = Vec::new();
    for case in &cases {
        let (batch, heads, n, m, d, _) = case.shape;
        println!(
            "cuDNN attention [{batch}×{heads}, {n} × {m} keys, d {d}] {:?}: {} of 2 calls through cuDNN",
            case.dtype, case.observed
        );
        assert!(
            case.observed <= 2,
            "{} counted {} calls",
            case.kernel,
            case.observed
        );
        if case.observed < 2 {
            fell_back.push((case.shape, case.dtype));
        }
    }
    let in_a_frame =
        |(_, _, n, m, d, _): AttentionShape| d >= 40 && n % 64 == 0 && (m % 64 == 0 || m == 77);
    assert!(
        fell_back.iter().all(|(shape, _)| !in_a_frame(*shape)),
        "cuDNN refused shapes of a real checkpoint's frame (its warnings above say why): {fell_back:?}"
    );
    assert_eq!(
        ATTENTION_SHAPES.iter().filter(|s| in_a_frame(**s)).count(),
        7,
        "the frame's shapes among the cases"
    );
}

/// cuDNN's fused attention on calls of 2, 3 and 4 rows of the 64² cross-attention and of 2
/// and 3 rows of the 64² self-attention (the widths a cross-stream batcher forms) with the
/// kernel policy's `cuda_cudnn_kernel_cache`: each row count's plan is built for a
/// dynamic-shape graph with its geometry's kernel cache, so that only a geometry's first plan
/// compiles the engine's kernel (the time each build took is printed as the cases go). Every
/// call ran through cuDNN within [`attention_against_f32`]'s bounds, and every plan it built
/// took the kernel cache (none fell back to a static plan). The first width runs on a thread
/// that then ends (its cuDNN handle and plans go with it), as a batcher's rounds move to
/// another stream's thread when the stream that ran them leaves: the later widths take their
/// kernels from caches that thread filled.
#[cfg(feature = "cudnn")]
#[test]
fn cuda_cudnn_kernel_cache_serves_every_batch_width() {
    use sdstream::model::kernels::{KernelPolicy, cudnn_attention};
    let Some(_counters) =
        cudnn_attention_counters("cuda_cudnn_kernel_cache_serves_every_batch_width")
    else {
        return;
    };
    const WIDTHS: [AttentionShape; 5] = [
        (2, 5, 4096, 77, 64, 1.0),
        (3, 5, 4096, 77, 64, 1.0),
        (4, 5, 4096, 77, 64, 1.0),
        (2, 5, 4096, 4096, 64, 1.0),
        (3, 5, 4096, 4096, 64, 1.0),
    ];
    let policy = KernelPolicy {
        cuda_cudnn_attention: true,
        cuda_cudnn_kernel_cache: true,
        ..KernelPolicy::process()
    };
    let before = cudnn_attention::plan_builds();
    let observe = || {
        eprintln!("cuDNN attention so far: {}", cudnn_attention::plan_builds());
        cudnn_attention::calls()
    };
    // One device for both threads: the kernel caches are the device's.
    let cuda = Device::new_cuda(0).unwrap();
    let kernels = [("cuDNN, kernel caches", policy)];
    let first_thread = std::thread::scope(|s| {
        s.spawn(|| attention_against_f32(&cuda, &WIDTHS[..1], &kernels, &observe))
            .join()
            .expect("the first width's thread")
    });
    let mut cases = first_thread;
    cases.extend(attention_against_f32(
        &cuda,
        &WIDTHS[1..],
        &kernels,
        &observe,
    ));
    let after = cudnn_attention::plan_builds();
    println!("cuDNN attention: {after}");
    assert_eq!(cases.len(), WIDTHS.len() * 2, "every width in f16 and bf16");
    for case in &cases {
        assert_eq!(
            case.observed, 2,
            "{:?} {:?}: both arrangements through cuDNN",
            case.shape, case.dtype
        );
    }
    // A plan per width, dtype and arrangement (token-major, heads-major), each with its
    // geometry's kernel cache.
    let plans = (WIDTHS.len() * 2 * 2) as u64;
    assert_eq!(after.built - before.built, plans, "plans built");
    assert_eq!(
        after.shared - before.shared,
        plans,
        "plans built with kernel caches (the warnings above say why any was not)"
    );
}

/// A CUDA device opened for frames (`DeviceSpec::device`, which every engine, pool and binding
/// opens through) makes no CUDA events for its buffers unless the kernel policy keeps cudarc's
/// event tracking (`SDSTREAM_CUDA_EVENT_TRACKING`), and its buffers work either way: a value
/// written, computed on and read back.
#[cfg(feature = "cuda")]
#[test]
fn cuda_opened_devices_track_no_events() {
    use sdstream::model::kernels::KernelPolicy;
    use sdstream::params::DeviceSpec;
    if !cuda_or_skip("cuda_opened_devices_track_no_events") {
        return;
    }
    for tracking in [false, true] {
        let policy = KernelPolicy {
            cuda_event_tracking: tracking,
            ..KernelPolicy::process()
        };
        let device = policy.scoped(|| DeviceSpec::Cuda(0).device().unwrap());
        let Device::Cuda(cuda) = &device else {
            panic!("DeviceSpec::Cuda(0) opened {device:?}")
        };
        assert_eq!(
            cuda.is_event_tracking(),
            tracking,
            "tracking asked: {tracking}"
        );
        let x = Tensor::arange(0f32, 1024.0, &device).unwrap();
        let sum = (&x + &x).unwrap().sum_all().unwrap();
        assert_eq!(sum.to_scalar::<f32>().unwrap(), 1023.0 * 1024.0);
    }
}

/// GEGLU in one pass on the device (ops.cu) against its formula in f32 on the CPU, with and
/// without the projection's bias, in f32, f16 and bf16, on the UNet's widths. Errors are
/// relative to each value, with a floor of 0.01 near zero. f16 and bf16 round once: within half
/// an ulp of the output (2⁻¹¹ and 2⁻⁸) and a little. f32 is bounded by erf, not by rounding: for
/// gates below about −3, 1 + erf keeps few significant bits, and CUDA's erff (2 ulp) and the
/// CPU's (libm, 1 ulp) differ there by ulps of erf, about 1e-7 against values under the floor.
/// Measured on an H200: f32 1.14e-4.
#[test]
#[cfg_attr(
    not(feature = "cuda"),
    ignore = "needs the cuda feature and a CUDA device"
)]
fn cuda_geglu_kernel_matches_the_formula() {
    use sdstream::model::kernels::ops::geglu;
    if !cuda_or_skip("cuda_geglu_kernel_matches_the_formula") {
        return;
    }
    let cuda = Device::new_cuda(0).unwrap();
    let cpu = Device::Cpu;
    let mut checked = 0;
    let mut failures = Vec::new();
    for (rows, inner) in [(4096, 1280), (2 * 1024, 2560), (77, 5120), (3, 7)] {
        let x = (Tensor::randn(0f32, 1.0, (1, rows, 2 * inner), &cpu).unwrap() * 2.0).unwrap();
        let bias = Tensor::randn(0f32, 0.5, 2 * inner, &cpu).unwrap();
        for (dtype, rel) in [
            (DType::F32, 4e-4f32),
            (DType::F16, 2e-3),
            (DType::BF16, 1.6e-2),
        ] {
            for with_bias in [false, true] {
                let xr = x.to_dtype(dtype).unwrap().to_dtype(DType::F32).unwrap();
                let br = bias.to_dtype(dtype).unwrap().to_dtype(DType::F32).unwrap();
                let biased = if with_bias {
                    xr.broadcast_add(&br).unwrap()
                } else {
                    xr
                };
                let hidden = biased.narrow(2, 0, inner).unwrap();
                let gate = biased.narrow(2, inner, inner).unwrap();
                let want = (hidden * gate.gelu_erf().unwrap()).unwrap();
                let xd = x.to_dtype(dtype).unwrap().to_device(&cuda).unwrap();
                let bd = bias.to_dtype(dtype).unwrap().to_device(&cuda).unwrap();
                let got = geglu(&xd, with_bias.then_some(&bd)).unwrap();
                assert_eq!(got.dims(), &[1, rows, inner]);
                let got = got.to_dtype(DType::F32).unwrap().to_device(&cpu).unwrap();
                // Relative to each value's size (rounding once), with a floor near zero.
                let err = ((got - &want).unwrap().abs().unwrap()
                    / (want.abs().unwrap() + 1e-2).unwrap())
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
                println!(
                    "geglu [{rows}, {inner}] {dtype:?} bias {with_bias}: max relative {err:.2e}"
                );
                // Every case is measured before any is judged, so that a run prints each figure.
                if err.is_nan() || err > rel {
                    failures.push(format!(
                        "{dtype:?} bias {with_bias} [{rows}, {inner}]: {err} > {rel}"
                    ));
                }
                checked += 1;
            }
        }
    }
    assert_eq!(checked, 4 * 3 * 2);
    assert!(failures.is_empty(), "{failures:?}");
}

/// Canny on the device (kernels' canny.cu, SDSTREAM_CUDA_PREPROCESS's default) against the host's
/// detector, bit for bit: the fixture frames and patterns that stress each part (noise: many
/// candidates and ties in the suppression; a step; a long ring of weak edges reached from one
/// strong pixel, which hysteresis must follow across many 32×32 tiles; an odd size), at several
/// thresholds (swapped ones included), through the kernel itself and through the preprocessor
/// a ControlNet runs.
#[test]
#[cfg_attr(
    not(feature = "cuda"),
    ignore = "needs the cuda feature and a CUDA device"
)]
fn cuda_canny_matches_the_host_detector() {
    use sdstream::model::kernels::{self, KernelPolicy, canny};
    use sdstream::preprocess::{self, ProcessorInputs};
    if !cuda_or_skip("cuda_canny_matches_the_host_detector") {
        return;
    }
    let cuda = Device::new_cuda(0).unwrap();
    let mut images: Vec<(String, Tensor)> = Vec::new();
    for i in 0..3 {
        images.push((format!("frame {i:03}"), unit_frame(i)));
    }
    let noise = Tensor::rand(0f32, 1.0, (1, 3, 97, 131), &Device::Cpu).unwrap();
    images.push(("noise 97x131".into(), noise));
    let (h, w) = (300, 300);
    let step: Vec<f32> = (0..3 * h * w)
        .map(|i| if (i % w) < w / 2 { 0.1 } else { 0.9 })
        .collect();
    images.push((
        "step".into(),
        Tensor::from_vec(step, (1, 3, h, w), &Device::Cpu).unwrap(),
    ));
    // A ring of faint contrast (weak edges) with one bright spot on it (a strong edge).
    let ring: Vec<f32> = (0..h * w)
        .map(|i| {
            let (y, x) = ((i / w) as f32 - 150.0, (i % w) as f32 - 150.0);
            let r = (y * y + x * x).sqrt();
            let mut v = if r < 120.0 { 0.5 } else { 0.5 + 30.0 / 255.0 };
            if (y + 120.0).abs() < 3.0 && x.abs() < 3.0 {
                v = 1.0;
            }
            v
        })
        .collect();
    let ring = Tensor::from_vec(ring, (1, 1, h, w), &Device::Cpu)
        .unwrap()
        .repeat((1, 3, 1, 1))
        .unwrap();
    images.push(("weak ring".into(), ring));
    let thresholds = [
        (100.0, 200.0),
        (20.0, 60.0),
        (200.0, 100.0),
        (1.0, 255.0),
        (50.5, 50.9),
    ];
    let policy = KernelPolicy {
        cuda_preprocess: true,
        ..KernelPolicy::process()
    };
    let mut compared = 0usize;
    let mut edges = 0usize;
    for (name, image) in &images {
        for (low, high) in thresholds {
            let params: serde_json::Map<String, serde_json::Value> = serde_json::from_value(
                serde_json::json!({"low_threshold": low, "high_threshold": high}),
            )
            .unwrap();
            let inputs = ProcessorInputs::default();
            let host = preprocess::apply("canny", &params, image, &inputs).unwrap();
            let on_device = image.to_device(&cuda).unwrap();
            let direct = canny::canny(&on_device, low, high).unwrap();
            let through = policy.scoped(|| {
                assert!(kernels::preprocess_on_device(&cuda));
                preprocess::apply("canny", &params, &on_device, &inputs).unwrap()
            });
            let host: Vec<f32> = host.flatten_all().unwrap().to_vec1().unwrap();
            for (how, got) in [("kernel", direct), ("preprocessor", through)] {
                assert_eq!(got.dtype(), DType::F32);
                let got: Vec<f32> = got
                    .to_device(&Device::Cpu)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap();
                let differing = host.iter().zip(&got).filter(|(a, b)| a != b).count();
                assert_eq!(got.len(), host.len());
                assert_eq!(
                    differing, 0,
                    "{name} ({low}, {high}) through the {how}: {differing} pixels differ"
                );
                compared += got.len();
            }
            edges += host.iter().filter(|&&v| v == 1.0).count();
        }
    }
    println!("canny: {compared} values compared, all equal; {edges} edge values on the host");
    assert!(
        edges > 1000,
        "the patterns made too few edges ({edges}) to check anything"
    );
}

/// Fixture frame `i` (64×64) as a processor's input `[1, 3, 64, 64]` in [0, 1] on the CPU.
fn unit_frame(i: usize) -> Tensor {
    common::frame_tensor(i).affine(0.5, 0.5).unwrap()
}

/// The float processors on the device (their steps as tensor operations, SDSTREAM_CUDA_PREPROCESS's
/// default) against the host's steps, on the fixture frames and noise:
/// `soft_edge`, `blur` and `sharpen` at Daydream's defaults and at the top of their ranges,
/// `upscale` (bit for bit) and `standard_lineart` (within a level). The sums run in another
/// order; the bounds are the CPU tests' (the `filters`, `soft_edge`, `upscale` and
/// `standard_lineart` unit tests, which hold the tensor steps to the same host steps).
#[test]
#[cfg_attr(
    not(feature = "cuda"),
    ignore = "needs the cuda feature and a CUDA device"
)]
fn cuda_float_processors_match_the_host_steps() {
    use sdstream::model::kernels::{self, KernelPolicy};
    use sdstream::preprocess::{self, ProcessorInputs};
    if !cuda_or_skip("cuda_float_processors_match_the_host_steps") {
        return;
    }
    let cuda = Device::new_cuda(0).unwrap();
    let policy = KernelPolicy {
        cuda_preprocess: true,
        ..KernelPolicy::process()
    };
    let mut images = vec![Tensor::rand(0f32, 1.0, (1, 3, 97, 131), &Device::Cpu).unwrap()];
    images.extend((0..2).map(unit_frame));
    let processors = [
        ("soft_edge", serde_json::json!({}), 1e-5),
        ("blur", serde_json::json!({}), 1e-6),
        (
            "blur",
            serde_json::json!({"blur_intensity": 10.0, "kernel_size": 51}),
            1e-6,
        ),
        ("sharpen", serde_json::json!({}), 1e-5),
        ("sharpen", serde_json::json!({"multi_scale": false}), 1e-5),
        (
            "sharpen",
            serde_json::json!({"sharpen_intensity": 5.0, "unsharp_radius": 5.0,
                "edge_enhancement": 2.0, "detail_boost": 1.0, "noise_reduction": 0.5}),
            5e-5,
        ),
        // The host's arithmetic step for step: bit for bit.
        ("upscale", serde_json::json!({}), 0.0),
        (
            "upscale",
            serde_json::json!({"scale_factor": 1.5, "algorithm": "bicubic"}),
            0.0,
        ),
        // 8-bit levels after a blur whose sums differ in the last bits: at most one level
        // (then the bilinear resize to the frame), on under 1 % of the values (below).
        (
            "standard_lineart",
            serde_json::json!({"detect_resolution": 128}),
            LEVEL,
        ),
        (
            "standard_lineart",
            serde_json::json!({"detect_resolution": 64, "gaussian_sigma": 20.0,
                "intensity_threshold": 30}),
            LEVEL,
        ),
    ];
    const LEVEL: f32 = 1.0 / 255.0 + 1e-5;
    let inputs = ProcessorInputs::default();
    let mut checked = 0;
    for (name, params, bound) in processors {
        let params: serde_json::Map<String, serde_json::Value> =
            serde_json::from_value(params).unwrap();
        for (i, image) in images.iter().enumerate() {
            let host = preprocess::apply(name, &params, image, &inputs).unwrap();
            let on_device = image.to_device(&cuda).unwrap();
            let got = policy.scoped(|| {
                assert!(kernels::preprocess_on_device(&cuda));
                preprocess::apply(name, &params, &on_device, &inputs).unwrap()
            });
            assert!(got.device().is_cuda(), "{name} left the device");
            assert_eq!(got.dims(), host.dims());
            let got = got.to_device(&Device::Cpu).unwrap();
            let (max, mean) = common::abs_err(&got, &host);
            println!("{name} {params:?} on the device, image {i}: max {max:.2e} mean {mean:.2e}");
            assert!(
                max <= bound,
                "{name} {params:?}, image {i}: max {max} (≤ {bound})"
            );
            let half_level_off = common::share_off(&got, &host, 0.5);
            assert!(
                half_level_off < 0.01,
                "{name} {params:?}, image {i}: {half_level_off} of the values half a level off"
            );
            checked += 1;
        }
    }
    assert_eq!(checked, 10 * 3);

    // `feedback` after an upscaling postprocessor: the larger previous output resized to the
    // frame where it is, with the host's arithmetic (bit for bit).
    let params: serde_json::Map<String, serde_json::Value> =
        serde_json::from_value(serde_json::json!({"feedback_strength": 0.3})).unwrap();
    let previous = Tensor::rand(0f32, 1.0, (1, 3, 194, 262), &Device::Cpu).unwrap();
    let host_inputs = ProcessorInputs {
        previous_output: Some(&previous),
        ..Default::default()
    };
    let host = preprocess::apply("feedback", &params, &images[0], &host_inputs).unwrap();
    let previous_on_device = previous.to_device(&cuda).unwrap();
    let device_inputs = ProcessorInputs {
        previous_output: Some(&previous_on_device),
        ..Default::default()
    };
    let got = policy.scoped(|| {
        preprocess::apply(
            "feedback",
            &params,
            &images[0].to_device(&cuda).unwrap(),
            &device_inputs,
        )
        .unwrap()
    });
    let (max, _) = common::abs_err(&got.to_device(&Device::Cpu).unwrap(), &host);
    println!("feedback of a larger previous output on the device: max {max:.2e}");
    assert_eq!(max, 0.0);
}

/// Streams batched across streams on the device against each stream alone on the device, in
/// f32 (docs/MULTI_STREAM.md): two streams with their own prompts, seeds and frames, steered by
/// the same ControlNet with their own scales, held in lockstep so that every UNet, ControlNet,
/// encode and decode call runs as one batch of both (and as CUDA graphs captured for two
/// streams' rows). cuDNN may choose other algorithms for a batch than for one call, so the
/// outputs are held to the device's parity bound (common::STREAM_MAX_ABS, what the device's
/// f32 meets against the reference), not to the bit as on the CPU.
#[test]
#[cfg_attr(
    not(feature = "cuda"),
    ignore = "needs the cuda feature and a CUDA device"
)]
fn cuda_streams_batched_across_streams_match_each_alone() {
    streams_batched_across_streams_match_each_alone(
        "cuda_streams_batched_across_streams_match_each_alone",
        false,
    );
}

/// The same with each batch handed back by a CUDA event that its callers' streams wait on
/// (`SDSTREAM_CUDA_BATCH_EVENTS`): the running thread no longer waits for the device, so a
/// caller that read its rows or freed its inputs before its stream waited for the batch would
/// read them unwritten or free them under it. The batches' costs are then timed on the device,
/// and each network's are counted.
#[test]
#[cfg_attr(
    not(feature = "cuda"),
    ignore = "needs the cuda feature and a CUDA device"
)]
fn cuda_streams_batched_with_events_match_each_alone() {
    streams_batched_across_streams_match_each_alone(
        "cuda_streams_batched_with_events_match_each_alone",
        true,
    );
}

fn streams_batched_across_streams_match_each_alone(test: &str, events: bool) {
    use sdstream::model::bundle::StableDiffusionModels;
    use sdstream::model::kernels::KernelPolicy;
    use sdstream::pipeline::cross_stream::SharedNetwork;
    use sdstream::{EngineSettings, StreamDiffusion, StreamDiffusionParams};
    use std::sync::Arc;
    if !cuda_or_skip(test) {
        return;
    }
    let cuda = Device::new_cuda(0).unwrap();
    let settings = |batching: bool| {
        let mut s = EngineSettings::from_json(
            &serde_json::json!({
                "cfg_type": "self",
                "vae": common::fixture("tiny-taesd").display().to_string(),
                "allow_any_resolution": true,
                "device": "cuda",
                "dtype": "f32",
            })
            .to_string(),
        )
        .unwrap();
        s.cross_stream_batching = batching;
        s.frame_budget_ms = batching.then_some(5_000.0);
        s.kernels = Some(KernelPolicy {
            cuda_batch_events: events,
            ..KernelPolicy::process()
        });
        s
    };
    let model_id = common::fixture("tiny-sd-turbo").display().to_string();
    let load =
        || Arc::new(StableDiffusionModels::load(&model_id, &settings(true), &mut |_| {}).unwrap());
    let streams = [
        ("a lighthouse at dusk", 5, 0.6, 0),
        ("a bowl of fruit", 11, 0.9, 3),
    ];
    const FRAMES: usize = 5;
    let run = |models: Arc<StableDiffusionModels>,
               (prompt, seed, scale, first): (&str, i64, f64, usize),
               batching: bool,
               after_frame: &dyn Fn()| {
        let body = serde_json::json!({
            "model_id": model_id,
            "prompt": prompt,
            "negative_prompt": "blurry",
            "seed": seed,
            "t_index_list": [16, 32],
            "guidance_scale": 1.2,
            "delta": 0.8,
            "width": 64,
            "height": 64,
            "controlnets": [{
                "model_id": common::fixture("tiny-controlnet-a").display().to_string(),
                "conditioning_scale": scale,
                "preprocessor": "passthrough",
            }],
        });
        let settings = settings(batching);
        let params = StreamDiffusionParams::from_json_with(&body.to_string(), &settings).unwrap();
        let mut stream = StreamDiffusion::with_models(models, params, settings).unwrap();
        (first..first + FRAMES)
            .map(|i| {
                let x = common::frame_tensor(i).to_device(&cuda).unwrap();
                let out = stream.process_tensor(&x).unwrap();
                after_frame();
                out.to_device(&Device::Cpu).unwrap()
            })
            .collect::<Vec<Tensor>>()
    };
    let alone_models = load();
    let alone: Vec<Vec<Tensor>> = streams
        .iter()
        .map(|&s| run(alone_models.clone(), s, false, &|| {}))
        .collect();
    let models = load();
    models.batcher().set_lockstep_for_tests(Some(2));
    let barrier = std::sync::Barrier::new(2);
    let together: Vec<Vec<Tensor>> = std::thread::scope(|scope| {
        let handles: Vec<_> = streams
            .iter()
            .map(|&s| {
                let (models, barrier, run) = (models.clone(), &barrier, &run);
                scope.spawn(move || {
                    run(models, s, true, &|| {
                        barrier.wait();
                    })
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut worst = 0f32;
    for (k, (a, b)) in alone.iter().zip(&together).enumerate() {
        for (i, (x, y)) in a.iter().zip(b).enumerate() {
            let (max, _) = common::abs_err(x, y);
            worst = worst.max(max);
            assert!(
                max <= common::STREAM_MAX_ABS,
                "stream {k}, frame {i}: batched differs from alone by {max:e}"
            );
        }
    }
    println!("batched across streams on the device: within {worst:.2e} of each stream alone");
    for network in [
        SharedNetwork::UNet,
        SharedNetwork::ControlNet,
        SharedNetwork::Encode,
        SharedNetwork::Decode,
    ] {
        let counts = models.batcher().counts_of(network);
        println!("{network:?}: {counts:?}");
        assert_eq!(
            (counts.calls, counts.shared_calls, counts.batches),
            (2 * FRAMES as u64, 2 * FRAMES as u64, FRAMES as u64),
            "{network:?}: {counts:?}"
        );
    }
    // Every network's batches were timed: on the host after a wait, or on the device by
    // their events (read here, once the device has run them).
    let costs = models.batcher().measured_costs();
    println!("measured costs: {costs:?}");
    for network in [
        SharedNetwork::UNet,
        SharedNetwork::ControlNet,
        SharedNetwork::Encode,
        SharedNetwork::Decode,
    ] {
        assert!(
            costs
                .iter()
                .any(|c| c.network == network && c.rows >= 2 && !c.time.is_zero()),
            "{network:?}: no shared batch timed in {costs:?}"
        );
    }
    // A check that can fail: the two streams made different pictures.
    assert!(common::abs_err(&together[0][0], &together[1][0]).0 > 1e-2);
}

/// One stream called from several host threads in turn, each call made once the last has
/// returned (as a host that serialises its calls makes them: Python's thread pool under the
/// stream's lock, a C host's workers) gives what the same calls give from one thread. Each
/// thread queues on its own CUDA stream: every call here runs on a thread of its own (the
/// construction, four frames, a prompt change between them) and must wait for the last call's
/// work on the device (`ThreadHandoff`), or it reads a prompt, a latent or a noise before the
/// kernels that write them have run.
#[test]
#[cfg_attr(
    not(feature = "cuda"),
    ignore = "needs the cuda feature and a CUDA device"
)]
fn cuda_a_stream_called_from_threads_in_turn_matches_one_thread() {
    use sdstream::{EngineSettings, StreamDiffusion, StreamDiffusionParams};
    if !cuda_or_skip("cuda_a_stream_called_from_threads_in_turn_matches_one_thread") {
        return;
    }
    let cuda = Device::new_cuda(0).unwrap();
    let settings = EngineSettings::from_json(
        &serde_json::json!({
            "cfg_type": "self",
            "vae": common::fixture("tiny-taesd").display().to_string(),
            "allow_any_resolution": true,
            "device": "cuda",
            "dtype": "f16",
        })
        .to_string(),
    )
    .unwrap();
    let body = |prompt: &str| {
        let body = serde_json::json!({
            "model_id": common::fixture("tiny-sd-turbo").display().to_string(),
            "prompt": prompt,
            "seed": 7,
            "t_index_list": [16, 32],
            "width": 64,
            "height": 64,
        });
        StreamDiffusionParams::from_json_with(&body.to_string(), &settings).unwrap()
    };
    const FRAMES: usize = 4;
    // Each step on a thread `on` gives (a fresh scoped thread each, or this one).
    let run = |on: &dyn Fn(&mut (dyn FnMut() + Send))| -> Vec<Tensor> {
        let mut stream = None;
        on(&mut || stream = Some(StreamDiffusion::new(body("a lighthouse"), settings.clone())));
        let mut stream = stream.unwrap().unwrap();
        let mut outputs = Vec::new();
        for i in 0..FRAMES {
            if i == 2 {
                on(&mut || {
                    stream.update(body("a bowl of fruit")).unwrap();
                });
            }
            on(&mut || {
                let x = common::frame_tensor(i).to_device(&cuda).unwrap();
                let out = stream.process_tensor(&x).unwrap();
                outputs.push(out.to_device(&Device::Cpu).unwrap());
            });
        }
        outputs
    };
    let one_thread = run(&|step| step());
    let threads = std::cell::Cell::new(0usize);
    let in_turn = run(&|step| {
        std::thread::scope(|s| s.spawn(step).join().unwrap());
        threads.set(threads.get() + 1);
    });
    assert_eq!(threads.get(), 1 + FRAMES + 1, "a thread per call");
    assert_eq!(in_turn.len(), FRAMES);
    for (i, (a, b)) in one_thread.iter().zip(&in_turn).enumerate() {
        let (max, _) = common::abs_err(a, b);
        println!("frame {i}: threads in turn against one thread, max {max:.2e}");
        assert!(max <= 1e-3, "frame {i}: {max:e}");
    }
    // A check that can fail: the prompt change changed the picture.
    assert!(common::abs_err(&one_thread[1], &one_thread[2]).0 > 1e-2);
}

/// The in-place adds on the device (ops.cu) against candle's broadcast adds: each image's own
/// values over its channels-last map (three images: the per-image runs of
/// `add_fresh_per_batch`), a per-channel shift of channels-first maps and a bias over the last
/// dimension, in every dtype, through ops.cu's 16-byte path and (6 channels, a map one value
/// into its buffer) its scalar one. f32 and f16 sums are exact before their one rounding, so they
/// must agree to the bit; bf16 within one rounding.
#[test]
#[cfg_attr(
    not(feature = "cuda"),
    ignore = "needs the cuda feature and a CUDA device"
)]
fn cuda_in_place_adds_match_broadcast_adds() {
    use sdstream::model::kernels::ops::{add_fresh, add_fresh_per_batch};
    if !cuda_or_skip("cuda_in_place_adds_match_broadcast_adds") {
        return;
    }
    let cuda = Device::new_cuda(0).unwrap();
    let randn = |dims: &[usize]| Tensor::randn(0f32, 1.0, dims, &Device::Cpu).unwrap();
    let cases = [
        (
            "per image, channels last",
            randn(&[3, 5, 7, 8]),
            randn(&[3, 1, 1, 8]),
            1,
            true,
        ),
        (
            "per channel, channels first",
            randn(&[3, 5, 7, 8]),
            randn(&[3, 5, 1, 1]),
            56,
            false,
        ),
        ("bias", randn(&[3, 5, 7, 8]), randn(&[8]), 1, false),
        // ops.cu's 16-byte path takes the cases above and the residual; these two it must
        // leave to the scalar kernel (6 values do not fill a vector; a map starting one value
        // into its buffer is not 16-byte aligned).
        (
            "residual",
            randn(&[3, 5, 7, 8]),
            randn(&[3, 5, 7, 8]),
            1,
            false,
        ),
        ("bias of 6", randn(&[3, 5, 7, 6]), randn(&[6]), 1, false),
        (
            "bias, unaligned",
            randn(&[1, 5, 7, 8]),
            randn(&[8]),
            1,
            false,
        ),
    ];
    for (name, fresh, other, inner, per_batch) in cases {
        for (dtype, bound) in [(DType::F32, 0.0f32), (DType::F16, 0.0), (DType::BF16, 3e-2)] {
            let fresh = fresh.to_dtype(dtype).unwrap().to_device(&cuda).unwrap();
            let other = other.to_dtype(dtype).unwrap().to_device(&cuda).unwrap();
            let want = fresh.broadcast_add(&other).unwrap();
            let copy = if name.ends_with("unaligned") {
                // One value in: the map starts 2 or 4 bytes past its buffer's start.
                let flat = fresh.flatten_all().unwrap();
                let padded = Tensor::cat(&[&flat.narrow(0, 0, 1).unwrap(), &flat], 0).unwrap();
                padded
                    .narrow(0, 1, flat.elem_count())
                    .unwrap()
                    .reshape(fresh.shape())
                    .unwrap()
            } else {
                fresh.copy().unwrap()
            };
            let got = if per_batch {
                add_fresh_per_batch(copy, &other, inner).unwrap()
            } else {
                add_fresh(copy, &other, inner).unwrap()
            };
            let (max, _) = common::abs_err(
                &got.to_dtype(DType::F32)
                    .unwrap()
                    .to_device(&Device::Cpu)
                    .unwrap(),
                &want
                    .to_dtype(DType::F32)
                    .unwrap()
                    .to_device(&Device::Cpu)
                    .unwrap(),
            );
            println!("in-place add, {name}, {dtype:?}: max {max:.2e}");
            assert!(max <= bound, "{name} {dtype:?}: max {max} > {bound}");
        }
    }
}
