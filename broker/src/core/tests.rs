//! Deterministic tests of the core with a simulated clock: no sockets, no sleeps.

use bytes::Bytes;
use kiln_protocol::request::*;
use kiln_protocol::worker::*;
use kiln_protocol::*;

use super::*;

const HB: u64 = 1_000;

pub(super) struct Sim {
    pub(super) core: Core,
    pub(super) now: u64,
}

pub(super) fn peer(name: &str) -> PeerId {
    Bytes::copy_from_slice(name.as_bytes())
}

pub(super) fn inventory(backend: Backend, models: &[&str]) -> BackendInventory {
    BackendInventory {
        backend,
        healthy: true,
        models: models
            .iter()
            .map(|m| ModelEntry {
                name: m.to_string(),
                kind: "checkpoints".into(),
            })
            .collect(),
        detail: None,
        params: None,
    }
}

/// A healthy worker's heartbeat with `current` and `held`, nothing resident.
pub(super) fn heartbeat(current: Option<JobRef>, held: Vec<JobRef>) -> Heartbeat {
    Heartbeat {
        free_vram_mb: 1000,
        utilization_pct: None,
        temperature_c: None,
        power_mw: None,
        current,
        held,
        loaded_model: None,
        resident: None,
        healthy: true,
        backends: None,
    }
}

pub(super) fn spec() -> JobSpec {
    JobSpec::new(Backend::Sim, Task::TextToImage).param("prompt", "a kiln")
}

impl Sim {
    pub(super) fn new() -> Sim {
        Self::with(CoreConfig::default())
    }

    pub(super) fn with(cfg: CoreConfig) -> Sim {
        Sim {
            core: Core::new(cfg, 0),
            now: 0,
        }
    }

    pub(super) fn input(&mut self, input: Input) -> Vec<Output> {
        let mut out = Vec::new();
        self.core.handle(self.now, input, &mut out);
        out
    }

    pub(super) fn request(&mut self, client: &str, request: Request) -> Vec<Output> {
        self.input(Input::Request {
            peer: peer(client),
            request,
        })
    }

    pub(super) fn worker(&mut self, w: &str, msg: WorkerMessage) -> Vec<Output> {
        self.input(Input::Worker { peer: peer(w), msg })
    }

    /// Moves the clock forward, ticking whenever the core asked to be woken.
    pub(super) fn advance(&mut self, ms: u64) -> Vec<Output> {
        let end = self.now + ms;
        let mut out = Vec::new();
        while let Some(at) = self.core.poll_timeout().filter(|at| *at <= end) {
            self.now = self.now.max(at);
            self.core.handle(self.now, Input::Tick, &mut out);
        }
        self.now = end;
        self.core.handle(self.now, Input::Tick, &mut out);
        out
    }

    pub(super) fn register_full(
        &mut self,
        w: &str,
        vram_mb: u64,
        backends: Vec<BackendInventory>,
        labels: &[&str],
        loaded: Option<&str>,
    ) -> Vec<Output> {
        let reg = Register {
            token: None,
            worker_id: w.to_string(),
            instance: format!("{w}-instance"),
            hostname: "box".into(),
            version: "test".into(),
            gpu: GpuInfo {
                name: format!("GPU {vram_mb}"),
                total_vram_mb: vram_mb,
                free_vram_mb: vram_mb,
                ..GpuInfo::default()
            },
            backends,
            labels: labels.iter().map(|s| s.to_string()).collect(),
            loaded_model: loaded.map(str::to_string),
            current: None,
            unacked: None,
            held: Vec::new(),
            max_held: 0,
            resident: Vec::new(),
        };
        self.worker(w, WorkerMessage::Register(Box::new(reg)))
    }

    pub(super) fn register(&mut self, w: &str, vram_mb: u64) -> Vec<Output> {
        self.register_full(
            w,
            vram_mb,
            vec![inventory(Backend::Sim, &["sim-sd15", "sim-sdxl"])],
            &[],
            None,
        )
    }

    /// A heartbeat from a worker that holds what the broker assigned it.
    fn beat(&mut self, w: &str) -> Vec<Output> {
        let current = self
            .core
            .workers()
            .by_id(w)
            .and_then(|i| self.core.workers().get(i).current);
        self.beat_holding(w, current)
    }

