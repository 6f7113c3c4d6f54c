//! The bridge process's life, as the actor sees it: start (up to `ready`),
//! warm-up, stop and kill, reaping an exit, the crash backoff, discovery queries
//! between jobs, and recycling after a number of jobs or past a memory size.

use std::time::Duration;

use serde_json::Value;
use tokio::time::Instant;

use super::super::process::{Incoming, Process};
use super::super::protocol::{FromBridge, ToBridge};
use super::job::retryable;
use super::*;

/// Garbage lines on the channel tolerated over one bridge's life.
pub(super) const MAX_GARBAGE: u32 = 20;
/// A bridge that dies sooner than this after `ready` counts towards the crash backoff.
pub(super) const EARLY_CRASH: Duration = Duration::from_secs(30);
/// How often the inventory (models, LoRAs) is re-read while idle.
pub(super) const INVENTORY_EVERY: Duration = Duration::from_secs(60);

pub(super) fn backoff(n: u32) -> Duration {
    if n == 0 {
        Duration::ZERO
    } else {
        Duration::from_secs(1u64 << (n - 1).min(6)).min(Duration::from_secs(60))
    }
}

impl Actor {
    /// Starts a bridge, after a backoff when starts or early crashes repeat.
    pub(super) async fn bring_up(&mut self) {
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

    pub(super) fn refuse(&self, req: Request) {
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

    pub(super) async fn start(&mut self) -> Result<Live, String> {
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

    pub(super) async fn warm_up(&mut self) {
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
    pub(super) async fn kill(&mut self, why: &str) {
        let Some(mut live) = self.bridge.take() else {
            return;
        };
        tracing::warn!(pid = live.ready.pid, "killing the Wan2GP bridge: {why}");
        live.proc.terminate(self.s.kill_grace).await;
        self.went_down(&live, why);
    }

    /// The bridge exited by itself: reap it and its group.
    pub(super) async fn reap(&mut self, why: &str) {
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

    pub(super) fn went_down(&mut self, live: &Live, why: &str) {
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
    pub(super) async fn stop_bridge(&mut self, why: &str) {
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
    pub(super) async fn while_idle(&mut self, inc: Incoming) {
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
    pub(super) fn common(&mut self, msg: &FromBridge) {
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

    pub(super) async fn garbage(&mut self, line: &str) {
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

    pub(super) async fn query(&mut self, op: &str, args: Value) -> Result<Value, QueryError> {
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

    pub(super) async fn refresh_inventory(&mut self) {
        match self.query("inventory", Value::Null).await {
            Ok(inv) => self.set(|s| s.inventory = Some(inv)),
            Err(e) => tracing::warn!("could not list Wan2GP's models: {e}"),
        }
        self.inventory_at = Some(Instant::now());
    }

    /// Between jobs: recycle the bridge if it is due.
    pub(super) async fn after_job(&mut self) {
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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_a_minute() {
        assert_eq!(backoff(0), Duration::ZERO);
        assert_eq!(backoff(1), Duration::from_secs(1));
        assert_eq!(backoff(3), Duration::from_secs(4));
        assert_eq!(backoff(30), Duration::from_secs(60));
    }
}
