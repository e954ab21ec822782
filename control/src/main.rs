//! `gstacks-control`: The GlobalStacks control plane.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use control::plane::Settings;
use control::server::{ServeOptions, TlsSource};

#[derive(clap::Parser, Debug)]
#[command(
    name = "gstacks-control",
    about = "The GlobalStacks control plane",
    version,
    long_version = proto::build_info::LONG_VERSION
)]
struct Args {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(clap::Subcommand, Debug)]
enum Cmd {
    /// Serve the agent stream and the operator API.
    Serve {
        #[command(flatten)]
        common: Common,
        /// Certificate chain (PEM) to serve.
        #[arg(long, requires = "tls_key", conflicts_with = "dev")]
        tls_cert: Option<PathBuf>,
        /// Private key (PEM) of --tls-cert.
        #[arg(long, requires = "tls_cert", conflicts_with = "dev")]
        tls_key: Option<PathBuf>,
        /// Use a self-signed certificate made in the data dir on first start.
        #[arg(long)]
        dev: bool,
    },
    /// The control plane plus one local agent in the default cluster.
    Dev {
        #[command(flatten)]
        common: Common,
        /// The gstacks-agent binary (default: next to this one).
        #[arg(long)]
        agent_bin: Option<PathBuf>,
    },
    /// Create an operator token directly in the store (recovery; works
    /// beside a running server). Prints it once.
    OperatorToken {
        /// Data dir of the control plane.
        #[arg(long)]
        data_dir: Option<PathBuf>,
        #[arg(long, default_value = "created with gstacks-control operator-token")]
        description: String,
    },
    /// Create a mesh API token (GLOBALSTACKS_MESH_API_TOKEN) directly in
    /// the store. Prints it once.
    MeshApiToken {
        /// Data dir of the control plane.
        #[arg(long)]
        data_dir: Option<PathBuf>,
        #[arg(long, default_value = "created with gstacks-control mesh-api-token")]
        description: String,
    },
    /// Create a reusable pre-auth key (GLOBALSTACKS_MESH_AUTH_KEY) directly
    /// in the store. Prints it once.
    MeshAuthKey {
        /// Data dir of the control plane.
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Only this network (default: any).
        #[arg(long, default_value = "")]
        network: String,
        /// Lifetime of the key, e.g. 30d.
        #[arg(long, default_value = "30d", value_parser = humantime::parse_duration)]
        ttl: Duration,
    },
}

/// The control plane over the store of a data dir, for the store-only verbs.
fn offline_plane(
    data_dir: Option<PathBuf>,
) -> anyhow::Result<std::sync::Arc<control::plane::ControlPlane>> {
    let data_dir = match data_dir {
        Some(dir) => dir,
        None => default_data_dir()?,
    };
    let path = data_dir.join(control::server::STORE_FILE);
    anyhow::ensure!(path.is_file(), "no store at {}", path.display());
    let store = control::store::sqlite::SqliteStore::open(&path)?;
    Ok(control::plane::ControlPlane::new(
        std::sync::Arc::new(store),
        Settings::default(),
    ))
}

#[derive(clap::Args, Debug)]
struct Common {
    /// Directory of the store and the dev certificate
    /// [default: serve: $XDG_DATA_HOME/gstacks-control, dev: ./.gstacks-dev].
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Address of the gRPC server (agents and operators).
    #[arg(long, default_value = "127.0.0.1:7443")]
    listen: SocketAddr,
    /// Seconds of silence after which a connected host is disconnected.
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=3600))]
    heartbeat_timeout: u64,
    /// Upper bound (and default) of a host terminal session, in seconds.
    #[arg(long, default_value_t = 900, value_parser = clap::value_parser!(u64).range(1..=86400))]
    terminal_max_duration: u64,
    /// Image of sandboxes created without --image or --blueprint.
    #[arg(long, value_name = "REF")]
    default_image: Option<String>,
    /// Memory limit in MiB of a sandbox that asks for none.
    #[arg(long, default_value_t = 512, value_parser = clap::value_parser!(u64).range(16..=1_048_576))]
    sandbox_memory_mib: u64,
    /// Seconds between two listings of a connected host's sandbox containers.
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=86400))]
    sandbox_resync: u64,
    #[command(flatten)]
    mesh: MeshArgs,
}

