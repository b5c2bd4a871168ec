//! Which model ids an engine serves (`EngineSettings::allow_model_paths` and `allowed_models`):
//! with paths off, validation accepts only the known ids and the allowed ones, every other id
//! is refused with the same words whether or not a folder of that name exists, and loading
//! never reads a folder outside `model_root` (or the cache). The HTTP server runs this way; its
//! own answers are checked in the server module (`cargo test -p sdstream-server --lib api::`).

use crate::common;

use std::path::PathBuf;

use common::fixture;
use sdstream::model::bundle::StableDiffusionModels;
use sdstream::params::ModelKind;
use sdstream::{EngineSettings, Error, StreamDiffusionParams};
use serde_json::json;

/// Paths off, models under tests/fixtures, two of them allowed.
fn served_settings() -> EngineSettings {
    EngineSettings::from_json(
        &json!({
            "vae": "tiny-taesd",
            "model_root": fixture(""),
            "allow_any_resolution": true,
            "allow_model_paths": false,
            "allowed_models": ["tiny-sd-turbo", "tiny-controlnet-a"],
        })
        .to_string(),
    )
    .expect("served settings")
}

fn with_model(model_id: &str, settings: &EngineSettings) -> Result<StreamDiffusionParams, Error> {
    StreamDiffusionParams::from_json_with(
        &json!({"model_id": model_id, "width": 64, "height": 64}).to_string(),
        settings,
    )
}

fn with_controlnet(
    controlnet_id: &str,
    settings: &EngineSettings,
) -> Result<StreamDiffusionParams, Error> {
    StreamDiffusionParams::from_json_with(
        &json!({"model_id": "tiny-sd-turbo", "width": 64, "height": 64,
                "controlnets": [{"model_id": controlnet_id}]})
        .to_string(),
        settings,
    )
}

/// The error text of a refused body (field and message), panicking when it is accepted.
fn refusal(result: Result<StreamDiffusionParams, Error>, what: &str) -> String {
    match result {
        Err(Error::InvalidParam { field, message }) => format!("{field}: {message}"),
        Err(other) => panic!("{what}: expected InvalidParam, got {other:?}"),
        Ok(p) => panic!("{what}: accepted as {:?}", p.model_id),
    }
}

/// Ids an API client might send to reach the disk: existing folders (by absolute path, by a
/// path relative to the working directory, by `..` from model_root, under model_root but not
/// allowed) and missing ones.
fn hostile_ids() -> Vec<String> {
    let existing = fixture("tiny-sd-turbo");
    let missing: PathBuf = fixture("no-such-model");
    assert!(existing.is_dir() && !missing.exists());
    vec![
        "/etc".into(),
        "/".into(),
        "../../..".into(),
        "org/../../x".into(),
        "..".into(),
        "./tiny-sd-turbo".into(),
        "tiny-sd-turbo/".into(),
        "fixtures/../tiny-sd-turbo".into(),
        "..\\tiny-sd-turbo".into(),
        "~".into(),
        existing.display().to_string(),
        missing.display().to_string(),
        // Relative to the test's working directory (core/): exists.
        "../tests/fixtures/tiny-sd-turbo".into(),
        "../tests/fixtures/no-such-model".into(),
        // Under model_root, a complete folder, but not allowed; and one that is not there.
        "tiny-taesd".into(),
        "tiny-controlnet-b".into(),
        "no-such-model".into(),
        "org/no-such-model".into(),
    ]
}

