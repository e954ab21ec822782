//! What the control plane keeps: clusters, operator and provisioning tokens,
//! hosts and their events, sandboxes and their activity history. The `Store` trait is the seam where a PostgreSQL
//! store can replace the embedded SQLite one ([`sqlite::SqliteStore`]).
//!
//! Secrets never reach the store in clear: tokens and credentials are kept
//! as SHA-256 hashes (see [`crate::secret`]).

pub mod mesh;
pub mod network;
pub mod sqlite;

use crate::error::Result;
pub use network::{
    Alias, AttachedSandbox, Attachment, MeshNode, Network, NodeKind, PolicyRule, Topology,
};
use proto::{Event, Telemetry};

/// Id of the BYO cluster every installation has.
pub const DEFAULT_CLUSTER_ID: &str = "cls_default";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cluster {
    pub id: String,
    pub name: String,
    /// `byo` or `managed`.
    pub kind: String,
    pub is_default: bool,
}

/// An operator API token, by hash.
#[derive(Clone, PartialEq, Eq)]
pub struct OperatorToken {
    pub id: String,
    pub description: String,
    pub secret_hash: String,
    pub created_at_ms: i64,
    /// 0 = valid.
    pub revoked_at_ms: i64,
}

impl std::fmt::Debug for OperatorToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OperatorToken")
            .field("id", &self.id)
            .field("description", &self.description)
            .field("created_at_ms", &self.created_at_ms)
            .field("revoked_at_ms", &self.revoked_at_ms)
            .finish_non_exhaustive()
    }
}

/// A cluster-scoped provisioning token, by hash.
#[derive(Clone, PartialEq, Eq)]
pub struct ProvisioningToken {
    pub id: String,
    pub cluster_id: String,
    pub description: String,
    pub long_living: bool,
    pub secret_hash: String,
    pub created_at_ms: i64,
    /// 0 = never (long-living).
    pub expires_at_ms: i64,
    /// 0 = not revoked.
    pub revoked_at_ms: i64,
}

impl std::fmt::Debug for ProvisioningToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProvisioningToken")
            .field("id", &self.id)
            .field("cluster_id", &self.cluster_id)
            .field("description", &self.description)
            .field("long_living", &self.long_living)
            .field("created_at_ms", &self.created_at_ms)
            .field("expires_at_ms", &self.expires_at_ms)
            .field("revoked_at_ms", &self.revoked_at_ms)
            .finish_non_exhaustive()
    }
}

impl ProvisioningToken {
    pub fn is_expired(&self, now_ms: i64) -> bool {
        self.expires_at_ms != 0 && now_ms >= self.expires_at_ms
    }
}

/// A host's connection state, as `gstacks host list` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostStatus {
    Connected,
    Disconnected,
    /// Its credential was revoked: refused for good, never placeable.
    NoToken,
}

impl HostStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            HostStatus::Connected => "connected",
            HostStatus::Disconnected => "disconnected",
            HostStatus::NoToken => "no_token",
        }
    }

    pub fn parse(text: &str) -> Option<HostStatus> {
        match text {
            "connected" => Some(HostStatus::Connected),
            "disconnected" => Some(HostStatus::Disconnected),
            "no_token" => Some(HostStatus::NoToken),
            _ => None,
        }
    }

    pub fn to_proto(self) -> proto::HostStatus {
        match self {
            HostStatus::Connected => proto::HostStatus::Connected,
            HostStatus::Disconnected => proto::HostStatus::Disconnected,
            HostStatus::NoToken => proto::HostStatus::NoToken,
        }
    }
}

/// An enrolled host.
#[derive(Clone, PartialEq)]
pub struct Host {
    pub id: String,
    pub name: String,
    pub cluster_id: String,
    /// The provisioning token it enrolled with.
    pub token_id: String,
    pub credential_hash: String,
    pub status: HostStatus,
    pub telemetry: Telemetry,
    pub enrolled_at_ms: i64,
    pub last_seen_ms: i64,
    /// 0 = not revoked.
    pub revoked_at_ms: i64,
    pub revoked_reason: String,
    /// False once revoked: placement never chooses the host.
    pub placeable: bool,
}

impl std::fmt::Debug for Host {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Host")
            .field("id", &self.id)
            .field("name", &self.name)
            .field("cluster_id", &self.cluster_id)
            .field("token_id", &self.token_id)
            .field("status", &self.status)
            .field("last_seen_ms", &self.last_seen_ms)
            .field("revoked_at_ms", &self.revoked_at_ms)
            .field("placeable", &self.placeable)
            .finish_non_exhaustive()
    }
}

/// One stored host event with its sequence number (increasing, store-wide).
#[derive(Debug, Clone, PartialEq)]
pub struct StoredEvent {
    pub seq: u64,
    pub host_id: String,
    pub event: Event,
}

