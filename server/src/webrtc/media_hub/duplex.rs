//! Duplex sessions: one peer connection that sends the camera and receives the output on the
//! same connection, with data channels for control messages (the shape of Daydream Scope's
//! `POST /api/v1/webrtc/offer`). The session holds the stream's publisher place and a viewer
//! place at once; its data-channel messages go to a [`ControlHandler`], which is where their
//! meaning lives (the server's translation of them into parameter updates), and its replies go
//! back on the channel the message came on.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use serde::Deserialize;
use tokio::sync::{mpsc, watch};
use webrtc::data_channel::{DataChannel, DataChannelEvent};
use webrtc::peer_connection::{
    PeerConnection, RTCIceCandidateInit, RTCPeerConnectionState, RTCSessionDescription,
};

use super::super::TransportError;
use super::super::peer;
use super::publisher::start_publisher_tasks;
use super::viewers::{OutputPeer, answer_with_output, run_viewer};
use super::{IngestKind, MediaHub, PublisherLink, PublisherSlot, SessionAnswer, Shared, lock};
use sdstream::ids::random_hex;

/// Where a duplex session's data-channel messages go.
pub trait ControlHandler: Send + Sync + 'static {
    /// A message arrived from the peer on one of the session's data channels (its bytes as
    /// sent: text channels carry UTF-8). The returned texts are sent back on that channel, in
    /// order. Called on a blocking thread, one message at a time per channel.
    fn on_message(&self, session_id: &str, message: &[u8]) -> Vec<String>;

    /// The session ended on its own: the peer closed its last control channel (as a client
    /// that closes its connection does), the connection failed or closed, or it never
    /// connected. Not called when [`MediaHub::end_duplex`] or [`MediaHub::close`] ended
    /// it.
    fn on_end(&self, session_id: &str);
}

/// A remote ICE candidate trickled after the offer (the W3C `RTCIceCandidateInit`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct IceCandidate {
    /// The candidate attribute (`candidate:…`, with or without the `candidate:` prefix); empty
    /// marks the end of the candidates.
    #[serde(default)]
    pub candidate: Option<String>,
    /// The media section's identification tag.
    #[serde(default, rename = "sdpMid")]
    pub sdp_mid: Option<String>,
    /// The media section's index.
    #[serde(default, rename = "sdpMLineIndex")]
    pub sdp_mline_index: Option<u16>,
    /// The ICE username fragment the candidate belongs to.
    #[serde(default, rename = "usernameFragment")]
    pub username_fragment: Option<String>,
}

/// Server messages kept for a session whose data channel has not opened yet.
const MAX_PENDING_CONTROL: usize = 16;
/// Most candidates a session's peer may trickle: a browser gathers a handful per network
/// interface; every one added makes the ICE agent send checks to the address it names.
pub const MAX_REMOTE_CANDIDATES: usize = 64;
/// How long [`MediaHub::end_duplex`] lets its last message drain before closing.
const FAREWELL_DRAIN: Duration = Duration::from_millis(500);

pub(super) struct ControlSlot {
    handler: Arc<dyn ControlHandler>,
    connection: Arc<dyn PeerConnection>,
    /// The peer's data channels, oldest first; server messages go to the first.
    channels: Vec<Arc<dyn DataChannel>>,
    /// Server messages waiting for a channel.
    pending: Vec<String>,
    /// Candidates the peer trickled and the session took (added or ignored).
    remote_candidates: usize,
}

impl MediaHub {
    /// Answers a duplex offer: the offer's video track feeds the engine (it takes the stream's
    /// publisher place: [`TransportError::PublisherPresent`] while another publisher is live),
    /// the engine's output goes back on the same connection (a viewer place), and the data
    /// channels the peer opens carry control messages to `handler`. The answer carries every
    /// local candidate; the peer may trickle its own with
    /// [`add_remote_candidates`](Self::add_remote_candidates).
    pub async fn open_duplex(
        &self,
        offer_sdp: &str,
        handler: Arc<dyn ControlHandler>,
    ) -> Result<SessionAnswer, TransportError> {
        self.check_open()?;
        let offer = peer::parse_offer(offer_sdp)?;
        self.shared.check_publisher_place()?;
        let id = random_hex();
        for evicted in self.reserve_viewer(&id)? {
            let _ = evicted.close().await;
        }
        let answered = self.answer_duplex(&id, offer, handler).await;
        if answered.is_err() {
            lock(&self.shared.viewers).remove(&id);
        }
        answered
    }

