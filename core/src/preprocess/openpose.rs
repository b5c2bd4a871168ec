//! OpenPose's body keypoint decoding as controlnet_aux 0.0.10 does it (`open_pose/body.py`,
//! `Body.__call__` after the network's maps are resized to the image; `format_body_result`;
//! the normalisation in `OpenposeDetector.detect_poses`; what `util.draw_bodypose` draws).
//!
//! The steps, each reproducing the Python's float64 arithmetic operation for operation:
//!
//! 1. **Peaks** ([`find_peaks`]): per part (the first 18 heatmap channels; the 19th, the
//!    background, is unused) the heatmap is smoothed with [`gaussian_filter`] (σ = 3, as
//!    `scipy.ndimage.gaussian_filter`), and a pixel is a peak when its smoothed value is ≥ each
//!    of its four neighbours (zero outside the image) and > 0.1. Peaks are listed in row-major
//!    order; their score is the *unsmoothed* heatmap value; ids count up over all parts.
//! 2. **Limbs** ([`connect_limbs`]): for each of 19 limbs and each pair of peaks of its two
//!    parts, the part affinity field is sampled at 10 points evenly spaced from the first peak
//!    to the second (numpy's `linspace`, rounded half to even as Python's `round`), and dotted
//!    with the pair's unit direction. A pair is a candidate when more than 8 of the 10 samples
//!    exceed 0.05 and their mean, plus the distance prior min(0.5·H/length − 1, 0), is > 0.
//!    Candidates are taken greedily by that score (ties in their listing order) while neither
//!    peak is used yet, until min(#first peaks, #second peaks) are chosen.
//! 3. **People** ([`assemble_people`]): controlnet_aux's grouping, quirks included. Limbs are
//!    taken in [`LIMBS`] order. A connection whose first or second peak is in exactly one group
//!    puts its second peak into that group unless it is there already; if that part's slot holds
//!    another peak, the peak is replaced and still counted as one more part. A connection that
//!    touches two groups merges them when no part slot is filled in both; otherwise its second
//!    peak is put into the first group and counted, even if it was there. A connection that
//!    touches none starts a group, except on the last two limbs (shoulder–ear). Groups with
//!    fewer than 4 parts counted or a mean score below 0.4 are dropped. A group's score sums its
//!    peaks' scores and its connections' scores (a merge adds the joining connection's).
//! 4. **Result** ([`decode_people`]): keypoints at (x / W, y / H), as `detect_poses` returns.
//! 5. **Strokes** ([`body_strokes`]): the ellipses and circles `draw_bodypose` asks OpenCV to
//!    fill, as data for a rasteriser that reproduces `cv2.ellipse2Poly`/`cv2.fillConvexPoly`
//!    and `cv2.circle`.
//!
//! Maps are **planar** f64 slices: channel `c`, row `y`, column `x` at `c·H·W + y·W + x` (the
//! layout of the network's output resized channel by channel; controlnet_aux's `heatmap_avg`
//! and `paf_avg` hold the same values interleaved, `[H, W, C]`).
//!
//! One deliberate difference: a connection touching three or more groups makes controlnet_aux
//! raise `IndexError` (it stores the matches in a two-element list); here it is handled as if
//! only the first two groups had matched.

/// Body parts (COCO order: nose, neck, right shoulder, elbow, wrist, left shoulder, elbow,
/// wrist, right hip, knee, ankle, left hip, knee, ankle, right eye, left eye, right ear, left
/// ear).
pub const PART_COUNT: usize = 18;
/// Heatmap channels the network gives (the parts and the background).
pub const HEATMAP_CHANNELS: usize = 19;
/// Part affinity field channels the network gives (x and y of 19 limbs).
pub const PAF_CHANNELS: usize = 38;

/// The limbs as (first part, second part), in controlnet_aux's order (`limbSeq` − 1). The
/// first 17 are drawn; the last two (shoulder to ear) only help grouping.
pub const LIMBS: [(usize, usize); 19] = [
    (1, 2),
    (1, 5),
    (2, 3),
    (3, 4),
    (5, 6),
    (6, 7),
    (1, 8),
    (8, 9),
    (9, 10),
    (1, 11),
    (11, 12),
    (12, 13),
    (1, 0),
    (0, 14),
    (14, 16),
    (0, 15),
    (15, 17),
    (2, 16),
    (5, 17),
];

