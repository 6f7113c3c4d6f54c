//! Settings for every Kiln daemon, loaded one way.
//!
//! One schema ([`KilnConfig`]) with a table per program: `[broker]`, `[worker]`,
//! `[client]` (the CLI and scripts). Each program loads the whole thing and uses
//! its table, so one file can describe a box and `kiln config check` can validate it.
//!
//! Layers, lowest first: built-in defaults, then each TOML file in the order given,
//! then `KILN_*` environment variables with `__` between levels
//! (`KILN_BROKER__FRONTEND=tcp://10.0.0.2:5555`). Only variables that start with a
//! table name are read, so unrelated `KILN_*` variables do not trip the
//! unknown-key check. Errors name the key and where its value came from.

mod comfyui;
mod curve;
mod dashboard;
mod devices;
mod diagnostics;
pub mod logging;
mod mcp;
mod placement;
mod reference;
mod secret;
mod wan2gp;

use std::path::{Path, PathBuf};

use figment::providers::{Env, Format, Serialized, Toml};
use figment::Figment;
use kiln_protocol::Limits;
use serde::{Deserialize, Serialize};

pub use comfyui::{ComfyUiConfig, ComfyUiMode};
pub use curve::BrokerCurve;
pub use dashboard::DashboardConfig;
pub use devices::{GpuConfig, SimConfig, SimModelProfile};
use diagnostics::{check_top_level, describe_lines, with_origin};
pub use diagnostics::{origin, origin_for_command_line};
pub use kiln_protocol::transport::TransportKind;
pub use mcp::McpConfig;
pub use placement::PlacementConfig;
pub use reference::{defaults_toml, entries as reference_entries, Entry as ReferenceEntry};
pub use secret::{resolve as resolve_secret, Secret};
pub use wan2gp::{
    parse_resolution, DefaultModels, VramRow, VramTable, Wan2gpConfig, WAN2GP_PROFILES,
};

/// Everything that can be wrong with a configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config file {0} does not exist")]
    MissingFile(PathBuf),
    /// One or more keys failed to parse; each line names the key and its source.
    #[error("invalid configuration:\n{}", .0.join("\n"))]
    Parse(Vec<String>),
    #[error("invalid configuration: `{key}`: {message}")]
    Invalid { key: String, message: String },
}

/// The whole configuration of one box.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct KilnConfig {
    pub broker: BrokerConfig,
    pub worker: WorkerConfig,
    pub client: ClientConfig,
    pub mcp: McpConfig,
    pub dashboard: DashboardConfig,
}

