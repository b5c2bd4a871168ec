//! H.264 in MP4: the decoder configuration record (`avcC`), the sequence parameter set's
//! values that decide whether OpenH264 can decode a stream (profile, chroma format, bit depth,
//! interlace) and how to show it (size, colour matrix and range), and sample data between
//! MP4's length-prefixed NAL units and the Annex-B byte stream OpenH264 reads.

use super::bmff::Fields;
use super::limits::MAX_PARAMETER_SETS;
use super::{Result, VideoFileError};

/// An `avcC` record (ISO/IEC 14496-15 §5.3.3.1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AvcConfig {
    /// `AVCProfileIndication` (the SPS's profile_idc).
    pub profile: u8,
    /// `profile_compatibility` (the SPS's constraint flags).
    pub compatibility: u8,
    /// `AVCLevelIndication`.
    pub level: u8,
    /// Bytes of each NAL unit's length prefix in the samples: 1, 2 or 4.
    pub length_size: u8,
    /// Sequence parameter sets (NAL units, header byte included).
    pub sps: Vec<Vec<u8>>,
    /// Picture parameter sets.
    pub pps: Vec<Vec<u8>>,
}

fn parameter_sets(f: &mut Fields<'_>, count: usize) -> Result<Vec<Vec<u8>>> {
    if count > MAX_PARAMETER_SETS {
        return Err(VideoFileError::TooLarge(format!(
            "avcC holds {count} parameter sets of a kind; at most {MAX_PARAMETER_SETS} are read"
        )));
    }
    let mut out = Vec::with_capacity(count);
    for _ in 0..count {
        let len = f.u16()? as usize;
        out.push(f.bytes(len)?.to_vec());
    }
    Ok(out)
}

impl AvcConfig {
    /// Parses an `avcC` box's body.
    pub fn parse(body: &[u8]) -> Result<Self> {
        let mut f = Fields::new(body, "avcC");
        let version = f.u8()?;
        if version != 1 {
            return Err(VideoFileError::Malformed(format!(
                "avcC configuration version {version} (1 expected)"
            )));
        }
        let profile = f.u8()?;
        let compatibility = f.u8()?;
        let level = f.u8()?;
        let length_size = (f.u8()? & 3) + 1;
        if length_size == 3 {
            return Err(VideoFileError::Malformed(
                "avcC gives NAL unit lengths of 3 bytes (1, 2 or 4)".into(),
            ));
        }
        let sps_count = (f.u8()? & 31) as usize;
        let sps = parameter_sets(&mut f, sps_count)?;
        let pps_count = f.u8()? as usize;
        let pps = parameter_sets(&mut f, pps_count)?;
        // The High profiles' extension (chroma format, bit depths) is read from the SPS itself.
        Ok(Self {
            profile,
            compatibility,
            level,
            length_size,
            sps,
            pps,
        })
    }

    /// A record for a stream whose parameter sets are `sps` and `pps` (4-byte lengths).
    pub fn from_parameter_sets(sps: Vec<Vec<u8>>, pps: Vec<Vec<u8>>) -> Result<Self> {
        let first = sps
            .first()
            .filter(|s| s.len() >= 4)
            .ok_or_else(|| VideoFileError::Encode("the encoder made no SPS".into()))?;
        Ok(Self {
            profile: first[1],
            compatibility: first[2],
            level: first[3],
            length_size: 4,
            sps,
            pps,
        })
    }

    /// The record's bytes (an `avcC` box's body).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = vec![
            1,
            self.profile,
            self.compatibility,
            self.level,
            0xfc | (self.length_size - 1),
            0xe0 | (self.sps.len() as u8 & 31),
        ];
        for set in &self.sps {
            out.extend_from_slice(&(set.len() as u16).to_be_bytes());
            out.extend_from_slice(set);
        }
        out.push(self.pps.len() as u8);
        for set in &self.pps {
            out.extend_from_slice(&(set.len() as u16).to_be_bytes());
            out.extend_from_slice(set);
        }
        out
    }

    /// The parameter sets as Annex-B (start codes), to put before the first picture.
    pub fn annex_b_parameter_sets(&self) -> Vec<u8> {
        let mut out = Vec::new();
        for set in self.sps.iter().chain(&self.pps) {
            out.extend_from_slice(&[0, 0, 0, 1]);
            out.extend_from_slice(set);
        }
        out
    }
}

