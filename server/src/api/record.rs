//! `--record DIR`: every decoded input and engine output of a stream (PPM) with the params of
//! each version, for `sdstream replay`.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde_json::json;

use crate::webrtc::FrameObserver;
use sdstream::StreamDiffusionParams;
use sdstream::engine::{FrameId, Output};

/// Writes inputs, outputs and params of one stream for `replay`.
pub(crate) struct Recorder {
    dir: PathBuf,
    outputs: Mutex<std::fs::File>,
}

impl Recorder {
    pub(crate) fn new(dir: PathBuf) -> std::io::Result<Self> {
        std::fs::create_dir_all(&dir)?;
        let outputs = std::fs::File::create(dir.join("outputs.jsonl"))?;
        Ok(Self {
            dir,
            outputs: Mutex::new(outputs),
        })
    }

    pub(crate) fn params(&self, version: u64, params: &StreamDiffusionParams) {
        let _ = std::fs::write(
            self.dir.join(format!("params-v{version}.json")),
            params.to_json(),
        );
    }
}

pub(crate) fn write_ppm(
    path: &Path,
    width: usize,
    height: usize,
    rgb: &[u8],
) -> std::io::Result<()> {
    let mut data = format!("P6\n{width} {height}\n255\n").into_bytes();
    data.extend_from_slice(rgb);
    std::fs::write(path, data)
}

impl FrameObserver for Recorder {
    fn on_input(&self, id: FrameId, width: usize, height: usize, rgb: &[u8]) {
        let _ = write_ppm(
            &self.dir.join(format!("in-{id:06}.ppm")),
            width,
            height,
            rgb,
        );
    }

    fn on_output(&self, output: &Output) {
        let image = &output.image;
        let rgb = match image.as_frame() {
            Ok(frame) => frame.to_rgb8(),
            Err(_) => return,
        };
        let _ = write_ppm(
            &self.dir.join(format!("out-{:06}.ppm", output.id)),
            image.width,
            image.height,
            &rgb,
        );
        let line = json!({
            "id": output.id,
            "params_version": output.params_version,
            "pipeline_ms": output.timings.total.as_secs_f64() * 1e3,
            "latency_ms": output.latency.as_secs_f64() * 1e3,
        });
        if let Ok(mut file) = self.outputs.lock() {
            let _ = writeln!(file, "{line}");
        }
    }
}
