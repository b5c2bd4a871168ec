//! The CLIP tokenizer: prompt text → 77 token ids, as the reference's `CLIPTokenizer` makes them.
//!
//! The reference environment's transformers (5.x) has a single CLIP tokenizer, backed by the
//! `tokenizers` library, and that is what diffusers loads; this module builds the same pipeline:
//! NFC, whitespace runs → one space, lowercase; CLIP's split regex (contractions, letter runs,
//! single digits, punctuation runs); byte-level mapping; BPE with the end-of-word suffix `</w>`.
//! The special tokens named by the folder's config (bos, eos, unk and pad) are registered as
//! added tokens, so that with sd-turbo's pad token `!` every `!` of a prompt becomes id 0 exactly as
//! in the reference. Encoding keeps `bos … eos` within the maximum length and pads with the pad id.

use std::path::Path;

use tokenizers::models::bpe::BPE;
use tokenizers::normalizers::{Lowercase, NFC, Replace, Sequence as NormalizerSequence};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence as PreTokenizerSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer};

use crate::{Error, Result};

/// The sequence length of CLIP's text encoder, used when the config does not give one.
pub const DEFAULT_MAX_LENGTH: usize = 77;

/// CLIP's pre-tokenizer pattern (as transformers' CLIPTokenizer writes it).
const CLIP_SPLIT_PATTERN: &str =
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";

/// A CLIP BPE tokenizer with its special tokens and sequence length.
#[derive(Clone)]
pub struct ClipTokenizer {
    tokenizer: Tokenizer,
    bos_id: u32,
    eos_id: u32,
    pad_id: u32,
    max_length: usize,
}

impl std::fmt::Debug for ClipTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClipTokenizer")
            .field("bos_id", &self.bos_id)
            .field("eos_id", &self.eos_id)
            .field("pad_id", &self.pad_id)
            .field("max_length", &self.max_length)
            .finish()
    }
}

/// The special tokens and length a tokenizer folder declares.
struct SpecialTokens {
    bos: String,
    eos: String,
    unk: String,
    pad: String,
    max_length: usize,
}

impl SpecialTokens {
    /// Reads `tokenizer_config.json`, falling back to `special_tokens_map.json`, then to
    /// CLIPTokenizer's defaults (bos `<|startoftext|>`, eos / unk / pad `<|endoftext|>`, 77).
    fn read(dir: &Path) -> Result<Self> {
        let config = read_json_if_present(&dir.join("tokenizer_config.json"))?;
        let map = read_json_if_present(&dir.join("special_tokens_map.json"))?;
        let token = |key: &str, default: &str| -> String {
            [&config, &map]
                .into_iter()
                .flatten()
                .find_map(|v| token_content(&v[key]))
                .unwrap_or_else(|| default.to_string())
        };
        // Some configs carry a huge placeholder ("no limit"); CLIP's encoder has 77 positions.
        let max_length = config
            .as_ref()
            .and_then(|c| c["model_max_length"].as_f64())
            .filter(|n| (2.0..=4096.0).contains(n))
            .map_or(DEFAULT_MAX_LENGTH, |n| n as usize);
        Ok(Self {
            bos: token("bos_token", "<|startoftext|>"),
            eos: token("eos_token", "<|endoftext|>"),
            unk: token("unk_token", "<|endoftext|>"),
            pad: token("pad_token", "<|endoftext|>"),
            max_length,
        })
    }
}

/// A special token entry is either a string or an object with a `content` field.
fn token_content(v: &serde_json::Value) -> Option<String> {
    match v {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Object(o) => o.get("content")?.as_str().map(str::to_string),
        _ => None,
    }
}

/// Calls into the tokenizers library with what a checkpoint's files say (or a prompt), its
/// error or a panic turned into `fail`'s error: its builders index buffers with the files'
/// values (0.23 panics on a `continuing_subword_prefix` longer than a merge's second token),
/// and a checkpoint is an attacker's choice.
fn without_panics<T, E: std::fmt::Display>(
    call: impl FnOnce() -> std::result::Result<T, E>,
    fail: impl FnOnce(String) -> Error,
) -> Result<T> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(call)) {
        Ok(result) => result.map_err(|e| fail(e.to_string())),
        Err(_) => Err(fail("the tokenizers library panicked on it".into())),
    }
}

