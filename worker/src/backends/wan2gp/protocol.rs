//! The bridge protocol: JSON lines between the worker and `bridge.py`.
//!
//! Commands go to the bridge's stdin; its messages come back on a dedicated pipe
//! (file descriptor 3 in the bridge), never on stdout, which Wan2GP swaps during
//! jobs and which C extensions write to. Every message carries `"v": 1` and a
//! `"type"`; unknown fields are ignored and unknown types are logged, so either
//! side can grow without breaking the other. `docs` of each type are in
//! `bridge.py`'s header, which is the other half of this contract.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// The protocol version both sides speak.
pub const VERSION: u32 = 1;

/// A command to the bridge.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ToBridge {
    /// Start a job; answered with `accepted` or `rejected`, then exactly one
    /// terminal message (`result`, `error` or `cancelled`).
    Submit {
        job_id: String,
        settings: Map<String, Value>,
        want_preview: bool,
    },
    /// Ask Wan2GP to stop the job; answered at once with `cancel_ack`.
    Cancel {
        job_id: String,
    },
    /// Read-only discovery, answered with `reply` (only while idle).
    Query {
        req_id: u64,
        op: String,
        args: Value,
    },
    /// A one-step generation that loads `model_type`; behaves like a job.
    Warmup {
        job_id: String,
        model_type: String,
    },
    /// Releases the loaded model (VRAM and pinned RAM); only while idle.
    Unload {
        req_id: u64,
    },
    Ping {
        req_id: u64,
    },
    /// Cancel any job, wait up to `grace_s`, say `bye` and exit.
    Shutdown {
        grace_s: f64,
    },
}

/// `{"v": 1, ...command}` as one line.
pub fn encode(cmd: &ToBridge) -> Vec<u8> {
    let mut value = serde_json::to_value(cmd).expect("commands serialize");
    if let Value::Object(map) = &mut value {
        map.insert("v".into(), VERSION.into());
    }
    let mut line = serde_json::to_vec(&value).expect("values serialize");
    line.push(b'\n');
    line
}

/// A message from the bridge.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum FromBridge {
    Ready(Ready),
    /// Wan2GP's `init` failed (wrong mmgp version, missing files, bad root); the
    /// bridge exits after sending this.
    InitFailed {
        message: String,
    },
    Accepted {
        job_id: String,
    },
    Rejected {
        job_id: String,
        reason: String,
        #[serde(default)]
        message: String,
    },
    Progress(ProgressMsg),
    Status(TextMsg),
    Info(TextMsg),
    Log(LogMsg),
    CancelAck {
        job_id: String,
    },
    Result(ResultMsg),
    Error(ErrorMsg),
    Cancelled {
        job_id: String,
    },
    Heartbeat(HeartbeatMsg),
    Reply {
        req_id: u64,
        #[serde(default)]
        data: Option<Value>,
        #[serde(default)]
        error: Option<String>,
    },
    Pong {
        req_id: u64,
    },
    Bye,
    /// A type this worker does not know (a newer bridge); logged and ignored.
    #[serde(other)]
    Unknown,
}

/// Sent once, after Wan2GP's session is initialised.
#[derive(Debug, Clone, PartialEq, Deserialize, Default)]
pub struct Ready {
    #[serde(default)]
    pub wangp_version: Option<String>,
    #[serde(default)]
    pub settings_version: Option<Value>,
    pub pid: u32,
    #[serde(default)]
    pub cuda_device_name: Option<String>,
    #[serde(default)]
    pub vram_total_mb: Option<u64>,
    #[serde(default)]
    pub cli_args: Vec<String>,
}

