//! The `sds_engine_*` entry points: an opaque handle around [`sdstream_core::Engine`].

use std::ffi::{CStr, CString, c_char};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use sdstream_core::params::Transition;
use sdstream_core::{
    Engine, EngineOptions, EngineSettings, EngineState, Output, StreamDiffusionParams, Submission,
    UpdateKind,
};

use crate::error::{
    ErrorSlot, Failure, Handle, SdsStatus, copy_out, guard, thread_copy_of, with_handle,
};
use crate::frame::{
    SdsControlImage, SdsFrame, SdsOutput, SdsPixelFormat, check_fits, control_images, needed_bytes,
    pixel_format, write_output,
};

/// What an accepted parameter update costs: core's `UpdateKind`, whose names ("unchanged",
/// "hot", "controlnet_swap", "reload") the server and the Python module use.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[allow(non_camel_case_types)]
pub enum SdsUpdateKind {
    /// Nothing changed.
    SDS_UPDATE_UNCHANGED = 0,
    /// Applied in place between two frames (prompt, guidance, seed, t_index_list …).
    SDS_UPDATE_HOT = 1,
    /// ControlNets added, removed or replaced: nets to add load in the background while the
    /// current ones keep serving, and attach between two frames.
    SDS_UPDATE_CONTROLNET_SWAP = 2,
    /// A new pipeline is built in the background while the current one keeps serving, and
    /// swapped in between two frames (model, resolution …); a failed build keeps the current one.
    SDS_UPDATE_RELOAD = 3,
}

/// An engine: the StreamDiffusion pipeline on its own worker and loader threads. Opaque; made by
/// `sds_engine_create`, freed by `sds_engine_destroy`.
pub struct SdsEngine {
    engine: Engine,
    /// Set by `sds_engine_close`, to report `SDS_ERR_CLOSED` rather than a generic state error.
    closed: AtomicBool,
    /// An output taken from the engine that did not fit the caller's buffer.
    held: Mutex<Option<Output>>,
    last_error: ErrorSlot,
}

impl SdsEngine {
    fn new(engine: Engine) -> Self {
        Self {
            engine,
            closed: AtomicBool::new(false),
            held: Mutex::new(None),
            last_error: ErrorSlot::default(),
        }
    }

    fn core_error(&self, function: &str, error: sdstream_core::Error) -> Failure {
        Failure::from_core(function, error, self.closed.load(Ordering::Acquire))
    }

    fn held(&self) -> MutexGuard<'_, Option<Output>> {
        self.held.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Writes `output` to the caller's buffer, keeping it for the next poll when it does not fit.
    ///
    /// # Safety
    /// `out.data` must be non-NULL with `out.capacity` writable bytes.
    unsafe fn deliver(
        &self,
        function: &str,
        out: &mut SdsOutput,
        output: Output,
    ) -> Result<(), Failure> {
        // SAFETY: forwarded from the caller.
        unsafe { write_output(function, out, output) }.map_err(|rejected| {
            let (failure, output) = *rejected;
            *self.held() = Some(output);
            failure
        })
    }
}

impl Handle for SdsEngine {
    const ARGUMENT: &'static str = "engine";
    fn error_slot(&self) -> &ErrorSlot {
        &self.last_error
    }
}

/// A required string argument as UTF-8.
///
/// # Safety
/// `ptr` must be NULL or a NUL-terminated string readable for the call's duration.
pub(crate) unsafe fn str_arg<'a>(
    function: &str,
    name: &str,
    ptr: *const c_char,
) -> Result<&'a str, Failure> {
    if ptr.is_null() {
        return Err(Failure::null(function, name));
    }
    // SAFETY: non-NULL and NUL-terminated by the caller's contract.
    unsafe { CStr::from_ptr(ptr) }.to_str().map_err(|e| {
        Failure::new(
            SdsStatus::SDS_ERR_INVALID_ARGUMENT,
            format!("{function}: `{name}` is not valid UTF-8: {e}"),
        )
    })
}

/// A required out-pointer as a mutable reference.
///
/// # Safety
/// `ptr` must be NULL or valid for reads and writes of a `T` for the call's duration.
pub(crate) unsafe fn out_arg<'a, T>(
    function: &str,
    name: &str,
    ptr: *mut T,
) -> Result<&'a mut T, Failure> {
    // SAFETY: by the caller's contract.
    unsafe { ptr.as_mut() }.ok_or_else(|| Failure::null(function, name))
}

