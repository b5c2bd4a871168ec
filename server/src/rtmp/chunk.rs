//! RTMP's chunk stream (RTMP specification 1.0, §5.3): messages cut into chunks of at most the
//! sender's chunk size, interleaved over chunk streams, each chunk led by a header that may
//! leave out what is unchanged since the chunk stream's last header.
//!
//! [`ChunkDecoder`] is sans-IO and bounded: it is fed whatever the socket read and copies each
//! chunk's payload into its message as it arrives, so it never holds more than one chunk header
//! of unparsed bytes beyond the caller's read. A message's declared length is checked against
//! [`ChunkLimits`] (per message type) when its header arrives, before anything is reserved;
//! the bytes of all unfinished messages together, and the number of chunk streams in use, are
//! bounded too; every inconsistency (a continuation without a header, a new header over an
//! unfinished message, a chunk size of 0) is an error, never a panic or an overflow.

use std::collections::HashMap;

/// Message type ids (§5.4, §7.1).
pub mod kind {
    /// Set Chunk Size: the sender's chunks from now on carry at most this many bytes.
    pub const SET_CHUNK_SIZE: u8 = 1;
    /// Abort: drop the unfinished message of a chunk stream.
    pub const ABORT: u8 = 2;
    /// Acknowledgement: bytes received so far.
    pub const ACKNOWLEDGEMENT: u8 = 3;
    /// User control events (stream begin, ping).
    pub const USER_CONTROL: u8 = 4;
    /// Window Acknowledgement Size: acknowledge after this many bytes.
    pub const WINDOW_ACK_SIZE: u8 = 5;
    /// Set Peer Bandwidth.
    pub const SET_PEER_BANDWIDTH: u8 = 6;
    /// Audio data (an FLV audio tag body).
    pub const AUDIO: u8 = 8;
    /// Video data (an FLV video tag body).
    pub const VIDEO: u8 = 9;
    /// AMF3 data.
    pub const DATA_AMF3: u8 = 15;
    /// AMF3 command.
    pub const COMMAND_AMF3: u8 = 17;
    /// AMF0 data (`@setDataFrame`, `onMetaData`).
    pub const DATA_AMF0: u8 = 18;
    /// AMF0 command (`connect`, `publish`, `_result`, `onStatus`).
    pub const COMMAND_AMF0: u8 = 20;
}

/// The chunk size every RTMP connection starts with, both ways.
pub const DEFAULT_CHUNK_SIZE: usize = 128;

/// One whole RTMP message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// The chunk stream it came on (or goes out on).
    pub chunk_stream: u32,
    /// Its type id ([`kind`]).
    pub kind: u8,
    /// The message stream id (0 for the connection's own messages).
    pub stream_id: u32,
    /// Its timestamp in milliseconds (wrapping at 2³²).
    pub timestamp: u32,
    /// Its body.
    pub payload: Vec<u8>,
}

/// What a [`ChunkDecoder`] takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkLimits {
    /// Largest audio or video message once media is allowed
    /// ([`ChunkDecoder::allow_media`]; before, media messages have the other types' limit). A
    /// 1080p H.264 keyframe from OBS at 6 Mb/s is about 0.5 MB; 8 MiB leaves room for far
    /// higher rates.
    pub max_media_message: usize,
    /// Largest message of any other type (commands, data, control). A `connect` is a few hundred
    /// bytes, `onMetaData` under a kilobyte.
    pub max_other_message: usize,
    /// Most bytes held by unfinished messages over all chunk streams.
    pub max_buffered: usize,
    /// Most chunk streams with state at once (OBS and ffmpeg use five or six).
    pub max_chunk_streams: usize,
    /// Largest chunk size the peer may set.
    pub max_chunk_size: usize,
}

impl Default for ChunkLimits {
    fn default() -> Self {
        Self {
            max_media_message: 8 << 20,
            max_other_message: 64 << 10,
            max_buffered: 16 << 20,
            max_chunk_streams: 16,
            max_chunk_size: 1 << 24,
        }
    }
}

