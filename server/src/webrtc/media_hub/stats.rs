//! Transport counters and latency summaries.

use std::collections::VecDeque;
use std::time::Duration;

use serde::Serialize;

use super::WINDOW;

/// Mean, median, 95th percentile and maximum of a measurement over its last 512 samples.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Summary {
    /// Samples ever recorded.
    pub count: u64,
    /// Mean over the window, milliseconds.
    pub mean_ms: f64,
    /// Median over the window, milliseconds.
    pub p50_ms: f64,
    /// 95th percentile over the window, milliseconds.
    pub p95_ms: f64,
    /// Largest in the window, milliseconds.
    pub max_ms: f64,
}

#[derive(Default)]
pub(super) struct Window {
    pub(super) values: VecDeque<f64>,
    pub(super) count: u64,
}

impl Window {
    pub(super) fn record(&mut self, d: Duration) {
        if self.values.len() == WINDOW {
            self.values.pop_front();
        }
        self.values.push_back(d.as_secs_f64() * 1e3);
        self.count += 1;
    }

    pub(super) fn summary(&self) -> Summary {
        if self.values.is_empty() {
            return Summary::default();
        }
        let mut sorted: Vec<f64> = self.values.iter().copied().collect();
        sorted.sort_by(f64::total_cmp);
        let at = |q: f64| sorted[((sorted.len() - 1) as f64 * q).round() as usize];
        Summary {
            count: self.count,
            mean_ms: sorted.iter().sum::<f64>() / sorted.len() as f64,
            p50_ms: at(0.5),
            p95_ms: at(0.95),
            max_ms: at(1.0),
        }
    }
}

