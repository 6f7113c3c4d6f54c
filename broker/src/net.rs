//! The socket shell around the core.
//!
//! ```text
//!  frontend ROUTER ──recv task──┐                         ┌─► per-peer send tasks ─► frontend/backend ROUTER
//!  backend  ROUTER ──recv task──┼─► router task (Core) ───┼─► committer thread (redb, group commit) ─┘
//!                               │        │                └─► PUB task ─► events PUB
//!  artifact thread ◄────────────┘◄───────┘ (writes, verifies and reads output files)
//! ```
//!
//! - Receive tasks decode frames in parallel with the core and feed one channel.
//! - The router task owns the [`Core`]: it takes every input that is waiting, runs
//!   it through `handle`, and passes the outputs on as one batch. No lock is shared
//!   with network tasks (the rumqttd model).
//! - The committer thread writes the batch's records in one redb transaction (all
//!   batches waiting are grouped) and only then sends the batch's replies, worker
//!   messages and events. So `accepted` always follows the commit, and nothing a
//!   client hears about can be lost by a crash. Assignments alone go out at once
//!   from the router (their attempt numbers are reserved by earlier records).
//! - Each peer has its own send task with a bounded queue, so a stalled peer never
//!   blocks the broker: its messages are dropped (clients re-query) or, for a
//!   worker, the worker is declared unreachable.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use kiln_config::{BrokerCurve, ConfigError, KilnConfig};
use kiln_protocol::frame::{self, peek_envelope, PROTOCOL_TAG};
use kiln_protocol::request::{Chunk, Reply};
use kiln_protocol::transport::{
    BindOptions, CurveServer, Publisher, Routed, Router, RouterRx, RouterTx, TransportError,
    TransportKind,
};
use kiln_protocol::worker::BrokerMessage;
use kiln_protocol::{ErrorBody, ErrorCode, Request, WorkerMessage};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::artifacts::ArtifactStore;
use crate::committer::{self, Batch, Durable, Unsaved};
use crate::core::{ArtifactOp, Core, CoreConfig, Input, Output, PeerId, Record};
use crate::metrics::{BrokerMetrics, Recorder};
use crate::store::{Store, StoreError};

/// Everything the broker needs to run, resolved from [`KilnConfig`].
#[derive(Debug, Clone)]
pub struct BrokerSettings {
    pub core: CoreConfig,
    pub frontend: String,
    pub backend: String,
    pub events: String,
    /// Whether the events port is opened. A PUB socket cannot tell who subscribes,
    /// so with client tokens configured it stays closed unless the transport itself
    /// authenticates every connection; clients then follow jobs with `get`.
    pub events_open: bool,
    pub state_dir: PathBuf,
    pub durable: bool,
    pub peer_queue: usize,
    /// Connections per port, and per address on each port (libzmq).
    pub max_connections: usize,
    pub max_connections_per_address: usize,
    pub transport: TransportKind,
    /// CURVE for the three ports; `None` for plain ZMTP.
    pub curve: Option<BrokerCurve>,
    /// Where the broker counts; serve its registry with [`kiln_metrics::serve`].
    pub metrics: Arc<BrokerMetrics>,
}

impl BrokerSettings {
    pub fn from_config(cfg: &KilnConfig) -> Result<BrokerSettings, ConfigError> {
        let b = &cfg.broker;
        let core = CoreConfig {
            heartbeat_ms: b.heartbeat_ms,
            liveness: b.liveness,
            default_max_attempts: b.default_max_attempts,
            default_queue_timeout_s: b.default_queue_timeout_s,
            default_run_timeout_s: b.default_run_timeout_s,
            cancel_grace_ms: b.cancel_grace_s as u64 * 1000,
            fleet_memory_ms: b.fleet_memory_s * 1000,
            limits: b.limits.clone(),
            client_token: cfg.broker_client_token()?.map(|s| s.expose().to_string()),
            worker_token: cfg.broker_worker_token()?.map(|s| s.expose().to_string()),
            persist: b.durable,
            named_records: b.named_state_records,
            retention_max_age_ms: b.retention.max_age_s * 1000,
            retention_max_bytes: b.retention.max_artifact_bytes,
            retention_sweep_ms: b.retention.sweep_interval_s.max(1) * 1000,
            load_weight: b.placement.load_weight,
            affinity_max_wait_ms: b.placement.fairness_bound_s.saturating_mul(1000),
            ..CoreConfig::default()
        };
        // With CURVE every subscriber is a known key, so the port can open even
        // with tokens; a plain PUB cannot tell who subscribes.
        let curve = cfg.broker_curve()?;
        let events_open = core.client_token.is_none() || curve.is_some();
        Ok(BrokerSettings {
            core,
            events_open,
            frontend: b.frontend.clone(),
            backend: b.backend.clone(),
            events: b.events.clone(),
            state_dir: b.state_dir.clone(),
            durable: b.durable,
            peer_queue: b.peer_queue,
            max_connections: b.max_connections,
            max_connections_per_address: b.max_connections_per_address,
            transport: b.transport,
            curve,
            metrics: Arc::new(BrokerMetrics::new()),
        })
    }
}

