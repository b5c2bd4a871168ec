//! Attention through cuDNN's fused scaled-dot-product kernels, on a CUDA device (feature `cudnn`,
//! kernel policy `cuda_cudnn_attention`): `softmax(scale·q·kᵀ)·v` as one graph of cuDNN's backend
//! API, which cuDNN matches to its flash-attention engines. On an H200, torch's call of the same
//! kernels took 0.077 ms for the UNet's 4,096-token self-attention of 5 heads of 64, against
//! 0.487 ms for attention.cu's WMMA kernel (docs/GPU.md).
//!
//! The graph is the one cuDNN recognises as attention (its frontend builds the same for
//! inference before cuDNN 9.21): q·kᵀ (f32 scores), times the scale (a scalar passed by value),
//! the softmax spelled out (the row maximum, the difference, its exponential, the row sum, the
//! quotient, and the log-sum-exp statistics from the maximum and the sum, which cuDNN's pattern
//! wants even where nothing reads them), the probabilities in the storage type, times v. Every
//! operand is read where it lies (attention.rs's `cudnn_operands` gives each its dims and
//! strides): the fused projections' token-major rows or the bank's heads-major ones; keys enter
//! transposed by their strides alone; the output is written `[B, N, H·d]`.
//!
//! Each geometry's graph, engine choice (cuDNN's heuristic, mode A, the first configuration
//! that builds) and plan are made once per thread (offsets aside: a plan takes any 16-byte
//! aligned operands of its dims and strides), on the call's first (eager) run, and kept;
//! a geometry cuDNN refuses is said once and remembered, and its calls go back to attention.cu
//! at once (no error made, no lock taken).
//!
//! Calls of several rows under the kernel policy's `cuda_cudnn_kernel_cache` get plans for a
//! dynamic-shape graph that share the kernel cache of their geometry (its operands with the
//! batch left out; one per process, for every thread): the engines compile their kernel as a
//! plan is built, and a cross-stream batcher's rounds come in every width from 2 to 8 rows, on
//! whichever thread forms them, so that each width on each thread would compile it again. A
//! call of one row keeps its static plan; a plan refused with the cache is built static.
//! Checked without a GPU against the cuDNN 9.19 library, which the kit's GPU machine loads (torch
//! 2.11 pins it), and 9.26 (`deviceless_plans_exist`, an ignored test: the heuristic's support
//! checks for an H100's properties); the plans and the numbers need a device
//! (core/tests/cuda.rs, `cuda_cudnn_attention_matches_the_f32_formula`).

use std::cell::RefCell;
use std::collections::HashMap;
use std::ffi::c_void;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::cudnn::sys;
use candle_core::cuda_backend::cudarc::driver::{DevicePtr, DeviceRepr};
use candle_core::cuda_backend::{CudaDType, DeviceId};
use candle_core::{CudaStorage, DType, Layout, Shape};

use super::attention::GraphOperand;
use super::cudnn_backend::{
    self, Attr, Descriptor, F32, Kind, Role, Type, engine_configs, pointwise, tensor,
};

/// Calls that ran through cuDNN ([`forward`]), for tests and the bench.
pub fn calls() -> u64 {
    CALLS.load(Ordering::Relaxed)
}

static CALLS: AtomicU64 = AtomicU64::new(0);

/// The plans this process has built (one per thread and geometry) and refused, and the time
/// the builds took: cuDNN's attention engines compile their kernels (NVRTC) when a plan is
/// built, which every thread's first call of a geometry waits for.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct PlanBuilds {
    /// Plans built.
    pub built: u64,
    /// Of those, the plans built for a dynamic-shape graph with its geometry's kernel cache
    /// (calls of several rows under the kernel policy's `cuda_cudnn_kernel_cache`).
    pub shared: u64,
    /// Geometries cuDNN refused (their calls run attention.cu's kernel).
    pub refused: u64,
    /// The time building and refusing took, in all.
    pub milliseconds: f64,
}

/// "N plans built (K with kernel caches), M geometries refused, T ms building them": the one
/// wording the bench, the attention bench and the device test print.
impl std::fmt::Display for PlanBuilds {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} plans built ({} with kernel caches), {} geometries refused, {:.0} ms building them",
            self.built, self.shared, self.refused, self.milliseconds
        )
    }
}

