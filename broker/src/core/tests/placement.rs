//! Load-aware placement with the simulated clock: waiting for a warm GPU when a
//! load costs more than the wait, spreading a burst while its queue is worth
//! another load, and the fairness bound (an overdue job goes before warm work,
//! but does not force a load that does not pay).

use kiln_protocol::job::WaitReason;

use super::*;

const SDXL: &str = "sim-sdxl";

fn sdxl() -> JobSpec {
    let mut s = spec();
    s.model = Some(SDXL.into());
    s
}

/// A successful result whose info says the attempt took `load_ms + run_ms` on
/// the generator, `load_ms` of it loading the model.
fn timed(load_ms: u64, run_ms: u64) -> Outcome {
    let info = serde_json::json!({
        "worker_started_ms": 1_000,
        "worker_ended_ms": 1_000 + load_ms + run_ms,
        "load_ms": load_ms,
    });
    Outcome::Succeeded {
        outputs: vec![],
        info: info.as_object().cloned().unwrap(),
    }
}

impl Sim {
    /// `w` reports `models` resident.
    fn beat_resident(&mut self, w: &str, models: &[&str]) -> Vec<Output> {
        let current = self
            .core
            .workers()
            .by_id(w)
            .and_then(|i| self.core.workers().get(i).current);
        let beat = Heartbeat {
            loaded_model: models.first().map(|m| m.to_string()),
            resident: Some(models.iter().map(|m| m.to_string()).collect()),
            ..heartbeat(current, vec![])
        };
        self.worker(w, WorkerMessage::Heartbeat(beat))
    }

    /// Advances the clock in 500 ms steps, `beats` keeping the workers alive
    /// at each, until the core assigns something (returned) or the clock
    /// reaches `until_ms` (`None`).
    fn assigned_before(
        &mut self,
        until_ms: u64,
        mut beats: impl FnMut(&mut Sim) -> Vec<Output>,
    ) -> Option<Vec<(String, JobId, u32)>> {
        while self.now < until_ms {
            let mut out = self.advance(500);
            out.extend(beats(self));
            let taken = assigns(&out);
            if !taken.is_empty() {
                return Some(taken);
            }
        }
        None
    }

    /// Two idle workers, `warm` with SDXL resident and measured (a 9 s load and
    /// a 6 s generation), `cold` with nothing loaded.
    fn warm_and_cold(cfg: CoreConfig) -> Sim {
        let mut sim = Sim::with(cfg);
        sim.register("warm", 24_000);
        let (first, out) = sim.submit(sdxl());
        assert_eq!(assigns(&out), [("warm".to_string(), first, 1)]);
        sim.finish("warm", first, 1, timed(9_000, 6_000));
        sim.beat_resident("warm", &[SDXL]);
        sim.register("cold", 24_000);
        let costs = sim.core.model_costs(SDXL);
        assert_eq!(
            (costs.load_ms, costs.run_ms),
            (Some(9_000.0), Some(6_000.0))
        );
        sim
    }
}

/// The heartbeats of [`Sim::warm_and_cold`]'s workers, SDXL still resident.
fn warm_and_cold_beat(sim: &mut Sim) -> Vec<Output> {
    let mut out = sim.beat_resident("warm", &[SDXL]);
    out.extend(sim.beat("cold"));
    out
}

