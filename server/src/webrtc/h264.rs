//! H.264 glue around OpenH264 (built from source): access units in, RGB out, and back.
//!
//! The encoder makes constrained-baseline streams (no B-frames, CAVLC, one slice group), which
//! every WebRTC endpoint decodes; the decoder takes whatever a browser or aiortc publishes in
//! the profiles OpenH264 decodes (baseline, constrained baseline, main and high without
//! interlace, 8-bit 4:2:0). [`H264Decoder::decode_tagged`] carries a tag through the decoder's
//! reordering, so that a file reader can put B-frame streams in presentation order by its
//! container's times.

use openh264::OpenH264API;
use openh264::decoder::{Decoder, DecoderConfig, Flush};
use openh264::encoder::{
    BitRate, Complexity, Encoder, EncoderConfig, FrameRate, FrameType, IntraFramePeriod, Level,
    Profile, QpRange, RateControlMode, UsageType,
};
use openh264::formats::{RgbSliceU8, YUVBuffer, YUVSource};

use super::TransportError;

/// A decoded picture, 8-bit RGB, rows packed.
#[derive(Debug, Clone)]
pub struct DecodedPicture {
    /// Width in pixels.
    pub width: usize,
    /// Height in pixels.
    pub height: usize,
    /// `width × height × 3` bytes.
    pub rgb: Vec<u8>,
}

/// A decoded 8-bit 4:2:0 picture, planes packed (no padding).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct YuvPicture {
    /// Width in pixels.
    pub width: usize,
    /// Height in pixels.
    pub height: usize,
    /// `width × height` luma samples.
    pub y: Vec<u8>,
    /// `⌈width/2⌉ × ⌈height/2⌉` Cb samples.
    pub u: Vec<u8>,
    /// `⌈width/2⌉ × ⌈height/2⌉` Cr samples.
    pub v: Vec<u8>,
}

impl YuvPicture {
    /// The planes one after the other (FFmpeg's `yuv420p` raw layout).
    pub fn to_i420(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.y.len() + self.u.len() + self.v.len());
        out.extend_from_slice(&self.y);
        out.extend_from_slice(&self.u);
        out.extend_from_slice(&self.v);
        out
    }
}

/// Decodes Annex-B access units (one picture each) to RGB.
pub struct H264Decoder {
    decoder: Decoder,
}

impl std::fmt::Debug for H264Decoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("H264Decoder").finish_non_exhaustive()
    }
}

impl H264Decoder {
    /// A decoder that outputs each picture as soon as its access unit is complete (no
    /// reordering delay: WebRTC streams carry no B-frames).
    pub fn new() -> Result<Self, TransportError> {
        let config = DecoderConfig::new().flush_after_decode(Flush::Flush);
        let decoder = Decoder::with_api_config(OpenH264API::from_source(), config)
            .map_err(|e| TransportError::Codec(format!("cannot create the H.264 decoder: {e}")))?;
        Ok(Self { decoder })
    }

    /// Decodes one access unit (Annex-B NAL units with start codes). `Ok(None)` when it held no
    /// picture (parameter sets alone). An error means the stream is damaged until the next
    /// keyframe.
    pub fn decode(&mut self, access_unit: &[u8]) -> Result<Option<DecodedPicture>, TransportError> {
        let picture = self
            .decoder
            .decode(access_unit)
            .map_err(|e| TransportError::Codec(format!("H.264 decode: {e}")))?;
        Ok(picture.map(|yuv| {
            let (width, height) = yuv.dimensions();
            let mut rgb = vec![0u8; width * height * 3];
            yuv.write_rgb8(&mut rgb);
            DecodedPicture { width, height, rgb }
        }))
    }
}

impl H264Decoder {
    /// Decodes one access unit (Annex-B) tagged with `tag`, and returns the picture the decoder
    /// hands out now, if any, with the tag of the access unit it was decoded from: with
    /// B-frames, pictures come out later than their access units went in, in an order OpenH264
    /// guesses from picture order counts. The caller orders them by their tags.
    pub fn decode_tagged(
        &mut self,
        access_unit: &[u8],
        tag: u64,
    ) -> Result<Option<(u64, YuvPicture)>, TransportError> {
        let len = i32::try_from(access_unit.len())
            .map_err(|_| TransportError::Codec("H.264 decode: access unit over 2 GiB".into()))?;
        let mut dst = [std::ptr::null_mut::<u8>(); 3];
        let mut info = openh264_sys2::SBufferInfo {
            uiInBsTimeStamp: tag,
            ..Default::default()
        };
        // SAFETY: the decoder is initialised (Decoder::with_api_config); the source pointer and
        // length describe `access_unit`, which OpenH264 only reads during the call; `dst` and
        // `info` are valid for writes.
        let state = unsafe {
            self.decoder.raw_api().decode_frame_no_delay(
                access_unit.as_ptr(),
                len,
                dst.as_mut_ptr(),
                &raw mut info,
            )
        };
        check_state(state)?;
        // SAFETY: `dst` and `info` are what the call above filled in.
        unsafe { copy_picture(&dst, &info) }
    }

