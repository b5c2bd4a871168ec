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

#[cfg(target_arch = "x86_64")]
mod avx512;
mod blocked;
mod channels_first;
mod channels_last;
mod transforms;
mod weights;

use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::simd;
use crate::{KernelPolicy, Winograd};

use blocked::{MIN_BLOCKED_CHANNELS, blocked_fits};
pub(super) use channels_first::{Shape, convolve};
pub(super) use channels_last::{ChannelsLastShape, convolve_channels_last};
pub(super) use weights::{WinogradWeights, multiplies_in_bf16};

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
    ON_THIS_THREAD.with(|n| n.set(n.get() + 1));
    if weights.is_bf16() {
        BF16_CONVOLUTIONS.fetch_add(1, Ordering::Relaxed);
        BF16_ON_THIS_THREAD.with(|n| n.set(n.get() + 1));
    }
}

thread_local! {
    /// Convolutions this thread called this kernel for (tests that compare policies run side
    /// by side in one binary, and the process-wide counts mix them).
    static ON_THIS_THREAD: Cell<u64> = const { Cell::new(0) };
    /// Of those, the ones that multiplied in bf16.
    static BF16_ON_THIS_THREAD: Cell<u64> = const { Cell::new(0) };
}

/// [`convolutions`] counted on the calling thread only: the convolutions this thread called
/// (whichever threads did the work), so that one test's count is not another's.
pub fn convolutions_on_this_thread() -> u64 {
    ON_THIS_THREAD.with(Cell::get)
}

/// [`bf16_convolutions`] counted on the calling thread only (see
/// [`convolutions_on_this_thread`]).
pub fn bf16_convolutions_on_this_thread() -> u64 {
    BF16_ON_THIS_THREAD.with(Cell::get)
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Values in [−1, 1) from a linear congruential generator started at `seed`: the same
    /// operands on every machine.
    pub(super) fn random_values(mut seed: u32) -> impl FnMut() -> f32 {
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
}
