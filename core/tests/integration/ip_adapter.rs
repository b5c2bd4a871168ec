//! IP-Adapter against diffusers' IP-Adapter path (tests/reference/make_ip_adapter_fixtures.py:
//! transformers' image encoder, diffusers' `ImageProjection` and `IPAdapterAttnProcessor2_0`
//! loaded by `_load_ip_adapter_weights`, on the tiny SD 1.5 and SDXL UNets), Daydream's
//! per-layer weight types, and the adapter in a stream: style from a URL, from the host, hot
//! scale / weight type / enabled, refusals.

use crate::common;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::path::PathBuf;

use base64::Engine as _;
use candle_core::{DType, Device, Tensor};
use common::{abs_err, check, fixture, golden};
use sdstream::model::bundle::StableDiffusionModels;
use sdstream::model::ip_adapter::{IpAdapter, layer_scales};
use sdstream::model::unet::{AddedConditioning, ImagePrompt, UNetInputs};
use sdstream::{
    EngineSettings, Frame, PixelFormat, StreamDiffusion, StreamDiffusionParams, StyleImage,
};
use serde_json::{Value, json};

fn adapter_path(family: &str) -> PathBuf {
    fixture(match family {
        "sd15" => "model-root/h94/IP-Adapter/models/ip-adapter_sd15.bin",
        _ => "model-root/h94/IP-Adapter/sdxl_models/ip-adapter_sdxl.bin",
    })
}

fn style_png() -> Vec<u8> {
    std::fs::read(fixture("golden/ip_adapter_style.png")).unwrap()
}

fn style_picture() -> StyleImage {
    StyleImage::decode(&style_png(), "the style fixture").unwrap()
}

/// The UNet output for the golden inputs with image tokens `[negative; positive]` at `scales`.
fn unet_with_image(
    models: &StableDiffusionModels,
    adapter: &IpAdapter,
    g: &HashMap<String, Tensor>,
    tokens: &Tensor,
    scales: &[f64],
) -> Tensor {
    let e = Tensor::cat(&[&g["text"], tokens], 1).unwrap();
    let added = g.get("text_embeds").map(|t| AddedConditioning {
        text_embeds: t.clone(),
        time_ids: g["time_ids"].clone(),
    });
    models
        .unet
        .forward(
            UNetInputs::new(&g["sample"], &g["timesteps"], &e)
                .added(added.as_ref())
                .image(Some(ImagePrompt {
                    adapter: adapter.layers(),
                    tokens: adapter.config().tokens,
                    scales,
                })),
        )
        .unwrap()
}

/// The tiny checkpoint `fixture_name` (tests/fixtures).
fn tiny_models(fixture_name: &str) -> StableDiffusionModels {
    StableDiffusionModels::load(
        fixture(fixture_name).display().to_string().as_str(),
        &common::tiny_settings("self"),
        &mut |_| {},
    )
    .unwrap()
}

