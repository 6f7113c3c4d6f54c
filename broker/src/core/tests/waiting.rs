//! A queued job says why it waits.

use kiln_protocol::job::WaitReason;

use super::*;

impl Sim {
    pub(in crate::core) fn snapshot(&mut self, id: JobId) -> JobSnapshot {
        let out = self.request(
            "client",
            Request::Get(Get {
                req_id: 9,
                job_id: id,
            }),
        );
        out.into_iter()
            .find_map(|o| match o {
                Output::Reply {
                    reply: Reply::Job(j),
                    ..
                } => Some(j.job),
                _ => None,
            })
            .expect("a job reply")
    }

    fn reason(&mut self, id: JobId) -> Option<WaitReason> {
        self.snapshot(id).waiting.map(|w| w.reason)
    }
}

#[test]
fn a_queued_job_says_why_it_waits() {
    let mut sim = Sim::new();
    sim.register("w1", 24_000);
    let (j1, _) = sim.submit(spec());
    assert_eq!(sim.reason(j1), None, "running");
    let (j2, _) = sim.submit(spec());
    assert_eq!(sim.reason(j2), Some(WaitReason::AllBusy));
    let detail = sim.snapshot(j2).waiting.unwrap().detail;
    assert!(detail.contains("all 1 worker(s)"), "{detail}");

    // A small GPU idles while the only one big enough is busy.
    sim.request(
        "client",
        Request::Cancel(Cancel {
            req_id: 3,
            job_id: j2,
        }),
    );
    sim.register("small", 8_000);
    let mut big = spec();
    big.min_vram_mb = Some(16_000);
    let (j3, _) = sim.submit(big);
    assert_eq!(sim.reason(j3), Some(WaitReason::BiggerGpu));

    // The only capable worker goes away: its backend is down.
    sim.advance(4 * HB);
    sim.beat("small");
    assert_eq!(sim.reason(j3), Some(WaitReason::BackendDown));
}

/// A job accepted while a capable worker was known outlives that worker: once the
/// broker has forgotten it (offline past `fleet_memory_ms`), nobody could run it.
#[test]
fn a_job_whose_only_capable_worker_was_forgotten_has_no_capable_worker() {
    let mut sim = Sim::with(CoreConfig {
        fleet_memory_ms: 20 * HB,
        ..CoreConfig::default()
    });
    sim.register("w1", 24_000);
    let (j1, _) = sim.submit(spec());
    sim.advance(4 * HB);
    assert_eq!(sim.reason(j1), Some(WaitReason::BackendDown));
    sim.advance(30 * HB);
    assert_eq!(sim.reason(j1), Some(WaitReason::NoCapableWorker));
    let detail = sim.snapshot(j1).waiting.unwrap().detail;
    assert!(detail.contains("no registered worker"), "{detail}");
}

#[test]
fn a_held_job_names_its_holder() {
    let mut sim = Sim::new();
    sim.register_full(
        "w1",
        24_000,
        vec![inventory(Backend::Sim, &["sim-sd15"])],
        &[],
        None,
    );
    let mut out = Vec::new();
    let reg = Register {
        token: None,
        worker_id: "w1".into(),
        instance: "w1-instance".into(),
        hostname: "box".into(),
        version: "test".into(),
        gpu: GpuInfo {
            name: "GPU".into(),
            total_vram_mb: 24_000,
            free_vram_mb: 24_000,
            ..GpuInfo::default()
        },
        backends: vec![inventory(Backend::Sim, &["sim-sd15"])],
        labels: vec![],
        loaded_model: None,
        resident: vec![],
        current: None,
        unacked: None,
        held: vec![],
        max_held: 1,
    };
    out.extend(sim.worker("w1", WorkerMessage::Register(Box::new(reg))));
    let (_j1, _) = sim.submit(spec());
    let (j2, _) = sim.submit(spec());
    let w = sim.snapshot(j2).waiting.unwrap();
    assert_eq!(w.reason, WaitReason::Held);
    assert!(w.detail.contains("w1"), "{}", w.detail);
}