    fn beat_holding(&mut self, w: &str, current: Option<JobRef>) -> Vec<Output> {
        let held = self
            .core
            .workers()
            .by_id(w)
            .map(|i| {
                self.core
                    .workers()
                    .get(i)
                    .held
                    .iter()
                    .map(|(r, _)| *r)
                    .collect()
            })
            .unwrap_or_default();
        self.beat_full(w, current, held)
    }

    fn beat_full(&mut self, w: &str, current: Option<JobRef>, held: Vec<JobRef>) -> Vec<Output> {
        self.worker(w, WorkerMessage::Heartbeat(heartbeat(current, held)))
    }

    pub(super) fn submit_as(
        &mut self,
        client: &str,
        spec: JobSpec,
    ) -> Result<(JobId, Vec<Output>), ErrorBody> {
        let out = self.request(
            client,
            Request::Submit(Submit {
                req_id: 1,
                job: spec,
                client: None,
            }),
        );
        let accepted = acceptance(&out).unwrap_or_else(|| panic!("no reply to submit: {out:?}"));
        accepted.map(|a| (a.job_id, out))
    }

    pub(super) fn submit(&mut self, spec: JobSpec) -> (JobId, Vec<Output>) {
        self.submit_as("client", spec).expect("accepted")
    }

    pub(super) fn finish(
        &mut self,
        w: &str,
        job: JobId,
        attempt: u32,
        outcome: Outcome,
    ) -> Vec<Output> {
        self.worker(
            w,
            WorkerMessage::Finished(Finished {
                job_id: job,
                attempt,
                outcome,
                loaded_model: None,
            }),
        )
    }

    pub(super) fn succeed(&mut self, w: &str, job: JobId, attempt: u32) -> Vec<Output> {
        self.finish(
            w,
            job,
            attempt,
            Outcome::Succeeded {
                outputs: vec![],
                info: Default::default(),
            },
        )
    }

    pub(super) fn state(&self, job: JobId) -> JobState {
        self.core.job(job).unwrap().state
    }
}

/// The answer to a submit in `out`: `accepted`, or the error body.
pub(super) fn acceptance(out: &[Output]) -> Option<Result<Accepted, ErrorBody>> {
    out.iter().find_map(|o| match o {
        Output::Reply {
            reply: Reply::Accepted(a),
            ..
        } => Some(Ok(a.clone())),
        Output::Reply {
            reply: Reply::Error(e),
            ..
        } => Some(Err(e.error.clone())),
        _ => None,
    })
}

/// The (worker peer, job, attempt) of every Assign in `out`.
fn assigns(out: &[Output]) -> Vec<(String, JobId, u32)> {
    out.iter()
        .filter_map(|o| match o {
            Output::ToWorker {
                peer,
                msg: BrokerMessage::Assign(a),
            } => Some((
                String::from_utf8_lossy(peer).into_owned(),
                a.job_id,
                a.attempt,
            )),
            _ => None,
        })
        .collect()
}

pub(super) fn error_code(out: &[Output]) -> Option<ErrorCode> {
    out.iter().find_map(|o| match o {
        Output::Reply {
            reply: Reply::Error(e),
            ..
        } => Some(e.error.code),
        _ => None,
    })
}

fn cancels(out: &[Output]) -> Vec<JobRef> {
    out.iter()
        .filter_map(|o| match o {
            Output::ToWorker {
                msg: BrokerMessage::Cancel(r),
                ..
            } => Some(*r),
            _ => None,
        })
        .collect()
}

#[test]
fn a_job_runs_on_a_registered_worker_and_succeeds() {
    let mut sim = Sim::new();
    sim.register("w1", 8000);
    let (job, out) = sim.submit(spec());
    assert_eq!(assigns(&out), [("w1".to_string(), job, 1)]);
    assert_eq!(sim.state(job), JobState::Running);
    let out = sim.succeed("w1", job, 1);
    assert_eq!(sim.state(job), JobState::Succeeded);
    assert!(out.iter().any(|o| matches!(o, Output::ToWorker { msg: BrokerMessage::ResultAck(r), .. } if r.job_id == job)));
    // Events carry strictly increasing sequence numbers.
    let seqs: Vec<u64> = out
        .iter()
        .filter_map(|o| match o {
            Output::Publish(e) => e.seq(),
            _ => None,
        })
        .collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]));
}

