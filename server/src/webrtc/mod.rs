//! WebRTC transport around an [`Engine`](sdstream::Engine): WHIP ingest and WHEP
//! playback, H.264 both ways.
//!
//! * [`MediaHub`] owns one engine's transport: at most one publisher (WHIP, RFC 9725) whose
//!   video track is depacketized, decoded with OpenH264 and submitted to the engine (a second
//!   one is refused with 409 until the first is gone), and up to
//!   [`max_viewers`](TransportConfig::max_viewers) viewers (WHEP) to which the engine's outputs
//!   are sent, encoded once as constrained-baseline H.264 and packetized per viewer. Keyframe
//!   requests are honoured both ways: a viewer's PLI or FIR (and every new viewer) makes the
//!   next output an IDR picture, and a damaged or undecodable input picture makes the server
//!   send a PLI to the publisher. A session that does not connect within
//!   [`connect_timeout`](TransportConfig::connect_timeout) is ended; viewers still connecting
//!   give way to newer offers ([`max_pending_viewers`](TransportConfig::max_pending_viewers)).
//! * [`router`] serves the WHIP and WHEP HTTP resources for any number of streams through a
//!   [`StreamDirectory`] that finds a stream by id and checks its token: `POST` an SDP offer
//!   (`application/sdp`) → `201 Created` with the answer and a `Location`, `DELETE` that
//!   location to end the session. ICE is not trickled: the answer carries every candidate, and a
//!   `PATCH` of a session is answered 405 as RFC 9725 §4.3 prescribes for a session that
//!   supports neither trickle ICE nor ICE restarts. Errors are JSON envelopes
//!   (`{"success": false, "error", "code", "status"}`, see [`error_response`]).
//!
//! * [`MediaHub::open_duplex`] answers a session whose one connection sends the camera and
//!   receives the output (Daydream Scope's shape): it holds the publisher place and a viewer
//!   place, takes trickled candidates ([`MediaHub::add_remote_candidates`], at most
//!   [`MAX_REMOTE_CANDIDATES`] per session), and hands its data-channel messages to a
//!   [`ControlHandler`]; like a publisher or a viewer, it ends if it does not connect within the
//!   connect timeout. A peer's mDNS candidates (`….local`) are ignored unless
//!   [`resolve_mdns_candidates`](TransportConfig::resolve_mdns_candidates) is set.
//! * [`MediaHub::publish_external`] gives the publisher place to a source outside WebRTC
//!   (RTMP, [`crate::rtmp`]), whose access units go through the same decode thread;
//!   [`MediaHub::subscribe_encoded`] hands the encoded output to consumers outside WebRTC
//!   (HLS, an RTMP push). One publisher at a time, whatever its kind.
//!
//! Audio tracks are accepted and ignored. Everything here runs on a Tokio runtime (the calls are
//! `async`); decoding and encoding run on their own threads so that neither the network tasks
//! nor the engine wait on the codec.

pub mod h264;
mod http;
mod media_hub;
mod peer;
mod rtp;

use std::time::Duration;

pub use h264::EncoderSettings;
pub use http::{
    BODY_TIMEOUT, StreamDirectory, error_envelope, error_response, read_body, request_token, router,
};
pub use media_hub::{
    ControlHandler, EncodedFrame, EncodedSink, ExternalPublisher, FrameObserver, IceCandidate,
    Ingest, IngestKind, MAX_REMOTE_CANDIDATES, MediaHub, PublisherState, SessionAnswer, Summary,
    TransportStats,
};
pub use peer::check_offer;

