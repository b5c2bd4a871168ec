//! [`WebRtcStream`]: one engine's publisher and viewers, and the threads between them.
//!
//! Ingest: RTP packets (network task) → access units → decode thread → `Engine::submit`.
//! Egress: pump thread (`Engine::recv_timeout`) → one H.264 encode → a bounded queue per
//! viewer → the viewer's task packetizes and sends. A viewer that falls behind loses frames
//! from its own queue (and waits for the next keyframe); it never slows the others down.

use std::collections::hash_map::RandomState;
use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::Bytes;
use rtc::media::Sample;
use rtc::media_stream::MediaStreamTrack;
use rtc::rtcp::payload_feedbacks::picture_loss_indication::PictureLossIndication;
use rtc::rtp_transceiver::rtp_sender::{
    RTCRtpCodingParameters, RTCRtpEncodingParameters, RtpCodecKind,
};
use rtc::rtp_transceiver::{RTCRtpTransceiverDirection, RTCRtpTransceiverInit};
use serde::Serialize;
use tokio::sync::mpsc;
use webrtc::media_stream::track_local::static_sample::TrackLocalStaticSample;
use webrtc::media_stream::track_local::{TrackLocal, TrackLocalEvent};
use webrtc::media_stream::track_remote::{TrackRemote, TrackRemoteEvent};
use webrtc::peer_connection::{PeerConnection, RTCPeerConnectionState};

use super::h264::{H264Decoder, H264Encoder};
use super::peer;
use super::rtp::{AccessUnitAssembler, Assembled};
use super::{TransportConfig, TransportError};
use crate::engine::{FrameId, Output};
use crate::{Engine, Frame, PixelFormat};

/// Largest access unit accepted from a publisher (a 4K intra picture fits).
const MAX_ACCESS_UNIT_BYTES: usize = 8 << 20;
/// Access units waiting for the decoder; more means the decoder cannot keep up, and the
/// newest are dropped (with a keyframe request) rather than delaying everything.
const DECODE_QUEUE: usize = 4;
/// Encoded frames waiting per viewer.
const VIEWER_QUEUE: usize = 8;
/// At most one PLI to the publisher per this interval.
const PLI_INTERVAL: Duration = Duration::from_millis(250);
/// A viewer that has not connected after this long is dropped.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// Samples kept for the latency summaries.
const WINDOW: usize = 512;

/// The answer to a WHIP or WHEP offer.
#[derive(Debug, Clone)]
pub struct SessionAnswer {
    /// Identifies the session (the last segment of its `Location`).
    pub session_id: String,
    /// The SDP answer, with every ICE candidate.
    pub sdp: String,
}

/// Sees every frame that crosses the transport, for recording and tests. Called on the
/// decode and pump threads: keep it quick.
pub trait FrameObserver: Send + Sync {
    /// A decoded publisher picture was submitted to the engine as frame `id` (packed RGB8).
    fn on_input(&self, id: FrameId, width: usize, height: usize, rgb: &[u8]);
    /// The engine produced `output` (before it is encoded for the viewers).
    fn on_output(&self, output: &Output);
}

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
struct Window {
    values: VecDeque<f64>,
    count: u64,
}

impl Window {
    fn record(&mut self, d: Duration) {
        if self.values.len() == WINDOW {
            self.values.pop_front();
        }
        self.values.push_back(d.as_secs_f64() * 1e3);
        self.count += 1;
    }

