//! The model-based image processors and their networks against the reference implementations
//! (goldens from tests/reference/make_processor_fixtures.py: controlnet_aux's HED and lineart
//! detectors, spandrel's Real-ESRGAN, a torch rendering of Daydream's standard_lineart), the
//! PyTorch checkpoint reader, and the network pool.

use crate::common;

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use common::{abs_err, fixture, golden, max_magnitude, scratch_dir, share_off};
use sdstream::hub::HubOptions;
use sdstream::preprocess::networks::{
    Network, NetworkKind, NetworkPool, NetworkRequest, ProcessorNetworks,
};
use sdstream::preprocess::{self, ProcessorInputs};
use serde_json::{Map, Value, json};

/// Hub options that find the tiny networks under tests/fixtures/model-root.
fn hub() -> HubOptions {
    HubOptions {
        model_root: Some(fixture("model-root")),
        cache_dir: None,
        offline: true,
        ..HubOptions::default()
    }
}

fn networks(requests: &[NetworkRequest]) -> ProcessorNetworks {
    ProcessorNetworks::load(
        requests.iter().copied(),
        NetworkPool::global(),
        &hub(),
        DType::F32,
        &Device::Cpu,
        &mut |_| {},
    )
    .expect("the tiny networks load")
}

fn goldens() -> HashMap<String, Tensor> {
    golden("processors/goldens.safetensors")
}

/// A stored uint8 `[H, W, 3]` image as `[1, 3, H, W]` f32 in [0, 1].
fn unit_image(t: &Tensor) -> Tensor {
    t.permute((2, 0, 1))
        .unwrap()
        .unsqueeze(0)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .affine(1.0 / 255.0, 0.0)
        .unwrap()
}

fn params(v: Value) -> Map<String, Value> {
    v.as_object().cloned().unwrap_or_default()
}

fn run(name: &str, p: Value, image: &Tensor, networks: Option<&ProcessorNetworks>) -> Tensor {
    let inputs = ProcessorInputs {
        networks,
        ..Default::default()
    };
    preprocess::apply(name, &params(p), image, &inputs).unwrap_or_else(|e| panic!("{name}: {e}"))
}

#[test]
fn real_esrgan_matches_spandrel_and_doubles_the_size() {
    let g = goldens();
    let nets = networks(&[NetworkRequest::REAL_ESRGAN_X2]);
    let Network::RealEsrgan(net) = nets.get(NetworkRequest::REAL_ESRGAN_X2).unwrap() else {
        panic!("wrong network kind");
    };
    // The fixture is a ×2 net with 4 features and one block, growth 32 (spandrel's).
    let c = net.config();
    assert_eq!(
        (c.scale, c.num_feat, c.num_block, c.num_grow_ch),
        (2, 4, 1, 32)
    );
    for k in 0..2 {
        let x = &g[&format!("realesrgan_in_{k}")];
        let want = &g[&format!("realesrgan_out_{k}")];
        let got = run("realesrgan_trt", json!({}), x, Some(&nets));
        let (_, _, h, w) = x.dims4().unwrap();
        assert_eq!(got.dims(), &[1, 3, 2 * h, 2 * w]);
        let (max, mean) = abs_err(&got, want);
        println!("realesrgan {h}x{w}: max {max:.3e} mean {mean:.3e}");
        assert!(max < 2e-5, "realesrgan case {k}: max abs {max}");
    }
}

/// Checks `got` against `want` (both `[1, C, H, W]` in [0, 1]): at most `max_levels` 8-bit
/// levels apart anywhere, a mean under `mean_levels`, and at most `share` of the values more
/// than half a level apart.
fn check_levels(
    what: &str,
    got: &Tensor,
    want: &Tensor,
    max_levels: f32,
    mean_levels: f32,
    share: f32,
) {
    assert_eq!(got.dims(), want.dims(), "{what}: shape");
    let (max, mean) = abs_err(got, want);
    let off = share_off(got, want, 0.5);
    println!(
        "{what}: max {:.3} levels, mean {:.2e} levels, {:.3}% off by more than half a level",
        max * 255.0,
        mean * 255.0,
        off * 100.0
    );
    assert!(
        max * 255.0 <= max_levels + 1e-3,
        "{what}: max {} levels",
        max * 255.0
    );
    assert!(
        mean * 255.0 <= mean_levels,
        "{what}: mean {} levels",
        mean * 255.0
    );
    assert!(
        off <= share,
        "{what}: {off} of the values off by more than half a level"
    );
}

