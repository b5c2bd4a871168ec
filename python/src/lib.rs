//! Python bindings for sdstream (module `sdstream._sdstream`).
//!
//! Thin by design: every rule (defaults, validation, messages, hot/reload decisions) lives in
//! the `sdstream` crate and crosses this boundary as JSON text, the same Daydream body the C ABI
//! and the HTTP server speak. The pure-Python package `sdstream` wraps these natives in
//! pydantic-like classes. Inference and loading run with the GIL released.

use std::borrow::Cow;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use numpy::ndarray::Array3;
use numpy::{IntoPyArray, PyArrayDyn, PyReadonlyArrayDyn, PyUntypedArrayMethods};
use pyo3::create_exception;
use pyo3::exceptions::{PyRuntimeError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyByteArray, PyBytes, PyDict, PyString};

use sdstream::params::{ControlNetConfig, IPAdapterConfig, Transition};
use sdstream::{
    ControlImage, Engine, EngineOptions, EngineSettings, EngineState, EngineStatus, Error, Frame,
    FrameInput, Image, ImageProcessor, PixelFormat, StreamDiffusion, StreamDiffusionParams,
    Submission,
};

/// The module's own Rust allocations keep large freed blocks for reuse: a frame allocates the
/// same large buffers every time, and the system allocator would hand them back to the kernel and
/// fault them in again (sdstream::alloc). Python's own allocations are untouched.
#[global_allocator]
static ALLOCATOR: sdstream::alloc::ReusingAllocator = sdstream::alloc::ReusingAllocator::new();

create_exception!(
    _sdstream,
    ValidationError,
    PyValueError,
    "Invalid parameters: the message is sdstream's own (field path, bad value, rule)."
);

create_exception!(
    _sdstream,
    QueueFullError,
    PyRuntimeError,
    "The engine's input queue is full (drop policy \"lossless\"): collect outputs first."
);

/// Maps core errors to Python exceptions, keeping core's message.
fn py_err(e: Error) -> PyErr {
    match e {
        Error::InvalidParam { .. } | Error::Json(_) => ValidationError::new_err(e.to_string()),
        Error::InvalidFrame(_) => PyValueError::new_err(e.to_string()),
        Error::QueueFull { .. } => QueueFullError::new_err(e.to_string()),
        other => PyRuntimeError::new_err(other.to_string()),
    }
}

/// A JSON text handed in from Python: a `str`, or UTF-8 `bytes` / `bytearray`. Anything else,
/// a `str` that cannot be UTF-8 (a lone surrogate such as '\ud800') and bytes that are not
/// UTF-8 raise `ValidationError` naming `what`, as a bad body does, instead of the
/// TypeError / UnicodeEncodeError / UnicodeDecodeError pyo3's own conversions would.
fn json_text<'a>(text: &'a Bound<'_, PyAny>, what: &str) -> PyResult<Cow<'a, str>> {
    if let Ok(text) = text.cast::<PyString>() {
        return text.to_cow().map_err(|e| {
            ValidationError::new_err(format!(
                "invalid JSON ({what}): the text is not valid Unicode: {}",
                e.value(text.py())
            ))
        });
    }
    let not_utf8 = |e: std::str::Utf8Error| {
        ValidationError::new_err(format!(
            "invalid JSON ({what}): the bytes are not UTF-8: {e}"
        ))
    };
    if let Ok(bytes) = text.cast::<PyBytes>() {
        return std::str::from_utf8(bytes.as_bytes())
            .map(Cow::Borrowed)
            .map_err(not_utf8);
    }
    if let Ok(bytes) = text.cast::<PyByteArray>() {
        return String::from_utf8(bytes.to_vec())
            .map(Cow::Owned)
            .map_err(|e| not_utf8(e.utf8_error()));
    }
    Err(ValidationError::new_err(format!(
        "invalid JSON ({what}): expected a JSON text (str or bytes), got {}",
        text.get_type()
            .name()
            .map_or_else(|_| "an object".to_owned(), |n| n.to_string())
    )))
}

