//! One stream's HLS output: a segmenter task that subscribes to the stream's encoded output
//! while anyone reads the playlist or its segments, cuts a segment at the first keyframe after
//! each `segment_target` (asking the encoder for that keyframe), and keeps the newest
//! segments in memory for the playlist.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use serde::Serialize;
use tokio::sync::watch;

use super::ts::TsMuxer;
use crate::webrtc::{EncodedFrame, MediaHub, Summary};

/// How a stream's HLS output is cut and kept.
#[derive(Debug, Clone, PartialEq)]
pub struct HlsConfig {
    /// A segment ends at the first keyframe after this long (default 1 s: short segments for
    /// low latency; players start about three segments behind the newest).
    pub segment_target: Duration,
    /// Segments listed in the playlist (default 4).
    pub playlist_segments: usize,
    /// Segments kept for players a little behind the playlist (default 8, at least
    /// `playlist_segments`).
    pub kept_segments: usize,
    /// The segmenter stops (and stops costing an encode) when nobody has asked for the
    /// playlist or a segment for this long (default 30 s); the next request starts it again.
    pub idle_stop: Duration,
}

impl Default for HlsConfig {
    fn default() -> Self {
        Self {
            segment_target: Duration::from_secs(1),
            playlist_segments: 4,
            kept_segments: 8,
            idle_stop: Duration::from_secs(30),
        }
    }
}

/// One finished segment.
#[derive(Debug)]
struct Segment {
    seq: u64,
    data: Bytes,
    /// Seconds, from its first picture's timestamp to the next segment's.
    duration: f64,
    /// Wall-clock time of its first picture.
    program_date: SystemTime,
}

/// Counters and timings of a stream's HLS output.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct HlsStats {
    /// The segmenter is running (someone has been reading).
    pub running: bool,
    /// Segments made.
    pub segments: u64,
    /// Pictures muxed.
    pub frames: u64,
    /// Segment bytes made.
    pub bytes: u64,
    /// Playlist requests answered.
    pub playlist_requests: u64,
    /// Segment requests answered.
    pub segment_requests: u64,
    /// Segment requests for segments no longer (or not yet) kept.
    pub segments_missing: u64,
    /// Segment durations.
    pub segment_duration: Summary,
    /// Per picture: encoded → its segment published (the wait for the segment to end).
    pub delivery: Summary,
}

struct State {
    segments: VecDeque<Arc<Segment>>,
    next_seq: u64,
    last_request: Instant,
    stats: HlsStats,
    durations: VecDeque<f64>,
    delivery: VecDeque<f64>,
}

/// A stream's HLS output (see the module docs).
pub struct HlsOutput {
    stream: Arc<MediaHub>,
    config: HlsConfig,
    state: Mutex<State>,
    running: AtomicBool,
    /// Bumped with every published segment.
    published: watch::Sender<u64>,
}

impl std::fmt::Debug for HlsOutput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HlsOutput")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

const WINDOW: usize = 512;

fn record(window: &mut VecDeque<f64>, value: f64) {
    if window.len() == WINDOW {
        window.pop_front();
    }
    window.push_back(value);
}

fn summarize(window: &VecDeque<f64>, count: u64) -> Summary {
    if window.is_empty() {
        return Summary::default();
    }
    let mut v: Vec<f64> = window.iter().copied().collect();
    v.sort_by(f64::total_cmp);
    let at = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize];
    Summary {
        count,
        mean_ms: v.iter().sum::<f64>() / v.len() as f64,
        p50_ms: at(0.5),
        p95_ms: at(0.95),
        max_ms: at(1.0),
    }
}

