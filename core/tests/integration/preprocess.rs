//! The image processors against OpenCV and against torch renderings of Daydream's processors
//! (goldens from tests/reference/make_preprocess_goldens.py), their params' validation, and the
//! `image_preprocessing` / `image_postprocessing` chains in a running stream.

use crate::common;

use candle_core::{DType, Device, Tensor};
use common::{abs_err, check, fixture, golden};
use sdstream::preprocess::{self, ProcessorInputs};
use serde_json::{Map, Value, json};

fn params(v: Value) -> Map<String, Value> {
    v.as_object().cloned().unwrap_or_default()
}

/// An RGB8 PNG under tests/fixtures/preprocess/inputs as `[1, 3, H, W]` in [0, 1].
fn input_png(name: &str) -> Tensor {
    let img = image::open(fixture(&format!("preprocess/inputs/{name}.png")))
        .unwrap()
        .to_rgb8();
    let (w, h) = (img.width() as usize, img.height() as usize);
    u8_hwc_to_unit(img.as_raw(), h, w)
}

fn u8_hwc_to_unit(raw: &[u8], h: usize, w: usize) -> Tensor {
    Tensor::from_vec(raw.to_vec(), (h, w, 3), &Device::Cpu)
        .unwrap()
        .permute((2, 0, 1))
        .unwrap()
        .unsqueeze(0)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .affine(1.0 / 255.0, 0.0)
        .unwrap()
}

/// A uint8 `[H, W, 3]` input stored in filters.safetensors as `[1, 3, H, W]` in [0, 1].
fn golden_input(g: &std::collections::HashMap<String, Tensor>, key: &str) -> Tensor {
    let t = &g[key];
    let (h, w, _) = t.dims3().unwrap();
    u8_hwc_to_unit(&t.flatten_all().unwrap().to_vec1::<u8>().unwrap(), h, w)
}

fn run(name: &str, p: Value, x: &Tensor) -> Tensor {
    preprocess::apply(name, &params(p), x, &ProcessorInputs::default()).unwrap()
}

