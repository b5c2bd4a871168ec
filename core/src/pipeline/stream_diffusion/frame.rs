//! The frame path: a frame (or tensor) in, through preprocessing, control images, encoding,
//! the denoising steps, decoding and the safety check, to a picture out.
use std::time::{Duration, Instant};

use candle_core::{DType, Tensor};

use crate::frame::{Frame, Image};
use crate::model::unet::UNetInputs;
use crate::pipeline::accepted::check_control_ids;
use crate::pipeline::conditioning::latent_shape;
use crate::pipeline::controlnet::{
    ActiveControlNet, ControlFingerprint, ControlInputs, ControlPreparer, control_conditions,
    control_residuals,
};
use crate::pipeline::cross_stream::UNetCall;
use crate::pipeline::filter::FilterDecision;
use crate::pipeline::image_prompt::ImagePromptState;
use crate::pipeline::stream_batch::GuidanceParams;
use crate::preprocess::networks::Network;
use crate::preprocess::{self, ProcessorInputs};
use crate::status::ProcessorTimes;
use crate::{Error, Result};

use super::{FrameInput, SafetyFrame, StreamDiffusion, TensorInput};

impl StreamDiffusion {
    /// One frame in, one frame out, in the input's pixel format at width × height. Takes a
    /// `&Frame`, or a [`FrameInput`] that also carries control images for `external`
    /// ControlNets and control images made ahead.
    pub fn process<'a>(&mut self, input: impl Into<FrameInput<'a>>) -> Result<Image> {
        let _policy = self.kernels.enter();
        let FrameInput {
            frame,
            controls,
            prepared,
            arrived,
        } = input.into();
        let came_in = Instant::now();
        self.report.activity.frame_in(came_in);
        self.arrival = Some(arrived.unwrap_or(came_in));
        let prepared = prepared.filter(|p| {
            p.follows == self.inputs_taken
                && Some(&p.fingerprint) == ControlFingerprint::of(&self.params).as_ref()
        });
        self.prepared = prepared;
        let result = self.run_frame(frame, controls);
        self.prepared = None;
        self.arrival = None;
        let activity = &mut self.report.activity;
        match &result {
            Ok(_) => {
                let now = Instant::now();
                activity.frame_out(now, self.timings, now.saturating_duration_since(came_in));
            }
            Err(e) => activity.frame_failed(Instant::now(), format!("a frame failed: {e}")),
        }
        result
    }

    /// What makes the control images of the frame that follows `current` on another thread,
    /// while this stream diffuses `current` ([`ControlPreparer::prepare`], then
    /// [`FrameInput::prepared`]); `None` when the parameters have no
    /// preprocessor that can run ahead. Costs one conversion of `current`.
    pub fn control_preparer(&self, current: &Frame) -> Result<Option<ControlPreparer>> {
        let Some(fingerprint) = ControlFingerprint::of(&self.params) else {
            return Ok(None);
        };
        let (width, height) = self.stream_size();
        let previous = to_unit(&current.to_tensor(width, height, &self.models.device)?)?;
        Ok(Some(ControlPreparer {
            fingerprint,
            networks: self.networks.clone(),
            device: self.models.device.clone(),
            previous_input: Some(previous),
            follows: self.inputs_taken + 1,
            made: crate::model::kernels::QueuedWork::mark(&self.models.device)?,
        }))
    }

    fn run_frame(&mut self, frame: &Frame, controls: &[(&str, &Frame)]) -> Result<Image> {
        let start = Instant::now();
        let (width, height) = self.stream_size();
        let x = frame.to_tensor(width, height, &self.models.device)?;
        let mut images = Vec::with_capacity(controls.len());
        for (id, control) in controls {
            let t = control.to_tensor(width, height, &self.models.device)?;
            images.push((*id, t));
        }
        self.sync_stage()?;
        let preprocess = start.elapsed();
        let images: Vec<(&str, &Tensor)> = images.iter().map(|(id, t)| (*id, t)).collect();
        let out = self.process_tensor(TensorInput::new(&x).controls(&images))?;
        let post = Instant::now();
        let image = Image::from_tensor(&out, frame.format())?;
        self.timings.preprocess = preprocess;
        self.timings.postprocess = post.elapsed();
        self.timings.total = start.elapsed();
        Ok(image)
    }

    /// The tensor path: `x` is `[1, 3, H, W]` in [−1, 1] at the stream's size (as
    /// [`Frame::to_tensor`] makes it), and so is every control image of a [`TensorInput`];
    /// returns the output `[1, 3, H, W]` in [0, 1] (f32).
    pub fn process_tensor<'a>(&mut self, input: impl Into<TensorInput<'a>>) -> Result<Tensor> {
        let input = input.into();
        self.handed(|stream| stream.process_tensor_here(input))
    }

    fn process_tensor_here(&mut self, input: TensorInput<'_>) -> Result<Tensor> {
        let _policy = self.kernels.enter();
        // The frame's arrival: the call's, or that of the `process` call that converted it.
        let started = Instant::now();
        let arrival = self.arrival.take().unwrap_or(started);
        self.pacing.arrived(arrival);
        let budget = self.settings.frame_budget().or(self.pacing.interval);
        self.deadline = budget.map(|b| arrival + b);
        let result = self.process_tensor_due(input);
        self.deadline = None;
        if let (Ok(_), Some(member)) = (&result, &self.batch) {
            // The frame's own work besides its UNet call (not the time it queued before).
            let other_work = started.elapsed().saturating_sub(self.timings.unet);
            // Admission holds streams to budgets someone set; the spacing of the input frames
            // orders the scheduler's work, but it would refuse every stream past the first
            // on a machine that serves one at its input rate.
            member.frame_done(
                self.settings.frame_budget(),
                other_work,
                self.timings.controlnet,
                self.timings.encode + self.timings.decode,
            );
        }
        result
    }

    fn process_tensor_due<'a>(&mut self, input: impl Into<TensorInput<'a>>) -> Result<Tensor> {
        let TensorInput { x, controls } = input.into();
        let (width, height) = self.stream_size();
        let expected = [1, 3, height, width];
        if x.dims() != expected {
            return Err(Error::InvalidFrame(format!(
                "expected a [1, 3, {height}, {width}] tensor, got {:?}",
                x.dims()
            )));
        }
        // Check every control image before keeping any, so an error changes nothing.
        let mut fresh = Vec::with_capacity(controls.len());
        check_control_ids(&self.params, controls.iter().map(|(id, _)| *id))?;
        for (id, image) in controls {
            if image.dims() != expected {
                return Err(Error::InvalidFrame(format!(
                    "control image for {id:?}: expected a [1, 3, {height}, {width}] tensor, got {:?}",
                    image.dims()
                )));
            }
            fresh.push((id.to_string(), to_unit(image)?));
        }
        self.external_controls.extend(fresh);
        self.timings.processors = ProcessorTimes::default();
        let x = &self.image_preprocessing(x)?;
        if self.params.skip_diffusion {
            return self.pass_through(x);
        }
        if let Some((filter, rng)) = &mut self.filter {
            let u = f64::from(rng.rand(1)[0]);
            if filter.decide(x, u)? == FilterDecision::Skip
                && let Some(previous) = &self.previous_output
            {
                // The previous output again, with its verdict (no second check); no network
                // runs, which the batch scheduler must know not to wait for this stream.
                if let Some(member) = &self.batch {
                    member.frame_skipped();
                }
                self.timings.safety.checked = false;
                return Ok(if self.timings.safety.flagged {
                    previous.zeros_like()?
                } else {
                    previous.clone()
                });
            }
        }
        self.advance_transition()?;
        let tc = Instant::now();
        let unit_input = to_unit(x)?;
        let frame = ControlInputs {
            external_controls: &self.external_controls,
            previous_output: self.previous_output.as_ref(),
            previous_input: self.previous_input.as_ref(),
            networks: &self.networks,
        };
        let prepared = self.prepared.take();
        let conds = control_conditions(
            &self.params,
            &self.controlnets,
            &frame,
            Some(&unit_input),
            prepared.as_ref(),
            &mut self.timings.processors,
        )?;
        self.sync_stage()?;
        let control_prep = tc.elapsed();
        let x = x.to_dtype(self.models.dtype)?;
        let t0 = Instant::now();
        let z = match &self.batch {
            Some(member) => {
                let features = member.encode_features(&self.models, &x, self.deadline)?;
                self.models.autoencoder.latent_from_features(
                    &features,
                    x.dtype(),
                    &mut self.generator,
                )?
            }
            None => self.models.autoencoder.encode(&x, &mut self.generator)?,
        };
        let x_new = self.state.add_first_noise(&z)?;
        let x_new = self.latent_pre.apply(
            &x_new,
            self.previous_latent.as_ref(),
            &mut self.timings.processors,
        )?;
        self.sync_stage()?;
        let encode = t0.elapsed();
        let x0 = self.denoise(&x_new, &conds)?;
        let x0 = self.latent_postprocessing(&x0)?;
        self.timings.controlnet += control_prep;
        let t1 = Instant::now();
        let image = self.decode(&x0)?;
        let out = crate::pipeline::stream_batch::to_unit_range(&image.to_dtype(DType::F32)?)?;
        let out = self.image_postprocessing(&out)?;
        let shown = self.safety_check(&out)?;
        self.sync_stage()?;
        self.timings.encode = encode;
        self.timings.decode = t1.elapsed();
        // Feedback and the filter's repeats see the generated picture, as Daydream's
        // `prev_image_result` (its checker runs on the way out).
        self.previous_output = Some(out);
        self.previous_input = Some(unit_input);
        self.inputs_taken += 1;
        Ok(shown)
    }

    /// `skip_diffusion`: the preprocessed frame `x` (in [−1, 1]) is the output, as Daydream's
    /// processors-only path makes it: mapped to [0, 1] and clamped there, then
    /// `image_postprocessing` and the safety checker (when on; Daydream's path leaves it out).
    /// No similar-image filter, ControlNet, encode, denoising or decode runs, and no random
    /// number is drawn.
    fn pass_through(&mut self, x: &Tensor) -> Result<Tensor> {
        let unit_input = to_unit(x)?;
        let out = self.image_postprocessing(&unit_input.clamp(0f32, 1f32)?)?;
        let shown = self.safety_check(&out)?;
        self.previous_output = Some(out);
        self.previous_input = Some(unit_input);
        self.inputs_taken += 1;
        Ok(shown)
    }

    /// Runs the safety checker (when on) on an output in [0, 1]: black in its place when
    /// flagged; records the verdict and the time.
    fn safety_check(&mut self, out: &Tensor) -> Result<Tensor> {
        let Some(net) = &self.safety_checker else {
            self.timings.safety = SafetyFrame::default();
            return Ok(out.clone());
        };
        let Network::SafetyChecker(checker) = net.as_ref() else {
            return Err(Error::State(
                "the safety checker slot holds another network".into(),
            ));
        };
        let start = Instant::now();
        let verdict = checker.check(out, self.params.safety_checker_threshold)?;
        self.timings
            .processors
            .add(preprocess::SAFETY_CHECKER, start.elapsed());
        self.timings.safety = SafetyFrame {
            checked: true,
            flagged: verdict.flagged,
            max_concept_score: verdict.max_concept_score(),
        };
        if verdict.flagged {
            Ok(out.zeros_like()?)
        } else {
            Ok(out.clone())
        }
    }

    /// Runs `image_preprocessing` on an input `[1, 3, H, W]` in [−1, 1]: the chain works in
    /// [0, 1] (see [`crate::preprocess`]), `feedback` blends with the previous output. It runs
    /// before the similar-image filter, so the filter compares processed frames (Daydream
    /// preprocesses before the stream sees the frame).
    fn image_preprocessing(&mut self, x: &Tensor) -> Result<Tensor> {
        let chain = self.params.image_preprocessing.as_ref();
        if !preprocess::chain_is_active(chain) {
            return Ok(x.clone());
        }
        let mut times = self.timings.processors;
        let processed = preprocess::apply_chain(
            chain,
            &x.affine(0.5, 0.5)?,
            &self.chain_inputs(),
            &mut times,
        );
        self.timings.processors = times;
        Ok(processed?.affine(2.0, -1.0)?)
    }

    /// What the processors of the chains read besides the image.
    fn chain_inputs(&self) -> ProcessorInputs<'_> {
        ProcessorInputs {
            previous_output: self.previous_output.as_ref(),
            previous_input: self.previous_input.as_ref(),
            external: None,
            networks: Some(&self.networks),
        }
    }

    /// Runs `image_postprocessing` on a decoded output in [0, 1]; what it returns is the
    /// stream's output (and the previous output `feedback` sees next).
    fn image_postprocessing(&mut self, out: &Tensor) -> Result<Tensor> {
        let mut times = self.timings.processors;
        let result = preprocess::apply_chain(
            self.params.image_postprocessing.as_ref(),
            out,
            &self.chain_inputs(),
            &mut times,
        );
        self.timings.processors = times;
        result
    }

    /// Text-to-image: one stream step from a fresh latent drawn from the stream's generator
    /// (the reference draws it from torch's global generator, which no seed controls).
    pub fn txt2img(&mut self) -> Result<Tensor> {
        self.refuse_txt2img_without_diffusion()?;
        let (c, h, w) = latent_shape(&self.models, &self.params);
        let latent = self
            .generator
            .randn_tensor(&[1, c, h, w], &self.models.device)?
            .to_dtype(self.models.dtype)?;
        self.txt2img_from(&latent)
    }

    /// Text-to-image from a given starting latent `[1, C, h, w]`, used as is (no a₀/b₀ mixing,
    /// as the reference).
    ///
    /// Only `external` ControlNets act here (the others derive their image from an input frame).
    pub fn txt2img_from(&mut self, latent: &Tensor) -> Result<Tensor> {
        self.handed(|stream| stream.txt2img_here(latent))
    }

    fn txt2img_here(&mut self, latent: &Tensor) -> Result<Tensor> {
        self.refuse_txt2img_without_diffusion()?;
        let _policy = self.kernels.enter();
        self.advance_transition()?;
        let frame = ControlInputs {
            external_controls: &self.external_controls,
            previous_output: self.previous_output.as_ref(),
            previous_input: self.previous_input.as_ref(),
            networks: &self.networks,
        };
        let conds = control_conditions(
            &self.params,
            &self.controlnets,
            &frame,
            None,
            None,
            &mut self.timings.processors,
        )?;
        let x0 = self.denoise(latent, &conds)?;
        let x0 = self.latent_postprocessing(&x0)?;
        let image = self.decode(&x0)?;
        let out = crate::pipeline::stream_batch::to_unit_range(&image.to_dtype(DType::F32)?)?;
        self.safety_check(&out)
    }

    /// Decodes x̂₀, in a batch with other streams' latents where the stream shares its
    /// networks. Text-to-image decodes there too (with no deadline, so nothing waits for it):
    /// after a UNet call in a shared batch, the other streams' decode batch expects this
    /// stream's decode, and waited for it (one decode's time) when it went elsewhere.
    fn decode(&self, x0: &Tensor) -> Result<Tensor> {
        match &self.batch {
            Some(member) => member.decode(&self.models, x0, self.deadline),
            None => Ok(self.models.autoencoder.decode(x0)?),
        }
    }

    /// Text-to-image has no input frame for `skip_diffusion` to pass through (Daydream
    /// refuses it too).
    fn refuse_txt2img_without_diffusion(&self) -> Result<()> {
        if self.params.skip_diffusion {
            return Err(Error::param(
                "skip_diffusion",
                "skip_diffusion passes input frames through the image processors; text-to-image \
                 has no input frame (turn skip_diffusion off to generate from text)",
            ));
        }
        Ok(())
    }

    /// Runs `latent_postprocessing` on x̂₀ and keeps the result as the previous latent (what
    /// Daydream keeps as `prev_latent_result`, after its post hooks).
    fn latent_postprocessing(&mut self, x0: &Tensor) -> Result<Tensor> {
        let x0 = self.latent_post.apply(
            x0,
            self.previous_latent.as_ref(),
            &mut self.timings.processors,
        )?;
        self.previous_latent = Some(x0.clone());
        Ok(x0)
    }

    /// Moves the glides in progress one frame on (a frame the similar-image filter skips does
    /// not count).
    fn advance_transition(&mut self) -> Result<()> {
        if let Some(glide) = &mut self.prompt_glide {
            let (mut values, last) = glide.advance()?;
            if let Some(added) = &mut self.conditioning.added
                && values.len() == 2
            {
                added.cond = values.pop().expect("two values");
            }
            self.conditioning.cond = values.remove(0);
            if last {
                self.prompt_glide = None;
            }
        }
        if let Some(glide) = &mut self.noise_glide {
            let (mut values, last) = glide.advance()?;
            self.state.set_init_noise(values.remove(0))?;
            if last {
                self.noise_glide = None;
            }
        }
        Ok(())
    }

    /// Runs the stream batch on a noised latent and returns x̂₀ of the row that leaves it.
    fn denoise(&mut self, x_new: &Tensor, controls: &[ActiveControlNet]) -> Result<Tensor> {
        let t = Instant::now();
        let guidance = GuidanceParams {
            mode: self.settings.cfg_type,
            scale: self.params.guidance_scale,
            delta: self.params.delta,
        };
        let models = &self.models;
        let generator = &mut self.generator;
        let renoise = &mut self.renoise;
        let mut bank = self.attention_bank.as_mut();
        let image = self.image_prompt.as_ref().map(ImagePromptState::unet_input);
        // Calls with cached attention or an image prompt carry per-stream state into the
        // network: they run on their own.
        let batch = match (&self.batch, &bank, &image) {
            (Some(member), None, None) => Some(member),
            _ => None,
        };
        let deadline = self.deadline;
        // ControlNets read no per-stream state but the text, so their calls batch across
        // streams even where the UNet call runs alone.
        let shared_controls = self.batch.as_ref().map(|member| (member, models, deadline));
        let steps = self.params.t_index_list.len();
        let sync = |device: &candle_core::Device| -> Result<()> {
            if self.stage_sync {
                device.synchronize()?;
            }
            Ok(())
        };
        let mut control_time = Duration::ZERO;
        let x0 = self.state.step(
            x_new,
            &self.conditioning,
            guidance,
            |x, t, e, added, rows| {
                let tc = Instant::now();
                // ControlNets read the text alone (Daydream's CNAttnProcessor).
                let text = match image {
                    Some(image) => e.narrow(1, 0, e.dim(1)? - image.tokens)?,
                    None => e.clone(),
                };
                let residuals =
                    control_residuals(controls, x, t, &text, added, rows, steps, shared_controls)?;
                if residuals.is_some() {
                    sync(&models.device)?;
                }
                control_time += tc.elapsed();
                if let Some(member) = batch {
                    let call = UNetCall {
                        sample: x.clone(),
                        timesteps: t.clone(),
                        text: e.clone(),
                        added: added.cloned(),
                        control: residuals,
                    };
                    return member.forward(models, call, deadline);
                }
                models.unet.forward(
                    UNetInputs::new(x, t, e)
                        .added(added)
                        .control(residuals.as_ref())
                        .bank(bank.as_deref_mut())
                        .image(image),
                )
            },
            |shape| match renoise.as_mut() {
                Some(source) => source(shape),
                None => Ok(generator.randn_tensor(shape, &models.device)?),
            },
        )?;
        sync(&models.device)?;
        self.timings.unet = t.elapsed().saturating_sub(control_time);
        self.timings.controlnet = control_time;
        Ok(x0)
    }
}

/// [−1, 1] → [0, 1] in f32 (control images live in [0, 1]).
pub(super) fn to_unit(x: &Tensor) -> Result<Tensor> {
    Ok(((x.to_dtype(DType::F32)? + 1.0)? / 2.0)?)
}