impl HlsOutput {
    /// The HLS output of `stream` (the segmenter starts on the first request).
    pub fn new(stream: Arc<MediaHub>, config: HlsConfig) -> Arc<Self> {
        let (published, _) = watch::channel(0);
        Arc::new(Self {
            stream,
            config,
            state: Mutex::new(State {
                segments: VecDeque::new(),
                next_seq: 0,
                last_request: Instant::now(),
                stats: HlsStats::default(),
                durations: VecDeque::new(),
                delivery: VecDeque::new(),
            }),
            running: AtomicBool::new(false),
            published,
        })
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Counters and timings.
    pub fn stats(&self) -> HlsStats {
        let s = self.state();
        let mut stats = s.stats.clone();
        stats.running = self.running.load(Ordering::Acquire);
        stats.segment_duration = summarize(&s.durations, stats.segments);
        stats.delivery = summarize(&s.delivery, stats.frames);
        stats
    }

    /// Notes a request and starts the segmenter if it is not running.
    fn touch(self: &Arc<Self>) {
        self.state().last_request = Instant::now();
        if !self.running.swap(true, Ordering::AcqRel) {
            let output = self.clone();
            tokio::spawn(async move { output.run().await });
        }
    }

    /// The playlist, once it lists at least one segment: waits up to `wait` for the first
    /// (`None` if none was made by then: nothing is being published, or the engine is still
    /// loading). `segment_uri` names segment `n` (relative to the playlist).
    pub async fn playlist(
        self: &Arc<Self>,
        wait: Duration,
        segment_uri: impl Fn(u64) -> String,
    ) -> Option<String> {
        self.touch();
        let mut published = self.published.subscribe();
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            if !self.state().segments.is_empty() {
                break;
            }
            if tokio::time::timeout_at(deadline, published.changed())
                .await
                .is_err()
            {
                return None;
            }
        }
        let mut s = self.state();
        s.stats.playlist_requests += 1;
        let listed: Vec<Arc<Segment>> = s
            .segments
            .iter()
            .rev()
            .take(self.config.playlist_segments.max(1))
            .rev()
            .cloned()
            .collect();
        drop(s);
        Some(render_playlist(&self.config, &listed, segment_uri))
    }

    /// Segment `seq`, while it is kept.
    pub fn segment(self: &Arc<Self>, seq: u64) -> Option<Bytes> {
        self.touch();
        let mut s = self.state();
        let found = s
            .segments
            .iter()
            .find(|segment| segment.seq == seq)
            .map(|segment| segment.data.clone());
        match found {
            Some(_) => s.stats.segment_requests += 1,
            None => s.stats.segments_missing += 1,
        }
        found
    }

    /// The segmenter: runs while requests keep coming, then lets the stream stop encoding.
    async fn run(self: Arc<Self>) {
        tracing::info!("HLS segmenter started");
        let outcome = self.segment_until_idle().await;
        if let Err(e) = outcome {
            tracing::warn!(error = %e, "HLS segmenter stopped");
        }
        // Nobody has read for `idle_stop`: a player that comes back starts from fresh
        // segments (the media sequence goes on), so none of these is needed any more.
        self.state().segments.clear();
        self.running.store(false, Ordering::Release);
        tracing::info!("HLS segmenter stopped (no requests)");
    }

    async fn segment_until_idle(&self) -> Result<(), String> {
        let mut sink = self.stream.subscribe_encoded().map_err(|e| e.to_string())?;
        let mut muxer = TsMuxer::new();
        let mut origin: Option<Instant> = None;
        // The segment being made: bytes, its first PTS, wall-clock start, and its pictures'
        // encode times (for the delivery latency).
        let mut current: Option<(Vec<u8>, u64, SystemTime, Vec<Instant>)> = None;
        loop {
            let idle = self.state().last_request.elapsed() > self.config.idle_stop;
            if idle {
                return Ok(());
            }
            let frame = match sink.recv_timeout(Duration::from_millis(500)).await {
                Ok(Some(frame)) => frame,
                Ok(None) => continue,
                Err(()) => return Err("the stream closed".into()),
            };
            let origin = *origin.get_or_insert(frame.taken);
            // 1 s of headroom so that PCR and PTS start well above 0.
            let pts = 90_000
                + (frame.taken.saturating_duration_since(origin).as_micros() as u64 * 9 / 100);
            if frame.keyframe
                && let Some((_, start_pts, _, _)) = &current
                && pts.saturating_sub(*start_pts) as f64 / 90_000.0
                    >= self.config.segment_target.as_secs_f64() * 0.999
            {
                let (data, start, date, encoded) = current.take().expect("checked above");
                self.publish(data, (pts - start) as f64 / 90_000.0, date, &encoded);
            }
            if current.is_none() {
                // `recv` hands out a keyframe first and after every gap.
                let mut data = Vec::with_capacity(256 * 1024);
                muxer.write_tables(&mut data)?;
                current = Some((data, pts, wall_clock(&frame), Vec::new()));
            }
            let (data, start, _, encoded) = current.as_mut().expect("set above");
            muxer.write_picture(data, &frame.data, frame.keyframe, pts)?;
            encoded.push(frame.encoded);
            self.state().stats.frames += 1;
            let elapsed = pts.saturating_sub(*start) as f64 / 90_000.0;
            if elapsed + frame.duration.as_secs_f64() >= self.config.segment_target.as_secs_f64() {
                // The next picture should start the next segment.
                sink.request_keyframe();
            }
        }
    }

