//! The calls a batcher takes (the UNet's, a ControlNet's, the autoencoder's), what makes calls
//! of several streams fit one batch ([`BatchKind`]), and how their rows are joined into one call
//! and handed back.

use std::sync::Arc;

use candle_core::{DType, Tensor};

use crate::model::bundle::StableDiffusionModels;
use crate::model::controlnet::ControlNetModel;
use crate::model::kernels::KernelPolicy;
use crate::model::unet::{AddedConditioning, ControlResiduals, UNet2DConditionModel, UNetInputs};
use crate::{Error, Result};

/// One stream's UNet call, owned so that another thread can run it.
#[derive(Debug, Clone)]
pub struct UNetCall {
    /// `[B, C, h, w]`.
    pub sample: Tensor,
    /// `[B]` (or `[1]`, for every row).
    pub timesteps: Tensor,
    /// `[B, tokens, D]`.
    pub text: Tensor,
    /// SDXL's added conditioning, `B` rows.
    pub added: Option<AddedConditioning>,
    /// ControlNet residuals, `B` rows each.
    pub control: Option<ControlResiduals>,
}

/// One stream's call of one of its ControlNets, owned so that another thread can run it. Streams
/// of one model share a ControlNet they both name (the model's cache hands them the same net),
/// so their calls can share a batch as their UNet calls do.
#[derive(Debug, Clone)]
pub struct ControlNetCall {
    /// The net.
    pub net: Arc<ControlNetModel>,
    /// `[B, C, h, w]`.
    pub sample: Tensor,
    /// `[B]` (or `[1]`, for every row).
    pub timesteps: Tensor,
    /// `[B, tokens, D]`.
    pub text: Tensor,
    /// SDXL's added conditioning, `B` rows.
    pub added: Option<AddedConditioning>,
    /// The stream's control image through the net's conditioning embedding, `[1 or B, ch0, h, w]`
    /// ([`ControlNetModel::embed_condition`]).
    pub embedded: Tensor,
}

impl ControlNetCall {
    fn forward(&self) -> Result<ControlResiduals> {
        self.net.forward_embedded(
            &self.sample,
            &self.timesteps,
            &self.text,
            self.added.as_ref(),
            &self.embedded,
        )
    }
}

/// A call a batcher takes: the UNet's, a ControlNet's, or the autoencoder's encoder or decoder
/// network.
#[derive(Debug, Clone)]
pub enum SharedCall {
    /// A UNet call.
    UNet(UNetCall),
    /// A ControlNet call.
    ControlNet(ControlNetCall),
    /// Frames `[B, 3, H, W]` through the encoder ([`Autoencoder::encode_features`](crate::model::bundle::Autoencoder::encode_features)).
    Encode(Tensor),
    /// Latents `[B, C, h, w]` (scaled) through the decoder ([`Autoencoder::decode`](crate::model::bundle::Autoencoder::decode)).
    Decode(Tensor),
}

/// Which network a call runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SharedNetwork {
    /// The UNet.
    UNet,
    /// A ControlNet (each net its own kind of batch).
    ControlNet,
    /// The autoencoder's encoder.
    Encode,
    /// The autoencoder's decoder.
    Decode,
}

impl SharedCall {
    pub(super) fn rows(&self) -> Result<usize> {
        Ok(match self {
            SharedCall::UNet(c) => c.sample.dim(0)?,
            SharedCall::ControlNet(c) => c.sample.dim(0)?,
            SharedCall::Encode(x) | SharedCall::Decode(x) => x.dim(0)?,
        })
    }

    pub(super) fn network(&self) -> SharedNetwork {
        match self {
            SharedCall::UNet(_) => SharedNetwork::UNet,
            SharedCall::ControlNet(_) => SharedNetwork::ControlNet,
            SharedCall::Encode(_) => SharedNetwork::Encode,
            SharedCall::Decode(_) => SharedNetwork::Decode,
        }
    }

