//! The broker's logic as a state machine without I/O.
//!
//! [`Core::handle`] takes the time and one [`Input`] (a decoded client request, a
//! worker message, a completed artifact operation, a tick) and appends
//! [`Output`]s: messages to send, events to publish, records to persist and
//! artifact operations to perform. [`Core::poll_timeout`] says when the next tick is
//! due. Nothing here touches a socket, a file or the clock, so the whole scheduler,
//! the heartbeats, requeues and cancels are tested deterministically with a
//! simulated clock, and a simulation of 1,000 workers and a million jobs runs in a
//! benchmark. The socket shell in [`crate::net`] drives it.
//!
//! Every change of a job's state goes through [`lifecycle`], which records the
//! transition, bumps the job's sequence number, persists it and publishes it.

mod clients;
pub mod costs;
pub mod job;
mod lifecycle;
mod params_check;
mod pipeline;
pub mod placement;
pub mod queue;
pub mod record;
mod recovery;
pub mod registry;
pub(crate) mod results;
mod retention;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_contract;
#[cfg(test)]
mod tests_goodbye;
#[cfg(test)]
mod tests_properties;
mod timers;
mod waiting;
pub(crate) mod workers;

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet};
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::Arc;

use kiln_protocol::worker::{BrokerMessage, OutputMeta, WorkerMessage};
use kiln_protocol::{ArtifactMeta, Event, JobId, Limits, ProtocolError, Reply, Request};

pub use job::Job;
pub use queue::{Queue, Requirements};
pub use registry::{FleetRecord, PeerId, Registry, Worker, WorkerIdx};
use timers::{Timer, TimerKind};

/// The core's settings, derived from the broker config.
#[derive(Debug, Clone)]
pub struct CoreConfig {
    pub heartbeat_ms: u64,
    pub liveness: u32,
    pub default_max_attempts: u8,
    /// 0 = jobs may wait forever.
    pub default_queue_timeout_s: u32,
    /// 0 = no run timeout.
    pub default_run_timeout_s: u32,
    pub cancel_grace_ms: u64,
    pub fleet_memory_ms: u64,
    pub limits: Limits,
    pub client_token: Option<String>,
    pub worker_token: Option<String>,
    /// Emit [`Record`]s for a store. Off for the in-memory broker and benchmarks.
    pub persist: bool,
    /// Write job state records in the named encoding (version 1) of the releases
    /// before the positional one, which those releases can read back
    /// (`broker.named_state_records`, for a rollback across that change); the core
    /// bench's baseline. See [`record`].
    pub named_records: bool,
    /// Finished jobs older than this are removed (0 = never).
    pub retention_max_age_ms: u64,
    /// Oldest finished jobs are removed while artifacts exceed this (0 = no limit).
    pub retention_max_bytes: u64,
    pub retention_sweep_ms: u64,
    /// Most attempts a worker may hold besides the one it runs (pipelined
    /// dispatch); each worker advertises its own depth, capped by this. 0 turns
    /// pipelining off.
    pub max_held: u8,
    /// Placement counts model loads (see [`placement`]); off = the queue's order
    /// alone, as before pipelining (a baseline for the fleet benchmark).
    pub load_aware: bool,
    /// The fairness bound of load-aware placement
    /// (`broker.placement.fairness_bound_s`): a job at the head of its client's
    /// line that has waited this long goes before any warm work, on a worker
    /// that has its model warm or for which a load pays.
    pub affinity_max_wait_ms: u64,
    /// How much a model load weighs against waiting
    /// (`broker.placement.load_weight`): a GPU without a model loads it for a
    /// job only when the model's waiting work per warm GPU exceeds this many
    /// times its load time, or once idle GPUs were left idle that long for it
    /// (see [`placement`]). Lower finishes each model's queue sooner; higher
    /// trades waiting for fewer loads (each load may also evict a model that is
    /// needed again).
    pub load_weight: f64,
}

impl Default for CoreConfig {
    fn default() -> Self {
        // One source for the placement defaults: the config's.
        let placement = kiln_config::PlacementConfig::default();
        CoreConfig {
            heartbeat_ms: kiln_protocol::HEARTBEAT_INTERVAL_MS,
            liveness: kiln_protocol::HEARTBEAT_LIVENESS,
            default_max_attempts: 3,
            default_queue_timeout_s: 0,
            default_run_timeout_s: 0,
            cancel_grace_ms: 30_000,
            fleet_memory_ms: 600_000,
            limits: Limits::default(),
            client_token: None,
            worker_token: None,
            persist: false,
            named_records: false,
            retention_max_age_ms: 0,
            retention_max_bytes: 0,
            retention_sweep_ms: 60_000,
            max_held: 4,
            load_aware: true,
            affinity_max_wait_ms: placement.fairness_bound_s * 1000,
            load_weight: placement.load_weight,
        }
    }
}

