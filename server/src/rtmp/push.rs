//! RTMP push: a stream's encoded output published to an RTMP server (a stream's
//! `output_rtmp_url`: a CDN, a restreaming service, another `ffmpeg -listen 1`). One task per
//! push: connect, handshake, `connect` to the URL's application, `publish` its stream key, then
//! an AVC sequence header and every encoded picture as an FLV video tag. When the connection
//! fails the push retries (1 s, doubling up to 10 s) and starts again from a keyframe; while it
//! is not publishing it does not subscribe to the output, so it costs the stream nothing.
//!
//! The destination is named by whoever created the stream, so the connection is made under the
//! server's [`OutboundPolicy`]: the host is resolved and only the addresses the policy lets
//! through are tried (by default no loopback, private or link-local address), and the server's
//! answers are read under the session's limits.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;

use super::flv::{parameter_sets, picture_tag, sequence_header_tag};
use super::handshake::{HandshakeRole, handshake};
use super::session::{ClientEvent, ClientSession, SessionLimits};
use crate::webrtc::{MediaHub, Summary};
use sdstream::outbound::OutboundPolicy;

/// The default RTMP port.
const RTMP_PORT: u16 = 1935;
/// Longest wait between two attempts.
const MAX_RETRY: Duration = Duration::from_secs(10);
/// How long connecting, the handshake and the `connect`/`publish` exchange may take.
const SETUP_TIMEOUT: Duration = Duration::from_secs(10);
/// Samples kept for the delivery summary.
const WINDOW: usize = 512;

/// A parsed `rtmp://host[:port]/app[/more]/stream_key` URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RtmpUrl {
    /// Host name or address.
    pub host: String,
    /// TCP port (1935 unless given).
    pub port: u16,
    /// The application: every path segment but the last.
    pub app: String,
    /// The stream key: the last path segment (with the query, if any).
    pub stream_key: String,
}

impl RtmpUrl {
    /// Parses an RTMP URL; `rtmps://` (TLS) is refused with a message that says so.
    pub fn parse(url: &str) -> Result<Self, String> {
        let url = url.trim();
        let Some((scheme, rest)) = url.split_once("://") else {
            return Err(format!(
                "{url:?} is not a URL: give rtmp://host[:port]/app/stream_key"
            ));
        };
        match scheme.to_ascii_lowercase().as_str() {
            "rtmp" => {}
            "rtmps" => {
                return Err(
                    "rtmps:// (RTMP over TLS) is not supported; give an rtmp:// URL".into(),
                );
            }
            other => {
                return Err(format!(
                    "scheme {other:?} is not RTMP: give rtmp://host[:port]/app/stream_key"
                ));
            }
        }
        let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
        if authority.is_empty()
            || authority.contains('@')
            || authority.contains(char::is_whitespace)
        {
            return Err(format!(
                "{url:?}: no usable host (user info is not supported)"
            ));
        }
        let (host, port) = match authority.rsplit_once(':') {
            Some((host, port)) if !host.ends_with(']') || authority.starts_with('[') => {
                let port = port.parse::<u16>().ok().filter(|p| *p > 0).ok_or_else(|| {
                    format!("{url:?}: the port {port:?} is not a number from 1 to 65535")
                })?;
                (host, port)
            }
            _ => (authority, RTMP_PORT),
        };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() {
            return Err(format!("{url:?}: no host"));
        }
        let (app, key) = path.trim_end_matches('/').rsplit_once('/').ok_or_else(|| {
            format!(
                "{url:?}: give both an application and a stream key (rtmp://host/app/stream_key)"
            )
        })?;
        if app.is_empty() || key.is_empty() {
            return Err(format!(
                "{url:?}: give both an application and a stream key (rtmp://host/app/stream_key)"
            ));
        }
        Ok(Self {
            host: host.to_owned(),
            port,
            app: app.to_owned(),
            stream_key: key.to_owned(),
        })
    }

    /// The URL without its stream key (which is a secret), for logs and status.
    pub fn redacted(&self) -> String {
        format!("rtmp://{}:{}/{}/***", self.host, self.port, self.app)
    }

    fn tc_url(&self) -> String {
        format!("rtmp://{}:{}/{}", self.host, self.port, self.app)
    }
}

/// Where a push is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PushState {
    /// Connecting, handshaking or asking to publish.
    Connecting,
    /// Sending pictures.
    Publishing,
    /// The last attempt failed; waiting to try again.
    Retrying,
    /// Stopped (the stream ended).
    Stopped,
}

