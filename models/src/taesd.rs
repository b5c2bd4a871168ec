//! The tiny autoencoder TAESD, as diffusers' `AutoencoderTiny`.
//!
//! Both halves are plain sequences (`encoder.layers.N`, `decoder.layers.N`, numbered as
//! diffusers' `nn.Sequential`, which counts the weightless activation and upsampling layers too):
//!
//! * encoder: input mapped from [−1, 1] to [0, 1]; per level a 3×3 convolution (stride 2 and no
//!   bias after the first level) and `num_encoder_blocks[i]` residual blocks; a final 3×3
//!   convolution to the latent channels.
//! * decoder: soft clamp `3·tanh(z/3)`; a convolution and the activation; per level
//!   `num_decoder_blocks[i]` residual blocks, then (except at the last level) nearest upsampling
//!   and a bias-free convolution; the last level's convolution (with bias) gives the image, which
//!   is mapped from [0, 1] back to [−1, 1].
//!
//! A residual block is `relu(conv(act(conv(act(conv(x))))) + x)`.
//! TAESD's latents are used unscaled (`scaling_factor` 1); `latent_magnitude` and
//! `latent_shift` only matter for storing latents as bytes, which StreamDiffusion does not do.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::{Module, VarBuilder};
use serde::Deserialize;

use crate::activation::Activation;
use crate::cuda_graph::GraphCache;
use crate::kernels::conv::{Conv2d, Epilogue, Padding};
use crate::kernels::{cpu_kernels, gemm_bf16};
use crate::limits::{
    Limits, MAX_CHANNELS, MAX_IO_CHANNELS, MAX_LEVELS, MAX_TINY_BLOCKS, MAX_UPSAMPLING,
};
use crate::{Error, Result};
use crate::{no_unused_tensors, open_component};

/// `config.json` of a diffusers `AutoencoderTiny`; defaults are diffusers' constructor defaults.
#[derive(Debug, Clone, Deserialize)]
pub struct Config {
    /// Image channels in.
    #[serde(default = "default_image_channels")]
    pub in_channels: usize,
    /// Image channels out.
    #[serde(default = "default_image_channels")]
    pub out_channels: usize,
    /// Channels per encoder level (diffusers chains the levels without projections, so they
    /// must all be equal).
    #[serde(default = "default_block_out_channels")]
    pub encoder_block_out_channels: Vec<usize>,
    /// Channels per decoder level (all equal, as for the encoder).
    #[serde(default = "default_block_out_channels")]
    pub decoder_block_out_channels: Vec<usize>,
    /// Activation inside the blocks: `relu` (TAESD), `silu`/`swish`, `gelu`, `mish`.
    #[serde(default = "default_act_fn")]
    pub act_fn: String,
    /// Upsampling mode of the decoder; only `nearest` is supported.
    #[serde(default = "default_upsample_fn")]
    pub upsample_fn: String,
    /// Channels of the latent space.
    #[serde(default = "default_latent_channels")]
    pub latent_channels: usize,
    /// Upsampling factor per decoder level.
    #[serde(default = "default_upsampling_scaling_factor")]
    pub upsampling_scaling_factor: usize,
    /// Residual blocks per encoder level.
    #[serde(default = "default_num_encoder_blocks")]
    pub num_encoder_blocks: Vec<usize>,
    /// Residual blocks per decoder level.
    #[serde(default = "default_num_decoder_blocks")]
    pub num_decoder_blocks: Vec<usize>,
    /// Range of latents when stored as bytes (unused by encode/decode).
    #[serde(default = "default_latent_magnitude")]
    pub latent_magnitude: f64,
    /// Offset of latents when stored as bytes (unused by encode/decode).
    #[serde(default = "default_latent_shift")]
    pub latent_shift: f64,
    /// Whether pipelines should run it in f32 (diffusers forces this off for TAESD).
    #[serde(default)]
    pub force_upcast: bool,
    /// Pipelines multiply latents by this after encoding and divide before decoding (1.0).
    #[serde(default = "default_scaling_factor")]
    pub scaling_factor: f64,
}

