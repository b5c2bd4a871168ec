//! One image processor on its own, outside a stream: frame in, control image out, for hosts
//! that want to show a depth map or a pose skeleton, or feed it elsewhere. The C library and the
//! Python module wrap this type; a stream runs the same [`Processor`] code.

use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};
use serde_json::{Map, Value};

use super::networks::{NetworkPool, ProcessorNetworks};
use super::{Processor, ProcessorInputs};
use crate::frame::{Frame, quantize_unit};
use crate::params::EngineSettings;
use crate::{Error, Result};

/// A processor's picture as 8-bit levels: `height` rows of `width` pixels of `channels`
/// interleaved values (3: RGB; 6: TemporalNet2's previous frame RGB then flow RGB).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControlImage {
    /// Columns.
    pub width: usize,
    /// Rows.
    pub height: usize,
    /// Values per pixel.
    pub channels: usize,
    /// `width · height · channels` bytes, row-major.
    pub data: Vec<u8>,
}

impl ControlImage {
    /// Reads a `[1, C, H, W]` tensor in [0, 1] as 8-bit levels (`round(255·x)`, ties to even,
    /// clamped; NaN as 0), the conversion frames get.
    pub fn from_tensor(image: &Tensor) -> Result<Self> {
        let &[1, channels, height, width] = image.dims() else {
            return Err(Error::InvalidFrame(format!(
                "a control image is [1, C, H, W], got {:?}",
                image.dims()
            )));
        };
        let planar = image
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let plane = width * height;
        let mut data = vec![0u8; plane * channels];
        for c in 0..channels {
            for (i, &v) in planar[c * plane..(c + 1) * plane].iter().enumerate() {
                data[i * channels + c] = quantize_unit(v);
            }
        }
        Ok(Self {
            width,
            height,
            channels,
            data,
        })
    }
}

/// A processor with its params checked and its network (if any) loaded, keeping what a
/// temporal processor needs between frames (the previous frame).
#[derive(Debug)]
pub struct ImageProcessor {
    name: String,
    processor: Processor,
    networks: ProcessorNetworks,
    device: Device,
    previous_input: Option<Tensor>,
    last_time: Option<Duration>,
}

impl ImageProcessor {
    /// Processor `name` (Daydream's names) with `params` (its `preprocessor_params`), on the
    /// device and in the dtype `settings` ask for, its network found like models
    /// (`settings.model_root`, the Hugging Face cache, a download); progress logged. An
    /// error names the parameter or the file at fault.
    pub fn new(name: &str, params: &Map<String, Value>, settings: &EngineSettings) -> Result<Self> {
        Self::with_progress(name, params, settings, &mut crate::log::progress)
    }

    /// [`new`](Self::new) with the params as a JSON text (an object; `"{}"` for the defaults),
    /// as the bindings receive them: a syntax error is [`Error::Json`], anything but an object
    /// an invalid `params`.
    pub fn from_json(name: &str, params_json: &str, settings: &EngineSettings) -> Result<Self> {
        let params = match serde_json::from_str(params_json) {
            Ok(Value::Object(map)) => map,
            Ok(other) => {
                return Err(Error::param(
                    "params",
                    format!("a processor's params are a JSON object, got {other}"),
                ));
            }
            Err(e) => return Err(Error::Json(format!("processor params: {e}"))),
        };
        Self::new(name, &params, settings)
    }

    /// [`new`](Self::new) with loading progress sent to `progress`.
    pub fn with_progress(
        name: &str,
        params: &Map<String, Value>,
        settings: &EngineSettings,
        progress: &mut dyn FnMut(&str),
    ) -> Result<Self> {
        settings.validate()?;
        let processor = Processor::parse(name, params, "name", "params")?;
        let device = settings.device.device()?;
        let networks = ProcessorNetworks::load(
            processor.networks(),
            NetworkPool::global(),
            &settings.hub_options(),
            settings.dtype.dtype(),
            &device,
            progress,
        )?;
        Ok(Self {
            name: name.to_string(),
            processor,
            networks,
            device,
            previous_input: None,
            last_time: None,
        })
    }

    /// The processor's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Channels of the images it makes (3, or 6 for `temporal_net_tensorrt`'s `concat`).
    pub fn output_channels(&self) -> usize {
        self.processor.output_channels()
    }

    /// The size (width, height) of its image for a `width × height` frame.
    pub fn output_size(&self, width: usize, height: usize) -> (usize, usize) {
        let scale = self.processor.output_scale();
        (width * scale, height * scale)
    }

    /// How long the last call took.
    pub fn last_time(&self) -> Option<Duration> {
        self.last_time
    }

    /// Forgets the previous frame (a temporal processor's next image starts over).
    pub fn reset(&mut self) {
        self.previous_input = None;
    }

    /// The control image of `frame` (any supported pixel format, at its own size).
    pub fn process(&mut self, frame: &Frame) -> Result<ControlImage> {
        let x = frame
            .to_tensor(frame.width(), frame.height(), &self.device)?
            .affine(0.5, 0.5)?;
        ControlImage::from_tensor(&self.process_tensor(&x)?)
    }

    /// The tensor path: `image` `[1, 3, H, W]` in [0, 1] → `[1, C, H', W']` in [0, 1] (f32).
    /// A failure keeps the previous frame as it was.
    pub fn process_tensor(&mut self, image: &Tensor) -> Result<Tensor> {
        if image.rank() != 4 || image.dim(0)? != 1 || image.dim(1)? != 3 {
            return Err(Error::InvalidFrame(format!(
                "a processor takes a [1, 3, H, W] image, got {:?}",
                image.dims()
            )));
        }
        let image = image.to_device(&self.device)?.to_dtype(DType::F32)?;
        let start = Instant::now();
        let previous = self
            .previous_input
            .as_ref()
            .filter(|p| p.dims() == image.dims());
        let inputs = ProcessorInputs {
            previous_input: previous,
            networks: Some(&self.networks),
            ..Default::default()
        };
        let out = self.processor.run(&image, &inputs)?;
        self.last_time = Some(start.elapsed());
        self.previous_input = Some(image);
        Ok(out)
    }
}
