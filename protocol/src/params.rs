//! Parameter descriptions: what each backend accepts in `job.params`.
//!
//! Every backend describes its parameters (type, range, default, unit, allowed
//! values) as a [`ParamSchema`]; the worker sends it inside its inventory when it
//! registers, and the broker refuses at submit a job that no capable worker would
//! accept, with an `invalid_field` naming the parameter (`job.params.steps`), before
//! any GPU time is spent. The same description serves `kiln submit --help` and the
//! `params` schema of the MCP gateway's generate tools.
//!
//! A schema holds one [`ParamSet`] per kind of job: per task, or per named
//! template (ComfyUI). Unknown keys are refused unless the set is `open` (a raw
//! workflow, whose inputs the worker checks itself).

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::error::ProtocolError;
use crate::job::{JobSpec, Params, Task};

/// What a backend accepts, for every kind of job it runs.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ParamSchema {
    pub sets: Vec<ParamSet>,
}

/// The parameters of one kind of job.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ParamSet {
    /// The tasks this set applies to (all when empty).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tasks: Vec<Task>,
    /// A named template (`job.template`) this set applies to; a set with a
    /// template applies only to jobs naming it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template: Option<String>,
    /// Applies to jobs that carry a raw `workflow` graph (and only to them).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub workflow: bool,
    pub params: Vec<ParamSpec>,
    /// Keys not listed are passed through instead of refused.
    #[serde(default)]
    pub open: bool,
}

/// One parameter.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ParamSpec {
    pub name: String,
    #[serde(rename = "type")]
    pub kind: ParamKind,
    /// Smallest allowed value (numbers) or length in characters (strings).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min: Option<f64>,
    /// Largest allowed value (numbers) or length in characters (strings).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max: Option<f64>,
    /// The value used when the job gives none (absent or `null`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default: Option<Value>,
    /// The unit of a number: `px`, `ms`, `s`, `frames`, `fps`, …
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unit: Option<String>,
    /// The allowed values of a string, when it is one of a few.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub choices: Vec<String>,
    #[serde(default)]
    pub description: String,
}

/// The type of a parameter's value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ParamKind {
    Integer,
    Number,
    String,
    Boolean,
    /// A map (raw settings, per-node overrides).
    Object,
    /// An output file name prefix: relative, `/`-separated, no `..`, no leading `/`
    /// or `.`, no backslashes or control characters (ComfyUI's `/view` refuses
    /// anything else after the whole generation has run).
    FilePrefix,
    /// Any value; the backend checks it.
    Any,
    /// A type this peer does not know (described by a newer worker): not checked.
    #[serde(other)]
    Unknown,
}

impl ParamSpec {
    pub fn new(name: &str, kind: ParamKind, description: &str) -> ParamSpec {
        ParamSpec {
            name: name.into(),
            kind,
            min: None,
            max: None,
            default: None,
            unit: None,
            choices: Vec::new(),
            description: description.into(),
        }
    }

    /// Sets the allowed range.
    pub fn range(mut self, min: f64, max: f64) -> Self {
        self.min = Some(min);
        self.max = Some(max);
        self
    }

    pub fn default(mut self, v: impl Into<Value>) -> Self {
        self.default = Some(v.into());
        self
    }

    pub fn unit(mut self, unit: &str) -> Self {
        self.unit = Some(unit.into());
        self
    }

    pub fn choices(mut self, choices: &[&str]) -> Self {
        self.choices = choices.iter().map(|c| c.to_string()).collect();
        self
    }

