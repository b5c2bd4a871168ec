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
use video::{ffmpeg, fixtures, output_of, packet_field, probe, root, scratch, video};

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
    // An empty movie fragment after a plain file's media data adds nothing.
    let mut fragmented = clip.clone();
    fragmented.extend_from_slice(&[0, 0, 0, 8]);
    fragmented.extend_from_slice(b"moof");
    let input = Mp4Input::open(&write("fragmented.mp4", &fragmented)).expect("empty fragment");
    let plain = Mp4Input::open(&video("bframes.mp4")).expect("the clip");
    assert_eq!(input.fragments, 1);
    for (a, b) in input.tracks.iter().zip(&plain.tracks) {
        assert_eq!(a.samples, b.samples);
        assert_eq!(a.sample_tables, b.sample_tables);
    }
}

/// (track, kind) pairs: the video and the audio track of a file, in that order.
fn video_and_audio(input: &Mp4Input) -> [&sdstream_server::video_file::Track; 2] {
    let audio = input
        .tracks
        .iter()
        .find(|t| t.kind == TrackKind::Audio)
        .expect("an audio track");
    [video_track(input), audio]
}

/// Asserts that `fragmented` holds the plain file's samples: the same bytes, sync flags and
/// sample descriptions, the same durations and the same presentation times relative to the
/// first (in seconds: a packager may change the timescale), and that its durations describe
/// them. Returns the fragments read.
fn same_samples(fragmented: &Path, plain: &Path) -> usize {
    let mut ours = Mp4Input::open(fragmented).expect("the fragmented file");
    let mut theirs = Mp4Input::open(plain).expect("the plain file");
    assert!(ours.notes.is_empty(), "{:?}", ours.notes);
    let pairs: Vec<_> = video_and_audio(&ours)
        .into_iter()
        .cloned()
        .zip(video_and_audio(&theirs).into_iter().cloned())
        .collect();
    for (a, b) in &pairs {
        let what = format!("{} track {}", fragmented.display(), a.id);
        // ffmpeg's fragmenting turns the audio's edit list (AAC's 1,024 priming samples) into
        // a first packet of 4,000 units: the audio's times are checked against ffprobe's
        // reading of each file instead.
        let timed = a.kind == TrackKind::Video;
        assert_eq!(a.samples.len(), b.samples.len(), "{what}");
        let first = |t: &sdstream_server::video_file::Track| {
            t.samples.iter().map(|s| s.cts()).min().unwrap_or(0)
        };
        let (fa, fb) = (first(a), first(b));
        let tick = 1.0 / f64::from(a.timescale.min(b.timescale));
        let (mut x, mut y) = (Vec::new(), Vec::new());
        for (k, (sa, sb)) in a.samples.iter().zip(&b.samples).enumerate() {
            ours.read_sample(sa, &mut x).expect("sample");
            theirs.read_sample(sb, &mut y).expect("sample");
            assert_eq!(x, y, "{what}: sample {k}'s bytes");
            assert_eq!(
                (sa.sync, sa.entry),
                (sb.sync, sb.entry),
                "{what}: sample {k}"
            );
            let secs =
                |v: i64, t: &sdstream_server::video_file::Track| v as f64 / f64::from(t.timescale);
            if !timed {
                continue;
            }
            let (pa, pb) = (secs(sa.cts() - fa, a), secs(sb.cts() - fb, b));
            assert!(
                (pa - pb).abs() <= tick,
                "{what}: sample {k} at {pa} s, not {pb} s"
            );
            let (da, db) = (
                secs(i64::from(sa.duration), a),
                secs(i64::from(sb.duration), b),
            );
            assert!(
                (da - db).abs() <= tick,
                "{what}: sample {k} lasts {da} s, not {db} s"
            );
        }
        assert_eq!(a.media_duration, a.samples_duration(), "{what}");
        let seconds = a.header.duration as f64 / f64::from(ours.movie_timescale);
        let samples = a.samples_duration() as f64 / f64::from(a.timescale);
        assert!(
            (seconds - samples).abs() <= 1e-3,
            "{what}: {seconds} s, not {samples} s"
        );
    }
    ours.fragments
}

