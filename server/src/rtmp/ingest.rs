//! RTMP ingest: a TCP listener that takes `rtmp://host/<app>/<stream_key>` publishes (OBS,
//! ffmpeg) and feeds their H.264 into the stream the key belongs to, through the stream's one
//! publisher place (an [`ExternalPublisher`]), like a WHIP session.
//!
//! Each connection: the RTMP handshake (within `handshake_timeout`), then a bounded server
//! session ([`ServerSession`]): `connect` to the configured application (others are rejected),
//! `publish` with a stream key (an unknown key, or a stream that already has a publisher, is
//! rejected), then video tags → Annex-B access units → the stream's decoder. Audio is dropped;
//! playback requests are rejected (watch over HLS or WHEP). A connection that sends nothing for
//! `idle_timeout`, or does not read what it is sent for as long, is closed, and so is one whose
//! stream ends its publisher (stream deleted).
//!
//! Nothing a connection sends reaches beyond it: garbage (a bad handshake, a broken chunk
//! stream, a malformed or over-deep command, a codec other than H.264) closes that connection
//! and is counted. Its slot among `max_connections` is held by a guard, so however the
//! connection ends — an error, a timeout, even a panic (which Tokio confines to the
//! connection's task, and which is counted) — the slot is given back.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use super::flv::{AvcDepacketizer, FlvError};
use super::handshake::{HandshakeRole, handshake};
use super::session::{ServerEvent, ServerSession, SessionLimits};
use crate::webrtc::{ExternalPublisher, IngestKind, MediaHub, TransportError};

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
    /// What one connection's chunk stream and commands may hold (message sizes, buffered
    /// bytes, chunk streams, AMF0 depth and value count).
    pub limits: SessionLimits,
}

impl Default for RtmpConfig {
    fn default() -> Self {
        Self {
            app: "live".into(),
            handshake_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(10),
            max_connections: 64,
            limits: SessionLimits::default(),
        }
    }
}