#[test]
fn canny_matches_opencv_on_every_pixel() {
    let thresholds: Vec<(f64, f64)> =
        std::fs::read_to_string(fixture("preprocess/canny/thresholds.txt"))
            .unwrap()
            .lines()
            .map(|l| {
                let v: Vec<f64> = l.split_whitespace().map(|s| s.parse().unwrap()).collect();
                (v[0], v[1])
            })
            .collect();
    assert!(thresholds.len() >= 3);
    let mut names: Vec<String> = std::fs::read_dir(fixture("preprocess/inputs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter_map(|p| Some(p.file_stem()?.to_str()?.to_owned()))
        .collect();
    names.sort();
    assert!(names.len() >= 10, "{names:?}");
    let (mut total, mut agree) = (0usize, 0usize);
    for name in &names {
        let x = input_png(name);
        let (_, _, h, w) = x.dims4().unwrap();
        let want = image::open(fixture(&format!("preprocess/canny/{name}.png")))
            .unwrap()
            .to_luma8();
        assert_eq!(want.height() as usize, h * thresholds.len());
        for (k, &(lo, hi)) in thresholds.iter().enumerate() {
            let got = run(
                "canny",
                json!({"low_threshold": lo, "high_threshold": hi}),
                &x,
            );
            // Three identical 0/1 channels.
            let c = got.squeeze(0).unwrap();
            assert_eq!(
                abs_err(&c.get(0).unwrap(), &c.get(2).unwrap()).0,
                0.0,
                "{name}: channels differ"
            );
            let got = c
                .get(0)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let want = &want.as_raw()[k * h * w..(k + 1) * h * w];
            let same = got
                .iter()
                .zip(want)
                .filter(|(g, w)| (**g == 1.0) == (**w == 255))
                .count();
            let edges = want.iter().filter(|&&v| v == 255).count();
            println!(
                "canny {name} {lo}/{hi}: {same}/{} agree, {edges} edges",
                h * w
            );
            total += h * w;
            agree += same;
        }
    }
    let rate = agree as f64 / total as f64;
    println!(
        "canny: {agree}/{total} pixels agree with cv2.Canny ({:.4}%)",
        100.0 * rate
    );
    assert_eq!(agree, total, "canny disagrees with OpenCV");
}

#[test]
fn canny_defaults_are_100_200_and_thresholds_swap_like_opencv() {
    let x = input_png("checker_noise");
    let default = run("canny", json!({}), &x);
    let explicit = run(
        "canny",
        json!({"low_threshold": 100, "high_threshold": 200}),
        &x,
    );
    let swapped = run(
        "canny",
        json!({"low_threshold": 200, "high_threshold": 100}),
        &x,
    );
    assert_eq!(abs_err(&default, &explicit).0, 0.0);
    assert_eq!(abs_err(&default, &swapped).0, 0.0);
    // A frame that went through the stream's [−1, 1] mapping and back gives the same edges.
    let round_trip = x.affine(2.0, -1.0).unwrap().affine(0.5, 0.5).unwrap();
    let again = run("canny", json!({}), &round_trip);
    assert_eq!(abs_err(&default, &again).0, 0.0);
    // And they are not trivially empty.
    let edges = default.sum_all().unwrap().to_scalar::<f32>().unwrap();
    assert!(edges > 100.0, "{edges}");
}

#[test]
fn soft_edge_equals_daydreams_formula() {
    let g = golden("preprocess/filters.safetensors");
    for (input, key) in [("input_a", "soft_edge_a"), ("input_b", "soft_edge_b")] {
        let got = run("soft_edge", json!({}), &golden_input(&g, input));
        let want = g[key].broadcast_as(got.dims()).unwrap();
        check(key, &got, &want, 1e-4);
    }
}

#[test]
fn blur_equals_daydreams_gaussian() {
    let g = golden("preprocess/filters.safetensors");
    let x = golden_input(&g, "input_c");
    for (key, p) in [
        ("blur_default", json!({})),
        (
            "blur_k4_s0.8",
            json!({"blur_intensity": 0.8, "kernel_size": 4}),
        ),
        (
            "blur_k31_s5",
            json!({"blur_intensity": 5.0, "kernel_size": 31}),
        ),
    ] {
        check(key, &run("blur", p, &x), &g[key], 1e-5);
    }
}

#[test]
fn sharpen_equals_daydreams_steps() {
    let g = golden("preprocess/filters.safetensors");
    let x = golden_input(&g, "input_c");
    for (key, p) in [
        ("sharpen_default", json!({})),
        (
            "sharpen_single",
            json!({"multi_scale": false, "sharpen_intensity": 3.0, "unsharp_radius": 2.0,
                   "edge_enhancement": 0.0, "detail_boost": 1.0, "noise_reduction": 0.0}),
        ),
        (
            "sharpen_strong",
            json!({"noise_reduction": 0.5, "edge_enhancement": 2.0, "detail_boost": 0.0,
                   "unsharp_radius": 0.4}),
        ),
    ] {
        check(key, &run("sharpen", p, &x), &g[key], 1e-5);
    }
}

#[test]
fn feedback_blends_with_the_previous_output_and_is_identity_without_one() {
    let g = golden("preprocess/filters.safetensors");
    let (x, prev) = (golden_input(&g, "input_c"), golden_input(&g, "input_d"));
    let inputs = ProcessorInputs {
        previous_output: Some(&prev),
        external: None,
        ..Default::default()
    };
    let p = params(json!({"feedback_strength": 0.3}));
    let got = preprocess::apply("feedback", &p, &x, &inputs).unwrap();
    check("feedback_0.3", &got, &g["feedback_0.3"], 1e-6);
    // Default strength 0.5.
    let half = preprocess::apply("feedback", &Map::new(), &x, &inputs).unwrap();
    let want = ((&x + &prev).unwrap() * 0.5).unwrap();
    check("feedback default", &half, &want, 1e-6);
    let first = preprocess::apply("feedback", &p, &x, &ProcessorInputs::default()).unwrap();
    assert_eq!(abs_err(&first, &x).0, 0.0);
}

#[test]
fn upscale_resamples_as_torch_and_keeps_the_frame_size() {
    let g = golden("preprocess/filters.safetensors");
    let x = golden_input(&g, "input_d");
    for (key, p) in [
        ("upscale_default", json!({})),
        (
            "upscale_bicubic_1.5",
            json!({"scale_factor": 1.5, "algorithm": "bicubic"}),
        ),
        (
            "upscale_nearest_3",
            json!({"scale_factor": 3.0, "algorithm": "nearest"}),
        ),
        (
            "upscale_lanczos_2.5",
            json!({"scale_factor": 2.5, "algorithm": "lanczos"}),
        ),
    ] {
        let got = run("upscale", p, &x);
        assert_eq!(got.dims(), x.dims());
        check(key, &got, &g[key], 1e-5);
    }
}

#[test]
fn passthrough_and_external() {
    let g = golden("preprocess/filters.safetensors");
    let (x, ext) = (golden_input(&g, "input_c"), golden_input(&g, "input_d"));
    assert_eq!(abs_err(&run("passthrough", json!({}), &x), &x).0, 0.0);
    let inputs = ProcessorInputs {
        previous_output: None,
        external: Some(&ext),
        ..Default::default()
    };
    let got = preprocess::apply("external", &Map::new(), &x, &inputs).unwrap();
    assert_eq!(abs_err(&got, &ext).0, 0.0);
    let err = preprocess::apply("external", &Map::new(), &x, &ProcessorInputs::default())
        .unwrap_err()
        .to_string();
    assert!(err.contains("no control image"), "{err}");
    let small = ext.narrow(3, 0, 16).unwrap();
    let inputs = ProcessorInputs {
        previous_output: None,
        external: Some(&small),
        ..Default::default()
    };
    let err = preprocess::apply("external", &Map::new(), &x, &inputs)
        .unwrap_err()
        .to_string();
    assert!(err.contains("[1, 3, 32, 16]"), "{err}");
}

#[test]
fn validation_names_the_field_and_the_rule() {
    let f = "controlnets[1].preprocessor";
    for name in preprocess::SUPPORTED_PROCESSORS {
        let checked = preprocess::validate(name, &Map::new(), f);
        if *name == "realesrgan_trt" {
            // An upscaler is no ControlNet preprocessor (the control image has the frame's size).
            let err = checked.unwrap_err().to_string();
            assert!(
                err.contains(f) && err.contains("image_postprocessing"),
                "{err}"
            );
        } else {
            checked.unwrap_or_else(|e| panic!("{name}: {e}"));
        }
    }
    for name in ["mediapipe_pose", "mediapipe_segmentation"] {
        let err = preprocess::validate(name, &Map::new(), f)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(f) && err.contains("not available in sdstream") && err.contains(name),
            "{err}"
        );
    }
    for (name, p, key) in [
        ("openpose", json!({"include_hands": 1}), "include_hands"),
        ("openpose", json!({"include_face": "no"}), "include_face"),
    ] {
        let err = preprocess::validate(name, &params(p), f)
            .unwrap_err()
            .to_string();
        assert!(err.contains(&format!("{f}.params.{key}")), "{err}");
    }
    preprocess::validate("openpose", &params(json!({"include_hands": true})), f)
        .expect("hands and faces are supported");
    preprocess::validate("lineart", &params(json!({"anime_style": true})), f)
        .expect("the anime lineart generator is supported");
    let err = preprocess::validate("lineart", &params(json!({"anime_style": "yes"})), f)
        .unwrap_err()
        .to_string();
    assert!(err.contains(&format!("{f}.params.anime_style")), "{err}");
    let err = preprocess::validate("sobel", &Map::new(), f)
        .unwrap_err()
        .to_string();
    assert!(err.contains("unknown image processor"), "{err}");
    for (name, p, key, what) in [
        (
            "canny",
            json!({"low_threshold": "high"}),
            "low_threshold",
            "expected a number",
        ),
        (
            "canny",
            json!({"high_threshold": 300}),
            "high_threshold",
            "out of range",
        ),
        (
            "blur",
            json!({"kernel_size": 2.5}),
            "kernel_size",
            "expected an integer",
        ),
        (
            "blur",
            json!({"blur_intensity": 0}),
            "blur_intensity",
            "out of range",
        ),
        (
            "sharpen",
            json!({"multi_scale": 1}),
            "multi_scale",
            "true or false",
        ),
        (
            "feedback",
            json!({"feedback_strength": 1.5}),
            "feedback_strength",
            "out of range",
        ),
        (
            "upscale",
            json!({"algorithm": "area"}),
            "algorithm",
            "expected one of",
        ),
    ] {
        let err = preprocess::validate(name, &params(p), f)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(&format!("{f}.params.{key}")) && err.contains(what),
            "{name}: {err}"
        );
    }
    // Keys a processor does not read are ignored, as Daydream ignores them.
    preprocess::validate("canny", &params(json!({"image_resolution": 512})), f).unwrap();
}