/// A provisioning token with how many hosts enrolled with it.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenUsage {
    pub token: ProvisioningToken,
    pub hosts_enrolled: u32,
}

/// A sandbox's lifecycle state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SandboxStatus {
    /// Placed; the agent is creating the container (or the host dropped
    /// during the create and the outcome is reconciled on reconnect).
    Provisioning,
    Running,
    Stopped,
    /// The create failed (the engine's message is the status message) or
    /// the container vanished.
    Failed,
    /// Deprovisioned: the container is removed; the record stays visible.
    Archived,
}

impl SandboxStatus {
    pub const ALL: [SandboxStatus; 5] = [
        SandboxStatus::Provisioning,
        SandboxStatus::Running,
        SandboxStatus::Stopped,
        SandboxStatus::Failed,
        SandboxStatus::Archived,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            SandboxStatus::Provisioning => "provisioning",
            SandboxStatus::Running => "running",
            SandboxStatus::Stopped => "stopped",
            SandboxStatus::Failed => "failed",
            SandboxStatus::Archived => "archived",
        }
    }

    pub fn parse(text: &str) -> Option<SandboxStatus> {
        SandboxStatus::ALL.into_iter().find(|s| s.as_str() == text)
    }

    pub fn to_proto(self) -> proto::SandboxStatus {
        match self {
            SandboxStatus::Provisioning => proto::SandboxStatus::Provisioning,
            SandboxStatus::Running => proto::SandboxStatus::Running,
            SandboxStatus::Stopped => proto::SandboxStatus::Stopped,
            SandboxStatus::Failed => proto::SandboxStatus::Failed,
            SandboxStatus::Archived => proto::SandboxStatus::Archived,
        }
    }

    /// Whether the sandbox holds (or is about to hold) a container that
    /// counts against its host's capacity.
    pub fn is_active(self) -> bool {
        matches!(self, SandboxStatus::Provisioning | SandboxStatus::Running)
    }
}

/// Repository bootstrap state of a sandbox (the agent clones inside the
/// container): `pending`, `cloning`, `ready`, `failed`; empty without a
/// repository.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SandboxRepo {
    pub url: String,
    pub branch: String,
    pub path: String,
    pub status: String,
    pub error: String,
}

/// A bind mount of a sandbox.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct VolumeMount {
    pub host_path: String,
    pub container_path: String,
    pub read_only: bool,
}

/// A sandbox record. `host_id`, `addresses`, `tags` and `status` are what
/// the network model reads (netmaps, source identification, `tag:`
/// selectors): see [`SandboxFilter`].
#[derive(Debug, Clone, PartialEq)]
pub struct Sandbox {
    /// `sbx_...`
    pub id: String,
    pub cluster_id: String,
    pub host_id: String,
    pub name: String,
    /// The image reference asked for (or the default image).
    pub image: String,
    /// The image id the engine resolved it to, once created.
    pub image_digest: String,
    pub blueprint_id: String,
    pub status: SandboxStatus,
    pub status_message: String,
    /// The control plane's handle of the container.
    pub container_id: String,
    /// Display metadata.
    pub container_name: String,
    /// The container's IPs on its agent's sandbox Docker network.
    pub addresses: Vec<String>,
    pub docker_network: String,
    /// Required host tags at placement, and the sandbox's own tags.
    pub tags: Vec<String>,
    /// Required host traits at placement.
    pub traits: Vec<String>,
    pub volumes: Vec<VolumeMount>,
    pub repo: SandboxRepo,
    /// 0 = no limit.
    pub memory_bytes: u64,
    /// 0 = no limit; thousandths of a CPU.
    pub millicpus: u32,
    pub created_by: String,
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
    /// 0 = not archived.
    pub archived_at_ms: i64,
}

impl Sandbox {
    pub fn has_tag(&self, tag: &str) -> bool {
        self.tags.iter().any(|t| t == tag)
    }
}

/// Which sandboxes [`Store::sandboxes`] returns; every set field must match.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SandboxFilter {
    pub cluster_id: Option<String>,
    pub host_id: Option<String>,
    /// Only these statuses (empty = any).
    pub statuses: Vec<SandboxStatus>,
    /// Only sandboxes carrying this tag.
    pub tag: Option<String>,
    /// Leave out `archived` ones.
    pub exclude_archived: bool,
}

impl SandboxFilter {
    /// Sandboxes that are not archived.
    pub fn live() -> SandboxFilter {
        SandboxFilter {
            exclude_archived: true,
            ..SandboxFilter::default()
        }
    }

    pub fn on_host(host_id: &str) -> SandboxFilter {
        SandboxFilter {
            host_id: Some(host_id.to_owned()),
            ..SandboxFilter::default()
        }
    }