/// Converts one sample's length-prefixed NAL units to Annex-B, appending to `out`.
pub fn sample_to_annex_b(sample: &[u8], length_size: u8, out: &mut Vec<u8>) -> Result<()> {
    let n = length_size as usize;
    let mut pos = 0usize;
    while pos < sample.len() {
        if sample.len() - pos < n {
            return Err(VideoFileError::Decode(format!(
                "a sample ends inside a NAL unit's {n}-byte length"
            )));
        }
        let len = sample[pos..pos + n]
            .iter()
            .fold(0usize, |acc, &b| (acc << 8) | b as usize);
        pos += n;
        if len > sample.len() - pos {
            return Err(VideoFileError::Decode(format!(
                "a NAL unit of {len} bytes runs past the end of its sample ({} bytes left)",
                sample.len() - pos
            )));
        }
        out.extend_from_slice(&[0, 0, 0, 1]);
        out.extend_from_slice(&sample[pos..pos + len]);
        pos += len;
    }
    Ok(())
}

/// The NAL units of an Annex-B byte stream (start codes and trailing zeros removed).
pub fn annex_b_units(data: &[u8]) -> Vec<&[u8]> {
    let mut starts = Vec::new();
    let mut i = 0;
    while i + 3 <= data.len() {
        if data[i] == 0 && data[i + 1] == 0 && data[i + 2] == 1 {
            starts.push(i + 3);
            i += 3;
        } else {
            i += 1;
        }
    }
    let mut units = Vec::with_capacity(starts.len());
    for (k, &start) in starts.iter().enumerate() {
        let mut end = starts.get(k + 1).map_or(data.len(), |&next| next - 3);
        while end > start && data[end - 1] == 0 {
            end -= 1;
        }
        if end > start {
            units.push(&data[start..end]);
        }
    }
    units
}

/// The H.264 profile's name for a profile_idc and its constraint flags.
pub fn profile_name(profile_idc: u8, constraints: u8) -> String {
    let name = match profile_idc {
        66 if constraints & 0x40 != 0 => "Constrained Baseline",
        66 => "Baseline",
        77 => "Main",
        88 => "Extended",
        100 => "High",
        110 if constraints & 0x10 != 0 => "High 10 Intra",
        110 => "High 10",
        122 if constraints & 0x10 != 0 => "High 4:2:2 Intra",
        122 => "High 4:2:2",
        244 if constraints & 0x10 != 0 => "High 4:4:4 Intra",
        244 => "High 4:4:4 Predictive",
        44 => "CAVLC 4:4:4 Intra",
        83 => "Scalable Baseline",
        86 => "Scalable High",
        118 => "Multiview High",
        128 => "Stereo High",
        134 => "MFC High",
        135 => "MFC Depth High",
        138 => "Multiview Depth High",
        139 => "Enhanced Multiview Depth High",
        _ => return format!("profile_idc {profile_idc}"),
    };
    format!("{name} profile (profile_idc {profile_idc})")
}

/// How luma and chroma become RGB (the SPS's VUI colour description).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Matrix {
    /// ITU-R BT.601 (also what an untagged stream is taken to be, as FFmpeg takes it).
    Bt601,
    /// ITU-R BT.709.
    Bt709,
    /// ITU-R BT.2020 non-constant luminance.
    Bt2020,
}

/// The values of a sequence parameter set this module uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpsInfo {
    /// profile_idc.
    pub profile_idc: u8,
    /// constraint_set0..5 flags (the byte after profile_idc).
    pub constraints: u8,
    /// level_idc.
    pub level_idc: u8,
    /// 0 monochrome, 1 4:2:0, 2 4:2:2, 3 4:4:4.
    pub chroma_format_idc: u32,
    /// Luma bit depth.
    pub bit_depth_luma: u32,
    /// Chroma bit depth.
    pub bit_depth_chroma: u32,
    /// Progressive frames only (no fields, no MBAFF).
    pub frame_mbs_only: bool,
    /// Displayed width (after cropping).
    pub width: u32,
    /// Displayed height (after cropping).
    pub height: u32,
    /// Colour matrix.
    pub matrix: Matrix,
    /// Full-range (0–255) samples rather than video range (16–235).
    pub full_range: bool,
}

