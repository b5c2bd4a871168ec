//! OpenCV's 8-connected drawing on u8 H×W×3 canvases, pixel for pixel.
//!
//! The OpenPose and hand-pose renderers (controlnet_aux `open_pose/util.py`) draw skeletons with
//! `cv2.ellipse2Poly` + `cv2.fillConvexPoly` (limbs), `cv2.circle(..., thickness=-1)` (joints)
//! and `cv2.line` (hand bones). What OpenCV computes (`modules/imgproc/src/drawing.cpp`), in
//! this module's words:
//!
//! * **`ellipse2Poly`** does no trigonometry: sines and cosines come from a table of
//!   `sin(k°)` rounded to 7 decimals and stored as f32, for k = 0..=450 (the cosine of k is the
//!   entry 450 − k). The rotation angle is brought into 0..=360 by whole turns, the arc ends are
//!   ordered and shifted by whole turns into 0..=360 (a span over 360 becomes 0..360), and the
//!   points `i = start, start + delta, …` (the last clamped to `end`) are
//!   `centre + (a·cos i·cos θ − b·sin i·sin θ, a·cos i·sin θ + b·sin i·cos θ)` in double
//!   precision (f32 table values widened), rounded to nearest with ties to even. Consecutive
//!   repeats are dropped; a single remaining point becomes two copies of the centre.
//! * **`fillConvexPoly`** (8-connected, no sub-pixel shift) first draws every edge as an
//!   8-connected line (this is what makes degenerate polygons, points and collinear sets, visible),
//!   then, unless there are fewer than three points or the bounding box misses the canvas, scans
//!   rows from the topmost vertex down with two edge walkers (one going forwards through the
//!   vertex list, one backwards). Each walker keeps x in 16.16 fixed point and advances by
//!   `((xe − xs)·2 + dy) / (2·dy)` (integer division toward zero) per row; a row is filled from
//!   `(x_left + ½) >> 16` to `(x_right + ½) >> 16`, clipped to the canvas. Rows above the canvas
//!   are walked but not drawn; the scan stops at the last canvas row or when the walkers have used
//!   up all the edges.
//! * **Lines** (`LINE_8`, thickness 1) are Bresenham walks over the major axis, always from the
//!   left end (for vertical lines from the first point), stepping the minor axis whenever the error
//!   term is negative before the step. A line with an end outside the canvas is first clipped to
//!   it (Cohen–Sutherland, with the crossing computed in double and truncated toward zero), which
//!   can change its slope slightly; a line entirely outside draws nothing.
//! * **Thick lines** (thickness t > 1): OpenCV 5 first clips the segment (as above) to the canvas
//!   grown by t pixels on every side (OpenCV 4.x does not; the two differ only for lines with an
//!   end outside the canvas). The segment then becomes a filled quadrilateral, computed in
//!   16.16 fixed point: the segment's unit normal times `t/2` (in 1/65536 pixel units, plus ½
//!   pixel when t is odd), rounded; the quadrilateral's edges are drawn with the fixed-point line
//!   walker (start rounded, y or x advanced by a truncated per-step increment, the rounded end
//!   point drawn as well), then filled as above with ½-pixel rounding of the vertices' rows. Both
//!   ends then get a filled circle of radius `(t + 1) / 2` (integer division) at the rounded end
//!   points.
//! * **Filled circles** (`thickness = -1`, `LINE_8`) use the midpoint circle walk: for each step
//!   (dx, dy) from (r, 0) until dx < dy, the rows `cy ± dy` are filled over `cx ± dx` and the rows
//!   `cy ± dx` over `cx ± dy`, clipped to the canvas (a circle entirely outside draws nothing;
//!   radius 0 is one pixel).
//!
//! Colours are written as given, byte for byte (the canvas's channel order is the caller's).
//! The code is written from this description, not copied from OpenCV.

use std::sync::OnceLock;

/// Fixed-point fraction bits of OpenCV's drawing code.
const XY_SHIFT: u32 = 16;
/// One pixel in 16.16 fixed point.
const XY_ONE: i64 = 1 << XY_SHIFT;

