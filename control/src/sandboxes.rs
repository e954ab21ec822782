//! Sandboxes, control side: the record's lifecycle (create and place,
//! start, stop, reprovision, deprovision into `archived`), the commands that
//! carry it to the host's agent over its `Session` stream, the activity
//! history, and rediscovery when an agent (re)connects.
//!
//! The record is the control plane's; the container is the agent's. Every
//! change the agent confirms is written to the record (container id, name,
//! addresses on the agent's sandbox network, image digest), and each step is
//! an entry of the sandbox's history (`sandbox.*` events).
//!
//! Operations on one sandbox are serialised (a lock per sandbox id), so a
//! reconnect's reconciliation never interleaves with a create or a stop.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::clock::now_ms;
use crate::error::{ControlError, Result};
use crate::placement::{self, Candidate, PlacementRequest};
use crate::plane::{control_event, ControlPlane};
use crate::sessions::HostSession;
use crate::store::{
    HostStatus, Sandbox, SandboxFilter, SandboxRepo, SandboxStatus, VolumeMount, DEFAULT_CLUSTER_ID,
};
use proto::{command, command_result, EventLevel, SandboxRuntime};

/// Time the agent has to create and start a container (the image is local).
pub const CREATE_DEADLINE: Duration = Duration::from_secs(120);
/// Start, remove, inspect, list.
pub const RUNTIME_DEADLINE: Duration = Duration::from_secs(60);
/// Seconds a stopping container has before it is killed.
pub const STOP_TIMEOUT_SECS: u32 = 10;

/// Longest accepted sandbox name.
const MAX_NAME: usize = 63;

/// One lock per sandbox id, so operations on a sandbox never interleave.
#[derive(Debug, Default)]
pub struct SandboxLocks {
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

impl SandboxLocks {
    pub async fn lock(&self, id: &str) -> tokio::sync::OwnedMutexGuard<()> {
        let lock = {
            let mut locks = self
                .locks
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            // Forget locks nobody holds or waits for.
            locks.retain(|_, l| Arc::strong_count(l) > 1);
            locks.entry(id.to_owned()).or_default().clone()
        };
        lock.lock_owned().await
    }
}

/// A create request as the API receives it.
#[derive(Debug, Clone, Default)]
pub struct CreateSandbox {
    pub cluster_id: String,
    pub host_id: String,
    pub tags: Vec<String>,
    pub traits: Vec<String>,
    pub image: String,
    pub blueprint: String,
    pub repo_url: String,
    pub repo_branch: String,
    pub repo_path: String,
    pub volumes: Vec<VolumeMount>,
    pub name: String,
    pub memory_bytes: u64,
    pub millicpus: u32,
}

impl CreateSandbox {
    pub fn from_proto(request: proto::CreateSandboxRequest) -> CreateSandbox {
        let resources = request.resources.unwrap_or_default();
        CreateSandbox {
            cluster_id: request.cluster_id.trim().to_owned(),
            host_id: request.host_id.trim().to_owned(),
            tags: request.tags,
            traits: request.traits,
            image: request.image.trim().to_owned(),
            blueprint: request.blueprint.trim().to_owned(),
            repo_url: request.repo_url.trim().to_owned(),
            repo_branch: request.repo_branch.trim().to_owned(),
            repo_path: request.repo_path.trim().to_owned(),
            volumes: request
                .volumes
                .into_iter()
                .map(|v| VolumeMount {
                    host_path: v.host_path,
                    container_path: v.container_path,
                    read_only: v.read_only,
                })
                .collect(),
            name: request.name.trim().to_owned(),
            memory_bytes: resources.memory_bytes,
            millicpus: resources.millicpus,
        }
    }
}

fn invalid(message: impl Into<String>) -> ControlError {
    ControlError::InvalidArgument(message.into())
}

/// Tags and traits: non-empty, no spaces or commas, deduplicated.
fn check_labels(what: &str, items: &[String]) -> Result<Vec<String>> {
    let mut out: Vec<String> = Vec::new();
    for item in items {
        let item = item.trim();
        if item.is_empty() || item.len() > 128 {
            return Err(invalid(format!(
                "{what} `{item}` must be 1 to 128 characters"
            )));
        }
        if item.chars().any(|c| c.is_whitespace() || c == ',') {
            return Err(invalid(format!(
                "{what} `{item}` may not contain spaces or commas"
            )));
        }
        if !out.iter().any(|o| o == item) {
            out.push(item.to_owned());
        }
    }
    Ok(out)
}

/// A sandbox name: 1-63 of `[A-Za-z0-9_.-]`, starting with a letter or digit.
pub fn check_name(name: &str) -> Result<()> {
    let valid = !name.is_empty()
        && name.len() <= MAX_NAME
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if valid {
        Ok(())
    } else {
        Err(invalid(format!(
            "sandbox name `{name}` must be 1 to {MAX_NAME} letters, digits, `-`, `_` or `.`, starting with a letter or digit"
        )))
    }
}

/// A bind mount: both paths absolute, no `..`, no `:` or newline (Docker's
/// bind syntax), no mount over `/`.
pub fn check_volume(volume: &VolumeMount) -> Result<()> {
    for (what, path) in [
        ("host path", &volume.host_path),
        ("container path", &volume.container_path),
    ] {
        if !path.starts_with('/') {
            return Err(invalid(format!("volume {what} `{path}` must be absolute")));
        }
        if path.contains(':') || path.contains('\n') || path.contains('\0') {
            return Err(invalid(format!(
                "volume {what} `{path}` may not contain `:` or control characters"
            )));
        }
        if path.split('/').any(|part| part == "..") {
            return Err(invalid(format!(
                "volume {what} `{path}` may not contain `..`"
            )));
        }
    }
    if volume.container_path.trim_end_matches('/').is_empty() {
        return Err(invalid(
            "a volume cannot be mounted over the container's `/`",
        ));
    }
    Ok(())
}

/// The record's view through the API.
pub fn sandbox_view(sandbox: Sandbox) -> proto::SandboxRecord {
    proto::SandboxRecord {
        id: sandbox.id,
        cluster_id: sandbox.cluster_id,
        host_id: sandbox.host_id,
        name: sandbox.name,
        image: sandbox.image,
        image_digest: sandbox.image_digest,
        blueprint_id: sandbox.blueprint_id,
        status: sandbox.status.to_proto() as i32,
        status_message: sandbox.status_message,
        container_id: sandbox.container_id,
        container_name: sandbox.container_name,
        addresses: sandbox.addresses,
        docker_network: sandbox.docker_network,
        tags: sandbox.tags,
        traits: sandbox.traits,
        volumes: sandbox
            .volumes
            .into_iter()
            .map(|v| proto::VolumeMount {
                host_path: v.host_path,
                container_path: v.container_path,
                read_only: v.read_only,
            })
            .collect(),
        repo: Some(proto::SandboxRepo {
            url: sandbox.repo.url,
            branch: sandbox.repo.branch,
            path: sandbox.repo.path,
            status: sandbox.repo.status,
            error: sandbox.repo.error,
        }),
        resources: Some(proto::SandboxResources {
            memory_bytes: sandbox.memory_bytes,
            millicpus: sandbox.millicpus,
        }),
        created_at_ms: sandbox.created_at_ms,
        updated_at_ms: sandbox.updated_at_ms,
        archived_at_ms: sandbox.archived_at_ms,
        created_by: sandbox.created_by,
    }
}

/// Writes what the runtime reports into the record: the container handle,
/// its display name, addresses, network and image digest, and the status.
pub fn apply_runtime(sandbox: &mut Sandbox, runtime: &SandboxRuntime) {
    if !runtime.container_id.is_empty() {
        sandbox.container_id = runtime.container_id.clone();
    }
    if !runtime.container_name.is_empty() {
        sandbox.container_name = runtime.container_name.clone();
    }
    if !runtime.image_digest.is_empty() {
        sandbox.image_digest = runtime.image_digest.clone();
    }
    if !runtime.network.is_empty() {
        sandbox.docker_network = runtime.network.clone();
    }
    sandbox.addresses = if runtime.running {
        runtime.addresses.clone()
    } else {
        Vec::new()
    };
    if runtime.running {
        sandbox.status = SandboxStatus::Running;
        sandbox.status_message.clear();
    } else if !runtime.error.is_empty() {
        sandbox.status = SandboxStatus::Failed;
        sandbox.status_message = runtime.error.clone();
    } else {
        sandbox.status = SandboxStatus::Stopped;
        sandbox.status_message = match runtime.state.as_str() {
            "exited" | "dead" => format!(
                "container {} (exit code {})",
                runtime.state, runtime.exit_code
            ),
            "" => String::new(),
            state => format!("container {state}"),
        };
    }
}

/// How a reported container was matched to a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MatchedBy {
    /// The `io.globalstacks.sandbox-id` label.
    SandboxId,
    /// No sandbox id label: the container id, else the container name.
    RuntimeMetadata,
}

