//! AMF0, the value encoding of RTMP's commands (`connect`, `createStream`, `publish`, their
//! answers) and data messages (`@setDataFrame`), read under limits fixed before any byte is
//! decoded.
//!
//! Objects and arrays nest, and a decoder that follows the nesting with recursion lets a peer
//! choose the depth of its stack: a 50 KB `connect` nesting strict arrays 10,000 deep overflowed
//! a worker thread's stack in the protocol crate this module replaces, which aborts the whole
//! process (a stack overflow cannot be caught). Here every nested value is one level deeper than
//! its container and a value deeper than [`Limits::max_depth`] is refused before it is read, so
//! the recursion is at most that deep whatever the input; the count of values is bounded too, and
//! every length is checked against the bytes that remain before anything is allocated for it.
//! Real clients nest three levels at most (a command's object holding an object).

use std::fmt;

/// AMF0 type markers (AMF0 specification, §2.1).
mod marker {
    pub const NUMBER: u8 = 0x00;
    pub const BOOLEAN: u8 = 0x01;
    pub const STRING: u8 = 0x02;
    pub const OBJECT: u8 = 0x03;
    pub const NULL: u8 = 0x05;
    pub const UNDEFINED: u8 = 0x06;
    pub const ECMA_ARRAY: u8 = 0x08;
    pub const OBJECT_END: u8 = 0x09;
    pub const STRICT_ARRAY: u8 = 0x0a;
    pub const DATE: u8 = 0x0b;
    pub const LONG_STRING: u8 = 0x0c;
    pub const UNSUPPORTED: u8 = 0x0d;
    pub const XML_DOCUMENT: u8 = 0x0f;
    pub const TYPED_OBJECT: u8 = 0x10;
}

/// One AMF0 value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// A double.
    Number(f64),
    /// A boolean.
    Boolean(bool),
    /// A string (AMF0's short and long strings alike).
    String(String),
    /// An anonymous object: its properties in the order they came.
    Object(Vec<(String, Value)>),
    /// `null`.
    Null,
    /// `undefined` (and the `unsupported` marker, which means the same to a reader).
    Undefined,
    /// An associative array (`onMetaData`'s usual form).
    EcmaArray(Vec<(String, Value)>),
    /// A dense array.
    StrictArray(Vec<Value>),
    /// Milliseconds since the Unix epoch (the time zone field is reserved and ignored).
    Date(f64),
    /// An XML document, as its text.
    Xml(String),
    /// An object with a class name.
    TypedObject(String, Vec<(String, Value)>),
}

impl Value {
    /// The property `name` of an object-like value (object, ECMA array, typed object).
    pub fn property(&self, name: &str) -> Option<&Value> {
        match self {
            Value::Object(p) | Value::EcmaArray(p) | Value::TypedObject(_, p) => {
                p.iter().find(|(k, _)| k == name).map(|(_, v)| v)
            }
            _ => None,
        }
    }

    /// The string, if this is one.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }

    /// The number, if this is one.
    pub fn as_number(&self) -> Option<f64> {
        match self {
            Value::Number(n) => Some(*n),
            _ => None,
        }
    }

    /// An object from `(name, value)` pairs.
    pub fn object<'a>(pairs: impl IntoIterator<Item = (&'a str, Value)>) -> Self {
        Value::Object(pairs.into_iter().map(|(k, v)| (k.to_owned(), v)).collect())
    }

    /// A string value.
    pub fn string(s: impl Into<String>) -> Self {
        Value::String(s.into())
    }
}

/// What a decoder accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Deepest nesting: a top-level value is at depth 1, a property of a top-level object at 2.
    pub max_depth: usize,
    /// Most values in one message, nested ones included.
    pub max_values: usize,
}

impl Default for Limits {
    /// Depth 16 and 4,096 values: several times what any RTMP client sends (OBS's and ffmpeg's
    /// `connect` is one object of about a dozen properties; `onMetaData` about twenty).
    fn default() -> Self {
        Self {
            max_depth: 16,
            max_values: 4096,
        }
    }
}