/// `sin(k°)` for k = 0..=450, rounded to 7 decimals and stored as f32, like OpenCV's table.
fn sin_table() -> &'static [f32; 451] {
    static TABLE: OnceLock<[f32; 451]> = OnceLock::new();
    TABLE.get_or_init(|| {
        let mut table = [0f32; 451];
        for (k, v) in table.iter_mut().enumerate() {
            let s = (k as f64).to_radians().sin();
            *v = ((s * 1e7).round() / 1e7) as f32;
        }
        table
    })
}

/// A u8 H×W×3 canvas being drawn on.
struct Canvas<'a> {
    data: &'a mut [u8],
    height: i64,
    width: i64,
    color: [u8; 3],
}

impl<'a> Canvas<'a> {
    fn new(data: &'a mut [u8], height: usize, width: usize, color: [u8; 3]) -> Self {
        assert_eq!(
            data.len(),
            height * width * 3,
            "canvas length does not match {height}x{width}x3"
        );
        Self {
            data,
            height: height as i64,
            width: width as i64,
            color,
        }
    }

    /// Colours one pixel if it is on the canvas.
    fn put(&mut self, x: i64, y: i64) {
        if (0..self.width).contains(&x) && (0..self.height).contains(&y) {
            let at = ((y * self.width + x) * 3) as usize;
            self.data[at..at + 3].copy_from_slice(&self.color);
        }
    }

    /// Colours `x1..=x2` of row `y`; the caller has clipped them to the canvas.
    fn span(&mut self, y: i64, x1: i64, x2: i64) {
        if x1 > x2 {
            return;
        }
        debug_assert!(0 <= y && y < self.height && 0 <= x1 && x2 < self.width);
        let start = ((y * self.width + x1) * 3) as usize;
        let end = ((y * self.width + x2 + 1) * 3) as usize;
        for px in self.data[start..end].chunks_exact_mut(3) {
            px.copy_from_slice(&self.color);
        }
    }
}

/// `cv2.ellipse2Poly(center, axes, angle, arc_start, arc_end, delta)`: the polygon OpenCV fills
/// for an ellipse (or arc), in integer pixel coordinates.
///
/// Panics unless `0 < delta <= 180` (OpenCV's assertion).
pub fn ellipse_to_polygon(
    center: (i32, i32),
    axes: (i32, i32),
    angle_degrees: i32,
    arc_start: i32,
    arc_end: i32,
    delta: i32,
) -> Vec<(i32, i32)> {
    assert!(
        0 < delta && delta <= 180,
        "delta must be in 1..=180, got {delta}"
    );
    let table = sin_table();
    let angle = whole_turns_into(angle_degrees as i64, 0, 360);
    let (mut start, mut end) = (arc_start as i64, arc_end as i64);
    if start > end {
        std::mem::swap(&mut start, &mut end);
    }
    if start < 0 {
        let turns = (-start + 359) / 360;
        start += 360 * turns;
        end += 360 * turns;
    }
    if end > 360 {
        let turns = (end - 360 + 359) / 360;
        end -= 360 * turns;
        start -= 360 * turns;
    }
    if end - start > 360 {
        start = 0;
        end = 360;
    }
    let cos_t = table[(450 - angle) as usize] as f64;
    let sin_t = table[angle as usize] as f64;
    let (cx, cy) = (center.0 as f64, center.1 as f64);
    let (a, b) = (axes.0 as f64, axes.1 as f64);

    let mut points: Vec<(i32, i32)> =
        Vec::with_capacity(((end - start) / delta as i64 + 2) as usize);
    let mut i = start;
    while i < end + delta as i64 {
        let mut k = i.min(end);
        if k < 0 {
            k += 360;
        }
        let x = a * table[(450 - k) as usize] as f64;
        let y = b * table[k as usize] as f64;
        let px = (cx + x * cos_t - y * sin_t).round_ties_even() as i32;
        let py = (cy + x * sin_t + y * cos_t).round_ties_even() as i32;
        if points.last() != Some(&(px, py)) {
            points.push((px, py));
        }
        i += delta as i64;
    }
    if points.len() == 1 {
        points = vec![center; 2];
    }
    points
}

