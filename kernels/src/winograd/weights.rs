//! A layer's transformed weights ([`WinogradWeights`]), made once per layer and variant.

use std::sync::atomic::Ordering;

use crate::gemm_bf16::{self, PackedA};
use crate::{SharedMut, for_each_range};

use super::transforms::{MAX_WINDOW, weight_1d};
use super::{Variant, WEIGHT_BYTES};

/// A layer's weights transformed to `G g Gᵀ` for one variant, laid out as (m+2)² matrices
/// `[C_out, C_in]` (one per point), the GEMMs' left operands; `[C_in, C_out]` when made from
/// channels-last weights (the right operands of the channels-last GEMMs). Kept in f32, or
/// (channels-first only) rounded to bf16 and packed for [`crate::gemm_bf16`] when made for
/// products in bf16 (see [`multiplies_in_bf16`]).
#[derive(Debug)]
pub(crate) struct WinogradWeights {
    pub(super) transformed: Transformed,
    pub(super) variant: Variant,
    pub(super) c_out: usize,
    pub(super) c_in: usize,
}

/// The per-point matrices of [`WinogradWeights`] in the form the products read.
#[derive(Debug)]
pub(super) enum Transformed {
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
/// inside a bf16 scope ([`crate::gemm_bf16::active`]), channels-first layers (the UNet's and the
/// ControlNets'). The autoencoders' channels-last layers keep f32 products: their rounding
/// lands in the picture, and F(4×4, 3×3)'s transforms magnify it some tens of times (measured
/// with bf16 products on the full VAE at 256², one step: 2.04 levels mean and 21 max from the
/// f32 picture, against 0.46 and 5 with f32 products; docs/ARCHITECTURE.md, "bf16 on the CPU").
pub(crate) fn multiplies_in_bf16(channels_last: bool) -> bool {
    gemm_bf16::active() && !channels_last
}

impl WinogradWeights {
    /// Transforms a layer's 3×3 weights for `variant`: `[C_out, C_in, 3, 3]` (torch's layout),
    /// or `[3, 3, C_in, C_out]` when `channels_last`. Each point is computed in f64 and rounded
    /// once (to f32, and then to bf16 when `bf16`, which channels-last weights never are); pairs
    /// of channels are split over `threads`.
    pub(crate) fn new(
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
    pub(super) fn point(&self, xi: usize) -> &[f32] {
        let Transformed::F32(values) = &self.transformed else {
            unreachable!("the f32 products read f32 weights");
        };
        let plane = self.c_out * self.c_in;
        &values[xi * plane..][..plane]
    }

    pub(crate) fn variant(&self) -> Variant {
        self.variant
    }

    /// Whether the products read these weights in bf16.
    pub(crate) fn is_bf16(&self) -> bool {
        !matches!(self.transformed, Transformed::F32(_))
    }
}

impl Drop for WinogradWeights {
    fn drop(&mut self) {
        WEIGHT_BYTES.fetch_sub(self.transformed.bytes(), Ordering::Relaxed);
    }
}
