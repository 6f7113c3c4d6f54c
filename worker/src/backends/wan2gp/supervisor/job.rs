//! One job on the bridge, from `submit` to its terminal message, whatever
//! happens to the process meanwhile, and how Wan2GP's failures map to Kiln's.

use std::collections::VecDeque;
use std::path::PathBuf;

use kiln_protocol::{FailureKind, JobError};
use tokio::time::Instant;

use super::super::process::Incoming;
use super::super::progress::ProgressMapper;
use super::super::protocol::{ErrorMsg, FromBridge, ToBridge};
use super::watchdog::{Alarm, Clocks, Watch};
use super::*;

/// Lines of Wan2GP output kept for failure reports.
pub(super) const LOG_TAIL: usize = 12;

/// What one turn of a job's loop decided.
pub(super) enum Step {
    Continue,
    End(JobEnd),
    /// The bridge must go: kill it (or, if it already exited, reap it), then end
    /// the job with this.
    Kill {
        why: String,
        end: JobEnd,
    },
}

pub(super) fn retryable(kind: FailureKind, msg: impl Into<String>) -> JobEnd {
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
    /// Runs one job to its end, whatever happens to the bridge.
    pub(super) async fn drive(&mut self, job: JobRequest) {
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

    pub(super) async fn follow(&mut self, job: &JobRequest) -> JobEnd {
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
        let watch = Watch::new(&self.s);
        loop {
            let Some(live) = self.bridge.as_mut() else {
                return retryable(
                    FailureKind::Backend,
                    format!("the Wan2GP bridge went away: {}", self.last_error),
                );
            };
            let clocks = Clocks {
                last_heard: live.last_heard,
                last_activity,
                cancel_sent,
                stopping: self.stopping.is_cancelled(),
            };
            let next = watch.next(&clocks);
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
                _ = tokio::time::sleep_until(next) => match watch.alarm(&clocks, Instant::now()) {
                    Some(Alarm::CancelIgnored) => Step::Kill {
                        why: format!("the job did not stop within {:?} of the cancel (worker.wan2gp.cancel_grace_s)", self.s.cancel_grace),
                        end: JobEnd::Cancelled,
                    },
                    Some(Alarm::Wedged) => {
                        let why = format!("no heartbeat for {:?}", self.s.heartbeat_timeout);
                        let end = retryable(FailureKind::Backend, format!("the Wan2GP bridge stopped answering ({why}); it was restarted"));
                        Step::Kill { why, end }
                    }
                    Some(Alarm::Stalled) => {
                        let why = format!("the job reported nothing for {:?} (worker.wan2gp.stall_timeout_s)", self.s.stall_timeout);
                        let end = if cancelling { JobEnd::Cancelled } else { retryable(FailureKind::Backend, format!("Wan2GP stalled: {why}")) };
                        Step::Kill { why, end }
                    }
                    None => Step::Continue,
                },
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

    pub(super) async fn send_cancel(
        &mut self,
        key: &str,
        cancel_sent: &mut Option<Instant>,
    ) -> Step {
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

    pub(super) fn on_job_message(
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
}
