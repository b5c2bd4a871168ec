//! RTMP's message layer for the two roles sdstream plays (RTMP specification 1.0 §7; the
//! command exchange as OBS, ffmpeg and nginx-rtmp carry it out): a server session that takes one
//! publisher ([`ServerSession`], for ingest) and a client session that publishes
//! ([`ClientSession`], for the push). Both are sans-IO: the caller feeds the bytes it read and
//! writes the bytes the session queued ([`take_output`](ServerSession::take_output)); sockets,
//! timeouts and what a stream key means are the caller's.
//!
//! Everything the peer sends is read under limits ([`chunk`](super::chunk) for the chunk stream,
//! [`amf0`](super::amf0) for command values), and a command that is malformed (no name, no
//! transaction id, a `connect` without an application) ends the session with an error instead
//! of a panic: the connection that sent it closes, nothing else notices.

use std::time::Instant;

use super::amf0::{self, Value};
use super::chunk::{self, ChunkDecoder, ChunkEncoder, ChunkLimits, Message, kind};

/// The chunk size sdstream sends with once connected (the peer is told first).
const OUTGOING_CHUNK_SIZE: usize = 4096;
/// The acknowledgement window and peer bandwidth sdstream announces.
const WINDOW: u32 = 2_500_000;
/// Chunk streams of what sdstream sends: protocol control, commands, video.
const CONTROL_CHUNK_STREAM: u32 = 2;
const COMMAND_CHUNK_STREAM: u32 = 3;
const VIDEO_CHUNK_STREAM: u32 = 6;
/// Most message streams one connection may create (a publisher needs one).
const MAX_STREAMS: usize = 8;
/// User control event types (§7.1.7).
const USER_STREAM_BEGIN: u16 = 0;
const USER_PING_REQUEST: u16 = 6;
const USER_PING_RESPONSE: u16 = 7;

/// Limits of one session's input.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SessionLimits {
    /// The chunk stream's.
    pub chunks: ChunkLimits,
    /// The command values'.
    pub amf0: amf0::Limits,
}

