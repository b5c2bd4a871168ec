//! The OpenPose body network and its keypoint decoding against controlnet_aux 0.0.10 and scipy
//! (goldens from tests/reference/make_openpose_fixtures.py, under tests/fixtures/openpose/).

use crate::common;

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use serde_json::Value;

use sdstream::model::openpose_body::{BodyPoseNet, Config};
use sdstream::preprocess::openpose::{
    Connection, PART_COUNT, Peak, Person, Stroke, assemble_people, body_strokes, connect_limbs,
    decode_people, find_peaks, gaussian_filter,
};

/// The narrow body network, where the model root tests/fixtures/model-root finds it under
/// body_pose_model's name.
const TINY_BODY: &str = "model-root/lllyasviel/Annotators/body_pose_model.safetensors";

fn fixture(rel: &str) -> PathBuf {
    common::fixture(&format!("openpose/{rel}"))
}

fn tensors(rel: &str) -> HashMap<String, Tensor> {
    let path = fixture(rel);
    candle_core::safetensors::load(&path, &Device::Cpu)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

fn json(rel: &str) -> Value {
    let path = fixture(rel);
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn f64s(t: &Tensor) -> Vec<f64> {
    t.flatten_all()
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// Tensor name → shape, as `Config::from_tensor_shapes` reads them.
type Shapes = HashMap<String, Vec<usize>>;

fn shapes_of(map: &HashMap<String, Tensor>) -> Shapes {
    map.iter()
        .map(|(k, v)| (k.clone(), v.dims().to_vec()))
        .collect()
}

// ------------------------------------------------------------------------------------------
// The network
// ------------------------------------------------------------------------------------------

/// The stand-in's widths, as the script builds it.
fn tiny_config() -> Config {
    Config {
        in_channels: 3,
        trunk_channels: [6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 11, 9],
        stage1_channels: 5,
        stage1_hidden_channels: 7,
        refinement_channels: 4,
        refinement_stages: 5,
        paf_channels: 38,
        heatmap_channels: 19,
        final_heatmap_relu: true,
    }
}

/// controlnet_aux's input: bytes / 256 − 0.5 in f32.
fn network_input(image: &Tensor) -> Tensor {
    image
        .to_dtype(DType::F32)
        .unwrap()
        .affine(1.0 / 256.0, -0.5)
        .unwrap()
}

/// (max abs error, mean abs error, max abs of the reference).
fn errors(got: &Tensor, want: &Tensor) -> (f64, f64, f64) {
    assert_eq!(got.dims(), want.dims());
    let (g, w) = (f64s(got), f64s(want));
    let max = g
        .iter()
        .zip(&w)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f64::max);
    let mean = g.iter().zip(&w).map(|(a, b)| (a - b).abs()).sum::<f64>() / g.len() as f64;
    let scale = w.iter().map(|v| v.abs()).fold(0.0, f64::max);
    (max, mean, scale)
}

#[test]
fn network_matches_controlnet_aux() {
    let weights = common::golden(TINY_BODY);
    let config = Config::from_tensor_shapes(&shapes_of(&weights)).expect("config");
    assert_eq!(config, tiny_config());
    let vb = VarBuilder::from_tensors(weights, DType::F32, &Device::Cpu);
    let net = BodyPoseNet::new(&config, vb).expect("network");
    let g = tensors("network_goldens.safetensors");
    for size in ["184x184", "99x141"] {
        let x = network_input(&g[&format!("{size}.image")]);
        let (pafs, heatmaps) = net.forward(&x).expect("forward");
        for (what, got, want) in [
            ("pafs", &pafs, &g[&format!("{size}.pafs")]),
            ("heatmaps", &heatmaps, &g[&format!("{size}.heatmaps")]),
        ] {
            let (max, mean, scale) = errors(got, want);
            println!(
                "{size} {what} {:?}: max {max:.3e} mean {mean:.3e} (scale {scale:.3})",
                got.dims()
            );
            assert!(
                max <= 1e-4 * scale,
                "{size} {what}: max abs error {max} > 1e-4 x {scale}"
            );
        }
        // A batch of two gives each image's maps.
        let batch = Tensor::cat(&[&x, &x.flip(&[3]).unwrap()], 0).unwrap();
        let (bp, bh) = net.forward(&batch).expect("batch forward");
        let (max_p, _, _) = errors(&bp.narrow(0, 0, 1).unwrap(), &pafs);
        let (max_h, _, _) = errors(&bh.narrow(0, 0, 1).unwrap(), &heatmaps);
        assert!(max_p < 1e-5 && max_h < 1e-5, "batch: {max_p} {max_h}");
    }
}

/// The final heatmaps keep controlnet_aux's ReLU: without it the outputs differ.
#[test]
fn final_heatmap_relu_matters() {
    let weights = common::golden(TINY_BODY);
    let config = Config {
        final_heatmap_relu: false,
        ..tiny_config()
    };
    let net = BodyPoseNet::new(
        &config,
        VarBuilder::from_tensors(weights, DType::F32, &Device::Cpu),
    )
    .unwrap();
    let g = tensors("network_goldens.safetensors");
    let (_, heatmaps) = net.forward(&network_input(&g["184x184.image"])).unwrap();
    let min = f64s(&heatmaps).into_iter().fold(f64::INFINITY, f64::min);
    assert!(min < -1e-3, "no negative heatmap without the ReLU ({min})");
}

#[test]
fn real_checkpoint_layout_gives_the_default_config() {
    let shapes: Shapes = serde_json::from_value(json("body_pose_model_shapes.json")).unwrap();
    assert_eq!(shapes.len(), 184);
    assert_eq!(
        Config::from_tensor_shapes(&shapes).unwrap(),
        Config::default()
    );
}

#[test]
fn misfitting_state_dicts_are_refused_by_name() {
    let shapes: Shapes = serde_json::from_value(json("body_pose_model_shapes.json")).unwrap();
    let refused = |edit: &dyn Fn(&mut Shapes), needle: &str| {
        let mut s = shapes.clone();
        edit(&mut s);
        let err = Config::from_tensor_shapes(&s)
            .expect_err(needle)
            .to_string();
        assert!(err.contains(needle), "{err:?} does not name {needle:?}");
    };
    refused(&|s| drop(s.remove("conv3_2.bias")), "`conv3_2.bias`");
    refused(
        &|s| drop(s.remove("conv4_4_CPM.weight")),
        "`conv4_4_CPM.weight`",
    );
    refused(
        &|s| drop(s.insert("Mconv3_stage4_L2.weight".into(), vec![128, 128, 5, 5])),
        "`Mconv3_stage4_L2.weight`",
    );
    // Branches of different widths do not fit the structure.
    refused(
        &|s| drop(s.insert("conv5_1_CPM_L2.weight".into(), vec![96, 128, 3, 3])),
        "`conv5_1_CPM_L2.weight`",
    );
    // A stage beyond a gap is not part of the network.
    refused(
        &|s| drop(s.insert("Mconv1_stage8_L1.weight".into(), vec![128, 185, 7, 7])),
        "`Mconv1_stage8_L1.weight`",
    );
    refused(
        &|s| drop(s.insert("model0.conv1_1.weight".into(), vec![64, 3, 3, 3])),
        "`model0.conv1_1.weight`",
    );
    refused(
        &|s| drop(s.insert("conv1_1.weight".into(), vec![64, 3, 3])),
        "`conv1_1.weight`",
    );
    // Fewer refinement stages load as such.
    let mut three = shapes.clone();
    three.retain(|k, _| !(k.contains("stage5") || k.contains("stage6")));
    let config = Config::from_tensor_shapes(&three).unwrap();
    assert_eq!(config.refinement_stages, 3);
}

// ------------------------------------------------------------------------------------------
// scipy's Gaussian filter
// ------------------------------------------------------------------------------------------

#[test]
fn gaussian_filter_matches_scipy() {
    let g = tensors("gaussian_goldens.safetensors");
    let mut names: Vec<&str> = g.keys().filter_map(|k| k.strip_suffix(".input")).collect();
    names.sort();
    assert_eq!(names.len(), 6);
    for name in names {
        let input = &g[&format!("{name}.input")];
        let (h, w) = input.dims2().unwrap();
        let sigma = f64s(&g[&format!("{name}.sigma")])[0];
        let got = gaussian_filter(&f64s(input), h, w, sigma);
        let want = f64s(&g[&format!("{name}.output")]);
        let max = got
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f64::max);
        let differing = got.iter().zip(&want).filter(|(a, b)| a != b).count();
        println!(
            "gaussian {name}: max abs error {max:.3e}, {differing} of {} values not bit-equal",
            got.len()
        );
        assert!(max <= 1e-12, "{name}: {max}");
    }
}

// ------------------------------------------------------------------------------------------
// Decoding
// ------------------------------------------------------------------------------------------

/// The script's `upsample8`: [C, h, w] → [C, 8h, 8w], linear along x then y, sampling at
/// (X + 0.5)/8 − 0.5 with clamped indices, `a[i0]·(1 − f) + a[i1]·f` in f64.
fn upsample8(maps: &[f64], channels: usize, h: usize, w: usize) -> Vec<f64> {
    fn taps(n: usize) -> Vec<(usize, usize, f64)> {
        (0..8 * n)
            .map(|x| {
                let src = (x as f64 * 2.0 - 7.0) / 16.0;
                let i0 = src.floor();
                let f = src - i0;
                let clamp = |i: f64| i.clamp(0.0, (n - 1) as f64) as usize;
                (clamp(i0), clamp(i0 + 1.0), f)
            })
            .collect()
    }
    let (tx, ty) = (taps(w), taps(h));
    let (big_h, big_w) = (8 * h, 8 * w);
    let mut rows = vec![0.0; channels * h * big_w];
    for c in 0..channels {
        for y in 0..h {
            let src = &maps[(c * h + y) * w..(c * h + y + 1) * w];
            for (x, &(i0, i1, f)) in tx.iter().enumerate() {
                rows[(c * h + y) * big_w + x] = src[i0] * (1.0 - f) + src[i1] * f;
            }
        }
    }
    let mut out = vec![0.0; channels * big_h * big_w];
    for c in 0..channels {
        for (y, &(i0, i1, f)) in ty.iter().enumerate() {
            for x in 0..big_w {
                let a = rows[(c * h + i0) * big_w + x];
                let b = rows[(c * h + i1) * big_w + x];
                out[(c * big_h + y) * big_w + x] = a * (1.0 - f) + b * f;
            }
        }
    }
    out
}

struct Case {
    name: String,
    height: usize,
    width: usize,
    heatmaps: Vec<f64>,
    pafs: Vec<f64>,
    golden: Value,
}

fn decode_cases() -> Vec<Case> {
    let maps = tensors("decode_maps.safetensors");
    let goldens = json("decode_goldens.json");
    let cases = goldens["cases"].as_array().expect("cases");
    assert_eq!(cases.len(), 3);
    cases
        .iter()
        .map(|c| {
            let name = c["name"].as_str().unwrap().to_string();
            let (height, width) = (
                c["height"].as_u64().unwrap() as usize,
                c["width"].as_u64().unwrap() as usize,
            );
            let full = |key: &str| {
                let t = &maps[&format!("{name}.{key}")];
                let (ch, h, w) = t.dims3().unwrap();
                assert_eq!((8 * h, 8 * w), (height, width));
                upsample8(&f64s(t), ch, h, w)
            };
            Case {
                heatmaps: full("heatmaps"),
                pafs: full("pafs"),
                name,
                height,
                width,
                golden: c.clone(),
            }
        })
        .collect()
}

fn num(v: &Value) -> f64 {
    v.as_f64().unwrap_or_else(|| panic!("not a number: {v}"))
}

fn close(what: &str, got: f64, want: f64) {
    assert!((got - want).abs() <= 1e-9, "{what}: {got} vs {want}");
}

#[test]
fn peaks_match_controlnet_aux() {
    for case in decode_cases() {
        let peaks = find_peaks(&case.heatmaps, case.height, case.width);
        let want = case.golden["peaks"].as_array().unwrap();
        assert_eq!(peaks.len(), want.len());
        let mut max_err: f64 = 0.0;
        for (part, (got, want)) in peaks.iter().zip(want).enumerate() {
            let want = want.as_array().unwrap();
            assert_eq!(
                got.len(),
                want.len(),
                "{} part {part}: {got:?} vs {want:?}",
                case.name
            );
            for (p, w) in got.iter().zip(want) {
                let w: Vec<f64> = w.as_array().unwrap().iter().map(num).collect();
                assert_eq!(
                    (p.x as f64, p.y as f64, p.id as f64),
                    (w[0], w[1], w[3]),
                    "{} part {part}",
                    case.name
                );
                close(&format!("{} part {part} score", case.name), p.score, w[2]);
                max_err = max_err.max((p.score - w[2]).abs());
            }
        }
        println!(
            "{}: {} peaks, score max abs error {max_err:.3e}",
            case.name,
            peaks.iter().map(Vec::len).sum::<usize>()
        );
    }
}

#[test]
fn connections_and_groups_match_controlnet_aux() {
    for case in decode_cases() {
        let peaks = find_peaks(&case.heatmaps, case.height, case.width);
        let connections = connect_limbs(&peaks, &case.pafs, case.height, case.width);
        let want = case.golden["connections"].as_array().unwrap();
        assert_eq!(connections.len(), want.len());
        for (k, (got, want)) in connections.iter().zip(want).enumerate() {
            let Some(got) = got else {
                assert!(
                    want.is_null(),
                    "{} limb {k}: no peaks here, some there",
                    case.name
                );
                continue;
            };
            let want = want
                .as_array()
                .unwrap_or_else(|| panic!("{} limb {k}", case.name));
            assert_eq!(
                got.len(),
                want.len(),
                "{} limb {k}: {got:?} vs {want:?}",
                case.name
            );
            for (c, w) in got.iter().zip(want) {
                let w: Vec<f64> = w.as_array().unwrap().iter().map(num).collect();
                let Connection {
                    id_a,
                    id_b,
                    score,
                    index_a,
                    index_b,
                } = *c;
                assert_eq!(
                    [id_a, id_b, index_a, index_b].map(|v| v as f64),
                    [w[0], w[1], w[3], w[4]],
                    "{} limb {k}",
                    case.name
                );
                close(&format!("{} limb {k} score", case.name), score, w[2]);
            }
        }
        let groups = assemble_people(&peaks, &connections);
        let want = case.golden["subset"].as_array().unwrap();
        assert_eq!(groups.len(), want.len(), "{}: {groups:?}", case.name);
        for (g, w) in groups.iter().zip(want) {
            let w: Vec<f64> = w.as_array().unwrap().iter().map(num).collect();
            let parts: Vec<f64> = g
                .parts
                .iter()
                .map(|p| p.map_or(-1.0, |id| id as f64))
                .collect();
            assert_eq!(parts, w[..PART_COUNT], "{}", case.name);
            close(&format!("{} total score", case.name), g.total_score, w[18]);
            assert_eq!(g.total_parts, w[19], "{}", case.name);
        }
    }
}

/// The people of a golden, on a `width`×`height` image (the pixel is the normalised position
/// scaled back and rounded).
fn people_from_json(value: &Value, width: usize, height: usize) -> Vec<Person> {
    value
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            let keypoints = p["keypoints"].as_array().unwrap();
            assert_eq!(keypoints.len(), PART_COUNT);
            Person {
                keypoints: std::array::from_fn(|i| {
                    let k = &keypoints[i];
                    (!k.is_null()).then(|| sdstream::preprocess::openpose::Keypoint {
                        x: num(&k["x"]),
                        y: num(&k["y"]),
                        score: num(&k["score"]),
                        id: k["id"].as_u64().unwrap() as usize,
                        pixel: [
                            (num(&k["x"]) * width as f64).round() as usize,
                            (num(&k["y"]) * height as f64).round() as usize,
                        ],
                    })
                }),
                total_score: num(&p["total_score"]),
                total_parts: num(&p["total_parts"]),
            }
        })
        .collect()
}

