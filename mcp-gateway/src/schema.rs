//! The tool schemas as every client reads them.
//!
//! `schemars` writes what Rust knows: `Option<u32>` becomes `"type": ["integer",
//! "null"]` with `"format": "uint32"`, `Option<Enum>` an `anyOf` with `{"type":
//! "null"}`, and flattened structs leave the object open. Strict validators (Ajv in
//! strict mode, which the TypeScript SDK and the MCP Inspector use) warn on every
//! unknown format and refuse union types, and form-based clients draw a "null"
//! choice for each optional field. [`portable_input`] and [`portable_output`]
//! rewrite the generated schemas into plain JSON Schema that all of them accept:
//!
//! - an optional field is simply not `required`; its type has no `null` (a client
//!   sending `null` for it is read as leaving it out, see [`crate::validate`]);
//! - only the formats JSON Schema defines are kept;
//! - every tool's arguments object is closed (`additionalProperties: false`);
//! - an output schema also admits the error form `{"error": {kind, message,
//!   field?}}`, so an error result validates against the same schema in every
//!   client (the TypeScript SDK checks `structuredContent` even when `isError`).

use std::sync::Arc;

use rmcp::model::JsonObject;
use serde_json::{json, Map, Value};

/// Formats defined by JSON Schema (draft 2020-12 "format" vocabulary).
const STANDARD_FORMATS: [&str; 19] = [
    "date-time",
    "date",
    "time",
    "duration",
    "email",
    "idn-email",
    "hostname",
    "idn-hostname",
    "ipv4",
    "ipv6",
    "uri",
    "uri-reference",
    "iri",
    "iri-reference",
    "uuid",
    "uri-template",
    "json-pointer",
    "relative-json-pointer",
    "regex",
];

/// The input schema of a tool, portable (see the module docs).
pub fn portable_input(schema: &JsonObject) -> Arc<JsonObject> {
    let mut value = Value::Object(schema.clone());
    clean(&mut value);
    let mut object = into_object(value);
    object.insert("additionalProperties".into(), Value::Bool(false));
    Arc::new(object)
}

/// The output schema of a tool, portable and admitting the error form: exactly one
/// of the report's required fields or `error`.
pub fn portable_output(schema: &JsonObject) -> Arc<JsonObject> {
    let mut value = Value::Object(schema.clone());
    clean(&mut value);
    let mut object = into_object(value);
    let required = object
        .remove("required")
        .unwrap_or_else(|| Value::Array(Vec::new()));
    let properties = object
        .entry("properties")
        .or_insert_with(|| Value::Object(Map::new()));
    if let Some(p) = properties.as_object_mut() {
        p.insert("error".into(), error_schema());
    }
    let mut value = Value::Object(object);
    value["oneOf"] = json!([{ "required": required }, { "required": ["error"] }]);
    clean(&mut value);
    Arc::new(into_object(value))
}

/// The schema of the error form every tool result may take instead of its report.
pub fn error_schema() -> Value {
    json!({
        "description": "Why the call failed (in place of the report).",
        "type": "object",
        "properties": {
            "kind": { "type": "string", "description": "invalid_argument, refused, broker_unavailable, access_denied, io, image or cancelled" },
            "message": { "type": "string" },
            "field": { "type": "string", "description": "The argument at fault, e.g. `loras[1].strength`." }
        },
        "required": ["kind", "message"],
        "additionalProperties": false
    })
}

fn into_object(value: Value) -> JsonObject {
    match value {
        Value::Object(o) => o,
        _ => JsonObject::new(),
    }
}

fn is_null_schema(v: &Value) -> bool {
    v.get("type").and_then(Value::as_str) == Some("null")
        && v.as_object().is_some_and(|o| o.len() == 1)
}

