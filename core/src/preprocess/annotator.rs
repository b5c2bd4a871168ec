//! The 8-bit image steps that Daydream's model-based processors share around their networks:
//! its tensor → PIL conversion, PIL's Lanczos resize, controlnet_aux's `resize_image` (the
//! shorter side to a resolution, sides rounded to multiples of 64) with OpenCV's resize, and the
//! final bilinear resize of Daydream's tensor path.
//!
//! Daydream turns its tensor into a PIL image by truncating `255·x`; sdstream rounds instead
//! ([`to_u8`]), as its pixel processors do.

use candle_core::{DType, Device, Tensor};

use super::cv_resize::{self, Interpolation};
use super::planes::{Planes, to_u8};
use super::resize::resize_rgb8_lanczos;
use crate::{Error, Result};

/// An interleaved 8-bit RGB image (`height` rows of `width` pixels, 3 bytes each).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rgb8 {
    /// Rows.
    pub height: usize,
    /// Columns.
    pub width: usize,
    /// `height · width · 3` bytes.
    pub data: Vec<u8>,
}

impl Rgb8 {
    /// A `[1, 3, H, W]` image in [0, 1] as 8-bit levels: `round(255·x)`, clamped.
    pub fn from_tensor(image: &Tensor) -> Result<Self> {
        let planes = Planes::from_tensor(image)?;
        if planes.channels != 3 {
            return Err(Error::InvalidFrame(format!(
                "an annotator takes an RGB image, got {} channels",
                planes.channels
            )));
        }
        let (height, width) = (planes.height, planes.width);
        let n = height * width;
        let mut data = vec![0u8; n * 3];
        for c in 0..3 {
            for (i, &v) in planes.plane(c).iter().enumerate() {
                data[i * 3 + c] = to_u8(v);
            }
        }
        Ok(Self {
            height,
            width,
            data,
        })
    }

    /// The image as `[1, 3, H, W]` f32 in [0, 1] on `device` (levels / 255).
    pub fn to_tensor(&self, device: &Device) -> Result<Tensor> {
        let (h, w) = (self.height, self.width);
        let t = Tensor::from_vec(self.data.clone(), (h, w, 3), device)?
            .permute((2, 0, 1))?
            .unsqueeze(0)?
            .to_dtype(DType::F32)?;
        Ok((t / 255.0)?)
    }

    /// PIL's `Image.resize((width, height), Image.LANCZOS)` (a copy when the size is the same).
    pub fn resize_pil_lanczos(&self, height: usize, width: usize) -> Self {
        if (height, width) == (self.height, self.width) {
            return self.clone();
        }
        Self {
            height,
            width,
            data: resize_rgb8_lanczos(&self.data, self.width, self.height, width, height),
        }
    }

    /// `cv2.resize(image, (width, height), interpolation)`.
    pub fn resize_cv(&self, height: usize, width: usize, mode: Interpolation) -> Self {
        Self {
            height,
            width,
            data: cv_resize::resize_u8(&self.data, self.height, self.width, 3, height, width, mode),
        }
    }

    /// controlnet_aux's `resize_image(image, resolution)`: k = resolution / the shorter side,
    /// each side `round(side·k / 64)·64` (numpy's round: ties to even), OpenCV's Lanczos-4
    /// when enlarging (k > 1) and its area resampling otherwise.
    pub fn resize_image(&self, resolution: usize) -> Self {
        let k = resolution as f64 / self.height.min(self.width) as f64;
        let side = |s: usize| ((s as f64 * k / 64.0).round_ties_even() as usize) * 64;
        let (h, w) = (side(self.height), side(self.width));
        let mode = if k > 1.0 {
            Interpolation::Lanczos4
        } else {
            Interpolation::Area
        };
        self.resize_cv(h, w, mode)
    }

    /// One 8-bit map copied to three channels (controlnet_aux's `HWC3` of a 2-D image).
    pub fn from_gray(gray: &[u8], height: usize, width: usize) -> Self {
        let mut data = Vec::with_capacity(gray.len() * 3);
        for &g in gray {
            data.extend_from_slice(&[g, g, g]);
        }
        Self {
            height,
            width,
            data,
        }
    }
}

/// Daydream's tensor path ends by resizing a processor's image to the stream's size with
/// torch's bilinear interpolation (align_corners false); the image as is when it has that size.
pub fn to_stream_size(image: &Tensor, height: usize, width: usize) -> Result<Tensor> {
    let (_, _, h, w) = image.dims4()?;
    if (h, w) == (height, width) {
        return Ok(image.clone());
    }
    Ok(image.upsample_bilinear2d(height, width, false)?)
}
