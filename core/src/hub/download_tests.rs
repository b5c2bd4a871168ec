//! The downloader against a stand-in hub on this machine: a plain HTTP/1.1 server that answers
//! the listing and the files as huggingface.co does (the fields and headers the downloader
//! reads), and then misbehaves in the ways a hostile repository, mirror or network can.

use super::*;
use crate::hub::stand_in_hub::{Reply, Seen, StandIn};

const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";
const ID: &str = "stand-in/sd-turbo";

/// A repository's file: its name, bytes, and whether the hub keeps it in LFS.
#[derive(Clone)]
struct File {
    name: &'static str,
    bytes: Vec<u8>,
    lfs: bool,
}

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn git_hash(index: usize) -> String {
    format!("{:040x}", 0xb10b_0000_u64 + index as u64)
}

/// The listing the hub gives for `files` at [`COMMIT`].
fn listing(files: &[File]) -> serde_json::Value {
    let siblings: Vec<serde_json::Value> = files
        .iter()
        .enumerate()
        .map(|(i, f)| {
            let mut s = serde_json::json!({
                "rfilename": f.name,
                "size": f.bytes.len(),
                "blobId": git_hash(i),
            });
            if f.lfs {
                s["lfs"] = serde_json::json!({
                    "sha256": sha256_hex(&f.bytes),
                    "size": f.bytes.len(),
                    "pointerSize": 134,
                });
            }
            s
        })
        .collect();
    serde_json::json!({ "id": ID, "sha": COMMIT, "siblings": siblings })
}

/// The answer of a well-behaved hub to `seen`: the listing, a file (ranges honoured), or 404.
fn hub_answer(files: &[File], listing_json: &serde_json::Value, seen: &Seen) -> Reply {
    if seen.path == format!("/api/models/{ID}/revision/main?blobs=true") {
        return Reply::ok(serde_json::to_vec(listing_json).expect("json"));
    }
    let prefix = format!("/{ID}/resolve/{COMMIT}/");
    let Some(name) = seen.path.strip_prefix(&prefix) else {
        return Reply {
            status: 404,
            ..Reply::default()
        };
    };
    let Some(file) = files.iter().find(|f| f.name == name) else {
        return Reply {
            status: 404,
            ..Reply::default()
        };
    };
    let from = seen
        .range
        .as_deref()
        .and_then(|r| r.strip_prefix("bytes="))
        .and_then(|r| r.strip_suffix('-'))
        .and_then(|r| r.parse::<usize>().ok());
    match from {
        Some(from) => Reply {
            status: 206,
            headers: vec![(
                "Content-Range".into(),
                format!("bytes {from}-{}/{}", file.bytes.len() - 1, file.bytes.len()),
            )],
            body: file.bytes[from..].to_vec(),
            ..Reply::default()
        },
        None => Reply::ok(file.bytes.clone()),
    }
}

/// A small pipeline: a config, a UNet config, and LFS weights of `weight_bytes` bytes.
fn repository(weight_bytes: usize) -> Vec<File> {
    let weights: Vec<u8> = (0..weight_bytes).map(|i| (i * 7 % 251) as u8).collect();
    vec![
        File {
            name: "model_index.json",
            bytes: br#"{"_class_name": "StableDiffusionPipeline"}"#.to_vec(),
            lfs: false,
        },
        File {
            name: "unet/config.json",
            bytes: br#"{"sample_size": 64}"#.to_vec(),
            lfs: false,
        },
        File {
            name: "unet/diffusion_pytorch_model.safetensors",
            bytes: weights,
            lfs: true,
        },
        File {
            name: "README.md",
            bytes: b"not wanted".to_vec(),
            lfs: false,
        },
    ]
}

const WANTED: &[&str] = &[
    "model_index.json",
    "unet/*.json",
    "unet/diffusion_pytorch_model.safetensors",
];

fn wanted() -> Vec<Wanted> {
    WANTED.iter().map(|p| Wanted::parse(p)).collect()
}

