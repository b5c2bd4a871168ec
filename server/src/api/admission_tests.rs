//! Admission by measured capacity: with N streams of a model and size running, a new stream
//! that would push a round (one frame of each) past their frame budget is refused with 429 and
//! the figures, and admitted again once one of them leaves.

use std::time::{Duration, Instant};

use serde_json::json;

use super::cli::served_settings;
use super::tests::{TOKEN, api, create, envelope, fixtures, json_of, serve};
use super::*;
use sdstream::model::pool::ModelPool;
use sdstream::pipeline::cross_stream::{MemberLabel, admission};
use sdstream::{Frame, PixelFormat, StreamDiffusionParams};

/// The size only this test's streams run at, so that the other tests' tiny streams (which share
/// the process's model pool) are not counted with them.
const SIZE: usize = 72;

#[test]
fn a_stream_past_the_capacity_is_refused_with_the_figures_and_admitted_after_one_leaves() {
    // Every stream has a 2 s budget.
    let settings_json = json!({
        "vae": "tiny-taesd",
        "model_root": fixtures(),
        "allow_any_resolution": true,
        "frame_budget_ms": 2000,
    })
    .to_string();
    let settings =
        served_settings(Some(&settings_json), &["tiny-sd-turbo".to_owned()]).expect("settings");
    let config = ServerConfig {
        token: TOKEN.into(),
        public_url: "http://sd.example:8088".into(),
        default_params: json!({"model_id": "tiny-sd-turbo", "width": SIZE, "height": SIZE,
                               "t_index_list": [20, 32]}),
        settings: settings.clone(),
        ..ServerConfig::default()
    };
    let (_runtime, addr, server) = serve(config);
    let label = MemberLabel {
        model_id: "tiny-sd-turbo".into(),
        size: (SIZE, SIZE),
    };

    // Two streams, each with frames through its engine: the batcher learns their calls (2 rows
    // each) and their other work.
    let ids: Vec<String> = (0..2)
        .map(|k| {
            let s = create(addr, &json!({"params": {"prompt": format!("stream {k}")}}));
            s["id"].as_str().unwrap().to_owned()
        })
        .collect();
    let pixels = vec![90u8; SIZE * SIZE * 3];
    let frame = Frame::packed(&pixels, SIZE, SIZE, PixelFormat::Rgb8).unwrap();
    for id in &ids {
        let engine = server.app().stream(id).expect("stream").engine.clone();
        engine.wait_ready(Some(Duration::from_secs(120))).unwrap();
        for _ in 0..3 {
            engine.process(frame).unwrap();
        }
    }
    for id in &ids {
        let (status, body) = api(addr, "GET", &format!("/v1/streams/{id}/status"), None);
        assert_eq!(status, 200);
        let latency = &json_of(&body)["data"]["inference_status"]["latency_ms"];
        assert_eq!(latency["frames"], 3, "{latency}");
        assert!(latency["p50"].as_f64().unwrap() <= latency["p99"].as_f64().unwrap());
    }

    // A UNet cost of 400 ms a row, 800 ms a stream: two streams' round fits the 2 s budget
    // (1.6 s and their other work), three would take 2.4 s and more.
    let params = StreamDiffusionParams::from_json_with(
        &server
            .app()
            .stream(&ids[0])
            .unwrap()
            .engine
            .params()
            .to_json(),
        &settings,
    )
    .unwrap();
    let models = ModelPool::global()
        .find(&params, &settings)
        .expect("the streams' networks are in the pool");
    models
        .batcher()
        .set_cost_per_row_for_tests(Duration::from_millis(400));
    let predicted = admission(&label, None);
    assert_eq!(predicted.streams, 2, "{predicted:?}");
    assert!(predicted.predicted_round.unwrap() >= Duration::from_millis(2400));

    let (status, body) = api(
        addr,
        "POST",
        "/v1/streams",
        Some(&json!({"params": {"prompt": "one too many"}})),
    );
    assert_eq!(status, 429, "{body}");
    assert_eq!(json_of(&body)["code"], "STREAMS/NO_CAPACITY");
    let message = envelope(429, &body);
    assert!(
        message.contains("with 2 running")
            && message.contains("a UNet batch of 6 rows: 2400.0 ms")
            && message.contains("over the tightest frame budget of 2000.0 ms"),
        "{message}"
    );
    assert_eq!(
        server.app().stream_count(),
        2,
        "the refused stream left nothing behind"
    );

    // One leaves; once its engine has let go of its place, a new stream is admitted.
    let (status, _) = api(addr, "DELETE", &format!("/v1/streams/{}", ids[1]), None);
    assert_eq!(status, 200);
    let deadline = Instant::now() + Duration::from_secs(60);
    while admission(&label, None).streams != 1 {
        assert!(
            Instant::now() < deadline,
            "the deleted stream never left the batcher"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let after = admission(&label, None);
    assert!(after.admitted(), "{after:?}");

    // A stream asking for its own, tighter budget in its body is held to it: a round of two
    // streams (a UNet batch of 4 rows, 1600 ms) does not fit 1000 ms.
    let (status, body) = api(
        addr,
        "POST",
        "/v1/streams",
        Some(&json!({"params": {"prompt": "in a hurry"}, "frame_budget_ms": 1000})),
    );
    assert_eq!(status, 429, "{body}");
    let message = envelope(429, &body);
    assert!(
        message.contains("a UNet batch of 4 rows: 1600.0 ms")
            && message.contains("over the tightest frame budget of 1000.0 ms"),
        "{message}"
    );
    // A budget out of the settings' range, or not a number, is refused naming the member.
    for bad in [json!(0), json!(60001), json!("fast")] {
        let (status, body) = api(
            addr,
            "POST",
            "/v1/streams",
            Some(&json!({"params": {"prompt": "bad budget"}, "frame_budget_ms": bad})),
        );
        assert!(status == 422 || status == 400, "{bad}: {status} {body}");
        assert!(
            envelope(status, &body).contains("frame_budget_ms"),
            "{bad}: {body}"
        );
    }
    assert_eq!(
        server.app().stream_count(),
        1,
        "the refused streams left nothing"
    );

    // A looser one is admitted, and its engine runs under it.
    let loose = create(
        addr,
        &json!({"params": {"prompt": "patient"}, "frame_budget_ms": 5000}),
    );
    let loose_id = loose["id"].as_str().expect("admitted").to_owned();
    let engine = server.app().stream(&loose_id).unwrap().engine.clone();
    assert_eq!(engine.settings().frame_budget_ms, Some(5000.0));
    // Loaded, so that it has joined the batcher before it leaves it.
    engine.wait_ready(Some(Duration::from_secs(120))).unwrap();
    let (status, _) = api(addr, "DELETE", &format!("/v1/streams/{loose_id}"), None);
    assert_eq!(status, 200);
    while admission(&label, None).streams != 1 {
        assert!(
            Instant::now() < deadline,
            "the deleted stream never left the batcher"
        );
        std::thread::sleep(Duration::from_millis(20));
    }

    let third = create(addr, &json!({"params": {"prompt": "after one left"}}));
    assert!(third["id"].as_str().is_some());
}
