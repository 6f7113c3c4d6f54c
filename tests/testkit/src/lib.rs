//! Starts the real Kiln binaries for integration tests.
//!
//! Every process gets its own free TCP ports, a throwaway state directory and a
//! config file written here, and logs to a file that is printed when a test fails.
//! Readiness is awaited on the broker's own answers, never on fixed sleeps.
//!
//! The binaries must be built first (`cargo build --workspace --bins`, which the
//! test script does); [`bin`] finds them next to the test executable.

use std::fmt::Write as _;
use std::future::Future;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub mod prometheus;
pub mod zmtp;

use kiln_protocol::transport::{
    ConnectOptions, CurveClient, CurveKeyPair, Dealer, Incoming, TransportKind,
};
use kiln_protocol::{Client, ClientOptions};

/// The path of a workspace binary (`kiln-broker`, `kiln-worker`, `kiln`, `kiln-mcp`).
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test> → target/<profile>/<name>
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target directory");
    let path = dir.join(name);
    assert!(
        path.is_file(),
        "{} is missing: build the binaries first (cargo build --workspace --bins)",
        path.display()
    );
    path
}

/// The Python tests run: `KILN_TEST_PYTHON` (the venv `scripts/test` prepares),
/// else `python3` from the path.
pub fn python() -> PathBuf {
    std::env::var_os("KILN_TEST_PYTHON").map_or_else(|| PathBuf::from("python3"), PathBuf::from)
}

/// A test fixture folder, `tests/fixtures/<name>` in the workspace.
pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fixtures")
        .join(name)
}

/// A TCP port nobody listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// Waits until `check` returns `Some`, re-checking every 20 ms, or panics with
/// `what` after `timeout`.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A child process whose stderr goes to a log file; killed when dropped.
pub struct Proc {
    pub name: String,
    child: Option<Child>,
    log: PathBuf,
    cmd: Vec<String>,
    env: Vec<(String, String)>,
}

impl Proc {
    pub fn spawn(
        name: &str,
        program: &Path,
        args: &[String],
        env: &[(String, String)],
        log: PathBuf,
    ) -> Proc {
        let mut p = Proc {
            name: name.to_string(),
            child: None,
            log,
            cmd: std::iter::once(program.display().to_string())
                .chain(args.iter().cloned())
                .collect(),
            env: env.to_vec(),
        };
        p.start();
        p
    }

