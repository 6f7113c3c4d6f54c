//! The durable job store: a redb file and its write-ahead log in the broker's state
//! directory.
//!
//! Every job record the core emits is written here before any reply or event that
//! depends on it leaves the broker. The committer groups every batch that is
//! waiting into one commit, so a burst of submits costs one fsync, not one each
//! (group commit). That fsync is the log's ([`crate::wal`]); redb holds the same
//! records as tables to read at start-up, and is synced at checkpoints.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use kiln_protocol::JobId;
use redb::{Database, Durability, ReadableTable, TableDefinition};

use crate::core::{FleetRecord, Job, Record};
use crate::wal::Wal;

/// Log size at which a commit also syncs redb and empties the log. Bounds both
/// the replay at start-up and the data a checkpoint syncs at once.
const CHECKPOINT_BYTES: u64 = 8 << 20;

/// Job state records, rewritten on every transition.
const JOBS: TableDefinition<u64, &[u8]> = TableDefinition::new("jobs");
/// Job specs, written once at submit.
const SPECS: TableDefinition<u64, &[u8]> = TableDefinition::new("specs");
const WORKERS: TableDefinition<&str, &[u8]> = TableDefinition::new("workers");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

/// What can go wrong with the store. The cause is part of each message (not a
/// `source()` too, or error chains would print it twice).
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot create the state directory {path}: {error}")]
    StateDir {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("job store {path}: {error}")]
    Redb { path: PathBuf, error: redb::Error },
    #[error("job store log {path}: {error}")]
    Log {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("job store log {path}: a frame with a valid checksum does not decode ({reason}); the log was written by another version of Kiln or is damaged, and is left as it is")]
    LogCorrupt { path: PathBuf, reason: String },
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
    wal: Wal,
    next_job_id: u64,
    /// The encoded group, reused between commits.
    payload: Vec<u8>,
    /// Records of the log that redb does not have yet: replaying them at open
    /// could not write (a full disk). Reads lay them over redb's; the log keeps
    /// them until [`Store::catch_up`] writes them.
    unapplied: Vec<Record>,
}

impl Store {
    /// Opens (or creates) `<state_dir>/jobs.redb`. redb locks the file, so a second
    /// broker on the same state directory fails here instead of corrupting it.
    pub fn open(state_dir: &Path) -> Result<Store, StoreError> {
        std::fs::create_dir_all(state_dir).map_err(|error| StoreError::StateDir {
            path: state_dir.to_path_buf(),
            error,
        })?;
        let path = state_dir.join("jobs.redb");
        let db = open_or_create(&path).map_err(|error| StoreError::Redb {
            path: path.clone(),
            error,
        })?;
        let wal_path = state_dir.join("jobs.wal");
        let (wal, replay) = Wal::open(&wal_path).map_err(|error| StoreError::Log {
            path: wal_path.clone(),
            error,
        })?;
        let mut store = Store {
            db,
            path,
            wal,
            next_job_id: 1,
            payload: Vec::new(),
            unapplied: Vec::new(),
        };
        store.next_job_id = store.stored_next_job_id()?;
        if replay.frames.is_empty() && replay.torn_bytes == 0 {
            return Ok(store);
        }
        // Commits after the last checkpoint: apply them again (each record is a
        // whole value under its key, so one already in redb is rewritten as it
        // was), sync, and start the log afresh.
        let mut records = Vec::new();
        for frame in &replay.frames {
            decode_group(frame, &mut records).map_err(|reason| StoreError::LogCorrupt {
                path: wal_path.clone(),
                reason,
            })?;
        }
        if let Err(e) = store.apply(records.iter(), Durability::Immediate) {
            // Nothing is lost (the log keeps it): start from redb and the log's
            // records on top, on a fresh handle since redb refuses every call
            // after an I/O error.
            tracing::error!(error = %e, records = records.len(), "cannot replay the job store's log into the store; reading it on top until the store writes again");
            let Store { db, path, wal, .. } = store;
            drop(db);
            let db = open_or_create(&path).map_err(|error| StoreError::Redb {
                path: path.clone(),
                error,
            })?;
            let mut store = Store {
                db,
                path,
                wal,
                next_job_id: 1,
                payload: Vec::new(),
                unapplied: Vec::new(),
            };
            let logged = records.iter().filter_map(|r| match r {
                Record::Spec { id, .. } | Record::Job { id, .. } => Some(id.0 + 1),
                _ => None,
            });
            store.next_job_id = logged.fold(store.stored_next_job_id()?, u64::max);
            store.unapplied = records;
            return Ok(store);
        }
        store.wal.reset().map_err(|e| store.log_err(e))?;
        tracing::info!(
            commits = replay.frames.len(),
            records = records.len(),
            torn_bytes = replay.torn_bytes,
            "replayed the job store's log"
        );
        Ok(store)
    }

