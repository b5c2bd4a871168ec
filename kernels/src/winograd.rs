//! 3×3 stride-1 convolution by Winograd's minimal filtering on the CPU, for f32 maps in both
//! layouts: F(2×2, 3×3) and F(4×4, 3×3) (docs/ARCHITECTURE.md, "Winograd convolution").
//!
//! A 3×3 correlation over an m×m block of outputs reads an (m+2)×(m+2) window of the input.
//! Winograd's identity writes that block as `Aᵀ [(G g Gᵀ) ⊙ (Bᵀ d B)] A`: transform the window
//! `d` into (m+2)² values, the weight `g` into as many (once per layer), multiply pointwise and
//! sum over input channels, then transform the sums back into m² outputs. Summing over channels
//! at each point is a GEMM `[C_out, C_in] × [C_in, tiles]`, so the convolution becomes (m+2)²
//! GEMMs: per output and pair of channels, 4 multiply-adds for m = 2 and 2.25 for m = 4, where
//! the direct sum takes 9. The transforms only add, subtract and scale, so the result differs
//! from the direct sum by rounding: about the direct sum's own for m = 2, up to some tens of
//! times it for m = 4, whose transforms scale by up to 8 (relative errors near 1e-5; tests
//! bound both against the f64 formula).
//!
//! Channels-first maps arrive as the convolution's zero-padded (and upsampled) map split into
//! its m×m stride-m phases (`ConvOp::pack` with stride m): the window of tile `(ty, tx)` is then
//! rows `ty, ty + 1` and columns `tx, tx + 1` of the phase planes, so consecutive tiles read
//! consecutive values and the transforms run 16 tiles at a time in vector lanes. Channels-last
//! maps are read in place, 16 channels at a time.
//!
//! Tiles are processed in chunks of whole tile rows (images of the batch side by side), so that
//! the transformed input and the GEMMs' outputs stay a few MiB at any map size. Within a chunk
//! the input transform splits input channels (or tile rows) over threads, the GEMMs split over
//! threads by point (each single-threaded), and the output transform splits output channels (or
//! tile rows).
//!
//! The weights' transforms are kept by the layer (16/9 of its weight for m = 2, 36/9 for
//! m = 4), made on the layer's first convolution that takes them.
//!
//! Inside a bf16 scope ([`super::gemm_bf16::scoped`]) the products of channels-first layers run
//! on the bf16 GEMM: the weights' transforms are rounded and packed for it once (half the f32
//! bytes), each point's transformed input per chunk, sums in f32. The transforms stay f32;
//! rounding their outputs costs what rounding the direct sum's operands costs, magnified as
//! above: about twice the bf16 GEMM's error for m = 2, some tens of times it for m = 4 (tests
//! in kernels::conv). Channels-last layers keep f32 products (see [`multiplies_in_bf16`]).

#[cfg(test)]
use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering};

use super::gemm_bf16::{self, PackedA, PackedB};
use super::simd::{self, Isa};
use super::{SharedMut, for_each_range};
use crate::{KernelPolicy, Winograd};

/// Lanes of the transforms' vectors: one AVX-512 register of f32 (two AVX2 registers).
const LANES: usize = 16;
/// One vector of values, aligned to its size: the transforms keep windows of 36 of them on the
/// stack, where at f32's own alignment vector accesses would straddle cache lines.
#[derive(Clone, Copy, Debug)]
#[repr(C, align(64))]
struct Lane([f32; LANES]);

impl std::ops::Deref for Lane {
    type Target = [f32; LANES];
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl std::ops::DerefMut for Lane {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.0
    }
}

const ZERO: Lane = Lane([0.0; LANES]);
/// The largest window side, m + 2 for m = 4; F(2×2, 3×3) uses the first 4 entries of arrays
/// of this size.
const MAX_WINDOW: usize = 6;

/// Bytes of transformed input (or of products, the larger) a chunk of tile rows aims at, at
/// least: each of its GEMMs' right operand stays in cache while the GEMM runs. Small in tests,
/// so that their maps are cut into several chunks.
const CHUNK_BYTES: usize = if cfg!(test) { 256 << 10 } else { 8 << 20 };
/// Most bytes a chunk's transformed input (or products) may take.
const MAX_CHUNK_BYTES: usize = 128 << 20;

/// What a chunk of a layer aims at: [`CHUNK_BYTES`], or the layer's transformed weights where
/// those are more, since every chunk reads all of them again (236 MB at the UNet's 1,280
/// channels, read 2 to 12 times a call with 8 MiB chunks). conv_bench, ms, 8 MiB chunks → this:
/// the UNet's upsampling to 32² × 1,280 69.2 → 47.7–48.9 for one image, 174.8 → 140.7–144.0 for
/// three; 2,560 → 1,280 at 16², three images, 124.2 → 73.8; 1,280 at 16², three, 60.4 → 39.6.
fn chunk_budget(points: usize, c_in: usize, c_out: usize) -> usize {
    if cfg!(test) {
        return CHUNK_BYTES;
    }
    let weights = points * c_in * c_out * std::mem::size_of::<f32>();
    weights.clamp(CHUNK_BYTES, MAX_CHUNK_BYTES)
}
/// Fewest tiles (the batch's images together) for which a variant runs by default: three
/// images of a map of 16 tiles (a stream batch of three denoising steps) take it, one or two do
/// not. Fewer tiles can still beat the im2col GEMM (conv_bench: 16 tiles of F(2×2, 3×3) at
/// 8² × 1,280 channels 8.4 ms against 9.4), but each layer keeps its weights' transform, 16/9
/// or 36/9 of its weight, and at the UNet's deepest levels few tiles meet most of the weights:
/// with 16 tiles the sd-turbo UNet at 512² kept 3.4 GB more of them for no gain measurable
/// over the machine's noise (3.82–3.85 s a call against 3.70–3.92 s). At 48 tiles the gain is
/// there (unet_bench, batch 3, alternated three times, 64 tiles → 48: at 256² 2,634–2,673 →
/// 2,435–2,495 ms a call, for 1.9 GB more; at 512² 11.5–11.7 → 11.1–11.2 s, for 3.4 GB more).
const MIN_TILES: usize = 48;
/// Narrowest layer for which the kernel runs by default, as `C_in·C_out / (C_in + C_out)` (half
/// the harmonic mean of the channel counts). The transforms move `(m+2)²·(C_in + C_out)` values
/// per tile while the GEMMs do `2·(m+2)²·C_in·C_out` flops, so narrow layers spend their time
/// moving data: measured on conv_bench, TAESD's 64-channel layers gain nothing from the chunked
/// kernels, the full VAE's 128 channels at 512² gain 28 % (docs/ARCHITECTURE.md, "Winograd
/// convolution"). Narrower channels-last layers can take the blocked kernel instead (see
/// [`MIN_BLOCKED_CHANNELS`]).
const MIN_HALF_HARMONIC_CHANNELS: usize = 48;

/// The two algorithms: F(m×m, 3×3) for output tiles of side m = 2 or 4.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Variant {
    F2,
    F4,
}

impl Variant {
    /// Output tile side m.
    pub(super) const fn tile(self) -> usize {
        match self {
            Variant::F2 => 2,
            Variant::F4 => 4,
        }
    }

    /// Input window side, m + 2.
    const fn window(self) -> usize {
        self.tile() + 2
    }

    /// Transformed points per tile, (m + 2)².
    pub(super) const fn points(self) -> usize {
        self.window() * self.window()
    }

    /// Tiles covering `batch` outputs of `h_out × w_out`.
    fn tiles(self, batch: usize, h_out: usize, w_out: usize) -> usize {
        batch * h_out.div_ceil(self.tile()) * w_out.div_ceil(self.tile())
    }

    /// Index of the variant among [`Variant::ALL`] (where a layer keeps each one's weights).
    pub(super) const fn index(self) -> usize {
        match self {
            Variant::F2 => 0,
            Variant::F4 => 1,
        }
    }

    #[cfg(test)]
    pub(super) const ALL: [Variant; 2] = [Variant::F2, Variant::F4];
}

impl From<Variant> for Winograd {
    /// The policy that runs `variant` for every convolution it can.
    fn from(variant: Variant) -> Winograd {
        match variant {
            Variant::F2 => Winograd::F2,
            Variant::F4 => Winograd::F4,
        }
    }
}

/// Convolutions run by this kernel in this process (either layout, either variant), and those
/// of them whose products ran in bf16.
static CONVOLUTIONS: AtomicU64 = AtomicU64::new(0);
static BF16_CONVOLUTIONS: AtomicU64 = AtomicU64::new(0);

/// Bytes of transformed weights the layers of this process hold.
static WEIGHT_BYTES: AtomicU64 = AtomicU64::new(0);

/// Bytes of transformed weights the layers of this process hold now (made on each layer's first
/// convolution that takes Winograd's kernel, freed with the layer): the memory this kernel
/// costs beside the weights themselves.
pub fn weight_bytes() -> u64 {
    WEIGHT_BYTES.load(Ordering::Relaxed)
}

/// How many convolutions this process has run by Winograd's kernel (either layout, either
/// variant): what a test reads to know the path was taken, and a host to know which kernel its
/// layers got.
pub fn convolutions() -> u64 {
    CONVOLUTIONS.load(Ordering::Relaxed)
}

/// How many of [`convolutions`] multiplied in bf16 (inside a bf16 scope, see
/// [`multiplies_in_bf16`]).
pub fn bf16_convolutions() -> u64 {
    BF16_CONVOLUTIONS.load(Ordering::Relaxed)
}

/// Counts a convolution run by this kernel with `weights`.
fn count(weights: &WinogradWeights) {
    CONVOLUTIONS.fetch_add(1, Ordering::Relaxed);
    if weights.is_bf16() {
        BF16_CONVOLUTIONS.fetch_add(1, Ordering::Relaxed);
    }
    #[cfg(test)]
    ON_THIS_THREAD.with(|n| n.set(n.get() + 1));
}

#[cfg(test)]
thread_local! {
    /// Convolutions this thread ran by this kernel (tests run side by side).
    static ON_THIS_THREAD: Cell<u64> = const { Cell::new(0) };
}

/// Convolutions this thread has run by this kernel.
#[cfg(test)]
pub(super) fn convolutions_on_this_thread() -> u64 {
    ON_THIS_THREAD.with(Cell::get)
}

/// The variant a convolution of `C_in → C_out` channels whose output is `batch` images of
/// `h_out × w_out` runs with, if any (the caller has checked the kernel is 3×3, stride 1, f32);
/// `channels_last` is the layer's layout. The current [`KernelPolicy`]'s [`Winograd`] decides:
/// `auto` the default choice ([`by_default`]), `off` never, `f2` or `f4` that variant wherever
/// the convolution allows it, at any size (tests of the arithmetic, comparisons).
pub(super) fn chosen(
    batch: usize,
    h_out: usize,
    w_out: usize,
    c_in: usize,
    c_out: usize,
    channels_last: bool,
) -> Option<Variant> {
    match KernelPolicy::current().winograd {
        Winograd::Off => None,
        Winograd::F2 => Some(Variant::F2),
        Winograd::F4 => Some(Variant::F4),
        Winograd::Auto => by_default(batch, h_out, w_out, c_in, c_out, channels_last),
    }
}

