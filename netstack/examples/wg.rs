//! A userspace WireGuard peer from a wg-quick file, with no TUN device and no
//! root: TCP echo on overlay ports, local ports forwarded to overlay
//! addresses (what onetun does), and local services exposed on overlay
//! ports (reverse forwarding).
//!
//! ```text
//! cargo run --release -p netstack --example wg -- --config wg0.conf \
//!     --echo 7 --forward 127.0.0.1:8080=100.64.0.2:80 --expose 2222=127.0.0.1:22
//! ```
//!
//! It runs until SIGINT or SIGTERM, then shuts the node down and exits 0. Bad
//! arguments or a bad file exit 2 with a message naming what is wrong.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::str::FromStr;
use std::sync::Arc;

use clap::Parser;
use netstack::config::WgQuickConfig;
use netstack::MeshNode;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::signal::unix::{signal, SignalKind};

/// Bytes each direction of a forwarded connection buffers.
const SPLICE_BUFFER: usize = 256 * 1024;

#[derive(Parser, Debug)]
#[command(
    name = "wg",
    about = "A userspace WireGuard peer: echo, forward and expose TCP over the tunnel"
)]
struct Args {
    /// The wg-quick file ([Interface] and [Peer] sections).
    #[arg(long, value_name = "FILE")]
    config: PathBuf,
    /// Serve TCP echo on this overlay port (repeatable).
    #[arg(long, value_name = "PORT")]
    echo: Vec<u16>,
    /// Listen on a local TCP address and forward each connection to an
    /// overlay address (repeatable).
    #[arg(long, value_name = "LOCAL_ADDR=OVERLAY_ADDR")]
    forward: Vec<Forward>,
    /// Accept on an overlay port and connect each connection to a local TCP
    /// service (repeatable).
    #[arg(long, value_name = "OVERLAY_PORT=LOCAL_ADDR")]
    expose: Vec<Expose>,
}

#[derive(Clone, Debug)]
struct Forward {
    local: SocketAddr,
    overlay: SocketAddr,
}

impl FromStr for Forward {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, String> {
        let (local, overlay) = text
            .split_once('=')
            .ok_or_else(|| format!("`{text}` is not LOCAL_ADDR=OVERLAY_ADDR"))?;
        Ok(Forward {
            local: local
                .parse()
                .map_err(|_| format!("`{local}` is not a local address like 127.0.0.1:8080"))?,
            overlay: overlay
                .parse()
                .map_err(|_| format!("`{overlay}` is not an overlay address like 100.64.0.2:80"))?,
        })
    }
}

#[derive(Clone, Debug)]
struct Expose {
    port: u16,
    local: SocketAddr,
}

impl FromStr for Expose {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, String> {
        let (port, local) = text
            .split_once('=')
            .ok_or_else(|| format!("`{text}` is not OVERLAY_PORT=LOCAL_ADDR"))?;
        Ok(Expose {
            port: port
                .parse()
                .map_err(|_| format!("`{port}` is not a port number 0-65535"))?,
            local: local
                .parse()
                .map_err(|_| format!("`{local}` is not a local address like 127.0.0.1:22"))?,
        })
    }
}

fn main() -> ExitCode {
    // clap prints the error and exits 2 on bad arguments.
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let config = match WgQuickConfig::load(&args.config) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args, config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Usage(message)) => {
            eprintln!("error: {message}");
            ExitCode::from(2)
        }
        Err(Failure::Runtime(message)) => {
            eprintln!("error: {message}");
            ExitCode::FAILURE
        }
    }
}

enum Failure {
    /// The arguments or the file cannot work (exit 2).
    Usage(String),
    /// Something failed while running (exit 1).
    Runtime(String),
}

