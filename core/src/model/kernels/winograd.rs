//! 3×3 stride-1 convolution by Winograd's minimal filtering, F(2×2, 3×3), for channels-first
//! f32 maps on the CPU (the UNet's and ControlNets' resnet and upsampler convolutions).
//!
//! A 3×3 correlation over a 2×2 block of outputs reads a 4×4 window of the input. Winograd's
//! identity writes that block as `Aᵀ [(G g Gᵀ) ⊙ (Bᵀ d B)] A` (docs/ARCHITECTURE.md, "Winograd
//! convolution"): transform the window `d` into 16 values, the weight `g` into 16 values (once
//! per layer), multiply pointwise and sum over input channels, then transform the 16 sums back
//! into 4 outputs. Summing over channels at each of the 16 points is a GEMM
//! `[C_out, C_in] × [C_in, tiles]`, so the convolution becomes 16 GEMMs with 4 multiply-adds per
//! output and input channel instead of 9: 2.25× fewer. The transforms only add and subtract
//! (and halve, in `G`), so the result differs from the direct sum by rounding: a few units in
//! the last place of the largest terms (tests bound it against the f64 formula).
//!
//! The input arrives as the convolution's zero-padded (and upsampled) map split into its four
//! stride-2 phases (`ConvOp::pack` with stride 2): the window of tile `(ty, tx)` is then rows
//! `ty, ty + 1` and columns `tx, tx + 1` of the four phase planes, so consecutive tiles read
//! consecutive values and the transforms vectorise across a row of tiles.
//!
//! Tiles are processed in chunks of whole tile rows (images of the batch side by side), so that
//! the transformed input and the GEMMs' outputs stay a few MiB at any map size. Within a chunk
//! the input transform splits input channels over threads, the 16 GEMMs split over threads
//! (each single-threaded), and the output transform splits output channels.

use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering};

use super::{SharedMut, for_each_range};

/// Transformed points per tile: the 4×4 input window.
const POINTS: usize = 16;
/// Bytes of transformed input a chunk of tile rows aims at, so that each of its 16 GEMMs' right
/// operand stays in cache while the GEMM runs; small in tests, so that their maps are cut into
/// several chunks.
const CHUNK_BYTES: usize = if cfg!(test) { 256 << 10 } else { 8 << 20 };
/// Fewest tiles (2×2 output blocks, the batch's images together) for which this kernel runs by
/// default: below it the 16 GEMMs are too narrow to beat one GEMM over the im2col matrix.
const MIN_TILES: usize = 64;
/// Narrowest layer for which this kernel runs by default, as `C_in·C_out / (C_in + C_out)` (half
/// the harmonic mean of the channel counts). The transforms move `16·(C_in + C_out)` values per
/// tile while the GEMMs do `32·C_in·C_out` flops, so narrow layers spend their time moving data:
/// measured on conv_bench, 64- and 128-channel layers are slower this way, 256 channels and up
/// faster (docs/ARCHITECTURE.md, "Winograd convolution").
const MIN_HALF_HARMONIC_CHANNELS: usize = 96;

/// Where the kernel runs, from `SDSTREAM_WINOGRAD` (read once): `auto` (the default: wide enough
/// layers over enough tiles), `off` (never: for comparisons), `all` (every f32 3×3 stride-1
/// convolution: for tests of the arithmetic on small networks).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Policy {
    Auto,
    Off,
    All,
}

fn policy() -> Policy {
    static POLICY: std::sync::OnceLock<Policy> = std::sync::OnceLock::new();
    *POLICY.get_or_init(|| match std::env::var("SDSTREAM_WINOGRAD").as_deref() {
        Ok("off" | "0") => Policy::Off,
        Ok("all") => Policy::All,
        Ok("" | "auto") | Err(std::env::VarError::NotPresent) => Policy::Auto,
        Ok(other) => {
            eprintln!("sdstream: SDSTREAM_WINOGRAD={other:?} is not auto, off or all; using auto");
            Policy::Auto
        }
        Err(std::env::VarError::NotUnicode(_)) => Policy::Auto,
    })
}