impl CoreConfig {
    /// How long a worker may stay silent before it is declared dead.
    pub fn liveness_ms(&self) -> u64 {
        self.heartbeat_ms * self.liveness as u64
    }
}

/// Something that happened, for the core to react to.
#[derive(Debug)]
pub enum Input {
    /// A decoded request from a client connection.
    Request { peer: PeerId, request: Request },
    /// A client message that failed to decode or check.
    BadRequest {
        peer: PeerId,
        req_id: Option<u64>,
        error: ProtocolError,
    },
    /// A decoded message from a worker connection.
    Worker { peer: PeerId, msg: WorkerMessage },
    /// A worker message that failed to decode.
    BadWorkerMessage { peer: PeerId, error: ProtocolError },
    /// The artifact store finished verifying a job's outputs.
    ArtifactsStored {
        job_id: JobId,
        attempt: u32,
        result: Result<Vec<ArtifactMeta>, String>,
    },
    /// Messages to this peer are being dropped (its queue overflowed or its send
    /// timed out). A worker counts as lost; a client keeps its session, since its
    /// connection and identity are unchanged.
    PeerUnreachable { peer: PeerId, worker: bool },
    /// The connection behind this routing id ended or was replaced: whatever it
    /// proved (`hello`, `register`) is void, so nobody inherits it by reusing the id.
    PeerGone { peer: PeerId, worker: bool },
    /// The store stopped writing (`Some(cause)`, e.g. a full disk) or writes again
    /// (`None`). While it cannot write, requests that change state are refused with
    /// `unavailable` naming the cause; reads are answered.
    StoreFault { cause: Option<String> },
    /// Time passed; run whatever is due.
    Tick,
}

/// Something the shell must do.
#[derive(Debug, Clone)]
pub enum Output {
    Reply { peer: PeerId, reply: Reply },
    ToWorker { peer: PeerId, msg: BrokerMessage },
    Publish(Event),
    Persist(Record),
    Artifact(ArtifactOp),
}

/// A durable write. Every job transition produces its full record.
#[derive(Debug, Clone)]
pub enum Record {
    /// A job's spec, written once at submit.
    Spec {
        id: JobId,
        bytes: Vec<u8>,
    },
    /// A job's state, rewritten on every transition.
    Job {
        id: JobId,
        bytes: Vec<u8>,
    },
    /// Removes both records of a job (retention).
    DeleteJob(JobId),
    Worker {
        id: String,
        bytes: Vec<u8>,
    },
    DeleteWorker(String),
}

/// Work for the artifact store.
#[derive(Debug, Clone)]
pub enum ArtifactOp {
    /// Append an uploaded piece to the attempt's staging file.
    Write {
        job_id: JobId,
        attempt: u32,
        index: u16,
        name: String,
        offset: u64,
        data: Vec<u8>,
    },
    /// Check sizes and hashes of the staged outputs and move them into place; the
    /// store answers with [`Input::ArtifactsStored`].
    Finalize {
        job_id: JobId,
        attempt: u32,
        outputs: Vec<OutputMeta>,
    },
    /// Drop the staged outputs of an attempt that will not complete.
    Discard { job_id: JobId, attempt: u32 },
    /// Read a piece of a stored artifact and send it to a client.
    Read {
        peer: PeerId,
        req_id: u64,
        meta: ArtifactMeta,
        offset: u64,
        len: u64,
    },
    /// Remove all files of a job (retention).
    Delete { job_id: JobId },
}

/// A client connection the broker has let in.
#[derive(Debug)]
struct Session {
    name: Arc<str>,
    last_seen_ms: u64,
}

/// Counters for `health` and the metrics (which the shell reads after `handle`).
#[derive(Debug, Default, Clone)]
pub struct Stats {
    pub protocol_errors: u64,
    pub submitted: u64,
    pub succeeded: u64,
    pub failed: u64,
    pub cancelled: u64,
    pub stale_results: u64,
    /// Running jobs put back in line (a retryable failure, a lost worker).
    pub requeues: u64,
    /// Out-of-memory failures requeued for another attempt (on a GPU with more
    /// memory, or one setting lower).
    pub oom_retries: u64,
    /// Of those, the ones retried one setting lower (no bigger GPU in the fleet).
    pub degrades: u64,
    /// Times a worker reported a different model loaded than before.
    pub model_loads: u64,
}

