//! The durable job store: one redb file in the broker's state directory.
//!
//! Every job record the core emits is written here before any reply or event that
//! depends on it leaves the broker. The committer groups every batch that is
//! waiting into one transaction, so a burst of submits costs one fsync, not one
//! each (group commit).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use kiln_protocol::JobId;
use redb::{Database, ReadableTable, TableDefinition};

use crate::core::{FleetRecord, Job, Record};

/// Job state records, rewritten on every transition.
const JOBS: TableDefinition<u64, &[u8]> = TableDefinition::new("jobs");
/// Job specs, written once at submit.
const SPECS: TableDefinition<u64, &[u8]> = TableDefinition::new("specs");
const WORKERS: TableDefinition<&str, &[u8]> = TableDefinition::new("workers");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

/// What can go wrong with the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot create the state directory {path}: {source}")]
    StateDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("job store {path}: {source}")]
    Redb { path: PathBuf, source: redb::Error },
}

/// Everything read back at start-up.
pub struct Loaded {
    pub jobs: Vec<Job>,
    pub fleet: Vec<FleetRecord>,
    pub next_job_id: u64,
    /// How many times the broker has started on this store, this start included.
    pub boot: u64,
    /// Records that could not be decoded; left in place, reported in the log.
    pub unreadable: Vec<u64>,
}

pub struct Store {
    db: Database,
    path: PathBuf,
    next_job_id: u64,
}

impl Store {
    /// Opens (or creates) `<state_dir>/jobs.redb`. redb locks the file, so a second
    /// broker on the same state directory fails here instead of corrupting it.
    pub fn open(state_dir: &Path) -> Result<Store, StoreError> {
        std::fs::create_dir_all(state_dir).map_err(|source| StoreError::StateDir {
            path: state_dir.to_path_buf(),
            source,
        })?;
        let path = state_dir.join("jobs.redb");
        let db = Database::create(&path).map_err(|e| StoreError::Redb {
            path: path.clone(),
            source: e.into(),
        })?;
        Ok(Store {
            db,
            path,
            next_job_id: 1,
        })
    }

    fn err(&self, e: impl Into<redb::Error>) -> StoreError {
        StoreError::Redb {
            path: self.path.clone(),
            source: e.into(),
        }
    }

    /// Reads every job and worker record and counts this boot.
    pub fn load(&mut self) -> Result<Loaded, StoreError> {
        let txn = self.db.begin_write().map_err(|e| self.err(e))?;
        let mut jobs = Vec::new();
        let mut fleet = Vec::new();
        let mut unreadable = Vec::new();
        let (boot, next_job_id);
        {
            let mut meta = txn.open_table(META).map_err(|e| self.err(e))?;
            let prev = meta
                .get("boot")
                .map_err(|e| self.err(e))?
                .map_or(0, |v| v.value());
            boot = prev + 1;
            meta.insert("boot", boot).map_err(|e| self.err(e))?;
            next_job_id = meta
                .get("next_job_id")
                .map_err(|e| self.err(e))?
                .map_or(1, |v| v.value());
            let table = txn.open_table(JOBS).map_err(|e| self.err(e))?;
            let specs = txn.open_table(SPECS).map_err(|e| self.err(e))?;
            for row in table.iter().map_err(|e| self.err(e))? {
                let (k, v) = row.map_err(|e| self.err(e))?;
                let spec = specs.get(k.value()).map_err(|e| self.err(e))?;
                let decoded = match &spec {
                    Some(spec) => {
                        Job::from_records(v.value(), spec.value()).map_err(|e| e.to_string())
                    }
                    None => Err("its spec record is missing".to_string()),
                };
                match decoded {
                    Ok(job) => jobs.push(job),
                    Err(e) => {
                        tracing::error!(job = %JobId(k.value()), error = %e, "cannot decode a stored job record; leaving it in place");
                        unreadable.push(k.value());
                    }
                }
            }
            let table = txn.open_table(WORKERS).map_err(|e| self.err(e))?;
            for row in table.iter().map_err(|e| self.err(e))? {
                let (k, v) = row.map_err(|e| self.err(e))?;
                match rmp_serde::from_slice::<FleetRecord>(v.value()) {
                    Ok(w) => fleet.push(w),
                    Err(e) => {
                        tracing::warn!(worker = k.value(), error = %e, "skipping an unreadable worker record")
                    }
                }
            }
        }
        txn.commit().map_err(|e| self.err(e))?;
        self.next_job_id = next_job_id.max(jobs.iter().map(|j| j.id.0 + 1).max().unwrap_or(1));
        Ok(Loaded {
            jobs,
            fleet,
            next_job_id: self.next_job_id,
            boot,
            unreadable,
        })
    }

