//! What a hostile or broken client cannot do to the server (issue #41): hold HTTP connections
//! (silent, dripping a head, kept alive, not reading), exceed the connection cap unanswered,
//! spend a stream and an engine on an offer that is not SDP, keep a stream's place with offers
//! that never connect, or trickle candidates without end. Each test prints its figures
//! (`cargo test -p sdstream-server --lib api::limits_tests -- --nocapture`).

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::cli::{self, Command};
use super::tests::{api, config, create, envelope, json_of, request, serve};
use super::*;

/// Reads one response (head, then `Content-Length` bytes) from a kept-alive connection.
fn read_response(stream: &mut TcpStream) -> (u16, String) {
    let mut raw = Vec::new();
    let mut byte = [0u8; 1];
    while !raw.ends_with(b"\r\n\r\n") {
        match stream.read(&mut byte) {
            Ok(1) => raw.push(byte[0]),
            _ => break,
        }
    }
    let head = String::from_utf8_lossy(&raw).into_owned();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let length = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse::<usize>().ok())?
        })
        .unwrap_or(0);
    let mut body = vec![0u8; length];
    let _ = stream.read_exact(&mut body);
    (status, String::from_utf8_lossy(&body).into_owned())
}

const HEALTHZ: &[u8] = b"GET /healthz HTTP/1.1\r\nHost: test\r\n\r\n";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Client {
    /// Connects and sends nothing.
    Silent,
    /// Sends a request head one byte a second.
    Dripping,
    /// Makes one request, reads the answer, then sends nothing.
    KeptAlive,
}

/// How long after its connection (after its answer, kept alive) the server closed it, or
/// `None` if it was still open `limit` later.
fn closed_after(addr: SocketAddr, client: Client, limit: Duration) -> Option<Duration> {
    let mut stream = TcpStream::connect(addr).expect("connect");
    let mut start = Instant::now();
    if client == Client::KeptAlive {
        stream.write_all(HEALTHZ).expect("request");
        let (status, _) = read_response(&mut stream);
        assert_eq!(status, 200, "the kept-alive connection's first request");
        start = Instant::now();
    }
    stream
        .set_read_timeout(Some(Duration::from_millis(100)))
        .expect("timeout");
    let head = b"GET /healthz HTTP/1.1\r\nHost: test\r\nX-Padding: a long header to drip\r\n";
    let mut dripped = 0;
    let mut next_drip = start;
    let mut buf = [0u8; 256];
    while start.elapsed() < limit {
        if client == Client::Dripping && Instant::now() >= next_drip && dripped < head.len() {
            // A write into a connection the server closed fails or resets it: the read says.
            let _ = stream.write(&head[dripped..=dripped]);
            dripped += 1;
            next_drip += Duration::from_secs(1);
        }
        match stream.read(&mut buf) {
            Ok(0) => return Some(start.elapsed()),
            Ok(_) => {}
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            // Reset: closed as well.
            Err(_) => return Some(start.elapsed()),
        }
    }
    None
}

