//! The `kiln://` resources: fleet views as JSON, and jobs and artifacts by id.

use base64::Engine;
use kiln_protocol::{ArtifactId, ClientError, ErrorCode, JobId};
use rmcp::model::{ReadResourceResult, Resource, ResourceContents, ResourceTemplate};
use rmcp::ErrorData as McpError;
use serde_json::Value;

use crate::error::ToolError;
use crate::fleet;
use crate::gateway::Gateway;
use crate::render::job_report;

/// The fixed resources: (uri, name, description).
const FIXED: [(&str, &str, &str); 5] = [
    (
        "kiln://models",
        "models",
        "Models installed across the fleet, with the workers that have them",
    ),
    ("kiln://loras", "loras", "LoRAs installed across the fleet"),
    (
        "kiln://queue",
        "queue",
        "Jobs queued or running, newest first",
    ),
    (
        "kiln://workers",
        "workers",
        "GPU workers: GPU, VRAM free/total, resident models, state, current job",
    ),
    (
        "kiln://health",
        "health",
        "The broker's and the gateway's health",
    ),
];

pub fn list() -> Vec<Resource> {
    FIXED
        .iter()
        .map(|(uri, name, description)| {
            Resource::new(*uri, *name)
                .with_description(*description)
                .with_mime_type("application/json")
        })
        .collect()
}

pub fn templates() -> Vec<ResourceTemplate> {
    vec![
        ResourceTemplate::new("kiln://jobs/{id}", "job")
            .with_description("A job's state, progress, timings, outputs and history (id like j42)")
            .with_mime_type("application/json"),
        ResourceTemplate::new("kiln://artifacts/{id}", "artifact")
            .with_description("An output file's bytes with its media type (id like j42.0)"),
    ]
}

fn to_mcp(e: ToolError) -> McpError {
    match e {
        ToolError::Broker(ClientError::Broker(body)) if body.code == ErrorCode::NotFound => {
            McpError::resource_not_found(body.message, None)
        }
        ToolError::InvalidArgument { .. } => McpError::invalid_params(e.to_string(), None),
        other => McpError::internal_error(other.to_string(), None),
    }
}

fn json_contents(uri: &str, value: &Value) -> ReadResourceResult {
    let text = serde_json::to_string_pretty(value).unwrap_or_default();
    ReadResourceResult::new(vec![
        ResourceContents::text(text, uri).with_mime_type("application/json")
    ])
}

pub async fn read(gw: &Gateway, uri: &str) -> Result<ReadResourceResult, McpError> {
    let value = match uri {
        "kiln://models" => fleet::models(gw, None, false).await,
        "kiln://loras" => fleet::models(gw, None, true).await,
        "kiln://queue" => fleet::queue(gw).await,
        "kiln://workers" => fleet::workers(gw).await,
        "kiln://health" => fleet::health(gw).await,
        _ => {
            if let Some(id) = uri.strip_prefix("kiln://jobs/") {
                let id: JobId = id.parse().map_err(|e: kiln_protocol::IdError| {
                    McpError::invalid_params(e.to_string(), None)
                })?;
                let snapshot = gw.client.get(id).await.map_err(|e| to_mcp(e.into()))?;
                let mut report =
                    serde_json::to_value(job_report(&snapshot, None)).unwrap_or_default();
                if let Some(map) = report.as_object_mut() {
                    map.insert(
                        "history".into(),
                        serde_json::to_value(&snapshot.history).unwrap_or_default(),
                    );
                    map.insert(
                        "artifacts".into(),
                        serde_json::to_value(&snapshot.artifacts).unwrap_or_default(),
                    );
                }
                return Ok(json_contents(uri, &report));
            }
            if let Some(id) = uri.strip_prefix("kiln://artifacts/") {
                let id: ArtifactId = id.parse().map_err(|e: kiln_protocol::IdError| {
                    McpError::invalid_params(e.to_string(), None)
                })?;
                let artifact = gw
                    .client
                    .fetch_artifact(id)
                    .await
                    .map_err(|e| to_mcp(e.into()))?;
                let blob = base64::engine::general_purpose::STANDARD.encode(&artifact.data);
                return Ok(ReadResourceResult::new(vec![ResourceContents::blob(
                    blob, uri,
                )
                .with_mime_type(artifact.media_type)]));
            }
            return Err(McpError::resource_not_found(
                format!("no resource {uri}"),
                None,
            ));
        }
    };
    value.map(|v| json_contents(uri, &v)).map_err(to_mcp)
}
