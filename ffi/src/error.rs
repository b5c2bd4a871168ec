//! Status codes, the two last-error slots (per handle and per thread), and the boundary guard
//! that turns errors and panics into status codes.

use std::any::Any;
use std::cell::RefCell;
use std::ffi::{CString, c_char};
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
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

/// The message of the last failure on this thread (any function, any handle).
pub(crate) fn thread_last_error() -> *const c_char {
    LAST_ERROR.with(|slot| slot.borrow().as_ptr())
}

/// A handle's last-error slot.
#[derive(Debug, Default)]
pub(crate) struct ErrorSlot(Mutex<CString>);

impl ErrorSlot {
    pub fn set(&self, message: &CString) {
        *self.0.lock().unwrap_or_else(PoisonError::into_inner) = message.clone();
    }

    /// Pointer to the message; valid until the slot is set again or dropped.
    pub fn as_ptr(&self) -> *const c_char {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_ptr()
    }
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
    LAST_ERROR.with(|slot| *slot.borrow_mut() = message);
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