#[test]
fn fragmented_files_read_as_the_plain_file_they_were_made_from() {
    let plain = video("bframes.mp4");
    // ffmpeg fragmenting the clip CMAF-style (no samples in the index) and its own way (the
    // first fragment's samples in the index): 2 fragments and 1.
    assert_eq!(same_samples(&video("frag-cmaf.mp4"), &plain), 2);
    assert_eq!(same_samples(&video("frag-moov.mp4"), &plain), 1);
    let Some((ffmpeg, ffprobe)) = ffmpeg() else {
        return;
    };
    // More of ffmpeg's ways, made here: a fragment a frame, one track a fragment, Smooth
    // Streaming's (10 MHz timescale, signed composition offsets, no tfdt, all-ones durations).
    let dir = scratch("fragmented");
    for (name, flags) in [
        (
            "every.mp4",
            vec!["-movflags", "frag_every_frame+empty_moov"],
        ),
        (
            "separate.mp4",
            vec!["-movflags", "frag_keyframe+empty_moov+separate_moof"],
        ),
        ("smooth.ismv", vec!["-f", "ismv"]),
    ] {
        let out = dir.join(name);
        let mut args = vec![
            "-v",
            "error",
            "-y",
            "-i",
            plain.to_str().expect("utf-8"),
            "-c",
            "copy",
        ];
        args.extend(flags);
        args.push(out.to_str().expect("utf-8"));
        output_of(&ffmpeg, &args);
        let fragments = same_samples(&out, &plain);
        eprintln!("{name}: {fragments} fragments");
        assert!(fragments >= 2, "{name}: {fragments} fragments");
    }
    // FFmpeg's own reading of the fragmented files: every picture and audio packet at the time
    // ours gives it. (Not the Smooth Streaming file: where composition offsets are negative,
    // FFmpeg shifts its presentation times by the most negative one, 833,333 units there.)
    for file in [
        video("frag-cmaf.mp4"),
        video("frag-moov.mp4"),
        dir.join("every.mp4"),
        dir.join("separate.mp4"),
    ] {
        let input = Mp4Input::open(&file).expect("open");
        let [v, a] = video_and_audio(&input);
        let (frames, _, _, pts) = probe(&ffprobe, &file, "v");
        assert_eq!(frames, 16, "{}", file.display());
        assert_eq!(pts, presentation_times(v), "{}", file.display());
        // The audio by packet (the decoder drops packets of no duration from its frames).
        let mut pts: Vec<i64> = packet_field(&ffprobe, &file, "a", "pts")
            .iter()
            .filter_map(|v| v.parse().ok())
            .collect();
        pts.sort_unstable();
        assert_eq!(pts.len(), 33, "{}", file.display());
        assert_eq!(pts, presentation_times(a), "{}", file.display());
    }
}

#[test]
fn a_fragmented_file_runs_as_the_plain_file() {
    // The same pictures in, so the same pictures out: the output's video samples are the plain
    // clip's run's, byte for byte, at the fragmented file's times, with its audio packets.
    let dir = scratch("run-fragmented");
    let fragmented = video("frag-cmaf.mp4");
    let (from_plain, from_fragments) = (dir.join("plain.mp4"), dir.join("fragmented.mp4"));
    for (input, output) in [
        (video("bframes.mp4"), &from_plain),
        (fragmented.clone(), &from_fragments),
    ] {
        let (ok, code, stderr) = run(&input, output, &[]);
        assert!(ok, "exit {code}:\n{stderr}");
    }
    let mut a = Mp4Input::open(&from_fragments).expect("output");
    let mut b = Mp4Input::open(&from_plain).expect("output");
    assert_eq!(a.fragments, 0, "the output is a plain MP4");
    let (va, vb) = (video_track(&a).clone(), video_track(&b).clone());
    assert_eq!(va.samples.len(), 16);
    let (mut x, mut y) = (Vec::new(), Vec::new());
    for (sa, sb) in va.samples.iter().zip(&vb.samples) {
        a.read_sample(sa, &mut x).expect("sample");
        b.read_sample(sb, &mut y).expect("sample");
        assert_eq!(x, y);
    }
    let input = Mp4Input::open(&fragmented).expect("input");
    assert_eq!(
        presentation_times(&va),
        presentation_times(video_track(&input))
    );
    let (packets_in, _) = audio_packets(&fragmented);
    let (packets_out, track_out) = audio_packets(&from_fragments);
    assert_eq!(packets_in.len(), 33);
    assert_eq!(packets_out, packets_in);
    let audio_in = video_and_audio(&input)[1];
    let times = |t: &sdstream_server::video_file::Track| -> Vec<(i64, u32)> {
        t.samples.iter().map(|s| (s.cts(), s.duration)).collect()
    };
    assert_eq!(times(&track_out), times(audio_in));
    if let Some((_, ffprobe)) = ffmpeg() {
        let (frames, _, _, pts_out) = probe(&ffprobe, &from_fragments, "v");
        let (_, _, _, pts_in) = probe(&ffprobe, &fragmented, "v");
        assert_eq!(frames, 16);
        assert_eq!(pts_out, pts_in);
    }
}

