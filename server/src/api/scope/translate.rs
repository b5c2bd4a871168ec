//! Scope's parameters mapped onto [`StreamDiffusionParams`]: pure, knowing nothing of the
//! server's state; what cannot be mapped is refused, naming the keys (docs/STREAMING.md has the
//! table).

use std::sync::OnceLock;

use axum::http::StatusCode;
use sdstream::params::json_kind;
use serde_json::{Map, Value, json};

use crate::api::bodies::{ApiError, PIPELINE};
use sdstream::StreamDiffusionParams;
use sdstream::params::{InterpolationMethod, Transition};
use sdstream::sampling::scheduler::{LcmScheduler, SchedulerConfig, t_index_list_for_timesteps};

/// Scope parameters that could not be mapped: the message and the keys.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Rejection {
    pub(crate) message: String,
    pub(crate) fields: Vec<String>,
}

impl Rejection {
    pub(super) fn new(field: &str, message: impl Into<String>) -> Self {
        Self {
            message: format!("{field}: {}", message.into()),
            fields: vec![field.to_owned()],
        }
    }

    pub(super) fn api(self) -> ApiError {
        ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "STREAMS/INVALID_PARAMS",
            self.message,
        )
    }
}

/// What a Scope parameter set or message asks for, in this server's terms.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct ScopeUpdate {
    /// A JSON Merge Patch of [`StreamDiffusionParams`].
    pub(crate) patch: Map<String, Value>,
    /// Pause or resume the input.
    pub(crate) paused: Option<bool>,
    /// How the prompt change glides (a `transition` with `num_steps` > 0 on the channel).
    pub(crate) transition: Transition,
}

/// Where a Scope parameter set comes from: the rules differ slightly (Scope itself fills a
/// `transition` without `num_steps` with 4 in an offer, 0 on the data channel).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Source {
    /// `initialParameters` of an offer, or `load_params` of a pipeline load.
    Offer,
    /// A data-channel message.
    Channel,
}

/// Every top-level key of [`StreamDiffusionParams`] (taken as they are).
fn params_fields() -> &'static [String] {
    static FIELDS: OnceLock<Vec<String>> = OnceLock::new();
    FIELDS.get_or_init(|| {
        let all: Value =
            serde_json::from_str(&StreamDiffusionParams::default().to_json()).unwrap_or_default();
        all.as_object()
            .map(|m| m.keys().cloned().collect())
            .unwrap_or_default()
    })
}

/// Scope's `[{text, weight}]` as this server's `prompt`: one text alone, several as
/// `[[text, weight], …]` (blended as `prompt_interpolation_method` says).
fn prompt_of(field: &str, v: &Value) -> Result<Value, Rejection> {
    let items = v.as_array().ok_or_else(|| {
        Rejection::new(
            field,
            format!("must be a list of {{text, weight}}, not {}", json_kind(v)),
        )
    })?;
    if items.is_empty() {
        return Err(Rejection::new(field, "must not be empty"));
    }
    let mut pairs = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        let path = format!("{field}[{i}]");
        let map = item
            .as_object()
            .ok_or_else(|| Rejection::new(&path, "must be an object {text, weight}"))?;
        if let Some(extra) = map.keys().find(|k| *k != "text" && *k != "weight") {
            return Err(Rejection::new(&path, format!("unknown key {extra:?}")));
        }
        let text = map
            .get("text")
            .and_then(Value::as_str)
            .ok_or_else(|| Rejection::new(&format!("{path}.text"), "must be a string"))?;
        let weight = match map.get("weight") {
            None | Some(Value::Null) => 1.0,
            Some(w) => w
                .as_f64()
                .filter(|w| *w >= 0.0)
                .ok_or_else(|| Rejection::new(&format!("{path}.weight"), "must be a number ≥ 0"))?,
        };
        pairs.push(json!([text, weight]));
    }
    if pairs.len() == 1 {
        Ok(pairs[0][0].clone())
    } else {
        Ok(Value::Array(pairs))
    }
}

fn interpolation(field: &str, v: &Value) -> Result<Value, Rejection> {
    match v.as_str() {
        Some("linear" | "slerp") => Ok(v.clone()),
        _ => Err(Rejection::new(field, "must be \"linear\" or \"slerp\"")),
    }
}

