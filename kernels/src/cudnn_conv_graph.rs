//! Channels-last convolutions (with their bias, residual and ReLU where asked) as graphs of
//! cuDNN's backend API, each geometry's engine chosen by timing (feature `cudnn`, kernel policy
//! `cuda_conv_engines`).
//!
//! The legacy call that `cudnn_conv` makes names one algorithm, the implicit-precomputed GEMM,
//! and cuDNN runs whichever of its engines stands behind that name; its fused call takes an
//! identity activation with that algorithm only. The backend API offers every engine cuDNN has
//! for a graph, ranked by its heuristic, each with notes on its arithmetic. Here each geometry
//! (batch, sizes, channels, padding, stride, dtype, epilogue) gets the engines of heuristic
//! mode A (the fallback mode's where mode A has none) whose notes keep the plain formula's
//! arithmetic: no Winograd or FFT transforms (they rounded f16 too coarsely on the tiny full
//! VAE, see `cudnn_conv`), no inputs converted down or sums kept in a narrower type, nothing
//! non-deterministic (same seed, same picture), and no tensor cores for f32 (TF32 would round
//! its operands; the f32 goldens hold without). Up to [`CANDIDATES`] of them are built and
//! timed on the call's own operands, on the geometry's first (eager) call, and the fastest
//! kept, as torch's `cudnn.benchmark` does: its plan for the thread, and the choice for the
//! process, so that another thread meeting the geometry builds that plan without timing. The
//! epilogue is part of the graph (pointwise nodes after the convolution, in f32, rounded once
//! to the storage type), so any engine that fuses it may run it.
//!
//! Nothing is built while a CUDA graph is being captured (building may compile a kernel and
//! allocate); the caller then runs the legacy call, as it does where cuDNN refuses a geometry
//! (remembered per thread, said once per process).

use std::cell::RefCell;
use std::collections::HashMap;
use std::ffi::c_void;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{LazyLock, Mutex};

use candle_core::DType;
use candle_core::cuda_backend::DeviceId;
use candle_core::cuda_backend::cudarc::cudnn::sys;
use candle_core::cuda_backend::cudarc::driver::sys::{CUdeviceptr, CUevent_flags};

use super::conv::EngineChoices;
use super::cudnn_backend::{
    self, Attr, Descriptor, EngineInfo, F32, Kind, Role, Type, engine_configs, engine_info,
    pointwise, tensor,
};

use sys::cudnnBackendNumericalNote_t as Note;

/// How many acceptable engine configurations a geometry's choice builds and times at most.
pub(crate) const CANDIDATES: usize = 4;
/// How many of those may be engines whose plans compile their kernel as they are built
/// (NVRTC, a fraction of a second or more each): the rest of the heuristic's order is skipped
/// past them.
const COMPILED_CANDIDATES: usize = 2;
/// Timed runs of each candidate, after one untimed run (which loads its kernel).
const TIMED_RUNS: usize = 3;

/// One convolution's shape: the channels-last input `[B, H, W, C_in]`, the filter as its tensor
/// holds it (`[C_out, kh, kw, C_in]`, cuDNN's NHWC filter layout), symmetric padding, stride.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct Geometry {
    pub(crate) input: [usize; 4],
    pub(crate) filter: [usize; 4],
    pub(crate) padding: usize,
    pub(crate) stride: usize,
}

impl Geometry {
    /// The output's dims, `[B, H_out, W_out, C_out]`; `None` where the filter does not fit.
    pub(crate) fn output(&self) -> Option<[usize; 4]> {
        let [b, h, w, c] = self.input;
        let [k, r, s, wc] = self.filter;
        let (p, st) = (self.padding, self.stride);
        if wc != c || st == 0 || h + 2 * p < r || w + 2 * p < s {
            return None;
        }
        Some([b, (h + 2 * p - r) / st + 1, (w + 2 * p - s) / st + 1, k])
    }
}

/// What the graph applies after the convolution, in this order: `+ residual` (the output's
/// shape), `+ bias` (`[C_out]`), ReLU. The order of the legacy fused call's formula, and the one
/// cuDNN's precompiled fused engines take: with the bias added before the residual, cuDNN 9.19
/// offers an H100 only an engine that compiles its kernel at build (engine 7, 3
/// configurations), in this order 38 to 40 configurations of the precompiled engine 41.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub(crate) struct Epilogue {
    pub(crate) bias: bool,
    pub(crate) residual: bool,
    pub(crate) relu: bool,
}

