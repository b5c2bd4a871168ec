//! Frames as hosts hand them over: pixel formats, strides, sizes, and the conversions between
//! host pixels and the network's tensors.
//!
//! Input follows the reference's path exactly: an RGB u8 image is resized to the working size with
//! PIL's Lanczos filter (what diffusers' `VaeImageProcessor.preprocess` does with a PIL image),
//! scaled to [0, 1] with `u / 255` and to [−1, 1] with `2x − 1`, all in f32. Output is
//! StreamDiffusion's `numpy_to_pil`: `(x · 255).round()` with ties to even, as u8.

use candle_core::{DType, Device, Tensor};

use crate::model::kernels::{self, transfer};
use crate::model::resize::{resize_rgb_f32_lanczos, resize_rgb8_lanczos};
use crate::{Error, Result};

/// How the pixels of a frame are laid out in memory. Channels are interleaved; rows are `stride`
/// bytes apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PixelFormat {
    /// 3 bytes per pixel: red, green, blue.
    Rgb8,
    /// 4 bytes per pixel: red, green, blue, alpha (alpha is ignored on input, 255 on output).
    Rgba8,
    /// 4 bytes per pixel: blue, green, red, alpha (alpha is ignored on input, 255 on output).
    Bgra8,
    /// 12 bytes per pixel: red, green, blue as native-endian f32 in [0, 1].
    RgbF32,
}

impl PixelFormat {
    /// Bytes one pixel occupies.
    pub fn bytes_per_pixel(self) -> usize {
        match self {
            PixelFormat::Rgb8 => 3,
            PixelFormat::Rgba8 | PixelFormat::Bgra8 => 4,
            PixelFormat::RgbF32 => 12,
        }
    }

    /// Number of channels stored per pixel (alpha included).
    pub fn channels(self) -> usize {
        match self {
            PixelFormat::Rgb8 | PixelFormat::RgbF32 => 3,
            PixelFormat::Rgba8 | PixelFormat::Bgra8 => 4,
        }
    }

    /// Positions of red, green and blue within a pixel, in channels.
    pub fn rgb_order(self) -> [usize; 3] {
        match self {
            PixelFormat::Rgb8 | PixelFormat::Rgba8 | PixelFormat::RgbF32 => [0, 1, 2],
            PixelFormat::Bgra8 => [2, 1, 0],
        }
    }

    /// Short lowercase name (`rgb8`, `rgba8`, `bgra8`, `rgbf32`).
    pub fn name(self) -> &'static str {
        match self {
            PixelFormat::Rgb8 => "rgb8",
            PixelFormat::Rgba8 => "rgba8",
            PixelFormat::Bgra8 => "bgra8",
            PixelFormat::RgbF32 => "rgbf32",
        }
    }
}

impl std::fmt::Display for PixelFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A borrowed image in host memory: `height` rows of `width` pixels, rows `stride` bytes apart.
///
/// Construct with [`Frame::new`] (or [`Frame::packed`]), which checks that the buffer holds every
/// row; the last row need not be padded to the full stride.
#[derive(Debug, Clone, Copy)]
pub struct Frame<'a> {
    data: &'a [u8],
    width: usize,
    height: usize,
    stride: usize,
    format: PixelFormat,
}

/// Largest width or height of a frame: 16K. Frames are resized to the stream's size, and the
/// resize's work per output pixel grows with the input's size, so an absurd size must be
/// refused before anything is copied or allocated for it.
pub const MAX_FRAME_SIDE: usize = 16_384;

/// Most bytes one frame may span (a 16K × 16K RGB f32 frame fits).
pub const MAX_FRAME_BYTES: usize = 4 << 30;

