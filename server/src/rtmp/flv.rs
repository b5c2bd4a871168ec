//! H.264 in FLV video tags, both ways: RTMP carries each picture as an FLV `VIDEODATA` body
//! (one byte of frame type and codec id, the AVC packet type, a composition time, then NAL
//! units each prefixed with its length) after a sequence header holding the
//! `AVCDecoderConfigurationRecord` (ISO/IEC 14496-15 §5.2.4.1: SPS and PPS, the length size).
//! OpenH264 and the WebRTC path speak Annex-B (start codes), so ingest converts tags to Annex-B
//! access units and the push converts encoded pictures back.

/// The FLV codec id of AVC (H.264).
const CODEC_AVC: u8 = 7;
/// FLV frame type of a keyframe.
const FRAME_KEY: u8 = 1;
const START_CODE: [u8; 4] = [0, 0, 0, 1];
/// NAL unit types.
const NAL_IDR: u8 = 5;
const NAL_SPS: u8 = 7;
const NAL_PPS: u8 = 8;
const NAL_AUD: u8 = 9;

/// Why a video tag cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FlvError {
    /// The tag is not H.264 (a publisher sending another codec: the stream cannot decode it).
    #[error("the video codec is {0}; sdstream takes H.264 (AVC) only")]
    UnsupportedCodec(String),
    /// The tag or its configuration record is cut short or inconsistent.
    #[error("malformed H.264 video tag: {0}")]
    Malformed(&'static str),
    /// Pictures arrived before any sequence header (SPS/PPS and the NAL length size).
    #[error("a picture arrived before the AVC sequence header")]
    NoSequenceHeader,
}

/// An Annex-B access unit made from one FLV video tag.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccessUnit {
    /// NAL units with start codes; a keyframe starts with the stream's SPS and PPS.
    pub data: Vec<u8>,
    /// The tag was a keyframe.
    pub keyframe: bool,
}

/// The codec name of an FLV codec id, for messages.
fn codec_name(id: u8) -> String {
    match id {
        2 => "Sorenson H.263".into(),
        3 => "Screen video".into(),
        4 => "On2 VP6".into(),
        5 => "On2 VP6 with alpha".into(),
        6 => "Screen video v2".into(),
        12 => "HEVC (H.265)".into(),
        13 => "AV1".into(),
        other => format!("FLV codec id {other}"),
    }
}

/// Turns the FLV video tags of one RTMP publisher into Annex-B access units.
#[derive(Debug, Default)]
pub struct AvcDepacketizer {
    /// Bytes in each NAL unit's length prefix (1, 2 or 4), from the sequence header.
    length_size: Option<usize>,
    /// SPS and PPS of the last sequence header, Annex-B, prepended to keyframes that lack them.
    parameter_sets: Vec<u8>,
}

impl AvcDepacketizer {
    /// A depacketizer waiting for its sequence header.
    pub fn new() -> Self {
        Self::default()
    }

    /// Takes one video tag body. `Ok(None)` for a sequence header or an end-of-sequence tag.
    pub fn push(&mut self, tag: &[u8]) -> Result<Option<AccessUnit>, FlvError> {
        let (&first, rest) = tag.split_first().ok_or(FlvError::Malformed("empty tag"))?;
        if first & 0x80 != 0 {
            // Enhanced RTMP: a FourCC instead of a codec id.
            let fourcc = rest
                .get(..4)
                .map(|f| String::from_utf8_lossy(f).into_owned())
                .unwrap_or_default();
            return Err(FlvError::UnsupportedCodec(format!(
                "{fourcc:?} (enhanced RTMP)"
            )));
        }
        let (frame_type, codec) = (first >> 4, first & 0x0f);
        if codec != CODEC_AVC {
            return Err(FlvError::UnsupportedCodec(codec_name(codec)));
        }
        if frame_type == 5 {
            // Video info / command frame: no picture.
            return Ok(None);
        }
        let (&packet_type, rest) = rest
            .split_first()
            .ok_or(FlvError::Malformed("no AVC packet type"))?;
        // Three bytes of composition time: no B-frames reach the engine's decoder order, so
        // the access unit's own arrival stands for its time.
        let body = rest
            .get(3..)
            .ok_or(FlvError::Malformed("no composition time"))?;
        match packet_type {
            0 => {
                self.sequence_header(body)?;
                Ok(None)
            }
            1 => self.pictures(body, frame_type == FRAME_KEY).map(Some),
            2 => Ok(None),
            _ => Err(FlvError::Malformed("unknown AVC packet type")),
        }
    }