/// The part affinity field channels (x, y) of each limb of [`LIMBS`] (`mapIdx` − 19).
pub const LIMB_PAF_CHANNELS: [(usize, usize); 19] = [
    (12, 13),
    (20, 21),
    (14, 15),
    (16, 17),
    (22, 23),
    (24, 25),
    (0, 1),
    (2, 3),
    (4, 5),
    (6, 7),
    (8, 9),
    (10, 11),
    (28, 29),
    (30, 31),
    (34, 35),
    (32, 33),
    (36, 37),
    (18, 19),
    (26, 27),
];

/// `draw_bodypose`'s colours: limb `k` of [`LIMBS`] uses `COLORS[k]` (scaled by 0.6), part `p`
/// uses `COLORS[p]`. Passed to OpenCV as they are, so on controlnet_aux's canvas (which it
/// returns as RGB) they are RGB.
pub const COLORS: [[u8; 3]; 18] = [
    [255, 0, 0],
    [255, 85, 0],
    [255, 170, 0],
    [255, 255, 0],
    [170, 255, 0],
    [85, 255, 0],
    [0, 255, 0],
    [0, 255, 85],
    [0, 255, 170],
    [0, 255, 255],
    [0, 170, 255],
    [0, 85, 255],
    [0, 0, 255],
    [85, 0, 255],
    [170, 0, 255],
    [255, 0, 255],
    [255, 0, 170],
    [255, 0, 85],
];

/// Smoothing of the heatmaps before peak search (`sigma=3`).
const HEATMAP_SIGMA: f64 = 3.0;
/// Smoothed value a peak must exceed (`thre1`).
const PEAK_THRESHOLD: f64 = 0.1;
/// Field projection a limb sample must exceed (`thre2`).
const PAF_THRESHOLD: f64 = 0.05;
/// Samples along a candidate limb (`mid_num`).
const PAF_SAMPLES: usize = 10;
/// Limbs drawn by `draw_bodypose` (the first 17 of [`LIMBS`]).
const DRAWN_LIMBS: usize = 17;
/// Half-width of a drawn limb ellipse and radius of a joint circle (`stickwidth`, 4).
const STICK_WIDTH: i32 = 4;

/// A heatmap peak: a candidate position of one part.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Peak {
    /// Column in the image.
    pub x: usize,
    /// Row in the image.
    pub y: usize,
    /// The unsmoothed heatmap value there.
    pub score: f64,
    /// Index among all peaks of all parts (peaks of part 0 first, each part in row-major order).
    pub id: usize,
}

/// A chosen limb: two peaks joined (a row of controlnet_aux's `connection_all[k]`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Connection {
    /// [`Peak::id`] of the limb's first part.
    pub id_a: usize,
    /// [`Peak::id`] of the limb's second part.
    pub id_b: usize,
    /// Mean field projection plus distance prior.
    pub score: f64,
    /// Index of the first peak among its part's peaks.
    pub index_a: usize,
    /// Index of the second peak among its part's peaks.
    pub index_b: usize,
}

/// A group of peaks forming one person (a row of controlnet_aux's `subset`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Skeleton {
    /// [`Peak::id`] per part, if the part was found.
    pub parts: [Option<usize>; PART_COUNT],
    /// Sum of its peaks' and connections' scores (`subset[:, 18]`).
    pub total_score: f64,
    /// Parts counted (`subset[:, 19]`; can exceed the parts present, module docs).
    pub total_parts: f64,
}

/// A detected keypoint.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Keypoint {
    /// Column divided by the image width.
    pub x: f64,
    /// Row divided by the image height.
    pub y: f64,
    /// The unsmoothed heatmap value at the peak (`format_body_result`'s score; `detect_poses`
    /// itself drops it).
    pub score: f64,
    /// The peak's [`Peak::id`].
    pub id: usize,
    /// The peak's (column, row) in the image: `format_body_result`'s coordinates, which the
    /// hand and face boxes are computed from.
    pub pixel: [usize; 2],
}

/// A detected person: controlnet_aux's `BodyResult` after `detect_poses`' normalisation.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Person {
    /// One entry per part ([`PART_COUNT`], COCO order), `None` where not found.
    pub keypoints: [Option<Keypoint>; PART_COUNT],
    /// [`Skeleton::total_score`].
    pub total_score: f64,
    /// [`Skeleton::total_parts`].
    pub total_parts: f64,
}