/// Why a WHIP or WHEP request failed; [`status`](Self::status) is its HTTP status code.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// The body is not `application/sdp` (415).
    #[error("unsupported content type {0:?}: send the SDP offer as application/sdp")]
    UnsupportedMediaType(String),
    /// The offer cannot be used: not SDP, no H.264 video, or no ICE credentials (400).
    #[error("bad SDP offer: {0}")]
    BadOffer(String),
    /// A trickled ICE candidate cannot be used (400).
    #[error("bad ICE candidate: {0}")]
    BadCandidate(String),
    /// A session's peer trickled more candidates than a session takes (400); none of the
    /// request's were added.
    #[error(
        "the session already has {had} trickled candidates and this request brings {more}: a \
         session takes at most {limit}; none of these were added"
    )]
    TooManyCandidates {
        /// Candidates the session had taken before.
        had: usize,
        /// Candidates in the refused request.
        more: usize,
        /// Most a session takes.
        limit: usize,
    },
    /// No such stream or session (404).
    #[error("{0} not found")]
    NotFound(String),
    /// The token is missing or wrong (401).
    #[error("missing or wrong token")]
    Unauthorized,
    /// The body is larger than allowed (413).
    #[error("body of {size} bytes is larger than the {limit}-byte limit")]
    TooLarge {
        /// Bytes received.
        size: usize,
        /// Bytes allowed.
        limit: usize,
    },
    /// The body ended before it was complete: shorter than its `Content-Length`, a chunked body
    /// cut off, or the connection broke (400).
    #[error("the request body is incomplete: {0}")]
    IncompleteBody(String),
    /// The body did not arrive in time (408).
    #[error("the request body did not arrive within {} s", .0.as_secs())]
    BodyTimeout(Duration),
    /// The stream holds as many viewer sessions as it may and none can give way: all connected,
    /// or still being answered (503).
    #[error(
        "the stream has no room for another viewer: it serves {0} at most and none still \
         connecting can give way"
    )]
    TooManyViewers(usize),
    /// The stream already has a publisher whose session is connected or still connecting (409).
    #[error(
        "the stream already has a publisher; DELETE its session first, or publish again once its \
         connection has ended"
    )]
    PublisherPresent,
    /// The stream has been closed (410).
    #[error("the stream is closed")]
    Closed,
    /// The codec failed (500 when it surfaces in a request).
    #[error("codec: {0}")]
    Codec(String),
    /// The WebRTC stack failed (500).
    #[error("WebRTC: {0}")]
    WebRtc(String),
}

impl TransportError {
    /// A stable machine-readable code for the error envelope (`WEBRTC/BAD_OFFER`, …).
    pub fn code(&self) -> &'static str {
        match self {
            TransportError::UnsupportedMediaType(_) => "REQUEST/UNSUPPORTED_MEDIA_TYPE",
            TransportError::BadOffer(_) => "WEBRTC/BAD_OFFER",
            TransportError::BadCandidate(_) => "WEBRTC/BAD_CANDIDATE",
            TransportError::TooManyCandidates { .. } => "WEBRTC/TOO_MANY_CANDIDATES",
            TransportError::NotFound(_) => "WEBRTC/NOT_FOUND",
            TransportError::Unauthorized => "AUTH/UNAUTHORIZED",
            TransportError::TooLarge { .. } => "REQUEST/TOO_LARGE",
            TransportError::IncompleteBody(_) => "REQUEST/INCOMPLETE_BODY",
            TransportError::BodyTimeout(_) => "REQUEST/TIMEOUT",
            TransportError::TooManyViewers(_) => "WEBRTC/TOO_MANY_VIEWERS",
            TransportError::PublisherPresent => "WEBRTC/PUBLISHER_PRESENT",
            TransportError::Closed => "STREAMS/CLOSED",
            TransportError::Codec(_) | TransportError::WebRtc(_) => "WEBRTC/INTERNAL",
        }
    }

    /// The HTTP status code this error is answered with.
    pub fn status(&self) -> u16 {
        match self {
            TransportError::UnsupportedMediaType(_) => 415,
            TransportError::BadOffer(_)
            | TransportError::BadCandidate(_)
            | TransportError::TooManyCandidates { .. } => 400,
            TransportError::NotFound(_) => 404,
            TransportError::Unauthorized => 401,
            TransportError::TooLarge { .. } => 413,
            TransportError::IncompleteBody(_) => 400,
            TransportError::BodyTimeout(_) => 408,
            TransportError::TooManyViewers(_) => 503,
            TransportError::PublisherPresent => 409,
            TransportError::Closed => 410,
            TransportError::Codec(_) | TransportError::WebRtc(_) => 500,
        }
    }
}

/// A STUN or TURN server, in the shape of the W3C `RTCIceServer` dictionary.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct IceServer {
    /// `stun:host:port`, `turn:host:port?transport=udp`, … (one server, several URLs).
    pub urls: Vec<String>,
    /// The TURN user name; `None` for STUN.
    pub username: Option<String>,
    /// The TURN credential; `None` for STUN.
    pub credential: Option<String>,
}