/// Why a chunk stream cannot be read on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChunkError {
    /// A continuation chunk (or a delta header) on a chunk stream that has had no full header.
    #[error("chunk stream {0} continues a message it never started")]
    NoPreviousHeader(u32),
    /// A new message header on a chunk stream whose last message is unfinished.
    #[error(
        "chunk stream {chunk_stream} starts a new message {missing} bytes before the end of its last one"
    )]
    Interleaved {
        /// The chunk stream.
        chunk_stream: u32,
        /// Bytes the unfinished message still lacked.
        missing: usize,
    },
    /// A message longer than the limit for its type.
    #[error("a message of type {kind} declares {length} bytes; at most {limit} are taken")]
    MessageTooLong {
        /// The message type.
        kind: u8,
        /// Its declared length.
        length: usize,
        /// The limit for that type.
        limit: usize,
    },
    /// The unfinished messages together would hold more than the limit.
    #[error("unfinished messages would hold more than {0} bytes")]
    TooMuchBuffered(usize),
    /// More chunk streams than the limit.
    #[error("more than {0} chunk streams in use")]
    TooManyChunkStreams(usize),
    /// A Set Chunk Size outside 1 ..= the limit.
    #[error("chunk size {size} is outside 1..={limit}")]
    BadChunkSize {
        /// The size asked for.
        size: u64,
        /// The limit.
        limit: usize,
    },
    /// A protocol control message of the wrong length.
    #[error("a control message of type {kind} has {length} bytes, not {expected}")]
    BadControlMessage {
        /// The message type.
        kind: u8,
        /// Its length.
        length: usize,
        /// The length its type has.
        expected: usize,
    },
}

/// The last header seen on one chunk stream, and its unfinished message.
#[derive(Debug, Default)]
struct ChunkStream {
    timestamp: u32,
    delta: u32,
    length: usize,
    kind: u8,
    stream_id: u32,
    /// The last header's timestamp field was 0xFFFFFF: its continuation chunks carry the
    /// 4-byte extended timestamp too (§5.3.1.3; ffmpeg and librtmp write it).
    extended: bool,
    /// Whether a full (type 0) or delta (type 1, 2) header has been seen.
    started: bool,
    /// The unfinished message's bytes so far (`None` between messages).
    partial: Option<Vec<u8>>,
}

/// Where the decoder is in the byte stream.
#[derive(Debug, Clone, Copy)]
enum Reading {
    /// At a chunk header.
    Header,
    /// Inside the payload of a chunk of `chunk_stream`, `left` bytes to go.
    Payload { chunk_stream: u32, left: usize },
}

/// Reassembles messages from a peer's chunks (see the module docs).
#[derive(Debug)]
pub struct ChunkDecoder {
    limits: ChunkLimits,
    chunk_size: usize,
    streams: HashMap<u32, ChunkStream>,
    reading: Reading,
    /// Bytes of a chunk header that arrived without the rest of it (at most 18).
    header: Vec<u8>,
    buffered: usize,
    media_allowed: bool,
}

impl ChunkDecoder {
    /// A decoder at the start of a connection (chunk size 128).
    pub fn new(limits: ChunkLimits) -> Self {
        Self {
            limits,
            chunk_size: DEFAULT_CHUNK_SIZE,
            streams: HashMap::new(),
            reading: Reading::Header,
            header: Vec::new(),
            buffered: 0,
            media_allowed: false,
        }
    }

    /// Lets audio and video messages up to [`ChunkLimits::max_media_message`] through (a
    /// publisher once its publish is accepted): until then a connection that has shown no
    /// right to send media holds at most the small messages' limit per chunk stream.
    pub fn allow_media(&mut self) {
        self.media_allowed = true;
    }

    /// The peer's current chunk size.
    pub fn chunk_size(&self) -> usize {
        self.chunk_size
    }

