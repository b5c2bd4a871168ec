//! The WHIP/WHEP routes (feature `webrtc`) on a real loopback server over the tiny checkpoint:
//! bad requests get their status codes (415, 400, 404, 401, 413, 405) and the server keeps
//! answering good offers after each; a good offer gets 201, an SDP answer with H.264 and a
//! Location that DELETE ends (once). Media end to end is tests/webrtc/e2e.py (aiortc).

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::fixture;
use sdstream::params::{Prompt, VaeChoice};
use sdstream::webrtc::{StreamDirectory, TransportConfig, TransportError, WebRtcStream, router};
use sdstream::{Engine, EngineOptions, EngineSettings, StreamDiffusionParams};
use webrtc::media_stream::track_local::static_sample::TrackLocalStaticSample;
use webrtc::peer_connection::{
    MediaEngine, PeerConnection, PeerConnectionBuilder, PeerConnectionEventHandler,
};
use webrtc::rtp_transceiver::{RTCRtpTransceiverDirection, RTCRtpTransceiverInit};

struct OneStream(Arc<WebRtcStream>);

impl StreamDirectory for OneStream {
    fn find(&self, id: &str, token: Option<&str>) -> Result<Arc<WebRtcStream>, TransportError> {
        if id != "s1" {
            return Err(TransportError::NotFound(format!("stream {id:?}")));
        }
        match token {
            Some("k") => Ok(self.0.clone()),
            _ => Err(TransportError::Unauthorized),
        }
    }
}

struct Quiet;
#[async_trait::async_trait]
impl PeerConnectionEventHandler for Quiet {}

/// An SDP offer from webrtc-rs: one video transceiver in `direction`.
async fn offer(direction: RTCRtpTransceiverDirection) -> (impl PeerConnection, String) {
    let mut media = MediaEngine::default();
    media.register_default_codecs().expect("codecs");
    let pc = PeerConnectionBuilder::new()
        .with_media_engine(media)
        .with_handler(Arc::new(Quiet))
        .with_udp_addrs(vec!["127.0.0.1:0"])
        .build()
        .await
        .expect("client peer connection");
    let video = rtc::rtp_transceiver::rtp_sender::RtpCodecKind::Video;
    match direction {
        // A publisher's offer: a track to send.
        RTCRtpTransceiverDirection::Sendrecv => {
            let codec = rtc::rtp_transceiver::rtp_sender::RTCRtpCodec {
                mime_type: "video/H264".into(),
                clock_rate: 90_000,
                sdp_fmtp_line:
                    "level-asymmetry-allowed=1;packetization-mode=1;profile-level-id=42e01f".into(),
                ..Default::default()
            };
            let track = TrackLocalStaticSample::new(
                std::time::Instant::now(),
                rtc::media_stream::MediaStreamTrack::new(
                    "camera".into(),
                    "video".into(),
                    "video".into(),
                    video,
                    vec![rtc::rtp_transceiver::rtp_sender::RTCRtpEncodingParameters {
                        rtp_coding_parameters:
                            rtc::rtp_transceiver::rtp_sender::RTCRtpCodingParameters {
                                ssrc: Some(1234),
                                ..Default::default()
                            },
                        codec,
                        ..Default::default()
                    }],
                ),
            )
            .expect("track");
            pc.add_track(Arc::new(track)).await.expect("add track");
        }
        _ => {
            pc.add_transceiver_from_kind(
                video,
                Some(RTCRtpTransceiverInit {
                    direction,
                    ..Default::default()
                }),
            )
            .await
            .expect("transceiver");
        }
    }
    let offer = pc.create_offer(None).await.expect("offer");
    pc.set_local_description(offer.clone())
        .await
        .expect("local description");
    (pc, offer.sdp)
}

struct Reply {
    status: u16,
    headers: String,
    body: String,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }
}

/// One HTTP/1.1 request on a fresh connection (blocking I/O on a blocking-pool thread).
async fn request(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    content_type: Option<&str>,
    body: &[u8],
) -> Reply {
    let (method, path) = (method.to_owned(), path.to_owned());
    let (content_type, body) = (content_type.map(str::to_owned), body.to_vec());
    tokio::task::spawn_blocking(move || {
        blocking_request(addr, &method, &path, content_type.as_deref(), &body)
    })
    .await
    .expect("request thread")
}

