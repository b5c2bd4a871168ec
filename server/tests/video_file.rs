//! `sdstream run` on video files, end to end: the binary runs the fixture clip (libx264 High
//! profile with B-frames, two GOPs, AAC; tests/fixtures/video/, made by
//! scripts/make-sample-clip.sh) through the tiny checkpoint, and the output is read back with
//! our reader and with FFmpeg: the same frame count, presentation times, timescale and
//! duration as the input, the audio packets byte for byte, pictures of the stream's size. Our
//! decoding of libx264's B-frame streams equals FFmpeg's, picture for picture in presentation
//! order. Inputs it cannot take are refused with the named reason, exit code 1, no panic.

mod video;

use std::path::{Path, PathBuf};
use std::process::Command;

use sdstream_server::video_file::avc::Matrix;
use sdstream_server::video_file::decode::VideoTrackInfo;
use sdstream_server::video_file::yuv::to_rgb;
use sdstream_server::video_file::{Mp4Input, TrackKind, VideoDecoder, VideoFileError};
use video::{ffmpeg, fixtures, output_of, probe, root, scratch, video};

/// The engine settings of the tiny checkpoint (model paths: `run` is a local tool).
fn tiny_settings() -> serde_json::Value {
    serde_json::json!({
        "vae": fixtures().join("tiny-taesd"),
        "allow_any_resolution": true,
    })
}

/// The binary with the tiny checkpoint at 64×64.
fn run(input: &Path, output: &Path, extra: &[&str]) -> (bool, i32, String) {
    run_with(input, output, &tiny_settings(), extra)
}

fn run_with(
    input: &Path,
    output: &Path,
    settings: &serde_json::Value,
    extra: &[&str],
) -> (bool, i32, String) {
    let params = serde_json::json!({
        "model_id": fixtures().join("tiny-sd-turbo"),
        "width": 64,
        "height": 64,
    });
    let out = Command::new(env!("CARGO_BIN_EXE_sdstream"))
        .arg("run")
        .arg("--input")
        .arg(input)
        .arg("--output")
        .arg(output)
        .arg("--params")
        .arg(params.to_string())
        .arg("--settings")
        .arg(settings.to_string())
        .args(extra)
        .env("SDSTREAM_LOG", "warn")
        .output()
        .expect("run sdstream");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!stderr.contains("panicked"), "sdstream panicked:\n{stderr}");
    (
        out.status.success(),
        out.status.code().unwrap_or(-1),
        stderr,
    )
}

fn video_track(input: &Mp4Input) -> &sdstream_server::video_file::Track {
    input
        .tracks
        .iter()
        .find(|t| t.kind == TrackKind::Video)
        .expect("a video track")
}

fn presentation_times(track: &sdstream_server::video_file::Track) -> Vec<i64> {
    let mut pts: Vec<i64> = track.samples.iter().map(|s| s.cts()).collect();
    pts.sort_unstable();
    pts
}

/// Every sample's bytes of the first audio track.
fn audio_packets(path: &Path) -> (Vec<Vec<u8>>, sdstream_server::video_file::Track) {
    let mut input = Mp4Input::open(path).expect("open");
    let track = input
        .tracks
        .iter()
        .find(|t| t.kind == TrackKind::Audio)
        .expect("an audio track")
        .clone();
    let mut packets = Vec::new();
    for s in &track.samples {
        let mut buf = Vec::new();
        input.read_sample(s, &mut buf).expect("sample");
        packets.push(buf);
    }
    (packets, track)
}

/// All pictures of a file's video track in presentation order, decoded by us.
fn decode_all(path: &Path) -> Vec<sdstream_server::video_file::yuv::YuvPicture> {
    let mut input = Mp4Input::open(path).expect("open");
    let info = VideoTrackInfo::find(&input).expect("video");
    let mut decoder = VideoDecoder::new(info).expect("decoder");
    let mut pictures = Vec::new();
    while let Some((rank, picture)) = decoder.next(&mut input).expect("decode") {
        assert_eq!(rank, pictures.len(), "pictures come in presentation order");
        pictures.push(picture);
    }
    pictures
}