    /// After the last access unit: the next picture still held for reordering, if any.
    pub fn flush_tagged(&mut self) -> Result<Option<(u64, YuvPicture)>, TransportError> {
        let mut remaining: openh264_sys2::DECODER_OPTION = 0;
        // SAFETY: the decoder is initialised; the option is an int the call writes.
        unsafe {
            self.decoder.raw_api().get_option(
                openh264_sys2::DECODER_OPTION_NUM_OF_FRAMES_REMAINING_IN_BUFFER,
                (&raw mut remaining).cast(),
            );
        }
        if remaining <= 0 {
            return Ok(None);
        }
        let mut dst = [std::ptr::null_mut::<u8>(); 3];
        let mut info = openh264_sys2::SBufferInfo::default();
        // SAFETY: as in decode_tagged.
        let state = unsafe {
            self.decoder
                .raw_api()
                .flush_frame(dst.as_mut_ptr(), &raw mut info)
        };
        check_state(state)?;
        // SAFETY: `dst` and `info` are what the call above filled in.
        unsafe { copy_picture(&dst, &info) }
    }
}

/// An OpenH264 decoding state as an error, naming its flags; 0 (and "frame pending") are fine.
fn check_state(state: openh264_sys2::DECODING_STATE) -> Result<(), TransportError> {
    let flags = state & !openh264_sys2::dsFramePending;
    if flags == 0 {
        return Ok(());
    }
    let names = [
        (openh264_sys2::dsRefLost, "reference lost"),
        (openh264_sys2::dsBitstreamError, "bitstream error"),
        (openh264_sys2::dsDepLayerLost, "dependent layer lost"),
        (openh264_sys2::dsNoParamSets, "no parameter sets"),
        (openh264_sys2::dsDataErrorConcealed, "data error concealed"),
        (openh264_sys2::dsRefListNullPtrs, "reference list broken"),
        (openh264_sys2::dsInvalidArgument, "invalid argument"),
        (
            openh264_sys2::dsInitialOptExpected,
            "decoder not initialised",
        ),
        (openh264_sys2::dsOutOfMemory, "out of memory"),
        (openh264_sys2::dsDstBufNeedExpan, "output buffer too small"),
    ];
    let said: Vec<&str> = names
        .iter()
        .filter(|(bit, _)| flags & bit != 0)
        .map(|(_, name)| *name)
        .collect();
    Err(TransportError::Codec(format!(
        "OpenH264 reports {} (state {state:#x})",
        if said.is_empty() {
            "an error".to_owned()
        } else {
            said.join(", ")
        }
    )))
}

/// Copies the picture OpenH264 handed out (if `info` says it did) out of the decoder's buffers.
///
/// # Safety
///
/// `dst` and `info` must be what a decode or flush call of the decoder just filled in, with no
/// call to the decoder since.
unsafe fn copy_picture(
    dst: &[*mut u8; 3],
    info: &openh264_sys2::SBufferInfo,
) -> Result<Option<(u64, YuvPicture)>, TransportError> {
    if info.iBufferStatus != 1 || dst.iter().any(|p| p.is_null()) {
        return Ok(None);
    }
    // SAFETY: iBufferStatus 1 means the union holds the system-memory buffer description.
    let buffer = unsafe { info.UsrData.sSystemBuffer };
    if buffer.iFormat != openh264_sys2::videoFormatI420 {
        return Err(TransportError::Codec(format!(
            "H.264 decode: output format {} (I420 expected)",
            buffer.iFormat
        )));
    }
    let (width, height) = (
        buffer.iWidth.max(0) as usize,
        buffer.iHeight.max(0) as usize,
    );
    let (y_stride, c_stride) = (
        buffer.iStride[0].max(0) as usize,
        buffer.iStride[1].max(0) as usize,
    );
    let (cw, ch) = (width.div_ceil(2), height.div_ceil(2));
    if width == 0 || height == 0 || y_stride < width || c_stride < cw {
        return Err(TransportError::Codec(format!(
            "H.264 decode: a {width}x{height} picture with strides {y_stride}/{c_stride}"
        )));
    }
    let plane = |p: *mut u8, w: usize, h: usize, stride: usize| {
        let mut out = Vec::with_capacity(w * h);
        for row in 0..h {
            // SAFETY: OpenH264's planes hold `h` rows of `stride` bytes, each row's first `w`
            // pixels visible; they stay valid until the next call to the decoder.
            out.extend_from_slice(unsafe { std::slice::from_raw_parts(p.add(row * stride), w) });
        }
        out
    };
    let picture = YuvPicture {
        width,
        height,
        y: plane(dst[0], width, height, y_stride),
        u: plane(dst[1], cw, ch, c_stride),
        v: plane(dst[2], cw, ch, c_stride),
    };
    Ok(Some((info.uiOutYuvTimeStamp, picture)))
}

