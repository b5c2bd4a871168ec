//! SDXL's networks and text conditioning against diffusers' `StableDiffusionXLPipeline` on the
//! tiny SDXL checkpoint (tests/fixtures/tiny-sdxl, goldens from
//! tests/reference/make_sdxl_fixtures.py): both tokenizers (they pad differently), the prompt
//! embeddings (both encoders' penultimate states side by side), the pooled projection, the time
//! ids, and the UNet with that added conditioning; then the SDXL stream (TAESD, every cfg type
//! with negative rows) against the reference's stream arithmetic with that conditioning, and
//! through the Engine.

use crate::common;

use candle_core::{DType, Device, IndexOp, Tensor};
use common::{WorstFrame, abs_err, fixture, golden, sdxl_unet_conditioning, tiny_settings};
use sdstream::model::bundle::{ModelRequest, StableDiffusionModels};
use sdstream::model::unet::UNetInputs;
use sdstream::params::{ControlNetConfig, ModelFamily};
use sdstream::{
    Engine, EngineOptions, EngineSettings, Frame, PixelFormat, StreamDiffusion,
    StreamDiffusionParams,
};
use serde_json::{Value, json};

fn sdxl() -> String {
    fixture("tiny-sdxl").display().to_string()
}

fn models() -> StableDiffusionModels {
    StableDiffusionModels::load(sdxl().as_str(), &tiny_settings("self"), &mut |_| {})
        .expect("the tiny SDXL checkpoint loads")
}

fn ids_of(t: &Tensor) -> Vec<u32> {
    t.flatten_all()
        .unwrap()
        .to_dtype(DType::I64)
        .unwrap()
        .to_vec1::<i64>()
        .unwrap()
        .into_iter()
        .map(|v| v as u32)
        .collect()
}

#[test]
fn conditioning_matches_diffusers_encode_prompt() {
    let g = golden("golden/sdxl_conditioning.safetensors");
    let models = models();
    assert_eq!(models.family, ModelFamily::Sdxl);
    let second = models.second.as_ref().expect("second text encoder");
    let prompt = "a watercolor of a lighthouse";
    assert_eq!(
        models.tokenizer.encode(prompt).unwrap(),
        ids_of(&g["input_ids"])
    );
    assert_eq!(
        second.tokenizer.encode(prompt).unwrap(),
        ids_of(&g["input_ids_2"])
    );
    for (text, embeds, pooled) in [
        (prompt, "prompt_embeds", "pooled_prompt_embeds"),
        (
            "blurry",
            "negative_prompt_embeds",
            "negative_pooled_prompt_embeds",
        ),
    ] {
        let out = models.encode_text_sdxl(text).expect("encode");
        let (max_e, _) = abs_err(&out.embeds, &g[embeds]);
        let (max_p, _) = abs_err(&out.pooled, &g[pooled]);
        println!("{text:?}: prompt_embeds max {max_e:.2e}, pooled max {max_p:.2e}");
        assert!(max_e <= 1e-5 && max_p <= 1e-5, "{text}: {max_e} {max_p}");
    }
    let time_ids = models.sdxl_time_ids(64, 96).unwrap();
    assert_eq!(abs_err(&time_ids, &g["add_time_ids"]).0, 0.0);

    // The UNet with the added conditioning, on the reference's own conditioning.
    let (context, added) = sdxl_unet_conditioning(&g);
    let out = models
        .unet
        .forward(UNetInputs::new(&g["sample"], &g["timesteps"], &context).added(Some(&added)))
        .expect("unet");
    let (max, mean) = abs_err(&out, &g["unet_output"]);
    println!("SDXL UNet with text_embeds and time_ids: max {max:.2e} mean {mean:.2e}");
    assert!(max <= 1e-4, "{max}");
}

#[test]
fn sd_checkpoints_have_no_sdxl_conditioning() {
    let sd = StableDiffusionModels::load(
        fixture("tiny-sd-turbo").display().to_string().as_str(),
        &tiny_settings("self"),
        &mut |_| {},
    )
    .unwrap();
    assert!(sd.second.is_none());
    let err = sd.encode_text_sdxl("x").expect_err("no second encoder");
    assert!(err.to_string().contains("not an SDXL checkpoint"), "{err}");
}

fn stream_case(name: &str) -> &'static Value {
    common::golden_case("golden/streams_sdxl.json", name)
}

fn stream_params(case: &Value, settings: &EngineSettings) -> StreamDiffusionParams {
    let body = json!({
        "model_id": sdxl(),
        "prompt": case["prompt"],
        "negative_prompt": case["negative_prompt"],
        "seed": case["seed"],
        "t_index_list": case["t_index_list"],
        "num_inference_steps": case["num_inference_steps"],
        "guidance_scale": case["guidance_scale"],
        "delta": case["delta"],
        "width": case["width"],
        "height": case["height"],
    });
    StreamDiffusionParams::from_json_with(&body.to_string(), settings).unwrap()
}

