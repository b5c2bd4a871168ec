//! 2-D convolution (torch's `Conv2d`, groups 1, dilation 1) for every network, with a CPU kernel.
//!
//! candle's CPU convolution gathers its im2col matrix element by element, for the whole map at
//! once, and then multiplies; at VAE sizes that matrix is hundreds of MiB. The kernel here:
//!
//! * copies the input once into zero-padded planes (for stride s, split into its s×s phases, so
//!   that every tap of the kernel reads a plain shifted window of one plane; nearest-neighbour
//!   upsampling, when asked for, happens during that copy, so the upsampled map never exists);
//! * cuts the output positions of each image into tiles whose im2col block stays in cache; a
//!   block is built by row-long `memcpy`s from the planes, then one GEMM writes the tile
//!   straight into the output and the bias is added while it is still in cache;
//! * runs tiles on separate threads when there are enough to balance them, and otherwise (small
//!   maps, large channel counts: the UNet's inner levels) one tile after another with the GEMM
//!   itself threaded;
//! * multiplies 1×1 convolutions straight from the input.
//!
//! Inside a bf16 scope ([`super::gemm_bf16::scoped`]) the tiles multiply on bf16 operands with
//! f32 sums; bf16 weights given to the CPU kernel are kept as f32 copies (candle's CPU ops have
//! no bf16 arithmetic). Elsewhere, and with
//! `SDSTREAM_PORTABLE_KERNELS=1`, candle's own convolution runs.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, DType, Layout, Module, Shape, Tensor, WithDType};
use candle_nn::VarBuilder;

use std::sync::{Arc, OnceLock};

use super::conv_channels_last::ChannelsLastConvOp;
use super::gemm_bf16::{self, PackedA, PackedB};
use super::ops::add_fresh;
use super::winograd::{self, WinogradWeights};
use super::{
    SharedMut, contiguous_slice, cpu_kernels, for_each_range, for_each_row, thread_count,
    with_float_type, zeroed_buffer,
};

pub use super::padding::Padding;

/// A 2-D convolution with torch's weight layout: weight `[C_out, C_in, k, k]`, bias `[C_out]`.
#[derive(Debug, Clone)]
pub struct Conv2d {
    weight: Tensor,
    /// The bias, or zeros when the layer has none (the CPU kernel always adds one).
    bias: Tensor,
    has_bias: bool,
    stride: usize,
    padding: Padding,
    /// Whether maps are `[B, H, W, C]` ([`Conv2d::into_channels_last`]); with the CPU kernels
    /// the weight is then kept as `[kh, kw, C_in, C_out]`.
    channels_last: bool,
    /// The weight is kept as `[C_out, kh, kw, C_in]` for cuDNN's channels-last convolution
    /// (a channels-last layer made on a CUDA device with the `cudnn` feature).
    cudnn_filter: bool,
    /// The weight `[C_out, C_in·kh·kw]` packed for bf16 products, made on the first one
    /// (channels-first CPU kernel only; see [`super::gemm_bf16`]).
    packed_bf16: Arc<OnceLock<PackedA>>,
    /// The weight transformed for each variant of [`super::winograd`], for f32 and for bf16
    /// products (indexed by `2·Variant::index + bf16`), made on the first convolution that
    /// takes it (f32 3×3 stride-1 CPU kernels).
    winograd: Arc<[OnceLock<Arc<WinogradWeights>>; 4]>,
    /// The weight as four phase filters ([`phase_filters`]), made on the first convolution of
    /// a 2× upsampled map that takes the phase path (kernel policy `cuda_phase_conv`).
    #[cfg_attr(not(feature = "cudnn"), allow(dead_code))]
    phases: Arc<OnceLock<Tensor>>,
}

/// What a convolution applies to its output before returning it, in this order: the bias, then
/// `residual` (a map of the output's shape) added, then ReLU. The channels-last CPU kernel does
/// it while each output row is in cache; elsewhere it runs as separate ops.
#[derive(Debug, Clone, Copy, Default)]
pub struct Epilogue<'a> {
    /// Added to the output.
    pub residual: Option<&'a Tensor>,
    /// ReLU last.
    pub relu: bool,
}

impl Conv2d {
    /// Reads `weight` (and `bias` when `bias` is set) from `vb`.
    pub fn new(
        c_in: usize,
        c_out: usize,
        kernel: usize,
        stride: usize,
        padding: Padding,
        bias: bool,
        vb: VarBuilder,
    ) -> candle_core::Result<Self> {
        if stride == 0 || kernel == 0 {
            candle_core::bail!(
                "conv at {}: kernel and stride must be positive",
                vb.prefix()
            );
        }
        let weight = vb.get((c_out, c_in, kernel, kernel), "weight")?;
        let bias_tensor = if bias {
            vb.get(c_out, "bias")?
        } else {
            Tensor::zeros(c_out, vb.dtype(), vb.device())?
        };
        // The CPU GEMM has no bf16 kernel: keep f32 copies for it (which the weight table
        // keeps in place of the bf16 ones, see crate::substitutes).
        let (weight, bias_tensor) = if vb.dtype() == DType::BF16 && cpu_kernels(vb.device()) {
            let (weight, bias_tensor) = (
                weight.to_dtype(DType::F32)?,
                bias_tensor.to_dtype(DType::F32)?,
            );
            crate::substitutes::report(&format!("{}.weight", vb.prefix()), &weight);
            if bias {
                crate::substitutes::report(&format!("{}.bias", vb.prefix()), &bias_tensor);
            }
            (weight, bias_tensor)
        } else {
            (weight, bias_tensor)
        };
        Ok(Self {
            weight,
            bias: bias_tensor,
            has_bias: bias,
            stride,
            padding,
            channels_last: false,
            cudnn_filter: false,
            packed_bf16: Default::default(),
            winograd: Default::default(),
            phases: Default::default(),
        })
    }

    /// A convolution with weights the caller computed (`weight` `[C_out, C_in, k, k]`, `bias`
    /// `[C_out]`), in their dtype.
    pub fn from_tensors(
        weight: Tensor,
        bias: Option<Tensor>,
        stride: usize,
        padding: Padding,
    ) -> candle_core::Result<Self> {
        let (c_out, _, _, _) = weight.dims4()?;
        if stride == 0 {
            candle_core::bail!("conv: stride must be positive");
        }
        // As `new`: the CPU GEMM has no bf16 kernel.
        let weight = if weight.dtype() == DType::BF16 && cpu_kernels(weight.device()) {
            weight.to_dtype(DType::F32)?
        } else {
            weight
        };
        let has_bias = bias.is_some();
        let bias = match bias {
            Some(b) => b.to_dtype(weight.dtype())?,
            None => Tensor::zeros(c_out, weight.dtype(), weight.device())?,
        };
        Ok(Self {
            weight,
            bias,
            has_bias,
            stride,
            padding,
            channels_last: false,
            cudnn_filter: false,
            packed_bf16: Default::default(),
            winograd: Default::default(),
            phases: Default::default(),
        })
    }

    /// The dtype the convolution computes in (its weight's; f32 for bf16 layers on the CPU).
    pub fn dtype(&self) -> DType {
        self.weight.dtype()
    }

    /// The same convolution over channels-last maps: `forward` then takes `[B, H, W, C_in]`
    /// and returns `[B, H_out, W_out, C_out]`. With the CPU kernels it runs
    /// [`super::conv_channels_last`], which writes no im2col matrix (the faster layout for few
    /// channels at large sizes); elsewhere the maps are permuted around candle's convolution.
    ///
    /// On a CUDA device with the `cudnn` feature (and sdstream's CUDA kernels allowed) the
    /// weight is laid out once as `[C_out, kh, kw, C_in]`, and the maps go to cuDNN's NHWC
    /// convolution as they are ([`super::cudnn_conv::conv2d_channels_last`]).
    pub fn into_channels_last(self) -> candle_core::Result<Self> {
        if self.channels_last {
            return Ok(self);
        }
        let device = self.weight.device().clone();
        let cudnn_filter = cfg!(feature = "cudnn") && super::cuda_kernels(&device);
        let weight = if cpu_kernels(&device) {
            self.weight.permute((2, 3, 1, 0))?.contiguous()?
        } else if cudnn_filter {
            self.weight.permute((0, 2, 3, 1))?.contiguous()?
        } else {
            self.weight
        };
        Ok(Self {
            weight,
            channels_last: true,
            cudnn_filter,
            packed_bf16: Default::default(),
            winograd: Default::default(),
            phases: Default::default(),
            ..self
        })
    }

    /// The channels-last CPU kernel over raw f32 maps, for networks that keep their maps in
    /// buffers of their own between calls: `x` `[batch, h, w, C_in]` (upsampled ×`upsample`
    /// first), `epilogue.residual` replaced by `residual`, written into `out` (resized; its
    /// earlier values are never read, so a reused buffer costs no clearing). Returns
    /// `(h_out, w_out, C_out)`. Needs a channels-last f32 convolution on the CPU kernels.
    pub fn forward_f32_into(
        &self,
        x: &[f32],
        shape: (usize, usize, usize),
        upsample: usize,
        residual: Option<&[f32]>,
        relu: bool,
        out: &mut Vec<f32>,
    ) -> candle_core::Result<(usize, usize, usize)> {
        if !(self.channels_last && cpu_kernels(self.weight.device()))
            || self.weight.dtype() != DType::F32
        {
            candle_core::bail!(
                "conv: raw f32 maps need a channels-last f32 convolution on the CPU"
            );
        }
        if upsample == 0 {
            candle_core::bail!("conv: upsampling factor must be positive");
        }
        let op = self.channels_last_op(shape, upsample, relu)?;
        let (storage, layout) = self.weight.storage_and_layout();
        let weight = match &*storage {
            candle_core::Storage::Cpu(cpu) => contiguous_slice::<f32>(cpu, layout, "conv")?,
            _ => candle_core::bail!("conv: the weight is not on the CPU"),
        };
        op.run_f32_into(x, shape, weight, layout.shape(), residual, out)
    }

