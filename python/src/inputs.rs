//! Conversions from Python: the argument types the functions and classes take (`FromPyObject`),
//! and the core values read from them.
//!
//! Two of them keep a failed conversion for the body to raise instead of failing extraction:
//! [`JsonText`], because its message names the JSON (`params`, `settings`, a nested kind…),
//! which is the caller's name for it, not the argument's; and [`Controls`], because pyo3 prefixes
//! a `TypeError` raised by extraction with `argument 'controls': `, which would change the
//! message of a key that is not a string. Raising in the body also keeps the order in which
//! several bad JSON texts are reported: as the body reads them (settings before params).
//! [`FrameArray`] and [`StylePicture`] fail extraction itself (a `ValueError`, which pyo3 passes
//! on unchanged), so a bad frame is reported before a `controls` that is not a dict or a
//! `timestamp` that is not an int.

use std::borrow::Cow;
use std::convert::Infallible;
use std::str::Utf8Error;

use numpy::{PyReadonlyArrayDyn, PyUntypedArrayMethods};
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyString};

use sdstream::params::Transition;
use sdstream::{
    EngineOptions, EngineSettings, Frame, PixelFormat, StreamDiffusionParams, StyleImage,
};

use crate::errors::{ValidationError, py_err};

/// A JSON text handed in from Python: a `str`, or UTF-8 `bytes` / `bytearray`. Anything else, a
/// `str` that cannot be UTF-8 (a lone surrogate such as '\ud800') and bytes that are not UTF-8
/// raise `ValidationError` from [`text`](Self::text), naming the JSON as a bad body does, instead
/// of the TypeError / UnicodeEncodeError / UnicodeDecodeError pyo3's own conversions would.
pub(crate) struct JsonText<'a>(Result<Cow<'a, str>, NotJsonText>);

/// Why an argument is not a JSON text.
enum NotJsonText {
    /// A `str` with no UTF-8 form: the encoder's message.
    NotUnicode(String),
    NotUtf8(Utf8Error),
    /// Neither str nor bytes: the type's name.
    WrongType(String),
}

impl<'a> FromPyObject<'a, '_> for JsonText<'a> {
    type Error = Infallible;

    fn extract(obj: Borrowed<'a, '_, PyAny>) -> Result<Self, Infallible> {
        let text = if obj.is_instance_of::<PyString>() {
            obj.extract::<Cow<'a, str>>()
                .map_err(|e| NotJsonText::NotUnicode(e.value(obj.py()).to_string()))
        } else if let Ok(bytes) = obj.extract::<Cow<'a, [u8]>>() {
            // bytes are borrowed, a bytearray's copied (it could change under us).
            match bytes {
                Cow::Borrowed(bytes) => std::str::from_utf8(bytes).map(Cow::Borrowed),
                Cow::Owned(bytes) => String::from_utf8(bytes)
                    .map(Cow::Owned)
                    .map_err(|e| e.utf8_error()),
            }
            .map_err(NotJsonText::NotUtf8)
        } else {
            Err(NotJsonText::WrongType(
                obj.get_type()
                    .name()
                    .map_or_else(|_| "an object".to_owned(), |n| n.to_string()),
            ))
        };
        Ok(Self(text))
    }
}

impl<'a> JsonText<'a> {
    /// The text, or `ValidationError` naming it `what` when the argument is not one.
    pub(crate) fn text(self, what: &str) -> PyResult<Cow<'a, str>> {
        self.0.map_err(|e| {
            ValidationError::new_err(match e {
                NotJsonText::NotUnicode(reason) => {
                    format!("invalid JSON ({what}): the text is not valid Unicode: {reason}")
                }
                NotJsonText::NotUtf8(e) => {
                    format!("invalid JSON ({what}): the bytes are not UTF-8: {e}")
                }
                NotJsonText::WrongType(name) => format!(
                    "invalid JSON ({what}): expected a JSON text (str or bytes), got {name}"
                ),
            })
        })
    }
}

/// Engine settings from an optional JSON object (omitted: the defaults).
pub(crate) fn settings_from(json: Option<JsonText<'_>>) -> PyResult<EngineSettings> {
    match json {
        Some(json) => EngineSettings::from_json(&json.text("settings")?).map_err(py_err),
        None => Ok(EngineSettings::default()),
    }
}

/// Engine options from an optional JSON object (omitted: the defaults).
pub(crate) fn options_from(json: Option<JsonText<'_>>) -> PyResult<EngineOptions> {
    match json {
        Some(json) => EngineOptions::from_json(&json.text("options")?).map_err(py_err),
        None => Ok(EngineOptions::default()),
    }
}

/// Parameters from a JSON text, validated under `settings`.
pub(crate) fn params_from(
    json: JsonText<'_>,
    settings: &EngineSettings,
) -> PyResult<StreamDiffusionParams> {
    StreamDiffusionParams::from_json_with(&json.text("params")?, settings).map_err(py_err)
}

/// A transition from its JSON (`None`: none, the change applies at once).
pub(crate) fn transition_from(json: Option<JsonText<'_>>) -> PyResult<Transition> {
    match json {
        Some(json) => Transition::from_json(&json.text("transition")?).map_err(py_err),
        None => Ok(Transition::default()),
    }
}

