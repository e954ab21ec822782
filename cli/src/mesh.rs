//! `gstacks mesh join / status / forward / leave`: this machine as a `local`
//! node of one runtime network, on the userspace `netstack` (no root, no
//! TUN). The control plane hands out a short-lived pre-auth key
//! (`ControlApi.MeshJoin`); the node registers with it at the mesh control
//! URL (`MeshControl.RegisterNode`) and keeps its key, credential and
//! addresses in `mesh.json` (0600) next to the CLI config. `forward` follows
//! the netmap (`WatchNetmap`) and dials the target agent's overlay port 4180
//! with the proxy crate's `MeshHeader` (source `local`).

use std::io::Write as _;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context as _};
use netstack::{MeshNode, NodeConfig, PeerConfig, PrivateKey, PublicKey};
use proto::mesh_control_client::MeshControlClient;
use proto::{Netmap, RegisterNodeRequest, RemoveNodeRequest, WatchNetmapRequest};
use tonic::metadata::{Ascii, MetadataValue};
use tonic::transport::{Certificate, Channel, ClientTlsConfig};

use crate::client::{status_error, Api};
use crate::config::Resolved;

/// Exit code when the credential expired or was revoked (join again).
pub const EXIT_JOIN_AGAIN: i32 = 1;
/// How long `status` waits for the current netmap.
const STATUS_WAIT: Duration = Duration::from_secs(5);
/// How often `forward` records its peers for `status`.
const STATUS_EVERY: Duration = Duration::from_secs(2);
/// Persistent keepalive towards agents (the laptop is usually behind NAT).
const KEEPALIVE_SECS: u16 = 25;

/// What `mesh join` saves. The private key and the credential are secrets:
/// the file is 0600 and `Debug` redacts them.
#[derive(Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MeshState {
    pub network: String,
    pub mesh_control_url: String,
    /// PEM the mesh control URL's certificate is checked against.
    pub ca_pem: String,
    pub node_id: String,
    pub node_credential: String,
    /// base64 x25519 private key of this node.
    pub private_key: String,
    /// `100.64.x.y/32`, `fd7a:115c:a1e0::N/128`.
    pub addresses: Vec<String>,
    pub expires_at_ms: i64,
    pub joined_at_ms: i64,
    pub hostname: String,
}

impl std::fmt::Debug for MeshState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MeshState")
            .field("network", &self.network)
            .field("mesh_control_url", &self.mesh_control_url)
            .field("node_id", &self.node_id)
            .field("addresses", &self.addresses)
            .field("expires_at_ms", &self.expires_at_ms)
            .finish_non_exhaustive()
    }
}

/// What a running `mesh forward` records for `mesh status`.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct ForwardStatus {
    pub pid: u32,
    pub updated_at_ms: i64,
    pub topology_version: u64,
    pub udp_port: u16,
    pub forwards: Vec<String>,
    pub peers: Vec<PeerSeen>,
}

#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct PeerSeen {
    pub public_key: String,
    pub endpoint: String,
    /// Unix ms of the last completed handshake; 0 = none yet.
    pub last_handshake_ms: i64,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

fn rfc3339(ms: i64) -> String {
    let since = Duration::from_millis(u64::try_from(ms).unwrap_or(0));
    humantime::format_rfc3339_seconds(UNIX_EPOCH + since).to_string()
}

/// `<config dir>/gstacks/mesh.json` (beside `config.toml`).
pub fn state_path() -> anyhow::Result<PathBuf> {
    let config = crate::config::config_path()?;
    Ok(config.with_file_name("mesh.json"))
}

fn forward_status_path(state: &Path) -> PathBuf {
    state.with_file_name("mesh-forward.json")
}

/// Writes `bytes` to `path` 0600 (directory 0700), atomically.
fn write_private(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let dir = path.parent().context("state path has no directory")?;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("creating {}", dir.display()))?;
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("creating {}", tmp.display()))?;
    file.write_all(bytes)
        .and_then(|()| file.sync_all())
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("replacing {}", path.display()))?;
    Ok(())
}

