//! WHEP egress: viewer sessions, the output pump (one encode for all viewers) and each
//! viewer's sending task.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::Bytes;
use rtc::media::Sample;
use rtc::media_stream::MediaStreamTrack;
use rtc::rtp_transceiver::rtp_sender::{
    RTCRtpCodingParameters, RTCRtpEncodingParameters, RtpCodecKind,
};
use tokio::sync::mpsc;
use webrtc::media_stream::track_local::static_sample::TrackLocalStaticSample;
use webrtc::media_stream::track_local::{TrackLocal, TrackLocalEvent};
use webrtc::peer_connection::{PeerConnection, RTCPeerConnectionState, RTCSessionDescription};

use super::super::TransportError;
use super::super::h264::H264Encoder;
use super::super::peer;
use super::{EncodedFrame, MediaHub, SessionAnswer, Shared, VIEWER_QUEUE, ViewerSlot, lock};
use sdstream::PixelFormat;
use sdstream::ids::random_hex;

impl MediaHub {
    /// WHEP: answers a viewer's offer with a track of the engine's output, H.264. Frames flow
    /// once the viewer connects, from a keyframe. A full stream makes room by ending its oldest
    /// session still connecting (see [`TransportConfig::max_pending_viewers`]); only when every
    /// session is connected is the offer refused.
    ///
    /// [`TransportConfig::max_pending_viewers`]: crate::webrtc::TransportConfig::max_pending_viewers
    pub async fn play(&self, offer_sdp: &str) -> Result<SessionAnswer, TransportError> {
        self.check_open()?;
        let offer = peer::parse_offer(offer_sdp)?;
        let id = random_hex();
        for evicted in self.reserve_viewer(&id)? {
            let _ = evicted.close().await;
        }
        let answered = self.answer_viewer(&id, offer).await;
        if answered.is_err() {
            // Give the reservation back (it has no connection yet, so nothing else holds it).
            lock(&self.shared.viewers).remove(&id);
        }
        answered
    }

    /// Holds a place for viewer `id` (still connecting), ending the oldest sessions still
    /// connecting while the stream has no room; returns their connections, to be closed.
    pub(super) fn reserve_viewer(
        &self,
        id: &str,
    ) -> Result<Vec<Arc<dyn PeerConnection>>, TransportError> {
        let limit = self.shared.config.max_viewers.max(1);
        let pending_limit = self.shared.config.max_pending_viewers.max(1);
        let mut viewers = lock(&self.shared.viewers);
        let live = viewers.values().filter(|v| v.frames.is_some()).count();
        let pending = viewers.len() - live;
        let needed = (viewers.len() + 1)
            .saturating_sub(limit)
            .max((pending + 1).saturating_sub(pending_limit));
        // Only sessions whose answer is out give way: one still being answered is about to be.
        let mut candidates: Vec<(Instant, String)> = viewers
            .iter()
            .filter(|(_, v)| v.frames.is_none() && v.connection.is_some())
            .map(|(k, v)| (v.since, k.clone()))
            .collect();
        if candidates.len() < needed {
            drop(viewers);
            self.shared.stats().counters.viewer_offers_refused += 1;
            return Err(TransportError::TooManyViewers(limit));
        }
        candidates.sort();
        let evicted: Vec<Arc<dyn PeerConnection>> = candidates[..needed]
            .iter()
            .filter_map(|(_, k)| viewers.remove(k).and_then(|v| v.connection))
            .collect();
        viewers.insert(
            id.to_owned(),
            ViewerSlot {
                since: Instant::now(),
                connection: None,
                frames: None,
            },
        );
        drop(viewers);
        self.shared.stats().counters.viewers_evicted += evicted.len() as u64;
        Ok(evicted)
    }

