//! Keeps one Wan2GP bridge alive and runs jobs on it, one at a time.
//!
//! A single task (the actor) owns the bridge process; the backend talks to it
//! through a channel, so nothing about the process is shared or locked. States:
//! starting (waiting for `ready`, bounded by `ready_timeout`) → idle ⇄ busy →
//! down → starting again. The watchdogs:
//!
//! - **heartbeat**: no message at all for `heartbeat_timeout` means the bridge is
//!   wedged: its process group is killed and it restarts;
//! - **stalled progress**: a running job that reports no progress, status or info
//!   for `stall_timeout` is failed (retryable) and the bridge killed;
//! - **cancel escalation**: a cancel is passed to Wan2GP; if no terminal message
//!   follows within `cancel_grace`, SIGTERM to the group, SIGKILL after
//!   `kill_grace`, then a restart (model loads and VAE decoding cannot be
//!   interrupted, so the grace is long by default);
//! - **protocol hygiene**: lines on the channel that are not messages are
//!   counted; too many mean it is polluted, and the bridge restarts.
//!
//! A crash or a fatal CUDA error fails the running job as a retryable
//! infrastructure error and restarts the bridge at once (with a backoff when it
//! keeps crashing right after start). The bridge is also recycled after a number
//! of jobs or past a memory size, between jobs.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kiln_protocol::{FailureKind, JobError};
use serde_json::{Map, Value};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::backend::{CancellationToken, Health, ProgressSink};

use super::process::{Incoming, Launch, Process};
use super::progress::ProgressMapper;
use super::protocol::{ErrorMsg, FromBridge, Ready, ToBridge};

/// Garbage lines on the channel tolerated over one bridge's life.
const MAX_GARBAGE: u32 = 20;
/// A bridge that dies sooner than this after `ready` counts towards the crash backoff.
const EARLY_CRASH: Duration = Duration::from_secs(30);
/// How often the inventory (models, LoRAs) is re-read while idle.
const INVENTORY_EVERY: Duration = Duration::from_secs(60);
/// Lines of Wan2GP output kept for failure reports.
const LOG_TAIL: usize = 12;

/// How the supervisor runs the bridge.
#[derive(Debug, Clone)]
pub struct Settings {
    pub launch: Launch,
    pub ready_timeout: Duration,
    pub heartbeat_timeout: Duration,
    pub stall_timeout: Duration,
    pub cancel_grace: Duration,
    pub kill_grace: Duration,
    /// Longest wait for the answer to a discovery query.
    pub query_timeout: Duration,
    pub recycle_after_jobs: u32,
    pub recycle_rss_mb: u64,
    /// Loaded with a one-step generation after every start.
    pub warmup_model: Option<String>,
}

/// How a job ended.
#[derive(Debug, Clone, PartialEq)]
pub enum JobEnd {
    Done(Finished),
    Failed(JobError),
    Cancelled,
}

/// A successful job.
#[derive(Debug, Clone, PartialEq)]
pub struct Finished {
    /// Absolute paths Wan2GP wrote.
    pub files: Vec<PathBuf>,
    pub elapsed_s: f64,
    /// Wan2GP loaded a model during this job (it was not warm).
    pub loaded_model: bool,
    pub bridge_pid: u32,
}

/// What the supervisor knows, for health, affinity and inventory.
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub health: Health,
    pub ready: Option<Ready>,
    pub loaded_model: Option<String>,
    /// The bridge's last answer to the `inventory` query.
    pub inventory: Option<Value>,
    /// Bridges started so far.
    pub starts: u32,
    /// The bridge's resident memory at its last heartbeat.
    pub rss_mb: Option<u64>,
}

impl Default for Snapshot {
    fn default() -> Self {
        Snapshot {
            health: Health::down("the Wan2GP bridge is starting"),
            ready: None,
            loaded_model: None,
            inventory: None,
            starts: 0,
            rss_mb: None,
        }
    }
}

/// Why a query got no answer.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum QueryError {
    #[error("Wan2GP answered: {0}")]
    Refused(String),
    #[error("the Wan2GP bridge is not available: {0}")]
    Unavailable(String),
    #[error("cancelled")]
    Cancelled,
}

enum Work {
    Submit(Map<String, Value>),
    Warmup(String),
}

struct JobRequest {
    key: String,
    work: Work,
    progress: Option<ProgressSink>,
    cancel: CancellationToken,
    done: oneshot::Sender<JobEnd>,
}

enum Request {
    Job(JobRequest),
    Query {
        op: String,
        args: Value,
        reply: oneshot::Sender<Result<Value, QueryError>>,
    },
}

