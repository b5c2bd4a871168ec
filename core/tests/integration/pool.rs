//! The model pool on the tiny checkpoint: engines on one model share one copy of its networks
//! and of its ControlNets, concurrent requests load once, entries go when their last stream
//! does, and what changes the loaded networks (dtype, autoencoder) makes another entry. Every
//! assertion is on counts and pointers. Each test uses a pool of its own, so that tests running
//! side by side cannot change each other's counts, except the one that checks the process-wide
//! pool, which checks an entry of its own.

use crate::common;

use std::path::Path;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use common::fixture;
use sdstream::model::bundle::StableDiffusionModels;
use sdstream::model::kernels::{self, KernelPolicy, Winograd};
use sdstream::model::pool::{ModelPool, PoolStats};
use sdstream::params::{ControlNetConfig, DTypeChoice, Prompt, VaeChoice};
use sdstream::{
    Engine, EngineOptions, EngineSettings, Frame, PixelFormat, StreamDiffusion,
    StreamDiffusionParams,
};

const SIZE: usize = 64;

/// How long a handshake between two loading threads may take before the test gives up instead
/// of hanging; never a measurement.
const HANDSHAKE_LIMIT: Duration = Duration::from_secs(300);

fn settings() -> EngineSettings {
    EngineSettings {
        vae: VaeChoice::Custom(fixture("tiny-taesd").display().to_string()),
        allow_any_resolution: true,
        ..EngineSettings::default()
    }
}

fn model_id() -> String {
    fixture("tiny-sd-turbo").display().to_string()
}

fn controlnet_id() -> String {
    fixture("tiny-controlnet-a").display().to_string()
}

fn params() -> StreamDiffusionParams {
    StreamDiffusionParams {
        model_id: model_id(),
        prompt: Prompt::Text("a watercolor of a lighthouse".into()),
        width: SIZE as i64,
        height: SIZE as i64,
        ..StreamDiffusionParams::default()
    }
}

fn with_controlnet() -> StreamDiffusionParams {
    let mut p = params();
    p.controlnets.push(ControlNetConfig::new(controlnet_id()));
    p
}

fn frame_bytes() -> Vec<u8> {
    let path = fixture("frames/000.png");
    image::open(&path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .to_rgb8()
        .into_raw()
}

fn frame(data: &[u8]) -> Frame<'_> {
    Frame::packed(data, SIZE, SIZE, PixelFormat::Rgb8).expect("64×64 RGB frame")
}

fn engine_in(pool: &Arc<ModelPool>, params: StreamDiffusionParams) -> Engine {
    Engine::builder(params)
        .settings(settings())
        .options(EngineOptions {
            warmup: false,
            ..EngineOptions::default()
        })
        .pool(pool.clone())
        .load()
        .expect("engine")
}

/// The bytes the float tensors of a safetensors file take in f32, from its header.
fn f32_bytes(path: &Path) -> u64 {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let len = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes")) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + len]).expect("header");
    header
        .as_object()
        .expect("header object")
        .iter()
        .filter(|(name, info)| {
            *name != "__metadata__"
                && matches!(info["dtype"].as_str(), Some("F32" | "F16" | "BF16"))
        })
        .map(|(_, info)| {
            let shape = info["shape"].as_array().expect("shape");
            4 * shape
                .iter()
                .map(|d| d.as_u64().expect("dim"))
                .product::<u64>()
        })
        .sum()
}