/// `v` shifted by whole turns of 360 as OpenCV's `while` loops do: up until it is at least `lo`,
/// down until it is at most `hi`.
fn whole_turns_into(mut v: i64, lo: i64, hi: i64) -> i64 {
    if v < lo {
        v += 360 * ((lo - v + 359) / 360);
    }
    if v > hi {
        v -= 360 * ((v - hi + 359) / 360);
    }
    v
}

/// `cv2.fillConvexPoly(canvas, points, color)` (8-connected, shift 0) on a u8 H×W×3 canvas.
///
/// Degenerate input is drawn as OpenCV draws it: one or two points (or any polygon) leave their
/// 8-connected outline; nothing is drawn for an empty slice.
pub fn fill_convex_polygon(
    canvas: &mut [u8],
    height: usize,
    width: usize,
    points: &[(i32, i32)],
    color: [u8; 3],
) {
    let mut canvas = Canvas::new(canvas, height, width, color);
    let points: Vec<(i64, i64)> = points.iter().map(|&(x, y)| (x as i64, y as i64)).collect();
    fill_convex(&mut canvas, &points, 0);
}

/// `cv2.circle(canvas, center, radius, color, thickness=-1)` (8-connected) on a u8 H×W×3 canvas.
///
/// Panics if `radius` is negative (OpenCV's assertion).
pub fn fill_circle(
    canvas: &mut [u8],
    height: usize,
    width: usize,
    center: (i32, i32),
    radius: i32,
    color: [u8; 3],
) {
    assert!(radius >= 0, "radius must not be negative, got {radius}");
    let mut canvas = Canvas::new(canvas, height, width, color);
    filled_circle(
        &mut canvas,
        (center.0 as i64, center.1 as i64),
        radius as i64,
    );
}

/// `cv2.line(canvas, p1, p2, color, thickness, lineType=cv2.LINE_8)` on a u8 H×W×3 canvas.
///
/// Panics unless `1 <= thickness <= 32767` (OpenCV's assertion).
pub fn line(
    canvas: &mut [u8],
    height: usize,
    width: usize,
    p1: (i32, i32),
    p2: (i32, i32),
    color: [u8; 3],
    thickness: i32,
) {
    assert!(
        (1..=32767).contains(&thickness),
        "thickness must be in 1..=32767, got {thickness}"
    );
    let mut canvas = Canvas::new(canvas, height, width, color);
    let p1 = (p1.0 as i64, p1.1 as i64);
    let p2 = (p2.0 as i64, p2.1 as i64);
    if thickness == 1 {
        bresenham(&mut canvas, p1, p2);
    } else {
        thick_line(&mut canvas, p1, p2, thickness as i64);
    }
}

/// Clips a segment to `0..width × 0..height` like OpenCV's `clipLine`; returns whether any of
/// it is inside. The ends are moved onto the border along the segment.
fn clip_line(width: i64, height: i64, p1: &mut (i64, i64), p2: &mut (i64, i64)) -> bool {
    if width <= 0 || height <= 0 {
        return false;
    }
    let (right, bottom) = (width - 1, height - 1);
    let code = |p: (i64, i64)| {
        (p.0 < 0) as u8
            | ((p.0 > right) as u8) << 1
            | ((p.1 < 0) as u8) << 2
            | ((p.1 > bottom) as u8) << 3
    };
    let (mut c1, mut c2) = (code(*p1), code(*p2));
    // Moves `along` by the segment's slope for the change `to − from` of the other coordinate.
    let cross = |from: i64, to: i64, d_along: i64, d_other: i64| {
        ((to - from) as f64 * d_along as f64 / d_other as f64) as i64
    };
    if c1 & c2 == 0 && (c1 | c2) != 0 {
        if c1 & 12 != 0 {
            let a = if c1 < 8 { 0 } else { bottom };
            p1.0 += cross(p1.1, a, p2.0 - p1.0, p2.1 - p1.1);
            p1.1 = a;
            c1 = (p1.0 < 0) as u8 | ((p1.0 > right) as u8) << 1;
        }
        if c2 & 12 != 0 {
            let a = if c2 < 8 { 0 } else { bottom };
            p2.0 += cross(p2.1, a, p2.0 - p1.0, p2.1 - p1.1);
            p2.1 = a;
            c2 = (p2.0 < 0) as u8 | ((p2.0 > right) as u8) << 1;
        }
        if c1 & c2 == 0 && (c1 | c2) != 0 {
            if c1 != 0 {
                let a = if c1 == 1 { 0 } else { right };
                p1.1 += cross(p1.0, a, p2.1 - p1.1, p2.0 - p1.0);
                p1.0 = a;
                c1 = 0;
            }
            if c2 != 0 {
                let a = if c2 == 1 { 0 } else { right };
                p2.1 += cross(p2.0, a, p2.1 - p1.1, p2.0 - p1.0);
                p2.0 = a;
                c2 = 0;
            }
        }
    }
    (c1 | c2) == 0
}

