//! The tensors a network was built from, kept by name, so that a change of its LoRAs can rebuild
//! it from memory instead of reading its files again.
//!
//! While a network loads (the loading pass of [`super::open_component_with_lora`]), every tensor
//! the weights backend hands to its constructor is recorded here. The table holds the same
//! tensors the network holds (same storage), so it costs no memory of its own; where a
//! constructor copies weights into a new tensor (the fused attention projections, bf16
//! convolutions the CPU keeps in f32), it records the copy in place of what it was given
//! ([`record`], [`record_rows`]; the kernels report theirs through
//! `sdstream_kernels::substitutes`) and the table still shares the network's storage.
//!
//! [`rebuild_with_lora`] builds the same network again over a [`RebuildBackend`]: a tensor no
//! LoRA touches is handed out as it is (shared, not copied); a tensor the old or the new LoRA
//! set patches is recomputed in f32 as W − Σ old w·Δ + Σ new w·Δ (unfuse, then fuse: what
//! diffusers' `unfuse_lora` + `fuse_lora` do) and cast back.

use std::cell::RefCell;
use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex, PoisonError};

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::VarBuilder;

use crate::lora::LoraDeltas;
use crate::tensor_source::{self, TensorSource};
use crate::{Error, Result};

thread_local! {
    /// The table being recorded on this thread (loads run their constructors synchronously).
    static RECORDING: RefCell<Option<HashMap<String, Tensor>>> = const { RefCell::new(None) };
}

/// A network's tensors by their checkpoint names, sharing the network's storage.
#[derive(Debug, Clone, Default)]
pub struct WeightTable(Arc<HashMap<String, Tensor>>);

impl WeightTable {
    /// Number of tensors.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether the table holds no tensor (a network built outside a recorded load).
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The tensor recorded under `name`.
    #[cfg(test)]
    pub fn get(&self, name: &str) -> Option<&Tensor> {
        self.0.get(name)
    }
}

/// Runs `build` with recording on, and returns what it built with the tensors it was handed.
pub fn recording<M>(build: impl FnOnce() -> Result<M>) -> Result<(M, WeightTable)> {
    let previous = RECORDING.with(|r| r.replace(Some(HashMap::new())));
    let (built, substitutes) = sdstream_kernels::substitutes::collecting(build);
    let mut table = RECORDING.with(|r| r.replace(previous)).unwrap_or_default();
    // The copies the kernels keep (f32 convolution weights for bf16 ones on the CPU) in place
    // of what the backend handed them: the table shares the network's storage.
    table.extend(substitutes);
    built.map(|m| (m, WeightTable(Arc::new(table))))
}

/// Records `tensor` under `name` when a table is being recorded (else does nothing): what a
/// weights backend hands out, or the copy a constructor keeps instead of what it was handed.
pub fn record(name: &str, tensor: &Tensor) {
    RECORDING.with(|r| {
        if let Some(table) = r.borrow_mut().as_mut() {
            table.insert(name.to_string(), tensor.clone());
        }
    });
}

/// After a constructor concatenated the tensors `names` (in order, along dim 0) into `fused`,
/// records each as its rows of `fused`, so that the table keeps views of the network's tensor
/// rather than the separate tensors the constructor let go of.
pub fn record_rows(names: &[String], fused: &Tensor) -> candle_core::Result<()> {
    RECORDING.with(|r| {
        let mut r = r.borrow_mut();
        let Some(table) = r.as_mut() else {
            return Ok(());
        };
        let mut start = 0;
        for name in names {
            let Some(rows) = table
                .get(name)
                .map(|t| t.dims().first().copied().unwrap_or(0))
            else {
                continue;
            };
            table.insert(name.clone(), fused.narrow(0, start, rows)?);
            start += rows;
        }
        Ok(())
    })
}

/// Builds a network again from `table` (what it was built from, with `old` LoRA deltas fused)
/// with `new` deltas fused instead, through `build` (the network's constructor), in `dtype` on
/// `device`. Every delta of `new` must fit the tensor it patches and find one, as at a load.
/// Returns the network and its own table.
pub fn rebuild_with_lora<C, M>(
    config: &C,
    table: &WeightTable,
    dtype: DType,
    device: &Device,
    old: Option<Arc<LoraDeltas>>,
    new: Option<Arc<LoraDeltas>>,
    build: impl Fn(&C, VarBuilder<'static>) -> Result<M>,
) -> Result<(M, WeightTable)> {
    if table.is_empty() {
        return Err(Error::State(
            "the loaded network kept no weights to rebuild from".into(),
        ));
    }
    let used = Arc::new(Mutex::new(BTreeSet::new()));
    let backend = RebuildBackend {
        table: table.clone(),
        old,
        new: new.clone(),
        used: used.clone(),
    };
    let vb = tensor_source::var_builder(backend, dtype, device);
    let (model, table) = recording(|| build(config, vb))?;
    if let Some(new) = &new {
        new.check_all_targeted(&used.lock().unwrap_or_else(PoisonError::into_inner))?;
    }
    Ok((model, table))
}

/// Hands out a recorded network's tensors, with LoRA deltas unfused and fused where they
/// patch (see the module documentation).
struct RebuildBackend {
    table: WeightTable,
    old: Option<Arc<LoraDeltas>>,
    new: Option<Arc<LoraDeltas>>,
    used: Arc<Mutex<BTreeSet<String>>>,
}

impl RebuildBackend {
    fn fetch(
        &self,
        name: &str,
        shape: Option<&Shape>,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Tensor> {
        let base = self.table.0.get(name).ok_or_else(|| {
            candle_core::Error::Msg(format!("the loaded network has no tensor `{name}`"))
        })?;
        if let Some(shape) = shape
            && base.shape() != shape
        {
            candle_core::bail!(
                "tensor `{name}` is {:?} in the loaded network, {:?} asked",
                base.dims(),
                shape.dims()
            );
        }
        let old = self.old.as_ref().filter(|l| l.targets(name));
        let new = self.new.as_ref().filter(|l| l.targets(name));
        let tensor = if old.is_none() && new.is_none() {
            // Shared with the loaded network: same storage (to_dtype/to_device of a tensor
            // already there are cheap clones).
            base.to_dtype(dtype)?.to_device(device)?
        } else {
            if let Some(new) = new {
                new.check_fits(name, base.dims())
                    .map_err(candle_core::Error::Msg)?;
            }
            // In f32 on the CPU, as a load fuses.
            let mut w = base.to_device(&Device::Cpu)?.to_dtype(DType::F32)?;
            if let Some(old) = old {
                w = old.unfuse(name, &w)?;
            }
            if let Some(new) = new {
                w = new.fuse(name, &w)?;
            }
            w.to_dtype(dtype)?.to_device(device)?
        };
        record(name, &tensor);
        self.used
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(name.to_string());
        Ok(tensor)
    }
}

impl TensorSource for RebuildBackend {
    fn tensor(
        &self,
        name: &str,
        shape: Option<&Shape>,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Tensor> {
        self.fetch(name, shape, dtype, device)
    }

    fn holds(&self, name: &str) -> bool {
        self.table.0.contains_key(name)
    }
}