/// Maps a Scope parameter object onto this server's terms (module docs; docs/STREAMING.md).
/// `current` is the stream's parameters (for `denoising_step_list`, which needs the grid of
/// `num_inference_steps`).
pub(crate) fn translate(
    value: &Value,
    source: Source,
    current: &StreamDiffusionParams,
) -> Result<ScopeUpdate, Rejection> {
    let map = value.as_object().ok_or_else(|| {
        Rejection::new(
            "parameters",
            format!("must be a JSON object, not {}", json_kind(value)),
        )
    })?;
    let mut update = ScopeUpdate::default();
    let mut unsupported = Vec::new();
    let mut steps: Option<&Value> = None;
    let mut seed_from: Option<&str> = None;
    for (key, v) in map {
        // Scope's clients drop null values before sending; a null here means "not given".
        if v.is_null() {
            continue;
        }
        match key.as_str() {
            "prompts" => {
                // A transition's target prompts win over plain prompts.
                if map.get("transition").is_none_or(Value::is_null) {
                    update
                        .patch
                        .insert("prompt".into(), prompt_of("prompts", v)?);
                }
            }
            "transition" => {
                let t = v
                    .as_object()
                    .ok_or_else(|| Rejection::new("transition", "must be an object"))?;
                if let Some(extra) = t.keys().find(|k| {
                    ![
                        "target_prompts",
                        "num_steps",
                        "temporal_interpolation_method",
                    ]
                    .contains(&k.as_str())
                }) {
                    return Err(Rejection::new(
                        "transition",
                        format!("unknown key {extra:?}"),
                    ));
                }
                let target = t
                    .get("target_prompts")
                    .ok_or_else(|| Rejection::new("transition.target_prompts", "is required"))?;
                // Scope fills a missing num_steps with 4 in an offer and 0 on the data channel;
                // an offer has nothing to glide from, so its target prompts apply at once.
                let default_steps = if source == Source::Offer { 4 } else { 0 };
                let num_steps = match t.get("num_steps") {
                    None | Some(Value::Null) => default_steps,
                    Some(n) => n.as_u64().ok_or_else(|| {
                        Rejection::new("transition.num_steps", "must be an integer ≥ 0")
                    })?,
                };
                let method = match t
                    .get("temporal_interpolation_method")
                    .filter(|m| !m.is_null())
                {
                    Some(m) => {
                        interpolation("transition.temporal_interpolation_method", m)?;
                        if m == "slerp" {
                            InterpolationMethod::Slerp
                        } else {
                            InterpolationMethod::Linear
                        }
                    }
                    None => InterpolationMethod::Linear,
                };
                let glide = Transition::new(u32::try_from(num_steps).unwrap_or(u32::MAX), method);
                glide.validate().map_err(|e| Rejection {
                    message: e.to_string(),
                    fields: vec!["transition.num_steps".into()],
                })?;
                if source == Source::Channel {
                    update.transition = glide;
                }
                update.patch.insert(
                    "prompt".into(),
                    prompt_of("transition.target_prompts", target)?,
                );
            }
            "prompt_interpolation_method" => {
                update.patch.insert(key.clone(), interpolation(key, v)?);
            }
            "denoising_step_list" => steps = Some(v),
            "seed" | "base_seed" => {
                if let Some(other) = seed_from {
                    return Err(Rejection {
                        message: format!("give {other} or {key}, not both"),
                        fields: vec![other.to_owned(), key.clone()],
                    });
                }
                seed_from = Some(key);
                let seed = v
                    .as_u64()
                    .ok_or_else(|| Rejection::new(key, "must be an integer ≥ 0"))?;
                update.patch.insert("seed".into(), json!(seed));
            }
            "paused" => {
                update.paused = Some(
                    v.as_bool()
                        .ok_or_else(|| Rejection::new("paused", "must be true or false"))?,
                );
            }
            "input_mode" => match v.as_str() {
                Some("video") => {}
                Some("text") => {
                    return Err(Rejection::new(
                        "input_mode",
                        "\"text\" (generating without input video) is not supported: sdstream \
                         transforms the video the session sends",
                    ));
                }
                _ => {
                    return Err(Rejection::new(
                        "input_mode",
                        "must be \"video\" or \"text\"",
                    ));
                }
            },
            "pipeline_ids" if source == Source::Offer => check_pipeline_ids(v)?,
            "produces_video" if v == &json!(true) => {}
            "produces_audio" if v == &json!(false) => {}
            k if params_fields().iter().any(|f| f == k) => {
                update.patch.insert(key.clone(), v.clone());
            }
            _ => unsupported.push(key.clone()),
        }
    }
    if !unsupported.is_empty() {
        return Err(Rejection {
            message: format!(
                "not supported here: {} (sdstream runs StreamDiffusion: it takes prompts, \
                 transition, prompt_interpolation_method, \
                 denoising_step_list, seed, paused and StreamDiffusionParams fields)",
                unsupported.join(", ")
            ),
            fields: unsupported,
        });
    }
    if let Some(v) = steps {
        let list: Vec<i64> = v
            .as_array()
            .and_then(|a| a.iter().map(Value::as_i64).collect::<Option<Vec<_>>>())
            .ok_or_else(|| Rejection::new("denoising_step_list", "must be a list of integers"))?;
        let n = match update.patch.get("num_inference_steps") {
            Some(n) => n.as_u64().map(|n| n as usize).ok_or_else(|| {
                Rejection::new("num_inference_steps", "must be an integer from 1 to 100")
            })?,
            None => current.num_inference_steps as usize,
        };
        let scheduler = LcmScheduler::new(SchedulerConfig::default())
            .map_err(|e| Rejection::new("denoising_step_list", e.to_string()))?;
        let grid = scheduler
            .timesteps(n)
            .map_err(|e| Rejection::new("num_inference_steps", e.to_string()))?;
        let indices = t_index_list_for_timesteps(&grid, 1000, &list).map_err(|e| Rejection {
            message: e.to_string(),
            fields: vec!["denoising_step_list".into()],
        })?;
        update.patch.insert("t_index_list".into(), json!(indices));
    }
    Ok(update)
}