/// OpenCV's integer 8-connected line (`LineIterator`, left to right).
fn bresenham(canvas: &mut Canvas, p1: (i64, i64), p2: (i64, i64)) {
    let (mut p1, mut p2) = (p1, p2);
    let outside = |p: (i64, i64)| {
        // OpenCV tests the ends as 32-bit ints cast to unsigned.
        (p.0 as i32 as u32) >= canvas.width as u32 || (p.1 as i32 as u32) >= canvas.height as u32
    };
    if (outside(p1) || outside(p2)) && !clip_line(canvas.width, canvas.height, &mut p1, &mut p2) {
        return;
    }
    let (mut dx, mut dy) = (p2.0 - p1.0, p2.1 - p1.1);
    let mut start = p1;
    if dx < 0 {
        dx = -dx;
        dy = -dy;
        start = p2;
    }
    let (mut step_x, mut step_y) = (1i64, 1i64);
    if dy < 0 {
        dy = -dy;
        step_y = -1;
    }
    let vertical = dy > dx;
    if vertical {
        std::mem::swap(&mut dx, &mut dy);
        std::mem::swap(&mut step_x, &mut step_y);
    }
    // Major-axis step always, minor-axis step when the error is negative before the step.
    let (major, minor) = if vertical {
        ((0, step_x), (step_y, 0))
    } else {
        ((step_x, 0), (0, step_y))
    };
    let mut err = dx - 2 * dy;
    let mut p = start;
    for _ in 0..=dx {
        canvas.put(p.0, p.1);
        let negative = err < 0;
        err += -2 * dy + if negative { 2 * dx } else { 0 };
        p.0 += major.0 + if negative { minor.0 } else { 0 };
        p.1 += major.1 + if negative { minor.1 } else { 0 };
    }
}

/// OpenCV's 8-connected line between 16.16 fixed-point ends (`Line2`).
fn fixed_point_line(canvas: &mut Canvas, p1: (i64, i64), p2: (i64, i64)) {
    let (mut p1, mut p2) = (p1, p2);
    if !clip_line(
        canvas.width << XY_SHIFT,
        canvas.height << XY_SHIFT,
        &mut p1,
        &mut p2,
    ) {
        return;
    }
    let (dx, dy) = (p2.0 - p1.0, p2.1 - p1.1);
    let x_major = dx.abs() > dy.abs();
    let (x_step, y_step, mut count);
    if x_major {
        if dx < 0 {
            std::mem::swap(&mut p1, &mut p2);
        }
        let dy = if dx < 0 { -dy } else { dy };
        x_step = XY_ONE;
        y_step = dy * XY_ONE / (dx.abs() | 1);
        count = (p2.0 - p1.0) >> XY_SHIFT;
    } else {
        if dy < 0 {
            std::mem::swap(&mut p1, &mut p2);
        }
        let dx = if dy < 0 { -dx } else { dx };
        x_step = dx * XY_ONE / (dy.abs() | 1);
        y_step = XY_ONE;
        count = (p2.1 - p1.1) >> XY_SHIFT;
    }
    let half = XY_ONE >> 1;
    canvas.put((p2.0 + half) >> XY_SHIFT, (p2.1 + half) >> XY_SHIFT);
    let (mut x, mut y) = (p1.0 + half, p1.1 + half);
    if x_major {
        x >>= XY_SHIFT;
        while count >= 0 {
            canvas.put(x, y >> XY_SHIFT);
            x += 1;
            y += y_step;
            count -= 1;
        }
    } else {
        y >>= XY_SHIFT;
        while count >= 0 {
            canvas.put(x >> XY_SHIFT, y);
            x += x_step;
            y += 1;
            count -= 1;
        }
    }
}

