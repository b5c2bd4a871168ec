//! The hub download path, end to end: sdstream's downloader against a hub of this test's own on
//! localhost (`HubOptions::endpoint`, what `HF_ENDPOINT` sets), serving repositories in the
//! layouts they are published in. The files a stream needs are listed, picked among the forms a
//! repository holds (a lone fp16 `.bin`, shards and their index), fetched into a Hugging Face
//! cache, found there again offline, and stream exactly like the same files on disk.
//!
//! The hub (the stand-in of the download's unit tests, `core/src/hub/stand_in_hub.rs`) answers
//! as huggingface.co does for what the downloader asks: `GET /api/models/{id}/
//! revision/main?blobs=true` (the commit, and each file's size and git hash, with the SHA-256 of
//! those kept in LFS), and `GET /{id}/resolve/{commit}/{file}`, whole (`200`) or from a `Range`
//! (`206`, `Content-Range`). The downloader's refusals (sizes, hashes, stalls, paths) are its
//! unit tests' (core/src/hub/download_tests.rs).

use crate::common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use common::{fixture, scratch_dir};
use sdstream::hub::{self, HubOptions};
use sdstream::model::bundle::{checkpoint_files, component_files};
use sdstream::params::VaeChoice;
use sdstream::{EngineSettings, StreamDiffusionParams};
use serde_json::json;
// The download's own unit tests' stand-in hub, serving folders here (those tests read the
// parts of it these do not).
#[allow(dead_code)]
#[path = "../../src/hub/stand_in_hub.rs"]
mod stand_in_hub;
use stand_in_hub::{Reply, Seen, StandIn};

/// The commit every repository of the fake hub is at.
const COMMIT: &str = "5d1b0c6f2e8a4b7c9d0e1f2a3b4c5d6e7f809a1b";

/// A repository's files: relative name (with `/`) → bytes.
type Files = BTreeMap<String, Vec<u8>>;

/// The hub: the stand-in server answering for `repos`.
struct FakeHub {
    server: StandIn,
}

impl FakeHub {
    /// Serves `repos` (id, folder) until the test process ends.
    fn serve(repos: &[(&str, PathBuf)]) -> Self {
        let repos: BTreeMap<String, Files> = repos
            .iter()
            .map(|(id, dir)| (id.to_string(), read_tree(dir)))
            .collect();
        Self {
            server: StandIn::start(move |seen| answer(&repos, seen)),
        }
    }

    /// Every request it answered, as `GET target [range]` (all are GETs).
    fn requests(&self) -> Vec<String> {
        self.server
            .seen()
            .into_iter()
            .map(|seen| match seen.range {
                Some(r) => format!("GET {} {r}", seen.path),
                None => format!("GET {}", seen.path),
            })
            .collect()
    }

    fn options(&self, cache: &Path) -> HubOptions {
        HubOptions {
            model_root: None,
            cache_dir: Some(cache.to_path_buf()),
            offline: false,
            allow_paths: false,
            endpoint: Some(self.server.endpoint.clone()),
        }
    }
}

/// Every file under `dir` (links followed), by its name relative to `dir`.
fn read_tree(dir: &Path) -> Files {
    fn walk(dir: &Path, prefix: &str, files: &mut Files) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let entry = entry.unwrap();
            let name = format!("{prefix}{}", entry.file_name().to_string_lossy());
            let path = entry.path();
            if path.is_dir() {
                walk(&path, &format!("{name}/"), files);
            } else {
                files.insert(name, std::fs::read(&path).unwrap());
            }
        }
    }
    let mut files = Files::new();
    walk(dir, "", &mut files);
    files
}

