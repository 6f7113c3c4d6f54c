//! Checks a tool call's arguments against the tool's own published input schema.
//!
//! The schema (generated from the argument types, with ranges, lengths and enums)
//! is the single statement of what a tool accepts; checking against it means the
//! assistant is told exactly what the schema already said, naming the field and
//! the allowed range (`width must be between 64 and 4096, got 5000`), before
//! anything reaches the broker. Only the keywords schemars emits are understood:
//! `type`, `minimum`/`maximum`, `minLength`/`maxLength`, `minItems`/`maxItems`,
//! `enum`, `properties`/`required`/`additionalProperties`, `items`, `$ref`,
//! `anyOf`/`oneOf`. Cross-field rules live with the argument types.

use serde_json::{Map, Value};

use crate::error::ToolError;

/// Checks `args` against the root object schema `schema`.
pub fn check_arguments(
    schema: &Map<String, Value>,
    args: &Map<String, Value>,
) -> Result<(), ToolError> {
    let root = Value::Object(schema.clone());
    check(&root, &root, &Value::Object(args.clone()), "")
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

fn field_name(path: &str) -> String {
    if path.is_empty() {
        "arguments".into()
    } else {
        path.to_string()
    }
}

/// Follows a local `$ref` (`#/$defs/Name`).
fn resolve<'a>(root: &'a Value, schema: &'a Value) -> &'a Value {
    let mut current = schema;
    for _ in 0..16 {
        let Some(reference) = current.get("$ref").and_then(Value::as_str) else {
            return current;
        };
        let target = reference
            .strip_prefix('#')
            .and_then(|pointer| root.pointer(pointer));
        match target {
            Some(t) => current = t,
            None => return current,
        }
    }
    current
}

fn type_matches(ty: &str, value: &Value) -> bool {
    match ty {
        "null" => value.is_null(),
        "boolean" => value.is_boolean(),
        "integer" => value.is_i64() || value.is_u64(),
        "number" => value.is_number(),
        "string" => value.is_string(),
        "array" => value.is_array(),
        "object" => value.is_object(),
        _ => true,
    }
}

fn number(v: &Value) -> String {
    match v.as_f64() {
        Some(f) if f.fract() == 0.0 && f.abs() < 1e15 => format!("{}", f as i64),
        _ => v.to_string(),
    }
}

fn check(root: &Value, schema: &Value, value: &Value, path: &str) -> Result<(), ToolError> {
    let schema = resolve(root, schema);
    let invalid = |reason: String| Err(ToolError::invalid(field_name(path), reason));

    for key in ["anyOf", "oneOf"] {
        if let Some(branches) = schema.get(key).and_then(Value::as_array) {
            let mut first_error = None;
            for branch in branches {
                match check(root, branch, value, path) {
                    Ok(()) => return Ok(()),
                    // Prefer the error of a branch of the value's own type: it says
                    // what is wrong with the value rather than that it is not null.
                    Err(e) => {
                        let same_type = resolve(root, branch)
                            .get("type")
                            .map(|t| types_of(t).iter().any(|t| type_matches(t, value)))
                            .unwrap_or(false);
                        if same_type || first_error.is_none() {
                            first_error = Some(e);
                        }
                    }
                }
            }
            if let Some(e) = first_error {
                return Err(e);
            }
        }
    }

    if let Some(ty) = schema.get("type") {
        let types = types_of(ty);
        if !types.iter().any(|t| type_matches(t, value)) {
            let wanted = types
                .iter()
                .filter(|t| **t != "null")
                .cloned()
                .collect::<Vec<_>>()
                .join(" or ");
            return invalid(format!(
                "must be {} {wanted}, got {value}",
                article(&wanted)
            ));
        }
    }

    if let Some(allowed) = schema.get("enum").and_then(Value::as_array) {
        if !allowed.contains(value) {
            let names: Vec<String> = allowed.iter().map(Value::to_string).collect();
            return invalid(format!("must be one of {}, got {value}", names.join(", ")));
        }
    }

    if let Some(x) = value.as_f64().filter(|_| value.is_number()) {
        let min = schema.get("minimum").and_then(Value::as_f64);
        let max = schema.get("maximum").and_then(Value::as_f64);
        if min.is_some_and(|m| x < m) || max.is_some_and(|m| x > m) {
            let range = match (schema.get("minimum"), schema.get("maximum")) {
                (Some(lo), Some(hi)) => format!("between {} and {}", number(lo), number(hi)),
                (Some(lo), None) => format!("at least {}", number(lo)),
                (None, Some(hi)) => format!("at most {}", number(hi)),
                (None, None) => unreachable!("a bound was crossed"),
            };
            return invalid(format!("must be {range}, got {}", number(value)));
        }
    }

    if let Some(s) = value.as_str() {
        let len = s.chars().count() as u64;
        if let Some(min) = schema
            .get("minLength")
            .and_then(Value::as_u64)
            .filter(|m| len < *m)
        {
            return invalid(if min == 1 {
                "must not be empty".into()
            } else {
                format!("must be at least {min} characters long")
            });
        }
        if let Some(max) = schema
            .get("maxLength")
            .and_then(Value::as_u64)
            .filter(|m| len > *m)
        {
            return invalid(format!("must be at most {max} characters long, got {len}"));
        }
    }

    if let Some(items) = value.as_array() {
        let n = items.len() as u64;
        let min = schema.get("minItems").and_then(Value::as_u64);
        let max = schema.get("maxItems").and_then(Value::as_u64);
        if min.is_some_and(|m| n < m) || max.is_some_and(|m| n > m) {
            let range = match (min, max) {
                (Some(lo), Some(hi)) => format!("between {lo} and {hi} items"),
                (Some(lo), None) => format!("at least {lo} items"),
                (None, Some(hi)) => format!("at most {hi} items"),
                (None, None) => unreachable!("a bound was crossed"),
            };
            return invalid(format!("must have {range}, got {n}"));
        }
        if let Some(item_schema) = schema.get("items") {
            for (i, item) in items.iter().enumerate() {
                check(
                    root,
                    item_schema,
                    item,
                    &format!("{}[{i}]", field_name(path)),
                )?;
            }
        }
    }

    if let Some(object) = value.as_object() {
        let properties = schema.get("properties").and_then(Value::as_object);
        if let Some(required) = schema.get("required").and_then(Value::as_array) {
            for key in required.iter().filter_map(Value::as_str) {
                if !object.contains_key(key) {
                    return Err(ToolError::invalid(join(path, key), "is required"));
                }
            }
        }
        let closed = properties.is_some()
            && !schema
                .get("additionalProperties")
                .is_some_and(|a| a != &Value::Bool(false));
        for (key, v) in object {
            match properties.and_then(|p| p.get(key)) {
                Some(property) => check(root, property, v, &join(path, key))?,
                None if closed => {
                    let mut known: Vec<&str> = properties
                        .into_iter()
                        .flat_map(|p| p.keys())
                        .map(String::as_str)
                        .collect();
                    known.sort_unstable();
                    return Err(ToolError::invalid(
                        join(path, key),
                        format!(
                            "is not an argument of this tool; known: {}",
                            known.join(", ")
                        ),
                    ));
                }
                None => {}
            }
        }
    }
    Ok(())
}

fn types_of(ty: &Value) -> Vec<&str> {
    match ty {
        Value::String(s) => vec![s.as_str()],
        Value::Array(a) => a.iter().filter_map(Value::as_str).collect(),
        _ => Vec::new(),
    }
}

fn article(word: &str) -> &'static str {
    if word.starts_with(['a', 'e', 'i', 'o', 'u']) {
        "an"
    } else {
        "a"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn schema() -> Map<String, Value> {
        json!({
            "type": "object",
            "properties": {
                "width": { "type": ["integer", "null"], "minimum": 64, "maximum": 4096 },
                "prompt": { "type": "string", "minLength": 1, "maxLength": 10 },
                "style": { "anyOf": [{ "$ref": "#/$defs/Style" }, { "type": "null" }] },
                "loras": { "type": "array", "maxItems": 2, "items": { "$ref": "#/$defs/Lora" } },
                "params": { "type": "object", "additionalProperties": true }
            },
            "required": ["prompt"],
            "$defs": {
                "Style": { "type": "string", "enum": ["pixel_art", "retro"] },
                "Lora": {
                    "type": "object",
                    "properties": { "name": { "type": "string" }, "strength": { "type": "number", "minimum": -10, "maximum": 10 } },
                    "required": ["name"]
                }
            }
        })
        .as_object()
        .cloned()
        .unwrap()
    }

    fn error_of(args: Value) -> (String, String) {
        match check_arguments(&schema(), args.as_object().unwrap()).unwrap_err() {
            ToolError::InvalidArgument { field, reason } => (field, reason),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn good_arguments_pass() {
        let ok = json!({"prompt": "a kiln", "width": 512, "style": "retro", "loras": [{"name": "x", "strength": 0.5}], "params": {"anything": [1]}});
        check_arguments(&schema(), ok.as_object().unwrap()).unwrap();
        let nulls = json!({"prompt": "a", "width": null, "style": null});
        check_arguments(&schema(), nulls.as_object().unwrap()).unwrap();
    }

    #[test]
    fn each_failure_names_its_field_and_the_rule() {
        assert_eq!(
            error_of(json!({"prompt": "a", "width": 5000})),
            (
                "width".into(),
                "must be between 64 and 4096, got 5000".into()
            )
        );
        assert_eq!(
            error_of(json!({"width": 512})),
            ("prompt".into(), "is required".into())
        );
        assert_eq!(
            error_of(json!({"prompt": ""})),
            ("prompt".into(), "must not be empty".into())
        );
        let (field, reason) = error_of(json!({"prompt": "a", "style": "oil"}));
        assert_eq!(field, "style");
        assert!(reason.contains("\"pixel_art\""), "{reason}");
        let (field, reason) = error_of(
            json!({"prompt": "a", "loras": [{"name": "x"}, {"name": "y", "strength": 11}]}),
        );
        assert_eq!(
            (field.as_str(), reason.as_str()),
            ("loras[1].strength", "must be between -10 and 10, got 11")
        );
        let (field, reason) = error_of(json!({"prompt": "a", "widht": 5}));
        assert_eq!(field, "widht");
        assert!(
            reason.contains("known: loras, params, prompt, style, width"),
            "{reason}"
        );
        let (field, reason) = error_of(json!({"prompt": "a", "width": "big"}));
        assert_eq!(
            (field.as_str(), reason.as_str()),
            ("width", "must be an integer, got \"big\"")
        );
        let (field, _) = error_of(
            json!({"prompt": "a", "loras": [{"name": "a"}, {"name": "b"}, {"name": "c"}]}),
        );
        assert_eq!(field, "loras");
    }
}
