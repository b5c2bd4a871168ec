//! The Stable Diffusion safety checker against diffusers' `StableDiffusionSafetyChecker` and
//! transformers' CLIP image processor (PIL backend) on the tiny random-weight checker of
//! tests/fixtures/safety-checker (tests/reference/make_safety_checker_fixtures.py), and in a
//! stream: on by default, flagged frames black and counted, off costing nothing.

use crate::common;

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use common::{check, copy_dir, fixture, golden, golden_case, scratch_dir};
use sdstream::model::safety_checker::{Config, SafetyChecker};
use sdstream::{Frame, PixelFormat, StreamDiffusion, StreamDiffusionParams};
use serde_json::{Value, json};

const CASES: usize = 6;

fn checker() -> SafetyChecker {
    let dir = fixture("safety-checker");
    let config: Config =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    let vb = unsafe {
        candle_nn::VarBuilder::from_mmaped_safetensors(
            &[dir.join("model.safetensors")],
            DType::F32,
            &Device::Cpu,
        )
        .unwrap()
    };
    SafetyChecker::new(&config, vb).unwrap()
}

fn goldens() -> HashMap<String, Tensor> {
    golden("golden/safety_checker.safetensors")
}

fn case(k: usize) -> &'static Value {
    golden_case("golden/safety_checker.json", &format!("case_{k}"))
}