// ------------------------------------------------------------------ the chains in a stream

mod stream {
    use std::sync::Arc;

    use candle_core::Tensor;
    use sdstream::model::bundle::StableDiffusionModels;
    use sdstream::params::HotChange;
    use sdstream::preprocess::{self, ProcessorInputs};
    use sdstream::{EngineSettings, Error, StreamDiffusion, Update};
    use serde_json::{Value, json};

    use super::common::{abs_err, fixture};
    use super::params;

    fn settings() -> EngineSettings {
        super::common::tiny_settings("self")
    }

    fn models() -> Arc<StableDiffusionModels> {
        super::common::tiny_models()
    }

    fn body(extra: Value) -> Value {
        let mut b = json!({
            "model_id": fixture("tiny-sd-turbo").display().to_string(),
            "prompt": "a photo of a cat",
            "seed": 2,
            "t_index_list": [12, 20, 32],
            "guidance_scale": 1.2,
            "delta": 0.8,
            "width": 64,
            "height": 64,
        });
        if let (Some(b), Some(e)) = (b.as_object_mut(), extra.as_object()) {
            b.extend(e.clone());
        }
        b
    }

    fn stream_params(b: &Value) -> sdstream::StreamDiffusionParams {
        sdstream::StreamDiffusionParams::from_json_with(&b.to_string(), &settings()).unwrap()
    }

