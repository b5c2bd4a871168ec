//! sdstream's kernels: the floor below its networks, which knows candle and nothing of sdstream.
//! sdstream re-exports it as `sdstream::model::kernels`.
//!
//! CPU kernels shared by every network (UNet, VAE, TAESD, CLIP): convolution (channels-first,
//! [`conv`], and channels-last for the autoencoders, `conv_channels_last`), GroupNorm (with
//! fused SiLU, in either layout), LayerNorm, in-place adds, GEGLU and softmax.
//!
//! candle's CPU ops are generic: each allocates a fresh tensor and walks it once per primitive,
//! and its convolution gathers im2col tiles element by element. The kernels here do the same
//! arithmetic in fewer passes, split across candle's CPU threads with [`for_each_row`] and
//! [`for_each_range`], whose parts run on the persistent workers of [`pool`]. Every kernel has a
//! portable twin built from candle ops: that is what non-CPU devices run, and what the CPU runs
//! too when `SDSTREAM_PORTABLE_KERNELS=1`, so that the GPU code path can be checked against the
//! goldens without a GPU ([`cpu_kernels`] decides).
//! On CUDA, kernels of sdstream's own replace some twins ([`cuda_kernels`] decides): GroupNorm
//! (+ SiLU), group_norm.cu, and a frame's 8-bit conversions on the way on and off the device,
//! transfer.cu; both compiled to PTX by build.rs with the `cuda` feature.
//!
//! Which kernels may run is a value, [`KernelPolicy`]: the process's comes from the `SDSTREAM_*`
//! environment variables, and a caller can scope another on its thread for a while
//! ([`KernelPolicy::scoped`]); the kernels' parts on other threads follow their caller's.

#![deny(missing_docs)]

pub mod alloc;
pub mod attention;
pub mod canny;
pub mod conv;
mod conv_channels_last;
mod conv_direct;
#[cfg(feature = "cuda")]
pub mod cublaslt_linear;
#[cfg(feature = "cudnn")]
pub mod cudnn_attention;
#[cfg(feature = "cudnn")]
mod cudnn_backend;
#[cfg(feature = "cudnn")]
pub(crate) mod cudnn_conv;
#[cfg(feature = "cudnn")]
mod cudnn_conv_graph;
#[cfg(feature = "cuda")]
mod fused;
pub mod gemm_bf16;
pub mod norm;
pub mod ops;
mod padding;
mod policy;
mod pool;
mod simd;
pub mod substitutes;
pub mod transfer;
mod winograd;

pub use winograd::{
    bf16_convolutions as winograd_bf16_convolutions,
    bf16_convolutions_on_this_thread as winograd_bf16_convolutions_on_this_thread,
    convolutions as winograd_convolutions,
    convolutions_on_this_thread as winograd_convolutions_on_this_thread,
    weight_bytes as winograd_weight_bytes,
};

/// Which kernels may run, as a value: the process's from its environment, or one scoped on the
/// calling thread (see the type). Re-exported here so that hosts name it without knowing the
/// crate's modules.
pub use policy::{ChannelsLast, KernelPolicy, PolicyGuard, Winograd};

use candle_core::{CpuStorage, Device, Layout, Storage, Tensor, WithDType};
pub(crate) use pool::threads;

/// Whether the CPU kernels run for tensors on `device`: on the CPU unless the current
/// [`KernelPolicy`] asks for the portable twins (`SDSTREAM_PORTABLE_KERNELS`), never elsewhere.
pub fn cpu_kernels(device: &Device) -> bool {
    device.is_cpu() && !KernelPolicy::current().portable
}

/// Whether sdstream's own CUDA kernels run for tensors on `device`: on a CUDA device unless the
/// current [`KernelPolicy`] turns them off (`SDSTREAM_CUDA_KERNELS=0`, which leaves the portable
/// twins), never elsewhere. Always false without the `cuda` feature.
pub fn cuda_kernels(device: &Device) -> bool {
    device.is_cuda() && KernelPolicy::current().cuda_kernels
}

