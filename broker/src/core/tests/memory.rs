//! Out of GPU memory: a bigger GPU, a lower setting when allowed, or failure.

use super::*;

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
