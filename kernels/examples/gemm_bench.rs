//! Times the CPU GEMMs at the sd-turbo UNet's shapes: the f32 GEMM (the `gemm` crate, what f32
//! runs) beside sdstream's bf16 GEMM (AMX or AVX512-BF16 where the CPU has them; see
//! `sdstream_kernels::gemm_bf16`), packing of the activations included.
//!
//! `cargo run --release -p sdstream-kernels --example gemm_bench -- [iterations]`

use std::time::Instant;

use sdstream_kernels::gemm_bf16::{self, PackedA, PackedB};

/// Best wall time of `iterations` calls after one warm-up, in seconds.
fn best_of(iterations: usize, mut f: impl FnMut()) -> f64 {
    f();
    let mut best = f64::MAX;
    for _ in 0..iterations {
        let t = Instant::now();
        f();
        best = best.min(t.elapsed().as_secs_f64());
    }
    best
}

fn main() {
    let iterations = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    let threads = candle_core::utils::get_num_threads();
    println!(
        "bf16 kernel: {:?}; {threads} threads",
        gemm_bf16::Kernel::best()
    );
    println!("| GEMM | m×k×n | f32 ms | GFLOP/s | bf16 ms | GFLOP/s |");
    println!("|---|---|---:|---:|---:|---:|");
    // (what, m, k, n, whether the activations are A): a linear layer multiplies tokens (A,
    // batch 3 at 512²: 3·4096 rows) by its weight; a convolution its weight (A) by one image's
    // im2col block. Only the activations are packed per call, as in the networks.
    let shapes = [
        ("attention projection, 64² × 320", 3 * 4096, 320, 320, true),
        ("feed-forward in, 64² × 320", 3 * 4096, 320, 2560, true),
        ("feed-forward out, 64² × 320", 3 * 4096, 1280, 320, true),
        ("feed-forward in, 32² × 640", 3 * 1024, 640, 5120, true),
        ("feed-forward in, 16² × 1280", 3 * 256, 1280, 10240, true),
        ("conv 3×3 as GEMM, 64² × 320", 320, 2880, 4096, false),
        ("conv 3×3 as GEMM, 32² × 640", 640, 5760, 1024, false),
        ("conv 3×3 as GEMM, 16² × 1280", 1280, 11520, 256, false),
    ];
    let mut seed = 1u32;
    let mut fill = |len: usize| -> Vec<f32> {
        (0..len)
            .map(|_| {
                seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                (seed >> 8) as f32 / (1u32 << 24) as f32 - 0.5
            })
            .collect()
    };
    for (what, m, k, n, activations_left) in shapes {
        let a = fill(m * k);
        let b = fill(k * n);
        let mut c = vec![0f32; m * n];
        let gflop = 2.0 * (m * k * n) as f64 / 1e9;
        let f32_s = best_of(iterations, || {
            // SAFETY: a is m×k, b k×n, c m×n, all row-major and as long as that.
            unsafe {
                gemm::gemm(
                    m,
                    n,
                    k,
                    c.as_mut_ptr(),
                    1,
                    n as isize,
                    false,
                    a.as_ptr(),
                    1,
                    k as isize,
                    b.as_ptr(),
                    1,
                    n as isize,
                    0.0,
                    1.0,
                    false,
                    false,
                    false,
                    gemm::Parallelism::Rayon(threads),
                );
            }
        });
        let mut packed_b = PackedB::default();
        packed_b.repack_rows(&b, k, n, n, threads);
        let mut packed_a = PackedA::new(&a, m, k, k);
        let bf16_s = best_of(iterations, || {
            if activations_left {
                packed_a.repack(&a, m, k, k, threads);
            } else {
                packed_b.repack_rows(&b, k, n, n, threads);
            }
            gemm_bf16::gemm(&packed_a, &packed_b, &mut c, n, threads).expect("shapes agree");
        });
        let pack_s = best_of(iterations, || {
            if activations_left {
                packed_a.repack(&a, m, k, k, threads);
            } else {
                packed_b.repack_rows(&b, k, n, n, threads);
            }
        });
        // A linear layer's weight is [n, k]: `b`'s values read as one (only the time counts).
        let weight_s = best_of(1, || {
            let _ = PackedB::from_transposed(&b, n, k, k, threads);
        });
        eprintln!(
            "  packing {:.1} ms; weight as transposed {:.1} ms",
            pack_s * 1e3,
            weight_s * 1e3
        );
        println!(
            "| {what} | {m}×{k}×{n} | {:.1} | {:.0} | {:.1} | {:.0} |",
            f32_s * 1e3,
            gflop / f32_s,
            bf16_s * 1e3,
            gflop / bf16_s
        );
    }
}