/// Laptop joins (`gstacks mesh join`): where laptops register and where
/// pre-auth keys come from. `dev` points them at itself unless given.
#[derive(clap::Args, Debug)]
struct MeshArgs {
    /// URL laptops register at: this control plane's MeshControl (its https URL).
    #[arg(long, env = "GLOBALSTACKS_MESH_CONTROL_URL", value_name = "URL")]
    mesh_control_url: Option<String>,
    /// A pre-created pre-auth key handed to every join (`gstacks-control mesh-auth-key`).
    #[arg(
        long,
        env = "GLOBALSTACKS_MESH_AUTH_KEY",
        value_name = "KEY",
        hide_env_values = true
    )]
    mesh_auth_key: Option<String>,
    /// The mesh control API that mints a short-lived single-use key per join.
    #[arg(long, env = "GLOBALSTACKS_MESH_API_URL", value_name = "URL")]
    mesh_api_url: Option<String>,
    /// Token for --mesh-api-url (`gstacks-control mesh-api-token`).
    #[arg(
        long,
        env = "GLOBALSTACKS_MESH_API_TOKEN",
        value_name = "TOKEN",
        hide_env_values = true
    )]
    mesh_api_token: Option<String>,
    /// Recorded with every key minted through the mesh API.
    #[arg(long, env = "GLOBALSTACKS_MESH_USER", value_name = "USER")]
    mesh_user: Option<String>,
    /// PEM to check the mesh API's certificate against [default: this control plane's own].
    #[arg(long, env = "GLOBALSTACKS_MESH_API_CA_FILE", value_name = "PEM")]
    mesh_api_ca_file: Option<PathBuf>,
}

impl MeshArgs {
    fn settings(&self) -> anyhow::Result<control::mesh::MeshSettings> {
        let api_ca_pem = match &self.mesh_api_ca_file {
            Some(path) => Some(
                std::fs::read(path)
                    .with_context(|| format!("GLOBALSTACKS_MESH_API_CA_FILE {}", path.display()))?,
            ),
            None => None,
        };
        Ok(control::mesh::MeshSettings {
            control_url: self.mesh_control_url.clone(),
            auth_key: self.mesh_auth_key.clone(),
            api_url: self.mesh_api_url.clone(),
            api_token: self.mesh_api_token.clone(),
            user: self.mesh_user.clone(),
            api_ca_pem,
        })
    }
}

impl Common {
    fn settings(&self) -> anyhow::Result<Settings> {
        Ok(Settings {
            heartbeat_timeout: Duration::from_secs(self.heartbeat_timeout),
            terminal_max_duration: Duration::from_secs(self.terminal_max_duration),
            default_image: self
                .default_image
                .as_deref()
                .map(str::trim)
                .filter(|image| !image.is_empty())
                .map(str::to_owned),
            sandbox_memory_bytes: self.sandbox_memory_mib << 20,
            sandbox_resync: Duration::from_secs(self.sandbox_resync),
            mesh: self.mesh.settings()?,
            ..Settings::default()
        })
    }
}

/// `$XDG_DATA_HOME/gstacks-control`, else `~/.local/share/gstacks-control`.
fn default_data_dir() -> anyhow::Result<PathBuf> {
    if let Some(xdg) = std::env::var_os("XDG_DATA_HOME").filter(|v| !v.is_empty()) {
        return Ok(PathBuf::from(xdg).join("gstacks-control"));
    }
    let home = std::env::var_os("HOME")
        .filter(|v| !v.is_empty())
        .context("neither XDG_DATA_HOME nor HOME is set: give --data-dir")?;
    Ok(PathBuf::from(home).join(".local/share/gstacks-control"))
}

