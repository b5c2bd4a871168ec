//! A deterministic fuzzer for the C entry points that take sizes and options from the host
//! (issue #20): the exported `sds_*` symbols, called as a C host calls them (raw pointers,
//! declared here from the header's signatures), with
//!
//! * options JSON for `sds_engine_create_async`: mutated option objects (boundary numbers,
//!   other types, unknown keys, broken syntax, bytes that are not UTF-8). The status and the
//!   message must be core's (`EngineOptions::from_json`) translated, an option outside
//!   `EngineOptions::OPTION_RANGES` is never accepted, and no engine is made.
//! * `SdsFrame` descriptions: random width, height, stride, pixel format and data pointer for
//!   every frame-taking entry point (also as a control image). The expected answer comes from
//!   the header's contract, computed here on its own: sides 1 to 16384, stride at least a row,
//!   `stride * (height - 1) + width * bytes_per_pixel` at most 4 GiB. Accepted descriptions are
//!   backed by exactly that many bytes (when at most 4 MiB); refused ones point at 16 bytes.
//! * `SdsOutput` buffers for `sds_engine_process`: random stride and capacity; the answer and
//!   the `size` it reports must follow the same contract.
//!
//! The engine is closed before the frames arrive: a valid frame is still copied in full (the
//! copy comes before the closed check) and then answered `SDS_ERR_CLOSED`, so the run needs no
//! inference. Bounded: `SDS_FUZZ_ITERATIONS` frames (default 20000, a few seconds), seed
//! `SDS_FUZZ_SEED`. Prints its counts; panics (`SDS_ERR_PANIC`) must be 0.

use std::ffi::{CStr, CString, c_char, c_void};
use std::path::{Path, PathBuf};

use sdstream::{SdsControlImage, SdsFrame, SdsOutput, SdsStatus};
use sdstream_core::EngineOptions;

/// `SdsEngine *`: opaque to the host, as in C.
type SdsEngine = c_void;

// The C ABI exactly as a C host links it: the exported symbols with the header's signatures.
unsafe extern "C" {
    fn sds_last_error() -> *const c_char;
    fn sds_engine_create_async(
        params_json: *const c_char,
        settings_json: *const c_char,
        options_json: *const c_char,
        out: *mut *mut SdsEngine,
    ) -> SdsStatus;
    fn sds_engine_close(engine: *mut SdsEngine) -> SdsStatus;
    fn sds_engine_destroy(engine: *mut SdsEngine) -> SdsStatus;
    fn sds_engine_submit(engine: *mut SdsEngine, frame: *const SdsFrame, id: *mut u64)
    -> SdsStatus;
    fn sds_engine_submit_with_timestamp(
        engine: *mut SdsEngine,
        frame: *const SdsFrame,
        timestamp: i64,
        id: *mut u64,
    ) -> SdsStatus;
    fn sds_engine_submit_with_controls(
        engine: *mut SdsEngine,
        frame: *const SdsFrame,
        controls: *const SdsControlImage,
        count: usize,
        timestamp: *const i64,
        id: *mut u64,
    ) -> SdsStatus;
    fn sds_engine_process(
        engine: *mut SdsEngine,
        frame: *const SdsFrame,
        out: *mut SdsOutput,
    ) -> SdsStatus;
    fn sds_engine_process_with_controls(
        engine: *mut SdsEngine,
        frame: *const SdsFrame,
        controls: *const SdsControlImage,
        count: usize,
        out: *mut SdsOutput,
    ) -> SdsStatus;
    fn sds_engine_output_size(
        engine: *mut SdsEngine,
        format: u32,
        width: *mut u32,
        height: *mut u32,
        size: *mut usize,
    ) -> SdsStatus;
}

/// The stream size of the engine under test (the tiny fixture's).
const SIDE: u64 = 64;
/// Largest buffer this test backs an accepted frame description with.
const MAX_BACKED: u64 = 4 << 20;

