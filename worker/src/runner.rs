//! The worker's life: register with the broker, beat, run one job at a time,
//! stream its progress and outputs back, and survive the broker going away.
//!
//! The connection follows the Paranoid Pirate pattern. Any sign that the broker is
//! gone (the socket monitor reports a disconnect, or no message for `liveness`
//! heartbeats) drops the DEALER, and a fresh one with the same identity registers
//! again after a backoff of 1 s doubling to 32 s. A job keeps running across
//! reconnects; its result is kept until the broker acknowledges it and is sent
//! again after every re-registration.

use std::collections::VecDeque;
use std::panic::AssertUnwindSafe;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::FutureExt;
use kiln_protocol::client::hex;
use kiln_protocol::frame;
use kiln_protocol::job::safe_file_name;
use kiln_protocol::transport::{
    Backoff, ConnectOptions, CurveClient, Dealer, Incoming, TransportKind,
};
use kiln_protocol::worker::*;
use kiln_protocol::{ErrorCode, FailureKind, JobError, Progress};
use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::backend::{Backend, JobRun, OutputData, ProgressSink, RunError};
use crate::gpu::{GpuError, GpuProbe};
use crate::held::Held;
use crate::metrics::WorkerMetrics;
use crate::progress::ProgressFeed;

/// How long a stopping worker waits for its running job to stop on the
/// generator (a ComfyUI prompt interrupted, a Wan2GP job cancelled) before it
/// says goodbye anyway. Well inside the unit's `TimeoutStopSec=60s`, which also
/// has to cover a managed ComfyUI's own ten-second stop.
pub const STOP_GRACE: Duration = Duration::from_secs(30);

/// How long the connection stays open after `goodbye`, reading whatever the
/// broker still sends, so the message leaves the send queue and the socket is not
/// reset with unread data in it (ZeroMQ's `ZMQ_LINGER`, which this crate lacks).
const GOODBYE_LINGER: Duration = Duration::from_millis(300);