/// Convolutions run by this kernel in this process (either layout).
static CONVOLUTIONS: AtomicU64 = AtomicU64::new(0);

/// How many convolutions this process has run by Winograd's kernel (either layout): what a test
/// reads to know the path was taken, and a host to know which kernel its layers got.
pub fn convolutions() -> u64 {
    CONVOLUTIONS.load(Ordering::Relaxed)
}

thread_local! {
    /// Tests on this thread choose the kernel (`Some(true)`: wherever the convolution allows it,
    /// any size; `Some(false)`: never), so that both paths are checked on every machine.
    static CHOICE: Cell<Option<bool>> = const { Cell::new(None) };
}

/// Whether a convolution of `C_in → C_out` channels whose output is `batch` images of
/// `h_out × w_out` runs here (the caller has checked the kernel is 3×3, stride 1, f32).
pub(super) fn chosen(batch: usize, h_out: usize, w_out: usize, c_in: usize, c_out: usize) -> bool {
    if let Some(choice) = CHOICE.with(Cell::get) {
        return choice;
    }
    match policy() {
        Policy::Off => false,
        Policy::All => true,
        Policy::Auto => pays_off(batch, h_out, w_out, c_in, c_out),
    }
}

/// The default choice: enough tiles and wide enough layers (see [`MIN_TILES`] and
/// [`MIN_HALF_HARMONIC_CHANNELS`]).
fn pays_off(batch: usize, h_out: usize, w_out: usize, c_in: usize, c_out: usize) -> bool {
    batch * h_out.div_ceil(2) * w_out.div_ceil(2) >= MIN_TILES
        && c_in * c_out >= MIN_HALF_HARMONIC_CHANNELS * (c_in + c_out)
}

/// Makes this thread's convolutions take this kernel wherever they can (`Some(true)`) or never
/// (`Some(false)`) until the guard drops; `None` restores the default.
#[cfg(test)]
pub(super) fn choose(choice: Option<bool>) -> impl Drop {
    struct Restore(Option<bool>);
    impl Drop for Restore {
        fn drop(&mut self) {
            CHOICE.with(|c| c.set(self.0));
        }
    }
    Restore(CHOICE.with(|c| c.replace(choice)))
}

/// A layer's weights `[C_out, C_in, 3, 3]` transformed to `G g Gᵀ`, laid out as 16 matrices
/// `[C_out, C_in]` (one per point), the GEMMs' left operands.
#[derive(Debug)]
pub(super) struct WinogradWeights {
    values: Vec<f32>,
    c_out: usize,
    c_in: usize,
}

impl WinogradWeights {
    /// Transforms a layer's 3×3 weights: `[C_out, C_in, 3, 3]` (torch's layout), or
    /// `[3, 3, C_in, C_out]` when `channels_last`, which then gives matrices `[C_in, C_out]`
    /// (the right operands of the channels-last GEMMs). Each point is computed in f64 and
    /// rounded once.
    pub(super) fn new(weight: &[f32], c_out: usize, c_in: usize, channels_last: bool) -> Self {
        assert_eq!(weight.len(), c_out * c_in * 9, "3×3 weights");
        let plane = c_out * c_in;
        let mut values = vec![0f32; POINTS * plane];
        // `pair` indexes a (C_out, C_in) pair in either layout's order, the same in the source
        // and in each point's matrix.
        for pair in 0..plane {
            let g: [f64; 9] = std::array::from_fn(|tap| {
                f64::from(if channels_last {
                    weight[tap * plane + pair]
                } else {
                    weight[pair * 9 + tap]
                })
            });
            // G = [[1, 0, 0], [½, ½, ½], [½, −½, ½], [0, 0, 1]]; first G g (4×3), then (G g) Gᵀ.
            let mut gg = [[0f64; 3]; 4];
            for c in 0..3 {
                let (g0, g1, g2) = (g[c], g[3 + c], g[6 + c]);
                gg[0][c] = g0;
                gg[1][c] = 0.5 * (g0 + g1 + g2);
                gg[2][c] = 0.5 * (g0 - g1 + g2);
                gg[3][c] = g2;
            }
            for (i, row) in gg.iter().enumerate() {
                let [g0, g1, g2] = *row;
                let u = [g0, 0.5 * (g0 + g1 + g2), 0.5 * (g0 - g1 + g2), g2];
                for (j, u) in u.into_iter().enumerate() {
                    values[(i * 4 + j) * plane + pair] = u as f32;
                }
            }
        }
        Self {
            values,
            c_out,
            c_in,
        }
    }

