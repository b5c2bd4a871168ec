//! `latent_preprocessing` / `latent_postprocessing` with `latent_feedback` on the tiny sd-turbo:
//! the latents a stream keeps follow Daydream's blend, the decoded output is the decoded
//! latent, hot changes keep or restart the history as stated.

use crate::common;

use candle_core::{DType, Tensor};
use common::{abs_err, fixture};
use sdstream::pipeline::stream_batch::to_unit_range;
use sdstream::{StreamDiffusion, StreamDiffusionParams};
use serde_json::{Value, json};

fn params(steps: Value, extra: Value) -> StreamDiffusionParams {
    let mut b = json!({
        "model_id": fixture("tiny-sd-turbo").display().to_string(),
        "prompt": "a photo of a cat",
        "seed": 2,
        "t_index_list": steps,
        "guidance_scale": 1.2,
        "delta": 0.8,
        "width": 64,
        "height": 64,
    });
    if let (Some(b), Some(e)) = (b.as_object_mut(), extra.as_object()) {
        b.extend(e.clone());
    }
    StreamDiffusionParams::from_json_with(&b.to_string(), &common::tiny_settings("self")).unwrap()
}

fn stream(p: StreamDiffusionParams) -> StreamDiffusion {
    StreamDiffusion::with_models(common::tiny_models(), p, common::tiny_settings("self")).unwrap()
}

fn feedback(field: &str, strength: f64) -> Value {
    json!({field: {"processors": [
        {"type": "latent_feedback", "params": {"feedback_strength": strength}}]}})
}

fn latent(s: &StreamDiffusion) -> Tensor {
    s.last_latent()
        .expect("a processed frame leaves its latent")
        .to_dtype(DType::F32)
        .unwrap()
}

/// clamp((1 − k)·x + k·previous, −10, 10), written out.
fn blend(x: &Tensor, previous: &Tensor, k: f64) -> Tensor {
    ((x * (1.0 - k)).unwrap() + (previous * k).unwrap())
        .unwrap()
        .clamp(-10.0, 10.0)
        .unwrap()
}

#[test]
fn postprocessing_feedback_is_the_stated_moving_average_of_the_outputs() {
    let steps = json!([12, 20, 32]);
    let mut plain = stream(params(steps.clone(), json!({})));
    let k = 0.3;
    let mut fed = stream(params(steps, feedback("latent_postprocessing", k)));
    let mut want_previous: Option<Tensor> = None;
    let mut moved = 0.0f32;
    for i in 0..5 {
        plain.process_tensor(&common::frame_tensor(i)).unwrap();
        let out = fed.process_tensor(&common::frame_tensor(i)).unwrap();
        let x0 = latent(&plain);
        // The first frame passes through; later ones blend with the previous kept latent.
        let want = match &want_previous {
            None => x0.clone(),
            Some(previous) => blend(&x0, previous, k),
        };
        let got = latent(&fed);
        let (max, _) = abs_err(&got, &want);
        assert!(max <= 1e-6, "frame {i}: kept latent off by {max}");
        // The output is the decoded kept latent.
        let decoded = fed.models().autoencoder.decode(&got).unwrap();
        let decoded = to_unit_range(&decoded).unwrap();
        let (max, _) = abs_err(&out, &decoded);
        assert!(
            max <= 1e-6,
            "frame {i}: output is not the decoded latent ({max})"
        );
        if i > 0 {
            moved = moved.max(abs_err(&got, &x0).1);
        }
        want_previous = Some(want);
    }
    assert!(moved > 1e-3, "the feedback changed nothing (mean {moved})");
}