pub fn save_state(path: &Path, state: &MeshState) -> anyhow::Result<()> {
    let text = serde_json::to_vec_pretty(state).context("encoding the mesh state")?;
    write_private(path, &text)
}

/// The saved state; `None` when this machine has not joined.
pub fn load_state(path: &Path) -> anyhow::Result<Option<MeshState>> {
    let bytes = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(err) => return Err(err).with_context(|| format!("reading {}", path.display())),
    };
    let mode = std::fs::metadata(path)
        .with_context(|| format!("reading {}", path.display()))?
        .permissions()
        .mode();
    if mode & 0o077 != 0 {
        bail!(
            "{} holds a node key but is readable by others (mode {:o}); run `chmod 600 {}`",
            path.display(),
            mode & 0o777,
            path.display()
        );
    }
    let state = serde_json::from_slice(&bytes)
        .map_err(|err| anyhow::anyhow!("{}: {err}", path.display()))?;
    Ok(Some(state))
}

fn require_state(path: &Path) -> anyhow::Result<MeshState> {
    load_state(path)?.ok_or_else(|| {
        anyhow::anyhow!("this machine has not joined a network: run `gstacks mesh join <network>`")
    })
}

/// `api:8080` -> (alias, port).
pub fn parse_target(text: &str) -> anyhow::Result<(String, u16)> {
    let (alias, port) = text
        .rsplit_once(':')
        .ok_or_else(|| anyhow::anyhow!("target `{text}` must be <alias>:<port>, e.g. api:8080"))?;
    policy::validate_label("alias", alias)
        .map_err(|err| anyhow::anyhow!("target `{text}`: {err}"))?;
    let port: u16 = port
        .parse()
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| anyhow::anyhow!("target `{text}`: port must be 1-65535"))?;
    Ok((alias.to_owned(), port))
}

/// `--local 18080` or `--local 127.0.0.1:18080`.
pub fn parse_local(text: &str) -> anyhow::Result<SocketAddr> {
    if let Ok(port) = text.parse::<u16>() {
        return Ok(SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port));
    }
    text.parse::<SocketAddr>()
        .map_err(|_| anyhow::anyhow!("--local `{text}` must be a port or ip:port"))
}

/// One `alias:port` forwarded to one local address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Forward {
    pub alias: String,
    pub port: u16,
    pub local: SocketAddr,
}

/// Pairs targets and `--local`s in order; one target with several
/// `--local`s serves it on each.
pub fn pair_forwards(targets: &[String], locals: &[String]) -> anyhow::Result<Vec<Forward>> {
    if targets.is_empty() {
        bail!("give at least one <alias>:<port> to forward");
    }
    if locals.is_empty() {
        bail!("give --local <port> for each <alias>:<port>");
    }
    let parsed: Vec<(String, u16)> = targets
        .iter()
        .map(|t| parse_target(t))
        .collect::<anyhow::Result<_>>()?;
    let locals: Vec<SocketAddr> = locals
        .iter()
        .map(|l| parse_local(l))
        .collect::<anyhow::Result<_>>()?;
    let forwards: Vec<Forward> = if parsed.len() == 1 {
        locals
            .iter()
            .map(|local| Forward {
                alias: parsed[0].0.clone(),
                port: parsed[0].1,
                local: *local,
            })
            .collect()
    } else if parsed.len() == locals.len() {
        parsed
            .into_iter()
            .zip(locals)
            .map(|((alias, port), local)| Forward { alias, port, local })
            .collect()
    } else {
        bail!(
            "{} targets but {} --local: give one --local per target, in the same order",
            parsed.len(),
            locals.len()
        );
    };
    for (i, f) in forwards.iter().enumerate() {
        if forwards[..i].iter().any(|g| g.local == f.local) {
            bail!("--local {} is given twice", f.local);
        }
    }
    Ok(forwards)
}