/// Why the broker could not start or had to stop.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error(transparent)]
    Bind(#[from] TransportError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("artifact directory {path}: {error}")]
    Artifacts {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("the job store failed, stopping so that nothing unrecorded is acknowledged: {0}")]
    CommitFailed(String),
}

/// The endpoints actually bound (port 0 resolved), for tests and `kiln up`.
#[derive(Debug, Clone)]
pub struct Endpoints {
    pub frontend: String,
    pub backend: String,
    /// `None` when the events port is closed (see [`BrokerSettings::events_open`]).
    pub events: Option<String>,
}

/// A running broker. Dropping it does not stop it; call [`Broker::shutdown`].
pub struct Broker {
    endpoints: Endpoints,
    shutdown: watch::Sender<bool>,
    task: JoinHandle<Result<(), BrokerError>>,
    alive: Arc<AtomicU64>,
    metrics: Arc<BrokerMetrics>,
}

/// Milliseconds on a monotone clock anchored at the Unix time of start-up, so that
/// timestamps read like wall-clock time but never run backwards.
#[derive(Clone, Copy)]
struct Clock {
    start: Instant,
    start_unix_ms: u64,
}

impl Clock {
    fn new() -> Clock {
        Clock {
            start: Instant::now(),
            start_unix_ms: kiln_protocol::unix_ms(),
        }
    }

    fn now_ms(&self) -> u64 {
        self.start_unix_ms + self.start.elapsed().as_millis() as u64
    }

    fn instant_at(&self, ms: u64) -> tokio::time::Instant {
        let offset = ms.saturating_sub(self.start_unix_ms);
        tokio::time::Instant::from_std(self.start + Duration::from_millis(offset))
    }
}

