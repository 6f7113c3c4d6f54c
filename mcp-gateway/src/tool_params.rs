//! The generate tools' arguments, described from the fleet and the broker.
//!
//! Each backend describes the parameters it takes (`kiln_protocol::params`); its
//! workers send that description when they register, and the broker enforces it
//! at submit. `tools/list` turns the descriptions of the backends online into the
//! `params` property of each generate tool's input schema (types, ranges, allowed
//! values, defaults, units), so an assistant sees what `params: {"sampler": …}`
//! may hold instead of an opaque map. The tool's own arguments (`width`, `steps`,
//! …) keep the gateway's ranges (sane values for an assistant), narrowed to what
//! the backends online accept: with only simulators of `max_side = 2048` online,
//! `width` allows 64 to 2048, not 4096. The bounds the broker's limits decide
//! (name and label lengths, label and LoRA counts, attempts, timeouts, prompt
//! length) come from its `welcome`, so a broker configured otherwise is described
//! as it is. With the broker out of reach, or no worker describing its
//! parameters, the tools keep their derived schemas.
//!
//! The gateway checks a call against the same description ([`crate::validate`]),
//! so what the assistant was shown and what is refused before the broker agree.

use std::sync::Arc;
use std::time::{Duration, Instant};

use kiln_protocol::params::{json_num, merged_json_schema, ParamSet};
use kiln_protocol::worker::{WorkerInfo, WorkerState};
use kiln_protocol::{JobOptions, Limits, Task};
use rmcp::model::Tool;
use serde_json::{Map, Value};

use crate::gateway::Gateway;

/// The generate tools with a `params` argument, and the tasks their jobs run.
pub const TOOL_TASKS: [(&str, &[Task]); 5] = [
    ("generate_image", &[Task::TextToImage]),
    ("generate_sprite", &[Task::TextToImage]),
    ("generate_batch", &[Task::TextToImage]),
    ("edit_image", &[Task::ImageToImage]),
    ("generate_video", &[Task::TextToVideo, Task::ImageToVideo]),
];

/// How long `tools/list` waits for the broker's worker list.
const ASK_TIMEOUT: Duration = Duration::from_secs(2);

/// How long a worker list is reused to check tool calls (a `tools/list` always
/// asks again).
pub const FLEET_TTL: Duration = Duration::from_secs(5);

/// The last worker list the broker gave, and when.
#[derive(Default)]
pub struct FleetCache(std::sync::Mutex<Option<(Instant, Arc<Vec<WorkerInfo>>)>>);

impl FleetCache {
    fn fresh(&self, ttl: Duration) -> Option<Arc<Vec<WorkerInfo>>> {
        let slot = self.0.lock().ok()?;
        let (at, workers) = slot.as_ref()?;
        (at.elapsed() < ttl).then(|| workers.clone())
    }

    fn store(&self, workers: Vec<WorkerInfo>) -> Arc<Vec<WorkerInfo>> {
        let workers = Arc::new(workers);
        if let Ok(mut slot) = self.0.lock() {
            *slot = Some((Instant::now(), workers.clone()));
        }
        workers
    }
}

/// Describes `tools` from the fleet the gateway's broker knows and its limits.
/// `max_age` is how old a remembered worker list may be (zero asks the broker);
/// the broker is asked only when one of `tools` has a `params` argument.
pub async fn describe(gw: &Gateway, tools: &mut [Tool], max_age: Duration) {
    let generates = |t: &Tool| TOOL_TASKS.iter().any(|(name, _)| *name == t.name);
    let mut workers = None;
    if tools.iter().any(generates) {
        workers = match gw.fleet.fresh(max_age) {
            Some(w) => Some(w),
            None => match tokio::time::timeout(ASK_TIMEOUT, gw.client.workers()).await {
                Ok(Ok(workers)) => Some(gw.fleet.store(workers)),
                _ => None,
            },
        };
    }
    let limits = gw.client.welcome().map(|w| w.limits);
    describe_with(
        workers.as_deref().map_or(&[], |w| w),
        limits.as_ref(),
        tools,
    );
}

