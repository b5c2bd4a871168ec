//! The WHIP/WHEP routes on a real loopback server over the tiny checkpoint:
//! bad requests get their status codes (415, 400, 404, 401, 413, 405; 400 for a body cut
//! short) in the JSON error envelope and the server keeps answering good offers after each; a
//! good offer gets 201, an SDP answer with H.264, an ETag and a Location that DELETE ends
//! (once). The publisher's state (never, connecting, connected, gone) follows its session. Sessions: viewer offers that never
//! connect give way to newer ones and end after the connect timeout, so a real viewer gets in
//! right after a flood; a second publisher gets 409 until the first is gone (closed, DELETEd or
//! never connected). Mutated offers get 201 or 400, never a 5xx or a dropped connection. Media
//! end to end is tests/webrtc/e2e.py (aiortc).

mod transport;

use std::sync::Arc;
use std::time::Duration;

use sdstream_server::webrtc::{
    MediaHub, PublisherState, StreamDirectory, TransportConfig, TransportError, router,
};
use transport::{Rng, runtime, tiny_engine};
use webrtc::media_stream::track_local::static_sample::TrackLocalStaticSample;
use webrtc::peer_connection::{
    MediaEngine, PeerConnection, PeerConnectionBuilder, PeerConnectionEventHandler,
    RTCPeerConnectionState, RTCSessionDescription,
};
use webrtc::rtp_transceiver::{RTCRtpTransceiverDirection, RTCRtpTransceiverInit};

struct OneStream(Arc<MediaHub>);

