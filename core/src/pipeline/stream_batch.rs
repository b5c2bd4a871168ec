//! The stream batch: StreamDiffusion's per-frame latent arithmetic (docs/ALGORITHM.md §2–§4), with
//! the UNet abstracted as a closure so the state machine can be tested on its own.
//!
//! Rows: with n denoising steps the batch holds n latents, row i at timestep t_i; a new frame
//! enters at row 0 and leaves, denoised, from row n − 1 after n − 1 further calls. Only
//! `frame_buffer_size = 1` is supported, as in Daydream (the reference's arithmetic assumes it).

use candle_core::{DType, Device, Tensor};

use crate::model::ip_adapter::ImageTokens;
use crate::model::unet::AddedConditioning;
use crate::params::CfgType;
use crate::{Error, Result};

/// Per-step coefficients of the selected timesteps, each a `[n, 1, 1, 1]` tensor in the stream
/// dtype, plus the timestep vector `[n]` the UNet sees.
#[derive(Debug, Clone)]
pub struct StepTensors {
    /// Timesteps t_i as f32, `[n]`.
    pub timesteps: Tensor,
    /// √ᾱ_t per row.
    pub alpha: Tensor,
    /// √(1 − ᾱ_t) per row.
    pub beta: Tensor,
    /// LCM boundary-condition c_skip per row.
    pub c_skip: Tensor,
    /// LCM boundary-condition c_out per row.
    pub c_out: Tensor,
    /// √ᾱ of the next row, with 1 for the last row (the stock-noise update's a_{i+1}).
    pub alpha_next: Tensor,
    /// √(1 − ᾱ) of the next row, with 1 for the last row.
    pub beta_next: Tensor,
}

impl StepTensors {
    /// Builds the tensors from per-step scalars (computed in f32 by the scheduler, so that
    /// c_skip stays representable even when the stream runs in f16).
    pub fn new(
        timesteps: &[f32],
        alpha: &[f32],
        beta: &[f32],
        c_skip: &[f32],
        c_out: &[f32],
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let n = timesteps.len();
        if [alpha.len(), beta.len(), c_skip.len(), c_out.len()]
            .iter()
            .any(|&l| l != n)
            || n == 0
        {
            return Err(Error::State(format!(
                "step coefficients must all have the same non-zero length (timesteps: {n})"
            )));
        }
        let col = |v: &[f32]| -> Result<Tensor> {
            Ok(Tensor::from_slice(v, (v.len(), 1, 1, 1), device)?.to_dtype(dtype)?)
        };
        let shifted = |v: &[f32]| -> Vec<f32> { v[1..].iter().copied().chain([1.0]).collect() };
        Ok(Self {
            timesteps: Tensor::from_slice(timesteps, n, device)?,
            alpha: col(alpha)?,
            beta: col(beta)?,
            c_skip: col(c_skip)?,
            c_out: col(c_out)?,
            alpha_next: col(&shifted(alpha))?,
            beta_next: col(&shifted(beta))?,
        })
    }

    /// Number of denoising steps n.
    pub fn len(&self) -> usize {
        self.timesteps.dims1().unwrap_or(0)
    }

    /// True when there are no steps (never the case for a built stream).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// x̂₀ = c_out·(x − β·ε)/α + c_skip·x, for all rows or for row `idx` only.
    fn denoise(&self, eps: &Tensor, x: &Tensor, idx: Option<usize>) -> Result<Tensor> {
        let pick = |t: &Tensor| -> Result<Tensor> {
            Ok(match idx {
                Some(i) => t.narrow(0, i, 1)?,
                None => t.clone(),
            })
        };
        let (alpha, beta) = (pick(&self.alpha)?, pick(&self.beta)?);
        let (c_skip, c_out) = (pick(&self.c_skip)?, pick(&self.c_out)?);
        let f_theta = x.sub(&eps.broadcast_mul(&beta)?)?.broadcast_div(&alpha)?;
        Ok(f_theta
            .broadcast_mul(&c_out)?
            .add(&x.broadcast_mul(&c_skip)?)?)
    }
}

