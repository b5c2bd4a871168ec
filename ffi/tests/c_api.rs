//! Compiles real C and C++ programs against `include/sdstream.h` and the static library cargo
//! built (`libsdstream.a`), with the system `cc`/`c++`, and runs them on the tiny fixture
//! (tests/fixtures/tiny-sd-turbo with TAESD tests/fixtures/tiny-taesd, 64×64):
//!
//! * `ffi/tests/c/processor_test.c`: the `sds_processor_*` functions (refusals, buffer sizes,
//!   HED and a 6-channel TemporalNet image), whose images must equal, byte for byte, what
//!   [`sdstream_core::ImageProcessor`] gives for the same frames;
//! * `ffi/tests/c/api_test.c`: every function, NULL and invalid arguments, wrong frame and
//!   buffer sizes, invalid JSON, unknown fields, use after a failed reload, control images for
//!   an `external` ControlNet (its outputs must equal, byte for byte, what
//!   [`StreamDiffusion::process_with_controls`] gives for the same calls);
//! * `examples/c/host.c`: its outputs must equal, byte for byte, what the Rust pipeline
//!   ([`StreamDiffusion::process`]) gives for the same frames with the same prompt change, and
//!   the PNGs the `img2img` example writes for the frames before the change;
//! * `examples/cpp/td_style_host.cpp`: a never-waiting execute() loop;
//! * `ffi/tests/c/last_error_race.c`: `sds_engine_last_error` read while another thread fails
//!   calls on the handle (issue #20 item 5);
//! * `ffi/tests/c/abuse.c`: a hostile host (issue #20: NULLs, bad strings, absurd options and
//!   frames, closed engines, threads); every failure must come with a status and a message.
//!
//! The programs are built with AddressSanitizer (leaks included) when the compiler supports it,
//! and the last two with UndefinedBehaviorSanitizer too, stopping at the first report, so they
//! fail on any invalid access, undefined behaviour or leak on either side of the boundary. Set
//! `SDS_C_TESTS_NO_ASAN=1` to build them without sanitizers (to run them under valgrind
//! instead).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

use sdstream_core::{
    EngineSettings, Frame, FrameInput, ImageProcessor, PixelFormat, StreamDiffusion,
    StreamDiffusionParams,
};

/// The libraries a Rust staticlib needs on Linux (`rustc --print native-static-libs`).
const NATIVE_LIBS: &[&str] = &[
    "-lgcc_s",
    "-lutil",
    "-lrt",
    "-lpthread",
    "-lm",
    "-ldl",
    "-lc",
];

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("ffi/ has a parent")
        .to_path_buf()
}

fn fixture(name: &str) -> PathBuf {
    workspace().join("tests/fixtures").join(name)
}

/// `target/<profile>`, where cargo put `libsdstream.a` (this test runs from `.../deps/`).
fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    exe.parent()
        .and_then(Path::parent)
        .expect("target/<profile>/deps/<test>")
        .to_path_buf()
}

/// A fresh scratch folder for one test.
fn scratch(name: &str) -> PathBuf {
    let dir = profile_dir().join("ffi-c-tests").join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    dir
}