#[test]
fn hed_matches_controlnet_aux() {
    let g = goldens();
    let nets = networks(&[NetworkRequest::HED]);
    for name in ["sq", "wide"] {
        let x = unit_image(&g[&format!("input_{name}")]);
        let want = unit_image(&g[&format!("hed_{name}")]);
        let got = run("hed", json!({"safe": true}), &x, Some(&nets));
        // Every step but numpy's float32 mean is exact; that mean's rounding may move an
        // edge across a level boundary now and then.
        check_levels(&format!("hed {name}"), &got, &want, 1.0, 0.01, 0.002);
    }
}

#[test]
fn lineart_matches_controlnet_aux_coarse_and_fine() {
    let g = goldens();
    let nets = networks(&[NetworkRequest::LINEART_COARSE, NetworkRequest::LINEART_FINE]);
    for (kind, detect, name) in [
        ("coarse", 512, "sq"),
        ("coarse", 128, "wide"),
        ("fine", 128, "sq"),
        ("fine", 512, "wide"),
    ] {
        let x = unit_image(&g[&format!("input_{name}")]);
        let want = &g[&format!("lineart_{kind}_{detect}_{name}")];
        let p = json!({"coarse": kind == "coarse", "detect_resolution": detect});
        let got = run("lineart", p, &x, Some(&nets));
        // The generator's f32 sums (convolutions, instance norms) are ordered differently from
        // torch's, so a line level truncated to 8 bits can land one level over.
        check_levels(
            &format!("lineart {kind} {detect} {name}"),
            &got,
            want,
            1.0,
            0.02,
            0.01,
        );
    }
}

/// The anime generator alone, then the whole `anime_style` path, against controlnet_aux's
/// `LineartAnimeDetector` (tests/reference/make_lineart_anime_fixtures.py).
#[test]
fn lineart_anime_matches_controlnet_aux() {
    let g = golden("processors/lineart_anime.safetensors");
    let nets = networks(&[NetworkRequest::LINEART_ANIME]);
    let Network::LineartAnime(net) = nets.get(NetworkRequest::LINEART_ANIME).unwrap() else {
        panic!("wrong network kind");
    };
    // The fixture is Anime2Sketch's eight levels, narrowed, saved under `module.` names.
    assert_eq!(net.size_multiple(), 256);

    let levels = &g["net_in_levels"];
    let x = ((levels.to_dtype(DType::F32).unwrap() / 127.5).unwrap() - 1.0)
        .unwrap()
        .permute((2, 0, 1))
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let got = net.forward(&x).unwrap();
    let (max, mean) = abs_err(&got, &g["net_out"]);
    println!("anime generator: max {max:.3e} mean {mean:.3e}");
    assert_eq!(got.dims(), &[1, 1, 256, 256]);
    assert!(max < 2e-5, "anime generator: max abs {max}");
    let err = net
        .forward(&x.narrow(3, 0, 128).unwrap())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("multiples of 256") && err.contains("256×128"),
        "{err}"
    );

    for (detect, name) in [(512, "sq"), (128, "wide"), (320, "sq")] {
        let x = unit_image(&g[&format!("input_{name}")]);
        let key = format!("lineart_anime_{detect}_{name}");
        let p = json!({"anime_style": true, "detect_resolution": detect});
        let got = run("lineart", p, &x, Some(&nets));
        // As the other lineart: a level truncated to 8 bits can land one over.
        match g.get(&format!("{key}_no_ipp")) {
            None => check_levels(
                &format!("lineart anime {detect} {name}"),
                &got,
                &g[&key],
                1.0,
                0.01,
                0.002,
            ),
            Some(no_ipp) => {
                // At 320 the detector's cubic resizes are no copies, and the reference's
                // OpenCV hands them to its bundled IPP, whose weights differ from OpenCV's own
                // cubic (sdstream's) by a level on 3.2 % of the values; sdstream equals the
                // reference run with IPP switched off.
                check_levels(
                    &format!("lineart anime {detect} {name} (IPP)"),
                    &got,
                    &g[&key],
                    1.0,
                    0.05,
                    0.04,
                );
                check_levels(
                    &format!("lineart anime {detect} {name} (no IPP)"),
                    &got,
                    no_ipp,
                    1.0,
                    0.01,
                    0.002,
                );
            }
        }
    }
    assert!(
        g.contains_key("lineart_anime_320_sq_no_ipp"),
        "the fixture's IPP case is gone"
    );
}