/// The tensors the variant pack names.
const X: i64 = 1;
const W: i64 = 2;
const Y: i64 = 3;
const BIAS: i64 = 4;
const RESIDUAL: i64 = 5;
/// The first id of the graph's virtual tensors.
const VIRTUAL: i64 = 100;

/// Whether an engine with these numerical notes computes what the plain formula computes, to
/// the summation order: f32 sums of the storage type's values, no transform, deterministic.
/// `f32_storage`: the tensors are f32, where tensor cores mean TF32 operands.
pub(crate) fn notes_allow(notes: &[Note], f32_storage: bool) -> bool {
    notes.iter().all(|note| match note {
        Note::CUDNN_NUMERICAL_NOTE_TENSOR_CORE => !f32_storage,
        Note::CUDNN_NUMERICAL_NOTE_DOWN_CONVERT_INPUTS
        | Note::CUDNN_NUMERICAL_NOTE_REDUCED_PRECISION_REDUCTION
        | Note::CUDNN_NUMERICAL_NOTE_FFT
        | Note::CUDNN_NUMERICAL_NOTE_NONDETERMINISTIC
        | Note::CUDNN_NUMERICAL_NOTE_WINOGRAD
        | Note::CUDNN_NUMERICAL_NOTE_WINOGRAD_TILE_4x4
        | Note::CUDNN_NUMERICAL_NOTE_WINOGRAD_TILE_6x6
        | Note::CUDNN_NUMERICAL_NOTE_WINOGRAD_TILE_13x13 => false,
        // Strict NaN propagation, and notes of later releases: nothing about the sums.
        _ => true,
    })
}

/// cuDNN's dims (n, c, h, w order whatever the layout) and the strides of a channels-last
/// tensor `[n, h, w, c]`.
fn nhwc([n, h, w, c]: [usize; 4]) -> ([i64; 4], [i64; 4]) {
    let [n, h, w, c] = [n, h, w, c].map(|v| v as i64);
    ([n, c, h, w], [h * w * c, 1, w * c, c])
}

/// The graph's operations and every descriptor they refer to (kept alive with them).
struct Graph {
    operations: Vec<Descriptor>,
    _parts: Vec<Descriptor>,
}

