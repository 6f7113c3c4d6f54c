//! Golden msgpack fixtures of every message (tests/fixtures/golden/).
//!
//! `current/` holds this version's encoding of one sample of every message type; the
//! test fails when an encoding changes by accident. A deliberate change re-blesses
//! `current/` (`KILN_BLESS=1 cargo test -p kiln-protocol --test golden`) and keeps the
//! earlier files in a folder named after their release: every folder, old ones
//! included, must keep decoding with this version's types (docs/protocol.md,
//! "Compatibility"). `0.1.0-dc6b6c9/` was written by the release before the contract
//! of issue #12 (main at dc6b6c9), the previous release's peers as they speak;
//! `0.1.0-6910ff2/` holds the three messages as they were before `power_mw` (main
//! at 6910ff2), which must keep decoding; `0.1.0-844955c/` the `workers` reply
//! before `resident` and the `welcome` before the `resubmit` feature (main at
//! 844955c).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use kiln_protocol::event::*;
use kiln_protocol::frame::{decode_body, encode_body, WireMessage};
use kiln_protocol::params::*;
use kiln_protocol::request::*;
use kiln_protocol::worker::*;
use kiln_protocol::*;
use serde_json::json;

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/golden")
}

fn spec() -> JobSpec {
    let mut s = JobSpec::new(Backend::Sim, Task::TextToImage)
        .param("prompt", "a kiln at dusk")
        .param("seed", 7)
        .param("steps", 20);
    s.model = Some("sim-xl".into());
    s.loras = vec![LoraRef {
        name: "ink".into(),
        strength: 0.5,
    }];
    s.min_vram_mb = Some(8192);
    s.labels = vec!["fast".into()];
    s.priority = 2;
    s.queue_timeout_s = Some(600);
    s.run_timeout_s = Some(300);
    s.max_attempts = Some(2);
    s.inputs = vec![InputFile {
        name: "init.png".into(),
        media_type: "image/png".into(),
        data: vec![0x89, b'P', b'N', b'G'],
    }];
    s.idempotency_key = Some("order-17".into());
    s.allow_degrade = true;
    s
}

fn artifact() -> ArtifactMeta {
    ArtifactMeta {
        id: "j42.0".parse().unwrap(),
        name: "sim_j42_0.png".into(),
        media_type: "image/png".into(),
        size: 1234,
        sha256: "ab".repeat(32),
    }
}

fn progress() -> Progress {
    Progress {
        pct: 50.0,
        step: Some(10),
        steps: Some(20),
        stage: "sampling 10/20".into(),
    }
}

fn snapshot() -> JobSnapshot {
    JobSnapshot {
        job_id: JobId(42),
        seq: 5,
        state: JobState::Succeeded,
        backend: Backend::Sim,
        task: Task::TextToImage,
        model: Some("sim-xl".into()),
        priority: 2,
        client: "render-farm".into(),
        attempt: 1,
        tries: 1,
        max_attempts: 2,
        worker: Some("box1-gpu0".into()),
        gpu: Some("RTX 4090".into()),
        progress: Some(progress()),
        error: None,
        artifacts: vec![artifact()],
        info: json!({"seed": 7}).as_object().cloned().unwrap(),
        cancel_requested: false,
        degrade: 0,
        queue_position: None,
        waiting: None,
        created_ms: 1_700_000_000_000,
        started_ms: Some(1_700_000_000_100),
        finished_ms: Some(1_700_000_001_000),
        history: vec![Transition {
            at_ms: 1_700_000_000_000,
            state: JobState::Queued,
            attempt: 0,
            worker: None,
            note: "submitted".into(),
        }],
        params: Some(spec().params),
        options: Some(JobOptions::of(&spec())),
        template: None,
    }
}

fn gpu() -> GpuInfo {
    GpuInfo {
        index: 0,
        name: "RTX 4090".into(),
        uuid: "GPU-1234".into(),
        total_vram_mb: 24_564,
        free_vram_mb: 20_000,
        utilization_pct: Some(3),
        temperature_c: Some(40),
        power_mw: Some(61_500),
        unified_memory: false,
        source: GpuSource::Nvml,
    }
}