/// `pipeline_ids` must name the one pipeline served.
pub(super) fn check_pipeline_ids(v: &Value) -> Result<(), Rejection> {
    let ids = v
        .as_array()
        .and_then(|a| a.iter().map(Value::as_str).collect::<Option<Vec<_>>>())
        .ok_or_else(|| Rejection::new("pipeline_ids", "must be a list of strings"))?;
    match ids.as_slice() {
        [id] if *id == PIPELINE => Ok(()),
        _ => Err(Rejection::new(
            "pipeline_ids",
            format!("{ids:?} is not served here; the only pipeline is [\"{PIPELINE}\"]"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params() -> StreamDiffusionParams {
        StreamDiffusionParams::default()
    }

    fn ok(v: Value, source: Source) -> ScopeUpdate {
        translate(&v, source, &params()).unwrap_or_else(|r| panic!("{v}: {}", r.message))
    }

    fn refused(v: Value, source: Source) -> Rejection {
        translate(&v, source, &params()).expect_err(&v.to_string())
    }

    #[test]
    fn scope_parameters_map_onto_streamdiffusion_params() {
        let u = ok(
            json!({"prompts": [{"text": "a fox", "weight": 1.0}]}),
            Source::Channel,
        );
        assert_eq!(Value::Object(u.patch), json!({"prompt": "a fox"}));
        let u = ok(
            json!({
                "prompts": [{"text": "a fox", "weight": 3}, {"text": "a cat"}],
                "prompt_interpolation_method": "linear",
                "seed": 7,
                "paused": true,
                "negative_prompt": "blurry",
                "input_mode": "video",
                "produces_video": true,
                "produces_audio": false,
                "noise_scale": null,
            }),
            Source::Channel,
        );
        assert_eq!(
            Value::Object(u.patch),
            json!({
                "prompt": [["a fox", 3.0], ["a cat", 1.0]],
                "prompt_interpolation_method": "linear",
                "seed": 7,
                "negative_prompt": "blurry",
            })
        );
        assert_eq!(u.paused, Some(true));
        // Timesteps to grid indices, on the stream's own num_inference_steps (50) or the
        // message's.
        let u = ok(
            json!({"denoising_step_list": [1000, 750, 500, 250]}),
            Source::Channel,
        );
        assert_eq!(u.patch["t_index_list"], json!([0, 12, 25, 37]));
        let u = ok(
            json!({"denoising_step_list": [700, 500], "num_inference_steps": 4}),
            Source::Channel,
        );
        assert_eq!(u.patch["t_index_list"], json!([1, 2]));
        // A transition with num_steps 0 switches to its targets (over `prompts`).
        let u = ok(
            json!({"prompts": [{"text": "old"}],
                   "transition": {"target_prompts": [{"text": "new"}], "num_steps": 0}}),
            Source::Channel,
        );
        assert_eq!(u.patch["prompt"], json!("new"));
        // On the channel a transition without num_steps is instant, as Scope reads it.
        let u = ok(
            json!({"transition": {"target_prompts": [{"text": "x"}]}}),
            Source::Channel,
        );
        assert_eq!(u.patch["prompt"], json!("x"));
        assert!(u.transition.is_instant());
        // With num_steps the channel's prompt change glides.
        let u = ok(
            json!({"transition": {"target_prompts": [{"text": "y"}], "num_steps": 8,
                                  "temporal_interpolation_method": "slerp"}}),
            Source::Channel,
        );
        assert_eq!(u.patch["prompt"], json!("y"));
        assert_eq!(u.transition, Transition::new(8, InterpolationMethod::Slerp));
        // An offer has nothing to glide from: its target prompts apply at once (Scope's
        // default of 4 steps is accepted and has no effect).
        let u = ok(
            json!({"transition": {"target_prompts": [{"text": "z"}]}}),
            Source::Offer,
        );
        assert_eq!(u.patch["prompt"], json!("z"));
        assert!(u.transition.is_instant());
        // base_seed (Scope's load parameter) is the seed too; pipeline_ids in an offer.
        let u = ok(
            json!({"base_seed": 42, "pipeline_ids": ["streamdiffusion"]}),
            Source::Offer,
        );
        assert_eq!(Value::Object(u.patch), json!({"seed": 42}));
    }

    #[test]
    fn what_cannot_be_mapped_is_refused_naming_the_keys() {
        let r = refused(
            json!({"prompts": [{"text": "x"}], "noise_scale": 0.7, "kv_cache_attention_bias": 0.3}),
            Source::Channel,
        );
        assert_eq!(r.fields, vec!["kv_cache_attention_bias", "noise_scale"]);
        assert!(r.message.contains("not supported here"), "{}", r.message);
        for (v, field, says) in [
            (json!([1, 2]), "parameters", "JSON object"),
            (json!({"prompts": []}), "prompts", "empty"),
            (json!({"prompts": "a fox"}), "prompts", "list"),
            (
                json!({"prompts": [{"text": "a", "weight": -1}]}),
                "prompts[0].weight",
                "≥ 0",
            ),
            (
                json!({"prompts": [{"txt": "a"}]}),
                "prompts[0]",
                "unknown key",
            ),
            (
                json!({"transition": {"target_prompts": [{"text": "x"}], "num_steps": 5000}}),
                "transition.num_steps",
                "at most 1000",
            ),
            (
                json!({"transition": {"target_prompts": [{"text": "x"}], "num_steps": 0,
                       "temporal_interpolation_method": "cubic"}}),
                "transition.temporal_interpolation_method",
                "linear",
            ),
            (json!({"input_mode": "text"}), "input_mode", "not supported"),
            (json!({"paused": "yes"}), "paused", "true or false"),
            (json!({"seed": -3}), "seed", "integer"),
            (
                json!({"denoising_step_list": [1200]}),
                "denoising_step_list",
                "timestep",
            ),
            (
                json!({"denoising_step_list": "700"}),
                "denoising_step_list",
                "integers",
            ),
            (
                json!({"pipeline_ids": ["longlive"]}),
                "pipeline_ids",
                "not served",
            ),
        ] {
            let source = if field == "pipeline_ids" {
                Source::Offer
            } else {
                Source::Channel
            };
            let r = refused(v.clone(), source);
            assert_eq!(r.fields, vec![field.to_owned()], "{v}");
            assert!(r.message.contains(says), "{v}: {}", r.message);
        }
        let r = refused(json!({"seed": 1, "base_seed": 2}), Source::Channel);
        assert_eq!(r.fields.len(), 2);
        // pipeline_ids is an offer's; on the channel it is not a parameter.
        let r = refused(
            json!({"pipeline_ids": ["streamdiffusion"]}),
            Source::Channel,
        );
        assert_eq!(r.fields, vec!["pipeline_ids"]);
    }
}