/// Whether the preprocessors that can run on `device` do ([`canny`]; `soft_edge`, `blur`,
/// `sharpen`, `upscale`, `standard_lineart` and `feedback`'s resize as tensor operations): on a
/// CUDA device, when the current [`KernelPolicy`] allows sdstream's CUDA kernels and
/// preprocessing there (both by default; off with `SDSTREAM_CUDA_KERNELS=0` or
/// `SDSTREAM_CUDA_PREPROCESS=0`). Never elsewhere: the host runs its own.
pub fn preprocess_on_device(device: &Device) -> bool {
    cuda_kernels(device) && KernelPolicy::current().cuda_preprocess
}

/// The work this host thread has queued on a device so far, as a point another thread's work
/// can be made to wait for. candle gives each host thread its own CUDA stream (the driver's
/// per-thread default stream), and nothing orders two threads' streams: a tensor one thread's
/// kernels are still writing may be read by another thread's kernels unless they wait for this
/// mark. On other devices there is nothing to wait for.
pub struct QueuedWork {
    #[cfg(feature = "cuda")]
    event: Option<candle_core::cuda_backend::cudarc::driver::CudaEvent>,
}

impl std::fmt::Debug for QueuedWork {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QueuedWork").finish_non_exhaustive()
    }
}

impl QueuedWork {
    /// Marks what this thread has queued on `device` so far (a CUDA event on its stream).
    pub fn mark(device: &Device) -> candle_core::Result<Self> {
        #[cfg(feature = "cuda")]
        if let Device::Cuda(d) = device {
            use candle_core::cuda_backend::WrapErr;
            let event = d.cuda_stream().record_event(None).w()?;
            return Ok(Self { event: Some(event) });
        }
        let _ = device;
        Ok(Self {
            #[cfg(feature = "cuda")]
            event: None,
        })
    }

    /// Like [`mark`](Self::mark), with the device's clock read as the work passes the mark:
    /// two timed marks give the device's time between them ([`seconds_since`](Self::seconds_since)),
    /// without the host waiting for either.
    pub fn mark_timed(device: &Device) -> candle_core::Result<Self> {
        #[cfg(feature = "cuda")]
        if let Device::Cuda(d) = device {
            use candle_core::cuda_backend::WrapErr;
            use candle_core::cuda_backend::cudarc::driver::sys::CUevent_flags;
            let event = d
                .cuda_stream()
                .record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
                .w()?;
            return Ok(Self { event: Some(event) });
        }
        Self::mark(device)
    }

    /// Whether the marked work is done, without waiting (always, off CUDA). An error the
    /// device met meanwhile is returned.
    pub fn is_done(&self) -> candle_core::Result<bool> {
        #[cfg(feature = "cuda")]
        if let Some(event) = &self.event {
            use candle_core::cuda_backend::WrapErr;
            return event.try_is_complete().w();
        }
        Ok(true)
    }

    /// The device's seconds from `start` to this mark, both made by
    /// [`mark_timed`](Self::mark_timed) (negative where this mark was passed first, on another
    /// stream); `None` while either is not done (this never waits), and off CUDA, where
    /// nothing was timed.
    pub fn seconds_since(&self, start: &QueuedWork) -> candle_core::Result<Option<f64>> {
        #[cfg(feature = "cuda")]
        if let (Some(end), Some(begin)) = (&self.event, &start.event) {
            use candle_core::cuda_backend::WrapErr;
            use candle_core::cuda_backend::cudarc::driver::result;
            if !(self.is_done()? && start.is_done()?) {
                return Ok(None);
            }
            // The driver's call itself, not cudarc's `elapsed_ms`: that binds the context,
            // which takes (and returns as its own) an error another thread's release left for
            // the next call, and waits for both events, which are done here anyway.
            // SAFETY: both events are alive (borrowed) and were created by cudarc.
            let ms = unsafe { result::event::elapsed(begin.cu_event(), end.cu_event()) }.w()?;
            return Ok(Some(f64::from(ms) / 1e3));
        }
        let _ = start;
        Ok(None)
    }