    /// The channels-last CPU kernel's op for this layer's input (`(batch, h, w)`) upsampled
    /// ×`upsample`, ending in ReLU when `relu`, multiplying in bf16 inside a bf16 scope.
    fn channels_last_op(
        &self,
        input: (usize, usize, usize),
        upsample: usize,
        relu: bool,
    ) -> candle_core::Result<ChannelsLastConvOp> {
        let bf16 = gemm_bf16::active();
        // Inside a bf16 scope too: where Winograd's kernel is chosen it runs in f32 and still
        // beats the bf16 GEMM (winograd::multiplies_in_bf16 says why its products stay f32
        // here; docs/ARCHITECTURE.md, "bf16 on the CPU").
        let winograd = if upsample != 1 {
            None
        } else {
            self.winograd_weight(input, upsample)?.cloned()
        };
        Ok(ChannelsLastConvOp {
            winograd,
            stride: self.stride,
            padding: self.padding,
            upsample,
            bias: if self.has_bias {
                Some(self.bias.to_dtype(DType::F64)?.to_vec1::<f64>()?)
            } else {
                None
            },
            relu,
            bf16,
        })
    }

    /// The output's `(height, width, channels)` for an `h`×`w` input upsampled ×`upsample`.
    pub fn output_size(&self, h: usize, w: usize, upsample: usize) -> (usize, usize, usize) {
        let dims = self.weight.dims();
        // [C_out, C_in, kh, kw], or [kh, kw, C_in, C_out] once relaid for the channels-last kernel.
        let (kh, kw, c_out) = if self.cudnn_filter {
            // [C_out, kh, kw, C_in], cuDNN's NHWC filter.
            (dims[1], dims[2], dims[0])
        } else if self.channels_last && cpu_kernels(self.weight.device()) {
            (dims[0], dims[1], dims[3])
        } else {
            (dims[2], dims[3], dims[0])
        };
        let p = self.padding;
        let out = |n: usize, before: usize, after: usize, k: usize| {
            (n * upsample + before + after).saturating_sub(k) / self.stride + 1
        };
        (
            out(h, p.top, p.bottom, kh),
            out(w, p.left, p.right, kw),
            c_out,
        )
    }

    /// Whether the convolution takes and returns channels-last maps.
    pub fn is_channels_last(&self) -> bool {
        self.channels_last
    }

    /// The weight in the checkpoint's shape `[C_out, C_in, kh, kw]`: the layer's own tensor,
    /// or a view of it where the layer keeps it laid out otherwise (so that a table of the
    /// network's weights can keep the layer's storage instead of a copy of its own).
    pub fn weight_as_checkpoint(&self) -> candle_core::Result<Tensor> {
        if self.cudnn_filter {
            self.weight.permute((0, 3, 1, 2))
        } else if self.channels_last && self.weight_is_hwio() {
            self.weight.permute((3, 2, 0, 1))
        } else {
            Ok(self.weight.clone())
        }
    }

    /// Whether the weight is kept `[kh, kw, C_in, C_out]` (for the CPU's channels-last kernel).
    fn weight_is_hwio(&self) -> bool {
        self.channels_last && !self.cudnn_filter && cpu_kernels(self.weight.device())
    }

    /// Convolves the nearest-neighbour `factor`× upsampling of `xs` (torch's
    /// `F.interpolate(xs, scale_factor=factor, mode="nearest")` followed by this convolution),
    /// without materialising the upsampled map on the CPU.
    pub fn forward_upsampled(&self, xs: &Tensor, factor: usize) -> candle_core::Result<Tensor> {
        self.forward_with(xs, factor, Epilogue::default())
    }

    /// [`Conv2d::forward_upsampled`] followed by `epilogue`.
    pub fn forward_with(
        &self,
        xs: &Tensor,
        factor: usize,
        epilogue: Epilogue,
    ) -> candle_core::Result<Tensor> {
        if factor == 0 {
            candle_core::bail!("conv: upsampling factor must be positive");
        }
        if self.channels_last && cpu_kernels(xs.device()) {
            let dtype = xs.dtype();
            let xs = xs.to_dtype(self.weight.dtype())?.contiguous()?;
            let (b, h, w, _) = xs.dims4()?;
            let op = self.channels_last_op((b, h, w), factor, epilogue.relu)?;
            let ys = match epilogue.residual {
                Some(residual) => {
                    let residual = residual.to_dtype(self.weight.dtype())?.contiguous()?;
                    xs.apply_op3_no_bwd(&self.weight, &residual, &op)?
                }
                None => xs.apply_op2_no_bwd(&self.weight, &op)?,
            };
            return ys.to_dtype(dtype);
        }
        #[cfg(feature = "cudnn")]
        let ys = if self.cudnn_filter && super::cuda_kernels(xs.device()) {
            if self.phases_apply(xs, factor, &epilogue) {
                return self.cudnn_phases(xs);
            }
            if super::KernelPolicy::current().cuda_fused_conv
                && let Some(ys) = self.cudnn_channels_last_fused(xs, factor, epilogue)?
            {
                return Ok(ys);
            }
            Some(self.cudnn_channels_last(xs, factor)?)
        } else {
            None
        };
        #[cfg(not(feature = "cudnn"))]
        let ys: Option<Tensor> = None;
        let ys = if let Some(ys) = ys {
            ys
        } else if self.channels_last {
            let xs = xs.permute((0, 3, 1, 2))?;
            self.forward_channels_first(&xs, factor)?
                .permute((0, 2, 3, 1))?
                .contiguous()?
        } else {
            self.forward_channels_first(xs, factor)?
        };
        let ys = match epilogue.residual {
            Some(residual) => add_fresh(ys, residual, 1)?,
            None => ys,
        };
        if epilogue.relu { ys.relu() } else { Ok(ys) }
    }

    fn forward_channels_first(&self, xs: &Tensor, factor: usize) -> candle_core::Result<Tensor> {
        if cpu_kernels(xs.device()) {
            let dtype = xs.dtype();
            let xs = xs.to_dtype(self.weight.dtype())?.contiguous()?;
            // Where Winograd's kernel is chosen it runs, inside a bf16 scope too (its products
            // then in bf16): it beats the bf16 GEMM (docs/ARCHITECTURE.md, "bf16 on the CPU").
            let (b, _, h, w) = xs.dims4()?;
            let winograd = self.winograd_weight((b, h, w), factor)?.map(|w| &**w);
            let packed_bf16 =
                if winograd.is_none() && gemm_bf16::active() && self.weight.dtype() == DType::F32 {
                    Some(self.packed_weight()?)
                } else {
                    None
                };
            let op = ConvOp {
                stride: self.stride,
                padding: self.padding,
                upsample: factor,
                packed_bf16,
                winograd,
            };
            return xs
                .apply_op3_no_bwd(&self.weight, &self.bias, &op)?
                .to_dtype(dtype);
        }
        let xs = if factor == 1 {
            xs.clone()
        } else {
            let (_, _, h, w) = xs.dims4()?;
            xs.upsample_nearest2d(h * factor, w * factor)?
        };
        self.portable(&xs)
    }

    /// The weight packed for the bf16 GEMM (made on the first call).
    fn packed_weight(&self) -> candle_core::Result<&PackedA> {
        if let Some(packed) = self.packed_bf16.get() {
            return Ok(packed);
        }
        let (c_out, c_in, kh, kw) = self.weight.dims4()?;
        let k = c_in * kh * kw;
        let threads = super::threads();
        let packed = gemm_bf16::with_f32_values(&self.weight, |values| {
            let mut packed = PackedA::default();
            packed.repack(values, c_out, k, k, threads);
            packed
        })?;
        Ok(self.packed_bf16.get_or_init(|| packed))
    }

    /// The Winograd transform of the weight for the variant an input of `(batch, h, w)`
    /// upsampled by `factor` runs with on [`super::winograd`], if any: f32, 3×3, stride 1, wide
    /// enough over enough output tiles (see [`winograd::chosen`]). Made on the first call that
    /// takes that variant.
    fn winograd_weight(
        &self,
        (batch, h, w): (usize, usize, usize),
        factor: usize,
    ) -> candle_core::Result<Option<&Arc<WinogradWeights>>> {
        let dims = self.weight.dims4()?;
        // [C_out, C_in, kh, kw], or [kh, kw, C_in, C_out] once relaid for the channels-last kernel.
        let (c_out, c_in, kh, kw) = if self.channels_last {
            (dims.3, dims.2, dims.0, dims.1)
        } else {
            dims
        };
        if self.weight.dtype() != DType::F32 || self.stride != 1 || (kh, kw) != (3, 3) {
            return Ok(None);
        }
        let (h_out, w_out, _) = self.output_size(h, w, factor);
        let Some(variant) = winograd::chosen(batch, h_out, w_out, c_in, c_out, self.channels_last)
        else {
            return Ok(None);
        };
        let bf16 = winograd::multiplies_in_bf16(self.channels_last);
        let slot = &self.winograd[2 * variant.index() + usize::from(bf16)];
        if let Some(transformed) = slot.get() {
            return Ok(Some(transformed));
        }
        let (storage, layout) = self.weight.storage_and_layout();
        let transformed = match &*storage {
            candle_core::Storage::Cpu(cpu) => WinogradWeights::new(
                contiguous_slice::<f32>(cpu, layout, "conv")?,
                c_out,
                c_in,
                self.channels_last,
                variant,
                bf16,
                super::threads(),
            ),
            _ => candle_core::bail!("conv: the Winograd kernel runs on the CPU"),
        };
        Ok(Some(slot.get_or_init(|| Arc::new(transformed))))
    }

    /// A channels-last map made ready for cuDNN's symmetric padding: the nearest upsampling
    /// (when asked for) as one broadcast copy, uneven padding as zeros around the map; with the
    /// padding cuDNN is to add.
    #[cfg(feature = "cudnn")]
    fn cudnn_input(&self, xs: &Tensor, factor: usize) -> candle_core::Result<(Tensor, usize)> {
        let xs = if factor == 1 {
            xs.clone()
        } else {
            upsample_nearest_channels_last(xs, factor)?
        };
        let p = self.padding;
        if p.is_uniform() {
            return Ok((xs, p.top));
        }
        let padded = xs
            .pad_with_zeros(1, p.top, p.bottom)?
            .pad_with_zeros(2, p.left, p.right)?;
        Ok((padded, 0))
    }