#[test]
fn depth_matches_daydreams_depth_anything_path() {
    let g = goldens();
    let nets = networks(&[NetworkRequest::DEPTH_ANYTHING_V2_SMALL]);
    for (detect, name) in [(518, "sq"), (518, "wide"), (140, "sq")] {
        let x = unit_image(&g[&format!("input_{name}")]);
        let want = &g[&format!("depth_{detect}_{name}")];
        let got = run(
            "depth_tensorrt",
            json!({"detect_resolution": detect, "engine_path": "ignored.engine"}),
            &x,
            Some(&nets),
        );
        let (max, mean) = abs_err(&got, want);
        println!("depth {detect} {name}: max {max:.3e} mean {mean:.3e}");
        assert!(max < 2e-4, "depth {detect} {name}: max {max}");
        // `depth` naming Depth Anything runs the same network the same way.
        let same = run(
            "depth",
            json!({"detect_resolution": detect,
                "model_name": "depth-anything/Depth-Anything-V2-Small-hf"}),
            &x,
            Some(&nets),
        );
        assert_eq!(abs_err(&same, &got).0, 0.0);
    }
    let err = preprocess::validate(
        "depth",
        &params(json!({"model_name": "Intel/dpt-hybrid-midas"})),
        "controlnets[0].preprocessor",
    )
    .expect_err("another depth model is refused")
    .to_string();
    assert!(
        err.contains("Intel/dpt-hybrid-midas")
            && err.contains("Intel/dpt-large")
            && err.contains("model_name"),
        "{err}"
    );
    let err = preprocess::validate(
        "depth_tensorrt",
        &params(json!({"detect_resolution": 512})),
        "controlnets[0].preprocessor",
    )
    .expect_err("not a multiple of 14")
    .to_string();
    assert!(err.contains("multiple of 14"), "{err}");
}

/// `depth` with its default `Intel/dpt-large` (tests/reference/make_dpt_fixtures.py): the
/// image processor, the network alone (at the trained grid and a resized one), and the whole
/// processor as Daydream's wrapper runs transformers' pipeline.
#[test]
fn depth_matches_daydreams_dpt_pipeline() {
    use sdstream::preprocess::depth::{DepthModel, DepthParams};

    let g = golden("processors/dpt.safetensors");
    let nets = networks(&[NetworkRequest::DPT_LARGE]);
    let Network::Dpt(dpt) = nets.get(NetworkRequest::DPT_LARGE).unwrap() else {
        panic!("wrong network kind");
    };
    // The processor: PIL's bilinear resize (this file's `resample` 2) bit for bit, then the
    // rescale and normalisation.
    let levels = &g["pixel_levels"];
    let inputs = goldens();
    let sq = inputs["input_sq"]
        .flatten_all()
        .unwrap()
        .to_vec1::<u8>()
        .unwrap();
    let pixels = dpt
        .processor
        .pixel_values(&sq, 64, 64, &Device::Cpu)
        .unwrap();
    // Stored uint8 `[H, W, 3]` levels as `[1, 3, H, W]` in [−1, 1]: `level / 127.5 − 1`.
    let signed = |levels: &Tensor| ((unit_image(levels) * 2.0).unwrap() - 1.0).unwrap();
    let want = signed(levels);
    assert_eq!(pixels.dims(), &[1, 3, 384, 384]);
    let (max, _) = abs_err(&pixels, &want);
    assert!(max < 1e-6, "pixel values: max {max}");

    for (k, input) in [(0, levels), (1, &g["net_in_levels_1"])] {
        let got = dpt.net.forward(&signed(input)).unwrap();
        let want = &g[&format!("net_out_{k}")];
        let scale = max_magnitude(want);
        let (max, mean) = abs_err(&got, want);
        println!("DPT network {k}: max {max:.3e} mean {mean:.3e} of depths up to {scale:.1}");
        assert!(max <= 2e-5 * scale, "DPT network {k}: max {max}");
    }

    for (detect, name) in [(512, "sq"), (512, "wide"), (320, "sq")] {
        let p = params(json!({"detect_resolution": detect}));
        let parsed = preprocess::Processor::parse("depth", &p, "f", "p").unwrap();
        assert_eq!(
            parsed.networks(),
            vec![NetworkRequest::DPT_LARGE],
            "Intel/dpt-large is depth's default"
        );
        let x = unit_image(&inputs[&format!("input_{name}")]);
        let got = run(
            "depth",
            json!({"detect_resolution": detect}),
            &x,
            Some(&nets),
        );
        // Two 8-bit steps (the squashed frame, rounded; the depth, truncated) turn float
        // differences of the last bits into whole levels near their boundaries.
        check_levels(
            &format!("DPT depth {detect} {name}"),
            &got,
            &g[&format!("depth_{detect}_{name}")],
            1.01,
            0.06,
            0.01,
        );
    }
    let _ = DepthParams {
        detect_resolution: 512,
        model: DepthModel::Dpt,
    };
}