fn show(output: &Output) -> String {
    format!(
        "status {}\n--- stdout\n{}\n--- stderr\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// The sanitizers a C program is built with: AddressSanitizer (with LeakSanitizer) for every
/// program; the hostile ones (abuse.c, last_error_race.c) add UndefinedBehaviorSanitizer, and
/// stop at the first report of either.
#[derive(Clone, Copy, PartialEq)]
enum Sanitizers {
    Address,
    AddressAndUndefined,
}

impl Sanitizers {
    fn flags(self) -> &'static [&'static str] {
        match self {
            Sanitizers::Address => &["-fsanitize=address", "-fno-omit-frame-pointer"],
            Sanitizers::AddressAndUndefined => &[
                "-fsanitize=address,undefined",
                "-fno-sanitize-recover=all",
                "-fno-omit-frame-pointer",
            ],
        }
    }

    /// Whether `cc` builds and runs a program with these sanitizers here.
    fn available(self) -> bool {
        static AVAILABLE: [OnceLock<bool>; 2] = [OnceLock::new(), OnceLock::new()];
        *AVAILABLE[self as usize].get_or_init(|| {
            if std::env::var_os("SDS_C_TESTS_NO_ASAN").is_some() {
                return false;
            }
            let dir = scratch(&format!("sanitizer-probe-{}", self as usize));
            let src = dir.join("probe.c");
            let exe = dir.join("probe");
            let ok = std::fs::write(&src, "int main(void) { return 0; }\n").is_ok()
                && Command::new("cc")
                    .args(self.flags())
                    .arg("-o")
                    .arg(&exe)
                    .arg(&src)
                    .status()
                    .is_ok_and(|s| s.success())
                && Command::new(&exe).status().is_ok_and(|s| s.success());
            if !ok {
                eprintln!(
                    "note: {:?} unavailable; C programs built without it",
                    self.flags()
                );
            }
            ok
        })
    }
}

/// Reports the sanitizers wrote into a program's output.
fn sanitizer_reports(text: &str) -> usize {
    [
        "ERROR: AddressSanitizer",
        "ERROR: LeakSanitizer",
        "runtime error:",
    ]
    .iter()
    .map(|marker| text.matches(marker).count())
    .sum()
}

/// Takes out of `cmd`'s environment what cargo sets for this test's crate (`CARGO_PKG_NAME`,
/// `CARGO_MANIFEST_DIR`, …), so that a cargo it runs sees the environment `cargo test` saw.
/// Build scripts may ask to run again when such a variable changes (ring's asks for
/// `CARGO_MANIFEST_DIR` and the `CARGO_PKG_*` ones): inherited, they made this test's cargo
/// rebuild ring and every crate above it, and the next cargo command of the tests (maturin's,
/// then the server's) rebuild them again.
fn without_this_crates_cargo_env(cmd: &mut Command) -> &mut Command {
    const SET_FOR_THE_CRATE: [&str; 7] = [
        "CARGO_MANIFEST_DIR",
        "CARGO_MANIFEST_PATH",
        "CARGO_MANIFEST_LINKS",
        "CARGO_CRATE_NAME",
        "CARGO_PRIMARY_PACKAGE",
        "CARGO_TARGET_TMPDIR",
        "CARGO_RUSTC_CURRENT_DIR",
    ];
    for (name, _) in std::env::vars_os() {
        let Some(name) = name.to_str() else { continue };
        if SET_FOR_THE_CRATE.contains(&name)
            || name.starts_with("CARGO_PKG_")
            || name.starts_with("CARGO_BIN_")
            || name == "OUT_DIR"
        {
            cmd.env_remove(name);
        }
    }
    cmd
}

/// `libsdstream.a`, built (or found fresh) by cargo in this test's target dir and profile:
/// `cargo test` itself builds only the rlib the Rust tests link.
fn staticlib() -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            let profile_dir = profile_dir();
            let profile = match profile_dir.file_name().and_then(|n| n.to_str()) {
                Some("debug") | None => "dev".to_string(),
                Some(other) => other.to_string(),
            };
            let target_dir = profile_dir.parent().expect("target dir").to_path_buf();
            let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
            let output = without_this_crates_cargo_env(&mut Command::new(cargo))
                .args([
                    "build",
                    "-p",
                    "sdstream-ffi",
                    "--lib",
                    "--profile",
                    &profile,
                ])
                .arg("--target-dir")
                .arg(&target_dir)
                .current_dir(workspace())
                .output()
                .expect("cannot run cargo");
            assert!(
                output.status.success(),
                "building libsdstream.a failed:\n{}",
                show(&output)
            );
            let lib = profile_dir.join("libsdstream.a");
            assert!(lib.exists(), "{} missing after cargo build", lib.display());
            lib
        })
        .clone()
}

/// Compiles `sources` (C with `cc`, C++ with `c++`) against the header and the staticlib, with
/// AddressSanitizer when available.
fn build(compiler: &str, std: &str, sources: &[PathBuf], exe: &Path) {
    build_with(compiler, std, sources, exe, Sanitizers::Address);
}