/// xorshift64*: small, fast, the same sequence everywhere for one seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len() as u64) as usize]
    }
}

fn env_number(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures")
        .join(name)
}

fn c(text: &str) -> CString {
    CString::new(text).expect("no NUL")
}

fn last_error() -> String {
    // SAFETY: sds_last_error returns a NUL-terminated string valid until this thread's next
    // failing call.
    unsafe { CStr::from_ptr(sds_last_error()) }
        .to_string_lossy()
        .into_owned()
}

/// Bytes per pixel of a valid `SDS_PIXEL_FORMAT_*` (header: RGB8 3, RGBA8 4, BGRA8 4, RGBF32 12).
fn bytes_per_pixel(format: u32) -> Option<u64> {
    [3, 4, 4, 12].get(format as usize).copied()
}

/// What the header promises for a frame description (independently of the library's code):
/// the bytes it spans when valid, else the status it is refused with.
fn frame_contract(width: u32, height: u32, stride: u32, format: u32) -> Result<u64, SdsStatus> {
    let bpp = bytes_per_pixel(format).ok_or(SdsStatus::SDS_ERR_INVALID_ARGUMENT)?;
    // u128: no description can overflow it.
    let (w, h) = (u128::from(width), u128::from(height));
    let row = w * u128::from(bpp);
    let stride = if stride == 0 { row } else { u128::from(stride) };
    let spans = stride * h.saturating_sub(1) + row;
    if !(1..=16_384).contains(&w) || !(1..=16_384).contains(&h) || stride < row || spans > 4 << 30 {
        return Err(SdsStatus::SDS_ERR_INVALID_FRAME);
    }
    Ok(spans as u64)
}

fn random_side(rng: &mut Rng) -> u32 {
    match rng.below(10) {
        0..=5 => 1 + rng.below(96) as u32,
        6 => 65 + rng.below(2048) as u32,
        7 | 8 => rng.pick(&[
            0,
            1,
            16_383,
            16_384,
            16_385,
            65_536,
            1 << 28,
            1 << 30,
            u32::MAX,
        ]),
        _ => rng.next() as u32,
    }
}

fn random_stride(rng: &mut Rng, width: u32, format: u32) -> u32 {
    let row = u64::from(width) * bytes_per_pixel(format).unwrap_or(4);
    let near = |delta: i64| (row as i64 + delta).clamp(0, u32::MAX as i64) as u32;
    match rng.below(10) {
        0..=2 => 0,
        3 | 4 => near(0),
        5 | 6 => near(1 + rng.below(64) as i64),
        7 => near(-(1 + rng.below(4) as i64)),
        8 => rng.pick(&[1, 3, 1 << 20, 1 << 31, u32::MAX]),
        _ => rng.next() as u32,
    }
}

fn random_format(rng: &mut Rng) -> u32 {
    if rng.below(8) == 0 {
        let any = rng.next() as u32;
        rng.pick(&[4, 5, 255, 1 << 31, u32::MAX, any])
    } else {
        rng.below(4) as u32
    }
}

#[derive(Default, Debug)]
struct FrameCounts {
    tried: u64,
    copied: u64,
    invalid_frame: u64,
    invalid_argument: u64,
    null: u64,
    not_backed: u64,
    panics: u64,
    mismatches: u64,
}