    fn point(&self, xi: usize) -> &[f32] {
        let plane = self.c_out * self.c_in;
        &self.values[xi * plane..][..plane]
    }
}

/// Shape of one Winograd convolution.
#[derive(Debug, Clone, Copy)]
pub(super) struct Shape {
    pub(super) batch: usize,
    pub(super) c_in: usize,
    pub(super) c_out: usize,
    /// Size of each of the four phase planes of the padded input.
    pub(super) h_plane: usize,
    pub(super) w_plane: usize,
    /// Output size (the padded input's size minus 2).
    pub(super) h_out: usize,
    pub(super) w_out: usize,
}

impl Shape {
    fn tiles_wide(&self) -> usize {
        self.w_out.div_ceil(2)
    }

    fn tiles_high(&self) -> usize {
        self.h_out.div_ceil(2)
    }
}

/// Writes the convolution of `planes` (`[batch][C_in][4 phases][h_plane][w_plane]`, phase
/// `(row % 2)·2 + col % 2` of the zero-padded input) by `weights`, plus `bias`, into `out`
/// (`[batch][C_out][h_out][w_out]`), on up to `threads` threads.
pub(super) fn convolve(
    planes: &[f32],
    shape: &Shape,
    weights: &WinogradWeights,
    bias: &[f32],
    out: &mut [f32],
    threads: usize,
) {
    let s = *shape;
    CONVOLUTIONS.fetch_add(1, Ordering::Relaxed);
    assert_eq!((weights.c_out, weights.c_in), (s.c_out, s.c_in), "weights");
    assert!(
        s.h_plane > s.tiles_high() && s.w_plane > s.tiles_wide(),
        "phase planes cover every tile's window"
    );
    assert_eq!(planes.len(), s.batch * s.c_in * 4 * s.h_plane * s.w_plane);
    assert_eq!(out.len(), s.batch * s.c_out * s.h_out * s.w_out);
    assert_eq!(bias.len(), s.c_out);
    let tw = s.tiles_wide();
    let tile_rows = s.batch * s.tiles_high();
    if tile_rows == 0 || tw == 0 {
        return;
    }
    let rows_per_chunk =
        (CHUNK_BYTES / (POINTS * s.c_in.max(s.c_out) * tw * 4)).clamp(1, tile_rows);
    let chunk_tiles = rows_per_chunk * tw;
    let mut transformed = vec![0f32; POINTS * s.c_in * chunk_tiles];
    let mut products = vec![0f32; POINTS * s.c_out * chunk_tiles];
    let out_ptr = SharedMut(out.as_mut_ptr());
    let mut first_row = 0;
    while first_row < tile_rows {
        let rows = rows_per_chunk.min(tile_rows - first_row);
        let tiles = rows * tw;
        let chunk = first_row..first_row + rows;
        transform_input(
            planes,
            &s,
            chunk.clone(),
            chunk_tiles,
            &mut transformed,
            threads,
        );
        multiply(
            &transformed,
            weights,
            &s,
            tiles,
            chunk_tiles,
            &mut products,
            threads,
        );
        // SAFETY: `out` is `[batch][C_out][h_out][w_out]` (asserted above), and the output
        // transform writes the outputs of this chunk's tiles, split by output channel.
        unsafe { transform_output(&products, &s, chunk, chunk_tiles, bias, out_ptr, threads) };
        first_row += rows;
    }
}

