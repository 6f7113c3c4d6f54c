//! The committer thread: makes each router pass's records durable, then lets its
//! replies, worker messages and events out, and rides out a store that cannot write.
//!
//! Every batch waiting is grouped into one store commit (one fsync for a burst of
//! submits). What a batch says to the world (`accepted`, a result's ack, a state
//! event) goes out only after its records are on disk, so nothing a peer hears about
//! can be lost by a crash.
//!
//! **A store that cannot write** (a full disk, an I/O error) does not stop the broker.
//! The failed group and every batch with records after it are held, in order, with
//! their outputs; the router hears [`Input::StoreFault`] with the cause and refuses
//! new writes (`unavailable`, naming the cause) while reads keep being answered:
//! batches without records go out at once. The committer retries by reopening the
//! store (which replays its log, see [`Store::open`]) and committing what it holds;
//! the first success releases the held outputs in order and clears the fault. A
//! retry blocks this thread (and so every output) while it runs, so it is tried only
//! when the file system reports room for what is held, and at most every [`RETRY`],
//! doubling to [`RETRY_MAX`] while attempts keep failing.

use std::path::PathBuf;
use std::time::Duration;

use tokio::runtime::Handle;
use tokio::sync::mpsc;

use crate::core::{Input, Output, Record};
use crate::store::Store;

/// How often a store that failed is tried again, at first.
pub const RETRY: Duration = Duration::from_secs(1);
/// The longest wait between two retries that fail although there seemed to be room.
pub const RETRY_MAX: Duration = Duration::from_secs(30);

/// Outputs of one router pass: records to commit, then what may follow the commit.
#[derive(Default)]
pub struct Batch {
    pub records: Vec<Record>,
    pub after: Vec<Output>,
}

/// Where the committer's durable store lives, when there is one.
pub struct Durable {
    /// `None` when the store could not write at start ([`Durable::unsaved`]).
    pub store: Option<Store>,
    /// Reopened from here after a failure.
    pub state_dir: PathBuf,
    pub unsaved: Option<Unsaved>,
}

/// What the broker could not write at start (a full disk): the committer begins
/// in a fault, holding these until the store writes again.
pub struct Unsaved {
    pub cause: String,
    /// This start's number, for [`Store::count_boot`].
    pub boot: u64,
    /// The records recovery produced.
    pub records: Vec<Record>,
}

/// Runs on its own thread until `batches` closes and everything held is committed
/// or the channel closes during a fault (then held outputs are dropped: none of
/// them was promised to anyone).
///
/// `dispatch` sends one output; `faults` carries [`Input::StoreFault`] to the router;
/// `committed` hears how long each successful store commit took and the log's size
/// after it (the metrics).
pub fn run(
    mut durable: Option<Durable>,
    mut batches: mpsc::Receiver<Batch>,
    mut dispatch: impl FnMut(Output),
    faults: mpsc::UnboundedSender<Input>,
    rt: Handle,
    mut committed: impl FnMut(Duration, u64),
) {
    // Batches whose records are not yet durable, oldest first.
    let mut held: Vec<Batch> = Vec::new();
    let mut fault: Option<String> = None;
    let mut retry_every = RETRY;
    let state_dir = durable.as_ref().map(|d| d.state_dir.clone());
    let (mut store, unsaved) = durable
        .take()
        .map_or((None, None), |d| (d.store, d.unsaved));
    // A start that could not write: its boot and records wait like a failed group.
    let mut boot_unsaved = None;
    if let Some(u) = unsaved {
        fault = Some(u.cause);
        boot_unsaved = Some(u.boot);
        held.push(Batch {
            records: u.records,
            after: Vec::new(),
        });
    }
    loop {
        if fault.is_none() {
            let Some(first) = batches.blocking_recv() else {
                return;
            };
            held.push(first);
            while let Ok(b) = batches.try_recv() {
                held.push(b);
            }
        } else {
            // Keep taking batches (the router must never wait on us), letting those
            // without records through, until it is time to retry.
            let deadline = std::time::Instant::now() + retry_every;
            loop {
                // Timers need the runtime's context: build the timeout inside it.
                let next = rt.block_on(async {
                    tokio::time::timeout_at(deadline.into(), batches.recv()).await
                });
                match next {
                    Ok(Some(b)) if b.records.is_empty() => {
                        b.after.into_iter().for_each(&mut dispatch)
                    }
                    Ok(Some(b)) => held.push(b),
                    Ok(None) => return,
                    Err(_) => break,
                }
            }
            let held_bytes: u64 = held.iter().flat_map(|b| &b.records).map(record_bytes).sum();
            if let Some(dir) = &state_dir {
                if !has_room(dir, 2 * held_bytes + (1 << 20)) {
                    // Still full: not worth a reopen that would stall every output.
                    continue;
                }
            }
        }
        let started = std::time::Instant::now();
        let result = match (&mut store, &state_dir) {
            (None, None) => Ok(()),
            (Some(s), _) => s.commit(held.iter().flat_map(|b| b.records.iter())),
            (None, Some(dir)) => Store::open(dir).and_then(|mut s| {
                let r = boot_unsaved
                    .map_or(Ok(()), |boot| s.count_boot(boot))
                    .and_then(|()| s.commit(held.iter().flat_map(|b| b.records.iter())));
                store = Some(s);
                r
            }),
        };
        match result {
            Ok(()) => {
                boot_unsaved = None;
                if let Some(s) = &store {
                    committed(started.elapsed(), s.log_bytes());
                }
                retry_every = RETRY;
                if let Some(cause) = fault.take() {
                    tracing::info!(
                        batches = held.len(),
                        was = %cause,
                        "the job store writes again; held replies and events released"
                    );
                    let _ = faults.send(Input::StoreFault { cause: None });
                }
                for batch in held.drain(..) {
                    batch.after.into_iter().for_each(&mut dispatch);
                }
            }
            Err(e) => {
                let cause = e.to_string();
                if fault.as_deref() != Some(cause.as_str()) {
                    tracing::error!(error = %cause, held = held.len(), "job store commit failed; writes are refused until it works again");
                    let _ = faults.send(Input::StoreFault {
                        cause: Some(cause.clone()),
                    });
                }
                if fault.is_some() {
                    retry_every = (retry_every * 2).min(RETRY_MAX);
                }
                fault = Some(cause);
                // Reopen next time: redb refuses every call after an I/O error, and
                // the reopen replays whatever the log kept. The lock goes with it.
                store = None;
            }
        }
    }
}

/// Roughly how many bytes a record takes in the log.
fn record_bytes(r: &Record) -> u64 {
    16 + match r {
        Record::Spec { bytes, .. } | Record::Job { bytes, .. } | Record::Worker { bytes, .. } => {
            bytes.len() as u64
        }
        Record::DeleteJob(_) | Record::DeleteWorker(_) => 0,
    }
}

/// Whether the file system holding `dir` has `bytes` free for this process
/// (`statvfs`'s `f_bavail`). When it cannot tell, it says yes and lets a retry find out.
fn has_room(dir: &std::path::Path, bytes: u64) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let Ok(path) = std::ffi::CString::new(dir.as_os_str().as_bytes()) else {
        return true;
    };
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `path` is a valid NUL-terminated string and `st` a valid out-pointer.
    if unsafe { libc::statvfs(path.as_ptr(), &mut st) } != 0 {
        return true;
    }
    (st.f_bavail as u64).saturating_mul(st.f_frsize as u64) >= bytes
}