/// Options JSON: mutated objects and broken texts through `sds_engine_create_async`.
fn fuzz_options(rng: &mut Rng, iterations: u64, params: &CStr, settings: &CStr) {
    let numbers = [
        "0",
        "1",
        "2",
        "-1",
        "1024",
        "1025",
        "1000000000",
        "86400000",
        "86400001",
        "3600000",
        "3600001",
        "4294967296",
        "18446744073709551615",
        "18446744073709551616",
        "1e20",
        "2.5",
        "-0",
        "\"8\"",
        "null",
        "true",
        "[]",
        "{}",
        "\"latest\"",
        "\"lossless\"",
        "\"sometimes\"",
    ];
    let keys = [
        "queue_capacity",
        "output_capacity",
        "drop_policy",
        "warmup",
        "input_timeout_ms",
        "fps_window_ms",
        "queue_depth",
        "",
    ];
    let (mut accepted, mut refused, mut not_utf8, mut panics, mut mismatches) = (0, 0, 0, 0, 0);
    for i in 0..iterations {
        let mut text = String::from("{");
        for k in 0..rng.below(4) {
            if k > 0 {
                text.push(',');
            }
            text.push_str(&format!("\"{}\": {}", rng.pick(&keys), rng.pick(&numbers)));
        }
        text.push('}');
        let mut bytes = text.into_bytes();
        // A few byte-level mutations: syntax broken, or not UTF-8 at all.
        for _ in 0..rng.below(3) {
            let at = rng.below(bytes.len() as u64 + 1) as usize;
            match rng.below(4) {
                0 if at < bytes.len() => {
                    bytes.remove(at);
                }
                1 => bytes.insert(at, rng.pick(b"{}[],:\"0-e.\xff\xc3")),
                _ => {}
            }
        }
        bytes.retain(|&b| b != 0);
        let options = CString::new(bytes.clone()).expect("NULs removed");
        // Not NULL, so that the test sees the call reset it.
        let unset = std::ptr::dangling_mut::<SdsEngine>();
        let mut engine = unset;
        // SAFETY: valid C strings and a writable out-pointer.
        let status = unsafe {
            sds_engine_create_async(
                params.as_ptr(),
                settings.as_ptr(),
                options.as_ptr(),
                &mut engine,
            )
        };
        let message = last_error();
        let expected = match std::str::from_utf8(&bytes) {
            Err(_) => {
                not_utf8 += 1;
                (SdsStatus::SDS_ERR_INVALID_ARGUMENT, None)
            }
            Ok(text) => match EngineOptions::from_json(text) {
                Ok(parsed) => {
                    accepted += 1;
                    // Independently of core's code: every numeric option within its range.
                    let values = [
                        parsed.queue_capacity as u64,
                        parsed.output_capacity as u64,
                        parsed.input_timeout_ms,
                        parsed.fps_window_ms,
                    ];
                    for ((name, least, most), value) in
                        EngineOptions::OPTION_RANGES.into_iter().zip(values)
                    {
                        if !(least..=most).contains(&value) {
                            mismatches += 1;
                            eprintln!("options {i}: {name} = {value} accepted: {text}");
                        }
                    }
                    // Accepted options reach the params, whose width 1 is refused.
                    (
                        SdsStatus::SDS_ERR_INVALID_PARAMS,
                        Some("`width`".to_string()),
                    )
                }
                Err(e) => {
                    refused += 1;
                    let status = match e {
                        sdstream_core::Error::Json(_) => SdsStatus::SDS_ERR_INVALID_JSON,
                        _ => SdsStatus::SDS_ERR_INVALID_PARAMS,
                    };
                    (status, Some(format!("sds_engine_create_async: {e}")))
                }
            },
        };
        panics += u64::from(status == SdsStatus::SDS_ERR_PANIC);
        let message_ok = message.starts_with("sds_engine_create_async: ")
            && expected
                .1
                .as_ref()
                .is_none_or(|m| message.contains(m.as_str()));
        if status != expected.0 || !message_ok || !engine.is_null() {
            mismatches += 1;
            eprintln!(
                "options {i}: {:?}: {status:?} (expected {:?}) {message:?}, engine {engine:?}",
                String::from_utf8_lossy(&bytes),
                expected.0
            );
            if !engine.is_null() && engine != unset {
                // SAFETY: a handle the call made.
                unsafe { sds_engine_destroy(engine) };
            }
        }
    }
    println!(
        "options: texts tried {iterations}, accepted {accepted}, refused with core's status and \
         message {refused}, not UTF-8 {not_utf8}, panics {panics}, mismatches {mismatches}"
    );
    assert_eq!((panics, mismatches), (0, 0));
    assert!(accepted > iterations / 20 && refused > iterations / 20);
}