#[test]
fn run_keeps_frame_count_times_and_audio() {
    let input = video("bframes.mp4");
    let dir = scratch("run-mp4");
    let output = dir.join("out.mp4");
    let (ok, code, stderr) = run(&input, &output, &[]);
    assert!(ok, "exit {code}:\n{stderr}");
    assert!(stderr.contains("done: 16 frames"), "{stderr}");
    assert!(stderr.contains("33 audio packets copied"), "{stderr}");
    assert!(stderr.contains("frame 16/16 (100%)"), "{stderr}");
    assert!(
        !dir.join("out.mp4.partial").exists() && !dir.join("out.mp4.media.partial").exists(),
        "temporary files left behind"
    );

    // Our reader: the video track's samples, times, timescale, durations and edit list.
    let src = Mp4Input::open(&input).expect("input");
    let out = Mp4Input::open(&output).expect("output");
    let (sv, ov) = (video_track(&src), video_track(&out));
    assert_eq!(ov.samples.len(), sv.samples.len());
    assert_eq!(ov.samples.len(), 16);
    assert_eq!(ov.timescale, sv.timescale);
    assert_eq!(presentation_times(ov), presentation_times(sv));
    assert_eq!(ov.samples_duration(), sv.samples_duration());
    assert_eq!(ov.header.duration, sv.header.duration);
    assert_eq!(ov.edit_list, sv.edit_list);
    assert_eq!(out.movie_timescale, src.movie_timescale);
    assert_eq!(ov.codec(), *b"avc1");
    // Keyframes where the encoder put them: the first, then every 48 (2 s at 24 fps).
    assert!(ov.samples[0].sync);
    // The index comes first (fast start).
    let head = std::fs::read(&output).expect("read");
    assert_eq!(&head[4..8], b"ftyp");
    assert_eq!(&head[32 + 4..32 + 8], b"moov");

    // Audio: the same packets byte for byte, the same sample description and timing tables.
    let (src_packets, src_audio) = audio_packets(&input);
    let (out_packets, out_audio) = audio_packets(&output);
    assert_eq!(src_packets.len(), 33);
    assert_eq!(out_packets, src_packets);
    assert_eq!(out_audio.entries, src_audio.entries);
    assert_eq!(out_audio.sample_tables, src_audio.sample_tables);
    assert_eq!(out_audio.edit_list, src_audio.edit_list);
    assert_eq!(out_audio.timescale, src_audio.timescale);
    let times = |t: &sdstream_server::video_file::Track| {
        t.samples
            .iter()
            .map(|s| (s.dts, s.duration, s.cts_offset))
            .collect::<Vec<_>>()
    };
    assert_eq!(times(&out_audio), times(&src_audio));

    // Every output picture decodes, at the stream's size.
    let pictures = decode_all(&output);
    assert_eq!(pictures.len(), 16);
    assert!(pictures.iter().all(|p| (p.width, p.height) == (64, 64)));

    // FFmpeg, independently: frames decoded, duration, time base, every frame's presentation
    // time; the audio stream's packets, byte for byte.
    let Some((ffmpeg, ffprobe)) = ffmpeg() else {
        return;
    };
    let src_probe = probe(&ffprobe, &input, "v");
    let out_probe = probe(&ffprobe, &output, "v");
    assert_eq!(src_probe.0, 16);
    assert_eq!(
        out_probe, src_probe,
        "ffprobe: (frames, duration, time base, pts)"
    );
    assert_eq!(probe(&ffprobe, &output, "a"), probe(&ffprobe, &input, "a"));
    let audio = |file: &Path| {
        output_of(
            &ffmpeg,
            &[
                "-v",
                "error",
                "-i",
                file.to_str().expect("utf-8"),
                "-map",
                "0:a",
                "-c",
                "copy",
                "-f",
                "data",
                "-",
            ],
        )
    };
    let (a, b) = (audio(&input), audio(&output));
    assert!(!a.is_empty());
    assert_eq!(a, b, "the audio FFmpeg reads from both files");
    // FFmpeg decodes every output picture without complaint.
    let decoded = output_of(
        &ffmpeg,
        &[
            "-v",
            "error",
            "-xerror",
            "-i",
            output.to_str().expect("utf-8"),
            "-f",
            "rawvideo",
            "-pix_fmt",
            "rgb24",
            "-",
        ],
    );
    assert_eq!(decoded.len(), 16 * 64 * 64 * 3);
}