/// This process's [`PlanBuilds`] so far.
pub fn plan_builds() -> PlanBuilds {
    PlanBuilds {
        built: BUILT.load(Ordering::Relaxed),
        shared: SHARED.load(Ordering::Relaxed),
        refused: REFUSED.load(Ordering::Relaxed),
        milliseconds: BUILD_MICROS.load(Ordering::Relaxed) as f64 / 1e3,
    }
}

static BUILT: AtomicU64 = AtomicU64::new(0);
static SHARED: AtomicU64 = AtomicU64::new(0);
static REFUSED: AtomicU64 = AtomicU64::new(0);
static BUILD_MICROS: AtomicU64 = AtomicU64::new(0);

/// The graph's tensors that the variant pack names: q, kᵀ, v, the output and the scale.
const Q: i64 = 1;
const K: i64 = 2;
const V: i64 = 3;
const O: i64 = 4;
const SCALE: i64 = 5;
/// The first id of the graph's virtual tensors.
const VIRTUAL: i64 = 100;

/// `y = reduce(x)` over the last dimension, in f32.
fn reduction(
    operator: sys::cudnnReduceTensorOp_t,
    x: &Descriptor,
    y: &Descriptor,
) -> candle_core::Result<[Descriptor; 2]> {
    let r = Descriptor::new(Kind::CUDNN_BACKEND_REDUCTION_DESCRIPTOR)?;
    r.set(
        Attr::CUDNN_ATTR_REDUCTION_OPERATOR,
        Type::CUDNN_TYPE_REDUCTION_OPERATOR_TYPE,
        &[operator],
    )?;
    r.set_data_type(Attr::CUDNN_ATTR_REDUCTION_COMP_TYPE, F32)?;
    let r = r.finalize("reduction")?;
    let op = Descriptor::new(Kind::CUDNN_BACKEND_OPERATION_REDUCTION_DESCRIPTOR)?;
    op.set_descriptors(Attr::CUDNN_ATTR_OPERATION_REDUCTION_DESC, &[&r])?;
    op.set_descriptors(Attr::CUDNN_ATTR_OPERATION_REDUCTION_XDESC, &[x])?;
    op.set_descriptors(Attr::CUDNN_ATTR_OPERATION_REDUCTION_YDESC, &[y])?;
    Ok([r, op.finalize(&format!("reduction {operator:?}"))?])
}

/// `c = a·b` over the last two dimensions, f32 sums.
fn matmul(a: &Descriptor, b: &Descriptor, c: &Descriptor) -> candle_core::Result<[Descriptor; 2]> {
    let m = Descriptor::new(Kind::CUDNN_BACKEND_MATMUL_DESCRIPTOR)?;
    m.set_data_type(Attr::CUDNN_ATTR_MATMUL_COMP_TYPE, F32)?;
    let m = m.finalize("matmul")?;
    let op = Descriptor::new(Kind::CUDNN_BACKEND_OPERATION_MATMUL_DESCRIPTOR)?;
    op.set_descriptors(Attr::CUDNN_ATTR_OPERATION_MATMUL_ADESC, &[a])?;
    op.set_descriptors(Attr::CUDNN_ATTR_OPERATION_MATMUL_BDESC, &[b])?;
    op.set_descriptors(Attr::CUDNN_ATTR_OPERATION_MATMUL_CDESC, &[c])?;
    op.set_descriptors(Attr::CUDNN_ATTR_OPERATION_MATMUL_DESC, &[&m])?;
    Ok([m, op.finalize("matmul operation")?])
}

/// The attention graph's operations over `operands` (q, kᵀ, v, output) in `dtype`, and every
/// descriptor they refer to (kept alive with them).
pub(crate) struct Graph {
    /// The operations, in order (the graph's OPS attribute).
    operations: Vec<Descriptor>,
    /// Tensors and the operations' own descriptors.
    _parts: Vec<Descriptor>,
}