    /// Writes records in one durable transaction (fsync before returning). Of
    /// several state records of one job only the last is written: a job queued and
    /// assigned in the same group costs one write.
    pub fn commit<'a>(
        &mut self,
        records: impl IntoIterator<Item = &'a Record>,
    ) -> Result<(), StoreError> {
        let records: Vec<&Record> = records.into_iter().collect();
        if records.is_empty() {
            return Ok(());
        }
        let mut last: HashMap<JobId, usize> = HashMap::new();
        for (i, r) in records.iter().enumerate() {
            if let Record::Job { id, .. } = r {
                last.insert(*id, i);
            }
        }
        let txn = self.db.begin_write().map_err(|e| self.err(e))?;
        let mut next = self.next_job_id;
        {
            let mut jobs = txn.open_table(JOBS).map_err(|e| self.err(e))?;
            let mut specs = txn.open_table(SPECS).map_err(|e| self.err(e))?;
            let mut workers = txn.open_table(WORKERS).map_err(|e| self.err(e))?;
            for (i, r) in records.into_iter().enumerate() {
                match r {
                    Record::Job { id, .. } if last[id] != i => {}
                    Record::Spec { id, bytes } => {
                        specs
                            .insert(id.0, bytes.as_slice())
                            .map_err(|e| self.err(e))?;
                        next = next.max(id.0 + 1);
                    }
                    Record::Job { id, bytes } => {
                        jobs.insert(id.0, bytes.as_slice())
                            .map_err(|e| self.err(e))?;
                        next = next.max(id.0 + 1);
                    }
                    Record::DeleteJob(id) => {
                        jobs.remove(id.0).map_err(|e| self.err(e))?;
                        specs.remove(id.0).map_err(|e| self.err(e))?;
                    }
                    Record::Worker { id, bytes } => {
                        workers
                            .insert(id.as_str(), bytes.as_slice())
                            .map_err(|e| self.err(e))?;
                    }
                    Record::DeleteWorker(id) => {
                        workers.remove(id.as_str()).map_err(|e| self.err(e))?;
                    }
                }
            }
            if next != self.next_job_id {
                let mut meta = txn.open_table(META).map_err(|e| self.err(e))?;
                meta.insert("next_job_id", next).map_err(|e| self.err(e))?;
            }
        }
        txn.commit().map_err(|e| self.err(e))?;
        self.next_job_id = next;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_survive_a_reopen_and_boots_are_counted() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(dir.path()).unwrap();
        assert_eq!(store.load().unwrap().boot, 1);
        store
            .commit(&[
                Record::Job {
                    id: JobId(7),
                    bytes: b"not a job".to_vec(),
                },
                Record::Worker {
                    id: "w1".into(),
                    bytes: b"junk".to_vec(),
                },
            ])
            .unwrap();
        drop(store);
        let mut store = Store::open(dir.path()).unwrap();
        let loaded = store.load().unwrap();
        assert_eq!(loaded.boot, 2);
        assert_eq!(loaded.next_job_id, 8, "ids are never reused");
        assert_eq!(
            loaded.unreadable,
            [7],
            "undecodable records are reported, not dropped"
        );
        store.commit(&[Record::DeleteJob(JobId(7))]).unwrap();
        let loaded = store.load().unwrap();
        assert!(loaded.unreadable.is_empty());
        assert_eq!(
            loaded.next_job_id, 8,
            "deleting the newest job does not reuse its id"
        );
    }

    #[test]
    fn only_the_last_state_of_a_job_in_a_group_is_written() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(dir.path()).unwrap();
        store.load().unwrap();
        let spec = kiln_protocol::JobSpec::new(
            kiln_protocol::Backend::Sim,
            kiln_protocol::Task::TextToImage,
        );
        let spec = rmp_serde::to_vec_named(&spec).unwrap();
        let state = |s: &str| {
            let mut v = rmp_serde::to_vec_named(&serde_json::json!({"marker": s})).unwrap();
            v.shrink_to_fit();
            v
        };
        store
            .commit(&[
                Record::Spec {
                    id: JobId(1),
                    bytes: spec,
                },
                Record::Job {
                    id: JobId(1),
                    bytes: state("queued"),
                },
                Record::Job {
                    id: JobId(1),
                    bytes: state("running"),
                },
            ])
            .unwrap();
        let txn = store.db.begin_write().unwrap();
        let jobs = txn.open_table(JOBS).unwrap();
        let stored = jobs.get(1).unwrap().unwrap().value().to_vec();
        assert_eq!(stored, state("running"));
    }

    #[test]
    fn a_second_broker_cannot_open_the_same_store() {
        let dir = tempfile::tempdir().unwrap();
        let _first = Store::open(dir.path()).unwrap();
        assert!(Store::open(dir.path()).is_err());
    }
}