#[test]
fn a_job_waits_for_a_warm_gpu_when_loading_costs_more_than_the_wait() {
    let mut sim = Sim::warm_and_cold(CoreConfig::default());
    let (a, out) = sim.submit(sdxl());
    assert_eq!(assigns(&out), [("warm".to_string(), a, 1)]);
    // 6 s of work ahead on the warm GPU against a 9 s load (times the load
    // weight): the cold GPU stays idle and the job waits for the warm one.
    let (b, out) = sim.submit(sdxl());
    assert!(assigns(&out).is_empty(), "{out:?}");
    assert_eq!(sim.state(b), JobState::Queued);
    let why = sim.snapshot(b).waiting.unwrap();
    assert_eq!(why.reason, WaitReason::WarmGpu, "{}", why.detail);
    assert!(
        why.detail.contains(
            "less than the 54 s a load on one of the 1 idle GPU(s) weighs (6 x its 9 s load)"
        ),
        "{}",
        why.detail
    );
    let out = sim.succeed("warm", a, 1);
    assert_eq!(assigns(&out), [("warm".to_string(), b, 1)]);
    // Without load-aware placement the idle GPU loads it at once.
    let mut sim = Sim::warm_and_cold(CoreConfig {
        load_aware: false,
        ..CoreConfig::default()
    });
    sim.submit(sdxl());
    let (b, out) = sim.submit(sdxl());
    assert_eq!(assigns(&out), [("cold".to_string(), b, 1)]);
}

#[test]
fn a_burst_spreads_to_another_gpu_once_its_queue_is_worth_a_load() {
    let mut sim = Sim::warm_and_cold(CoreConfig {
        load_weight: 3.0,
        ..CoreConfig::default()
    });
    let (a, _) = sim.submit(sdxl());
    let mut queued = Vec::new();
    // Load weight 3 and a 9 s load: another GPU pays once more than 27 s of
    // SDXL work waits per warm GPU, i.e. from the fifth waiting job on.
    for n in 1..=4 {
        let (j, out) = sim.submit(sdxl());
        assert!(assigns(&out).is_empty(), "job {n} of the burst: {out:?}");
        queued.push(j);
    }
    let (_, out) = sim.submit(sdxl());
    // The cold GPU loads the model for the oldest waiting job, not the newest.
    assert_eq!(assigns(&out), [("cold".to_string(), queued[0], 1)]);
    // Both GPUs now count as warm: the next jobs wait for them.
    let (_, out) = sim.submit(sdxl());
    assert!(assigns(&out).is_empty(), "{out:?}");
    let out = sim.succeed("warm", a, 1);
    assert_eq!(assigns(&out), [("warm".to_string(), queued[1], 1)]);
}

#[test]
fn past_the_fairness_bound_a_job_still_waits_for_a_warm_gpu_rather_than_force_a_load() {
    // Load weight 20: idle GPUs wait up to 20 x 9 s for a warm one, well past
    // the 60 s bound.
    let cfg = CoreConfig {
        affinity_max_wait_ms: 60_000,
        load_weight: 20.0,
        ..CoreConfig::default()
    };
    let mut sim = Sim::warm_and_cold(cfg);
    let (a, _) = sim.submit(sdxl());
    let (b, out) = sim.submit(sdxl());
    assert!(assigns(&out).is_empty(), "{out:?}");
    let created = sim.now;
    // Both workers stay alive well past the bound; the idle one does not load
    // the model for `b`.
    let taken = sim.assigned_before(created + 150_000, warm_and_cold_beat);
    assert_eq!(taken, None, "at {} ms", sim.now - created);
    assert_eq!(
        sim.snapshot(b).waiting.map(|w| w.reason),
        Some(WaitReason::WarmGpu)
    );
    let out = sim.succeed("warm", a, 1);
    assert_eq!(assigns(&out), [("warm".to_string(), b, 1)]);
}

#[test]
fn an_idle_gpu_left_idle_for_as_long_as_a_load_weighs_loads_the_model() {
    // Weight 6 and a 9 s load: the cold GPU waits 54 s for the warm one, which
    // is stuck in its job, then loads the model itself.
    let mut sim = Sim::warm_and_cold(CoreConfig::default());
    sim.submit(sdxl());
    let (b, out) = sim.submit(sdxl());
    assert!(assigns(&out).is_empty(), "{out:?}");
    let created = sim.now;
    let taken = sim.assigned_before(created + 55_000, warm_and_cold_beat);
    assert_eq!(
        taken,
        Some(vec![("cold".to_string(), b, 1)]),
        "never loaded"
    );
    let at = sim.now - created;
    assert!(at >= 54_000, "loaded at {at} ms");
}