async fn run(args: Args, config: WgQuickConfig) -> Result<(), Failure> {
    let file = args.config.display().to_string();
    let node_config = config
        .node_config()
        .map_err(|e| Failure::Usage(format!("{file}: {e}")))?;
    let peers = config
        .peer_configs()
        .map_err(|e| Failure::Usage(format!("{file}: {e}")))?;
    if !config.interface.host_settings.is_empty() {
        let keys: Vec<&str> = config
            .interface
            .host_settings
            .iter()
            .map(|s| s.key.name())
            .collect();
        tracing::info!(
            "ignoring {} from {file}: a userspace node has no kernel interface, routes or hooks",
            keys.join(", ")
        );
    }
    let node = Arc::new(
        MeshNode::bind(node_config, peers)
            .await
            .map_err(|e| Failure::Runtime(e.to_string()))?,
    );
    let addresses: Vec<String> = node.addresses().iter().map(|a| a.to_string()).collect();
    tracing::info!(
        public_key = %node.public_key(),
        udp = %node.local_addr(),
        overlay = %addresses.join(", "),
        "node up"
    );
    // Every listener is set up before anything is served, so a port in use
    // fails the start instead of leaving a half-working node.
    let mut echo = Vec::new();
    for port in &args.echo {
        let listener = node
            .listen_tcp(*port)
            .map_err(|e| Failure::Usage(format!("--echo {port}: {e}")))?;
        echo.push(listener);
    }
    let mut forward = Vec::new();
    for rule in &args.forward {
        let listener = tokio::net::TcpListener::bind(rule.local)
            .await
            .map_err(|e| {
                Failure::Usage(format!("--forward: cannot listen on {}: {e}", rule.local))
            })?;
        forward.push((listener, rule.overlay));
    }
    let mut expose = Vec::new();
    for rule in &args.expose {
        let listener = node
            .listen_tcp(rule.port)
            .map_err(|e| Failure::Usage(format!("--expose {}: {e}", rule.port)))?;
        expose.push((listener, rule.local));
    }
    for listener in echo {
        tracing::info!(port = listener.local_addr().port(), "echo");
        tokio::spawn(serve_echo(listener));
    }
    for (listener, overlay) in forward {
        let local = listener
            .local_addr()
            .map_err(|e| Failure::Runtime(e.to_string()))?;
        tracing::info!(%local, %overlay, "forward");
        tokio::spawn(serve_forward(listener, node.clone(), overlay));
    }
    for (listener, local) in expose {
        tracing::info!(port = listener.local_addr().port(), %local, "expose");
        tokio::spawn(serve_expose(listener, local));
    }
    wait_for_signal().await.map_err(Failure::Runtime)?;
    tracing::info!("shutting down");
    node.shutdown().await;
    Ok(())
}

async fn wait_for_signal() -> Result<(), String> {
    let mut interrupt =
        signal(SignalKind::interrupt()).map_err(|e| format!("cannot watch SIGINT: {e}"))?;
    let mut terminate =
        signal(SignalKind::terminate()).map_err(|e| format!("cannot watch SIGTERM: {e}"))?;
    tokio::select! {
        _ = interrupt.recv() => {}
        _ = terminate.recv() => {}
    }
    Ok(())
}

async fn serve_echo(listener: netstack::TcpListener) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                tracing::warn!(error = %e, "echo listener stopped");
                return;
            }
        };
        tokio::spawn(async move {
            if let Err(e) = echo(stream).await {
                tracing::debug!(%peer, error = %e, "echo connection ended");
            }
        });
    }
}

/// Writes back what it reads; at the client's half-close, closes its side.
async fn echo(mut stream: netstack::TcpStream) -> std::io::Result<()> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            return stream.shutdown().await;
        }
        stream.write_all(&buf[..n]).await?;
    }
}

async fn serve_forward(
    listener: tokio::net::TcpListener,
    node: Arc<MeshNode>,
    overlay: SocketAddr,
) {
    loop {
        let (local, from) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                // Out of descriptors and the like: keep serving.
                tracing::warn!(error = %e, "forward accept failed");
                continue;
            }
        };
        let node = node.clone();
        tokio::spawn(async move {
            let _ = local.set_nodelay(true);
            match node.dial_tcp(overlay).await {
                Ok(remote) => splice(local, remote, &from.to_string()).await,
                Err(e) => tracing::warn!(%from, %overlay, error = %e, "forward: dial failed"),
            }
        });
    }
}

async fn serve_expose(listener: netstack::TcpListener, local: SocketAddr) {
    loop {
        let (remote, from) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                tracing::warn!(error = %e, "expose listener stopped");
                return;
            }
        };
        tokio::spawn(async move {
            match tokio::net::TcpStream::connect(local).await {
                Ok(service) => {
                    let _ = service.set_nodelay(true);
                    splice(remote, service, &from.to_string()).await;
                }
                Err(e) => tracing::warn!(%from, %local, error = %e, "expose: connect failed"),
            }
        });
    }
}

/// Copies both ways until both sides have closed, passing half-closes on.
async fn splice<A, B>(mut a: A, mut b: B, who: &str)
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    match tokio::io::copy_bidirectional_with_sizes(&mut a, &mut b, SPLICE_BUFFER, SPLICE_BUFFER)
        .await
    {
        Ok((up, down)) => tracing::debug!(who, up, down, "connection closed"),
        Err(e) => tracing::debug!(who, error = %e, "connection ended"),
    }
}
