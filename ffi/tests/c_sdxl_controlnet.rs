//! The camera app's body through the C ABI with no new call: `stabilityai/sdxl-turbo` with
//! `xinsir/controlnet-canny-sdxl-1.0` at 0.3, the ids found under the settings' `model_root`,
//! where the tiny SDXL stand-ins are (tests/fixtures/tiny-sdxl, tiny-sdxl-controlnet,
//! tiny-taesdxl as `madebyollin/taesdxl`). The C engine's frames equal the Rust engine's byte
//! for byte, and the net moves the picture.

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

const SIDE: u32 = 512;
const FRAMES: usize = 2;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures")
        .join(name)
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

/// A model root holding the stand-ins under the camera app's ids.
fn stand_in_root() -> PathBuf {
    let root = Path::new(env!("CARGO_TARGET_TMPDIR")).join("c-sdxl-camera-root");
    let _ = std::fs::remove_dir_all(&root);
    for (id, folder) in [
        ("stabilityai/sdxl-turbo", "tiny-sdxl"),
        ("xinsir/controlnet-canny-sdxl-1.0", "tiny-sdxl-controlnet"),
        ("madebyollin/taesdxl", "tiny-taesdxl"),
    ] {
        copy_dir(&fixture(folder), &root.join(id));
    }
    root
}

fn settings_json(root: &Path) -> String {
    serde_json::json!({ "model_root": root.display().to_string() }).to_string()
}

fn params_json(with_net: bool) -> String {
    let nets = if with_net {
        serde_json::json!([{
            "model_id": "xinsir/controlnet-canny-sdxl-1.0",
            "conditioning_scale": 0.3,
            "preprocessor": "canny",
            "preprocessor_params": {"low_threshold": 100, "high_threshold": 200},
            "enabled": true,
        }])
    } else {
        serde_json::json!([])
    };
    serde_json::json!({
        "model_id": "stabilityai/sdxl-turbo",
        "prompt": "a portrait in the style of a stained glass window",
        "seed": 42,
        "width": SIDE,
        "height": SIDE,
        "t_index_list": [20],
        "controlnets": nets,
    })
    .to_string()
}

/// Rings and bars: edges for canny to find.
fn frame_bytes() -> Vec<u8> {
    let mut data = Vec::with_capacity((SIDE * SIDE * 3) as usize);
    for y in 0..SIDE as i32 {
        for x in 0..SIDE as i32 {
            let r = (((x - 256) * (x - 256) + (y - 200) * (y - 200)) as f64).sqrt() as i32;
            let on = r / 24 % 2 == 0 || ((x / 64) % 2 == 0 && y > 400);
            let v = if on { 220u8 } else { 30 };
            data.extend_from_slice(&[v, v / 2 + (x % 50) as u8, 255 - v]);
        }
    }
    data
}

/// The first FRAMES outputs of a C engine.
fn c_outputs(params: &str, settings: &str, data: &[u8]) -> Vec<Vec<u8>> {
    let (params, settings) = (
        CString::new(params).unwrap(),
        CString::new(settings).unwrap(),
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
        let message = unsafe { CStr::from_ptr(sds_last_error()) }.to_string_lossy();
        panic!("sds_engine_create failed: {message}");
    }
    let frame = SdsFrame {
        data: data.as_ptr(),
        width: SIDE,
        height: SIDE,
        stride: SIDE * 3,
        format: SDS_PIXEL_FORMAT_RGB8,
    };
    let mut outputs = Vec::new();
    for _ in 0..FRAMES {
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
        outputs.push(buffer);
    }
    // SAFETY: the handle, no longer used.
    assert_eq!(unsafe { sds_engine_destroy(engine) }, SdsStatus::SDS_OK);
    outputs
}

#[test]
fn the_camera_apps_sdxl_body_streams_through_the_c_abi() {
    let root = stand_in_root();
    let settings = settings_json(&root);
    let data = frame_bytes();
    let with_net = c_outputs(&params_json(true), &settings, &data);
    let without = c_outputs(&params_json(false), &settings, &data);

    let rust_settings = EngineSettings::from_json(&settings).unwrap();
    let params = StreamDiffusionParams::from_json_with(&params_json(true), &rust_settings)
        .expect("the camera body validates");
    let options = EngineOptions {
        warmup: false,
        ..EngineOptions::default()
    };
    let engine = Engine::new(params, rust_settings, options).expect("Rust engine");
    for (i, c_frame) in with_net.iter().enumerate() {
        let frame = Frame::packed(&data, SIDE as usize, SIDE as usize, PixelFormat::Rgb8).unwrap();
        let rust = engine.process(frame).expect("output");
        assert!(
            &rust.image.data == c_frame,
            "frame {i}: C output = Rust output, byte for byte"
        );
    }
    engine.close();

    let (a, b) = (&with_net[FRAMES - 1], &without[FRAMES - 1]);
    let levels = a
        .iter()
        .zip(b)
        .map(|(x, y)| (*x as f64 - *y as f64).abs())
        .sum::<f64>()
        / a.len() as f64;
    println!("C engine, sdxl-turbo stand-in with the canny net at 0.3 vs none: {levels:.2} levels");
    assert!(levels > 0.5, "{levels}");
}