/// Counters and timings of a [`MediaHub`].
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct TransportStats {
    /// A publisher session exists.
    pub publishing: bool,
    /// How the current or last publisher sends (`whip`, `duplex`, `rtmp`); `null` before the
    /// first.
    pub publisher_kind: Option<&'static str>,
    /// The input is paused (decoded pictures are not submitted).
    pub paused: bool,
    /// Viewers receiving frames.
    pub viewers: usize,
    /// Viewer sessions still connecting (their answer being made or sent, not yet connected).
    pub viewers_connecting: usize,
    /// Encoded-output subscribers outside WebRTC (HLS, RTMP push).
    pub sinks: usize,
    /// Publishers accepted: WHIP and duplex offers answered (201), RTMP publish requests
    /// accepted.
    pub publisher_offers_answered: u64,
    /// Publishers refused because the stream's publisher was connected or connecting (409 for
    /// an offer; an RTMP publish request is rejected).
    pub publisher_offers_refused: u64,
    /// Publisher sessions ended because they did not connect (within the connect timeout, or
    /// ICE/DTLS failed first).
    pub publishers_connect_failed: u64,
    /// Viewer offers answered (201).
    pub viewer_offers_answered: u64,
    /// Duplex offers answered (201): sessions that send the camera and receive the output on
    /// one connection.
    pub duplex_sessions_answered: u64,
    /// ICE candidates a duplex session's peer trickled after its offer.
    pub remote_candidates_added: u64,
    /// Trickled candidates taken but not added: mDNS host names (`….local`) while
    /// [`resolve_mdns_candidates`](crate::webrtc::TransportConfig::resolve_mdns_candidates) is
    /// off.
    pub remote_candidates_ignored: u64,
    /// Trickled candidates refused because their session had taken as many as it takes.
    pub remote_candidates_refused: u64,
    /// Duplex sessions ended because they did not connect (within the connect timeout, or
    /// ICE/DTLS failed first).
    pub duplex_connect_failed: u64,
    /// Data-channel messages received from duplex sessions.
    pub control_messages_received: u64,
    /// Data-channel messages sent to duplex sessions (replies and notices).
    pub control_messages_sent: u64,
    /// Viewer offers refused because every session was connected and the stream full (503).
    pub viewer_offers_refused: u64,
    /// Viewer sessions still connecting that were ended to make room for a newer offer.
    pub viewers_evicted: u64,
    /// Viewer sessions ended because they did not connect (within the connect timeout, or
    /// ICE/DTLS failed first).
    pub viewers_connect_failed: u64,
    /// RTP packets of the publishers' video tracks received.
    pub media_packets_received: u64,
    /// Their payload bytes.
    pub media_bytes_received: u64,
    /// Video RTP packets never received: the sequence numbers a publisher's track skipped
    /// (received packets, retransmissions included, subtracted from the span seen).
    pub media_packets_lost: u64,
    /// Interarrival jitter of the current publisher's video track (RFC 3550 §6.4.1), in
    /// milliseconds.
    pub media_jitter_ms: f64,
    /// Encoded bytes written to viewers' tracks (summed over viewers).
    pub media_bytes_sent: u64,
    /// Complete access units received from publishers.
    pub access_units_received: u64,
    /// Pictures dropped because packets were lost or malformed.
    pub pictures_damaged: u64,
    /// Access units dropped because the decoder was behind.
    pub access_units_dropped: u64,
    /// Pictures decoded and submitted to the engine.
    pub frames_submitted: u64,
    /// Pictures decoded while the input was paused, not submitted.
    pub frames_paused: u64,
    /// Access units the decoder rejected.
    pub decode_errors: u64,
    /// Keyframe requests (PLI) sent to publishers.
    pub plis_sent: u64,
    /// Keyframe requests (PLI/FIR) received from viewers.
    pub keyframe_requests_received: u64,
    /// Engine outputs taken by the transport.
    pub outputs: u64,
    /// Engine outputs encoded (there was at least one viewer).
    pub frames_encoded: u64,
    /// Of those, keyframes.
    pub keyframes_encoded: u64,
    /// Of those, keyframes made because one was asked for (a viewer joined, sent a PLI/FIR or
    /// missed frames) rather than by the encoder's periodic schedule.
    pub keyframes_on_request: u64,
    /// Frames written to viewers' tracks (summed over viewers).
    pub frames_sent: u64,
    /// Frames a viewer's queue had no room for.
    pub frames_dropped_for_viewers: u64,
    /// Frames handed to encoded-output sinks (summed over sinks).
    pub frames_to_sinks: u64,
    /// Frames a sink's queue had no room for.
    pub frames_dropped_for_sinks: u64,
    /// H.264 decode per picture.
    pub decode: Summary,
    /// Ingest per picture: access unit complete → submitted to the engine (decode queue,
    /// decode, RGB conversion, submit).
    pub ingest: Summary,
    /// Egress per output: taken from the engine → handed to the first viewer's track (encode,
    /// fan-out queue, packetization).
    pub send: Summary,
    /// H.264 encode per output.
    pub encode: Summary,
    /// Inside the engine but outside the pipeline call: input queue, hand-offs, output queue.
    pub engine_queueing: Summary,
    /// The pipeline call per output (the engine's own work on the frame).
    pub pipeline: Summary,
    /// The transport path's added latency per frame: from the publisher's access unit being
    /// complete to the output being handed to the first viewer's track, minus the pipeline
    /// call (decode + queueing + encode + fan-out).
    pub transport: Summary,
    /// Per output handed to a sink: taken from the engine → queued for the sink (encode and
    /// fan-out); what each sink adds after that (segmenting, sending) it reports itself.
    pub sink_delivery: Summary,
}

#[derive(Default)]
pub(super) struct StatsState {
    pub(super) counters: TransportStats,
    pub(super) decode: Window,
    pub(super) ingest: Window,
    pub(super) send: Window,
    pub(super) encode: Window,
    pub(super) engine_queueing: Window,
    pub(super) transport: Window,
    pub(super) sink_delivery: Window,
    pub(super) pipeline: Window,
    /// How the current or last publisher sends.
    pub(super) publisher_kind: Option<super::IngestKind>,
    /// Highest frame sequence number whose transport latency was recorded.
    pub(super) last_timed: Option<u64>,
    /// When the last publisher RTP packet arrived.
    pub(super) last_media: Option<std::time::Instant>,
    /// When the publisher was last seen to go (its session ended, or its connection lost
    /// contact); cleared when a publisher connects.
    pub(super) publisher_lost: Option<std::time::Instant>,
    /// A publisher's offer was ever answered.
    pub(super) ever_published: bool,
}