/// Resolved settings of one worker.
#[derive(Debug, Clone)]
pub struct WorkerSettings {
    pub worker_id: String,
    pub broker: String,
    pub token: Option<String>,
    pub heartbeat_ms: u64,
    pub liveness: u32,
    /// Assignments held while one runs (pipelined dispatch).
    pub pipeline_depth: u8,
    pub labels: Vec<String>,
    pub work_dir: PathBuf,
    pub reconnect_min: Duration,
    pub reconnect_max: Duration,
    /// The broker's transport, and CURVE keys when the broker requires them.
    pub transport: TransportKind,
    pub curve: Option<CurveClient>,
}

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error(transparent)]
    Gpu(#[from] GpuError),
    #[error("work directory {path}: {source}")]
    WorkDir {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// What the worker can report about itself right now.
#[derive(Debug, Clone, PartialEq)]
pub struct Status {
    pub gpu: GpuInfo,
    pub backends: Vec<BackendInventory>,
    pub healthy: bool,
}

pub struct Worker {
    settings: WorkerSettings,
    backends: Vec<Arc<dyn Backend>>,
    probe: Arc<GpuProbe>,
    instance: String,
    metrics: Arc<WorkerMetrics>,
}

/// Prepared outputs and outcome of a finished attempt, kept until acknowledged.
struct Done {
    r: JobRef,
    outcome: Outcome,
    files: Vec<(OutputMeta, OutputData)>,
    loaded_model: Option<String>,
    work_dir: PathBuf,
    /// Progress sent before the first upload, oldest first: the stages the
    /// throttle still held when the attempt ended, then [`closing_progress`].
    closing: VecDeque<Progress>,
}

struct Running {
    r: JobRef,
    cancel: CancellationToken,
    progress: ProgressFeed,
}

/// Where the upload of an unacknowledged result stands.
struct Cursor {
    file: usize,
    offset: u64,
}

enum SessionEnd {
    Shutdown,
    Lost(String),
    Refused(String),
}

impl Worker {
    pub fn new(
        settings: WorkerSettings,
        backends: Vec<Arc<dyn Backend>>,
        probe: GpuProbe,
    ) -> Worker {
        Worker {
            metrics: Arc::new(WorkerMetrics::new(&settings.worker_id)),
            settings,
            backends,
            probe: Arc::new(probe),
            instance: uuid::Uuid::new_v4().simple().to_string(),
        }
    }

    pub fn settings(&self) -> &WorkerSettings {
        &self.settings
    }

    /// The worker's metrics, to serve with [`kiln_metrics::serve`].
    pub fn metrics(&self) -> Arc<WorkerMetrics> {
        self.metrics.clone()
    }

    /// Updates the metrics from a status and the models the backends hold.
    fn record_status(&self, status: &Status) {
        let resident: Vec<_> = self
            .backends
            .iter()
            .map(|b| (b.kind(), b.resident_models()))
            .collect();
        self.metrics.update(status, &resident);
    }

    /// Reads the GPU and asks every backend for health and inventory. The worker
    /// is ready for systemd once this succeeds.
    pub async fn status(&self) -> Result<Status, GpuError> {
        let mut backends = Vec::with_capacity(self.backends.len());
        let mut hint = None;
        for b in &self.backends {
            let health = b.health().await;
            let models = if health.healthy {
                b.inventory().await
            } else {
                Vec::new()
            };
            if hint.is_none() {
                hint = b.gpu_hint().await;
            }
            backends.push(BackendInventory {
                backend: b.kind(),
                healthy: health.healthy,
                models,
                detail: health.detail,
                params: b.params(),
            });
        }
        let probe = self.probe.clone();
        let probed = tokio::task::spawn_blocking(move || probe.probe())
            .await
            .unwrap_or_else(|e| Err(GpuError::Nvml(format!("probe task failed: {e}"))));
        // NVML first, then the GPU the operator declared in [worker.gpu]; only
        // without either does a backend's own report (ComfyUI's /system_stats)
        // stand in, and a simulated GPU after that.
        let gpu = match (probed, hint) {
            (Ok(g), _) if matches!(g.source, GpuSource::Nvml | GpuSource::Config) => g,
            (_, Some(mut h)) => {
                h.source = GpuSource::Backend;
                h
            }
            (Ok(g), None) => g,
            (Err(e), None) => return Err(e),
        };
        let healthy = backends.iter().any(|b| b.healthy);
        Ok(Status {
            gpu,
            backends,
            healthy,
        })
    }

    /// Runs until `shutdown` fires. A running job is cancelled and the broker told
    /// goodbye, so it requeues at once.
    pub async fn run(self, first: Status, shutdown: CancellationToken) -> Result<(), WorkerError> {
        std::fs::create_dir_all(&self.settings.work_dir).map_err(|source| {
            WorkerError::WorkDir {
                path: self.settings.work_dir.clone(),
                source,
            }
        })?;
        remove_stale_attempts(&self.settings.work_dir);
        let this = Arc::new(self);
        this.record_status(&first);
        let (status_tx, status_rx) = watch::channel(first);
        tokio::spawn(sample_status(this.clone(), status_tx, shutdown.clone()));
        let (done_tx, done_rx) = mpsc::channel::<Done>(4);
        let mut session = Session {
            worker: this.clone(),
            status: status_rx,
            done_tx,
            done_rx,
            running: None,
            staged: VecDeque::new(),
            unacked: None,
            pending: VecDeque::new(),
            awaiting: VecDeque::new(),
            cursor: None,
            chunk_bytes: 1024 * 1024,
            max_outputs: None,
            sent_inventory: None,
            sent_resident: None,
        };
        let identity = Bytes::from(format!("{}/{}", this.settings.worker_id, this.instance));
        let mut backoff = Backoff::new(this.settings.reconnect_min, this.settings.reconnect_max);
        loop {
            // A stop asked for during start-up or a backoff wins over connecting:
            // a stopping worker never registers and so never takes a job.
            tokio::task::yield_now().await;
            if shutdown.is_cancelled() {
                break;
            }
            let conn = tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                c = Dealer::connect(this.settings.transport, &this.settings.broker, ConnectOptions {
                    identity: Some(identity.clone()),
                    connect_timeout: Duration::from_secs(5),
                    curve: this.settings.curve.clone(),
                    ..ConnectOptions::default()
                }) => c,
            };
            let end = match conn {
                Ok(conn) => session.serve(conn, &shutdown, &mut backoff).await,
                Err(e) => {
                    SessionEnd::Lost(format!("cannot connect to {}: {e}", this.settings.broker))
                }
            };
            let delay = match end {
                SessionEnd::Shutdown => break,
                SessionEnd::Lost(why) => {
                    let d = backoff.next_delay();
                    tracing::warn!("lost the broker ({why}); reconnecting in {d:?}");
                    d
                }
                SessionEnd::Refused(why) => {
                    let d = backoff.next_delay();
                    tracing::error!("the broker refused this worker: {why}; retrying in {d:?}");
                    d
                }
            };
            // Keep taking in a finishing job while waiting to reconnect.
            let wake = Instant::now() + delay;
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep_until(wake) => break,
                    done = session.done_rx.recv() => if let Some(d) = done { session.finish(d) },
                }
            }
        }
        // Shut down between sessions: the job still stops on its generator.
        session.stop_job().await;
        for b in &this.backends {
            b.shutdown().await;
        }
        Ok(())
    }
}

/// Refreshes GPU figures every two heartbeats and backend health every five
/// seconds (inventory every minute, or when health changes).
async fn sample_status(
    worker: Arc<Worker>,
    tx: watch::Sender<Status>,
    shutdown: CancellationToken,
) {
    let period = Duration::from_millis((worker.settings.heartbeat_ms * 2).max(500));
    let mut ticks: u64 = 0;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(period) => {}
        }
        ticks += 1;
        let mut status = tx.borrow().clone();
        let probe = worker.probe.clone();
        if let Ok(Ok(gpu)) = tokio::task::spawn_blocking(move || probe.probe()).await {
            if gpu.source == status.gpu.source {
                status.gpu = gpu;
            }
        }
        if ticks.is_multiple_of((5_000 / period.as_millis() as u64).max(1)) {
            let full_refresh = ticks.is_multiple_of((60_000 / period.as_millis() as u64).max(1));
            for (inv, b) in status.backends.iter_mut().zip(&worker.backends) {
                let health = b.health().await;
                let changed = health.healthy != inv.healthy;
                if changed {
                    tracing::info!(backend = %b.kind(), healthy = health.healthy, detail = ?health.detail, "backend health changed");
                }
                inv.healthy = health.healthy;
                inv.detail = health.detail;
                if health.healthy && (changed || full_refresh) {
                    inv.models = b.inventory().await;
                }
            }
            status.healthy = status.backends.iter().any(|b| b.healthy);
        }
        worker.record_status(&status);
        tx.send_if_modified(|s| {
            let changed = *s != status;
            *s = status;
            changed
        });
    }
}

