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

/// Without a client token nothing else tells a raw DEALER that a restarted broker
/// forgot its `hello` (libzmq reconnects underneath): its next request would be
/// filed under the connection's own name (`conn-…`), where its idempotency keys
/// do not match. A submit names its client, so the broker answers
/// `unauthenticated` instead; after a fresh `hello` the resend finds its first
/// job. Played with pyzmq, one socket kept across the restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_token_a_submit_on_a_forgotten_login_is_unauthenticated() {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    let s = Scratch::new();
    let mut broker = s.broker(BrokerOpts::default()).await;
    let _w = s.worker(&broker, WorkerOpts::sim("w1")).await;
    let script = r#"
import os, sys, msgpack, zmq
TAG = b"KILN1"
sock = zmq.Context.instance().socket(zmq.DEALER)
sock.setsockopt(zmq.LINGER, 0)
sock.connect(os.environ["KILN_BROKER"])
def call(kind, **fields):
    sock.send_multipart([TAG, msgpack.packb(dict(fields, type=kind, req_id=call.n), use_bin_type=True)])
    call.n += 1
    if not sock.poll(20000):
        return {"type": "timeout"}
    return msgpack.unpackb(sock.recv_multipart()[1], raw=False)
call.n = 1
job = {"backend": "sim", "task": "text_to_image", "params": {"prompt": "raw", "width": 16, "height": 16},
       "idempotency_key": "raw-once"}
call("hello", client="raw-script")
print(call("submit", job=job, client="raw-script")["job_id"], flush=True)
sys.stdin.readline()  # the broker restarts here
r = call("submit", job=job, client="raw-script")
print(r.get("error", {}).get("code", r["type"]), flush=True)
fresh = zmq.Context.instance().socket(zmq.DEALER)
fresh.setsockopt(zmq.LINGER, 0)
fresh.connect(os.environ["KILN_BROKER"])
sock = fresh
call("hello", client="raw-script")
r = call("submit", job=job, client="raw-script")
print(r.get("job_id"), r.get("duplicate"), flush=True)
"#;
    let path = s.path().join("raw_resend.py");
    std::fs::write(&path, script).unwrap();
    let mut child = broker
        .python_client(&path, None)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("python runs (scripts/test installs pyzmq and msgpack into .venv)");
    let mut stdin = child.stdin.take().unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let first = lines.next_line().await.unwrap().expect("the first job id");
    assert!(first.starts_with('j'), "{first}");

    broker.crash_and_restart().await;
    stdin.write_all(b"go\n").await.unwrap();
    let answer = lines
        .next_line()
        .await
        .unwrap()
        .expect("the resend's answer");
    assert_eq!(answer, "unauthenticated", "{}", broker.log());
    let again = lines
        .next_line()
        .await
        .unwrap()
        .expect("the resend after hello");
    assert_eq!(
        again,
        format!("{first} True"),
        "the first job, not a second one"
    );
}
