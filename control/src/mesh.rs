//! Laptop mesh control (`gstacks mesh join`, issue 8): the settings that
//! say where laptops register and where pre-auth keys come from, the
//! `MeshControl` service (served on the control plane's own gRPC server),
//! pre-auth keys, mesh API tokens and node credentials, and the sweep that
//! takes expired laptop nodes out of the mesh.
//!
//! Secrets read `<kind>.<id>.<random>` like every other one (see
//! [`crate::secret`]): `gsma` mesh API token, `gsmk` pre-auth key, `gsmn`
//! node credential (its id is the node id). Only SHA-256 hashes are stored.

use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use futures::Stream;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::transport::{Certificate, Channel, ClientTlsConfig};
use tonic::{Request, Response, Status};

use crate::clock::{now_ms, rfc3339};
use crate::netmap::NetmapIndex;
use crate::plane::ControlPlane;
use crate::secret::{new_id, secret_id, verify_secret, Secret, SecretKind};
use crate::store::mesh::{LocalRegistration, MeshApiToken, NodeCredential, PreAuthKey, Registered};
use proto::mesh_control_server::MeshControl;
use proto::*;

/// Lifetime of a laptop's node credential when none is asked for.
pub const DEFAULT_NODE_TTL: Duration = Duration::from_secs(3600);
/// The longest node credential handed out.
pub const MAX_NODE_TTL: Duration = Duration::from_secs(7 * 24 * 3600);
/// The shortest one (a shorter one would expire before it is used).
pub const MIN_NODE_TTL: Duration = Duration::from_secs(10);
/// Lifetime of a minted single-use pre-auth key when none is asked for.
pub const DEFAULT_KEY_TTL: Duration = Duration::from_secs(600);
/// How often expired laptop nodes are looked for.
const EXPIRY_SWEEP: Duration = Duration::from_secs(1);

/// What the refusal of an unconfigured join names.
pub const NOT_CONFIGURED: &str = "laptop joins are not configured on this control plane: set \
GLOBALSTACKS_MESH_CONTROL_URL (where laptops register: this control plane's https URL) and either \
GLOBALSTACKS_MESH_AUTH_KEY (a pre-created pre-auth key) or GLOBALSTACKS_MESH_API_URL + \
GLOBALSTACKS_MESH_API_TOKEN (+ optional GLOBALSTACKS_MESH_USER) to mint short-lived keys; \
`gstacks-control dev` sets them to itself";

/// Where laptops register and where pre-auth keys come from
/// (`GLOBALSTACKS_MESH_*`). `Debug` redacts the secrets.
#[derive(Clone, Default)]
pub struct MeshSettings {
    /// GLOBALSTACKS_MESH_CONTROL_URL: the `MeshControl` URL laptops call.
    pub control_url: Option<String>,
    /// GLOBALSTACKS_MESH_AUTH_KEY: a pre-created (reusable) pre-auth key.
    pub auth_key: Option<String>,
    /// GLOBALSTACKS_MESH_API_URL: where `CreatePreAuthKey` is called.
    pub api_url: Option<String>,
    /// GLOBALSTACKS_MESH_API_TOKEN: the mesh API token for it.
    pub api_token: Option<String>,
    /// GLOBALSTACKS_MESH_USER: recorded with every key minted.
    pub user: Option<String>,
    /// GLOBALSTACKS_MESH_API_CA_FILE's content: the PEM the mesh API's
    /// certificate is checked against. Default: this control plane's own
    /// certificate (the mesh API is normally this control plane).
    pub api_ca_pem: Option<Vec<u8>>,
}

impl std::fmt::Debug for MeshSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MeshSettings")
            .field("control_url", &self.control_url)
            .field("auth_key", &self.auth_key.as_ref().map(|_| "<redacted>"))
            .field("api_url", &self.api_url)
            .field("api_token", &self.api_token.as_ref().map(|_| "<redacted>"))
            .field("user", &self.user)
            .finish_non_exhaustive()
    }
}