/// The backend's handle on the actor.
pub struct Supervisor {
    tx: mpsc::Sender<Request>,
    shared: Arc<Mutex<Snapshot>>,
    stopping: CancellationToken,
    task: Mutex<Option<JoinHandle<()>>>,
}

impl Supervisor {
    /// Starts the actor, which starts the bridge at once. Needs a tokio runtime.
    pub fn start(settings: Settings) -> Supervisor {
        let (tx, rx) = mpsc::channel(16);
        let shared = Arc::new(Mutex::new(Snapshot::default()));
        let stopping = CancellationToken::new();
        let actor = Actor {
            s: settings,
            rx,
            shared: shared.clone(),
            stopping: stopping.clone(),
            bridge: None,
            start_failures: 0,
            quick_crashes: 0,
            last_error: String::new(),
            next_req_id: 0,
            inventory_at: None,
        };
        let task = tokio::spawn(actor.run());
        Supervisor {
            tx,
            shared,
            stopping,
            task: Mutex::new(Some(task)),
        }
    }

    pub fn snapshot(&self) -> Snapshot {
        self.shared.lock().expect("not poisoned").clone()
    }

    /// Runs one job. Returns [`JobEnd::Cancelled`] as soon as `cancel` fires; the
    /// supervisor then stops the job in the background (escalating if needed), and
    /// the next job waits for that.
    pub async fn run_job(
        &self,
        key: String,
        settings: Map<String, Value>,
        progress: ProgressSink,
        cancel: CancellationToken,
    ) -> JobEnd {
        let (done, rx) = oneshot::channel();
        let req = Request::Job(JobRequest {
            key,
            work: Work::Submit(settings),
            progress: Some(progress),
            cancel: cancel.clone(),
            done,
        });
        tokio::select! {
            sent = self.tx.send(req) => if sent.is_err() {
                return JobEnd::Failed(JobError::new(FailureKind::Internal, "the Wan2GP supervisor has stopped", true));
            },
            _ = cancel.cancelled() => return JobEnd::Cancelled,
        }
        tokio::select! {
            end = rx => end.unwrap_or_else(|_| JobEnd::Failed(JobError::new(FailureKind::Internal, "the Wan2GP supervisor dropped the job", true))),
            _ = cancel.cancelled() => JobEnd::Cancelled,
        }
    }

    /// Asks the bridge a discovery question (answered between jobs).
    pub async fn query(
        &self,
        op: &str,
        args: Value,
        cancel: &CancellationToken,
    ) -> Result<Value, QueryError> {
        let (reply, rx) = oneshot::channel();
        let req = Request::Query {
            op: op.into(),
            args,
            reply,
        };
        tokio::select! {
            sent = self.tx.send(req) => if sent.is_err() {
                return Err(QueryError::Unavailable("the supervisor has stopped".into()));
            },
            _ = cancel.cancelled() => return Err(QueryError::Cancelled),
        }
        tokio::select! {
            r = rx => r.unwrap_or_else(|_| Err(QueryError::Unavailable("the supervisor dropped the query".into()))),
            _ = cancel.cancelled() => Err(QueryError::Cancelled),
        }
    }

    /// Stops the bridge (cancelling any job) and waits for the actor to end.
    pub async fn shutdown(&self) {
        self.stopping.cancel();
        let task = self.task.lock().expect("not poisoned").take();
        if let Some(task) = task {
            let _ = task.await;
        }
    }
}

impl Drop for Supervisor {
    fn drop(&mut self) {
        self.stopping.cancel();
    }
}

/// A bridge that said `ready`.
struct Live {
    proc: Process,
    ready: Ready,
    started: Instant,
    jobs: u32,
    last_heard: Instant,
    rss_mb: Option<u64>,
    garbage: u32,
}

struct Actor {
    s: Settings,
    rx: mpsc::Receiver<Request>,
    shared: Arc<Mutex<Snapshot>>,
    stopping: CancellationToken,
    bridge: Option<Live>,
    /// Starts in a row that did not reach `ready`.
    start_failures: u32,
    /// Bridges in a row that died soon after `ready`.
    quick_crashes: u32,
    last_error: String,
    next_req_id: u64,
    inventory_at: Option<Instant>,
}

/// What one turn of a job's loop decided.
enum Step {
    Continue,
    End(JobEnd),
    /// The bridge must go: kill it (or, if it already exited, reap it), then end
    /// the job with this.
    Kill {
        why: String,
        end: JobEnd,
    },
}

fn backoff(n: u32) -> Duration {
    if n == 0 {
        Duration::ZERO
    } else {
        Duration::from_secs(1u64 << (n - 1).min(6)).min(Duration::from_secs(60))
    }
}

