//! Daydream's views of a stream: the stream object and the status envelope, read from the
//! app's state.
//!
//! The field lists follow Daydream's public API reference and its official Python SDK
//! (`daydream-sdk` 0.1.0, whose response models require every field of [`stream_json`] but
//! `output_stream_url`).

use serde_json::{Value, json};

use super::bodies::AUTHOR;
use super::state::{App, StreamEntry, stream_state};
use crate::webrtc::{Ingest, PublisherState, TransportStats};

/// The WHIP and WHEP URLs of a stream.
pub(crate) fn urls(app: &App, s: &StreamEntry) -> (String, String) {
    let base = &app.config().public_url;
    (
        format!("{base}/whip/{}?token={}", s.id, s.key),
        format!("{base}/whep/{}?token={}", s.id, s.key),
    )
}

/// The HLS playlist URL of a stream.
pub(crate) fn hls_url(app: &App, s: &StreamEntry) -> String {
    format!(
        "{}/hls/{}/index.m3u8?token={}",
        app.config().public_url,
        s.id,
        s.key
    )
}

/// The host of the public URL (`gateway_host`).
pub(crate) fn gateway_host(app: &App) -> String {
    let url = &app.config().public_url;
    let rest = url.split_once("://").map_or(url.as_str(), |(_, r)| r);
    rest.split('/').next().unwrap_or(rest).to_owned()
}

/// Daydream's stream object.
pub(crate) fn stream_json(app: &App, s: &StreamEntry) -> Value {
    let (whip_url, whep_url) = urls(app, s);
    let params = App::params_json(s);
    let updated_at = s.updated_at.lock().map(|t| t.clone()).unwrap_or_default();
    let rtmp_url = app.config().rtmp_url.clone();
    let rtmp_publish_url = rtmp_url.as_ref().map(|u| format!("{u}/{}", s.key));
    json!({
        "id": s.id,
        "object": "stream",
        "name": s.name,
        "author": AUTHOR,
        "pipeline": s.pipeline,
        "params": params,
        "pipeline_id": s.pipeline_id,
        "pipeline_params": params,
        "stream_key": s.key,
        "created_at": s.created_at,
        "updated_at": updated_at,
        "output_playback_id": s.id,
        "from_playground": false,
        "gateway_host": gateway_host(app),
        "is_smoke_test": false,
        "whip_url": whip_url,
        "output_stream_url": whep_url,
        "whep_url": whep_url,
        "hls_url": hls_url(app, s),
        "rtmp_url": rtmp_url,
        "rtmp_publish_url": rtmp_publish_url,
        "output_rtmp_url": s.push.as_ref().map(|(url, _)| url),
    })
}

/// Connection quality from loss and jitter (the gateway's `conn_quality`).
fn conn_quality(loss_pct: f64, jitter_ms: f64) -> &'static str {
    if loss_pct < 2.0 && jitter_ms < 30.0 {
        "good"
    } else if loss_pct < 10.0 && jitter_ms < 100.0 {
        "fair"
    } else {
        "poor"
    }
}

/// The gateway's ingest metrics: the publisher connection's bytes and its video track's
/// packets, loss and jitter. `rtt` is `null`: the publisher's receiver reports are not read.
fn ingest_metrics(s: &StreamEntry, t: &TransportStats, ingest: &Ingest) -> Value {
    let received = t.media_packets_received;
    let lost = t.media_packets_lost;
    let loss_pct = if received + lost > 0 {
        lost as f64 * 100.0 / (received + lost) as f64
    } else {
        0.0
    };
    let mut warnings = Vec::new();
    if ingest.publisher == PublisherState::Gone {
        warnings.push("the publisher has gone");
    }
    let track_stats: Vec<Value> = if received > 0 {
        vec![json!({
            "type": "video",
            "jitter": t.media_jitter_ms,
            "packets_lost": lost,
            "packets_received": received,
            "packet_loss_pct": loss_pct,
            "rtt": null,
            "warnings": warnings,
        })]
    } else {
        Vec::new()
    };
    json!({
        "stats": {
            "peer_conn_stats": {
                "ID": s.id,
                "BytesReceived": t.media_bytes_received,
                "BytesSent": t.media_bytes_sent,
            },
            "track_stats": track_stats,
            "conn_quality": conn_quality(loss_pct, t.media_jitter_ms),
        }
    })
}

