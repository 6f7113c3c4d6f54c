//! Pipelined dispatch with the simulated clock: a busy worker holds its next job,
//! which starts with no broker round trip and keeps every guarantee of a queued
//! job (cancel, priority, requeue, fencing, fairness).

use super::*;

impl Sim {
    /// Registers a worker that holds up to `depth` jobs while it runs one.
    pub(super) fn register_holding(&mut self, w: &str, depth: u8) -> Vec<Output> {
        let reg = Register {
            token: None,
            worker_id: w.to_string(),
            instance: format!("{w}-instance"),
            hostname: "box".into(),
            version: "test".into(),
            gpu: GpuInfo {
                name: "GPU".into(),
                total_vram_mb: 24_000,
                free_vram_mb: 24_000,
                ..GpuInfo::default()
            },
            backends: vec![inventory(Backend::Sim, &["sim-sd15", "sim-sdxl"])],
            labels: vec![],
            loaded_model: None,
            resident: vec![],
            current: None,
            unacked: None,
            held: vec![],
            max_held: depth,
        };
        self.worker(w, WorkerMessage::Register(Box::new(reg)))
    }

    fn job(&self, id: JobId) -> &Job {
        self.core.job(id).unwrap()
    }
}

/// The holds (`hold = true` assignments) in `out`.
pub(super) fn holds(out: &[Output]) -> Vec<(String, JobId, u32)> {
    out.iter()
        .filter_map(|o| match o {
            Output::ToWorker {
                peer,
                msg: BrokerMessage::Assign(a),
            } if a.hold => Some((
                String::from_utf8_lossy(peer).into_owned(),
                a.job_id,
                a.attempt,
            )),
            _ => None,
        })
        .collect()
}

#[test]
fn a_busy_worker_holds_its_next_job_which_starts_without_a_round_trip() {
    let mut sim = Sim::new();
    sim.register_holding("w1", 1);
    let (j1, out) = sim.submit(spec());
    assert_eq!(assigns(&out), [("w1".to_string(), j1, 1)]);
    assert!(holds(&out).is_empty(), "an idle worker starts its job");
    let (j2, out) = sim.submit(spec());
    assert_eq!(holds(&out), [("w1".to_string(), j2, 1)]);
    assert_eq!(sim.state(j2), JobState::Queued, "held, not started");
    assert_eq!(sim.job(j2).worker.as_deref(), Some("w1"));
    assert_eq!(sim.core.queued(), 1, "a held job still counts as queued");
    // Depth 1: a third job waits in line.
    let (j3, out) = sim.submit(spec());
    assert!(assigns(&out).is_empty());
    // The worker's first job ends: the held one is running at once, with no
    // assignment sent for it; the third is held in its place.
    sim.beat_full(
        "w1",
        Some(JobRef {
            job_id: j1,
            attempt: 1,
        }),
        vec![JobRef {
            job_id: j2,
            attempt: 1,
        }],
    );
    let out = sim.succeed("w1", j1, 1);
    assert_eq!(sim.state(j1), JobState::Succeeded);
    assert_eq!(sim.state(j2), JobState::Running);
    assert_eq!(sim.job(j2).tries, 1);
    assert_eq!(assigns(&out), [("w1".to_string(), j3, 1)]);
    assert_eq!(holds(&out), [("w1".to_string(), j3, 1)]);
    // Its result is accepted as the current attempt's.
    sim.succeed("w1", j2, 1);
    assert_eq!(sim.state(j2), JobState::Succeeded);
    assert_eq!(sim.state(j3), JobState::Running);
}

#[test]
fn a_held_job_is_cancelled_and_its_worker_drops_it() {
    let mut sim = Sim::new();
    sim.register_holding("w1", 1);
    let (j1, _) = sim.submit(spec());
    let (j2, _) = sim.submit(spec());
    let out = sim.request(
        "client",
        Request::Cancel(Cancel {
            req_id: 2,
            job_id: j2,
        }),
    );
    assert_eq!(sim.state(j2), JobState::Cancelled);
    assert_eq!(
        cancels(&out),
        [JobRef {
            job_id: j2,
            attempt: 1
        }],
        "the holder is told to drop it"
    );
    assert!(sim.core.workers().get(0).held.is_empty());
    let out = sim.succeed("w1", j1, 1);
    assert!(assigns(&out).is_empty(), "nothing else to run");
    assert_eq!(sim.state(j2), JobState::Cancelled);
}

