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
fn out_of_memory_retries_on_a_bigger_gpu_or_fails_when_there_is_none() {
    let mut sim = Sim::new();
    sim.register("small", 8_000);
    let (job, out) = sim.submit(spec());
    assert_eq!(assigns(&out)[0].0, "small");
    sim.register("big", 24_000); // busy-free, but the job is on small already
    let oom = JobError::new(FailureKind::OutOfMemory, "CUDA out of memory", true);
    let out = sim.finish("small", job, 1, Outcome::Failed { error: oom.clone() });
    assert_eq!(assigns(&out), [("big".to_string(), job, 2)]);
    let out = sim.finish("big", job, 2, Outcome::Failed { error: oom });
    assert!(assigns(&out).is_empty());
    let j = sim.core.job(job).unwrap();
    assert_eq!(j.state, JobState::Failed);
    assert!(j
        .error
        .as_ref()
        .unwrap()
        .message
        .contains("no GPU in the fleet has more"));
}

#[test]
fn uploads_are_checked_and_finalized() {
    let mut sim = Sim::new();
    sim.register("w1", 8000);
    let (job, _) = sim.submit(spec());
    let piece = |offset: u64, data: &[u8]| {
        WorkerMessage::Upload(Upload {
            job_id: job,
            attempt: 1,
            index: 0,
            name: "out.png".into(),
            media_type: "image/png".into(),
            offset,
            total: 6,
            data: data.to_vec(),
        })
    };
    let out = sim.worker("w1", piece(0, b"abc"));
    assert!(matches!(
        &out[..],
        [Output::Artifact(ArtifactOp::Write { offset: 0, .. })]
    ));
    sim.worker("w1", piece(3, b"def"));
    let meta = OutputMeta {
        index: 0,
        name: "out.png".into(),
        media_type: "image/png".into(),
        size: 6,
        sha256: "x".into(),
    };
    let out = sim.finish(
        "w1",
        job,
        1,
        Outcome::Succeeded {
            outputs: vec![meta.clone()],
            info: Default::default(),
        },
    );
    assert!(out
        .iter()
        .any(|o| matches!(o, Output::Artifact(ArtifactOp::Finalize { .. }))));
    assert_eq!(sim.state(job), JobState::Running, "not done until stored");
    let stored = ArtifactMeta {
        id: ArtifactId { job, index: 0 },
        name: meta.name,
        media_type: meta.media_type,
        size: 6,
        sha256: "x".into(),
    };
    sim.input(Input::ArtifactsStored {
        job_id: job,
        attempt: 1,
        result: Ok(vec![stored]),
    });
    assert_eq!(sim.state(job), JobState::Succeeded);

    // Fetch goes to the artifact store with the clamped length.
    let out = sim.request(
        "client",
        Request::Fetch(Fetch {
            req_id: 5,
            artifact_id: ArtifactId { job, index: 0 },
            offset: 2,
            max_len: Some(100),
        }),
    );
    assert!(matches!(
        &out[..],
        [Output::Artifact(ArtifactOp::Read {
            offset: 2,
            len: 4,
            ..
        })]
    ));

    // An out-of-order piece fails the attempt instead of corrupting the file.
    let (job2, _) = sim.submit(spec());
    let bad = WorkerMessage::Upload(Upload {
        job_id: job2,
        attempt: 1,
        index: 0,
        name: "../../x".into(),
        media_type: "image/png".into(),
        offset: 0,
        total: 1,
        data: vec![1],
    });
    let out = sim.worker("w1", bad);
    assert_eq!(
        cancels(&out),
        [JobRef {
            job_id: job2,
            attempt: 1
        }]
    );
    assert_eq!(sim.state(job2), JobState::Queued);
}

