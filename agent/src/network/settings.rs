//! The network settings of the agent: where the mesh node, the agent DNS and
//! the alias listeners bind. Every address is configurable so that several
//! agents can run side by side on one machine (tests, benchmarks).

use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};

use ipnet::IpNet;

use crate::config::{
    ConfigSource, MESH_CONTAINER_ADDR, MESH_CONTAINER_PROXY_BIND, MESH_DNS_ADDR, MESH_ENDPOINT,
    MESH_LISTEN, MESH_MAX_LISTENER_CONNECTIONS, MESH_MAX_MESH_CONNECTIONS, MESH_PROXY_BIND,
};
use crate::error::AgentError;

pub const DEFAULT_MESH_LISTEN: SocketAddr =
    SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 41641);
pub const DEFAULT_DNS_ADDR: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 1053);
/// Per-alias loopback listener addresses are taken from this range.
pub const DEFAULT_PROXY_RANGE: &str = "127.77.0.0/16";
/// Per-alias container-side addresses: a range made local to the host on
/// the sandbox bridge. The overlay (100.64.0.0/10) lives only inside the
/// userspace mesh node, so this kernel route does not collide with it.
pub const DEFAULT_CONTAINER_PROXY_RANGE: &str = "100.127.77.0/24";
/// Port of the container-side DNS (resolv.conf names no port).
pub const CONTAINER_DNS_PORT: u16 = 53;
/// Connections one alias listener serves at once unless
/// `GLOBALSTACKS_AGENT_MESH_MAX_LISTENER_CONNECTIONS` says otherwise.
pub const DEFAULT_MAX_LISTENER_CONNECTIONS: usize = 1024;
/// Mesh connections served at once on the target side unless
/// `GLOBALSTACKS_AGENT_MESH_MAX_MESH_CONNECTIONS` says otherwise.
pub const DEFAULT_MAX_MESH_CONNECTIONS: usize = proxy::MAX_MESH_CONNECTIONS;
/// Upper bound of both limits: each connection holds descriptors and
/// buffers, and a limit past this is a typo rather than a plan.
pub const MAX_CONNECTION_LIMIT: usize = 1 << 20;

/// Where the alias listeners bind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProxyBind {
    /// One address per (network, alias) from this range, stable across
    /// netmaps and restarts (a hash of the name, probed on collision).
    Range(IpNet),
    /// Every listener on this one address (aliases with the same port
    /// collide: the second one is not served and a warning says so).
    Single(IpAddr),
}

/// The network settings (`GLOBALSTACKS_AGENT_MESH_*`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkSettings {
    /// UDP address of the mesh node (WireGuard).
    pub mesh_listen: SocketAddr,
    /// `host:port` other nodes send WireGuard to, sent in every `Hello`;
    /// `None` = not directly reachable.
    pub mesh_endpoint: Option<String>,
    /// The agent DNS for host processes (UDP and TCP).
    pub dns_addr: SocketAddr,
    pub proxy_bind: ProxyBind,
    /// The address containers reach the agent on (the gateway of the
    /// sandbox bridge): DNS on port 53 and the container-side alias
    /// listeners. `None`: loopback only.
    pub container_addr: Option<IpAddr>,
    /// Where the container-side alias listeners bind: a range (made local
    /// on the container address's interface) or one address.
    pub container_proxy_bind: ProxyBind,
    /// Connections one alias listener serves at once; more wait in the
    /// kernel backlog (a flood cannot exhaust the descriptors).
    pub max_listener_connections: usize,
    /// Mesh connections the target side serves at once.
    pub max_mesh_connections: usize,
}

impl Default for NetworkSettings {
    fn default() -> Self {
        Self {
            mesh_listen: DEFAULT_MESH_LISTEN,
            mesh_endpoint: None,
            dns_addr: DEFAULT_DNS_ADDR,
            proxy_bind: ProxyBind::Range(DEFAULT_PROXY_RANGE.parse().expect("valid range")),
            container_addr: None,
            container_proxy_bind: ProxyBind::Range(
                DEFAULT_CONTAINER_PROXY_RANGE.parse().expect("valid range"),
            ),
            max_listener_connections: DEFAULT_MAX_LISTENER_CONNECTIONS,
            max_mesh_connections: DEFAULT_MAX_MESH_CONNECTIONS,
        }
    }
}

