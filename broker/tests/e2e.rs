//! End to end over real sockets: the real broker and worker binaries, the async
//! Client, a raw zeromq peer sending garbage, and the pyzmq example.

use std::collections::HashSet;
use std::time::Duration;

use bytes::Bytes;
use kiln_protocol::client::hex;
use kiln_protocol::transport::Dealer;
use kiln_protocol::{Backend, ErrorCode, Event, JobSpec, JobState, Reply, Task};
use kiln_testkit::{eventually, BrokerOpts, Scratch, WorkerOpts};
use sha2::{Digest, Sha256};

fn job(prompt: &str, steps: u32) -> JobSpec {
    JobSpec::new(Backend::Sim, Task::TextToImage)
        .param("prompt", prompt)
        .param("steps", steps)
        .param("width", 64)
        .param("height", 64)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_streams_progress_and_its_output_matches_its_hash() {
    let s = Scratch::new();
    let broker = s.broker(BrokerOpts::default()).await;
    let _w = s
        .worker(
            &broker,
            WorkerOpts {
                step_ms: 30,
                ..WorkerOpts::sim("w1")
            },
        )
        .await;
    let client = broker.client();

    // Watch the raw event stream too, to check sequence numbers as published.
    let mut events = client.subscribe("job/").await.unwrap();
    let accepted = client.submit(job("a kiln at dusk", 12)).await.unwrap();
    assert!(!accepted.duplicate);

    let mut follow = client.follow(accepted.job_id).await.unwrap();
    let mut seqs = Vec::new();
    let mut saw_progress = false;
    let mut last = None;
    while let Some(snap) = follow.next().await {
        let snap = snap.unwrap();
        seqs.push(snap.seq);
        saw_progress |= snap
            .progress
            .as_ref()
            .is_some_and(|p| p.pct > 0.0 && p.pct < 100.0);
        last = Some(snap);
    }
    let last = last.unwrap();
    assert_eq!(last.state, JobState::Succeeded);
    assert!(saw_progress, "the follower saw intermediate progress");
    assert!(
        seqs.windows(2).all(|w| w[0] < w[1]),
        "snapshots move forward: {seqs:?}"
    );

    // Published events for the job: strictly increasing, never duplicated.
    let mut published = Vec::new();
    while let Ok(Some(ev)) = tokio::time::timeout(Duration::from_millis(300), events.recv()).await {
        if ev.job_id() == Some(accepted.job_id) {
            published.push(ev.seq().unwrap());
        }
    }
    assert!(published.len() >= 5, "events were published: {published:?}");
    assert!(published.windows(2).all(|w| w[0] < w[1]), "{published:?}");
    let unique: HashSet<_> = published.iter().collect();
    assert_eq!(unique.len(), published.len());

    // The artifact's bytes match the sha256 the broker reports, and are a PNG.
    assert_eq!(last.artifacts.len(), 1);
    let meta = &last.artifacts[0];
    let art = client.fetch_artifact(meta.id).await.unwrap();
    assert_eq!(art.data.len() as u64, meta.size);
    assert_eq!(hex(&Sha256::digest(&art.data)), meta.sha256);
    assert_eq!(&art.data[..8], b"\x89PNG\r\n\x1a\n");

    // Small chunks reassemble to the same bytes.
    let first = client.fetch_chunk(meta.id, 0, Some(100)).await.unwrap();
    assert_eq!(first.data.len(), 100);
    assert_eq!(&first.data[..], &art.data[..100]);

    // A subscriber that joins after the end still gets the final state.
    let mut late = client.follow(accepted.job_id).await.unwrap();
    let snap = late.next().await.unwrap().unwrap();
    assert_eq!(snap.state, JobState::Succeeded);
    assert!(late.next().await.is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_mid_job_hands_it_to_another_with_exactly_one_result() {
    let s = Scratch::new();
    let broker = s
        .broker(BrokerOpts {
            heartbeat_ms: 200,
            ..BrokerOpts::default()
        })
        .await;
    let mut a = s
        .worker(
            &broker,
            WorkerOpts {
                step_ms: 50,
                ..WorkerOpts::sim("wa")
            },
        )
        .await;
    let client = broker.client();
    let id = client.submit(job("long", 40)).await.unwrap().job_id;
    let running_on = eventually("the job to start on wa", Duration::from_secs(10), || {
        let client = client.clone();
        async move {
            let j = client.get(id).await.ok()?;
            (j.state == JobState::Running && j.progress.is_some()).then_some(j.worker)
        }
    })
    .await;
    assert_eq!(running_on.as_deref(), Some("wa"));
    let _b = s
        .worker(
            &broker,
            WorkerOpts {
                step_ms: 5,
                ..WorkerOpts::sim("wb")
            },
        )
        .await;
    a.kill9();

    let done = client.wait(id).await.unwrap();
    assert_eq!(done.state, JobState::Succeeded);
    assert_eq!(done.worker.as_deref(), Some("wb"));
    assert_eq!(done.attempt, 2);
    assert_eq!(done.artifacts.len(), 1, "exactly one result");
    let finals = done
        .history
        .iter()
        .filter(|t| t.state == JobState::Succeeded)
        .count();
    assert_eq!(finals, 1);
    assert!(
        done.history
            .iter()
            .any(|t| t.note.contains("wa") && t.note.contains("heartbeats")),
        "{:?}",
        done.history
    );
}

async fn exchange(d: &mut Dealer, frames: Vec<Bytes>) -> Reply {
    d.send(frames).await.unwrap();
    let reply = kiln_testkit::recv_within(d, Duration::from_secs(5))
        .await
        .expect("a reply");
    kiln_protocol::frame::decode(&reply, usize::MAX).expect("a Kiln reply")
}

fn error_of(r: Reply) -> (Option<u64>, ErrorCode, Option<String>) {
    match r {
        Reply::Error(e) => (e.req_id, e.error.code, e.error.field),
        other => panic!("expected an error, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_messages_get_typed_errors_while_others_are_served() {
    let s = Scratch::new();
    let broker = s
        .broker(BrokerOpts {
            durable: false,
            ..BrokerOpts::default()
        })
        .await;
    let _w = s.worker(&broker, WorkerOpts::sim("w1")).await;
    let good = broker.client();
    let mut bad = broker.raw_dealer().await;
    let tag = Bytes::from_static(b"KILN1");
    let pack = |v: serde_json::Value| Bytes::from(rmp_serde::to_vec_named(&v).unwrap());

    let (_, code, _) = error_of(
        exchange(
            &mut bad,
            vec![Bytes::from_static(b"HTTP/1.1"), pack(serde_json::json!({}))],
        )
        .await,
    );
    assert_eq!(code, ErrorCode::ForeignProtocol);
    let (_, code, _) = error_of(
        exchange(
            &mut bad,
            vec![
                Bytes::from_static(b"KILN2"),
                pack(serde_json::json!({"type": "ping", "req_id": 1})),
            ],
        )
        .await,
    );
    assert_eq!(code, ErrorCode::UnsupportedVersion);
    let (_, code, _) = error_of(
        exchange(
            &mut bad,
            vec![tag.clone(), Bytes::from_static(&[0xc1, 0xff, 0x00, 0x13])],
        )
        .await,
    );
    assert_eq!(code, ErrorCode::Malformed);
    let (_, code, _) = error_of(exchange(&mut bad, vec![tag.clone()]).await);
    assert_eq!(code, ErrorCode::Malformed);
    let (req, code, _) = error_of(
        exchange(
            &mut bad,
            vec![
                tag.clone(),
                pack(serde_json::json!({"type": "explode", "req_id": 7})),
            ],
        )
        .await,
    );
    assert_eq!((req, code), (Some(7), ErrorCode::UnknownType));
    let submit = |job: serde_json::Value| {
        pack(serde_json::json!({"type": "submit", "req_id": 8, "job": job}))
    };
    let (req, code, field) = error_of(exchange(&mut bad, vec![tag.clone(), submit(serde_json::json!({"backend": "sim", "task": "text_to_image", "params": {"prompt": "x".repeat(20_000)}}))]).await);
    assert_eq!(
        (req, code, field.as_deref()),
        (Some(8), ErrorCode::FieldTooLarge, Some("job.params.prompt"))
    );
    let (_, code, field) = error_of(
        exchange(
            &mut bad,
            vec![
                tag.clone(),
                submit(serde_json::json!({"backend": "dalle", "task": "text_to_image"})),
            ],
        )
        .await,
    );
    assert_eq!(
        (code, field.as_deref()),
        (ErrorCode::InvalidField, Some("job.backend"))
    );
    let mut truncated =
        submit(serde_json::json!({"backend": "sim", "task": "text_to_image"})).to_vec();
    truncated.truncate(truncated.len() - 5);
    let (_, code, _) =
        error_of(exchange(&mut bad, vec![tag.clone(), Bytes::from(truncated)]).await);
    assert_eq!(code, ErrorCode::Malformed);

    // Meanwhile the well-behaved client is served, and the errors were counted.
    let id = good.submit(job("fine", 2)).await.unwrap().job_id;
    assert_eq!(good.wait(id).await.unwrap().state, JobState::Succeeded);
    let health = good.health().await.unwrap();
    assert!(health.protocol_errors >= 8, "{health:?}");
    assert_eq!(health.queued + health.running, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn impossible_jobs_are_refused_and_cancel_works_end_to_end() {
    let s = Scratch::new();
    let broker = s
        .broker(BrokerOpts {
            durable: false,
            ..BrokerOpts::default()
        })
        .await;
    let _w = s
        .worker(
            &broker,
            WorkerOpts {
                vram_mb: 12_288,
                step_ms: 50,
                ..WorkerOpts::sim("small")
            },
        )
        .await;
    let client = broker.client();
    let mut big = job("huge", 1);
    big.min_vram_mb = Some(40_960);
    let err = client.submit(big).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::Unschedulable));
    assert!(
        err.to_string().contains("40960") && err.to_string().contains("12288"),
        "{err}"
    );

    let running = client.submit(job("running", 10_000)).await.unwrap().job_id;
    let queued = client.submit(job("queued", 1)).await.unwrap().job_id;
    eventually("the first job to run", Duration::from_secs(10), || {
        let c = client.clone();
        async move { (c.get(running).await.ok()?.progress.is_some()).then_some(()) }
    })
    .await;
    assert_eq!(
        client.cancel(queued).await.unwrap().state,
        JobState::Cancelled
    );
    assert_eq!(
        client.cancel(running).await.unwrap().state,
        JobState::Running
    );
    let end = client.wait(running).await.unwrap();
    assert_eq!(end.state, JobState::Cancelled);
    assert!(end.artifacts.is_empty());
    // The worker is free again.
    let id = client.submit(job("after", 1)).await.unwrap().job_id;
    assert_eq!(client.wait(id).await.unwrap().state, JobState::Succeeded);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pyzmq_example_submits_follows_and_downloads() {
    let s = Scratch::new();
    let broker = s
        .broker(BrokerOpts {
            client_token: Some("py-secret".into()),
            ..BrokerOpts::default()
        })
        .await;
    let _w = s
        .worker(
            &broker,
            WorkerOpts {
                step_ms: 20,
                ..WorkerOpts::sim("w1")
            },
        )
        .await;
    let out_dir = s.path().join("py-out");
    let output = broker
        .submit_example("py-secret")
        .args(["--prompt", "from python", "--steps", "8", "--out"])
        .arg(&out_dir)
        .output()
        .await
        .expect("python runs (scripts/test installs pyzmq and msgpack into .venv)");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "example failed:\n{stderr}");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let path = stdout
        .lines()
        .last()
        .expect("the example prints the file it wrote");
    let bytes = std::fs::read(path).unwrap();
    assert_eq!(&bytes[..4], b"\x89PNG");
    assert!(
        stderr.contains("running") && stderr.contains("succeeded"),
        "{stderr}"
    );

    // The same script with a wrong token is refused, and nothing is queued.
    let output = broker.submit_example("wrong").output().await.unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("unauthenticated"));
    let health = broker.client().health().await.unwrap();
    assert_eq!(health.queued + health.running + health.finished, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_state_changes_are_published() {
    let s = Scratch::new();
    let broker = s
        .broker(BrokerOpts {
            durable: false,
            ..BrokerOpts::default()
        })
        .await;
    let _w = s.worker(&broker, WorkerOpts::sim("announced")).await;
    let client = broker.client();
    let mut events = client.subscribe("worker/").await.unwrap();
    // A SUB's subscription reaches the PUB asynchronously, so keep making the
    // worker change state (busy, then idle) until an event arrives.
    let mut seen = None;
    for _ in 0..20 {
        let id = client.submit(job("tick", 0)).await.unwrap().job_id;
        client.wait(id).await.unwrap();
        if let Ok(Some(Event::WorkerState(w))) =
            tokio::time::timeout(Duration::from_millis(200), events.recv()).await
        {
            seen = Some(w);
            break;
        }
    }
    let ev = seen.expect("a worker_state event within 20 jobs");
    assert_eq!(&*ev.worker_id, "announced");
    let workers = client.workers().await.unwrap();
    assert_eq!(workers.len(), 1);
    assert_eq!(workers[0].gpu.name, "test GPU");
}