/// [`describe`] with the worker list and the broker's limits at hand. The limits
/// bound every tool that takes the job options (`run_workflow` too); the workers'
/// descriptions apply to the generate tools.
pub fn describe_with(workers: &[WorkerInfo], limits: Option<&Limits>, tools: &mut [Tool]) {
    if let Some(limits) = limits {
        for tool in tools.iter_mut() {
            bound_by_limits(Arc::make_mut(&mut tool.input_schema), limits);
        }
    }
    let sets: Vec<&ParamSet> = workers
        .iter()
        .filter(|w| w.state != WorkerState::Offline)
        .flat_map(|w| &w.backends)
        .filter(|b| b.healthy)
        .filter_map(|b| b.params.as_ref())
        .flat_map(|schema| &schema.sets)
        .filter(|set| set.template.is_none() && !set.workflow)
        .collect();
    for tool in tools.iter_mut() {
        let Some((_, tasks)) = TOOL_TASKS.iter().find(|(name, _)| *name == tool.name) else {
            continue;
        };
        let schema = Arc::make_mut(&mut tool.input_schema);
        let Some(Value::Object(props)) = schema.get_mut("properties") else {
            continue;
        };
        let for_tool: Vec<&ParamSet> = sets
            .iter()
            .copied()
            .filter(|s| s.tasks.is_empty() || tasks.iter().any(|t| s.tasks.contains(t)))
            .collect();
        if for_tool.is_empty() {
            continue;
        }
        narrow_own_arguments(props, &merged_json_schema(for_tool.iter().copied(), &[]));
        let own: Vec<String> = props.keys().filter(|k| *k != "params").cloned().collect();
        let own: Vec<&str> = own.iter().map(String::as_str).collect();
        let mut described = merged_json_schema(for_tool, &own);
        if described["properties"]
            .as_object()
            .is_none_or(|p| p.is_empty())
        {
            continue;
        }
        let said = props
            .get("params")
            .and_then(|p| p.get("description"))
            .and_then(Value::as_str)
            .unwrap_or("Extra backend-specific parameters.");
        described["description"] = format!(
            "{said} The properties are what the backends online take (each backend refuses \
             names it does not know; `list_workers` shows which backends are online)."
        )
        .into();
        props.insert("params".into(), described);
    }
}

/// The job options' bounds and the prompt's and template's lengths, from the
/// broker's limits, in a tool's input `schema` (a tool without these arguments is
/// left as it is).
fn bound_by_limits(schema: &mut Map<String, Value>, limits: &Limits) {
    // A LoRA entry may be a shared definition (`"$ref": "#/$defs/LoraRef"`).
    let lora_def = schema
        .get("properties")
        .and_then(|p| p.pointer("/loras/items/$ref"))
        .and_then(Value::as_str)
        .and_then(|r| r.strip_prefix("#/$defs/"))
        .map(str::to_string);
    if let Some(def) = lora_def {
        let name = schema
            .get_mut("$defs")
            .and_then(|d| d.pointer_mut(&format!("/{def}/properties/name")));
        if let Some(Value::Object(name)) = name {
            name.insert("maxLength".into(), limits.max_name_len.into());
        }
    }
    let Some(Value::Object(props)) = schema.get_mut("properties") else {
        return;
    };
    JobOptions::bound_json_schema(props, limits);
    for (name, limit) in [
        ("prompt", limits.max_prompt_chars),
        ("negative_prompt", limits.max_prompt_chars),
        ("template", limits.max_name_len),
    ] {
        if let Some(Value::Object(p)) = props.get_mut(name) {
            p.insert("maxLength".into(), limit.into());
        }
    }
}

