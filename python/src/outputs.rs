//! Conversions to Python: output images as numpy arrays.

use numpy::ndarray::Array3;
use numpy::{IntoPyArray, PyArrayDyn};
use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;

use sdstream::{Image, PixelFormat};

/// An output image as an HxWxC numpy array: u8 formats are moved in without a copy; RgbF32
/// becomes float32 (one conversion from the byte buffer).
pub(crate) fn image_to_py(py: Python<'_>, image: Image) -> PyResult<Py<PyAny>> {
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

/// A u8 image as an HxWxC uint8 array, its buffer moved in.
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