    /// Checks one value; `field` is its path (`job.params.steps`).
    pub fn check(&self, field: &str, v: &Value) -> Result<(), ProtocolError> {
        let wrong = |what: &str| ProtocolError::invalid(field, format!("must be {what}, got {v}"));
        let range = |x: f64, shown: String| -> Result<(), ProtocolError> {
            let lo = self.min.unwrap_or(f64::NEG_INFINITY);
            let hi = self.max.unwrap_or(f64::INFINITY);
            if x < lo || x > hi {
                let unit = self
                    .unit
                    .as_deref()
                    .map(|u| format!(" {u}"))
                    .unwrap_or_default();
                let bounds = match (self.min, self.max) {
                    (Some(lo), Some(hi)) => format!("from {} to {}", fmt_num(lo), fmt_num(hi)),
                    (Some(lo), None) => format!("at least {}", fmt_num(lo)),
                    _ => format!("at most {}", fmt_num(hi)),
                };
                let whole =
                    |m: f64| (m >= 0.0 && m.fract() == 0.0 && m < 1.8e19).then_some(m as u64);
                return Err(ProtocolError::OutOfRange {
                    field: field.to_string(),
                    reason: format!("must be {bounds}{unit}, got {shown}"),
                    limit: self.max.and_then(whole),
                });
            }
            Ok(())
        };
        match self.kind {
            ParamKind::Integer => {
                let n = v
                    .as_i64()
                    .map(|i| i as f64)
                    .or_else(|| v.as_u64().map(|u| u as f64))
                    .ok_or_else(|| wrong("an integer"))?;
                range(n, v.to_string())
            }
            ParamKind::Number => {
                let n = v.as_f64().ok_or_else(|| wrong("a number"))?;
                range(n, v.to_string())
            }
            ParamKind::Boolean => v
                .as_bool()
                .map(|_| ())
                .ok_or_else(|| wrong("true or false")),
            ParamKind::Object => v.as_object().map(|_| ()).ok_or_else(|| wrong("a map")),
            ParamKind::String | ParamKind::FilePrefix => {
                let s = v.as_str().ok_or_else(|| wrong("a string"))?;
                if !self.choices.is_empty() && !self.choices.iter().any(|c| c == s) {
                    return Err(ProtocolError::invalid(
                        field,
                        format!("must be one of {}, got {s:?}", self.choices.join(", ")),
                    ));
                }
                let len = s.chars().count() as u64;
                if let Some(max) = self.max.filter(|m| len as f64 > *m) {
                    // A size over its limit, like every other.
                    return Err(ProtocolError::FieldTooLarge {
                        field: field.to_string(),
                        limit: max as u64,
                        actual: len,
                    });
                }
                if let Some(min) = self.min.filter(|m| (len as f64) < *m) {
                    return Err(ProtocolError::invalid(
                        field,
                        format!(
                            "must be at least {} characters long, is {len}",
                            fmt_num(min)
                        ),
                    ));
                }
                if self.kind == ParamKind::FilePrefix {
                    check_file_prefix(field, s)?;
                }
                Ok(())
            }
            ParamKind::Any | ParamKind::Unknown => Ok(()),
        }
    }
}

/// A bound as JSON: an integer when it is one (`16`, not `16.0`).
pub fn json_num(x: f64) -> Value {
    if x.fract() == 0.0 && x.abs() < 9.0e15 {
        Value::from(x as i64)
    } else {
        Value::from(x)
    }
}

impl ParamSpec {
    /// Whether this is the stand-in of a common parameter the backend ignores.
    pub fn is_unused_common(&self) -> bool {
        self.description == UNUSED_COMMON
    }

