//! What the transport tests (tests/webrtc.rs, tests/rtmp_fuzz.rs) share: the tiny checkpoint's
//! engine at 64×64, a small Tokio runtime and the fuzzing's random choices.

use std::path::PathBuf;
use std::sync::Arc;

use sdstream::params::{Prompt, VaeChoice};
use sdstream::{Engine, EngineOptions, EngineSettings, StreamDiffusionParams};

// Each test binary takes the part of it that it uses.
#[allow(dead_code)]
#[path = "../support/rng.rs"]
mod rng;
pub use rng::Rng;

/// `tests/fixtures/<rel>` at the workspace root.
pub fn fixture(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures")
        .join(rel)
}

/// An engine over tests/fixtures/tiny-sd-turbo with the tiny TAESD, 64×64.
pub fn tiny_engine() -> Arc<Engine> {
    let settings = EngineSettings {
        vae: VaeChoice::Custom(fixture("tiny-taesd").display().to_string()),
        allow_any_resolution: true,
        ..EngineSettings::default()
    };
    let params = StreamDiffusionParams {
        model_id: fixture("tiny-sd-turbo").display().to_string(),
        prompt: Prompt::Text("a lighthouse".into()),
        width: 64,
        height: 64,
        ..StreamDiffusionParams::default()
    };
    Arc::new(Engine::new(params, settings, EngineOptions::default()).expect("engine"))
}

/// A multi-threaded runtime with two workers, as the server's machine has cores.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .worker_threads(2)
        .build()
        .expect("runtime")
}
