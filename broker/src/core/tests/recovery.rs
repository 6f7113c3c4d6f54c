//! A broker restarted from its store: order kept, running jobs waited for or requeued; old finished jobs removed.

use super::*;

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
    for _ in 0..(crate::core::recovery::REREGISTER_GRACE_MS / HB + 2) {
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
