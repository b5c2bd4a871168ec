//! The module's exception types and the mapping of core errors onto Python exceptions.

use pyo3::PyErr;
use pyo3::create_exception;
use pyo3::exceptions::{PyRuntimeError, PyValueError};

use sdstream::Error;

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
pub(crate) fn py_err(e: Error) -> PyErr {
    match e {
        Error::InvalidParam { .. } | Error::Json(_) => ValidationError::new_err(e.to_string()),
        Error::InvalidFrame(_) => PyValueError::new_err(e.to_string()),
        Error::QueueFull { .. } => QueueFullError::new_err(e.to_string()),
        other => PyRuntimeError::new_err(other.to_string()),
    }
}