#[test]
fn impossible_jobs_are_refused_with_the_reason() {
    let mut sim = Sim::new();
    let err = sim.submit_as("c", spec()).unwrap_err();
    assert_eq!(err.code, ErrorCode::Unschedulable);
    assert!(err.message.contains("no workers"), "{}", err.message);

    sim.register("w24", 24_576);
    let mut big = spec();
    big.min_vram_mb = Some(40_960);
    let err = sim.submit_as("c", big).unwrap_err();
    assert_eq!(err.code, ErrorCode::Unschedulable);
    assert!(
        err.message.contains("needs 40960 MiB") && err.message.contains("24576 MiB"),
        "{}",
        err.message
    );
    assert_eq!(err.field.as_deref(), Some("job.min_vram_mb"));

    let err = sim
        .submit_as("c", JobSpec::new(Backend::Wan2gp, Task::TextToVideo))
        .unwrap_err();
    assert!(
        err.message.contains("no worker offers backend wan2gp"),
        "{}",
        err.message
    );

    let mut m = spec();
    m.model = Some("flux-dev".into());
    let err = sim.submit_as("c", m).unwrap_err();
    assert!(err.message.contains("flux-dev"), "{}", err.message);

    let mut l = spec();
    l.labels = vec!["nvlink".into()];
    let err = sim.submit_as("c", l).unwrap_err();
    assert!(err.message.contains("nvlink"), "{}", err.message);
    assert_eq!(sim.core.jobs_len(), 0, "nothing refused was queued");
}

#[test]
fn a_job_that_can_run_waits_for_a_busy_worker() {
    let mut sim = Sim::new();
    sim.register("w1", 8000);
    let (a, _) = sim.submit(spec());
    let (b, out) = sim.submit(spec());
    assert!(assigns(&out).is_empty());
    assert_eq!(sim.state(b), JobState::Queued);
    let out = sim.succeed("w1", a, 1);
    assert_eq!(assigns(&out), [("w1".to_string(), b, 1)]);
}

#[test]
fn heartbeat_loss_requeues_the_job_on_another_worker() {
    let mut sim = Sim::new();
    sim.register("w1", 8000);
    let (job, _) = sim.submit(spec());
    sim.register("w2", 8000);
    // w2 keeps beating, w1 falls silent.
    let mut moved = Vec::new();
    for _ in 0..5 {
        sim.beat("w2");
        moved.extend(sim.advance(HB));
    }
    assert_eq!(assigns(&moved), [("w2".to_string(), job, 2)]);
    assert_eq!(sim.core.stats().requeues, 1);
    assert_eq!(sim.core.stats().oom_retries, 0);
    let snap = sim.core.job(job).unwrap().snapshot(true);
    assert!(
        snap.history
            .iter()
            .any(|t| t.note.contains("missed 3 heartbeats")),
        "{:?}",
        snap.history
    );
    let w1 = sim
        .core
        .workers()
        .get(sim.core.workers().by_id("w1").unwrap())
        .info();
    assert_eq!(w1.state, WorkerState::Offline);
    assert_eq!(
        w1.offline_reason.as_deref(),
        Some("missed 3 heartbeats"),
        "workers say why a worker went away"
    );
    sim.register("w1", 8000);
    let back = sim
        .core
        .workers()
        .get(sim.core.workers().by_id("w1").unwrap())
        .info();
    assert_eq!(back.offline_reason, None, "online again: no reason shown");
}

#[test]
fn a_stale_attempt_result_is_ignored() {
    let mut sim = Sim::new();
    sim.register("w1", 8000);
    let (job, _) = sim.submit(spec());
    sim.register("w2", 8000);
    for _ in 0..5 {
        sim.beat("w2");
        sim.advance(HB);
    }
    assert_eq!(sim.core.job(job).unwrap().attempt, 2);
    // w1 comes back from the dead with attempt 1's result.
    let out = sim.succeed("w1", job, 1);
    assert!(out.iter().any(|o| matches!(
        o,
        Output::ToWorker {
            msg: BrokerMessage::Reregister(_),
            ..
        }
    )));
    sim.register("w1", 8000);
    let out = sim.succeed("w1", job, 1);
    assert_eq!(
        sim.state(job),
        JobState::Running,
        "stale result must not finish the job"
    );
    assert_eq!(sim.core.stats().stale_results, 1);
    assert!(out.iter().any(
        |o| matches!(o, Output::ToWorker { msg: BrokerMessage::ResultAck(r), .. } if r.attempt == 1)
    ));
    sim.succeed("w2", job, 2);
    assert_eq!(sim.state(job), JobState::Succeeded);
}

