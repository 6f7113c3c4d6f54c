//! kiln-mcp end to end: the real broker, two sim workers and the real `kiln-mcp`
//! binary, driven by the official MCP Python SDK (`tests/fixtures/mcp/scenarios.py`)
//! over stdio and over streamable HTTP. The script checks what an assistant sees;
//! this side checks the broker (a cancelled call's job is cancelled there) and the
//! files the gateway wrote.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use kiln_config::KilnConfig;
use kiln_protocol::{JobId, JobState};
use kiln_testkit::{bin, eventually, free_port, Proc, Scratch};
use serde_json::Value;

mod common;
use common::{fleet, Fleet, INLINE_BUDGET, MAX_LABELS, MCP_TOKEN};

fn python() -> String {
    std::env::var("KILN_TEST_PYTHON").unwrap_or_else(|_| "python3".into())
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/mcp/scenarios.py")
}

/// Runs the scenario script and returns its JSON lines, failing with its output
/// when it cannot run at all.
async fn run_scenarios(fleet: &Fleet, args: &[String]) -> Vec<Value> {
    let mut cmd = tokio::process::Command::new(python());
    cmd.arg(script())
        .args(args)
        .arg("--assets")
        .arg(&fleet.assets)
        .env("KILN_TEST_INLINE_BUDGET", (INLINE_BUDGET).to_string())
        .env("KILN_TEST_MAX_LABELS", MAX_LABELS.to_string())
        .env("KILN_LOG", "info,zeromq=warn")
        .env_remove("KILN_CONFIG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let child = cmd
        .spawn()
        .expect("python runs (scripts/test installs the MCP SDK into .venv)");
    let output = tokio::time::timeout(Duration::from_secs(240), child.wait_with_output())
        .await
        .expect("the scenarios finish within 4 minutes")
        .expect("python ran");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    let lines: Vec<Value> = stdout
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    assert!(
        lines.iter().any(|l| l["done"] == true),
        "the scenario script did not finish\n--- stdout\n{stdout}\n--- stderr\n{stderr}"
    );
    let failed: Vec<&Value> = lines.iter().filter(|l| l["ok"] == false).collect();
    assert!(
        failed.is_empty(),
        "scenarios failed:\n{}\n--- stderr (gateway logs included)\n{}",
        failed
            .iter()
            .map(|f| serde_json::to_string_pretty(f).unwrap())
            .collect::<Vec<_>>()
            .join("\n"),
        stderr
            .chars()
            .rev()
            .take(20_000)
            .collect::<String>()
            .chars()
            .rev()
            .collect::<String>()
    );
    eprintln!("{stdout}");
    lines
}

fn scenario<'a>(lines: &'a [Value], name: &str) -> &'a Value {
    lines
        .iter()
        .find(|l| l["scenario"] == name)
        .unwrap_or_else(|| panic!("scenario {name} did not run: {lines:?}"))
}

