//! The server's HTTP connections: its own accept loop over hyper (instead of `axum::serve`,
//! which keeps a connection as long as the client likes and has no cap), so that nothing a
//! client does, or fails to do, holds a connection or a file descriptor for long:
//!
//! * **Header timeout**: a request's head (request line and headers) must be complete within
//!   [`HttpConfig::header_timeout`] of its first byte; the first request of a connection counts
//!   from the connection's opening, so a client that connects and says nothing is closed then.
//! * **Idle timeout**: a kept-alive connection with no request in flight, nothing left to
//!   write and no byte of a new request closes after [`HttpConfig::idle_timeout`].
//! * **Write timeout**: a response whose writing makes no progress for
//!   [`HttpConfig::write_timeout`] (the client stopped reading) ends its connection. While a
//!   request is in flight (a handler working, a body being read, which [`BODY_TIMEOUT`] bounds,
//!   a response being written) neither of the other two runs: a long response that keeps
//!   moving is never cut.
//! * **Connection cap**: at most [`HttpConfig::max_connections`] at once (and at most half the
//!   process's file-descriptor limit); a connection beyond is answered `503` (Daydream's envelope,
//!   `Retry-After: 1`) and closed.
//! * **Out of descriptors**: an accept that fails (`EMFILE`, `ENFILE`, …) is logged, the loop
//!   pauses briefly and tries again; the connections already open are served meanwhile.
//!
//! Hyper's own `header_read_timeout` is not used: its clock starts when a connection becomes
//! idle, so it cannot tell a kept-alive connection waiting for its next request from a client
//! dripping a head, and the two deserve different bounds.
//!
//! [`BODY_TIMEOUT`]: crate::webrtc::BODY_TIMEOUT

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::pin::{Pin, pin};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::{Body, Bytes, HttpBody};
use axum::http::{Request, Response};
use hyper::body::{Frame, Incoming, SizeHint};
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, Semaphore, watch};

/// How the server treats its HTTP connections (module docs; `sdstream serve --http-…`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpConfig {
    /// How long a request's head may take to arrive, from its first byte (from the connection's
    /// opening for the first request). Default 10 s: a head is a few hundred bytes that any
    /// client sends at once; the same bound as a request body's.
    pub header_timeout: Duration,
    /// How long a kept-alive connection may wait for its next request. Default 30 s: past the
    /// gaps of a page or SDK that polls (every few seconds), well under the minutes a browser
    /// keeps an idle connection (it opens a new one when the server has closed it).
    pub idle_timeout: Duration,
    /// How long writing a response may make no progress before the connection is closed.
    /// Default 30 s.
    pub write_timeout: Duration,
    /// Most connections at once; one beyond is answered 503 and closed. Default 1024, and at
    /// most half of the process's descriptor limit (`ulimit -n`), so that RTMP, WebRTC and the
    /// engines keep descriptors to work with.
    pub max_connections: usize,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            header_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(30),
            write_timeout: Duration::from_secs(30),
            max_connections: 1024,
        }
    }
}

/// Most refused connections kept open at once to deliver their 503 cleanly (each holds a
/// descriptor for up to [`REFUSAL_LINGER`]); beyond, the answer is written and the connection
/// closed at once.
const MAX_REFUSING: usize = 64;
/// How long a refused connection is kept to deliver its 503.
const REFUSAL_LINGER: Duration = Duration::from_secs(1);
/// How long the accept loop pauses after an accept fails for want of resources.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// At most one warning per this long about refused connections or failing accepts.
const WARN_EVERY: Duration = Duration::from_secs(10);

/// The connection cap in effect: `configured`, but at most half of the descriptor limit.
pub(crate) fn effective_max_connections(configured: usize) -> usize {
    let configured = configured.clamp(1, 1 << 20);
    match descriptor_limit() {
        Some(limit) if limit / 2 < configured as u64 => {
            let capped = (limit / 2).max(1) as usize;
            tracing::warn!(
                configured,
                capped,
                descriptor_limit = limit,
                "HTTP connections capped at half the descriptor limit (raise `ulimit -n` to \
                 take more)"
            );
            capped
        }
        _ => configured,
    }
}

#[cfg(target_os = "linux")]
fn descriptor_limit() -> Option<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes the one struct it is given.
    let ok = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } == 0;
    (ok && limit.rlim_cur != libc::RLIM_INFINITY).then_some(limit.rlim_cur)
}

#[cfg(not(target_os = "linux"))]
fn descriptor_limit() -> Option<u64> {
    None
}