#[test]
fn attempts_are_bounded() {
    let mut sim = Sim::new();
    sim.register("w1", 8000);
    let mut s = spec();
    s.max_attempts = Some(2);
    let (job, _) = sim.submit(s);
    for attempt in 1..=2 {
        let err = JobError::new(FailureKind::WorkerLost, "boom", true);
        let out = sim.finish("w1", job, attempt, Outcome::Failed { error: err });
        if attempt == 1 {
            assert_eq!(assigns(&out), [("w1".to_string(), job, 2)]);
        }
    }
    let j = sim.core.job(job).unwrap();
    assert_eq!(j.state, JobState::Failed);
    let e = j.error.as_ref().unwrap();
    assert_eq!(e.kind, FailureKind::MaxAttempts);
    assert!(e.message.contains("2 of 2 attempts"), "{}", e.message);
}

#[test]
fn cancel_queued_and_running() {
    let mut sim = Sim::new();
    sim.register("w1", 8000);
    let (running, _) = sim.submit(spec());
    let (queued, _) = sim.submit(spec());

    let out = sim.request(
        "client",
        Request::Cancel(Cancel {
            req_id: 2,
            job_id: queued,
        }),
    );
    assert_eq!(sim.state(queued), JobState::Cancelled);
    assert!(out.iter().any(|o| matches!(o, Output::Reply { reply: Reply::Cancelled(c), .. } if c.state == JobState::Cancelled)));
    assert_eq!(sim.core.queued(), 0);

    let out = sim.request(
        "client",
        Request::Cancel(Cancel {
            req_id: 3,
            job_id: running,
        }),
    );
    assert_eq!(
        cancels(&out),
        [JobRef {
            job_id: running,
            attempt: 1
        }]
    );
    assert_eq!(sim.state(running), JobState::Running);
    assert!(sim.core.job(running).unwrap().cancel_requested);
    sim.finish("w1", running, 1, Outcome::Cancelled);
    assert_eq!(sim.state(running), JobState::Cancelled);

    let out = sim.request(
        "client",
        Request::Cancel(Cancel {
            req_id: 4,
            job_id: JobId(999),
        }),
    );
    assert_eq!(error_code(&out), Some(ErrorCode::NotFound));
}

#[test]
fn an_unconfirmed_cancel_is_recorded_after_the_grace_period() {
    let mut sim = Sim::new();
    sim.register("w1", 8000);
    let (job, _) = sim.submit(spec());
    sim.request(
        "client",
        Request::Cancel(Cancel {
            req_id: 2,
            job_id: job,
        }),
    );
    for _ in 0..31 {
        sim.beat("w1");
        sim.advance(HB);
    }
    assert_eq!(sim.state(job), JobState::Cancelled);
    // The worker is still busy with it until it says so.
    let w = sim.core.workers().by_id("w1").unwrap();
    assert_eq!(sim.core.workers().get(w).state(), WorkerState::Busy);
    sim.finish("w1", job, 1, Outcome::Cancelled);
    assert_eq!(sim.core.workers().get(w).state(), WorkerState::Idle);
}

#[test]
fn an_assignment_the_worker_never_received_is_requeued() {
    let mut sim = Sim::new();
    sim.register("w1", 8000);
    let (job, _) = sim.submit(spec());
    // A beat that crosses the assignment is not evidence of loss.
    let out = sim.beat_holding("w1", None);
    assert!(assigns(&out).is_empty());
    assert_eq!(sim.state(job), JobState::Running);
    // Two heartbeats later the worker still does not name it: lost on the way.
    sim.advance(2 * HB);
    let out = sim.beat_holding("w1", None);
    assert_eq!(assigns(&out), [("w1".to_string(), job, 2)]);
    let snap = sim.core.job(job).unwrap().snapshot(true);
    assert!(snap
        .history
        .iter()
        .any(|t| t.note.contains("never reached the worker")));
}

