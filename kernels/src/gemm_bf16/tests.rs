use super::*;

/// Deterministic values in [-1, 1) with a spread of magnitudes.
fn values(len: usize, seed: u64) -> Vec<f32> {
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..len)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

fn rounded(x: f32) -> f64 {
    f64::from(from_bf16(to_bf16(x)))
}

/// The exact product of the rounded operands, in f64.
fn reference(a: &[f32], b: &[f32], m: usize, k: usize, n: usize) -> Vec<f64> {
    let mut c = vec![0f64; m * n];
    for i in 0..m {
        for p in 0..k {
            let x = rounded(a[i * k + p]);
            for j in 0..n {
                c[i * n + j] += x * rounded(b[p * n + j]);
            }
        }
    }
    c
}

#[test]
fn rounding_is_to_nearest_even() {
    assert_eq!(to_bf16(1.0), 0x3f80);
    // 1 + 2⁻⁸ is halfway between 1 and 1 + 2⁻⁷: ties go to the even mantissa (1.0).
    assert_eq!(to_bf16(1.0 + 1.0 / 256.0), 0x3f80);
    // 1 + 3·2⁻⁸ is halfway between 1 + 2⁻⁷ and 1 + 2⁻⁶: to the even one, up.
    assert_eq!(to_bf16(1.0 + 3.0 / 256.0), 0x3f82);
    assert_eq!(to_bf16(-2.0), 0xc000);
    assert!(from_bf16(to_bf16(f32::NAN)).is_nan());
    assert_eq!(to_bf16(f32::INFINITY), 0x7f80);
    for x in values(1000, 3) {
        assert_eq!(to_bf16(x), half::bf16::from_f32(x).to_bits(), "{x}");
    }
}

/// The vector rounding (where the CPU has AVX-512) gives the scalar rounding's bits, at
/// every length (whole vectors and a tail) and for the special values.
#[test]
fn slices_and_pairs_round_as_each_value_does() {
    let mut src = values(1000, 7);
    let specials = [
        f32::NAN,
        -f32::NAN,
        f32::INFINITY,
        f32::NEG_INFINITY,
        0.0,
        -0.0,
        f32::MIN_POSITIVE / 3.0,
        f32::MAX,
        1.0 + 1.0 / 256.0,
        1.0 + 3.0 / 256.0,
        f32::from_bits(0x7f7f_ffff),
        f32::from_bits(0x7f80_0001),
    ];
    src[..specials.len()].copy_from_slice(&specials);
    for len in [0, 5, 16, 31, 32, 1000] {
        let mut dst = vec![0u16; len];
        round_slice(&src[..len], &mut dst);
        for (i, (&d, &x)) in dst.iter().zip(&src).enumerate() {
            assert_eq!(d, to_bf16(x), "value {i} ({x}) of {len}");
        }
    }
    let even: [f32; TILE] = src[..TILE].try_into().unwrap();
    let odd: [f32; TILE] = src[TILE..2 * TILE].try_into().unwrap();
    let mut pairs = [0u16; K_BLOCK];
    round_pairs_into(&even, &odd, &mut pairs);
    for c in 0..TILE {
        assert_eq!(
            [pairs[2 * c], pairs[2 * c + 1]],
            [to_bf16(even[c]), to_bf16(odd[c])]
        );
    }
}

/// Both packings of B and both kernels against the f64 product of the rounded operands,
/// at shapes with ragged edges in every dimension and more than one pass over k.
#[test]
fn gemm_matches_the_rounded_product() {
    for &(m, k, n) in &[
        (1, 1, 1),
        (17, 33, 15),
        (64, 1100, 96),
        (45, 2083, 70),
        (96, 64, 33),
    ] {
        let a = values(m * k, 1);
        let b = values(k * n, 2);
        let bt: Vec<f32> = (0..n * k).map(|i| b[(i % k) * n + i / k]).collect();
        let expected = reference(&a, &b, m, k, n);
        let mut packed_a = PackedA::new(&a, m, k, k);
        packed_a.repack(&a, m, k, k, 3);
        let mut by_rows = PackedB::default();
        by_rows.repack_rows(&b, k, n, n, 2);
        let by_transpose = PackedB::from_transposed(&bt, n, k, k, 2);
        for packed_b in [&by_rows, &by_transpose] {
            for kernel in Kernel::available() {
                for threads in [1, 3] {
                    let ldc = n + 3;
                    let mut c = vec![f32::NAN; m * ldc];
                    gemm_with(kernel, &packed_a, packed_b, &mut c, ldc, threads).unwrap();
                    let mut worst = 0f64;
                    for i in 0..m {
                        for j in 0..n {
                            let e = expected[i * n + j];
                            let d = (f64::from(c[i * ldc + j]) - e).abs();
                            // f32 sums of k products: error ~ k·2⁻²⁴ of the magnitudes.
                            worst = worst.max(d / (k as f64).sqrt());
                        }
                        // The padding between rows is never written.
                        assert!(c[i * ldc + n..(i + 1) * ldc].iter().all(|v| v.is_nan()));
                    }
                    assert!(
                        worst < 2e-6,
                        "{m}×{k}×{n} {kernel:?} threads {threads}: {worst}"
                    );
                }
            }
        }
    }
}