/// Why the server closed a connection on its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expiry {
    Header,
    Idle,
    Write,
}

impl Expiry {
    fn as_str(self) -> &'static str {
        match self {
            Expiry::Header => "request head too slow",
            Expiry::Idle => "idle",
            Expiry::Write => "client stopped reading",
        }
    }
}

/// What a connection is doing, as its reads, writes and requests report it.
#[derive(Debug)]
struct State {
    /// Requests between their head being complete and their response's end.
    in_flight: usize,
    /// When the head being received began (its first byte; the connection's opening for the
    /// first request). `None` between requests with nothing received, or while one is in
    /// flight.
    head_started: Option<Instant>,
    /// When the last request ended, or the last byte was written.
    idle_since: Instant,
    /// Since when a write has been waiting for the client to read; `None` when none is.
    write_blocked_since: Option<Instant>,
}

impl State {
    fn new(now: Instant) -> Self {
        Self {
            in_flight: 0,
            head_started: Some(now),
            idle_since: now,
            write_blocked_since: None,
        }
    }

    /// When the connection is to be closed, and why; `None` while a request is in flight and
    /// its writing is not stalled.
    fn deadline(&self, limits: &HttpConfig) -> Option<(Instant, Expiry)> {
        if let Some(since) = self.write_blocked_since {
            return Some((since + limits.write_timeout, Expiry::Write));
        }
        if self.in_flight > 0 {
            return None;
        }
        Some(match self.head_started {
            Some(start) => (start + limits.header_timeout, Expiry::Header),
            None => (self.idle_since + limits.idle_timeout, Expiry::Idle),
        })
    }
}

/// A connection's [`State`] and the watchdog's wake-up when a deadline may have come closer.
struct Activity {
    state: Mutex<State>,
    changed: Notify,
}

impl Activity {
    fn new(now: Instant) -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new(State::new(now)),
            changed: Notify::new(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn read(&self, bytes: usize) {
        if bytes == 0 {
            return;
        }
        let mut state = self.lock();
        if state.in_flight == 0 && state.head_started.is_none() {
            state.head_started = Some(Instant::now());
            drop(state);
            self.changed.notify_one();
        }
    }

    fn wrote(&self, bytes: usize) {
        if bytes > 0 {
            let mut state = self.lock();
            state.write_blocked_since = None;
            state.idle_since = Instant::now();
        }
    }

    fn write_blocked(&self) {
        let mut state = self.lock();
        if state.write_blocked_since.is_none() {
            state.write_blocked_since = Some(Instant::now());
            drop(state);
            self.changed.notify_one();
        }
    }

    fn request_began(self: &Arc<Self>) -> InFlight {
        let mut state = self.lock();
        state.in_flight += 1;
        state.head_started = None;
        InFlight(self.clone())
    }

    /// Completes when the connection has outlived its deadline.
    async fn expired(&self, limits: &HttpConfig) -> Expiry {
        loop {
            let next = self.lock().deadline(limits);
            match next {
                Some((at, why)) if Instant::now() >= at => return why,
                Some((at, _)) => {
                    tokio::select! {
                        () = tokio::time::sleep_until(at.into()) => {}
                        () = self.changed.notified() => {}
                    }
                }
                None => self.changed.notified().await,
            }
        }
    }
}

/// A request in flight; its end (the response's body finished or dropped, or the request
/// abandoned) starts the connection's idle clock.
struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        let mut state = self.0.lock();
        state.in_flight = state.in_flight.saturating_sub(1);
        if state.in_flight == 0 {
            state.idle_since = Instant::now();
            drop(state);
            self.0.changed.notify_one();
        }
    }
}

/// A response body that holds its request's [`InFlight`] until it has been handed over whole.
struct TrackedBody {
    inner: Body,
    in_flight: Option<InFlight>,
}

impl HttpBody for TrackedBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if matches!(polled, Poll::Ready(None | Some(Err(_)))) {
            self.in_flight = None;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The router as hyper's service, each request counted in flight until its response is out.
#[derive(Clone)]
struct Tracked {
    router: TowerToHyperService<Router>,
    activity: Arc<Activity>,
}

impl hyper::service::Service<Request<Incoming>> for Tracked {
    type Response = Response<TrackedBody>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn call(&self, request: Request<Incoming>) -> Self::Future {
        let in_flight = self.activity.request_began();
        let response = self.router.call(request);
        Box::pin(async move {
            let response = response.await?;
            Ok(response.map(|inner| TrackedBody {
                inner,
                in_flight: Some(in_flight),
            }))
        })
    }
}

/// The socket, reporting its reads and writes to the connection's [`Activity`].
struct Watched {
    stream: TcpStream,
    activity: Arc<Activity>,
}

impl AsyncRead for Watched {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.stream).poll_read(cx, buf);
        if polled.is_ready() {
            self.activity.read(buf.filled().len() - before);
        }
        polled
    }
}