#[test]
fn a_more_urgent_job_takes_the_place_of_a_held_one() {
    let mut sim = Sim::new();
    sim.register_holding("w1", 1);
    let (j1, _) = sim.submit(spec());
    let (j2, _) = sim.submit(spec());
    let mut urgent_spec = spec();
    urgent_spec.priority = 5;
    let (urgent, out) = sim.submit(urgent_spec);
    assert_eq!(holds(&out), [("w1".to_string(), urgent, 1)]);
    assert_eq!(
        cancels(&out),
        [JobRef {
            job_id: j2,
            attempt: 1
        }]
    );
    assert_eq!(sim.state(j2), JobState::Queued);
    assert_eq!(sim.job(j2).worker, None);
    assert_eq!(sim.core.queued(), 2, "back in line, the urgent one held");
    let out = sim.succeed("w1", j1, 1);
    assert_eq!(sim.state(urgent), JobState::Running);
    // The displaced job is held next, under a new attempt number: a late word
    // about attempt 1 is stale.
    assert_eq!(holds(&out), [("w1".to_string(), j2, 2)]);
    assert_eq!(sim.job(j2).attempts_used(), 0, "holding uses no attempt");
    let before = sim.core.stats().stale_results;
    sim.succeed("w1", j2, 1);
    assert_eq!(sim.core.stats().stale_results, before + 1);
    assert_eq!(sim.state(j2), JobState::Queued);
}

#[test]
fn held_jobs_go_back_in_line_with_their_lost_worker() {
    let mut sim = Sim::new();
    sim.register_holding("w1", 1);
    let (j1, _) = sim.submit(spec());
    let (j2, _) = sim.submit(spec());
    assert_eq!(sim.job(j2).worker.as_deref(), Some("w1"));
    // w1 goes silent.
    sim.advance(4 * HB);
    assert_eq!(sim.state(j1), JobState::Queued);
    assert_eq!(sim.state(j2), JobState::Queued);
    assert_eq!(sim.job(j2).worker, None);
    assert_eq!(sim.job(j2).attempts_used(), 0);
    assert_eq!(sim.job(j1).attempts_used(), 1);
    // A new worker runs them in their original order.
    let out = sim.register_holding("w2", 1);
    let got: Vec<JobId> = assigns(&out).iter().map(|a| a.1).collect();
    assert_eq!(got, [j1, j2]);
    assert_eq!(sim.state(j1), JobState::Running);
    assert_eq!(holds(&out).len(), 1);
}

#[test]
fn an_idle_worker_takes_over_a_held_job() {
    let mut sim = Sim::new();
    sim.register_holding("w1", 1);
    let (_j1, _) = sim.submit(spec());
    let (j2, _) = sim.submit(spec());
    let out = sim.register_holding("w2", 1);
    assert_eq!(assigns(&out), [("w2".to_string(), j2, 2)]);
    assert!(
        holds(&out).is_empty(),
        "it starts at once on the idle worker"
    );
    assert_eq!(
        cancels(&out),
        [JobRef {
            job_id: j2,
            attempt: 1
        }]
    );
    assert_eq!(sim.state(j2), JobState::Running);
    assert!(sim.core.workers().get(0).held.is_empty());
}