/// One frame description through one of the frame-taking entry points.
fn fuzz_one_frame(rng: &mut Rng, engine: *mut SdsEngine, counts: &mut FrameCounts, i: u64) {
    let format = random_format(rng);
    let (width, height) = (random_side(rng), random_side(rng));
    let stride = random_stride(rng, width, format);
    let contract = frame_contract(width, height, stride, format);
    let null_data = rng.below(30) == 0;
    let tiny = [0u8; 16];
    let backing: Vec<u8>;
    let data = match contract {
        _ if null_data => std::ptr::null(),
        Ok(spans) if spans <= MAX_BACKED => {
            backing = vec![0x5A; spans as usize];
            backing.as_ptr()
        }
        Ok(_) => {
            counts.not_backed += 1;
            return;
        }
        Err(_) => tiny.as_ptr(),
    };
    counts.tried += 1;
    let frame = SdsFrame {
        data,
        width,
        height,
        stride,
        format,
    };
    let good_pixels = [0x33u8; 3];
    let good = SdsFrame {
        data: good_pixels.as_ptr(),
        width: 1,
        height: 1,
        stride: 0,
        format: 0,
    };
    let net = c("net");
    let mut out_buffer = vec![0u8; (SIDE * SIDE * 12) as usize];
    let mut out = SdsOutput {
        data: out_buffer.as_mut_ptr(),
        capacity: out_buffer.len(),
        stride: 0,
        width: 0,
        height: 0,
        format: 0,
        size: 0,
        frame_id: 0,
        timestamp: 0,
        params_version: 0,
    };
    let mut id = u64::MAX;
    let timestamp = i as i64;
    let entry = rng.below(6);
    // The frame is the call's frame, or (entry 5) the control image beside a valid frame.
    let control = SdsControlImage {
        controlnet_id: net.as_ptr(),
        frame,
    };
    // SAFETY: every pointer is valid for what the header asks: `data` backs the bytes the
    // description spans when the contract accepts it (and is never read otherwise), `out` has
    // `capacity` writable bytes, `control` is one readable element.
    let (function, status) = unsafe {
        match entry {
            0 => (
                "sds_engine_submit",
                sds_engine_submit(engine, &frame, &mut id),
            ),
            1 => (
                "sds_engine_submit_with_timestamp",
                sds_engine_submit_with_timestamp(engine, &frame, timestamp, &mut id),
            ),
            2 => (
                "sds_engine_submit_with_controls",
                sds_engine_submit_with_controls(
                    engine,
                    &frame,
                    std::ptr::null(),
                    0,
                    &timestamp,
                    &mut id,
                ),
            ),
            3 => (
                "sds_engine_process",
                sds_engine_process(engine, &frame, &mut out),
            ),
            4 => (
                "sds_engine_process_with_controls",
                sds_engine_process_with_controls(engine, &frame, std::ptr::null(), 0, &mut out),
            ),
            _ => (
                "sds_engine_submit_with_controls",
                sds_engine_submit_with_controls(
                    engine,
                    &good,
                    &control,
                    1,
                    std::ptr::null(),
                    &mut id,
                ),
            ),
        }
    };
    let message = last_error();
    let expected = match contract {
        _ if null_data => SdsStatus::SDS_ERR_NULL,
        Ok(_) => SdsStatus::SDS_ERR_CLOSED,
        Err(status) => status,
    };
    match status {
        SdsStatus::SDS_ERR_CLOSED => counts.copied += 1,
        SdsStatus::SDS_ERR_INVALID_FRAME => counts.invalid_frame += 1,
        SdsStatus::SDS_ERR_INVALID_ARGUMENT => counts.invalid_argument += 1,
        SdsStatus::SDS_ERR_NULL => counts.null += 1,
        SdsStatus::SDS_ERR_PANIC => counts.panics += 1,
        _ => {}
    }
    let named =
        entry != 5 || status == SdsStatus::SDS_ERR_CLOSED || message.contains("controls[0]");
    if status != expected
        || !message.starts_with(&format!("{function}: "))
        || !named
        || id != u64::MAX
    {
        counts.mismatches += 1;
        eprintln!(
            "frame {i}: {function} {width}x{height} stride {stride} format {format} \
             (entry {entry}): {status:?}, expected {expected:?}: {message}"
        );
    }
}