    /// Channels-last maps through cuDNN's NHWC convolution with the weight laid out for it
    /// ([`Self::cudnn_input`]), the bias added in place over the channels.
    #[cfg(feature = "cudnn")]
    fn cudnn_channels_last(&self, xs: &Tensor, factor: usize) -> candle_core::Result<Tensor> {
        let (xs, pad) = self.cudnn_input(xs, factor)?;
        let ys = super::cudnn_conv::conv2d_channels_last(&xs, &self.weight, pad, self.stride)?;
        if self.has_bias {
            add_fresh(ys, &self.bias, 1)
        } else {
            Ok(ys)
        }
    }

    /// [`Self::cudnn_channels_last`] with the bias and `epilogue` in cuDNN's call
    /// ([`super::cudnn_conv::conv2d_channels_last_fused`], kernel policy `cuda_fused_conv`);
    /// `None` where cuDNN refuses the configuration, which is then remembered for this thread and
    /// geometry (one warning) and runs as separate ops.
    #[cfg(feature = "cudnn")]
    fn cudnn_channels_last_fused(
        &self,
        xs: &Tensor,
        factor: usize,
        epilogue: Epilogue,
    ) -> candle_core::Result<Option<Tensor>> {
        use std::cell::RefCell;
        use std::collections::HashSet;
        /// Input dims, weight dims, stride, padding, dtype, residual, ReLU.
        type Refused = (Vec<usize>, Vec<usize>, usize, usize, DType, bool, bool);
        thread_local! {
            /// The geometries cuDNN refused.
            static REFUSED: RefCell<HashSet<Refused>> = RefCell::new(HashSet::new());
        }
        let (xs, pad) = self.cudnn_input(xs, factor)?;
        let key = (
            xs.dims().to_vec(),
            self.weight.dims().to_vec(),
            self.stride,
            pad,
            xs.dtype(),
            epilogue.residual.is_some(),
            epilogue.relu,
        );
        let run = || {
            let residual = match epilogue.residual {
                Some(r) => Some(r.to_dtype(xs.dtype())?),
                None => None,
            };
            super::cudnn_conv::conv2d_channels_last_fused(
                &xs,
                &self.weight,
                &self.bias,
                residual.as_ref(),
                epilogue.relu,
                pad,
                self.stride,
            )
        };
        super::fused::unless_refused(&REFUSED, key, run, |key, e| {
            format!(
                "cuDNN refused a fused convolution ({:?} over {:?}, stride {}, padding {}, {:?}, \
                 residual {}, ReLU {}): {e}; this geometry runs its epilogue as separate ops",
                key.1, key.0, key.2, key.3, key.4, key.5, key.6
            )
        })
    }

    /// Whether this call takes the phase path ([`Self::cudnn_phases`]): kernel policy
    /// `cuda_phase_conv`, a 2× upsampling into a 3×3 stride-1 convolution padded by one on
    /// every side, no residual or ReLU to apply, and output channels in whole 16-byte vectors
    /// (ops.cu's `phase_interleave`).
    #[cfg(feature = "cudnn")]
    fn phases_apply(&self, xs: &Tensor, factor: usize, epilogue: &Epilogue) -> bool {
        let dims = self.weight.dims();
        let vector = 16 / xs.dtype().size_in_bytes().max(1);
        factor == 2
            && super::KernelPolicy::current().cuda_phase_conv
            && epilogue.residual.is_none()
            && !epilogue.relu
            && self.stride == 1
            && self.padding == Padding::uniform(1)
            && dims.len() == 4
            && (dims[1], dims[2]) == (3, 3)
            && dims[0].is_multiple_of(vector)
            && xs.dtype() == self.weight.dtype()
            // The interleave reads the bias 16 bytes at a time; the device's allocations start
            // on 256 bytes, so a bias starting on a vector's values does too.
            && (!self.has_bias
                || (self.bias.is_contiguous()
                    && self.bias.layout().start_offset().is_multiple_of(vector)))
    }

    /// The nearest 2× upsampling of channels-last `xs` convolved, as cuDNN's 2×2 convolution of
    /// `xs` itself with the four phase filters ([`phase_filters`], made on the first call)
    /// padded by one, whose `[B, H + 1, W + 1, 4·C_out]` output [`super::ops::phase_interleave`]
    /// puts in place with the bias.
    #[cfg(feature = "cudnn")]
    fn cudnn_phases(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let filters = match self.phases.get() {
            Some(filters) => filters,
            None => {
                let made = phase_filters(&self.weight)?;
                // Made on this thread's CUDA stream and read by every thread's that runs the
                // layer: written before it is shared (once, never inside a capture, whose
                // eager pass makes them first).
                made.device().synchronize()?;
                self.phases.get_or_init(|| made)
            }
        };
        let z = super::cudnn_conv::conv2d_channels_last(&xs.contiguous()?, filters, 1, 1)?;
        super::ops::phase_interleave(&z, self.has_bias.then_some(&self.bias))
    }

    /// The weight as `[C_out, C_in, kh, kw]` for candle's convolution (a copy where the layer
    /// keeps it laid out for cuDNN's NHWC kernels and those are off for this call).
    fn weight_oihw(&self) -> candle_core::Result<Tensor> {
        self.weight_as_checkpoint()?.contiguous()
    }

    /// candle's convolution: what other devices run (on CUDA with the `cudnn` feature, cuDNN
    /// with f32 accumulation, [`super::cudnn_conv`]).
    fn portable(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let weight = self.weight_oihw()?;
        let p = self.padding;
        let (xs, pad) = if p.is_uniform() {
            (xs.clone(), p.top)
        } else {
            let padded = xs
                .pad_with_zeros(2, p.top, p.bottom)?
                .pad_with_zeros(3, p.left, p.right)?;
            (padded, 0)
        };
        #[cfg(feature = "cudnn")]
        let ys = if super::cuda_kernels(xs.device()) {
            super::cudnn_conv::conv2d(&xs, &weight, pad, self.stride)?
        } else {
            xs.conv2d(&weight, pad, self.stride, 1, 1)?
        };
        #[cfg(not(feature = "cudnn"))]
        let ys = xs.conv2d(&weight, pad, self.stride, 1, 1)?;
        if self.has_bias {
            let (_, _, h, w) = ys.dims4()?;
            add_fresh(ys, &self.bias.reshape((1, (), 1, 1))?, h * w)
        } else {
            Ok(ys)
        }
    }
}

/// What the choices of cuDNN's convolution engines (kernel policy `cuda_conv_engines`) have
/// done in this process so far ([`conv_engine_choices`]), for tests and the bench.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EngineChoices {
    /// Convolutions that ran through a chosen engine's plan.
    pub calls: u64,
    /// Geometries (per thread) whose plan was chosen.
    pub chosen: u64,
    /// Candidate plans built and timed for them.
    pub timed: u64,
    /// Geometries (per thread) cuDNN refused: the legacy call runs them.
    pub refused: u64,
    /// Of the chosen, those a thread took from another thread's timing (one plan built, none
    /// timed).
    pub shared: u64,
    /// Time spent choosing (building the candidates' plans and timing them), in µs.
    pub choose_micros: u64,
}

impl std::fmt::Display for EngineChoices {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} convolutions through chosen engines; {} geometries chosen ({} from another \
             thread's timing) from {} timed plans in {:.1} ms; {} refused",
            self.calls,
            self.chosen,
            self.shared,
            self.timed,
            self.choose_micros as f64 / 1e3,
            self.refused
        )
    }
}

/// What the engine choices have done so far (all zero without the `cudnn` feature).
pub fn conv_engine_choices() -> EngineChoices {
    #[cfg(feature = "cudnn")]
    return super::cudnn_conv_graph::engine_choices();
    #[cfg(not(feature = "cudnn"))]
    EngineChoices::default()
}

/// How many convolutions ran with their epilogue in cuDNN's call (kernel policy
/// `cuda_fused_conv`; 0 without the `cudnn` feature), for tests.
pub fn cudnn_fused_calls() -> u64 {
    #[cfg(feature = "cudnn")]
    return super::cudnn_conv::fused_calls();
    #[cfg(not(feature = "cudnn"))]
    0
}

/// A 3×3 filter `[C_out, 3, 3, C_in]` (cuDNN's NHWC layout) applied to the nearest 2×
/// upsampling of a map, padded by one, as four 2×2 filters `[4·C_out, 2, 2, C_in]` applied to
/// the map itself padded by one: output row 2i takes the filter's row 0 from input row i − 1 and
/// rows 1 and 2 (summed) from row i; row 2i + 1 rows 0 and 1 from row i and row 2 from row i + 1;
/// columns likewise. Phase (a, b) is filter block 2a + b; its output at (i + a, j + b) of the
/// `(H + 1) × (W + 1)` result is the upsampled convolution's at (2i + a, 2j + b) (zero padding
/// maps onto zero padding at both ends). The taps are summed in f32 and rounded once to the
/// weight's dtype.
pub fn phase_filters(weight: &Tensor) -> candle_core::Result<Tensor> {
    let (c_out, kh, kw, c_in) = weight.dims4()?;
    if (kh, kw) != (3, 3) {
        candle_core::bail!("phase filters: a 3×3 filter, not {kh}×{kw} ({c_out} × {c_in})")
    }
    let dtype = weight.dtype();
    let k = weight.to_dtype(DType::F32)?;
    // Phase `a` along dimension `dim`: taps {0}, {1, 2} (a = 0) or {0, 1}, {2} (a = 1).
    let along = |t: &Tensor, dim: usize, a: usize| -> candle_core::Result<Tensor> {
        let tap = |i: usize| t.narrow(dim, i, 1);
        let (first, second) = if a == 0 {
            (tap(0)?, (tap(1)? + tap(2)?)?)
        } else {
            ((tap(0)? + tap(1)?)?, tap(2)?)
        };
        Tensor::cat(&[first, second], dim)
    };
    let mut blocks = Vec::with_capacity(4);
    for a in 0..2 {
        let rows = along(&k, 1, a)?;
        for b in 0..2 {
            blocks.push(along(&rows, 2, b)?);
        }
    }
    Tensor::cat(&blocks, 0)?.to_dtype(dtype)?.contiguous()
}