/// Text conditioning of the stream, already laid out for the UNet batch.
#[derive(Debug, Clone)]
pub struct Conditioning {
    /// Positive prompt embedding `[1, 77, D]`.
    pub cond: Tensor,
    /// Negative prompt embedding `[1, 77, D]`.
    pub uncond: Tensor,
    /// SDXL's added conditioning; `None` for SD 1.5/2.1.
    pub added: Option<AddedText>,
    /// IP-Adapter's image tokens `[1, T, D]` of the prompt's rows and the negative prompt's,
    /// appended to the text tokens of each row (Daydream's layout); `None` without an adapter.
    pub image: Option<ImageTokens>,
}

/// SDXL's added conditioning of a stream: each UNet row gets the pooled embedding of the text
/// whose embedding it carries, and every row the stream's time ids.
#[derive(Debug, Clone)]
pub struct AddedText {
    /// The prompt's pooled embedding `[1, P]`.
    pub cond: Tensor,
    /// The negative prompt's pooled embedding `[1, P]`.
    pub uncond: Tensor,
    /// `[1, 6]`: original size, crop corner, target size.
    pub time_ids: Tensor,
}

/// Guidance settings that may change between frames without touching the buffers.
#[derive(Debug, Clone, Copy)]
pub struct GuidanceParams {
    /// The CFG mode.
    pub mode: CfgType,
    /// g; `CfgType::None` always behaves as g = 1.
    pub scale: f64,
    /// δ, the residual noise multiplier.
    pub delta: f64,
}

impl GuidanceParams {
    /// Whether guidance is in effect (g > 1 and a mode other than none).
    pub fn active(&self) -> bool {
        self.mode != CfgType::None && self.scale > 1.0
    }
}

/// The evolving state of one stream: noise, stock noise, latent buffer.
#[derive(Debug, Clone)]
pub struct StreamState {
    /// Denoise all steps in one UNet batch (true) or one after another.
    pub use_denoising_batch: bool,
    /// Re-noise the buffered latents between steps.
    pub do_add_noise: bool,
    steps: StepTensors,
    init_noise: Tensor,
    stock_noise: Tensor,
    buffer: Option<Tensor>,
}

impl StreamState {
    /// A fresh stream over `init_noise` `[B, C, h, w]` (B = n in batch mode, 1 otherwise):
    /// zero latent buffer and stock noise, as the reference's `prepare`.
    pub fn new(
        steps: StepTensors,
        init_noise: Tensor,
        use_denoising_batch: bool,
        do_add_noise: bool,
    ) -> Result<Self> {
        let n = steps.len();
        let rows = if use_denoising_batch { n } else { 1 };
        let (b, c, h, w) = init_noise.dims4()?;
        if b != rows {
            return Err(Error::State(format!(
                "init_noise has {b} rows, the stream needs {rows} ({n} steps)"
            )));
        }
        let stock_noise = init_noise.zeros_like()?;
        // Only the batch path reads the buffer (the reference allocates it in both).
        let buffer = if n > 1 && use_denoising_batch {
            Some(Tensor::zeros(
                (n - 1, c, h, w),
                init_noise.dtype(),
                init_noise.device(),
            )?)
        } else {
            None
        };
        Ok(Self {
            use_denoising_batch,
            do_add_noise,
            steps,
            init_noise,
            stock_noise,
            buffer,
        })
    }

    /// The step coefficients in use.
    pub fn steps(&self) -> &StepTensors {
        &self.steps
    }

    /// Replaces the step coefficients of a same-length t_index_list or a new step count; the
    /// buffers keep streaming.
    pub fn set_steps(&mut self, steps: StepTensors) -> Result<()> {
        if steps.len() != self.steps.len() {
            return Err(Error::State(format!(
                "set_steps keeps the batch size: {} steps in use, {} given",
                self.steps.len(),
                steps.len()
            )));
        }
        self.steps = steps;
        Ok(())
    }

    /// Replaces the base noise (a new seed or seed blend); the stock noise restarts at zero.
    pub fn set_init_noise(&mut self, init_noise: Tensor) -> Result<()> {
        if init_noise.dims() != self.init_noise.dims() {
            return Err(Error::State(format!(
                "init_noise shape {:?} does not match the stream's {:?}",
                init_noise.dims(),
                self.init_noise.dims()
            )));
        }
        self.stock_noise = init_noise.zeros_like()?;
        self.init_noise = init_noise;
        Ok(())
    }

    /// The current base noise `[B, C, h, w]`.
    pub fn init_noise(&self) -> &Tensor {
        &self.init_noise
    }