    /// Feeds `data`; returns the messages it completed, in order. Set Chunk Size and Abort take
    /// effect here (and are returned too); after an error the decoder must not be fed again.
    pub fn push(&mut self, mut data: &[u8]) -> Result<Vec<Message>, ChunkError> {
        let mut done = Vec::new();
        while !data.is_empty() {
            match self.reading {
                Reading::Payload { chunk_stream, left } => {
                    let n = left.min(data.len());
                    let stream = self
                        .streams
                        .get_mut(&chunk_stream)
                        .expect("a chunk being read has its stream");
                    let partial = stream.partial.as_mut().expect("a chunk has its message");
                    partial.extend_from_slice(&data[..n]);
                    data = &data[n..];
                    if n < left {
                        self.reading = Reading::Payload {
                            chunk_stream,
                            left: left - n,
                        };
                        continue;
                    }
                    self.reading = Reading::Header;
                    if partial.len() == stream.length {
                        let payload = stream.partial.take().expect("checked above");
                        self.buffered -= payload.len();
                        let message = Message {
                            chunk_stream,
                            kind: stream.kind,
                            stream_id: stream.stream_id,
                            timestamp: stream.timestamp,
                            payload,
                        };
                        self.control(&message)?;
                        done.push(message);
                    }
                }
                Reading::Header => {
                    // Complete the header from the bytes kept and the new ones, a byte at a
                    // time until its length is known (at most 18 bytes are ever kept).
                    let have = self.header.len();
                    let take = (18 - have).min(data.len());
                    self.header.extend_from_slice(&data[..take]);
                    match self.header()? {
                        Some((used, empty)) => {
                            // `used` counts bytes of `self.header`; those past `have` came
                            // from `data`.
                            data = &data[used - have..];
                            self.header.clear();
                            done.extend(empty);
                        }
                        None => {
                            data = &data[take..];
                        }
                    }
                }
            }
        }
        Ok(done)
    }

    /// Parses the chunk header at the start of `self.header`; `None` when more bytes are
    /// needed. Returns the header's length and moves to its payload, or returns the message
    /// when it has no payload at all.
    fn header(&mut self) -> Result<Option<(usize, Option<Message>)>, ChunkError> {
        let h = &self.header;
        let Some(&first) = h.first() else {
            return Ok(None);
        };
        let format = first >> 6;
        let (chunk_stream, mut at) = match first & 0x3f {
            0 => match h.get(1) {
                Some(&b) => (64 + u32::from(b), 2),
                None => return Ok(None),
            },
            1 => match (h.get(1), h.get(2)) {
                (Some(&b1), Some(&b2)) => (64 + u32::from(b1) + 256 * u32::from(b2), 3),
                _ => return Ok(None),
            },
            id => (u32::from(id), 1),
        };
        let fields = [11, 7, 3, 0][format as usize];
        let previous_extended = self.streams.get(&chunk_stream).is_some_and(|s| s.extended);
        if h.len() < at + fields {
            return Ok(None);
        }
        let u24 = |b: &[u8]| u32::from_be_bytes([0, b[0], b[1], b[2]]);
        let field = &h[at..at + fields];
        let time_field = if format < 3 { u24(field) } else { 0 };
        let extended = if format < 3 {
            time_field == 0xFF_FFFF
        } else {
            previous_extended
        };
        at += fields;
        let extended_time = if extended {
            if h.len() < at + 4 {
                return Ok(None);
            }
            let t = u32::from_be_bytes([h[at], h[at + 1], h[at + 2], h[at + 3]]);
            at += 4;
            Some(t)
        } else {
            None
        };
        let field = field.to_vec();
        let empty = self.begin_chunk(chunk_stream, format, &field, time_field, extended_time)?;
        Ok(Some((at, empty)))
    }