/// `Bᵀ d B` of every window in tile rows `chunk` (global tile row `r` is image `r / tiles_high`,
/// row `r % tiles_high`), into `transformed` `[16][C_in][stride]`, tile `(r − chunk.start)·tw + tx`.
fn transform_input(
    planes: &[f32],
    s: &Shape,
    chunk: std::ops::Range<usize>,
    stride: usize,
    transformed: &mut [f32],
    threads: usize,
) {
    let (th, tw) = (s.tiles_high(), s.tiles_wide());
    let plane_len = s.h_plane * s.w_plane;
    let point_len = s.c_in * stride;
    let dst = SharedMut(transformed.as_mut_ptr());
    let work = |channels: std::ops::Range<usize>| {
        for ci in channels {
            for (local, r) in chunk.clone().enumerate() {
                let (image, ty) = (r / th, r % th);
                let phases = &planes[(image * s.c_in + ci) * 4 * plane_len..][..4 * plane_len];
                // d[row][col] for the row of tiles: phase (row % 2, col % 2), plane row
                // ty + row / 2, columns tx + col / 2.
                let d: [[&[f32]; 4]; 4] = std::array::from_fn(|row| {
                    std::array::from_fn(|col| {
                        let phase = &phases[((row % 2) * 2 + col % 2) * plane_len..][..plane_len];
                        &phase[(ty + row / 2) * s.w_plane + col / 2..][..tw]
                    })
                });
                let at = ci * stride + local * tw;
                // SAFETY: point ξ's row of channel ci, tiles `at..at + tw`: inside
                // `transformed` ([16][C_in][stride], at + tw ≤ stride), and channel ci is this
                // thread's alone.
                let v: [&mut [f32]; POINTS] = std::array::from_fn(|xi| unsafe {
                    std::slice::from_raw_parts_mut(dst.ptr().add(xi * point_len + at), tw)
                });
                transform_input_row(&d, v, tw);
            }
        }
    };
    for_each_range(s.c_in, threads.min(s.c_in), &work);
}

/// One row of `tw` tiles: `v[4i + j][x] = (Bᵀ d B)[i][j]` of the window `d[·][·][x]`, with
/// `Bᵀ = [[1, 0, −1, 0], [0, 1, 1, 0], [0, −1, 1, 0], [0, 1, 0, −1]]`.
#[inline(always)]
fn transform_input_row(d: &[[&[f32]; 4]; 4], v: [&mut [f32]; POINTS], tw: usize) {
    let [
        v0,
        v1,
        v2,
        v3,
        v4,
        v5,
        v6,
        v7,
        v8,
        v9,
        v10,
        v11,
        v12,
        v13,
        v14,
        v15,
    ] = v;
    for x in 0..tw {
        // Bᵀ d: combine rows, per column.
        let mut t = [[0f32; 4]; 4];
        for c in 0..4 {
            let (d0, d1, d2, d3) = (d[0][c][x], d[1][c][x], d[2][c][x], d[3][c][x]);
            t[0][c] = d0 - d2;
            t[1][c] = d1 + d2;
            t[2][c] = d2 - d1;
            t[3][c] = d1 - d3;
        }
        // (Bᵀ d) B: combine columns, per row.
        let rows = [
            (&mut *v0, &mut *v1, &mut *v2, &mut *v3),
            (&mut *v4, &mut *v5, &mut *v6, &mut *v7),
            (&mut *v8, &mut *v9, &mut *v10, &mut *v11),
            (&mut *v12, &mut *v13, &mut *v14, &mut *v15),
        ];
        for (row, (a, b, c, e)) in t.iter().zip(rows) {
            a[x] = row[0] - row[2];
            b[x] = row[1] + row[2];
            c[x] = row[2] - row[1];
            e[x] = row[1] - row[3];
        }
    }
}

