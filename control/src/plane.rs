//! The control plane's state and the rules that keep it: enrollment,
//! credentials, revocation, host events. The gRPC services are thin
//! adapters over [`ControlPlane`].

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::broadcast;
use tonic::Status;

use crate::clock::{now_ms, rfc3339};
use crate::error::{ControlError, Result};
use crate::secret::{secret_id, verify_secret, Secret, SecretKind};
use crate::sessions::{CloseReason, Sessions};
use crate::store::{Host, HostStatus, OperatorToken, ProvisioningToken, Store};
use proto::{Event, EventLevel, Telemetry};

/// Tunables of a running control plane.
#[derive(Debug, Clone)]
pub struct Settings {
    /// A connected host whose stream is silent this long is `disconnected`.
    pub heartbeat_timeout: Duration,
    /// How long a new stream may take to say hello.
    pub hello_timeout: Duration,
    /// Upper bound (and default) of a host terminal session.
    pub terminal_max_duration: Duration,
    /// Lifetime of a short-lived provisioning token when none is asked for.
    pub default_token_ttl: Duration,
    /// Image of a sandbox created without `--image` or `--blueprint`.
    pub default_image: Option<String>,
    /// Memory limit of a sandbox that asks for none (placement checks it
    /// against the host's available memory).
    pub sandbox_memory_bytes: u64,
    /// How often a connected host's containers are listed again, so that a
    /// container that stopped or vanished behind the control plane's back
    /// shows in its record.
    pub sandbox_resync: Duration,
    /// Where laptops register and where pre-auth keys come from.
    pub mesh: crate::mesh::MeshSettings,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            heartbeat_timeout: Duration::from_secs(30),
            hello_timeout: Duration::from_secs(10),
            terminal_max_duration: Duration::from_secs(15 * 60),
            default_token_ttl: Duration::from_secs(24 * 3600),
            default_image: None,
            sandbox_memory_bytes: DEFAULT_SANDBOX_MEMORY,
            sandbox_resync: Duration::from_secs(30),
            mesh: crate::mesh::MeshSettings::default(),
        }
    }
}

/// Memory limit of a sandbox that asks for none: 512 MiB.
pub const DEFAULT_SANDBOX_MEMORY: u64 = 512 << 20;

/// Shared state behind every service.
pub struct ControlPlane {
    pub store: Arc<dyn Store>,
    pub sessions: Sessions,
    pub settings: Settings,
    /// Netmap delivery state (its task is [`crate::netmaps::run`]).
    pub netmaps: crate::netmaps::NetmapDelivery,
    /// The live laptop-mesh settings (`dev` fills them in at start).
    pub mesh: crate::mesh::MeshConfig,
    /// Serialises the operations on each sandbox.
    pub sandbox_locks: crate::sandboxes::SandboxLocks,
    /// The repository clones in flight.
    pub repo_bootstraps: crate::sandbox_io::RepoBootstraps,
    /// Wakes `host logs --follow` readers: carries the new event's host id.
    events: broadcast::Sender<String>,
}

impl std::fmt::Debug for ControlPlane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlPlane")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

/// What enrollment hands the agent.
pub struct Enrollment {
    pub host: Host,
    pub credential: Secret,
}

impl std::fmt::Debug for Enrollment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Enrollment")
            .field("host", &self.host)
            .finish_non_exhaustive()
    }
}

/// Description of the operator token made on first start.
pub const FIRST_START_TOKEN: &str = "first start";

/// An operator token in clear with its record id.
#[derive(Debug)]
pub struct NewOperatorToken {
    pub id: String,
    pub secret: Secret,
}

impl ControlPlane {
    /// The state over a store. The server calls [`Self::start_fresh`] first.
    pub fn new(store: Arc<dyn Store>, settings: Settings) -> Arc<ControlPlane> {
        let (events, _) = broadcast::channel(1024);
        let mesh = crate::mesh::MeshConfig::new(settings.mesh.clone());
        Arc::new(ControlPlane {
            store,
            sessions: Sessions::default(),
            settings,
            netmaps: crate::netmaps::NetmapDelivery::default(),
            mesh,
            sandbox_locks: Default::default(),
            repo_bootstraps: Default::default(),
            events,
        })
    }