    async fn answer_duplex(
        &self,
        id: &str,
        offer: RTCSessionDescription,
        handler: Arc<dyn ControlHandler>,
    ) -> Result<SessionAnswer, TransportError> {
        let OutputPeer {
            mut peer,
            track,
            ssrc,
            sender,
            sdp,
        } = answer_with_output(
            &self.shared,
            id,
            offer,
            peer::Receives::TracksAndDataChannels,
        )
        .await?;
        let connection = peer.connection.clone();
        let slot = PublisherSlot {
            id: id.to_owned(),
            kind: IngestKind::Duplex,
            link: PublisherLink::Peer(connection.clone()),
            state: peer.state.clone(),
        };
        if let Err(e) = self.shared.install_publisher(slot).await {
            let _ = connection.close().await;
            return Err(e);
        }
        let installed = match lock(&self.shared.viewers).get_mut(id) {
            Some(slot) => {
                slot.connection = Some(connection.clone());
                true
            }
            None => false,
        };
        if !installed {
            // The stream was closed meanwhile.
            self.shared.take_publisher(id);
            let _ = connection.close().await;
            return Err(TransportError::Closed);
        }
        lock(&self.shared.controls).insert(
            id.to_owned(),
            ControlSlot {
                handler,
                connection: connection.clone(),
                channels: Vec::new(),
                pending: Vec::new(),
                remote_candidates: 0,
            },
        );
        self.shared.stats().counters.duplex_sessions_answered += 1;
        tracing::info!(session = %id, "duplex session answered");
        start_publisher_tasks(&self.shared, id, &mut peer);
        let channels = peer.data_channels.take();
        let shared = self.shared.clone();
        let session = id.to_owned();
        let state = peer.state.clone();
        tokio::spawn(async move { run_controls(shared, session, channels, state).await });
        let shared = self.shared.clone();
        let session = id.to_owned();
        let state = peer.state.clone();
        tokio::spawn(async move { run_viewer(shared, session, state, track, sender, ssrc).await });
        Ok(SessionAnswer {
            session_id: id.to_owned(),
            sdp,
        })
    }

