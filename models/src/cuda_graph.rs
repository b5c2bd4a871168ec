//! A network's forward pass on a CUDA device captured once as a CUDA graph and replayed per
//! frame, so that the thousand-odd kernel launches of a UNet cost one launch's host time.
//!
//! [`GraphCache::run`] takes the forward pass as a closure over its input tensors. The first
//! call for a given thread and input signature (shapes and dtypes) runs it eagerly (which loads
//! the kernels, cuBLAS's workspace and cuDNN's plans), then captures it on the device's stream
//! over copies of the inputs that the cache keeps ("static" inputs), and replays the graph once
//! to check it against the eager output. Later calls copy their inputs into the static ones,
//! replay, and return a copy of the graph's output. Memory the pass allocates is the graph's
//! own: its addresses are fixed across replays (the output's too), and what the pass frees it
//! frees inside the graph. A pass that cannot be captured (a host synchronisation inside, say)
//! falls back to eager runs for good, with one line in the log.
//!
//! One graph per thread and signature: two streams sharing a network from two threads each
//! replay their own (a replay on one thread's stream would otherwise race the other's inputs).
//! The graphs of a thread that has ended are dropped when a cache is full (a server's streams
//! come and go, each on a thread of its own: without it, the cache would fill with the graphs
//! of streams long gone, and later ones would run op by op).
//! Off where the current [`KernelPolicy`] says so (`SDSTREAM_CUDA_GRAPHS=0`), and always off
//! without the `cuda` feature or on another device. A graph replays the kernels its capture
//! ran, so graphs are kept per policy too: a pass under another policy captures its own.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};
use std::thread::ThreadId;

use candle_core::{DType, Device, Tensor};
use sdstream_kernels::KernelPolicy;

/// Graphs kept per cache at most (input signatures × threads); beyond, calls run eagerly. 16:
/// eight streams' threads each with a graph of its calls alone, and the thread their shared
/// batches run on with one of each width from 2 to 8 rows.
#[cfg(feature = "cuda")]
const MAX_GRAPHS: usize = 16;

type Signature = (ThreadId, KernelPolicy, Vec<(Vec<usize>, DType)>);

/// Captured graphs of one network's forward pass (see the module's documentation).
#[derive(Default)]
pub struct GraphCache {
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    graphs: Mutex<HashMap<Signature, Captured>>,
    failed: AtomicBool,
}

/// A copy of a network holds no graph of the original's: its graphs would point at the
/// original's weights.
impl Clone for GraphCache {
    fn clone(&self) -> Self {
        Self::default()
    }
}

impl std::fmt::Debug for GraphCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GraphCache")
            .field("failed", &self.failed.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

/// Graphs captured, replays and failed captures so far in this process.
static CAPTURED: AtomicUsize = AtomicUsize::new(0);
static REPLAYED: AtomicUsize = AtomicUsize::new(0);
static FAILED: AtomicUsize = AtomicUsize::new(0);

/// How many CUDA graphs this process has captured, replayed and failed to capture (every
/// network's together): what tells a host, or a test, that the frames really ran as graphs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CudaGraphCounts {
    /// Forward passes captured as graphs.
    pub captured: usize,
    /// Replays of captured graphs.
    pub replayed: usize,
    /// Captures that failed (the network then runs op by op).
    pub failed: usize,
}

/// The process's [`CudaGraphCounts`].
pub fn counts() -> CudaGraphCounts {
    CudaGraphCounts {
        captured: CAPTURED.load(Ordering::Relaxed),
        replayed: REPLAYED.load(Ordering::Relaxed),
        failed: FAILED.load(Ordering::Relaxed),
    }
}

/// The threads alive now that have run a graph cache's pass: each registers on its first call
/// and leaves when it ends (its thread-local guard drops), so that a cache can drop the graphs
/// of threads that are gone (a server's streams come and go, each on a thread of its own).
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
fn live_threads() -> &'static Mutex<HashSet<ThreadId>> {
    static LIVE: OnceLock<Mutex<HashSet<ThreadId>>> = OnceLock::new();
    LIVE.get_or_init(Default::default)
}

/// Registers its thread in [`live_threads`] while the thread lives.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
struct LiveThread(ThreadId);

#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
impl LiveThread {
    fn register() -> Self {
        let id = std::thread::current().id();
        live_threads()
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id);
        LiveThread(id)
    }
}

impl Drop for LiveThread {
    fn drop(&mut self) {
        live_threads()
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.0);
    }
}

thread_local! {
    static THIS_THREAD: LiveThread = LiveThread::register();
}

