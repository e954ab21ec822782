//! The network module of the agent (`agent_proxy` mode): mesh membership,
//! netmap apply, the agent DNS, the alias listeners, policy at both ends,
//! live changes and the `NetworkDiagnose` handler.
//!
//! [`Network::start`] takes netmaps from a `watch` channel (the control
//! stream's, or a test's) and applies each one whole:
//! 1. the mesh node is bound once the overlay addresses are known (its key
//!    is the host's own, see [`node_key`]), and gets the peers on every
//!    netmap (`set_peers` keeps sessions of peers that stay);
//! 2. the topology is swapped in, and every open connection is decided
//!    again: one that is no longer allowed is closed at once;
//! 3. alias listeners are started and stopped to match the aliases (one
//!    address per alias on each side: loopback for host processes, the
//!    container-reachable range for sandboxes);
//! 4. the DNS tables are rebuilt and swapped in;
//! 5. the topology version is recorded (it goes into the next `Hello`).

mod addresses;
mod connections;
mod container_route;
mod diagnose;
mod listeners;
pub mod node_key;
pub mod settings;
pub mod topology;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use netstack::{MeshNode, NodeConfig, PrivateKey};
use proto::{EventLevel, MeshNodeInfo, Netmap};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::dispatch::{event, CommandKind, Link};
use crate::error::AgentError;

pub use connections::{NetworkStats, Side};
pub use diagnose::NetworkModule;
pub use settings::{NetworkSettings, ProxyBind};
pub use topology::{Identity, ListenerKey, Topology};

use addresses::AddressBook;
use connections::Connections;

/// The command kinds the network module handles.
pub const KINDS: &[CommandKind] = &[CommandKind::NetworkDiagnose];

/// Who an alias listener faces: host processes on loopback, or containers
/// on the container-reachable address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Facing {
    Loopback,
    Containers,
}

/// Kind of the event sent for every denied (or revoked) connection.
pub const DENIED_EVENT: &str = "network.connection.denied";

/// What the apply loop shares with the listeners, the mesh acceptor and the
/// diagnose handler.
struct Shared {
    settings: NetworkSettings,
    host_id: String,
    key: PrivateKey,
    link: Link,
    topology: RwLock<Arc<Topology>>,
    applied_version: Arc<AtomicU64>,
    /// The mesh node, its acceptor, and why the last bind failed.
    mesh: Mutex<MeshState>,
    connections: Connections,
    stats: NetworkStats,
    loopback_records: dns::Records,
    container_records: dns::Records,
    /// The loopback DNS address, `None` when it could not be bound.
    dns_addr: Option<SocketAddr>,
    /// The container-side DNS (port 53 of the container address), once bound.
    container_dns_addr: RwLock<Option<SocketAddr>>,
    /// Where each alias listener accepts.
    listener_addrs: RwLock<HashMap<(Facing, ListenerKey), SocketAddr>>,
}

#[derive(Default)]
struct MeshState {
    node: Option<MeshNode>,
    acceptor: Option<JoinHandle<()>>,
    error: Option<String>,
}