/// Encoder settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EncoderSettings {
    /// Target bit rate in bits per second.
    pub bitrate_bps: u32,
    /// Nominal frame rate (rate control only; frames are encoded as they come).
    pub max_fps: f32,
    /// Frames between forced keyframes; 0: only when asked (PLI) and on the first frame.
    pub keyframe_interval: u32,
}

impl Default for EncoderSettings {
    fn default() -> Self {
        Self {
            bitrate_bps: 4_000_000,
            max_fps: 30.0,
            keyframe_interval: 120,
        }
    }
}

/// One encoded picture.
#[derive(Debug, Clone)]
pub struct EncodedPicture {
    /// Annex-B NAL units (start codes included); a keyframe carries SPS and PPS first.
    pub data: Vec<u8>,
    /// An IDR picture: a decoder can start here.
    pub keyframe: bool,
}

/// Encodes RGB pictures to constrained-baseline H.264. The encoder is (re)created on the first
/// picture and whenever the size changes.
pub struct H264Encoder {
    settings: EncoderSettings,
    encoder: Option<(Encoder, usize, usize)>,
    yuv: Option<YUVBuffer>,
    keyframe_requested: bool,
}

impl std::fmt::Debug for H264Encoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("H264Encoder")
            .field("settings", &self.settings)
            .field("size", &self.encoder.as_ref().map(|(_, w, h)| (*w, *h)))
            .finish_non_exhaustive()
    }
}

impl H264Encoder {
    /// An encoder with these settings (nothing is allocated before the first picture).
    pub fn new(settings: EncoderSettings) -> Self {
        Self {
            settings,
            encoder: None,
            yuv: None,
            keyframe_requested: true,
        }
    }

    /// Makes the next picture a keyframe (a viewer joined, or sent a PLI).
    pub fn request_keyframe(&mut self) {
        self.keyframe_requested = true;
    }

    fn config(&self) -> EncoderConfig {
        EncoderConfig::new()
            .bitrate(BitRate::from_bps(self.settings.bitrate_bps))
            .max_frame_rate(FrameRate::from_hz(self.settings.max_fps))
            // Every output frame must reach the viewers: the rate controller may not skip any.
            .skip_frames(false)
            .usage_type(UsageType::CameraVideoRealTime)
            .rate_control_mode(RateControlMode::Bitrate)
            .profile(Profile::Baseline)
            .level(Level::Level_3_1)
            .complexity(Complexity::Low)
            .qp(QpRange::new(10, 40))
            .scene_change_detect(false)
            .background_detection(false)
            .intra_frame_period(IntraFramePeriod::from_num_frames(
                self.settings.keyframe_interval,
            ))
    }

