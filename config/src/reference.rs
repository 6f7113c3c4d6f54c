//! The configuration reference, generated from the config structs themselves.
//!
//! `kiln config defaults` prints it and `config/kiln.example.toml` is its output, so
//! the documentation of a key cannot drift from the code: every field of
//! [`KilnConfig`] appears with its default (from `Default`), its doc comment (read
//! through `schemars`, which keeps doc comments as descriptions) and its example
//! (`#[schemars(example = ...)]`), in declaration order. A key added to any table
//! shows up without a hand edit; the test beside this module fails until the
//! example file is regenerated.

use std::fmt::Write as _;

use serde::ser::{self, Impossible, Serialize};
use serde_json::Value;

use crate::KilnConfig;

/// One key of the reference.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    /// Dotted path, e.g. `broker.limits.max_prompt_chars`.
    pub key: String,
    /// The built-in default; `Null` when the key is unset by default.
    pub default: Value,
    /// The field's doc comment, one paragraph per line.
    pub doc: String,
    /// An illustrative value that is not the default, when the field has one.
    pub example: Option<Value>,
    /// Set when the default is computed at start (from the environment), with the
    /// rule that computes it; the reference then shows the key commented out.
    pub computed: Option<&'static str>,
}

/// Keys whose default depends on the machine it runs on.
const COMPUTED: &[(&str, &str)] = &[(
    "broker.state_dir",
    "$XDG_STATE_HOME/kiln, else ~/.local/state/kiln, else /var/lib/kiln",
)];

/// A table of the reference: its doc and its keys (leaves first, then sub-tables).
struct TableDoc {
    path: String,
    doc: String,
    leaves: Vec<Entry>,
}

/// Every key of the configuration, in declaration order.
pub fn entries() -> Vec<Entry> {
    tables().into_iter().flat_map(|t| t.leaves).collect()
}

fn tables() -> Vec<TableDoc> {
    let schema = serde_json::to_value(schemars::schema_for!(KilnConfig)).expect("schema");
    let tree = KilnConfig::default()
        .serialize(Shape)
        .expect("the config serializes");
    let mut out = Vec::new();
    if let Node::Struct(fields) = tree {
        for (name, node) in fields {
            collect(&schema, &schema, name, &node, &mut out);
        }
    }
    out
}

/// Walks one struct-valued field into `out`.
fn collect(root: &Value, parent: &Value, path: String, node: &Node, out: &mut Vec<TableDoc>) {
    let name = path.rsplit('.').next().unwrap_or(&path);
    let prop = property(root, parent, name);
    let Node::Struct(fields) = node else { return };
    let def = resolve(root, &prop);
    let doc = [description(&def), description(&prop)]
        .into_iter()
        .filter(|d| !d.is_empty())
        .collect::<Vec<_>>();
    let mut table = TableDoc {
        path: path.clone(),
        doc: doc.first().cloned().unwrap_or_default(),
        leaves: Vec::new(),
    };
    let mut subtables = Vec::new();
    for (field, child) in fields {
        let key = format!("{path}.{field}");
        match child {
            Node::Struct(_) => subtables.push((key, child)),
            Node::Leaf(value) => {
                let fprop = property(root, &def, field);
                let computed = COMPUTED.iter().find(|(k, _)| *k == key).map(|(_, r)| *r);
                table.leaves.push(Entry {
                    example: fprop
                        .get("examples")
                        .and_then(|e| e.get(0))
                        .cloned()
                        .filter(|e| e != value),
                    doc: description(&fprop),
                    default: value.clone(),
                    key,
                    computed,
                });
            }
        }
    }
    out.push(table);
    for (key, child) in subtables {
        collect(root, &def, key, child, out);
    }
}

/// The schema of property `name` of an object schema (following `$ref`s).
fn property(root: &Value, schema: &Value, name: &str) -> Value {
    resolve(root, schema)
        .get("properties")
        .and_then(|p| p.get(name))
        .cloned()
        .unwrap_or(Value::Null)
}

