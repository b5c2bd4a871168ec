//! SDXL's networks and text conditioning against diffusers' `StableDiffusionXLPipeline` on the
//! tiny SDXL checkpoint (tests/fixtures/tiny-sdxl, goldens from
//! tests/reference/make_sdxl_fixtures.py): both tokenizers (they pad differently), the prompt
//! embeddings (both encoders' penultimate states side by side), the pooled projection, the time
//! ids, and the UNet with that added conditioning. SDXL streams themselves are refused until the
//! stream runs them.

mod common;

use candle_core::{DType, Tensor};
use common::{abs_err, fixture, golden, tiny_settings};
use sdstream::model::bundle::StableDiffusionModels;
use sdstream::model::unet::AddedConditioning;
use sdstream::params::{ModelFamily, Prompt};
use sdstream::{StreamDiffusion, StreamDiffusionParams};

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
    let context = Tensor::cat(&[&g["prompt_embeds"], &g["negative_prompt_embeds"]], 0).unwrap();
    let added = AddedConditioning {
        text_embeds: Tensor::cat(
            &[
                &g["pooled_prompt_embeds"],
                &g["negative_pooled_prompt_embeds"],
            ],
            0,
        )
        .unwrap(),
        time_ids: g["add_time_ids"].repeat((2, 1)).unwrap(),
    };
    let out = models
        .unet
        .forward_with_added(&g["sample"], &g["timesteps"], &context, Some(&added), None)
        .expect("unet");
    let (max, mean) = abs_err(&out, &g["unet_output"]);
    println!("SDXL UNet with text_embeds and time_ids: max {max:.2e} mean {mean:.2e}");
    assert!(max <= 1e-4, "{max}");
}

#[test]
fn sd_checkpoints_have_no_sdxl_conditioning_and_sdxl_streams_are_refused() {
    let sd = StableDiffusionModels::load(
        fixture("tiny-sd-turbo").display().to_string().as_str(),
        &tiny_settings("self"),
        &mut |_| {},
    )
    .unwrap();
    assert!(sd.second.is_none());
    let err = sd.encode_text_sdxl("x").expect_err("no second encoder");
    assert!(err.to_string().contains("not an SDXL checkpoint"), "{err}");

    let params = StreamDiffusionParams {
        model_id: sdxl(),
        prompt: Prompt::Text("a lighthouse".into()),
        width: 64,
        height: 64,
        ..StreamDiffusionParams::default()
    };
    let err = StreamDiffusion::new(params, tiny_settings("self")).expect_err("not yet");
    assert!(
        err.to_string()
            .contains("SDXL streams are not supported yet"),
        "{err}"
    );
}