    /// Runs the call alone.
    pub(super) fn run(&self, models: &StableDiffusionModels) -> Result<SharedOutput> {
        Ok(match self {
            SharedCall::UNet(c) => SharedOutput::Tensor(c.forward(&models.unet)?),
            SharedCall::ControlNet(c) => SharedOutput::Residuals(c.forward()?),
            SharedCall::Encode(x) => SharedOutput::Tensor(models.autoencoder.encode_features(x)?),
            SharedCall::Decode(z) => SharedOutput::Tensor(models.autoencoder.decode(z)?),
        })
    }
}

impl From<UNetCall> for SharedCall {
    fn from(call: UNetCall) -> Self {
        SharedCall::UNet(call)
    }
}

impl From<ControlNetCall> for SharedCall {
    fn from(call: ControlNetCall) -> Self {
        SharedCall::ControlNet(call)
    }
}

/// What a call returns: a tensor, or a ControlNet's residuals.
#[derive(Debug, Clone)]
pub(super) enum SharedOutput {
    Tensor(Tensor),
    Residuals(ControlResiduals),
}

impl SharedOutput {
    /// Rows `start..start + rows` of every tensor.
    pub(super) fn narrow(&self, start: usize, rows: usize) -> Result<SharedOutput> {
        Ok(match self {
            SharedOutput::Tensor(t) => SharedOutput::Tensor(t.narrow(0, start, rows)?),
            SharedOutput::Residuals(r) => SharedOutput::Residuals(ControlResiduals {
                down: r
                    .down
                    .iter()
                    .map(|t| t.narrow(0, start, rows))
                    .collect::<candle_core::Result<_>>()?,
                mid: r.mid.narrow(0, start, rows)?,
            }),
        })
    }

    /// The same values in buffers of their own (a copy of every tensor).
    pub(super) fn owned(&self) -> Result<SharedOutput> {
        Ok(match self {
            SharedOutput::Tensor(t) => SharedOutput::Tensor(t.force_contiguous()?),
            SharedOutput::Residuals(r) => SharedOutput::Residuals(ControlResiduals {
                down: r
                    .down
                    .iter()
                    .map(Tensor::force_contiguous)
                    .collect::<candle_core::Result<_>>()?,
                mid: r.mid.force_contiguous()?,
            }),
        })
    }

    pub(super) fn into_tensor(self) -> Result<Tensor> {
        match self {
            SharedOutput::Tensor(t) => Ok(t),
            SharedOutput::Residuals(_) => Err(Error::State(
                "a batcher returned residuals for a call that takes a tensor".into(),
            )),
        }
    }

    pub(super) fn into_residuals(self) -> Result<ControlResiduals> {
        match self {
            SharedOutput::Residuals(r) => Ok(r),
            SharedOutput::Tensor(_) => Err(Error::State(
                "a batcher returned a tensor for a ControlNet call".into(),
            )),
        }
    }
}

impl UNetCall {
    fn forward(&self, unet: &UNet2DConditionModel) -> Result<Tensor> {
        unet.forward(
            UNetInputs::new(&self.sample, &self.timesteps, &self.text)
                .added(self.added.as_ref())
                .control(self.control.as_ref()),
        )
    }
}

/// What calls must share to run in one batch.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct BatchKind {
    pub(super) network: SharedNetwork,
    /// Which ControlNet (the address of the one loaded net the streams share; a queued call
    /// holds the net, so the address cannot name another net while it waits).
    pub(super) net: Option<usize>,
    pub(super) sample: Vec<usize>,
    pub(super) text: Vec<usize>,
    pub(super) added: Option<(Vec<usize>, Vec<usize>)>,
    pub(super) control: Option<Vec<Vec<usize>>>,
    pub(super) dtype: DType,
    pub(super) policy: KernelPolicy,
}

