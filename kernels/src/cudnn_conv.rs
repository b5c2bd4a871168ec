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
    ActivationDescriptor, ConvBiasActivationForward, ConvDescriptor, ConvForward, Cudnn,
    CudnnDataType, FilterDescriptor, TensorDescriptor, sys,
};
use candle_core::cuda_backend::cudarc::driver::sys::CUdeviceptr;
use candle_core::cuda_backend::cudarc::driver::{
    CudaSlice, CudaStream, CudaView, DevicePtr, DeviceRepr, DeviceSlice, SyncOnDrop,
    ValidAsZeroBits,
};
use candle_core::cuda_backend::{CudaDType, DeviceId};
use candle_core::{CudaStorage, CustomOp2, CustomOp3, DType, Layout, Shape, Tensor};

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

/// The channels-last convolution with its epilogue in the same cuDNN call
/// (`cudnnConvolutionBiasActivationForward`): `relu(conv(x, w) + residual + bias)`, the ReLU
/// and the residual where asked for, f32 arithmetic rounded once to the storage type. `bias` is
/// `[C_out]`; `residual` has the output's shape. Instead of a convolution, then an add kernel for
/// the bias, one for the residual and one for the ReLU, each a pass over the output (an H200
/// profile of one frame: 346 adds and 61 ReLUs, 4.5 ms of 17.7 under ncu). cuDNN may refuse a
/// configuration (its identity activation, for instance, runs with the implicit-precomputed
/// GEMM only): the error says so, and [`super::conv::Conv2d`] then runs the separate ops.
pub fn conv2d_channels_last_fused(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    residual: Option<&Tensor>,
    relu: bool,
    padding: usize,
    stride: usize,
) -> candle_core::Result<Tensor> {
    let x = x.contiguous()?;
    let weight = weight.contiguous()?;
    let bias = bias.contiguous()?;
    let residual = residual.map(Tensor::contiguous).transpose()?;
    x.apply_op3_no_bwd(
        &weight,
        &bias,
        &CudnnConvFused {
            conv: CudnnConv {
                padding,
                stride,
                channels_last: true,
            },
            residual,
            relu,
        },
    )
}

/// How many fused convolutions ran ([`conv2d_channels_last_fused`]), for tests.
pub fn fused_calls() -> u64 {
    FUSED_CALLS.load(std::sync::atomic::Ordering::Relaxed)
}

static FUSED_CALLS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

struct CudnnConvFused {
    conv: CudnnConv,
    residual: Option<Tensor>,
    relu: bool,
}

/// A device pointer handed to cuDNN as it is: the fused call's output doubles as its `z` operand
/// (scaled by zero) where there is no residual, as TensorFlow's fused convolution passes it, and
/// cudarc's safe call wants all its read operands of one type.
struct RawView<T> {
    ptr: CUdeviceptr,
    len: usize,
    stream: Arc<CudaStream>,
    marker: std::marker::PhantomData<T>,
}

impl<T> RawView<T> {
    fn of(view: &impl DevicePtr<T>, stream: &Arc<CudaStream>) -> Self {
        // cudarc makes a buffer's read and write events only in its multi-stream mode, which
        // candle's per-thread default streams never enter (cross-thread order is
        // `QueuedWork`'s): the guard records nothing.
        let (ptr, _guard) = view.device_ptr(stream);
        RawView {
            ptr,
            len: view.len(),
            stream: stream.clone(),
            marker: std::marker::PhantomData,
        }
    }
}

impl<T> DeviceSlice<T> for RawView<T> {
    fn len(&self) -> usize {
        self.len
    }
    fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }
}

impl<T> DevicePtr<T> for RawView<T> {
    fn device_ptr<'a>(&'a self, _stream: &'a CudaStream) -> (CUdeviceptr, SyncOnDrop<'a>) {
        (self.ptr, SyncOnDrop::Sync(None))
    }
}

/// The fused call's own descriptors for one (device, dtype, output channels, ReLU): the bias's
/// `[1, C, 1, 1]` and the activation.
struct FusedDescriptors<T: CudnnDataType> {
    bias: TensorDescriptor<T>,
    act: ActivationDescriptor<f32>,
}

/// (device, dtype, output channels, ReLU).
type FusedKey = (DeviceId, DType, usize, bool);

thread_local! {
    static FUSED: RefCell<HashMap<FusedKey, Rc<dyn Any>>> = RefCell::new(HashMap::new());
}