/// A cache folder of its own, removed at the end.
struct Cache(PathBuf);

impl Cache {
    fn new(tag: &str) -> Self {
        use std::sync::atomic::{AtomicUsize, Ordering};
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "sdstream-download-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("cache");
        Self(dir)
    }

    fn blobs(&self) -> PathBuf {
        self.0
            .join(super::super::cache_folder_name(ID))
            .join("blobs")
    }

    /// The files under `blobs/`, by name.
    fn blob_names(&self) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(self.blobs())
            .map(|entries| {
                entries
                    .flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        names.sort();
        names
    }
}

impl Drop for Cache {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn limits() -> Limits {
    Limits {
        free_space_margin: 0,
        ..Limits::default()
    }
}

fn fetch(hub: &StandIn, cache: &Cache, limits: &Limits) -> std::result::Result<PathBuf, String> {
    download(ID, &cache.0, &hub.endpoint, None, &wanted(), limits)
}

/// A hub serving `files` well, with `tweak` applied to each answer.
fn hub_with(
    files: Vec<File>,
    tweak: impl Fn(&Seen, Reply) -> Reply + Send + Sync + 'static,
) -> StandIn {
    let listing_json = listing(&files);
    StandIn::start(move |seen| tweak(seen, hub_answer(&files, &listing_json, seen)))
}

#[test]
fn a_download_lays_out_the_cache_as_the_hub_client_does_and_is_found_there_after() {
    let files = repository(300_000);
    let hub = hub_with(files.clone(), |_, reply| reply);
    let cache = Cache::new("layout");
    let snapshot = fetch(&hub, &cache, &limits()).expect("download");

    let repo = cache.0.join("models--stand-in--sd-turbo");
    assert_eq!(snapshot, repo.join("snapshots").join(COMMIT));
    assert_eq!(
        std::fs::read_to_string(repo.join("refs/main")).expect("ref"),
        COMMIT
    );
    // The wanted files, and not the README.
    for f in &files[..3] {
        assert_eq!(
            std::fs::read(snapshot.join(f.name)).expect(f.name),
            f.bytes,
            "{}",
            f.name
        );
    }
    assert!(!snapshot.join("README.md").exists());
    // Blobs named by their git hash, the LFS file by its SHA-256; nothing else left there.
    let mut expected = vec![git_hash(0), git_hash(1), sha256_hex(&files[2].bytes)];
    expected.sort();
    assert_eq!(cache.blob_names(), expected);
    #[cfg(unix)]
    {
        let link = std::fs::read_link(snapshot.join("unet/config.json")).expect("a link");
        assert_eq!(link, Path::new("../../../blobs").join(git_hash(1)));
        let link = std::fs::read_link(snapshot.join("model_index.json")).expect("a link");
        assert_eq!(link, Path::new("../../blobs").join(git_hash(0)));
    }
    let first = hub.file_requests();
    assert_eq!(first.len(), 3, "{first:?}");
    assert!(
        first
            .iter()
            .all(|s| s.range.is_none() && s.authorization.is_none())
    );

    // Offline, the cache serves it through the resolution order.
    let opts = crate::hub::HubOptions {
        cache_dir: Some(cache.0.clone()),
        offline: true,
        allow_paths: false,
        ..crate::hub::HubOptions::default()
    };
    assert_eq!(
        crate::hub::resolve(ID, &opts, WANTED).expect("cached"),
        snapshot
    );

    // Fetched again (a new snapshot of the same blobs): no file is asked for twice.
    fetch(&hub, &cache, &limits()).expect("again");
    assert_eq!(hub.file_requests().len(), 3);
}

#[test]
fn a_file_larger_than_its_kind_allows_is_refused_before_it_is_asked_for() {
    let files = repository(1000);
    let mut listing_json = listing(&files);
    // The listing gives unet/config.json 5 MiB, past the 4 MiB of a config.
    listing_json["siblings"][1]["size"] = serde_json::json!(5u64 << 20);
    let hub = StandIn::start(move |seen| hub_answer(&files, &listing_json, seen));
    let cache = Cache::new("too-large");
    let err = fetch(&hub, &cache, &limits()).expect_err("refused");
    assert!(
        err.contains("unet/config.json")
            && err.contains("5242880 bytes")
            && err.contains("at most 4194304"),
        "{err}"
    );
    assert!(hub.file_requests().is_empty(), "{:?}", hub.file_requests());
    assert!(cache.blob_names().is_empty());

    // A weight file past the bound of weights, likewise.
    let files = repository(1000);
    let mut listing_json = listing(&files);
    listing_json["siblings"][2]["lfs"]["size"] = serde_json::json!(MAX_WEIGHT_FILE_BYTES + 1);
    let hub = StandIn::start(move |seen| hub_answer(&files, &listing_json, seen));
    let err = fetch(&hub, &cache, &limits()).expect_err("refused");
    assert!(
        err.contains("diffusion_pytorch_model.safetensors")
            && err.contains(&format!("at most {MAX_WEIGHT_FILE_BYTES}")),
        "{err}"
    );
    assert!(hub.file_requests().is_empty());
}

#[test]
fn a_download_that_would_fill_the_disk_is_refused_before_it_starts() {
    let hub = hub_with(repository(1000), |_, reply| reply);
    let cache = Cache::new("disk");
    // The three files take 1,061 bytes; a disk with 2,000 free keeps less than as much again.
    let tight = Limits {
        free_space: |_| Some(2000),
        ..Limits::default()
    };
    let err = fetch(&hub, &cache, &tight).expect_err("refused");
    assert!(
        err.contains("needs 1061 bytes")
            && err.contains("which has 2000 free (a download leaves 1061 free)"),
        "{err}"
    );
    assert!(hub.file_requests().is_empty());
    // With as much again free, it goes ahead; then, all there, it needs no space at all.
    let roomy = Limits {
        free_space: |_| Some(2122),
        ..Limits::default()
    };
    fetch(&hub, &cache, &roomy).expect("fits");
    let full = Limits {
        free_space: |_| Some(0),
        ..Limits::default()
    };
    fetch(&hub, &cache, &full).expect("nothing to fetch");
    assert_eq!(hub.file_requests().len(), 3);
}

#[test]
fn a_body_longer_than_the_listing_gives_is_cut_and_not_kept() {
    let files = repository(5000);
    // Announced (Content-Length) and sent: 16 bytes more than the listing's size.
    let hub = hub_with(files, |seen, mut reply| {
        if seen.path.ends_with(".safetensors") {
            reply.body.extend_from_slice(&[0u8; 16]);
        }
        reply
    });
    let cache = Cache::new("longer");
    let err = fetch(&hub, &cache, &limits()).expect_err("refused");
    assert!(
        err.contains("announces 5016 bytes, where the listing gives 5000"),
        "{err}"
    );

    // Sent without announcing a length: cut at the listing's size.
    let hub = hub_with(repository(5000), |seen, mut reply| {
        if seen.path.ends_with(".safetensors") {
            reply.body.extend_from_slice(&[0u8; 16]);
            reply.no_length = true;
        }
        reply
    });
    let cache = Cache::new("longer-no_length");
    let err = fetch(&hub, &cache, &limits()).expect_err("refused");
    assert!(err.contains("sent more than the 5000 bytes"), "{err}");
    // The two configs arrived; the weights left nothing behind, no partial file either.
    assert_eq!(cache.blob_names(), vec![git_hash(0), git_hash(1)]);
}

#[test]
fn a_connection_that_ends_early_is_resumed_from_where_it_stopped() {
    let files = repository(200_000);
    let whole = files[2].bytes.clone();
    let hub = hub_with(files, |seen, mut reply| {
        // The first answer for the weights stops after 70,000 bytes.
        if seen.path.ends_with(".safetensors") && seen.range.is_none() {
            reply.send = Some(70_000);
        }
        reply
    });
    let cache = Cache::new("resume");
    let snapshot = fetch(&hub, &cache, &limits()).expect("resumed");
    assert_eq!(
        std::fs::read(snapshot.join("unet/diffusion_pytorch_model.safetensors")).expect("weights"),
        whole
    );
    let ranges: Vec<Option<String>> = hub
        .file_requests()
        .into_iter()
        .filter(|s| s.path.ends_with(".safetensors"))
        .map(|s| s.range)
        .collect();
    assert_eq!(ranges, vec![None, Some("bytes=70000-".to_string())]);

    // A server that always stops early is given up after the resumes.
    let hub = hub_with(repository(200_000), |seen, mut reply| {
        if seen.path.ends_with(".safetensors") {
            reply.send = Some(reply.body.len().min(1000));
        }
        reply
    });
    let cache = Cache::new("resume-fails");
    let few = Limits {
        resumes: 2,
        ..limits()
    };
    let err = fetch(&hub, &cache, &few).expect_err("given up");
    assert!(err.contains("3000 of 200000 bytes arrived"), "{err}");
    assert!(err.contains("3 times"), "{err}");
    assert_eq!(
        hub.file_requests()
            .iter()
            .filter(|s| s.path.ends_with(".safetensors"))
            .count(),
        3
    );
    assert_eq!(cache.blob_names(), vec![git_hash(0), git_hash(1)]);
}

#[test]
fn weights_whose_bytes_do_not_hash_to_the_listing_are_not_kept() {
    let hub = hub_with(repository(4096), |seen, mut reply| {
        if seen.path.ends_with(".safetensors") {
            reply.body[100] ^= 1;
        }
        reply
    });
    let cache = Cache::new("hash");
    let err = fetch(&hub, &cache, &limits()).expect_err("refused");
    assert!(err.contains("SHA-256") && err.contains("not kept"), "{err}");
    assert_eq!(cache.blob_names(), vec![git_hash(0), git_hash(1)]);
}

#[test]
fn a_server_that_trickles_is_given_up_as_stalled() {
    let hub = hub_with(repository(4096), |seen, mut reply| {
        if seen.path.ends_with(".safetensors") {
            reply.trickle = Some(Duration::from_millis(20));
        }
        reply
    });
    let cache = Cache::new("trickle");
    // 4 KiB a 300 ms window asked for; a byte every 20 ms gives about 15.
    let impatient = Limits {
        rate_window: Duration::from_millis(300),
        min_bytes_per_window: 4096,
        ..limits()
    };
    let err = fetch(&hub, &cache, &impatient).expect_err("stalled");
    assert!(
        err.contains("stalled") && err.contains("where a download needs 4096"),
        "{err}"
    );
    assert_eq!(cache.blob_names(), vec![git_hash(0), git_hash(1)]);
}

#[test]
fn hashes_and_commits_that_would_leave_the_cache_are_refused() {
    type Change = Box<dyn Fn(&mut serde_json::Value)>;
    let cases: Vec<(&str, Change, &str)> = vec![
        (
            "commit",
            Box::new(|l| l["sha"] = serde_json::json!("../../../outside")),
            "not a 40-digit hash",
        ),
        (
            "blob",
            Box::new(|l| l["siblings"][0]["blobId"] = serde_json::json!("../../outside")),
            "is not a git hash",
        ),
        (
            "lfs",
            Box::new(|l| l["siblings"][2]["lfs"]["sha256"] = serde_json::json!("/etc/passwd")),
            "is not a SHA-256",
        ),
        (
            "no-commit",
            Box::new(|l| {
                l.as_object_mut().expect("object").remove("sha");
            }),
            "names no commit",
        ),
        (
            "no-size",
            Box::new(|l| {
                l["siblings"][1]
                    .as_object_mut()
                    .expect("object")
                    .remove("size");
            }),
            "gives no size",
        ),
    ];
    for (tag, change, expected) in cases {
        let files = repository(1000);
        let mut listing_json = listing(&files);
        change(&mut listing_json);
        let hub = StandIn::start(move |seen| hub_answer(&files, &listing_json, seen));
        let cache = Cache::new(tag);
        let err = fetch(&hub, &cache, &limits()).expect_err(tag);
        assert!(err.contains(expected), "{tag}: {err}");
        assert!(hub.file_requests().is_empty(), "{tag}");
        // Nothing was written anywhere under the cache but its (empty) folders.
        let written: Vec<PathBuf> = walk(&cache.0).into_iter().filter(|p| p.is_file()).collect();
        assert!(written.is_empty(), "{tag}: {written:?}");
    }
    for name in [
        "a/../b.json",
        "../b.json",
        "/etc/x.json",
        "a\\b.json",
        "a//b.json",
        "./a.json",
        "",
    ] {
        assert!(!is_relative_inside(name), "{name:?}");
    }
    for name in [
        "model_index.json",
        "unet/config.json",
        "a/b/c.safetensors",
        "..json",
    ] {
        assert!(is_relative_inside(name), "{name:?}");
    }
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            out.extend(walk(&path));
        }
        out.push(path);
    }
    out
}