/// A TLS channel to the mesh control URL, trusting exactly `ca_pem`.
async fn mesh_client(url: &str, ca_pem: &[u8]) -> anyhow::Result<MeshControlClient<Channel>> {
    let url = url.trim_end_matches('/');
    if !url.starts_with("https://") {
        bail!("mesh control URL `{url}` must start with https://");
    }
    let channel = Channel::from_shared(url.to_owned())
        .map_err(|err| anyhow::anyhow!("mesh control URL `{url}`: {err}"))?
        .tls_config(ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca_pem)))
        .context("TLS settings")?
        .connect_timeout(Duration::from_secs(5))
        .http2_keep_alive_interval(Duration::from_secs(20))
        .keep_alive_while_idle(true)
        .connect()
        .await
        .map_err(|err| anyhow::anyhow!("cannot reach the mesh control URL {url}: {err}"))?;
    Ok(MeshControlClient::new(channel))
}

fn with_credential<T>(message: T, credential: &str) -> anyhow::Result<tonic::Request<T>> {
    let mut request = tonic::Request::new(message);
    let mut value: MetadataValue<Ascii> = format!("Bearer {credential}")
        .parse()
        .map_err(|_| anyhow::anyhow!("the node credential in the mesh state is damaged"))?;
    value.set_sensitive(true);
    request.metadata_mut().insert("authorization", value);
    Ok(request)
}

fn hostname() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_else(|| "laptop".to_owned())
}

/// `gstacks mesh join <network> [--ttl]`.
pub async fn join(
    api: &mut Api,
    resolved: &Resolved,
    network: String,
    ttl: Duration,
    json: bool,
) -> anyhow::Result<i32> {
    let path = state_path()?;
    if let Ok(Some(old)) = load_state(&path) {
        // One network at a time: the previous node leaves first.
        if let Ok(mut client) = mesh_client(&old.mesh_control_url, old.ca_pem.as_bytes()).await {
            if let Ok(request) = with_credential(
                RemoveNodeRequest {
                    node_id: old.node_id.clone(),
                },
                &old.node_credential,
            ) {
                let _ = client.remove_node(request).await;
            }
        }
        let _ = std::fs::remove_file(&path);
    }
    let ttl_secs = i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX);
    let joined = api
        .mesh_join(proto::MeshJoinRequest {
            network: network.clone(),
            ttl_secs,
        })
        .await
        .map_err(status_error)?
        .into_inner();
    let key = PrivateKey::generate();
    let mut client = mesh_client(&joined.mesh_control_url, &resolved.ca_pem).await?;
    let host = hostname();
    let registered = client
        .register_node(RegisterNodeRequest {
            pre_auth_key: joined.pre_auth_key,
            node_public_key: key.public_key().to_string(),
            hostname: host.clone(),
            network: network.clone(),
            endpoint: String::new(),
            ttl_secs: joined.ttl_secs,
        })
        .await
        .map_err(status_error)?
        .into_inner();
    let state = MeshState {
        network: network.clone(),
        mesh_control_url: joined.mesh_control_url,
        ca_pem: String::from_utf8_lossy(&resolved.ca_pem).into_owned(),
        node_id: registered.node_id,
        node_credential: registered.node_credential,
        private_key: key.to_base64(),
        addresses: registered.addresses,
        expires_at_ms: registered.expires_at_ms,
        joined_at_ms: now_ms(),
        hostname: host,
    };
    save_state(&path, &state)?;
    if json {
        println!(
            "{}",
            serde_json::json!({
                "network": state.network,
                "node_id": state.node_id,
                "addresses": state.addresses,
                "expires_at_ms": state.expires_at_ms,
                "state_file": path.display().to_string(),
            })
        );
    } else {
        println!(
            "joined network `{}` as node {} ({})",
            state.network,
            state.node_id,
            state.addresses.join(", ")
        );
        println!(
            "credential expires at {}; state in {}",
            rfc3339(state.expires_at_ms),
            path.display()
        );
        println!(
            "next: gstacks mesh forward {} <alias>:<port> --local <port>",
            state.network
        );
    }
    Ok(0)
}

