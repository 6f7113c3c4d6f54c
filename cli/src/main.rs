//! `kiln`: the command line of the Kiln GPU job system.

mod commands;
mod exit;
mod format;
mod progress;
mod table;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::parser::ValueSource;
use clap::{ArgMatches, Args, CommandFactory, FromArgMatches, Parser, Subcommand};
use kiln_config::{KilnConfig, Table};
use kiln_protocol::{Client, ClientError};

use exit::Outcome;

#[derive(Parser)]
#[command(
    name = "kiln",
    version,
    about = "Run image and video generation on a fleet of GPUs",
    after_help = exit::TABLE
)]
pub(crate) struct Cli {
    /// Config file(s), layered in order (default: $KILN_CONFIG, else
    /// /etc/kiln/kiln.toml when it exists).
    #[arg(
        long = "config",
        short = 'c',
        global = true,
        value_name = "FILE",
        help_heading = "Global options"
    )]
    config: Vec<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

/// Where the broker is; only on the commands that talk to it.
#[derive(Args, Clone)]
pub(crate) struct Conn {
    /// The broker's client endpoint, e.g. tcp://10.0.0.2:5555 (overrides `client.broker`).
    #[arg(
        long,
        env = "KILN_BROKER",
        value_name = "ENDPOINT",
        help_heading = "Broker connection"
    )]
    broker: Option<String>,
    /// The broker's event endpoint (overrides `client.events`).
    #[arg(
        long,
        env = "KILN_EVENTS",
        value_name = "ENDPOINT",
        help_heading = "Broker connection"
    )]
    events: Option<String>,
    /// Client token (overrides `client.token` and `client.token_file`).
    #[arg(
        long,
        env = "KILN_TOKEN",
        hide_env_values = true,
        help_heading = "Broker connection"
    )]
    token: Option<String>,
}