fn inventory() -> BackendInventory {
    BackendInventory {
        backend: Backend::Sim,
        healthy: true,
        models: vec![ModelEntry {
            name: "sim-xl".into(),
            kind: "checkpoints".into(),
        }],
        detail: None,
        params: Some(ParamSchema {
            sets: vec![ParamSet {
                tasks: vec![Task::TextToImage],
                template: None,
                workflow: false,
                params: vec![
                    ParamSpec::new("steps", ParamKind::Integer, "sampling steps")
                        .range(0.0, 10_000.0)
                        .default(20),
                    ParamSpec::new("sampler", ParamKind::String, "").choices(&["euler", "ddim"]),
                ],
                open: false,
            }],
        }),
    }
}

fn job_ref() -> JobRef {
    JobRef {
        job_id: JobId(42),
        attempt: 1,
    }
}

fn requests() -> Vec<(&'static str, Request)> {
    vec![
        (
            "hello",
            Request::Hello(Hello {
                req_id: 1,
                token: Some("secret".into()),
                client: Some("render-farm".into()),
            }),
        ),
        (
            "submit",
            Request::Submit(Submit {
                req_id: 2,
                job: spec(),
                client: Some("render-farm".into()),
            }),
        ),
        (
            "get",
            Request::Get(Get {
                req_id: 3,
                job_id: JobId(42),
            }),
        ),
        (
            "list",
            Request::List(List {
                req_id: 4,
                filter: ListFilter {
                    states: vec![JobState::Queued],
                    backend: Some(Backend::Sim),
                    client: Some("render-farm".into()),
                    worker: None,
                    limit: Some(10),
                },
                cursor: Some("j40".into()),
            }),
        ),
        (
            "cancel",
            Request::Cancel(Cancel {
                req_id: 5,
                job_id: JobId(42),
            }),
        ),
        (
            "resubmit",
            Request::Resubmit(Resubmit {
                req_id: 11,
                job_id: JobId(42),
                idempotency_key: Some("again-1".into()),
                client: Some("render-farm".into()),
            }),
        ),
        (
            "fetch",
            Request::Fetch(Fetch {
                req_id: 6,
                artifact_id: "j42.0".parse().unwrap(),
                offset: 0,
                max_len: Some(65536),
            }),
        ),
        ("workers", Request::Workers(Simple { req_id: 7 })),
        ("models", Request::Models(Simple { req_id: 8 })),
        ("health", Request::Health(Simple { req_id: 9 })),
        ("ping", Request::Ping(Simple { req_id: 10 })),
    ]
}

fn replies() -> Vec<(&'static str, Reply)> {
    vec![
        (
            "welcome",
            Reply::Welcome(Welcome {
                req_id: 1,
                version: "0.1.0".into(),
                client: "render-farm".into(),
                limits: Limits::default(),
                features: request::FEATURES.iter().map(|f| f.to_string()).collect(),
            }),
        ),
        (
            "accepted",
            Reply::Accepted(Accepted {
                req_id: 2,
                job_id: JobId(42),
                duplicate: false,
                state: JobState::Queued,
            }),
        ),
        (
            "job",
            Reply::Job(Box::new(JobReply {
                req_id: 3,
                job: snapshot(),
            })),
        ),
        (
            "jobs",
            Reply::Jobs(JobsReply {
                req_id: 4,
                jobs: vec![snapshot()],
                next_cursor: Some("j42".into()),
            }),
        ),
        (
            "cancelled",
            Reply::Cancelled(CancelReply {
                req_id: 5,
                job_id: JobId(42),
                state: JobState::Cancelled,
            }),
        ),
        (
            "chunk",
            Reply::Chunk(Chunk {
                req_id: 6,
                artifact_id: "j42.0".parse().unwrap(),
                offset: 0,
                total: 4,
                sha256: "cd".repeat(32),
                media_type: "image/png".into(),
                name: "sim_j42_0.png".into(),
                data: vec![1, 2, 3, 4],
                eof: true,
            }),
        ),
        (
            "workers",
            Reply::Workers(WorkersReply {
                req_id: 7,
                workers: vec![WorkerInfo {
                    worker_id: "box1-gpu0".into(),
                    hostname: "box1".into(),
                    state: WorkerState::Idle,
                    gpu: gpu(),
                    backends: vec![inventory()],
                    labels: vec!["fast".into()],
                    loaded_model: Some("sim-xl".into()),
                    resident: vec!["sim-xl".into(), "sim-sd15".into()],
                    current_job: None,
                    jobs_done: 3,
                    last_seen_ms: 1_700_000_000_000,
                    version: "0.1.0".into(),
                    offline_reason: None,
                }],
            }),
        ),
        (
            "models",
            Reply::Models(ModelsReply {
                req_id: 8,
                models: vec![ModelInfo {
                    name: "sim-xl".into(),
                    kind: "checkpoints".into(),
                    backend: Backend::Sim,
                    workers: vec!["box1-gpu0".into()],
                    loaded_on: vec![],
                }],
            }),
        ),
        (
            "health",
            Reply::Health(HealthReply {
                req_id: 9,
                health: HealthReport {
                    version: "0.1.0".into(),
                    uptime_s: 60,
                    durable: true,
                    workers_online: 1,
                    workers_idle: 1,
                    workers_busy: 0,
                    workers_unhealthy: 0,
                    queued: 0,
                    running: 0,
                    finished: 3,
                    protocol_errors: 0,
                },
            }),
        ),
        ("pong", Reply::Pong(Simple { req_id: 10 })),
        (
            "error",
            Reply::error(
                Some(11),
                ProtocolError::invalid("job.params.steps", "must be an integer"),
            ),
        ),
    ]
}