/// Writes `value` through an optional out-pointer.
///
/// # Safety
/// `ptr` must be NULL or valid for a write of a `T`.
pub(crate) unsafe fn write_opt<T>(ptr: *mut T, value: T) {
    if !ptr.is_null() {
        // SAFETY: non-NULL and writable by the caller's contract.
        unsafe { ptr.write(value) };
    }
}

/// Parses the three JSON texts, with core's validation.
///
/// # Safety
/// As `sds_engine_create`.
unsafe fn configure(
    function: &str,
    params_json: *const c_char,
    settings_json: *const c_char,
    options_json: *const c_char,
) -> Result<(StreamDiffusionParams, EngineSettings, EngineOptions), Failure> {
    // SAFETY: forwarded from the caller.
    let (params, settings) = unsafe {
        (
            str_arg(function, "params_json", params_json)?,
            str_arg(function, "settings_json", settings_json)?,
        )
    };
    let options = if options_json.is_null() {
        EngineOptions::default()
    } else {
        // SAFETY: non-NULL, forwarded from the caller.
        let text = unsafe { str_arg(function, "options_json", options_json)? };
        EngineOptions::from_json(text).map_err(|e| Failure::from_core(function, e, false))?
    };
    let settings =
        EngineSettings::from_json(settings).map_err(|e| Failure::from_core(function, e, false))?;
    let params = StreamDiffusionParams::from_json_with(params, &settings)
        .map_err(|e| Failure::from_core(function, e, false))?;
    Ok((params, settings, options))
}

/// Shared body of the two create functions.
///
/// # Safety
/// As `sds_engine_create`.
unsafe fn create(
    function: &str,
    params_json: *const c_char,
    settings_json: *const c_char,
    options_json: *const c_char,
    out: *mut *mut SdsEngine,
    wait: bool,
) -> SdsStatus {
    guard(function, None, || {
        sdstream_core::log::to_stderr_unless_subscribed();
        // SAFETY: forwarded from the caller.
        let out = unsafe { out_arg(function, "out", out)? };
        *out = std::ptr::null_mut();
        // SAFETY: forwarded from the caller.
        let (params, settings, options) =
            unsafe { configure(function, params_json, settings_json, options_json)? };
        let builder = Engine::builder(params).settings(settings).options(options);
        let engine = if wait {
            builder.load()
        } else {
            builder.spawn()
        }
        .map_err(|e| Failure::from_core(function, e, false))?;
        *out = Box::into_raw(Box::new(SdsEngine::new(engine)));
        Ok(())
    })
}

/// Creates an engine and waits until its pipeline is loaded; on success `*out` is the handle
/// (caller-owned: free it with `sds_engine_destroy`), on failure `*out` is NULL and
/// `sds_last_error()` says why (a missing model gives `SDS_ERR_MODEL`).
///
/// - `params_json`: a StreamDiffusionParams body (Daydream's JSON; unknown fields are an error).
/// - `settings_json`: EngineSettings (`{"vae": "taesd" | "full" | "<dir>", "device": "cpu",
///   "dtype": "f32", "allow_any_resolution": false, "model_root": null, …}`); `"{}"` for the
///   defaults.
/// - `options_json` (nullable: defaults): EngineOptions (`{"queue_capacity": 2,
///   "output_capacity": 8, "drop_policy": "latest" | "lossless", "warmup": true,
///   "input_timeout_ms": 2000, "fps_window_ms": 2000}`).
///
/// Blocks for the load (seconds to minutes: weights are read or downloaded). Thread-safe (no
/// handle involved). The strings are read only during the call.
///
/// # Safety
/// String arguments are NULL or NUL-terminated; `out` is NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sds_engine_create(
    params_json: *const c_char,
    settings_json: *const c_char,
    options_json: *const c_char,
    out: *mut *mut SdsEngine,
) -> SdsStatus {
    // SAFETY: forwarded.
    unsafe {
        create(
            "sds_engine_create",
            params_json,
            settings_json,
            options_json,
            out,
            true,
        )
    }
}

