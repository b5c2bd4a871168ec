//! A linear layer's product with its bias and a residual in cuBLASLt's epilogue, on a CUDA
//! device (kernel policy `cuda_fused_linear`): `y = x·Wᵀ + b + r` in one call, f32 arithmetic
//! rounded once to the storage type, instead of a GEMM, then an add kernel for the bias and one
//! for the residual, each a pass over the output. A UNet transformer block has six such adds
//! (the attentions' output projections and the feed-forward's, each with its residual) and its
//! transformer two more (the projections in and out): 144 of the 346 adds an H200 profile
//! counted in a frame of sd-turbo.
//!
//! In cuBLASLt's column-major terms the row-major product `y [M, N] = x [M, K] · Wᵀ` is
//! `yᵀ (N × M) = W (N × K) · xᵀ (K × M)`: the weight, stored `[N, K]` row-major, is a K × N
//! column-major matrix taken transposed; `x` is K × M as it lies; the output and the residual
//! are N × M with leading dimension N; the bias runs along the output's rows (one value per
//! output feature), as cuBLASLt's BIAS epilogue adds it. f32 tensors compute in plain f32
//! (`CUBLAS_COMPUTE_32F`, no TF32), so that the f32 goldens hold; f16 and bf16 in f32 with f32
//! scales. Each shape's descriptors and algorithm (cuBLASLt's heuristic, told the operands'
//! actual alignment) are made once per thread and reused; the bias pointer is set per call.

use std::cell::RefCell;
use std::collections::HashMap;
use std::ffi::c_void;
use std::mem::size_of;

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::cublaslt::{result, sys};
use candle_core::cuda_backend::cudarc::driver::sys::CUdeviceptr;
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, DevicePtr};
use candle_core::cuda_backend::{CudaDType, DeviceId};
use candle_core::{CudaStorage, CustomOp3, DType, Layout, Shape, Tensor};

/// `x·Wᵀ + bias (+ residual)` for `x` `[…, K]`, `weight` `[N, K]`, `bias` `[N]` and `residual`
/// the output's shape `[…, N]`, all of one dtype on one CUDA device. An error (an operand not
/// 16-byte aligned, a configuration cuBLASLt has no algorithm for) leaves the caller to run the
/// separate ops.
pub fn linear_fused(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    residual: Option<&Tensor>,
) -> candle_core::Result<Tensor> {
    let x = x.contiguous()?;
    let weight = weight.contiguous()?;
    let bias = bias.contiguous()?;
    let residual = residual.map(Tensor::contiguous).transpose()?;
    x.apply_op3_no_bwd(&weight, &bias, &FusedLinear { residual })
}

/// How many products ran with their epilogue in cuBLASLt's call ([`linear_fused`]), for tests.
pub fn fused_calls() -> u64 {
    FUSED_CALLS.load(std::sync::atomic::Ordering::Relaxed)
}

static FUSED_CALLS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

struct FusedLinear {
    residual: Option<Tensor>,
}

/// One shape's descriptors and algorithm: (device, dtype, M, N, K, residual, the operands'
/// alignments as cuBLASLt's preferences take them).
type PlanKey = (DeviceId, DType, usize, usize, usize, bool, [u32; 4]);

struct Plan {
    desc: sys::cublasLtMatmulDesc_t,
    a: sys::cublasLtMatrixLayout_t,
    b: sys::cublasLtMatrixLayout_t,
    c: sys::cublasLtMatrixLayout_t,
    algo: sys::cublasLtMatmulAlgo_t,
}

impl Drop for Plan {
    fn drop(&mut self) {
        // SAFETY: made by this module, destroyed once; failures only leak.
        unsafe {
            let _ = result::destroy_matrix_layout(self.a);
            let _ = result::destroy_matrix_layout(self.b);
            let _ = result::destroy_matrix_layout(self.c);
            let _ = result::destroy_matmul_desc(self.desc);
        }
    }
}

/// A thread's cuBLASLt handle and workspace on one device, and its plans.
struct Context {
    handle: sys::cublasLtHandle_t,
    workspace: CudaSlice<u8>,
    plans: HashMap<PlanKey, Plan>,
}

impl Drop for Context {
    fn drop(&mut self) {
        self.plans.clear();
        // SAFETY: created by this module, destroyed once.
        let _ = unsafe { result::destroy_handle(self.handle) };
    }
}

