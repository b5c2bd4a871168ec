//! A Scope session's `parameters` data channel: each message translated ([`super::translate`])
//! and applied to the session's stream whole or not at all, answered on the channel.

use std::sync::Weak;

use serde_json::{Value, json};

use super::translate::{Rejection, Source, translate};
use crate::api::state::{App, StreamEntry};
use crate::webrtc::ControlHandler;
use sdstream::UpdateKind;

/// Largest data-channel message taken.
const MAX_CONTROL_BYTES: usize = 64 * 1024;

/// A Scope session's data-channel messages, applied to its stream.
pub(super) struct Control {
    pub(super) app: Weak<App>,
    pub(super) stream: String,
}

impl Control {
    fn apply(&self, app: &App, entry: &StreamEntry, message: &[u8]) -> Result<Value, Rejection> {
        if message.len() > MAX_CONTROL_BYTES {
            return Err(Rejection::new(
                "message",
                format!(
                    "{} bytes; at most {MAX_CONTROL_BYTES} are taken",
                    message.len()
                ),
            ));
        }
        let text = std::str::from_utf8(message)
            .map_err(|_| Rejection::new("message", "is not UTF-8 text"))?;
        let value: Value = serde_json::from_str(text)
            .map_err(|e| Rejection::new("message", format!("is not JSON: {e}")))?;
        let current = entry.engine.params();
        let update = translate(&value, Source::Channel, &current)?;
        let mut kind = UpdateKind::Unchanged;
        if !update.patch.is_empty() {
            let patch = Value::Object(update.patch.clone());
            let params = current
                .patched(&patch, &app.config().settings)
                .map_err(|e| Rejection {
                    message: e.to_string(),
                    fields: update.patch.keys().cloned().collect(),
                })?;
            let applied = entry
                .engine
                .update_params_with_transition(params.clone(), update.transition)
                .map_err(|e| Rejection {
                    message: e.to_string(),
                    fields: update.patch.keys().cloned().collect(),
                })?;
            kind = applied.kind();
            if let Some(r) = &entry.recorder {
                r.params(entry.engine.status().params_version, &params);
            }
            entry.touch();
        }
        if let Some(paused) = update.paused {
            entry.transport.set_paused(paused);
        }
        let version = entry.engine.status().params_version;
        tracing::info!(stream = %entry.id, update = kind.as_str(), version, "Scope parameters applied");
        Ok(json!({
            "type": "parameters_applied",
            "update": kind.as_str(),
            "params_version": version,
            "paused": entry.transport.is_paused(),
        }))
    }
}

impl ControlHandler for Control {
    fn on_message(&self, _session_id: &str, message: &[u8]) -> Vec<String> {
        let Some(app) = self.app.upgrade() else {
            return Vec::new();
        };
        let Some(entry) = app.stream(&self.stream) else {
            return Vec::new();
        };
        let reply = match self.apply(&app, &entry, message) {
            Ok(reply) => reply,
            Err(rejection) => {
                tracing::info!(stream = %entry.id, error = %rejection.message, "Scope parameters rejected");
                json!({
                    "type": "parameters_rejected",
                    "error_message": rejection.message,
                    "fields": rejection.fields,
                })
            }
        };
        vec![reply.to_string()]
    }

    fn on_end(&self, _session_id: &str) {
        let Some(app) = self.app.upgrade() else {
            return;
        };
        let stream = self.stream.clone();
        tokio::spawn(async move {
            let _ = app.remove(&stream, "the session's connection ended").await;
        });
    }
}