fn parity(family: &str, fixture_name: &str) {
    let g = golden(&format!("golden/ip_adapter_{family}.safetensors"));
    let adapter = IpAdapter::load(&adapter_path(family), DType::F32, &Device::Cpu).unwrap();
    let picture = style_picture();

    // The image processor (PIL's Lanczos, ported) and the encoder.
    let pixels = adapter
        .clip_input(&picture.rgb, picture.width, picture.height)
        .unwrap();
    check(
        &format!("{family} clip input"),
        &pixels,
        &g["clip_input"],
        1e-6,
    );
    let embeds = adapter.encoder().image_embeds(&g["clip_input"]).unwrap();
    check(
        &format!("{family} image embeds"),
        &embeds,
        &g["image_embeds"],
        1e-5,
    );
    let tokens = adapter.projection().forward(&g["image_embeds"]).unwrap();
    check(&format!("{family} tokens"), &tokens, &g["tokens"], 1e-5);
    let encoded = adapter
        .encode(&picture.rgb, picture.width, picture.height)
        .unwrap();
    check(
        &format!("{family} encode"),
        &encoded.cond,
        &g["tokens"],
        1e-5,
    );
    check(
        &format!("{family} negative tokens"),
        &encoded.uncond,
        &g["negative_tokens"],
        1e-5,
    );

    // The UNet with the adapter: row 0 the negative tokens, row 1 the picture's.
    let models = tiny_models(fixture_name);
    let n = models.unet.cross_attention_widths().len();
    assert_eq!(adapter.layers().len(), n);
    assert_eq!(
        adapter.layers().widths(),
        models.unet.cross_attention_widths()
    );
    let rows = Tensor::cat(&[&g["negative_tokens"], &g["tokens"]], 0).unwrap();
    let plain = models
        .unet
        .forward(
            UNetInputs::new(&g["sample"], &g["timesteps"], &g["text"]).added(
                g.get("text_embeds")
                    .map(|t| AddedConditioning {
                        text_embeds: t.clone(),
                        time_ids: g["time_ids"].clone(),
                    })
                    .as_ref(),
            ),
        )
        .unwrap();
    let (plain_err, _) = abs_err(&plain, &g["plain"]);
    println!("{family}: plain UNet vs diffusers max {plain_err:.2e}");
    for s in [1.0, 0.5, 0.0] {
        let out = unet_with_image(&models, &adapter, &g, &rows, &vec![s; n]);
        let want = &g[&format!("out_scale_{s:.1}")];
        let (max, mean) = abs_err(&out, want);
        println!("{family} scale {s}: max {max:.2e} mean {mean:.2e}");
        check(&format!("{family} scale {s}"), &out, want, 1e-5);
        if s == 0.0 {
            // Every layer skipped: exactly the UNet without an adapter.
            assert_eq!(abs_err(&out, &plain).0, 0.0);
        } else {
            assert!(
                abs_err(&out, &plain).0 > 0.1,
                "the adapter moves the output"
            );
        }
    }
    let scales = layer_scales(n, 0.8, Some("ease in"));
    let want_scales: Vec<f32> = g["layer_scales"].to_vec1().unwrap();
    for (ours, theirs) in scales.iter().zip(&want_scales) {
        assert!(
            (*ours as f32 - theirs).abs() < 1e-6,
            "{scales:?} {want_scales:?}"
        );
    }
    let out = unet_with_image(&models, &adapter, &g, &rows, &scales);
    check(&format!("{family} ease in"), &out, &g["out_layers"], 1e-5);
}

#[test]
fn sd15_adapter_matches_diffusers() {
    parity("sd15", "tiny-sd15");
}

#[test]
fn sdxl_adapter_matches_diffusers() {
    parity("sdxl", "tiny-sdxl");
}

/// A Plus checkpoint (tests/reference/make_ip_adapter_plus_fixtures.py): the encoder's
/// penultimate hidden states, diffusers' `IPAdapterPlusImageProjection`, the negative tokens from
/// a picture of zeros, and the UNet with its 16 tokens.
fn plus_parity(family: &str, fixture_name: &str, checkpoint: &str) {
    let g = golden(&format!("golden/ip_adapter_{family}.safetensors"));
    let p = golden(&format!("golden/ip_adapter_plus_{family}.safetensors"));
    let path = fixture(&format!("model-root/h94/IP-Adapter/{checkpoint}"));
    let adapter = IpAdapter::load(&path, DType::F32, &Device::Cpu).unwrap();
    let config = adapter.config();
    let resampler = config.resampler.as_ref().expect("a Plus checkpoint");
    assert_eq!(
        (
            config.tokens,
            resampler.depth,
            resampler.heads,
            resampler.width
        ),
        (16, 4, 2, 32)
    );
    let hidden = adapter
        .encoder()
        .penultimate_hidden_states(&g["clip_input"])
        .unwrap();
    check(
        &format!("{family} plus hidden"),
        &hidden,
        &p["hidden"],
        1e-5,
    );
    let tokens = adapter.projection().forward(&p["hidden"]).unwrap();
    check(
        &format!("{family} plus tokens"),
        &tokens,
        &p["tokens"],
        1e-5,
    );
    let picture = style_picture();
    let encoded = adapter
        .encode(&picture.rgb, picture.width, picture.height)
        .unwrap();
    assert_eq!(encoded.cond.dims(), p["tokens"].dims());
    check(
        &format!("{family} plus encode"),
        &encoded.cond,
        &p["tokens"],
        1e-5,
    );
    check(
        &format!("{family} plus negative tokens"),
        &encoded.uncond,
        &p["negative_tokens"],
        1e-5,
    );
    let models = tiny_models(fixture_name);
    let n = models.unet.cross_attention_widths().len();
    let rows = Tensor::cat(&[&p["negative_tokens"], &p["tokens"]], 0).unwrap();
    let out = unet_with_image(&models, &adapter, &g, &rows, &vec![1.0; n]);
    let (max, mean) = abs_err(&out, &p["out_scale_1.0"]);
    println!("{family} plus scale 1: max {max:.2e} mean {mean:.2e}");
    check(
        &format!("{family} plus scale 1"),
        &out,
        &p["out_scale_1.0"],
        1e-5,
    );
    assert!(
        abs_err(&out, &g["plain"]).0 > 0.1,
        "the adapter moves the output"
    );
}

