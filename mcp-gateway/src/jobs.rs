//! Runs the jobs of one tool call: submits them, follows them with progress
//! notifications, cancels them at the broker when the user cancels the call, and
//! stops waiting at the call's timeout (the jobs keep running; the caller gets
//! their ids).
//!
//! **Who may cancel a job.** A job the user asked for runs to its end unless the
//! user cancels it: `cancel_job`, `tasks/cancel`, or a `notifications/cancelled`
//! for the call that is not a timeout. A client that gives up waiting (its
//! `notifications/cancelled` gives a reason that says it timed out, as the
//! TypeScript SDK's "Request timed out" and the Python SDK's "timed out after …"
//! do), a client that goes away, or a gateway that stops, leaves the jobs running:
//! their results stay at the broker for `get_job`/`wait_for_job`. One exception is
//! the protocol's own: over streamable HTTP at 2026-07-28, closing a request's
//! response stream is its cancel signal (that protocol has no other), so it
//! cancels the jobs.
//!
//! A batch's jobs are submitted at once so the broker spreads them over every
//! capable GPU; each is followed by its own task, and their snapshots are folded
//! into one progress value by [`Aggregate`].

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::join_all;
use kiln_protocol::{JobId, JobSnapshot, JobSpec};
use rmcp::model::{ProgressNotificationParam, ProgressToken, RequestId};
use rmcp::task_manager::TaskContext;
use rmcp::{Peer, RoleServer};
use tokio::sync::{mpsc, Notify};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::error::ToolError;
use crate::gateway::Gateway;
use crate::progress::Aggregate;

/// How long to wait, once a call's token fires, for the client's
/// `notifications/cancelled` that says why (rmcp fires the token as it reads it).
const CANCEL_REASON_WAIT: Duration = Duration::from_secs(2);

/// Most cancel reasons remembered per session before the oldest are dropped
/// (reasons for calls that were not waiting are never taken).
const MAX_CANCEL_REASONS: usize = 1024;

/// The reasons a session's client gave for cancelling its requests.
#[derive(Default)]
pub struct CancelReasons {
    reasons: Mutex<HashMap<RequestId, Option<String>>>,
    told: Notify,
}

impl CancelReasons {
    /// Records a `notifications/cancelled`.
    pub fn record(&self, id: RequestId, reason: Option<String>) {
        let mut reasons = self.reasons.lock().expect("not poisoned");
        if reasons.len() >= MAX_CANCEL_REASONS {
            reasons.clear();
        }
        reasons.insert(id, reason);
        drop(reasons);
        self.told.notify_waiters();
    }

    /// The reason given for cancelling `id`, waiting up to `limit` for it; `None`
    /// when no notification came (the session ended).
    async fn take(&self, id: &RequestId, limit: Duration) -> Option<Option<String>> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let told = self.told.notified();
            if let Some(reason) = self.reasons.lock().expect("not poisoned").remove(id) {
                return Some(reason);
            }
            if tokio::time::timeout_at(deadline, told).await.is_err() {
                return None;
            }
        }
    }
}

/// Whether a `notifications/cancelled` reason says the client only stopped
/// waiting (its request timed out) rather than that the user cancelled.
pub fn is_timeout(reason: &str) -> bool {
    let r = reason.to_ascii_lowercase();
    r.contains("timed out") || r.contains("timeout")
}

/// What a fired cancel token of a call means.
#[derive(Clone)]
pub enum CancelSource {
    /// The token is the request's: the client cancelled the call, timed out, or
    /// went away; `reasons` tells which.
    Request {
        id: RequestId,
        reasons: Arc<CancelReasons>,
    },
    /// The token fires only on an explicit cancel: an MCP task's `tasks/cancel`,
    /// or a 2026-07-28 HTTP request's closed response stream.
    Explicit,
}

/// Where a call's progress goes and what cancels it.
#[derive(Clone)]
pub struct CallContext {
    pub peer: Option<Peer<RoleServer>>,
    pub progress_token: Option<ProgressToken>,
    pub cancel: CancellationToken,
    pub cancel_source: CancelSource,
    /// Set when the call runs as an MCP task: progress becomes its status message.
    pub task: Option<TaskContext>,
}