fn floats(v: &Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

#[test]
fn the_clip_image_processor_matches_transformers_pil_backend() {
    let g = goldens();
    let c = checker();
    for k in 0..CASES {
        let image = &g[&format!("image_{k}")];
        let (h, w, _) = image.dims3().unwrap();
        let rgb = image.flatten_all().unwrap().to_vec1::<u8>().unwrap();
        let got = c.clip_input(&rgb, w, h, &Device::Cpu).unwrap();
        check(
            &format!("clip_input {k} ({h}x{w})"),
            &got,
            &g[&format!("clip_input_{k}")],
            1e-6,
        );
    }
}

#[test]
fn embeddings_cosines_scores_and_flags_match_diffusers() {
    let g = goldens();
    let c = checker();
    let mut flagged = 0;
    for k in 0..CASES {
        let embeds = c.image_embeds(&g[&format!("clip_input_{k}")]).unwrap();
        check(
            &format!("image_embeds {k}"),
            &embeds,
            &g[&format!("image_embeds_{k}")],
            1e-5,
        );
        let (special, concept) = c.cosines(&embeds).unwrap();
        let want_special = g[&format!("special_cos_{k}")].to_vec1::<f32>().unwrap();
        let want_concept = g[&format!("concept_cos_{k}")].to_vec1::<f32>().unwrap();
        for (got, want) in special
            .iter()
            .zip(&want_special)
            .chain(concept.iter().zip(&want_concept))
        {
            assert!(
                (got - want).abs() <= 1e-5,
                "case {k}: cosine {got} vs {want}"
            );
        }
        // The verdict from diffusers' own cosines: scores and flag exactly as its forward.
        let verdict = c.verdict(&want_special, &want_concept, 0.5);
        let want = case(k);
        assert_eq!(
            verdict.special_scores,
            floats(&want["special_scores"]),
            "case {k}"
        );
        assert_eq!(
            verdict.concept_scores,
            floats(&want["concept_scores"]),
            "case {k}"
        );
        assert_eq!(
            verdict.flagged,
            want["has_nsfw_concept"].as_bool().unwrap(),
            "case {k}"
        );
        // And from ours.
        assert_eq!(c.verdict(&special, &concept, 0.5).flagged, verdict.flagged);
        flagged += usize::from(verdict.flagged);
    }
    assert!(
        flagged > 0 && flagged < CASES,
        "{flagged} of {CASES} flagged"
    );
}

#[test]
fn the_threshold_moves_the_bar_by_its_distance_from_one_half() {
    let g = goldens();
    let c = checker();
    for k in 0..CASES {
        let special = g[&format!("special_cos_{k}")].to_vec1::<f32>().unwrap();
        let concept = g[&format!("concept_cos_{k}")].to_vec1::<f32>().unwrap();
        let max = floats(&case(k)["concept_scores"])
            .into_iter()
            .fold(f32::NEG_INFINITY, f32::max);
        for threshold in [0.0, 0.3, 0.45, 0.5, 0.55, 1.0] {
            let verdict = c.verdict(&special, &concept, threshold);
            assert_eq!(
                verdict.flagged,
                max > (threshold - 0.5) as f32,
                "case {k} at {threshold}: max score {max}"
            );
            assert_eq!(verdict.max_concept_score(), max);
        }
    }
    // Everything is flagged at 0 here (random cosines sit above −0.5) and nothing at 1.
    let at = |t: f64| {
        (0..CASES)
            .filter(|k| {
                let s = g[&format!("special_cos_{k}")].to_vec1::<f32>().unwrap();
                let c2 = g[&format!("concept_cos_{k}")].to_vec1::<f32>().unwrap();
                c.verdict(&s, &c2, t).flagged
            })
            .count()
    };
    assert!(
        at(0.0) > at(0.5) && at(0.5) > at(1.0),
        "{} {} {}",
        at(0.0),
        at(0.5),
        at(1.0)
    );
}

fn params(model: &Path, extra: Value) -> StreamDiffusionParams {
    let mut b = json!({
        "model_id": model.display().to_string(),
        "prompt": "a photo of a cat",
        "seed": 2,
        "t_index_list": [20],
        "width": 64,
        "height": 64,
    });
    if let (Some(b), Some(e)) = (b.as_object_mut(), extra.as_object()) {
        b.extend(e.clone());
    }
    StreamDiffusionParams::from_json_with(&b.to_string(), &common::tiny_settings("self")).unwrap()
}

/// Fixture frame `i` (of 8), through `s`.
fn process(s: &mut StreamDiffusion, i: usize) -> sdstream::Image {
    let img = image::open(fixture(&format!("frames/{:03}.png", i % 8)))
        .unwrap()
        .to_rgb8();
    s.process(&Frame::packed(img.as_raw(), 64, 64, PixelFormat::Rgb8).unwrap())
        .unwrap()
}

/// A copy of the tiny sd-turbo whose `safety_checker/` is the flagging test checker, in a
/// scratch folder of its own (`tag`: tests run in parallel).
fn pipeline_with_flagging_checker(tag: &str) -> std::path::PathBuf {
    let dir = scratch_dir(&format!("safety-pipeline-{tag}")).join("tiny-sd-turbo");
    copy_dir(&fixture("tiny-sd-turbo"), &dir);
    std::fs::remove_dir_all(dir.join("safety_checker")).unwrap();
    copy_dir(&fixture("safety-checker"), &dir.join("safety_checker"));
    dir
}

#[test]
fn on_by_default_the_tiny_pipelines_checker_passes_every_frame_and_changes_nothing() {
    let model = fixture("tiny-sd-turbo");
    let on = params(&model, json!({}));
    assert!(on.use_safety_checker, "Daydream's default");
    let settings = common::tiny_settings("self");
    let mut checked = StreamDiffusion::new(on, settings.clone()).unwrap();
    let mut unchecked = StreamDiffusion::new(
        params(&model, json!({"use_safety_checker": false})),
        settings,
    )
    .unwrap();
    for i in 0..4 {
        let a = process(&mut checked, i);
        let b = process(&mut unchecked, i);
        assert_eq!(a.data, b.data, "frame {i}");
        assert!(checked.timings().safety.checked);
        assert!(!unchecked.timings().safety.checked);
        assert_eq!(unchecked.timings().processors.runs("safety_checker"), 0);
        assert_eq!(checked.timings().processors.runs("safety_checker"), 1);
    }
    let s = checked.status();
    assert_eq!((s.safety_frames_checked, s.safety_frames_flagged), (4, 0));
    assert!(
        s.processor_ms.contains_key("safety_checker"),
        "{:?}",
        s.processor_ms
    );
    let s = unchecked.status();
    assert_eq!((s.safety_frames_checked, s.safety_frames_flagged), (0, 0));
}

#[test]
fn flagged_frames_are_black_and_counted_and_the_threshold_is_hot() {
    let model = pipeline_with_flagging_checker("flagged");
    let settings = common::tiny_settings("self");
    let c = checker();
    let mut s = StreamDiffusion::new(params(&model, json!({})), settings.clone()).unwrap();
    let mut plain = StreamDiffusion::new(
        params(&model, json!({"use_safety_checker": false})),
        settings,
    )
    .unwrap();
    let (mut flagged, mut passed) = (0, 0);
    for i in 0..8 {
        let got = process(&mut s, i);
        let want = process(&mut plain, i);
        // The verdict the checker gives the unchecked output.
        let out = Tensor::from_vec(
            want.data
                .iter()
                .map(|&v| f32::from(v) / 255.0)
                .collect::<Vec<_>>(),
            (64, 64, 3),
            &Device::Cpu,
        )
        .unwrap()
        .permute((2, 0, 1))
        .unwrap()
        .unsqueeze(0)
        .unwrap();
        let expect_flag = c.check(&out, 0.5).unwrap().flagged;
        assert_eq!(s.timings().safety.flagged, expect_flag, "frame {i}");
        if expect_flag {
            assert!(got.data.iter().all(|&v| v == 0), "frame {i} is not black");
            flagged += 1;
        } else {
            assert_eq!(got.data, want.data, "frame {i}");
            passed += 1;
        }
    }
    println!("flagged {flagged}, passed {passed}");
    let status = s.status();
    assert_eq!(status.safety_frames_checked, 8);
    assert_eq!(status.safety_frames_flagged, flagged);
    assert!(flagged > 0, "the test checker flags none of these outputs");
    // The threshold is hot: at 1.0 nothing is flagged.
    let update = s
        .update(params(&model, json!({"safety_checker_threshold": 1.0})))
        .unwrap();
    assert!(update.is_hot(), "{update:?}");
    for i in 8..12 {
        let got = process(&mut s, i);
        let want = process(&mut plain, i);
        assert_eq!(got.data, want.data, "frame {i}");
        assert!(!s.timings().safety.flagged);
    }
    // Off is hot too, and then nothing runs.
    s.update(params(
        &model,
        json!({"safety_checker_threshold": 1.0, "use_safety_checker": false}),
    ))
    .unwrap();
    process(&mut s, 0);
    assert!(!s.timings().safety.checked);
    assert_eq!(s.status().safety_frames_checked, 12);
}

#[test]
fn a_pipeline_without_its_own_checker_takes_the_hub_ones_from_the_model_root() {
    let scratch = scratch_dir("safety-root");
    let model = scratch.join("tiny-sd-turbo");
    copy_dir(&fixture("tiny-sd-turbo"), &model);
    std::fs::remove_dir_all(model.join("safety_checker")).unwrap();
    let root = scratch.join("root");
    copy_dir(
        &fixture("safety-checker"),
        &root.join("CompVis/stable-diffusion-safety-checker"),
    );
    let mut settings = common::tiny_settings("self");
    settings.model_root = Some(root.clone());
    let mut s = StreamDiffusion::new(params(&model, json!({})), settings.clone()).unwrap();
    let mut n = 0;
    for i in 0..8 {
        process(&mut s, i);
        n += u64::from(s.timings().safety.flagged);
    }
    // The flagging checker was found: the same frames as with it in the pipeline folder.
    let mut own = StreamDiffusion::new(
        params(&pipeline_with_flagging_checker("own"), json!({})),
        common::tiny_settings("self"),
    )
    .unwrap();
    let mut m = 0;
    for i in 0..8 {
        process(&mut own, i);
        m += u64::from(own.timings().safety.flagged);
    }
    assert_eq!(n, m);
    assert_eq!(s.status().safety_frames_checked, 8);
    // Transformers 4.x's `pytorch_model.bin` (keys under `vision_model.vision_model.`, the
    // position_ids buffer) serves as well, with the same verdicts.
    let legacy_root = scratch.join("legacy-root");
    copy_dir(
        &fixture("safety-checker-bin"),
        &legacy_root.join("CompVis/stable-diffusion-safety-checker"),
    );
    let mut legacy_settings = common::tiny_settings("self");
    legacy_settings.model_root = Some(legacy_root);
    let mut legacy = StreamDiffusion::new(params(&model, json!({})), legacy_settings).unwrap();
    let mut fresh = StreamDiffusion::new(
        params(&pipeline_with_flagging_checker("legacy"), json!({})),
        common::tiny_settings("self"),
    )
    .unwrap();
    let mut l = 0;
    for i in 0..8 {
        let got = process(&mut legacy, i);
        let want = process(&mut fresh, i);
        assert_eq!(got.data, want.data, "frame {i}");
        assert_eq!(legacy.timings().safety, fresh.timings().safety, "frame {i}");
        l += u64::from(legacy.timings().safety.flagged);
    }
    assert_eq!(l, n);
    // A broken checker there is an error naming its file, and nothing streams (once no stream
    // holds the loaded one: the pool shares a network while someone holds it).
    drop(s);
    std::fs::write(
        root.join("CompVis/stable-diffusion-safety-checker/config.json"),
        "{\"projection_dim\": \"wide\"}",
    )
    .unwrap();
    let err = StreamDiffusion::new(params(&model, json!({})), settings).unwrap_err();
    assert!(err.to_string().contains("config.json"), "{err}");
}

#[test]
fn an_engine_turns_the_checker_on_hot_without_a_reload() {
    use sdstream::{Engine, EngineOptions};
    use std::time::{Duration, Instant};
    // A pipeline folder of its own, so that no other test holds its checker in the pool.
    let model = pipeline_with_flagging_checker("engine");
    let settings = common::tiny_settings("self");
    let engine = Engine::new(
        params(&model, json!({"use_safety_checker": false})),
        settings,
        EngineOptions {
            warmup: false,
            ..EngineOptions::default()
        },
    )
    .expect("the engine starts");
    let img = image::open(fixture("frames/000.png")).unwrap().to_rgb8();
    let frame = || Frame::packed(img.as_raw(), 64, 64, PixelFormat::Rgb8).unwrap();
    let first = engine.process(frame()).expect("a frame");
    assert!(first.image.data.iter().any(|&v| v != 0));
    assert_eq!(engine.status().safety_frames_checked, 0);
    let update = engine
        .update_params(params(&model, json!({})))
        .expect("accepted");
    assert!(update.is_hot(), "{update:?}");
    let version = engine.status().params_version;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        engine.process(frame()).expect("frames keep flowing");
        if engine.status().serving_params_version == Some(version) {
            // The switch happens between two frames: the frame after it is checked (and this
            // checker flags every output of the tiny pipeline).
            let out = engine.process(frame()).expect("a frame after the switch");
            let status = engine.status();
            assert!(status.safety_frames_checked >= 1, "{status:?}");
            assert_eq!(status.safety_frames_flagged, status.safety_frames_checked);
            assert!(out.image.data.iter().all(|&v| v == 0), "flagged: black");
            assert_eq!((status.restart_count, status.reload_failures), (0, 0));
            break;
        }
        assert!(Instant::now() < deadline, "the switch never happened");
    }
}