impl NetworkSettings {
    pub fn from_source(source: &ConfigSource) -> Result<Self, AgentError> {
        let socket_addr = |key: &str, default: SocketAddr| -> Result<SocketAddr, AgentError> {
            match source.get(key) {
                None => Ok(default),
                Some(v) => v.parse().map_err(|_| {
                    AgentError::config(
                        key,
                        format!("`{v}` is not an address with a port (e.g. 127.0.0.1:1053)"),
                    )
                }),
            }
        };
        let mesh_listen = socket_addr(MESH_LISTEN, DEFAULT_MESH_LISTEN)?;
        let dns_addr = socket_addr(MESH_DNS_ADDR, DEFAULT_DNS_ADDR)?;
        let proxy_bind = match source.get(MESH_PROXY_BIND) {
            None => ProxyBind::Range(DEFAULT_PROXY_RANGE.parse().expect("valid range")),
            Some(v) => parse_proxy_bind(MESH_PROXY_BIND, v)?,
        };
        let container_proxy_bind = match source.get(MESH_CONTAINER_PROXY_BIND) {
            None => ProxyBind::Range(DEFAULT_CONTAINER_PROXY_RANGE.parse().expect("valid range")),
            Some(v) => parse_proxy_bind(MESH_CONTAINER_PROXY_BIND, v)?,
        };
        let container_addr = source
            .get(MESH_CONTAINER_ADDR)
            .map(|v| {
                v.parse::<IpAddr>().map_err(|_| {
                    AgentError::config(MESH_CONTAINER_ADDR, format!("`{v}` is not an IP address"))
                })
            })
            .transpose()?;
        let mesh_endpoint = match source.get(MESH_ENDPOINT) {
            Some(v) => {
                validate_endpoint(v)?;
                Some(v.to_owned())
            }
            None => derive_endpoint(mesh_listen),
        };
        let max_listener_connections = connection_limit(
            source,
            MESH_MAX_LISTENER_CONNECTIONS,
            DEFAULT_MAX_LISTENER_CONNECTIONS,
        )?;
        let max_mesh_connections = connection_limit(
            source,
            MESH_MAX_MESH_CONNECTIONS,
            DEFAULT_MAX_MESH_CONNECTIONS,
        )?;
        Ok(Self {
            mesh_listen,
            mesh_endpoint,
            dns_addr,
            proxy_bind,
            container_addr,
            container_proxy_bind,
            max_listener_connections,
            max_mesh_connections,
        })
    }
}

/// A connection limit: 1 to [`MAX_CONNECTION_LIMIT`].
fn connection_limit(source: &ConfigSource, key: &str, default: usize) -> Result<usize, AgentError> {
    let Some(value) = source.get(key) else {
        return Ok(default);
    };
    match value.trim().parse::<usize>() {
        Ok(n) if (1..=MAX_CONNECTION_LIMIT).contains(&n) => Ok(n),
        _ => Err(AgentError::config(
            key,
            format!("`{value}` is not a number of connections from 1 to {MAX_CONNECTION_LIMIT}"),
        )),
    }
}

/// `127.77.0.0/16` (one address per alias) or `127.0.0.5` (all on one).
pub fn parse_proxy_bind(key: &str, value: &str) -> Result<ProxyBind, AgentError> {
    if let Ok(net) = value.parse::<IpNet>() {
        let net = net.trunc();
        if host_count(&net) < 2 {
            return Err(AgentError::config(
                key,
                format!(
                    "`{value}` is too small; give a range of at least 2 addresses or one address"
                ),
            ));
        }
        return Ok(ProxyBind::Range(net));
    }
    value.parse::<IpAddr>().map(ProxyBind::Single).map_err(|_| {
        AgentError::config(
            key,
            format!("`{value}` is neither an address range (127.77.0.0/16) nor an address"),
        )
    })
}

/// Usable addresses of a range (network and broadcast excluded for IPv4
/// ranges larger than /31).
pub(crate) fn host_count(net: &IpNet) -> u128 {
    let bits = net.max_prefix_len() - net.prefix_len();
    let total: u128 = if bits >= 127 {
        u128::MAX
    } else {
        1u128 << bits
    };
    match net {
        IpNet::V4(_) if bits >= 2 => total - 2,
        _ => total,
    }
}

fn validate_endpoint(value: &str) -> Result<(), AgentError> {
    let bad = || {
        AgentError::config(
            MESH_ENDPOINT,
            format!("`{value}` is not host:port (e.g. 203.0.113.7:41641)"),
        )
    };
    if value.parse::<SocketAddr>().is_ok() {
        return Ok(());
    }
    let (host, port) = value.rsplit_once(':').ok_or_else(bad)?;
    if host.is_empty() || host.contains(char::is_whitespace) || port.parse::<u16>().is_err() {
        return Err(bad());
    }
    Ok(())
}