/// The tiny hand and face networks, loaded through the PyTorch reader (the hand's file in
/// torch's legacy format), against controlnet_aux's modules
/// (tests/reference/make_hand_face_fixtures.py).
#[test]
fn openpose_hand_and_face_networks_match_controlnet_aux() {
    let g = golden("processors/hand_face.safetensors");
    let nets = networks(&[NetworkRequest::HAND_POSE, NetworkRequest::FACE_POSE]);
    for (request, name, channels) in [
        (NetworkRequest::HAND_POSE, "hand", 22),
        (NetworkRequest::FACE_POSE, "face", 71),
    ] {
        let Network::Keypoints(net) = nets.get(request).unwrap() else {
            panic!("wrong network kind");
        };
        assert_eq!(net.config().heatmap_channels, channels);
        assert_eq!(net.config().refinement_stages, 5);
        let levels = g[&format!("{name}_in_levels")]
            .to_dtype(DType::F32)
            .unwrap();
        let got = net
            .forward(&((levels / 256.0).unwrap() - 0.5).unwrap())
            .unwrap();
        let want = &g[&format!("{name}_out")];
        let scale = max_magnitude(want);
        let (max, mean) = abs_err(&got, want);
        println!("{name} network: max {max:.3e} mean {mean:.3e} of outputs up to {scale:.3}");
        assert_eq!(got.dims(), want.dims());
        // The face's 7×7 convolutions read 77 channels: f32 sums in another order.
        assert!(max <= 1e-5 * scale.max(1.0), "{name}: max abs {max}");
    }
}

/// OpenCV's 8-bit `GaussianBlur(σ = 0.8)`, which the hand detector starts with, bit for bit.
#[test]
fn hand_blur_matches_opencv() {
    use sdstream::preprocess::annotator::Rgb8;
    use sdstream::preprocess::hand_face::gaussian_blur_08;

    let g = golden("processors/hand_face.safetensors");
    for k in 0..3 {
        let levels = &g[&format!("blur_in_{k}")];
        let (height, width, _) = levels.dims3().unwrap();
        let image = Rgb8 {
            height,
            width,
            data: levels.flatten_all().unwrap().to_vec1::<u8>().unwrap(),
        };
        let want = g[&format!("blur_out_{k}")]
            .flatten_all()
            .unwrap()
            .to_vec1::<u8>()
            .unwrap();
        assert_eq!(gaussian_blur_08(&image).data, want, "{height}x{width}");
    }
}

