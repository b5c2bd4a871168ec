//! The C ABI hands `device` and `dtype` to core as given: settings that ask for CUDA reach the
//! model load, whose error (in a build without the `cuda` feature) names the device and the
//! feature to build with.

use std::ffi::{CStr, CString, c_char, c_void};
use std::path::{Path, PathBuf};

use sdstream::SdsStatus;

type SdsEngine = c_void;

unsafe extern "C" {
    fn sds_last_error() -> *const c_char;
    fn sds_engine_create(
        params_json: *const c_char,
        settings_json: *const c_char,
        options_json: *const c_char,
        out: *mut *mut SdsEngine,
    ) -> SdsStatus;
}

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures")
        .join(name)
}

#[cfg(not(feature = "cuda"))]
#[test]
fn cuda_settings_reach_the_model_load() {
    // Debug-quoted paths: JSON strings for these ASCII fixture paths.
    let model = fixture("tiny-sd-turbo").display().to_string();
    let taesd = fixture("tiny-taesd").display().to_string();
    let params = format!(r#"{{"model_id": {model:?}, "width": 64, "height": 64}}"#);
    let settings = format!(
        r#"{{"device": "cuda:1", "dtype": "bf16", "vae": {taesd:?}, "allow_any_resolution": true}}"#
    );
    let params = CString::new(params).unwrap();
    let settings = CString::new(settings).unwrap();
    let mut engine: *mut SdsEngine = std::ptr::null_mut();
    // SAFETY: NUL-terminated strings, a NULL options text (the defaults), a writable handle.
    let status = unsafe {
        sds_engine_create(
            params.as_ptr(),
            settings.as_ptr(),
            std::ptr::null(),
            &mut engine,
        )
    };
    // SAFETY: the library's message for this thread's last failure, valid until the next.
    let message = unsafe { CStr::from_ptr(sds_last_error()) }
        .to_string_lossy()
        .into_owned();
    assert!(engine.is_null(), "an engine was created: {message}");
    assert_ne!(status, SdsStatus::SDS_OK);
    assert!(
        message.contains("device \"cuda:1\"") && message.contains("`cuda` feature"),
        "{status:?}: {message}"
    );
}