impl BatchKind {
    pub(super) fn of(call: &SharedCall, policy: KernelPolicy) -> Self {
        let tail = |t: &Tensor| t.dims()[1..].to_vec();
        let call = match call {
            SharedCall::UNet(call) => call,
            SharedCall::ControlNet(c) => {
                return Self {
                    network: SharedNetwork::ControlNet,
                    net: Some(Arc::as_ptr(&c.net) as usize),
                    sample: tail(&c.sample),
                    text: tail(&c.text),
                    added: c
                        .added
                        .as_ref()
                        .map(|a| (tail(&a.text_embeds), tail(&a.time_ids))),
                    control: Some(vec![tail(&c.embedded)]),
                    dtype: c.sample.dtype(),
                    policy,
                };
            }
            SharedCall::Encode(x) | SharedCall::Decode(x) => {
                return Self {
                    network: call.network(),
                    net: None,
                    sample: tail(x),
                    text: Vec::new(),
                    added: None,
                    control: None,
                    dtype: x.dtype(),
                    policy,
                };
            }
        };
        Self {
            network: SharedNetwork::UNet,
            net: None,
            sample: tail(&call.sample),
            text: tail(&call.text),
            added: call
                .added
                .as_ref()
                .map(|a| (tail(&a.text_embeds), tail(&a.time_ids))),
            // Residual shapes follow the sample's; kept so that a net of another layout (there is
            // none for one UNet) could never be concatenated with the others.
            control: call.control.as_ref().map(|c| {
                c.down
                    .iter()
                    .chain(std::iter::once(&c.mid))
                    .map(tail)
                    .collect()
            }),
            dtype: call.sample.dtype(),
            policy,
        }
    }

    /// Whether calls of `self` and `other` may share a batch: everything equal, except that one
    /// may carry ControlNet residuals and the other none.
    pub(super) fn joins(&self, other: &BatchKind) -> bool {
        self.network == other.network
            && self.net == other.net
            && self.sample == other.sample
            && self.text == other.text
            && self.added == other.added
            && self.dtype == other.dtype
            && self.policy == other.policy
            && match (&self.control, &other.control) {
                (Some(a), Some(b)) => a == b,
                _ => true,
            }
    }

    /// The key costs are measured under (residuals or not cost about the same).
    pub(super) fn cost_key(&self) -> BatchKind {
        BatchKind {
            control: None,
            ..self.clone()
        }
    }
}

impl SharedNetwork {
    /// Every network a batcher takes calls of.
    pub const ALL: [SharedNetwork; 4] = [
        SharedNetwork::UNet,
        SharedNetwork::ControlNet,
        SharedNetwork::Encode,
        SharedNetwork::Decode,
    ];

    /// Its name in figures (`unet`, `controlnet`, `encode`, `decode`).
    pub fn as_str(self) -> &'static str {
        match self {
            SharedNetwork::UNet => "unet",
            SharedNetwork::ControlNet => "controlnet",
            SharedNetwork::Encode => "encode",
            SharedNetwork::Decode => "decode",
        }
    }
}

/// The rows of `parts`, one after another.
fn cat_rows(parts: Vec<Tensor>) -> Result<Tensor> {
    Ok(Tensor::cat(&parts, 0)?)
}

/// A call's input for all of its `rows` rows: one given for every row (a single timestep, a
/// control image embedded once) repeated over them, else as it is.
fn over_rows(t: &Tensor, rows: usize) -> Result<Tensor> {
    // A scalar counts as one row.
    if rows <= 1 || t.dims().first().is_some_and(|&n| n != 1) {
        return Ok(t.clone());
    }
    let t = if t.rank() == 0 {
        t.reshape(1)?
    } else {
        t.clone()
    };
    let mut times = vec![1; t.rank()];
    times[0] = rows;
    Ok(t.repeat(times)?)
}

/// What every call of the UNet or a ControlNet carries, joined row-wise.
struct JoinedInputs {
    /// Rows of each call.
    rows: Vec<usize>,
    sample: Tensor,
    /// A call's single timestep repeated over its rows.
    timesteps: Tensor,
    text: Tensor,
    added: Option<AddedConditioning>,
}

