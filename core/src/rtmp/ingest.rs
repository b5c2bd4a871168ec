//! RTMP ingest: a TCP listener that takes `rtmp://host/<app>/<stream_key>` publishes (OBS,
//! ffmpeg) and feeds their H.264 into the stream the key belongs to, through the stream's one
//! publisher place (an [`ExternalPublisher`]), like a WHIP session.
//!
//! Each connection: the RTMP handshake (within `handshake_timeout`), then rml_rtmp's server
//! session: `connect` to the configured application (others are rejected), `publish` with a
//! stream key (an unknown key, or a stream that already has a publisher, is rejected), then
//! video tags → Annex-B access units → the stream's decoder. Audio is dropped; playback
//! requests are rejected (watch over HLS or WHEP). A connection that sends nothing for
//! `idle_timeout` is closed, and so is one whose stream ends its publisher (stream deleted).
//! Garbage (a bad handshake, undecodable chunks, a codec other than H.264) closes the
//! connection and is counted; nothing else is disturbed.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rml_rtmp::handshake::{Handshake, HandshakeProcessResult, PeerType};
use rml_rtmp::sessions::{
    ServerSession, ServerSessionConfig, ServerSessionEvent, ServerSessionResult,
};
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use super::flv::{AvcDepacketizer, FlvError};
use crate::webrtc::{ExternalPublisher, IngestKind, TransportError, WebRtcStream};

/// How the ingest listener behaves.
#[derive(Debug, Clone, PartialEq)]
pub struct RtmpConfig {
    /// The RTMP application publishers connect to (`rtmp://host/<app>/<key>`). Default `live`,
    /// Daydream's.
    pub app: String,
    /// How long the handshake and the `connect`/`publish` exchange may take. Default 10 s.
    pub handshake_timeout: Duration,
    /// A connection that sends nothing for this long is closed. Default 10 s.
    pub idle_timeout: Duration,
    /// Most connections at once; more are closed at once (counted). Default 64.
    pub max_connections: usize,
}

impl Default for RtmpConfig {
    fn default() -> Self {
        Self {
            app: "live".into(),
            handshake_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(10),
            max_connections: 64,
        }
    }
}

/// Finds the stream an RTMP stream key publishes to.
pub trait RtmpDirectory: Send + Sync + 'static {
    /// The id and transport of the stream whose key is `stream_key`, if any.
    fn stream_for_key(&self, stream_key: &str) -> Option<(String, Arc<WebRtcStream>)>;
}

/// Counters of the ingest listener.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct RtmpIngestStats {
    /// TCP connections accepted.
    pub connections: u64,
    /// Connections open now.
    pub connections_open: usize,
    /// Connections closed at once because `max_connections` were open.
    pub connections_refused: u64,
    /// Handshakes that failed (not RTMP, a bad version, cut short, too slow).
    pub handshake_failures: u64,
    /// `connect` requests for another application, rejected.
    pub wrong_app: u64,
    /// `publish` requests with a key no stream has, rejected.
    pub unknown_keys: u64,
    /// `publish` requests for a stream that already had a publisher, rejected.
    pub publishers_refused: u64,
    /// `play` requests, rejected (this server plays over HLS and WHEP).
    pub play_refused: u64,
    /// Publishes accepted.
    pub publishes: u64,
    /// Connections closed for a protocol error after the handshake (undecodable chunks, a
    /// codec other than H.264).
    pub protocol_errors: u64,
    /// Connections closed after `idle_timeout` without data.
    pub idle_closed: u64,
    /// Bytes received on all connections.
    pub bytes_received: u64,
    /// The last error, for the log and the status.
    pub last_error: Option<String>,
}

/// The RTMP ingest listener (see the module docs).
pub struct RtmpIngest {
    config: RtmpConfig,
    directory: Arc<dyn RtmpDirectory>,
    stats: Mutex<RtmpIngestStats>,
    open: AtomicUsize,
}

impl std::fmt::Debug for RtmpIngest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RtmpIngest")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// Why a connection ended early.
#[derive(Debug)]
enum Closed {
    /// The peer closed it or the socket failed.
    Io(std::io::Error),
    /// Counted and logged already: close quietly.
    Refused,
    /// A protocol error, counted as such.
    Protocol(String),
    /// Nothing arrived for `idle_timeout`.
    Idle,
    /// The stream ended the publisher (deleted, or the server closing).
    Ended,
}

