//! The live picture every open page shares: workers, running jobs and queue
//! counts, kept current by one task that owns it (no lock shared with the HTTP
//! handlers) and published as one JSON document through a `watch` channel.
//!
//! Two sources feed it: the broker's event stream (`job/…`, `worker/…`), which
//! moves progress bars the moment a worker reports, and a poll of `workers`,
//! `list` (running jobs) and `health` every `dashboard.poll_ms`, which repairs
//! anything the lossy PUB socket dropped. A broker that keeps its events port
//! closed (client tokens without CURVE) leaves the stream silent, and the poll
//! alone keeps the pages current, as the CLI's `get` polling does.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use kiln_protocol::event::{JobProgressEvent, JobStateEvent, WorkerStateEvent};
use kiln_protocol::worker::WorkerInfo;
use kiln_protocol::{unix_ms, Client, Event, JobId, JobSnapshot, JobState, ListFilter};
use serde::Serialize;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// Most running jobs asked for per poll (a fleet runs one per GPU).
const MAX_RUNNING: u64 = 1000;
/// Changes are published at most this often, so a burst of progress events
/// costs the browsers one update, not hundreds.
const PUBLISH_EVERY: Duration = Duration::from_millis(200);

/// The document `/api/live` returns and `/api/events` streams.
#[derive(Debug, Clone, Serialize, Default)]
pub struct LiveView {
    /// When this view was made, milliseconds since the Unix epoch.
    pub at_ms: u64,
    pub broker: BrokerStatus,
    /// Every worker the broker knows, online or not, by worker id.
    pub workers: Vec<WorkerInfo>,
    /// Running jobs with their progress and estimated time left, oldest first.
    pub running: Vec<ActiveJob>,
    pub queue: QueueSummary,
}

/// Whether the dashboard reaches the broker, and how it learns of changes.
#[derive(Debug, Clone, Serialize, Default)]
pub struct BrokerStatus {
    pub connected: bool,
    /// The last error talking to the broker, while not connected.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// When the last event arrived (none yet: the events port may be closed, and
    /// the pages then refresh every `poll_ms`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_event_ms: Option<u64>,
    pub poll_ms: u64,
}

/// A running job as the pages show it.
#[derive(Debug, Clone, Serialize)]
pub struct ActiveJob {
    #[serde(flatten)]
    pub job: JobSnapshot,
    /// Seconds left at the rate progress was made so far in this attempt; absent
    /// until the rate is known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eta_s: Option<f64>,
}

/// Queue counts from the broker's `health`, and a number that changes whenever a
/// job enters or leaves the queue (the Queue page reloads its list then).
#[derive(Debug, Clone, Serialize, Default)]
pub struct QueueSummary {
    pub queued: u64,
    pub running: u64,
    pub finished: u64,
    pub version: u64,
}

/// Estimates the time left of running attempts from the rate of their progress:
/// the first report of an attempt is the origin, and the rate is the progress
/// since then over the time since then. Model loads before the first report do
/// not count against the rate.
#[derive(Debug, Default)]
pub struct EtaTracker {
    origins: HashMap<(JobId, u32), (u64, f64)>,
}

impl EtaTracker {
    /// Records `pct` (0–100) of `attempt` at `now_ms` and returns the seconds left,
    /// once at least half a second and some progress separate it from the origin.
    pub fn observe(&mut self, job: JobId, attempt: u32, pct: f64, now_ms: u64) -> Option<f64> {
        let origin = self.origins.entry((job, attempt)).or_insert((now_ms, pct));
        if pct < origin.1 || now_ms < origin.0 {
            *origin = (now_ms, pct);
        }
        let seconds = (now_ms - origin.0) as f64 / 1000.0;
        let done = pct - origin.1;
        if seconds < 0.5 || done <= 0.0 || !(0.0..100.0).contains(&pct) {
            return None;
        }
        Some((100.0 - pct) * seconds / done)
    }

    /// Forgets attempts that are no longer running.
    pub fn retain(&mut self, running: &BTreeMap<JobId, ActiveJob>) {
        self.origins.retain(|(job, attempt), _| {
            running.get(job).is_some_and(|j| j.job.attempt == *attempt)
        });
    }
}