    /// No stream survives a restart: whatever the store says, every host is
    /// offline until it says hello again.
    pub fn start_fresh(&self) -> Result<()> {
        self.store.disconnect_all(now_ms())?;
        Ok(())
    }

    /// Creates an operator token; only its hash is stored.
    pub fn create_operator_token(&self, description: &str) -> Result<NewOperatorToken> {
        let id = crate::secret::new_id("op");
        let secret = Secret::generate(SecretKind::Operator, &id);
        self.store.insert_operator_token(&OperatorToken {
            id: id.clone(),
            description: description.to_owned(),
            secret_hash: secret.hash(),
            created_at_ms: now_ms(),
            revoked_at_ms: 0,
        })?;
        Ok(NewOperatorToken { id, secret })
    }

    /// The operator token of the first start, if this is the first start.
    pub fn ensure_first_operator_token(&self) -> Result<Option<NewOperatorToken>> {
        if self.store.active_operator_tokens()?.is_empty() {
            return self.create_operator_token(FIRST_START_TOKEN).map(Some);
        }
        Ok(None)
    }

    /// Checks the operator token of an API call; returns its id ("who").
    pub fn authorize_operator(
        &self,
        metadata: &tonic::metadata::MetadataMap,
    ) -> Result<String, Status> {
        let presented = crate::secret::bearer(metadata).ok_or_else(|| {
            Status::unauthenticated(
                "no operator token: send `authorization: Bearer <token>` (GLOBALSTACKS_API_TOKEN)",
            )
        })?;
        let id = secret_id(SecretKind::Operator, presented)
            .map_err(|err| Status::unauthenticated(err.to_string()))?;
        let token = self.store.operator_token(id).map_err(Status::from)?;
        match token {
            Some(token) if verify_secret(presented, &token.secret_hash) => {
                if token.revoked_at_ms != 0 {
                    return Err(Status::unauthenticated(format!(
                        "operator token `{}` was revoked at {}",
                        token.id,
                        rfc3339(token.revoked_at_ms)
                    )));
                }
                Ok(token.id)
            }
            _ => Err(Status::unauthenticated(
                "operator token is not valid: no such token or wrong secret",
            )),
        }
    }