/// Why AMF0 bytes could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Amf0Error {
    /// The bytes ended inside a value.
    #[error("AMF0 value cut short at byte {0}")]
    Truncated(usize),
    /// Nesting deeper than the limit.
    #[error("AMF0 values nested deeper than {0} levels")]
    TooDeep(usize),
    /// More values than the limit.
    #[error("more than {0} AMF0 values in one message")]
    TooManyValues(usize),
    /// A marker this reader does not take (references, AMF3 switches, reserved markers).
    #[error("AMF0 marker {marker:#04x} at byte {at} is not supported")]
    Unsupported {
        /// The marker.
        marker: u8,
        /// Its offset in the message.
        at: usize,
    },
    /// A string that is not UTF-8.
    #[error("an AMF0 string at byte {0} is not UTF-8")]
    NotUtf8(usize),
    /// An object's end marker where a value was expected, or none where one was.
    #[error("malformed AMF0 object at byte {0}")]
    Malformed(usize),
}

/// Reads AMF0 values from one message's bytes.
pub struct Decoder<'a> {
    bytes: &'a [u8],
    at: usize,
    values: usize,
    limits: Limits,
}

impl fmt::Debug for Decoder<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Decoder")
            .field("at", &self.at)
            .field("len", &self.bytes.len())
            .finish()
    }
}

impl<'a> Decoder<'a> {
    /// A decoder over `bytes`.
    pub fn new(bytes: &'a [u8], limits: Limits) -> Self {
        Self {
            bytes,
            at: 0,
            values: 0,
            limits,
        }
    }

    /// Whether every byte has been read.
    pub fn is_empty(&self) -> bool {
        self.at >= self.bytes.len()
    }

    /// Every value left, in order.
    pub fn read_all(mut self) -> Result<Vec<Value>, Amf0Error> {
        let mut values = Vec::new();
        while !self.is_empty() {
            values.push(self.read()?);
        }
        Ok(values)
    }

    /// The next top-level value.
    pub fn read(&mut self) -> Result<Value, Amf0Error> {
        self.value(1)
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], Amf0Error> {
        let end = self
            .at
            .checked_add(n)
            .filter(|end| *end <= self.bytes.len())
            .ok_or(Amf0Error::Truncated(self.at))?;
        let taken = &self.bytes[self.at..end];
        self.at = end;
        Ok(taken)
    }

    fn u8(&mut self) -> Result<u8, Amf0Error> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<usize, Amf0Error> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]) as usize)
    }

    fn u32(&mut self) -> Result<usize, Amf0Error> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize)
    }

    fn f64(&mut self) -> Result<f64, Amf0Error> {
        let b = self.take(8)?;
        Ok(f64::from_be_bytes(b.try_into().expect("8 bytes")))
    }

    fn text(&mut self, len: usize) -> Result<String, Amf0Error> {
        let at = self.at;
        // `take` checks the length against the bytes left before anything is allocated.
        let bytes = self.take(len)?;
        std::str::from_utf8(bytes)
            .map(str::to_owned)
            .map_err(|_| Amf0Error::NotUtf8(at))
    }

    fn value(&mut self, depth: usize) -> Result<Value, Amf0Error> {
        if depth > self.limits.max_depth {
            return Err(Amf0Error::TooDeep(self.limits.max_depth));
        }
        self.values += 1;
        if self.values > self.limits.max_values {
            return Err(Amf0Error::TooManyValues(self.limits.max_values));
        }
        let at = self.at;
        let value = match self.u8()? {
            marker::NUMBER => Value::Number(self.f64()?),
            marker::BOOLEAN => Value::Boolean(self.u8()? != 0),
            marker::STRING => {
                let len = self.u16()?;
                Value::String(self.text(len)?)
            }
            marker::LONG_STRING => {
                let len = self.u32()?;
                Value::String(self.text(len)?)
            }
            marker::XML_DOCUMENT => {
                let len = self.u32()?;
                Value::Xml(self.text(len)?)
            }
            marker::OBJECT => Value::Object(self.properties(depth)?),
            marker::TYPED_OBJECT => {
                let len = self.u16()?;
                let class = self.text(len)?;
                Value::TypedObject(class, self.properties(depth)?)
            }
            marker::ECMA_ARRAY => {
                // The count is a hint that writers get wrong; the end marker decides.
                self.u32()?;
                Value::EcmaArray(self.properties(depth)?)
            }
            marker::STRICT_ARRAY => {
                let count = self.u32()?;
                // Every value takes at least one byte: a count above the bytes left is a lie,
                // refused before anything is reserved for it.
                if count > self.bytes.len() - self.at {
                    return Err(Amf0Error::Truncated(self.at));
                }
                let mut items = Vec::new();
                for _ in 0..count {
                    items.push(self.value(depth + 1)?);
                }
                Value::StrictArray(items)
            }
            marker::DATE => {
                let millis = self.f64()?;
                self.take(2)?;
                Value::Date(millis)
            }
            marker::NULL => Value::Null,
            marker::UNDEFINED | marker::UNSUPPORTED => Value::Undefined,
            marker::OBJECT_END => return Err(Amf0Error::Malformed(at)),
            // References (AMF0 §2.9), the switch to AMF3 and the reserved markers.
            other => {
                return Err(Amf0Error::Unsupported { marker: other, at });
            }
        };
        Ok(value)
    }

    /// An object's properties up to its end marker (an empty name, then 0x09).
    fn properties(&mut self, depth: usize) -> Result<Vec<(String, Value)>, Amf0Error> {
        let mut properties = Vec::new();
        loop {
            let at = self.at;
            let len = self.u16()?;
            if len == 0 {
                return match self.u8()? {
                    marker::OBJECT_END => Ok(properties),
                    _ => Err(Amf0Error::Malformed(at)),
                };
            }
            let name = self.text(len)?;
            let value = self.value(depth + 1)?;
            properties.push((name, value));
        }
    }
}