/// torch's nearest `factor`× upsampling of a channels-last map `[B, H, W, C]`: every pixel
/// repeated `factor`×`factor` times, as one broadcast copy.
pub fn upsample_nearest_channels_last(xs: &Tensor, factor: usize) -> candle_core::Result<Tensor> {
    let (b, h, w, c) = xs.dims4()?;
    xs.reshape((b, h, 1, w, 1, c))?
        .broadcast_as((b, h, factor, w, factor, c))?
        .contiguous()?
        .reshape((b, h * factor, w * factor, c))
}

impl Module for Conv2d {
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        self.forward_upsampled(xs, 1)
    }
}

/// The CPU kernel: input `[B, C_in, H, W]`, weight `[C_out, C_in, kh, kw]`, bias `[C_out]`, all
/// contiguous; the input is upsampled by `upsample` (nearest), then padded, then convolved.
#[derive(Clone, Copy)]
struct ConvOp<'a> {
    stride: usize,
    padding: Padding,
    upsample: usize,
    /// f32 maps multiplied in bf16 by this packing of the weight ([`super::gemm_bf16`]).
    packed_bf16: Option<&'a PackedA>,
    /// f32 maps convolved by [`super::winograd`] with this transform of the weight.
    winograd: Option<&'a WinogradWeights>,
}

/// Geometry of one convolution.
#[derive(Debug, Clone, Copy)]
struct Geometry {
    batch: usize,
    c_in: usize,
    c_out: usize,
    /// Input size before upsampling.
    h: usize,
    w: usize,
    kh: usize,
    kw: usize,
    /// Output size.
    h_out: usize,
    w_out: usize,
    /// Phase-plane size: ⌈padded size / stride⌉.
    h_plane: usize,
    w_plane: usize,
}

impl Geometry {
    fn plane_len(&self) -> usize {
        self.h_plane * self.w_plane
    }

    /// Output positions per image: the columns of the GEMM.
    fn columns(&self) -> usize {
        self.h_out * self.w_out
    }

    /// Rows of the im2col matrix: the depth of the GEMM.
    fn depth(&self) -> usize {
        self.c_in * self.kh * self.kw
    }
}

/// Target size of one tile's im2col block (it stays in the per-core cache between being written
/// and being packed by the GEMM).
const TILE_BYTES: usize = 2 << 20;
/// Fewest output positions per tile: every tile repacks the whole weight matrix, so narrower
/// tiles spend more time packing than multiplying.
const MIN_TILE_COLUMNS: usize = 128;

/// How the output positions are cut into tiles and who runs them.
#[derive(Debug, Clone, Copy)]
struct TilePlan {
    /// Output positions per tile (the last tile of an image may be narrower).
    tile: usize,
    tiles_per_image: usize,
    /// Threads that take whole tiles (1: tiles in turn).
    threads: usize,
    /// Threads that split each tile's output channels between them (1: one GEMM a tile).
    gemm_threads: usize,
}

impl TilePlan {
    fn new(g: &Geometry, elem_size: usize) -> Self {
        let n = g.columns();
        let available = super::threads().max(1);
        let by_cache = (TILE_BYTES / (g.depth() * elem_size).max(1)).max(MIN_TILE_COLUMNS);
        let mut tiles_per_image = n.div_ceil(by_cache);
        if g.batch * tiles_per_image < available {
            // Too few tiles for the threads: cut narrower ones, if they stay wide enough.
            let wanted = available.div_ceil(g.batch).min(n / MIN_TILE_COLUMNS);
            tiles_per_image = tiles_per_image.max(wanted);
        }
        let tile = n.div_ceil(tiles_per_image.max(1));
        let tiles_per_image = n.div_ceil(tile);
        let tiles = g.batch * tiles_per_image;
        // Tiles on threads only when they share out evenly (or are many); otherwise the GEMM
        // spreads each tile over the threads itself.
        let threads = thread_count(tiles, g.batch * n * g.depth());
        let balanced = tiles.is_multiple_of(threads) || tiles >= 4 * threads;
        if threads > 1 && balanced {
            Self {
                tile,
                tiles_per_image,
                threads,
                gemm_threads: 1,
            }
        } else {
            Self {
                tile,
                tiles_per_image,
                threads: 1,
                gemm_threads: available,
            }
        }
    }
}

