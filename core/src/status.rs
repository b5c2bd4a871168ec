//! The status report, in Daydream's shape, that the threaded [`Engine`](crate::Engine) and the
//! synchronous [`StreamDiffusion`](crate::StreamDiffusion) both give, and the counters and meters
//! behind it.

use std::collections::VecDeque;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::params::catalog::{IMAGE_PROCESSORS, LATENT_PROCESSORS};

/// Wall-clock time of each stage of the last processed frame.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct StageTimings {
    /// Frame → tensor conversion and resize.
    pub preprocess: Duration,
    /// VAE/TAESD encode.
    pub encode: Duration,
    /// UNet (all rows of the stream batch, guidance included; ControlNets excluded).
    pub unet: Duration,
    /// ControlNets: control images (preprocessors) and the nets' forward passes.
    pub controlnet: Duration,
    /// VAE/TAESD decode.
    pub decode: Duration,
    /// Tensor → frame conversion.
    pub postprocess: Duration,
    /// The whole call.
    pub total: Duration,
    /// Each image processor's share: the ControlNets' preprocessors (inside `controlnet`) and
    /// the `image_preprocessing` / `image_postprocessing` chains; also `latent_feedback` and
    /// `safety_checker`.
    pub processors: ProcessorTimes,
    /// What the safety checker made of the frame.
    pub safety: SafetyFrame,
}

/// The safety checker's part in one frame.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct SafetyFrame {
    /// Whether the checker ran on this frame (it is on, and the frame was not skipped).
    pub checked: bool,
    /// Whether the frame was flagged (and replaced by black). A skipped frame repeats the
    /// previous output and its verdict.
    pub flagged: bool,
    /// The highest concept score (diffusers' rule flags above 0 at the default threshold).
    pub max_concept_score: f32,
}

/// The name the safety checker's time is reported under, beside the processors'.
pub const SAFETY_CHECKER: &str = "safety_checker";

const TIMED: usize = IMAGE_PROCESSORS.len() + LATENT_PROCESSORS.len() + 1;

/// Every name [`ProcessorTimes`] counts, in order: the image processors, the latent
/// processors, the safety checker.
fn timed_names() -> impl Iterator<Item = &'static &'static str> {
    IMAGE_PROCESSORS
        .iter()
        .chain(LATENT_PROCESSORS)
        .chain(std::iter::once(&SAFETY_CHECKER))
}

/// The position of `name` among the timed names.
fn timed_index(name: &str) -> Option<usize> {
    timed_names().position(|n| *n == name)
}

/// Time spent in each processor during one frame, by name (Daydream's processor names,
/// [`IMAGE_PROCESSORS`], then `latent_feedback` and `safety_checker`); a processor that ran
/// several times (two chains, two settings) sums, and the runs are counted.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ProcessorTimes {
    spent: [Option<Duration>; TIMED],
    runs: [u32; TIMED],
}

impl ProcessorTimes {
    /// Adds a run of `elapsed` to processor `name` (names outside the catalogue are not
    /// counted).
    pub fn add(&mut self, name: &str, elapsed: Duration) {
        if let Some(i) = timed_index(name) {
            let slot = &mut self.spent[i];
            *slot = Some(slot.unwrap_or_default() + elapsed);
            self.runs[i] += 1;
        }
    }

    /// How many times processor `name` ran.
    pub fn runs(&self, name: &str) -> u32 {
        timed_index(name).map_or(0, |i| self.runs[i])
    }

    /// Each processor that ran, with its time, in catalogue order.
    pub fn iter(&self) -> impl Iterator<Item = (&'static str, Duration)> + '_ {
        timed_names()
            .zip(&self.spent)
            .filter_map(|(name, spent)| spent.map(|d| (*name, d)))
    }

    /// The time of processor `name` (`None` when it did not run).
    pub fn get(&self, name: &str) -> Option<Duration> {
        self.spent[timed_index(name)?]
    }
}

/// Daydream's stream states.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum EngineState {
    /// The first pipeline (or one after a crash) is being built; frames wait in the queue.
    Loading,
    /// Serving frames.
    Online,
    /// Serving, but no frame was submitted for longer than the input timeout.
    DegradedInput,
    /// Serving, but within the last fps window a frame failed, or the output rate fell below
    /// half the input rate (the pipeline cannot keep up and frames are being dropped).
    DegradedInference,
    /// No pipeline and none being built: the load failed or the pipeline panicked.
    /// `last_error` says why; `restart()` or `update_params()` builds a new one.
    Error,
    /// Closed.
    Offline,
}