/// [`build`] with `sanitizers` (when available) and POSIX threads.
fn build_with(compiler: &str, std: &str, sources: &[PathBuf], exe: &Path, sanitizers: Sanitizers) {
    let lib = staticlib();
    let mut cmd = Command::new(compiler);
    cmd.arg(std)
        .args(["-Wall", "-Wextra", "-Werror", "-g", "-O1", "-pthread"])
        .arg("-I")
        .arg(workspace().join("include"));
    if sanitizers.available() {
        cmd.args(sanitizers.flags());
    }
    cmd.args(sources)
        .arg(&lib)
        .args(NATIVE_LIBS)
        .arg("-o")
        .arg(exe);
    let output = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {compiler}: {e}"));
    assert!(
        output.status.success(),
        "{compiler} failed on {sources:?}:\n{}",
        show(&output)
    );
}

/// Runs a built program with the sanitizers' leak checker on, stopping at the first report.
/// The library keeps no freed blocks there (`SDSTREAM_REUSE_MB=0`, sdstream::alloc): a kept
/// block is still allocated to AddressSanitizer, which would not see a use of it after a free.
fn run_program(exe: &Path, args: &[&Path]) -> Output {
    Command::new(exe)
        .args(args)
        .env("SDSTREAM_REUSE_MB", "0")
        .env(
            "ASAN_OPTIONS",
            "detect_leaks=1:halt_on_error=1:abort_on_error=0",
        )
        .env("UBSAN_OPTIONS", "print_stacktrace=1:halt_on_error=1")
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", exe.display()))
}

/// Runs a built program (see [`run_program`]); panics with its output on failure or on any
/// sanitizer report.
fn run(exe: &Path, args: &[&Path]) -> String {
    let output = run_program(exe, args);
    let text = show(&output);
    assert!(output.status.success(), "{} failed:\n{text}", exe.display());
    assert_eq!(
        sanitizer_reports(&text),
        0,
        "sanitizer report from {}:\n{text}",
        exe.display()
    );
    text
}

/// The fixture frames as RGB8 rows, in name order.
fn frames() -> Vec<(u32, u32, Vec<u8>)> {
    (0..8)
        .map(|i| {
            let path = fixture(&format!("frames/{i:03}.png"));
            let img = image::open(&path)
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
                .to_rgb8();
            let (w, h) = img.dimensions();
            (w, h, img.into_raw())
        })
        .collect()
}

fn ppm(width: u32, height: u32, rgb: &[u8]) -> Vec<u8> {
    let mut bytes = format!("P6\n{width} {height}\n255\n").into_bytes();
    bytes.extend_from_slice(rgb);
    bytes
}

/// Writes the fixture frames as `NNN.ppm` (what the C programs read) into `dir`.
fn write_ppm_frames(dir: &Path) {
    std::fs::create_dir_all(dir).expect("frames dir");
    for (i, (w, h, rgb)) in frames().iter().enumerate() {
        let path = dir.join(format!("{i:03}.ppm"));
        std::fs::write(&path, ppm(*w, *h, rgb)).unwrap_or_else(|e| panic!("{e}"));
    }
}

fn model_args() -> (PathBuf, PathBuf) {
    (fixture("tiny-sd-turbo"), fixture("tiny-taesd"))
}

#[test]
fn c_api_test_passes() {
    let dir = scratch("api_test");
    let exe = dir.join("api_test");
    build(
        "cc",
        "-std=c11",
        &[workspace().join("ffi/tests/c/api_test.c")],
        &exe,
    );
    write_ppm_frames(&dir.join("frames"));
    let (model, vae) = model_args();
    let net = fixture("tiny-controlnet-a");
    let out_dir = dir.join("out");
    std::fs::create_dir_all(&out_dir).expect("out dir");
    let out = run(
        &exe,
        &[
            &model,
            &vae,
            &dir.join("frames/000.ppm"),
            &net,
            &dir.join("frames/007.ppm"),
            &out_dir,
        ],
    );
    assert!(out.contains(", 0 failed"), "{out}");
    println!("{out}");
    c_control_outputs_equal_the_rust_pipeline(&model, &vae, &net, &out_dir);
}

