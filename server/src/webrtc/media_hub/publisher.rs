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
    DECODE_QUEUE, IngestKind, MAX_ACCESS_UNIT_BYTES, MediaHub, PLI_INTERVAL, PublisherLink,
    PublisherSlot, SessionAnswer, Shared, lock,
};
use sdstream::engine::Submission;
use sdstream::ids::random_hex;
use sdstream::{Frame, PixelFormat};

impl MediaHub {
    /// WHIP: answers a publisher's offer. The video track is decoded and fed to the engine;
    /// audio is accepted and dropped. While the stream's publisher is connected or still
    /// connecting, another is refused ([`TransportError::PublisherPresent`], 409); once its
    /// connection has failed, closed or lost contact (a camera that reconnects without having
    /// sent DELETE), or it was DELETEd, or it did not connect in time, a new one takes its place.
    pub async fn publish(&self, offer_sdp: &str) -> Result<SessionAnswer, TransportError> {
        self.check_open()?;
        let offer = peer::parse_offer(offer_sdp)?;
        // Refused before a peer connection is built for it; checked again when it is installed.
        self.shared.check_publisher_place()?;
        let mut peer = peer::build(&self.shared.config, peer::Receives::Tracks).await?;
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
        let slot = PublisherSlot {
            id: id.clone(),
            kind: IngestKind::Whip,
            link: PublisherLink::Peer(peer.connection.clone()),
            state: peer.state.clone(),
        };
        if let Err(e) = self.shared.install_publisher(slot).await {
            // Another publisher got in while this one was being answered.
            let _ = peer.connection.close().await;
            return Err(e);
        }
        tracing::info!(session = %id, "WHIP publisher answered");
        start_publisher_tasks(&self.shared, &id, &mut peer);
        Ok(SessionAnswer {
            session_id: id,
            sdp,
        })
    }

    /// WHIP `DELETE`: ends the publisher session `session_id`.
    pub async fn unpublish(&self, session_id: &str) -> Result<(), TransportError> {
        match self.shared.take_publisher(session_id) {
            Some(ended) => {
                self.shared.publisher_lost(Instant::now());
                tracing::info!(session = %session_id, "WHIP publisher deleted");
                ended.end().await;
                Ok(())
            }
            None => Err(TransportError::NotFound(format!(
                "publisher session {session_id:?}"
            ))),
        }
    }
}

impl Shared {
    /// Refuses a new publisher while the stream's publisher is connected or connecting
    /// ([`TransportError::PublisherPresent`], counted).
    pub(super) fn check_publisher_place(&self) -> Result<(), TransportError> {
        if lock(&self.publisher).as_ref().is_some_and(|p| !p.is_gone()) {
            self.stats().counters.publisher_offers_refused += 1;
            return Err(TransportError::PublisherPresent);
        }
        Ok(())
    }

    /// Makes `slot` the stream's publisher, ending a previous one that has gone; refuses it
    /// (counted) while another is connected or connecting. The one place where a publisher of
    /// any kind takes the stream.
    pub(super) async fn install_publisher(
        &self,
        slot: PublisherSlot,
    ) -> Result<(), TransportError> {
        let kind = slot.kind;
        let previous = {
            let mut current = lock(&self.publisher);
            if current.as_ref().is_some_and(|p| !p.is_gone()) {
                None
            } else {
                Some(current.replace(slot))
            }
        };
        let Some(previous) = previous else {
            self.stats().counters.publisher_offers_refused += 1;
            return Err(TransportError::PublisherPresent);
        };
        if let Some(previous) = previous {
            previous.end().await;
        }
        let mut s = self.stats();
        s.counters.publisher_offers_answered += 1;
        s.ever_published = true;
        s.publisher_lost = None;
        s.publisher_kind = Some(kind);
        Ok(())
    }

