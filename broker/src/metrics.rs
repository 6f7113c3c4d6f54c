//! The broker's Prometheus metrics, counted by the shell from what the core does.
//!
//! The core stays free of I/O and of any metrics library: the router task reads
//! each pass's outputs (replies, assignments, state events) and the core's plain
//! counters ([`crate::core::Stats`]) and gauges (queue, workers, sessions,
//! artifact bytes) after `handle`, and updates the atomics here. The committer
//! times its commits. Serving them is [`kiln_metrics::serve`]'s task, which only
//! reads the registry: the event loop never answers a scrape.
//!
//! Names, labels and units are listed in docs/metrics.md.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use kiln_protocol::event::JobStateEvent;
use kiln_protocol::worker::{BrokerMessage, WorkerState};
use kiln_protocol::{Backend, ErrorCode, Event, JobState, Reply};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::core::{Core, Output, Stats};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BackendLabels {
    backend: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    backend: &'static str,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct QueueLabels {
    backend: &'static str,
    priority: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CodeLabels {
    code: String,
}

type Histograms<L> = Family<L, Histogram, fn() -> Histogram>;

fn job_durations() -> Histogram {
    Histogram::new(kiln_metrics::duration_buckets())
}

/// Every metric the broker exports; shared between the router task (which
/// updates it), the committer thread and the metrics endpoint (which reads it).
pub struct BrokerMetrics {
    registry: Arc<Registry>,
    submitted: Family<BackendLabels, Counter>,
    finished: Family<OutcomeLabels, Counter>,
    queue_depth: Family<QueueLabels, Gauge>,
    wait_seconds: Histograms<BackendLabels>,
    run_seconds: Histograms<OutcomeLabels>,
    attempts: Family<BackendLabels, Counter>,
    requeues: Counter,
    oom_retries: Counter,
    degrades: Counter,
    model_loads: Counter,
    workers: Family<StateLabels, Gauge>,
    commit_seconds: Histogram,
    log_bytes: Gauge,
    artifact_bytes: Gauge,
    refused: Family<CodeLabels, Counter>,
    clients: Gauge,
}

impl std::fmt::Debug for BrokerMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BrokerMetrics").finish_non_exhaustive()
    }
}

const WORKER_STATES: [WorkerState; 4] = [
    WorkerState::Idle,
    WorkerState::Busy,
    WorkerState::Unhealthy,
    WorkerState::Offline,
];

impl BrokerMetrics {
    pub fn new() -> BrokerMetrics {
        let mut r = Registry::default();
        let submitted = Family::<BackendLabels, Counter>::default();
        r.register(
            "kiln_broker_jobs_submitted",
            "Jobs accepted at submit (not counting idempotent duplicates), by backend",
            submitted.clone(),
        );
        let finished = Family::<OutcomeLabels, Counter>::default();
        r.register(
            "kiln_broker_jobs_finished",
            "Jobs that ended, by backend and outcome (succeeded, failed, cancelled)",
            finished.clone(),
        );
        let queue_depth = Family::<QueueLabels, Gauge>::default();
        r.register(
            "kiln_broker_queue_depth",
            "Jobs waiting in the queue, by backend and priority (refreshed every second)",
            queue_depth.clone(),
        );
        let wait_seconds: Histograms<BackendLabels> = Family::new_with_constructor(job_durations);
        r.register(
            "kiln_broker_job_wait_seconds",
            "Time from entering the queue (submit or requeue) to starting on a worker, by backend",
            wait_seconds.clone(),
        );
        let run_seconds: Histograms<OutcomeLabels> = Family::new_with_constructor(job_durations);
        r.register(
            "kiln_broker_job_run_seconds",
            "Time from the start of a job's last attempt to its end, by backend and outcome",
            run_seconds.clone(),
        );
        let attempts = Family::<BackendLabels, Counter>::default();
        r.register(
            "kiln_broker_job_attempts",
            "Attempts started (assignments sent to workers), by backend",
            attempts.clone(),
        );
        let requeues = Counter::default();
        r.register(
            "kiln_broker_job_requeues",
            "Running jobs put back in line (a retryable failure, a lost worker)",
            requeues.clone(),
        );
        let oom_retries = Counter::default();
        r.register(
            "kiln_broker_oom_retries",
            "Out-of-memory failures requeued for another attempt (bigger GPU or lower setting)",
            oom_retries.clone(),
        );
        let degrades = Counter::default();
        r.register(
            "kiln_broker_oom_degrades",
            "Out-of-memory retries one setting lower because no GPU in the fleet has more memory",
            degrades.clone(),
        );
        let model_loads = Counter::default();
        r.register(
            "kiln_broker_model_loads",
            "Times a worker reported a different model loaded than before",
            model_loads.clone(),
        );
        let workers = Family::<StateLabels, Gauge>::default();
        r.register(
            "kiln_broker_workers",
            "Workers the broker knows, by state (idle, busy, unhealthy, offline)",
            workers.clone(),
        );
        for s in WORKER_STATES {
            workers
                .get_or_create(&StateLabels { state: s.as_str() })
                .set(0);
        }
        let commit_seconds = Histogram::new(kiln_metrics::fast_buckets());
        r.register(
            "kiln_broker_store_commit_seconds",
            "Duration of one group commit of the job store (log append, fsync, redb)",
            commit_seconds.clone(),
        );
        let log_bytes = Gauge::default();
        r.register(
            "kiln_broker_store_log_bytes",
            "Size of the job store's write-ahead log (jobs.wal) after the last commit",
            log_bytes.clone(),
        );
        let artifact_bytes = Gauge::default();
        r.register(
            "kiln_broker_artifact_bytes",
            "Bytes of stored job outputs",
            artifact_bytes.clone(),
        );
        let refused = Family::<CodeLabels, Counter>::default();
        r.register(
            "kiln_broker_requests_refused",
            "Client requests answered with an error, by error code",
            refused.clone(),
        );
        let clients = Gauge::default();
        r.register(
            "kiln_broker_clients_connected",
            "Client connections that said hello (idle ones are forgotten after an hour)",
            clients.clone(),
        );
        BrokerMetrics {
            registry: Arc::new(r),
            submitted,
            finished,
            queue_depth,
            wait_seconds,
            run_seconds,
            attempts,
            requeues,
            oom_retries,
            degrades,
            model_loads,
            workers,
            commit_seconds,
            log_bytes,
            artifact_bytes,
            refused,
            clients,
        }
    }

