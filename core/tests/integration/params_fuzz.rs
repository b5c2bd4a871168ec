//! A deterministic mutation fuzzer for the three JSON parsers a host or an API client reaches
//! (issue #20): [`StreamDiffusionParams::from_json_with`] (and [`StreamDiffusionParams::patched`]),
//! [`EngineSettings::from_json`] and [`EngineOptions::from_json`]. Stable toolchain, no fuzzing
//! crate: a xorshift generator mutates real bodies (python/tests/daydream_bodies.json and full
//! Daydream bodies) structurally (values of other types, boundary numbers, removed and added
//! keys, deeper nesting) and textually (characters inserted, removed, duplicated, truncated).
//!
//! Properties, for every text: no panic; every error has a message that says something
//! (a non-empty field and detail, or a non-empty JSON error); every accepted value survives
//! `to_json` → `from_json` unchanged, and `to_json` is stable. The counts are printed.
//!
//! Bounded: `SDS_FUZZ_ITERATIONS` texts per parser (default 20000: about two seconds), seed
//! `SDS_FUZZ_SEED` (default fixed, so a failure reproduces).

use std::panic::{AssertUnwindSafe, catch_unwind};

use sdstream::{EngineOptions, EngineSettings, Error, StreamDiffusionParams};
use serde_json::{Map, Value, json};

/// xorshift64*: small, fast, and the same sequence everywhere for one seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }

    fn chance(&mut self, one_in: usize) -> bool {
        self.below(one_in) == 0
    }
}

fn env_number(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Numbers at the edges of every range the parsers check, and of the types they parse into.
const NUMBERS: &[&str] = &[
    "0",
    "1",
    "-1",
    "2",
    "7",
    "8",
    "63",
    "64",
    "65",
    "384",
    "512",
    "1024",
    "1025",
    "2048",
    "4096",
    "16384",
    "100",
    "101",
    "0.0",
    "-0.0",
    "0.5",
    "1.0",
    "1.5",
    "0.999999",
    "1e-7",
    "1e-320",
    "1e308",
    "-1e308",
    "1e309",
    "2.5e-1",
    "4294967295",
    "4294967296",
    "9007199254740991",
    "9007199254740992",
    "9007199254740993",
    "9223372036854775807",
    "9223372036854775808",
    "-9223372036854775808",
    "18446744073709551615",
    "18446744073709551616",
    "1e1000",
    "0.1",
    "0.30000000000000004",
    "123456789012345678901234567890",
];

/// Strings for values: ids, enum spellings, empty and odd text.
const STRINGS: &[&str] = &[
    "",
    " ",
    "a cat",
    "stabilityai/sd-turbo",
    "stabilityai/sdxl-turbo",
    "Lykon/dreamshaper-8",
    "nobody/unknown-model",
    "thibaud/controlnet-sd21-depth-diffusers",
    "lllyasviel/control_v11p_sd15_canny",
    "xinsir/controlnet-canny-sdxl-1.0",
    "canny",
    "external",
    "passthrough",
    "slerp",
    "linear",
    "regular",
    "faceid",
    "tensorrt",
    "none",
    "xformers",
    "taesd",
    "full",
    "cpu",
    "cuda",
    "cuda:1",
    "metal",
    "f32",
    "f16",
    "bf16",
    "self",
    "initialize",
    "latest",
    "lossless",
    "blur",
    "latent_feedback",
    "\u{0}",
    "\u{FEFF}",
    "é",
    "🙂",
    "\u{10FFFF}",
    "../../..",
    "/",
    "NaN",
    "Infinity",
    "null",
];

/// Keys that are not fields anywhere, to add as unknown fields.
const FOREIGN_KEYS: &[&str] = &["", "promt", "type", "__proto__", "extra", "Prompt", "é"];

/// Characters the text mutations insert: JSON's syntax and some that break it.
const CHARS: &[char] = &[
    '{', '}', '[', ']', ',', ':', '"', '\\', ' ', '\n', '0', '1', '9', '.', '-', '+', 'e', 'E',
    'n', 't', 'f', 'u', 'a', '/', '\u{0}', '\u{7f}', 'é', '🙂', '\u{2028}',
];

/// A parser's answer: refused, or accepted with what [`round_trips`] says of the value.
type Parsed = Result<Result<usize, String>, Error>;

/// One parser under test.
struct Target<'a> {
    name: &'static str,
    /// Parses a text; when accepted, what [`round_trips`] says of the value.
    parse: &'a dyn Fn(&str) -> Parsed,
    seeds: Vec<Value>,
}