    /// Takes the publisher slot if session `id` still holds it.
    pub(super) fn take_publisher(&self, id: &str) -> Option<PublisherSlot> {
        let mut slot = lock(&self.publisher);
        if slot.as_ref().is_some_and(|p| p.id == id) {
            slot.take()
        } else {
            None
        }
    }
}

/// Starts the tasks of a publisher's peer connection: its tracks are read (video decoded and
/// submitted) and its slot is freed when the connection does not come up or ends.
pub(super) fn start_publisher_tasks(shared: &Arc<Shared>, id: &str, peer: &mut peer::Peer) {
    if let Some(mut tracks) = peer.tracks.take() {
        let shared = shared.clone();
        tokio::spawn(async move {
            while let Some(track) = tracks.recv().await {
                let shared = shared.clone();
                tokio::spawn(async move { receive_track(shared, track).await });
            }
        });
    }
    let shared = shared.clone();
    let watched_id = id.to_owned();
    let state = peer.state.clone();
    tokio::spawn(async move { watch_publisher(shared, watched_id, state).await });
}

/// Frees the publisher slot of session `id` when its connection does not come up within the
/// connect timeout, or when it fails or closes later.
async fn watch_publisher(
    shared: Arc<Shared>,
    id: String,
    mut state: watch::Receiver<RTCPeerConnectionState>,
) {
    let connected = shared.connects_in_time(&mut state).await;
    if connected {
        tracing::info!(session = %id, "WHIP publisher connected");
        shared.stats().publisher_lost = None;
        // Lost contact (ICE disconnected: consent checks unanswered, which is how a peer that
        // closed shows, since webrtc-rs does not surface its DTLS close_notify here) counts as
        // gone at once for the stream's state; the session ends on failed or closed. An error
        // means the connection is gone (its sender dropped): the end as well.
        while state.changed().await.is_ok() {
            let now = *state.borrow_and_update();
            match now {
                RTCPeerConnectionState::Disconnected => {
                    tracing::info!(session = %id, "WHIP publisher lost contact");
                    shared.publisher_lost(Instant::now());
                }
                RTCPeerConnectionState::Connected => shared.stats().publisher_lost = None,
                RTCPeerConnectionState::Failed | RTCPeerConnectionState::Closed => break,
                _ => {}
            }
        }
    }
    if let Some(finished) = shared.take_publisher(&id) {
        shared.publisher_lost(Instant::now());
        if !connected {
            shared.stats().counters.publishers_connect_failed += 1;
        }
        tracing::info!(session = %id, connected, kind = finished.kind.as_str(), "publisher session ended");
        finished.end().await;
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
    let mut reception = Reception::default();
    while let Some(event) = track.poll().await {
        let TrackRemoteEvent::OnRtpPacket(packet) = event else {
            continue;
        };
        let h = &packet.header;
        {
            let now = Instant::now();
            let arrival = now.saturating_duration_since(shared.epoch).as_secs_f64();
            reception.packet(h.sequence_number, h.timestamp, arrival);
            let mut s = shared.stats();
            s.last_media = Some(now);
            s.counters.media_packets_received += 1;
            s.counters.media_bytes_received += packet.payload.len() as u64;
            s.counters.media_packets_lost = reception.lost();
            s.counters.media_jitter_ms = reception.jitter_ms();
        }
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
        // Decoded even while paused, so that the decoder's references stay whole.
        if shared.paused.load(Ordering::Acquire) {
            shared.stats().counters.frames_paused += 1;
            continue;
        }
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

/// RTP reception statistics of one video track (RFC 3550 §6.4.1 and appendix A.3): packets
/// lost from the span of extended sequence numbers seen, and the interarrival jitter.
#[derive(Debug, Default)]
pub(super) struct Reception {
    /// First and highest extended sequence numbers seen.
    span: Option<(u64, u64)>,
    received: u64,
    /// Transit time (arrival − RTP timestamp) of the previous packet, in 90 kHz units.
    transit: Option<f64>,
    /// Jitter in 90 kHz units.
    jitter: f64,
}

/// The video RTP clock.
const VIDEO_CLOCK_HZ: f64 = 90_000.0;

impl Reception {
    /// A packet with sequence number `seq` and RTP timestamp `timestamp` arrived at `arrival`
    /// seconds (any fixed origin).
    pub(super) fn packet(&mut self, seq: u16, timestamp: u32, arrival: f64) {
        self.received += 1;
        self.span = Some(match self.span {
            None => (u64::from(seq), u64::from(seq)),
            Some((first, highest)) => {
                // The signed distance from the highest so far, modulo 2^16: wraps count
                // forward; late packets (reordered, retransmitted) move nothing.
                let step = seq.wrapping_sub(highest as u16) as i16;
                (first, highest + u64::from(step.max(0) as u16))
            }
        });
        let transit = arrival * VIDEO_CLOCK_HZ - f64::from(timestamp);
        if let Some(previous) = self.transit {
            // Timestamps wrap at 2^32: take the difference modulo it.
            let mut d = (transit - previous).rem_euclid(4_294_967_296.0);
            if d > 2_147_483_648.0 {
                d -= 4_294_967_296.0;
            }
            self.jitter += (d.abs() - self.jitter) / 16.0;
        }
        self.transit = Some(transit);
    }

    /// Packets expected (the span of sequence numbers) minus packets received, at least 0.
    pub(super) fn lost(&self) -> u64 {
        self.span
            .map(|(first, highest)| (highest - first + 1).saturating_sub(self.received))
            .unwrap_or(0)
    }

    /// The jitter in milliseconds.
    pub(super) fn jitter_ms(&self) -> f64 {
        self.jitter / VIDEO_CLOCK_HZ * 1e3
    }
}

#[cfg(test)]
mod tests {
    use super::Reception;

    #[test]
    fn lost_packets_are_the_gaps_in_the_sequence_numbers_across_a_wrap() {
        let mut r = Reception::default();
        // 65533, 65534, (65535 lost), 0, (1, 2 lost), 3, and 0 again (a retransmission).
        for seq in [65533u16, 65534, 0, 3, 0] {
            r.packet(seq, 0, 0.0);
        }
        assert_eq!(r.lost(), 2, "7 expected, 5 received");
        let mut r = Reception::default();
        for seq in 10u16..20 {
            r.packet(seq, 0, 0.0);
        }
        assert_eq!(r.lost(), 0);
        // A late packet from before the first seen does not widen the span.
        r.packet(5, 0, 0.0);
        assert_eq!(r.lost(), 0);
    }

    #[test]
    fn jitter_follows_rfc_3550() {
        // Packets every 1/30 s with timestamps 3000 apart: no jitter.
        let mut r = Reception::default();
        for i in 0..10u32 {
            r.packet(i as u16, i * 3000, f64::from(i) / 30.0);
        }
        assert!(r.jitter_ms().abs() < 1e-9, "{}", r.jitter_ms());
        // One packet 10 ms late: |D| = 900 ticks, J = 900/16 ticks = 0.625 ms; the next on
        // time adds |D| = 900 again: J = 56.25 + (900 − 56.25)/16.
        r.packet(10, 30_000, 10.0 / 30.0 + 0.010);
        assert!((r.jitter_ms() - 0.625).abs() < 1e-6, "{}", r.jitter_ms());
        r.packet(11, 33_000, 11.0 / 30.0);
        let want = (56.25 + (900.0 - 56.25) / 16.0) / 90.0;
        assert!((r.jitter_ms() - want).abs() < 1e-6, "{}", r.jitter_ms());
        // Timestamps that wrap at 2^32 are no jump.
        let mut r = Reception::default();
        r.packet(0, u32::MAX - 2999, 0.0);
        r.packet(1, 0, 3000.0 / 90_000.0 - 1.0 / 90_000.0);
        r.packet(2, 3000, 6000.0 / 90_000.0 - 1.0 / 90_000.0);
        assert!(r.jitter_ms() < 0.01, "{}", r.jitter_ms());
    }
}