/// One edge walker of the convex fill.
#[derive(Debug, Clone, Copy)]
struct EdgeWalker {
    idx: usize,
    step: usize,
    x: i64,
    dx: i64,
    y_end: i64,
}

/// OpenCV's `FillConvexPoly` for 8-connected drawing; `shift` is the vertices' fraction bits.
fn fill_convex(canvas: &mut Canvas, v: &[(i64, i64)], shift: u32) {
    let n = v.len();
    if n == 0 {
        return;
    }
    let up = XY_SHIFT - shift;
    let delta = (1i64 << shift) >> 1;
    let half = XY_ONE >> 1;

    // Outline first.
    let mut previous = (v[n - 1].0 << up, v[n - 1].1 << up);
    let (mut xmin, mut xmax, mut ymin, mut ymax) = (v[0].0, v[0].0, v[0].1, v[0].1);
    let mut top = 0;
    for (i, &p) in v.iter().enumerate() {
        if p.1 < ymin {
            ymin = p.1;
            top = i;
        }
        ymax = ymax.max(p.1);
        xmax = xmax.max(p.0);
        xmin = xmin.min(p.0);
        let scaled = (p.0 << up, p.1 << up);
        if shift == 0 {
            bresenham(
                canvas,
                (previous.0 >> XY_SHIFT, previous.1 >> XY_SHIFT),
                (scaled.0 >> XY_SHIFT, scaled.1 >> XY_SHIFT),
            );
        } else {
            fixed_point_line(canvas, previous, scaled);
        }
        previous = scaled;
    }
    let xmin = ((xmin + delta) >> shift) as i32 as i64;
    let xmax = ((xmax + delta) >> shift) as i32 as i64;
    let ymin = ((ymin + delta) >> shift) as i32 as i64;
    let ymax = ((ymax + delta) >> shift) as i32 as i64;
    if n < 3 || xmax < 0 || ymax < 0 || xmin >= canvas.width || ymin >= canvas.height {
        return;
    }
    let ymax = ymax.min(canvas.height - 1);

    let start = EdgeWalker {
        idx: top,
        step: 1,
        x: -XY_ONE,
        dx: 0,
        y_end: ymin,
    };
    let mut walkers = [
        start,
        EdgeWalker {
            step: n - 1,
            ..start
        },
    ];
    // Edges not yet taken by a walker; the scan ends once it goes negative.
    let mut edges_left = n as i64;
    let mut y = ymin;
    loop {
        for walker in &mut walkers {
            if y < walker.y_end {
                continue;
            }
            let mut from = walker.idx;
            let mut to = (from + walker.step) % n;
            loop {
                let had_edge = edges_left > 0;
                edges_left -= 1;
                if !had_edge {
                    break;
                }
                let to_y = (v[to].1 + delta) >> shift;
                if to_y > y {
                    let xs = v[from].0 << up;
                    let xe = v[to].0 << up;
                    let rows = to_y - y;
                    walker.y_end = to_y;
                    walker.dx = ((xe - xs) * 2 + rows) / (2 * rows);
                    walker.x = xs;
                    walker.idx = to;
                    break;
                }
                from = to;
                to = (to + walker.step) % n;
            }
        }
        if edges_left < 0 {
            break;
        }
        if y >= 0 {
            let (left, right) = if walkers[0].x > walkers[1].x {
                (walkers[1], walkers[0])
            } else {
                (walkers[0], walkers[1])
            };
            let x1 = ((left.x + half) >> XY_SHIFT) as i32 as i64;
            let x2 = ((right.x + half) >> XY_SHIFT) as i32 as i64;
            if x2 >= 0 && x1 < canvas.width {
                canvas.span(y, x1.max(0), x2.min(canvas.width - 1));
            }
        }
        walkers[0].x += walkers[0].dx;
        walkers[1].x += walkers[1].dx;
        y += 1;
        if y > ymax {
            break;
        }
    }
}