    fn sequence_header(&mut self, record: &[u8]) -> Result<(), FlvError> {
        let mut r = Reader(record);
        let version = r.u8()?;
        if version != 1 {
            return Err(FlvError::Malformed(
                "AVCDecoderConfigurationRecord version is not 1",
            ));
        }
        r.skip(3)?; // profile, compatibility, level
        let length_size = usize::from(r.u8()? & 0x03) + 1;
        if length_size == 3 {
            return Err(FlvError::Malformed("NAL length size of 3 bytes"));
        }
        let mut sets = Vec::new();
        let sps_count = r.u8()? & 0x1f;
        for _ in 0..sps_count {
            let n = usize::from(r.u16()?);
            sets.extend_from_slice(&START_CODE);
            sets.extend_from_slice(r.take(n)?);
        }
        let pps_count = r.u8()?;
        for _ in 0..pps_count {
            let n = usize::from(r.u16()?);
            sets.extend_from_slice(&START_CODE);
            sets.extend_from_slice(r.take(n)?);
        }
        if sps_count == 0 || pps_count == 0 {
            return Err(FlvError::Malformed("sequence header without SPS or PPS"));
        }
        self.length_size = Some(length_size);
        self.parameter_sets = sets;
        Ok(())
    }

    fn pictures(&self, mut body: &[u8], keyframe: bool) -> Result<AccessUnit, FlvError> {
        let length_size = self.length_size.ok_or(FlvError::NoSequenceHeader)?;
        let mut data = Vec::with_capacity(body.len() + self.parameter_sets.len() + 16);
        let mut has_parameter_sets = false;
        let mut units = Vec::new();
        while !body.is_empty() {
            let prefix = body
                .get(..length_size)
                .ok_or(FlvError::Malformed("cut-off NAL length"))?;
            let n = prefix
                .iter()
                .fold(0usize, |acc, &b| (acc << 8) | usize::from(b));
            let unit = body
                .get(length_size..length_size + n)
                .ok_or(FlvError::Malformed("NAL unit longer than the tag"))?;
            body = &body[length_size + n..];
            if unit.is_empty() {
                continue;
            }
            has_parameter_sets |= matches!(unit[0] & 0x1f, NAL_SPS | NAL_PPS);
            units.push(unit);
        }
        if units.is_empty() {
            return Err(FlvError::Malformed("a picture tag without NAL units"));
        }
        let idr = units.iter().any(|u| u[0] & 0x1f == NAL_IDR);
        if (keyframe || idr) && !has_parameter_sets {
            data.extend_from_slice(&self.parameter_sets);
        }
        for unit in units {
            data.extend_from_slice(&START_CODE);
            data.extend_from_slice(unit);
        }
        Ok(AccessUnit {
            data,
            keyframe: keyframe || idr,
        })
    }
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], FlvError> {
        if self.0.len() < n {
            return Err(FlvError::Malformed("sequence header cut short"));
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Ok(head)
    }

    fn skip(&mut self, n: usize) -> Result<(), FlvError> {
        self.take(n).map(|_| ())
    }

    fn u8(&mut self) -> Result<u8, FlvError> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16, FlvError> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }
}

/// The NAL units of an Annex-B buffer (start codes of 3 or 4 bytes), without their start codes.
pub fn nal_units(annexb: &[u8]) -> Vec<&[u8]> {
    let mut starts = Vec::new();
    let mut i = 0;
    while i + 3 <= annexb.len() {
        if annexb[i] == 0 && annexb[i + 1] == 0 && annexb[i + 2] == 1 {
            starts.push((i, i + 3));
            i += 3;
        } else {
            i += 1;
        }
    }
    let mut units = Vec::with_capacity(starts.len());
    for (k, &(_, begin)) in starts.iter().enumerate() {
        let mut end = starts.get(k + 1).map_or(annexb.len(), |&(code, _)| code);
        // A 4-byte start code's leading zero belongs to the next code, not to this unit.
        while end > begin && annexb[end - 1] == 0 && k + 1 < starts.len() {
            end -= 1;
        }
        if end > begin {
            units.push(&annexb[begin..end]);
        }
    }
    units
}

/// The FLV video tag body of an AVC sequence header for these SPS and PPS.
pub fn sequence_header_tag(sps: &[u8], pps: &[u8]) -> Vec<u8> {
    let mut tag = vec![(FRAME_KEY << 4) | CODEC_AVC, 0, 0, 0, 0];
    tag.push(1); // configurationVersion
    tag.extend_from_slice(sps.get(1..4).unwrap_or(&[66, 0xe0, 31]));
    tag.push(0xfc | 3); // lengthSizeMinusOne = 3
    tag.push(0xe0 | 1);
    tag.extend_from_slice(&(sps.len() as u16).to_be_bytes());
    tag.extend_from_slice(sps);
    tag.push(1);
    tag.extend_from_slice(&(pps.len() as u16).to_be_bytes());
    tag.extend_from_slice(pps);
    tag
}

/// The FLV video tag body of one encoded picture (Annex-B in, 4-byte length prefixes out).
/// Parameter sets and access-unit delimiters are left out: they travel in the sequence header.
pub fn picture_tag(annexb: &[u8], keyframe: bool) -> Vec<u8> {
    let frame_type = if keyframe { FRAME_KEY } else { 2 };
    let mut tag = Vec::with_capacity(annexb.len() + 16);
    tag.extend_from_slice(&[(frame_type << 4) | CODEC_AVC, 1, 0, 0, 0]);
    for unit in nal_units(annexb) {
        if matches!(unit[0] & 0x1f, NAL_SPS | NAL_PPS | NAL_AUD) {
            continue;
        }
        tag.extend_from_slice(&(unit.len() as u32).to_be_bytes());
        tag.extend_from_slice(unit);
    }
    tag
}

