//! OpenPose's hands and face, as controlnet_aux 0.0.10 finds and draws them for each person the
//! body network found (`open_pose/__init__.py` `detect_hands`/`detect_face`, `hand.py`,
//! `face.py`, and `util.py`'s `handDetect`, `faceDetect`, `draw_handpose`, `draw_facepose`),
//! on the BGR image the body was found in. The networks are [`crate::model::openpose_cpm`].
//!
//! **Boxes** ([`hand_boxes`], [`face_box`]), in float64 from the body keypoints' pixels:
//! a hand's square is centred a third of the forearm beyond the wrist, 1.5 × max(forearm,
//! 0.9 × upper arm) wide (left hand first, then right); the face's is centred on the nose,
//! its half side the largest of 3 × the nose–eye and 1.5 × the nose–ear distances (each the
//! larger of |dx| and |dy|). Both are clamped to the image the way controlnet_aux clamps them
//! (the face's against `x + half side`, a quirk kept), truncated to integers, and dropped under
//! 20 pixels.
//!
//! **A hand** ([`hand_peaks`]) on its crop: OpenCV's `GaussianBlur(σ = 0.8)` on the 8-bit
//! levels ([`gaussian_blur_08`]); then at four sizes, 184², 368², 552² and 736² (0.5 … 2 ×
//! 368): OpenCV's resize (area when shrinking, Lanczos-4 otherwise), the network on
//! `level / 256 − 0.5`, each heatmap ×8 with Lanczos-4 (f32) and resized to 128² (area); the
//! four summed a quarter each into float64. Per part (21, the background unused): scipy's
//! Gaussian (σ = 3); nothing above 0.05 gives (0, 0); otherwise the 8-connected region above
//! 0.05 whose unsmoothed values sum highest is kept and the first maximum of the unsmoothed map
//! within it (zero outside) is the part, scaled to the crop by `int(v · side / 128)`.
//!
//! **The face** ([`face_peaks`]) on its crop: OpenCV's resize to 384², the network on
//! `level / 256 − 0.5`, its 71 heatmaps resized bilinearly (align corners) to the crop; each map
//! with a value above 0.05 gives the position of its first maximum among those (maps with none
//! give no point: the list shortens).
//!
//! **Keypoints** are `(v + box corner) / image side` in float32, −1 / side for a hand part at
//! (0, 0); **drawing** ([`draw_hand`], [`draw_face`]) multiplies back in float32, truncates, and
//! draws only points beyond 0: the hand's 20 bones as 2-pixel lines in matplotlib's HSV
//! rainbow, then its joints as blue discs of radius 4; the face's points as white discs of
//! radius 3.

use candle_core::{DType, Device, Tensor};

use super::annotator::Rgb8;
use super::cv_draw::{fill_circle, line};
use super::cv_resize::{Interpolation, resize_f32};
use super::openpose::{Person, gaussian_filter, numpy_sum};
use crate::{Error, Result};

/// Hand parts the network gives heatmaps for (plus the background).
pub const HAND_PARTS: usize = 21;
/// `draw_handpose`'s bones.
const HAND_EDGES: [(usize, usize); 20] = [
    (0, 1),
    (1, 2),
    (2, 3),
    (3, 4),
    (0, 5),
    (5, 6),
    (6, 7),
    (7, 8),
    (0, 9),
    (9, 10),
    (10, 11),
    (11, 12),
    (0, 13),
    (13, 14),
    (14, 15),
    (15, 16),
    (0, 17),
    (17, 18),
    (18, 19),
    (19, 20),
];
/// `handDetect`'s hand centre beyond the wrist, as a share of the forearm.
const RATIO_WRIST_ELBOW: f64 = 0.33;
/// Smallest box side kept.
const MIN_BOX_SIDE: f64 = 20.0;
/// `Hand.__call__`'s sizes: `[0.5, 1, 1.5, 2] × 368`.
const HAND_SIZES: [usize; 4] = [184, 368, 552, 736];
/// The side the hand heatmaps are averaged at.
const HAND_MAP_SIDE: usize = 128;
/// The networks' output stride.
const STRIDE: usize = 8;
/// `padRightDownCorner`'s level.
const PAD_LEVEL: u8 = 128;
/// Smoothing and threshold of a hand part's heatmap.
const HAND_SIGMA: f64 = 3.0;
const HAND_THRESHOLD: f64 = 0.05;
/// The side the face crop is resized to, and its heatmaps' threshold.
const FACE_SIDE: usize = 384;
const FACE_THRESHOLD: f32 = 0.05;
/// `util.eps`: points are drawn only beyond it.
const DRAW_EPS: f32 = 0.01;
/// OpenCV's 8-bit Gaussian kernel for σ = 0.8 (7 taps, 8 fractional bits): what
/// `GaussianBlur(img, (0, 0), 0.8)` applies to u8 images, in both directions.
const BLUR_08_TAPS: [i32; 7] = [0, 6, 58, 128, 58, 6, 0];

