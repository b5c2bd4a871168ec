//! C ABI for sdstream (see `include/sdstream.h`, generated from this crate by cbindgen).
//!
//! The layer converts and forwards: JSON texts go to core's parsers (which validate), frames
//! become [`sdstream_core::Frame`]s (which core checks), errors become [`SdsStatus`] codes with core's
//! message. Every entry point checks its pointers and catches panics.

mod engine;
mod error;
mod frame;
mod processor;

/// This library's own Rust allocations keep large freed blocks for reuse: a frame allocates the
/// same large buffers every time, and the system allocator would hand them back to the kernel and
/// fault them in again (sdstream::alloc). The host's own malloc is untouched.
#[global_allocator]
static ALLOCATOR: sdstream_core::alloc::ReusingAllocator =
    sdstream_core::alloc::ReusingAllocator::new();

use std::ffi::c_char;

pub use engine::{SdsEngine, SdsUpdateKind};
pub use error::SdsStatus;
pub use frame::{
    SDS_PIXEL_FORMAT_BGRA8, SDS_PIXEL_FORMAT_RGB8, SDS_PIXEL_FORMAT_RGBA8, SDS_PIXEL_FORMAT_RGBF32,
    SdsControlImage, SdsFrame, SdsOutput, SdsPixelFormat,
};
pub use processor::{SdsControlOutput, SdsProcessor};

/// Major version of the library this header belongs to.
pub const SDS_VERSION_MAJOR: u32 = 0;
/// Minor version of the library this header belongs to.
pub const SDS_VERSION_MINOR: u32 = 1;
/// Patch version of the library this header belongs to.
pub const SDS_VERSION_PATCH: u32 = 0;

/// The library's version, `"MAJOR.MINOR.PATCH"`: a static string (never freed). Compare with the
/// `SDS_VERSION_*` macros to detect a header/library mismatch. Thread-safe.
#[unsafe(no_mangle)]
pub extern "C" fn sds_version() -> *const c_char {
    concat!(env!("CARGO_PKG_VERSION"), "\0").as_ptr().cast()
}

/// The message of the last failed `sds_*` call on this thread ("" if none), for failures before
/// a handle exists (`sds_engine_create`) and for hosts that share a handle between threads.
/// NUL-terminated UTF-8 owned by the library: valid until the next failing call on this thread.
/// Thread-safe (each thread has its own).
#[unsafe(no_mangle)]
pub extern "C" fn sds_last_error() -> *const c_char {
    error::thread_last_error()
}

/// Frees a string this library returned as caller-owned (`sds_engine_status_json`). NULL is a
/// no-op. Thread-safe.
///
/// # Safety
/// `s` is NULL or such a string, not freed before.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sds_string_free(s: *mut c_char) {
    if s.is_null() {
        return;
    }
    // SAFETY: `s` came from CString::into_raw in this library (the caller's contract).
    drop(unsafe { std::ffi::CString::from_raw(s) });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_macros_match_the_crate_version() {
        let expected = [
            env!("CARGO_PKG_VERSION_MAJOR"),
            env!("CARGO_PKG_VERSION_MINOR"),
            env!("CARGO_PKG_VERSION_PATCH"),
        ];
        let ours = [SDS_VERSION_MAJOR, SDS_VERSION_MINOR, SDS_VERSION_PATCH].map(|v| v.to_string());
        assert_eq!(ours, expected);
        // SAFETY: sds_version returns a static NUL-terminated string.
        let runtime = unsafe { std::ffi::CStr::from_ptr(sds_version()) };
        assert_eq!(runtime.to_str(), Ok(env!("CARGO_PKG_VERSION")));
    }
}
