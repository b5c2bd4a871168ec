//! The one adapter from a source of named tensors to candle's [`SimpleBackend`]. Both backends
//! the networks are built over (the checked load from a weights file, and the rebuild from a
//! loaded network's weight table) hand out a tensor by name, checking its shape when the
//! constructor gives one; they differ only in where the tensor comes from.

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::VarBuilder;
use candle_nn::var_builder::SimpleBackend;

/// Where a network's constructor gets its tensors from.
pub(crate) trait TensorSource: Send + Sync + 'static {
    /// The tensor `name` in `dtype` on `device`; `shape`, when the constructor gives one, is the
    /// shape it must have.
    fn tensor(
        &self,
        name: &str,
        shape: Option<&Shape>,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Tensor>;

    /// Whether the source holds `name`.
    fn holds(&self, name: &str) -> bool;
}

/// A [`VarBuilder`] over `source`, handing out tensors in `dtype` on `device`.
pub(crate) fn var_builder(
    source: impl TensorSource,
    dtype: DType,
    device: &Device,
) -> VarBuilder<'static> {
    VarBuilder::from_backend(Box::new(Backend(source)), dtype, device.clone())
}

struct Backend<S>(S);

impl<S: TensorSource> SimpleBackend for Backend<S> {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        self.0.tensor(name, Some(&s), dtype, dev)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.0.tensor(name, None, dtype, dev)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.0.holds(name)
    }
}
