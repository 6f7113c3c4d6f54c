//! Pipelined dispatch end to end: the real broker and worker binaries. A worker
//! holds its next job while it runs one and starts it the moment the GPU is free,
//! before its previous result has even reached the broker.

use std::time::Duration;

use kiln_protocol::{Backend, Client, JobSpec, JobState, Task};
use kiln_testkit::{eventually, Broker, BrokerOpts, Proc, Scratch, WorkerOpts};

fn job(prompt: &str, steps: u32, side: u32) -> JobSpec {
    JobSpec::new(Backend::Sim, Task::TextToImage)
        .param("prompt", prompt)
        .param("steps", steps)
        .param("width", side)
        .param("height", side)
        .param("count", 2)
}

/// A broker and one sim worker, `w1`, at 40 ms per step (the scratch
/// directory, broker and worker live as long as the returned values).
async fn one_worker() -> (Scratch, Broker, Proc, Client) {
    let s = Scratch::new();
    let broker = s.broker(BrokerOpts::default()).await;
    let w = s
        .worker(
            &broker,
            WorkerOpts {
                step_ms: 40,
                ..WorkerOpts::sim("w1")
            },
        )
        .await;
    let client = broker.client();
    (s, broker, w, client)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_workers_second_job_starts_with_no_broker_round_trip() {
    let (_s, _broker, _w, client) = one_worker().await;
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

/// A scripted broker (plain ZMTP over TCP) that never acknowledges: a worker
/// holding two no-output jobs sends both results without waiting for the first
/// one's acknowledgement (which a real broker sends after its fsync), keeps
/// naming both in its heartbeats until they are acknowledged, and forgets them
/// once they are.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn results_without_outputs_stream_ahead_of_their_acknowledgements() {
    use kiln_protocol::frame;
    use kiln_protocol::worker::{Assign, BrokerMessage, JobRef, Registered, WorkerMessage};
    use kiln_protocol::JobId;
    use kiln_testkit::zmtp::Zmtp;
    use std::sync::Arc;

    let s = Scratch::new();
    let broker = s.broker(BrokerOpts::default()).await;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoint = format!("tcp://{}", listener.local_addr().unwrap());
    let _worker = s.worker_unchecked(
        &broker,
        &WorkerOpts {
            env: vec![("KILN_WORKER__BROKER".into(), endpoint)],
            ..WorkerOpts::sim("w1")
        },
    );
    let script = tokio::task::spawn_blocking(move || {
        let mut z = loop {
            let (stream, _) = listener.accept().expect("the worker connects");
            if let Ok(z) = Zmtp::handshake(stream, "ROUTER") {
                break z;
            }
        };
        z.stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        let recv = |z: &mut Zmtp| -> WorkerMessage {
            let frames: Vec<bytes::Bytes> = z
                .recv()
                .expect("a message from the worker")
                .into_iter()
                .map(bytes::Bytes::from)
                .collect();
            frame::decode(&frames, usize::MAX).unwrap()
        };
        let send = |z: &mut Zmtp, msg: BrokerMessage| {
            let [tag, body] = frame::encode(&msg);
            z.send(&[&tag, &body]).unwrap();
        };
        assert!(matches!(recv(&mut z), WorkerMessage::Register(_)));
        send(
            &mut z,
            BrokerMessage::Registered(Registered {
                heartbeat_ms: 100,
                liveness: 50,
                chunk_bytes: 1 << 20,
                max_outputs: None,
            }),
        );
        let noop = Arc::new(
            JobSpec::new(Backend::Sim, Task::TextToImage)
                .param("steps", 0)
                .param("count", 0),
        );
        for (id, hold) in [(1, false), (2, true)] {
            send(
                &mut z,
                BrokerMessage::Assign(Assign {
                    job_id: JobId(id),
                    attempt: 1,
                    job: noop.clone(),
                    degrade: 0,
                    hold,
                }),
            );
        }
        let r = |id| JobRef {
            job_id: JobId(id),
            attempt: 1,
        };
        let mut finished = Vec::new();
        let mut named_both = false;
        while finished.len() < 2 || !named_both {
            match recv(&mut z) {
                WorkerMessage::Finished(f) => finished.push(f.job_id),
                WorkerMessage::Heartbeat(h) if finished.len() == 2 => {
                    let named: Vec<JobRef> = h.current.into_iter().chain(h.held).collect();
                    assert_eq!(named, [r(1), r(2)], "unacknowledged results stay named");
                    named_both = true;
                }
                _ => {}
            }
        }
        assert_eq!(
            finished,
            [JobId(1), JobId(2)],
            "in order, neither acknowledged"
        );
        send(&mut z, BrokerMessage::ResultAck(r(1)));
        send(&mut z, BrokerMessage::ResultAck(r(2)));
        loop {
            if let WorkerMessage::Heartbeat(h) = recv(&mut z) {
                if h.current.is_none() && h.held.is_empty() {
                    return;
                }
            }
        }
    });
    script.await.expect("the scripted broker's checks");
}

/// A more urgent job takes the place of a held one: the worker is told to drop
/// the held job before it is given the urgent one (both leave the broker in
/// that order), so it holds the urgent one instead of refusing it as one hold
/// too many, and it goes on holding jobs afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_urgent_job_takes_a_held_jobs_place_on_the_same_worker() {
    let (_s, _broker, _w, client) = one_worker().await;
    let snapshot = |id| {
        let client = client.clone();
        async move { client.get(id).await.unwrap() }
    };
    let long = client.submit(job("long", 100, 64)).await.unwrap().job_id;
    eventually("the long job to run", Duration::from_secs(20), || async {
        (snapshot(long).await.state == JobState::Running).then_some(())
    })
    .await;
    let normal = client.submit(job("normal", 2, 64)).await.unwrap().job_id;
    assert_eq!(snapshot(normal).await.worker.as_deref(), Some("w1"), "held");
    let mut spec = job("urgent", 2, 64);
    spec.priority = 5;
    let urgent = client.submit(spec).await.unwrap().job_id;
    let held = eventually(
        "the urgent job held by w1",
        Duration::from_secs(10),
        || async {
            let j = snapshot(urgent).await;
            (j.worker.as_deref() == Some("w1") || j.state.is_terminal()).then_some(j)
        },
    )
    .await;
    assert_eq!(held.state, JobState::Queued, "{held:?}");
    client.cancel(long).await.unwrap();
    for id in [urgent, normal] {
        let done = eventually("the jobs to end", Duration::from_secs(20), || async {
            let j = snapshot(id).await;
            j.state.is_terminal().then_some(j)
        })
        .await;
        assert_eq!(done.state, JobState::Succeeded, "{done:?}");
        assert!(
            !done
                .history
                .iter()
                .any(|t| t.note.contains("could not hold")),
            "{:?}",
            done.history
        );
    }
    // The worker still holds: a job submitted while another runs is held by it.
    let running = client.submit(job("again", 100, 64)).await.unwrap().job_id;
    eventually(
        "the next long job to run",
        Duration::from_secs(20),
        || async { (snapshot(running).await.state == JobState::Running).then_some(()) },
    )
    .await;
    let next = client.submit(job("next", 2, 64)).await.unwrap().job_id;
    assert_eq!(
        snapshot(next).await.worker.as_deref(),
        Some("w1"),
        "w1 holds jobs again"
    );
    client.cancel(running).await.unwrap();
}
