//! Building blocks of diffusers' conditional UNet, shared by the UNet and the ControlNet.
//!
//! Weight names are diffusers' own (`resnets.0.norm1.weight`, `attentions.0.transformer_blocks.0
//! .attn1.to_q.weight`, …) so that a block is built from the [`VarBuilder`] prefix of its place in
//! the checkpoint. Numerics follow diffusers/PyTorch in f32: GroupNorm and LayerNorm statistics are
//! accumulated in f64 on the CPU and applied as `x·scale + shift` per channel like PyTorch's CPU
//! kernels; GEGLU uses the exact (erf) GELU; attention uses a scale of 1/√head_dim. The CPU
//! kernels and their portable twins live in [`super::kernels`].

use candle_core::Tensor;
use candle_nn::VarBuilder;

pub use crate::activation::Activation;
use crate::kernels::conv::Conv2d;
use crate::kernels::norm::GroupNorm;
use crate::{Error, Result};

mod attention;
mod layers;
mod levels;
mod resnet;
mod transformer;

pub use attention::{Attention, Context, ImageAttention, ImageContext};
pub use layers::{Linear, SinusoidalTimesteps, TimestepEmbedding, conv2d, linear};
pub use levels::{DownBlock, LevelShape, MidBlock, UpBlock};
pub use resnet::{
    Downsample2D, ResnetBlock2D, ResnetTime, TimeProjections, Upsample2D, time_columns_taken,
};
pub use transformer::{BasicTransformerBlock, FeedForward, Transformer2DModel};

/// The activation a UNet or ControlNet config's `option` names. `mish`, which diffusers also
/// takes, is refused: no golden covers it in these networks.
pub fn activation(name: &str, model: &str, option: &str) -> Result<Activation> {
    match Activation::from_name(name) {
        Some(act) if act != Activation::Mish => Ok(act),
        _ => Err(Error::UnsupportedConfig {
            model: model.into(),
            option: option.into(),
            detail: format!("activation {name:?} is not supported (silu, swish, gelu, relu)"),
        }),
    }
}

/// Settings every resnet and transformer of a UNet shares, taken from the model config.
#[derive(Debug, Clone, Copy)]
pub struct BlockSettings {
    /// `norm_num_groups`.
    pub groups: usize,
    /// `norm_eps`, used by the resnets' GroupNorms.
    pub eps: f64,
    /// `act_fn`, the resnets' nonlinearity.
    pub act: Activation,
    /// `resnet_time_scale_shift == "scale_shift"`.
    pub scale_shift: bool,
    /// `use_linear_projection`.
    pub linear_projection: bool,
    /// `upcast_attention`.
    pub upcast_attention: bool,
    /// The blocks keep their maps channels-last, `[B, H, W, C]` (the kernel policy's
    /// `channels_last` when the network loads; the convolutions and norms are built for it).
    /// The networks' inputs and outputs stay `[B, C, H, W]` whatever this says: they enter and
    /// leave the layout at their ends ([`BlockSettings::enter`], [`BlockSettings::leave`]).
    pub channels_last: bool,
}

impl BlockSettings {
    /// A `[B, C, H, W]` map in the blocks' layout.
    pub fn enter(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        if self.channels_last {
            x.permute((0, 2, 3, 1))?.contiguous()
        } else {
            Ok(x.clone())
        }
    }

    /// A map in the blocks' layout as `[B, C, H, W]`.
    pub fn leave(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        if self.channels_last {
            x.permute((0, 3, 1, 2))?.contiguous()
        } else {
            Ok(x.clone())
        }
    }

    /// The `[B, C, H, W]` dims of a map in the blocks' layout.
    pub fn leave_shape(&self, x: &Tensor) -> candle_core::Result<Vec<usize>> {
        let (b, a, c, d) = x.dims4()?;
        Ok(if self.channels_last {
            vec![b, d, a, c]
        } else {
            vec![b, a, c, d]
        })
    }

    /// The dimension of a map in the blocks' layout that holds its channels.
    pub fn channel_dim(&self) -> usize {
        if self.channels_last { 3 } else { 1 }
    }

    /// The `(height, width)` of a map in the blocks' layout.
    pub fn spatial(&self, x: &Tensor) -> candle_core::Result<(usize, usize)> {
        let (_, a, b, c) = x.dims4()?;
        Ok(if self.channels_last { (a, b) } else { (b, c) })
    }

