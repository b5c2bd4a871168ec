//! ISO BMFF boxes in memory: a parent's children, each inside its parent, and a box's fields,
//! each inside its box. Nothing here allocates; every read past an end is an error naming the
//! box.

use super::{Result, VideoFileError};

/// A four-character code as text (`'avc1'`), other bytes escaped.
pub(crate) fn fourcc(kind: [u8; 4]) -> String {
    let text: String = kind
        .iter()
        .map(|&b| {
            if b.is_ascii_graphic() || b == b' ' {
                char::from(b).to_string()
            } else {
                format!("\\x{b:02x}")
            }
        })
        .collect();
    format!("'{text}'")
}

/// One box: its type and its body (the bytes after the header).
#[derive(Debug, Clone, Copy)]
pub(crate) struct BoxRef<'a> {
    pub(crate) kind: [u8; 4],
    pub(crate) body: &'a [u8],
    /// The whole box, header included.
    pub(crate) raw: &'a [u8],
}

/// The boxes in `data` (a parent's body), in order; `parent` names the parent in errors.
pub(crate) struct Children<'a> {
    data: &'a [u8],
    pos: usize,
    parent: &'a str,
    failed: bool,
}

/// The children of a box whose body is `data`.
pub(crate) fn children<'a>(data: &'a [u8], parent: &'a str) -> Children<'a> {
    Children {
        data,
        pos: 0,
        parent,
        failed: false,
    }
}

impl<'a> Iterator for Children<'a> {
    type Item = Result<BoxRef<'a>>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed || self.pos >= self.data.len() {
            return None;
        }
        let rest = &self.data[self.pos..];
        let result = header(rest).and_then(|(kind, header_len, size)| {
            let size = match size {
                // Size 0: to the end of the parent.
                None => rest.len(),
                Some(size) => usize::try_from(size).unwrap_or(usize::MAX),
            };
            if size < header_len {
                return Err(VideoFileError::Malformed(format!(
                    "in {}: box {} at byte {} has size {size}, less than its header",
                    self.parent,
                    fourcc(kind),
                    self.pos
                )));
            }
            if size > rest.len() {
                return Err(VideoFileError::Malformed(format!(
                    "in {}: box {} at byte {} claims {size} bytes but its parent has {} left",
                    self.parent,
                    fourcc(kind),
                    self.pos,
                    rest.len()
                )));
            }
            Ok(BoxRef {
                kind,
                body: &rest[header_len..size],
                raw: &rest[..size],
            })
        });
        match &result {
            Ok(b) => self.pos += b.raw.len(),
            Err(_) => self.failed = true,
        }
        Some(result.map_err(|e| match e {
            VideoFileError::Truncated(what) => VideoFileError::Malformed(format!(
                "in {}: a box header at byte {} is cut off ({what})",
                self.parent, self.pos
            )),
            other => other,
        }))
    }
}

/// A box header at the start of `data`: type, header length, and the box's size (`None`: to the
/// end of what holds it). `Truncated` when `data` is shorter than the header.
pub(crate) fn header(data: &[u8]) -> Result<([u8; 4], usize, Option<u64>)> {
    if data.len() < 8 {
        return Err(VideoFileError::Truncated(format!(
            "{} of a box header's 8 bytes",
            data.len()
        )));
    }
    let size32 = u32::from_be_bytes([data[0], data[1], data[2], data[3]]);
    let kind = [data[4], data[5], data[6], data[7]];
    match size32 {
        0 => Ok((kind, 8, None)),
        1 => {
            if data.len() < 16 {
                return Err(VideoFileError::Truncated(format!(
                    "{} of a 64-bit box header's 16 bytes",
                    data.len()
                )));
            }
            let mut large = [0u8; 8];
            large.copy_from_slice(&data[8..16]);
            Ok((kind, 16, Some(u64::from_be_bytes(large))))
        }
        n => Ok((kind, 8, Some(u64::from(n)))),
    }
}

/// The first child of type `kind`, if any.
pub(crate) fn find<'a>(
    data: &'a [u8],
    parent: &'a str,
    kind: &[u8; 4],
) -> Result<Option<BoxRef<'a>>> {
    for child in children(data, parent) {
        let child = child?;
        if &child.kind == kind {
            return Ok(Some(child));
        }
    }
    Ok(None)
}

/// The first child of type `kind`; an error naming it when there is none.
pub(crate) fn require<'a>(data: &'a [u8], parent: &'a str, kind: &[u8; 4]) -> Result<BoxRef<'a>> {
    find(data, parent, kind)?
        .ok_or_else(|| VideoFileError::Malformed(format!("{parent} has no {} box", fourcc(*kind))))
}

/// Reads a box's fields in order; a read past the end is an error naming the box.
pub(crate) struct Fields<'a> {
    data: &'a [u8],
    pos: usize,
    what: &'a str,
}