/// The default choice: layers wide enough (see [`MIN_HALF_HARMONIC_CHANNELS`]), or narrow
/// channels-last ones the blocked kernel takes (see [`MIN_BLOCKED_CHANNELS`]), run F(4×4, 3×3)
/// where it has [`MIN_TILES`] tiles, else F(2×2, 3×3) where that has them.
fn by_default(
    batch: usize,
    h_out: usize,
    w_out: usize,
    c_in: usize,
    c_out: usize,
    channels_last: bool,
) -> Option<Variant> {
    let wide = c_in * c_out >= MIN_HALF_HARMONIC_CHANNELS * (c_in + c_out);
    let blocked = channels_last
        && c_in.min(c_out) >= MIN_BLOCKED_CHANNELS
        && blocked_fits(simd::isa(), c_in, c_out);
    if !wide && !blocked {
        return None;
    }
    [Variant::F4, Variant::F2]
        .into_iter()
        .find(|v| v.tiles(batch, h_out, w_out) >= MIN_TILES)
}

/// Makes this thread's convolutions (and their parts on the pool) follow `winograd` until the
/// guard drops: a variant wherever they can, or never ([`Winograd::Off`]); the rest of the
/// current policy stays.
#[cfg(test)]
pub(super) fn choose(winograd: Winograd) -> crate::PolicyGuard {
    KernelPolicy {
        winograd,
        ..KernelPolicy::current()
    }
    .enter()
}

// ---------------------------------------------------------------------------------------------
// The transforms
// ---------------------------------------------------------------------------------------------

#[inline(always)]
fn add(a: Lane, b: Lane) -> Lane {
    Lane(std::array::from_fn(|i| a[i] + b[i]))
}

#[inline(always)]
fn sub(a: Lane, b: Lane) -> Lane {
    Lane(std::array::from_fn(|i| a[i] - b[i]))
}

#[inline(always)]
fn scale(a: Lane, s: f32) -> Lane {
    Lane(std::array::from_fn(|i| a[i] * s))
}

/// `Bᵀ x` for one column (or row) of a window: for m = 2, `Bᵀ = [[1, 0, −1, 0], [0, 1, 1, 0],
/// [0, −1, 1, 0], [0, 1, 0, −1]]`; for m = 4,
/// `Bᵀ = [[4, 0, −5, 0, 1, 0], [0, −4, −4, 1, 1, 0], [0, 4, −4, −1, 1, 0], [0, −2, −1, 2, 1, 0],
/// [0, 2, −1, −2, 1, 0], [0, 4, 0, −5, 0, 1]]`.
#[inline(always)]
fn input_1d<const M: usize>(x: &[Lane; MAX_WINDOW]) -> [Lane; MAX_WINDOW] {
    let mut y = [ZERO; MAX_WINDOW];
    if M == 2 {
        y[0] = sub(x[0], x[2]);
        y[1] = add(x[1], x[2]);
        y[2] = sub(x[2], x[1]);
        y[3] = sub(x[1], x[3]);
    } else {
        let a = sub(x[4], scale(x[2], 4.0));
        let b = sub(x[3], scale(x[1], 4.0));
        let c = sub(x[4], x[2]);
        let e = scale(sub(x[3], x[1]), 2.0);
        y[0] = add(sub(scale(x[0], 4.0), scale(x[2], 5.0)), x[4]);
        y[1] = add(a, b);
        y[2] = sub(a, b);
        y[3] = add(c, e);
        y[4] = sub(c, e);
        y[5] = add(sub(scale(x[1], 4.0), scale(x[3], 5.0)), x[5]);
    }
    y
}

/// `Aᵀ x` for one column (or row) of the points: for m = 2, `Aᵀ = [[1, 1, 1, 0], [0, 1, −1,
/// −1]]`; for m = 4, `Aᵀ = [[1, 1, 1, 1, 1, 0], [0, 1, −1, 2, −2, 0], [0, 1, 1, 4, 4, 0], [0, 1,
/// −1, 8, −8, 1]]`. Only the first m entries of the result are meaningful.
#[inline(always)]
fn output_1d<const M: usize>(x: &[Lane; MAX_WINDOW]) -> [Lane; MAX_WINDOW] {
    let mut y = [ZERO; MAX_WINDOW];
    if M == 2 {
        y[0] = add(add(x[0], x[1]), x[2]);
        y[1] = sub(sub(x[1], x[2]), x[3]);
    } else {
        let p = add(x[1], x[2]);
        let q = sub(x[1], x[2]);
        let r = add(x[3], x[4]);
        let s = sub(x[3], x[4]);
        y[0] = add(add(x[0], p), r);
        y[1] = add(q, scale(s, 2.0));
        y[2] = add(p, scale(r, 4.0));
        y[3] = add(add(q, scale(s, 8.0)), x[5]);
    }
    y
}

/// `Bᵀ d B` of a window of lanes (`d[row][col]`, the first m + 2 of each side used).
#[inline(always)]
fn input_2d<const M: usize>(
    d: &[[Lane; MAX_WINDOW]; MAX_WINDOW],
) -> [[Lane; MAX_WINDOW]; MAX_WINDOW] {
    let a = M + 2;
    let mut t = [[ZERO; MAX_WINDOW]; MAX_WINDOW];
    for c in 0..a {
        let column = std::array::from_fn(|r| d[r][c]);
        let y = input_1d::<M>(&column);
        for r in 0..a {
            t[r][c] = y[r];
        }
    }
    let mut v = [[ZERO; MAX_WINDOW]; MAX_WINDOW];
    for r in 0..a {
        v[r] = input_1d::<M>(&t[r]);
    }
    v
}

/// `Aᵀ m A` of the points of a tile of lanes (`m[row][col]`): `y[i][j]` for i, j < m.
#[inline(always)]
fn output_2d<const M: usize>(
    m: &[[Lane; MAX_WINDOW]; MAX_WINDOW],
) -> [[Lane; MAX_WINDOW]; MAX_WINDOW] {
    let a = M + 2;
    let mut t = [[ZERO; MAX_WINDOW]; MAX_WINDOW];
    for c in 0..a {
        let column = std::array::from_fn(|r| m[r][c]);
        let y = output_1d::<M>(&column);
        for i in 0..M {
            t[i][c] = y[i];
        }
    }
    let mut y = [[ZERO; MAX_WINDOW]; MAX_WINDOW];
    for i in 0..M {
        y[i] = output_1d::<M>(&t[i]);
    }
    y
}

/// `G g` for one column (or row) of a 3×3 weight, in f64: for m = 2, `G = [[1, 0, 0], [½, ½,
/// ½], [½, −½, ½], [0, 0, 1]]`; for m = 4, `G = [[¼, 0, 0], [−⅙, −⅙, −⅙], [−⅙, ⅙, −⅙],
/// [1/24, 1/12, ⅙], [1/24, −1/12, ⅙], [0, 0, 1]]`.
#[inline(always)]
fn weight_1d(variant: Variant, [g0, g1, g2]: [f64; 3]) -> [f64; MAX_WINDOW] {
    match variant {
        Variant::F2 => [g0, 0.5 * (g0 + g1 + g2), 0.5 * (g0 - g1 + g2), g2, 0.0, 0.0],
        Variant::F4 => [
            0.25 * g0,
            -(g0 + g1 + g2) / 6.0,
            -(g0 - g1 + g2) / 6.0,
            g0 / 24.0 + g1 / 12.0 + g2 / 6.0,
            g0 / 24.0 - g1 / 12.0 + g2 / 6.0,
            g2,
        ],
    }
}

/// A layer's weights transformed to `G g Gᵀ` for one variant, laid out as (m+2)² matrices
/// `[C_out, C_in]` (one per point), the GEMMs' left operands; `[C_in, C_out]` when made from
/// channels-last weights (the right operands of the channels-last GEMMs). Kept in f32, or
/// (channels-first only) rounded to bf16 and packed for [`super::gemm_bf16`] when made for
/// products in bf16 (see [`multiplies_in_bf16`]).
#[derive(Debug)]
pub(super) struct WinogradWeights {
    transformed: Transformed,
    variant: Variant,
    c_out: usize,
    c_in: usize,
}

/// The per-point matrices of [`WinogradWeights`] in the form the products read.
#[derive(Debug)]
enum Transformed {
    F32(Vec<f32>),
    /// Each point's `[C_out, C_in]` (channels-first), the bf16 GEMM's left operand.
    Bf16(Vec<PackedA>),
}

impl Transformed {
    fn bytes(&self) -> u64 {
        (match self {
            Transformed::F32(values) => std::mem::size_of_val(values.as_slice()),
            Transformed::Bf16(points) => points.iter().map(PackedA::bytes).sum(),
        }) as u64
    }
}

/// Whether a layer in `channels_last` layout multiplies its transformed values in bf16 here:
/// inside a bf16 scope ([`super::gemm_bf16::active`]), channels-first layers (the UNet's and the
/// ControlNets'). The autoencoders' channels-last layers keep f32 products: their rounding
/// lands in the picture, and F(4×4, 3×3)'s transforms magnify it some tens of times (measured
/// with bf16 products on the full VAE at 256², one step: 2.04 levels mean and 21 max from the
/// f32 picture, against 0.46 and 5 with f32 products; docs/ARCHITECTURE.md, "bf16 on the CPU").
pub(super) fn multiplies_in_bf16(channels_last: bool) -> bool {
    gemm_bf16::active() && !channels_last
}