#[derive(Default, Debug)]
struct Counts {
    tried: u64,
    accepted: u64,
    rejected_with_message: u64,
    rejected_without_message: u64,
    panics: u64,
    round_trip_failures: u64,
    /// Accepted bodies whose round trip moved a float by one ulp (issue #20 item 6).
    float_drift: u64,
}

/// Whether an error's message says something beyond its kind.
fn has_message(error: &Error) -> bool {
    match error {
        // `field` is the key's path, empty only for a key that is itself "" (the message then
        // says "unknown field ``").
        Error::InvalidParam { message, .. } => !message.trim().is_empty(),
        Error::Json(message) => !message.trim().is_empty(),
        other => other.to_string().trim().len() > 10,
    }
}

/// Every object key in `value` (recursively), for the added-key mutations.
fn collect_keys(value: &Value, keys: &mut Vec<String>) {
    match value {
        Value::Object(map) => {
            for (k, v) in map {
                if !keys.contains(k) {
                    keys.push(k.clone());
                }
                collect_keys(v, keys);
            }
        }
        Value::Array(items) => items.iter().for_each(|v| collect_keys(v, keys)),
        _ => {}
    }
}

struct Mutator {
    rng: Rng,
    keys: Vec<String>,
}

impl Mutator {
    fn number(&mut self) -> Value {
        let text = match self.rng.below(4) {
            0 => (*self.rng.pick(NUMBERS)).to_string(),
            // A short decimal, as people and UIs write them.
            1 => {
                let mantissa = self.rng.below(200_001) as i64 - 100_000;
                format!("{}e-{}", mantissa, self.rng.below(7))
            }
            2 => (self.rng.next() as i64 >> self.rng.below(64)).to_string(),
            // Any finite double.
            _ => {
                let x = f64::from_bits(self.rng.next());
                if x.is_finite() {
                    serde_json::to_string(&x).unwrap_or_else(|_| "0".into())
                } else {
                    "0.25".into()
                }
            }
        };
        serde_json::from_str(&text).unwrap_or(Value::Null)
    }

    fn string(&mut self) -> Value {
        match self.rng.below(8) {
            0 => Value::String("x".repeat(self.rng.below(400))),
            1 => Value::String(self.rng.pick(&self.keys.clone()).clone()),
            _ => Value::String((*self.rng.pick(STRINGS)).to_string()),
        }
    }

    /// A random value, `depth` levels of nesting at most.
    fn value(&mut self, depth: usize) -> Value {
        match self.rng.below(if depth == 0 { 4 } else { 7 }) {
            0 => Value::Null,
            1 => Value::Bool(self.rng.chance(2)),
            2 => self.number(),
            3 => self.string(),
            4 => {
                let n = self.rng.below(4);
                Value::Array((0..n).map(|_| self.value(depth - 1)).collect())
            }
            // A weighted list: Daydream's [[item, weight], …].
            5 => {
                let n = self.rng.below(4);
                Value::Array(
                    (0..n)
                        .map(|_| json!([self.value(0), self.number()]))
                        .collect(),
                )
            }
            _ => {
                let mut map = Map::new();
                for _ in 0..self.rng.below(4) {
                    let key = self.key();
                    map.insert(key, self.value(depth - 1));
                }
                Value::Object(map)
            }
        }
    }

    fn key(&mut self) -> String {
        if self.rng.chance(6) {
            (*self.rng.pick(FOREIGN_KEYS)).to_string()
        } else {
            self.rng.pick(&self.keys.clone()).clone()
        }
    }