#[test]
fn answers_without_what_a_download_needs_are_errors_naming_them() {
    let cache = Cache::new("answers");
    // A listing that is not one.
    let hub = StandIn::start(|_| Reply::ok("<html>maintenance</html>"));
    let err = fetch(&hub, &cache, &limits()).expect_err("not a listing");
    assert!(err.contains("not a listing"), "{err}");
    // A listing past its bound, read no further.
    let hub = StandIn::start(|_| Reply::ok(vec![b' '; MAX_LISTING_BYTES as usize + 10]));
    let err = fetch(&hub, &cache, &limits()).expect_err("too long");
    assert!(
        err.contains(&format!("more than {MAX_LISTING_BYTES} bytes")),
        "{err}"
    );
    // A repository without a wanted file names it, and what weights it holds.
    let files: Vec<File> = repository(10)
        .into_iter()
        .filter(|f| !f.name.ends_with(".safetensors"))
        .collect();
    let hub = hub_with(files, |_, reply| reply);
    let err = fetch(&hub, &cache, &limits()).expect_err("missing");
    assert!(
        err.contains("has no unet/diffusion_pytorch_model.safetensors"),
        "{err}"
    );
    // Statuses: the listing refused, a file gone, a redirect to nowhere.
    for (status, location, expected) in [
        (
            401,
            None,
            "the server answered 401: a gated or private repository; set HF_TOKEN",
        ),
        (
            403,
            None,
            "the server answered 403: a gated or private repository",
        ),
        (
            404,
            None,
            "the server answered 404: not at the commit the listing names",
        ),
        (302, None, "answered 302"),
        (302, Some("/elsewhere"), "answered 404"),
    ] {
        let hub = hub_with(repository(10), move |seen, reply| {
            let target = if status == 401 {
                "/api/"
            } else {
                "/unet/config.json"
            };
            if seen.path.contains(target) {
                Reply {
                    status,
                    headers: location
                        .map(|l| vec![("Location".to_string(), l.to_string())])
                        .unwrap_or_default(),
                    ..Reply::default()
                }
            } else {
                reply
            }
        });
        let err = fetch(&hub, &cache, &limits()).expect_err("status");
        assert!(err.contains(expected), "{status} {location:?}: {err}");
    }
    // Nothing half-written anywhere.
    assert!(
        walk(&cache.0)
            .iter()
            .all(|p| !p.to_string_lossy().ends_with(".incomplete")),
        "{:?}",
        walk(&cache.0)
    );
}