/// What `draw_bodypose` asks OpenCV to draw, in drawing order. Coordinates are (x, y) pixels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stroke {
    /// `cv2.fillConvexPoly(canvas, cv2.ellipse2Poly(center, axes, angle, 0, 360, 1), color)`.
    Limb {
        /// Ellipse centre.
        center: [i32; 2],
        /// Half-axes: (half the limb length, 4).
        axes: [i32; 2],
        /// Rotation in whole degrees.
        angle: i32,
        /// The limb's colour times 0.6, truncated.
        color: [u8; 3],
    },
    /// `cv2.circle(canvas, center, radius, color, thickness=-1)`.
    Joint {
        /// Circle centre.
        center: [i32; 2],
        /// Radius (4).
        radius: i32,
        /// The part's colour.
        color: [u8; 3],
    },
}

/// numpy's `sum` of a float64 array: pairwise summation (blocks of up to 128 with eight
/// accumulators), which is what `_gaussian_kernel1d`'s normalisation uses.
pub(crate) fn numpy_sum(values: &[f64]) -> f64 {
    let n = values.len();
    if n < 8 {
        let mut sum = -0.0;
        for &v in values {
            sum += v;
        }
        sum
    } else if n <= 128 {
        let mut acc = [0.0; 8];
        acc.copy_from_slice(&values[..8]);
        let whole = n - n % 8;
        let mut i = 8;
        while i < whole {
            for (a, &v) in acc.iter_mut().zip(&values[i..i + 8]) {
                *a += v;
            }
            i += 8;
        }
        let mut sum =
            ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
        for &v in &values[whole..] {
            sum += v;
        }
        sum
    } else {
        let half = n / 2;
        let half = half - half % 8;
        numpy_sum(&values[..half]) + numpy_sum(&values[half..])
    }
}

/// scipy's 1-D Gaussian weights for `sigma`: radius `int(4σ + 0.5)`, `exp(−0.5/σ² · x²)`
/// normalised by their numpy sum (symmetric, so scipy's reversal for correlation is moot).
fn gaussian_weights(sigma: f64) -> Vec<f64> {
    let radius = (4.0 * sigma + 0.5) as i64;
    let factor = -0.5 / (sigma * sigma);
    let phi: Vec<f64> = (-radius..=radius)
        .map(|x| (factor * (x * x) as f64).exp())
        .collect();
    let total = numpy_sum(&phi);
    phi.iter().map(|p| p / total).collect()
}

/// Index `i` (possibly outside `0..n`) mirrored into the line as scipy's mode `'reflect'` does
/// (`d c b a | a b c d | d c b a`, repeating for lines shorter than the filter).
fn reflect(i: isize, n: usize) -> usize {
    let period = 2 * n as isize;
    let m = i.rem_euclid(period) as usize;
    if m < n { m } else { 2 * n - 1 - m }
}

/// Correlates `count` lines of `len` samples (sample `s` of line `l` at
/// `l·line_stride + s·sample_stride`) with symmetric `weights`, as scipy's `correlate1d` does
/// for a symmetric filter: `x[i]·w[0] + Σ_{d=r…1} (x[i−d] + x[i+d])·w[d]`, outermost pair first.
fn correlate_lines(
    input: &[f64],
    output: &mut [f64],
    count: usize,
    len: usize,
    line_stride: usize,
    sample_stride: usize,
    weights: &[f64],
) {
    let radius = weights.len() / 2;
    let mut line = vec![0.0; len + 2 * radius];
    for l in 0..count {
        let base = l * line_stride;
        for (k, v) in line.iter_mut().enumerate() {
            let s = reflect(k as isize - radius as isize, len);
            *v = input[base + s * sample_stride];
        }
        for i in 0..len {
            let c = i + radius;
            let mut acc = line[c] * weights[radius];
            for d in (1..=radius).rev() {
                acc += (line[c - d] + line[c + d]) * weights[radius - d];
            }
            output[base + i * sample_stride] = acc;
        }
    }
}

/// `scipy.ndimage.gaussian_filter(x, sigma)` of a `height`×`width` row-major float64 image
/// (mode 'reflect', truncate 4): along the rows' axis (0) first, then along the columns' axis,
/// with scipy's weights and summation order. A σ ≤ 1e−15 leaves the image as it is, as scipy
/// skips such axes.
///
/// # Panics
/// If `input.len() != height * width`.
pub fn gaussian_filter(input: &[f64], height: usize, width: usize, sigma: f64) -> Vec<f64> {
    assert_eq!(
        input.len(),
        height * width,
        "gaussian_filter: size mismatch"
    );
    if sigma <= 1e-15 || input.is_empty() {
        return input.to_vec();
    }
    let weights = gaussian_weights(sigma);
    let mut columns = vec![0.0; input.len()];
    correlate_lines(input, &mut columns, width, height, 1, width, &weights);
    let mut out = vec![0.0; input.len()];
    correlate_lines(&columns, &mut out, height, width, width, 1, &weights);
    out
}