/// The first netmap of a WatchNetmap stream, or the refusal in words.
async fn first_netmap(
    state: &MeshState,
) -> anyhow::Result<(tonic::Streaming<Netmap>, Netmap), (bool, String)> {
    let fail = |join_again: bool, text: String| (join_again, text);
    let mut client = mesh_client(&state.mesh_control_url, state.ca_pem.as_bytes())
        .await
        .map_err(|err| fail(false, format!("{err:#}")))?;
    let request = with_credential(
        WatchNetmapRequest {
            node_id: state.node_id.clone(),
        },
        &state.node_credential,
    )
    .map_err(|err| fail(true, format!("{err:#}")))?;
    let mut stream = client
        .watch_netmap(request)
        .await
        .map_err(|status| watch_failure(&status))?
        .into_inner();
    match stream.message().await {
        Ok(Some(netmap)) => Ok((stream, netmap)),
        Ok(None) => Err(fail(
            false,
            "the control plane ended the netmap stream".into(),
        )),
        Err(status) => Err(watch_failure(&status)),
    }
}

/// (join again?, what to print) for a failed WatchNetmap.
fn watch_failure(status: &tonic::Status) -> (bool, String) {
    match status.code() {
        tonic::Code::Unauthenticated | tonic::Code::PermissionDenied => {
            (true, status.message().to_owned())
        }
        _ => (false, status_error(status.clone()).to_string()),
    }
}

/// A local expiry check, so an expired credential is named without a call.
fn expired_locally(state: &MeshState) -> Option<String> {
    (state.expires_at_ms <= now_ms()).then(|| {
        format!(
            "credential expired at {}: run `gstacks mesh join {}` again",
            rfc3339(state.expires_at_ms),
            state.network
        )
    })
}

fn pid_alive(pid: u32) -> bool {
    let Ok(pid) = i32::try_from(pid) else {
        return false;
    };
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok()
}

/// `gstacks mesh status [--json]`.
pub async fn status(json: bool) -> anyhow::Result<i32> {
    let path = state_path()?;
    let state = require_state(&path)?;
    let forward: Option<ForwardStatus> = std::fs::read(forward_status_path(&path))
        .ok()
        .and_then(|bytes| serde_json::from_slice::<ForwardStatus>(&bytes).ok())
        .filter(|f| pid_alive(f.pid));
    let live = match expired_locally(&state) {
        Some(why) => Err((true, why)),
        None => tokio::time::timeout(STATUS_WAIT, first_netmap(&state))
            .await
            .unwrap_or_else(|_| Err((false, "no netmap from the control plane within 5 s".into())))
            .map(|(_, netmap)| netmap),
    };
    let seen = |key: &str| {
        forward
            .as_ref()
            .and_then(|f| f.peers.iter().find(|p| p.public_key == key))
            .cloned()
    };
    let peers: Vec<serde_json::Value> = match &live {
        Ok(netmap) => netmap
            .peers
            .iter()
            .map(|p| {
                let s = seen(&p.public_key).unwrap_or_default();
                serde_json::json!({
                    "node_id": p.node_id,
                    "kind": p.kind,
                    "host_id": p.host_id,
                    "addresses": p.addresses,
                    "endpoint": if s.endpoint.is_empty() { p.endpoint.clone() } else { s.endpoint.clone() },
                    "last_handshake_ms": s.last_handshake_ms,
                    "rx_bytes": s.rx_bytes,
                    "tx_bytes": s.tx_bytes,
                })
            })
            .collect(),
        Err(_) => vec![],
    };
    let (credential, problem) = match &live {
        Ok(_) => ("valid", None),
        Err((true, why)) => ("refused", Some(why.clone())),
        Err((false, why)) => ("unknown", Some(why.clone())),
    };
    let topology_version = live.as_ref().map(|n| n.topology_version).ok();
    if json {
        println!(
            "{}",
            serde_json::json!({
                "network": state.network,
                "node_id": state.node_id,
                "hostname": state.hostname,
                "addresses": state.addresses,
                "mesh_control_url": state.mesh_control_url,
                "expires_at_ms": state.expires_at_ms,
                "credential": credential,
                "problem": problem,
                "topology_version": topology_version,
                "forwarding": forward.as_ref().map(|f| serde_json::json!({"pid": f.pid, "forwards": f.forwards, "udp_port": f.udp_port})),
                "peers": peers,
            })
        );
    } else {
        println!("network:          {}", state.network);
        println!("node:             {} ({})", state.node_id, state.hostname);
        println!("addresses:        {}", state.addresses.join(", "));
        println!(
            "credential:       {credential}, expires at {}",
            rfc3339(state.expires_at_ms)
        );
        match topology_version {
            Some(v) => println!("topology version: {v}"),
            None => println!("topology version: unknown"),
        }
        match &forward {
            Some(f) => println!(
                "forwarding:       pid {}: {}",
                f.pid,
                f.forwards.join(", ")
            ),
            None => println!("forwarding:       not running (handshakes are seen while `gstacks mesh forward` runs)"),
        }
        if let Some(problem) = &problem {
            println!("problem:          {problem}");
        }
        if !peers.is_empty() {
            println!();
            println!(
                "{:<28} {:<6} {:<22} {:<24} LAST HANDSHAKE",
                "PEER", "KIND", "ADDRESS", "ENDPOINT"
            );
            for p in &peers {
                let handshake = p["last_handshake_ms"].as_i64().unwrap_or(0);
                let handshake = if handshake == 0 {
                    "never".to_owned()
                } else {
                    format!(
                        "{} ({}s ago)",
                        rfc3339(handshake),
                        (now_ms() - handshake).max(0) / 1000
                    )
                };
                let endpoint = p["endpoint"].as_str().unwrap_or("");
                println!(
                    "{:<28} {:<6} {:<22} {:<24} {}",
                    p["node_id"].as_str().unwrap_or(""),
                    p["kind"].as_str().unwrap_or(""),
                    p["addresses"][0].as_str().unwrap_or(""),
                    if endpoint.is_empty() { "-" } else { endpoint },
                    handshake
                );
            }
        }
    }
    Ok(match problem {
        Some(_) if credential == "refused" => EXIT_JOIN_AGAIN,
        _ => 0,
    })
}