    /// The description for people, with the unit, default and range folded in:
    /// `image side; halved per degrade level (integer, 8 to 4096 px, default 512)`.
    pub fn summary(&self) -> String {
        let kind = match self.kind {
            ParamKind::Integer => "integer",
            ParamKind::Number => "number",
            ParamKind::String => "string",
            ParamKind::Boolean => "true or false",
            ParamKind::Object => "map",
            ParamKind::FilePrefix => {
                "relative file name prefix, `/`-separated, no `..`, no leading `/` or `.`"
            }
            ParamKind::Any | ParamKind::Unknown => "any value",
        };
        let mut facts = vec![kind.to_string()];
        let unit = self
            .unit
            .as_deref()
            .map(|u| format!(" {u}"))
            .unwrap_or_default();
        let numeric = matches!(self.kind, ParamKind::Integer | ParamKind::Number);
        let what = if numeric { "" } else { " characters" };
        match (self.min, self.max) {
            (Some(lo), Some(hi)) => {
                facts.push(format!("{} to {}{unit}{what}", fmt_num(lo), fmt_num(hi)))
            }
            (Some(lo), None) => facts.push(format!("at least {}{unit}{what}", fmt_num(lo))),
            (None, Some(hi)) => facts.push(format!("at most {}{unit}{what}", fmt_num(hi))),
            (None, None) if !unit.is_empty() => facts.push(format!("in{unit}")),
            (None, None) => {}
        }
        if !self.choices.is_empty() {
            facts.push(format!("one of {}", self.choices.join(", ")));
        }
        if let Some(d) = &self.default {
            facts.push(format!("default {d}"));
        }
        let facts = facts.join(", ");
        if self.description.is_empty() {
            facts
        } else {
            format!("{} ({facts})", self.description)
        }
    }

    /// This parameter as a JSON Schema property, in the keywords every strict
    /// validator knows (`type`, `minimum`/`maximum`, `minLength`/`maxLength`,
    /// `enum`, `default`, `description`); the unit goes into the description.
    pub fn json_schema(&self) -> Value {
        let mut s = Map::new();
        let numeric = matches!(self.kind, ParamKind::Integer | ParamKind::Number);
        let ty = match self.kind {
            ParamKind::Integer => Some("integer"),
            ParamKind::Number => Some("number"),
            ParamKind::String | ParamKind::FilePrefix => Some("string"),
            ParamKind::Boolean => Some("boolean"),
            ParamKind::Object => Some("object"),
            ParamKind::Any | ParamKind::Unknown => None,
        };
        if let Some(ty) = ty {
            s.insert("type".into(), ty.into());
        }
        s.insert("description".into(), self.summary().into());
        let (lo, hi) = if numeric {
            ("minimum", "maximum")
        } else {
            ("minLength", "maxLength")
        };
        if numeric || ty == Some("string") {
            if let Some(min) = self.min {
                s.insert(
                    lo.into(),
                    json_num(if numeric { min } else { min.max(0.0).ceil() }),
                );
            }
            if let Some(max) = self.max {
                s.insert(hi.into(), json_num(if numeric { max } else { max.floor() }));
            }
        }
        if !self.choices.is_empty() {
            s.insert("enum".into(), self.choices.clone().into());
        }
        if let Some(d) = &self.default {
            s.insert("default".into(), d.clone());
        }
        Value::Object(s)
    }
}

/// One JSON Schema object describing the parameters of every set in `sets` (the
/// backends that could run a job), leaving out `skip` (names set otherwise, such as
/// a tool's own arguments) and common parameters no backend uses. A name several
/// sets describe differently admits what any of them accepts: the widest range,
/// no type or list of values unless all agree. Unknown names stay allowed
/// (`additionalProperties`), since a backend missing from `sets` may take them.
pub fn merged_json_schema<'a>(
    sets: impl IntoIterator<Item = &'a ParamSet>,
    skip: &[&str],
) -> Value {
    let mut merged: Map<String, Value> = Map::new();
    for set in sets {
        for p in set.params.iter().filter(|p| !p.is_unused_common()) {
            if skip.contains(&p.name.as_str()) {
                continue;
            }
            let new = p.json_schema();
            match merged.get_mut(&p.name) {
                None => {
                    merged.insert(p.name.clone(), new);
                }
                Some(old) if *old == new => {}
                Some(Value::Object(old)) => widen(old, &new),
                Some(_) => {}
            }
        }
    }
    serde_json::json!({
        "type": "object",
        "properties": merged,
        "additionalProperties": true,
    })
}