/// Why a session cannot go on.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SessionError {
    /// The chunk stream is broken or over a limit.
    #[error(transparent)]
    Chunk(#[from] chunk::ChunkError),
    /// A command or data message's values could not be read.
    #[error("command values: {0}")]
    Amf0(#[from] amf0::Amf0Error),
    /// A message that breaks the exchange (named).
    #[error("{0}")]
    Protocol(String),
}

fn protocol(message: impl Into<String>) -> SessionError {
    SessionError::Protocol(message.into())
}

/// A decoded AMF0 command: its name, transaction id, command object and arguments.
#[derive(Debug, Clone, PartialEq)]
pub struct Command {
    /// `connect`, `publish`, `_result`, …
    pub name: String,
    /// The transaction id answers refer to.
    pub transaction: f64,
    /// The command object (`null` for most commands).
    pub object: Value,
    /// What follows it.
    pub arguments: Vec<Value>,
    /// The message stream it came on.
    pub stream_id: u32,
}

impl Command {
    /// Reads a command message (AMF0, or AMF3's form of it, which is a format byte then AMF0).
    fn parse(message: &Message, limits: amf0::Limits) -> Result<Self, SessionError> {
        let body = match message.kind {
            kind::COMMAND_AMF3 => message.payload.get(1..).unwrap_or(&[]),
            _ => &message.payload[..],
        };
        let mut values = amf0::Decoder::new(body, limits).read_all()?.into_iter();
        let name = match values.next() {
            Some(Value::String(name)) => name,
            Some(_) => return Err(protocol("a command whose name is not a string")),
            None => return Err(protocol("an empty command message")),
        };
        let transaction = match values.next() {
            Some(Value::Number(t)) => t,
            _ => {
                return Err(protocol(format!(
                    "command {name:?} without a transaction id"
                )));
            }
        };
        let object = values.next().unwrap_or(Value::Null);
        Ok(Self {
            name,
            transaction,
            object,
            arguments: values.collect(),
            stream_id: message.stream_id,
        })
    }

    /// The argument `i` as a string.
    fn string_argument(&self, i: usize) -> Option<&str> {
        self.arguments.get(i).and_then(Value::as_str)
    }
}

/// A status object as onStatus, `_result` and `_error` carry it.
fn status(level: &str, code: &str, description: &str) -> Value {
    Value::object([
        ("level", Value::string(level)),
        ("code", Value::string(code)),
        ("description", Value::string(description)),
    ])
}

/// The half both roles share: the chunk stream both ways, acknowledgements, pings, the queue of
/// bytes to send.
#[derive(Debug)]
struct Link {
    decoder: ChunkDecoder,
    encoder: ChunkEncoder,
    limits: SessionLimits,
    out: Vec<u8>,
    /// Bytes received, and at the last acknowledgement sent.
    received: u64,
    acknowledged: u64,
    /// The peer's acknowledgement window, once it has said one.
    peer_window: Option<u32>,
    started: Instant,
}

impl Link {
    fn new(limits: SessionLimits) -> Self {
        Self {
            decoder: ChunkDecoder::new(limits.chunks),
            encoder: ChunkEncoder::default(),
            limits,
            out: Vec::new(),
            received: 0,
            acknowledged: 0,
            peer_window: None,
            started: Instant::now(),
        }
    }

    /// Milliseconds since the session began, wrapping as RTMP's timestamps do.
    fn now(&self) -> u32 {
        self.started.elapsed().as_millis() as u32
    }

    fn send(&mut self, chunk_stream: u32, kind: u8, stream_id: u32, payload: Vec<u8>) {
        let message = Message {
            chunk_stream,
            kind,
            stream_id,
            timestamp: self.now(),
            payload,
        };
        self.encoder.write(&mut self.out, &message);
    }

    fn send_control(&mut self, kind: u8, payload: Vec<u8>) {
        self.send(CONTROL_CHUNK_STREAM, kind, 0, payload);
    }

    fn send_command(&mut self, stream_id: u32, values: &[Value]) {
        self.send(
            COMMAND_CHUNK_STREAM,
            kind::COMMAND_AMF0,
            stream_id,
            amf0::encode(values),
        );
    }

    fn send_user_control(&mut self, event: u16, data: u32) {
        let mut payload = event.to_be_bytes().to_vec();
        payload.extend_from_slice(&data.to_be_bytes());
        self.send_control(kind::USER_CONTROL, payload);
    }

    /// Announces the window and bandwidth, then raises the chunk size.
    fn send_setup(&mut self, with_bandwidth: bool) {
        self.send_control(kind::WINDOW_ACK_SIZE, WINDOW.to_be_bytes().to_vec());
        if with_bandwidth {
            let mut payload = WINDOW.to_be_bytes().to_vec();
            payload.push(2); // dynamic
            self.send_control(kind::SET_PEER_BANDWIDTH, payload);
        }
        self.encoder
            .set_chunk_size(&mut self.out, OUTGOING_CHUNK_SIZE);
    }

    /// Decodes `data`; answers pings and acknowledges as the peer's window asks; returns the
    /// other messages.
    fn input(&mut self, data: &[u8]) -> Result<Vec<Message>, SessionError> {
        self.received += data.len() as u64;
        let messages = self.decoder.push(data)?;
        let mut rest = Vec::with_capacity(messages.len());
        for message in messages {
            match message.kind {
                kind::WINDOW_ACK_SIZE => {
                    let size = u32::from_be_bytes(chunk::control_word(&message)?);
                    self.peer_window = Some(size.max(1));
                }
                kind::USER_CONTROL => {
                    if message.payload.len() >= 6
                        && u16::from_be_bytes([message.payload[0], message.payload[1]])
                            == USER_PING_REQUEST
                    {
                        let stamp =
                            u32::from_be_bytes(message.payload[2..6].try_into().expect("4 bytes"));
                        self.send_user_control(USER_PING_RESPONSE, stamp);
                    }
                }
                kind::SET_CHUNK_SIZE
                | kind::ABORT
                | kind::ACKNOWLEDGEMENT
                | kind::SET_PEER_BANDWIDTH => {}
                _ => rest.push(message),
            }
        }
        if let Some(window) = self.peer_window
            && self.received - self.acknowledged >= u64::from(window)
        {
            self.acknowledged = self.received;
            // The sequence number is the count of bytes received so far, modulo 2³².
            let sequence = self.received as u32;
            self.send_control(kind::ACKNOWLEDGEMENT, sequence.to_be_bytes().to_vec());
        }
        Ok(rest)
    }
}

/// What a publisher asked for or sent.
#[derive(Debug, Clone, PartialEq)]
pub enum ServerEvent {
    /// `connect` to `app` (the trailing `/` removed): answer with
    /// [`accept_connect`](ServerSession::accept_connect) or
    /// [`reject`](ServerSession::reject).
    Connect {
        /// The command's transaction id.
        transaction: f64,
        /// The application.
        app: String,
    },
    /// `publish` under `key` on a created stream: answer with
    /// [`accept_publish`](ServerSession::accept_publish) or [`reject`](ServerSession::reject).
    Publish {
        /// The command's transaction id.
        transaction: f64,
        /// The message stream.
        stream_id: u32,
        /// The stream key (the publish name).
        key: String,
    },
    /// `play`: this server never plays; answer with [`reject`](ServerSession::reject).
    Play {
        /// The command's transaction id.
        transaction: f64,
        /// The message stream.
        stream_id: u32,
    },
    /// A video message on the publishing stream (an FLV video tag body).
    Video {
        /// Its timestamp in milliseconds.
        timestamp: u32,
        /// The tag body.
        data: Vec<u8>,
    },
    /// The publisher stopped (`FCUnpublish`, `closeStream` or `deleteStream` of its stream).
    PublishEnded,
}

/// The server side of one RTMP connection after its handshake (see the module docs).
#[derive(Debug)]
pub struct ServerSession {
    link: Link,
    app: Option<String>,
    streams: Vec<u32>,
    publishing: Option<u32>,
}

impl ServerSession {
    /// A session at the start of a connection.
    pub fn new(limits: SessionLimits) -> Self {
        Self {
            link: Link::new(limits),
            app: None,
            streams: Vec::new(),
            publishing: None,
        }
    }

    /// The bytes to write to the peer, taken.
    pub fn take_output(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.link.out)
    }

    /// Feeds bytes read from the peer; returns what it asked for or sent.
    pub fn input(&mut self, data: &[u8]) -> Result<Vec<ServerEvent>, SessionError> {
        let mut events = Vec::new();
        for message in self.link.input(data)? {
            match message.kind {
                kind::COMMAND_AMF0 | kind::COMMAND_AMF3 => {
                    let command = Command::parse(&message, self.link.limits.amf0)?;
                    events.extend(self.command(command)?);
                }
                kind::VIDEO if Some(message.stream_id) == self.publishing => {
                    events.push(ServerEvent::Video {
                        timestamp: message.timestamp,
                        data: message.payload,
                    });
                }
                // Audio, metadata (`@setDataFrame`) and anything else: not used.
                _ => {}
            }
        }
        Ok(events)
    }

    fn command(&mut self, command: Command) -> Result<Option<ServerEvent>, SessionError> {
        let connected = self.app.is_some();
        let event = match command.name.as_str() {
            "connect" => {
                if connected {
                    return Err(protocol("a second connect on one connection"));
                }
                let app = command
                    .object
                    .property("app")
                    .and_then(Value::as_str)
                    .ok_or_else(|| protocol("connect without an application name"))?
                    .trim_end_matches('/')
                    .to_owned();
                // Connected from here on: commands a client sends before the answer (in the
                // same read) are taken in order, and a refused connect closes the connection.
                self.app = Some(app.clone());
                Some(ServerEvent::Connect {
                    transaction: command.transaction,
                    app,
                })
            }
            _ if !connected => {
                return Err(protocol(format!(
                    "command {:?} before connect",
                    command.name
                )));
            }
            "createStream" => {
                if self.streams.len() >= MAX_STREAMS {
                    return Err(protocol(format!(
                        "more than {MAX_STREAMS} streams on one connection"
                    )));
                }
                let id = self.streams.last().map_or(1, |last| last + 1);
                self.streams.push(id);
                self.link.send_command(
                    0,
                    &[
                        Value::string("_result"),
                        Value::Number(command.transaction),
                        Value::Null,
                        Value::Number(f64::from(id)),
                    ],
                );
                None
            }
            "publish" => {
                if !self.streams.contains(&command.stream_id) {
                    return Err(protocol(format!(
                        "publish on stream {}, which was never created",
                        command.stream_id
                    )));
                }
                let key = command
                    .string_argument(0)
                    .ok_or_else(|| protocol("publish without a stream key"))?;
                // Video on this stream is reported from here on, so that pictures sent right
                // behind the publish reach the caller after it has decided on the publish.
                self.publishing = Some(command.stream_id);
                Some(ServerEvent::Publish {
                    transaction: command.transaction,
                    stream_id: command.stream_id,
                    key: key.to_owned(),
                })
            }
            "play" => Some(ServerEvent::Play {
                transaction: command.transaction,
                stream_id: command.stream_id,
            }),
            "FCUnpublish" => self.publishing.take().map(|_| ServerEvent::PublishEnded),
            "closeStream" => self.end_stream(command.stream_id),
            "deleteStream" => {
                let id = command
                    .arguments
                    .first()
                    .and_then(Value::as_number)
                    .map_or(command.stream_id, |n| n as u32);
                self.streams.retain(|s| *s != id);
                self.end_stream(id)
            }
            // releaseStream, FCPublish, _checkbw, getStreamLength and the rest need no answer
            // from a server that publishes nothing back.
            _ => None,
        };
        Ok(event)
    }

    fn end_stream(&mut self, stream_id: u32) -> Option<ServerEvent> {
        (self.publishing == Some(stream_id)).then(|| {
            self.publishing = None;
            ServerEvent::PublishEnded
        })
    }

    /// Accepts the connection asked for: the window, the bandwidth, the chunk size, then
    /// `_result` with `NetConnection.Connect.Success`. (A connection whose `connect` is
    /// refused is to be closed: the session takes the commands behind it as connected.)
    pub fn accept_connect(&mut self, transaction: f64) {
        self.link.send_setup(true);
        self.link.send_command(
            0,
            &[
                Value::string("_result"),
                Value::Number(transaction),
                Value::object([
                    ("fmsVer", Value::string("FMS/3,0,1,123")),
                    ("capabilities", Value::Number(31.0)),
                ]),
                {
                    let mut info = status(
                        "status",
                        "NetConnection.Connect.Success",
                        "Connection succeeded.",
                    );
                    if let Value::Object(p) = &mut info {
                        p.push(("objectEncoding".into(), Value::Number(0.0)));
                    }
                    info
                },
            ],
        );
    }

    /// Accepts a publish on `stream_id`: stream begin, then `onStatus` with
    /// `NetStream.Publish.Start`.
    pub fn accept_publish(&mut self, stream_id: u32, key: &str) {
        self.link.decoder.allow_media();
        self.link.send_user_control(USER_STREAM_BEGIN, stream_id);
        self.link.send_command(
            stream_id,
            &[
                Value::string("onStatus"),
                Value::Number(0.0),
                Value::Null,
                status(
                    "status",
                    "NetStream.Publish.Start",
                    &format!("{key} is now published."),
                ),
            ],
        );
    }

    /// Refuses request `transaction` with `_error` carrying `code` and `description` (ffmpeg and
    /// OBS show the description as the server's reason).
    pub fn reject(&mut self, transaction: f64, stream_id: u32, code: &str, description: &str) {
        if self.publishing == Some(stream_id) {
            self.publishing = None;
        }
        self.link.send_command(
            stream_id,
            &[
                Value::string("_error"),
                Value::Number(transaction),
                Value::Null,
                status("error", code, description),
            ],
        );
    }
}