    /// Applies one structural mutation somewhere in `value`.
    fn mutate_tree(&mut self, value: &mut Value) {
        // Walk down a random path, stopping at a random depth.
        let descend = self.rng.chance(3);
        match value {
            Value::Object(map) if !map.is_empty() && descend => {
                let key = map.keys().nth(self.rng.below(map.len())).cloned();
                if let Some(child) = key.and_then(|k| map.get_mut(&k)) {
                    return self.mutate_tree(child);
                }
            }
            Value::Array(items) if !items.is_empty() && descend => {
                let i = self.rng.below(items.len());
                return self.mutate_tree(&mut items[i]);
            }
            _ => {}
        }
        match (self.rng.below(6), &mut *value) {
            (0, Value::Object(map)) if !map.is_empty() => {
                let key = map.keys().nth(self.rng.below(map.len())).cloned();
                if let Some(key) = key {
                    map.remove(&key);
                }
            }
            (1, Value::Object(map)) => {
                let key = self.key();
                let v = self.value(2);
                map.insert(key, v);
            }
            (2, Value::Array(items)) if !items.is_empty() => {
                let i = self.rng.below(items.len());
                let copy = items[i].clone();
                items.insert(i, copy);
            }
            (3, Value::Array(items)) if !items.is_empty() => {
                items.remove(self.rng.below(items.len()));
            }
            (4, v) => *v = json!([v.clone()]),
            _ => *value = self.value(2),
        }
    }

    /// Applies one textual mutation (on characters: the parsers take `&str`).
    fn mutate_text(&mut self, text: &str) -> String {
        let mut chars: Vec<char> = text.chars().collect();
        let len = chars.len();
        let at = self.rng.below(len + 1);
        match self.rng.below(5) {
            0 => chars.insert(at, *self.rng.pick(CHARS)),
            1 if len > 0 => {
                let end = (at + 1 + self.rng.below(8)).min(len);
                chars.drain(at.min(len - 1)..end);
            }
            2 => chars.truncate(at),
            3 if at < len => {
                let end = (at + 1 + self.rng.below(16)).min(len);
                let piece: Vec<char> = chars[at..end].to_vec();
                let to = self.rng.below(len + 1);
                chars.splice(to..to, piece);
            }
            _ if at < len => chars[at] = *self.rng.pick(CHARS),
            _ => chars.push(*self.rng.pick(CHARS)),
        }
        chars.into_iter().collect()
    }

    /// Changes one leaf of `value` to another of its kind (a number near it, any finite
    /// double, another string, the other boolean): mostly bodies that stay valid, so that
    /// accepted bodies and their round trips get as much exercise as refusals.
    fn nudge_leaf(&mut self, value: &mut Value) {
        match value {
            Value::Object(map) if !map.is_empty() => {
                let key = map.keys().nth(self.rng.below(map.len())).cloned();
                if let Some(child) = key.and_then(|k| map.get_mut(&k)) {
                    self.nudge_leaf(child);
                }
            }
            Value::Array(items) if !items.is_empty() => {
                let i = self.rng.below(items.len());
                self.nudge_leaf(&mut items[i]);
            }
            Value::Number(n) => {
                let x = n.as_f64().unwrap_or(0.0);
                *value = match (n.is_f64(), self.rng.below(3)) {
                    // Any double in [0, 2x]: full precision, 17 significant digits.
                    (true, 0) => {
                        json!(x * 2.0 * (self.rng.next() >> 11) as f64 / (1u64 << 53) as f64)
                    }
                    // x with a few decimals changed, as a UI slider writes it.
                    (true, 1) => {
                        json!((x * 1000.0).round() / 1000.0 + self.rng.below(100) as f64 / 1000.0)
                    }
                    (true, _) => self.number(),
                    (false, 0) => json!(
                        n.as_i64()
                            .unwrap_or(0)
                            .wrapping_add(self.rng.below(9) as i64 - 4)
                    ),
                    (false, _) => self.number(),
                };
            }
            Value::Bool(b) => *b = !*b,
            Value::String(_) => *value = self.string(),
            _ => *value = self.value(1),
        }
    }