/// Rewrites one schema and all its subschemas in place.
fn clean(value: &mut Value) {
    let Value::Object(o) = value else {
        if let Value::Array(items) = value {
            items.iter_mut().for_each(clean);
        }
        return;
    };
    o.remove("$schema");
    // ["integer", "null"] → "integer".
    if let Some(Value::Array(types)) = o.get("type") {
        let kept: Vec<Value> = types
            .iter()
            .filter(|t| t.as_str() != Some("null"))
            .cloned()
            .collect();
        let ty = match kept.len() {
            1 => kept.into_iter().next().unwrap_or(Value::Null),
            _ => Value::Array(kept),
        };
        o.insert("type".into(), ty);
    }
    // anyOf [X, {"type": "null"}] → X (keeping this schema's description/default).
    for key in ["anyOf", "oneOf"] {
        if let Some(Value::Array(branches)) = o.get(key) {
            let kept: Vec<Value> = branches
                .iter()
                .filter(|b| !is_null_schema(b))
                .cloned()
                .collect();
            if kept.len() == 1 && kept.len() < branches.len() {
                o.remove(key);
                if let Value::Object(branch) = kept.into_iter().next().unwrap_or(Value::Null) {
                    for (k, v) in branch {
                        o.entry(k).or_insert(v);
                    }
                }
            } else if kept.len() < branches.len() {
                o.insert(key.into(), Value::Array(kept));
            }
        }
    }
    if o.get("default").is_some_and(Value::is_null) {
        o.remove("default");
    }
    if let Some(format) = o.get("format").and_then(Value::as_str) {
        if !STANDARD_FORMATS.contains(&format) {
            o.remove("format");
        }
    }
    // A branch that only requires fields names them in `properties` too: Ajv's
    // strict mode (strictRequired) wants every required field declared beside it.
    for key in ["oneOf", "anyOf", "allOf"] {
        if let Some(Value::Array(branches)) = o.get_mut(key) {
            for branch in branches.iter_mut().filter_map(Value::as_object_mut) {
                let Some(Value::Array(required)) = branch.get("required") else {
                    continue;
                };
                if branch.contains_key("properties") {
                    continue;
                }
                let names: Map<String, Value> = required
                    .iter()
                    .filter_map(Value::as_str)
                    .map(|n| (n.to_string(), json!({})))
                    .collect();
                branch.insert("properties".into(), Value::Object(names));
            }
        }
    }
    for (key, sub) in o.iter_mut() {
        match key.as_str() {
            // Maps of schemas.
            "properties" | "$defs" | "definitions" | "patternProperties" => {
                if let Value::Object(m) = sub {
                    m.values_mut().for_each(clean);
                }
            }
            // Values, not schemas.
            "enum" | "const" | "default" | "examples" | "required" => {}
            _ => clean(sub),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nullable_unions_and_odd_formats_are_removed() {
        let schema = json!({
            "$schema": "https://json-schema.org/draft/2020-12/schema",
            "type": "object",
            "properties": {
                "steps": { "type": ["integer", "null"], "format": "uint32", "minimum": 1, "default": null },
                "style": { "description": "A style.", "anyOf": [{ "$ref": "#/$defs/Style" }, { "type": "null" }] },
                "when": { "type": "string", "format": "date-time" }
            },
            "$defs": { "Style": { "type": "string", "enum": ["a", null] } }
        });
        let out = portable_input(schema.as_object().unwrap());
        let props = &out["properties"];
        assert_eq!(props["steps"], json!({ "type": "integer", "minimum": 1 }));
        assert_eq!(
            props["style"],
            json!({ "description": "A style.", "$ref": "#/$defs/Style" })
        );
        assert_eq!(props["when"]["format"], "date-time");
        assert_eq!(out["additionalProperties"], false);
        assert!(out.get("$schema").is_none());
        // Values are left alone.
        assert_eq!(out["$defs"]["Style"]["enum"], json!(["a", null]));
    }

    #[test]
    fn output_schemas_admit_the_error_form() {
        let schema = json!({ "type": "object", "properties": { "jobs": { "type": "array" } }, "required": ["jobs"] });
        let out = portable_output(schema.as_object().unwrap());
        assert!(out.get("required").is_none());
        assert_eq!(
            out["oneOf"],
            json!([
                { "required": ["jobs"], "properties": { "jobs": {} } },
                { "required": ["error"], "properties": { "error": {} } }
            ])
        );
        assert_eq!(
            out["properties"]["error"]["required"],
            json!(["kind", "message"])
        );
    }
}