/// The portable block's pieces (plain, and AVX2 where the CPU has it) give the pairwise
/// f32 formula's sums bit for bit: `c += a[2p]·b[2p] + a[2p+1]·b[2p+1]`, pair after pair,
/// on top of what C held when accumulating.
#[test]
fn portable_block_sums_pairwise_bit_for_bit() {
    let (m, k, n) = (PANEL, 5 * K_BLOCK - 7, PANEL);
    let (a, b) = (values(m * k, 5), values(k * n, 6));
    let packed_a = PackedA::new(&a, m, k, k);
    let mut packed_b = PackedB::default();
    packed_b.repack_rows(&b, k, n, n, 1);
    let ops = Operands {
        a0: packed_a.block(0, 0),
        a1: packed_a.block(1, 0),
        a_row: K_BLOCK,
        a_step: BLOCK_LEN,
        b0: packed_b.block(0, 0),
        b1: packed_b.block(1, 0),
        blocks: packed_a.k_blocks,
    };
    let start = values(m * n, 7);
    let value = |x: &[f32], at: usize, len: usize| {
        if at < len {
            from_bf16(to_bf16(x[at]))
        } else {
            0.0
        }
    };
    let mut expected = start.clone();
    for i in 0..m {
        for j in 0..n {
            let mut sum = 0f32;
            for p in (0..packed_a.k_blocks * K_BLOCK).step_by(2) {
                let (a0, a1) = (
                    value(&a, i * k + p, (i + 1) * k),
                    value(&a, i * k + p + 1, (i + 1) * k),
                );
                let (b0, b1) = (
                    if p < k {
                        value(&b, p * n + j, k * n)
                    } else {
                        0.0
                    },
                    if p + 1 < k {
                        value(&b, (p + 1) * n + j, k * n)
                    } else {
                        0.0
                    },
                );
                sum += a0 * b0 + a1 * b1;
            }
            expected[i * n + j] += sum;
        }
    }
    let mut pieces = vec!["plain"];
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") {
        pieces.push("avx2");
    }
    for &piece in &pieces {
        let mut c = start.clone();
        // SAFETY: c holds 32 rows of n = 32 values; the operands are whole packed blocks;
        // the AVX2 piece runs only where the CPU has AVX2.
        unsafe {
            if piece == "plain" {
                panel_portable(&ops, c.as_mut_ptr(), n, true, rows_times_strip);
            } else {
                #[cfg(target_arch = "x86_64")]
                panel_portable(&ops, c.as_mut_ptr(), n, true, |r, step, b, q| {
                    avx2::rows_times_strip(r, step, b, q)
                });
            }
        }
        let differing = c
            .iter()
            .zip(&expected)
            .filter(|(x, y)| x.to_bits() != y.to_bits())
            .count();
        assert_eq!(
            differing,
            0,
            "{piece}: {differing} of {} sums differ",
            m * n
        );
    }
    println!("portable block pieces checked bit for bit: {pieces:?}");
}

/// The tensor entry point: `x·Wᵀ` over a batch of token rows equals candle's f32 matmul of
/// the rounded operands, and the weight is packed once for every call.
#[test]
fn linear_matches_the_rounded_matmul() -> candle_core::Result<()> {
    let dev = candle_core::Device::Cpu;
    let x = Tensor::randn(0f32, 1.0, (2, 37, 70), &dev)?;
    let w = Tensor::randn(0f32, 0.2, (45, 70), &dev)?;
    let round = |t: &Tensor| t.to_dtype(DType::BF16)?.to_dtype(DType::F32);
    let want = round(&x)?.broadcast_matmul(&round(&w)?.t()?)?;
    // The weight laid out [out, in], and as a view of [in, out] values (unet_blocks::Linear
    // on the CPU), packed from either.
    let w_in_out = w.t()?.contiguous()?.t()?;
    for weight in [&w, &w_in_out] {
        let packed = LazyWeight::default();
        for _ in 0..2 {
            let got = linear(&x, weight, &packed)?;
            assert_eq!(got.dims(), &[2, 37, 45]);
            let err = (&got - &want)?
                .abs()?
                .flatten_all()?
                .max(0)?
                .to_scalar::<f32>()?;
            assert!(err < 1e-4, "{err}");
        }
        assert!(packed.0.get().is_some());
    }
    Ok(())
}