/// WireGuard peers from a netmap (a bad entry is skipped and named).
pub fn peer_configs(netmap: &Netmap) -> Vec<PeerConfig> {
    let mut out = Vec::new();
    for peer in &netmap.peers {
        let Ok(public_key) = peer.public_key.parse::<PublicKey>() else {
            eprintln!(
                "warning: peer {} has a bad public key; skipped",
                peer.node_id
            );
            continue;
        };
        let endpoint = if peer.endpoint.trim().is_empty() {
            None
        } else {
            match peer.endpoint.trim().parse::<SocketAddr>() {
                Ok(e) => Some(e),
                Err(_) => {
                    eprintln!(
                        "warning: peer {} has endpoint `{}` that is not ip:port; skipped",
                        peer.node_id, peer.endpoint
                    );
                    continue;
                }
            }
        };
        let allowed_ips = peer
            .allowed_ips
            .iter()
            .filter_map(|ip| ip.parse().ok())
            .collect();
        out.push(PeerConfig {
            public_key,
            endpoint,
            allowed_ips,
            persistent_keepalive: Some(KEEPALIVE_SECS),
            preshared_key: None,
        });
    }
    out
}

/// Where `alias:port` of `network` is served: the overlay address of the
/// agent that runs it, port 4180; or why it cannot be reached.
pub fn resolve_target(
    netmap: &Netmap,
    network: &str,
    alias: &str,
    port: u16,
) -> Result<SocketAddr, String> {
    let name = format!("{alias}.{network}.gstacks");
    let record = netmap
        .dns_records
        .iter()
        .find(|r| r.name.eq_ignore_ascii_case(&name))
        .ok_or_else(|| format!("alias `{alias}` does not exist in network `{network}`"))?;
    if !record.ports.iter().any(|p| *p == u32::from(port)) {
        let ports: Vec<String> = record.ports.iter().map(u32::to_string).collect();
        return Err(format!(
            "{name} does not publish port {port} (it publishes {})",
            ports.join(", ")
        ));
    }
    let address: IpAddr = record
        .target_node_address
        .parse()
        .map_err(|_| format!("{name} has no reachable node yet (its host has no mesh node)"))?;
    Ok(SocketAddr::new(address, proxy::MESH_PROXY_PORT))
}