    /// Builds viewer `id`'s peer connection and track, answers, and starts its task.
    async fn answer_viewer(
        &self,
        id: &str,
        offer: RTCSessionDescription,
    ) -> Result<SessionAnswer, TransportError> {
        let OutputPeer {
            peer,
            track,
            ssrc,
            sender,
            sdp,
        } = answer_with_output(&self.shared, id, offer, peer::Receives::Nothing).await?;
        let installed = match lock(&self.shared.viewers).get_mut(id) {
            Some(slot) => {
                slot.connection = Some(peer.connection.clone());
                true
            }
            // The stream was closed meanwhile (close() empties the table).
            None => false,
        };
        if !installed {
            let _ = peer.connection.close().await;
            return Err(TransportError::Closed);
        }
        self.shared.stats().counters.viewer_offers_answered += 1;
        tracing::info!(session = %id, "WHEP viewer answered");
        let shared = self.shared.clone();
        let viewer_id = id.to_owned();
        let state = peer.state.clone();
        tokio::spawn(async move {
            run_viewer(shared, viewer_id, state, track, sender, ssrc).await;
        });
        Ok(SessionAnswer {
            session_id: id.to_owned(),
            sdp,
        })
    }

    /// WHEP `DELETE`: ends the viewer session `session_id`.
    pub async fn stop_playing(&self, session_id: &str) -> Result<(), TransportError> {
        let ended = lock(&self.shared.viewers).remove(session_id);
        match ended {
            Some(slot) => {
                if let Some(connection) = slot.connection {
                    let _ = connection.close().await;
                }
                Ok(())
            }
            None => Err(TransportError::NotFound(format!(
                "viewer session {session_id:?}"
            ))),
        }
    }
}

/// A new video track for the engine's output (H.264, a random SSRC) and its SSRC.
/// A peer connection that sends session `id` the hub's output, answered: what WHEP viewers and
/// duplex sessions both set up.
pub(super) struct OutputPeer {
    pub(super) peer: peer::Peer,
    pub(super) track: Arc<TrackLocalStaticSample>,
    pub(super) ssrc: u32,
    pub(super) sender: Arc<dyn webrtc::rtp_transceiver::RtpSender>,
    /// The answer's SDP.
    pub(super) sdp: String,
}

/// Builds a peer that takes what `receives` says from the remote peer, adds session `id`'s
/// output track and answers `offer`. The track is added before the offer is applied, so that it
/// is sent on the offer's own video section (a duplex offer's then becomes send-receive) rather
/// than needing one of its own. On any failure the connection is closed.
pub(super) async fn answer_with_output(
    shared: &Shared,
    id: &str,
    offer: RTCSessionDescription,
    receives: peer::Receives,
) -> Result<OutputPeer, TransportError> {
    let mut peer = peer::build(&shared.config, receives).await?;
    let outcome = async {
        let (track, ssrc) = output_track(id)?;
        let sender = peer
            .connection
            .add_track(track.clone() as Arc<dyn TrackLocal>)
            .await
            .map_err(|e| TransportError::WebRtc(e.to_string()))?;
        let sdp = peer::answer(&mut peer, offer, shared.config.gather_timeout).await?;
        Ok::<_, TransportError>((track, ssrc, sender, sdp))
    }
    .await;
    match outcome {
        Ok((track, ssrc, sender, sdp)) => Ok(OutputPeer {
            peer,
            track,
            ssrc,
            sender,
            sdp,
        }),
        Err(e) => {
            let _ = peer.connection.close().await;
            Err(e)
        }
    }
}