impl ConvOp<'_> {
    fn geometry(&self, x: &Shape, w: &Shape) -> candle_core::Result<Geometry> {
        let (batch, c_in, h, wd) = x.dims4()?;
        let (c_out, c_in_w, kh, kw) = w.dims4()?;
        if c_in != c_in_w {
            candle_core::bail!("conv: input has {c_in} channels, the weight expects {c_in_w}");
        }
        let p = self.padding;
        let (s, f) = (self.stride, self.upsample);
        let hp = h * f + p.top + p.bottom;
        let wp = wd * f + p.left + p.right;
        if hp < kh || wp < kw {
            candle_core::bail!(
                "conv: input {h}×{wd} (upsampled ×{f}, padded to {hp}×{wp}) is smaller than the \
                 {kh}×{kw} kernel"
            );
        }
        Ok(Geometry {
            batch,
            c_in,
            c_out,
            h,
            w: wd,
            kh,
            kw,
            h_out: (hp - kh) / s + 1,
            w_out: (wp - kw) / s + 1,
            h_plane: hp.div_ceil(s),
            w_plane: wp.div_ceil(s),
        })
    }

    /// Whether the input itself is the im2col matrix (1×1 kernel, no stride, padding or
    /// upsampling).
    fn is_pointwise(&self, g: &Geometry) -> bool {
        g.kh == 1
            && g.kw == 1
            && self.stride == 1
            && self.upsample == 1
            && self.padding == Padding::default()
    }

    fn run<T: WithDType>(&self, x: &[T], weight: &[T], bias: &[T], g: &Geometry) -> Vec<T> {
        let n = g.columns();
        let k = g.depth();
        let mut out = zeroed_buffer::<T>(g.batch * g.c_out * n);
        if out.is_empty() {
            return out;
        }
        if let Some(weights) = self.winograd
            && std::any::TypeId::of::<T>() == std::any::TypeId::of::<f32>()
        {
            self.run_winograd(x, weights, bias, g, &mut out);
            return out;
        }
        let planes = (!self.is_pointwise(g)).then(|| self.pack(x, g));
        let plan = TilePlan::new(g, std::mem::size_of::<T>());
        let out_ptr = SharedMut(out.as_mut_ptr());
        // The bf16 GEMM reads f32 maps (`cpu_fwd` passes a packing only with f32 operands).
        let packed_bf16 = self
            .packed_bf16
            .filter(|_| std::any::TypeId::of::<T>() == std::any::TypeId::of::<f32>());
        let work = |tiles: std::ops::Range<usize>| {
            let mut col = vec![T::zero(); if planes.is_some() { k * plan.tile } else { 0 }];
            let mut packed_rhs = PackedB::default();
            for t in tiles {
                let (image, index) = (t / plan.tiles_per_image, t % plan.tiles_per_image);
                let n0 = index * plan.tile;
                let nt = plan.tile.min(n - n0);
                // The GEMM's right operand: [k, nt] with row stride `rhs_stride`.
                let (rhs, rhs_stride) = match &planes {
                    Some(planes) => {
                        self.im2col(planes, g, image, n0, &mut col[..k * nt]);
                        (&col[..k * nt], nt)
                    }
                    None => (&x[image * k * n + n0..], n),
                };
                let dst_at = image * g.c_out * n + n0;
                if let Some(packed_weight) = packed_bf16 {
                    // SAFETY: T is f32 (checked where `packed_bf16` is made), so the slice
                    // holds f32 values.
                    let rhs = unsafe {
                        std::slice::from_raw_parts(rhs.as_ptr().cast::<f32>(), rhs.len())
                    };
                    packed_rhs.repack_rows(rhs, k, nt, rhs_stride, plan.gemm_threads);
                    // SAFETY: as for the f32 GEMM below: out[image, 0..c_out, n0..n0 + nt]
                    // (row stride n) is this tile's alone; T is f32.
                    unsafe {
                        gemm_bf16::gemm_into(
                            packed_weight,
                            &packed_rhs,
                            out_ptr.ptr().add(dst_at).cast::<f32>(),
                            n,
                            plan.gemm_threads,
                        );
                    }
                } else {
                    // Output channels `rows` of the tile: one GEMM on this thread.
                    let gemm_rows = |rows: std::ops::Range<usize>| {
                        // SAFETY: the GEMM writes out[image, rows, n0..n0 + nt] (row stride
                        // n): inside `out`, and written by this call only, since tiles
                        // partition the positions of each image and the threads of one tile
                        // its output channels. `weight` holds [c_out, k] (row stride k), of
                        // which rows `rows` are read, and `rhs` [k, nt] with row stride
                        // `rhs_stride`, as the slices above guarantee.
                        unsafe {
                            gemm::gemm(
                                rows.len(),
                                nt,
                                k,
                                out_ptr.ptr().add(dst_at + rows.start * n),
                                1,
                                n as isize,
                                false,
                                weight.as_ptr().add(rows.start * k),
                                1,
                                k as isize,
                                rhs.as_ptr(),
                                1,
                                rhs_stride as isize,
                                T::zero(),
                                T::one(),
                                false,
                                false,
                                false,
                                gemm::Parallelism::None,
                            );
                        }
                    };
                    // Too few tiles to share out: the threads split the output channels (the
                    // gemm crate's own threading gained nothing at the UNet's 8² level: 1,280
                    // channels, 17.8 ms on one thread, 19.1 on two; see TilePlan).
                    for_each_range(g.c_out, plan.gemm_threads.min(g.c_out), &gemm_rows);
                }
                for (co, &b) in bias.iter().enumerate() {
                    // SAFETY: the same elements the GEMM above just wrote for this tile.
                    let row = unsafe {
                        std::slice::from_raw_parts_mut(out_ptr.ptr().add(dst_at + co * n), nt)
                    };
                    for v in row {
                        *v += b;
                    }
                }
            }
        };
        for_each_range(g.batch * plan.tiles_per_image, plan.threads, &work);
        out
    }

    /// The convolution by [`super::winograd`] (`T` is f32, the kernel 3×3 with stride 1): the
    /// padded input is split into its m×m stride-m phases (m the variant's output tile), which
    /// the kernel reads, with zeros past the padded input up to the last tile's window.
    fn run_winograd<T: WithDType>(
        &self,
        x: &[T],
        weights: &WinogradWeights,
        bias: &[T],
        g: &Geometry,
        out: &mut [T],
    ) {
        let m = weights.variant().tile();
        let phases = ConvOp {
            stride: m,
            winograd: None,
            ..*self
        };
        // Tile t's window starts at phase-plane row (column) t and spans two of them.
        let phase_geometry = Geometry {
            h_plane: g.h_plane.div_ceil(m).max(g.h_out.div_ceil(m) + 1),
            w_plane: g.w_plane.div_ceil(m).max(g.w_out.div_ceil(m) + 1),
            ..*g
        };
        let planes = phases.pack(x, &phase_geometry);
        let shape = winograd::Shape {
            batch: g.batch,
            c_in: g.c_in,
            c_out: g.c_out,
            h_plane: phase_geometry.h_plane,
            w_plane: phase_geometry.w_plane,
            h_out: g.h_out,
            w_out: g.w_out,
        };
        // SAFETY: the caller checked that T is f32, so these slices hold f32 values.
        let (planes, bias, out) = unsafe {
            (
                std::slice::from_raw_parts(planes.as_ptr().cast::<f32>(), planes.len()),
                std::slice::from_raw_parts(bias.as_ptr().cast::<f32>(), bias.len()),
                std::slice::from_raw_parts_mut(out.as_mut_ptr().cast::<f32>(), out.len()),
            )
        };
        let threads = super::threads().max(1);
        winograd::convolve(planes, &shape, weights, bias, out, threads);
    }

    /// Copies the (upsampled) input into zero-padded phase planes, laid out
    /// `[batch][C_in][phase = (row % s)·s + col % s][h_plane][w_plane]`.
    fn pack<T: WithDType>(&self, x: &[T], g: &Geometry) -> Vec<T> {
        let (s, f, p) = (self.stride, self.upsample, self.padding);
        let plane_len = g.plane_len();
        let mut planes = zeroed_buffer::<T>(g.batch * g.c_in * s * s * plane_len);
        // One row of `planes` per (batch, channel) pair.
        for_each_row(&mut planes, s * s * plane_len, |pair, dst| {
            let src = &x[pair * g.h * g.w..(pair + 1) * g.h * g.w];
            for vr in 0..g.h * f {
                let r = vr + p.top;
                let (a, i) = (r % s, r / s);
                let src_row = &src[(vr / f) * g.w..(vr / f + 1) * g.w];
                // Padded column c = j·s + b lands in phase b at column j; the input covers
                // padded columns left..left + w·f.
                for b in 0..s {
                    let dst_row = &mut dst[(a * s + b) * plane_len + i * g.w_plane..][..g.w_plane];
                    let j_first = p.left.saturating_sub(b).div_ceil(s);
                    let j_end = (p.left + g.w * f).saturating_sub(b).div_ceil(s);
                    if j_first >= j_end {
                        // No input column lands in this phase (a map narrower than the stride).
                        continue;
                    }
                    let first = j_first * s + b - p.left;
                    let dst_run = &mut dst_row[j_first..j_end];
                    match (s, f) {
                        (1, 1) => dst_run.copy_from_slice(src_row),
                        (1, _) => {
                            for (d, &v) in dst_run.chunks_exact_mut(f).zip(src_row) {
                                d.fill(v);
                            }
                        }
                        (_, 1) => {
                            for (d, &v) in
                                dst_run.iter_mut().zip(src_row[first..].iter().step_by(s))
                            {
                                *d = v;
                            }
                        }
                        _ => {
                            for (jj, d) in dst_run.iter_mut().enumerate() {
                                *d = src_row[(first + jj * s) / f];
                            }
                        }
                    }
                }
            }
        });
        planes
    }

    /// The im2col block of output positions `n0..n0 + col.len() / depth` of `image`:
    /// `[C_in·kh·kw, nt]`, one row per (channel, tap) in torch's weight order. For each output
    /// row the tile touches, tap (u, v) reads a contiguous run of one phase plane.
    fn im2col<T: WithDType>(
        &self,
        planes: &[T],
        g: &Geometry,
        image: usize,
        n0: usize,
        col: &mut [T],
    ) {
        let s = self.stride;
        let plane_len = g.plane_len();
        let pair_len = s * s * plane_len;
        let nt = col.len() / g.depth();
        let (y_first, y_last) = (n0 / g.w_out, (n0 + nt - 1) / g.w_out);
        let mut rows = col.chunks_exact_mut(nt);
        for ci in 0..g.c_in {
            let pair = &planes[(image * g.c_in + ci) * pair_len..][..pair_len];
            for u in 0..g.kh {
                for v in 0..g.kw {
                    let Some(dst) = rows.next() else { return };
                    let plane = &pair[((u % s) * s + v % s) * plane_len..][..plane_len];
                    let mut pos = 0;
                    for y in y_first..=y_last {
                        let x0 = if y == y_first { n0 - y * g.w_out } else { 0 };
                        let x1 = if y == y_last {
                            n0 + nt - y * g.w_out
                        } else {
                            g.w_out
                        };
                        let src = (y + u / s) * g.w_plane + x0 + v / s;
                        dst[pos..pos + x1 - x0].copy_from_slice(&plane[src..src + x1 - x0]);
                        pos += x1 - x0;
                    }
                }
            }
        }
    }
}

