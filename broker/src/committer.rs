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
//! batches without records go out at once. Every [`RETRY`] the committer reopens the
//! store (which replays its log, see [`Store::open`]) and commits what it holds; the
//! first success releases the held outputs in order and clears the fault.

use std::path::PathBuf;
use std::time::Duration;

use tokio::runtime::Handle;
use tokio::sync::mpsc;

use crate::core::{Input, Output, Record};
use crate::store::Store;

/// How often a store that failed is tried again.
pub const RETRY: Duration = Duration::from_secs(1);

/// Outputs of one router pass: records to commit, then what may follow the commit.
#[derive(Default)]
pub struct Batch {
    pub records: Vec<Record>,
    pub after: Vec<Output>,
}

/// Where the committer's durable store lives, when there is one.
pub struct Durable {
    pub store: Store,
    /// Reopened from here after a failure.
    pub state_dir: PathBuf,
}

/// Runs on its own thread until `batches` closes and everything held is committed
/// or the channel closes during a fault (then held outputs are dropped: none of
/// them was promised to anyone).
///
/// `dispatch` sends one output; `faults` carries [`Input::StoreFault`] to the router.
pub fn run(
    mut durable: Option<Durable>,
    mut batches: mpsc::Receiver<Batch>,
    mut dispatch: impl FnMut(Output),
    faults: mpsc::UnboundedSender<Input>,
    rt: Handle,
) {
    // Batches whose records are not yet durable, oldest first.
    let mut held: Vec<Batch> = Vec::new();
    let mut fault: Option<String> = None;
    let state_dir = durable.as_ref().map(|d| d.state_dir.clone());
    let mut store = durable.take().map(|d| d.store);
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
            let deadline = std::time::Instant::now() + RETRY;
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
        }
        let result = match (&mut store, &state_dir) {
            (None, None) => Ok(()),
            (Some(s), _) => s.commit(held.iter().flat_map(|b| b.records.iter())),
            (None, Some(dir)) => Store::open(dir).and_then(|mut s| {
                let r = s.commit(held.iter().flat_map(|b| b.records.iter()));
                store = Some(s);
                r
            }),
        };
        match result {
            Ok(()) => {
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
                fault = Some(cause);
                // Reopen next time: redb refuses every call after an I/O error, and
                // the reopen replays whatever the log kept. The lock goes with it.
                store = None;
            }
        }
    }
}
