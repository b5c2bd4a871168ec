//! The golden stream cases (ControlNet streams included) through the portable kernels only (candle's generic ops: the code path
//! CUDA and Metal take), on the CPU: f32 against the reference's outputs within the same bounds
//! as core/tests/integration/stream.rs, and f16 against that f32 run within stated bounds in 8-bit levels (bf16
//! cannot run here: candle 0.11's CPU matmul has no bf16; tests/cuda.rs checks it on a GPU).
//! One test in its own binary, because `SDSTREAM_PORTABLE_KERNELS` is process-wide and read once.

mod common;
mod streams;

use streams::{CASES, CONTROLNET_CASES, Levels, Target, check_case_against_golden};

/// f16 against f32, worst frame of any case, in 8-bit levels (pixel × 255). Measured: max 7.65
/// levels (none_t4_fullvae_nonoise; TAESD cases at most 2.9), mean 0.70.
const F16_MAX_LEVELS: f32 = 10.0;
/// See [`F16_MAX_LEVELS`].
const F16_MEAN_LEVELS: f32 = 1.0;

#[test]
fn portable_streams_match_goldens_and_half_precision_stays_close() {
    // SAFETY: the only test of this binary sets the variable before any other thread exists.
    unsafe { std::env::set_var("SDSTREAM_PORTABLE_KERNELS", "1") };
    let cases: Vec<&str> = CASES.iter().chain(CONTROLNET_CASES).copied().collect();
    let f32_outputs: Vec<_> = cases
        .iter()
        .map(|name| check_case_against_golden(name, Target::CPU_F32))
        .collect();
    // Portable bf16 is checked on a GPU (tests/cuda.rs): candle 0.11's CPU ops have no bf16
    // (the CPU kernels' bf16, f32 maps with bf16 GEMMs, is core/tests/integration/stream_bf16.rs).
    {
        let (dtype, max_levels, mean_levels) = ("f16", F16_MAX_LEVELS, F16_MEAN_LEVELS);
        let mut worst = Levels::default();
        for (name, reference) in cases.iter().zip(&f32_outputs) {
            let target = Target {
                device: "cpu",
                dtype,
            };
            worst = worst.worst(Levels::of_case(name, target, reference, "portable"));
        }
        worst.assert_within(
            &format!("portable {dtype} vs f32, worst case"),
            max_levels,
            mean_levels,
        );
    }
}