    pub fn matches(&self, sandbox: &Sandbox) -> bool {
        self.cluster_id
            .as_deref()
            .is_none_or(|c| c == sandbox.cluster_id)
            && self.host_id.as_deref().is_none_or(|h| h == sandbox.host_id)
            && (self.statuses.is_empty() || self.statuses.contains(&sandbox.status))
            && self.tag.as_deref().is_none_or(|t| sandbox.has_tag(t))
            && !(self.exclude_archived && sandbox.status == SandboxStatus::Archived)
    }
}

/// One stored entry of a sandbox's activity history.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredSandboxEvent {
    pub seq: u64,
    pub sandbox_id: String,
    pub event: Event,
}

/// The control plane's persistent state. Implementations are safe to share
/// between tasks; each call is one short transaction.
pub trait Store: Send + Sync + 'static {
    fn clusters(&self) -> Result<Vec<Cluster>>;
    fn cluster(&self, id: &str) -> Result<Option<Cluster>>;

    fn insert_operator_token(&self, token: &OperatorToken) -> Result<()>;
    fn operator_token(&self, id: &str) -> Result<Option<OperatorToken>>;
    /// Tokens not revoked.
    fn active_operator_tokens(&self) -> Result<Vec<OperatorToken>>;
    /// Revokes every valid operator token with this description; returns how many.
    fn revoke_operator_tokens_described(&self, description: &str, now_ms: i64) -> Result<usize>;

    fn insert_provisioning_token(&self, token: &ProvisioningToken) -> Result<()>;
    fn provisioning_token(&self, id: &str) -> Result<Option<ProvisioningToken>>;
    /// All tokens, or those of one cluster, oldest first.
    fn provisioning_tokens(&self, cluster_id: Option<&str>) -> Result<Vec<TokenUsage>>;
    /// Marks the token revoked (keeping the first revocation time) and every
    /// host that enrolled with it `no_token` and not placeable, in one
    /// transaction. Returns the token and the ids of the hosts revoked now.
    fn revoke_provisioning_token(
        &self,
        id: &str,
        reason: &str,
        now_ms: i64,
    ) -> Result<Option<(ProvisioningToken, Vec<String>)>>;

    fn insert_host(&self, host: &Host) -> Result<()>;
    fn host(&self, id: &str) -> Result<Option<Host>>;
    /// All hosts, or those of one cluster, by enrollment time.
    fn hosts(&self, cluster_id: Option<&str>) -> Result<Vec<Host>>;
    /// Hello: `connected`, with fresh telemetry. Refused (false) for a
    /// revoked host.
    fn set_host_connected(&self, id: &str, telemetry: &Telemetry, now_ms: i64) -> Result<bool>;
    /// Heartbeat: last seen, and telemetry when the agent sent it.
    fn record_heartbeat(&self, id: &str, telemetry: Option<&Telemetry>, now_ms: i64) -> Result<()>;
    /// Stream closed or heartbeats missed: `connected` -> `disconnected`
    /// (a `no_token` host stays `no_token`).
    fn set_host_disconnected(&self, id: &str, now_ms: i64) -> Result<()>;
    /// `no_token` for good; returns the host, or None if unknown.
    fn revoke_host(&self, id: &str, reason: &str, now_ms: i64) -> Result<Option<Host>>;
    /// At start-up no stream exists: every `connected` host becomes
    /// `disconnected`. Returns how many.
    fn disconnect_all(&self, now_ms: i64) -> Result<usize>;

    fn append_host_event(&self, host_id: &str, event: &Event) -> Result<u64>;
    /// Events of a host after `after_seq`, oldest first; with `tail`, only
    /// the last `tail` of them.
    fn host_events(
        &self,
        host_id: &str,
        after_seq: u64,
        tail: Option<u32>,
    ) -> Result<Vec<StoredEvent>>;

    // Runtime networks. Every call that changes what a netmap shows bumps
    // the one cluster-wide topology version in its own transaction and
    // returns the new version; subscribers of [`Store::subscribe_topology`]
    // hear it after the commit.

    fn topology_version(&self) -> Result<u64>;
    /// The latest committed topology version.
    fn subscribe_topology(&self) -> tokio::sync::watch::Receiver<u64>;
    /// Fails with `NetworkExists` when the name is taken.
    fn create_network(&self, name: &str, now_ms: i64) -> Result<Network>;
    fn network(&self, name: &str) -> Result<Option<Network>>;
    /// All networks by name.
    fn networks(&self) -> Result<Vec<Network>>;
    fn network_attachments(&self, network: &str) -> Result<Vec<Attachment>>;
    /// Aliases of a network by name.
    fn network_aliases(&self, network: &str) -> Result<Vec<Alias>>;
    /// Attaches an existing, not archived sandbox, with an optional first
    /// alias (unique in the network).
    fn attach_sandbox(
        &self,
        network: &str,
        sandbox_id: &str,
        alias: Option<(&str, &[u16])>,
        now_ms: i64,
    ) -> Result<u64>;
    /// Removes the attachment and the sandbox's aliases in the network.
    fn detach_sandbox(&self, network: &str, sandbox_id: &str) -> Result<u64>;
    /// A further alias of an attached sandbox.
    fn add_alias(
        &self,
        network: &str,
        sandbox_id: &str,
        alias: &str,
        ports: &[u16],
        now_ms: i64,
    ) -> Result<u64>;
    fn remove_alias(&self, network: &str, alias: &str) -> Result<u64>;
    /// Rules of a network in decision order (oldest first).
    fn policy_rules(&self, network: &str) -> Result<Vec<PolicyRule>>;
    /// Refuses a rule equal (from, to, port) to an existing one.
    fn add_policy_rule(&self, rule: &PolicyRule) -> Result<u64>;
    fn remove_policy_rule(&self, network: &str, id: &str) -> Result<u64>;
    /// A host agent's node from its Hello: created with its overlay
    /// addresses on the first one; key and endpoint kept current. The
    /// version is `Some` when anything changed.
    fn record_agent_node(
        &self,
        host_id: &str,
        public_key: &str,
        endpoint: &str,
        now_ms: i64,
    ) -> Result<(MeshNode, Option<u64>)>;
    /// A laptop node joining a network (created on its first join).
    fn join_local_node(
        &self,
        node_id: &str,
        network: &str,
        public_key: &str,
        endpoint: &str,
        now_ms: i64,
    ) -> Result<(MeshNode, u64)>;
    fn mesh_node(&self, id: &str) -> Result<Option<MeshNode>>;
    /// A sandbox as the network model sees it (host, status, addresses, tags).
    fn network_sandbox(&self, id: &str) -> Result<Option<AttachedSandbox>>;
    /// Counts a connection an agent refused by policy.
    fn record_denied_connection(&self, network: &str, at_ms: i64) -> Result<()>;
    /// Everything netmaps are made of, as one consistent snapshot.
    fn topology(&self) -> Result<Topology>;
    fn insert_sandbox(&self, sandbox: &Sandbox) -> Result<()>;
    fn sandbox(&self, id: &str) -> Result<Option<Sandbox>>;
    /// Sandboxes matching the filter, oldest first.
    fn sandboxes(&self, filter: &SandboxFilter) -> Result<Vec<Sandbox>>;
    /// Writes every field of the record (by id); false if it does not exist.
    fn update_sandbox(&self, sandbox: &Sandbox) -> Result<bool>;
    /// The sandbox whose container has this id, else the newest one whose
    /// container has this name (archived ones included): rediscovery's
    /// fallback when a container carries no sandbox id label.
    fn sandbox_by_container(
        &self,
        container_id: &str,
        container_name: &str,
    ) -> Result<Option<Sandbox>>;

    fn append_sandbox_event(&self, sandbox_id: &str, event: &Event) -> Result<u64>;
    /// Activity of a sandbox after `after_seq`, oldest first; with `tail`,
    /// only the last `tail`.
    fn sandbox_events(
        &self,
        sandbox_id: &str,
        after_seq: u64,
        tail: Option<u32>,
    ) -> Result<Vec<StoredSandboxEvent>>;

    // Laptop mesh (`gstacks mesh join`): see [`mesh`].

    fn insert_mesh_api_token(&self, token: &mesh::MeshApiToken) -> Result<()>;
    fn mesh_api_token(&self, id: &str) -> Result<Option<mesh::MeshApiToken>>;
    /// Revokes the live mesh API tokens with this description (how each
    /// `gstacks-control dev` start retires the token the previous one made).
    fn revoke_mesh_api_tokens_described(&self, description: &str, now_ms: i64) -> Result<usize>;
    fn insert_pre_auth_key(&self, key: &mesh::PreAuthKey) -> Result<()>;
    fn pre_auth_key(&self, id: &str) -> Result<Option<mesh::PreAuthKey>>;
    /// Consumes the key (unless reusable), joins the node to its network
    /// (allocating its overlay addresses on its first join) and stores its
    /// credential, in one transaction that bumps the topology version.
    fn register_local_node(
        &self,
        registration: &mesh::LocalRegistration,
    ) -> Result<mesh::Registered>;
    fn node_credential(&self, node_id: &str) -> Result<Option<mesh::NodeCredential>>;
    /// Takes a laptop node out of the mesh (see `sqlite::mesh::remove_local_node`).
    /// None when there is no such laptop node.
    fn remove_local_node(&self, node_id: &str, ended: Option<(&str, i64)>) -> Result<Option<u64>>;
    /// Nodes whose live credential expired by `now_ms`.
    fn expired_local_nodes(&self, now_ms: i64) -> Result<Vec<String>>;
}
