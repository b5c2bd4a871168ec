//! Command-line values the subcommands share (`serve`, `replay`): a JSON value given inline or
//! as a file, and engine settings read from one. Apart from the parser (`cli.rs`), which
//! dispatches to `replay`, so that `replay` need not import it back.

use sdstream::EngineSettings;
use serde_json::Value;

/// A JSON value from a file path or, when it starts with `{`, the text itself.
pub(crate) fn json_arg(value: &str) -> Result<Value, String> {
    let text = if value.trim_start().starts_with('{') {
        value.to_owned()
    } else {
        std::fs::read_to_string(value).map_err(|e| format!("cannot read {value}: {e}"))?
    };
    serde_json::from_str(&text).map_err(|e| format!("{value}: {e}"))
}

/// `--settings` (a JSON value or a file holding one) as engine settings; the defaults without it.
pub(crate) fn engine_settings(arg: Option<&str>) -> Result<EngineSettings, String> {
    match arg {
        Some(v) => EngineSettings::from_json(&json_arg(v)?.to_string()).map_err(|e| e.to_string()),
        None => Ok(EngineSettings::default()),
    }
}