#[test]
fn preprocessing_feedback_at_full_strength_denoises_the_previous_latent() {
    // One step: at k = 1 every frame after the first denoises the previous output latent,
    // whatever the input; the input only matters on the first frame.
    let p = params(json!([20]), feedback("latent_preprocessing", 1.0));
    let (mut a, mut b) = (stream(p.clone()), stream(p));
    let a1 = a.process_tensor(&common::frame_tensor(0)).unwrap();
    let b1 = b.process_tensor(&common::frame_tensor(0)).unwrap();
    assert_eq!(abs_err(&a1, &b1).0, 0.0);
    let a2 = a.process_tensor(&common::frame_tensor(3)).unwrap();
    let b2 = b.process_tensor(&common::frame_tensor(7)).unwrap();
    assert_eq!(
        abs_err(&a2, &b2).0,
        0.0,
        "the input leaked through at k = 1"
    );
    // Without the chain the two inputs give different outputs.
    let plain = params(json!([20]), json!({}));
    let (mut c, mut d) = (stream(plain.clone()), stream(plain));
    c.process_tensor(&common::frame_tensor(0)).unwrap();
    d.process_tensor(&common::frame_tensor(0)).unwrap();
    let c2 = c.process_tensor(&common::frame_tensor(3)).unwrap();
    let d2 = d.process_tensor(&common::frame_tensor(7)).unwrap();
    assert!(abs_err(&c2, &d2).1 > 1e-3);
    // At k = 0 the chain changes nothing but the clamp, which these latents never reach.
    let mut zero = stream(params(json!([20]), feedback("latent_preprocessing", 0.0)));
    let mut e = stream(params(json!([20]), json!({})));
    for i in 0..3 {
        let got = zero.process_tensor(&common::frame_tensor(i)).unwrap();
        let want = e.process_tensor(&common::frame_tensor(i)).unwrap();
        assert_eq!(abs_err(&got, &want).0, 0.0, "frame {i}");
    }
}

#[test]
fn hot_changes_keep_the_history_and_a_new_chain_starts_with_a_passed_frame() {
    let steps = json!([20]);
    let mut s = stream(params(steps.clone(), json!({})));
    s.process_tensor(&common::frame_tensor(0)).unwrap();
    s.process_tensor(&common::frame_tensor(1)).unwrap();
    // Enabling the chain is hot; its first frame passes through (the history already exists).
    let update = s
        .update(params(
            steps.clone(),
            feedback("latent_postprocessing", 1.0),
        ))
        .unwrap();
    assert!(update.is_hot(), "{update:?}");
    let mut plain = stream(params(steps.clone(), json!({})));
    for i in 0..3 {
        plain.process_tensor(&common::frame_tensor(i)).unwrap();
    }
    s.process_tensor(&common::frame_tensor(2)).unwrap();
    assert_eq!(
        abs_err(&latent(&s), &latent(&plain)).0,
        0.0,
        "first frame blended"
    );
    // At k = 1 the next frames repeat the kept latent (clamped to ±10: these random-weight
    // latents exceed it).
    let kept3 = latent(&s);
    s.process_tensor(&common::frame_tensor(5)).unwrap();
    let clamped = kept3.clamp(-10.0, 10.0).unwrap();
    assert_eq!(abs_err(&latent(&s), &clamped).0, 0.0);
    let out5 = s.process_tensor(&common::frame_tensor(4)).unwrap();
    assert_eq!(abs_err(&latent(&s), &clamped).0, 0.0);
    let decoded = to_unit_range(&s.models().autoencoder.decode(&clamped).unwrap()).unwrap();
    assert_eq!(abs_err(&out5, &decoded).0, 0.0);
    // A strength change keeps the history: the next frame blends at once.
    let kept = latent(&s);
    s.update(params(
        steps.clone(),
        feedback("latent_postprocessing", 0.5),
    ))
    .unwrap();
    s.process_tensor(&common::frame_tensor(6)).unwrap();
    let mut reference = stream(params(steps.clone(), json!({})));
    // The same inputs: RCFG "self" carries noise from frame to frame.
    for i in [0, 1, 2, 5, 4, 6] {
        reference.process_tensor(&common::frame_tensor(i)).unwrap();
    }
    let want = blend(&latent(&reference), &kept, 0.5);
    let (max, _) = abs_err(&latent(&s), &want);
    assert!(max <= 1e-6, "after a strength change: {max}");
    // An invalid chain is refused naming the field, and the stream keeps its parameters.
    let before = s.params().clone();
    let err = s
        .update(params(steps, feedback("latent_postprocessing", 0.5)).with_chain_kind("blur"))
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("latent_postprocessing.processors[0]"),
        "{err}"
    );
    assert_eq!(s.params(), &before);
}

trait WithChainKind {
    fn with_chain_kind(self, kind: &str) -> Self;
}

impl WithChainKind for StreamDiffusionParams {
    fn with_chain_kind(mut self, kind: &str) -> Self {
        if let Some(chain) = &mut self.latent_postprocessing {
            chain.processors[0].kind = kind.to_string();
        }
        self
    }
}