/// A push's counters and timings.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PushStatus {
    /// The destination without its stream key.
    pub url: String,
    /// Where the push is.
    pub state: PushState,
    /// Attempts to connect.
    pub attempts: u64,
    /// Attempts that reached publishing.
    pub publishes: u64,
    /// Pictures sent.
    pub frames_sent: u64,
    /// Keyframes among them.
    pub keyframes_sent: u64,
    /// Bytes written to the socket.
    pub bytes_sent: u64,
    /// Why the last attempt failed.
    pub last_error: Option<String>,
    /// Per picture: encoded → written to the socket.
    pub delivery: Summary,
}

struct PushShared {
    status: Mutex<PushStatus>,
    delivery: Mutex<std::collections::VecDeque<f64>>,
    delivered: Mutex<u64>,
}

impl PushShared {
    fn status(&self) -> std::sync::MutexGuard<'_, PushStatus> {
        self.status.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A running push (see the module docs). Dropping it stops the push.
pub struct RtmpPush {
    shared: Arc<PushShared>,
    stop: watch::Sender<bool>,
}

impl std::fmt::Debug for RtmpPush {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RtmpPush")
            .field("url", &self.shared.status().url)
            .finish_non_exhaustive()
    }
}

impl RtmpPush {
    /// Starts pushing `stream`'s output to `url`, connecting only to addresses `policy` lets
    /// through (on the current Tokio runtime).
    pub fn start(stream: Arc<MediaHub>, url: RtmpUrl, policy: OutboundPolicy) -> Self {
        let shared = Arc::new(PushShared {
            status: Mutex::new(PushStatus {
                url: url.redacted(),
                state: PushState::Connecting,
                attempts: 0,
                publishes: 0,
                frames_sent: 0,
                keyframes_sent: 0,
                bytes_sent: 0,
                last_error: None,
                delivery: Summary::default(),
            }),
            delivery: Mutex::new(std::collections::VecDeque::new()),
            delivered: Mutex::new(0),
        });
        let (stop, stopped) = watch::channel(false);
        let task_shared = shared.clone();
        tokio::spawn(async move { run(task_shared, stream, url, policy, stopped).await });
        Self { shared, stop }
    }

    /// The push's counters and timings.
    pub fn status(&self) -> PushStatus {
        let mut status = self.shared.status().clone();
        let window: Vec<f64> = self
            .shared
            .delivery
            .lock()
            .map(|w| w.iter().copied().collect())
            .unwrap_or_default();
        let count = self.shared.delivered.lock().map(|c| *c).unwrap_or(0);
        status.delivery = summarize(window, count);
        status
    }

    /// Stops the push.
    pub fn stop(&self) {
        self.stop.send_replace(true);
    }
}

impl Drop for RtmpPush {
    fn drop(&mut self) {
        self.stop.send_replace(true);
    }
}

fn summarize(mut values: Vec<f64>, count: u64) -> Summary {
    if values.is_empty() {
        return Summary::default();
    }
    values.sort_by(f64::total_cmp);
    let at = |q: f64| values[((values.len() - 1) as f64 * q).round() as usize];
    Summary {
        count,
        mean_ms: values.iter().sum::<f64>() / values.len() as f64,
        p50_ms: at(0.5),
        p95_ms: at(0.95),
        max_ms: at(1.0),
    }
}

async fn run(
    shared: Arc<PushShared>,
    stream: Arc<MediaHub>,
    url: RtmpUrl,
    policy: OutboundPolicy,
    mut stopped: watch::Receiver<bool>,
) {
    let mut retry = Duration::from_secs(1);
    loop {
        {
            let mut s = shared.status();
            s.state = PushState::Connecting;
            s.attempts += 1;
        }
        let attempt = tokio::select! {
            outcome = push_once(&shared, &stream, &url, policy) => outcome,
            _ = stopped.wait_for(|stop| *stop) => break,
        };
        {
            let mut s = shared.status();
            s.state = PushState::Retrying;
            match &attempt.result {
                Err(e) => s.last_error = Some(e.clone()),
                Ok(()) => s.last_error = Some("the stream's output ended".into()),
            }
        }
        if let Err(e) = &attempt.result {
            tracing::warn!(url = %url.redacted(), error = %e, "RTMP push failed; retrying");
        }
        // A push that got as far as publishing starts its back-off again.
        if attempt.published {
            retry = Duration::from_secs(1);
        }
        tokio::select! {
            _ = tokio::time::sleep(retry) => {}
            _ = stopped.wait_for(|stop| *stop) => break,
        }
        retry = (retry * 2).min(MAX_RETRY);
    }
    shared.status().state = PushState::Stopped;
}

