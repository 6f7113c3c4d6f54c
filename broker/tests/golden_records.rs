//! Golden msgpack fixtures of the broker's stored records (a job's spec and state
//! records, a worker's fleet record), beside the message fixtures in
//! tests/fixtures/golden/. A broker must read the records every earlier release
//! wrote (an upgrade) and, for a rollback, the records of the release after it
//! (which may carry fields it does not know); see docs/protocol.md, "Compatibility".
//!
//! The records are made by driving the real core with a fixed clock, so they are
//! byte-for-byte reproducible. `KILN_BLESS=1` rewrites `current/`.

use std::path::{Path, PathBuf};

use bytes::Bytes;
use kiln_broker::core::{Core, CoreConfig, FleetRecord, Input, Job, Output, Record};
use kiln_protocol::request::{Request, Submit};
use kiln_protocol::worker::*;
use kiln_protocol::*;

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/golden")
}

/// The spec, state and worker records of one job submitted to a durable core.
fn records() -> Vec<(&'static str, Vec<u8>)> {
    let cfg = CoreConfig {
        persist: true,
        ..CoreConfig::default()
    };
    let now = 1_700_000_000_000;
    let mut core = Core::new(cfg, now);
    let mut out: Vec<Output> = Vec::new();
    let register = WorkerMessage::Register(Box::new(Register {
        token: None,
        worker_id: "box1-gpu0".into(),
        instance: "5f0c".into(),
        hostname: "box1".into(),
        version: "0.1.0".into(),
        gpu: GpuInfo {
            index: 0,
            name: "RTX 4090".into(),
            uuid: "GPU-1234".into(),
            total_vram_mb: 24_564,
            free_vram_mb: 20_000,
            utilization_pct: None,
            temperature_c: None,
            power_mw: None,
            unified_memory: false,
            source: GpuSource::Config,
        },
        backends: vec![BackendInventory {
            backend: Backend::Sim,
            healthy: true,
            models: vec![ModelEntry {
                name: "sim-xl".into(),
                kind: "checkpoints".into(),
            }],
            detail: None,
            params: None,
        }],
        labels: vec!["fast".into()],
        loaded_model: None,
        current: None,
        unacked: None,
        held: vec![],
        max_held: 0,
        resident: vec![],
    }));
    core.handle(
        now,
        Input::Worker {
            peer: Bytes::from_static(b"w"),
            msg: register,
        },
        &mut out,
    );
    let mut spec = JobSpec::new(Backend::Sim, Task::TextToImage)
        .param("prompt", "a kiln at dusk")
        .param("seed", 7);
    spec.model = Some("sim-xl".into());
    spec.labels = vec!["fast".into()];
    spec.idempotency_key = Some("order-17".into());
    core.handle(
        now + 10,
        Input::Request {
            peer: Bytes::from_static(b"c"),
            request: Request::Submit(Submit {
                req_id: 1,
                job: spec,
            }),
        },
        &mut out,
    );
    let mut found: Vec<(&'static str, Vec<u8>)> = Vec::new();
    for o in out {
        let (name, bytes) = match o {
            Output::Persist(Record::Spec { bytes, .. }) => ("record.spec.msgpack", bytes),
            Output::Persist(Record::Job { bytes, .. }) => ("record.job.msgpack", bytes),
            Output::Persist(Record::Worker { bytes, .. }) => ("record.worker.msgpack", bytes),
            _ => continue,
        };
        // The last record of each kind is the one a store keeps.
        found.retain(|(n, _)| *n != name);
        found.push((name, bytes));
    }
    found.sort();
    found
}

#[test]
fn this_versions_records_match_their_golden_files() {
    let recs = records();
    let names: Vec<_> = recs.iter().map(|(n, _)| *n).collect();
    assert_eq!(
        names,
        [
            "record.job.msgpack",
            "record.spec.msgpack",
            "record.worker.msgpack"
        ]
    );
    let current = dir().join("current");
    if std::env::var_os("KILN_BLESS").is_some() {
        std::fs::create_dir_all(&current).unwrap();
        for (name, body) in recs {
            std::fs::write(current.join(name), body).unwrap();
        }
        return;
    }
    for (name, body) in recs {
        let stored = std::fs::read(current.join(name)).expect("bless with KILN_BLESS=1");
        assert!(
            stored == body,
            "{name}: the stored record's encoding changed; keep the old file in a release \
             folder and re-bless"
        );
    }
}

#[test]
fn records_of_every_release_still_load() {
    if std::env::var_os("KILN_BLESS").is_some() {
        return; // the other test is rewriting current/
    }
    let mut seen = 0;
    for release in std::fs::read_dir(dir()).unwrap() {
        let release = release.unwrap().path();
        if !release.is_dir() {
            continue;
        }
        let read = |n: &str| std::fs::read(release.join(n)).ok();
        if let (Some(job), Some(spec)) = (read("record.job.msgpack"), read("record.spec.msgpack")) {
            let job = Job::from_records(&job, &spec).unwrap_or_else(|e| {
                panic!("{}: job records no longer load: {e}", release.display())
            });
            assert_eq!(job.spec.prompt(), Some("a kiln at dusk"));
            seen += 1;
        }
        if let Some(w) = read("record.worker.msgpack") {
            let w: FleetRecord = rmp_serde::from_slice(&w)
                .unwrap_or_else(|e| panic!("{}: worker record: {e}", release.display()));
            assert_eq!(w.worker_id, "box1-gpu0");
        }
    }
    assert!(seen >= 1, "no golden job records found");
}
