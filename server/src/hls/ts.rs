//! MPEG-2 transport stream for HLS segments (ISO/IEC 13818-1; the packets themselves are
//! mpeg2ts's): one program with one H.264 stream, PAT and PMT at the start of every segment so
//! that each segment decodes alone, one PES per picture with PTS = DTS (constrained baseline
//! has no B-frames), the PCR on the first packet of each picture, and an access unit
//! delimiter in front of each picture as Apple's HLS authoring rules ask.

use mpeg2ts::es::{StreamId, StreamType};
use mpeg2ts::pes::PesHeader;
use mpeg2ts::time::{ClockReference, Timestamp};
use mpeg2ts::ts::payload::{Bytes, Pat, Pes, Pmt};
use mpeg2ts::ts::{
    AdaptationField, ContinuityCounter, EsInfo, Pid, ProgramAssociation,
    TransportScramblingControl, TsHeader, TsPacket, TsPacketWriter, TsPayload, VersionNumber,
    WriteTsPacket,
};

/// The PID of the program map table.
const PMT_PID: u16 = 0x1000;
/// The PID of the video stream (and of the PCR).
const VIDEO_PID: u16 = 0x0100;
/// Payload bytes of a TS packet after its 4-byte header.
const PACKET_PAYLOAD: usize = TsPacket::SIZE - 4;
/// An access unit delimiter NAL unit (primary_pic_type 7: any slice type).
const AUD: [u8; 6] = [0, 0, 0, 1, 0x09, 0xf0];
/// The PCR runs this far (100 ms, in 90 kHz ticks) ahead of the pictures' timestamps, so that
/// a decoder's clock never passes a picture before it has arrived.
const PCR_LEAD: u64 = 9_000;

/// Writes transport-stream packets for one H.264 stream.
#[derive(Debug)]
pub struct TsMuxer {
    pat: ContinuityCounter,
    pmt: ContinuityCounter,
    video: ContinuityCounter,
}

impl Default for TsMuxer {
    fn default() -> Self {
        Self::new()
    }
}

fn pid(n: u16) -> Pid {
    Pid::new(n).expect("a constant PID below 0x1fff")
}

fn header(pid_value: u16, counter: &mut ContinuityCounter) -> TsHeader {
    let header = TsHeader {
        transport_error_indicator: false,
        transport_priority: false,
        pid: pid(pid_value),
        transport_scrambling_control: TransportScramblingControl::NotScrambled,
        continuity_counter: *counter,
    };
    counter.increment();
    header
}

fn write(out: &mut Vec<u8>, packet: &TsPacket) -> Result<(), String> {
    TsPacketWriter::new(out)
        .write_ts_packet(packet)
        .map_err(|e| format!("MPEG-TS: {e}"))
}

impl TsMuxer {
    /// A muxer whose continuity counters start at 0.
    pub fn new() -> Self {
        Self {
            pat: ContinuityCounter::new(),
            pmt: ContinuityCounter::new(),
            video: ContinuityCounter::new(),
        }
    }

    /// Appends the PAT and the PMT (at the start of each segment).
    pub fn write_tables(&mut self, out: &mut Vec<u8>) -> Result<(), String> {
        let pat = TsPacket {
            header: header(0, &mut self.pat),
            adaptation_field: None,
            payload: Some(TsPayload::Pat(Pat {
                transport_stream_id: 1,
                version_number: VersionNumber::new(),
                table: vec![ProgramAssociation {
                    program_num: 1,
                    program_map_pid: pid(PMT_PID),
                }],
            })),
        };
        write(out, &pat)?;
        let pmt = TsPacket {
            header: header(PMT_PID, &mut self.pmt),
            adaptation_field: None,
            payload: Some(TsPayload::Pmt(Pmt {
                program_num: 1,
                pcr_pid: Some(pid(VIDEO_PID)),
                version_number: VersionNumber::new(),
                program_info: Vec::new(),
                es_info: vec![EsInfo {
                    stream_type: StreamType::H264,
                    elementary_pid: pid(VIDEO_PID),
                    descriptors: Vec::new(),
                }],
            })),
        };
        write(out, &pmt)
    }