impl WinogradWeights {
    /// Transforms a layer's 3×3 weights for `variant`: `[C_out, C_in, 3, 3]` (torch's layout),
    /// or `[3, 3, C_in, C_out]` when `channels_last`. Each point is computed in f64 and rounded
    /// once (to f32, and then to bf16 when `bf16`, which channels-last weights never are); pairs
    /// of channels are split over `threads`.
    pub(super) fn new(
        weight: &[f32],
        c_out: usize,
        c_in: usize,
        channels_last: bool,
        variant: Variant,
        bf16: bool,
        threads: usize,
    ) -> Self {
        assert_eq!(weight.len(), c_out * c_in * 9, "3×3 weights");
        assert!(!(bf16 && channels_last), "bf16 products are channels-first");
        let plane = c_out * c_in;
        let (a, points) = (variant.window(), variant.points());
        let mut values = vec![0f32; points * plane];
        let dst = SharedMut(values.as_mut_ptr());
        // `pair` indexes a (C_out, C_in) pair in either layout's order, the same in the source
        // and in each point's matrix.
        let work = |pairs: std::ops::Range<usize>| {
            for pair in pairs {
                let tap = |t: usize| {
                    f64::from(if channels_last {
                        weight[t * plane + pair]
                    } else {
                        weight[pair * 9 + t]
                    })
                };
                // G g (a × 3: columns of g transformed), then (G g) Gᵀ (rows transformed).
                let columns: [[f64; MAX_WINDOW]; 3] =
                    std::array::from_fn(|c| weight_1d(variant, [tap(c), tap(3 + c), tap(6 + c)]));
                let [c0, c1, c2] = columns;
                for (i, ((g0, g1), g2)) in c0.into_iter().zip(c1).zip(c2).take(a).enumerate() {
                    let row = weight_1d(variant, [g0, g1, g2]);
                    for (j, &u) in row[..a].iter().enumerate() {
                        // SAFETY: point (i, j)'s entry for `pair`, inside `values`; pairs are
                        // split between threads, so no other thread writes it.
                        unsafe { *dst.ptr().add((i * a + j) * plane + pair) = u as f32 };
                    }
                }
            }
        };
        for_each_range(plane, threads.clamp(1, plane.max(1)), &work);
        let transformed = if bf16 {
            let points = (0..points).map(|xi| {
                let mut packed = PackedA::default();
                packed.repack(&values[xi * plane..][..plane], c_out, c_in, c_in, threads);
                packed
            });
            Transformed::Bf16(points.collect())
        } else {
            Transformed::F32(values)
        };
        WEIGHT_BYTES.fetch_add(transformed.bytes(), Ordering::Relaxed);
        Self {
            transformed,
            variant,
            c_out,
            c_in,
        }
    }

    /// Point ξ's f32 matrix (weights made without bf16).
    fn point(&self, xi: usize) -> &[f32] {
        let Transformed::F32(values) = &self.transformed else {
            unreachable!("the f32 products read f32 weights");
        };
        let plane = self.c_out * self.c_in;
        &values[xi * plane..][..plane]
    }

    pub(super) fn variant(&self) -> Variant {
        self.variant
    }

    /// Whether the products read these weights in bf16.
    pub(super) fn is_bf16(&self) -> bool {
        !matches!(self.transformed, Transformed::F32(_))
    }
}

impl Drop for WinogradWeights {
    fn drop(&mut self) {
        WEIGHT_BYTES.fetch_sub(self.transformed.bytes(), Ordering::Relaxed);
    }
}

/// Copies `n ≤ LANES` values from `src[at..]` into a lane (the rest zero). A whole lane is a
/// fixed-size copy the compiler keeps in a register; only a part calls `memcpy`.
#[inline(always)]
fn load(src: &[f32], at: usize, n: usize) -> Lane {
    if n == LANES {
        return Lane(src[at..at + LANES].try_into().expect("a whole lane"));
    }
    let mut lane = ZERO;
    lane[..n].copy_from_slice(&src[at..at + n]);
    lane
}

/// Copies the first `n ≤ LANES` values of `lane` to `dst[at..]` (a whole lane without `memcpy`).
#[inline(always)]
fn store(dst: &mut [f32], at: usize, lane: &Lane, n: usize) {
    if n == LANES {
        dst[at..at + LANES].copy_from_slice(&lane.0);
    } else {
        dst[at..at + n].copy_from_slice(&lane[..n]);
    }
}