impl Graph {
    fn new(
        geometry: Geometry,
        epilogue: Epilogue,
        dtype: sys::cudnnDataType_t,
    ) -> candle_core::Result<Self> {
        use sys::cudnnPointwiseMode_t as Pw;
        let Some(out) = geometry.output() else {
            candle_core::bail!(
                "sdstream-cudnn-conv-graph: filter {:?} does not fit input {:?} (padding {}, \
                 stride {})",
                geometry.filter,
                geometry.input,
                geometry.padding,
                geometry.stride
            )
        };
        let (x_dims, x_strides) = nhwc(geometry.input);
        // The filter [k, r, s, c] is laid out as a channels-last map of k images.
        let (w_dims, w_strides) = nhwc(geometry.filter);
        let (y_dims, y_strides) = nhwc(out);
        let k = out[3] as i64;
        let x = tensor(X, dtype, &x_dims, &x_strides, Role::Operand)?;
        let w = tensor(W, dtype, &w_dims, &w_strides, Role::Operand)?;
        let mut parts = Vec::new();
        let mut operations = Vec::new();
        // Each step's result: the output where it is the last step, else a virtual f32 map.
        let steps =
            1 + epilogue.bias as usize + epilogue.residual as usize + epilogue.relu as usize;
        let mut uid = VIRTUAL;
        let mut result = |step: usize| -> candle_core::Result<Descriptor> {
            if step + 1 == steps {
                tensor(Y, dtype, &y_dims, &y_strides, Role::Operand)
            } else {
                uid += 1;
                tensor(uid, F32, &y_dims, &y_strides, Role::Virtual)
            }
        };
        let conv = Descriptor::new(Kind::CUDNN_BACKEND_CONVOLUTION_DESCRIPTOR)?;
        conv.set_data_type(Attr::CUDNN_ATTR_CONVOLUTION_COMP_TYPE, F32)?;
        conv.set(
            Attr::CUDNN_ATTR_CONVOLUTION_CONV_MODE,
            Type::CUDNN_TYPE_CONVOLUTION_MODE,
            &[sys::cudnnConvolutionMode_t::CUDNN_CROSS_CORRELATION],
        )?;
        let (p, s) = (geometry.padding as i64, geometry.stride as i64);
        conv.set_i64(Attr::CUDNN_ATTR_CONVOLUTION_SPATIAL_DIMS, &[2])?;
        conv.set_i64(Attr::CUDNN_ATTR_CONVOLUTION_DILATIONS, &[1, 1])?;
        conv.set_i64(Attr::CUDNN_ATTR_CONVOLUTION_FILTER_STRIDES, &[s, s])?;
        conv.set_i64(Attr::CUDNN_ATTR_CONVOLUTION_PRE_PADDINGS, &[p, p])?;
        conv.set_i64(Attr::CUDNN_ATTR_CONVOLUTION_POST_PADDINGS, &[p, p])?;
        let conv = conv.finalize("convolution")?;
        let mut current = result(0)?;
        let op = Descriptor::new(Kind::CUDNN_BACKEND_OPERATION_CONVOLUTION_FORWARD_DESCRIPTOR)?;
        op.set_descriptors(
            Attr::CUDNN_ATTR_OPERATION_CONVOLUTION_FORWARD_CONV_DESC,
            &[&conv],
        )?;
        op.set_descriptors(Attr::CUDNN_ATTR_OPERATION_CONVOLUTION_FORWARD_X, &[&x])?;
        op.set_descriptors(Attr::CUDNN_ATTR_OPERATION_CONVOLUTION_FORWARD_W, &[&w])?;
        op.set_descriptors(
            Attr::CUDNN_ATTR_OPERATION_CONVOLUTION_FORWARD_Y,
            &[&current],
        )?;
        // f32 scalars: the computation's type.
        op.set(
            Attr::CUDNN_ATTR_OPERATION_CONVOLUTION_FORWARD_ALPHA,
            Type::CUDNN_TYPE_FLOAT,
            &[1f32],
        )?;
        op.set(
            Attr::CUDNN_ATTR_OPERATION_CONVOLUTION_FORWARD_BETA,
            Type::CUDNN_TYPE_FLOAT,
            &[0f32],
        )?;
        operations.push(op.finalize("convolution forward")?);
        parts.extend([x, w, conv]);
        let mut step = 1;
        let mut then = |mode: Pw,
                        operand: Option<Descriptor>,
                        current: Descriptor,
                        parts: &mut Vec<Descriptor>,
                        operations: &mut Vec<Descriptor>|
         -> candle_core::Result<Descriptor> {
            let next = result(step)?;
            step += 1;
            let [own, op] = pointwise(mode, &current, operand.as_ref(), &next)?;
            operations.push(op);
            parts.push(own);
            parts.push(current);
            parts.extend(operand);
            Ok(next)
        };
        if epilogue.residual {
            let residual = tensor(RESIDUAL, dtype, &y_dims, &y_strides, Role::Operand)?;
            current = then(
                Pw::CUDNN_POINTWISE_ADD,
                Some(residual),
                current,
                &mut parts,
                &mut operations,
            )?;
        }
        if epilogue.bias {
            let bias = tensor(BIAS, dtype, &[1, k, 1, 1], &[k, 1, k, k], Role::Operand)?;
            current = then(
                Pw::CUDNN_POINTWISE_ADD,
                Some(bias),
                current,
                &mut parts,
                &mut operations,
            )?;
        }
        if epilogue.relu {
            current = then(
                Pw::CUDNN_POINTWISE_RELU_FWD,
                None,
                current,
                &mut parts,
                &mut operations,
            )?;
        }
        parts.push(current);
        Ok(Self {
            operations,
            _parts: parts,
        })
    }

    fn operation_graph(
        &self,
        handle: Option<sys::cudnnHandle_t>,
    ) -> candle_core::Result<Descriptor> {
        cudnn_backend::operation_graph(&self.operations, handle, false)
    }
}

