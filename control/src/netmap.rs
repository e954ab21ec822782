//! Netmap computation: a pure function from the stored topology to the
//! [`proto::Netmap`] of one node. No IO, no clock.
//!
//! [`NetmapIndex::new`] does the work that every node shares once per
//! topology version (per network: its view, DNS records, rules, sandbox
//! endpoints and member nodes); [`NetmapIndex::for_node`] then only
//! assembles the parts of the node's networks. Whether a node's netmap
//! changed is known from per-network digests ([`NetmapIndex::digest_for_node`])
//! without building it, so a change costs one pass over the topology, a few
//! hashes per host, and netmaps only for the hosts it concerns.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use crate::store::network::{agent_node_id, dns_suffix, MeshNode, NodeKind, Topology};
use proto::{AliasView, DnsRecord, Netmap, NetworkView, Peer, SandboxEndpoint};

/// Persistent keepalive towards (or from) a laptop node, which usually sits
/// behind NAT; between host agents none is needed.
pub const LOCAL_KEEPALIVE_SECS: u32 = 25;

/// Status of a deprovisioned sandbox (the sandbox model's `archived`).
const ARCHIVED: &str = "archived";

/// The shared, per-network part of every member's netmap.
#[derive(Debug, Default)]
struct NetworkPart {
    view: NetworkView,
    dns_records: Vec<DnsRecord>,
    rules: Vec<proto::PolicyRule>,
    /// Sandboxes attached to this network.
    sandboxes: BTreeSet<String>,
    /// Nodes that take part: agents of hosts running an attached sandbox,
    /// laptops that joined.
    members: BTreeSet<String>,
    /// SHA-256 of everything above as members' netmaps show it (members by
    /// key, endpoint, kind and addresses; sandboxes with all their networks).
    digest: [u8; 32],
}

/// One topology version, prepared for per-node assembly.
#[derive(Debug)]
pub struct NetmapIndex {
    version: u64,
    nodes: HashMap<String, MeshNode>,
    /// Network name -> shared part (BTreeMap: netmaps list networks by name).
    networks: BTreeMap<String, NetworkPart>,
    /// Node id -> names of its networks.
    node_networks: HashMap<String, BTreeSet<String>>,
    /// Sandbox id -> (host, addresses, tags, networks).
    sandboxes: HashMap<String, SandboxEndpoint>,
}

fn allowed_ips(node: &MeshNode) -> Vec<String> {
    vec![
        format!("{}/32", node.ipv4()),
        format!("{}/128", node.ipv6()),
    ]
}

fn bare_addresses(node: &MeshNode) -> Vec<String> {
    vec![node.ipv4().to_string(), node.ipv6().to_string()]
}