/// The broker daemon.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct BrokerConfig {
    /// `"libzmq"` (default: CURVE, bounded, the one to expose) or `"zeromq"` (loopback or fenced networks only); see docs/security.md.
    pub transport: TransportKind,
    /// ROUTER for clients. Loopback by default; any other address needs CURVE
    /// (`curve_secret_key`) or an explicit `allow_insecure_network = true`.
    pub frontend: String,
    /// ROUTER for workers.
    pub backend: String,
    /// PUB for events.
    pub events: String,
    /// Where the job store (jobs.redb and its log jobs.wal) and artifacts live.
    /// The systemd unit sets it to /var/lib/kiln.
    #[schemars(example = &"/var/lib/kiln")]
    pub state_dir: PathBuf,
    /// Keep jobs in a redb store and reply `accepted` only after commit. `false` keeps
    /// everything in memory (benchmarks, throwaway demos).
    pub durable: bool,
    /// Write job state records in the named encoding (version 1) of the releases
    /// before the positional one (version 2), which those releases can read. Set it
    /// before an upgrade when a rollback to such a release must stay possible; every
    /// release since reads both encodings.
    pub named_state_records: bool,
    /// Interval of the broker's heartbeats to workers, in milliseconds.
    pub heartbeat_ms: u64,
    /// Missed heartbeats after which a worker is declared dead and its job requeued.
    pub liveness: u32,
    /// Attempts a job gets when it does not say.
    pub default_max_attempts: u8,
    /// Queue timeout for jobs that do not set one (0 = wait forever).
    pub default_queue_timeout_s: u32,
    /// Run timeout for jobs that do not set one (0 = none).
    pub default_run_timeout_s: u32,
    /// How long a cancelled running job may take to confirm before it is recorded
    /// as cancelled anyway.
    pub cancel_grace_s: u32,
    /// How long an offline worker still counts when deciding whether a job could
    /// ever run (so a restarting worker does not make jobs unschedulable).
    pub fleet_memory_s: u64,
    /// Messages queued for one peer (libzmq's send high-water mark; clients get
    /// less when artifact chunks are large). Past it, and past 16 MiB or 10 s of
    /// further backlog, the peer is stalled: messages that find no room are
    /// dropped. A stalled worker counts as lost; a client keeps its session.
    pub peer_queue: usize,
    /// Connections each port holds at once (libzmq); past it a new connection is
    /// closed as soon as it is accepted, and that is logged at most every 10 s.
    /// At start the broker raises its open-file limit to the hard limit and lowers
    /// this if three ports' worth would not leave 512 descriptors for the store,
    /// artifacts and libzmq itself.
    pub max_connections: usize,
    /// Connections one IP address holds at once on each port (libzmq).
    pub max_connections_per_address: usize,
    /// Required from clients in `hello` when set (unset: no authentication, for
    /// loopback-only setups). Also read from `client_token_file` or the systemd
    /// credential `kiln-client-token`.
    pub client_token: Option<Secret>,
    /// A file holding `client_token` (surrounding whitespace is trimmed).
    #[schemars(example = &"/etc/kiln/credentials/client.token")]
    pub client_token_file: Option<PathBuf>,
    /// Required from workers in `register` when set. Also read from
    /// `worker_token_file` or the systemd credential `kiln-worker-token`.
    pub worker_token: Option<Secret>,
    /// A file holding `worker_token`.
    #[schemars(example = &"/etc/kiln/credentials/worker.token")]
    pub worker_token_file: Option<PathBuf>,
    /// Size limits of every variable-size field (see docs/protocol.md); the
    /// `welcome` reply tells clients the values in force.
    #[serde(deserialize_with = "Limits::deserialize_strict")]
    pub limits: Limits,
    /// How long finished jobs and their artifacts are kept.
    pub retention: RetentionConfig,
    /// How placement weighs model loads against waiting.
    pub placement: PlacementConfig,
    /// Networks (CIDR) besides loopback allowed to reach the broker's ports; the
    /// systemd unit is fenced to them (`kiln config fence` prints the drop-in).
    #[schemars(example = ["10.20.0.0/16"])]
    pub allowed_networks: Vec<String>,
    /// The broker's CURVE secret key (Z85 or a `kiln keys generate` certificate);
    /// also `curve_secret_key_file` or the systemd credential `kiln-broker-curve`.
    /// Setting it turns CURVE on for all three ports (libzmq only).
    pub curve_secret_key: Option<Secret>,
    /// A file holding `curve_secret_key` (a `kiln keys generate` `.key_secret`).
    pub curve_secret_key_file: Option<PathBuf>,
    /// Public keys (Z85, or paths of `.key` files) of clients allowed on the
    /// frontend and the events port.
    pub curve_client_keys: Vec<String>,
    /// Public keys of workers allowed on the backend and the events port.
    pub curve_worker_keys: Vec<String>,
    /// Lets the broker bind a non-loopback address without CURVE: only for a
    /// network fenced to trusted hosts (`allowed_networks`).
    pub allow_insecure_network: bool,
    /// `ip:port` of the HTTP listener serving Prometheus metrics at `/metrics`
    /// (text format 0.0.4; see docs/metrics.md). Loopback by default; `""` turns
    /// it off. Served by its own task, never by the broker's event loop.
    pub metrics_listen: String,
    /// Networks (CIDR) of the Prometheus servers that scrape a non-loopback
    /// `metrics_listen`; `kiln config fence` adds them to the unit's fence.
    #[schemars(example = ["10.30.0.5/32"])]
    pub metrics_allowed_networks: Vec<String>,
}