#[test]
fn without_paths_only_known_and_allowed_ids_validate() {
    let settings = served_settings();
    assert!(!settings.allow_model_paths);
    let kind = |id: &str| with_model(id, &settings).and_then(|p| p.model_kind(&settings));
    assert_eq!(
        kind("stabilityai/sd-turbo").expect("known"),
        ModelKind::Known(sdstream::params::ModelFamily::Sd21)
    );
    assert_eq!(kind("tiny-sd-turbo").expect("allowed"), ModelKind::Allowed);

    // Every hostile id gets one answer, byte for byte, and it names the field, not the value.
    let answers: Vec<String> = hostile_ids()
        .iter()
        .map(|id| refusal(with_model(id, &settings), id))
        .collect();
    for (id, answer) in hostile_ids().iter().zip(&answers) {
        assert_eq!(answer, &answers[0], "model_id {id:?}");
    }
    assert!(answers[0].starts_with("model_id: Invalid model_id: not a model served here"));
    assert!(answers[0].contains("'tiny-sd-turbo'"), "{}", answers[0]);
    assert!(!answers[0].contains("fixtures"), "{}", answers[0]);

    // The same for ControlNets.
    assert!(with_controlnet("tiny-controlnet-a", &settings).is_ok());
    assert!(with_controlnet("thibaud/controlnet-sd21-canny-diffusers", &settings).is_ok());
    let mut controlnet_ids = hostile_ids();
    controlnet_ids.push(fixture("tiny-controlnet-b").display().to_string());
    let answers: Vec<String> = controlnet_ids
        .iter()
        .map(|id| refusal(with_controlnet(id, &settings), id))
        .collect();
    for (id, answer) in controlnet_ids.iter().zip(&answers) {
        assert_eq!(answer, &answers[0], "controlnet {id:?}");
    }
    assert!(
        answers[0].starts_with(
            "controlnets[0].model_id: controlnets[0].model_id: not a ControlNet served here"
        ),
        "{}",
        answers[0]
    );
}

#[test]
fn with_paths_folders_validate_as_before() {
    // The library default: an existing folder is a model, a missing one is named.
    let settings = EngineSettings {
        allow_any_resolution: true,
        ..EngineSettings::default()
    };
    assert!(settings.allow_model_paths);
    let existing = fixture("tiny-sd-turbo").display().to_string();
    assert!(matches!(
        with_model(&existing, &settings).and_then(|p| p.model_kind(&settings)),
        Ok(ModelKind::LocalFolder(_))
    ));
    let missing = fixture("no-such-model").display().to_string();
    let answer = refusal(with_model(&missing, &settings), "missing");
    assert!(answer.contains(&missing), "{answer}");
    // Allowed ids validate in this mode too (without being on disk: the loader resolves them).
    let settings = EngineSettings {
        allowed_models: vec!["org/not-downloaded".into()],
        ..settings
    };
    assert_eq!(
        with_model("org/not-downloaded", &settings)
            .and_then(|p| p.model_kind(&settings))
            .expect("allowed"),
        ModelKind::Allowed
    );
}