#[test]
fn the_token_goes_to_the_hub_and_not_where_it_redirects() {
    let files = repository(2000);
    let weights = files[2].bytes.clone();
    let listing_json = listing(&files);
    let hub = StandIn::start(move |seen| {
        if seen.path.ends_with(".safetensors") {
            // The hub sends the weights to its file store (here: the same host, another path).
            return Reply {
                status: 302,
                headers: vec![("Location".into(), "/store/blob".into())],
                ..Reply::default()
            };
        }
        if seen.path == "/store/blob" {
            return Reply::ok(weights.clone());
        }
        hub_answer(&files, &listing_json, seen)
    });
    let cache = Cache::new("token");
    download(
        ID,
        &cache.0,
        &hub.endpoint,
        Some("hf_secret"),
        &wanted(),
        &limits(),
    )
    .expect("download");
    let seen = hub.seen();
    let bearer = Some("Bearer hf_secret".to_string());
    assert!(
        seen.iter()
            .filter(|s| s.path != "/store/blob")
            .all(|s| s.authorization == bearer),
        "{seen:?}"
    );
    let store: Vec<&Seen> = seen.iter().filter(|s| s.path == "/store/blob").collect();
    assert_eq!(store.len(), 1);
    assert_eq!(store[0].authorization, None);

    // The token file beside the cache folder, when HF_TOKEN is not set.
    let home = Cache::new("token-home");
    let hub_cache = home.0.join("hub");
    std::fs::create_dir_all(&hub_cache).expect("hub cache");
    assert_eq!(token(|_| None, &hub_cache), None);
    std::fs::write(home.0.join("token"), "hf_from_file\n").expect("token");
    assert_eq!(token(|_| None, &hub_cache).as_deref(), Some("hf_from_file"));
    let from_var = |name: &str| (name == "HF_TOKEN").then(|| " hf_from_var ".to_string());
    assert_eq!(token(from_var, &hub_cache).as_deref(), Some("hf_from_var"));
}