/// Where a frame's time goes on each path, in milliseconds (mean, median, p95, max of the
/// last 512): `ingest` (the access unit complete → submitted: decode queue, decode, RGB),
/// `queueing` (inside the engine around the pipeline call), `engine` (the pipeline call),
/// `encode` (H.264, once for every output), and `delivery` per output path: `webrtc`
/// (taken from the engine → on the first viewer's track), `hls` (encoded → its segment
/// published), `rtmp_push` (encoded → written to the socket). `transport_added` is the WebRTC
/// path's sum minus the engine (publisher's access unit → viewer's track).
fn latency_json(
    t: &TransportStats,
    ingest: &Ingest,
    hls: &crate::hls::HlsStats,
    push: Option<&crate::rtmp::PushStatus>,
) -> Value {
    json!({
        "ingest": {
            "source": ingest.kind.map(|k| k.as_str()),
            "decode": t.decode,
            "total": t.ingest,
        },
        "queueing": t.engine_queueing,
        "engine": t.pipeline,
        "encode": t.encode,
        "delivery": {
            "webrtc": t.send,
            "hls": hls.delivery,
            "rtmp_push": push.map(|p| &p.delivery),
        },
        "transport_added": t.transport,
    })
}

/// `GET /v1/streams/{id}/status`: `{success, error, data}`, `data` in both vocabularies
/// clients read: the runner's (`input_status.fps`, `inference_status.fps`) and the API
/// reference's (`inference_status.input_fps`, `output_fps`, `last_input_time`), with the
/// gateway's `whep_url` and ingest metrics; times in milliseconds since the epoch. sdstream's
/// own report is under `engine` (the engine's status: `params_version`, queues, timings) and
/// `transport` (the WebRTC counters).
pub(crate) fn status_json(app: &App, s: &StreamEntry) -> Value {
    let engine = s.engine.status();
    let transport = s.transport.stats();
    let ingest = s.transport.ingest();
    let state = stream_state(engine.state, &ingest);
    let (_, whep_url) = urls(app, s);
    let hls = s.hls.stats();
    let push = s.push.as_ref().map(|(_, p)| p.status());
    let restart_logs: Vec<String> = Vec::new();
    let inference = json!({
        "pipeline": s.pipeline,
        "stream_id": s.id,
        "start_time": s.start_time,
        "fps": engine.output_fps,
        "input_fps": engine.input_fps,
        "output_fps": engine.output_fps,
        "latency_ms": engine.latency_ms,
        "last_input_time": engine.last_input_time,
        "last_output_time": engine.last_output_time,
        "last_error": engine.last_error,
        "last_error_time": engine.last_error_time,
        "last_params": engine.last_params,
        "last_params_hash": engine.last_params_hash,
        "last_params_update_time": engine.last_params_update_time,
        "restart_count": engine.restart_count,
        "last_restart_time": engine.last_restart_time,
        "last_restart_logs": restart_logs,
    });
    let data = json!({
        "type": "status",
        "stream_id": s.id,
        "request_id": s.id,
        "pipeline": s.pipeline,
        "pipeline_id": s.pipeline_id,
        "state": state.as_str(),
        "start_time": s.start_time,
        "input_status": {
            "fps": engine.input_fps,
            "last_input_time": engine.last_input_time,
        },
        "inference_status": inference,
        "gateway_status": {
            "whep_url": whep_url,
            "error": null,
            "ingest_metrics": ingest_metrics(s, &transport, &ingest),
        },
        "orchestrator_info": {
            "address": app.config().instance.as_deref().unwrap_or(""),
            "url": app.config().public_url,
        },
        "latency": latency_json(&transport, &ingest, &hls, push.as_ref()),
        "hls": hls,
        "rtmp_push": push,
        "engine": engine,
        "transport": transport,
    });
    json!({"success": true, "error": null, "data": data})
}