fn default_image_channels() -> usize {
    3
}
fn default_block_out_channels() -> Vec<usize> {
    vec![64; 4]
}
fn default_act_fn() -> String {
    "relu".into()
}
fn default_upsample_fn() -> String {
    "nearest".into()
}
fn default_latent_channels() -> usize {
    4
}
fn default_upsampling_scaling_factor() -> usize {
    2
}
fn default_num_encoder_blocks() -> Vec<usize> {
    vec![1, 3, 3, 3]
}
fn default_num_decoder_blocks() -> Vec<usize> {
    vec![3, 3, 3, 1]
}
fn default_latent_magnitude() -> f64 {
    3.0
}
fn default_latent_shift() -> f64 {
    0.5
}
fn default_scaling_factor() -> f64 {
    1.0
}

impl Default for Config {
    fn default() -> Self {
        Self {
            in_channels: default_image_channels(),
            out_channels: default_image_channels(),
            encoder_block_out_channels: default_block_out_channels(),
            decoder_block_out_channels: default_block_out_channels(),
            act_fn: default_act_fn(),
            upsample_fn: default_upsample_fn(),
            latent_channels: default_latent_channels(),
            upsampling_scaling_factor: default_upsampling_scaling_factor(),
            num_encoder_blocks: default_num_encoder_blocks(),
            num_decoder_blocks: default_num_decoder_blocks(),
            latent_magnitude: default_latent_magnitude(),
            latent_shift: default_latent_shift(),
            force_upcast: false,
            scaling_factor: default_scaling_factor(),
        }
    }
}

impl Config {
    /// Checks what the graph depends on, and every size against [`crate::limits`]; the
    /// error names the offending field.
    pub fn validate(&self) -> Result<()> {
        let l = Limits::new("AutoencoderTiny");
        for (key, channels, blocks_key, blocks) in [
            (
                "encoder_block_out_channels",
                &self.encoder_block_out_channels,
                "num_encoder_blocks",
                &self.num_encoder_blocks,
            ),
            (
                "decoder_block_out_channels",
                &self.decoder_block_out_channels,
                "num_decoder_blocks",
                &self.num_decoder_blocks,
            ),
        ] {
            l.count(key, channels.len(), MAX_LEVELS)?;
            l.values(key, channels, MAX_CHANNELS)?;
            l.count(blocks_key, blocks.len(), MAX_LEVELS)?;
            l.values(blocks_key, blocks, MAX_TINY_BLOCKS)?;
        }
        for (key, value) in [
            ("in_channels", self.in_channels),
            ("out_channels", self.out_channels),
            ("latent_channels", self.latent_channels),
        ] {
            l.value(key, value, MAX_IO_CHANNELS)?;
        }
        l.value(
            "upsampling_scaling_factor",
            self.upsampling_scaling_factor,
            MAX_UPSAMPLING,
        )?;
        for (field, channels, blocks_field, blocks) in [
            (
                "encoder_block_out_channels",
                &self.encoder_block_out_channels,
                "num_encoder_blocks",
                &self.num_encoder_blocks,
            ),
            (
                "decoder_block_out_channels",
                &self.decoder_block_out_channels,
                "num_decoder_blocks",
                &self.num_decoder_blocks,
            ),
        ] {
            if channels.is_empty() {
                return Err(Error::param(field, "must not be empty"));
            }
            if channels.len() != blocks.len() {
                return Err(Error::param(
                    field,
                    format!(
                        "has {} entries but {blocks_field} has {}",
                        channels.len(),
                        blocks.len()
                    ),
                ));
            }
            // diffusers' EncoderTiny/DecoderTiny feed each level's output straight into the next
            // level's blocks, so differing channel counts cannot run there either.
            if channels.iter().any(|&c| c != channels[0] || c == 0) {
                return Err(Error::param(
                    field,
                    format!(
                        "unsupported channels {channels:?}: every level must have the same \
                         non-zero channel count"
                    ),
                ));
            }
        }
        Activation::from_config(&self.act_fn, "act_fn")?;
        if self.upsample_fn != "nearest" {
            return Err(Error::param(
                "upsample_fn",
                format!(
                    "unsupported upsampling {:?} (only \"nearest\" is supported)",
                    self.upsample_fn
                ),
            ));
        }
        super::limits::at_least_one(&[
            ("in_channels", self.in_channels),
            ("out_channels", self.out_channels),
            ("latent_channels", self.latent_channels),
            ("upsampling_scaling_factor", self.upsampling_scaling_factor),
        ])?;
        super::limits::positive_factor("scaling_factor", self.scaling_factor)?;
        Ok(())
    }
}

