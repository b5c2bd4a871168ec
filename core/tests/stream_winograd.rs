//! The golden stream cases (ControlNet streams included) with every f32 3×3 stride-1 convolution
//! on Winograd's kernel (kernels::winograd, `SDSTREAM_WINOGRAD=all`), against the reference's
//! outputs within the same bounds as tests/stream.rs. By default the kernel runs only on layers
//! of 256 channels and more, which the tiny golden networks (32 and 64 channels) never have, so
//! this is where its rounding meets the goldens. One test in its own binary, because the
//! variable is process-wide and read once.

mod common;
mod streams;

use sdstream::model::kernels::winograd_convolutions;
use streams::{CASES, CONTROLNET_CASES, Target, check_case_against_golden};

#[test]
fn streams_match_goldens_with_every_convolution_on_winograd() {
    // SAFETY: the only test of this binary sets the variable before any other thread exists.
    unsafe { std::env::set_var("SDSTREAM_WINOGRAD", "all") };
    for name in CASES.iter().chain(CONTROLNET_CASES) {
        let before = winograd_convolutions();
        check_case_against_golden(name, Target::CPU_F32);
        let ran = winograd_convolutions() - before;
        println!("{name}: {ran} convolutions on Winograd's kernel");
        // Measured 486 (txt2img: no encoder) to 1,818 (ControlNets, step by step) a case.
        assert!(
            ran >= 400,
            "{name}: only {ran} convolutions took Winograd's kernel"
        );
    }
}