/// The whole hands-and-face path (boxes from the body, the blur, the four hand sizes, the face
/// crop, peaks, normalisation and drawing) with the body network's maps given and the tiny hand
/// and face networks, against controlnet_aux's `OpenposeDetector(hand_and_face=True)`.
#[test]
fn openpose_finds_and_draws_hands_and_faces_as_controlnet_aux_does() {
    use sdstream::preprocess::{hand_face, pose};

    let g = goldens();
    let nets = networks(&[NetworkRequest::HAND_POSE, NetworkRequest::FACE_POSE]);
    let (Network::Keypoints(hand), Network::Keypoints(face)) = (
        nets.get(NetworkRequest::HAND_POSE).unwrap(),
        nets.get(NetworkRequest::FACE_POSE).unwrap(),
    ) else {
        panic!("wrong network kinds");
    };
    let image = pose_frame();
    let body_maps = |_: &Tensor| Ok((g["pose_maps_pafs"].clone(), g["pose_maps_heatmaps"].clone()));
    let hand_net = |x: &Tensor| hand.forward(x);
    let face_net = |x: &Tensor| face.forward(x);

    // The keypoints, exactly (float32 values over the image's size).
    let people = pose::find_people(&image, &Device::Cpu, body_maps).unwrap();
    let want: Value = serde_json::from_str(
        &std::fs::read_to_string(fixture("processors/hand_face_people.json")).unwrap(),
    )
    .unwrap();
    let want = want.as_array().unwrap();
    assert_eq!(people.len(), want.len());
    let points = |v: &Value| -> Option<Vec<[f32; 2]>> {
        v.as_array().map(|list| {
            list.iter()
                .map(|p| [p[0].as_f64().unwrap() as f32, p[1].as_f64().unwrap() as f32])
                .collect()
        })
    };
    let mut compared = 0;
    for (n, (person, w)) in people.iter().zip(want).enumerate() {
        let found = hand_face::detect(person, &image, &Device::Cpu, &hand_net, &face_net).unwrap();
        for (what, got, want) in [
            ("left hand", &found.left_hand, points(&w["left_hand"])),
            ("right hand", &found.right_hand, points(&w["right_hand"])),
            ("face", &found.face, points(&w["face"])),
        ] {
            assert_eq!(got, &want, "person {n} {what}");
            compared += want.map_or(0, |p| p.len());
        }
    }
    println!("hands and faces: {compared} keypoints identical");
    assert!(
        compared >= 2 * (21 + 21 + 30),
        "the scene has two people with hands and faces"
    );

    let extras = pose::HandFaceNetworks {
        hand: &hand_net,
        face: &face_net,
    };
    let canvas = pose::skeleton(&image, &Device::Cpu, body_maps, Some(&extras)).unwrap();
    let want = image::open(fixture("processors/hand_face_canvas.png"))
        .unwrap()
        .to_rgb8();
    let body_only = image::open(fixture("processors/pose_maps_canvas.png"))
        .unwrap()
        .to_rgb8();
    let differing = differing_pixels(&canvas.data, want.as_raw());
    let added = differing_pixels(want.as_raw(), body_only.as_raw());
    println!("hands and faces: {added} pixels beyond the body, {differing} differ");
    assert!(added > 2_000, "the golden draws hands and faces");
    assert_eq!(
        differing, 0,
        "pixels differing from controlnet_aux's canvas"
    );
}

/// examples/frames/001.png (512²), the frame the pose goldens drew on.
fn pose_frame() -> sdstream::preprocess::annotator::Rgb8 {
    let frame = image::open(fixture("../../examples/frames/001.png"))
        .unwrap()
        .to_rgb8();
    sdstream::preprocess::annotator::Rgb8 {
        height: 512,
        width: 512,
        data: frame.into_raw(),
    }
}

/// How many RGB pixels of two same-sized canvases differ.
fn differing_pixels(a: &[u8], b: &[u8]) -> usize {
    assert_eq!(a.len(), b.len(), "canvas sizes");
    a.chunks_exact(3)
        .zip(b.chunks_exact(3))
        .filter(|(p, q)| p != q)
        .count()
}

#[test]
fn openpose_draws_what_controlnet_aux_draws_from_the_same_maps() {
    use sdstream::preprocess::pose;

    let g = goldens();
    let image = pose_frame();
    let want_input = g["pose_maps_input"].to_vec3::<u8>().unwrap();
    let mut seen_input = false;
    let canvas = pose::skeleton(
        &image,
        &Device::Cpu,
        |input| {
            // The prepared input: BGR levels / 256 − 0.5 at 184 × 184.
            assert_eq!(input.dims(), &[1, 3, 184, 184]);
            let planes = input.squeeze(0).unwrap().to_vec3::<f32>().unwrap();
            for (y, row) in want_input.iter().enumerate() {
                for (x, px) in row.iter().enumerate() {
                    for c in 0..3 {
                        let level = ((planes[c][y][x] + 0.5) * 256.0).round() as u8;
                        assert_eq!(level, px[c], "network input at ({x}, {y}), channel {c}");
                    }
                }
            }
            seen_input = true;
            Ok((g["pose_maps_pafs"].clone(), g["pose_maps_heatmaps"].clone()))
        },
        None,
    )
    .unwrap();
    assert!(seen_input);
    let want = image::open(fixture("processors/pose_maps_canvas.png"))
        .unwrap()
        .to_rgb8();
    let differing = differing_pixels(&canvas.data, want.as_raw());
    let drawn = want
        .as_raw()
        .chunks_exact(3)
        .filter(|p| p.iter().any(|&v| v > 0))
        .count();
    println!("pose from maps: {drawn} drawn pixels, {differing} differ");
    assert!(drawn > 5_000, "the golden has two skeletons");
    assert_eq!(
        differing, 0,
        "pixels differing from controlnet_aux's canvas"
    );
}