    /// Noises an encoded frame to the first step: x = α₀·z + β₀·init_noise[0].
    pub fn add_first_noise(&self, z: &Tensor) -> Result<Tensor> {
        let a0 = self.steps.alpha.narrow(0, 0, 1)?;
        let b0 = self.steps.beta.narrow(0, 0, 1)?;
        let noise0 = self.init_noise.narrow(0, 0, 1)?;
        Ok(z.broadcast_mul(&a0)?.add(&noise0.broadcast_mul(&b0)?)?)
    }

    /// One frame through the stream (the reference's `predict_x0_batch`): takes the noised new
    /// latent `[1, C, h, w]`, returns the denoised latent x̂₀ `[1, C, h, w]` that leaves the batch.
    ///
    /// `unet(x, t, embeddings, steps)` runs the network; `steps[r]` is the denoising step (the
    /// index into t_index_list) that row r of `x` belongs to, for per-step conditioning such as
    /// a ControlNet's guidance window. `renoise` draws fresh noise for the non-batch path.
    pub fn step<U>(
        &mut self,
        x_new: &Tensor,
        cond: &Conditioning,
        guidance: GuidanceParams,
        mut unet: U,
        mut renoise: impl FnMut(&[usize]) -> Result<Tensor>,
    ) -> Result<Tensor>
    where
        U: FnMut(&Tensor, &Tensor, &Tensor, Option<&AddedConditioning>, &[usize]) -> Result<Tensor>,
    {
        let n = self.steps.len();
        if self.use_denoising_batch {
            let x = match &self.buffer {
                Some(buffer) => {
                    self.stock_noise = Tensor::cat(
                        &[
                            self.init_noise.narrow(0, 0, 1)?,
                            self.stock_noise.narrow(0, 0, n - 1)?,
                        ],
                        0,
                    )?;
                    Tensor::cat(&[x_new, buffer], 0)?
                }
                None => x_new.clone(),
            };
            let t = self.steps.timesteps.clone();
            let x0 = self.unet_step(&x, &t, None, cond, guidance, &mut unet)?;
            if n > 1 {
                let a_next = self.steps.alpha.narrow(0, 1, n - 1)?;
                let mut buffer = x0.narrow(0, 0, n - 1)?.broadcast_mul(&a_next)?;
                if self.do_add_noise {
                    let b_next = self.steps.beta.narrow(0, 1, n - 1)?;
                    let noise = self.init_noise.narrow(0, 1, n - 1)?;
                    buffer = buffer.add(&noise.broadcast_mul(&b_next)?)?;
                }
                self.buffer = Some(buffer);
                Ok(x0.narrow(0, n - 1, 1)?)
            } else {
                Ok(x0)
            }
        } else {
            // The reference overwrites init_noise with the incoming noised latent here, so the
            // next frame is noised with this one's latent; kept for parity.
            self.init_noise = x_new.clone();
            let mut x = x_new.clone();
            let mut x0 = x.clone();
            for idx in 0..n {
                let t = self.steps.timesteps.narrow(0, idx, 1)?;
                x0 = self.unet_step(&x, &t, Some(idx), cond, guidance, &mut unet)?;
                if idx + 1 < n {
                    let a = self.steps.alpha.narrow(0, idx + 1, 1)?;
                    x = x0.broadcast_mul(&a)?;
                    if self.do_add_noise {
                        let b = self.steps.beta.narrow(0, idx + 1, 1)?;
                        let noise = renoise(x0.dims())?.to_dtype(x0.dtype())?;
                        x = x.add(&noise.broadcast_mul(&b)?)?;
                    }
                }
            }
            Ok(x0)
        }
    }