/// The schema a property points to (its `$ref` followed).
fn resolve(root: &Value, schema: &Value) -> Value {
    match schema.get("$ref").and_then(Value::as_str) {
        Some(r) => {
            let name = r.rsplit('/').next().unwrap_or_default();
            root.get("$defs")
                .and_then(|d| d.get(name))
                .cloned()
                .unwrap_or(Value::Null)
        }
        None => schema.clone(),
    }
}

fn description(schema: &Value) -> String {
    schema
        .get("description")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string()
}

/// The reference as TOML: every key with its default, its doc as comments, and
/// its example (when it has one) as a comment. Loading it gives the defaults.
pub fn defaults_toml() -> String {
    let mut s = String::new();
    s.push_str(HEADER);
    for table in tables() {
        s.push('\n');
        comment(&mut s, &table.doc, "");
        let _ = writeln!(s, "[{}]", table.path);
        for e in &table.leaves {
            let name = e.key.rsplit('.').next().unwrap_or(&e.key);
            comment(&mut s, &e.doc, "");
            let example = e.example.as_ref().map(toml_value);
            if let Some(rule) = e.computed {
                let _ = writeln!(s, "# Default, computed at start: {rule}.");
            } else if e.default.is_null() {
                let _ = writeln!(s, "# Not set by default.");
            } else {
                let _ = writeln!(s, "{name} = {}", toml_value(&e.default));
            }
            match example {
                Some(ex) if e.computed.is_some() || e.default.is_null() => {
                    let _ = writeln!(s, "# Example:\n# {name} = {ex}");
                }
                Some(ex) => {
                    let _ = writeln!(s, "# Example: {name} = {ex}");
                }
                None => {}
            }
        }
    }
    s
}

const HEADER: &str = "\
# Kiln configuration reference: every key with its built-in default.
#
# Generated from the config structs by `kiln config defaults`; do not edit by hand
# (a test compares this file with the command's output).
#
# Every Kiln program reads this one schema: the broker uses [broker], each worker
# [worker], the `kiln` CLI [client], the MCP gateway [client] and [mcp], the web
# dashboard [client] and [dashboard]. Values are
# layered: built-in defaults, then each file given with --config (or $KILN_CONFIG,
# or /etc/kiln/kiln.toml), then KILN_* environment variables with `__` between
# levels, e.g. KILN_WORKER__GPU__INDEX=1 or KILN_BROKER__FRONTEND=tcp://10.0.0.2:5555.
# `kiln config check` prints the result and names any bad key with its source.
# `# Example:` lines show values that are not the default; keys that are not
# set by default appear only as comments.
";

fn comment(s: &mut String, doc: &str, indent: &str) {
    for line in doc.lines() {
        if line.is_empty() {
            let _ = writeln!(s, "{indent}#");
        } else {
            let _ = writeln!(s, "{indent}# {line}");
        }
    }
}