    fn summary(&self) -> Summary {
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

/// Counters and timings of a [`WebRtcStream`].
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct TransportStats {
    /// A publisher session exists.
    pub publishing: bool,
    /// Viewers receiving frames.
    pub viewers: usize,
    /// Viewer sessions still connecting.
    pub viewers_connecting: usize,
    /// Complete access units received from publishers.
    pub access_units_received: u64,
    /// Pictures dropped because packets were lost or malformed.
    pub pictures_damaged: u64,
    /// Access units dropped because the decoder was behind.
    pub access_units_dropped: u64,
    /// Pictures decoded and submitted to the engine.
    pub frames_submitted: u64,
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
    /// The transport path's added latency per frame: from the publisher's access unit being
    /// complete to the output being handed to the first viewer's track, minus the pipeline
    /// call (decode + queueing + encode + fan-out).
    pub transport: Summary,
}

#[derive(Default)]
struct StatsState {
    counters: TransportStats,
    decode: Window,
    ingest: Window,
    send: Window,
    encode: Window,
    engine_queueing: Window,
    transport: Window,
    /// Highest frame sequence number whose transport latency was recorded.
    last_timed: Option<u64>,
}

/// One encoded output on its way to the viewers.
struct EncodedFrame {
    seq: u64,
    data: Bytes,
    keyframe: bool,
    duration: Duration,
    /// When the publisher's access unit was complete.
    arrived: Instant,
    /// When the pump took the output from the engine.
    taken: Instant,
    /// The pipeline call's own time.
    pipeline: Duration,
}

struct PublisherSlot {
    id: String,
    connection: Arc<dyn PeerConnection>,
}

struct ViewerSlot {
    connection: Arc<dyn PeerConnection>,
    /// Set once connected: the viewer's frame queue.
    frames: Option<mpsc::Sender<Arc<EncodedFrame>>>,
}

struct Shared {
    engine: Arc<Engine>,
    config: TransportConfig,
    observer: Option<Arc<dyn FrameObserver>>,
    publisher: Mutex<Option<PublisherSlot>>,
    viewers: Mutex<HashMap<String, ViewerSlot>>,
    keyframe_wanted: AtomicBool,
    closed: AtomicBool,
    stats: Mutex<StatsState>,
    epoch: Instant,
    next_seq: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Shared {
    fn stats(&self) -> MutexGuard<'_, StatsState> {
        lock(&self.stats)
    }

    fn micros(&self, at: Instant) -> i64 {
        at.saturating_duration_since(self.epoch).as_micros() as i64
    }

    fn instant(&self, micros: i64) -> Instant {
        self.epoch + Duration::from_micros(micros.max(0) as u64)
    }
}

/// A random 128-bit id in hex. `RandomState` is keyed from the OS's random source once per
/// process and differs per instance, so these are unpredictable without a new dependency.
pub(crate) fn random_hex() -> String {
    let word = || {
        let mut h = RandomState::new().build_hasher();
        h.write_u128(Instant::now().elapsed().as_nanos());
        h.finish()
    };
    format!("{:016x}{:016x}", word(), word())
}

/// The WHIP/WHEP transport of one [`Engine`]. Cheap to share (`Arc` inside); all methods take
/// `&self`. Call [`close`](Self::close) to end every session; dropping it only stops the
/// output thread.
pub struct WebRtcStream {
    shared: Arc<Shared>,
    pump: Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for WebRtcStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebRtcStream")
            .field("config", &self.shared.config)
            .finish_non_exhaustive()
    }
}

impl WebRtcStream {
    /// Starts the transport of `engine`: the output thread starts at once (it takes every
    /// output of the engine from now on, so nothing else should poll it).
    pub fn new(engine: Arc<Engine>, config: TransportConfig) -> Result<Self, TransportError> {
        Self::with_observer(engine, config, None)
    }

    /// [`new`](Self::new) with a [`FrameObserver`].
    pub fn with_observer(
        engine: Arc<Engine>,
        config: TransportConfig,
        observer: Option<Arc<dyn FrameObserver>>,
    ) -> Result<Self, TransportError> {
        let shared = Arc::new(Shared {
            engine,
            config,
            observer,
            publisher: Mutex::new(None),
            viewers: Mutex::new(HashMap::new()),
            keyframe_wanted: AtomicBool::new(true),
            closed: AtomicBool::new(false),
            stats: Mutex::new(StatsState::default()),
            epoch: Instant::now(),
            next_seq: AtomicU64::new(0),
        });
        let pump_shared = shared.clone();
        let pump = std::thread::Builder::new()
            .name("sdstream-whep-pump".into())
            .spawn(move || run_pump(&pump_shared))
            .map_err(|e| TransportError::WebRtc(format!("cannot start the output thread: {e}")))?;
        Ok(Self {
            shared,
            pump: Mutex::new(Some(pump)),
        })
    }

