//! RTMP from an attacker: the reproductions of issue #41's RTMP findings and a
//! bounded fuzz run, against the real ingest listener on a loopback port over a stream with the
//! tiny checkpoint's engine.
//!
//! - One `connect` nesting 10,000 strict arrays (about 50 KB) aborted the process through the
//!   old protocol crate's recursive AMF0 decoder; the same message now closes its connection.
//! - An AMF0 command with an empty body and an interleaved partial message panicked the
//!   connection's task without giving its slot back, so 64 of them locked every publisher out;
//!   now each closes its connection, and the slots are free again.
//! - The fuzz run: thousands of connections from a fixed seed, each a handshake, chunk stream or
//!   AMF0 body mutated from an honest publisher's bytes; then 0 panics, 0 slots held, every
//!   connection counted, and an honest publisher still gets in.
//! - The push client's session gets mutated server answers (deep nesting among them) in memory.

mod transport;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use sdstream_server::rtmp::amf0::{self, Value};
use sdstream_server::rtmp::chunk::{ChunkDecoder, ChunkEncoder, ChunkLimits, Message, kind};
use sdstream_server::rtmp::session::{ClientSession, SessionError, SessionLimits};
use sdstream_server::rtmp::{RtmpConfig, RtmpDirectory, RtmpIngest, RtmpIngestStats};
use sdstream_server::webrtc::{MediaHub, TransportConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use transport::{Rng, runtime, tiny_engine};

const KEY: &str = "the-key";

struct OneKey(Arc<MediaHub>);

impl RtmpDirectory for OneKey {
    fn stream_for_key(&self, stream_key: &str) -> Option<(String, Arc<MediaHub>)> {
        (stream_key == KEY).then(|| ("s1".to_owned(), self.0.clone()))
    }
}

/// The ingest on a loopback port over one stream whose key is [`KEY`].
async fn ingest(
    stream: Arc<MediaHub>,
    config: RtmpConfig,
) -> (
    Arc<RtmpIngest>,
    SocketAddr,
    tokio::sync::watch::Sender<bool>,
) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("listen");
    let addr = listener.local_addr().expect("address");
    let ingest = RtmpIngest::new(config, Arc::new(OneKey(stream)));
    let (stop, stopped) = tokio::sync::watch::channel(false);
    tokio::spawn(ingest.clone().serve(listener, stopped));
    (ingest, addr, stop)
}

fn test_config() -> RtmpConfig {
    RtmpConfig {
        handshake_timeout: Duration::from_secs(3),
        idle_timeout: Duration::from_secs(3),
        ..RtmpConfig::default()
    }
}

/// C0, C1 and C2 of a plain handshake, sent at once (the server's S1 is not waited for: the
/// ingest takes any C2, as real servers do).
fn handshake(rng: &mut Rng) -> Vec<u8> {
    let mut bytes = vec![3];
    bytes.extend([0u8; 8]);
    bytes.extend(rng.bytes(1528));
    bytes.extend(rng.bytes(1536));
    bytes
}

fn command(values: &[Value], stream_id: u32) -> Message {
    Message {
        chunk_stream: 3,
        kind: kind::COMMAND_AMF0,
        stream_id,
        timestamp: 0,
        payload: amf0::encode(values),
    }
}

fn connect(app: &str) -> Message {
    command(
        &[
            Value::string("connect"),
            Value::Number(1.0),
            Value::object([
                ("app", Value::string(app)),
                ("type", Value::string("nonprivate")),
                ("flashVer", Value::string("FMLE/3.0 (compatible; FMSc/1.0)")),
                ("tcUrl", Value::string(format!("rtmp://127.0.0.1/{app}"))),
            ]),
        ],
        0,
    )
}

/// An FLV AVC sequence header and `frames` pictures (made-up NAL units: they reach the
/// depacketizer and the decoder, which drops what it cannot decode).
fn video(rng: &mut Rng, frames: usize) -> Vec<Message> {
    let mut tags = vec![vec![
        0x17, 0, 0, 0, 0, 1, 0x42, 0xc0, 0x1f, 0xff, 0xe1, 0, 6, 0x67, 0x42, 0xc0, 0x1f, 0xda,
        0x01, 1, 0, 4, 0x68, 0xce, 0x3c, 0x80,
    ]];
    for i in 0..frames {
        let nal = if i == 0 { 0x65 } else { 0x41 };
        let body = rng.some_bytes(8, 300);
        let mut tag = vec![if i == 0 { 0x17 } else { 0x27 }, 1, 0, 0, 0];
        tag.extend(((body.len() + 1) as u32).to_be_bytes());
        tag.push(nal);
        tag.extend(body);
        tags.push(tag);
    }
    tags.into_iter()
        .enumerate()
        .map(|(i, payload)| Message {
            chunk_stream: 6,
            kind: kind::VIDEO,
            stream_id: 1,
            timestamp: 33 * i as u32,
            payload,
        })
        .collect()
}

