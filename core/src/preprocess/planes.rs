//! Planar f32 images (channel-major, like a `[C, H, W]` tensor) and the zero-padded
//! correlations the filters are built from. Daydream's processors are torch `conv2d` calls with
//! `padding = k // 2` (zeros outside the image, cross-correlation, not a flipped convolution);
//! these helpers compute the same sums in tight loops over whole rows.

use candle_core::{DType, Device, Tensor};

use crate::{Error, Result};

/// A [0, 1] value as the 8-bit level it came from: `round(255·v)`, clamped. Daydream truncates
/// `255·v` (its torch → PIL step); on frames that came from 8-bit pixels both give the original
/// level, and rounding keeps it when the value went through float arithmetic on the way (our
/// frames arrive as [−1, 1] and are mapped back).
pub fn to_u8(v: f32) -> u8 {
    (v * 255.0 + 0.5).clamp(0.0, 255.0) as u8
}

/// A `[C, H, W]` f32 image in one buffer.
#[derive(Debug, Clone, PartialEq)]
pub struct Planes {
    /// Channels.
    pub channels: usize,
    /// Rows.
    pub height: usize,
    /// Columns.
    pub width: usize,
    /// `channels * height * width` values, channel-major then row-major.
    pub data: Vec<f32>,
}

impl Planes {
    /// A zero image.
    pub fn zeros(channels: usize, height: usize, width: usize) -> Self {
        Planes {
            channels,
            height,
            width,
            data: vec![0.0; channels * height * width],
        }
    }

    /// Reads a `[1, C, H, W]` tensor (any float dtype, any device) into host memory.
    pub fn from_tensor(image: &Tensor) -> Result<Self> {
        let &[1, channels, height, width] = image.dims() else {
            return Err(Error::InvalidFrame(format!(
                "an image processor expects a [1, C, H, W] tensor, got {:?}",
                image.dims()
            )));
        };
        let data = image
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        Ok(Planes {
            channels,
            height,
            width,
            data,
        })
    }

    /// The image as a `[1, C, H, W]` f32 tensor on `device`.
    pub fn into_tensor(self, device: &Device) -> Result<Tensor> {
        let shape = (1, self.channels, self.height, self.width);
        Ok(Tensor::from_vec(self.data, shape, device)?)
    }

    /// Pixels per channel.
    pub fn plane_len(&self) -> usize {
        self.height * self.width
    }

    /// Channel `c`.
    pub fn plane(&self, c: usize) -> &[f32] {
        let n = self.plane_len();
        &self.data[c * n..(c + 1) * n]
    }

    /// The image with each channel replaced by `f(channel) -> channel` (same size).
    pub fn map_planes(&self, mut f: impl FnMut(&[f32], &mut [f32])) -> Planes {
        let mut out = Planes::zeros(self.channels, self.height, self.width);
        let n = self.plane_len();
        for (src, dst) in self.data.chunks_exact(n).zip(out.data.chunks_exact_mut(n)) {
            f(src, dst);
        }
        out
    }

    /// Clamps every value to [0, 1].
    pub fn clamp_unit(&mut self) {
        for v in &mut self.data {
            *v = v.clamp(0.0, 1.0);
        }
    }
}

/// `dst = correlate(src, kernel)` over one `height × width` plane with zeros outside it; the
/// kernel is `kh × kw` (odd sizes), row-major, centred. Overwrites `dst`.
pub fn correlate(
    src: &[f32],
    height: usize,
    width: usize,
    kernel: &[f32],
    kh: usize,
    kw: usize,
    dst: &mut [f32],
) {
    dst.fill(0.0);
    let (ry, rx) = ((kh / 2) as isize, (kw / 2) as isize);
    for y in 0..height {
        let out = &mut dst[y * width..(y + 1) * width];
        for ky in 0..kh {
            let sy = y as isize + ky as isize - ry;
            if sy < 0 || sy >= height as isize {
                continue;
            }
            let row = &src[sy as usize * width..(sy as usize + 1) * width];
            for kx in 0..kw {
                let k = kernel[ky * kw + kx];
                if k == 0.0 {
                    continue;
                }
                accumulate_shifted(out, row, kx as isize - rx, k);
            }
        }
    }
}