/// Makes `old` admit what `new` admits too.
fn widen(old: &mut Map<String, Value>, new: &Value) {
    for key in ["type", "enum", "default"] {
        if old.get(key) != new.get(key) {
            old.remove(key);
        }
    }
    if !old.contains_key("type") {
        // Strict validators refuse a range without the type it applies to.
        for key in ["minimum", "maximum", "minLength", "maxLength", "enum"] {
            old.remove(key);
        }
    }
    for (key, pick_low) in [
        ("minimum", true),
        ("minLength", true),
        ("maximum", false),
        ("maxLength", false),
    ] {
        match (
            old.get(key).and_then(Value::as_f64),
            new.get(key).and_then(Value::as_f64),
        ) {
            (Some(a), Some(b)) => {
                let v = if pick_low { a.min(b) } else { a.max(b) };
                old.insert(key.into(), json_num(v));
            }
            _ => {
                old.remove(key);
            }
        }
    }
    let (a, b) = (
        old.get("description").and_then(Value::as_str).unwrap_or(""),
        new.get("description").and_then(Value::as_str).unwrap_or(""),
    );
    if a != b && !a.contains(b) {
        let joined = format!("{a}; or {b}");
        old.insert("description".into(), joined.into());
    }
}

fn fmt_num(x: f64) -> String {
    if x.fract() == 0.0 && x.abs() < 1e15 {
        format!("{}", x as i64)
    } else {
        format!("{x}")
    }
}

/// The rule of [`ParamKind::FilePrefix`].
pub fn check_file_prefix(field: &str, s: &str) -> Result<(), ProtocolError> {
    let bad = if s.is_empty() {
        Some("must not be empty")
    } else if s.contains("..") {
        Some("must not contain `..`")
    } else if s.starts_with('/') || s.starts_with('.') {
        Some("must be relative (no leading `/` or `.`)")
    } else if s.contains(['\\', '\0']) || s.chars().any(char::is_control) {
        Some("must not contain backslashes or control characters")
    } else if s.split('/').any(str::is_empty) {
        Some("must not contain empty path segments (`//` or a trailing `/`)")
    } else {
        None
    };
    match bad {
        Some(why) => Err(ProtocolError::invalid(field, why)),
        None => Ok(()),
    }
}

/// Kiln's common parameter names, which every backend accepts (using them, or
/// ignoring them when it has no use for them) so that one job, or one MCP tool, runs
/// on any backend: the same type everywhere, checked even where unused.
pub const COMMON_PARAMS: &[&str] = &[
    "prompt",
    "negative_prompt",
    "width",
    "height",
    "steps",
    "cfg",
    "seed",
    "count",
    "sampler",
    "scheduler",
    "strength",
    "denoise",
    "frames",
    "fps",
    "image",
    "background",
    "filename_prefix",
];

/// The description of every common parameter a backend lists without using it.
pub const UNUSED_COMMON: &str = "a common parameter this backend ignores";

/// The generic description of a common parameter a backend does not use.
pub fn unused_common_param(name: &str) -> ParamSpec {
    use ParamKind::*;
    let (kind, min, max) = match name {
        "width" | "height" | "frames" => (Integer, Some(1.0), None),
        "steps" | "seed" | "count" => (Integer, Some(0.0), None),
        "cfg" | "fps" => (Number, Some(0.0), None),
        "strength" | "denoise" => (Number, Some(0.0), Some(1.0)),
        "filename_prefix" => (FilePrefix, None, None),
        _ => (String, None, None),
    };
    ParamSpec {
        min,
        max,
        ..ParamSpec::new(name, kind, UNUSED_COMMON)
    }
}

impl ParamSet {
    /// Adds every [`COMMON_PARAMS`] name the set does not describe, as unused.
    pub fn with_common(mut self) -> Self {
        for name in COMMON_PARAMS {
            if !self.params.iter().any(|p| p.name == *name) {
                self.params.push(unused_common_param(name));
            }
        }
        self
    }