impl Shared {
    fn topology(&self) -> Arc<Topology> {
        self.topology
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn node(&self) -> Option<MeshNode> {
        self.mesh
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .node
            .clone()
    }

    /// Sends a denial event without waiting without waiting (a full outbox drops
    /// it and counts the drop: the data path never waits for the stream).
    fn report_denied(
        &self,
        side: &str,
        (network, alias, port): (&str, &str, u16),
        source: &str,
        rule: Option<&str>,
        reason: &str,
    ) {
        tracing::debug!(
            side,
            network,
            alias,
            port,
            source,
            rule,
            reason,
            "connection denied"
        );
        let mut ev = event(
            DENIED_EVENT,
            EventLevel::Warn,
            format!("{source} -> {alias}.{network}.gstacks:{port} {reason}"),
        );
        for (k, v) in [
            ("network", network.to_owned()),
            ("alias", alias.to_owned()),
            ("port", port.to_string()),
            ("source", source.to_owned()),
            ("side", side.to_owned()),
            ("reason", reason.to_owned()),
        ] {
            ev.fields.insert(k.into(), v);
        }
        if let Some(rule) = rule {
            ev.fields.insert("rule".into(), rule.to_owned());
        }
        if !self.link.try_send_event(ev) {
            self.stats.events_dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// The running network module. Dropping it does not stop it; cancel the
/// shutdown token given to [`Network::start`].
#[derive(Clone)]
pub struct Network {
    shared: Arc<Shared>,
    dns_addr: Option<SocketAddr>,
    task: Arc<Mutex<Option<JoinHandle<()>>>>,
}

impl std::fmt::Debug for Network {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Network")
            .field("host_id", &self.shared.host_id)
            .field("dns_addr", &self.dns_addr)
            .finish_non_exhaustive()
    }
}

/// What `Hello.mesh` says about this agent's node.
pub fn mesh_node_info(key: &PrivateKey, settings: &NetworkSettings) -> MeshNodeInfo {
    MeshNodeInfo {
        public_key: key.public_key().to_string(),
        endpoint: settings.mesh_endpoint.clone().unwrap_or_default(),
    }
}

impl Network {
    /// Binds the agent DNS (loopback, and port 53 of the container address
    /// when one is configured) and starts applying the netmaps of `netmaps`
    /// until `shutdown`. `applied_version` receives each applied topology
    /// version.
    pub async fn start(
        settings: NetworkSettings,
        host_id: String,
        key: PrivateKey,
        mut netmaps: watch::Receiver<Option<Netmap>>,
        link: Link,
        applied_version: Arc<AtomicU64>,
        shutdown: CancellationToken,
    ) -> Result<Network, AgentError> {
        let upstream = match dns::Upstream::system() {
            Ok(upstream) => upstream,
            Err(e) => {
                tracing::warn!("agent DNS: {e}; names outside .gstacks get SERVFAIL");
                dns::Upstream::none()
            }
        };
        let loopback_records = dns::Records::new(dns::RecordTable::new());
        let container_records = dns::Records::new(dns::RecordTable::new());
        // A DNS port that is taken must not keep the agent off its control
        // stream: it is said loudly, and `network test` shows it.
        let dns = match dns::DnsServer::bind(
            settings.dns_addr,
            loopback_records.clone(),
            upstream.clone(),
        )
        .await
        {
            Ok(server) => Some(server),
            Err(e) => {
                tracing::error!(
                    "agent DNS is not served: {e}; set {} to a free address",
                    crate::config::MESH_DNS_ADDR
                );
                None
            }
        };
        let dns_addr = dns.as_ref().map(dns::DnsServer::local_addr);
        if settings.container_addr.is_none() {
            tracing::warn!(
                "no container-reachable address ({}): the agent DNS and the alias listeners serve loopback only",
                crate::config::MESH_CONTAINER_ADDR
            );
        }
        let shared = Arc::new(Shared {
            settings,
            host_id,
            key,
            link,
            topology: RwLock::new(Arc::new(Topology::default())),
            applied_version,
            mesh: Mutex::new(MeshState::default()),
            connections: Connections::default(),
            stats: NetworkStats::default(),
            loopback_records,
            container_records,
            dns_addr,
            container_dns_addr: RwLock::new(None),
            listener_addrs: RwLock::new(HashMap::new()),
        });
        let apply_shared = shared.clone();
        let task = tokio::spawn(async move {
            let mut apply = Applier::new(apply_shared.clone(), upstream);
            apply.ensure_container_dns().await;
            loop {
                let netmap = netmaps.borrow_and_update().clone();
                if let Some(netmap) = netmap {
                    apply.apply(&netmap).await;
                }
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    changed = netmaps.changed() => if changed.is_err() {
                        // The sender is gone: keep serving the last netmap.
                        shutdown.cancelled().await;
                        break;
                    },
                }
            }
            apply.stop().await;
            if let Some(server) = dns {
                let _ = server.shutdown().await;
            }
        });
        Ok(Network {
            shared,
            dns_addr,
            task: Arc::new(Mutex::new(Some(task))),
        })
    }

    /// Waits until the module has stopped (after its shutdown token).
    pub async fn stopped(&self) {
        let task = self.task.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(task) = task {
            let _ = task.await;
        }
    }

    /// The `NetworkDiagnose` handler, to register with the dispatcher.
    pub fn module(&self) -> Arc<NetworkModule> {
        Arc::new(NetworkModule::new(self.shared.clone()))
    }

    /// The loopback agent DNS (UDP and TCP), when served.
    pub fn dns_addr(&self) -> Option<SocketAddr> {
        self.dns_addr
    }

    /// The container-side DNS, when served.
    pub fn container_dns_addr(&self) -> Option<SocketAddr> {
        *self
            .shared
            .container_dns_addr
            .read()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// Where the loopback listener of `alias:port` in `network` accepts.
    pub fn listener_addr(&self, network: &str, alias: &str, port: u16) -> Option<SocketAddr> {
        let key = ListenerKey {
            network: network.to_owned(),
            alias: alias.to_owned(),
            port,
        };
        self.shared
            .listener_addrs
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&(Facing::Loopback, key))
            .copied()
    }

    /// The container-side listener of `alias:port` in `network`.
    pub fn container_listener_addr(
        &self,
        network: &str,
        alias: &str,
        port: u16,
    ) -> Option<SocketAddr> {
        let key = ListenerKey {
            network: network.to_owned(),
            alias: alias.to_owned(),
            port,
        };
        self.shared
            .listener_addrs
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&(Facing::Containers, key))
            .copied()
    }

    /// The mesh node's UDP address once it is bound.
    pub fn mesh_addr(&self) -> Option<SocketAddr> {
        self.shared.node().map(|n| n.local_addr())
    }

    pub fn public_key(&self) -> netstack::PublicKey {
        self.shared.key.public_key()
    }

    /// The last topology version applied.
    pub fn applied_version(&self) -> u64 {
        self.shared.applied_version.load(Ordering::Relaxed)
    }

    pub fn stats(&self) -> &NetworkStats {
        &self.shared.stats
    }

    /// Proxied connections open now (both sides).
    pub fn open_connections(&self) -> usize {
        self.shared.connections.count()
    }
}

/// Owns the listeners and the address books; runs on the apply task only.
struct Applier {
    shared: Arc<Shared>,
    loopback_book: AddressBook,
    container_book: Option<AddressBook>,
    /// The container side has its final addresses (no retry needed).
    container_range_ready: bool,
    /// The container-side DNS; bound at start, or retried on each netmap
    /// (the sandbox bridge is made on first use).
    container_dns: Option<dns::DnsServer>,
    container_dns_warned: bool,
    upstream: dns::Upstream,
    listeners: HashMap<(Facing, ListenerKey), (SocketAddr, JoinHandle<()>)>,
}

impl Applier {
    fn new(shared: Arc<Shared>, upstream: dns::Upstream) -> Self {
        let loopback_book = AddressBook::new(shared.settings.proxy_bind.clone());
        Self {
            shared,
            loopback_book,
            container_book: None,
            container_range_ready: false,
            container_dns: None,
            container_dns_warned: false,
            upstream,
            listeners: HashMap::new(),
        }
    }