/// A 3×3 convolution in the autoencoders' layout ([`crate::vae::map_conv`]): channels-last
/// where the CPU kernels run (see [`AutoencoderTiny`]), and elsewhere where the kernel policy
/// asks for channels-last maps (`SDSTREAM_CHANNELS_LAST`, by default on CUDA devices: cuDNN's
/// NHWC convolutions with no transposes around them).
fn conv3x3(
    c_in: usize,
    c_out: usize,
    stride: usize,
    bias: bool,
    vb: VarBuilder,
) -> candle_core::Result<Conv2d> {
    let conv = Conv2d::new(
        c_in,
        c_out,
        3,
        stride,
        Padding::uniform(1),
        bias,
        vb.clone(),
    )?;
    crate::vae::map_conv(conv, &vb)
}

/// diffusers' `AutoencoderTinyBlock` with equal input and output channels (identity skip).
#[derive(Debug, Clone)]
struct TinyBlock {
    conv: [Conv2d; 3],
    act: Activation,
}

impl TinyBlock {
    fn new(channels: usize, act: Activation, vb: VarBuilder) -> candle_core::Result<Self> {
        // Indices 1 and 3 of the inner Sequential are the activations.
        let conv = |i: usize| conv3x3(channels, channels, 1, true, vb.pp(format!("conv.{i}")));
        Ok(Self {
            conv: [conv(0)?, conv(2)?, conv(4)?],
            act,
        })
    }

    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let h = self.act.after_conv(&self.conv[0], xs)?;
        let h = self.act.after_conv(&self.conv[1], &h)?;
        // diffusers' block ends in a ReLU whatever the activation inside.
        let fuse = Epilogue {
            residual: Some(xs),
            relu: true,
        };
        self.conv[2].forward_with(&h, 1, fuse)
    }
}

/// One entry of an encoder/decoder sequence.
#[derive(Debug, Clone)]
enum Layer {
    Conv(Conv2d),
    /// Nearest-neighbour upsampling by this factor followed by the convolution (two entries of
    /// diffusers' sequence, fused so that the upsampled map is not stored).
    UpsampleConv(usize, Conv2d),
    Block(TinyBlock),
    Act(Activation),
}

impl Layer {
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Self::Conv(conv) => conv.forward(xs),
            Self::UpsampleConv(factor, conv) => conv.forward_upsampled(xs, *factor),
            Self::Block(block) => block.forward(xs),
            Self::Act(act) => act.apply(xs),
        }
    }
}

/// Builds a sequence while numbering its entries as `nn.Sequential` does.
struct SequenceBuilder<'a> {
    vb: VarBuilder<'a>,
    layers: Vec<Layer>,
    /// Index of the next entry in diffusers' sequence.
    next: usize,
    /// Upsampling factor waiting to be fused into the next convolution.
    pending_upsample: Option<usize>,
}

impl<'a> SequenceBuilder<'a> {
    fn new(vb: VarBuilder<'a>) -> Self {
        Self {
            vb,
            layers: Vec::new(),
            next: 0,
            pending_upsample: None,
        }
    }

    fn next_vb(&mut self) -> VarBuilder<'a> {
        let vb = self.vb.pp(self.next.to_string());
        self.next += 1;
        vb
    }

    fn conv(
        &mut self,
        c_in: usize,
        c_out: usize,
        stride: usize,
        bias: bool,
    ) -> candle_core::Result<()> {
        let vb = self.next_vb();
        let conv = conv3x3(c_in, c_out, stride, bias, vb)?;
        self.layers.push(match self.pending_upsample.take() {
            Some(factor) => Layer::UpsampleConv(factor, conv),
            None => Layer::Conv(conv),
        });
        Ok(())
    }

    fn blocks(
        &mut self,
        count: usize,
        channels: usize,
        act: Activation,
    ) -> candle_core::Result<()> {
        for _ in 0..count {
            let vb = self.next_vb();
            self.layers
                .push(Layer::Block(TinyBlock::new(channels, act, vb)?));
        }
        Ok(())
    }

    fn activation(&mut self, act: Activation) {
        self.next += 1;
        self.layers.push(Layer::Act(act));
    }

    /// An upsampling entry: weightless, applied by the convolution that follows it.
    fn upsample(&mut self, factor: usize) {
        self.next += 1;
        self.pending_upsample = Some(factor);
    }
}