impl SpsInfo {
    /// `Err(UnsupportedH264)` naming the profile or format when OpenH264 cannot decode it.
    pub fn check_decodable(&self) -> Result<()> {
        let profile = profile_name(self.profile_idc, self.constraints);
        if !matches!(self.profile_idc, 66 | 77 | 100) {
            return Err(VideoFileError::UnsupportedH264(format!("H.264 {profile}")));
        }
        if self.chroma_format_idc != 1 {
            let format = match self.chroma_format_idc {
                0 => "monochrome (4:0:0)",
                2 => "4:2:2",
                _ => "4:4:4",
            };
            return Err(VideoFileError::UnsupportedH264(format!(
                "H.264 {profile} with {format} chroma"
            )));
        }
        if self.bit_depth_luma != 8 || self.bit_depth_chroma != 8 {
            return Err(VideoFileError::UnsupportedH264(format!(
                "{}-bit H.264 ({profile})",
                self.bit_depth_luma.max(self.bit_depth_chroma)
            )));
        }
        if !self.frame_mbs_only {
            return Err(VideoFileError::UnsupportedH264(format!(
                "interlaced H.264 ({profile})"
            )));
        }
        Ok(())
    }
}

/// Reads bits of an RBSP (emulation prevention bytes already removed), MSB first.
struct Bits<'a> {
    data: &'a [u8],
    pos: usize,
}

impl Bits<'_> {
    fn bit(&mut self) -> Result<u32> {
        let byte = self.data.get(self.pos / 8).ok_or_else(|| {
            VideoFileError::Malformed("the sequence parameter set is cut off".into())
        })?;
        let bit = (byte >> (7 - self.pos % 8)) & 1;
        self.pos += 1;
        Ok(u32::from(bit))
    }

    fn bits(&mut self, n: u32) -> Result<u32> {
        let mut v = 0;
        for _ in 0..n {
            v = (v << 1) | self.bit()?;
        }
        Ok(v)
    }

    /// Exp-Golomb ue(v), at most 32 bits of value.
    fn ue(&mut self) -> Result<u32> {
        let mut zeros = 0;
        while self.bit()? == 0 {
            zeros += 1;
            if zeros > 31 {
                return Err(VideoFileError::Malformed(
                    "an Exp-Golomb code in the sequence parameter set is too long".into(),
                ));
            }
        }
        let rest = self.bits(zeros)?;
        Ok(((1u64 << zeros) - 1 + u64::from(rest)) as u32)
    }

    fn se(&mut self) -> Result<i32> {
        let k = self.ue()?;
        Ok(if k % 2 == 1 {
            k.div_ceil(2) as i32
        } else {
            -((k / 2) as i32)
        })
    }
}

/// The RBSP of a NAL unit: its payload without emulation prevention bytes (00 00 03).
fn rbsp(nal: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(nal.len());
    let mut zeros = 0;
    for &b in nal {
        if zeros >= 2 && b == 3 {
            zeros = 0;
            continue;
        }
        zeros = if b == 0 { zeros + 1 } else { 0 };
        out.push(b);
    }
    out
}

fn skip_scaling_list(bits: &mut Bits<'_>, size: usize) -> Result<()> {
    let (mut last, mut next) = (8i32, 8i32);
    for _ in 0..size {
        if next != 0 {
            let delta = bits.se()?;
            if !(-128..=127).contains(&delta) {
                return Err(VideoFileError::Malformed(
                    "a scaling list delta in the sequence parameter set is out of range".into(),
                ));
            }
            next = (last + delta + 256) % 256;
        }
        if next != 0 {
            last = next;
        }
    }
    Ok(())
}