    /// The registry to serve.
    pub fn registry(&self) -> Arc<Registry> {
        self.registry.clone()
    }

    /// One group commit of the store took `took`; the log is now `log_bytes` long.
    pub fn observe_commit(&self, took: Duration, log_bytes: u64) {
        self.commit_seconds.observe(took.as_secs_f64());
        self.log_bytes.set(log_bytes as i64);
    }
}

impl Default for BrokerMetrics {
    fn default() -> Self {
        Self::new()
    }
}

/// The router task's side: turns a pass's outputs and the core's counters into
/// metric updates. Owned by the router task, so it needs no lock.
pub struct Recorder {
    metrics: Arc<BrokerMetrics>,
    /// The core's counters at the last sync, to add only what is new.
    last: Stats,
    /// Queue label sets ever set, so a drained queue shows 0 instead of vanishing.
    queue_labels: HashSet<QueueLabels>,
    next_refresh_ms: u64,
}

/// How often gauges that cost a walk over the queue or the workers are refreshed.
const REFRESH_MS: u64 = 1_000;

impl Recorder {
    pub fn new(metrics: Arc<BrokerMetrics>, core: &Core) -> Recorder {
        Recorder {
            metrics,
            // Counters restored by recovery are history, not news of this process.
            last: core.stats().clone(),
            queue_labels: HashSet::new(),
            next_refresh_ms: 0,
        }
    }

    /// Counts what one router pass produced. Call after `handle`, before the
    /// outputs are passed on.
    pub fn record(&mut self, core: &Core, outputs: &[Output]) {
        let m = &*self.metrics;
        for o in outputs {
            match o {
                Output::Reply { reply, .. } => match reply {
                    Reply::Accepted(a) if !a.duplicate => {
                        if let Some(job) = core.job(a.job_id) {
                            m.submitted.get_or_create(&backend(job.spec.backend)).inc();
                        }
                    }
                    Reply::Error(e) => {
                        m.refused
                            .get_or_create(&CodeLabels {
                                code: code_name(e.error.code),
                            })
                            .inc();
                    }
                    _ => {}
                },
                Output::ToWorker {
                    msg: BrokerMessage::Assign(a),
                    ..
                } => {
                    m.attempts.get_or_create(&backend(a.job.backend)).inc();
                }
                Output::Publish(Event::JobState(e)) => self.job_state(core, e),
                _ => {}
            }
        }
        self.sync_stats(core.stats());
    }