#[test]
fn people_match_controlnet_aux() {
    for case in decode_cases() {
        let people = decode_people(&case.heatmaps, &case.pafs, case.height, case.width);
        let want = people_from_json(&case.golden["people"], case.width, case.height);
        assert_eq!(people.len(), want.len(), "{}", case.name);
        let mut max_err: f64 = 0.0;
        for (n, (got, want)) in people.iter().zip(&want).enumerate() {
            let what = format!("{} person {n}", case.name);
            for (part, (g, w)) in got.keypoints.iter().zip(&want.keypoints).enumerate() {
                match (g, w) {
                    (None, None) => {}
                    (Some(g), Some(w)) => {
                        close(&format!("{what} part {part} x"), g.x, w.x);
                        close(&format!("{what} part {part} y"), g.y, w.y);
                        close(&format!("{what} part {part} score"), g.score, w.score);
                        assert_eq!(g.id, w.id, "{what} part {part}");
                        assert_eq!(g.pixel, w.pixel, "{what} part {part}");
                        max_err = max_err.max((g.x - w.x).abs()).max((g.y - w.y).abs());
                        max_err = max_err.max((g.score - w.score).abs());
                    }
                    _ => panic!("{what} part {part}: {g:?} vs {w:?}"),
                }
            }
            close(
                &format!("{what} total score"),
                got.total_score,
                want.total_score,
            );
            assert_eq!(got.total_parts, want.total_parts, "{what}");
            max_err = max_err.max((got.total_score - want.total_score).abs());
        }
        println!(
            "{}: {} people, max abs error {max_err:.3e}",
            case.name,
            people.len()
        );
    }
}

