//! A netmap, parsed once into what the data path asks: which sandbox an
//! address is, what policy says, which peer an overlay address belongs to,
//! where an alias lives. Pure: no IO, no clock.
//!
//! Bad entries (an unparsable key, rule or address) are skipped with a
//! warning naming them; the rest of the netmap still applies.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;

use ipnet::IpNet;
use netstack::{PeerConfig, PublicKey};
use policy::{Decision, DenyReason, Destination, Rule, RuleSet, Selector, Source, Target};

/// Who is on the other end of a connection, as this agent knows it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Identity {
    /// A developer laptop node.
    Local,
    Sandbox(String),
}

impl std::fmt::Display for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Identity::Local => f.write_str("local"),
            Identity::Sandbox(id) => write!(f, "sandbox:{id}"),
        }
    }
}

/// One alias of a network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AliasEntry {
    pub ports: Vec<u16>,
    pub sandbox_id: String,
    pub host_id: String,
    /// Overlay address of the node of the host that runs the sandbox.
    pub target_node: Option<IpAddr>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NetworkEntry {
    pub aliases: BTreeMap<String, AliasEntry>,
    /// In the order the control plane sent them: the first match wins.
    pub rules: RuleSet,
    pub topology_version: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SandboxEntry {
    pub host_id: String,
    pub addresses: Vec<IpAddr>,
    pub tags: Vec<String>,
    pub networks: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerEntry {
    pub config: PeerConfig,
    pub node_id: String,
    pub host_id: String,
    /// "agent" or "local".
    pub kind: String,
    pub addresses: Vec<IpAddr>,
}

/// The parsed netmap.
#[derive(Debug, Clone, Default)]
pub struct Topology {
    pub version: u64,
    pub node_id: String,
    /// This host's id (from its credential), to tell its own sandboxes.
    pub host_id: String,
    /// This node's bare overlay addresses.
    pub addresses: Vec<IpAddr>,
    pub peers: Vec<PeerEntry>,
    pub networks: BTreeMap<String, NetworkEntry>,
    pub sandboxes: HashMap<String, SandboxEntry>,
    /// Container address -> sandbox id, for sandboxes of this host.
    local_by_address: HashMap<IpAddr, String>,
    /// Overlay address -> index in `peers`.
    peer_by_address: HashMap<IpAddr, usize>,
    /// What was skipped, in words.
    pub skipped: Vec<String>,
}

fn parse_ip(text: &str) -> Option<IpAddr> {
    let text = text.trim();
    let bare = text.split('/').next().unwrap_or(text);
    bare.parse().ok()
}

impl Topology {
    /// Parses `netmap` for the host `host_id`.
    pub fn from_netmap(netmap: &proto::Netmap, host_id: &str) -> Topology {
        let mut topo = Topology {
            version: netmap.topology_version,
            node_id: netmap.node_id.clone(),
            host_id: host_id.to_owned(),
            ..Topology::default()
        };
        for address in &netmap.addresses {
            match parse_ip(address) {
                Some(ip) if !topo.addresses.contains(&ip) => topo.addresses.push(ip),
                Some(_) => {}
                None => topo
                    .skipped
                    .push(format!("overlay address `{address}` is not an address")),
            }
        }
        for peer in &netmap.peers {
            match parse_peer(peer) {
                Ok(entry) => {
                    let index = topo.peers.len();
                    for ip in &entry.addresses {
                        topo.peer_by_address.insert(*ip, index);
                    }
                    topo.peers.push(entry);
                }
                Err(why) => topo.skipped.push(format!("peer `{}`: {why}", peer.node_id)),
            }
        }
        for sandbox in &netmap.sandboxes {
            let mut addresses = Vec::new();
            for a in &sandbox.addresses {
                match parse_ip(a) {
                    Some(ip) => addresses.push(ip),
                    None => topo.skipped.push(format!(
                        "sandbox `{}`: address `{a}` is not an address",
                        sandbox.sandbox_id
                    )),
                }
            }
            if sandbox.host_id == host_id {
                for ip in &addresses {
                    topo.local_by_address
                        .insert(*ip, sandbox.sandbox_id.clone());
                }
            }
            topo.sandboxes.insert(
                sandbox.sandbox_id.clone(),
                SandboxEntry {
                    host_id: sandbox.host_id.clone(),
                    addresses,
                    tags: sandbox.tags.clone(),
                    networks: sandbox.networks.clone(),
                },
            );
        }
        let mut target_nodes: HashMap<(&str, &str), Option<IpAddr>> = HashMap::new();
        for record in &netmap.dns_records {
            target_nodes.insert(
                (record.network.as_str(), record.alias.as_str()),
                parse_ip(&record.target_node_address),
            );
        }
        for view in &netmap.networks {
            if let Err(e) = policy::validate_label("network", &view.name) {
                topo.skipped.push(e.to_string());
                continue;
            }
            let mut entry = NetworkEntry {
                topology_version: view.topology_version,
                ..NetworkEntry::default()
            };
            for alias in &view.aliases {
                if let Err(e) = policy::validate_label("alias", &alias.alias) {
                    topo.skipped.push(format!("network `{}`: {e}", view.name));
                    continue;
                }
                let mut ports: Vec<u16> = alias
                    .ports
                    .iter()
                    .filter_map(|p| u16::try_from(*p).ok().filter(|p| *p != 0))
                    .collect();
                ports.sort_unstable();
                ports.dedup();
                let target_node = target_nodes
                    .get(&(view.name.as_str(), alias.alias.as_str()))
                    .copied()
                    .flatten()
                    .or_else(|| {
                        topo.peers
                            .iter()
                            .find(|p| p.host_id == alias.host_id && p.kind == "agent")
                            .and_then(|p| p.addresses.iter().find(|a| a.is_ipv4()).copied())
                    });
                entry.aliases.insert(
                    alias.alias.clone(),
                    AliasEntry {
                        ports,
                        sandbox_id: alias.sandbox_id.clone(),
                        host_id: alias.host_id.clone(),
                        target_node,
                    },
                );
            }
            topo.networks.insert(view.name.clone(), entry);
        }
        for rule in &netmap.policy_rules {
            match parse_rule(rule) {
                Ok(parsed) => match topo.networks.get_mut(&rule.network) {
                    Some(network) => network.rules.push(parsed),
                    None => topo.skipped.push(format!(
                        "policy rule `{}` names unknown network `{}`",
                        rule.id, rule.network
                    )),
                },
                Err(why) => topo
                    .skipped
                    .push(format!("policy rule `{}`: {why}", rule.id)),
            }
        }
        topo
    }

    /// WireGuard peers for the mesh node.
    pub fn peer_configs(&self) -> Vec<PeerConfig> {
        self.peers.iter().map(|p| p.config.clone()).collect()
    }

    pub fn peer_by_address(&self, ip: IpAddr) -> Option<&PeerEntry> {
        self.peer_by_address.get(&ip).map(|i| &self.peers[*i])
    }

    /// The sandbox of this host whose container address is `ip`.
    pub fn local_sandbox_at(&self, ip: IpAddr) -> Option<&str> {
        self.local_by_address.get(&ip).map(String::as_str)
    }

    /// The policy view of `identity` in `network`: its aliases there and its
    /// tags. `None` when it is a sandbox not attached to the network.
    pub fn source(&self, network: &str, identity: &Identity) -> Option<Source> {
        match identity {
            Identity::Local => Some(Source::local()),
            Identity::Sandbox(id) => {
                let sandbox = self.sandboxes.get(id)?;
                let net = self.networks.get(network);
                let attached = sandbox.networks.iter().any(|n| n == network)
                    || net.is_some_and(|n| n.aliases.values().any(|a| &a.sandbox_id == id));
                if !attached {
                    return None;
                }
                let aliases = net
                    .map(|n| {
                        n.aliases
                            .iter()
                            .filter(|(_, a)| &a.sandbox_id == id)
                            .map(|(name, _)| name.clone())
                            .collect()
                    })
                    .unwrap_or_default();
                Some(Source {
                    local: false,
                    sandbox_id: Some(id.clone()),
                    aliases,
                    tags: sandbox.tags.clone(),
                })
            }
        }
    }

    /// `policy::decide` for `source` to `alias:port` of `network`.
    pub fn decide(&self, network: &str, source: &Source, alias: &str, port: u16) -> Decision {
        let Some(net) = self.networks.get(network) else {
            return Decision::Deny(DenyReason::UnknownAlias);
        };
        let exposed = net.aliases.get(alias).map(|a| a.ports.as_slice());
        net.rules.decide(
            source,
            Destination {
                alias,
                port,
                exposed_ports: exposed,
            },
        )
    }

    /// The decision for `identity`, or why it cannot be decided.
    pub fn decide_for(
        &self,
        network: &str,
        identity: &Identity,
        alias: &str,
        port: u16,
    ) -> Result<(Source, Decision), String> {
        let source = self
            .source(network, identity)
            .ok_or_else(|| format!("denied: {identity} is not attached to network `{network}`"))?;
        let decision = self.decide(network, &source, alias, port);
        Ok((source, decision))
    }

    /// Target side: who the mesh peer at `from` may be, given what it claims.
    /// A `local` peer can only be `local`; an agent peer only a sandbox of its
    /// own host.
    pub fn verify_claim(&self, from: IpAddr, claim: &Source) -> Result<Identity, String> {
        let peer = self
            .peer_by_address(from)
            .ok_or_else(|| format!("denied: {from} is not a peer of this node"))?;
        match peer.kind.as_str() {
            "local" => {
                if claim.local && claim.sandbox_id.is_none() {
                    Ok(Identity::Local)
                } else {
                    Err(format!(
                        "denied: local node `{}` claims to be {claim}",
                        peer.node_id
                    ))
                }
            }
            "agent" => {
                let Some(id) = claim.sandbox_id.as_ref().filter(|_| !claim.local) else {
                    return Err(format!(
                        "denied: agent node `{}` (host `{}`) claims to be {claim}",
                        peer.node_id, peer.host_id
                    ));
                };
                match self.sandboxes.get(id) {
                    Some(sandbox) if sandbox.host_id == peer.host_id => {
                        Ok(Identity::Sandbox(id.clone()))
                    }
                    Some(sandbox) => Err(format!(
                        "denied: host `{}` claims sandbox `{id}`, which runs on host `{}`",
                        peer.host_id, sandbox.host_id
                    )),
                    None => Err(format!(
                        "denied: host `{}` claims sandbox `{id}`, which this agent does not know",
                        peer.host_id
                    )),
                }
            }
            other => Err(format!(
                "denied: peer `{}` has unknown kind `{other}`",
                peer.node_id
            )),
        }
    }

    /// Target side: where this host's sandbox behind `alias` listens.
    pub fn sandbox_address(
        &self,
        network: &str,
        alias: &str,
        port: u16,
    ) -> Result<SocketAddr, String> {
        let entry = self
            .networks
            .get(network)
            .and_then(|n| n.aliases.get(alias))
            .ok_or_else(|| format!("no alias `{alias}` in network `{network}`"))?;
        if entry.host_id != self.host_id {
            return Err(format!(
                "alias `{alias}.{network}` runs on host `{}`, not on this one",
                entry.host_id
            ));
        }
        let sandbox = self.sandboxes.get(&entry.sandbox_id).ok_or_else(|| {
            format!(
                "sandbox `{}` of `{alias}.{network}` is not in the netmap",
                entry.sandbox_id
            )
        })?;
        let ip = sandbox
            .addresses
            .iter()
            .find(|a| a.is_ipv4())
            .or(sandbox.addresses.first())
            .ok_or_else(|| format!("sandbox `{}` has no address yet", entry.sandbox_id))?;
        Ok(SocketAddr::new(*ip, port))
    }

    /// Every (network, alias, port) a listener serves.
    pub fn listener_keys(&self) -> Vec<ListenerKey> {
        let mut keys = Vec::new();
        for (network, entry) in &self.networks {
            for (alias, a) in &entry.aliases {
                for port in &a.ports {
                    keys.push(ListenerKey {
                        network: network.clone(),
                        alias: alias.clone(),
                        port: *port,
                    });
                }
            }
        }
        keys
    }
}

/// One alias port served by a listener.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ListenerKey {
    pub network: String,
    pub alias: String,
    pub port: u16,
}

impl std::fmt::Display for ListenerKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}.gstacks:{}", self.alias, self.network, self.port)
    }
}