/// The acceptable engine configurations ([`notes_allow`]) cuDNN's heuristic offers for
/// `graph`, best first, with their engines: mode A's, else the fallback mode's. For the device
/// `properties` describe, where given, instead of the handle's.
fn acceptable_configs(
    graph: &Descriptor,
    f32_storage: bool,
    properties: Option<&Descriptor>,
) -> candle_core::Result<Vec<(Descriptor, EngineInfo)>> {
    use sys::cudnnBackendHeurMode_t as Mode;
    for mode in [Mode::CUDNN_HEUR_MODE_A, Mode::CUDNN_HEUR_MODE_FALLBACK] {
        let mut acceptable = Vec::new();
        // A mode may refuse the graph outright; the next is asked.
        let Ok(configs) = engine_configs(graph, mode, properties) else {
            continue;
        };
        for config in configs {
            let info = engine_info(&config)?;
            if notes_allow(&info.numerical_notes, f32_storage) {
                acceptable.push((config, info));
            }
        }
        if !acceptable.is_empty() {
            return Ok(acceptable);
        }
    }
    Ok(Vec::new())
}

/// A geometry's chosen plan, and what it was chosen from.
struct Chosen {
    plan: cudnn_backend::Plan,
    /// cuDNN's index of the chosen engine.
    engine: i64,
    _operation_graph: Descriptor,
    _graph: Graph,
}

/// (device, dtype, geometry, epilogue).
type Key = (DeviceId, DType, Geometry, Epilogue);

thread_local! {
    // Plans are made and used on one thread. A refused geometry is kept as `None`, so that its
    // calls go to the legacy call at once.
    static PLANS: RefCell<HashMap<Key, Option<Rc<Chosen>>>> = RefCell::new(HashMap::new());
}

/// Each geometry's choice in this process: the chosen configuration's position among the
/// acceptable ones in the heuristic's order. A thread that meets a geometry another thread
/// timed builds that plan alone instead of timing again: a cross-stream batcher's rounds of
/// each width run on whichever stream's thread forms them.
static DECIDED: LazyLock<Mutex<HashMap<Key, usize>>> = LazyLock::new(Default::default);

static CALLS: AtomicU64 = AtomicU64::new(0);
static CHOSEN: AtomicU64 = AtomicU64::new(0);
static TIMED: AtomicU64 = AtomicU64::new(0);
static REFUSED: AtomicU64 = AtomicU64::new(0);
static SHARED: AtomicU64 = AtomicU64::new(0);
static CHOOSE_MICROS: AtomicU64 = AtomicU64::new(0);

/// The counts so far ([`EngineChoices`]).
pub(crate) fn engine_choices() -> EngineChoices {
    EngineChoices {
        calls: CALLS.load(Ordering::Relaxed),
        chosen: CHOSEN.load(Ordering::Relaxed),
        timed: TIMED.load(Ordering::Relaxed),
        refused: REFUSED.load(Ordering::Relaxed),
        shared: SHARED.load(Ordering::Relaxed),
        choose_micros: CHOOSE_MICROS.load(Ordering::Relaxed),
    }
}

/// Says, once per geometry in the process, that no chosen engine runs `key` and why.
fn note_refusal(key: &Key, error: &candle_core::Error) {
    static SAID: Mutex<Vec<(DType, Geometry, Epilogue)>> = Mutex::new(Vec::new());
    let mut said = SAID.lock().unwrap_or_else(|e| e.into_inner());
    let shape = (key.1, key.2, key.3);
    if !said.contains(&shape) {
        said.push(shape);
        tracing::warn!(
            "cuDNN's graph API runs no convolution {:?} over {:?} (padding {}, stride {}, {:?}, \
             {:?}); the legacy call runs it: {error}",
            key.2.filter,
            key.2.input,
            key.2.padding,
            key.2.stride,
            key.1,
            key.3
        );
    }
}

/// The device buffers of one call: input, filter, bias and residual where the epilogue has
/// them, and the output (fresh, of the geometry's output dims).
#[derive(Clone, Copy)]
pub(crate) struct Buffers {
    pub(crate) x: CUdeviceptr,
    pub(crate) w: CUdeviceptr,
    pub(crate) bias: Option<CUdeviceptr>,
    pub(crate) residual: Option<CUdeviceptr>,
    pub(crate) y: CUdeviceptr,
}

impl Buffers {
    fn aligned(&self) -> bool {
        [
            Some(self.x),
            Some(self.w),
            self.bias,
            self.residual,
            Some(self.y),
        ]
        .into_iter()
        .flatten()
        .all(|p| p % 16 == 0)
    }