/// The peaks of each of the [`PART_COUNT`] parts (step 1 of the module docs) in `heatmaps`,
/// planar `[≥ 18, height, width]` (only the first 18 channels are read).
///
/// # Panics
/// If `heatmaps` holds fewer than 18 planes of `height`×`width`.
pub fn find_peaks(heatmaps: &[f64], height: usize, width: usize) -> Vec<Vec<Peak>> {
    let n = height * width;
    assert!(
        heatmaps.len() >= PART_COUNT * n,
        "find_peaks: {} values for {PART_COUNT} planes of {height}x{width}",
        heatmaps.len()
    );
    let mut next_id = 0;
    let mut peaks = Vec::with_capacity(PART_COUNT);
    for part in 0..PART_COUNT {
        let plane = &heatmaps[part * n..(part + 1) * n];
        let smooth = gaussian_filter(plane, height, width, HEATMAP_SIGMA);
        let at = |y: usize, x: usize| smooth[y * width + x];
        let mut found = Vec::new();
        for y in 0..height {
            for x in 0..width {
                let v = at(y, x);
                let above = if y > 0 { at(y - 1, x) } else { 0.0 };
                let below = if y + 1 < height { at(y + 1, x) } else { 0.0 };
                let left = if x > 0 { at(y, x - 1) } else { 0.0 };
                let right = if x + 1 < width { at(y, x + 1) } else { 0.0 };
                if v >= above && v >= below && v >= left && v >= right && v > PEAK_THRESHOLD {
                    found.push(Peak {
                        x,
                        y,
                        score: plane[y * width + x],
                        id: next_id,
                    });
                    next_id += 1;
                }
            }
        }
        peaks.push(found);
    }
    peaks
}

/// Sample `i` of numpy's `linspace(start, stop, num=PAF_SAMPLES)`: `i·step + start` with
/// `step = (stop − start)/(num − 1)`, the last one exactly `stop`.
fn linspace_at(start: f64, stop: f64, i: usize) -> f64 {
    if i == PAF_SAMPLES - 1 {
        stop
    } else {
        i as f64 * ((stop - start) / (PAF_SAMPLES - 1) as f64) + start
    }
}

