//! The previous release's client and worker against this broker, played from the
//! bytes that release sends (tests/conformance/previous_release.py with the golden
//! fixtures of `0.1.0-dc6b6c9`): a job submitted by its client runs on its worker,
//! and every answer is one that release reads. The reverse direction (that release
//! reading this version's messages) is `protocol/tests/previous_release.rs`.

use kiln_testkit::{BrokerOpts, Scratch};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_previous_releases_client_and_worker_work_with_this_broker() {
    let s = Scratch::new();
    // The tokens the fixtures carry.
    let broker = s
        .broker(BrokerOpts {
            client_token: Some("secret".into()),
            worker_token: Some("worker-secret".into()),
            ..BrokerOpts::default()
        })
        .await;
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/conformance/previous_release.py");
    let output = tokio::process::Command::new(kiln_testkit::python())
        .arg(&script)
        .env("KILN_BROKER", &broker.frontend)
        .env("KILN_BACKEND", &broker.backend)
        .output()
        .await
        .expect("python runs (scripts/test installs pyzmq and msgpack into .venv)");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success() && stdout.contains(" 0 failed"),
        "{stdout}\n{stderr}\n--- broker log ---\n{}",
        broker.log()
    );
    println!("{stdout}");
}
