//! Convolution through cuDNN on a CUDA device (feature `cudnn`), in place of candle's im2col and
//! GEMM, whose column matrix at the autoencoders' 512² maps is hundreds of MB per convolution.
//!
//! Unlike candle's own cuDNN path, the arithmetic is always f32: f16 and bf16 tensors are
//! convolved with f32 accumulation (cuDNN's "pseudo half" configuration, as PyTorch does; candle
//! accumulates f16 in f16), on tensor cores; f32 tensors with plain FMA math (no TF32), so that
//! the f32 goldens hold on the GPU as on the CPU. Each geometry's descriptors and algorithm
//! (the implicit-precomputed GEMM, else cuDNN's heuristic choice) are made once per thread and
//! reused every frame. Maps may be channels first (NCHW) or, for networks that keep them so,
//! channels last (NHWC, with filters `[C_out, kh, kw, C_in]`): cuDNN's tensor-core kernels
//! compute in NHWC and transpose NCHW operands around every call.

use std::any::Any;
use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::Arc;

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::cudnn::{
    ConvDescriptor, ConvForward, Cudnn, CudnnDataType, FilterDescriptor, TensorDescriptor, sys,
};
use candle_core::cuda_backend::cudarc::driver::{DeviceRepr, ValidAsZeroBits};
use candle_core::cuda_backend::{CudaDType, DeviceId};
use candle_core::{CudaStorage, CustomOp2, DType, Layout, Shape, Tensor};

/// `x` `[B, C_in, H, W]` convolved with `weight` `[C_out, C_in, kh, kw]` (no bias), symmetric
/// zero padding `padding`, stride `stride`: candle's `conv2d(x, w, padding, stride, 1, 1)`.
pub fn conv2d(
    x: &Tensor,
    weight: &Tensor,
    padding: usize,
    stride: usize,
) -> candle_core::Result<Tensor> {
    convolve(x, weight, padding, stride, false)
}

/// The same convolution over channels-last maps: `x` `[B, H, W, C_in]`, `weight` `[C_out, kh,
/// kw, C_in]` (cuDNN's NHWC filter layout), returning `[B, H_out, W_out, C_out]`. The layout
/// cuDNN's tensor-core kernels compute in, so that no transposes run around the call.
pub fn conv2d_channels_last(
    x: &Tensor,
    weight: &Tensor,
    padding: usize,
    stride: usize,
) -> candle_core::Result<Tensor> {
    convolve(x, weight, padding, stride, true)
}

/// Either layout's convolution, operands made contiguous.
fn convolve(
    x: &Tensor,
    weight: &Tensor,
    padding: usize,
    stride: usize,
    channels_last: bool,
) -> candle_core::Result<Tensor> {
    let x = x.contiguous()?;
    let weight = weight.contiguous()?;
    x.apply_op2_no_bwd(
        &weight,
        &CudnnConv {
            padding,
            stride,
            channels_last,
        },
    )
}

struct CudnnConv {
    padding: usize,
    stride: usize,
    /// Maps `[B, H, W, C]` and filters `[C_out, kh, kw, C_in]` (cuDNN's NHWC format).
    channels_last: bool,
}

/// One geometry: (device, dtype, input dims, weight dims, padding, stride, channels last), the
/// dims as the tensors hold them.
type Key = (DeviceId, DType, [usize; 4], [usize; 4], usize, usize, bool);

struct Plan<T: CudnnDataType> {
    conv: ConvDescriptor<f32>,
    x: TensorDescriptor<T>,
    w: FilterDescriptor<T>,
    y: TensorDescriptor<T>,
    algo: sys::cudnnConvolutionFwdAlgo_t,
    workspace: usize,
    /// The output's dims as its tensor holds them (`[B, C, H, W]`, or `[B, H, W, C]`).
    out: [usize; 4],
}

thread_local! {
    // cuDNN handles and descriptors are neither Send nor Sync: one set per thread and device.
    static HANDLES: RefCell<HashMap<DeviceId, Arc<Cudnn>>> = RefCell::new(HashMap::new());
    static PLANS: RefCell<HashMap<Key, Rc<dyn Any>>> = RefCell::new(HashMap::new());
}