    /// The engine this transport feeds.
    pub fn engine(&self) -> &Arc<Engine> {
        &self.shared.engine
    }

    /// The configuration.
    pub fn config(&self) -> &TransportConfig {
        &self.shared.config
    }

    fn check_open(&self) -> Result<(), TransportError> {
        if self.shared.closed.load(Ordering::Acquire) {
            Err(TransportError::Closed)
        } else {
            Ok(())
        }
    }

    /// WHIP: answers a publisher's offer. The video track is decoded and fed to the engine;
    /// audio is accepted and dropped. A new publisher replaces the current one (a camera that
    /// reconnects must not be locked out by its own stale session).
    pub async fn publish(&self, offer_sdp: &str) -> Result<SessionAnswer, TransportError> {
        self.check_open()?;
        let offer = peer::parse_offer(offer_sdp)?;
        let mut peer = peer::build(&self.shared.config, true).await?;
        let outcome = async {
            for kind in [RtpCodecKind::Video, RtpCodecKind::Audio] {
                peer.connection
                    .add_transceiver_from_kind(
                        kind,
                        Some(RTCRtpTransceiverInit {
                            direction: RTCRtpTransceiverDirection::Recvonly,
                            ..Default::default()
                        }),
                    )
                    .await
                    .map_err(|e| TransportError::WebRtc(e.to_string()))?;
            }
            peer::answer(&mut peer, offer, self.shared.config.gather_timeout).await
        }
        .await;
        let sdp = match outcome {
            Ok(sdp) => sdp,
            Err(e) => {
                let _ = peer.connection.close().await;
                return Err(e);
            }
        };
        let id = random_hex();
        let previous = lock(&self.shared.publisher).replace(PublisherSlot {
            id: id.clone(),
            connection: peer.connection.clone(),
        });
        if let Some(previous) = previous {
            let _ = previous.connection.close().await;
        }
        if let Some(mut tracks) = peer.tracks.take() {
            let shared = self.shared.clone();
            tokio::spawn(async move {
                while let Some(track) = tracks.recv().await {
                    let shared = shared.clone();
                    tokio::spawn(async move { receive_track(shared, track).await });
                }
            });
        }
        let shared = self.shared.clone();
        let watched_id = id.clone();
        let mut state = peer.state.clone();
        tokio::spawn(async move {
            let ended = state
                .wait_for(|s| {
                    matches!(
                        s,
                        RTCPeerConnectionState::Failed | RTCPeerConnectionState::Closed
                    )
                })
                .await
                .is_ok();
            let finished = {
                let mut slot = lock(&shared.publisher);
                if ended && slot.as_ref().is_some_and(|p| p.id == watched_id) {
                    slot.take()
                } else {
                    None
                }
            };
            if let Some(finished) = finished {
                let _ = finished.connection.close().await;
            }
        });
        Ok(SessionAnswer {
            session_id: id,
            sdp,
        })
    }

    /// WHIP `DELETE`: ends the publisher session `session_id`.
    pub async fn unpublish(&self, session_id: &str) -> Result<(), TransportError> {
        let ended = {
            let mut slot = lock(&self.shared.publisher);
            if slot.as_ref().is_some_and(|p| p.id == session_id) {
                slot.take()
            } else {
                None
            }
        };
        match ended {
            Some(ended) => {
                let _ = ended.connection.close().await;
                Ok(())
            }
            None => Err(TransportError::NotFound(format!(
                "publisher session {session_id:?}"
            ))),
        }
    }