/// `--json`, on the commands that print results.
#[derive(Args, Clone, Copy)]
pub(crate) struct Output {
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

/// A client command's own arguments with the connection and output flags.
#[derive(Args)]
pub(crate) struct On<T: Args> {
    #[command(flatten)]
    pub args: T,
    #[command(flatten)]
    pub out: Output,
    #[command(flatten)]
    conn: Conn,
}

/// One job id.
#[derive(Args)]
pub(crate) struct JobArg {
    /// The job, e.g. j42.
    pub job: String,
}

/// No arguments of its own.
#[derive(Args)]
pub(crate) struct NoArgs {}

#[derive(Subcommand)]
enum Command {
    /// Start a broker and two sim workers here, run a few jobs with live progress,
    /// and write the PNGs to a folder. Needs no GPU.
    Demo(commands::demo::DemoArgs),
    /// Run a broker and one worker per GPU found (or configured) on this box.
    Up(commands::up::UpArgs),
    /// Submit a job.
    Submit(Box<On<commands::jobs::SubmitArgs>>),
    /// Follow a job with a progress bar until it ends.
    Watch(On<JobArg>),
    /// Show a job's state and history.
    Status(On<JobArg>),
    /// Cancel a queued or running job.
    Cancel(On<JobArg>),
    /// Run a job again: the broker copies its whole spec (input files, workflow
    /// and every option) into a new job under this client's name.
    Resubmit(On<JobArg>),
    /// List jobs, newest first.
    Jobs(On<commands::jobs::JobsArgs>),
    /// Download a job's outputs (or one artifact, `j42.0`).
    Fetch(On<commands::jobs::FetchArgs>),
    /// Workers and their GPUs.
    Workers(On<NoArgs>),
    /// Models installed across the fleet.
    Models(On<NoArgs>),
    /// The broker's health.
    Health(On<NoArgs>),
    /// This machine's GPUs through NVML, with recommended settings.
    GpuInfo(Output),
    /// Configuration tools.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// Print a shell completion script: `kiln completions bash > /etc/bash_completion.d/kiln`.
    Completions {
        /// bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
    /// Write man pages (kiln.1 and one per command) to a folder.
    Man {
        /// The folder, e.g. /usr/local/share/man/man1.
        #[arg(long, default_value = ".")]
        out: PathBuf,
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
    Generate {
        /// The path of the pair without its extension: writes NAME.key and
        /// NAME.key_secret (e.g. `/etc/kiln/broker`).
        name: std::path::PathBuf,
    },
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Load and validate the whole configuration and print it (tokens redacted).
    Check(Output),
    /// Print every key with its default and its documentation, as TOML
    /// (config/kiln.example.toml is this output).
    Defaults,
    /// Print the systemd drop-in that opens the broker's ports to
    /// `broker.allowed_networks` (install it as
    /// /etc/systemd/system/kiln-broker.service.d/network.conf).
    Fence,
}

/// The command line, with what is known only at run time: the backends'
/// parameter descriptions after `kiln submit --help`.
fn command() -> clap::Command {
    Cli::command().mut_subcommand("submit", |c| {
        c.after_long_help(commands::params_help::text())
    })
}

fn main() -> ExitCode {
    // `kiln jobs | head` ends quietly, as other Unix tools do, instead of panicking
    // on a closed stdout.
    // SAFETY: called first thing in main, before any thread exists.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    // The zeromq crate warns on every failed reconnect; the CLI reports the broker's
    // absence itself, once.
    kiln_config::logging::init("warn,zeromq=error");
    let matches = command().get_matches();
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    match rt.block_on(run(cli, &matches)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            exit::for_error(&e).into()
        }
    }
}

async fn run(cli: Cli, matches: &ArgMatches) -> anyhow::Result<ExitCode> {
    let files = &cli.config;
    let load = |tables: &[Table]| kiln_config::load_tables_for_command_line(files, tables);
    let ok = Ok(Outcome::Ok.into());
    match cli.command {
        Command::Completions { shell } => {
            let mut cmd = command();
            clap_complete::generate(shell, &mut cmd, "kiln", &mut std::io::stdout());
            ok
        }
        Command::Man { out } => commands::man::write(command(), &out),
        Command::Config {
            command: ConfigCommand::Defaults,
        } => {
            print!("{}", kiln_config::defaults_toml());
            ok
        }
        Command::Config {
            command: ConfigCommand::Check(o),
        } => {
            let (cfg, files) = load(&Table::ALL)?;
            commands::fleet::config_check(&cfg, &files, o.json)
        }
        Command::Config {
            command: ConfigCommand::Fence,
        } => commands::fleet::config_fence(&load(&[Table::Broker])?.0),
        Command::Demo(args) => {
            let (cfg, _) = load(&[Table::Broker, Table::Worker])?;
            commands::demo::run(cfg, args)
                .await
                .map(|_| Outcome::Ok.into())
        }
        Command::Up(args) => {
            let (cfg, _) = load(&[Table::Broker, Table::Worker])?;
            commands::up::run(cfg, args)
                .await
                .map(|_| Outcome::Ok.into())
        }
        Command::GpuInfo(o) => commands::fleet::gpu_info(&load(&[Table::Worker])?.0, o.json),
        Command::Keys {
            command: KeysCommand::Generate { name },
        } => commands::keys::generate(&name, false),
        command => {
            let sub = matches.subcommand().map(|(_, m)| m);
            let (cfg, _) = load(&[Table::Client])?;
            let conn = conn_of(&command);
            let origin = endpoint_origin(files, conn, sub);
            let client = client(&cfg, conn)?;
            let result = match command {
                Command::Submit(c) => {
                    let c = *c;
                    commands::jobs::submit(&client, c.args, c.out.json).await
                }
                Command::Watch(c) => commands::jobs::watch(&client, &c.args.job, c.out.json).await,
                Command::Status(c) => {
                    commands::jobs::status(&client, &c.args.job, c.out.json).await
                }
                Command::Cancel(c) => {
                    commands::jobs::cancel(&client, &c.args.job, c.out.json).await
                }
                Command::Resubmit(c) => {
                    commands::jobs::resubmit(&client, &c.args.job, c.out.json).await
                }
                Command::Jobs(c) => commands::jobs::list(&client, c.args, c.out.json).await,
                Command::Fetch(c) => commands::jobs::fetch(&client, c.args, c.out.json).await,
                Command::Workers(c) => commands::fleet::workers(&client, c.out.json).await,
                Command::Models(c) => commands::fleet::models(&client, c.out.json).await,
                Command::Health(c) => commands::fleet::health(&client, c.out.json).await,
                _ => unreachable!("handled above"),
            };
            result.or_else(|e| {
                let text = match e.chain().find_map(|c| c.downcast_ref::<ClientError>()) {
                    Some(c) => format::client_error(c, &origin),
                    None => format!("{e:#}"),
                };
                eprintln!("error: {text}");
                Ok(exit::for_error(&e).into())
            })
        }
    }
}

/// The connection flags of a client command.
fn conn_of(command: &Command) -> &Conn {
    match command {
        Command::Submit(c) => &c.conn,
        Command::Watch(c) | Command::Status(c) | Command::Cancel(c) | Command::Resubmit(c) => {
            &c.conn
        }
        Command::Jobs(c) => &c.conn,
        Command::Fetch(c) => &c.conn,
        Command::Workers(c) | Command::Models(c) | Command::Health(c) => &c.conn,
        _ => unreachable!("only client commands have a connection"),
    }
}

/// Where the broker endpoint in use came from, for error messages.
fn endpoint_origin(files: &[PathBuf], conn: &Conn, sub: Option<&ArgMatches>) -> String {
    if conn.broker.is_some() {
        return match sub.and_then(|m| m.value_source("broker")) {
            Some(ValueSource::EnvVariable) => "environment variable KILN_BROKER".into(),
            _ => "--broker".into(),
        };
    }
    kiln_config::origin_for_command_line(files, "client.broker")
}

/// Prints a value as pretty JSON on stdout (`--json`).
pub(crate) fn print_json(v: &impl serde::Serialize) {
    println!("{}", serde_json::to_string_pretty(v).expect("serializable"));
}

/// A broker client from the config, with command-line overrides (checked at once:
/// a malformed endpoint is a configuration error, not a timeout).
fn client(cfg: &KilnConfig, conn: &Conn) -> anyhow::Result<Client> {
    let mut opts = cfg.client_options()?;
    if let Some(b) = &conn.broker {
        kiln_config::check_endpoint("--broker", b)?;
        opts.endpoint = b.clone();
    }
    if let Some(e) = &conn.events {
        kiln_config::check_endpoint("--events", e)?;
        opts.events_endpoint = e.clone();
    }
    if let Some(t) = &conn.token {
        opts.token = Some(t.clone());
    }
    // Jobs are filed under a name people recognise, not the connection id.
    opts.name.get_or_insert_with(user_at_host);
    Ok(Client::connect(opts))
}

/// `<user>.<host>`, the default client name of the CLI (the broker accepts
/// `[A-Za-z0-9._-]` in names, so other characters become `_`).
fn user_at_host() -> String {
    let user = ["USER", "LOGNAME"]
        .iter()
        .find_map(|v| std::env::var(v).ok().filter(|u| !u.is_empty()))
        .unwrap_or_else(|| "user".into());
    let name: String = format!("{user}.{}", kiln_worker::runner::hostname())
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '_'
            }
        })
        .take(64)
        .collect();
    name
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every flag of every command says what it does, and the commands that do
    /// not talk to the broker do not offer its flags.
    #[test]
    fn every_argument_is_documented_and_in_its_place() {
        let cmd = command();
        cmd.clone().debug_assert();
        fn walk(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
            for arg in cmd.get_arguments() {
                let id = arg.get_id().as_str();
                if arg.get_help().is_none() && !matches!(id, "help" | "version") {
                    missing.push(format!("{path} --{id}"));
                }
            }
            for sub in cmd.get_subcommands() {
                walk(sub, &format!("{path} {}", sub.get_name()), missing);
            }
        }
        let mut missing = Vec::new();
        walk(&cmd, "kiln", &mut missing);
        assert!(missing.is_empty(), "undocumented: {missing:?}");
        for name in ["up", "demo", "gpu-info", "config", "completions", "man"] {
            let sub = cmd.find_subcommand(name).unwrap();
            for flag in ["broker", "events", "token"] {
                assert!(
                    sub.get_arguments().all(|a| a.get_id().as_str() != flag),
                    "`kiln {name}` lists --{flag}"
                );
            }
        }
        assert!(cmd
            .get_after_help()
            .is_some_and(|h| h.to_string().contains("130")));
        assert!(cmd
            .find_subcommand("submit")
            .and_then(|s| s.get_after_long_help())
            .is_some_and(|h| h.to_string().contains("step_ms")));
    }
}