    /// Appends one picture (Annex-B) presented at `pts` (90 kHz ticks, at least 0.1 s so
    /// that the PCR before it is not negative).
    pub fn write_picture(
        &mut self,
        out: &mut Vec<u8>,
        annexb: &[u8],
        keyframe: bool,
        pts: u64,
    ) -> Result<(), String> {
        let pts = pts.max(PCR_LEAD) % (Timestamp::MAX + 1);
        let timestamp = Timestamp::new(pts).map_err(|e| format!("MPEG-TS timestamp: {e}"))?;
        let starts_with_aud =
            annexb.len() > 4 && annexb[..4] == [0, 0, 0, 1] && annexb[4] & 0x1f == 9;
        let mut es = Vec::with_capacity(annexb.len() + AUD.len());
        if !starts_with_aud {
            es.extend_from_slice(&AUD);
        }
        es.extend_from_slice(annexb);
        let pes_header = PesHeader {
            stream_id: StreamId::new(StreamId::VIDEO_MIN),
            priority: false,
            data_alignment_indicator: true,
            copyright: false,
            original_or_copy: false,
            pts: Some(timestamp),
            dts: Some(timestamp),
            escr: None,
        };
        // The PES header: start code, stream id and length (6), flags and header length (3),
        // PTS and DTS (5 each).
        let pes_header_len = 6 + 3 + 5 + 5;
        let pes_len = pes_header_len - 6 + es.len();
        // 0: unbounded, which a video stream may use when the picture is over 64 KiB.
        let pes_packet_len = u16::try_from(pes_len).unwrap_or(0);
        let pcr =
            ClockReference::new((pts - PCR_LEAD) * 300).map_err(|e| format!("MPEG-TS PCR: {e}"))?;
        let adaptation = AdaptationField {
            discontinuity_indicator: false,
            random_access_indicator: keyframe,
            es_priority_indicator: false,
            pcr: Some(pcr),
            opcr: None,
            splice_countdown: None,
            transport_private_data: Vec::new(),
            extension: None,
        };
        // Adaptation field with a PCR: length, flags and 6 bytes.
        let first_room = PACKET_PAYLOAD - 8 - pes_header_len;
        let (first, mut rest) = es.split_at(first_room.min(es.len()));
        let first = TsPacket {
            header: header(VIDEO_PID, &mut self.video),
            adaptation_field: Some(adaptation),
            payload: Some(TsPayload::PesStart(Pes {
                header: pes_header,
                pes_packet_len,
                data: Bytes::new(first).map_err(|e| format!("MPEG-TS: {e}"))?,
            })),
        };
        write(out, &first)?;
        while !rest.is_empty() {
            let (chunk, tail) = rest.split_at(PACKET_PAYLOAD.min(rest.len()));
            rest = tail;
            let packet = TsPacket {
                header: header(VIDEO_PID, &mut self.video),
                adaptation_field: None,
                payload: Some(TsPayload::PesContinuation(
                    Bytes::new(chunk).map_err(|e| format!("MPEG-TS: {e}"))?,
                )),
            };
            write(out, &packet)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mpeg2ts::pes::{PesPacketReader, ReadPesPacket};
    use mpeg2ts::ts::{ReadTsPacket, TsPacketReader};

    /// Pictures of several sizes (one packet, several, over 64 KiB) come back from mpeg2ts's
    /// own reader byte for byte, with their timestamps, after the tables.
    #[test]
    fn pictures_read_back_whole() {
        let mut muxer = TsMuxer::new();
        let mut out = Vec::new();
        muxer.write_tables(&mut out).unwrap();
        let pictures: Vec<(Vec<u8>, u64)> = [10usize, 160, 161, 184, 1_000, 70_000]
            .iter()
            .enumerate()
            .map(|(i, &n)| {
                let mut p = vec![0, 0, 0, 1, if i == 0 { 0x65 } else { 0x41 }];
                p.extend((0..n).map(|k| (k * 7 + i) as u8 | 1));
                (p, 90_000 + i as u64 * 3_000)
            })
            .collect();
        for (i, (p, pts)) in pictures.iter().enumerate() {
            muxer.write_picture(&mut out, p, i == 0, *pts).unwrap();
        }
        assert_eq!(out.len() % TsPacket::SIZE, 0);
        // Every packet starts with the sync byte; the counters of the video PID run on.
        let mut reader = TsPacketReader::new(&out[..]);
        let mut counters = Vec::new();
        while let Some(packet) = reader.read_ts_packet().unwrap() {
            if packet.header.pid.as_u16() == VIDEO_PID {
                counters.push(packet.header.continuity_counter.as_u8());
            }
        }
        assert!(counters.windows(2).all(|w| w[1] == (w[0] + 1) % 16));
        let mut pes = PesPacketReader::new(TsPacketReader::new(&out[..]));
        for (p, pts) in &pictures {
            let packet = pes.read_pes_packet().unwrap().expect("a PES per picture");
            assert_eq!(packet.header.pts.map(|t| t.as_u64()), Some(*pts));
            assert_eq!(packet.header.dts.map(|t| t.as_u64()), Some(*pts));
            let mut want = AUD.to_vec();
            want.extend_from_slice(p);
            assert_eq!(packet.data, want);
        }
        assert!(pes.read_pes_packet().unwrap().is_none());
    }
}