/// As `sds_engine_create`, but returns as soon as the JSON is validated: the pipeline loads on
/// the engine's loader thread (frames submitted meanwhile wait in the queue). Follow the load
/// with `sds_engine_wait_ready` or the status JSON (`"state": "LOADING"`); a failed load leaves
/// the engine without a pipeline (`SDS_ERR_STATE` from submit, the reason in the status JSON).
///
/// # Safety
/// As `sds_engine_create`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sds_engine_create_async(
    params_json: *const c_char,
    settings_json: *const c_char,
    options_json: *const c_char,
    out: *mut *mut SdsEngine,
) -> SdsStatus {
    // SAFETY: forwarded.
    unsafe {
        create(
            "sds_engine_create_async",
            params_json,
            settings_json,
            options_json,
            out,
            false,
        )
    }
}

/// Waits until the engine's pipeline serves (`SDS_OK`), its load failed (the load's error,
/// e.g. `SDS_ERR_MODEL`), or `timeout_ms` passed (`SDS_ERR_NOT_READY`; a negative timeout waits
/// without limit). Thread-safe: any thread, concurrently with any call but destroy.
///
/// # Safety
/// `engine` is NULL or a live handle.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sds_engine_wait_ready(
    engine: *mut SdsEngine,
    timeout_ms: i64,
) -> SdsStatus {
    const F: &str = "sds_engine_wait_ready";
    with_handle(F, engine, |h| {
        let timeout = u64::try_from(timeout_ms).ok().map(Duration::from_millis);
        h.engine.wait_ready(timeout).map_err(|e| {
            let mut failure = h.core_error(F, e);
            if failure.status == SdsStatus::SDS_ERR_STATE
                && h.engine.status().state == EngineState::Loading
            {
                failure.status = SdsStatus::SDS_ERR_NOT_READY;
            }
            failure
        })
    })
}

/// Closes the engine (if not closed yet), joins its threads and frees the handle. NULL is a
/// no-op. Blocks until the frame in flight finishes, and a model load in progress (loads
/// cannot be interrupted). Call it once, when no other thread uses the handle; the handle is
/// invalid afterwards (strings `sds_engine_last_error` returned are the threads' own copies and
/// stay valid).
///
/// # Safety
/// `engine` is NULL or a live handle not used by any other thread.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sds_engine_destroy(engine: *mut SdsEngine) -> SdsStatus {
    if engine.is_null() {
        return SdsStatus::SDS_OK;
    }
    guard("sds_engine_destroy", None, || {
        // SAFETY: made by Box::into_raw in create; the caller gives it up here.
        drop(unsafe { Box::from_raw(engine) });
        Ok(())
    })
}

/// Stops the engine without freeing the handle: waiting frames are dropped, the frame in
/// flight finishes (its output can still be polled), the threads are joined. Afterwards
/// submit, process and update fail with `SDS_ERR_CLOSED`; status, poll and last_error still
/// work. Idempotent. Thread-safe: may be called while other threads use the handle (to stop
/// them before `sds_engine_destroy`).
///
/// # Safety
/// `engine` is NULL or a live handle.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sds_engine_close(engine: *mut SdsEngine) -> SdsStatus {
    with_handle("sds_engine_close", engine, |h| {
        h.closed.store(true, Ordering::Release);
        h.engine.close();
        Ok(())
    })
}

/// Builds a fresh pipeline with the current parameters in the background (after a failed
/// load, or a panic that discarded the pipeline); a serving pipeline keeps serving until the
/// new one is ready. Never waits. Thread-safe.
///
/// # Safety
/// `engine` is NULL or a live handle.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sds_engine_restart(engine: *mut SdsEngine) -> SdsStatus {
    const F: &str = "sds_engine_restart";
    with_handle(F, engine, |h| {
        h.engine.restart().map_err(|e| h.core_error(F, e))
    })
}

/// Hands the stream an IP-Adapter style picture (`ip_adapter`), used instead of the one at
/// `ip_adapter_style_image_url` from the next frame on; `frame` NULL goes back to the URL's
/// picture. The pixels are copied before the call returns (nothing is kept); the picture stays
/// across reloads. An invalid frame fails naming what is wrong and changes nothing; a picture the
/// engine cannot encode is reported by `last_error` in the status JSON, the previous one staying.
/// Thread-safe.
///
/// # Safety
/// `engine` is NULL or a live handle; `frame` NULL or as `SdsFrame` describes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sds_engine_set_style_image(
    engine: *mut SdsEngine,
    frame: *const SdsFrame,
) -> SdsStatus {
    const F: &str = "sds_engine_set_style_image";
    with_handle(F, engine, |h| {
        // SAFETY: by the caller's contract.
        let picture = match unsafe { frame.as_ref() } {
            None => None,
            Some(frame) => {
                // SAFETY: by the caller's contract.
                let frame = unsafe { frame.as_frame(F)? };
                Some(sdstream_core::StyleImage::from_frame(frame).map_err(|e| h.core_error(F, e))?)
            }
        };
        h.engine.set_style_image(picture);
        Ok(())
    })
}

