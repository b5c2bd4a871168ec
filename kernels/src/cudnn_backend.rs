//! cuDNN's backend (graph) API in a few owned pieces, for the graphs sdstream hands cuDNN:
//! attention (`cudnn_attention`) and convolutions with their epilogue (`cudnn_conv_graph`).
//! Every descriptor is destroyed with its owner; every failure is an error naming what was
//! being made, with cuDNN's own account of it. Handles are per thread and device, on the
//! thread's stream of that device (candle's stream is per thread).

use std::cell::RefCell;
use std::collections::HashMap;
use std::ffi::c_void;
use std::rc::Rc;

use candle_core::cuda_backend::DeviceId;
use candle_core::cuda_backend::cudarc::cudnn::sys;

pub(crate) use sys::cudnnBackendAttributeName_t as Attr;
pub(crate) use sys::cudnnBackendAttributeType_t as Type;
pub(crate) use sys::cudnnBackendDescriptorType_t as Kind;
pub(crate) use sys::cudnnDataType_t::CUDNN_DATA_FLOAT as F32;

/// A cuDNN status as candle's error, with cuDNN's own account of the last failure.
pub(crate) fn check(status: sys::cudnnStatus_t, what: &str) -> candle_core::Result<()> {
    if status == sys::cudnnStatus_t::CUDNN_STATUS_SUCCESS {
        return Ok(());
    }
    let mut message = [0 as std::ffi::c_char; 512];
    // SAFETY: cuDNN writes at most `len` bytes, NUL-terminated; its error string is static.
    let (name, detail) = unsafe {
        sys::cudnnGetLastErrorString(message.as_mut_ptr(), message.len());
        (
            std::ffi::CStr::from_ptr(sys::cudnnGetErrorString(status)).to_string_lossy(),
            std::ffi::CStr::from_ptr(message.as_ptr()).to_string_lossy(),
        )
    };
    candle_core::bail!("sdstream-cudnn: {what}: {name} {detail}")
}

/// A backend descriptor, destroyed with its owner.
pub(crate) struct Descriptor(pub(crate) sys::cudnnBackendDescriptor_t);

impl Drop for Descriptor {
    fn drop(&mut self) {
        // SAFETY: made by cudnnBackendCreateDescriptor, destroyed once; failures only leak.
        let _ = unsafe { sys::cudnnBackendDestroyDescriptor(self.0) };
    }
}

impl Descriptor {
    pub(crate) fn new(kind: Kind) -> candle_core::Result<Self> {
        let mut raw = std::ptr::null_mut();
        // SAFETY: cuDNN writes the new descriptor's handle.
        check(
            unsafe { sys::cudnnBackendCreateDescriptor(kind, &mut raw) },
            "create descriptor",
        )?;
        Ok(Self(raw))
    }

    /// Sets attribute `name` to `values`, whose element type `ty` names (the caller's promise:
    /// `T` is that type's C representation).
    pub(crate) fn set<T>(&self, name: Attr, ty: Type, values: &[T]) -> candle_core::Result<()> {
        // SAFETY: `values` holds `len` elements of the C type `ty` names; cuDNN copies them.
        check(
            unsafe {
                sys::cudnnBackendSetAttribute(
                    self.0,
                    name,
                    ty,
                    values.len() as i64,
                    values.as_ptr() as *const c_void,
                )
            },
            &format!("set {name:?}"),
        )
    }

    pub(crate) fn set_data_type(
        &self,
        name: Attr,
        dtype: sys::cudnnDataType_t,
    ) -> candle_core::Result<()> {
        self.set(name, Type::CUDNN_TYPE_DATA_TYPE, &[dtype])
    }

    pub(crate) fn set_i64(&self, name: Attr, values: &[i64]) -> candle_core::Result<()> {
        self.set(name, Type::CUDNN_TYPE_INT64, values)
    }

    pub(crate) fn set_descriptors(
        &self,
        name: Attr,
        values: &[&Descriptor],
    ) -> candle_core::Result<()> {
        let raw: Vec<sys::cudnnBackendDescriptor_t> = values.iter().map(|d| d.0).collect();
        self.set(name, Type::CUDNN_TYPE_BACKEND_DESCRIPTOR, &raw)
    }

    pub(crate) fn finalize(self, what: &str) -> candle_core::Result<Self> {
        // SAFETY: a live descriptor.
        check(
            unsafe { sys::cudnnBackendFinalize(self.0) },
            &format!("finalize {what}"),
        )?;
        Ok(self)
    }

