//! `canny`: OpenCV's Canny edge detector, as Daydream's `CannyPreprocessor` runs it:
//! the frame to 8-bit RGB, `cv2.cvtColor(RGB2GRAY)`, `cv2.Canny(gray, low_threshold,
//! high_threshold)` (aperture 3, L1 gradient), the edge map copied to three channels.
//!
//! Params (Daydream's names, defaults and documented ranges):
//! * `low_threshold`: number in [1, 255], default 100.
//! * `high_threshold`: number in [1, 255], default 200.
//!
//! As OpenCV: thresholds are floored to integers and swapped if low > high; a pixel is an edge
//! candidate when its L1 gradient magnitude |dx| + |dy| (3×3 Sobel, replicated border) is
//! strictly greater than the low threshold and survives non-maximum suppression, and an edge when
//! it is 8-connected through candidates to a pixel strictly above the high threshold. Output is
//! 1.0 on edges and 0.0 elsewhere, in all three channels.

use super::param_reader::ParamReader;
use super::planes::{Planes, to_u8};
use crate::Result;

/// Canny's settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CannyParams {
    /// Hysteresis low threshold on the L1 gradient magnitude.
    pub low_threshold: f64,
    /// Hysteresis high threshold.
    pub high_threshold: f64,
}

impl CannyParams {
    /// Reads `low_threshold` / `high_threshold`.
    pub fn read(r: &ParamReader<'_>) -> Result<Self> {
        Ok(CannyParams {
            low_threshold: r.number("low_threshold", 100.0, 1.0..=255.0)?,
            high_threshold: r.number("high_threshold", 200.0, 1.0..=255.0)?,
        })
    }
}

/// Canny on a `[3, H, W]` image in [0, 1]: three identical channels of 0/1.
pub fn apply(image: &Planes, params: CannyParams) -> Planes {
    let (h, w) = (image.height, image.width);
    let gray = gray_u8(image);
    let edges = canny_u8(&gray, h, w, params.low_threshold, params.high_threshold);
    let mut out = Planes::zeros(image.channels, h, w);
    let n = h * w;
    for plane in out.data.chunks_exact_mut(n) {
        for (o, &e) in plane.iter_mut().zip(&edges) {
            *o = f32::from(e);
        }
    }
    out
}

/// The 8-bit grey image `cv2.cvtColor(rgb8, COLOR_RGB2GRAY)` gives: OpenCV's 15-bit fixed point
/// (9798·R + 19235·G + 3735·B + 2¹⁴) >> 15. A one-channel image is used as is.
pub fn gray_u8(image: &Planes) -> Vec<u8> {
    let n = image.plane_len();
    if image.channels < 3 {
        return image.plane(0).iter().map(|&v| to_u8(v)).collect();
    }
    let (r, g, b) = (image.plane(0), image.plane(1), image.plane(2));
    (0..n)
        .map(|i| {
            let sum = 9798 * u32::from(to_u8(r[i]))
                + 19235 * u32::from(to_u8(g[i]))
                + 3735 * u32::from(to_u8(b[i]))
                + (1 << 14);
            (sum >> 15) as u8
        })
        .collect()
}

/// Marks in the padded map: a pixel that cannot be an edge, a candidate, an edge.
const NOT_EDGE: u8 = 1;
const CANDIDATE: u8 = 0;
const EDGE: u8 = 2;

/// tan(22.5°) in OpenCV's 15-bit fixed point (its `TG22`), and that shift.
const TG22: i32 = 13573;
const CANNY_SHIFT: i32 = 15;

