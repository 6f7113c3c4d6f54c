//! A broker whose disk fills up: writes are refused with `unavailable` naming the
//! cause, reads keep working, the process stays up, and once space returns every
//! accepted job completes. Real processes on a small tmpfs (needs root to mount it,
//! as CI and the development machines have).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use kiln_protocol::{Backend, Client, ClientError, ErrorCode, JobId, JobSpec, JobState, Task};
use kiln_testkit::{eventually, BrokerOpts, Scratch, WorkerOpts};

/// A tmpfs mounted for the test's lifetime.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: &Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(at).unwrap();
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(at)
            .status()
            .expect("running mount");
        assert!(
            status.success(),
            "mounting a {size} tmpfs at {} failed: this test needs root (CI runs as root)",
            at.display()
        );
        Tmpfs(at.to_path_buf())
    }

    /// Writes a file that takes every free byte; returns its path.
    fn fill(&self) -> PathBuf {
        let path = self.0.join("filler");
        let status = Command::new("dd")
            .args(["if=/dev/zero", "bs=64k"])
            .arg(format!("of={}", path.display()))
            .stderr(std::process::Stdio::null())
            .status()
            .expect("running dd");
        // dd stops with an error when the disk is full: that is the point.
        assert!(!status.success(), "the filler should have hit a full disk");
        path
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

fn job(key: &str, steps: u32) -> JobSpec {
    let mut spec = JobSpec::new(Backend::Sim, Task::TextToImage)
        .param("prompt", "disk full")
        .param("steps", steps)
        .param("width", 64)
        .param("height", 64);
    spec.idempotency_key = Some(key.to_string());
    spec
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_refuses_writes_keeps_reads_and_loses_no_accepted_job() {
    let s = Scratch::new();
    let disk = Tmpfs::mount(&s.path().join("disk"), "16m");
    let state = disk.0.join("state");
    let mut broker = s
        .broker(BrokerOpts {
            heartbeat_ms: 250,
            state_dir: Some(state.clone()),
            ..BrokerOpts::default()
        })
        .await;
    let _worker = s
        .worker(
            &broker,
            WorkerOpts {
                step_ms: 20,
                ..WorkerOpts::sim("w1")
            },
        )
        .await;
    let client = broker.client();
    // A short timeout: a submit whose reply is held by the outage times out here and
    // is retried later with its idempotency key.
    let mut quick = broker.client_options();
    quick.request_timeout = Duration::from_secs(2);
    let quick = Client::connect(quick);

    let mut keys: Vec<String> = Vec::new();
    for n in 0..3 {
        let key = format!("before-{n}");
        client.submit(job(&key, 2)).await.unwrap();
        keys.push(key);
    }
    // One long job runs while the disk fills, so its upload meets the full disk.
    let long = client.submit(job("long", 100)).await.unwrap().job_id;
    keys.push("long".into());
    eventually("the long job to run", Duration::from_secs(20), || {
        let client = client.clone();
        async move { (client.get(long).await.ok()?.state == JobState::Running).then_some(()) }
    })
    .await;

    // A burst waits behind it when the disk fills: none of it may start (and burn
    // attempts on the broker's own fault) before space returns.
    for n in 0..10 {
        let key = format!("burst-{n}");
        client.submit(job(&key, 2)).await.unwrap();
        keys.push(key);
    }

    let filler = disk.fill();

    // Submits are refused with `unavailable`, naming the cause. The first ones may
    // be taken before the broker has noticed: those are held, not lost.
    let refusal = eventually(
        "a submit refused as unavailable",
        Duration::from_secs(60),
        || {
            let quick = quick.clone();
            let key = format!("during-{}", keys.len());
            keys.push(key.clone());
            async move {
                match quick.submit(job(&key, 2)).await {
                    Err(ClientError::Broker(e)) if e.code == ErrorCode::Unavailable => Some(e),
                    Err(ClientError::Broker(e)) => panic!("unexpected refusal: {e:?}"),
                    _ => None,
                }
            }
        },
    )
    .await;
    assert!(
        refusal.message.contains("No space left on device"),
        "the refusal names the cause: {}",
        refusal.message
    );
    // Reads keep working, and so does the process.
    client.ping().await.expect("ping during the outage");
    let listed = client
        .list(Default::default())
        .await
        .expect("list during the outage");
    assert!(listed.len() >= 4, "{listed:?}");
    assert!(broker.proc.is_running(), "the broker stays up");
    // The same, seen by the pyzmq client written from docs/protocol.md alone.
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/conformance/conformance.py");
    let output = broker
        .python_client(&script, None)
        .arg("store_full")
        .arg(s.path().join("unused-state.json"))
        .output()
        .await
        .expect("python runs (scripts/test installs pyzmq and msgpack into .venv)");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success() && stdout.contains("store_full: 4 checks passed, 0 failed"),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    // The long job's upload hit the full disk: its attempt failed with that cause.
    let snap = eventually(
        "the long job's upload to fail",
        Duration::from_secs(30),
        || {
            let client = client.clone();
            async move {
                let snap = client.get(long).await.ok()?;
                snap.history
                    .iter()
                    .any(|t| t.note.contains("No space left on device"))
                    .then_some(snap)
            }
        },
    )
    .await;
    assert!(
        !snap
            .history
            .iter()
            .any(|t| t.note.contains("expected offset")),
        "the first cause is reported, not a follow-on: {:?}",
        snap.history
    );

    // Space returns: commits resume by themselves.
    std::fs::remove_file(&filler).unwrap();
    let ids: Vec<JobId> = {
        let mut ids = Vec::new();
        for key in &keys {
            // The same spec as the first submit, or the key would be a conflict.
            let steps = if key == "long" { 100 } else { 2 };
            let id = eventually("the submit to be taken", Duration::from_secs(30), || {
                let client = client.clone();
                let key = key.clone();
                async move { client.submit(job(&key, steps)).await.ok().map(|a| a.job_id) }
            })
            .await;
            ids.push(id);
        }
        ids
    };
    for (key, id) in keys.iter().zip(&ids) {
        let snap = eventually("every job to finish", Duration::from_secs(60), || {
            let client = client.clone();
            let id = *id;
            async move {
                let snap = client.get(id).await.ok()?;
                snap.state.is_terminal().then_some(snap)
            }
        })
        .await;
        assert_eq!(snap.state, JobState::Succeeded, "{snap:?}");
        if key != "long" {
            // Nothing started while the store could not write, so no attempt of
            // any other job was spent on the full disk.
            assert!(
                !snap
                    .history
                    .iter()
                    .any(|t| t.note.contains("No space left")),
                "{key} ran during the outage: {:?}",
                snap.history
            );
        }
    }
    assert!(
        broker.log().contains("job store commit failed"),
        "the outage is logged"
    );

    // What was committed around the outage survives a crash: the log was cut back
    // to whole frames, so nothing after the failed append is lost on replay.
    broker.crash_and_restart().await;
    let client = broker.client();
    for id in &ids {
        let snap = client.get(*id).await.unwrap();
        assert_eq!(snap.state, JobState::Succeeded, "{snap:?}");
    }
}

/// A broker restarted while its disk is full: it starts, answers reads about the
/// jobs it holds, refuses writes naming the cause, and once space returns counts
/// its start, takes submits and runs what waited (it used to exit at start, and
/// so restart and exit again under `Restart=on-failure` until space returned).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_started_on_a_full_disk_serves_reads_and_catches_up() {
    let s = Scratch::new();
    let disk = Tmpfs::mount(&s.path().join("disk"), "16m");
    let mut broker = s
        .broker(BrokerOpts {
            heartbeat_ms: 250,
            state_dir: Some(disk.0.join("state")),
            ..BrokerOpts::default()
        })
        .await;
    let mut worker = s.worker(&broker, WorkerOpts::sim("w1")).await;
    let client = broker.client();
    let done = client.submit(job("done", 2)).await.unwrap().job_id;
    assert_eq!(client.wait(done).await.unwrap().state, JobState::Succeeded);
    // Its worker gone (but remembered), a job waits in the queue.
    worker.stop();
    let waiting = client.submit(job("waiting", 2)).await.unwrap().job_id;

    broker.proc.stop();
    let filler = disk.fill();
    broker.proc.restart();
    broker.wait_ready().await;
    let log = broker.log();
    assert!(
        log.contains("cannot replay the job store's log"),
        "the commits since the last checkpoint are read from the log: {log}"
    );
    assert!(
        log.contains("cannot write the job store at start"),
        "the broker says why it refuses writes"
    );
    let client = broker.client();
    assert_eq!(
        client.get(done).await.unwrap().state,
        JobState::Succeeded,
        "reads are answered"
    );
    assert_eq!(client.get(waiting).await.unwrap().state, JobState::Queued);
    match client.submit(job("during", 2)).await {
        Err(ClientError::Broker(e)) => {
            assert_eq!(e.code, ErrorCode::Unavailable, "{e:?}");
            assert!(e.message.contains("No space left on device"), "{e:?}");
        }
        other => panic!("a submit on a full disk: {other:?}"),
    }

    std::fs::remove_file(&filler).unwrap();
    let later = eventually(
        "submits to be taken once space returns",
        Duration::from_secs(60),
        || {
            let client = client.clone();
            async move { client.submit(job("during", 2)).await.ok().map(|a| a.job_id) }
        },
    )
    .await;
    let _worker = s.worker(&broker, WorkerOpts::sim("w1")).await;
    for id in [waiting, later] {
        let snap = tokio::time::timeout(Duration::from_secs(60), client.wait(id))
            .await
            .expect("the job ends")
            .unwrap();
        assert_eq!(snap.state, JobState::Succeeded, "{snap:?}");
    }
    // What it wrote once space returned survives a crash.
    broker.crash_and_restart().await;
    let client = broker.client();
    for id in [done, waiting, later] {
        assert_eq!(client.get(id).await.unwrap().state, JobState::Succeeded);
    }
}
