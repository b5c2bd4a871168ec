//! `_StreamDiffusion`: the synchronous pipeline.

use std::sync::Mutex;

use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;

use sdstream::{
    EngineState, EngineStatus, Frame, FrameInput, StreamDiffusion, StreamDiffusionParams,
};

use crate::errors::py_err;
use crate::inputs::{
    Controls, FrameArray, JsonText, StylePicture, params_from, settings_from, transition_from,
};
use crate::outputs::image_to_py;
use crate::sync::lock;

/// The synchronous pipeline: one frame in, one frame out, on the calling thread (with the GIL
/// released). Calls from several threads are serialised.
#[pyclass(module = "sdstream._sdstream", name = "_StreamDiffusion")]
pub(crate) struct PyStreamDiffusion {
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
        params_json: JsonText<'_>,
        settings_json: Option<JsonText<'_>>,
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
    /// ControlNets (`{model_id: array}`, see `Controls`); returns the output array.
    #[pyo3(signature = (frame, controls=None))]
    fn process(
        &self,
        py: Python<'_>,
        frame: FrameArray<'_>,
        controls: Option<Controls<'_>>,
    ) -> PyResult<Py<PyAny>> {
        let frame = frame.frame()?;
        let controls = controls.unwrap_or_default();
        let controls = controls.frames(py)?;
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
        params_json: JsonText<'_>,
        transition_json: Option<JsonText<'_>>,
    ) -> PyResult<&'static str> {
        // Validated under the stream's own settings, which only the locked stream can give.
        let text = params_json.text("params")?;
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
    fn set_style_image(&self, py: Python<'_>, picture: Option<StylePicture>) -> PyResult<()> {
        let picture = picture.map(StylePicture::into_image);
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