fn parse_peer(peer: &proto::Peer) -> Result<PeerEntry, String> {
    let public_key = PublicKey::from_str(peer.public_key.trim())
        .map_err(|e| format!("public key `{}`: {e}", peer.public_key))?;
    let endpoint = if peer.endpoint.trim().is_empty() {
        None
    } else {
        Some(
            peer.endpoint
                .trim()
                .parse::<SocketAddr>()
                .map_err(|_| format!("endpoint `{}` is not ip:port", peer.endpoint))?,
        )
    };
    let mut allowed_ips = Vec::new();
    for text in &peer.allowed_ips {
        let net = text
            .trim()
            .parse::<IpNet>()
            .or_else(|_| text.trim().parse::<IpAddr>().map(IpNet::from))
            .map_err(|_| format!("allowed IP `{text}` is not a prefix"))?;
        allowed_ips.push(net);
    }
    let mut addresses: Vec<IpAddr> = peer.addresses.iter().filter_map(|a| parse_ip(a)).collect();
    if addresses.is_empty() {
        // Older control planes: the host routes of allowed_ips are the addresses.
        addresses = allowed_ips
            .iter()
            .filter(|n| n.prefix_len() == n.max_prefix_len())
            .map(IpNet::addr)
            .collect();
    }
    let keepalive = u16::try_from(peer.persistent_keepalive_secs)
        .ok()
        .filter(|k| *k > 0);
    Ok(PeerEntry {
        config: PeerConfig {
            public_key,
            endpoint,
            allowed_ips,
            persistent_keepalive: keepalive,
            preshared_key: None,
        },
        node_id: peer.node_id.clone(),
        host_id: peer.host_id.clone(),
        kind: if peer.kind.is_empty() {
            "agent".to_owned()
        } else {
            peer.kind.clone()
        },
        addresses,
    })
}