#[test]
fn sd15_plus_adapter_matches_diffusers() {
    plus_parity("sd15", "tiny-sd15", "models/ip-adapter-plus_sd15.bin");
}

#[test]
fn sdxl_vit_h_plus_adapter_matches_diffusers() {
    plus_parity(
        "sdxl",
        "tiny-sdxl",
        "sdxl_models/ip-adapter-plus_sdxl_vit-h.bin",
    );
}

#[test]
fn weight_types_give_daydreams_layer_scales() {
    let close = |a: &[f64], b: &[f64]| {
        assert_eq!(a.len(), b.len());
        for (x, y) in a.iter().zip(b) {
            assert!((x - y).abs() < 1e-12, "{a:?} vs {b:?}");
        }
    };
    close(&layer_scales(16, 0.7, Some("linear")), &[0.7; 16]);
    close(&layer_scales(16, 0.7, None), &[0.7; 16]);
    close(&layer_scales(16, 0.7, Some("style transfer")), &[0.7; 16]);
    let ease_in = layer_scales(16, 1.0, Some("ease in"));
    assert!((ease_in[0] - 1.0).abs() < 1e-12);
    assert!((ease_in[8] - (0.05 + 0.95 * 0.5)).abs() < 1e-12);
    assert!((ease_in[15] - (0.05 + 0.95 / 16.0)).abs() < 1e-12);
    let ease_out = layer_scales(16, 2.0, Some("ease out"));
    assert!((ease_out[0] - 0.1).abs() < 1e-12);
    assert!((ease_out[4] - 2.0 * (0.05 + 0.95 * 0.25)).abs() < 1e-12);
    let in_out = layer_scales(16, 1.0, Some("ease in-out"));
    assert!((in_out[8] - 1.0).abs() < 1e-12 && (in_out[0] - 0.05).abs() < 1e-12);
    let reverse = layer_scales(16, 1.0, Some("reverse in-out"));
    assert!((reverse[8] - 0.05).abs() < 1e-12 && (reverse[0] - 1.0).abs() < 1e-12);
    let mut precise = vec![0.0; 16];
    precise[4] = 0.9;
    precise[5] = 0.9;
    close(
        &layer_scales(16, 0.9, Some("style transfer precise")),
        &precise,
    );
    close(
        &layer_scales(16, 0.9, Some("composition precise")),
        &precise,
    );
    let mut eleven = vec![0.0; 11];
    eleven[3] = 0.9;
    close(&layer_scales(11, 0.9, Some("composition precise")), &eleven);
    // SDXL's 70 layers: Daydream keeps none.
    close(
        &layer_scales(70, 0.9, Some("style transfer precise")),
        &[0.0; 70],
    );
}

fn settings() -> EngineSettings {
    let mut s = common::tiny_settings("self");
    s.model_root = Some(fixture("model-root"));
    s
}

fn data_url(png: &[u8]) -> String {
    format!(
        "data:image/png;base64,{}",
        base64::engine::general_purpose::STANDARD.encode(png)
    )
}

/// Another style picture (the fixture frame 3), as a data: URL.
fn other_style_url() -> String {
    data_url(&std::fs::read(fixture("frames/003.png")).unwrap())
}