impl Default for BrokerConfig {
    fn default() -> Self {
        BrokerConfig {
            transport: TransportKind::default(),
            frontend: "tcp://127.0.0.1:5555".into(),
            backend: "tcp://127.0.0.1:5556".into(),
            events: "tcp://127.0.0.1:5557".into(),
            state_dir: default_state_dir(),
            durable: true,
            named_state_records: false,
            heartbeat_ms: kiln_protocol::HEARTBEAT_INTERVAL_MS,
            liveness: kiln_protocol::HEARTBEAT_LIVENESS,
            default_max_attempts: 3,
            default_queue_timeout_s: 0,
            default_run_timeout_s: 0,
            cancel_grace_s: 30,
            fleet_memory_s: 600,
            peer_queue: 8192,
            max_connections: 4096,
            max_connections_per_address: 256,
            client_token: None,
            client_token_file: None,
            worker_token: None,
            worker_token_file: None,
            limits: Limits::default(),
            retention: RetentionConfig::default(),
            placement: PlacementConfig::default(),
            allowed_networks: Vec::new(),
            curve_secret_key: None,
            curve_secret_key_file: None,
            curve_client_keys: Vec::new(),
            curve_worker_keys: Vec::new(),
            allow_insecure_network: false,
            metrics_listen: DEFAULT_BROKER_METRICS.into(),
            metrics_allowed_networks: Vec::new(),
        }
    }
}

/// How long finished jobs and their artifacts are kept.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct RetentionConfig {
    /// Finished jobs older than this are deleted with their artifacts (0 = forever).
    pub max_age_s: u64,
    /// When artifacts take more than this, the oldest finished jobs go first
    /// (0 = no limit).
    pub max_artifact_bytes: u64,
    /// How often retention runs.
    pub sweep_interval_s: u64,
}

impl Default for RetentionConfig {
    fn default() -> Self {
        RetentionConfig {
            max_age_s: 7 * 24 * 3600,
            max_artifact_bytes: 50 * 1024 * 1024 * 1024,
            sweep_interval_s: 60,
        }
    }
}

/// One worker daemon (one GPU).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct WorkerConfig {
    /// Stable name, unique in the fleet; `<hostname>-gpu<index>` when unset.
    #[schemars(example = &"box1-gpu0")]
    pub id: Option<String>,
    /// `"libzmq"` (default) or `"zeromq"`: the broker's.
    pub transport: TransportKind,
    /// The broker's backend ROUTER.
    pub broker: String,
    /// The broker's `worker_token`. Also read from `token_file` or the systemd
    /// credential `kiln-worker-token`.
    pub token: Option<Secret>,
    /// A file holding `token`.
    #[schemars(example = &"/etc/kiln/credentials/worker.token")]
    pub token_file: Option<PathBuf>,
    /// The broker's CURVE public key (Z85 or a `.key` path); turns CURVE on.
    pub broker_public_key: Option<String>,
    /// This worker's CURVE secret key; also `curve_secret_key_file` or the systemd
    /// credential `kiln-worker-curve`.
    pub curve_secret_key: Option<Secret>,
    /// A file holding `curve_secret_key` (a `kiln keys generate` `.key_secret`).
    pub curve_secret_key_file: Option<PathBuf>,
    /// Which GPU this worker drives.
    pub gpu: GpuConfig,
    /// Labels jobs can require (`labels` in the job spec).
    #[schemars(example = ["rtx4090", "fast"])]
    pub labels: Vec<String>,
    /// Backends this worker offers, in order of preference: `sim`, `comfyui`,
    /// `wan2gp`.
    #[schemars(example = ["comfyui", "wan2gp", "sim"])]
    pub backends: Vec<kiln_protocol::Backend>,
    /// Interval of the worker's heartbeats to the broker, in milliseconds.
    pub heartbeat_ms: u64,
    /// Missed broker heartbeats after which the worker reconnects.
    pub liveness: u32,
    /// Assignments the worker holds while it runs one, so its GPU starts the next
    /// job the moment the current one ends instead of waiting for a round trip to
    /// the broker (pipelined dispatch; 0 = one job at a time).
    pub pipeline_depth: u8,
    /// Scratch space for outputs before upload (default: a folder under the
    /// system's temporary directory).
    #[schemars(example = &"/var/lib/kiln/gpu0")]
    pub work_dir: Option<PathBuf>,
    /// The built-in sim backend.
    pub sim: SimConfig,
    /// The ComfyUI backend.
    pub comfyui: ComfyUiConfig,
    /// The Wan2GP backend (`[worker.wan2gp]`).
    pub wan2gp: Wan2gpConfig,
    /// `ip:port` of the HTTP listener serving Prometheus metrics at `/metrics`
    /// (see docs/metrics.md); `""` turns it off. Unset: `127.0.0.1:9480` plus the
    /// GPU index, so the workers of one box never collide.
    #[schemars(example = &"127.0.0.1:9480")]
    pub metrics_listen: Option<String>,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        WorkerConfig {
            id: None,
            transport: TransportKind::default(),
            broker: "tcp://127.0.0.1:5556".into(),
            token: None,
            token_file: None,
            broker_public_key: None,
            curve_secret_key: None,
            curve_secret_key_file: None,
            gpu: GpuConfig::default(),
            labels: Vec::new(),
            backends: vec![kiln_protocol::Backend::Sim],
            heartbeat_ms: kiln_protocol::HEARTBEAT_INTERVAL_MS,
            liveness: kiln_protocol::HEARTBEAT_LIVENESS,
            pipeline_depth: 1,
            work_dir: None,
            sim: SimConfig::default(),
            comfyui: ComfyUiConfig::default(),
            wan2gp: Wan2gpConfig::default(),
            metrics_listen: None,
        }
    }
}