/// Where a join's pre-auth key comes from.
#[derive(Clone, PartialEq, Eq)]
pub enum KeySource {
    AuthKey(String),
    Api {
        url: String,
        token: String,
        user: String,
    },
}

impl std::fmt::Debug for KeySource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KeySource::AuthKey(_) => f.write_str("AuthKey(<redacted>)"),
            KeySource::Api { url, user, .. } => f
                .debug_struct("Api")
                .field("url", url)
                .field("user", user)
                .finish_non_exhaustive(),
        }
    }
}

impl MeshSettings {
    fn non_empty(value: &Option<String>) -> Option<String> {
        value
            .as_deref()
            .map(str::trim)
            .filter(|v| !v.is_empty())
            .map(str::to_owned)
    }

    /// The registration URL and the key source, or the refusal naming the
    /// variables. A configured API wins over a fixed key.
    pub fn source(&self) -> Result<(String, KeySource), String> {
        let url = Self::non_empty(&self.control_url).ok_or_else(|| NOT_CONFIGURED.to_owned())?;
        let api = (
            Self::non_empty(&self.api_url),
            Self::non_empty(&self.api_token),
        );
        let source = match (api, Self::non_empty(&self.auth_key)) {
            ((Some(url), Some(token)), _) => KeySource::Api {
                url,
                token,
                user: Self::non_empty(&self.user).unwrap_or_default(),
            },
            ((Some(_), None), _) => {
                return Err("GLOBALSTACKS_MESH_API_URL is set without GLOBALSTACKS_MESH_API_TOKEN; set both (or GLOBALSTACKS_MESH_AUTH_KEY instead)".to_owned())
            }
            ((None, Some(_)), _) => {
                return Err("GLOBALSTACKS_MESH_API_TOKEN is set without GLOBALSTACKS_MESH_API_URL; set both (or GLOBALSTACKS_MESH_AUTH_KEY instead)".to_owned())
            }
            ((None, None), Some(key)) => KeySource::AuthKey(key),
            ((None, None), None) => return Err(NOT_CONFIGURED.to_owned()),
        };
        Ok((url, source))
    }
}

/// The live mesh settings (`dev` fills them in once it knows its URL).
#[derive(Debug, Default)]
pub struct MeshConfig {
    settings: RwLock<MeshSettings>,
    /// This control plane's certificate (the default trust for the mesh API).
    own_ca_pem: RwLock<Option<Vec<u8>>>,
}

impl MeshConfig {
    pub fn new(settings: MeshSettings) -> MeshConfig {
        MeshConfig {
            settings: RwLock::new(settings),
            own_ca_pem: RwLock::new(None),
        }
    }