    /// Binds the container-side DNS unless it is bound or not configured.
    async fn ensure_container_dns(&mut self) {
        let Some(ip) = self.shared.settings.container_addr else {
            return;
        };
        if self.container_dns.is_some() {
            return;
        }
        let addr = SocketAddr::new(ip, settings::CONTAINER_DNS_PORT);
        match dns::DnsServer::bind(
            addr,
            self.shared.container_records.clone(),
            self.upstream.clone(),
        )
        .await
        {
            Ok(server) => {
                *self
                    .shared
                    .container_dns_addr
                    .write()
                    .unwrap_or_else(|e| e.into_inner()) = Some(server.local_addr());
                if self.container_dns_warned {
                    tracing::info!(%addr, "container DNS served");
                }
                self.container_dns = Some(server);
            }
            Err(e) if !self.container_dns_warned => {
                self.container_dns_warned = true;
                tracing::warn!(
                    "container DNS on {addr} is not served yet ({e}); is the sandbox bridge up, and may this agent bind port 53? Retried on every netmap; loopback is served"
                );
            }
            Err(e) => tracing::debug!(%addr, error = %e, "container DNS still not bound"),
        }
    }

    /// The container side's addresses: the configured range once its local
    /// route is in place, else the container address alone (tried again on
    /// the next netmap: the bridge may come up later).
    fn container_bind(&mut self) {
        let Some(ip) = self.shared.settings.container_addr else {
            return;
        };
        if self.container_range_ready {
            return;
        }
        let bind = match &self.shared.settings.container_proxy_bind {
            ProxyBind::Single(single) => {
                self.container_range_ready = true;
                ProxyBind::Single(*single)
            }
            ProxyBind::Range(ipnet::IpNet::V4(range)) => {
                match container_route::interface_of(ip).and_then(|(name, index)| {
                    container_route::ensure_local_route(*range, index).map(|()| name)
                }) {
                    Ok(name) => {
                        tracing::info!(%range, interface = %name, "container-side alias addresses are local on {name}");
                        self.container_range_ready = true;
                        ProxyBind::Range(ipnet::IpNet::V4(*range))
                    }
                    Err(e) => {
                        if self.container_book.is_none() {
                            tracing::warn!(
                                %range,
                                "container-side alias addresses unavailable ({e}); containers reach the listeners on {ip} alone, where aliases with the same port collide"
                            );
                        }
                        ProxyBind::Single(ip)
                    }
                }
            }
            ProxyBind::Range(range) => {
                tracing::warn!(%range, "an IPv6 container proxy range is not supported; containers reach the listeners on {ip} alone");
                self.container_range_ready = true;
                ProxyBind::Single(ip)
            }
        };
        let changed = self
            .container_book
            .as_ref()
            .is_none_or(|book| book.bind() != &bind);
        if changed {
            self.container_book = Some(AddressBook::new(bind));
        }
    }

