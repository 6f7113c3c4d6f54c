//! The fleet every kiln-mcp end-to-end test runs against: a real broker, two sim
//! workers, and a gateway config with a token, allowed roots and an output folder.

#![allow(dead_code)] // each test file uses its own part

use std::path::PathBuf;
use std::time::Duration;

use kiln_testkit::{bin, eventually, free_port, Broker, BrokerOpts, Proc, Scratch, WorkerOpts};

pub const CLIENT_TOKEN: &str = "broker-client-token";
pub const MCP_TOKEN: &str = "mcp-http-token";
/// A small inline budget so a 512x512 render has to be shrunk.
pub const INLINE_BUDGET: u64 = 65_536;
/// The broker's `max_labels` in the test fleet (the default is 16).
pub const MAX_LABELS: u64 = 4;

pub struct Fleet {
    pub scratch: Scratch,
    pub broker: Broker,
    _workers: Vec<Proc>,
    pub config: PathBuf,
    pub assets: PathBuf,
    pub outputs: PathBuf,
}

pub async fn fleet() -> Fleet {
    let scratch = Scratch::new();
    let broker = scratch
        .broker(BrokerOpts {
            durable: false,
            client_token: Some(CLIENT_TOKEN.into()),
            // A limit other than the default, which the gateway's schemas must
            // take from the broker's `welcome`.
            extra: format!("limits.max_labels = {MAX_LABELS}\n"),
            ..BrokerOpts::default()
        })
        .await;
    let mut workers = Vec::new();
    for id in ["w1", "w2"] {
        workers.push(scratch.worker(&broker, WorkerOpts::sim(id)).await);
    }
    let assets = scratch.path().join("game/assets");
    let outputs = scratch.path().join("mcp-outputs");
    let config = scratch.path().join("kiln-mcp.toml");
    let toml = format!(
        "[client]\nbroker = \"{}\"\nevents = \"{}\"\ntoken = \"{CLIENT_TOKEN}\"\n\n\
         [mcp]\nimage_backend = \"sim\"\nvideo_backend = \"sim\"\ntoken = \"{MCP_TOKEN}\"\n\
         allowed_roots = [\"{}\"]\noutput_dir = \"{}\"\ninline_image_max_bytes = {INLINE_BUDGET}\nwait_timeout_s = 120\n",
        broker.frontend,
        broker.events,
        assets.display(),
        outputs.display()
    );
    std::fs::write(&config, toml).expect("gateway config");
    Fleet {
        scratch,
        broker,
        _workers: workers,
        config,
        assets,
        outputs,
    }
}

/// Starts `kiln-mcp --http` with `config` on a free loopback port and waits until
/// it listens; returns the process and the endpoint URL.
pub async fn http_gateway(fleet: &Fleet, config: &std::path::Path, log: &str) -> (Proc, String) {
    let port = free_port();
    let gateway = Proc::spawn(
        "kiln-mcp --http",
        &bin("kiln-mcp"),
        &[
            "--config".into(),
            config.display().to_string(),
            "--http".into(),
            format!("127.0.0.1:{port}"),
        ],
        &[],
        fleet.scratch.path().join(log),
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
    (gateway, format!("http://127.0.0.1:{port}/mcp"))
}
