//! WHIP ingest: the publisher's session, its track reader and the decode thread that feeds
//! the engine.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use rtc::rtcp::payload_feedbacks::picture_loss_indication::PictureLossIndication;
use rtc::rtp_transceiver::rtp_sender::RtpCodecKind;
use rtc::rtp_transceiver::{RTCRtpTransceiverDirection, RTCRtpTransceiverInit};
use tokio::sync::{mpsc, watch};
use webrtc::media_stream::track_remote::{TrackRemote, TrackRemoteEvent};
use webrtc::peer_connection::RTCPeerConnectionState;

use super::super::TransportError;
use super::super::h264::H264Decoder;
use super::super::peer;
use super::super::rtp::{AccessUnitAssembler, Assembled};
use super::{
    DECODE_QUEUE, MAX_ACCESS_UNIT_BYTES, PLI_INTERVAL, PublisherSlot, SessionAnswer, Shared,
    WebRtcStream, lock,
};
use crate::engine::Submission;
use crate::ids::random_hex;
use crate::{Frame, PixelFormat};

impl WebRtcStream {
    /// WHIP: answers a publisher's offer. The video track is decoded and fed to the engine;
    /// audio is accepted and dropped. While the stream's publisher is connected or still
    /// connecting, another is refused ([`TransportError::PublisherPresent`], 409); once its
    /// connection has failed, closed or lost contact (a camera that reconnects without having
    /// sent DELETE), or it was DELETEd, or it did not connect in time, a new one takes its place.
    pub async fn publish(&self, offer_sdp: &str) -> Result<SessionAnswer, TransportError> {
        self.check_open()?;
        let offer = peer::parse_offer(offer_sdp)?;
        // Refused before a peer connection is built for it; checked again when it is installed.
        if lock(&self.shared.publisher)
            .as_ref()
            .is_some_and(|p| !p.is_gone())
        {
            self.shared.stats().counters.publisher_offers_refused += 1;
            return Err(TransportError::PublisherPresent);
        }
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
        let installed = {
            let mut slot = lock(&self.shared.publisher);
            if slot.as_ref().is_some_and(|p| !p.is_gone()) {
                Err(())
            } else {
                Ok(slot.replace(PublisherSlot {
                    id: id.clone(),
                    connection: peer.connection.clone(),
                    state: peer.state.clone(),
                }))
            }
        };
        let previous = match installed {
            Ok(previous) => previous,
            // Another publisher got in while this one was being answered.
            Err(()) => {
                let _ = peer.connection.close().await;
                self.shared.stats().counters.publisher_offers_refused += 1;
                return Err(TransportError::PublisherPresent);
            }
        };
        if let Some(previous) = previous {
            let _ = previous.connection.close().await;
        }
        self.shared.stats().counters.publisher_offers_answered += 1;
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
        let state = peer.state.clone();
        tokio::spawn(async move { watch_publisher(shared, watched_id, state).await });
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
}

/// Frees the publisher slot of session `id` when its connection does not come up within the
/// connect timeout, or when it fails or closes later.
async fn watch_publisher(
    shared: Arc<Shared>,
    id: String,
    mut state: watch::Receiver<RTCPeerConnectionState>,
) {
    let connected = {
        let settled = tokio::time::timeout(
            shared.config.connect_timeout,
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
    if connected {
        // An error means the connection is gone (its sender dropped): the end as well.
        let _ = state
            .wait_for(|s| {
                matches!(
                    s,
                    RTCPeerConnectionState::Failed | RTCPeerConnectionState::Closed
                )
            })
            .await;
    }
    let finished = {
        let mut slot = lock(&shared.publisher);
        if slot.as_ref().is_some_and(|p| p.id == id) {
            slot.take()
        } else {
            None
        }
    };
    if let Some(finished) = finished {
        if !connected {
            shared.stats().counters.publishers_connect_failed += 1;
        }
        let _ = finished.connection.close().await;
    }
}

/// Reads one remote track: video is assembled, decoded and submitted; audio is drained.
pub(super) async fn receive_track(shared: Arc<Shared>, track: Arc<dyn TrackRemote>) {
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

pub(super) fn run_decoder(
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
            .submit(Submission::new(frame).timestamp(shared.micros(arrived)))
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
