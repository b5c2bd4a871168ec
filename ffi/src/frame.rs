//! Frames in and outputs out: the C structs and their conversion to and from core's types.
//! Only what is needed to form safe slices is checked here; the rules are core's.

use std::ffi::{CStr, c_char};

use sdstream_core::frame::frame_len;
use sdstream_core::{Frame, Image, Output, PixelFormat};

use crate::error::{Failure, SdsStatus};

/// Pixel layout of a frame: one of the `SDS_PIXEL_FORMAT_*` values. A plain integer (not a C
/// enum) so that any value a caller passes is defined behaviour; unknown values are rejected
/// with `SDS_ERR_INVALID_ARGUMENT`.
pub type SdsPixelFormat = u32;

/// 3 bytes per pixel: red, green, blue.
pub const SDS_PIXEL_FORMAT_RGB8: SdsPixelFormat = 0;
/// 4 bytes per pixel: red, green, blue, alpha (ignored on input, 255 on output).
pub const SDS_PIXEL_FORMAT_RGBA8: SdsPixelFormat = 1;
/// 4 bytes per pixel: blue, green, red, alpha (ignored on input, 255 on output).
pub const SDS_PIXEL_FORMAT_BGRA8: SdsPixelFormat = 2;
/// 12 bytes per pixel: red, green, blue as native-endian `float` in [0, 1].
pub const SDS_PIXEL_FORMAT_RGBF32: SdsPixelFormat = 3;

pub(crate) fn pixel_format(function: &str, value: SdsPixelFormat) -> Result<PixelFormat, Failure> {
    match value {
        SDS_PIXEL_FORMAT_RGB8 => Ok(PixelFormat::Rgb8),
        SDS_PIXEL_FORMAT_RGBA8 => Ok(PixelFormat::Rgba8),
        SDS_PIXEL_FORMAT_BGRA8 => Ok(PixelFormat::Bgra8),
        SDS_PIXEL_FORMAT_RGBF32 => Ok(PixelFormat::RgbF32),
        other => Err(Failure::new(
            SdsStatus::SDS_ERR_INVALID_ARGUMENT,
            format!(
                "{function}: unknown pixel format {other} (RGB8 = 0, RGBA8 = 1, BGRA8 = 2, \
                 RGBF32 = 3)"
            ),
        )),
    }
}

fn format_code(format: PixelFormat) -> SdsPixelFormat {
    match format {
        PixelFormat::Rgb8 => SDS_PIXEL_FORMAT_RGB8,
        PixelFormat::Rgba8 => SDS_PIXEL_FORMAT_RGBA8,
        PixelFormat::Bgra8 => SDS_PIXEL_FORMAT_BGRA8,
        PixelFormat::RgbF32 => SDS_PIXEL_FORMAT_RGBF32,
    }
}

/// An input image in the caller's memory, read only during the call that receives it (never
/// kept: `sds_engine_submit` copies it).
///
/// `data` must hold `stride * (height - 1) + width * bytes_per_pixel` readable bytes. Width and
/// height may be 1 to 16384 and those bytes at most 4 GiB (the pipeline resizes to the stream's
/// width × height); a description outside these bounds is refused with `SDS_ERR_INVALID_FRAME`
/// before any byte is read. The output comes back in the same pixel format.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct SdsFrame {
    /// First byte of the top row.
    pub data: *const u8,
    /// Width in pixels, 1 to 16384.
    pub width: u32,
    /// Height in pixels, 1 to 16384.
    pub height: u32,
    /// Bytes from one row to the next, ≥ width × bytes per pixel; 0 means packed rows.
    pub stride: u32,
    /// One of the `SDS_PIXEL_FORMAT_*` values.
    pub format: SdsPixelFormat,
}