    /// Encodes one packed RGB8 picture. Width and height must be even (4:2:0 chroma).
    pub fn encode(
        &mut self,
        rgb: &[u8],
        width: usize,
        height: usize,
    ) -> Result<EncodedPicture, TransportError> {
        if width == 0 || height == 0 || !width.is_multiple_of(2) || !height.is_multiple_of(2) {
            return Err(TransportError::Codec(format!(
                "H.264 encode: {width}x{height} is not a positive even size"
            )));
        }
        if rgb.len() != width * height * 3 {
            return Err(TransportError::Codec(format!(
                "H.264 encode: {width}x{height} RGB needs {} bytes, got {}",
                width * height * 3,
                rgb.len()
            )));
        }
        if !matches!(&self.encoder, Some((_, w, h)) if *w == width && *h == height) {
            let encoder = Encoder::with_api_config(OpenH264API::from_source(), self.config())
                .map_err(|e| {
                    TransportError::Codec(format!("cannot create the H.264 encoder: {e}"))
                })?;
            self.encoder = Some((encoder, width, height));
            self.yuv = None;
            self.keyframe_requested = true;
        }
        let source = RgbSliceU8::new(rgb, (width, height));
        let yuv = match self.yuv.as_mut() {
            Some(buffer) => {
                buffer.read_rgb8(source);
                buffer
            }
            None => self.yuv.insert(YUVBuffer::from_rgb8_source(source)),
        };
        let Some((encoder, _, _)) = self.encoder.as_mut() else {
            return Err(TransportError::Codec("H.264 encoder missing".into()));
        };
        if self.keyframe_requested {
            encoder.force_intra_frame();
            self.keyframe_requested = false;
        }
        let stream = encoder
            .encode(&*yuv)
            .map_err(|e| TransportError::Codec(format!("H.264 encode: {e}")))?;
        let keyframe = matches!(stream.frame_type(), FrameType::IDR);
        Ok(EncodedPicture {
            data: stream.to_vec(),
            keyframe,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A smooth test picture (gradients and a disc), easy for H.264 at moderate rates.
    fn picture(width: usize, height: usize, shift: usize) -> Vec<u8> {
        let mut rgb = Vec::with_capacity(width * height * 3);
        for y in 0..height {
            for x in 0..width {
                let dx = x as f32 - width as f32 / 2.0;
                let dy = y as f32 - height as f32 / 2.0;
                let disc = (dx * dx + dy * dy).sqrt() < width as f32 / 4.0;
                rgb.push(((x + shift) * 255 / width) as u8);
                rgb.push((y * 255 / height) as u8);
                rgb.push(if disc { 220 } else { 40 });
            }
        }
        rgb
    }

    #[test]
    fn round_trip_is_close_and_keyframes_come_when_asked() {
        let (w, h) = (64, 48);
        let mut encoder = H264Encoder::new(EncoderSettings::default());
        let mut decoder = H264Decoder::new().expect("decoder");
        let mut kinds = Vec::new();
        for i in 0..6 {
            if i == 4 {
                encoder.request_keyframe();
            }
            let input = picture(w, h, i);
            let encoded = encoder.encode(&input, w, h).expect("encode");
            kinds.push(encoded.keyframe);
            let decoded = decoder
                .decode(&encoded.data)
                .expect("decode")
                .expect("a picture per access unit");
            assert_eq!((decoded.width, decoded.height), (w, h));
            let mean = input
                .iter()
                .zip(&decoded.rgb)
                .map(|(a, b)| (*a as f64 - *b as f64).abs())
                .sum::<f64>()
                / input.len() as f64;
            // 4:2:0 chroma alone costs ~3 levels on the disc's edge in this picture.
            assert!(mean < 6.0, "frame {i}: mean abs error {mean:.2} levels");
        }
        assert_eq!(kinds, [true, false, false, false, true, false]);
    }

    #[test]
    fn odd_sizes_and_short_buffers_are_refused() {
        let mut encoder = H264Encoder::new(EncoderSettings::default());
        assert!(encoder.encode(&[0; 63 * 64 * 3], 63, 64).is_err());
        assert!(encoder.encode(&[0; 10], 64, 64).is_err());
    }

    #[test]
    fn garbage_neither_panics_nor_breaks_the_decoder() {
        let (w, h) = (64, 48);
        let mut encoder = H264Encoder::new(EncoderSettings::default());
        let mut decoder = H264Decoder::new().expect("decoder");
        let garbage: Vec<u8> = (0..500u32).map(|i| (i * 7919 % 251) as u8).collect();
        let mut with_start = vec![0, 0, 0, 1, 0x65];
        with_start.extend_from_slice(&garbage);
        // Whatever it makes of garbage (an error or no picture), it must not make a picture.
        for junk in [&garbage, &with_start] {
            assert!(
                decoder.decode(junk).map_or(true, |p| p.is_none()),
                "garbage decoded to a picture"
            );
        }
        // The same decoder still decodes a real stream afterwards, from its next keyframe.
        encoder.request_keyframe();
        let input = picture(w, h, 0);
        let encoded = encoder.encode(&input, w, h).expect("encode");
        assert!(encoded.keyframe);
        let decoded = decoder
            .decode(&encoded.data)
            .expect("decode after garbage")
            .expect("a picture after garbage");
        assert_eq!((decoded.width, decoded.height), (w, h));
        let mean = input
            .iter()
            .zip(&decoded.rgb)
            .map(|(a, b)| (*a as f64 - *b as f64).abs())
            .sum::<f64>()
            / input.len() as f64;
        assert!(mean < 6.0, "mean abs error {mean:.2} levels after garbage");
    }
}
