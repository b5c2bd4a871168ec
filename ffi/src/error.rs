//! Status codes, the last-error slots (per handle, and per thread: the thread's last failure and
//! its copy of a handle's message), and the boundary guard that turns errors and panics into
//! status codes.

use std::any::Any;
use std::cell::RefCell;
use std::ffi::{CStr, CString, c_char};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::{Mutex, PoisonError};

use sdstream_core::Error;

/// What a call did. `SDS_OK` is 0; every other value is a failure whose message
/// `sds_last_error()` (and, for calls on a handle, `sds_engine_last_error()`) returns.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[allow(non_camel_case_types)]
pub enum SdsStatus {
    /// Success.
    SDS_OK = 0,
    /// A required pointer argument was NULL; the message names it.
    SDS_ERR_NULL = 1,
    /// An argument is out of range or malformed (a string that is not UTF-8, an unknown
    /// pixel format, a negative timeout).
    SDS_ERR_INVALID_ARGUMENT = 2,
    /// A JSON text is not JSON (a syntax error), or an engine-options text does not fit
    /// EngineOptions.
    SDS_ERR_INVALID_JSON = 3,
    /// Parameters or settings do not fit their model (an unknown field, a wrong type) or break
    /// a rule (a range, a combination, a model folder that does not exist, a feature sdstream
    /// does not support yet), or options break a rule; the message names the field.
    SDS_ERR_INVALID_PARAMS = 4,
    /// A frame does not fit its description (zero size, stride shorter than a row).
    SDS_ERR_INVALID_FRAME = 5,
    /// A model could not be found, read or run (missing files, bad weights, a tensor error).
    SDS_ERR_MODEL = 6,
    /// The input queue is full and the drop policy is `lossless`: the frame was not taken.
    SDS_ERR_QUEUE_FULL = 7,
    /// No output is ready (poll), none came in time (recv), or this frame produced none
    /// (process: it was dropped or failed; the message says which). Not recorded as an error
    /// by poll and recv.
    SDS_ERR_NO_OUTPUT = 8,
    /// The pipeline is still loading (`sds_engine_wait_ready` timed out).
    SDS_ERR_NOT_READY = 9,
    /// The engine cannot do this in its current state: it has no pipeline (its load failed or a
    /// panic discarded it; `sds_engine_restart` or `sds_engine_update_params` builds one).
    SDS_ERR_STATE = 10,
    /// The caller's output buffer is too small or its stride shorter than a row; the `SdsOutput`
    /// says the size needed. An output already made is kept: the next poll or recv returns it.
    SDS_ERR_BUFFER_TOO_SMALL = 11,
    /// The engine was closed with `sds_engine_close`.
    SDS_ERR_CLOSED = 12,
    /// Rust code panicked; the panic was caught at the boundary and its message kept.
    SDS_ERR_PANIC = 13,
    /// Anything else (an I/O error, a failed allocation of a message).
    SDS_ERR_INTERNAL = 14,
}

/// A failed call: its status and message.
#[derive(Debug)]
pub(crate) struct Failure {
    pub status: SdsStatus,
    pub message: String,
}

impl Failure {
    pub fn new(status: SdsStatus, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
        }
    }

    /// A NULL pointer argument.
    pub fn null(function: &str, argument: &str) -> Self {
        Self::new(
            SdsStatus::SDS_ERR_NULL,
            format!("{function}: `{argument}` is NULL"),
        )
    }

    /// A core error, classified by variant; `closed` tells a closed engine's state errors
    /// apart from the others.
    pub fn from_core(function: &str, error: Error, closed: bool) -> Self {
        let status = match &error {
            Error::InvalidParam { .. } => SdsStatus::SDS_ERR_INVALID_PARAMS,
            Error::Json(_) => SdsStatus::SDS_ERR_INVALID_JSON,
            Error::ModelNotFound { .. }
            | Error::ModelLoad { .. }
            | Error::UnsupportedConfig { .. }
            | Error::Candle(_) => SdsStatus::SDS_ERR_MODEL,
            Error::InvalidFrame(_) => SdsStatus::SDS_ERR_INVALID_FRAME,
            Error::NoOutput { .. } => SdsStatus::SDS_ERR_NO_OUTPUT,
            Error::QueueFull { .. } => SdsStatus::SDS_ERR_QUEUE_FULL,
            Error::State(_) if closed => SdsStatus::SDS_ERR_CLOSED,
            Error::State(_) => SdsStatus::SDS_ERR_STATE,
            Error::Io { .. } => SdsStatus::SDS_ERR_INTERNAL,
        };
        Self::new(status, format!("{function}: {error}"))
    }
}