fn retryable(kind: FailureKind, msg: impl Into<String>) -> JobEnd {
    JobEnd::Failed(JobError::new(kind, msg, true))
}

/// The text of a Python string repr: WanGP hands generic errors over as
/// `str(gr.Error(msg))`, which is `repr(msg)`. Only a whole literal is undone,
/// so a message that merely starts and ends with quotes (`'<' not supported
/// between instances of 'int' and 'str'`) is kept as it is.
pub fn unrepr(text: &str) -> String {
    let bytes = text.as_bytes();
    let quote = match bytes.first() {
        Some(q @ (b'\'' | b'"')) if bytes.len() >= 2 && bytes[bytes.len() - 1] == *q => *q as char,
        _ => return text.to_string(),
    };
    let inner = &text[1..text.len() - 1];
    let mut out = String::with_capacity(inner.len());
    let mut chars = inner.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => match chars.next() {
                Some('n') => out.push('\n'),
                Some('t') => out.push('\t'),
                Some(other) => out.push(other),
                None => return text.to_string(),
            },
            // An unescaped quote of the same kind: not one literal.
            c if c == quote => return text.to_string(),
            c => out.push(c),
        }
    }
    out
}

/// A Wan2GP failure as a Kiln failure.
pub fn job_error(e: &ErrorMsg) -> JobError {
    let mut message = unrepr(e.message.trim());
    if !e.log_tail.is_empty() && !e.oom {
        let tail: Vec<&str> = e
            .log_tail
            .iter()
            .rev()
            .take(3)
            .rev()
            .map(String::as_str)
            .collect();
        message.push_str(&format!(" (last output: {})", tail.join(" | ")));
    }
    if e.oom {
        JobError::new(
            FailureKind::OutOfMemory,
            format!("Wan2GP ran out of memory: {message}"),
            true,
        )
    } else if e.fatal {
        JobError::new(
            FailureKind::Backend,
            format!("Wan2GP hit a fatal error and is restarting: {message}"),
            true,
        )
    } else if e.stage == "validation" {
        JobError::new(
            FailureKind::InvalidInput,
            format!("Wan2GP refused the settings: {message}"),
            false,
        )
    } else {
        JobError::new(
            FailureKind::Backend,
            format!("Wan2GP failed: {message}"),
            false,
        )
    }
}

impl Actor {
    fn set(&self, f: impl FnOnce(&mut Snapshot)) {
        f(&mut self.shared.lock().expect("not poisoned"));
    }

    async fn run(mut self) {
        loop {
            if self.stopping.is_cancelled() {
                self.stop_bridge("the worker is stopping").await;
                self.set(|s| s.health = Health::down("stopped"));
                return;
            }
            if self.bridge.is_none() {
                self.bring_up().await;
                continue;
            }
            let live = self.bridge.as_mut().expect("checked");
            let wedged_at = live.last_heard + self.s.heartbeat_timeout;
            let inventory_due = self
                .inventory_at
                .map_or_else(Instant::now, |t| t + INVENTORY_EVERY);
            tokio::select! {
                biased;
                _ = self.stopping.cancelled() => {}
                req = self.rx.recv() => match req {
                    None => self.stopping.cancel(),
                    Some(Request::Job(job)) => {
                        self.drive(job).await;
                        self.after_job().await;
                    }
                    Some(Request::Query { op, args, reply }) => {
                        let answer = self.query(&op, args).await;
                        let _ = reply.send(answer);
                    }
                },
                inc = live.proc.rx.recv() => self.while_idle(inc.unwrap_or(Incoming::Closed)).await,
                _ = tokio::time::sleep_until(wedged_at) => {
                    let why = format!("no heartbeat for {:?}", self.s.heartbeat_timeout);
                    self.kill(&why).await;
                }
                // LoRAs and weights come and go while the worker runs.
                _ = tokio::time::sleep_until(inventory_due) => self.refresh_inventory().await,
            }
        }
    }