    /// Adds candidates the peer of duplex session `session_id` trickles after its offer.
    /// An empty candidate (end of candidates) is accepted and changes nothing. All are checked
    /// before any is added: a malformed one is a [`TransportError::BadCandidate`], and a request
    /// that would take the session past [`MAX_REMOTE_CANDIDATES`] is a
    /// [`TransportError::TooManyCandidates`]; either way none is added. mDNS host candidates
    /// (`….local`) count, but are added only when the transport resolves them
    /// ([`resolve_mdns_candidates`](crate::webrtc::TransportConfig::resolve_mdns_candidates)).
    pub async fn add_remote_candidates(
        &self,
        session_id: &str,
        candidates: &[IceCandidate],
    ) -> Result<(), TransportError> {
        let not_found = || TransportError::NotFound(format!("session {session_id:?}"));
        let mut checked = Vec::with_capacity(candidates.len());
        for (i, c) in candidates.iter().enumerate() {
            let text = c.candidate.as_deref().unwrap_or("").trim();
            if text.is_empty() {
                continue;
            }
            if c.sdp_mid.is_none() && c.sdp_mline_index.is_none() {
                return Err(TransportError::BadCandidate(format!(
                    "candidates[{i}]: give sdpMid or sdpMLineIndex"
                )));
            }
            let attribute = text.strip_prefix("a=").unwrap_or(text);
            let bare = attribute.strip_prefix("candidate:").unwrap_or(attribute);
            if let Err(e) = rtc::ice::candidate::unmarshal_candidate(bare) {
                return Err(TransportError::BadCandidate(format!(
                    "candidates[{i}]: {e}: {text:?}"
                )));
            }
            checked.push((i, c, attribute));
        }
        // Counted and capped under the lock, so that concurrent requests cannot both pass.
        let connection = {
            let mut controls = lock(&self.shared.controls);
            let slot = controls.get_mut(session_id).ok_or_else(not_found)?;
            let had = slot.remote_candidates;
            if had + checked.len() > MAX_REMOTE_CANDIDATES {
                drop(controls);
                self.shared.stats().counters.remote_candidates_refused += checked.len() as u64;
                return Err(TransportError::TooManyCandidates {
                    had,
                    more: checked.len(),
                    limit: MAX_REMOTE_CANDIDATES,
                });
            }
            slot.remote_candidates += checked.len();
            slot.connection.clone()
        };
        let resolve_mdns = self.shared.config.resolve_mdns_candidates;
        for (i, c, attribute) in checked {
            if !resolve_mdns && peer::is_mdns_candidate(attribute) {
                self.shared.stats().counters.remote_candidates_ignored += 1;
                continue;
            }
            connection
                .add_ice_candidate(RTCIceCandidateInit {
                    candidate: attribute.to_owned(),
                    sdp_mid: c.sdp_mid.clone(),
                    sdp_mline_index: c.sdp_mline_index,
                    username_fragment: c.username_fragment.clone(),
                    ..Default::default()
                })
                .await
                .map_err(|e| TransportError::BadCandidate(format!("candidates[{i}]: {e}")))?;
            self.shared.stats().counters.remote_candidates_added += 1;
        }
        Ok(())
    }

    /// Sends `text` to duplex session `session_id` on its first data channel, or keeps it (up
    /// to 16 messages) until the peer opens one.
    pub async fn send_control(&self, session_id: &str, text: &str) -> Result<(), TransportError> {
        let channel = {
            let mut controls = lock(&self.shared.controls);
            let slot = controls
                .get_mut(session_id)
                .ok_or_else(|| TransportError::NotFound(format!("session {session_id:?}")))?;
            match slot.channels.first() {
                Some(channel) => channel.clone(),
                None => {
                    if slot.pending.len() < MAX_PENDING_CONTROL {
                        slot.pending.push(text.to_owned());
                    }
                    return Ok(());
                }
            }
        };
        channel
            .send_text(text)
            .await
            .map_err(|e| TransportError::WebRtc(e.to_string()))?;
        self.shared.stats().counters.control_messages_sent += 1;
        Ok(())
    }

    /// The ids of the duplex sessions.
    pub fn duplex_sessions(&self) -> Vec<String> {
        lock(&self.shared.controls).keys().cloned().collect()
    }

