//! Runs the pyzmq + msgpack conformance suite (tests/conformance/conformance.py,
//! written from docs/protocol.md with no Kiln code) against a real durable broker
//! with two sim workers, restarts the broker (`kill -9`), and runs its second
//! phase: idempotency keys and a finished job's `seq` must survive the restart.

use std::time::Duration;

use kiln_testkit::{eventually, BrokerOpts, Scratch, WorkerOpts};

async fn phase(broker: &kiln_testkit::Broker, name: &str, state: &std::path::Path) -> String {
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/conformance/conformance.py");
    let output = broker
        .python_client(&script, broker.opts.client_token.as_deref())
        .arg(name)
        .arg(state)
        .output()
        .await
        .expect("python runs (scripts/test installs pyzmq and msgpack into .venv)");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "conformance {name} failed:\n{stdout}\n{stderr}\n--- broker log ---\n{}",
        broker.log()
    );
    stdout
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_written_from_the_doc_alone_conforms() {
    let s = Scratch::new();
    let mut broker = s
        .broker(BrokerOpts {
            extra: "[broker.limits]\nmax_list = 5\nmax_queued_per_client = 6\nmax_message_bytes = 2097152\n".into(),
            ..BrokerOpts::default()
        })
        .await;
    let _w1 = s.worker(&broker, WorkerOpts::sim("conf-a")).await;
    let _w2 = s.worker(&broker, WorkerOpts::sim("conf-b")).await;
    let state = s.path().join("conformance-state.json");
    let out = phase(&broker, "before", &state).await;
    println!("{out}");
    assert!(out.contains(" 0 failed"), "{out}");
    broker.crash_and_restart().await;
    let client = broker.client();
    eventually(
        "both workers to re-register",
        Duration::from_secs(30),
        || {
            let client = client.clone();
            async move {
                let w = client.workers().await.ok()?;
                (w.iter()
                    .filter(|w| w.state != kiln_protocol::worker::WorkerState::Offline)
                    .count()
                    == 2)
                    .then_some(())
            }
        },
    )
    .await;
    let out = phase(&broker, "after", &state).await;
    println!("{out}");
    assert!(out.contains(" 0 failed"), "{out}");

    // The token rules, on a broker that has one (its events port stays closed).
    let guarded = s
        .broker(BrokerOpts {
            client_token: Some("conformance".into()),
            ..BrokerOpts::default()
        })
        .await;
    let out = phase(&guarded, "auth", &state).await;
    println!("{out}");
    assert!(out.contains("auth: 2 checks passed, 0 failed"), "{out}");
}
