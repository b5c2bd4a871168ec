//! LoRA fused at load, against diffusers' `load_lora_weights` + `fuse_lora` on the tiny SD 1.5
//! checkpoint (tests/fixtures/tiny-sd15; LoRAs in tests/fixtures/lora; goldens written by
//! tests/reference/make_lora_fixtures.py): peft and kohya files, the LCM-LoRA rule, two LoRAs
//! at once; LoRA files that do not fit refused with the layer named; the pool keeping LoRA'd
//! networks apart; and streams through the Engine and StreamDiffusion.

use crate::common;

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use candle_core::{DType, Tensor};
use common::{abs_err, fixture, golden, scratch_dir, tiny_settings};
use sdstream::model::bundle::{ModelRequest, StableDiffusionModels};
use sdstream::model::pool::ModelPool;
use sdstream::model::unet::UNetInputs;
use sdstream::params::Prompt;
use sdstream::{
    Engine, EngineOptions, Error, Frame, PixelFormat, StreamDiffusion, StreamDiffusionParams,
    UpdateKind,
};

fn sd15() -> String {
    fixture("tiny-sd15").display().to_string()
}

fn lora(name: &str) -> String {
    fixture(&format!("lora/{name}")).display().to_string()
}

/// The request of a golden case: (LoRA folder name, weight) pairs as lora_dict, or the LCM-LoRA.
fn request(case: &str) -> ModelRequest {
    let loras = |pairs: &[(&str, f64)]| pairs.iter().map(|(n, w)| (lora(n), *w)).collect();
    match case {
        "base" => ModelRequest::from(sd15().as_str()),
        "lcm" => ModelRequest {
            model_id: sd15(),
            lcm_lora: Some(lora("lcm-kohya")),
            loras: Vec::new(),
        },
        "peft_a" => ModelRequest {
            model_id: sd15(),
            lcm_lora: None,
            loras: loras(&[("peft-a", 0.7)]),
        },
        "kohya_b" => ModelRequest {
            model_id: sd15(),
            lcm_lora: None,
            loras: loras(&[("kohya-b", 1.0)]),
        },
        "both" => ModelRequest {
            model_id: sd15(),
            lcm_lora: None,
            loras: loras(&[("peft-a", 0.7), ("kohya-b", 1.3)]),
        },
        other => panic!("no case {other}"),
    }
}

fn load(request: ModelRequest) -> sdstream::Result<StableDiffusionModels> {
    StableDiffusionModels::load(request, &tiny_settings("self"), &mut |_| {})
}

fn ids_u32(ids: &Tensor) -> Tensor {
    ids.to_dtype(DType::U32).unwrap()
}

/// (text embeddings, UNet output) of `models` on the golden's inputs; the UNet reads the
/// reference's embeddings of the same case, so the two are checked apart.
fn run(
    models: &StableDiffusionModels,
    g: &HashMap<String, Tensor>,
    case: &str,
) -> (Tensor, Tensor) {
    let embeds = models
        .text_encoder
        .forward(&ids_u32(&g["base.input_ids"]))
        .expect("text encoder");
    let out = models
        .unet
        .forward(UNetInputs::new(
            &g["base.sample"],
            &g["base.timesteps"],
            &g[&format!("{case}.text_embeds")],
        ))
        .expect("unet");
    (embeds, out)
}