    /// Applies a chunk header of `format` (its fields in `field`) to its chunk stream and moves
    /// to the chunk's payload; a message of no bytes is complete at its header and returned.
    fn begin_chunk(
        &mut self,
        chunk_stream: u32,
        format: u8,
        field: &[u8],
        time_field: u32,
        extended_time: Option<u32>,
    ) -> Result<Option<Message>, ChunkError> {
        if !self.streams.contains_key(&chunk_stream) {
            if format != 0 {
                return Err(ChunkError::NoPreviousHeader(chunk_stream));
            }
            if self.streams.len() >= self.limits.max_chunk_streams {
                return Err(ChunkError::TooManyChunkStreams(
                    self.limits.max_chunk_streams,
                ));
            }
            self.streams.insert(chunk_stream, ChunkStream::default());
        }
        let limits = self.limits;
        let stream = self.streams.get_mut(&chunk_stream).expect("inserted above");
        let time = extended_time.unwrap_or(time_field);
        if format == 3 {
            if !stream.started {
                return Err(ChunkError::NoPreviousHeader(chunk_stream));
            }
            if stream.partial.is_none() {
                // A new message with every field of the last one, its delta included.
                stream.timestamp = stream.timestamp.wrapping_add(stream.delta);
            }
        } else {
            if let Some(partial) = &stream.partial {
                return Err(ChunkError::Interleaved {
                    chunk_stream,
                    missing: stream.length - partial.len(),
                });
            }
            if format <= 1 {
                let length = u32::from_be_bytes([0, field[3], field[4], field[5]]) as usize;
                let kind = field[6];
                let limit = match kind {
                    kind::AUDIO | kind::VIDEO if self.media_allowed => limits.max_media_message,
                    _ => limits.max_other_message,
                };
                if length > limit {
                    return Err(ChunkError::MessageTooLong {
                        kind,
                        length,
                        limit,
                    });
                }
                stream.length = length;
                stream.kind = kind;
            }
            if format == 0 {
                stream.stream_id = u32::from_le_bytes([field[7], field[8], field[9], field[10]]);
                stream.timestamp = time;
                stream.delta = 0;
            } else {
                stream.delta = time;
                stream.timestamp = stream.timestamp.wrapping_add(time);
            }
            stream.started = true;
        }
        stream.extended = extended_time.is_some();
        let partial = match stream.partial.take() {
            Some(partial) => partial,
            None => {
                if self.buffered + stream.length > limits.max_buffered {
                    return Err(ChunkError::TooMuchBuffered(limits.max_buffered));
                }
                self.buffered += stream.length;
                // Reserve at most one chunk ahead: the declared length is the peer's word.
                Vec::with_capacity(stream.length.min(self.chunk_size))
            }
        };
        let left = (stream.length - partial.len()).min(self.chunk_size);
        if stream.length == 0 {
            let message = Message {
                chunk_stream,
                kind: stream.kind,
                stream_id: stream.stream_id,
                timestamp: stream.timestamp,
                payload: partial,
            };
            self.control(&message)?;
            return Ok(Some(message));
        }
        stream.partial = Some(partial);
        self.reading = Reading::Payload { chunk_stream, left };
        Ok(None)
    }

    /// Applies Set Chunk Size and Abort.
    fn control(&mut self, message: &Message) -> Result<(), ChunkError> {
        match message.kind {
            kind::SET_CHUNK_SIZE => {
                let size = u32::from_be_bytes(control_word(message)?) & 0x7fff_ffff;
                if size == 0 || size as usize > self.limits.max_chunk_size {
                    return Err(ChunkError::BadChunkSize {
                        size: u64::from(size),
                        limit: self.limits.max_chunk_size,
                    });
                }
                self.chunk_size = size as usize;
            }
            kind::ABORT => {
                let chunk_stream = u32::from_be_bytes(control_word(message)?);
                if let Some(stream) = self.streams.get_mut(&chunk_stream)
                    && let Some(partial) = stream.partial.take()
                {
                    self.buffered -= stream.length.min(self.buffered);
                    drop(partial);
                }
            }
            _ => {}
        }
        Ok(())
    }
}

/// The 4-byte body of Set Chunk Size, Abort, Acknowledgement and Window Acknowledgement Size.
pub(super) fn control_word(message: &Message) -> Result<[u8; 4], ChunkError> {
    message
        .payload
        .as_slice()
        .try_into()
        .map_err(|_| ChunkError::BadControlMessage {
            kind: message.kind,
            length: message.payload.len(),
            expected: 4,
        })
}

