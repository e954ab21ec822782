//! The `NetworkDiagnose` handler: the agent checks its own state for one
//! source selector, alias and port, and answers each check with pass or
//! fail and why: `mesh_joined`, `topology_version`, `dns_records`, `route`,
//! `policy`.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use policy::{Selector, Source};
use proto::{command, command_result, Command, DiagnosticCheck, ErrorCode, NetworkDiagnosis};

use super::topology::{Identity, Topology};
use super::{Facing, ListenerKey, Shared};
use crate::dispatch::{CommandError, HandlerFuture, Link, Module};

/// How long the route check waits for the sandbox to accept.
const SANDBOX_PROBE_TIMEOUT: Duration = Duration::from_secs(1);

/// The network module as the dispatcher sees it.
pub struct NetworkModule {
    shared: Arc<Shared>,
}

impl NetworkModule {
    pub(super) fn new(shared: Arc<Shared>) -> Self {
        Self { shared }
    }
}

impl Module for NetworkModule {
    fn name(&self) -> &'static str {
        "network"
    }

    fn handle(self: Arc<Self>, command: Command, _link: Link) -> HandlerFuture {
        Box::pin(async move {
            let Some(command::Kind::NetworkDiagnose(request)) = command.kind else {
                return Err(CommandError::new(
                    ErrorCode::Unsupported,
                    "the network module only handles network_diagnose",
                ));
            };
            let port = u16::try_from(request.port)
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| {
                    CommandError::new(
                        ErrorCode::InvalidArgument,
                        format!("port {} is out of range: ports are 1-65535", request.port),
                    )
                })?;
            policy::validate_label("network", &request.network)
                .and_then(|_| policy::validate_label("alias", &request.alias))
                .map_err(|e| CommandError::new(ErrorCode::InvalidArgument, e.to_string()))?;
            let selector = Selector::parse(&request.source)
                .map_err(|e| CommandError::new(ErrorCode::InvalidArgument, e.to_string()))?;
            let diagnosis = diagnose(
                &self.shared,
                &request.network,
                &selector,
                &request.alias,
                port,
                request.expected_topology_version,
            )
            .await;
            Ok(command_result::Kind::NetworkDiagnosis(diagnosis))
        })
    }
}

fn check(name: &str, passed: bool, detail: impl Into<String>) -> DiagnosticCheck {
    DiagnosticCheck {
        name: name.to_owned(),
        passed,
        detail: detail.into(),
    }
}

async fn diagnose(
    shared: &Shared,
    network: &str,
    selector: &Selector,
    alias: &str,
    port: u16,
    expected_version: u64,
) -> NetworkDiagnosis {
    let topology = shared.topology();
    let applied = shared.applied_version.load(Ordering::Relaxed);
    let name = format!("{alias}.{network}.gstacks");
    let mut checks = Vec::new();

    // mesh_joined
    let (node, error) = {
        let mesh = shared.mesh.lock().unwrap_or_else(|e| e.into_inner());
        (mesh.node.clone(), mesh.error.clone())
    };
    checks.push(match node {
        Some(node) if error.is_some() => check(
            "mesh_joined",
            false,
            format!(
                "node {} on UDP {} is up, but {}",
                node.public_key(),
                node.local_addr(),
                error.unwrap_or_default()
            ),
        ),
        Some(node) => {
            let status = node.status();
            let up = status
                .peers
                .iter()
                .filter(|p| p.last_handshake.is_some())
                .count();
            check(
                "mesh_joined",
                true,
                format!(
                    "node {} on UDP {}, overlay {}; {} peers, {} with a session",
                    node.public_key(),
                    node.local_addr(),
                    join(node.addresses()),
                    status.peers.len(),
                    up
                ),
            )
        }
        None => check(
            "mesh_joined",
            false,
            match (error, topology.addresses.is_empty()) {
                (Some(e), _) => format!("the mesh node is not bound: {e}"),
                (None, true) => {
                    "no overlay address yet: no netmap with addresses was applied".to_owned()
                }
                (None, false) => "the mesh node is not bound".to_owned(),
            },
        ),
    });

    // topology_version
    checks.push(check(
        "topology_version",
        applied >= expected_version && applied > 0,
        format!("agent applied {applied}, control plane is at {expected_version}"),
    ));

    // dns_records
    let record = shared.loopback_records.lookup(&name);
    checks.push(match (record, shared.dns_addr) {
        (Some(_), None) => check(
            "dns_records",
            false,
            format!(
                "{name} is loaded but the agent DNS is not served (see the agent log: {} could not be bound)",
                crate::config::MESH_DNS_ADDR
            ),
        ),
        (Some(addrs), Some(dns)) => check(
            "dns_records",
            true,
            format!(
                "{name} -> {} on the agent DNS {dns} ({} records loaded)",
                addrs,
                shared.loopback_records.len()
            ),
        ),
        (None, _) => check(
            "dns_records",
            false,
            format!(
                "{name} is not in the agent DNS ({} records loaded)",
                shared.loopback_records.len()
            ),
        ),
    });

    // route
    checks.push(route_check(shared, &topology, network, alias, port).await);

    // policy
    checks.push(policy_check(&topology, network, selector, alias, port));

    NetworkDiagnosis {
        host_id: shared.host_id.clone(),
        applied_topology_version: applied,
        checks,
    }
}

