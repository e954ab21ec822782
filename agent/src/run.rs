//! `gstacks-agent run`: take the service lock, enroll (first start only),
//! then serve the control stream with the agent's modules until shutdown.
//!
//! Exit: 0 on SIGINT/SIGTERM; [`EXIT_REVOKED`] (78, `EX_CONFIG`) when the
//! control plane refuses the host's credential, so that a service manager
//! can stop restarting it (`RestartPreventExitStatus=78` in systemd); 1 on
//! any other error (bad config, lock held, enrollment refused).

use std::sync::Arc;
use std::time::Duration;

use proto::Telemetry;
use tokio_util::sync::CancellationToken;

use crate::config::AgentConfig;
use crate::control_stream::{
    ensure_enrolled, ClientOptions, ControlClient, ControlEndpoint, TelemetrySource,
};
use crate::dispatch::{CommandKind, Concurrency, DispatcherBuilder, PingModule};
use crate::error::AgentError;
use crate::lock::ServiceLock;
use crate::state;
use crate::{network, sandbox, sandbox_io, telemetry, terminal};

/// Exit status after revocation.
pub const EXIT_REVOKED: u8 = 78;

/// The host's own telemetry, Docker re-probed on every call; with the
/// sandbox module, also the running sandboxes, the cached images and the
/// capacity.
pub struct HostTelemetry {
    traits: Vec<String>,
    tags: Vec<String>,
    sandboxes: Option<Arc<sandbox::SandboxModule>>,
}

impl HostTelemetry {
    pub fn new(traits: Vec<String>, tags: Vec<String>) -> Self {
        Self {
            traits,
            tags,
            sandboxes: None,
        }
    }

    /// Reports the sandbox runtime's facts too.
    pub fn with_sandboxes(mut self, module: Arc<sandbox::SandboxModule>) -> Self {
        self.sandboxes = Some(module);
        self
    }
}

impl TelemetrySource for HostTelemetry {
    fn current(
        &self,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Telemetry> + Send + '_>> {
        Box::pin(async move {
            let docker = telemetry::docker_reachable(Duration::from_secs(2)).await;
            let mut facts = telemetry::collect(&self.traits, &self.tags, docker);
            if let Some(module) = &self.sandboxes {
                facts.sandbox_capacity = module.settings().max_sandboxes;
                if docker {
                    let runtime =
                        tokio::time::timeout(Duration::from_secs(5), module.facts()).await;
                    if let Ok(runtime) = runtime {
                        facts.running_sandboxes = runtime.running_sandboxes;
                        facts.cached_images = runtime.cached_images;
                    }
                }
            }
            facts
        })
    }
}

/// The modules of this agent and the command kinds they own; the sandbox
/// io modules run on `runtime`.
pub fn modules(config: &AgentConfig, runtime: Arc<dyn sandbox::Runtime>) -> DispatcherBuilder {
    let terminals = terminal::HostTerminal::new(config.disable_host_terminal);
    // Sandbox terminals share the host terminal's session table, so input,
    // resize and close reach both the same way.
    let (io, io_streams, io_uploads) = sandbox_io::modules(terminals.clone(), runtime);
    DispatcherBuilder::new()
        .register(
            Arc::new(PingModule),
            &[CommandKind::Ping],
            Concurrency::Sequential,
        )
        .register(terminals.clone(), terminal::KINDS, Concurrency::Sequential)
        .register(io, sandbox_io::KINDS, Concurrency::Parallel(16))
        .register(
            io_streams,
            sandbox_io::STREAM_KINDS,
            Concurrency::Sequential,
        )
        .register(
            io_uploads,
            sandbox_io::UPLOAD_KINDS,
            Concurrency::Sequential,
        )
}

/// Runs the agent until `shutdown` is cancelled or the host is revoked.
pub async fn run(config: AgentConfig, shutdown: CancellationToken) -> Result<(), AgentError> {
    let lock = ServiceLock::acquire(&config.state_dir)?;
    tracing::debug!(path = %lock.path().display(), "service lock taken");
    let endpoint = ControlEndpoint::new(&config.control_url, &config.tls)?;
    let host = HostTelemetry::new(config.traits.clone(), config.tags.clone());
    let facts = host.current().await;
    tracing::info!(
        version = %facts.agent_version,
        commit = %facts.agent_commit,
        arch = %facts.arch,
        traits = ?facts.traits,
        tags = ?facts.tags,
        control_url = %endpoint.url(),
        "gstacks-agent starting"
    );
    let enrolled_before = state::load_credential(&config.state_dir)?.is_some();
    if enrolled_before && config.provisioning_token.is_some() {
        tracing::info!(
            "this host is already enrolled; GLOBALSTACKS_PROVISIONING_TOKEN is not used"
        );
    }
    let Some(credential) = ensure_enrolled(
        &endpoint,
        &config.state_dir,
        config.provisioning_token.as_ref(),
        facts,
        &shutdown,
    )
    .await?
    else {
        return Ok(());
    };
    let node_key = network::node_key::load_or_create_node_key(&config.state_dir)?;
    let client = ControlClient::new(
        endpoint,
        &config.state_dir,
        ClientOptions {
            heartbeat_interval: config.heartbeat_interval,
            ..ClientOptions::default()
        },
    )
    .with_mesh_node(network::mesh_node_info(&node_key, &config.network));
    // The network module stops with the agent, also when the client ends
    // by itself (revocation).
    let network_stop = shutdown.child_token();
    let network = network::Network::start(
        config.network.clone(),
        credential.host_id.clone(),
        node_key,
        client.netmaps(),
        client.link(),
        client.applied_topology_version(),
        network_stop.clone(),
    )
    .await?;
    // One engine client for the sandbox lifecycle and the sandbox io.
    let runtime: Arc<dyn sandbox::Runtime> = Arc::new(sandbox::docker::DockerRuntime::new());
    let sandboxes = sandbox::SandboxModule::new(
        runtime.clone(),
        config.sandbox.clone(),
        credential.host_id.clone(),
    );
    tracing::info!(
        scope = %config.sandbox.scope,
        docker_network = %config.sandbox.docker_network,
        gateway = %config.docker_gateway(),
        "sandbox runtime"
    );
    let host = host.with_sandboxes(sandboxes.clone());
    let modules = modules(&config, runtime)
        .register(network.module(), network::KINDS, Concurrency::Parallel(4))
        .register(sandboxes, sandbox::KINDS, Concurrency::Parallel(8));
    let result = client.run(&credential, modules, &host, shutdown).await;
    network_stop.cancel();
    network.stopped().await;
    drop(lock);
    result
}
