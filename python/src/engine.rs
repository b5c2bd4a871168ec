//! `_Engine`: the threaded engine, and its output tuples.

use std::time::Duration;

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

use sdstream::{Engine, Output, Submission};

use crate::errors::py_err;
use crate::inputs::{
    Controls, FrameArray, JsonText, StylePicture, options_from, params_from, settings_from,
    transition_from,
};
use crate::outputs::image_to_py;

/// The threaded engine: `submit` / `poll` never wait for inference.
#[pyclass(module = "sdstream._sdstream", name = "_Engine")]
pub(crate) struct PyEngine {
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
        params_json: JsonText<'_>,
        settings_json: Option<JsonText<'_>>,
        options_json: Option<JsonText<'_>>,
        wait: bool,
    ) -> PyResult<Self> {
        let settings = settings_from(settings_json)?;
        let options = options_from(options_json)?;
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
    /// (`{model_id: array}`, see `Controls`); returns its id.
    #[pyo3(signature = (frame, timestamp=None, controls=None))]
    fn submit(
        &self,
        py: Python<'_>,
        frame: FrameArray<'_>,
        timestamp: Option<i64>,
        controls: Option<Controls<'_>>,
    ) -> PyResult<u64> {
        let frame = frame.frame()?;
        let controls = controls.unwrap_or_default();
        let controls = controls.frames(py)?;
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
        frame: FrameArray<'_>,
        controls: Option<Controls<'_>>,
        timestamp: Option<i64>,
    ) -> PyResult<Py<PyAny>> {
        let frame = frame.frame()?;
        let controls = controls.unwrap_or_default();
        let controls = controls.frames(py)?;
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
        params_json: JsonText<'_>,
        transition_json: Option<JsonText<'_>>,
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
    fn set_style_image(&self, py: Python<'_>, picture: Option<StylePicture>) -> PyResult<()> {
        let picture = picture.map(StylePicture::into_image);
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

/// A timeout in seconds as a duration (ValueError when negative, NaN or too large).
fn duration(seconds: f64) -> PyResult<Duration> {
    Duration::try_from_secs_f64(seconds)
        .map_err(|e| PyValueError::new_err(format!("timeout must be >= 0 seconds: {e}")))
}

/// An output as the tuple `(id, timestamp, image, params_version, latency_seconds)`.
fn output_tuple(py: Python<'_>, output: Output) -> PyResult<Py<PyAny>> {
    let Output {
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