fn main() {
    let args: Args = proto::build_info::parse_args();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("error: starting the async runtime: {err}");
            std::process::exit(1);
        }
    };
    if let Err(err) = runtime.block_on(run(args)) {
        eprintln!("error: {err:#}");
        std::process::exit(1);
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    match args.command {
        Cmd::Serve {
            common,
            tls_cert,
            tls_key,
            dev,
        } => {
            let tls = match (tls_cert, tls_key, dev) {
                (Some(cert), Some(key), false) => TlsSource::Files { cert, key },
                (None, None, true) => TlsSource::Dev,
                _ => anyhow::bail!(
                    "give --tls-cert and --tls-key, or --dev for a self-signed certificate"
                ),
            };
            let data_dir = match common.data_dir.clone() {
                Some(dir) => dir,
                None => default_data_dir()?,
            };
            let mut running = control::server::start(ServeOptions {
                data_dir,
                listen: common.listen,
                tls,
                settings: common.settings()?,
                first_operator_token: true,
            })
            .await?;
            println!("gstacks-control listening on {}", running.url());
            if running.tls_created {
                println!(
                    "created a self-signed certificate: {}",
                    running.tls.cert_path.display()
                );
            }
            println!(
                "certificate SHA-256 fingerprint: {} (agents trust it with GLOBALSTACKS_CONTROL_CA_FILE={}, gstacks with GLOBALSTACKS_API_CA_FILE)",
                running.tls.fingerprint()?,
                running.tls.cert_path.display()
            );
            if let Some(token) = running.first_operator_token.take() {
                println!("operator token (shown once, only its hash is stored):");
                println!("  export GLOBALSTACKS_API_TOKEN={}", token.secret.expose());
            }
            tokio::select! {
                served = running.wait() => served?,
                signal = tokio::signal::ctrl_c() => {
                    signal.context("waiting for Ctrl-C")?;
                    running.shutdown().await?;
                }
            }
            Ok(())
        }
        Cmd::Dev { common, agent_bin } => {
            let data_dir = common
                .data_dir
                .clone()
                .unwrap_or_else(|| PathBuf::from(".gstacks-dev"));
            control::dev::run(control::dev::DevOptions {
                serve: ServeOptions {
                    data_dir,
                    listen: common.listen,
                    tls: TlsSource::Dev,
                    settings: common.settings()?,
                    first_operator_token: false,
                },
                agent_binary: agent_bin,
            })
            .await?;
            Ok(())
        }
        Cmd::OperatorToken {
            data_dir,
            description,
        } => {
            let data_dir = match data_dir {
                Some(dir) => dir,
                None => default_data_dir()?,
            };
            let path = data_dir.join(control::server::STORE_FILE);
            anyhow::ensure!(path.is_file(), "no store at {}", path.display());
            let store = control::store::sqlite::SqliteStore::open(&path)?;
            let plane =
                control::plane::ControlPlane::new(std::sync::Arc::new(store), Settings::default());
            let token = plane.create_operator_token(&description)?;
            println!("{}", token.secret.expose());
            Ok(())
        }
        Cmd::MeshApiToken {
            data_dir,
            description,
        } => {
            let plane = offline_plane(data_dir)?;
            let token = plane.create_mesh_api_token(&description)?;
            println!("{}", token.secret.expose());
            Ok(())
        }
        Cmd::MeshAuthKey {
            data_dir,
            network,
            ttl,
        } => {
            let plane = offline_plane(data_dir)?;
            let key = plane
                .mint_pre_auth_key(&network, None, "", true, ttl)
                .map_err(|status| anyhow::anyhow!("{}", status.message()))?;
            println!("{}", key.secret.expose());
            Ok(())
        }
    }
}