fn node_addresses(state: &MeshState) -> anyhow::Result<Vec<IpAddr>> {
    state
        .addresses
        .iter()
        .map(|a| {
            let bare = a.split('/').next().unwrap_or(a);
            bare.parse::<IpAddr>()
                .map_err(|_| anyhow::anyhow!("mesh state: address `{a}` is not an IP"))
        })
        .collect()
}

/// `gstacks mesh forward <network> <alias:port>... --local <port>...`.
pub async fn forward(network: String, forwards: Vec<Forward>) -> anyhow::Result<i32> {
    let path = state_path()?;
    let state = require_state(&path)?;
    if state.network != network {
        bail!(
            "this machine joined network `{}`, not `{network}`: run `gstacks mesh join {network}`",
            state.network
        );
    }
    if let Some(why) = expired_locally(&state) {
        eprintln!("error: {why}");
        return Ok(EXIT_JOIN_AGAIN);
    }
    let (mut stream, netmap) = match first_netmap(&state).await {
        Ok(first) => first,
        Err((true, why)) => {
            eprintln!("error: {why}");
            return Ok(EXIT_JOIN_AGAIN);
        }
        Err((false, why)) => bail!(why),
    };
    let key: PrivateKey = state
        .private_key
        .parse()
        .map_err(|_| anyhow::anyhow!("mesh state: the node key is damaged; join again"))?;
    let node = Arc::new(
        MeshNode::bind(
            NodeConfig {
                private_key: key,
                addresses: node_addresses(&state)?,
                listen: "0.0.0.0:0".parse().expect("literal address"),
            },
            peer_configs(&netmap),
        )
        .await
        .context("starting the mesh node")?,
    );
    let current = Arc::new(RwLock::new(netmap));
    let mut listeners = Vec::new();
    for f in &forwards {
        let listener = tokio::net::TcpListener::bind(f.local)
            .await
            .with_context(|| format!("listening on {}", f.local))?;
        listeners.push((f.clone(), listener));
    }
    let mut described = Vec::new();
    for (f, listener) in &listeners {
        let local = listener.local_addr().unwrap_or(f.local);
        let line = format!("{local} -> {}.{network}.gstacks:{}", f.alias, f.port);
        println!("forwarding {line}");
        described.push(line);
    }
    println!("Ctrl-C stops");
    let _ = std::io::stdout().flush();

    let mut tasks = tokio::task::JoinSet::new();
    for (f, listener) in listeners {
        let node = node.clone();
        let current = current.clone();
        let network = network.clone();
        tasks.spawn(serve_forward(node, current, network, f, listener));
    }
    let status_path = forward_status_path(&path);
    {
        let node = node.clone();
        let current = current.clone();
        let status_path = status_path.clone();
        tasks.spawn(async move {
            let mut tick = tokio::time::interval(STATUS_EVERY);
            loop {
                tick.tick().await;
                let version = current
                    .read()
                    .map(|n| n.topology_version)
                    .unwrap_or_default();
                let status = forward_status(&node, version, described.clone());
                if let Ok(bytes) = serde_json::to_vec(&status) {
                    // fsync off the runtime's workers, which carry the data.
                    let path = status_path.clone();
                    let _ = tokio::task::spawn_blocking(move || write_private(&path, &bytes)).await;
                }
            }
        });
    }

    let outcome = loop {
        tokio::select! {
            signal = tokio::signal::ctrl_c() => {
                signal.context("waiting for Ctrl-C")?;
                break 0;
            }
            message = stream.message() => match message {
                Ok(Some(netmap)) => {
                    if let Err(err) = node.set_peers(peer_configs(&netmap)) {
                        eprintln!("warning: peers not applied: {err}");
                    }
                    if let Ok(mut slot) = current.write() {
                        *slot = netmap;
                    }
                }
                Ok(None) | Err(_) => {
                    let failure = match message {
                        Err(status) => watch_failure(&status),
                        _ => (false, "the control plane ended the netmap stream".to_owned()),
                    };
                    if failure.0 {
                        eprintln!("error: {}", failure.1);
                        break EXIT_JOIN_AGAIN;
                    }
                    // Not a refusal: keep forwarding with the last netmap and
                    // follow again once the control plane answers.
                    eprintln!("warning: {}; reconnecting", failure.1);
                    let netmap;
                    (stream, netmap) = match reconnect(&state).await {
                        Ok(again) => again,
                        Err(why) => {
                            eprintln!("error: {why}");
                            break EXIT_JOIN_AGAIN;
                        }
                    };
                    if let Err(err) = node.set_peers(peer_configs(&netmap)) {
                        eprintln!("warning: peers not applied: {err}");
                    }
                    if let Ok(mut slot) = current.write() {
                        *slot = netmap;
                    }
                    eprintln!("following the netmap again");
                }
            }
        }
    };
    tasks.abort_all();
    node.shutdown().await;
    let _ = std::fs::remove_file(&status_path);
    Ok(outcome)
}

