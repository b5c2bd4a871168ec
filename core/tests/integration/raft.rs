//! RAFT (raft_small layout) against torchvision: a narrow random-weight net built with
//! torchvision's own builder (goldens from tests/reference/make_raft_fixtures.py), the state-dict
//! reading of `Config::from_tensor_shapes`, input checks, and (ignored, with RAFT_FULL_CHECK_DIR)
//! the full-size raft_small with torchvision's default random init.

use crate::common;

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use sdstream::model::raft::{Config, Raft};

/// `tests/fixtures/<rel>` at the workspace root, or `$SDSTREAM_FIXTURES/<rel>`.
/// The narrow random-weight net, where the model root tests/fixtures/model-root finds it under
/// raft_small's torchvision file name.
const NARROW: &str = "model-root/torchvision/raft_small/raft_small_C_T_V2-01064c6d.safetensors";

fn fixture(rel: &str) -> PathBuf {
    common::fixture(rel)
}

fn load(path: &std::path::Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(path, &Device::Cpu)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

/// Tensor name → dims, as read from a state dict.
type Shapes = HashMap<String, Vec<usize>>;

fn shapes_of(tensors: &HashMap<String, Tensor>) -> Shapes {
    tensors
        .iter()
        .map(|(k, v)| (k.clone(), v.dims().to_vec()))
        .collect()
}

/// The network from a safetensors file, its config read from the tensor shapes.
fn load_raft(path: &std::path::Path) -> (Config, Raft) {
    let tensors = load(path);
    let config = Config::from_tensor_shapes(&shapes_of(&tensors)).unwrap();
    let vb = VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu);
    let raft = Raft::new(&config, vb).unwrap();
    (config, raft)
}