/// Settings of the live feed.
#[derive(Debug, Clone)]
pub struct FeedSettings {
    pub poll: Duration,
}

/// The feed's own state; only its task touches it.
#[derive(Default)]
struct State {
    status: BrokerStatus,
    workers: Vec<WorkerInfo>,
    running: BTreeMap<JobId, ActiveJob>,
    queue: QueueSummary,
    eta: EtaTracker,
}

/// Starts the feed task; the returned receiver always holds the latest view.
pub fn start(
    client: Client,
    settings: FeedSettings,
    shutdown: CancellationToken,
) -> watch::Receiver<Arc<str>> {
    let (tx, rx) = watch::channel(Arc::<str>::from(
        serde_json::to_string(&LiveView::default()).expect("serializable"),
    ));
    tokio::spawn(run(client, settings, tx, shutdown));
    rx
}

async fn run(
    client: Client,
    settings: FeedSettings,
    tx: watch::Sender<Arc<str>>,
    shutdown: CancellationToken,
) {
    let mut state = State::default();
    state.status.poll_ms = settings.poll.as_millis() as u64;
    // An empty prefix matches every topic: jobs and workers.
    let mut events = match client.subscribe("").await {
        Ok(e) => Some(e),
        Err(e) => {
            tracing::warn!(error = %e, "cannot subscribe to the broker's events; polling only");
            None
        }
    };
    let mut poll = tokio::time::interval(settings.poll);
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut publish = tokio::time::interval(PUBLISH_EVERY);
    publish.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut dirty = true;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = poll.tick() => {
                refresh(&client, &mut state).await;
                dirty = true;
            }
            event = next_event(&mut events) => match event {
                Some(event) => {
                    state.status.last_event_ms = Some(unix_ms());
                    dirty |= apply(&client, &mut state, event).await;
                }
                None => events = None,
            },
            _ = publish.tick(), if dirty => {
                dirty = false;
                let view = view(&state);
                let json = serde_json::to_string(&view).expect("serializable");
                tx.send_replace(Arc::from(json));
            }
        }
    }
}

async fn next_event(events: &mut Option<kiln_protocol::client::EventStream>) -> Option<Event> {
    match events {
        Some(e) => e.recv().await,
        None => std::future::pending().await,
    }
}

fn view(state: &State) -> LiveView {
    let mut running: Vec<ActiveJob> = state.running.values().cloned().collect();
    running.sort_by_key(|j| (j.job.started_ms.unwrap_or(j.job.created_ms), j.job.job_id));
    LiveView {
        at_ms: unix_ms(),
        broker: state.status.clone(),
        workers: state.workers.clone(),
        running,
        queue: state.queue.clone(),
    }
}

/// Asks the broker for everything the view holds.
async fn refresh(client: &Client, state: &mut State) {
    let filter = ListFilter {
        states: vec![JobState::Running],
        limit: Some(MAX_RUNNING),
        ..ListFilter::default()
    };
    let (workers, running, health) =
        tokio::join!(client.workers(), client.list(filter), client.health());
    let error = match (&workers, &running, &health) {
        (Err(e), _, _) | (_, Err(e), _) | (_, _, Err(e)) => Some(e.to_string()),
        _ => None,
    };
    state.status.connected = error.is_none();
    state.status.error = error;
    if let Ok(mut workers) = workers {
        workers.sort_by(|a, b| a.worker_id.cmp(&b.worker_id));
        state.workers = workers;
    }
    if let Ok(running) = running {
        let mut fresh = BTreeMap::new();
        for job in running {
            let id = job.job_id;
            // An event may have brought a newer snapshot than the list.
            let entry = match state.running.remove(&id) {
                Some(old) if old.job.seq > job.seq => old,
                Some(old) => ActiveJob {
                    job,
                    eta_s: old.eta_s,
                },
                None => ActiveJob { job, eta_s: None },
            };
            fresh.insert(id, entry);
        }
        state.running = fresh;
        state.eta.retain(&state.running);
    }
    if let Ok(health) = health {
        if health.queued != state.queue.queued || health.finished != state.queue.finished {
            state.queue.version += 1;
        }
        state.queue.queued = health.queued;
        state.queue.running = health.running;
        state.queue.finished = health.finished;
        state.status.version = Some(health.version);
    }
}

