//! Publishers outside WebRTC (RTMP): they take the stream's one publisher place like a WHIP
//! session and hand in H.264 access units, which go through the same decode thread.

use std::sync::Arc;
use std::time::Instant;

use tokio::sync::{mpsc, watch};
use webrtc::peer_connection::RTCPeerConnectionState;

use super::super::TransportError;
use super::publisher::run_decoder;
use super::{DECODE_QUEUE, IngestKind, MediaHub, PublisherLink, PublisherSlot, Shared};
use sdstream::ids::random_hex;

/// A publisher that is not a peer connection (see [`MediaHub::publish_external`]). It
/// holds the stream's publisher place until it is dropped, or until the stream ends it
/// (closed, or the session deleted), which [`is_ended`](Self::is_ended) and
/// [`ended`](Self::ended) report.
pub struct ExternalPublisher {
    shared: Arc<Shared>,
    id: String,
    state: Arc<watch::Sender<RTCPeerConnectionState>>,
    watcher: watch::Receiver<RTCPeerConnectionState>,
    units: Option<crossbeam_channel::Sender<(Vec<u8>, Instant)>>,
    decoder: Option<std::thread::JoinHandle<()>>,
}

impl std::fmt::Debug for ExternalPublisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExternalPublisher")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

impl ExternalPublisher {
    /// The publisher's session id.
    pub fn session_id(&self) -> &str {
        &self.id
    }

    /// Counts `bytes` of media received from the source (before they make access units).
    pub fn received_bytes(&self, bytes: usize) {
        let mut s = self.shared.stats();
        s.last_media = Some(Instant::now());
        s.counters.media_bytes_received += bytes as u64;
    }

    /// Hands in one complete access unit (Annex-B, start codes included; a keyframe carries
    /// its SPS and PPS) that was complete at `arrived`. When the decoder is behind the unit
    /// is dropped and counted (`access_units_dropped`); the source cannot be asked for a
    /// keyframe, so the decoder resumes at the next one it sends.
    pub fn push_access_unit(&self, unit: Vec<u8>, arrived: Instant) {
        let Some(units) = &self.units else {
            return;
        };
        let mut s = self.shared.stats();
        s.last_media = Some(arrived);
        s.counters.access_units_received += 1;
        if units.try_send((unit, arrived)).is_err() {
            s.counters.access_units_dropped += 1;
        }
    }

    /// Whether the stream has ended this publisher (stream closed, or its session deleted).
    pub fn is_ended(&self) -> bool {
        *self.watcher.borrow() == RTCPeerConnectionState::Closed
    }

    /// Completes when the stream ends this publisher.
    pub async fn ended(&self) {
        let mut watcher = self.watcher.clone();
        let _ = watcher
            .wait_for(|s| *s == RTCPeerConnectionState::Closed)
            .await;
    }
}

impl Drop for ExternalPublisher {
    fn drop(&mut self) {
        // The decode thread ends with its queue (not joined: a drop must not wait on a decode).
        self.units = None;
        self.decoder = None;
        if self.shared.take_publisher(&self.id).is_some() {
            self.shared.publisher_lost(Instant::now());
            tracing::info!(session = %self.id, "external publisher session ended");
        }
        self.state.send_replace(RTCPeerConnectionState::Closed);
    }
}

impl MediaHub {
    /// Takes the stream's publisher place for a source outside WebRTC (`kind`, e.g.
    /// [`IngestKind::Rtmp`]): refused with [`TransportError::PublisherPresent`] while another
    /// publisher is connected or connecting, exactly as a second WHIP offer is.
    pub async fn publish_external(
        &self,
        kind: IngestKind,
    ) -> Result<ExternalPublisher, TransportError> {
        self.check_open()?;
        self.shared.check_publisher_place()?;
        let id = random_hex();
        let (state_tx, watcher) = watch::channel(RTCPeerConnectionState::Connected);
        let state = Arc::new(state_tx);
        let slot = PublisherSlot {
            id: id.clone(),
            kind,
            link: PublisherLink::External(state.clone()),
            state: watcher.clone(),
        };
        self.shared.install_publisher(slot).await?;
        let (units_tx, units_rx) = crossbeam_channel::bounded(DECODE_QUEUE);
        // Keyframe requests have nowhere to go: the source sends keyframes on its own schedule.
        let (pli, _) = mpsc::unbounded_channel();
        let shared = self.shared.clone();
        let decoder = std::thread::Builder::new()
            .name("sdstream-ingest-decode".into())
            .spawn(move || run_decoder(&shared, units_rx, pli));
        let decoder = match decoder {
            Ok(handle) => handle,
            Err(e) => {
                if let Some(slot) = self.shared.take_publisher(&id) {
                    slot.end().await;
                }
                return Err(TransportError::Codec(format!(
                    "cannot start the decode thread: {e}"
                )));
            }
        };
        tracing::info!(session = %id, kind = kind.as_str(), "external publisher connected");
        Ok(ExternalPublisher {
            shared: self.shared.clone(),
            id,
            state,
            watcher,
            units: Some(units_tx),
            decoder: Some(decoder),
        })
    }
}
