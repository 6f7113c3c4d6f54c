//! [`JobOptions`]: how a job is to be run, as every client offers it.
//!
//! A job's spec has two parts. What to generate (backend, task, params, inputs,
//! a workflow graph or template) is built differently by each client: the CLI from
//! its flags and files, each MCP tool from its own arguments. How to run it (model,
//! LoRAs, GPU memory, labels, priority, timeouts, attempts, idempotency key,
//! degrading after out-of-memory) is the same everywhere, and is defined here once:
//! the CLI flattens this struct into `kiln submit`'s flags (`clap`, feature
//! `clap`), the MCP gateway into its generate tools' arguments and their JSON
//! Schemas (`schemars`, doc comments as descriptions), and both apply it to the
//! spec with [`JobOptions::apply`], which goes through serde, so a field added
//! here reaches the spec under its own name with no client code. A test keeps
//! this struct and [`JobSpec`] in step: every spec field is here or in
//! [`JOB_BODY_FIELDS`].

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::job::{JobSpec, LoraRef};
use crate::limits::Limits;

/// The [`JobSpec`] fields each client builds its own way (what to generate); every
/// other field is a [`JobOptions`] field.
pub const JOB_BODY_FIELDS: &[&str] = &[
    "backend", "task", "params", "inputs", "workflow", "template",
];

/// How to run a job; see the module docs. Every field is optional: unset leaves
/// the spec's value (the broker's or backend's default).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[cfg_attr(feature = "clap", derive(clap::Args))]
pub struct JobOptions {
    /// The model (checkpoint or Wan2GP model type) the job needs, as the models
    /// list names it; the backend's default when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 256))]
    #[cfg_attr(feature = "clap", arg(long))]
    pub model: Option<String>,
    /// LoRAs applied to the model, with their strengths (-10 to 10, 1 by default).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    #[cfg_attr(feature = "clap", arg(long = "lora", value_name = "NAME[:STRENGTH]"))]
    pub loras: Vec<LoraRef>,
    /// Only GPUs with at least this much memory, in MiB.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "clap", arg(long, value_name = "MIB"))]
    pub min_vram_mb: Option<u64>,
    /// Labels every worker that runs the job must carry (`[A-Za-z0-9._-]`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    #[cfg_attr(feature = "clap", arg(long = "label", value_name = "LABEL"))]
    pub labels: Vec<String>,
    /// Queue priority, -10 (last) to 10 (first); 0 when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = -10, max = 10))]
    #[cfg_attr(
        feature = "clap",
        arg(long, allow_hyphen_values = true, value_parser = clap::value_parser!(i8).range(-10..=10))
    )]
    pub priority: Option<i8>,
    /// Fail the job if no worker starts it within this many seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    #[cfg_attr(feature = "clap", arg(long = "queue-timeout", value_name = "SECONDS"))]
    pub queue_timeout_s: Option<u32>,
    /// Fail an attempt that runs longer than this many seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    #[cfg_attr(feature = "clap", arg(long = "run-timeout", value_name = "SECONDS"))]
    pub run_timeout_s: Option<u32>,
    /// How many times the job may be started (after a lost worker or a retryable
    /// failure); the broker's `default_max_attempts` when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    #[cfg_attr(feature = "clap", arg(long))]
    pub max_attempts: Option<u8>,
    /// Makes a resubmit safe: the same key from the same client with the same job
    /// returns the first job (a different job with it is refused).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 128))]
    #[cfg_attr(feature = "clap", arg(long))]
    pub idempotency_key: Option<String>,
    /// After running out of memory on the largest GPU, retry at a lower setting
    /// (smaller size or fewer frames) instead of failing.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    #[cfg_attr(feature = "clap", arg(long))]
    pub allow_degrade: bool,
}

impl JobOptions {
    /// Sets every option given on `spec`, field by field under the same name (an
    /// unset option leaves the spec's value).
    pub fn apply(&self, spec: &mut JobSpec) -> Result<(), serde_json::Error> {
        let Value::Object(given) = serde_json::to_value(self)? else {
            return Ok(());
        };
        // The body is left out of the round trip: input files can be large.
        let inputs = std::mem::take(&mut spec.inputs);
        let workflow = spec.workflow.take();
        let mut map = match serde_json::to_value(&*spec)? {
            Value::Object(m) => m,
            _ => unreachable!("a spec is a map"),
        };
        map.extend(given);
        let mut applied: JobSpec = serde_json::from_value(Value::Object(map))?;
        applied.inputs = inputs;
        applied.workflow = workflow;
        *spec = applied;
        Ok(())
    }