    /// The reference's `unet_step`: guidance layout, UNet call, RCFG, scheduler step and the
    /// stock-noise update. Returns x̂₀ for the rows of `x`.
    fn unet_step<U>(
        &mut self,
        x: &Tensor,
        t: &Tensor,
        idx: Option<usize>,
        cond: &Conditioning,
        guidance: GuidanceParams,
        unet: &mut U,
    ) -> Result<Tensor>
    where
        U: FnMut(&Tensor, &Tensor, &Tensor, Option<&AddedConditioning>, &[usize]) -> Result<Tensor>,
    {
        let rows = x.dim(0)?;
        let active = guidance.active();
        // Rows of the negative and the positive text, in the order the guidance lays them out.
        let layout = |positive: &Tensor, negative: &Tensor| -> Result<Tensor> {
            let repeat = |e: &Tensor, k: usize| -> Result<Tensor> {
                let mut reps = vec![1; e.rank()];
                reps[0] = k;
                Ok(e.repeat(reps.as_slice())?)
            };
            Ok(match (active, guidance.mode) {
                (true, CfgType::Initialize) => {
                    Tensor::cat(&[negative, &repeat(positive, rows)?], 0)?
                }
                (true, CfgType::Full) => {
                    Tensor::cat(&[repeat(negative, rows)?, repeat(positive, rows)?], 0)?
                }
                _ => repeat(positive, rows)?,
            })
        };
        let embeds = match &cond.image {
            Some(image) => Tensor::cat(
                &[
                    layout(&cond.cond, &cond.uncond)?,
                    layout(&image.cond, &image.uncond)?,
                ],
                1,
            )?,
            None => layout(&cond.cond, &cond.uncond)?,
        };
        let added = match &cond.added {
            Some(added) => {
                let text_embeds = layout(&added.cond, &added.uncond)?;
                let time_ids = added.time_ids.repeat((text_embeds.dim(0)?, 1))?;
                Some(AddedConditioning {
                    text_embeds,
                    time_ids,
                })
            }
            None => None,
        };
        let (x_in, t_in) = match (active, guidance.mode) {
            (true, CfgType::Initialize) => (
                Tensor::cat(&[&x.narrow(0, 0, 1)?, x], 0)?,
                Tensor::cat(&[&t.narrow(0, 0, 1)?, t], 0)?,
            ),
            (true, CfgType::Full) => (Tensor::cat(&[x, x], 0)?, Tensor::cat(&[t, t], 0)?),
            _ => (x.clone(), t.clone()),
        };
        // The step of every row of x: one row per step, or the single step `idx`.
        let steps: Vec<usize> = match idx {
            Some(i) => vec![i; rows],
            None => (0..rows).collect(),
        };
        let row_steps: Vec<usize> = match (active, guidance.mode) {
            (true, CfgType::Initialize) => std::iter::once(steps[0]).chain(steps).collect(),
            (true, CfgType::Full) => steps.iter().chain(&steps).copied().collect(),
            _ => steps,
        };
        let pred = unet(&x_in, &t_in, &embeds, added.as_ref(), &row_steps)?;
        let (eps_text, eps_uncond) = match (active, guidance.mode) {
            (true, CfgType::Initialize) => {
                let first = pred.narrow(0, 0, 1)?;
                self.stock_noise = if self.stock_noise.dim(0)? > 1 {
                    let rest = self.stock_noise.dim(0)? - 1;
                    Tensor::cat(&[first, self.stock_noise.narrow(0, 1, rest)?], 0)?
                } else {
                    first
                };
                let uncond = (&self.stock_noise * guidance.delta)?;
                (pred.narrow(0, 1, rows)?, Some(uncond))
            }
            (true, CfgType::Full) => (pred.narrow(0, rows, rows)?, Some(pred.narrow(0, 0, rows)?)),
            (true, CfgType::SelfNegative) => (pred, Some((&self.stock_noise * guidance.delta)?)),
            _ => (pred, None),
        };
        let eps = match eps_uncond {
            Some(u) => (&u + ((&eps_text - &u)? * guidance.scale)?)?,
            None => eps_text,
        };
        let x0 = self.steps.denoise(&eps, x, idx)?;
        if self.use_denoising_batch
            && matches!(guidance.mode, CfgType::SelfNegative | CfgType::Initialize)
        {
            let n = self.steps.len();
            let scaled = self.stock_noise.broadcast_mul(&self.steps.beta)?;
            let delta_x = self
                .steps
                .denoise(&eps, &scaled, None)?
                .broadcast_mul(&self.steps.alpha_next)?
                .broadcast_div(&self.steps.beta_next)?;
            let rolled = if n > 1 {
                Tensor::cat(
                    &[
                        self.init_noise.narrow(0, 1, n - 1)?,
                        self.init_noise.narrow(0, 0, 1)?,
                    ],
                    0,
                )?
            } else {
                self.init_noise.clone()
            };
            self.stock_noise = (rolled + delta_x)?;
        }
        Ok(x0)
    }
}

/// Maps a decoded image in [−1, 1] to [0, 1] as the reference's postprocessing does.
pub fn to_unit_range(x: &Tensor) -> Result<Tensor> {
    Ok(((x / 2.0)? + 0.5)?.clamp(0f32, 1f32)?)
}