#[test]
fn openpose_and_pose_tensorrt_match_controlnet_aux_with_the_tiny_network() {
    let g = goldens();
    let nets = networks(&[NetworkRequest::BODY_POSE]);
    for name in ["sq", "wide"] {
        let x = unit_image(&g[&format!("input_{name}")]);
        let want = &g[&format!("pose_{name}")];
        let got = run("openpose", json!({}), &x, Some(&nets));
        check_levels(&format!("openpose {name}"), &got, want, 0.51, 1e-3, 0.0);
        let same = run(
            "pose_tensorrt",
            json!({"confidence_threshold": 0.5, "engine_path": "x"}),
            &x,
            Some(&nets),
        );
        assert_eq!(abs_err(&same, &got).0, 0.0);
    }
    // Either switch loads both networks (Daydream passes `hand_and_face`); `pose_tensorrt`
    // has neither.
    for (name, p, want) in [
        ("openpose", json!({}), vec![NetworkRequest::BODY_POSE]),
        (
            "openpose",
            json!({"include_hands": true}),
            vec![
                NetworkRequest::BODY_POSE,
                NetworkRequest::HAND_POSE,
                NetworkRequest::FACE_POSE,
            ],
        ),
        (
            "openpose",
            json!({"include_face": true, "include_hands": false}),
            vec![
                NetworkRequest::BODY_POSE,
                NetworkRequest::HAND_POSE,
                NetworkRequest::FACE_POSE,
            ],
        ),
        ("pose_tensorrt", json!({}), vec![NetworkRequest::BODY_POSE]),
    ] {
        let processor = preprocess::Processor::parse(name, &params(p), "f", "p").unwrap();
        assert_eq!(processor.networks(), want, "{name}");
    }
    // The whole processor with hands and faces: the tiny random body network finds about 50
    // "people" in these frames, and faces for about half of them (no hand boxes).
    let all = networks(&[
        NetworkRequest::BODY_POSE,
        NetworkRequest::HAND_POSE,
        NetworkRequest::FACE_POSE,
    ]);
    let hands = golden("processors/hand_face.safetensors");
    for name in ["sq", "wide"] {
        let x = unit_image(&g[&format!("input_{name}")]);
        let body = run("openpose", json!({}), &x, Some(&all));
        let with = run("openpose", json!({"include_hands": true}), &x, Some(&all));
        let want = &hands[&format!("pose_hands_{name}")];
        check_levels(
            &format!("openpose with hands {name}"),
            &with,
            want,
            0.51,
            1e-3,
            0.0,
        );
        assert!(abs_err(&with, &body).0 > 0.0, "{name}: faces drawn");
    }
    let err = preprocess::apply(
        "openpose",
        &params(json!({"include_face": true})),
        &unit_image(&g["input_sq"]),
        &ProcessorInputs {
            networks: Some(&nets),
            ..Default::default()
        },
    )
    .expect_err("the hand and face networks were not loaded")
    .to_string();
    assert!(err.contains("hand_pose_model"), "{err}");
}

#[test]
fn temporal_net_matches_daydreams_flow_image() {
    let g = goldens();
    let nets = networks(&[NetworkRequest::RAFT_SMALL]);
    for name in ["sq", "wide"] {
        let x = unit_image(&g[&format!("input_{name}")]);
        let previous = unit_image(&g[&format!("temporal_prev_{name}")]);
        for (format, channels) in [("concat", 6), ("warped_only", 3)] {
            let p = params(json!({"height": 256, "width": 256, "output_format": format}));
            let processor =
                preprocess::Processor::parse("temporal_net_tensorrt", &p, "preprocessor", "params")
                    .unwrap();
            assert_eq!(processor.output_channels(), channels);
            let inputs = ProcessorInputs {
                previous_input: Some(&previous),
                networks: Some(&nets),
                ..Default::default()
            };
            let got = processor.run(&x, &inputs).unwrap();
            let key = if format == "concat" { "concat" } else { "flow" };
            let want = &g[&format!("temporal_{key}_{name}")];
            // RAFT's f32 sums differ from torch's in the last bits, which can move a flow colour
            // across an 8-bit boundary (a level there is a quarter level once the 256² flow
            // image is shrunk to the frame).
            check_levels(
                &format!("temporal {format} {name}"),
                &got,
                want,
                0.5,
                0.01,
                0.0,
            );
            // The first frame: the frame and black, or black.
            let first = processor
                .run(
                    &x,
                    &ProcessorInputs {
                        networks: Some(&nets),
                        ..Default::default()
                    },
                )
                .unwrap();
            assert_eq!(first.dim(1).unwrap(), channels);
            let black = first.narrow(1, channels - 3, 3).unwrap();
            assert_eq!(
                black
                    .abs()
                    .unwrap()
                    .max_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap(),
                0.0
            );
        }
    }
}