    fn pack(&self) -> (Vec<i64>, Vec<*mut c_void>) {
        let mut uids = vec![X, W, Y];
        let mut pointers = vec![self.x, self.w, self.y];
        if let Some(b) = self.bias {
            uids.push(BIAS);
            pointers.push(b);
        }
        if let Some(r) = self.residual {
            uids.push(RESIDUAL);
            pointers.push(r);
        }
        (
            uids,
            pointers.into_iter().map(|p| p as *mut c_void).collect(),
        )
    }
}

/// Runs the convolution of `geometry` with `epilogue` over `buffers` through this thread's
/// chosen plan, choosing it first where this is the geometry's first call here. `false` where
/// it did not run (a refused geometry, said once; a CUDA graph being captured before the
/// geometry's plan exists; an operand off 16 bytes): the caller runs the legacy call.
///
/// # Safety
/// `buffers` are live device buffers on `dev`'s stream of this thread, of `dtype`: the input
/// and filter of `geometry`'s dims, contiguous channels-last; the bias `C_out` values and the
/// residual of the output's dims where `epilogue` has them; the output of the output's dims,
/// which the call writes entirely (and, while choosing, several times).
pub(crate) unsafe fn forward(
    dev: &candle_core::CudaDevice,
    dtype: DType,
    geometry: Geometry,
    epilogue: Epilogue,
    buffers: Buffers,
) -> candle_core::Result<bool> {
    let cudnn_dtype = match dtype {
        DType::F32 => sys::cudnnDataType_t::CUDNN_DATA_FLOAT,
        DType::F16 => sys::cudnnDataType_t::CUDNN_DATA_HALF,
        DType::BF16 => sys::cudnnDataType_t::CUDNN_DATA_BFLOAT16,
        _ => return Ok(false),
    };
    if buffers.bias.is_some() != epilogue.bias
        || buffers.residual.is_some() != epilogue.residual
        || !buffers.aligned()
    {
        return Ok(false);
    }
    let key: Key = (dev.id(), dtype, geometry, epilogue);
    let chosen = match PLANS.with(|p| p.borrow().get(&key).cloned()) {
        Some(kept) => kept,
        None => {
            if cudnn_backend::capturing(dev)? {
                return Ok(false);
            }
            let began = std::time::Instant::now();
            // SAFETY: the caller's promise, passed on.
            let made = match unsafe { choose(dev, cudnn_dtype, key, buffers) } {
                Ok(chosen) => {
                    CHOSEN.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(
                        "cuDNN engine {} chosen for {:?} over {:?} ({:?}, {:?})",
                        chosen.engine,
                        geometry.filter,
                        geometry.input,
                        dtype,
                        epilogue
                    );
                    Some(Rc::new(chosen))
                }
                Err(refusal) => {
                    REFUSED.fetch_add(1, Ordering::Relaxed);
                    note_refusal(&key, &refusal);
                    None
                }
            };
            CHOOSE_MICROS.fetch_add(began.elapsed().as_micros() as u64, Ordering::Relaxed);
            PLANS.with(|p| p.borrow_mut().insert(key, made.clone()));
            made
        }
    };
    let Some(chosen) = chosen else {
        return Ok(false);
    };
    // SAFETY: the caller's promise; the workspace is the plan's.
    let ran = unsafe { run(dev, &chosen.plan, buffers) };
    if let Err(e) = ran {
        // A plan that fails to run is dropped like a refused one: later calls go to the
        // legacy call at once.
        PLANS.with(|p| p.borrow_mut().insert(key, None));
        note_refusal(&key, &e);
        return Ok(false);
    }
    CALLS.fetch_add(1, Ordering::Relaxed);
    Ok(true)
}

/// Queues `plan` over `buffers` with a workspace of its size.
///
/// # Safety
/// As [`forward`]'s, for the plan's geometry.
unsafe fn run(
    dev: &candle_core::CudaDevice,
    plan: &cudnn_backend::Plan,
    buffers: Buffers,
) -> candle_core::Result<()> {
    use candle_core::cuda_backend::cudarc::driver::DevicePtr;
    let stream = dev.cuda_stream();
    // SAFETY: a scratch buffer cuDNN writes before it reads.
    let workspace = unsafe { dev.alloc::<u8>(plan.workspace.max(1))? };
    // cudarc records no events for candle's per-thread streams; the address stays valid while
    // `workspace` lives, past the queued call (the allocator is stream-ordered).
    let (w_ptr, _guard) = workspace.device_ptr(&stream);
    let (uids, pointers) = buffers.pack();
    // SAFETY: the caller's promise; the workspace holds what the plan asked for.
    unsafe { plan.execute(&uids, &pointers, w_ptr as *mut c_void) }
}

