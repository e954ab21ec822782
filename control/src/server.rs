//! Starting the control plane: the store in the data dir, the certificate,
//! and one TLS gRPC server for `AgentService`, `ControlApi` and `MeshControl`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Server, ServerTlsConfig};

use crate::agent_service::AgentApi;
use crate::api::OperatorApi;
use crate::error::{ControlError, Result};
use crate::plane::{ControlPlane, NewOperatorToken, Settings};
use crate::sessions::CloseReason;
use crate::store::sqlite::SqliteStore;
use crate::tls::{create_private_dir, TlsMaterial};

/// Where the certificate comes from.
#[derive(Debug, Clone)]
pub enum TlsSource {
    Files {
        cert: PathBuf,
        key: PathBuf,
    },
    /// Self-signed, made in `<data-dir>/tls/` on first start.
    Dev,
}

#[derive(Debug, Clone)]
pub struct ServeOptions {
    pub data_dir: PathBuf,
    pub listen: SocketAddr,
    pub tls: TlsSource,
    pub settings: Settings,
    /// Make (and hand back) an operator token when none exists.
    pub first_operator_token: bool,
}

/// File name of the store inside the data dir.
pub const STORE_FILE: &str = "control.db";

/// A running control plane.
#[derive(Debug)]
pub struct Running {
    /// The address actually bound (port 0 resolved).
    pub addr: SocketAddr,
    pub plane: Arc<ControlPlane>,
    pub tls: TlsMaterial,
    pub tls_created: bool,
    /// Set on the first start only: print it once.
    pub first_operator_token: Option<NewOperatorToken>,
    shutdown: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<()>>,
}

impl Running {
    /// `https://<addr>` for clients on this machine.
    pub fn url(&self) -> String {
        let host = match self.addr.ip() {
            ip if ip.is_unspecified() => "127.0.0.1".to_owned(),
            std::net::IpAddr::V6(ip) => format!("[{ip}]"),
            std::net::IpAddr::V4(ip) => ip.to_string(),
        };
        format!("https://{host}:{}", self.addr.port())
    }

    /// Waits until the server stops (it only stops on error or shutdown).
    pub async fn wait(&mut self) -> Result<()> {
        (&mut self.task)
            .await
            .map_err(|err| ControlError::Serve(err.to_string()))?
    }

    /// Says goodbye to every agent, stops accepting, and waits (a few
    /// seconds at most) for open calls to end.
    pub async fn shutdown(mut self) -> Result<()> {
        self.plane.sessions.close_all(&CloseReason {
            code: proto::ErrorCode::Unavailable,
            message: "the control plane is shutting down".to_owned(),
        });
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        match tokio::time::timeout(Duration::from_secs(5), &mut self.task).await {
            Ok(joined) => joined.map_err(|err| ControlError::Serve(err.to_string()))?,
            Err(_) => {
                // Followers of `host logs --follow` and terminals keep calls
                // open; they end with the process.
                self.task.abort();
                Ok(())
            }
        }
    }
}

/// Every agent stream is a file descriptor: lift the soft limit to the hard
/// one so that thousands of agents fit (a service manager's default soft
/// limit is often 1024). Returns the soft limit in force.
pub fn raise_fd_limit() -> Option<u64> {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).ok()?;
    if soft >= hard {
        return Some(soft);
    }
    match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
        Ok(()) => Some(hard),
        Err(err) => {
            tracing::warn!(soft, hard, error = %err, "could not raise the open-files limit");
            Some(soft)
        }
    }
}

/// Opens the store, prepares TLS, binds and starts serving.
pub async fn start(options: ServeOptions) -> Result<Running> {
    if let Some(limit) = raise_fd_limit() {
        tracing::debug!(limit, "open-files limit");
    }
    create_private_dir(&options.data_dir)?;
    let store = SqliteStore::open(&options.data_dir.join(STORE_FILE))?;
    let plane = ControlPlane::new(Arc::new(store), options.settings.clone());
    plane.start_fresh()?;
    tokio::spawn(crate::netmaps::run(plane.clone()));
    tokio::spawn(crate::mesh::run_expiry(plane.clone()));
    let first_operator_token = if options.first_operator_token {
        plane.ensure_first_operator_token()?
    } else {
        None
    };
    let (tls, tls_created) = match &options.tls {
        TlsSource::Files { cert, key } => (TlsMaterial::load(cert, key)?, false),
        TlsSource::Dev => TlsMaterial::ensure_dev(&options.data_dir)?,
    };
    plane.mesh.set_own_ca(tls.cert_pem.clone());
    let listener = tokio::net::TcpListener::bind(options.listen)
        .await
        .map_err(|source| ControlError::Listen {
            addr: options.listen.to_string(),
            source,
        })?;
    let addr = listener
        .local_addr()
        .map_err(|source| ControlError::Listen {
            addr: options.listen.to_string(),
            source,
        })?;
    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
    let router = Server::builder()
        .tls_config(ServerTlsConfig::new().identity(tls.identity()))
        .map_err(|err| ControlError::Tls(err.to_string()))?
        // Finds dead peers under a silent stream sooner than heartbeats would.
        .http2_keepalive_interval(Some(Duration::from_secs(10)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        .add_service(proto::agent_service_server::AgentServiceServer::new(
            AgentApi::new(plane.clone()),
        ))
        .add_service(proto::control_api_server::ControlApiServer::new(
            OperatorApi::new(plane.clone()),
        ))
        .add_service(proto::mesh_control_server::MeshControlServer::new(
            crate::mesh::MeshApi::new(plane.clone()),
        ));
    let (shutdown_tx, shutdown_rx) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        router
            .serve_with_incoming_shutdown(incoming, async {
                let _ = shutdown_rx.await;
            })
            .await
            .map_err(|err| ControlError::Serve(err.to_string()))
    });
    tracing::info!(%addr, data_dir = %options.data_dir.display(), "control plane listening");
    Ok(Running {
        addr,
        plane,
        tls,
        tls_created,
        first_operator_token,
        shutdown: Some(shutdown_tx),
        task,
    })
}
