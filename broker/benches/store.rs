//! The job store alone: what one durable commit costs, beside a bare fsync and
//! beside a synced redb commit (what the write-ahead log saves).
//!
//!     cargo bench -p kiln-broker --bench store
//!     KILN_BENCH_COMMITS=500 cargo bench -p kiln-broker --bench store   (quicker)

mod common;

use std::time::{Duration, Instant};

use common::percentile;

use kiln_broker::core::Record;
use kiln_broker::store::Store;
use kiln_protocol::JobId;
use redb::{Database, Durability, TableDefinition};

/// Sizes of a typical submit: the spec record and the first state record.
const SPEC_BYTES: usize = 1_500;
const STATE_BYTES: usize = 300;

fn figures(name: &str, mut lat: Vec<Duration>, per_commit: usize) {
    lat.sort();
    let total: Duration = lat.iter().sum();
    let at = |p: f64| percentile(&lat, p).as_secs_f64() * 1e6;
    println!(
        "{name:<48} p50 {:>8.1} µs   p99 {:>8.1} µs   {:>8.0} jobs/s",
        at(0.5),
        at(0.99),
        (lat.len() * per_commit) as f64 / total.as_secs_f64()
    );
}

fn submit(id: u64) -> [Record; 2] {
    [
        Record::Spec {
            id: JobId(id),
            bytes: vec![1; SPEC_BYTES],
        },
        Record::Job {
            id: JobId(id),
            bytes: vec![2; STATE_BYTES],
        },
    ]
}

fn main() {
    let commits: usize = std::env::var("KILN_BENCH_COMMITS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3_000);
    println!("one commit at a time; {commits} commits each");

    figures(
        "append 128 B + fdatasync (baseline)",
        common::fsync_latencies(commits),
        1,
    );

    let dir = tempfile::tempdir().unwrap();
    let mut store = Store::open(dir.path()).unwrap();
    store.load().unwrap();
    let lat = (1..=commits as u64)
        .map(|id| {
            let records = submit(id);
            let t = Instant::now();
            store.commit(&records).unwrap();
            t.elapsed()
        })
        .collect();
    figures("store: a submit (spec + state)", lat, 1);
    let lat = (1..=commits as u64)
        .map(|id| {
            let record = Record::Job {
                id: JobId(id),
                bytes: vec![3; STATE_BYTES],
            };
            let t = Instant::now();
            store.commit([&record]).unwrap();
            t.elapsed()
        })
        .collect();
    figures("store: a transition (state)", lat, 1);
    let mut next = commits as u64 + 1;
    let lat = (0..commits / 10)
        .map(|_| {
            let records: Vec<Record> = (0..100).flat_map(|i| submit(next + i)).collect();
            next += 100;
            let t = Instant::now();
            store.commit(&records).unwrap();
            t.elapsed()
        })
        .collect();
    figures("store: group commit of 100 submits", lat, 100);

    // The same submit as one synced redb transaction, without the log.
    const SPECS: TableDefinition<u64, &[u8]> = TableDefinition::new("specs");
    const JOBS: TableDefinition<u64, &[u8]> = TableDefinition::new("jobs");
    let dir = tempfile::tempdir().unwrap();
    let db = Database::create(dir.path().join("plain.redb")).unwrap();
    let (spec, state) = (vec![1u8; SPEC_BYTES], vec![2u8; STATE_BYTES]);
    let lat = (1..=commits as u64)
        .map(|id| {
            let t = Instant::now();
            let mut txn = db.begin_write().unwrap();
            txn.set_durability(Durability::Immediate).unwrap();
            {
                txn.open_table(SPECS)
                    .unwrap()
                    .insert(id, spec.as_slice())
                    .unwrap();
                txn.open_table(JOBS)
                    .unwrap()
                    .insert(id, state.as_slice())
                    .unwrap();
            }
            txn.commit().unwrap();
            t.elapsed()
        })
        .collect();
    figures("redb alone, synced commit of a submit", lat, 1);
}
