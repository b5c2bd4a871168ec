//! The golden stream cases (ControlNet streams included) with every f32 3×3 stride-1 convolution
//! on Winograd's F(2×2, 3×3) (kernels::winograd, `SDSTREAM_WINOGRAD=f2`), against the reference's
//! outputs within the same bounds as core/tests/integration/stream.rs. By default the kernel runs only on layers
//! of 128 channels and more, which the tiny golden networks (32 and 64 channels) never have, so
//! this is where its rounding meets the goldens. One test in its own binary, because the
//! variable is process-wide and read once.

mod common;
mod streams;

#[test]
fn streams_match_goldens_with_every_convolution_on_winograd_f2() {
    // SAFETY: the only test of this binary sets the variable before any other thread exists.
    unsafe { std::env::set_var("SDSTREAM_WINOGRAD", "f2") };
    streams::check_cases_on_winograd();
}