/// An honest publisher's messages: connect, createStream, publish, metadata, video, unpublish.
fn honest_session(rng: &mut Rng, key: &str, frames: usize) -> Vec<Message> {
    let mut messages = vec![
        connect("live"),
        command(
            &[
                Value::string("releaseStream"),
                Value::Number(2.0),
                Value::Null,
                Value::string(key),
            ],
            0,
        ),
        command(
            &[
                Value::string("createStream"),
                Value::Number(3.0),
                Value::Null,
            ],
            0,
        ),
        command(
            &[
                Value::string("publish"),
                Value::Number(4.0),
                Value::Null,
                Value::string(key),
                Value::string("live"),
            ],
            1,
        ),
        Message {
            chunk_stream: 4,
            kind: kind::DATA_AMF0,
            stream_id: 1,
            timestamp: 0,
            payload: amf0::encode(&[
                Value::string("@setDataFrame"),
                Value::string("onMetaData"),
                Value::EcmaArray(vec![
                    ("width".into(), Value::Number(64.0)),
                    ("height".into(), Value::Number(64.0)),
                ]),
            ]),
        },
    ];
    messages.extend(video(rng, frames));
    messages.push(command(
        &[
            Value::string("deleteStream"),
            Value::Number(5.0),
            Value::Null,
            Value::Number(1.0),
        ],
        0,
    ));
    messages
}

/// Chunks `messages` at `chunk_size` (announced first when not 128).
fn chunked(messages: &[Message], chunk_size: usize) -> Vec<u8> {
    let mut encoder = ChunkEncoder::default();
    let mut bytes = Vec::new();
    if chunk_size != 128 {
        encoder.set_chunk_size(&mut bytes, chunk_size);
    }
    for m in messages {
        encoder.write(&mut bytes, m);
    }
    bytes
}

/// `depth` strict arrays nested in each other, then a null.
fn nested_arrays(depth: usize) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(depth * 5 + 1);
    for _ in 0..depth {
        bytes.push(0x0a);
        bytes.extend(1u32.to_be_bytes());
    }
    bytes.push(0x05);
    bytes
}

/// A random AMF0 byte string: valid values, nesting of any depth, or lies about lengths.
fn random_amf0(rng: &mut Rng) -> Vec<u8> {
    match rng.below(6) {
        0 => nested_arrays(1 + rng.below(20_000)),
        1 => {
            // Nested objects: `{a: {a: … }}`.
            let depth = 1 + rng.below(5_000);
            let mut bytes = Vec::new();
            for _ in 0..depth {
                bytes.extend([0x03, 0, 1, b'a']);
            }
            bytes.push(0x05);
            for _ in 0..depth {
                bytes.extend([0, 0, 0x09]);
            }
            bytes
        }
        2 => {
            // A count or length that lies.
            let marker = [0x02, 0x08, 0x0a, 0x0c, 0x0f, 0x10][rng.below(6)];
            let mut bytes = vec![marker];
            bytes.extend((rng.next() as u32).to_be_bytes());
            bytes.extend(rng.some_bytes(0, 64));
            bytes
        }
        3 => rng.some_bytes(0, 200),
        4 => Vec::new(),
        _ => {
            // Random well-formed values: names, numbers, objects.
            let mut values = vec![Value::string(
                [
                    "connect",
                    "publish",
                    "createStream",
                    "play",
                    "deleteStream",
                    "FCUnpublish",
                    "closeStream",
                    "_result",
                ][rng.below(8)],
            )];
            for _ in 0..rng.below(5) {
                values.push(match rng.below(5) {
                    0 => Value::Number(rng.next() as f64),
                    1 => Value::string(KEY),
                    2 => Value::Null,
                    3 => Value::object([("app", Value::string("live"))]),
                    _ => Value::StrictArray(vec![Value::Undefined; rng.below(10)]),
                });
            }
            amf0::encode(&values)
        }
    }
}

