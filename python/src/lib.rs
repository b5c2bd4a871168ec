//! Python bindings for sdstream (module `sdstream._sdstream`).

use pyo3::prelude::*;

/// The native part of the `sdstream` Python package.
#[pymodule]
fn _sdstream(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