/// The channels-last maps of TAESD's CPU runs, kept from call to call. At 512×512 a map is
/// 64 MiB, and a fresh one costs the operating system's zeroing of every page on first touch
/// (docs/ARCHITECTURE.md "Fresh pages"): inside a pipeline, where the UNet's working memory
/// was just returned, that was half of TAESD's time. A run borrows buffers from here and gives
/// them back; what it holds at most (three maps of the largest level, about 200 MB at 512²)
/// stays while the model lives. A clone starts with an empty pool of its own; two runs on one
/// model at once work, the second with fresh buffers.
#[derive(Debug, Default)]
struct MapPool(std::sync::Mutex<Vec<Vec<f32>>>);

impl Clone for MapPool {
    fn clone(&self) -> Self {
        Self::default()
    }
}

/// Buffers borrowed from a [`MapPool`] for one run.
struct Borrowed<'a> {
    free: Vec<Vec<f32>>,
    pool: Option<std::sync::MutexGuard<'a, Vec<Vec<f32>>>>,
}

impl Borrowed<'_> {
    /// A buffer holding at least `len` values, or an empty one the kernel will size.
    fn take(&mut self, len: usize) -> Vec<f32> {
        let best = (0..self.free.len())
            .filter(|&i| self.free[i].capacity() >= len)
            .min_by_key(|&i| self.free[i].capacity());
        match best {
            Some(i) => self.free.swap_remove(i),
            None => Vec::new(),
        }
    }

    fn give(&mut self, buffer: Vec<f32>) {
        self.free.push(buffer);
    }
}

impl Drop for Borrowed<'_> {
    fn drop(&mut self) {
        if let Some(pool) = self.pool.as_mut() {
            pool.append(&mut self.free);
        }
    }
}

impl MapPool {
    fn borrow(&self) -> Borrowed<'_> {
        match self.0.try_lock() {
            Ok(mut pool) => Borrowed {
                free: std::mem::take(&mut *pool),
                pool: Some(pool),
            },
            Err(_) => Borrowed {
                free: Vec::new(),
                pool: None,
            },
        }
    }
}

/// diffusers' `AutoencoderTiny`.
#[derive(Debug, Clone)]
pub struct AutoencoderTiny {
    encoder: Vec<Layer>,
    decoder: Vec<Layer>,
    config: Config,
    /// CUDA graphs of the encoder and the decoder (none elsewhere); a clone starts without any.
    encoder_graphs: GraphCache,
    decoder_graphs: GraphCache,
    /// Maps of the CPU runs, reused from call to call.
    maps: MapPool,
    /// Whether the CPU's GEMMs run in bf16 ([`with_bf16_gemms`](Self::with_bf16_gemms)).
    bf16_gemms: bool,
}

impl AutoencoderTiny {
    /// Builds the network from `config` with weights from `vb` (rooted at the file's top level).
    pub fn new(config: &Config, vb: VarBuilder) -> Result<Self> {
        config.validate()?;
        let act = Activation::from_config(&config.act_fn, "act_fn")?;

        let mut enc = SequenceBuilder::new(vb.pp("encoder.layers"));
        for (i, (&channels, &blocks)) in config
            .encoder_block_out_channels
            .iter()
            .zip(&config.num_encoder_blocks)
            .enumerate()
        {
            if i == 0 {
                enc.conv(config.in_channels, channels, 1, true)?;
            } else {
                enc.conv(channels, channels, 2, false)?;
            }
            enc.blocks(blocks, channels, act)?;
        }
        let enc_out = *config.encoder_block_out_channels.last().unwrap_or(&0);
        enc.conv(enc_out, config.latent_channels, 1, true)?;

        let mut dec = SequenceBuilder::new(vb.pp("decoder.layers"));
        let dec_channels = &config.decoder_block_out_channels;
        dec.conv(config.latent_channels, dec_channels[0], 1, true)?;
        dec.activation(act);
        let levels = dec_channels.len();
        for (i, (&channels, &blocks)) in dec_channels
            .iter()
            .zip(&config.num_decoder_blocks)
            .enumerate()
        {
            let last = i + 1 == levels;
            dec.blocks(blocks, channels, act)?;
            if !last {
                dec.upsample(config.upsampling_scaling_factor);
            }
            let c_out = if last { config.out_channels } else { channels };
            dec.conv(channels, c_out, 1, last)?;
        }

        Ok(Self {
            encoder: enc.layers,
            decoder: dec.layers,
            config: config.clone(),
            encoder_graphs: GraphCache::default(),
            decoder_graphs: GraphCache::default(),
            maps: MapPool::default(),
            bf16_gemms: false,
        })
    }