#[test]
fn five_engines_share_one_copy_and_release_it_when_dropped() {
    let pool = Arc::new(ModelPool::new());
    let engines: Vec<Engine> = (0..5).map(|_| engine_in(&pool, params())).collect();

    let entries = pool.entries();
    assert_eq!(entries.len(), 1, "{entries:#?}");
    assert_eq!(entries[0].holders, 5, "one holder per engine's pipeline");
    assert_eq!(
        pool.stats(),
        PoolStats {
            loads: 1,
            reuses: 4,
            waits: 0,
            lora_rebuilds: 0,
        }
    );
    let shared = pool.find(&params(), &settings()).expect("loaded");
    assert!(Arc::ptr_eq(
        &shared,
        &pool
            .get(&model_id(), &settings(), &mut |_| {})
            .expect("get")
    ));
    // The loaded f32 networks hold exactly the float tensors of the files they were read from,
    // in f32 (text encoder, UNet, TAESD; the checkpoint's own VAE is not loaded with TAESD).
    let files: u64 = [
        "tiny-sd-turbo/text_encoder/model.safetensors",
        "tiny-sd-turbo/unet/diffusion_pytorch_model.safetensors",
        "tiny-taesd/diffusion_pytorch_model.safetensors",
    ]
    .iter()
    .map(|f| f32_bytes(&fixture(f)))
    .sum();
    assert_eq!(entries[0].weight_bytes, files);
    assert_eq!(entries[0].weight_bytes, shared.weight_bytes());
    assert_eq!(pool.total_bytes(), files);
    drop(shared);

    // The same weights give the same pictures in every engine.
    let input = frame_bytes();
    let outputs: Vec<Vec<u8>> = engines
        .iter()
        .map(|e| e.process(frame(&input)).expect("output").image.data)
        .collect();
    assert!(outputs.iter().all(|o| *o == outputs[0]));

    // A reload that keeps the checkpoint (a size change), and one naming another spelling of
    // its folder, reuse the weights.
    let mut wider = params();
    wider.width = 128;
    assert!(
        engines[0]
            .update_params(wider)
            .expect("reload")
            .needs_reload()
    );
    let mut respelled = params();
    respelled.model_id = format!("{}/.", model_id());
    assert!(
        engines[1]
            .update_params(respelled)
            .expect("reload")
            .needs_reload()
    );
    for engine in &engines[..2] {
        // The reload is built in the background; frames keep coming from the old pipeline
        // until it swaps in.
        let swapped = (0..10_000).any(|_| {
            engine
                .process(frame(&input))
                .expect("output")
                .params_version
                == 1
        });
        assert!(swapped, "the reload never swapped in");
    }
    // (The replaced pipelines are freed in the background, so the holders are not counted.)
    assert_eq!(pool.stats().loads, 1);
    assert_eq!(pool.entries().len(), 1);

    drop(engines);
    assert!(pool.entries().is_empty(), "{:#?}", pool.entries());
    assert_eq!(pool.total_bytes(), 0);
    assert!(pool.find(&params(), &settings()).is_none());
    // A later stream loads again: nothing was kept.
    let again = engine_in(&pool, params());
    assert_eq!(pool.stats().loads, 2);
    drop(again);
    assert!(pool.entries().is_empty());
}

/// Runs `first` and `second` so that `second` starts while `first` is inside a load: `first`'s
/// progress stops at its first line until `second` reports that it waits. Returns both results
/// and whether `second` reported waiting.
fn overlapping<T: Send>(
    first: impl FnOnce(&mut dyn FnMut(&str)) -> T + Send,
    second: impl FnOnce(&mut dyn FnMut(&str)) -> T + Send,
) -> (T, T, bool) {
    let (loading_tx, loading_rx) = mpsc::channel::<()>();
    let (waiting_tx, waiting_rx) = mpsc::channel::<()>();
    let waited = Mutex::new(false);
    let flag = &waited;
    thread::scope(|scope| {
        let a = scope.spawn(move || {
            let mut announced = false;
            first(&mut |line: &str| {
                if !announced && line.starts_with("loading") {
                    announced = true;
                    loading_tx.send(()).expect("announce the load");
                    if waiting_rx.recv_timeout(HANDSHAKE_LIMIT).is_ok() {
                        *flag.lock().expect("flag") = true;
                    }
                }
            })
        });
        loading_rx
            .recv_timeout(HANDSHAKE_LIMIT)
            .expect("the first request started loading");
        let b = scope.spawn(move || {
            second(&mut |line: &str| {
                if line.starts_with("waiting for") {
                    let _ = waiting_tx.send(());
                }
            })
        });
        let (a, b) = (a.join().expect("first"), b.join().expect("second"));
        (a, b, *flag.lock().expect("flag"))
    })
}

#[test]
fn concurrent_requests_for_one_model_load_it_once() {
    let pool = ModelPool::new();
    let get = |progress: &mut dyn FnMut(&str)| {
        pool.get(&model_id(), &settings(), progress)
            .expect("models")
    };
    let (a, b, waited) = overlapping(get, get);
    assert!(
        waited,
        "the second request did not wait for the first's load"
    );
    assert!(Arc::ptr_eq(&a, &b));
    assert_eq!(
        pool.stats(),
        PoolStats {
            loads: 1,
            reuses: 1,
            waits: 1,
            lora_rebuilds: 0,
        }
    );
    assert_eq!(pool.entries().len(), 1);
    assert_eq!(pool.entries()[0].holders, 2);
}

