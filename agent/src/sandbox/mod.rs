//! The sandbox module: the `Sandbox*` commands of the control stream, run on
//! the host's container engine through the [`Runtime`] trait.
//!
//! - Identity: every container carries `io.globalstacks.managed=true`, the
//!   agent's runtime scope, the sandbox id, the host id, the cluster id and
//!   the sandbox name as labels. The agent only lists, touches or removes
//!   containers of its own scope, so two agents sharing an engine never see
//!   each other's, and a reinstalled agent (new host id, same machine id)
//!   finds its predecessor's on `SandboxList`.
//! - Network: each agent has its own bridge (`GLOBALSTACKS_AGENT_DOCKER_NETWORK`
//!   on `GLOBALSTACKS_AGENT_DOCKER_SUBNET`), made on first use; every
//!   sandbox joins it and resolves names through its gateway, where the
//!   network module serves DNS. Addresses on that bridge are reported back
//!   and land in the sandbox record.
//! - Volumes: bind mounts of host directories that exist and lie under
//!   `GLOBALSTACKS_AGENT_VOLUME_ROOTS` (compared after resolving symlinks);
//!   anything else is refused with the reason.
//! - Nothing is pulled: an image the engine does not hold fails the create
//!   with the engine's message.
//!
//! Sandbox io (logs, terminal, files, repository bootstrap; `crate::sandbox_io`)
//! runs on the same [`Runtime`]: new command kinds go in [`KINDS`] (or a
//! module of their own), new engine operations on [`Runtime`].

pub mod docker;
#[cfg(test)]
pub(crate) mod fake;
pub mod runtime;
pub mod settings;

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use proto::{command, command_result, Command, ErrorCode, SandboxRuntime};

use crate::dispatch::{CommandError, CommandKind, CommandOutcome, HandlerFuture, Link, Module};
pub use runtime::{
    Bind, ContainerInfo, ContainerSpec, Exec, ExecSpec, ExecState, ImageInfo, LogsRequest,
    NetworkSpec, OutputChunk, OutputSource, OutputStream, Runtime, RuntimeError, LABEL_CLUSTER_ID,
    LABEL_HOST_ID, LABEL_MANAGED, LABEL_SANDBOX_ID, LABEL_SANDBOX_NAME, LABEL_SCOPE,
};
pub use settings::SandboxSettings;

/// The command kinds this module owns.
pub const KINDS: &[CommandKind] = &[
    CommandKind::SandboxCreate,
    CommandKind::SandboxStart,
    CommandKind::SandboxStop,
    CommandKind::SandboxRemove,
    CommandKind::SandboxInspect,
    CommandKind::SandboxList,
];

/// Seconds a stopping container gets when the command names none.
pub const DEFAULT_STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// Prefix of every sandbox container's name (`gstacks-sbx_...`).
pub const CONTAINER_PREFIX: &str = "gstacks-";

/// What telemetry reports about the runtime.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RuntimeFacts {
    /// Running containers of this agent's scope.
    pub running_sandboxes: u32,
    /// Image ids, repo digests and tags.
    pub cached_images: Vec<String>,
}

pub struct SandboxModule {
    runtime: Arc<dyn Runtime>,
    settings: SandboxSettings,
    host_id: String,
    /// Creates hold it shared, `SandboxList` exclusively: an inventory
    /// never misses a container that a create (maybe of a stream that just
    /// died) is making.
    creating: tokio::sync::RwLock<()>,
}

impl std::fmt::Debug for SandboxModule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SandboxModule")
            .field("settings", &self.settings)
            .field("host_id", &self.host_id)
            .finish_non_exhaustive()
    }
}

fn runtime_error(err: RuntimeError) -> CommandError {
    let code = match &err {
        RuntimeError::NotFound(_) => ErrorCode::NotFound,
        RuntimeError::Conflict(_) => ErrorCode::AlreadyExists,
        RuntimeError::Invalid(_) => ErrorCode::InvalidArgument,
        RuntimeError::Unavailable(_) => ErrorCode::Unavailable,
        RuntimeError::Engine(_) => ErrorCode::Internal,
    };
    CommandError::new(code, err.to_string())
}