    /// The same network with its CPU GEMMs in bf16 (`on`) or f32: bf16 operands, f32 sums,
    /// f32 maps in between ([`super::kernels::gemm_bf16`]); `dtype: "bf16"` on the CPU. Other
    /// devices ignore it.
    pub fn with_bf16_gemms(mut self, on: bool) -> Self {
        self.bf16_gemms = on;
        self
    }

    /// Loads a diffusers TAESD folder (`config.json` + `diffusion_pytorch_model.safetensors`, or
    /// the `.fp16.safetensors` variant, preferred when `dtype` is half precision).
    pub fn load(dir: &Path, dtype: DType, device: &Device) -> Result<Self> {
        open_component(
            dir,
            "diffusion_pytorch_model",
            dtype,
            device,
            no_unused_tensors,
            Config::validate,
            Self::new,
        )
    }

    /// Runs `layers` over channels-first `xs`, in the layout its convolutions take: with the
    /// CPU kernels the whole sequence runs channels-last (`[B, H, W, C]`: 64 channels at up to
    /// 512×512, where that layout's convolution needs no im2col matrix), converted once on the
    /// way in and once on the way out, where the maps have 3 or 4 channels.
    fn run_layers(&self, layers: &[Layer], xs: Tensor) -> candle_core::Result<Tensor> {
        let channels_last = layers.iter().any(|layer| match layer {
            Layer::Conv(conv) | Layer::UpsampleConv(_, conv) => conv.is_channels_last(),
            Layer::Block(block) => block.conv[0].is_channels_last(),
            Layer::Act(_) => false,
        });
        if channels_last
            && cpu_kernels(xs.device())
            && xs.dtype() == DType::F32
            && layers.iter().all(|layer| match layer {
                Layer::Act(act) => *act == Activation::Relu,
                Layer::Block(block) => block.act == Activation::Relu,
                Layer::Conv(conv) | Layer::UpsampleConv(_, conv) => conv.dtype() == DType::F32,
            })
        {
            return self.run_pooled(layers, &xs);
        }
        Self::run_tensors(layers, xs, channels_last)
    }

    /// [`Self::run_layers`] with a tensor per map (what runs off the CPU, and for activations
    /// other than ReLU or dtypes other than f32).
    fn run_tensors(
        layers: &[Layer],
        xs: Tensor,
        channels_last: bool,
    ) -> candle_core::Result<Tensor> {
        let xs = if channels_last {
            xs.permute((0, 2, 3, 1))?.contiguous()?
        } else {
            xs
        };
        let ys = layers.iter().try_fold(xs, |xs, layer| layer.forward(&xs))?;
        if channels_last {
            ys.permute((0, 3, 1, 2))?.contiguous()
        } else {
            Ok(ys)
        }
    }

    /// [`Self::run_layers`] over f32 channels-last buffers from the model's [`MapPool`] (ReLU
    /// activations only; the kernels are the ones the tensor path calls): the input and the
    /// output are converted between layouts through buffers of their own, so only the output
    /// tensor is new memory.
    fn run_pooled(&self, layers: &[Layer], xs: &Tensor) -> candle_core::Result<Tensor> {
        let (b, c, h, w) = xs.dims4()?;
        let src = xs.flatten_all()?.to_vec1::<f32>()?;
        let mut maps = self.maps.borrow();
        let mut cur = maps.take(src.len());
        cur.resize(src.len(), 0.0);
        // [B, C, H, W] → [B, H, W, C].
        for (dst, src) in cur.chunks_mut(c * h * w).zip(src.chunks(c * h * w)) {
            for (ch, plane) in src.chunks(h * w).enumerate() {
                for (px, &v) in plane.iter().enumerate() {
                    dst[px * c + ch] = v;
                }
            }
        }
        let (mut h, mut w, mut c) = (h, w, c);
        for layer in layers {
            match layer {
                Layer::Conv(conv) | Layer::UpsampleConv(_, conv) => {
                    let factor = match layer {
                        Layer::UpsampleConv(f, _) => *f,
                        _ => 1,
                    };
                    let (h_out, w_out, c_out) = conv.output_size(h, w, factor);
                    let mut out = maps.take(b * h_out * w_out * c_out);
                    (h, w, c) =
                        conv.forward_f32_into(&cur, (b, h, w), factor, None, false, &mut out)?;
                    maps.give(std::mem::replace(&mut cur, out));
                }
                Layer::Act(_) => {
                    for v in cur.iter_mut() {
                        // torch's ReLU: NaN kept.
                        if *v < 0.0 {
                            *v = 0.0;
                        }
                    }
                }
                Layer::Block(block) => {
                    let shape = (b, h, w);
                    let mut first = maps.take(cur.len());
                    block.conv[0].forward_f32_into(&cur, shape, 1, None, true, &mut first)?;
                    let mut second = maps.take(cur.len());
                    block.conv[1].forward_f32_into(&first, shape, 1, None, true, &mut second)?;
                    // relu(conv(second) + x) over the first buffer, no longer needed.
                    block.conv[2].forward_f32_into(
                        &second,
                        shape,
                        1,
                        Some(&cur),
                        true,
                        &mut first,
                    )?;
                    maps.give(second);
                    maps.give(std::mem::replace(&mut cur, first));
                }
            }
        }
        // [B, H, W, C] → [B, C, H, W], into the output's own memory.
        let mut out = vec![0f32; cur.len()];
        for (dst, src) in out.chunks_mut(c * h * w).zip(cur.chunks(c * h * w)) {
            for (px, pixel) in src.chunks_exact(c).enumerate() {
                for (ch, &v) in pixel.iter().enumerate() {
                    dst[ch * h * w + px] = v;
                }
            }
        }
        maps.give(cur);
        Tensor::from_vec(out, (b, c, h, w), xs.device())
    }

