//! Uploads: chunks checked against their offsets and hashes, then finalized.

use super::*;

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