/// Cuts messages into chunks at the local chunk size.
#[derive(Debug)]
pub struct ChunkEncoder {
    chunk_size: usize,
}

impl Default for ChunkEncoder {
    fn default() -> Self {
        Self {
            chunk_size: DEFAULT_CHUNK_SIZE,
        }
    }
}

impl ChunkEncoder {
    /// Appends `message` to `out`: a full (type 0) header, then type 3 continuations. Every
    /// message carries its own full header, which costs a few bytes a message and keeps the
    /// encoder free of per-stream state.
    pub fn write(&self, out: &mut Vec<u8>, message: &Message) {
        let extended = message.timestamp >= 0xFF_FFFF;
        let time_field = if extended {
            0xFF_FFFF
        } else {
            message.timestamp
        };
        let mut chunks = message.payload.chunks(self.chunk_size);
        let first = chunks.next().unwrap_or(&[]);
        basic_header(out, 0, message.chunk_stream);
        out.extend_from_slice(&time_field.to_be_bytes()[1..]);
        out.extend_from_slice(&(message.payload.len() as u32).to_be_bytes()[1..]);
        out.push(message.kind);
        out.extend_from_slice(&message.stream_id.to_le_bytes());
        if extended {
            out.extend_from_slice(&message.timestamp.to_be_bytes());
        }
        out.extend_from_slice(first);
        for chunk in chunks {
            basic_header(out, 3, message.chunk_stream);
            if extended {
                out.extend_from_slice(&message.timestamp.to_be_bytes());
            }
            out.extend_from_slice(chunk);
        }
    }

    /// Appends a Set Chunk Size message (on chunk stream 2) and uses `size` from then on.
    pub fn set_chunk_size(&mut self, out: &mut Vec<u8>, size: usize) {
        let size = size.clamp(1, 0x7fff_ffff);
        self.write(
            out,
            &Message {
                chunk_stream: 2,
                kind: kind::SET_CHUNK_SIZE,
                stream_id: 0,
                timestamp: 0,
                payload: (size as u32).to_be_bytes().to_vec(),
            },
        );
        self.chunk_size = size;
    }
}