impl<'a> Fields<'a> {
    pub(crate) fn new(data: &'a [u8], what: &'a str) -> Self {
        Self { data, pos: 0, what }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.data.len());
        match end {
            Some(end) => {
                let bytes = &self.data[self.pos..end];
                self.pos = end;
                Ok(bytes)
            }
            None => Err(VideoFileError::Malformed(format!(
                "{} is cut off: {} bytes, needs more than {}",
                self.what,
                self.data.len(),
                self.pos
            ))),
        }
    }

    pub(crate) fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }

    pub(crate) fn u16(&mut self) -> Result<u16> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    pub(crate) fn u24(&mut self) -> Result<u32> {
        let b = self.take(3)?;
        Ok(u32::from_be_bytes([0, b[0], b[1], b[2]]))
    }

    pub(crate) fn u32(&mut self) -> Result<u32> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    /// The next u32 where the box's flags say the field is `present`, else `default` (the
    /// optional fields of `tfhd` and `trun`).
    pub(crate) fn u32_if(&mut self, present: bool, default: u32) -> Result<u32> {
        if present { self.u32() } else { Ok(default) }
    }

    pub(crate) fn u64(&mut self) -> Result<u64> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_be_bytes(a))
    }

    pub(crate) fn fourcc(&mut self) -> Result<[u8; 4]> {
        let b = self.take(4)?;
        Ok([b[0], b[1], b[2], b[3]])
    }

    pub(crate) fn bytes(&mut self, n: usize) -> Result<&'a [u8]> {
        self.take(n)
    }

    pub(crate) fn skip(&mut self, n: usize) -> Result<()> {
        self.take(n).map(|_| ())
    }

    /// Bytes not read yet.
    pub(crate) fn remaining(&self) -> usize {
        self.data.len() - self.pos
    }

    /// The bytes not read yet.
    pub(crate) fn rest(&self) -> &'a [u8] {
        &self.data[self.pos..]
    }

    /// A full box's version and flags.
    pub(crate) fn version_flags(&mut self) -> Result<(u8, u32)> {
        let version = self.u8()?;
        let flags = self.u24()?;
        Ok((version, flags))
    }

    /// An entry count read from the box, checked against the bytes left for `entry_bytes`-byte
    /// entries, so that no count can ask for more than the box holds.
    pub(crate) fn count(&mut self, entry_bytes: usize) -> Result<usize> {
        let count = self.u32()? as usize;
        let fits = self.remaining() / entry_bytes.max(1);
        if count > fits {
            return Err(VideoFileError::Malformed(format!(
                "{} claims {count} entries of {entry_bytes} bytes but holds room for {fits}",
                self.what
            )));
        }
        Ok(count)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn boxed(kind: &[u8; 4], body: &[u8]) -> Vec<u8> {
        let mut out = ((body.len() + 8) as u32).to_be_bytes().to_vec();
        out.extend_from_slice(kind);
        out.extend_from_slice(body);
        out
    }

    #[test]
    fn children_stay_inside_their_parent() {
        let mut data = boxed(b"free", &[1, 2, 3]);
        data.extend(boxed(b"skip", &[]));
        let kinds: Vec<[u8; 4]> = children(&data, "test")
            .map(|b| b.expect("box").kind)
            .collect();
        assert_eq!(kinds, [*b"free", *b"skip"]);

        // A child claiming more than its parent holds, or less than its header.
        let mut long = boxed(b"free", &[0; 4]);
        long[3] = 200;
        let got: Vec<_> = children(&long, "moov").collect();
        assert_eq!(got.len(), 1);
        let message = got[0].as_ref().expect_err("too long").to_string();
        assert!(message.contains("claims 200 bytes"), "{message}");
        let mut short = boxed(b"free", &[0; 4]);
        short[3] = 4;
        assert!(children(&short, "moov").next().expect("one").is_err());
        // A 64-bit size of 8 (less than its 16-byte header) and a cut-off header.
        let mut large = vec![0, 0, 0, 1];
        large.extend_from_slice(b"free");
        large.extend_from_slice(&8u64.to_be_bytes());
        assert!(children(&large, "moov").next().expect("one").is_err());
        assert!(children(&[0, 0, 0], "moov").next().expect("one").is_err());
    }

    #[test]
    fn counts_cannot_exceed_their_box() {
        let mut body = 1000u32.to_be_bytes().to_vec();
        body.extend_from_slice(&[0; 16]);
        let mut fields = Fields::new(&body, "stco");
        let message = fields.count(4).expect_err("too many").to_string();
        assert!(message.contains("claims 1000 entries"), "{message}");
        let mut body = 4u32.to_be_bytes().to_vec();
        body.extend_from_slice(&[0; 16]);
        assert_eq!(Fields::new(&body, "stco").count(4).expect("fits"), 4);
    }
}