/// `dst = correlate(src, outer(kernel_y, kernel_x))`, computed as two 1-D passes (rows, then
/// columns) with zeros outside the plane, which is the same sum as the 2-D zero-padded kernel.
/// `scratch` holds the intermediate plane. Overwrites `dst`.
pub fn correlate_separable(
    src: &[f32],
    height: usize,
    width: usize,
    kernel_y: &[f32],
    kernel_x: &[f32],
    scratch: &mut Vec<f32>,
    dst: &mut [f32],
) {
    scratch.clear();
    scratch.resize(height * width, 0.0);
    let rx = (kernel_x.len() / 2) as isize;
    for (src_row, tmp_row) in src.chunks_exact(width).zip(scratch.chunks_exact_mut(width)) {
        for (kx, &k) in kernel_x.iter().enumerate() {
            accumulate_shifted(tmp_row, src_row, kx as isize - rx, k);
        }
    }
    dst.fill(0.0);
    let ry = (kernel_y.len() / 2) as isize;
    for y in 0..height {
        let out = &mut dst[y * width..(y + 1) * width];
        for (ky, &k) in kernel_y.iter().enumerate() {
            let sy = y as isize + ky as isize - ry;
            if sy < 0 || sy >= height as isize {
                continue;
            }
            let row = &scratch[sy as usize * width..(sy as usize + 1) * width];
            for (o, &v) in out.iter_mut().zip(row) {
                *o += k * v;
            }
        }
    }
}

/// [`correlate`] as a tensor operation on the map's own device, for the processors a GPU runs
/// where the frame is (unless `SDSTREAM_CUDA_PREPROCESS=0`): every image of `x`
/// (`[N, 1, H, W]` f32) correlated with the `kh × kw` kernel (odd sizes, row-major) and zeros
/// outside, through sdstream's convolution (f32 sums, plain FMA math on a GPU, no TF32). Its
/// sums run in another order than [`correlate`]'s, so the two agree to rounding, not to the bit.
pub fn correlate_tensor(
    x: &Tensor,
    kernel: &[f32],
    kh: usize,
    kw: usize,
) -> candle_core::Result<Tensor> {
    correlate_padded_tensor(x, kernel, kh, kw, (kh / 2, kw / 2))
}

/// [`correlate_tensor`] with `padding` = (rows, columns) of zeros on each side instead of half
/// the kernel's: (0, 0) keeps only the outputs whose window lies inside `x`, which shrinks the
/// map by `kh − 1` rows and `kw − 1` columns (for a map padded beforehand its own way).
pub fn correlate_padded_tensor(
    x: &Tensor,
    kernel: &[f32],
    kh: usize,
    kw: usize,
    padding: (usize, usize),
) -> candle_core::Result<Tensor> {
    use crate::model::kernels::conv::{Conv2d, Padding};
    use candle_core::Module;
    let weight = Tensor::from_slice(kernel, (1, 1, kh, kw), x.device())?;
    let padding = Padding {
        top: padding.0,
        bottom: padding.0,
        left: padding.1,
        right: padding.1,
    };
    Conv2d::from_tensors(weight, None, 1, padding)?.forward(x)
}

/// [`correlate_separable`] as tensor operations ([`correlate_tensor`]): along the rows with
/// `kernel_x`, then along the columns with `kernel_y`, the host's order of the passes.
pub fn correlate_separable_tensor(
    x: &Tensor,
    kernel_y: &[f32],
    kernel_x: &[f32],
) -> candle_core::Result<Tensor> {
    let padding = (kernel_y.len() / 2, kernel_x.len() / 2);
    correlate_separable_padded_tensor(x, kernel_y, kernel_x, padding)
}

/// [`correlate_separable_tensor`] with `padding` = (rows, columns) of zeros on each side
/// instead of half the kernels' ([`correlate_padded_tensor`]; (0, 0) for a map padded its own
/// way beforehand).
pub fn correlate_separable_padded_tensor(
    x: &Tensor,
    kernel_y: &[f32],
    kernel_x: &[f32],
    padding: (usize, usize),
) -> candle_core::Result<Tensor> {
    let rows = correlate_padded_tensor(x, kernel_x, 1, kernel_x.len(), (0, padding.1))?;
    correlate_padded_tensor(&rows, kernel_y, kernel_y.len(), 1, (padding.0, 0))
}

