//! `flow_to_rgb8` against torchvision's `flow_to_image` byte for byte (goldens from
//! tests/reference/make_raft_fixtures.py): random, smooth, all-zero and single-vector flows,
//! vectors along every colour-wheel entry, a RAFT flow; and the colour wheel itself.

use crate::common;

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{Device, Tensor};
use sdstream::preprocess::flow_image::{color_wheel, flow_tensor_to_rgb8, flow_to_rgb8};

/// `tests/fixtures/<rel>` at the workspace root, or `$SDSTREAM_FIXTURES/<rel>`.
fn fixture(rel: &str) -> PathBuf {
    common::fixture(rel)
}

fn goldens() -> HashMap<String, Tensor> {
    let path = fixture("raft/flow_image.safetensors");
    candle_core::safetensors::load(&path, &Device::Cpu)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

fn bytes(t: &Tensor) -> Vec<u8> {
    t.flatten_all().unwrap().to_vec1::<u8>().unwrap()
}

#[test]
fn wheel_is_torchvisions() {
    let ours: Vec<u8> = color_wheel().iter().flatten().copied().collect();
    assert_eq!(ours, bytes(&goldens()["wheel"]));
}

#[test]
fn images_match_torchvision_exactly() {
    let goldens = goldens();
    let mut total_cpu_diffs = 0;
    let mut total_bytes = 0;
    for case in ["random", "smooth", "zero", "single", "boundary", "raft"] {
        let flows = &goldens[&format!("{case}.flow")];
        let images = &goldens[&format!("{case}.image")];
        let images_cpu = &goldens[&format!("{case}.image_cpu")];
        let (count, _, h, w) = flows.dims4().unwrap();
        let (mut diffs, mut cpu_diffs) = (0, 0);
        for k in 0..count {
            let flow = flows.get(k).unwrap();
            let u = flow
                .get(0)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let v = flow
                .get(1)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let ours = flow_to_rgb8(&u, &v, h, w);
            let reference = bytes(&images.get(k).unwrap());
            let reference_cpu = bytes(&images_cpu.get(k).unwrap());
            diffs += ours.iter().zip(&reference).filter(|(a, b)| a != b).count();
            cpu_diffs += ours
                .iter()
                .zip(&reference_cpu)
                .filter(|(a, b)| a != b)
                .count();
            // The tensor entry point computes the same bytes.
            assert_eq!(
                flow_tensor_to_rgb8(&flow.unsqueeze(0).unwrap()).unwrap(),
                ours
            );
        }
        let n = count * 3 * h * w;
        println!(
            "{case} ({count}×{h}×{w}): {diffs} of {n} bytes differ (torch's CPU sqrt/atan2: {cpu_diffs})"
        );
        assert_eq!(diffs, 0, "{case}: {diffs} bytes differ from torchvision");
        total_cpu_diffs += cpu_diffs;
        total_bytes += n;
    }
    // Against torchvision with torch's own (1-ulp) CPU sqrt and atan2, only bytes whose value
    // sits exactly on an integer boundary may move: a handful.
    assert!(
        total_cpu_diffs * 1000 < total_bytes,
        "{total_cpu_diffs} of {total_bytes}"
    );
}

#[test]
fn zero_flow_is_white_and_scale_does_not_matter() {
    let (h, w) = (3, 4);
    let zeros = vec![0.0f32; h * w];
    assert!(flow_to_rgb8(&zeros, &zeros, h, w).iter().all(|&b| b == 255));
    let u: Vec<f32> = (0..h * w).map(|i| (i as f32 * 0.37).sin() * 4.0).collect();
    let v: Vec<f32> = (0..h * w).map(|i| (i as f32 * 0.91).cos() * 3.0).collect();
    let scaled = |s: f32| -> Vec<f32> { u.iter().map(|x| x * s).collect() };
    let scaled_v = |s: f32| -> Vec<f32> { v.iter().map(|x| x * s).collect() };
    // Max-normalisation: a scaled field colours the same (only epsilon's share changes, which
    // moves no byte here).
    assert_eq!(
        flow_to_rgb8(&u, &v, h, w),
        flow_to_rgb8(&scaled(0.25), &scaled_v(0.25), h, w)
    );
}

#[test]
fn tensor_entry_point_checks_its_shape() {
    let flow = Tensor::zeros((3, 4, 4), candle_core::DType::F32, &Device::Cpu).unwrap();
    assert!(flow_tensor_to_rgb8(&flow).is_err());
    let flow = Tensor::zeros((2, 4, 5), candle_core::DType::F32, &Device::Cpu).unwrap();
    assert_eq!(flow_tensor_to_rgb8(&flow).unwrap().len(), 60);
}