/// A TOML literal for a JSON value (JSON string escapes are valid in TOML basic
/// strings); arrays of tables become multi-line arrays of inline tables.
fn toml_value(v: &Value) -> String {
    match v {
        Value::Null => "\"\"".into(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => {
            if n.is_f64() {
                let f = n.as_f64().unwrap_or_default();
                if f.fract() == 0.0 && f.abs() < 1e15 {
                    format!("{f:.1}")
                } else {
                    f.to_string()
                }
            } else {
                n.to_string()
            }
        }
        Value::String(s) => Value::String(s.clone()).to_string(),
        Value::Array(items) if items.iter().any(Value::is_object) => {
            let rows: Vec<String> = items
                .iter()
                .map(|i| format!("  {},", toml_value(i)))
                .collect();
            format!("[\n{}\n]", rows.join("\n"))
        }
        Value::Array(items) => {
            let items: Vec<String> = items.iter().map(toml_value).collect();
            format!("[{}]", items.join(", "))
        }
        Value::Object(map) => {
            if map.is_empty() {
                return "{}".into();
            }
            let pairs: Vec<String> = map
                .iter()
                .map(|(k, v)| format!("{} = {}", toml_key(k), toml_value(v)))
                .collect();
            format!("{{ {} }}", pairs.join(", "))
        }
    }
}

fn toml_key(k: &str) -> String {
    if !k.is_empty()
        && k.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    {
        k.to_string()
    } else {
        Value::String(k.to_string()).to_string()
    }
}

/// The shape of a serialized value: structs keep their field order (which a
/// `serde_json::Map` would not), everything else is a leaf.
#[derive(Debug)]
enum Node {
    Struct(Vec<(String, Node)>),
    Leaf(Value),
}

/// A serializer that records struct fields in declaration order; any value that is
/// not a struct becomes a JSON leaf.
struct Shape;

#[derive(Debug)]
struct ShapeError(String);

impl std::fmt::Display for ShapeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}
impl std::error::Error for ShapeError {}
impl ser::Error for ShapeError {
    fn custom<T: std::fmt::Display>(msg: T) -> Self {
        ShapeError(msg.to_string())
    }
}

/// Builds the fields of one struct.
struct Fields(Vec<(String, Node)>);

impl ser::SerializeStruct for Fields {
    type Ok = Node;
    type Error = ShapeError;
    fn serialize_field<T: ?Sized + Serialize>(
        &mut self,
        key: &'static str,
        value: &T,
    ) -> Result<(), ShapeError> {
        let node = match value.serialize(Shape) {
            Ok(Node::Struct(f)) => Node::Struct(f),
            _ => Node::Leaf(serde_json::to_value(value).map_err(ser::Error::custom)?),
        };
        self.0.push((key.to_string(), node));
        Ok(())
    }
    fn end(self) -> Result<Node, ShapeError> {
        Ok(Node::Struct(self.0))
    }
}

/// Everything but a struct is reported as "not a struct" (the caller then takes
/// the value as a JSON leaf).
macro_rules! leaf {
    ($($name:ident($($arg:ty),*)),* $(,)?) => {
        $(fn $name(self, $(_: $arg),*) -> Result<Node, ShapeError> {
            Err(ShapeError("leaf".into()))
        })*
    };
}

impl ser::Serializer for Shape {
    type Ok = Node;
    type Error = ShapeError;
    type SerializeSeq = Impossible<Node, ShapeError>;
    type SerializeTuple = Impossible<Node, ShapeError>;
    type SerializeTupleStruct = Impossible<Node, ShapeError>;
    type SerializeTupleVariant = Impossible<Node, ShapeError>;
    type SerializeMap = Impossible<Node, ShapeError>;
    type SerializeStruct = Fields;
    type SerializeStructVariant = Impossible<Node, ShapeError>;