/// NVIDIA's advice for cuBLASLt's workspace: 32 MiB on Hopper, 4 MiB before.
fn workspace_bytes(dev: &candle_core::CudaDevice) -> usize {
    use candle_core::cuda_backend::cudarc::driver::sys::CUdevice_attribute;
    let major = dev
        .cuda_stream()
        .context()
        .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)
        .unwrap_or(0);
    if major >= 9 { 32 << 20 } else { 4 << 20 }
}

thread_local! {
    static CONTEXTS: RefCell<HashMap<DeviceId, Context>> = RefCell::new(HashMap::new());
}

/// A cuBLASLt error as candle's, naming the step that failed.
fn lt_error(what: &str) -> impl FnOnce(result::CublasError) -> candle_core::Error + '_ {
    move |e| candle_core::Error::Msg(format!("sdstream-fused-linear: {what}: {e:?}"))
}

/// The largest power of two, up to 256, that divides `address` (cuBLASLt's alignment
/// preferences: its heuristic otherwise assumes 256 bytes).
fn alignment(address: CUdeviceptr) -> u32 {
    if address == 0 {
        256
    } else {
        1u32 << address.trailing_zeros().min(8)
    }
}

/// A cuBLASLt attribute's value as the pointer and size its setters take.
fn attr<T>(value: &T) -> (*const c_void, usize) {
    (value as *const T as *const c_void, size_of::<T>())
}