impl CallContext {
    /// After the cancel token fired: did the user cancel (so the jobs go too)?
    async fn user_cancelled(&self) -> bool {
        match &self.cancel_source {
            CancelSource::Explicit => true,
            CancelSource::Request { id, reasons } => {
                match reasons.take(id, CANCEL_REASON_WAIT).await {
                    Some(reason) => !reason.as_deref().is_some_and(is_timeout),
                    None => false,
                }
            }
        }
    }

    async fn notify(&self, value: f64, total: f64, message: String) {
        if let Some(task) = &self.task {
            task.set_status_message(format!("{value:.0}% {message}"));
        }
        if let (Some(peer), Some(token)) = (&self.peer, &self.progress_token) {
            let param = ProgressNotificationParam::new(token.clone(), value)
                .with_total(total)
                .with_message(message);
            if let Err(e) = peer.notify_progress(param).await {
                tracing::debug!(error = %e, "progress notification not delivered");
            }
        }
    }
}

/// How the wait ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// Every job reached a terminal state.
    Finished,
    /// The call's timeout passed first; the jobs keep running.
    TimedOut,
    /// The caller asked not to wait.
    NotWaited,
    /// Nobody waited: a look at the jobs as they are (`get_job`).
    Looked,
    /// A wait for a job made earlier (`wait_for_job`) saw it end.
    Followed,
}

/// One item of a call: the job's latest snapshot, or why it was never accepted.
pub type Item = Result<JobSnapshot, ToolError>;

/// Why the wait stopped early.
#[derive(Debug, thiserror::Error)]
pub enum Cancelled {
    /// The user cancelled: these jobs were cancelled at the broker.
    #[error("the call was cancelled; jobs {} were cancelled at the broker", .0.iter().map(|j| j.to_string()).collect::<Vec<_>>().join(", "))]
    Jobs(Vec<JobId>),
    /// The client stopped waiting or went away: the jobs keep running.
    #[error("the client stopped waiting; the jobs keep running")]
    Abandoned,
}

/// How long a call waits: the caller's `timeout_s`, bounded by the configuration.
pub fn wait_timeout(gw: &Gateway, timeout_s: Option<u64>) -> Result<Duration, ToolError> {
    let max = gw.cfg.max_wait_timeout_s;
    match timeout_s {
        Some(t) if t > max => Err(ToolError::invalid(
            "timeout_s",
            format!("must be between 1 and {max} (this gateway's mcp.max_wait_timeout_s), got {t}"),
        )),
        Some(t) => Ok(Duration::from_secs(t.max(1))),
        None => Ok(Duration::from_secs(gw.cfg.wait_timeout_s)),
    }
}

/// Submits every spec at once. A refused spec becomes an error item; the others run.
pub async fn submit_all(gw: &Gateway, specs: Vec<JobSpec>) -> Vec<Result<JobId, ToolError>> {
    join_all(specs.into_iter().map(|spec| async move {
        gw.client
            .submit(spec)
            .await
            .map(|a| a.job_id)
            .map_err(ToolError::from)
    }))
    .await
}