/// Parses a sequence parameter set NAL unit (header byte included).
pub fn parse_sps(nal: &[u8]) -> Result<SpsInfo> {
    let bad = |what: &str| VideoFileError::Malformed(format!("sequence parameter set: {what}"));
    if nal.first().map(|b| b & 31) != Some(7) {
        return Err(bad("not an SPS NAL unit"));
    }
    let data = rbsp(&nal[1..]);
    let mut b = Bits {
        data: &data,
        pos: 0,
    };
    let profile_idc = b.bits(8)? as u8;
    let constraints = b.bits(8)? as u8;
    let level_idc = b.bits(8)? as u8;
    b.ue()?; // seq_parameter_set_id
    let (mut chroma_format_idc, mut bit_depth_luma, mut bit_depth_chroma) = (1, 8, 8);
    let mut separate_colour_plane = false;
    if matches!(
        profile_idc,
        100 | 110 | 122 | 244 | 44 | 83 | 86 | 118 | 128 | 138 | 139 | 134 | 135
    ) {
        chroma_format_idc = b.ue()?;
        if chroma_format_idc > 3 {
            return Err(bad("chroma_format_idc above 3"));
        }
        if chroma_format_idc == 3 {
            separate_colour_plane = b.bit()? == 1;
        }
        bit_depth_luma = b.ue()?.saturating_add(8);
        bit_depth_chroma = b.ue()?.saturating_add(8);
        b.bit()?; // qpprime_y_zero_transform_bypass_flag
        if b.bit()? == 1 {
            let lists = if chroma_format_idc == 3 { 12 } else { 8 };
            for i in 0..lists {
                if b.bit()? == 1 {
                    skip_scaling_list(&mut b, if i < 6 { 16 } else { 64 })?;
                }
            }
        }
    }
    b.ue()?; // log2_max_frame_num_minus4
    match b.ue()? {
        0 => {
            b.ue()?; // log2_max_pic_order_cnt_lsb_minus4
        }
        1 => {
            b.bit()?;
            b.se()?;
            b.se()?;
            let cycle = b.ue()?;
            if cycle > 255 {
                return Err(bad("num_ref_frames_in_pic_order_cnt_cycle above 255"));
            }
            for _ in 0..cycle {
                b.se()?;
            }
        }
        2 => {}
        _ => return Err(bad("pic_order_cnt_type above 2")),
    }
    b.ue()?; // max_num_ref_frames
    b.bit()?; // gaps_in_frame_num_value_allowed_flag
    let width_mbs = u64::from(b.ue()?) + 1;
    let height_units = u64::from(b.ue()?) + 1;
    let frame_mbs_only = b.bit()? == 1;
    if !frame_mbs_only {
        b.bit()?; // mb_adaptive_frame_field_flag
    }
    b.bit()?; // direct_8x8_inference_flag
    let height_mbs = height_units * if frame_mbs_only { 1 } else { 2 };
    let (mut width, mut height) = (width_mbs * 16, height_mbs * 16);
    if b.bit()? == 1 {
        let (left, right, top, bottom) = (b.ue()?, b.ue()?, b.ue()?, b.ue()?);
        let array_type = if separate_colour_plane {
            0
        } else {
            chroma_format_idc
        };
        let (sub_w, sub_h) = match array_type {
            1 => (2, 2),
            2 => (2, 1),
            _ => (1, 1),
        };
        let unit_y = sub_h * if frame_mbs_only { 1 } else { 2 };
        let crop_w = (u64::from(left) + u64::from(right)) * sub_w;
        let crop_h = (u64::from(top) + u64::from(bottom)) * unit_y;
        if crop_w >= width || crop_h >= height {
            return Err(bad("the cropping window is empty"));
        }
        width -= crop_w;
        height -= crop_h;
    }
    if width > 16384 || height > 16384 {
        return Err(bad("a picture larger than 16384 pixels a side"));
    }
    let (mut matrix, mut full_range) = (Matrix::Bt601, false);
    // VUI: only as far as the colour description; a VUI cut short leaves the defaults.
    let mut vui = || -> Result<()> {
        if b.bit()? == 0 {
            return Ok(());
        }
        if b.bit()? == 1 {
            // aspect_ratio_info_present_flag
            if b.bits(8)? == 255 {
                b.bits(32)?;
            }
        }
        if b.bit()? == 1 {
            b.bit()?; // overscan_appropriate_flag
        }
        if b.bit()? == 1 {
            b.bits(3)?; // video_format
            full_range = b.bit()? == 1;
            if b.bit()? == 1 {
                b.bits(16)?; // colour_primaries, transfer_characteristics
                matrix = match b.bits(8)? {
                    1 => Matrix::Bt709,
                    9 | 10 => Matrix::Bt2020,
                    _ => Matrix::Bt601,
                };
            }
        }
        Ok(())
    };
    let _ = vui();
    Ok(SpsInfo {
        profile_idc,
        constraints,
        level_idc,
        chroma_format_idc,
        bit_depth_luma,
        bit_depth_chroma,
        frame_mbs_only,
        width: width as u32,
        height: height as u32,
        matrix,
        full_range,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// libx264's SPS of a 512×512 High-profile stream (from examples/clip.mp4's avcC).
    const HIGH_SPS: [u8; 25] = [
        0x67, 0x64, 0x00, 0x1e, 0xac, 0xd9, 0x40, 0x80, 0x10, 0x6c, 0x04, 0x40, 0x00, 0x00, 0x03,
        0x00, 0x40, 0x00, 0x00, 0x0c, 0x03, 0xc5, 0x8b, 0x65, 0x80,
    ];

    #[test]
    fn reads_libx264_high_profile_sps() {
        let sps = parse_sps(&HIGH_SPS).expect("sps");
        assert_eq!((sps.profile_idc, sps.width, sps.height), (100, 512, 512));
        assert_eq!((sps.chroma_format_idc, sps.bit_depth_luma), (1, 8));
        assert!(sps.frame_mbs_only);
        assert_eq!(sps.matrix, Matrix::Bt601);
        sps.check_decodable().expect("decodable");
        assert_eq!(profile_name(100, 0), "High profile (profile_idc 100)");
    }

    #[test]
    fn refuses_what_openh264_cannot_decode() {
        let mut sps = parse_sps(&HIGH_SPS).expect("sps");
        sps.profile_idc = 244;
        sps.chroma_format_idc = 3;
        let message = sps.check_decodable().expect_err("4:4:4").to_string();
        assert!(
            message.contains("High 4:4:4 Predictive profile"),
            "{message}"
        );
        let mut sps = parse_sps(&HIGH_SPS).expect("sps");
        sps.frame_mbs_only = false;
        let message = sps.check_decodable().expect_err("interlaced").to_string();
        assert!(message.contains("interlaced"), "{message}");
    }

    #[test]
    fn avcc_round_trips_and_converts_samples() {
        let config =
            AvcConfig::from_parameter_sets(vec![HIGH_SPS.to_vec()], vec![vec![0x68, 0xeb]])
                .expect("config");
        let parsed = AvcConfig::parse(&config.to_bytes()).expect("parse");
        assert_eq!(parsed, config);
        let mut out = Vec::new();
        sample_to_annex_b(&[0, 0, 0, 2, 0x65, 0x88, 0, 0, 0, 1, 0x06], 4, &mut out).expect("ok");
        assert_eq!(out, [0, 0, 0, 1, 0x65, 0x88, 0, 0, 0, 1, 0x06]);
        assert_eq!(annex_b_units(&out), [&[0x65, 0x88][..], &[0x06][..]]);
        // A length past the sample's end, a cut-off length.
        assert!(sample_to_annex_b(&[0, 0, 0, 9, 0x65], 4, &mut out).is_err());
        assert!(sample_to_annex_b(&[0, 0], 4, &mut out).is_err());
        // Garbage records neither panic nor pass.
        for len in 0..config.to_bytes().len() {
            let _ = AvcConfig::parse(&config.to_bytes()[..len]);
        }
        assert!(AvcConfig::parse(&[1, 100, 0, 30, 0xfe, 0xe1, 0xff, 0xff]).is_err());
    }

    #[test]
    fn garbage_sps_is_an_error_not_a_panic() {
        for n in 0..HIGH_SPS.len() {
            let _ = parse_sps(&HIGH_SPS[..n]);
        }
        let mut state = 0x1234_5678u32;
        for _ in 0..2000 {
            let mut nal = HIGH_SPS.to_vec();
            for _ in 0..3 {
                state = state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                let i = 1 + (state >> 8) as usize % (nal.len() - 1);
                nal[i] ^= 1 << (state % 8);
            }
            let _ = parse_sps(&nal);
        }
        assert!(parse_sps(&[0x67, 0xff, 0xff, 0xff, 0, 0, 0, 0, 0]).is_err());
    }
}