impl Graph {
    pub(crate) fn new(
        operands: [GraphOperand; 4],
        dtype: sys::cudnnDataType_t,
    ) -> candle_core::Result<Self> {
        use sys::cudnnPointwiseMode_t as Pw;
        use sys::cudnnReduceTensorOp_t as Reduce;
        let [q, k, v, o] = operands;
        let (b, h, n, m) = (q.dims[0], q.dims[1], q.dims[2], k.dims[3]);
        let scores = [b, h, n, m];
        let scores_strides = [h * n * m, n * m, m, 1];
        let per_row = [b, h, n, 1];
        let per_row_strides = [h * n, n, 1, 1];
        let mut uid = VIRTUAL;
        let mut next = || {
            uid += 1;
            uid
        };
        let q_t = tensor(Q, dtype, &q.dims, &q.strides, Role::Operand)?;
        let k_t = tensor(K, dtype, &k.dims, &k.strides, Role::Operand)?;
        let v_t = tensor(V, dtype, &v.dims, &v.strides, Role::Operand)?;
        let o_t = tensor(O, dtype, &o.dims, &o.strides, Role::Operand)?;
        let scale = tensor(SCALE, F32, &[1; 4], &[1; 4], Role::ByValue)?;
        let s = tensor(next(), F32, &scores, &scores_strides, Role::Virtual)?;
        let scaled = tensor(next(), F32, &scores, &scores_strides, Role::Virtual)?;
        let max = tensor(next(), F32, &per_row, &per_row_strides, Role::Virtual)?;
        let shifted = tensor(next(), F32, &scores, &scores_strides, Role::Virtual)?;
        let exp = tensor(next(), F32, &scores, &scores_strides, Role::Virtual)?;
        let sum = tensor(next(), F32, &per_row, &per_row_strides, Role::Virtual)?;
        let log_sum = tensor(next(), F32, &per_row, &per_row_strides, Role::Virtual)?;
        let stats = tensor(next(), F32, &per_row, &per_row_strides, Role::Virtual)?;
        // The probabilities in the storage type: the second product's A operand.
        let p = tensor(next(), dtype, &scores, &scores_strides, Role::Virtual)?;
        let steps = [
            matmul(&q_t, &k_t, &s)?,
            pointwise(Pw::CUDNN_POINTWISE_MUL, &s, Some(&scale), &scaled)?,
            reduction(Reduce::CUDNN_REDUCE_TENSOR_MAX, &scaled, &max)?,
            pointwise(Pw::CUDNN_POINTWISE_SUB, &scaled, Some(&max), &shifted)?,
            pointwise(Pw::CUDNN_POINTWISE_EXP, &shifted, None, &exp)?,
            reduction(Reduce::CUDNN_REDUCE_TENSOR_ADD, &exp, &sum)?,
            pointwise(Pw::CUDNN_POINTWISE_LOG, &sum, None, &log_sum)?,
            pointwise(Pw::CUDNN_POINTWISE_ADD, &max, Some(&log_sum), &stats)?,
            pointwise(Pw::CUDNN_POINTWISE_DIV, &exp, Some(&sum), &p)?,
            matmul(&p, &v_t, &o_t)?,
        ];
        let mut operations = Vec::with_capacity(steps.len());
        let mut parts = vec![
            q_t, k_t, v_t, o_t, scale, s, scaled, max, shifted, exp, sum, log_sum, stats, p,
        ];
        for [own, op] in steps {
            parts.push(own);
            operations.push(op);
        }
        Ok(Self {
            operations,
            _parts: parts,
        })
    }

    /// The operation graph over these operations ([`cudnn_backend::operation_graph`]).
    pub(crate) fn operation_graph(
        &self,
        handle: Option<sys::cudnnHandle_t>,
        dynamic: bool,
    ) -> candle_core::Result<Descriptor> {
        cudnn_backend::operation_graph(&self.operations, handle, dynamic)
    }
}

/// One geometry's graph and plan.
struct Plan {
    plan: cudnn_backend::Plan,
    _operation_graph: Descriptor,
    _graph: Graph,
}