/// Applies 1–8 byte-level mutations to `bytes` from `start` on.
fn mutate(rng: &mut Rng, bytes: &mut Vec<u8>, start: usize) {
    for _ in 0..1 + rng.below(8) {
        let len = bytes.len();
        if len <= start {
            bytes.extend(rng.some_bytes(1, 32));
            continue;
        }
        let at = start + rng.below(len - start);
        match rng.below(6) {
            0 => bytes[at] ^= 1 << rng.below(8),
            1 => bytes[at] = rng.next() as u8,
            2 => {
                let junk = rng.some_bytes(1, 64);
                bytes.splice(at..at, junk);
            }
            3 => {
                let end = (at + 1 + rng.below(64)).min(len);
                bytes.drain(at..end);
            }
            4 => {
                let end = (at + 1 + rng.below(256)).min(len);
                let copy = bytes[at..end].to_vec();
                let to = start + rng.below(bytes.len() - start);
                bytes.splice(to..to, copy);
            }
            _ => bytes.truncate(at),
        }
    }
}

/// One fuzz case's bytes and what it mutated.
fn case(rng: &mut Rng) -> (&'static str, Vec<u8>) {
    let key = if rng.chance(50) { KEY } else { "other-key" };
    let chunk_size = [128usize, 60, 4096, 1][rng.below(4)];
    let frames = rng.below(6);
    let mut bytes = handshake(rng);
    let shaken = bytes.len();
    match rng.below(10) {
        // The handshake itself: flipped, cut, wrong version, extra bytes.
        0..=1 => {
            bytes.extend(chunked(&honest_session(rng, key, frames), chunk_size));
            let cut = bytes.len().min(shaken + 200);
            bytes.truncate(cut);
            mutate(rng, &mut bytes, 0);
            if rng.chance(30) {
                bytes[0] = rng.next() as u8;
            }
            ("handshake", bytes)
        }
        // The chunk stream: headers, lengths, chunk sizes, interleaving.
        2..=5 => {
            bytes.extend(chunked(&honest_session(rng, key, frames), chunk_size));
            mutate(rng, &mut bytes, shaken);
            ("chunk stream", bytes)
        }
        // A command's AMF0 body, the chunk framing kept valid.
        _ => {
            let mut messages = honest_session(rng, key, frames);
            let target = rng.below(4);
            if rng.chance(50) {
                messages[target].payload = random_amf0(rng);
            } else {
                let mut body = messages[target].payload.clone();
                mutate(rng, &mut body, 0);
                messages[target].payload = body;
            }
            // A body over the command limit is refused at its header; keep most under it.
            messages.retain(|m| m.payload.len() < 100_000);
            bytes.extend(chunked(&messages, chunk_size));
            ("AMF0 body", bytes)
        }
    }
}

/// Sends `bytes` (in pieces of random size), half-closes, and reads until the server closes
/// (or 10 s pass: a bound for a hung case, counted, never expected). Returns the bytes the
/// server sent, or `None` when it had not closed.
async fn exchange(addr: SocketAddr, bytes: &[u8], pieces: usize) -> Option<Vec<u8>> {
    let mut socket = TcpStream::connect(addr).await.expect("connect");
    let step = bytes.len().div_ceil(pieces.max(1)).max(1);
    for piece in bytes.chunks(step) {
        if socket.write_all(piece).await.is_err() {
            break;
        }
    }
    let _ = socket.shutdown().await;
    let mut answer = Vec::new();
    let mut buffer = vec![0u8; 16 * 1024];
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match tokio::time::timeout_at(deadline.into(), socket.read(&mut buffer)).await {
            Err(_) => return None,
            Ok(Ok(0)) | Ok(Err(_)) => return Some(answer),
            Ok(Ok(n)) => answer.extend_from_slice(&buffer[..n]),
        }
    }
}

/// The AMF0 commands in a server's answer (after its 3,073 handshake bytes).
fn answered_commands(answer: &[u8]) -> Vec<Vec<Value>> {
    let Some(chunks) = answer.get(3073..) else {
        return Vec::new();
    };
    let Ok(messages) = ChunkDecoder::new(ChunkLimits::default()).push(chunks) else {
        return Vec::new();
    };
    messages
        .iter()
        .filter(|m| m.kind == kind::COMMAND_AMF0)
        .filter_map(|m| {
            amf0::Decoder::new(&m.payload, amf0::Limits::default())
                .read_all()
                .ok()
        })
        .collect()
}

