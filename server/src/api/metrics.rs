//! `GET /metrics`: the streams and the process in Prometheus' text exposition format (0.0.4),
//! for operators who scrape their servers. It translates what the core reports (the engines'
//! [`EngineStatus`], the model pool's figures, the cross-stream batchers' counters); it computes
//! nothing of its own.
//!
//! Per stream (label `stream`, the stream id): its state as the status endpoint gives it (one
//! series per state, 1 for the current one), input and output fps, frames submitted, processed,
//! failed and dropped, outputs dropped, errors, reloads and failed reloads, the queue, the last
//! frame's stage times, and the histogram of frame latencies (frame in to frame out). For the
//! process: streams, resident memory (Linux), the model pool's checkpoints, bytes and loads, and
//! the cross-stream batchers' calls, batches, rows and shared calls per network (label
//! `network`: `unet`, `controlnet`, `encode`, `decode`; docs/MULTI_STREAM.md).
//! The route takes the API token like every `/v1` route: the stream ids it lists are what a
//! viewer's URL is made of.

use std::fmt::Write as _;
use std::sync::Arc;

use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use sdstream::model::pool::{ModelPool, PoolEntry};
use sdstream::pipeline::cross_stream::{self, BatchCounts, SharedNetwork};
use sdstream::status::{EngineState, EngineStatus};

use super::state::{App, stream_state};

/// The text format's media type.
const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

pub(crate) async fn get_metrics(State(app): State<Arc<App>>) -> Response {
    let streams: Vec<(String, EngineState, EngineStatus)> = app
        .streams()
        .iter()
        .map(|s| {
            let engine = s.engine.status();
            let state = stream_state(engine.state, &s.transport.ingest());
            (s.id.clone(), state, engine)
        })
        .collect();
    let pool = ModelPool::global();
    // One listing of the pool serves both figures (each listing takes its lock).
    let entries = pool.entries();
    let process = Process {
        resident_bytes: resident_memory_bytes(),
        pool_checkpoints: entries.len(),
        pool_bytes: entries.iter().map(PoolEntry::total_bytes).sum(),
        pool_loads: pool.stats().loads,
        batching: cross_stream::process_totals(),
    };
    (
        [(header::CONTENT_TYPE, CONTENT_TYPE)],
        exposition(&streams, &process),
    )
        .into_response()
}

/// The process-wide figures.
struct Process {
    resident_bytes: Option<u64>,
    pool_checkpoints: usize,
    pool_bytes: u64,
    pool_loads: u64,
    /// The cross-stream batchers' counters per network.
    batching: Vec<(SharedNetwork, BatchCounts)>,
}