impl StreamDirectory for OneStream {
    fn find(&self, id: &str, token: Option<&str>) -> Result<Arc<MediaHub>, TransportError> {
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

/// Passes the client's connection state on.
struct StateWatch(tokio::sync::watch::Sender<RTCPeerConnectionState>);
#[async_trait::async_trait]
impl PeerConnectionEventHandler for StateWatch {
    async fn on_connection_state_change(&self, state: RTCPeerConnectionState) {
        let _ = self.0.send(state);
    }
}

/// An SDP offer from webrtc-rs: one video transceiver in `direction`.
async fn offer(direction: RTCRtpTransceiverDirection) -> (impl PeerConnection, String) {
    offer_with(direction, Arc::new(Quiet)).await
}

/// [`offer`] with a client that reports its connection state.
async fn watched_offer(
    direction: RTCRtpTransceiverDirection,
) -> (
    impl PeerConnection,
    String,
    tokio::sync::watch::Receiver<RTCPeerConnectionState>,
) {
    let (tx, rx) = tokio::sync::watch::channel(RTCPeerConnectionState::New);
    let (pc, sdp) = offer_with(direction, Arc::new(StateWatch(tx))).await;
    (pc, sdp, rx)
}

async fn offer_with(
    direction: RTCRtpTransceiverDirection,
    handler: Arc<dyn PeerConnectionEventHandler>,
) -> (impl PeerConnection, String) {
    let mut media = MediaEngine::default();
    media.register_default_codecs().expect("codecs");
    let pc = PeerConnectionBuilder::new()
        .with_media_engine(media)
        .with_handler(handler)
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

/// `raw` on a fresh connection whose write side is then shut, as a client whose body was cut
/// off would leave it; the status of the answer (0 for none).
async fn cut_request(addr: std::net::SocketAddr, raw: String) -> u16 {
    tokio::task::spawn_blocking(move || {
        use std::io::{Read, Write};
        let mut stream = std::net::TcpStream::connect(addr).expect("connect");
        stream.write_all(raw.as_bytes()).expect("write");
        let _ = stream.shutdown(std::net::Shutdown::Write);
        let mut answer = Vec::new();
        let _ = stream.read_to_end(&mut answer);
        String::from_utf8_lossy(&answer)
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0)
    })
    .await
    .expect("request thread")
}

/// Serves `stream` as `s1` (token `k`) on a loopback port.
async fn serve(stream: Arc<MediaHub>) -> std::net::SocketAddr {
    let app = router(Arc::new(OneStream(stream)), 16 * 1024);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("listen");
    let addr = listener.local_addr().expect("address");
    tokio::spawn(async move { axum::serve(listener, app).await });
    addr
}

/// A stream with the default transport settings over `engine`, served as `s1` (token `k`).
async fn serve_default(engine: &Arc<sdstream::Engine>) -> (Arc<MediaHub>, std::net::SocketAddr) {
    let stream =
        Arc::new(MediaHub::new(engine.clone(), TransportConfig::default()).expect("transport"));
    let addr = serve(stream.clone()).await;
    (stream, addr)
}

/// Posts `sdp` to `path`, requires a session (201), and ends it with a DELETE of its Location.
async fn open_and_end(addr: std::net::SocketAddr, path: &str, sdp: &str, what: &str) {
    let reply = request(addr, "POST", path, Some("application/sdp"), sdp.as_bytes()).await;
    assert_eq!(reply.status, 201, "{what} to {path}: {}", reply.body);
    let location = reply.header("location").expect("Location").to_owned();
    assert_eq!(
        request(addr, "DELETE", &location, None, b"").await.status,
        200,
        "{what}"
    );
}

/// Polls `condition` every 20 ms until it holds or a minute passes (a bound for a hung test,
/// not a measurement); whether it held.
async fn eventually(mut condition: impl FnMut() -> bool) -> bool {
    for _ in 0..3000 {
        if condition() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    condition()
}

#[test]
fn whip_and_whep_routes_answer_bad_requests_and_keep_serving() {
    let engine = tiny_engine();
    runtime().block_on(async {
        let (stream, addr) = serve_default(&engine).await;

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
            // RFC 9725 §4.3.1: the ICE session's entity tag, one per session.
            let session = location["/whep/s1/".len()..].split('?').next().unwrap();
            assert_eq!(
                reply.header("etag"),
                Some(format!("\"{session}\"").as_str())
            );
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
            // Every error is the JSON envelope.
            assert_eq!(
                reply.header("content-type"),
                Some("application/json"),
                "{what}"
            );
            let envelope: serde_json::Value = serde_json::from_str(&reply.body).expect("JSON");
            assert_eq!(envelope["success"], false, "{what}");
            assert_eq!(envelope["status"], want, "{what}");
            assert!(
                envelope["code"].as_str().is_some_and(|c| c.contains('/')),
                "{what}"
            );
            assert!(
                envelope["error"].as_str().is_some_and(|e| !e.is_empty()),
                "{what}"
            );
            if want == 405 {
                assert_eq!(reply.header("allow"), Some("DELETE"), "{what}");
            }
            good().await;
        }
        // Bodies cut short are bad requests (400), not too large (413).
        let head = |extra: &str| {
            format!(
                "POST /whep/s1?token=k HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\
                 Content-Type: application/sdp\r\n{extra}\r\n"
            )
        };
        let cut = [
            (
                "shorter than its Content-Length",
                head(&format!("Content-Length: {}\r\n", good_offer.len()))
                    + &good_offer[..good_offer.len() / 2],
            ),
            (
                "chunked and cut off",
                head("Transfer-Encoding: chunked\r\n")
                    + &format!("{:x}\r\n{}", good_offer.len(), &good_offer[..10]),
            ),
            (
                "chunked without its last chunk",
                head("Transfer-Encoding: chunked\r\n")
                    + &format!("{:x}\r\n{good_offer}\r\n", good_offer.len()),
            ),
        ];
        for (what, raw) in cut {
            assert_eq!(cut_request(addr, raw).await, 400, "a body {what}");
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

#[test]
fn viewer_offers_that_never_connect_give_way_to_a_real_viewer() {
    let engine = tiny_engine();
    runtime().block_on(async {
        let whep = |addr, sdp: String| async move {
            request(
                addr,
                "POST",
                "/whep/s1?token=k",
                Some("application/sdp"),
                sdp.as_bytes(),
            )
            .await
        };
        // Offers whose client never takes the answer: they never connect.
        let (_fake, fake_offer) = offer(RTCRtpTransceiverDirection::Recvonly).await;

        // 1. A flood: 4 places, 2 of them for sessions still connecting, and a connect timeout
        //    far longer than the test, so that only the offers decide what is ended.
        let config = TransportConfig {
            max_viewers: 4,
            max_pending_viewers: 2,
            connect_timeout: Duration::from_secs(600),
            ..TransportConfig::default()
        };
        let stream = Arc::new(MediaHub::new(engine.clone(), config).expect("transport"));
        let addr = serve(stream.clone()).await;
        let mut locations = Vec::new();
        for i in 0..6 {
            let reply = whep(addr, fake_offer.clone()).await;
            assert_eq!(reply.status, 201, "offer {i}: {}", reply.body);
            locations.push(reply.header("location").expect("Location").to_owned());
            assert_eq!(
                stream.stats().viewers_connecting,
                (i + 1).min(2),
                "after offer {i}"
            );
        }
        let s = stream.stats();
        assert_eq!(
            (
                s.viewer_offers_answered,
                s.viewers_evicted,
                s.viewers_connect_failed
            ),
            (6, 4, 0)
        );
        for location in &locations[..4] {
            let status = request(addr, "DELETE", location, None, b"").await.status;
            assert_eq!(status, 404, "an evicted session is gone: {location}");
        }
        // A real viewer gets in at once (the oldest session still connecting gives way) and
        // connects.
        let (viewer, viewer_offer, mut viewer_state) =
            watched_offer(RTCRtpTransceiverDirection::Recvonly).await;
        let reply = whep(addr, viewer_offer.clone()).await;
        assert_eq!(reply.status, 201, "the real viewer: {}", reply.body);
        let answer = RTCSessionDescription::answer(reply.body.clone()).expect("answer");
        viewer
            .set_remote_description(answer)
            .await
            .expect("remote description");
        let connected = tokio::time::timeout(
            Duration::from_secs(60),
            viewer_state.wait_for(|s| *s == RTCPeerConnectionState::Connected),
        )
        .await
        .is_ok_and(|state| state.is_ok());
        assert!(connected, "the real viewer connects");
        assert!(eventually(|| stream.stats().viewers == 1).await);
        let s = stream.stats();
        assert_eq!(
            (s.viewers, s.viewers_connecting, s.viewers_evicted),
            (1, 1, 5)
        );
        assert_eq!(
            request(addr, "DELETE", &locations[5], None, b"")
                .await
                .status,
            200
        );
        stream.close().await;

        // 2. The connect timeout frees places by itself.
        let config = TransportConfig {
            max_viewers: 4,
            max_pending_viewers: 2,
            connect_timeout: Duration::from_secs(1),
            ..TransportConfig::default()
        };
        let stream = Arc::new(MediaHub::new(engine.clone(), config).expect("transport"));
        let addr = serve(stream.clone()).await;
        for i in 0..3 {
            let reply = whep(addr, fake_offer.clone()).await;
            assert_eq!(reply.status, 201, "offer {i}: {}", reply.body);
        }
        assert!(eventually(|| stream.stats().viewers_connecting == 0).await);
        let s = stream.stats();
        // At least the last two timed out; the first either timed out too or gave way.
        assert_eq!(s.viewers_evicted + s.viewers_connect_failed, 3, "{s:?}");
        assert!(s.viewers_connect_failed >= 2, "{s:?}");
        stream.close().await;

        // 3. When every place holds a connected viewer, an offer is refused (503).
        let config = TransportConfig {
            max_viewers: 1,
            ..TransportConfig::default()
        };
        let stream = Arc::new(MediaHub::new(engine.clone(), config).expect("transport"));
        let addr = serve(stream.clone()).await;
        let (viewer, viewer_offer) = offer(RTCRtpTransceiverDirection::Recvonly).await;
        let reply = whep(addr, viewer_offer).await;
        assert_eq!(reply.status, 201, "{}", reply.body);
        let answer = RTCSessionDescription::answer(reply.body.clone()).expect("answer");
        viewer
            .set_remote_description(answer)
            .await
            .expect("remote description");
        assert!(eventually(|| stream.stats().viewers == 1).await);
        let reply = whep(addr, fake_offer.clone()).await;
        assert_eq!(reply.status, 503, "{}", reply.body);
        let s = stream.stats();
        assert_eq!((s.viewers, s.viewer_offers_refused), (1, 1));
        stream.close().await;
    });
    engine.close();
}

#[test]
fn a_second_publisher_is_refused_until_the_first_is_gone() {
    let engine = tiny_engine();
    runtime().block_on(async {
        let config = TransportConfig {
            connect_timeout: Duration::from_secs(1),
            ..TransportConfig::default()
        };
        let stream = Arc::new(MediaHub::new(engine.clone(), config).expect("transport"));
        let addr = serve(stream.clone()).await;
        let whip = |sdp: String| async move {
            request(
                addr,
                "POST",
                "/whip/s1?token=k",
                Some("application/sdp"),
                sdp.as_bytes(),
            )
            .await
        };

        // A camera publishes and connects.
        assert_eq!(stream.ingest().publisher, PublisherState::Never);
        let (camera, camera_offer, mut camera_state) =
            watched_offer(RTCRtpTransceiverDirection::Sendrecv).await;
        let reply = whip(camera_offer).await;
        assert_eq!(reply.status, 201, "{}", reply.body);
        assert_eq!(stream.ingest().publisher, PublisherState::Connecting);
        let answer = RTCSessionDescription::answer(reply.body.clone()).expect("answer");
        camera
            .set_remote_description(answer)
            .await
            .expect("remote description");
        let connected = tokio::time::timeout(
            Duration::from_secs(60),
            camera_state.wait_for(|s| *s == RTCPeerConnectionState::Connected),
        )
        .await
        .is_ok_and(|state| state.is_ok());
        assert!(connected, "the camera connects");
        assert!(eventually(|| stream.ingest().publisher == PublisherState::Connected).await);
        assert_eq!(stream.ingest().publisher_lost, None);

        // A second publisher is refused while the camera is there, and replaces nothing.
        let (_other, other_offer) = offer(RTCRtpTransceiverDirection::Sendrecv).await;
        let reply = whip(other_offer.clone()).await;
        assert_eq!(reply.status, 409, "{}", reply.body);
        assert!(
            reply.body.contains("already has a publisher"),
            "{}",
            reply.body
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(*camera_state.borrow(), RTCPeerConnectionState::Connected);
        let s = stream.stats();
        assert!(s.publishing);
        assert_eq!(
            (s.publisher_offers_answered, s.publisher_offers_refused),
            (1, 1)
        );

        // The camera goes away without DELETE (a crash, a reconnect): once its connection has
        // ended on the server's side, the next offer takes its place.
        camera.close().await.expect("close");
        // The server sees it gone (DTLS close or ICE failure) without any DELETE.
        assert!(eventually(|| stream.ingest().publisher == PublisherState::Gone).await);
        let gone = stream.ingest();
        assert!(gone.publisher_lost.is_some());
        assert_eq!(
            stream.ingest().publisher_lost,
            gone.publisher_lost,
            "stays put"
        );
        let mut refused_meanwhile = 0;
        let reply = loop {
            let reply = whip(other_offer.clone()).await;
            if reply.status != 409 || refused_meanwhile == 3000 {
                break reply;
            }
            refused_meanwhile += 1;
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        assert_eq!(reply.status, 201, "{}", reply.body);
        assert_eq!(stream.ingest().publisher, PublisherState::Connecting);
        assert_eq!(stream.ingest().publisher_lost, None);
        let s = stream.stats();
        assert_eq!(
            (s.publisher_offers_answered, s.publisher_offers_refused),
            (2, 1 + refused_meanwhile)
        );

        // That one never connects (its client never takes the answer): it holds the place
        // until the connect timeout, then a new offer gets in.
        let reply = whip(other_offer.clone()).await;
        assert_eq!(reply.status, 409, "still connecting: {}", reply.body);
        assert!(eventually(|| !stream.stats().publishing).await);
        assert_eq!(stream.stats().publishers_connect_failed, 1);
        let reply = whip(other_offer.clone()).await;
        assert_eq!(reply.status, 201, "{}", reply.body);

        // DELETE frees the place at once.
        let location = reply.header("location").expect("Location").to_owned();
        assert_eq!(
            request(addr, "DELETE", &location, None, b"").await.status,
            200
        );
        let after_delete = stream.ingest();
        assert_eq!(after_delete.publisher, PublisherState::Gone, "DELETEd");
        assert!(after_delete.publisher_lost.is_some());
        let reply = whip(other_offer.clone()).await;
        assert_eq!(reply.status, 201, "after DELETE: {}", reply.body);
        let s = stream.stats();
        assert_eq!(s.publisher_offers_answered, 4);
        stream.close().await;
    });
    engine.close();
}

/// A moving test picture, RGB8, `w`×`h`.
fn picture(w: usize, h: usize, t: usize) -> Vec<u8> {
    let mut rgb = Vec::with_capacity(w * h * 3);
    for y in 0..h {
        for x in 0..w {
            rgb.extend_from_slice(&[((x + 3 * t) * 4) as u8, (y * 4) as u8, 128]);
        }
    }
    rgb
}

/// A source outside WebRTC (what RTMP ingest is) takes the stream's one publisher place: a
/// WHIP offer is refused while it is live; its access units are decoded and reach the engine;
/// an encoded-output subscriber (what HLS and the RTMP push are) gets the outputs from a
/// keyframe on, in sequence, decodable; pausing holds decoded pictures back from the engine;
/// dropping the source frees the place (the stream is then `Gone`), and ending the stream ends
/// the source.
#[test]
fn an_external_publisher_and_an_encoded_sink_carry_frames_through_the_engine() {
    use sdstream_server::webrtc::IngestKind;
    use sdstream_server::webrtc::h264::{EncoderSettings as Settings, H264Encoder};
    let engine = tiny_engine();
    runtime().block_on(async {
        let (stream, addr) = serve_default(&engine).await;
        let publisher = stream
            .publish_external(IngestKind::Rtmp)
            .await
            .expect("the place is free");
        assert_eq!(stream.ingest().publisher, PublisherState::Connected);
        assert_eq!(stream.ingest().kind, Some(IngestKind::Rtmp));
        // A second source of either kind is refused while it is live.
        assert!(matches!(
            stream.publish_external(IngestKind::Rtmp).await,
            Err(TransportError::PublisherPresent)
        ));
        let (_camera, camera_offer) = offer(RTCRtpTransceiverDirection::Sendrecv).await;
        let reply = request(
            addr,
            "POST",
            "/whip/s1?token=k",
            Some("application/sdp"),
            camera_offer.as_bytes(),
        )
        .await;
        assert_eq!(reply.status, 409, "{}", reply.body);

        let mut sink = stream.subscribe_encoded().expect("sink");
        let mut encoder = H264Encoder::new(Settings {
            keyframe_interval: 10,
            ..Settings::default()
        });
        let mut received = Vec::new();
        let mut t = 0;
        while received.len() < 8 && t < 600 {
            let encoded = encoder.encode(&picture(64, 64, t), 64, 64).expect("encode");
            publisher.push_access_unit(encoded.data, std::time::Instant::now());
            publisher.received_bytes(100);
            t += 1;
            if let Ok(Some(frame)) = sink.recv_timeout(Duration::from_millis(100)).await {
                received.push(frame);
            }
        }
        assert!(
            received.len() >= 8,
            "outputs reached the sink: {}",
            received.len()
        );
        assert!(
            received[0].keyframe,
            "the first picture a sink gets is a keyframe"
        );
        assert!(
            received.windows(2).all(|w| w[1].seq > w[0].seq),
            "in sequence"
        );
        assert!(received.iter().all(|f| (f.width, f.height) == (64, 64)));
        let mut decoder = sdstream_server::webrtc::h264::H264Decoder::new().expect("decoder");
        for frame in &received {
            let picture = decoder
                .decode(&frame.data)
                .expect("decodable")
                .expect("a picture per frame");
            assert_eq!((picture.width, picture.height), (64, 64));
        }
        let s = stream.stats();
        assert!(s.frames_submitted >= 8 && s.frames_to_sinks >= 8, "{s:?}");
        assert_eq!(s.publisher_kind, Some("rtmp"));
        assert_eq!(s.sinks, 1);
        assert!(s.access_units_received >= s.frames_submitted);

        // Paused: decoded, counted, not submitted.
        stream.set_paused(true);
        tokio::time::sleep(Duration::from_millis(300)).await;
        let before = stream.stats();
        for _ in 0..5 {
            let encoded = encoder.encode(&picture(64, 64, t), 64, 64).expect("encode");
            publisher.push_access_unit(encoded.data, std::time::Instant::now());
            t += 1;
            tokio::time::sleep(Duration::from_millis(30)).await;
        }
        assert!(eventually(|| stream.stats().frames_paused >= before.frames_paused + 4).await);
        assert_eq!(stream.stats().frames_submitted, before.frames_submitted);
        stream.set_paused(false);
        assert!(!stream.is_paused());

        // Dropping the source frees the place; a WHIP offer would now be answered.
        drop(sink);
        assert_eq!(stream.stats().sinks, 0);
        drop(publisher);
        assert_eq!(stream.ingest().publisher, PublisherState::Gone);
        assert!(stream.ingest().publisher_lost.is_some());
        let again = stream
            .publish_external(IngestKind::Rtmp)
            .await
            .expect("the place is free again");
        // Closing the stream ends its source.
        stream.close().await;
        assert!(again.is_ended());
        tokio::time::timeout(Duration::from_secs(5), again.ended())
            .await
            .expect("ended() completes");
    });
    engine.close();
}

/// An offer in the form Chromium sends a WHIP server (audio and video, VP8 and H.264 with their
/// retransmission formats, header extensions, feedback, an SSRC group), written out by hand as
/// a seed for the mutations below.
const CHROMIUM_STYLE_OFFER: &str = "v=0\r\n\
o=- 4611731400430051336 2 IN IP4 127.0.0.1\r\n\
s=-\r\n\
t=0 0\r\n\
a=group:BUNDLE 0 1\r\n\
a=extmap-allow-mixed\r\n\
a=msid-semantic: WMS camera\r\n\
m=audio 9 UDP/TLS/RTP/SAVPF 111 63\r\n\
c=IN IP4 0.0.0.0\r\n\
a=rtcp:9 IN IP4 0.0.0.0\r\n\
a=ice-ufrag:Qb3k\r\n\
a=ice-pwd:f7Xq2lB9d0sE8mZr1vY6tN4u\r\n\
a=ice-options:trickle\r\n\
a=fingerprint:sha-256 3B:6C:0A:5F:11:92:E4:7D:28:AB:C0:19:F3:44:8E:07:D2:5A:61:B8:0C:73:9E:F1:26:4D:B5:E8:03:7A:C9:12\r\n\
a=setup:actpass\r\n\
a=mid:0\r\n\
a=extmap:1 urn:ietf:params:rtp-hdrext:ssrc-audio-level\r\n\
a=extmap:4 urn:ietf:params:rtp-hdrext:sdes:mid\r\n\
a=sendonly\r\n\
a=msid:camera mic\r\n\
a=rtcp-mux\r\n\
a=rtpmap:111 opus/48000/2\r\n\
a=rtcp-fb:111 transport-cc\r\n\
a=fmtp:111 minptime=10;useinbandfec=1\r\n\
a=rtpmap:63 red/48000/2\r\n\
a=fmtp:63 111/111\r\n\
a=ssrc:3333 cname:Vq2c\r\n\
m=video 9 UDP/TLS/RTP/SAVPF 96 97 102 103\r\n\
c=IN IP4 0.0.0.0\r\n\
a=rtcp:9 IN IP4 0.0.0.0\r\n\
a=ice-ufrag:Qb3k\r\n\
a=ice-pwd:f7Xq2lB9d0sE8mZr1vY6tN4u\r\n\
a=ice-options:trickle\r\n\
a=fingerprint:sha-256 3B:6C:0A:5F:11:92:E4:7D:28:AB:C0:19:F3:44:8E:07:D2:5A:61:B8:0C:73:9E:F1:26:4D:B5:E8:03:7A:C9:12\r\n\
a=setup:actpass\r\n\
a=mid:1\r\n\
a=extmap:2 http://www.webrtc.org/experiments/rtp-hdrext/abs-send-time\r\n\
a=extmap:3 http://www.ietf.org/id/draft-holmer-rmcat-transport-wide-cc-extensions-01\r\n\
a=extmap:4 urn:ietf:params:rtp-hdrext:sdes:mid\r\n\
a=extmap:13 urn:3gpp:video-orientation\r\n\
a=sendonly\r\n\
a=msid:camera video\r\n\
a=rtcp-mux\r\n\
a=rtcp-rsize\r\n\
a=rtpmap:96 VP8/90000\r\n\
a=rtcp-fb:96 goog-remb\r\n\
a=rtcp-fb:96 transport-cc\r\n\
a=rtcp-fb:96 ccm fir\r\n\
a=rtcp-fb:96 nack\r\n\
a=rtcp-fb:96 nack pli\r\n\
a=rtpmap:97 rtx/90000\r\n\
a=fmtp:97 apt=96\r\n\
a=rtpmap:102 H264/90000\r\n\
a=rtcp-fb:102 goog-remb\r\n\
a=rtcp-fb:102 transport-cc\r\n\
a=rtcp-fb:102 ccm fir\r\n\
a=rtcp-fb:102 nack\r\n\
a=rtcp-fb:102 nack pli\r\n\
a=fmtp:102 level-asymmetry-allowed=1;packetization-mode=1;profile-level-id=42e01f\r\n\
a=rtpmap:103 rtx/90000\r\n\
a=fmtp:103 apt=102\r\n\
a=ssrc-group:FID 1111 2222\r\n\
a=ssrc:1111 cname:Vq2c\r\n\
a=ssrc:1111 msid:camera video\r\n\
a=ssrc:2222 cname:Vq2c\r\n\
a=ssrc:2222 msid:camera video\r\n";

/// Lines an offer could carry that a parser or a session meets rarely.
const ODD_LINES: [&str; 24] = [
    "a=ssrc-group:FID 1111",
    "a=ssrc-group:FID",
    "a=ssrc:notanumber cname:x",
    "a=ssrc:4294967296 cname:x",
    "a=rid:h send",
    "a=rid:",
    "a=simulcast:send h;m;l",
    "a=simulcast:",
    "a=fmtp:102 profile-level-id=zz;packetization-mode=99",
    "a=fmtp:102",
    "a=rtpmap:102 H264",
    "a=rtpmap:999999 H264/90000",
    "a=rtpmap:102 H264/notaclock",
    "a=extmap:0 urn:x",
    "a=extmap:99999 urn:ietf:params:rtp-hdrext:sdes:mid",
    "a=candidate:1 1 udp 1 1.2.3.4 99999 typ host",
    "a=candidate:1 1 udp",
    "a=group:BUNDLE 0 0 1 1 7",
    "a=mid:",
    "a=setup:bogus",
    "a=fingerprint:sha-256 ZZ",
    "a=fingerprint:md5",
    "m=video 0 UDP/TLS/RTP/SAVPF",
    "m=application 9 UDP/DTLS/SCTP webrtc-datachannel",
];

/// Tokens a value of an offer's line is replaced by.
fn odd_token(rng: &mut Rng) -> String {
    match rng.below(12) {
        0 => String::new(),
        1 => "0".into(),
        2 => "-1".into(),
        3 => "65536".into(),
        4 => "4294967296".into(),
        5 => "18446744073709551616".into(),
        6 => "x".into(),
        7 => "H264".into(),
        8 => "*".into(),
        9 => "a".repeat(3000),
        10 => "\u{1F642}".into(),
        _ => "0.0.0.0".into(),
    }
}

/// One to three changes of `base`'s lines: one removed, doubled, moved, cut short, a token
/// of it replaced, or an odd line inserted.
fn mutate_offer(rng: &mut Rng, base: &str) -> String {
    let mut lines: Vec<String> = base.lines().map(str::to_owned).collect();
    for _ in 0..1 + rng.below(3) {
        let i = 1 + rng.below(lines.len() - 1);
        match rng.below(6) {
            0 => {
                lines.remove(i);
            }
            1 => {
                let copy = lines[i].clone();
                let at = 1 + rng.below(lines.len() - 1);
                lines.insert(at, copy);
            }
            2 => {
                let j = 1 + rng.below(lines.len() - 1);
                lines.swap(i, j);
            }
            3 => {
                let cut: String = lines[i].chars().take(rng.below(lines[i].len())).collect();
                lines[i] = cut;
            }
            4 => {
                let line = &lines[i];
                let bounds: Vec<usize> = line
                    .char_indices()
                    .filter(|(_, c)| matches!(c, ' ' | ':' | '/' | '=' | ';'))
                    .map(|(k, _)| k + 1)
                    .collect();
                let start = if bounds.is_empty() {
                    2.min(line.len())
                } else {
                    bounds[rng.below(bounds.len())]
                };
                let end = line[start..]
                    .find([' ', ':', '/', '=', ';'])
                    .map_or(line.len(), |k| start + k);
                lines[i] = format!("{}{}{}", &line[..start], odd_token(rng), &line[end..]);
            }
            _ => lines.insert(i, ODD_LINES[rng.below(ODD_LINES.len())].to_owned()),
        }
        if lines.len() < 2 {
            break;
        }
    }
    let newline = if rng.below(8) == 0 { "\n" } else { "\r\n" };
    lines.join(newline) + newline
}

/// Mutated offers (a Chromium-style publisher's, webrtc-rs's publisher and viewer offers) sent
/// to WHIP and WHEP: every one gets an answer (201, or a 4xx naming what is wrong; never a
/// dropped connection or a 5xx), sessions that were made are ended, and afterwards good offers
/// still get their sessions. `SDSTREAM_SDP_FUZZ_RUNS` sets the count and
/// `SDSTREAM_SDP_FUZZ_SEED` other mutations.
#[test]
fn mutated_offers_are_answered_or_refused_and_the_routes_keep_serving() {
    let engine = tiny_engine();
    runtime().block_on(async {
        let (_stream, addr) = serve_default(&engine).await;
        let (_viewer, viewer_offer) = offer(RTCRtpTransceiverDirection::Recvonly).await;
        let (_publisher, publisher_offer) = offer(RTCRtpTransceiverDirection::Sendrecv).await;
        let seeds = [
            ("/whip/s1?token=k", CHROMIUM_STYLE_OFFER),
            ("/whip/s1?token=k", publisher_offer.as_str()),
            ("/whep/s1?token=k", viewer_offer.as_str()),
        ];
        // Each seed is an offer a session takes, so that what the mutations break is theirs.
        for (path, seed) in seeds {
            open_and_end(addr, path, seed, "unmutated").await;
        }
        let runs: usize = std::env::var("SDSTREAM_SDP_FUZZ_RUNS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(450);
        let mut rng = Rng(0x5d9_0ffe_u64
            ^ std::env::var("SDSTREAM_SDP_FUZZ_SEED")
                .ok()
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0)
                .wrapping_mul(0x9e37_79b9_7f4a_7c15));
        let mut statuses = std::collections::BTreeMap::<u16, usize>::new();
        for i in 0..runs {
            let (path, seed) = seeds[i % seeds.len()];
            let mutated = mutate_offer(&mut rng, seed);
            let reply = request(
                addr,
                "POST",
                path,
                Some("application/sdp"),
                mutated.as_bytes(),
            )
            .await;
            *statuses.entry(reply.status).or_default() += 1;
            assert!(
                matches!(reply.status, 201 | 400 | 413),
                "mutated offer {i} to {path}: {} {}\n{mutated}",
                reply.status,
                reply.body
            );
            if reply.status == 201 {
                let location = reply.header("location").expect("Location").to_owned();
                assert_eq!(
                    request(addr, "DELETE", &location, None, b"").await.status,
                    200
                );
            } else {
                let envelope: serde_json::Value = serde_json::from_str(&reply.body).expect("JSON");
                assert!(
                    envelope["error"].as_str().is_some_and(|e| !e.is_empty()),
                    "offer {i}: {}",
                    reply.body
                );
            }
        }
        eprintln!("{runs} mutated offers: statuses {statuses:?}");
        assert!(statuses.get(&201).is_some_and(|&n| n > 0), "{statuses:?}");
        assert!(statuses.get(&400).is_some_and(|&n| n > 0), "{statuses:?}");
        for (path, seed) in seeds {
            open_and_end(addr, path, seed, "after the mutations").await;
        }
    });
}