    /// The configuration the network was built from.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The factor pipelines apply to latents (`config.scaling_factor`, 1.0 for TAESD).
    pub fn scaling_factor(&self) -> f64 {
        self.config.scaling_factor
    }

    /// Pixels per latent cell and side for the encoder: 2^(levels − 1), 8 for TAESD.
    pub fn spatial_scale_factor(&self) -> usize {
        1 << (self.config.encoder_block_out_channels.len() - 1)
    }

    /// Pixels per latent cell and side produced by the decoder:
    /// `upsampling_scaling_factor`^(levels − 1), 8 for TAESD.
    pub fn decoder_scale_factor(&self) -> usize {
        let levels = self.config.decoder_block_out_channels.len() as u32;
        self.config.upsampling_scaling_factor.pow(levels - 1)
    }

    /// Channels of the latent space.
    pub fn latent_channels(&self) -> usize {
        self.config.latent_channels
    }

    /// Encodes images `x` ([B, in_channels, H, W] in [−1, 1]) into latents
    /// [B, latent_channels, H/8, W/8]: diffusers' `encode(x).latents`.
    /// On a CUDA device it runs as a CUDA graph after its first call ([`super::cuda_graph`]).
    pub fn encode(&self, x: &Tensor) -> Result<Tensor> {
        gemm_bf16::scoped(self.bf16_gemms, || {
            self.encoder_graphs.run(&[x], |xs| {
                let x01 = ((xs[0] + 1.0)? / 2.0)?;
                Ok(self.run_layers(&self.encoder, x01)?)
            })
        })
    }