impl EngineState {
    /// Every state, in the order of the lifecycle.
    pub const ALL: [EngineState; 6] = [
        EngineState::Loading,
        EngineState::Online,
        EngineState::DegradedInput,
        EngineState::DegradedInference,
        EngineState::Error,
        EngineState::Offline,
    ];

    /// The name Daydream uses (`"ONLINE"`, …).
    pub fn as_str(self) -> &'static str {
        match self {
            EngineState::Loading => "LOADING",
            EngineState::Online => "ONLINE",
            EngineState::DegradedInput => "DEGRADED_INPUT",
            EngineState::DegradedInference => "DEGRADED_INFERENCE",
            EngineState::Error => "ERROR",
            EngineState::Offline => "OFFLINE",
        }
    }
}

impl std::fmt::Display for EngineState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// [`StageTimings`] in milliseconds, for the JSON report.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct StageMillis {
    /// Frame → tensor conversion and resize.
    pub preprocess: f64,
    /// VAE/TAESD encode.
    pub encode: f64,
    /// UNet, guidance included (ControlNets excluded).
    pub unet: f64,
    /// ControlNets: control images and the nets' forward passes.
    pub controlnet: f64,
    /// VAE/TAESD decode.
    pub decode: f64,
    /// Tensor → frame conversion.
    pub postprocess: f64,
    /// The whole pipeline call.
    pub total: f64,
}

impl From<StageTimings> for StageMillis {
    fn from(t: StageTimings) -> Self {
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        Self {
            preprocess: ms(t.preprocess),
            encode: ms(t.encode),
            unet: ms(t.unet),
            controlnet: ms(t.controlnet),
            decode: ms(t.decode),
            postprocess: ms(t.postprocess),
            total: ms(t.total),
        }
    }
}

/// What a running engine or stream reports. The first twelve fields are Daydream's status
/// fields (times in milliseconds since the Unix epoch, `null` until the event first happens);
/// the rest are sdstream's own. A synchronous [`StreamDiffusion`](crate::StreamDiffusion) has no
/// queues and builds nothing in the background: its queue, drop and build fields stay 0.
///
/// The frame counters always add up:
/// `frames_submitted = frames_processed + frames_failed + frames_dropped + queue_depth + frames_in_flight`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EngineStatus {
    /// Daydream's state.
    pub state: EngineState,
    /// Frames submitted per second over the fps window.
    pub input_fps: f64,
    /// Frames processed per second over the fps window.
    pub output_fps: f64,
    /// When the last frame was submitted.
    pub last_input_time: Option<u64>,
    /// When the last output was produced.
    pub last_output_time: Option<u64>,
    /// The last accepted parameters (every field), as JSON. After a failed reload these are
    /// the parameters of the pipeline that kept serving.
    pub last_params: serde_json::Value,
    /// FNV-1a 64 of `last_params` as written by `StreamDiffusionParams::to_json`, 16 hex digits.
    pub last_params_hash: String,
    /// When parameters were last accepted (`null`: the ones the engine was created with).
    pub last_params_update_time: Option<u64>,
    /// The last error: a failed load or reload, a failed frame, a panic.
    pub last_error: Option<String>,
    /// When it happened.
    pub last_error_time: Option<u64>,
    /// Pipelines swapped in after the first one (reloads and restarts).
    pub restart_count: u64,
    /// When the last such swap happened.
    pub last_restart_time: Option<u64>,

    /// Version of the last accepted parameters (0: the initial ones; +1 per accepted change).
    pub params_version: u64,
    /// Version of the parameters the serving pipeline runs (`null` while none serves).
    pub serving_params_version: Option<u64>,
    /// Whether a new pipeline is being built beside the serving one (or as the first one).
    pub reloading: bool,
    /// The last progress line of the build in progress.
    pub progress: Option<String>,
    /// Stage timings of the last processed frame.
    pub timings: StageMillis,
    /// Milliseconds each image processor took in the last processed frame, by Daydream's
    /// processor name (ControlNet preprocessors and the image pre/postprocessing chains; a
    /// processor several nets share runs, and counts, once).
    #[serde(default)]
    pub processor_ms: std::collections::BTreeMap<String, f64>,
    /// Frames waiting in the input queue.
    pub queue_depth: usize,
    /// Most frames the input queue holds.
    pub queue_capacity: usize,
    /// Outputs waiting to be collected.
    pub output_queue_depth: usize,
    /// Frames accepted by `submit`.
    pub frames_submitted: u64,
    /// Frames that produced an output.
    pub frames_processed: u64,
    /// Frames that failed in the pipeline (no output; see `last_error`).
    pub frames_failed: u64,
    /// Frames dropped before processing: overflow under the `latest` policy, `flush()`, or no
    /// pipeline left to run them (ERROR, close).
    pub frames_dropped: u64,
    /// Frames being processed right now (0 or 1).
    pub frames_in_flight: u64,
    /// Outputs discarded uncollected because the output queue was full (`latest` policy).
    pub outputs_dropped: u64,
    /// Errors recorded (each one replaced `last_error`).
    pub error_count: u64,
    /// Reloads that failed (the previous pipeline kept serving).
    pub reload_failures: u64,
    /// Builds discarded because a newer update superseded them.
    pub builds_superseded: u64,
    /// Frames whose control images (the preprocessors' part) were made on a helper thread
    /// while the frame before them diffused.
    #[serde(default)]
    pub frames_prepared_ahead: u64,
    /// Outputs the safety checker looked at (`use_safety_checker`).
    #[serde(default)]
    pub safety_frames_checked: u64,
    /// Outputs it flagged and replaced by black.
    #[serde(default)]
    pub safety_frames_flagged: u64,
    /// Every processed frame's latency, from the frame in (`submit`, or the call) to its
    /// output, counted into buckets.
    #[serde(default)]
    pub frame_latency: LatencyHistogram,
    /// Percentiles of the latencies of the last frames (up to [`RECENT_LATENCIES`]), what a
    /// stream's budget is held against.
    #[serde(default)]
    pub latency_ms: LatencyPercentiles,
}

