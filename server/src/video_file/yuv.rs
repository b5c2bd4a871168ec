//! Decoded 4:2:0 pictures to RGB, with the stream's own colour matrix and range.

use super::avc::Matrix;

/// A decoded picture, as OpenH264 hands it out.
pub use crate::webrtc::h264::YuvPicture;

/// Packed RGB8 of a 4:2:0 picture, each chroma sample shared by its 2×2 block. `matrix` and
/// `full_range` come from the stream's SPS; an untagged stream is BT.601 video range.
pub fn to_rgb(picture: &YuvPicture, matrix: Matrix, full_range: bool) -> Vec<u8> {
    // Kr, Kb of each matrix.
    let (kr, kb) = match matrix {
        Matrix::Bt601 => (0.299, 0.114),
        Matrix::Bt709 => (0.2126, 0.0722),
        Matrix::Bt2020 => (0.2627, 0.0593),
    };
    let kg = 1.0 - kr - kb;
    let (y_scale, y_off, c_scale) = if full_range {
        (1.0, 0.0, 1.0)
    } else {
        (255.0 / 219.0, 16.0, 255.0 / 224.0)
    };
    // Fixed point, 16 fractional bits.
    let fix = |x: f64| (x * 65536.0).round() as i32;
    let ys = fix(y_scale);
    let rv = fix(c_scale * 2.0 * (1.0 - kr));
    let bu = fix(c_scale * 2.0 * (1.0 - kb));
    let gu = fix(c_scale * 2.0 * (1.0 - kb) * kb / kg);
    let gv = fix(c_scale * 2.0 * (1.0 - kr) * kr / kg);
    let y_off = y_off as i32;
    let cw = picture.width.div_ceil(2);
    let mut rgb = vec![0u8; picture.width * picture.height * 3];
    let clamp = |v: i32| ((v + 32768) >> 16).clamp(0, 255) as u8;
    for row in 0..picture.height {
        let y_row = &picture.y[row * picture.width..(row + 1) * picture.width];
        let c_row = (row / 2) * cw;
        let out = &mut rgb[row * picture.width * 3..(row + 1) * picture.width * 3];
        for (col, px) in out.chunks_exact_mut(3).enumerate() {
            let l = (i32::from(y_row[col]) - y_off) * ys;
            let u = i32::from(picture.u[c_row + col / 2]) - 128;
            let v = i32::from(picture.v[c_row + col / 2]) - 128;
            px[0] = clamp(l + rv * v);
            px[1] = clamp(l - gu * u - gv * v);
            px[2] = clamp(l + bu * u);
        }
    }
    rgb
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greys_and_primaries_come_out_right() {
        let grey = |level: u8| YuvPicture {
            width: 2,
            height: 2,
            y: vec![level; 4],
            u: vec![128],
            v: vec![128],
        };
        assert_eq!(to_rgb(&grey(16), Matrix::Bt601, false), vec![0; 12]);
        assert_eq!(to_rgb(&grey(235), Matrix::Bt601, false), vec![255; 12]);
        assert_eq!(to_rgb(&grey(200), Matrix::Bt709, true), vec![200; 12]);
        // BT.601 video-range red: Y 81, Cb 90, Cr 240.
        let red = YuvPicture {
            width: 2,
            height: 2,
            y: vec![81; 4],
            u: vec![90],
            v: vec![240],
        };
        let px = to_rgb(&red, Matrix::Bt601, false);
        assert!(px[0] >= 253 && px[1] <= 2 && px[2] <= 2, "{px:?}");
    }
}