    /// Blocks the host until the marked work is done (at once off CUDA).
    pub fn wait_host(&self) -> candle_core::Result<()> {
        #[cfg(feature = "cuda")]
        if let Some(event) = &self.event {
            use candle_core::cuda_backend::WrapErr;
            event.synchronize().w()?;
        }
        Ok(())
    }

    /// Makes the work this thread queues on `device` from now on wait until the marked work
    /// is done (without blocking the host).
    pub fn wait_here(&self, device: &Device) -> candle_core::Result<()> {
        #[cfg(feature = "cuda")]
        if let (Device::Cuda(d), Some(event)) = (device, &self.event) {
            use candle_core::cuda_backend::WrapErr;
            d.cuda_stream().wait(event).w()?;
        }
        let _ = device;
        Ok(())
    }
}

/// Makes `device`'s CUDA context current on this thread, for a thread that has run nothing on
/// it yet and starts with calls that do not bind it themselves (event queries); nothing off
/// CUDA.
pub fn bind_to_thread(device: &Device) -> candle_core::Result<()> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(d) = device {
        use candle_core::cuda_backend::WrapErr;
        d.cuda_stream().context().bind_to_thread().w()?;
    }
    let _ = device;
    Ok(())
}

/// The order of one object's calls from several host threads on a device. Each call starts
/// with [`enter`](Self::enter), which makes this thread's work wait for what the last call left
/// queued if another thread made it, and ends with [`leave`](Self::leave), which marks what it
/// left queued. A host that serialises its calls (a mutex, the GIL) orders them on the host
/// only: a prompt encoded by one thread's kernels, read by the next call's on another thread's
/// stream, would otherwise be read before it is written. On the same thread (every engine's
/// worker) the wait is never made; off CUDA nothing is marked.
#[derive(Debug, Default)]
pub struct ThreadHandoff {
    last: Option<(std::thread::ThreadId, QueuedWork)>,
}

impl ThreadHandoff {
    /// Makes this thread's work on `device` wait for the last call's, where another thread
    /// made that call.
    pub fn enter(&self, device: &Device) -> candle_core::Result<()> {
        match &self.last {
            Some((thread, work)) if *thread != std::thread::current().id() => {
                work.wait_here(device)
            }
            _ => Ok(()),
        }
    }

    /// Marks the work this call left queued on `device` (on CUDA devices; elsewhere the work
    /// is done when the call returns).
    pub fn leave(&mut self, device: &Device) -> candle_core::Result<()> {
        self.last = if device.is_cuda() {
            Some((std::thread::current().id(), QueuedWork::mark(device)?))
        } else {
            None
        };
        Ok(())
    }
}

/// Prepares a freshly opened device for frames. On CUDA: memory a frame frees stays in the
/// device's stream-ordered pool for the next frame (release threshold: unlimited), where the
/// driver's default gives it back at every synchronisation, so that each frame would map its
/// working memory (hundreds of MB for the VAE at 512²) anew. What a stream has used at most
/// stays reserved while the process runs, as PyTorch's caching allocator does. And buffers
/// allocated from now on make no CUDA events, unless the kernel policy keeps cudarc's event
/// tracking ([`KernelPolicy::cuda_event_tracking`], which says why).
pub fn prepare_device(device: &Device) -> candle_core::Result<()> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(d) = device {
        use candle_core::cuda_backend::WrapErr;
        use candle_core::cuda_backend::cudarc::driver::{result, sys};
        if !KernelPolicy::current().cuda_event_tracking {
            // SAFETY: cudarc's events order one context's streams; this context has one
            // stream per thread, and work that crosses threads waits on `QueuedWork`'s events,
            // which are made whatever this says.
            unsafe { d.disable_event_tracking() };
        }
        let stream = d.cuda_stream();
        let context = stream.context();
        context.bind_to_thread().w()?;
        let mut threshold = u64::MAX;
        // SAFETY: the device is the context's own; the attribute takes a u64, which `threshold` is.
        unsafe {
            let pool = result::device::get_mem_pool(context.cu_device()).w()?;
            result::mem_pool::set_attribute(
                pool,
                sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
                (&mut threshold as *mut u64).cast(),
            )
            .w()?;
        }
    }
    let _ = device;
    Ok(())
}