/// The processor (its tensor steps, which the CPU runs, and a GPU by default) and the host's
/// steps (a GPU's with `SDSTREAM_CUDA_PREPROCESS=0`: download, host, upload) against the torch
/// rendering, held to the same bounds.
#[test]
fn standard_lineart_matches_daydreams_arithmetic() {
    use sdstream::preprocess::annotator::to_stream_size;
    use sdstream::preprocess::planes::Planes;
    use sdstream::preprocess::standard_lineart::{StandardLineartParams, apply};
    let g = goldens();
    let mut checked = 0;
    for name in ["sq", "wide"] {
        let x = unit_image(&g[&format!("input_{name}")]);
        let (_, _, h, w) = x.dims4().unwrap();
        for (case, p, settings) in [
            (
                "default",
                json!({}),
                StandardLineartParams {
                    detect_resolution: 512,
                    gaussian_sigma: 6.0,
                    intensity_threshold: 8.0,
                },
            ),
            (
                "small",
                json!({"detect_resolution": 48, "gaussian_sigma": 2.5, "intensity_threshold": 20}),
                StandardLineartParams {
                    detect_resolution: 48,
                    gaussian_sigma: 2.5,
                    intensity_threshold: 20.0,
                },
            ),
        ] {
            let want = &g[&format!("std_lineart_{case}_{name}")];
            let processor = run("standard_lineart", p, &x, None);
            let host = apply(&Planes::from_tensor(&x).unwrap(), settings)
                .into_tensor(&Device::Cpu)
                .unwrap();
            let host = to_stream_size(&host, h, w).unwrap();
            for (path, got) in [("tensor steps", &processor), ("host steps", &host)] {
                let (max, mean) = abs_err(got, want);
                let off = share_off(got, want, 0.5);
                println!(
                    "standard_lineart {case} {name} ({path}): max {max:.3e} mean {mean:.3e} \
                     off {off:.2e}"
                );
                // 8-bit maps resized with bilinear weights: a level truncated the other way
                // moves a value by at most 1/255; the float sums' order decides only rare ties.
                assert!(max <= 1.0 / 255.0 + 1e-5, "{case} {name} {path}: max {max}");
                assert!(
                    off < 0.01,
                    "{case} {name} {path}: {off} of the values off by more than half a level"
                );
                assert!(mean < 1e-3, "{case} {name} {path}: mean {mean}");
                checked += 1;
            }
        }
    }
    assert_eq!(checked, 8);
}