impl Plan {
    /// The plan of the first configuration that builds; with `kernels`, for a dynamic-shape
    /// graph whose kernel comes from (or goes into) that cache.
    fn build(
        handle: &Rc<cudnn_backend::Handle>,
        operands: [GraphOperand; 4],
        dtype: sys::cudnnDataType_t,
        kernels: Option<&KernelCache>,
    ) -> candle_core::Result<Self> {
        let graph = Graph::new(operands, dtype)?;
        let operation_graph = graph.operation_graph(Some(handle.0), kernels.is_some())?;
        let mut last_refusal = None;
        // Mode A only: its choices are the flash engines; a fallback engine that took this
        // graph would be one of cuDNN's generic ones, slower than attention.cu's kernel.
        let configs = engine_configs(
            &operation_graph,
            sys::cudnnBackendHeurMode_t::CUDNN_HEUR_MODE_A,
            None,
        )?;
        for config in configs {
            match cudnn_backend::Plan::build(handle, config, kernels.map(|k| &k.cache)) {
                Ok(plan) => {
                    return Ok(Self {
                        plan,
                        _operation_graph: operation_graph,
                        _graph: graph,
                    });
                }
                Err(e) => last_refusal = Some(e),
            }
        }
        Err(last_refusal.unwrap_or_else(|| {
            candle_core::Error::Msg(
                "sdstream-cudnn-attention: cuDNN offers no engine for this attention".into(),
            )
        }))
    }
}

/// The compiled kernels of one geometry whatever its batch (cuDNN's kernel cache, cuDNN 9.5
/// and later), bound to the first dynamic-shape operation graph of that geometry, which it
/// keeps alive. Shared by every thread: cross-stream batches of 2 to 8 rows run on whichever
/// thread forms them, and each thread builds its own plans, so without it every row count on
/// every thread would compile the engine's kernel anew.
struct KernelCache {
    cache: Descriptor,
    _operation_graph: Descriptor,
    _graph: Graph,
}

// SAFETY: cuDNN's descriptors are heap objects with no tie to a thread; a kernel cache is only
// read or changed by a plan's build, which holds the cache's mutex throughout.
unsafe impl Send for KernelCache {}

impl KernelCache {
    fn new(operands: [GraphOperand; 4], dtype: sys::cudnnDataType_t) -> candle_core::Result<Self> {
        let graph = Graph::new(operands, dtype)?;
        let operation_graph = graph.operation_graph(None, true)?;
        let cache = Descriptor::new(Kind::CUDNN_BACKEND_KERNEL_CACHE_DESCRIPTOR)?;
        cache.set_descriptors(
            Attr::CUDNN_ATTR_KERNEL_CACHE_OPERATION_GRAPH,
            &[&operation_graph],
        )?;
        Ok(Self {
            cache: cache.finalize("kernel cache")?,
            _operation_graph: operation_graph,
            _graph: graph,
        })
    }
}

/// A geometry with its batch left out: (device, dtype, the four operands' dims and strides
/// with batch 0 and offsets 0, [`super::attention::batchless`]).
type Geometry = (DeviceId, DType, [GraphOperand; 4]);

/// The kernel cache of `geometry`, made on first use and bound to the graph of `operands` (the
/// geometry at the batch of the call that made it); `None` where cuDNN has none (before 9.5) or
/// refused to make it (said once).
fn kernel_cache(
    geometry: Geometry,
    operands: [GraphOperand; 4],
    dtype: sys::cudnnDataType_t,
) -> Option<Arc<Mutex<KernelCache>>> {
    type Caches = HashMap<Geometry, Option<Arc<Mutex<KernelCache>>>>;
    static CACHES: OnceLock<Mutex<Caches>> = OnceLock::new();
    // SAFETY: a plain query.
    if unsafe { sys::cudnnGetVersion() } < 90500 {
        return None;
    }
    let mut caches = CACHES
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    caches
        .entry(geometry)
        .or_insert_with(|| match KernelCache::new(operands, dtype) {
            Ok(cache) => Some(Arc::new(Mutex::new(cache))),
            Err(e) => {
                tracing::warn!(
                    "cuDNN made no kernel cache for q {:?} over k {:?} (any batch); its \
                     batches build static plans: {e}",
                    operands[0].dims,
                    operands[1].dims
                );
                None
            }
        })
        .clone()
}

/// One geometry: (device, dtype, the four operands' dims and strides, their offsets zero), and
/// whether its plan takes its kernel from the geometry's kernel cache.
type Key = (DeviceId, DType, [GraphOperand; 4], bool);

