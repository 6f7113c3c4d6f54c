//! Crashes on purpose: `kill -9` of the broker and of workers, a worker frozen past
//! its liveness window, and strangers with wrong tokens. Real processes and sockets.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use kiln_protocol::{Backend, Client, ClientError, FailureKind, JobId, JobSpec, JobState, Task};
use kiln_testkit::{eventually, Broker, BrokerOpts, Proc, Scratch, WorkerOpts};

fn job(steps: u32) -> JobSpec {
    JobSpec::new(Backend::Sim, Task::TextToImage)
        .param("prompt", "durable")
        .param("steps", steps)
        .param("width", 16)
        .param("height", 16)
}

/// Submits until the broker accepts, retrying with the same idempotency key across
/// broker crashes.
async fn submit_until_accepted(client: &Client, spec: JobSpec) -> JobId {
    for _ in 0..100 {
        match client.submit(spec.clone()).await {
            Ok(a) => return a.job_id,
            Err(ClientError::Timeout { .. }) => continue,
            Err(e) => panic!("submit refused: {e}"),
        }
    }
    panic!("the broker never accepted the job");
}

async fn all_finished(
    client: &Client,
    ids: &[JobId],
    timeout: Duration,
) -> Vec<kiln_protocol::JobSnapshot> {
    eventually("every job to finish", timeout, || {
        let client = client.clone();
        let ids = ids.to_vec();
        async move {
            let mut snaps = Vec::new();
            for id in ids {
                let snap = client.get(id).await.ok()?;
                if !snap.state.is_terminal() {
                    return None;
                }
                snaps.push(snap);
            }
            Some(snaps)
        }
    })
    .await
}