/// Polls `GET /healthz` on fresh connections every 100 ms until `done`; returns the statuses.
fn poll_healthz(addr: SocketAddr, done: Arc<AtomicBool>) -> thread::JoinHandle<Vec<u16>> {
    thread::spawn(move || {
        let mut statuses = Vec::new();
        while !done.load(Ordering::Acquire) {
            let (status, _, _) = request(addr, "GET", "/healthz", "", None);
            statuses.push(status);
            thread::sleep(Duration::from_millis(100));
        }
        statuses
    })
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

#[test]
fn silent_dripping_and_idle_connections_are_closed_while_healthz_answers() {
    let timeout = Duration::from_secs(2);
    let slack = Duration::from_secs(6);
    let n = 20;
    let mut cfg = config();
    cfg.http = HttpConfig {
        header_timeout: timeout,
        idle_timeout: timeout,
        write_timeout: timeout,
        max_connections: 256,
    };
    let (_runtime, addr, _server) = serve(cfg);
    let done = Arc::new(AtomicBool::new(false));
    let polls = poll_healthz(addr, done.clone());
    let clients: Vec<(Client, thread::JoinHandle<Option<Duration>>)> =
        [Client::Silent, Client::Dripping, Client::KeptAlive]
            .into_iter()
            .flat_map(|client| std::iter::repeat_n(client, n))
            .map(|client| {
                (
                    client,
                    thread::spawn(move || closed_after(addr, client, timeout + slack)),
                )
            })
            .collect();
    let results: Vec<(Client, Option<Duration>)> = clients
        .into_iter()
        .map(|(client, handle)| (client, handle.join().expect("client thread")))
        .collect();
    done.store(true, Ordering::Release);
    let statuses = polls.join().expect("poll thread");
    for kind in [Client::Silent, Client::Dripping, Client::KeptAlive] {
        let times: Vec<Duration> = results
            .iter()
            .filter(|(c, _)| *c == kind)
            .filter_map(|(_, t)| *t)
            .collect();
        let (first, last) = (
            times.iter().min().copied().unwrap_or_default(),
            times.iter().max().copied().unwrap_or_default(),
        );
        println!(
            "{kind:?}: {} of {n} closed by the server, after {:.2}–{:.2} s (timeout {:.0} s)",
            times.len(),
            secs(first),
            secs(last),
            secs(timeout)
        );
        assert_eq!(
            times.len(),
            n,
            "{kind:?}: every connection closed within the timeout + {slack:?}"
        );
        // The server closes on its deadline, never before (a little leeway for the client's
        // clock starting after the server's).
        assert!(
            first + Duration::from_millis(200) >= timeout,
            "{kind:?}: closed after {first:?}, before the {timeout:?} timeout"
        );
    }
    let answered = statuses.iter().filter(|s| **s == 200).count();
    println!(
        "/healthz during the run: {answered} of {} polls answered 200",
        statuses.len()
    );
    assert!(statuses.len() >= 5, "polled {} times", statuses.len());
    assert_eq!(
        answered,
        statuses.len(),
        "every poll answered: {statuses:?}"
    );
}

#[test]
fn a_request_in_flight_outlives_the_timeouts_and_a_client_that_stops_reading_does_not() {
    let timeout = Duration::from_secs(2);
    let mut cfg = config();
    cfg.http = HttpConfig {
        header_timeout: timeout,
        idle_timeout: timeout,
        write_timeout: timeout,
        max_connections: 64,
    };
    cfg.hls.segment_target = Duration::from_millis(200);
    let (_runtime, addr, _server) = serve(cfg);
    // A playlist with no output yet waits 3 segments + 5 s before its 503: longer than every
    // timeout, and answered all the same.
    let stream = create(addr, &json!({}));
    let (id, key) = (
        stream["id"].as_str().expect("id"),
        stream["stream_key"].as_str().expect("key"),
    );
    let started = Instant::now();
    let (status, _, body) = request(
        addr,
        "GET",
        &format!("/hls/{id}/index.m3u8?token={key}"),
        "",
        None,
    );
    let waited = started.elapsed();
    println!(
        "a playlist request in flight for {:.2} s (timeouts {:.0} s): {status}",
        secs(waited),
        secs(timeout)
    );
    assert_eq!(status, 503, "{body}");
    assert!(envelope(503, &body).contains("no output"), "{body}");
    assert!(waited > timeout, "the request outlived the timeouts");

    // Pipelined requests for the page, whose answers are never read: once the socket buffers
    // are full the writing stalls, and the connection is closed after the write timeout.
    let sent = 1000;
    let mut client = TcpStream::connect(addr).expect("connect");
    let requests = "GET / HTTP/1.1\r\nHost: test\r\n\r\n".repeat(sent);
    client.write_all(requests.as_bytes()).expect("requests");
    thread::sleep(timeout + Duration::from_secs(4));
    client
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut received = Vec::new();
    let mut buf = vec![0u8; 1 << 16];
    let ended = loop {
        match client.read(&mut buf) {
            Ok(0) => break "EOF",
            Ok(n) => received.extend_from_slice(&buf[..n]),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                break "still open";
            }
            Err(_) => break "reset",
        }
    };
    let answers = received
        .windows(b"HTTP/1.1 200".len())
        .filter(|w| *w == b"HTTP/1.1 200")
        .count();
    println!(
        "a client that never reads: {answers} of {sent} pipelined answers ({} kB) before the \
         server closed it ({ended})",
        received.len() / 1000
    );
    assert_ne!(ended, "still open", "the stalled connection was closed");
    assert!(answers < sent, "{answers} of {sent} answers");
}