/// How many of the last frame latencies [`LatencyPercentiles`] are taken over.
pub const RECENT_LATENCIES: usize = 256;

/// Percentiles of recent frame latencies, in milliseconds (`null` before any frame).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct LatencyPercentiles {
    /// The frames they are taken over.
    pub frames: usize,
    /// Median.
    pub p50: Option<f64>,
    /// 90th percentile.
    pub p90: Option<f64>,
    /// 99th percentile.
    pub p99: Option<f64>,
}

/// The last [`RECENT_LATENCIES`] frame latencies.
#[derive(Debug, Clone, Default)]
pub(crate) struct RecentLatencies {
    seconds: VecDeque<f64>,
}

impl RecentLatencies {
    pub(crate) fn record(&mut self, latency: Duration) {
        if self.seconds.len() == RECENT_LATENCIES {
            self.seconds.pop_front();
        }
        self.seconds.push_back(latency.as_secs_f64());
    }

    /// Nearest-rank percentiles.
    pub(crate) fn percentiles(&self) -> LatencyPercentiles {
        let mut sorted: Vec<f64> = self.seconds.iter().copied().collect();
        sorted.sort_by(f64::total_cmp);
        let at = |p: f64| -> Option<f64> {
            let n = sorted.len();
            (n > 0).then(|| {
                let rank = ((p * n as f64).ceil() as usize).clamp(1, n);
                sorted[rank - 1] * 1e3
            })
        };
        LatencyPercentiles {
            frames: sorted.len(),
            p50: at(0.50),
            p90: at(0.90),
            p99: at(0.99),
        }
    }
}

/// Upper bounds of [`LatencyHistogram`]'s buckets, in seconds: around a frame at 30 to 200 fps,
/// and out to the seconds a CPU takes.
pub const LATENCY_BUCKETS_SECONDS: [f64; 14] = [
    0.005, 0.01, 0.02, 0.033, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// Frame latencies counted into the buckets of [`LATENCY_BUCKETS_SECONDS`] (what a Prometheus
/// histogram reports), with their count and sum.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LatencyHistogram {
    /// The buckets' upper bounds, in seconds ([`LATENCY_BUCKETS_SECONDS`]).
    pub bounds_seconds: Vec<f64>,
    /// `counts[i]`: latencies above `bounds_seconds[i - 1]` and at most `bounds_seconds[i]`;
    /// one more entry than bounds, for those above the last.
    pub counts: Vec<u64>,
    /// Latencies counted.
    pub count: u64,
    /// Their sum, in seconds.
    pub sum_seconds: f64,
}