/// An engine over `params` with [`settings`], without the warm-up frame (the tests feed their
/// own).
fn engine_without_warmup(params: StreamDiffusionParams) -> sdstream::Result<sdstream::Engine> {
    sdstream::Engine::new(
        params,
        settings(),
        sdstream::EngineOptions {
            warmup: false,
            ..sdstream::EngineOptions::default()
        },
    )
}

fn params(extra: Value) -> StreamDiffusionParams {
    let mut b = json!({
        "model_id": fixture("tiny-sd15").display().to_string(),
        "prompt": "a photo of a cat",
        "seed": 2,
        "t_index_list": [20, 30],
        "width": 64,
        "height": 64,
        "use_safety_checker": false,
        "use_lcm_lora": false,
        "ip_adapter_style_image_url": data_url(&style_png()),
    });
    if let (Some(b), Some(e)) = (b.as_object_mut(), extra.as_object()) {
        b.extend(e.clone());
    }
    StreamDiffusionParams::from_json_with(&b.to_string(), &settings()).unwrap()
}

fn frames(s: &mut StreamDiffusion, n: usize) -> Vec<Vec<u8>> {
    (0..n)
        .map(|i| {
            let img = image::open(fixture(&format!("frames/{:03}.png", i % 8)))
                .unwrap()
                .to_rgb8();
            s.process(&Frame::packed(img.as_raw(), 64, 64, PixelFormat::Rgb8).unwrap())
                .unwrap()
                .data
        })
        .collect()
}

fn mean_levels(a: &[Vec<u8>], b: &[Vec<u8>]) -> f64 {
    let (sum, n) = a.iter().zip(b).fold((0.0, 0usize), |(s, n), (x, y)| {
        let d: f64 = x
            .iter()
            .zip(y)
            .map(|(p, q)| (f64::from(*p) - f64::from(*q)).abs())
            .sum();
        (s + d, n + x.len())
    });
    sum / n as f64
}

#[test]
fn a_stream_takes_its_style_from_the_url_and_scale_enabled_weight_type_are_hot() {
    let on = json!({"ip_adapter": {"enabled": true, "scale": 1.0}});
    let mut plain = StreamDiffusion::new(params(json!({})), settings()).unwrap();
    let mut styled = StreamDiffusion::new(params(on.clone()), settings()).unwrap();
    assert!(plain.ip_adapter_scales().is_none());
    let n = styled.ip_adapter_scales().unwrap().len();
    assert_eq!(n, 4, "the tiny SD 1.5 UNet has 4 cross-attention layers");
    let image = styled.conditioning().image.as_ref().unwrap();
    assert_eq!(image.cond.dims(), &[1, 4, 32]);
    let a = frames(&mut plain, 4);
    let b = frames(&mut styled, 4);
    let moved = mean_levels(&a, &b);
    println!("IP-Adapter at scale 1 moves the output {moved:.2} levels");
    assert!(moved > 1.0, "{moved}");

    // Scale 0, hot: exactly the stream without an adapter.
    let zero = params(json!({"ip_adapter": {"enabled": true, "scale": 0.0}}));
    let update = styled.update(zero).unwrap();
    assert!(update.is_hot() && !update.needs_reload(), "{update:?}");
    assert_eq!(styled.ip_adapter_scales().unwrap(), vec![0.0; n].as_slice());
    let mut plain2 = StreamDiffusion::new(params(json!({})), settings()).unwrap();
    let mut zero2 = StreamDiffusion::new(
        params(json!({"ip_adapter": {"enabled": true, "scale": 0.0}})),
        settings(),
    )
    .unwrap();
    assert_eq!(frames(&mut plain2, 3), frames(&mut zero2, 3));

    // weight_type, hot: the layers' scales follow it.
    let update = styled
        .update(params(
            json!({"ip_adapter": {"enabled": true, "scale": 0.8, "weight_type": "ease out"}}),
        ))
        .unwrap();
    assert!(update.is_hot(), "{update:?}");
    assert_eq!(
        styled.ip_adapter_scales().unwrap(),
        layer_scales(n, 0.8, Some("ease out")).as_slice()
    );

    // enabled false, hot: the adapter and its tokens go.
    let update = styled
        .update(params(json!({"ip_adapter": {"enabled": false}})))
        .unwrap();
    assert!(update.is_hot(), "{update:?}");
    assert!(styled.ip_adapter_scales().is_none());
    assert!(styled.conditioning().image.is_none());
}