    /// Creates a provisioning token for a BYO cluster.
    pub fn create_provisioning_token(
        &self,
        cluster_id: &str,
        description: &str,
        long_living: bool,
        ttl: Option<Duration>,
    ) -> Result<(ProvisioningToken, Secret)> {
        let cluster = self
            .store
            .cluster(cluster_id)?
            .ok_or_else(|| ControlError::ClusterNotFound(cluster_id.to_owned()))?;
        if cluster.kind != "byo" {
            return Err(ControlError::ClusterNotByo {
                id: cluster.id,
                kind: cluster.kind,
            });
        }
        if description.len() > 1024 {
            return Err(ControlError::InvalidArgument(format!(
                "description is {} bytes long; at most 1024",
                description.len()
            )));
        }
        let now = now_ms();
        let ttl = ttl.unwrap_or(self.settings.default_token_ttl);
        let ttl_ms = i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX);
        let id = crate::secret::new_id("tok");
        let secret = Secret::generate(SecretKind::Provisioning, &id);
        let token = ProvisioningToken {
            id,
            cluster_id: cluster.id,
            description: description.to_owned(),
            long_living,
            secret_hash: secret.hash(),
            created_at_ms: now,
            expires_at_ms: if long_living {
                0
            } else {
                now.saturating_add(ttl_ms)
            },
            revoked_at_ms: 0,
        };
        self.store.insert_provisioning_token(&token)?;
        tracing::info!(token = %token.id, cluster = %token.cluster_id, long_living, "provisioning token created");
        Ok((token, secret))
    }

    /// Trades a provisioning token for a new host and its stream credential.
    pub fn enroll(&self, presented: &str, facts: Telemetry) -> Result<Enrollment, Status> {
        let id = secret_id(SecretKind::Provisioning, presented)
            .map_err(|err| Status::invalid_argument(err.to_string()))?;
        let token = self.store.provisioning_token(id).map_err(Status::from)?;
        let token = match token {
            Some(token) if verify_secret(presented, &token.secret_hash) => token,
            _ => {
                return Err(Status::unauthenticated(
                    "provisioning token is not valid: no such token or wrong secret",
                ))
            }
        };
        let now = now_ms();
        if token.revoked_at_ms != 0 {
            return Err(Status::permission_denied(format!(
                "provisioning token `{}` was revoked at {}; create a new one with `gstacks token create`",
                token.id,
                rfc3339(token.revoked_at_ms)
            )));
        }
        if token.is_expired(now) {
            return Err(Status::unauthenticated(format!(
                "provisioning token `{}` expired at {}; create a new one with `gstacks token create`",
                token.id,
                rfc3339(token.expires_at_ms)
            )));
        }
        let host_id = crate::secret::new_id("hst");
        let credential = Secret::generate(SecretKind::HostCredential, &host_id);
        let name = if facts.hostname.trim().is_empty() {
            host_id.clone()
        } else {
            facts.hostname.trim().chars().take(253).collect()
        };
        let host = Host {
            id: host_id,
            name,
            cluster_id: token.cluster_id.clone(),
            token_id: token.id.clone(),
            credential_hash: credential.hash(),
            status: HostStatus::Disconnected,
            telemetry: facts,
            enrolled_at_ms: now,
            last_seen_ms: now,
            revoked_at_ms: 0,
            revoked_reason: String::new(),
            placeable: true,
        };
        self.store.insert_host(&host).map_err(Status::from)?;
        self.record_event(
            &host.id,
            control_event(
                "host.enrolled",
                EventLevel::Info,
                format!(
                    "enrolled into cluster `{}` with provisioning token `{}`",
                    host.cluster_id, token.id
                ),
            ),
        );
        tracing::info!(host = %host.id, name = %host.name, token = %token.id, "host enrolled");
        Ok(Enrollment { host, credential })
    }

    /// Checks a stream credential; returns the host it belongs to.
    pub fn authenticate_host(
        &self,
        metadata: &tonic::metadata::MetadataMap,
    ) -> Result<Host, Status> {
        let presented = crate::secret::bearer(metadata).ok_or_else(|| {
            Status::unauthenticated(
                "no stream credential: send `authorization: Bearer <credential>`",
            )
        })?;
        let id = secret_id(SecretKind::HostCredential, presented)
            .map_err(|err| Status::unauthenticated(err.to_string()))?;
        let host = self.store.host(id).map_err(Status::from)?;
        let host = match host {
            Some(host) if verify_secret(presented, &host.credential_hash) => host,
            _ => {
                return Err(Status::unauthenticated(
                    "stream credential is not valid: no such host or wrong secret",
                ))
            }
        };
        if host.revoked_at_ms != 0 {
            return Err(Status::permission_denied(revoked_message(&host)));
        }
        Ok(host)
    }

    /// Revokes one host: `no_token`, never placeable, stream closed.
    pub fn revoke_host(&self, host_id: &str, who: &str) -> Result<Host> {
        let reason = format!("host revoked by {who}");
        let host = self
            .store
            .revoke_host(host_id, &reason, now_ms())?
            .ok_or_else(|| ControlError::HostNotFound(host_id.to_owned()))?;
        self.after_revocation(&host);
        Ok(host)
    }

    /// Revokes a provisioning token and every host enrolled with it.
    pub fn revoke_provisioning_token(
        &self,
        token_id: &str,
        who: &str,
    ) -> Result<(ProvisioningToken, Vec<String>)> {
        let reason = format!("provisioning token `{token_id}` revoked by {who}");
        let (token, host_ids) = self
            .store
            .revoke_provisioning_token(token_id, &reason, now_ms())?
            .ok_or_else(|| ControlError::TokenNotFound(token_id.to_owned()))?;
        for host_id in &host_ids {
            if let Some(host) = self.store.host(host_id)? {
                self.after_revocation(&host);
            }
        }
        tracing::info!(token = %token.id, hosts = host_ids.len(), "provisioning token revoked");
        Ok((token, host_ids))
    }

    fn after_revocation(&self, host: &Host) {
        let message = revoked_message(host);
        self.sessions
            .close(&host.id, CloseReason::permission_denied(message.clone()));
        self.record_event(
            &host.id,
            control_event("host.revoked", EventLevel::Warn, message),
        );
        tracing::info!(host = %host.id, "host revoked");
    }

    /// Stores a host event and wakes followers. A failure to store is
    /// logged: an event must never take a stream down.
    pub fn record_event(&self, host_id: &str, event: Event) {
        match self.store.append_host_event(host_id, &event) {
            Ok(_) => {
                let _ = self.events.send(host_id.to_owned());
            }
            Err(err) => {
                tracing::warn!(host = %host_id, kind = %event.kind, error = %err, "host event not stored")
            }
        }
    }

    pub fn subscribe_events(&self) -> broadcast::Receiver<String> {
        self.events.subscribe()
    }

    /// A host as the API shows it: status and last seen from the live stream.
    pub fn host_view(&self, host: Host) -> proto::HostRecord {
        let last_seen_ms = match self.sessions.get(&host.id) {
            Some(session) => session.last_seen_ms().max(host.last_seen_ms),
            None => host.last_seen_ms,
        };
        proto::HostRecord {
            id: host.id,
            name: host.name,
            cluster_id: host.cluster_id,
            status: host.status.to_proto() as i32,
            telemetry: Some(host.telemetry),
            enrolled_at_ms: host.enrolled_at_ms,
            last_seen_ms,
            token_id: host.token_id,
            placeable: host.placeable,
            revoked_at_ms: host.revoked_at_ms,
            revoked_reason: host.revoked_reason,
        }
    }
}