#[test]
fn fused_networks_match_diffusers_fuse_lora() {
    let g = golden("golden/lora.safetensors");
    let base = load(request("base")).expect("base");
    assert!(base.loras.is_empty());
    let (base_embeds, base_out) = run(&base, &g, "base");
    let (base_te_err, _) = abs_err(&base_embeds, &g["base.text_embeds"]);
    let (base_unet_err, _) = abs_err(&base_out, &g["base.unet_output"]);
    println!("base: text encoder max {base_te_err:.2e}, UNet max {base_unet_err:.2e}");
    for (case, files) in [("peft_a", 1), ("kohya_b", 1), ("lcm", 1), ("both", 2)] {
        let models = load(request(case)).unwrap_or_else(|e| panic!("{case}: {e}"));
        assert_eq!(models.loras.len(), files, "{case}: LoRA files fused");
        let (embeds, out) = run(&models, &g, case);
        let want_embeds = &g[&format!("{case}.text_embeds")];
        let want_out = &g[&format!("{case}.unet_output")];
        let (te_err, te_mean) = abs_err(&embeds, want_embeds);
        let (unet_err, unet_mean) = abs_err(&out, want_out);
        // What the LoRA changed, ours against diffusers' (the base networks' own rounding
        // cancels out): the sharper check of the fusion itself.
        let ours = (&out - &base_out).unwrap();
        let theirs = (want_out - &g["base.unet_output"]).unwrap();
        let (change_err, _) = abs_err(&ours, &theirs);
        let (_, change) = abs_err(want_out, &g["base.unet_output"]);
        println!(
            "{case}: text encoder max {te_err:.2e} (mean {te_mean:.2e}); UNet max {unet_err:.2e} \
             (mean {unet_mean:.2e}); LoRA's change: mean {change:.3}, ours vs diffusers max \
             {change_err:.2e}"
        );
        assert!(te_err <= 1e-5, "{case}: text encoder {te_err}");
        assert!(unet_err <= 1e-5, "{case}: UNet {unet_err}");
        assert!(change_err <= 1e-5, "{case}: LoRA change {change_err}");
        assert!(
            change > 0.01,
            "{case}: the LoRA changes the output ({change})"
        );
    }
}

#[test]
fn lcm_lora_applies_to_sd15_checkpoints_only() {
    // sd-turbo (an SD 2.1 model) takes no LCM-LoRA: the id is not even resolved.
    let turbo = StableDiffusionModels::load(
        ModelRequest {
            model_id: fixture("tiny-sd-turbo").display().to_string(),
            lcm_lora: Some("no/such-lcm-lora".into()),
            loras: Vec::new(),
        },
        &tiny_settings("self"),
        &mut |_| {},
    )
    .expect("turbo ignores use_lcm_lora");
    assert!(turbo.loras.is_empty());
    // On the SD 1.5 checkpoint a missing LCM-LoRA is an error naming the field.
    let err = load(ModelRequest {
        model_id: sd15(),
        lcm_lora: Some(scratch_dir("no-lcm").join("absent").display().to_string()),
        loras: Vec::new(),
    })
    .expect_err("missing LCM-LoRA");
    assert!(
        matches!(&err, Error::InvalidParam { field, .. } if field == "lcm_lora_id"),
        "{err}"
    );
}

/// Writes a safetensors file of f32 tensors (name, shape, values from a seed).
fn write_lora(path: &Path, tensors: &[(&str, &[usize])]) {
    let map: HashMap<String, Tensor> = tensors
        .iter()
        .enumerate()
        .map(|(i, (name, shape))| {
            let n: usize = shape.iter().product();
            let values: Vec<f32> = (0..n).map(|k| ((k * 7 + i) % 13) as f32 * 0.01).collect();
            (
                name.to_string(),
                Tensor::from_vec(values, *shape, &candle_core::Device::Cpu).unwrap(),
            )
        })
        .collect();
    candle_core::safetensors::save(&map, path).unwrap();
}

/// Writes a broken LoRA under a folder and returns its id.
type MakeLora = Box<dyn Fn(&Path) -> String>;