/// The 16 GEMMs `products[ξ] = U[ξ] · transformed[ξ]` (`[C_out, C_in] × [C_in, tiles]`), split
/// over threads by point.
fn multiply(
    transformed: &[f32],
    weights: &WinogradWeights,
    s: &Shape,
    tiles: usize,
    stride: usize,
    products: &mut [f32],
    threads: usize,
) {
    let dst = SharedMut(products.as_mut_ptr());
    let work = |points: std::ops::Range<usize>| {
        for xi in points {
            let lhs = weights.point(xi);
            let rhs = &transformed[xi * s.c_in * stride..][..s.c_in * stride];
            // SAFETY: the GEMM writes products[ξ][0..C_out][0..tiles] (row stride `stride`),
            // point ξ's own block, which no other thread touches; lhs is [C_out, C_in] (row
            // stride C_in) and rhs [C_in, tiles] (row stride `stride`), inside their slices.
            unsafe {
                gemm::gemm(
                    s.c_out,
                    tiles,
                    s.c_in,
                    dst.ptr().add(xi * s.c_out * stride),
                    1,
                    stride as isize,
                    false,
                    lhs.as_ptr(),
                    1,
                    s.c_in as isize,
                    rhs.as_ptr(),
                    1,
                    stride as isize,
                    0f32,
                    1f32,
                    false,
                    false,
                    false,
                    gemm::Parallelism::None,
                );
            }
        }
    };
    for_each_range(POINTS, threads.min(POINTS), &work);
}

/// `Aᵀ m A` (`Aᵀ = [[1, 1, 1, 0], [0, 1, −1, −1]]`) of every tile of `chunk` plus the bias, into
/// the output map.
///
/// # Safety
/// `out` points to `[batch][C_out][h_out][w_out]` values that no other thread touches meanwhile.
unsafe fn transform_output(
    products: &[f32],
    s: &Shape,
    chunk: std::ops::Range<usize>,
    stride: usize,
    bias: &[f32],
    out: SharedMut<f32>,
    threads: usize,
) {
    let (th, tw) = (s.tiles_high(), s.tiles_wide());
    let point_len = s.c_out * stride;
    let work = |channels: std::ops::Range<usize>| {
        let mut y = [vec![0f32; 2 * tw], vec![0f32; 2 * tw]];
        for co in channels {
            for (local, r) in chunk.clone().enumerate() {
                let (image, ty) = (r / th, r % th);
                let at = co * stride + local * tw;
                let m: [&[f32]; POINTS] =
                    std::array::from_fn(|xi| &products[xi * point_len + at..][..tw]);
                transform_output_row(&m, bias[co], &mut y, tw);
                for (i, y) in y.iter().enumerate() {
                    let row = 2 * ty + i;
                    if row < s.h_out {
                        // SAFETY: output row `row` of channel co of `image`: inside the map,
                        // and channel co is this thread's alone.
                        unsafe {
                            let dst = out
                                .ptr()
                                .add(((image * s.c_out + co) * s.h_out + row) * s.w_out);
                            std::ptr::copy_nonoverlapping(y.as_ptr(), dst, s.w_out);
                        }
                    }
                }
            }
        }
    };
    for_each_range(s.c_out, threads.min(s.c_out), &work);
}

/// One row of tiles: output rows `y[0]`, `y[1]` (2 values a tile) from the 16 points `m`.
#[inline(always)]
fn transform_output_row(m: &[&[f32]; POINTS], bias: f32, y: &mut [Vec<f32>; 2], tw: usize) {
    let [y0, y1] = y;
    let (y0, y1) = (&mut y0[..2 * tw], &mut y1[..2 * tw]);
    for x in 0..tw {
        // Aᵀ m: combine rows, per column.
        let mut t = [[0f32; 4]; 2];
        for c in 0..4 {
            let (m0, m1, m2, m3) = (m[c][x], m[4 + c][x], m[8 + c][x], m[12 + c][x]);
            t[0][c] = m0 + m1 + m2;
            t[1][c] = m1 - m2 - m3;
        }
        // (Aᵀ m) A: combine columns, per row.
        for (row, y) in t.iter().zip([&mut *y0, &mut *y1]) {
            y[2 * x] = row[0] + row[1] + row[2] + bias;
            y[2 * x + 1] = row[1] - row[2] - row[3] + bias;
        }
    }
}

/// Shape of one Winograd convolution over channels-last maps.
#[derive(Debug, Clone, Copy)]
pub(super) struct ChannelsLastShape {
    pub(super) batch: usize,
    pub(super) c_in: usize,
    pub(super) c_out: usize,
    /// Input size.
    pub(super) h: usize,
    pub(super) w: usize,
    /// Zero rows above and columns left of the input (those below and right follow from the
    /// output size).
    pub(super) pad_top: usize,
    pub(super) pad_left: usize,
    pub(super) h_out: usize,
    pub(super) w_out: usize,
}