#[test]
fn a_fragmented_recording_cut_off_keeps_its_whole_fragments() {
    let dir = scratch("cut-fragments");
    let clip = std::fs::read(video("frag-cmaf.mp4")).expect("clip");
    // Where each box of a type starts (its size field, 4 bytes before the type).
    let starts = |kind: &[u8; 4]| -> Vec<usize> {
        clip.windows(4)
            .enumerate()
            .filter(|(_, w)| w == kind)
            .map(|(i, _)| i - 4)
            .collect()
    };
    let (moofs, mdats) = (starts(b"moof"), starts(b"mdat"));
    assert_eq!((moofs.len(), mdats.len()), (2, 2));
    // Cut in the second fragment's media data, and in its header: the first fragment's 8
    // pictures and 13 audio packets are read, and a note says what was left out.
    for (name, at) in [
        ("in-media.mp4", mdats[1] + 600),
        ("in-header.mp4", moofs[1] + 100),
    ] {
        let path = dir.join(name);
        std::fs::write(&path, &clip[..at]).expect("write");
        let input = Mp4Input::open(&path).expect("the whole fragments");
        assert_eq!(input.fragments, 1, "{name}");
        let [v, a] = video_and_audio(&input);
        assert_eq!((v.samples.len(), a.samples.len()), (8, 13), "{name}");
        assert!(
            input
                .notes
                .iter()
                .any(|n| n.contains("ends inside a movie fragment")),
            "{name}: {:?}",
            input.notes
        );
        let output = dir.join(format!("out-{name}"));
        let (ok, code, stderr) = run(&path, &output, &[]);
        assert!(ok, "{name}: exit {code}:\n{stderr}");
        assert!(
            stderr.contains("note: the file ends inside a movie fragment"),
            "{stderr}"
        );
        assert_eq!(
            video_track(&Mp4Input::open(&output).expect("output"))
                .samples
                .len(),
            8
        );
    }
    // Cut before any fragment is whole: no pictures, refused by name.
    let path = dir.join("no-fragment.mp4");
    std::fs::write(&path, &clip[..mdats[0] + 100]).expect("write");
    refused(&path, &["the video track has no samples"]);
}

#[test]
fn hostile_fragments_are_refused_by_name() {
    let dir = scratch("hostile-fragments");
    let clip = std::fs::read(video("frag-cmaf.mp4")).expect("clip");
    let at = |kind: &[u8; 4], nth: usize| -> usize {
        clip.windows(4)
            .enumerate()
            .filter(|(_, w)| w == kind)
            .nth(nth)
            .map(|(i, _)| i)
            .expect("box")
    };
    let patched = |name: &str, offset: usize, bytes: &[u8]| -> String {
        let mut data = clip.clone();
        data[offset..offset + bytes.len()].copy_from_slice(bytes);
        let path = dir.join(name);
        std::fs::write(&path, &data).expect("write");
        Mp4Input::open(&path).expect_err(name).to_string()
    };
    // The first video traf's tfhd names track 9; its trun claims 2^31 - 1 samples; its data
    // offset reaches before the file, or past its end; the index's defaults name sample
    // description 5.
    let tfhd = at(b"tfhd", 0);
    let trun = at(b"trun", 0);
    let trex = at(b"trex", 0);
    let cases = [
        (
            "track.mp4",
            tfhd + 8,
            9u32.to_be_bytes(),
            "names track 9, which the index",
        ),
        (
            "count.mp4",
            trun + 8,
            0x7fff_ffffu32.to_be_bytes(),
            "trun claims 2147483647 samples",
        ),
        (
            "offset.mp4",
            trun + 12,
            0x8000_0000u32.to_be_bytes(),
            "before the file",
        ),
        // Past the end, in the first of two fragments: not a recording cut off.
        (
            "outside.mp4",
            trun + 12,
            0x7000_0000u32.to_be_bytes(),
            "lies past the end of the file",
        ),
        (
            "description.mp4",
            trex + 12,
            5u32.to_be_bytes(),
            "names sample description 5 of 1",
        ),
    ];
    for (name, offset, bytes, expect) in cases {
        let message = patched(name, offset, &bytes);
        assert!(message.contains(expect), "{name}: {message}");
    }
    // The second video fragment's decode time (tfdt, version 1) set back to 0.
    let tfdt = at(b"tfdt", 2);
    let message = patched("back.mp4", tfdt + 8, &0u64.to_be_bytes());
    assert!(
        message.contains("is before the previous sample's"),
        "{message}"
    );
    // ... and forward: a gap of one second lengthens the sample before it.
    let mut data = clip.clone();
    let time = u64::from_be_bytes(data[tfdt + 8..tfdt + 16].try_into().expect("8 bytes"));
    data[tfdt + 8..tfdt + 16].copy_from_slice(&(time + 12_288).to_be_bytes());
    let path = dir.join("gap.mp4");
    std::fs::write(&path, &data).expect("write");
    let gap = Mp4Input::open(&path).expect("a gap");
    let plain = Mp4Input::open(&video("frag-cmaf.mp4")).expect("clip");
    let (g, p) = (&video_track(&gap).samples, &video_track(&plain).samples);
    assert_eq!(g[7].duration, p[7].duration + 12_288);
    assert_eq!(g[8].dts, p[8].dts + 12_288);
    assert_eq!(
        video_track(&gap).samples_duration(),
        video_track(&plain).samples_duration() + 12_288
    );
}