fn output_track(session_id: &str) -> Result<(Arc<TrackLocalStaticSample>, u32), TransportError> {
    let ssrc = random_hex()
        .get(..8)
        .and_then(|h| u32::from_str_radix(h, 16).ok())
        .unwrap_or(0x5d5_7a3e);
    let track = TrackLocalStaticSample::new(
        Instant::now(),
        MediaStreamTrack::new(
            "sdstream".to_owned(),
            format!("sdstream-video-{session_id}"),
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
    .map_err(|e| TransportError::WebRtc(e.to_string()))?;
    Ok((Arc::new(track), ssrc))
}

/// Takes every engine output; encodes it once when anyone watches and queues it per viewer.
pub(super) fn run_pump(shared: &Shared) {
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
            s.pipeline.record(output.timings.total);
        }
        let queues: Vec<mpsc::Sender<Arc<EncodedFrame>>> = lock(&shared.viewers)
            .values()
            .filter_map(|v| v.frames.clone())
            .collect();
        let sinks: Vec<mpsc::Sender<Arc<EncodedFrame>>> =
            lock(&shared.sinks).values().cloned().collect();
        let duration = last_output
            .map(|t| received.saturating_duration_since(t))
            .unwrap_or(Duration::from_millis(33))
            .clamp(Duration::from_millis(1), Duration::from_secs(1));
        last_output = Some(received);
        if queues.is_empty() && sinks.is_empty() {
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
            width: image.width,
            height: image.height,
            duration,
            arrived: shared.instant(output.timestamp),
            taken: received,
            encoded: Instant::now(),
            pipeline: output.timings.total,
        });
        for queue in queues {
            if let Err(mpsc::error::TrySendError::Full(_)) = queue.try_send(frame.clone()) {
                shared.stats().counters.frames_dropped_for_viewers += 1;
                shared.keyframe_wanted.store(true, Ordering::Release);
            }
        }
        for sink in sinks {
            // The stats are held across the (non-blocking) send, so a reader that has the
            // frame also sees it counted.
            let mut s = shared.stats();
            match sink.try_send(frame.clone()) {
                Ok(()) => {
                    s.counters.frames_to_sinks += 1;
                    s.sink_delivery.record(received.elapsed());
                }
                Err(mpsc::error::TrySendError::Full(_)) => {
                    s.counters.frames_dropped_for_sinks += 1;
                    shared.keyframe_wanted.store(true, Ordering::Release);
                }
                // Unsubscribed meanwhile.
                Err(mpsc::error::TrySendError::Closed(_)) => {}
            }
        }
    }
}

/// One viewer's life: wait for the connection, then send frames until it ends.
pub(super) async fn run_viewer(
    shared: Arc<Shared>,
    id: String,
    mut state: tokio::sync::watch::Receiver<RTCPeerConnectionState>,
    track: Arc<TrackLocalStaticSample>,
    sender: Arc<dyn webrtc::rtp_transceiver::RtpSender>,
    ssrc: u32,
) {
    let is_connected = shared.connects_in_time(&mut state).await;
    let payload_type = match sender.get_parameters().await {
        Ok(p) => p.rtp_parameters.codecs.first().map(|c| c.payload_type),
        Err(_) => None,
    };
    let (Some(payload_type), true) = (payload_type, is_connected) else {
        // Still connecting unless DELETE or a newer offer (which counted it) took it already.
        let slot = lock(&shared.viewers).remove(&id);
        if let Some(slot) = slot {
            shared.stats().counters.viewers_connect_failed += 1;
            if let Some(connection) = slot.connection {
                let _ = connection.close().await;
            }
        }
        return;
    };
    let (frames_tx, mut frames_rx) = mpsc::channel::<Arc<EncodedFrame>>(VIEWER_QUEUE);
    {
        let mut viewers = lock(&shared.viewers);
        match viewers.get_mut(&id) {
            Some(slot) => slot.frames = Some(frames_tx),
            // Deleted, or made room for a newer offer, while connecting.
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
        s.counters.media_bytes_sent += frame.data.len() as u64;
        if s.last_timed.is_none_or(|last| frame.seq > last) {
            s.last_timed = Some(frame.seq);
            s.send.record(now.saturating_duration_since(frame.taken));
            let total = now.saturating_duration_since(frame.arrived);
            s.transport.record(total.saturating_sub(frame.pipeline));
        }
    }
    end_viewer(&shared, &id).await;
}

pub(super) async fn end_viewer(shared: &Shared, id: &str) {
    let slot = lock(&shared.viewers).remove(id);
    if slot.is_some() {
        tracing::info!(session = %id, "WHEP viewer session ended");
    }
    if let Some(connection) = slot.and_then(|s| s.connection) {
        let _ = connection.close().await;
    }
}
