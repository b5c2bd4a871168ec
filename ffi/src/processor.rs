//! The `sds_processor_*` entry points: one image processor on its own (a depth map, a pose
//! skeleton, edges … of a frame), an opaque handle around [`sdstream_core::ImageProcessor`].

use std::ffi::c_char;
use std::sync::{Mutex, PoisonError};

use sdstream_core::{ControlImage, EngineSettings, ImageProcessor};

use crate::engine::{out_arg, str_arg, write_opt};
use crate::error::{ErrorSlot, Failure, Handle, SdsStatus, guard, thread_copy_of, with_handle};
use crate::frame::SdsFrame;

/// An image processor with its network loaded. Opaque; made by `sds_processor_create`, freed by
/// `sds_processor_destroy`. Calls on one handle may come from any thread; they run one at a time.
pub struct SdsProcessor {
    processor: Mutex<ImageProcessor>,
    last_error: ErrorSlot,
}

/// Where a control image goes: the caller fills `data` and `capacity`; the call fills the rest,
/// also when it fails with `SDS_ERR_BUFFER_TOO_SMALL` (then `size` is what is needed and
/// nothing is written to `data`). Rows are packed: `width * channels` bytes each.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct SdsControlOutput {
    /// In: the caller's buffer (kept by the caller; written only during the call).
    pub data: *mut u8,
    /// In: bytes available at `data`.
    pub capacity: usize,
    /// Out: width in pixels (the frame's, or twice it for `realesrgan_trt`).
    pub width: u32,
    /// Out: height in pixels.
    pub height: u32,
    /// Out: 8-bit values per pixel: 3 (RGB), or 6 for `temporal_net_tensorrt` with
    /// `output_format` `"concat"` (the previous frame's RGB, then the flow's RGB).
    pub channels: u32,
    /// Out: bytes of the image: `width * height * channels`.
    pub size: usize,
}

impl Handle for SdsProcessor {
    const ARGUMENT: &'static str = "processor";
    fn error_slot(&self) -> &ErrorSlot {
        &self.last_error
    }
}

/// Creates processor `name` (Daydream's image-processor names: `"depth_tensorrt"`,
/// `"pose_tensorrt"`, `"hed"`, `"canny"`, …) with `params_json` (its `preprocessor_params`
/// object; NULL for `{}`) on the device and in the dtype of `settings_json` (EngineSettings,
/// as for `sds_engine_create`; NULL for the defaults), loading its network if it has one (found
/// like models: `model_root`, the Hugging Face cache, a download; seconds). On success `*out` is
/// the handle (caller-owned: free it with `sds_processor_destroy`); on failure `*out` is NULL
/// and `sds_last_error()` names the field or file at fault. Thread-safe.
///
/// # Safety
/// String arguments are NULL or NUL-terminated; `out` is NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sds_processor_create(
    name: *const c_char,
    params_json: *const c_char,
    settings_json: *const c_char,
    out: *mut *mut SdsProcessor,
) -> SdsStatus {
    const F: &str = "sds_processor_create";
    guard(F, None, || {
        sdstream_core::log::to_stderr_unless_subscribed();
        // SAFETY: forwarded from the caller.
        let out = unsafe { out_arg(F, "out", out)? };
        *out = std::ptr::null_mut();
        // SAFETY: forwarded from the caller.
        let name = unsafe { str_arg(F, "name", name)? };
        let params = if params_json.is_null() {
            "{}"
        } else {
            // SAFETY: non-NULL, forwarded from the caller.
            unsafe { str_arg(F, "params_json", params_json)? }
        };
        let settings = if settings_json.is_null() {
            EngineSettings::default()
        } else {
            // SAFETY: non-NULL, forwarded from the caller.
            let text = unsafe { str_arg(F, "settings_json", settings_json)? };
            EngineSettings::from_json(text).map_err(|e| Failure::from_core(F, e, false))?
        };
        let processor = ImageProcessor::from_json(name, params, &settings)
            .map_err(|e| Failure::from_core(F, e, false))?;
        *out = Box::into_raw(Box::new(SdsProcessor {
            processor: Mutex::new(processor),
            last_error: ErrorSlot::default(),
        }));
        Ok(())
    })
}

