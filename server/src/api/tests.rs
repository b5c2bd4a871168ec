//! The server's own tests, in process on a loopback port (`cargo test -p sdstream --features
//! server --lib server::`): Daydream's shapes and envelopes, every route's errors, the stream
//! limit, the idle sweep, shutdown, and that model ids an API client sends never reach the
//! disk and request bodies get 400 when cut short, 413 only when over the limit.

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};

use super::bodies::{CreateBody, rfc3339};
use super::cli::{self, Command, check_default_params, served_settings};
use super::state::{idle_since, stream_state};
use super::*;
use crate::webrtc::{Ingest, PublisherState};
use sdstream::engine::EngineState;

pub(super) fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures")
}

pub(super) const TOKEN: &str = "test-token";

/// A configuration serving the tiny fixture by id (`tiny-sd-turbo` under model_root), as the
/// end-to-end test runs it.
pub(super) fn config() -> ServerConfig {
    let settings_json = json!({
        "vae": "tiny-taesd",
        "model_root": fixtures(),
        "allow_any_resolution": true,
    })
    .to_string();
    let allow = ["tiny-sd-turbo".to_owned(), "tiny-controlnet-a".to_owned()];
    let settings = served_settings(Some(&settings_json), &allow).expect("settings");
    ServerConfig {
        token: TOKEN.into(),
        public_url: "http://sd.example:8088".into(),
        default_params: json!({"model_id": "tiny-sd-turbo", "width": 64, "height": 64}),
        settings,
        ..ServerConfig::default()
    }
}

pub(super) fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .worker_threads(2)
        .build()
        .expect("runtime")
}

/// The server on a loopback port, as `Server::run` serves it; the runtime serves it until
/// dropped.
pub(super) fn serve(config: ServerConfig) -> (tokio::runtime::Runtime, SocketAddr, Server) {
    let server = Server::new(config).expect("server");
    let runtime = runtime();
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .expect("listen");
    let addr = listener.local_addr().expect("address");
    let running = server.clone();
    runtime.spawn(async move { running.run(listener, std::future::pending()).await });
    (runtime, addr, server)
}

/// Sends `raw` on a fresh connection, then (when `half_close`) shuts the write side as a client
/// whose body was cut off would; returns the status, the head and the body of the answer.
fn exchange_full(addr: SocketAddr, raw: &[u8], half_close: bool) -> (u16, String, String) {
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
    (status, head.to_owned(), body.to_owned())
}

fn exchange(addr: SocketAddr, raw: &[u8], half_close: bool) -> (u16, String) {
    let (status, _, body) = exchange_full(addr, raw, half_close);
    (status, body)
}

/// A request with `auth` as the Authorization header (none when empty) and `body` as JSON.
pub(super) fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    auth: &str,
    body: Option<&str>,
) -> (u16, String, String) {
    let body = body.unwrap_or_default();
    let auth = if auth.is_empty() {
        String::new()
    } else {
        format!("Authorization: {auth}\r\n")
    };
    let raw = format!(
        "{method} {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n{auth}\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    exchange_full(addr, raw.as_bytes(), false)
}

/// A complete API request with the bearer token.
pub(super) fn api(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&Value>,
) -> (u16, String) {
    let body = body.map(Value::to_string);
    let (status, _, body) = request(
        addr,
        method,
        path,
        &format!("Bearer {TOKEN}"),
        body.as_deref(),
    );
    (status, body)
}

pub(super) fn json_of(body: &str) -> Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body}"))
}

/// `body` is Daydream's error envelope for `status`; returns its message.
pub(super) fn envelope(status: u16, body: &str) -> String {
    let v = json_of(body);
    assert_eq!(v["success"], false, "{body}");
    assert_eq!(v["status"], status, "{body}");
    let code = v["code"].as_str().expect("code");
    assert!(
        code.contains('/')
            && code
                .chars()
                .all(|c| c.is_ascii_uppercase() || "/_".contains(c)),
        "{code}"
    );
    v["error"].as_str().expect("error").to_owned()
}

pub(super) fn create(addr: SocketAddr, body: &Value) -> Value {
    let (status, answer) = api(addr, "POST", "/v1/streams", Some(body));
    assert_eq!(status, 201, "{answer}");
    json_of(&answer)
}

fn status_data(addr: SocketAddr, id: &str) -> Value {
    let (status, body) = api(addr, "GET", &format!("/v1/streams/{id}/status"), None);
    assert_eq!(status, 200, "{body}");
    let v = json_of(&body);
    assert_eq!(v["success"], true);
    assert_eq!(v["error"], Value::Null);
    v["data"].clone()
}

/// The fields (and JSON types) daydream-sdk 0.1.0's stream models require, and the optional
/// `output_stream_url`.
const STREAM_FIELDS: [(&str, &str); 13] = [
    ("id", "string"),
    ("stream_key", "string"),
    ("created_at", "string"),
    ("output_playback_id", "string"),
    ("name", "string"),
    ("author", "string"),
    ("from_playground", "bool"),
    ("gateway_host", "string"),
    ("is_smoke_test", "bool"),
    ("whip_url", "string"),
    ("output_stream_url", "string"),
    ("pipeline", "string"),
    ("params", "object"),
];

