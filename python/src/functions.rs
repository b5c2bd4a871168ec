//! The module-level functions: validation and classification of JSON bodies with core's rules.

use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;

use sdstream::params::{ControlNetConfig, IPAdapterConfig};
use sdstream::{EngineOptions, EngineSettings, Error};

use crate::errors::{ValidationError, py_err};
use crate::inputs::{JsonText, params_from, settings_from};

/// `patch_json` merged into `base_json` as JSON Merge Patch (objects merge, `null` removes a
/// member, anything else replaces): core's one merge of partial parameters. Raises
/// `ValidationError` when either is not JSON.
#[pyfunction]
pub(crate) fn merge_patch(base_json: JsonText<'_>, patch_json: JsonText<'_>) -> PyResult<String> {
    let parse = |what: &str, json: JsonText<'_>| {
        serde_json::from_str::<serde_json::Value>(&json.text(what)?)
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
pub(crate) fn validate_params(
    body: JsonText<'_>,
    settings_json: Option<JsonText<'_>>,
) -> PyResult<String> {
    let settings = settings_from(settings_json)?;
    Ok(params_from(body, &settings)?.to_json())
}

/// Validates engine settings and returns their canonical JSON.
#[pyfunction]
pub(crate) fn validate_settings(body: JsonText<'_>) -> PyResult<String> {
    let text = body.text("settings")?;
    Ok(EngineSettings::from_json(&text).map_err(py_err)?.to_json())
}

/// Validates engine options (queueing) and returns their canonical JSON.
#[pyfunction]
pub(crate) fn validate_options(body: JsonText<'_>) -> PyResult<String> {
    let text = body.text("options")?;
    Ok(EngineOptions::from_json(&text).map_err(py_err)?.to_json())
}

/// Parses one nested object on its own (`"controlnet"` or `"ip_adapter"`) with core's types:
/// field types, enum values, unknown fields and defaults. The rules that need the whole
/// parameter set (model family, duplicates, ranges) run when it is placed in one.
#[pyfunction]
pub(crate) fn validate_nested(kind: &str, body: JsonText<'_>) -> PyResult<String> {
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
    let body = body.text(kind)?;
    match kind {
        "controlnet" => canonical::<ControlNetConfig>("controlnets[]", &body),
        "ip_adapter" => canonical::<IPAdapterConfig>("ip_adapter", &body),
        other => Err(PyValueError::new_err(format!(
            "unknown nested kind {other:?}; expected \"controlnet\" or \"ip_adapter\""
        ))),
    }
}

/// What `classify` says about going from `old` to `new` (both canonical bodies, validated
/// under `settings_json`): "unchanged", "hot", "controlnet_swap" or "reload".
#[pyfunction]
#[pyo3(signature = (old, new, settings_json=None))]
pub(crate) fn classify(
    old: JsonText<'_>,
    new: JsonText<'_>,
    settings_json: Option<JsonText<'_>>,
) -> PyResult<&'static str> {
    let settings = settings_from(settings_json)?;
    let old = params_from(old, &settings)?;
    let new = params_from(new, &settings)?;
    Ok(sdstream::classify(&old, &new).kind().as_str())
}