/// Follows the netmap again after a broken stream (backing off up to 10 s);
/// Err only when the credential is refused.
async fn reconnect(state: &MeshState) -> Result<(tonic::Streaming<Netmap>, Netmap), String> {
    let mut wait = Duration::from_millis(500);
    loop {
        tokio::time::sleep(wait).await;
        match first_netmap(state).await {
            Ok(again) => return Ok(again),
            Err((true, why)) => return Err(why),
            Err((false, why)) => {
                eprintln!("warning: {why}; retrying in {}s", wait.as_secs().max(1));
                wait = (wait * 2).min(Duration::from_secs(10));
            }
        }
    }
}

fn forward_status(node: &MeshNode, version: u64, forwards: Vec<String>) -> ForwardStatus {
    let status = node.status();
    let (now, now_ms) = (Instant::now(), now_ms());
    ForwardStatus {
        pid: std::process::id(),
        updated_at_ms: now_ms,
        topology_version: version,
        udp_port: node.local_addr().port(),
        forwards,
        peers: status
            .peers
            .iter()
            .map(|p| PeerSeen {
                public_key: p.public_key.to_string(),
                endpoint: p.endpoint.map(|e| e.to_string()).unwrap_or_default(),
                last_handshake_ms: p.last_handshake.map_or(0, |at| {
                    now_ms
                        - i64::try_from(now.saturating_duration_since(at).as_millis()).unwrap_or(0)
                }),
                rx_bytes: p.rx_bytes,
                tx_bytes: p.tx_bytes,
            })
            .collect(),
    }
}