/// What a server answered a [`ClientSession`].
#[derive(Debug, Clone, PartialEq)]
pub enum ClientEvent {
    /// `connect` succeeded (`createStream` has been queued).
    Connected,
    /// `NetStream.Publish.Start`: video may be sent.
    Publishing,
    /// The server refused `connect` or `publish`, or sent an error status: its code and
    /// description.
    Refused(String),
}

/// Where a client session is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ClientState {
    Connecting,
    CreatingStream,
    PublishAsked(u32),
    Publishing(u32),
}

const CONNECT_TRANSACTION: f64 = 1.0;
const CREATE_STREAM_TRANSACTION: f64 = 2.0;
const PUBLISH_TRANSACTION: f64 = 3.0;

/// The client side of an RTMP connection that publishes one stream (see the module docs).
#[derive(Debug)]
pub struct ClientSession {
    link: Link,
    key: String,
    state: ClientState,
}

impl ClientSession {
    /// A session that connects to `app` (`tc_url` being the URL without the key) and will
    /// publish under `key`; the `connect` command is queued.
    pub fn new(limits: SessionLimits, app: &str, tc_url: &str, key: &str) -> Self {
        let mut link = Link::new(limits);
        link.send_command(
            0,
            &[
                Value::string("connect"),
                Value::Number(CONNECT_TRANSACTION),
                Value::object([
                    ("app", Value::string(app)),
                    ("type", Value::string("nonprivate")),
                    ("flashVer", Value::string("FMLE/3.0 (compatible; sdstream)")),
                    ("tcUrl", Value::string(tc_url)),
                ]),
            ],
        );
        Self {
            link,
            key: key.to_owned(),
            state: ClientState::Connecting,
        }
    }