#[test]
fn tokens_gate_clients_and_workers() {
    let mut sim = Sim::with(CoreConfig {
        client_token: Some("c-token".into()),
        worker_token: Some("w-token".into()),
        ..CoreConfig::default()
    });
    let out = sim.register("w1", 8000);
    assert!(out.iter().any(|o| matches!(o, Output::ToWorker { msg: BrokerMessage::Error(e), .. } if e.error.code == ErrorCode::Unauthenticated)));
    assert!(sim.core.workers().is_empty());

    let out = sim.request(
        "stranger",
        Request::Submit(Submit {
            req_id: 1,
            job: spec(),
            client: None,
        }),
    );
    assert_eq!(error_code(&out), Some(ErrorCode::Unauthenticated));
    // One error, then nothing for anything but a `hello`.
    let out = sim.request(
        "stranger",
        Request::Submit(Submit {
            req_id: 2,
            job: spec(),
            client: None,
        }),
    );
    assert!(out.is_empty(), "{out:?}");
    assert_eq!(sim.core.jobs_len(), 0);
    // A refused connection may still log in: its `hello` is judged like any other.
    let out = sim.request(
        "stranger",
        Request::Hello(Hello {
            req_id: 3,
            token: Some("c-token".into()),
            client: None,
        }),
    );
    assert!(
        matches!(
            &out[..],
            [Output::Reply {
                reply: Reply::Welcome(_),
                ..
            }]
        ),
        "{out:?}"
    );

    let out = sim.request(
        "friend",
        Request::Hello(Hello {
            req_id: 1,
            token: Some("c-token".into()),
            client: Some("alice".into()),
        }),
    );
    assert!(
        matches!(&out[..], [Output::Reply { reply: Reply::Welcome(w), .. }] if w.client == "alice")
    );
    let out = sim.request(
        "wrong",
        Request::Hello(Hello {
            req_id: 1,
            token: Some("nope".into()),
            client: None,
        }),
    );
    assert_eq!(error_code(&out), Some(ErrorCode::Unauthenticated));
}

#[test]
fn recovery_keeps_order_and_waits_for_running_workers() {
    let cfg = CoreConfig {
        persist: true,
        ..CoreConfig::default()
    };
    let mut sim = Sim::with(cfg.clone());
    sim.register("w1", 8000);
    let (running, _) = sim.submit(spec());
    let queued: Vec<JobId> = (0..3).map(|_| sim.submit(spec()).0).collect();
    // Collect what a store would hold.
    let mut store: std::collections::HashMap<JobId, (Vec<u8>, Vec<u8>)> = Default::default();
    let mut fleet = Vec::new();
    let mut out = Vec::new();
    for id in std::iter::once(running).chain(queued.iter().copied()) {
        let j = sim.core.job(id).unwrap();
        store.insert(id, (j.state_record(), j.spec_record()));
    }
    let widx = sim.core.workers().by_id("w1").unwrap();
    fleet.push(sim.core.workers().get(widx).record());
    let old_seq = sim.core.job(running).unwrap().seq;

    // A new broker at t=100s.
    let mut sim2 = Sim::with(cfg);
    sim2.now = 100_000;
    let jobs = store
        .values()
        .map(|(state, spec)| Job::from_records(state, spec).unwrap())
        .collect();
    sim2.core.recover(sim2.now, 1, jobs, fleet, 5, &mut out);
    assert_eq!(sim2.core.queued(), 3);
    assert!(sim2.core.job(running).unwrap().seq > old_seq);
    // The worker comes back still running its attempt: it keeps it.
    let reg = Register {
        token: None,
        worker_id: "w1".into(),
        instance: "w1-instance".into(),
        hostname: "box".into(),
        version: "t".into(),
        gpu: GpuInfo {
            total_vram_mb: 8000,
            ..GpuInfo::default()
        },
        backends: vec![inventory(Backend::Sim, &[])],
        labels: vec![],
        loaded_model: None,
        current: Some(JobRef {
            job_id: running,
            attempt: 1,
        }),
        unacked: None,
        held: Vec::new(),
        max_held: 0,
        resident: Vec::new(),
    };
    let out = sim2.worker("w1", WorkerMessage::Register(Box::new(reg)));
    assert!(assigns(&out).is_empty());
    let out = sim2.succeed("w1", running, 1);
    assert_eq!(sim2.state(running), JobState::Succeeded);
    let next = assigns(&out);
    assert_eq!(
        (next.len(), &next[0].0, next[0].1),
        (1, &"w1".to_string(), queued[0]),
        "queue order survived"
    );
    assert!(
        next[0].2 > 1,
        "attempts after a restart are numbered above the stored reservation"
    );
    assert_eq!(sim2.core.job(queued[0]).unwrap().tries, 1);
    assert_eq!(sim2.submit(spec()).0, JobId(5));
}