impl NetmapIndex {
    pub fn new(topology: &Topology) -> NetmapIndex {
        let nodes: HashMap<String, MeshNode> = topology
            .nodes
            .iter()
            .map(|n| (n.id.clone(), n.clone()))
            .collect();
        let host_node: HashMap<&str, &MeshNode> = topology
            .nodes
            .iter()
            .filter(|n| n.kind == NodeKind::Agent && !n.host_id.is_empty())
            .map(|n| (n.host_id.as_str(), n))
            .collect();
        // An archived sandbox has no container any more: it is left out like
        // a vanished one (no endpoint, no record, its host not a member on
        // its account); the attachment stays for `network show`.
        let mut sandboxes: HashMap<String, SandboxEndpoint> = topology
            .sandboxes
            .iter()
            .filter(|s| s.status != ARCHIVED)
            .map(|s| {
                (
                    s.id.clone(),
                    SandboxEndpoint {
                        sandbox_id: s.id.clone(),
                        host_id: s.host_id.clone(),
                        addresses: s.addresses.clone(),
                        tags: s.tags.clone(),
                        networks: Vec::new(),
                    },
                )
            })
            .collect();
        let mut networks: BTreeMap<String, NetworkPart> = topology
            .networks
            .iter()
            .map(|n| {
                (
                    n.name.clone(),
                    NetworkPart {
                        view: NetworkView {
                            name: n.name.clone(),
                            dns_suffix: n.dns_suffix(),
                            topology_version: n.topology_version,
                            aliases: Vec::new(),
                        },
                        ..NetworkPart::default()
                    },
                )
            })
            .collect();
        for attachment in &topology.attachments {
            let Some(part) = networks.get_mut(&attachment.network) else {
                continue;
            };
            let Some(sandbox) = sandboxes.get_mut(&attachment.sandbox_id) else {
                // The sandbox record is gone: nothing to route to.
                continue;
            };
            sandbox.networks.push(attachment.network.clone());
            part.sandboxes.insert(attachment.sandbox_id.clone());
            if let Some(node) = host_node.get(sandbox.host_id.as_str()) {
                part.members.insert(node.id.clone());
            }
        }
        for (network, node_id) in &topology.local_members {
            if let (Some(part), true) = (networks.get_mut(network), nodes.contains_key(node_id)) {
                part.members.insert(node_id.clone());
            }
        }
        for alias in &topology.aliases {
            let Some(part) = networks.get_mut(&alias.network) else {
                continue;
            };
            let Some(host_id) = sandboxes.get(&alias.sandbox_id).map(|s| s.host_id.clone()) else {
                continue;
            };
            let ports: Vec<u32> = alias.ports.iter().map(|p| u32::from(*p)).collect();
            part.view.aliases.push(AliasView {
                alias: alias.alias.clone(),
                sandbox_id: alias.sandbox_id.clone(),
                ports: ports.clone(),
                host_id: host_id.clone(),
            });
            // An alias whose host has no mesh node yet cannot be reached:
            // no record (diagnostics say why).
            if let Some(node) = host_node.get(host_id.as_str()) {
                part.dns_records.push(DnsRecord {
                    name: format!("{}.{}", alias.alias, dns_suffix(&alias.network)),
                    network: alias.network.clone(),
                    alias: alias.alias.clone(),
                    ports,
                    target_node_address: node.ipv4().to_string(),
                    target_host_id: host_id,
                    sandbox_id: alias.sandbox_id.clone(),
                });
            }
        }
        for rule in &topology.rules {
            if let Some(part) = networks.get_mut(&rule.network) {
                part.rules.push(proto::PolicyRule {
                    id: rule.id.clone(),
                    network: rule.network.clone(),
                    from: rule.from.clone(),
                    to: rule.to.clone(),
                    port: u32::from(rule.port),
                });
            }
        }
        let mut node_networks: HashMap<String, BTreeSet<String>> = HashMap::new();
        for (name, part) in &mut networks {
            part.view.aliases.sort_by(|a, b| a.alias.cmp(&b.alias));
            part.dns_records.sort_by(|a, b| a.name.cmp(&b.name));
            for member in &part.members {
                node_networks
                    .entry(member.clone())
                    .or_default()
                    .insert(name.clone());
            }
        }
        for sandbox in sandboxes.values_mut() {
            sandbox.networks.sort();
        }
        for part in networks.values_mut() {
            part.digest = part_digest(part, &nodes, &sandboxes);
        }
        NetmapIndex {
            version: topology.version,
            nodes,
            networks,
            node_networks,
            sandboxes,
        }
    }

    pub fn version(&self) -> u64 {
        self.version
    }

    /// A digest of what the host's netmap shows, without its version and
    /// without building it: the node's identity and the digests of its
    /// networks. Equal digests mean the host has nothing new to apply (a
    /// change in a network the host shares can change it when the host's
    /// netmap does not, e.g. a shared sandbox joining a third network: then
    /// the host is sent an equal netmap, never the reverse).
    pub fn digest_for_host(&self, host_id: &str) -> Option<[u8; 32]> {
        self.digest_for_node(&agent_node_id(host_id))
    }

    pub fn digest_for_node(&self, node_id: &str) -> Option<[u8; 32]> {
        use sha2::Digest as _;
        let node = self.nodes.get(node_id)?;
        let mut hash = sha2::Sha256::new();
        hash.update(node.id.as_bytes());
        hash.update([0]);
        hash.update(node.kind.as_str().as_bytes());
        hash.update(node.index.to_be_bytes());
        for name in self.node_networks.get(node_id).into_iter().flatten() {
            if let Some(part) = self.networks.get(name) {
                hash.update(name.as_bytes());
                hash.update([0]);
                hash.update(part.digest);
            }
        }
        Some(hash.finalize().into())
    }