    fn stream(b: &Value) -> StreamDiffusion {
        StreamDiffusion::with_models(models(), stream_params(b), settings()).unwrap()
    }

    /// A [−1, 1] input with processor `name` applied in [0, 1], as the stream does.
    fn processed(name: &str, p: Value, x: &Tensor, previous: Option<&Tensor>) -> Tensor {
        let inputs = ProcessorInputs {
            previous_output: previous,
            external: None,
            ..Default::default()
        };
        let unit = x.affine(0.5, 0.5).unwrap();
        preprocess::apply(name, &params(p), &unit, &inputs)
            .unwrap()
            .affine(2.0, -1.0)
            .unwrap()
    }

    const BLUR: &str = "blur";
    fn blur_params() -> Value {
        json!({"blur_intensity": 1.5, "kernel_size": 7})
    }
    fn chain(name: &str, p: Value) -> Value {
        json!({"enabled": true, "processors": [{"type": name, "params": p}]})
    }

    #[test]
    fn preprocessing_blur_equals_processing_a_pre_blurred_frame() {
        let mut with_chain = stream(&body(
            json!({"image_preprocessing": chain(BLUR, blur_params())}),
        ));
        let mut pre_blurred = stream(&body(json!({})));
        let mut plain = stream(&body(json!({})));
        let mut worst = 0f32;
        let mut change = 0f32;
        for i in 0..5 {
            let x = super::common::frame_tensor(i);
            let a = with_chain.process_tensor(&x).unwrap();
            let b = pre_blurred
                .process_tensor(&processed(BLUR, blur_params(), &x, None))
                .unwrap();
            let c = plain.process_tensor(&x).unwrap();
            worst = worst.max(abs_err(&a, &b).0);
            change = change.max(abs_err(&a, &c).0);
        }
        println!("preprocessing blur: vs pre-blurred max {worst:.3e}; vs none max {change:.3e}");
        assert!(worst <= 1e-5, "{worst}");
        assert!(
            change > 1e-3,
            "the blur did not change the output ({change})"
        );
    }