fn worker_messages() -> Vec<(&'static str, WorkerMessage)> {
    vec![
        (
            "register",
            WorkerMessage::Register(Box::new(Register {
                token: Some("worker-secret".into()),
                worker_id: "box1-gpu0".into(),
                instance: "5f0c".into(),
                hostname: "box1".into(),
                version: "0.1.0".into(),
                gpu: gpu(),
                backends: vec![inventory()],
                labels: vec!["fast".into()],
                loaded_model: None,
                current: None,
                unacked: Some(job_ref()),
                held: vec![],
                max_held: 0,
                resident: vec![],
            })),
        ),
        (
            "heartbeat",
            WorkerMessage::Heartbeat(Heartbeat {
                free_vram_mb: 20_000,
                utilization_pct: Some(90),
                temperature_c: Some(70),
                power_mw: Some(402_300),
                current: Some(job_ref()),
                held: vec![],
                resident: None,
                loaded_model: Some("sim-xl".into()),
                healthy: true,
                backends: None,
            }),
        ),
        (
            "progress",
            WorkerMessage::Progress(ProgressReport {
                job_id: JobId(42),
                attempt: 1,
                progress: progress(),
            }),
        ),
        (
            "upload",
            WorkerMessage::Upload(Upload {
                job_id: JobId(42),
                attempt: 1,
                index: 0,
                name: "sim_j42_0.png".into(),
                media_type: "image/png".into(),
                offset: 0,
                total: 4,
                data: vec![1, 2, 3, 4],
            }),
        ),
        (
            "finished",
            WorkerMessage::Finished(Finished {
                job_id: JobId(42),
                attempt: 1,
                outcome: Outcome::Succeeded {
                    outputs: vec![OutputMeta {
                        index: 0,
                        name: "sim_j42_0.png".into(),
                        media_type: "image/png".into(),
                        size: 4,
                        sha256: "ef".repeat(32),
                    }],
                    info: json!({"seed": 7}).as_object().cloned().unwrap(),
                },
                loaded_model: Some("sim-xl".into()),
            }),
        ),
        (
            "refused",
            WorkerMessage::Refused(Refused {
                job_id: JobId(43),
                attempt: 1,
                busy_with: job_ref(),
            }),
        ),
        (
            "goodbye",
            WorkerMessage::Goodbye(Goodbye {
                reason: "shutdown".into(),
            }),
        ),
    ]
}

fn broker_messages() -> Vec<(&'static str, BrokerMessage)> {
    vec![
        (
            "registered",
            BrokerMessage::Registered(Registered {
                heartbeat_ms: 1000,
                liveness: 3,
                chunk_bytes: 1 << 20,
                max_outputs: Some(64),
            }),
        ),
        ("heartbeat", BrokerMessage::Heartbeat(BrokerBeat {})),
        (
            "assign",
            BrokerMessage::Assign(Assign {
                job_id: JobId(42),
                attempt: 1,
                job: Arc::new(spec()),
                degrade: 0,
                hold: false,
            }),
        ),
        ("cancel", BrokerMessage::Cancel(job_ref())),
        ("result_ack", BrokerMessage::ResultAck(job_ref())),
        ("reregister", BrokerMessage::Reregister(BrokerBeat {})),
        (
            "error",
            BrokerMessage::Error(WorkerError {
                error: ErrorBody::new(ErrorCode::Unauthenticated, "bad worker token"),
            }),
        ),
    ]
}