/// Without `GLOBALSTACKS_AGENT_MESH_ENDPOINT`: the listen address if it is
/// a concrete one, else the address of the interface that holds the default
/// route (found by connecting a UDP socket, which sends nothing) with the
/// listen port; `None` when the host has no route at all.
pub fn derive_endpoint(listen: SocketAddr) -> Option<String> {
    if !listen.ip().is_unspecified() {
        return Some(listen.to_string());
    }
    let probe: SocketAddr = if listen.is_ipv4() {
        "192.0.2.1:9".parse().ok()?
    } else {
        "[2001:db8::1]:9".parse().ok()?
    };
    let bind: SocketAddr = SocketAddr::new(listen.ip(), 0);
    let socket = UdpSocket::bind(bind).ok()?;
    socket.connect(probe).ok()?;
    let ip = socket.local_addr().ok()?.ip();
    (!ip.is_unspecified()).then(|| SocketAddr::new(ip, listen.port()).to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(pairs: &[(&str, &str)]) -> Result<NetworkSettings, AgentError> {
        let source = ConfigSource::from_parts(
            None,
            pairs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned())),
        )?;
        NetworkSettings::from_source(&source)
    }

    #[test]
    fn defaults() {
        let s = settings(&[]).unwrap();
        assert_eq!(s.mesh_listen, DEFAULT_MESH_LISTEN);
        assert_eq!(s.dns_addr, DEFAULT_DNS_ADDR);
        assert_eq!(
            s.proxy_bind,
            ProxyBind::Range("127.77.0.0/16".parse().unwrap())
        );
        assert_eq!(s.container_addr, None);
        assert_eq!(s.max_listener_connections, 1024);
        assert_eq!(s.max_mesh_connections, 4096);
        // Derived from the route to the world, with the listen port, or none.
        if let Some(endpoint) = &s.mesh_endpoint {
            assert!(endpoint.ends_with(":41641"), "{endpoint}");
        }
    }

    #[test]
    fn explicit_values() {
        let s = settings(&[
            (MESH_LISTEN, "127.0.0.1:0"),
            (MESH_ENDPOINT, "agent-1.example:41641"),
            (MESH_DNS_ADDR, "127.0.0.2:5353"),
            (MESH_PROXY_BIND, "127.0.0.9"),
            (MESH_CONTAINER_ADDR, "172.30.0.1"),
            (MESH_MAX_LISTENER_CONNECTIONS, "12000"),
            (MESH_MAX_MESH_CONNECTIONS, "20000"),
        ])
        .unwrap();
        assert_eq!(s.max_listener_connections, 12_000);
        assert_eq!(s.max_mesh_connections, 20_000);
        assert_eq!(s.mesh_listen, "127.0.0.1:0".parse().unwrap());
        assert_eq!(s.mesh_endpoint.as_deref(), Some("agent-1.example:41641"));
        assert_eq!(
            s.proxy_bind,
            ProxyBind::Single("127.0.0.9".parse().unwrap())
        );
        assert_eq!(s.container_addr, Some("172.30.0.1".parse().unwrap()));
        let s = settings(&[(MESH_LISTEN, "127.0.0.3:5000")]).unwrap();
        assert_eq!(s.mesh_endpoint.as_deref(), Some("127.0.0.3:5000"));
    }

    #[test]
    fn bad_values_name_their_key() {
        for (key, value) in [
            (MESH_LISTEN, "41641"),
            (MESH_DNS_ADDR, "localhost"),
            (MESH_PROXY_BIND, "127.77.0.0/33"),
            (MESH_PROXY_BIND, "127.0.0.1/32"),
            (MESH_ENDPOINT, "no port"),
            (MESH_ENDPOINT, "host:99999"),
            (MESH_CONTAINER_ADDR, "gateway"),
            (MESH_CONTAINER_PROXY_BIND, "100.127.77.0/99"),
            (MESH_MAX_LISTENER_CONNECTIONS, "0"),
            (MESH_MAX_LISTENER_CONNECTIONS, "many"),
            (MESH_MAX_MESH_CONNECTIONS, "-1"),
            (MESH_MAX_MESH_CONNECTIONS, "1048577"),
        ] {
            let err = settings(&[(key, value)]).unwrap_err().to_string();
            assert!(err.contains(key), "{key}={value}: {err}");
        }
    }
}