    pub fn get(&self) -> MeshSettings {
        self.settings
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    pub fn set(&self, settings: MeshSettings) {
        *self
            .settings
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = settings;
    }

    pub fn set_own_ca(&self, pem: Vec<u8>) {
        *self
            .own_ca_pem
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(pem);
    }

    fn own_ca(&self) -> Option<Vec<u8>> {
        self.own_ca_pem
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }
}

/// A mesh API token in clear with its record id.
#[derive(Debug)]
pub struct NewMeshApiToken {
    pub id: String,
    pub secret: Secret,
}

/// A pre-auth key in clear.
#[derive(Debug)]
pub struct NewPreAuthKey {
    pub id: String,
    pub secret: Secret,
    pub expires_at_ms: i64,
}

/// `ttl_secs` of a request: 0 = `default`, otherwise within bounds.
fn ttl(ttl_secs: i64, default: Duration, what: &str) -> Result<Duration, Status> {
    if ttl_secs == 0 {
        return Ok(default);
    }
    let ttl = u64::try_from(ttl_secs)
        .map(Duration::from_secs)
        .map_err(|_| Status::invalid_argument(format!("{what} must be positive")))?;
    if ttl < MIN_NODE_TTL || ttl > MAX_NODE_TTL {
        return Err(Status::invalid_argument(format!(
            "{what} {}s is out of range: {}s to {}s",
            ttl.as_secs(),
            MIN_NODE_TTL.as_secs(),
            MAX_NODE_TTL.as_secs()
        )));
    }
    Ok(ttl)
}

fn ms(duration: Duration) -> i64 {
    i64::try_from(duration.as_millis()).unwrap_or(i64::MAX)
}

/// A base64 x25519 public key: 32 bytes.
fn check_public_key(key: &str) -> Result<(), Status> {
    use base64::Engine as _;
    match base64::engine::general_purpose::STANDARD.decode(key.trim()) {
        Ok(bytes) if bytes.len() == 32 => Ok(()),
        _ => Err(Status::invalid_argument(
            "node_public_key must be a base64 x25519 public key (32 bytes)",
        )),
    }
}

/// `host:port` or empty.
fn check_endpoint(endpoint: &str) -> Result<(), Status> {
    if endpoint.is_empty() || endpoint.parse::<std::net::SocketAddr>().is_ok() {
        return Ok(());
    }
    Err(Status::invalid_argument(format!(
        "endpoint `{}` is not ip:port",
        endpoint.chars().take(64).collect::<String>()
    )))
}

/// A hostname as recorded: printable ASCII, at most 64 characters.
fn clean_hostname(hostname: &str) -> String {
    hostname
        .chars()
        .filter(|c| c.is_ascii_graphic())
        .take(64)
        .collect()
}

fn again(network: &str) -> String {
    if network.is_empty() {
        "run `gstacks mesh join <network>` again".to_owned()
    } else {
        format!("run `gstacks mesh join {network}` again")
    }
}

/// Why a credential no longer works, in words, or None while it does.
pub fn credential_refusal(credential: &NodeCredential, now_ms: i64) -> Option<String> {
    let again = again(&credential.network);
    if credential.ended == "revoked" {
        return Some(format!(
            "node `{}` was revoked at {}: {again}",
            credential.node_id,
            rfc3339(credential.revoked_at_ms)
        ));
    }
    if credential.ended == "expired" || credential.expires_at_ms <= now_ms {
        return Some(format!(
            "credential expired at {}: {again}",
            rfc3339(credential.expires_at_ms)
        ));
    }
    None
}

impl ControlPlane {
    /// `gstacks-control mesh-api-token`: a token for `CreatePreAuthKey`.
    pub fn create_mesh_api_token(
        &self,
        description: &str,
    ) -> crate::error::Result<NewMeshApiToken> {
        let id = new_id("mat");
        let secret = Secret::generate(SecretKind::MeshApiToken, &id);
        self.store.insert_mesh_api_token(&MeshApiToken {
            id: id.clone(),
            secret_hash: secret.hash(),
            description: description.to_owned(),
            created_at_ms: now_ms(),
            revoked_at_ms: 0,
        })?;
        Ok(NewMeshApiToken { id, secret })
    }

    /// Checks the mesh API token of a `CreatePreAuthKey` call.
    pub fn authorize_mesh_api(
        &self,
        metadata: &tonic::metadata::MetadataMap,
    ) -> Result<String, Status> {
        let presented = crate::secret::bearer(metadata).ok_or_else(|| {
            Status::unauthenticated(
                "no mesh API token: send `authorization: Bearer <token>` (GLOBALSTACKS_MESH_API_TOKEN)",
            )
        })?;
        let id = secret_id(SecretKind::MeshApiToken, presented)
            .map_err(|err| Status::unauthenticated(err.to_string()))?;
        match self.store.mesh_api_token(id)? {
            Some(token) if verify_secret(presented, &token.secret_hash) => {
                if token.revoked_at_ms != 0 {
                    return Err(Status::unauthenticated(format!(
                        "mesh API token `{}` was revoked at {}",
                        token.id,
                        rfc3339(token.revoked_at_ms)
                    )));
                }
                Ok(token.id)
            }
            _ => Err(Status::unauthenticated(
                "mesh API token is not valid: no such token or wrong secret",
            )),
        }
    }

