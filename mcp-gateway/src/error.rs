//! What a tool call can fail with, and how the failure reaches the assistant.
//!
//! Every failure becomes an in-band tool result (`isError: true`) whose text and
//! structured content name the kind and, for bad arguments, the field: the assistant
//! reads it and can fix its call. Protocol errors are left to rmcp.

use kiln_protocol::ClientError;
use rmcp::model::{CallToolResult, ContentBlock};
use serde_json::json;

/// Why a tool call did not produce its result.
#[derive(Debug, thiserror::Error)]
pub enum ToolError {
    /// An argument is missing, of the wrong type, outside its range or otherwise
    /// unusable. `field` is the argument's path, e.g. `loras[1].strength`.
    #[error("invalid argument `{field}`: {reason}")]
    InvalidArgument { field: String, reason: String },
    /// The broker refused or could not be reached.
    #[error("{0}")]
    Broker(#[from] ClientError),
    /// A path outside the allowed roots, or file access while none is configured.
    #[error("file access refused for `{field}`: {reason}")]
    AccessDenied { field: String, reason: String },
    /// Reading or writing a file failed.
    #[error("{0}")]
    Io(String),
    /// The output could not be decoded or re-encoded.
    #[error("image processing failed: {0}")]
    Image(String),
}

impl ToolError {
    pub fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Self {
        ToolError::InvalidArgument {
            field: field.into(),
            reason: reason.into(),
        }
    }

    pub fn denied(field: impl Into<String>, reason: impl Into<String>) -> Self {
        ToolError::AccessDenied {
            field: field.into(),
            reason: reason.into(),
        }
    }

    /// A short machine-readable name of the kind.
    pub fn kind(&self) -> &'static str {
        match self {
            ToolError::InvalidArgument { .. } => "invalid_argument",
            ToolError::Broker(ClientError::Broker(_)) => "refused",
            ToolError::Broker(_) => "broker_unavailable",
            ToolError::AccessDenied { .. } => "access_denied",
            ToolError::Io(_) => "io",
            ToolError::Image(_) => "image",
        }
    }

    /// The argument at fault, when there is one.
    pub fn field(&self) -> Option<&str> {
        match self {
            ToolError::InvalidArgument { field, .. } | ToolError::AccessDenied { field, .. } => {
                Some(field)
            }
            // The broker names spec fields (`job.model`, `job.params.width`); the
            // tools' arguments carry the same names without the prefix.
            ToolError::Broker(ClientError::Broker(body)) => body.field.as_deref().map(|f| {
                f.strip_prefix("job.params.")
                    .or_else(|| f.strip_prefix("job."))
                    .unwrap_or(f)
            }),
            _ => None,
        }
    }

    /// The in-band error result the assistant sees.
    pub fn into_result(self) -> CallToolResult {
        let mut result = CallToolResult::error(vec![ContentBlock::text(self.to_string())]);
        let mut error = json!({ "kind": self.kind(), "message": self.to_string() });
        if let Some(field) = self.field() {
            error["field"] = field.into();
        }
        // The error form every output schema admits (crate::schema::error_schema).
        result.structured_content = Some(json!({ "error": error }));
        result
    }
}

/// A failure while preparing inputs, converted from `std::io::Error` with context.
pub fn io_error(what: &str, err: std::io::Error) -> ToolError {
    ToolError::Io(format!("{what}: {err}"))
}