#[test]
fn a_held_job_its_worker_has_started_is_not_taken_back() {
    let mut sim = Sim::new();
    sim.register_holding("w1", 1);
    let (j1, _) = sim.submit(spec());
    let (j2, _) = sim.submit(spec());
    // w1's GPU finished j1 and started j2; j1's result has not reached the
    // broker yet, but j2's progress has.
    sim.worker(
        "w1",
        WorkerMessage::Progress(ProgressReport {
            job_id: j2,
            attempt: 1,
            progress: Progress {
                pct: 5.0,
                step: Some(1),
                steps: Some(20),
                stage: "sampling".into(),
            },
        }),
    );
    // An idle worker does not take it over: it would run twice.
    let out = sim.register("w2", 24_000);
    assert!(assigns(&out).is_empty(), "{out:?}");
    assert!(cancels(&out).is_empty(), "{out:?}");
    // Nor does a more urgent job take its place once w2 is busy too.
    let (x, out) = sim.submit(spec());
    assert_eq!(assigns(&out), [("w2".to_string(), x, 1)]);
    let mut urgent = spec();
    urgent.priority = 5;
    let (u, out) = sim.submit(urgent);
    assert!(cancels(&out).is_empty(), "{out:?}");
    assert_eq!(sim.state(u), JobState::Queued);
    let out = sim.succeed("w1", j1, 1);
    assert!(cancels(&out).is_empty(), "{out:?}");
    assert_eq!(sim.state(j2), JobState::Running);
}

#[test]
fn a_hold_the_worker_never_names_is_requeued() {
    let mut sim = Sim::new();
    sim.register_holding("w1", 1);
    let (j1, _) = sim.submit(spec());
    let (j2, _) = sim.submit(spec());
    let running = Some(JobRef {
        job_id: j1,
        attempt: 1,
    });
    // Within the grace the worker may not have it yet.
    sim.advance(HB);
    sim.beat_full("w1", running, vec![]);
    assert_eq!(sim.job(j2).worker.as_deref(), Some("w1"));
    sim.advance(HB + 1);
    let out = sim.beat_full("w1", running, vec![]);
    assert_eq!(sim.job(j2).worker.as_deref(), Some("w1"), "held again");
    assert_eq!(holds(&out), [("w1".to_string(), j2, 2)]);
}

#[test]
fn held_jobs_follow_priority_and_fairness_between_clients() {
    let mut sim = Sim::new();
    sim.register_holding("w1", 1);
    let (first, _) = sim.submit_as("alice", spec()).unwrap();
    let mut alice = Vec::new();
    for _ in 0..3 {
        alice.push(sim.submit_as("alice", spec()).unwrap().0);
    }
    let bob = sim.submit_as("bob", spec()).unwrap().0;
    // alice[0] was held at once (the queue was empty); the rest queued.
    let mut started = vec![first];
    let mut current = (first, 1);
    for _ in 0..4 {
        sim.succeed("w1", current.0, current.1);
        let next = sim
            .core
            .workers()
            .get(0)
            .current
            .expect("the held job started");
        started.push(next.job_id);
        current = (next.job_id, next.attempt);
    }
    // Holds are taken from the queue in its order: alice's next, then bob (not
    // behind all of alice's), then alice's last.
    assert_eq!(started, [first, alice[0], alice[1], bob, alice[2]]);
}

#[test]
fn a_store_fault_takes_held_jobs_back_and_holds_nothing_until_it_clears() {
    let mut sim = Sim::new();
    sim.register_holding("w1", 1);
    let (j1, _) = sim.submit(spec());
    let (j2, out) = sim.submit(spec());
    assert_eq!(holds(&out), [("w1".to_string(), j2, 1)]);
    let out = sim.input(Input::StoreFault {
        cause: Some("No space left on device (os error 28)".into()),
    });
    // The worker would start it on its own the moment j1 ends: it must drop it.
    assert_eq!(
        cancels(&out),
        [JobRef {
            job_id: j2,
            attempt: 1
        }]
    );
    assert!(sim.core.workers().get(0).held.is_empty());
    assert_eq!(sim.state(j2), JobState::Queued);
    // j1 ends during the fault: nothing starts, nothing is held.
    let out = sim.succeed("w1", j1, 1);
    assert!(
        assigns(&out).is_empty() && holds(&out).is_empty(),
        "{out:?}"
    );
    assert_eq!(sim.state(j2), JobState::Queued);
    // The store writes again: j2 starts on the idle worker (a new attempt number,
    // so a late message about the revoked hold is fenced off).
    let out = sim.input(Input::StoreFault { cause: None });
    assert_eq!(assigns(&out), [("w1".to_string(), j2, 2)]);
}