/// A square box in the image: corner and side, in pixels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SquareBox {
    /// Left column.
    pub x: usize,
    /// Top row.
    pub y: usize,
    /// Side.
    pub side: usize,
}

/// A hand's box and which hand it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HandBox {
    /// Where the hand is looked for.
    pub area: SquareBox,
    /// The left hand (from the left wrist, elbow and shoulder).
    pub left: bool,
}

/// A person's hands and face, keypoints as (x, y) over the image's size in float32; `None`
/// where no box was found.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct HandsAndFace {
    /// The left hand's 21 points.
    pub left_hand: Option<Vec<[f32; 2]>>,
    /// The right hand's 21 points.
    pub right_hand: Option<Vec<[f32; 2]>>,
    /// The face's points (up to 71).
    pub face: Option<Vec<[f32; 2]>>,
}

/// The pixel (column, row) of body part `part`, if found, as float64.
fn pixel(person: &Person, part: usize) -> Option<(f64, f64)> {
    person.keypoints[part].map(|k| (k.pixel[0] as f64, k.pixel[1] as f64))
}

/// `x ** 2` as Python computes it on floats (the C library's `pow`).
fn squared(x: f64) -> f64 {
    x.powf(std::hint::black_box(2.0))
}

/// `handDetect`'s boxes for `person` in a `width`×`height` image (module docs).
pub fn hand_boxes(person: &Person, height: usize, width: usize) -> Vec<HandBox> {
    let (image_w, image_h) = (width as f64, height as f64);
    let mut boxes = Vec::new();
    // Left hand: shoulder 5, elbow 6, wrist 7; right hand: 2, 3, 4.
    for (shoulder, elbow, wrist, left) in [(5, 6, 7, true), (2, 3, 4, false)] {
        let (Some((x1, y1)), Some((x2, y2)), Some((x3, y3))) = (
            pixel(person, shoulder),
            pixel(person, elbow),
            pixel(person, wrist),
        ) else {
            continue;
        };
        let mut x = x3 + RATIO_WRIST_ELBOW * (x3 - x2);
        let mut y = y3 + RATIO_WRIST_ELBOW * (y3 - y2);
        let wrist_elbow = (squared(x3 - x2) + squared(y3 - y2)).sqrt();
        let elbow_shoulder = (squared(x2 - x1) + squared(y2 - y1)).sqrt();
        let mut side = 1.5 * wrist_elbow.max(0.9 * elbow_shoulder);
        x -= side / 2.0;
        y -= side / 2.0;
        x = x.max(0.0);
        y = y.max(0.0);
        let (mut side_x, mut side_y) = (side, side);
        if x + side > image_w {
            side_x = image_w - x;
        }
        if y + side > image_h {
            side_y = image_h - y;
        }
        side = side_x.min(side_y);
        if side >= MIN_BOX_SIDE {
            boxes.push(HandBox {
                area: SquareBox {
                    x: x as usize,
                    y: y as usize,
                    side: side as usize,
                },
                left,
            });
        }
    }
    boxes
}