fn parse_rule(rule: &proto::PolicyRule) -> Result<Rule, String> {
    let from = Selector::parse(&rule.from).map_err(|e| e.to_string())?;
    let to = Target::parse(&rule.to).map_err(|e| e.to_string())?;
    let port = match rule.port {
        0 => None,
        p => Some(u16::try_from(p).map_err(|_| format!("port {p} is out of range"))?),
    };
    Ok(Rule {
        id: rule.id.clone(),
        from,
        to,
        port,
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use netstack::PrivateKey;

    pub(crate) fn key() -> String {
        PrivateKey::generate().public_key().to_string()
    }

    /// Two hosts: `h1` runs `web` (sbx_web, 127.0.0.11), `h2` runs `api`
    /// (sbx_api, 127.0.0.12, port 8080); a laptop joined `dev`.
    pub(crate) fn netmap() -> proto::Netmap {
        proto::Netmap {
            topology_version: 7,
            node_id: "node_h1".into(),
            addresses: vec!["100.64.0.1/32".into()],
            peers: vec![
                proto::Peer {
                    public_key: key(),
                    endpoint: "127.0.0.1:41642".into(),
                    allowed_ips: vec!["100.64.0.2/32".into()],
                    node_id: "node_h2".into(),
                    host_id: "h2".into(),
                    kind: "agent".into(),
                    addresses: vec!["100.64.0.2".into()],
                    persistent_keepalive_secs: 0,
                },
                proto::Peer {
                    public_key: key(),
                    endpoint: String::new(),
                    allowed_ips: vec!["100.64.0.9/32".into()],
                    node_id: "node_laptop".into(),
                    host_id: String::new(),
                    kind: "local".into(),
                    addresses: vec!["100.64.0.9".into()],
                    persistent_keepalive_secs: 25,
                },
            ],
            dns_records: vec![proto::DnsRecord {
                name: "api.dev.gstacks".into(),
                network: "dev".into(),
                alias: "api".into(),
                ports: vec![8080],
                target_node_address: "100.64.0.2".into(),
                target_host_id: "h2".into(),
                sandbox_id: "sbx_api".into(),
            }],
            policy_rules: vec![proto::PolicyRule {
                id: "pol_1".into(),
                network: "dev".into(),
                from: "web".into(),
                to: "api".into(),
                port: 8080,
            }],
            networks: vec![proto::NetworkView {
                name: "dev".into(),
                dns_suffix: "dev.gstacks".into(),
                topology_version: 7,
                aliases: vec![
                    proto::AliasView {
                        alias: "api".into(),
                        sandbox_id: "sbx_api".into(),
                        ports: vec![8080],
                        host_id: "h2".into(),
                    },
                    proto::AliasView {
                        alias: "web".into(),
                        sandbox_id: "sbx_web".into(),
                        ports: vec![80],
                        host_id: "h1".into(),
                    },
                ],
            }],
            sandboxes: vec![
                proto::SandboxEndpoint {
                    sandbox_id: "sbx_web".into(),
                    host_id: "h1".into(),
                    addresses: vec!["127.0.0.11".into()],
                    tags: vec!["frontend".into()],
                    networks: vec!["dev".into()],
                },
                proto::SandboxEndpoint {
                    sandbox_id: "sbx_api".into(),
                    host_id: "h2".into(),
                    addresses: vec!["127.0.0.12".into()],
                    tags: vec![],
                    networks: vec!["dev".into()],
                },
            ],
        }
    }

    #[test]
    fn parses_and_decides_at_the_source() {
        let topo = Topology::from_netmap(&netmap(), "h1");
        assert!(topo.skipped.is_empty(), "{:?}", topo.skipped);
        assert_eq!(topo.addresses, ["100.64.0.1".parse::<IpAddr>().unwrap()]);
        let web = topo
            .local_sandbox_at("127.0.0.11".parse().unwrap())
            .unwrap();
        assert_eq!(web, "sbx_web");
        // api runs on h2: not a local sandbox of h1.
        assert_eq!(topo.local_sandbox_at("127.0.0.12".parse().unwrap()), None);
        let (source, decision) = topo
            .decide_for("dev", &Identity::Sandbox("sbx_web".into()), "api", 8080)
            .unwrap();
        assert_eq!(source.aliases, ["web"]);
        assert_eq!(source.tags, ["frontend"]);
        assert_eq!(
            decision,
            Decision::Allow {
                rule_id: "pol_1".into()
            }
        );
        let (_, d) = topo
            .decide_for("dev", &Identity::Local, "api", 8080)
            .unwrap();
        assert!(!d.is_allowed());
        let (_, d) = topo
            .decide_for("dev", &Identity::Sandbox("sbx_web".into()), "api", 9090)
            .unwrap();
        assert!(matches!(
            d,
            Decision::Deny(DenyReason::PortNotExposed { .. })
        ));
        let err = topo
            .decide_for("prod", &Identity::Sandbox("sbx_web".into()), "api", 8080)
            .unwrap_err();
        assert!(err.contains("not attached to network `prod`"), "{err}");
        assert_eq!(
            topo.networks["dev"].aliases["api"].target_node,
            Some("100.64.0.2".parse().unwrap())
        );
        assert_eq!(topo.listener_keys().len(), 2);
    }

    #[test]
    fn claims_are_checked_against_the_peer() {
        let topo = Topology::from_netmap(&netmap(), "h2");
        let h1: IpAddr = "100.64.0.2".parse().unwrap();
        // From h2's view, peers are as in the netmap (built for h1, but the
        // lookup logic is what matters): node_h2 is an agent of host h2.
        assert_eq!(
            topo.verify_claim(h1, &Source::sandbox("sbx_api")).unwrap(),
            Identity::Sandbox("sbx_api".into())
        );
        // An agent cannot claim a sandbox of another host, nor be local.
        let err = topo
            .verify_claim(h1, &Source::sandbox("sbx_web"))
            .unwrap_err();
        assert!(err.contains("runs on host `h1`"), "{err}");
        assert!(topo.verify_claim(h1, &Source::local()).is_err());
        assert!(topo.verify_claim(h1, &Source::sandbox("sbx_nope")).is_err());
        // The laptop can only be local.
        let laptop: IpAddr = "100.64.0.9".parse().unwrap();
        assert_eq!(
            topo.verify_claim(laptop, &Source::local()).unwrap(),
            Identity::Local
        );
        assert!(topo
            .verify_claim(laptop, &Source::sandbox("sbx_api"))
            .is_err());
        // An address that is no peer.
        assert!(topo
            .verify_claim("100.64.0.77".parse().unwrap(), &Source::local())
            .is_err());
        assert_eq!(
            topo.sandbox_address("dev", "api", 8080).unwrap(),
            "127.0.0.12:8080".parse().unwrap()
        );
        assert!(topo.sandbox_address("dev", "web", 80).is_err());
    }

    #[test]
    fn bad_entries_are_skipped_and_named() {
        let mut map = netmap();
        map.peers[0].public_key = "nope".into();
        map.policy_rules.push(proto::PolicyRule {
            id: "pol_bad".into(),
            network: "dev".into(),
            from: "Not_A_Label".into(),
            to: "api".into(),
            port: 0,
        });
        let topo = Topology::from_netmap(&map, "h1");
        assert_eq!(topo.peers.len(), 1);
        assert_eq!(topo.networks["dev"].rules.rules().len(), 1);
        assert_eq!(topo.skipped.len(), 2, "{:?}", topo.skipped);
        assert!(topo.skipped[0].contains("node_h2"));
        assert!(topo.skipped[1].contains("pol_bad"));
    }
}