    /// Starts a bridge, after a backoff when starts or early crashes repeat.
    async fn bring_up(&mut self) {
        let start_delay = backoff(self.start_failures);
        let crash_delay = backoff(self.quick_crashes.saturating_sub(1));
        if !start_delay.is_zero() {
            // Wan2GP cannot start: say so to jobs at once rather than let them wait.
            let wake = Instant::now() + start_delay;
            loop {
                tokio::select! {
                    _ = self.stopping.cancelled() => return,
                    _ = tokio::time::sleep_until(wake) => break,
                    req = self.rx.recv() => match req {
                        None => { self.stopping.cancel(); return }
                        Some(r) => self.refuse(r),
                    },
                }
            }
        } else if !crash_delay.is_zero() {
            tracing::warn!(
                "the Wan2GP bridge keeps crashing after start; restarting in {crash_delay:?}"
            );
            tokio::select! {
                _ = self.stopping.cancelled() => return,
                _ = tokio::time::sleep(crash_delay) => {}
            }
        }
        self.set(|s| s.health = Health::down("the Wan2GP bridge is starting"));
        match self.start().await {
            Ok(live) => {
                tracing::info!(
                    pid = live.ready.pid,
                    wangp = live.ready.wangp_version.as_deref().unwrap_or("?"),
                    gpu = live.ready.cuda_device_name.as_deref().unwrap_or("?"),
                    args = ?live.ready.cli_args,
                    "Wan2GP bridge ready"
                );
                self.start_failures = 0;
                let ready = live.ready.clone();
                self.bridge = Some(live);
                self.set(|s| {
                    s.health = Health::ok();
                    s.ready = Some(ready);
                    s.starts += 1;
                });
                self.refresh_inventory().await;
                self.warm_up().await;
            }
            Err(why) => {
                if self.stopping.is_cancelled() {
                    return;
                }
                self.start_failures += 1;
                let next = backoff(self.start_failures);
                tracing::error!("the Wan2GP bridge did not start: {why}; trying again in {next:?}");
                self.last_error = why.clone();
                self.set(|s| {
                    s.health = Health::down(format!("the Wan2GP bridge did not start: {why}"))
                });
            }
        }
    }

    fn refuse(&self, req: Request) {
        let why = format!("the Wan2GP bridge is not running: {}", self.last_error);
        match req {
            Request::Job(j) => {
                let _ = j.done.send(retryable(FailureKind::Backend, why));
            }
            Request::Query { reply, .. } => {
                let _ = reply.send(Err(QueryError::Unavailable(why)));
            }
        }
    }

    async fn start(&mut self) -> Result<Live, String> {
        let launch = &self.s.launch;
        let mut proc = Process::spawn(launch)
            .map_err(|e| format!("cannot run {}: {e}", launch.python.display()))?;
        let deadline = Instant::now() + self.s.ready_timeout;
        loop {
            tokio::select! {
                _ = self.stopping.cancelled() => {
                    proc.terminate(self.s.kill_grace).await;
                    return Err("the worker is stopping".into());
                }
                _ = tokio::time::sleep_until(deadline) => {
                    proc.terminate(self.s.kill_grace).await;
                    return Err(format!("no `ready` within {:?} (worker.wan2gp.ready_timeout_s)", self.s.ready_timeout));
                }
                inc = proc.rx.recv() => match inc.unwrap_or(Incoming::Closed) {
                    Incoming::Msg(FromBridge::Ready(ready)) => {
                        let now = Instant::now();
                        return Ok(Live { proc, ready, started: now, jobs: 0, last_heard: now, rss_mb: None, garbage: 0 });
                    }
                    Incoming::Msg(FromBridge::InitFailed { message }) => {
                        proc.wait_exit(self.s.kill_grace).await;
                        proc.terminate(self.s.kill_grace).await;
                        return Err(format!("Wan2GP failed to initialise: {message}"));
                    }
                    Incoming::Msg(other) => tracing::debug!(?other, "bridge message before ready"),
                    Incoming::Garbage(line) => tracing::warn!("not a bridge message: {line:?}"),
                    Incoming::Closed => {
                        let status = proc.wait_exit(self.s.kill_grace).await;
                        proc.terminate(self.s.kill_grace).await;
                        return Err(format!(
                            "the bridge exited before it was ready ({}); see its output in the log",
                            status.map_or("still running".into(), |s| s.to_string())
                        ));
                    }
                },
            }
        }
    }

    async fn warm_up(&mut self) {
        let Some(model) = self.s.warmup_model.clone() else {
            return;
        };
        let (done, _) = oneshot::channel();
        let key = format!(
            "warmup-{}",
            self.shared.lock().expect("not poisoned").starts
        );
        tracing::info!(model = %model, "warming up Wan2GP");
        self.drive(JobRequest {
            key,
            work: Work::Warmup(model),
            progress: None,
            cancel: CancellationToken::new(),
            done,
        })
        .await;
    }

    /// Kills the bridge's process group and forgets it.
    async fn kill(&mut self, why: &str) {
        let Some(mut live) = self.bridge.take() else {
            return;
        };
        tracing::warn!(pid = live.ready.pid, "killing the Wan2GP bridge: {why}");
        live.proc.terminate(self.s.kill_grace).await;
        self.went_down(&live, why);
    }

