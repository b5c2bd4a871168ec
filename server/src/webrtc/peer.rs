//! Building peer connections for WHIP and WHEP: one codec set (H.264 constrained baseline,
//! Opus accepted), the default interceptors (NACK, RTCP reports) plus one that hands keyframe
//! requests to the application, and non-trickle answering.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rtc::ice::mdns::MulticastDnsMode;
use rtc::interceptor::{Attribute, Interceptor, Packet, Registry, Slot, StreamInfo, TaggedPacket};
use rtc::peer_connection::configuration::interceptor_registry::register_default_interceptors;
use rtc::peer_connection::configuration::media_engine::{
    MIME_TYPE_H264, MIME_TYPE_OPUS, MediaEngine,
};
use rtc::rtcp::payload_feedbacks::full_intra_request::FullIntraRequest;
use rtc::rtcp::payload_feedbacks::picture_loss_indication::PictureLossIndication;
use rtc::rtp_transceiver::rtp_sender::{
    RTCPFeedback, RTCRtpCodec, RTCRtpCodecParameters, RtpCodecKind,
};
use rtc::sansio::Protocol;
use tokio::sync::{mpsc, watch};
use webrtc::data_channel::DataChannel;
use webrtc::media_stream::track_remote::TrackRemote;
use webrtc::peer_connection::{
    PeerConnection, PeerConnectionBuilder, PeerConnectionEventHandler, RTCConfigurationBuilder,
    RTCIceGatheringState, RTCIceServer, RTCPeerConnectionState, RTCSessionDescription,
    SettingEngineBuilder,
};

use super::{TransportConfig, TransportError};

/// Payload type of H.264 in our offers' answers when the offer does not decide it.
const H264_PAYLOAD_TYPE: u8 = 102;
/// Payload type of the second H.264 flavour (profile-level-id 42001f, what aiortc lists first).
const H264_BASELINE_PAYLOAD_TYPE: u8 = 104;
const OPUS_PAYLOAD_TYPE: u8 = 111;

/// The codec every WHEP track is created with: constrained baseline, level 3.1, non-interleaved.
pub(crate) fn h264_codec() -> RTCRtpCodec {
    h264_codec_with_profile("42e01f")
}

fn h264_codec_with_profile(profile_level_id: &str) -> RTCRtpCodec {
    let feedback = |typ: &str, parameter: &str| RTCPFeedback {
        typ: typ.to_owned(),
        parameter: parameter.to_owned(),
    };
    RTCRtpCodec {
        mime_type: MIME_TYPE_H264.to_owned(),
        clock_rate: 90_000,
        channels: 0,
        sdp_fmtp_line: format!(
            "level-asymmetry-allowed=1;packetization-mode=1;profile-level-id={profile_level_id}"
        ),
        rtcp_feedback: vec![
            feedback("nack", ""),
            feedback("nack", "pli"),
            feedback("ccm", "fir"),
        ],
    }
}

fn media_engine() -> Result<MediaEngine, TransportError> {
    let mut engine = MediaEngine::default();
    let webrtc = |e: rtc::shared::error::Error| TransportError::WebRtc(e.to_string());
    for (profile, payload_type) in [
        ("42e01f", H264_PAYLOAD_TYPE),
        ("42001f", H264_BASELINE_PAYLOAD_TYPE),
    ] {
        engine
            .register_codec(
                RTCRtpCodecParameters {
                    rtp_codec: h264_codec_with_profile(profile),
                    payload_type,
                },
                RtpCodecKind::Video,
            )
            .map_err(webrtc)?;
    }
    engine
        .register_codec(
            RTCRtpCodecParameters {
                rtp_codec: RTCRtpCodec {
                    mime_type: MIME_TYPE_OPUS.to_owned(),
                    clock_rate: 48_000,
                    channels: 2,
                    sdp_fmtp_line: "minptime=10;useinbandfec=1".to_owned(),
                    rtcp_feedback: vec![],
                },
                payload_type: OPUS_PAYLOAD_TYPE,
            },
            RtpCodecKind::Audio,
        )
        .map_err(webrtc)?;
    Ok(engine)
}

/// Lets inbound PLI and FIR through to the application (the default chain keeps all inbound
/// RTCP to itself); every other RTCP packet stays with the interceptors.
struct KeyframeRequestTap {
    read: VecDeque<TaggedPacket>,
    write: VecDeque<TaggedPacket>,
}

impl Protocol<TaggedPacket, TaggedPacket, ()> for KeyframeRequestTap {
    type Rout = TaggedPacket;
    type Wout = TaggedPacket;
    type Eout = ();
    type Error = rtc::shared::error::Error;
    type Time = Instant;

    fn handle_read(&mut self, mut msg: TaggedPacket) -> Result<(), Self::Error> {
        if let Packet::Rtcp(packets) = &msg.message.packet {
            let requests: Vec<_> = packets
                .iter()
                .filter(|p| {
                    let any = p.as_any();
                    any.is::<PictureLossIndication>() || any.is::<FullIntraRequest>()
                })
                .cloned()
                .collect();
            if requests.is_empty() {
                return Ok(());
            }
            msg.message.packet = Packet::Rtcp(requests);
            msg.message.add(Attribute::DeliverToApplication);
        }
        self.read.push_back(msg);
        Ok(())
    }