    /// Ends duplex session `session_id`, first sending `last_message` on its data channel
    /// (and letting it drain for up to half a second), without calling its handler's
    /// [`on_end`](ControlHandler::on_end).
    pub async fn end_duplex(
        &self,
        session_id: &str,
        last_message: Option<&str>,
    ) -> Result<(), TransportError> {
        let slot = lock(&self.shared.controls)
            .remove(session_id)
            .ok_or_else(|| TransportError::NotFound(format!("session {session_id:?}")))?;
        if let (Some(text), Some(channel)) = (last_message, slot.channels.first())
            && channel.send_text(text).await.is_ok()
        {
            self.shared.stats().counters.control_messages_sent += 1;
            let deadline = Instant::now() + FAREWELL_DRAIN;
            while Instant::now() < deadline
                && channel.outstanding_bytes().await.is_ok_and(|n| n > 0)
            {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        if self.shared.take_publisher(session_id).is_some() {
            self.shared.publisher_lost(Instant::now());
        }
        lock(&self.shared.viewers).remove(session_id);
        tracing::info!(session = %session_id, "duplex session ended by the server");
        let _ = slot.connection.close().await;
        Ok(())
    }
}

/// Takes the data channels the peer opens until the session ends, then tells the handler
/// (unless the server ended the session itself).
async fn run_controls(
    shared: Arc<Shared>,
    id: String,
    channels: Option<mpsc::UnboundedReceiver<Arc<dyn DataChannel>>>,
    mut state: watch::Receiver<RTCPeerConnectionState>,
) {
    let Some(mut channels) = channels else {
        return;
    };
    // One that never connects ends at the connect timeout, as a publisher or a viewer does, so
    // that its handler (the server: its stream) lets go then; nothing else would end it, since
    // a connection that never came up reports no failure.
    if !shared.connects_in_time(&mut state.clone()).await {
        let slot = lock(&shared.controls).remove(&id);
        if let Some(slot) = slot {
            shared.stats().counters.duplex_connect_failed += 1;
            tracing::info!(session = %id, "duplex session ended: it did not connect in time");
            slot.handler.on_end(&id);
            let _ = slot.connection.close().await;
        }
        return;
    }
    let ended = |s: &RTCPeerConnectionState| {
        matches!(
            s,
            RTCPeerConnectionState::Failed | RTCPeerConnectionState::Closed
        )
    };
    loop {
        tokio::select! {
            channel = channels.recv() => match channel {
                Some(channel) => {
                    let shared = shared.clone();
                    let id = id.clone();
                    tokio::spawn(async move { run_channel(shared, id, channel).await });
                }
                None => break,
            },
            settled = state.wait_for(ended) => {
                let _ = settled;
                break;
            }
        }
    }
    // The connection may still be up if only the channel receiver ended: wait for its end.
    let _ = state.wait_for(ended).await;
    let slot = lock(&shared.controls).remove(&id);
    if let Some(slot) = slot {
        tracing::info!(session = %id, "duplex session ended");
        slot.handler.on_end(&id);
    }
}

/// Serves one data channel of session `id`: messages to the handler, its replies back.
async fn run_channel(shared: Arc<Shared>, id: String, channel: Arc<dyn DataChannel>) {
    let pending = {
        let mut controls = lock(&shared.controls);
        let Some(slot) = controls.get_mut(&id) else {
            return;
        };
        slot.channels.push(channel.clone());
        std::mem::take(&mut slot.pending)
    };
    for text in pending {
        if channel.send_text(&text).await.is_ok() {
            shared.stats().counters.control_messages_sent += 1;
        }
    }
    while let Some(event) = channel.poll().await {
        let DataChannelEvent::OnMessage(message) = event else {
            if matches!(event, DataChannelEvent::OnClose) {
                break;
            }
            continue;
        };
        let handler = lock(&shared.controls)
            .get(&id)
            .map(|slot| slot.handler.clone());
        let Some(handler) = handler else {
            // The session was ended meanwhile.
            return;
        };
        shared.stats().counters.control_messages_received += 1;
        let session = id.clone();
        let data = message.data.freeze();
        let replies = tokio::task::spawn_blocking(move || handler.on_message(&session, &data))
            .await
            .unwrap_or_default();
        for reply in replies {
            if channel.send_text(&reply).await.is_err() {
                break;
            }
            shared.stats().counters.control_messages_sent += 1;
        }
        if shared.closed.load(Ordering::Acquire) {
            return;
        }
    }
    // The peer closed its last control channel (how a Scope client stops: it closes its
    // connection, whose channels close at once while ICE would take many seconds to notice):
    // the session has ended.
    let ended = {
        let mut controls = lock(&shared.controls);
        match controls.get_mut(&id) {
            Some(slot) => {
                slot.channels.retain(|c| !Arc::ptr_eq(c, &channel));
                if slot.channels.is_empty() {
                    controls.remove(&id)
                } else {
                    None
                }
            }
            None => None,
        }
    };
    if let Some(slot) = ended {
        tracing::info!(session = %id, "duplex session ended: its control channel closed");
        slot.handler.on_end(&id);
        if shared.take_publisher(&id).is_some() {
            shared.publisher_lost(Instant::now());
        }
        lock(&shared.viewers).remove(&id);
        let _ = slot.connection.close().await;
    }
}
