//! RTP → H.264 access units: depacketizes (RFC 6184 single NAL, STAP-A, FU-A) and groups the NAL
//! units of one RTP timestamp. A gap in sequence numbers drops the damaged picture and says so,
//! so that the receiver asks for a keyframe instead of decoding garbage.

use bytes::Bytes;
use rtc::rtp::codec::h264::H264Packet;
use rtc::rtp::packetizer::Depacketizer;

/// What one RTP packet completed.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Assembled {
    /// Nothing yet.
    Pending,
    /// A whole access unit, Annex-B.
    AccessUnit(Vec<u8>),
    /// Packets were lost or malformed: the picture in progress was dropped. The decoder needs a
    /// keyframe.
    Damaged,
}

/// Reassembles access units from the RTP packets of one H.264 stream, in arrival order (a
/// reordered packet counts as a loss: on the paths this serves, reordering is rare and a
/// keyframe request is cheap).
pub(crate) struct AccessUnitAssembler {
    depacketizer: H264Packet,
    buffer: Vec<u8>,
    timestamp: Option<u32>,
    last_sequence: Option<u16>,
    damaged: bool,
    max_bytes: usize,
}

impl AccessUnitAssembler {
    /// `max_bytes` bounds one access unit (a sender cannot make the server buffer without end).
    pub(crate) fn new(max_bytes: usize) -> Self {
        Self {
            depacketizer: H264Packet::default(),
            buffer: Vec::new(),
            timestamp: None,
            last_sequence: None,
            damaged: false,
            max_bytes,
        }
    }

    fn reset_picture(&mut self) {
        self.buffer.clear();
        self.depacketizer = H264Packet::default();
    }

    /// Takes one packet (sequence number, RTP timestamp, marker bit, payload).
    pub(crate) fn push(
        &mut self,
        sequence: u16,
        timestamp: u32,
        marker: bool,
        payload: &Bytes,
    ) -> Assembled {
        let mut outcome = Assembled::Pending;
        let gap = matches!(self.last_sequence, Some(last) if sequence != last.wrapping_add(1));
        self.last_sequence = Some(sequence);
        if self.timestamp != Some(timestamp) {
            // A new picture starts. One left incomplete (its marker packet lost) is damaged.
            if !self.buffer.is_empty() || self.damaged {
                outcome = Assembled::Damaged;
            }
            self.reset_picture();
            self.timestamp = Some(timestamp);
            // A gap here may have eaten the start of this picture, or a whole picture this one
            // refers to: either way it cannot be decoded.
            self.damaged = gap;
        } else if gap {
            self.damaged = true;
        }
        if self.damaged {
            // Wait for the next timestamp; report the damage once.
            self.reset_picture();
            if marker {
                self.timestamp = None;
                self.damaged = false;
                return Assembled::Damaged;
            }
            return outcome;
        }
        if payload.is_empty() {
            // Padding-only packets carry no media.
        } else {
            match self.depacketizer.depacketize(payload) {
                Ok(nal) => {
                    self.buffer.extend_from_slice(&nal);
                    if self.buffer.len() > self.max_bytes {
                        self.damaged = true;
                        self.reset_picture();
                        return Assembled::Damaged;
                    }
                }
                Err(_) => {
                    self.damaged = true;
                    self.reset_picture();
                    return Assembled::Damaged;
                }
            }
        }
        if marker {
            self.timestamp = None;
            if self.buffer.is_empty() {
                return outcome;
            }
            let unit = std::mem::take(&mut self.buffer);
            self.depacketizer = H264Packet::default();
            return Assembled::AccessUnit(unit);
        }
        outcome
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn single(nal_type: u8, body: &[u8]) -> Bytes {
        let mut v = vec![0x60 | nal_type];
        v.extend_from_slice(body);
        Bytes::from(v)
    }

    /// FU-A fragments of one NAL unit (header byte `0x65`: IDR slice).
    fn fragments(body: &[u8], parts: usize) -> Vec<Bytes> {
        let chunk = body.len().div_ceil(parts);
        body.chunks(chunk)
            .enumerate()
            .map(|(i, c)| {
                let mut fu_header = 0x05;
                if i == 0 {
                    fu_header |= 0x80;
                }
                if (i + 1) * chunk >= body.len() {
                    fu_header |= 0x40;
                }
                let mut v = vec![0x60 | 28, fu_header];
                v.extend_from_slice(c);
                Bytes::from(v)
            })
            .collect()
    }

    #[test]
    fn groups_nal_units_by_timestamp_and_marker() {
        let mut a = AccessUnitAssembler::new(1 << 20);
        assert_eq!(
            a.push(1, 100, false, &single(7, &[1, 2, 3])),
            Assembled::Pending
        );
        assert_eq!(
            a.push(2, 100, false, &single(8, &[4, 5])),
            Assembled::Pending
        );
        let body: Vec<u8> = (0..30).collect();
        let parts = fragments(&body, 3);
        assert_eq!(a.push(3, 100, false, &parts[0]), Assembled::Pending);
        assert_eq!(a.push(4, 100, false, &parts[1]), Assembled::Pending);
        let Assembled::AccessUnit(unit) = a.push(5, 100, true, &parts[2]) else {
            panic!("expected a complete access unit");
        };
        let mut want = vec![
            0, 0, 0, 1, 0x67, 1, 2, 3, 0, 0, 0, 1, 0x68, 4, 5, 0, 0, 0, 1, 0x65,
        ];
        want.extend_from_slice(&body);
        assert_eq!(unit, want);
    }

    #[test]
    fn a_lost_fragment_drops_the_picture_and_the_next_one_decodes() {
        let mut a = AccessUnitAssembler::new(1 << 20);
        let body: Vec<u8> = (0..30).collect();
        let parts = fragments(&body, 3);
        assert_eq!(a.push(10, 100, false, &parts[0]), Assembled::Pending);
        // Sequence 11 lost.
        assert_eq!(a.push(12, 100, true, &parts[2]), Assembled::Damaged);
        let Assembled::AccessUnit(unit) = a.push(13, 200, true, &single(1, &[9, 9])) else {
            panic!("the next picture should come through");
        };
        assert_eq!(unit, [0, 0, 0, 1, 0x61, 9, 9]);
    }

    #[test]
    fn a_lost_marker_packet_is_reported_when_the_next_picture_starts() {
        let mut a = AccessUnitAssembler::new(1 << 20);
        assert_eq!(
            a.push(1, 100, false, &single(1, &[1, 1])),
            Assembled::Pending
        );
        // Sequence 2 (the marker of timestamp 100) lost.
        assert_eq!(
            a.push(3, 200, false, &single(1, &[2, 2])),
            Assembled::Damaged
        );
        // The gap may also have taken the start of timestamp 200: it is dropped too, and the
        // stream resumes at 300.
        assert_eq!(
            a.push(4, 200, true, &single(1, &[3, 3])),
            Assembled::Damaged
        );
        assert!(matches!(
            a.push(5, 300, true, &single(1, &[4, 4])),
            Assembled::AccessUnit(_)
        ));
    }

    #[test]
    fn malformed_and_oversized_payloads_are_damage_not_panics() {
        let mut a = AccessUnitAssembler::new(64);
        assert_eq!(
            a.push(1, 100, true, &Bytes::from_static(&[0x7f])),
            Assembled::Damaged
        );
        let big = single(1, &[0u8; 100]);
        assert_eq!(a.push(2, 200, true, &big), Assembled::Damaged);
        assert!(matches!(
            a.push(3, 300, true, &single(1, &[1, 2])),
            Assembled::AccessUnit(_)
        ));
    }
}
