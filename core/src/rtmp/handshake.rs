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
    let guarded = |what: &str, f: &mut dyn FnMut() -> Result<HandshakeProcessResult, String>| {
        catch_unwind(AssertUnwindSafe(f))
            .unwrap_or_else(|_| Err(format!("the handshake could not be read ({what})")))
    };
    let mut handshake = Handshake::new(match role {
        HandshakeRole::Server => PeerType::Server,
        HandshakeRole::Client => PeerType::Client,
    });
    if role == HandshakeRole::Client {
        let first = catch_unwind(AssertUnwindSafe(|| handshake.generate_outbound_p0_and_p1()))
            .map_err(|_| "the handshake could not be started".to_owned())?
            .map_err(|e| format!("handshake: {e:?}"))?;
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
        let step = guarded("process", &mut || {
            handshake
                .process_bytes(received)
                .map_err(|e| format!("not an RTMP handshake ({e:?})"))
        })?;
        match step {
            HandshakeProcessResult::InProgress { response_bytes } => {
                socket
                    .write_all(&response_bytes)
                    .await
                    .map_err(|e| format!("write: {e}"))?;
            }
            HandshakeProcessResult::Completed {
                response_bytes,
                remaining_bytes,
            } => {
                socket
                    .write_all(&response_bytes)
                    .await
                    .map_err(|e| format!("write: {e}"))?;
                return Ok(remaining_bytes);
            }
        }
    }
}
