//! Every outcome of `kiln` has its own documented exit code (cli/src/exit.rs), and
//! the failures an operator meets first explain themselves. Real broker, real sim
//! worker, the real `kiln` binary.

use std::process::{Command, Output};
use std::time::Duration;

use kiln_testkit::{bin, eventually, free_port, Broker, BrokerOpts, Scratch, WorkerOpts};

/// `kiln <args>` against `broker`, with no config file from the machine.
fn kiln(s: &Scratch, broker: Option<&Broker>, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(bin("kiln"));
    cmd.args(args)
        .env_remove("KILN_CONFIG")
        .env_remove("KILN_BROKER")
        .env_remove("KILN_EVENTS")
        .env("HOME", s.path());
    if let Some(b) = broker {
        cmd.env("KILN_CLIENT__BROKER", &b.frontend)
            .env("KILN_CLIENT__EVENTS", &b.events);
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("kiln runs")
}

fn code(out: &Output) -> i32 {
    out.status.code().expect("exited, not killed")
}

fn text(out: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn usage_and_configuration_errors_have_their_own_codes() {
    let s = Scratch::new();
    let out = kiln(&s, None, &["submit", "--priority", "99"], &[]);
    assert_eq!(code(&out), 2, "{:?}", text(&out));
    let out = kiln(&s, None, &["submit", "--steps", "-5"], &[]);
    let (_, err) = text(&out);
    assert_eq!(code(&out), 2, "{err}");
    assert!(
        err.contains("--steps"),
        "a bad value, not an unknown flag: {err}"
    );

    // A bad environment override names the variable.
    let out = kiln(&s, None, &["jobs"], &[("KILN_CLIENT__BROKER", "garbage")]);
    let (_, err) = text(&out);
    assert_eq!(code(&out), 6, "{err}");
    assert!(err.contains("KILN_CLIENT__BROKER"), "{err}");
    // `--broker garbage` is refused before any connection attempt.
    let out = kiln(&s, None, &["jobs", "--broker", "garbage"], &[]);
    let (_, err) = text(&out);
    assert_eq!(code(&out), 6, "{err}");
    assert!(err.contains("--broker") && err.contains("garbage"), "{err}");
    // An unknown key gets a suggestion.
    let out = kiln(
        &s,
        None,
        &["config", "check"],
        &[("KILN_BROKER__HEARTBEAT", "5")],
    );
    let (_, err) = text(&out);
    assert_eq!(code(&out), 6, "{err}");
    assert!(
        err.contains("did you mean `heartbeat_ms`?") && err.contains("KILN_BROKER__HEARTBEAT"),
        "{err}"
    );
}

#[test]
fn a_broken_broker_key_does_not_block_client_commands() {
    let s = Scratch::new();
    let cfg = s.path().join("kiln.toml");
    std::fs::write(
        &cfg,
        "[broker]\nheartbeat_ms = 1\nclient_token_file = \"/nonexistent/token\"\n",
    )
    .unwrap();
    let port = free_port();
    let endpoint = format!("tcp://127.0.0.1:{port}");
    // The client command gets as far as the (absent) broker.
    let out = kiln(
        &s,
        None,
        &["-c", cfg.to_str().unwrap(), "jobs", "--broker", &endpoint],
        &[],
    );
    assert_eq!(code(&out), 5, "{:?}", text(&out));
    // `config check` validates every table and names the offending key.
    let out = kiln(
        &s,
        None,
        &["-c", cfg.to_str().unwrap(), "config", "check"],
        &[],
    );
    let (_, err) = text(&out);
    assert_eq!(code(&out), 6, "{err}");
    assert!(err.contains("broker.heartbeat_ms"), "{err}");
    std::fs::write(
        &cfg,
        "[broker]\nclient_token_file = \"/nonexistent/token\"\n",
    )
    .unwrap();
    let out = kiln(
        &s,
        None,
        &["-c", cfg.to_str().unwrap(), "config", "check"],
        &[],
    );
    let (_, err) = text(&out);
    assert_eq!(code(&out), 6, "{err}");
    assert!(err.contains("broker.client_token_file"), "{err}");
}

#[test]
fn a_broker_that_is_down_is_reported_at_once_with_what_to_do() {
    let s = Scratch::new();
    let endpoint = format!("tcp://127.0.0.1:{}", free_port());
    for (args, origin) in [
        (vec!["jobs", "--broker", endpoint.as_str()], "--broker"),
        (vec!["health"], "KILN_CLIENT__BROKER"),
    ] {
        let out = kiln(
            &s,
            None,
            &args,
            &[
                ("KILN_CLIENT__BROKER", endpoint.as_str()),
                ("KILN_CLIENT__REQUEST_TIMEOUT_S", "60"),
            ],
        );
        let (_, err) = text(&out);
        assert_eq!(code(&out), 5, "{err}");
        for needle in [
            endpoint.as_str(),
            "connection refused",
            origin,
            "kiln up",
            "client.broker",
        ] {
            assert!(err.contains(needle), "{needle:?} missing: {err}");
        }
    }
    let out = kiln(
        &s,
        None,
        &["gpu-info"],
        &[("KILN_WORKER__GPU__NVML", "false")],
    );
    assert_eq!(code(&out), 7, "{:?}", text(&out));
    let (stdout, _) = text(&out);
    assert!(
        !stdout.contains("not available (NVML is not available"),
        "{stdout}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn job_outcomes_have_their_own_codes() {
    let s = Scratch::new();
    let broker = s.broker(BrokerOpts::default()).await;
    let _w = s.worker(&broker, WorkerOpts::sim("w1")).await;
    let out_dir = s.path().join("out");
    let out_dir = out_dir.to_str().unwrap();

    let out = kiln(
        &s,
        Some(&broker),
        &[
            "submit", "-p", "ok", "--steps", "2", "--wait", "--out", out_dir,
        ],
        &[],
    );
    assert_eq!(code(&out), 0, "{:?}", text(&out));
    let out = kiln(
        &s,
        Some(&broker),
        &[
            "submit",
            "-p",
            "bad",
            "-P",
            "fault=fail",
            "--max-attempts",
            "1",
            "--wait",
        ],
        &[],
    );
    let (_, err) = text(&out);
    assert_eq!(code(&out), 3, "{err}");
    assert!(err.contains("failed"), "{err}");

    // `--json` submit output is the job, without the connection's request id.
    let out = kiln(
        &s,
        Some(&broker),
        &["submit", "-p", "slow", "--steps", "10000", "--json"],
        &[],
    );
    assert_eq!(code(&out), 0, "{:?}", text(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(v.get("req_id").is_none(), "{v}");
    let job = v["job_id"].as_str().unwrap().to_string();

    // Ctrl-C while following: the job keeps running, the user is told how to
    // find it, and the code says "interrupted".
    let watch = Command::new(bin("kiln"))
        .args(["watch", &job])
        .env("KILN_CLIENT__BROKER", &broker.frontend)
        .env("KILN_CLIENT__EVENTS", &broker.events)
        .env("HOME", s.path())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let pid = watch.id();
    // Wait until the process has installed its SIGINT handler (bit 2 of SigCgt).
    eventually(
        "kiln watch to catch SIGINT",
        Duration::from_secs(20),
        || async move {
            let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
            let mask = status.lines().find_map(|l| l.strip_prefix("SigCgt:"))?;
            let mask = u64::from_str_radix(mask.trim(), 16).ok()?;
            (mask & (1 << (libc::SIGINT - 1)) != 0).then_some(())
        },
    )
    .await;
    // SAFETY: plain kill(2) of our own child.
    unsafe { libc::kill(pid as i32, libc::SIGINT) };
    let out = watch.wait_with_output().unwrap();
    let (_, err) = text(&out);
    assert_eq!(code(&out), 130, "{err}");
    assert!(
        err.contains(&format!("kiln watch {job}")) && err.contains(&format!("kiln cancel {job}")),
        "{err}"
    );
    let client = broker.client();
    let snap = client.get(job.parse().unwrap()).await.unwrap();
    assert!(!snap.state.is_terminal(), "the job runs on: {snap:?}");

    let out = kiln(&s, Some(&broker), &["cancel", &job], &[]);
    assert_eq!(code(&out), 0, "{:?}", text(&out));
    let out = kiln(&s, Some(&broker), &["watch", &job], &[]);
    assert_eq!(code(&out), 4, "{:?}", text(&out));
    // The cancelled job runs again as a new one, from the broker's copy.
    let out = kiln(&s, Some(&broker), &["resubmit", &job], &[]);
    let (stdout, err) = text(&out);
    assert_eq!(code(&out), 0, "{err}");
    assert!(
        stdout.starts_with(&format!("{job} resubmitted as j")),
        "{stdout}"
    );
    let out = kiln(&s, Some(&broker), &["resubmit", "j999999"], &[]);
    let (_, err) = text(&out);
    assert_eq!(code(&out), 1, "{err}");
    assert!(err.contains("j999999"), "{err}");

    // A refusal from the broker: code 1, in words, without Rust type names.
    let out = kiln(&s, Some(&broker), &["cancel", "j1"], &[]);
    let (_, err) = text(&out);
    assert_eq!(code(&out), 1, "{err}");
    assert!(
        !err.contains("InvalidState") && !err.contains("Broker("),
        "{err}"
    );
}