struct Session {
    worker: Arc<Worker>,
    status: watch::Receiver<Status>,
    done_tx: mpsc::Sender<Done>,
    done_rx: mpsc::Receiver<Done>,
    running: Option<Running>,
    /// Assignments held to start the moment the GPU is free, oldest first.
    staged: VecDeque<Held>,
    /// The finished attempt whose result is being sent, until acknowledged.
    unacked: Option<Done>,
    /// Finished attempts whose results wait for `unacked` to be sent.
    pending: VecDeque<Done>,
    /// Results sent in full, kept until the broker acknowledges them (after
    /// its commit), oldest first. Results stream without waiting for those
    /// acknowledgements, so the next result never waits on the broker's fsync
    /// of the last one; after a reconnect all of them are sent again.
    awaiting: VecDeque<Done>,
    cursor: Option<Cursor>,
    chunk_bytes: u64,
    /// The broker's `max_artifacts_per_job`, from `registered`.
    max_outputs: Option<u64>,
    /// The inventory last sent, so heartbeats carry it only when it changed.
    sent_inventory: Option<Vec<BackendInventory>>,
    /// The resident models last sent.
    sent_resident: Option<Vec<String>>,
}

async fn progress_changed(running: &mut Option<Running>) {
    match running {
        Some(r) => {
            if r.progress.changed().await.is_err() {
                std::future::pending::<()>().await
            }
        }
        None => std::future::pending().await,
    }
}

impl Session {
    async fn send(&self, conn: &mut Dealer, msg: &WorkerMessage) -> Result<(), String> {
        conn.send(frame::encode(msg))
            .await
            .map_err(|e| format!("send failed: {e}"))
    }

    fn register_msg(&self) -> WorkerMessage {
        let s = &self.worker.settings;
        let status = self.status.borrow();
        WorkerMessage::Register(Box::new(Register {
            token: s.token.clone(),
            worker_id: s.worker_id.clone(),
            instance: self.worker.instance.clone(),
            hostname: hostname(),
            version: kiln_protocol::VERSION.to_string(),
            gpu: status.gpu.clone(),
            backends: status.backends.clone(),
            labels: s.labels.clone(),
            loaded_model: self.loaded_model(),
            resident: self.resident(),
            current: self.running.as_ref().map(|r| r.r),
            unacked: self.unacked.as_ref().map(|d| d.r),
            held: self
                .pending
                .iter()
                .map(|d| d.r)
                .chain(self.staged.iter().map(|h| assign_ref(&h.assign)))
                .collect(),
            max_held: s.pipeline_depth,
        }))
    }

    fn loaded_model(&self) -> Option<String> {
        self.worker.backends.iter().find_map(|b| b.loaded_model())
    }

    fn resident(&self) -> Vec<String> {
        self.worker
            .backends
            .iter()
            .flat_map(|b| b.resident_models())
            .collect()
    }

    /// Every attempt this worker holds, oldest first: the results sent and not
    /// yet acknowledged, the result being sent, the results waiting behind it,
    /// the running job, the staged ones.
    fn outstanding(&self) -> Vec<JobRef> {
        self.awaiting
            .iter()
            .chain(self.unacked.iter())
            .map(|d| d.r)
            .chain(self.pending.iter().map(|d| d.r))
            .chain(self.running.as_ref().map(|r| r.r))
            .chain(self.staged.iter().map(|h| assign_ref(&h.assign)))
            .collect()
    }

    /// A job task finished: the next staged job starts at once (the GPU is free),
    /// and the result is kept until the broker acknowledges it.
    fn finish(&mut self, mut done: Done) {
        if let Some(mut run) = self.running.take_if(|r| r.r == done.r) {
            // Stages of a job shorter than the throttle are still held: they go
            // first, then the closing one.
            let last = run.progress.latest();
            done.closing.extend(run.progress.drain());
            done.closing
                .extend(closing_progress(&done.outcome, last.as_ref()));
        }
        if self.running.is_none() {
            if let Some(next) = self.staged.pop_front() {
                let (a, staging) = next.start();
                self.start(a, staging);
            }
        }
        if !matches!(done.outcome, Outcome::Succeeded { .. }) {
            // Nothing of a failed or cancelled attempt is uploaded: its scratch
            // (partial downloads, a whole batch before a hashing error) goes now.
            remove_scratch(&done.work_dir);
        }
        self.pending.push_back(done);
        self.next_result();
    }

    /// The result being sent is out in full: it waits for its acknowledgement
    /// and the next one may go.
    fn sent_in_full(&mut self) {
        if let Some(done) = self.unacked.take() {
            self.awaiting.push_back(done);
        }
        self.cursor = None;
        self.next_result();
    }

    /// Starts sending the next waiting result, unless a result with outputs is
    /// still unacknowledged: the broker verifies those outputs before it moves
    /// on to this worker's next attempt, and would take a result arriving
    /// meanwhile for a stale one. A result without outputs is final when it
    /// arrives, so the next one follows at once.
    fn next_result(&mut self) {
        if self.unacked.is_some() || self.awaiting.iter().any(|d| !d.files.is_empty()) {
            return;
        }
        if let Some(next) = self.pending.pop_front() {
            self.unacked = Some(next);
            self.cursor = Some(Cursor { file: 0, offset: 0 });
        }
    }