fn events() -> Vec<(&'static str, Event)> {
    vec![
        (
            "job_state",
            Event::JobState(JobStateEvent {
                job_id: JobId(42),
                seq: 5,
                state: JobState::Succeeded,
                attempt: 1,
                worker: Some("box1-gpu0".into()),
                error: None,
                artifacts: vec![artifact()],
                cancel_requested: false,
                note: "".into(),
                at_ms: 1_700_000_001_000,
            }),
        ),
        (
            "job_progress",
            Event::JobProgress(JobProgressEvent {
                job_id: JobId(42),
                seq: 4,
                attempt: 1,
                worker: "box1-gpu0".into(),
                gpu: "RTX 4090".into(),
                progress: progress(),
            }),
        ),
        (
            "worker_state",
            Event::WorkerState(WorkerStateEvent {
                worker_id: "box1-gpu0".into(),
                state: WorkerState::Busy,
                job_id: Some(JobId(42)),
                at_ms: 1_700_000_000_100,
            }),
        ),
    ]
}

/// Every sample, as (file name, encoded body).
fn samples() -> Vec<(String, Vec<u8>)> {
    fn named<T: serde::Serialize>(
        prefix: &str,
        v: Vec<(&'static str, T)>,
    ) -> Vec<(String, Vec<u8>)> {
        v.into_iter()
            .map(|(n, m)| (format!("{prefix}.{n}.msgpack"), encode_body(&m).to_vec()))
            .collect()
    }
    let mut all = named("request", requests());
    all.extend(named("reply", replies()));
    all.extend(named("worker", worker_messages()));
    all.extend(named("broker", broker_messages()));
    all.extend(named("event", events()));
    all
}

fn decodes(file: &str, body: &[u8]) -> Result<(), ProtocolError> {
    fn d<T: WireMessage>(b: &[u8]) -> Result<(), ProtocolError> {
        decode_body::<T>(b, usize::MAX).map(|_| ())
    }
    match file.split('.').next() {
        Some("request") => d::<Request>(body),
        Some("reply") => d::<Reply>(body),
        Some("worker") => d::<WorkerMessage>(body),
        Some("broker") => d::<BrokerMessage>(body),
        Some("event") => d::<Event>(body),
        other => panic!("fixture {file} has an unknown prefix {other:?}"),
    }
}

#[test]
fn samples_cover_every_message_type() {
    let names: Vec<String> = samples().into_iter().map(|(n, _)| n).collect();
    let check = |prefix: &str, types: &[&str]| {
        for t in types {
            let want = format!("{prefix}.{t}.msgpack");
            assert!(names.contains(&want), "no golden sample {want}");
        }
    };
    check("request", Request::TYPES);
    check("reply", Reply::TYPES);
    check("worker", WorkerMessage::TYPES);
    check("broker", BrokerMessage::TYPES);
    check("event", Event::TYPES);
}

#[test]
fn this_versions_encoding_matches_its_golden_files() {
    let current = dir().join("current");
    if std::env::var_os("KILN_BLESS").is_some() {
        std::fs::create_dir_all(&current).unwrap();
        for (name, body) in samples() {
            std::fs::write(current.join(name), body).unwrap();
        }
        return;
    }
    for (name, body) in samples() {
        let path = current.join(&name);
        let stored = std::fs::read(&path)
            .unwrap_or_else(|e| panic!("{}: {e} (bless with KILN_BLESS=1)", path.display()));
        assert!(
            stored == body,
            "{name}: the encoding changed. If that is deliberate, copy tests/fixtures/golden/current \
             to a folder named after the last release, then re-bless with KILN_BLESS=1"
        );
    }
}

#[test]
fn every_golden_file_of_every_release_still_decodes() {
    if std::env::var_os("KILN_BLESS").is_some() {
        return; // the other test is rewriting current/
    }
    let mut seen = 0;
    for release in std::fs::read_dir(dir()).unwrap() {
        let release = release.unwrap().path();
        if !release.is_dir() {
            continue;
        }
        for file in std::fs::read_dir(&release).unwrap() {
            let path = file.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            if !name.ends_with(".msgpack") || name.starts_with("record.") {
                continue;
            }
            let body = std::fs::read(&path).unwrap();
            if let Err(e) = decodes(&name, &body) {
                panic!("{}: no longer decodes: {e}", path.display());
            }
            seen += 1;
        }
    }
    assert!(seen >= samples().len(), "only {seen} golden files found");
}
