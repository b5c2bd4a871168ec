//! torchvision's `flow_to_image` for one flow field: the colour picture of optical flow that
//! Daydream's `temporal_net_tensorrt` hands to TemporalNet2 (docs/PREPROCESSORS.md).
//!
//! Per pixel, in f32 and in torchvision's order of operations:
//! 1. every vector divided by (the largest vector length in the field + f32 epsilon), so the
//!    longest has length just under 1 (scaling the whole field therefore changes nothing but
//!    epsilon's share, which is why Daydream's `flow_strength` has no visible effect);
//! 2. the direction `atan2(−v, −u)/π ∈ [−1, 1]` mapped to a position `fk ∈ [0, 54]` on the
//!    55-entry Middlebury colour wheel (Baker et al., ICCV 2007), interpolated linearly between
//!    entries `⌊fk⌋` and the next (wrapping to entry 0);
//! 3. each channel faded towards white by the length r: `1 − r·(1 − colour)`;
//! 4. `⌊255·value⌋` converted to a byte the way torch converts float to uint8 (through a
//!    32-bit integer, so −1 wraps to 255; this happens to a zero channel when rounding leaves the
//!    longest vector's length a hair above 1, and torchvision shows it too).
//!
//! The square root and `atan2` are correctly rounded (`atan2` evaluated in f64, then rounded).
//! torch's own float32 kernels for them on the CPU are up to 1 ulp off (about 20 % and 2 % of
//! values on the reference machine), and CUDA's `atan2f` is not correctly rounded either, so
//! the goldens run torchvision's function with correctly rounded ones swapped in; against those
//! the bytes here are identical. Against torch's unmodified CPU call, a byte differs only where
//! a value lies on an integer boundary: by one for a longest vector pointing exactly at a wheel
//! entry, or 255 against 0 where one side rounds a length to exactly 1 and the other to just
//! above it (14 of 76 638 golden bytes, all in cases built to land there).

use candle_core::{DType, Tensor};

/// Lengths of the wheel's six hue ramps: red→yellow, yellow→green, green→cyan, cyan→blue,
/// blue→magenta, magenta→red.
const RAMPS: [usize; 6] = [15, 6, 4, 11, 13, 6];

/// Entries of the colour wheel.
const WHEEL_SIZE: usize = 55;

/// The Middlebury colour wheel as torchvision builds it: along each ramp one channel steps by
/// ⌊255·i/n⌋ while the others stay at 0 or 255.
pub fn color_wheel() -> [[u8; 3]; WHEEL_SIZE] {
    let mut wheel = [[0u8; 3]; WHEEL_SIZE];
    let mut entry = 0;
    for (ramp, &n) in RAMPS.iter().enumerate() {
        for i in 0..n {
            let up = (255 * i / n) as u8;
            let down = 255 - up;
            wheel[entry] = match ramp {
                0 => [255, up, 0],
                1 => [down, 255, 0],
                2 => [0, 255, up],
                3 => [0, down, 255],
                4 => [up, 0, 255],
                _ => [255, 0, down],
            };
            entry += 1;
        }
    }
    wheel
}

/// Colours a flow field as `torchvision.utils.flow_to_image` does for one `(2, H, W)` flow.
///
/// `flow_u` and `flow_v` are the x and y displacements, row-major `height × width` each (the two
/// planes of a `[2, H, W]` tensor). Returns **planar** RGB, `[3, H, W]` row-major (all red, then
/// all green, then all blue), as torchvision's `(3, H, W)` uint8 tensor. The normalisation is
/// over this one field (torchvision normalises a batch by its overall maximum: call this per
/// frame to match a batch of one).
///
/// # Panics
/// If either plane does not hold `height · width` values.
pub fn flow_to_rgb8(flow_u: &[f32], flow_v: &[f32], height: usize, width: usize) -> Vec<u8> {
    let n = height * width;
    assert_eq!(
        flow_u.len(),
        n,
        "flow_to_rgb8: u plane is not {height}×{width}"
    );
    assert_eq!(
        flow_v.len(),
        n,
        "flow_to_rgb8: v plane is not {height}×{width}"
    );
    let wheel = color_wheel();
    let length = |u: f32, v: f32| (u * u + v * v).sqrt();
    let max_length = flow_u
        .iter()
        .zip(flow_v)
        .map(|(&u, &v)| length(u, v))
        .fold(0.0f32, f32::max);
    let scale = max_length + f32::EPSILON;
    let last = (WHEEL_SIZE - 1) as f32;
    let mut rgb = vec![0u8; 3 * n];
    for (i, (&u, &v)) in flow_u.iter().zip(flow_v).enumerate() {
        let (u, v) = (u / scale, v / scale);
        let radius = length(u, v);
        let angle = ((-v) as f64).atan2((-u) as f64) as f32 / std::f32::consts::PI;
        let position = (angle + 1.0) / 2.0 * last;
        let below = position.floor();
        let frac = position - below;
        // `below` is in [0, 54] for every finite angle; the clamp only guards the indexing.
        let k0 = (below.max(0.0) as usize).min(WHEEL_SIZE - 1);
        let k1 = (k0 + 1) % WHEEL_SIZE;
        for c in 0..3 {
            let col0 = wheel[k0][c] as f32 / 255.0;
            let col1 = wheel[k1][c] as f32 / 255.0;
            let colour = (1.0 - frac) * col0 + frac * col1;
            let faded = 1.0 - radius * (1.0 - colour);
            // torch's float → uint8: through int32, keeping the low byte.
            rgb[c * n + i] = (255.0 * faded).floor() as i32 as u8;
        }
    }
    rgb
}

/// [`flow_to_rgb8`] for a flow tensor `[2, H, W]` or `[1, 2, H, W]` on any device (copied to the
/// host as f32); returns planar `[3, H, W]` RGB bytes.
pub fn flow_tensor_to_rgb8(flow: &Tensor) -> candle_core::Result<Vec<u8>> {
    let flow = match flow.rank() {
        4 if flow.dim(0)? == 1 => flow.squeeze(0)?,
        _ => flow.clone(),
    };
    let (channels, height, width) = flow.dims3()?;
    if channels != 2 {
        candle_core::bail!(
            "flow_tensor_to_rgb8: expected a [2, H, W] flow, got {:?}",
            flow.dims()
        );
    }
    let flow = flow.to_dtype(DType::F32)?;
    let u = flow.get(0)?.flatten_all()?.to_vec1::<f32>()?;
    let v = flow.get(1)?.flatten_all()?.to_vec1::<f32>()?;
    Ok(flow_to_rgb8(&u, &v, height, width))
}