/// Shared body of the process functions.
///
/// # Safety
/// As `sds_engine_process_with_controls`.
unsafe fn process(
    function: &str,
    engine: *mut SdsEngine,
    frame: *const SdsFrame,
    controls: *const SdsControlImage,
    count: usize,
    out: *mut SdsOutput,
) -> SdsStatus {
    let f = function;
    with_handle(f, engine, |h| {
        // SAFETY: by the caller's contract.
        let (frame, out) = unsafe {
            (
                frame.as_ref().ok_or_else(|| Failure::null(f, "frame"))?,
                out_arg(f, "out", out)?,
            )
        };
        if out.data.is_null() {
            return Err(Failure::null(f, "out->data"));
        }
        // SAFETY: by the caller's contract.
        let (frame, controls) =
            unsafe { (frame.as_frame(f)?, control_images(f, controls, count)?) };
        let (width, height) = sdstream_core::preprocess::output_size(&h.engine.params());
        check_fits(f, out, width, height, frame.format())?;
        let submission = Submission::new(frame).controls(controls.iter().map(|(id, c)| (*id, *c)));
        let output = h
            .engine
            .process(submission)
            .map_err(|e| h.core_error(f, e))?;
        // SAFETY: out->data checked non-NULL; capacity by the caller's contract.
        unsafe { h.deliver(f, out, output) }
    })
}

/// Processes one frame synchronously: submits a copy of `frame` and waits for its output,
/// which is written to `out`. Latency: one pipeline pass (plus, with warm-up on, n − 1 more on
/// the first frame after creation or a reload, and any frames already waiting in the queue).
///
/// `out` is checked before any work against the size `sds_engine_output_size` reports
/// (`SDS_ERR_BUFFER_TOO_SMALL`, `out` filled in, no frame submitted). The frame's output goes
/// to this call only: outputs of frames submitted earlier with `sds_engine_submit` stay for
/// `sds_engine_poll`/`sds_engine_recv`. If the frame is dropped (a newer frame took its place
/// in a full `latest` queue, a flush, close) or fails, `SDS_ERR_NO_OUTPUT` with the reason.
///
/// Thread-safety: any number of threads may process, submit, poll and update concurrently on
/// one handle; each process call gets its own frame's output.
///
/// # Safety
/// `engine` is NULL or a live handle; `frame` NULL or as `SdsFrame` describes; `out` NULL or
/// writable with `out->data` valid for `out->capacity` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sds_engine_process(
    engine: *mut SdsEngine,
    frame: *const SdsFrame,
    out: *mut SdsOutput,
) -> SdsStatus {
    // SAFETY: forwarded.
    unsafe {
        process(
            "sds_engine_process",
            engine,
            frame,
            std::ptr::null(),
            0,
            out,
        )
    }
}

/// `sds_engine_process` with control images for ControlNets whose `preprocessor` is
/// `"external"`: `controls` points to `count` of them (NULL with `count` 0 for none), each
/// naming its ControlNet by `model_id`. A net uses the most recent image given for it (with
/// this call or an earlier submit/process); before the first one it contributes nothing. The
/// images are copied before the call returns (nothing is kept).
///
/// Every argument is checked before any work: NULL `controls` with `count` > 0, a NULL or
/// non-UTF-8 `controlnet_id` or an invalid control frame fail naming the entry
/// (`controls[i]…`); an id naming no ControlNet of the current parameters fails with
/// `SDS_ERR_INVALID_PARAMS` naming the id, and nothing is submitted. Thread-safety as
/// `sds_engine_process`.
///
/// # Safety
/// As `sds_engine_process`; `controls` NULL or `count` readable `SdsControlImage`s, each as
/// the struct describes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sds_engine_process_with_controls(
    engine: *mut SdsEngine,
    frame: *const SdsFrame,
    controls: *const SdsControlImage,
    count: usize,
    out: *mut SdsOutput,
) -> SdsStatus {
    // SAFETY: forwarded.
    unsafe {
        process(
            "sds_engine_process_with_controls",
            engine,
            frame,
            controls,
            count,
            out,
        )
    }
}

