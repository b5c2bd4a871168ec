//! The names a network's weights go by in a model folder, and which of them to take.
//!
//! diffusers and transformers have written a network's weights in four forms, each in full
//! precision or as the `fp16` variant:
//!
//! | form | full precision | fp16 variant |
//! |---|---|---|
//! | safetensors | `{stem}.safetensors` | `{stem}.fp16.safetensors` |
//! | sharded safetensors | `{stem}.safetensors.index.json` + `{stem}-00001-of-0000N.safetensors`, ... | `{stem}.safetensors.index.fp16.json` + `{stem}.fp16-00001-of-0000N.safetensors`, ... |
//! | torch pickle | `{stem}.bin` | `{stem}.fp16.bin` |
//! | sharded torch pickle | `{stem}.bin.index.json` + `{stem}-00001-of-0000N.bin`, ... | `{stem}.bin.index.fp16.json` + ... |
//!
//! where `{stem}` is `diffusion_pytorch_model` for diffusers networks, and for transformers
//! ones `model` in the safetensors forms but `pytorch_model` in the pickle forms. Older
//! repositories hold only some of them: the `thibaud/controlnet-sd21-*-diffusers` nets, for
//! one, only an fp16 `diffusion_pytorch_model.bin`.
//!
//! [`candidates`] orders them for a load: the precision the engine runs in first (the fp16
//! variant for f16 only: bf16 from an fp16 file would be rounded twice, so bf16 takes the full
//! file), then safetensors before pickles (mapped, not read whole), a single file before
//! shards. The folder reader ([`weights_file`](crate::weights_file)) and the hub's download
//! both take the first candidate there is, so a folder and a download agree on the file.

use candle_core::DType;

/// One way a folder may hold a network's weights.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Candidate {
    /// The file to open: the weights, or the shards' index.
    pub file: String,
    /// For an index, the pattern its shards' names follow (`*` within one path segment), for
    /// a download to fetch them beside it.
    pub shards: Option<String>,
}

/// Whether a network loaded in `dtype` reads an fp16 variant first. Only f16 does: bf16 from
/// fp16 values rounds twice (fp32 → fp16 → bf16), while the full file rounds once.
pub fn prefers_fp16(dtype: DType) -> bool {
    dtype == DType::F16
}

/// The stem of the pickle forms: transformers' `model` is `pytorch_model` there (a folder
/// before it, `text_encoder/model`, is kept).
fn pickle_stem(stem: &str) -> String {
    match stem.rsplit_once('/') {
        Some((dir, "model")) => format!("{dir}/pytorch_model"),
        None if stem == "model" => "pytorch_model".into(),
        _ => stem.to_string(),
    }
}

/// Every form of the weights named `stem` (see the module's table), best first when the fp16
/// variant is preferred (`prefer_fp16`) or not.
pub fn candidates(stem: &str, prefer_fp16: bool) -> Vec<Candidate> {
    let pickle = pickle_stem(stem);
    let variants: [Option<&str>; 2] = if prefer_fp16 {
        [Some("fp16"), None]
    } else {
        [None, Some("fp16")]
    };
    let mut out = Vec::new();
    for variant in variants {
        let (dot, index_variant) = match variant {
            Some(v) => (format!(".{v}"), format!("{v}.")),
            None => (String::new(), String::new()),
        };
        // Within one precision: safetensors, its shards, the pickle, its shards.
        for (stem, ext) in [(stem, "safetensors"), (pickle.as_str(), "bin")] {
            out.push(Candidate {
                file: format!("{stem}{dot}.{ext}"),
                shards: None,
            });
            out.push(Candidate {
                file: format!("{stem}.{ext}.index.{index_variant}json"),
                shards: Some(format!("{stem}{dot}-*-of-*.{ext}")),
            });
        }
    }
    out
}

/// The candidates' file names, for an error that says what a folder lacks.
pub fn describe(stem: &str) -> String {
    let names: Vec<String> = candidates(stem, false)
        .into_iter()
        .map(|c| c.file)
        .collect();
    names.join(", ")
}