    /// WHEP: answers a viewer's offer with a track of the engine's output, H.264. Frames flow
    /// once the viewer connects, from a keyframe.
    pub async fn play(&self, offer_sdp: &str) -> Result<SessionAnswer, TransportError> {
        self.check_open()?;
        let limit = self.shared.config.max_viewers;
        if lock(&self.shared.viewers).len() >= limit {
            return Err(TransportError::TooManyViewers(limit));
        }
        let offer = peer::parse_offer(offer_sdp)?;
        let mut peer = peer::build(&self.shared.config, false).await?;
        let id = random_hex();
        let ssrc = random_hex()
            .get(..8)
            .and_then(|h| u32::from_str_radix(h, 16).ok())
            .unwrap_or(0x5d5_7a3e);
        let webrtc = |e: rtc::shared::error::Error| TransportError::WebRtc(e.to_string());
        let outcome = async {
            let track = Arc::new(
                TrackLocalStaticSample::new(
                    Instant::now(),
                    MediaStreamTrack::new(
                        "sdstream".to_owned(),
                        format!("sdstream-video-{id}"),
                        "sdstream output".to_owned(),
                        RtpCodecKind::Video,
                        vec![RTCRtpEncodingParameters {
                            rtp_coding_parameters: RTCRtpCodingParameters {
                                ssrc: Some(ssrc),
                                ..Default::default()
                            },
                            codec: peer::h264_codec(),
                            ..Default::default()
                        }],
                    ),
                )
                .map_err(webrtc)?,
            );
            let sender = peer
                .connection
                .add_track(track.clone() as Arc<dyn TrackLocal>)
                .await
                .map_err(webrtc)?;
            let sdp = peer::answer(&mut peer, offer, self.shared.config.gather_timeout).await?;
            Ok::<_, TransportError>((track, sender, sdp))
        }
        .await;
        let (track, sender, sdp) = match outcome {
            Ok(parts) => parts,
            Err(e) => {
                let _ = peer.connection.close().await;
                return Err(e);
            }
        };
        let admitted = {
            let mut viewers = lock(&self.shared.viewers);
            let room = viewers.len() < limit;
            if room {
                viewers.insert(
                    id.clone(),
                    ViewerSlot {
                        connection: peer.connection.clone(),
                        frames: None,
                    },
                );
            }
            room
        };
        if !admitted {
            let _ = peer.connection.close().await;
            return Err(TransportError::TooManyViewers(limit));
        }
        let shared = self.shared.clone();
        let viewer_id = id.clone();
        let state = peer.state.clone();
        tokio::spawn(async move {
            run_viewer(shared, viewer_id, state, track, sender, ssrc).await;
        });
        Ok(SessionAnswer {
            session_id: id,
            sdp,
        })
    }

    /// WHEP `DELETE`: ends the viewer session `session_id`.
    pub async fn stop_playing(&self, session_id: &str) -> Result<(), TransportError> {
        let ended = lock(&self.shared.viewers).remove(session_id);
        match ended {
            Some(slot) => {
                let _ = slot.connection.close().await;
                Ok(())
            }
            None => Err(TransportError::NotFound(format!(
                "viewer session {session_id:?}"
            ))),
        }
    }

    /// Counters and timings.
    pub fn stats(&self) -> TransportStats {
        let publishing = lock(&self.shared.publisher).is_some();
        let (viewers, connecting) = {
            let v = lock(&self.shared.viewers);
            let live = v.values().filter(|s| s.frames.is_some()).count();
            (live, v.len() - live)
        };
        let s = self.shared.stats();
        TransportStats {
            publishing,
            viewers,
            viewers_connecting: connecting,
            decode: s.decode.summary(),
            ingest: s.ingest.summary(),
            send: s.send.summary(),
            encode: s.encode.summary(),
            engine_queueing: s.engine_queueing.summary(),
            transport: s.transport.summary(),
            ..s.counters.clone()
        }
    }