/// Folds one event into the state; returns whether anything shown changed.
async fn apply(client: &Client, state: &mut State, event: Event) -> bool {
    match event {
        Event::JobProgress(e) => on_progress(client, state, e).await,
        Event::JobState(e) => on_job_state(client, state, e).await,
        Event::WorkerState(e) => on_worker_state(client, state, e).await,
    }
}

async fn on_progress(client: &Client, state: &mut State, e: JobProgressEvent) -> bool {
    let now = unix_ms();
    match state.running.get_mut(&e.job_id) {
        Some(active) => {
            if e.seq <= active.job.seq {
                return false;
            }
            active.job.seq = e.seq;
            active.job.attempt = e.attempt;
            active.job.worker = Some(e.worker.to_string());
            if !e.gpu.is_empty() {
                active.job.gpu = Some(e.gpu.to_string());
            }
            active.eta_s = state.eta.observe(e.job_id, e.attempt, e.progress.pct, now);
            active.job.progress = Some(e.progress);
            true
        }
        // A job that started since the last poll.
        None => track(client, state, e.job_id).await,
    }
}

async fn on_job_state(client: &Client, state: &mut State, e: JobStateEvent) -> bool {
    state.queue.version += 1;
    match e.state {
        JobState::Running => {
            if state
                .running
                .get(&e.job_id)
                .is_some_and(|j| j.job.seq >= e.seq)
            {
                return true;
            }
            track(client, state, e.job_id).await;
        }
        _ => {
            state.running.remove(&e.job_id);
            state.eta.retain(&state.running);
        }
    }
    true
}

async fn on_worker_state(client: &Client, state: &mut State, e: WorkerStateEvent) -> bool {
    match state
        .workers
        .iter_mut()
        .find(|w| *w.worker_id == *e.worker_id)
    {
        Some(w) if e.state != kiln_protocol::worker::WorkerState::Offline => {
            w.state = e.state;
            w.current_job = e.job_id;
        }
        // A new worker, or one that went away (its reason comes with `workers`).
        _ => {
            if let Ok(mut workers) = client.workers().await {
                workers.sort_by(|a, b| a.worker_id.cmp(&b.worker_id));
                state.workers = workers;
            }
        }
    }
    true
}

/// Adds a job the events say is running, from a fresh snapshot.
async fn track(client: &Client, state: &mut State, id: JobId) -> bool {
    match client.get(id).await {
        Ok(job) if job.state == JobState::Running => {
            let pct = job.progress.as_ref().map(|p| p.pct);
            let eta_s = pct.and_then(|p| state.eta.observe(id, job.attempt, p, unix_ms()));
            // `get` carries history and parameters the live view does not need.
            let mut job = job;
            job.history.clear();
            job.params = None;
            state.running.insert(id, ActiveJob { job, eta_s });
            true
        }
        Ok(_) => state.running.remove(&id).is_some(),
        Err(e) => {
            tracing::debug!(job = %id, error = %e, "cannot get a job an event named");
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_eta_follows_the_rate_since_the_first_report() {
        let mut eta = EtaTracker::default();
        let j: JobId = "j1".parse().unwrap();
        assert_eq!(eta.observe(j, 1, 10.0, 1_000), None, "the origin");
        assert_eq!(eta.observe(j, 1, 12.0, 1_200), None, "too soon to tell");
        // 20 points in 2 s: 10 points a second, 70 left.
        let left = eta.observe(j, 1, 30.0, 3_000).unwrap();
        assert!((left - 7.0).abs() < 1e-9, "{left}");
        // A new attempt starts its own origin.
        assert_eq!(eta.observe(j, 2, 0.0, 4_000), None);
        assert_eq!(eta.observe(j, 2, 0.0, 9_000), None, "no progress: no guess");
        assert_eq!(eta.observe(j, 1, 100.0, 9_000), None, "done");
    }
}