#[test]
fn two_engines_spawned_together_load_once() {
    let pool = Arc::new(ModelPool::new());
    let spawn = || {
        Engine::builder(params())
            .settings(settings())
            .pool(pool.clone())
            .spawn()
            .expect("spawn")
    };
    let (a, b) = (spawn(), spawn());
    a.wait_ready(None).expect("first ready");
    b.wait_ready(None).expect("second ready");
    let stats = pool.stats();
    assert_eq!(stats.loads, 1, "{stats:?}");
    assert_eq!(stats.reuses, 1, "{stats:?}");
    assert_eq!(pool.entries()[0].holders, 2);
    drop((a, b));
    assert!(pool.entries().is_empty());
}

#[test]
fn dtype_and_autoencoder_make_separate_entries_and_spellings_do_not() {
    let pool = ModelPool::new();
    let get = |model_id: &str, settings: &EngineSettings| {
        pool.get(model_id, settings, &mut |_| {}).expect("models")
    };
    let f32_taesd = get(&model_id(), &settings());
    let f16_taesd = get(
        &model_id(),
        &EngineSettings {
            dtype: DTypeChoice::F16,
            ..settings()
        },
    );
    let f32_full = get(
        &model_id(),
        &EngineSettings {
            vae: VaeChoice::Full,
            ..settings()
        },
    );
    // Other spellings of the same folders (model and TAESD) share.
    let respelled = get(
        &format!("{}/.", model_id()),
        &EngineSettings {
            vae: VaeChoice::Custom(format!("{}/.", fixture("tiny-taesd").display())),
            ..settings()
        },
    );
    assert!(Arc::ptr_eq(&f32_taesd, &respelled));
    assert!(!Arc::ptr_eq(&f32_taesd, &f16_taesd));
    assert!(!Arc::ptr_eq(&f32_taesd, &f32_full));
    assert_eq!(pool.stats().loads, 3);
    assert_eq!(pool.stats().reuses, 1);

    let mut entries = pool.entries();
    entries.sort_by(|a, b| (&a.dtype, &a.vae).cmp(&(&b.dtype, &b.vae)));
    let described: Vec<(&str, bool, usize)> = entries
        .iter()
        .map(|e| (e.dtype.as_str(), e.vae == "full", e.holders))
        .collect();
    assert_eq!(
        described,
        [("f16", false, 1), ("f32", false, 2), ("f32", true, 1)]
    );
    // Half the bytes in f16: every loaded tensor is a float in the networks' dtype.
    assert_eq!(f16_taesd.weight_bytes() * 2, f32_taesd.weight_bytes());

    // A spelling never asked for is not found without a load (no disk is read for `find`).
    assert!(
        pool.find(&format!("{}/./.", model_id()), &settings())
            .is_none()
    );

    drop((f32_taesd, respelled, f16_taesd));
    let left = pool.entries();
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].vae, "full");
    drop(f32_full);
    assert!(pool.entries().is_empty());
}

#[test]
fn a_controlnet_is_loaded_once_for_two_engines() {
    let pool = Arc::new(ModelPool::new());
    let a = engine_in(&pool, with_controlnet());
    let b = engine_in(&pool, with_controlnet());
    let models = pool.find(&params(), &settings()).expect("loaded");
    assert_eq!(models.controlnet_loads(), 1);
    assert_eq!(pool.stats().loads, 1);
    let entries = pool.entries();
    assert_eq!(entries[0].controlnets, 1);
    let net_file = fixture("tiny-controlnet-a/diffusion_pytorch_model.fp16.safetensors");
    assert_eq!(entries[0].controlnet_bytes, f32_bytes(&net_file));
    assert_eq!(
        pool.total_bytes(),
        entries[0].weight_bytes + entries[0].controlnet_bytes
    );

    // A third engine adding the net later (a ControlNet swap) and another spelling of its
    // folder take the same copy.
    let c = engine_in(&pool, params());
    c.update_params(with_controlnet()).expect("swap");
    let respelled = models
        .controlnet(&format!("{}/.", controlnet_id()), &mut |_| {})
        .expect("net");
    assert!(Arc::ptr_eq(
        &respelled,
        &models.cached_controlnet(&controlnet_id()).expect("cached")
    ));
    let input = frame_bytes();
    c.process(frame(&input)).expect("output with the net");
    assert_eq!(c.params().controlnets.len(), 1);
    assert_eq!(models.controlnet_loads(), 1);
    assert_eq!(pool.entries()[0].controlnets, 1);
    drop((a, b, c, respelled, models));
    assert!(pool.entries().is_empty());
}

