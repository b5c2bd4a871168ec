//! Validates a table of Daydream bodies and prints each outcome, so that other surfaces (the
//! Python module's tests) can check they accept and reject exactly as the Rust core does.
//!
//! ```text
//! cargo run --example validate_bodies -- cases.json
//! ```
//!
//! `cases.json` is a JSON list of `{"body": <object or text>, "settings": <object>?}`; the output
//! (stdout) is a JSON list of `{"ok": <canonical body>}` or `{"error": "<message>"}`, one per case.

use std::process::ExitCode;

use sdstream::{EngineSettings, StreamDiffusionParams};
use serde_json::{Value, json};

fn outcome(case: &Value) -> Value {
    let settings = match case.get("settings") {
        Some(s) if !s.is_null() => match EngineSettings::from_json(&s.to_string()) {
            Ok(settings) => settings,
            Err(e) => return json!({ "error": e.to_string() }),
        },
        _ => EngineSettings::default(),
    };
    let body = match &case["body"] {
        Value::String(text) => text.clone(),
        other => other.to_string(),
    };
    match StreamDiffusionParams::from_json_with(&body, &settings) {
        Ok(params) => match serde_json::from_str::<Value>(&params.to_json()) {
            Ok(canonical) => json!({ "ok": canonical }),
            Err(e) => json!({ "error": format!("canonical JSON does not parse: {e}") }),
        },
        Err(e) => json!({ "error": e.to_string() }),
    }
}

fn main() -> ExitCode {
    let Some(path) = std::env::args().nth(1) else {
        eprintln!("usage: validate_bodies CASES.json");
        return ExitCode::FAILURE;
    };
    let cases: Vec<Value> = match std::fs::read_to_string(&path)
        .map_err(|e| e.to_string())
        .and_then(|text| serde_json::from_str(&text).map_err(|e| e.to_string()))
    {
        Ok(cases) => cases,
        Err(e) => {
            eprintln!("{path}: {e}");
            return ExitCode::FAILURE;
        }
    };
    let outcomes: Vec<Value> = cases.iter().map(outcome).collect();
    println!("{}", Value::Array(outcomes));
    ExitCode::SUCCESS
}