/// At most this many names in [`what_is_held`].
const MAX_HELD_NAMES: usize = 8;

/// The names among `names` that look like weights files (safetensors, torch pickles,
/// single-file checkpoints), sorted.
pub fn weight_like(names: impl IntoIterator<Item = String>) -> Vec<String> {
    let mut held: Vec<String> = names
        .into_iter()
        .filter(|n| {
            [".safetensors", ".bin", ".ckpt", ".pth", ".pt"]
                .iter()
                .any(|ext| n.to_ascii_lowercase().ends_with(ext))
        })
        .collect();
    held.sort();
    held
}

/// The weight-like files of the folder `dir` ([`weight_like`]); none when it cannot be read.
pub fn held_in(dir: &std::path::Path) -> Vec<String> {
    weight_like(
        std::fs::read_dir(dir)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned()),
    )
}

/// What a folder or repository holds instead of a form [`candidates`] names, and what would
/// be needed: empty when it holds no weights at all.
pub fn what_is_held(held: &[String]) -> String {
    if held.is_empty() {
        return String::new();
    }
    let mut names = held
        .iter()
        .take(MAX_HELD_NAMES)
        .cloned()
        .collect::<Vec<_>>()
        .join(", ");
    if held.len() > MAX_HELD_NAMES {
        names.push_str(&format!(" and {} more", held.len() - MAX_HELD_NAMES));
    }
    format!(
        "; it holds {names}, in no form sdstream reads for this network (single files of the \
         original layout are read as a model_id or a ControlNet, docs/CHECKPOINTS.md; for \
         another network convert one with diffusers' from_single_file(...).save_pretrained(...))"
    )
}

/// Whether `name` is a shard index (a JSON file mapping tensors to shard files).
pub fn is_index(name: &str) -> bool {
    name.ends_with(".index.json") || name.ends_with(".index.fp16.json")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn diffusers_and_transformers_names_in_order() {
        let files = |stem, fp16| -> Vec<String> {
            candidates(stem, fp16).into_iter().map(|c| c.file).collect()
        };
        assert_eq!(
            files("diffusion_pytorch_model", false),
            [
                "diffusion_pytorch_model.safetensors",
                "diffusion_pytorch_model.safetensors.index.json",
                "diffusion_pytorch_model.bin",
                "diffusion_pytorch_model.bin.index.json",
                "diffusion_pytorch_model.fp16.safetensors",
                "diffusion_pytorch_model.safetensors.index.fp16.json",
                "diffusion_pytorch_model.fp16.bin",
                "diffusion_pytorch_model.bin.index.fp16.json",
            ]
        );
        assert_eq!(
            files("text_encoder/model", true)[..4],
            [
                "text_encoder/model.fp16.safetensors",
                "text_encoder/model.safetensors.index.fp16.json",
                "text_encoder/pytorch_model.fp16.bin",
                "text_encoder/pytorch_model.bin.index.fp16.json",
            ]
        );
        let shards: Vec<Option<String>> = candidates("unet/diffusion_pytorch_model", true)
            .into_iter()
            .map(|c| c.shards)
            .collect();
        assert_eq!(
            shards[1].as_deref(),
            Some("unet/diffusion_pytorch_model.fp16-*-of-*.safetensors")
        );
        assert_eq!(
            shards[5].as_deref(),
            Some("unet/diffusion_pytorch_model-*-of-*.safetensors")
        );
        assert_eq!(
            weight_like(
                ["README.md", "temporalnetversion2.ckpt", "a.SAFETENSORS"].map(String::from)
            ),
            ["a.SAFETENSORS", "temporalnetversion2.ckpt"]
        );
        let held = what_is_held(&["temporalnetversion2.ckpt".into()]);
        assert!(held.contains("temporalnetversion2.ckpt") && held.contains("from_single_file"));
        assert_eq!(what_is_held(&[]), "");
        assert!(prefers_fp16(DType::F16));
        assert!(!prefers_fp16(DType::BF16) && !prefers_fp16(DType::F32));
    }
}