#[test]
fn pytorch_checkpoints_load_like_safetensors_and_bad_ones_are_named() {
    // The .pth fixture and the same tensors rewritten as safetensors build the same network.
    let pth = fixture("model-root/lllyasviel/Annotators/sk_model2.pth");
    let from_pth =
        Network::load(NetworkKind::Lineart, &pth, DType::F32, &Device::Cpu).expect("pth loads");
    let dir = scratch_dir("pth");
    let tensors = candle_core::pickle::read_all(&pth).unwrap();
    let map: HashMap<String, Tensor> = tensors.into_iter().collect();
    let st = dir.join("sk_model2.safetensors");
    candle_core::safetensors::save(&map, &st).unwrap();
    let from_st =
        Network::load(NetworkKind::Lineart, &st, DType::F32, &Device::Cpu).expect("st loads");
    let x = Tensor::rand(0f32, 1.0, (1, 3, 32, 32), &Device::Cpu).unwrap();
    let (Network::Lineart(a), Network::Lineart(b)) = (&from_pth, &from_st) else {
        panic!("wrong kinds");
    };
    assert_eq!(
        abs_err(&a.forward(&x).unwrap(), &b.forward(&x).unwrap()).0,
        0.0
    );

    // A truncated archive, garbage and a checkpoint of another network each fail naming the file.
    let bytes = std::fs::read(&pth).unwrap();
    let cut = dir.join("cut.pth");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let garbage = dir.join("garbage.pth");
    std::fs::write(&garbage, b"not a zip archive at all").unwrap();
    for (path, what) in [(&cut, "cut.pth"), (&garbage, "garbage.pth")] {
        let err = Network::load(NetworkKind::Lineart, path, DType::F32, &Device::Cpu)
            .expect_err("refused")
            .to_string();
        assert!(err.contains(what) && err.contains("PyTorch"), "{err}");
    }
    let hed = fixture("model-root/lllyasviel/Annotators/ControlNetHED.pth");
    let err = Network::load(NetworkKind::Lineart, &hed, DType::F32, &Device::Cpu)
        .expect_err("a HED checkpoint is not a lineart generator")
        .to_string();
    assert!(
        err.contains("ControlNetHED.pth") && err.contains("model0.1.weight"),
        "{err}"
    );
    // A tensor with a NaN is refused naming it.
    let mut poisoned = map.clone();
    let name = "model1.0.weight";
    let w = &poisoned[name];
    let mut values = w.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    values[3] = f32::NAN;
    poisoned.insert(
        name.into(),
        Tensor::from_vec(values, w.dims(), &Device::Cpu).unwrap(),
    );
    let bad = dir.join("nan.safetensors");
    candle_core::safetensors::save(&poisoned, &bad).unwrap();
    let err = Network::load(NetworkKind::Lineart, &bad, DType::F32, &Device::Cpu)
        .expect_err("NaN refused")
        .to_string();
    assert!(err.contains(name) && err.contains("non-finite"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn the_pool_loads_each_network_once_and_frees_it_with_its_last_holder() {
    let pool = NetworkPool::default();
    let get = |pool: &NetworkPool| {
        ProcessorNetworks::load(
            [NetworkRequest::LINEART_FINE, NetworkRequest::LINEART_FINE],
            pool,
            &hub(),
            DType::F32,
            &Device::Cpu,
            &mut |_| {},
        )
        .unwrap()
    };
    let first = get(&pool);
    let second = get(&pool);
    assert_eq!(
        pool.loads(),
        1,
        "a request listed twice and asked twice loads once"
    );
    assert!(ProcessorNetworks::ready(
        [NetworkRequest::LINEART_FINE],
        &pool,
        &hub(),
        DType::F32,
        &Device::Cpu
    ));
    assert!(!ProcessorNetworks::ready(
        [NetworkRequest::LINEART_COARSE],
        &pool,
        &hub(),
        DType::F32,
        &Device::Cpu
    ));
    drop((first, second));
    assert!(
        !ProcessorNetworks::ready(
            [NetworkRequest::LINEART_FINE],
            &pool,
            &hub(),
            DType::F32,
            &Device::Cpu
        ),
        "freed with its last holder"
    );
    get(&pool);
    assert_eq!(pool.loads(), 2);
    // Missing weights: the error names the repository and where it looked.
    let empty = HubOptions {
        model_root: Some(scratch_dir("no-weights")),
        ..hub()
    };
    let err = ProcessorNetworks::load(
        [NetworkRequest::HED],
        &pool,
        &empty,
        DType::F32,
        &Device::Cpu,
        &mut |_| {},
    )
    .expect_err("no weights")
    .to_string();
    assert!(
        err.contains("lllyasviel/Annotators") && err.contains("ControlNetHED"),
        "{err}"
    );
}

#[test]
fn processors_name_what_they_cannot_do() {
    let x = Tensor::zeros((1, 3, 16, 16), DType::F32, &Device::Cpu).unwrap();
    // A model-based processor without its network says so.
    let err = preprocess::apply(
        "realesrgan_trt",
        &Map::new(),
        &x,
        &ProcessorInputs::default(),
    )
    .expect_err("no network")
    .to_string();
    assert!(
        err.contains("Real-ESRGAN") && err.contains("not loaded"),
        "{err}"
    );
    // MediaPipe's processors are refused with what to use instead.
    let err = preprocess::validate("mediapipe_pose", &Map::new(), "controlnets[0].preprocessor")
        .expect_err("refused")
        .to_string();
    assert!(
        err.contains("controlnets[0].preprocessor") && err.contains("openpose"),
        "{err}"
    );
    let err = preprocess::validate("mediapipe_segmentation", &Map::new(), "p")
        .expect_err("refused")
        .to_string();
    assert!(err.contains("external"), "{err}");
    // An upscaler is no ControlNet preprocessor.
    let err = preprocess::validate("realesrgan_trt", &Map::new(), "controlnets[1].preprocessor")
        .expect_err("refused")
        .to_string();
    assert!(err.contains("image_postprocessing"), "{err}");
    // Params are checked.
    let err = preprocess::validate(
        "standard_lineart",
        &params(json!({"gaussian_sigma": 50})),
        "controlnets[0].preprocessor",
    )
    .expect_err("out of range")
    .to_string();
    assert!(
        err.contains("controlnets[0].preprocessor.params.gaussian_sigma"),
        "{err}"
    );
}