    fn publish(&self, data: Vec<u8>, duration: f64, program_date: SystemTime, encoded: &[Instant]) {
        let now = Instant::now();
        let seq = {
            let mut s = self.state();
            let seq = s.next_seq;
            s.next_seq += 1;
            s.stats.segments += 1;
            s.stats.bytes += data.len() as u64;
            record(&mut s.durations, duration * 1e3);
            for at in encoded {
                record(
                    &mut s.delivery,
                    now.saturating_duration_since(*at).as_secs_f64() * 1e3,
                );
            }
            s.segments.push_back(Arc::new(Segment {
                seq,
                data: Bytes::from(data),
                duration,
                program_date,
            }));
            let keep = self
                .config
                .kept_segments
                .max(self.config.playlist_segments)
                .max(1);
            while s.segments.len() > keep {
                s.segments.pop_front();
            }
            seq
        };
        self.published.send_replace(seq + 1);
    }
}

/// The live playlist listing `listed` (oldest first).
fn render_playlist(
    config: &HlsConfig,
    listed: &[Arc<Segment>],
    segment_uri: impl Fn(u64) -> String,
) -> String {
    // A segment ends at the first keyframe after the target, which the encoder makes
    // within a picture or two of being asked: twice the target bounds every segment, so
    // the target duration never has to change (RFC 8216 §4.3.3.1).
    let target = (config.segment_target.as_secs_f64() * 2.0).ceil().max(1.0) as u64;
    let first = listed.first().map_or(0, |s| s.seq);
    let mut text = String::with_capacity(256 + listed.len() * 128);
    text.push_str("#EXTM3U\n#EXT-X-VERSION:3\n");
    text.push_str(&format!("#EXT-X-TARGETDURATION:{target}\n"));
    text.push_str(&format!("#EXT-X-MEDIA-SEQUENCE:{first}\n"));
    for segment in listed {
        text.push_str(&format!(
            "#EXT-X-PROGRAM-DATE-TIME:{}\n#EXTINF:{:.3},\n{}\n",
            sdstream::status::rfc3339(segment.program_date),
            segment.duration,
            segment_uri(segment.seq)
        ));
    }
    text
}

/// The wall-clock time at which `frame` was taken from the engine.
fn wall_clock(frame: &EncodedFrame) -> SystemTime {
    SystemTime::now()
        .checked_sub(frame.taken.elapsed())
        .unwrap_or_else(SystemTime::now)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn segment(seq: u64, duration: f64) -> Arc<Segment> {
        Arc::new(Segment {
            seq,
            data: Bytes::new(),
            duration,
            program_date: SystemTime::UNIX_EPOCH
                + Duration::from_millis(1_700_000_000_123 + seq * 1000),
        })
    }

    #[test]
    fn the_playlist_lists_segments_with_a_fixed_target() {
        let config = HlsConfig {
            segment_target: Duration::from_millis(1500),
            ..HlsConfig::default()
        };
        let text = render_playlist(&config, &[segment(7, 1.52), segment(8, 1.5)], |n| {
            format!("{n}.ts?token=k")
        });
        assert_eq!(
            text,
            "#EXTM3U\n#EXT-X-VERSION:3\n#EXT-X-TARGETDURATION:3\n#EXT-X-MEDIA-SEQUENCE:7\n\
             #EXT-X-PROGRAM-DATE-TIME:2023-11-14T22:13:27.123Z\n#EXTINF:1.520,\n7.ts?token=k\n\
             #EXT-X-PROGRAM-DATE-TIME:2023-11-14T22:13:28.123Z\n#EXTINF:1.500,\n8.ts?token=k\n"
        );
        // 200 ms segments still get a whole second of target duration.
        let short = HlsConfig {
            segment_target: Duration::from_millis(200),
            ..HlsConfig::default()
        };
        let text = render_playlist(&short, &[segment(0, 0.2)], |n| format!("{n}.ts"));
        assert!(text.contains("#EXT-X-TARGETDURATION:1\n"), "{text}");
    }
}