/// The connections chosen for each limb of [`LIMBS`] (step 2 of the module docs) from the
/// peaks of [`find_peaks`] and `pafs`, planar `[38, height, width]`; `None` for a limb one of
/// whose parts has no peak (controlnet_aux's `special_k`).
///
/// # Panics
/// If `peaks` does not hold 18 parts, `pafs` does not hold 38 planes of `height`×`width`, or a
/// peak lies outside them.
pub fn connect_limbs(
    peaks: &[Vec<Peak>],
    pafs: &[f64],
    height: usize,
    width: usize,
) -> Vec<Option<Vec<Connection>>> {
    let n = height * width;
    assert_eq!(peaks.len(), PART_COUNT, "connect_limbs: peaks of 18 parts");
    assert_eq!(
        pafs.len(),
        PAF_CHANNELS * n,
        "connect_limbs: {} values for {PAF_CHANNELS} planes of {height}x{width}",
        pafs.len()
    );
    let mut all = Vec::with_capacity(LIMBS.len());
    for (&(part_a, part_b), &(ch_x, ch_y)) in LIMBS.iter().zip(&LIMB_PAF_CHANNELS) {
        let (cand_a, cand_b) = (&peaks[part_a], &peaks[part_b]);
        if cand_a.is_empty() || cand_b.is_empty() {
            all.push(None);
            continue;
        }
        let field_x = &pafs[ch_x * n..(ch_x + 1) * n];
        let field_y = &pafs[ch_y * n..(ch_y + 1) * n];
        // (index in cand_a, index in cand_b, score), in the order the pairs are tried.
        let mut candidates: Vec<(usize, usize, f64)> = Vec::new();
        for (i, a) in cand_a.iter().enumerate() {
            for (j, b) in cand_b.iter().enumerate() {
                let dx = b.x as i64 - a.x as i64;
                let dy = b.y as i64 - a.y as i64;
                let norm = ((dx * dx + dy * dy) as f64).sqrt().max(0.001);
                let (ux, uy) = (dx as f64 / norm, dy as f64 / norm);
                let mut projections = [0.0; PAF_SAMPLES];
                for (s, p) in projections.iter_mut().enumerate() {
                    let sx = linspace_at(a.x as f64, b.x as f64, s);
                    let sy = linspace_at(a.y as f64, b.y as f64, s);
                    let at = sy.round_ties_even() as usize * width + sx.round_ties_even() as usize;
                    *p = field_x[at] * ux + field_y[at] * uy;
                }
                // Python's built-in `sum`: left to right.
                let mut sum = 0.0;
                for &p in &projections {
                    sum += p;
                }
                let prior = (0.5 * height as f64 / norm - 1.0).min(0.0);
                let score = sum / PAF_SAMPLES as f64 + prior;
                let above = projections.iter().filter(|&&p| p > PAF_THRESHOLD).count();
                if above as f64 > 0.8 * PAF_SAMPLES as f64 && score > 0.0 {
                    candidates.push((i, j, score));
                }
            }
        }
        // Python's sorted(reverse=True) is stable: equal scores keep their order.
        candidates.sort_by(|p, q| q.2.total_cmp(&p.2));
        let limit = cand_a.len().min(cand_b.len());
        let mut chosen: Vec<Connection> = Vec::new();
        for (i, j, score) in candidates {
            let used = chosen.iter().any(|c| c.index_a == i || c.index_b == j);
            if !used {
                chosen.push(Connection {
                    id_a: cand_a[i].id,
                    id_b: cand_b[j].id,
                    score,
                    index_a: i,
                    index_b: j,
                });
                if chosen.len() >= limit {
                    break;
                }
            }
        }
        all.push(Some(chosen));
    }
    all
}

/// Groups the connections of [`connect_limbs`] into people and drops the weak groups (step 3
/// of the module docs), in controlnet_aux's order. `peaks` gives each id's score.
///
/// # Panics
/// If `connections` does not hold 19 limbs or names a peak id that `peaks` lacks.
pub fn assemble_people(
    peaks: &[Vec<Peak>],
    connections: &[Option<Vec<Connection>>],
) -> Vec<Skeleton> {
    assert_eq!(connections.len(), LIMBS.len(), "assemble_people: 19 limbs");
    let scores: Vec<f64> = peaks.iter().flatten().map(|p| p.score).collect();
    let mut groups: Vec<Skeleton> = Vec::new();
    for (k, (limb, &(part_a, part_b))) in connections.iter().zip(&LIMBS).enumerate() {
        let Some(limb) = limb else { continue };
        for c in limb {
            let mut matches = [0usize; 2];
            let mut found = 0;
            for (j, g) in groups.iter().enumerate() {
                if g.parts[part_a] == Some(c.id_a) || g.parts[part_b] == Some(c.id_b) {
                    // controlnet_aux raises IndexError on a third match (module docs).
                    if found < 2 {
                        matches[found] = j;
                    }
                    found += 1;
                }
            }
            match found {
                0 => {
                    // The shoulder–ear limbs never start a group.
                    if k < 17 {
                        let mut parts = [None; PART_COUNT];
                        parts[part_a] = Some(c.id_a);
                        parts[part_b] = Some(c.id_b);
                        groups.push(Skeleton {
                            parts,
                            total_score: (scores[c.id_a] + scores[c.id_b]) + c.score,
                            total_parts: 2.0,
                        });
                    }
                }
                1 => {
                    let g = &mut groups[matches[0]];
                    if g.parts[part_b] != Some(c.id_b) {
                        g.parts[part_b] = Some(c.id_b);
                        g.total_parts += 1.0;
                        g.total_score += scores[c.id_b] + c.score;
                    }
                }
                _ => {
                    let [j1, j2] = matches;
                    let overlap = (0..PART_COUNT)
                        .any(|p| groups[j1].parts[p].is_some() && groups[j2].parts[p].is_some());
                    if overlap {
                        let g = &mut groups[j1];
                        g.parts[part_b] = Some(c.id_b);
                        g.total_parts += 1.0;
                        g.total_score += scores[c.id_b] + c.score;
                    } else {
                        let other = groups.remove(j2);
                        let g = &mut groups[j1];
                        for (mine, theirs) in g.parts.iter_mut().zip(other.parts) {
                            *mine = mine.or(theirs);
                        }
                        g.total_score += other.total_score;
                        g.total_parts += other.total_parts;
                        g.total_score += c.score;
                    }
                }
            }
        }
    }
    groups.retain(|g| !(g.total_parts < 4.0 || g.total_score / g.total_parts < 0.4));
    groups
}