/// A hostname from a sandbox name: DNS label characters, at most 63.
fn hostname_of(name: &str) -> String {
    let cleaned: String = name
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .take(63)
        .collect();
    cleaned.trim_matches('-').to_owned()
}

impl SandboxModule {
    pub fn new(runtime: Arc<dyn Runtime>, settings: SandboxSettings, host_id: String) -> Arc<Self> {
        Arc::new(Self {
            runtime,
            settings,
            host_id,
            creating: tokio::sync::RwLock::new(()),
        })
    }

    pub fn settings(&self) -> &SandboxSettings {
        &self.settings
    }

    /// The labels that select this agent's containers.
    fn scope_labels(&self) -> [(&'static str, &str); 2] {
        [(LABEL_MANAGED, "true"), (LABEL_SCOPE, &self.settings.scope)]
    }

    fn owned(&self, info: &ContainerInfo) -> bool {
        info.labels.get(LABEL_MANAGED).map(String::as_str) == Some("true")
            && info.labels.get(LABEL_SCOPE) == Some(&self.settings.scope)
    }

    pub fn network_spec(&self) -> NetworkSpec {
        NetworkSpec {
            name: self.settings.docker_network.clone(),
            subnet: self.settings.docker_subnet,
            gateway: self.settings.docker_gateway(),
            labels: HashMap::from([
                (LABEL_MANAGED.to_owned(), "true".to_owned()),
                (LABEL_SCOPE.to_owned(), self.settings.scope.clone()),
            ]),
        }
    }

    /// The sandbox's container as the control plane sees it.
    pub fn to_runtime(&self, info: &ContainerInfo) -> SandboxRuntime {
        let network = &self.settings.docker_network;
        SandboxRuntime {
            sandbox_id: info
                .labels
                .get(LABEL_SANDBOX_ID)
                .cloned()
                .unwrap_or_default(),
            container_id: info.id.clone(),
            container_name: info.name.clone(),
            state: info.state.clone(),
            running: info.running,
            image: info.image.clone(),
            image_digest: info.image_id.clone(),
            addresses: info.addresses.get(network).cloned().into_iter().collect(),
            network: network.clone(),
            exit_code: i32::try_from(info.exit_code).unwrap_or(i32::MIN),
            error: info.error.clone(),
            labels: info.labels.clone(),
            host_id: info.labels.get(LABEL_HOST_ID).cloned().unwrap_or_default(),
            created_at_ms: info.created_at_ms,
            started_at_ms: info.started_at_ms,
        }
    }

    /// Every container of this agent's scope.
    pub async fn inventory(&self) -> Result<Vec<ContainerInfo>, RuntimeError> {
        self.runtime.list_containers(&self.scope_labels()).await
    }

    /// Running sandboxes and cached images, for telemetry. An unreachable
    /// engine reports nothing (the `docker` trait is missing then too).
    pub async fn facts(&self) -> RuntimeFacts {
        let running = match self.inventory().await {
            Ok(all) => all.iter().filter(|c| c.running).count(),
            Err(err) => {
                tracing::debug!(error = %err, "sandbox inventory for telemetry");
                0
            }
        };
        let mut cached_images = Vec::new();
        match self.runtime.list_images().await {
            Ok(images) => {
                for image in images {
                    for name in std::iter::once(image.id)
                        .chain(image.repo_digests)
                        .chain(image.repo_tags)
                    {
                        if !name.is_empty() && !cached_images.contains(&name) {
                            cached_images.push(name);
                        }
                    }
                }
            }
            Err(err) => tracing::debug!(error = %err, "image list for telemetry"),
        }
        RuntimeFacts {
            running_sandboxes: u32::try_from(running).unwrap_or(u32::MAX),
            cached_images,
        }
    }

    /// A volume's host path, canonical, if it exists and lies under an
    /// allowed root; otherwise the reason.
    pub fn check_volume(&self, volume: &proto::VolumeMount) -> Result<Bind, CommandError> {
        let invalid = |message: String| CommandError::new(ErrorCode::InvalidArgument, message);
        let host = Path::new(&volume.host_path);
        if !host.is_absolute() || !volume.container_path.starts_with('/') {
            return Err(invalid(format!(
                "volume `{}:{}`: both paths must be absolute",
                volume.host_path, volume.container_path
            )));
        }
        if volume.container_path.contains(':') || volume.host_path.contains(':') {
            return Err(invalid(format!(
                "volume `{}` -> `{}`: paths may not contain `:`",
                volume.host_path, volume.container_path
            )));
        }
        let canonical = std::fs::canonicalize(host).map_err(|err| {
            if err.kind() == std::io::ErrorKind::NotFound {
                invalid(format!(
                    "volume host path `{}` does not exist on host {}",
                    volume.host_path, self.host_id
                ))
            } else {
                invalid(format!(
                    "volume host path `{}` cannot be used on host {}: {err}",
                    volume.host_path, self.host_id
                ))
            }
        })?;
        if self.settings.volume_roots.is_empty() {
            return Err(CommandError::new(
                ErrorCode::PermissionDenied,
                format!(
                    "volume host path `{}` is not allowed: host {} allows no volumes (set {} on its agent)",
                    volume.host_path,
                    self.host_id,
                    crate::config::VOLUME_ROOTS
                ),
            ));
        }
        if !self
            .settings
            .volume_roots
            .iter()
            .any(|root| canonical.starts_with(root))
        {
            let roots: Vec<String> = self
                .settings
                .volume_roots
                .iter()
                .map(|r| r.display().to_string())
                .collect();
            return Err(CommandError::new(
                ErrorCode::PermissionDenied,
                format!(
                    "volume host path `{}` is not allowed on host {}: it is outside the volume roots {}",
                    volume.host_path,
                    self.host_id,
                    roots.join(", ")
                ),
            ));
        }
        Ok(Bind {
            host_path: canonical.display().to_string(),
            container_path: volume.container_path.clone(),
            read_only: volume.read_only,
        })
    }

    /// The container of a sandbox: by the id the control plane holds (which
    /// must be of this scope and, when given, of this sandbox), else by the
    /// sandbox id label. None when there is none.
    async fn find(
        &self,
        sandbox_id: &str,
        container_id: &str,
    ) -> Result<Option<ContainerInfo>, CommandError> {
        if !container_id.is_empty() {
            let Some(info) = self
                .runtime
                .inspect_container(container_id)
                .await
                .map_err(runtime_error)?
            else {
                return Ok(None);
            };
            if !self.owned(&info) {
                return Err(CommandError::new(
                    ErrorCode::PermissionDenied,
                    format!(
                        "container {container_id} is not managed by this agent (runtime scope `{}`)",
                        self.settings.scope
                    ),
                ));
            }
            let labelled = info.labels.get(LABEL_SANDBOX_ID).map_or("", String::as_str);
            if !sandbox_id.is_empty() && !labelled.is_empty() && labelled != sandbox_id {
                return Err(CommandError::new(
                    ErrorCode::FailedPrecondition,
                    format!(
                        "container {container_id} belongs to sandbox {labelled}, not {sandbox_id}"
                    ),
                ));
            }
            return Ok(Some(info));
        }
        if sandbox_id.is_empty() {
            return Err(CommandError::new(
                ErrorCode::InvalidArgument,
                "neither a sandbox id nor a container id was given",
            ));
        }
        let [managed, scope] = self.scope_labels();
        let found = self
            .runtime
            .list_containers(&[managed, scope, (LABEL_SANDBOX_ID, sandbox_id)])
            .await
            .map_err(runtime_error)?;
        Ok(found.into_iter().next())
    }

    async fn must_find(
        &self,
        sandbox_id: &str,
        container_id: &str,
    ) -> Result<ContainerInfo, CommandError> {
        self.find(sandbox_id, container_id).await?.ok_or_else(|| {
            CommandError::new(
                ErrorCode::NotFound,
                format!(
                    "the container of sandbox {sandbox_id} ({}) is gone from host {}",
                    if container_id.is_empty() {
                        "-"
                    } else {
                        container_id
                    },
                    self.host_id
                ),
            )
        })
    }

    async fn inspect_runtime(&self, id: &str) -> CommandOutcome {
        let info = self
            .runtime
            .inspect_container(id)
            .await
            .map_err(runtime_error)?
            .ok_or_else(|| {
                CommandError::new(
                    ErrorCode::NotFound,
                    format!("container {id} vanished on host {}", self.host_id),
                )
            })?;
        Ok(command_result::Kind::SandboxRuntime(self.to_runtime(&info)))
    }

    async fn create(&self, create: proto::SandboxCreate) -> CommandOutcome {
        let _creating = self.creating.read().await;
        if !create.sandbox_id.starts_with("sbx_")
            || !create
                .sandbox_id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_')
        {
            return Err(CommandError::new(
                ErrorCode::InvalidArgument,
                format!("`{}` is not a sandbox id", create.sandbox_id),
            ));
        }
        if create.image.trim().is_empty() {
            return Err(CommandError::new(
                ErrorCode::InvalidArgument,
                "no image to create the sandbox from",
            ));
        }
        if let Some(existing) = self.find(&create.sandbox_id, "").await? {
            return Err(CommandError::new(
                ErrorCode::AlreadyExists,
                format!(
                    "sandbox {} already has container {} on host {}",
                    create.sandbox_id, existing.id, self.host_id
                ),
            ));
        }
        let binds = create
            .volumes
            .iter()
            .map(|v| self.check_volume(v))
            .collect::<Result<Vec<_>, _>>()?;
        self.runtime
            .ensure_network(&self.network_spec())
            .await
            .map_err(runtime_error)?;
        let mut labels: HashMap<String, String> = create
            .labels
            .iter()
            .filter(|(k, _)| !k.starts_with("io.globalstacks."))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        labels.extend([
            (LABEL_MANAGED.to_owned(), "true".to_owned()),
            (LABEL_SCOPE.to_owned(), self.settings.scope.clone()),
            (LABEL_SANDBOX_ID.to_owned(), create.sandbox_id.clone()),
            (LABEL_HOST_ID.to_owned(), self.host_id.clone()),
            (LABEL_CLUSTER_ID.to_owned(), create.cluster_id.clone()),
            (LABEL_SANDBOX_NAME.to_owned(), create.name.clone()),
        ]);
        let resources = create.resources.unwrap_or_default();
        let spec = ContainerSpec {
            name: format!("{CONTAINER_PREFIX}{}", create.sandbox_id),
            hostname: hostname_of(&create.name),
            image: create.image.clone(),
            labels,
            env: create.env.clone(),
            binds,
            memory_bytes: resources.memory_bytes,
            nano_cpus: u64::from(resources.millicpus) * 1_000_000,
            network: self.settings.docker_network.clone(),
            dns: vec![self.settings.docker_gateway()],
        };
        let id = self
            .runtime
            .create_container(&spec)
            .await
            .map_err(runtime_error)?;
        if let Err(err) = self.runtime.start_container(&id).await {
            // Leave no half-made sandbox behind: the record says why.
            if let Err(remove) = self.runtime.remove_container(&id).await {
                tracing::warn!(container = %id, error = %remove, "removing a container that did not start");
            }
            return Err(CommandError::new(
                ErrorCode::FailedPrecondition,
                format!("the container did not start: {err}"),
            ));
        }
        tracing::info!(sandbox = %create.sandbox_id, container = %id, image = %create.image, "sandbox container created");
        self.inspect_runtime(&id).await
    }

    async fn start(&self, start: proto::SandboxStart) -> CommandOutcome {
        let info = self
            .must_find(&start.sandbox_id, &start.container_id)
            .await?;
        self.runtime
            .start_container(&info.id)
            .await
            .map_err(runtime_error)?;
        self.inspect_runtime(&info.id).await
    }

    async fn stop(&self, stop: proto::SandboxStop) -> CommandOutcome {
        let info = self.must_find(&stop.sandbox_id, &stop.container_id).await?;
        let timeout = match stop.timeout_secs {
            0 => DEFAULT_STOP_TIMEOUT,
            secs => Duration::from_secs(u64::from(secs)),
        };
        self.runtime
            .stop_container(&info.id, timeout)
            .await
            .map_err(runtime_error)?;
        self.inspect_runtime(&info.id).await
    }

    async fn remove(&self, remove: proto::SandboxRemove) -> CommandOutcome {
        let gone = |container_id: String| {
            Ok(command_result::Kind::SandboxRuntime(SandboxRuntime {
                sandbox_id: remove.sandbox_id.clone(),
                container_id,
                state: "removed".to_owned(),
                network: self.settings.docker_network.clone(),
                ..Default::default()
            }))
        };
        let Some(info) = self.find(&remove.sandbox_id, &remove.container_id).await? else {
            // By id it is gone; make sure no other container of the sandbox
            // is left in this scope either.
            if remove.container_id.is_empty() {
                return gone(String::new());
            }
            if let Some(other) = self.find(&remove.sandbox_id, "").await? {
                self.remove_now(&other.id).await?;
            }
            return gone(remove.container_id.clone());
        };
        self.remove_now(&info.id).await?;
        tracing::info!(sandbox = %remove.sandbox_id, container = %info.id, "sandbox container removed");
        gone(info.id)
    }

    async fn remove_now(&self, id: &str) -> Result<(), CommandError> {
        match self.runtime.remove_container(id).await {
            Ok(()) | Err(RuntimeError::NotFound(_)) => Ok(()),
            Err(err) => Err(runtime_error(err)),
        }
    }

    async fn inspect(&self, inspect: proto::SandboxInspect) -> CommandOutcome {
        let info = self
            .must_find(&inspect.sandbox_id, &inspect.container_id)
            .await?;
        Ok(command_result::Kind::SandboxRuntime(self.to_runtime(&info)))
    }

    async fn list(&self) -> CommandOutcome {
        let _no_create_in_flight = self.creating.write().await;
        let containers = self.inventory().await.map_err(runtime_error)?;
        Ok(command_result::Kind::SandboxInventory(
            proto::SandboxInventory {
                containers: containers.iter().map(|c| self.to_runtime(c)).collect(),
                scope: self.settings.scope.clone(),
            },
        ))
    }
}

impl Module for SandboxModule {
    fn name(&self) -> &'static str {
        "sandbox"
    }

    fn handle(self: Arc<Self>, command: Command, _link: Link) -> HandlerFuture {
        Box::pin(async move {
            match command.kind {
                Some(command::Kind::SandboxCreate(c)) => self.create(c).await,
                Some(command::Kind::SandboxStart(c)) => self.start(c).await,
                Some(command::Kind::SandboxStop(c)) => self.stop(c).await,
                Some(command::Kind::SandboxRemove(c)) => self.remove(c).await,
                Some(command::Kind::SandboxInspect(c)) => self.inspect(c).await,
                Some(command::Kind::SandboxList(_)) => self.list().await,
                other => Err(CommandError::new(
                    ErrorCode::Unsupported,
                    format!(
                        "the sandbox module does not handle `{}`",
                        other
                            .as_ref()
                            .map_or("unset", |k| CommandKind::of(k).name())
                    ),
                )),
            }
        })
    }
}

#[cfg(test)]
mod tests;