    /// The bridge exited by itself: reap it and its group.
    async fn reap(&mut self, why: &str) {
        let Some(mut live) = self.bridge.take() else {
            return;
        };
        let status = live.proc.wait_exit(self.s.kill_grace).await;
        live.proc.terminate(self.s.kill_grace).await;
        let status = status.map_or("unknown status".into(), |s| s.to_string());
        tracing::error!(
            pid = live.ready.pid,
            "the Wan2GP bridge exited ({status}): {why}"
        );
        self.went_down(&live, why);
    }

    fn went_down(&mut self, live: &Live, why: &str) {
        if live.started.elapsed() < EARLY_CRASH {
            self.quick_crashes += 1;
        } else {
            self.quick_crashes = 0;
        }
        self.last_error = why.to_string();
        self.set(|s| {
            s.health = Health::down(format!("the Wan2GP bridge is restarting: {why}"));
            s.loaded_model = None;
            s.rss_mb = None;
        });
    }

    /// A polite stop: `shutdown`, then signals if it lingers.
    async fn stop_bridge(&mut self, why: &str) {
        let Some(mut live) = self.bridge.take() else {
            return;
        };
        tracing::info!(pid = live.ready.pid, "stopping the Wan2GP bridge: {why}");
        let grace = self.s.kill_grace;
        if live
            .proc
            .send(&ToBridge::Shutdown {
                grace_s: grace.as_secs_f64(),
            })
            .await
            .is_ok()
        {
            live.proc.close_stdin();
            if live
                .proc
                .wait_exit(grace + Duration::from_secs(2))
                .await
                .is_some()
            {
                live.proc.signal_group(libc::SIGKILL);
            } else {
                live.proc.terminate(grace).await;
            }
        } else {
            live.proc.terminate(grace).await;
        }
        self.set(|s| {
            s.loaded_model = None;
            s.rss_mb = None;
        });
    }

    /// Messages that need no job: heartbeats, stray logs, the bridge dying.
    async fn while_idle(&mut self, inc: Incoming) {
        match inc {
            Incoming::Msg(msg) => {
                let live = self.bridge.as_mut().expect("idle with a bridge");
                live.last_heard = Instant::now();
                self.common(&msg);
            }
            Incoming::Garbage(line) => self.garbage(&line).await,
            Incoming::Closed => self.reap("it closed its channel while idle").await,
        }
    }

    /// Bookkeeping any message may need, in or out of a job.
    fn common(&mut self, msg: &FromBridge) {
        match msg {
            FromBridge::Heartbeat(h) => {
                if let Some(live) = self.bridge.as_mut() {
                    live.rss_mb = h.rss_mb.or(live.rss_mb);
                }
                let (loaded, rss) = (h.loaded_model.clone(), h.rss_mb);
                self.set(|s| {
                    s.loaded_model = loaded;
                    s.rss_mb = rss.or(s.rss_mb);
                });
            }
            FromBridge::Log(l) => tracing::info!(
                "[{} {}] {}",
                self.s.launch.log_prefix,
                l.job_id.as_deref().unwrap_or("-"),
                l.text
            ),
            FromBridge::Unknown => {
                tracing::debug!("a bridge message of a type this worker does not know")
            }
            other => tracing::debug!(?other, "bridge message ignored"),
        }
    }

    async fn garbage(&mut self, line: &str) {
        let Some(live) = self.bridge.as_mut() else {
            return;
        };
        live.garbage += 1;
        tracing::warn!(
            count = live.garbage,
            "not a bridge message on the channel: {line:?}"
        );
        if live.garbage > MAX_GARBAGE {
            self.kill("its protocol channel is polluted").await;
        }
    }

    async fn query(&mut self, op: &str, args: Value) -> Result<Value, QueryError> {
        let Some(live) = self.bridge.as_mut() else {
            return Err(QueryError::Unavailable(self.last_error.clone()));
        };
        self.next_req_id += 1;
        let req_id = self.next_req_id;
        if let Err(e) = live
            .proc
            .send(&ToBridge::Query {
                req_id,
                op: op.into(),
                args,
            })
            .await
        {
            self.reap(&format!("cannot write to it: {e}")).await;
            return Err(QueryError::Unavailable(self.last_error.clone()));
        }
        let deadline = Instant::now() + self.s.query_timeout;
        loop {
            let live = self.bridge.as_mut().expect("still running");
            let wedged_at = live.last_heard + self.s.heartbeat_timeout;
            let inc = tokio::select! {
                inc = live.proc.rx.recv() => inc.unwrap_or(Incoming::Closed),
                _ = self.stopping.cancelled() => return Err(QueryError::Unavailable("the worker is stopping".into())),
                _ = tokio::time::sleep_until(deadline.min(wedged_at)) => {
                    if Instant::now() >= wedged_at {
                        self.kill(&format!("no heartbeat for {:?}", self.s.heartbeat_timeout)).await;
                    }
                    return Err(QueryError::Unavailable(format!("no answer to {op} within {:?}", self.s.query_timeout)));
                }
            };
            match inc {
                Incoming::Msg(FromBridge::Reply {
                    req_id: r,
                    data,
                    error,
                }) if r == req_id => {
                    live.last_heard = Instant::now();
                    return match error {
                        Some(e) => Err(QueryError::Refused(e)),
                        None => Ok(data.unwrap_or(Value::Null)),
                    };
                }
                Incoming::Msg(msg) => {
                    live.last_heard = Instant::now();
                    self.common(&msg);
                }
                Incoming::Garbage(line) => self.garbage(&line).await,
                Incoming::Closed => {
                    self.reap(&format!("it exited while answering {op}")).await;
                    return Err(QueryError::Unavailable(self.last_error.clone()));
                }
            }
            if self.bridge.is_none() {
                return Err(QueryError::Unavailable(self.last_error.clone()));
            }
        }
    }