#[test]
fn a_new_style_url_or_a_host_picture_re_encodes_and_a_bad_url_keeps_the_old_one() {
    let on = json!({"ip_adapter": {"enabled": true}});
    let mut s = StreamDiffusion::new(params(on.clone()), settings()).unwrap();
    let adapter = IpAdapter::load(&adapter_path("sd15"), DType::F32, &Device::Cpu).unwrap();
    let picture = style_picture();
    let want = adapter
        .encode(&picture.rgb, picture.width, picture.height)
        .unwrap();
    let first = s.conditioning().image.clone().unwrap();
    check("URL tokens", &first.cond, &want.cond, 0.0);
    check("negative tokens", &first.uncond, &want.uncond, 0.0);

    // A new URL, hot: re-encoded.
    let mut body = on.clone();
    body["ip_adapter_style_image_url"] = json!(other_style_url());
    let update = s.update(params(body)).unwrap();
    assert!(update.is_hot(), "{update:?}");
    let second = s.conditioning().image.clone().unwrap();
    assert!(abs_err(&second.cond, &first.cond).0 > 1e-3);
    check("negative tokens stay", &second.uncond, &first.uncond, 0.0);

    // A URL that cannot be fetched: refused naming the field, the stream keeps its picture.
    let mut body = on.clone();
    body["ip_adapter_style_image_url"] = json!("data:image/png;base64,bm90IGEgcGljdHVyZQ==");
    let err = s.update(params(body)).unwrap_err().to_string();
    assert!(err.contains("ip_adapter_style_image_url"), "{err}");
    check(
        "kept",
        &s.conditioning().image.clone().unwrap().cond,
        &second.cond,
        0.0,
    );
    let mut body = on.clone();
    body["ip_adapter_style_image_url"] = json!("/etc/passwd");
    let err = s.update(params(body)).unwrap_err().to_string();
    assert!(
        err.contains("ip_adapter_style_image_url") && err.contains("PNG or JPEG"),
        "{err}"
    );
    let err = sdstream::pipeline::style_image::fetch(
        "/etc/passwd",
        sdstream::pipeline::style_image::FetchPolicy::default(),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("local files are not allowed"), "{err}");

    // A picture from the host replaces the URL's, and None goes back to it.
    s.set_style_image(Some(picture.clone())).unwrap();
    check(
        "host tokens",
        &s.conditioning().image.clone().unwrap().cond,
        &want.cond,
        0.0,
    );
    s.set_style_image(None).unwrap();
    check(
        "back to the URL",
        &s.conditioning().image.clone().unwrap().cond,
        &second.cond,
        0.0,
    );
    let bad = StyleImage::from_rgb(vec![0; 10], 2, 2)
        .unwrap_err()
        .to_string();
    assert!(bad.contains("12 bytes"), "{bad}");
}

#[test]
fn the_style_picture_is_fetched_over_http_once() {
    let png = style_png();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let served = std::thread::spawn(move || {
        let mut count = 0;
        // Serves until the test's second stream is built (it must not ask again).
        listener.set_nonblocking(false).unwrap();
        if let Ok((mut conn, _)) = listener.accept() {
            let mut buf = [0u8; 4096];
            let _ = conn.read(&mut buf);
            count += 1;
            let head = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                png.len()
            );
            conn.write_all(head.as_bytes()).unwrap();
            conn.write_all(&png).unwrap();
        }
        count
    });
    let url = format!("http://127.0.0.1:{port}/style.png");
    let body = json!({"ip_adapter": {"enabled": true}, "ip_adapter_style_image_url": url});
    // The picture is served on loopback, which only the LAN setting lets a fetch reach.
    let refused = StreamDiffusion::new(params(body.clone()), settings())
        .unwrap_err()
        .to_string();
    assert!(
        refused.contains("ip_adapter_style_image_url") && refused.contains("could not be fetched"),
        "{refused}"
    );
    let lan = EngineSettings {
        allow_private_network: true,
        ..settings()
    };
    let a = StreamDiffusion::new(params(body.clone()), lan.clone()).unwrap();
    assert_eq!(served.join().unwrap(), 1);
    // The second stream finds the picture in the cache (the server is gone).
    let b = StreamDiffusion::new(params(body), lan.clone()).unwrap();
    check(
        "cached picture",
        &a.conditioning().image.clone().unwrap().cond,
        &b.conditioning().image.clone().unwrap().cond,
        0.0,
    );
    // The server is gone: the stream is refused naming the field, in the words a refused
    // address gets too (why goes to the log).
    let err = StreamDiffusion::new(
        params(json!({"ip_adapter": {"enabled": true},
                       "ip_adapter_style_image_url": format!("http://127.0.0.1:{port}/gone.png")})),
        lan,
    )
    .unwrap_err()
    .to_string();
    assert_eq!(err, refused);
}