/// The broker's default Prometheus endpoint.
pub const DEFAULT_BROKER_METRICS: &str = "127.0.0.1:9470";
/// The first worker's default Prometheus port; the worker of GPU n adds n.
pub const DEFAULT_WORKER_METRICS_PORT: u16 = 9480;

impl WorkerConfig {
    /// Where this worker serves its metrics: `None` when turned off.
    pub fn metrics_addr(&self) -> Result<Option<std::net::SocketAddr>, ConfigError> {
        match &self.metrics_listen {
            None => {
                let port = DEFAULT_WORKER_METRICS_PORT as u32 + self.gpu.index;
                match u16::try_from(port) {
                    Ok(port) => Ok(Some(std::net::SocketAddr::from(([127, 0, 0, 1], port)))),
                    Err(_) => invalid(
                        "worker.metrics_listen",
                        &format!("the default port {DEFAULT_WORKER_METRICS_PORT} + GPU index {} is over 65535: set it", self.gpu.index),
                    ),
                }
            }
            Some(s) => metrics_addr("worker.metrics_listen", s),
        }
    }
}

impl BrokerConfig {
    /// Where the broker serves its metrics: `None` when turned off.
    pub fn metrics_addr(&self) -> Result<Option<std::net::SocketAddr>, ConfigError> {
        metrics_addr("broker.metrics_listen", &self.metrics_listen)
    }
}

/// Parses a metrics listener address (`""` = off).
fn metrics_addr(key: &str, s: &str) -> Result<Option<std::net::SocketAddr>, ConfigError> {
    if s.is_empty() {
        return Ok(None);
    }
    s.parse().map(Some).or_else(|_| {
        invalid(
            key,
            &format!("{s:?} is not an address like 127.0.0.1:9470 or [::1]:9470 (\"\" turns metrics off)"),
        )
    })
}

/// The CLI, the MCP gateway and other clients of the broker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct ClientConfig {
    /// `"libzmq"` (default) or `"zeromq"`: the broker's.
    pub transport: TransportKind,
    /// The broker's client ROUTER (`broker.frontend`).
    pub broker: String,
    /// The broker's event PUB socket (`broker.events`).
    pub events: String,
    /// The broker's `client_token`. Also read from `token_file` or the systemd
    /// credential `kiln-client-token`.
    pub token: Option<Secret>,
    /// A file holding `token`.
    #[schemars(example = &"/etc/kiln/credentials/client.token")]
    pub token_file: Option<PathBuf>,
    /// The broker's CURVE public key (Z85 or a `.key` path); turns CURVE on.
    pub broker_public_key: Option<String>,
    /// This client's CURVE secret key; also `curve_secret_key_file` or the systemd
    /// credential `kiln-client-curve`.
    pub curve_secret_key: Option<Secret>,
    /// A file holding `curve_secret_key` (a `kiln keys generate` `.key_secret`).
    pub curve_secret_key_file: Option<PathBuf>,
    /// Name for fairness and `list` filters (the connection id when unset).
    /// Name the broker files this client's jobs under (fairness, `kiln jobs`).
    /// Unset: the CLI uses `<user>.<host>`, kiln-mcp `kiln-mcp`.
    #[schemars(example = &"studio-pipeline")]
    pub name: Option<String>,
    /// How long one request may wait for its reply, in seconds. A broker that is
    /// not running is reported at once, not after this.
    pub request_timeout_s: u64,
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            transport: TransportKind::default(),
            broker: "tcp://127.0.0.1:5555".into(),
            events: "tcp://127.0.0.1:5557".into(),
            token: None,
            token_file: None,
            broker_public_key: None,
            curve_secret_key: None,
            curve_secret_key_file: None,
            name: None,
            request_timeout_s: 15,
        }
    }
}