    fn stored_next_job_id(&self) -> Result<u64, StoreError> {
        use redb::ReadableDatabase;
        let txn = self.db.begin_read().map_err(|e| self.err(e))?;
        let meta = match txn.open_table(META) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(1),
            Err(e) => return Err(self.err(e)),
        };
        Ok(meta
            .get("next_job_id")
            .map_err(|e| self.err(e))?
            .map_or(1, |v| v.value()))
    }

    fn log_err(&self, error: std::io::Error) -> StoreError {
        StoreError::Log {
            path: self.wal.path().to_path_buf(),
            error,
        }
    }

    fn err(&self, e: impl Into<redb::Error>) -> StoreError {
        StoreError::Redb {
            path: self.path.clone(),
            error: e.into(),
        }
    }

    /// Reads every job and worker record, and the number of this boot (one more
    /// than the last one counted). Writes nothing: [`Store::count_boot`] does, so
    /// a broker on a full disk can start and serve reads.
    pub fn load(&mut self) -> Result<Loaded, StoreError> {
        use redb::ReadableDatabase;
        let txn = self.db.begin_read().map_err(|e| self.err(e))?;
        let prev = match txn.open_table(META) {
            Ok(meta) => meta
                .get("boot")
                .map_err(|e| self.err(e))?
                .map_or(0, |v| v.value()),
            Err(redb::TableError::TableDoesNotExist(_)) => 0,
            Err(e) => return Err(self.err(e)),
        };
        let mut overlay = Overlay::of(&self.unapplied);
        let mut jobs = Vec::new();
        let mut unreadable = Vec::new();
        let mut decode = |id: u64, state: &[u8], spec: Option<&[u8]>| {
            let decoded = match spec {
                Some(spec) => Job::from_records(state, spec).map_err(|e| e.to_string()),
                None => Err("its spec record is missing".to_string()),
            };
            match decoded {
                Ok(job) => jobs.push(job),
                Err(e) => {
                    tracing::error!(job = %JobId(id), error = %e, "cannot decode a stored job record; leaving it in place");
                    unreadable.push(id);
                }
            }
        };
        let table = open_if_there(&txn, JOBS).map_err(|e| self.err(e))?;
        let specs = open_if_there(&txn, SPECS).map_err(|e| self.err(e))?;
        let stored_spec =
            |id: u64| -> Result<Option<redb::AccessGuard<'_, &'static [u8]>>, StoreError> {
                match &specs {
                    Some(t) => t.get(id).map_err(|e| self.err(e)),
                    None => Ok(None),
                }
            };
        if let Some(table) = &table {
            for row in table.iter().map_err(|e| self.err(e))? {
                let (k, v) = row.map_err(|e| self.err(e))?;
                let id = k.value();
                let state = match overlay.states.remove(&id) {
                    Some(None) => continue, // removed since
                    Some(Some(newer)) => newer,
                    None => v.value(),
                };
                let guard = stored_spec(id)?;
                let spec = overlay
                    .specs
                    .get(&id)
                    .copied()
                    .unwrap_or_else(|| guard.as_ref().map(|g| g.value()));
                decode(id, state, spec);
            }
        }
        // Jobs only the log has.
        for (id, state) in std::mem::take(&mut overlay.states) {
            let Some(state) = state else { continue };
            let guard = stored_spec(id)?;
            let spec = overlay
                .specs
                .get(&id)
                .copied()
                .unwrap_or_else(|| guard.as_ref().map(|g| g.value()));
            decode(id, state, spec);
        }
        let fleet = self.load_fleet(&txn, &mut overlay)?;
        // In id order, as redb keeps them (the log's own jobs came last).
        jobs.sort_by_key(|j| j.id.0);
        // `open` read the stored counter and replay raised it; a job above it
        // comes from a store written before the counter existed.
        self.next_job_id = self
            .next_job_id
            .max(jobs.iter().map(|j| j.id.0 + 1).max().unwrap_or(1));
        Ok(Loaded {
            jobs,
            fleet,
            next_job_id: self.next_job_id,
            boot: prev + 1,
            unreadable,
        })
    }

    fn load_fleet(
        &self,
        txn: &redb::ReadTransaction,
        overlay: &mut Overlay<'_>,
    ) -> Result<Vec<FleetRecord>, StoreError> {
        let mut fleet = Vec::new();
        let mut decode = |id: &str, bytes: &[u8]| match rmp_serde::from_slice::<FleetRecord>(bytes)
        {
            Ok(w) => fleet.push(w),
            Err(e) => {
                tracing::warn!(worker = id, error = %e, "skipping an unreadable worker record")
            }
        };
        if let Some(table) = open_if_there(txn, WORKERS).map_err(|e| self.err(e))? {
            for row in table.iter().map_err(|e| self.err(e))? {
                let (k, v) = row.map_err(|e| self.err(e))?;
                match overlay.workers.remove(k.value()) {
                    Some(None) => {}
                    Some(Some(newer)) => decode(k.value(), newer),
                    None => decode(k.value(), v.value()),
                }
            }
        }
        for (id, bytes) in std::mem::take(&mut overlay.workers) {
            if let Some(bytes) = bytes {
                decode(id, bytes);
            }
        }
        Ok(fleet)
    }

    /// Writes the log's records that open could not replay ([`Store::unapplied`])
    /// and empties the log; nothing else may be written before.
    fn catch_up(&mut self) -> Result<(), StoreError> {
        if self.unapplied.is_empty() {
            return Ok(());
        }
        let pending = std::mem::take(&mut self.unapplied);
        if let Err(e) = self.apply(pending.iter(), Durability::Immediate) {
            self.unapplied = pending;
            return Err(e);
        }
        self.wal.reset().map_err(|e| self.log_err(e))?;
        tracing::info!(records = pending.len(), "replayed the job store's log");
        Ok(())
    }

    /// Records that the broker started for the `boot`th time (see
    /// [`Store::load`]), so the next start counts one more.
    pub fn count_boot(&mut self, boot: u64) -> Result<(), StoreError> {
        self.catch_up()?;
        let txn = self.db.begin_write().map_err(|e| self.err(e))?;
        {
            let mut meta = txn.open_table(META).map_err(|e| self.err(e))?;
            let stored = meta
                .get("boot")
                .map_err(|e| self.err(e))?
                .map_or(0, |v| v.value());
            meta.insert("boot", boot.max(stored))
                .map_err(|e| self.err(e))?;
        }
        txn.commit().map_err(|e| self.err(e))
    }

    /// Bytes in the write-ahead log now (it is emptied at each checkpoint).
    pub fn log_bytes(&self) -> u64 {
        self.wal.len()
    }

    /// Makes records durable as one commit: appended to the log and synced, then
    /// applied to redb. Of several state records of one job only the last is
    /// written: a job queued and assigned in the same group costs one write.
    pub fn commit<'a>(
        &mut self,
        records: impl IntoIterator<Item = &'a Record>,
    ) -> Result<(), StoreError> {
        let records: Vec<&Record> = records.into_iter().collect();
        if records.is_empty() {
            return Ok(());
        }
        self.catch_up()?;
        let mut last: HashMap<JobId, usize> = HashMap::new();
        for (i, r) in records.iter().enumerate() {
            if let Record::Job { id, .. } = r {
                last.insert(*id, i);
            }
        }
        let kept: Vec<&Record> = records
            .iter()
            .enumerate()
            .filter(|(i, r)| !matches!(r, Record::Job { id, .. } if last[id] != *i))
            .map(|(_, r)| *r)
            .collect();
        self.payload.clear();
        for r in &kept {
            encode_record(r, &mut self.payload);
        }
        if let Err(e) = self.wal.append(&self.payload) {
            return Err(self.log_err(e));
        }
        let checkpoint = self.wal.len() >= CHECKPOINT_BYTES;
        let durability = if checkpoint {
            Durability::Immediate
        } else {
            // Already durable in the log.
            Durability::None
        };
        self.apply(kept, durability)?;
        if checkpoint {
            self.wal.reset().map_err(|e| self.log_err(e))?;
        }
        Ok(())
    }

    /// Writes records to redb in order, in one transaction.
    fn apply<'a>(
        &mut self,
        records: impl IntoIterator<Item = &'a Record>,
        durability: Durability,
    ) -> Result<(), StoreError> {
        let mut txn = self.db.begin_write().map_err(|e| self.err(e))?;
        txn.set_durability(durability).map_err(|e| self.err(e))?;
        let mut next = self.next_job_id;
        {
            let mut jobs = txn.open_table(JOBS).map_err(|e| self.err(e))?;
            let mut specs = txn.open_table(SPECS).map_err(|e| self.err(e))?;
            let mut workers = txn.open_table(WORKERS).map_err(|e| self.err(e))?;
            for r in records {
                match r {
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

/// Record kinds in a log frame.
const SPEC: u8 = 1;
const JOB: u8 = 2;
const DELETE_JOB: u8 = 3;
const WORKER: u8 = 4;
const DELETE_WORKER: u8 = 5;

/// Appends one record to a log payload: a kind byte, the key (u64 LE, or a
/// length-prefixed string), then for writes the length-prefixed value.
fn encode_record(r: &Record, out: &mut Vec<u8>) {
    fn bytes(out: &mut Vec<u8>, b: &[u8]) {
        out.extend_from_slice(&(b.len() as u32).to_le_bytes());
        out.extend_from_slice(b);
    }
    match r {
        Record::Spec { id, bytes: v } => {
            out.push(SPEC);
            out.extend_from_slice(&id.0.to_le_bytes());
            bytes(out, v);
        }
        Record::Job { id, bytes: v } => {
            out.push(JOB);
            out.extend_from_slice(&id.0.to_le_bytes());
            bytes(out, v);
        }
        Record::DeleteJob(id) => {
            out.push(DELETE_JOB);
            out.extend_from_slice(&id.0.to_le_bytes());
        }
        Record::Worker { id, bytes: v } => {
            out.push(WORKER);
            bytes(out, id.as_bytes());
            bytes(out, v);
        }
        Record::DeleteWorker(id) => {
            out.push(DELETE_WORKER);
            bytes(out, id.as_bytes());
        }
    }
}

/// Reads back every record of one log payload.
fn decode_group(mut b: &[u8], out: &mut Vec<Record>) -> Result<(), String> {
    fn take<'a>(b: &mut &'a [u8], n: usize) -> Result<&'a [u8], String> {
        if b.len() < n {
            return Err(format!("{n} bytes expected, {} left", b.len()));
        }
        let (head, rest) = b.split_at(n);
        *b = rest;
        Ok(head)
    }
    fn id(b: &mut &[u8]) -> Result<JobId, String> {
        Ok(JobId(u64::from_le_bytes(
            take(b, 8)?.try_into().expect("8 bytes"),
        )))
    }
    fn bytes(b: &mut &[u8]) -> Result<Vec<u8>, String> {
        let len = u32::from_le_bytes(take(b, 4)?.try_into().expect("4 bytes"));
        Ok(take(b, len as usize)?.to_vec())
    }
    fn name(b: &mut &[u8]) -> Result<String, String> {
        String::from_utf8(bytes(b)?).map_err(|_| "a worker id is not UTF-8".to_string())
    }
    while let Some((&kind, rest)) = b.split_first() {
        b = rest;
        out.push(match kind {
            SPEC => Record::Spec {
                id: id(&mut b)?,
                bytes: bytes(&mut b)?,
            },
            JOB => Record::Job {
                id: id(&mut b)?,
                bytes: bytes(&mut b)?,
            },
            DELETE_JOB => Record::DeleteJob(id(&mut b)?),
            WORKER => Record::Worker {
                id: name(&mut b)?,
                bytes: bytes(&mut b)?,
            },
            DELETE_WORKER => Record::DeleteWorker(name(&mut b)?),
            other => return Err(format!("unknown record kind {other}")),
        });
    }
    Ok(())
}

/// The log's records that redb lacks, by key, newest last wins: `None` where a
/// record removed the key.
#[derive(Default)]
struct Overlay<'a> {
    states: HashMap<u64, Option<&'a [u8]>>,
    specs: HashMap<u64, Option<&'a [u8]>>,
    workers: HashMap<&'a str, Option<&'a [u8]>>,
}

impl<'a> Overlay<'a> {
    fn of(records: &'a [Record]) -> Overlay<'a> {
        let mut o = Overlay::default();
        for r in records {
            match r {
                Record::Spec { id, bytes } => {
                    o.specs.insert(id.0, Some(bytes));
                }
                Record::Job { id, bytes } => {
                    o.states.insert(id.0, Some(bytes));
                }
                Record::DeleteJob(id) => {
                    o.states.insert(id.0, None);
                    o.specs.insert(id.0, None);
                }
                Record::Worker { id, bytes } => {
                    o.workers.insert(id, Some(bytes));
                }
                Record::DeleteWorker(id) => {
                    o.workers.insert(id, None);
                }
            }
        }
        o
    }
}

/// A table of a read transaction, or `None` before anything was written to it.
fn open_if_there<K: redb::Key + 'static, V: redb::Value + 'static>(
    txn: &redb::ReadTransaction,
    table: TableDefinition<K, V>,
) -> Result<Option<redb::ReadOnlyTable<K, V>>, redb::TableError> {
    match txn.open_table(table) {
        Ok(t) => Ok(Some(t)),
        Err(redb::TableError::TableDoesNotExist(_)) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Opens the database at `path`, creating a new one under another name first
/// and renaming it into place: a creation cut short (a full disk leaves a file
/// of zeros without redb's header) never leaves a file that no later start can
/// open.
fn open_or_create(path: &Path) -> Result<Database, redb::Error> {
    if path.exists() {
        return Ok(Database::create(path)?);
    }
    let fresh = path.with_extension("redb.new");
    let _ = std::fs::remove_file(&fresh);
    let created = Database::create(&fresh).map_err(redb::Error::from);
    let created = created.and_then(|db| {
        drop(db);
        std::fs::rename(&fresh, path)?;
        Ok(Database::create(path)?)
    });
    if created.is_err() {
        let _ = std::fs::remove_file(&fresh);
    }
    created
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_survive_a_reopen_and_boots_are_counted() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(dir.path()).unwrap();
        assert_eq!(store.load().unwrap().boot, 1);
        assert_eq!(store.load().unwrap().boot, 1, "loading counts nothing");
        store.count_boot(1).unwrap();
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

    fn junk_job(id: u64) -> [Record; 2] {
        [
            Record::Spec {
                id: JobId(id),
                bytes: b"not a spec".to_vec(),
            },
            Record::Job {
                id: JobId(id),
                bytes: b"not a job".to_vec(),
            },
        ]
    }

    /// What open leaves when it cannot replay the log (a full disk): reads see
    /// the log's records on top of redb's, and the next write catches up first.
    #[test]
    fn records_open_could_not_replay_are_read_on_top_and_written_first() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(dir.path()).unwrap();
        store
            .commit(junk_job(1).iter().chain(&junk_job(2)))
            .unwrap();
        store.unapplied = junk_job(3)
            .into_iter()
            .chain([Record::DeleteJob(JobId(1))])
            .collect();
        let loaded = store.load().unwrap();
        assert_eq!(loaded.unreadable, [2, 3], "job 1 deleted, job 3 added");

        store.commit(&junk_job(5)).unwrap();
        assert!(store.unapplied.is_empty(), "caught up before the commit");
        drop(store);
        let mut store = Store::open(dir.path()).unwrap();
        assert_eq!(store.load().unwrap().unreadable, [2, 3, 5]);
    }

    #[test]
    fn a_killed_broker_keeps_every_commit_of_its_log() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(dir.path()).unwrap();
        store.load().unwrap();
        store.commit(&junk_job(3)).unwrap();
        store.commit(&junk_job(4)).unwrap();
        store.commit(&[Record::DeleteJob(JobId(3))]).unwrap();
        assert!(
            !store.wal.is_empty(),
            "no checkpoint yet: the log holds the commits"
        );
        // What `kill -9` leaves: the files as they are, the process gone.
        let crashed = tempfile::tempdir().unwrap();
        for f in ["jobs.redb", "jobs.wal"] {
            std::fs::copy(dir.path().join(f), crashed.path().join(f)).unwrap();
        }
        let mut store = Store::open(crashed.path()).unwrap();
        assert!(store.wal.is_empty(), "replayed, synced and emptied");
        let loaded = store.load().unwrap();
        assert_eq!(loaded.unreadable, [4], "job 4 is there, job 3 deleted");
        assert_eq!(loaded.next_job_id, 5);
    }

    #[test]
    fn a_commit_only_in_the_log_is_replayed_and_a_torn_one_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(dir.path()).unwrap();
        store.load().unwrap();
        store.commit(&junk_job(1)).unwrap();
        drop(store);
        // Two more commits that reached the log but never redb; the second torn.
        let (mut wal, _) = Wal::open(&dir.path().join("jobs.wal")).unwrap();
        let mut payload = Vec::new();
        junk_job(2)
            .iter()
            .for_each(|r| encode_record(r, &mut payload));
        wal.append(&payload).unwrap();
        payload.clear();
        junk_job(3)
            .iter()
            .for_each(|r| encode_record(r, &mut payload));
        wal.append(&payload).unwrap();
        let torn = wal.len() - 5;
        drop(wal);
        std::fs::OpenOptions::new()
            .write(true)
            .open(dir.path().join("jobs.wal"))
            .unwrap()
            .set_len(torn)
            .unwrap();
        let mut store = Store::open(dir.path()).unwrap();
        let loaded = store.load().unwrap();
        assert_eq!(loaded.unreadable, [1, 2]);
        assert_eq!(loaded.next_job_id, 3);
    }

    #[test]
    fn a_big_log_is_checkpointed_into_redb_and_emptied() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(dir.path()).unwrap();
        store.load().unwrap();
        let big = vec![7u8; 1 << 20];
        let mut emptied = false;
        for id in 1..=10 {
            store
                .commit(&[Record::Job {
                    id: JobId(id),
                    bytes: big.clone(),
                }])
                .unwrap();
            emptied |= store.wal.is_empty();
            assert!(store.wal.len() < CHECKPOINT_BYTES);
        }
        assert!(emptied, "10 MiB of commits passed a checkpoint");
        drop(store);
        let mut store = Store::open(dir.path()).unwrap();
        // No specs were written, so every job reads back as unreadable: all there.
        assert_eq!(
            store.load().unwrap().unreadable,
            (1..=10).collect::<Vec<_>>()
        );
    }

    #[test]
    fn a_log_frame_that_does_not_decode_stops_the_start_with_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        drop(Store::open(dir.path()).unwrap());
        let (mut wal, _) = Wal::open(&dir.path().join("jobs.wal")).unwrap();
        wal.append(&[42, 0, 0]).unwrap();
        drop(wal);
        let err = Store::open(dir.path()).err().expect("refused");
        assert!(
            matches!(&err, StoreError::LogCorrupt { reason, .. } if reason.contains("unknown record kind 42")),
            "{err}"
        );
    }

    #[test]
    fn a_second_broker_cannot_open_the_same_store() {
        let dir = tempfile::tempdir().unwrap();
        let _first = Store::open(dir.path()).unwrap();
        assert!(Store::open(dir.path()).is_err());
    }
}