impl FusedLinear {
    fn run<T: CudaDType + candle_core::cuda_backend::cudarc::driver::DeviceRepr>(
        &self,
        (xs, xl): (&CudaStorage, &Layout),
        (ws, wl): (&CudaStorage, &Layout),
        (bs, bl): (&CudaStorage, &Layout),
        (matrix_type, compute_type): (sys::cudaDataType, sys::cublasComputeType_t),
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let name = "sdstream-fused-linear";
        let (Some((x0, x1)), Some((w0, w1)), Some((b0, b1))) = (
            xl.contiguous_offsets(),
            wl.contiguous_offsets(),
            bl.contiguous_offsets(),
        ) else {
            candle_core::bail!("{name}: operands must be contiguous")
        };
        let (n, k) = wl.shape().dims2()?;
        let x_dims = xl.shape().dims();
        if x_dims.last() != Some(&k) || b1 - b0 != n || k == 0 || n == 0 {
            candle_core::bail!(
                "{name}: input {:?}, weight {:?}, bias {:?}",
                xl.shape(),
                wl.shape(),
                bl.shape()
            )
        }
        let m = (x1 - x0) / k;
        let mut out_dims = x_dims.to_vec();
        *out_dims.last_mut().expect("the input has a last dimension") = n;
        let dev = xs.device();
        let dtype = xs.dtype();
        let stream = dev.cuda_stream();
        // SAFETY: the call writes every output value (beta scales the residual, or is 0).
        let dst = unsafe { dev.alloc::<T>(m * n)? };
        if m == 0 {
            return Ok((
                CudaStorage::wrap_cuda_slice(dst, dev.clone()),
                Shape::from(out_dims),
            ));
        }
        let residual_guard = self.residual.as_ref().map(|r| r.storage_and_layout());
        // The call, in a scope of its own: the views and their addresses end with it.
        {
            let x = xs.as_cuda_slice::<T>()?.slice(x0..x1);
            let w = ws.as_cuda_slice::<T>()?.slice(w0..w1);
            let b = bs.as_cuda_slice::<T>()?.slice(b0..b1);
            // cudarc makes a buffer's read and write events only in its multi-stream mode, which
            // candle's per-thread default streams never enter (cross-thread order is
            // `QueuedWork`'s): the guards record nothing, and the addresses stay valid while
            // the views live.
            let (x_ptr, _x_guard) = x.device_ptr(&stream);
            let (w_ptr, _w_guard) = w.device_ptr(&stream);
            let (b_ptr, _b_guard) = b.device_ptr(&stream);
            let (d_ptr, _d_guard) = dst.device_ptr(&stream);
            let residual_view = residual_guard
                .as_ref()
                .map(|(storage, layout)| {
                    super::fused::residual_view::<T>(storage, layout, &out_dims, dtype, name)
                })
                .transpose()?;
            let (c_ptr, _c_guard) = match &residual_view {
                Some(view) => {
                    let (p, g) = view.device_ptr(&stream);
                    (p, Some(g))
                }
                // No residual: beta is 0 and cuBLASLt does not read C; D stands in for it.
                None => (d_ptr, None),
            };
            if [x_ptr, w_ptr, b_ptr, c_ptr, d_ptr]
                .iter()
                .any(|p| p % 16 != 0)
            {
                candle_core::bail!("{name}: an operand is not 16-byte aligned")
            }
            let aligned = [
                alignment(w_ptr),
                alignment(x_ptr),
                alignment(c_ptr),
                alignment(d_ptr),
            ];
            let key = (dev.id(), dtype, m, n, k, residual_view.is_some(), aligned);
            let beta: f32 = if residual_view.is_some() { 1.0 } else { 0.0 };
            let alpha: f32 = 1.0;
            CONTEXTS.with(|contexts| -> candle_core::Result<()> {
                let mut contexts = contexts.borrow_mut();
                let context = match contexts.entry(dev.id()) {
                    std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
                    std::collections::hash_map::Entry::Vacant(e) => {
                        let handle = result::create_handle().map_err(lt_error("cublasLtCreate"))?;
                        // SAFETY: the workspace is only cuBLASLt's scratch space.
                        let workspace = unsafe { dev.alloc::<u8>(workspace_bytes(dev))? };
                        e.insert(Context {
                            handle,
                            workspace,
                            plans: HashMap::new(),
                        })
                    }
                };
                if !context.plans.contains_key(&key) {
                    let plan = make_plan(
                        context,
                        (m, n, k),
                        (matrix_type, compute_type),
                        aligned,
                        b_ptr,
                    )?;
                    context.plans.insert(key, plan);
                }
                let plan = &context.plans[&key];
                let (ws_ptr, _ws_guard) = context.workspace.device_ptr(&stream);
                let workspace_len = context.workspace.len();
                // SAFETY: the descriptor is this module's; the value is a device pointer.
                let (value, size) = attr(&b_ptr);
                unsafe {
                    result::set_matmul_desc_attribute(
                        plan.desc,
                        sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_BIAS_POINTER,
                        value,
                        size,
                    )
                }
                .map_err(lt_error("bias pointer"))?;
                // SAFETY: the layouts describe the buffers: W N·K values, x M·K, C and D M·N, all of
                // the plan's type, on this device, aligned as the plan was told; the bias N values;
                // the workspace is as large as the preference said.
                unsafe {
                    result::matmul(
                        context.handle,
                        plan.desc,
                        attr(&alpha).0,
                        attr(&beta).0,
                        w_ptr as *const c_void,
                        plan.a,
                        x_ptr as *const c_void,
                        plan.b,
                        c_ptr as *const c_void,
                        plan.c,
                        d_ptr as *mut c_void,
                        plan.c,
                        &plan.algo,
                        ws_ptr as *mut c_void,
                        workspace_len,
                        stream.cu_stream() as sys::cudaStream_t,
                    )
                }
                .map_err(lt_error("cublasLtMatmul"))
            })?;
        }
        drop(residual_guard);
        FUSED_CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok((
            CudaStorage::wrap_cuda_slice(dst, dev.clone()),
            Shape::from(out_dims),
        ))
    }
}