/// Writes the convolution of `x` (`[batch, h, w, C_in]`) by `weights` (made with
/// `channels_last`) into `out` (`[batch, h_out, w_out, C_out]`), then calls `finish(row,
/// values)` on every output row (global row index `image · h_out + y`, its `w_out · C_out`
/// values) while it is in cache: the caller's bias, residual and activation.
pub(super) fn convolve_channels_last(
    x: &[f32],
    shape: &ChannelsLastShape,
    weights: &WinogradWeights,
    finish: &(dyn Fn(usize, &mut [f32]) + Sync),
    out: &mut [f32],
    threads: usize,
) {
    let s = *shape;
    CONVOLUTIONS.fetch_add(1, Ordering::Relaxed);
    assert_eq!((weights.c_out, weights.c_in), (s.c_out, s.c_in), "weights");
    assert_eq!(x.len(), s.batch * s.h * s.w * s.c_in);
    assert_eq!(out.len(), s.batch * s.h_out * s.w_out * s.c_out);
    let (th, tw) = (s.h_out.div_ceil(2), s.w_out.div_ceil(2));
    let tile_rows = s.batch * th;
    if tile_rows == 0 || tw == 0 || s.c_out == 0 {
        return;
    }
    // At least one tile row per thread, so that the transforms share out.
    let rows_per_chunk = (CHUNK_BYTES / (POINTS * s.c_in.max(s.c_out) * tw * 4))
        .max(threads)
        .clamp(1, tile_rows);
    let chunk_tiles = rows_per_chunk * tw;
    let mut transformed = vec![0f32; POINTS * chunk_tiles * s.c_in];
    let mut products = vec![0f32; POINTS * chunk_tiles * s.c_out];
    let zeros = vec![0f32; s.c_in];
    let out_ptr = SharedMut(out.as_mut_ptr());
    let mut first_row = 0;
    while first_row < tile_rows {
        let rows = rows_per_chunk.min(tile_rows - first_row);
        let chunk = first_row..first_row + rows;
        let dst = SharedMut(transformed.as_mut_ptr());
        let input = |local_rows: std::ops::Range<usize>| {
            for local in local_rows {
                let (image, ty) = ((chunk.start + local) / th, (chunk.start + local) % th);
                for tx in 0..tw {
                    // The window's 16 input pixels (zeros outside the map).
                    let d: [&[f32]; POINTS] = std::array::from_fn(|k| {
                        let (r, c) = (k / 4, k % 4);
                        let (y, xx) = (2 * ty + r, 2 * tx + c);
                        match (y.checked_sub(s.pad_top), xx.checked_sub(s.pad_left)) {
                            (Some(y), Some(xx)) if y < s.h && xx < s.w => {
                                &x[((image * s.h + y) * s.w + xx) * s.c_in..][..s.c_in]
                            }
                            _ => &zeros,
                        }
                    });
                    let tile = local * tw + tx;
                    // SAFETY: point ξ's row for this tile in `transformed` ([16][chunk_tiles]
                    // [C_in]); tile rows are split between threads, so the row is this
                    // thread's alone.
                    let v: [&mut [f32]; POINTS] = std::array::from_fn(|xi| unsafe {
                        std::slice::from_raw_parts_mut(
                            dst.ptr().add((xi * chunk_tiles + tile) * s.c_in),
                            s.c_in,
                        )
                    });
                    transform_input_window(&d, v);
                }
            }
        };
        for_each_range(rows, threads.min(rows), &input);
        let tiles = rows * tw;
        let products_ptr = SharedMut(products.as_mut_ptr());
        let multiply = |points: std::ops::Range<usize>| {
            for xi in points {
                // SAFETY: products[ξ] ([tiles, C_out], row stride C_out) is point ξ's own block;
                // the left operand is transformed[ξ] ([tiles, C_in]), the right U[ξ]
                // ([C_in, C_out]), inside their buffers.
                unsafe {
                    gemm::gemm(
                        tiles,
                        s.c_out,
                        s.c_in,
                        products_ptr.ptr().add(xi * chunk_tiles * s.c_out),
                        1,
                        s.c_out as isize,
                        false,
                        transformed.as_ptr().add(xi * chunk_tiles * s.c_in),
                        1,
                        s.c_in as isize,
                        weights.point(xi).as_ptr(),
                        1,
                        s.c_out as isize,
                        0f32,
                        1f32,
                        false,
                        false,
                        false,
                        gemm::Parallelism::None,
                    );
                }
            }
        };
        for_each_range(POINTS, threads.min(POINTS), &multiply);
        let products = &products;
        let output = |local_rows: std::ops::Range<usize>| {
            for local in local_rows {
                let (image, ty) = ((chunk.start + local) / th, (chunk.start + local) % th);
                let out_rows = 2.min(s.h_out - 2 * ty);
                let row_len = s.w_out * s.c_out;
                // SAFETY: output rows 2ty, 2ty + 1 of `image` (those inside the map): this
                // tile row's alone, and tile rows are split between threads.
                let dst = unsafe {
                    std::slice::from_raw_parts_mut(
                        out_ptr.ptr().add((image * s.h_out + 2 * ty) * row_len),
                        out_rows * row_len,
                    )
                };
                for tx in 0..tw {
                    let tile = local * tw + tx;
                    let m: [&[f32]; POINTS] = std::array::from_fn(|xi| {
                        &products[(xi * chunk_tiles + tile) * s.c_out..][..s.c_out]
                    });
                    let out_cols = 2.min(s.w_out - 2 * tx);
                    let (top, bottom) = dst.split_at_mut(row_len.min(dst.len()));
                    let y0 = &mut top[2 * tx * s.c_out..][..out_cols * s.c_out];
                    let y1 = if out_rows == 2 {
                        Some(&mut bottom[2 * tx * s.c_out..][..out_cols * s.c_out])
                    } else {
                        None
                    };
                    transform_output_window(&m, y0, y1, s.c_out);
                }
                for (i, row) in dst.chunks_exact_mut(row_len).enumerate() {
                    finish(image * s.h_out + 2 * ty + i, row);
                }
            }
        };
        for_each_range(rows, threads.min(rows), &output);
        first_row += rows;
    }
}

