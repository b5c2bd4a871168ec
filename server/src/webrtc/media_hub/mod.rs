//! [`MediaHub`]: one engine's publisher and viewers, and the threads between them.
//!
//! Ingest: RTP packets (network task) → access units → decode thread → `Engine::submit`. A
//! publisher outside WebRTC (RTMP) hands in access units through an [`ExternalPublisher`] and
//! takes the same publisher place and decode thread.
//! Egress: pump thread (`Engine::recv_timeout`) → one H.264 encode → a bounded queue per
//! viewer and per [`EncodedSink`] (HLS, an RTMP push) → the viewer's task packetizes and sends.
//! A viewer or sink that falls behind loses frames from its own queue (and waits for the next
//! keyframe); it never slows the others down.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};
use webrtc::peer_connection::{PeerConnection, RTCPeerConnectionState};

mod duplex;
mod external;
mod publisher;
mod sinks;
mod stats;
mod viewers;

use super::{TransportConfig, TransportError};
use sdstream::Engine;
use sdstream::engine::{FrameId, Output};

pub use duplex::{ControlHandler, IceCandidate, MAX_REMOTE_CANDIDATES};
pub use external::ExternalPublisher;
pub use sinks::{EncodedFrame, EncodedSink};
use stats::StatsState;
pub use stats::{Summary, TransportStats};
use viewers::run_pump;

/// Largest access unit accepted from a publisher (a 4K intra picture fits).
const MAX_ACCESS_UNIT_BYTES: usize = 8 << 20;
/// Access units waiting for the decoder; more means the decoder cannot keep up, and the
/// newest are dropped (with a keyframe request) rather than delaying everything.
const DECODE_QUEUE: usize = 4;
/// Encoded frames waiting per viewer.
const VIEWER_QUEUE: usize = 8;
/// At most one PLI to the publisher per this interval.
const PLI_INTERVAL: Duration = Duration::from_millis(250);
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

/// Where a stream's publisher is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PublisherState {
    /// No publisher has ever been answered.
    Never,
    /// A publisher was answered and its connection is not up yet.
    Connecting,
    /// The publisher's connection is up.
    Connected,
    /// The publisher's session ended (DELETE, connection failed or closed, never connected)
    /// or its connection lost contact (ICE disconnected).
    Gone,
}

/// How a publisher's media reaches the stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IngestKind {
    /// WHIP (RFC 9725): a peer connection that only sends.
    Whip,
    /// A session whose one peer connection sends the camera and receives the output (the
    /// Scope-style offer).
    Duplex,
    /// RTMP (or any source outside WebRTC handing in access units).
    Rtmp,
}

impl IngestKind {
    /// `"whip"`, `"duplex"` or `"rtmp"`.
    pub fn as_str(self) -> &'static str {
        match self {
            IngestKind::Whip => "whip",
            IngestKind::Duplex => "duplex",
            IngestKind::Rtmp => "rtmp",
        }
    }
}

/// How a stream is being fed: what the server's liveness rules read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ingest {
    /// The publisher's state.
    pub publisher: PublisherState,
    /// How the current (or last) publisher sends, once there has been one.
    pub kind: Option<IngestKind>,
    /// When it went ([`PublisherState::Gone`] only).
    pub publisher_lost: Option<Instant>,
    /// When the last RTP packet of a publisher arrived.
    pub last_media: Option<Instant>,
}

/// What ends a publisher's session.
enum PublisherLink {
    /// Its peer connection (WHIP, or a duplex session's).
    Peer(Arc<dyn PeerConnection>),
    /// A source outside WebRTC: its [`ExternalPublisher`] watches this state and stops when it
    /// turns `Closed`.
    External(Arc<watch::Sender<RTCPeerConnectionState>>),
}

struct PublisherSlot {
    id: String,
    kind: IngestKind,
    link: PublisherLink,
    state: watch::Receiver<RTCPeerConnectionState>,
}

impl PublisherSlot {
    /// Ends the session: closes its connection, or tells the external source to stop.
    async fn end(self) {
        match self.link {
            PublisherLink::Peer(connection) => {
                let _ = connection.close().await;
            }
            PublisherLink::External(state) => {
                state.send_replace(RTCPeerConnectionState::Closed);
            }
        }
    }

    /// Whether its connection has ended or lost contact, so that a new publisher (a camera
    /// that reconnects without having sent DELETE) may take its place.
    fn is_gone(&self) -> bool {
        matches!(
            *self.state.borrow(),
            RTCPeerConnectionState::Failed
                | RTCPeerConnectionState::Closed
                | RTCPeerConnectionState::Disconnected
        )
    }
}

struct ViewerSlot {
    /// When the offer was admitted: the oldest session still connecting gives way first.
    since: Instant,
    /// `None` while the answer is being made.
    connection: Option<Arc<dyn PeerConnection>>,
    /// Set once connected: the viewer's frame queue.
    frames: Option<mpsc::Sender<Arc<EncodedFrame>>>,
}

struct Shared {
    engine: Arc<Engine>,
    config: TransportConfig,
    observer: Option<Arc<dyn FrameObserver>>,
    publisher: Mutex<Option<PublisherSlot>>,
    viewers: Mutex<HashMap<String, ViewerSlot>>,
    /// Encoded-output subscribers outside WebRTC (HLS, RTMP push), by id.
    sinks: Mutex<HashMap<u64, mpsc::Sender<Arc<EncodedFrame>>>>,
    /// Duplex sessions' data channels and handlers, by session id.
    controls: Mutex<HashMap<String, duplex::ControlSlot>>,
    keyframe_wanted: AtomicBool,
    /// While set, decoded input pictures are not submitted to the engine.
    paused: AtomicBool,
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