/// Marks this thread alive (once) for [`drop_gone_threads`].
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
fn mark_alive() {
    THIS_THREAD.with(|_| ());
}

/// Drops the entries of threads that have ended: their graphs can never replay again (a graph
/// replays only on the thread that captured it), and they hold device memory and a place among
/// the [`MAX_GRAPHS`]. Returns how many went.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
fn drop_gone_threads<V>(graphs: &mut HashMap<Signature, V>) -> usize {
    let live = live_threads().lock().unwrap_or_else(|e| e.into_inner());
    let before = graphs.len();
    graphs.retain(|(thread, _, _), _| live.contains(thread));
    before - graphs.len()
}

/// Whether forward passes on `device` are captured and replayed (under the current policy).
fn enabled(device: &Device) -> bool {
    device.is_cuda() && cfg!(feature = "cuda") && KernelPolicy::current().cuda_graphs
}

#[cfg(feature = "cuda")]
struct Captured {
    inputs: Vec<Tensor>,
    // Dropped before the graph: freeing a graph allocation outside the graph is allowed, and the
    // graph must outlive nothing that points into it.
    output: Tensor,
    graph: candle_core::cuda_backend::cudarc::driver::CudaGraph,
}

#[cfg(not(feature = "cuda"))]
struct Captured;

// SAFETY: a graph is used under the cache's mutex only, by one thread at a time (the driver's
// rule for graph objects); its tensors are ordinary device memory.
#[cfg(feature = "cuda")]
unsafe impl Send for Captured {}

impl GraphCache {
    /// Whether [`run`](Self::run) captures and replays passes on `device`: a CUDA device,
    /// graphs not turned off, and no capture of this cache failed. A caller that must reshape
    /// its pass for a graph (one output tensor) can spare the CPU that work.
    pub fn captures(&self, device: &Device) -> bool {
        enabled(device) && !self.failed.load(Ordering::Relaxed)
    }

    /// `forward(inputs)`, replayed from a captured graph when possible (see the module's
    /// documentation). `inputs` must be every device tensor the pass reads that can change
    /// between calls; tensors it reads besides (weights) must stay allocated while the cache
    /// lives, as a network's weights do.
    pub fn run(
        &self,
        inputs: &[&Tensor],
        forward: impl Fn(&[&Tensor]) -> crate::Result<Tensor>,
    ) -> crate::Result<Tensor> {
        let Some(device) = inputs.first().map(|t| t.device().clone()) else {
            return forward(inputs);
        };
        if !enabled(&device) || self.failed.load(Ordering::Relaxed) {
            return forward(inputs);
        }
        self.run_cuda(&device, inputs, forward)
    }

    #[cfg(not(feature = "cuda"))]
    fn run_cuda(
        &self,
        _: &Device,
        inputs: &[&Tensor],
        forward: impl Fn(&[&Tensor]) -> crate::Result<Tensor>,
    ) -> crate::Result<Tensor> {
        forward(inputs)
    }

    #[cfg(feature = "cuda")]
    fn run_cuda(
        &self,
        device: &Device,
        inputs: &[&Tensor],
        forward: impl Fn(&[&Tensor]) -> crate::Result<Tensor>,
    ) -> crate::Result<Tensor> {
        mark_alive();
        let signature: Signature = (
            std::thread::current().id(),
            KernelPolicy::current(),
            inputs
                .iter()
                .map(|t| (t.dims().to_vec(), t.dtype()))
                .collect(),
        );
        let mut graphs = self.graphs.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(captured) = graphs.get(&signature) {
            for (fixed, x) in captured.inputs.iter().zip(inputs) {
                fixed.slice_set(&x.contiguous()?, 0, 0)?;
            }
            captured.graph.launch().map_err(candle_core::Error::wrap)?;
            REPLAYED.fetch_add(1, Ordering::Relaxed);
            return Ok(captured.output.copy()?);
        }
        if graphs.len() >= MAX_GRAPHS && drop_gone_threads(&mut graphs) == 0 {
            return forward(inputs);
        }
        // candle uploads small kernel parameters (a strided operand's dims and strides) from
        // the host; a graph would replay such a copy from a host buffer long freed. Under this
        // guard they are uploaded once, cached by content, and the capture reuses the copies the
        // eager pass made (a parameter the eager pass did not upload fails the capture).
        let Device::Cuda(cuda) = device else {
            return forward(inputs);
        };
        let _cached_uploads = cuda.enable_cuda_graph_htod_cache();
        let eager = forward(inputs)?;
        match capture(cuda, inputs, &forward, &eager) {
            Ok(captured) => {
                CAPTURED.fetch_add(1, Ordering::Relaxed);
                graphs.insert(signature, captured);
            }
            Err(e) => {
                FAILED.fetch_add(1, Ordering::Relaxed);
                self.failed.store(true, Ordering::Relaxed);
                tracing::warn!(
                    "CUDA graph capture failed, the network runs op by op from now on: {e}"
                );
            }
        }
        Ok(eager)
    }
}