/// [`json_text`] for an optional argument (None: absent).
fn optional_json_text<'a>(
    text: Option<&'a Bound<'_, PyAny>>,
    what: &str,
) -> PyResult<Option<Cow<'a, str>>> {
    text.map(|t| json_text(t, what)).transpose()
}

/// Engine settings from an optional JSON object (omitted: the defaults).
fn settings_from(settings_json: Option<&Bound<'_, PyAny>>) -> PyResult<EngineSettings> {
    match optional_json_text(settings_json, "settings")? {
        Some(text) => EngineSettings::from_json(&text).map_err(py_err),
        None => Ok(EngineSettings::default()),
    }
}

/// Parameters from a JSON text, validated under `settings`.
fn params_from(
    params_json: &Bound<'_, PyAny>,
    settings: &EngineSettings,
) -> PyResult<StreamDiffusionParams> {
    let text = json_text(params_json, "params")?;
    StreamDiffusionParams::from_json_with(&text, settings).map_err(py_err)
}

/// A transition from its JSON (`None`: none, the change applies at once).
fn transition_from(transition_json: Option<&Bound<'_, PyAny>>) -> PyResult<Transition> {
    match transition_json {
        None => Ok(Transition::default()),
        Some(json) => {
            let text = json_text(json, "transition")?;
            Transition::from_json(&text).map_err(py_err)
        }
    }
}

/// `patch_json` merged into `base_json` as JSON Merge Patch (objects merge, `null` removes a
/// member, anything else replaces): core's one merge of partial parameters. Raises
/// `ValidationError` when either is not JSON.
#[pyfunction]
fn merge_patch(base_json: &Bound<'_, PyAny>, patch_json: &Bound<'_, PyAny>) -> PyResult<String> {
    let parse = |what: &str, text: &Bound<'_, PyAny>| {
        serde_json::from_str::<serde_json::Value>(&json_text(text, what)?)
            .map_err(|e| ValidationError::new_err(format!("invalid JSON ({what}): {e}")))
    };
    let mut merged = parse("base", base_json)?;
    sdstream::params::merge_patch(&mut merged, &parse("patch", patch_json)?);
    Ok(merged.to_string())
}

/// Validates a Daydream body under the given engine settings and returns its canonical JSON
/// (every field present, defaults filled). Raises `ValidationError` with core's message.
#[pyfunction]
#[pyo3(signature = (body, settings_json=None))]
fn validate_params(
    body: &Bound<'_, PyAny>,
    settings_json: Option<&Bound<'_, PyAny>>,
) -> PyResult<String> {
    let settings = settings_from(settings_json)?;
    Ok(params_from(body, &settings)?.to_json())
}

/// Validates engine settings and returns their canonical JSON.
#[pyfunction]
fn validate_settings(body: &Bound<'_, PyAny>) -> PyResult<String> {
    let text = json_text(body, "settings")?;
    Ok(EngineSettings::from_json(&text).map_err(py_err)?.to_json())
}

/// Validates engine options (queueing) and returns their canonical JSON.
#[pyfunction]
fn validate_options(body: &Bound<'_, PyAny>) -> PyResult<String> {
    let text = json_text(body, "options")?;
    Ok(EngineOptions::from_json(&text).map_err(py_err)?.to_json())
}

/// Parses one nested object on its own (`"controlnet"` or `"ip_adapter"`) with core's types:
/// field types, enum values, unknown fields and defaults. The rules that need the whole
/// parameter set (model family, duplicates, ranges) run when it is placed in one.
#[pyfunction]
fn validate_nested(kind: &str, body: &Bound<'_, PyAny>) -> PyResult<String> {
    fn canonical<T: serde::de::DeserializeOwned + serde::Serialize>(
        field: &str,
        body: &str,
    ) -> PyResult<String> {
        let value: T = serde_json::from_str(body).map_err(|e| {
            py_err(if e.is_data() {
                Error::param(field, e.to_string())
            } else {
                Error::Json(e.to_string())
            })
        })?;
        serde_json::to_string(&value).map_err(|e| PyRuntimeError::new_err(e.to_string()))
    }
    let body = json_text(body, kind)?;
    match kind {
        "controlnet" => canonical::<ControlNetConfig>("controlnets[]", &body),
        "ip_adapter" => canonical::<IPAdapterConfig>("ip_adapter", &body),
        other => Err(PyValueError::new_err(format!(
            "unknown nested kind {other:?}; expected \"controlnet\" or \"ip_adapter\""
        ))),
    }
}