#[test]
fn priority_first_then_fair_between_clients() {
    let mut sim = Sim::new();
    sim.register("w1", 8000);
    let (first, _) = sim.submit_as("alice", spec()).unwrap();
    let alice: Vec<JobId> = (0..3)
        .map(|_| sim.submit_as("alice", spec()).unwrap().0)
        .collect();
    let bob: Vec<JobId> = (0..2)
        .map(|_| sim.submit_as("bob", spec()).unwrap().0)
        .collect();
    let mut urgent = spec();
    urgent.priority = 5;
    let (urgent, _) = sim.submit_as("carol", urgent).unwrap();

    let mut order = Vec::new();
    let mut current = (first, 1);
    for _ in 0..6 {
        let out = sim.succeed("w1", current.0, current.1);
        let a = assigns(&out);
        assert_eq!(a.len(), 1);
        current = (a[0].1, a[0].2);
        order.push(current.0);
    }
    assert_eq!(
        order,
        [urgent, alice[0], bob[0], alice[1], bob[1], alice[2]]
    );
}

#[test]
fn affinity_prefers_the_worker_with_the_model_loaded_then_free_memory() {
    let mut sim = Sim::new();
    let inv = || vec![inventory(Backend::Sim, &["sim-sd15", "sim-sdxl"])];
    sim.register_full("big", 48_000, inv(), &[], Some("sim-sd15"));
    sim.register_full("warm", 8_000, inv(), &[], Some("sim-sdxl"));
    let mut s = spec();
    s.model = Some("sim-sdxl".into());
    let (_, out) = sim.submit(s);
    assert_eq!(
        assigns(&out)[0].0,
        "warm",
        "the loaded model wins over memory"
    );
    // No affinity: the most free memory wins.
    let (_, out) = sim.submit(spec());
    assert_eq!(assigns(&out)[0].0, "big");
}

#[test]
fn a_big_job_waiting_does_not_block_a_small_job() {
    let mut sim = Sim::new();
    sim.register("big", 48_000);
    sim.register("small", 8_000);
    let mut hog = spec();
    hog.min_vram_mb = Some(40_000);
    let (h1, out) = sim.submit(hog.clone());
    assert_eq!(assigns(&out)[0].0, "big");
    let (h2, out) = sim.submit(hog);
    assert!(assigns(&out).is_empty(), "must wait for the big GPU");
    let (small_job, out) = sim.submit(spec());
    assert_eq!(assigns(&out), [("small".to_string(), small_job, 1)]);
    let out = sim.succeed("big", h1, 1);
    assert_eq!(assigns(&out), [("big".to_string(), h2, 1)]);
}

#[test]
fn labels_and_backends_filter_workers() {
    let mut sim = Sim::new();
    sim.register_full("plain", 8000, vec![inventory(Backend::Sim, &[])], &[], None);
    sim.register_full(
        "fast",
        8000,
        vec![inventory(Backend::Sim, &[])],
        &["fast"],
        None,
    );
    let mut s = spec();
    s.labels = vec!["fast".into()];
    let (_, out) = sim.submit(s);
    assert_eq!(assigns(&out)[0].0, "fast");
}

#[test]
fn queue_and_run_timeouts() {
    let mut sim = Sim::new();
    sim.register("w1", 8000);
    let mut slow = spec();
    slow.run_timeout_s = Some(5);
    let (running, _) = sim.submit(slow);
    let mut impatient = spec();
    impatient.queue_timeout_s = Some(2);
    let (waiting, _) = sim.submit(impatient);
    let mut out = Vec::new();
    for _ in 0..6 {
        sim.beat("w1");
        out.extend(sim.advance(HB));
    }
    let w = sim.core.job(waiting).unwrap();
    assert_eq!(w.state, JobState::Failed);
    assert_eq!(w.error.as_ref().unwrap().kind, FailureKind::QueueTimeout);
    let r = sim.core.job(running).unwrap();
    assert_eq!(r.state, JobState::Failed);
    assert_eq!(r.error.as_ref().unwrap().kind, FailureKind::RunTimeout);
    assert_eq!(
        cancels(&out),
        [JobRef {
            job_id: running,
            attempt: 1
        }],
        "the worker is told to stop"
    );
}