impl From<std::io::Error> for Closed {
    fn from(e: std::io::Error) -> Self {
        Closed::Io(e)
    }
}

/// What one connection is doing.
struct Connection {
    session: ServerSession,
    socket: TcpStream,
    peer: SocketAddr,
    app_accepted: bool,
    publisher: Option<ExternalPublisher>,
    stream_id: Option<String>,
    depacketizer: AvcDepacketizer,
}

impl RtmpIngest {
    /// A listener over `directory` (nothing runs until [`serve`](Self::serve)).
    pub fn new(config: RtmpConfig, directory: Arc<dyn RtmpDirectory>) -> Arc<Self> {
        Arc::new(Self {
            config,
            directory,
            stats: Mutex::new(RtmpIngestStats::default()),
            open: AtomicUsize::new(0),
        })
    }

    /// The counters.
    pub fn stats(&self) -> RtmpIngestStats {
        let mut s = self.lock().clone();
        s.connections_open = self.open.load(Ordering::Acquire);
        s
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, RtmpIngestStats> {
        self.stats.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Accepts connections on `listener` until `shutdown` turns true.
    pub async fn serve(
        self: Arc<Self>,
        listener: TcpListener,
        mut shutdown: watch::Receiver<bool>,
    ) {
        loop {
            let accepted = tokio::select! {
                accepted = listener.accept() => accepted,
                _ = shutdown.wait_for(|stop| *stop) => break,
            };
            let (socket, peer) = match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    tracing::warn!(error = %e, "RTMP accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            self.lock().connections += 1;
            if self.open.load(Ordering::Acquire) >= self.config.max_connections {
                self.lock().connections_refused += 1;
                tracing::warn!(%peer, "RTMP connection refused: too many open");
                drop(socket);
                continue;
            }
            self.open.fetch_add(1, Ordering::AcqRel);
            let ingest = self.clone();
            let stop = shutdown.clone();
            tokio::spawn(async move {
                ingest.connection(socket, peer, stop).await;
                ingest.open.fetch_sub(1, Ordering::AcqRel);
            });
        }
    }

    async fn connection(
        &self,
        socket: TcpStream,
        peer: SocketAddr,
        shutdown: watch::Receiver<bool>,
    ) {
        let _ = socket.set_nodelay(true);
        let outcome = self.run(socket, peer, shutdown).await;
        match outcome {
            Ok(()) => tracing::info!(%peer, "RTMP connection closed"),
            Err(Closed::Io(e)) => tracing::info!(%peer, error = %e, "RTMP connection closed"),
            Err(Closed::Refused) => {}
            Err(Closed::Idle) => {
                self.lock().idle_closed += 1;
                tracing::info!(%peer, "RTMP connection idle: closed");
            }
            Err(Closed::Ended) => tracing::info!(%peer, "RTMP publisher ended by the stream"),
            Err(Closed::Protocol(message)) => {
                tracing::warn!(%peer, error = %message, "RTMP connection closed");
                let mut s = self.lock();
                s.protocol_errors += 1;
                s.last_error = Some(message);
            }
        }
    }

    async fn run(
        &self,
        mut socket: TcpStream,
        peer: SocketAddr,
        mut shutdown: watch::Receiver<bool>,
    ) -> Result<(), Closed> {
        let mut buffer = vec![0u8; 64 * 1024];
        let remaining = match tokio::time::timeout(
            self.config.handshake_timeout,
            handshake(&mut socket, &mut buffer),
        )
        .await
        {
            Ok(Ok(remaining)) => remaining,
            Ok(Err(message)) => return Err(self.handshake_failed(peer, message)),
            Err(_) => return Err(self.handshake_failed(peer, "timed out".into())),
        };
        let (session, results) = ServerSession::new(ServerSessionConfig::new())
            .map_err(|e| Closed::Protocol(format!("RTMP session: {e:?}")))?;
        let mut conn = Connection {
            session,
            socket,
            peer,
            app_accepted: false,
            publisher: None,
            stream_id: None,
            depacketizer: AvcDepacketizer::new(),
        };
        self.results(&mut conn, results).await?;
        if !remaining.is_empty() {
            self.input(&mut conn, &remaining).await?;
        }
        let connected_at = Instant::now();
        loop {
            // Until it publishes, a connection has the handshake's time; then the idle limit.
            let wait = if conn.publisher.is_some() {
                self.config.idle_timeout
            } else {
                self.config
                    .handshake_timeout
                    .saturating_sub(connected_at.elapsed())
                    .max(Duration::from_millis(1))
            };
            let read = tokio::select! {
                read = tokio::time::timeout(wait, conn.socket.read(&mut buffer)) => read,
                _ = ended(conn.publisher.as_ref()) => return Err(Closed::Ended),
                _ = shutdown.wait_for(|stop| *stop) => return Err(Closed::Ended),
            };
            let n = match read {
                Err(_) if conn.publisher.is_some() => return Err(Closed::Idle),
                Err(_) => {
                    return Err(Closed::Protocol(
                        "no publish request within the handshake timeout".into(),
                    ));
                }
                Ok(Err(e)) => return Err(Closed::Io(e)),
                Ok(Ok(0)) => return Ok(()),
                Ok(Ok(n)) => n,
            };
            self.lock().bytes_received += n as u64;
            if let Some(publisher) = &conn.publisher {
                publisher.received_bytes(n);
            }
            let data = buffer[..n].to_vec();
            self.input(&mut conn, &data).await?;
        }
    }

    fn handshake_failed(&self, peer: SocketAddr, message: String) -> Closed {
        tracing::info!(%peer, error = %message, "RTMP handshake failed");
        let mut s = self.lock();
        s.handshake_failures += 1;
        s.last_error = Some(format!("handshake: {message}"));
        Closed::Refused
    }

    async fn input(&self, conn: &mut Connection, data: &[u8]) -> Result<(), Closed> {
        let results = conn
            .session
            .handle_input(data)
            .map_err(|e| Closed::Protocol(format!("undecodable RTMP data: {e:?}")))?;
        self.results(conn, results).await
    }

    /// Sends the session's packets and acts on its events (which may make more packets).
    async fn results(
        &self,
        conn: &mut Connection,
        results: Vec<ServerSessionResult>,
    ) -> Result<(), Closed> {
        let mut queue: std::collections::VecDeque<ServerSessionResult> = results.into();
        while let Some(result) = queue.pop_front() {
            match result {
                ServerSessionResult::OutboundResponse(packet) => {
                    conn.socket.write_all(&packet.bytes).await?;
                }
                ServerSessionResult::RaisedEvent(event) => {
                    let more = self.event(conn, event).await?;
                    queue.extend(more);
                }
                ServerSessionResult::UnhandleableMessageReceived(_) => {}
            }
        }
        Ok(())
    }

    /// Rejects request `request_id` with an RTMP status `code` and `description`, sends the
    /// answer and ends the connection.
    async fn reject(
        &self,
        conn: &mut Connection,
        request_id: u32,
        code: &str,
        description: &str,
    ) -> Closed {
        tracing::info!(peer = %conn.peer, code, description, "RTMP request rejected");
        if let Ok(results) = conn.session.reject_request(request_id, code, description) {
            for result in results {
                if let ServerSessionResult::OutboundResponse(packet) = result {
                    let _ = conn.socket.write_all(&packet.bytes).await;
                }
            }
        }
        let _ = conn.socket.flush().await;
        let _ = conn.socket.shutdown().await;
        self.lock().last_error = Some(description.to_owned());
        Closed::Refused
    }

    fn accept(conn: &mut Connection, request_id: u32) -> Result<Vec<ServerSessionResult>, Closed> {
        conn.session
            .accept_request(request_id)
            .map_err(|e| Closed::Protocol(format!("RTMP session: {e:?}")))
    }

    async fn event(
        &self,
        conn: &mut Connection,
        event: ServerSessionEvent,
    ) -> Result<Vec<ServerSessionResult>, Closed> {
        match event {
            ServerSessionEvent::ConnectionRequested {
                request_id,
                app_name,
            } => {
                if app_name.trim_end_matches('/') != self.config.app {
                    self.lock().wrong_app += 1;
                    let message = format!(
                        "unknown application {app_name:?}: publish to rtmp://<host>/{}/<stream_key>",
                        self.config.app
                    );
                    return Err(self
                        .reject(conn, request_id, "NetConnection.Connect.Rejected", &message)
                        .await);
                }
                conn.app_accepted = true;
                Self::accept(conn, request_id)
            }
            ServerSessionEvent::PublishStreamRequested {
                request_id,
                stream_key,
                ..
            } => self.publish(conn, request_id, &stream_key).await,
            ServerSessionEvent::PlayStreamRequested { request_id, .. } => {
                self.lock().play_refused += 1;
                Err(self
                    .reject(
                        conn,
                        request_id,
                        "NetStream.Play.Failed",
                        "this server does not play over RTMP: watch the stream's HLS or WHEP URL",
                    )
                    .await)
            }
            ServerSessionEvent::VideoDataReceived { data, .. } => {
                let arrived = Instant::now();
                let Some(publisher) = &conn.publisher else {
                    return Ok(Vec::new());
                };
                match conn.depacketizer.push(&data) {
                    Ok(Some(unit)) => publisher.push_access_unit(unit.data, arrived),
                    Ok(None) => {}
                    Err(e @ FlvError::UnsupportedCodec(_)) => {
                        return Err(Closed::Protocol(e.to_string()));
                    }
                    // A damaged tag: the decoder resumes at the next keyframe.
                    Err(e) => {
                        tracing::debug!(peer = %conn.peer, error = %e, "RTMP video tag dropped");
                    }
                }
                Ok(Vec::new())
            }
            ServerSessionEvent::PublishStreamFinished { .. } => {
                if let Some(publisher) = conn.publisher.take() {
                    tracing::info!(
                        peer = %conn.peer,
                        stream = conn.stream_id.as_deref().unwrap_or(""),
                        session = publisher.session_id(),
                        "RTMP publish finished"
                    );
                }
                Ok(Vec::new())
            }
            _ => Ok(Vec::new()),
        }
    }

    async fn publish(
        &self,
        conn: &mut Connection,
        request_id: u32,
        stream_key: &str,
    ) -> Result<Vec<ServerSessionResult>, Closed> {
        if !conn.app_accepted || conn.publisher.is_some() {
            return Err(self
                .reject(
                    conn,
                    request_id,
                    "NetStream.Publish.BadName",
                    "one publish per connection, after connect",
                )
                .await);
        }
        let Some((stream_id, stream)) = self.directory.stream_for_key(stream_key) else {
            self.lock().unknown_keys += 1;
            return Err(self
                .reject(
                    conn,
                    request_id,
                    "NetStream.Publish.BadName",
                    "unknown stream key: create a stream and publish with its stream_key",
                )
                .await);
        };
        match stream.publish_external(IngestKind::Rtmp).await {
            Ok(publisher) => {
                self.lock().publishes += 1;
                tracing::info!(
                    peer = %conn.peer,
                    stream = %stream_id,
                    session = publisher.session_id(),
                    "RTMP publisher connected"
                );
                conn.publisher = Some(publisher);
                conn.stream_id = Some(stream_id);
                Self::accept(conn, request_id)
            }
            Err(TransportError::PublisherPresent) => {
                self.lock().publishers_refused += 1;
                Err(self
                    .reject(
                        conn,
                        request_id,
                        "NetStream.Publish.BadName",
                        "the stream already has a publisher",
                    )
                    .await)
            }
            Err(e) => {
                let message = e.to_string();
                Err(self
                    .reject(conn, request_id, "NetStream.Publish.BadName", &message)
                    .await)
            }
        }
    }
}

/// Completes when `publisher` is ended by its stream; never without one.
async fn ended(publisher: Option<&ExternalPublisher>) {
    match publisher {
        Some(p) => p.ended().await,
        None => std::future::pending().await,
    }
}

/// The server side of the RTMP handshake; returns the bytes that followed it.
async fn handshake(socket: &mut TcpStream, buffer: &mut [u8]) -> Result<Vec<u8>, String> {
    let mut handshake = Handshake::new(PeerType::Server);
    loop {
        let n = socket
            .read(buffer)
            .await
            .map_err(|e| format!("read: {e}"))?;
        if n == 0 {
            return Err("the peer closed the connection during the handshake".into());
        }
        match handshake.process_bytes(&buffer[..n]) {
            Err(e) => return Err(format!("not an RTMP handshake ({e:?})")),
            Ok(HandshakeProcessResult::InProgress { response_bytes }) => {
                socket
                    .write_all(&response_bytes)
                    .await
                    .map_err(|e| format!("write: {e}"))?;
            }
            Ok(HandshakeProcessResult::Completed {
                response_bytes,
                remaining_bytes,
            }) => {
                socket
                    .write_all(&response_bytes)
                    .await
                    .map_err(|e| format!("write: {e}"))?;
                return Ok(remaining_bytes);
            }
        }
    }
}