/// A message as a C string (interior NULs escaped).
pub(crate) fn c_string(message: &str) -> CString {
    CString::new(message.replace('\0', "\\0")).unwrap_or_default()
}

thread_local! {
    /// What `sds_last_error()` returns: the last failure of any call on this thread.
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
    /// What `sds_engine_last_error()` returns: this thread's copy of a handle's message, so that
    /// another thread failing a call on the handle cannot free what this thread is reading.
    static HANDLE_ERROR_COPY: RefCell<CString> = RefCell::new(CString::default());
}

/// Returned when a thread-local slot is gone (the thread is exiting).
const NO_SLOT: &CStr = c"sds_*: the thread's error slot is gone (the thread is exiting)";

/// The message of the last failure on this thread (any function, any handle).
pub(crate) fn thread_last_error() -> *const c_char {
    LAST_ERROR
        .try_with(|slot| slot.borrow().as_ptr())
        .unwrap_or(NO_SLOT.as_ptr())
}

/// Copies a handle's message into this thread's own slot and returns that copy: valid until
/// this thread calls this again, whatever other threads do with the handle.
pub(crate) fn thread_copy_of(handle_slot: &ErrorSlot) -> *const c_char {
    let copy = catch_unwind(AssertUnwindSafe(|| {
        HANDLE_ERROR_COPY.try_with(|slot| {
            let mut slot = slot.borrow_mut();
            handle_slot.with(|message| {
                // Reuses the thread's buffer: no allocation once it is large enough.
                let mut bytes = std::mem::take(&mut *slot).into_bytes_with_nul();
                bytes.clear();
                bytes.extend_from_slice(message.to_bytes_with_nul());
                *slot = CString::from_vec_with_nul(bytes).unwrap_or_default();
            });
            slot.as_ptr()
        })
    }));
    match copy {
        Ok(Ok(ptr)) => ptr,
        Ok(Err(_)) => NO_SLOT.as_ptr(),
        Err(_) => c"sds_engine_last_error: panicked while copying the message".as_ptr(),
    }
}

/// A handle's last-error slot. Its message is never handed out by pointer (another thread may
/// replace it at any time): readers copy it while holding the lock.
#[derive(Debug, Default)]
pub(crate) struct ErrorSlot(Mutex<CString>);

impl ErrorSlot {
    pub fn set(&self, message: &CString) {
        *self.0.lock().unwrap_or_else(PoisonError::into_inner) = message.clone();
    }

    /// Runs `read` on the current message, with the slot locked.
    pub fn with<R>(&self, read: impl FnOnce(&CStr) -> R) -> R {
        read(&self.0.lock().unwrap_or_else(PoisonError::into_inner))
    }
}

/// Copies `message` into `buf` as `snprintf` does: at most `cap - 1` bytes, cut at a UTF-8
/// character boundary, then a NUL (nothing when `cap` is 0). Returns whether all of it fit.
///
/// # Safety
/// `buf` must be valid for `cap` writable bytes (NULL only with `cap` 0).
pub(crate) unsafe fn copy_out(message: &CStr, buf: *mut c_char, cap: usize) -> bool {
    let bytes = message.to_bytes();
    if cap == 0 {
        return false;
    }
    let mut n = bytes.len().min(cap - 1);
    // Messages are UTF-8 (built from Rust strings); never split a character.
    while n < bytes.len() && n > 0 && (bytes[n] & 0xC0) == 0x80 {
        n -= 1;
    }
    // SAFETY: `n + 1 <= cap` bytes written to the caller's buffer; `bytes` is our own memory,
    // so the two do not overlap.
    unsafe {
        std::ptr::copy_nonoverlapping(bytes.as_ptr(), buf.cast::<u8>(), n);
        buf.add(n).write(0);
    }
    n == bytes.len()
}