    /// A new connection: every result not acknowledged goes again, oldest
    /// first (the broker acknowledges one it already has without taking it twice).
    fn resend_all(&mut self) {
        if self.awaiting.is_empty() {
            return;
        }
        let mut all: VecDeque<Done> = self
            .awaiting
            .drain(..)
            .chain(self.unacked.take())
            .chain(self.pending.drain(..))
            .collect();
        self.unacked = all.pop_front();
        self.pending = all;
        self.cursor = Some(Cursor { file: 0, offset: 0 });
    }

    /// The broker has the result being sent: the next waiting one goes.
    fn acknowledged(&mut self) {
        if let Some(done) = self.unacked.take() {
            remove_scratch(&done.work_dir);
        }
        self.cursor = None;
        self.next_result();
    }

    /// Takes back every held attempt (the broker requeues them on `goodbye`),
    /// so the generator's queue keeps nothing nobody will collect; waits up to
    /// [`STOP_GRACE`] for the generator to confirm.
    async fn release_held(&mut self) {
        if self.staged.is_empty() {
            return;
        }
        let all = futures::future::join_all(self.staged.drain(..).map(Held::release));
        if tokio::time::timeout(STOP_GRACE, all).await.is_err() {
            tracing::warn!(
                "the generator did not drop the held jobs within {STOP_GRACE:?}; leaving anyway"
            );
        }
    }

    /// Cancels the running job, if any, and waits (up to [`STOP_GRACE`]) for its
    /// backend to stop it on the generator. Returns the attempt that was stopped.
    /// Its result is dropped: the broker requeues the attempt on `goodbye`.
    async fn stop_job(&mut self) -> Option<JobRef> {
        let r = self.running.as_ref()?.r;
        tracing::info!(job = %r.job_id, attempt = r.attempt, "stopping the running job before exiting");
        self.running.as_ref().expect("checked").cancel.cancel();
        let waited = tokio::time::timeout(STOP_GRACE, async {
            while let Some(done) = self.done_rx.recv().await {
                remove_scratch(&done.work_dir);
                if done.r == r {
                    return;
                }
            }
        })
        .await;
        if waited.is_err() {
            tracing::warn!(job = %r.job_id, attempt = r.attempt, "the job did not stop within {STOP_GRACE:?}; leaving anyway");
        }
        self.running = None;
        Some(r)
    }