/// `f` over every channel of `image` (`[B, C, H, W]`, any float dtype) as its own `[1, H, W]`
/// image in f32, the tensor twin of [`Planes::map_planes`]: the channels become the batch of a
/// one-channel map, so one convolution filters them all. Returns `[B, C, H', W']` f32, the size
/// `f` makes.
pub fn map_channels_tensor(
    image: &Tensor,
    f: impl FnOnce(&Tensor) -> candle_core::Result<Tensor>,
) -> candle_core::Result<Tensor> {
    let (b, c, h, w) = image.dims4()?;
    let x = image
        .to_dtype(DType::F32)?
        .contiguous()?
        .reshape((b * c, 1, h, w))?;
    let y = f(&x)?;
    let (_, _, out_h, out_w) = y.dims4()?;
    y.reshape((b, c, out_h, out_w))
}

/// `out[x] += k * row[x + shift]` wherever `x + shift` is inside the row (zeros elsewhere).
fn accumulate_shifted(out: &mut [f32], row: &[f32], shift: isize, k: f32) {
    let width = row.len() as isize;
    let x0 = (-shift).clamp(0, width) as usize;
    let x1 = (width - shift).clamp(0, width) as usize;
    if x0 >= x1 {
        return;
    }
    let src = &row[(x0 as isize + shift) as usize..(x1 as isize + shift) as usize];
    for (o, &v) in out[x0..x1].iter_mut().zip(src) {
        *o += k * v;
    }
}

/// The normalized 1-D Gaussian of `size` taps (centred at `(size − 1)/2`) with standard deviation
/// `sigma`. Its outer product with itself is the normalized 2-D kernel Daydream builds
/// (`exp(−(x² + y²)/(2σ²))`, divided by its sum), because that kernel factors exactly.
pub fn gaussian_taps(size: usize, sigma: f64) -> Vec<f32> {
    let centre = (size as f64 - 1.0) / 2.0;
    let raw: Vec<f64> = (0..size)
        .map(|i| {
            let d = i as f64 - centre;
            (-(d * d) / (2.0 * sigma * sigma)).exp()
        })
        .collect();
    let sum: f64 = raw.iter().sum();
    raw.iter().map(|v| (v / sum) as f32).collect()
}

/// A fixed sine hash of `i` in [0, 1): test inputs that are the same every run.
#[cfg(test)]
pub(crate) fn sine_hash(i: usize) -> f32 {
    ((i as f32 * 12.9898).sin() * 43_758.547).fract().abs()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The direct 2-D zero-padded correlation, one pixel at a time.
    fn naive(src: &[f32], h: usize, w: usize, k: &[f32], kh: usize, kw: usize) -> Vec<f32> {
        let mut out = vec![0.0; h * w];
        for y in 0..h {
            for x in 0..w {
                let mut s = 0.0;
                for ky in 0..kh {
                    for kx in 0..kw {
                        let sy = y as isize + ky as isize - (kh / 2) as isize;
                        let sx = x as isize + kx as isize - (kw / 2) as isize;
                        if sy >= 0 && sx >= 0 && (sy as usize) < h && (sx as usize) < w {
                            s += k[ky * kw + kx] * src[sy as usize * w + sx as usize];
                        }
                    }
                }
                out[y * w + x] = s;
            }
        }
        out
    }

    #[test]
    fn row_passes_equal_the_direct_sum_including_kernels_wider_than_the_image() {
        let (h, w) = (5, 7);
        let src: Vec<f32> = (0..h * w).map(|i| ((i * 37) % 11) as f32 / 10.0).collect();
        for (kh, kw) in [(3, 3), (1, 9), (9, 5), (11, 11)] {
            let k: Vec<f32> = (0..kh * kw).map(|i| (i as f32 * 0.37).sin()).collect();
            let mut got = vec![0.0; h * w];
            correlate(&src, h, w, &k, kh, kw, &mut got);
            let want = naive(&src, h, w, &k, kh, kw);
            for (a, b) in got.iter().zip(&want) {
                assert!((a - b).abs() < 1e-5, "{kh}x{kw}: {a} vs {b}");
            }
        }
        let ky = [0.25f32, 0.5, 0.25];
        let kx = [0.1f32, 0.2, 0.4, 0.2, 0.1];
        let outer: Vec<f32> = ky
            .iter()
            .flat_map(|a| kx.iter().map(move |b| a * b))
            .collect();
        let mut got = vec![0.0; h * w];
        correlate_separable(&src, h, w, &ky, &kx, &mut Vec::new(), &mut got);
        let want = naive(&src, h, w, &outer, 3, 5);
        for (a, b) in got.iter().zip(&want) {
            assert!((a - b).abs() < 1e-6, "separable: {a} vs {b}");
        }
    }
}