    fn poll_read(&mut self) -> Option<TaggedPacket> {
        self.read.pop_front()
    }

    fn handle_write(&mut self, msg: TaggedPacket) -> Result<(), Self::Error> {
        self.write.push_back(msg);
        Ok(())
    }

    fn poll_write(&mut self) -> Option<TaggedPacket> {
        self.write.pop_front()
    }
}

impl Interceptor for KeyframeRequestTap {
    fn bind_local_stream(&mut self, _info: &StreamInfo) {}
    fn unbind_local_stream(&mut self, _info: &StreamInfo) {}
    fn bind_remote_stream(&mut self, _info: &StreamInfo) {}
    fn unbind_remote_stream(&mut self, _info: &StreamInfo) {}
}

/// Forwards the peer connection's events to channels the session tasks wait on.
struct Events {
    gathered: watch::Sender<bool>,
    state: watch::Sender<RTCPeerConnectionState>,
    tracks: Option<mpsc::UnboundedSender<Arc<dyn TrackRemote>>>,
    data_channels: Option<mpsc::UnboundedSender<Arc<dyn DataChannel>>>,
}

#[async_trait::async_trait]
impl PeerConnectionEventHandler for Events {
    async fn on_ice_gathering_state_change(&self, state: RTCIceGatheringState) {
        if state == RTCIceGatheringState::Complete {
            let _ = self.gathered.send(true);
        }
    }

    async fn on_connection_state_change(&self, state: RTCPeerConnectionState) {
        let _ = self.state.send(state);
    }

    async fn on_track(&self, track: Arc<dyn TrackRemote>) {
        if let Some(tracks) = &self.tracks {
            let _ = tracks.send(track);
        }
    }

    async fn on_data_channel(&self, channel: Arc<dyn DataChannel>) {
        if let Some(channels) = &self.data_channels {
            let _ = channels.send(channel);
        }
    }
}

/// A new peer connection and the channels its events arrive on.
pub(crate) struct Peer {
    pub(crate) connection: Arc<dyn PeerConnection>,
    gathered: watch::Receiver<bool>,
    /// The connection state, as last reported.
    pub(crate) state: watch::Receiver<RTCPeerConnectionState>,
    /// Remote tracks (publishers only).
    pub(crate) tracks: Option<mpsc::UnboundedReceiver<Arc<dyn TrackRemote>>>,
    /// Data channels the remote peer opens (duplex sessions only).
    pub(crate) data_channels: Option<mpsc::UnboundedReceiver<Arc<dyn DataChannel>>>,
}

/// What a peer connection takes from the remote peer besides the answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Receives {
    /// Nothing: a viewer (WHEP).
    Nothing,
    /// Its tracks, on [`Peer::tracks`]: a publisher (WHIP).
    Tracks,
    /// Its tracks and the data channels it opens, on [`Peer::data_channels`]: a duplex session.
    TracksAndDataChannels,
}

/// Builds a peer connection that takes what `receives` says from the remote peer.
pub(crate) async fn build(
    config: &TransportConfig,
    receives: Receives,
) -> Result<Peer, TransportError> {
    let webrtc = |e: rtc::shared::error::Error| TransportError::WebRtc(e.to_string());
    let mut media_engine = media_engine()?;
    let registry = register_default_interceptors(Registry::new(), &mut media_engine)
        .map_err(webrtc)?
        // Last in the chain, so the default interceptors have seen every RTCP packet first.
        .with(
            Slot::from(14_000),
            KeyframeRequestTap {
                read: VecDeque::new(),
                write: VecDeque::new(),
            },
        );
    let ice_servers: Vec<RTCIceServer> = config
        .ice_servers
        .iter()
        .map(|server| RTCIceServer {
            urls: server.urls.clone(),
            username: server.username.clone().unwrap_or_default(),
            credential: server.credential.clone().unwrap_or_default(),
        })
        .collect();
    let configuration = RTCConfigurationBuilder::new()
        .with_ice_servers(ice_servers)
        .build();
    let (gathered_tx, gathered) = watch::channel(false);
    let (state_tx, state) = watch::channel(RTCPeerConnectionState::New);
    let (tracks_tx, tracks) = if receives == Receives::Nothing {
        (None, None)
    } else {
        let (tx, rx) = mpsc::unbounded_channel();
        (Some(tx), Some(rx))
    };
    let (channels_tx, data_channels) = if receives == Receives::TracksAndDataChannels {
        let (tx, rx) = mpsc::unbounded_channel();
        (Some(tx), Some(rx))
    } else {
        (None, None)
    };
    let events = Arc::new(Events {
        gathered: gathered_tx,
        state: state_tx,
        tracks: tracks_tx,
        data_channels: channels_tx,
    });
    // webrtc-rs resolves `.local` candidates by default (mode QueryOnly: a multicast socket on
    // port 5353 per connection, a query per name). Disabled, the ICE agent drops them unresolved.
    let mdns = if config.resolve_mdns_candidates {
        MulticastDnsMode::QueryOnly
    } else {
        MulticastDnsMode::Disabled
    };
    let setting_engine = SettingEngineBuilder::new()
        .with_multicast_dns_mode(mdns)
        .build();
    let connection = PeerConnectionBuilder::new()
        .with_setting_engine(setting_engine)
        .with_configuration(configuration)
        .with_media_engine(media_engine)
        .with_interceptor_registry(registry)
        .with_handler(events)
        .with_udp_addrs(config.udp_addrs.clone())
        .build()
        .await
        .map_err(webrtc)?;
    Ok(Peer {
        connection: Arc::new(connection),
        gathered,
        state,
        tracks,
        data_channels,
    })
}