#[test]
fn recovered_running_jobs_are_requeued_when_their_worker_stays_away() {
    let cfg = CoreConfig {
        persist: true,
        ..CoreConfig::default()
    };
    let mut sim = Sim::with(cfg.clone());
    sim.register("w1", 8000);
    let (job, _) = sim.submit(spec());
    let j = sim.core.job(job).unwrap();
    let (state, spec_bytes) = (j.state_record(), j.spec_record());
    let widx = sim.core.workers().by_id("w1").unwrap();
    let fleet = vec![sim.core.workers().get(widx).record()];

    let mut sim2 = Sim::with(cfg);
    let mut out = Vec::new();
    sim2.core.recover(
        0,
        1,
        vec![Job::from_records(&state, &spec_bytes).unwrap()],
        fleet,
        0,
        &mut out,
    );
    sim2.register("w2", 8000);
    let mut all = Vec::new();
    // Past the re-register grace (the old worker's reconnect backoff).
    for _ in 0..(super::recovery::REREGISTER_GRACE_MS / HB + 2) {
        sim2.beat("w2");
        all.extend(sim2.advance(HB));
    }
    let moved = assigns(&all);
    assert_eq!(
        (moved.len(), &moved[0].0, moved[0].1),
        (1, &"w2".to_string(), job)
    );
    assert!(moved[0].2 > 1);
    assert_eq!(
        sim2.core.job(job).unwrap().tries,
        2,
        "attempt 1 counted as lost"
    );
    assert!(all
        .iter()
        .any(|o| matches!(o, Output::Persist(Record::Job { id, .. }) if *id == job)));
}

#[test]
fn retention_removes_old_finished_jobs() {
    let mut sim = Sim::with(CoreConfig {
        persist: true,
        retention_max_age_ms: 10_000,
        retention_sweep_ms: 1_000,
        ..CoreConfig::default()
    });
    sim.register("w1", 8000);
    let (job, _) = sim.submit(spec());
    sim.succeed("w1", job, 1);
    let (keep, _) = sim.submit(spec());
    let mut out = Vec::new();
    for _ in 0..12 {
        sim.beat("w1");
        out.extend(sim.advance(HB));
    }
    assert!(sim.core.job(job).is_none());
    assert!(
        sim.core.job(keep).is_some(),
        "running jobs are never removed"
    );
    assert!(out
        .iter()
        .any(|o| matches!(o, Output::Persist(Record::DeleteJob(id)) if *id == job)));
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
fn out_of_memory_on_the_largest_gpu_degrades_when_allowed() {
    let mut sim = Sim::new();
    sim.register("only", 8_000);
    let mut s = spec();
    s.allow_degrade = true;
    s.max_attempts = Some(10);
    let (job, _) = sim.submit(s);
    let oom = JobError::new(FailureKind::OutOfMemory, "CUDA out of memory", true);
    for level in 1..=super::results::MAX_DEGRADE {
        let out = sim.finish(
            "only",
            job,
            level as u32,
            Outcome::Failed { error: oom.clone() },
        );
        let degrade = out.iter().find_map(|o| match o {
            Output::ToWorker {
                msg: BrokerMessage::Assign(a),
                ..
            } => Some(a.degrade),
            _ => None,
        });
        assert_eq!(degrade, Some(level), "retried one setting lower");
        let snap = sim.core.job(job).unwrap().snapshot(true);
        assert!(snap.history.iter().any(|t| t
            .note
            .contains(&format!("next lower setting, level {level}"))));
    }
    sim.finish("only", job, 4, Outcome::Failed { error: oom });
    assert_eq!(sim.state(job), JobState::Failed, "no lower setting left");
}

#[test]
fn out_of_memory_on_the_last_attempt_promises_no_lower_setting() {
    let mut sim = Sim::new();
    sim.register("only", 8_000);
    let mut s = spec();
    s.allow_degrade = true;
    s.max_attempts = Some(3);
    let (job, _) = sim.submit(s);
    let oom = JobError::new(FailureKind::OutOfMemory, "CUDA out of memory", true);
    for attempt in 1..=3u32 {
        let out = sim.finish("only", job, attempt, Outcome::Failed { error: oom.clone() });
        let assigned = out.iter().any(|o| {
            matches!(
                o,
                Output::ToWorker {
                    msg: BrokerMessage::Assign(_),
                    ..
                }
            )
        });
        assert_eq!(assigned, attempt < 3, "attempt {attempt}");
    }
    assert_eq!(sim.state(job), JobState::Failed);
    let snap = sim.core.job(job).unwrap().snapshot(true);
    assert_eq!(snap.degrade, 2, "the last attempt ran at level 2");
    let err = snap.error.unwrap();
    assert!(!err.message.contains("level 3"), "{}", err.message);
    assert!(!err.message.contains("retrying"), "{}", err.message);
    // The metrics' counters: two OOM requeues, both one setting lower.
    let stats = sim.core.stats();
    assert_eq!(
        (stats.oom_retries, stats.degrades, stats.requeues),
        (2, 2, 2)
    );
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

mod pipeline;
mod placement;
mod resubmit;
mod sessions;
mod waiting;
