//! Kiln's wire protocol.
//!
//! Every ZeroMQ message Kiln sends is multipart `[header, body]`: `header` is the
//! ASCII tag [`frame::PROTOCOL_TAG`] and `body` is one msgpack map written with
//! `rmp_serde::to_vec_named`, an internally tagged enum (`{"type": "submit", ...}`).
//! Events on the PUB socket are `[topic, header, body]`.
//!
//! The crate is shared by the broker, the worker, the CLI and the MCP gateway so that
//! there is exactly one definition of every message. `docs/protocol.md` documents the
//! same messages for people writing clients in other languages.

pub mod auth;
pub mod client;
pub mod error;
pub mod event;
pub mod frame;
pub mod ids;
pub mod job;
pub mod limits;
pub mod options;
pub mod params;
pub mod probe;
pub mod request;
pub mod shape;
pub mod strict;
pub mod transport;
pub mod worker;

pub use client::{Client, ClientError, ClientOptions, Follow};
pub use error::{ErrorBody, ErrorCode, ProtocolError};
pub use event::{Event, Topic};
pub use frame::{WireMessage, PROTOCOL_TAG};
pub use ids::{ArtifactId, IdError, JobId};
pub use job::*;
pub use limits::Limits;
pub use options::JobOptions;
pub use probe::Unreachable;
pub use request::{Reply, Request};
pub use worker::{BrokerMessage, WorkerMessage};

/// The broker's and workers' software version, reported in `welcome` and `health`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Default heartbeat interval between workers and broker (Paranoid Pirate).
pub const HEARTBEAT_INTERVAL_MS: u64 = 1_000;
/// Missed heartbeats after which a peer is declared dead.
pub const HEARTBEAT_LIVENESS: u32 = 3;

/// Milliseconds since the Unix epoch: every timestamp on the wire uses this unit.
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// FNV-1a, 64 bits: a small hash that is the same in every process and on every
/// platform (std's hashers are seeded per process), for values derived from
/// names that must come out alike everywhere (the sim's pictures, kiln-mcp's
/// seed for a call with an idempotency key).
pub fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ *b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

#[cfg(test)]
mod doc_tests {
    use crate::frame::WireMessage;

    /// docs/protocol.md shows every message type with an example, so clients in
    /// other languages can be written from it alone.
    #[test]
    fn the_protocol_doc_shows_every_message() {
        let doc = include_str!("../../docs/protocol.md");
        let all = [
            crate::Request::TYPES,
            crate::Reply::TYPES,
            crate::WorkerMessage::TYPES,
            crate::BrokerMessage::TYPES,
            crate::Event::TYPES,
        ];
        let missing: Vec<&str> = all
            .iter()
            .flat_map(|types| types.iter().copied())
            .filter(|t| !doc.contains(&format!("\"type\": \"{t}\"")))
            .collect();
        assert!(
            missing.is_empty(),
            "docs/protocol.md lacks an example of {missing:?}"
        );
    }
}
