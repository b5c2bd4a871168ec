//! `sdstream replay --record DIR`: runs a fresh engine over a stream's recorded inputs and
//! compares with what the server served.
//!
//! The recording holds every decoded input the engine processed (`in-ID.ppm`), the output it
//! served for it (`out-ID.ppm`), the parameter version each output was made with
//! (`outputs.jsonl`) and the parameters of each version (`params-vN.json`). The replay feeds
//! the inputs in id order to a new engine (lossless queue, one frame at a time), switching to
//! the next version's parameters right before the first frame that was served with them —
//! where the server's engine switched — and reports how far the served outputs are from the
//! replayed ones. A second replay keeps the first version's parameters throughout, to show how
//! much the later versions changed the picture (`--dump-unswitched DIR` writes its outputs).
//! Prints one JSON object.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};

use sdstream::{
    DropPolicy, Engine, EngineOptions, EngineSettings, Frame, PixelFormat, StreamDiffusionParams,
    Submission,
};

const USAGE: &str = "\
usage: sdstream replay --record DIR [--settings FILE_OR_JSON] [--dump-unswitched DIR]

DIR is one stream's folder of a `sdstream serve --record` run. Prints one JSON object.";

fn read_ppm(path: &Path) -> Result<(usize, usize, Vec<u8>), String> {
    let data = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let bad = || format!("{}: not a binary PPM written by the server", path.display());
    // Header: "P6\n{w} {h}\n255\n".
    let mut fields = Vec::new();
    let mut start = 0;
    for (i, b) in data.iter().enumerate() {
        if b.is_ascii_whitespace() {
            if i > start {
                fields.push(std::str::from_utf8(&data[start..i]).map_err(|_| bad())?);
            }
            start = i + 1;
            if fields.len() == 4 {
                break;
            }
        }
    }
    if fields.len() != 4 || fields[0] != "P6" || fields[3] != "255" {
        return Err(bad());
    }
    let width: usize = fields[1].parse().map_err(|_| bad())?;
    let height: usize = fields[2].parse().map_err(|_| bad())?;
    let pixels = data.get(start..).ok_or_else(bad)?;
    if pixels.len() != width * height * 3 {
        return Err(bad());
    }
    Ok((width, height, pixels.to_vec()))
}

/// (max, mean) absolute difference in 8-bit levels.
fn diff(a: &[u8], b: &[u8]) -> (u8, f64) {
    let mut max = 0u8;
    let mut sum = 0u64;
    for (x, y) in a.iter().zip(b) {
        let d = x.abs_diff(*y);
        max = max.max(d);
        sum += u64::from(d);
    }
    (max, sum as f64 / a.len().max(1) as f64)
}

struct Recorded {
    id: u64,
    version: u64,
}

fn load(dir: &Path) -> Result<(Vec<Recorded>, BTreeMap<u64, String>), String> {
    let lines = std::fs::read_to_string(dir.join("outputs.jsonl"))
        .map_err(|e| format!("cannot read {}/outputs.jsonl: {e}", dir.display()))?;
    let mut frames = Vec::new();
    for line in lines.lines().filter(|l| !l.trim().is_empty()) {
        let v: Value = serde_json::from_str(line).map_err(|e| format!("outputs.jsonl: {e}"))?;
        let (Some(id), Some(version)) = (v["id"].as_u64(), v["params_version"].as_u64()) else {
            return Err(format!("outputs.jsonl: bad line {line}"));
        };
        frames.push(Recorded { id, version });
    }
    frames.sort_by_key(|f| f.id);
    frames.dedup_by_key(|f| f.id);
    let mut params = BTreeMap::new();
    let entries =
        std::fs::read_dir(dir).map_err(|e| format!("cannot list {}: {e}", dir.display()))?;
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some(v) = name
            .strip_prefix("params-v")
            .and_then(|n| n.strip_suffix(".json"))
            .and_then(|n| n.parse::<u64>().ok())
        {
            let text = std::fs::read_to_string(entry.path())
                .map_err(|e| format!("cannot read {name}: {e}"))?;
            params.insert(v, text);
        }
    }
    Ok((frames, params))
}

