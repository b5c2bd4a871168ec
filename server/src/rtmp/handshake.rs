//! The RTMP handshake over a socket, both roles: rml_rtmp's implementation (the plain exchange
//! and Flash's digest form, which some publishers and servers expect), kept because it reads
//! three fixed-size packets and nothing else. Its input is bounded by the caller's buffer and
//! timeout; a panic inside it (none is known; the fuzz run of tests/rtmp_fuzz.rs mutates
//! handshakes) is caught and ends the handshake as a failure.

use std::panic::{AssertUnwindSafe, catch_unwind};

use rml_rtmp::handshake::{Handshake, HandshakeProcessResult, PeerType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Which side of the handshake this end is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum HandshakeRole {
    /// The ingest's side.
    Server,
    /// The push's side (it speaks first).
    Client,
}

/// Runs the handshake on `socket`, reading into `buffer`; returns the bytes the peer sent
/// after it (the start of its chunk stream). Errors are messages for the log and the status.
pub(crate) async fn handshake(
    socket: &mut TcpStream,
    role: HandshakeRole,
    buffer: &mut [u8],
) -> Result<Vec<u8>, String> {
    let mut handshake = Handshake::new(match role {
        HandshakeRole::Server => PeerType::Server,
        HandshakeRole::Client => PeerType::Client,
    });
    if role == HandshakeRole::Client {
        let first = guarded(|| handshake.generate_outbound_p0_and_p1())
            .map_err(|e| format!("the handshake could not be started ({e})"))?;
        socket
            .write_all(&first)
            .await
            .map_err(|e| format!("write: {e}"))?;
    }
    loop {
        let n = socket
            .read(buffer)
            .await
            .map_err(|e| format!("read: {e}"))?;
        if n == 0 {
            return Err("the peer closed the connection during the handshake".into());
        }
        let received = &buffer[..n];
        let step = guarded(|| handshake.process_bytes(received))
            .map_err(|e| format!("not an RTMP handshake ({e})"))?;
        let (response, rest) = match step {
            HandshakeProcessResult::InProgress { response_bytes } => (response_bytes, None),
            HandshakeProcessResult::Completed {
                response_bytes,
                remaining_bytes,
            } => (response_bytes, Some(remaining_bytes)),
        };
        socket
            .write_all(&response)
            .await
            .map_err(|e| format!("write: {e}"))?;
        if let Some(rest) = rest {
            return Ok(rest);
        }
    }
}

/// Runs one call into rml_rtmp's handshake, a panic in it being an error like its own.
fn guarded<T, E: std::fmt::Debug>(f: impl FnOnce() -> Result<T, E>) -> Result<T, String> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(result) => result.map_err(|e| format!("{e:?}")),
        Err(_) => Err("it could not be read".into()),
    }
}