/// The Python name of an [`Update`].
/// What `classify` says about going from `old` to `new` (both canonical bodies, validated
/// under `settings_json`): "unchanged", "hot", "controlnet_swap" or "reload".
#[pyfunction]
#[pyo3(signature = (old, new, settings_json=None))]
fn classify(
    old: &Bound<'_, PyAny>,
    new: &Bound<'_, PyAny>,
    settings_json: Option<&Bound<'_, PyAny>>,
) -> PyResult<&'static str> {
    let settings = settings_from(settings_json)?;
    let old = params_from(old, &settings)?;
    let new = params_from(new, &settings)?;
    Ok(sdstream::classify(&old, &new).kind().as_str())
}

/// A frame borrowed from a C-contiguous HxWxC numpy array: uint8 with 3 (RGB) or 4 (RGBA)
/// channels, or float32 with 3 channels in [0, 1]. Holds the array's read borrow.
enum FrameArray<'py> {
    U8(PyReadonlyArrayDyn<'py, u8>),
    F32(PyReadonlyArrayDyn<'py, f32>),
}

impl<'py> FrameArray<'py> {
    fn extract(array: &Bound<'py, PyAny>) -> PyResult<Self> {
        Self::extract_named(array, "frame")
    }

    /// [`extract`](Self::extract) with messages naming the array `what` (a control image).
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

    fn frame(&self) -> PyResult<Frame<'_>> {
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
fn control_arrays<'py>(
    controls: Option<&Bound<'py, PyDict>>,
) -> PyResult<Vec<(String, FrameArray<'py>)>> {
    let Some(controls) = controls else {
        return Ok(Vec::new());
    };
    controls
        .iter()
        .map(|(key, value)| {
            let id: String = key.extract().map_err(|_| {
                PyTypeError::new_err(format!(
                    "controls: keys are ControlNet model_id strings, got {}",
                    key.get_type()
                ))
            })?;
            let array = FrameArray::extract_named(&value, &format!("control image for {id:?}"))?;
            Ok((id, array))
        })
        .collect()
}

/// The borrowed control images as core frames, `(id, frame)`.
fn control_frames<'a>(
    arrays: &'a [(String, FrameArray<'_>)],
) -> PyResult<Vec<(&'a str, Frame<'a>)>> {
    arrays
        .iter()
        .map(|(id, array)| Ok((id.as_str(), array.frame()?)))
        .collect()
}

/// An output image as an HxWxC numpy array: u8 formats are moved in without a copy; RgbF32
/// becomes float32 (one conversion from the byte buffer).
fn image_to_numpy<'py>(py: Python<'py>, image: Image) -> PyResult<Bound<'py, PyArrayDyn<u8>>> {
    let Image {
        width,
        height,
        format,
        data,
    } = image;
    let shape = (height, width, format.bytes_per_pixel());
    let array = Array3::from_shape_vec(shape, data)
        .map_err(|e| PyRuntimeError::new_err(format!("output image: {e}")))?;
    Ok(array.into_dyn().into_pyarray(py))
}

