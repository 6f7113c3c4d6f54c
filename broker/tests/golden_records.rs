//! Golden msgpack fixtures of the broker's stored records (a job's spec and state
//! records, a worker's fleet record), beside the message fixtures in
//! tests/fixtures/golden/. A broker must read the records every earlier release
//! wrote (an upgrade) and, for a rollback, the records of the release after it
//! (which may carry fields it does not know); see docs/protocol.md, "Compatibility".
//!
//! The records are made by driving the real core with a fixed clock, so they are
//! byte-for-byte reproducible. `KILN_BLESS=1` rewrites `current/`.
//!
//! The job state record has two encodings (broker/src/core/record.rs): `current/`
//! holds the positional one (version 2) written now, and `0.1.0-dc6b6c9/` the named
//! map (version 1) that every release before it wrote, for the same job.

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
    records_with(false)
}

/// [`records`], with the state record in the named encoding when `named`.
fn records_with(named: bool) -> Vec<(&'static str, Vec<u8>)> {
    let cfg = CoreConfig {
        persist: true,
        named_records: named,
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
                client: None,
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

/// The same job stored by the release before the positional encoding (named,
/// version 1) and by this one (positional, version 2) loads as the same job, and
/// this version writes it back positionally, byte for byte.
#[test]
fn the_named_and_the_positional_record_of_one_job_load_alike() {
    if std::env::var_os("KILN_BLESS").is_some() {
        return;
    }
    let read = |release: &str, n: &str| std::fs::read(dir().join(release).join(n)).unwrap();
    let spec = read("current", "record.spec.msgpack");
    let named = read("0.1.0-dc6b6c9", "record.job.msgpack");
    let positional = read("current", "record.job.msgpack");
    assert_eq!(named[0], 0xde, "the old record is a msgpack map16");
    assert_eq!(
        positional[..4],
        [0xdc, 0, 25, 2],
        "the new record is a msgpack array of 25 values, version 2 first"
    );
    assert!(
        positional.len() * 2 < named.len(),
        "{} bytes positional, {} named",
        positional.len(),
        named.len()
    );
    let old = Job::from_records(&named, &spec).unwrap();
    let new = Job::from_records(&positional, &spec).unwrap();
    // Every stored field, compared through the named encoding of the whole job.
    assert_eq!(old.named_state_record(), new.named_state_record());
    assert_eq!(old.named_state_record(), named);
    assert_eq!(new.history.len(), 2);
    assert_eq!(new.worker.as_deref(), Some("box1-gpu0"));
    assert_eq!(old.state_record(), positional);
    assert_eq!(new.state_record(), positional);
}

/// `broker.named_state_records` (for a rollback to a release before the
/// positional encoding) makes the core write exactly what those releases wrote.
#[test]
fn a_core_told_to_write_named_records_writes_the_old_release_bytes() {
    if std::env::var_os("KILN_BLESS").is_some() {
        return;
    }
    let named = records_with(true);
    let (_, job) = named
        .iter()
        .find(|(n, _)| *n == "record.job.msgpack")
        .unwrap();
    let old = std::fs::read(dir().join("0.1.0-dc6b6c9/record.job.msgpack")).unwrap();
    assert!(
        *job == old,
        "the named record is the old release's, byte for byte"
    );
}

/// The job store's log (frames of broker/src/wal.rs holding record groups of
/// broker/src/store.rs) as this version writes it, with the golden records in it:
/// a later broker must replay a log that a crash of this one left behind, so the
/// bytes are kept (`current/store.jobs.wal`) and a store holding only that log
/// must load the job and the worker from it.
#[test]
fn the_store_log_matches_its_golden_file_and_replays() {
    use kiln_broker::store::Store;
    let recs = records();
    let get = |name: &str| {
        recs.iter()
            .find(|(n, _)| *n == name)
            .map(|(_, b)| b.clone())
            .expect("a golden record")
    };
    let groups = [
        vec![
            Record::Spec {
                id: JobId(1),
                bytes: get("record.spec.msgpack"),
            },
            Record::Job {
                id: JobId(1),
                bytes: get("record.job.msgpack"),
            },
            Record::Worker {
                id: "box1-gpu0".into(),
                bytes: get("record.worker.msgpack"),
            },
        ],
        vec![
            Record::DeleteJob(JobId(9)),
            Record::DeleteWorker("gone".into()),
        ],
    ];
    let written = tempfile::tempdir().unwrap();
    let mut store = Store::open(written.path()).unwrap();
    for group in &groups {
        store.commit(group).unwrap();
    }
    drop(store);
    let log = std::fs::read(written.path().join("jobs.wal")).unwrap();
    let golden = dir().join("current/store.jobs.wal");
    if std::env::var_os("KILN_BLESS").is_some() {
        std::fs::write(&golden, &log).unwrap();
        return;
    }
    let stored = std::fs::read(&golden).expect("bless with KILN_BLESS=1");
    assert!(
        stored == log,
        "the store's log encoding changed; keep the old file in a release folder and re-bless"
    );

    for release in std::fs::read_dir(dir()).unwrap() {
        let release = release.unwrap().path();
        let Ok(log) = std::fs::read(release.join("store.jobs.wal")) else {
            continue;
        };
        let replayed = tempfile::tempdir().unwrap();
        std::fs::write(replayed.path().join("jobs.wal"), log).unwrap();
        let mut store = Store::open(replayed.path())
            .unwrap_or_else(|e| panic!("{}: the log does not replay: {e}", release.display()));
        let loaded = store.load().unwrap();
        assert_eq!(loaded.jobs.len(), 1, "{}", release.display());
        assert_eq!(loaded.jobs[0].id, JobId(1));
        assert_eq!(loaded.jobs[0].spec.prompt(), Some("a kiln at dusk"));
        assert_eq!(loaded.next_job_id, 2, "ids after the logged job");
        let workers: Vec<&str> = loaded.fleet.iter().map(|w| w.worker_id.as_str()).collect();
        assert_eq!(workers, ["box1-gpu0"]);
        assert!(loaded.unreadable.is_empty());
    }
}
