//! This version's `kiln` against the previous release's broker, over real
//! sockets: the mixed-version direction of a rolling upgrade where the clients
//! are upgraded first. That broker (`0.1.0-dc6b6c9`) cannot be built here, so
//! tests/conformance/previous_broker.py plays it from its golden reply bytes and
//! refuses what it refused (request types and strict-map keys it did not know).
//! Every command a user runs must work, and `resubmit`, which that broker does
//! not have, must be declined by the client with a clear message instead of
//! being sent.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Output, Stdio};

use kiln_testkit::{bin, free_port, python, Scratch};

/// The played broker, killed on drop.
struct PreviousBroker {
    child: Child,
    endpoint: String,
}

impl PreviousBroker {
    fn start(s: &Scratch) -> PreviousBroker {
        let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/conformance/previous_broker.py");
        let log = std::fs::File::create(s.path().join("previous-broker.log")).unwrap();
        let mut child = Command::new(python())
            .arg(script)
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .expect("python runs (scripts/test installs pyzmq and msgpack into .venv)");
        // The script prints its endpoint once bound, then serves.
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert!(line.starts_with("tcp://"), "no endpoint: {line:?}");
        PreviousBroker {
            child,
            endpoint: line.trim().to_string(),
        }
    }

    fn log(s: &Scratch) -> String {
        std::fs::read_to_string(s.path().join("previous-broker.log")).unwrap_or_default()
    }
}

impl Drop for PreviousBroker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn kiln(s: &Scratch, broker: &PreviousBroker, args: &[&str]) -> Output {
    Command::new(bin("kiln"))
        .args(args)
        .env_remove("KILN_CONFIG")
        .env_remove("KILN_BROKER")
        .env_remove("KILN_EVENTS")
        .env("HOME", s.path())
        .env("KILN_CLIENT__BROKER", &broker.endpoint)
        // That release's events port is not played: nothing listens here.
        .env(
            "KILN_CLIENT__EVENTS",
            format!("tcp://127.0.0.1:{}", free_port()),
        )
        .output()
        .expect("kiln runs")
}

#[test]
fn this_versions_cli_works_with_the_previous_releases_broker() {
    let s = Scratch::new();
    let broker = PreviousBroker::start(&s);
    let run = |args: &[&str], want: &str| {
        let out = kiln(&s, &broker, args);
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success() && stdout.contains(want),
            "kiln {args:?}: exit {:?}, expected {want:?} in\n{stdout}\n{stderr}\n--- played broker ---\n{}",
            out.status.code(),
            PreviousBroker::log(&s)
        );
    };
    // The fixtures' job is j42 of client `render-farm`, on worker box1-gpu0.
    run(
        &[
            "submit",
            "--backend",
            "sim",
            "--prompt",
            "a kiln at dusk",
            "--label",
            "fast",
        ],
        "j42",
    );
    run(&["status", "j42"], "succeeded");
    run(&["jobs"], "j42");
    run(&["jobs", "--state", "queued", "--backend", "sim"], "j42");
    run(&["workers"], "box1-gpu0");
    run(&["models"], "sim-xl");
    run(&["health"], "0.1.0");
    run(&["cancel", "j42"], "cancelled");

    let out = kiln(&s, &broker, &["resubmit", "j42"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("does not support `resubmit`") && stderr.contains("0.1.0"),
        "{stderr}"
    );

    let log = PreviousBroker::log(&s);
    assert!(
        log.contains("REQUEST submit") && log.contains("REQUEST list"),
        "the commands reached the played broker: {log}"
    );
    assert!(
        !log.contains("REFUSED"),
        "this version sent the previous broker something it cannot read:\n{log}"
    );
}
