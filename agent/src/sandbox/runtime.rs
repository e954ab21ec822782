//! The container runtime seam: a small [`Runtime`] trait that the sandbox
//! module drives, implemented with bollard in [`super::docker`] and by a fake
//! in the unit tests. It speaks containers, networks and images, never
//! sandboxes: the identity of a sandbox travels in the labels below.
//!
//! Lifecycle (create, start, stop, remove, inspect, list), images, and the
//! streams of `sandbox_io`: a container's logs and processes run in it
//! (exec, attached or with a TTY). To extend it, add a method here with its
//! own small types, implement it in `docker.rs`, and give the test fake an
//! answer; the modules keep owning the policy (which container, which scope).

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::pin::Pin;
use std::time::Duration;

use futures::Stream;
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

/// Where a piece of a container's output came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputSource {
    Stdout,
    Stderr,
    /// A TTY's merged output.
    Console,
}

/// A piece of a container's (or an exec's) output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutputChunk {
    pub source: OutputSource,
    pub data: Vec<u8>,
}

/// Output as it comes; an error ends it.
pub type OutputStream = Pin<Box<dyn Stream<Item = Result<OutputChunk, RuntimeError>> + Send>>;

/// A process's standard input.
pub type InputSink = Pin<Box<dyn tokio::io::AsyncWrite + Send>>;

/// Which logs of a container.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LogsRequest {
    /// Keep going until the container stops.
    pub follow: bool,
    /// The last lines only; 0 = all.
    pub tail: u64,
}

/// A process to run in a container.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExecSpec {
    pub cmd: Vec<String>,
    /// Attach its stdin (the [`Exec::input`] writes to it).
    pub stdin: bool,
    /// Give it a TTY (output comes merged, as [`OutputSource::Console`]).
    pub tty: bool,
    pub env: Vec<String>,
}

/// A started process in a container.
pub struct Exec {
    /// The engine's handle for [`Runtime::inspect_exec`] and friends.
    pub id: String,
    /// Its stdout and stderr (or TTY output), ending when it exits.
    pub output: OutputStream,
    /// Its stdin (a sink when it was not attached); shut it down for EOF.
    pub input: InputSink,
}

impl std::fmt::Debug for Exec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Exec")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

/// How a process in a container is doing.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ExecState {
    pub running: bool,
    /// Set once it has exited.
    pub exit_code: Option<i64>,
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
    /// The container's logs; `NotFound` when it does not exist.
    async fn logs(&self, id: &str, request: LogsRequest) -> Result<OutputStream, RuntimeError>;
    /// Starts a process in the running container, attached.
    async fn exec(&self, container: &str, spec: &ExecSpec) -> Result<Exec, RuntimeError>;
    /// Whether the process still runs, and its exit code once it ended.
    async fn inspect_exec(&self, exec_id: &str) -> Result<ExecState, RuntimeError>;
    /// Sets the TTY size of a process started with one.
    async fn resize_exec(&self, exec_id: &str, rows: u16, cols: u16) -> Result<(), RuntimeError>;
    /// Ends the process (SIGKILL) if it still runs.
    async fn kill_exec(&self, exec_id: &str) -> Result<(), RuntimeError>;
}