/// The JSON of an optional file; one that is there but is not a regular file (a folder, a FIFO)
/// is an error, not an absence.
fn read_json_if_present(path: &Path) -> Result<Option<serde_json::Value>> {
    if std::fs::symlink_metadata(path).is_err() {
        return Ok(None);
    }
    let bytes = crate::read_bounded(path, crate::MAX_CONFIG_BYTES)?;
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|e| Error::ModelLoad {
            path: path.to_path_buf(),
            detail: format!("bad JSON: {e}"),
        })
}

fn load_error(path: &Path, detail: impl std::fmt::Display) -> Error {
    Error::ModelLoad {
        path: path.to_path_buf(),
        detail: detail.to_string(),
    }
}

impl ClipTokenizer {
    /// Loads a diffusers `tokenizer/` folder: `tokenizer.json` when present, otherwise
    /// `vocab.json` + `merges.txt` with CLIP's normaliser, pre-tokeniser and BPE settings. Special
    /// tokens and the maximum length come from `tokenizer_config.json` / `special_tokens_map.json`.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let special = SpecialTokens::read(dir)?;
        let tokenizer_json = dir.join("tokenizer.json");
        let mut tokenizer = if tokenizer_json.is_file() {
            let bytes = crate::read_bounded(&tokenizer_json, crate::MAX_TOKENIZER_BYTES)?;
            without_panics(
                || Tokenizer::from_bytes(bytes),
                |e| load_error(&tokenizer_json, e),
            )?
        } else {
            Self::build_from_vocab(dir, &special.unk)?
        };
        // Padding and truncation are done here, whatever the file says.
        tokenizer
            .with_truncation(None)
            .map_err(|e| load_error(dir, e))?;
        tokenizer.with_padding(None);
        // transformers registers the configured special tokens as added tokens (not normalised),
        // which makes them match before BPE; sd-turbo's pad `!` relies on it.
        let specials = [&special.bos, &special.eos, &special.unk, &special.pad];
        tokenizer
            .add_special_tokens(specials.iter().map(|t| AddedToken::from(t.as_str(), true)))
            .map_err(|e| load_error(dir, e))?;
        let id = |token: &str, role: &str| -> Result<u32> {
            tokenizer.token_to_id(token).ok_or_else(|| {
                load_error(
                    dir,
                    format!("{role} token {token:?} is not in the vocabulary"),
                )
            })
        };
        Ok(Self {
            bos_id: id(&special.bos, "bos")?,
            eos_id: id(&special.eos, "eos")?,
            pad_id: id(&special.pad, "pad")?,
            max_length: special.max_length,
            tokenizer,
        })
    }

    /// CLIP's tokenizer from `vocab.json` and `merges.txt`.
    fn build_from_vocab(dir: &Path, unk: &str) -> Result<Tokenizer> {
        let vocab = dir.join("vocab.json");
        let merges = dir.join("merges.txt");
        for file in [&vocab, &merges] {
            if !file.is_file() {
                return Err(load_error(
                    dir,
                    format!(
                        "no tokenizer.json, and {} is missing (a CLIP tokenizer needs tokenizer.json \
                         or vocab.json + merges.txt)",
                        file.file_name().and_then(|n| n.to_str()).unwrap_or("?")
                    ),
                ));
            }
        }
        // BPE reads the two files itself; their sizes are bounded first.
        for file in [&vocab, &merges] {
            crate::check_bounded(file, crate::MAX_TOKENIZER_BYTES)?;
        }
        let (vocab_str, merges_str) = (path_str(&vocab)?, path_str(&merges)?);
        let bpe = without_panics(
            || {
                BPE::from_file(vocab_str, merges_str)
                    .unk_token(unk.to_string())
                    .continuing_subword_prefix(String::new())
                    .end_of_word_suffix("</w>".to_string())
                    .fuse_unk(false)
                    .build()
            },
            |e| {
                load_error(
                    &vocab,
                    format!("cannot build BPE from vocab.json + merges.txt: {e}"),
                )
            },
        )?;
        let mut tokenizer = Tokenizer::new(bpe);
        let whitespace = Replace::new(
            tokenizers::normalizers::replace::ReplacePattern::Regex(r"\s+".into()),
            " ",
        )
        .map_err(|e| load_error(dir, e))?;
        tokenizer
            .with_normalizer(Some(NormalizerSequence::new(vec![
                NFC.into(),
                whitespace.into(),
                Lowercase.into(),
            ])))
            .map_err(|e| load_error(dir, e))?;
        let split = Split::new(
            SplitPattern::Regex(CLIP_SPLIT_PATTERN.into()),
            SplitDelimiterBehavior::Removed,
            true,
        )
        .map_err(|e| load_error(dir, e))?;
        tokenizer.with_pre_tokenizer(Some(PreTokenizerSequence::new(vec![
            split.into(),
            ByteLevel::new(false, true, true).into(),
        ])));
        Ok(tokenizer)
    }

    /// The ids of `text` without truncation or padding: `bos … eos`.
    pub fn encode_untruncated(&self, text: &str) -> Result<Vec<u32>> {
        let encoding = without_panics(
            || self.tokenizer.encode(text, false),
            |e| Error::param("prompt", format!("cannot tokenize {text:?}: {e}")),
        )?;
        let mut ids = Vec::with_capacity(encoding.get_ids().len() + 2);
        ids.push(self.bos_id);
        ids.extend_from_slice(encoding.get_ids());
        ids.push(self.eos_id);
        Ok(ids)
    }

    /// Exactly [`max_length`](Self::max_length) ids: `bos`, the text's tokens (truncated so that
    /// `eos` still fits), `eos`, then the pad id.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let mut ids = self.encode_untruncated(text)?;
        if ids.len() > self.max_length {
            ids.truncate(self.max_length - 1);
            ids.push(self.eos_id);
        }
        ids.resize(self.max_length, self.pad_id);
        Ok(ids)
    }

    /// The sequence length every encoding has (77 for CLIP).
    pub fn max_length(&self) -> usize {
        self.max_length
    }

    /// Id of the start-of-text token.
    pub fn bos_id(&self) -> u32 {
        self.bos_id
    }

    /// Id of the end-of-text token.
    pub fn eos_id(&self) -> u32 {
        self.eos_id
    }

    /// Id used for padding (sd-turbo: `!` = 0; SD1.5: `<|endoftext|>`).
    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }
}