    /// The netmap of a host agent's node; None if the host has no node yet.
    pub fn for_host(&self, host_id: &str) -> Option<Netmap> {
        self.for_node(&agent_node_id(host_id))
    }

    /// The netmap of one node; None if the node is unknown.
    pub fn for_node(&self, node_id: &str) -> Option<Netmap> {
        let node = self.nodes.get(node_id)?;
        let mut netmap = Netmap {
            topology_version: self.version,
            addresses: allowed_ips(node),
            node_id: node.id.clone(),
            ..Netmap::default()
        };
        let Some(names) = self.node_networks.get(node_id) else {
            return Some(netmap);
        };
        let mut peers: BTreeSet<&str> = BTreeSet::new();
        let mut sandboxes: BTreeSet<&str> = BTreeSet::new();
        for name in names {
            let Some(part) = self.networks.get(name) else {
                continue;
            };
            netmap.networks.push(part.view.clone());
            netmap.dns_records.extend(part.dns_records.iter().cloned());
            netmap.policy_rules.extend(part.rules.iter().cloned());
            peers.extend(part.members.iter().map(String::as_str));
            sandboxes.extend(part.sandboxes.iter().map(String::as_str));
        }
        netmap.dns_records.sort_by(|a, b| a.name.cmp(&b.name));
        for peer_id in peers {
            if peer_id == node_id {
                continue;
            }
            let Some(peer) = self.nodes.get(peer_id) else {
                continue;
            };
            if peer.public_key.is_empty() {
                continue;
            }
            let keepalive = if peer.kind == NodeKind::Local || node.kind == NodeKind::Local {
                LOCAL_KEEPALIVE_SECS
            } else {
                0
            };
            netmap.peers.push(Peer {
                public_key: peer.public_key.clone(),
                endpoint: peer.endpoint.clone(),
                allowed_ips: allowed_ips(peer),
                persistent_keepalive_secs: keepalive,
                node_id: peer.id.clone(),
                host_id: peer.host_id.clone(),
                kind: peer.kind.as_str().to_owned(),
                addresses: bare_addresses(peer),
            });
        }
        for id in sandboxes {
            if let Some(endpoint) = self.sandboxes.get(id) {
                let mut endpoint = endpoint.clone();
                endpoint.networks.retain(|n| names.contains(n));
                netmap.sandboxes.push(endpoint);
            }
        }
        Some(netmap)
    }
}