#[test]
fn past_the_fairness_bound_a_job_goes_before_warm_work() {
    const SD15: &str = "sim-sd15";
    // One worker with SDXL resident, busy; client `c1` waits for an SD 1.5 job
    // (a load), client `c2` then submits an SDXL job (warm). When the worker
    // is free it takes the warm job, unless the SD 1.5 job has waited past the
    // bound.
    for (gap_ms, overdue) in [(10_000, false), (61_000, true)] {
        let mut sim = Sim::with(CoreConfig {
            affinity_max_wait_ms: 60_000,
            max_held: 0,
            ..CoreConfig::default()
        });
        sim.register("warm", 24_000);
        let (a, out) = sim.submit_as("c1", sdxl()).unwrap();
        assert_eq!(assigns(&out), [("warm".to_string(), a, 1)]);
        sim.beat_resident("warm", &[SDXL]);
        let mut sd15 = spec();
        sd15.model = Some(SD15.into());
        let (f, _) = sim.submit_as("c1", sd15).unwrap();
        let until = sim.now + gap_ms;
        while sim.now < until {
            sim.advance(500);
            sim.beat_resident("warm", &[SDXL]);
        }
        let (s, out) = sim.submit_as("c2", sdxl()).unwrap();
        assert!(assigns(&out).is_empty(), "{out:?}");
        let out = sim.succeed("warm", a, 1);
        let first = if overdue { f } else { s };
        assert_eq!(
            assigns(&out),
            [("warm".to_string(), first, 1)],
            "after {gap_ms} ms"
        );
    }
}

#[test]
fn an_unmeasured_model_loads_on_an_idle_gpu_rather_than_wait_for_a_busy_warm_one() {
    let mut sim = Sim::new();
    sim.register("w1", 24_000);
    sim.register("w2", 24_000);
    let (a, out) = sim.submit(sdxl());
    assert_eq!(assigns(&out), [("w1".to_string(), a, 1)]);
    // w1 counts as warm from its assignment on, but nothing says how long its
    // job runs or what a load costs: the idle GPU loads.
    let (b, out) = sim.submit(sdxl());
    assert_eq!(assigns(&out), [("w2".to_string(), b, 1)]);
}

#[test]
fn a_held_job_goes_to_an_idle_gpu_once_its_holder_overruns_by_more_than_a_load_weighs() {
    let mut sim = Sim::new();
    sim.register_holding("warm", 1);
    let (a, _) = sim.submit(sdxl());
    sim.finish("warm", a, 1, timed(9_000, 6_000));
    sim.beat_resident("warm", &[SDXL]);
    sim.register("cold", 24_000);
    let (b, out) = sim.submit(sdxl());
    assert_eq!(assigns(&out), [("warm".to_string(), b, 1)]);
    let started = sim.now;
    // `c` is held by the warm GPU: 6 s left there against a 9 s load.
    let (c, out) = sim.submit(sdxl());
    assert_eq!(pipeline::holds(&out), [("warm".to_string(), c, 1)]);
    // `b` runs far past its 6 s. The hold pays off against a load (weight 6:
    // 54 s) until `b` has overrun by that much, then the idle GPU takes `c`.
    let r = |job| JobRef {
        job_id: job,
        attempt: 1,
    };
    let taken = sim.assigned_before(started + 62_000, |sim| {
        let mut out = sim.beat_full("warm", Some(r(b)), vec![r(c)]);
        out.extend(sim.beat("cold"));
        out
    });
    assert_eq!(
        taken,
        Some(vec![("cold".to_string(), c, 2)]),
        "never taken over"
    );
    let at = sim.now - started;
    assert!((59_000..62_000).contains(&at), "taken over at {at} ms");
}
