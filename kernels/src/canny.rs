//! Canny's edge detector on a CUDA device (canny.cu): the control image of a `canny` ControlNet
//! made where the frame already is, instead of a download, the host's detector and an upload.
//! The arithmetic is the host's (sdstream's `preprocess::canny`, OpenCV's `cv2.Canny` with
//! aperture 3 and the L1 gradient), bit for bit: the portable twin is that host detector, and
//! core/tests/cuda.rs compares the two on frames and patterns.
//!
//! Hysteresis runs as propagation in 32×32 tiles until a launch changes nothing: each launch
//! reads back one flag, so the detector waits for the device a few times (once per tile
//! boundary the longest chain of weak edges crosses) and is not captured in a CUDA graph.

use candle_core::Tensor;

/// Canny's edges of `image` (`[1, C, H, W]` or `[C, H, W]`, values in [0, 1], C = 1 or 3) on a
/// CUDA device, with OpenCV's thresholds (floored, swapped when `low > high`): C planes of 1 on
/// edges and 0 elsewhere, in `image`'s shape and dtype.
pub fn canny(image: &Tensor, low: f64, high: f64) -> candle_core::Result<Tensor> {
    let dims = image.dims().to_vec();
    let (channels, h, w) = match dims.as_slice() {
        [1, c, h, w] | [c, h, w] => (*c, *h, *w),
        other => {
            candle_core::bail!("sdstream-canny: expected [1, C, H, W] or [C, H, W], got {other:?}")
        }
    };
    if !matches!(channels, 1 | 3) || h == 0 || w == 0 {
        candle_core::bail!(
            "sdstream-canny: expected 1 or 3 channels of a non-empty image, got {dims:?}"
        );
    }
    if h > i32::MAX as usize / 2 || w > i32::MAX as usize / 2 {
        candle_core::bail!("sdstream-canny: {h}×{w} is too large");
    }
    let (low, high) = if low > high { (high, low) } else { (low, high) };
    let (low, high) = (low.floor() as i32, high.floor() as i32);
    #[cfg(feature = "cuda")]
    {
        cuda::canny(image, channels, h, w, low, high)
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (low, high);
        candle_core::bail!("sdstream-canny runs on CUDA only (the host runs its own detector)")
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::{
        CudaSlice, DeviceRepr, LaunchConfig, PushKernelArg,
    };
    use candle_core::cuda_backend::{CudaDType, WrapErr};
    use candle_core::op::BackpropOp;
    use candle_core::{CudaDevice, CudaStorage, DType, Storage, Tensor};

    use crate::ops::grid_stride;

    const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/canny.ptx"));
    const MODULE: &str = "sdstream_canny";
    const THREADS: u32 = 256;
    /// The side of the square tiles `canny_grow` propagates in (canny.cu's `TILE`).
    const TILE: usize = 32;

    /// The edge map as `channels` planes of 1 and 0 in `T`.
    fn planes_of<T: CudaDType + DeviceRepr>(
        dev: &CudaDevice,
        map: &CudaSlice<u8>,
        channels: usize,
        plane: usize,
        suffix: &str,
    ) -> candle_core::Result<CudaStorage> {
        // SAFETY: canny_planes writes every one of the channels · plane values.
        let out = unsafe { dev.alloc::<T>(channels * plane)? };
        let (channels_arg, plane_arg) = (channels as i32, plane as i64);
        let func = dev.get_or_load_custom_func(&format!("canny_planes_{suffix}"), MODULE, PTX)?;
        let mut builder = func.builder();
        builder.arg(map);
        builder.arg(&out);
        builder.arg(&channels_arg);
        builder.arg(&plane_arg);
        // SAFETY: reads below plane, writes below channels · plane.
        unsafe { builder.launch(grid_stride(plane)) }.w()?;
        drop(builder);
        Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
    }

    pub(super) fn canny(
        image: &Tensor,
        channels: usize,
        h: usize,
        w: usize,
        low: i32,
        high: i32,
    ) -> candle_core::Result<Tensor> {
        let planes = image.to_dtype(DType::F32)?.contiguous()?;
        let (storage, layout) = planes.storage_and_layout();
        let Storage::Cuda(cuda) = &*storage else {
            candle_core::bail!("sdstream-canny: the image is not on a CUDA device")
        };
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("sdstream-canny: the image is not contiguous")
        };
        let src = cuda.as_cuda_slice::<f32>()?.slice(start..end);
        let dev = cuda.device().clone();
        let stream = dev.cuda_stream();
        let plane = h * w;
        let (channels_arg, plane_arg, h_arg, w_arg) =
            (channels as i32, plane as i64, h as i32, w as i32);

        // SAFETY: canny_gray writes every grey value before canny_classify reads them, and
        // canny_classify every mark before canny_grow reads them.
        let gray = unsafe { dev.alloc::<u8>(plane)? };
        let map = unsafe { dev.alloc::<u8>(plane)? };
        let func = dev.get_or_load_custom_func("canny_gray", MODULE, PTX)?;
        let mut builder = func.builder();
        builder.arg(&src);
        builder.arg(&gray);
        builder.arg(&channels_arg);
        builder.arg(&plane_arg);
        // SAFETY: reads below channels · plane, writes below plane.
        unsafe { builder.launch(grid_stride(plane)) }.w()?;

        let func = dev.get_or_load_custom_func("canny_classify", MODULE, PTX)?;
        let mut builder = func.builder();
        builder.arg(&gray);
        builder.arg(&map);
        builder.arg(&h_arg);
        builder.arg(&w_arg);
        builder.arg(&low);
        builder.arg(&high);
        let classify = LaunchConfig {
            grid_dim: (w.div_ceil(16) as u32, h.div_ceil(16) as u32, 1),
            block_dim: (16, 16, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: every index is clamped into the h × w image.
        unsafe { builder.launch(classify) }.w()?;

        // Hysteresis: launches until one changes nothing. Each changes at least one mark from
        // CANDIDATE to EDGE or is the last, so there are at most h·w + 1.
        let mut changed = dev.alloc_zeros::<i32>(1)?;
        let grow = dev.get_or_load_custom_func("canny_grow", MODULE, PTX)?;
        let tiles = LaunchConfig {
            grid_dim: (w.div_ceil(TILE) as u32, h.div_ceil(TILE) as u32, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        for _ in 0..=plane {
            stream.memset_zeros(&mut changed).w()?;
            let mut builder = grow.builder();
            builder.arg(&map);
            builder.arg(&h_arg);
            builder.arg(&w_arg);
            builder.arg(&mut changed);
            // SAFETY: every index is checked against the h × w image.
            unsafe { builder.launch(tiles) }.w()?;
            if stream.clone_dtoh(&changed).w()?[0] == 0 {
                break;
            }
        }

        let storage = match image.dtype() {
            DType::F16 => planes_of::<half::f16>(&dev, &map, channels, plane, "f16")?,
            DType::BF16 => planes_of::<half::bf16>(&dev, &map, channels, plane, "bf16")?,
            _ => planes_of::<f32>(&dev, &map, channels, plane, "f32")?,
        };
        Ok(Tensor::from_storage(
            Storage::Cuda(storage),
            image.shape().clone(),
            BackpropOp::none(),
            false,
        ))
    }
}