impl Broker {
    /// Opens the store, recovers, binds the three sockets and starts serving.
    /// Returns once the broker is ready to accept clients and workers.
    pub async fn start(settings: BrokerSettings) -> Result<Broker, BrokerError> {
        let clock = Clock::new();
        let mut core = Core::new(settings.core.clone(), clock.now_ms());
        let mut store = None;
        let mut unsaved = None;
        if settings.durable {
            let mut s = Store::open(&settings.state_dir)?;
            let loaded = s.load()?;
            let mut out = Vec::new();
            let (n_jobs, boot) = (loaded.jobs.len(), loaded.boot);
            core.recover(
                clock.now_ms(),
                loaded.boot,
                loaded.jobs,
                loaded.fleet,
                loaded.next_job_id,
                &mut out,
            );
            let records: Vec<Record> = out
                .into_iter()
                .filter_map(|o| match o {
                    Output::Persist(r) => Some(r),
                    _ => None,
                })
                .collect();
            tracing::info!(
                jobs = n_jobs,
                queued = core.queued(),
                running = core.running(),
                boot,
                "recovered the job store"
            );
            match s.count_boot(boot).and_then(|()| s.commit(&records)) {
                Ok(()) => store = Some(s),
                Err(e) => {
                    // A full or failing disk: start anyway and serve reads; the
                    // committer holds the boot and these records until it can
                    // write them (nothing starts meanwhile, so a crash before
                    // then loses nothing that was promised).
                    let cause = e.to_string();
                    tracing::error!(error = %cause, "cannot write the job store at start; serving reads and refusing writes until it works again");
                    let mut ignored = Vec::new();
                    core.handle(
                        clock.now_ms(),
                        Input::StoreFault {
                            cause: Some(cause.clone()),
                        },
                        &mut ignored,
                    );
                    unsaved = Some(Unsaved {
                        cause,
                        boot,
                        records,
                    });
                }
            }
        }
        let artifacts =
            ArtifactStore::open(&settings.state_dir).map_err(|error| BrokerError::Artifacts {
                path: settings.state_dir.join("artifacts"),
                error,
            })?;

        let kind = settings.transport;
        let max = settings.core.limits.max_message_bytes;
        let max_connections = connection_budget(settings.max_connections);
        let opts = |curve: Option<&CurveServer>, peer_queue: usize| BindOptions {
            // The transport's hard cap (libzmq drops a peer announcing more before
            // reading it) sits above the protocol limit, so a message a little
            // over the limit still gets its typed `message_too_large` error.
            max_message_bytes: max.saturating_mul(2).saturating_add(64 * 1024),
            peer_queue,
            curve: curve.cloned(),
            max_connections,
            max_connections_per_address: settings.max_connections_per_address,
            ..BindOptions::default()
        };
        let curve = settings.curve.as_ref();
        // A client's queue holds at most this many replies: with chunks of up to
        // `max_chunk_bytes`, that bounds the bytes a client that stops reading holds.
        let client_queue = client_queue(&settings);
        let (front_rx, front_tx, frontend_ep) = Router::bind(
            kind,
            &settings.frontend,
            opts(curve.map(|c| &c.clients), client_queue),
        )
        .await?;
        let (back_rx, back_tx, backend_ep) = Router::bind(
            kind,
            &settings.backend,
            opts(curve.map(|c| &c.workers), settings.peer_queue),
        )
        .await?;
        if settings.core.client_token.is_some() && settings.core.worker_token.is_none() {
            tracing::warn!(
                backend = %settings.backend,
                "clients need a token but workers do not: any peer that reaches the backend port can register as a worker and receive jobs (prompts, inputs, workflows); set broker.worker_token"
            );
        }
        let mut events = None;
        if settings.events_open {
            let (publisher, ep) = Publisher::bind(
                kind,
                &settings.events,
                BindOptions {
                    // What a subscriber sends is its subscriptions: a peer sending
                    // a larger one is dropped and its subscriptions freed (libzmq).
                    max_message_bytes: MAX_SUBSCRIPTION_BYTES,
                    ..opts(curve.map(|c| &c.events), settings.peer_queue)
                },
            )
            .await?;
            events = Some((ep, publisher));
        } else {
            tracing::warn!(
                events = %settings.events,
                "the events port stays closed: client tokens are configured without CURVE and a plain PUB socket cannot authenticate its subscribers; clients follow jobs with `get`"
            );
        }
        let endpoints = Endpoints {
            frontend: frontend_ep,
            backend: backend_ep,
            events: events.as_ref().map(|(ep, _)| ep.clone()),
        };
        tracing::info!(frontend = %endpoints.frontend, backend = %endpoints.backend, events = endpoints.events.as_deref().unwrap_or("closed"), durable = settings.durable, transport = %kind, curve = settings.curve.is_some(), "broker listening");

        let (inputs_tx, inputs_rx) = mpsc::channel::<Input>(65_536);
        let max = max as usize;
        tokio::spawn(recv_loop(front_rx, inputs_tx.clone(), max, Side::Clients));
        tokio::spawn(recv_loop(back_rx, inputs_tx.clone(), max, Side::Workers));

        let clients = Arc::new(Outbox(front_tx));
        let workers = Arc::new(Outbox(back_tx));
        let events = events.map(|(_, publisher)| publisher);

        let (art_tx, art_rx) = mpsc::channel::<ArtifactOp>(256);
        // Verifications come back on their own unbounded channel: the router may be
        // waiting for room in `art_tx`, so the artifact thread must never wait on it.
        let (stored_tx, stored_rx) = mpsc::unbounded_channel::<Input>();
        // The committer reports a store that cannot write (and its recovery) there too.
        let stored_tx_faults = stored_tx.clone();
        {
            let clients = clients.clone();
            std::thread::Builder::new()
                .name("kiln-artifacts".into())
                .spawn(move || artifact_loop(artifacts, art_rx, clients, stored_tx))
                .expect("spawn artifact thread");
        }
        let ctx = Dispatch {
            clients,
            workers,
            events,
            artifacts: art_tx.clone(),
        };
        // The committer thread also sends (encoding and socket work off the
        // router's thread), with or without a store.
        let (commit_tx, commit_rx) = mpsc::channel::<Batch>(1024);
        let workers = ctx.workers.clone();
        let durable = (store.is_some() || unsaved.is_some()).then(|| Durable {
            store,
            state_dir: settings.state_dir.clone(),
            unsaved,
        });
        let faults = stored_tx_faults;
        let rt = tokio::runtime::Handle::current();
        let metrics = settings.metrics.clone();
        let commits = metrics.clone();
        std::thread::Builder::new()
            .name("kiln-commit".into())
            .spawn(move || {
                committer::run(
                    durable,
                    commit_rx,
                    |o| dispatch(&ctx, o),
                    faults,
                    rt,
                    |took, log| commits.observe_commit(took, log),
                )
            })
            .expect("spawn committer thread");
        let downstream = Downstream {
            commits: commit_tx,
            workers,
        };

        let (shutdown, shutdown_rx) = watch::channel(false);
        let alive = Arc::new(AtomicU64::new(clock.now_ms()));
        let recorder = Recorder::new(metrics.clone(), &core);
        let task = tokio::spawn(route_loop(
            core,
            recorder,
            clock,
            inputs_rx,
            stored_rx,
            downstream,
            art_tx,
            shutdown_rx,
            alive.clone(),
        ));
        drop(inputs_tx);
        Ok(Broker {
            endpoints,
            shutdown,
            task,
            alive,
            metrics,
        })
    }