/// The digest of one network's shared part, including what its members'
/// netmaps show of each member node and each attached sandbox.
fn part_digest(
    part: &NetworkPart,
    nodes: &HashMap<String, MeshNode>,
    sandboxes: &HashMap<String, SandboxEndpoint>,
) -> [u8; 32] {
    use prost::Message as _;
    use sha2::Digest as _;
    let mut hash = sha2::Sha256::new();
    hash.update(part.view.encode_to_vec());
    for record in &part.dns_records {
        hash.update(record.encode_to_vec());
    }
    hash.update([0xff]);
    for rule in &part.rules {
        hash.update(rule.encode_to_vec());
    }
    hash.update([0xff]);
    for id in &part.sandboxes {
        if let Some(endpoint) = sandboxes.get(id) {
            hash.update(endpoint.encode_to_vec());
        }
    }
    hash.update([0xff]);
    for id in &part.members {
        if let Some(node) = nodes.get(id) {
            for field in [
                node.id.as_str(),
                node.kind.as_str(),
                node.host_id.as_str(),
                node.public_key.as_str(),
                node.endpoint.as_str(),
            ] {
                hash.update(field.as_bytes());
                hash.update([0]);
            }
            hash.update(node.index.to_be_bytes());
        }
    }
    hash.finalize().into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::network::{Alias, AttachedSandbox, Attachment, Network, PolicyRule};

    fn node(host: &str, index: u32, key: &str) -> MeshNode {
        MeshNode {
            id: agent_node_id(host),
            kind: NodeKind::Agent,
            host_id: host.into(),
            public_key: key.into(),
            endpoint: format!("127.0.0.1:{}", 51000 + index),
            index,
            created_at_ms: 1,
            updated_at_ms: 1,
        }
    }

    fn network(name: &str, version: u64) -> Network {
        Network {
            name: name.into(),
            topology_version: version,
            created_at_ms: 1,
            denied_connections: 0,
            last_denied_at_ms: 0,
        }
    }

    fn sandbox(id: &str, host: &str, address: &str, tags: &[&str]) -> AttachedSandbox {
        AttachedSandbox {
            id: id.into(),
            host_id: host.into(),
            status: "running".into(),
            addresses: vec![address.into()],
            tags: tags.iter().map(|t| (*t).to_owned()).collect(),
        }
    }

    fn attach(network: &str, sandbox: &str) -> Attachment {
        Attachment {
            network: network.into(),
            sandbox_id: sandbox.into(),
            attached_at_ms: 1,
        }
    }

    fn alias(network: &str, alias: &str, sandbox: &str, ports: &[u16]) -> Alias {
        Alias {
            network: network.into(),
            alias: alias.into(),
            sandbox_id: sandbox.into(),
            ports: ports.to_vec(),
            created_at_ms: 1,
        }
    }

    /// Hosts a, b, c, d. dev: api on a, web on b. ops: db on c.
    /// d runs nothing attached. b has no key yet... no: e has no key.
    fn topology() -> Topology {
        Topology {
            version: 42,
            networks: vec![network("dev", 40), network("ops", 41)],
            attachments: vec![
                attach("dev", "sbx_api"),
                attach("dev", "sbx_web"),
                attach("ops", "sbx_db"),
                attach("ops", "sbx_web"),
                attach("dev", "sbx_nokey"),
            ],
            aliases: vec![
                alias("dev", "api", "sbx_api", &[8080, 9090]),
                alias("dev", "web", "sbx_web", &[80]),
                alias("ops", "db", "sbx_db", &[5432]),
                alias("dev", "lonely", "sbx_nokey", &[1]),
            ],
            rules: vec![PolicyRule {
                id: "pol_1".into(),
                network: "dev".into(),
                from: "web".into(),
                to: "api".into(),
                port: 8080,
                created_at_ms: 1,
            }],
            nodes: vec![
                node("hst_a", 1, "KEY_A"),
                node("hst_b", 2, "KEY_B"),
                node("hst_c", 3, "KEY_C"),
                node("hst_d", 4, "KEY_D"),
                node("hst_e", 5, ""),
            ],
            local_members: vec![],
            sandboxes: vec![
                sandbox("sbx_api", "hst_a", "10.0.0.2", &[]),
                sandbox("sbx_web", "hst_b", "10.0.1.2", &["frontend"]),
                sandbox("sbx_db", "hst_c", "10.0.2.2", &[]),
                sandbox("sbx_nokey", "hst_e", "10.0.4.2", &[]),
            ],
        }
    }

    #[test]
    fn host_gets_its_addresses_peers_records_and_rules_of_its_networks_only() {
        let index = NetmapIndex::new(&topology());
        let a = index.for_host("hst_a").unwrap();
        assert_eq!(a.topology_version, 42);
        assert_eq!(a.node_id, "node_hst_a");
        assert_eq!(a.addresses, ["100.64.0.1/32", "fd7a:115c:a1e0::1/128"]);
        // a shares dev with b and e; e has no key yet and is left out.
        let peers: Vec<_> = a.peers.iter().map(|p| p.node_id.as_str()).collect();
        assert_eq!(peers, ["node_hst_b"]);
        let b = &a.peers[0];
        assert_eq!(b.allowed_ips, ["100.64.0.2/32", "fd7a:115c:a1e0::2/128"]);
        assert_eq!(b.addresses, ["100.64.0.2", "fd7a:115c:a1e0::2"]);
        assert_eq!(b.kind, "agent");
        assert_eq!(b.persistent_keepalive_secs, 0);
        assert_eq!(b.public_key, "KEY_B");
        let names: Vec<_> = a.dns_records.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(
            names,
            ["api.dev.gstacks", "lonely.dev.gstacks", "web.dev.gstacks"]
        );
        let api = &a.dns_records[0];
        assert_eq!(api.ports, [8080, 9090]);
        assert_eq!(api.target_node_address, "100.64.0.1");
        assert_eq!(api.target_host_id, "hst_a");
        assert_eq!(api.sandbox_id, "sbx_api");
        assert_eq!(a.policy_rules.len(), 1);
        assert_eq!(a.policy_rules[0].from, "web");
        let nets: Vec<_> = a.networks.iter().map(|n| n.name.as_str()).collect();
        assert_eq!(nets, ["dev"]);
        assert_eq!(a.networks[0].dns_suffix, "dev.gstacks");
        assert_eq!(a.networks[0].topology_version, 40);
        // Sandboxes of dev, with networks limited to a's own (web is also in ops).
        let sbx: Vec<_> = a.sandboxes.iter().map(|s| s.sandbox_id.as_str()).collect();
        assert_eq!(sbx, ["sbx_api", "sbx_nokey", "sbx_web"]);
        let web = a
            .sandboxes
            .iter()
            .find(|s| s.sandbox_id == "sbx_web")
            .unwrap();
        assert_eq!(web.networks, ["dev"]);
        assert_eq!(web.tags, ["frontend"]);
        assert_eq!(web.addresses, ["10.0.1.2"]);
    }

    #[test]
    fn host_in_two_networks_sees_both_and_host_in_none_only_itself() {
        let index = NetmapIndex::new(&topology());
        let b = index.for_host("hst_b").unwrap();
        let peers: Vec<_> = b.peers.iter().map(|p| p.node_id.as_str()).collect();
        assert_eq!(peers, ["node_hst_a", "node_hst_c"]);
        let nets: Vec<_> = b.networks.iter().map(|n| n.name.as_str()).collect();
        assert_eq!(nets, ["dev", "ops"]);
        let web = b
            .sandboxes
            .iter()
            .find(|s| s.sandbox_id == "sbx_web")
            .unwrap();
        assert_eq!(web.networks, ["dev", "ops"]);
        assert!(b.dns_records.iter().any(|r| r.name == "db.ops.gstacks"));

        let d = index.for_host("hst_d").unwrap();
        assert_eq!(d.addresses, ["100.64.0.4/32", "fd7a:115c:a1e0::4/128"]);
        assert!(d.peers.is_empty() && d.dns_records.is_empty() && d.networks.is_empty());
        assert!(index.for_host("hst_unknown").is_none());
    }

    #[test]
    fn alias_on_a_host_without_a_node_has_no_record_but_stays_in_the_view() {
        let mut t = topology();
        t.nodes.retain(|n| n.host_id != "hst_e");
        let index = NetmapIndex::new(&t);
        let a = index.for_host("hst_a").unwrap();
        assert!(!a.dns_records.iter().any(|r| r.alias == "lonely"));
        assert!(a.networks[0].aliases.iter().any(|v| v.alias == "lonely"));
    }

    #[test]
    fn archived_or_vanished_sandboxes_publish_nothing() {
        let mut t = topology();
        // web (host b) is archived; db's record is gone.
        t.sandboxes[1].status = "archived".into();
        t.sandboxes.retain(|s| s.id != "sbx_db");
        let index = NetmapIndex::new(&t);
        let a = index.for_host("hst_a").unwrap();
        assert_eq!(record_names(&a), ["api.dev.gstacks", "lonely.dev.gstacks"]);
        assert!(!a.networks[0].aliases.iter().any(|v| v.alias == "web"));
        assert!(!a.sandboxes.iter().any(|s| s.sandbox_id == "sbx_web"));
        // b hosts nothing live any more: no networks, no peers.
        let b = index.for_host("hst_b").unwrap();
        assert!(b.networks.is_empty() && b.peers.is_empty());
        assert!(!a.peers.iter().any(|p| p.host_id == "hst_b"));
        let c = index.for_host("hst_c").unwrap();
        assert!(c.dns_records.is_empty());
    }

    fn record_names(netmap: &Netmap) -> Vec<&str> {
        netmap.dns_records.iter().map(|r| r.name.as_str()).collect()
    }

    #[test]
    fn laptops_are_local_peers_with_keepalive() {
        let mut t = topology();
        t.nodes.push(MeshNode {
            id: "node_laptop".into(),
            kind: NodeKind::Local,
            host_id: String::new(),
            public_key: "KEY_L".into(),
            endpoint: String::new(),
            index: 9,
            created_at_ms: 1,
            updated_at_ms: 1,
        });
        t.local_members.push(("dev".into(), "node_laptop".into()));
        let index = NetmapIndex::new(&t);
        let a = index.for_host("hst_a").unwrap();
        let laptop = a.peers.iter().find(|p| p.node_id == "node_laptop").unwrap();
        assert_eq!(laptop.kind, "local");
        assert_eq!(laptop.persistent_keepalive_secs, LOCAL_KEEPALIVE_SECS);
        let l = index.for_node("node_laptop").unwrap();
        let peers: Vec<_> = l.peers.iter().map(|p| p.node_id.as_str()).collect();
        assert_eq!(peers, ["node_hst_a", "node_hst_b"]);
        assert!(l.peers.iter().all(|p| p.persistent_keepalive_secs == 25));
        // c (only in ops) does not see the laptop.
        let c = index.for_host("hst_c").unwrap();
        assert!(!c.peers.iter().any(|p| p.node_id == "node_laptop"));
    }

    #[test]
    fn digest_ignores_the_version_and_sees_content_changes() {
        let t = topology();
        let before = NetmapIndex::new(&t);
        let mut t2 = t.clone();
        t2.version = 43;
        let same = NetmapIndex::new(&t2);
        let a1 = before.digest_for_host("hst_a").unwrap();
        assert_eq!(a1, same.digest_for_host("hst_a").unwrap());
        // A rule in ops changes b's netmap but not a's.
        t2.rules.push(PolicyRule {
            id: "pol_2".into(),
            network: "ops".into(),
            from: "*".into(),
            to: "db".into(),
            port: 0,
            created_at_ms: 2,
        });
        let changed = NetmapIndex::new(&t2);
        assert_eq!(a1, changed.digest_for_host("hst_a").unwrap());
        assert_ne!(
            before.digest_for_host("hst_b").unwrap(),
            changed.digest_for_host("hst_b").unwrap()
        );
        // A peer's new key changes the digest of those who see it (a),
        // not of those who do not (d).
        let mut t3 = t.clone();
        t3.nodes[1].public_key = "KEY_B2".into();
        let rekeyed = NetmapIndex::new(&t3);
        assert_ne!(a1, rekeyed.digest_for_host("hst_a").unwrap());
        assert_eq!(
            before.digest_for_host("hst_d").unwrap(),
            rekeyed.digest_for_host("hst_d").unwrap()
        );
        // Distinct hosts with the same networks differ (their own addresses).
        assert_ne!(
            changed.digest_for_host("hst_a").unwrap(),
            changed.digest_for_host("hst_e").unwrap()
        );
    }

    #[test]
    fn a_thousand_hosts_share_one_preparation() {
        let mut t = Topology {
            version: 7,
            networks: vec![network("big", 7)],
            ..Topology::default()
        };
        for i in 1..=1000u32 {
            let host = format!("hst_{i}");
            t.nodes.push(node(&host, i, &format!("KEY_{i}")));
            let sbx = format!("sbx_{i}");
            t.sandboxes.push(sandbox(
                &sbx,
                &host,
                &format!("10.1.{}.{}", i / 250, i % 250),
                &[],
            ));
            t.attachments.push(attach("big", &sbx));
            t.aliases
                .push(alias("big", &format!("svc-{i}"), &sbx, &[80]));
        }
        let index = NetmapIndex::new(&t);
        // Every host's digest comes from the shared parts without building
        // its netmap; one alias more changes all of them.
        let digests: Vec<_> = (1..=1000)
            .map(|i| index.digest_for_host(&format!("hst_{i}")).unwrap())
            .collect();
        t.aliases.push(alias("big", "extra", "sbx_1", &[81]));
        let after = NetmapIndex::new(&t);
        for (i, before) in digests.iter().enumerate() {
            assert_ne!(
                *before,
                after.digest_for_host(&format!("hst_{}", i + 1)).unwrap()
            );
        }
        let n = index.for_host("hst_500").unwrap();
        assert_eq!(n.peers.len(), 999);
        assert_eq!(n.dns_records.len(), 1000);
        assert_eq!(n.sandboxes.len(), 1000);
    }
}