struct Attempt {
    published: bool,
    result: Result<(), String>,
}

/// One connection: set up, then send until something fails.
async fn push_once(
    shared: &PushShared,
    stream: &Arc<MediaHub>,
    url: &RtmpUrl,
    policy: OutboundPolicy,
) -> Attempt {
    let mut published = false;
    let result = async {
        let (mut socket, mut session) = tokio::time::timeout(SETUP_TIMEOUT, setup(url, policy))
            .await
            .map_err(|_| "timed out connecting and asking to publish".to_owned())??;
        published = true;
        {
            let mut s = shared.status();
            s.state = PushState::Publishing;
            s.publishes += 1;
            s.last_error = None;
        }
        tracing::info!(url = %url.redacted(), "RTMP push publishing");
        let mut sink = stream
            .subscribe_encoded()
            .map_err(|e| format!("the stream: {e}"))?;
        sink.request_keyframe();
        let mut header: Option<(Vec<u8>, Vec<u8>)> = None;
        let mut origin: Option<Instant> = None;
        let mut buffer = vec![0u8; 16 * 1024];
        loop {
            tokio::select! {
                frame = sink.recv() => {
                    let Some(frame) = frame else {
                        return Ok(());
                    };
                    let mut bytes_out = 0usize;
                    if frame.keyframe
                        && let Some((sps, pps)) = parameter_sets(&frame.data)
                        && header.as_ref().is_none_or(|(s, p)| s != sps || p != pps)
                    {
                        let tag = sequence_header_tag(sps, pps);
                        let at = origin.map_or(0, |o| frame.taken.saturating_duration_since(o).as_millis() as u32);
                        bytes_out += send_video(&mut socket, &mut session, tag, at).await?;
                        header = Some((sps.to_vec(), pps.to_vec()));
                    }
                    if header.is_none() {
                        // Pictures before the first sequence header cannot be decoded.
                        sink.request_keyframe();
                        continue;
                    }
                    let origin = *origin.get_or_insert(frame.taken);
                    let at = frame.taken.saturating_duration_since(origin).as_millis() as u32;
                    let tag = picture_tag(&frame.data, frame.keyframe);
                    bytes_out += send_video(&mut socket, &mut session, tag, at).await?;
                    let elapsed = frame.encoded.elapsed().as_secs_f64() * 1e3;
                    {
                        let mut s = shared.status();
                        s.frames_sent += 1;
                        s.keyframes_sent += u64::from(frame.keyframe);
                        s.bytes_sent += bytes_out as u64;
                    }
                    if let Ok(mut w) = shared.delivery.lock() {
                        if w.len() == WINDOW {
                            w.pop_front();
                        }
                        w.push_back(elapsed);
                    }
                    if let Ok(mut c) = shared.delivered.lock() {
                        *c += 1;
                    }
                }
                read = socket.read(&mut buffer) => {
                    // The server's acknowledgements and pings (answered); a close or an error
                    // status ends the attempt.
                    let n = read.map_err(|e| format!("read: {e}"))?;
                    if n == 0 {
                        return Err("the server closed the connection".to_owned());
                    }
                    let events = session
                        .input(&buffer[..n])
                        .map_err(|e| format!("RTMP data from the server: {e}"))?;
                    if let Some(ClientEvent::Refused(reason)) = events
                        .into_iter()
                        .find(|e| matches!(e, ClientEvent::Refused(_)))
                    {
                        return Err(format!("the server stopped the publish: {reason}"));
                    }
                    write_output(&mut socket, &mut session).await?;
                }
            }
        }
    }
    .await;
    Attempt { published, result }
}

async fn send_video(
    socket: &mut TcpStream,
    session: &mut ClientSession,
    tag: Vec<u8>,
    at_ms: u32,
) -> Result<usize, String> {
    session
        .send_video(tag, at_ms)
        .map_err(|e| format!("RTMP session: {e}"))?;
    write_output(socket, session).await
}

/// Writes what the session queued; returns how many bytes. A server that stops reading stalls
/// the write for at most [`SETUP_TIMEOUT`], then the attempt fails and is retried.
async fn write_output(
    socket: &mut TcpStream,
    session: &mut ClientSession,
) -> Result<usize, String> {
    let out = session.take_output();
    if out.is_empty() {
        return Ok(0);
    }
    tokio::time::timeout(SETUP_TIMEOUT, socket.write_all(&out))
        .await
        .map_err(|_| "the server stopped reading".to_owned())?
        .map_err(|e| format!("write: {e}"))?;
    Ok(out.len())
}