    /// The broker's metrics, to serve with [`kiln_metrics::serve`].
    pub fn metrics(&self) -> Arc<BrokerMetrics> {
        self.metrics.clone()
    }

    pub fn endpoints(&self) -> &Endpoints {
        &self.endpoints
    }

    /// Milliseconds (Unix) when the core loop last ran; a watchdog checks it.
    pub fn last_alive_ms(&self) -> u64 {
        self.alive.load(Ordering::Relaxed)
    }

    /// Runs until the broker stops by itself (a fatal store error).
    pub async fn wait(&mut self) -> Result<(), BrokerError> {
        match (&mut self.task).await {
            Ok(r) => r,
            Err(e) => Err(BrokerError::CommitFailed(format!(
                "broker task failed: {e}"
            ))),
        }
    }

    /// Stops serving; pending commits finish first.
    pub async fn shutdown(self) -> Result<(), BrokerError> {
        let _ = self.shutdown.send(true);
        match self.task.await {
            Ok(r) => r,
            Err(e) => Err(BrokerError::CommitFailed(format!(
                "broker task failed: {e}"
            ))),
        }
    }
}

/// The longest message a subscriber may send on the events port: a subscription
/// (one flag byte and a topic prefix; Kiln's topics are `job/<id>/state`).
const MAX_SUBSCRIPTION_BYTES: u64 = 1024;

/// Descriptors kept free for the job store, artifact files, libzmq's own
/// mailboxes and the process, whatever peers do.
const FD_RESERVE: u64 = 512;

/// Raises the open-file limit to its hard limit and returns the connections each
/// of the three ports may hold: `wanted`, lowered if three ports' worth would
/// not leave [`FD_RESERVE`] descriptors.
fn connection_budget(wanted: usize) -> usize {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the local struct.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return wanted;
    }
    if lim.rlim_cur < lim.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: lim.rlim_max,
            rlim_max: lim.rlim_max,
        };
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            lim.rlim_cur = lim.rlim_max;
        }
    }
    let budget = (lim.rlim_cur.saturating_sub(FD_RESERVE) / 3).max(1) as usize;
    if budget < wanted {
        tracing::warn!(
            open_files = lim.rlim_cur,
            max_connections = budget,
            wanted,
            "lowering broker.max_connections so that {FD_RESERVE} descriptors stay free for the store and artifacts; raise LimitNOFILE to allow more"
        );
        return budget;
    }
    wanted
}

/// Replies queued for one client: enough for a window of artifact chunks, and at
/// most about 64 MiB of them, so a client that stops reading holds a bounded
/// amount of memory (`broker.peer_queue` caps it further).
fn client_queue(settings: &BrokerSettings) -> usize {
    let chunk = settings.core.limits.max_chunk_bytes.max(1);
    ((64 * 1024 * 1024 / chunk) as usize).clamp(16, settings.peer_queue.max(16))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    Clients,
    Workers,
}