/// Joins the calls' `(sample, timesteps, text, added)` row-wise.
fn join_inputs(
    calls: &[(&Tensor, &Tensor, &Tensor, Option<&AddedConditioning>)],
) -> Result<JoinedInputs> {
    let rows: Vec<usize> = calls
        .iter()
        .map(|c| Ok(c.0.dim(0)?))
        .collect::<Result<_>>()?;
    let timesteps = calls
        .iter()
        .zip(&rows)
        .map(|(&(_, t, _, _), &r)| over_rows(t, r))
        .collect::<Result<_>>()?;
    Ok(JoinedInputs {
        sample: cat_rows(calls.iter().map(|c| c.0.clone()).collect())?,
        timesteps: cat_rows(timesteps)?,
        text: cat_rows(calls.iter().map(|c| c.2.clone()).collect())?,
        added: join_added(calls.iter().map(|c| c.3))?,
        rows,
    })
}

/// The calls' SDXL added conditioning row-wise (`None` when the first call has none; calls of
/// one kind all have it or all lack it).
fn join_added<'a>(
    added: impl ExactSizeIterator<Item = Option<&'a AddedConditioning>>,
) -> Result<Option<AddedConditioning>> {
    let n = added.len();
    let mut embeds = Vec::with_capacity(n);
    let mut ids = Vec::with_capacity(n);
    for a in added {
        match a {
            Some(a) => {
                embeds.push(a.text_embeds.clone());
                ids.push(a.time_ids.clone());
            }
            None if embeds.is_empty() => return Ok(None),
            None => {
                return Err(Error::State(
                    "calls in one batch differ in added conditioning".into(),
                ));
            }
        }
    }
    Ok(Some(AddedConditioning {
        text_embeds: cat_rows(embeds)?,
        time_ids: cat_rows(ids)?,
    }))
}

/// Concatenates ControlNet calls row-wise; each call's control image embedding is repeated over
/// its rows (a call alone passes one row for all).
pub(super) fn join_controlnet_calls(calls: &[&ControlNetCall]) -> Result<ControlNetCall> {
    let inputs: Vec<_> = calls
        .iter()
        .map(|c| (&c.sample, &c.timesteps, &c.text, c.added.as_ref()))
        .collect();
    let joined = join_inputs(&inputs)?;
    let embedded = calls
        .iter()
        .zip(&joined.rows)
        .map(|(c, &r)| over_rows(&c.embedded, r))
        .collect::<Result<_>>()?;
    Ok(ControlNetCall {
        net: calls[0].net.clone(),
        sample: joined.sample,
        timesteps: joined.timesteps,
        text: joined.text,
        added: joined.added,
        embedded: cat_rows(embedded)?,
    })
}

/// Concatenates calls row-wise; a call without ControlNet residuals gets zeros in a batch where
/// others have them.
pub(super) fn join_calls(calls: &[&UNetCall]) -> Result<UNetCall> {
    let inputs: Vec<_> = calls
        .iter()
        .map(|c| (&c.sample, &c.timesteps, &c.text, c.added.as_ref()))
        .collect();
    let JoinedInputs {
        rows,
        sample,
        timesteps,
        text,
        added,
    } = join_inputs(&inputs)?;
    let control = match calls.iter().find_map(|c| c.control.as_ref()) {
        Some(template) => {
            let parts: Vec<usize> = (0..=template.down.len()).collect();
            let pick = |c: &ControlResiduals, i: usize| -> Tensor {
                if i < c.down.len() {
                    c.down[i].clone()
                } else {
                    c.mid.clone()
                }
            };
            let mut joined = Vec::with_capacity(parts.len());
            for &i in &parts {
                let shape = pick(template, i);
                let mut pieces = Vec::with_capacity(calls.len());
                for (c, &r) in calls.iter().zip(&rows) {
                    pieces.push(match &c.control {
                        Some(res) => pick(res, i),
                        None => {
                            let mut dims = shape.dims().to_vec();
                            dims[0] = r;
                            Tensor::zeros(dims, shape.dtype(), shape.device())?
                        }
                    });
                }
                joined.push(cat_rows(pieces)?);
            }
            let mid = joined.pop().expect("the mid residual");
            Some(ControlResiduals { down: joined, mid })
        }
        None => None,
    };
    Ok(UNetCall {
        sample,
        timesteps,
        text,
        added,
        control,
    })
}