/// Connects to the first address of `url`'s host that `policy` lets through.
async fn connect(url: &RtmpUrl, policy: OutboundPolicy) -> Result<TcpStream, String> {
    let target = format!("{}:{}", url.host, url.port);
    let addresses: Vec<_> = tokio::net::lookup_host((url.host.as_str(), url.port))
        .await
        .map_err(|e| format!("resolve {target}: {e}"))?
        .collect();
    let mut refusals = Vec::new();
    let mut last_error = None;
    for address in addresses {
        if let Err(refusal) = policy.check(address) {
            refusals.push(refusal.to_string());
            continue;
        }
        match TcpStream::connect(address).await {
            Ok(socket) => return Ok(socket),
            Err(e) => last_error = Some(format!("connect to {target} ({address}): {e}")),
        }
    }
    Err(last_error.unwrap_or_else(|| {
        if refusals.is_empty() {
            format!("{target} resolves to no address")
        } else {
            format!(
                "{target} is not reached from this server: {}",
                refusals.join("; ")
            )
        }
    }))
}

/// Connects, handshakes, and asks to publish; returns the socket and the publishing session.
async fn setup(
    url: &RtmpUrl,
    policy: OutboundPolicy,
) -> Result<(TcpStream, ClientSession), String> {
    let mut socket = connect(url, policy).await?;
    let _ = socket.set_nodelay(true);
    let mut buffer = vec![0u8; 16 * 1024];
    let remaining = handshake(&mut socket, HandshakeRole::Client, &mut buffer)
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    let mut session = ClientSession::new(
        SessionLimits::default(),
        &url.app,
        &url.tc_url(),
        &url.stream_key,
    );
    write_output(&mut socket, &mut session).await?;
    let mut pending = remaining;
    loop {
        let events = session
            .input(&pending)
            .map_err(|e| format!("RTMP data from the server: {e}"))?;
        write_output(&mut socket, &mut session).await?;
        for event in events {
            match event {
                ClientEvent::Connected => {}
                ClientEvent::Publishing => return Ok((socket, session)),
                ClientEvent::Refused(reason) => {
                    return Err(format!("the server refused the publish: {reason}"));
                }
            }
        }
        let n = socket
            .read(&mut buffer)
            .await
            .map_err(|e| format!("read: {e}"))?;
        if n == 0 {
            return Err("the server closed the connection before publishing began".into());
        }
        pending.clear();
        pending.extend_from_slice(&buffer[..n]);
    }
}

#[cfg(test)]
mod tests {
    use super::RtmpUrl;

    #[test]
    fn urls_are_parsed_or_refused_with_a_reason() {
        let u = RtmpUrl::parse("rtmp://cdn.example.com/live/abc123").unwrap();
        assert_eq!(
            (
                u.host.as_str(),
                u.port,
                u.app.as_str(),
                u.stream_key.as_str()
            ),
            ("cdn.example.com", 1935, "live", "abc123")
        );
        assert_eq!(u.redacted(), "rtmp://cdn.example.com:1935/live/***");
        let u = RtmpUrl::parse("rtmp://127.0.0.1:19350/app/inst/key?x=1").unwrap();
        assert_eq!(
            (
                u.host.as_str(),
                u.port,
                u.app.as_str(),
                u.stream_key.as_str()
            ),
            ("127.0.0.1", 19350, "app/inst", "key?x=1")
        );
        let u = RtmpUrl::parse("rtmp://[::1]:1936/live/k").unwrap();
        assert_eq!((u.host.as_str(), u.port), ("::1", 1936));
        for (bad, says) in [
            ("rtmps://a.example/live/k", "not supported"),
            ("http://a.example/live/k", "not RTMP"),
            ("rtmp://a.example/live", "application and a stream key"),
            ("rtmp://a.example:0/live/k", "port"),
            ("rtmp://a.example:x/live/k", "port"),
            ("rtmp:///live/k", "host"),
            ("rtmp://user:pw@a.example/live/k", "user info"),
            ("cdn.example.com/live/k", "not a URL"),
        ] {
            let e = RtmpUrl::parse(bad).unwrap_err();
            assert!(e.contains(says), "{bad}: {e}");
        }
    }
}