/// Hashes job ids, which the broker itself hands out (so they need no protection
/// against flooding), with one multiplication instead of SipHash.
#[derive(Default)]
pub struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0.rotate_left(8) ^ *b as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        }
    }

    fn write_u64(&mut self, n: u64) {
        // Fibonacci hashing spreads sequential ids over the high bits hashbrown uses.
        self.0 = (self.0 ^ n).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
}

/// All broker state; see the module docs.
pub struct Core {
    cfg: CoreConfig,
    /// Boxed so the table's slack costs a pointer per slot, not a whole job.
    jobs: HashMap<JobId, Box<Job>, BuildHasherDefault<IdHasher>>,
    queue: Queue,
    workers: Registry,
    /// Idempotency keys belong to a client: (client name, key) to the job.
    idempotency: HashMap<(Arc<str>, String), JobId>,
    sessions: HashMap<PeerId, Session>,
    refused: HashSet<PeerId>,
    client_names: HashMap<String, Arc<str>>,
    queued_per_client: HashMap<Arc<str>, u64>,
    timers: BinaryHeap<Reverse<Timer>>,
    next_job_id: u64,
    next_enqueue_seq: u64,
    /// Sequence numbers of this boot start above every number of earlier boots.
    seq_floor: u64,
    running: usize,
    artifact_bytes: u64,
    started_ms: u64,
    next_worker_scan_ms: u64,
    next_session_sweep_ms: u64,
    next_retention_ms: u64,
    stats: Stats,
    /// Scratch space of `dispatch`: which job classes the worker can run.
    runnable: Vec<bool>,
    /// Held attempts (pipelined dispatch) by job priority, so a submit can tell
    /// at once whether some held job is less urgent than it.
    held_priorities: std::collections::BTreeMap<i8, u32>,
    /// Scratch space of `pop_for_worker`.
    candidates: Vec<queue::Candidate>,
    /// Why the store cannot write right now, if it cannot.
    store_fault: Option<String>,
    /// Load and generation times learned per model, for placement.
    costs: costs::Costs,
}

impl Core {
    pub fn new(cfg: CoreConfig, now_ms: u64) -> Core {
        Core {
            next_retention_ms: now_ms + cfg.retention_sweep_ms,
            cfg,
            jobs: HashMap::default(),
            queue: Queue::new(),
            workers: Registry::default(),
            idempotency: HashMap::new(),
            sessions: HashMap::new(),
            refused: HashSet::new(),
            client_names: HashMap::new(),
            queued_per_client: HashMap::new(),
            timers: BinaryHeap::new(),
            next_job_id: 1,
            next_enqueue_seq: 1,
            seq_floor: 0,
            running: 0,
            artifact_bytes: 0,
            started_ms: now_ms,
            next_worker_scan_ms: now_ms,
            next_session_sweep_ms: now_ms + 60_000,
            stats: Stats::default(),
            runnable: Vec::new(),
            held_priorities: Default::default(),
            candidates: Vec::new(),
            store_fault: None,
            costs: costs::Costs::default(),
        }
    }

    /// What the core has learned a model costs (load and generation times).
    pub fn model_costs(&self, model: &str) -> costs::ModelCosts {
        self.costs.of(model)
    }

    pub fn config(&self) -> &CoreConfig {
        &self.cfg
    }

    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    pub fn job(&self, id: JobId) -> Option<&Job> {
        self.jobs.get(&id).map(|j| &**j)
    }

    pub fn jobs_len(&self) -> usize {
        self.jobs.len()
    }

    /// Jobs waiting: in line, or held by a busy worker (pipelined dispatch).
    pub fn queued(&self) -> usize {
        self.queue.len() + self.held_priorities.values().sum::<u32>() as usize
    }

    pub fn running(&self) -> usize {
        self.running
    }

    pub fn workers(&self) -> &Registry {
        &self.workers
    }

    pub fn queue(&self) -> &Queue {
        &self.queue
    }

    /// Bytes of stored artifacts.
    pub fn artifact_bytes(&self) -> u64 {
        self.artifact_bytes
    }

    /// Client connections that said `hello` and were not forgotten.
    pub fn sessions(&self) -> usize {
        self.sessions.len()
    }