/// The one size rule every frame obeys, on every surface (Rust, C, Python, WebRTC): width and
/// height in 1..=[`MAX_FRAME_SIDE`], `stride ≥ width · bytes_per_pixel`, and the bytes it spans,
/// `stride · (height − 1) + width · bytes_per_pixel` (the last row need not be padded), at most
/// [`MAX_FRAME_BYTES`]. Returns that byte count.
pub fn frame_len(width: usize, height: usize, stride: usize, format: PixelFormat) -> Result<usize> {
    if width == 0 || height == 0 {
        return Err(Error::InvalidFrame(format!(
            "size {width}x{height}: width and height must be non-zero"
        )));
    }
    if width > MAX_FRAME_SIDE || height > MAX_FRAME_SIDE {
        return Err(Error::InvalidFrame(format!(
            "size {width}x{height}: width and height must be at most {MAX_FRAME_SIDE}"
        )));
    }
    let bpp = format.bytes_per_pixel();
    let row_bytes = width * bpp;
    if stride < row_bytes {
        return Err(Error::InvalidFrame(format!(
            "stride {stride} is less than width {width} x {bpp} bytes per pixel ({format}) = {row_bytes}"
        )));
    }
    stride
        .checked_mul(height - 1)
        .and_then(|n| n.checked_add(row_bytes))
        .filter(|&n| n <= MAX_FRAME_BYTES)
        .ok_or_else(|| {
            Error::InvalidFrame(format!(
                "a {width}x{height} {format} frame with stride {stride} spans more than \
                 {MAX_FRAME_BYTES} bytes"
            ))
        })
}

impl<'a> Frame<'a> {
    /// Describes `data` as a frame, checking sizes with [`frame_len`] and that `data` holds
    /// that many bytes.
    pub fn new(
        data: &'a [u8],
        width: usize,
        height: usize,
        stride: usize,
        format: PixelFormat,
    ) -> Result<Self> {
        let needed = frame_len(width, height, stride, format)?;
        if data.len() < needed {
            let bpp = format.bytes_per_pixel();
            return Err(Error::InvalidFrame(format!(
                "{width}x{height} {format} frame with stride {stride} needs {needed} bytes \
                 (stride x (height - 1) + width x {bpp}), got {}",
                data.len()
            )));
        }
        Ok(Self {
            data,
            width,
            height,
            stride,
            format,
        })
    }

    /// A frame whose rows are packed (`stride = width · bytes_per_pixel`).
    pub fn packed(
        data: &'a [u8],
        width: usize,
        height: usize,
        format: PixelFormat,
    ) -> Result<Self> {
        let stride = width.saturating_mul(format.bytes_per_pixel());
        Self::new(data, width, height, stride, format)
    }

    /// Width in pixels.
    pub fn width(&self) -> usize {
        self.width
    }

    /// Height in pixels.
    pub fn height(&self) -> usize {
        self.height
    }

    /// Bytes from the start of one row to the start of the next.
    pub fn stride(&self) -> usize {
        self.stride
    }

    /// Pixel layout.
    pub fn format(&self) -> PixelFormat {
        self.format
    }

