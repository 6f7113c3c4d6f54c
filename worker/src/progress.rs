//! A job's progress on its way from the backend to the runner.
//!
//! A backend reports as often as it likes; the runner sends to the broker at
//! most ten times a second. What may be merged on the way is only a run of
//! updates within one stage (the percentage and step counter of "sampling
//! 3/20", "sampling 4/20", …): every change of stage (a ComfyUI node starting,
//! "encoding", "downloading x.png") reaches the broker, in order, however short
//! the job. A watch channel kept only the newest value, so the nodes of a job
//! shorter than the throttle were never seen.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kiln_protocol::Progress;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::backend::Phase;

/// Most stage changes held for the runner at once. Far above what a real
/// backend reports in one 100 ms window (a ComfyUI graph of a few hundred nodes
/// finishing inside it); past it a runaway backend's newest update replaces
/// the last one held, so memory stays bounded.
pub const MAX_HELD: usize = 1024;

#[derive(Default)]
struct Queue {
    /// Updates not yet taken by the runner, oldest first; no two neighbours
    /// are of the same stage.
    held: VecDeque<Progress>,
    latest: Option<Progress>,
    /// Bumped on every report; the feed remembers the last one it saw.
    version: u64,
    /// Every sink is gone (the attempt is over).
    closed: bool,
}

struct Shared {
    queue: Mutex<Queue>,
    notify: Notify,
    /// Fired once the generator has the attempt (it entered [`Phase::Queued`] or
    /// a later phase) or the attempt is over: a held attempt stages after it.
    handed_over: CancellationToken,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, Queue> {
        // A panic while holding this lock leaves nothing half-written.
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Marks the queue closed when the last sink is dropped.
struct SinkGuard(Arc<Shared>);

impl Drop for SinkGuard {
    fn drop(&mut self) {
        self.0.lock().closed = true;
        self.0.notify.notify_one();
        self.0.handed_over.cancel();
    }
}

/// The phases an attempt went through, with their durations.
#[derive(Debug, Default)]
struct PhaseClock {
    open: Option<(Phase, Instant)>,
    done: Vec<(Phase, Duration)>,
}

impl PhaseClock {
    fn close(&mut self, now: Instant) {
        if let Some((phase, since)) = self.open.take() {
            self.done
                .push((phase, now.saturating_duration_since(since)));
        }
    }
}

/// Where a backend reports its progress: cheap to clone, never blocks. It also
/// times the attempt's [`Phase`]s.
#[derive(Clone)]
pub struct ProgressSink {
    guard: Arc<SinkGuard>,
    phases: Arc<Mutex<PhaseClock>>,
}

/// The runner's end: wakes on new reports and hands over every stage held.
pub struct ProgressFeed {
    shared: Arc<Shared>,
    seen: u64,
}

/// What makes two updates "the same stage": the stage text with the update's
/// own step counter (`3/20`) taken out, and the step total. "sampling 3/20" and
/// "sampling 4/20" are one stage; "KSampler (node 2 of 4)" and
/// "KSampler (node 3 of 4)", or "downloading a.png" and "downloading b.png",
/// are not.
pub fn stage_key(p: &Progress) -> (String, Option<u32>) {
    let text = match (p.step, p.steps) {
        (Some(step), Some(steps)) => p.stage.replacen(&format!("{step}/{steps}"), "", 1),
        _ => p.stage.clone(),
    };
    (text, p.steps)
}

impl ProgressSink {
    pub fn new() -> (ProgressSink, ProgressFeed) {
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue::default()),
            notify: Notify::new(),
            handed_over: CancellationToken::new(),
        });
        (
            ProgressSink {
                guard: Arc::new(SinkGuard(shared.clone())),
                phases: Arc::default(),
            },
            ProgressFeed { shared, seen: 0 },
        )
    }

    /// The attempt enters `phase`, which ends the phase it was in. Entering the
    /// phase it is already in changes nothing.
    pub fn enter(&self, phase: Phase) {
        if phase != Phase::Upload {
            self.guard.0.handed_over.cancel();
        }
        let mut clock = self.phases.lock().unwrap_or_else(|e| e.into_inner());
        if clock.open.is_some_and(|(p, _)| p == phase) {
            return;
        }
        let now = Instant::now();
        clock.close(now);
        clock.open = Some((phase, now));
    }

    /// The attempt leaves its phase (nothing timed until the next [`enter`]).
    ///
    /// [`enter`]: ProgressSink::enter
    pub fn leave(&self) {
        let mut clock = self.phases.lock().unwrap_or_else(|e| e.into_inner());
        clock.close(Instant::now());
    }

    /// Ends the open phase and returns every phase timed so far, in order.
    pub fn take_phases(&self) -> Vec<(Phase, Duration)> {
        let mut clock = self.phases.lock().unwrap_or_else(|e| e.into_inner());
        clock.close(Instant::now());
        std::mem::take(&mut clock.done)
    }

    pub fn report(&self, progress: Progress) {
        let shared = &self.guard.0;
        {
            let mut q = shared.lock();
            q.version += 1;
            q.latest = Some(progress.clone());
            let same_stage = q
                .held
                .back()
                .is_some_and(|last| stage_key(last) == stage_key(&progress));
            if same_stage || q.held.len() >= MAX_HELD {
                if !same_stage {
                    tracing::warn!(
                        held = MAX_HELD,
                        "a backend changes stage faster than progress can be sent; merging"
                    );
                }
                *q.held.back_mut().expect("non-empty") = progress;
            } else {
                q.held.push_back(progress);
            }
        }
        shared.notify.notify_one();
    }

    /// Step `step` of `steps`, mapped into the share `[from, to]` of the whole job.
    pub fn step(&self, step: u32, steps: u32, from: f64, to: f64, stage: impl Into<String>) {
        let frac = if steps == 0 {
            1.0
        } else {
            step as f64 / steps as f64
        };
        self.report(Progress {
            pct: from + (to - from) * frac.clamp(0.0, 1.0),
            step: Some(step),
            steps: Some(steps),
            stage: stage.into(),
        });
    }

    /// A stage without steps at `pct`.
    pub fn stage(&self, pct: f64, stage: impl Into<String>) {
        self.report(Progress {
            pct,
            step: None,
            steps: None,
            stage: stage.into(),
        });
    }
}

