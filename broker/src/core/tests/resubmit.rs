//! `resubmit`: a new job from the whole stored spec of another.

use kiln_protocol::InputFile;

use super::*;

impl Sim {
    fn resubmit(
        &mut self,
        client: &str,
        job_id: JobId,
        key: Option<&str>,
    ) -> Result<Accepted, ErrorBody> {
        let out = self.request(
            client,
            Request::Resubmit(Resubmit {
                req_id: 7,
                job_id,
                idempotency_key: key.map(str::to_string),
                client: None,
            }),
        );
        acceptance(&out).expect("a reply to resubmit")
    }
}

/// Everything a snapshot does not carry: input files, labels, limits, the model.
fn full_spec() -> JobSpec {
    let mut s = JobSpec::new(Backend::Sim, Task::ImageToImage)
        .param("prompt", "a kiln at dusk")
        .param("seed", 7);
    s.model = Some("sim-sdxl".into());
    s.labels = vec!["fast".into()];
    s.min_vram_mb = Some(8_000);
    s.priority = 3;
    s.queue_timeout_s = Some(600);
    s.run_timeout_s = Some(300);
    s.max_attempts = Some(2);
    s.allow_degrade = true;
    s.inputs = vec![InputFile {
        name: "init.png".into(),
        media_type: "image/png".into(),
        data: vec![0x89, b'P', b'N', b'G', 1, 2, 3],
    }];
    s.idempotency_key = Some("order-17".into());
    s
}

#[test]
fn a_resubmitted_job_has_the_whole_spec_and_belongs_to_who_asked() {
    let mut sim = Sim::new();
    sim.register_full(
        "w1",
        24_000,
        vec![inventory(Backend::Sim, &["sim-sdxl"])],
        &["fast"],
        None,
    );
    let (first, _) = sim.submit_as("studio", full_spec()).unwrap();
    sim.succeed("w1", first, 1);
    assert_eq!(sim.state(first), JobState::Succeeded);

    sim.request(
        "dashboard",
        Request::Hello(Hello {
            req_id: 1,
            token: None,
            client: Some("dashboard".into()),
        }),
    );
    let again = sim.resubmit("dashboard", first, None).unwrap();
    assert_ne!(again.job_id, first);
    assert!(!again.duplicate);
    let job = sim.core.job(again.job_id).unwrap();
    let mut expected = full_spec();
    expected.idempotency_key = None;
    assert_eq!(*job.spec, expected, "every field but the key is copied");
    assert_eq!(&*job.client, "dashboard");
    assert_eq!(job.max_attempts, 2);
    let first_note = &job.history[0].note;
    assert_eq!(first_note, &format!("resubmitted from {first}"));
}

#[test]
fn a_resubmit_with_a_key_makes_one_job_however_often_it_is_sent() {
    let mut sim = Sim::new();
    sim.register("w1", 24_000);
    let (first, _) = sim.submit(spec());
    let a = sim.resubmit("client", first, Some("again-1")).unwrap();
    let b = sim.resubmit("client", first, Some("again-1")).unwrap();
    assert_eq!(a.job_id, b.job_id);
    assert!(!a.duplicate && b.duplicate);
    let c = sim.resubmit("client", first, None).unwrap();
    assert_ne!(c.job_id, a.job_id);
}

#[test]
fn a_resubmit_gets_the_errors_of_a_submit() {
    let mut sim = Sim::new();
    sim.register("w1", 24_000);
    let missing = sim.resubmit("client", JobId(999), None).unwrap_err();
    assert_eq!(missing.code, ErrorCode::NotFound);
    assert!(missing.message.contains("j999"), "{}", missing.message);

    // The fleet changed: the only worker with 24 GB went away for good.
    let mut big = spec();
    big.min_vram_mb = Some(20_000);
    let (first, _) = sim.submit(big);
    sim.request(
        "client",
        Request::Cancel(Cancel {
            req_id: 3,
            job_id: first,
        }),
    );
    sim.worker(
        "w1",
        WorkerMessage::Goodbye(Goodbye {
            reason: "retired".into(),
        }),
    );
    sim.advance(sim.core.config().fleet_memory_ms + 1);
    sim.register("w2", 8_000);
    let refused = sim.resubmit("client", first, None).unwrap_err();
    assert_eq!(refused.code, ErrorCode::Unschedulable);
    assert_eq!(refused.field.as_deref(), Some("job.min_vram_mb"));

    // A bad key is the request's own field, not the copied job's.
    let long = "k".repeat(129);
    let bad = sim.resubmit("client", first, Some(&long)).unwrap_err();
    assert_eq!(bad.code, ErrorCode::FieldTooLarge);
    assert_eq!(bad.field.as_deref(), Some("idempotency_key"));
    assert!(!bad.message.contains("job."), "{}", bad.message);
}