fn image_to_py(py: Python<'_>, image: Image) -> PyResult<Py<PyAny>> {
    if image.format == PixelFormat::RgbF32 {
        let floats: Vec<f32> = image
            .data
            .chunks_exact(4)
            .map(|b| f32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        let array = Array3::from_shape_vec((image.height, image.width, 3), floats)
            .map_err(|e| PyRuntimeError::new_err(format!("output image: {e}")))?;
        return Ok(array.into_pyarray(py).into_any().unbind());
    }
    Ok(image_to_numpy(py, image)?.into_any().unbind())
}

/// A style picture from an optional frame-like array (copied).
fn style_picture(picture: Option<&Bound<'_, PyAny>>) -> PyResult<Option<sdstream::StyleImage>> {
    let Some(picture) = picture else {
        return Ok(None);
    };
    let array = FrameArray::extract_named(picture, "picture")?;
    let frame = array.frame()?;
    sdstream::StyleImage::from_frame(frame)
        .map(Some)
        .map_err(py_err)
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The synchronous pipeline: one frame in, one frame out, on the calling thread (with the GIL
/// released). Calls from several threads are serialised.
#[pyclass(module = "sdstream._sdstream", name = "_StreamDiffusion")]
struct PyStreamDiffusion {
    stream: Mutex<Option<StreamDiffusion>>,
    /// The report at `close`, state `OFFLINE`, for status calls after it.
    closed_status: Mutex<Option<EngineStatus>>,
}

impl PyStreamDiffusion {
    fn with_stream<R>(&self, f: impl FnOnce(&mut StreamDiffusion) -> PyResult<R>) -> PyResult<R> {
        let mut guard = lock(&self.stream);
        match guard.as_mut() {
            Some(stream) => f(stream),
            None => Err(PyRuntimeError::new_err("this StreamDiffusion is closed")),
        }
    }
}

#[pymethods]
impl PyStreamDiffusion {
    /// Loads the model named by the canonical `params_json` under `settings_json`.
    #[new]
    #[pyo3(signature = (params_json, settings_json=None))]
    fn new(
        py: Python<'_>,
        params_json: &Bound<'_, PyAny>,
        settings_json: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Self> {
        let settings = settings_from(settings_json)?;
        let params = params_from(params_json, &settings)?;
        let stream = py
            .detach(|| StreamDiffusion::new(params, settings))
            .map_err(py_err)?;
        Ok(Self {
            stream: Mutex::new(Some(stream)),
            closed_status: Mutex::new(None),
        })
    }

    /// Processes one frame (see `FrameArray`) with optional control images for `external`
    /// ControlNets (`{model_id: array}`, see `control_arrays`); returns the output array.
    #[pyo3(signature = (frame, controls=None))]
    fn process(
        &self,
        py: Python<'_>,
        frame: &Bound<'_, PyAny>,
        controls: Option<&Bound<'_, PyDict>>,
    ) -> PyResult<Py<PyAny>> {
        let array = FrameArray::extract(frame)?;
        let frame = array.frame()?;
        let control_arrays = control_arrays(controls)?;
        let controls = control_frames(&control_arrays)?;
        let controls: Vec<(&str, &Frame)> = controls.iter().map(|(id, c)| (*id, c)).collect();
        let image = py.detach(|| {
            self.with_stream(|stream| {
                stream
                    .process(FrameInput::new(&frame).controls(&controls))
                    .map_err(py_err)
            })
        })?;
        image_to_py(py, image)
    }

    /// Applies a complete canonical parameter set, a prompt or seed change gliding as
    /// `transition_json` says (`{num_steps, temporal_interpolation_method}`; none: at once);
    /// returns "unchanged", "hot", "controlnet_swap" or "reload" (a reload rebuilds the
    /// stream before returning).
    #[pyo3(signature = (params_json, transition_json=None))]
    fn update(
        &self,
        py: Python<'_>,
        params_json: &Bound<'_, PyAny>,
        transition_json: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<&'static str> {
        let text = json_text(params_json, "params")?;
        let transition = transition_from(transition_json)?;
        py.detach(|| {
            self.with_stream(|stream| {
                let params = StreamDiffusionParams::from_json_with(&text, stream.settings())
                    .map_err(py_err)?;
                stream
                    .update_with_transition(params, transition)
                    .map(|u| u.kind().as_str())
                    .map_err(py_err)
            })
        })
    }

    /// Hands in IP-Adapter's style picture (an array like a frame; copied and encoded before
    /// returning), or goes back to `ip_adapter_style_image_url`'s with None.
    #[pyo3(signature = (picture=None))]
    fn set_style_image(&self, py: Python<'_>, picture: Option<&Bound<'_, PyAny>>) -> PyResult<()> {
        let picture = style_picture(picture)?;
        py.detach(|| self.with_stream(|stream| stream.set_style_image(picture).map_err(py_err)))
    }

    /// The current parameters as canonical JSON.
    fn params_json(&self, py: Python<'_>) -> PyResult<String> {
        py.detach(|| self.with_stream(|stream| Ok(stream.params().to_json())))
    }

    /// The engine settings as JSON.
    fn settings_json(&self, py: Python<'_>) -> PyResult<String> {
        py.detach(|| self.with_stream(|stream| Ok(stream.settings().to_json())))
    }

    /// The status report as JSON, in the Engine's schema (see `StreamDiffusion::status`).
    fn status_json(&self, py: Python<'_>) -> String {
        py.detach(|| {
            let status = match lock(&self.stream).as_ref() {
                Some(stream) => Some(stream.status()),
                None => lock(&self.closed_status).clone(),
            };
            status.map_or_else(
                || r#"{"state":"OFFLINE"}"#.to_owned(),
                |s| serde_json::to_string(&s).unwrap_or_default(),
            )
        })
    }

    /// Frees the pipeline (weights included). Idempotent; later calls fail.
    fn close(&self, py: Python<'_>) {
        py.detach(|| {
            if let Some(stream) = lock(&self.stream).take() {
                let mut status = stream.status();
                status.state = EngineState::Offline;
                *lock(&self.closed_status) = Some(status);
            }
        });
    }

    /// Whether `close` was called.
    #[getter]
    fn closed(&self) -> bool {
        lock(&self.stream).is_none()
    }
}

/// The threaded engine: `submit` / `poll` never wait for inference.
#[pyclass(module = "sdstream._sdstream", name = "_Engine")]
struct PyEngine {
    engine: Engine,
}

#[pymethods]
impl PyEngine {
    /// Starts an engine. With `wait` (default) it returns once the pipeline is loaded;
    /// otherwise at once, state `LOADING`.
    #[new]
    #[pyo3(signature = (params_json, settings_json=None, options_json=None, wait=true))]
    fn new(
        py: Python<'_>,
        params_json: &Bound<'_, PyAny>,
        settings_json: Option<&Bound<'_, PyAny>>,
        options_json: Option<&Bound<'_, PyAny>>,
        wait: bool,
    ) -> PyResult<Self> {
        let settings = settings_from(settings_json)?;
        let options = match optional_json_text(options_json, "options")? {
            Some(text) => EngineOptions::from_json(&text).map_err(py_err)?,
            None => EngineOptions::default(),
        };
        let params = params_from(params_json, &settings)?;
        let engine = py
            .detach(|| {
                if wait {
                    Engine::new(params, settings, options)
                } else {
                    Engine::builder(params)
                        .settings(settings)
                        .options(options)
                        .spawn()
                }
            })
            .map_err(py_err)?;
        Ok(Self { engine })
    }

    /// Waits until a pipeline serves (`timeout` in seconds; None: no limit).
    #[pyo3(signature = (timeout=None))]
    fn wait_ready(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<()> {
        let timeout = timeout.map(duration).transpose()?;
        py.detach(|| self.engine.wait_ready(timeout))
            .map_err(py_err)
    }

    /// Queues a copy of the frame, and of the control images for `external` ControlNets
    /// (`{model_id: array}`, see `control_arrays`); returns its id.
    #[pyo3(signature = (frame, timestamp=None, controls=None))]
    fn submit(
        &self,
        py: Python<'_>,
        frame: &Bound<'_, PyAny>,
        timestamp: Option<i64>,
        controls: Option<&Bound<'_, PyDict>>,
    ) -> PyResult<u64> {
        let array = FrameArray::extract(frame)?;
        let frame = array.frame()?;
        let control_arrays = control_arrays(controls)?;
        let controls = control_frames(&control_arrays)?;
        let submission = Submission::new(frame)
            .controls(controls.iter().map(|(id, c)| (*id, *c)))
            .timestamp(timestamp);
        py.detach(|| self.engine.submit(submission)).map_err(py_err)
    }

    /// Queues the frame (and control images, as `submit`) and waits for its own output, which
    /// `poll` / `recv` never see; returns it as they do. Fails as `submit` does before
    /// anything is queued, and when the frame is dropped or fails in the pipeline. Waits with
    /// the GIL released.
    #[pyo3(signature = (frame, controls=None, timestamp=None))]
    fn process(
        &self,
        py: Python<'_>,
        frame: &Bound<'_, PyAny>,
        controls: Option<&Bound<'_, PyDict>>,
        timestamp: Option<i64>,
    ) -> PyResult<Py<PyAny>> {
        let array = FrameArray::extract(frame)?;
        let frame = array.frame()?;
        let control_arrays = control_arrays(controls)?;
        let controls = control_frames(&control_arrays)?;
        let submission = Submission::new(frame)
            .controls(controls.iter().map(|(id, c)| (*id, *c)))
            .timestamp(timestamp);
        let output = py
            .detach(|| self.engine.process(submission))
            .map_err(py_err)?;
        output_tuple(py, output)
    }

    /// The oldest output not yet collected, or None; never waits. An output is a tuple
    /// `(id, timestamp, image, params_version, latency_seconds)`.
    fn poll(&self, py: Python<'_>) -> PyResult<Option<Py<PyAny>>> {
        let output = py.detach(|| self.engine.poll());
        output.map(|o| output_tuple(py, o)).transpose()
    }

    /// The oldest output, waiting up to `timeout` seconds; None when none came.
    fn recv(&self, py: Python<'_>, timeout: f64) -> PyResult<Option<Py<PyAny>>> {
        let timeout = duration(timeout)?;
        let output = py
            .detach(|| self.engine.recv_timeout(timeout))
            .map_err(py_err)?;
        output.map(|o| output_tuple(py, o)).transpose()
    }

    /// Drops the frames waiting in the input queue; returns how many.
    fn flush(&self, py: Python<'_>) -> usize {
        py.detach(|| self.engine.flush())
    }

    /// Applies a complete canonical parameter set, a prompt or seed change gliding as
    /// `transition_json` says; returns "unchanged", "hot" or "reload" (a reload builds in
    /// the background).
    #[pyo3(signature = (params_json, transition_json=None))]
    fn update(
        &self,
        py: Python<'_>,
        params_json: &Bound<'_, PyAny>,
        transition_json: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<&'static str> {
        let params = params_from(params_json, self.engine.settings())?;
        let transition = transition_from(transition_json)?;
        py.detach(|| {
            self.engine
                .update_params_with_transition(params, transition)
        })
        .map(|u| u.kind().as_str())
        .map_err(py_err)
    }

    /// Rebuilds the pipeline with the current parameters.
    fn restart(&self, py: Python<'_>) -> PyResult<()> {
        py.detach(|| self.engine.restart()).map_err(py_err)
    }

    /// Hands in IP-Adapter's style picture (an RGB/RGBA/BGR… array like a frame; copied), or
    /// goes back to `ip_adapter_style_image_url`'s with None.
    #[pyo3(signature = (picture=None))]
    fn set_style_image(&self, py: Python<'_>, picture: Option<&Bound<'_, PyAny>>) -> PyResult<()> {
        let picture = style_picture(picture)?;
        py.detach(|| self.engine.set_style_image(picture));
        Ok(())
    }

    /// The last accepted parameters as canonical JSON.
    fn params_json(&self, py: Python<'_>) -> String {
        py.detach(|| self.engine.params().to_json())
    }

    /// The engine settings as JSON.
    fn settings_json(&self) -> String {
        self.engine.settings().to_json()
    }

    /// The status report as JSON (Daydream's fields and the engine's own).
    fn status_json(&self, py: Python<'_>) -> String {
        py.detach(|| self.engine.status_json())
    }

    /// Stops the engine and joins its threads. Idempotent.
    fn close(&self, py: Python<'_>) {
        py.detach(|| self.engine.close());
    }
}

fn duration(seconds: f64) -> PyResult<Duration> {
    Duration::try_from_secs_f64(seconds)
        .map_err(|e| PyValueError::new_err(format!("timeout must be >= 0 seconds: {e}")))
}

fn output_tuple(py: Python<'_>, output: sdstream::Output) -> PyResult<Py<PyAny>> {
    let sdstream::Output {
        id,
        timestamp,
        image,
        params_version,
        latency,
        ..
    } = output;
    let image = image_to_py(py, image)?;
    let tuple = (id, timestamp, image, params_version, latency.as_secs_f64());
    Ok(tuple.into_pyobject(py)?.into_any().unbind())
}

/// One image processor on its own (core's `ImageProcessor`): frame in, control image out, on
/// the calling thread with the GIL released. Calls from several threads are serialised.
#[pyclass(module = "sdstream._sdstream", name = "_ImageProcessor")]
struct PyImageProcessor {
    processor: Mutex<ImageProcessor>,
}

#[pymethods]
impl PyImageProcessor {
    /// Processor `name` with `params_json` (its params object) under `settings_json`; loads
    /// its network, if it has one.
    #[new]
    #[pyo3(signature = (name, params_json, settings_json=None))]
    fn new(
        py: Python<'_>,
        name: &str,
        params_json: &Bound<'_, PyAny>,
        settings_json: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Self> {
        let settings = settings_from(settings_json)?;
        let params = json_text(params_json, "params")?;
        let processor = py
            .detach(|| ImageProcessor::from_json(name, &params, &settings))
            .map_err(py_err)?;
        Ok(Self {
            processor: Mutex::new(processor),
        })
    }

    /// The control image of one frame (see `FrameArray`) as an HxWxC uint8 array.
    fn process(&self, py: Python<'_>, frame: &Bound<'_, PyAny>) -> PyResult<Py<PyAny>> {
        let array = FrameArray::extract(frame)?;
        let frame = array.frame()?;
        let image = py
            .detach(|| lock(&self.processor).process(&frame))
            .map_err(py_err)?;
        let ControlImage {
            width,
            height,
            channels,
            data,
        } = image;
        let array = Array3::from_shape_vec((height, width, channels), data)
            .map_err(|e| PyRuntimeError::new_err(format!("control image: {e}")))?;
        Ok(array.into_pyarray(py).into_any().unbind())
    }

    /// The processor's name.
    #[getter]
    fn name(&self) -> String {
        lock(&self.processor).name().to_owned()
    }

    /// Channels of its images (3, or 6 for temporal_net_tensorrt's concat).
    #[getter]
    fn output_channels(&self) -> usize {
        lock(&self.processor).output_channels()
    }

    /// (width, height) of its image for a `width × height` frame.
    fn output_size(&self, width: usize, height: usize) -> (usize, usize) {
        lock(&self.processor).output_size(width, height)
    }

    /// Milliseconds the last call took (None before the first).
    #[getter]
    fn last_ms(&self) -> Option<f64> {
        lock(&self.processor)
            .last_time()
            .map(|d| d.as_secs_f64() * 1e3)
    }

    /// Forgets the previous frame.
    fn reset(&self) {
        lock(&self.processor).reset();
    }
}

/// The native part of the `sdstream` Python package.
#[pymodule]
fn _sdstream(m: &Bound<'_, PyModule>) -> PyResult<()> {
    // Loading progress and warnings to stderr, as a notebook expects (SDSTREAM_LOG filters).
    sdstream::log::to_stderr_unless_subscribed();
    let py = m.py();
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add("ValidationError", py.get_type::<ValidationError>())?;
    m.add("QueueFullError", py.get_type::<QueueFullError>())?;
    m.add_function(wrap_pyfunction!(merge_patch, m)?)?;
    m.add_function(wrap_pyfunction!(validate_params, m)?)?;
    m.add_function(wrap_pyfunction!(validate_settings, m)?)?;
    m.add_function(wrap_pyfunction!(validate_options, m)?)?;
    m.add_function(wrap_pyfunction!(validate_nested, m)?)?;
    m.add_function(wrap_pyfunction!(classify, m)?)?;
    m.add_class::<PyStreamDiffusion>()?;
    m.add_class::<PyEngine>()?;
    m.add_class::<PyImageProcessor>()?;
    Ok(())
}
