//! Python bindings for sdstream (module `sdstream._sdstream`).
//!
//! Thin by design: every rule (defaults, validation, messages, hot/reload decisions) lives in
//! the `sdstream` crate and crosses this boundary as JSON text, the same Daydream body the C ABI
//! and the HTTP server speak. The pure-Python package `sdstream` wraps these natives in
//! pydantic-like classes. Inference and loading run with the GIL released.
//!
//! The modules: `errors` (exception types, core errors mapped onto them), `inputs` (argument
//! types converted from Python) and `outputs` (images to numpy), `functions` (the module-level
//! validation functions), and one per class: `stream` (`_StreamDiffusion`), `engine`
//! (`_Engine`), `processor` (`_ImageProcessor`).

use pyo3::prelude::*;

mod engine;
mod errors;
mod functions;
mod inputs;
mod outputs;
mod processor;
mod stream;
mod sync;

/// The module's own Rust allocations keep large freed blocks for reuse: a frame allocates the
/// same large buffers every time, and the system allocator would hand them back to the kernel and
/// fault them in again (sdstream::alloc). Python's own allocations are untouched.
#[global_allocator]
static ALLOCATOR: sdstream::alloc::ReusingAllocator = sdstream::alloc::ReusingAllocator::new();

/// The native part of the `sdstream` Python package.
#[pymodule]
fn _sdstream(m: &Bound<'_, PyModule>) -> PyResult<()> {
    // Loading progress and warnings to stderr, as a notebook expects (SDSTREAM_LOG filters).
    sdstream::log::to_stderr_unless_subscribed();
    let py = m.py();
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add("ValidationError", py.get_type::<errors::ValidationError>())?;
    m.add("QueueFullError", py.get_type::<errors::QueueFullError>())?;
    m.add_function(wrap_pyfunction!(functions::merge_patch, m)?)?;
    m.add_function(wrap_pyfunction!(functions::validate_params, m)?)?;
    m.add_function(wrap_pyfunction!(functions::validate_settings, m)?)?;
    m.add_function(wrap_pyfunction!(functions::validate_options, m)?)?;
    m.add_function(wrap_pyfunction!(functions::validate_nested, m)?)?;
    m.add_function(wrap_pyfunction!(functions::classify, m)?)?;
    m.add_class::<stream::PyStreamDiffusion>()?;
    m.add_class::<engine::PyEngine>()?;
    m.add_class::<processor::PyImageProcessor>()?;
    Ok(())
}