#[test]
fn loras_that_do_not_fit_are_refused_naming_the_layer() {
    let dir = scratch_dir("lora-errors");
    let q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q";
    let cases: Vec<(&str, MakeLora, Vec<&str>)> = vec![
        (
            "LoRA made for the other checkpoint",
            Box::new(|_| lora("peft-a")),
            vec!["peft-a", "does not fit", "made for another model"],
        ),
        (
            "a layer the UNet does not have",
            Box::new(|d: &Path| {
                let p = d.join("stray.safetensors");
                write_lora(
                    &p,
                    &[
                        (
                            "lora_unet_down_blocks_7_attn1_to_q.lora_down.weight",
                            &[2, 32],
                        ),
                        (
                            "lora_unet_down_blocks_7_attn1_to_q.lora_up.weight",
                            &[32, 2],
                        ),
                    ],
                );
                p.display().to_string()
            }),
            vec![
                "down_blocks_7_attn1_to_q",
                "does not have",
                "stray.safetensors",
            ],
        ),
        (
            "a pair whose width does not fit",
            Box::new(move |d: &Path| {
                let p = d.join("wide.safetensors");
                write_lora(
                    &p,
                    &[
                        (&format!("{q}.lora_down.weight"), &[2, 48]),
                        (&format!("{q}.lora_up.weight"), &[32, 2]),
                    ],
                );
                p.display().to_string()
            }),
            vec!["does not fit", "to_q.weight", "[2, 48]"],
        ),
        (
            "a pair without its up half",
            Box::new(move |d: &Path| {
                let p = d.join("half.safetensors");
                write_lora(&p, &[(&format!("{q}.lora_down.weight"), &[2, 32])]);
                p.display().to_string()
            }),
            vec!["no complete down/up pair", "attn1_to_q"],
        ),
        (
            "ranks that disagree",
            Box::new(move |d: &Path| {
                let p = d.join("ranks.safetensors");
                write_lora(
                    &p,
                    &[
                        (&format!("{q}.lora_down.weight"), &[2, 32]),
                        (&format!("{q}.lora_up.weight"), &[32, 3]),
                    ],
                );
                p.display().to_string()
            }),
            vec!["not a rank-r pair"],
        ),
        (
            "SDXL's second text encoder",
            Box::new(|d: &Path| {
                let p = d.join("te2.safetensors");
                let key = "lora_te2_text_model_encoder_layers_0_mlp_fc1";
                write_lora(
                    &p,
                    &[
                        (&format!("{key}.lora_down.weight"), &[2, 32]),
                        (&format!("{key}.lora_up.weight"), &[64, 2]),
                    ],
                );
                p.display().to_string()
            }),
            vec![
                "patches a second text encoder",
                "this checkpoint has none",
                "te2.safetensors",
            ],
        ),
        (
            "a LoHa",
            Box::new(|d: &Path| {
                let p = d.join("loha.safetensors");
                write_lora(
                    &p,
                    &[(
                        "lora_unet_mid_block_attentions_0_proj_in.hada_w1_a",
                        &[2, 2],
                    )],
                );
                p.display().to_string()
            }),
            vec!["LoHa"],
        ),
        (
            "a truncated file",
            Box::new(|d: &Path| {
                let bytes = std::fs::read(fixture("lora/kohya-b/b.safetensors")).unwrap();
                let p = d.join("cut.safetensors");
                std::fs::write(&p, &bytes[..bytes.len() / 2]).unwrap();
                p.display().to_string()
            }),
            vec!["truncated", "cut.safetensors"],
        ),
        (
            "a folder with two files and no pytorch_lora_weights",
            Box::new(|d: &Path| {
                let f = d.join("two");
                std::fs::create_dir_all(&f).unwrap();
                for name in ["x.safetensors", "y.safetensors"] {
                    std::fs::copy(fixture("lora/kohya-b/b.safetensors"), f.join(name)).unwrap();
                }
                f.display().to_string()
            }),
            vec!["2 .safetensors files", "x.safetensors, y.safetensors"],
        ),
    ];
    let mut refused = 0;
    for (what, make, says) in cases {
        let id = make(&dir);
        let model_id = if what.starts_with("LoRA made") {
            fixture("tiny-sd-turbo").display().to_string()
        } else {
            sd15()
        };
        let result = StableDiffusionModels::load(
            ModelRequest {
                model_id,
                lcm_lora: None,
                loras: vec![(id, 1.0)],
            },
            &tiny_settings("self"),
            &mut |_| {},
        );
        let err = result.expect_err(what).to_string();
        for s in &says {
            assert!(err.contains(s), "{what}: {err:?} lacks {s:?}");
        }
        println!("{what}: {err}");
        refused += 1;
    }
    assert_eq!(refused, 9);
}

#[test]
fn the_pool_shares_equal_lora_sets_and_keeps_others_apart() {
    let pool = Arc::new(ModelPool::new());
    let settings = tiny_settings("self");
    let get = |req: ModelRequest| pool.get(req, &settings, &mut |_| {}).expect("models");
    let a = get(request("peft_a"));
    let a_again = get(request("peft_a"));
    assert!(
        Arc::ptr_eq(&a, &a_again),
        "same LoRAs, same weights: one load"
    );
    let base = get(request("base"));
    assert!(!Arc::ptr_eq(&a, &base), "a LoRA'd UNet is not the base one");
    let mut heavier = request("peft_a");
    heavier.loras[0].1 = 0.8;
    let b = get(heavier);
    assert!(
        !Arc::ptr_eq(&a, &b),
        "another weight is another set of networks"
    );
    // The base and the other weight were rebuilt from the first load's tensors.
    assert_eq!(pool.stats().loads, 1);
    assert_eq!(pool.stats().lora_rebuilds, 2);
}