#[test]
fn run_writes_png_frames_and_reads_picture_folders() {
    let input = video("bframes.mp4");
    let dir = scratch("run-folders");
    let frames = dir.join("frames");
    let (ok, code, stderr) = run(&input, &frames, &[]);
    assert!(ok, "exit {code}:\n{stderr}");
    assert!(
        stderr.contains("audio is not written to a folder of frames"),
        "{stderr}"
    );
    let mut names: Vec<String> = std::fs::read_dir(&frames)
        .expect("frames")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names.len(), 16);
    assert_eq!(names[0], "000000.png");
    let first = image::open(frames.join(&names[0])).expect("png").to_rgb8();
    assert_eq!(first.dimensions(), (64, 64));

    // The same run into an MP4: its pictures are the PNG frames but for H.264's loss, in the
    // same order.
    let same = dir.join("same.mp4");
    let (ok, code, stderr) = run(&input, &same, &[]);
    assert!(ok, "exit {code}:\n{stderr}");
    let pngs: Vec<Vec<u8>> = names
        .iter()
        .map(|n| {
            image::open(frames.join(n))
                .expect("png")
                .to_rgb8()
                .into_raw()
        })
        .collect();
    let mean_diff = |a: &[u8], b: &[u8]| {
        a.iter()
            .zip(b)
            .map(|(x, y)| f64::from(x.abs_diff(*y)))
            .sum::<f64>()
            / a.len() as f64
    };
    let decoded: Vec<Vec<u8>> = decode_all(&same)
        .iter()
        .map(|p| to_rgb(p, Matrix::Bt601, false))
        .collect();
    assert_eq!(decoded.len(), 16);
    let mut worst = 0f64;
    for i in 0..16 {
        let own = mean_diff(&decoded[i], &pngs[i]);
        worst = worst.max(own);
        // (The tiny checkpoint's first frames differ by about 18 levels, later ones by less
        // than H.264's loss; the order shows where they differ.)
        let neighbours = [i.wrapping_sub(1), i + 1].into_iter().filter(|&j| j < 16);
        for j in neighbours.filter(|&j| mean_diff(&pngs[i], &pngs[j]) > 10.0) {
            let other = mean_diff(&decoded[i], &pngs[j]);
            assert!(
                own < other,
                "picture {i}: {own:.2} levels from its frame, {other:.2} from frame {j}"
            );
        }
    }
    eprintln!("the MP4's pictures are at most {worst:.2} levels (mean) from the PNG frames");
    assert!(worst < 8.0, "{worst}");

    // The folder back in, at 24 fps: 16 frames lasting 16/24 s, like the clip.
    let again = dir.join("again.mp4");
    let (ok, code, stderr) = run(&frames, &again, &["--fps", "24"]);
    assert!(ok, "exit {code}:\n{stderr}");
    let out = Mp4Input::open(&again).expect("output");
    let track = video_track(&out);
    assert_eq!(track.samples.len(), 16);
    let seconds = track.samples_duration() as f64 / f64::from(track.timescale);
    assert!((seconds - 16.0 / 24.0).abs() < 1e-9, "{seconds}");
    assert!(out.tracks.iter().all(|t| t.kind != TrackKind::Audio));
    if let Some((_, ffprobe)) = ffmpeg() {
        let (frames, duration, _, pts) = probe(&ffprobe, &again, "v");
        assert_eq!(frames, 16);
        assert_eq!(duration, "0.666667");
        assert_eq!(pts.len(), 16);
    }
}

