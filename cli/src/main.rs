//! `kiln`: the command line of the Kiln GPU job system.

mod commands;
mod progress;
mod table;

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use kiln_config::KilnConfig;
use kiln_protocol::Client;

#[derive(Parser)]
#[command(
    name = "kiln",
    version,
    about = "Run image and video generation on a fleet of GPUs"
)]
struct Cli {
    /// Config file(s), layered in order (default: $KILN_CONFIG or /etc/kiln/kiln.toml).
    #[arg(long = "config", short = 'c', global = true)]
    config: Vec<PathBuf>,
    /// The broker's client endpoint (overrides `client.broker`).
    #[arg(long, global = true, env = "KILN_BROKER")]
    broker: Option<String>,
    /// The broker's event endpoint (overrides `client.events`).
    #[arg(long, global = true, env = "KILN_EVENTS")]
    events: Option<String>,
    /// Client token (overrides `client.token`).
    #[arg(long, global = true, env = "KILN_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Start a broker and two sim workers here, run a few jobs with live progress,
    /// and write the PNGs to a folder. Needs no GPU.
    Demo(commands::demo::DemoArgs),
    /// Run a broker and one worker per GPU found (or configured) on this box.
    Up(commands::up::UpArgs),
    /// Submit a job.
    Submit(Box<commands::jobs::SubmitArgs>),
    /// Follow a job with a progress bar until it ends.
    Watch { job: String },
    /// Show a job's state and history.
    Status { job: String },
    /// Cancel a queued or running job.
    Cancel { job: String },
    /// List jobs, newest first.
    Jobs(commands::jobs::JobsArgs),
    /// Download a job's outputs (or one artifact, `j42.0`).
    Fetch(commands::jobs::FetchArgs),
    /// Workers and their GPUs.
    Workers,
    /// Models installed across the fleet.
    Models,
    /// The broker's health.
    Health,
    /// This machine's GPUs through NVML, with recommended settings.
    GpuInfo,
    /// Configuration tools.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// CURVE keys for the libzmq transport.
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
    },
}

#[derive(Subcommand)]
enum KeysCommand {
    /// Write a new CURVE key pair: NAME.key (public, give it to the peers that
    /// must accept this one) and NAME.key_secret (mode 0600), in the certificate
    /// format pyzmq's zmq.auth.load_certificate reads.
    Generate { name: std::path::PathBuf },
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Load and validate the configuration and print it (tokens redacted).
    Check,
    /// Print the systemd drop-in that opens the broker's ports to
    /// `broker.allowed_networks` (install it as
    /// /etc/systemd/system/kiln-broker.service.d/network.conf).
    Fence,
}

fn main() -> std::process::ExitCode {
    kiln_config::logging::init("warn");
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    match rt.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::from(1)
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<std::process::ExitCode> {
    let (cfg, files) = kiln_config::load_for_command_line(&cli.config)?;
    let ok = std::process::ExitCode::SUCCESS;
    match cli.command {
        Command::Demo(args) => commands::demo::run(cfg, args).await.map(|_| ok),
        Command::Up(args) => commands::up::run(cfg, args).await.map(|_| ok),
        Command::Config {
            command: ConfigCommand::Check,
        } => commands::fleet::config_check(&cfg, &files, cli.json),
        Command::Config {
            command: ConfigCommand::Fence,
        } => commands::fleet::config_fence(&cfg),
        Command::GpuInfo => commands::fleet::gpu_info(&cfg, cli.json),
        Command::Keys {
            command: KeysCommand::Generate { name },
        } => commands::keys::generate(&name, cli.json),
        command => {
            let client = client(&cfg, &cli.broker, &cli.events, &cli.token)?;
            let json = cli.json;
            match command {
                Command::Submit(args) => commands::jobs::submit(&client, *args, json).await,
                Command::Watch { job } => commands::jobs::watch(&client, &job, json).await,
                Command::Status { job } => commands::jobs::status(&client, &job, json).await,
                Command::Cancel { job } => commands::jobs::cancel(&client, &job, json).await,
                Command::Jobs(args) => commands::jobs::list(&client, args, json).await,
                Command::Fetch(args) => commands::jobs::fetch(&client, args, json).await,
                Command::Workers => commands::fleet::workers(&client, json).await,
                Command::Models => commands::fleet::models(&client, json).await,
                Command::Health => commands::fleet::health(&client, json).await,
                _ => unreachable!("handled above"),
            }
        }
    }
}

/// Prints a value as pretty JSON on stdout (`--json`).
pub(crate) fn print_json(v: &impl serde::Serialize) {
    println!("{}", serde_json::to_string_pretty(v).expect("serializable"));
}

/// A broker client from the config, with command-line overrides.
fn client(
    cfg: &KilnConfig,
    broker: &Option<String>,
    events: &Option<String>,
    token: &Option<String>,
) -> anyhow::Result<Client> {
    let mut opts = cfg.client_options()?;
    if let Some(b) = broker {
        opts.endpoint = b.clone();
    }
    if let Some(e) = events {
        opts.events_endpoint = e.clone();
    }
    if let Some(t) = token {
        opts.token = Some(t.clone());
    }
    Ok(Client::connect(opts))
}