/// Appends the AMF0 encoding of `value` to `out`. Strings longer than 65,535 bytes are written
/// as long strings; what this module writes nests as deep as the caller built it.
pub fn write(out: &mut Vec<u8>, value: &Value) {
    match value {
        Value::Number(n) => {
            out.push(marker::NUMBER);
            out.extend_from_slice(&n.to_be_bytes());
        }
        Value::Boolean(b) => {
            out.push(marker::BOOLEAN);
            out.push(u8::from(*b));
        }
        Value::String(s) => match u16::try_from(s.len()) {
            Ok(len) => {
                out.push(marker::STRING);
                out.extend_from_slice(&len.to_be_bytes());
                out.extend_from_slice(s.as_bytes());
            }
            Err(_) => {
                out.push(marker::LONG_STRING);
                write_long_text(out, s);
            }
        },
        Value::Xml(s) => {
            out.push(marker::XML_DOCUMENT);
            write_long_text(out, s);
        }
        Value::Object(properties) => {
            out.push(marker::OBJECT);
            write_properties(out, properties);
        }
        Value::TypedObject(class, properties) => {
            out.push(marker::TYPED_OBJECT);
            write_name(out, class);
            write_properties(out, properties);
        }
        Value::EcmaArray(properties) => {
            out.push(marker::ECMA_ARRAY);
            out.extend_from_slice(&(properties.len() as u32).to_be_bytes());
            write_properties(out, properties);
        }
        Value::StrictArray(items) => {
            out.push(marker::STRICT_ARRAY);
            out.extend_from_slice(&(items.len() as u32).to_be_bytes());
            for item in items {
                write(out, item);
            }
        }
        Value::Date(millis) => {
            out.push(marker::DATE);
            out.extend_from_slice(&millis.to_be_bytes());
            out.extend_from_slice(&[0, 0]);
        }
        Value::Null => out.push(marker::NULL),
        Value::Undefined => out.push(marker::UNDEFINED),
    }
}

fn write_long_text(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u32).to_be_bytes());
    out.extend_from_slice(s.as_bytes());
}

/// A property name or class name: a short string without its marker (names are cut at 65,535
/// bytes, on a character boundary; nothing this crate writes comes near).
fn write_name(out: &mut Vec<u8>, name: &str) {
    let mut end = name.len().min(u16::MAX as usize);
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    out.extend_from_slice(&(end as u16).to_be_bytes());
    out.extend_from_slice(&name.as_bytes()[..end]);
}

fn write_properties(out: &mut Vec<u8>, properties: &[(String, Value)]) {
    for (name, value) in properties {
        if name.is_empty() {
            // An empty name would read back as the end marker.
            continue;
        }
        write_name(out, name);
        write(out, value);
    }
    out.extend_from_slice(&[0, 0, marker::OBJECT_END]);
}