    /// `conv` taking and returning maps in the blocks' layout. A channels-last layer keeps its
    /// weight laid out for its kernel; the network's weight table (see
    /// [`crate::weight_table`]) gets a view of it in the checkpoint's shape, not a second copy.
    pub fn conv(&self, conv: Conv2d, vb: &VarBuilder) -> Result<Conv2d> {
        if !self.channels_last {
            return Ok(conv);
        }
        let conv = conv.into_channels_last()?;
        crate::kernels::substitutes::report(
            &format!("{}.weight", vb.prefix()),
            &conv.weight_as_checkpoint()?,
        );
        Ok(conv)
    }

    /// diffusers' `nn.Conv2d` with a bias and uniform padding, read from `vb` ([`conv2d`]), over
    /// maps in the blocks' layout ([`BlockSettings::conv`]).
    pub fn conv2d(
        &self,
        c_in: usize,
        c_out: usize,
        kernel: usize,
        stride: usize,
        padding: usize,
        vb: VarBuilder,
    ) -> Result<Conv2d> {
        let conv = conv2d(c_in, c_out, kernel, stride, padding, vb.clone())?;
        self.conv(conv, &vb)
    }

    /// `norm` over maps in the blocks' layout.
    pub fn norm(&self, norm: GroupNorm) -> GroupNorm {
        if self.channels_last {
            norm.into_channels_last()
        } else {
            norm
        }
    }
}

/// What one level of the UNet holds besides its resnets: the cross-attention transformers.
#[derive(Debug, Clone, Copy)]
pub struct AttentionSpec {
    /// Number of heads (diffusers' `num_attention_heads`, which defaults to `attention_head_dim`).
    pub heads: usize,
    /// Width of the text embeddings the cross-attention reads.
    pub cross_attention_dim: usize,
    /// BasicTransformerBlocks per Transformer2DModel.
    pub layers: usize,
    /// Whether the first attention of each block attends to the text instead of to itself.
    pub only_cross_attention: bool,
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use candle_core::{DType, Device, IndexOp, Module, Storage, Tensor};
    use candle_nn::VarBuilder;

    use super::*;
    use crate::kernels::same_values;
    use crate::weight_table;

