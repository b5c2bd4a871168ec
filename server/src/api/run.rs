//! `sdstream run`: a video file (or a folder of pictures) through one StreamDiffusion stream
//! into a video file (or a folder of PNG frames), one output frame per input frame.
//!
//! An MP4 in gives an MP4 out with the same frames at the same presentation times in the same
//! timescale (so the same frame count and duration), H.264 from OpenH264's encoder, and the
//! input's audio tracks copied packet for packet (`crate::video_file::mux`). Frames are
//! centre-cropped to the stream's aspect ratio and resized to its size (the library's Lanczos
//! resize) before they go in. Progress goes to stderr.

use std::io::{IsTerminal as _, Write as _};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::args::{engine_settings, json_arg};
use crate::video_file::decode::VideoTrackInfo;
use crate::video_file::{Mp4Input, Mp4Output, TrackKind, VideoDecoder, VideoTrackSpec};
use crate::webrtc::EncoderSettings;
use crate::webrtc::h264::H264Encoder;
use sdstream::{Frame, PixelFormat, StreamDiffusion, StreamDiffusionParams};

pub(crate) const USAGE: &str = "\
usage: sdstream run --input PATH --output PATH [FLAGS]   (--flag value or --flag=value)

Runs every frame of a video through one StreamDiffusion stream and writes one output frame per
input frame. Frames are centre-cropped to the stream's aspect ratio and resized to its width x
height (from the params).

  --input PATH            an MP4 (or QuickTime .mov) file, plain or fragmented, or a Matroska
                          (.mkv) file, with H.264 video (8-bit 4:2:0, progressive; Baseline,
                          Main or High profile); a recording cut off is read to its last whole
                          fragment or block.
                          Or a folder of PNG/JPEG pictures taken in name order.
                          Webcams are not read (yet): record a clip first
                          (ffmpeg -f v4l2 -i /dev/video0 -t 5 clip.mp4)
  --output PATH           a .mp4 file: H.264 with the input's frame times and timescale (the
                          same frame count and duration), the input's audio tracks copied packet
                          for packet; or a folder (made if missing) of PNG frames. An existing
                          file is replaced once the run has finished
  --params FILE_OR_JSON   StreamDiffusionParams (Daydream's body); may be given more than once,
                          later ones merged over earlier ones (JSON Merge Patch)
  --settings FILE_OR_JSON engine settings (device, dtype, vae, model_root, ...)
  --fps RATE              frame rate of a folder of pictures (default 30; 30000/1001 works)
  --bitrate BPS           the H.264 encoder's bitrate (default 4000000)
  -h, --help              this text

Progress (frames, fps, time left) goes to stderr, and a summary at the end.";

/// The parsed `run` flags.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct RunArgs {
    pub(crate) input: PathBuf,
    pub(crate) output: PathBuf,
    pub(crate) params: Vec<String>,
    pub(crate) settings: Option<String>,
    pub(crate) fps: (u32, u32),
    pub(crate) bitrate: u32,
}

fn parse_fps(value: &str) -> Result<(u32, u32), String> {
    let bad = || format!("--fps {value}: give a rate such as 30, 29.97 or 30000/1001");
    let (num, den) = match value.split_once('/') {
        Some((n, d)) => (
            n.trim().parse::<u32>().map_err(|_| bad())?,
            d.trim().parse::<u32>().map_err(|_| bad())?,
        ),
        None => {
            let rate: f64 = value.trim().parse().map_err(|_| bad())?;
            if !rate.is_finite() {
                return Err(bad());
            }
            if rate.fract() == 0.0 {
                (rate as u32, 1)
            } else {
                ((rate * 1000.0).round() as u32, 1000)
            }
        }
    };
    if num == 0 || den == 0 || f64::from(num) / f64::from(den) > 1000.0 {
        return Err(format!(
            "--fps {value}: the rate must be above 0 and at most 1000"
        ));
    }
    Ok((num, den))
}