impl MatchedBy {
    pub fn as_str(self) -> &'static str {
        match self {
            MatchedBy::SandboxId => "sandbox_id",
            MatchedBy::RuntimeMetadata => "runtime_metadata",
        }
    }
}

/// Why a reported container was not reattached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IgnoredReason {
    Archived,
    NotFound,
}

impl IgnoredReason {
    pub fn as_str(self) -> &'static str {
        match self {
            IgnoredReason::Archived => "archived",
            IgnoredReason::NotFound => "not_found",
        }
    }
}

/// What rediscovery does with one reported container.
#[derive(Debug, Clone, PartialEq)]
pub enum Rediscovery {
    Rebind {
        /// The record as it is to be written.
        sandbox: Box<Sandbox>,
        matched_by: MatchedBy,
        /// The host that managed the sandbox before, when it was another.
        transferred_from: Option<String>,
        /// Host, container id or name changed.
        changed: bool,
        /// The status before (differs from the record's when the container
        /// changed state behind the control plane's back).
        previous_status: SandboxStatus,
    },
    Ignored {
        /// The sandbox id of the label or of the archived record (empty when
        /// none is known).
        sandbox_id: String,
        reason: IgnoredReason,
    },
}

/// Rediscovery's precedence for one container reported by `host_id`: the
/// sandbox id label first; without it, the container id, then the
/// container name (runtime metadata). Archived records are not reattached;
/// unknown containers are ignored. `by_id` and `by_container` are the
/// store's lookups.
pub fn rediscover(
    host_id: &str,
    runtime: &SandboxRuntime,
    by_id: impl FnOnce(&str) -> Result<Option<Sandbox>>,
    by_container: impl FnOnce(&str, &str) -> Result<Option<Sandbox>>,
) -> Result<Rediscovery> {
    let (found, matched_by) = if runtime.sandbox_id.is_empty() {
        (
            by_container(&runtime.container_id, &runtime.container_name)?,
            MatchedBy::RuntimeMetadata,
        )
    } else {
        (by_id(&runtime.sandbox_id)?, MatchedBy::SandboxId)
    };
    let Some(found) = found else {
        return Ok(Rediscovery::Ignored {
            sandbox_id: runtime.sandbox_id.clone(),
            reason: IgnoredReason::NotFound,
        });
    };
    if found.status == SandboxStatus::Archived {
        return Ok(Rediscovery::Ignored {
            sandbox_id: found.id,
            reason: IgnoredReason::Archived,
        });
    }
    let mut sandbox = found.clone();
    let transferred_from = (sandbox.host_id != host_id).then(|| sandbox.host_id.clone());
    sandbox.host_id = host_id.to_owned();
    apply_runtime(&mut sandbox, runtime);
    let changed = sandbox.host_id != found.host_id
        || sandbox.container_id != found.container_id
        || sandbox.container_name != found.container_name;
    Ok(Rediscovery::Rebind {
        sandbox: Box::new(sandbox),
        matched_by,
        transferred_from,
        changed,
        previous_status: found.status,
    })
}