/// `$XDG_STATE_HOME/kiln`, else `~/.local/state/kiln`, else `/var/lib/kiln`.
pub fn default_state_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("XDG_STATE_HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir).join("kiln");
    }
    if let Some(home) = std::env::var_os("HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(home).join(".local/state/kiln");
    }
    PathBuf::from("/var/lib/kiln")
}

/// The tables a `KILN_<TABLE>__...` variable may address.
const TABLES: [&str; 5] = ["broker", "worker", "client", "mcp", "dashboard"];

impl KilnConfig {
    /// Loads defaults, then `files` in order (each must exist), then the environment,
    /// and validates every table.
    pub fn load(files: &[PathBuf]) -> Result<KilnConfig, ConfigError> {
        Self::load_tables(files, &Table::ALL)
    }

    /// Like [`KilnConfig::load`], but only `tables` are parsed and validated; the
    /// others keep their defaults, so a key only the broker reads never stops a
    /// client command. Unknown top-level tables are always reported.
    pub fn load_tables(files: &[PathBuf], tables: &[Table]) -> Result<KilnConfig, ConfigError> {
        let figment = Self::figment(files)?;
        check_top_level(&figment)?;
        let mut cfg = KilnConfig::default();
        let mut errors = Vec::new();
        fn take<T: serde::de::DeserializeOwned>(
            figment: &Figment,
            table: &str,
            slot: &mut T,
            errors: &mut Vec<String>,
        ) {
            match figment.extract_inner::<T>(table) {
                Ok(v) => *slot = v,
                Err(e) => errors.extend(describe_lines(e, table)),
            }
        }
        for table in tables {
            match table {
                Table::Broker => take(&figment, "broker", &mut cfg.broker, &mut errors),
                Table::Worker => take(&figment, "worker", &mut cfg.worker, &mut errors),
                Table::Client => take(&figment, "client", &mut cfg.client, &mut errors),
                Table::Mcp => take(&figment, "mcp", &mut cfg.mcp, &mut errors),
                Table::Dashboard => take(&figment, "dashboard", &mut cfg.dashboard, &mut errors),
            }
        }
        if !errors.is_empty() {
            return Err(ConfigError::Parse(errors));
        }
        cfg.validate_tables(tables)
            .map_err(|e| with_origin(e, &figment))?;
        Ok(cfg)
    }

    /// The layered figment, for callers that want to inspect where values came from.
    pub fn figment(files: &[PathBuf]) -> Result<Figment, ConfigError> {
        let mut figment = Figment::from(Serialized::defaults(KilnConfig::default()));
        for file in files {
            if !file.is_file() {
                return Err(ConfigError::MissingFile(file.clone()));
            }
            // file_exact: no search of parent directories for relative paths.
            figment = figment.merge(Toml::file_exact(file));
        }
        let env = Env::prefixed("KILN_")
            .filter(|key| {
                TABLES.iter().any(|t| {
                    key.as_str()
                        .to_ascii_lowercase()
                        .starts_with(&format!("{t}__"))
                })
            })
            .split("__");
        Ok(figment.merge(env))
    }

    /// Checks what serde cannot (endpoints, ranges, names) in every table.
    pub fn validated(self) -> Result<KilnConfig, ConfigError> {
        self.validate_tables(&Table::ALL)?;
        Ok(self)
    }