    /// Mints a pre-auth key (only its hash is stored).
    pub fn mint_pre_auth_key(
        &self,
        network: &str,
        node_ttl: Option<Duration>,
        user: &str,
        reusable: bool,
        key_ttl: Duration,
    ) -> Result<NewPreAuthKey, Status> {
        let network = network.trim();
        if !network.is_empty() && self.store.network(network)?.is_none() {
            return Err(Status::not_found(format!("network `{network}` not found")));
        }
        let id = new_id("pak");
        let secret = Secret::generate(SecretKind::PreAuthKey, &id);
        let now = now_ms();
        let expires_at_ms = now.saturating_add(ms(key_ttl));
        self.store.insert_pre_auth_key(&PreAuthKey {
            id: id.clone(),
            secret_hash: secret.hash(),
            network: network.to_owned(),
            user: user.chars().take(128).collect(),
            reusable,
            node_ttl_ms: node_ttl.map_or(0, ms),
            created_at_ms: now,
            expires_at_ms,
            used_at_ms: 0,
        })?;
        Ok(NewPreAuthKey {
            id,
            secret,
            expires_at_ms,
        })
    }

    /// `ControlApi.MeshJoin`: a pre-auth key for the network from the
    /// configured source.
    pub async fn mesh_join(
        &self,
        network: &str,
        ttl_secs: i64,
    ) -> Result<MeshJoinResponse, Status> {
        let network = network.trim();
        if self.store.network(network)?.is_none() {
            return Err(Status::not_found(format!("network `{network}` not found")));
        }
        let node_ttl = ttl(ttl_secs, DEFAULT_NODE_TTL, "--ttl")?;
        let settings = self.mesh.get();
        let (control_url, source) = settings.source().map_err(Status::failed_precondition)?;
        let ttl_secs = i64::try_from(node_ttl.as_secs()).unwrap_or(i64::MAX);
        match source {
            KeySource::AuthKey(key) => Ok(MeshJoinResponse {
                mesh_control_url: control_url,
                pre_auth_key: key,
                expires_at_ms: 0,
                ttl_secs,
            }),
            KeySource::Api { url, token, user } => {
                let ca = settings.api_ca_pem.clone().or_else(|| self.mesh.own_ca());
                let minted = create_pre_auth_key_remote(
                    &url,
                    &token,
                    ca,
                    CreatePreAuthKeyRequest {
                        network: network.to_owned(),
                        node_ttl_secs: ttl_secs,
                        user,
                        reusable: false,
                        key_ttl_secs: 0,
                    },
                )
                .await?;
                Ok(MeshJoinResponse {
                    mesh_control_url: control_url,
                    pre_auth_key: minted.pre_auth_key,
                    expires_at_ms: minted.expires_at_ms,
                    ttl_secs,
                })
            }
        }
    }

