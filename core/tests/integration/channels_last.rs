//! The UNet and its ControlNets with their maps kept channels-last between layers (kernel policy
//! `channels_last` on every device, `SDSTREAM_CHANNELS_LAST=1`; docs/GPU.md, "Channels last"):
//! the layout a GPU's cuDNN convolutions compute in, the default on CUDA devices. On the CPU
//! the same network code runs with the CPU's channels-last kernels, and with the portable twins
//! (what a GPU runs where sdstream's own CUDA kernels are off); both against the goldens the
//! channels-first networks meet.

use candle_core::{DType, Device};
use sdstream::model::controlnet::ControlNetModel;
use sdstream::model::kernels::{self, ChannelsLast, KernelPolicy};
use sdstream::model::unet::{UNet2DConditionModel, UNetInputs};

use crate::common::{check, fixture, golden, sdxl_unet_conditioning};
use crate::streams::{CASES, CONTROLNET_CASES, Target, check_case_against_golden};

fn channels_last(portable: bool) -> KernelPolicy {
    KernelPolicy {
        channels_last: ChannelsLast::On,
        portable,
        ..KernelPolicy::process()
    }
}

/// The UNet's goldens (per-row timesteps, ControlNet residuals added, and the variant with 1×1
/// projections at an odd size, whose up path upsamples to the skips' sizes) with channels-last
/// maps, on the CPU kernels and on the portable twins.
#[test]
fn channels_last_unet_matches_goldens() {
    for portable in [false, true] {
        channels_last(portable).scoped(|| {
            assert_eq!(kernels::cpu_kernels(&Device::Cpu), !portable);
            let cpu = Device::Cpu;
            let unet = UNet2DConditionModel::load(&fixture("tiny-sd-turbo/unet"), DType::F32, &cpu)
                .expect("load unet");
            assert!(unet.maps_channels_last(), "the layout was not taken");
            let g = golden("golden/unet.safetensors");
            let (sample, t, ctx) = (&g["sample"], &g["timesteps"], &g["encoder_hidden_states"]);
            let out = unet.forward(UNetInputs::new(sample, t, ctx)).unwrap();
            assert_eq!(
                out.dims(),
                sample.dims(),
                "the output leaves channels first"
            );
            check(
                &format!("channels-last unet (portable {portable})"),
                &out,
                &g["output"],
                1e-4,
            );
            let control = crate::common::control_residuals_of(&g);
            let out = unet
                .forward(UNetInputs::new(sample, t, ctx).control(Some(&control)))
                .unwrap();
            check(
                &format!("channels-last unet with residuals (portable {portable})"),
                &out,
                &g["output_control"],
                1e-4,
            );
            // A residual of the wrong shape is refused, naming the channels-first shape the
            // UNet takes.
            let mut wrong = control.clone();
            wrong.mid = wrong.mid.narrow(1, 0, 1).unwrap();
            let err = unet
                .forward(UNetInputs::new(sample, t, ctx).control(Some(&wrong)))
                .expect_err("a one-channel mid residual");
            let expected = format!("{:?}", control.mid.dims());
            assert!(err.to_string().contains(&expected), "{err}");

            let dir = fixture("unet-variants/conv_proj_odd_size");
            let unet = UNet2DConditionModel::load(&dir, DType::F32, &cpu).expect("variant");
            let g = golden("unet-variants/conv_proj_odd_size/io.safetensors");
            let (sample, t, ctx) = (&g["sample"], &g["timesteps"], &g["encoder_hidden_states"]);
            let out = unet.forward(UNetInputs::new(sample, t, ctx)).unwrap();
            check(
                &format!("channels-last unet conv_proj_odd_size (portable {portable})"),
                &out,
                &g["output"],
                1e-4,
            );
        })
    }
}