/// Captures `forward` over static copies of `inputs`, replays it once and checks the replay
/// against the eager output `eager`.
#[cfg(feature = "cuda")]
fn capture(
    cuda: &candle_core::CudaDevice,
    inputs: &[&Tensor],
    forward: &impl Fn(&[&Tensor]) -> crate::Result<Tensor>,
    eager: &Tensor,
) -> crate::Result<Captured> {
    use candle_core::cuda_backend::cudarc::driver::sys;
    let statics = inputs
        .iter()
        .map(|t| t.contiguous().and_then(|t| t.copy()))
        .collect::<candle_core::Result<Vec<_>>>()?;
    let stream = cuda.cuda_stream();
    // cudarc keeps an error a release met on any thread (a free, an event's destruction) and
    // returns it from the next call that binds the context, whichever thread makes it. One
    // left by another thread must neither abort this capture nor, met inside it, keep
    // `end_capture` from ending it (the stream would stay in capture mode and every later
    // call on this thread fail): taken and said here. The replay check below judges the
    // graph.
    let take_stale = |when: &str| {
        if let Err(e) = stream.context().check_err() {
            tracing::warn!("a CUDA error a release left ({when} a capture): {e}");
        }
    };
    take_stale("before");
    stream.synchronize().map_err(candle_core::Error::wrap)?;
    stream
        .begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED)
        .map_err(candle_core::Error::wrap)?;
    let refs: Vec<&Tensor> = statics.iter().collect();
    let output = forward(&refs);
    take_stale("during");
    // End the capture whatever happened, so that the stream leaves capture mode.
    let graph = stream.end_capture(
        sys::CUgraphInstantiate_flags::CUDA_GRAPH_INSTANTIATE_FLAG_AUTO_FREE_ON_LAUNCH,
    );
    let output = output?;
    let graph = graph
        .map_err(candle_core::Error::wrap)?
        .ok_or_else(|| candle_core::Error::Msg("the capture made no graph".into()))?;
    graph.launch().map_err(candle_core::Error::wrap)?;
    let scale = eager
        .to_dtype(DType::F32)?
        .abs()?
        .max_all()?
        .to_scalar::<f32>()?;
    let diff = (output.to_dtype(DType::F32)? - eager.to_dtype(DType::F32)?)?
        .abs()?
        .max_all()?
        .to_scalar::<f32>()?;
    // The replay runs the eager pass's kernels on the same data: it should agree to the bit;
    // allow reduction-order noise, refuse anything more.
    if diff.is_nan() || diff > 1e-3 * scale.max(1.0) {
        return Err(crate::Error::Candle(candle_core::Error::Msg(format!(
            "the replayed graph differs from the eager pass by {diff} (scale {scale})"
        ))));
    }
    tracing::info!(
        "captured a CUDA graph for inputs {:?}: its replay is within {diff} of the eager pass",
        inputs.iter().map(|t| t.dims().to_vec()).collect::<Vec<_>>()
    );
    Ok(Captured {
        inputs: statics,
        output,
        graph,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A thread that ran a cache's pass counts as alive until it ends; its entries then go, and
    /// a live thread's stay.
    #[test]
    fn entries_of_ended_threads_are_dropped() {
        mark_alive();
        let here = std::thread::current().id();
        let (gone_tx, gone_rx) = std::sync::mpsc::channel();
        let worker = std::thread::spawn(move || {
            mark_alive();
            let id = std::thread::current().id();
            assert!(live_threads().lock().unwrap().contains(&id));
            gone_tx.send(id).unwrap();
        });
        let gone = gone_rx.recv().unwrap();
        worker.join().unwrap();
        assert!(!live_threads().lock().unwrap().contains(&gone));
        let policy = KernelPolicy::current();
        let shape = vec![(vec![1, 4, 8, 8], DType::F32)];
        let mut graphs: HashMap<Signature, u32> = HashMap::from([
            ((here, policy, shape.clone()), 1),
            ((gone, policy, shape.clone()), 2),
        ]);
        assert_eq!(drop_gone_threads(&mut graphs), 1);
        assert_eq!(graphs.len(), 1);
        assert_eq!(graphs.get(&(here, policy, shape)), Some(&1));
        assert_eq!(drop_gone_threads(&mut graphs), 0);
    }
}