impl Default for LatencyHistogram {
    fn default() -> Self {
        Self {
            bounds_seconds: LATENCY_BUCKETS_SECONDS.to_vec(),
            counts: vec![0; LATENCY_BUCKETS_SECONDS.len() + 1],
            count: 0,
            sum_seconds: 0.0,
        }
    }
}

impl LatencyHistogram {
    /// Counts one latency.
    pub fn record(&mut self, latency: Duration) {
        let seconds = latency.as_secs_f64();
        let bucket = self
            .bounds_seconds
            .iter()
            .position(|&bound| seconds <= bound)
            .unwrap_or(self.bounds_seconds.len());
        if let Some(count) = self.counts.get_mut(bucket) {
            *count += 1;
        }
        self.count += 1;
        self.sum_seconds += seconds;
    }

    /// `(bound, latencies at most bound)` for each bound, then `(+∞, count)`: the cumulative
    /// buckets of Prometheus' text format.
    pub fn cumulative(&self) -> Vec<(f64, u64)> {
        let mut total = 0;
        let mut out: Vec<(f64, u64)> = self
            .bounds_seconds
            .iter()
            .zip(&self.counts)
            .map(|(&bound, &n)| {
                total += n;
                (bound, total)
            })
            .collect();
        out.push((f64::INFINITY, self.count));
        out
    }
}

/// The frame and error counters both reports share, kept where frames are processed.
#[derive(Debug)]
pub(crate) struct Activity {
    pub(crate) frames_submitted: u64,
    pub(crate) frames_processed: u64,
    pub(crate) frames_failed: u64,
    pub(crate) error_count: u64,
    pub(crate) last_error: Option<String>,
    pub(crate) last_error_time: Option<u64>,
    pub(crate) last_input: Option<Instant>,
    pub(crate) last_input_time: Option<u64>,
    pub(crate) last_output_time: Option<u64>,
    pub(crate) last_failure: Option<Instant>,
    pub(crate) timings: StageTimings,
    pub(crate) safety_frames_checked: u64,
    pub(crate) safety_frames_flagged: u64,
    pub(crate) input_meter: RateMeter,
    pub(crate) output_meter: RateMeter,
    pub(crate) frame_latency: LatencyHistogram,
    pub(crate) recent_latency: RecentLatencies,
}

impl Activity {
    /// Counters at zero; the fps meters average over `fps_window`.
    pub(crate) fn new(fps_window: Duration) -> Self {
        Self {
            frames_submitted: 0,
            frames_processed: 0,
            frames_failed: 0,
            error_count: 0,
            last_error: None,
            last_error_time: None,
            last_input: None,
            last_input_time: None,
            last_output_time: None,
            last_failure: None,
            timings: StageTimings::default(),
            safety_frames_checked: 0,
            safety_frames_flagged: 0,
            input_meter: RateMeter::new(fps_window),
            output_meter: RateMeter::new(fps_window),
            frame_latency: LatencyHistogram::default(),
            recent_latency: RecentLatencies::default(),
        }
    }

    /// A frame came in.
    pub(crate) fn frame_in(&mut self, now: Instant) {
        self.frames_submitted += 1;
        self.input_meter.record(now);
        self.last_input = Some(now);
        self.last_input_time = Some(epoch_ms());
    }

    /// A frame came out, made in `timings`, `latency` after it came in.
    pub(crate) fn frame_out(&mut self, now: Instant, timings: StageTimings, latency: Duration) {
        self.frames_processed += 1;
        self.frame_latency.record(latency);
        self.recent_latency.record(latency);
        self.output_meter.record(now);
        self.last_output_time = Some(epoch_ms());
        self.timings = timings;
        if timings.safety.checked {
            self.safety_frames_checked += 1;
            self.safety_frames_flagged += u64::from(timings.safety.flagged);
        }
    }