    /// A state event: a start observes the wait, an end the outcome and run time.
    fn job_state(&self, core: &Core, e: &JobStateEvent) {
        let m = &*self.metrics;
        let Some(job) = core.job(e.job_id) else {
            return;
        };
        let started = e.state == JobState::Running && !e.cancel_requested;
        if !(started || e.state.is_terminal()) {
            return;
        }
        // The transition this event announces, and the one before it (the job may
        // have moved on within the same pass).
        let history = &job.history;
        let Some(at) = history
            .iter()
            .rposition(|t| t.state == e.state && t.at_ms == e.at_ms && t.attempt == e.attempt)
        else {
            return;
        };
        let before = at.checked_sub(1).map(|i| &history[i]);
        let b = job.spec.backend.as_str();
        if started {
            if let Some(q) = before.filter(|t| t.state == JobState::Queued) {
                m.wait_seconds
                    .get_or_create(&BackendLabels { backend: b })
                    .observe(secs(e.at_ms.saturating_sub(q.at_ms)));
            }
            return;
        }
        let labels = OutcomeLabels {
            backend: b,
            outcome: e.state.as_str(),
        };
        m.finished.get_or_create(&labels).inc();
        if let Some(r) = before.filter(|t| t.state == JobState::Running) {
            m.run_seconds
                .get_or_create(&labels)
                .observe(secs(e.at_ms.saturating_sub(r.at_ms)));
        }
    }

    fn sync_stats(&mut self, now: &Stats) {
        let m = &*self.metrics;
        let last = &self.last;
        m.requeues
            .inc_by(now.requeues.saturating_sub(last.requeues));
        m.oom_retries
            .inc_by(now.oom_retries.saturating_sub(last.oom_retries));
        m.degrades
            .inc_by(now.degrades.saturating_sub(last.degrades));
        m.model_loads
            .inc_by(now.model_loads.saturating_sub(last.model_loads));
        self.last = now.clone();
    }

    /// Refreshes the gauges read from the core's tables, at most once a second.
    pub fn refresh(&mut self, now_ms: u64, core: &Core) {
        if now_ms < self.next_refresh_ms {
            return;
        }
        self.next_refresh_ms = now_ms + REFRESH_MS;
        let m = &*self.metrics;
        let depths = core.queue().depths();
        for ((b, priority), n) in &depths {
            let labels = QueueLabels {
                backend: b.as_str(),
                priority: priority.to_string(),
            };
            m.queue_depth.get_or_create(&labels).set(*n as i64);
            self.queue_labels.insert(labels);
        }
        for labels in &self.queue_labels {
            let key = (backend_of(labels.backend), labels.priority.parse().ok());
            if let (Some(b), Some(p)) = key {
                if !depths.contains_key(&(b, p)) {
                    m.queue_depth.get_or_create(labels).set(0);
                }
            }
        }
        let mut counts = [0i64; WORKER_STATES.len()];
        for (_, w) in core.workers().iter() {
            let state = w.state();
            if let Some(i) = WORKER_STATES.iter().position(|s| *s == state) {
                counts[i] += 1;
            }
        }
        for (s, n) in WORKER_STATES.iter().zip(counts) {
            m.workers
                .get_or_create(&StateLabels { state: s.as_str() })
                .set(n);
        }
        m.artifact_bytes.set(core.artifact_bytes() as i64);
        m.clients.set(core.sessions() as i64);
    }
}

fn backend(b: Backend) -> BackendLabels {
    BackendLabels {
        backend: b.as_str(),
    }
}

fn backend_of(name: &str) -> Option<Backend> {
    Backend::ALL.into_iter().find(|b| b.as_str() == name)
}

fn secs(ms: u64) -> f64 {
    ms as f64 / 1000.0
}

/// The code as it appears on the wire (`queue_full`), from its serde name.
fn code_name(code: ErrorCode) -> String {
    serde_json::to_value(code)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_else(|| "unknown".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_codes_are_labelled_by_their_wire_names() {
        assert_eq!(code_name(ErrorCode::QueueFull), "queue_full");
        assert_eq!(code_name(ErrorCode::NotFound), "not_found");
    }

    #[test]
    fn every_worker_state_is_exported_from_the_start() {
        let m = BrokerMetrics::new();
        let text = kiln_metrics::encode(&m.registry());
        for s in ["idle", "busy", "unhealthy", "offline"] {
            assert!(
                text.contains(&format!("kiln_broker_workers{{state=\"{s}\"}} 0")),
                "{text}"
            );
        }
    }
}
