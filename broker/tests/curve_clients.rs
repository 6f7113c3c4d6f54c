//! Every client program speaks CURVE to a broker that requires it: the `kiln`
//! CLI, `kiln-mcp` (over stdio, as Claude Desktop starts it) and the pyzmq
//! example, each with the keys an operator gives it in config or environment
//! (docs/security.md). The Rust client and the workers are covered in
//! `transport.rs`.

use std::process::Stdio;
use std::time::Duration;

use kiln_protocol::transport::TransportKind;
use kiln_testkit::{bin, BrokerOpts, Scratch, TestKeys, WorkerOpts};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_kiln_mcp_and_the_pyzmq_example_work_over_curve() {
    let keys = TestKeys::generate();
    let s = Scratch::new();
    let broker = s
        .broker(BrokerOpts {
            transport: TransportKind::Libzmq,
            durable: false,
            curve: Some(keys.clone()),
            ..BrokerOpts::default()
        })
        .await;
    let _w1 = s.worker(&broker, WorkerOpts::sim("w1")).await;
    let _w2 = s.worker(&broker, WorkerOpts::sim("w2")).await;
    let config = s.path().join("client.toml");
    std::fs::write(
        &config,
        format!(
            "[client]\ntransport = \"libzmq\"\nbroker = \"{}\"\nevents = \"{}\"\n\
             broker_public_key = \"{}\"\ncurve_secret_key = \"{}\"\n\n\
             [mcp]\nimage_backend = \"sim\"\nvideo_backend = \"sim\"\n",
            broker.frontend, broker.events, keys.broker.public, keys.client.secret
        ),
    )
    .unwrap();

    // The CLI.
    let out = tokio::process::Command::new(bin("kiln"))
        .arg("--config")
        .arg(&config)
        .arg("workers")
        .env_remove("KILN_CONFIG")
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "kiln workers over CURVE: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("w1") && stdout.contains("w2"), "{stdout}");

    // kiln-mcp over stdio: initialize, then the list_workers tool.
    let mut mcp = tokio::process::Command::new(bin("kiln-mcp"))
        .arg("--config")
        .arg(&config)
        .env_remove("KILN_CONFIG")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut stdin = mcp.stdin.take().unwrap();
    let mut lines = BufReader::new(mcp.stdout.take().unwrap()).lines();
    for msg in [
        json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
            "protocolVersion": "2025-06-18", "capabilities": {},
            "clientInfo": {"name": "curve-test", "version": "1"}}}),
        json!({"jsonrpc": "2.0", "method": "notifications/initialized"}),
        json!({"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {
            "name": "list_workers", "arguments": {}}}),
    ] {
        stdin
            .write_all(format!("{msg}\n").as_bytes())
            .await
            .unwrap();
    }
    let answer = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(line) = lines.next_line().await.unwrap() {
            let v: Value = serde_json::from_str(&line).unwrap();
            if v["id"] == 2 {
                return v;
            }
        }
        panic!("kiln-mcp closed stdout before answering");
    })
    .await
    .expect("kiln-mcp answers list_workers");
    assert_ne!(answer["result"]["isError"], true, "{answer}");
    let text = answer["result"].to_string();
    assert!(text.contains("w1") && text.contains("w2"), "{answer}");
    drop(stdin);

    // The pyzmq example, with the broker's public key and its own key file.
    let base = s.path().join("keys/alice");
    std::fs::create_dir_all(base.parent().unwrap()).unwrap();
    keys.client.write_certificates(&base).unwrap();
    let out_dir = s.path().join("py-out");
    let output = broker
        .python_client(
            &std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/submit.py"),
            None,
        )
        .env("KILN_BROKER_KEY", &keys.broker.public)
        .env("KILN_CURVE_KEY", base.with_extension("key_secret"))
        .args(["--prompt", "over curve", "--steps", "2", "--out"])
        .arg(&out_dir)
        .output()
        .await
        .expect("python runs (scripts/test installs pyzmq and msgpack into .venv)");
    assert!(
        output.status.success(),
        "examples/submit.py over CURVE:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(std::fs::read_dir(&out_dir).unwrap().next().is_some());
}
