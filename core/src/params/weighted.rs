//! Prompt and seed: one value, or a weighted list that the pipeline blends.

use std::fmt;
use std::marker::PhantomData;

use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};

/// How several prompts or seeds are blended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum InterpolationMethod {
    /// Weighted sum.
    Linear,
    /// Spherical interpolation (two inputs; a weighted sum for more).
    Slerp,
}

impl fmt::Display for InterpolationMethod {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            InterpolationMethod::Linear => "linear",
            InterpolationMethod::Slerp => "slerp",
        })
    }
}

/// A prompt: `"text"` or `[["text", weight], …]`.
///
/// Serialised untagged, exactly as written: a string stays a string, a list stays a list.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Prompt {
    /// One text, weight 1.
    Text(String),
    /// Texts with weights, blended by `prompt_interpolation_method`.
    Weighted(Vec<(String, f64)>),
}

impl Prompt {
    /// The prompt as `(text, weight)` pairs; a plain text is `[(text, 1.0)]`, as Daydream does.
    pub fn weighted(&self) -> Vec<(&str, f64)> {
        match self {
            Prompt::Text(text) => vec![(text.as_str(), 1.0)],
            Prompt::Weighted(items) => items.iter().map(|(t, w)| (t.as_str(), *w)).collect(),
        }
    }

    /// The texts alone, in order.
    pub fn texts(&self) -> Vec<&str> {
        self.weighted().into_iter().map(|(t, _)| t).collect()
    }
}

impl Default for Prompt {
    fn default() -> Self {
        Prompt::Text("flowers".to_owned())
    }
}

impl From<&str> for Prompt {
    fn from(text: &str) -> Self {
        Prompt::Text(text.to_owned())
    }
}

/// A seed: `42` or `[[seed, weight], …]`.
///
/// Serialised untagged, exactly as written.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Seed {
    /// One seed, weight 1.
    Single(i64),
    /// Seeds with weights; their noises are blended by `seed_interpolation_method`.
    Weighted(Vec<(i64, f64)>),
}

impl Seed {
    /// The seed as `(seed, weight)` pairs; a single seed is `[(seed, 1.0)]`, as Daydream does.
    pub fn weighted(&self) -> Vec<(i64, f64)> {
        match self {
            Seed::Single(seed) => vec![(*seed, 1.0)],
            Seed::Weighted(items) => items.clone(),
        }
    }

    /// The seeds alone, in order.
    pub fn seeds(&self) -> Vec<i64> {
        self.weighted().into_iter().map(|(s, _)| s).collect()
    }
}

impl Default for Seed {
    fn default() -> Self {
        Seed::Single(789)
    }
}

impl From<i64> for Seed {
    fn from(seed: i64) -> Self {
        Seed::Single(seed)
    }
}

// Hand-written deserialisers instead of `#[serde(untagged)]`: an untagged enum reports only
// "did not match any variant", while these say what was expected at which list element.

impl<'de> Deserialize<'de> for Prompt {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(OneOrWeighted::<String, Prompt>::new(
            "a prompt string or a list of [text, weight] pairs",
        ))
    }
}

impl<'de> Deserialize<'de> for Seed {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(OneOrWeighted::<i64, Seed>::new(
            "an integer seed or a list of [seed, weight] pairs",
        ))
    }
}

/// Builds a [`Prompt`] or [`Seed`] from its single or weighted form.
trait FromOneOrWeighted<T>: Sized {
    fn one(value: T) -> Self;
    fn weighted(items: Vec<(T, f64)>) -> Self;
}

impl FromOneOrWeighted<String> for Prompt {
    fn one(value: String) -> Self {
        Prompt::Text(value)
    }
    fn weighted(items: Vec<(String, f64)>) -> Self {
        Prompt::Weighted(items)
    }
}

impl FromOneOrWeighted<i64> for Seed {
    fn one(value: i64) -> Self {
        Seed::Single(value)
    }
    fn weighted(items: Vec<(i64, f64)>) -> Self {
        Seed::Weighted(items)
    }
}

struct OneOrWeighted<T, Out> {
    expecting: &'static str,
    marker: PhantomData<(T, Out)>,
}

impl<T, Out> OneOrWeighted<T, Out> {
    fn new(expecting: &'static str) -> Self {
        OneOrWeighted {
            expecting,
            marker: PhantomData,
        }
    }
}

impl<'de, T, Out> Visitor<'de> for OneOrWeighted<T, Out>
where
    T: Deserialize<'de> + ScalarFrom,
    Out: FromOneOrWeighted<T>,
{
    type Value = Out;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.expecting)
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Out, E> {
        T::from_str_value(v)
            .map(Out::one)
            .ok_or_else(|| E::invalid_type(de::Unexpected::Str(v), &self))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Out, E> {
        T::from_i64_value(v)
            .map(Out::one)
            .ok_or_else(|| E::invalid_type(de::Unexpected::Signed(v), &self))
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Out, E> {
        match i64::try_from(v) {
            Ok(v) => self.visit_i64(v),
            Err(_) => Err(E::invalid_value(de::Unexpected::Unsigned(v), &self)),
        }
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Out, A::Error> {
        let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(0));
        while let Some(pair) = seq.next_element::<(T, f64)>()? {
            items.push(pair);
        }
        Ok(Out::weighted(items))
    }
}

/// The scalar forms a single prompt or seed may take in JSON.
trait ScalarFrom: Sized {
    fn from_str_value(_: &str) -> Option<Self> {
        None
    }
    fn from_i64_value(_: i64) -> Option<Self> {
        None
    }
}

impl ScalarFrom for String {
    fn from_str_value(v: &str) -> Option<Self> {
        Some(v.to_owned())
    }
}

impl ScalarFrom for i64 {
    fn from_i64_value(v: i64) -> Option<Self> {
        Some(v)
    }
}
