//! Text encoding: prompts to the UNet's embeddings (SD 1.x/2.x, SDXL's two encoders and its
//! added time ids).

use candle_core::Tensor;

use crate::model::tokenizer::ClipTokenizer;
use crate::{Error, Result};

use super::{SdxlText, StableDiffusionModels};

impl StableDiffusionModels {
    /// SDXL's embeddings of one text, as diffusers' `StableDiffusionXLPipeline.encode_prompt`
    /// computes them (no clip skip); an error on a checkpoint without a second text encoder.
    pub fn encode_text_sdxl(&self, text: &str) -> Result<SdxlText> {
        let second = self.second.as_ref().ok_or_else(|| Error::ModelLoad {
            path: self.dir.clone(),
            detail: "not an SDXL checkpoint: it has no second text encoder".into(),
        })?;
        let (_, first) = self
            .text_encoder
            .forward_with_penultimate(&self.token_ids(&self.tokenizer, text)?)?;
        let out = second
            .text_encoder
            .forward_all(&self.token_ids(&second.tokenizer, text)?)?;
        Ok(SdxlText {
            embeds: Tensor::cat(&[&first, &out.penultimate], 2)?,
            pooled: out.pooled,
        })
    }

    /// SDXL's `time_ids` for a stream of `height`×`width`: original size, crop corner (0, 0),
    /// target size, `[1, 6]` in the networks' dtype (what the reference passes, with the
    /// stream's size as both sizes).
    pub fn sdxl_time_ids(&self, height: usize, width: usize) -> Result<Tensor> {
        let (h, w) = (height as f32, width as f32);
        Ok(
            Tensor::from_vec(vec![h, w, 0.0, 0.0, h, w], (1, 6), &self.device)?
                .to_dtype(self.dtype)?,
        )
    }

    /// CLIP embedding `[1, 77, D]` of one text.
    pub fn encode_text(&self, text: &str) -> Result<Tensor> {
        self.text_encoder
            .forward(&self.token_ids(&self.tokenizer, text)?)
    }

    /// `text` as `tokenizer` pads it, `[1, max_length]` on the networks' device.
    fn token_ids(&self, tokenizer: &ClipTokenizer, text: &str) -> Result<Tensor> {
        let ids = tokenizer.encode(text)?;
        Ok(Tensor::from_vec(
            ids,
            (1, tokenizer.max_length()),
            &self.device,
        )?)
    }
}