    /// A frame failed with `message`.
    pub(crate) fn frame_failed(&mut self, now: Instant, message: String) {
        self.frames_failed += 1;
        self.last_failure = Some(now);
        self.error(message);
    }

    /// Something went wrong (a frame, an update, a load); `message` becomes `last_error`.
    pub(crate) fn error(&mut self, message: String) {
        self.error_count += 1;
        self.last_error = Some(message);
        self.last_error_time = Some(epoch_ms());
    }

    /// A report with these counters; the caller sets the state, parameters and what else it
    /// knows (queues, builds, versions).
    pub(crate) fn report(&self, now: Instant, state: EngineState) -> EngineStatus {
        EngineStatus {
            state,
            input_fps: self.input_meter.rate(now),
            output_fps: self.output_meter.rate(now),
            last_input_time: self.last_input_time,
            last_output_time: self.last_output_time,
            last_params: serde_json::Value::Null,
            last_params_hash: String::new(),
            last_params_update_time: None,
            last_error: self.last_error.clone(),
            last_error_time: self.last_error_time,
            restart_count: 0,
            last_restart_time: None,
            params_version: 0,
            serving_params_version: None,
            reloading: false,
            progress: None,
            timings: self.timings.into(),
            processor_ms: self
                .timings
                .processors
                .iter()
                .map(|(name, spent)| (name.to_string(), spent.as_secs_f64() * 1e3))
                .collect(),
            queue_depth: 0,
            queue_capacity: 0,
            output_queue_depth: 0,
            frames_submitted: self.frames_submitted,
            frames_processed: self.frames_processed,
            frames_failed: self.frames_failed,
            frames_dropped: 0,
            frames_in_flight: 0,
            outputs_dropped: 0,
            error_count: self.error_count,
            reload_failures: 0,
            builds_superseded: 0,
            frames_prepared_ahead: 0,
            safety_frames_checked: self.safety_frames_checked,
            safety_frames_flagged: self.safety_frames_flagged,
            frame_latency: self.frame_latency.clone(),
            latency_ms: self.recent_latency.percentiles(),
        }
    }
}

/// Events per second over a sliding window.
#[derive(Debug)]
pub(crate) struct RateMeter {
    window: Duration,
    events: VecDeque<Instant>,
}

impl RateMeter {
    /// Most events remembered, whatever the window (bounds memory at very high rates).
    const MAX_EVENTS: usize = 4096;

    pub(crate) fn new(window: Duration) -> Self {
        Self {
            window,
            events: VecDeque::new(),
        }
    }

    pub(crate) fn record(&mut self, now: Instant) {
        if self.events.len() >= Self::MAX_EVENTS {
            self.events.pop_front();
        }
        self.events.push_back(now);
        self.prune(now);
    }

    fn prune(&mut self, now: Instant) {
        while let Some(&first) = self.events.front() {
            if now.saturating_duration_since(first) > self.window {
                self.events.pop_front();
            } else {
                break;
            }
        }
    }

    /// (n − 1) / (last − first) over the events inside the window; 0 with fewer than two.
    pub(crate) fn rate(&self, now: Instant) -> f64 {
        let inside = self
            .events
            .iter()
            .skip_while(|&&t| now.saturating_duration_since(t) > self.window);
        let (mut first, mut last, mut n) = (None, None, 0usize);
        for &t in inside {
            first.get_or_insert(t);
            last = Some(t);
            n += 1;
        }
        match (first, last) {
            (Some(first), Some(last)) if n >= 2 => {
                let span = last.saturating_duration_since(first).as_secs_f64();
                if span > 0.0 {
                    (n - 1) as f64 / span
                } else {
                    0.0
                }
            }
            _ => 0.0,
        }
    }
}

/// Milliseconds since the Unix epoch now (0 if the clock is before it).
pub(crate) fn epoch_ms() -> u64 {
    epoch_ms_at(SystemTime::now())
}

/// `at` in milliseconds since the Unix epoch (0 before it), as the status's times are given.
pub fn epoch_ms_at(at: SystemTime) -> u64 {
    at.duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// RFC 3339 UTC with milliseconds (`2025-01-31T12:00:00.000Z`), as Daydream's `created_at`.
pub fn rfc3339(at: SystemTime) -> String {
    let since = at.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs() as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60,
        since.subsec_millis()
    )
}