/// A LoRA change on a loaded checkpoint (another weight, a LoRA added, swapped or removed)
/// rebuilds the networks from the loaded tensors: the checkpoint's weight files are not read
/// (here they are replaced by garbage after the first load, which a load would refuse), and
/// every rebuilt set equals diffusers' fusion of that set as closely as a fresh load does.
#[test]
fn a_lora_change_rebuilds_from_memory_without_reading_the_weights() {
    let g = golden("golden/lora.safetensors");
    let dir = common::scratch_dir("lora-rebuild").join("tiny-sd15");
    common::copy_dir(&fixture("tiny-sd15"), &dir);
    let with_model = |mut r: ModelRequest| {
        r.model_id = dir.display().to_string();
        r
    };
    let pool = Arc::new(ModelPool::new());
    let settings = tiny_settings("self");
    let mut held = vec![
        pool.get(with_model(request("peft_a")), &settings, &mut |_| {})
            .expect("first load"),
    ];
    for file in [
        "unet/diffusion_pytorch_model.safetensors",
        "text_encoder/model.safetensors",
    ] {
        let path = dir.join(file);
        std::fs::remove_file(&path).unwrap();
        std::fs::write(&path, b"not a safetensors file").unwrap();
    }
    let mut steps = 0;
    for case in ["both", "kohya_b", "lcm", "base", "peft_a"] {
        let mut lines = Vec::new();
        let models = pool
            .get(with_model(request(case)), &settings, &mut |l| {
                lines.push(l.to_string())
            })
            .unwrap_or_else(|e| panic!("{case}: {e}"));
        steps += 1;
        assert!(
            lines.iter().any(|l| l.contains("LoRA change")),
            "{case}: rebuilt, not loaded: {lines:?}"
        );
        let (embeds, out) = run(&models, &g, case);
        let (te_err, _) = abs_err(&embeds, &g[&format!("{case}.text_embeds")]);
        let (unet_err, _) = abs_err(&out, &g[&format!("{case}.unet_output")]);
        println!("{case} rebuilt: text encoder max {te_err:.2e}, UNet max {unet_err:.2e}");
        assert!(
            te_err <= 1e-5 && unet_err <= 1e-5,
            "{case}: {te_err} {unet_err}"
        );
        // Drop the older sets, as a reload does once the new pipeline serves.
        held = vec![models];
    }
    assert_eq!(pool.stats().loads, 1, "one load, from the files");
    assert_eq!(pool.stats().lora_rebuilds, steps);

    // A LoRA that does not fit is refused by a rebuild as by a load, naming the layer; the
    // networks in use are untouched.
    let wide = common::scratch_dir("lora-rebuild-wide").join("wide.safetensors");
    let q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q";
    write_lora(
        &wide,
        &[
            (&format!("{q}.lora_down.weight"), &[2, 48]),
            (&format!("{q}.lora_up.weight"), &[32, 2]),
        ],
    );
    let mut bad = with_model(request("base"));
    bad.loras = vec![(wide.display().to_string(), 1.0)];
    let err = pool
        .get(bad, &settings, &mut |_| {})
        .expect_err("a LoRA for another width");
    assert!(
        err.to_string().contains("does not fit") && err.to_string().contains("attn1_to_q"),
        "{err}"
    );
    let (_, out) = run(&held[0], &g, "peft_a");
    assert!(abs_err(&out, &g["peft_a.unet_output"]).0 <= 1e-5);
    drop(held);

    // With nothing loaded, the garbage is what a request meets: refused, naming the file.
    let err = pool
        .get(with_model(request("peft_a")), &settings, &mut |_| {})
        .expect_err("the files are garbage now");
    assert!(err.to_string().contains("model.safetensors"), "{err}");
}