impl IceServer {
    /// Parses `URL` or `URL,USERNAME,CREDENTIAL` (the command line's `--ice-server`); the
    /// URL must be a `stun:`, `stuns:`, `turn:` or `turns:` URL, and a TURN URL needs both a
    /// user name and a credential.
    pub fn parse(text: &str) -> Result<Self, String> {
        let parts: Vec<&str> = text.split(',').map(str::trim).collect();
        let (url, username, credential) = match parts.as_slice() {
            [url] => (*url, None, None),
            [url, user, credential] => (*url, Some(*user), Some(*credential)),
            _ => {
                return Err(format!(
                    "{text:?}: give URL or URL,USERNAME,CREDENTIAL (e.g. \
                     turn:turn.example.com:3478,alice,secret)"
                ));
            }
        };
        let scheme = url.split_once(':').map(|(s, _)| s.to_ascii_lowercase());
        let is_turn = match scheme.as_deref() {
            Some("stun" | "stuns") => false,
            Some("turn" | "turns") => true,
            _ => {
                return Err(format!(
                    "{url:?}: an ICE server URL starts with stun:, stuns:, turn: or turns:"
                ));
            }
        };
        if url.len() <= "turn:".len() || url.chars().any(char::is_whitespace) {
            return Err(format!("{url:?}: no host after the scheme"));
        }
        if is_turn && (username.is_none_or(str::is_empty) || credential.is_none_or(str::is_empty)) {
            return Err(format!(
                "{url:?}: a TURN server needs a user name and a credential \
                 (URL,USERNAME,CREDENTIAL)"
            ));
        }
        Ok(Self {
            urls: vec![url.to_owned()],
            username: username.map(str::to_owned),
            credential: credential.map(str::to_owned),
        })
    }
}

/// How a [`MediaHub`] connects and encodes.
#[derive(Debug, Clone, PartialEq)]
pub struct TransportConfig {
    /// Local UDP addresses for ICE (`"127.0.0.1:0"`: loopback only, an ephemeral port per
    /// session; `"0.0.0.0:0"`: every non-loopback interface). Default `["127.0.0.1:0"]`.
    pub udp_addrs: Vec<String>,
    /// STUN/TURN servers put in the ICE configuration (none by default: host candidates
    /// only, which is what a loopback or LAN server needs). The server hands the same list to
    /// clients (`GET /api/v1/webrtc/ice-servers`).
    pub ice_servers: Vec<IceServer>,
    /// The WHEP encoder's settings.
    pub encoder: EncoderSettings,
    /// Most viewer sessions at once. Default 32. A session still connecting holds a place only
    /// until a newer offer needs it: see `max_pending_viewers`.
    pub max_viewers: usize,
    /// Most viewer sessions still connecting (answered, ICE and DTLS not done). When a new offer
    /// finds the stream full (`max_viewers` sessions, or this many connecting), the oldest
    /// session still connecting is ended to make room, so offers that never connect cannot
    /// lock real viewers out; only when every session is connected is an offer refused (503).
    /// Default 8.
    pub max_pending_viewers: usize,
    /// How long a session (viewer or publisher) may take from its answer to being connected;
    /// one that has not connected by then is ended and its place freed. Default 10 s.
    pub connect_timeout: Duration,
    /// How long to wait for ICE gathering before answering. Default 5 s.
    pub gather_timeout: Duration,
    /// Largest accepted SDP offer in bytes. Default 64 KiB.
    pub max_sdp_bytes: usize,
    /// Whether a peer's mDNS host candidates (`<uuid>.local`, in its offer or trickled) are
    /// resolved by multicast DNS queries on the server's network. Default `false`: they are
    /// ignored (counted in `remote_candidates_ignored`), as every name a client sends would
    /// otherwise start a query; a browser that hides its addresses behind such names still
    /// connects through the server's own candidates (its address is learnt from its checks).
    pub resolve_mdns_candidates: bool,
}

impl Default for TransportConfig {
    fn default() -> Self {
        Self {
            udp_addrs: vec!["127.0.0.1:0".into()],
            ice_servers: Vec::new(),
            encoder: EncoderSettings::default(),
            max_viewers: 32,
            max_pending_viewers: 8,
            connect_timeout: Duration::from_secs(10),
            gather_timeout: Duration::from_secs(5),
            max_sdp_bytes: 64 * 1024,
            resolve_mdns_candidates: false,
        }
    }
}