fn fields(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs
        .iter()
        .filter(|(_, v)| !v.is_empty())
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

fn runtime_of(result: proto::CommandResult, what: &str) -> Result<SandboxRuntime> {
    match result.kind {
        Some(command_result::Kind::SandboxRuntime(runtime)) => Ok(runtime),
        other => Err(ControlError::InvalidArgument(format!(
            "the agent answered `{what}` with an unexpected result: {other:?}"
        ))),
    }
}

/// A failed command: did the host drop (outcome unknown) or did the agent
/// answer with an error?
fn lost_contact(err: &ControlError) -> bool {
    matches!(
        err,
        ControlError::SessionClosed(_) | ControlError::CommandTimeout { .. }
    )
}

/// The message of an agent's error, or the whole error.
fn agent_message(err: &ControlError) -> String {
    match err {
        ControlError::Agent { message, .. } => message.clone(),
        other => other.to_string(),
    }
}

impl ControlPlane {
    /// Stores an entry of the sandbox's history. A failure is logged: the
    /// history must never fail an operation that the runtime carried out.
    pub fn record_sandbox_event(
        &self,
        sandbox: &Sandbox,
        kind: &str,
        level: EventLevel,
        message: String,
        extra: &[(&str, &str)],
    ) {
        let mut event = control_event(kind, level, message);
        event.fields = fields(extra);
        event
            .fields
            .insert("host_id".to_owned(), sandbox.host_id.clone());
        if let Err(err) = self.store.append_sandbox_event(&sandbox.id, &event) {
            tracing::warn!(sandbox = %sandbox.id, kind, error = %err, "sandbox event not stored");
        }
    }

    pub(crate) fn save_sandbox(&self, sandbox: &mut Sandbox) -> Result<()> {
        sandbox.updated_at_ms = now_ms().max(sandbox.updated_at_ms);
        if !self.store.update_sandbox(sandbox)? {
            return Err(ControlError::SandboxNotFound(sandbox.id.clone()));
        }
        Ok(())
    }

    /// The sandbox, or a not-found error naming it.
    pub fn sandbox_record(&self, id: &str) -> Result<Sandbox> {
        self.store
            .sandbox(id.trim())?
            .ok_or_else(|| ControlError::SandboxNotFound(id.trim().to_owned()))
    }

    /// The open stream of the sandbox's host, or why there is none.
    pub(crate) fn sandbox_host(&self, sandbox: &Sandbox, action: &str) -> Result<Arc<HostSession>> {
        let host = self
            .store
            .host(&sandbox.host_id)?
            .ok_or_else(|| ControlError::HostNotFound(sandbox.host_id.clone()))?;
        match (host.status, self.sessions.get(&host.id)) {
            (HostStatus::Connected, Some(session)) => Ok(session),
            (status, _) => Err(ControlError::SandboxHostUnavailable {
                sandbox: sandbox.id.clone(),
                host: host.id,
                status: if status == HostStatus::NoToken {
                    "no_token"
                } else {
                    "disconnected"
                },
                action: action.to_owned(),
            }),
        }
    }

    pub(crate) fn refuse_archived(sandbox: &Sandbox, action: &str) -> Result<()> {
        if sandbox.status == SandboxStatus::Archived {
            return Err(ControlError::SandboxArchived {
                id: sandbox.id.clone(),
                action: action.to_owned(),
            });
        }
        Ok(())
    }

    /// Validates, places, records, and has the host's agent create and start
    /// the container. The record is returned in every case it was made:
    /// `running`; `failed` with the agent's (engine's) message; or still
    /// `provisioning` when the host dropped before it answered (reconciled
    /// when it reconnects).
    pub async fn create_sandbox(&self, request: CreateSandbox, who: &str) -> Result<Sandbox> {
        if !request.image.is_empty() && !request.blueprint.is_empty() {
            return Err(invalid(
                "give --image or --blueprint, not both: they are mutually exclusive",
            ));
        }
        if !request.blueprint.is_empty() {
            return Err(ControlError::BlueprintNotFound(request.blueprint));
        }
        let image = if request.image.is_empty() {
            self.settings.default_image.clone().ok_or_else(|| {
                invalid("no --image given and the control plane has no default image (gstacks-control serve --default-image REF)")
            })?
        } else {
            request.image.clone()
        };
        if image.chars().any(char::is_whitespace) || image.len() > 512 {
            return Err(invalid(format!("image reference `{image}` is not valid")));
        }
        let tags = check_labels("tag", &request.tags)?;
        let traits = check_labels("trait", &request.traits)?;
        for volume in &request.volumes {
            check_volume(volume)?;
        }
        let mut targets = HashSet::new();
        for volume in &request.volumes {
            if !targets.insert(volume.container_path.trim_end_matches('/')) {
                return Err(invalid(format!(
                    "two volumes are mounted at `{}`",
                    volume.container_path
                )));
            }
        }
        if request.repo_url.is_empty()
            && !(request.repo_branch.is_empty() && request.repo_path.is_empty())
        {
            return Err(invalid("--repo-branch and --repo-path need --repo-url"));
        }
        if !request.repo_path.is_empty() && !request.repo_path.starts_with('/') {
            return Err(invalid(format!(
                "--repo-path `{}` must be an absolute path in the container",
                request.repo_path
            )));
        }
        let id = crate::secret::new_id("sbx");
        let name = if request.name.is_empty() {
            id.clone()
        } else {
            check_name(&request.name)?;
            request.name.clone()
        };
        let cluster_id = if request.cluster_id.is_empty() {
            DEFAULT_CLUSTER_ID.to_owned()
        } else {
            request.cluster_id.clone()
        };
        if self.store.cluster(&cluster_id)?.is_none() {
            return Err(ControlError::ClusterNotFound(cluster_id));
        }
        let memory_bytes = if request.memory_bytes == 0 {
            self.settings.sandbox_memory_bytes
        } else {
            request.memory_bytes
        };

        let mut hosts = self.store.hosts(Some(&cluster_id))?;
        if !request.host_id.is_empty() && !hosts.iter().any(|h| h.id == request.host_id) {
            // Named but not in the cluster: say which.
            match self.store.host(&request.host_id)? {
                Some(host) => hosts.push(host),
                None => return Err(ControlError::HostNotFound(request.host_id.clone())),
            }
        }
        let mut active: HashMap<String, u32> = HashMap::new();
        for sandbox in self.store.sandboxes(&SandboxFilter::live())? {
            if sandbox.status.is_active() {
                *active.entry(sandbox.host_id).or_default() += 1;
            }
        }
        let candidates: Vec<Candidate<'_>> = hosts
            .iter()
            .map(|host| Candidate {
                host,
                stream_open: self.sessions.get(&host.id).is_some(),
                active_sandboxes: active.get(&host.id).copied().unwrap_or(0),
            })
            .collect();
        let placement_request = PlacementRequest {
            cluster_id: cluster_id.clone(),
            host_id: (!request.host_id.is_empty()).then(|| request.host_id.clone()),
            tags: tags.clone(),
            traits: traits.clone(),
            image: image.clone(),
            memory_bytes,
        };
        let placed = placement::place(&placement_request, &candidates)
            .map_err(|no_host| ControlError::NoHost(no_host.to_string()))?;

        let now = now_ms();
        let mut sandbox = Sandbox {
            id: id.clone(),
            cluster_id,
            host_id: placed.host_id.clone(),
            name,
            image,
            image_digest: String::new(),
            blueprint_id: String::new(),
            status: SandboxStatus::Provisioning,
            status_message: String::new(),
            container_id: String::new(),
            container_name: String::new(),
            addresses: Vec::new(),
            docker_network: String::new(),
            tags,
            traits,
            volumes: request.volumes.clone(),
            repo: SandboxRepo {
                status: if request.repo_url.is_empty() {
                    String::new()
                } else {
                    "pending".to_owned()
                },
                url: request.repo_url.clone(),
                branch: request.repo_branch.clone(),
                path: request.repo_path.clone(),
                error: String::new(),
            },
            memory_bytes,
            millicpus: request.millicpus,
            created_by: who.to_owned(),
            created_at_ms: now,
            updated_at_ms: now,
            archived_at_ms: 0,
        };
        let _guard = self.sandbox_locks.lock(&id).await;
        self.store.insert_sandbox(&sandbox)?;
        self.record_sandbox_event(
            &sandbox,
            "sandbox.created",
            EventLevel::Info,
            format!(
                "placed on host {}{} by {who}; image {}",
                sandbox.host_id,
                if placed.image_cached {
                    " (image cached there)"
                } else {
                    ""
                },
                sandbox.image
            ),
            &[
                ("image", &sandbox.image),
                (
                    "image_cached",
                    if placed.image_cached { "true" } else { "false" },
                ),
                ("requested_by", who),
            ],
        );
        tracing::info!(sandbox = %sandbox.id, host = %sandbox.host_id, image = %sandbox.image, "sandbox placed");
        self.provision(&mut sandbox, "create").await?;
        Ok(sandbox)
    }

    /// Has the agent create and start the record's container, and writes
    /// the outcome into the record.
    async fn provision(&self, sandbox: &mut Sandbox, action: &str) -> Result<()> {
        let session = match self.sandbox_host(sandbox, action) {
            Ok(session) => session,
            Err(err) => {
                sandbox.status_message = format!("{err}; reconciled when the host reconnects");
                self.save_sandbox(sandbox)?;
                self.record_sandbox_event(
                    sandbox,
                    "sandbox.create.interrupted",
                    EventLevel::Warn,
                    sandbox.status_message.clone(),
                    &[],
                );
                return Ok(());
            }
        };
        let command = command::Kind::SandboxCreate(proto::SandboxCreate {
            sandbox_id: sandbox.id.clone(),
            cluster_id: sandbox.cluster_id.clone(),
            name: sandbox.name.clone(),
            image: sandbox.image.clone(),
            volumes: sandbox
                .volumes
                .iter()
                .map(|v| proto::VolumeMount {
                    host_path: v.host_path.clone(),
                    container_path: v.container_path.clone(),
                    read_only: v.read_only,
                })
                .collect(),
            resources: Some(proto::SandboxResources {
                memory_bytes: sandbox.memory_bytes,
                millicpus: sandbox.millicpus,
            }),
            env: Vec::new(),
            labels: HashMap::new(),
        });
        match session.request(command, CREATE_DEADLINE).await {
            Ok(result) => {
                let runtime = runtime_of(result, "sandbox_create")?;
                sandbox.status = SandboxStatus::Provisioning;
                apply_runtime(sandbox, &runtime);
                self.save_sandbox(sandbox)?;
                let (kind, level) = match sandbox.status {
                    SandboxStatus::Running => ("sandbox.running", EventLevel::Info),
                    SandboxStatus::Failed => ("sandbox.failed", EventLevel::Error),
                    _ => ("sandbox.stopped", EventLevel::Warn),
                };
                self.record_sandbox_event(
                    sandbox,
                    kind,
                    level,
                    format!(
                        "container {} ({}) {}{}",
                        short(&sandbox.container_id),
                        sandbox.container_name,
                        sandbox.status.as_str(),
                        if sandbox.addresses.is_empty() {
                            String::new()
                        } else {
                            format!(" at {}", sandbox.addresses.join(", "))
                        }
                    ),
                    &[
                        ("container", &sandbox.container_id),
                        ("container_name", &sandbox.container_name),
                        ("image_digest", &sandbox.image_digest),
                    ],
                );
            }
            Err(err) if lost_contact(&err) => {
                sandbox.status_message = format!(
                    "host {} did not confirm the {action} ({err}); reconciled when it reconnects",
                    sandbox.host_id
                );
                self.save_sandbox(sandbox)?;
                self.record_sandbox_event(
                    sandbox,
                    "sandbox.create.interrupted",
                    EventLevel::Warn,
                    sandbox.status_message.clone(),
                    &[],
                );
            }
            Err(err) => {
                sandbox.status = SandboxStatus::Failed;
                sandbox.status_message = agent_message(&err);
                sandbox.addresses.clear();
                self.save_sandbox(sandbox)?;
                self.record_sandbox_event(
                    sandbox,
                    "sandbox.failed",
                    EventLevel::Error,
                    format!("{action} failed: {}", sandbox.status_message),
                    &[],
                );
            }
        }
        Ok(())
    }

    /// Starts the sandbox's container (stopped -> running).
    pub async fn start_sandbox(&self, id: &str, who: &str) -> Result<Sandbox> {
        let _guard = self.sandbox_locks.lock(id.trim()).await;
        let mut sandbox = self.sandbox_record(id)?;
        Self::refuse_archived(&sandbox, "started")?;
        if sandbox.container_id.is_empty() {
            return Err(ControlError::SandboxNoContainer {
                id: sandbox.id.clone(),
                status: sandbox.status.as_str(),
            });
        }
        let session = self.sandbox_host(&sandbox, "started")?;
        let result = session
            .request(
                command::Kind::SandboxStart(proto::SandboxStart {
                    sandbox_id: sandbox.id.clone(),
                    container_id: sandbox.container_id.clone(),
                }),
                RUNTIME_DEADLINE,
            )
            .await;
        self.after_runtime_command(&mut sandbox, result, "start", who)?;
        Ok(sandbox)
    }

    /// Stops the sandbox's container (running -> stopped).
    pub async fn stop_sandbox(&self, id: &str, who: &str) -> Result<Sandbox> {
        let _guard = self.sandbox_locks.lock(id.trim()).await;
        let mut sandbox = self.sandbox_record(id)?;
        Self::refuse_archived(&sandbox, "stopped")?;
        if sandbox.container_id.is_empty() {
            return Err(ControlError::SandboxNoContainer {
                id: sandbox.id.clone(),
                status: sandbox.status.as_str(),
            });
        }
        let session = self.sandbox_host(&sandbox, "stopped")?;
        let result = session
            .request(
                command::Kind::SandboxStop(proto::SandboxStop {
                    sandbox_id: sandbox.id.clone(),
                    container_id: sandbox.container_id.clone(),
                    timeout_secs: STOP_TIMEOUT_SECS,
                }),
                RUNTIME_DEADLINE + Duration::from_secs(u64::from(STOP_TIMEOUT_SECS)),
            )
            .await;
        self.after_runtime_command(&mut sandbox, result, "stop", who)?;
        Ok(sandbox)
    }

    /// Writes a start/stop outcome into the record and its history. A
    /// container the agent no longer finds fails the sandbox.
    fn after_runtime_command(
        &self,
        sandbox: &mut Sandbox,
        result: Result<proto::CommandResult>,
        action: &str,
        who: &str,
    ) -> Result<()> {
        let result = match result {
            Ok(result) => result,
            Err(ControlError::Agent {
                code: proto::ErrorCode::NotFound,
                message,
                ..
            }) => {
                sandbox.status = SandboxStatus::Failed;
                sandbox.status_message = message;
                sandbox.addresses.clear();
                self.save_sandbox(sandbox)?;
                self.record_sandbox_event(
                    sandbox,
                    "sandbox.failed",
                    EventLevel::Error,
                    format!("{action} by {who}: {}", sandbox.status_message),
                    &[("container", &sandbox.container_id)],
                );
                return Ok(());
            }
            Err(err) => return Err(err),
        };
        let runtime = runtime_of(result, action)?;
        apply_runtime(sandbox, &runtime);
        self.save_sandbox(sandbox)?;
        let kind = match sandbox.status {
            SandboxStatus::Running => "sandbox.started",
            SandboxStatus::Stopped => "sandbox.stopped",
            _ => "sandbox.failed",
        };
        self.record_sandbox_event(
            sandbox,
            kind,
            EventLevel::Info,
            format!(
                "{action} by {who}: container {} {}",
                short(&sandbox.container_id),
                sandbox.status.as_str()
            ),
            &[("container", &sandbox.container_id), ("requested_by", who)],
        );
        Ok(())
    }

    /// Removes the container and creates it again from the record, on the
    /// same host.
    pub async fn reprovision_sandbox(&self, id: &str, who: &str) -> Result<Sandbox> {
        let _guard = self.sandbox_locks.lock(id.trim()).await;
        let mut sandbox = self.sandbox_record(id)?;
        Self::refuse_archived(&sandbox, "reprovisioned")?;
        let session = self.sandbox_host(&sandbox, "reprovisioned")?;
        session
            .request(
                command::Kind::SandboxRemove(proto::SandboxRemove {
                    sandbox_id: sandbox.id.clone(),
                    container_id: sandbox.container_id.clone(),
                }),
                RUNTIME_DEADLINE,
            )
            .await?;
        let old = std::mem::take(&mut sandbox.container_id);
        sandbox.container_name.clear();
        sandbox.addresses.clear();
        sandbox.status = SandboxStatus::Provisioning;
        sandbox.status_message.clear();
        if !sandbox.repo.url.is_empty() {
            sandbox.repo.status = "pending".to_owned();
            sandbox.repo.error.clear();
        }
        self.save_sandbox(&mut sandbox)?;
        self.record_sandbox_event(
            &sandbox,
            "sandbox.reprovisioning",
            EventLevel::Info,
            format!("reprovision by {who}: container {} removed", short(&old)),
            &[("old_container", &old), ("requested_by", who)],
        );
        self.provision(&mut sandbox, "reprovision").await?;
        Ok(sandbox)
    }

    /// Removes the container through the agent, then archives the record.
    /// Refused while the host cannot confirm the removal.
    pub async fn deprovision_sandbox(&self, id: &str, who: &str) -> Result<Sandbox> {
        let _guard = self.sandbox_locks.lock(id.trim()).await;
        let mut sandbox = self.sandbox_record(id)?;
        Self::refuse_archived(&sandbox, "deprovisioned")?;
        let session = self.sandbox_host(&sandbox, "deprovisioned")?;
        session
            .request(
                command::Kind::SandboxRemove(proto::SandboxRemove {
                    sandbox_id: sandbox.id.clone(),
                    container_id: sandbox.container_id.clone(),
                }),
                RUNTIME_DEADLINE,
            )
            .await?;
        let now = now_ms();
        sandbox.status = SandboxStatus::Archived;
        sandbox.status_message = format!("deprovisioned by {who}");
        sandbox.addresses.clear();
        sandbox.archived_at_ms = now;
        self.save_sandbox(&mut sandbox)?;
        self.record_sandbox_event(
            &sandbox,
            "sandbox.deprovisioned",
            EventLevel::Info,
            format!(
                "deprovisioned by {who}: container {} removed, record archived",
                short(&sandbox.container_id)
            ),
            &[("container", &sandbox.container_id), ("requested_by", who)],
        );
        tracing::info!(sandbox = %sandbox.id, "sandbox archived");
        Ok(sandbox)
    }

    /// After a hello: asks the agent for every managed container of its
    /// scope, rebinds them to their records (rediscovery), settles the
    /// records of this host whose container is gone, and starts the
    /// repository clones still due.
    pub async fn reconcile_sandboxes(self: &Arc<Self>, session: Arc<HostSession>) {
        let host_id = session.host_id.clone();
        let asked_at = now_ms();
        let inventory = match session
            .request(
                command::Kind::SandboxList(proto::SandboxList {}),
                RUNTIME_DEADLINE,
            )
            .await
        {
            Ok(proto::CommandResult {
                kind: Some(command_result::Kind::SandboxInventory(inventory)),
            }) => inventory,
            Ok(other) => {
                tracing::warn!(host = %host_id, result = ?other, "unexpected answer to sandbox_list");
                return;
            }
            Err(err) => {
                // An agent without a runtime (or an older one): nothing to
                // reconcile, and nothing is marked gone on its account.
                tracing::debug!(host = %host_id, error = %err, "sandboxes not reconciled");
                return;
            }
        };
        let mut seen = HashSet::new();
        for runtime in &inventory.containers {
            seen.insert(runtime.container_id.clone());
            if let Err(err) = self.rediscover_one(&host_id, runtime).await {
                tracing::warn!(host = %host_id, container = %runtime.container_id, error = %err, "rediscovery failed");
            }
        }
        if let Err(err) = self.settle_missing(&host_id, &seen, asked_at).await {
            tracing::warn!(host = %host_id, error = %err, "missing containers not settled");
        }
        // Clones cut off by the disconnection, or of creates that were
        // reconciled to running, start (again).
        crate::sandbox_io::resume_repo_bootstraps(self, &host_id);
    }

    async fn rediscover_one(&self, host_id: &str, runtime: &SandboxRuntime) -> Result<()> {
        let lock_id = if runtime.sandbox_id.is_empty() {
            format!("container:{}", runtime.container_id)
        } else {
            runtime.sandbox_id.clone()
        };
        let _guard = self.sandbox_locks.lock(&lock_id).await;
        let decision = rediscover(
            host_id,
            runtime,
            |id| self.store.sandbox(id),
            |cid, name| self.store.sandbox_by_container(cid, name),
        )?;
        match decision {
            Rediscovery::Rebind {
                mut sandbox,
                matched_by,
                transferred_from,
                changed,
                previous_status,
            } => {
                let unchanged = !changed
                    && previous_status == sandbox.status
                    && transferred_from.is_none()
                    && self.store.sandbox(&sandbox.id)?.as_ref() == Some(&*sandbox);
                if unchanged {
                    return Ok(());
                }
                self.save_sandbox(&mut sandbox)?;
                if let Some(previous) = &transferred_from {
                    self.record_sandbox_event(
                        &sandbox,
                        "sandbox.ownership.transferred",
                        EventLevel::Warn,
                        format!("host {host_id} now manages the sandbox (was {previous})"),
                        &[("from_host", previous), ("to_host", host_id)],
                    );
                }
                if changed {
                    self.record_sandbox_event(
                        &sandbox,
                        "sandbox.rediscovered",
                        EventLevel::Info,
                        format!(
                            "container {} ({}) found on host {host_id} by {}: {}",
                            short(&sandbox.container_id),
                            sandbox.container_name,
                            matched_by.as_str(),
                            sandbox.status.as_str()
                        ),
                        &[
                            ("container", &sandbox.container_id),
                            ("container_name", &sandbox.container_name),
                            ("matched_by", matched_by.as_str()),
                        ],
                    );
                } else if previous_status != sandbox.status {
                    let message = if sandbox.status_message.is_empty() {
                        format!(
                            "{} -> {}",
                            previous_status.as_str(),
                            sandbox.status.as_str()
                        )
                    } else {
                        format!(
                            "{} -> {} ({})",
                            previous_status.as_str(),
                            sandbox.status.as_str(),
                            sandbox.status_message
                        )
                    };
                    self.record_sandbox_event(
                        &sandbox,
                        "sandbox.status.changed",
                        EventLevel::Warn,
                        message,
                        &[
                            ("container", &sandbox.container_id),
                            ("from", previous_status.as_str()),
                            ("to", sandbox.status.as_str()),
                        ],
                    );
                }
            }
            Rediscovery::Ignored { sandbox_id, reason } => {
                let message = format!(
                    "container {} ({}) not reattached: {}",
                    short(&runtime.container_id),
                    runtime.container_name,
                    match reason {
                        IgnoredReason::Archived => format!("sandbox {sandbox_id} is archived"),
                        IgnoredReason::NotFound if sandbox_id.is_empty() =>
                            "no sandbox record matches it".to_owned(),
                        IgnoredReason::NotFound => format!("no sandbox {sandbox_id}"),
                    }
                );
                let mut event =
                    control_event("sandbox.rediscovery.ignored", EventLevel::Warn, message);
                event.fields = fields(&[
                    ("reason", reason.as_str()),
                    ("sandbox_id", &sandbox_id),
                    ("container", &runtime.container_id),
                    ("container_name", &runtime.container_name),
                ]);
                if reason == IgnoredReason::Archived {
                    if let Err(err) = self.store.append_sandbox_event(&sandbox_id, &event) {
                        tracing::warn!(sandbox = %sandbox_id, error = %err, "sandbox event not stored");
                    }
                }
                self.record_event(host_id, event);
            }
        }
        Ok(())
    }

    /// Records of this host whose container the agent did not report: a
    /// create that never reached the agent fails; a container removed
    /// behind the control plane's back fails the sandbox. Records changed
    /// after the list was asked for are left alone (their operation is
    /// newer than the list).
    async fn settle_missing(
        &self,
        host_id: &str,
        seen: &HashSet<String>,
        asked_at: i64,
    ) -> Result<()> {
        let live = self.store.sandboxes(&SandboxFilter {
            host_id: Some(host_id.to_owned()),
            statuses: vec![
                SandboxStatus::Provisioning,
                SandboxStatus::Running,
                SandboxStatus::Stopped,
            ],
            ..SandboxFilter::default()
        })?;
        for stale in live {
            let _guard = self.sandbox_locks.lock(&stale.id).await;
            let Some(mut sandbox) = self.store.sandbox(&stale.id)? else {
                continue;
            };
            if sandbox.host_id != host_id
                || sandbox.updated_at_ms >= asked_at
                || !matches!(
                    sandbox.status,
                    SandboxStatus::Provisioning | SandboxStatus::Running | SandboxStatus::Stopped
                )
                || (!sandbox.container_id.is_empty() && seen.contains(&sandbox.container_id))
            {
                continue;
            }
            let message = if sandbox.container_id.is_empty() {
                format!("host {host_id} reconnected without a container for it: the create did not happen")
            } else {
                format!(
                    "container {} is gone from host {host_id}",
                    short(&sandbox.container_id)
                )
            };
            sandbox.status = SandboxStatus::Failed;
            sandbox.status_message = message.clone();
            sandbox.addresses.clear();
            self.save_sandbox(&mut sandbox)?;
            self.record_sandbox_event(
                &sandbox,
                "sandbox.failed",
                EventLevel::Error,
                message,
                &[("container", &sandbox.container_id)],
            );
        }
        Ok(())
    }
}

/// The first 12 characters of a container id, as Docker shows it.
pub fn short(container_id: &str) -> &str {
    if container_id.is_empty() {
        return "-";
    }
    container_id.get(..12).unwrap_or(container_id)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: &str, host: &str, status: SandboxStatus) -> Sandbox {
        Sandbox {
            id: id.to_owned(),
            cluster_id: DEFAULT_CLUSTER_ID.to_owned(),
            host_id: host.to_owned(),
            name: id.to_owned(),
            image: "img:1".into(),
            image_digest: String::new(),
            blueprint_id: String::new(),
            status,
            status_message: String::new(),
            container_id: format!("c-{id}"),
            container_name: format!("gstacks-{id}"),
            addresses: Vec::new(),
            docker_network: String::new(),
            tags: Vec::new(),
            traits: Vec::new(),
            volumes: Vec::new(),
            repo: SandboxRepo::default(),
            memory_bytes: 0,
            millicpus: 0,
            created_by: String::new(),
            created_at_ms: 1,
            updated_at_ms: 1,
            archived_at_ms: 0,
        }
    }

    fn runtime(sandbox_id: &str, container_id: &str, name: &str) -> SandboxRuntime {
        SandboxRuntime {
            sandbox_id: sandbox_id.to_owned(),
            container_id: container_id.to_owned(),
            container_name: name.to_owned(),
            state: "running".into(),
            running: true,
            addresses: vec!["10.213.0.7".into()],
            network: "gstacks-test".into(),
            image_digest: "sha256:abc".into(),
            ..Default::default()
        }
    }

    /// An in-memory store of records for the lookups.
    struct Records(Vec<Sandbox>);

    impl Records {
        fn decide(&self, host: &str, rt: &SandboxRuntime) -> Rediscovery {
            rediscover(
                host,
                rt,
                |id| Ok(self.0.iter().find(|s| s.id == id).cloned()),
                |cid, name| {
                    Ok(self
                        .0
                        .iter()
                        .find(|s| !cid.is_empty() && s.container_id == cid)
                        .or_else(|| {
                            self.0
                                .iter()
                                .find(|s| !name.is_empty() && s.container_name == name)
                        })
                        .cloned())
                },
            )
            .unwrap()
        }
    }

    #[test]
    fn sandbox_id_label_wins_over_runtime_metadata() {
        let records = Records(vec![
            record("sbx_a", "hst_old", SandboxStatus::Running),
            record("sbx_b", "hst_old", SandboxStatus::Running),
        ]);
        // Labelled sbx_a, but carrying sbx_b's container id and name.
        let rt = runtime("sbx_a", "c-sbx_b", "gstacks-sbx_b");
        match records.decide("hst_new", &rt) {
            Rediscovery::Rebind {
                sandbox,
                matched_by,
                transferred_from,
                changed,
                ..
            } => {
                assert_eq!(sandbox.id, "sbx_a");
                assert_eq!(matched_by, MatchedBy::SandboxId);
                assert_eq!(transferred_from.as_deref(), Some("hst_old"));
                assert!(changed);
                assert_eq!(sandbox.host_id, "hst_new");
                assert_eq!(sandbox.container_id, "c-sbx_b");
                assert_eq!(sandbox.container_name, "gstacks-sbx_b");
                assert_eq!(sandbox.addresses, ["10.213.0.7"]);
                assert_eq!(sandbox.image_digest, "sha256:abc");
            }
            other => panic!("{other:?}"),
        }
        // A label naming an unknown sandbox is not matched by metadata.
        let rt = runtime("sbx_gone", "c-sbx_b", "gstacks-sbx_b");
        assert_eq!(
            records.decide("hst_new", &rt),
            Rediscovery::Ignored {
                sandbox_id: "sbx_gone".into(),
                reason: IgnoredReason::NotFound
            }
        );
    }

    #[test]
    fn without_a_label_container_id_then_name() {
        let mut renamed = record("sbx_b", "hst_a", SandboxStatus::Stopped);
        renamed.container_id = "old-id".into();
        let records = Records(vec![
            record("sbx_a", "hst_a", SandboxStatus::Running),
            renamed,
        ]);
        let by_id = records.decide("hst_a", &runtime("", "c-sbx_a", "renamed"));
        match by_id {
            Rediscovery::Rebind {
                sandbox,
                matched_by,
                transferred_from,
                changed,
                ..
            } => {
                assert_eq!(sandbox.id, "sbx_a");
                assert_eq!(matched_by, MatchedBy::RuntimeMetadata);
                assert_eq!(transferred_from, None);
                // The name is display metadata, refreshed.
                assert_eq!(sandbox.container_name, "renamed");
                assert!(changed);
            }
            other => panic!("{other:?}"),
        }
        let by_name = records.decide("hst_a", &runtime("", "new-id", "gstacks-sbx_b"));
        match by_name {
            Rediscovery::Rebind { sandbox, .. } => {
                assert_eq!(sandbox.id, "sbx_b");
                assert_eq!(sandbox.container_id, "new-id");
                assert_eq!(sandbox.status, SandboxStatus::Running);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            records.decide("hst_a", &runtime("", "x", "y")),
            Rediscovery::Ignored {
                sandbox_id: String::new(),
                reason: IgnoredReason::NotFound
            }
        );
    }

    #[test]
    fn archived_sandboxes_are_not_reattached() {
        let records = Records(vec![record("sbx_a", "hst_a", SandboxStatus::Archived)]);
        for rt in [
            runtime("sbx_a", "c-sbx_a", ""),
            runtime("", "c-sbx_a", ""),
            runtime("", "", "gstacks-sbx_a"),
        ] {
            assert_eq!(
                records.decide("hst_b", &rt),
                Rediscovery::Ignored {
                    sandbox_id: "sbx_a".into(),
                    reason: IgnoredReason::Archived
                }
            );
        }
    }

    #[test]
    fn unchanged_binding_is_not_news() {
        let mut same = record("sbx_a", "hst_a", SandboxStatus::Running);
        same.addresses = vec!["10.213.0.7".into()];
        let records = Records(vec![same]);
        match records.decide("hst_a", &runtime("sbx_a", "c-sbx_a", "gstacks-sbx_a")) {
            Rediscovery::Rebind {
                changed,
                transferred_from,
                previous_status,
                sandbox,
                ..
            } => {
                assert!(!changed);
                assert!(transferred_from.is_none());
                assert_eq!(previous_status, sandbox.status);
            }
            other => panic!("{other:?}"),
        }
        // The container stopped on its own: same binding, new status.
        let mut exited = runtime("sbx_a", "c-sbx_a", "gstacks-sbx_a");
        exited.running = false;
        exited.state = "exited".into();
        match records.decide("hst_a", &exited) {
            Rediscovery::Rebind {
                changed,
                previous_status,
                sandbox,
                ..
            } => {
                assert!(!changed);
                assert_eq!(previous_status, SandboxStatus::Running);
                assert_eq!(sandbox.status, SandboxStatus::Stopped);
                assert!(sandbox.addresses.is_empty());
            }
            other => panic!("{other:?}"),
        }
        // A provisioning record whose create was interrupted becomes running.
        let records = Records(vec![{
            let mut r = record("sbx_a", "hst_a", SandboxStatus::Provisioning);
            r.container_id.clear();
            r.container_name.clear();
            r
        }]);
        match records.decide("hst_a", &runtime("sbx_a", "c1", "gstacks-sbx_a")) {
            Rediscovery::Rebind {
                sandbox, changed, ..
            } => {
                assert!(changed);
                assert_eq!(sandbox.status, SandboxStatus::Running);
                assert_eq!(sandbox.container_id, "c1");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn runtime_states_map_to_statuses() {
        let mut s = record("sbx_a", "hst_a", SandboxStatus::Provisioning);
        let mut rt = runtime("sbx_a", "c1", "n");
        apply_runtime(&mut s, &rt);
        assert_eq!(s.status, SandboxStatus::Running);
        assert_eq!(s.addresses, ["10.213.0.7"]);
        rt.running = false;
        rt.state = "exited".into();
        rt.exit_code = 137;
        apply_runtime(&mut s, &rt);
        assert_eq!(s.status, SandboxStatus::Stopped);
        assert!(s.addresses.is_empty());
        assert_eq!(s.status_message, "container exited (exit code 137)");
        rt.error = "OCI runtime create failed".into();
        apply_runtime(&mut s, &rt);
        assert_eq!(s.status, SandboxStatus::Failed);
        assert_eq!(s.status_message, "OCI runtime create failed");
    }

    #[test]
    fn input_checks() {
        assert!(check_name("web-1.dev_x").is_ok());
        for bad in ["", "-x", "a b", "a/b", &"x".repeat(64)] {
            assert!(check_name(bad).is_err(), "{bad}");
        }
        let v = |h: &str, c: &str| VolumeMount {
            host_path: h.into(),
            container_path: c.into(),
            read_only: false,
        };
        assert!(check_volume(&v("/srv/data", "/data")).is_ok());
        let err = check_volume(&v("srv", "/data")).unwrap_err().to_string();
        assert!(err.contains("host path `srv` must be absolute"), "{err}");
        assert!(check_volume(&v("/srv", "data")).is_err());
        assert!(check_volume(&v("/srv/../etc", "/data")).is_err());
        assert!(check_volume(&v("/srv:x", "/data")).is_err());
        assert!(check_volume(&v("/srv", "/")).is_err());
        assert_eq!(
            check_labels("tag", &["a".into(), "a".into(), " b ".into()]).unwrap(),
            ["a", "b"]
        );
        assert!(check_labels("tag", &["a b".into()]).is_err());
        assert!(check_labels("tag", &["".into()]).is_err());
        assert_eq!(short("0123456789abcdef"), "0123456789ab");
        assert_eq!(short(""), "-");
    }
}