/// OpenCV's filled midpoint circle (`Circle` with `fill`).
fn filled_circle(canvas: &mut Canvas, center: (i64, i64), radius: i64) {
    let (cx, cy) = center;
    let (w, h) = (canvas.width, canvas.height);
    let inside = cx >= radius && cx < w - radius && cy >= radius && cy < h - radius;
    let (mut err, mut dx, mut dy, mut plus, mut minus) = (0i64, radius, 0i64, 1i64, 2 * radius - 1);
    while dx >= dy {
        let (y11, y12, y21, y22) = (cy - dy, cy + dy, cy - dx, cy + dx);
        let (x11, x12, x21, x22) = (cx - dx, cx + dx, cx - dy, cx + dy);
        if inside {
            canvas.span(y11, x11, x12);
            canvas.span(y12, x11, x12);
            canvas.span(y21, x21, x22);
            canvas.span(y22, x21, x22);
        } else if x11 < w && x12 >= 0 && y21 < h && y22 >= 0 {
            let (xa, xb) = (x11.max(0), x12.min(w - 1));
            for y in [y11, y12] {
                if (0..h).contains(&y) {
                    canvas.span(y, xa, xb);
                }
            }
            if x21 < w && x22 >= 0 {
                let (xa, xb) = (x21.max(0), x22.min(w - 1));
                for y in [y21, y22] {
                    if (0..h).contains(&y) {
                        canvas.span(y, xa, xb);
                    }
                }
            }
        }
        dy += 1;
        err += plus;
        plus += 2;
        if err > 0 {
            err -= minus;
            dx -= 1;
            minus -= 2;
        }
    }
}

/// OpenCV's `ThickLine` for 8-connected lines wider than one pixel.
fn thick_line(canvas: &mut Canvas, p0: (i64, i64), p1: (i64, i64), thickness: i64) {
    // OpenCV 5 first clips the segment to the canvas grown by `thickness` on every side (its
    // end caps then fall outside the canvas); a segment missing that area draws nothing.
    let margin = thickness;
    let mut a = (p0.0 + margin, p0.1 + margin);
    let mut b = (p1.0 + margin, p1.1 + margin);
    if !clip_line(
        canvas.width + 2 * margin,
        canvas.height + 2 * margin,
        &mut a,
        &mut b,
    ) {
        return;
    }
    let p0 = ((a.0 - margin) << XY_SHIFT, (a.1 - margin) << XY_SHIFT);
    let p1 = ((b.0 - margin) << XY_SHIFT, (b.1 - margin) << XY_SHIFT);
    let inv_one = 1.0 / XY_ONE as f64;
    let dx = (p0.0 - p1.0) as f64 * inv_one;
    let dy = (p1.1 - p0.1) as f64 * inv_one;
    let r2 = dx * dx + dy * dy;
    let odd = thickness & 1;
    let half_width = thickness << (XY_SHIFT - 1);
    if r2.abs() > f64::EPSILON {
        let r = (half_width as f64 + odd as f64 * XY_ONE as f64 * 0.5) / r2.sqrt();
        let ox = (dy * r).round_ties_even() as i32 as i64;
        let oy = (dx * r).round_ties_even() as i32 as i64;
        let quad = [
            (p0.0 + ox, p0.1 + oy),
            (p0.0 - ox, p0.1 - oy),
            (p1.0 - ox, p1.1 - oy),
            (p1.0 + ox, p1.1 + oy),
        ];
        fill_convex(canvas, &quad, XY_SHIFT);
    }
    let radius = (half_width + (XY_ONE >> 1)) >> XY_SHIFT;
    for p in [p0, p1] {
        let center = (
            (p.0 + (XY_ONE >> 1)) >> XY_SHIFT,
            (p.1 + (XY_ONE >> 1)) >> XY_SHIFT,
        );
        filled_circle(canvas, center, radius);
    }
}