/// Builds up to [`CANDIDATES`] plans of the acceptable engines for `key`'s geometry and keeps
/// the one whose [`TIMED_RUNS`] runs over `buffers` took least time on the device (the first
/// that builds, where only one does).
///
/// # Safety
/// As [`forward`]'s.
unsafe fn choose(
    dev: &candle_core::CudaDevice,
    cudnn_dtype: sys::cudnnDataType_t,
    key: Key,
    buffers: Buffers,
) -> candle_core::Result<Chosen> {
    let (_, dtype, geometry, epilogue) = key;
    let stream = dev.cuda_stream();
    let handle = cudnn_backend::handle_for_building(dev)?;
    let graph = Graph::new(geometry, epilogue, cudnn_dtype)?;
    let operation_graph = graph.operation_graph(Some(handle.0))?;
    let mut acceptable = acceptable_configs(&operation_graph, dtype == DType::F32, None)?;
    // Another thread timed this geometry: its choice (a position in the heuristic's order,
    // which is the same for the same graph and device) is built alone.
    let decided = DECIDED
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get(&key)
        .copied();
    if let Some(position) = decided.filter(|&p| p < acceptable.len()) {
        let (config, info) = acceptable.swap_remove(position);
        if let Ok(plan) = cudnn_backend::Plan::build(&handle, config, None) {
            SHARED.fetch_add(1, Ordering::Relaxed);
            return Ok(Chosen {
                plan,
                engine: info.index,
                _operation_graph: operation_graph,
                _graph: graph,
            });
        }
        // Not built here: this thread chooses for itself.
        acceptable = acceptable_configs(&operation_graph, dtype == DType::F32, None)?;
    }
    let mut built = Vec::new();
    let mut compiled = 0;
    let mut last_refusal = None;
    for (position, (config, info)) in acceptable.into_iter().enumerate() {
        if built.len() == CANDIDATES {
            break;
        }
        if info.runtime_compiled {
            if compiled == COMPILED_CANDIDATES {
                continue;
            }
            compiled += 1;
        }
        match cudnn_backend::Plan::build(&handle, config, None) {
            Ok(plan) => built.push((plan, info.index, position)),
            Err(e) => last_refusal = Some(e),
        }
    }
    if built.is_empty() {
        return Err(last_refusal.unwrap_or_else(|| {
            candle_core::Error::Msg(
                "sdstream-cudnn-conv-graph: cuDNN offers no engine that keeps the plain \
                 arithmetic for this convolution"
                    .into(),
            )
        }));
    }
    let mut best = 0;
    if built.len() > 1 {
        let event = |s: &std::sync::Arc<candle_core::cuda_backend::cudarc::driver::CudaStream>| {
            s.record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
                .map_err(|e| candle_core::Error::Msg(format!("sdstream-cudnn-conv-graph: {e:?}")))
        };
        let mut fastest = f32::INFINITY;
        for (i, (plan, ..)) in built.iter().enumerate() {
            // SAFETY: the caller's promise; every run writes the whole output.
            unsafe { run(dev, plan, buffers) }?;
            let start = event(&stream)?;
            for _ in 0..TIMED_RUNS {
                // SAFETY: as above.
                unsafe { run(dev, plan, buffers) }?;
            }
            let end = event(&stream)?;
            let ms = start.elapsed_ms(&end).map_err(|e| {
                candle_core::Error::Msg(format!("sdstream-cudnn-conv-graph: {e:?}"))
            })?;
            TIMED.fetch_add(1, Ordering::Relaxed);
            if ms < fastest {
                fastest = ms;
                best = i;
            }
        }
    } else {
        TIMED.fetch_add(1, Ordering::Relaxed);
    }
    let (plan, engine, position) = built.swap_remove(best);
    DECIDED
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(key, position);
    Ok(Chosen {
        plan,
        engine,
        _operation_graph: operation_graph,
        _graph: graph,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_plain_arithmetic_is_acceptable() {
        use Note::*;
        assert!(notes_allow(&[], true));
        assert!(notes_allow(&[], false));
        // Tensor cores: f16/bf16 operands as they are, f32 ones rounded to TF32.
        assert!(notes_allow(&[CUDNN_NUMERICAL_NOTE_TENSOR_CORE], false));
        assert!(!notes_allow(&[CUDNN_NUMERICAL_NOTE_TENSOR_CORE], true));
        for refused in [
            CUDNN_NUMERICAL_NOTE_DOWN_CONVERT_INPUTS,
            CUDNN_NUMERICAL_NOTE_REDUCED_PRECISION_REDUCTION,
            CUDNN_NUMERICAL_NOTE_FFT,
            CUDNN_NUMERICAL_NOTE_NONDETERMINISTIC,
            CUDNN_NUMERICAL_NOTE_WINOGRAD,
            CUDNN_NUMERICAL_NOTE_WINOGRAD_TILE_4x4,
            CUDNN_NUMERICAL_NOTE_WINOGRAD_TILE_6x6,
            CUDNN_NUMERICAL_NOTE_WINOGRAD_TILE_13x13,
        ] {
            for f32_storage in [false, true] {
                assert!(!notes_allow(&[refused], f32_storage), "{refused:?}");
                assert!(
                    !notes_allow(&[CUDNN_NUMERICAL_NOTE_TENSOR_CORE, refused], f32_storage),
                    "{refused:?} after tensor cores"
                );
            }
        }
    }

    #[test]
    fn output_dims_follow_padding_and_stride() {
        let g = |input, filter, padding, stride| Geometry {
            input,
            filter,
            padding,
            stride,
        };
        assert_eq!(
            g([2, 64, 64, 320], [320, 3, 3, 320], 1, 1).output(),
            Some([2, 64, 64, 320])
        );
        assert_eq!(
            g([1, 64, 64, 320], [320, 3, 3, 320], 1, 2).output(),
            Some([1, 32, 32, 320])
        );
        // TAESD's stride-2 convolutions of even maps padded by one.
        assert_eq!(
            g([1, 512, 512, 64], [64, 3, 3, 64], 1, 2).output(),
            Some([1, 256, 256, 64])
        );
        assert_eq!(
            g([1, 8, 8, 2560], [1280, 1, 1, 2560], 0, 1).output(),
            Some([1, 8, 8, 1280])
        );
        // Channels that differ, a filter larger than the padded map, stride 0.
        assert_eq!(g([1, 8, 8, 4], [8, 3, 3, 5], 1, 1).output(), None);
        assert_eq!(g([1, 2, 2, 4], [8, 5, 5, 4], 1, 1).output(), None);
        assert_eq!(g([1, 8, 8, 4], [8, 3, 3, 4], 1, 0).output(), None);
    }

    /// The convolutions of sd-turbo's UNet and TAESD at 512² (channels-last, `[B, H, W, C]`
    /// inputs, `[C_out, kh, kw, C_in]` filters), with the epilogues their layers ask for.
    fn network_geometries() -> Vec<(&'static str, Geometry, Epilogue)> {
        let plain = Epilogue::default();
        let bias = Epilogue {
            bias: true,
            ..plain
        };
        let residual = Epilogue {
            bias: true,
            residual: true,
            relu: false,
        };
        let relu = Epilogue {
            bias: true,
            residual: false,
            relu: true,
        };
        let all = Epilogue {
            bias: true,
            residual: true,
            relu: true,
        };
        let conv = |b, hw, c_in, c_out, k, stride| Geometry {
            input: [b, hw, hw, c_in],
            filter: [c_out, k, k, c_in],
            padding: k / 2,
            stride,
        };
        vec![
            ("unet conv_in", conv(1, 64, 4, 320, 3, 1), bias),
            ("unet 64² resnet", conv(1, 64, 320, 320, 3, 1), plain),
            (
                "unet 64² resnet, skip",
                conv(1, 64, 320, 320, 3, 1),
                residual,
            ),
            ("unet downsample", conv(1, 64, 320, 320, 3, 2), bias),
            ("unet 32² resnet in", conv(1, 32, 320, 640, 3, 1), bias),
            ("unet 32² shortcut", conv(1, 32, 320, 640, 1, 1), bias),
            ("unet 16² resnet", conv(1, 16, 1280, 1280, 3, 1), bias),
            ("unet 8² up resnet", conv(1, 8, 2560, 1280, 3, 1), bias),
            ("unet 64² up resnet", conv(1, 64, 960, 320, 3, 1), bias),
            (
                "unet 64² resnet, 8 rows",
                conv(8, 64, 320, 320, 3, 1),
                residual,
            ),
            ("taesd 512² block", conv(1, 512, 64, 64, 3, 1), relu),
            ("taesd 512² block end", conv(1, 512, 64, 64, 3, 1), all),
            ("taesd 256² stride 2", conv(1, 512, 64, 64, 3, 2), plain),
            ("taesd encoder in", conv(1, 512, 3, 64, 3, 1), bias),
            ("taesd decoder out", conv(1, 512, 64, 3, 3, 1), bias),
        ]
    }

    /// cuDNN's heuristic offers engines that keep the plain arithmetic ([`notes_allow`]) for
    /// the networks' convolutions, with and without their epilogues, asked for an H100 without
    /// a device (cuDNN 9.8 and later), and cuDNN finalizes the first one's plan for those
    /// properties (measured with cuDNN 9.19: 45 of 45, all three dtypes; f16 asserted). Needs
    /// the real libcudnn on the library path and a libcuda that loads:
    /// `bash scripts/cudnn-deviceless.sh` provides both and runs it. The geometries whose
    /// channels are not whole 16-byte vectors (TAESD's 3-channel ends, the UNet's 4-channel
    /// input) may be refused: the legacy call runs those.
    #[test]
    #[ignore = "needs cuDNN 9.8+ on the library path"]
    fn deviceless_convolution_engines_exist() {
        let properties = cudnn_backend::device_properties(cudnn_backend::H100).unwrap();
        let mut missing = Vec::new();
        let mut plans_built = 0;
        for (name, geometry, epilogue) in network_geometries() {
            for (dtype_name, dtype, f32_storage) in [
                ("f16", sys::cudnnDataType_t::CUDNN_DATA_HALF, false),
                ("bf16", sys::cudnnDataType_t::CUDNN_DATA_BFLOAT16, false),
                ("f32", sys::cudnnDataType_t::CUDNN_DATA_FLOAT, true),
            ] {
                let graph = Graph::new(geometry, epilogue, dtype).unwrap();
                let operation_graph = graph.operation_graph(None).unwrap();
                let offered = engine_configs(
                    &operation_graph,
                    sys::cudnnBackendHeurMode_t::CUDNN_HEUR_MODE_A,
                    Some(&properties),
                )
                .map(|c| c.len())
                .unwrap_or(0);
                let acceptable =
                    acceptable_configs(&operation_graph, f32_storage, Some(&properties)).unwrap();
                // Each engine's index, starred where its plans compile their kernel.
                let engines: Vec<String> = acceptable
                    .iter()
                    .map(|(_, info)| {
                        format!(
                            "{}{}",
                            info.index,
                            if info.runtime_compiled { "*" } else { "" }
                        )
                    })
                    .collect();
                println!(
                    "{name} {:?} over {:?} {dtype_name} {epilogue:?}: mode A offers {offered}, \
                     {} keep the plain arithmetic (engines, * compiled at build: {})",
                    geometry.filter,
                    geometry.input,
                    acceptable.len(),
                    engines.join(" ")
                );
                // The frames' dtype must have them; bf16's and f32's are said.
                let whole_vectors = geometry.input[3] % 8 == 0 && geometry.filter[0] % 8 == 0;
                if acceptable.is_empty() && whole_vectors && dtype_name == "f16" {
                    missing.push(format!("{name} {dtype_name} {epilogue:?}"));
                }
                // Whether cuDNN finalizes the first one's plan for those properties (precompiled
                // engines need no driver for it), and the workspace it asks for.
                if let Some((config, _)) = acceptable.into_iter().next() {
                    match cudnn_backend::Plan::build_deviceless(config, &properties) {
                        Ok(plan) => {
                            println!("    first plan built, workspace {} bytes", plan.workspace);
                            plans_built += 1;
                        }
                        Err(e) => {
                            println!("    first plan not built: {e}");
                            if whole_vectors && dtype_name == "f16" {
                                missing.push(format!("{name} {dtype_name} {epilogue:?}: plan"));
                            }
                        }
                    }
                }
            }
        }
        println!("{plans_built} first plans built without a device");
        assert!(missing.is_empty(), "no acceptable engine for: {missing:?}");
    }
}
