//! Where model files come from and how networks are built from them: the networks, weight
//! files, LoRA fusion, tokenizer and configs of the crate `sdstream-models` (re-exported here
//! whole, so that `sdstream::model::unet` and friends are where they always were), and this
//! crate's own loading of a whole checkpoint ([`bundle`]: model_index.json, the hub, LoRAs by
//! id, the ControlNet cache) the process-wide [`pool`] of loaded checkpoints, and [`single_file`] checkpoints as
//! diffusers folders.

pub use sdstream_models::*;

pub mod bundle;
pub mod pool;
pub mod single_file;