    async fn refresh_inventory(&mut self) {
        match self.query("inventory", Value::Null).await {
            Ok(inv) => self.set(|s| s.inventory = Some(inv)),
            Err(e) => tracing::warn!("could not list Wan2GP's models: {e}"),
        }
        self.inventory_at = Some(Instant::now());
    }

    /// Between jobs: recycle the bridge if it is due.
    async fn after_job(&mut self) {
        let Some(live) = &self.bridge else { return };
        if self.s.recycle_after_jobs > 0 && live.jobs >= self.s.recycle_after_jobs {
            let why = format!(
                "recycling after {} jobs (worker.wan2gp.recycle_after_jobs)",
                live.jobs
            );
            self.stop_bridge(&why).await;
            return;
        }
        if let Some(rss) = live
            .rss_mb
            .filter(|rss| self.s.recycle_rss_mb > 0 && *rss > self.s.recycle_rss_mb)
        {
            let why = format!("recycling at {rss} MiB resident (worker.wan2gp.recycle_rss_mb)");
            self.stop_bridge(&why).await;
        }
    }

    /// Runs one job to its end, whatever happens to the bridge.
    async fn drive(&mut self, job: JobRequest) {
        let end = if job.cancel.is_cancelled() {
            JobEnd::Cancelled
        } else {
            self.follow(&job).await
        };
        if let Err(JobEnd::Done(f)) = job.done.send(end) {
            // Nobody waits any more (the job was cancelled meanwhile): drop its files.
            for file in f.files {
                let _ = std::fs::remove_file(file);
            }
        }
    }