fn dims4(l: &Layout, what: &str) -> candle_core::Result<[usize; 4]> {
    match *l.shape().dims() {
        [a, b, c, d] => Ok([a, b, c, d]),
        ref other => candle_core::bail!("sdstream-cudnn-conv: {what} must be 4-D, got {other:?}"),
    }
}

fn c_int(v: usize) -> candle_core::Result<std::ffi::c_int> {
    std::ffi::c_int::try_from(v)
        .map_err(|_| candle_core::Error::Msg(format!("sdstream-cudnn-conv: {v} is too large")))
}

impl CudnnConv {
    fn plan<T: CudnnDataType + 'static>(
        &self,
        dev: &candle_core::CudaDevice,
        dtype: DType,
        xd: [usize; 4],
        wd: [usize; 4],
    ) -> candle_core::Result<Rc<Plan<T>>> {
        let device_id = dev.id();
        let key: Key = (
            device_id,
            dtype,
            xd,
            wd,
            self.padding,
            self.stride,
            self.channels_last,
        );
        if let Some(plan) = PLANS.with(|p| p.borrow().get(&key).cloned()) {
            return plan
                .downcast::<Plan<T>>()
                .map_err(|_| candle_core::Error::Msg("sdstream-cudnn-conv: plan type".into()));
        }
        let handle = HANDLES.with(|h| -> candle_core::Result<Arc<Cudnn>> {
            if let Some(handle) = h.borrow().get(&device_id) {
                return Ok(handle.clone());
            }
            let handle = Cudnn::new(dev.cuda_stream())?;
            h.borrow_mut().insert(device_id, handle.clone());
            Ok(handle)
        })?;
        // cuDNN takes dims as (n, c, h, w) whatever the memory layout its format names.
        let (xd, wd) = if self.channels_last {
            let ([b, h, w, c], [k, r, s, wc]) = (xd, wd);
            ([b, c, h, w], [k, wc, r, s])
        } else {
            (xd, wd)
        };
        let [b, c_in, h, w] = xd;
        let [c_out, wc_in, kh, kw] = wd;
        if wc_in != c_in {
            candle_core::bail!("sdstream-cudnn-conv: input has {c_in} channels, weight {wc_in}");
        }
        let (p, s) = (self.padding, self.stride);
        if h + 2 * p < kh || w + 2 * p < kw || s == 0 {
            candle_core::bail!("sdstream-cudnn-conv: kernel {kh}x{kw} over {h}x{w} (padding {p})");
        }
        let out = [b, c_out, (h + 2 * p - kh) / s + 1, (w + 2 * p - kw) / s + 1];
        let format = if self.channels_last {
            sys::cudnnTensorFormat_t::CUDNN_TENSOR_NHWC
        } else {
            sys::cudnnTensorFormat_t::CUDNN_TENSOR_NCHW
        };
        let mut conv = handle.create_conv2d::<f32>(
            [c_int(p)?, c_int(p)?],
            [c_int(s)?, c_int(s)?],
            [1, 1],
            sys::cudnnConvolutionMode_t::CUDNN_CROSS_CORRELATION,
        )?;
        let math = if dtype == DType::F32 {
            sys::cudnnMathType_t::CUDNN_FMA_MATH
        } else {
            sys::cudnnMathType_t::CUDNN_TENSOR_OP_MATH
        };
        conv.set_math_type(math)?;
        let to_c = |d: [usize; 4]| -> candle_core::Result<[std::ffi::c_int; 4]> {
            Ok([c_int(d[0])?, c_int(d[1])?, c_int(d[2])?, c_int(d[3])?])
        };
        let x = handle.create_4d_tensor::<T>(format, to_c(xd)?)?;
        let w = handle.create_4d_filter::<T>(format, to_c(wd)?)?;
        let y = handle.create_4d_tensor::<T>(format, to_c(out)?)?;
        let forward = ConvForward {
            conv: &conv,
            x: &x,
            w: &w,
            y: &y,
        };
        // The implicit-precomputed GEMM where cuDNN offers it: the transforms its heuristic may
        // prefer (Winograd, FFT) round f16 more coarsely (measured on the tiny full VAE: 18.8
        // levels max against f32, where the GEMM stays within the CPU's f16 bound of 10).
        let precomputed =
            sys::cudnnConvolutionFwdAlgo_t::CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_PRECOMP_GEMM;
        let (algo, workspace) = match forward.get_workspace_size(precomputed) {
            Ok(bytes) => (precomputed, bytes),
            Err(_) => {
                let algo = forward.pick_algorithm()?;
                (algo, forward.get_workspace_size(algo)?)
            }
        };
        let out = if self.channels_last {
            let [b, c, h, w] = out;
            [b, h, w, c]
        } else {
            out
        };
        let plan = Rc::new(Plan {
            conv,
            x,
            w,
            y,
            algo,
            workspace,
            out,
        });
        PLANS.with(|p| p.borrow_mut().insert(key, plan.clone() as Rc<dyn Any>));
        Ok(plan)
    }

    fn run<T>(
        &self,
        (xs, xl): (&CudaStorage, &Layout),
        (ws, wl): (&CudaStorage, &Layout),
    ) -> candle_core::Result<(CudaStorage, Shape)>
    where
        T: CudnnDataType<Scalar = f32>
            + CudaDType
            + candle_core::WithDType
            + DeviceRepr
            + ValidAsZeroBits
            + 'static,
    {
        let (Some((x0, x1)), Some((w0, w1))) = (xl.contiguous_offsets(), wl.contiguous_offsets())
        else {
            candle_core::bail!("sdstream-cudnn-conv: operands must be contiguous")
        };
        let dev = xs.device();
        let plan = self.plan::<T>(dev, xs.dtype(), dims4(xl, "input")?, dims4(wl, "weight")?)?;
        let src = xs.as_cuda_slice::<T>()?.slice(x0..x1);
        let filter = ws.as_cuda_slice::<T>()?.slice(w0..w1);
        let elements: usize = plan.out.iter().product();
        // SAFETY: the convolution (beta 0) writes every output element.
        let mut dst = unsafe { dev.alloc::<T>(elements)? };
        let mut workspace = unsafe { dev.alloc::<u8>(plan.workspace.max(1))? };
        let forward = ConvForward {
            conv: &plan.conv,
            x: &plan.x,
            w: &plan.w,
            y: &plan.y,
        };
        // SAFETY: the buffers match the descriptors: contiguous NCHW (or NHWC, as planned) of
        // the planned dims and dtype; the workspace holds what cuDNN asked for this algorithm.
        unsafe {
            forward.launch(
                plan.algo,
                Some(&mut workspace),
                (T::from_f64(1.0), T::from_f64(0.0)),
                &src,
                &filter,
                &mut dst,
            )
        }?;
        Ok((
            CudaStorage::wrap_cuda_slice(dst, dev.clone()),
            Shape::from(plan.out.to_vec()),
        ))
    }
}

impl CustomOp2 for CudnnConv {
    fn name(&self) -> &'static str {
        "sdstream-cudnn-conv"
    }

    fn cpu_fwd(
        &self,
        _: &candle_core::CpuStorage,
        _: &Layout,
        _: &candle_core::CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, Shape)> {
        candle_core::bail!("sdstream-cudnn-conv runs on CUDA only")
    }

    fn cuda_fwd(
        &self,
        x: &CudaStorage,
        xl: &Layout,
        w: &CudaStorage,
        wl: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        match x.dtype() {
            DType::F32 => self.run::<f32>((x, xl), (w, wl)),
            DType::F16 => self.run::<half::f16>((x, xl), (w, wl)),
            DType::BF16 => self.run::<half::bf16>((x, xl), (w, wl)),
            other => candle_core::bail!("sdstream-cudnn-conv: no convolution for {other:?}"),
        }
    }
}