/// torchvision's OpticalFlow preset on a uint8 `[3, H, W]` image, in its order of operations:
/// x/255, then (x − 0.5)/0.5; returned as `[1, 3, H, W]`.
fn preset(image: &Tensor) -> Tensor {
    let dims = image.dims().to_vec();
    let bytes = image.flatten_all().unwrap().to_vec1::<u8>().unwrap();
    let values: Vec<f32> = bytes
        .iter()
        .map(|&b| (b as f32 / 255.0 - 0.5) / 0.5)
        .collect();
    Tensor::from_vec(values, dims, &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap()
}

/// (max |a − b| / max |b|, mean |a − b|, max |b|).
fn errors(ours: &Tensor, reference: &Tensor) -> (f32, f32, f32) {
    assert_eq!(ours.dims(), reference.dims());
    let diff = (ours - reference).unwrap().abs().unwrap();
    let max_diff = diff.max_all().unwrap().to_scalar::<f32>().unwrap();
    let mean_diff = diff.mean_all().unwrap().to_scalar::<f32>().unwrap();
    let scale = common::max_magnitude(reference);
    (max_diff / scale, mean_diff, scale)
}

/// The narrow fixture's widths (tests/reference/make_raft_fixtures.py, NARROW).
fn narrow_config() -> Config {
    Config {
        feature_encoder_layers: [8, 8, 12, 16, 24],
        context_encoder_layers: [8, 8, 12, 16, 28],
        corr_levels: 4,
        corr_radius: 3,
        motion_corr_channels: 24,
        motion_flow_channels: [16, 8],
        motion_out_channels: 22,
        hidden_state_size: 16,
        gru_kernel_size: 3,
        flow_head_hidden_size: 24,
    }
}

#[test]
fn default_config_is_raft_small() {
    let shapes = Config::default().tensor_shapes();
    // torchvision's Raft_Small_Weights meta: num_params 990162.
    let params: usize = shapes
        .iter()
        .map(|(_, s)| s.iter().product::<usize>())
        .sum();
    assert_eq!(params, 990_162);
    let map: HashMap<String, Vec<usize>> = shapes.into_iter().collect();
    assert_eq!(Config::from_tensor_shapes(&map).unwrap(), Config::default());
    assert_eq!(
        map["update_block.recurrent_block.convgru1.convz.weight"],
        vec![96, 242, 3, 3]
    );
}

#[test]
fn config_read_from_narrow_state_dict() {
    let shapes = shapes_of(&load(&fixture(NARROW)));
    assert_eq!(
        Config::from_tensor_shapes(&shapes).unwrap(),
        narrow_config()
    );
}

#[test]
fn config_refuses_what_does_not_fit() {
    let base = shapes_of(&load(&fixture(NARROW)));
    let refuse = |edit: &dyn Fn(&mut Shapes), needle: &str| {
        let mut shapes = base.clone();
        edit(&mut shapes);
        let err = Config::from_tensor_shapes(&shapes).unwrap_err().to_string();
        assert!(
            err.contains(needle),
            "error {err:?} does not name {needle:?}"
        );
    };
    let missing = "feature_encoder.layer2.1.convnormrelu2.0.bias";
    refuse(&|s| drop(s.remove(missing)), missing);
    let reshaped = "context_encoder.layer3.0.downsample.0.weight";
    refuse(&|s| s.get_mut(reshaped).unwrap()[1] += 1, reshaped);
    let extra = "mask_predictor.conv.weight";
    refuse(
        &|s| drop(s.insert(extra.into(), vec![576, 16, 1, 1])),
        extra,
    );
    let norm = "feature_encoder.convnormrelu.1.running_mean";
    refuse(&|s| drop(s.insert(norm.into(), vec![8])), norm);
    let corr = "update_block.motion_encoder.convcorr1.0.weight";
    refuse(&|s| s.get_mut(corr).unwrap()[1] = 150, corr);
    let gru = "update_block.recurrent_block.convgru1.convr.weight";
    refuse(&|s| s.get_mut(gru).unwrap()[1] -= 1, gru);
}

#[test]
fn narrow_flows_match_torchvision() {
    let (_, raft) = load_raft(&fixture(NARROW));
    let goldens = load(&fixture("raft/raft_narrow_flows.safetensors"));
    for (pair, iterations) in [("square", &[1usize, 2, 12][..]), ("wide", &[1, 12][..])] {
        let image1 = preset(&goldens[&format!("{pair}.image1")]);
        let image2 = preset(&goldens[&format!("{pair}.image2")]);
        let flows = raft.forward(&image1, &image2, 12).unwrap();
        assert_eq!(flows.len(), 12);
        for &i in iterations {
            let reference = &goldens[&format!("{pair}.flow.{i}")];
            let (rel_max, mean, scale) = errors(&flows[i - 1], reference);
            println!(
                "{pair} {:?} iteration {i}: max|err|/max|flow| {rel_max:.2e}, mean|err| {mean:.2e} px, max|flow| {scale:.3} px",
                reference.dims()
            );
            assert!(
                rel_max <= 1e-4,
                "{pair} iteration {i}: relative max error {rel_max}"
            );
            assert!(scale > 1.0, "{pair} iteration {i}: trivial reference flow");
        }
    }
}

#[test]
fn first_iteration_does_not_depend_on_the_count() {
    let (_, raft) = load_raft(&fixture(NARROW));
    let goldens = load(&fixture("raft/raft_narrow_flows.safetensors"));
    let image1 = preset(&goldens["square.image1"]);
    let image2 = preset(&goldens["square.image2"]);
    let one = raft.forward(&image1, &image2, 1).unwrap();
    let three = raft.forward(&image1, &image2, 3).unwrap();
    assert_eq!((one.len(), three.len()), (1, 3));
    let (rel_max, _, _) = errors(&one[0], &three[0]);
    assert!(
        rel_max <= 1e-6,
        "first flow changed with the count: {rel_max}"
    );
}

#[test]
fn refuses_unusable_inputs() {
    let (_, raft) = load_raft(&fixture(NARROW));
    let image = |h: usize, w: usize| Tensor::zeros((1, 3, h, w), DType::F32, &Device::Cpu).unwrap();
    for (a, b, needle) in [
        (image(128, 132), image(128, 132), "multiples of 8"),
        (image(120, 128), image(120, 128), "at least 128"),
        (image(128, 128), image(128, 136), "differ in shape"),
    ] {
        let err = raft.forward(&a, &b, 1).unwrap_err().to_string();
        assert!(err.contains(needle), "{err:?} lacks {needle:?}");
    }
    let grey = Tensor::zeros((1, 1, 128, 128), DType::F32, &Device::Cpu).unwrap();
    assert!(raft.forward(&grey, &grey, 1).is_err());
}

/// Full-size raft_small with torchvision's default random init (seed 0) on a 128×128 pair,
/// written by tests/reference/make_raft_full_check.py into the folder RAFT_FULL_CHECK_DIR names
/// (4 MB of weights, not committed). Ignored: run with `-- --ignored full_size`.
#[test]
#[ignore]
fn full_size_raft_small_matches_torchvision() {
    let dir = std::env::var_os("RAFT_FULL_CHECK_DIR")
        .expect("set RAFT_FULL_CHECK_DIR to the folder make_raft_full_check.py wrote");
    let dir = PathBuf::from(dir);
    let (config, raft) = load_raft(&dir.join("raft_small_random.safetensors"));
    assert_eq!(config, Config::default());
    let goldens = load(&dir.join("flows.safetensors"));
    let image1 = preset(&goldens["image1"]);
    let image2 = preset(&goldens["image2"]);
    let flows = raft.forward(&image1, &image2, 12).unwrap();
    for (i, flow) in flows.iter().enumerate() {
        let (rel_max, mean, scale) = errors(flow, &goldens[&format!("flow.{}", i + 1)]);
        println!(
            "raft_small iteration {}: max|err|/max|flow| {rel_max:.2e}, mean|err| {mean:.2e} px, max|flow| {scale:.3} px",
            i + 1
        );
        assert!(rel_max <= 1e-4, "iteration {}: {rel_max}", i + 1);
    }
}

/// Time of a 512×512 pair through full-size raft_small (random weights, f32, CPU).
#[test]
#[ignore]
fn bench_raft_small_512() {
    let device = Device::Cpu;
    let config = Config::default();
    let tensors: HashMap<String, Tensor> = config
        .tensor_shapes()
        .into_iter()
        .map(|(name, shape)| {
            let fan_in: usize = shape.iter().skip(1).product::<usize>().max(1);
            let std = (2.0 / fan_in as f64).sqrt() as f32;
            (name, Tensor::randn(0f32, std, shape, &device).unwrap())
        })
        .collect();
    let raft = Raft::new(
        &config,
        VarBuilder::from_tensors(tensors, DType::F32, &device),
    )
    .unwrap();
    let image1 = Tensor::rand(-1f32, 1f32, (1, 3, 512, 512), &device).unwrap();
    let image2 = Tensor::rand(-1f32, 1f32, (1, 3, 512, 512), &device).unwrap();
    raft.forward(&image1, &image2, 1).unwrap();
    for updates in [12, 1] {
        let mut times = Vec::new();
        for _ in 0..3 {
            let start = Instant::now();
            let flows = raft.forward(&image1, &image2, updates).unwrap();
            flows
                .last()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            times.push(start.elapsed().as_secs_f64() * 1e3);
        }
        times.sort_by(f64::total_cmp);
        println!(
            "raft_small 512x512, {updates} updates: {:.0} ms (median of 3; {times:.0?})",
            times[1]
        );
    }
}

/// In half precision the convolutions round, but the pyramid, the lookup and the coordinates
/// stay f32 and the result stays close to torchvision's f32 flow. (F16 only: candle's own CPU
/// convolution, which the scratch shim uses, has no bf16 matmul.)
#[test]
fn half_precision_stays_close() {
    let tensors = load(&fixture(NARROW));
    let config = Config::from_tensor_shapes(&shapes_of(&tensors)).unwrap();
    let goldens = load(&fixture("raft/raft_narrow_flows.safetensors"));
    let image1 = preset(&goldens["square.image1"]);
    let image2 = preset(&goldens["square.image2"]);
    for dtype in [DType::F16] {
        let vb = VarBuilder::from_tensors(tensors.clone(), dtype, &Device::Cpu);
        let raft = Raft::new(&config, vb).unwrap();
        let flows = raft.forward(&image1, &image2, 12).unwrap();
        for (i, bound) in [(1usize, 2e-2f32), (12, 2e-2)] {
            assert_eq!(flows[i - 1].dtype(), DType::F32);
            let (rel_max, mean, _) = errors(&flows[i - 1], &goldens[&format!("square.flow.{i}")]);
            println!(
                "{dtype:?} iteration {i}: max|err|/max|flow| {rel_max:.2e}, mean|err| {mean:.2e} px"
            );
            assert!(rel_max <= bound, "{dtype:?} iteration {i}: {rel_max}");
        }
    }
}