    /// A text for `target`: a seed with a few mutations, structural, textual or both.
    fn body(&mut self, seeds: &[Value]) -> String {
        let mut tree = self.rng.pick(seeds).clone();
        if self.rng.chance(2) {
            for _ in 0..1 + self.rng.below(2) {
                self.nudge_leaf(&mut tree);
            }
            return tree.to_string();
        }
        for _ in 0..1 + self.rng.below(3) {
            self.mutate_tree(&mut tree);
        }
        let mut text = if self.rng.chance(2) {
            tree.to_string()
        } else {
            serde_json::to_string_pretty(&tree).unwrap_or_default()
        };
        if self.rng.chance(3) {
            for _ in 0..1 + self.rng.below(3) {
                text = self.mutate_text(&text);
            }
        }
        text
    }
}

fn run(target: &Target, mutator: &mut Mutator, iterations: u64) -> Counts {
    let mut counts = Counts::default();
    for i in 0..iterations {
        let text = mutator.body(&target.seeds);
        counts.tried += 1;
        match catch_unwind(AssertUnwindSafe(|| (target.parse)(&text))) {
            Err(_) => {
                counts.panics += 1;
                eprintln!("{}: panic on text {i}: {text}", target.name);
            }
            Ok(Ok(Ok(drifted))) => {
                counts.accepted += 1;
                counts.float_drift += u64::from(drifted > 0);
            }
            Ok(Ok(Err(why))) => {
                counts.accepted += 1;
                counts.round_trip_failures += 1;
                eprintln!("{}: round trip failed ({why}) for: {text}", target.name);
            }
            Ok(Err(error)) if has_message(&error) => counts.rejected_with_message += 1,
            Ok(Err(error)) => {
                counts.rejected_without_message += 1;
                eprintln!(
                    "{}: error without a message {error:?} for: {text}",
                    target.name
                );
            }
        }
    }
    counts
}

/// `to_json` → `from_json` gives the value back, and `to_json` of that is the same text.
/// `Ok(n)` with n > 0: the same but for `n` floats that came back one ulp off (issue #20 item 6:
/// serde_json's default float parsing is not exact), counted apart; anything else is an error.
fn round_trips<T: PartialEq + std::fmt::Debug>(
    value: &T,
    to_json: impl Fn(&T) -> String,
    from_json: impl Fn(&str) -> Result<T, Error>,
) -> Result<usize, String> {
    let written = to_json(value);
    let again = from_json(&written).map_err(|e| format!("its to_json is refused: {e}"))?;
    let rewritten = to_json(&again);
    if &again == value && rewritten == written {
        return Ok(0);
    }
    match floats_one_ulp_off(&written, &rewritten) {
        Ok(0) => Err(format!("changed through JSON: {value:?} became {again:?}")),
        other => other,
    }
}

/// A JSON text cut into its number tokens and the rest (with each number replaced by `#`).
fn split_numbers(text: &str) -> (String, Vec<&str>) {
    let (mut rest, mut numbers) = (String::new(), Vec::new());
    let bytes = text.as_bytes();
    let (mut i, mut in_string) = (0, false);
    while i < bytes.len() {
        let c = bytes[i];
        if in_string {
            rest.push(c as char);
            if c == b'\\' && i + 1 < bytes.len() {
                rest.push(bytes[i + 1] as char);
                i += 1;
            } else if c == b'"' {
                in_string = false;
            }
            i += 1;
        } else if c == b'-' || c.is_ascii_digit() {
            let start = i;
            while i < bytes.len()
                && matches!(bytes[i], b'0'..=b'9' | b'.' | b'e' | b'E' | b'+' | b'-')
            {
                i += 1;
            }
            numbers.push(&text[start..i]);
            rest.push('#');
        } else {
            in_string = c == b'"';
            rest.push(c as char);
            i += 1;
        }
    }
    (rest, numbers)
}