/// Shared body of the submit functions.
///
/// # Safety
/// As `sds_engine_submit_with_controls`, with `timestamp` already read.
unsafe fn submit(
    function: &str,
    engine: *mut SdsEngine,
    frame: *const SdsFrame,
    controls: *const SdsControlImage,
    count: usize,
    timestamp: Option<i64>,
    id_out: *mut u64,
) -> SdsStatus {
    with_handle(function, engine, |h| {
        // SAFETY: by the caller's contract.
        let frame = unsafe { frame.as_ref() }.ok_or_else(|| Failure::null(function, "frame"))?;
        // SAFETY: by the caller's contract.
        let (frame, controls) = unsafe {
            (
                frame.as_frame(function)?,
                control_images(function, controls, count)?,
            )
        };
        let submission = Submission::new(frame)
            .controls(controls.iter().map(|(id, c)| (*id, *c)))
            .timestamp(timestamp);
        let id = h
            .engine
            .submit(submission)
            .map_err(|e| h.core_error(function, e))?;
        // SAFETY: NULL or writable by the caller's contract.
        unsafe { write_opt(id_out, id) };
        Ok(())
    })
}

/// Queues a copy of `frame` (the caller's memory is not kept) and returns at once, never
/// waiting for inference; `*id_out` (nullable) gets the frame's id (0, 1, 2, … per accepted
/// frame), which its output carries. A full queue drops its oldest waiting frame (drop policy
/// `latest`) or fails with `SDS_ERR_QUEUE_FULL` (`lossless`). Cost: one copy of the frame.
/// Thread-safe: any number of threads may submit, poll and update concurrently.
///
/// # Safety
/// `engine` is NULL or a live handle; `frame` NULL or as `SdsFrame` describes; `id_out` NULL or
/// writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sds_engine_submit(
    engine: *mut SdsEngine,
    frame: *const SdsFrame,
    id_out: *mut u64,
) -> SdsStatus {
    // SAFETY: forwarded.
    unsafe {
        submit(
            "sds_engine_submit",
            engine,
            frame,
            std::ptr::null(),
            0,
            None,
            id_out,
        )
    }
}

/// `sds_engine_submit` with the host's timestamp (any unit), returned with the output.
///
/// # Safety
/// As `sds_engine_submit`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sds_engine_submit_with_timestamp(
    engine: *mut SdsEngine,
    frame: *const SdsFrame,
    timestamp: i64,
    id_out: *mut u64,
) -> SdsStatus {
    // SAFETY: forwarded.
    unsafe {
        submit(
            "sds_engine_submit_with_timestamp",
            engine,
            frame,
            std::ptr::null(),
            0,
            Some(timestamp),
            id_out,
        )
    }
}

/// `sds_engine_submit` with control images for ControlNets whose `preprocessor` is
/// `"external"`, and optionally the host's timestamp. `controls` points to `count` images
/// (NULL with `count` 0 for none), each naming its ControlNet by `model_id`; a net uses the
/// most recent image given for it (with this frame or an earlier one), and before the first
/// one it contributes nothing. `timestamp` (nullable) points to the host's timestamp (any
/// unit, returned with the output); NULL uses the submission time, as `sds_engine_submit`.
///
/// Frame and control images are copied before the call returns (nothing is kept); cost: one
/// copy of each. Every argument is checked before anything is queued: NULL `controls` with
/// `count` > 0, a NULL or non-UTF-8 `controlnet_id` or an invalid control frame fail naming
/// the entry (`controls[i]…`); an id naming no ControlNet of the current parameters fails
/// with `SDS_ERR_INVALID_PARAMS` naming the id. Thread-safe, as `sds_engine_submit`.
///
/// # Safety
/// As `sds_engine_submit`; `controls` NULL or `count` readable `SdsControlImage`s, each as the
/// struct describes; `timestamp` NULL or readable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sds_engine_submit_with_controls(
    engine: *mut SdsEngine,
    frame: *const SdsFrame,
    controls: *const SdsControlImage,
    count: usize,
    timestamp: *const i64,
    id_out: *mut u64,
) -> SdsStatus {
    // SAFETY: NULL or readable by the caller's contract.
    let timestamp = unsafe { timestamp.as_ref() }.copied();
    // SAFETY: forwarded.
    unsafe {
        submit(
            "sds_engine_submit_with_controls",
            engine,
            frame,
            controls,
            count,
            timestamp,
            id_out,
        )
    }
}