    /// `MeshControl.RegisterNode`.
    pub fn register_node(
        &self,
        request: RegisterNodeRequest,
    ) -> Result<RegisterNodeResponse, Status> {
        let presented = request.pre_auth_key.trim();
        let key_id = secret_id(SecretKind::PreAuthKey, presented)
            .map_err(|err| Status::unauthenticated(err.to_string()))?;
        let key = match self.store.pre_auth_key(key_id)? {
            Some(key) if verify_secret(presented, &key.secret_hash) => key,
            _ => {
                return Err(Status::unauthenticated(
                    "pre-auth key is not valid: no such key or wrong secret",
                ))
            }
        };
        let now = now_ms();
        if key.expires_at_ms <= now {
            return Err(Status::unauthenticated(format!(
                "pre-auth key `{}` expired at {}: run `gstacks mesh join` again",
                key.id,
                rfc3339(key.expires_at_ms)
            )));
        }
        if !key.reusable && key.used_at_ms != 0 {
            return Err(Status::unauthenticated(format!(
                "pre-auth key `{}` was already used at {} (keys are single-use): run `gstacks mesh join` again",
                key.id,
                rfc3339(key.used_at_ms)
            )));
        }
        let network = request.network.trim();
        if !key.network.is_empty() && key.network != network {
            return Err(Status::permission_denied(format!(
                "pre-auth key `{}` is for network `{}`, not `{network}`",
                key.id, key.network
            )));
        }
        if self.store.network(network)?.is_none() {
            return Err(Status::not_found(format!("network `{network}` not found")));
        }
        check_public_key(&request.node_public_key)?;
        check_endpoint(request.endpoint.trim())?;
        let mut node_ttl = ttl(request.ttl_secs, DEFAULT_NODE_TTL, "ttl_secs")?;
        if key.node_ttl_ms > 0 {
            let cap = Duration::from_millis(u64::try_from(key.node_ttl_ms).unwrap_or(0));
            node_ttl = if request.ttl_secs == 0 {
                cap
            } else {
                node_ttl.min(cap)
            };
        }
        let node_id = new_id("node_lcl");
        let secret = Secret::generate(SecretKind::NodeCredential, &node_id);
        let expires_at_ms = now.saturating_add(ms(node_ttl));
        let registration = LocalRegistration {
            key_id: key.id.clone(),
            node_id: node_id.clone(),
            network: network.to_owned(),
            public_key: request.node_public_key.trim().to_owned(),
            endpoint: request.endpoint.trim().to_owned(),
            credential: NodeCredential {
                node_id: node_id.clone(),
                secret_hash: secret.hash(),
                network: network.to_owned(),
                hostname: clean_hostname(&request.hostname),
                user: key.user.clone(),
                created_at_ms: now,
                expires_at_ms,
                revoked_at_ms: 0,
                ended: String::new(),
            },
        };
        let node = match self.store.register_local_node(&registration)? {
            Registered::Joined(node, _) => node,
            Registered::KeyUsed => {
                return Err(Status::unauthenticated(format!(
                    "pre-auth key `{}` was already used (keys are single-use): run `gstacks mesh join` again",
                    key.id
                )))
            }
        };
        tracing::info!(node = %node_id, network, hostname = %registration.credential.hostname, key = %key.id, "laptop node registered");
        let topology = self.store.topology()?;
        let netmap = NetmapIndex::new(&topology).for_node(&node_id);
        Ok(RegisterNodeResponse {
            node_id,
            node_credential: secret.expose().to_owned(),
            addresses: vec![
                format!("{}/32", node.ipv4()),
                format!("{}/128", node.ipv6()),
            ],
            expires_at_ms,
            netmap,
        })
    }

    /// Checks a node credential; `node_id` (if given) must be its node.
    pub fn authorize_node(
        &self,
        metadata: &tonic::metadata::MetadataMap,
        node_id: &str,
    ) -> Result<NodeCredential, Status> {
        let presented = crate::secret::bearer(metadata).ok_or_else(|| {
            Status::unauthenticated("no node credential: send `authorization: Bearer <credential>`")
        })?;
        let id = secret_id(SecretKind::NodeCredential, presented)
            .map_err(|err| Status::unauthenticated(err.to_string()))?;
        if !node_id.is_empty() && node_id != id {
            return Err(Status::permission_denied(format!(
                "the credential is not node `{node_id}`'s"
            )));
        }
        match self.store.node_credential(id)? {
            Some(credential) if verify_secret(presented, &credential.secret_hash) => {
                match credential_refusal(&credential, now_ms()) {
                    Some(why) => Err(Status::unauthenticated(why)),
                    None => Ok(credential),
                }
            }
            _ => Err(Status::unauthenticated(
                "node credential is not valid (the node left or never existed): run `gstacks mesh join <network>` again",
            )),
        }
    }