/// The golden ControlNets (diffusers' residuals for nets a and b) built channels-last, on the
/// CPU kernels and on the portable twins: the residuals leave in the same `[B, C, h, w]` shapes.
#[test]
fn channels_last_controlnets_match_diffusers() {
    let g = golden("golden/controlnet_net.safetensors");
    for portable in [false, true] {
        channels_last(portable).scoped(|| {
            for (name, prefix) in [("tiny-controlnet-a", "a"), ("tiny-controlnet-b", "b")] {
                let net = ControlNetModel::load(&fixture(name), DType::F32, &Device::Cpu)
                    .expect("controlnet");
                assert!(net.maps_channels_last(), "{name}: the layout was not taken");
                let out = net
                    .forward(
                        &g["sample"],
                        &g["timesteps"],
                        &g["encoder_hidden_states"],
                        None,
                        &g["controlnet_cond"],
                    )
                    .expect("residuals");
                assert_eq!(out.down.len(), 12);
                for (i, got) in out.down.iter().enumerate() {
                    let want = &g[&format!("{prefix}_down_{i:02}")];
                    assert_eq!(got.dims(), want.dims(), "{name} down {i}");
                    check(
                        &format!("{name} down {i} (portable {portable})"),
                        got,
                        want,
                        1e-5,
                    );
                }
                check(
                    &format!("{name} mid (portable {portable})"),
                    &out.mid,
                    &g[&format!("{prefix}_mid")],
                    1e-5,
                );
            }
        })
    }
}

/// Every golden stream case (ControlNet streams included) with channels-last networks on the
/// CPU kernels, and the ControlNet cases on the portable twins, against the reference's outputs
/// within the bounds stream.rs holds the channels-first networks to.
#[test]
fn channels_last_streams_match_goldens() {
    channels_last(false).scoped(|| {
        for name in CASES.iter().chain(CONTROLNET_CASES) {
            check_case_against_golden(name, Target::CPU_F32);
        }
    });
    // The portable twins: TAESD and the full VAE channels-last too (the CPU kernels run them
    // so anyway).
    channels_last(true).scoped(|| {
        let cases = ["self_t3", "self_t3_fullvae", "none_t4_fullvae_nonoise"];
        for name in cases.iter().chain(CONTROLNET_CASES) {
            check_case_against_golden(name, Target::CPU_F32);
        }
    });
}

/// SDXL's UNet (a batch of two rows: each image's time embedding added over its own
/// channels-last map) with the reference's added conditioning, and SDXL's ControlNet, built
/// channels-last on the CPU kernels and on the portable twins, against diffusers.
#[test]
fn channels_last_sdxl_networks_match_diffusers() {
    use sdstream::model::unet::AddedConditioning;
    let g = golden("golden/sdxl_conditioning.safetensors");
    let gc = golden("golden/sdxl_controlnet_net.safetensors");
    for portable in [false, true] {
        channels_last(portable).scoped(|| {
            let unet =
                UNet2DConditionModel::load(&fixture("tiny-sdxl/unet"), DType::F32, &Device::Cpu)
                    .expect("the tiny SDXL UNet");
            assert!(unet.maps_channels_last());
            let (context, added) = sdxl_unet_conditioning(&g);
            assert_eq!(g["sample"].dim(0).unwrap(), 2);
            let out = unet
                .forward(
                    UNetInputs::new(&g["sample"], &g["timesteps"], &context).added(Some(&added)),
                )
                .unwrap();
            check(
                &format!("channels-last SDXL UNet (portable {portable})"),
                &out,
                &g["unet_output"],
                1e-4,
            );

            let net =
                ControlNetModel::load(&fixture("tiny-sdxl-controlnet"), DType::F32, &Device::Cpu)
                    .expect("the tiny SDXL ControlNet");
            assert!(net.maps_channels_last());
            let added = AddedConditioning {
                text_embeds: gc["text_embeds"].clone(),
                time_ids: gc["time_ids"].clone(),
            };
            let out = net
                .forward(
                    &gc["sample"],
                    &gc["timesteps"],
                    &gc["encoder_hidden_states"],
                    Some(&added),
                    &gc["controlnet_cond"],
                )
                .unwrap();
            for (i, got) in out.down.iter().enumerate() {
                check(
                    &format!("channels-last SDXL ControlNet down {i} (portable {portable})"),
                    got,
                    &gc[&format!("down_{i:02}")],
                    1e-5,
                );
            }
            check(
                &format!("channels-last SDXL ControlNet mid (portable {portable})"),
                &out.mid,
                &gc["mid"],
                1e-5,
            );
        })
    }
}