    /// Sets the bounds that the broker's `limits` decide in `properties`, the
    /// JSON Schema properties of a client's arguments where these options are
    /// flattened (`model`, `loras`, `labels`, `max_attempts`, the timeouts,
    /// `idempotency_key`): the derived schema carries the default limits, and a
    /// broker configured otherwise announces its own in `welcome`. A property
    /// absent from `properties` is skipped. JSON Schema counts characters where
    /// the broker counts bytes, so a name of non-ASCII characters can pass the
    /// schema and still be refused at submit (naming the field).
    pub fn bound_json_schema(properties: &mut Map<String, Value>, limits: &Limits) {
        let mut set = |pointer: &str, keyword: &str, value: u64| {
            let target =
                pointer
                    .split('/')
                    .try_fold(&mut *properties, |obj, key| match obj.get_mut(key) {
                        Some(Value::Object(inner)) => Some(inner),
                        _ => None,
                    });
            if let Some(schema) = target {
                schema.insert(keyword.into(), value.into());
            }
        };
        set("model", "maxLength", limits.max_name_len);
        set("loras", "maxItems", limits.max_loras);
        set(
            "loras/items/properties/name",
            "maxLength",
            limits.max_name_len,
        );
        set("labels", "maxItems", limits.max_labels);
        set("labels/items", "maxLength", limits.max_label_len);
        set(
            "max_attempts",
            "maximum",
            limits.max_attempts.min(u8::MAX.into()),
        );
        let timeout = limits.max_timeout_s.min(u32::MAX.into());
        set("queue_timeout_s", "maximum", timeout);
        set("run_timeout_s", "maximum", timeout);
        set(
            "idempotency_key",
            "maxLength",
            limits.max_idempotency_key_len,
        );
    }

    /// The options a spec carries.
    pub fn of(spec: &JobSpec) -> JobOptions {
        let mut map = match serde_json::to_value(spec) {
            Ok(Value::Object(m)) => m,
            _ => return JobOptions::default(),
        };
        map.retain(|k, _| !JOB_BODY_FIELDS.contains(&k.as_str()));
        let mut options: JobOptions =
            serde_json::from_value(Value::Object(map)).unwrap_or_default();
        if options.priority == Some(0) {
            options.priority = None;
        }
        options
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::{Backend, Task, JOB_SPEC_FIELDS};

    #[test]
    fn the_brokers_limits_bound_the_schema() {
        let schema = serde_json::to_value(schemars::schema_for!(JobOptions)).unwrap();
        let mut properties = schema["properties"].as_object().unwrap().clone();
        let limits = Limits {
            max_name_len: 40,
            max_labels: 3,
            max_label_len: 12,
            max_attempts: 400,
            max_timeout_s: 600,
            ..Limits::default()
        };
        JobOptions::bound_json_schema(&mut properties, &limits);
        let p = Value::Object(properties);
        assert_eq!(p["model"]["maxLength"], 40);
        assert_eq!(p["labels"]["maxItems"], 3);
        assert_eq!(p["labels"]["items"]["maxLength"], 12);
        assert_eq!(p["max_attempts"]["maximum"], 255, "capped by the type");
        assert_eq!(p["queue_timeout_s"]["maximum"], 600);
        assert_eq!(p["run_timeout_s"]["maximum"], 600);
        assert_eq!(p["loras"]["maxItems"], limits.max_loras);
        assert_eq!(
            p["idempotency_key"]["maxLength"],
            limits.max_idempotency_key_len
        );
        assert_eq!(p["priority"]["maximum"], 10, "not a limit: untouched");
    }

    fn every() -> JobOptions {
        JobOptions {
            model: Some("m".into()),
            loras: vec![LoraRef {
                name: "l".into(),
                strength: 0.5,
            }],
            min_vram_mb: Some(8000),
            labels: vec!["a".into()],
            priority: Some(3),
            queue_timeout_s: Some(60),
            run_timeout_s: Some(600),
            max_attempts: Some(2),
            idempotency_key: Some("k".into()),
            allow_degrade: true,
        }
    }

    /// A field added to `JobSpec` must be added here (or to the body): then the
    /// CLI, the MCP tools and `apply` have it with no further code.
    #[test]
    fn options_and_body_are_exactly_the_spec_fields() {
        let options = serde_json::to_value(every()).unwrap();
        let mut keys: Vec<&str> = options
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .chain(JOB_BODY_FIELDS.iter().copied())
            .collect();
        keys.sort_unstable();
        let mut want = JOB_SPEC_FIELDS.to_vec();
        want.sort_unstable();
        assert_eq!(keys, want);
        let schema = serde_json::to_value(schemars::schema_for!(JobOptions)).unwrap();
        let mut props: Vec<&str> = schema["properties"]
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        props.sort_unstable();
        let mut named: Vec<&str> = options
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        named.sort_unstable();
        assert_eq!(props, named, "the schema names every option");
    }

    #[test]
    fn apply_sets_each_given_option_and_keeps_the_rest() {
        let mut spec = JobSpec::new(Backend::Sim, Task::TextToImage).param("prompt", "x");
        spec.inputs.push(crate::job::InputFile {
            name: "a.png".into(),
            media_type: "image/png".into(),
            data: vec![1, 2, 3],
        });
        spec.max_attempts = Some(5);
        JobOptions {
            model: Some("m2".into()),
            ..JobOptions::default()
        }
        .apply(&mut spec)
        .unwrap();
        assert_eq!(spec.model.as_deref(), Some("m2"));
        assert_eq!(
            spec.max_attempts,
            Some(5),
            "unset options keep the spec's value"
        );
        assert_eq!(spec.inputs[0].data, [1, 2, 3]);
        every().apply(&mut spec).unwrap();
        assert_eq!(JobOptions::of(&spec), every());
        assert_eq!(spec.priority, 3);
        assert!(spec.allow_degrade);
        assert_eq!(spec.prompt(), Some("x"));
    }
}