    /// Whether a session's connection reaches `Connected` within the connect timeout (rather
    /// than failing, closing, or never settling): the one rule publishers and viewers share.
    async fn connects_in_time(&self, state: &mut watch::Receiver<RTCPeerConnectionState>) -> bool {
        let settled = tokio::time::timeout(
            self.config.connect_timeout,
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
    }

    fn micros(&self, at: Instant) -> i64 {
        at.saturating_duration_since(self.epoch).as_micros() as i64
    }

    fn instant(&self, micros: i64) -> Instant {
        self.epoch + Duration::from_micros(micros.max(0) as u64)
    }

    /// Notes that the publisher went at `at` (the first time since it last connected).
    fn publisher_lost(&self, at: Instant) {
        let mut s = self.stats();
        if s.publisher_lost.is_none() {
            s.publisher_lost = Some(at);
        }
    }
}

/// The WHIP/WHEP transport of one [`Engine`]. Cheap to share (`Arc` inside); all methods take
/// `&self`. Call [`close`](Self::close) to end every session; dropping it only stops the
/// output thread.
pub struct MediaHub {
    shared: Arc<Shared>,
    pump: Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for MediaHub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MediaHub")
            .field("config", &self.shared.config)
            .finish_non_exhaustive()
    }
}

impl MediaHub {
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
            sinks: Mutex::new(HashMap::new()),
            controls: Mutex::new(HashMap::new()),
            keyframe_wanted: AtomicBool::new(true),
            paused: AtomicBool::new(false),
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

    /// Counters and timings.
    pub fn stats(&self) -> TransportStats {
        let publishing = lock(&self.shared.publisher).is_some();
        let (viewers, connecting) = {
            let v = lock(&self.shared.viewers);
            let live = v.values().filter(|s| s.frames.is_some()).count();
            (live, v.len() - live)
        };
        let sinks = lock(&self.shared.sinks).len();
        let paused = self.shared.paused.load(Ordering::Acquire);
        let s = self.shared.stats();
        TransportStats {
            publishing,
            publisher_kind: s.publisher_kind.map(IngestKind::as_str),
            paused,
            viewers,
            viewers_connecting: connecting,
            sinks,
            decode: s.decode.summary(),
            ingest: s.ingest.summary(),
            send: s.send.summary(),
            encode: s.encode.summary(),
            engine_queueing: s.engine_queueing.summary(),
            pipeline: s.pipeline.summary(),
            transport: s.transport.summary(),
            sink_delivery: s.sink_delivery.summary(),
            ..s.counters.clone()
        }
    }

    /// Where the publisher is and when media last arrived.
    pub fn ingest(&self) -> Ingest {
        let state = lock(&self.shared.publisher)
            .as_ref()
            .map(|p| *p.state.borrow());
        let s = self.shared.stats();
        let kind = s.publisher_kind;
        let publisher = match state {
            Some(
                RTCPeerConnectionState::Failed
                | RTCPeerConnectionState::Closed
                | RTCPeerConnectionState::Disconnected,
            ) => PublisherState::Gone,
            Some(RTCPeerConnectionState::Connected) => PublisherState::Connected,
            Some(_) => PublisherState::Connecting,
            None if s.ever_published => PublisherState::Gone,
            None => PublisherState::Never,
        };
        Ingest {
            publisher,
            kind,
            publisher_lost: match publisher {
                // A state change not yet seen by the watcher: gone from now.
                PublisherState::Gone => Some(s.publisher_lost.unwrap_or_else(Instant::now)),
                _ => None,
            },
            last_media: s.last_media,
        }
    }

    /// Pauses or resumes the input: while paused, decoded pictures are counted
    /// (`frames_paused`) and not submitted, so the engine makes no new output and viewers keep
    /// the last picture.
    pub fn set_paused(&self, paused: bool) {
        self.shared.paused.store(paused, Ordering::Release);
    }

    /// Whether the input is paused.
    pub fn is_paused(&self) -> bool {
        self.shared.paused.load(Ordering::Acquire)
    }

    /// Ends every session and stops the output thread. The engine is left running (it belongs
    /// to the caller). Idempotent.
    pub async fn close(&self) {
        self.shared.closed.store(true, Ordering::Release);
        let publisher = lock(&self.shared.publisher).take();
        if let Some(p) = publisher {
            self.shared.publisher_lost(Instant::now());
            p.end().await;
        }
        lock(&self.shared.sinks).clear();
        lock(&self.shared.controls).clear();
        let viewers: Vec<ViewerSlot> = lock(&self.shared.viewers).drain().map(|(_, v)| v).collect();
        for connection in viewers.into_iter().filter_map(|v| v.connection) {
            let _ = connection.close().await;
        }
        let pump = lock(&self.pump).take();
        if let Some(pump) = pump {
            // The pump notices `closed` within one receive timeout (100 ms).
            let _ = tokio::task::spawn_blocking(move || pump.join()).await;
        }
    }
}

impl Drop for MediaHub {
    fn drop(&mut self) {
        self.shared.closed.store(true, Ordering::Release);
        // Peer connections close when their last handle goes; tasks holding `shared` end as
        // their connections do.
    }
}
