//! The container runtime seam: a small [`Runtime`] trait that the sandbox
//! module drives, implemented with bollard in [`super::docker`] and by a fake
//! in the unit tests. It speaks containers, networks and images, never
//! sandboxes: the identity of a sandbox travels in the labels below.
//!
//! To extend it (exec, logs, copying files), add a method here with its own
//! small types, implement it in `docker.rs`, and give the test fake an
//! answer; the module keeps owning the policy (which container, which scope).

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::time::Duration;

use ipnet::Ipv4Net;

/// `true` on every container and network the agent manages.
pub const LABEL_MANAGED: &str = "io.globalstacks.managed";
/// The agent's runtime scope (its machine id by default): an agent only
/// ever lists, touches or removes containers of its own scope.
pub const LABEL_SCOPE: &str = "io.globalstacks.scope";
/// The durable identity of the sandbox (rediscovery's first key).
pub const LABEL_SANDBOX_ID: &str = "io.globalstacks.sandbox-id";
/// The host that created the container.
pub const LABEL_HOST_ID: &str = "io.globalstacks.host-id";
pub const LABEL_CLUSTER_ID: &str = "io.globalstacks.cluster-id";
/// The sandbox's display name.
pub const LABEL_SANDBOX_NAME: &str = "io.globalstacks.sandbox-name";

/// A bridge network for the agent's sandboxes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkSpec {
    pub name: String,
    pub subnet: Ipv4Net,
    pub gateway: Ipv4Addr,
    pub labels: HashMap<String, String>,
}

/// A host directory mounted into the container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bind {
    pub host_path: String,
    pub container_path: String,
    pub read_only: bool,
}

/// Everything needed to create a container.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ContainerSpec {
    pub name: String,
    pub hostname: String,
    pub image: String,
    pub labels: HashMap<String, String>,
    pub env: Vec<String>,
    pub binds: Vec<Bind>,
    /// 0 = no limit.
    pub memory_bytes: u64,
    /// 0 = no limit; billionths of a CPU.
    pub nano_cpus: u64,
    /// The network the container joins (its only one).
    pub network: String,
    /// Resolvers written into the container's resolv.conf.
    pub dns: Vec<Ipv4Addr>,
}

/// A container as the runtime reports it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ContainerInfo {
    pub id: String,
    /// Without the leading `/`.
    pub name: String,
    /// The reference it was created from.
    pub image: String,
    /// `sha256:...`
    pub image_id: String,
    /// "created", "running", "exited", ...
    pub state: String,
    pub running: bool,
    pub exit_code: i64,
    /// The engine's error of a failed start.
    pub error: String,
    pub labels: HashMap<String, String>,
    /// IPv4 address per network name.
    pub addresses: HashMap<String, String>,
    pub created_at_ms: i64,
    pub started_at_ms: i64,
}

/// An image the engine holds.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImageInfo {
    /// `sha256:...`
    pub id: String,
    pub repo_tags: Vec<String>,
    pub repo_digests: Vec<String>,
}

/// What went wrong, carrying the engine's own message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RuntimeError {
    /// No such container or image (404).
    #[error("{0}")]
    NotFound(String),
    /// A name already taken, a container in the way (409).
    #[error("{0}")]
    Conflict(String),
    /// The engine refused the request (400).
    #[error("{0}")]
    Invalid(String),
    /// The engine cannot be reached.
    #[error("the container engine is unavailable: {0}")]
    Unavailable(String),
    #[error("container engine: {0}")]
    Engine(String),
}

/// The operations the sandbox module needs from a container engine.
#[async_trait::async_trait]
pub trait Runtime: Send + Sync + 'static {
    /// Creates the bridge network unless one of that name exists; an
    /// existing one with another subnet is an error naming both.
    async fn ensure_network(&self, spec: &NetworkSpec) -> Result<(), RuntimeError>;
    /// Creates (does not start) a container; returns its id.
    async fn create_container(&self, spec: &ContainerSpec) -> Result<String, RuntimeError>;
    /// Starts it; already running is not an error.
    async fn start_container(&self, id: &str) -> Result<(), RuntimeError>;
    /// Stops it, killing it after `timeout`; already stopped is not an error.
    async fn stop_container(&self, id: &str, timeout: Duration) -> Result<(), RuntimeError>;
    /// Removes it, running or not; `NotFound` when it is already gone.
    async fn remove_container(&self, id: &str) -> Result<(), RuntimeError>;
    /// The container, or None when it does not exist.
    async fn inspect_container(&self, id: &str) -> Result<Option<ContainerInfo>, RuntimeError>;
    /// Every container (running or not) carrying all these labels.
    async fn list_containers(
        &self,
        labels: &[(&str, &str)],
    ) -> Result<Vec<ContainerInfo>, RuntimeError>;
    /// Every image the engine holds.
    async fn list_images(&self) -> Result<Vec<ImageInfo>, RuntimeError>;
}