impl Watched {
    fn note_write(&self, polled: &Poll<io::Result<usize>>) {
        match polled {
            Poll::Ready(Ok(n)) => self.activity.wrote(*n),
            Poll::Pending => self.activity.write_blocked(),
            Poll::Ready(Err(_)) => {}
        }
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.stream).poll_write(cx, buf);
        self.note_write(&polled);
        polled
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.stream).poll_write_vectored(cx, bufs);
        self.note_write(&polled);
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// Serves one connection until it ends, the server closes it (a timeout), or, after `stop`,
/// its request in flight has been answered.
async fn serve_connection(
    stream: TcpStream,
    router: Router,
    limits: Arc<HttpConfig>,
    mut stop: watch::Receiver<bool>,
) {
    let activity = Activity::new(Instant::now());
    let io = TokioIo::new(Watched {
        stream,
        activity: activity.clone(),
    });
    let service = Tracked {
        router: TowerToHyperService::new(router),
        activity: activity.clone(),
    };
    let mut connection =
        pin!(hyper::server::conn::http1::Builder::new().serve_connection(io, service));
    let mut stopping = *stop.borrow();
    if stopping {
        connection.as_mut().graceful_shutdown();
    }
    loop {
        tokio::select! {
            served = connection.as_mut() => {
                if let Err(e) = served {
                    tracing::debug!(error = %e, "HTTP connection ended");
                }
                return;
            }
            why = activity.expired(&limits) => {
                // Dropping the connection closes the socket.
                tracing::debug!(reason = why.as_str(), "HTTP connection closed by the server");
                return;
            }
            changed = stop.wait_for(|s| *s), if !stopping => {
                let _ = changed;
                stopping = true;
                // Idle connections close now; one with a request in flight once it is answered.
                connection.as_mut().graceful_shutdown();
            }
        }
    }
}

/// The answer to a connection over the cap: Daydream's envelope, 503.
fn refusal(max_connections: usize) -> Vec<u8> {
    let body = crate::webrtc::error_envelope(
        503,
        "SERVER/TOO_MANY_CONNECTIONS",
        &format!(
            "the server has {max_connections} connections open, as many as it takes; retry in a \
             moment"
        ),
    )
    .to_string();
    format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n\
         retry-after: 1\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// Answers a connection over the cap with 503 and lets it go. Up to [`MAX_REFUSING`] at once
/// are kept for up to [`REFUSAL_LINGER`], reading what the client sends until it closes:
/// closing with unread bytes would reset the connection, which can discard the answer before
/// the client has read it. Beyond, the answer is written at once (a new connection's send
/// buffer is empty, so it goes whole) and the connection closed: a client that had already sent
/// its request may then see the reset first.
fn refuse(stream: TcpStream, refusing: &Arc<Semaphore>, answer: Arc<[u8]>) {
    let Ok(permit) = refusing.clone().try_acquire_owned() else {
        if stream.try_write(&answer).is_ok() {
            // The peer's bytes, if any, are read first: fewer resets.
            let mut sink = [0u8; 4096];
            while matches!(stream.try_read(&mut sink), Ok(n) if n > 0) {}
        }
        return;
    };
    tokio::spawn(async move {
        let _permit = permit;
        let mut stream = stream;
        let _ = tokio::time::timeout(REFUSAL_LINGER, async {
            stream.write_all(&answer).await?;
            stream.shutdown().await?;
            let mut sink = [0u8; 4096];
            let mut drained = 0usize;
            while drained < 64 * 1024 {
                match stream.read(&mut sink).await? {
                    0 => break,
                    n => drained += n,
                }
            }
            Ok::<_, io::Error>(())
        })
        .await;
    });
}

/// Whether an accept error concerns only the connection being accepted (which is gone).
fn is_connection_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    )
}

/// A warning at most every [`WARN_EVERY`], with the count of the events since the last one.
struct Throttled {
    last: Option<Instant>,
    since_last: u64,
}

impl Throttled {
    fn new() -> Self {
        Self {
            last: None,
            since_last: 0,
        }
    }