#[test]
fn a_connection_over_the_cap_is_answered_503_and_the_others_keep_working() {
    let cap = 4;
    let mut cfg = config();
    cfg.http.max_connections = cap;
    let (_runtime, addr, _server) = serve(cfg);
    let mut held: Vec<TcpStream> = (0..cap)
        .map(|_| {
            let mut s = TcpStream::connect(addr).expect("connect");
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            s.write_all(HEALTHZ).expect("request");
            assert_eq!(read_response(&mut s).0, 200);
            s
        })
        .collect();
    // One more: answered 503 at once, then closed.
    let mut over = TcpStream::connect(addr).expect("connect");
    over.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let _ = over.write_all(HEALTHZ);
    let mut answer = String::new();
    let _ = over.read_to_string(&mut answer);
    let status_line = answer.lines().next().unwrap_or_default().to_owned();
    let body = answer.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    println!("connection {} of a cap of {cap}: {status_line:?}", cap + 1);
    assert_eq!(status_line, "HTTP/1.1 503 Service Unavailable", "{answer}");
    assert!(
        answer.to_ascii_lowercase().contains("retry-after: 1"),
        "{answer}"
    );
    assert_eq!(json_of(body)["code"], "SERVER/TOO_MANY_CONNECTIONS");
    assert!(envelope(503, body).contains(&format!("{cap} connections")));
    // The ones within the cap keep working.
    let again: Vec<u16> = held
        .iter_mut()
        .map(|s| {
            s.write_all(HEALTHZ).expect("request");
            read_response(s).0
        })
        .collect();
    println!("the {cap} connections within the cap, asked again: {again:?}");
    assert_eq!(again, vec![200; cap]);
    // One closed: its place goes to the next connection (once the server has seen the close).
    drop(held.pop());
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut tries = 0;
    let status = loop {
        tries += 1;
        let (status, _, _) = request(addr, "GET", "/healthz", "", None);
        if status == 200 || Instant::now() > deadline {
            break status;
        }
        thread::sleep(Duration::from_millis(50));
    };
    println!("after one closed: {status} (try {tries})");
    assert_eq!(status, 200);
}

#[test]
fn http_and_ice_flags() {
    let args = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let parse = |a: &[&str]| match cli::parse(&args(a), None) {
        Ok(Command::Serve(serve)) => *serve,
        other => panic!("{a:?}: {other:?}"),
    };
    let defaults = parse(&["serve"]);
    assert_eq!(defaults.http, HttpConfig::default());
    assert!(!defaults.ice_mdns);
    let flagged = parse(&[
        "serve",
        "--http-header-timeout",
        "5",
        "--http-idle-timeout=60",
        "--http-write-timeout",
        "0",
        "--http-max-connections",
        "200",
        "--ice-mdns",
        "on",
    ]);
    assert_eq!(
        flagged.http,
        HttpConfig {
            header_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(60),
            // Clamped to 1 s at least.
            write_timeout: Duration::from_secs(1),
            max_connections: 200,
        }
    );
    let local = SocketAddr::from(([127, 0, 0, 1], 8088));
    let config = cli::config(&flagged, "t".into(), local, None).expect("config");
    assert_eq!(config.http, flagged.http);
    assert!(config.transport.resolve_mdns_candidates);
    let config = cli::config(&defaults, "t".into(), local, None).expect("config");
    assert!(!config.transport.resolve_mdns_candidates);
    for (bad, says) in [
        (&["serve", "--ice-mdns", "yes"][..], "--ice-mdns yes"),
        (
            &["serve", "--http-max-connections", "many"][..],
            "--http-max-connections many",
        ),
    ] {
        let err = cli::parse(&args(bad), None).expect_err(&format!("{bad:?}"));
        assert!(err.contains(says), "{bad:?}: {err}");
    }
}

