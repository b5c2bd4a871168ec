//! A frame's way on and off a CUDA device in 8 bits (transfer.cu): the host sends packed RGB8 and
//! receives packed 8-bit pixels, a quarter of the bytes of the f32 planes, and the conversions run
//! on the device with the host's arithmetic (sdstream's `frame` module), bit for bit. Used by
//! sdstream's `Frame::to_tensor` and `Image::from_tensor` when [`super::cuda_kernels`] holds for
//! the device; elsewhere the host converts.
//!
//! With the kernel policy's `cuda_pinned` (`SDSTREAM_CUDA_PINNED=1`) the bytes cross through
//! page-locked host buffers, one for uploads and one for downloads per thread, kept and reused:
//! from pageable memory the driver copies through a staging buffer of its own, and the upload
//! is not asynchronous. The upload buffer is write-combined (the host only writes it); the
//! download buffer is cached (the host reads it). Each buffer has an event of its own, recorded
//! after every copy through it: the host waits on it before it reads a download or overwrites an
//! upload. (cudarc's buffers carry an event too, but record it only where the context manages
//! several streams' synchronisation, which candle's single stream does not: relying on it, the
//! first GPU run read downloads before their copies ended, 6,288 of 12,060 bytes wrong.)

use candle_core::{CustomOp1, DType, Device, Tensor};

/// Packed RGB8 `[H·W·3]` on the device → `[1, 3, H, W]` f32 in [−1, 1] (`2·(u/255) − 1`).
pub fn rgb8_to_unit_planes(
    rgb: Vec<u8>,
    width: usize,
    height: usize,
    device: &Device,
) -> candle_core::Result<Tensor> {
    #[cfg(feature = "cuda")]
    let packed = match device {
        Device::Cuda(cuda) if super::KernelPolicy::current().cuda_pinned && !rgb.is_empty() => {
            cuda::upload_pinned(&rgb, cuda)?
        }
        _ => Tensor::from_vec(rgb, width * height * 3, device)?,
    };
    #[cfg(not(feature = "cuda"))]
    let packed = Tensor::from_vec(rgb, width * height * 3, device)?;
    packed
        .apply_op1_no_bwd(&Rgb8ToUnitPlanes)?
        .reshape((1, 3, height, width))
}

/// `[1, 3, H, W]` or `[3, H, W]` in [0, 1] (f32, f16 or bf16) on the device → packed pixels of
/// `bpp` bytes (3 or 4) on the host, red/green/blue at `rgb_order`, alpha 255 with 4 bytes.
pub fn unit_planes_to_packed8(
    planes: &Tensor,
    bpp: usize,
    rgb_order: [usize; 3],
) -> candle_core::Result<Vec<u8>> {
    if !(3..=4).contains(&bpp) || rgb_order.iter().any(|&c| c >= bpp) {
        candle_core::bail!("sdstream-packed8: {bpp} bytes per pixel with channels {rgb_order:?}");
    }
    let planes = planes.contiguous()?;
    let packed = planes.apply_op1_no_bwd(&UnitPlanesToPacked8 { bpp, rgb_order })?;
    #[cfg(feature = "cuda")]
    if packed.device().is_cuda() && super::KernelPolicy::current().cuda_pinned {
        return cuda::download_pinned(&packed);
    }
    packed.to_vec1::<u8>()
}

struct Rgb8ToUnitPlanes;

impl CustomOp1 for Rgb8ToUnitPlanes {
    fn name(&self) -> &'static str {
        "sdstream-rgb8-to-unit-planes"
    }

    fn cpu_fwd(
        &self,
        _: &candle_core::CpuStorage,
        _: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        candle_core::bail!(
            "sdstream-rgb8-to-unit-planes runs on CUDA only (the host converts itself)"
        )
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, candle_core::Shape)> {
        cuda::rgb8_to_unit_planes(s, l)
    }
}

#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
struct UnitPlanesToPacked8 {
    bpp: usize,
    rgb_order: [usize; 3],
}

impl CustomOp1 for UnitPlanesToPacked8 {
    fn name(&self) -> &'static str {
        "sdstream-unit-planes-to-packed8"
    }

    fn cpu_fwd(
        &self,
        _: &candle_core::CpuStorage,
        _: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        candle_core::bail!(
            "sdstream-unit-planes-to-packed8 runs on CUDA only (the host converts itself)"
        )
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, candle_core::Shape)> {
        cuda::unit_planes_to_packed8(self, s, l)
    }
}

/// Whether the element type is one the device converts (the rest stay on the host path).
pub fn converts(dtype: DType) -> bool {
    matches!(dtype, DType::F32 | DType::F16 | DType::BF16)
}