    /// The underlying bytes (rows `stride` apart).
    pub fn data(&self) -> &'a [u8] {
        self.data
    }

    /// The pixel bytes of row `y` (`width · bytes_per_pixel` bytes, without padding).
    /// `y` must be below the height (checked by the constructor's size validation).
    fn row(&self, y: usize) -> &'a [u8] {
        let start = y * self.stride;
        &self.data[start..start + self.width * self.format.bytes_per_pixel()]
    }

    /// Packed RGB u8 (`width · height · 3` bytes). Alpha is dropped; an `RgbF32` frame is
    /// quantised as the output path does (`round(x · 255)`, ties to even, clamped).
    pub fn to_rgb8(self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.width * self.height * 3);
        let [r, g, b] = self.format.rgb_order();
        for y in 0..self.height {
            let row = self.row(y);
            match self.format {
                PixelFormat::RgbF32 => {
                    for px in row.chunks_exact(4) {
                        out.push(quantize_unit(f32::from_ne_bytes([
                            px[0], px[1], px[2], px[3],
                        ])));
                    }
                }
                _ => {
                    for px in row.chunks_exact(self.format.bytes_per_pixel()) {
                        out.extend_from_slice(&[px[r], px[g], px[b]]);
                    }
                }
            }
        }
        out
    }

    /// Packed RGB f32 in [0, 1] (`width · height · 3` values): `u / 255` for u8 formats, the values
    /// themselves for `RgbF32`.
    fn to_rgb_f32(self) -> Vec<f32> {
        match self.format {
            PixelFormat::RgbF32 => {
                let mut out = Vec::with_capacity(self.width * self.height * 3);
                for y in 0..self.height {
                    for px in self.row(y).chunks_exact(4) {
                        out.push(f32::from_ne_bytes([px[0], px[1], px[2], px[3]]));
                    }
                }
                out
            }
            _ => self
                .to_rgb8()
                .into_iter()
                .map(|u| u as f32 / 255.0)
                .collect(),
        }
    }

    /// The network input: an f32 tensor `[1, 3, height, width]` in [−1, 1] on `device`, resized to
    /// `width × height` with PIL's Lanczos when the frame's size differs (as the reference does).
    ///
    /// u8 frames are resized in u8 exactly as PIL does; `RgbF32` frames are resized in f32 with the
    /// same filter (PIL's float-image path) and not quantised.
    pub fn to_tensor(self, width: usize, height: usize, device: &Device) -> Result<Tensor> {
        if width == 0 || height == 0 {
            return Err(Error::InvalidFrame(format!(
                "target size {width}x{height}: width and height must be non-zero"
            )));
        }
        let (w, h) = (self.width, self.height);
        let unit: Vec<f32> = if self.format == PixelFormat::RgbF32 {
            let rgb = self.to_rgb_f32();
            if (w, h) == (width, height) {
                rgb
            } else {
                resize_rgb_f32_lanczos(&rgb, w, h, width, height)
            }
        } else {
            let rgb = self.to_rgb8();
            let rgb = if (w, h) == (width, height) {
                rgb
            } else {
                resize_rgb8_lanczos(&rgb, w, h, width, height)
            };
            if kernels::cuda_kernels(device) {
                // 8 bits over the bus; the device converts with the arithmetic below.
                return Ok(transfer::rgb8_to_unit_planes(rgb, width, height, device)?);
            }
            rgb.into_iter().map(|u| u as f32 / 255.0).collect()
        };
        // Interleaved HWC in [0, 1] → planar CHW in [−1, 1] (diffusers: 2.0 * x - 1.0, two f32 ops).
        let plane = width * height;
        let mut chw = vec![0f32; 3 * plane];
        for (i, px) in unit.chunks_exact(3).enumerate() {
            for c in 0..3 {
                chw[c * plane + i] = 2.0 * px[c] - 1.0;
            }
        }
        Ok(Tensor::from_vec(chw, (1, 3, height, width), device)?)
    }
}

/// `round(x · 255)` with ties to even, clamped to 0..=255 (NaN → 0): numpy's
/// `(x * 255).round().astype("uint8")` for x in [0, 1].
pub(crate) fn quantize_unit(x: f32) -> u8 {
    let v = (x * 255.0).round_ties_even();
    if v.is_nan() {
        0
    } else {
        v.clamp(0.0, 255.0) as u8
    }
}

/// An owned image, as the engine returns it.
#[derive(Debug, Clone, PartialEq)]
pub struct Image {
    /// Width in pixels.
    pub width: usize,
    /// Height in pixels.
    pub height: usize,
    /// Pixel layout; rows are packed (`stride = width · bytes_per_pixel`).
    pub format: PixelFormat,
    /// `width · height · bytes_per_pixel` bytes.
    pub data: Vec<u8>,
}

