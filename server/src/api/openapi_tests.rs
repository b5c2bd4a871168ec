//! The OpenAPI document (`openapi.json`, served at `GET /openapi.json`) against the router:
//! every route the router mounts is documented, and every documented operation is mounted
//! (each path answers each method it documents with something other than the router's own
//! `ROUTE/NOT_FOUND` or `ROUTE/METHOD_NOT_ALLOWED`, and every method it does not document with
//! `ROUTE/METHOD_NOT_ALLOWED`). tests/webrtc/openapi_check.py fuzzes a live server against it.

use std::collections::BTreeSet;

use serde_json::Value;

use super::routes::OPENAPI;
use super::tests::{TOKEN, config, request, serve};

/// Every path the router mounts (`routes::router`: the API, the open routes, `scope::routes`,
/// `playback::routes`, `webrtc::router`), in axum's syntax, which is OpenAPI's.
const MOUNTED: &[&str] = &[
    "/",
    "/healthz",
    "/readyz",
    "/openapi.json",
    "/metrics",
    "/v1/streams",
    "/v1/streams/{id}",
    "/v1/streams/{id}/status",
    "/beta/streams/{id}/prompts",
    "/api/v1/webrtc/offer",
    "/api/v1/webrtc/offer/{id}",
    "/api/v1/webrtc/ice-servers",
    "/api/v1/pipeline/load",
    "/api/v1/pipeline/status",
    "/health",
    "/whip/{stream}",
    "/whip/{stream}/{session}",
    "/whep/{stream}",
    "/whep/{stream}/{session}",
    "/hls/{stream}/index.m3u8",
    "/hls/{stream}/{file}",
];

const METHODS: &[&str] = &["get", "post", "put", "patch", "delete"];

fn document() -> Value {
    serde_json::from_str(OPENAPI).expect("openapi.json is JSON")
}

#[test]
fn the_document_is_openapi_3_1_and_lists_every_mounted_path() {
    let doc = document();
    assert_eq!(doc["openapi"], "3.1.0");
    let paths = doc["paths"].as_object().expect("paths");
    let documented: BTreeSet<&str> = paths.keys().map(String::as_str).collect();
    let mounted: BTreeSet<&str> = MOUNTED.iter().copied().collect();
    assert_eq!(documented, mounted);
    // Every reference resolves.
    fn refs<'a>(v: &'a Value, out: &mut Vec<&'a str>) {
        match v {
            Value::Object(m) => {
                if let Some(Value::String(r)) = m.get("$ref") {
                    out.push(r);
                }
                m.values().for_each(|v| refs(v, out));
            }
            Value::Array(a) => a.iter().for_each(|v| refs(v, out)),
            _ => {}
        }
    }
    let mut all = Vec::new();
    refs(&doc, &mut all);
    for r in all {
        let pointer = r.strip_prefix('#').expect("a local reference");
        assert!(doc.pointer(pointer).is_some(), "{r} does not resolve");
    }
    // Every operation has an id and documents its answers.
    for (path, item) in paths {
        for method in METHODS {
            if let Some(op) = item.get(*method) {
                assert!(op["operationId"].is_string(), "{method} {path}");
                assert!(
                    op["responses"].as_object().is_some_and(|r| !r.is_empty()),
                    "{method} {path}"
                );
            }
        }
    }
}

#[test]
fn every_documented_operation_is_mounted_and_no_other_method() {
    let doc = document();
    let (_runtime, addr, _server) = serve(config());
    let mut operations = 0;
    for (path, item) in doc["paths"].as_object().expect("paths") {
        let concrete = path
            .replace("{id}", "str_nope")
            .replace("{stream}", "str_nope")
            .replace("{session}", "nosession")
            .replace("{file}", "0.ts");
        for method in METHODS {
            let (status, _, body) = request(
                addr,
                &method.to_uppercase(),
                &concrete,
                &format!("Bearer {TOKEN}"),
                None,
            );
            let code = serde_json::from_str::<Value>(&body)
                .ok()
                .and_then(|v| v["code"].as_str().map(str::to_owned))
                .unwrap_or_default();
            if item.get(*method).is_some() {
                operations += 1;
                assert!(
                    !code.starts_with("ROUTE/"),
                    "{method} {path} is documented but answers {status} {body}"
                );
                assert!(
                    item[*method]["responses"].get(status.to_string()).is_some(),
                    "{method} {path} answered {status}, not documented: {body}"
                );
            } else {
                assert_eq!(
                    (status, code.as_str()),
                    (405, "ROUTE/METHOD_NOT_ALLOWED"),
                    "{method} {path} is not documented but answers: {body}"
                );
            }
        }
    }
    assert_eq!(operations, 28);
}

#[test]
fn the_document_is_served_as_json_without_a_token() {
    let (_runtime, addr, _server) = serve(config());
    let (status, head, body) = request(addr, "GET", "/openapi.json", "", None);
    assert_eq!(status, 200, "{body}");
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: application/json"),
        "{head}"
    );
    assert_eq!(serde_json::from_str::<Value>(&body).ok(), Some(document()));
}