    /// The feed-forward in row chunks (what large maps take on the CPU, to keep the projection
    /// out of freshly mapped memory) gives what it gives in one piece: a batch of two, 37 rows
    /// each, in chunks of 7 rows (the last one shorter, and chunks across the batch's images).
    #[test]
    fn feed_forward_in_row_chunks_matches_one_piece() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        let (dim, inner) = (8, 32);
        let tensors: HashMap<String, Tensor> = [
            ("net.0.proj.weight", vec![2 * inner, dim]),
            ("net.0.proj.bias", vec![2 * inner]),
            ("net.2.weight", vec![dim, inner]),
            ("net.2.bias", vec![dim]),
        ]
        .into_iter()
        .map(|(name, shape)| Ok((name.to_string(), Tensor::randn(0f32, 0.5, shape, &dev)?)))
        .collect::<candle_core::Result<_>>()?;
        let (ff, _table) = recorded(&tensors, |vb| FeedForward::new(dim, vb));
        let x = Tensor::randn(0f32, 1.0, (2, 37, dim), &dev)?;
        let whole = ff.forward_rows(&x)?;
        let chunked = ff.forward_chunked(&x, 7)?;
        assert_eq!(chunked.dims(), &[2, 37, dim]);
        let max_abs = |t: &Tensor| t.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>();
        let scale = max_abs(&whole)?;
        let err = max_abs(&(&chunked - &whole)?)?;
        assert!(scale > 0.1, "the outputs are not trivially small: {scale}");
        assert!(err <= 1e-6 * scale, "{err} of {scale}");
        Ok(())
    }

    /// Where a CPU f32 tensor's values start in memory.
    fn first_value(t: &Tensor) -> *const f32 {
        let (storage, layout) = t.storage_and_layout();
        let Storage::Cpu(candle_core::CpuStorage::F32(values)) = &*storage else {
            panic!("a CPU f32 tensor");
        };
        values[layout.start_offset()..].as_ptr()
    }

    /// Builds with `tensors` recorded as the weights backend records what it hands out.
    fn recorded<M>(
        tensors: &HashMap<String, Tensor>,
        build: impl FnOnce(VarBuilder) -> Result<M>,
    ) -> (M, weight_table::WeightTable) {
        let vb = VarBuilder::from_tensors(tensors.clone(), DType::F32, &Device::Cpu);
        weight_table::recording(|| {
            for (name, t) in tensors {
                weight_table::record(name, t);
            }
            build(vb)
        })
        .unwrap()
    }

    /// On the CPU a linear layer's values are laid out `[in, out]` (what the `gemm` crate reads
    /// without repacking), its output is `x·Wᵀ + b` as before, and the weight table records the
    /// layer's own storage (a view), not the checkpoint's tensor it let go of.
    #[test]
    fn linear_weights_lie_in_out_and_the_table_shares_them() {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (6, 5), &dev).unwrap();
        let b = Tensor::randn(0f32, 1.0, 6, &dev).unwrap();
        let tensors = HashMap::from([
            ("l.weight".to_string(), w.clone()),
            ("l.bias".to_string(), b.clone()),
        ]);
        let (layer, table) = recorded(&tensors, |vb| linear(5, 6, vb.pp("l")));
        assert!(
            layer.weight().t().unwrap().is_contiguous(),
            "values laid out [in, out]"
        );
        assert!(same_values(&layer.weight().contiguous().unwrap(), &w));
        let recorded = table.get("l.weight").unwrap();
        assert_eq!(
            first_value(recorded),
            first_value(layer.weight()),
            "the table shares the layer's values"
        );
        assert_eq!(recorded.dims(), &[6, 5]);
        // The output is the same as with the checkpoint's layout, within rounding.
        let x = Tensor::randn(0f32, 1.0, (2, 3, 5), &dev).unwrap();
        let want = x
            .broadcast_matmul(&w.t().unwrap())
            .unwrap()
            .broadcast_add(&b)
            .unwrap();
        let err = (layer.forward(&x).unwrap() - want)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap();
        assert!(err.to_scalar::<f32>().unwrap() < 1e-5);
        // A layer built again from its own view (a rebuild for a LoRA) makes no copy.
        let again = Linear::new(layer.weight().clone(), None).unwrap();
        assert_eq!(first_value(again.weight()), first_value(layer.weight()));
    }

    /// The fused projections of self-attention (q, k, v) and cross-attention (k, v): the table
    /// records each checkpoint tensor as its rows of the layer's own values.
    #[test]
    fn fused_projections_are_recorded_as_views_of_the_layer() {
        let dev = Device::Cpu;
        let (dim, context) = (8, 4);
        for context_dim in [None, Some(context)] {
            let kv_dim = context_dim.unwrap_or(dim);
            let mut tensors = HashMap::new();
            for (leaf, width) in [("to_q", dim), ("to_k", kv_dim), ("to_v", kv_dim)] {
                tensors.insert(
                    format!("a.{leaf}.weight"),
                    Tensor::randn(0f32, 1.0, (dim, width), &dev).unwrap(),
                );
            }
            tensors.insert(
                "a.to_out.0.weight".into(),
                Tensor::randn(0f32, 1.0, (dim, dim), &dev).unwrap(),
            );
            tensors.insert(
                "a.to_out.0.bias".into(),
                Tensor::randn(0f32, 1.0, dim, &dev).unwrap(),
            );
            let (attention, table) = recorded(&tensors, |vb| {
                Attention::new(dim, context_dim, 2, 4, false, vb.pp("a"))
            });
            let fused = match &attention.to_kv {
                Some(kv) => kv.weight(),
                None => attention.to_q_or_qkv.weight(),
            };
            for (i, leaf) in ["to_k", "to_v"].iter().enumerate() {
                let name = format!("a.{leaf}.weight");
                let recorded = table.get(&name).unwrap();
                let rows = if context_dim.is_some() {
                    i * dim
                } else {
                    (i + 1) * dim
                };
                assert_eq!(
                    first_value(recorded),
                    first_value(&fused.i(rows..).unwrap()),
                    "{name}"
                );
                assert!(
                    same_values(&recorded.contiguous().unwrap(), &tensors[&name]),
                    "{name}"
                );
            }
            let q = table.get("a.to_q.weight").unwrap();
            assert_eq!(first_value(q), first_value(attention.to_q_or_qkv.weight()));
        }
    }
}
