//! A login belongs to a connection, and a broker restart forgets every login. The
//! Rust client and the pyzmq example both notice (`unauthenticated` on a request,
//! or the connection dropping), log in again by themselves and finish their jobs.
//! Real processes: a broker with a client token killed with `kill -9` mid-job.

use std::time::Duration;

use kiln_protocol::{Backend, JobSpec, JobState, Task};
use kiln_testkit::{eventually, BrokerOpts, Scratch, WorkerOpts};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_log_in_again_after_the_broker_is_killed_and_finish_their_jobs() {
    let s = Scratch::new();
    let mut broker = s
        .broker(BrokerOpts {
            client_token: Some("relogin-secret".into()),
            heartbeat_ms: 250,
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
    let client = broker.client();
    let spec = JobSpec::new(Backend::Sim, Task::TextToImage)
        .param("prompt", "rust client")
        .param("steps", 100)
        .param("width", 16)
        .param("height", 16);
    let rust_job = client.submit(spec).await.unwrap().job_id;

    // The pyzmq example submits its own long job and follows it.
    let out_dir = s.path().join("py-out");
    let python = broker
        .submit_example("relogin-secret")
        .args(["--prompt", "python client", "--steps", "150", "--out"])
        .arg(&out_dir)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("python runs (scripts/test installs pyzmq and msgpack into .venv)");
    eventually(
        "both jobs to be known to the broker",
        Duration::from_secs(20),
        || {
            let client = client.clone();
            async move { (client.list(Default::default()).await.ok()?.len() == 2).then_some(()) }
        },
    )
    .await;

    broker.crash_and_restart().await;

    // The same Client object, created before the crash, keeps working.
    let snap = tokio::time::timeout(Duration::from_secs(60), client.wait(rust_job))
        .await
        .expect("the Rust client follows its job to the end")
        .unwrap();
    assert_eq!(snap.state, JobState::Succeeded, "{snap:?}");
    let output = tokio::time::timeout(Duration::from_secs(60), python.wait_with_output())
        .await
        .expect("the example finishes")
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "example failed:\n{stderr}");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let path = stdout.lines().last().expect("the example prints its file");
    assert_eq!(&std::fs::read(path).unwrap()[..4], b"\x89PNG");
}