    async fn follow(&mut self, job: &JobRequest) -> JobEnd {
        let cmd = match &job.work {
            Work::Submit(settings) => ToBridge::Submit {
                job_id: job.key.clone(),
                settings: settings.clone(),
                want_preview: false,
            },
            Work::Warmup(model) => ToBridge::Warmup {
                job_id: job.key.clone(),
                model_type: model.clone(),
            },
        };
        let Some(live) = self.bridge.as_mut() else {
            return retryable(
                FailureKind::Backend,
                format!("the Wan2GP bridge is not running: {}", self.last_error),
            );
        };
        if let Err(e) = live.proc.send(&cmd).await {
            let why = format!("cannot write to the bridge: {e}");
            self.reap(&why).await;
            return retryable(FailureKind::Backend, why);
        }
        if let Work::Submit(_) = job.work {
            live.jobs += 1;
        }
        let mut mapper = job.progress.clone().map(ProgressMapper::new);
        let mut last_activity = Instant::now();
        let mut cancel_sent: Option<Instant> = None;
        let mut tail: VecDeque<String> = VecDeque::new();
        loop {
            let Some(live) = self.bridge.as_mut() else {
                return retryable(
                    FailureKind::Backend,
                    format!("the Wan2GP bridge went away: {}", self.last_error),
                );
            };
            let wedged_at = live.last_heard + self.s.heartbeat_timeout;
            let stalled_at = last_activity + self.s.stall_timeout;
            // A worker that is stopping does not wait out the long cancel grace.
            let grace = if self.stopping.is_cancelled() {
                self.s.kill_grace
            } else {
                self.s.cancel_grace
            };
            let escalate_at = cancel_sent.map(|t| t + grace);
            let next = escalate_at.map_or(wedged_at.min(stalled_at), |e| {
                e.min(wedged_at).min(stalled_at)
            });
            let cancelling = cancel_sent.is_some();
            let step = tokio::select! {
                biased;
                inc = live.proc.rx.recv() => {
                    let inc = inc.unwrap_or(Incoming::Closed);
                    if let Incoming::Msg(_) = inc {
                        live.last_heard = Instant::now();
                    }
                    match inc {
                        Incoming::Msg(msg) => {
                            let about_this = msg.job_id().is_none_or(|id| id == job.key);
                            if !about_this {
                                tracing::debug!(?msg, "message about another job");
                                Step::Continue
                            } else {
                                self.on_job_message(job, msg, &mut mapper, &mut last_activity, &mut tail, cancelling)
                            }
                        }
                        Incoming::Garbage(line) => {
                            self.garbage(&line).await;
                            if self.bridge.is_none() {
                                Step::End(retryable(FailureKind::Backend, "the Wan2GP bridge's protocol channel is polluted; it was restarted"))
                            } else {
                                Step::Continue
                            }
                        }
                        Incoming::Closed => {
                            let end = if cancelling {
                                JobEnd::Cancelled
                            } else {
                                let last: Vec<String> = tail.iter().cloned().collect();
                                retryable(
                                    FailureKind::Backend,
                                    format!(
                                        "the Wan2GP bridge exited during the job (it is restarting){}",
                                        if last.is_empty() { String::new() } else { format!("; last output: {}", last.join(" | ")) }
                                    ),
                                )
                            };
                            self.reap("it exited during a job").await;
                            Step::End(end)
                        }
                    }
                }
                _ = job.cancel.cancelled(), if !cancelling => self.send_cancel(&job.key, &mut cancel_sent).await,
                _ = self.stopping.cancelled(), if !cancelling => self.send_cancel(&job.key, &mut cancel_sent).await,
                _ = tokio::time::sleep_until(next) => {
                    let now = Instant::now();
                    if escalate_at.is_some_and(|e| now >= e) {
                        Step::Kill {
                            why: format!("the job did not stop within {:?} of the cancel (worker.wan2gp.cancel_grace_s)", self.s.cancel_grace),
                            end: JobEnd::Cancelled,
                        }
                    } else if now >= wedged_at {
                        let why = format!("no heartbeat for {:?}", self.s.heartbeat_timeout);
                        let end = retryable(FailureKind::Backend, format!("the Wan2GP bridge stopped answering ({why}); it was restarted"));
                        Step::Kill { why, end }
                    } else if now >= stalled_at {
                        let why = format!("the job reported nothing for {:?} (worker.wan2gp.stall_timeout_s)", self.s.stall_timeout);
                        let end = if cancelling { JobEnd::Cancelled } else { retryable(FailureKind::Backend, format!("Wan2GP stalled: {why}")) };
                        Step::Kill { why, end }
                    } else {
                        Step::Continue
                    }
                }
            };
            match step {
                Step::Continue => {}
                Step::End(end) => return end,
                Step::Kill { why, end } => {
                    self.kill(&why).await;
                    return end;
                }
            }
        }
    }

    async fn send_cancel(&mut self, key: &str, cancel_sent: &mut Option<Instant>) -> Step {
        *cancel_sent = Some(Instant::now());
        tracing::info!(job = %key, "asking Wan2GP to cancel");
        let Some(live) = self.bridge.as_mut() else {
            return Step::End(JobEnd::Cancelled);
        };
        match live
            .proc
            .send(&ToBridge::Cancel { job_id: key.into() })
            .await
        {
            Ok(()) => Step::Continue,
            Err(e) => Step::Kill {
                why: format!("cannot write the cancel: {e}"),
                end: JobEnd::Cancelled,
            },
        }
    }