/// Shared body of poll and recv.
///
/// # Safety
/// As `sds_engine_poll`.
unsafe fn collect(
    function: &str,
    engine: *mut SdsEngine,
    out: *mut SdsOutput,
    timeout: Option<Duration>,
) -> SdsStatus {
    with_handle(function, engine, |h| {
        // SAFETY: by the caller's contract.
        let out = unsafe { out_arg(function, "out", out)? };
        if out.data.is_null() {
            return Err(Failure::null(function, "out->data"));
        }
        let held = h.held().take();
        let output = match (held, timeout) {
            (Some(output), _) => Some(output),
            (None, None) => h.engine.poll(),
            (None, Some(t)) => h
                .engine
                .recv_timeout(t)
                .map_err(|e| h.core_error(function, e))?,
        };
        match output {
            // SAFETY: out->data checked non-NULL; capacity by the caller's contract.
            Some(output) => unsafe { h.deliver(function, out, output) },
            // Not a failure: not recorded as the last error.
            None => Err(Failure::new(SdsStatus::SDS_ERR_NO_OUTPUT, String::new())),
        }
    })
}

/// Takes the oldest output not yet collected, if one is ready, and writes it to `out` with the
/// id and timestamp of its input; `SDS_ERR_NO_OUTPUT` when none is (not recorded as an error).
/// Never waits. If `out` is too small (`SDS_ERR_BUFFER_TOO_SMALL`, `out->size` says what is
/// needed) the output is kept and returned by the next poll. Thread-safe (concurrent pollers
/// get different outputs).
///
/// # Safety
/// `engine` is NULL or a live handle; `out` NULL or writable with `out->data` valid for
/// `out->capacity` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sds_engine_poll(engine: *mut SdsEngine, out: *mut SdsOutput) -> SdsStatus {
    // SAFETY: forwarded.
    unsafe { collect("sds_engine_poll", engine, out, None) }
}

/// `sds_engine_poll` that waits up to `timeout_ms` for an output (for hosts with a thread of
/// their own); `SDS_ERR_NO_OUTPUT` when none came, `SDS_ERR_STATE`/`SDS_ERR_CLOSED` when none
/// can come any more.
///
/// # Safety
/// As `sds_engine_poll`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sds_engine_recv(
    engine: *mut SdsEngine,
    out: *mut SdsOutput,
    timeout_ms: u32,
) -> SdsStatus {
    let timeout = Duration::from_millis(u64::from(timeout_ms));
    // SAFETY: forwarded.
    unsafe { collect("sds_engine_recv", engine, out, Some(timeout)) }
}

/// Drops every frame waiting in the input queue (the one in flight still comes out), e.g. after
/// a prompt change; `*dropped` (nullable) gets how many. Thread-safe.
///
/// # Safety
/// `engine` is NULL or a live handle; `dropped` NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sds_engine_flush(
    engine: *mut SdsEngine,
    dropped: *mut usize,
) -> SdsStatus {
    with_handle("sds_engine_flush", engine, |h| {
        let n = h.engine.flush();
        // SAFETY: NULL or writable by the caller's contract.
        unsafe { write_opt(dropped, n) };
        Ok(())
    })
}

/// The size of an output for input frames of `format` under the current (last accepted)
/// parameters: `*width` × `*height` (the stream's size, or twice it with an upscaling
/// `image_postprocessing` processor such as `realesrgan_trt`), and `*size`, the bytes of packed
/// rows. While
/// a reload that changes the resolution builds, outputs still come at the old size: check
/// `SdsOutput.size` or allocate for both. Thread-safe.
///
/// # Safety
/// `engine` is NULL or a live handle; the out-pointers NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sds_engine_output_size(
    engine: *mut SdsEngine,
    format: SdsPixelFormat,
    width: *mut u32,
    height: *mut u32,
    size: *mut usize,
) -> SdsStatus {
    const F: &str = "sds_engine_output_size";
    with_handle(F, engine, |h| {
        // SAFETY: by the caller's contract.
        let (width, height, size) = unsafe {
            (
                out_arg(F, "width", width)?,
                out_arg(F, "height", height)?,
                out_arg(F, "size", size)?,
            )
        };
        let format = pixel_format(F, format)?;
        let params = h.engine.params();
        let (cols, rows) = sdstream_core::preprocess::output_size(&params);
        // Core's frame size rule, as for every other size this layer reports.
        let (bytes, _) = needed_bytes(cols, rows, format, 0).map_err(|e| {
            Failure::new(
                SdsStatus::SDS_ERR_INTERNAL,
                format!("{F}: the output size: {e}"),
            )
        })?;
        *width = cols as u32;
        *height = rows as u32;
        *size = bytes;
        Ok(())
    })
}