    /// `ControlApi.RevokeMeshNode`: out of the mesh now, credential refused.
    pub fn revoke_mesh_node(
        &self,
        node_id: &str,
        who: &str,
    ) -> Result<RevokeMeshNodeResponse, Status> {
        let now = now_ms();
        match self
            .store
            .remove_local_node(node_id.trim(), Some(("revoked", now)))?
        {
            Some(version) => {
                tracing::info!(node = %node_id, by = %who, version, "laptop node revoked");
                Ok(RevokeMeshNodeResponse {
                    node_id: node_id.trim().to_owned(),
                    revoked_at_ms: now,
                })
            }
            None => Err(Status::not_found(format!(
                "laptop node `{}` not found",
                node_id.trim()
            ))),
        }
    }

    /// Takes every laptop node whose credential expired out of the mesh.
    pub fn expire_mesh_nodes(&self, now: i64) -> crate::error::Result<usize> {
        let expired = self.store.expired_local_nodes(now)?;
        let mut removed = 0;
        for node_id in expired {
            if let Some(version) = self
                .store
                .remove_local_node(&node_id, Some(("expired", now)))?
            {
                tracing::info!(node = %node_id, version, "laptop node credential expired; node removed");
                removed += 1;
            }
        }
        Ok(removed)
    }
}

/// Calls `MeshControl.CreatePreAuthKey` at `url` with the mesh API token.
async fn create_pre_auth_key_remote(
    url: &str,
    token: &str,
    ca_pem: Option<Vec<u8>>,
    request: CreatePreAuthKeyRequest,
) -> Result<CreatePreAuthKeyResponse, Status> {
    let url = url.trim_end_matches('/');
    let unavailable = |what: String| {
        Status::unavailable(format!(
            "mesh control API at {url} (GLOBALSTACKS_MESH_API_URL): {what}"
        ))
    };
    let mut endpoint = Channel::from_shared(url.to_owned())
        .map_err(|err| {
            Status::failed_precondition(format!("GLOBALSTACKS_MESH_API_URL `{url}`: {err}"))
        })?
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(10));
    if url.starts_with("https://") {
        let mut tls = ClientTlsConfig::new();
        tls = match ca_pem {
            Some(pem) => tls.ca_certificate(Certificate::from_pem(pem)),
            None => tls.with_enabled_roots(),
        };
        endpoint = endpoint
            .tls_config(tls)
            .map_err(|err| unavailable(err.to_string()))?;
    }
    let channel = endpoint
        .connect()
        .await
        .map_err(|err| unavailable(error_chain(&err)))?;
    let mut auth: MetadataValue<Ascii> =
        format!("Bearer {}", token.trim()).parse().map_err(|_| {
            Status::failed_precondition(
                "GLOBALSTACKS_MESH_API_TOKEN holds characters not allowed in a header",
            )
        })?;
    auth.set_sensitive(true);
    let mut call = Request::new(request);
    call.metadata_mut().insert("authorization", auth);
    let mut client = proto::mesh_control_client::MeshControlClient::new(channel);
    match client.create_pre_auth_key(call).await {
        Ok(response) => Ok(response.into_inner()),
        Err(status) => Err(Status::new(
            if status.code() == tonic::Code::Unauthenticated {
                tonic::Code::FailedPrecondition
            } else {
                status.code()
            },
            format!(
                "mesh control API at {url} refused to mint a pre-auth key: {}",
                status.message()
            ),
        )),
    }
}

fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(next) = source {
        let part = next.to_string();
        if !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        source = next.source();
    }
    text
}

/// Takes expired laptop nodes out of the mesh; runs until the process ends.
pub async fn run_expiry(plane: Arc<ControlPlane>) {
    let mut tick = tokio::time::interval(EXPIRY_SWEEP);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if let Err(err) = plane.expire_mesh_nodes(now_ms()) {
            tracing::warn!(error = %err, "expired laptop nodes not swept");
        }
    }
}

/// The `MeshControl` service.
#[derive(Debug, Clone)]
pub struct MeshApi {
    plane: Arc<ControlPlane>,
}

impl MeshApi {
    pub fn new(plane: Arc<ControlPlane>) -> MeshApi {
        MeshApi { plane }
    }
}