#[test]
fn an_upscaling_postprocessor_sizes_the_output_video() {
    // Real-ESRGAN (the tiny stand-in under model-root) doubles the stream's 64×64: the video
    // track is 128×128, and so are its pictures.
    let dir = scratch("run-upscale");
    let output = dir.join("out.mp4");
    let mut settings = tiny_settings();
    settings["model_root"] = serde_json::json!(fixtures().join("model-root"));
    let chain = r#"{"image_postprocessing": {"enabled": true, "processors": [{"type": "realesrgan_trt"}]}}"#;
    let (ok, code, stderr) = run_with(
        &video("bframes.mp4"),
        &output,
        &settings,
        &["--params", chain],
    );
    assert!(ok, "exit {code}:\n{stderr}");
    let out = Mp4Input::open(&output).expect("output");
    let track = video_track(&out);
    assert_eq!(
        (track.header.width >> 16, track.header.height >> 16),
        (128, 128)
    );
    let pictures = decode_all(&output);
    assert_eq!(pictures.len(), 16);
    assert!(pictures.iter().all(|p| (p.width, p.height) == (128, 128)));
}

#[test]
fn decoding_libx264_b_frames_equals_ffmpeg() {
    let Some((ffmpeg, _)) = ffmpeg() else {
        return;
    };
    for clip in [video("bframes.mp4"), root().join("examples/clip.mp4")] {
        let ours = decode_all(&clip);
        let theirs = output_of(
            &ffmpeg,
            &[
                "-v",
                "error",
                "-i",
                clip.to_str().expect("utf-8"),
                "-map",
                "0:v",
                "-f",
                "rawvideo",
                "-pix_fmt",
                "yuv420p",
                "-",
            ],
        );
        let frame_len = ours[0].to_i420().len();
        assert_eq!(theirs.len(), ours.len() * frame_len, "{}", clip.display());
        let (mut worst, mut differing) = (0u8, 0usize);
        for (picture, reference) in ours.iter().zip(theirs.chunks(frame_len)) {
            for (a, b) in picture.to_i420().iter().zip(reference) {
                let d = a.abs_diff(*b);
                worst = worst.max(d);
                differing += usize::from(d > 0);
            }
        }
        eprintln!(
            "{}: {} pictures; {differing} of {} samples differ from FFmpeg's decoding, by at \
             most {worst} levels",
            clip.display(),
            ours.len(),
            theirs.len()
        );
        // OpenH264's B-frames are FFmpeg's but for a few rounding differences (the sample
        // clip: 11 samples in two B-frames, 2 levels at most).
        assert!(
            worst <= 2,
            "{}: {worst} levels from FFmpeg's",
            clip.display()
        );
        assert!(
            differing * 10_000 <= theirs.len(),
            "{}: {differing} samples differ",
            clip.display()
        );
    }
}

/// Runs the binary on an input it must refuse: exit code 1, the named reason, no panic, no
/// output.
fn refused(input: &Path, expect: &[&str]) {
    let dir = scratch("refused");
    let output = dir.join("out.mp4");
    let (ok, code, stderr) = run(input, &output, &[]);
    assert!(
        !ok && code == 1,
        "{}: exit {code}\n{stderr}",
        input.display()
    );
    for e in expect {
        assert!(
            stderr.contains(e),
            "{}: wanted {e:?} in\n{stderr}",
            input.display()
        );
    }
    assert!(!output.exists());
}