fn status_code(commands: &[Vec<Value>]) -> Vec<String> {
    commands
        .iter()
        .filter_map(|c| {
            c.get(3)
                .and_then(|s| s.property("code"))
                .and_then(Value::as_str)
        })
        .map(str::to_owned)
        .collect()
}

async fn settled(ingest: &RtmpIngest) -> RtmpIngestStats {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let s = ingest.stats();
        if s.connections_open == 0 || Instant::now() > deadline {
            return s;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Runs `test` with a stream over the tiny engine, then closes both.
fn with_stream<F, Fut>(test: F)
where
    F: FnOnce(Arc<MediaHub>) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let engine = tiny_engine();
    runtime().block_on(async {
        let stream =
            Arc::new(MediaHub::new(engine.clone(), TransportConfig::default()).expect("transport"));
        test(stream.clone()).await;
        stream.close().await;
    });
    engine.close();
}

/// An honest publisher's whole session on `addr`: whether the server accepted its publish.
async fn honest_publisher_gets_in(addr: SocketAddr, rng: &mut Rng) -> bool {
    let mut bytes = handshake(rng);
    bytes.extend(chunked(&honest_session(rng, KEY, 3), 4096));
    let answer = exchange(addr, &bytes, 3).await.expect("closed");
    let codes = status_code(&answered_commands(&answer));
    println!("an honest publisher is answered {codes:?}");
    codes.iter().any(|c| c == "NetStream.Publish.Start")
}

#[test]
fn rtmp_findings_close_only_their_connection() {
    with_stream(|stream| async move {
        let (ingest, addr, _stop) = ingest(stream, test_config()).await;
        let mut rng = Rng(41);

        // 1. The 50 KB connect nesting 10,000 strict arrays.
        let mut deep = connect("live");
        deep.payload = amf0::encode(&[Value::string("connect"), Value::Number(1.0)]);
        deep.payload.extend(nested_arrays(10_000));
        let mut bytes = handshake(&mut rng);
        bytes.extend(chunked(&[deep.clone()], 4096));
        println!("deep connect: {} bytes of AMF0", deep.payload.len());
        assert!(exchange(addr, &bytes, 4).await.is_some(), "closed");
        let s = settled(&ingest).await;
        assert_eq!(
            (s.protocol_errors, s.connections_open, s.connection_panics),
            (1, 0, 0)
        );
        assert!(
            s.last_error
                .as_deref()
                .is_some_and(|e| e.contains("nested deeper than 16")),
            "{s:?}"
        );

        // 2. 64 connections each with an empty command body, then 64 each with a partial
        // message interleaved with a new one: every slot comes back.
        let empty = command(&[], 0);
        let mut partial = connect("live");
        partial.payload.extend(vec![0x05; 300]); // longer than one 128-byte chunk
        let mut interleaved = chunked(&[partial], 128);
        interleaved.truncate(12 + 128); // the first chunk only
        interleaved.extend(chunked(&[connect("live")], 128));
        for body in [chunked(&[empty], 128), interleaved] {
            let mut tasks = Vec::new();
            for _ in 0..64 {
                let mut bytes = handshake(&mut rng);
                bytes.extend(&body);
                tasks.push(tokio::spawn(async move { exchange(addr, &bytes, 1).await }));
            }
            for t in tasks {
                assert!(t.await.expect("task").is_some(), "the server closed it");
            }
        }
        let s = settled(&ingest).await;
        println!("after 128 broken commands: {s:?}");
        assert_eq!(s.connections_open, 0, "no slot held");
        assert_eq!(s.protocol_errors, 1 + 128);
        assert_eq!((s.connections_refused, s.connection_panics), (0, 0));

        assert!(honest_publisher_gets_in(addr, &mut rng).await);
        assert_eq!(settled(&ingest).await.publishes, 1);
    });
}

#[test]
fn rtmp_fuzz_run_crashes_nothing_and_leaks_no_slot() {
    const CONNECTIONS: usize = 3_000;
    const AT_ONCE: usize = 24;
    with_stream(|stream| async move {
        let (ingest, addr, _stop) = ingest(stream, test_config()).await;
        let started = Instant::now();
        let mut kinds: BTreeMap<&'static str, usize> = BTreeMap::new();
        let mut bytes_sent = 0usize;
        let mut hung = 0usize;
        let mut rng = Rng(0x5d5_2026);
        let mut done = 0;
        while done < CONNECTIONS {
            let mut tasks = Vec::new();
            for _ in 0..AT_ONCE.min(CONNECTIONS - done) {
                let (what, bytes) = case(&mut rng);
                *kinds.entry(what).or_default() += 1;
                bytes_sent += bytes.len();
                let pieces = 1 + rng.below(4);
                tasks.push(tokio::spawn(
                    async move { exchange(addr, &bytes, pieces).await },
                ));
            }
            done += tasks.len();
            for t in tasks {
                if t.await.expect("client task").is_none() {
                    hung += 1;
                }
            }
        }
        let s = settled(&ingest).await;
        let elapsed = started.elapsed();
        println!(
            "RTMP fuzz: {CONNECTIONS} connections ({kinds:?}), {bytes_sent} bytes, {:.1} s",
            elapsed.as_secs_f64()
        );
        println!(
            "  handshake failures {}, protocol errors {}, unknown keys {}, wrong app {}, \
             publishes {}, publishers refused {}, idle closed {}, panics {}, open after {}, \
             clients left waiting {hung}",
            s.handshake_failures,
            s.protocol_errors,
            s.unknown_keys,
            s.wrong_app,
            s.publishes,
            s.publishers_refused,
            s.idle_closed,
            s.connection_panics,
            s.connections_open
        );
        assert_eq!(
            s.connections as usize, CONNECTIONS,
            "every connection counted"
        );
        assert_eq!(s.connection_panics, 0, "no connection task panicked");
        assert_eq!(s.connections_open, 0, "no slot leaked");
        assert_eq!(hung, 0, "the server closed every connection");
        assert!(
            s.handshake_failures > 0 && s.protocol_errors > 0 && s.publishes > 0,
            "the run reached the handshake, the session and the publish: {s:?}"
        );
        // The process is alive (a stack overflow would have aborted the test binary) and an
        // honest publisher gets in.
        assert!(honest_publisher_gets_in(addr, &mut rng).await);
    });
}

/// The push's session against hostile destinations (an RTMP server reached in plain text can be
/// anyone on the path): mutated and deeply nested answers, in memory. Every input ends in an
/// event or an error; none panics or recurses deeper than the limit (the thread's stack is
/// 256 KiB).
#[test]
fn the_push_session_survives_hostile_servers() {
    let outcome = std::thread::Builder::new()
        .stack_size(256 * 1024)
        .spawn(|| {
            let mut rng = Rng(7);
            let mut errors: BTreeMap<&str, usize> = BTreeMap::new();
            let mut publishing = 0usize;
            let answer = |values: &[Value]| chunked(&[command(values, 0)], 128);
            let honest = [
                answer(&[
                    Value::string("_result"),
                    Value::Number(1.0),
                    Value::Null,
                    Value::object([("code", Value::string("NetConnection.Connect.Success"))]),
                ]),
                answer(&[
                    Value::string("_result"),
                    Value::Number(2.0),
                    Value::Null,
                    Value::Number(1.0),
                ]),
                chunked(
                    &[command(
                        &[
                            Value::string("onStatus"),
                            Value::Number(0.0),
                            Value::Null,
                            Value::object([("code", Value::string("NetStream.Publish.Start"))]),
                        ],
                        1,
                    )],
                    128,
                ),
            ]
            .concat();
            let cases = 20_000;
            for i in 0..cases {
                let mut session =
                    ClientSession::new(SessionLimits::default(), "live", "rtmp://x/live", "k");
                let mut bytes = honest.clone();
                if i == 0 {
                    // The finding: `_result` nesting 10,000 arrays.
                    let mut body = amf0::encode(&[Value::string("_result"), Value::Number(1.0)]);
                    body.extend(nested_arrays(10_000));
                    let mut deep = command(&[], 0);
                    deep.payload = body;
                    bytes = chunked(&[deep], 4096);
                } else if i % 2 == 0 {
                    mutate(&mut rng, &mut bytes, 0);
                } else {
                    let mut deep = command(&[], 0);
                    deep.payload = amf0::encode(&[Value::string("_result"), Value::Number(1.0)]);
                    deep.payload.extend(random_amf0(&mut rng));
                    bytes = chunked(&[deep], 4096);
                }
                match session.input(&bytes) {
                    Ok(_) if session.is_publishing() => publishing += 1,
                    Ok(_) => {}
                    Err(e) => {
                        let class = match &e {
                            SessionError::Chunk(_) => "chunk stream",
                            SessionError::Amf0(_) => "AMF0 values",
                            SessionError::Protocol(_) => "command exchange",
                        };
                        *errors.entry(class).or_default() += 1;
                        if i == 0 {
                            assert!(e.to_string().contains("nested deeper than 16"), "{e}");
                        }
                    }
                }
            }
            (cases, publishing, errors)
        })
        .expect("thread")
        .join();
    let (cases, publishing, errors) = outcome.expect("no panic, no stack overflow");
    println!(
        "push session fuzz: {cases} answers, {publishing} reached publishing; errors {errors:?}"
    );
    assert!(errors.values().sum::<usize>() > 1_000, "{errors:?}");
    assert!(publishing > 0, "some mutations leave an honest exchange");
}

/// A destination that answers the push's `connect` with `_result` nesting 10,000 arrays: the
/// finding's hostile RTMP server, on a loopback port. Counts the connections it takes.
async fn hostile_destination() -> (SocketAddr, Arc<std::sync::atomic::AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("listen");
    let addr = listener.local_addr().expect("address");
    let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            tokio::spawn(async move {
                // The plain handshake: C0 C1 in, S0 S1 S2 (S2 echoes C1) out, C2 in.
                let mut c0c1 = vec![0u8; 1537];
                socket.read_exact(&mut c0c1).await?;
                let mut answer = vec![3u8];
                answer.extend([0u8; 1536]);
                answer.extend_from_slice(&c0c1[1..]);
                socket.write_all(&answer).await?;
                let mut c2 = vec![0u8; 1536];
                socket.read_exact(&mut c2).await?;
                let mut first = vec![0u8; 1024];
                let _ = socket.read(&mut first).await?;
                let mut body = amf0::encode(&[Value::string("_result"), Value::Number(1.0)]);
                body.extend(nested_arrays(10_000));
                let mut deep = command(&[], 0);
                deep.payload = body;
                socket.write_all(&chunked(&[deep], 65_536)).await?;
                let mut rest = vec![0u8; 1024];
                while socket.read(&mut rest).await? > 0 {}
                Ok::<_, std::io::Error>(())
            });
        }
    });
    (addr, accepted)
}