#[test]
fn concurrent_requests_for_one_controlnet_load_it_once() {
    let models =
        StableDiffusionModels::load(&model_id(), &settings(), &mut |_| {}).expect("models");
    let get = |progress: &mut dyn FnMut(&str)| {
        models.controlnet(&controlnet_id(), progress).expect("net")
    };
    let (a, b, waited) = overlapping(get, get);
    assert!(
        waited,
        "the second request did not wait for the first's load"
    );
    assert!(Arc::ptr_eq(&a, &b));
    assert_eq!(models.controlnet_loads(), 1);
    assert_eq!(models.cached_controlnet_ids(), [controlnet_id()]);
}

/// The process-wide pool, which other tests of this binary use at the same time (every
/// `Engine::new` goes through it): this test loads a private copy of the checkpoint, so that
/// the entry it checks is its own, and asserts on that entry rather than on the pool's counts.
#[test]
fn engines_and_streams_share_the_process_wide_pool() {
    let dir = common::scratch_dir("process-wide-pool");
    common::copy_dir(&fixture("tiny-sd-turbo"), &dir);
    let own = StreamDiffusionParams {
        model_id: dir.display().to_string(),
        ..params()
    };
    let global = ModelPool::global();
    let own_entries = || {
        let dir = std::fs::canonicalize(&dir).expect("scratch dir");
        global
            .entries()
            .into_iter()
            .filter(|e| std::fs::canonicalize(&e.model_dir).is_ok_and(|d| d == dir))
            .collect::<Vec<_>>()
    };
    let engine = Engine::new(own.clone(), settings(), EngineOptions::default()).expect("engine");
    let stream =
        StreamDiffusion::new_with_progress(own.clone(), settings(), &mut |_| {}).expect("stream");
    let shared = global.find(&own, &settings()).expect("in the pool");
    assert!(Arc::ptr_eq(stream.models(), &shared));
    drop(shared);
    // One entry for the checkpoint, held by both: the engine's pipeline shares the stream's
    // networks (one load).
    let entries = own_entries();
    assert_eq!(entries.len(), 1, "{entries:#?}");
    assert_eq!(entries[0].holders, 2);
    drop((engine, stream));
    assert!(own_entries().is_empty());
    let _ = std::fs::remove_dir_all(&dir);
}

/// The settings' kernel policy is part of what networks are shared by (a layer's layout is
/// decided at load), and a stream runs every call under it, whatever the caller's thread has.
#[test]
fn a_kernel_policy_in_the_settings_keys_the_pool_and_runs_the_stream() {
    let pool = Arc::new(ModelPool::new());
    let under = |winograd| EngineSettings {
        kernels: Some(KernelPolicy {
            winograd,
            ..KernelPolicy::process()
        }),
        ..settings()
    };
    let off = pool
        .get(&params(), &under(Winograd::Off), &mut |_| {})
        .expect("off");
    let f2 = pool
        .get(&params(), &under(Winograd::F2), &mut |_| {})
        .expect("f2");
    assert!(
        !Arc::ptr_eq(&off, &f2),
        "networks shared across kernel policies"
    );
    let again = pool
        .get(&params(), &under(Winograd::F2), &mut |_| {})
        .expect("f2 again");
    assert!(Arc::ptr_eq(&f2, &again));
    let stats = pool.stats();
    assert_eq!((stats.loads, stats.reuses), (2, 1));

    let bytes = frame_bytes();
    let mut counts = Vec::new();
    for (models, winograd) in [(off, Winograd::Off), (f2, Winograd::F2)] {
        let mut stream =
            StreamDiffusion::with_models(models, params(), under(winograd)).expect("stream");
        let before = kernels::winograd_convolutions_on_this_thread();
        stream.process(&frame(&bytes)).expect("frame");
        counts.push(kernels::winograd_convolutions_on_this_thread() - before);
    }
    // By default the tiny networks' layers are too narrow for Winograd's kernel; F2 takes every
    // f32 3×3 stride-1 convolution of the frame (measured: 486 a txt2img case, more with the
    // encoder).
    assert_eq!(
        counts[0], 0,
        "Winograd ran under a policy that turns it off"
    );
    assert!(
        counts[1] >= 100,
        "only {} convolutions on Winograd",
        counts[1]
    );

    // An engine takes the policy into the pool the same way: F2 again is shared, F4 loads anew.
    let engine_under = |winograd| {
        Engine::builder(params())
            .settings(under(winograd))
            .options(EngineOptions {
                warmup: false,
                ..EngineOptions::default()
            })
            .pool(pool.clone())
            .load()
            .expect("engine")
    };
    let (_f2_engine, _f4_engine) = (engine_under(Winograd::F2), engine_under(Winograd::F4));
    let stats = pool.stats();
    assert_eq!((stats.loads, stats.reuses), (3, 2));
}