    fn start(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("log file");
        let mut cmd = Command::new(&self.cmd[0]);
        cmd.args(&self.cmd[1..])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log fd"))
            .stderr(log)
            .env("KILN_LOG", "info,zeromq=warn,kiln_broker=debug")
            .env_remove("KILN_CONFIG");
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        self.child = Some(
            cmd.spawn()
                .unwrap_or_else(|e| panic!("spawning {}: {e}", self.cmd[0])),
        );
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().expect("running").id() as i32
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    /// `kill -9`.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, then wait for the exit (SIGKILL after 10 s).
    pub fn stop(&mut self) -> Option<std::process::ExitStatus> {
        let mut c = self.child.take()?;
        unsafe {
            libc::kill(c.id() as i32, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(Some(status)) = c.try_wait() {
                return Some(status);
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                return c.wait().ok();
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Freezes the process (SIGSTOP), as if cut off from the network.
    pub fn pause(&self) {
        unsafe {
            libc::kill(self.pid(), libc::SIGSTOP);
        }
    }

    pub fn resume(&self) {
        unsafe {
            libc::kill(self.pid(), libc::SIGCONT);
        }
    }

    /// Starts the same command again (after `kill9` or `stop`).
    pub fn restart(&mut self) {
        self.kill9();
        self.start();
    }

    /// Waits for the process to exit by itself.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        let c = self.child.as_mut()?;
        loop {
            if let Ok(Some(status)) = c.try_wait() {
                self.child = None;
                return Some(status);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "----- log of {} ({}) -----\n{}",
                self.name,
                self.log.display(),
                self.log()
            );
        }
        self.kill9();
    }
}

/// Settings of a test broker.
#[derive(Clone)]
pub struct BrokerOpts {
    pub durable: bool,
    pub client_token: Option<String>,
    pub worker_token: Option<String>,
    pub heartbeat_ms: u64,
    /// Extra lines appended to the `[broker]` table.
    pub extra: String,
    pub env: Vec<(String, String)>,
    /// The job store's directory; a fresh one in the scratch space by default.
    pub state_dir: Option<PathBuf>,
    /// The broker's transport, which its workers and clients follow.
    /// `KILN_TEST_TRANSPORT` (`zeromq`/`libzmq`) picks it when a test does not.
    pub transport: TransportKind,
    /// CURVE on every port, with these keys (libzmq only).
    pub curve: Option<TestKeys>,
}

/// CURVE key pairs for a test fleet: the broker's, an allowed client's and an
/// allowed worker's.
#[derive(Debug, Clone)]
pub struct TestKeys {
    pub broker: CurveKeyPair,
    pub client: CurveKeyPair,
    pub worker: CurveKeyPair,
}

impl TestKeys {
    pub fn generate() -> TestKeys {
        let pair = || CurveKeyPair::generate().expect("this libzmq has CURVE");
        TestKeys {
            broker: pair(),
            client: pair(),
            worker: pair(),
        }
    }

    /// Client-side CURVE settings with `keys` as the client's own pair.
    pub fn client_side(&self, keys: &CurveKeyPair) -> CurveClient {
        CurveClient {
            server_public: self.broker.public.clone(),
            keys: keys.clone(),
        }
    }
}

/// The transport tests use unless they say: `KILN_TEST_TRANSPORT`, else the default.
pub fn test_transport() -> TransportKind {
    match std::env::var("KILN_TEST_TRANSPORT").as_deref() {
        Ok("zeromq") => TransportKind::Zeromq,
        Ok("libzmq") => TransportKind::Libzmq,
        _ => TransportKind::default(),
    }
}

impl Default for BrokerOpts {
    fn default() -> Self {
        BrokerOpts {
            transport: test_transport(),
            curve: None,
            durable: true,
            client_token: None,
            worker_token: None,
            heartbeat_ms: 1000,
            extra: String::new(),
            env: Vec::new(),
            state_dir: None,
        }
    }
}

/// A `kiln-broker` process on free ports.
pub struct Broker {
    pub proc: Proc,
    pub frontend: String,
    pub backend: String,
    pub events: String,
    /// `http://127.0.0.1:<port>/metrics`, the broker's Prometheus endpoint.
    pub metrics_url: String,
    pub dir: PathBuf,
    pub config: PathBuf,
    pub opts: BrokerOpts,
}

/// A test's scratch space: config files, state directories and logs.
pub struct Scratch {
    pub dir: tempfile::TempDir,
}

impl Scratch {
    pub fn new() -> Scratch {
        Scratch {
            dir: tempfile::Builder::new()
                .prefix("kiln-test-")
                .tempdir()
                .expect("temp dir"),
        }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Starts a broker and waits until it answers.
    pub async fn broker(&self, opts: BrokerOpts) -> Broker {
        let (f, b, e, m) = (free_port(), free_port(), free_port(), free_port());
        let dir = self.path().join(format!("broker-{f}"));
        std::fs::create_dir_all(&dir).expect("broker dir");
        let mut toml = String::from("[broker]\n");
        let _ = writeln!(toml, "frontend = \"tcp://127.0.0.1:{f}\"");
        let _ = writeln!(toml, "backend = \"tcp://127.0.0.1:{b}\"");
        let _ = writeln!(toml, "events = \"tcp://127.0.0.1:{e}\"");
        let _ = writeln!(toml, "metrics_listen = \"127.0.0.1:{m}\"");
        let state_dir = opts.state_dir.clone().unwrap_or_else(|| dir.join("state"));
        let _ = writeln!(toml, "state_dir = \"{}\"", state_dir.display());
        let _ = writeln!(toml, "durable = {}", opts.durable);
        let _ = writeln!(toml, "heartbeat_ms = {}", opts.heartbeat_ms);
        if let Some(t) = &opts.client_token {
            let _ = writeln!(toml, "client_token = \"{t}\"");
        }
        if let Some(t) = &opts.worker_token {
            let _ = writeln!(toml, "worker_token = \"{t}\"");
        }
        let _ = writeln!(toml, "transport = \"{}\"", opts.transport);
        if let Some(k) = &opts.curve {
            let _ = writeln!(toml, "curve_secret_key = \"{}\"", k.broker.secret);
            let _ = writeln!(toml, "curve_client_keys = [\"{}\"]", k.client.public);
            let _ = writeln!(toml, "curve_worker_keys = [\"{}\"]", k.worker.public);
        }
        toml.push_str(&opts.extra);
        toml.push('\n');
        let config = dir.join("broker.toml");
        std::fs::write(&config, toml).expect("broker config");
        let proc = Proc::spawn(
            "kiln-broker",
            &bin("kiln-broker"),
            &["--config".into(), config.display().to_string()],
            &opts.env,
            dir.join("broker.log"),
        );
        let broker = Broker {
            proc,
            frontend: format!("tcp://127.0.0.1:{f}"),
            backend: format!("tcp://127.0.0.1:{b}"),
            events: format!("tcp://127.0.0.1:{e}"),
            metrics_url: format!("http://127.0.0.1:{m}/metrics"),
            dir,
            config,
            opts,
        };
        broker.wait_ready().await;
        broker
    }

    /// Starts a sim worker against `broker` and waits until the broker lists it.
    pub async fn worker(&self, broker: &Broker, opts: WorkerOpts) -> Proc {
        let p = self.worker_unchecked(broker, &opts);
        let client = broker.client();
        let id = opts.id.clone();
        eventually(
            &format!("worker {id} to register"),
            Duration::from_secs(20),
            || {
                let (client, id) = (client.clone(), id.clone());
                async move {
                    let workers = client.workers().await.ok()?;
                    workers
                        .iter()
                        .any(|w| {
                            w.worker_id == id
                                && w.state != kiln_protocol::worker::WorkerState::Offline
                        })
                        .then_some(())
                }
            },
        )
        .await;
        p
    }

    /// Starts a worker without waiting for it to register.
    pub fn worker_unchecked(&self, broker: &Broker, opts: &WorkerOpts) -> Proc {
        let dir = self.path().join(format!("worker-{}", opts.id));
        std::fs::create_dir_all(&dir).expect("worker dir");
        let mut toml = String::from("[worker]\n");
        let _ = writeln!(toml, "id = \"{}\"", opts.id);
        let _ = writeln!(toml, "broker = \"{}\"", broker.backend);
        let _ = writeln!(toml, "heartbeat_ms = {}", broker.opts.heartbeat_ms);
        let _ = writeln!(toml, "work_dir = \"{}\"", dir.join("work").display());
        // A port of its own (the default, 9480 + GPU index, would collide between
        // test workers); a test that scrapes it sets KILN_WORKER__METRICS_LISTEN.
        let _ = writeln!(toml, "metrics_listen = \"127.0.0.1:{}\"", free_port());
        let backends: Vec<String> = opts.backends.iter().map(|b| format!("\"{b}\"")).collect();
        let _ = writeln!(toml, "backends = [{}]", backends.join(", "));
        let labels: Vec<String> = opts.labels.iter().map(|b| format!("\"{b}\"")).collect();
        let _ = writeln!(toml, "labels = [{}]", labels.join(", "));
        if let Some(t) = &opts.token {
            let _ = writeln!(toml, "token = \"{t}\"");
        }
        let _ = writeln!(toml, "transport = \"{}\"", broker.opts.transport);
        if let Some(k) = &broker.opts.curve {
            let _ = writeln!(toml, "broker_public_key = \"{}\"", k.broker.public);
            let _ = writeln!(toml, "curve_secret_key = \"{}\"", k.worker.secret);
        }
        let _ = writeln!(
            toml,
            "[worker.gpu]\nnvml = false\nname = \"test GPU\"\ntotal_vram_mb = {}",
            opts.vram_mb
        );
        let _ = writeln!(
            toml,
            "[worker.sim]\nstep_ms = {}\nallow_faults = {}",
            opts.step_ms, opts.allow_faults
        );
        toml.push_str(&opts.extra);
        toml.push('\n');
        let config = dir.join("worker.toml");
        std::fs::write(&config, toml).expect("worker config");
        Proc::spawn(
            &format!("kiln-worker {}", opts.id),
            &bin("kiln-worker"),
            &["--config".into(), config.display().to_string()],
            &opts.env,
            dir.join(format!("worker-{}.log", free_port())),
        )
    }
}

impl Default for Scratch {
    fn default() -> Self {
        Self::new()
    }
}

/// Settings of a test worker.
#[derive(Clone)]
pub struct WorkerOpts {
    pub id: String,
    pub vram_mb: u64,
    pub step_ms: u64,
    pub allow_faults: bool,
    pub labels: Vec<String>,
    pub backends: Vec<String>,
    pub token: Option<String>,
    /// Extra TOML appended at the end (tables of other backends).
    pub extra: String,
    pub env: Vec<(String, String)>,
}

impl WorkerOpts {
    pub fn sim(id: &str) -> WorkerOpts {
        WorkerOpts {
            id: id.into(),
            vram_mb: 24_576,
            step_ms: 10,
            allow_faults: true,
            labels: Vec::new(),
            backends: vec!["sim".into()],
            token: None,
            extra: String::new(),
            env: Vec::new(),
        }
    }
}

impl Broker {
    pub fn client_options(&self) -> ClientOptions {
        let mut o = ClientOptions::new(self.frontend.clone(), self.events.clone());
        o.token = self.opts.client_token.clone();
        o.request_timeout = Duration::from_secs(20);
        o.resync_interval = Duration::from_millis(500);
        o.transport = self.opts.transport;
        o.curve = self.opts.curve.as_ref().map(|k| k.client_side(&k.client));
        o
    }

    /// A bare DEALER on the frontend, as a hand-written client would open, with
    /// the allowed client key when CURVE is on.
    pub async fn raw_dealer(&self) -> Dealer {
        let o = self.client_options();
        Dealer::connect(
            o.transport,
            &self.frontend,
            ConnectOptions {
                curve: o.curve,
                ..ConnectOptions::default()
            },
        )
        .await
        .expect("connect a DEALER")
    }

    /// A client of this broker (with its token).
    pub fn client(&self) -> Client {
        Client::connect(self.client_options())
    }

    /// Waits until the broker answers a ping.
    pub async fn wait_ready(&self) {
        let client = self.client();
        eventually("the broker to answer", Duration::from_secs(20), || {
            let client = client.clone();
            async move { client.ping().await.ok() }
        })
        .await;
    }

    /// `kill -9` the broker and start it again on the same ports and state.
    pub async fn crash_and_restart(&mut self) {
        self.proc.kill9();
        self.proc.restart();
        self.wait_ready().await;
    }

    pub fn log(&self) -> String {
        self.proc.log()
    }

    /// A Python client of this broker (`KILN_TEST_PYTHON`, with pyzmq and
    /// msgpack) running `script`, pointed at it the way `examples/submit.py`
    /// reads it: `KILN_BROKER`, `KILN_EVENTS` and, when given, `KILN_TOKEN`.
    pub fn python_client(&self, script: &Path, token: Option<&str>) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::new(python());
        cmd.arg(script)
            .env("KILN_BROKER", &self.frontend)
            .env("KILN_EVENTS", &self.events)
            .env_remove("KILN_TOKEN")
            .envs(token.map(|t| ("KILN_TOKEN", t)));
        cmd
    }

    /// `examples/submit.py`, the documented pyzmq client, against this broker
    /// with `token`; add its arguments.
    pub fn submit_example(&self, token: &str) -> tokio::process::Command {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/submit.py");
        self.python_client(&script, Some(token))
    }
}

/// The next message on a raw DEALER within `timeout`; `None` if nothing came.
pub async fn recv_within(d: &mut Dealer, timeout: Duration) -> Option<Vec<bytes::Bytes>> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        match tokio::time::timeout_at(deadline, d.next()).await {
            Err(_) => return None,
            Ok(Incoming::Frames(f)) => return Some(f),
            Ok(Incoming::Error(_)) => continue,
            Ok(Incoming::Lost) => return None,
        }
    }
}