    /// Attribute `name`: at most `values.len()` elements of the C type `ty` names, written
    /// into `values`; how many cuDNN wrote.
    ///
    /// # Safety
    /// `T` is the C representation of `ty` (for descriptors, `values` holds created
    /// descriptors of the kind the attribute has, which cuDNN fills).
    pub(crate) unsafe fn get<T>(
        &self,
        name: Attr,
        ty: Type,
        values: &mut [T],
    ) -> candle_core::Result<usize> {
        let mut written = 0i64;
        // SAFETY: room for `len` elements of `ty`'s C type (the caller's promise).
        check(
            unsafe {
                sys::cudnnBackendGetAttribute(
                    self.0,
                    name,
                    ty,
                    values.len() as i64,
                    &mut written,
                    values.as_mut_ptr() as *mut c_void,
                )
            },
            &format!("get {name:?}"),
        )?;
        Ok(written.clamp(0, values.len() as i64) as usize)
    }

    /// Attribute `name`, a single int64.
    pub(crate) fn get_i64(&self, name: Attr) -> candle_core::Result<i64> {
        let mut value = [0i64];
        // SAFETY: CUDNN_TYPE_INT64's C type is int64_t.
        unsafe { self.get(name, Type::CUDNN_TYPE_INT64, &mut value) }?;
        Ok(value[0])
    }
}

/// What a tensor of a graph is to the variant pack.
#[derive(Clone, Copy, PartialEq)]
pub(crate) enum Role {
    /// A device buffer the variant pack points at (16-byte aligned: the callers check).
    Operand,
    /// Only the graph sees it.
    Virtual,
    /// A host value the variant pack points at, read when the call is queued.
    ByValue,
}

/// A tensor of a graph: `dtype`, `dims` and `strides` (as many as the graph's tensors have),
/// id `uid`.
pub(crate) fn tensor(
    uid: i64,
    dtype: sys::cudnnDataType_t,
    dims: &[i64],
    strides: &[i64],
    role: Role,
) -> candle_core::Result<Descriptor> {
    let t = Descriptor::new(Kind::CUDNN_BACKEND_TENSOR_DESCRIPTOR)?;
    t.set_data_type(Attr::CUDNN_ATTR_TENSOR_DATA_TYPE, dtype)?;
    t.set_i64(Attr::CUDNN_ATTR_TENSOR_DIMENSIONS, dims)?;
    t.set_i64(Attr::CUDNN_ATTR_TENSOR_STRIDES, strides)?;
    t.set_i64(Attr::CUDNN_ATTR_TENSOR_UNIQUE_ID, &[uid])?;
    // 16 bytes for by-value scalars too, as NVIDIA's frontend declares them (the heuristic
    // takes 4 as well, but plan finalization checks more than the heuristic does).
    t.set_i64(Attr::CUDNN_ATTR_TENSOR_BYTE_ALIGNMENT, &[16])?;
    let boolean = Type::CUDNN_TYPE_BOOLEAN;
    t.set(
        Attr::CUDNN_ATTR_TENSOR_IS_VIRTUAL,
        boolean,
        &[role == Role::Virtual],
    )?;
    if role == Role::ByValue {
        t.set(Attr::CUDNN_ATTR_TENSOR_IS_BY_VALUE, boolean, &[true])?;
    }
    t.finalize("tensor")
}