    /// The bytes to write to the server, taken.
    pub fn take_output(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.link.out)
    }

    /// Whether video may be sent.
    pub fn is_publishing(&self) -> bool {
        matches!(self.state, ClientState::Publishing(_))
    }

    /// Feeds bytes read from the server; returns what it answered.
    pub fn input(&mut self, data: &[u8]) -> Result<Vec<ClientEvent>, SessionError> {
        let mut events = Vec::new();
        for message in self.link.input(data)? {
            if !matches!(message.kind, kind::COMMAND_AMF0 | kind::COMMAND_AMF3) {
                continue;
            }
            let command = Command::parse(&message, self.link.limits.amf0)?;
            events.extend(self.command(command)?);
        }
        Ok(events)
    }

    fn command(&mut self, command: Command) -> Result<Option<ClientEvent>, SessionError> {
        let refusal = |command: &Command| {
            let info = command.arguments.first().unwrap_or(&command.object);
            let field = |name| info.property(name).and_then(Value::as_str).unwrap_or("");
            let (code, description) = (field("code"), field("description"));
            ClientEvent::Refused(match (code.is_empty(), description.is_empty()) {
                (false, false) => format!("{code}: {description}"),
                (false, true) => code.to_owned(),
                (true, false) => description.to_owned(),
                (true, true) => format!("{} without a reason", command.name),
            })
        };
        let event = match (command.name.as_str(), self.state) {
            ("_result", ClientState::Connecting) if command.transaction == CONNECT_TRANSACTION => {
                self.link.send_setup(false);
                self.link.send_command(
                    0,
                    &[
                        Value::string("createStream"),
                        Value::Number(CREATE_STREAM_TRANSACTION),
                        Value::Null,
                    ],
                );
                self.state = ClientState::CreatingStream;
                Some(ClientEvent::Connected)
            }
            ("_result", ClientState::CreatingStream)
                if command.transaction == CREATE_STREAM_TRANSACTION =>
            {
                let id = command
                    .arguments
                    .first()
                    .and_then(Value::as_number)
                    .filter(|n| *n >= 0.0 && *n <= f64::from(u32::MAX))
                    .ok_or_else(|| protocol("createStream's answer has no stream id"))?
                    as u32;
                self.link.send_command(
                    id,
                    &[
                        Value::string("publish"),
                        Value::Number(PUBLISH_TRANSACTION),
                        Value::Null,
                        Value::string(self.key.clone()),
                        Value::string("live"),
                    ],
                );
                self.state = ClientState::PublishAsked(id);
                None
            }
            ("_error", _) => Some(refusal(&command)),
            ("onStatus", state) => {
                let info = command.arguments.first().unwrap_or(&command.object);
                let code = info.property("code").and_then(Value::as_str).unwrap_or("");
                let level = info.property("level").and_then(Value::as_str).unwrap_or("");
                match state {
                    ClientState::PublishAsked(id) if code == "NetStream.Publish.Start" => {
                        self.state = ClientState::Publishing(id);
                        Some(ClientEvent::Publishing)
                    }
                    _ if level == "error"
                        || ["BadName", "Failed", "Rejected", "Error"]
                            .iter()
                            .any(|bad| code.contains(bad)) =>
                    {
                        Some(refusal(&command))
                    }
                    _ => None,
                }
            }
            // onBWDone, onFCPublish, answers to nothing asked: nothing to do.
            _ => None,
        };
        Ok(event)
    }

    /// Queues one FLV video tag body at `timestamp` ms. Fails unless publishing.
    pub fn send_video(&mut self, tag: Vec<u8>, timestamp: u32) -> Result<(), SessionError> {
        let ClientState::Publishing(stream_id) = self.state else {
            return Err(protocol("video before the server accepted the publish"));
        };
        let message = Message {
            chunk_stream: VIDEO_CHUNK_STREAM,
            kind: kind::VIDEO,
            stream_id,
            timestamp,
            payload: tag,
        };
        self.link.encoder.write(&mut self.link.out, &message);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The two sessions talk to each other: connect, create a stream, publish, video, end.
    #[test]
    fn a_client_publishes_to_a_server() {
        let limits = SessionLimits::default();
        let mut client = ClientSession::new(limits, "live", "rtmp://h:1935/live", "key-1");
        let mut server = ServerSession::new(limits);
        let mut server_events = Vec::new();
        let mut client_events = Vec::new();
        for _ in 0..6 {
            for event in server.input(&client.take_output()).unwrap() {
                match &event {
                    ServerEvent::Connect { transaction, .. } => server.accept_connect(*transaction),
                    ServerEvent::Publish { stream_id, key, .. } => {
                        server.accept_publish(*stream_id, key)
                    }
                    _ => {}
                }
                server_events.push(event);
            }
            client_events.extend(client.input(&server.take_output()).unwrap());
            if client.is_publishing() {
                break;
            }
        }
        assert_eq!(
            client_events,
            vec![ClientEvent::Connected, ClientEvent::Publishing]
        );
        assert_eq!(
            server_events,
            vec![
                ServerEvent::Connect {
                    transaction: 1.0,
                    app: "live".into()
                },
                ServerEvent::Publish {
                    transaction: 3.0,
                    stream_id: 1,
                    key: "key-1".into()
                },
            ]
        );
        let tag: Vec<u8> = (0..10_000).map(|i| i as u8).collect();
        client.send_video(tag.clone(), 1234).unwrap();
        let events = server.input(&client.take_output()).unwrap();
        assert_eq!(
            events,
            vec![ServerEvent::Video {
                timestamp: 1234,
                data: tag
            }]
        );
    }

    #[test]
    fn refusals_reach_the_client_with_their_reason() {
        let limits = SessionLimits::default();
        let mut client = ClientSession::new(limits, "live", "rtmp://h/live", "k");
        let mut server = ServerSession::new(limits);
        let events = server.input(&client.take_output()).unwrap();
        let ServerEvent::Connect { transaction, .. } = events[0] else {
            panic!("{events:?}")
        };
        server.reject(
            transaction,
            0,
            "NetConnection.Connect.Rejected",
            "unknown application",
        );
        assert_eq!(
            client.input(&server.take_output()).unwrap(),
            vec![ClientEvent::Refused(
                "NetConnection.Connect.Rejected: unknown application".into()
            )]
        );
    }

    fn command_message(values: &[Value], stream_id: u32) -> Vec<u8> {
        let mut out = Vec::new();
        ChunkEncoder::default().write(
            &mut out,
            &Message {
                chunk_stream: 3,
                kind: kind::COMMAND_AMF0,
                stream_id,
                timestamp: 0,
                payload: amf0::encode(values),
            },
        );
        out
    }

    #[test]
    fn malformed_commands_end_the_session_with_a_reason() {
        let limits = SessionLimits::default();
        let connect = command_message(
            &[
                Value::string("connect"),
                Value::Number(1.0),
                Value::object([("app", Value::string("live"))]),
            ],
            0,
        );
        for (bytes, says) in [
            // The empty command body that panicked the old crate ("range end index 3").
            (command_message(&[], 0), "an empty command message"),
            (
                command_message(&[Value::Number(1.0)], 0),
                "name is not a string",
            ),
            (
                command_message(&[Value::string("connect")], 0),
                "without a transaction id",
            ),
            (
                command_message(&[Value::string("connect"), Value::Number(1.0)], 0),
                "without an application",
            ),
            (
                command_message(
                    &[
                        Value::string("publish"),
                        Value::Number(2.0),
                        Value::Null,
                        Value::string("k"),
                    ],
                    1,
                ),
                "before connect",
            ),
            (
                [
                    connect.clone(),
                    command_message(
                        &[
                            Value::string("publish"),
                            Value::Number(2.0),
                            Value::Null,
                            Value::string("k"),
                        ],
                        1,
                    ),
                ]
                .concat(),
                "never created",
            ),
            (
                [connect.clone(), connect.clone()].concat(),
                "second connect",
            ),
        ] {
            let mut server = ServerSession::new(limits);
            let mut failure = None;
            // The first connect is accepted as the ingest would, so later commands are judged
            // in the connected state.
            match server.input(&bytes) {
                Ok(events) => {
                    for e in events {
                        if let ServerEvent::Connect { transaction, .. } = e {
                            server.accept_connect(transaction);
                        }
                    }
                }
                Err(e) => failure = Some(e.to_string()),
            }
            let failure = failure.unwrap_or_else(|| panic!("{says}: accepted"));
            assert!(failure.contains(says), "{says}: {failure}");
        }
        // Nine createStreams: the ninth is refused.
        let mut server = ServerSession::new(limits);
        for e in server.input(&connect).unwrap() {
            if let ServerEvent::Connect { transaction, .. } = e {
                server.accept_connect(transaction);
            }
        }
        let create = command_message(
            &[
                Value::string("createStream"),
                Value::Number(2.0),
                Value::Null,
            ],
            0,
        );
        for _ in 0..MAX_STREAMS {
            server.input(&create).unwrap();
        }
        assert!(
            server
                .input(&create)
                .unwrap_err()
                .to_string()
                .contains("more than 8 streams")
        );
    }

    #[test]
    fn the_server_acknowledges_at_the_peer_window_and_answers_pings() {
        let mut server = ServerSession::new(SessionLimits::default());
        let mut bytes = Vec::new();
        let encoder = ChunkEncoder::default();
        encoder.write(
            &mut bytes,
            &Message {
                chunk_stream: 2,
                kind: kind::WINDOW_ACK_SIZE,
                stream_id: 0,
                timestamp: 0,
                payload: 1000u32.to_be_bytes().to_vec(),
            },
        );
        encoder.write(
            &mut bytes,
            &Message {
                chunk_stream: 2,
                kind: kind::USER_CONTROL,
                stream_id: 0,
                timestamp: 0,
                payload: vec![0, 6, 0, 0, 0, 42],
            },
        );
        encoder.write(
            &mut bytes,
            &Message {
                chunk_stream: 4,
                kind: kind::AUDIO,
                stream_id: 1,
                timestamp: 0,
                payload: vec![0; 1000],
            },
        );
        server.input(&bytes).unwrap();
        let mut decoder = ChunkDecoder::new(ChunkLimits::default());
        let answers = decoder.push(&server.take_output()).unwrap();
        let kinds: Vec<u8> = answers.iter().map(|m| m.kind).collect();
        assert_eq!(kinds, vec![kind::USER_CONTROL, kind::ACKNOWLEDGEMENT]);
        assert_eq!(answers[0].payload, vec![0, 7, 0, 0, 0, 42]);
        assert_eq!(
            u32::from_be_bytes(answers[1].payload[..].try_into().unwrap()) as usize,
            bytes.len()
        );
    }
}