    fn on_job_message(
        &mut self,
        job: &JobRequest,
        msg: FromBridge,
        mapper: &mut Option<ProgressMapper>,
        last_activity: &mut Instant,
        tail: &mut VecDeque<String>,
        cancelling: bool,
    ) -> Step {
        match msg {
            FromBridge::Accepted { .. } | FromBridge::CancelAck { .. } => Step::Continue,
            FromBridge::Rejected {
                reason, message, ..
            } => {
                // busy: another job still holds the session, try again; an
                // exception at submit ("error") will happen again.
                let (kind, retryable) = match reason.as_str() {
                    "bad_request" => (FailureKind::InvalidInput, false),
                    "busy" => (FailureKind::Backend, true),
                    _ => (FailureKind::Backend, false),
                };
                Step::End(JobEnd::Failed(JobError::new(
                    kind,
                    format!("the Wan2GP bridge refused the job ({reason}): {message}"),
                    retryable,
                )))
            }
            FromBridge::Progress(p) => {
                *last_activity = Instant::now();
                if let Some(m) = mapper {
                    m.progress(&p);
                }
                Step::Continue
            }
            FromBridge::Status(t) | FromBridge::Info(t) => {
                *last_activity = Instant::now();
                tracing::info!(job = %job.key, "Wan2GP: {}", t.text);
                if let Some(m) = mapper {
                    m.status(&t.text);
                }
                Step::Continue
            }
            FromBridge::Log(l) => {
                *last_activity = Instant::now();
                if tail.len() == LOG_TAIL {
                    tail.pop_front();
                }
                tail.push_back(l.text.chars().take(300).collect());
                self.common(&FromBridge::Log(l));
                Step::Continue
            }
            FromBridge::Result(r) => {
                // A bridge that finishes jobs is not crash-looping.
                self.quick_crashes = 0;
                let loaded = r.loaded_model.clone();
                self.set(|s| s.loaded_model = loaded);
                let pid = self.bridge.as_ref().map_or(0, |l| l.ready.pid);
                if cancelling {
                    for f in &r.files {
                        let _ = std::fs::remove_file(f);
                    }
                    return Step::End(JobEnd::Cancelled);
                }
                Step::End(JobEnd::Done(Finished {
                    files: r.files.iter().map(PathBuf::from).collect(),
                    elapsed_s: r.elapsed_s,
                    loaded_model: mapper.as_ref().is_some_and(|m| m.loaded_model),
                    bridge_pid: pid,
                }))
            }
            FromBridge::Cancelled { .. } => Step::End(JobEnd::Cancelled),
            FromBridge::Error(e) => {
                let err = job_error(&e);
                tracing::warn!(job = %job.key, stage = %e.stage, oom = e.oom, fatal = e.fatal, "Wan2GP: {}", e.message);
                if e.fatal {
                    // The bridge exits on its own after a fatal error; make sure.
                    return Step::Kill {
                        why: "fatal Wan2GP error (poisoned CUDA context)".into(),
                        end: JobEnd::Failed(err),
                    };
                }
                Step::End(JobEnd::Failed(err))
            }
            other => {
                self.common(&other);
                Step::Continue
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_map_to_kiln_kinds() {
        let e = |stage: &str, message: &str, oom: bool, fatal: bool| ErrorMsg {
            job_id: "j1-1".into(),
            stage: stage.into(),
            message: message.into(),
            oom,
            fatal,
            log_tail: vec!["Traceback".into()],
        };
        let oom = job_error(&e(
            "generation",
            "'... you have unsufficient VRAM ...'",
            true,
            false,
        ));
        assert_eq!((oom.kind, oom.retryable), (FailureKind::OutOfMemory, true));
        assert!(
            !oom.message.contains('\''),
            "quotes around Wan2GP's text are dropped"
        );
        let fatal = job_error(&e(
            "generation",
            "CUDA error: an illegal memory access was encountered",
            false,
            true,
        ));
        assert_eq!((fatal.kind, fatal.retryable), (FailureKind::Backend, true));
        let bad = job_error(&e(
            "validation",
            "multi_prompts_gen_type='PG' parses this prompt into 2 ...",
            false,
            false,
        ));
        assert_eq!(
            (bad.kind, bad.retryable),
            (FailureKind::InvalidInput, false)
        );
        let other = job_error(&e("generation", "boom", false, false));
        assert_eq!((other.kind, other.retryable), (FailureKind::Backend, false));
        assert!(
            other.message.contains("last output: Traceback"),
            "{}",
            other.message
        );
    }

    #[test]
    fn only_a_whole_python_string_repr_loses_its_quotes() {
        assert_eq!(
            unrepr("'The generation of the video has encountered an error, please check your terminal for more information. \\'boom\\''"),
            "The generation of the video has encountered an error, please check your terminal for more information. 'boom'"
        );
        assert_eq!(unrepr("\"it's fine\""), "it's fine");
        let kept = "'<' not supported between instances of 'int' and 'str'";
        assert_eq!(unrepr(kept), kept);
        assert_eq!(unrepr("plain text"), "plain text");
        assert_eq!(unrepr("'"), "'");
        let e = ErrorMsg {
            job_id: "j1-1".into(),
            stage: "runtime".into(),
            message: kept.into(),
            oom: false,
            fatal: false,
            log_tail: vec![],
        };
        let err = job_error(&e);
        assert!(err.message.contains(kept), "{}", err.message);
        assert_eq!((err.kind, err.retryable), (FailureKind::Backend, false));
    }

    #[test]
    fn backoff_doubles_to_a_minute() {
        assert_eq!(backoff(0), Duration::ZERO);
        assert_eq!(backoff(1), Duration::from_secs(1));
        assert_eq!(backoff(3), Duration::from_secs(4));
        assert_eq!(backoff(30), Duration::from_secs(60));
    }
}
