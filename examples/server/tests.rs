//! The server's own HTTP answers, in process on a loopback port (`cargo test -p sdstream
//! --features webrtc --example server`): model ids an API client sends never reach the disk,
//! and request bodies get 400 when cut short, 413 only when over the limit.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};

use super::*;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures")
}

const TOKEN: &str = "test-token";

/// An app serving the tiny fixture by id (`tiny-sd-turbo` under model_root), as the end-to-end
/// test runs it.
fn app() -> Arc<App> {
    let settings_json = json!({
        "vae": "tiny-taesd",
        "model_root": fixtures(),
        "allow_any_resolution": true,
    })
    .to_string();
    let allow = ["tiny-sd-turbo".to_owned(), "tiny-controlnet-a".to_owned()];
    let settings = served_settings(Some(&settings_json), &allow).expect("settings");
    let default_params = json!({"model_id": "tiny-sd-turbo", "width": 64, "height": 64});
    check_default_params(&default_params, &settings).expect("defaults");
    Arc::new(App {
        token: TOKEN.into(),
        public_url: "http://127.0.0.1".into(),
        default_params,
        settings,
        transport: TransportConfig::default(),
        record: None,
        streams: RwLock::new(HashMap::new()),
    })
}

/// The app on a loopback port; the runtime serves it until dropped.
fn serve_app(app: Arc<App>) -> (tokio::runtime::Runtime, SocketAddr) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .worker_threads(2)
        .build()
        .expect("runtime");
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .expect("listen");
    let addr = listener.local_addr().expect("address");
    runtime.spawn(async move { axum::serve(listener, app_router(app)).await });
    (runtime, addr)
}

/// Sends `raw` on a fresh connection, then (when `half_close`) shuts the write side as a client
/// whose body was cut off would; returns the status and the body of the answer.
fn exchange(addr: SocketAddr, raw: &[u8], half_close: bool) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .expect("timeout");
    // The server may answer (413) before the whole body is written and close: ignore errors.
    let _ = stream.write_all(raw);
    if half_close {
        let _ = stream.shutdown(Shutdown::Write);
    }
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer);
    let text = String::from_utf8_lossy(&answer).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, body.to_owned())
}

/// A complete API request with the bearer token.
fn api(addr: SocketAddr, method: &str, path: &str, body: Option<&Value>) -> (u16, String) {
    let body = body.map(Value::to_string).unwrap_or_default();
    let raw = format!(
        "{method} {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\
         Authorization: Bearer {TOKEN}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    );
    exchange(addr, raw.as_bytes(), false)
}

fn json_of(body: &str) -> Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body}"))
}

/// Ids that name folders on the server's disk, existing and missing, by every spelling.
fn hostile_ids() -> Vec<String> {
    let existing = fixtures().join("tiny-sd-turbo");
    let missing = fixtures().join("no-such-model");
    assert!(existing.is_dir() && !missing.exists());
    vec![
        "/etc".into(),
        "/".into(),
        "../../..".into(),
        "org/../../x".into(),
        "..".into(),
        "~".into(),
        "C:\\Windows".into(),
        existing.display().to_string(),
        missing.display().to_string(),
        // Relative to the working directory of `cargo test` (core/): the first exists.
        "../tests/fixtures/tiny-sd-turbo".into(),
        "../tests/fixtures/no-such-model".into(),
        // Under model_root, complete but not served; and not there at all.
        "tiny-taesd".into(),
        "no-such-model".into(),
        "org/no-such-model".into(),
    ]
}

/// Every answer is `want`, and all of them are the same bytes.
fn all_alike(answers: &[(String, (u16, String))], want: u16) -> String {
    let first = &answers[0].1.1;
    for (id, (status, body)) in answers {
        assert_eq!(*status, want, "{id:?}: {body}");
        assert_eq!(body, first, "{id:?} is answered differently");
    }
    first.clone()
}

#[test]
fn model_ids_that_name_folders_are_refused_alike() {
    let (_runtime, addr) = serve_app(app());
    let ids = hostile_ids();

    // Creating a stream.
    let create = |params: Value| {
        api(
            addr,
            "POST",
            "/v1/streams",
            Some(&json!({"params": params})),
        )
    };
    let answers: Vec<_> = ids
        .iter()
        .map(|id| (id.clone(), create(json!({"model_id": id}))))
        .collect();
    let refusal = all_alike(&answers, 422);
    let message = json_of(&refusal)["error"]
        .as_str()
        .expect("error")
        .to_owned();
    assert!(
        message
            .starts_with("invalid parameter `model_id`: Invalid model_id: not a model served here"),
        "{message}"
    );
    assert!(message.contains("'tiny-sd-turbo'"), "{message}");
    for leak in ["fixtures", "etc", "no-such", "lacks", "not a folder"] {
        assert!(!message.contains(leak), "{leak:?} in {message}");
    }
    let answers: Vec<_> = ids
        .iter()
        .map(|id| {
            (
                id.clone(),
                create(json!({"controlnets": [{"model_id": id}]})),
            )
        })
        .collect();
    all_alike(&answers, 422);
    assert_eq!(api(addr, "GET", "/v1/streams/none", None).0, 404);

    // Updating one: no "reload" for a folder, whether it exists or not, and the engine keeps
    // its params.
    let (status, body) = create(json!({"prompt": "a lighthouse"}));
    assert_eq!(status, 201, "{body}");
    let id = json_of(&body)["id"].as_str().expect("id").to_owned();
    let version = |addr| {
        let (status, body) = api(addr, "GET", &format!("/v1/streams/{id}/status"), None);
        assert_eq!(status, 200, "{body}");
        json_of(&body)["params_version"].as_u64().expect("version")
    };
    let before = version(addr);
    let patch = |params: Value| {
        api(
            addr,
            "PATCH",
            &format!("/v1/streams/{id}"),
            Some(&json!({"params": params})),
        )
    };
    let answers: Vec<_> = ids
        .iter()
        .map(|id| (id.clone(), patch(json!({"model_id": id}))))
        .collect();
    assert_eq!(all_alike(&answers, 422), refusal);
    let answers: Vec<_> = ids
        .iter()
        .map(|id| {
            (
                id.clone(),
                patch(json!({"controlnets": [{"model_id": id}]})),
            )
        })
        .collect();
    all_alike(&answers, 422);
    assert_eq!(version(addr), before, "refused PATCHes changed nothing");
    // The served id itself is fine.
    let (status, body) = patch(json!({"model_id": "tiny-sd-turbo"}));
    assert_eq!(status, 200, "{body}");
    assert_eq!(json_of(&body)["update"], "unchanged");

    let (status, body) = api(addr, "DELETE", &format!("/v1/streams/{id}"), None);
    assert_eq!(status, 200, "{body}");
}