/// The SDXL stream against the reference's stream arithmetic with SDXL's added conditioning
/// (tests/reference/make_sdxl_fixtures.py), every cfg type that lays out negative rows.
fn check_stream(name: &str) {
    let case = stream_case(name);
    let gold = golden(case["file"].as_str().unwrap());
    let settings = tiny_settings(case["cfg_type"].as_str().unwrap());
    let mut stream = StreamDiffusion::new(stream_params(case, &settings), settings).unwrap();
    assert_eq!(stream.models().family, ModelFamily::Sdxl);
    assert_eq!(
        abs_err(stream.state().init_noise(), &gold["init_noise"]).0,
        0.0
    );
    let frames = case["frames"].as_array().unwrap();
    let n = gold["output"].dim(0).unwrap();
    assert!(n >= 6 && frames.len() >= n);
    let mut worst = WorstFrame::default();
    for (i, rel) in frames.iter().take(n).enumerate() {
        let img = image::open(fixture(rel.as_str().unwrap()))
            .unwrap()
            .to_rgb8();
        let (w, h) = (img.width() as usize, img.height() as usize);
        let data = img.into_raw();
        let frame = Frame::packed(&data, w, h, PixelFormat::Rgb8).unwrap();
        let x = frame.to_tensor(w, h, &Device::Cpu).unwrap();
        let out = stream.process_tensor(&x).unwrap();
        worst.add(
            name,
            i,
            &out,
            &gold["output"].i(i).unwrap().unsqueeze(0).unwrap(),
        );
    }
    worst.check(name, n);
}

#[test]
fn stream_self_t3() {
    check_stream("self_t3");
}

#[test]
fn stream_full_t2() {
    check_stream("full_t2");
}

#[test]
fn stream_initialize_t3() {
    check_stream("initialize_t3");
}

#[test]
fn sdxl_streams_through_the_engine_and_refuse_sd_controlnets() {
    let case = stream_case("self_t3");
    let settings = tiny_settings("self");
    let params = stream_params(case, &settings);
    let img = image::open(fixture("frames/000.png")).unwrap().to_rgb8();
    let data = img.into_raw();
    let frame = Frame::packed(&data, 64, 64, PixelFormat::Rgb8).unwrap();
    let mut direct = StreamDiffusion::new(params.clone(), settings.clone()).unwrap();
    let want = direct.process(&frame).unwrap();
    let options = EngineOptions {
        warmup: false,
        ..EngineOptions::default()
    };
    let engine = Engine::new(params.clone(), settings.clone(), options).unwrap();
    let got = engine.process(frame).unwrap();
    assert!(
        got.image.data == want.data,
        "Engine = StreamDiffusion, byte for byte"
    );

    // An SD 2.x net on SDXL is refused from its config, naming both families.
    let mut with_net = params;
    with_net.controlnets = vec![ControlNetConfig::new(
        fixture("tiny-controlnet-a").display().to_string(),
    )];
    let err = StreamDiffusion::new(with_net, settings).expect_err("an SD 2.x net on SDXL");
    let message = err.to_string();
    assert!(
        message.contains("tiny-controlnet-a")
            && message.contains("addition_embed_type is null")
            && message.contains("\"text_time\"")
            && message.contains("SDXL model"),
        "{message}"
    );
}

/// A kohya LoRA with UNet and both text encoders' layers (lora_unet_, lora_te1_, lora_te2_),
/// fused at 0.8, against tests/reference/make_sdxl_fixtures.py's `stage_lora`.
#[test]
fn an_sdxl_lora_patches_the_unet_and_both_text_encoders() {
    let lora = fixture("lora/sdxl-kohya").display().to_string();
    let models = StableDiffusionModels::load(
        ModelRequest {
            model_id: sdxl(),
            lcm_lora: Some("ignored-on-sdxl/lcm".into()),
            loras: vec![(lora, 0.8)],
        },
        &tiny_settings("self"),
        &mut |_| {},
    )
    .expect("SDXL with a LoRA");
    assert_eq!(models.loras.len(), 1, "the LCM-LoRA is for SD 1.5 only");
    let g = golden("golden/sdxl_lora.safetensors");
    let base = golden("golden/sdxl_conditioning.safetensors");
    let text = models
        .encode_text_sdxl("a watercolor of a lighthouse")
        .unwrap();
    let (context, added) = sdxl_unet_conditioning(&base);
    let out = models
        .unet
        .forward(UNetInputs::new(&base["sample"], &base["timesteps"], &context).added(Some(&added)))
        .unwrap();
    for (what, got, key, tol) in [
        ("prompt_embeds", &text.embeds, "prompt_embeds", 1e-5),
        ("pooled", &text.pooled, "pooled_prompt_embeds", 1e-5),
        ("unet_output", &out, "unet_output", 1e-4),
    ] {
        let (max, _) = abs_err(got, &g[key]);
        let (_, change) = abs_err(&g[key], &base[key]);
        println!("SDXL LoRA {what}: max {max:.2e} (the LoRA moves it by {change:.3} mean)");
        assert!(max <= tol, "{what}: {max}");
        assert!(change > 1e-3, "{what}: the LoRA changes it");
    }
}

#[test]
fn a_second_tokenizer_longer_than_its_encoder_is_named() {
    let dir = common::scratch_dir("sdxl-tokenizer-2");
    common::copy_dir(&fixture("tiny-sdxl"), &dir);
    let config = dir.join("tokenizer_2/tokenizer_config.json");
    let mut json: Value = serde_json::from_str(&std::fs::read_to_string(&config).unwrap()).unwrap();
    json["model_max_length"] = 100.into();
    std::fs::write(&config, json.to_string()).unwrap();
    let err = StableDiffusionModels::load(
        dir.display().to_string().as_str(),
        &tiny_settings("self"),
        &mut |_| {},
    )
    .expect_err("100 tokens do not fit 77 positions")
    .to_string();
    assert!(
        err.contains("tokenizer_2/tokenizer_config.json")
            && err.contains("text_encoder_2/config.json")
            && err.contains("(100,"),
        "{err}"
    );
}