    /// Counts an event; returns how many to report when a warning is due.
    fn due(&mut self) -> Option<u64> {
        self.since_last += 1;
        let now = Instant::now();
        if self.last.is_some_and(|last| now - last < WARN_EVERY) {
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.since_last))
    }
}

/// Serves `router` on `listener` until `shutdown` completes; then stops accepting, lets every
/// connection finish its request in flight (closing the idle ones at once) and returns when
/// all have closed.
pub(crate) async fn serve(
    listener: TcpListener,
    router: Router,
    config: HttpConfig,
    shutdown: impl Future<Output = ()> + Send,
) {
    let max_connections = effective_max_connections(config.max_connections);
    let limits = Arc::new(config);
    let open = Arc::new(Semaphore::new(max_connections));
    let refusing = Arc::new(Semaphore::new(MAX_REFUSING));
    let answer: Arc<[u8]> = refusal(max_connections).into();
    let (stop, stopped) = watch::channel(false);
    let mut shutdown = pin!(shutdown);
    let mut refusals = Throttled::new();
    let mut failures = Throttled::new();
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = shutdown.as_mut() => break,
        };
        match accepted {
            Ok((stream, _peer)) => match open.clone().try_acquire_owned() {
                Ok(permit) => {
                    let (router, limits, stopped) =
                        (router.clone(), limits.clone(), stopped.clone());
                    tokio::spawn(async move {
                        serve_connection(stream, router, limits, stopped).await;
                        drop(permit);
                    });
                }
                Err(_) => {
                    refuse(stream, &refusing, answer.clone());
                    if let Some(count) = refusals.due() {
                        tracing::warn!(
                            max_connections,
                            refused = count,
                            "HTTP connections over the cap answered 503"
                        );
                    }
                }
            },
            Err(e) if is_connection_error(&e) => {}
            Err(e) => {
                // Most often EMFILE/ENFILE: out of descriptors. The connection waits in the
                // backlog; the ones open go on being served, and some will close.
                if let Some(count) = failures.due() {
                    tracing::warn!(error = %e, failures = count, "accepting HTTP connections fails; retrying");
                }
                tokio::select! {
                    () = tokio::time::sleep(ACCEPT_BACKOFF) => {}
                    () = shutdown.as_mut() => break,
                }
            }
        }
    }
    drop(listener);
    stop.send_replace(true);
    // Every connection holds a permit until it has closed.
    let _ = open.acquire_many(max_connections as u32).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> HttpConfig {
        HttpConfig {
            header_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(30),
            write_timeout: Duration::from_secs(20),
            max_connections: 4,
        }
    }

    #[test]
    fn deadlines_follow_the_connection_state() {
        let l = limits();
        let t0 = Instant::now();
        let s = |n: u64| Duration::from_secs(n);
        let mut state = State::new(t0);
        // A fresh connection: its first head counts from the opening.
        assert_eq!(state.deadline(&l), Some((t0 + s(10), Expiry::Header)));
        // A request in flight: no deadline, unless its writing stalls.
        state.in_flight = 1;
        state.head_started = None;
        assert_eq!(state.deadline(&l), None);
        state.write_blocked_since = Some(t0 + s(3));
        assert_eq!(state.deadline(&l), Some((t0 + s(23), Expiry::Write)));
        // Answered: idle from its end.
        state.write_blocked_since = None;
        state.in_flight = 0;
        state.idle_since = t0 + s(4);
        assert_eq!(state.deadline(&l), Some((t0 + s(34), Expiry::Idle)));
        // The next head's first byte: the header clock, from that byte.
        state.head_started = Some(t0 + s(40));
        assert_eq!(state.deadline(&l), Some((t0 + s(50), Expiry::Header)));
    }

    #[test]
    fn only_the_first_byte_of_a_head_starts_its_clock_and_a_request_ends_it() {
        let activity = Activity::new(Instant::now());
        let first = activity.request_began();
        // Bytes while a request is in flight (its body) start no head.
        activity.read(10);
        assert_eq!(activity.lock().head_started, None);
        drop(first);
        assert_eq!(activity.lock().in_flight, 0);
        activity.read(0);
        assert_eq!(activity.lock().head_started, None, "EOF is no byte");
        activity.read(1);
        let started = activity.lock().head_started.expect("started");
        activity.read(1);
        assert_eq!(
            activity.lock().head_started,
            Some(started),
            "kept from the first byte"
        );
        let _second = activity.request_began();
        assert_eq!(activity.lock().head_started, None);
        assert_eq!(activity.lock().deadline(&limits()), None);
    }
}