    /// What the set applies to, for people: `text_to_image, image_to_image`,
    /// `template upscale`, `raw workflow`, `every task`.
    pub fn label(&self) -> String {
        if self.workflow {
            "raw workflow".into()
        } else if let Some(t) = &self.template {
            format!("template {t}")
        } else if self.tasks.is_empty() {
            "every task".into()
        } else {
            let tasks: Vec<&str> = self.tasks.iter().map(|t| t.as_str()).collect();
            tasks.join(", ")
        }
    }

    /// One line per parameter the set uses (`name  summary`), sorted by name,
    /// indented by `indent`: the help text of a command line.
    pub fn help(&self, indent: &str) -> String {
        let mut used: Vec<&ParamSpec> = self
            .params
            .iter()
            .filter(|p| !p.is_unused_common())
            .collect();
        used.sort_by(|a, b| a.name.cmp(&b.name));
        let width = used.iter().map(|p| p.name.len()).max().unwrap_or(0);
        let mut text = String::new();
        for p in used {
            text.push_str(&format!("{indent}{:<width$}  {}\n", p.name, p.summary()));
        }
        if self.open {
            text.push_str(&format!("{indent}(other names are passed through)\n"));
        }
        text
    }

    /// Whether this set describes `job`.
    pub fn applies_to(&self, job: &JobSpec) -> bool {
        if job.workflow.is_some() || self.workflow {
            return job.workflow.is_some() && self.workflow;
        }
        let (task, template) = (job.task, job.template.as_deref());
        match (&self.template, template) {
            (Some(a), Some(b)) => a == b,
            (Some(_), None) => false,
            (None, _) => self.tasks.is_empty() || self.tasks.contains(&task),
        }
    }

    /// Checks a job's params: every key known (unless `open`), every value of its
    /// type and range. Errors name `job.params.<key>`.
    pub fn check(&self, params: &Params) -> Result<(), ProtocolError> {
        for (key, value) in params {
            let field = format!("job.params.{key}");
            match self.params.iter().find(|p| &p.name == key) {
                _ if value.is_null() => {}
                Some(spec) => spec.check(&field, value)?,
                None if self.open => {}
                None => {
                    let mut names: Vec<&str> =
                        self.params.iter().map(|p| p.name.as_str()).collect();
                    names.sort_unstable();
                    return Err(ProtocolError::invalid(
                        field,
                        format!("unknown parameter; this backend takes {}", names.join(", ")),
                    ));
                }
            }
        }
        Ok(())
    }
}

impl ParamSchema {
    /// The set that describes `job`: for a raw workflow the workflow set, else the
    /// set of its template, else the set of its task.
    pub fn set_for(&self, job: &JobSpec) -> Option<&ParamSet> {
        self.sets
            .iter()
            .find(|s| s.template.is_some() && s.applies_to(job))
            .or_else(|| {
                self.sets
                    .iter()
                    .find(|s| s.template.is_none() && s.applies_to(job))
            })
    }