/// [`store`] through a raw pointer.
///
/// # Safety
/// `dst` is valid for writes of `n` values that no other thread touches meanwhile.
#[inline(always)]
unsafe fn store_raw(dst: *mut f32, lane: &Lane, n: usize) {
    // SAFETY: the caller's.
    unsafe {
        if n == LANES {
            dst.cast::<[f32; LANES]>().write_unaligned(lane.0);
        } else {
            std::ptr::copy_nonoverlapping(lane.as_ptr(), dst, n);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Channels-first maps
// ---------------------------------------------------------------------------------------------

/// Shape of one channels-first Winograd convolution.
#[derive(Debug, Clone, Copy)]
pub(super) struct Shape {
    pub(super) batch: usize,
    pub(super) c_in: usize,
    pub(super) c_out: usize,
    /// Size of each of the m² phase planes of the padded input (at least one more than the
    /// tiles along each side, zeros past the padded input).
    pub(super) h_plane: usize,
    pub(super) w_plane: usize,
    /// Output size (the padded input's size minus 2).
    pub(super) h_out: usize,
    pub(super) w_out: usize,
}

/// Writes the convolution of `planes` (`[batch][C_in][m² phases][h_plane][w_plane]`, phase
/// `(row % m)·m + col % m` of the zero-padded input, m the weights' variant's tile) by
/// `weights`, plus `bias`, into `out` (`[batch][C_out][h_out][w_out]`), on up to `threads`
/// threads.
pub(super) fn convolve(
    planes: &[f32],
    shape: &Shape,
    weights: &WinogradWeights,
    bias: &[f32],
    out: &mut [f32],
    threads: usize,
) {
    let isa = simd::isa();
    match weights.variant {
        Variant::F2 => convolve_with::<2>(isa, planes, shape, weights, bias, out, threads),
        Variant::F4 => convolve_with::<4>(isa, planes, shape, weights, bias, out, threads),
    }
}

/// [`convolve`] with the transforms of `isa` (AVX-512 has its own; the others run the portable
/// ones).
fn convolve_with<const M: usize>(
    isa: Isa,
    planes: &[f32],
    shape: &Shape,
    weights: &WinogradWeights,
    bias: &[f32],
    out: &mut [f32],
    threads: usize,
) {
    let s = *shape;
    count(weights);
    let points = weights.variant.points();
    debug_assert_eq!(weights.variant.tile(), M);
    assert_eq!((weights.c_out, weights.c_in), (s.c_out, s.c_in), "weights");
    let (th, tw) = (s.h_out.div_ceil(M), s.w_out.div_ceil(M));
    assert!(
        s.h_plane > th && s.w_plane > tw,
        "phase planes cover every tile's window"
    );
    assert_eq!(
        planes.len(),
        s.batch * s.c_in * M * M * s.h_plane * s.w_plane
    );
    assert_eq!(out.len(), s.batch * s.c_out * s.h_out * s.w_out);
    assert_eq!(bias.len(), s.c_out);
    let tile_rows = s.batch * th;
    if tile_rows == 0 || tw == 0 {
        return;
    }
    let rows_per_chunk = (chunk_budget(points, s.c_in, s.c_out)
        / (points * s.c_in.max(s.c_out) * tw * 4))
        .clamp(1, tile_rows);
    let chunk_tiles = rows_per_chunk * tw;
    let mut transformed = vec![0f32; points * s.c_in * chunk_tiles];
    let mut products = vec![0f32; points * s.c_out * chunk_tiles];
    let out_ptr = SharedMut(out.as_mut_ptr());
    let mut first_row = 0;
    while first_row < tile_rows {
        let rows = rows_per_chunk.min(tile_rows - first_row);
        let tiles = rows * tw;
        let chunk = first_row..first_row + rows;
        transform_input::<M>(
            isa,
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
        unsafe {
            transform_output::<M>(
                isa,
                &products,
                &s,
                chunk,
                chunk_tiles,
                bias,
                out_ptr,
                threads,
            )
        };
        first_row += rows;
    }
}

/// `Bᵀ d B` of every window in tile rows `chunk` (global tile row `r` is image `r / th`, row
/// `r % th`), into `transformed` `[points][C_in][stride]`, tile `(r − chunk.start)·tw + tx`.
fn transform_input<const M: usize>(
    isa: Isa,
    planes: &[f32],
    s: &Shape,
    chunk: std::ops::Range<usize>,
    stride: usize,
    transformed: &mut [f32],
    threads: usize,
) {
    // Only x86-64 has a kernel of its own.
    #[cfg(not(target_arch = "x86_64"))]
    let _ = isa;
    let a = M + 2;
    let (th, tw) = (s.h_out.div_ceil(M), s.w_out.div_ceil(M));
    let plane_len = s.h_plane * s.w_plane;
    let point_len = s.c_in * stride;
    let dst = SharedMut(transformed.as_mut_ptr());
    let work = |channels: std::ops::Range<usize>| {
        for ci in channels {
            for (local, r) in chunk.clone().enumerate() {
                let (image, ty) = (r / th, r % th);
                let phases =
                    &planes[(image * s.c_in + ci) * M * M * plane_len..][..M * M * plane_len];
                // Window value (row, col) of tile tx: phase (row % m, col % m), plane row
                // ty + row / m, column tx + col / m.
                let rows: [[&[f32]; MAX_WINDOW]; MAX_WINDOW] = std::array::from_fn(|row| {
                    std::array::from_fn(|col| {
                        if row >= a || col >= a {
                            return &[][..];
                        }
                        let phase = &phases[((row % M) * M + col % M) * plane_len..][..plane_len];
                        &phase[(ty + row / M) * s.w_plane + col / M..][..tw]
                    })
                });
                let at = ci * stride + local * tw;
                #[cfg(target_arch = "x86_64")]
                if isa == Isa::Avx512 {
                    // SAFETY: the CPU has AVX-512F; point (i, j)'s row of channel ci, tiles
                    // at..at + tw, lies inside `transformed` ([points][C_in][stride], at + tw ≤
                    // stride), and channel ci is this thread's alone.
                    unsafe { avx512::input_tile_row::<M>(&rows, tw, dst.ptr().add(at), point_len) };
                    continue;
                }
                let mut tx = 0;
                while tx < tw {
                    let n = LANES.min(tw - tx);
                    let d = std::array::from_fn(|row| {
                        std::array::from_fn(|col| {
                            if row < a && col < a {
                                load(rows[row][col], tx, n)
                            } else {
                                ZERO
                            }
                        })
                    });
                    let v = input_2d::<M>(&d);
                    for (i, row) in v.iter().take(a).enumerate() {
                        for (j, lane) in row.iter().take(a).enumerate() {
                            // SAFETY: point (i, j)'s row of channel ci, tiles at + tx..+ n:
                            // inside `transformed` ([points][C_in][stride], at + tw ≤ stride),
                            // and channel ci is this thread's alone.
                            unsafe {
                                store_raw(
                                    dst.ptr().add((i * a + j) * point_len + at + tx),
                                    lane,
                                    n,
                                );
                            }
                        }
                    }
                    tx += n;
                }
            }
        }
    };
    for_each_range(s.c_in, threads.min(s.c_in), &work);
}

/// The GEMMs `products[ξ] = U[ξ] · transformed[ξ]` (`[C_out, C_in] × [C_in, tiles]`), split
/// over threads by point; in bf16 (each point's transformed input rounded and packed on the
/// thread that multiplies it) when the weights are.
fn multiply(
    transformed: &[f32],
    weights: &WinogradWeights,
    s: &Shape,
    tiles: usize,
    stride: usize,
    products: &mut [f32],
    threads: usize,
) {
    let points = weights.variant.points();
    let dst = SharedMut(products.as_mut_ptr());
    let work = |points: std::ops::Range<usize>| {
        let mut packed_rhs = PackedB::default();
        for xi in points {
            let rhs = &transformed[xi * s.c_in * stride..][..s.c_in * stride];
            if let Transformed::Bf16(packed) = &weights.transformed {
                packed_rhs.repack_rows(rhs, s.c_in, tiles, stride, 1);
                // SAFETY: products[ξ][0..C_out][0..tiles] (row stride `stride`) is point ξ's
                // own block, which no other thread touches; A is U[ξ] ([C_out, C_in]) and B
                // the rows just packed ([C_in, tiles]).
                unsafe {
                    gemm_bf16::gemm_into(
                        &packed[xi],
                        &packed_rhs,
                        dst.ptr().add(xi * s.c_out * stride),
                        stride,
                        1,
                    );
                }
                continue;
            }
            let lhs = weights.point(xi);
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
    for_each_range(points, threads.min(points), &work);
}

/// `Aᵀ m A` of every tile of `chunk` plus the bias, into the output map.
///
/// # Safety
/// `out` points to `[batch][C_out][h_out][w_out]` values that no other thread touches meanwhile.
#[allow(clippy::too_many_arguments)]
unsafe fn transform_output<const M: usize>(
    isa: Isa,
    products: &[f32],
    s: &Shape,
    chunk: std::ops::Range<usize>,
    stride: usize,
    bias: &[f32],
    out: SharedMut<f32>,
    threads: usize,
) {
    // Only x86-64 has a kernel of its own.
    #[cfg(not(target_arch = "x86_64"))]
    let _ = isa;
    let a = M + 2;
    let (th, tw) = (s.h_out.div_ceil(M), s.w_out.div_ceil(M));
    let point_len = s.c_out * stride;
    let work = |channels: std::ops::Range<usize>| {
        // One tile row's M output rows, M values a tile (the last tile's may pass w_out).
        let mut y = vec![0f32; M * M * tw];
        for co in channels {
            for (local, r) in chunk.clone().enumerate() {
                let (image, ty) = (r / th, r % th);
                let at = co * stride + local * tw;
                #[cfg(target_arch = "x86_64")]
                if isa == Isa::Avx512 {
                    let rows = M.min(s.h_out - M * ty);
                    // SAFETY: the CPU has AVX-512F; products[ξ][co][at..at + tw] lie inside
                    // `products` ([points][C_out][stride]); output rows M·ty.. (`rows` of them,
                    // inside the map) of channel co of `image` are this thread's alone.
                    unsafe {
                        avx512::output_tile_row::<M>(
                            products.as_ptr().add(at),
                            point_len,
                            tw,
                            bias[co],
                            out.ptr()
                                .add(((image * s.c_out + co) * s.h_out + M * ty) * s.w_out),
                            rows,
                            s.w_out,
                        )
                    };
                    continue;
                }
                let mut tx = 0;
                while tx < tw {
                    let n = LANES.min(tw - tx);
                    let m = std::array::from_fn(|i| {
                        std::array::from_fn(|j| {
                            if i < a && j < a {
                                load(products, (i * a + j) * point_len + at + tx, n)
                            } else {
                                ZERO
                            }
                        })
                    });
                    let tile = output_2d::<M>(&m);
                    for (i, rows) in tile.iter().take(M).enumerate() {
                        let dst = &mut y[i * M * tw..][..M * tw];
                        for (j, lane) in rows.iter().take(M).enumerate() {
                            for (l, &v) in lane[..n].iter().enumerate() {
                                dst[(tx + l) * M + j] = v + bias[co];
                            }
                        }
                    }
                    tx += n;
                }
                for i in 0..M {
                    let row = M * ty + i;
                    if row < s.h_out {
                        // SAFETY: output row `row` of channel co of `image`: inside the map,
                        // and channel co is this thread's alone.
                        unsafe {
                            let dst = out
                                .ptr()
                                .add(((image * s.c_out + co) * s.h_out + row) * s.w_out);
                            std::ptr::copy_nonoverlapping(y[i * M * tw..].as_ptr(), dst, s.w_out);
                        }
                    }
                }
            }
        }
    };
    for_each_range(s.c_out, threads.min(s.c_out), &work);
}

/// The transforms on AVX-512: the portable ones' arithmetic, operation for operation (so the
/// same values, bit for bit), on registers instead of lane arrays, a window column by column
/// (six registers in, six out) as the portable `input_2d` and `output_2d` do. Compiled for the
/// baseline, the portable transforms spent most of their time copying 16-value lanes through
/// the stack and calling `memcpy` for the partial lanes that every tile row narrower than 16
/// tiles has (the UNet's 32² maps have 8 tiles a row): a seventh of a bf16 UNet call at batch
/// 3. Here partial lanes are masked loads and stores, and the channels-first output transform
/// interleaves a tile row's M outputs per tile in registers. (A `#[target_feature]` copy of the
/// portable code was tried first on the blocked kernel and ran twice as slow: the compiler
/// kept whole 6 × 6 windows of lane arrays on the stack.)
#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use super::{LANES, MAX_WINDOW};

    /// The first `n` of 16 lanes.
    #[inline(always)]
    pub(super) fn first(n: usize) -> __mmask16 {
        if n >= LANES {
            u16::MAX
        } else {
            (1u16 << n) - 1
        }
    }

    #[target_feature(enable = "avx512f")]
    #[inline]
    fn add(a: __m512, b: __m512) -> __m512 {
        _mm512_add_ps(a, b)
    }

    #[target_feature(enable = "avx512f")]
    #[inline]
    fn sub(a: __m512, b: __m512) -> __m512 {
        _mm512_sub_ps(a, b)
    }

    #[target_feature(enable = "avx512f")]
    #[inline]
    fn scale(a: __m512, s: f32) -> __m512 {
        _mm512_mul_ps(a, _mm512_set1_ps(s))
    }

    /// [`super::input_1d`].
    #[target_feature(enable = "avx512f")]
    #[inline]
    fn input_1d<const M: usize>(x: &[__m512; MAX_WINDOW]) -> [__m512; MAX_WINDOW] {
        let mut y = [_mm512_setzero_ps(); MAX_WINDOW];
        if M == 2 {
            y[0] = sub(x[0], x[2]);
            y[1] = add(x[1], x[2]);
            y[2] = sub(x[2], x[1]);
            y[3] = sub(x[1], x[3]);
        } else {
            let a = sub(x[4], scale(x[2], 4.0));
            let b = sub(x[3], scale(x[1], 4.0));
            let c = sub(x[4], x[2]);
            let e = scale(sub(x[3], x[1]), 2.0);
            y[0] = add(sub(scale(x[0], 4.0), scale(x[2], 5.0)), x[4]);
            y[1] = add(a, b);
            y[2] = sub(a, b);
            y[3] = add(c, e);
            y[4] = sub(c, e);
            y[5] = add(sub(scale(x[1], 4.0), scale(x[3], 5.0)), x[5]);
        }
        y
    }

    /// [`super::output_1d`].
    #[target_feature(enable = "avx512f")]
    #[inline]
    fn output_1d<const M: usize>(x: &[__m512; MAX_WINDOW]) -> [__m512; MAX_WINDOW] {
        let mut y = [_mm512_setzero_ps(); MAX_WINDOW];
        if M == 2 {
            y[0] = add(add(x[0], x[1]), x[2]);
            y[1] = sub(sub(x[1], x[2]), x[3]);
        } else {
            let p = add(x[1], x[2]);
            let q = sub(x[1], x[2]);
            let r = add(x[3], x[4]);
            let s = sub(x[3], x[4]);
            y[0] = add(add(x[0], p), r);
            y[1] = add(q, scale(s, 2.0));
            y[2] = add(p, scale(r, 4.0));
            y[3] = add(add(q, scale(s, 8.0)), x[5]);
        }
        y
    }

    /// `[a0, b0, a1, b1, …, a7, b7]` and `[a8, b8, …, a15, b15]`.
    #[target_feature(enable = "avx512f")]
    #[inline]
    fn interleave(a: __m512, b: __m512) -> (__m512, __m512) {
        let low = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
        let high = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
        (
            _mm512_permutex2var_ps(a, low, b),
            _mm512_permutex2var_ps(a, high, b),
        )
    }

    /// `Bᵀ d B` (`INPUT`) or `Aᵀ m A` of one window of 16 lanes, value (row, col) loaded from
    /// `src(row, col)` (its first `lanes` lanes, the others zero): columns first, then rows, as
    /// super::input_2d and super::output_2d. The first m + 2 (`INPUT`) or m entries of each
    /// side of the result are meaningful.
    ///
    /// # Safety
    /// The CPU has AVX-512F; every `src` pointer is valid for reads of the `lanes` values.
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn transform_2d<const M: usize, const INPUT: bool>(
        src: impl Fn(usize, usize) -> *const f32,
        lanes: __mmask16,
    ) -> [[__m512; MAX_WINDOW]; MAX_WINDOW] {
        let a = M + 2;
        let outputs = if INPUT { a } else { M };
        let mut t = [[_mm512_setzero_ps(); MAX_WINDOW]; MAX_WINDOW];
        for c in 0..a {
            let mut column = [_mm512_setzero_ps(); MAX_WINDOW];
            for (r, value) in column.iter_mut().enumerate().take(a) {
                // SAFETY: the caller's (masked-off lanes are not read).
                *value = unsafe { _mm512_maskz_loadu_ps(lanes, src(r, c)) };
            }
            let y = if INPUT {
                input_1d::<M>(&column)
            } else {
                output_1d::<M>(&column)
            };
            for (r, row) in t.iter_mut().enumerate().take(outputs) {
                row[c] = y[r];
            }
        }
        let mut v = [[_mm512_setzero_ps(); MAX_WINDOW]; MAX_WINDOW];
        for (transformed, row) in v.iter_mut().zip(&t).take(outputs) {
            *transformed = if INPUT {
                input_1d::<M>(row)
            } else {
                output_1d::<M>(row)
            };
        }
        v
    }

    /// `Bᵀ d B` of one window of 16 lanes (the first `lanes` of them read and written): value
    /// (row, col) at `src(row, col)`, point (i, j) to `dst(i, j)`.
    ///
    /// # Safety
    /// The CPU has AVX-512F; every `src` pointer is valid for reads and every `dst` pointer
    /// for writes of the `lanes` values, which no other thread touches meanwhile.
    #[target_feature(enable = "avx512f")]
    #[inline]
    pub(super) unsafe fn input_window<const M: usize>(
        src: impl Fn(usize, usize) -> *const f32,
        dst: impl Fn(usize, usize) -> *mut f32,
        lanes: __mmask16,
    ) {
        let a = M + 2;
        // SAFETY: the caller's.
        let v = unsafe { transform_2d::<M, true>(src, lanes) };
        for (i, row) in v.iter().enumerate().take(a) {
            for (j, &value) in row.iter().enumerate().take(a) {
                // SAFETY: the caller's.
                unsafe { _mm512_mask_storeu_ps(dst(i, j), lanes, value) };
            }
        }
    }

    /// `Aᵀ m A` of one tile's points, 16 lanes (channels) of them: point (i, j) at `src(i, j)`,
    /// output (i, j) for i < `rows`, j < `columns` to `dst(i, j)`.
    ///
    /// # Safety
    /// The CPU has AVX-512F; every `src` pointer is valid for reads and every `dst` pointer
    /// for writes of 16 values, which no other thread touches meanwhile.
    #[target_feature(enable = "avx512f")]
    #[inline]
    pub(super) unsafe fn output_window<const M: usize>(
        src: impl Fn(usize, usize) -> *const f32,
        dst: impl Fn(usize, usize) -> *mut f32,
        rows: usize,
        columns: usize,
    ) {
        // SAFETY: the caller's.
        let y = unsafe { transform_2d::<M, false>(src, u16::MAX) };
        for (i, row) in y.iter().enumerate().take(rows.min(M)) {
            for (j, &value) in row.iter().enumerate().take(columns.min(M)) {
                // SAFETY: the caller's.
                unsafe { _mm512_storeu_ps(dst(i, j), value) };
            }
        }
    }

    /// `Bᵀ d B` of one tile row's windows (super::transform_input's inner loop): window value
    /// (row, col) of tile tx is `rows[row][col][tx]`; point (i, j) of tile tx goes to
    /// `dst[(i·a + j)·point_len + tx]`.
    ///
    /// # Safety
    /// The CPU has AVX-512F; `rows` hold `tw` values each (those past m + 2 are not read);
    /// `dst` is valid for those writes, which no other thread touches meanwhile.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn input_tile_row<const M: usize>(
        rows: &[[&[f32]; MAX_WINDOW]; MAX_WINDOW],
        tw: usize,
        dst: *mut f32,
        point_len: usize,
    ) {
        let a = M + 2;
        let mut tx = 0;
        while tx < tw {
            // SAFETY: lanes tx.. up to tw of rows of tw values (masked-off lanes are neither
            // read nor written); the writes are the caller's.
            unsafe {
                input_window::<M>(
                    |r, c| rows[r][c][tx..].as_ptr(),
                    |i, j| dst.add((i * a + j) * point_len + tx),
                    first(tw - tx),
                )
            };
            tx += LANES;
        }
    }

    /// `Aᵀ m A` of one tile row's points plus `bias` (super::transform_output's inner loop):
    /// point (i, j) of tile tx is `products[(i·a + j)·point_len + tx]`; output row i < `rows`
    /// of the tile row starts at `out[i·w_out]`, where tile tx's outputs are columns
    /// `M·tx .. M·tx + M` (those below `w_out`).
    ///
    /// # Safety
    /// The CPU has AVX-512F; `products` is valid for those reads (`tw` tiles of each point);
    /// `out` for writes of `rows` rows of `w_out` values, which no other thread touches.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn output_tile_row<const M: usize>(
        products: *const f32,
        point_len: usize,
        tw: usize,
        bias: f32,
        out: *mut f32,
        rows: usize,
        w_out: usize,
    ) {
        let a = M + 2;
        let bias = _mm512_set1_ps(bias);
        let mut tx = 0;
        while tx < tw {
            // SAFETY: lanes tx.. up to tw of each point's tiles, the caller's (masked-off lanes
            // are not read).
            let tile = unsafe {
                transform_2d::<M, false>(
                    |i, j| products.add((i * a + j) * point_len + tx),
                    first(tw - tx),
                )
            };
            for (i, y) in tile.iter().enumerate().take(rows.min(M)) {
                // Tile tx + l's output j is column M·(tx + l) + j: the M lanes interleaved.
                let parts = if M == 2 {
                    let (low, high) = interleave(add(y[0], bias), add(y[1], bias));
                    [low, high, low, high]
                } else {
                    let (p_low, p_high) = interleave(add(y[0], bias), add(y[2], bias));
                    let (q_low, q_high) = interleave(add(y[1], bias), add(y[3], bias));
                    let (first_quarter, second) = interleave(p_low, q_low);
                    let (third, fourth) = interleave(p_high, q_high);
                    [first_quarter, second, third, fourth]
                };
                for (k, &part) in parts.iter().enumerate().take(M) {
                    let column = M * tx + LANES * k;
                    if column >= w_out {
                        break;
                    }
                    // SAFETY: columns column.. below w_out of row i, the caller's.
                    unsafe {
                        _mm512_mask_storeu_ps(
                            out.add(i * w_out + column),
                            first(w_out - column),
                            part,
                        )
                    };
                }
            }
            tx += LANES;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Channels-last maps
// ---------------------------------------------------------------------------------------------

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

impl ChannelsLastShape {
    /// Checks the operands of a convolution of this shape: `x` `[batch, h, w, C_in]`, `out`
    /// `[batch, h_out, w_out, C_out]`, and the weights' channels.
    fn check(&self, x: &[f32], out: &[f32], weights: &WinogradWeights) {
        assert_eq!(
            (weights.c_out, weights.c_in),
            (self.c_out, self.c_in),
            "weights"
        );
        assert_eq!(x.len(), self.batch * self.h * self.w * self.c_in);
        assert_eq!(out.len(), self.batch * self.h_out * self.w_out * self.c_out);
    }

    /// The `C_in` values of pixel `(y, col)` of `image`'s zero-padded input (coordinates
    /// counting the padding): a slice of `x`, or `zeros` outside the input.
    #[inline(always)]
    fn pixel<'a>(
        &self,
        x: &'a [f32],
        zeros: &'a [f32],
        image: usize,
        y: usize,
        col: usize,
    ) -> &'a [f32] {
        match (y.checked_sub(self.pad_top), col.checked_sub(self.pad_left)) {
            (Some(y), Some(col)) if y < self.h && col < self.w => {
                &x[((image * self.h + y) * self.w + col) * self.c_in..][..self.c_in]
            }
            _ => zeros,
        }
    }
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
    let isa = simd::isa();
    match (weights.variant, blocked_fits(isa, shape.c_in, shape.c_out)) {
        (Variant::F2, false) => {
            convolve_channels_last_with::<2>(isa, x, shape, weights, finish, out, threads)
        }
        (Variant::F4, false) => {
            convolve_channels_last_with::<4>(isa, x, shape, weights, finish, out, threads)
        }
        (Variant::F2, true) => convolve_blocked::<2>(isa, x, shape, weights, finish, out, threads),
        (Variant::F4, true) => convolve_blocked::<4>(isa, x, shape, weights, finish, out, threads),
    }
}

fn convolve_channels_last_with<const M: usize>(
    isa: Isa,
    x: &[f32],
    shape: &ChannelsLastShape,
    weights: &WinogradWeights,
    finish: &(dyn Fn(usize, &mut [f32]) + Sync),
    out: &mut [f32],
    threads: usize,
) {
    #[cfg(not(target_arch = "x86_64"))]
    let _ = isa;
    let s = *shape;
    count(weights);
    let (a, points) = (M + 2, weights.variant.points());
    debug_assert_eq!(weights.variant.tile(), M);
    s.check(x, out, weights);
    let (th, tw) = (s.h_out.div_ceil(M), s.w_out.div_ceil(M));
    let tile_rows = s.batch * th;
    if tile_rows == 0 || tw == 0 || s.c_out == 0 {
        return;
    }
    // At least one tile row per thread, so that the transforms share out.
    let rows_per_chunk = (chunk_budget(points, s.c_in, s.c_out)
        / (points * s.c_in.max(s.c_out) * tw * 4))
        .max(threads)
        .clamp(1, tile_rows);
    let chunk_tiles = rows_per_chunk * tw;
    let mut transformed = vec![0f32; points * chunk_tiles * s.c_in];
    let mut products = vec![0f32; points * chunk_tiles * s.c_out];
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
                    // The window's input pixels (zeros outside the map).
                    let d: [[&[f32]; MAX_WINDOW]; MAX_WINDOW] = std::array::from_fn(|row| {
                        std::array::from_fn(|col| {
                            if row < a && col < a {
                                s.pixel(x, &zeros, image, M * ty + row, M * tx + col)
                            } else {
                                &[][..]
                            }
                        })
                    });
                    let tile = local * tw + tx;
                    #[cfg(target_arch = "x86_64")]
                    if isa == Isa::Avx512 {
                        let mut ch = 0;
                        while ch < s.c_in {
                            let point = |i: usize, j: usize| {
                                ((i * a + j) * chunk_tiles + tile) * s.c_in + ch
                            };
                            // SAFETY: the CPU has AVX-512F; channels ch.. (up to C_in) of each
                            // window pixel, and of point (i, j)'s row for this tile in
                            // `transformed`, which is this thread's alone (as below).
                            unsafe {
                                avx512::input_window::<M>(
                                    |row, col| d[row][col][ch..].as_ptr(),
                                    |i, j| dst.ptr().add(point(i, j)),
                                    avx512::first(s.c_in - ch),
                                )
                            };
                            ch += LANES;
                        }
                        continue;
                    }
                    let mut ch = 0;
                    while ch < s.c_in {
                        let n = LANES.min(s.c_in - ch);
                        let window = std::array::from_fn(|row| {
                            std::array::from_fn(|col| {
                                if row < a && col < a {
                                    load(d[row][col], ch, n)
                                } else {
                                    ZERO
                                }
                            })
                        });
                        let v = input_2d::<M>(&window);
                        for (i, row) in v.iter().take(a).enumerate() {
                            for (j, lane) in row.iter().take(a).enumerate() {
                                // SAFETY: point (i, j)'s row for this tile in `transformed`
                                // ([points][chunk_tiles][C_in]), channels ch..ch + n; tile rows
                                // are split between threads, so the row is this thread's alone.
                                unsafe {
                                    store_raw(
                                        dst.ptr()
                                            .add(((i * a + j) * chunk_tiles + tile) * s.c_in + ch),
                                        lane,
                                        n,
                                    );
                                }
                            }
                        }
                        ch += n;
                    }
                }
            }
        };
        for_each_range(rows, threads.min(rows), &input);
        let tiles = rows * tw;
        let products_ptr = SharedMut(products.as_mut_ptr());
        let multiply = |points: std::ops::Range<usize>| {
            for xi in points {
                let lhs = &transformed[xi * chunk_tiles * s.c_in..][..tiles * s.c_in];
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
                        lhs.as_ptr(),
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
        for_each_range(points, threads.min(points), &multiply);
        let products = &products;
        let output = |local_rows: std::ops::Range<usize>| {
            for local in local_rows {
                let (image, ty) = ((chunk.start + local) / th, (chunk.start + local) % th);
                let out_rows = M.min(s.h_out - M * ty);
                let row_len = s.w_out * s.c_out;
                // SAFETY: output rows M·ty.. of `image` (those inside the map): this tile
                // row's alone, and tile rows are split between threads.
                let dst = unsafe {
                    std::slice::from_raw_parts_mut(
                        out_ptr.ptr().add((image * s.h_out + M * ty) * row_len),
                        out_rows * row_len,
                    )
                };
                for tx in 0..tw {
                    let tile = local * tw + tx;
                    let out_cols = M.min(s.w_out - M * tx);
                    #[cfg(target_arch = "x86_64")]
                    if isa == Isa::Avx512 && s.c_out.is_multiple_of(LANES) {
                        let out_row = dst.as_mut_ptr();
                        for co in (0..s.c_out).step_by(LANES) {
                            let point = |i: usize, j: usize| {
                                ((i * a + j) * chunk_tiles + tile) * s.c_out + co
                            };
                            // SAFETY: the CPU has AVX-512F; 16 channels of each point's
                            // product for this tile, and of each output pixel of the tile
                            // inside the map, which is this thread's alone (as above).
                            unsafe {
                                avx512::output_window::<M>(
                                    |i, j| products[point(i, j)..][..LANES].as_ptr(),
                                    |i, j| {
                                        let at = i * row_len + (M * tx + j) * s.c_out + co;
                                        debug_assert!(at + LANES <= out_rows * row_len);
                                        out_row.add(at)
                                    },
                                    out_rows,
                                    out_cols,
                                )
                            };
                        }
                        continue;
                    }
                    let mut co = 0;
                    while co < s.c_out {
                        let n = LANES.min(s.c_out - co);
                        let m = std::array::from_fn(|i| {
                            std::array::from_fn(|j| {
                                if i < a && j < a {
                                    let at = ((i * a + j) * chunk_tiles + tile) * s.c_out + co;
                                    load(products, at, n)
                                } else {
                                    ZERO
                                }
                            })
                        });
                        let y = output_2d::<M>(&m);
                        for (i, row) in y.iter().take(out_rows).enumerate() {
                            for (j, lane) in row.iter().take(out_cols).enumerate() {
                                let at = i * row_len + (M * tx + j) * s.c_out + co;
                                store(dst, at, lane, n);
                            }
                        }
                        co += n;
                    }
                }
                for (i, row) in dst.chunks_exact_mut(row_len).enumerate() {
                    finish(image * s.h_out + M * ty + i, row);
                }
            }
        };
        for_each_range(rows, threads.min(rows), &output);
        first_row += rows;
    }
}

// ---------------------------------------------------------------------------------------------
// Narrow channels-last layers, block by block
// ---------------------------------------------------------------------------------------------

/// Widest layer (the larger of C_in and C_out) that [`convolve_blocked`] takes: a block's
/// transformed input and products, `(m+2)²·(C_in + C_out)` values for each of its
/// [`BLOCK_TILES`] tiles, stay near a core's L2 cache (0.9 MiB at 128 channels for F(4×4), 1.3
/// at 256 → 128). Wider layers stream them through [`convolve_channels_last_with`]'s chunks,
/// whose GEMMs are deep enough to hide the traffic (conv_bench, F(4×4), ms, chunked →
/// blocked: 128→128 at 512² 217 → 168, 256→128 at 512² 381 → 309, 256→256 at 256² 170 →
/// 166, but 512→512 at 128² 142 → 284).
const BLOCKED_MAX_CHANNELS: usize = 256;
/// Narrowest layer (the smaller of C_in and C_out) that takes the blocked kernel by default:
/// TAESD's 64 channels gain (conv_bench, 64→64, im2col GEMM → F(4×4) blocked: 512² 96 → 54
/// ms, 256² 24 → 14, 64² 1.6 → 0.9); narrower layers were not measured.
const MIN_BLOCKED_CHANNELS: usize = 64;
/// Tiles (of one tile row) a block transforms, multiplies and transforms back together.
const BLOCK_TILES: usize = 24;

/// Values from one point's matrix to the next in a block's buffers of `c` channels: the
/// matrix plus one lane. The transforms write (and read) all (m+2)² points of a tile at once;
/// at `BLOCK_TILES · c` apart (6 KiB at 64 channels) those addresses share two of the L1
/// cache's 64 sets and evict each other, one lane more spreads them over all of them.
const fn point_stride(c: usize) -> usize {
    BLOCK_TILES * c + LANES
}

/// Whether [`convolve_blocked`] takes a channels-last layer of `C_in → C_out` channels: narrow
/// enough, whole vectors of channels on both sides, and a CPU with the vector registers its register
/// blocks are sized for.
fn blocked_fits(isa: Isa, c_in: usize, c_out: usize) -> bool {
    isa != Isa::Baseline
        && c_in.max(c_out) <= BLOCKED_MAX_CHANNELS
        && c_in.is_multiple_of(LANES)
        && c_out.is_multiple_of(LANES)
}

/// The channels-last convolution of narrow layers (TAESD's 64 channels, the full VAE's 128)
/// a small block of tiles at a time, each block's three steps on one thread, tile rows split
/// over threads. At 64 channels each point's GEMM is `[tiles, 64] × [64, 64]`, four
/// multiply-adds per value moved, so [`convolve_channels_last_with`]'s passes over chunks of
/// megabytes are paced by memory, not arithmetic (conv_bench: F(4×4) no faster than the im2col
/// GEMM at 64 channels). Here a block's transformed input, its products and each point's
/// weights stay in the core's caches, and the products come from register blocks of 6 tiles ×
/// 64 output channels (24 AVX-512 registers), the shape of the GEMM's own, compiled for the
/// CPU's vector registers. The transforms stay on the crate's baseline: compiled for AVX-512,
/// their windows of 36 lanes became masked, spilling code and the layer took twice as long.
fn convolve_blocked<const M: usize>(
    isa: Isa,
    x: &[f32],
    shape: &ChannelsLastShape,
    weights: &WinogradWeights,
    finish: &(dyn Fn(usize, &mut [f32]) + Sync),
    out: &mut [f32],
    threads: usize,
) {
    let s = *shape;
    count(weights);
    let points = weights.variant.points();
    debug_assert_eq!(weights.variant.tile(), M);
    s.check(x, out, weights);
    let th = s.h_out.div_ceil(M);
    let tile_rows = s.batch * th;
    if tile_rows == 0 || s.w_out == 0 || s.c_out == 0 {
        return;
    }
    let conv = Blocked {
        x,
        s,
        weights,
        zeros: vec![0f32; s.c_in],
    };
    let out_ptr = SharedMut(out.as_mut_ptr());
    let work = |tile_rows: std::ops::Range<usize>| {
        let mut scratch = BlockScratch {
            transformed: vec![0f32; points * point_stride(s.c_in)],
            products: vec![0f32; points * point_stride(s.c_out)],
        };
        for r in tile_rows {
            let (image, ty) = (r / th, r % th);
            let out_rows = M.min(s.h_out - M * ty);
            let row_len = s.w_out * s.c_out;
            // SAFETY: output rows M·ty.. of `image` (those inside the map): this tile row's
            // alone, and tile rows are split between threads.
            let dst = unsafe {
                std::slice::from_raw_parts_mut(
                    out_ptr.ptr().add((image * s.h_out + M * ty) * row_len),
                    out_rows * row_len,
                )
            };
            conv.tile_row::<M>(isa, image, ty, dst, &mut scratch);
            for (i, row) in dst.chunks_exact_mut(row_len).enumerate() {
                finish(image * s.h_out + M * ty + i, row);
            }
        }
    };
    for_each_range(tile_rows, threads.min(tile_rows), &work);
}

/// One narrow channels-last convolution's operands, as [`convolve_blocked`] reads them.
struct Blocked<'a> {
    x: &'a [f32],
    s: ChannelsLastShape,
    weights: &'a WinogradWeights,
    /// One pixel of zeros: the window's values outside the map.
    zeros: Vec<f32>,
}

/// A thread's buffers for one block: its transformed input `[ξ][tile][C_in]` and products
/// `[ξ][tile][C_out]`, points [`point_stride`] apart.
struct BlockScratch {
    transformed: Vec<f32>,
    products: Vec<f32>,
}

impl Blocked<'_> {
    /// Tile row `ty` of `image` into `dst` (its output rows inside the map), block by block.
    fn tile_row<const M: usize>(
        &self,
        isa: Isa,
        image: usize,
        ty: usize,
        dst: &mut [f32],
        scratch: &mut BlockScratch,
    ) {
        let s = &self.s;
        let tw = s.w_out.div_ceil(M);
        let out_rows = M.min(s.h_out - M * ty);
        let row_len = s.w_out * s.c_out;
        for first in (0..tw).step_by(BLOCK_TILES) {
            let block = first..tw.min(first + BLOCK_TILES);
            for (t, tx) in block.clone().enumerate() {
                self.transform_window::<M>(isa, image, ty, tx, t, &mut scratch.transformed);
            }
            // Tiles past the block's end hold an earlier block's values (or zeros): they are
            // multiplied along and never read back.
            block_products(
                isa,
                &scratch.transformed,
                self.weights,
                &mut scratch.products,
            );
            let a = M + 2;
            for (t, tx) in block.enumerate() {
                let out_cols = M.min(s.w_out - M * tx);
                #[cfg(target_arch = "x86_64")]
                if isa == Isa::Avx512 {
                    let (products, out_row) = (scratch.products.as_ptr(), dst.as_mut_ptr());
                    for co in (0..s.c_out).step_by(LANES) {
                        let point = |i: usize, j: usize| {
                            // SAFETY: 16 channels of block tile t's product at point (i, j),
                            // inside the thread's scratch (C_out is whole lanes).
                            unsafe {
                                products.add((i * a + j) * point_stride(s.c_out) + t * s.c_out + co)
                            }
                        };
                        let pixel = |i: usize, j: usize| {
                            // SAFETY: 16 channels of output pixel (i, M·tx + j) of this tile
                            // row, inside `dst` for i < out_rows and M·tx + j < w_out.
                            unsafe { out_row.add(i * row_len + (M * tx + j) * s.c_out + co) }
                        };
                        // SAFETY: the CPU has AVX-512F; the pointers as above, and `dst` is
                        // this thread's alone. Whole tiles pass constant bounds, as below.
                        unsafe {
                            if out_rows == M && out_cols == M {
                                avx512::output_window::<M>(point, pixel, M, M)
                            } else {
                                avx512::output_window::<M>(point, pixel, out_rows, out_cols)
                            }
                        };
                    }
                    continue;
                }
                for co in (0..s.c_out).step_by(LANES) {
                    let m = std::array::from_fn(|i| {
                        std::array::from_fn(|j| {
                            if i < a && j < a {
                                let at = (i * a + j) * point_stride(s.c_out) + t * s.c_out + co;
                                load(&scratch.products, at, LANES)
                            } else {
                                ZERO
                            }
                        })
                    });
                    let y = output_2d::<M>(&m);
                    // Whole tiles (all but the right and bottom edges) store with constant
                    // bounds, which the compiler unrolls: 52.6–52.9 ms against 54.4–54.8 for
                    // 64→64 at 512² with the edges' bounds everywhere (conv_bench, alternated).
                    if out_rows == M && out_cols == M {
                        for (i, row) in y.iter().take(M).enumerate() {
                            for (j, lane) in row.iter().take(M).enumerate() {
                                let at = i * row_len + (M * tx + j) * s.c_out + co;
                                store(dst, at, lane, LANES);
                            }
                        }
                    } else {
                        for (i, row) in y.iter().take(out_rows).enumerate() {
                            for (j, lane) in row.iter().take(out_cols).enumerate() {
                                let at = i * row_len + (M * tx + j) * s.c_out + co;
                                store(dst, at, lane, LANES);
                            }
                        }
                    }
                }
            }
        }
    }

    /// `Bᵀ d B` of the window of tile `(ty, tx)` of `image`, into block tile `t` of
    /// `transformed` (`[ξ][tile][C_in]`).
    #[inline(always)]
    fn transform_window<const M: usize>(
        &self,
        isa: Isa,
        image: usize,
        ty: usize,
        tx: usize,
        t: usize,
        transformed: &mut [f32],
    ) {
        #[cfg(not(target_arch = "x86_64"))]
        let _ = isa;
        let (s, x, a) = (&self.s, self.x, M + 2);
        // The window's top-left pixel, and whether the whole window lies inside the map (most
        // do: then each of its values is a fixed offset from there).
        let (y0, x0) = (M * ty, M * tx);
        let inside = y0 >= s.pad_top
            && x0 >= s.pad_left
            && y0 + a <= s.pad_top + s.h
            && x0 + a <= s.pad_left + s.w;
        let corner = if inside {
            ((image * s.h + y0 - s.pad_top) * s.w + x0 - s.pad_left) * s.c_in
        } else {
            0
        };
        let pixel_stride = s.w * s.c_in;
        #[cfg(target_arch = "x86_64")]
        if isa == Isa::Avx512 {
            let dst = transformed.as_mut_ptr();
            for ch in (0..s.c_in).step_by(LANES) {
                let point = |i: usize, j: usize| {
                    // SAFETY: 16 channels of block tile t at point (i, j), inside the thread's
                    // scratch (C_in is whole lanes).
                    unsafe { dst.add((i * a + j) * point_stride(s.c_in) + t * s.c_in + ch) }
                };
                // SAFETY (both): the CPU has AVX-512F; 16 channels of each window pixel, inside
                // `x` (or the zero pixel), and of each point, as above.
                if inside {
                    unsafe {
                        avx512::input_window::<M>(
                            |row, col| {
                                x[corner + row * pixel_stride + col * s.c_in + ch..][..LANES]
                                    .as_ptr()
                            },
                            point,
                            u16::MAX,
                        )
                    };
                } else {
                    unsafe {
                        avx512::input_window::<M>(
                            |row, col| {
                                s.pixel(x, &self.zeros, image, y0 + row, x0 + col)[ch..][..LANES]
                                    .as_ptr()
                            },
                            point,
                            u16::MAX,
                        )
                    };
                }
            }
            return;
        }
        for ch in (0..s.c_in).step_by(LANES) {
            let mut window = [[ZERO; MAX_WINDOW]; MAX_WINDOW];
            if inside {
                for (row, lanes) in window.iter_mut().take(a).enumerate() {
                    let at = corner + row * pixel_stride + ch;
                    for (col, lane) in lanes.iter_mut().take(a).enumerate() {
                        *lane = load(x, at + col * s.c_in, LANES);
                    }
                }
            } else {
                for (row, lanes) in window.iter_mut().take(a).enumerate() {
                    for (col, lane) in lanes.iter_mut().take(a).enumerate() {
                        let pixel = s.pixel(x, &self.zeros, image, y0 + row, x0 + col);
                        *lane = load(pixel, ch, LANES);
                    }
                }
            }
            let v = input_2d::<M>(&window);
            for (i, row) in v.iter().take(a).enumerate() {
                for (j, lane) in row.iter().take(a).enumerate() {
                    let at = (i * a + j) * point_stride(s.c_in) + t * s.c_in + ch;
                    store(transformed, at, lane, LANES);
                }
            }
        }
    }
}