/// The people controlnet_aux's `OpenposeDetector.detect_poses` finds (body only) from the
/// network's maps resized to the image, `height`×`width`: `heatmaps` planar
/// `[19, height, width]` (module docs; the background channel is not read), `pafs` planar
/// `[38, height, width]`. Keypoints are normalised by the image size.
///
/// # Panics
/// If the slices do not hold 19 and 38 planes of `height`×`width`.
pub fn decode_people(heatmaps: &[f64], pafs: &[f64], height: usize, width: usize) -> Vec<Person> {
    assert_eq!(
        heatmaps.len(),
        HEATMAP_CHANNELS * height * width,
        "decode_people: {} heatmap values for {HEATMAP_CHANNELS} planes of {height}x{width}",
        heatmaps.len()
    );
    let peaks = find_peaks(heatmaps, height, width);
    let connections = connect_limbs(&peaks, pafs, height, width);
    let skeletons = assemble_people(&peaks, &connections);
    let all: Vec<&Peak> = peaks.iter().flatten().collect();
    let (w, h) = (width as f64, height as f64);
    skeletons
        .iter()
        .map(|s| Person {
            keypoints: s.parts.map(|id| {
                id.map(|id| {
                    let p = all[id];
                    Keypoint {
                        x: p.x as f64 / w,
                        y: p.y as f64 / h,
                        score: p.score,
                        id,
                        pixel: [p.x, p.y],
                    }
                })
            }),
            total_score: s.total_score,
            total_parts: s.total_parts,
        })
        .collect()
}

/// `x ** y` as numpy computes it on float64 scalars: the C library's `pow`. (`pow(x, 2)` is not
/// always `x * x`, nor `pow(x, 0.5)` `sqrt(x)`; the exponent goes through `black_box` so that
/// the compiler does not substitute them.)
fn c_pow(x: f64, y: f64) -> f64 {
    x.powf(std::hint::black_box(y))
}

/// What controlnet_aux's `draw_bodypose` draws for `people` on a `width`×`height` canvas, in
/// its order: per person the limbs present (of the first 17 of [`LIMBS`]), then the joints
/// present. Same float64 arithmetic as the Python: the normalised coordinates are multiplied
/// back by the canvas size, the limb's centre is the mean of its ends, its length
/// `(dy² + dx²) ** 0.5`, its angle `degrees(atan2(dy, dx))`, each truncated toward zero.
pub fn body_strokes(people: &[Person], width: usize, height: usize) -> Vec<Stroke> {
    let (w, h) = (width as f64, height as f64);
    let mut strokes = Vec::new();
    for person in people {
        for (k, &(a, b)) in LIMBS[..DRAWN_LIMBS].iter().enumerate() {
            let (Some(p), Some(q)) = (person.keypoints[a], person.keypoints[b]) else {
                continue;
            };
            // The Python names the x coordinates Y and the y coordinates X.
            let (x0, x1) = (p.x * w, q.x * w);
            let (y0, y1) = (p.y * h, q.y * h);
            let mean_x = (x0 + x1) / 2.0;
            let mean_y = (y0 + y1) / 2.0;
            let length = c_pow(c_pow(y0 - y1, 2.0) + c_pow(x0 - x1, 2.0), 0.5);
            let angle = (y0 - y1).atan2(x0 - x1) * (180.0 / std::f64::consts::PI);
            strokes.push(Stroke::Limb {
                center: [mean_x as i32, mean_y as i32],
                axes: [(length / 2.0) as i32, STICK_WIDTH],
                angle: angle as i32,
                color: COLORS[k].map(|c| (c as f64 * 0.6) as u8),
            });
        }
        for (keypoint, color) in person.keypoints.iter().zip(COLORS) {
            if let Some(p) = keypoint {
                strokes.push(Stroke::Joint {
                    center: [(p.x * w) as i32, (p.y * h) as i32],
                    radius: STICK_WIDTH,
                    color,
                });
            }
        }
    }
    strokes
}