/// `faceDetect`'s box for `person` in a `width`×`height` image (module docs).
pub fn face_box(person: &Person, height: usize, width: usize) -> Option<SquareBox> {
    let (x0, y0) = pixel(person, 0)?;
    // Left and right eye (14, 15) weigh 3, left and right ear (16, 17) 1.5.
    let others = [(14, 3.0), (15, 3.0), (16, 1.5), (17, 1.5)];
    if others
        .iter()
        .all(|&(part, _)| pixel(person, part).is_none())
    {
        return None;
    }
    let mut half = 0.0f64;
    for (part, factor) in others {
        if let Some((x1, y1)) = pixel(person, part) {
            let d = (x0 - x1).abs().max((y0 - y1).abs());
            half = half.max(d * factor);
        }
    }
    let x = (x0 - half).max(0.0);
    let y = (y0 - half).max(0.0);
    let (mut side_x, mut side_y) = (half * 2.0, half * 2.0);
    if x + half > width as f64 {
        side_x = width as f64 - x;
    }
    if y + half > height as f64 {
        side_y = height as f64 - y;
    }
    let side = side_x.min(side_y);
    (side >= MIN_BOX_SIDE).then_some(SquareBox {
        x: x as usize,
        y: y as usize,
        side: side as usize,
    })
}

/// numpy's `image[y:y+side, x:x+side]` (clipped to the image).
pub fn crop(image: &Rgb8, area: SquareBox) -> Rgb8 {
    let y1 = (area.y + area.side).min(image.height);
    let x1 = (area.x + area.side).min(image.width);
    let (y0, x0) = (area.y.min(y1), area.x.min(x1));
    let (h, w) = (y1 - y0, x1 - x0);
    let mut data = Vec::with_capacity(h * w * 3);
    for y in y0..y1 {
        data.extend_from_slice(&image.data[(y * image.width + x0) * 3..(y * image.width + x1) * 3]);
    }
    Rgb8 {
        height: h,
        width: w,
        data,
    }
}

/// OpenCV's `GaussianBlur(image, (0, 0), 0.8)` on 8-bit levels, bit for bit: its fixed-point
/// kernel ([`BLUR_08_TAPS`]) along the rows, then the columns, on whole numbers, rounded once
/// (`(sum + 2¹⁵) >> 16`), with OpenCV's default border (`BORDER_REFLECT_101`). Checked against
/// opencv-python-headless 5.0 on random images of 5×5 to 300×300.
pub fn gaussian_blur_08(image: &Rgb8) -> Rgb8 {
    let (h, w) = (image.height, image.width);
    if h == 0 || w == 0 {
        return image.clone();
    }
    let reflect = |i: isize, n: usize| -> usize {
        if n == 1 {
            return 0;
        }
        let period = 2 * (n as isize - 1);
        let m = i.rem_euclid(period);
        (if m < n as isize { m } else { period - m }) as usize
    };
    let r = (BLUR_08_TAPS.len() / 2) as isize;
    // Rows first: [h, w, 3] sums with 8 fractional bits.
    let mut rows = vec![0i32; h * w * 3];
    for y in 0..h {
        for x in 0..w {
            for c in 0..3 {
                let mut acc = 0;
                for (k, &tap) in BLUR_08_TAPS.iter().enumerate() {
                    let xs = reflect(x as isize + k as isize - r, w);
                    acc += tap * i32::from(image.data[(y * w + xs) * 3 + c]);
                }
                rows[(y * w + x) * 3 + c] = acc;
            }
        }
    }
    let mut data = vec![0u8; h * w * 3];
    for y in 0..h {
        for x in 0..w {
            for c in 0..3 {
                let mut acc: i64 = 0;
                for (k, &tap) in BLUR_08_TAPS.iter().enumerate() {
                    let ys = reflect(y as isize + k as isize - r, h);
                    acc += i64::from(tap) * i64::from(rows[(ys * w + x) * 3 + c]);
                }
                data[(y * w + x) * 3 + c] = ((acc + (1 << 15)) >> 16).clamp(0, 255) as u8;
            }
        }
    }
    Rgb8 {
        height: h,
        width: w,
        data,
    }
}

/// `util.smart_resize`'s choice: area when the sides shrink on the whole, Lanczos-4 otherwise.
pub fn smart_mode(from: (usize, usize), to: (usize, usize)) -> Interpolation {
    let k = (to.0 + to.1) as f64 / (from.0 + from.1) as f64;
    if k < 1.0 {
        Interpolation::Area
    } else {
        Interpolation::Lanczos4
    }
}