#[test]
fn c_processors_equal_the_rust_processors() {
    let dir = scratch("processor_test");
    let exe = dir.join("processor_test");
    build(
        "cc",
        "-std=c11",
        &[workspace().join("ffi/tests/c/processor_test.c")],
        &exe,
    );
    write_ppm_frames(&dir.join("frames"));
    let root = fixture("model-root");
    let out_dir = dir.join("out");
    std::fs::create_dir_all(&out_dir).expect("out dir");
    let a = dir.join("frames/001.ppm");
    let b = dir.join("frames/002.ppm");
    let out = run(&exe, &[&root, &a, &b, &out_dir]);
    assert!(out.contains(", 0 failed"), "{out}");
    println!("{out}");

    let settings = EngineSettings {
        model_root: Some(root),
        ..EngineSettings::default()
    };
    let all = frames();
    let frame = |i: usize| {
        let (w, h, rgb) = &all[i];
        (*w as usize, *h as usize, rgb.clone())
    };
    let read = |name: &str| std::fs::read(out_dir.join(name)).expect(name);
    let (w, h, rgb_a) = frame(1);
    let (_, _, rgb_b) = frame(2);
    let frame_a = Frame::packed(&rgb_a, w, h, PixelFormat::Rgb8).unwrap();
    let frame_b = Frame::packed(&rgb_b, w, h, PixelFormat::Rgb8).unwrap();
    let params = |v: serde_json::Value| v.as_object().cloned().unwrap();
    let mut hed = ImageProcessor::new(
        "hed",
        &params(serde_json::json!({"safe": false})),
        &settings,
    )
    .unwrap();
    assert_eq!(hed.process(&frame_a).unwrap().data, read("hed.raw"));
    let mut temporal = ImageProcessor::new(
        "temporal_net_tensorrt",
        &params(serde_json::json!({"height": 256, "width": 256})),
        &settings,
    )
    .unwrap();
    assert_eq!(
        temporal.process(&frame_a).unwrap().data,
        read("temporal_0.raw")
    );
    let second = temporal.process(&frame_b).unwrap();
    assert_eq!(second.channels, 6);
    assert_eq!(second.data, read("temporal_1.raw"));
}

/// The outputs api_test.c's `test_controls` wrote (frame 000 three times: without a control
/// image, with the 48x40 top-left window of frame 007 as the `external` net's image, then with
/// none, the net keeping it) equal `StreamDiffusion::process_with_controls` on the same calls.
fn c_control_outputs_equal_the_rust_pipeline(model: &Path, vae: &Path, net: &Path, dir: &Path) {
    let settings = EngineSettings::from_json(&format!(
        "{{\"vae\": \"{}\", \"allow_any_resolution\": true}}",
        vae.display()
    ))
    .expect("settings");
    let id = net.display().to_string();
    let params = StreamDiffusionParams::from_json_with(
        &format!(
            "{{\"model_id\": \"{}\", \"prompt\": \"a watercolor of a lighthouse\", \"width\": 64, \
             \"height\": 64, \"controlnets\": [{{\"model_id\": \"{id}\", \"preprocessor\": \
             \"external\"}}]}}",
            model.display()
        ),
        &settings,
    )
    .expect("params");
    let mut stream = StreamDiffusion::new(params, settings).expect("load");
    let frames = frames();
    let (w, h, rgb) = &frames[0];
    let frame = Frame::packed(rgb, *w as usize, *h as usize, PixelFormat::Rgb8).expect("frame");
    let control_rgb = &frames[7].2;
    let control = Frame::new(
        &control_rgb[..64 * 3 * 39 + 48 * 3],
        48,
        40,
        64 * 3,
        PixelFormat::Rgb8,
    )
    .expect("control window");
    let calls: [&[(&str, &Frame)]; 3] = [&[], &[(id.as_str(), &control)], &[]];
    for (i, controls) in calls.iter().enumerate() {
        let expected = stream
            .process(FrameInput::new(&frame).controls(controls))
            .expect("process with controls");
        let path = dir.join(format!("control_{i}.ppm"));
        let written = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert_eq!(written.len(), ppm(64, 64, &expected.data).len(), "{path:?}");
        let c_pixels = &written[written.len() - expected.data.len()..];
        let differing = c_pixels
            .iter()
            .zip(&expected.data)
            .filter(|(a, b)| a != b)
            .count();
        println!("api_test control output {i} vs process_with_controls: {differing} bytes differ");
        assert_eq!(differing, 0, "{}", path.display());
    }
}

