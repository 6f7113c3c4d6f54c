//! Documented size limits for every variable-size field.
//!
//! The broker enforces these after a message arrives (the zeromq crate has no
//! `MAXMSGSIZE`), so its memory stays bounded whatever a client sends. Each breach is a
//! [`ProtocolError::FieldTooLarge`] naming the field and the limit.

use serde::{Deserialize, Serialize};

use crate::error::ProtocolError;

/// Every limit in one place; the broker's config can tighten or loosen them and the
/// `welcome` reply tells clients the values in force. Unknown keys are ignored (a
/// newer broker may announce a limit an older client does not know) and absent ones
/// take their defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(default)]
pub struct Limits {
    /// Largest body of any message, in bytes (input images travel inside `submit`).
    pub max_message_bytes: u64,
    /// Longest `params.prompt` / `params.negative_prompt`, in characters.
    pub max_prompt_chars: u64,
    /// Most entries in `params`.
    pub max_params: u64,
    /// Largest encoded `params` map, in bytes.
    pub max_params_bytes: u64,
    /// Largest encoded raw `workflow` graph, in bytes.
    pub max_workflow_bytes: u64,
    /// Largest single input file (an init image), in bytes.
    pub max_input_bytes: u64,
    /// Most input files on one job.
    pub max_inputs: u64,
    /// Longest model, LoRA, template, input or output name, in bytes.
    pub max_name_len: u64,
    /// Most LoRAs on one job.
    pub max_loras: u64,
    /// Most labels on a job or a worker.
    pub max_labels: u64,
    /// Longest label, worker id or client name, in bytes.
    pub max_label_len: u64,
    /// Longest idempotency key, in bytes.
    pub max_idempotency_key_len: u64,
    /// Most jobs one client may have queued at once.
    pub max_queued_per_client: u64,
    /// Largest artifact chunk in an upload or a fetch reply, in bytes.
    pub max_chunk_bytes: u64,
    /// Largest single artifact, in bytes.
    pub max_artifact_bytes: u64,
    /// Most artifacts one job may produce.
    pub max_artifacts_per_job: u64,
    /// Most jobs one `list` reply carries.
    pub max_list: u64,
    /// Highest `max_attempts` a job may ask for.
    pub max_attempts: u64,
    /// Longest queue or run timeout a job may ask for, in seconds.
    pub max_timeout_s: u64,
    /// Longest stage text in a progress report, in bytes.
    pub max_stage_len: u64,
    /// Longest error message a worker may report, in bytes.
    pub max_error_len: u64,
}

impl Default for Limits {
    fn default() -> Self {
        const MIB: u64 = 1024 * 1024;
        Limits {
            max_message_bytes: 48 * MIB,
            max_prompt_chars: 16_384,
            max_params: 64,
            max_params_bytes: 256 * 1024,
            max_workflow_bytes: 4 * MIB,
            max_input_bytes: 16 * MIB,
            max_inputs: 4,
            max_name_len: 256,
            max_loras: 16,
            max_labels: 16,
            max_label_len: 64,
            max_idempotency_key_len: 128,
            max_queued_per_client: 10_000,
            max_chunk_bytes: MIB,
            max_artifact_bytes: 4096 * MIB,
            max_artifacts_per_job: 64,
            max_list: 1_000,
            max_attempts: 10,
            max_timeout_s: 7 * 24 * 3600,
            max_stage_len: 256,
            max_error_len: 4_096,
        }
    }
}

/// Every key of [`Limits`], for the strict decoding of configuration files.
pub const LIMITS_FIELDS: &[&str] = &[
    "max_message_bytes",
    "max_prompt_chars",
    "max_params",
    "max_params_bytes",
    "max_workflow_bytes",
    "max_input_bytes",
    "max_inputs",
    "max_name_len",
    "max_loras",
    "max_labels",
    "max_label_len",
    "max_idempotency_key_len",
    "max_queued_per_client",
    "max_chunk_bytes",
    "max_artifact_bytes",
    "max_artifacts_per_job",
    "max_list",
    "max_attempts",
    "max_timeout_s",
    "max_stage_len",
    "max_error_len",
];

impl Limits {
    /// Decodes limits from an operator's configuration, where an unknown key is a
    /// typo to report (on the wire, in `welcome`, unknown keys are ignored).
    pub fn deserialize_strict<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        crate::strict::strict(d, LIMITS_FIELDS)
    }
}

/// Fails with a typed error naming `field` when `actual` exceeds `limit`.
pub fn check(field: &str, actual: u64, limit: u64) -> Result<(), ProtocolError> {
    if actual > limit {
        Err(ProtocolError::FieldTooLarge {
            field: field.to_string(),
            limit,
            actual,
        })
    } else {
        Ok(())
    }
}

/// Like [`check`] for string lengths in bytes.
pub fn check_len(field: &str, value: &str, limit: u64) -> Result<(), ProtocolError> {
    check(field, value.len() as u64, limit)
}

/// The message of a job that makes (or would make) more outputs than the broker
/// keeps: what was counted, the limit and the setting that raises it. `what` says
/// what is known: "the job made 65 outputs", "the workflow has 65 output nodes".
/// Said the same way by the broker (an upload past the limit) and by workers
/// (before running, or before uploading).
pub fn too_many_outputs(what: &str, limit: u64) -> String {
    format!(
        "{what}, over the limit of {limit} outputs per job \
         (`broker.limits.max_artifacts_per_job`); make fewer outputs (fewer output \
         nodes or a smaller batch) or raise that limit"
    )
}

/// Truncates `s` to at most `max` bytes on a character boundary: used for free text a
/// worker reports (stage, error message) where cutting is kinder than refusing.
pub fn truncate(s: &mut String, max: u64) {
    let max = max as usize;
    if s.len() > max {
        let mut cut = max;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_field_list_names_every_limit() {
        let v = serde_json::to_value(Limits::default()).unwrap();
        let mut keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
        let mut want = LIMITS_FIELDS.to_vec();
        keys.sort();
        want.sort();
        assert_eq!(keys, want);
    }
}
