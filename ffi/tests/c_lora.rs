//! LoRAs through the C ABI need no new call: the parameters' `lora_dict`, `use_lcm_lora` and
//! `lcm_lora_id` pick them. On the SD 1.5-shaped tiny checkpoint (tests/fixtures/tiny-sd15),
//! the C engine's output equals the Rust engine's byte for byte and differs from the output
//! without LoRAs; a LoRA made for another model fails creation with a message naming its layer.

use std::ffi::{CStr, CString, c_char, c_void};
use std::path::{Path, PathBuf};

use sdstream::{SDS_PIXEL_FORMAT_RGB8, SdsFrame, SdsOutput, SdsStatus};
use sdstream_core::{
    Engine, EngineOptions, EngineSettings, Frame, PixelFormat, StreamDiffusionParams,
};

type SdsEngine = c_void;

unsafe extern "C" {
    fn sds_last_error() -> *const c_char;
    fn sds_engine_create(
        params_json: *const c_char,
        settings_json: *const c_char,
        options_json: *const c_char,
        out: *mut *mut SdsEngine,
    ) -> SdsStatus;
    fn sds_engine_destroy(engine: *mut SdsEngine) -> SdsStatus;
    fn sds_engine_process(
        engine: *mut SdsEngine,
        frame: *const SdsFrame,
        out: *mut SdsOutput,
    ) -> SdsStatus;
}

const SIDE: u32 = 64;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures")
        .join(name)
}

/// A JSON string literal of a fixture's path (`{:?}` escapes like JSON for these paths).
fn fixture_json(name: &str) -> String {
    format!("{:?}", fixture(name).display().to_string())
}

fn settings_json() -> String {
    format!(
        "{{\"vae\": {}, \"allow_any_resolution\": true}}",
        fixture_json("tiny-taesd")
    )
}

fn params_json(model: &str, lcm: bool, lora: bool) -> String {
    let lora_dict = if lora {
        format!("{{{}: 0.7}}", fixture_json("lora/peft-a"))
    } else {
        "null".into()
    };
    format!(
        "{{\"model_id\": {}, \"prompt\": \"a watercolor of a lighthouse\", \"width\": {SIDE}, \
         \"height\": {SIDE}, \"use_lcm_lora\": {lcm}, \"lcm_lora_id\": {}, \"lora_dict\": {lora_dict}}}",
        fixture_json(model),
        fixture_json("lora/lcm-kohya")
    )
}

fn frame_bytes() -> Vec<u8> {
    let img = image::open(fixture("frames/000.png"))
        .expect("frame")
        .to_rgb8();
    img.into_raw()
}

/// The first output of a C engine created with `params`, or the error message.
fn c_first_output(params: &str, data: &[u8]) -> Result<Vec<u8>, String> {
    let (params, settings) = (
        CString::new(params).unwrap(),
        CString::new(settings_json()).unwrap(),
    );
    let options = CString::new("{\"warmup\": false}").unwrap();
    let mut engine: *mut SdsEngine = std::ptr::null_mut();
    // SAFETY: valid C strings and a writable out-pointer.
    let status = unsafe {
        sds_engine_create(
            params.as_ptr(),
            settings.as_ptr(),
            options.as_ptr(),
            &mut engine,
        )
    };
    if status != SdsStatus::SDS_OK {
        // SAFETY: NUL-terminated, valid until this thread's next failing call.
        return Err(unsafe { CStr::from_ptr(sds_last_error()) }
            .to_string_lossy()
            .into_owned());
    }
    let frame = SdsFrame {
        data: data.as_ptr(),
        width: SIDE,
        height: SIDE,
        stride: SIDE * 3,
        format: SDS_PIXEL_FORMAT_RGB8,
    };
    let mut buffer = vec![0u8; data.len()];
    let mut out = SdsOutput {
        data: buffer.as_mut_ptr(),
        capacity: buffer.len(),
        stride: 0,
        width: 0,
        height: 0,
        format: SDS_PIXEL_FORMAT_RGB8,
        size: 0,
        frame_id: 0,
        timestamp: 0,
        params_version: 0,
    };
    // SAFETY: a live handle, a frame over `data`, an output over `buffer`.
    let status = unsafe { sds_engine_process(engine, &frame, &mut out) };
    assert_eq!(status, SdsStatus::SDS_OK);
    assert_eq!((out.width, out.height, out.size), (SIDE, SIDE, data.len()));
    // SAFETY: the handle, no longer used.
    assert_eq!(unsafe { sds_engine_destroy(engine) }, SdsStatus::SDS_OK);
    Ok(buffer)
}

#[test]
fn the_body_picks_the_loras_through_the_c_abi() {
    let data = frame_bytes();
    let with = c_first_output(&params_json("tiny-sd15", true, true), &data).expect("C engine");
    let without = c_first_output(&params_json("tiny-sd15", false, false), &data).expect("C engine");

    let settings = EngineSettings::from_json(&settings_json()).unwrap();
    let params =
        StreamDiffusionParams::from_json_with(&params_json("tiny-sd15", true, true), &settings)
            .unwrap();
    let options = EngineOptions {
        warmup: false,
        ..EngineOptions::default()
    };
    let engine = Engine::new(params, settings, options).expect("Rust engine");
    let frame = Frame::packed(&data, SIDE as usize, SIDE as usize, PixelFormat::Rgb8).unwrap();
    let rust = engine.process(frame).expect("output");
    engine.close();
    assert!(
        rust.image.data == with,
        "C output = Rust output, byte for byte"
    );

    let levels = with
        .iter()
        .zip(&without)
        .map(|(a, b)| (*a as f64 - *b as f64).abs())
        .sum::<f64>()
        / with.len() as f64;
    println!("C engine, LCM-LoRA + peft-a at 0.7 vs none: mean {levels:.2} levels");
    assert!(levels > 1.0, "{levels}");

    // peft-a patches the SD 1.5-shaped UNet; on the tiny sd-turbo it does not fit.
    let turbo = params_json("tiny-sd-turbo", false, true);
    let err = c_first_output(&turbo, &data).expect_err("a LoRA for another model");
    assert!(
        err.contains("peft-a") && err.contains("does not fit"),
        "{err}"
    );
}