/// Loads tiny-sd15 under `policy`, then changes its LoRAs (kohya-b, both, none) through one
/// pool: one load from the files and three rebuilds from the loaded tensors, each set's UNet
/// output within 1e-5 of diffusers' fused networks. `unet_output` runs the UNet of each set
/// (and checks what `policy` must have changed); `what` names the policy in the lines printed.
fn rebuilds_under(
    policy: sdstream::model::kernels::KernelPolicy,
    what: &str,
    unet_output: impl Fn(&StableDiffusionModels, &str) -> Tensor,
) {
    let g = golden("golden/lora.safetensors");
    let pool = Arc::new(ModelPool::new());
    let mut settings = tiny_settings("self");
    settings.kernels = Some(policy);
    let mut held = Vec::new();
    for case in ["base", "kohya_b", "both", "base"] {
        let models = pool
            .get(request(case), &settings, &mut |_| {})
            .unwrap_or_else(|e| panic!("{case}: {e}"));
        let out = unet_output(&models, case);
        let (unet_err, _) = abs_err(&out, &g[&format!("{case}.unet_output")]);
        println!("{case} {what}: UNet max {unet_err:.2e}");
        assert!(unet_err <= 1e-5, "{case}: {unet_err}");
        held = vec![models];
    }
    drop(held);
    assert_eq!(pool.stats().loads, 1, "one load, from the files");
    assert_eq!(pool.stats().lora_rebuilds, 3);
}

/// With channels-last networks on the CPU (kernel policy `channels_last` on every device) the
/// convolutions keep their weights laid out for their kernel and the weight table a view of
/// them in the checkpoint's shape: a LoRA change that patches convolutions (kohya-b's resnet
/// layers) rebuilds from that view to the same outputs as diffusers' fused networks.
#[test]
fn a_lora_change_rebuilds_channels_last_networks() {
    use sdstream::model::kernels::{ChannelsLast, KernelPolicy};
    let g = golden("golden/lora.safetensors");
    let policy = KernelPolicy {
        channels_last: ChannelsLast::On,
        ..KernelPolicy::process()
    };
    rebuilds_under(policy, "channels-last", |models, case| {
        assert!(models.unet.maps_channels_last(), "{case}: channels first");
        run(models, &g, case).1
    });
}

/// With every resnet's time projection in one product (kernel policy
/// `fused_time_projections`), the resnets' own weights are views of the fused one and the
/// weight table records those views: a LoRA change that patches `time_emb_proj` (kohya-b's
/// resnet layers) rebuilds the fused weight to the same outputs as diffusers' fused networks,
/// and the rebuilt networks take their time embeddings from it.
#[test]
fn a_lora_change_rebuilds_fused_time_projections() {
    use sdstream::model::kernels::KernelPolicy;
    use sdstream::model::unet_blocks::time_columns_taken;
    let g = golden("golden/lora.safetensors");
    let policy = KernelPolicy {
        fused_time_projections: true,
        ..KernelPolicy::process()
    };
    rebuilds_under(policy, "fused time projections", |models, case| {
        assert!(models.unet.fuses_time_projections(), "{case}: not fused");
        let before = time_columns_taken();
        let (_, out) = run(models, &g, case);
        // tiny-sd15: 2 down resnets, 2 mid, 4 up (counted on this thread).
        assert_eq!(time_columns_taken() - before, 8, "{case}");
        out
    });
}

const SIZE: usize = 64;

fn stream_params(loras: Option<(&str, f64)>, lcm: bool) -> StreamDiffusionParams {
    StreamDiffusionParams {
        model_id: sd15(),
        prompt: Prompt::Text("a watercolor of a lighthouse".into()),
        width: SIZE as i64,
        height: SIZE as i64,
        use_lcm_lora: lcm,
        lcm_lora_id: lora("lcm-kohya"),
        lora_dict: loras.map(|(name, w)| [(lora(name), w)].into_iter().collect()),
        ..StreamDiffusionParams::default()
    }
}

fn frame_bytes() -> Vec<u8> {
    image::open(fixture("frames/000.png"))
        .unwrap()
        .to_rgb8()
        .into_raw()
}

fn settings() -> sdstream::EngineSettings {
    tiny_settings("self")
}