/// Every packet's presentation time of a file's first stream of `kind`, by ffprobe, in seconds
/// (sorted).
fn packet_seconds(ffprobe: &str, file: &Path, kind: &str) -> Vec<f64> {
    let mut times: Vec<f64> = packet_field(ffprobe, file, kind, "pts_time")
        .iter()
        .filter_map(|v| v.parse().ok())
        .collect();
    times.sort_by(f64::total_cmp);
    times
}

/// A track's presentation times in seconds (sorted).
fn seconds(track: &sdstream_server::video_file::Track) -> Vec<f64> {
    presentation_times(track)
        .into_iter()
        .map(|t| t as f64 / f64::from(track.timescale))
        .collect()
}

fn close(a: &[f64], b: &[f64], tolerance: f64) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| (x - y).abs() <= tolerance)
}

#[test]
fn a_matroska_file_reads_as_the_plain_file_it_was_made_from() {
    // ffmpeg's copy of the clip into Matroska (H.264 and AAC, millisecond times): the same
    // frames and packets, byte for byte, the pictures at the same times (to the millisecond
    // Matroska keeps), the audio timed by its 1,024-sample frames.
    let mkv = video("bframes.mkv");
    let mut ours = Mp4Input::open(&mkv).expect("the Matroska file");
    let mut plain = Mp4Input::open(&video("bframes.mp4")).expect("the plain file");
    assert!(ours.notes.is_empty(), "{:?}", ours.notes);
    assert_eq!(ours.describe_tracks(), "video ('avc1'), audio ('mp4a')");
    let (a, b) = (
        video_and_audio(&ours).map(Clone::clone),
        video_and_audio(&plain).map(Clone::clone),
    );
    let (mut x, mut y) = (Vec::new(), Vec::new());
    for (ta, tb) in a.iter().zip(&b) {
        assert_eq!(ta.samples.len(), tb.samples.len(), "track {}", ta.id);
        for (k, (sa, sb)) in ta.samples.iter().zip(&tb.samples).enumerate() {
            ours.read_sample(sa, &mut x).expect("sample");
            plain.read_sample(sb, &mut y).expect("sample");
            assert_eq!(x, y, "track {}: sample {k}'s bytes", ta.id);
            assert_eq!(sa.sync, sb.sync, "track {}: sample {k}", ta.id);
        }
    }
    let relative = |t: &sdstream_server::video_file::Track| {
        let s = seconds(t);
        let first = s[0];
        s.into_iter().map(|v| v - first).collect::<Vec<_>>()
    };
    assert!(
        close(&relative(&a[0]), &relative(&b[0]), 0.001),
        "{:?}",
        relative(&a[0])
    );
    assert_eq!(a[1].timescale, 48_000);
    assert!(a[1].samples.iter().all(|s| s.duration == 1024));
    // Decoded, the pictures are the plain file's.
    let (pictures, reference) = (decode_all(&mkv), decode_all(&video("bframes.mp4")));
    assert_eq!(pictures.len(), 16);
    for (p, r) in pictures.iter().zip(&reference) {
        assert_eq!(p.to_i420(), r.to_i420());
    }
    // FFmpeg's reading of the same file: every picture and packet at the time ours gives it.
    if let Some((_, ffprobe)) = ffmpeg() {
        assert!(close(
            &packet_seconds(&ffprobe, &mkv, "v"),
            &seconds(&a[0]),
            1e-9
        ));
        assert!(close(
            &packet_seconds(&ffprobe, &mkv, "a"),
            &seconds(&a[1]),
            0.001
        ));
    }
}