/// The push connects only where the server's outbound policy lets it (a loopback destination
/// is refused by default, without a connection), and a hostile destination's answer fails that
/// attempt only: the push retries, the process lives.
#[test]
fn the_push_reaches_only_allowed_destinations_and_survives_a_hostile_one() {
    use sdstream::outbound::OutboundPolicy;
    use sdstream_server::rtmp::{RtmpPush, RtmpUrl};
    /// The first attempt's error (within a minute: a bound for a hung test).
    async fn first_error(push: &RtmpPush) -> String {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let status = push.status();
            if let Some(e) = status.last_error.clone().filter(|_| status.attempts >= 1) {
                return e;
            }
            assert!(Instant::now() < deadline, "no attempt: {status:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    with_stream(|stream| async move {
        let (addr, accepted) = hostile_destination().await;
        let url = RtmpUrl::parse(&format!("rtmp://127.0.0.1:{}/live/k", addr.port())).unwrap();
        let refused = RtmpPush::start(stream.clone(), url.clone(), OutboundPolicy::public_only());
        let error = first_error(&refused).await;
        println!("public only: {error}");
        assert!(
            error.contains("127.0.0.1 is not a public address (loopback"),
            "{error}"
        );
        refused.stop();
        assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 0);

        let lan = RtmpPush::start(stream, url, OutboundPolicy::with_private_network());
        let error = first_error(&lan).await;
        println!("LAN, hostile destination: {error}");
        assert!(error.contains("nested deeper than 16"), "{error}");
        assert!(accepted.load(std::sync::atomic::Ordering::SeqCst) >= 1);
        assert_eq!(lan.status().publishes, 0);
        lan.stop();
    });
}