fn panic_message(payload: &(dyn Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "a panic without a message".to_string()
    }
}

/// Records a failure in the thread's slot and, when given, the handle's.
fn record(failure: &Failure, handle_slot: Option<&ErrorSlot>) {
    let message = c_string(&failure.message);
    if let Some(slot) = handle_slot {
        slot.set(&message);
    }
    // Fails only while the thread exits, when nobody can read the slot any more.
    let _ = LAST_ERROR.try_with(|slot| *slot.borrow_mut() = message);
}

/// Runs one C entry point: catches panics, records failures, returns the status. `slot` is the
/// handle's error slot when the call has a (non-NULL) handle. `SDS_ERR_NO_OUTPUT` with an empty
/// message (poll or recv found nothing yet: not a failure) is returned without being recorded.
pub(crate) fn guard(
    function: &str,
    slot: Option<&ErrorSlot>,
    body: impl FnOnce() -> Result<(), Failure>,
) -> SdsStatus {
    let failure = match catch_unwind(AssertUnwindSafe(body)) {
        Ok(Ok(())) => return SdsStatus::SDS_OK,
        Ok(Err(failure)) => failure,
        Err(payload) => Failure::new(
            SdsStatus::SDS_ERR_PANIC,
            format!("{function}: panicked: {}", panic_message(payload.as_ref())),
        ),
    };
    if failure.status != SdsStatus::SDS_ERR_NO_OUTPUT || !failure.message.is_empty() {
        record(&failure, slot);
    }
    failure.status
}

/// An opaque handle of the C ABI: its name in messages and its own last-error slot.
pub(crate) trait Handle {
    /// The argument's name in a "`…` is NULL" message (`engine`, `processor`).
    const ARGUMENT: &'static str;
    /// Where a failure on this handle is recorded for `sds_*_last_error`.
    fn error_slot(&self) -> &ErrorSlot;
}

/// Runs `body` on a non-NULL handle inside the boundary guard ([`guard`]); a NULL handle is
/// [`Failure::null`], recorded in the thread's slot only.
pub(crate) fn with_handle<H: Handle>(
    function: &str,
    handle: *const H,
    body: impl FnOnce(&H) -> Result<(), Failure>,
) -> SdsStatus {
    // SAFETY: a non-NULL handle is one its `_create` function returned and not yet destroyed
    // (the caller's contract).
    match unsafe { handle.as_ref() } {
        Some(handle) => guard(function, Some(handle.error_slot()), || body(handle)),
        None => guard(function, None, || Err(Failure::null(function, H::ARGUMENT))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Copies `message` into a buffer of `cap` bytes (plus a guard byte that must stay untouched).
    fn copied(message: &str, cap: usize) -> (bool, Vec<u8>) {
        let message = c_string(message);
        let mut buf = vec![0xAAu8; cap + 1];
        // SAFETY: `buf` has `cap` writable bytes (and one more).
        let fit = unsafe { copy_out(&message, buf.as_mut_ptr().cast(), cap) };
        assert_eq!(buf[cap], 0xAA, "wrote past `cap`");
        buf.truncate(cap);
        (fit, buf)
    }

    #[test]
    fn copy_out_truncates_like_snprintf_at_a_character_boundary() {
        assert_eq!(copied("abc", 4), (true, b"abc\0".to_vec()));
        assert!(copied("abc", 8).0);
        assert_eq!(copied("abc", 3), (false, b"ab\0".to_vec()));
        assert_eq!(copied("abc", 1), (false, b"\0".to_vec()));
        assert_eq!(copied("", 1), (true, b"\0".to_vec()));
        // "é" is two bytes: room for three gets one "é" and the NUL, never half a character.
        assert_eq!(copied("éé", 4), (false, vec![0xC3, 0xA9, 0, 0xAA]));
        assert_eq!(copied("éé", 5), (true, vec![0xC3, 0xA9, 0xC3, 0xA9, 0]));
        // SAFETY: cap 0 writes nothing, so NULL is fine.
        assert!(!unsafe { copy_out(c"x", std::ptr::null_mut(), 0) });
    }
}