/// Below this many elements per thread, starting a thread costs more than it saves.
const MIN_ELEMENTS_PER_THREAD: usize = 1 << 16;

/// Threads worth using for `items` independent work items that touch `volume` elements.
fn thread_count(items: usize, volume: usize) -> usize {
    threads()
        .min(items)
        .min(volume / MIN_ELEMENTS_PER_THREAD)
        .max(1)
}

/// Runs `f(row_index, row)` over the `row_len`-long rows of `dst` (the last may be shorter),
/// spread over candle's CPU threads when the work is big enough to pay for them.
pub(crate) fn for_each_row<T: Send>(
    dst: &mut [T],
    row_len: usize,
    f: impl Fn(usize, &mut [T]) + Sync,
) {
    if row_len == 0 || dst.is_empty() {
        return;
    }
    let rows = dst.len().div_ceil(row_len);
    let threads = thread_count(rows, dst.len());
    let per_thread = rows.div_ceil(threads);
    let f = &f;
    let run = move |first_row: usize, chunk: &mut [T]| {
        for (j, row) in chunk.chunks_mut(row_len).enumerate() {
            f(first_row + j, row);
        }
    };
    if threads == 1 {
        run(0, dst);
        return;
    }
    for_each_chunk(dst, per_thread * row_len, &|part, chunk| {
        run(part * per_thread, chunk)
    });
}

/// Runs `f(part, chunk)` over the `chunk_len`-long chunks of `data` (the last may be shorter),
/// one part each on [`pool`], the first on the calling thread.
fn for_each_chunk<T: Send>(data: &mut [T], chunk_len: usize, f: &(dyn Fn(usize, &mut [T]) + Sync)) {
    let len = data.len();
    let base = SharedMut(data.as_mut_ptr());
    pool::run(len.div_ceil(chunk_len), &|part| {
        let start = part * chunk_len;
        // SAFETY: the parts' chunks are disjoint pieces of `data`, which outlives the call.
        let chunk = unsafe {
            std::slice::from_raw_parts_mut(base.ptr().add(start), chunk_len.min(len - start))
        };
        f(part, chunk);
    });
}

/// Runs `work(range)` over `0..items` split into `threads` contiguous ranges, the first on the
/// calling thread. For kernels whose items write scattered parts of one output (through
/// [`SharedMut`]); the caller picks `threads` (see [`thread_count`]).
fn for_each_range(items: usize, threads: usize, work: &(dyn Fn(std::ops::Range<usize>) + Sync)) {
    if threads <= 1 || items <= 1 {
        work(0..items);
        return;
    }
    let per_thread = items.div_ceil(threads);
    pool::run(items.div_ceil(per_thread), &|part| {
        work(part * per_thread..((part + 1) * per_thread).min(items));
    });
}

/// A raw pointer into one output buffer, shared by threads that write disjoint elements of it.
struct SharedMut<T>(*mut T);

// Copyable whatever `T` is (a derive would ask `T: Copy`): it is only a pointer.
impl<T> Clone for SharedMut<T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for SharedMut<T> {}

// SAFETY: the wrapper only moves the pointer between threads; every user writes elements that no
// other thread reads or writes (each call site says why), and the buffer outlives the scope.
unsafe impl<T: Send> Send for SharedMut<T> {}
// SAFETY: as above.
unsafe impl<T: Send> Sync for SharedMut<T> {}

impl<T> SharedMut<T> {
    /// The pointer (a method, so that closures capture the `Sync` wrapper, not its field).
    fn ptr(self) -> *mut T {
        self.0
    }
}