/// The exposition of `streams` (id, state, engine status) and `process`.
fn exposition(streams: &[(String, EngineState, EngineStatus)], process: &Process) -> String {
    let mut out = Text::default();
    out.family("sdstream_streams", "gauge", "Streams this server runs.");
    out.sample("sdstream_streams", &[], streams.len() as f64);
    if let Some(bytes) = process.resident_bytes {
        out.family(
            "sdstream_process_resident_memory_bytes",
            "gauge",
            "Resident memory of the server process.",
        );
        out.sample("sdstream_process_resident_memory_bytes", &[], bytes as f64);
    }
    out.family(
        "sdstream_model_pool_checkpoints",
        "gauge",
        "Checkpoints loaded in the model pool the streams share.",
    );
    out.sample(
        "sdstream_model_pool_checkpoints",
        &[],
        process.pool_checkpoints as f64,
    );
    out.family(
        "sdstream_model_pool_bytes",
        "gauge",
        "Bytes of the pooled checkpoints' weights and their ControlNets.",
    );
    out.sample("sdstream_model_pool_bytes", &[], process.pool_bytes as f64);
    out.family(
        "sdstream_model_pool_loads_total",
        "counter",
        "Checkpoints the model pool has loaded (weights read).",
    );
    out.sample(
        "sdstream_model_pool_loads_total",
        &[],
        process.pool_loads as f64,
    );

    type Count = fn(&BatchCounts) -> u64;
    let batching: [(&str, &str, Count); 4] = [
        (
            "sdstream_batch_calls_total",
            "Network calls the streams made through the cross-stream batchers.",
            |c| c.calls,
        ),
        (
            "sdstream_batches_total",
            "Forward passes those calls ran as (fewer than the calls where streams shared them).",
            |c| c.batches,
        ),
        (
            "sdstream_batch_shared_calls_total",
            "Calls that ran in one forward pass with another stream's.",
            |c| c.shared_calls,
        ),
        (
            "sdstream_batch_rows_total",
            "Rows those forward passes computed.",
            |c| c.rows,
        ),
    ];
    for (name, help, count) in batching {
        out.family(name, "counter", help);
        for (network, counts) in &process.batching {
            out.sample(name, &[("network", network.as_str())], count(counts) as f64);
        }
    }
    let busy = "sdstream_batch_device_seconds_total";
    out.family(
        busy,
        "counter",
        "Device time of the forward passes measured on their own (how busy the batches keep \
         the device, against the wall clock).",
    );
    for (network, counts) in &process.batching {
        out.sample(
            busy,
            &[("network", network.as_str())],
            counts.device_time.as_secs_f64(),
        );
    }

    out.family(
        "sdstream_stream_state",
        "gauge",
        "1 for the stream's current state (as its status reports it), 0 for the others.",
    );
    for (id, state, _) in streams {
        // Every state a stream can report, each a series.
        for candidate in EngineState::ALL {
            out.sample(
                "sdstream_stream_state",
                &[("stream", id), ("state", candidate.as_str())],
                f64::from(u8::from(candidate == *state)),
            );
        }
    }
    type Figure = fn(&EngineStatus) -> f64;
    let per_stream: [(&str, &str, &str, Figure); 13] = [
        (
            "sdstream_input_fps",
            "gauge",
            "Frames submitted per second.",
            |e| e.input_fps,
        ),
        (
            "sdstream_output_fps",
            "gauge",
            "Frames processed per second.",
            |e| e.output_fps,
        ),
        (
            "sdstream_frames_submitted_total",
            "counter",
            "Frames the engine accepted.",
            |e| e.frames_submitted as f64,
        ),
        (
            "sdstream_frames_processed_total",
            "counter",
            "Frames that produced an output.",
            |e| e.frames_processed as f64,
        ),
        (
            "sdstream_frames_failed_total",
            "counter",
            "Frames that failed in the pipeline.",
            |e| e.frames_failed as f64,
        ),
        (
            "sdstream_frames_dropped_total",
            "counter",
            "Frames dropped before processing (a full queue, a flush, no pipeline).",
            |e| e.frames_dropped as f64,
        ),
        (
            "sdstream_outputs_dropped_total",
            "counter",
            "Outputs discarded uncollected (a full output queue).",
            |e| e.outputs_dropped as f64,
        ),
        (
            "sdstream_errors_total",
            "counter",
            "Errors recorded (frames, updates, loads).",
            |e| e.error_count as f64,
        ),
        (
            "sdstream_reloads_total",
            "counter",
            "Pipelines swapped in after the first (reloads and restarts).",
            |e| e.restart_count as f64,
        ),
        (
            "sdstream_reload_failures_total",
            "counter",
            "Reloads that failed (the previous pipeline kept serving).",
            |e| e.reload_failures as f64,
        ),
        (
            "sdstream_queue_depth",
            "gauge",
            "Frames waiting in the input queue.",
            |e| e.queue_depth as f64,
        ),
        (
            "sdstream_frames_in_flight",
            "gauge",
            "Frames being processed now.",
            |e| e.frames_in_flight as f64,
        ),
        (
            "sdstream_params_version",
            "gauge",
            "Version of the last accepted parameters (0: the first).",
            |e| e.params_version as f64,
        ),
    ];
    for (name, kind, help, figure) in per_stream {
        out.family(name, kind, help);
        for (id, _, engine) in streams {
            out.sample(name, &[("stream", id)], figure(engine));
        }
    }
    out.family(
        "sdstream_stage_seconds",
        "gauge",
        "Time each stage took in the stream's last processed frame.",
    );
    for (id, _, engine) in streams {
        let t = &engine.timings;
        for (stage, ms) in [
            ("preprocess", t.preprocess),
            ("encode", t.encode),
            ("unet", t.unet),
            ("controlnet", t.controlnet),
            ("decode", t.decode),
            ("postprocess", t.postprocess),
            ("total", t.total),
        ] {
            out.sample(
                "sdstream_stage_seconds",
                &[("stream", id), ("stage", stage)],
                ms / 1e3,
            );
        }
    }
    let latency = "sdstream_frame_latency_seconds";
    out.family(
        latency,
        "histogram",
        "Frame latency, from the frame in to its output.",
    );
    for (id, _, engine) in streams {
        let h = &engine.frame_latency;
        for (bound, count) in h.cumulative() {
            let le = number(bound);
            out.sample(
                &format!("{latency}_bucket"),
                &[("stream", id), ("le", &le)],
                count as f64,
            );
        }
        out.sample(&format!("{latency}_sum"), &[("stream", id)], h.sum_seconds);
        out.sample(
            &format!("{latency}_count"),
            &[("stream", id)],
            h.count as f64,
        );
    }
    out.0
}