/// `y = mode(x, b)` (or `mode(x)`), computed in f32. NaN propagation is cuDNN's default except
/// for the ReLU, which takes NaN to 0 as the separate ReLU (candle's `max(x, 0)`) does.
pub(crate) fn pointwise(
    mode: sys::cudnnPointwiseMode_t,
    x: &Descriptor,
    b: Option<&Descriptor>,
    y: &Descriptor,
) -> candle_core::Result<[Descriptor; 2]> {
    let pw = Descriptor::new(Kind::CUDNN_BACKEND_POINTWISE_DESCRIPTOR)?;
    pw.set(
        Attr::CUDNN_ATTR_POINTWISE_MODE,
        Type::CUDNN_TYPE_POINTWISE_MODE,
        &[mode],
    )?;
    pw.set_data_type(Attr::CUDNN_ATTR_POINTWISE_MATH_PREC, F32)?;
    if mode == sys::cudnnPointwiseMode_t::CUDNN_POINTWISE_RELU_FWD {
        pw.set(
            Attr::CUDNN_ATTR_POINTWISE_NAN_PROPAGATION,
            Type::CUDNN_TYPE_NAN_PROPOGATION,
            &[sys::cudnnNanPropagation_t::CUDNN_NOT_PROPAGATE_NAN],
        )?;
    }
    let pw = pw.finalize("pointwise")?;
    let op = Descriptor::new(Kind::CUDNN_BACKEND_OPERATION_POINTWISE_DESCRIPTOR)?;
    op.set_descriptors(Attr::CUDNN_ATTR_OPERATION_POINTWISE_PW_DESCRIPTOR, &[&pw])?;
    op.set_descriptors(Attr::CUDNN_ATTR_OPERATION_POINTWISE_XDESC, &[x])?;
    if let Some(b) = b {
        op.set_descriptors(Attr::CUDNN_ATTR_OPERATION_POINTWISE_BDESC, &[b])?;
    }
    op.set_descriptors(Attr::CUDNN_ATTR_OPERATION_POINTWISE_YDESC, &[y])?;
    Ok([pw, op.finalize(&format!("pointwise {mode:?}"))?])
}

/// The operation graph over `operations` (in order), tied to `handle` where there is one
/// (cuDNN 9's headers deprecate the attribute, but its earlier releases ask for it, and
/// NVIDIA's frontend still sets it; a deviceless build has no handle to give). `dynamic`: a
/// dynamic-shape graph, whose plans may take their kernels from a kernel cache.
pub(crate) fn operation_graph(
    operations: &[Descriptor],
    handle: Option<sys::cudnnHandle_t>,
    dynamic: bool,
) -> candle_core::Result<Descriptor> {
    let graph = Descriptor::new(Kind::CUDNN_BACKEND_OPERATIONGRAPH_DESCRIPTOR)?;
    let ops: Vec<&Descriptor> = operations.iter().collect();
    graph.set_descriptors(Attr::CUDNN_ATTR_OPERATIONGRAPH_OPS, &ops)?;
    if dynamic {
        graph.set(
            Attr::CUDNN_ATTR_OPERATIONGRAPH_IS_DYNAMIC_SHAPE_ENABLED,
            Type::CUDNN_TYPE_BOOLEAN,
            &[true],
        )?;
    }
    if let Some(handle) = handle {
        graph.set(
            Attr::CUDNN_ATTR_OPERATIONGRAPH_HANDLE,
            Type::CUDNN_TYPE_HANDLE,
            &[handle],
        )?;
    }
    graph.finalize("operation graph")
}

/// The engine configurations cuDNN's heuristic (`mode`) offers for `graph`, best first
/// (for the device `properties` describe, where given, instead of the handle's).
pub(crate) fn engine_configs(
    graph: &Descriptor,
    mode: sys::cudnnBackendHeurMode_t,
    properties: Option<&Descriptor>,
) -> candle_core::Result<Vec<Descriptor>> {
    let heuristic = Descriptor::new(Kind::CUDNN_BACKEND_ENGINEHEUR_DESCRIPTOR)?;
    heuristic.set_descriptors(Attr::CUDNN_ATTR_ENGINEHEUR_OPERATION_GRAPH, &[graph])?;
    heuristic.set(
        Attr::CUDNN_ATTR_ENGINEHEUR_MODE,
        Type::CUDNN_TYPE_HEUR_MODE,
        &[mode],
    )?;
    if let Some(properties) = properties {
        heuristic.set_descriptors(Attr::CUDNN_ATTR_ENGINEHEUR_DEVICEPROP, &[properties])?;
    }
    let heuristic = heuristic.finalize("heuristic")?;
    let mut offered = 0i64;
    // SAFETY: asks for the count only (no elements written).
    check(
        unsafe {
            sys::cudnnBackendGetAttribute(
                heuristic.0,
                Attr::CUDNN_ATTR_ENGINEHEUR_RESULTS,
                Type::CUDNN_TYPE_BACKEND_DESCRIPTOR,
                0,
                &mut offered,
                std::ptr::null_mut(),
            )
        },
        "heuristic results",
    )?;
    let mut configs = (0..offered.max(0))
        .map(|_| Descriptor::new(Kind::CUDNN_BACKEND_ENGINECFG_DESCRIPTOR))
        .collect::<candle_core::Result<Vec<_>>>()?;
    let mut raw: Vec<sys::cudnnBackendDescriptor_t> = configs.iter().map(|c| c.0).collect();
    // SAFETY: `raw` holds `offered` created engine-config descriptors for cuDNN to fill.
    let filled = unsafe {
        heuristic.get(
            Attr::CUDNN_ATTR_ENGINEHEUR_RESULTS,
            Type::CUDNN_TYPE_BACKEND_DESCRIPTOR,
            &mut raw,
        )
    }?;
    configs.truncate(filled);
    Ok(configs)
}

