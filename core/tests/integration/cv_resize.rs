//! `cv_resize` against cv2.resize goldens (tests/reference/make_cv_goldens.py).
//!
//! Inputs are regenerated here from the recipe in `resize.json` (SplitMix64 or an integer
//! triangle wave), so the fixtures hold only cv2's outputs: whole for small cases, as an FNV-1a
//! digest (plus a strided sample for f32) for the large ones.

use crate::common;

use std::path::PathBuf;

use sdstream::preprocess::cv_resize::{Interpolation, resize_f32, resize_u8};
use serde::Deserialize;

fn fixtures() -> PathBuf {
    common::fixture("preprocess/cv")
}

#[derive(Debug, Deserialize)]
struct Case {
    name: String,
    dtype: String,
    mode: String,
    height: usize,
    width: usize,
    channels: usize,
    out_height: usize,
    out_width: usize,
    input: String,
    seed: u64,
    fnv1a64: String,
    sum: f64,
    full: bool,
    sample_stride: Option<usize>,
}

#[derive(Debug, Deserialize)]
struct Goldens {
    opencv: String,
    cases: Vec<Case>,
}

fn splitmix64(seed: u64, n: usize) -> Vec<u64> {
    let mut state = seed;
    (0..n)
        .map(|_| {
            state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        })
        .collect()
}

/// The script's `make_input` for u8: top byte of SplitMix64, or the folded triangle wave.
fn input_u8(case: &Case) -> Vec<u8> {
    let (h, w, c) = (case.height, case.width, case.channels);
    if case.input == "random" {
        return splitmix64(case.seed, h * w * c)
            .iter()
            .map(|r| (r >> 56) as u8)
            .collect();
    }
    let mut v = Vec::with_capacity(h * w * c);
    for y in 0..h {
        for x in 0..w {
            for ch in 0..c {
                let t = (2 * x + 3 * y + 40 * ch + case.seed as usize) % 510;
                v.push(if t < 256 { t } else { 510 - t } as u8);
            }
        }
    }
    v
}

fn input_f32(case: &Case) -> Vec<f32> {
    if case.input == "random" {
        let n = case.height * case.width * case.channels;
        return splitmix64(case.seed, n)
            .iter()
            .map(|r| (r >> 40) as f32 / (1u32 << 24) as f32)
            .collect();
    }
    input_u8(case).iter().map(|&v| v as f32 / 255.0).collect()
}

fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xCBF2_9CE4_8422_2325, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01B3)
    })
}

fn mode(name: &str) -> Interpolation {
    match name {
        "linear" => Interpolation::Linear,
        "area" => Interpolation::Area,
        "lanczos4" => Interpolation::Lanczos4,
        "cubic" => Interpolation::Cubic,
        other => panic!("unknown interpolation {other}"),
    }
}

fn f32s(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect()
}

#[test]
fn resize_matches_cv2() {
    let dir = fixtures();
    let goldens: Goldens =
        serde_json::from_slice(&std::fs::read(dir.join("resize.json")).unwrap()).unwrap();
    let bytes = std::fs::read(dir.join("resize.safetensors")).unwrap();
    let tensors = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    println!("goldens from OpenCV {}", goldens.opencv);
    let mut failures = Vec::new();
    for case in &goldens.cases {
        let (h, w, c, oh, ow) = (
            case.height,
            case.width,
            case.channels,
            case.out_height,
            case.out_width,
        );
        let m = mode(&case.mode);
        let (out_bytes, sum, detail) = if case.dtype == "u8" {
            let out = resize_u8(&input_u8(case), h, w, c, oh, ow, m);
            let mut detail = String::new();
            if case.full {
                let expected = tensors.tensor(&case.name).unwrap();
                let differing = out
                    .iter()
                    .zip(expected.data())
                    .filter(|(a, b)| a != b)
                    .count();
                let max = out
                    .iter()
                    .zip(expected.data())
                    .map(|(a, b)| (*a as i32 - *b as i32).abs())
                    .max()
                    .unwrap_or(0);
                detail = format!("{differing} differing values, max |diff| {max}");
            }
            let sum = out.iter().map(|&v| v as f64).sum::<f64>();
            (out, sum, detail)
        } else {
            let out = resize_f32(&input_f32(case), h, w, c, oh, ow, m);
            let stride = case.sample_stride.unwrap();
            let sample = f32s(
                tensors
                    .tensor(&format!("{}.sample", case.name))
                    .unwrap()
                    .data(),
            );
            let got: Vec<f32> = out.iter().step_by(stride).copied().collect();
            assert_eq!(got.len(), sample.len(), "{}: sample length", case.name);
            let (mut max_abs, mut max_rel) = (0f64, 0f64);
            for (a, b) in got.iter().zip(&sample) {
                let d = (*a as f64 - *b as f64).abs();
                max_abs = max_abs.max(d);
                max_rel = max_rel.max(d / (*b as f64).abs().max(1e-6));
            }
            // A relative error that could fail: 1e-6 of the value (at least 1e-12 absolute).
            if max_rel > 1e-6 {
                failures.push(format!(
                    "{}: sampled max relative error {max_rel:e}",
                    case.name
                ));
            }
            let sum = out.iter().map(|&v| v as f64).sum::<f64>();
            let bytes = out.iter().flat_map(|v| v.to_le_bytes()).collect();
            (
                bytes,
                sum,
                format!("sampled max |diff| {max_abs:e}, max rel {max_rel:e}"),
            )
        };
        let digest = format!("{:016x}", fnv1a64(&out_bytes));
        let exact = digest == case.fnv1a64;
        println!(
            "{:<48} {:>8} values  {}  sum diff {:e}  {detail}",
            case.name,
            oh * ow * c,
            if exact { "bit-exact" } else { "DIFFERS" },
            (sum - case.sum).abs(),
        );
        if !exact {
            failures.push(format!(
                "{}: output digest differs from cv2's ({detail})",
                case.name
            ));
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

#[test]
fn same_size_is_a_copy() {
    let src: Vec<u8> = (0..5 * 7 * 3).map(|v| (v * 37 % 256) as u8).collect();
    for m in [
        Interpolation::Linear,
        Interpolation::Area,
        Interpolation::Lanczos4,
        Interpolation::Cubic,
    ] {
        assert_eq!(resize_u8(&src, 5, 7, 3, 5, 7, m), src);
        let f: Vec<f32> = src.iter().map(|&v| v as f32 / 3.0).collect();
        assert_eq!(resize_f32(&f, 5, 7, 3, 5, 7, m), f);
    }
}

#[test]
#[should_panic(expected = "source length")]
fn wrong_length_panics() {
    resize_u8(&[0; 10], 2, 2, 3, 4, 4, Interpolation::Linear);
}
