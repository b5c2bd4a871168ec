//! `_ImageProcessor`: one image processor on its own.

use std::sync::Mutex;

use numpy::IntoPyArray;
use numpy::ndarray::Array3;
use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;

use sdstream::{ControlImage, ImageProcessor};

use crate::errors::py_err;
use crate::inputs::{FrameArray, JsonText, settings_from};
use crate::sync::lock;

/// One image processor on its own (core's `ImageProcessor`): frame in, control image out, on
/// the calling thread with the GIL released. Calls from several threads are serialised.
#[pyclass(module = "sdstream._sdstream", name = "_ImageProcessor")]
pub(crate) struct PyImageProcessor {
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
        params_json: JsonText<'_>,
        settings_json: Option<JsonText<'_>>,
    ) -> PyResult<Self> {
        let settings = settings_from(settings_json)?;
        let params = params_json.text("params")?;
        let processor = py
            .detach(|| ImageProcessor::from_json(name, &params, &settings))
            .map_err(py_err)?;
        Ok(Self {
            processor: Mutex::new(processor),
        })
    }

    /// The control image of one frame (see `FrameArray`) as an HxWxC uint8 array.
    fn process(&self, py: Python<'_>, frame: FrameArray<'_>) -> PyResult<Py<PyAny>> {
        let frame = frame.frame()?;
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