#[test]
fn faceid_and_mismatched_checkpoints_are_refused_by_name() {
    let err = StreamDiffusion::new(
        params(json!({"ip_adapter": {"enabled": true, "type": "faceid"}})),
        settings(),
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("ip_adapter.type") && err.contains("InsightFace"),
        "{err}"
    );
    let err = StreamDiffusion::new(
        params(json!({"ip_adapter": {"enabled": true,
            "ipadapter_model_path": "h94/IP-Adapter/sdxl_models/ip-adapter_sdxl.bin"}})),
        settings(),
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("ip_adapter.ipadapter_model_path") && err.contains("SDXL"),
        "{err}"
    );
    let err = StreamDiffusion::new(
        params(json!({"ip_adapter": {"enabled": true,
            "ipadapter_model_path": "h94/IP-Adapter/sdxl_models/ip-adapter-plus_sdxl_vit-h.bin"}})),
        settings(),
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("ip_adapter.ipadapter_model_path") && err.contains("SDXL"),
        "{err}"
    );
    let body = json!({
        "model_id": fixture("tiny-sd15").display().to_string(),
        "prompt": "a cat",
        "ip_adapter": {"enabled": true,
            "ipadapter_model_path": "h94/IP-Adapter/models/ip-adapter-plus_sd14.bin"},
    });
    let err = StreamDiffusionParams::from_json_with(&body.to_string(), &settings())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("ip_adapter.ipadapter_model_path") && err.contains("ip-adapter_sd15.bin"),
        "Daydream's values named: {err}"
    );
}

/// A stream with the Plus checkpoint: 16 image tokens from the style picture, and the output
/// moves away from the stream without the adapter.
#[test]
fn a_stream_runs_the_plus_adapter_named_by_its_path() {
    let on = json!({"ip_adapter": {"enabled": true, "scale": 1.0,
        "ipadapter_model_path": "h94/IP-Adapter/models/ip-adapter-plus_sd15.bin"}});
    let mut plain = StreamDiffusion::new(params(json!({})), settings()).unwrap();
    let mut styled = StreamDiffusion::new(params(on), settings()).unwrap();
    let image = styled.conditioning().image.as_ref().unwrap();
    assert_eq!(image.cond.dims(), &[1, 16, 32]);
    let a = frames(&mut plain, 3);
    let b = frames(&mut styled, 3);
    let moved = mean_levels(&a, &b);
    println!("plus adapter: outputs {moved:.2} levels from the plain stream's");
    assert!(moved > 0.5, "the adapter changes the pictures: {moved}");
}