fn json_type(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "bool",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

fn assert_stream_shape(stream: &Value) {
    for (field, kind) in STREAM_FIELDS {
        assert_eq!(json_type(&stream[field]), kind, "{field} in {stream}");
    }
    assert_eq!(stream["pipeline"], "streamdiffusion");
    assert_eq!(stream["gateway_host"], "sd.example:8088");
    assert_eq!(stream["params"], stream["pipeline_params"]);
    let (id, key) = (
        stream["id"].as_str().unwrap(),
        stream["stream_key"].as_str().unwrap(),
    );
    assert_eq!(
        stream["whip_url"],
        format!("http://sd.example:8088/whip/{id}?token={key}")
    );
    assert_eq!(
        stream["output_stream_url"],
        format!("http://sd.example:8088/whep/{id}?token={key}")
    );
}

#[test]
fn created_at_is_rfc3339_utc_with_milliseconds() {
    let at = |secs: u64, ms: u64| {
        rfc3339(UNIX_EPOCH + Duration::from_secs(secs) + Duration::from_millis(ms))
    };
    assert_eq!(at(0, 0), "1970-01-01T00:00:00.000Z");
    assert_eq!(at(951_782_400, 7), "2000-02-29T00:00:00.007Z");
    assert_eq!(at(1_738_324_800 + 3661, 999), "2025-01-31T13:01:01.999Z");
    assert_eq!(at(4_102_444_799, 0), "2099-12-31T23:59:59.000Z");
}

#[test]
fn create_bodies_in_both_forms_and_their_errors_name_the_field() {
    let parse = |v: Value| CreateBody::parse(&v);
    let new = parse(json!({"pipeline": "streamdiffusion", "params": {"prompt": "a"}, "name": "n"}))
        .expect("new form");
    assert_eq!(
        (
            new.pipeline.as_str(),
            new.pipeline_id.as_str(),
            new.name.as_deref()
        ),
        ("streamdiffusion", "streamdiffusion", Some("n"))
    );
    assert_eq!(new.params, json!({"prompt": "a"}));
    let old = parse(json!({"pipeline_id": "pip_SD-turbo", "pipeline_params": {"prompt": "b"}}))
        .expect("older form");
    assert_eq!(
        old.params,
        json!({"prompt": "b"}),
        "the older form keeps its prompt"
    );
    assert_eq!(old.pipeline_id, "pip_SD-turbo");
    assert_eq!(parse(json!({})).expect("empty").params, json!({}));
    // `null` is absent, and so is an empty RTMP URL.
    assert!(parse(json!({"params": null, "name": null, "output_rtmp_url": ""})).is_ok());
    // sdstream's own frame budget: a number (its range is the settings' rule, checked when the
    // stream is made), absent when null.
    assert_eq!(
        parse(json!({"frame_budget_ms": 250}))
            .unwrap()
            .frame_budget_ms,
        Some(250.0)
    );
    assert_eq!(
        parse(json!({"frame_budget_ms": null}))
            .unwrap()
            .frame_budget_ms,
        None
    );
    let err = parse(json!({"frame_budget_ms": "fast"})).expect_err("a string");
    assert!(err.message.contains("frame_budget_ms"), "{}", err.message);

    let cases = [
        (json!([]), 400, "body must be a JSON object"),
        (json!("x"), 400, "body must be a JSON object"),
        (
            json!({"pipeline": 1}),
            422,
            "`pipeline`: must be a string, not a number",
        ),
        (
            json!({"pipeline": "comfyui"}),
            422,
            "`pipeline`: \"comfyui\" is not served",
        ),
        (
            json!({"pipeline_id": []}),
            422,
            "`pipeline_id`: must be a string, not a list",
        ),
        (
            json!({"params": "x"}),
            422,
            "`params`: must be an object, not a string",
        ),
        (
            json!({"params": [1]}),
            422,
            "`params`: must be an object, not a list",
        ),
        (
            json!({"pipeline_params": 3}),
            422,
            "`pipeline_params`: must be an object",
        ),
        (
            json!({"params": {}, "pipeline_params": {}}),
            422,
            "not both",
        ),
        (
            json!({"name": {"a": 1}}),
            422,
            "`name`: must be a string, not an object",
        ),
        (json!({"name": "x".repeat(257)}), 422, "`name`: at most 256"),
        (
            json!({"output_rtmp_url": "rtmp://x/y"}),
            422,
            "`output_rtmp_url`: \"rtmp://x/y\": give both an application and a stream key",
        ),
        (
            json!({"output_rtmp_url": "rtmps://x/live/k"}),
            422,
            "`output_rtmp_url`: rtmps:// (RTMP over TLS) is not supported",
        ),
        (
            json!({"output_rtmp_url": true}),
            422,
            "`output_rtmp_url`: must be a string",
        ),
    ];
    for (body, status, message) in cases {
        let err = parse(body.clone()).expect_err(&body.to_string());
        assert_eq!(err.status.as_u16(), status, "{body}: {}", err.message);
        assert!(err.message.contains(message), "{body}: {}", err.message);
    }
}

#[test]
fn a_gone_publisher_degrades_the_stream_at_once_and_idle_counts_from_its_last_sign() {
    let t0 = Instant::now();
    let (t1, t2) = (t0 + Duration::from_secs(5), t0 + Duration::from_secs(9));
    let ingest = |publisher, lost, media| Ingest {
        publisher,
        kind: None,
        publisher_lost: lost,
        last_media: media,
    };
    let never = ingest(PublisherState::Never, None, None);
    let connecting = ingest(PublisherState::Connecting, None, None);
    let connected = ingest(PublisherState::Connected, None, Some(t1));
    let gone = ingest(PublisherState::Gone, Some(t2), Some(t1));
    use EngineState::*;
    for engine in [Online, DegradedInput, DegradedInference] {
        assert_eq!(stream_state(engine, &gone), DegradedInput, "{engine:?}");
        for other in [&never, &connecting, &connected] {
            assert_eq!(stream_state(engine, other), engine, "{engine:?} {other:?}");
        }
    }
    for engine in [Loading, Error, Offline] {
        assert_eq!(stream_state(engine, &gone), engine, "{engine:?}");
    }
    assert_eq!(idle_since(t0, &never), Some(t0));
    assert_eq!(idle_since(t0, &connecting), None);
    assert_eq!(idle_since(t0, &connected), None);
    assert_eq!(
        idle_since(t0, &gone),
        Some(t2),
        "from the publisher's going"
    );
    let late_media = ingest(PublisherState::Gone, Some(t1), Some(t2));
    assert_eq!(idle_since(t0, &late_media), Some(t2), "from the last media");
}

#[test]
fn command_line_defaults_and_errors() {
    let args = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let Ok(Command::Serve(serve)) = cli::parse(&args(&["serve"]), None) else {
        panic!("serve");
    };
    assert_eq!(serve.bind, SocketAddr::from(([127, 0, 0, 1], 8088)));
    assert_eq!(serve.max_streams, 8);
    assert_eq!(serve.input_timeout, Duration::from_secs(3));
    assert_eq!(serve.idle_timeout, Some(Duration::from_secs(120)));
    assert_eq!(serve.instance, None);
    let Ok(Command::Serve(serve)) = cli::parse(
        &args(&[
            "serve",
            "--idle-timeout",
            "0",
            "--max-streams",
            "2",
            "--input-timeout",
            "5",
            "--instance=gpu-3",
            "--public-url",
            "https://x.example/",
            "--settings={\"device\":\"cpu\"}",
        ]),
        Some("ignored-by-the-flag".into()),
    ) else {
        panic!("serve with flags");
    };
    assert_eq!(
        (
            serve.idle_timeout,
            serve.max_streams,
            serve.input_timeout,
            serve.instance.as_deref(),
            serve.public_url.as_deref()
        ),
        (
            None,
            2,
            Duration::from_secs(5),
            Some("gpu-3"),
            Some("https://x.example")
        )
    );
    assert_eq!(
        serve.settings.as_deref(),
        Some("{\"device\":\"cpu\"}"),
        "= in the value kept"
    );
    let Ok(Command::Serve(serve)) = cli::parse(&args(&["serve"]), Some("pod-7".into())) else {
        panic!("serve with SDSTREAM_INSTANCE");
    };
    assert_eq!(serve.instance.as_deref(), Some("pod-7"));
    assert!(matches!(
        cli::parse(&args(&["serve", "--help"]), None),
        Ok(Command::Help(text)) if text.contains("--idle-timeout")
    ));
    assert!(matches!(
        cli::parse(&args(&["--help"]), None),
        Ok(Command::Help(_))
    ));
    assert!(matches!(
        cli::parse(&args(&["replay", "--record", "x"]), None),
        Ok(Command::Replay(rest)) if rest == ["--record", "x"]
    ));
    for (bad, says) in [
        (&["serve", "--bind"][..], "--bind needs a value"),
        (&["serve", "--bind", "nowhere"][..], "--bind nowhere"),
        (&["serve", "--max-streams", "-1"][..], "--max-streams -1"),
        (
            &["serve", "--instance", "GPU_0"][..],
            "--instance \"GPU_0\"",
        ),
        (
            &["serve", "--frobnicate", "1"][..],
            "unknown flag --frobnicate",
        ),
        (&["frobnicate"][..], "unknown command"),
        (&[][..], "usage: sdstream serve"),
    ] {
        let err = cli::parse(&args(bad), None).expect_err(&format!("{bad:?}"));
        assert!(err.contains(says), "{bad:?}: {err}");
    }
    let err = cli::parse(&args(&["serve"]), Some("a/b".into())).expect_err("bad env");
    assert!(err.contains("SDSTREAM_INSTANCE"), "{err}");
}

#[test]
fn media_flags_and_the_urls_they_give() {
    let args = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let parse = |a: &[&str]| match cli::parse(&args(a), None) {
        Ok(Command::Serve(serve)) => *serve,
        other => panic!("{a:?}: {other:?}"),
    };
    // Defaults: RTMP on the bind host's port 1935, 1 s HLS segments, Scope routes behind the
    // token, no ICE servers.
    let defaults = parse(&["serve"]);
    assert_eq!(defaults.rtmp_bind, Some(None));
    assert_eq!(defaults.hls_segment, Duration::from_secs(1));
    assert!(defaults.scope_requires_token);
    assert!(defaults.ice_servers.is_empty());
    let local = SocketAddr::from(([127, 0, 0, 1], 8088));
    let config = cli::config(
        &defaults,
        "t".into(),
        local,
        Some(SocketAddr::from(([127, 0, 0, 1], 1935))),
    )
    .unwrap();
    assert_eq!(
        config.rtmp_url.as_deref(),
        Some("rtmp://127.0.0.1:1935/live")
    );
    assert_eq!(config.hls.segment_target, Duration::from_secs(1));
    let flagged = parse(&[
        "serve",
        "--rtmp-bind",
        "0.0.0.0:19350",
        "--public-url",
        "https://sd.example:8443/base",
        "--hls-segment-ms",
        "50",
        "--scope-auth",
        "none",
        "--ice-server",
        "stun:stun.example.org:3478",
        "--ice-server",
        "turn:turn.example.org:3478,alice,secret",
    ]);
    assert_eq!(
        flagged.rtmp_bind,
        Some(Some(SocketAddr::from(([0, 0, 0, 0], 19350))))
    );
    // Clamped to 200 ms at least.
    assert_eq!(flagged.hls_segment, Duration::from_millis(200));
    assert!(!flagged.scope_requires_token);
    assert_eq!(flagged.ice_servers.len(), 2);
    assert_eq!(flagged.ice_servers[1].username.as_deref(), Some("alice"));
    let config = cli::config(
        &flagged,
        "t".into(),
        local,
        Some(SocketAddr::from(([0, 0, 0, 0], 19350))),
    )
    .unwrap();
    // The public host with the RTMP port.
    assert_eq!(
        config.rtmp_url.as_deref(),
        Some("rtmp://sd.example:19350/live")
    );
    assert_eq!(config.transport.ice_servers, flagged.ice_servers);
    assert!(!config.scope_requires_token);
    let explicit = parse(&["serve", "--rtmp-public-url", "rtmp://ingest.example/live/"]);
    let config = cli::config(&explicit, "t".into(), local, Some(local)).unwrap();
    assert_eq!(
        config.rtmp_url.as_deref(),
        Some("rtmp://ingest.example/live")
    );
    let off = parse(&["serve", "--rtmp-bind", "off"]);
    assert_eq!(off.rtmp_bind, None);
    assert_eq!(
        cli::config(&off, "t".into(), local, None).unwrap().rtmp_url,
        None
    );
    for (bad, says) in [
        (
            &["serve", "--rtmp-bind", "nowhere"][..],
            "--rtmp-bind nowhere",
        ),
        (&["serve", "--rtmp-public-url", "http://x"][..], "rtmp://"),
        (&["serve", "--scope-auth", "maybe"][..], "token or none"),
        (
            &["serve", "--ice-server", "http://stun.example"][..],
            "stun:",
        ),
        (
            &["serve", "--ice-server", "turn:turn.example:3478"][..],
            "user name",
        ),
        (
            &["serve", "--ice-server", "stun:a,b"][..],
            "URL,USERNAME,CREDENTIAL",
        ),
        (
            &["serve", "--hls-segment-ms", "fast"][..],
            "--hls-segment-ms fast",
        ),
    ] {
        let err = cli::parse(&args(bad), None).expect_err(&format!("{bad:?}"));
        assert!(err.contains(says), "{bad:?}: {err}");
    }
}

#[test]
fn streams_give_their_rtmp_and_hls_urls_and_scope_routes_follow_the_token_setting() {
    let mut guarded = config();
    guarded.rtmp_url = Some("rtmp://sd.example:1935/live".into());
    let (_rt, addr, _server) = serve(guarded);
    let stream = create(addr, &json!({"params": {"prompt": "a fox"}}));
    let (id, key) = (
        stream["id"].as_str().unwrap(),
        stream["stream_key"].as_str().unwrap(),
    );
    assert_eq!(stream["rtmp_url"], "rtmp://sd.example:1935/live");
    assert_eq!(
        stream["rtmp_publish_url"],
        format!("rtmp://sd.example:1935/live/{key}")
    );
    assert_eq!(
        stream["hls_url"],
        format!("http://sd.example:8088/hls/{id}/index.m3u8?token={key}")
    );
    assert_eq!(stream["output_rtmp_url"], Value::Null);
    // A pushed stream echoes its destination; a bad one is refused naming the field.
    let pushed = create(
        addr,
        &json!({"output_rtmp_url": "rtmp://127.0.0.1:9/live/k"}),
    );
    assert_eq!(pushed["output_rtmp_url"], "rtmp://127.0.0.1:9/live/k");
    let (status, body) = api(
        addr,
        "POST",
        "/v1/streams",
        Some(&json!({"output_rtmp_url": "rtmps://cdn.example/live/k"})),
    );
    assert_eq!(status, 422, "{body}");
    assert!(
        body.contains("output_rtmp_url") && body.contains("rtmps"),
        "{body}"
    );
    // Scope routes need the token here; its own 401 carries Scope's `detail`.
    let (status, _, body) = request(addr, "GET", "/api/v1/webrtc/ice-servers", "", None);
    assert_eq!(status, 401, "{body}");
    assert_eq!(json_of(&body)["detail"], "missing or wrong bearer token");
    let (status, body) = api(addr, "GET", "/api/v1/webrtc/ice-servers", None);
    assert_eq!((status, json_of(&body)), (200, json!({"iceServers": []})));
    // /health is open, like Scope's.
    let (status, _, body) = request(addr, "GET", "/health", "", None);
    assert_eq!(
        (status, json_of(&body)["status"].clone()),
        (200, json!("healthy"))
    );

    let mut open = config();
    open.scope_requires_token = false;
    let (_rt2, addr2, _server2) = serve(open);
    let (status, _, body) = request(addr2, "GET", "/api/v1/webrtc/ice-servers", "", None);
    assert_eq!(status, 200, "{body}");
    // The Daydream API still needs it.
    let (status, _, _) = request(addr2, "GET", "/v1/streams", "", None);
    assert_eq!(status, 401);
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
    let bad_instance = ServerConfig {
        instance: Some("Not OK".into()),
        ..config()
    };
    assert!(Server::new(bad_instance).is_err_and(|e| e.contains("instance")));
}

#[test]
fn the_stream_api_in_daydream_shapes() {
    let (_runtime, addr, _server) = serve(config());
    let (status, body) = api(addr, "GET", "/v1/streams", None);
    assert_eq!(
        (status, json_of(&body)),
        (200, json!({"success": true, "data": []}))
    );

    // Create, new form: every field the SDK requires, the body's prompt over the defaults.
    let a = create(
        addr,
        &json!({"pipeline": "streamdiffusion", "params": {"prompt": "a lighthouse"}, "name": "cam"}),
    );
    assert_stream_shape(&a);
    assert_eq!(a["name"], "cam");
    assert_eq!(a["params"]["prompt"], "a lighthouse");
    assert_eq!(
        a["params"]["model_id"], "tiny-sd-turbo",
        "defaults under the body"
    );
    let a_id = a["id"].as_str().unwrap().to_owned();
    assert!(a_id.starts_with("str_") && a_id.len() == 20, "{a_id}");
    // The older form keeps its prompt (it used to be dropped).
    let b = create(
        addr,
        &json!({"pipeline_id": "pip_SD-turbo", "pipeline_params": {"prompt": "a red kite", "seed": 7}}),
    );
    assert_stream_shape(&b);
    assert_eq!(b["pipeline_id"], "pip_SD-turbo");
    let b_id = b["id"].as_str().unwrap().to_owned();
    let data = status_data(addr, &b_id);
    assert_eq!(
        data["inference_status"]["last_params"]["prompt"],
        "a red kite"
    );
    assert_eq!(data["inference_status"]["last_params"]["seed"], 7);

    // Get and list.
    let (status, got) = api(addr, "GET", &format!("/v1/streams/{a_id}"), None);
    assert_eq!(status, 200);
    assert_eq!(json_of(&got), a);
    let (_, list) = api(addr, "GET", "/v1/streams", None);
    let list = json_of(&list);
    assert_eq!(list["success"], true);
    let ids: Vec<&str> = list["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, [a_id.as_str(), b_id.as_str()], "oldest first");
    let (_, mine) = api(addr, "GET", "/v1/streams?user_id=sdstream", None);
    assert_eq!(json_of(&mine)["data"].as_array().unwrap().len(), 2);
    let (_, theirs) = api(addr, "GET", "/v1/streams?user_id=someone-else", None);
    assert_eq!(json_of(&theirs)["data"], json!([]));

    // PATCH merges into the current params and says what it cost.
    let before = status_data(addr, &a_id);
    let (status, patched) = api(
        addr,
        "PATCH",
        &format!("/v1/streams/{a_id}"),
        Some(
            &json!({"pipeline": "streamdiffusion", "params": {"prompt": "a fox", "guidance_scale": 1.5}}),
        ),
    );
    assert_eq!(status, 200, "{patched}");
    let patched = json_of(&patched);
    assert_stream_shape(&patched);
    assert_eq!(patched["update"], "hot");
    assert_eq!(patched["params"]["prompt"], "a fox");
    assert_eq!(patched["params"]["guidance_scale"], 1.5);
    assert_eq!(patched["params"]["width"], 64, "the rest kept");
    let after = status_data(addr, &a_id);
    let version = |d: &Value| d["engine"]["params_version"].as_u64().unwrap();
    assert_eq!(version(&after), version(&before) + 1);
    assert_eq!(patched["params_version"], version(&after));
    assert_eq!(after["inference_status"]["last_params"]["prompt"], "a fox");
    assert_ne!(
        after["inference_status"]["last_params_hash"],
        before["inference_status"]["last_params_hash"]
    );
    // The same PATCH again changes nothing.
    let (_, again) = api(
        addr,
        "PATCH",
        &format!("/v1/streams/{a_id}"),
        Some(&json!({"params": {"prompt": "a fox"}})),
    );
    assert_eq!(json_of(&again)["update"], "unchanged");
    assert_eq!(version(&status_data(addr, &a_id)), version(&after));
    // sdstream's `transition` beside `params`: the prompt change glides (hot); a bad one is
    // refused naming it, and changes nothing.
    for (transition, status_want, says) in [
        (json!({"num_steps": "8"}), 422, "transition.num_steps"),
        (json!({"num_steps": 5000}), 422, "at most 1000"),
        (
            json!({"num_steps": 8, "target_prompts": []}),
            422,
            "transition",
        ),
    ] {
        let (status, body) = api(
            addr,
            "PATCH",
            &format!("/v1/streams/{a_id}"),
            Some(&json!({"params": {"prompt": "a wolf"}, "transition": transition})),
        );
        assert_eq!(status, status_want, "{body}");
        assert!(envelope(status_want, &body).contains(says), "{body}");
    }
    assert_eq!(version(&status_data(addr, &a_id)), version(&after));
    let (status, glided) = api(
        addr,
        "PATCH",
        &format!("/v1/streams/{a_id}"),
        Some(&json!({"params": {"prompt": "a wolf"},
                     "transition": {"num_steps": 8, "temporal_interpolation_method": "slerp"}})),
    );
    assert_eq!(status, 200, "{glided}");
    assert_eq!(json_of(&glided)["update"], "hot");
    assert_eq!(version(&status_data(addr, &a_id)), version(&after) + 1);

    // The legacy beta route applies its params like a PATCH.
    let (status, beta) = api(
        addr,
        "POST",
        &format!("/beta/streams/{a_id}/prompts"),
        Some(
            &json!({"pipeline": "live-video-to-video", "model_id": "streamdiffusion",
                     "params": {"model_id": "tiny-sd-turbo", "prompt": "a heron"}}),
        ),
    );
    assert_eq!(status, 200, "{beta}");
    let beta = json_of(&beta);
    assert_eq!(
        (
            &beta["success"],
            &beta["was_censored"],
            &beta["warnings"],
            &beta["update"]
        ),
        (&json!(true), &json!(false), &json!([]), &json!("hot"))
    );
    let data = status_data(addr, &a_id);
    assert_eq!(data["inference_status"]["last_params"]["prompt"], "a heron");
    assert_eq!(
        version(&data),
        version(&after) + 2,
        "after the gliding PATCH"
    );

    // The status envelope, both vocabularies.
    assert_eq!(data["stream_id"], a_id.as_str());
    assert_eq!(data["pipeline"], "streamdiffusion");
    assert!(
        ["LOADING", "ONLINE"].contains(&data["state"].as_str().unwrap()),
        "{data}"
    );
    assert_eq!(json_type(&data["start_time"]), "number");
    for (path, kind) in [
        ("/input_status/fps", "number"),
        ("/input_status/last_input_time", "null"),
        ("/inference_status/fps", "number"),
        ("/inference_status/input_fps", "number"),
        ("/inference_status/output_fps", "number"),
        ("/inference_status/last_error", "null"),
        ("/inference_status/last_error_time", "null"),
        ("/inference_status/last_output_time", "null"),
        ("/inference_status/last_params", "object"),
        ("/inference_status/last_params_hash", "string"),
        ("/inference_status/last_params_update_time", "number"),
        ("/inference_status/restart_count", "number"),
        ("/inference_status/last_restart_time", "null"),
        ("/inference_status/last_restart_logs", "array"),
        ("/gateway_status/whep_url", "string"),
        (
            "/gateway_status/ingest_metrics/stats/peer_conn_stats/BytesReceived",
            "number",
        ),
        ("/gateway_status/ingest_metrics/stats/track_stats", "array"),
        (
            "/gateway_status/ingest_metrics/stats/conn_quality",
            "string",
        ),
        ("/engine/params_version", "number"),
        ("/transport/frames_submitted", "number"),
    ] {
        let got = data.pointer(path).unwrap_or(&Value::Null);
        assert_eq!(json_type(got), kind, "{path}: {data}");
    }
    assert_eq!(data["gateway_status"]["whep_url"], a["output_stream_url"]);

    // Delete, both ways: Daydream's answer; then 404.
    for path in [
        format!("/v1/streams/{a_id}"),
        format!("/v1/streams?id={b_id}"),
    ] {
        let (status, body) = api(addr, "DELETE", &path, None);
        assert_eq!(
            (status, json_of(&body)),
            (200, json!({"success": true, "data": {}}))
        );
        let (status, body) = api(addr, "DELETE", &path, None);
        envelope(404, &body);
        assert_eq!(status, 404);
    }
    let (_, list) = api(addr, "GET", "/v1/streams", None);
    assert_eq!(json_of(&list)["data"], json!([]));
}

#[test]
fn every_route_answers_errors_in_the_envelope_and_keeps_serving() {
    let (_runtime, addr, _server) = serve(config());
    let live = create(addr, &json!({"params": {"prompt": "a lighthouse"}}));
    let (id, key) = (
        live["id"].as_str().unwrap(),
        live["stream_key"].as_str().unwrap(),
    );
    let bearer = format!("Bearer {TOKEN}");
    let api_routes = [
        ("POST", "/v1/streams".to_owned()),
        ("GET", "/v1/streams".to_owned()),
        ("DELETE", format!("/v1/streams?id={id}")),
        ("GET", format!("/v1/streams/{id}")),
        ("PATCH", format!("/v1/streams/{id}")),
        ("DELETE", format!("/v1/streams/{id}")),
        ("GET", format!("/v1/streams/{id}/status")),
        ("POST", format!("/beta/streams/{id}/prompts")),
    ];
    // Wrong tokens: 401 on every API route, whatever else is wrong.
    for (method, path) in &api_routes {
        for auth in [
            "",
            "Bearer wrong",
            "Basic Zm9vOmJhcg==",
            "Bearer",
            &format!("Bearer {key}"),
            &format!("Bearer {TOKEN}x"),
        ] {
            let (status, head, body) = request(addr, method, path, auth, Some("{"));
            assert_eq!(status, 401, "{method} {path} with {auth:?}: {body}");
            envelope(401, &body);
            assert!(
                head.to_ascii_lowercase()
                    .contains("www-authenticate: bearer")
            );
        }
    }
    // Unknown ids: 404 on every route that names one.
    for (method, path) in [
        ("GET", "/v1/streams/str_nope"),
        ("PATCH", "/v1/streams/str_nope"),
        ("DELETE", "/v1/streams/str_nope"),
        ("DELETE", "/v1/streams?id=str_nope"),
        ("GET", "/v1/streams/str_nope/status"),
        ("POST", "/beta/streams/str_nope/prompts"),
    ] {
        let (status, _, body) = request(addr, method, path, &bearer, Some(r#"{"params": {}}"#));
        assert_eq!(status, 404, "{method} {path}: {body}");
        assert!(envelope(404, &body).contains("not found"), "{body}");
    }
    // An id that is no UTF-8 is a bad request.
    let (status, _, body) = request(addr, "GET", "/v1/streams/%00%ff", &bearer, None);
    assert!(envelope(400, &body).contains("UTF-8"), "{body}");
    assert_eq!(status, 400);
    // Wrong types and values: 400 or 422 naming the field; the stream keeps its params.
    let version = || status_data(addr, id)["engine"]["params_version"].clone();
    let before = version();
    let patch = format!("/v1/streams/{id}");
    let beta = format!("/beta/streams/{id}/prompts");
    for (method, path, body, want, says) in [
        ("POST", "/v1/streams", "[]", 400, "JSON object"),
        ("POST", "/v1/streams", "{", 400, "invalid JSON"),
        ("POST", "/v1/streams", "", 400, "invalid JSON"),
        (
            "POST",
            "/v1/streams",
            r#"{"params": {"width": 63}}"#,
            422,
            "`width`",
        ),
        (
            "POST",
            "/v1/streams",
            r#"{"params": {"prompt": 5}}"#,
            422,
            "`prompt`",
        ),
        (
            "POST",
            "/v1/streams",
            r#"{"params": {"seed": "x"}}"#,
            422,
            "`seed`",
        ),
        (
            "POST",
            "/v1/streams",
            r#"{"params": {"guidance_scale": null}}"#,
            201,
            "",
        ),
        (
            "PATCH",
            patch.as_str(),
            r#"{"params": {"guidance_scale": "x"}}"#,
            422,
            "`guidance_scale`",
        ),
        (
            "PATCH",
            patch.as_str(),
            r#"{"params": {"t_index_list": [90]}}"#,
            422,
            "`t_index_list",
        ),
        ("PATCH", patch.as_str(), r#"{"params": 1}"#, 422, "`params`"),
        (
            "PATCH",
            patch.as_str(),
            r#"{"pipeline": "x", "params": {}}"#,
            422,
            "`pipeline`",
        ),
        ("PATCH", patch.as_str(), "null", 400, "JSON object"),
        (
            "POST",
            beta.as_str(),
            r#"{"params": {"delta": []}}"#,
            422,
            "`delta`",
        ),
        ("POST", beta.as_str(), r#"{"params": []}"#, 422, "`params`"),
    ] {
        let (status, _, answer) = request(addr, method, path, &bearer, Some(body));
        assert_eq!(status, want, "{method} {path} {body}: {answer}");
        if want == 201 {
            let created = json_of(&answer)["id"].as_str().unwrap().to_owned();
            assert_eq!(
                api(addr, "DELETE", &format!("/v1/streams/{created}"), None).0,
                200
            );
        } else {
            let message = envelope(want, &answer);
            assert!(message.contains(says), "{method} {path} {body}: {message}");
        }
    }
    assert_eq!(version(), before, "refused PATCHes changed nothing");
    // Content types, methods, routes.
    let raw = |method: &str, path: &str, content_type: &str| {
        format!(
            "{method} {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\nAuthorization: {bearer}\r\n\
             Content-Type: {content_type}\r\nContent-Length: 2\r\n\r\n{{}}"
        )
    };
    for (request, want) in [
        (raw("POST", "/v1/streams", "text/plain"), 415),
        (
            raw("PATCH", &patch, "application/x-www-form-urlencoded"),
            415,
        ),
        (raw("PUT", &patch, "application/json"), 405),
        (
            raw(
                "POST",
                &format!("/v1/streams/{id}/status"),
                "application/json",
            ),
            405,
        ),
        (raw("GET", &beta, "application/json"), 405),
        (raw("GET", &format!("/whip/{id}"), "application/json"), 405),
        (raw("POST", "/v2/streams", "application/json"), 404),
        (raw("GET", "/favicon.ico", "application/json"), 404),
        (
            raw(
                "GET",
                &format!("/v1/streams/{id}/status/x"),
                "application/json",
            ),
            404,
        ),
    ] {
        let (status, body) = exchange(addr, request.as_bytes(), false);
        assert_eq!(status, want, "{request}: {body}");
        envelope(want, &body);
    }
    // WHIP/WHEP: the same envelope, with the stream's key (not the API token).
    let sdp = |path: &str, body: &str| {
        format!(
            "POST {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\nContent-Type: application/sdp\r\n\
             Content-Length: {}\r\n\r\n{body}",
            body.len()
        )
    };
    for (request, want) in [
        (sdp(&format!("/whip/{id}?token={key}"), "garbage"), 400),
        (sdp(&format!("/whep/{id}?token={key}"), "v=0\r\n"), 400),
        (sdp(&format!("/whip/{id}?token={TOKEN}"), "v=0\r\n"), 401),
        (sdp(&format!("/whep/{id}"), "v=0\r\n"), 401),
        (sdp(&format!("/whip/str_nope?token={key}"), "v=0\r\n"), 404),
        (
            format!(
                "DELETE /whip/{id}/nosession?token={key} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
            ),
            404,
        ),
        (
            format!(
                "PATCH /whip/{id}/s?token={key} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\
                 Content-Type: application/trickle-ice-sdpfrag\r\nContent-Length: 0\r\n\r\n"
            ),
            405,
        ),
    ] {
        let (status, head, body) = exchange_full(addr, request.as_bytes(), false);
        assert_eq!(status, want, "{request}: {body}");
        envelope(want, &body);
        if want == 405 {
            assert!(
                head.to_ascii_lowercase().contains("allow: delete"),
                "{head}"
            );
        }
    }
    // The server still serves, the stream still runs.
    let (status, got) = api(addr, "GET", &format!("/v1/streams/{id}"), None);
    assert_eq!(status, 200, "{got}");
    let (status, body) = api(addr, "GET", "/healthz", None);
    assert_eq!(
        (status, json_of(&body)["status"].clone()),
        (200, json!("ok"))
    );
}

#[test]
fn what_the_engine_cannot_run_is_refused_at_creation_naming_the_field() {
    let (_runtime, addr, server) = serve(ServerConfig {
        max_streams: 1,
        ..config()
    });
    for (params, field) in [
        (
            json!({"controlnets": [{"model_id": "tiny-controlnet-a",
                                     "preprocessor": "mediapipe_segmentation"}]}),
            "`controlnets[0].preprocessor`",
        ),
        (
            json!({"controlnets": [{"model_id": "tiny-controlnet-a", "preprocessor": "openpose",
                                     "preprocessor_params": {"include_hands": "yes"}}]}),
            "`controlnets[0].preprocessor.params.include_hands`",
        ),
        (
            json!({"controlnets": [{"model_id": "tiny-controlnet-a",
                                     "preprocessor": "realesrgan_trt"}]}),
            "`controlnets[0].preprocessor`",
        ),
        (
            json!({"image_preprocessing": {"enabled": true, "processors": [{"type": "mediapipe_pose"}]}}),
            "`image_preprocessing.processors[0]",
        ),
        // The server never takes paths: a LoRA must be a hub id.
        (json!({"lora_dict": {"../some/lora": 1.0}}), "`lora_dict`"),
        (
            json!({"ip_adapter": {"enabled": true, "type": "faceid"}}),
            "ip_adapter.type",
        ),
        (
            json!({"latent_preprocessing": {"enabled": true, "processors": [
                {"type": "latent_feedback", "params": {"feedback_strength": 2}}]}}),
            "`latent_preprocessing.processors[0].params.feedback_strength`",
        ),
        (
            json!({"model_id": "Lykon/dreamshaper-8", "lcm_lora_id": "/lcm"}),
            "`lcm_lora_id`",
        ),
    ] {
        let (status, body) = api(
            addr,
            "POST",
            "/v1/streams",
            Some(&json!({"params": params})),
        );
        assert_eq!(status, 422, "{params}: {body}");
        let message = envelope(422, &body);
        assert!(message.contains(field), "{params}: {message}");
    }
    assert_eq!(server.app().stream_count(), 0, "nothing was left in ERROR");
    // The refusals held no place: the one place is free.
    let only = create(addr, &json!({}));
    // The limit: 429 with the envelope, and a place again once a stream is deleted.
    let (status, body) = api(addr, "POST", "/v1/streams", Some(&json!({})));
    assert_eq!(status, 429, "{body}");
    assert!(envelope(429, &body).contains("at most 1 streams"));
    let (_, ready) = api(addr, "GET", "/readyz", None);
    assert_eq!(
        json_of(&ready),
        json!({"status": "ready", "streams": 1, "max_streams": 1, "rtmp": null}),
        "a full server stays ready"
    );
    let id = only["id"].as_str().unwrap();
    assert_eq!(
        api(addr, "DELETE", &format!("/v1/streams/{id}"), None).0,
        200
    );
    create(addr, &json!({}));
}

#[test]
fn idle_streams_are_deleted_by_the_sweep_and_shutdown_closes_the_rest() {
    let idle = Duration::from_secs(60);
    let server = Server::new(ServerConfig {
        idle_timeout: Some(idle),
        instance: Some("gpu-0".into()),
        ..config()
    })
    .expect("server");
    let app = server.app().clone();
    let runtime = runtime();
    let body = |prompt: &str| CreateBody::parse(&json!({"params": {"prompt": prompt}})).unwrap();
    let first = app.create(body("one")).expect("first");
    assert!(first.id.starts_with("str_gpu-0_"), "{}", first.id);
    let second = app.create(body("two")).expect("second");
    let engine = second.engine.clone();
    let now = Instant::now();
    // Not idle long enough: nothing goes.
    assert_eq!(runtime.block_on(app.sweep(now)), Vec::<String>::new());
    assert_eq!(app.stream_count(), 2);
    // Past the timeout since its creation, a stream that never had a publisher goes; the
    // younger one is measured from its own creation.
    let past_first = first.created + idle + Duration::from_millis(1);
    let expected: BTreeSet<String> = [&first, &second]
        .into_iter()
        .filter(|s| past_first.saturating_duration_since(s.created) > idle)
        .map(|s| s.id.clone())
        .collect();
    let swept: BTreeSet<String> = runtime
        .block_on(app.sweep(past_first))
        .into_iter()
        .collect();
    assert!(swept.contains(&first.id));
    assert_eq!(swept, expected);
    assert!(app.stream(&first.id).is_none());
    assert_eq!(
        first.engine.status().state,
        EngineState::Offline,
        "the swept stream's engine is closed"
    );
    drop(first);
    let third = app.create(body("three")).expect("third");
    let live_before = app.stream_count();
    assert!(live_before >= 1);

    // Shutdown: run() returns once the signal fires, every stream closed.
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .expect("listen");
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = runtime.spawn({
        let server = server.clone();
        async move {
            server
                .run(listener, async {
                    let _ = stopped.await;
                })
                .await
        }
    });
    let (status, ready) = runtime
        .block_on(runtime.spawn_blocking(move || api(addr, "GET", "/readyz", None)))
        .unwrap();
    assert_eq!(status, 200, "{ready}");
    stop.send(()).unwrap();
    runtime.block_on(running).unwrap().expect("served");
    assert_eq!(app.stream_count(), 0);
    assert!(app.is_shutting_down());
    for engine in [&engine, &third.engine] {
        assert_eq!(engine.status().state, EngineState::Offline);
    }
    let created = app.create(body("late"));
    assert_eq!(created.err().map(|e| e.status.as_u16()), Some(503));
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
    let (_runtime, addr, _server) = serve(config());
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
    let message = envelope(422, &refusal);
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
        status_data(addr, &id)["engine"]["params_version"]
            .as_u64()
            .unwrap()
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
fn bodies_cut_short_are_400_and_only_bodies_over_the_limit_413() {
    let (_runtime, addr, _server) = serve(config());
    let stream = create(addr, &json!({}));
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
        // Complete, so the write side stays open: hyper drops the
        // connection when it reads EOF before its answer is out, and with nothing left to read
        // an early close raced the 400 (a CI run read no answer at all).
        (
            "complete but empty JSON body",
            api_head("Content-Length: 0\r\n"),
            false,
            400,
        ),
    ];
    for (what, raw, half_close, want) in cases {
        let (status, body) = exchange(addr, raw.as_bytes(), half_close);
        assert_eq!(status, want, "{what}: {body}");
        let message = envelope(want, &body);
        if want == 400 && !what.contains("empty") {
            assert!(message.contains("incomplete"), "{what}: {body}");
        }
        let (status, body) = api(addr, "GET", &format!("/v1/streams/{id}"), None);
        assert_eq!(status, 200, "after {what}: {body}");
    }
    let (status, _) = api(addr, "DELETE", &format!("/v1/streams/{id}"), None);
    assert_eq!(status, 200);
}

#[test]
fn start_time_is_the_creation_in_milliseconds() {
    let (_runtime, addr, _server) = serve(config());
    let before = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let stream = create(addr, &json!({}));
    let after = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let data = status_data(addr, stream["id"].as_str().unwrap());
    let start = data["start_time"].as_u64().unwrap();
    assert!(
        (before..=after).contains(&start),
        "{before} {start} {after}"
    );
    assert_eq!(data["inference_status"]["start_time"], start);
}

#[test]
fn the_lan_flag_reaches_the_engines_settings() {
    let args = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let local: SocketAddr = "127.0.0.1:8088".parse().unwrap();
    let settings = |a: &[&str]| match cli::parse(&args(a), None) {
        Ok(Command::Serve(serve)) => {
            cli::config(&serve, "t".into(), local, None)
                .expect("config")
                .settings
        }
        other => panic!("{a:?}: {other:?}"),
    };
    assert!(!settings(&["serve"]).allow_private_network);
    assert!(settings(&["serve", "--allow-private-network"]).allow_private_network);
    assert!(
        settings(&["serve", "--allow-private-network", "--max-streams", "2"]).allow_private_network
    );
    let err = cli::parse(&args(&["serve", "--allow-private-network=yes"]), None)
        .expect_err("takes no value");
    assert!(err.contains("takes no value"), "{err}");
}

#[test]
fn loras_are_served_like_models_and_no_answer_names_the_model_root() {
    let mut config = config();
    // The fixtures' `lora` folder holds LoRA folders, no LoRA file of its own: allowed, it
    // fails when the stream loads.
    config.settings.allowed_models.push("lora".into());
    let root = fixtures().display().to_string();
    let canonical = fixtures().canonicalize().unwrap().display().to_string();
    let (_rt, addr, _server) = serve(config);
    for (params, field) in [
        (json!({"lora_dict": {"org/some-lora": 1.0}}), "`lora_dict`"),
        (
            json!({"use_lcm_lora": true, "lcm_lora_id": "org/other-lcm-lora"}),
            "`lcm_lora_id`",
        ),
        (json!({"lora_dict": {"lora/peft-a": 1.0}}), "`lora_dict`"),
    ] {
        let (status, body) = api(
            addr,
            "POST",
            "/v1/streams",
            Some(&json!({"params": params})),
        );
        assert_eq!(status, 422, "{params}: {body}");
        let message = envelope(422, &body);
        assert!(
            message.contains(field) && message.contains("is not a LoRA served here"),
            "{params}: {message}"
        );
        assert!(!message.contains("fixtures"), "{message}");
    }
    let stream = create(addr, &json!({"params": {"lora_dict": {"lora": 1.0}}}));
    let id = stream["id"].as_str().expect("id").to_owned();
    let deadline = Instant::now() + Duration::from_secs(60);
    let data = loop {
        let data = status_data(addr, &id);
        if data["inference_status"]["last_error"].is_string() {
            break data;
        }
        assert!(
            Instant::now() < deadline,
            "the load neither failed nor finished"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let text = data.to_string();
    println!("{}", data["inference_status"]["last_error"]);
    assert!(text.contains("<model_root>/lora"), "{text}");
    assert!(
        !text.contains(&root) && !text.contains(&canonical),
        "{text}"
    );
}