/// A result names the model the GPU now holds before the next heartbeat lists
/// the resident set: `workers` shows it first at once.
#[test]
fn a_result_puts_its_model_first_among_the_resident_ones() {
    let mut sim = Sim::new();
    sim.register("w1", 24_000);
    sim.worker(
        "w1",
        WorkerMessage::Heartbeat(Heartbeat {
            free_vram_mb: 1000,
            utilization_pct: None,
            temperature_c: None,
            power_mw: None,
            current: None,
            held: vec![],
            loaded_model: Some("sim-sd15".into()),
            resident: Some(vec!["sim-sd15".into(), "sim-flux".into()]),
            healthy: true,
            backends: None,
        }),
    );
    let (id, _) = sim.submit(spec());
    sim.worker(
        "w1",
        WorkerMessage::Finished(Finished {
            job_id: id,
            attempt: 1,
            outcome: Outcome::Succeeded {
                outputs: vec![],
                info: Default::default(),
            },
            loaded_model: Some("sim-sdxl".into()),
        }),
    );
    let idx = sim.core.workers().by_id("w1").unwrap();
    let info = sim.core.workers().get(idx).info();
    assert_eq!(info.loaded_model.as_deref(), Some("sim-sdxl"));
    assert_eq!(info.resident, ["sim-sdxl", "sim-sd15", "sim-flux"]);
}

#[test]
fn a_free_worker_takes_a_held_job_more_urgent_than_anything_queued() {
    let mut sim = Sim::new();
    sim.register_holding("w1", 1);
    let (a, out) = sim.submit(spec());
    assert_eq!(assigns(&out), [("w1".to_string(), a, 1)]);
    let mut urgent = spec();
    urgent.priority = 5;
    let (h, out) = sim.submit(urgent);
    assert_eq!(holds(&out), [("w1".to_string(), h, 1)]);
    let (low, _) = sim.submit(spec());
    assert_eq!(sim.state(low), JobState::Queued);
    // A second worker comes: it takes the urgent held job, not the queued one.
    let out = sim.register("w2", 24_000);
    let started = assigns(&out);
    assert_eq!(started.first(), Some(&("w2".to_string(), h, 2)), "{out:?}");
    assert_eq!(sim.state(low), JobState::Queued);
}

#[test]
fn a_worker_free_sooner_holds_a_more_urgent_held_job_before_a_queued_one() {
    let mut sim = Sim::new();
    sim.register_holding("w1", 1);
    sim.register_holding("w2", 1);
    let (a, _) = sim.submit(spec());
    let (b, _) = sim.submit(spec());
    let r = |job| JobRef {
        job_id: job,
        attempt: 1,
    };
    // Both run for 10 s (alive all along).
    for _ in 0..20 {
        sim.advance(500);
        sim.beat_holding("w1", Some(r(a)));
        sim.beat_holding("w2", Some(r(b)));
    }
    let p = |priority| {
        let mut s = spec();
        s.priority = priority;
        s
    };
    let (urgent, _) = sim.submit(p(5));
    let (less, _) = sim.submit(p(3));
    let (low, _) = sim.submit(p(0));
    assert_eq!(sim.state(low), JobState::Queued);
    // w0 comes: it starts the most urgent held job, then holds the next most
    // urgent one (its holder has been busy for 10 s, w0 for nothing), not the
    // queued one.
    let out = sim.register_holding("w0", 1);
    assert_eq!(
        assigns(&out),
        [("w0".to_string(), urgent, 2), ("w0".to_string(), less, 2)],
        "{out:?}"
    );
    assert_eq!(holds(&out), [("w0".to_string(), less, 2)]);
    assert!(sim.snapshot(low).worker.is_none(), "still queued");
}