#[test]
fn an_engine_turns_the_adapter_on_hot_and_takes_the_hosts_picture() {
    use std::time::{Duration, Instant};
    let engine = engine_without_warmup(params(json!({}))).expect("the engine starts");
    let img = image::open(fixture("frames/000.png")).unwrap().to_rgb8();
    let frame = || Frame::packed(img.as_raw(), 64, 64, PixelFormat::Rgb8).unwrap();
    engine.process(frame()).expect("a frame");
    let on = params(json!({"ip_adapter": {"enabled": true, "scale": 0.7}}));
    let update = engine.update_params(on.clone()).expect("accepted");
    assert!(update.is_hot(), "{update:?}");
    let version = engine.status().params_version;
    let deadline = Instant::now() + Duration::from_secs(60);
    while engine.status().serving_params_version != Some(version) {
        engine.process(frame()).expect("frames keep flowing");
        assert!(Instant::now() < deadline, "the adapter never came on");
    }
    assert_eq!(engine.status().restart_count, 0, "hot: no reload");
    assert!(engine.status().last_error.is_none());

    // A host picture handed in between two frames applies to the next one, as in a stream.
    let picture = StyleImage::decode(
        &std::fs::read(fixture("frames/005.png")).unwrap(),
        "frame 5",
    )
    .unwrap();
    let run = |host: bool| -> Vec<Vec<u8>> {
        let engine = engine_without_warmup(params(
            json!({"ip_adapter": {"enabled": true, "scale": 0.7}}),
        ))
        .unwrap();
        let a = engine.process(frame()).unwrap().image.data;
        if host {
            engine.set_style_image(Some(picture.clone()));
        }
        let b = engine.process(frame()).unwrap().image.data;
        assert!(engine.status().last_error.is_none());
        vec![a, b]
    };
    let mut direct = StreamDiffusion::new(
        params(json!({"ip_adapter": {"enabled": true, "scale": 0.7}})),
        settings(),
    )
    .unwrap();
    let a = direct.process(&frame()).unwrap().data;
    direct.set_style_image(Some(picture.clone())).unwrap();
    let b = direct.process(&frame()).unwrap().data;
    let with_host = run(true);
    assert_eq!(
        with_host,
        vec![a, b],
        "Engine = StreamDiffusion, byte for byte"
    );
    let without = run(false);
    assert_eq!(with_host[0], without[0]);
    let moved = mean_levels(&with_host[1..], &without[1..]);
    assert!(
        moved > 0.5,
        "the host's picture changes the output ({moved:.2} levels)"
    );
}

#[test]
fn params_version_never_goes_back_across_refused_style_fetches() {
    use std::time::{Duration, Instant};
    let on = |extra: Value| {
        let mut body = json!({"ip_adapter": {"enabled": true, "scale": 0.7}});
        if let (Some(b), Some(e)) = (body.as_object_mut(), extra.as_object()) {
            b.extend(e.clone());
        }
        params(body)
    };
    // Loopback: refused under the default settings, before any connection.
    let refused = |port: u16| {
        on(json!({"ip_adapter_style_image_url": format!("http://127.0.0.1:{port}/style.png")}))
    };
    let scale = |s: f64| on(json!({"ip_adapter": {"enabled": true, "scale": s}}));
    let engine = engine_without_warmup(on(json!({}))).expect("the engine starts");
    let img = image::open(fixture("frames/000.png")).unwrap().to_rgb8();
    let frame = || Frame::packed(img.as_raw(), 64, 64, PixelFormat::Rgb8).unwrap();
    engine.process(frame()).expect("a frame");
    let mut seen = vec![engine.status().params_version];
    let steps = [
        (refused(1), true),
        (scale(0.5), false),
        (scale(0.6), false),
        (refused(2), true),
    ];
    for (next, fails) in steps {
        let failures = engine.status().reload_failures;
        engine.update_params(next).expect("accepted");
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let s = engine.status();
            seen.push(s.params_version);
            if !s.reloading && s.serving_params_version == Some(s.params_version) {
                break;
            }
            engine.process(frame()).expect("frames keep flowing");
            assert!(Instant::now() < deadline, "the update never settled");
        }
        let status = engine.status();
        assert_eq!(status.reload_failures, failures + u64::from(fails));
        if fails {
            let error = status.last_error.unwrap_or_default();
            assert!(error.contains("could not be fetched"), "{error}");
        }
    }
    seen.dedup();
    println!("params_version as seen: {seen:?}");
    assert!(seen.windows(2).all(|w| w[0] < w[1]), "{seen:?}");
    // Four accepted updates, two reverts.
    assert_eq!(seen.last(), Some(&6), "{seen:?}");
    let status = engine.status();
    assert_eq!(status.last_params["ip_adapter"]["scale"], 0.6);
    assert!(
        status.last_params["ip_adapter_style_image_url"]
            .as_str()
            .is_some_and(|u| u.starts_with("data:")),
        "the picture that serves"
    );
    assert_eq!(engine.process(frame()).expect("serving").params_version, 6);
}