/// An SDP offer from webrtc-rs with one send-receive video section (H.264 among its codecs),
/// made by a client that is dropped at once: a session answering it never connects.
fn dead_offer(runtime: &tokio::runtime::Runtime) -> String {
    use rtc::rtp_transceiver::rtp_sender::{
        RTCRtpCodec, RTCRtpCodingParameters, RTCRtpEncodingParameters, RtpCodecKind,
    };
    use webrtc::media_stream::track_local::static_sample::TrackLocalStaticSample;
    use webrtc::peer_connection::{
        MediaEngine, PeerConnection, PeerConnectionBuilder, PeerConnectionEventHandler,
    };
    struct Quiet;
    #[async_trait::async_trait]
    impl PeerConnectionEventHandler for Quiet {}
    runtime.block_on(async {
        let mut media = MediaEngine::default();
        media.register_default_codecs().expect("codecs");
        let pc = PeerConnectionBuilder::new()
            .with_media_engine(media)
            .with_handler(Arc::new(Quiet))
            .with_udp_addrs(vec!["127.0.0.1:0"])
            .build()
            .await
            .expect("client peer connection");
        // A camera track: the video section is then send-receive, as a Scope client's is.
        let codec = RTCRtpCodec {
            mime_type: "video/H264".into(),
            clock_rate: 90_000,
            sdp_fmtp_line: "level-asymmetry-allowed=1;packetization-mode=1;profile-level-id=42e01f"
                .into(),
            ..Default::default()
        };
        let track = TrackLocalStaticSample::new(
            Instant::now(),
            rtc::media_stream::MediaStreamTrack::new(
                "camera".into(),
                "video".into(),
                "video".into(),
                RtpCodecKind::Video,
                vec![RTCRtpEncodingParameters {
                    rtp_coding_parameters: RTCRtpCodingParameters {
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
        let offer = pc.create_offer(None).await.expect("offer");
        let _ = pc.close().await;
        offer.sdp
    })
}

fn scope_offer(addr: SocketAddr, sdp: &str) -> (u16, String) {
    api(
        addr,
        "POST",
        "/api/v1/webrtc/offer",
        Some(&json!({"sdp": sdp, "type": "offer"})),
    )
}

#[test]
fn a_scope_offer_that_is_not_sdp_is_refused_before_a_stream_or_engine_exists() {
    let mut open = config();
    open.scope_requires_token = false;
    let (_runtime, addr, server) = serve(open);
    for (what, sdp, says) in [
        ("garbage", "garbage", "\"v=\""),
        (
            "SDP without video",
            "v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\ns=-\r\nt=0 0\r\n",
            "no video",
        ),
    ] {
        let (status, _, body) = request(
            addr,
            "POST",
            "/api/v1/webrtc/offer",
            "",
            Some(
                &json!({"sdp": sdp, "type": "offer",
                         "initialParameters": {"prompts": [{"text": "a fox"}]}})
                .to_string(),
            ),
        );
        let message = envelope(400, &body);
        println!(
            "{what}: {status} {message:?}; streams {}, engines started {}",
            server.app().stream_count(),
            server.app().engines_started()
        );
        assert_eq!(status, 400, "{what}: {body}");
        assert!(
            message.contains("SDP") && message.contains(says),
            "{what}: {message}"
        );
        assert_eq!(json_of(&body)["code"], "WEBRTC/BAD_OFFER");
    }
    assert_eq!(server.app().engines_started(), 0, "no engine was started");
    assert_eq!(server.app().stream_count(), 0);
}

#[test]
fn scope_offers_that_never_connect_free_their_streams_at_the_connect_timeout() {
    let connect = Duration::from_secs(1);
    let slack = Duration::from_secs(10);
    let mut cfg = config();
    cfg.max_streams = 2;
    cfg.transport.connect_timeout = connect;
    let (runtime, addr, server) = serve(cfg);
    let offers: Vec<String> = (0..3).map(|_| dead_offer(&runtime)).collect();
    let started = Instant::now();
    for sdp in &offers[..2] {
        let (status, body) = scope_offer(addr, sdp);
        assert_eq!(status, 200, "{body}");
    }
    let (status, body) = scope_offer(addr, &offers[2]);
    assert_eq!(status, 429, "the two sessions hold both places: {body}");
    let mut refused = 1;
    let status = loop {
        thread::sleep(Duration::from_millis(250));
        let (status, body) = scope_offer(addr, &offers[2]);
        if status != 429 || started.elapsed() > connect + slack {
            assert_eq!(status, 200, "{body}");
            break status;
        }
        refused += 1;
    };
    let freed = started.elapsed();
    println!(
        "2 Scope offers that never connect (connect timeout {:.0} s, idle timeout {:?}): \
         {refused} offers refused 429, then one accepted ({status}) {:.2} s after the first",
        secs(connect),
        config().idle_timeout,
        secs(freed)
    );
    // Both engines were started, and both streams ended with their sessions (the third is
    // the accepted offer's).
    assert_eq!(server.app().engines_started(), 3);
}

/// A host candidate for `address`.
fn candidate(i: usize, address: &str) -> Value {
    json!({
        "candidate": format!("candidate:{i} 1 udp 2122260223 {address} {} typ host", 40000 + i),
        "sdpMid": "0",
    })
}

#[test]
fn trickled_candidates_are_capped_per_session_and_mdns_names_ignored() {
    let mut cfg = config();
    // The session must outlive the test: its peer never connects.
    cfg.transport.connect_timeout = Duration::from_secs(300);
    let (runtime, addr, server) = serve(cfg);
    let (status, body) = scope_offer(addr, &dead_offer(&runtime));
    assert_eq!(status, 200, "{body}");
    let id = json_of(&body)["sessionId"]
        .as_str()
        .expect("session")
        .to_owned();
    let path = format!("/api/v1/webrtc/offer/{id}");
    let patch = |candidates: Vec<Value>| {
        api(
            addr,
            "PATCH",
            &path,
            Some(&json!({ "candidates": candidates })),
        )
    };
    let stats = || server.app().stream(&id).expect("stream").transport.stats();
    // Three mDNS names and one address: the names are taken and counted, not added.
    let mut first: Vec<Value> = (0..3)
        .map(|i| candidate(i, &format!("{i}e0c4a6b-1f43-4c1b-9d2e-8f0f7a1b2c3d.local")))
        .collect();
    first.push(candidate(3, "127.0.0.1"));
    let (status, body) = patch(first);
    assert_eq!(status, 204, "{body}");
    let s = stats();
    println!(
        "4 candidates (3 .local): {} added, {} ignored",
        s.remote_candidates_added, s.remote_candidates_ignored
    );
    assert_eq!(
        (s.remote_candidates_added, s.remote_candidates_ignored),
        (1, 3)
    );
    // Up to 64 in all: 60 more are taken.
    let (status, body) = patch((4..64).map(|i| candidate(i, "127.0.0.1")).collect());
    assert_eq!(status, 204, "{body}");
    // The 65th is refused naming the cap, and not added.
    let (status, body) = patch(vec![candidate(64, "127.0.0.1")]);
    let message = envelope(400, &body);
    let s = stats();
    println!(
        "the 65th candidate: {status} {message:?}; {} added, {} ignored, {} refused",
        s.remote_candidates_added, s.remote_candidates_ignored, s.remote_candidates_refused
    );
    assert_eq!(status, 400, "{body}");
    assert_eq!(json_of(&body)["code"], "WEBRTC/TOO_MANY_CANDIDATES");
    assert!(message.contains("at most 64"), "{message}");
    assert_eq!(
        (
            s.remote_candidates_added,
            s.remote_candidates_ignored,
            s.remote_candidates_refused
        ),
        (61, 3, 1)
    );
    // An end-of-candidates marker is no candidate: still fine.
    let (status, body) = patch(vec![json!({"candidate": "", "sdpMid": "0"})]);
    assert_eq!(status, 204, "{body}");
}

/// Set in the child process of [`few_descriptors_degrade_but_never_wedge`].
#[cfg(target_os = "linux")]
const FD_CHILD: &str = "SDSTREAM_TEST_FD_CHILD";
/// The child's descriptor limit: the server takes at most half as connections.
#[cfg(target_os = "linux")]
const FD_LIMIT: u64 = 256;

/// The child: a server in a process limited to [`FD_LIMIT`] descriptors, told by lines on its
/// stdin to use up its descriptors (`exhaust`), give them back (`release`), say whether it can
/// still open one (`probe`) or how many it has open (`fds`); it answers on stdout.
#[cfg(target_os = "linux")]
fn fd_child() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit read and write the one struct they are given.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit), 0);
        limit.rlim_cur = FD_LIMIT;
        assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &limit), 0);
    }
    let mut cfg = config();
    cfg.http.header_timeout = Duration::from_secs(60);
    cfg.http.idle_timeout = Duration::from_secs(60);
    let (_runtime, addr, _server) = serve(cfg);
    let say = |line: String| {
        let mut out = std::io::stdout();
        let _ = writeln!(out, "child {line}");
        let _ = out.flush();
    };
    say(format!("listening {}", addr.port()));
    let mut held = Vec::new();
    for line in std::io::stdin().lines() {
        match line.unwrap_or_default().trim() {
            "exhaust" => {
                while let Ok(file) = std::fs::File::open("/dev/null") {
                    held.push(file);
                }
                say(format!("exhaust {}", held.len()));
            }
            "release" => {
                held.clear();
                say("release".into());
            }
            "probe" => say(format!(
                "probe {}",
                std::fs::File::open("/dev/null").is_ok()
            )),
            "fds" => say(format!(
                "fds {}",
                std::fs::read_dir("/proc/self/fd").map_or(0, Iterator::count)
            )),
            _ => {}
        }
    }
}

