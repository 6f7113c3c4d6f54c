//! Helpers shared by the worker's integration tests. Each test binary uses a
//! different part of them.
#![allow(dead_code)]

pub mod comfy;
pub mod wan2gp;

use kiln_protocol::{Client, ErrorCode, JobSpec};

/// Submits `spec` and checks that the broker refuses it at submit with
/// `invalid_field` naming `field` (a worker's parameter description at work).
pub async fn assert_refused_naming(client: &Client, spec: JobSpec, field: &str) {
    let err = client.submit(spec).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::InvalidField), "{field}: {err}");
    assert!(err.to_string().contains(field), "{field}: {err}");
}