/// Output buffers: random stride and capacity through `sds_engine_process`.
fn fuzz_outputs(rng: &mut Rng, engine: *mut SdsEngine, iterations: u64) {
    let (mut too_small, mut fit, mut panics, mut mismatches) = (0, 0, 0, 0);
    let pixels = vec![0x77u8; (SIDE * SIDE * 12) as usize];
    for i in 0..iterations {
        let format = rng.below(4) as u32;
        let bpp = bytes_per_pixel(format).expect("valid format");
        let frame = SdsFrame {
            data: pixels.as_ptr(),
            width: SIDE as u32,
            height: SIDE as u32,
            stride: 0,
            format,
        };
        let row = SIDE * bpp;
        let stride = match rng.below(6) {
            0 | 1 => 0,
            2 => row as u32,
            3 => (row + rng.below(64)) as u32,
            4 => (row - 1 - rng.below(row)) as u32,
            _ => {
                let any = rng.next() as u32;
                rng.pick(&[1 << 20, 1 << 26, u32::MAX, any])
            }
        };
        let stride_used = if stride == 0 { row } else { u64::from(stride) };
        let needed = stride_used * (SIDE - 1) + row;
        let capacity = match rng.below(4) {
            0 => needed.min(1 << 20).saturating_sub(rng.below(3)),
            1 => rng.below(row * SIDE * 2),
            2 => rng
                .pick(&[0, 1, row, needed.saturating_sub(1)])
                .min(1 << 20),
            _ => needed.min(1 << 20),
        };
        let mut buffer = vec![0u8; capacity as usize];
        let mut out = SdsOutput {
            data: if buffer.is_empty() {
                // A valid pointer for a zero-capacity buffer.
                std::ptr::NonNull::<u8>::dangling().as_ptr()
            } else {
                buffer.as_mut_ptr()
            },
            capacity: capacity as usize,
            stride,
            width: 0,
            height: 0,
            format: 99,
            size: 0,
            frame_id: 0,
            timestamp: 0,
            params_version: 0,
        };
        // SAFETY: `pixels` backs the 64x64 frame in every format; `out` has `capacity` bytes.
        let status = unsafe { sds_engine_process(engine, &frame, &mut out) };
        let message = last_error();
        panics += u64::from(status == SdsStatus::SDS_ERR_PANIC);
        let refused = stride_used < row || needed > 4 << 30 || capacity < needed;
        let (expected, size) = if refused {
            // A stride the rule refuses reports what packed rows would need.
            let size = if stride_used < row || needed > 4 << 30 {
                row * SIDE
            } else {
                needed
            };
            (SdsStatus::SDS_ERR_BUFFER_TOO_SMALL, size)
        } else {
            (SdsStatus::SDS_ERR_CLOSED, out.size as u64)
        };
        too_small += u64::from(status == SdsStatus::SDS_ERR_BUFFER_TOO_SMALL);
        fit += u64::from(status == SdsStatus::SDS_ERR_CLOSED);
        let described =
            out.width == SIDE as u32 && out.height == SIDE as u32 && out.format == format;
        if status != expected
            || !message.starts_with("sds_engine_process: ")
            || (refused && (out.size as u64 != size || !described))
        {
            mismatches += 1;
            eprintln!(
                "output {i}: format {format} stride {stride} capacity {capacity}: {status:?} \
                 (expected {expected:?}), size {} (expected {size}), {}x{} format {}: {message}",
                out.size, out.width, out.height, out.format
            );
        }
    }
    println!(
        "outputs: buffers tried {iterations}, too small (status and size as the header says) \
         {too_small}, fitting {fit}, panics {panics}, mismatches {mismatches}"
    );
    assert_eq!((panics, mismatches), (0, 0));
    assert!(too_small > iterations / 10 && fit > iterations / 10);
}