/// `v[4i + j] = (Bᵀ d B)[i][j]` of one window, channel by channel (`d[4r + c]` is the input
/// pixel at window row r, column c).
#[inline(always)]
fn transform_input_window(d: &[&[f32]; POINTS], v: [&mut [f32]; POINTS]) {
    let n = v[0].len();
    let [
        v0,
        v1,
        v2,
        v3,
        v4,
        v5,
        v6,
        v7,
        v8,
        v9,
        v10,
        v11,
        v12,
        v13,
        v14,
        v15,
    ] = v;
    let (v0, v1, v2, v3) = (&mut v0[..n], &mut v1[..n], &mut v2[..n], &mut v3[..n]);
    let (v4, v5, v6, v7) = (&mut v4[..n], &mut v5[..n], &mut v6[..n], &mut v7[..n]);
    let (v8, v9, v10, v11) = (&mut v8[..n], &mut v9[..n], &mut v10[..n], &mut v11[..n]);
    let (v12, v13, v14, v15) = (&mut v12[..n], &mut v13[..n], &mut v14[..n], &mut v15[..n]);
    let d: [&[f32]; POINTS] = std::array::from_fn(|k| &d[k][..n]);
    for ch in 0..n {
        let mut t = [[0f32; 4]; 4];
        for c in 0..4 {
            let (d0, d1, d2, d3) = (d[c][ch], d[4 + c][ch], d[8 + c][ch], d[12 + c][ch]);
            t[0][c] = d0 - d2;
            t[1][c] = d1 + d2;
            t[2][c] = d2 - d1;
            t[3][c] = d1 - d3;
        }
        let rows = [
            (&mut v0[ch], &mut v1[ch], &mut v2[ch], &mut v3[ch]),
            (&mut v4[ch], &mut v5[ch], &mut v6[ch], &mut v7[ch]),
            (&mut v8[ch], &mut v9[ch], &mut v10[ch], &mut v11[ch]),
            (&mut v12[ch], &mut v13[ch], &mut v14[ch], &mut v15[ch]),
        ];
        for (row, (a, b, c, e)) in t.iter().zip(rows) {
            *a = row[0] - row[2];
            *b = row[1] + row[2];
            *c = row[2] - row[1];
            *e = row[1] - row[3];
        }
    }
}