    async fn apply(&mut self, netmap: &Netmap) {
        let topology = Arc::new(Topology::from_netmap(netmap, &self.shared.host_id));
        for skipped in &topology.skipped {
            tracing::warn!(
                topology_version = topology.version,
                "netmap: skipped {skipped}"
            );
        }
        self.apply_mesh(&topology).await;
        *self
            .shared
            .topology
            .write()
            .unwrap_or_else(|e| e.into_inner()) = topology.clone();
        for closed in self.shared.connections.recheck(&topology) {
            self.shared.stats.revoked.fetch_add(1, Ordering::Relaxed);
            let side = match closed.side {
                Side::Source => "source",
                Side::Target => "target",
            };
            self.shared.report_denied(
                side,
                (&closed.network, &closed.alias, closed.port),
                &closed.identity.to_string(),
                Some(&closed.rule_id),
                &format!("established connection closed: {}", closed.reason),
            );
        }
        self.apply_listeners(&topology).await;
        self.apply_dns(&topology);
        self.shared
            .applied_version
            .store(topology.version, Ordering::Relaxed);
        tracing::info!(
            topology_version = topology.version,
            peers = topology.peers.len(),
            networks = topology.networks.len(),
            listeners = self.listeners.len(),
            "netmap applied"
        );
    }

    async fn apply_mesh(&mut self, topology: &Topology) {
        if topology.addresses.is_empty() {
            return;
        }
        let peers = topology.peer_configs();
        let current = self.shared.node();
        if let Some(node) = &current {
            if node.addresses() == topology.addresses.as_slice() {
                let outcome = node.set_peers(peers);
                if let Err(e) = &outcome {
                    tracing::warn!("mesh peers not applied: {e}");
                }
                self.shared
                    .mesh
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .error = outcome.err().map(|e| format!("peers not applied: {e}"));
                return;
            }
            tracing::info!(old = ?node.addresses(), new = ?topology.addresses, "overlay addresses changed: rebinding the mesh node");
            let old = {
                let mut mesh = self.shared.mesh.lock().unwrap_or_else(|e| e.into_inner());
                if let Some(acceptor) = mesh.acceptor.take() {
                    acceptor.abort();
                }
                mesh.node.take()
            };
            if let Some(old) = old {
                old.shutdown().await;
            }
        }
        let config = NodeConfig {
            private_key: self.shared.key.clone(),
            addresses: topology.addresses.clone(),
            listen: self.shared.settings.mesh_listen,
        };
        match MeshNode::bind(config, peers).await {
            Ok(node) => {
                let acceptor = match node.listen_tcp(proxy::MESH_PROXY_PORT) {
                    Ok(listener) => Some(tokio::spawn(listeners::serve_mesh(
                        self.shared.clone(),
                        listener,
                    ))),
                    Err(e) => {
                        tracing::warn!("mesh proxy port {}: {e}", proxy::MESH_PROXY_PORT);
                        None
                    }
                };
                tracing::info!(udp = %node.local_addr(), overlay = ?node.addresses(), public_key = %node.public_key(), "joined the mesh");
                let mut mesh = self.shared.mesh.lock().unwrap_or_else(|e| e.into_inner());
                mesh.node = Some(node);
                mesh.acceptor = acceptor;
                mesh.error = None;
            }
            Err(e) => {
                tracing::warn!(
                    "mesh node not bound on {}: {e}",
                    self.shared.settings.mesh_listen
                );
                self.shared
                    .mesh
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .error = Some(e.to_string());
            }
        }
    }

