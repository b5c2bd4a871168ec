//! Reading a processor's `params` object: Daydream's names and defaults, checked types and
//! ranges, errors that name `<field>.<key>`. Keys a processor does not know are ignored, as
//! Daydream passes its whole params dict as keyword arguments that processors pick from
//! (`image_resolution` and the like travel along); `null` means "use the default".

use std::ops::RangeInclusive;

use serde_json::{Map, Value};

use crate::{Error, Result};

/// A processor's `params`, with the path its errors name (`image_preprocessing.processors[0].params`).
pub struct ParamReader<'a> {
    params: &'a Map<String, Value>,
    field: &'a str,
}

impl<'a> ParamReader<'a> {
    /// Reads `params`; `field` is the path of the params object itself.
    pub fn new(params: &'a Map<String, Value>, field: &'a str) -> Self {
        ParamReader { params, field }
    }

    pub(crate) fn error(&self, key: &str, message: String) -> Error {
        Error::param(format!("{}.{key}", self.field), message)
    }

    fn value(&self, key: &str) -> Option<&'a Value> {
        self.params.get(key).filter(|v| !v.is_null())
    }

    /// A number (integer or float) in `range`, `default` when absent.
    pub fn number(&self, key: &str, default: f64, range: RangeInclusive<f64>) -> Result<f64> {
        let Some(value) = self.value(key) else {
            return Ok(default);
        };
        let Some(x) = value.as_f64() else {
            return Err(self.error(key, format!("expected a number, got {value}")));
        };
        if !range.contains(&x) {
            return Err(self.error(
                key,
                format!("{x} is out of range [{}, {}]", range.start(), range.end()),
            ));
        }
        Ok(x)
    }

    /// An integer in `range`, `default` when absent; a float with an integral value is accepted
    /// (JSON from some hosts writes `15.0`).
    pub fn integer(&self, key: &str, default: i64, range: RangeInclusive<i64>) -> Result<i64> {
        let Some(value) = self.value(key) else {
            return Ok(default);
        };
        let n = match (value.as_i64(), value.as_f64()) {
            (Some(n), _) => n,
            (None, Some(x)) if x.fract() == 0.0 && x.abs() < 1e15 => x as i64,
            _ => return Err(self.error(key, format!("expected an integer, got {value}"))),
        };
        if !range.contains(&n) {
            return Err(self.error(
                key,
                format!("{n} is out of range [{}, {}]", range.start(), range.end()),
            ));
        }
        Ok(n)
    }

    /// A boolean, `default` when absent.
    pub fn boolean(&self, key: &str, default: bool) -> Result<bool> {
        match self.value(key) {
            None => Ok(default),
            Some(Value::Bool(b)) => Ok(*b),
            Some(other) => Err(self.error(key, format!("expected true or false, got {other}"))),
        }
    }

    /// A string, `None` when absent.
    pub fn string(&self, key: &str) -> Result<Option<&'a str>> {
        match self.value(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(other) => Err(self.error(key, format!("expected a string, got {other}"))),
        }
    }

    /// One of `options`, `default` when absent.
    pub fn choice(
        &self,
        key: &str,
        default: &'static str,
        options: &[&'static str],
    ) -> Result<&'static str> {
        let Some(value) = self.value(key) else {
            return Ok(default);
        };
        value
            .as_str()
            .and_then(|s| options.iter().find(|o| **o == s).copied())
            .ok_or_else(|| self.error(key, format!("expected one of {options:?}, got {value}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn map(v: Value) -> Map<String, Value> {
        v.as_object().cloned().unwrap_or_default()
    }

    #[test]
    fn defaults_types_and_ranges() {
        let m = map(json!({"a": 3, "b": 2.5, "c": "x", "d": null, "e": 15.0, "f": true}));
        let r = ParamReader::new(&m, "p.params");
        assert_eq!(r.integer("a", 0, 0..=5).unwrap(), 3);
        assert_eq!(r.integer("e", 0, 0..=20).unwrap(), 15);
        assert_eq!(r.integer("d", 7, 0..=20).unwrap(), 7);
        assert_eq!(r.number("b", 0.0, 0.0..=3.0).unwrap(), 2.5);
        assert_eq!(r.number("missing", 1.5, 0.0..=3.0).unwrap(), 1.5);
        assert!(r.boolean("f", false).unwrap());
        let err = r.integer("b", 0, 0..=5).unwrap_err().to_string();
        assert!(
            err.contains("p.params.b") && err.contains("integer"),
            "{err}"
        );
        let err = r.number("a", 0.0, 0.0..=1.0).unwrap_err().to_string();
        assert!(
            err.contains("p.params.a") && err.contains("out of range"),
            "{err}"
        );
        let err = r.number("c", 0.0, 0.0..=1.0).unwrap_err().to_string();
        assert!(err.contains("expected a number"), "{err}");
        let err = r.choice("c", "y", &["y", "z"]).unwrap_err().to_string();
        assert!(err.contains("p.params.c"), "{err}");
        assert!(r.boolean("a", false).is_err());
    }
}
