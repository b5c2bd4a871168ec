//! JSON in and out, with the path of whatever failed to parse.

use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::{Error, Result};

/// Where a JSON object (not a list) is required below the root: the paths of nested structs.
/// serde's derived structs also accept a list of the fields in order; Daydream (pydantic) does
/// not, so [`parse`] refuses lists at these places before deserialising.
#[derive(Clone, Copy)]
pub(crate) enum Shape {
    /// An object whose named members (when present and not null) are objects of these shapes.
    Object(&'static [(&'static str, Shape)]),
    /// A list whose items are of this shape.
    ListOf(&'static Shape),
}

/// Parses `text` as `T`. Syntax errors become [`Error::Json`]; a wrong type, a bad enum value or
/// an unknown field becomes [`Error::InvalidParam`] whose `field` is the path
/// (`controlnets[2].conditioning_scale`).
pub(crate) fn parse<T: DeserializeOwned>(text: &str, shape: Shape) -> Result<T> {
    let tree: Value = serde_json::from_str(text).map_err(|e| Error::Json(e.to_string()))?;
    if !tree.is_object() {
        return Err(Error::Json(format!(
            "expected a JSON object at the top level, got {}",
            json_kind(&tree)
        )));
    }
    check_shape(&tree, shape, "")?;
    let mut de = serde_json::Deserializer::from_str(text);
    let value: T = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if inner.is_data() && path != "." {
            Error::param(path, inner.to_string())
        } else {
            Error::Json(inner.to_string())
        }
    })?;
    // Trailing characters after the object are a syntax error, as in `serde_json::from_str`.
    de.end().map_err(|e| Error::Json(e.to_string()))?;
    Ok(value)
}

/// Serialises `value`. The parameter types hold only strings, numbers, booleans, lists and
/// string-keyed maps, for which serde_json cannot fail.
pub(crate) fn to_string<T: Serialize>(value: &T) -> String {
    match serde_json::to_string(value) {
        Ok(text) => text,
        // Unreachable for these types; an error text beats a panic across an FFI boundary.
        Err(e) => format!("{{\"error\":{:?}}}", e.to_string()),
    }
}

/// Applies `patch` to `target` as JSON Merge Patch (RFC 7386) says: an object patch merges
/// member by member, recursively; a `null` member removes that member (so a parameter goes
/// back to its default); anything else replaces. The one merge of partial parameters: the
/// server's PATCH and create bodies and the Python module's keyword updates all use it.
pub fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(members) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(serde_json::Map::new());
    }
    let Value::Object(target) = target else {
        unreachable!("made an object above")
    };
    for (name, value) in members {
        if value.is_null() {
            target.remove(name);
        } else {
            merge_patch(target.entry(name.clone()).or_insert(Value::Null), value);
        }
    }
}

fn check_shape(value: &Value, shape: Shape, path: &str) -> Result<()> {
    match (shape, value) {
        (_, Value::Null) => Ok(()),
        (Shape::Object(members), Value::Object(map)) => {
            for (name, member_shape) in members {
                if let Some(member) = map.get(*name) {
                    let member_path = if path.is_empty() {
                        (*name).to_owned()
                    } else {
                        format!("{path}.{name}")
                    };
                    check_shape(member, *member_shape, &member_path)?;
                }
            }
            Ok(())
        }
        (Shape::ListOf(item), Value::Array(items)) => {
            for (i, element) in items.iter().enumerate() {
                check_shape(element, *item, &format!("{path}[{i}]"))?;
            }
            Ok(())
        }
        (Shape::Object(_), other) => Err(Error::param(
            path,
            format!("{path} must be an object, got {}", json_kind(other)),
        )),
        // A non-list where a list belongs: serde's own message says it well.
        (Shape::ListOf(_), _) => Ok(()),
    }
}

/// What kind of JSON value `value` is ("a string", "an object", …), for messages that name a
/// wrong type without echoing the input. The params, the loaders and the server's bodies all
/// say it this way.
pub fn json_kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// The examples of RFC 7386, appendix A, and nested nulls inside an added object.
    #[test]
    fn merge_patch_follows_rfc_7386() {
        let cases = [
            (json!({"a": "b"}), json!({"a": "c"}), json!({"a": "c"})),
            (
                json!({"a": "b"}),
                json!({"b": "c"}),
                json!({"a": "b", "b": "c"}),
            ),
            (json!({"a": "b"}), json!({"a": null}), json!({})),
            (
                json!({"a": "b", "b": "c"}),
                json!({"a": null}),
                json!({"b": "c"}),
            ),
            (json!({"a": ["b"]}), json!({"a": "c"}), json!({"a": "c"})),
            (json!({"a": "c"}), json!({"a": ["b"]}), json!({"a": ["b"]})),
            (
                json!({"a": {"b": "c"}}),
                json!({"a": {"b": "d", "c": null}}),
                json!({"a": {"b": "d"}}),
            ),
            (
                json!({"a": [{"b": "c"}]}),
                json!({"a": [1]}),
                json!({"a": [1]}),
            ),
            (json!(["a", "b"]), json!(["c", "d"]), json!(["c", "d"])),
            (json!({"a": "b"}), json!(["c"]), json!(["c"])),
            (json!({"a": "foo"}), json!(null), json!(null)),
            (json!({"a": "foo"}), json!("bar"), json!("bar")),
            (
                json!({"e": null}),
                json!({"a": 1}),
                json!({"e": null, "a": 1}),
            ),
            (
                json!([1, 2]),
                json!({"a": "b", "c": null}),
                json!({"a": "b"}),
            ),
            (
                json!({}),
                json!({"a": {"bb": {"ccc": null}}}),
                json!({"a": {"bb": {}}}),
            ),
        ];
        for (target, patch, want) in cases {
            let mut got = target.clone();
            merge_patch(&mut got, &patch);
            assert_eq!(got, want, "{target} + {patch}");
        }
    }
}