#[test]
fn c_entry_points_answer_random_options_frames_and_buffers_as_the_header_says() {
    let iterations = env_number("SDS_FUZZ_ITERATIONS", 20_000);
    let mut rng = Rng(env_number("SDS_FUZZ_SEED", 0xC0FF_EE15_600D_F00D) | 1);
    let model = fixture("tiny-sd-turbo");
    let settings = c(&format!(
        "{{\"vae\": \"{}\", \"allow_any_resolution\": true}}",
        fixture("tiny-taesd").display()
    ));
    let params = c(&format!(
        "{{\"model_id\": \"{}\", \"width\": {SIDE}, \"height\": {SIDE}}}",
        model.display()
    ));
    let params_bad_width = c(&format!(
        "{{\"model_id\": \"{}\", \"width\": 1, \"height\": {SIDE}}}",
        model.display()
    ));

    fuzz_options(&mut rng, iterations / 4, &params_bad_width, &settings);

    let mut engine: *mut SdsEngine = std::ptr::null_mut();
    let options = c("{\"warmup\": false}");
    // SAFETY: valid C strings and a writable out-pointer.
    let status = unsafe {
        sds_engine_create_async(
            params.as_ptr(),
            settings.as_ptr(),
            options.as_ptr(),
            &mut engine,
        )
    };
    assert_eq!(status, SdsStatus::SDS_OK, "{}", last_error());
    // SAFETY: a live handle.
    assert_eq!(unsafe { sds_engine_close(engine) }, SdsStatus::SDS_OK);

    // output_size: every format value.
    for _ in 0..iterations / 20 {
        let format = random_format(&mut rng);
        let (mut w, mut h, mut size) = (0u32, 0u32, 0usize);
        // SAFETY: a live handle and writable out-pointers.
        let status = unsafe { sds_engine_output_size(engine, format, &mut w, &mut h, &mut size) };
        match bytes_per_pixel(format) {
            Some(bpp) => assert_eq!(
                (status, w, h, size as u64),
                (SdsStatus::SDS_OK, 64, 64, SIDE * SIDE * bpp)
            ),
            None => assert_eq!(status, SdsStatus::SDS_ERR_INVALID_ARGUMENT, "{format}"),
        }
    }

    let mut counts = FrameCounts::default();
    for i in 0..iterations {
        fuzz_one_frame(&mut rng, engine, &mut counts, i);
    }
    println!(
        "frames: descriptions tried {}, copied then refused as closed {}, refused \
         SDS_ERR_INVALID_FRAME {}, SDS_ERR_INVALID_ARGUMENT {}, SDS_ERR_NULL {}, valid but over \
         4 MiB (not tried) {}, panics {}, mismatches {}",
        counts.tried,
        counts.copied,
        counts.invalid_frame,
        counts.invalid_argument,
        counts.null,
        counts.not_backed,
        counts.panics,
        counts.mismatches
    );
    fuzz_outputs(&mut rng, engine, iterations / 4);
    // SAFETY: the handle, no longer used.
    assert_eq!(unsafe { sds_engine_destroy(engine) }, SdsStatus::SDS_OK);

    assert_eq!((counts.panics, counts.mismatches), (0, 0), "{counts:?}");
    // Every kind of answer came up.
    assert!(
        counts.copied > iterations / 10
            && counts.invalid_frame > iterations / 10
            && counts.invalid_argument > 0
            && counts.null > 0,
        "{counts:?}"
    );
}