    leaf!(
        serialize_bool(bool),
        serialize_i8(i8),
        serialize_i16(i16),
        serialize_i32(i32),
        serialize_i64(i64),
        serialize_u8(u8),
        serialize_u16(u16),
        serialize_u32(u32),
        serialize_u64(u64),
        serialize_f32(f32),
        serialize_f64(f64),
        serialize_char(char),
        serialize_str(&str),
        serialize_bytes(&[u8]),
        serialize_none(),
        serialize_unit(),
        serialize_unit_struct(&'static str),
        serialize_unit_variant(&'static str, u32, &'static str),
    );

    fn serialize_some<T: ?Sized + Serialize>(self, _: &T) -> Result<Node, ShapeError> {
        Err(ShapeError("leaf".into()))
    }
    fn serialize_newtype_struct<T: ?Sized + Serialize>(
        self,
        _: &'static str,
        _: &T,
    ) -> Result<Node, ShapeError> {
        Err(ShapeError("leaf".into()))
    }
    fn serialize_newtype_variant<T: ?Sized + Serialize>(
        self,
        _: &'static str,
        _: u32,
        _: &'static str,
        _: &T,
    ) -> Result<Node, ShapeError> {
        Err(ShapeError("leaf".into()))
    }
    fn serialize_seq(self, _: Option<usize>) -> Result<Self::SerializeSeq, ShapeError> {
        Err(ShapeError("leaf".into()))
    }
    fn serialize_tuple(self, _: usize) -> Result<Self::SerializeTuple, ShapeError> {
        Err(ShapeError("leaf".into()))
    }
    fn serialize_tuple_struct(
        self,
        _: &'static str,
        _: usize,
    ) -> Result<Self::SerializeTupleStruct, ShapeError> {
        Err(ShapeError("leaf".into()))
    }
    fn serialize_tuple_variant(
        self,
        _: &'static str,
        _: u32,
        _: &'static str,
        _: usize,
    ) -> Result<Self::SerializeTupleVariant, ShapeError> {
        Err(ShapeError("leaf".into()))
    }
    fn serialize_map(self, _: Option<usize>) -> Result<Self::SerializeMap, ShapeError> {
        Err(ShapeError("leaf".into()))
    }
    fn serialize_struct(self, _: &'static str, _: usize) -> Result<Fields, ShapeError> {
        Ok(Fields(Vec::new()))
    }
    fn serialize_struct_variant(
        self,
        _: &'static str,
        _: u32,
        _: &'static str,
        _: usize,
    ) -> Result<Self::SerializeStructVariant, ShapeError> {
        Err(ShapeError("leaf".into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The example file is the generated reference, byte for byte.
    #[test]
    fn the_example_config_is_the_generated_reference() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("kiln.example.toml");
        let generated = defaults_toml();
        if std::env::var_os("KILN_UPDATE_EXAMPLE").is_some() {
            std::fs::write(&path, &generated).unwrap();
        }
        let on_disk = std::fs::read_to_string(&path).unwrap();
        assert!(
            on_disk == generated,
            "config/kiln.example.toml is out of date with the config structs; regenerate it:\n  \
             cargo run --bin kiln -- config defaults > config/kiln.example.toml\n\
             (or KILN_UPDATE_EXAMPLE=1 cargo test -p kiln-config)"
        );
    }

    /// Loading the reference gives back every default: the rendering is faithful.
    #[test]
    #[allow(clippy::result_large_err)]
    fn the_reference_loads_as_the_defaults() {
        figment::Jail::expect_with(|jail| {
            jail.create_file("ref.toml", &defaults_toml())?;
            let loaded = KilnConfig::load(&["ref.toml".into()]).expect("the reference loads");
            assert_eq!(loaded, KilnConfig::default());
            Ok(())
        });
    }

    /// Every field is listed with a doc comment, and the keys the issue found
    /// missing from the old hand-written example are there.
    #[test]
    fn every_key_is_listed_and_documented() {
        let entries = entries();
        let keys: Vec<&str> = entries.iter().map(|e| e.key.as_str()).collect();
        for k in [
            "worker.work_dir",
            "worker.gpu.uuid",
            "worker.gpu.nvml_library",
            "worker.comfyui.work_dir",
            "broker.client_token",
            "broker.limits.max_params",
            "mcp.token_file",
            "dashboard.token_file",
        ] {
            assert!(keys.contains(&k), "{k} missing from {keys:?}");
        }
        let limits = keys
            .iter()
            .filter(|k| k.starts_with("broker.limits."))
            .count();
        assert!(limits >= 20, "{limits} limits");
        let undocumented: Vec<&str> = entries
            .iter()
            .filter(|e| e.doc.trim().is_empty())
            .map(|e| e.key.as_str())
            .collect();
        assert!(
            undocumented.is_empty(),
            "keys without a doc comment: {undocumented:?}"
        );
        let comfy = entries
            .iter()
            .find(|e| e.key == "worker.comfyui.main_py")
            .unwrap();
        assert!(
            comfy.default.is_null() && comfy.example.is_some(),
            "{comfy:?}"
        );
    }
}