/// Parses `sdstream run`'s flags (`args` after `run`); `Ok(None)` for `--help`.
pub(crate) fn parse(args: &[String]) -> Result<Option<RunArgs>, String> {
    let split = super::cli::split_flag_values(args);
    let (mut input, mut output, mut settings) = (None, None, None);
    let mut params = Vec::new();
    let mut fps = (30, 1);
    let mut bitrate = EncoderSettings::default().bitrate_bps;
    let mut it = split.iter();
    while let Some(flag) = it.next() {
        if flag == "-h" || flag == "--help" {
            return Ok(None);
        }
        let value = it
            .next()
            .ok_or_else(|| format!("{flag} needs a value\n\n{USAGE}"))?
            .clone();
        match flag.as_str() {
            "--input" => input = Some(PathBuf::from(value)),
            "--output" => output = Some(PathBuf::from(value)),
            "--params" => params.push(value),
            "--settings" => settings = Some(value),
            "--fps" => fps = parse_fps(&value)?,
            "--bitrate" => {
                let bps: u64 = value
                    .parse()
                    .map_err(|e| format!("--bitrate {value}: {e}"))?;
                bitrate = bps.clamp(50_000, 200_000_000) as u32;
            }
            other => return Err(format!("unknown flag {other}\n\n{USAGE}")),
        }
    }
    let input = input.ok_or_else(|| format!("run needs --input PATH\n\n{USAGE}"))?;
    let output = output.ok_or_else(|| format!("run needs --output PATH\n\n{USAGE}"))?;
    Ok(Some(RunArgs {
        input,
        output,
        params,
        settings,
        fps,
        bitrate,
    }))
}

/// Set by SIGINT/SIGTERM: the run stops after the frame in hand and writes nothing.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

#[cfg(target_os = "linux")]
fn catch_interrupts() {
    extern "C" fn on_signal(_: libc::c_int) {
        INTERRUPTED.store(true, Ordering::SeqCst);
    }
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
}

#[cfg(not(target_os = "linux"))]
fn catch_interrupts() {}

/// Where frames come from.
enum Source {
    Mp4 {
        path: PathBuf,
        input: Box<Mp4Input>,
        video: VideoTrackInfo,
    },
    Pictures(Vec<PathBuf>),
}

/// One input frame, RGB8 packed.
struct InFrame {
    index: usize,
    name: String,
    width: usize,
    height: usize,
    rgb: Vec<u8>,
}

fn is_mp4_name(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| matches!(e.to_ascii_lowercase().as_str(), "mp4" | "m4v" | "mov"))
}

fn open_source(path: &Path) -> Result<Source, String> {
    let shown = path.display();
    if path.starts_with("/dev") {
        return Err(format!(
            "{shown}: reading a webcam is not supported; record a clip first (ffmpeg -f v4l2 \
             -i {shown} -t 5 -c:v libx264 -pix_fmt yuv420p clip.mp4) and run that"
        ));
    }
    let meta = std::fs::metadata(path).map_err(|e| format!("cannot read {shown}: {e}"))?;
    if meta.is_dir() {
        let entries = std::fs::read_dir(path).map_err(|e| format!("cannot list {shown}: {e}"))?;
        let mut pictures: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.extension().and_then(|x| x.to_str()).is_some_and(|x| {
                    matches!(x.to_ascii_lowercase().as_str(), "png" | "jpg" | "jpeg")
                })
            })
            .collect();
        pictures.sort();
        if pictures.is_empty() {
            return Err(format!(
                "{shown}: no .png, .jpg or .jpeg pictures in the folder"
            ));
        }
        return Ok(Source::Pictures(pictures));
    }
    let input = Mp4Input::open(path).map_err(|e| format!("{shown}: {e}"))?;
    let video = VideoTrackInfo::find(&input).map_err(|e| format!("{shown}: {e}"))?;
    Ok(Source::Mp4 {
        path: path.to_owned(),
        input: Box::new(input),
        video,
    })
}