fn blocking_request(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    content_type: Option<&str>,
    body: &[u8],
) -> Reply {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).expect("connect");
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    if let Some(ct) = content_type {
        head.push_str(&format!("Content-Type: {ct}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).expect("write");
    // The server may answer (413) before reading a large body and close: ignore write errors.
    let _ = stream.write_all(body);
    let mut raw = Vec::new();
    let _ = stream.read_to_end(&mut raw);
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (headers, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = headers
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    Reply {
        status,
        headers: headers.to_owned(),
        body: body.to_owned(),
    }
}

#[test]
fn whip_and_whep_routes_answer_bad_requests_and_keep_serving() {
    let settings = EngineSettings {
        vae: VaeChoice::Custom(fixture("tiny-taesd").display().to_string()),
        allow_any_resolution: true,
        ..EngineSettings::default()
    };
    let params = StreamDiffusionParams {
        model_id: fixture("tiny-sd-turbo").display().to_string(),
        prompt: Prompt::Text("a lighthouse".into()),
        width: 64,
        height: 64,
        ..StreamDiffusionParams::default()
    };
    let engine = Arc::new(Engine::new(params, settings, EngineOptions::default()).expect("engine"));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .worker_threads(2)
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let stream = Arc::new(
            WebRtcStream::new(engine.clone(), TransportConfig::default()).expect("transport"),
        );
        let app = router(Arc::new(OneStream(stream.clone())), 16 * 1024);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("listen");
        let addr = listener.local_addr().expect("address");
        tokio::spawn(async move { axum::serve(listener, app).await });

        let (_viewer, good_offer) = offer(RTCRtpTransceiverDirection::Recvonly).await;
        let (_publisher, publish_offer) = offer(RTCRtpTransceiverDirection::Sendrecv).await;

        // A good WHEP offer: 201, an H.264 answer, a Location that DELETE ends once.
        let good = || async {
            let reply = request(
                addr,
                "POST",
                "/whep/s1?token=k",
                Some("application/sdp"),
                good_offer.as_bytes(),
            )
            .await;
            assert_eq!(reply.status, 201, "good WHEP offer: {}", reply.body);
            assert_eq!(reply.header("content-type"), Some("application/sdp"));
            assert!(reply.body.starts_with("v=0"), "answer: {}", reply.body);
            assert!(reply.body.contains("H264/90000"), "answer: {}", reply.body);
            assert!(
                reply.body.contains("a=candidate"),
                "non-trickle answer has candidates"
            );
            let location = reply.header("location").expect("Location").to_owned();
            assert!(location.starts_with("/whep/s1/"), "{location}");
            assert_eq!(
                request(addr, "DELETE", &location, None, b"").await.status,
                200
            );
            assert_eq!(
                request(addr, "DELETE", &location, None, b"").await.status,
                404
            );
        };
        good().await;

        let sdp = Some("application/sdp");
        let garbage = b"this is not an SDP offer".as_slice();
        let huge = vec![b'a'; 20 * 1024];
        // (what, method, path, content type, body, expected status)
        type Case<'a> = (&'a str, &'a str, &'a str, Option<&'a str>, &'a [u8], u16);
        let cases: Vec<Case> = vec![
            (
                "wrong content type",
                "POST",
                "/whip/s1?token=k",
                Some("application/json"),
                publish_offer.as_bytes(),
                415,
            ),
            (
                "no content type",
                "POST",
                "/whep/s1?token=k",
                None,
                good_offer.as_bytes(),
                415,
            ),
            ("garbage SDP", "POST", "/whip/s1?token=k", sdp, garbage, 400),
            (
                "SDP without media",
                "POST",
                "/whep/s1?token=k",
                sdp,
                b"v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\ns=-\r\nt=0 0\r\n",
                400,
            ),
            (
                "binary body",
                "POST",
                "/whep/s1?token=k",
                sdp,
                &[0xff, 0xfe, 0x00, 0x01],
                400,
            ),
            (
                "unknown stream",
                "POST",
                "/whip/s2?token=k",
                sdp,
                publish_offer.as_bytes(),
                404,
            ),
            (
                "missing token",
                "POST",
                "/whip/s1",
                sdp,
                publish_offer.as_bytes(),
                401,
            ),
            (
                "wrong token",
                "POST",
                "/whep/s1?token=x",
                sdp,
                good_offer.as_bytes(),
                401,
            ),
            (
                "oversized body",
                "POST",
                "/whip/s1?token=k",
                sdp,
                &huge,
                413,
            ),
            (
                "unknown session",
                "DELETE",
                "/whip/s1/0123?token=k",
                None,
                b"",
                404,
            ),
            (
                "DELETE without token",
                "DELETE",
                "/whep/s1/0123",
                None,
                b"",
                401,
            ),
            (
                "trickle PATCH",
                "PATCH",
                "/whip/s1/0123?token=k",
                Some("application/trickle-ice-sdpfrag"),
                b"a=end-of-candidates\r\n",
                405,
            ),
        ];
        for (what, method, path, content_type, body, want) in cases {
            let reply = request(addr, method, path, content_type, body).await;
            assert_eq!(reply.status, want, "{what}: {}", reply.body);
            good().await;
        }

        // A publisher offer is answered too (recvonly H.264 on our side).
        let reply = request(
            addr,
            "POST",
            "/whip/s1?token=k",
            sdp,
            publish_offer.as_bytes(),
        )
        .await;
        assert_eq!(reply.status, 201, "WHIP offer: {}", reply.body);
        assert!(reply.body.contains("a=recvonly"), "answer: {}", reply.body);
        assert!(stream.stats().publishing);
        let location = reply.header("location").expect("Location").to_owned();
        assert_eq!(
            request(addr, "DELETE", &location, None, b"").await.status,
            200
        );
        assert!(!stream.stats().publishing);

        stream.close().await;
        let closed = request(addr, "POST", "/whep/s1?token=k", sdp, good_offer.as_bytes()).await;
        assert_eq!(closed.status, 410, "a closed stream: {}", closed.body);
        tokio::time::sleep(Duration::from_millis(10)).await;
    });
    engine.close();
}