/// `cv2.Canny(gray, low, high)` with aperture 3 and the L1 gradient: 1 on edges, 0 elsewhere.
pub fn canny_u8(gray: &[u8], height: usize, width: usize, low: f64, high: f64) -> Vec<u8> {
    let (low, high) = if low > high { (high, low) } else { (low, high) };
    let (low, high) = (low.floor() as i32, high.floor() as i32);
    let (h, w) = (height, width);
    if h == 0 || w == 0 {
        return Vec::new();
    }
    // Sobel dx, dy with BORDER_REPLICATE; magnitudes in a buffer with a zero frame of one pixel,
    // as OpenCV's NMS sees zeros outside the image.
    let pw = w + 2;
    let mut dx = vec![0i32; h * w];
    let mut dy = vec![0i32; h * w];
    let mut mag = vec![0i32; (h + 2) * pw];
    for y in 0..h {
        let up = &gray[y.saturating_sub(1) * w..][..w];
        let mid = &gray[y * w..][..w];
        let down = &gray[(y + 1).min(h - 1) * w..][..w];
        for x in 0..w {
            let (l, r) = (x.saturating_sub(1), (x + 1).min(w - 1));
            let p = |row: &[u8], i: usize| i32::from(row[i]);
            let gx =
                (p(up, r) - p(up, l)) + 2 * (p(mid, r) - p(mid, l)) + (p(down, r) - p(down, l));
            let gy =
                (p(down, l) + 2 * p(down, x) + p(down, r)) - (p(up, l) + 2 * p(up, x) + p(up, r));
            dx[y * w + x] = gx;
            dy[y * w + x] = gy;
            mag[(y + 1) * pw + x + 1] = gx.abs() + gy.abs();
        }
    }
    // Non-maximum suppression with OpenCV's sector test and tie-breaking: the neighbour before the
    // pixel must be strictly smaller, the one after smaller or equal (both strictly on
    // diagonals).
    let mut map = vec![NOT_EDGE; (h + 2) * pw];
    let mut stack: Vec<usize> = Vec::new();
    for y in 0..h {
        for x in 0..w {
            let j = (y + 1) * pw + x + 1;
            let m = mag[j];
            if m <= low {
                continue;
            }
            let (xs, ys) = (dx[y * w + x], dy[y * w + x]);
            let ax = xs.abs();
            let ay = ys.abs() << CANNY_SHIFT;
            let tg22x = ax * TG22;
            let is_max = if ay < tg22x {
                m > mag[j - 1] && m >= mag[j + 1]
            } else {
                let tg67x = tg22x + (ax << (CANNY_SHIFT + 1));
                if ay > tg67x {
                    m > mag[j - pw] && m >= mag[j + pw]
                } else if (xs ^ ys) < 0 {
                    m > mag[j - pw + 1] && m > mag[j + pw - 1]
                } else {
                    m > mag[j - pw - 1] && m > mag[j + pw + 1]
                }
            };
            if !is_max {
                continue;
            }
            if m > high {
                map[j] = EDGE;
                stack.push(j);
            } else {
                map[j] = CANDIDATE;
            }
        }
    }
    // Hysteresis: grow edges through 8-connected candidates (the frame is NOT_EDGE, so no
    // bounds checks are needed).
    let neighbours = [
        -(pw as isize) - 1,
        -(pw as isize),
        -(pw as isize) + 1,
        -1,
        1,
        pw as isize - 1,
        pw as isize,
        pw as isize + 1,
    ];
    while let Some(j) = stack.pop() {
        for d in neighbours {
            let k = (j as isize + d) as usize;
            if map[k] == CANDIDATE {
                map[k] = EDGE;
                stack.push(k);
            }
        }
    }
    let mut out = vec![0u8; h * w];
    for y in 0..h {
        for x in 0..w {
            out[y * w + x] = u8::from(map[(y + 1) * pw + x + 1] == EDGE);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_vertical_step_gives_one_edge_column_and_flat_gives_none() {
        let (h, w) = (8, 10);
        let gray: Vec<u8> = (0..h * w)
            .map(|i| if i % w < 5 { 20 } else { 220 })
            .collect();
        let e = canny_u8(&gray, h, w, 100.0, 200.0);
        // |dx| = 4·200 on both columns 4 and 5; NMS keeps the first (strict before, ≥ after).
        for y in 0..h {
            let row: Vec<u8> = e[y * w..(y + 1) * w].to_vec();
            assert_eq!(row, vec![0, 0, 0, 0, 1, 0, 0, 0, 0, 0], "row {y}");
        }
        assert!(canny_u8(&[7; 64], 8, 8, 1.0, 2.0).iter().all(|&v| v == 0));
    }
}
