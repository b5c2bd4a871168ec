//! The activations the networks' configs name (diffusers' `get_activation` names), one type for
//! the UNet, the ControlNet, the VAE and TAESD.

use candle_core::{Module, Tensor};

use crate::kernels::conv::{Conv2d, Epilogue};
use crate::kernels::norm::GroupNorm;
use crate::{Error, Result};

/// An activation a config names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// `silu` / `swish`.
    Silu,
    /// `gelu` (exact, erf-based, as `torch.nn.GELU()`).
    Gelu,
    /// `relu`.
    Relu,
    /// `mish`.
    Mish,
}

impl Activation {
    /// The names [`from_name`](Self::from_name) takes, for error messages.
    pub const NAMES: &str = "silu, swish, gelu, relu, mish";

    /// The activation diffusers' `get_activation` gives for `name`, if this crate has it.
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "silu" | "swish" => Some(Self::Silu),
            "gelu" => Some(Self::Gelu),
            "relu" => Some(Self::Relu),
            "mish" => Some(Self::Mish),
            _ => None,
        }
    }

    /// The activation a config's `field` names; an unknown name is an error naming the field
    /// and the names there are.
    pub fn from_config(name: &str, field: &str) -> Result<Self> {
        Self::from_name(name).ok_or_else(|| {
            Error::param(
                field,
                format!(
                    "unsupported activation {name:?} (supported: {})",
                    Self::NAMES
                ),
            )
        })
    }

    /// Applies the activation to `x`.
    pub fn apply(self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Self::Silu => x.silu(),
            Self::Gelu => x.gelu_erf(),
            Self::Relu => x.relu(),
            Self::Mish => candle_nn::ops::mish(x),
        }
    }

    /// `act(norm(x))`, in one pass when the activation is SiLU (the GroupNorm's fused form).
    pub fn after_norm(self, norm: &GroupNorm, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Self::Silu => norm.forward_silu(x),
            other => other.apply(&norm.forward(x)?),
        }
    }

    /// `act(norm(x + add))`, `add` holding each image's value per channel (`[B, C]`, a
    /// resnet's time embedding), added in the GroupNorm's reads where its kernels can
    /// ([`GroupNorm::forward_with_added`]); `x` is consumed (a fresh map).
    pub fn after_norm_added(
        self,
        norm: &GroupNorm,
        x: Tensor,
        add: &Tensor,
    ) -> candle_core::Result<Tensor> {
        match self {
            Self::Silu => norm.forward_with_added(x, add, true),
            other => other.apply(&norm.forward_with_added(x, add, false)?),
        }
    }

    /// `act(conv(x))`, with ReLU fused into the convolution's epilogue.
    pub fn after_conv(self, conv: &Conv2d, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Self::Relu => conv.forward_with(
                x,
                1,
                Epilogue {
                    residual: None,
                    relu: true,
                },
            ),
            other => other.apply(&conv.forward(x)?),
        }
    }
}