/// The settings host.c's engine gets.
fn host_settings(vae: &Path) -> EngineSettings {
    EngineSettings::from_json(&format!(
        "{{\"vae\": \"{}\", \"allow_any_resolution\": true}}",
        vae.display()
    ))
    .expect("settings")
}

/// host.c's outputs in `out_dir` are, byte for byte, what the synchronous Rust pipeline gives
/// for the same frames with the same prompt change half way.
fn assert_host_outputs_are_the_rust_pipelines(
    out_dir: &Path,
    model: &Path,
    settings: &EngineSettings,
    what: &str,
) {
    let parse = |prompt| {
        StreamDiffusionParams::from_json_with(&host_params(model, prompt), settings)
            .expect("params")
    };
    let mut stream = StreamDiffusion::new(parse("a watercolor of a lighthouse"), settings.clone())
        .expect("load");
    let frames = frames();
    let half = frames.len() / 2;
    let mut max_diff = 0u8;
    let mut differing = 0usize;
    for (i, (w, h, rgb)) in frames.iter().enumerate() {
        if i == half {
            stream
                .update(parse("an oil painting of a stormy sea"))
                .expect("hot update");
        }
        let frame = Frame::packed(rgb, *w as usize, *h as usize, PixelFormat::Rgb8).expect("frame");
        let expected = stream.process(&frame).expect("process");
        let written = std::fs::read(out_dir.join(format!("{i:03}.ppm"))).expect("host output");
        assert_eq!(
            written.len(),
            ppm(64, 64, &expected.data).len(),
            "{what}, frame {i}: size"
        );
        let c_pixels = &written[written.len() - expected.data.len()..];
        for (a, b) in c_pixels.iter().zip(&expected.data) {
            max_diff = max_diff.max(a.abs_diff(*b));
            differing += usize::from(a != b);
        }
    }
    println!(
        "{what} vs StreamDiffusion::process over {} frames: max abs diff {max_diff}, {differing} \
         bytes differ",
        frames.len()
    );
    assert_eq!(
        (max_diff, differing),
        (0, 0),
        "{what}: the C host's bytes differ from the Rust pipeline's"
    );
}