/// The descriptors of one shape and cuBLASLt's choice of algorithm for them.
fn make_plan(
    context: &Context,
    (m, n, k): (usize, usize, usize),
    (matrix_type, compute_type): (sys::cudaDataType, sys::cublasComputeType_t),
    aligned: [u32; 4],
    bias_ptr: CUdeviceptr,
) -> candle_core::Result<Plan> {
    let (m, n, k) = (m as u64, n as u64, k as u64);
    let desc = result::create_matmul_desc(compute_type, sys::cudaDataType_t::CUDA_R_32F)
        .map_err(lt_error("matmul descriptor"))?;
    // The plan owns each descriptor as soon as it exists, so that an error below frees them.
    let mut plan = Plan {
        desc,
        a: std::ptr::null_mut(),
        b: std::ptr::null_mut(),
        c: std::ptr::null_mut(),
        // SAFETY: plain data, overwritten by the heuristic's choice before any use.
        algo: unsafe { std::mem::zeroed() },
    };
    // A: W as stored, K × N column-major, taken transposed; B: x, K × M; C and D: N × M.
    plan.a =
        result::create_matrix_layout(matrix_type, k, n, k as i64).map_err(lt_error("layout W"))?;
    plan.b =
        result::create_matrix_layout(matrix_type, k, m, k as i64).map_err(lt_error("layout x"))?;
    plan.c =
        result::create_matrix_layout(matrix_type, n, m, n as i64).map_err(lt_error("layout y"))?;
    let transpose = candle_core::cuda_backend::cudarc::cublas::sys::cublasOperation_t::CUBLAS_OP_T;
    let epilogue = sys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_BIAS;
    let settings: [(sys::cublasLtMatmulDescAttributes_t, (*const c_void, usize)); 3] = [
        (
            sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSA,
            attr(&transpose),
        ),
        (
            sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_EPILOGUE,
            attr(&epilogue),
        ),
        (
            sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_BIAS_POINTER,
            attr(&bias_ptr),
        ),
    ];
    for (attribute, (value, size)) in settings {
        // SAFETY: the descriptor is live; each value has its attribute's type.
        unsafe { result::set_matmul_desc_attribute(plan.desc, attribute, value, size) }
            .map_err(lt_error("matmul attribute"))?;
    }
    let pref = result::create_matmul_pref().map_err(lt_error("preference"))?;
    let workspace = context.workspace.len() as u64;
    let preferences = [
        (
            sys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
            attr(&workspace),
        ),
        (
            sys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES,
            attr(&aligned[0]),
        ),
        (
            sys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
            attr(&aligned[1]),
        ),
        (
            sys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES,
            attr(&aligned[2]),
        ),
        (
            sys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES,
            attr(&aligned[3]),
        ),
    ];
    let mut outcome = Ok(());
    for (attribute, (value, size)) in preferences {
        // SAFETY: the preference is live; each value has its attribute's type.
        outcome = unsafe { result::set_matmul_pref_attribute(pref, attribute, value, size) }
            .map_err(lt_error("preference attribute"));
        if outcome.is_err() {
            break;
        }
    }
    let heuristic = outcome.and_then(|()| {
        // SAFETY: every descriptor is live and describes the call's operands.
        unsafe {
            result::get_matmul_algo_heuristic(
                context.handle,
                plan.desc,
                plan.a,
                plan.b,
                plan.c,
                plan.c,
                pref,
            )
        }
        .map_err(lt_error("no algorithm (cublasLtMatmulAlgoGetHeuristic)"))
    });
    // SAFETY: made above, destroyed once.
    let _ = unsafe { result::destroy_matmul_pref(pref) };
    plan.algo = heuristic?.algo;
    Ok(plan)
}

impl CustomOp3 for FusedLinear {
    fn name(&self) -> &'static str {
        "sdstream-fused-linear"
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
        candle_core::bail!("sdstream-fused-linear runs on CUDA only")
    }

    fn cuda_fwd(
        &self,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
        s3: &CudaStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        use sys::cublasComputeType_t::CUBLAS_COMPUTE_32F;
        use sys::cudaDataType_t::{CUDA_R_16BF, CUDA_R_16F, CUDA_R_32F};
        if s2.dtype() != s1.dtype() || s3.dtype() != s1.dtype() {
            candle_core::bail!(
                "sdstream-fused-linear: input {:?}, weight {:?}, bias {:?}",
                s1.dtype(),
                s2.dtype(),
                s3.dtype()
            )
        }
        let operands = ((s1, l1), (s2, l2), (s3, l3));
        match s1.dtype() {
            DType::F32 => self.run::<f32>(
                operands.0,
                operands.1,
                operands.2,
                (CUDA_R_32F, CUBLAS_COMPUTE_32F),
            ),
            DType::F16 => self.run::<half::f16>(
                operands.0,
                operands.1,
                operands.2,
                (CUDA_R_16F, CUBLAS_COMPUTE_32F),
            ),
            DType::BF16 => self.run::<half::bf16>(
                operands.0,
                operands.1,
                operands.2,
                (CUDA_R_16BF, CUBLAS_COMPUTE_32F),
            ),
            other => candle_core::bail!("sdstream-fused-linear: no product for {other:?}"),
        }
    }
}