fn succeeded_once(snap: &kiln_protocol::JobSnapshot) {
    assert_eq!(snap.state, JobState::Succeeded, "{snap:?}");
    let finals = snap
        .history
        .iter()
        .filter(|t| t.state == JobState::Succeeded)
        .count();
    assert_eq!(finals, 1, "exactly one result: {:?}", snap.history);
    assert_eq!(snap.artifacts.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_broker_repeatedly_loses_no_accepted_job() {
    let s = Scratch::new();
    let mut broker = s
        .broker(BrokerOpts {
            heartbeat_ms: 250,
            ..BrokerOpts::default()
        })
        .await;
    let mut w1 = s
        .worker(
            &broker,
            WorkerOpts {
                step_ms: 10,
                ..WorkerOpts::sim("w1")
            },
        )
        .await;
    let mut w2 = s
        .worker(
            &broker,
            WorkerOpts {
                step_ms: 10,
                ..WorkerOpts::sim("w2")
            },
        )
        .await;
    let (pid1, pid2) = (w1.pid(), w2.pid());
    let client = broker.client();

    let mut accepted: HashMap<String, JobId> = HashMap::new();
    for round in 0..4 {
        for n in 0..12 {
            let key = format!("round{round}-job{n}");
            let mut spec = job(8);
            spec.idempotency_key = Some(key.clone());
            accepted.insert(key, submit_until_accepted(&client, spec).await);
        }
        // Crash while jobs are queued and running, then come straight back.
        broker.crash_and_restart().await;
    }
    let ids: Vec<JobId> = accepted.values().copied().collect();
    let unique: HashSet<JobId> = ids.iter().copied().collect();
    assert_eq!(unique.len(), ids.len(), "every key got its own job");

    let snaps = all_finished(&client, &ids, Duration::from_secs(120)).await;
    for snap in &snaps {
        succeeded_once(snap);
    }
    // Retrying every submit with its key creates nothing new.
    for (key, id) in &accepted {
        let mut spec = job(8);
        spec.idempotency_key = Some(key.clone());
        let again = client.submit(spec).await.unwrap();
        assert_eq!((again.job_id, again.duplicate), (*id, true), "{key}");
    }
    let all = client.list(Default::default()).await.unwrap();
    assert_eq!(all.len(), accepted.len(), "no duplicate jobs were created");

    // The workers survived the crashes and re-registered by themselves.
    assert!(w1.is_running() && w2.is_running());
    assert_eq!((w1.pid(), w2.pid()), (pid1, pid2));
    let workers = client.workers().await.unwrap();
    assert!(
        workers
            .iter()
            .all(|w| w.state != kiln_protocol::worker::WorkerState::Offline),
        "{workers:?}"
    );
    // Outputs of jobs finished before a crash are still downloadable.
    let first = &snaps[0].artifacts[0];
    let art = client.fetch_artifact(first.id).await.unwrap();
    assert_eq!(art.data.len() as u64, first.size);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_result_finished_while_the_broker_was_down_is_kept() {
    let s = Scratch::new();
    let mut broker = s
        .broker(BrokerOpts {
            heartbeat_ms: 250,
            ..BrokerOpts::default()
        })
        .await;
    let w = s
        .worker(
            &broker,
            WorkerOpts {
                step_ms: 25,
                ..WorkerOpts::sim("w1")
            },
        )
        .await;
    let client = broker.client();
    let id = client.submit(job(40)).await.unwrap().job_id; // about a second
    eventually("the job to run", Duration::from_secs(10), || {
        let c = client.clone();
        async move { c.get(id).await.ok()?.progress.is_some().then_some(()) }
    })
    .await;
    // The broker stays down until the worker has finished the job.
    broker.proc.kill9();
    eventually(
        "the worker to finish while the broker is down",
        Duration::from_secs(20),
        || {
            let log = w.log();
            async move { log.contains(&format!("succeeded job={id}")).then_some(()) }
        },
    )
    .await;
    broker.proc.restart();
    broker.wait_ready().await;
    let done = client.wait(id).await.unwrap();
    assert_eq!(done.state, JobState::Succeeded);
    assert_eq!(
        done.attempt, 1,
        "the attempt finished while the broker was down was kept"
    );
    succeeded_once(&done);
}

fn restart_dead(workers: &mut [Proc]) {
    for w in workers.iter_mut() {
        if !w.is_running() {
            w.restart();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_workers_mid_job_repeatedly_completes_every_job_once() {
    let s = Scratch::new();
    let broker = s
        .broker(BrokerOpts {
            heartbeat_ms: 200,
            ..BrokerOpts::default()
        })
        .await;
    let mut workers = Vec::new();
    for i in 0..3 {
        workers.push(
            s.worker(
                &broker,
                WorkerOpts {
                    step_ms: 20,
                    ..WorkerOpts::sim(&format!("w{i}"))
                },
            )
            .await,
        );
    }
    let client = broker.client();
    let mut ids = Vec::new();
    for _ in 0..9 {
        let mut spec = job(15);
        spec.max_attempts = Some(6);
        ids.push(client.submit(spec).await.unwrap().job_id);
    }
    // Five times: find a worker in the middle of a job and kill -9 it.
    for kill in 0..5 {
        let victim = eventually("a worker mid-job", Duration::from_secs(30), || {
            let c = client.clone();
            async move {
                let busy = c.workers().await.ok()?.into_iter().find(|w| {
                    w.current_job.is_some() && w.state == kiln_protocol::worker::WorkerState::Busy
                })?;
                let job = c.get(busy.current_job?).await.ok()?;
                job.progress.is_some().then_some(busy.worker_id)
            }
        })
        .await;
        let idx: usize = victim[1..].parse().unwrap();
        workers[idx].kill9();
        workers[idx].restart();
        if kill == 4 {
            break;
        }
    }
    let snaps = all_finished(&client, &ids, Duration::from_secs(120)).await;
    for snap in &snaps {
        succeeded_once(snap);
    }
    assert!(
        snaps.iter().any(|s| s.attempt >= 2),
        "some job was retried after a kill"
    );
    for snap in snaps.iter().filter(|s| s.attempt >= 2) {
        let lost = snap
            .history
            .iter()
            .filter(|t| t.note.contains("requeued"))
            .count() as u32;
        assert_eq!(
            lost,
            snap.attempt - 1,
            "every lost attempt is in the record: {:?}",
            snap.history
        );
    }

    // A job that crashes its worker every time fails once its attempts are used.
    let mut crasher = job(1).param("fault", "crash");
    crasher.max_attempts = Some(2);
    let id = client.submit(crasher).await.unwrap().job_id;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let failed = loop {
        // Keep the fleet alive like systemd would.
        restart_dead(&mut workers);
        let j = client.get(id).await.unwrap();
        if j.state.is_terminal() {
            break j;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the crashing job never failed: {j:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(failed.state, JobState::Failed);
    let err = failed.error.unwrap();
    assert_eq!(err.kind, FailureKind::MaxAttempts);
    assert!(
        err.message.contains("2 of 2 attempts") && err.message.contains("WorkerLost"),
        "{}",
        err.message
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_cut_off_past_its_liveness_loses_its_job_and_its_late_result_is_ignored() {
    let s = Scratch::new();
    let broker = s
        .broker(BrokerOpts {
            heartbeat_ms: 200,
            ..BrokerOpts::default()
        })
        .await;
    let a = s
        .worker(
            &broker,
            WorkerOpts {
                step_ms: 40,
                ..WorkerOpts::sim("a")
            },
        )
        .await;
    let client = broker.client();
    let id = client.submit(job(25)).await.unwrap().job_id; // about a second on a
    eventually("the job to run on a", Duration::from_secs(10), || {
        let c = client.clone();
        async move {
            let j = c.get(id).await.ok()?;
            (j.worker.as_deref() == Some("a") && j.progress.is_some()).then_some(())
        }
    })
    .await;
    a.pause(); // cut off: no heartbeats, no progress
    let _b = s
        .worker(
            &broker,
            WorkerOpts {
                step_ms: 40,
                ..WorkerOpts::sim("b")
            },
        )
        .await;
    eventually("the job to move to b", Duration::from_secs(10), || {
        let c = client.clone();
        async move {
            let j = c.get(id).await.ok()?;
            (j.worker.as_deref() == Some("b") && j.attempt == 2).then_some(())
        }
    })
    .await;
    a.resume();
    let done = client.wait(id).await.unwrap();
    succeeded_once(&done);
    assert_eq!((done.worker.as_deref(), done.attempt), (Some("b"), 2));
    eventually(
        "the broker to log the stale result",
        Duration::from_secs(20),
        || {
            let log = broker.log();
            async move {
                log.contains(&format!("ignoring the result of stale attempt 1 of {id}"))
                    .then_some(())
            }
        },
    )
    .await;
    // a re-registers by itself and is usable again.
    eventually("a to be back", Duration::from_secs(20), || {
        let c = client.clone();
        async move {
            let ws = c.workers().await.ok()?;
            ws.iter()
                .any(|w| w.worker_id == "a" && w.state == kiln_protocol::worker::WorkerState::Idle)
                .then_some(())
        }
    })
    .await;
}

fn raw_err(reply: kiln_protocol::Reply) -> kiln_protocol::ErrorBody {
    match reply {
        kiln_protocol::Reply::Error(e) => e.error,
        other => panic!("expected an error, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strangers_without_the_token_get_one_error_and_nothing_else() {
    use bytes::Bytes;
    let s = Scratch::new();
    let opts = BrokerOpts {
        client_token: Some("client-secret".into()),
        worker_token: Some("worker-secret".into()),
        ..BrokerOpts::default()
    };
    let broker = s.broker(opts).await;
    // A worker with the wrong token is refused and never scheduled.
    let mut wrong = s.worker_unchecked(
        &broker,
        &WorkerOpts {
            token: Some("guess".into()),
            ..WorkerOpts::sim("intruder")
        },
    );
    eventually(
        "the broker to refuse the worker",
        Duration::from_secs(10),
        || {
            let log = broker.log();
            async move {
                log.contains("refused a worker with a wrong or missing token")
                    .then_some(())
            }
        },
    )
    .await;
    let _good = s
        .worker(
            &broker,
            WorkerOpts {
                token: Some("worker-secret".into()),
                ..WorkerOpts::sim("member")
            },
        )
        .await;
    let client = broker.client();
    let workers = client.workers().await.unwrap();
    assert_eq!(
        workers
            .iter()
            .map(|w| w.worker_id.as_str())
            .collect::<Vec<_>>(),
        ["member"]
    );
    wrong.kill9();

    // A client without hello: one error, then silence.
    let mut d = broker.raw_dealer().await;
    let submit = serde_json::json!({"type": "submit", "req_id": 1, "job": {"backend": "sim", "task": "text_to_image"}});
    let frames = |v: &serde_json::Value| {
        vec![
            Bytes::from_static(b"KILN1"),
            Bytes::from(rmp_serde::to_vec_named(v).unwrap()),
        ]
    };
    d.send(frames(&submit)).await.unwrap();
    let reply = kiln_testkit::recv_within(&mut d, Duration::from_secs(5))
        .await
        .expect("a reply");
    let err = raw_err(kiln_protocol::frame::decode(&reply, usize::MAX).unwrap());
    assert_eq!(err.code, kiln_protocol::ErrorCode::Unauthenticated);
    d.send(frames(&submit)).await.unwrap();
    assert!(
        kiln_testkit::recv_within(&mut d, Duration::from_millis(500))
            .await
            .is_none(),
        "a refused connection gets nothing more until it says hello"
    );
    // A refused connection can still authenticate later: a correct hello is
    // always judged (a broker restart refuses every old connection once).
    d.send(frames(
        &serde_json::json!({"type": "hello", "req_id": 2, "token": "client-secret"}),
    ))
    .await
    .unwrap();
    let reply = kiln_testkit::recv_within(&mut d, Duration::from_secs(5))
        .await
        .expect("a welcome");
    assert!(
        matches!(
            kiln_protocol::frame::decode::<kiln_protocol::Reply>(&reply, usize::MAX).unwrap(),
            kiln_protocol::Reply::Welcome(_)
        ),
        "a correct hello after a refusal is welcomed"
    );
    // A Client with the wrong token is refused too.
    let mut o = broker.client_options();
    o.token = Some("nope".into());
    let err = Client::connect(o).ping().await.unwrap_err();
    assert_eq!(
        err.code(),
        Some(kiln_protocol::ErrorCode::Unauthenticated),
        "{err}"
    );
    // Nothing was queued by any of them.
    let health = client.health().await.unwrap();
    assert_eq!(health.queued + health.running + health.finished, 0);
    assert!(health.protocol_errors >= 2);
}

/// Sends one raw request and returns the broker's error for it.
async fn refused(
    d: &mut kiln_protocol::transport::Dealer,
    body: Vec<u8>,
) -> kiln_protocol::ErrorBody {
    d.send(vec![
        bytes::Bytes::from_static(b"KILN1"),
        bytes::Bytes::from(body),
    ])
    .await
    .unwrap();
    let reply = kiln_testkit::recv_within(d, Duration::from_secs(5))
        .await
        .expect("a reply");
    raw_err(kiln_protocol::frame::decode(&reply, usize::MAX).unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_catalogue_of_bad_inputs_each_gets_its_typed_error_while_others_are_served() {
    use serde_json::json;
    let s = Scratch::new();
    let opts = BrokerOpts {
        durable: false,
        extra: "[broker.limits]\nmax_message_bytes = 2000000\nmax_queued_per_client = 3\nmax_input_bytes = 1000\nmax_workflow_bytes = 5000\n".into(),
        ..BrokerOpts::default()
    };
    let broker: Broker = s.broker(opts).await;
    let _w = s
        .worker(
            &broker,
            WorkerOpts {
                step_ms: 5,
                ..WorkerOpts::sim("w1")
            },
        )
        .await;

    // A well-behaved client keeps getting served throughout.
    let good = broker.client();
    let served = {
        let good = good.clone();
        tokio::spawn(async move {
            let mut done = 0;
            for _ in 0..15 {
                let id = good.submit(job(2)).await.unwrap().job_id;
                assert_eq!(good.wait(id).await.unwrap().state, JobState::Succeeded);
                done += 1;
            }
            done
        })
    };

    let mut d = broker.raw_dealer().await;
    let base = || json!({"backend": "sim", "task": "text_to_image", "params": {"prompt": "ok"}});
    let submit = |job: serde_json::Value| {
        rmp_serde::to_vec_named(&json!({"type": "submit", "req_id": 9, "job": job})).unwrap()
    };
    let with = |key: &str, value: serde_json::Value| {
        let mut j = base();
        j[key] = value;
        submit(j)
    };
    let many = |n: usize, item: serde_json::Value| serde_json::Value::Array(vec![item; n]);
    let mut params70 = serde_json::Map::new();
    for i in 0..70 {
        params70.insert(format!("p{i}"), json!(i));
    }
    let bin = |n: usize| serde_json::Value::Array(vec![json!(0); n]);
    let catalogue: Vec<(&str, Vec<u8>, kiln_protocol::ErrorCode, Option<&str>)> = {
        use kiln_protocol::ErrorCode::*;
        vec![
            (
                "prompt over its limit",
                with("params", json!({"prompt": "x".repeat(16_385)})),
                FieldTooLarge,
                Some("job.params.prompt"),
            ),
            (
                "negative prompt not a string",
                with("params", json!({"negative_prompt": 5})),
                InvalidField,
                Some("job.params.negative_prompt"),
            ),
            (
                "too many params",
                with("params", serde_json::Value::Object(params70)),
                FieldTooLarge,
                Some("job.params"),
            ),
            (
                "params too large",
                with("params", json!({"blob": "y".repeat(300_000)})),
                FieldTooLarge,
                Some("job.params"),
            ),
            (
                "model name too long",
                with("model", json!("m".repeat(300))),
                FieldTooLarge,
                Some("job.model"),
            ),
            (
                "too many loras",
                with("loras", many(17, json!({"name": "l"}))),
                FieldTooLarge,
                Some("job.loras"),
            ),
            (
                "lora strength out of range",
                with("loras", json!([{"name": "l", "strength": 99.0}])),
                InvalidField,
                Some("job.loras[0].strength"),
            ),
            (
                "too many labels",
                with("labels", many(17, json!("a"))),
                FieldTooLarge,
                Some("job.labels"),
            ),
            (
                "label with spaces",
                with("labels", json!(["two words"])),
                InvalidField,
                Some("job.labels[0]"),
            ),
            (
                "priority out of range",
                with("priority", json!(99)),
                InvalidField,
                Some("job.priority"),
            ),
            (
                "priority wrong type",
                with("priority", json!("urgent")),
                InvalidField,
                Some("job.priority"),
            ),
            (
                // A value out of its range is invalid_field (with the range);
                // field_too_large is for sizes (docs/protocol.md, Errors).
                "max_attempts over limit",
                with("max_attempts", json!(50)),
                InvalidField,
                Some("job.max_attempts"),
            ),
            (
                "timeout zero",
                with("run_timeout_s", json!(0)),
                InvalidField,
                Some("job.run_timeout_s"),
            ),
            (
                "queue timeout over limit",
                with("queue_timeout_s", json!(999_999_999)),
                InvalidField,
                Some("job.queue_timeout_s"),
            ),
            (
                "too many inputs",
                with("inputs", many(5, json!({"name": "a.png", "data": []}))),
                FieldTooLarge,
                Some("job.inputs"),
            ),
            (
                "input too large",
                with("inputs", json!([{"name": "a.png", "data": bin(1001)}])),
                FieldTooLarge,
                Some("job.inputs[0].data"),
            ),
            (
                "input name escapes",
                with("inputs", json!([{"name": "../a.png", "data": []}])),
                InvalidField,
                Some("job.inputs[0].name"),
            ),
            (
                "workflow too large",
                with("workflow", json!({"1": {"class_type": "x".repeat(6000)}})),
                FieldTooLarge,
                Some("job.workflow"),
            ),
            (
                "workflow not a graph",
                with("workflow", json!([1, 2])),
                InvalidField,
                Some("job.workflow"),
            ),
            (
                "idempotency key too long",
                with("idempotency_key", json!("k".repeat(200))),
                FieldTooLarge,
                Some("job.idempotency_key"),
            ),
            (
                "unknown backend",
                with("backend", json!("dalle")),
                InvalidField,
                Some("job.backend"),
            ),
            (
                "unknown task",
                with("task", json!("paint")),
                InvalidField,
                Some("job.task"),
            ),
            (
                "unknown field",
                with("priorty", json!(1)),
                InvalidField,
                Some("job.priorty"),
            ),
            (
                "missing job",
                rmp_serde::to_vec_named(&json!({"type": "submit", "req_id": 9})).unwrap(),
                InvalidField,
                Some("job"),
            ),
            (
                "bad job id",
                rmp_serde::to_vec_named(&json!({"type": "get", "req_id": 9, "job_id": "42"}))
                    .unwrap(),
                InvalidField,
                Some("job_id"),
            ),
            (
                "unknown message type",
                rmp_serde::to_vec_named(&json!({"type": "explode", "req_id": 9})).unwrap(),
                UnknownType,
                None,
            ),
            (
                "truncated msgpack",
                {
                    let mut b = submit(base());
                    b.truncate(b.len() / 2);
                    b
                },
                Malformed,
                None,
            ),
            (
                "random bytes",
                (0..512u32)
                    .map(|i| (i.wrapping_mul(2654435761) >> 7) as u8)
                    .collect(),
                Malformed,
                None,
            ),
            (
                "message over its limit",
                with("params", json!({"prompt": "z".repeat(2_100_000)})),
                MessageTooLarge,
                None,
            ),
        ]
    };
    for (what, body, code, field) in catalogue {
        let err = refused(&mut d, body).await;
        assert_eq!(err.code, code, "{what}: {err:?}");
        if let Some(field) = field {
            assert_eq!(err.field.as_deref(), Some(field), "{what}: {err:?}");
        }
    }
    assert_eq!(
        served.await.unwrap(),
        15,
        "the good client was served throughout"
    );

    // Queued jobs per client are bounded: park the only worker, then overflow.
    let hog = good
        .submit(job(1).param("fault", "hang"))
        .await
        .unwrap()
        .job_id;
    eventually("the worker to be busy", Duration::from_secs(10), || {
        let c = good.clone();
        async move { (c.get(hog).await.ok()?.state == JobState::Running).then_some(()) }
    })
    .await;
    for _ in 0..3 {
        good.submit(job(1)).await.unwrap();
    }
    let err = good.submit(job(1)).await.unwrap_err();
    assert_eq!(
        err.code(),
        Some(kiln_protocol::ErrorCode::QueueFull),
        "{err}"
    );
    let health = good.health().await.unwrap();
    assert_eq!(health.queued, 3);
}

/// A second broker on a store another one holds stops at once with one clear
/// message (the cause appeared twice when it was both in the message and the
/// error's source).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_broker_on_the_same_store_says_so_once() {
    let s = Scratch::new();
    let first = s
        .broker(BrokerOpts {
            durable: true,
            ..BrokerOpts::default()
        })
        .await;
    // The same state directory on other ports (every `127.0.0.1:<port>` in
    // the config: the three sockets and the metrics listener).
    let toml: String = std::fs::read_to_string(&first.config)
        .unwrap()
        .split("127.0.0.1:")
        .enumerate()
        .map(|(i, piece)| match i {
            0 => piece.to_string(),
            _ => {
                let digits = piece.bytes().take_while(u8::is_ascii_digit).count();
                format!(
                    "127.0.0.1:{}{}",
                    kiln_testkit::free_port(),
                    &piece[digits..]
                )
            }
        })
        .collect();
    let config = s.path().join("second.toml");
    std::fs::write(&config, toml).unwrap();
    let run = tokio::process::Command::new(kiln_testkit::bin("kiln-broker"))
        .arg("--config")
        .arg(&config)
        .env("KILN_LOG", "info")
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(30), run)
        .await
        .expect("the second broker exits")
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        stderr.matches("already open").count(),
        1,
        "the cause is said once:\n{stderr}"
    );
    assert!(stderr.contains("job store"), "{stderr}");
    first.wait_ready().await;
}