/// Checks that `sdp` is an offer a session can answer, the same way a session reads it (SDP
/// syntax, a video section with H.264), without building anything: what a caller runs before
/// spending a stream or an engine on it. A [`TransportError::BadOffer`] says what is wrong.
pub fn check_offer(sdp: &str) -> Result<(), TransportError> {
    parse_offer(sdp).map(|_| ())
}

/// Whether a candidate attribute (`candidate:… <address> <port> typ …`) names an mDNS host
/// (`<name>.local`) rather than an address.
pub(crate) fn is_mdns_candidate(attribute: &str) -> bool {
    let bare = attribute.strip_prefix("candidate:").unwrap_or(attribute);
    // foundation component transport priority address port typ type …
    bare.split_ascii_whitespace()
        .nth(4)
        .is_some_and(|address| address.to_ascii_lowercase().ends_with(".local"))
}

/// Parses an offer; garbage is a [`TransportError::BadOffer`].
pub(crate) fn parse_offer(sdp: &str) -> Result<RTCSessionDescription, TransportError> {
    if !sdp.trim_start().starts_with("v=") {
        return Err(TransportError::BadOffer(
            "an SDP offer starts with a \"v=\" line".into(),
        ));
    }
    let offer = RTCSessionDescription::offer(sdp.to_owned())
        .map_err(|e| TransportError::BadOffer(e.to_string()))?;
    let parsed = offer
        .unmarshal()
        .map_err(|e| TransportError::BadOffer(e.to_string()))?;
    let videos: Vec<_> = parsed
        .media_descriptions
        .iter()
        .filter(|m| m.media_name.media == "video")
        .collect();
    if videos.is_empty() {
        return Err(TransportError::BadOffer(
            "the offer has no video media section".into(),
        ));
    }
    // A browser told to prefer another codec (Daydream Scope's page forces VP8) would get an
    // answer without video: say why instead.
    let offers_h264 = videos.iter().any(|m| {
        m.attributes.iter().any(|a| {
            a.key == "rtpmap"
                && a.value
                    .as_deref()
                    .is_some_and(|v| v.to_ascii_uppercase().contains(" H264/"))
        })
    });
    if !offers_h264 {
        let offered: Vec<String> = videos
            .iter()
            .flat_map(|m| m.attributes.iter())
            .filter(|a| a.key == "rtpmap")
            .filter_map(|a| a.value.as_deref())
            .filter_map(|v| v.split_once(' ').map(|(_, codec)| codec.to_owned()))
            .collect();
        return Err(TransportError::BadOffer(format!(
            "the offer's video has no H.264 (it offers {}); sdstream sends and receives H.264 \
             only: allow H.264 in the client's codec preferences",
            if offered.is_empty() {
                "no codec".to_owned()
            } else {
                offered.join(", ")
            }
        )));
    }
    Ok(offer)
}

/// Applies the offer, answers, waits for ICE gathering (non-trickle: the answer carries every
/// candidate) and returns the answer's SDP.
pub(crate) async fn answer(
    peer: &mut Peer,
    offer: RTCSessionDescription,
    gather_timeout: Duration,
) -> Result<String, TransportError> {
    let pc = &peer.connection;
    pc.set_remote_description(offer)
        .await
        .map_err(|e| TransportError::BadOffer(e.to_string()))?;
    let answer = pc
        .create_answer(None)
        .await
        .map_err(|e| TransportError::BadOffer(format!("cannot answer the offer: {e}")))?;
    // The answer was made from the offer a moment ago: where applying it fails, the offer's
    // contents are at fault (an SSRC line that names no number, say), not the server.
    pc.set_local_description(answer)
        .await
        .map_err(|e| TransportError::BadOffer(format!("cannot use the offer: {e}")))?;
    let gathered = peer.gathered.wait_for(|done| *done);
    // On timeout the answer goes out with the candidates gathered so far.
    let _ = tokio::time::timeout(gather_timeout, gathered).await;
    let local = pc
        .local_description()
        .await
        .ok_or_else(|| TransportError::WebRtc("no local description after answering".into()))?;
    Ok(local.sdp)
}