/// Runs the recorded inputs through a new engine; `switch` decides whether later versions'
/// parameters are applied. Returns the outputs (packed RGB8) and the update kinds seen.
fn replay(
    dir: &Path,
    frames: &[Recorded],
    params: &BTreeMap<u64, String>,
    settings: &EngineSettings,
    switch: bool,
) -> Result<(Vec<Vec<u8>>, Vec<String>), String> {
    let first = frames.first().ok_or("the recording has no outputs")?;
    let parse = |version: u64| -> Result<StreamDiffusionParams, String> {
        let text = params
            .get(&version)
            .ok_or_else(|| format!("no params-v{version}.json in the recording"))?;
        StreamDiffusionParams::from_json_with(text, settings).map_err(|e| e.to_string())
    };
    let options = EngineOptions {
        drop_policy: DropPolicy::Lossless,
        ..EngineOptions::default()
    };
    let engine = Arc::new(
        Engine::new(parse(first.version)?, settings.clone(), options)
            .map_err(|e| format!("cannot start the replay engine: {e}"))?,
    );
    let mut current = first.version;
    let mut outputs = Vec::with_capacity(frames.len());
    let mut kinds = Vec::new();
    for f in frames {
        if switch && f.version != current {
            let update = engine
                .update_params(parse(f.version)?)
                .map_err(|e| format!("version {}: {e}", f.version))?;
            kinds.push(if update.is_hot() { "hot" } else { "reload" }.to_owned());
            current = f.version;
        }
        let (w, h, rgb) = read_ppm(&dir.join(format!("in-{:06}.ppm", f.id)))?;
        let frame = Frame::packed(&rgb, w, h, PixelFormat::Rgb8).map_err(|e| e.to_string())?;
        engine
            .submit(Submission::new(frame).wait_for_room(Duration::from_secs(60)))
            .map_err(|e| format!("frame {}: {e}", f.id))?;
        let output = engine
            .recv_timeout(Duration::from_secs(120))
            .map_err(|e| format!("frame {}: {e}", f.id))?
            .ok_or_else(|| format!("frame {}: no output within 120 s", f.id))?;
        let rgb = output
            .image
            .as_frame()
            .map_err(|e| e.to_string())?
            .to_rgb8();
        outputs.push(rgb);
    }
    engine.close();
    Ok((outputs, kinds))
}

pub(crate) fn run(args: &[String]) -> Result<(), String> {
    let mut dir: Option<PathBuf> = None;
    let mut settings_arg: Option<String> = None;
    let mut dump: Option<PathBuf> = None;
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        if flag == "-h" || flag == "--help" {
            let _ = writeln!(std::io::stdout(), "{USAGE}");
            return Ok(());
        }
        let value = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--record" => dir = Some(value.into()),
            "--settings" => settings_arg = Some(value.clone()),
            "--dump-unswitched" => dump = Some(value.into()),
            other => return Err(format!("replay: unknown flag {other}")),
        }
    }
    let dir = dir.ok_or("replay needs --record DIR (one stream's folder)")?;
    let settings = super::args::engine_settings(settings_arg.as_deref())?;
    let (frames, params) = load(&dir)?;
    let first_version = frames.first().map(|f| f.version).unwrap_or(0);

    let (replayed, kinds) = replay(&dir, &frames, &params, &settings, true)?;
    let (unswitched, _) = replay(&dir, &frames, &params, &settings, false)?;
    if let Some(dump) = &dump {
        std::fs::create_dir_all(dump).map_err(|e| format!("{}: {e}", dump.display()))?;
        for (f, rgb) in frames.iter().zip(&unswitched) {
            let (w, h, _) = read_ppm(&dir.join(format!("out-{:06}.ppm", f.id)))?;
            super::record::write_ppm(&dump.join(format!("unswitched-{:06}.ppm", f.id)), w, h, rgb)
                .map_err(|e| format!("{}: {e}", dump.display()))?;
        }
    }

    // A prompt change reaches the output over as many frames as the stream batch has steps
    // (the latents already in the batch were partly denoised with the old prompt).
    let ramp = params
        .values()
        .next()
        .and_then(|t| serde_json::from_str::<Value>(t).ok())
        .and_then(|v| v["t_index_list"].as_array().map(Vec::len))
        .unwrap_or(1);
    let mut since_switch = 0usize;
    let mut served_max = 0u8;
    let mut served_mean_sum = 0.0;
    let mut after = (0usize, 0.0f64, f64::INFINITY);
    let mut before_max = 0u8;
    let mut versions: BTreeMap<u64, usize> = BTreeMap::new();
    for (i, f) in frames.iter().enumerate() {
        *versions.entry(f.version).or_default() += 1;
        let (_, _, served) = read_ppm(&dir.join(format!("out-{:06}.ppm", f.id)))?;
        let (max, mean) = diff(&served, &replayed[i]);
        served_max = served_max.max(max);
        served_mean_sum += mean;
        // The switch's effect: the replay that switched against the one that did not (equal
        // to served-vs-unswitched when the served outputs equal the replay, as they must).
        let (max_u, mean_u) = diff(&replayed[i], &unswitched[i]);
        if f.version == first_version {
            before_max = before_max.max(max_u);
        } else {
            since_switch += 1;
            after.0 += 1;
            after.1 += mean_u;
            if since_switch > ramp {
                after.2 = after.2.min(mean_u);
            }
        }
    }
    let n = frames.len().max(1) as f64;
    let report = json!({
        "frames": frames.len(),
        "versions": versions.iter().map(|(v, c)| (v.to_string(), json!(c))).collect::<serde_json::Map<_, _>>(),
        "update_kinds": kinds,
        "served_vs_replay": {"max_abs": served_max, "mean_abs": served_mean_sum / n},
        "first_version_vs_unswitched_max_abs": before_max,
        "later_versions_vs_unswitched": {
            "frames": after.0,
            "mean_abs": if after.0 > 0 { after.1 / after.0 as f64 } else { 0.0 },
            "ramp_frames": ramp,
            "min_frame_mean_abs_after_ramp": if after.2.is_finite() { after.2 } else { 0.0 },
        },
    });
    println!("{report}");
    Ok(())
}
