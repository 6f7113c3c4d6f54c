//! Checks a tool call's arguments against the tool's own published input schema.
//!
//! The schema (generated from the argument types, with ranges, lengths and enums,
//! then described from the fleet and the broker's limits by
//! [`crate::tool_params`]) is the single statement of what a tool accepts;
//! checking against it means the assistant is told exactly what the schema
//! already said, naming the field and the allowed range (`width must be between
//! 64 and 2048, got 5000`), before
//! anything reaches the broker. Only the keywords schemars emits are understood:
//! `type`, `minimum`/`maximum`, `minLength`/`maxLength`, `minItems`/`maxItems`,
//! `enum`, `properties`/`required`/`additionalProperties`, `items`, `$ref`,
//! `anyOf`/`oneOf`, and a `oneOf` whose branches each require one field as an
//! "exactly one of" rule. Other cross-field rules live with the argument types.
//! [`coerce_arguments`] first reads the values the way JSON Schema and form-based
//! clients mean them (`512.0`, `"4"`, `null`).

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
        // JSON Schema counts 512.0 as an integer.
        "integer" => {
            value.is_i64()
                || value.is_u64()
                || value
                    .as_f64()
                    .is_some_and(|f| f.fract() == 0.0 && f.is_finite())
        }
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

    if let Some(names) = exactly_one_of(schema) {
        if let Some(object) = value.as_object() {
            let given: Vec<&str> = names
                .iter()
                .copied()
                .filter(|n| object.contains_key(*n))
                .collect();
            let list = names
                .iter()
                .map(|n| format!("`{n}`"))
                .collect::<Vec<_>>()
                .join(" or ");
            match given.as_slice() {
                [_] => {}
                [] => {
                    return Err(ToolError::invalid(
                        join(path, names[0]),
                        format!("give exactly one of {list}"),
                    ))
                }
                // Nested (an input image): the object is at fault; at the top, the
                // second argument given.
                [_, second, ..] => {
                    return Err(ToolError::invalid(
                        if path.is_empty() {
                            second.to_string()
                        } else {
                            path.to_string()
                        },
                        format!("give exactly one of {list}, not several"),
                    ))
                }
            }
        }
    } else if let Some(consts) = const_choices(root, schema) {
        // A oneOf of `const`s (an enum with a description per value).
        if !consts.contains(&value) {
            let names: Vec<String> = consts.iter().map(|v| v.to_string()).collect();
            return invalid(format!("must be one of {}, got {value}", names.join(", ")));
        }
    } else {
        for key in ["anyOf", "oneOf"] {
            if let Some(branches) = schema.get(key).and_then(Value::as_array) {
                let mut first_error = None;
                let mut passed = false;
                for branch in branches {
                    match check(root, branch, value, path) {
                        Ok(()) => {
                            passed = true;
                            break;
                        }
                        // Prefer the error of a branch of the value's own type: it says
                        // what is wrong with the value rather than that it is another type.
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
                if !passed {
                    if let Some(e) = first_error {
                        return Err(e);
                    }
                }
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

    if let Some(c) = schema.get("const") {
        if value != c {
            return invalid(format!("must be {c}, got {value}"));
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
        let closed = match schema.get("additionalProperties") {
            Some(Value::Bool(false)) => true,
            Some(_) => false,
            None => properties.is_some(),
        };
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
                    let known = if known.is_empty() {
                        "none (this tool takes no arguments)".to_string()
                    } else {
                        known.join(", ")
                    };
                    return Err(ToolError::invalid(
                        join(path, key),
                        format!("is not an argument of this tool; known: {known}"),
                    ));
                }
                None => {}
            }
        }
    }
    Ok(())
}

/// The values of a `oneOf`/`anyOf` whose every branch is a `const`.
fn const_choices<'a>(root: &'a Value, schema: &'a Value) -> Option<Vec<&'a Value>> {
    let branches = ["oneOf", "anyOf"]
        .iter()
        .find_map(|k| schema.get(*k).and_then(Value::as_array))?;
    branches
        .iter()
        .map(|b| resolve(root, b).get("const"))
        .collect()
}

/// The names of an "exactly one of these fields" rule: a `oneOf` whose branches
/// each only require one field.
fn exactly_one_of(schema: &Value) -> Option<Vec<&str>> {
    let branches = schema.get("oneOf")?.as_array()?;
    branches
        .iter()
        .map(|b| {
            let o = b.as_object()?;
            let name = match o.get("required")?.as_array()?.as_slice() {
                [Value::String(name)] => name.as_str(),
                _ => return None,
            };
            // Only `required` (and the `properties` naming it, for strict validators).
            let only_names = o.keys().all(|k| k == "required" || k == "properties");
            only_names.then_some(name)
        })
        .collect()
}

/// Reads arguments the way JSON Schema and form-based clients mean them, before
/// they are checked: `512.0` for an integer is `512`; a numeric string such as
/// `"4"` for an integer or number field is that number, and `"true"`/`"false"`
/// for a boolean field that boolean (forms send every value as text); `null` for a
/// declared field means it was left out. Anything else is left for [`check_arguments`]
/// to refuse with the field's name.
pub fn coerce_arguments(schema: &Map<String, Value>, args: &mut Map<String, Value>) {
    let root = Value::Object(schema.clone());
    let mut value = Value::Object(std::mem::take(args));
    coerce(&root, &root, &mut value);
    if let Value::Object(o) = value {
        *args = o;
    }
}

/// The largest integer a JSON number carries exactly.
const MAX_SAFE_INTEGER: f64 = 9_007_199_254_740_991.0;

fn coerce(root: &Value, schema: &Value, value: &mut Value) {
    let schema = resolve(root, schema);
    let types = schema.get("type").map(types_of).unwrap_or_default();
    let wants = |t: &str| types.contains(&t);
    match value {
        Value::String(s) if !types.is_empty() && !wants("string") => {
            let text = s.trim();
            let parsed = if wants("integer") {
                text.parse::<i64>()
                    .map(Value::from)
                    .or_else(|_| text.parse::<u64>().map(Value::from))
                    .ok()
                    .or_else(|| {
                        text.parse::<f64>()
                            .ok()
                            .filter(|f| f.fract() == 0.0 && f.abs() <= MAX_SAFE_INTEGER)
                            .map(|f| Value::from(f as i64))
                    })
            } else {
                None
            };
            let parsed = parsed.or_else(|| {
                if wants("number") {
                    text.parse::<f64>()
                        .ok()
                        .filter(|f| f.is_finite())
                        .and_then(|f| serde_json::Number::from_f64(f).map(Value::Number))
                } else if wants("boolean") {
                    match text {
                        "true" => Some(Value::Bool(true)),
                        "false" => Some(Value::Bool(false)),
                        _ => None,
                    }
                } else {
                    None
                }
            });
            if let Some(v) = parsed {
                *value = v;
            }
        }
        Value::Number(n) if wants("integer") && !n.is_i64() && !n.is_u64() => {
            if let Some(f) = n
                .as_f64()
                .filter(|f| f.fract() == 0.0 && f.abs() <= MAX_SAFE_INTEGER)
            {
                *value = if f < 0.0 {
                    Value::from(f as i64)
                } else {
                    Value::from(f as u64)
                };
            }
        }
        Value::Object(object) => {
            if let Some(properties) = schema.get("properties").and_then(Value::as_object) {
                object.retain(|k, v| !(v.is_null() && properties.contains_key(k)));
                for (k, v) in object.iter_mut() {
                    if let Some(p) = properties.get(k) {
                        coerce(root, p, v);
                    }
                }
            } else if let Some(branch) = branch_for(root, schema, "object") {
                coerce(root, branch, value);
            }
        }
        Value::Array(items) => {
            if let Some(item_schema) = schema.get("items") {
                items.iter_mut().for_each(|i| coerce(root, item_schema, i));
            } else if let Some(branch) = branch_for(root, schema, "array") {
                coerce(root, branch, value);
            }
        }
        _ => {}
    }
}

/// The `anyOf`/`oneOf` branch declared with type `ty`, if there is one.
fn branch_for<'a>(root: &'a Value, schema: &'a Value, ty: &str) -> Option<&'a Value> {
    ["anyOf", "oneOf"]
        .iter()
        .filter_map(|k| schema.get(*k).and_then(Value::as_array))
        .flatten()
        .find(|b| {
            resolve(root, b)
                .get("type")
                .is_some_and(|t| types_of(t).contains(&ty))
        })
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

    #[test]
    fn values_are_read_as_the_schema_types_them() {
        let schema = json!({
            "type": "object",
            "properties": {
                "steps": { "type": "integer", "minimum": 1 },
                "cfg": { "type": "number" },
                "wait": { "type": "boolean" },
                "prompt": { "type": "string" },
                "loras": { "type": "array", "items": { "$ref": "#/$defs/Lora" } },
                "params": { "type": "object", "additionalProperties": true }
            },
            "$defs": { "Lora": { "type": "object", "properties": { "strength": { "type": "number" } } } }
        });
        let schema = schema.as_object().unwrap();
        let mut args = json!({
            "steps": "4", "cfg": " 7.5 ", "wait": "false", "prompt": "12",
            "loras": [{"strength": "0.5"}], "params": {"x": null, "n": "3"}
        })
        .as_object()
        .cloned()
        .unwrap();
        coerce_arguments(schema, &mut args);
        assert_eq!(
            Value::Object(args),
            json!({"steps": 4, "cfg": 7.5, "wait": false, "prompt": "12",
                   "loras": [{"strength": 0.5}], "params": {"x": null, "n": "3"}})
        );
        let mut args = json!({"steps": 512.0, "cfg": null})
            .as_object()
            .cloned()
            .unwrap();
        coerce_arguments(schema, &mut args);
        assert_eq!(Value::Object(args.clone()), json!({"steps": 512}));
        assert!(args["steps"].is_u64());
        // What is not a number stays as it is, to be refused by name.
        let mut args = json!({"steps": "abc", "wait": "maybe"})
            .as_object()
            .cloned()
            .unwrap();
        coerce_arguments(schema, &mut args);
        let e = check_arguments(schema, &args).unwrap_err();
        assert_eq!(e.field(), Some("steps"));
    }

    #[test]
    fn exactly_one_rules_name_the_fields() {
        let schema = json!({
            "type": "object",
            "properties": { "workflow": { "type": "object" }, "template": { "type": "string" }, "priority": { "type": "integer" } },
            "oneOf": [{ "required": ["workflow"] }, { "required": ["template"] }]
        });
        let schema = schema.as_object().unwrap();
        let run = |v: Value| check_arguments(schema, v.as_object().unwrap());
        run(json!({"template": "t"})).unwrap();
        run(json!({"workflow": {}})).unwrap();
        let none = run(json!({})).unwrap_err();
        assert_eq!(none.field(), Some("workflow"));
        assert!(none
            .to_string()
            .contains("exactly one of `workflow` or `template`"));
        let both = run(json!({"workflow": {}, "template": "t"})).unwrap_err();
        assert_eq!(both.field(), Some("template"));
        // The rule does not hide the other checks.
        let e = run(json!({"template": "t", "priority": "high"})).unwrap_err();
        assert_eq!(e.field(), Some("priority"));
    }
}