/// Reads one ROUTER, decodes, and feeds the core. Decoding happens here, off the
/// core's thread.
async fn recv_loop(mut rx: RouterRx, inputs: mpsc::Sender<Input>, max_bytes: usize, side: Side) {
    let worker = side == Side::Workers;
    while let Some(routed) = rx.recv().await {
        let (peer, frames): (PeerId, Vec<Bytes>) = match routed {
            Routed::Message { peer, frames } => (peer, frames),
            Routed::Gone { peer } => {
                if inputs.send(Input::PeerGone { peer, worker }).await.is_err() {
                    return;
                }
                continue;
            }
            Routed::Stalled { peer } => {
                if inputs
                    .send(Input::PeerUnreachable { peer, worker })
                    .await
                    .is_err()
                {
                    return;
                }
                continue;
            }
        };
        let input = match side {
            Side::Clients => client_input(peer, &frames, max_bytes),
            Side::Workers => match frame::decode::<WorkerMessage>(&frames, max_bytes) {
                Ok(msg) => Input::Worker { peer, msg },
                Err(error) => Input::BadWorkerMessage { peer, error },
            },
        };
        if inputs.send(input).await.is_err() {
            return;
        }
    }
}

/// What a client's frames are to the core: the decoded request, or the decoding
/// error with the `req_id` when it could be read (to echo in the error reply).
pub(crate) fn client_input(peer: PeerId, frames: &[Bytes], max_bytes: usize) -> Input {
    match frame::decode::<Request>(frames, max_bytes) {
        Ok(request) => Input::Request { peer, request },
        Err(error) => {
            let req_id = frames
                .get(1)
                .filter(|b| b.len() <= max_bytes)
                .and_then(|b| peek_envelope(b))
                .and_then(|e| e.req_id);
            Input::BadRequest {
                peer,
                req_id,
                error,
            }
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn route_loop(
    mut core: Core,
    mut recorder: Recorder,
    clock: Clock,
    mut inputs: mpsc::Receiver<Input>,
    mut stored: mpsc::UnboundedReceiver<Input>,
    downstream: Downstream,
    artifacts: mpsc::Sender<ArtifactOp>,
    mut shutdown: watch::Receiver<bool>,
    alive: Arc<AtomicU64>,
) -> Result<(), BrokerError> {
    let mut out = Vec::with_capacity(1024);
    loop {
        // Wake at least once a second so the watchdog sees a live loop.
        let wake = core
            .poll_timeout()
            .unwrap_or(u64::MAX)
            .min(clock.now_ms() + 1_000);
        let first = tokio::select! {
            biased;
            _ = shutdown.changed() => break,
            input = stored.recv() => match input {
                Some(i) => i,
                None => break,
            },
            input = inputs.recv() => match input {
                Some(i) => i,
                None => break,
            },
            _ = tokio::time::sleep_until(clock.instant_at(wake)) => Input::Tick,
        };
        let now = clock.now_ms();
        alive.store(now, Ordering::Relaxed);
        core.handle(now, first, &mut out);
        while let Ok(input) = stored.try_recv() {
            core.handle(now, input, &mut out);
        }
        for _ in 0..1023 {
            match inputs.try_recv() {
                Ok(input) => core.handle(now, input, &mut out),
                Err(_) => break,
            }
        }
        if core.poll_timeout().is_some_and(|t| t <= now) {
            core.handle(now, Input::Tick, &mut out);
        }
        recorder.record(&core, &out);
        recorder.refresh(now, &core);
        let mut batch = Batch::default();
        for o in out.drain(..) {
            match o {
                Output::Persist(r) => batch.records.push(r),
                Output::ToWorker {
                    peer,
                    msg: msg @ (BrokerMessage::Assign(_) | BrokerMessage::Cancel(_)),
                } => downstream.workers.send(peer, frame::encode_body(&msg)),
                Output::Artifact(op @ ArtifactOp::Delete { .. }) => {
                    batch.after.push(Output::Artifact(op))
                }
                Output::Artifact(op) => {
                    if artifacts.send(op).await.is_err() {
                        tracing::error!("artifact thread is gone");
                    }
                }
                other => batch.after.push(other),
            }
        }
        if !(batch.records.is_empty() && batch.after.is_empty())
            && downstream.commits.send(batch).await.is_err()
        {
            return Err(BrokerError::CommitFailed("committer stopped".into()));
        }
    }
    // Dropping `commits` lets the committer finish what it has and exit.
    Ok(())
}

/// Where a router pass's outputs go: records and everything that must follow
/// them through the committer; assignments straight to the workers, because
/// they need not wait for their records (see `Job::attempt_reserve`), so a
/// worker's next job does not wait for the fsync of its last result.
///
/// Cancels go straight too, so that a worker sees them in the order the core
/// made them relative to assignments: a more urgent job that takes a held job's
/// place is a Cancel of the held one then an Assign, and a worker that got the
/// Assign first would refuse it as one hold too many. A cancel needs no record
/// first: if the broker dies before the commit, the recovered job is still
/// held by or running on that worker, which requeues it (no longer held) or
/// reports it cancelled, which is what the cancel asked for.
struct Downstream {
    commits: mpsc::Sender<Batch>,
    workers: Arc<Outbox>,
}

/// Where the committer sends things.
struct Dispatch {
    clients: Arc<Outbox>,
    workers: Arc<Outbox>,
    events: Option<Publisher>,
    artifacts: mpsc::Sender<ArtifactOp>,
}

fn dispatch(ctx: &Dispatch, o: Output) {
    match o {
        Output::Reply { peer, reply } => ctx.clients.send(peer, frame::encode_body(&reply)),
        Output::ToWorker { peer, msg } => ctx.workers.send(peer, frame::encode_body(&msg)),
        Output::Publish(event) => {
            let frames = vec![
                Bytes::from(event.topic()),
                Bytes::from_static(PROTOCOL_TAG),
                frame::encode_body(&event),
            ];
            // PUB is lossy by design; a follower that misses events resyncs.
            if let Some(events) = &ctx.events {
                let _ = events.send(frames);
            }
        }
        Output::Artifact(op) => {
            let _ = ctx.artifacts.blocking_send(op);
        }
        Output::Persist(_) => unreachable!("records are committed, not dispatched"),
    }
}

fn artifact_loop(
    mut store: ArtifactStore,
    mut ops: mpsc::Receiver<ArtifactOp>,
    clients: Arc<Outbox>,
    stored: mpsc::UnboundedSender<Input>,
) {
    // A failed write poisons that attempt's upload; finalize then reports it.
    let mut broken: HashMap<(kiln_protocol::JobId, u32), String> = HashMap::new();
    while let Some(op) = ops.blocking_recv() {
        match op {
            ArtifactOp::Write {
                job_id,
                attempt,
                index,
                name: _,
                offset,
                data,
            } => {
                // After the first failure (a full disk, say) the rest of the upload
                // is skipped, and that first cause is the one reported.
                if broken.contains_key(&(job_id, attempt)) {
                    continue;
                }
                if let Err(e) = store.write(job_id, attempt, index, offset, &data) {
                    tracing::warn!(job = %job_id, attempt, "{e}");
                    broken.insert((job_id, attempt), e);
                }
            }
            ArtifactOp::Finalize {
                job_id,
                attempt,
                outputs,
            } => {
                let result = match broken.remove(&(job_id, attempt)) {
                    Some(e) => {
                        store.discard(job_id, attempt);
                        Err(e)
                    }
                    None => store.finalize(job_id, attempt, &outputs),
                };
                if stored
                    .send(Input::ArtifactsStored {
                        job_id,
                        attempt,
                        result,
                    })
                    .is_err()
                {
                    return;
                }
            }
            ArtifactOp::Discard { job_id, attempt } => {
                broken.remove(&(job_id, attempt));
                store.discard(job_id, attempt);
            }
            ArtifactOp::Read {
                peer,
                req_id,
                meta,
                offset,
                len,
            } => {
                let reply = match store.read(&meta, offset, len) {
                    Ok(data) => Reply::Chunk(Chunk {
                        req_id,
                        artifact_id: meta.id,
                        offset,
                        total: meta.size,
                        sha256: meta.sha256.clone(),
                        media_type: meta.media_type.clone(),
                        name: meta.name.clone(),
                        eof: offset + data.len() as u64 >= meta.size,
                        data,
                    }),
                    Err(e) => {
                        tracing::error!(artifact = %meta.id, error = %e, "cannot read artifact");
                        Reply::error(
                            Some(req_id),
                            ErrorBody::new(
                                ErrorCode::Internal,
                                format!("cannot read artifact {}: {e}", meta.id),
                            ),
                        )
                    }
                };
                clients.send(peer, frame::encode_body(&reply));
            }
            ArtifactOp::Delete { job_id } => store.delete(job_id),
        }
    }
}

/// Sends to the peers of one ROUTER. The transport bounds each peer's queue and
/// reports a peer that stops reading ([`Routed::Stalled`]), so sending never waits.
struct Outbox(RouterTx);

impl Outbox {
    fn send(&self, peer: PeerId, body: Bytes) {
        self.0
            .send(peer, vec![Bytes::from_static(PROTOCOL_TAG), body]);
    }
}
