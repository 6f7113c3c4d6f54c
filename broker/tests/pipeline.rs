//! Pipelined dispatch end to end: the real broker and worker binaries. A worker
//! holds its next job while it runs one and starts it the moment the GPU is free,
//! before its previous result has even reached the broker.

use std::time::Duration;

use kiln_protocol::{Backend, JobSpec, JobState, Task};
use kiln_testkit::{eventually, BrokerOpts, Scratch, WorkerOpts};

fn job(prompt: &str, steps: u32, side: u32) -> JobSpec {
    JobSpec::new(Backend::Sim, Task::TextToImage)
        .param("prompt", prompt)
        .param("steps", steps)
        .param("width", side)
        .param("height", side)
        .param("count", 2)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_workers_second_job_starts_with_no_broker_round_trip() {
    let s = Scratch::new();
    let broker = s.broker(BrokerOpts::default()).await;
    let _w = s
        .worker(
            &broker,
            WorkerOpts {
                step_ms: 40,
                ..WorkerOpts::sim("w1")
            },
        )
        .await;
    let client = broker.client();
    // The first job has outputs to upload after it ends; the second is held by
    // the worker while the first runs.
    let first = client.submit(job("first", 10, 256)).await.unwrap().job_id;
    let second = client.submit(job("second", 2, 64)).await.unwrap().job_id;
    let held = client.get(second).await.unwrap();
    assert_eq!(held.state, JobState::Queued);
    assert_eq!(
        held.worker.as_deref(),
        Some("w1"),
        "held by the busy worker"
    );

    let done = |id| {
        let client = client.clone();
        async move {
            let j = client.get(id).await.ok()?;
            j.state.is_terminal().then_some(j)
        }
    };
    let a = eventually("the first job to end", Duration::from_secs(20), || {
        done(first)
    })
    .await;
    let b = eventually("the second job to end", Duration::from_secs(20), || {
        done(second)
    })
    .await;
    assert_eq!(
        (a.state, b.state),
        (JobState::Succeeded, JobState::Succeeded)
    );
    let ms = |j: &kiln_protocol::JobSnapshot, k: &str| {
        j.info
            .get(k)
            .and_then(|v| v.as_u64())
            .unwrap_or_else(|| panic!("{k} in {:?}", j.info))
    };
    let first_ended = ms(&a, "worker_ended_ms");
    let second_started = ms(&b, "worker_started_ms");
    assert!(
        second_started >= first_ended,
        "one job at a time on the GPU"
    );
    // The second job started on the worker before the broker had the first
    // one's result: no round trip between them.
    let first_recorded = a.finished_ms.expect("finished");
    assert!(
        second_started < first_recorded,
        "second started at {second_started}, the broker recorded the first at {first_recorded}"
    );
    assert_eq!(b.attempt, 1);
}