/// Reads frames on its own thread into a channel of two, so that decoding overlaps diffusion.
fn spawn_reader(source: Source) -> mpsc::Receiver<Result<InFrame, String>> {
    let (tx, rx) = mpsc::sync_channel(2);
    std::thread::Builder::new()
        .name("sdstream-run-reader".into())
        .spawn(move || match source {
            Source::Mp4 {
                path,
                mut input,
                video,
            } => {
                let (matrix, full_range) = (video.sps.matrix, video.sps.full_range);
                let mut decoder = match VideoDecoder::new(video) {
                    Ok(d) => d,
                    Err(e) => {
                        let _ = tx.send(Err(format!("{}: {e}", path.display())));
                        return;
                    }
                };
                loop {
                    let next = decoder.next(&mut input);
                    let frame = match next {
                        Ok(Some((index, picture))) => Ok(InFrame {
                            index,
                            name: format!("{index:06}.png"),
                            width: picture.width,
                            height: picture.height,
                            rgb: crate::video_file::yuv::to_rgb(&picture, matrix, full_range),
                        }),
                        Ok(None) => return,
                        Err(e) => Err(format!("{}: {e}", path.display())),
                    };
                    let failed = frame.is_err();
                    if tx.send(frame).is_err() || failed {
                        return;
                    }
                }
            }
            Source::Pictures(paths) => {
                for (index, p) in paths.iter().enumerate() {
                    let frame = image::open(p)
                        .map_err(|e| format!("cannot read {}: {e}", p.display()))
                        .map(|img| {
                            let img = img.to_rgb8();
                            let (w, h) = img.dimensions();
                            let stem = p.file_stem().unwrap_or_default().to_string_lossy();
                            InFrame {
                                index,
                                name: format!("{stem}.png"),
                                width: w as usize,
                                height: h as usize,
                                rgb: img.into_raw(),
                            }
                        });
                    let failed = frame.is_err();
                    if tx.send(frame).is_err() || failed {
                        return;
                    }
                }
            }
        })
        .ok();
    rx
}

/// The centred crop of a `sw`×`sh` picture with the aspect ratio of `tw`×`th`: (x, y, w, h).
pub(crate) fn centre_crop(
    sw: usize,
    sh: usize,
    tw: usize,
    th: usize,
) -> (usize, usize, usize, usize) {
    if sw * th > sh * tw {
        let w = ((sh * tw) as f64 / th as f64).round().max(1.0) as usize;
        ((sw - w) / 2, 0, w, sh)
    } else {
        let h = ((sw * th) as f64 / tw as f64).round().max(1.0) as usize;
        (0, (sh - h) / 2, sw, h)
    }
}

/// Progress on stderr: in place on a terminal (ten times a second at most), a line every five
/// seconds otherwise.
struct Progress {
    total: usize,
    start: Instant,
    last: Option<Instant>,
    tty: bool,
}

