//! What `kiln status` and `kiln jobs` print, as reviewed snapshots (insta): a
//! formatting change shows up as a diff in cli/tests/snapshots/ to accept
//! (`cargo insta review`, or `INSTA_UPDATE=always`). Real broker and sim worker;
//! times are replaced by placeholders, everything else is as printed.

use std::process::Command;

use kiln_testkit::{bin, Broker, BrokerOpts, Scratch, WorkerOpts};

fn kiln(s: &Scratch, broker: &Broker, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(bin("kiln"))
        .args(args)
        .env_remove("KILN_CONFIG")
        .env("HOME", s.path())
        .env("KILN_CLIENT__BROKER", &broker.frontend)
        .env("KILN_CLIENT__EVENTS", &broker.events)
        .env("KILN_CLIENT__NAME", "snapshots")
        .output()
        .expect("kiln runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Replaces what changes from run to run: wall-clock times and durations.
fn stable(text: &str) -> String {
    let date = regex::Regex::new(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3}Z").unwrap();
    let offset = regex::Regex::new(r"\+(\d+\.\d{3}s|\d+m\d\ds)").unwrap();
    let text = date.replace_all(text, "YYYY-MM-DD hh:mm:ss.mmmZ");
    offset.replace_all(&text, "+T     ").into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_and_jobs_output() {
    let s = Scratch::new();
    let broker = s.broker(BrokerOpts::default()).await;
    let _w = s.worker(&broker, WorkerOpts::sim("w1")).await;
    let out = s.path().join("out");
    let out = out.to_str().unwrap();

    let (code, _, err) = kiln(
        &s,
        &broker,
        &[
            "submit",
            "-p",
            "a kiln at dusk",
            "--seed",
            "7",
            "--steps",
            "3",
            "--width",
            "64",
            "--height",
            "64",
            "--wait",
            "--out",
            out,
        ],
    );
    assert_eq!(code, 0, "{err}");
    let (code, _, err) = kiln(
        &s,
        &broker,
        &[
            "submit",
            "-p",
            "doomed",
            "--steps",
            "2",
            "-P",
            "fault=fail",
            "--max-attempts",
            "2",
            "--wait",
        ],
    );
    assert_eq!(code, 3, "{err}");
    // Non-terminal output has no trailing spaces.
    for line in err.lines() {
        assert_eq!(line, line.trim_end(), "trailing space in {err:?}");
    }

    let (code, succeeded, err) = kiln(&s, &broker, &["status", "j1"]);
    assert_eq!(code, 0, "{err}");
    insta::assert_snapshot!("status_succeeded", stable(&succeeded));
    let (code, failed, err) = kiln(&s, &broker, &["status", "j2"]);
    assert_eq!(code, 0, "{err}");
    insta::assert_snapshot!("status_failed", stable(&failed));
    let (code, jobs, err) = kiln(&s, &broker, &["jobs"]);
    assert_eq!(code, 0, "{err}");
    insta::assert_snapshot!("jobs", stable(&jobs));

    // `--limit 0` lists every job rather than none.
    let (_, all, _) = kiln(&s, &broker, &["jobs", "--limit", "0"]);
    assert_eq!(all.lines().count(), 3, "{all}");
}