/// The control image of `frame` (any size and pixel format), written to `out` as 8-bit
/// interleaved values. Blocks for the processor's work. The buffer is checked after the work
/// (the size of a processor's image is known for every processor but is cheap to ask for with
/// `sds_processor_output_size`): too small gives `SDS_ERR_BUFFER_TOO_SMALL` with `out->size`.
/// A temporal processor (`temporal_net_tensorrt`) keeps the frame for the next call. Thread-safe.
///
/// # Safety
/// `processor` is NULL or a live handle; `frame` NULL or as `SdsFrame` describes; `out` NULL or
/// writable with `out->data` valid for `out->capacity` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sds_processor_process(
    processor: *mut SdsProcessor,
    frame: *const SdsFrame,
    out: *mut SdsControlOutput,
) -> SdsStatus {
    const F: &str = "sds_processor_process";
    with_handle(F, processor, |h| {
        // SAFETY: by the caller's contract.
        let (frame, out) = unsafe {
            (
                frame.as_ref().ok_or_else(|| Failure::null(F, "frame"))?,
                out_arg(F, "out", out)?,
            )
        };
        if out.data.is_null() {
            return Err(Failure::null(F, "out->data"));
        }
        // SAFETY: by the caller's contract.
        let frame = unsafe { frame.as_frame(F)? };
        let image = h
            .processor
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .process(&frame)
            .map_err(|e| Failure::from_core(F, e, false))?;
        // SAFETY: out->data checked non-NULL; capacity by the caller's contract.
        unsafe { write_control(F, out, &image) }
    })
}

/// Copies `image` to the caller's buffer after describing it in `out`.
///
/// # Safety
/// `out.data` must be non-NULL with `out.capacity` writable bytes.
unsafe fn write_control(
    function: &str,
    out: &mut SdsControlOutput,
    image: &ControlImage,
) -> Result<(), Failure> {
    out.width = image.width as u32;
    out.height = image.height as u32;
    out.channels = image.channels as u32;
    out.size = image.data.len();
    if out.capacity < image.data.len() {
        return Err(Failure::new(
            SdsStatus::SDS_ERR_BUFFER_TOO_SMALL,
            format!(
                "{function}: a {}x{} image of {} channels needs {} bytes; the buffer has {}",
                image.width,
                image.height,
                image.channels,
                image.data.len(),
                out.capacity
            ),
        ));
    }
    // SAFETY: `size <= capacity` bytes at the caller's buffer, which does not overlap ours.
    unsafe {
        std::ptr::copy_nonoverlapping(image.data.as_ptr(), out.data, image.data.len());
    }
    Ok(())
}

/// The image `sds_processor_process` makes for a `width × height` frame: `*out_width` ×
/// `*out_height` pixels of `*channels` bytes, `*size` bytes in all (each out-pointer may be
/// NULL). Thread-safe.
///
/// # Safety
/// `processor` is NULL or a live handle; the out-pointers NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sds_processor_output_size(
    processor: *mut SdsProcessor,
    width: u32,
    height: u32,
    out_width: *mut u32,
    out_height: *mut u32,
    channels: *mut u32,
    size: *mut usize,
) -> SdsStatus {
    const F: &str = "sds_processor_output_size";
    with_handle(F, processor, |h| {
        let p = h.processor.lock().unwrap_or_else(PoisonError::into_inner);
        let (w, ht) = p.output_size(width as usize, height as usize);
        let c = p.output_channels();
        let bytes = w
            .checked_mul(ht)
            .and_then(|n| n.checked_mul(c))
            .ok_or_else(|| {
                Failure::new(
                    SdsStatus::SDS_ERR_INVALID_ARGUMENT,
                    format!("{F}: a {width}x{height} frame's image would not fit in memory"),
                )
            })?;
        // SAFETY: NULL or writable by the caller's contract.
        unsafe {
            write_opt(out_width, w as u32);
            write_opt(out_height, ht as u32);
            write_opt(channels, c as u32);
            write_opt(size, bytes);
        }
        Ok(())
    })
}

/// Forgets the previous frame: a temporal processor's next image starts over. Thread-safe.
///
/// # Safety
/// `processor` is NULL or a live handle.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sds_processor_reset(processor: *mut SdsProcessor) -> SdsStatus {
    with_handle("sds_processor_reset", processor, |h| {
        h.processor
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .reset();
        Ok(())
    })
}

/// The last error of a call on this handle, as this thread's copy (valid until this thread
/// calls it again); `""` when none. NULL gives a message about the NULL handle.
///
/// # Safety
/// `processor` is NULL or a live handle.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sds_processor_last_error(processor: *const SdsProcessor) -> *const c_char {
    // SAFETY: by the caller's contract.
    match unsafe { processor.as_ref() } {
        Some(handle) => thread_copy_of(&handle.last_error),
        None => c"sds_processor_last_error: `processor` is NULL".as_ptr(),
    }
}

/// Frees the handle (the network stays loaded while a stream or another processor uses it).
/// NULL is a no-op. Call it once, when no other thread uses the handle.
///
/// # Safety
/// `processor` is NULL or a live handle not used by any other thread.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sds_processor_destroy(processor: *mut SdsProcessor) -> SdsStatus {
    if processor.is_null() {
        return SdsStatus::SDS_OK;
    }
    guard("sds_processor_destroy", None, || {
        // SAFETY: made by Box::into_raw in create; the caller gives it up here.
        drop(unsafe { Box::from_raw(processor) });
        Ok(())
    })
}