fn clock(seconds: f64) -> String {
    let s = seconds.max(0.0).round() as u64;
    if s >= 3600 {
        format!("{}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60)
    } else {
        format!("{}:{:02}", s / 60, s % 60)
    }
}

impl Progress {
    fn new(total: usize) -> Self {
        Self {
            total,
            start: Instant::now(),
            last: None,
            tty: std::io::stderr().is_terminal(),
        }
    }

    fn line(&self, done: usize) -> String {
        let elapsed = self.start.elapsed().as_secs_f64();
        let fps = if elapsed > 0.0 {
            done as f64 / elapsed
        } else {
            0.0
        };
        let left = self.total.saturating_sub(done);
        let eta = if fps > 0.0 {
            clock(left as f64 / fps)
        } else {
            "?".into()
        };
        format!(
            "frame {done}/{} ({:.0}%)  {fps:.2} fps  elapsed {}  ETA {eta}",
            self.total,
            100.0 * done as f64 / self.total.max(1) as f64,
            clock(elapsed)
        )
    }

    fn update(&mut self, done: usize) {
        let every = if self.tty {
            Duration::from_millis(100)
        } else {
            Duration::from_secs(5)
        };
        let due = self.last.is_none_or(|t| t.elapsed() >= every) || done == self.total;
        if !due {
            return;
        }
        self.last = Some(Instant::now());
        let mut err = std::io::stderr().lock();
        let _ = if self.tty {
            write!(err, "\r{}\x1b[K", self.line(done))
        } else {
            writeln!(err, "{}", self.line(done))
        };
        let _ = err.flush();
    }

    fn end(&self) {
        if self.tty && self.last.is_some() {
            let _ = writeln!(std::io::stderr());
        }
    }
}

/// An MP4 being written.
struct Mp4Sink {
    out: Mp4Output,
    encoder: H264Encoder,
    /// Each frame's presentation time and duration (in the video timescale), by rank.
    times: Vec<(i64, u32)>,
    timescale: u32,
}

/// Where frames go.
enum Sink {
    Mp4(Box<Mp4Sink>),
    Folder(PathBuf),
}

/// The stream parameters: every `--params` merged in order.
fn merged_params(args: &[String]) -> Result<Value, String> {
    let mut merged = json!({});
    for arg in args {
        let value = json_arg(arg)?;
        if !value.is_object() {
            return Err(format!("--params {arg}: a JSON object is needed"));
        }
        sdstream::params::merge_patch(&mut merged, &value);
    }
    Ok(merged)
}

/// Presentation times and durations of the input video's frames, in presentation order: the
/// composition times as they are, each lasting until the next; the last lasts what makes the
/// sum equal the track's own (the sum of its sample durations).
fn mp4_times(input: &Mp4Input, video: &VideoTrackInfo) -> Result<Vec<(i64, u32)>, String> {
    let track = video.track(input);
    let pts: Vec<i64> = video
        .presentation
        .iter()
        .map(|&i| track.samples[i].cts())
        .collect();
    let total = track.samples_duration() as i64;
    let mut times = Vec::with_capacity(pts.len());
    for (r, &t) in pts.iter().enumerate() {
        let duration = match pts.get(r + 1) {
            Some(&next) => next - t,
            None => {
                let rest = total - (t - pts[0]);
                if rest > 0 {
                    rest
                } else {
                    i64::from(track.samples[video.presentation[r]].duration)
                }
            }
        };
        let duration = u32::try_from(duration)
            .map_err(|_| format!("frame {} lasts {duration} units, which does not fit", r + 1))?;
        times.push((t, duration));
    }
    Ok(times)
}

/// Runs `sdstream run` with parsed flags.
pub(crate) fn run(args: &RunArgs) -> Result<(), String> {
    let settings = engine_settings(args.settings.as_deref())?;
    let params_json = merged_params(&args.params)?;
    let params = StreamDiffusionParams::from_json_with(&params_json.to_string(), &settings)
        .map_err(|e| format!("--params: {e}"))?;
    let (width, height) = (params.width as usize, params.height as usize);
    let to_mp4 = is_mp4_name(&args.output);
    if args.output == args.input {
        return Err("--output must not be the --input".into());
    }
    let source = open_source(&args.input)?;
    // What the output takes from the input, and the notes about what it leaves.
    let mut notes = Vec::new();
    let (total, sink) = match &source {
        Source::Mp4 { path, input, video } => {
            notes.extend(input.notes.iter().cloned());
            let total = video.presentation.len();
            let track = video.track(input);
            for (i, t) in input.tracks.iter().enumerate() {
                if i == video.index {
                    continue;
                }
                let what = format!(
                    "track {} ({})",
                    t.id,
                    crate::video_file::decode::codec_name(t.codec())
                );
                match t.kind {
                    TrackKind::Audio if !to_mp4 => {
                        notes.push(format!(
                            "{what}: audio is not written to a folder of frames"
                        ));
                    }
                    TrackKind::Audio if t.codec() == *b"enca" => {
                        notes.push(format!("{what}: encrypted audio is not copied"));
                    }
                    TrackKind::Audio => {}
                    TrackKind::Video => {
                        notes.push(format!("{what}: a second video track is not copied"))
                    }
                    TrackKind::Other(_) => {
                        notes.push(format!("{what}: not copied (only audio is)"))
                    }
                }
            }
            let sink = if to_mp4 {
                let copied: Vec<_> = input
                    .tracks
                    .iter()
                    .filter(|t| t.kind == TrackKind::Audio && t.codec() != *b"enca")
                    .cloned()
                    .collect();
                let spec = VideoTrackSpec {
                    timescale: track.timescale,
                    width: width as u16,
                    height: height as u16,
                    header: Some(track.header.clone()),
                    edit_list: track.edit_list.clone(),
                    language: track.language,
                };
                let times =
                    mp4_times(input, video).map_err(|e| format!("{}: {e}", path.display()))?;
                let seconds = track.samples_duration() as f64 / f64::from(track.timescale);
                let fps = if seconds > 0.0 {
                    total as f64 / seconds
                } else {
                    30.0
                };
                Some((
                    spec,
                    copied,
                    input.movie_timescale,
                    times,
                    fps,
                    Some(path.clone()),
                ))
            } else {
                None
            };
            (total, sink)
        }
        Source::Pictures(paths) => {
            let total = paths.len();
            let sink = to_mp4.then(|| {
                let (num, den) = args.fps;
                // Timescale and frame duration: the rate's own, at least 10000 units a second.
                let (mut timescale, mut delta) = (num, den);
                while timescale < 10_000 && delta <= u32::MAX / 2 {
                    timescale *= 2;
                    delta *= 2;
                }
                let spec = VideoTrackSpec {
                    timescale,
                    width: width as u16,
                    height: height as u16,
                    header: None,
                    edit_list: None,
                    language: 0x55c4, // "und"
                };
                let times = (0..total)
                    .map(|i| (i as i64 * i64::from(delta), delta))
                    .collect();
                (
                    spec,
                    Vec::new(),
                    timescale,
                    times,
                    f64::from(num) / f64::from(den),
                    None,
                )
            });
            (total, sink)
        }
    };
    // The output's folder must exist (the file itself is made once the model has loaded).
    if to_mp4 {
        let parent = args.output.parent().filter(|p| !p.as_os_str().is_empty());
        if let Some(parent) = parent
            && !parent.is_dir()
        {
            return Err(format!(
                "cannot write {}: the folder {} does not exist",
                args.output.display(),
                parent.display()
            ));
        }
    }
    let mut err = std::io::stderr().lock();
    for note in &notes {
        let _ = writeln!(err, "note: {note}");
    }
    let _ = writeln!(
        err,
        "loading {} ({}x{}, vae {}, device {})",
        params.model_id, width, height, settings.vae, settings.device
    );
    drop(err);
    let load = Instant::now();
    let mut stream = StreamDiffusion::new(params, settings)
        .map_err(|e| format!("cannot load the stream: {e}"))?;
    eprintln!(
        "loaded in {:.1} s; {total} frames from {} to {}",
        load.elapsed().as_secs_f64(),
        args.input.display(),
        args.output.display()
    );
    let mut sink = match sink {
        Some((mut spec, copied, movie_timescale, times, fps, source_path)) => {
            // The stream's output size (a postprocessor such as realesrgan_trt doubles it).
            let (out_w, out_h) = stream.output_size();
            (spec.width, spec.height) = (out_w as u16, out_h as u16);
            let timescale = spec.timescale;
            let out = Mp4Output::create(
                &args.output,
                movie_timescale,
                spec,
                copied,
                source_path.as_deref(),
            )
            .map_err(|e| format!("cannot write {}: {e}", args.output.display()))?;
            let encoder = H264Encoder::new(EncoderSettings {
                bitrate_bps: args.bitrate,
                max_fps: fps as f32,
                keyframe_interval: (fps * 2.0).round().clamp(1.0, 600.0) as u32,
            });
            Sink::Mp4(Box::new(Mp4Sink {
                out,
                encoder,
                times,
                timescale,
            }))
        }
        None => {
            std::fs::create_dir_all(&args.output)
                .map_err(|e| format!("cannot create {}: {e}", args.output.display()))?;
            Sink::Folder(args.output.clone())
        }
    };
    catch_interrupts();
    let frames = spawn_reader(source);
    let mut progress = Progress::new(total);
    // On a terminal the line appears with the first frame: OpenH264 prints a warning of its own
    // when its encoder starts, which would land in the middle of it.
    if !progress.tty {
        progress.update(0);
    }
    let mut done = 0usize;
    for frame in frames.iter() {
        if INTERRUPTED.load(Ordering::SeqCst) {
            progress.end();
            return Err(format!(
                "interrupted after {done} frames; {} not written",
                args.output.display()
            ));
        }
        let frame = frame?;
        let (x, y, w, h) = centre_crop(frame.width, frame.height, width, height);
        let stride = frame.width * 3;
        let view = Frame::new(
            &frame.rgb[y * stride + x * 3..],
            w,
            h,
            stride,
            PixelFormat::Rgb8,
        )
        .map_err(|e| format!("frame {}: {e}", frame.index + 1))?;
        let out = stream
            .process(&view)
            .map_err(|e| format!("frame {}: {e}", frame.index + 1))?;
        let rgb = if out.format == PixelFormat::Rgb8 {
            out.data
        } else {
            out.as_frame().map_err(|e| e.to_string())?.to_rgb8()
        };
        match &mut sink {
            Sink::Mp4(mp4) => {
                let encoded = mp4
                    .encoder
                    .encode(&rgb, out.width, out.height)
                    .map_err(|e| format!("frame {}: {e}", frame.index + 1))?;
                let (pts, duration) = mp4.times[frame.index];
                mp4.out
                    .write_video(&encoded.data, encoded.keyframe, pts, duration)
                    .map_err(|e| format!("cannot write {}: {e}", args.output.display()))?;
            }
            Sink::Folder(dir) => {
                let path = dir.join(&frame.name);
                image::RgbImage::from_raw(out.width as u32, out.height as u32, rgb)
                    .ok_or("an output frame does not match its size")?
                    .save(&path)
                    .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
            }
        }
        done += 1;
        progress.update(done);
    }
    progress.end();
    if done != total {
        return Err(format!("{done} of {total} frames were read"));
    }
    let elapsed = progress.start.elapsed().as_secs_f64();
    let what = match sink {
        Sink::Mp4(mp4) => {
            let Mp4Sink {
                out,
                times,
                timescale,
                ..
            } = *mp4;
            let packets = out.copied_samples();
            out.finish()
                .map_err(|e| format!("cannot write {}: {e}", args.output.display()))?;
            let duration: u64 = times.iter().map(|t| u64::from(t.1)).sum();
            format!(
                "{} ({:.3} s of video, {packets} audio packets copied)",
                args.output.display(),
                duration as f64 / f64::from(timescale.max(1))
            )
        }
        Sink::Folder(dir) => format!("{} frames into {}", done, dir.display()),
    };
    eprintln!(
        "done: {done} frames in {}, {:.2} fps on average; wrote {what}",
        clock(elapsed),
        done as f64 / elapsed.max(1e-9)
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn flags_parse_and_refuse() {
        let parsed = parse(&args(&[
            "--input",
            "a.mp4",
            "--output=b.mp4",
            "--params",
            "p.json",
            "--params",
            "{}",
            "--fps",
            "30000/1001",
        ]))
        .expect("parse")
        .expect("not help");
        assert_eq!(parsed.input, PathBuf::from("a.mp4"));
        assert_eq!(parsed.params, ["p.json", "{}"]);
        assert_eq!(parsed.fps, (30000, 1001));
        assert_eq!(parse(&args(&["--help"])).expect("help"), None);
        assert!(
            parse(&args(&["--output", "b.mp4"]))
                .unwrap_err()
                .contains("--input")
        );
        assert!(parse(&args(&["--input", "a", "--output", "b", "--fps", "0"])).is_err());
        assert!(
            parse(&args(&["--input", "a", "--output", "b", "--nope", "1"]))
                .unwrap_err()
                .contains("unknown flag --nope")
        );
        assert_eq!(parse_fps("29.97").expect("fps"), (29970, 1000));
    }

    #[test]
    fn crops_keep_the_stream_aspect() {
        assert_eq!(centre_crop(1920, 1080, 512, 512), (420, 0, 1080, 1080));
        assert_eq!(centre_crop(512, 512, 512, 512), (0, 0, 512, 512));
        assert_eq!(centre_crop(96, 64, 64, 64), (16, 0, 64, 64));
        assert_eq!(centre_crop(64, 96, 64, 32), (0, 32, 64, 32));
    }

    #[test]
    fn progress_lines_say_frames_fps_and_time_left() {
        let p = Progress::new(48);
        let line = p.line(12);
        assert!(line.starts_with("frame 12/48 (25%)"), "{line}");
        assert!(line.contains("fps") && line.contains("ETA"), "{line}");
        assert_eq!(clock(3725.0), "1:02:05");
        assert_eq!(clock(65.0), "1:05");
    }
}