    /// Reacts to one input. Outputs are appended to `out` in the order they must
    /// happen.
    pub fn handle(&mut self, now_ms: u64, input: Input, out: &mut Vec<Output>) {
        match input {
            Input::Request { peer, request } => self.on_request(now_ms, peer, request, out),
            Input::BadRequest {
                peer,
                req_id,
                error,
            } => self.on_bad_request(now_ms, peer, req_id, error, out),
            Input::Worker { peer, msg } => self.on_worker_message(now_ms, peer, msg, out),
            Input::BadWorkerMessage { peer, error } => {
                self.stats.protocol_errors += 1;
                tracing::warn!(error = %error, "undecodable worker message");
                out.push(Output::ToWorker {
                    peer,
                    msg: BrokerMessage::Error(kiln_protocol::worker::WorkerError {
                        error: error.to_body(),
                    }),
                });
            }
            Input::ArtifactsStored {
                job_id,
                attempt,
                result,
            } => self.on_artifacts_stored(now_ms, job_id, attempt, result, out),
            Input::PeerUnreachable { peer, worker } => {
                if worker {
                    if let Some(idx) = self.workers.by_peer(&peer) {
                        self.worker_lost(now_ms, idx, "its connection stalled or closed", out);
                    }
                } else {
                    // The connection lives and its session with it: the client
                    // misses the replies that were dropped, and it must not come
                    // back as a stranger whose idempotency keys no longer match.
                    tracing::debug!("a client stopped reading; its replies are dropped");
                }
            }
            Input::PeerGone { peer, worker } => {
                if worker {
                    // Its job stays until it registers again or its heartbeats
                    // lapse: a worker that reconnects keeps what it runs.
                    if let Some(idx) = self.workers.by_peer(&peer) {
                        self.workers.detach_peer(idx);
                    }
                } else {
                    self.sessions.remove(&peer);
                    self.refused.remove(&peer);
                }
            }
            Input::StoreFault { cause } => {
                let cleared = cause.is_none() && self.store_fault.is_some();
                let raised = cause.is_some() && self.store_fault.is_none();
                self.store_fault = cause;
                if raised {
                    // A held job would start on its worker without asking: take
                    // them back until the store writes again.
                    let holders: Vec<WorkerIdx> = self
                        .workers
                        .iter()
                        .filter(|(_, w)| !w.held.is_empty())
                        .map(|(idx, _)| idx)
                        .collect();
                    for idx in holders {
                        let held: Vec<JobId> = self
                            .workers
                            .get(idx)
                            .held
                            .iter()
                            .map(|(r, _)| r.job_id)
                            .collect();
                        for id in held {
                            let why = "the broker's store cannot write".to_string();
                            self.requeue_held(now_ms, id, true, why, out);
                        }
                    }
                }
                if cleared {
                    // Assignments held back during the fault start (or are held) now.
                    let workers = self.workers.indices();
                    for idx in workers {
                        self.dispatch(now_ms, idx, out);
                    }
                }
            }
            Input::Tick => self.on_tick(now_ms, out),
        }
    }

    /// When the core next needs a [`Input::Tick`], in ms on the same clock as `now`.
    pub fn poll_timeout(&self) -> Option<u64> {
        let timer = self.timers.peek().map(|Reverse(t)| t.at_ms);
        let scan = (!self.workers.is_empty()).then_some(self.next_worker_scan_ms);
        let retention = (self.cfg.retention_max_age_ms > 0 || self.cfg.retention_max_bytes > 0)
            .then_some(self.next_retention_ms);
        let reoffer = self.next_reoffer_ms();
        [
            timer,
            scan,
            retention,
            reoffer,
            Some(self.next_session_sweep_ms),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    fn on_tick(&mut self, now_ms: u64, out: &mut Vec<Output>) {
        while let Some(Reverse(t)) = self.timers.peek().copied() {
            if t.at_ms > now_ms {
                break;
            }
            self.timers.pop();
            self.on_timer(now_ms, t, out);
        }
        if now_ms >= self.next_worker_scan_ms {
            self.next_worker_scan_ms = now_ms + (self.cfg.heartbeat_ms / 2).max(1);
            self.scan_workers(now_ms, out);
        }
        if self.next_reoffer_ms().is_some_and(|at| at <= now_ms) {
            self.reoffer(now_ms, out);
        }
        if now_ms >= self.next_session_sweep_ms {
            self.next_session_sweep_ms = now_ms + 60_000;
            // Connections idle for an hour are forgotten; they say hello again.
            self.sessions
                .retain(|_, s| now_ms.saturating_sub(s.last_seen_ms) < 3_600_000);
        }
        if now_ms >= self.next_retention_ms {
            self.next_retention_ms = now_ms + self.cfg.retention_sweep_ms.max(1);
            self.apply_retention(now_ms, out);
        }
    }

    /// Interns a client name so that every job of a client shares one allocation.
    fn client_name(&mut self, name: &str) -> Arc<str> {
        if let Some(n) = self.client_names.get(name) {
            return n.clone();
        }
        let n: Arc<str> = Arc::from(name);
        self.client_names.insert(name.to_string(), n.clone());
        n
    }

    /// The job ids of the store's next records must not collide with recovered ones.
    pub fn next_job_id(&self) -> u64 {
        self.next_job_id
    }
}