#[test]
fn streams_with_lcm_lora_and_lora_dict_through_engine_and_stream() {
    let data = frame_bytes();
    let frame = Frame::packed(&data, SIZE, SIZE, PixelFormat::Rgb8).unwrap();
    let with = stream_params(Some(("peft-a", 0.7)), true);
    let mut direct = StreamDiffusion::new(with.clone(), settings()).expect("stream");
    assert_eq!(direct.models().loras.len(), 2, "LCM-LoRA and peft-a");
    let want = direct.process(&frame).expect("process");

    // No warm-up, so that the engine's first output is the stream's first one.
    let options = EngineOptions {
        warmup: false,
        ..EngineOptions::default()
    };
    let engine = Engine::new(with.clone(), settings(), options).expect("engine");
    let got = engine.process(frame).expect("engine output");
    assert!(
        got.image.data == want.data,
        "Engine = StreamDiffusion, byte for byte (mean {:.3} levels apart)",
        mean_levels(&got.image.data, &want.data)
    );

    let mut plain = StreamDiffusion::new(stream_params(None, false), settings()).expect("plain");
    let without = plain.process(&frame).expect("process");
    let levels = mean_levels(&without.data, &want.data);
    println!("LoRAs fused vs none: mean {levels:.2} levels");
    assert!(levels > 1.0, "the LoRAs change the picture: {levels}");

    // A LoRA weight change is a reload (as Daydream classifies it) and changes the output.
    let mut heavier = with.clone();
    heavier.lora_dict = Some([(lora("peft-a"), 1.5)].into_iter().collect());
    let update = engine.update_params(heavier).expect("update");
    assert_eq!(update.kind(), UpdateKind::Reload);
    engine
        .wait_ready(Some(Duration::from_secs(60)))
        .expect("reloaded");
    let mut moved = false;
    for _ in 0..4 {
        let out = engine.process(frame).expect("output");
        if out.params_version >= 1 && mean_levels(&out.image.data, &want.data) > 0.5 {
            moved = true;
            break;
        }
    }
    assert!(
        moved,
        "after the weight change the output is another picture"
    );

    // A LoRA id that names nothing fails the reload; the engine keeps serving the LoRAs it has.
    let serving = engine.status().serving_params_version;
    let mut missing = stream_params(Some(("peft-a", 0.7)), true);
    missing.lora_dict = Some([("no-such/lora".to_string(), 1.0)].into_iter().collect());
    engine
        .update_params(missing)
        .expect("accepted (the id is a hub id)");
    let failed = (0..600).any(|_| {
        std::thread::sleep(Duration::from_millis(100));
        let status = engine.status();
        !status.reloading
            && status
                .last_error
                .is_some_and(|e| e.contains("no-such/lora"))
    });
    assert!(failed, "the failed reload is reported, naming the id");
    // The serving LoRAs stay, accepted again under a version after the failed one's.
    let status = engine.status();
    assert!(
        serving.is_some_and(|s| s + 1 < status.params_version),
        "{serving:?} -> {}",
        status.params_version
    );
    assert_eq!(status.serving_params_version, Some(status.params_version));
    engine.process(frame).expect("still serving");
}

fn mean_levels(a: &[u8], b: &[u8]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (*x as f64 - *y as f64).abs())
        .sum::<f64>()
        / a.len() as f64
}

#[test]
fn a_pair_stored_as_1x1_convolutions_fits_a_linear_layer() {
    let dir = scratch_dir("lora-forms");
    let q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q";
    let linear = dir.join("linear.safetensors");
    let conv = dir.join("conv.safetensors");
    write_lora(
        &linear,
        &[
            (&format!("{q}.lora_down.weight"), &[2, 32]),
            (&format!("{q}.lora_up.weight"), &[32, 2]),
        ],
    );
    write_lora(
        &conv,
        &[
            (&format!("{q}.lora_down.weight"), &[2, 32, 1, 1]),
            (&format!("{q}.lora_up.weight"), &[32, 2, 1, 1]),
        ],
    );
    let g = golden("golden/lora.safetensors");
    let outputs: Vec<Tensor> = [&linear, &conv]
        .iter()
        .map(|path| {
            let models = load(ModelRequest {
                model_id: sd15(),
                lcm_lora: None,
                loras: vec![(path.display().to_string(), 1.0)],
            })
            .expect("either form loads");
            run(&models, &g, "base").1
        })
        .collect();
    assert_eq!(
        abs_err(&outputs[0], &outputs[1]).0,
        0.0,
        "the same numbers, the same output"
    );
    let base = run(&load(request("base")).unwrap(), &g, "base").1;
    assert!(
        abs_err(&outputs[0], &base).1 > 0.0,
        "the pair changes the output"
    );
}