/// An engine configuration's engine: its index among cuDNN's engines for the graph and the
/// numerical notes cuDNN gives it (how its arithmetic differs from the plain formula's).
pub(crate) struct EngineInfo {
    /// `CUDNN_ATTR_ENGINE_GLOBAL_INDEX`: which of cuDNN's engines, for logs.
    pub(crate) index: i64,
    pub(crate) numerical_notes: Vec<sys::cudnnBackendNumericalNote_t>,
    /// Whether building its plan compiles its kernel (NVRTC): a build that takes time.
    pub(crate) runtime_compiled: bool,
}

/// What `config`'s engine is ([`EngineInfo`]).
pub(crate) fn engine_info(config: &Descriptor) -> candle_core::Result<EngineInfo> {
    let engine = Descriptor::new(Kind::CUDNN_BACKEND_ENGINE_DESCRIPTOR)?;
    // SAFETY: one created engine descriptor for cuDNN to fill.
    unsafe {
        config.get(
            Attr::CUDNN_ATTR_ENGINECFG_ENGINE,
            Type::CUDNN_TYPE_BACKEND_DESCRIPTOR,
            &mut [engine.0],
        )
    }?;
    let index = engine.get_i64(Attr::CUDNN_ATTR_ENGINE_GLOBAL_INDEX)?;
    // Room for as many notes as there are kinds.
    let mut notes = [sys::cudnnBackendNumericalNote_t::CUDNN_NUMERICAL_NOTE_TYPE_COUNT;
        sys::cudnnBackendNumericalNote_t::CUDNN_NUMERICAL_NOTE_TYPE_COUNT as usize];
    // SAFETY: CUDNN_TYPE_NUMERICAL_NOTE's C type is the enum, a 32-bit value as this one.
    let written = unsafe {
        engine.get(
            Attr::CUDNN_ATTR_ENGINE_NUMERICAL_NOTE,
            Type::CUDNN_TYPE_NUMERICAL_NOTE,
            &mut notes,
        )
    }?;
    let notes = notes[..written].to_vec();
    let mut behavior = [sys::cudnnBackendBehaviorNote_t::CUDNN_BEHAVIOR_NOTE_TYPE_COUNT;
        sys::cudnnBackendBehaviorNote_t::CUDNN_BEHAVIOR_NOTE_TYPE_COUNT as usize];
    // SAFETY: as above, for the behavior notes.
    let written = unsafe {
        engine.get(
            Attr::CUDNN_ATTR_ENGINE_BEHAVIOR_NOTE,
            Type::CUDNN_TYPE_BEHAVIOR_NOTE,
            &mut behavior,
        )
    }?;
    let behavior = &behavior[..written];
    Ok(EngineInfo {
        index,
        numerical_notes: notes,
        runtime_compiled: behavior
            .contains(&sys::cudnnBackendBehaviorNote_t::CUDNN_BEHAVIOR_NOTE_RUNTIME_COMPILATION),
    })
}

/// An execution plan and the workspace it asks for, with the configuration it was made of and
/// the handle it was made on, which it keeps alive: a thread's handles and plans live in
/// thread-locals whose destructors run in no order a plan could rely on, and a plan is
/// destroyed before its handle (the fields' order).
pub(crate) struct Plan {
    pub(crate) plan: Descriptor,
    pub(crate) workspace: usize,
    _config: Descriptor,
    /// `None` for a plan built without a device ([`Plan::build_deviceless`]), which cannot run.
    handle: Option<Rc<Handle>>,
}