thread_local! {
    // Plans are made and used on one thread (candle's stream is per thread).
    // A refused geometry is kept as `None`, so that its calls go back to attention.cu at once.
    static PLANS: RefCell<HashMap<Key, Option<Rc<Plan>>>> = RefCell::new(HashMap::new());
}

/// Says, once per geometry in the process, that cuDNN's attention did not run for `graph` and
/// why (cuDNN refused its plan, or the call failed); attention.cu's kernel runs instead.
pub(crate) fn note_refusal(graph: &[GraphOperand; 4], error: &candle_core::Error) {
    static SAID: Mutex<Vec<[GraphOperand; 4]>> = Mutex::new(Vec::new());
    say_once(&SAID, graph, "; attention.cu's kernel runs instead", error);
}

/// Says, once per geometry in the process, that cuDNN refused `graph`'s plan with its kernel
/// cache; a static plan is built instead.
fn note_kernel_cache_refusal(graph: &[GraphOperand; 4], error: &candle_core::Error) {
    static SAID: Mutex<Vec<[GraphOperand; 4]>> = Mutex::new(Vec::new());
    say_once(
        &SAID,
        graph,
        " with its kernel cache; a static plan is built instead",
        error,
    );
}

fn say_once(
    said: &Mutex<Vec<[GraphOperand; 4]>>,
    graph: &[GraphOperand; 4],
    instead: &str,
    error: &candle_core::Error,
) {
    let mut said = said.lock().unwrap_or_else(|e| e.into_inner());
    if !said.contains(graph) {
        said.push(*graph);
        tracing::warn!(
            "cuDNN's attention does not run for q {:?} over k {:?} (strides {:?}, {:?}){instead}: \
             {error}",
            graph[0].dims,
            graph[1].dims,
            graph[0].strides,
            graph[1].strides
        );
    }
}

/// Attention through cuDNN for the operands attention.rs laid out (`graph`: q, kᵀ, v, the
/// output; each operand's storage and layout, its first value `graph[i].offset` values into
/// the layout): the output `out_shape` (`[B, N, H·d]`). `None` where cuDNN refused the
/// geometry (said once, when this thread first asked; later calls return at once, the caller
/// runs attention.cu's kernel); an error where the call itself failed.
pub(crate) fn forward(
    scale: f64,
    graph: [GraphOperand; 4],
    out_shape: Shape,
    operands: [(&CudaStorage, &Layout); 3],
) -> candle_core::Result<Option<(CudaStorage, Shape)>> {
    match operands[0].0.dtype() {
        DType::F16 => run::<half::f16>(
            scale,
            graph,
            out_shape,
            operands,
            sys::cudnnDataType_t::CUDNN_DATA_HALF,
        ),
        DType::BF16 => run::<half::bf16>(
            scale,
            graph,
            out_shape,
            operands,
            sys::cudnnDataType_t::CUDNN_DATA_BFLOAT16,
        ),
        other => candle_core::bail!("sdstream-cudnn-attention: no cuDNN attention for {other:?}"),
    }
}