    async fn serve(
        &mut self,
        mut conn: Dealer,
        shutdown: &CancellationToken,
        backoff: &mut Backoff,
    ) -> SessionEnd {
        let s = self.worker.settings.clone();
        let mut heartbeat_ms = s.heartbeat_ms;
        let mut liveness = s.liveness;
        self.resend_all();
        if let Err(e) = self.send(&mut conn, &self.register_msg()).await {
            return SessionEnd::Lost(e);
        }
        let mut registered = false;
        let mut last_heard = Instant::now();
        let mut last_progress = Instant::now() - Duration::from_secs(1);
        let mut progress_due: Option<Instant> = None;
        // The first beat comes one period after `register`, not at once: an
        // immediate second `register` could race the broker's first assignment.
        let period = Duration::from_millis(heartbeat_ms);
        let mut beat = tokio::time::interval_at(Instant::now() + period, period);
        beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let uploading = registered && self.cursor.is_some() && self.unacked.is_some();
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => {
                    // Take the held jobs off the generator's queue, then stop
                    // the running one (so nothing staged starts in its place and
                    // the broker's retry does not queue behind an abandoned
                    // prompt); then goodbye, so it requeues at once instead of
                    // after three heartbeats.
                    self.release_held().await;
                    let reason = match self.stop_job().await {
                        Some(r) => format!("worker shutting down; attempt {} of job {} was stopped", r.attempt, r.job_id),
                        None => "worker shutting down".to_string(),
                    };
                    let _ = self.send(&mut conn, &WorkerMessage::Goodbye(Goodbye { reason })).await;
                    linger(&mut conn).await;
                    return SessionEnd::Shutdown;
                }
                incoming = conn.next() => match incoming {
                    Incoming::Lost => return SessionEnd::Lost("connection closed".into()),
                    Incoming::Error(e) => tracing::debug!(error = %e, "receive error; continuing"),
                    Incoming::Frames(frames) => {
                        last_heard = Instant::now();
                        let msg = match frame::decode::<BrokerMessage>(&frames, usize::MAX) {
                            Ok(m) => m,
                            Err(e) => {
                                tracing::warn!(error = %e, "undecodable message from the broker");
                                continue;
                            }
                        };
                        match msg {
                            BrokerMessage::Registered(r) => {
                                registered = true;
                                backoff.reset();
                                self.sent_inventory = Some(self.status.borrow().backends.clone());
                                self.chunk_bytes = r.chunk_bytes.clamp(4096, 16 * 1024 * 1024);
                                self.max_outputs = r.max_outputs;
                                if r.heartbeat_ms != heartbeat_ms {
                                    heartbeat_ms = r.heartbeat_ms.max(10);
                                    let period = Duration::from_millis(heartbeat_ms);
                                    beat = tokio::time::interval_at(Instant::now() + period, period);
                                }
                                liveness = r.liveness.max(1);
                                if self.unacked.is_some() {
                                    self.cursor = Some(Cursor { file: 0, offset: 0 });
                                }
                                tracing::info!(broker = %s.broker, worker = %s.worker_id, "registered with the broker");
                            }
                            BrokerMessage::Heartbeat(_) => {}
                            BrokerMessage::Assign(a) => {
                                if let Err(e) = self.on_assign(&mut conn, a).await {
                                    return SessionEnd::Lost(e);
                                }
                            }
                            BrokerMessage::Cancel(r) => {
                                if let Some(run) = self.running.as_ref().filter(|run| run.r == r) {
                                    tracing::info!(job = %r.job_id, attempt = r.attempt, "cancelling at the broker's request");
                                    run.cancel.cancel();
                                } else if let Some(i) = self.staged.iter().position(|h| assign_ref(&h.assign) == r) {
                                    tracing::info!(job = %r.job_id, attempt = r.attempt, "dropping a held job at the broker's request");
                                    if let Some(held) = self.staged.remove(i) {
                                        tokio::spawn(held.release());
                                    }
                                }
                            }
                            BrokerMessage::ResultAck(r) => {
                                if let Some(i) = self.awaiting.iter().position(|d| d.r == r) {
                                    if let Some(done) = self.awaiting.remove(i) {
                                        remove_scratch(&done.work_dir);
                                    }
                                    self.next_result();
                                } else if self.unacked.as_ref().is_some_and(|d| d.r == r) {
                                    self.acknowledged();
                                } else if let Some(i) = self.pending.iter().position(|d| d.r == r) {
                                    // A stale result the broker does not want.
                                    if let Some(old) = self.pending.remove(i) {
                                        remove_scratch(&old.work_dir);
                                    }
                                }
                            }
                            BrokerMessage::Reregister(_) => {
                                registered = false;
                                self.resend_all();
                                if let Err(e) = self.send(&mut conn, &self.register_msg()).await {
                                    return SessionEnd::Lost(e);
                                }
                            }
                            BrokerMessage::Error(e) => {
                                if e.error.code == ErrorCode::Unauthenticated {
                                    return SessionEnd::Refused(e.error.message);
                                }
                                tracing::warn!(error = %e.error, "the broker reported an error");
                                if !registered {
                                    return SessionEnd::Refused(e.error.message);
                                }
                            }
                        }
                    }
                },
                done = self.done_rx.recv() => {
                    if let Some(done) = done {
                        self.finish(done);
                    }
                }
                _ = progress_changed(&mut self.running) => {
                    progress_due = Some(last_progress + Duration::from_millis(100));
                }
                _ = sleep_until_opt(progress_due), if registered => {
                    progress_due = None;
                    last_progress = Instant::now();
                    if let Some(run) = &mut self.running {
                        // Every stage held, in order; a stage's steps arrive merged.
                        let r = run.r;
                        for progress in run.progress.drain() {
                            let msg = WorkerMessage::Progress(ProgressReport { job_id: r.job_id, attempt: r.attempt, progress });
                            if let Err(e) = self.send(&mut conn, &msg).await {
                                return SessionEnd::Lost(e);
                            }
                        }
                    }
                }
                _ = beat.tick() => {
                    let silent = last_heard.elapsed();
                    if silent > Duration::from_millis(heartbeat_ms * liveness as u64) {
                        return SessionEnd::Lost(format!("no word from the broker for {silent:?}"));
                    }
                    if !registered {
                        // Registration unanswered: ask again (the broker may have
                        // been starting).
                        if let Err(e) = self.send(&mut conn, &self.register_msg()).await {
                            return SessionEnd::Lost(e);
                        }
                        continue;
                    }
                    let msg = self.heartbeat_msg();
                    if let Err(e) = self.send(&mut conn, &msg).await {
                        return SessionEnd::Lost(e);
                    }
                }
                _ = std::future::ready(()), if uploading => {
                    if let Err(e) = self.upload_next(&mut conn).await {
                        return SessionEnd::Lost(e);
                    }
                }
            }
        }
    }

    fn heartbeat_msg(&mut self) -> WorkerMessage {
        let status = self.status.borrow().clone();
        let backends = if self.sent_inventory.as_ref() != Some(&status.backends) {
            self.sent_inventory = Some(status.backends.clone());
            Some(status.backends)
        } else {
            None
        };
        let mut held = self.outstanding();
        let current = (!held.is_empty()).then(|| held.remove(0));
        let resident = self.resident();
        let resident = (self.sent_resident.as_ref() != Some(&resident)).then(|| {
            self.sent_resident = Some(resident.clone());
            resident
        });
        WorkerMessage::Heartbeat(Heartbeat {
            free_vram_mb: status.gpu.free_vram_mb,
            utilization_pct: status.gpu.utilization_pct,
            temperature_c: status.gpu.temperature_c,
            power_mw: status.gpu.power_mw,
            current,
            held,
            resident,
            loaded_model: self.loaded_model(),
            healthy: status.healthy,
            backends,
        })
    }

    async fn on_assign(&mut self, conn: &mut Dealer, a: Assign) -> Result<(), String> {
        let r = assign_ref(&a);
        if self.running.as_ref().is_some_and(|run| run.r == r)
            || self.staged.iter().any(|h| assign_ref(&h.assign) == r)
        {
            return Ok(()); // a duplicate
        }
        if let Some(busy) = &self.running {
            if a.hold && self.staged.len() < self.worker.settings.pipeline_depth as usize {
                tracing::debug!(job = %a.job_id, attempt = a.attempt, "holding the next job");
                // Staged on the generator after the attempt before it.
                let after = match self.staged.back() {
                    Some(prev) => prev.staged(),
                    None => busy.progress.handed_over(),
                };
                let run = self.job_run(&a);
                let backend = self.backend_for(&a);
                self.staged.push_back(Held::new(a, run, backend, after));
                return Ok(());
            }
            tracing::warn!(job = %a.job_id, busy_with = %busy.r.job_id, "assigned a job while busy; refusing it");
            let msg = WorkerMessage::Refused(Refused {
                job_id: a.job_id,
                attempt: a.attempt,
                busy_with: busy.r,
            });
            return self.send(conn, &msg).await;
        }
        if !a.hold {
            // The broker counts this worker idle: it moved on without wanting
            // the results still here.
            self.cursor = None;
            let stale = self
                .awaiting
                .drain(..)
                .chain(self.unacked.take())
                .chain(self.pending.drain(..));
            for old in stale {
                remove_scratch(&old.work_dir);
            }
        }
        if !self
            .worker
            .backends
            .iter()
            .any(|b| b.kind() == a.job.backend)
        {
            let err = JobError::new(
                FailureKind::InvalidInput,
                format!("this worker has no {} backend", a.job.backend),
                false,
            );
            let msg = WorkerMessage::Finished(Finished {
                job_id: a.job_id,
                attempt: a.attempt,
                outcome: Outcome::Failed { error: err },
                loaded_model: None,
            });
            return self.send(conn, &msg).await;
        }
        self.start(a, None);
        Ok(())
    }

    /// The backend that runs `a`, if this worker has it.
    fn backend_for(&self, a: &Assign) -> Option<Arc<dyn Backend>> {
        self.worker
            .backends
            .iter()
            .find(|b| b.kind() == a.job.backend)
            .cloned()
    }

    /// What a backend is given to run `a`.
    fn job_run(&self, a: &Assign) -> JobRun {
        JobRun {
            job_id: a.job_id,
            attempt: a.attempt,
            spec: a.job.clone(),
            degrade: a.degrade,
            work_dir: self
                .worker
                .settings
                .work_dir
                .join(format!("{}-{}", a.job_id, a.attempt)),
            max_outputs: self.max_outputs,
        }
    }

    /// Starts an attempt on its backend (the GPU is free), once its `staging`
    /// (if it was held and staged) has ended.
    fn start(&mut self, a: Assign, staging: Option<tokio::task::JoinHandle<()>>) {
        let r = assign_ref(&a);
        let run = self.job_run(&a);
        let Some(backend) = self.backend_for(&a) else {
            // Staged for a backend this worker lacks: fail it in its turn.
            let err = JobError::new(
                FailureKind::InvalidInput,
                format!("this worker has no {} backend", a.job.backend),
                false,
            );
            let done = Done {
                r,
                outcome: Outcome::Failed { error: err },
                files: Vec::new(),
                loaded_model: None,
                work_dir: run.work_dir,
                closing: VecDeque::new(),
            };
            self.finish(done);
            return;
        };
        tracing::info!(job = %a.job_id, attempt = a.attempt, backend = %a.job.backend, "starting");
        let (sink, progress) = ProgressSink::new();
        let cancel = CancellationToken::new();
        self.running = Some(Running {
            r,
            cancel: cancel.clone(),
            progress,
        });
        tokio::spawn(run_job(
            backend,
            run,
            staging,
            sink,
            cancel,
            self.done_tx.clone(),
            self.worker.metrics.clone(),
        ));
    }

    /// Sends the next piece of the unacknowledged result, then `finished`.
    async fn upload_next(&mut self, conn: &mut Dealer) -> Result<(), String> {
        let (Some(done), Some(cursor)) = (&mut self.unacked, &mut self.cursor) else {
            return Ok(());
        };
        if let Some(progress) = done.closing.pop_front() {
            let msg = WorkerMessage::Progress(ProgressReport {
                job_id: done.r.job_id,
                attempt: done.r.attempt,
                progress,
            });
            return self.send(conn, &msg).await;
        }
        if cursor.file >= done.files.len() {
            let msg = WorkerMessage::Finished(Finished {
                job_id: done.r.job_id,
                attempt: done.r.attempt,
                outcome: done.outcome.clone(),
                loaded_model: done.loaded_model.clone(),
            });
            let sent = self.send(conn, &msg).await;
            self.sent_in_full();
            return sent;
        }
        let (meta, data) = &done.files[cursor.file];
        let len = self.chunk_bytes.min(meta.size - cursor.offset);
        let piece = match read_piece(data, cursor.offset, len) {
            Ok(p) => p,
            Err(e) => {
                // The file vanished from the work dir: report the attempt failed.
                let err = JobError::new(
                    FailureKind::Internal,
                    format!("cannot read output {}: {e}", meta.name),
                    true,
                );
                let msg = WorkerMessage::Finished(Finished {
                    job_id: done.r.job_id,
                    attempt: done.r.attempt,
                    outcome: Outcome::Failed { error: err },
                    loaded_model: None,
                });
                let sent = self.send(conn, &msg).await;
                self.sent_in_full();
                return sent;
            }
        };
        let msg = WorkerMessage::Upload(Upload {
            job_id: done.r.job_id,
            attempt: done.r.attempt,
            index: meta.index,
            name: meta.name.clone(),
            media_type: meta.media_type.clone(),
            offset: cursor.offset,
            total: meta.size,
            data: piece,
        });
        cursor.offset += len;
        if cursor.offset >= meta.size {
            cursor.file += 1;
            cursor.offset = 0;
        }
        self.send(conn, &msg).await
    }
}