async fn serve_forward(
    node: Arc<MeshNode>,
    current: Arc<RwLock<Netmap>>,
    network: String,
    f: Forward,
    listener: tokio::net::TcpListener,
) {
    loop {
        let (socket, from) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(err) => {
                eprintln!("warning: accepting on {}: {err}", f.local);
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let node = node.clone();
        let target = current
            .read()
            .map_err(|_| "netmap unavailable".to_owned())
            .and_then(|netmap| resolve_target(&netmap, &network, &f.alias, f.port));
        let network = network.clone();
        let f = f.clone();
        tokio::spawn(async move {
            let what = format!("{from} -> {}.{network}.gstacks:{}", f.alias, f.port);
            let target = match target {
                Ok(target) => target,
                Err(why) => {
                    eprintln!("refused {what}: {why}");
                    return;
                }
            };
            let header = proxy::MeshHeader {
                network: network.clone(),
                alias: f.alias.clone(),
                port: f.port,
                source: policy::Source::local(),
            };
            let mut socket = socket;
            let _ = socket.set_nodelay(true);
            let spliced = match proxy::dial_over_mesh(&node, target, &header).await {
                Ok(mut mesh) => proxy::splice(&mut socket, &mut mesh).await,
                Err(err) => return eprintln!("failed {what}: {err}"),
            };
            // The agent's refusal comes as the first bytes from the mesh.
            match spliced.as_ref().map_err(proxy::refusal) {
                Err(Some(proxy::ProxyError::Denied { reason })) => {
                    eprintln!("denied {what}: {reason}");
                }
                Err(Some(refused)) => eprintln!("failed {what}: {refused}"),
                _ => {}
            }
        });
    }
}

/// `gstacks mesh leave`.
pub async fn leave(json: bool) -> anyhow::Result<i32> {
    let path = state_path()?;
    let state = require_state(&path)?;
    let removed = async {
        let mut client = mesh_client(&state.mesh_control_url, state.ca_pem.as_bytes()).await?;
        let request = with_credential(
            RemoveNodeRequest {
                node_id: state.node_id.clone(),
            },
            &state.node_credential,
        )?;
        client
            .remove_node(request)
            .await
            .map_err(|status| anyhow::anyhow!("{}", status.message()))?;
        anyhow::Ok(())
    }
    .await;
    std::fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
    let _ = std::fs::remove_file(forward_status_path(&path));
    let note = match &removed {
        Ok(()) => format!(
            "node {} removed from network `{}`",
            state.node_id, state.network
        ),
        Err(err) => format!(
            "node {} was not removed on the control plane ({err:#}); local state deleted",
            state.node_id
        ),
    };
    if json {
        println!(
            "{}",
            serde_json::json!({"node_id": state.node_id, "network": state.network, "removed": removed.is_ok(), "detail": note})
        );
    } else {
        println!("{note}");
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forwards_pair_in_order_or_fan_out() {
        let f = pair_forwards(&["api:8080".into()], &["18080".into(), "18081".into()]).unwrap();
        assert_eq!(f.len(), 2);
        assert_eq!(f[1].local, "127.0.0.1:18081".parse().unwrap());
        let f = pair_forwards(
            &["api:8080".into(), "db:5432".into()],
            &["18080".into(), "127.0.0.2:15432".into()],
        )
        .unwrap();
        assert_eq!(f[1].alias, "db");
        assert_eq!(f[1].local, "127.0.0.2:15432".parse().unwrap());
        let err =
            pair_forwards(&["api:8080".into(), "db:5432".into()], &["18080".into()]).unwrap_err();
        assert!(err.to_string().contains("one --local per target"), "{err}");
        assert!(pair_forwards(&["api".into()], &["1".into()]).is_err());
        assert!(pair_forwards(&["api:0".into()], &["1".into()]).is_err());
        assert!(pair_forwards(&["Bad_Alias!:80".into()], &["1".into()]).is_err());
        assert!(pair_forwards(&["api:80".into()], &["1".into(), "1".into()]).is_err());
    }

    fn netmap() -> Netmap {
        Netmap {
            dns_records: vec![proto::DnsRecord {
                name: "api.dev.gstacks".into(),
                network: "dev".into(),
                alias: "api".into(),
                ports: vec![8080],
                target_node_address: "100.64.0.2".into(),
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    #[test]
    fn targets_resolve_from_the_netmap_or_say_why_not() {
        let n = netmap();
        assert_eq!(
            resolve_target(&n, "dev", "api", 8080).unwrap(),
            "100.64.0.2:4180".parse().unwrap()
        );
        assert!(resolve_target(&n, "dev", "api", 9090)
            .unwrap_err()
            .contains("does not publish port 9090"));
        assert!(resolve_target(&n, "dev", "db", 8080)
            .unwrap_err()
            .contains("alias `db` does not exist"));
    }

    #[test]
    fn state_is_written_0600_and_refused_when_readable_by_others() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("gstacks/mesh.json");
        let state = MeshState {
            network: "dev".into(),
            mesh_control_url: "https://127.0.0.1:7443".into(),
            ca_pem: String::new(),
            node_id: "node_lcl_1".into(),
            node_credential: "gsmn.node_lcl_1.secretsecretsecretsecret".into(),
            private_key: PrivateKey::generate().to_base64(),
            addresses: vec!["100.64.0.3/32".into()],
            expires_at_ms: 1,
            joined_at_ms: 0,
            hostname: "lap".into(),
        };
        save_state(&path, &state).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let dir_mode = std::fs::metadata(path.parent().unwrap())
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(dir_mode, 0o700);
        assert_eq!(load_state(&path).unwrap().unwrap(), state);
        assert!(!format!("{state:?}").contains("secret"));
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(load_state(&path)
            .unwrap_err()
            .to_string()
            .contains("readable by others"));
        assert!(expired_locally(&state)
            .unwrap()
            .contains("run `gstacks mesh join dev` again"));
    }
}