/// Applies a complete new parameter set (JSON as at create: omitted fields take the defaults,
/// not the current values) and returns without waiting; `*kind` (nullable) says what it costs.
/// Hot changes apply from the next frame; a reload builds beside the serving pipeline and is
/// swapped in when ready (`serving_params_version` in the status JSON tells when); a reload
/// that fails keeps the previous pipeline serving and records the error in the status JSON.
/// Invalid JSON (`SDS_ERR_INVALID_JSON`) or parameters (`SDS_ERR_INVALID_PARAMS`) change
/// nothing. Thread-safe: may run concurrently with submit/poll/process on other threads.
///
/// # Safety
/// `engine` is NULL or a live handle; `params_json` NULL or NUL-terminated; `kind` NULL or
/// writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sds_engine_update_params(
    engine: *mut SdsEngine,
    params_json: *const c_char,
    kind: *mut SdsUpdateKind,
) -> SdsStatus {
    // SAFETY: by the caller's contract.
    unsafe { update_params("sds_engine_update_params", engine, params_json, None, kind) }
}

/// As `sds_engine_update_params`, with a transition: `transition_json` is
/// `{"num_steps": N, "temporal_interpolation_method": "linear" | "slerp"}` (both optional: 0
/// and linear; N at most 1000). When the serving pipeline takes the new parameters in place, a
/// change of the prompt or the seed then glides over N frames from where it is to the new
/// value instead of switching on the next frame; a reload ignores it. A bad transition
/// (`SDS_ERR_INVALID_JSON`, `SDS_ERR_INVALID_PARAMS` naming `transition.…`) changes nothing.
///
/// # Safety
/// `engine` is NULL or a live handle; `params_json` and `transition_json` NULL or
/// NUL-terminated; `kind` NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sds_engine_update_params_with_transition(
    engine: *mut SdsEngine,
    params_json: *const c_char,
    transition_json: *const c_char,
    kind: *mut SdsUpdateKind,
) -> SdsStatus {
    const F: &str = "sds_engine_update_params_with_transition";
    // SAFETY: by the caller's contract.
    unsafe { update_params(F, engine, params_json, Some(transition_json), kind) }
}

/// The one body of the two update calls; `transition_json` is `None` for the plain one.
///
/// # Safety
/// As `sds_engine_update_params_with_transition`.
unsafe fn update_params(
    f: &'static str,
    engine: *mut SdsEngine,
    params_json: *const c_char,
    transition_json: Option<*const c_char>,
    kind: *mut SdsUpdateKind,
) -> SdsStatus {
    with_handle(f, engine, |h| {
        // SAFETY: by the caller's contract.
        let text = unsafe { str_arg(f, "params_json", params_json)? };
        let transition = match transition_json {
            None => Transition::default(),
            Some(ptr) => {
                // SAFETY: by the caller's contract.
                let text = unsafe { str_arg(f, "transition_json", ptr)? };
                Transition::from_json(text).map_err(|e| h.core_error(f, e))?
            }
        };
        let params = StreamDiffusionParams::from_json_with(text, h.engine.settings())
            .map_err(|e| h.core_error(f, e))?;
        let update = h
            .engine
            .update_params_with_transition(params, transition)
            .map_err(|e| h.core_error(f, e))?;
        let value = match update.kind() {
            UpdateKind::Unchanged => SdsUpdateKind::SDS_UPDATE_UNCHANGED,
            UpdateKind::Hot => SdsUpdateKind::SDS_UPDATE_HOT,
            UpdateKind::ControlNetSwap => SdsUpdateKind::SDS_UPDATE_CONTROLNET_SWAP,
            UpdateKind::Reload => SdsUpdateKind::SDS_UPDATE_RELOAD,
        };
        // SAFETY: NULL or writable by the caller's contract.
        unsafe { write_opt(kind, value) };
        Ok(())
    })
}