    /// Checks what serde cannot in `tables` only.
    pub fn validate_tables(&self, tables: &[Table]) -> Result<(), ConfigError> {
        for table in tables {
            match table {
                Table::Broker => self.validate_broker()?,
                Table::Worker => self.validate_worker()?,
                Table::Client => {
                    check_endpoint("client.broker", &self.client.broker)?;
                    check_endpoint("client.events", &self.client.events)?;
                }
                Table::Mcp => self.mcp.validate()?,
                Table::Dashboard => self.dashboard.validate()?,
            }
        }
        self.validate_transport(tables)
    }

    fn validate_broker(&self) -> Result<(), ConfigError> {
        let b = &self.broker;
        for (key, ep) in [
            ("broker.frontend", &b.frontend),
            ("broker.backend", &b.backend),
            ("broker.events", &b.events),
        ] {
            check_endpoint(key, ep)?;
        }
        if b.heartbeat_ms < 10 {
            return invalid("broker.heartbeat_ms", "must be at least 10");
        }
        if b.liveness == 0 {
            return invalid("broker.liveness", "must be at least 1");
        }
        if b.default_max_attempts == 0 {
            return invalid("broker.default_max_attempts", "must be at least 1");
        }
        for net in &b.allowed_networks {
            if !is_cidr(net) {
                return invalid(
                    "broker.allowed_networks",
                    &format!("{net:?} is not a network like 10.0.0.0/24 or fd00::/64"),
                );
            }
        }
        if b.peer_queue < 16 {
            return invalid("broker.peer_queue", "must be at least 16");
        }
        if b.max_connections == 0 || b.max_connections_per_address == 0 {
            return invalid(
                "broker.max_connections",
                "max_connections and max_connections_per_address must be at least 1",
            );
        }
        b.placement.validate()?;
        b.metrics_addr()?;
        for net in &b.metrics_allowed_networks {
            if !is_cidr(net) {
                return invalid(
                    "broker.metrics_allowed_networks",
                    &format!("{net:?} is not a network like 10.0.0.0/24 or fd00::/64"),
                );
            }
        }
        Ok(())
    }

    fn validate_worker(&self) -> Result<(), ConfigError> {
        check_endpoint("worker.broker", &self.worker.broker)?;
        if self.worker.liveness == 0 {
            return invalid("worker.liveness", "must be at least 1");
        }
        // The broker's rules with its default limits (a broker configured with
        // other limits says so when the worker registers).
        let limits = kiln_protocol::Limits::default();
        let named = match &self.worker.id {
            Some(id) => {
                kiln_protocol::ids::check_simple_name("worker.id", id, limits.max_label_len)
            }
            None => Ok(()),
        }
        .and_then(|()| {
            kiln_protocol::ids::check_labels(
                "worker.labels",
                &self.worker.labels,
                limits.max_labels,
                limits.max_label_len,
            )
        });
        if let Err(e) = named {
            let key = e.to_body().field.unwrap_or_else(|| "worker".into());
            let message = match e {
                kiln_protocol::ProtocolError::InvalidField { reason, .. } => reason,
                other => other.to_string(),
            };
            return Err(ConfigError::Invalid { key, message });
        }
        if self.worker.backends.is_empty() {
            return invalid("worker.backends", "list at least one backend");
        }
        self.worker.metrics_addr()?;
        if self.worker.sim.max_side < 8 {
            return invalid("worker.sim.max_side", "must be at least 8");
        }
        if !(self.worker.sim.speed.is_finite() && self.worker.sim.speed > 0.0) {
            return invalid("worker.sim.speed", "must be a number above 0");
        }
        self.worker.comfyui.validate()?;
        self.worker.wan2gp.validate()
    }

    /// The broker's client token, resolved from inline, file or credential.
    pub fn broker_client_token(&self) -> Result<Option<Secret>, ConfigError> {
        let b = &self.broker;
        resolve_secret(
            "broker.client_token",
            &b.client_token,
            &b.client_token_file,
            "kiln-client-token",
        )
    }

    pub fn broker_worker_token(&self) -> Result<Option<Secret>, ConfigError> {
        let b = &self.broker;
        resolve_secret(
            "broker.worker_token",
            &b.worker_token,
            &b.worker_token_file,
            "kiln-worker-token",
        )
    }

    pub fn worker_token(&self) -> Result<Option<Secret>, ConfigError> {
        let w = &self.worker;
        resolve_secret("worker.token", &w.token, &w.token_file, "kiln-worker-token")
    }

