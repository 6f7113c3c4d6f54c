//! The `params` argument of the generate tools, described from the fleet.
//!
//! Each backend describes the parameters it takes (`kiln_protocol::params`); its
//! workers send that description when they register, and the broker enforces it
//! at submit. `tools/list` turns the descriptions of the backends online into the
//! `params` property of each generate tool's input schema (types, ranges, allowed
//! values, defaults, units), so an assistant sees what `params: {"sampler": …}`
//! may hold instead of an opaque map. The tool's own arguments (`width`, `steps`,
//! …) are left out: they are set through the arguments. With the broker out of
//! reach, or no worker describing its parameters, the tools keep the plain map.

use std::sync::Arc;
use std::time::Duration;

use kiln_protocol::params::{merged_json_schema, ParamSet};
use kiln_protocol::worker::{WorkerInfo, WorkerState};
use kiln_protocol::Task;
use rmcp::model::Tool;
use serde_json::Value;

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

/// Describes `params` in `tools` from the fleet the gateway's broker knows.
pub async fn describe(gw: &Gateway, tools: &mut [Tool]) {
    if let Ok(Ok(workers)) = tokio::time::timeout(ASK_TIMEOUT, gw.client.workers()).await {
        describe_with(&workers, tools);
    }
}

/// [`describe`] with the worker list at hand.
pub fn describe_with(workers: &[WorkerInfo], tools: &mut [Tool]) {
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
        let for_tool: Vec<&ParamSet> = sets
            .iter()
            .copied()
            .filter(|s| s.tasks.is_empty() || tasks.iter().any(|t| s.tasks.contains(t)))
            .collect();
        if for_tool.is_empty() {
            continue;
        }
        let schema = Arc::make_mut(&mut tool.input_schema);
        let Some(Value::Object(props)) = schema.get_mut("properties") else {
            continue;
        };
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
        describe_with(&[worker(schema.clone(), WorkerState::Idle)], &mut tools);
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
        describe_with(&[worker(schema, WorkerState::Offline)], &mut tools);
        assert!(tools[0].input_schema["properties"]["params"]
            .get("properties")
            .is_none());
    }
}