/// The status report as a JSON object (Daydream's fields: `state` ONLINE/LOADING/
/// DEGRADED_INPUT/DEGRADED_INFERENCE/ERROR/OFFLINE, fps, `last_error`, `last_params`,
/// `params_version`, `serving_params_version`, queue depths, frame counters, stage timings …).
/// `*out` is a new NUL-terminated UTF-8 string owned by the caller: free it with
/// `sds_string_free`. Thread-safe.
///
/// # Safety
/// `engine` is NULL or a live handle; `out` NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sds_engine_status_json(
    engine: *mut SdsEngine,
    out: *mut *mut c_char,
) -> SdsStatus {
    const F: &str = "sds_engine_status_json";
    with_handle(F, engine, |h| {
        // SAFETY: by the caller's contract.
        let out = unsafe { out_arg(F, "out", out)? };
        *out = std::ptr::null_mut();
        let json = CString::new(h.engine.status_json()).map_err(|e| {
            Failure::new(
                SdsStatus::SDS_ERR_INTERNAL,
                format!("{F}: status JSON: {e}"),
            )
        })?;
        *out = json.into_raw();
        Ok(())
    })
}

/// The message of the last failed call on this handle ("" if none), NUL-terminated UTF-8.
///
/// The pointer is the calling thread's own copy of the message, owned by the library: it stays
/// valid until this thread calls `sds_engine_last_error` again (on any handle) or exits. Other
/// threads failing calls on the handle, other `sds_*` calls on this thread, and
/// `sds_engine_destroy` do not touch it. Safe to call from any thread at any time, concurrently
/// with any call on the handle but destroy. The message is that of the handle's latest failure
/// at the moment of the copy; with several threads failing calls on one handle, which of their
/// failures is latest is a race: use `sds_last_error()` (per thread) for the message of this
/// thread's own call. NULL `engine` gives a static message saying so.
///
/// # Safety
/// `engine` is NULL or a live handle.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sds_engine_last_error(engine: *const SdsEngine) -> *const c_char {
    // SAFETY: by the caller's contract.
    match unsafe { engine.as_ref() } {
        Some(h) => thread_copy_of(&h.last_error),
        None => c"sds_engine_last_error: `engine` is NULL".as_ptr(),
    }
}

/// Copies the message of the last failed call on this handle ("" if none) into the caller's
/// buffer, as `snprintf` does: at most `cap - 1` bytes (cut at a UTF-8 character boundary)
/// followed by a NUL. `*len` (nullable) gets the whole message's length in bytes, without the
/// NUL, also when it did not fit: allocate `len + 1` and call again.
///
/// Returns `SDS_OK` when the whole message fit, `SDS_ERR_BUFFER_TOO_SMALL` when it was cut (or
/// `cap` is 0: `buf` may then be NULL, to ask for the length only), `SDS_ERR_NULL` for a NULL
/// `engine`, or a NULL `buf` with `cap` > 0. The caller owns `buf` throughout; nothing is kept.
/// This call's own failures are recorded for `sds_last_error()` only, never as the handle's
/// message (reading the message does not replace it). Thread-safe: any thread, concurrently
/// with any call on the handle but destroy.
///
/// # Safety
/// `engine` is NULL or a live handle; `buf` NULL or valid for `cap` writable bytes; `len` NULL
/// or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sds_engine_last_error_copy(
    engine: *const SdsEngine,
    buf: *mut c_char,
    cap: usize,
    len: *mut usize,
) -> SdsStatus {
    const F: &str = "sds_engine_last_error_copy";
    guard(F, None, || {
        // SAFETY: a non-NULL handle is live by the caller's contract.
        let h = unsafe { engine.as_ref() }.ok_or_else(|| Failure::null(F, "engine"))?;
        if buf.is_null() && cap > 0 {
            return Err(Failure::new(
                SdsStatus::SDS_ERR_NULL,
                format!("{F}: `buf` is NULL but `cap` is {cap}"),
            ));
        }
        let (fit, whole) = h.last_error.with(|message| {
            // SAFETY: `buf` is valid for `cap` bytes by the caller's contract (NULL only with 0).
            let fit = unsafe { copy_out(message, buf, cap) };
            (fit, message.to_bytes().len())
        });
        // SAFETY: NULL or writable by the caller's contract.
        unsafe { write_opt(len, whole) };
        if fit {
            Ok(())
        } else {
            Err(Failure::new(
                SdsStatus::SDS_ERR_BUFFER_TOO_SMALL,
                format!(
                    "{F}: the message needs {} bytes with its NUL; `cap` is {cap}",
                    whole + 1
                ),
            ))
        }
    })
}