/// Every sink of the attempt is gone and everything reported was seen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Closed;

impl ProgressFeed {
    /// Fires once the generator has the attempt in its own queue (the backend
    /// entered [`Phase::Queued`] or a later phase) or the attempt is over.
    pub fn handed_over(&self) -> CancellationToken {
        self.shared.handed_over.clone()
    }

    /// Waits for a report not yet seen by this call; `Err(Closed)` once every
    /// sink is dropped and nothing new is left. Cancel-safe.
    pub async fn changed(&mut self) -> Result<(), Closed> {
        loop {
            let notified = self.shared.notify.notified();
            {
                let q = self.shared.lock();
                if q.version > self.seen {
                    self.seen = q.version;
                    return Ok(());
                }
                if q.closed {
                    return Err(Closed);
                }
            }
            notified.await;
        }
    }

    /// Takes every stage held, oldest first (each with its newest percentage).
    pub fn drain(&mut self) -> Vec<Progress> {
        self.shared.lock().held.drain(..).collect()
    }

    /// The newest report, taken or not.
    pub fn latest(&self) -> Option<Progress> {
        self.shared.lock().latest.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stages(v: &[Progress]) -> Vec<&str> {
        v.iter().map(|p| p.stage.as_str()).collect()
    }

    #[test]
    fn every_stage_is_kept_in_order_and_only_steps_within_one_merge() {
        let (sink, mut feed) = ProgressSink::new();
        sink.stage(0.0, "preparing the workflow");
        sink.stage(1.0, "EmptyImage (node 1 of 3)");
        sink.stage(2.0, "ImageInvert (node 2 of 3)");
        for i in 1..=10 {
            sink.step(i, 10, 5.0, 90.0, format!("KSampler {i}/10 (node 3 of 3)"));
        }
        sink.step(0, 2, 95.0, 100.0, "downloading a.png");
        sink.step(1, 2, 95.0, 100.0, "downloading b.png");
        let got = feed.drain();
        assert_eq!(
            stages(&got),
            [
                "preparing the workflow",
                "EmptyImage (node 1 of 3)",
                "ImageInvert (node 2 of 3)",
                "KSampler 10/10 (node 3 of 3)",
                "downloading a.png",
                "downloading b.png",
            ]
        );
        assert_eq!(
            got[3].pct, 90.0,
            "the merged stage carries its newest percentage"
        );
        assert!(feed.drain().is_empty());
        assert_eq!(feed.latest().unwrap().stage, "downloading b.png");
        // The same node with and without a bar are two stages; so are two
        // nodes of one class.
        sink.stage(1.0, "KSampler (node 2 of 4)");
        sink.step(1, 8, 1.0, 2.0, "KSampler 1/8 (node 2 of 4)");
        sink.stage(3.0, "KSampler (node 3 of 4)");
        assert_eq!(feed.drain().len(), 3);
    }

    #[test]
    fn a_runaway_backend_is_bounded() {
        let (sink, mut feed) = ProgressSink::new();
        for i in 0..(MAX_HELD as u32 + 50) {
            sink.stage(0.0, format!("stage {i}"));
        }
        let got = feed.drain();
        assert_eq!(got.len(), MAX_HELD);
        assert_eq!(
            got.last().unwrap().stage,
            format!("stage {}", MAX_HELD + 49)
        );
    }

    #[tokio::test]
    async fn the_feed_wakes_once_per_news_and_ends_when_the_sinks_are_gone() {
        let (sink, mut feed) = ProgressSink::new();
        sink.stage(1.0, "a");
        sink.stage(2.0, "b");
        feed.changed().await.unwrap();
        // Seen: no second wake for the same news.
        let again = tokio::time::timeout(std::time::Duration::from_millis(50), feed.changed());
        assert!(again.await.is_err(), "no news, no wake");
        let clone = sink.clone();
        drop(sink);
        clone.stage(3.0, "c");
        drop(clone);
        assert_eq!(
            feed.changed().await,
            Ok(()),
            "the last report before closing"
        );
        assert_eq!(feed.changed().await, Err(Closed));
        assert_eq!(stages(&feed.drain()), ["a", "b", "c"]);
    }
}