    /// Checks a job's params against the set that describes it. A job of a kind
    /// the schema does not describe passes (the backend decides).
    pub fn check(&self, job: &JobSpec) -> Result<(), ProtocolError> {
        match self.set_for(job) {
            Some(set) => set.check(&job.params),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn set() -> ParamSet {
        ParamSet {
            tasks: vec![],
            template: None,
            workflow: false,
            params: vec![
                ParamSpec::new("steps", ParamKind::Integer, "sampling steps").range(0.0, 100.0),
                ParamSpec::new("prefix", ParamKind::FilePrefix, "output name prefix"),
                ParamSpec::new("sampler", ParamKind::String, "").choices(&["euler", "ddim"]),
            ],
            open: false,
        }
    }

    fn field(r: Result<(), ProtocolError>) -> Option<String> {
        r.err().and_then(|e| e.to_body().field)
    }

    #[test]
    fn values_are_checked_by_type_range_and_name() {
        let s = set();
        let p = |v: Value| v.as_object().cloned().unwrap();
        assert!(s
            .check(&p(
                json!({"steps": 20, "prefix": "renders/v1", "sampler": "ddim"})
            ))
            .is_ok());
        assert!(s.check(&p(json!({"steps": null}))).is_ok());
        for (bad, at) in [
            (json!({"steps": "abc"}), "job.params.steps"),
            (json!({"steps": 101}), "job.params.steps"),
            (json!({"steps": -1}), "job.params.steps"),
            (json!({"steps": 2.5}), "job.params.steps"),
            (json!({"stepz": 10}), "job.params.stepz"),
            (json!({"prefix": "renders/v1..final"}), "job.params.prefix"),
            (json!({"prefix": "/etc/x"}), "job.params.prefix"),
            (json!({"sampler": "dpm"}), "job.params.sampler"),
        ] {
            assert_eq!(
                field(s.check(&p(bad.clone()))).as_deref(),
                Some(at),
                "{bad}"
            );
        }
        let err = s.check(&p(json!({"stepz": 1}))).unwrap_err().to_string();
        assert!(err.contains("prefix, sampler, steps"), "{err}");
    }

    #[test]
    fn descriptions_become_strict_json_schemas_and_help_lines() {
        let s = set();
        let steps = s.params[0].json_schema();
        assert_eq!(
            steps,
            json!({"type": "integer", "minimum": 0, "maximum": 100,
                   "description": "sampling steps (integer, 0 to 100)"})
        );
        let sampler = s.params[2].json_schema();
        assert_eq!(sampler["enum"], json!(["euler", "ddim"]));
        let side = ParamSpec::new("width", ParamKind::Integer, "image side")
            .range(8.0, 4096.0)
            .default(512)
            .unit("px");
        assert_eq!(
            side.summary(),
            "image side (integer, 8 to 4096 px, default 512)"
        );
        // Two backends describing `steps` differently: the widest range, one type.
        let other = ParamSet {
            params: vec![
                ParamSpec::new("steps", ParamKind::Integer, "denoising steps").range(1.0, 500.0),
                unused_common_param("sampler"),
                ParamSpec::new("prompt", ParamKind::String, ""),
            ],
            ..ParamSet::default()
        };
        let merged = merged_json_schema([&s, &other], &["prompt"]);
        let props = merged["properties"].as_object().unwrap();
        assert_eq!(props["steps"]["minimum"], 0);
        assert_eq!(props["steps"]["maximum"], 500);
        assert_eq!(props["steps"]["type"], "integer");
        assert!(props["steps"]["description"]
            .as_str()
            .unwrap()
            .contains("; or denoising steps"));
        assert_eq!(
            props["sampler"]["enum"],
            json!(["euler", "ddim"]),
            "the unused stand-in adds nothing"
        );
        assert!(!props.contains_key("prompt"));
        assert_eq!(merged["additionalProperties"], true);
    }

    #[test]
    fn sets_are_chosen_by_template_then_task() {
        let schema = ParamSchema {
            sets: vec![
                ParamSet {
                    tasks: vec![Task::TextToImage],
                    ..set()
                },
                ParamSet {
                    template: Some("upscale".into()),
                    params: vec![ParamSpec::new("scale", ParamKind::Number, "")],
                    ..ParamSet::default()
                },
            ],
        };
        let job = |task, template: Option<&str>| {
            let mut j = JobSpec::new(crate::Backend::Comfyui, task).param("steps", 5);
            j.template = template.map(String::from);
            j
        };
        assert!(schema.check(&job(Task::TextToImage, None)).is_ok());
        assert!(schema.check(&job(Task::Workflow, Some("upscale"))).is_err());
        // A kind of job the schema does not describe is the backend's business.
        assert!(schema.check(&job(Task::TextToVideo, None)).is_ok());
        let mut raw = job(Task::TextToImage, None);
        raw.workflow = Some(json!({}));
        assert!(
            schema.check(&raw).is_ok(),
            "no set describes raw workflows here"
        );
    }
}
