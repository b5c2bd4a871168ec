//! Model ids have one resolution order (the id as a folder, then `model_root/<id>`, then the
//! Hugging Face cache, then the hub), and parameter validation and loading follow it alike: they
//! can never judge one folder and read another. This binary changes its working directory (a
//! relative id is looked up there), so it holds this one test only.

use crate::common;

use std::path::{Path, PathBuf};

use common::{copy_dir, fixture, scratch_dir, tiny_settings};
use sdstream::model::bundle::StableDiffusionModels;
use sdstream::params::ModelKind;
use sdstream::{EngineSettings, StreamDiffusionParams};

const ID: &str = "org/tiny-turbo";
const UNET_WEIGHTS: &str = "unet/diffusion_pytorch_model.safetensors";

fn folder_validation_picks(params: &StreamDiffusionParams, settings: &EngineSettings) -> PathBuf {
    match params
        .model_kind(settings)
        .expect("validation accepts the id")
    {
        ModelKind::LocalFolder(dir) => dir,
        other => panic!("expected a local folder, got {other:?}"),
    }
}

fn load(settings: &EngineSettings) -> sdstream::Result<PathBuf> {
    StableDiffusionModels::load(ID, settings, &mut |_| {}).map(|models| models.dir.clone())
}

#[test]
fn validation_and_loading_pick_the_same_folder() {
    let scratch = scratch_dir("resolve");
    let (cwd, root) = (scratch.join("cwd"), scratch.join("root"));
    // Two different checkpoints under the same id: a complete one beside the working directory,
    // and one under the model root whose UNet weights are missing (loading it must fail).
    copy_dir(&fixture("tiny-sd-turbo"), &cwd.join(ID));
    copy_dir(&fixture("tiny-sd-turbo"), &root.join(ID));
    std::fs::remove_file(root.join(ID).join(UNET_WEIGHTS)).expect("remove root weights");
    std::env::set_current_dir(&cwd).expect("chdir");

    let mut settings = tiny_settings("self");
    settings.model_root = Some(root.clone());
    let params = StreamDiffusionParams {
        model_id: ID.into(),
        width: 64,
        height: 64,
        ..StreamDiffusionParams::default()
    };

    // Both pick the id as a folder first: the complete checkpoint.
    let judged = folder_validation_picks(&params, &settings);
    assert_eq!(judged, Path::new(ID));
    assert_eq!(load(&settings).expect("loads the local folder"), judged);

    // Without it, both pick the model root's copy, and loading reports what that copy lacks
    // instead of reading some other checkpoint.
    std::fs::remove_dir_all(cwd.join(ID)).expect("remove the local folder");
    let judged = folder_validation_picks(&params, &settings);
    assert_eq!(judged, root.join(ID));
    let err = load(&settings).expect_err("the root copy lacks its UNet weights");
    let message = err.to_string();
    assert!(
        message.contains(&root.join(ID).display().to_string())
            && message.contains("unet/diffusion_pytorch_model.safetensors"),
        "{message}"
    );

    // Made complete, the model root's copy is what loads.
    std::fs::copy(
        fixture("tiny-sd-turbo").join(UNET_WEIGHTS),
        root.join(ID).join(UNET_WEIGHTS),
    )
    .expect("restore weights");
    assert_eq!(load(&settings).expect("loads the root copy"), judged);

    // With neither, validation refuses the id and names it.
    std::fs::remove_dir_all(root.join(ID)).expect("remove the root copy");
    let err = params.model_kind(&settings).expect_err("no folder");
    assert!(err.to_string().contains(ID), "{err}");
    std::fs::remove_dir_all(&scratch).ok();
}