/// `products[ξ][tile] = transformed[ξ][tile] · U[ξ]` (`[C_in] × [C_in, C_out]`) for every
/// point ξ and the block's [`BLOCK_TILES`] tiles, on the CPU's widest vectors.
fn block_products(isa: Isa, transformed: &[f32], weights: &WinogradWeights, products: &mut [f32]) {
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the CPU has the features the function is compiled for.
        Isa::Avx512 => unsafe { block_products_avx512(transformed, weights, products) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        Isa::Avx2 => unsafe { block_products_avx2(transformed, weights, products) },
        _ => block_products_body::<6, 1>(transformed, weights, products),
    }
}

/// AVX-512: 6 tiles × 4 lanes of output channels, 24 of the 32 registers.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
fn block_products_avx512(transformed: &[f32], weights: &WinogradWeights, products: &mut [f32]) {
    block_products_body::<6, 4>(transformed, weights, products)
}

/// AVX2, where a lane is two registers: 6 tiles × 1 lane, 12 of the 16.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn block_products_avx2(transformed: &[f32], weights: &WinogradWeights, products: &mut [f32]) {
    block_products_body::<6, 1>(transformed, weights, products)
}

/// [`block_products`] with register blocks of `R` tiles × `L` lanes of output channels.
#[inline(always)]
fn block_products_body<const R: usize, const L: usize>(
    transformed: &[f32],
    weights: &WinogradWeights,
    products: &mut [f32],
) {
    const { assert!(BLOCK_TILES.is_multiple_of(R)) };
    let (c_in, c_out) = (weights.c_in, weights.c_out);
    for xi in 0..weights.variant.points() {
        let u = weights.point(xi);
        let v = &transformed[xi * point_stride(c_in)..][..BLOCK_TILES * c_in];
        let p = &mut products[xi * point_stride(c_out)..][..BLOCK_TILES * c_out];
        for t in (0..BLOCK_TILES).step_by(R) {
            let mut co = 0;
            while co + L * LANES <= c_out {
                register_block::<R, L>(u, v, p, t, co, c_in, c_out);
                co += L * LANES;
            }
            while co < c_out {
                register_block::<R, 1>(u, v, p, t, co, c_in, c_out);
                co += LANES;
            }
        }
    }
}