/// How many numbers differ between two JSON texts that must otherwise be equal; an error when
/// anything else differs or a number differs by more than one ulp. Numbers are compared as the
/// standard library parses them (correctly rounded), not as serde_json does.
fn floats_one_ulp_off(a: &str, b: &str) -> Result<usize, String> {
    let ((rest_a, numbers_a), (rest_b, numbers_b)) = (split_numbers(a), split_numbers(b));
    if rest_a != rest_b || numbers_a.len() != numbers_b.len() {
        return Err(format!("{a} became {b}"));
    }
    let mut off = 0;
    for (x, y) in numbers_a.iter().zip(&numbers_b).filter(|(x, y)| x != y) {
        match (x.parse::<f64>(), y.parse::<f64>()) {
            (Ok(f), Ok(g))
                if f.is_sign_negative() == g.is_sign_negative()
                    && f.to_bits().abs_diff(g.to_bits()) <= 1 =>
            {
                off += 1
            }
            _ => return Err(format!("{x} became {y} in {a}")),
        }
    }
    Ok(off)
}

fn daydream_bodies() -> Vec<(Value, Option<Value>)> {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../python/tests/daydream_bodies.json"
    );
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let entries: Vec<Value> = serde_json::from_str(&text).expect("daydream_bodies.json");
    entries
        .into_iter()
        .map(|entry| {
            // A body given as a string is a text that is not an object; seed with its parse
            // when it has one.
            let body = match &entry["body"] {
                Value::String(s) => serde_json::from_str(s).unwrap_or(Value::String(s.clone())),
                other => other.clone(),
            };
            (body, entry.get("settings").cloned())
        })
        .collect()
}

/// A full Daydream body: every nested model present.
fn full_body() -> Value {
    json!({
        "model_id": "stabilityai/sdxl-turbo",
        "prompt": [["neon glass shards", 0.7], ["liquid smoke", 0.3]],
        "negative_prompt": "blurry",
        "t_index_list": [12, 36],
        "seed": [[42, 0.25], [7, 0.75]],
        "guidance_scale": 1.2,
        "delta": 0.7,
        "width": 1024,
        "height": 1024,
        "controlnets": [
            {"model_id": "xinsir/controlnet-depth-sdxl-1.0", "conditioning_scale": 0.7,
             "preprocessor": "depth_tensorrt", "preprocessor_params": {"a": 1},
             "enabled": true, "control_guidance_start": 0.1, "control_guidance_end": 0.9,
             "conditioning_channels": 3}
        ],
        "ip_adapter": {"scale": 0.6, "enabled": true, "type": "faceid",
                       "weight_type": "style transfer"},
        "image_preprocessing": {"enabled": true,
                                "processors": [{"type": "blur", "params": {"radius": 2}}]},
        "latent_postprocessing": {"processors": [{"type": "latent_feedback", "enabled": false}]},
        "lora_dict": {"some/lora": 0.8},
        "acceleration": "xformers",
        "show_reloading_frame": false
    })
}

