//! The command line of `gstacks-agent`: `run` and the host-local
//! `service lock status | clear [--force]` verbs.

use std::path::PathBuf;
use std::process::ExitCode;

use crate::config::{self, ConfigSource};
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

/// Logs to stderr; `RUST_LOG` filters (default `info`).
fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}