/// Keeps reading the connection for [`GOODBYE_LINGER`] after `goodbye`.
async fn linger(conn: &mut Dealer) {
    let _ = tokio::time::timeout(GOODBYE_LINGER, async {
        loop {
            if let Incoming::Lost = conn.next().await {
                return;
            }
        }
    })
    .await;
}

/// Removes one attempt's scratch folder (it may not exist).
fn remove_scratch(dir: &std::path::Path) {
    match std::fs::remove_dir_all(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            tracing::warn!(dir = %dir.display(), error = %e, "cannot remove an attempt's scratch")
        }
    }
}

/// Attempt folders (`<job>-<attempt>`) left by an earlier process of this worker
/// (killed before the broker acknowledged): nothing will upload them now.
fn remove_stale_attempts(work_dir: &std::path::Path) {
    let Ok(entries) = std::fs::read_dir(work_dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let is_attempt = name.to_str().is_some_and(|n| {
            n.split_once('-').is_some_and(|(job, attempt)| {
                !job.is_empty()
                    && !attempt.is_empty()
                    && attempt.bytes().all(|b| b.is_ascii_digit())
                    && job.bytes().all(|b| b.is_ascii_alphanumeric())
            })
        });
        if is_attempt && entry.path().is_dir() {
            tracing::info!(dir = %entry.path().display(), "removing the scratch of an attempt from an earlier run");
            remove_scratch(&entry.path());
        }
    }
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

fn read_piece(data: &OutputData, offset: u64, len: u64) -> std::io::Result<Vec<u8>> {
    match data {
        OutputData::Bytes(b) => Ok(b[offset as usize..(offset + len) as usize].to_vec()),
        OutputData::File(path) => {
            use std::io::{Read, Seek, SeekFrom};
            let mut f = std::fs::File::open(path)?;
            f.seek(SeekFrom::Start(offset))?;
            let mut buf = vec![0; len as usize];
            f.read_exact(&mut buf)?;
            Ok(buf)
        }
    }
}

fn assign_ref(a: &Assign) -> JobRef {
    JobRef {
        job_id: a.job_id,
        attempt: a.attempt,
    }
}

/// Runs one attempt on its backend and prepares the result (sizes, hashes).
#[allow(clippy::too_many_arguments)]
async fn run_job(
    backend: Arc<dyn Backend>,
    run: JobRun,
    staging: Option<tokio::task::JoinHandle<()>>,
    sink: ProgressSink,
    cancel: CancellationToken,
    done: mpsc::Sender<Done>,
    metrics: Arc<WorkerMetrics>,
) {
    let kind = run.spec.backend;
    let r = JobRef {
        job_id: run.job_id,
        attempt: run.attempt,
    };
    let (work_dir, max_outputs) = (run.work_dir.clone(), run.max_outputs);
    // A staged attempt is in the generator's queue once its staging ended.
    if let Some(staging) = staging {
        let _ = staging.await;
    }
    // When the generator had the job, on the Unix clock: the gap between one
    // job's end and the next one's start is what pipelined dispatch removes.
    let started_unix_ms = kiln_protocol::unix_ms();
    // A panicking backend must fail the attempt, not the worker.
    let result = match AssertUnwindSafe(backend.run(run, sink.clone(), cancel))
        .catch_unwind()
        .await
    {
        Ok(result) => result,
        Err(_) => Err(RunError::Failed(JobError::new(
            FailureKind::Internal,
            "the backend panicked".to_string(),
            true,
        ))),
    };
    let ended_unix_ms = kiln_protocol::unix_ms();
    let result = result.map(|mut out| {
        out.info
            .insert("worker_started_ms".into(), started_unix_ms.into());
        out.info
            .insert("worker_ended_ms".into(), ended_unix_ms.into());
        out
    });
    // More outputs than the broker keeps would fail at the upload past the limit,
    // after sending the others: say so now, with the count, and do not retry.
    let result = result.and_then(|out| match max_outputs {
        Some(max) if out.outputs.len() as u64 > max => Err(RunError::Failed(JobError::new(
            FailureKind::InvalidInput,
            kiln_protocol::limits::too_many_outputs(
                &format!("the job made {} outputs", out.outputs.len()),
                max,
            ),
            false,
        ))),
        _ => Ok(out),
    });
    let (outcome, files) = match result {
        // Hashing files reads them: off the async threads. Bytes are hashed here.
        Ok(out)
            if out
                .outputs
                .iter()
                .all(|o| matches!(o.data, OutputData::Bytes(_))) =>
        {
            settle(prepare(out))
        }
        Ok(out) => match tokio::task::spawn_blocking(move || prepare(out)).await {
            Ok(prepared) => settle(prepared),
            Err(e) => (
                Outcome::Failed {
                    error: JobError::new(FailureKind::Internal, e.to_string(), true),
                },
                Vec::new(),
            ),
        },
        Err(RunError::Cancelled) => (Outcome::Cancelled, Vec::new()),
        Err(RunError::Failed(error)) => (Outcome::Failed { error }, Vec::new()),
    };
    let outcome_name = match &outcome {
        Outcome::Succeeded { .. } => "succeeded",
        Outcome::Failed { .. } => "failed",
        Outcome::Cancelled => "cancelled",
    };
    metrics.attempt_done(kind, outcome_name, &sink.take_phases());
    match &outcome {
        Outcome::Succeeded { outputs, .. } => {
            tracing::info!(job = %r.job_id, attempt = r.attempt, outputs = outputs.len(), "succeeded")
        }
        Outcome::Failed { error } => {
            tracing::warn!(job = %r.job_id, attempt = r.attempt, error = %error, "failed")
        }
        Outcome::Cancelled => tracing::info!(job = %r.job_id, attempt = r.attempt, "cancelled"),
    }
    let _ = done
        .send(Done {
            r,
            outcome,
            files,
            loaded_model: backend.loaded_model(),
            work_dir,
            closing: VecDeque::new(),
        })
        .await;
}

/// The progress a finished attempt leaves behind, after the stages still held
/// (see [`crate::progress`]). Without it the broker would keep the last stage a
/// backend reported ("downloading x_00001_.png", "encoding") on the finished
/// job. A success closes at 100 % "done", keeping the step count; a failure
/// leaves the progress to the broker, which clears it.
fn closing_progress(outcome: &Outcome, last: Option<&Progress>) -> Option<Progress> {
    match outcome {
        Outcome::Succeeded { .. } => Some(Progress {
            pct: 100.0,
            step: last.and_then(|p| p.steps.or(p.step)),
            steps: last.and_then(|p| p.steps),
            stage: "done".into(),
        }),
        Outcome::Failed { .. } | Outcome::Cancelled => None,
    }
}

type Prepared = (Outcome, Vec<(OutputMeta, OutputData)>);

fn settle(prepared: Result<Prepared, JobError>) -> Prepared {
    prepared.unwrap_or_else(|error| (Outcome::Failed { error }, Vec::new()))
}

/// Hashes and sizes each output, giving each a unique, safe name.
fn prepare(out: crate::backend::RunOutput) -> Result<Prepared, JobError> {
    let mut files = Vec::with_capacity(out.outputs.len());
    let mut names = std::collections::HashSet::new();
    for (i, o) in out.outputs.into_iter().enumerate() {
        let mut name = match safe_file_name(&o.name) {
            Some(n) => n.to_string(),
            None => o
                .name
                .replace(['/', '\\', '\0'], "_")
                .trim_start_matches('.')
                .to_string(),
        };
        if name.is_empty() {
            name = format!("output_{i}");
        }
        if !names.insert(name.clone()) {
            name = format!("{i}_{name}");
            names.insert(name.clone());
        }
        let (size, sha) = match &o.data {
            OutputData::Bytes(b) => (b.len() as u64, hex(&Sha256::digest(b))),
            OutputData::File(p) => hash_file(p).map_err(|e| {
                JobError::new(
                    FailureKind::Internal,
                    format!("cannot read output {}: {e}", p.display()),
                    true,
                )
            })?,
        };
        files.push((
            OutputMeta {
                index: i as u16,
                name,
                media_type: o.media_type,
                size,
                sha256: sha,
            },
            o.data,
        ));
    }
    let outputs = files.iter().map(|(m, _)| m.clone()).collect();
    Ok((
        Outcome::Succeeded {
            outputs,
            info: out.info,
        },
        files,
    ))
}

fn hash_file(path: &std::path::Path) -> std::io::Result<(u64, String)> {
    use std::io::Read;
    let mut f = std::fs::File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0; 1 << 20];
    let mut size = 0u64;
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        size += n as u64;
    }
    Ok((size, hex(&h.finalize())))
}