fn run<T: CudaDType + DeviceRepr>(
    scale: f64,
    graph: [GraphOperand; 4],
    out_shape: Shape,
    operands: [(&CudaStorage, &Layout); 3],
    dtype: sys::cudnnDataType_t,
) -> candle_core::Result<Option<(CudaStorage, Shape)>> {
    let dev = operands[0].0.device().clone();
    // The graph declares every operand 16-byte aligned: a row that starts off a multiple of 8
    // values goes to attention.cu's checks instead (which name it).
    let aligned = graph[0].dims[3] % 8 == 0
        && operands.iter().zip(&graph).all(|((_, layout), operand)| {
            (layout.start_offset() + operand.offset) % 8 == 0
                && operand.strides.iter().all(|&s| s == 1 || s % 8 == 0)
        });
    if !aligned {
        return Ok(None);
    }
    let at_zero = graph.map(|g| GraphOperand { offset: 0, ..g });
    // Calls of several rows share their geometry's compiled kernel across row counts where the
    // policy asks for it; a call of one row (a stream alone) keeps the static plan.
    let shared = graph[0].dims[0] > 1 && crate::KernelPolicy::current().cuda_cudnn_kernel_cache;
    let key: Key = (dev.id(), operands[0].0.dtype(), at_zero, shared);
    let plan = match PLANS.with(|p| p.borrow().get(&key).cloned()) {
        Some(kept) => kept,
        None => {
            // Made on the call's eager run (a graph's eager pass comes first on every thread),
            // never while a CUDA graph is being captured: building compiles a kernel and may
            // allocate, which a capture must not see. A capture that meets a geometry with no
            // plan records attention.cu's kernel.
            if cudnn_backend::capturing(&dev)? {
                return Ok(None);
            }
            let handle = cudnn_backend::handle_for_building(&dev)?;
            let began = std::time::Instant::now();
            let geometry = super::attention::batchless(at_zero);
            let kernels = shared
                .then(|| kernel_cache((dev.id(), operands[0].0.dtype(), geometry), at_zero, dtype))
                .flatten();
            // A refused plan with the kernel cache falls back to a static one.
            let with_cache = kernels.as_ref().and_then(|kernels| {
                let kernels = kernels.lock().unwrap_or_else(|e| e.into_inner());
                Plan::build(&handle, graph, dtype, Some(&kernels))
                    .inspect_err(|refusal| note_kernel_cache_refusal(&graph, refusal))
                    .ok()
            });
            let built = match with_cache {
                Some(plan) => {
                    SHARED.fetch_add(1, Ordering::Relaxed);
                    Ok(plan)
                }
                None => Plan::build(&handle, graph, dtype, None),
            };
            let micros = began.elapsed().as_micros() as u64;
            BUILD_MICROS.fetch_add(micros, Ordering::Relaxed);
            let made = match built {
                Ok(plan) => Some(Rc::new(plan)),
                Err(refusal) => {
                    note_refusal(&graph, &refusal);
                    None
                }
            };
            let count = if made.is_some() { &BUILT } else { &REFUSED };
            count.fetch_add(1, Ordering::Relaxed);
            PLANS.with(|p| p.borrow_mut().insert(key, made.clone()));
            made
        }
    };
    let Some(plan) = plan else {
        return Ok(None);
    };
    let stream = dev.cuda_stream();
    let elements = out_shape.elem_count();
    // SAFETY: the plan's second product writes every output value.
    let dst = unsafe { dev.alloc::<T>(elements)? };
    let workspace = unsafe { dev.alloc::<u8>(plan.plan.workspace.max(1))? };
    let views = operands
        .iter()
        .zip(&graph)
        .map(|((storage, layout), operand)| {
            Ok(storage
                .as_cuda_slice::<T>()?
                .slice(layout.start_offset() + operand.offset..))
        })
        .collect::<candle_core::Result<Vec<_>>>()?;
    {
        // cudarc makes a buffer's read and write events only in its multi-stream mode, which
        // candle's per-thread default streams never enter (cross-thread order is
        // `QueuedWork`'s): the guards record nothing, and the addresses stay valid while the
        // views live.
        let (q_ptr, _q) = views[0].device_ptr(&stream);
        let (k_ptr, _k) = views[1].device_ptr(&stream);
        let (v_ptr, _v) = views[2].device_ptr(&stream);
        let (o_ptr, _o) = dst.device_ptr(&stream);
        let (w_ptr, _w) = workspace.device_ptr(&stream);
        let scale = scale as f32;
        let pointers: [*mut c_void; 5] = [
            q_ptr as *mut c_void,
            k_ptr as *mut c_void,
            v_ptr as *mut c_void,
            o_ptr as *mut c_void,
            // By value: cuDNN reads the host's f32 while it queues the call.
            &scale as *const f32 as *mut c_void,
        ];
        // SAFETY: the plan was built for these operands' dims, strides and dtype (the key);
        // every pointer is a live device buffer of the right size on this thread's stream, the
        // scale a live host f32, the workspace as large as the plan asked.
        let executed = unsafe {
            plan.plan
                .execute(&[Q, K, V, O, SCALE], &pointers, w_ptr as *mut c_void)
        };
        if let Err(e) = executed {
            // A plan that fails to run is dropped for this thread's geometry like a refused
            // one, so that later calls go to attention.cu at once instead of failing in cuDNN
            // first; the caller says why, once.
            PLANS.with(|p| p.borrow_mut().insert(key, None));
            return Err(e);
        }
    }
    CALLS.fetch_add(1, Ordering::Relaxed);
    Ok(Some((CudaStorage::wrap_cuda_slice(dst, dev), out_shape)))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// cuDNN's heuristic offers engines for the graph on the UNet's shapes, asked for an H100
    /// without a device (cuDNN 9.8 and later). Needs the real libcudnn on the library path and
    /// a libcuda that loads: `bash scripts/cudnn-deviceless.sh` provides both and runs it.
    /// Without the statistics (the log-sum-exp) in the graph, cuDNN 9.19 and 9.26 offer none.
    #[test]
    #[ignore = "needs cuDNN 9.8+ on the library path"]
    fn deviceless_plans_exist() {
        let properties = cudnn_backend::device_properties(cudnn_backend::H100).unwrap();
        let d = 64;
        let c = 5 * d;
        let mut offered = Vec::new();
        let mut offered_dynamic = Vec::new();
        let mut caches = Vec::new();
        // (batch, heads, queries, keys, head dim, token-major)
        for (b, h, n, m, d, token_major) in [
            (1usize, 5usize, 4096usize, 4096usize, d, true),
            (1, 5, 4096, 77, d, true),
            (8, 5, 4096, 4096, d, true),
            (1, 8, 4096, 4096, 40, false),
            (2, 20, 256, 256, 64, false),
        ] {
            use crate::attention::{Dims, Rows, cudnn_operands};
            let rows = if token_major {
                // A fused q/k/v projection for self-attention, a k/v one for cross-attention.
                let (qw, kw, k_at, v_at) = if n == m {
                    (3 * c, 3 * c, c, 2 * c)
                } else {
                    (c, 2 * c, 0, c)
                };
                [
                    Rows::token_major(n, qw, d, 0),
                    Rows::token_major(m, kw, d, k_at),
                    Rows::token_major(m, kw, d, v_at),
                ]
            } else {
                [
                    Rows::heads_major(h, n, d),
                    Rows::heads_major(h, m, d),
                    Rows::heads_major(h, m, d),
                ]
            };
            let dims = Dims {
                batch: b,
                heads: h,
                n,
                m,
                d,
            };
            let operands = cudnn_operands(dims, rows);
            for (name, dtype) in [
                ("f16", sys::cudnnDataType_t::CUDNN_DATA_HALF),
                ("bf16", sys::cudnnDataType_t::CUDNN_DATA_BFLOAT16),
            ] {
                let graph = Graph::new(operands, dtype).unwrap();
                // The configurations offered for the graph as it is, or as a dynamic-shape graph.
                let offered_for = |dynamic| {
                    let operation_graph = graph.operation_graph(None, dynamic).unwrap();
                    engine_configs(
                        &operation_graph,
                        sys::cudnnBackendHeurMode_t::CUDNN_HEUR_MODE_A,
                        Some(&properties),
                    )
                    .unwrap()
                    .len()
                };
                let configs = offered_for(false);
                println!(
                    "[{b}×{h}, {n} × {m} keys, d {d}, token-major {token_major}] {name}: {configs} engine configurations"
                );
                offered.push(configs);
                // The same as a dynamic-shape graph, and the kernel cache a geometry's plans
                // of several rows share (`cuda_cudnn_kernel_cache`), bound to it.
                let dynamic_configs = offered_for(true);
                let cache = KernelCache::new(operands, dtype);
                println!(
                    "    dynamic shapes: {dynamic_configs} engine configurations; kernel cache {}",
                    match &cache {
                        Ok(_) => "made".to_string(),
                        Err(e) => format!("refused: {e}"),
                    }
                );
                offered_dynamic.push(dynamic_configs);
                caches.push(cache.is_ok());
            }
        }
        assert_eq!(offered.len(), 10, "five shapes, two dtypes");
        assert!(
            offered.iter().all(|&n| n > 0),
            "cuDNN offered no engine for some shape: {offered:?}"
        );
        assert!(
            offered_dynamic.iter().all(|&n| n > 0),
            "cuDNN offered no engine for some dynamic-shape graph: {offered_dynamic:?}"
        );
        assert!(
            caches.iter().all(|&made| made),
            "cuDNN made no kernel cache for some graph: {caches:?}"
        );
    }
}