/// One step of a job, coalesced by the bridge.
#[derive(Debug, Clone, PartialEq, Deserialize, Default)]
pub struct ProgressMsg {
    pub job_id: String,
    #[serde(default)]
    pub phase: Option<String>,
    #[serde(default)]
    pub raw_phase: Option<String>,
    #[serde(default)]
    pub status: Option<String>,
    #[serde(default)]
    pub pct: Option<f64>,
    #[serde(default)]
    pub step: Option<u32>,
    #[serde(default)]
    pub total_steps: Option<u32>,
    #[serde(default)]
    pub sample: Option<u32>,
    #[serde(default)]
    pub total_samples: Option<u32>,
    #[serde(default)]
    pub window: Option<u32>,
    #[serde(default)]
    pub total_windows: Option<u32>,
}

/// `status` and `info`: a line of text about a job ("Loading model …").
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct TextMsg {
    #[serde(default)]
    pub job_id: Option<String>,
    pub text: String,
}

/// A line Wan2GP printed during a job (captured by its API).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct LogMsg {
    #[serde(default)]
    pub job_id: Option<String>,
    #[serde(default)]
    pub stream: String,
    pub text: String,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct ResultMsg {
    pub job_id: String,
    /// Absolute paths of the files Wan2GP wrote.
    pub files: Vec<String>,
    #[serde(default)]
    pub elapsed_s: f64,
    #[serde(default)]
    pub loaded_model: Option<String>,
    #[serde(default)]
    pub seed: Option<Value>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct ErrorMsg {
    pub job_id: String,
    /// `validation`, `generation` or `runtime` (Wan2GP's stages), or `bridge`.
    pub stage: String,
    pub message: String,
    /// Wan2GP ran out of VRAM or RAM.
    #[serde(default)]
    pub oom: bool,
    /// The CUDA context is poisoned (or the run escaped Wan2GP's handling): the
    /// bridge exits right after this message.
    #[serde(default)]
    pub fatal: bool,
    /// The last lines Wan2GP printed, for the report.
    #[serde(default)]
    pub log_tail: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct HeartbeatMsg {
    #[serde(default)]
    pub busy: bool,
    #[serde(default)]
    pub job_id: Option<String>,
    #[serde(default)]
    pub loaded_model: Option<String>,
    #[serde(default)]
    pub rss_mb: Option<u64>,
}

impl FromBridge {
    /// The job a message is about, if any.
    pub fn job_id(&self) -> Option<&str> {
        match self {
            FromBridge::Accepted { job_id }
            | FromBridge::Rejected { job_id, .. }
            | FromBridge::CancelAck { job_id }
            | FromBridge::Cancelled { job_id } => Some(job_id),
            FromBridge::Progress(p) => Some(&p.job_id),
            FromBridge::Status(t) | FromBridge::Info(t) => t.job_id.as_deref(),
            FromBridge::Log(l) => l.job_id.as_deref(),
            FromBridge::Result(r) => Some(&r.job_id),
            FromBridge::Error(e) => Some(&e.job_id),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_carry_the_version_and_end_with_a_newline() {
        let line = encode(&ToBridge::Cancel {
            job_id: "j1-1".into(),
        });
        assert_eq!(line.last(), Some(&b'\n'));
        let v: Value = serde_json::from_slice(&line).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"v": 1, "type": "cancel", "job_id": "j1-1"})
        );
    }

    #[test]
    fn messages_ignore_unknown_fields_and_types() {
        let m: FromBridge = serde_json::from_str(
            r#"{"v":1,"type":"progress","job_id":"j1-1","phase":"inference","step":3,"total_steps":30,"new_field":true}"#,
        )
        .unwrap();
        assert!(
            matches!(&m, FromBridge::Progress(p) if p.step == Some(3) && p.total_steps == Some(30))
        );
        assert_eq!(m.job_id(), Some("j1-1"));
        let m: FromBridge =
            serde_json::from_str(r#"{"v":1,"type":"from_the_future","x":1}"#).unwrap();
        assert_eq!(m, FromBridge::Unknown);
        let m: FromBridge = serde_json::from_str(
            r#"{"v":1,"type":"error","job_id":"j2-1","stage":"generation","message":"unsufficient VRAM","oom":true}"#,
        )
        .unwrap();
        assert!(matches!(m, FromBridge::Error(e) if e.oom && !e.fatal));
    }
}