/// `Aᵀ m A` of one tile, channel by channel, into its output pixels: `y0` the top row's one or
/// two pixels (`[pixels][C_out]`), `y1` the bottom row's (none past the map's last row).
#[inline(always)]
fn transform_output_window(
    m: &[&[f32]; POINTS],
    y0: &mut [f32],
    y1: Option<&mut [f32]>,
    c_out: usize,
) {
    let m: [&[f32]; POINTS] = std::array::from_fn(|k| &m[k][..c_out]);
    let two_columns = y0.len() == 2 * c_out;
    let mut tile = [[0f32; 2]; 2];
    let (mut scratch0, mut scratch1) = (Vec::new(), Vec::new());
    // Full tiles (the common case) write straight into the map; edge tiles into scratch first.
    let (y0, y1): (&mut [f32], &mut [f32]) = match (two_columns, y1) {
        (true, Some(y1)) => (y0, y1),
        (_, y1) => {
            scratch0.resize(2 * c_out, 0f32);
            scratch1.resize(2 * c_out, 0f32);
            transform_output_window(&m, &mut scratch0, Some(&mut scratch1), c_out);
            let n = y0.len();
            y0.copy_from_slice(&scratch0[..n]);
            if let Some(y1) = y1 {
                y1.copy_from_slice(&scratch1[..n]);
            }
            return;
        }
    };
    let (y0a, y0b) = y0.split_at_mut(c_out);
    let (y1a, y1b) = y1.split_at_mut(c_out);
    for ch in 0..c_out {
        let mut t = [[0f32; 4]; 2];
        for c in 0..4 {
            let (m0, m1, m2, m3) = (m[c][ch], m[4 + c][ch], m[8 + c][ch], m[12 + c][ch]);
            t[0][c] = m0 + m1 + m2;
            t[1][c] = m1 - m2 - m3;
        }
        for (row, out) in t.iter().zip(tile.iter_mut()) {
            out[0] = row[0] + row[1] + row[2];
            out[1] = row[1] - row[2] - row[3];
        }
        y0a[ch] = tile[0][0];
        y0b[ch] = tile[0][1];
        y1a[ch] = tile[1][0];
        y1b[ch] = tile[1][1];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The default: the UNet's resnet convolutions from a 16×16 map up (and the full VAE's at 256
    /// channels and more) take the kernel; the 8×8 level, TAESD's 64 channels, the VAE's 128,
    /// the first and last convolutions (4 or 3 channels on one side) keep the GEMM.
    #[test]
    fn default_choice_takes_wide_layers_over_enough_tiles() {
        // (batch, h_out, w_out, c_in, c_out, chosen)
        let cases = [
            (1, 64, 64, 320, 320, true),
            (1, 64, 64, 640, 320, true),
            (3, 32, 32, 1280, 640, true),
            (1, 16, 16, 1280, 1280, true),
            (1, 8, 8, 1280, 1280, false),
            (4, 8, 8, 1280, 1280, true),
            (1, 256, 256, 256, 256, true),
            (1, 128, 128, 512, 512, true),
            (1, 512, 512, 128, 128, false),
            (1, 512, 512, 256, 128, false),
            (1, 512, 512, 64, 64, false),
            (1, 64, 64, 4, 320, false),
            (1, 64, 64, 320, 4, false),
        ];
        for (batch, h, w, c_in, c_out, want) in cases {
            assert_eq!(
                pays_off(batch, h, w, c_in, c_out),
                want,
                "batch {batch}, {h}×{w}, {c_in}→{c_out}"
            );
        }
    }
}