/// The encoding of `values`, one after another.
pub fn encode(values: &[Value]) -> Vec<u8> {
    let mut out = Vec::new();
    for value in values {
        write(&mut out, value);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nested_arrays(depth: usize) -> Vec<u8> {
        let mut bytes = Vec::new();
        for _ in 0..depth {
            bytes.push(marker::STRICT_ARRAY);
            bytes.extend_from_slice(&1u32.to_be_bytes());
        }
        bytes.push(marker::NULL);
        bytes
    }

    #[test]
    fn values_round_trip() {
        let values = vec![
            Value::string("connect"),
            Value::Number(1.0),
            Value::object([
                ("app", Value::string("live")),
                ("capabilities", Value::Number(239.0)),
                ("fpad", Value::Boolean(false)),
                (
                    "nested",
                    Value::EcmaArray(vec![("w".into(), Value::Number(640.0))]),
                ),
            ]),
            Value::Null,
            Value::Undefined,
            Value::StrictArray(vec![Value::Number(1.0), Value::string("two")]),
            Value::Date(1.5e12),
            Value::TypedObject("c".into(), vec![("k".into(), Value::Boolean(true))]),
            Value::string("é".repeat(40_000)),
            Value::Xml("<x/>".into()),
        ];
        let bytes = encode(&values);
        let back = Decoder::new(&bytes, Limits::default()).read_all().unwrap();
        assert_eq!(back, values);
        assert_eq!(
            back[2].property("app").and_then(Value::as_str),
            Some("live")
        );
    }

    /// The message that killed the process through the old protocol crate: 10,000 nested strict
    /// arrays (about 50 KB). Read on a thread with a 64 KiB stack, so that any recursion that
    /// followed the input's depth would overflow it.
    #[test]
    fn deep_nesting_is_refused_before_it_is_followed() {
        let outcome = std::thread::Builder::new()
            .stack_size(64 * 1024)
            .spawn(|| {
                let mut deep = Vec::new();
                for depth in [17usize, 3_000, 10_000, 100_000] {
                    let bytes = nested_arrays(depth);
                    deep.push((
                        bytes.len(),
                        Decoder::new(&bytes, Limits::default()).read_all(),
                    ));
                }
                let shallow = Decoder::new(&nested_arrays(15), Limits::default()).read_all();
                (deep, shallow)
            })
            .unwrap()
            .join()
            .expect("no stack overflow");
        let (deep, shallow) = outcome;
        for (len, result) in &deep {
            println!("{len} bytes nested: {result:?}");
            assert_eq!(result, &Err(Amf0Error::TooDeep(16)));
        }
        assert_eq!(deep[2].0, 50_001, "the 10,000-deep message is about 50 KB");
        assert!(shallow.is_ok(), "16 levels (15 arrays and a null) are fine");
    }

    #[test]
    fn lengths_and_counts_are_checked_before_allocating() {
        let limits = Limits::default();
        // A strict array that claims 2³² − 1 items in 5 bytes.
        let mut bytes = vec![marker::STRICT_ARRAY];
        bytes.extend_from_slice(&u32::MAX.to_be_bytes());
        assert_eq!(
            Decoder::new(&bytes, limits).read(),
            Err(Amf0Error::Truncated(5))
        );
        // A long string claiming 4 GB.
        let mut bytes = vec![marker::LONG_STRING];
        bytes.extend_from_slice(&u32::MAX.to_be_bytes());
        bytes.extend_from_slice(b"abc");
        assert_eq!(
            Decoder::new(&bytes, limits).read(),
            Err(Amf0Error::Truncated(5))
        );
        // 5,000 numbers in one array: over the value count.
        let mut bytes = vec![marker::STRICT_ARRAY];
        bytes.extend_from_slice(&5000u32.to_be_bytes());
        for _ in 0..5000 {
            write(&mut bytes, &Value::Number(0.0));
        }
        assert_eq!(
            Decoder::new(&bytes, limits).read(),
            Err(Amf0Error::TooManyValues(4096))
        );
        // Empty input, an object without its end, a lone end marker, a reference, AMF3.
        for (bytes, want) in [
            (vec![], Amf0Error::Truncated(0)),
            (
                vec![marker::OBJECT, 0, 1, b'a', marker::NULL],
                Amf0Error::Truncated(5),
            ),
            (vec![marker::OBJECT_END], Amf0Error::Malformed(0)),
            (
                vec![marker::OBJECT, 0, 0, marker::NULL],
                Amf0Error::Malformed(1),
            ),
            (
                vec![0x07, 0, 0],
                Amf0Error::Unsupported {
                    marker: 0x07,
                    at: 0,
                },
            ),
            (
                vec![0x11, 1],
                Amf0Error::Unsupported {
                    marker: 0x11,
                    at: 0,
                },
            ),
            (
                vec![marker::STRING, 0, 2, 0xff, 0xfe],
                Amf0Error::NotUtf8(3),
            ),
        ] {
            assert_eq!(Decoder::new(&bytes, limits).read(), Err(want), "{bytes:?}");
        }
    }
}