/// What the broker must show after the scenarios: the cancelled call's job was
/// cancelled there, and the gateway's jobs are filed under its client name.
async fn check_broker(fleet: &Fleet, lines: &[Value]) {
    let client = fleet.broker.client();
    // A cancelled call, and a cancelled task: each job is cancelled at the broker.
    for name in ["cancel", "tasks"] {
        let job: JobId = scenario(lines, name)["cancelled_job"]
            .as_str()
            .unwrap_or_else(|| panic!("the {name} scenario names its job"))
            .parse()
            .expect("a job id");
        let snapshot = eventually(
            &format!("{name}: job {job} to end at the broker"),
            Duration::from_secs(15),
            || {
                let client = client.clone();
                async move { client.get(job).await.ok().filter(|s| s.state.is_terminal()) }
            },
        )
        .await;
        assert_eq!(snapshot.state, JobState::Cancelled, "{name}: {snapshot:?}");
        assert_eq!(snapshot.client, "kiln-mcp");
        // The job ran for a moment only: far from its 200 steps of 200 ms.
        assert!(
            snapshot.progress.as_ref().is_none_or(|p| p.pct < 50.0),
            "{snapshot:?}"
        );
    }

    let saved = scenario(lines, "save_output")["saved"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        Path::new(&saved).starts_with(fleet.assets.canonicalize().unwrap()),
        "{saved}"
    );
    let manifest: Value =
        serde_json::from_slice(&std::fs::read(fleet.assets.join("game.assets.json")).unwrap())
            .unwrap();
    let mode = scenario(lines, "mode")["mode"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(
        manifest["assets"][format!("knight_idle_{mode}")]["path"],
        format!("sprites/{mode}/knight/idle.png")
    );
    let copies = std::fs::read_dir(&fleet.outputs).unwrap().count();
    assert!(
        copies >= 3,
        "the output folder holds the gateway's copies ({copies})"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_stdio_with_the_python_sdk() {
    let fleet = fleet().await;
    let lines = run_scenarios(
        &fleet,
        &[
            "--transport".into(),
            "stdio".into(),
            "--command".into(),
            bin("kiln-mcp").display().to_string(),
            "--config".into(),
            fleet.config.display().to_string(),
            // Desktop assistants still open with `initialize`; HTTP below uses
            // the 2026-07-28 protocol.
            "--mode".into(),
            "legacy".into(),
        ],
    )
    .await;
    check_broker(&fleet, &lines).await;
    // A 17 MiB request line was answered with an error carrying its id, and
    // the same session then answered a ping and a call.
    assert_eq!(scenario(&lines, "oversized")["code"], -32600);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_http_with_the_python_sdk() {
    let fleet = fleet().await;
    let port = free_port();
    let _gateway = Proc::spawn(
        "kiln-mcp --http",
        &bin("kiln-mcp"),
        &[
            "--config".into(),
            fleet.config.display().to_string(),
            "--http".into(),
            format!("127.0.0.1:{port}"),
        ],
        &[],
        fleet.scratch.path().join("kiln-mcp-http.log"),
    );
    eventually(
        "kiln-mcp to listen",
        Duration::from_secs(20),
        || async move {
            tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .ok()
        },
    )
    .await;
    // Both protocol generations over HTTP: sessions (initialize) and stateless
    // 2026-07-28 requests.
    for mode in ["legacy", "auto"] {
        let lines = run_scenarios(
            &fleet,
            &[
                "--transport".into(),
                "http".into(),
                "--url".into(),
                format!("http://127.0.0.1:{port}/mcp"),
                "--token".into(),
                MCP_TOKEN.into(),
                "--mode".into(),
                mode.into(),
            ],
        )
        .await;
        for name in ["http_guards", "sdk_without_token", "concurrent_sessions"] {
            assert_eq!(scenario(&lines, name)["ok"], true, "{mode}: {name}");
        }
        check_broker(&fleet, &lines).await;
    }
}

#[test]
fn http_on_a_network_address_needs_a_token() {
    let scratch = Scratch::new();
    let config = scratch.path().join("open.toml");
    std::fs::write(&config, "[mcp]\nhttp_bind = \"0.0.0.0:0\"\n").unwrap();
    let out = std::process::Command::new(bin("kiln-mcp"))
        .args(["--config", &config.display().to_string(), "--http"])
        .env_remove("KILN_CONFIG")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("without a token"), "{err}");
}

#[test]
fn the_example_config_parses_with_its_mcp_block() {
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/kiln.example.toml");
    let cfg = KilnConfig::load(&[example]).expect("config/kiln.example.toml loads");
    // The example is the generated reference: defaults, with examples as comments.
    let mcp = &cfg.mcp;
    assert_eq!(*mcp, kiln_config::McpConfig::default());
    assert_eq!(mcp.http_bind, "127.0.0.1:8765");
    assert_eq!(mcp.inline_image_max_bytes, 1024 * 1024);
    let text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/kiln.example.toml"),
    )
    .unwrap();
    for key in [
        "# token_file = \"/etc/kiln/mcp-token\"",
        "# Example: allowed_roots = [\"/srv/games/my-game/assets\"]",
        "# output_dir = \"/var/lib/kiln/mcp-outputs\"",
    ] {
        assert!(text.contains(key), "{key} missing from the example");
    }
}

#[test]
fn the_systemd_unit_verifies() {
    let unit = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../systemd/kiln-mcp.service"),
    )
    .unwrap();
    assert!(
        unit.contains("--http") && unit.contains("LoadCredential=kiln-mcp-token:"),
        "{unit}"
    );
    // Point ExecStart at the binary just built so systemd-analyze can check it.
    let scratch = Scratch::new();
    let path = scratch.path().join("kiln-mcp.service");
    std::fs::write(
        &path,
        unit.replace(
            "/usr/local/bin/kiln-mcp",
            &bin("kiln-mcp").display().to_string(),
        ),
    )
    .unwrap();
    let out = std::process::Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(&path)
        .output()
        .expect("systemd-analyze is installed (scripts/test-deps)");
    let text =
        String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout);
    // A missing `kiln` user is expected on a build machine.
    let complaints: Vec<&str> = text
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.contains("User=kiln") && !l.contains("user kiln"))
        .collect();
    assert!(complaints.is_empty(), "systemd-analyze verify: {text}");
}