impl CudnnConvFused {
    fn run<T>(
        &self,
        (xs, xl): (&CudaStorage, &Layout),
        (ws, wl): (&CudaStorage, &Layout),
        (bs, bl): (&CudaStorage, &Layout),
    ) -> candle_core::Result<(CudaStorage, Shape)>
    where
        T: CudnnDataType<Scalar = f32>
            + CudaDType
            + candle_core::WithDType
            + DeviceRepr
            + ValidAsZeroBits
            + 'static,
    {
        let (Some((x0, x1)), Some((w0, w1)), Some((b0, b1))) = (
            xl.contiguous_offsets(),
            wl.contiguous_offsets(),
            bl.contiguous_offsets(),
        ) else {
            candle_core::bail!("sdstream-cudnn-conv-fused: operands must be contiguous")
        };
        let dev = xs.device();
        let dtype = xs.dtype();
        let (xd, wd) = (dims4(xl, "input")?, dims4(wl, "weight")?);
        let plan = self.conv.plan::<T>(dev, dtype, xd, wd)?;
        let c_out = plan.out[3];
        if b1 - b0 != c_out {
            candle_core::bail!(
                "sdstream-cudnn-conv-fused: {} bias values for {c_out} output channels",
                b1 - b0
            );
        }
        let stream = dev.cuda_stream();
        let elements: usize = plan.out.iter().product();
        let residual_guard = self.residual.as_ref().map(|r| r.storage_and_layout());
        let residual = match &residual_guard {
            Some((storage, layout)) => Some(super::fused::residual_view::<T>(
                storage,
                layout,
                &plan.out,
                dtype,
                "sdstream-cudnn-conv-fused",
            )?),
            None => None,
        };
        let src = xs.as_cuda_slice::<T>()?.slice(x0..x1);
        let filter = ws.as_cuda_slice::<T>()?.slice(w0..w1);
        let bias = bs.as_cuda_slice::<T>()?.slice(b0..b1);
        // SAFETY: either call below writes every output element (the legacy one: alpha1 1, z
        // scaled by alpha2).
        let mut dst = unsafe { dev.alloc::<T>(elements)? };
        let operands = GraphOperands {
            x: &src,
            w: &filter,
            bias: Some(&bias),
            residual: residual.as_ref(),
        };
        if self
            .conv
            .through_chosen_engine(dev, dtype, (xd, wd), operands, self.relu, &dst)?
        {
            drop(residual_guard);
            FUSED_CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            return Ok((
                CudaStorage::wrap_cuda_slice(dst, dev.clone()),
                Shape::from(plan.out.to_vec()),
            ));
        }
        let identity =
            sys::cudnnConvolutionFwdAlgo_t::CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_PRECOMP_GEMM;
        if !self.relu && plan.algo != identity {
            candle_core::bail!(
                "sdstream-cudnn-conv-fused: cuDNN's identity activation needs the \
                 implicit-precomputed GEMM, not {:?}",
                plan.algo
            );
        }
        let key = (dev.id(), dtype, c_out, self.relu);
        let cached = FUSED.with(|f| f.borrow().get(&key).cloned());
        let descriptors = match cached {
            Some(d) => d.downcast::<FusedDescriptors<T>>().map_err(|_| {
                candle_core::Error::Msg("sdstream-cudnn-conv-fused: descriptor type".into())
            })?,
            None => {
                let handle = handle(dev)?;
                let mode = if self.relu {
                    sys::cudnnActivationMode_t::CUDNN_ACTIVATION_RELU
                } else {
                    sys::cudnnActivationMode_t::CUDNN_ACTIVATION_IDENTITY
                };
                let d = Rc::new(FusedDescriptors::<T> {
                    bias: handle.create_4d_tensor::<T>(
                        sys::cudnnTensorFormat_t::CUDNN_TENSOR_NCHW,
                        [1, c_int(c_out)?, 1, 1],
                    )?,
                    // As the separate ReLU (candle's, `max(x, 0)`) takes NaN to 0.
                    act: handle.create_activation::<f32>(
                        mode,
                        sys::cudnnNanPropagation_t::CUDNN_NOT_PROPAGATE_NAN,
                        0.0,
                    )?,
                });
                FUSED.with(|f| f.borrow_mut().insert(key, d.clone() as Rc<dyn Any>));
                d
            }
        };
        let src = RawView::<T>::of(&src, &stream);
        let bias = RawView::<T>::of(&bias, &stream);
        let (z, alpha2) = match &residual {
            Some(view) => (RawView::<T>::of(view, &stream), 1.0),
            // No residual: the output as z, scaled by zero (cuDNN does not read it then).
            None => (RawView::<T>::of(&dst, &stream), 0.0),
        };
        let mut workspace = unsafe { dev.alloc::<u8>(plan.workspace.max(1))? };
        let op = ConvBiasActivationForward {
            conv: &plan.conv,
            act: &descriptors.act,
            x: &plan.x,
            w: &plan.w,
            z: &plan.y,
            bias: &descriptors.bias,
            y: &plan.y,
        };
        // SAFETY: the buffers match the descriptors: contiguous NHWC maps of the planned dims
        // and dtype, the bias C_out values, z the output's shape (the residual, checked above, or
        // the output itself under a zero scale); the workspace holds what cuDNN asked for.
        unsafe {
            op.launch(
                plan.algo,
                Some(&mut workspace),
                (T::from_f64(1.0), T::from_f64(alpha2)),
                &src,
                &filter,
                &z,
                &bias,
                &mut dst,
            )
        }?;
        drop(residual_guard);
        FUSED_CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok((
            CudaStorage::wrap_cuda_slice(dst, dev.clone()),
            Shape::from(plan.out.to_vec()),
        ))
    }
}