/// A stand-in for `bytes`' git blob hash (FNV-1a, 40 hex digits; the cache names a blob kept
/// in git by it).
fn git_hash(bytes: &[u8]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h = (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("{h:016x}{:024x}", bytes.len())
}

/// Whether the hub keeps `name` in LFS (weights are; configs and tokenizers are not).
fn in_lfs(name: &str) -> bool {
    [".safetensors", ".bin", ".pth", ".ckpt", ".pt"]
        .iter()
        .any(|ending| name.ends_with(ending))
}

/// The listing's entry for `name`.
fn sibling(name: &str, bytes: &[u8]) -> serde_json::Value {
    use sha2::Digest;
    let mut entry = json!({"rfilename": name, "size": bytes.len(), "blobId": git_hash(bytes)});
    if in_lfs(name) {
        let sha256: String = sha2::Sha256::digest(bytes)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        entry["lfs"] = json!({"sha256": sha256, "size": bytes.len(), "pointerSize": 134});
    }
    entry
}

/// The answer to `seen`, as huggingface.co gives it for `repos`.
fn answer(repos: &BTreeMap<String, Files>, seen: &Seen) -> Reply {
    let status = |status, body: &[u8]| Reply {
        status,
        body: body.to_vec(),
        ..Reply::default()
    };
    let path = seen.path.split('?').next().unwrap_or("");
    for (id, files) in repos {
        if path == format!("/api/models/{id}/revision/main") {
            let listing = json!({
                "sha": COMMIT,
                "siblings": files.iter().map(|(f, b)| sibling(f, b)).collect::<Vec<_>>(),
            });
            let mut reply = Reply::ok(listing.to_string());
            reply.headers = vec![("Content-Type".into(), "application/json".into())];
            return reply;
        }
        let Some(name) = path.strip_prefix(&format!("/{id}/resolve/{COMMIT}/")) else {
            continue;
        };
        let Some(bytes) = files.get(name) else {
            return status(404, b"no such file");
        };
        let size = bytes.len();
        let Some(r) = seen.range.as_deref().and_then(|r| r.strip_prefix("bytes=")) else {
            return Reply::ok(bytes.clone());
        };
        let (a, b) = r.split_once('-').unwrap_or((r, ""));
        let start: usize = a.parse::<usize>().unwrap_or(0).min(size);
        let end: usize = b
            .parse()
            .map_or(size.saturating_sub(1), |b: usize| b.min(size - 1));
        let body = if size == 0 {
            &[][..]
        } else {
            &bytes[start..=end]
        };
        let mut reply = status(206, body);
        reply.headers = vec![(
            "Content-Range".into(),
            format!("bytes {start}-{end}/{size}"),
        )];
        return reply;
    }
    status(404, b"no such repository")
}

/// The files of `requests` fetched whole (`GET …/resolve/{commit}/{file}`, no range).
fn fetched(requests: &[String], id: &str) -> Vec<String> {
    let prefix = format!("GET /{id}/resolve/{COMMIT}/");
    let mut names: Vec<String> = requests
        .iter()
        .filter(|r| !r.contains(" bytes="))
        .filter_map(|r| r.strip_prefix(&prefix))
        .map(str::to_string)
        .collect();
    names.sort();
    names
}

fn stream(body: serde_json::Value, settings: &EngineSettings) -> Vec<Vec<u8>> {
    let params = StreamDiffusionParams::from_json_with(&body.to_string(), settings)
        .unwrap_or_else(|e| panic!("the body validates: {e}"));
    common::stream_outputs(params, settings.clone(), &common::rgb8_frames(2))
}

const THIBAUD_OPENPOSE: &str = "thibaud/controlnet-sd21-openpose-diffusers";

/// thibaud's ControlNet as published (config.json of diffusers 0.15 and a lone fp16 `.bin`):
/// the client lists it, fetches those two files and nothing else, and the net from the cache
/// streams exactly as the same values in today's layout; asked again offline, the cache
/// answers without a request.
#[test]
fn a_thibaud_net_downloads_from_the_hub_and_streams_like_the_modern_folder() {
    let hub = FakeHub::serve(&[(
        THIBAUD_OPENPOSE,
        fixture("published-root").join(THIBAUD_OPENPOSE),
    )]);
    let cache = scratch_dir("hub-download-thibaud");
    let wanted = component_files(true);
    let wanted: Vec<&str> = wanted.iter().map(String::as_str).collect();
    let dir = hub::resolve(THIBAUD_OPENPOSE, &hub.options(&cache), &wanted)
        .unwrap_or_else(|e| panic!("the download succeeds: {e}"));
    assert_eq!(
        dir,
        cache
            .join("models--thibaud--controlnet-sd21-openpose-diffusers")
            .join("snapshots")
            .join(COMMIT)
    );
    let requests = hub.requests();
    assert_eq!(
        requests[0],
        format!("GET /api/models/{THIBAUD_OPENPOSE}/revision/main?blobs=true")
    );
    assert_eq!(
        fetched(&requests, THIBAUD_OPENPOSE),
        ["config.json", "diffusion_pytorch_model.bin"]
    );
    for name in ["config.json", "diffusion_pytorch_model.bin"] {
        assert_eq!(
            std::fs::read(dir.join(name)).unwrap(),
            std::fs::read(fixture("published-root").join(THIBAUD_OPENPOSE).join(name)).unwrap(),
            "{name} arrives byte for byte"
        );
    }

    // Offline, the cache the client wrote answers, and the hub hears nothing more.
    let offline = HubOptions {
        offline: true,
        ..hub.options(&cache)
    };
    assert_eq!(
        hub::resolve(THIBAUD_OPENPOSE, &offline, &wanted).unwrap(),
        dir
    );
    assert_eq!(hub.requests().len(), requests.len());

    // The downloaded net streams like the same fp16 values in today's layout.
    let settings = EngineSettings {
        vae: VaeChoice::Custom(fixture("tiny-taesd").display().to_string()),
        allow_any_resolution: true,
        ..EngineSettings::default()
    };
    let body = |net: &Path| {
        json!({
            "model_id": fixture("tiny-sd-turbo").display().to_string(),
            "prompt": "a lighthouse in a storm",
            "width": 64,
            "height": 64,
            "seed": 5,
            "controlnets": [{
                "model_id": net.display().to_string(),
                "conditioning_scale": 0.8,
                "preprocessor": "passthrough",
            }],
        })
    };
    let downloaded = stream(body(&dir), &settings);
    let modern = stream(body(&fixture("tiny-controlnet-a")), &settings);
    assert_eq!(downloaded.len(), 2);
    assert!(
        downloaded == modern,
        "the downloaded .bin streams as the safetensors"
    );
}

/// An SDXL checkpoint whose UNet is in diffusers' safetensors shards, the first text encoder
/// in transformers' sharded torch pickles and the second in transformers' safetensors shards:
/// the client fetches each index and the shards it names (and no other weights), and the
/// checkpoint from the cache streams like the fixture folder it came from.
#[test]
fn a_sharded_sdxl_downloads_its_indexes_and_shards_and_streams_like_the_folder() {
    let id = "tiny/sdxl-sharded";
    let source = fixture("tiny-sdxl-sharded");
    let hub = FakeHub::serve(&[(id, source.clone())]);
    let cache = scratch_dir("hub-download-sdxl");
    let wanted = checkpoint_files(false, false);
    let wanted: Vec<&str> = wanted.iter().map(String::as_str).collect();
    let dir = hub::resolve(id, &hub.options(&cache), &wanted)
        .unwrap_or_else(|e| panic!("the download succeeds: {e}"));
    let got = fetched(&hub.requests(), id);
    let weights: Vec<&String> = got
        .iter()
        .filter(|n| n.contains(".bin") || n.contains(".safetensors"))
        .collect();
    assert_eq!(
        weights,
        [
            "text_encoder/pytorch_model-00001-of-00002.bin",
            "text_encoder/pytorch_model-00002-of-00002.bin",
            "text_encoder/pytorch_model.bin.index.json",
            "text_encoder_2/model-00001-of-00002.safetensors",
            "text_encoder_2/model-00002-of-00002.safetensors",
            "text_encoder_2/model.safetensors.index.json",
            "unet/diffusion_pytorch_model-00001-of-00003.safetensors",
            "unet/diffusion_pytorch_model-00002-of-00003.safetensors",
            "unet/diffusion_pytorch_model-00003-of-00003.safetensors",
            "unet/diffusion_pytorch_model.safetensors.index.json",
        ],
        "every index and shard, and no other weights (the safety checker's are not needed)"
    );
    for name in &got {
        assert_eq!(
            std::fs::read(dir.join(name)).unwrap(),
            std::fs::read(source.join(name)).unwrap(),
            "{name} arrives byte for byte"
        );
    }
    let settings = common::tiny_settings("self");
    let body = |model: &Path| {
        json!({
            "model_id": model.display().to_string(),
            "prompt": "a red fox",
            "width": 64,
            "height": 64,
            "seed": 3,
            // The checker's weights are fetched apart (they are not among the files a stream
            // needs from the checkpoint): off in both runs.
            "use_safety_checker": false,
        })
    };
    assert!(
        stream(body(&dir), &settings) == stream(body(&source), &settings),
        "the checkpoint from the cache streams like the folder"
    );
}

/// A repository that holds no weights in any form the loaders read (a lone original-layout
/// checkpoint) is refused before any download, naming what it does hold.
#[test]
fn a_repository_without_readable_weights_is_refused_naming_what_it_holds() {
    let repo = scratch_dir("hub-download-ckpt-repo");
    std::fs::write(repo.join("config.json"), b"{}").unwrap();
    std::fs::write(
        repo.join("temporalnetversion2.ckpt"),
        b"not a real checkpoint",
    )
    .unwrap();
    let id = "someone/temporal-net";
    let hub = FakeHub::serve(&[(id, repo)]);
    let cache = scratch_dir("hub-download-ckpt-cache");
    let wanted = component_files(true);
    let wanted: Vec<&str> = wanted.iter().map(String::as_str).collect();
    let err = hub::resolve(id, &hub.options(&cache), &wanted)
        .expect_err("no weights it can read")
        .to_string();
    assert!(
        err.contains("hub repository someone/temporal-net has no"),
        "{err}"
    );
    assert!(err.contains("temporalnetversion2.ckpt"), "{err}");
    assert!(
        fetched(&hub.requests(), id).is_empty(),
        "nothing is downloaded: {:?}",
        hub.requests()
    );
}
