//! Typed errors: what went wrong with a message, and how the broker says so on the wire.

use serde::{Deserialize, Serialize};

/// The machine-readable reason in every `error` reply. Clients switch on this; the
/// accompanying `message` is for people.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The header frame is not a Kiln tag at all.
    ForeignProtocol,
    /// The header is a Kiln tag of a version this peer does not speak.
    UnsupportedVersion,
    /// The message is larger than the configured limit.
    MessageTooLarge,
    /// Wrong number of frames, or a body that is not the msgpack map it should be.
    Malformed,
    /// The body's `type` names no message this peer knows.
    UnknownType,
    /// A field has the wrong type or a value outside its allowed set or range.
    InvalidField,
    /// A field is longer or larger than its documented limit.
    FieldTooLarge,
    /// The peer has not presented a valid token.
    Unauthenticated,
    /// No job, artifact or worker with that id.
    NotFound,
    /// No worker the broker knows of could ever run this job.
    Unschedulable,
    /// The client already has as many queued jobs as it may.
    QueueFull,
    /// The request does not apply to the job in its current state.
    InvalidState,
    /// The broker is shutting down or its store failed; retry later.
    Unavailable,
    /// A bug or an I/O failure inside the broker.
    Internal,
    /// The idempotency key was used before by the same client for a different job.
    IdempotencyConflict,
    /// A code this peer does not know (sent by a newer peer): treat it as a failure
    /// of the request and show the message.
    #[serde(other)]
    Unknown,
}

/// The payload of an `error` reply.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub code: ErrorCode,
    pub message: String,
    /// The offending field, dotted from the message root (`job.params.prompt`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    /// The limit that was exceeded, when one was.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<u64>,
}

impl ErrorBody {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        ErrorBody {
            code,
            message: message.into(),
            field: None,
            limit: None,
        }
    }
}

impl std::fmt::Display for ErrorBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}: {}", self.code, self.message)
    }
}

/// Why an incoming message was rejected before it reached any logic.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ProtocolError {
    #[error("expected {expected} frames, got {got}")]
    FrameCount { expected: usize, got: usize },
    #[error("foreign protocol tag {0:?}: Kiln messages start with a KILN1 header frame")]
    ForeignTag(String),
    #[error("protocol version {found:?} is not supported; this peer speaks KILN1")]
    UnsupportedVersion { found: String },
    #[error("message of {size} bytes exceeds the limit of {limit} bytes")]
    TooLarge { size: usize, limit: usize },
    #[error("body is not a valid msgpack message: {0}")]
    Malformed(String),
    #[error("unknown message type {0:?}")]
    UnknownType(String),
    #[error("field `{field}`: {reason}")]
    InvalidField { field: String, reason: String },
    /// A value outside its range (a job field's, or a backend parameter's
    /// `min`/`max`); `limit` is the maximum when it is a whole number.
    #[error("field `{field}`: {reason}")]
    OutOfRange {
        field: String,
        reason: String,
        limit: Option<u64>,
    },
    #[error("field `{field}` has size {actual}, over its limit of {limit}")]
    FieldTooLarge {
        field: String,
        limit: u64,
        actual: u64,
    },
}

impl ProtocolError {
    pub fn code(&self) -> ErrorCode {
        match self {
            ProtocolError::FrameCount { .. } | ProtocolError::Malformed(_) => ErrorCode::Malformed,
            ProtocolError::ForeignTag(_) => ErrorCode::ForeignProtocol,
            ProtocolError::UnsupportedVersion { .. } => ErrorCode::UnsupportedVersion,
            ProtocolError::TooLarge { .. } => ErrorCode::MessageTooLarge,
            ProtocolError::UnknownType(_) => ErrorCode::UnknownType,
            ProtocolError::InvalidField { .. } | ProtocolError::OutOfRange { .. } => {
                ErrorCode::InvalidField
            }
            ProtocolError::FieldTooLarge { .. } => ErrorCode::FieldTooLarge,
        }
    }

    pub fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Self {
        ProtocolError::InvalidField {
            field: field.into(),
            reason: reason.into(),
        }
    }

    /// A value outside `min..=max`: `invalid_field`, with `limit` set to `max`.
    pub fn out_of_range(
        field: impl Into<String>,
        min: i64,
        max: i64,
        actual: impl ToString,
    ) -> Self {
        ProtocolError::OutOfRange {
            field: field.into(),
            reason: format!("must be from {min} to {max}, got {}", actual.to_string()),
            limit: u64::try_from(max).ok(),
        }
    }

    pub fn to_body(&self) -> ErrorBody {
        let (field, limit) = match self {
            ProtocolError::InvalidField { field, .. } => (Some(field.clone()), None),
            ProtocolError::OutOfRange { field, limit, .. } => (Some(field.clone()), *limit),
            ProtocolError::FieldTooLarge { field, limit, .. } => {
                (Some(field.clone()), Some(*limit))
            }
            ProtocolError::TooLarge { limit, .. } => (None, Some(*limit as u64)),
            _ => (None, None),
        };
        ErrorBody {
            code: self.code(),
            message: self.to_string(),
            field,
            limit,
        }
    }
}

impl From<ProtocolError> for ErrorBody {
    fn from(e: ProtocolError) -> Self {
        e.to_body()
    }
}