    #[test]
    fn postprocessing_sharpen_is_sharpen_of_the_output() {
        let sharpen = json!({"sharpen_intensity": 2.0});
        let mut with_chain = stream(&body(json!({
            "image_postprocessing": chain("sharpen", sharpen.clone())
        })));
        let mut plain = stream(&body(json!({})));
        for i in 0..4 {
            let a = with_chain
                .process_tensor(&super::common::frame_tensor(i))
                .unwrap();
            let b = plain
                .process_tensor(&super::common::frame_tensor(i))
                .unwrap();
            let want = preprocess::apply(
                "sharpen",
                &params(sharpen.clone()),
                &b,
                &ProcessorInputs::default(),
            )
            .unwrap();
            let (err, changed) = (abs_err(&a, &want).0, abs_err(&a, &b).0);
            println!("postprocessing sharpen frame {i}: max {err:.3e} (changed {changed:.3e})");
            assert!(err <= 1e-6, "frame {i}: {err}");
            assert!(changed > 1e-3, "frame {i}: sharpen changed nothing");
        }
    }

    #[test]
    fn preprocessing_feedback_blends_each_frame_with_the_previous_output() {
        let fb = json!({"feedback_strength": 0.4});
        let mut with_chain = stream(&body(
            json!({"image_preprocessing": chain("feedback", fb.clone())}),
        ));
        let mut manual = stream(&body(json!({})));
        let mut previous: Option<Tensor> = None;
        for i in 0..4 {
            let x = super::common::frame_tensor(i);
            let a = with_chain.process_tensor(&x).unwrap();
            let b = manual
                .process_tensor(&processed("feedback", fb.clone(), &x, previous.as_ref()))
                .unwrap();
            let err = abs_err(&a, &b).0;
            assert!(err <= 1e-5, "frame {i}: {err}");
            previous = Some(b);
        }
    }

    #[test]
    fn hot_updates_toggle_the_chains_on_the_next_frame() {
        let base = body(json!({}));
        let blurred = body(json!({"image_preprocessing": chain(BLUR, blur_params())}));
        let sharpened = body(json!({"image_postprocessing": chain("sharpen", json!({}))}));
        let mut s = stream(&base);
        let mut twin = stream(&base);
        for i in 0..3 {
            s.process_tensor(&super::common::frame_tensor(i)).unwrap();
            twin.process_tensor(&super::common::frame_tensor(i))
                .unwrap();
        }
        // Blur on: frame 3 is the twin's on a pre-blurred frame 3.
        let update = s.update(stream_params(&blurred)).unwrap();
        assert_eq!(
            update,
            Update::Hot {
                changes: vec![HotChange::ImagePreprocessing]
            }
        );
        let a = s.process_tensor(&super::common::frame_tensor(3)).unwrap();
        let b = twin
            .process_tensor(&processed(
                BLUR,
                blur_params(),
                &super::common::frame_tensor(3),
                None,
            ))
            .unwrap();
        assert!(abs_err(&a, &b).0 <= 1e-5, "{}", abs_err(&a, &b).0);
        // Blur off, sharpen on: frame 4 is the twin's plain frame 4, sharpened.
        let update = s.update(stream_params(&sharpened)).unwrap();
        assert!(matches!(update, Update::Hot { .. }), "{update:?}");
        let a = s.process_tensor(&super::common::frame_tensor(4)).unwrap();
        let b = twin
            .process_tensor(&super::common::frame_tensor(4))
            .unwrap();
        let want = preprocess::apply(
            "sharpen",
            &params(json!({})),
            &b,
            &ProcessorInputs::default(),
        )
        .unwrap();
        assert!(abs_err(&a, &want).0 <= 1e-6, "{}", abs_err(&a, &want).0);
        // Disabling the chain (enabled: false) switches it off on the next frame.
        let mut off = sharpened.clone();
        off["image_postprocessing"]["enabled"] = json!(false);
        s.update(stream_params(&off)).unwrap();
        let a = s.process_tensor(&super::common::frame_tensor(5)).unwrap();
        let b = twin
            .process_tensor(&super::common::frame_tensor(5))
            .unwrap();
        assert_eq!(abs_err(&a, &b).0, 0.0);
    }