/// Runs `program` with `args` in `dir` and returns what it printed, panicking with its output
/// unless it succeeds.
fn succeed(program: &str, args: &[&std::ffi::OsStr], envs: &[(&str, &Path)], dir: &Path) -> String {
    let mut cmd = Command::new(program);
    // scripts/install-c.sh runs cargo.
    without_this_crates_cargo_env(&mut cmd);
    cmd.args(args).current_dir(dir);
    for (name, value) in envs {
        cmd.env(name, value);
    }
    let output = cmd.output().unwrap_or_else(|e| {
        panic!("cannot run {program} (CI installs cmake and pkg-config; so should you): {e}")
    });
    assert!(
        output.status.success(),
        "{program} {args:?} failed:\n{}",
        show(&output)
    );
    // What it printed, standard output first.
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// The library as scripts/install-c.sh installs it, used the ways C and C++ hosts find
/// libraries: host.c built through pkg-config against the shared library (which the program
/// then loads by its soname from the prefix), the TouchDesigner-style host through CMake's
/// find_package; host.c's bytes equal the Rust pipeline's, and the C++ host's outputs arrive
/// in order.
#[test]
fn the_installed_library_serves_pkg_config_and_cmake_hosts() {
    let dir = scratch("installed");
    let prefix = dir.join("prefix");
    let profile_dir = profile_dir();
    let target_dir = profile_dir.parent().expect("target dir");
    let script = workspace().join("scripts/install-c.sh");
    let mut install: Vec<&std::ffi::OsStr> = vec![script.as_os_str()];
    if profile_dir.file_name().is_some_and(|n| n == "debug") {
        install.push("--debug".as_ref());
    }
    install.push(prefix.as_os_str());
    let log = succeed(
        "bash",
        &install,
        &[("CARGO_TARGET_DIR", target_dir)],
        &workspace(),
    );
    assert!(log.contains("soname libsdstream.so.0."), "{log}");
    for file in [
        "include/sdstream.h",
        "lib/libsdstream.a",
        "lib/libsdstream.so",
        "lib/pkgconfig/sdstream.pc",
        "lib/cmake/sdstream/sdstreamConfig.cmake",
        "lib/cmake/sdstream/sdstreamConfigVersion.cmake",
    ] {
        assert!(prefix.join(file).exists(), "{file} installed");
    }
    let pkgconfig = prefix.join("lib/pkgconfig");
    let version = succeed(
        "pkg-config",
        &["--modversion".as_ref(), "sdstream".as_ref()],
        &[("PKG_CONFIG_PATH", &pkgconfig)],
        &dir,
    );
    assert_eq!(version.trim(), env!("CARGO_PKG_VERSION"));
    let flags = succeed(
        "pkg-config",
        &["--cflags".as_ref(), "--libs".as_ref(), "sdstream".as_ref()],
        &[("PKG_CONFIG_PATH", &pkgconfig)],
        &dir,
    );
    assert!(flags.contains("-lsdstream"), "{flags}");

    // host.c through pkg-config, against the shared library.
    let host = dir.join("host");
    let source = workspace().join("examples/c/host.c");
    let mut cc: Vec<&std::ffi::OsStr> = vec![
        "-std=c11".as_ref(),
        "-Wall".as_ref(),
        "-Wextra".as_ref(),
        "-Werror".as_ref(),
        source.as_os_str(),
    ];
    cc.extend(flags.split_whitespace().map(std::ffi::OsStr::new));
    cc.extend(["-o".as_ref(), host.as_os_str()]);
    succeed("cc", &cc, &[], &dir);
    let needed = succeed("readelf", &["-d".as_ref(), host.as_os_str()], &[], &dir);
    let soname = format!(
        "[libsdstream.so.{}.{}]",
        env!("CARGO_PKG_VERSION_MAJOR"),
        env!("CARGO_PKG_VERSION_MINOR")
    );
    assert!(
        needed.contains("(NEEDED)") && needed.contains(&soname),
        "host needs the library by its soname {soname}:\n{needed}"
    );
    let (frames_dir, out_dir) = (dir.join("frames"), dir.join("out"));
    write_ppm_frames(&frames_dir);
    std::fs::create_dir_all(&out_dir).expect("out dir");
    let (model, vae) = model_args();
    let lib_dir = prefix.join("lib");
    let log = succeed(
        host.to_str().expect("a UTF-8 path"),
        &[
            model.as_os_str(),
            vae.as_os_str(),
            frames_dir.as_os_str(),
            out_dir.as_os_str(),
        ],
        &[("LD_LIBRARY_PATH", &lib_dir)],
        &dir,
    );
    assert!(log.contains("\"frames_processed\":8"), "{log}");
    assert_host_outputs_are_the_rust_pipelines(
        &out_dir,
        &model,
        &host_settings(&vae),
        "host.c built through pkg-config",
    );

    // The C++ host through CMake's find_package (its build keeps the prefix in the RPATH).
    let build_dir = dir.join("cmake-build");
    let examples = workspace().join("examples/cpp");
    let prefix_path = format!("-DCMAKE_PREFIX_PATH={}", prefix.display());
    succeed(
        "cmake",
        &[
            "-S".as_ref(),
            examples.as_os_str(),
            "-B".as_ref(),
            build_dir.as_os_str(),
            prefix_path.as_ref(),
        ],
        &[],
        &dir,
    );
    succeed(
        "cmake",
        &["--build".as_ref(), build_dir.as_os_str()],
        &[],
        &dir,
    );
    let exe = build_dir.join("td_style_host");
    let log = succeed(
        exe.to_str().expect("a UTF-8 path"),
        &[model.as_os_str(), vae.as_os_str(), frames_dir.as_os_str()],
        &[],
        &dir,
    );
    assert!(log.contains("in order: yes"), "{log}");
}

/// The params JSON host.c sends (same text, so the same parameters).
fn host_params(model: &Path, prompt: &str) -> String {
    format!(
        "{{\"model_id\": \"{}\", \"prompt\": \"{prompt}\", \"width\": 64, \"height\": 64, \
         \"seed\": 42}}",
        model.display()
    )
}

#[test]
fn c_host_output_equals_the_rust_pipeline() {
    let dir = scratch("host");
    let exe = dir.join("host");
    build(
        "cc",
        "-std=c11",
        &[workspace().join("examples/c/host.c")],
        &exe,
    );
    let (frames_dir, out_dir) = (dir.join("frames"), dir.join("out"));
    write_ppm_frames(&frames_dir);
    std::fs::create_dir_all(&out_dir).expect("out dir");
    let (model, vae) = model_args();
    let log = run(&exe, &[&model, &vae, &frames_dir, &out_dir]);
    assert!(log.contains("update kind 1 (hot)"), "{log}");
    // The host's closing status report (its state depends on how long the machine took, so the
    // counts are what is checked).
    assert!(
        log.contains("\"frames_processed\":8") && log.contains("\"error_count\":0"),
        "{log}"
    );

    // The same frames through the synchronous Rust pipeline, prompt changed half way.
    let settings = host_settings(&vae);
    assert_host_outputs_are_the_rust_pipelines(&out_dir, &model, &settings, "host.c");
    let half = frames().len() / 2;

    // And the files the img2img example writes for the frames before the prompt change.
    let example_dir = dir.join("img2img");
    let (example_in, example_out) = (example_dir.join("in"), example_dir.join("out"));
    std::fs::create_dir_all(&example_in).expect("example input dir");
    for i in 0..half {
        let name = format!("{i:03}.png");
        std::fs::copy(fixture(&format!("frames/{name}")), example_in.join(&name))
            .expect("copy frame");
    }
    let params_path = example_dir.join("params.json");
    let settings_path = example_dir.join("settings.json");
    std::fs::write(
        &params_path,
        host_params(&model, "a watercolor of a lighthouse"),
    )
    .expect("params");
    std::fs::write(&settings_path, settings.to_json()).expect("settings");
    let example = img2img_example();
    let output = Command::new(&example)
        .arg("--params")
        .arg(&params_path)
        .arg("--settings")
        .arg(&settings_path)
        .arg("--input")
        .arg(&example_in)
        .arg("--output")
        .arg(&example_out)
        .output()
        .unwrap_or_else(|e| panic!("{}: {e}", example.display()));
    assert!(
        output.status.success(),
        "img2img failed:\n{}",
        show(&output)
    );
    for i in 0..half {
        let png = example_out.join(format!("{i:03}.png"));
        let rust = image::open(&png)
            .unwrap_or_else(|e| panic!("{}: {e}", png.display()))
            .to_rgb8()
            .into_raw();
        let written = std::fs::read(out_dir.join(format!("{i:03}.ppm"))).expect("host output");
        let c_pixels = &written[written.len() - rust.len()..];
        let differing = c_pixels.iter().zip(&rust).filter(|(a, b)| a != b).count();
        assert_eq!(
            differing,
            0,
            "frame {i}: {differing} bytes of host.c's output differ from {}",
            png.display()
        );
    }
    println!("host.c vs the img2img example's PNGs: {half} frames, 0 bytes differ");
}

/// The img2img example binary `cargo test --workspace` builds beside this test.
fn img2img_example() -> PathBuf {
    let exe = profile_dir()
        .join("examples")
        .join(format!("img2img{}", std::env::consts::EXE_SUFFIX));
    assert!(
        exe.is_file(),
        "{} is missing: build it first (`cargo test --workspace` or `cargo build -p sdstream \
         --example img2img`)",
        exe.display()
    );
    exe
}

#[test]
fn cpp_td_style_host_runs_without_waiting() {
    let dir = scratch("td_style_host");
    let exe = dir.join("td_style_host");
    build(
        "c++",
        "-std=c++17",
        &[workspace().join("examples/cpp/td_style_host.cpp")],
        &exe,
    );
    write_ppm_frames(&dir.join("frames"));
    let (model, vae) = model_args();
    let log = run(&exe, &[&model, &vae, &dir.join("frames")]);
    assert!(log.contains("in order: yes"), "{log}");
    println!("{log}");
}

/// Issue #20 item 5: one thread fails calls on a handle while two read its last error (the
/// pointer and the copy-out call). It was a use-after-free under AddressSanitizer within the
/// first thousand reads; now every read is of the reader's own copy.
#[test]
fn c_last_error_is_safe_while_another_thread_fails_calls() {
    let dir = scratch("last_error_race");
    let exe = dir.join("last_error_race");
    build_with(
        "cc",
        "-std=c11",
        &[workspace().join("ffi/tests/c/last_error_race.c")],
        &exe,
        Sanitizers::AddressAndUndefined,
    );
    let (model, vae) = model_args();
    let log = run(&exe, &[&model, &vae]);
    assert!(
        log.contains(
            "0 unexpected statuses, 0 implausible messages (pointer), 0 (copy), last message \
             right: yes"
        ),
        "{log}"
    );
    println!("{log}");
}

/// A hostile host (ffi/tests/c/abuse.c) under AddressSanitizer, LeakSanitizer and
/// UndefinedBehaviorSanitizer: NULLs, bad strings, absurd options and frames (issue #20 items 2
/// and 3), closed engines, several threads on one handle. Every failing call came back with a
/// status and a message naming its function; no crash, no sanitizer report.
#[test]
fn c_abuse_gets_a_status_and_a_message_for_every_failure() {
    let dir = scratch("abuse");
    let exe = dir.join("abuse");
    build_with(
        "cc",
        "-std=c11",
        &[workspace().join("ffi/tests/c/abuse.c")],
        &exe,
        Sanitizers::AddressAndUndefined,
    );
    let (model, vae) = model_args();
    let output = run_program(&exe, &[&model, &vae]);
    let text = show(&output);
    // Killed by a signal (a crash, or a sanitizer's abort) or exited with a failure.
    let crashes = usize::from(output.status.code().is_none());
    let reports = sanitizer_reports(&text);
    let summary = text
        .lines()
        .find(|line| line.starts_with("abuse: "))
        .unwrap_or("abuse: no summary (the program did not finish)");
    println!(
        "{summary}\nabuse: crashes {crashes}, sanitizer reports {reports} (sanitizers: {})",
        if Sanitizers::AddressAndUndefined.available() {
            "address, leak, undefined"
        } else {
            "none available"
        }
    );
    assert_eq!((crashes, reports), (0, 0), "{text}");
    assert!(output.status.success(), "{text}");
    let figure = |name: &str| -> u64 {
        let start = summary
            .find(&format!("{name} "))
            .unwrap_or_else(|| panic!("{name} missing: {summary}"));
        summary[start + name.len() + 1..]
            .split(|c: char| !c.is_ascii_digit())
            .next()
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("{name}: {summary}"))
    };
    let (failing, with_message, no_output) = (
        figure("failing calls"),
        figure("errors with messages"),
        figure("no-output answers"),
    );
    assert_eq!(figure("errors without messages"), 0, "{text}");
    assert_eq!(figure("panics"), 0, "{text}");
    assert_eq!(figure("unexpected outcomes"), 0, "{text}");
    assert_eq!(failing, with_message + no_output, "{summary}");
    assert!(figure("calls") > failing && with_message > 300, "{summary}");
    // The threads' phase ran against a live pipeline, not only against refusals, and the
    // random descriptions (a fixed sequence) were copied as well as refused.
    assert!(figure("frames accepted") > 0, "{summary}");
    assert!(
        figure("copied") > 500 && figure("refused") > 500,
        "{summary}"
    );
}
