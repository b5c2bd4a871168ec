//! What the fused library calls share (cuDNN's convolution with its epilogue, `cudnn_conv`;
//! cuBLASLt's linear layer with its epilogue, `cublaslt_linear`): a residual operand checked
//! against the output it is added to, and the rule for a configuration the library refuses.

use std::cell::RefCell;
use std::collections::HashSet;
use std::hash::Hash;
use std::thread::LocalKey;

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::CudaDType;
use candle_core::cuda_backend::cudarc::driver::CudaView;
use candle_core::{DType, Layout, Storage};

/// `run()` unless this thread saw the library refuse `key` before. A refusal is warned once
/// (`refusal` says what was refused, given the error) and remembered in `refused`; `None` then,
/// and from then on for that key, leaves the caller to run the separate ops.
pub(crate) fn unless_refused<K: Hash + Eq + 'static, T>(
    refused: &'static LocalKey<RefCell<HashSet<K>>>,
    key: K,
    run: impl FnOnce() -> candle_core::Result<T>,
    refusal: impl FnOnce(&K, &candle_core::Error) -> String,
) -> candle_core::Result<Option<T>> {
    if refused.with(|r| r.borrow().contains(&key)) {
        return Ok(None);
    }
    match run() {
        Ok(value) => Ok(Some(value)),
        Err(e) => {
            tracing::warn!("{}", refusal(&key, &e));
            refused.with(|r| r.borrow_mut().insert(key));
            Ok(None)
        }
    }
}

/// The residual a fused call adds (its storage, held read-locked for the call, and layout) as a
/// view of `T`s on the device, checked to be contiguous and of the output's dims and dtype;
/// `op` names the call in the errors.
pub(crate) fn residual_view<'a, T: CudaDType>(
    storage: &'a Storage,
    layout: &Layout,
    out_dims: &[usize],
    dtype: DType,
    op: &str,
) -> candle_core::Result<CudaView<'a, T>> {
    let Storage::Cuda(storage) = storage else {
        candle_core::bail!("{op}: the residual is not on the device")
    };
    let Some((r0, r1)) = layout.contiguous_offsets() else {
        candle_core::bail!("{op}: the residual is not contiguous")
    };
    if layout.dims() != out_dims || storage.dtype() != dtype {
        candle_core::bail!(
            "{op}: residual {:?} {:?} for an output {out_dims:?} {dtype:?}",
            layout.dims(),
            storage.dtype()
        );
    }
    Ok(storage.as_cuda_slice::<T>()?.slice(r0..r1))
}