/// A chunk's basic header: the format in the top two bits, then the chunk stream id in one,
/// two or three bytes (ids 2–63, 64–319, 320–65,599).
fn basic_header(out: &mut Vec<u8>, format: u8, chunk_stream: u32) {
    let chunk_stream = chunk_stream.clamp(2, 65_599);
    match chunk_stream {
        2..=63 => out.push(format << 6 | chunk_stream as u8),
        64..=319 => {
            out.push(format << 6);
            out.push((chunk_stream - 64) as u8);
        }
        _ => {
            let rest = chunk_stream - 64;
            out.push(format << 6 | 1);
            out.push((rest & 0xff) as u8);
            out.push((rest >> 8) as u8);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(chunk_stream: u32, kind: u8, timestamp: u32, len: usize) -> Message {
        Message {
            chunk_stream,
            kind,
            stream_id: 1,
            timestamp,
            payload: (0..len)
                .map(|i| (i * 7 + chunk_stream as usize) as u8)
                .collect(),
        }
    }

    fn decode_all(decoder: &mut ChunkDecoder, bytes: &[u8], step: usize) -> Vec<Message> {
        let mut out = Vec::new();
        for piece in bytes.chunks(step) {
            out.extend(decoder.push(piece).unwrap());
        }
        out
    }

    #[test]
    fn messages_round_trip_at_any_read_size() {
        let messages = vec![
            message(3, kind::COMMAND_AMF0, 0, 300),
            message(6, kind::VIDEO, 40, 10_000),
            message(70, kind::VIDEO, 0x1234_5678, 129),
            message(400, kind::AUDIO, 0xFF_FFFF, 128),
            message(4, kind::DATA_AMF0, 5, 0),
            message(3, kind::COMMAND_AMF0, 6, 1),
        ];
        for chunk_size in [128usize, 4096, 1] {
            let mut encoder = ChunkEncoder::default();
            let mut bytes = Vec::new();
            if chunk_size != 128 {
                encoder.set_chunk_size(&mut bytes, chunk_size);
            }
            for m in &messages {
                encoder.write(&mut bytes, m);
            }
            for step in [1usize, 7, 128, 5000, bytes.len()] {
                let mut decoder = ChunkDecoder::new(ChunkLimits::default());
                decoder.allow_media();
                let got: Vec<Message> = decode_all(&mut decoder, &bytes, step)
                    .into_iter()
                    .filter(|m| m.kind != kind::SET_CHUNK_SIZE)
                    .collect();
                assert_eq!(got, messages, "chunk size {chunk_size}, reads of {step}");
                assert_eq!(decoder.chunk_size(), chunk_size);
            }
        }
    }

    #[test]
    fn delta_headers_and_interleaving_as_ffmpeg_writes_them() {
        // Two chunk streams interleaved, type 1, 2 and 3 headers with deltas, by hand.
        let mut bytes = vec![
            0x06,
            0,
            0,
            10,
            0,
            0,
            200,
            kind::VIDEO,
            1,
            0,
            0,
            0, // csid 6, type 0, t=10, 200 bytes
        ];
        bytes.extend(std::iter::repeat_n(1u8, 128));
        bytes.extend([0x04, 0, 0, 5, 0, 0, 2, kind::AUDIO, 1, 0, 0, 0, 9, 9]); // csid 4 audio
        bytes.push(0xc6); // csid 6, type 3: the rest of the video message
        bytes.extend(std::iter::repeat_n(2u8, 72));
        bytes.extend([0x86, 0, 0, 33]); // csid 6, type 2: same length and type, delta 33
        bytes.extend(std::iter::repeat_n(3u8, 128));
        bytes.push(0xc6);
        bytes.extend(std::iter::repeat_n(4u8, 72));
        bytes.push(0xc6); // type 3 starting a message: delta 33 again
        bytes.extend(std::iter::repeat_n(5u8, 128));
        bytes.push(0xc6);
        bytes.extend(std::iter::repeat_n(6u8, 72));
        bytes.extend([0x46, 0, 0, 1, 0, 0, 1, kind::VIDEO]); // type 1: delta 1, 1 byte
        bytes.push(7);
        let mut decoder = ChunkDecoder::new(ChunkLimits::default());
        let got = decode_all(&mut decoder, &bytes, 3);
        let summary: Vec<(u32, u8, u32, usize)> = got
            .iter()
            .map(|m| (m.chunk_stream, m.kind, m.timestamp, m.payload.len()))
            .collect();
        assert_eq!(
            summary,
            vec![
                (4, kind::AUDIO, 5, 2),
                (6, kind::VIDEO, 10, 200),
                (6, kind::VIDEO, 43, 200),
                (6, kind::VIDEO, 76, 200),
                (6, kind::VIDEO, 77, 1),
            ]
        );
        assert!(got[1].payload[..128].iter().all(|b| *b == 1));
        assert!(got[1].payload[128..].iter().all(|b| *b == 2));
    }

    #[test]
    fn hostile_chunk_streams_are_refused() {
        let limits = ChunkLimits::default();
        let refuse = |bytes: &[u8]| {
            let mut decoder = ChunkDecoder::new(limits);
            decoder.allow_media();
            let mut result = Ok(());
            for piece in bytes.chunks(5) {
                if let Err(e) = decoder.push(piece) {
                    result = Err(e);
                    break;
                }
            }
            result.unwrap_err()
        };
        // A continuation on a stream never started.
        assert_eq!(refuse(&[0xc3, 1, 2, 3]), ChunkError::NoPreviousHeader(3));
        assert_eq!(
            refuse(&[0x43, 0, 0, 0, 0, 0, 5, 20]),
            ChunkError::NoPreviousHeader(3)
        );
        // A 16 MB command.
        assert_eq!(
            refuse(&[
                0x03,
                0,
                0,
                0,
                0xff,
                0xff,
                0xff,
                kind::COMMAND_AMF0,
                0,
                0,
                0,
                0
            ]),
            ChunkError::MessageTooLong {
                kind: kind::COMMAND_AMF0,
                length: 0xff_ffff,
                limit: 64 << 10
            }
        );
        // An unfinished message followed by a new full header on the same chunk stream (the
        // "interleaved partial message" that overflowed the old crate's capacity).
        let mut bytes = vec![0x03, 0, 0, 0, 0, 1, 0, kind::COMMAND_AMF0, 0, 0, 0, 0];
        bytes.extend([0u8; 128]);
        bytes.extend([0x03, 0, 0, 0, 0, 0, 4, kind::COMMAND_AMF0, 0, 0, 0, 0]);
        assert_eq!(
            refuse(&bytes),
            ChunkError::Interleaved {
                chunk_stream: 3,
                missing: 128
            }
        );
        // Set Chunk Size 0, and one over the limit.
        for size in [0u32, (1 << 24) + 1] {
            let mut bytes = vec![0x02, 0, 0, 0, 0, 0, 4, kind::SET_CHUNK_SIZE, 0, 0, 0, 0];
            bytes.extend(size.to_be_bytes());
            assert!(matches!(refuse(&bytes), ChunkError::BadChunkSize { .. }));
        }
        // Two videos of 8 MiB each, unfinished, then a third: over the buffered bound.
        let mut bytes = Vec::new();
        for csid in [4u8, 5, 6] {
            bytes.extend([csid, 0, 0, 0, 0x80, 0, 0, kind::VIDEO, 0, 0, 0, 0]);
            bytes.extend([0u8; 128]);
        }
        assert_eq!(refuse(&bytes), ChunkError::TooMuchBuffered(16 << 20));
        // 17 chunk streams.
        let mut bytes = Vec::new();
        for csid in 0..17u8 {
            bytes.extend([0, csid, 0, 0, 0, 0, 0, 1, kind::AUDIO, 0, 0, 0, 0, 0]);
        }
        assert_eq!(refuse(&bytes), ChunkError::TooManyChunkStreams(16));
        // Before media is allowed, a 100 KB video message is refused at its header.
        let mut decoder = ChunkDecoder::new(limits);
        assert_eq!(
            decoder.push(&[0x06, 0, 0, 0, 0x01, 0x86, 0xa0, kind::VIDEO, 1, 0, 0, 0]),
            Err(ChunkError::MessageTooLong {
                kind: kind::VIDEO,
                length: 100_000,
                limit: 64 << 10
            })
        );
        // A control message of the wrong size.
        assert_eq!(
            refuse(&[
                0x02,
                0,
                0,
                0,
                0,
                0,
                2,
                kind::SET_CHUNK_SIZE,
                0,
                0,
                0,
                0,
                1,
                2
            ]),
            ChunkError::BadControlMessage {
                kind: kind::SET_CHUNK_SIZE,
                length: 2,
                expected: 4
            }
        );
    }

    #[test]
    fn abort_drops_the_unfinished_message() {
        let mut bytes = vec![0x06, 0, 0, 0, 0, 1, 0, kind::VIDEO, 1, 0, 0, 0];
        bytes.extend([9u8; 128]);
        bytes.extend([0x02, 0, 0, 0, 0, 0, 4, kind::ABORT, 0, 0, 0, 0, 0, 0, 0, 6]);
        bytes.extend([0x06, 0, 0, 0, 0, 0, 1, kind::VIDEO, 1, 0, 0, 0, 42]);
        let mut decoder = ChunkDecoder::new(ChunkLimits::default());
        let got = decode_all(&mut decoder, &bytes, 11);
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].kind, kind::ABORT);
        assert_eq!(got[1].payload, vec![42]);
        assert_eq!(decoder.buffered, 0);
    }
}
