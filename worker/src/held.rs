//! Attempts a worker holds while another runs (pipelined dispatch), and their
//! staging on the generator.
//!
//! The broker may give a busy worker its next attempt to hold (`Assign.hold`).
//! Holding alone removes the broker round trip between two jobs; for a backend
//! that stages ahead ([`Backend::stages_ahead`], ComfyUI) the held attempt is
//! also handed to the generator's own queue once the attempt before it is
//! there, so the generator goes from one job to the next with no request in
//! between. Staging runs in its own task, in the order the attempts were held;
//! the attempt starts ([`Backend::run`]) only after its staging ended, and an
//! attempt taken back (cancelled, or reclaimed by the broker for another
//! worker) is unstaged, so the generator never runs what nobody will collect.

use std::sync::Arc;

use kiln_protocol::worker::Assign;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::backend::{Backend, JobRun};

/// One held attempt.
pub struct Held {
    pub assign: Assign,
    run: JobRun,
    backend: Option<Arc<dyn Backend>>,
    /// Fires when the attempt is taken back while staging.
    cancel: CancellationToken,
    /// Fires once staging ended (the generator has it, or staging failed or was
    /// stopped): the attempt held after this one stages then.
    staged: CancellationToken,
    /// The staging task, for a backend that stages ahead.
    staging: Option<JoinHandle<()>>,
}

impl Held {
    /// Holds `assign` (to run as `run` on `backend`, if the worker has it); it is
    /// staged once `after` fires (the attempt before it is in the generator's
    /// queue, or over).
    pub fn new(
        assign: Assign,
        run: JobRun,
        backend: Option<Arc<dyn Backend>>,
        after: CancellationToken,
    ) -> Held {
        let cancel = CancellationToken::new();
        let staged = CancellationToken::new();
        let staging = backend.as_ref().filter(|b| b.stages_ahead()).map(|b| {
            let (b, run, cancel, staged) = (b.clone(), run.clone(), cancel.clone(), staged.clone());
            tokio::spawn(async move {
                tokio::select! {
                    _ = after.cancelled() => b.stage(&run, cancel).await,
                    _ = cancel.cancelled() => {}
                }
                staged.cancel();
            })
        });
        if staging.is_none() {
            staged.cancel();
        }
        Held {
            assign,
            run,
            backend,
            cancel,
            staged,
            staging,
        }
    }

    /// Fires once this attempt's staging has ended.
    pub fn staged(&self) -> CancellationToken {
        self.staged.clone()
    }

    /// The GPU is free: the assignment, and the staging to wait for before the
    /// attempt runs.
    pub fn start(self) -> (Assign, Option<JoinHandle<()>>) {
        (self.assign, self.staging)
    }

    /// Takes the attempt back: stops its staging and has the generator drop
    /// what was staged. Returns once the generator confirmed (or its backend's
    /// cancel time-out passed).
    pub async fn release(self) {
        self.cancel.cancel();
        self.staged.cancel();
        if let Some(staging) = self.staging {
            let _ = staging.await;
            if let Some(backend) = self.backend {
                backend.unstage(&self.run).await;
            }
        }
    }
}