#[test]
fn inputs_it_cannot_take_are_refused_by_name() {
    let dir = scratch("inputs");
    let clip = std::fs::read(video("bframes.mp4")).expect("clip");
    refused(
        &dir.join("missing.mp4"),
        &["cannot read", "missing.mp4", "No such file"],
    );
    let garbage: Vec<u8> = (0..5000u32)
        .map(|i| (i.wrapping_mul(7919) % 251) as u8)
        .collect();
    let path = dir.join("garbage.mp4");
    std::fs::write(&path, &garbage).expect("write");
    refused(&path, &["not an MP4 file"]);
    let path = dir.join("picture.mp4");
    std::fs::copy(fixtures().join("../../examples/frames/000.png"), &path).expect("copy");
    refused(&path, &["not an MP4 file", "PNG picture"]);
    let path = dir.join("empty.mp4");
    std::fs::write(&path, b"").expect("write");
    refused(&path, &["not an MP4 file", "empty"]);
    // Cut inside the media data (libx264's files put the index last): no index.
    let path = dir.join("cut-media.mp4");
    std::fs::write(&path, &clip[..clip.len() / 3]).expect("write");
    refused(&path, &["truncated"]);
    // Cut inside the index.
    let path = dir.join("cut-index.mp4");
    std::fs::write(&path, &clip[..clip.len() - 100]).expect("write");
    refused(&path, &["truncated", "moov"]);
    refused(
        &video("audio-only.m4a"),
        &["no video track", "audio ('mp4a')"],
    );
    refused(
        &video("mpeg4.mp4"),
        &["MPEG-4 Part 2 ('mp4v')", "not H.264", "libx264"],
    );
    refused(
        &video("yuv444.mp4"),
        &["High 4:4:4 Predictive profile", "not supported"],
    );
    refused(&video("high10.mp4"), &["High 10 profile", "not supported"]);
    refused(Path::new("/dev/video0"), &["webcam is not supported"]);
    // Bad params, named by field, before any file is read.
    let out = Command::new(env!("CARGO_BIN_EXE_sdstream"))
        .args([
            "run",
            "--input",
            "x.mp4",
            "--output",
            "y.mp4",
            "--params",
            r#"{"width": 63}"#,
        ])
        .output()
        .expect("run");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("--params") && stderr.contains("width"),
        "{stderr}"
    );
    // A command line it cannot use: exit code 2 and the usage.
    let out = Command::new(env!("CARGO_BIN_EXE_sdstream"))
        .args(["run", "--input", "x.mp4"])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("run needs --output"));
    let out = Command::new(env!("CARGO_BIN_EXE_sdstream"))
        .args(["run", "--help"])
        .output()
        .expect("run");
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("Webcams are not read"));
}

#[test]
fn the_reader_names_what_is_wrong() {
    let clip = std::fs::read(video("bframes.mp4")).expect("clip");
    let dir = scratch("reader");
    let write = |name: &str, data: &[u8]| -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, data).expect("write");
        p
    };
    let open = |p: &Path| Mp4Input::open(p).and_then(|i| VideoTrackInfo::find(&i).map(|_| ()));
    // The video's sample count raised to two billion, with a constant size of one byte: refused
    // before the table is allocated.
    let mut many = clip.clone();
    let stsz = clip.windows(4).position(|w| w == b"stsz").expect("stsz");
    many[stsz + 8..stsz + 12].copy_from_slice(&1u32.to_be_bytes());
    many[stsz + 12..stsz + 16].copy_from_slice(&0x7fff_ffffu32.to_be_bytes());
    let err = open(&write("many.mp4", &many)).expect_err("too many samples");
    assert!(
        matches!(
            err,
            VideoFileError::TooLarge(_) | VideoFileError::Malformed(_)
        ),
        "{err}"
    );
    // A chunk offset past the end: the sample lies outside the file.
    let mut outside = clip.clone();
    let stco = clip.windows(4).position(|w| w == b"stco").expect("stco");
    outside[stco + 12..stco + 16].copy_from_slice(&0x7000_0000u32.to_be_bytes());
    let err = open(&write("outside.mp4", &outside)).expect_err("outside");
    assert!(matches!(err, VideoFileError::Truncated(_)), "{err}");
    assert!(
        err.to_string().contains("past the end of the file"),
        "{err}"
    );
    // A fragmented file (a moof box at the top level).
    let mut fragmented = clip.clone();
    fragmented.extend_from_slice(&[0, 0, 0, 8]);
    fragmented.extend_from_slice(b"moof");
    let err = open(&write("fragmented.mp4", &fragmented)).expect_err("fragmented");
    assert!(matches!(err, VideoFileError::Fragmented), "{err}");
}