    /// Ends every session and stops the output thread. The engine is left running (it belongs
    /// to the caller). Idempotent.
    pub async fn close(&self) {
        self.shared.closed.store(true, Ordering::Release);
        let publisher = lock(&self.shared.publisher).take();
        if let Some(p) = publisher {
            let _ = p.connection.close().await;
        }
        let viewers: Vec<ViewerSlot> = lock(&self.shared.viewers).drain().map(|(_, v)| v).collect();
        for v in viewers {
            let _ = v.connection.close().await;
        }
        let pump = lock(&self.pump).take();
        if let Some(pump) = pump {
            // The pump notices `closed` within one receive timeout (100 ms).
            let _ = tokio::task::spawn_blocking(move || pump.join()).await;
        }
    }
}

impl Drop for WebRtcStream {
    fn drop(&mut self) {
        self.shared.closed.store(true, Ordering::Release);
        // Peer connections close when their last handle goes; tasks holding `shared` end as
        // their connections do.
    }
}

/// Reads one remote track: video is assembled, decoded and submitted; audio is drained.
async fn receive_track(shared: Arc<Shared>, track: Arc<dyn TrackRemote>) {
    if track.kind().await != RtpCodecKind::Video {
        while track.poll().await.is_some() {}
        return;
    }
    let media_ssrc = track.ssrcs().await.first().copied().unwrap_or(0);
    let (pli_tx, mut pli_rx) = mpsc::unbounded_channel::<()>();
    let pli_track = track.clone();
    let pli_shared = shared.clone();
    tokio::spawn(async move {
        let mut last: Option<Instant> = None;
        while pli_rx.recv().await.is_some() {
            if last.is_some_and(|t| t.elapsed() < PLI_INTERVAL) {
                continue;
            }
            last = Some(Instant::now());
            let pli = PictureLossIndication {
                sender_ssrc: 0,
                media_ssrc,
            };
            if pli_track.write_rtcp(vec![Box::new(pli)]).await.is_err() {
                break;
            }
            pli_shared.stats().counters.plis_sent += 1;
        }
    });
    let (units_tx, units_rx) = crossbeam_channel::bounded::<(Vec<u8>, Instant)>(DECODE_QUEUE);
    let decode_shared = shared.clone();
    let decode_pli = pli_tx.clone();
    let decoder = std::thread::Builder::new()
        .name("sdstream-whip-decode".into())
        .spawn(move || run_decoder(&decode_shared, units_rx, decode_pli));
    if decoder.is_err() {
        return;
    }
    let mut assembler = AccessUnitAssembler::new(MAX_ACCESS_UNIT_BYTES);
    while let Some(event) = track.poll().await {
        let TrackRemoteEvent::OnRtpPacket(packet) = event else {
            continue;
        };
        let h = &packet.header;
        match assembler.push(h.sequence_number, h.timestamp, h.marker, &packet.payload) {
            Assembled::Pending => {}
            Assembled::AccessUnit(unit) => {
                shared.stats().counters.access_units_received += 1;
                if units_tx.try_send((unit, Instant::now())).is_err() {
                    shared.stats().counters.access_units_dropped += 1;
                    let _ = pli_tx.send(());
                }
            }
            Assembled::Damaged => {
                shared.stats().counters.pictures_damaged += 1;
                let _ = pli_tx.send(());
            }
        }
    }
    // Dropping `units_tx` ends the decode thread.
}

fn run_decoder(
    shared: &Shared,
    units: crossbeam_channel::Receiver<(Vec<u8>, Instant)>,
    pli: mpsc::UnboundedSender<()>,
) {
    let Ok(mut decoder) = H264Decoder::new() else {
        return;
    };
    for (unit, arrived) in units {
        if shared.closed.load(Ordering::Acquire) {
            return;
        }
        let started = Instant::now();
        let picture = match decoder.decode(&unit) {
            Ok(Some(picture)) => picture,
            Ok(None) => continue,
            Err(_) => {
                shared.stats().counters.decode_errors += 1;
                let _ = pli.send(());
                continue;
            }
        };
        shared.stats().decode.record(started.elapsed());
        let Ok(frame) = Frame::packed(
            &picture.rgb,
            picture.width,
            picture.height,
            PixelFormat::Rgb8,
        ) else {
            continue;
        };
        if let Ok(id) = shared
            .engine
            .submit_with_timestamp(&frame, shared.micros(arrived))
        {
            let mut s = shared.stats();
            s.counters.frames_submitted += 1;
            s.ingest.record(arrived.elapsed());
            drop(s);
            if let Some(observer) = &shared.observer {
                observer.on_input(id, picture.width, picture.height, &picture.rgb);
            }
        }
    }
}

/// Takes every engine output; encodes it once when anyone watches and queues it per viewer.
fn run_pump(shared: &Shared) {
    let mut encoder = H264Encoder::new(shared.config.encoder);
    let mut last_output: Option<Instant> = None;
    while !shared.closed.load(Ordering::Acquire) {
        let output = match shared.engine.recv_timeout(Duration::from_millis(100)) {
            Ok(Some(output)) => output,
            Ok(None) => continue,
            // Closed or no pipeline: nothing to send until that changes.
            Err(_) => {
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        let received = Instant::now();
        if let Some(observer) = &shared.observer {
            observer.on_output(&output);
        }
        {
            let mut s = shared.stats();
            s.counters.outputs += 1;
            s.engine_queueing
                .record(output.latency.saturating_sub(output.timings.total));
        }
        let queues: Vec<mpsc::Sender<Arc<EncodedFrame>>> = lock(&shared.viewers)
            .values()
            .filter_map(|v| v.frames.clone())
            .collect();
        let duration = last_output
            .map(|t| received.saturating_duration_since(t))
            .unwrap_or(Duration::from_millis(33))
            .clamp(Duration::from_millis(1), Duration::from_secs(1));
        last_output = Some(received);
        if queues.is_empty() {
            continue;
        }
        let requested = shared.keyframe_wanted.swap(false, Ordering::AcqRel);
        if requested {
            encoder.request_keyframe();
        }
        let image = &output.image;
        let rgb = match image.format {
            PixelFormat::Rgb8 => std::borrow::Cow::Borrowed(&image.data),
            _ => match image.as_frame() {
                Ok(frame) => std::borrow::Cow::Owned(frame.to_rgb8()),
                Err(_) => continue,
            },
        };
        let started = Instant::now();
        let encoded = match encoder.encode(&rgb, image.width, image.height) {
            Ok(encoded) => encoded,
            Err(_) => continue,
        };
        {
            let mut s = shared.stats();
            s.encode.record(started.elapsed());
            s.counters.frames_encoded += 1;
            s.counters.keyframes_encoded += u64::from(encoded.keyframe);
            s.counters.keyframes_on_request += u64::from(encoded.keyframe && requested);
        }
        let frame = Arc::new(EncodedFrame {
            seq: shared.next_seq.fetch_add(1, Ordering::Relaxed),
            data: Bytes::from(encoded.data),
            keyframe: encoded.keyframe,
            duration,
            arrived: shared.instant(output.timestamp),
            taken: received,
            pipeline: output.timings.total,
        });
        for queue in queues {
            if let Err(mpsc::error::TrySendError::Full(_)) = queue.try_send(frame.clone()) {
                shared.stats().counters.frames_dropped_for_viewers += 1;
                shared.keyframe_wanted.store(true, Ordering::Release);
            }
        }
    }
}

/// One viewer's life: wait for the connection, then send frames until it ends.
async fn run_viewer(
    shared: Arc<Shared>,
    id: String,
    mut state: tokio::sync::watch::Receiver<RTCPeerConnectionState>,
    track: Arc<TrackLocalStaticSample>,
    sender: Arc<dyn webrtc::rtp_transceiver::RtpSender>,
    ssrc: u32,
) {
    let is_connected = {
        let settled = tokio::time::timeout(
            CONNECT_TIMEOUT,
            state.wait_for(|s| {
                matches!(
                    s,
                    RTCPeerConnectionState::Connected
                        | RTCPeerConnectionState::Failed
                        | RTCPeerConnectionState::Closed
                )
            }),
        )
        .await;
        matches!(&settled, Ok(Ok(s)) if **s == RTCPeerConnectionState::Connected)
    };
    let payload_type = match sender.get_parameters().await {
        Ok(p) => p.rtp_parameters.codecs.first().map(|c| c.payload_type),
        Err(_) => None,
    };
    let (Some(payload_type), true) = (payload_type, is_connected) else {
        end_viewer(&shared, &id).await;
        return;
    };
    let (frames_tx, mut frames_rx) = mpsc::channel::<Arc<EncodedFrame>>(VIEWER_QUEUE);
    {
        let mut viewers = lock(&shared.viewers);
        match viewers.get_mut(&id) {
            Some(slot) => slot.frames = Some(frames_tx),
            // Deleted while connecting.
            None => return,
        }
    }
    shared.keyframe_wanted.store(true, Ordering::Release);

    // Keyframe requests from this viewer.
    let rtcp_track = track.clone();
    let rtcp_shared = shared.clone();
    tokio::spawn(async move {
        while let Some(event) = rtcp_track.poll().await {
            if let TrackLocalEvent::OnRtcpPacket(_) = event {
                rtcp_shared.stats().counters.keyframe_requests_received += 1;
                rtcp_shared.keyframe_wanted.store(true, Ordering::Release);
            }
        }
    });
    // The end of the connection ends the session.
    let watch_shared = shared.clone();
    let watch_id = id.clone();
    tokio::spawn(async move {
        let _ = state
            .wait_for(|s| {
                matches!(
                    s,
                    RTCPeerConnectionState::Failed
                        | RTCPeerConnectionState::Closed
                        | RTCPeerConnectionState::Disconnected
                )
            })
            .await;
        end_viewer(&watch_shared, &watch_id).await;
    });

    let mut waiting_for_keyframe = true;
    let mut last_seq: Option<u64> = None;
    while let Some(frame) = frames_rx.recv().await {
        if last_seq.is_some_and(|last| frame.seq != last + 1) {
            // A frame this viewer never got: its decoder needs a new start.
            waiting_for_keyframe = true;
        }
        last_seq = Some(frame.seq);
        if waiting_for_keyframe {
            if !frame.keyframe {
                shared.keyframe_wanted.store(true, Ordering::Release);
                continue;
            }
            waiting_for_keyframe = false;
        }
        let mut sample = Sample::new(Instant::now());
        sample.data = frame.data.clone();
        sample.duration = frame.duration;
        if track
            .write_sample(ssrc, payload_type, &sample, &[])
            .await
            .is_err()
        {
            break;
        }
        let now = Instant::now();
        let mut s = shared.stats();
        s.counters.frames_sent += 1;
        if s.last_timed.is_none_or(|last| frame.seq > last) {
            s.last_timed = Some(frame.seq);
            s.send.record(now.saturating_duration_since(frame.taken));
            let total = now.saturating_duration_since(frame.arrived);
            s.transport.record(total.saturating_sub(frame.pipeline));
        }
    }
    end_viewer(&shared, &id).await;
}

async fn end_viewer(shared: &Shared, id: &str) {
    let slot = lock(&shared.viewers).remove(id);
    if let Some(slot) = slot {
        let _ = slot.connection.close().await;
    }
}