/// The network input `[1, 3, H', W']` of an RGB `image`: BGR, `level / 256 − 0.5` in f32,
/// padded with level 128 on the bottom and right to multiples of 8.
pub fn bgr_input(image: &Rgb8, device: &Device) -> Result<Tensor> {
    let (h, w) = (image.height, image.width);
    let (ph, pw) = (h.div_ceil(STRIDE) * STRIDE, w.div_ceil(STRIDE) * STRIDE);
    let plane = ph * pw;
    let mut input = vec![f32::from(PAD_LEVEL) / 256.0 - 0.5; 3 * plane];
    for y in 0..h {
        for x in 0..w {
            let px = &image.data[(y * w + x) * 3..][..3];
            for (c, &level) in px.iter().rev().enumerate() {
                input[c * plane + y * pw + x] = f32::from(level) / 256.0 - 0.5;
            }
        }
    }
    Ok(Tensor::from_vec(input, (1, 3, ph, pw), device)?)
}

/// The planes of a network output `[1, C, h, w]` as f32 values, checked to hold at least
/// `channels` maps of `h × w`.
fn output_planes(
    maps: &Tensor,
    channels: usize,
    h: usize,
    w: usize,
    what: &str,
) -> Result<Vec<f32>> {
    let dims = maps.dims();
    if dims.len() != 4 || dims[0] != 1 || dims[1] < channels || dims[2] != h || dims[3] != w {
        return Err(Error::State(format!(
            "the OpenPose {what} network gave maps of shape {dims:?}; expected [1, {channels}, \
             {h}, {w}]"
        )));
    }
    Ok(maps.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
}

/// The 8-connected regions of `mask` (`height`×`width`, row-major), numbered 1, 2, … in the
/// order a raster scan first meets them (0: outside); returns the labels and their count.
pub fn label_regions(mask: &[bool], height: usize, width: usize) -> (Vec<u32>, u32) {
    let mut labels = vec![0u32; mask.len()];
    let mut count = 0;
    let mut stack = Vec::new();
    for start in 0..mask.len() {
        if !mask[start] || labels[start] != 0 {
            continue;
        }
        count += 1;
        labels[start] = count;
        stack.push(start);
        while let Some(i) = stack.pop() {
            let (y, x) = ((i / width) as isize, (i % width) as isize);
            for dy in -1..=1 {
                for dx in -1..=1 {
                    let (ny, nx) = (y + dy, x + dx);
                    if ny < 0 || nx < 0 || ny >= height as isize || nx >= width as isize {
                        continue;
                    }
                    let j = ny as usize * width + nx as usize;
                    if mask[j] && labels[j] == 0 {
                        labels[j] = count;
                        stack.push(j);
                    }
                }
            }
        }
    }
    (labels, count)
}

/// One hand part's position in the 128² averaged map (module docs), `(0, 0)` when nothing
/// passes the threshold.
fn hand_part_peak(map: &[f64]) -> (usize, usize) {
    let side = HAND_MAP_SIDE;
    let smoothed = gaussian_filter(map, side, side, HAND_SIGMA);
    let mask: Vec<bool> = smoothed.iter().map(|&v| v > HAND_THRESHOLD).collect();
    if !mask.iter().any(|&m| m) {
        return (0, 0);
    }
    let (labels, count) = label_regions(&mask, side, side);
    let mut best = (1, f64::NEG_INFINITY);
    for label in 1..=count {
        let values: Vec<f64> = map
            .iter()
            .zip(&labels)
            .filter(|&(_, &l)| l == label)
            .map(|(&v, _)| v)
            .collect();
        let sum = numpy_sum(&values);
        // numpy's argmax: the first maximum.
        if sum > best.1 {
            best = (label, sum);
        }
    }
    let mut at = 0;
    let mut max = f64::NEG_INFINITY;
    for (i, (&v, &l)) in map.iter().zip(&labels).enumerate() {
        let v = if l == best.0 { v } else { 0.0 };
        if v > max {
            max = v;
            at = i;
        }
    }
    (at % side, at / side)
}

/// `Hand.__call__` on a crop (RGB levels; module docs): each part's (column, row) in the crop,
/// `(0, 0)` for a part not found. `network` maps an input from [`bgr_input`] to its heatmaps
/// `[1, ≥ 21, H/8, W/8]`.
pub fn hand_peaks(
    crop: &Rgb8,
    device: &Device,
    network: &dyn Fn(&Tensor) -> Result<Tensor>,
) -> Result<Vec<(usize, usize)>> {
    let (crop_h, crop_w) = (crop.height, crop.width);
    let blurred = gaussian_blur_08(crop);
    let n = HAND_MAP_SIDE * HAND_MAP_SIDE;
    let mut average = vec![0f64; HAND_PARTS * n];
    for size in HAND_SIZES {
        let resized = blurred.resize_cv(size, size, smart_mode((crop_h, crop_w), (size, size)));
        let input = bgr_input(&resized, device)?;
        let (_, _, ph, pw) = input.dims4()?;
        let (mh, mw) = (ph / STRIDE, pw / STRIDE);
        let maps = network(&input)?;
        let values = output_planes(&maps, HAND_PARTS + 1, mh, mw, "hand")?;
        let mut cut = vec![0f32; size * size];
        for (part, plane) in values.chunks_exact(mh * mw).take(HAND_PARTS).enumerate() {
            let (uh, uw) = (mh * STRIDE, mw * STRIDE);
            let up = resize_f32(plane, mh, mw, 1, uh, uw, smart_mode((mh, mw), (uh, uw)));
            for (y, row) in cut.chunks_exact_mut(size).enumerate() {
                row.copy_from_slice(&up[y * uw..y * uw + size]);
            }
            let small = resize_f32(
                &cut,
                size,
                size,
                1,
                HAND_MAP_SIDE,
                HAND_MAP_SIDE,
                smart_mode((size, size), (HAND_MAP_SIDE, HAND_MAP_SIDE)),
            );
            for (acc, v) in average[part * n..(part + 1) * n].iter_mut().zip(small) {
                *acc += f64::from(v / HAND_SIZES.len() as f32);
            }
        }
    }
    Ok(average
        .chunks_exact(n)
        .map(|map| {
            let (x, y) = hand_part_peak(map);
            let scale =
                |v: usize, side: usize| (v as f64 * side as f64 / HAND_MAP_SIDE as f64) as usize;
            (scale(x, crop_w), scale(y, crop_h))
        })
        .collect())
}

/// `Face.__call__` and `compute_peaks_from_heatmaps` on a crop (RGB levels; module docs): the
/// (column, row) of each heatmap's first maximum above 0.05, maps without one skipped.
/// `network` maps a `[1, 3, 384, 384]` input from [`bgr_input`] to its heatmaps.
pub fn face_peaks(
    crop: &Rgb8,
    device: &Device,
    network: &dyn Fn(&Tensor) -> Result<Tensor>,
) -> Result<Vec<(usize, usize)>> {
    let (h, w) = (crop.height, crop.width);
    let resized = crop.resize_cv(
        FACE_SIDE,
        FACE_SIDE,
        smart_mode((h, w), (FACE_SIDE, FACE_SIDE)),
    );
    let maps = network(&bgr_input(&resized, device)?)?;
    let (_, channels, _, _) = maps.dims4()?;
    let maps = maps.to_dtype(DType::F32)?.upsample_bilinear2d(h, w, true)?;
    let values = output_planes(&maps, channels, h, w, "face")?;
    let mut peaks = Vec::new();
    for plane in values.chunks_exact(h * w) {
        let mut best: Option<(usize, f32)> = None;
        for (i, &v) in plane.iter().enumerate() {
            if v > FACE_THRESHOLD && best.is_none_or(|(_, m)| v > m) {
                best = Some((i, v));
            }
        }
        if let Some((i, _)) = best {
            peaks.push((i % w, i / w));
        }
    }
    Ok(peaks)
}

/// `detect_hands`/`detect_face`'s normalisation: `(v + corner) / side` in float32, and
/// `−1 / side` for a coordinate under 1e-6 (a hand part not found).
fn normalised(
    peaks: &[(usize, usize)],
    area: SquareBox,
    height: usize,
    width: usize,
) -> Vec<[f32; 2]> {
    let norm = |v: usize, corner: usize, side: usize| {
        let v = v as f32;
        let moved = if v < 1e-6 { -1.0 } else { v + corner as f32 };
        moved / side as f32
    };
    peaks
        .iter()
        .map(|&(x, y)| [norm(x, area.x, width), norm(y, area.y, height)])
        .collect()
}

/// The hands and face of `person` in `image` (RGB levels, the image the body was found in).
pub fn detect(
    person: &Person,
    image: &Rgb8,
    device: &Device,
    hand_network: &dyn Fn(&Tensor) -> Result<Tensor>,
    face_network: &dyn Fn(&Tensor) -> Result<Tensor>,
) -> Result<HandsAndFace> {
    let (h, w) = (image.height, image.width);
    let mut found = HandsAndFace::default();
    for hand in hand_boxes(person, h, w) {
        let pixels = crop(image, hand.area);
        if pixels.height == 0 || pixels.width == 0 {
            continue;
        }
        let peaks = hand_peaks(&pixels, device, hand_network)?;
        let points = Some(normalised(&peaks, hand.area, h, w));
        if hand.left {
            found.left_hand = points;
        } else {
            found.right_hand = points;
        }
    }
    if let Some(area) = face_box(person, h, w) {
        let pixels = crop(image, area);
        if pixels.height > 0 && pixels.width > 0 {
            let peaks = face_peaks(&pixels, device, face_network)?;
            if !peaks.is_empty() {
                found.face = Some(normalised(&peaks, area, h, w));
            }
        }
    }
    Ok(found)
}

/// matplotlib's `hsv_to_rgb([hue, 1, 1]) · 255`, as OpenCV takes the colour (rounded to the
/// nearest level, ties to even).
fn rainbow(hue: f64) -> [u8; 3] {
    let i = (hue * 6.0) as i64;
    let f = hue * 6.0 - i as f64;
    let (v, p, q, t) = (1.0, 0.0, 1.0 - f, 1.0 - (1.0 - f));
    let (r, g, b) = match i.rem_euclid(6) {
        0 => (v, t, p),
        1 => (q, v, p),
        2 => (p, v, t),
        3 => (p, q, v),
        4 => (t, p, v),
        _ => (v, p, q),
    };
    [r, g, b].map(|c: f64| (c * 255.0).round_ties_even().clamp(0.0, 255.0) as u8)
}

/// A normalised point back on a `width`×`height` canvas, as `int(k.x * W)` in float32.
fn on_canvas(point: [f32; 2], height: usize, width: usize) -> (i32, i32) {
    (
        (point[0] * width as f32) as i32,
        (point[1] * height as f32) as i32,
    )
}

/// `draw_handpose` on an RGB canvas.
pub fn draw_hand(canvas: &mut [u8], height: usize, width: usize, points: &[[f32; 2]]) {
    if points.len() < HAND_PARTS {
        return;
    }
    let beyond = |(x, y): (i32, i32)| x as f32 > DRAW_EPS && y as f32 > DRAW_EPS;
    for (k, &(a, b)) in HAND_EDGES.iter().enumerate() {
        let (p, q) = (
            on_canvas(points[a], height, width),
            on_canvas(points[b], height, width),
        );
        if beyond(p) && beyond(q) {
            let color = rainbow(k as f64 / HAND_EDGES.len() as f64);
            line(canvas, height, width, p, q, color, 2);
        }
    }
    for &point in points {
        let p = on_canvas(point, height, width);
        if beyond(p) {
            fill_circle(canvas, height, width, p, 4, [0, 0, 255]);
        }
    }
}

/// `draw_facepose` on an RGB canvas.
pub fn draw_face(canvas: &mut [u8], height: usize, width: usize, points: &[[f32; 2]]) {
    for &point in points {
        let (x, y) = on_canvas(point, height, width);
        if x as f32 > DRAW_EPS && y as f32 > DRAW_EPS {
            fill_circle(canvas, height, width, (x, y), 3, [255, 255, 255]);
        }
    }
}