/// A zeroed buffer of `len` values for a kernel's output or scratch. Buffers this large come
/// from the operating system as fresh pages each time (glibc maps them anew), and at the
/// autoencoders' full-resolution maps (64 MiB and more) faulting them in 4 KiB at a time is a
/// visible share of the frame; on Linux the buffer is marked for transparent huge pages before
/// its first touch, so it faults in 2 MiB at a time (docs/ARCHITECTURE.md "Performance"). The
/// advice is only advice: where it is refused, nothing changes.
pub(crate) fn zeroed_buffer<T: WithDType>(len: usize) -> Vec<T> {
    let buffer = vec![T::zero(); len];
    #[cfg(target_os = "linux")]
    {
        const HUGE_PAGE: usize = 2 << 20;
        let bytes = len * std::mem::size_of::<T>();
        // Only the largest maps: smaller buffers are reused from the heap, and asking for huge
        // pages has the kernel compact memory on the fault, a stall worth paying only here.
        if bytes >= 16 * HUGE_PAGE {
            let start = buffer.as_ptr() as usize;
            let first = start.next_multiple_of(HUGE_PAGE);
            let end = (start + bytes) / HUGE_PAGE * HUGE_PAGE;
            if end > first {
                // SAFETY: the range lies inside the buffer just allocated; madvise changes
                // how its pages are backed, never their contents (still zero).
                unsafe {
                    libc::madvise(first as *mut libc::c_void, end - first, libc::MADV_HUGEPAGE);
                }
            }
        }
    }
    buffer
}

/// Whether two tensors hold the same values, bit for bit: the same tensor, or, on the CPU, equal
/// dtypes, shapes and bytes (a compare costs a read of both, far less than any projection of
/// them). Off the CPU only identity counts.
pub fn same_values(a: &Tensor, b: &Tensor) -> bool {
    if a.id() == b.id() {
        return true;
    }
    if a.dtype() != b.dtype() || a.shape() != b.shape() {
        return false;
    }
    let (sa, la) = a.storage_and_layout();
    let (sb, lb) = b.storage_and_layout();
    let (Some((a0, a1)), Some((b0, b1))) = (la.contiguous_offsets(), lb.contiguous_offsets())
    else {
        return false;
    };
    fn bits_eq<T: Copy, B: PartialEq>(x: &[T], y: &[T], bits: impl Fn(T) -> B) -> bool {
        x.len() == y.len() && x.iter().zip(y).all(|(&p, &q)| bits(p) == bits(q))
    }
    match (&*sa, &*sb) {
        (Storage::Cpu(x), Storage::Cpu(y)) => match (x, y) {
            (CpuStorage::F32(x), CpuStorage::F32(y)) => {
                bits_eq(&x[a0..a1], &y[b0..b1], f32::to_bits)
            }
            (CpuStorage::F64(x), CpuStorage::F64(y)) => {
                bits_eq(&x[a0..a1], &y[b0..b1], f64::to_bits)
            }
            (CpuStorage::F16(x), CpuStorage::F16(y)) => {
                bits_eq(&x[a0..a1], &y[b0..b1], half::f16::to_bits)
            }
            (CpuStorage::BF16(x), CpuStorage::BF16(y)) => {
                bits_eq(&x[a0..a1], &y[b0..b1], half::bf16::to_bits)
            }
            _ => false,
        },
        _ => false,
    }
}

/// The elements of a contiguous operand of a custom op; `op` names the op in the error.
fn contiguous_slice<'a, T: WithDType>(
    storage: &'a CpuStorage,
    layout: &Layout,
    op: &str,
) -> candle_core::Result<&'a [T]> {
    let data = storage.as_slice::<T>()?;
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => candle_core::bail!("{op}: operand is not contiguous"),
    }
}

/// Evaluates `$body` with the type alias `$t` bound to the Rust type of `$dtype` (one of the
/// float dtypes listed), or bails naming `$op`.
macro_rules! with_float_type {
    ($dtype:expr, $op:expr, [$($variant:ident => $ty:ty),+], |$t:ident| $body:expr) => {
        match $dtype {
            $(candle_core::DType::$variant => {
                type $t = $ty;
                $body
            })+
            other => candle_core::bail!("{}: unsupported dtype {other:?} on the CPU", $op),
        }
    };
    ($dtype:expr, $op:expr, |$t:ident| $body:expr) => {
        $crate::with_float_type!(
            $dtype,
            $op,
            [F32 => f32, F16 => half::f16, BF16 => half::bf16, F64 => f64],
            |$t| $body
        )
    };
}
pub(crate) use with_float_type;