/// Microseconds since the Unix epoch (0 if the clock is before it).
pub(crate) fn epoch_us() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}

/// FNV-1a 64 of `text`, as 16 hex digits: stable across runs, platforms and builds.
pub(crate) fn params_hash(text: &str) -> String {
    format!("{:016x}", fnv1a(text.as_bytes()))
}

/// FNV-1a 64 of `bytes`: a hash that stays the same across runs, platforms and builds (what
/// reports and folder names keyed by it need).
pub(crate) fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, &byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn latency_percentiles_are_nearest_rank_over_the_last_frames() {
        let mut recent = super::RecentLatencies::default();
        assert_eq!(recent.percentiles().p50, None);
        // 1..=300 ms: only the last 256 (45..=300) count.
        for ms in 1..=300u64 {
            recent.record(Duration::from_millis(ms));
        }
        let p = recent.percentiles();
        assert_eq!(p.frames, 256);
        let ms = |v: Option<f64>| v.map(|v| (v * 1e3).round() / 1e3);
        // ranks ceil(0.5·256) = 128, ceil(0.9·256) = 231, ceil(0.99·256) = 254.
        assert_eq!(ms(p.p50), Some(172.0));
        assert_eq!(ms(p.p90), Some(275.0));
        assert_eq!(ms(p.p99), Some(298.0));
    }

    use super::*;

    #[test]
    fn fnv1a_matches_the_published_vectors() {
        // Test vectors of the FNV reference (draft-eastlake-fnv).
        assert_eq!(params_hash(""), "cbf29ce484222325");
        assert_eq!(params_hash("a"), "af63dc4c8601ec8c");
        assert_eq!(params_hash("foobar"), "85944171f73967e8");
    }

    #[test]
    fn latencies_land_in_the_bucket_whose_bound_they_do_not_exceed() {
        let mut h = LatencyHistogram::default();
        // Exactly on a bound counts in that bucket; past the last, in the overflow.
        for ms in [1, 5, 6, 33, 34, 31_000] {
            h.record(Duration::from_millis(ms));
        }
        assert_eq!(h.count, 6);
        assert!((h.sum_seconds - 31.079).abs() < 1e-9, "{}", h.sum_seconds);
        assert_eq!(h.counts.len(), LATENCY_BUCKETS_SECONDS.len() + 1);
        assert_eq!(h.counts[0], 2, "1 ms and 5 ms are at most 5 ms");
        assert_eq!(h.counts[1], 1, "6 ms");
        assert_eq!(h.counts[3], 1, "33 ms");
        assert_eq!(h.counts[4], 1, "34 ms");
        assert_eq!(h.counts[LATENCY_BUCKETS_SECONDS.len()], 1, "31 s");
        let cumulative = h.cumulative();
        assert_eq!(cumulative.len(), LATENCY_BUCKETS_SECONDS.len() + 1);
        assert_eq!(cumulative[0], (0.005, 2));
        assert_eq!(cumulative[4], (0.05, 5));
        assert_eq!(cumulative[LATENCY_BUCKETS_SECONDS.len() - 1], (30.0, 5));
        assert_eq!(cumulative.last(), Some(&(f64::INFINITY, 6)));
        assert!(cumulative.windows(2).all(|w| w[0].1 <= w[1].1));
    }

    #[test]
    fn rate_meter_counts_events_inside_the_window() {
        let mut meter = RateMeter::new(Duration::from_secs(1));
        let t0 = Instant::now();
        for i in 0..11 {
            meter.record(t0 + Duration::from_millis(50 * i));
        }
        // 11 events over 0.5 s: 20 per second.
        let rate = meter.rate(t0 + Duration::from_millis(500));
        assert!((rate - 20.0).abs() < 1e-9, "rate {rate}");
        // Two seconds later everything has left the window.
        assert_eq!(meter.rate(t0 + Duration::from_millis(2600)), 0.0);
    }

    #[test]
    fn states_serialise_with_daydream_names() {
        let names: Vec<String> = EngineState::ALL
            .iter()
            .map(|s| {
                let json = serde_json::to_string(s).unwrap_or_default();
                assert_eq!(json, format!("\"{}\"", s.as_str()));
                json
            })
            .collect();
        assert_eq!(names.len(), 6);
    }
}
