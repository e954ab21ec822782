//! The runtime network model as stored: networks, sandbox attachments,
//! aliases, policy rules, mesh nodes, and the one cluster-wide topology
//! version that every change to them bumps in its own transaction.

use std::net::{Ipv4Addr, Ipv6Addr};

/// DNS zone under which every network publishes its aliases.
pub const DNS_ZONE: &str = "gstacks";

/// A runtime network (`gstacks network create dev`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Network {
    /// A DNS label.
    pub name: String,
    /// The topology version of the last change of this network.
    pub topology_version: u64,
    pub created_at_ms: i64,
    /// Connections refused by policy, as reported by agents.
    pub denied_connections: u64,
    /// 0 = never.
    pub last_denied_at_ms: i64,
}

impl Network {
    /// `dev.gstacks`.
    pub fn dns_suffix(&self) -> String {
        dns_suffix(&self.name)
    }
}

pub fn dns_suffix(network: &str) -> String {
    format!("{network}.{DNS_ZONE}")
}

/// A sandbox attached to a network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attachment {
    pub network: String,
    pub sandbox_id: String,
    pub attached_at_ms: i64,
}

/// An alias a sandbox publishes in a network: `<alias>.<network>.gstacks`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Alias {
    pub network: String,
    pub alias: String,
    pub sandbox_id: String,
    /// One or more, each 1-65535, ascending, no duplicates.
    pub ports: Vec<u16>,
    pub created_at_ms: i64,
}

/// `allow --from <selector> --to <alias|*> [--port P]` in one network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyRule {
    /// `pol_...`
    pub id: String,
    pub network: String,
    /// Selector text: `local`, an alias, `sandbox:<id>`, `tag:<tag>`, `*`.
    pub from: String,
    /// An alias or `*`.
    pub to: String,
    /// 0 = any port.
    pub port: u16,
    pub created_at_ms: i64,
}

/// Which kind of thing a mesh node is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum NodeKind {
    /// A host agent's node (one per host).
    Agent,
    /// A developer laptop (`gstacks mesh join`); source selector `local`.
    Local,
}

impl NodeKind {
    pub fn as_str(self) -> &'static str {
        match self {
            NodeKind::Agent => "agent",
            NodeKind::Local => "local",
        }
    }

    pub fn parse(text: &str) -> Option<NodeKind> {
        match text {
            "agent" => Some(NodeKind::Agent),
            "local" => Some(NodeKind::Local),
            _ => None,
        }
    }
}

/// A node of the mesh with its overlay addresses, allocated once and kept
/// for the node's life (they are derived from `index`, which is never
/// handed out twice).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MeshNode {
    /// `node_<host id>` for a host agent.
    pub id: String,
    pub kind: NodeKind,
    /// The host of an agent node; empty for a laptop.
    pub host_id: String,
    /// base64 x25519 public key; empty until the agent sent one.
    pub public_key: String,
    /// `host:port` of its WireGuard UDP; empty = not directly reachable.
    pub endpoint: String,
    /// Allocation index (1-based) of its overlay addresses.
    pub index: u32,
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
}

impl MeshNode {
    pub fn ipv4(&self) -> Ipv4Addr {
        overlay_ipv4(self.index)
    }

    pub fn ipv6(&self) -> Ipv6Addr {
        overlay_ipv6(self.index)
    }
}

/// The node id of a host agent.
pub fn agent_node_id(host_id: &str) -> String {
    format!("node_{host_id}")
}

/// First address of the IPv4 overlay range 100.64.0.0/10.
const OVERLAY_V4_BASE: u32 = u32::from_be_bytes([100, 64, 0, 0]);
/// Addresses in 100.64.0.0/10.
const OVERLAY_V4_SIZE: u32 = 1 << 22;
/// Usable addresses per /24 (`.0` and `.255` are skipped so that no node
/// gets an address that looks like a network or broadcast address).
const PER_24: u32 = 254;
/// The largest allocation index that still fits in 100.64.0.0/10.
pub const MAX_NODE_INDEX: u32 = (OVERLAY_V4_SIZE / 256) * PER_24;

/// The IPv4 overlay address of allocation `index` (1-based):
/// 1 -> 100.64.0.1, 254 -> 100.64.0.254, 255 -> 100.64.1.1.
pub fn overlay_ipv4(index: u32) -> Ipv4Addr {
    let i = index.clamp(1, MAX_NODE_INDEX) - 1;
    let offset = (i / PER_24) * 256 + (i % PER_24) + 1;
    Ipv4Addr::from(OVERLAY_V4_BASE + offset)
}

/// The IPv6 overlay address of allocation `index`: `fd7a:115c:a1e0::<index>`
/// (in fd7a:115c:a1e0::/48).
pub fn overlay_ipv6(index: u32) -> Ipv6Addr {
    let base = u128::from(Ipv6Addr::new(0xfd7a, 0x115c, 0xa1e0, 0, 0, 0, 0, 0));
    Ipv6Addr::from(base + u128::from(index))
}

/// What the network model needs to know of an attached sandbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttachedSandbox {
    pub id: String,
    pub host_id: String,
    /// The sandbox's lifecycle status (`running`, `stopped`, ...).
    pub status: String,
    /// Container IPs on its host.
    pub addresses: Vec<String>,
    pub tags: Vec<String>,
}

/// A consistent snapshot (one read transaction) of everything netmaps are
/// made of.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Topology {
    pub version: u64,
    pub networks: Vec<Network>,
    pub attachments: Vec<Attachment>,
    pub aliases: Vec<Alias>,
    pub rules: Vec<PolicyRule>,
    pub nodes: Vec<MeshNode>,
    /// Laptop nodes that joined a network: (network, node id).
    pub local_members: Vec<(String, String)>,
    /// Every sandbox attached to some network.
    pub sandboxes: Vec<AttachedSandbox>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlay_addresses_are_stable_and_in_range() {
        assert_eq!(overlay_ipv4(1), Ipv4Addr::new(100, 64, 0, 1));
        assert_eq!(overlay_ipv4(254), Ipv4Addr::new(100, 64, 0, 254));
        assert_eq!(overlay_ipv4(255), Ipv4Addr::new(100, 64, 1, 1));
        assert_eq!(overlay_ipv4(1000), Ipv4Addr::new(100, 64, 3, 238));
        let last = overlay_ipv4(MAX_NODE_INDEX);
        assert_eq!(last, Ipv4Addr::new(100, 127, 255, 254));
        assert_eq!(
            overlay_ipv6(7),
            "fd7a:115c:a1e0::7".parse::<Ipv6Addr>().unwrap()
        );
        // Every index up to a few /24s maps to a distinct address that is
        // never .0 or .255.
        let mut seen = std::collections::HashSet::new();
        for i in 1..2000 {
            let a = overlay_ipv4(i);
            assert!(a.octets()[3] != 0 && a.octets()[3] != 255, "{a}");
            assert!(seen.insert(a));
        }
    }
}