/// The finding: with 512 descriptors, 600 idle connections left none, so that `/healthz` timed
/// out and RTMP could not accept. With the cap at half the limit, connections beyond it are
/// answered 503 and descriptors remain; and when they do run out (here, taken by files), an
/// open connection is still served and a waiting one is accepted once some are free.
#[cfg(target_os = "linux")]
#[test]
fn few_descriptors_degrade_but_never_wedge() {
    use std::io::BufRead;
    use std::process::{Command as Process, Stdio};
    if std::env::var_os(FD_CHILD).is_some() {
        return fd_child();
    }
    let mut child = Process::new(std::env::current_exe().expect("test binary"))
        .args([
            "--exact",
            // This test's name as the harness knows it: its module path without the crate's.
            &format!(
                "{}::few_descriptors_degrade_but_never_wedge",
                module_path!().split_once("::").map_or("", |(_, m)| m)
            ),
            "--nocapture",
            "--test-threads",
            "1",
        ])
        .env(FD_CHILD, "1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("child server");
    let mut to_child = child.stdin.take().expect("stdin");
    let mut from_child = std::io::BufReader::new(child.stdout.take().expect("stdout")).lines();
    let mut said = |prefix: &str| -> String {
        for line in from_child.by_ref() {
            let line = line.expect("child output");
            // Not always at the start of a line: the harness's "test … ... " may precede it.
            if let Some((_, rest)) = line.split_once(&format!("child {prefix}")) {
                return rest.trim().to_owned();
            }
        }
        panic!("the child ended before saying {prefix:?}");
    };
    let port: u16 = said("listening").parse().expect("port");
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut ask = |command: &str| -> String {
        writeln!(to_child, "{command}").expect("to child");
        to_child.flush().expect("to child");
        said(command)
    };
    let idle_fds: usize = ask("fds").parse().expect("count");

    // 1. More connections than the process has descriptors.
    let cap = (FD_LIMIT / 2) as usize;
    let opened = 300;
    let connections: Vec<TcpStream> = (0..opened)
        .map(|_| TcpStream::connect(addr).expect("connect"))
        .collect();
    // The answers come at once; what has none after this is held open by the server.
    thread::sleep(Duration::from_millis(1500));
    let (mut answered_503, mut held_open, mut other) = (0, 0, 0);
    for c in &connections {
        c.set_nonblocking(true).unwrap();
        let mut buf = [0u8; 64];
        match (&*c).read(&mut buf) {
            Ok(n) if buf[..n].starts_with(b"HTTP/1.1 503") => answered_503 += 1,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                held_open += 1
            }
            _ => other += 1,
        }
    }
    let polls: Vec<u16> = (0..5)
        .map(|_| request(addr, "GET", "/healthz", "", None).0)
        .collect();
    let probe = ask("probe");
    println!(
        "{opened} connections to a server limited to {FD_LIMIT} descriptors: {held_open} held \
         (the cap is {cap}), {answered_503} answered 503, {other} otherwise; /healthz meanwhile: \
         {polls:?}; the server can still open a file: {probe}"
    );
    assert_eq!(
        (held_open, answered_503, other),
        (cap, opened - cap, 0),
        "the cap, and every connection beyond it answered"
    );
    assert!(
        polls.iter().all(|s| *s == 503),
        "answered at once: {polls:?}"
    );
    assert_eq!(
        probe, "true",
        "descriptors remain for the rest of the server"
    );
    drop(connections);
    // Every descriptor back before the next part, whose waiting connection must find none.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let fds: usize = ask("fds").parse().expect("count");
        if fds <= idle_fds {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{fds} descriptors open, {idle_fds} at the start"
        );
        thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(request(addr, "GET", "/healthz", "", None).0, 200);

    // 2. Out of descriptors: accepting fails, the open connection is served, and the waiting
    //    one is accepted once descriptors are back.
    let mut open = TcpStream::connect(addr).expect("connect");
    open.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    open.write_all(HEALTHZ).expect("request");
    assert_eq!(read_response(&mut open).0, 200);
    let files = ask("exhaust");
    let mut waiting = TcpStream::connect(addr).expect("connect (the kernel's backlog)");
    waiting.write_all(HEALTHZ).expect("request");
    waiting
        .set_read_timeout(Some(Duration::from_millis(1500)))
        .unwrap();
    let mut buf = [0u8; 64];
    let early = waiting.read(&mut buf);
    open.write_all(HEALTHZ).expect("request");
    let served = read_response(&mut open).0;
    ask("release");
    waiting
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let after = read_response(&mut waiting).0;
    println!(
        "descriptors used up ({files} files): a new connection waits ({early:?}), the open one \
         answers {served}; once they are released the waiting one answers {after}"
    );
    assert!(
        matches!(&early, Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut)),
        "no descriptor, no accept: {early:?}"
    );
    assert_eq!((served, after), (200, 200));
    drop(to_child);
    assert!(child.wait().expect("child").success());
}