impl CustomOp3 for CudnnConvFused {
    fn name(&self) -> &'static str {
        "sdstream-cudnn-conv-fused"
    }

    fn cpu_fwd(
        &self,
        _: &candle_core::CpuStorage,
        _: &Layout,
        _: &candle_core::CpuStorage,
        _: &Layout,
        _: &candle_core::CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, Shape)> {
        candle_core::bail!("sdstream-cudnn-conv-fused runs on CUDA only")
    }

    fn cuda_fwd(
        &self,
        x: &CudaStorage,
        xl: &Layout,
        w: &CudaStorage,
        wl: &Layout,
        b: &CudaStorage,
        bl: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        match x.dtype() {
            DType::F32 => self.run::<f32>((x, xl), (w, wl), (b, bl)),
            DType::F16 => self.run::<half::f16>((x, xl), (w, wl), (b, bl)),
            DType::BF16 => self.run::<half::bf16>((x, xl), (w, wl), (b, bl)),
            other => candle_core::bail!("sdstream-cudnn-conv-fused: no convolution for {other:?}"),
        }
    }
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

/// This thread's cuDNN handle for `dev`, made on first use.
fn handle(dev: &candle_core::CudaDevice) -> candle_core::Result<Arc<Cudnn>> {
    let device_id = dev.id();
    HANDLES.with(|h| -> candle_core::Result<Arc<Cudnn>> {
        if let Some(handle) = h.borrow().get(&device_id) {
            return Ok(handle.clone());
        }
        let handle = Cudnn::new(dev.cuda_stream())?;
        h.borrow_mut().insert(device_id, handle.clone());
        Ok(handle)
    })
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

/// The device buffers of a call through cuDNN's graph API ([`CudnnConv::through_chosen_engine`]).
struct GraphOperands<'a, T> {
    x: &'a CudaView<'a, T>,
    w: &'a CudaView<'a, T>,
    bias: Option<&'a CudaView<'a, T>>,
    residual: Option<&'a CudaView<'a, T>>,
}

impl CudnnConv {
    /// Runs this channels-last convolution (input dims `xd`, filter dims `wd`; with the bias,
    /// residual and ReLU `operands` and `relu` name) into `dst` through the engine chosen for
    /// its geometry on this thread ([`super::cudnn_conv_graph`]) where the kernel policy asks
    /// for it (`cuda_conv_engines`). `false` where it did not run: the legacy call runs then.
    fn through_chosen_engine<T: DeviceRepr>(
        &self,
        dev: &candle_core::CudaDevice,
        dtype: DType,
        (xd, wd): ([usize; 4], [usize; 4]),
        operands: GraphOperands<'_, T>,
        relu: bool,
        dst: &CudaSlice<T>,
    ) -> candle_core::Result<bool> {
        use super::cudnn_conv_graph::{Buffers, Epilogue, Geometry, forward};
        if !self.channels_last || !super::KernelPolicy::current().cuda_conv_engines {
            return Ok(false);
        }
        let stream = dev.cuda_stream();
        // cudarc records no events for candle's per-thread streams: the guards hold nothing,
        // and the addresses stay valid while the views live.
        let (x, _x) = operands.x.device_ptr(&stream);
        let (w, _w) = operands.w.device_ptr(&stream);
        let bias = operands.bias.map(|b| b.device_ptr(&stream).0);
        let residual = operands.residual.map(|r| r.device_ptr(&stream).0);
        let (y, _y) = dst.device_ptr(&stream);
        let geometry = Geometry {
            input: xd,
            filter: wd,
            padding: self.padding,
            stride: self.stride,
        };
        let epilogue = Epilogue {
            bias: bias.is_some(),
            residual: residual.is_some(),
            relu,
        };
        // SAFETY: contiguous channels-last operands of these dims and `dtype` (the callers
        // checked), the bias C_out values and the residual the output's dims (checked by
        // `residual_view`), `dst` a fresh buffer of the output's size, all on this thread's
        // stream.
        unsafe {
            forward(
                dev,
                dtype,
                geometry,
                epilogue,
                Buffers {
                    x,
                    w,
                    bias,
                    residual,
                    y,
                },
            )
        }
    }

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
        let handle = handle(dev)?;
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
        let (xd, wd) = (dims4(xl, "input")?, dims4(wl, "weight")?);
        let plan = self.plan::<T>(dev, xs.dtype(), xd, wd)?;
        let src = xs.as_cuda_slice::<T>()?.slice(x0..x1);
        let filter = ws.as_cuda_slice::<T>()?.slice(w0..w1);
        let elements: usize = plan.out.iter().product();
        // SAFETY: the convolution (beta 0) writes every output element.
        let mut dst = unsafe { dev.alloc::<T>(elements)? };
        let operands = GraphOperands {
            x: &src,
            w: &filter,
            bias: None,
            residual: None,
        };
        if self.through_chosen_engine(dev, xs.dtype(), (xd, wd), operands, false, &dst)? {
            return Ok((
                CudaStorage::wrap_cuda_slice(dst, dev.clone()),
                Shape::from(plan.out.to_vec()),
            ));
        }
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