impl SdsFrame {
    /// Borrows the caller's pixels as a core [`Frame`] (validated by core).
    ///
    /// # Safety
    /// `self.data` must satisfy the struct's contract.
    pub(crate) unsafe fn as_frame(&self, function: &str) -> Result<Frame<'_>, Failure> {
        // SAFETY: forwarded from the caller.
        unsafe { self.as_named_frame(function, None) }
    }

    /// [`as_frame`](Self::as_frame) for a frame that is not the call's `frame` argument:
    /// `name` is how the caller spells it (`controls[2].frame`), and messages say which.
    ///
    /// # Safety
    /// `self.data` must satisfy the struct's contract.
    pub(crate) unsafe fn as_named_frame(
        &self,
        function: &str,
        name: Option<&str>,
    ) -> Result<Frame<'_>, Failure> {
        let context = |failure: Failure| match name {
            Some(name) => Failure {
                message: failure.message.replacen(
                    &format!("{function}: "),
                    &format!("{function}: {name}: "),
                    1,
                ),
                ..failure
            },
            None => failure,
        };
        if self.data.is_null() {
            let field = match name {
                Some(name) => format!("{name}.data"),
                None => "frame->data".to_string(),
            };
            return Err(Failure::null(function, &field));
        }
        let format = pixel_format(function, self.format).map_err(context)?;
        let (width, height) = (self.width as usize, self.height as usize);
        let stride = row_stride(width, format, self.stride);
        // The slice covers exactly the bytes the description spans, by core's one size rule;
        // a description that breaks it is refused before any byte is touched.
        let len = frame_len(width, height, stride, format)
            .map_err(|e| context(Failure::from_core(function, e, false)))?;
        // SAFETY: the caller promises `len` readable bytes at `data` for the call's duration.
        let data = unsafe { std::slice::from_raw_parts(self.data, len) };
        Frame::new(data, width, height, stride, format)
            .map_err(|e| context(Failure::from_core(function, e, false)))
    }
}

/// A control image for one ControlNet whose `preprocessor` is `"external"`: the host makes the
/// control image (a depth map, a pose drawing …) and hands it over with a frame. Read only
/// during the call that receives it (never kept: the engine copies it).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct SdsControlImage {
    /// The ControlNet's `model_id`, exactly as in the parameters (NUL-terminated UTF-8).
    pub controlnet_id: *const c_char,
    /// The image: any size and pixel format (resized to the stream's width × height like a
    /// frame), described as for frames.
    pub frame: SdsFrame,
}

/// Borrows the caller's `count` control images as `(ControlNet id, frame)` pairs. NULL
/// `controls` is fine with `count` 0. The ids are checked against the parameters by core.
///
/// # Safety
/// `controls` must be NULL or point to `count` readable `SdsControlImage`s, each as the struct
/// describes, for the call's duration.
pub(crate) unsafe fn control_images<'a>(
    function: &str,
    controls: *const SdsControlImage,
    count: usize,
) -> Result<Vec<(&'a str, Frame<'a>)>, Failure> {
    if count == 0 {
        return Ok(Vec::new());
    }
    if controls.is_null() {
        return Err(Failure::new(
            SdsStatus::SDS_ERR_NULL,
            format!("{function}: `controls` is NULL but `count` is {count}"),
        ));
    }
    if count > isize::MAX as usize / std::mem::size_of::<SdsControlImage>() {
        return Err(Failure::new(
            SdsStatus::SDS_ERR_INVALID_ARGUMENT,
            format!("{function}: `count` {count} is not a number of control images"),
        ));
    }
    // SAFETY: non-NULL, `count` readable elements by the caller's contract (size checked).
    let controls: &'a [SdsControlImage] = unsafe { std::slice::from_raw_parts(controls, count) };
    controls
        .iter()
        .enumerate()
        .map(|(i, control)| {
            let id_name = format!("controls[{i}].controlnet_id");
            if control.controlnet_id.is_null() {
                return Err(Failure::null(function, &id_name));
            }
            // SAFETY: non-NULL and NUL-terminated by the caller's contract.
            let id = unsafe { CStr::from_ptr(control.controlnet_id) }
                .to_str()
                .map_err(|e| {
                    Failure::new(
                        SdsStatus::SDS_ERR_INVALID_ARGUMENT,
                        format!("{function}: `{id_name}` is not valid UTF-8: {e}"),
                    )
                })?;
            // SAFETY: the frame's description by the caller's contract.
            let frame = unsafe {
                control
                    .frame
                    .as_named_frame(function, Some(&format!("controls[{i}].frame")))?
            };
            Ok((id, frame))
        })
        .collect()
}