/// Tiles `t..t + R`, output channels `co..co + L·16`: `R·L` lanes of sums held in registers
/// over the `C_in` terms, each one broadcast input value times one lane of weights.
#[inline(always)]
fn register_block<const R: usize, const L: usize>(
    u: &[f32],
    v: &[f32],
    p: &mut [f32],
    t: usize,
    co: usize,
    c_in: usize,
    c_out: usize,
) {
    let mut acc = [[ZERO; L]; R];
    for ci in 0..c_in {
        let w: [Lane; L] = std::array::from_fn(|l| {
            let at = ci * c_out + co + l * LANES;
            Lane(u[at..at + LANES].try_into().expect("one lane"))
        });
        for (r, sums) in acc.iter_mut().enumerate() {
            let x = v[(t + r) * c_in + ci];
            for (sum, lane) in sums.iter_mut().zip(&w) {
                for (s, &w) in sum.iter_mut().zip(lane.iter()) {
                    *s = x.mul_add(w, *s);
                }
            }
        }
    }
    for (r, sums) in acc.iter().enumerate() {
        for (l, sum) in sums.iter().enumerate() {
            let at = (t + r) * c_out + co + l * LANES;
            p[at..at + LANES].copy_from_slice(&sum.0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Values in [−1, 1) from a linear congruential generator started at `seed`: the same
    /// operands on every machine.
    fn random_values(mut seed: u32) -> impl FnMut() -> f32 {
        move || {
            seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (seed >> 8) as f32 / (1 << 23) as f32 - 1.0
        }
    }

    /// The default: the UNet's resnet convolutions take F(4×4, 3×3) from a 32×32 map up and
    /// F(2×2, 3×3) at 16×16, and the full VAE's take F(4×4, 3×3); TAESD's 64 channels take it
    /// channels-last where the blocked kernel runs (a CPU with AVX2 or AVX-512); the 8×8 level,
    /// the first and last convolutions (4 or 3 channels on one side) keep the GEMM.
    #[test]
    fn default_choice_takes_wide_layers_over_enough_tiles() {
        use Variant::{F2, F4};
        let blocked = blocked_fits(simd::isa(), 64, 64);
        // (batch, h_out, w_out, c_in, c_out, channels_last, chosen)
        let cases = [
            (1, 64, 64, 320, 320, false, Some(F4)),
            (1, 64, 64, 640, 320, false, Some(F4)),
            (3, 32, 32, 1280, 640, false, Some(F4)),
            (1, 32, 32, 640, 640, false, Some(F4)),
            (1, 16, 16, 1280, 1280, false, Some(F2)),
            (2, 16, 16, 1280, 1280, false, Some(F2)),
            (3, 16, 16, 1280, 1280, false, Some(F4)),
            (1, 8, 8, 1280, 1280, false, None),
            (2, 8, 8, 1280, 1280, false, None),
            (3, 8, 8, 1280, 1280, false, Some(F2)),
            (3, 4, 4, 1280, 1280, false, None),
            (1, 256, 256, 256, 256, true, Some(F4)),
            (1, 128, 128, 512, 512, true, Some(F4)),
            (1, 512, 512, 128, 128, true, Some(F4)),
            (1, 512, 512, 256, 128, true, Some(F4)),
            (1, 512, 512, 128, 3, true, None),
            (1, 512, 512, 64, 64, true, blocked.then_some(F4)),
            (1, 64, 64, 64, 64, true, blocked.then_some(F4)),
            (1, 512, 512, 64, 64, false, None),
            (1, 512, 512, 3, 64, true, None),
            (1, 512, 512, 64, 3, true, None),
            (1, 64, 64, 4, 320, false, None),
            (1, 64, 64, 320, 4, false, None),
        ];
        for (batch, h, w, c_in, c_out, channels_last, want) in cases {
            assert_eq!(
                by_default(batch, h, w, c_in, c_out, channels_last),
                want,
                "batch {batch}, {h}×{w}, {c_in}→{c_out}, channels-last {channels_last}"
            );
        }
    }

    /// The blocked kernel, with each instruction set this CPU has (and the portable body), gives
    /// the chunked kernel's values: the same arithmetic but the order of the channel sums.
    /// Shapes with several blocks to a tile row, a partial last block, partial tiles at the
    /// right and bottom edges, one-sided padding, a batch, and output channels in more than one
    /// register block.
    #[test]
    fn blocked_kernel_matches_the_chunked_one() {
        let mut isas = vec![Isa::Baseline];
        if simd::isa() == Isa::Avx512 {
            isas.extend([Isa::Avx512, Isa::Avx2]);
        } else if simd::isa() == Isa::Avx2 {
            isas.push(Isa::Avx2);
        }
        // (batch, c_in, c_out, h, w, pad_top, pad_left, h_out, w_out)
        let cases = [
            (1, 64, 64, 9, 110, 1, 1, 9, 110),
            (2, 16, 80, 7, 61, 0, 0, 6, 60),
            (1, 48, 16, 13, 5, 1, 1, 13, 5),
        ];
        let mut random = random_values(1);
        for variant in Variant::ALL {
            for (batch, c_in, c_out, h, w, pad_top, pad_left, h_out, w_out) in cases {
                let s = ChannelsLastShape {
                    batch,
                    c_in,
                    c_out,
                    h,
                    w,
                    pad_top,
                    pad_left,
                    h_out,
                    w_out,
                };
                let x: Vec<f32> = (0..batch * h * w * c_in).map(|_| random()).collect();
                let weight: Vec<f32> = (0..9 * c_in * c_out).map(|_| random()).collect();
                let weights = WinogradWeights::new(&weight, c_out, c_in, true, variant, false, 2);
                let run = |isa: Option<Isa>| {
                    let mut out = vec![0f32; batch * h_out * w_out * c_out];
                    let finish = |_: usize, row: &mut [f32]| row.iter_mut().for_each(|v| *v += 1.0);
                    match (variant, isa) {
                        (Variant::F2, None) => convolve_channels_last_with::<2>(
                            Isa::Baseline,
                            &x,
                            &s,
                            &weights,
                            &finish,
                            &mut out,
                            2,
                        ),
                        (Variant::F4, None) => convolve_channels_last_with::<4>(
                            Isa::Baseline,
                            &x,
                            &s,
                            &weights,
                            &finish,
                            &mut out,
                            2,
                        ),
                        (Variant::F2, Some(isa)) => {
                            convolve_blocked::<2>(isa, &x, &s, &weights, &finish, &mut out, 2)
                        }
                        (Variant::F4, Some(isa)) => {
                            convolve_blocked::<4>(isa, &x, &s, &weights, &finish, &mut out, 2)
                        }
                    }
                    out
                };
                let want = run(None);
                let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
                assert!(scale > 1.0, "the outputs are not trivially small");
                for &isa in &isas {
                    let got = run(Some(isa));
                    let err = got
                        .iter()
                        .zip(&want)
                        .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
                    assert!(
                        err <= 1e-5 * scale,
                        "{variant:?} {isa:?} b{batch} {c_in}->{c_out} {h}x{w}: {err} of {scale}"
                    );
                }
            }
        }
    }

    /// The AVX-512 transforms of channels-first maps give the portable ones' values bit for bit
    /// (the same operations in the same order): tile rows of 3, 8, 16 and 20 tiles (partial
    /// lanes, one lane and more), partial tiles at the right and bottom edges, a batch, both
    /// variants, and more outputs than a lane's interleaved columns.
    #[test]
    fn avx512_transforms_equal_the_portable_ones() {
        if simd::isa() != Isa::Avx512 {
            eprintln!("skipped: this CPU has no AVX-512");
            return;
        }
        let mut random = random_values(7);
        // (batch, c_in, c_out, h_out, w_out)
        let cases: [(usize, usize, usize, usize, usize); 4] = [
            (1, 5, 7, 9, 10),
            (2, 3, 4, 14, 31),
            (1, 4, 6, 7, 64),
            (2, 2, 3, 5, 78),
        ];
        let mut tiles_a_row = std::collections::BTreeSet::new();
        for variant in Variant::ALL {
            let m = variant.tile();
            for (batch, c_in, c_out, h_out, w_out) in cases {
                let (th, tw) = (h_out.div_ceil(m), w_out.div_ceil(m));
                tiles_a_row.insert(tw);
                let s = Shape {
                    batch,
                    c_in,
                    c_out,
                    h_plane: th + 1,
                    w_plane: tw + 1,
                    h_out,
                    w_out,
                };
                let planes: Vec<f32> = (0..batch * c_in * m * m * s.h_plane * s.w_plane)
                    .map(|_| random())
                    .collect();
                let weight: Vec<f32> = (0..9 * c_in * c_out).map(|_| random()).collect();
                let bias: Vec<f32> = (0..c_out).map(|_| random()).collect();
                let weights = WinogradWeights::new(&weight, c_out, c_in, false, variant, false, 2);
                let run = |isa: Isa| {
                    let mut out = vec![f32::NAN; batch * c_out * h_out * w_out];
                    match variant {
                        Variant::F2 => {
                            convolve_with::<2>(isa, &planes, &s, &weights, &bias, &mut out, 2)
                        }
                        Variant::F4 => {
                            convolve_with::<4>(isa, &planes, &s, &weights, &bias, &mut out, 2)
                        }
                    }
                    out
                };
                let (portable, avx512) = (run(Isa::Baseline), run(Isa::Avx512));
                assert!(
                    portable.iter().all(|v| v.is_finite()),
                    "every output written"
                );
                assert!(
                    portable.iter().any(|v| v.abs() > 0.5),
                    "outputs not trivially small"
                );
                let differ = portable
                    .iter()
                    .zip(&avx512)
                    .filter(|(a, b)| a.to_bits() != b.to_bits())
                    .count();
                assert_eq!(
                    differ, 0,
                    "{variant:?} b{batch} {c_in}->{c_out} {h_out}x{w_out}: outputs differ"
                );
            }
        }
        assert!(
            [3, 8, 16, 20].iter().all(|tw| tiles_a_row.contains(tw)),
            "{tiles_a_row:?}"
        );
    }

    /// The AVX-512 transforms of channels-last maps give the portable ones' values bit for bit:
    /// in the chunked kernel (its products on the `gemm` crate either way), with input
    /// channels in partial lanes and output channels in whole lanes or not (those stay
    /// portable); in the blocked kernel against its AVX2 form (the same sums in the same order
    /// on narrower registers, the transforms portable). Partial tiles at the right and bottom
    /// edges, one-sided padding, a batch, both variants.
    #[test]
    fn avx512_channels_last_transforms_equal_the_portable_ones() {
        if simd::isa() != Isa::Avx512 {
            eprintln!("skipped: this CPU has no AVX-512");
            return;
        }
        let mut random = random_values(11);
        // (blocked, batch, c_in, c_out, h, w, pad_top, pad_left, h_out, w_out)
        type Case = (
            bool,
            usize,
            usize,
            usize,
            usize,
            usize,
            usize,
            usize,
            usize,
            usize,
        );
        let cases: [Case; 6] = [
            (false, 1, 20, 32, 9, 13, 1, 1, 9, 13),
            (false, 2, 7, 16, 6, 10, 0, 0, 5, 9),
            (false, 1, 16, 24, 11, 7, 1, 1, 11, 7),
            (true, 1, 64, 64, 9, 30, 1, 1, 9, 30),
            (true, 2, 16, 48, 7, 61, 0, 0, 6, 60),
            (true, 1, 32, 16, 13, 5, 1, 1, 13, 5),
        ];
        for variant in Variant::ALL {
            for (blocked, batch, c_in, c_out, h, w, pad_top, pad_left, h_out, w_out) in cases {
                let s = ChannelsLastShape {
                    batch,
                    c_in,
                    c_out,
                    h,
                    w,
                    pad_top,
                    pad_left,
                    h_out,
                    w_out,
                };
                let x: Vec<f32> = (0..batch * h * w * c_in).map(|_| random()).collect();
                let weight: Vec<f32> = (0..9 * c_in * c_out).map(|_| random()).collect();
                let weights = WinogradWeights::new(&weight, c_out, c_in, true, variant, false, 2);
                let run = |isa: Isa| {
                    let mut out = vec![f32::NAN; batch * h_out * w_out * c_out];
                    let finish = |_: usize, _: &mut [f32]| {};
                    match (variant, blocked) {
                        (Variant::F2, false) => convolve_channels_last_with::<2>(
                            isa, &x, &s, &weights, &finish, &mut out, 2,
                        ),
                        (Variant::F4, false) => convolve_channels_last_with::<4>(
                            isa, &x, &s, &weights, &finish, &mut out, 2,
                        ),
                        (Variant::F2, true) => {
                            convolve_blocked::<2>(isa, &x, &s, &weights, &finish, &mut out, 2)
                        }
                        (Variant::F4, true) => {
                            convolve_blocked::<4>(isa, &x, &s, &weights, &finish, &mut out, 2)
                        }
                    }
                    out
                };
                let portable = run(if blocked { Isa::Avx2 } else { Isa::Baseline });
                let avx512 = run(Isa::Avx512);
                assert!(
                    portable.iter().all(|v| v.is_finite()),
                    "every output written"
                );
                assert!(
                    portable.iter().any(|v| v.abs() > 0.5),
                    "outputs not trivially small"
                );
                let differ = portable
                    .iter()
                    .zip(&avx512)
                    .filter(|(a, b)| a.to_bits() != b.to_bits())
                    .count();
                assert_eq!(
                    differ, 0,
                    "{variant:?} blocked {blocked} b{batch} {c_in}->{c_out} {h}x{w}: outputs differ"
                );
            }
        }
    }

    /// The 1-D transforms are the matrices their documentation gives (checked on unit vectors),
    /// and together they reproduce the 3-tap correlation exactly on small integers (both
    /// variants): `Aᵀ [(G g) ⊙ (Bᵀ d)]` for one row.
    #[test]
    fn transforms_compute_the_correlation() {
        for variant in Variant::ALL {
            let (m, a) = (variant.tile(), variant.window());
            let d: [f64; MAX_WINDOW] = std::array::from_fn(|i| [3., -1., 4., 1., -5., 9.][i]);
            let g = [2.0, -6.0, 5.0];
            let u = weight_1d(variant, g);
            let lanes: [Lane; MAX_WINDOW] = std::array::from_fn(|i| Lane([d[i] as f32; LANES]));
            let v = match variant {
                Variant::F2 => input_1d::<2>(&lanes),
                Variant::F4 => input_1d::<4>(&lanes),
            };
            let prod: [Lane; MAX_WINDOW] = std::array::from_fn(|i| {
                if i < a {
                    Lane([(u[i] * f64::from(v[i][0])) as f32; LANES])
                } else {
                    ZERO
                }
            });
            let y = match variant {
                Variant::F2 => output_1d::<2>(&prod),
                Variant::F4 => output_1d::<4>(&prod),
            };
            for k in 0..m {
                let want = g[0] * d[k] + g[1] * d[k + 1] + g[2] * d[k + 2];
                assert!(
                    (f64::from(y[k][0]) - want).abs() < 1e-4,
                    "{variant:?} output {k}"
                );
            }
        }
    }
}