/// The exposition being written.
#[derive(Default)]
struct Text(String);

impl Text {
    /// A family's `# HELP` and `# TYPE` lines; its samples follow.
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.0, "# HELP {name} {help}");
        let _ = writeln!(self.0, "# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: f64) {
        self.0.push_str(name);
        if !labels.is_empty() {
            self.0.push('{');
            for (i, (label, value)) in labels.iter().enumerate() {
                if i > 0 {
                    self.0.push(',');
                }
                let _ = write!(self.0, "{label}=\"{}\"", escape(value));
            }
            self.0.push('}');
        }
        let _ = writeln!(self.0, " {}", number(value));
    }
}

/// A label value as the text format quotes it: backslash, double quote and line feed escaped.
fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// A sample value or bound as the text format writes it (`+Inf`, `NaN`).
fn number(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v == f64::INFINITY {
        "+Inf".into()
    } else if v == f64::NEG_INFINITY {
        "-Inf".into()
    } else {
        format!("{v}")
    }
}

/// The process's resident memory, from `/proc/self/statm` (Linux; `None` elsewhere).
fn resident_memory_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions; it returns -1 for a name it does not know.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(page).ok().map(|page| pages * page)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// A status with every counter at zero but `processed`, and these latencies.
    fn status(processed: u64, latencies_ms: &[u64]) -> EngineStatus {
        let zero_ms = serde_json::json!({
            "preprocess": 0.0, "encode": 0.0, "unet": 0.0, "controlnet": 0.0, "decode": 0.0,
            "postprocess": 0.0, "total": 0.0,
        });
        let mut body = serde_json::json!({
            "state": "ONLINE", "input_fps": 0.0, "output_fps": 0.0, "last_params": {},
            "last_params_hash": "", "reloading": false, "timings": zero_ms,
        });
        for counter in [
            "restart_count",
            "params_version",
            "queue_depth",
            "queue_capacity",
            "output_queue_depth",
            "frames_submitted",
            "frames_processed",
            "frames_failed",
            "frames_dropped",
            "frames_in_flight",
            "outputs_dropped",
            "error_count",
            "reload_failures",
            "builds_superseded",
        ] {
            body[counter] = 0.into();
        }
        let mut engine: EngineStatus = serde_json::from_value(body)
            .unwrap_or_else(|e| panic!("an EngineStatus of zeros: {e}"));
        engine.frames_processed = processed;
        for &ms in latencies_ms {
            engine.frame_latency.record(Duration::from_millis(ms));
        }
        engine
    }

    /// Families come once each, their samples together; the histogram's buckets are cumulative
    /// and end at +Inf with the count; label values are escaped; states are one-hot.
    #[test]
    fn the_exposition_is_well_formed() {
        let streams = vec![
            (
                "a\"b\\c\nd".to_string(),
                EngineState::Online,
                status(3, &[4, 20, 700]),
            ),
            ("s2".to_string(), EngineState::DegradedInput, status(0, &[])),
        ];
        let unet = BatchCounts {
            batches: 5,
            calls: 10,
            rows: 20,
            shared_calls: 10,
            widest: 2,
            timed: 4,
            device_time: std::time::Duration::from_millis(1250),
        };
        let process = Process {
            resident_bytes: Some(1 << 20),
            pool_checkpoints: 1,
            pool_bytes: 123,
            pool_loads: 2,
            batching: SharedNetwork::ALL
                .iter()
                .map(|&n| {
                    (
                        n,
                        if n == SharedNetwork::UNet {
                            unet
                        } else {
                            BatchCounts::default()
                        },
                    )
                })
                .collect(),
        };
        let text = exposition(&streams, &process);
        let types: Vec<&str> = text.lines().filter(|l| l.starts_with("# TYPE ")).collect();
        let mut names: Vec<&str> = types.iter().map(|l| l.split(' ').nth(2).unwrap()).collect();
        let families = names.len();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), families, "each family once");
        assert_eq!(families, 26);
        assert!(text.contains("sdstream_batch_calls_total{network=\"unet\"} 10\n"));
        assert!(text.contains("sdstream_batches_total{network=\"unet\"} 5\n"));
        assert!(text.contains("sdstream_batch_shared_calls_total{network=\"unet\"} 10\n"));
        assert!(text.contains("sdstream_batch_rows_total{network=\"controlnet\"} 0\n"));
        assert!(text.contains("sdstream_batch_device_seconds_total{network=\"unet\"} 1.25\n"));
        assert!(text.contains("sdstream_streams 2\n"), "{text}");
        assert!(text.contains("sdstream_process_resident_memory_bytes 1048576\n"));
        let id = r#"stream="a\"b\\c\nd""#;
        assert!(text.contains(&format!("sdstream_frames_processed_total{{{id}}} 3\n")));
        assert!(text.contains(&format!(
            "sdstream_stream_state{{{id},state=\"ONLINE\"}} 1\n"
        )));
        assert!(text.contains(&format!(
            "sdstream_stream_state{{{id},state=\"ERROR\"}} 0\n"
        )));
        assert!(text.contains("sdstream_stream_state{stream=\"s2\",state=\"DEGRADED_INPUT\"} 1\n"));
        let buckets: Vec<f64> = text
            .lines()
            .filter(|l| l.starts_with(&format!("sdstream_frame_latency_seconds_bucket{{{id}")))
            .map(|l| l.rsplit(' ').next().unwrap().parse().unwrap())
            .collect();
        assert_eq!(
            buckets.len(),
            sdstream::status::LATENCY_BUCKETS_SECONDS.len() + 1
        );
        assert!(buckets.windows(2).all(|w| w[0] <= w[1]), "{buckets:?}");
        assert_eq!(buckets[0], 1.0, "4 ms is within 5 ms");
        assert_eq!(*buckets.last().unwrap(), 3.0);
        assert!(text.contains(&format!(
            "sdstream_frame_latency_seconds_bucket{{{id},le=\"+Inf\"}} 3\n"
        )));
        assert!(text.contains(&format!("sdstream_frame_latency_seconds_count{{{id}}} 3\n")));
        let sum: f64 = text
            .lines()
            .find(|l| l.starts_with(&format!("sdstream_frame_latency_seconds_sum{{{id}}} ")))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .expect("the sum's sample");
        assert!((sum - 0.724).abs() < 1e-9, "{sum}");
        // Every sample line is a name, optional labels and a number.
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let value = line.rsplit(' ').next().unwrap();
            assert!(
                value.parse::<f64>().is_ok() || value == "+Inf" || value == "NaN",
                "{line}"
            );
        }
    }
}
