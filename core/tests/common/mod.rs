//! Helpers shared by the integration tests: fixture paths, golden files, error metrics.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};

/// `tests/fixtures/<rel>` at the workspace root.
pub fn fixture(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures")
        .join(rel)
}

/// All tensors of a golden safetensors file, as f32 on the CPU.
pub fn golden(rel: &str) -> HashMap<String, Tensor> {
    let path = fixture(rel);
    let tensors = candle_core::safetensors::load(&path, &Device::Cpu)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    tensors
        .into_iter()
        .map(|(k, v)| {
            let v = if v.dtype() == DType::F32 {
                v
            } else {
                v.to_dtype(DType::F32).unwrap()
            };
            (k, v)
        })
        .collect()
}

/// (max abs, mean abs) difference of two same-shaped tensors.
pub fn abs_err(a: &Tensor, b: &Tensor) -> (f32, f32) {
    assert_eq!(a.dims(), b.dims(), "shape mismatch");
    let d = (a.to_dtype(DType::F32).unwrap() - b.to_dtype(DType::F32).unwrap())
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap();
    let max = d.max(0).unwrap().to_scalar::<f32>().unwrap();
    let mean = d.mean(0).unwrap().to_scalar::<f32>().unwrap();
    (max, mean)
}