fn ints(v: &Value) -> Vec<i64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_i64().unwrap())
        .collect()
}

#[test]
fn strokes_match_draw_bodypose() {
    for case in decode_cases() {
        // From controlnet_aux's own people, so that the strokes are checked on their own.
        let people = people_from_json(&case.golden["people"], case.width, case.height);
        let strokes = body_strokes(&people, case.width, case.height);
        let want = case.golden["strokes"].as_array().unwrap();
        assert_eq!(strokes.len(), want.len(), "{}", case.name);
        for (n, (s, w)) in strokes.iter().zip(want).enumerate() {
            let expected = match w["kind"].as_str().unwrap() {
                "limb" => {
                    let (c, a, col) = (ints(&w["center"]), ints(&w["axes"]), ints(&w["color"]));
                    Stroke::Limb {
                        center: [c[0] as i32, c[1] as i32],
                        axes: [a[0] as i32, a[1] as i32],
                        angle: w["angle"].as_i64().unwrap() as i32,
                        color: [col[0] as u8, col[1] as u8, col[2] as u8],
                    }
                }
                _ => {
                    let (c, col) = (ints(&w["center"]), ints(&w["color"]));
                    Stroke::Joint {
                        center: [c[0] as i32, c[1] as i32],
                        radius: w["radius"].as_i64().unwrap() as i32,
                        color: [col[0] as u8, col[1] as u8, col[2] as u8],
                    }
                }
            };
            assert_eq!(*s, expected, "{} stroke {n}", case.name);
        }
        // And from the decoded people: the whole chain.
        let decoded = decode_people(&case.heatmaps, &case.pafs, case.height, case.width);
        assert_eq!(
            body_strokes(&decoded, case.width, case.height),
            strokes,
            "{}",
            case.name
        );
        println!("{}: {} strokes identical", case.name, strokes.len());
    }
}

#[test]
fn empty_maps_give_nobody() {
    let (h, w) = (16, 24);
    let people = decode_people(&vec![0.0; 19 * h * w], &vec![0.0; 38 * h * w], h, w);
    assert!(people.is_empty());
    assert!(body_strokes(&people, w, h).is_empty());
    let peaks: Vec<Vec<Peak>> = find_peaks(&vec![0.0; 19 * h * w], h, w);
    assert!(peaks.iter().all(Vec::is_empty));
}