/// The SPS and PPS of an Annex-B keyframe, if it carries both.
pub fn parameter_sets(annexb: &[u8]) -> Option<(&[u8], &[u8])> {
    let units = nal_units(annexb);
    let sps = units.iter().find(|u| u[0] & 0x1f == NAL_SPS)?;
    let pps = units.iter().find(|u| u[0] & 0x1f == NAL_PPS)?;
    Some((sps, pps))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SPS: &[u8] = &[0x67, 0x42, 0xc0, 0x1f, 0xda, 0x01];
    const PPS: &[u8] = &[0x68, 0xce, 0x3c, 0x80];
    const IDR: &[u8] = &[0x65, 0x88, 0x84, 0x00, 0x33];
    const SLICE: &[u8] = &[0x41, 0x9a, 0x02, 0x04];

    fn annexb(units: &[&[u8]]) -> Vec<u8> {
        units
            .iter()
            .flat_map(|u| [&START_CODE[..], u].concat())
            .collect()
    }

    #[test]
    fn tags_round_trip_through_annex_b() {
        let mut depacketizer = AvcDepacketizer::new();
        // A picture before the sequence header cannot be decoded.
        let keyframe = annexb(&[SPS, PPS, IDR]);
        let key_tag = picture_tag(&keyframe, true);
        assert_eq!(depacketizer.push(&key_tag), Err(FlvError::NoSequenceHeader));
        let header = sequence_header_tag(SPS, PPS);
        assert_eq!(depacketizer.push(&header), Ok(None));
        // The keyframe's tag holds only the IDR slice; the access unit gets SPS and PPS back.
        let unit = depacketizer.push(&key_tag).unwrap().unwrap();
        assert!(unit.keyframe);
        assert_eq!(unit.data, keyframe);
        let delta = annexb(&[SLICE]);
        let unit = depacketizer
            .push(&picture_tag(&delta, false))
            .unwrap()
            .unwrap();
        assert!(!unit.keyframe);
        assert_eq!(unit.data, delta);
        assert_eq!(parameter_sets(&keyframe), Some((SPS, PPS)));
        assert_eq!(parameter_sets(&delta), None);
    }

    #[test]
    fn three_and_four_byte_start_codes_split_alike() {
        let mut mixed = vec![0, 0, 1];
        mixed.extend_from_slice(SPS);
        mixed.extend_from_slice(&[0, 0, 0, 1]);
        mixed.extend_from_slice(PPS);
        mixed.extend_from_slice(&[0, 0, 1]);
        mixed.extend_from_slice(IDR);
        assert_eq!(nal_units(&mixed), vec![SPS, PPS, IDR]);
        assert!(nal_units(&[0, 0, 0, 0]).is_empty());
    }

    #[test]
    fn other_codecs_and_broken_tags_are_named() {
        let mut d = AvcDepacketizer::new();
        assert_eq!(
            d.push(&[0x12, 0, 0, 0, 0]),
            Err(FlvError::UnsupportedCodec("Sorenson H.263".into()))
        );
        assert!(matches!(
            d.push(&[0x90, b'h', b'v', b'c', b'1']),
            Err(FlvError::UnsupportedCodec(name)) if name.contains("hvc1")
        ));
        assert_eq!(d.push(&[]), Err(FlvError::Malformed("empty tag")));
        // A sequence header cut inside its SPS.
        let header = sequence_header_tag(SPS, PPS);
        assert!(matches!(d.push(&header[..12]), Err(FlvError::Malformed(_))));
        d.push(&header).unwrap();
        // A NAL length pointing past the end of the tag.
        let mut tag = vec![0x27, 1, 0, 0, 0, 0, 0, 0, 200];
        tag.extend_from_slice(SLICE);
        assert_eq!(
            d.push(&tag),
            Err(FlvError::Malformed("NAL unit longer than the tag"))
        );
        // The depacketizer still works after the errors.
        assert!(
            d.push(&picture_tag(&annexb(&[SLICE]), false))
                .unwrap()
                .is_some()
        );
    }

    #[test]
    fn one_and_two_byte_length_prefixes_are_read() {
        let mut d = AvcDepacketizer::new();
        let mut header = sequence_header_tag(SPS, PPS);
        header[9] = 0xfc | 1; // two-byte lengths
        d.push(&header).unwrap();
        let mut tag = vec![0x27, 1, 0, 0, 0];
        tag.extend_from_slice(&(SLICE.len() as u16).to_be_bytes());
        tag.extend_from_slice(SLICE);
        let unit = d.push(&tag).unwrap().unwrap();
        assert_eq!(unit.data, annexb(&[SLICE]));
    }
}