    /// Decodes latents into images nominally in [−1, 1] (not clamped): diffusers'
    /// `decode(z).sample`.
    /// On a CUDA device it runs as a CUDA graph after its first call ([`super::cuda_graph`]).
    pub fn decode(&self, z: &Tensor) -> Result<Tensor> {
        gemm_bf16::scoped(self.bf16_gemms, || {
            self.decoder_graphs.run(&[z], |zs| {
                let soft_clamped = ((zs[0] / 3.0)?.tanh()? * 3.0)?;
                let y01 = self.run_layers(&self.decoder, soft_clamped)?;
                Ok(((y01 * 2.0)? - 1.0)?)
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(cfg: &Config) -> String {
        cfg.validate()
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default()
    }

    /// The pooled CPU run gives the tensor path's values (same kernels, so bit for bit), keeps
    /// its buffers between calls without adding to them, and leaves a second run's result
    /// unchanged.
    #[test]
    fn pooled_maps_match_tensors_and_are_reused() -> Result<()> {
        let dev = Device::Cpu;
        let cfg = Config {
            encoder_block_out_channels: vec![8; 3],
            decoder_block_out_channels: vec![8; 3],
            num_encoder_blocks: vec![1, 2, 1],
            num_decoder_blocks: vec![1, 2, 1],
            ..Config::default()
        };
        let vars = candle_nn::VarMap::new();
        let vb = VarBuilder::from_varmap(&vars, DType::F32, &dev);
        // A first build names every weight (zeros); random values go in, and a second build
        // reads them.
        AutoencoderTiny::new(&cfg, vb.clone())?;
        for var in vars.all_vars() {
            var.set(&Tensor::randn(0f32, 0.3, var.shape(), &dev)?)?;
        }
        let taesd = AutoencoderTiny::new(&cfg, vb)?;
        assert!(matches!(&taesd.encoder[0], Layer::Conv(c) if c.is_channels_last()));
        let x = Tensor::randn(0f32, 0.5, (2, 3, 24, 20), &dev)?;
        let pooled = taesd.run_pooled(&taesd.encoder, &x)?;
        let tensors = AutoencoderTiny::run_tensors(&taesd.encoder, x.clone(), true)?;
        assert_eq!(pooled.dims(), &[2, 4, 6, 5]);
        let diff = (&pooled - &tensors)?
            .abs()?
            .flatten_all()?
            .max(0)?
            .to_scalar::<f32>()?;
        assert_eq!(
            diff, 0.0,
            "encoder: pooled and tensor runs differ by {diff}"
        );
        let z = Tensor::randn(0f32, 1.0, (2, 4, 6, 5), &dev)?;
        let decoded = taesd.run_pooled(&taesd.decoder, &z)?;
        let want = AutoencoderTiny::run_tensors(&taesd.decoder, z.clone(), true)?;
        assert_eq!(decoded.dims(), &[2, 3, 24, 20]);
        let diff = (&decoded - &want)?
            .abs()?
            .flatten_all()?
            .max(0)?
            .to_scalar::<f32>()?;
        assert_eq!(
            diff, 0.0,
            "decoder: pooled and tensor runs differ by {diff}"
        );
        let kept = taesd.maps.0.lock().map(|p| p.len()).unwrap_or(0);
        assert!(kept >= 3, "only {kept} buffers kept");
        let again = taesd.run_pooled(&taesd.decoder, &z)?;
        let diff = (&again - &decoded)?
            .abs()?
            .flatten_all()?
            .max(0)?
            .to_scalar::<f32>()?;
        assert_eq!(diff, 0.0, "a second run differs by {diff}");
        let kept_after = taesd.maps.0.lock().map(|p| p.len()).unwrap_or(0);
        assert_eq!(kept_after, kept, "the second run added buffers");
        // Once warm, runs take their buffers from the pool: the same allocations, run after run.
        let addresses = |taesd: &AutoencoderTiny| -> Vec<usize> {
            let mut a: Vec<usize> = taesd
                .maps
                .0
                .lock()
                .map(|p| p.iter().map(|b| b.as_ptr() as usize).collect())
                .unwrap_or_default();
            a.sort_unstable();
            a
        };
        taesd.run_pooled(&taesd.encoder, &x)?;
        taesd.run_pooled(&taesd.decoder, &z)?;
        let warm = addresses(&taesd);
        taesd.run_pooled(&taesd.encoder, &x)?;
        taesd.run_pooled(&taesd.decoder, &z)?;
        assert_eq!(addresses(&taesd), warm, "a warm run allocated new maps");
        // The public entry points take the pooled path and agree with it.
        let via_decode = taesd.decode(&z)?;
        let soft = ((&z / 3.0)?.tanh()? * 3.0)?;
        let expected_soft = ((taesd.run_pooled(&taesd.decoder, &soft)? * 2.0)? - 1.0)?;
        let diff = (&via_decode - &expected_soft)?
            .abs()?
            .flatten_all()?
            .max(0)?
            .to_scalar::<f32>()?;
        assert_eq!(diff, 0.0, "decode differs from the pooled run by {diff}");
        Ok(())
    }

    #[test]
    fn unsupported_options_are_named() {
        let cfg = Config {
            upsample_fn: "bilinear".into(),
            ..Config::default()
        };
        assert!(message(&cfg).contains("upsample_fn"));
        let cfg = Config {
            num_decoder_blocks: vec![3, 3],
            ..Config::default()
        };
        assert!(message(&cfg).contains("decoder_block_out_channels"));
        let cfg = Config {
            encoder_block_out_channels: vec![32, 64, 64, 64],
            ..Config::default()
        };
        assert!(message(&cfg).contains("encoder_block_out_channels"));
        assert!(Config::default().validate().is_ok());
    }
}