/// This machine's host name.
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_finished_job_closes_at_done_not_at_its_last_stage() {
        let last = Progress {
            pct: 97.5,
            step: Some(1),
            steps: Some(2),
            stage: "downloading upscaled_00001_.png".into(),
        };
        let ok = Outcome::Succeeded {
            outputs: vec![],
            info: Default::default(),
        };
        let closing = closing_progress(&ok, Some(&last)).unwrap();
        assert_eq!(
            (
                closing.pct,
                closing.stage.as_str(),
                closing.step,
                closing.steps
            ),
            (100.0, "done", Some(2), Some(2))
        );
        // A job too short to have reported anything still closes at done.
        assert_eq!(closing_progress(&ok, None).unwrap().stage, "done");
        let failed = Outcome::Failed {
            error: JobError::new(FailureKind::Backend, "boom", false),
        };
        assert_eq!(closing_progress(&failed, Some(&last)), None);
        assert_eq!(closing_progress(&Outcome::Cancelled, Some(&last)), None);
    }

    #[test]
    fn attempt_folders_of_an_earlier_run_are_removed_and_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        for d in ["j12-1", "j7-3/sub", "wan2gp", "notes-x", "j5-"] {
            std::fs::create_dir_all(dir.path().join(d)).unwrap();
        }
        std::fs::write(dir.path().join("j12-1/0_out.png"), b"png").unwrap();
        std::fs::write(dir.path().join("j9-2"), b"a file, not an attempt").unwrap();
        remove_stale_attempts(dir.path());
        let mut left: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        assert_eq!(left, ["j5-", "j9-2", "notes-x", "wan2gp"]);
        remove_scratch(&dir.path().join("never-existed"));
    }
}