#[test]
fn a_matroska_file_runs_with_its_times_and_audio() {
    let dir = scratch("run-matroska");
    let mkv = video("bframes.mkv");
    let output = dir.join("out.mp4");
    let (ok, code, stderr) = run(&mkv, &output, &[]);
    assert!(ok, "exit {code}:\n{stderr}");
    let input = Mp4Input::open(&mkv).expect("input");
    let out = Mp4Input::open(&output).expect("output");
    assert_eq!(video_track(&out).samples.len(), 16);
    assert_eq!(seconds(video_track(&out)), seconds(video_track(&input)));
    let (packets_in, _) = audio_packets(&mkv);
    let (packets_out, track_out) = audio_packets(&output);
    assert_eq!(packets_out, packets_in);
    assert_eq!(seconds(&track_out), seconds(video_and_audio(&input)[1]));
    if let Some((_, ffprobe)) = ffmpeg() {
        // The output as FFmpeg reads it: AAC it decodes, pictures at the input's times.
        let (frames, _, _, _) = probe(&ffprobe, &output, "v");
        assert_eq!(frames, 16);
        assert!(close(
            &packet_seconds(&ffprobe, &output, "v"),
            &packet_seconds(&ffprobe, &mkv, "v"),
            1e-6
        ));
        let (packets, _, _, _) = probe(&ffprobe, &output, "a");
        assert_eq!(packets, 33);
    }
}

#[test]
fn hostile_matroska_is_refused_by_name() {
    let dir = scratch("hostile-matroska");
    let clip = std::fs::read(video("bframes.mkv")).expect("clip");
    let open = |name: &str, data: &[u8]| {
        let path = dir.join(name);
        std::fs::write(&path, data).expect("write");
        Mp4Input::open(&path).and_then(|i| VideoTrackInfo::find(&i).map(|_| i))
    };
    let at = |id: &[u8]| {
        clip.windows(id.len())
            .position(|w| w == id)
            .expect("element")
    };
    // Another DocType.
    let mut other = clip.clone();
    let doc = at(b"matroska");
    other[doc..doc + 8].copy_from_slice(b"notmkv!!");
    let err = open("doctype.mkv", &other)
        .expect_err("doctype")
        .to_string();
    assert!(err.contains("not Matroska"), "{err}");
    // The video's codec changed to HEVC: named.
    let mut hevc = clip.clone();
    let codec = at(b"V_MPEG4/ISO/AVC");
    hevc[codec..codec + 15].copy_from_slice(b"V_MPEGH/ISO/HEV");
    let err = open("hevc.mkv", &hevc).expect_err("hevc").to_string();
    assert!(err.contains("not H.264"), "{err}");
    // The Tracks element claiming more than the file: cut off, no tracks.
    let mut tracks = clip.clone();
    // (The last occurrence of its ID: the first is the SeekHead's reference to it.)
    let t = clip
        .windows(4)
        .rposition(|w| w == [0x16, 0x54, 0xAE, 0x6B])
        .expect("Tracks");
    tracks[t + 4] = 0x01;
    tracks[t + 5..t + 12].copy_from_slice(&[0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xF0]);
    let err = open("tracks.mkv", &tracks).expect_err("tracks").to_string();
    assert!(err.contains("no Tracks element"), "{err}");
    // Cut in the middle: the blocks before the cut are read.
    let cut = &clip[..clip.len() * 2 / 3];
    match open("cut.mkv", cut) {
        Ok(input) => {
            let n = video_track(&input).samples.len();
            assert!(n > 0 && n < 16, "{n} pictures");
        }
        Err(e) => assert!(
            matches!(
                e,
                VideoFileError::Truncated(_) | VideoFileError::Malformed(_)
            ),
            "{e}"
        ),
    }
    // Every cut and byte flip: refused or read, never a panic.
    for len in (0..clip.len()).step_by(97) {
        let _ = open("cuts.mkv", &clip[..len]);
    }
    for i in (0..clip.len()).step_by(13) {
        let mut flipped = clip.clone();
        flipped[i] ^= 0x55;
        let _ = open("flips.mkv", &flipped);
    }
}