impl CustomOp3 for ConvOp<'_> {
    fn name(&self) -> &'static str {
        "sdstream-conv2d"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let g = self.geometry(l1.shape(), l2.shape())?;
        if l3.shape().elem_count() != g.c_out {
            candle_core::bail!(
                "conv: bias has {} values for {} channels",
                l3.shape().elem_count(),
                g.c_out
            );
        }
        let name = self.name();
        let out = with_float_type!(
            s1.dtype(),
            name,
            [F32 => f32, F16 => half::f16, F64 => f64],
            |T| T::to_cpu_storage_owned(self.run::<T>(
                contiguous_slice(s1, l1, name)?,
                contiguous_slice(s2, l2, name)?,
                contiguous_slice(s3, l3, name)?,
                &g,
            ))
        );
        Ok((out, Shape::from((g.batch, g.c_out, g.h_out, g.w_out))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// The four phase filters over the map itself, put in place by the phase interleave,
    /// compute the nearest 2× upsampling convolved by the 3×3 filter (candle's own CPU
    /// convolutions on both sides), with and without a bias, down to one-pixel maps.
    #[test]
    fn phase_filters_convolve_as_the_upsampled_map() -> candle_core::Result<()> {
        let dev = candle_core::Device::Cpu;
        for (c_in, c_out, h, w, with_bias) in [
            (3, 8, 5, 4, true),
            (16, 4, 1, 1, false),
            (8, 8, 6, 7, true),
            (5, 12, 2, 9, false),
        ] {
            let x = Tensor::randn(0f32, 1.0, (2, c_in, h, w), &dev)?;
            let k = Tensor::randn(0f32, 0.3, (c_out, c_in, 3, 3), &dev)?;
            let bias = Tensor::randn(0f32, 0.3, c_out, &dev)?;
            let want = x
                .upsample_nearest2d(2 * h, 2 * w)?
                .conv2d(&k, 1, 1, 1, 1)?
                .broadcast_add(&(bias.reshape((1, c_out, 1, 1))? * f64::from(with_bias))?)?
                .permute((0, 2, 3, 1))?;
            let filters = phase_filters(&k.permute((0, 2, 3, 1))?.contiguous()?)?;
            assert_eq!(filters.dims(), &[4 * c_out, 2, 2, c_in]);
            let z = x
                .conv2d(&filters.permute((0, 3, 1, 2))?.contiguous()?, 1, 1, 1, 1)?
                .permute((0, 2, 3, 1))?;
            assert_eq!(z.dims(), &[2, h + 1, w + 1, 4 * c_out]);
            let got = super::super::ops::phase_interleave(&z, with_bias.then_some(&bias))?;
            assert_eq!(got.dims(), want.dims());
            let worst = (got - &want)?.abs()?.max_all()?.to_scalar::<f32>()?;
            let scale = want.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(
                worst <= 1e-5 * scale,
                "{c_in}→{c_out} at {h}×{w}, bias {with_bias}: {worst} (scale {scale})"
            );
        }
        // A 1×1 filter has no phases.
        let one = Tensor::zeros((4, 1, 1, 4), DType::F32, &dev)?;
        assert!(phase_filters(&one).is_err());
        Ok(())
    }

    /// The kernel agrees with candle's convolution across strides, paddings, kernel sizes,
    /// upsampling, odd sizes, and shapes that take either tiling (threads over tiles, or a
    /// threaded GEMM).
    #[test]
    fn matches_candle_convolution() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        let cases = [
            // (batch, c_in, c_out, k, h, w, stride, padding, upsample)
            (2, 3, 5, 3, 7, 9, 1, Padding::uniform(1), 1),
            (2, 4, 6, 3, 8, 6, 2, Padding::bottom_right(1), 1),
            (2, 4, 6, 3, 9, 7, 2, Padding::uniform(1), 1),
            (2, 5, 3, 1, 6, 5, 1, Padding::default(), 1),
            (2, 2, 4, 3, 5, 6, 1, Padding::uniform(1), 2),
            (2, 3, 2, 5, 11, 10, 1, Padding::uniform(2), 1),
            (2, 6, 7, 3, 40, 33, 1, Padding::uniform(1), 1),
            (2, 8, 6, 3, 64, 50, 2, Padding::bottom_right(1), 1),
            (2, 8, 8, 3, 48, 64, 1, Padding::uniform(1), 2),
            (2, 16, 8, 1, 64, 64, 1, Padding::default(), 1),
            (1, 64, 32, 3, 4, 4, 1, Padding::uniform(1), 1),
            (3, 96, 64, 3, 16, 12, 1, Padding::uniform(1), 1),
            (1, 16, 8, 3, 8, 8, 1, Padding::uniform(1), 3),
        ];
        for (b, c_in, c_out, k, h, w, stride, padding, up) in cases {
            let x = Tensor::randn(0f32, 1.0, (b, c_in, h, w), &dev)?;
            let layer = Conv2d::from_tensors(
                Tensor::randn(0f32, 0.3, (c_out, c_in, k, k), &dev)?,
                Some(Tensor::randn(0f32, 0.3, c_out, &dev)?),
                stride,
                padding,
            )?;
            let got = layer.forward_upsampled(&x, up)?;
            let xu = if up == 1 {
                x.clone()
            } else {
                x.upsample_nearest2d(h * up, w * up)?
            };
            let want = layer.portable(&xu)?;
            assert_eq!(got.dims(), want.dims());
            let err = max_abs_diff(&got, &want)?;
            assert!(
                err < 1e-4,
                "case b{b} {c_in}->{c_out} k{k} {h}x{w} s{stride} {padding:?} up{up}: {err}"
            );

            // In bf16 (gemm_bf16): what candle's f32 convolution gives for the operands rounded
            // to bf16, up to f32 summation order.
            let got = gemm_bf16::scoped(true, || layer.forward_upsampled(&x, up))?;
            let round = |t: &Tensor| t.to_dtype(DType::BF16)?.to_dtype(DType::F32);
            let rounded = Conv2d::from_tensors(
                round(&layer.weight)?,
                Some(layer.bias.clone()),
                stride,
                padding,
            )?;
            let want = rounded.portable(&round(&xu)?)?;
            let err = max_abs_diff(&got, &want)?;
            assert!(
                err < 1e-4,
                "bf16 case b{b} {c_in}->{c_out} k{k} {h}x{w} s{stride} {padding:?} up{up}: {err}"
            );
            // ... and not what f32 operands give (the rounding really happened).
            assert!(max_abs_diff(&got, &layer.portable(&xu)?)? > 1e-4);
        }
        Ok(())
    }

    /// How far each Winograd variant may land from the f64 formula, as a multiple of the
    /// f32 rounding of the sums (`2e-6·√(9·C_in)` for weights of 0.3 and inputs of 1) and of
    /// the im2col GEMM's own error on the same case. Measured over five runs of the cases
    /// below: F(2×2, 3×3) 0.44–0.57× the rounding and 1.2–1.4× the GEMM's error; F(4×4, 3×3),
    /// whose transforms scale by up to 8, 8.4–13.8× and 21–34×.
    fn winograd_bounds(variant: winograd::Variant) -> (f32, f32) {
        match variant {
            winograd::Variant::F2 => (1.0, 3.0),
            winograd::Variant::F4 => (WINOGRAD_F4_TIMES_ROUNDING, WINOGRAD_F4_TIMES_GEMM),
        }
    }
    const WINOGRAD_F4_TIMES_ROUNDING: f32 = 25.0;
    const WINOGRAD_F4_TIMES_GEMM: f32 = 80.0;

    /// Both Winograd variants against the convolution computed in f64, beside the im2col
    /// GEMM's own error: every remainder of the map's size by either tile (partial tiles), maps
    /// smaller than a tile, rows of tiles longer than a vector of lanes, upsampling, one-sided
    /// padding, batches, channel counts on either side of the GEMM's blocks, chunks of tile
    /// rows.
    #[test]
    fn winograd_matches_the_formula_in_f64() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        let cases = [
            // (batch, c_in, c_out, h, w, padding, upsample)
            (1, 1, 1, 1, 1, Padding::uniform(1), 1),
            (1, 2, 3, 2, 3, Padding::uniform(1), 1),
            (2, 3, 5, 7, 9, Padding::uniform(1), 1),
            (1, 4, 3, 6, 6, Padding::bottom_right(1), 1),
            (2, 2, 4, 5, 6, Padding::uniform(1), 2),
            (2, 6, 7, 40, 33, Padding::uniform(1), 1),
            (1, 5, 6, 11, 70, Padding::uniform(1), 1),
            (3, 96, 64, 16, 12, Padding::uniform(1), 1),
            (1, 320, 40, 64, 64, Padding::uniform(1), 1),
            (1, 24, 17, 9, 16, Padding::uniform(1), 2),
        ];
        for variant in winograd::Variant::ALL {
            let (times_rounding, times_gemm) = winograd_bounds(variant);
            let mut worst = (0f32, 0f32);
            for (b, c_in, c_out, h, w, padding, up) in cases {
                let x = Tensor::randn(0f32, 1.0, (b, c_in, h, w), &dev)?;
                let weight = Tensor::randn(0f32, 0.3, (c_out, c_in, 3, 3), &dev)?;
                let bias = Tensor::randn(0f32, 0.3, c_out, &dev)?;
                let layer = Conv2d::from_tensors(weight.clone(), Some(bias.clone()), 1, padding)?;
                let exact = Conv2d::from_tensors(
                    weight.to_dtype(DType::F64)?,
                    Some(bias.to_dtype(DType::F64)?),
                    1,
                    padding,
                )?;
                let xu = if up == 1 {
                    x.clone()
                } else {
                    x.upsample_nearest2d(h * up, w * up)?
                };
                let want = exact
                    .portable(&xu.to_dtype(DType::F64)?)?
                    .to_dtype(DType::F32)?;
                let before = winograd::convolutions_on_this_thread();
                let winograd = {
                    let _choice = winograd::choose(variant.into());
                    layer.forward_upsampled(&x, up)?
                };
                assert_eq!(
                    winograd::convolutions_on_this_thread(),
                    before + 1,
                    "{variant:?} ran"
                );
                let im2col = {
                    let _choice = winograd::choose(crate::Winograd::Off);
                    layer.forward_upsampled(&x, up)?
                };
                assert_eq!(winograd.dims(), want.dims());
                let case = format!("{variant:?} b{b} {c_in}->{c_out} {h}x{w} {padding:?} up{up}");
                let (err, gemm_err) = (
                    max_abs_diff(&winograd, &want)?,
                    max_abs_diff(&im2col, &want)?,
                );
                let rounding = 2e-6 * (9.0 * c_in as f32).sqrt();
                worst.0 = worst.0.max(err / rounding);
                worst.1 = worst.1.max(err / (gemm_err + 1e-7));
                assert!(
                    err < times_rounding * rounding,
                    "{case}: Winograd {err} (im2col GEMM {gemm_err}), rounding {rounding}"
                );
                assert!(
                    err <= times_gemm * gemm_err + 1e-6,
                    "{case}: Winograd {err}, GEMM {gemm_err}"
                );
            }
            println!(
                "{variant:?}: worst {:.2}× the rounding bound, {:.1}× the GEMM's error",
                worst.0, worst.1
            );
        }
        Ok(())
    }

    /// The policy as a value, end to end: one layer in one test binary convolves under
    /// `Winograd::Off` (the im2col GEMM) and `Winograd::F2`, each within the F(2×2, 3×3)
    /// bounds of [`winograd_matches_the_formula_in_f64`] of the f64 formula, and only F2 runs
    /// Winograd's kernel. Tests run side by side and any of them may run the kernel, so the
    /// process-wide counter ([`crate::winograd_convolutions`]) can only be said to grow under
    /// F2; this thread's own count says exactly which call ran it.
    #[test]
    fn a_scoped_kernel_policy_picks_winograd_in_one_binary() -> candle_core::Result<()> {
        use crate::{KernelPolicy, Winograd};
        let dev = Device::Cpu;
        // Wide and large enough that the work splits over the pool's threads.
        let (b, c_in, c_out, h, w) = (3, 96, 64, 16, 12);
        let x = Tensor::randn(0f32, 1.0, (b, c_in, h, w), &dev)?;
        let weight = Tensor::randn(0f32, 0.3, (c_out, c_in, 3, 3), &dev)?;
        let bias = Tensor::randn(0f32, 0.3, c_out, &dev)?;
        let padding = Padding::uniform(1);
        let layer = Conv2d::from_tensors(weight.clone(), Some(bias.clone()), 1, padding)?;
        let exact = Conv2d::from_tensors(
            weight.to_dtype(DType::F64)?,
            Some(bias.to_dtype(DType::F64)?),
            1,
            padding,
        )?;
        let want = exact
            .portable(&x.to_dtype(DType::F64)?)?
            .to_dtype(DType::F32)?;
        let (times_rounding, times_gemm) = winograd_bounds(winograd::Variant::F2);
        let rounding = 2e-6 * (9.0 * c_in as f32).sqrt();
        let run = |winograd: Winograd| -> candle_core::Result<(f32, u64, u64)> {
            // The CPU kernels whatever the environment says, so that the choice is Winograd's.
            let policy = KernelPolicy {
                portable: false,
                winograd,
                ..KernelPolicy::process()
            };
            let (here, all) = (
                winograd::convolutions_on_this_thread(),
                crate::winograd_convolutions(),
            );
            let got = policy.scoped(|| layer.forward_upsampled(&x, 1))?;
            assert_eq!(got.dims(), want.dims());
            Ok((
                max_abs_diff(&got, &want)?,
                winograd::convolutions_on_this_thread() - here,
                crate::winograd_convolutions() - all,
            ))
        };
        let (off_err, off_here, _) = run(Winograd::Off)?;
        let (f2_err, f2_here, f2_all) = run(Winograd::F2)?;
        assert_eq!(off_here, 0, "Winograd's kernel ran under Winograd::Off");
        assert_eq!(
            f2_here, 1,
            "Winograd's kernel did not run under Winograd::F2"
        );
        assert!(
            f2_all >= 1,
            "the process-wide counter missed the F2 convolution"
        );
        for (name, err) in [("off", off_err), ("f2", f2_err)] {
            assert!(
                err < times_rounding * rounding,
                "{name}: {err} from the f64 formula, rounding {rounding}"
            );
        }
        assert!(
            f2_err <= times_gemm * off_err + 1e-6,
            "F2 {f2_err}, im2col GEMM {off_err}"
        );
        // The scopes ended with their calls.
        assert_eq!(KernelPolicy::current(), KernelPolicy::process());
        Ok(())
    }

    /// The channels-last kernel of both Winograd variants against the convolution in f64,
    /// with and without its epilogue (bias, residual, ReLU): odd sizes (partial tiles),
    /// one-sided padding, batches, no bias, channels on either side of a vector of lanes, and
    /// maps large enough to be cut into several chunks of tile rows.
    #[test]
    fn channels_last_winograd_matches_the_formula_in_f64() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        let cases = [
            // (batch, c_in, c_out, h, w, padding, bias)
            (1, 1, 1, 1, 1, Padding::uniform(1), true),
            (1, 2, 3, 2, 3, Padding::uniform(1), true),
            (2, 3, 5, 7, 9, Padding::uniform(1), true),
            (1, 4, 3, 6, 6, Padding::bottom_right(1), false),
            (2, 16, 32, 13, 8, Padding::uniform(1), true),
            (1, 64, 64, 96, 80, Padding::uniform(1), true),
            (3, 24, 17, 9, 16, Padding::uniform(1), false),
            // Several blocks of tiles to a row for the blocked kernel (whole vectors of
            // channels on both sides, where the CPU has AVX2 or AVX-512).
            (1, 32, 48, 10, 230, Padding::bottom_right(1), true),
        ];
        for variant in winograd::Variant::ALL {
            let (times_rounding, times_gemm) = winograd_bounds(variant);
            for (b, c_in, c_out, h, w, padding, with_bias) in cases {
                let x = Tensor::randn(0f32, 1.0, (b, c_in, h, w), &dev)?;
                let weight = Tensor::randn(0f32, 0.3, (c_out, c_in, 3, 3), &dev)?;
                let bias = with_bias
                    .then(|| Tensor::randn(0f32, 0.3, c_out, &dev))
                    .transpose()?;
                let first = Conv2d::from_tensors(weight.clone(), bias.clone(), 1, padding)?;
                let last = first.clone().into_channels_last()?;
                let exact = Conv2d::from_tensors(
                    weight.to_dtype(DType::F64)?,
                    bias.map(|b| b.to_dtype(DType::F64)).transpose()?,
                    1,
                    padding,
                )?;
                let want = exact.portable(&x.to_dtype(DType::F64)?)?;
                let residual = Tensor::randn(0f32, 1.0, want.shape(), &dev)?;
                let want_fused = (&want + residual.to_dtype(DType::F64)?)?.relu()?;
                let to_last = |t: &Tensor| t.permute((0, 2, 3, 1))?.contiguous();
                let (x_last, residual_last) = (to_last(&x)?, to_last(&residual)?);
                let epilogue = Epilogue {
                    residual: Some(&residual_last),
                    relu: true,
                };
                let before = winograd::convolutions_on_this_thread();
                let (plain, fused) = {
                    let _choice = winograd::choose(variant.into());
                    (
                        last.forward(&x_last)?,
                        last.forward_with(&x_last, 1, epilogue)?,
                    )
                };
                assert_eq!(
                    winograd::convolutions_on_this_thread(),
                    before + 2,
                    "{variant:?} ran"
                );
                let gemm = {
                    let _choice = winograd::choose(crate::Winograd::Off);
                    last.forward(&x_last)?
                };
                let rounding = 2e-6 * (9.0 * c_in as f32).sqrt();
                let case = format!(
                    "{variant:?} b{b} {c_in}->{c_out} {h}x{w} {padding:?} bias {with_bias}"
                );
                let from_last = |t: Tensor| t.permute((0, 3, 1, 2));
                let gemm_err =
                    max_abs_diff(&from_last(gemm.clone())?, &want.to_dtype(DType::F32)?)?;
                for (got, want, what) in [
                    (plain.clone(), &want, "plain"),
                    (fused, &want_fused, "fused"),
                ] {
                    let got = from_last(got)?;
                    assert_eq!(got.dims(), want.dims(), "{what} {case}");
                    let err = max_abs_diff(&got, &want.to_dtype(DType::F32)?)?;
                    assert!(
                        err < times_rounding * rounding,
                        "{what} {case}: {err} (GEMM {gemm_err}), rounding {rounding}"
                    );
                    assert!(
                        err <= times_gemm * gemm_err + 1e-6,
                        "{what} {case}: {err}, GEMM {gemm_err}"
                    );
                }
            }
        }
        Ok(())
    }

    /// How far Winograd's kernel with bf16 products may land from the convolution in f64, as a
    /// multiple of the im2col GEMM's error in bf16 on the same case (both round their operands
    /// to bf16; Winograd rounds the transformed ones, which its transforms then combine).
    /// Measured over five runs of the cases below: F(2×2, 3×3) 1.7–2.0×, F(4×4, 3×3) 29–35×
    /// (as its f32 error against the f32 GEMM's, above).
    fn winograd_bf16_times_gemm(variant: winograd::Variant) -> f32 {
        match variant {
            winograd::Variant::F2 => 4.0,
            winograd::Variant::F4 => 60.0,
        }
    }

    /// Winograd's kernel inside a bf16 scope, both variants: channels-first, its products run
    /// on the bf16 GEMM (rounded operands, so not the f32 kernel's values), within a bound of
    /// the formula in f64 set by the bf16 im2col GEMM's own error, and the scope keeps its own
    /// transform of the weights beside the f32 one; channels-last (the autoencoders), the f32
    /// kernel's values bit for bit from the one f32 transform. Partial tiles, a batch, channels
    /// past the GEMM's 32-value blocks and its 32-row panels, a chunked map.
    #[test]
    fn winograd_in_bf16_stays_near_the_formula() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        let cases = [
            // (batch, c_in, c_out, h, w, channels_last)
            (2, 40, 36, 9, 11, false),
            (1, 96, 70, 32, 30, false),
            (1, 320, 40, 64, 64, false),
            (2, 40, 36, 9, 11, true),
            (1, 288, 272, 12, 10, true),
        ];
        for variant in winograd::Variant::ALL {
            let mut worst = 0f32;
            for (b, c_in, c_out, h, w, channels_last) in cases {
                let x = Tensor::randn(0f32, 1.0, (b, c_in, h, w), &dev)?;
                let weight = Tensor::randn(0f32, 0.3, (c_out, c_in, 3, 3), &dev)?;
                let bias = Tensor::randn(0f32, 0.3, c_out, &dev)?;
                let padding = Padding::uniform(1);
                let first = Conv2d::from_tensors(weight.clone(), Some(bias.clone()), 1, padding)?;
                let exact = Conv2d::from_tensors(
                    weight.to_dtype(DType::F64)?,
                    Some(bias.to_dtype(DType::F64)?),
                    1,
                    padding,
                )?
                .portable(&x.to_dtype(DType::F64)?)?
                .to_dtype(DType::F32)?;
                let gemm_bf16_err = {
                    let _choice = winograd::choose(crate::Winograd::Off);
                    let got = gemm_bf16::scoped(true, || first.forward(&x))?;
                    max_abs_diff(&got, &exact)?
                };
                let layer = if channels_last {
                    first.clone().into_channels_last()?
                } else {
                    first.clone()
                };
                let input = if channels_last {
                    x.permute((0, 2, 3, 1))?.contiguous()?
                } else {
                    x.clone()
                };
                let back = |t: Tensor| {
                    if channels_last {
                        t.permute((0, 3, 1, 2))
                    } else {
                        Ok(t)
                    }
                };
                let _choice = winograd::choose(variant.into());
                let before = winograd::convolutions_on_this_thread();
                let in_f32 = back(layer.forward(&input)?)?;
                let in_bf16 = back(gemm_bf16::scoped(true, || layer.forward(&input))?)?;
                assert_eq!(
                    winograd::convolutions_on_this_thread(),
                    before + 2,
                    "{variant:?} ran"
                );
                let case = format!("{variant:?} b{b} {c_in}->{c_out} {h}x{w} last {channels_last}");
                let kept = |bf16: bool| {
                    layer.winograd[2 * variant.index() + usize::from(bf16)]
                        .get()
                        .map(|w| w.is_bf16())
                };
                if channels_last {
                    assert_eq!((kept(false), kept(true)), (Some(false), None), "{case}");
                    assert_eq!(max_abs_diff(&in_bf16, &in_f32)?, 0.0, "{case}: stays f32");
                    continue;
                }
                // Each scope made its own transform of the weights.
                assert_eq!(
                    (kept(false), kept(true)),
                    (Some(false), Some(true)),
                    "{case}"
                );
                let err = max_abs_diff(&in_bf16, &exact)?;
                let f32_err = max_abs_diff(&in_f32, &exact)?;
                worst = worst.max(err / gemm_bf16_err);
                assert!(
                    err <= winograd_bf16_times_gemm(variant) * gemm_bf16_err,
                    "{case}: {err} against the bf16 GEMM's {gemm_bf16_err}"
                );
                assert!(
                    err > 10.0 * f32_err,
                    "{case}: {err}, no more than f32's {f32_err}: the products were not bf16"
                );
            }
            println!("{variant:?} in bf16: worst {worst:.2}× the bf16 GEMM's error");
        }
        Ok(())
    }

    fn max_abs_diff(a: &Tensor, b: &Tensor) -> candle_core::Result<f32> {
        (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()
    }

    /// Channels-last in bf16 (C_in a multiple of 32: the GEMMs read the rounded padded input in
    /// place): without upsampling, what candle's f32 convolution gives for the rounded
    /// operands; with upsampling through phases (whose summed weights are rounded after the
    /// sum), within bf16's rounding of the f32 result. Channel counts that do not fit stay f32.
    /// Winograd's kernel, which a bf16 scope leaves in f32 and would take 64 → 64, is kept off.
    #[test]
    fn channels_last_bf16_matches_the_rounded_convolution() -> candle_core::Result<()> {
        let _no_winograd = winograd::choose(crate::Winograd::Off);
        let dev = Device::Cpu;
        let round = |t: &Tensor| t.to_dtype(DType::BF16)?.to_dtype(DType::F32);
        let cases = [
            // (batch, c_in, c_out, h, w, stride, padding, upsample)
            (2, 32, 5, 7, 9, 1, Padding::uniform(1), 1),
            (1, 64, 64, 37, 41, 1, Padding::uniform(1), 1),
            (1, 64, 40, 16, 12, 2, Padding::bottom_right(1), 1),
            (1, 32, 36, 9, 14, 1, Padding::uniform(1), 2),
            (1, 8, 8, 9, 7, 1, Padding::uniform(1), 1),
        ];
        for (b, c_in, c_out, h, w, stride, padding, up) in cases {
            let x = Tensor::randn(0f32, 1.0, (b, c_in, h, w), &dev)?;
            let weight = Tensor::randn(0f32, 0.1, (c_out, c_in, 3, 3), &dev)?;
            let bias = Tensor::randn(0f32, 0.3, c_out, &dev)?;
            let first = Conv2d::from_tensors(weight.clone(), Some(bias.clone()), stride, padding)?;
            let last = first.clone().into_channels_last()?;
            let x_last = x.permute((0, 2, 3, 1))?.contiguous()?;
            let got = gemm_bf16::scoped(true, || last.forward_upsampled(&x_last, up))?
                .permute((0, 3, 1, 2))?;
            let f32_result = first.forward_upsampled(&x, up)?;
            let case = format!("b{b} {c_in}->{c_out} {h}x{w} s{stride} up{up}");
            if !c_in.is_multiple_of(32) {
                let f32_last = last.forward_upsampled(&x_last, up)?.permute((0, 3, 1, 2))?;
                assert_eq!(max_abs_diff(&got, &f32_last)?, 0.0, "{case}: stays f32");
                continue;
            }
            if up == 1 {
                let rounded = Conv2d::from_tensors(round(&weight)?, Some(bias), stride, padding)?;
                let want = rounded.forward(&round(&x)?)?;
                let err = max_abs_diff(&got, &want)?;
                assert!(err < 1e-4, "{case}: {err}");
            } else {
                let scale = f32_result
                    .abs()?
                    .flatten_all()?
                    .max(0)?
                    .to_scalar::<f32>()?;
                let err = max_abs_diff(&got, &f32_result)?;
                assert!(err < 2e-2 * scale, "{case}: {err} of {scale}");
            }
            assert!(
                max_abs_diff(&got, &f32_result)? > 1e-5,
                "{case}: not rounded"
            );
        }
        Ok(())
    }

    /// `first`'s channels-last copy on `x` (channels-first) gives what `first` gives, within
    /// 1e-4, plain and with the fused epilogue (a residual, then ReLU) against the separate ops.
    fn assert_channels_last_matches(
        first: &Conv2d,
        x: &Tensor,
        up: usize,
        case: &str,
    ) -> candle_core::Result<()> {
        let last = first.clone().into_channels_last()?;
        assert!(last.is_channels_last() && !first.is_channels_last());
        let want = first.forward_upsampled(x, up)?;
        let residual = Tensor::randn(0f32, 1.0, want.shape(), x.device())?;
        let want_fused = (&want + &residual)?.relu()?;
        let to_last = |t: &Tensor| t.permute((0, 2, 3, 1))?.contiguous();
        let (x_last, residual_last) = (to_last(x)?, to_last(&residual)?);
        let got = last.forward_upsampled(&x_last, up)?;
        let epilogue = Epilogue {
            residual: Some(&residual_last),
            relu: true,
        };
        let got_fused = last.forward_with(&x_last, up, epilogue)?;
        for (got, want, what) in [(got, &want, "plain"), (got_fused, &want_fused, "fused")] {
            let got = got.permute((0, 3, 1, 2))?;
            assert_eq!(got.dims(), want.dims());
            let err = max_abs_diff(&got, want)?;
            assert!(err < 1e-4, "{what} {case}: {err}");
        }
        Ok(())
    }

    /// The channels-last kernel computes what the channels-first one does, with its epilogue
    /// (bias, residual, ReLU) equal to the separate ops, across strides, paddings, kernel
    /// sizes, upsampling, batches and sizes that split rows over threads.
    /// The channels-last nearest upsampling (what cuDNN's NHWC path feeds its convolution) is
    /// torch's nearest upsampling of the same map, value for value: ×2 and ×3, two images.
    #[test]
    fn channels_last_upsampling_is_nearest_upsampling() -> candle_core::Result<()> {
        let x = Tensor::randn(0f32, 1.0, (2, 3, 5, 4), &Device::Cpu)?;
        for factor in [2, 3] {
            let want = x.upsample_nearest2d(5 * factor, 4 * factor)?;
            let last = x.permute((0, 2, 3, 1))?.contiguous()?;
            let got = upsample_nearest_channels_last(&last, factor)?.permute((0, 3, 1, 2))?;
            assert_eq!(got.dims(), want.dims());
            let diff = (got - &want)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert_eq!(diff, 0.0, "×{factor}");
        }
        Ok(())
    }

    #[test]
    fn channels_last_matches_channels_first() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        let cases = [
            // (batch, c_in, c_out, k, h, w, stride, padding, upsample, bias)
            (2, 3, 5, 3, 7, 9, 1, Padding::uniform(1), 1, true),
            (2, 4, 6, 3, 8, 6, 2, Padding::bottom_right(1), 1, false),
            (1, 8, 8, 3, 9, 7, 2, Padding::uniform(1), 1, true),
            (2, 5, 3, 1, 6, 5, 1, Padding::default(), 1, true),
            (1, 6, 4, 3, 5, 6, 1, Padding::uniform(1), 2, false),
            (2, 3, 2, 5, 11, 10, 1, Padding::uniform(2), 1, true),
            (1, 16, 16, 3, 64, 48, 1, Padding::uniform(1), 1, true),
            (1, 16, 16, 3, 32, 40, 1, Padding::uniform(1), 2, true),
            // Upsampling through phases with other factors, kernels and paddings, and the
            // strided fallback that upsamples in the copy.
            (2, 4, 5, 3, 5, 7, 1, Padding::uniform(1), 3, true),
            (1, 4, 5, 5, 6, 5, 1, Padding::uniform(2), 2, true),
            (1, 4, 5, 3, 6, 5, 1, Padding::bottom_right(1), 2, false),
            (1, 4, 5, 2, 6, 5, 1, Padding::default(), 2, true),
            (2, 4, 5, 3, 6, 5, 2, Padding::uniform(1), 2, true),
        ];
        for (b, c_in, c_out, k, h, w, stride, padding, up, bias) in cases {
            let x = Tensor::randn(0f32, 1.0, (b, c_in, h, w), &dev)?;
            let weight = Tensor::randn(0f32, 0.3, (c_out, c_in, k, k), &dev)?;
            let bias = bias
                .then(|| Tensor::randn(0f32, 0.3, c_out, &dev))
                .transpose()?;
            let first = Conv2d::from_tensors(weight, bias, stride, padding)?;
            let case = format!("b{b} {c_in}->{c_out} k{k} {h}x{w} s{stride} {padding:?} up{up}");
            assert_channels_last_matches(&first, &x, up, &case)?;
        }
        // A residual of the wrong shape is refused, naming the shapes.
        let layer = Conv2d::from_tensors(
            Tensor::randn(0f32, 0.3, (4, 2, 3, 3), &dev)?,
            None,
            1,
            Padding::uniform(1),
        )?
        .into_channels_last()?;
        let x = Tensor::randn(0f32, 1.0, (1, 5, 5, 2), &dev)?;
        let wrong = Tensor::zeros((1, 5, 4, 4), DType::F32, &dev)?;
        let err = layer
            .forward_with(
                &x,
                1,
                Epilogue {
                    residual: Some(&wrong),
                    relu: false,
                },
            )
            .unwrap_err()
            .to_string();
        assert!(err.contains("residual"), "{err}");
        Ok(())
    }

    /// The direct AVX2 kernel (what the autoencoders run on an AVX2 CPU without AVX-512) and the
    /// GEMM path each compute the channels-first convolution, with the fused epilogue, across
    /// strides, upsampling (phases and the strided fallback), 1×1 kernels, several blocks of 16
    /// output channels and pixel counts that leave every remainder of the 6-pixel block.
    #[test]
    fn direct_and_gemm_channels_last_kernels_match_channels_first() -> candle_core::Result<()> {
        use super::super::conv_direct;
        if !conv_direct::available() {
            println!("no AVX2 and FMA here: only the GEMM path can run");
        }
        let dev = Device::Cpu;
        let cases = [
            // (batch, c_in, c_out, k, h, w, stride, padding, upsample)
            (1, 3, 32, 3, 13, 17, 1, Padding::uniform(1), 1),
            (2, 16, 32, 3, 9, 11, 2, Padding::bottom_right(1), 1),
            (1, 32, 16, 3, 7, 10, 1, Padding::uniform(1), 2),
            (1, 8, 16, 1, 5, 7, 1, Padding::default(), 1),
            (1, 16, 48, 3, 6, 8, 2, Padding::uniform(1), 2),
            (2, 24, 64, 3, 12, 23, 1, Padding::uniform(1), 1),
        ];
        for (b, c_in, c_out, k, h, w, stride, padding, up) in cases {
            let x = Tensor::randn(0f32, 1.0, (b, c_in, h, w), &dev)?;
            let weight = Tensor::randn(0f32, 0.3, (c_out, c_in, k, k), &dev)?;
            let bias = Tensor::randn(0f32, 0.3, c_out, &dev)?;
            let first = Conv2d::from_tensors(weight, Some(bias), stride, padding)?;
            for direct in [false, true] {
                if direct && !conv_direct::available() {
                    continue;
                }
                let case = format!(
                    "b{b} {c_in}->{c_out} k{k} {h}x{w} s{stride} {padding:?} up{up} direct {direct}"
                );
                let _choice = conv_direct::choose(Some(direct));
                let _no_winograd = winograd::choose(crate::Winograd::Off);
                // What the op's dispatch reads on this thread.
                assert_eq!(conv_direct::chosen(c_out), direct, "{case}");
                assert_channels_last_matches(&first, &x, up, &case)?;
            }
        }
        Ok(())
    }
}
