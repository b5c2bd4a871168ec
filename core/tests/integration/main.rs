//! core's integration tests in one binary: one link instead of one per file (each test binary
//! carries the whole library and its dependencies), so the suite builds faster and takes a
//! fraction of the disk. Kernel variants run here too, each under a policy scoped on its test's
//! thread (kernel_variants.rs). A file of tests/ stays a binary of its own only where it must:
//! it needs a feature (tests/cuda.rs), or it compares frame times and must not share the cores
//! with other tests (tests/engine.rs).

#[path = "../common/mod.rs"]
mod common;
#[path = "../streams/mod.rs"]
mod streams;

mod broken_models;
mod cached_attention;
mod channels_last;
mod clip;
mod controlnet;
mod cross_stream;
mod cv_draw;
mod cv_resize;
mod depth_anything;
mod dj_body;
mod flow_image;
mod hub_download;
mod ip_adapter;
mod kernel_variants;
mod latent_feedback;
mod lora;
mod model_ids;
mod openpose;
mod params;
mod params_fuzz;
mod pool;
mod preprocess;
mod processors;
mod published_layouts;
mod raft;
mod resolve;
mod safety_checker;
mod sdxl;
mod sdxl_controlnet;
mod single_file;
mod stream;
mod stream_bf16;
mod stream_updates;
mod style_picture;
mod taesd;
mod unet;
mod vae;