#[test]
fn settings_refuse_path_like_allowed_ids_and_vae() {
    for (body, field) in [
        (json!({"allowed_models": ["../x"]}), "allowed_models[0]"),
        (
            json!({"allowed_models": ["ok", "/etc"]}),
            "allowed_models[1]",
        ),
        (json!({"allowed_models": [""]}), "allowed_models[0]"),
        (
            json!({"allow_model_paths": false, "vae": "/etc/taesd"}),
            "vae",
        ),
        (
            json!({"allow_model_paths": false, "vae": "../taesd"}),
            "vae",
        ),
        (json!({"allow_model_paths": "no"}), "allow_model_paths"),
    ] {
        match EngineSettings::from_json(&body.to_string()) {
            Err(Error::InvalidParam { field: got, .. }) => assert_eq!(got, field, "{body}"),
            other => panic!("{body}: expected InvalidParam at {field}, got {other:?}"),
        }
    }
    // With paths allowed a vae folder is still fine.
    assert!(EngineSettings::from_json(r#"{"vae": "/models/taesd"}"#).is_ok());
}

#[test]
fn without_paths_loading_stays_under_model_root() {
    let settings = served_settings();
    let models = StableDiffusionModels::load("tiny-sd-turbo", &settings, &mut |_| {})
        .expect("an allowed id under model_root loads");
    assert_eq!(models.dir, fixture("tiny-sd-turbo"));
    models
        .controlnet("tiny-controlnet-a", &mut |_| {})
        .expect("a ControlNet id under model_root loads");
    // The loader refuses paths by itself too (for callers that skip validation).
    let path = fixture("tiny-sd-turbo").display().to_string();
    for id in [path.as_str(), "../tests/fixtures/tiny-sd-turbo", "/etc"] {
        match StableDiffusionModels::load(id, &settings, &mut |_| {}) {
            Err(Error::ModelNotFound { detail, .. }) => {
                assert!(
                    detail.contains("model paths are not allowed"),
                    "{id}: {detail}"
                )
            }
            other => panic!(
                "{id}: expected ModelNotFound, got {:?}",
                other.map(|m| m.dir)
            ),
        }
        match models.controlnet(id, &mut |_| {}) {
            Err(Error::ModelNotFound { detail, .. }) => {
                assert!(
                    detail.contains("model paths are not allowed"),
                    "{id}: {detail}"
                )
            }
            other => panic!("{id}: expected ModelNotFound, got {:?}", other.map(|_| ())),
        }
    }
}

fn with_loras(
    patch: serde_json::Value,
    settings: &EngineSettings,
) -> Result<StreamDiffusionParams, Error> {
    let mut body = json!({"model_id": "tiny-sd-turbo", "width": 64, "height": 64});
    if let (Some(b), Some(p)) = (body.as_object_mut(), patch.as_object()) {
        b.extend(p.clone());
    }
    StreamDiffusionParams::from_json_with(&body.to_string(), settings)
}

#[test]
fn without_paths_loras_go_through_the_same_policy_and_no_answer_names_the_disk() {
    let settings = served_settings();
    let root = fixture("").display().to_string();
    let root = root.trim_end_matches('/');
    // Hub ids nobody allowed, paths, and folders under model_root that are not allowed: the
    // field is named, the disk is not.
    let mut ids = hostile_ids();
    ids.extend(["org/some-lora".into(), "lora/peft-a".into()]);
    for id in &ids {
        for (patch, field) in [
            (json!({"lora_dict": {id.clone(): 0.5}}), "lora_dict"),
            (
                json!({"use_lcm_lora": true, "lcm_lora_id": id}),
                "lcm_lora_id",
            ),
        ] {
            let answer = refusal(with_loras(patch, &settings), id);
            assert!(
                answer.starts_with(&format!("{field}: {field}: ")),
                "{answer}"
            );
            assert!(
                !answer.contains(root) && !answer.contains("fixtures"),
                "{answer}"
            );
        }
    }
    let answer = refusal(
        with_loras(json!({"lora_dict": {"org/some-lora": 1.0}}), &settings),
        "",
    );
    println!("{answer}");
    assert!(
        answer.contains("\"org/some-lora\" is not a LoRA served here")
            && answer.contains("'latent-consistency/lcm-lora-sdv1-5'")
            && answer.contains("'tiny-sd-turbo'"),
        "{answer}"
    );
    // The known LCM-LoRAs are served; anything else once --allow-model lists it.
    for known in [
        "latent-consistency/lcm-lora-sdv1-5",
        "latent-consistency/lcm-lora-sdxl",
    ] {
        with_loras(
            json!({"lcm_lora_id": known, "lora_dict": {known: 1.0}}),
            &settings,
        )
        .unwrap_or_else(|e| panic!("{known}: {e}"));
    }
    let mut allowed = served_settings();
    allowed
        .allowed_models
        .extend(["lora/peft-a".to_owned(), "lora".to_owned()]);
    with_loras(
        json!({"lora_dict": {"lora/peft-a": 0.7}, "lcm_lora_id": "lora/peft-a"}),
        &allowed,
    )
    .expect("allowed LoRA ids");

    // An allowed id whose folder holds no LoRA fails at load; the message names the folder for
    // the operator, and the redactor every answer of such an engine goes through hides it.
    let mut request = sdstream::model::bundle::ModelRequest::from("tiny-sd-turbo");
    request.loras = vec![("lora".into(), 1.0)];
    let err = match StableDiffusionModels::load(request, &allowed, &mut |_| {}) {
        Err(e) => e.to_string(),
        Ok(_) => panic!("a folder without a LoRA file loaded"),
    };
    assert!(
        err.contains("lora_dict.lora") && err.contains(root),
        "{err}"
    );
    let answered = allowed.path_redactor().redact(&err);
    println!("{answered}");
    assert!(answered.contains("<model_root>/lora"), "{answered}");
    assert!(!answered.contains(root), "{answered}");
    // A program that names its own models keeps the paths.
    let local = EngineSettings {
        allow_model_paths: true,
        ..allowed
    };
    assert_eq!(local.path_redactor().redact(&err), err);
}