    #[test]
    fn unsupported_or_invalid_processors_are_rejected_naming_the_field() {
        let cases = [
            (
                json!({"image_preprocessing": chain("mediapipe_segmentation", json!({}))}),
                "image_preprocessing.processors[0]",
                "not available",
            ),
            (
                json!({"image_preprocessing": chain("realesrgan_trt", json!({}))}),
                "image_preprocessing.processors[0]",
                "only image_postprocessing",
            ),
            (
                json!({"image_postprocessing": {"processors": [
                    {"type": "canny", "enabled": false, "params": {"low_threshold": -1}},
                    {"type": "blur", "params": {"kernel_size": 99}}]}}),
                "image_postprocessing.processors[1].params.kernel_size",
                "out of range",
            ),
            (
                json!({"latent_preprocessing": chain("latent_feedback", json!({"feedback_strength": 1.5}))}),
                "latent_preprocessing.processors[0].params.feedback_strength",
                "out of range",
            ),
        ];
        for (extra, field, what) in cases {
            let p = stream_params(&body(extra));
            let err = StreamDiffusion::with_models(models(), p.clone(), settings()).unwrap_err();
            assert!(
                matches!(&err, Error::InvalidParam { field: f, message } if f == field && message.contains(what)),
                "{err}"
            );
            // An update with it is refused and leaves the stream as it was.
            let mut s = stream(&body(json!({})));
            assert!(s.update(p).is_err());
            assert_eq!(s.params(), &stream_params(&body(json!({}))));
        }
        // A disabled chain or disabled processors are accepted whatever they name.
        let p = stream_params(&body(json!({
            "image_preprocessing": {"enabled": false, "processors": [{"type": "depth"}]},
            "image_postprocessing": {"processors": [{"type": "openpose", "enabled": false}]}
        })));
        StreamDiffusion::with_models(models(), p, settings()).unwrap();
    }
}

#[test]
fn a_chain_runs_its_enabled_processors_in_order() {
    use sdstream::params::ProcessingConfig;
    let g = golden("preprocess/filters.safetensors");
    let x = golden_input(&g, "input_c");
    let chain: ProcessingConfig = serde_json::from_value(json!({"processors": [
        {"type": "external"},
        {"type": "blur", "params": {"kernel_size": 5}},
        {"type": "canny", "enabled": false},
        {"type": "sharpen"},
    ]}))
    .unwrap();
    let got = {
        let mut times = preprocess::ProcessorTimes::default();
        let got =
            preprocess::apply_chain(Some(&chain), &x, &ProcessorInputs::default(), &mut times)
                .unwrap();
        // The two enabled processors ran and were timed; the disabled one did not.
        assert!(times.get("blur").is_some() && times.get("sharpen").is_some());
        assert_eq!(times.get("canny"), None);
        assert_eq!(times.iter().count(), 2);
        got
    };
    let want = run(
        "sharpen",
        json!({}),
        &run("blur", json!({"kernel_size": 5}), &x),
    );
    assert_eq!(abs_err(&got, &want).0, 0.0);
    // With a host image, `external` replaces the frame.
    let ext = golden_input(&g, "input_d");
    let inputs = ProcessorInputs {
        previous_output: None,
        external: Some(&ext),
        ..Default::default()
    };
    let got = preprocess::apply_chain(Some(&chain), &x, &inputs, &mut Default::default()).unwrap();
    let want = run(
        "sharpen",
        json!({}),
        &run("blur", json!({"kernel_size": 5}), &ext),
    );
    assert_eq!(abs_err(&got, &want).0, 0.0);
    // A disabled chain is the identity.
    let mut off = chain.clone();
    off.enabled = false;
    let got = preprocess::apply_chain(
        Some(&off),
        &x,
        &ProcessorInputs::default(),
        &mut Default::default(),
    )
    .unwrap();
    assert_eq!(abs_err(&got, &x).0, 0.0);
}
