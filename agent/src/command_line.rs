//! The command line of `gstacks-agent`: `run` and the host-local
//! `service lock status | clear [--force]` verbs.

use std::path::PathBuf;
use std::process::ExitCode;

use tokio_util::sync::CancellationToken;

use crate::config::{self, AgentConfig, ConfigSource};
use crate::error::AgentError;
use crate::lock;

#[derive(clap::Parser, Debug)]
#[command(
    name = "gstacks-agent",
    about = "The GlobalStacks host agent",
    version,
    long_version = proto::build_info::LONG_VERSION
)]
pub struct Args {
    /// Config file of KEY=VALUE lines with the same keys as the environment
    /// (GLOBALSTACKS_CONTROL_URL, ...). The environment wins over the file.
    #[arg(long, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(clap::Subcommand, Debug)]
pub enum Command {
    /// Enroll (first start), then keep the control stream to the control
    /// plane. Configured by GLOBALSTACKS_CONTROL_URL,
    /// GLOBALSTACKS_PROVISIONING_TOKEN, GLOBALSTACKS_STATE_DIR, AGENT_TRAITS,
    /// AGENT_TAGS, GLOBALSTACKS_CONTROL_CA_FILE or GLOBALSTACKS_CONTROL_FINGERPRINT,
    /// GLOBALSTACKS_AGENT_HEARTBEAT_MS and
    /// GLOBALSTACKS_AGENT_DISABLE_HOST_TERMINAL. Exits 78 when revoked.
    Run,
    /// Host-local service operations.
    Service {
        #[command(subcommand)]
        command: ServiceCommand,
    },
}

#[derive(clap::Subcommand, Debug)]
pub enum ServiceCommand {
    /// The service lock that keeps a second agent from running on this host.
    Lock {
        #[command(subcommand)]
        command: LockCommand,
    },
}

#[derive(clap::Subcommand, Debug)]
pub enum LockCommand {
    /// Who holds the lock and whether that process is alive.
    Status,
    /// Remove a stale lock (refuses without --force, never breaks a live one).
    Clear {
        #[arg(long)]
        force: bool,
    },
}

/// Runs the parsed command line; errors are printed as one line on stderr.
pub fn main(args: Args) -> ExitCode {
    init_logging();
    match dispatch(args) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {err}");
            ExitCode::FAILURE
        }
    }
}

fn dispatch(args: Args) -> Result<ExitCode, AgentError> {
    let source = ConfigSource::load(args.config.as_deref())?;
    match args.command {
        Command::Run => {
            let config = AgentConfig::from_source(&source)?;
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(config.worker_threads)
                .enable_all()
                .build()
                .map_err(|e| AgentError::io("starting the runtime", "/", e))?;
            let code = runtime.block_on(async {
                let shutdown = CancellationToken::new();
                tokio::spawn(cancel_on_signal(shutdown.clone()));
                match crate::run::run(config, shutdown).await {
                    Ok(()) => ExitCode::SUCCESS,
                    Err(err @ AgentError::Revoked { .. }) => {
                        tracing::error!("{err}");
                        ExitCode::from(crate::run::EXIT_REVOKED)
                    }
                    Err(err) => {
                        tracing::error!("{err}");
                        ExitCode::FAILURE
                    }
                }
            });
            // Do not wait for blocked tasks (a PTY read) to finish.
            runtime.shutdown_timeout(std::time::Duration::from_secs(1));
            Ok(code)
        }
        Command::Service {
            command: ServiceCommand::Lock { command },
        } => {
            let state_dir = config::state_dir(&source);
            let path = state_dir.join(lock::LOCK_FILE);
            match command {
                LockCommand::Status => {
                    println!("{}", lock::status(&state_dir)?.describe(&path));
                }
                LockCommand::Clear { force } => match lock::clear(&state_dir, force)? {
                    lock::LockStatus::Free => {
                        println!("service lock {}: nothing to clear", path.display())
                    }
                    removed => println!(
                        "removed {}",
                        removed.describe(&path).trim_end_matches(
                            ". Remove it with `gstacks-agent service lock clear --force`"
                        )
                    ),
                },
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

async fn cancel_on_signal(shutdown: CancellationToken) {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::warn!("cannot install signal handlers; stop the agent with SIGKILL");
        return;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = int.recv() => tracing::info!("SIGINT: shutting down"),
    }
    shutdown.cancel();
}

/// Logs to stderr; `RUST_LOG` filters (default `info`). hickory's server
/// logs every answered query at `info`: its target is held at `warn` unless
/// `RUST_LOG` names it.
fn init_logging() {
    let from_env = std::env::var("RUST_LOG").unwrap_or_default();
    let mut filter = tracing_subscriber::EnvFilter::try_new(if from_env.trim().is_empty() {
        "info"
    } else {
        from_env.as_str()
    })
    .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    if !from_env.contains("hickory_server") {
        if let Ok(directive) = "hickory_server=warn".parse() {
            filter = filter.add_directive(directive);
        }
    }
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}