/// Narrows each numeric tool argument that the backends describe under the same
/// name (`width`, `steps`, `count`, …) to the range they accept together
/// (`described`, the widest over the backends online). A range that would come
/// out empty is left as it was: the broker then names the parameter at submit.
fn narrow_own_arguments(props: &mut Map<String, Value>, described: &Value) {
    let Some(described) = described["properties"].as_object() else {
        return;
    };
    let bound = |s: &Value, key: &str| s.get(key).and_then(Value::as_f64);
    for (name, arg) in props.iter_mut() {
        let Some(backends) = described.get(name) else {
            continue;
        };
        let (Some(low), Some(high)) = (bound(arg, "minimum"), bound(arg, "maximum")) else {
            continue;
        };
        let low = bound(backends, "minimum").map_or(low, |b| low.max(b));
        let high = bound(backends, "maximum").map_or(high, |b| high.min(b));
        if let (true, Value::Object(arg)) = (low <= high, arg) {
            arg.insert("minimum".into(), json_num(low));
            arg.insert("maximum".into(), json_num(high));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_protocol::params::{ParamKind, ParamSchema, ParamSpec};
    use kiln_protocol::worker::{BackendInventory, GpuInfo};
    use kiln_protocol::Backend;
    use serde_json::json;

    fn worker(params: ParamSchema, state: WorkerState) -> WorkerInfo {
        WorkerInfo {
            worker_id: "w".into(),
            hostname: "h".into(),
            state,
            gpu: GpuInfo::default(),
            backends: vec![BackendInventory {
                backend: Backend::Sim,
                healthy: true,
                models: vec![],
                detail: None,
                params: Some(params),
            }],
            labels: vec![],
            loaded_model: None,
            resident: vec![],
            current_job: None,
            jobs_done: 0,
            last_seen_ms: 0,
            version: "0".into(),
            offline_reason: None,
        }
    }

    fn tool(name: &str) -> Tool {
        let schema = json!({"type": "object", "properties": {
            "prompt": {"type": "string"}, "steps": {"type": "integer"},
            "params": {"type": "object", "description": "Extra parameters."}}});
        Tool::new(
            name.to_string(),
            "t",
            Arc::new(schema.as_object().unwrap().clone()),
        )
    }

    #[test]
    fn params_are_described_from_the_workers_online_per_task() {
        let schema = ParamSchema {
            sets: vec![
                ParamSet {
                    tasks: vec![Task::TextToImage],
                    params: vec![
                        ParamSpec::new("steps", ParamKind::Integer, "").range(1.0, 50.0),
                        ParamSpec::new("sampler", ParamKind::String, "the sampler")
                            .choices(&["euler", "ddim"]),
                    ],
                    ..ParamSet::default()
                },
                ParamSet {
                    tasks: vec![Task::TextToVideo],
                    params: vec![ParamSpec::new("fps", ParamKind::Integer, "").range(1.0, 60.0)],
                    ..ParamSet::default()
                },
            ],
        };
        let mut tools = vec![
            tool("generate_image"),
            tool("generate_video"),
            tool("get_job"),
        ];
        describe_with(
            &[worker(schema.clone(), WorkerState::Idle)],
            None,
            &mut tools,
        );
        let image = &tools[0].input_schema["properties"]["params"];
        assert_eq!(
            image["properties"]["sampler"]["enum"],
            json!(["euler", "ddim"])
        );
        assert!(
            image["properties"].get("steps").is_none(),
            "a tool argument"
        );
        assert!(image["description"]
            .as_str()
            .unwrap()
            .starts_with("Extra parameters."));
        let video = &tools[1].input_schema["properties"]["params"];
        assert_eq!(video["properties"]["fps"]["maximum"], 60);
        assert!(video["properties"].get("sampler").is_none());
        assert!(tools[2].input_schema["properties"]["params"]
            .get("properties")
            .is_none());

        // Offline workers describe nothing.
        let mut tools = vec![tool("generate_image")];
        describe_with(&[worker(schema, WorkerState::Offline)], None, &mut tools);
        assert!(tools[0].input_schema["properties"]["params"]
            .get("properties")
            .is_none());
    }

    #[test]
    fn own_arguments_are_narrowed_to_the_backends_and_the_brokers_limits() {
        let set = |max_side: f64| ParamSchema {
            sets: vec![ParamSet {
                params: vec![
                    ParamSpec::new("width", ParamKind::Integer, "").range(8.0, max_side),
                    ParamSpec::new("steps", ParamKind::Integer, "").range(1.0, 10_000.0),
                ],
                ..ParamSet::default()
            }],
        };
        let schema = json!({"type": "object", "properties": {
            "prompt": {"type": "string", "maxLength": 16384},
            "width": {"type": "integer", "minimum": 64, "maximum": 4096},
            "steps": {"type": "integer", "minimum": 1, "maximum": 200},
            "count": {"type": "integer", "minimum": 1, "maximum": 8},
            "labels": {"type": "array", "items": {"type": "string"}, "maxItems": 16}}});
        let tool = || {
            Tool::new(
                "generate_image",
                "t",
                Arc::new(schema.as_object().unwrap().clone()),
            )
        };
        let limits = Limits {
            max_labels: 4,
            max_prompt_chars: 1000,
            ..Limits::default()
        };
        // Two workers: the widest range over them, within the gateway's own.
        let workers = [
            worker(set(1024.0), WorkerState::Idle),
            worker(set(2048.0), WorkerState::Busy),
        ];
        let mut tools = vec![tool()];
        describe_with(&workers, Some(&limits), &mut tools);
        let p = &tools[0].input_schema["properties"];
        assert_eq!(
            (&p["width"]["minimum"], &p["width"]["maximum"]),
            (&json!(64), &json!(2048))
        );
        assert_eq!(p["steps"]["maximum"], 200, "the gateway's range is kept");
        assert_eq!(p["count"]["maximum"], 8, "not described: untouched");
        assert_eq!(p["labels"]["maxItems"], 4);
        assert_eq!(p["prompt"]["maxLength"], 1000);

        // A backend whose range does not meet the gateway's leaves it alone.
        let mut tools = vec![tool()];
        describe_with(&[worker(set(32.0), WorkerState::Idle)], None, &mut tools);
        assert_eq!(
            tools[0].input_schema["properties"]["width"]["maximum"],
            4096
        );
    }

    #[test]
    fn the_brokers_limits_bound_every_tool_with_job_options_and_shared_definitions() {
        let schema = json!({"type": "object",
            "properties": {
                "labels": {"type": "array", "items": {"type": "string"}, "maxItems": 16},
                "loras": {"type": "array", "items": {"$ref": "#/$defs/LoraRef"}}},
            "$defs": {"LoraRef": {"type": "object", "properties": {
                "name": {"type": "string", "maxLength": 256}}}}});
        let mut tools = vec![Tool::new(
            "run_workflow",
            "t",
            Arc::new(schema.as_object().unwrap().clone()),
        )];
        let limits = Limits {
            max_labels: 2,
            max_name_len: 40,
            ..Limits::default()
        };
        describe_with(&[], Some(&limits), &mut tools);
        let s = &tools[0].input_schema;
        assert_eq!(s["properties"]["labels"]["maxItems"], 2);
        assert_eq!(s["$defs"]["LoraRef"]["properties"]["name"]["maxLength"], 40);
    }
}
