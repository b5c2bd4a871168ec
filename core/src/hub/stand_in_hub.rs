//! A stand-in for the Hugging Face hub on localhost, for the download's tests
//! (`download_tests.rs`) and the integration tests that download published layouts
//! (`core/tests/integration/hub_download.rs`): a plain HTTP/1.1 server that logs what it is
//! sent and answers as its handler says, including in ways a hub should not (bodies cut or
//! trickled, lengths left out).

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// One request as the stand-in saw it.
#[derive(Debug, Clone)]
pub struct Seen {
    /// The request's target (path and query).
    pub path: String,
    pub range: Option<String>,
    pub authorization: Option<String>,
}

/// An answer: `send` bytes of `body` are sent (all when `None`) after headers that announce
/// the whole body, then the connection closes; `trickle` sends them one at a time.
#[derive(Clone, Default)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    pub send: Option<usize>,
    pub trickle: Option<Duration>,
    /// No Content-Length header (a body that ends when the connection does).
    pub no_length: bool,
}

impl Reply {
    pub fn ok(body: impl Into<Vec<u8>>) -> Self {
        Self {
            status: 200,
            body: body.into(),
            ..Self::default()
        }
    }
}

type Handler = dyn Fn(&Seen) -> Reply + Send + Sync;

/// The server: its address, and every request it was sent.
pub struct StandIn {
    pub endpoint: String,
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl StandIn {
    /// Serves with `handler` until the test binary ends.
    pub fn start(handler: impl Fn(&Seen) -> Reply + Send + Sync + 'static) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let endpoint = format!("http://{}", listener.local_addr().expect("address"));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let handler: Arc<Handler> = Arc::new(handler);
        let log = seen.clone();
        // Serves until the test binary ends.
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let (handler, log) = (handler.clone(), log.clone());
                std::thread::spawn(move || serve(stream, &*handler, &log));
            }
        });
        Self { endpoint, seen }
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().expect("log").clone()
    }

    /// Requests for files (not the listing).
    pub fn file_requests(&self) -> Vec<Seen> {
        self.seen()
            .into_iter()
            .filter(|s| !s.path.starts_with("/api/"))
            .collect()
    }
}

fn serve(stream: TcpStream, handler: &Handler, log: &Mutex<Vec<Seen>>) {
    let mut reader = BufReader::new(stream.try_clone().expect("clone"));
    let mut first = String::new();
    if reader.read_line(&mut first).is_err() {
        return;
    }
    let path = first.split_whitespace().nth(1).unwrap_or("").to_string();
    let mut headers = HashMap::new();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 || line.trim().is_empty() {
            break;
        }
        if let Some((k, v)) = line.split_once(':') {
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
        }
    }
    let seen = Seen {
        path,
        range: headers.get("range").cloned(),
        authorization: headers.get("authorization").cloned(),
    };
    log.lock().expect("log").push(seen.clone());
    let reply = handler(&seen);
    let mut out = stream;
    let mut head = format!(
        "HTTP/1.1 {} Stand-in\r\nConnection: close\r\n",
        reply.status
    );
    if !reply.no_length {
        head.push_str(&format!("Content-Length: {}\r\n", reply.body.len()));
    }
    for (k, v) in &reply.headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    if out.write_all(head.as_bytes()).is_err() {
        return;
    }
    let body = &reply.body[..reply.send.unwrap_or(reply.body.len()).min(reply.body.len())];
    match reply.trickle {
        Some(every) => {
            for byte in body {
                if out.write_all(std::slice::from_ref(byte)).is_err() {
                    return;
                }
                std::thread::sleep(every);
            }
        }
        None => {
            let _ = out.write_all(body);
        }
    }
    let _ = out.flush();
    let _ = out.shutdown(std::net::Shutdown::Both);
}