/// Where an output goes: the caller fills `data`, `capacity` and `stride`; the call fills the
/// rest, also when it fails with `SDS_ERR_BUFFER_TOO_SMALL` (then `size` is what is needed and
/// nothing is written to `data`).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct SdsOutput {
    /// In: the caller's buffer (kept by the caller; sdstream writes to it only during the call).
    pub data: *mut u8,
    /// In: bytes available at `data`.
    pub capacity: usize,
    /// In: bytes from one row to the next in `data`, ≥ width × bytes per pixel; 0 means packed.
    pub stride: u32,
    /// Out: width in pixels (the stream's width).
    pub width: u32,
    /// Out: height in pixels (the stream's height).
    pub height: u32,
    /// Out: pixel format (the input frame's).
    pub format: SdsPixelFormat,
    /// Out: bytes needed at the chosen stride: `stride * (height - 1) + width * bytes_per_pixel`.
    pub size: usize,
    /// Out: id of the input frame (from `sds_engine_submit`).
    pub frame_id: u64,
    /// Out: the input's timestamp (the caller's from `sds_engine_submit_with_timestamp`, else
    /// the submission time in microseconds since the Unix epoch).
    pub timestamp: i64,
    /// Out: version of the parameters it was made with (0 for those given at creation, then
    /// one more per accepted update; see `params_version` in the status JSON).
    pub params_version: u64,
}

/// The row stride a C description means: `stride`, or packed rows when it is 0 (saturating: an
/// absurd width then fails core's size rule instead of wrapping).
fn row_stride(width: usize, format: PixelFormat, stride: u32) -> usize {
    match stride {
        0 => width.saturating_mul(format.bytes_per_pixel()),
        _ => stride as usize,
    }
}

/// Bytes needed for `width × height` pixels of `format` with rows `stride` apart (0: packed),
/// by core's frame size rule, and the stride used; core's error when the rule refuses them (a
/// stride shorter than a row, or one so long that the rows span more than a frame may).
pub(crate) fn needed_bytes(
    width: usize,
    height: usize,
    format: PixelFormat,
    stride: u32,
) -> sdstream_core::Result<(usize, usize)> {
    let stride = row_stride(width, format, stride);
    frame_len(width, height, stride, format).map(|size| (size, stride))
}

/// Describes `width × height × format` in `out` and checks that it fits the caller's buffer.
pub(crate) fn check_fits(
    function: &str,
    out: &mut SdsOutput,
    width: usize,
    height: usize,
    format: PixelFormat,
) -> Result<usize, Failure> {
    out.width = width as u32;
    out.height = height as u32;
    out.format = format_code(format);
    let (size, stride) = match needed_bytes(width, height, format, out.stride) {
        Ok(fits) => fits,
        Err(e) => {
            // What packed rows would need: the caller's way out.
            out.size = needed_bytes(width, height, format, 0).map_or(0, |(s, _)| s);
            let reason = match e {
                sdstream_core::Error::InvalidFrame(reason) => reason,
                other => other.to_string(),
            };
            return Err(Failure::new(
                SdsStatus::SDS_ERR_BUFFER_TOO_SMALL,
                format!("{function}: the output buffer: {reason}"),
            ));
        }
    };
    out.size = size;
    if out.capacity < size {
        return Err(Failure::new(
            SdsStatus::SDS_ERR_BUFFER_TOO_SMALL,
            format!(
                "{function}: a {width}x{height} {format} output with stride {stride} needs {size} \
                 bytes; the buffer has {}",
                out.capacity
            ),
        ));
    }
    Ok(stride)
}

/// Copies `output` into the caller's buffer; on failure gives the output back so the handle
/// can keep it. The large error is deliberate: it is the undelivered frame itself, moved back
/// on a cold path (buffer too small), never copied.
///
/// # Safety
/// `out.data` must be non-NULL with `out.capacity` writable bytes.
#[allow(clippy::result_large_err)]
pub(crate) unsafe fn write_output(
    function: &str,
    out: &mut SdsOutput,
    output: Output,
) -> Result<(), Box<(Failure, Output)>> {
    let Image {
        width,
        height,
        format,
        ..
    } = output.image;
    out.frame_id = output.id;
    out.timestamp = output.timestamp;
    out.params_version = output.params_version;
    let stride = match check_fits(function, out, width, height, format) {
        Ok(stride) => stride,
        Err(failure) => return Err(Box::new((failure, output))),
    };
    let row = output.image.stride();
    for (y, src) in output.image.data.chunks_exact(row).enumerate() {
        // SAFETY: check_fits proved `stride * (height - 1) + row <= capacity`.
        unsafe {
            std::ptr::copy_nonoverlapping(src.as_ptr(), out.data.add(y * stride), row);
        }
    }
    Ok(())
}
