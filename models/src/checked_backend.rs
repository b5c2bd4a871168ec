//! The loading backend every network is built over: it checks each tensor a constructor asks
//! for against a [`WeightsFile`]'s header before reading it (a probe that reads nothing, then
//! the real load), fuses LoRA deltas into the tensors they target, and records what it handed
//! out. Apart from the file reader (`weights.rs`), so that reading files and fusing LoRAs do
//! not import each other: `lora` reads its files through `weights`, and this module uses both.

use std::cell::Cell;
use std::collections::BTreeSet;
use std::sync::{Arc, Mutex, PoisonError};

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::VarBuilder;

use crate::lora::LoraDeltas;
use crate::tensor_source::{self, TensorSource};
use crate::weights::WeightsFile;

thread_local! {
    /// Bytes of the tensors this thread's loading backends have handed out, ever.
    static LOADED_BYTES: Cell<u64> = const { Cell::new(0) };
}

/// The bytes of every tensor loaded on this thread so far (a running total): the difference
/// across a load is the size of what it loaded, in the target dtype. A thread-local counter
/// because networks are built synchronously on the caller's thread, and it spares every
/// network constructor a byte count in its signature.
pub fn loaded_bytes() -> u64 {
    LOADED_BYTES.with(Cell::get)
}

/// What a [`CheckedBackend`] hands out: zero-stride stand-ins (probe) or the stored tensors.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Compares each tensor with the header and hands back a zero-stride stand-in, reading nothing.
    Probe,
    /// Reads each tensor from the file.
    Load,
}

/// A [`SimpleBackend`] that checks every requested tensor against the header before touching
/// its bytes, and records the names it handed out.
pub struct CheckedBackend {
    file: Arc<WeightsFile>,
    mode: Mode,
    used: Arc<Mutex<BTreeSet<String>>>,
    /// Probe only: f16 zeros as many as the file's largest tensor holds. Every stand-in is a
    /// contiguous view of it, so the few weights a constructor copies (fused attention
    /// projections, reshaped 1×1 convolutions) copy at memory speed; zero-stride stand-ins
    /// would be copied element by element.
    zeros: Option<Tensor>,
    /// LoRA deltas to fuse into the tensors they target (see [`crate::lora`]).
    lora: Option<Arc<LoraDeltas>>,
}

impl CheckedBackend {
    /// A [`VarBuilder`] over `file` in `mode`, and the set of names it hands out.
    ///
    /// The probe works on the CPU in f16 whatever the target: every constructor accepts it, it
    /// is half the bytes of f32 for the few weights a constructor copies (fused attention
    /// projections), and it avoids the f32 copies a bf16 convolution keeps on the CPU.
    pub fn var_builder(
        file: Arc<WeightsFile>,
        mode: Mode,
        dtype: DType,
        device: &Device,
        lora: Option<Arc<LoraDeltas>>,
    ) -> (VarBuilder<'static>, Arc<Mutex<BTreeSet<String>>>) {
        let used = Arc::new(Mutex::new(BTreeSet::new()));
        let (dtype, device, zeros) = match mode {
            Mode::Probe => {
                let largest = file.largest_float_elements();
                // Bounded by the file's own contents (header checked against its size).
                let zeros = Tensor::zeros(largest, DType::F16, &Device::Cpu).ok();
                (DType::F16, Device::Cpu, zeros)
            }
            Mode::Load => (dtype, device.clone(), None),
        };
        let backend = Self {
            file,
            mode,
            used: used.clone(),
            zeros,
            lora,
        };
        (tensor_source::var_builder(backend, dtype, &device), used)
    }

    /// A zero tensor of `shape` standing in for a stored one, without reading it.
    fn stand_in(&self, shape: &[usize], dtype: DType) -> candle_core::Result<Tensor> {
        let elements = shape.iter().product::<usize>();
        match &self.zeros {
            Some(zeros) if dtype == zeros.dtype() && elements <= zeros.elem_count() => {
                zeros.narrow(0, 0, elements)?.reshape(shape)
            }
            _ => Tensor::zeros((), dtype, &Device::Cpu)?.broadcast_as(shape),
        }
    }

    fn fetch(
        &self,
        name: &str,
        shape: Option<&Shape>,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Tensor> {
        let stored_shape = self
            .file
            .checked_shape(name, shape.map(Shape::dims))
            .map_err(candle_core::Error::Msg)?;
        let lora = self.lora.as_ref().filter(|l| l.targets(name));
        if let Some(lora) = lora {
            lora.check_fits(name, stored_shape)
                .map_err(candle_core::Error::Msg)?;
        }
        let tensor = match self.mode {
            Mode::Probe => self.stand_in(stored_shape, dtype)?,
            Mode::Load => {
                let tensor = match lora {
                    // Fused in f32 on the CPU, as diffusers' fuse_lora does on an f32 model.
                    Some(lora) => {
                        let base = self.file.load_stored(name, &Device::Cpu)?;
                        lora.fuse(name, &base.to_dtype(DType::F32)?)?
                            .to_dtype(dtype)?
                            .to_device(device)?
                    }
                    None => self.file.load_stored(name, device)?.to_dtype(dtype)?,
                };
                let bytes = tensor.elem_count() * tensor.dtype().size_in_bytes();
                LOADED_BYTES.with(|total| total.set(total.get() + bytes as u64));
                crate::weight_table::record(name, &tensor);
                tensor
            }
        };
        self.used
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(name.to_string());
        Ok(tensor)
    }
}

impl TensorSource for CheckedBackend {
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
        self.file.contains(name)
    }
}