impl Image {
    /// Borrows the image as a [`Frame`].
    pub fn as_frame(&self) -> Result<Frame<'_>> {
        Frame::packed(&self.data, self.width, self.height, self.format)
    }

    /// Bytes from one row to the next.
    pub fn stride(&self) -> usize {
        self.width * self.format.bytes_per_pixel()
    }

    /// Converts a `[3, H, W]` or `[1, 3, H, W]` tensor in [0, 1] (any float dtype, any device) to an
    /// image: u8 formats get `round(x · 255)` with ties to even (the reference's `numpy_to_pil`),
    /// alpha 255; `RgbF32` keeps the values.
    pub fn from_tensor(tensor: &Tensor, format: PixelFormat) -> Result<Self> {
        let dims = tensor.dims();
        let (height, width) = match dims {
            [3, h, w] | [1, 3, h, w] => (*h, *w),
            _ => {
                return Err(Error::InvalidFrame(format!(
                    "expected an image tensor of shape [3, H, W] or [1, 3, H, W], got {dims:?}"
                )));
            }
        };
        if format != PixelFormat::RgbF32
            && kernels::cuda_kernels(tensor.device())
            && transfer::converts(tensor.dtype())
        {
            // The device quantises with `quantize_unit`'s arithmetic; 8 bits come back.
            let data = transfer::unit_planes_to_packed8(
                tensor,
                format.bytes_per_pixel(),
                format.rgb_order(),
            )?;
            return Ok(Self {
                width,
                height,
                format,
                data,
            });
        }
        let values: Vec<f32> = tensor
            .to_device(&Device::Cpu)?
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1()?;
        let plane = width * height;
        let bpp = format.bytes_per_pixel();
        let mut data = vec![0u8; plane * bpp];
        let [r, g, b] = format.rgb_order();
        for (i, px) in data.chunks_exact_mut(bpp).enumerate() {
            let rgb = [values[i], values[plane + i], values[2 * plane + i]];
            match format {
                PixelFormat::RgbF32 => {
                    for (c, v) in rgb.iter().enumerate() {
                        px[c * 4..c * 4 + 4].copy_from_slice(&v.to_ne_bytes());
                    }
                }
                _ => {
                    px[r] = quantize_unit(rgb[0]);
                    px[g] = quantize_unit(rgb[1]);
                    px[b] = quantize_unit(rgb[2]);
                    if format.channels() == 4 {
                        px[3] = 255;
                    }
                }
            }
        }
        Ok(Self {
            width,
            height,
            format,
            data,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/frame");

    fn fixture(name: &str) -> Vec<u8> {
        let path = format!("{FIXTURES}/{name}");
        std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
    }

    fn index() -> serde_json::Value {
        serde_json::from_slice(&fixture("frame_golden.json")).expect("frame_golden.json")
    }

    /// The xorshift32 byte stream of tests/reference/make_frame_golden.py.
    fn xorshift_bytes(seed: u32, n: usize) -> Vec<u8> {
        let mut x = seed;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                (x >> 24) as u8
            })
            .collect()
    }

    /// The test images of make_frame_golden.py (packed RGB u8).
    fn make_image(kind: &str, seed: u32, w: usize, h: usize) -> Vec<u8> {
        let noise = xorshift_bytes(seed, w * h * 3);
        if kind == "noise" {
            return noise;
        }
        let mut out = Vec::with_capacity(w * h * 3);
        for y in 0..h {
            for x in 0..w {
                let base = [
                    (x * 255 / (w - 1).max(1)) as i32,
                    (y * 255 / (h - 1).max(1)) as i32,
                    ((x + y) * 4 % 256) as i32,
                ];
                for c in 0..3 {
                    let n = noise[(y * w + x) * 3 + c] as i32;
                    out.push((base[c] + (n >> 3) - 16).clamp(0, 255) as u8);
                }
            }
        }
        out
    }

    fn dims(v: &serde_json::Value) -> (usize, usize) {
        (
            v[0].as_u64().expect("w") as usize,
            v[1].as_u64().expect("h") as usize,
        )
    }

    #[test]
    fn lanczos_resize_matches_pil() {
        let (mut exact, mut total, mut worst) = (0usize, 0usize, 0u8);
        for case in index()["resize"].as_array().expect("resize cases") {
            let name = case["name"].as_str().expect("name");
            let (sw, sh) = dims(&case["src"]);
            let (dw, dh) = dims(&case["dst"]);
            let src = make_image(
                case["kind"].as_str().expect("kind"),
                case["seed"].as_u64().expect("seed") as u32,
                sw,
                sh,
            );
            let ours = resize_rgb8_lanczos(&src, sw, sh, dw, dh);
            assert_eq!(ours.len(), dw * dh * 3, "{name}: size");
            let byte_sum: u64 = ours.iter().map(|&v| v as u64).sum();
            let square_sum: u64 = ours.iter().map(|&v| (v as u64) * (v as u64)).sum();
            let theirs = fixture(&format!("resize_{name}.bin"));
            let compared: Vec<u8> = match case["row_step"].as_u64() {
                Some(step) => ours
                    .chunks_exact(dw * 3)
                    .step_by(step as usize)
                    .flatten()
                    .copied()
                    .collect(),
                None => ours.clone(),
            };
            assert_eq!(compared.len(), theirs.len(), "{name}: stored size");
            for (i, (&a, &b)) in compared.iter().zip(&theirs).enumerate() {
                let d = a.abs_diff(b);
                assert!(d <= 1, "{name}: byte {i}: ours {a}, PIL {b}");
                worst = worst.max(d);
                exact += (d == 0) as usize;
            }
            total += compared.len();
            assert_eq!(
                byte_sum,
                case["byte_sum"].as_u64().expect("sum"),
                "{name}: byte sum"
            );
            assert_eq!(
                square_sum,
                case["square_sum"].as_u64().expect("sum"),
                "{name}: square sum"
            );
        }
        eprintln!("lanczos vs PIL: {exact}/{total} bytes identical, max diff {worst}");
        assert_eq!(exact, total, "expected PIL-identical output");
    }

    #[test]
    fn frame_to_tensor_matches_diffusers_preprocess() {
        let pre = &index()["preprocess"];
        let (sw, sh) = dims(&pre["src"]);
        let (dw, dh) = dims(&pre["dst"]);
        let rgb = make_image(
            pre["kind"].as_str().expect("kind"),
            pre["seed"].as_u64().expect("seed") as u32,
            sw,
            sh,
        );
        let theirs: Vec<f32> = fixture("preprocess.bin")
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        // The same picture in every u8 layout, with row padding, gives the same tensor.
        let mut rgba = Vec::new();
        let mut bgra = Vec::new();
        for px in rgb.chunks_exact(3) {
            rgba.extend_from_slice(&[px[0], px[1], px[2], 7]);
            bgra.extend_from_slice(&[px[2], px[1], px[0], 9]);
        }
        let pad = |packed: &[u8], row: usize| -> Vec<u8> {
            packed
                .chunks_exact(row)
                .flat_map(|r| r.iter().copied().chain([0xAA; 5]))
                .collect()
        };
        let layouts = [
            (pad(&rgb, sw * 3), PixelFormat::Rgb8),
            (pad(&rgba, sw * 4), PixelFormat::Rgba8),
            (pad(&bgra, sw * 4), PixelFormat::Bgra8),
        ];
        for (data, format) in &layouts {
            let stride = sw * format.bytes_per_pixel() + 5;
            let frame = Frame::new(data, sw, sh, stride, *format).expect("frame");
            let t = frame.to_tensor(dw, dh, &Device::Cpu).expect("tensor");
            assert_eq!(t.dims(), &[1, 3, dh, dw]);
            let ours: Vec<f32> = t.flatten_all().and_then(|t| t.to_vec1()).expect("values");
            assert_eq!(ours.len(), theirs.len());
            for (i, (a, b)) in ours.iter().zip(&theirs).enumerate() {
                assert_eq!(
                    a.to_bits(),
                    b.to_bits(),
                    "{format}: value {i}: ours {a}, diffusers {b}"
                );
            }
        }
        // Same size: no resampling, exact 2·(u/255) − 1.
        let frame = Frame::packed(&rgb, sw, sh, PixelFormat::Rgb8).expect("frame");
        let t = frame.to_tensor(sw, sh, &Device::Cpu).expect("tensor");
        let first: f32 = t
            .flatten_all()
            .and_then(|t| t.get(0))
            .and_then(|v| v.to_scalar())
            .expect("v");
        assert_eq!(first, 2.0 * (rgb[0] as f32 / 255.0) - 1.0);
    }

    #[test]
    fn tensor_to_image_matches_numpy_round() {
        let bytes = fixture("postprocess.bin");
        let n = index()["postprocess"]["count"].as_u64().expect("count") as usize;
        let values: Vec<f32> = bytes[..4 * n]
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        let expected = &bytes[4 * n..];
        assert_eq!(expected.len(), n);
        // Lay the values out as a [1, 3, 1, n / 3] tensor; each plane is one channel.
        let w = n / 3;
        let t = Tensor::from_vec(values[..3 * w].to_vec(), (1, 3, 1, w), &Device::Cpu).expect("t");
        for format in [PixelFormat::Rgb8, PixelFormat::Rgba8, PixelFormat::Bgra8] {
            let img = Image::from_tensor(&t, format).expect("image");
            assert_eq!((img.width, img.height), (w, 1));
            let rgb = img.as_frame().expect("frame").to_rgb8();
            for x in 0..w {
                for c in 0..3 {
                    assert_eq!(
                        rgb[x * 3 + c],
                        expected[c * w + x],
                        "{format}: value {} = {:e}",
                        c * w + x,
                        values[c * w + x]
                    );
                }
            }
            if format != PixelFormat::Rgb8 {
                assert!(img.data.chunks_exact(4).all(|px| px[3] == 255));
            }
        }
        let img = Image::from_tensor(&t.squeeze(0).expect("3d"), PixelFormat::RgbF32).expect("f32");
        let back = img
            .as_frame()
            .expect("frame")
            .to_tensor(w, 1, &Device::Cpu)
            .expect("t");
        let first: f32 = back
            .flatten_all()
            .and_then(|t| t.get(0))
            .and_then(|v| v.to_scalar())
            .expect("v");
        assert_eq!(first, 2.0 * values[0] - 1.0);
    }

    #[test]
    fn frame_validation_names_the_numbers() {
        let data = vec![0u8; 100];
        let err = Frame::new(&data, 0, 4, 12, PixelFormat::Rgb8)
            .expect_err("zero")
            .to_string();
        assert!(err.contains("0x4"), "{err}");
        let err = Frame::new(&data, 4, 4, 11, PixelFormat::Rgb8)
            .expect_err("stride")
            .to_string();
        assert!(err.contains("stride 11") && err.contains("= 12"), "{err}");
        let err = Frame::new(&data, 5, 5, 21, PixelFormat::Rgba8)
            .expect_err("len")
            .to_string();
        assert!(
            err.contains("needs 104") && err.contains("got 100"),
            "{err}"
        );
        // The last row need not be padded: 4 rows of stride 30 holding 24 pixel bytes each.
        let data = vec![0u8; 30 * 3 + 24];
        assert!(Frame::new(&data, 6, 4, 30, PixelFormat::Rgba8).is_ok());
        assert!(Frame::new(&data[..data.len() - 1], 6, 4, 30, PixelFormat::Rgba8).is_err());
        // Sizes past the bounds fail before any byte is looked at (no allocation either).
        for (w, h) in [(1 << 28, 1), (1 << 30, 1 << 30), (MAX_FRAME_SIDE + 1, 2)] {
            let err = Frame::new(&data, w, h, w * 3, PixelFormat::Rgb8)
                .expect_err("too large")
                .to_string();
            assert!(
                err.contains(&format!("{w}x{h}")) && err.contains("at most 16384"),
                "{err}"
            );
        }
        let err = frame_len(16_384, 16_384, 1 << 20, PixelFormat::Rgb8)
            .expect_err("stride too large")
            .to_string();
        assert!(err.contains("spans more than 4294967296 bytes"), "{err}");
        assert_eq!(
            frame_len(
                MAX_FRAME_SIDE,
                MAX_FRAME_SIDE,
                MAX_FRAME_SIDE * 12,
                PixelFormat::RgbF32
            )
            .expect("the largest f32 frame"),
            MAX_FRAME_SIDE * MAX_FRAME_SIDE * 12
        );
        let t = Tensor::zeros((2, 3, 4, 4), DType::F32, &Device::Cpu).expect("t");
        let err = Image::from_tensor(&t, PixelFormat::Rgb8)
            .expect_err("shape")
            .to_string();
        assert!(err.contains("[2, 3, 4, 4]"), "{err}");
    }

    #[test]
    fn float_resize_matches_pil_float_mode() {
        let case = &index()["resize_float"];
        let (sw, sh) = dims(&case["src"]);
        let (dw, dh) = dims(&case["dst"]);
        let src = make_image(
            case["kind"].as_str().expect("kind"),
            case["seed"].as_u64().expect("seed") as u32,
            sw,
            sh,
        );
        let unit: Vec<f32> = src.iter().map(|&u| u as f32 / 255.0).collect();
        let ours = resize_rgb_f32_lanczos(&unit, sw, sh, dw, dh);
        let theirs: Vec<f32> = fixture("resize_float.bin")
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        assert_eq!(ours.len(), theirs.len());
        let worst = ours
            .iter()
            .zip(&theirs)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(worst <= 1e-6, "float Lanczos vs PIL: max abs {worst}");
    }
}