/// Finds the stream an RTMP stream key publishes to.
pub trait RtmpDirectory: Send + Sync + 'static {
    /// The id and transport of the stream whose key is `stream_key`, if any.
    fn stream_for_key(&self, stream_key: &str) -> Option<(String, Arc<MediaHub>)>;
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
    /// Connections whose task panicked (a bug: the connection ended, its slot was given back,
    /// nothing else was disturbed).
    pub connection_panics: u64,
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
                    // Out of descriptors, most often: back off and keep the listener.
                    tracing::warn!(error = %e, "RTMP accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            self.lock().connections += 1;
            let Some(slot) = OpenSlot::take(&self) else {
                self.lock().connections_refused += 1;
                tracing::warn!(%peer, "RTMP connection refused: too many open");
                drop(socket);
                continue;
            };
            let ingest = self.clone();
            let stop = shutdown.clone();
            let task = tokio::spawn(async move {
                // Given back when the task ends, however it ends.
                let _slot = slot;
                ingest.connection(socket, peer, stop).await;
            });
            let ingest = self.clone();
            tokio::spawn(async move {
                if let Err(e) = task.await
                    && e.is_panic()
                {
                    ingest.lock().connection_panics += 1;
                    tracing::error!(%peer, "RTMP connection task panicked; the connection was closed");
                }
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
            handshake(&mut socket, HandshakeRole::Server, &mut buffer),
        )
        .await
        {
            Ok(Ok(remaining)) => remaining,
            Ok(Err(message)) => return Err(self.handshake_failed(peer, message)),
            Err(_) => return Err(self.handshake_failed(peer, "timed out".into())),
        };
        let mut conn = Connection {
            session: ServerSession::new(self.config.limits),
            socket,
            peer,
            publisher: None,
            stream_id: None,
            depacketizer: AvcDepacketizer::new(),
        };
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
            self.input(&mut conn, &buffer[..n]).await?;
        }
    }

    fn handshake_failed(&self, peer: SocketAddr, message: String) -> Closed {
        tracing::info!(%peer, error = %message, "RTMP handshake failed");
        let mut s = self.lock();
        s.handshake_failures += 1;
        s.last_error = Some(format!("handshake: {message}"));
        Closed::Refused
    }

    /// Feeds bytes to the session, acts on what it reports, and sends its answers.
    async fn input(&self, conn: &mut Connection, data: &[u8]) -> Result<(), Closed> {
        let events = conn
            .session
            .input(data)
            .map_err(|e| Closed::Protocol(format!("RTMP: {e}")))?;
        for event in events {
            self.event(conn, event).await?;
        }
        self.flush(conn).await
    }

    /// Writes what the session queued, within the idle timeout: a peer that stops reading
    /// cannot hold its slot by leaving the server blocked on a full socket.
    async fn flush(&self, conn: &mut Connection) -> Result<(), Closed> {
        let out = conn.session.take_output();
        if out.is_empty() {
            return Ok(());
        }
        match tokio::time::timeout(self.config.idle_timeout, conn.socket.write_all(&out)).await {
            Ok(written) => Ok(written?),
            Err(_) => Err(Closed::Protocol(
                "the peer did not read the server's answers".into(),
            )),
        }
    }

    /// Refuses a request with an RTMP status `code` and `description`, sends the answer and
    /// ends the connection.
    async fn reject(
        &self,
        conn: &mut Connection,
        transaction: f64,
        stream_id: u32,
        code: &str,
        description: &str,
    ) -> Closed {
        tracing::info!(peer = %conn.peer, code, description, "RTMP request rejected");
        conn.session
            .reject(transaction, stream_id, code, description);
        let _ = self.flush(conn).await;
        let _ = conn.socket.flush().await;
        let _ = conn.socket.shutdown().await;
        self.lock().last_error = Some(description.to_owned());
        Closed::Refused
    }

    async fn event(&self, conn: &mut Connection, event: ServerEvent) -> Result<(), Closed> {
        match event {
            ServerEvent::Connect { transaction, app } => {
                if app != self.config.app {
                    self.lock().wrong_app += 1;
                    let message = format!(
                        "unknown application {app:?}: publish to rtmp://<host>/{}/<stream_key>",
                        self.config.app
                    );
                    return Err(self
                        .reject(
                            conn,
                            transaction,
                            0,
                            "NetConnection.Connect.Rejected",
                            &message,
                        )
                        .await);
                }
                conn.session.accept_connect(transaction);
                Ok(())
            }
            ServerEvent::Publish {
                transaction,
                stream_id,
                key,
            } => self.publish(conn, transaction, stream_id, &key).await,
            ServerEvent::Play {
                transaction,
                stream_id,
            } => {
                self.lock().play_refused += 1;
                Err(self
                    .reject(
                        conn,
                        transaction,
                        stream_id,
                        "NetStream.Play.Failed",
                        "this server does not play over RTMP: watch the stream's HLS or WHEP URL",
                    )
                    .await)
            }
            ServerEvent::Video { data, .. } => {
                let arrived = Instant::now();
                let Some(publisher) = &conn.publisher else {
                    return Ok(());
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
                Ok(())
            }
            ServerEvent::PublishEnded => {
                if let Some(publisher) = conn.publisher.take() {
                    tracing::info!(
                        peer = %conn.peer,
                        stream = conn.stream_id.as_deref().unwrap_or(""),
                        session = publisher.session_id(),
                        "RTMP publish finished"
                    );
                }
                Ok(())
            }
        }
    }

    async fn publish(
        &self,
        conn: &mut Connection,
        transaction: f64,
        rtmp_stream: u32,
        stream_key: &str,
    ) -> Result<(), Closed> {
        let refusal: String = if conn.publisher.is_some() {
            "one publish per connection".into()
        } else if let Some((stream_id, stream)) = self.directory.stream_for_key(stream_key) {
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
                    conn.session.accept_publish(rtmp_stream, stream_key);
                    return Ok(());
                }
                Err(TransportError::PublisherPresent) => {
                    self.lock().publishers_refused += 1;
                    "the stream already has a publisher".into()
                }
                Err(e) => e.to_string(),
            }
        } else {
            self.lock().unknown_keys += 1;
            "unknown stream key: create a stream and publish with its stream_key".into()
        };
        Err(self
            .reject(
                conn,
                transaction,
                rtmp_stream,
                "NetStream.Publish.BadName",
                &refusal,
            )
            .await)
    }
}

/// One of the listener's `max_connections` places, given back when dropped.
struct OpenSlot(Arc<RtmpIngest>);

impl OpenSlot {
    /// A place, unless all are taken.
    fn take(ingest: &Arc<RtmpIngest>) -> Option<Self> {
        let max = ingest.config.max_connections;
        ingest
            .open
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |open| {
                (open < max).then_some(open + 1)
            })
            .ok()
            .map(|_| Self(ingest.clone()))
    }
}

impl Drop for OpenSlot {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Completes when `publisher` is ended by its stream; never without one.
async fn ended(publisher: Option<&ExternalPublisher>) {
    match publisher {
        Some(p) => p.ended().await,
        None => std::future::pending().await,
    }
}