impl Plan {
    /// The plan of `config` on `handle`; with `kernel_cache`, one whose kernel comes from (or
    /// goes into) that cache (a dynamic-shape graph's). An error where cuDNN refuses it.
    pub(crate) fn build(
        handle: &Rc<Handle>,
        config: Descriptor,
        kernel_cache: Option<&Descriptor>,
    ) -> candle_core::Result<Self> {
        let plan = Descriptor::new(Kind::CUDNN_BACKEND_EXECUTION_PLAN_DESCRIPTOR)?;
        plan.set(
            Attr::CUDNN_ATTR_EXECUTION_PLAN_HANDLE,
            Type::CUDNN_TYPE_HANDLE,
            &[handle.0],
        )?;
        plan.set_descriptors(Attr::CUDNN_ATTR_EXECUTION_PLAN_ENGINE_CONFIG, &[&config])?;
        if let Some(cache) = kernel_cache {
            plan.set_descriptors(Attr::CUDNN_ATTR_EXECUTION_PLAN_KERNEL_CACHE, &[cache])?;
        }
        let plan = plan.finalize("execution plan")?;
        let workspace = plan.get_i64(Attr::CUDNN_ATTR_EXECUTION_PLAN_WORKSPACE_SIZE)?;
        Ok(Self {
            plan,
            workspace: workspace.max(0) as usize,
            _config: config,
            handle: Some(handle.clone()),
        })
    }

    /// The plan of `config` for the device `properties` describe, without a handle (cuDNN 9.8
    /// and later): whether cuDNN finalizes it, and its workspace, on a machine with no device.
    #[cfg(test)]
    pub(crate) fn build_deviceless(
        config: Descriptor,
        properties: &Descriptor,
    ) -> candle_core::Result<Self> {
        let plan = Descriptor::new(Kind::CUDNN_BACKEND_EXECUTION_PLAN_DESCRIPTOR)?;
        plan.set_descriptors(Attr::CUDNN_ATTR_EXECUTION_PLAN_ENGINE_CONFIG, &[&config])?;
        plan.set_descriptors(Attr::CUDNN_ATTR_EXECUTION_PLAN_DEVICEPROP, &[properties])?;
        let plan = plan.finalize("execution plan")?;
        let workspace = plan.get_i64(Attr::CUDNN_ATTR_EXECUTION_PLAN_WORKSPACE_SIZE)?;
        Ok(Self {
            plan,
            workspace: workspace.max(0) as usize,
            _config: config,
            handle: None,
        })
    }

    /// Queues the plan on its handle's stream over the buffers `pointers` (device addresses, or
    /// host addresses of by-value scalars) that `uids` name, with `workspace`.
    ///
    /// # Safety
    /// The plan was built for these operands' dims, strides and dtypes; every pointer is a live
    /// buffer of its tensor's size (a host scalar for a by-value tensor), on the handle's
    /// stream; the workspace holds at least [`Plan::workspace`] bytes.
    pub(crate) unsafe fn execute(
        &self,
        uids: &[i64],
        pointers: &[*mut c_void],
        workspace: *mut c_void,
    ) -> candle_core::Result<()> {
        let Some(handle) = &self.handle else {
            candle_core::bail!("sdstream-cudnn: a plan built without a device cannot run")
        };
        let pack = Descriptor::new(Kind::CUDNN_BACKEND_VARIANT_PACK_DESCRIPTOR)?;
        pack.set_i64(Attr::CUDNN_ATTR_VARIANT_PACK_UNIQUE_IDS, uids)?;
        pack.set(
            Attr::CUDNN_ATTR_VARIANT_PACK_DATA_POINTERS,
            Type::CUDNN_TYPE_VOID_PTR,
            pointers,
        )?;
        pack.set(
            Attr::CUDNN_ATTR_VARIANT_PACK_WORKSPACE,
            Type::CUDNN_TYPE_VOID_PTR,
            &[workspace],
        )?;
        let pack = pack.finalize("variant pack")?;
        // SAFETY: the caller's promise (above).
        check(
            unsafe { sys::cudnnBackendExecute(handle.0, self.plan.0, pack.0) },
            "execute",
        )
    }
}

/// A thread's cuDNN handle on one device, on that thread's stream of it.
pub(crate) struct Handle(pub(crate) sys::cudnnHandle_t);

impl Drop for Handle {
    fn drop(&mut self) {
        // SAFETY: made by cudnnCreate, destroyed once.
        let _ = unsafe { sys::cudnnDestroy(self.0) };
    }
}