fn path_str(path: &Path) -> Result<&str> {
    path.to_str()
        .ok_or_else(|| load_error(path, "path is not valid UTF-8"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures");

    fn tiny_tokenizer_dir() -> PathBuf {
        Path::new(FIXTURES).join("tiny-sd-turbo/tokenizer")
    }

    fn cases(file: &str) -> Vec<serde_json::Value> {
        let path = Path::new(FIXTURES).join(file);
        let text =
            std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let json: serde_json::Value = serde_json::from_str(&text).expect("json");
        json["cases"].as_array().expect("cases").clone()
    }

    fn ids(v: &serde_json::Value) -> Vec<u32> {
        v.as_array()
            .expect("ids")
            .iter()
            .map(|x| x.as_u64().expect("id") as u32)
            .collect()
    }

    /// A temp copy of the tiny tokenizer folder, optionally without tokenizer.json and with the
    /// SD1.5 pad token.
    struct TempTokenizer(PathBuf);

    impl TempTokenizer {
        fn new(tag: &str, keep_tokenizer_json: bool, pad_eos: bool) -> Self {
            let dir = std::env::temp_dir()
                .join(format!("sdstream-tokenizer-{tag}-{}", std::process::id()));
            std::fs::create_dir_all(&dir).expect("temp dir");
            for name in [
                "vocab.json",
                "merges.txt",
                "tokenizer_config.json",
                "special_tokens_map.json",
                "tokenizer.json",
            ] {
                if name == "tokenizer.json" && !keep_tokenizer_json {
                    continue;
                }
                let src = tiny_tokenizer_dir().join(name);
                let mut text = std::fs::read_to_string(&src).expect("read fixture");
                if pad_eos && (name == "tokenizer_config.json" || name == "special_tokens_map.json")
                {
                    text = text.replace(r#""pad_token": "!""#, r#""pad_token": "<|endoftext|>""#);
                    assert!(
                        text.contains(r#""pad_token": "<|endoftext|>""#),
                        "{name}: pad not replaced"
                    );
                }
                std::fs::write(dir.join(name), text).expect("write");
            }
            Self(dir)
        }
    }

    impl Drop for TempTokenizer {
        fn drop(&mut self) {
            std::fs::remove_dir_all(&self.0).ok();
        }
    }

    /// A `tokenizer.json` whose BPE `continuing_subword_prefix` is longer than a merge's second
    /// token panics inside the tokenizers library (0.23, found by models/tests/checkpoint_fuzz.rs):
    /// the load fails with an error naming the file, and the next load of a good folder works.
    #[test]
    fn a_tokenizer_json_that_panics_the_library_is_an_error_naming_it() {
        let tmp = TempTokenizer::new("panics", true, false);
        let path = tmp.0.join("tokenizer.json");
        let mut json: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        json["model"]["continuing_subword_prefix"] = "<|endoftext|>".into();
        std::fs::write(&path, serde_json::to_vec(&json).unwrap()).unwrap();
        let err = ClipTokenizer::from_dir(&tmp.0).expect_err("a panicking file must not load");
        let message = err.to_string();
        assert!(message.contains("tokenizer.json"), "{message}");
        assert!(message.contains("panicked"), "{message}");
        let good = ClipTokenizer::from_dir(&tiny_tokenizer_dir()).expect("the fixture loads");
        assert_eq!(good.encode("a cat").expect("encode").len(), 77);
    }

    /// Compares every prompt's 77 ids; returns the number of prompts that matched.
    fn check(tok: &ClipTokenizer, cases: &[serde_json::Value], key: &str, what: &str) -> usize {
        let mut matched = 0;
        for case in cases {
            let prompt = case["prompt"].as_str().expect("prompt");
            let ours = tok.encode(prompt).expect("encode");
            assert_eq!(ours.len(), 77);
            assert_eq!(ours, ids(&case[key]), "{what}: prompt {prompt:?}");
            if let Some(n) = case["untruncated_len"].as_u64() {
                assert_eq!(
                    tok.encode_untruncated(prompt).expect("encode").len(),
                    n as usize,
                    "{prompt:?}"
                );
            }
            matched += 1;
        }
        matched
    }

    #[test]
    fn tokenizer_json_path_matches_transformers() {
        let golden = cases("golden/tokenizer_ids.json");
        let tok = ClipTokenizer::from_dir(&tiny_tokenizer_dir()).expect("tokenizer");
        assert_eq!(
            (tok.bos_id(), tok.eos_id(), tok.pad_id(), tok.max_length()),
            (49406, 49407, 0, 77)
        );
        let n = check(&tok, &golden, "input_ids_pad_bang", "tokenizer.json, pad !");
        let sd15 = TempTokenizer::new("json-eos", true, true);
        let tok = ClipTokenizer::from_dir(&sd15.0).expect("tokenizer");
        assert_eq!(tok.pad_id(), 49407);
        let m = check(
            &tok,
            &golden,
            "input_ids_pad_eos",
            "tokenizer.json, pad eos",
        );
        eprintln!(
            "tokenizer.json path: {n}/{} and {m}/{} prompts identical",
            golden.len(),
            golden.len()
        );
        assert_eq!(n, 20);
    }

    #[test]
    fn vocab_merges_path_matches_transformers() {
        let golden = cases("tokenizer/vocab_merges_ids.json");
        let turbo = TempTokenizer::new("vocab-bang", false, false);
        let tok = ClipTokenizer::from_dir(&turbo.0).expect("tokenizer");
        let n = check(&tok, &golden, "input_ids_pad_bang", "vocab+merges, pad !");
        let sd15 = TempTokenizer::new("vocab-eos", false, true);
        let tok = ClipTokenizer::from_dir(&sd15.0).expect("tokenizer");
        let m = check(&tok, &golden, "input_ids_pad_eos", "vocab+merges, pad eos");
        eprintln!(
            "vocab+merges path: {n}/{} and {m}/{} prompts identical",
            golden.len(),
            golden.len()
        );
        assert_eq!((n, m), (20, 20));
    }

    #[test]
    fn missing_files_are_named() {
        let dir =
            std::env::temp_dir().join(format!("sdstream-tokenizer-empty-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let err = ClipTokenizer::from_dir(&dir)
            .expect_err("empty folder")
            .to_string();
        assert!(
            err.contains("vocab.json") && err.contains(&dir.display().to_string()),
            "{err}"
        );
        std::fs::remove_dir_all(&dir).ok();
    }
}