type Boxed<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl MeshControl for MeshApi {
    async fn register_node(
        &self,
        request: Request<RegisterNodeRequest>,
    ) -> Result<Response<RegisterNodeResponse>, Status> {
        Ok(Response::new(
            self.plane.register_node(request.into_inner())?,
        ))
    }

    type WatchNetmapStream = Boxed<Netmap>;

    async fn watch_netmap(
        &self,
        request: Request<WatchNetmapRequest>,
    ) -> Result<Response<Self::WatchNetmapStream>, Status> {
        let credential = self
            .plane
            .authorize_node(request.metadata(), &request.get_ref().node_id)?;
        let plane = self.plane.clone();
        let (tx, rx) = mpsc::channel(4);
        tokio::spawn(async move {
            let mut versions = plane.store.subscribe_topology();
            // The last netmap sent, without its version: only a change of
            // content is sent again.
            let mut last: Option<Netmap> = None;
            loop {
                versions.borrow_and_update();
                // The credential again: revocation and expiry end the stream.
                let current = match plane.store.node_credential(&credential.node_id) {
                    Ok(Some(c)) if c.secret_hash == credential.secret_hash => c,
                    Ok(_) => {
                        let _ = tx
                            .send(Err(Status::unauthenticated(format!(
                                "node `{}` left the mesh: {}",
                                credential.node_id,
                                again(&credential.network)
                            ))))
                            .await;
                        return;
                    }
                    Err(err) => {
                        let _ = tx.send(Err(Status::from(err))).await;
                        return;
                    }
                };
                if let Some(why) = credential_refusal(&current, now_ms()) {
                    let _ = tx.send(Err(Status::unauthenticated(why))).await;
                    return;
                }
                let netmap = match plane.store.topology() {
                    Ok(topology) => NetmapIndex::new(&topology).for_node(&credential.node_id),
                    Err(err) => {
                        let _ = tx.send(Err(Status::from(err))).await;
                        return;
                    }
                };
                if let Some(netmap) = netmap {
                    let content = Netmap {
                        topology_version: 0,
                        ..netmap.clone()
                    };
                    if last.as_ref() != Some(&content) {
                        last = Some(content);
                        if tx.send(Ok(netmap)).await.is_err() {
                            return;
                        }
                    }
                }
                let until_expiry = Duration::from_millis(
                    u64::try_from(current.expires_at_ms.saturating_sub(now_ms())).unwrap_or(0),
                );
                tokio::select! {
                    changed = versions.changed() => {
                        if changed.is_err() {
                            return;
                        }
                    }
                    () = tokio::time::sleep(until_expiry) => {}
                    () = tx.closed() => return,
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn remove_node(
        &self,
        request: Request<RemoveNodeRequest>,
    ) -> Result<Response<RemoveNodeResponse>, Status> {
        let credential = self
            .plane
            .authorize_node(request.metadata(), &request.get_ref().node_id)?;
        self.plane
            .store
            .remove_local_node(&credential.node_id, None)?;
        tracing::info!(node = %credential.node_id, "laptop node left");
        Ok(Response::new(RemoveNodeResponse {}))
    }

    async fn create_pre_auth_key(
        &self,
        request: Request<CreatePreAuthKeyRequest>,
    ) -> Result<Response<CreatePreAuthKeyResponse>, Status> {
        let token = self.plane.authorize_mesh_api(request.metadata())?;
        let request = request.into_inner();
        let node_ttl = (request.node_ttl_secs != 0)
            .then(|| ttl(request.node_ttl_secs, DEFAULT_NODE_TTL, "node_ttl_secs"))
            .transpose()?;
        let key_ttl = ttl(request.key_ttl_secs, DEFAULT_KEY_TTL, "key_ttl_secs")?;
        let key = self.plane.mint_pre_auth_key(
            &request.network,
            node_ttl,
            &request.user,
            request.reusable,
            key_ttl,
        )?;
        tracing::info!(key = %key.id, by = %token, network = %request.network, reusable = request.reusable, "pre-auth key minted");
        Ok(Response::new(CreatePreAuthKeyResponse {
            pre_auth_key: key.secret.expose().to_owned(),
            expires_at_ms: key.expires_at_ms,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_source_names_every_variable() {
        let err = MeshSettings::default().source().unwrap_err();
        for var in [
            "GLOBALSTACKS_MESH_CONTROL_URL",
            "GLOBALSTACKS_MESH_AUTH_KEY",
            "GLOBALSTACKS_MESH_API_URL",
            "GLOBALSTACKS_MESH_API_TOKEN",
            "GLOBALSTACKS_MESH_USER",
        ] {
            assert!(err.contains(var), "{var} missing in {err}");
        }
        let only_url = MeshSettings {
            control_url: Some("https://c:7443".into()),
            ..MeshSettings::default()
        };
        assert_eq!(only_url.source().unwrap_err(), NOT_CONFIGURED);
        let half = MeshSettings {
            control_url: Some("https://c:7443".into()),
            api_url: Some("https://c:7443".into()),
            ..MeshSettings::default()
        };
        assert!(half
            .source()
            .unwrap_err()
            .contains("without GLOBALSTACKS_MESH_API_TOKEN"));
    }

    #[test]
    fn api_wins_over_a_fixed_key_and_blank_counts_as_unset() {
        let settings = MeshSettings {
            control_url: Some(" https://c:7443 ".into()),
            auth_key: Some("gsmk.pak_1.xxxxxxxxxxxxxxxxxxxx".into()),
            api_url: Some("https://c:7443".into()),
            api_token: Some("gsma.mat_1.yyyyyyyyyyyyyyyyyyyy".into()),
            user: Some("  ".into()),
            api_ca_pem: None,
        };
        let (url, source) = settings.source().unwrap();
        assert_eq!(url, "https://c:7443");
        assert!(matches!(source, KeySource::Api { ref user, .. } if user.is_empty()));
        let key_only = MeshSettings {
            api_url: Some(String::new()),
            api_token: None,
            ..settings.clone()
        };
        assert!(matches!(
            key_only.source().unwrap().1,
            KeySource::AuthKey(_)
        ));
        let debug = format!("{settings:?}");
        assert!(
            !debug.contains("gsmk.") && !debug.contains("gsma."),
            "{debug}"
        );
    }

    #[test]
    fn refusals_say_to_join_again() {
        let mut c = NodeCredential {
            node_id: "node_lcl_1".into(),
            secret_hash: String::new(),
            network: "dev".into(),
            hostname: "lap".into(),
            user: String::new(),
            created_at_ms: 0,
            expires_at_ms: 10_000,
            revoked_at_ms: 0,
            ended: String::new(),
        };
        assert_eq!(credential_refusal(&c, 9_999), None);
        let expired = credential_refusal(&c, 10_000).unwrap();
        assert_eq!(
            expired,
            "credential expired at 1970-01-01T00:00:10Z: run `gstacks mesh join dev` again"
        );
        c.ended = "revoked".into();
        c.revoked_at_ms = 5_000;
        assert!(credential_refusal(&c, 6_000)
            .unwrap()
            .starts_with("node `node_lcl_1` was revoked at"));
    }

    #[test]
    fn ttls_are_bounded() {
        assert_eq!(ttl(0, DEFAULT_NODE_TTL, "--ttl").unwrap(), DEFAULT_NODE_TTL);
        assert!(ttl(-5, DEFAULT_NODE_TTL, "--ttl").is_err());
        assert!(ttl(5, DEFAULT_NODE_TTL, "--ttl").is_err());
        assert!(ttl(8 * 24 * 3600, DEFAULT_NODE_TTL, "--ttl").is_err());
        assert_eq!(ttl(60, DEFAULT_NODE_TTL, "--ttl").unwrap().as_secs(), 60);
    }
}