#[test]
fn parsers_survive_mutated_bodies() {
    let iterations = env_number("SDS_FUZZ_ITERATIONS", 20_000);
    let seed = env_number("SDS_FUZZ_SEED", 0x5D5_7EA4_F00D_2020) | 1;

    let bodies = daydream_bodies();
    let mut param_seeds: Vec<Value> = bodies.iter().map(|(b, _)| b.clone()).collect();
    param_seeds.push(full_body());
    param_seeds.push(serde_json::from_str(&StreamDiffusionParams::default().to_json()).unwrap());
    let mut settings_seeds: Vec<Value> = bodies.iter().filter_map(|(_, s)| s.clone()).collect();
    settings_seeds.extend([
        serde_json::from_str(&EngineSettings::default().to_json()).unwrap(),
        json!({"vae": "full", "allow_any_resolution": true, "frame_buffer_size": 2,
               "model_root": "models", "device": "cuda:1", "dtype": "f16",
               "cfg_type": "initialize"}),
    ]);
    let options_seeds = vec![
        serde_json::from_str(&EngineOptions::default().to_json()).unwrap(),
        json!({"drop_policy": "lossless", "queue_capacity": 1024, "output_capacity": 1,
               "warmup": false, "input_timeout_ms": 0, "fps_window_ms": 3600000}),
    ];
    let mut keys = Vec::new();
    for seed in param_seeds
        .iter()
        .chain(&settings_seeds)
        .chain(&options_seeds)
    {
        collect_keys(seed, &mut keys);
    }
    let mut mutator = Mutator {
        rng: Rng(seed),
        keys,
    };

    // Bodies under both resolution rules (a test setting relaxes them).
    let strict = EngineSettings::default();
    let relaxed = EngineSettings {
        allow_any_resolution: true,
        ..EngineSettings::default()
    };
    let base = StreamDiffusionParams::from_json(&full_body().to_string()).expect("full body");
    let params_parse = |text: &str| {
        let settings = if text.len().is_multiple_of(2) {
            &strict
        } else {
            &relaxed
        };
        StreamDiffusionParams::from_json_with(text, settings).map(|p| {
            round_trips(&p, StreamDiffusionParams::to_json, |t| {
                StreamDiffusionParams::from_json_with(t, settings)
            })
        })
    };
    // The same texts as JSON Merge Patches onto a full body (the server's PATCH).
    let patch_parse = |text: &str| {
        let patch: Value = serde_json::from_str(text).map_err(|e| Error::Json(e.to_string()))?;
        base.patched(&patch, &relaxed).map(|p| {
            round_trips(&p, StreamDiffusionParams::to_json, |t| {
                StreamDiffusionParams::from_json_with(t, &relaxed)
            })
        })
    };
    let settings_parse = |text: &str| {
        EngineSettings::from_json(text)
            .map(|s| round_trips(&s, EngineSettings::to_json, EngineSettings::from_json))
    };
    let options_parse = |text: &str| {
        EngineOptions::from_json(text)
            .map(|o| round_trips(&o, EngineOptions::to_json, EngineOptions::from_json))
    };
    let targets = [
        Target {
            name: "StreamDiffusionParams::from_json_with",
            parse: &params_parse,
            seeds: param_seeds.clone(),
        },
        Target {
            name: "StreamDiffusionParams::patched",
            parse: &patch_parse,
            seeds: param_seeds,
        },
        Target {
            name: "EngineSettings::from_json",
            parse: &settings_parse,
            seeds: settings_seeds,
        },
        Target {
            name: "EngineOptions::from_json",
            parse: &options_parse,
            seeds: options_seeds,
        },
    ];
    let mut all = Vec::new();
    for target in &targets {
        let counts = run(target, &mut mutator, iterations);
        println!(
            "{}: bodies tried {}, accepted {}, rejected with messages {}, rejected without \
             messages {}, panics {}, round-trip failures {}, round trips with a float one ulp \
             off (item 6) {}",
            target.name,
            counts.tried,
            counts.accepted,
            counts.rejected_with_message,
            counts.rejected_without_message,
            counts.panics,
            counts.round_trip_failures,
            counts.float_drift
        );
        all.push((target.name, counts));
    }
    println!("(seed {seed:#x}, {iterations} texts per parser)");
    for (name, counts) in &all {
        assert_eq!(counts.panics, 0, "{name}");
        assert_eq!(counts.rejected_without_message, 0, "{name}");
        assert_eq!(counts.round_trip_failures, 0, "{name}");
        // serde_json's float_roundtrip parsing (issue #20 item 6): not one ulp may move.
        assert_eq!(counts.float_drift, 0, "{name}: floats moved by one ulp");
        assert_eq!(
            counts.accepted + counts.rejected_with_message,
            counts.tried,
            "{name}"
        );
        // Both outcomes are exercised: the mutations are neither all fatal nor all harmless.
        assert!(
            counts.accepted >= counts.tried / 20
                && counts.rejected_with_message >= counts.tried / 20,
            "{name}: {counts:?}"
        );
    }
}