fn revoked_message(host: &Host) -> String {
    format!(
        "host `{}` was revoked at {} ({}); it needs a new provisioning token to enroll again",
        host.id,
        rfc3339(host.revoked_at_ms),
        host.revoked_reason
    )
}

/// An event the control plane records about a host.
pub fn control_event(kind: &str, level: EventLevel, message: String) -> Event {
    Event {
        kind: kind.to_owned(),
        level: level as i32,
        message,
        at_ms: now_ms(),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::sqlite::SqliteStore;
    use crate::store::DEFAULT_CLUSTER_ID;

    fn plane() -> (tempfile::TempDir, Arc<ControlPlane>) {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("control.db")).unwrap();
        let plane = ControlPlane::new(Arc::new(store), Settings::default());
        (dir, plane)
    }

    fn bearer(secret: &str) -> tonic::metadata::MetadataMap {
        let mut md = tonic::metadata::MetadataMap::new();
        md.insert("authorization", format!("Bearer {secret}").parse().unwrap());
        md
    }

    #[test]
    fn operator_token_is_made_once_and_checked() {
        let (_dir, plane) = plane();
        let first = plane.ensure_first_operator_token().unwrap().unwrap();
        assert!(plane.ensure_first_operator_token().unwrap().is_none());
        assert_eq!(
            plane
                .authorize_operator(&bearer(first.secret.expose()))
                .unwrap(),
            first.id
        );
        let forged = format!("gsto.{}.{}", first.id, "A".repeat(43));
        let err = plane.authorize_operator(&bearer(&forged)).unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unauthenticated);
        let err = plane
            .authorize_operator(&tonic::metadata::MetadataMap::new())
            .unwrap_err();
        assert!(err.message().contains("no operator token"));
        // A provisioning token is not an operator token.
        let (_, prov) = plane
            .create_provisioning_token(DEFAULT_CLUSTER_ID, "", false, None)
            .unwrap();
        let err = plane
            .authorize_operator(&bearer(prov.expose()))
            .unwrap_err();
        assert!(err.message().contains("malformed"), "{}", err.message());
    }

    #[test]
    fn enrollment_refuses_bad_expired_and_revoked_tokens_by_name() {
        let (_dir, plane) = plane();
        let facts = Telemetry {
            hostname: "web-1".into(),
            ..Default::default()
        };
        let (token, secret) = plane
            .create_provisioning_token(DEFAULT_CLUSTER_ID, "ci", false, None)
            .unwrap();
        assert!(token.expires_at_ms > token.created_at_ms);
        let enrolled = plane.enroll(secret.expose(), facts.clone()).unwrap();
        assert_eq!(enrolled.host.name, "web-1");
        assert_eq!(enrolled.host.cluster_id, DEFAULT_CLUSTER_ID);
        // The credential authenticates the host; the token does not.
        let host = plane
            .authenticate_host(&bearer(enrolled.credential.expose()))
            .unwrap();
        assert_eq!(host.id, enrolled.host.id);
        assert!(plane.authenticate_host(&bearer(secret.expose())).is_err());

        // Bad: wrong secret for a real id, and garbage.
        let wrong = format!("gstp.{}.{}", token.id, "B".repeat(43));
        let err = plane.enroll(&wrong, facts.clone()).unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unauthenticated);
        assert!(err.message().contains("not valid"));
        let err = plane.enroll("hello", facts.clone()).unwrap_err();
        assert!(err.message().contains("malformed"));

        // Expired.
        let (old, old_secret) = plane
            .create_provisioning_token(DEFAULT_CLUSTER_ID, "", false, Some(Duration::ZERO))
            .unwrap();
        let err = plane
            .enroll(old_secret.expose(), facts.clone())
            .unwrap_err();
        assert!(err.message().contains("expired"), "{}", err.message());
        assert!(err.message().contains(&old.id));

        // Long-living never expires.
        let (long, long_secret) = plane
            .create_provisioning_token(DEFAULT_CLUSTER_ID, "", true, Some(Duration::ZERO))
            .unwrap();
        assert_eq!(long.expires_at_ms, 0);
        plane.enroll(long_secret.expose(), facts.clone()).unwrap();

        // Revoked, and reused after revocation: refused, and its host is no_token.
        let (_, hosts) = plane.revoke_provisioning_token(&token.id, "op_x").unwrap();
        assert_eq!(hosts, std::slice::from_ref(&enrolled.host.id));
        let err = plane.enroll(secret.expose(), facts).unwrap_err();
        assert_eq!(err.code(), tonic::Code::PermissionDenied);
        assert!(err.message().contains("revoked"), "{}", err.message());
        let err = plane
            .authenticate_host(&bearer(enrolled.credential.expose()))
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::PermissionDenied);
        let host = plane.store.host(&enrolled.host.id).unwrap().unwrap();
        assert_eq!(host.status, HostStatus::NoToken);
        assert!(!host.placeable);
        // The event log says what happened.
        let kinds: Vec<_> = plane
            .store
            .host_events(&host.id, 0, None)
            .unwrap()
            .into_iter()
            .map(|e| e.event.kind)
            .collect();
        assert_eq!(kinds, ["host.enrolled", "host.revoked"]);
    }

    #[test]
    fn unknown_cluster_and_host_are_named() {
        let (_dir, plane) = plane();
        let err = plane
            .create_provisioning_token("cls_nope", "", false, None)
            .unwrap_err();
        assert_eq!(err.to_string(), "cluster `cls_nope` not found");
        let err = plane.revoke_host("hst_nope", "op").unwrap_err();
        assert_eq!(err.to_string(), "host `hst_nope` not found");
        let err = plane
            .revoke_provisioning_token("tok_nope", "op")
            .unwrap_err();
        assert_eq!(err.to_string(), "provisioning token `tok_nope` not found");
    }
}