#[cfg(feature = "cuda")]
mod cuda {
    use std::cell::RefCell;
    use std::sync::Arc;

    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::sys::CU_MEMHOSTALLOC_WRITECOMBINED as WRITE_COMBINED;
    use candle_core::cuda_backend::cudarc::driver::{
        CudaContext, CudaEvent, DeviceRepr, LaunchConfig, PinnedHostSlice, PushKernelArg,
    };
    use candle_core::cuda_backend::{CudaDType, WrapErr};
    use candle_core::op::BackpropOp;
    use candle_core::{CudaDevice, CudaStorage, DType, Layout, Shape, Storage, Tensor};

    /// A page-locked buffer and the event recorded on the stream after the last copy through it.
    struct Pinned {
        buffer: PinnedHostSlice<u8>,
        copied: CudaEvent,
    }

    impl Pinned {
        /// A buffer of `len` bytes allocated with `flags` (cudarc's `alloc_pinned_with_flags`).
        ///
        /// # Safety
        /// The bytes are uninitialised: each must be written before it is read.
        unsafe fn new(
            context: &Arc<CudaContext>,
            len: usize,
            flags: u32,
        ) -> candle_core::Result<Self> {
            Ok(Pinned {
                // SAFETY: passed on to the caller.
                buffer: unsafe { context.alloc_pinned_with_flags::<u8>(len, flags) }.w()?,
                copied: context.new_event(None).w()?,
            })
        }
    }

    impl Drop for Pinned {
        /// A buffer replaced by a larger one (or left behind by its thread) may still be read or
        /// written by its last copy: the memory is freed only after that copy.
        fn drop(&mut self) {
            if let Err(e) = self.copied.synchronize() {
                tracing::warn!("waiting for a pinned buffer's last copy before freeing it: {e}");
            }
        }
    }

    thread_local! {
        /// This thread's page-locked upload buffer (write-combined), the length of its last
        /// frame.
        static UPLOAD: RefCell<Option<Pinned>> = const { RefCell::new(None) };
        /// This thread's page-locked download buffer (cached), at least its largest frame.
        static DOWNLOAD: RefCell<Option<Pinned>> = const { RefCell::new(None) };
    }

    /// `bytes` on `dev` as a `[len]` u8 tensor, copied from this thread's pinned upload buffer
    /// (allocated again when the frame's length or the device's context changes).
    pub(super) fn upload_pinned(bytes: &[u8], dev: &CudaDevice) -> candle_core::Result<Tensor> {
        let stream = dev.cuda_stream();
        let context = stream.context().clone();
        UPLOAD.with(|cell| {
            let mut slot = cell.borrow_mut();
            let fits = slot.as_ref().is_some_and(|p| {
                p.buffer.len() == bytes.len() && Arc::ptr_eq(p.buffer.context(), &context)
            });
            if !fits {
                // SAFETY: every byte is written below before the copy reads it.
                *slot = Some(unsafe { Pinned::new(&context, bytes.len(), WRITE_COMBINED) }?);
            }
            let pinned = slot.as_mut().expect("made above");
            // The copy that last read the buffer must be over before it is overwritten.
            pinned.copied.synchronize().w()?;
            pinned.buffer.as_mut_slice().w()?.copy_from_slice(bytes);
            // SAFETY: the copy below writes every byte before anything reads them.
            let mut dst = unsafe { dev.alloc::<u8>(bytes.len())? };
            stream.memcpy_htod(&pinned.buffer, &mut dst).w()?;
            pinned.copied.record(&stream).w()?;
            Ok(Tensor::from_storage(
                Storage::Cuda(CudaStorage::wrap_cuda_slice(dst, dev.clone())),
                bytes.len(),
                BackpropOp::none(),
                false,
            ))
        })
    }