/// A frame borrowed from an HxWxC numpy array: uint8 with 3 (RGB) or 4 (RGBA) channels, or
/// float32 with 3 channels in [0, 1]. Holds the array's read borrow. The array must be
/// C-contiguous, which [`frame`](Self::frame) checks.
pub(crate) enum FrameArray<'py> {
    U8(PyReadonlyArrayDyn<'py, u8>),
    F32(PyReadonlyArrayDyn<'py, f32>),
}

impl<'py> FromPyObject<'_, 'py> for FrameArray<'py> {
    type Error = PyErr;

    fn extract(obj: Borrowed<'_, 'py, PyAny>) -> PyResult<Self> {
        Self::extract_named(&obj, "frame")
    }
}

impl<'py> FrameArray<'py> {
    /// The array with messages naming it `what` (a control image, the style picture).
    fn extract_named(array: &Bound<'py, PyAny>, what: &str) -> PyResult<Self> {
        let frame = if let Ok(a) = array.extract::<PyReadonlyArrayDyn<'py, u8>>() {
            FrameArray::U8(a)
        } else if let Ok(a) = array.extract::<PyReadonlyArrayDyn<'py, f32>>() {
            FrameArray::F32(a)
        } else {
            return Err(PyValueError::new_err(format!(
                "invalid {what}: expected a numpy array of dtype uint8 or float32"
            )));
        };
        let shape = frame.shape();
        let channels_ok = matches!(
            (&frame, shape),
            (FrameArray::U8(_), [_, _, 3 | 4]) | (FrameArray::F32(_), [_, _, 3])
        );
        if !channels_ok {
            let expected = match frame {
                FrameArray::U8(_) => "HxWx3 or HxWx4",
                FrameArray::F32(_) => "HxWx3",
            };
            return Err(PyValueError::new_err(format!(
                "invalid {what}: expected a {expected} array, got shape {shape:?}"
            )));
        }
        Ok(frame)
    }

    fn shape(&self) -> &[usize] {
        match self {
            FrameArray::U8(a) => a.shape(),
            FrameArray::F32(a) => a.shape(),
        }
    }

    /// The pixels as bytes, without copying.
    fn bytes(&self) -> PyResult<&[u8]> {
        let not_contiguous =
            |_| PyValueError::new_err("invalid frame: the array must be C-contiguous");
        match self {
            FrameArray::U8(a) => a.as_slice().map_err(not_contiguous),
            FrameArray::F32(a) => {
                let floats = a.as_slice().map_err(not_contiguous)?;
                // SAFETY: an f32 slice is valid as its bytes (no padding, any bit pattern
                // is a valid u8); the length is the slice's size in bytes.
                Ok(unsafe {
                    std::slice::from_raw_parts(
                        floats.as_ptr().cast::<u8>(),
                        std::mem::size_of_val(floats),
                    )
                })
            }
        }
    }

    /// The array as a core frame (no copy).
    pub(crate) fn frame(&self) -> PyResult<Frame<'_>> {
        let shape = self.shape();
        let (height, width, channels) = (shape[0], shape[1], shape[2]);
        let format = match (self, channels) {
            (FrameArray::U8(_), 3) => PixelFormat::Rgb8,
            (FrameArray::U8(_), _) => PixelFormat::Rgba8,
            (FrameArray::F32(_), _) => PixelFormat::RgbF32,
        };
        Frame::packed(self.bytes()?, width, height, format).map_err(py_err)
    }
}

/// Control images for `external` ControlNets, `{controlnet model_id: frame array}`, borrowed
/// from Python (arrays as for frames; the Python wrapper converts PIL images). The ids are
/// checked against the parameters by core.
pub(crate) struct Controls<'py>(PyResult<Vec<(String, FrameArray<'py>)>>);

/// No control images (the argument omitted).
impl Default for Controls<'_> {
    fn default() -> Self {
        Self(Ok(Vec::new()))
    }
}

impl<'py> FromPyObject<'_, 'py> for Controls<'py> {
    type Error = PyErr;

    /// Fails only for a non-dict, with pyo3's own message for a dict argument; a bad entry is
    /// kept for [`frames`](Controls::frames) to raise (see the module's docs).
    fn extract(obj: Borrowed<'_, 'py, PyAny>) -> PyResult<Self> {
        let controls = obj.cast::<PyDict>()?;
        let arrays = controls
            .iter()
            .map(|(key, value)| {
                let id: String = key.extract().map_err(|_| {
                    PyTypeError::new_err(format!(
                        "controls: keys are ControlNet model_id strings, got {}",
                        key.get_type()
                    ))
                })?;
                let array =
                    FrameArray::extract_named(&value, &format!("control image for {id:?}"))?;
                Ok((id, array))
            })
            .collect();
        Ok(Self(arrays))
    }
}

impl Controls<'_> {
    /// The control images as core frames, `(model_id, frame)`; raises what their conversion
    /// met.
    pub(crate) fn frames(&self, py: Python<'_>) -> PyResult<Vec<(&str, Frame<'_>)>> {
        let arrays = self.0.as_ref().map_err(|e| e.clone_ref(py))?;
        arrays
            .iter()
            .map(|(id, array)| Ok((id.as_str(), array.frame()?)))
            .collect()
    }
}

/// IP-Adapter's style picture, from an array like a frame (copied).
pub(crate) struct StylePicture(StyleImage);

impl FromPyObject<'_, '_> for StylePicture {
    type Error = PyErr;

    fn extract(obj: Borrowed<'_, '_, PyAny>) -> PyResult<Self> {
        let array = FrameArray::extract_named(&obj, "picture")?;
        StyleImage::from_frame(array.frame()?)
            .map(Self)
            .map_err(py_err)
    }
}

impl StylePicture {
    pub(crate) fn into_image(self) -> StyleImage {
        self.0
    }
}