#[test]
fn served_settings_turn_model_paths_off() {
    let settings = served_settings(None, &["org/name".into()]).expect("settings");
    assert!(!settings.allow_model_paths);
    assert_eq!(settings.allowed_models, ["org/name"]);
    let asked = served_settings(Some(r#"{"allow_model_paths": true}"#), &[]);
    assert!(asked.is_err_and(|e| e.contains("allow_model_paths")));
    for id in ["../x", "/models/x", "a/b/c", ""] {
        assert!(
            served_settings(None, &[id.to_owned()]).is_err(),
            "--allow-model {id:?}"
        );
    }
    let defaults = json!({"model_id": fixtures().join("tiny-sd-turbo")});
    assert!(check_default_params(&defaults, &settings).is_err_and(|e| e.starts_with("--params:")));
    assert!(check_default_params(&json!({}), &settings).is_ok());
}

#[test]
fn bodies_cut_short_are_400_and_only_bodies_over_the_limit_413() {
    let (_runtime, addr) = serve_app(app());
    let (status, body) = api(addr, "POST", "/v1/streams", Some(&json!({})));
    assert_eq!(status, 201, "{body}");
    let stream = json_of(&body);
    let (id, key) = (
        stream["id"].as_str().expect("id"),
        stream["stream_key"].as_str().expect("key"),
    );
    let api_head = |extra: &str| {
        format!(
            "POST /v1/streams HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\
             Authorization: Bearer {TOKEN}\r\nContent-Type: application/json\r\n{extra}\r\n"
        )
    };
    let whip_head = |extra: &str| {
        format!(
            "POST /whip/{id}?token={key} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\
             Content-Type: application/sdp\r\n{extra}\r\n"
        )
    };
    let big_chunk = format!("{:x}\r\n{}\r\n", 300 * 1024, "a".repeat(300 * 1024));
    // (what, request, close the write side after it, expected status)
    let cases: Vec<(&str, String, bool, u16)> = vec![
        (
            "JSON shorter than its Content-Length",
            api_head("Content-Length: 100\r\n") + "{\"params\":",
            true,
            400,
        ),
        (
            "chunked JSON cut off",
            api_head("Transfer-Encoding: chunked\r\n") + "a\r\n{\"params\":",
            true,
            400,
        ),
        (
            "chunked JSON without its last chunk",
            api_head("Transfer-Encoding: chunked\r\n") + "2\r\n{}\r\n",
            true,
            400,
        ),
        (
            "JSON declared over the limit",
            api_head(&format!("Content-Length: {}\r\n", MAX_JSON_BYTES + 1)),
            false,
            413,
        ),
        (
            "chunked JSON over the limit",
            api_head("Transfer-Encoding: chunked\r\n") + &big_chunk + "0\r\n\r\n",
            false,
            413,
        ),
        (
            "SDP shorter than its Content-Length",
            whip_head("Content-Length: 500\r\n") + "v=0\r\n",
            true,
            400,
        ),
        (
            "chunked SDP cut off",
            whip_head("Transfer-Encoding: chunked\r\n") + "5\r\nv=0\r\n",
            true,
            400,
        ),
        (
            "SDP declared over the limit",
            whip_head(&format!("Content-Length: {}\r\n", MAX_SDP_BYTES + 1)),
            false,
            413,
        ),
        (
            "chunked SDP over the limit",
            whip_head("Transfer-Encoding: chunked\r\n") + &big_chunk + "0\r\n\r\n",
            false,
            413,
        ),
        (
            "complete but empty JSON body",
            api_head("Content-Length: 0\r\n"),
            true,
            400,
        ),
    ];
    for (what, raw, half_close, want) in cases {
        let (status, body) = exchange(addr, raw.as_bytes(), half_close);
        assert_eq!(status, want, "{what}: {body}");
        if want == 400 && !what.contains("empty") {
            assert!(body.contains("incomplete"), "{what}: {body}");
        }
        let (status, body) = api(addr, "GET", &format!("/v1/streams/{id}"), None);
        assert_eq!(status, 200, "after {what}: {body}");
    }
    let (status, _) = api(addr, "DELETE", &format!("/v1/streams/{id}"), None);
    assert_eq!(status, 200);
}