#[test]
fn progress_is_monotone_and_sequenced() {
    let mut sim = Sim::new();
    sim.register("w1", 8000);
    let (job, _) = sim.submit(spec());
    let mut seqs = Vec::new();
    for pct in [10.0, 40.0, 30.0, f64::NAN, 90.0] {
        let out = sim.worker(
            "w1",
            WorkerMessage::Progress(ProgressReport {
                job_id: job,
                attempt: 1,
                progress: Progress {
                    pct,
                    step: None,
                    steps: None,
                    stage: "x".repeat(1000),
                },
            }),
        );
        for o in out {
            if let Output::Publish(Event::JobProgress(p)) = o {
                assert!(p.progress.stage.len() <= 256);
                seqs.push((p.seq, p.progress.pct));
            }
        }
    }
    let pcts: Vec<f64> = seqs.iter().map(|s| s.1).collect();
    assert_eq!(pcts, [10.0, 40.0, 40.0, 40.0, 90.0]);
    assert!(seqs.windows(2).all(|w| w[1].0 == w[0].0 + 1));
    // Progress for an attempt that is not current is dropped.
    let out = sim.worker(
        "w1",
        WorkerMessage::Progress(ProgressReport {
            job_id: job,
            attempt: 7,
            progress: Progress::default(),
        }),
    );
    assert!(out.is_empty());
}

#[test]
fn malformed_requests_get_typed_errors_and_are_counted() {
    let mut sim = Sim::new();
    let out = sim.input(Input::BadRequest {
        peer: peer("c"),
        req_id: Some(4),
        error: ProtocolError::UnknownType("explode".into()),
    });
    assert!(
        matches!(&out[..], [Output::Reply { reply: Reply::Error(e), .. }] if e.req_id == Some(4) && e.error.code == ErrorCode::UnknownType)
    );
    assert_eq!(sim.core.stats().protocol_errors, 1);
}

#[test]
fn a_refused_assignment_costs_no_attempt_and_the_stale_work_is_stopped() {
    let mut sim = Sim::new();
    sim.register("w1", 8000);
    let mut s = spec();
    s.max_attempts = Some(1);
    let (a, _) = sim.submit(s);
    // The worker re-registers without the job (a reconnect race): attempt 1 is lost…
    sim.register("w1", 8000);
    let a2 = sim.core.job(a).unwrap().attempt;
    assert_eq!(
        sim.state(a),
        JobState::Failed,
        "one attempt allowed, and it was lost"
    );
    let (b, out) = sim.submit(spec());
    assert_eq!(assigns(&out), [("w1".to_string(), b, 1)]);
    // …but the worker was still running attempt 1 of `a`, so it refuses `b`.
    let out = sim.worker(
        "w1",
        WorkerMessage::Refused(Refused {
            job_id: b,
            attempt: 1,
            busy_with: JobRef {
                job_id: a,
                attempt: a2,
            },
        }),
    );
    assert_eq!(
        cancels(&out),
        [JobRef {
            job_id: a,
            attempt: a2
        }],
        "the stale work is stopped"
    );
    assert!(assigns(&out).is_empty(), "not offered again while busy");
    let job = sim.core.job(b).unwrap();
    assert_eq!((job.state, job.attempts_used()), (JobState::Queued, 0));
    // When the stale attempt ends the worker is free and takes `b` again.
    let out = sim.finish("w1", a, a2, Outcome::Cancelled);
    assert_eq!(assigns(&out), [("w1".to_string(), b, 2)]);
    sim.succeed("w1", b, 2);
    assert_eq!(
        sim.state(b),
        JobState::Succeeded,
        "max_attempts 1 was not used up by the refusal"
    );
}

#[test]
fn nothing_starts_while_the_store_cannot_write_and_the_queue_resumes_after() {
    let mut sim = Sim::new();
    sim.register("w1", 8000);
    let (a, _) = sim.submit(spec());
    let (b, _) = sim.submit(spec());
    sim.input(Input::StoreFault {
        cause: Some("No space left on device (os error 28)".into()),
    });
    // w1 finishes a: b must wait, its outputs could not be kept now.
    let out = sim.succeed("w1", a, 1);
    assert!(assigns(&out).is_empty(), "{out:?}");
    let refused = sim.submit_as("client", spec()).unwrap_err();
    assert_eq!(refused.code, ErrorCode::Unavailable);
    assert!(
        refused.message.contains("No space left"),
        "{}",
        refused.message
    );
    // The store writes again: b starts on the idle worker at once.
    let out = sim.input(Input::StoreFault { cause: None });
    let started = assigns(&out);
    assert_eq!(started.len(), 1, "{out:?}");
    assert_eq!((started[0].0.as_str(), started[0].1), ("w1", b));
}

mod memory;
mod pipeline;
mod placement;
mod recovery;
mod resubmit;
mod sessions;
mod tokens;
mod uploads;
mod waiting;