thread_local! {
    // Handles are made and used on one thread (candle's stream is per thread).
    static HANDLES: RefCell<HashMap<DeviceId, Rc<Handle>>> = RefCell::new(HashMap::new());
}

/// This thread's backend handle for `dev`, on the thread's stream, made on first use.
pub(crate) fn handle(dev: &candle_core::CudaDevice) -> candle_core::Result<Rc<Handle>> {
    if let Some(h) = HANDLES.with(|h| h.borrow().get(&dev.id()).cloned()) {
        return Ok(h);
    }
    let stream = dev.cuda_stream();
    // cuDNN makes its handle in the thread's current context: the device's.
    stream
        .context()
        .bind_to_thread()
        .map_err(|e| candle_core::Error::Msg(format!("sdstream-cudnn: {e:?}")))?;
    let mut raw = std::ptr::null_mut();
    // SAFETY: cuDNN writes the new handle.
    check(unsafe { sys::cudnnCreate(&mut raw) }, "cudnnCreate")?;
    let h = Rc::new(Handle(raw));
    // SAFETY: the handle is live; the stream is this thread's stream of the device, which
    // outlives the handle (candle keeps it while the device lives).
    check(
        unsafe { sys::cudnnSetStream(raw, stream.cu_stream() as sys::cudaStream_t) },
        "cudnnSetStream",
    )?;
    HANDLES.with(|hs| hs.borrow_mut().insert(dev.id(), h.clone()));
    Ok(h)
}

/// Whether this thread's stream of `dev` is capturing a CUDA graph. No plan is built then:
/// building may compile a kernel and allocate, which a capture must not see.
pub(crate) fn capturing(dev: &candle_core::CudaDevice) -> candle_core::Result<bool> {
    use candle_core::cuda_backend::cudarc::driver::sys::CUstreamCaptureStatus;
    let status = dev
        .cuda_stream()
        .capture_status()
        .map_err(|e| candle_core::Error::Msg(format!("sdstream-cudnn: {e:?}")))?;
    Ok(status != CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE)
}

/// This thread's handle for `dev`, with the device's context made the thread's current one:
/// cuDNN compiles a plan's kernel, where its engine has one to compile, in the current context.
pub(crate) fn handle_for_building(
    dev: &candle_core::CudaDevice,
) -> candle_core::Result<Rc<Handle>> {
    dev.cuda_stream()
        .context()
        .bind_to_thread()
        .map_err(|e| candle_core::Error::Msg(format!("sdstream-cudnn: {e:?}")))?;
    handle(dev)
}

/// A device-properties descriptor made of `json` (cuDNN 9.8 and later), in which cuDNN's
/// heuristic takes the place of a device: for tests on machines without one.
#[cfg(test)]
pub(crate) fn device_properties(json: &str) -> candle_core::Result<Descriptor> {
    let properties = Descriptor::new(Kind::CUDNN_BACKEND_DEVICEPROP_DESCRIPTOR)?;
    properties.set(
        Attr::CUDNN_ATTR_DEVICEPROP_JSON_REPRESENTATION,
        Type::CUDNN_TYPE_CHAR,
        json.as_bytes(),
    )?;
    properties.finalize("device properties")
}

/// An H100's properties as cuDNN's device-properties descriptor reads them (the fields cuDNN
/// 9.19 and 9.26 ask for), so that its heuristic can be asked without a device.
#[cfg(test)]
pub(crate) const H100: &str = r#"{"maxGridSize": [2147483647, 65535, 65535], "maxBlockSize": [1024, 1024, 64],
    "regsPerBlock": 65536, "multiProcessorCount": 132, "smCountOrigin": 0, "warpSize": 32,
    "maxSharedMemoryPerBlock": 49152, "maxSharedMemoryPerBlockOptin": 232448,
    "oversizedSharedMemoryPerBlock": 0, "reservedSharedMemoryPerBlock": 1024,
    "maxRegistersPerSM": 65536, "maxCtasPerSM": 32, "maxThreadsPerBlock": 1024,
    "maxThreadsPerSM": 2048, "pciDeviceId": 0, "isTccDriver": 0, "supportCoopLaunch": 1,
    "smClockRateKHz": 1980000, "memClockRateKHz": 2619000, "l2CacheSize": 52428800,
    "deviceName": "NVIDIA H100 80GB HBM3", "totalGlobalMem": 85520809984, "deviceVer": 900,
    "driverVer": 13000, "cudaDeviceId": 0}"#;