#[test]
fn this_machine_and_the_hosts_no_proxy_names_bypass_a_proxy() {
    assert!(bypasses_proxy("http://127.0.0.1:8080", ""));
    assert!(bypasses_proxy("http://[::1]:8080", ""));
    assert!(bypasses_proxy("http://localhost:8080", ""));
    assert!(!bypasses_proxy("https://huggingface.co", ""));
    assert!(!bypasses_proxy(
        "https://huggingface.co",
        "example.com, .internal"
    ));
    assert!(bypasses_proxy(
        "https://hub.internal",
        "example.com, .internal"
    ));
    assert!(bypasses_proxy(
        "https://mirror.corp.example",
        "corp.example"
    ));
    assert!(!bypasses_proxy("https://notcorp.example", "corp.example"));
    assert!(bypasses_proxy("https://huggingface.co", "*"));
    assert!(!bypasses_proxy("not a url", "*"));
}

#[test]
fn two_downloads_of_one_repository_at_once_fetch_each_file_once() {
    let files = repository(100_000);
    let hub = hub_with(files.clone(), |seen, reply| {
        if seen.path.ends_with(".safetensors") {
            // Slow enough that the second caller arrives while the first is fetching.
            std::thread::sleep(Duration::from_millis(200));
        }
        reply
    });
    let cache = Cache::new("together");
    let snapshots: Vec<PathBuf> = std::thread::scope(|scope| {
        let calls: Vec<_> = (0..2)
            .map(|_| scope.spawn(|| fetch(&hub, &cache, &limits()).expect("download")))
            .collect();
        calls
            .into_iter()
            .map(|c| c.join().expect("thread"))
            .collect()
    });
    assert_eq!(snapshots[0], snapshots[1]);
    let listed = hub
        .seen()
        .iter()
        .filter(|s| s.path.starts_with("/api/"))
        .count();
    assert_eq!(listed, 2, "each caller lists the repository");
    assert_eq!(hub.file_requests().len(), 3, "{:?}", hub.file_requests());
    for f in &files[..3] {
        assert_eq!(
            std::fs::read(snapshots[0].join(f.name)).expect(f.name),
            f.bytes
        );
    }
}