fn join(addresses: &[std::net::IpAddr]) -> String {
    addresses
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

async fn route_check(
    shared: &Shared,
    topology: &Topology,
    network: &str,
    alias: &str,
    port: u16,
) -> DiagnosticCheck {
    let Some(entry) = topology
        .networks
        .get(network)
        .and_then(|n| n.aliases.get(alias))
    else {
        return check(
            "route",
            false,
            format!("no alias `{alias}` in network `{network}` in the applied netmap"),
        );
    };
    if !entry.ports.contains(&port) {
        return check(
            "route",
            false,
            format!(
                "alias `{alias}` does not expose port {port} (exposed: {})",
                entry
                    .ports
                    .iter()
                    .map(u16::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        );
    }
    let key = ListenerKey {
        network: network.to_owned(),
        alias: alias.to_owned(),
        port,
    };
    let listener = shared
        .listener_addrs
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .get(&(Facing::Loopback, key))
        .copied();
    let listening = match listener {
        Some(addr) => format!("listener {addr}"),
        None => {
            return check(
                "route",
                false,
                format!("no local listener for {alias}.{network}.gstacks:{port}"),
            )
        }
    };
    if entry.host_id == topology.host_id {
        // This host runs the sandbox: can it be reached?
        let to = match topology.sandbox_address(network, alias, port) {
            Ok(to) => to,
            Err(why) => return check("route", false, format!("{listening}; {why}")),
        };
        return match tokio::time::timeout(SANDBOX_PROBE_TIMEOUT, tokio::net::TcpStream::connect(to))
            .await
        {
            Ok(Ok(_)) => check(
                "route",
                true,
                format!(
                    "{listening}; sandbox `{}` on this host accepts on {to}",
                    entry.sandbox_id
                ),
            ),
            Ok(Err(e)) => check(
                "route",
                false,
                format!("{listening}; sandbox `{}` at {to}: {e}", entry.sandbox_id),
            ),
            Err(_) => check(
                "route",
                false,
                format!(
                    "{listening}; sandbox `{}` at {to} did not accept within 1 s",
                    entry.sandbox_id
                ),
            ),
        };
    }
    let Some(target) = entry.target_node else {
        return check(
            "route",
            false,
            format!(
                "{listening}; no mesh node is known for host `{}`",
                entry.host_id
            ),
        );
    };
    let Some(peer) = topology.peer_by_address(target) else {
        return check(
            "route",
            false,
            format!(
                "{listening}; {target} (host `{}`) is not a mesh peer of this node",
                entry.host_id
            ),
        );
    };
    let session = shared.node().and_then(|node| {
        node.status()
            .peer(&peer.config.public_key)
            .and_then(|p| p.last_handshake)
    });
    check(
        "route",
        true,
        format!(
            "{listening} -> mesh {target}:{} (host `{}`, {})",
            proxy::MESH_PROXY_PORT,
            entry.host_id,
            match session {
                Some(at) => format!("last handshake {} s ago", at.elapsed().as_secs()),
                None => "no session yet; one is made on the first connection".to_owned(),
            }
        ),
    )
}

/// The source a selector stands for, as far as this agent can tell.
fn selector_source(
    topology: &Topology,
    network: &str,
    selector: &Selector,
) -> Result<Source, String> {
    match selector {
        Selector::Local => Ok(Source::local()),
        Selector::Any => Ok(Source::default()),
        Selector::Tag(tag) => Ok(Source {
            tags: vec![tag.clone()],
            ..Source::default()
        }),
        Selector::Sandbox(id) => topology
            .source(network, &Identity::Sandbox(id.clone()))
            .ok_or_else(|| format!("sandbox `{id}` is not attached to network `{network}`")),
        Selector::Alias(alias) => {
            let entry = topology
                .networks
                .get(network)
                .and_then(|n| n.aliases.get(alias))
                .ok_or_else(|| format!("no alias `{alias}` in network `{network}`"))?;
            topology
                .source(network, &Identity::Sandbox(entry.sandbox_id.clone()))
                .ok_or_else(|| {
                    format!(
                        "sandbox `{}` of alias `{alias}` is not known",
                        entry.sandbox_id
                    )
                })
        }
    }
}

fn policy_check(
    topology: &Topology,
    network: &str,
    selector: &Selector,
    alias: &str,
    port: u16,
) -> DiagnosticCheck {
    let source = match selector_source(topology, network, selector) {
        Ok(source) => source,
        Err(why) => return check("policy", false, why),
    };
    let decision = topology.decide(network, &source, alias, port);
    let rules = topology
        .networks
        .get(network)
        .map_or(0, |n| n.rules.rules().len());
    let detail = match &decision {
        policy::Decision::Allow { rule_id } => {
            let rule = topology
                .networks
                .get(network)
                .and_then(|n| n.rules.rules().iter().find(|r| &r.id == rule_id))
                .map_or_else(|| rule_id.clone(), ToString::to_string);
            format!("rule {rule} allows {selector} -> {alias}:{port}")
        }
        denied => format!("{selector} -> {alias}:{port} {denied} ({rules} rules in `{network}`)"),
    };
    check("policy", decision.is_allowed(), detail)
}

#[cfg(test)]
mod tests {
    use super::super::topology::tests::netmap;
    use super::*;

    #[test]
    fn policy_check_names_the_rule_or_the_reason() {
        let topo = Topology::from_netmap(&netmap(), "h1");
        let allowed = policy_check(&topo, "dev", &Selector::parse("web").unwrap(), "api", 8080);
        assert!(allowed.passed);
        assert_eq!(
            allowed.detail,
            "rule pol_1: allow web -> api:8080 allows web -> api:8080"
        );
        let denied = policy_check(&topo, "dev", &Selector::Local, "api", 8080);
        assert!(!denied.passed);
        assert!(denied.detail.contains("default deny"), "{}", denied.detail);
        let unknown = policy_check(&topo, "dev", &Selector::parse("nope").unwrap(), "api", 8080);
        assert!(!unknown.passed);
        assert!(
            unknown.detail.contains("no alias `nope`"),
            "{}",
            unknown.detail
        );
        let by_id = policy_check(
            &topo,
            "dev",
            &Selector::parse("sandbox:sbx_web").unwrap(),
            "api",
            8080,
        );
        assert!(by_id.passed, "{}", by_id.detail);
    }
}