    /// The bytes of a contiguous u8 tensor on a CUDA device, through this thread's pinned
    /// download buffer (grown when a frame is larger than any before).
    pub(super) fn download_pinned(packed: &Tensor) -> candle_core::Result<Vec<u8>> {
        let (storage, layout) = packed.storage_and_layout();
        let Storage::Cuda(cuda) = &*storage else {
            candle_core::bail!("sdstream-packed8: the pixels are not on a CUDA device")
        };
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("sdstream-packed8: the pixels are not contiguous")
        };
        let len = end - start;
        if len == 0 {
            return Ok(Vec::new());
        }
        let src = cuda.as_cuda_slice::<u8>()?.slice(start..end);
        let stream = cuda.device().cuda_stream();
        let context = stream.context().clone();
        DOWNLOAD.with(|cell| {
            let mut slot = cell.borrow_mut();
            let fits = slot.as_ref().is_some_and(|p| {
                p.buffer.len() >= len && Arc::ptr_eq(p.buffer.context(), &context)
            });
            if !fits {
                // Cached, not write-combined: the host reads it. SAFETY: only the bytes the
                // copy below writes are read.
                *slot = Some(unsafe { Pinned::new(&context, len, 0) }?);
            }
            let pinned = slot.as_mut().expect("made above");
            // cudarc copies as many bytes as its destination holds, so the destination is the
            // buffer's first `len` bytes (a plain slice: the driver still sees page-locked memory).
            let head = &mut pinned.buffer.as_mut_slice().w()?[..len];
            stream.memcpy_dtoh(&src, head).w()?;
            pinned.copied.record(&stream).w()?;
            pinned.copied.synchronize().w()?;
            Ok(pinned.buffer.as_slice().w()?[..len].to_vec())
        })
    }

    const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/transfer.ptx"));
    const MODULE: &str = "sdstream_transfer";
    const THREADS: u32 = 256;

    fn launch_config(items: usize) -> LaunchConfig {
        LaunchConfig {
            grid_dim: ((items as u32).div_ceil(THREADS).max(1), 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        }
    }

    pub(super) fn rgb8_to_unit_planes(
        s: &CudaStorage,
        l: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let Some((start, end)) = l.contiguous_offsets() else {
            candle_core::bail!("sdstream-rgb8-to-unit-planes: the input is not contiguous")
        };
        if s.dtype() != DType::U8 || (end - start) % 3 != 0 {
            candle_core::bail!(
                "sdstream-rgb8-to-unit-planes: expected packed RGB8 bytes, got {:?} × {}",
                s.dtype(),
                end - start
            );
        }
        let src = s.as_cuda_slice::<u8>()?.slice(start..end);
        let plane = (end - start) / 3;
        let dev = s.device();
        // SAFETY: the launch below writes all 3 · plane elements before anything reads them.
        let dst = unsafe { dev.alloc::<f32>(3 * plane)? };
        if plane > 0 {
            let func = dev.get_or_load_custom_func("rgb8_to_unit_planes", MODULE, PTX)?;
            let mut builder = func.builder();
            let plane_arg = plane as i64;
            builder.arg(&src);
            builder.arg(&dst);
            builder.arg(&plane_arg);
            // SAFETY: the arguments match the kernel's parameters; indices stay below 3 · plane.
            unsafe { builder.launch(launch_config(plane)) }.w()?;
        }
        Ok((
            CudaStorage::wrap_cuda_slice(dst, dev.clone()),
            Shape::from(3 * plane),
        ))
    }

    pub(super) fn unit_planes_to_packed8(
        op: &super::UnitPlanesToPacked8,
        s: &CudaStorage,
        l: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        match s.dtype() {
            DType::F32 => run::<f32>(op, s, l, "f32"),
            DType::F16 => run::<half::f16>(op, s, l, "f16"),
            DType::BF16 => run::<half::bf16>(op, s, l, "bf16"),
            other => candle_core::bail!("sdstream-unit-planes-to-packed8: no kernel for {other:?}"),
        }
    }

    fn run<T: CudaDType + DeviceRepr>(
        op: &super::UnitPlanesToPacked8,
        s: &CudaStorage,
        l: &Layout,
        suffix: &str,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let Some((start, end)) = l.contiguous_offsets() else {
            candle_core::bail!("sdstream-unit-planes-to-packed8: the input is not contiguous")
        };
        let dims = l.shape().dims();
        let channels = match dims {
            [3, _, _] | [1, 3, _, _] => 3,
            _ => candle_core::bail!(
                "sdstream-unit-planes-to-packed8: expected [3, H, W] or [1, 3, H, W], got {dims:?}"
            ),
        };
        let plane = (end - start) / channels;
        let src = s.as_cuda_slice::<T>()?.slice(start..end);
        let dev = s.device();
        let bytes = plane * op.bpp;
        // SAFETY: the launch below writes every byte of every pixel (alpha too with 4 bytes).
        let dst = unsafe { dev.alloc::<u8>(bytes)? };
        if plane > 0 {
            let func = dev.get_or_load_custom_func(
                &format!("unit_planes_to_packed8_{suffix}"),
                MODULE,
                PTX,
            )?;
            let mut builder = func.builder();
            let plane_arg = plane as i64;
            let [r, g, b] = op.rgb_order.map(|c| c as i32);
            let bpp = op.bpp as i32;
            builder.arg(&src);
            builder.arg(&dst);
            builder.arg(&plane_arg);
            builder.arg(&bpp);
            builder.arg(&r);
            builder.arg(&g);
            builder.arg(&b);
            // SAFETY: the arguments match the kernel's parameters; reads stay below 3 · plane
            // and writes below plane · bpp (r, g, b < bpp was checked by the caller).
            unsafe { builder.launch(launch_config(plane)) }.w()?;
        }
        Ok((
            CudaStorage::wrap_cuda_slice(dst, dev.clone()),
            Shape::from(bytes),
        ))
    }
}