    pub fn client_token(&self) -> Result<Option<Secret>, ConfigError> {
        let c = &self.client;
        resolve_secret("client.token", &c.token, &c.token_file, "kiln-client-token")
    }
}

fn invalid<T>(key: &str, message: &str) -> Result<T, ConfigError> {
    Err(ConfigError::Invalid {
        key: key.to_string(),
        message: message.to_string(),
    })
}

/// Accepts `tcp://host:port` and `ipc://path`, the transports Kiln's sockets use
/// (the same parser the client's pre-flight probe uses).
pub fn check_endpoint(key: &str, ep: &str) -> Result<(), ConfigError> {
    match kiln_protocol::probe::Endpoint::parse(ep) {
        Ok(_) => Ok(()),
        Err(e) => invalid(key, &e.to_string()),
    }
}

/// The programs' tables; a program loads only those it uses
/// ([`KilnConfig::load_tables`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Table {
    Broker,
    Worker,
    Client,
    Mcp,
    Dashboard,
}

impl Table {
    pub const ALL: [Table; 5] = [
        Table::Broker,
        Table::Worker,
        Table::Client,
        Table::Mcp,
        Table::Dashboard,
    ];
}

/// `10.0.0.0/24`, `192.168.1.7`, `fd00::/64`: an address with an optional prefix
/// length that fits it.
fn is_cidr(s: &str) -> bool {
    let (addr, prefix) = s.split_once('/').map_or((s, None), |(a, p)| (a, Some(p)));
    match addr.parse::<std::net::IpAddr>() {
        Ok(ip) => {
            let max = if ip.is_ipv4() { 32 } else { 128 };
            prefix.is_none_or(|p| p.parse::<u8>().is_ok_and(|p| p <= max))
        }
        Err(_) => false,
    }
}

/// True when `path` names a loopback or local-socket endpoint.
pub fn is_loopback_endpoint(ep: &str) -> bool {
    if ep.starts_with("ipc://") {
        return true;
    }
    let host = ep
        .strip_prefix("tcp://")
        .and_then(|r| r.rsplit_once(':'))
        .map(|(h, _)| h.trim_start_matches('[').trim_end_matches(']'))
        .unwrap_or("");
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Loads the files named on a command line (`--config`), or the default files
/// when none was; returns the configuration and the files actually read.
pub fn load_for_command_line(files: &[PathBuf]) -> Result<(KilnConfig, Vec<PathBuf>), ConfigError> {
    load_tables_for_command_line(files, &Table::ALL)
}

/// [`load_for_command_line`] reading only `tables` ([`KilnConfig::load_tables`]).
pub fn load_tables_for_command_line(
    files: &[PathBuf],
    tables: &[Table],
) -> Result<(KilnConfig, Vec<PathBuf>), ConfigError> {
    let files = if files.is_empty() {
        default_files()
    } else {
        files.to_vec()
    };
    Ok((KilnConfig::load_tables(&files, tables)?, files))
}

impl KilnConfig {
    /// Broker client settings from `[client]`, with its token resolved.
    pub fn client_options(&self) -> Result<kiln_protocol::ClientOptions, ConfigError> {
        let c = &self.client;
        let mut opts = kiln_protocol::ClientOptions::new(c.broker.clone(), c.events.clone());
        opts.token = self.client_token()?.map(|s| s.expose().to_string());
        opts.name = c.name.clone();
        opts.request_timeout = std::time::Duration::from_secs(c.request_timeout_s.max(1));
        opts.transport = c.transport;
        opts.curve = self.client_curve()?;
        Ok(opts)
    }
}

/// Reads a config file list from `KILN_CONFIG` (colon-separated) when no file was
/// named on the command line; `/etc/kiln/kiln.toml` is used when it exists.
pub fn default_files() -> Vec<PathBuf> {
    if let Some(list) = std::env::var_os("KILN_CONFIG").filter(|v| !v.is_empty()) {
        return std::env::split_paths(&list).collect();
    }
    let system = Path::new("/etc/kiln/kiln.toml");
    if system.is_file() {
        vec![system.to_path_buf()]
    } else {
        Vec::new()
    }
}

#[cfg(test)]
// figment's Jail closures must return its (large) error type.
#[allow(clippy::result_large_err)]
mod tests;