/// Follows the accepted jobs until all end, the timeout passes, or the call is
/// cancelled (then every unfinished job is cancelled at the broker).
pub async fn follow_all(
    gw: &Gateway,
    ids: &[Result<JobId, ToolError>],
    timeout: Duration,
    call: &CallContext,
) -> Result<(Vec<Option<JobSnapshot>>, Ended), Cancelled> {
    let deadline = tokio::time::Instant::now() + timeout;
    let (tx, mut rx) = mpsc::channel::<(usize, JobSnapshot)>(256);
    let mut followers = JoinSet::new();
    let mut latest: Vec<Option<JobSnapshot>> = vec![None; ids.len()];
    let mut open = 0;
    for (i, id) in ids.iter().enumerate() {
        let Ok(id) = id else { continue };
        open += 1;
        let (client, tx, id) = (gw.client.clone(), tx.clone(), *id);
        followers.spawn(async move {
            let mut follow = match client.follow(id).await {
                Ok(f) => f,
                Err(e) => return tracing::warn!(job = %id, error = %e, "cannot follow job"),
            };
            while let Some(next) = follow.next().await {
                match next {
                    Ok(snapshot) => {
                        if tx.send((i, snapshot)).await.is_err() {
                            return;
                        }
                    }
                    Err(e) => tracing::debug!(job = %id, error = %e, "follow hiccup; retrying"),
                }
            }
        });
    }
    drop(tx);
    let mut aggregate = Aggregate::new(ids.len());
    // Refused items count as finished from the start.
    for (i, id) in ids.iter().enumerate() {
        if id.is_err() {
            aggregate.update_failed(i);
        }
    }
    let mut finished = 0;
    while finished < open {
        tokio::select! {
            biased;
            _ = call.cancel.cancelled() => {
                if !call.user_cancelled().await {
                    tracing::info!("the client stopped waiting; its jobs keep running");
                    return Err(Cancelled::Abandoned);
                }
                let unfinished: Vec<JobId> = ids
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| !latest[*i].as_ref().is_some_and(|s| s.state.is_terminal()))
                    .filter_map(|(_, id)| id.as_ref().ok().copied())
                    .collect();
                cancel_all(gw, &unfinished).await;
                return Err(Cancelled::Jobs(unfinished));
            }
            _ = tokio::time::sleep_until(deadline) => return Ok((latest, Ended::TimedOut)),
            next = rx.recv() => {
                let Some((i, snapshot)) = next else { break };
                let was_terminal = latest[i].as_ref().is_some_and(|s| s.state.is_terminal());
                let terminal = snapshot.state.is_terminal();
                latest[i] = Some(snapshot.clone());
                if terminal && !was_terminal {
                    finished += 1;
                }
                if let Some(u) = aggregate.update(i, snapshot) {
                    call.notify(u.value, u.total, u.message).await;
                }
            }
        }
    }
    let ended = if finished >= open {
        Ended::Finished
    } else {
        Ended::TimedOut
    };
    Ok((latest, ended))
}

/// Cancels jobs at the broker, logging (not failing on) those that already ended.
pub async fn cancel_all(gw: &Gateway, ids: &[JobId]) {
    let results = join_all(ids.iter().map(|id| gw.client.cancel(*id))).await;
    for (id, r) in ids.iter().zip(results) {
        match r {
            Ok(reply) => {
                tracing::info!(job = %id, state = %reply.state, "cancelled at the client's request")
            }
            Err(e) => tracing::warn!(job = %id, error = %e, "cancel failed"),
        }
    }
}

/// Submits and, unless told not to, waits: the common path of every generate tool.
/// Returns one item per spec, in order.
pub async fn run(
    gw: &Gateway,
    specs: Vec<JobSpec>,
    wait: bool,
    timeout: Duration,
    call: &CallContext,
) -> Result<(Vec<Item>, Ended), Cancelled> {
    let ids = submit_all(gw, specs).await;
    if !wait {
        let items = join_all(ids.into_iter().map(|id| async move {
            match id {
                Ok(id) => gw.client.get(id).await.map_err(ToolError::from),
                Err(e) => Err(e),
            }
        }))
        .await;
        return Ok((items, Ended::NotWaited));
    }
    let (latest, ended) = follow_all(gw, &ids, timeout, call).await?;
    let mut items = Vec::with_capacity(ids.len());
    for (id, snap) in ids.into_iter().zip(latest) {
        items.push(match (id, snap) {
            (Err(e), _) => Err(e),
            (Ok(_), Some(s)) => Ok(s),
            // Accepted but no snapshot yet (timed out very early): ask once.
            (Ok(id), None) => gw.client.get(id).await.map_err(ToolError::from),
        });
    }
    Ok((items, ended))
}