    async fn apply_listeners(&mut self, topology: &Topology) {
        self.ensure_container_dns().await;
        self.container_bind();
        let keys = topology.listener_keys();
        let mut aliases: Vec<(String, String)> = keys
            .iter()
            .map(|k| (k.network.clone(), k.alias.clone()))
            .collect();
        aliases.dedup();
        self.loopback_book.update(&aliases);
        if let Some(book) = &mut self.container_book {
            book.update(&aliases);
        }
        let mut wanted: HashMap<(Facing, ListenerKey), SocketAddr> = HashMap::new();
        for key in keys {
            if let Some(ip) = self.loopback_book.get(&key.network, &key.alias) {
                wanted.insert(
                    (Facing::Loopback, key.clone()),
                    SocketAddr::new(ip, key.port),
                );
            }
            if let Some(ip) = self
                .container_book
                .as_ref()
                .and_then(|b| b.get(&key.network, &key.alias))
            {
                wanted.insert(
                    (Facing::Containers, key.clone()),
                    SocketAddr::new(ip, key.port),
                );
            }
        }
        // Stop what is gone (or moved); open connections are not touched.
        self.listeners.retain(|k, (addr, task)| {
            let keep = wanted.get(k) == Some(addr);
            if !keep {
                task.abort();
            }
            keep
        });
        // Bind what is new. Two aliases with the same port on a single
        // address collide: the first wins, the other is named in a warning.
        let mut bound: HashMap<SocketAddr, ListenerKey> = self
            .listeners
            .iter()
            .map(|((_, k), (addr, _))| (*addr, k.clone()))
            .collect();
        let mut new: Vec<_> = wanted
            .into_iter()
            .filter(|(k, _)| !self.listeners.contains_key(k))
            .collect();
        new.sort();
        for ((facing, key), addr) in new {
            if let Some(owner) = bound.get(&addr) {
                tracing::warn!(%addr, "{key} is not served: {owner} already listens there (set a range in {})", crate::config::MESH_PROXY_BIND);
                continue;
            }
            match listeners::bind(addr, facing == Facing::Containers) {
                Ok(listener) => {
                    let task = tokio::spawn(listeners::serve_alias(
                        self.shared.clone(),
                        key.clone(),
                        listener,
                    ));
                    bound.insert(addr, key.clone());
                    self.listeners.insert((facing, key), (addr, task));
                }
                Err(e) => tracing::warn!(%addr, "{key} is not served: cannot listen: {e}"),
            }
        }
        *self
            .shared
            .listener_addrs
            .write()
            .unwrap_or_else(|e| e.into_inner()) = self
            .listeners
            .iter()
            .map(|(k, (addr, _))| (k.clone(), *addr))
            .collect();
    }

    fn apply_dns(&self, topology: &Topology) {
        let build = |facing: Facing| {
            let mut table = dns::RecordTable::new();
            for (network, entry) in &topology.networks {
                for alias in entry.aliases.keys() {
                    let addrs: Vec<IpAddr> = self
                        .listeners
                        .iter()
                        .filter(|((f, k), _)| {
                            *f == facing && &k.network == network && &k.alias == alias
                        })
                        .map(|(_, (addr, _))| addr.ip())
                        .collect();
                    let v4 = addrs.iter().find_map(|ip| match ip {
                        IpAddr::V4(v4) => Some(*v4),
                        IpAddr::V6(_) => None,
                    });
                    let v6 = addrs.iter().find_map(|ip| match ip {
                        IpAddr::V6(v6) => Some(*v6),
                        IpAddr::V4(_) => None,
                    });
                    // A for an IPv4 listener, AAAA for an IPv6 one (a
                    // proxy bind that names IPv6 addresses).
                    let listener = match (v4, v6) {
                        (Some(v4), Some(v6)) => dns::ListenerAddrs::v4(v4).with_ipv6(v6),
                        (Some(v4), None) => dns::ListenerAddrs::v4(v4),
                        (None, Some(v6)) => dns::ListenerAddrs::v6(v6),
                        (None, None) => continue,
                    };
                    if let Err(e) = table.insert(network, alias, listener) {
                        tracing::warn!("DNS record for {alias}.{network}: {e}");
                    }
                }
            }
            table
        };
        self.shared
            .loopback_records
            .replace(build(Facing::Loopback));
        self.shared
            .container_records
            .replace(build(Facing::Containers));
    }

    async fn stop(&mut self) {
        if let Some(server) = self.container_dns.take() {
            let _ = server.shutdown().await;
        }
        for (_, (_, task)) in self.listeners.drain() {
            task.abort();
        }
        self.shared.connections.close_all();
        let node = {
            let mut mesh = self.shared.mesh.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(acceptor) = mesh.acceptor.take() {
                acceptor.abort();
            }
            mesh.node.take()
        };
        if let Some(node) = node {
            node.shutdown().await;
        }
    }
}
