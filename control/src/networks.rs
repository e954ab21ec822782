//! Runtime networks on the control plane: validation (through the `policy`
//! crate), the store calls, the records the API shows, the host agent's
//! mesh node from its Hello, `network resolve` and the orchestration of
//! `network test` (the control plane's own checks plus `NetworkDiagnose`
//! on the participating agents' streams).

use std::collections::BTreeMap;
use std::time::Duration;

use crate::clock::now_ms;
use crate::error::{ControlError, Result};
use crate::netmap::NetmapIndex;
use crate::plane::ControlPlane;
use crate::store::network::{agent_node_id, dns_suffix, AttachedSandbox, Network, PolicyRule};
use crate::store::HostStatus;
use policy::{validate_label, validate_port, Selector, Target};
use proto::{command, command_result, AliasView, NetworkTestCheck};

/// Kind of the agent's event for a connection refused by policy.
pub const DENIED_EVENT: &str = "network.connection.denied";
/// How long `network test` waits for each agent's diagnosis.
pub const DIAGNOSE_DEADLINE: Duration = Duration::from_secs(10);
/// Origin of the control plane's own checks.
pub const CONTROL_ORIGIN: &str = "control";

/// Ports from the API: each 1-65535, at least one, sorted, no duplicates.
pub fn validate_ports(alias: &str, ports: &[u32]) -> Result<Vec<u16>> {
    if ports.is_empty() {
        return Err(ControlError::InvalidArgument(format!(
            "alias `{alias}` needs at least one port (`--port N`)"
        )));
    }
    let mut out = ports
        .iter()
        .map(|p| validate_port(u64::from(*p)))
        .collect::<Result<Vec<u16>, _>>()?;
    out.sort_unstable();
    out.dedup();
    Ok(out)
}

fn validate_sandbox_id(id: &str) -> Result<()> {
    if id.trim().is_empty() {
        return Err(ControlError::InvalidArgument(
            "a sandbox id is required".to_owned(),
        ));
    }
    Ok(())
}

fn alias_view(alias: &crate::store::Alias, host_id: &str) -> AliasView {
    AliasView {
        alias: alias.alias.clone(),
        sandbox_id: alias.sandbox_id.clone(),
        ports: alias.ports.iter().map(|p| u32::from(*p)).collect(),
        host_id: host_id.to_owned(),
    }
}

pub fn rule_view(rule: &PolicyRule) -> proto::PolicyRule {
    proto::PolicyRule {
        id: rule.id.clone(),
        network: rule.network.clone(),
        from: rule.from.clone(),
        to: rule.to.clone(),
        port: u32::from(rule.port),
    }
}

impl ControlPlane {
    fn network_or_not_found(&self, name: &str) -> Result<Network> {
        self.store
            .network(name)?
            .ok_or_else(|| ControlError::NetworkNotFound(name.to_owned()))
    }

    /// A network with its members, aliases and rules, as the API shows it.
    pub fn network_record(&self, name: &str) -> Result<proto::NetworkRecord> {
        let network = self.network_or_not_found(name)?;
        let attachments = self.store.network_attachments(name)?;
        let aliases = self.store.network_aliases(name)?;
        let rules = self.store.policy_rules(name)?;
        let mut sandboxes: BTreeMap<String, Option<AttachedSandbox>> = BTreeMap::new();
        for attachment in &attachments {
            let facts = self.store.network_sandbox(&attachment.sandbox_id)?;
            sandboxes.insert(attachment.sandbox_id.clone(), facts);
        }
        let host_of = |sandbox_id: &str| {
            sandboxes
                .get(sandbox_id)
                .and_then(|s| s.as_ref())
                .map(|s| s.host_id.clone())
                .unwrap_or_default()
        };
        let members = attachments
            .iter()
            .map(|a| {
                let facts = sandboxes.get(&a.sandbox_id).and_then(|s| s.as_ref());
                proto::NetworkMember {
                    sandbox_id: a.sandbox_id.clone(),
                    host_id: facts.map(|s| s.host_id.clone()).unwrap_or_default(),
                    status: facts.map_or_else(|| "gone".to_owned(), |s| s.status.clone()),
                    addresses: facts.map(|s| s.addresses.clone()).unwrap_or_default(),
                    aliases: aliases
                        .iter()
                        .filter(|al| al.sandbox_id == a.sandbox_id)
                        .map(|al| al.alias.clone())
                        .collect(),
                    attached_at_ms: a.attached_at_ms,
                }
            })
            .collect();
        Ok(proto::NetworkRecord {
            dns_suffix: network.dns_suffix(),
            name: network.name,
            topology_version: network.topology_version,
            created_at_ms: network.created_at_ms,
            members,
            aliases: aliases
                .iter()
                .map(|a| alias_view(a, &host_of(&a.sandbox_id)))
                .collect(),
            policy_rules: rules.iter().map(rule_view).collect(),
            denied_connections: network.denied_connections,
            last_denied_at_ms: network.last_denied_at_ms,
            cluster_topology_version: self.store.topology_version()?,
        })
    }

    fn change(&self, network: &str, version: u64) -> Result<proto::NetworkChange> {
        Ok(proto::NetworkChange {
            network: Some(self.network_record(network)?),
            topology_version: version,
        })
    }

    pub fn create_network(&self, name: &str) -> Result<proto::NetworkRecord> {
        let name = name.trim();
        validate_label("network", name)?;
        let network = self.store.create_network(name, now_ms())?;
        tracing::info!(network = %network.name, version = network.topology_version, "network created");
        self.network_record(&network.name)
    }

    pub fn list_networks(&self) -> Result<(Vec<proto::NetworkRecord>, u64)> {
        let version = self.store.topology_version()?;
        let records = self
            .store
            .networks()?
            .iter()
            .map(|n| self.network_record(&n.name))
            .collect::<Result<_>>()?;
        Ok((records, version))
    }

    /// `network attach dev <sandbox> [--alias A --port P...]`.
    pub fn attach_sandbox(
        &self,
        network: &str,
        sandbox_id: &str,
        alias: &str,
        ports: &[u32],
    ) -> Result<proto::NetworkChange> {
        validate_label("network", network)?;
        validate_sandbox_id(sandbox_id)?;
        let alias = alias.trim();
        let first = if alias.is_empty() {
            if !ports.is_empty() {
                return Err(ControlError::InvalidArgument(
                    "`--port` publishes an alias: give `--alias NAME` with it".to_owned(),
                ));
            }
            None
        } else {
            validate_label("alias", alias)?;
            Some((alias, validate_ports(alias, ports)?))
        };
        let version = self.store.attach_sandbox(
            network,
            sandbox_id,
            first.as_ref().map(|(a, p)| (*a, p.as_slice())),
            now_ms(),
        )?;
        tracing::info!(network, sandbox_id, alias, version, "sandbox attached");
        self.change(network, version)
    }

    pub fn detach_sandbox(&self, network: &str, sandbox_id: &str) -> Result<proto::NetworkChange> {
        validate_label("network", network)?;
        validate_sandbox_id(sandbox_id)?;
        let version = self.store.detach_sandbox(network, sandbox_id)?;
        tracing::info!(network, sandbox_id, version, "sandbox detached");
        self.change(network, version)
    }

    pub fn add_alias(
        &self,
        network: &str,
        sandbox_id: &str,
        alias: &str,
        ports: &[u32],
    ) -> Result<proto::NetworkChange> {
        validate_label("network", network)?;
        validate_sandbox_id(sandbox_id)?;
        let alias = alias.trim();
        validate_label("alias", alias)?;
        let ports = validate_ports(alias, ports)?;
        let version = self
            .store
            .add_alias(network, sandbox_id, alias, &ports, now_ms())?;
        tracing::info!(network, sandbox_id, alias, version, "alias added");
        self.change(network, version)
    }

    pub fn list_aliases(&self, network: &str) -> Result<Vec<AliasView>> {
        let record = self.network_record(network)?;
        Ok(record.aliases)
    }

    pub fn remove_alias(&self, network: &str, alias: &str) -> Result<proto::NetworkChange> {
        validate_label("network", network)?;
        let alias = alias.trim();
        validate_label("alias", alias)?;
        let version = self.store.remove_alias(network, alias)?;
        tracing::info!(network, alias, version, "alias removed");
        self.change(network, version)
    }

    /// `network policy allow dev --from SEL --to ALIAS [--port P]`.
    pub fn allow_policy(
        &self,
        network: &str,
        from: &str,
        to: &str,
        port: u32,
    ) -> Result<(proto::PolicyRule, u64)> {
        validate_label("network", network)?;
        let from = Selector::parse(from)?;
        let to = Target::parse(to)?;
        let port = match port {
            0 => 0,
            p => validate_port(u64::from(p))?,
        };
        self.network_or_not_found(network)?;
        if let Target::Alias(alias) = &to {
            let known = self
                .store
                .network_aliases(network)?
                .iter()
                .any(|a| &a.alias == alias);
            if !known {
                return Err(ControlError::AliasNotFound {
                    alias: alias.clone(),
                    network: network.to_owned(),
                });
            }
        }
        let rule = PolicyRule {
            id: crate::secret::new_id("pol"),
            network: network.to_owned(),
            from: from.to_string(),
            to: to.to_string(),
            port,
            created_at_ms: now_ms(),
        };
        let version = self.store.add_policy_rule(&rule)?;
        tracing::info!(network, rule = %rule.id, from = %rule.from, to = %rule.to, port, version, "policy rule added");
        Ok((rule_view(&rule), version))
    }

    pub fn list_policy_rules(&self, network: &str) -> Result<Vec<proto::PolicyRule>> {
        Ok(self
            .store
            .policy_rules(network)?
            .iter()
            .map(rule_view)
            .collect())
    }

    pub fn remove_policy_rule(&self, network: &str, id: &str) -> Result<proto::NetworkChange> {
        validate_label("network", network)?;
        let version = self.store.remove_policy_rule(network, id.trim())?;
        tracing::info!(network, rule = id, version, "policy rule removed");
        self.change(network, version)
    }

    /// `network resolve dev api`: where the alias leads.
    pub fn resolve_alias(&self, network: &str, alias: &str) -> Result<proto::ResolveAliasResponse> {
        validate_label("network", network)?;
        validate_label("alias", alias)?;
        self.network_or_not_found(network)?;
        let found = self
            .store
            .network_aliases(network)?
            .into_iter()
            .find(|a| a.alias == alias)
            .ok_or_else(|| ControlError::AliasNotFound {
                alias: alias.to_owned(),
                network: network.to_owned(),
            })?;
        let sandbox = self.store.network_sandbox(&found.sandbox_id)?;
        let host_id = sandbox
            .as_ref()
            .map(|s| s.host_id.clone())
            .unwrap_or_default();
        let host_status = match self.store.host(&host_id)? {
            Some(host) => host.status.as_str().to_owned(),
            None => String::new(),
        };
        let node = if host_id.is_empty() {
            None
        } else {
            self.store.mesh_node(&agent_node_id(&host_id))?
        };
        Ok(proto::ResolveAliasResponse {
            name: format!("{alias}.{}", dns_suffix(network)),
            network: network.to_owned(),
            alias: alias.to_owned(),
            ports: found.ports.iter().map(|p| u32::from(*p)).collect(),
            sandbox_id: found.sandbox_id,
            sandbox_status: sandbox
                .as_ref()
                .map_or_else(|| "gone".to_owned(), |s| s.status.clone()),
            sandbox_addresses: sandbox.map(|s| s.addresses).unwrap_or_default(),
            host_id,
            host_status,
            node_id: node.as_ref().map(|n| n.id.clone()).unwrap_or_default(),
            node_addresses: node
                .map(|n| vec![n.ipv4().to_string(), n.ipv6().to_string()])
                .unwrap_or_default(),
        })
    }

    /// The host agent said hello: keep its mesh node (key, endpoint) and
    /// queue its netmap. Never fails the stream: a store error is logged and
    /// the agent still gets what can be computed.
    pub fn agent_hello(&self, host_id: &str, mesh: Option<&proto::MeshNodeInfo>) {
        let (key, endpoint) = mesh.map_or(("", ""), |m| (m.public_key.trim(), m.endpoint.trim()));
        match self
            .store
            .record_agent_node(host_id, key, endpoint, now_ms())
        {
            Ok((node, changed)) => {
                if let Some(version) = changed {
                    tracing::info!(host = %host_id, node = %node.id, address = %node.ipv4(), version, "mesh node recorded");
                }
            }
            Err(err) => {
                tracing::warn!(host = %host_id, error = %err, "mesh node not recorded")
            }
        }
        self.netmaps.after_hello(host_id);
    }

    /// An agent's `network.connection.denied` event: counted per network.
    pub fn count_denied_connection(&self, event: &proto::Event) {
        let Some(network) = event.fields.get("network") else {
            return;
        };
        if let Err(err) = self.store.record_denied_connection(network, event.at_ms) {
            tracing::warn!(network = %network, error = %err, "denied connection not counted");
        }
    }

    /// `network test dev <source> <alias>:<port>`.
    pub async fn test_network(
        &self,
        network: &str,
        source: &str,
        alias: &str,
        port: u32,
    ) -> Result<proto::TestNetworkResponse> {
        let mut checks = Vec::new();
        let mut check = |name: &str, passed: bool, detail: String| {
            checks.push(NetworkTestCheck {
                origin: CONTROL_ORIGIN.to_owned(),
                name: name.to_owned(),
                passed,
                detail,
            });
            passed
        };
        // Bad input is an error, not a failed check.
        validate_label("network", network)?;
        let selector = Selector::parse(source)?;
        validate_label("alias", alias)?;
        let port = validate_port(u64::from(port))?;

        let topology = self.store.topology()?;
        let index = NetmapIndex::new(&topology);
        let version = topology.version;
        let finish = |checks: Vec<NetworkTestCheck>| proto::TestNetworkResponse {
            passed: checks.iter().all(|c| c.passed),
            checks,
            topology_version: version,
        };
        let Some(net) = topology.networks.iter().find(|n| n.name == network) else {
            check(
                "network_exists",
                false,
                format!("network `{network}` does not exist"),
            );
            return Ok(finish(checks));
        };
        check(
            "network_exists",
            true,
            format!(
                "network `{network}` ({}) at topology version {}",
                net.dns_suffix(),
                net.topology_version
            ),
        );
        let Some(target) = topology
            .aliases
            .iter()
            .find(|a| a.network == network && a.alias == alias)
        else {
            check(
                "alias_exists",
                false,
                format!("alias `{alias}` does not exist in network `{network}`"),
            );
            return Ok(finish(checks));
        };
        check(
            "alias_exists",
            true,
            format!(
                "{alias}.{} is published by sandbox `{}`",
                dns_suffix(network),
                target.sandbox_id
            ),
        );
        let ports: Vec<String> = target.ports.iter().map(u16::to_string).collect();
        check(
            "port_published",
            target.ports.contains(&port),
            if target.ports.contains(&port) {
                format!("alias `{alias}` publishes port {port}")
            } else {
                format!(
                    "alias `{alias}` does not publish port {port} (it publishes {})",
                    ports.join(", ")
                )
            },
        );
        // The control plane's view of the decision (the agents decide again).
        let rules: Vec<policy::Rule> = topology
            .rules
            .iter()
            .filter(|r| r.network == network)
            .filter_map(|r| {
                Some(policy::Rule {
                    id: r.id.clone(),
                    from: Selector::parse(&r.from).ok()?,
                    to: Target::parse(&r.to).ok()?,
                    port: (r.port != 0).then_some(r.port),
                })
            })
            .collect();
        let sandbox_of = |id: &str| topology.sandboxes.iter().find(|s| s.id == id);
        let source_model = source_model(&selector, network, &topology);
        let decision = policy::decide(
            &rules,
            &source_model,
            policy::Destination {
                alias,
                port,
                exposed_ports: Some(&target.ports),
            },
        );
        check(
            "policy",
            decision.is_allowed(),
            format!("{selector} -> {alias}:{port}: {decision}"),
        );

        // Participating hosts: the alias's host, and the source sandbox's.
        let mut hosts: Vec<(String, &'static str)> = Vec::new();
        match sandbox_of(&target.sandbox_id) {
            Some(s) if s.status == "archived" => {
                check(
                    "target_sandbox",
                    false,
                    format!(
                        "sandbox `{}` behind the alias is archived: it has no container",
                        s.id
                    ),
                );
            }
            Some(s) => hosts.push((s.host_id.clone(), "target")),
            None => {
                check(
                    "target_host_connected",
                    false,
                    format!(
                        "sandbox `{}` behind the alias no longer exists",
                        target.sandbox_id
                    ),
                );
            }
        }
        // A sandbox source (named, or by the alias it publishes here) has
        // its agent asked too: it is where the connection starts.
        let source_sandbox = match &selector {
            Selector::Sandbox(id) => Some(id.clone()),
            Selector::Alias(alias) => topology
                .aliases
                .iter()
                .find(|a| a.network == network && &a.alias == alias)
                .map(|a| a.sandbox_id.clone()),
            _ => None,
        };
        if let Some(id) = source_sandbox {
            let attached = topology
                .attachments
                .iter()
                .any(|a| a.network == network && a.sandbox_id == id);
            match sandbox_of(&id) {
                Some(s) if attached => {
                    check(
                        "source_attached",
                        true,
                        format!("source sandbox `{id}` is attached to network `{network}`"),
                    );
                    if !hosts.iter().any(|(h, _)| h == &s.host_id) {
                        hosts.push((s.host_id.clone(), "source"));
                    }
                }
                _ => {
                    check(
                        "source_attached",
                        false,
                        format!("sandbox `{id}` is not attached to network `{network}`"),
                    );
                }
            }
        }
        let mut asks = Vec::new();
        for (host_id, role) in &hosts {
            let session = self.sessions.get(host_id);
            let status = match self.store.host(host_id)? {
                Some(_) if session.is_some() => HostStatus::Connected.as_str().to_owned(),
                Some(h) => h.status.as_str().to_owned(),
                None => "unknown".to_owned(),
            };
            let name = format!("{role}_host_connected");
            let Some(session) = session else {
                check(
                    &name,
                    false,
                    format!(
                        "host `{host_id}` ({role} side) is {status}: its agent cannot be asked"
                    ),
                );
                continue;
            };
            check(
                &name,
                true,
                format!("host `{host_id}` ({role} side) is connected"),
            );
            let expected = self
                .netmaps
                .current_version_sent(host_id, &index)
                .unwrap_or(version);
            asks.push((host_id.clone(), session, expected));
        }
        let diagnose = |session: std::sync::Arc<crate::sessions::HostSession>, expected: u64| {
            let kind = command::Kind::NetworkDiagnose(proto::NetworkDiagnose {
                network: network.to_owned(),
                source: selector.to_string(),
                alias: alias.to_owned(),
                port: u32::from(port),
                expected_topology_version: expected,
            });
            async move { session.request(kind, DIAGNOSE_DEADLINE).await }
        };
        let answers = futures::future::join_all(
            asks.iter()
                .map(|(_, session, expected)| diagnose(session.clone(), *expected)),
        )
        .await;
        for ((host_id, _, _), answer) in asks.iter().zip(answers) {
            match answer {
                Ok(proto::CommandResult {
                    kind: Some(command_result::Kind::NetworkDiagnosis(diagnosis)),
                }) => {
                    for c in diagnosis.checks {
                        checks.push(NetworkTestCheck {
                            origin: host_id.clone(),
                            name: c.name,
                            passed: c.passed,
                            detail: c.detail,
                        });
                    }
                }
                Ok(other) => checks.push(NetworkTestCheck {
                    origin: host_id.clone(),
                    name: "diagnose".to_owned(),
                    passed: false,
                    detail: format!("the agent answered with an unexpected result: {other:?}"),
                }),
                Err(err) => checks.push(NetworkTestCheck {
                    origin: host_id.clone(),
                    name: "diagnose".to_owned(),
                    passed: false,
                    detail: format!("the agent did not diagnose: {err}"),
                }),
            }
        }
        Ok(finish(checks))
    }
}

/// The source under test as the policy crate sees it: `local` is a laptop,
/// `sandbox:<id>` that sandbox with its aliases and tags in the network; an
/// alias stands for the sandbox publishing it; `tag:<t>` and `*` for a
/// sandbox carrying what the selector names.
fn source_model(
    selector: &Selector,
    network: &str,
    topology: &crate::store::Topology,
) -> policy::Source {
    let of_sandbox = |id: &str| {
        let sandbox = topology.sandboxes.iter().find(|s| s.id == id);
        policy::Source {
            local: false,
            sandbox_id: Some(id.to_owned()),
            aliases: topology
                .aliases
                .iter()
                .filter(|a| a.network == network && a.sandbox_id == id)
                .map(|a| a.alias.clone())
                .collect(),
            tags: sandbox.map(|s| s.tags.clone()).unwrap_or_default(),
        }
    };
    match selector {
        Selector::Local => policy::Source::local(),
        Selector::Sandbox(id) => of_sandbox(id),
        Selector::Alias(alias) => match topology
            .aliases
            .iter()
            .find(|a| a.network == network && &a.alias == alias)
        {
            Some(a) => of_sandbox(&a.sandbox_id),
            None => policy::Source {
                aliases: vec![alias.clone()],
                ..policy::Source::default()
            },
        },
        Selector::Tag(tag) => policy::Source {
            tags: vec![tag.clone()],
            ..policy::Source::default()
        },
        Selector::Any => policy::Source::default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plane::Settings;
    use crate::store::sqlite::SqliteStore;
    use std::sync::Arc;

    fn plane() -> (tempfile::TempDir, Arc<ControlPlane>) {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("control.db")).unwrap();
        (dir, ControlPlane::new(Arc::new(store), Settings::default()))
    }

    #[test]
    fn ports_are_checked_sorted_and_deduplicated() {
        assert_eq!(
            validate_ports("api", &[9090, 80, 9090]).unwrap(),
            [80, 9090]
        );
        let none = validate_ports("api", &[]).unwrap_err().to_string();
        assert_eq!(
            none,
            "invalid argument: alias `api` needs at least one port (`--port N`)"
        );
        for bad in [0, 65_536, u32::MAX] {
            let err = validate_ports("api", &[80, bad]).unwrap_err().to_string();
            assert_eq!(
                err,
                format!("port {bad} is out of range: ports are 1-65535")
            );
        }
    }

    #[test]
    fn bad_input_is_refused_before_the_store_and_bumps_nothing() {
        let (_dir, plane) = plane();
        plane.create_network("dev").unwrap();
        let before = plane.store.topology_version().unwrap();
        let errors = [
            plane.create_network("DEV").unwrap_err(),
            plane.create_network("").unwrap_err(),
            plane.attach_sandbox("dev", "sbx_1", "", &[80]).unwrap_err(),
            plane.attach_sandbox("dev", " ", "", &[]).unwrap_err(),
            plane
                .attach_sandbox("dev", "sbx_1", "a.b", &[80])
                .unwrap_err(),
            plane.add_alias("dev", "sbx_1", "api", &[]).unwrap_err(),
            plane.allow_policy("dev", "tag:", "api", 0).unwrap_err(),
            plane.allow_policy("dev", "local", "API", 0).unwrap_err(),
            plane.allow_policy("dev", "local", "*", 70_000).unwrap_err(),
            plane.allow_policy("dev", "local", "api", 0).unwrap_err(),
            plane.allow_policy("ops", "local", "*", 0).unwrap_err(),
        ];
        let texts: Vec<String> = errors.iter().map(ToString::to_string).collect();
        assert_eq!(
            texts,
            [
                "network name `DEV` is not a DNS label: only lowercase letters, digits and `-` are allowed",
                "network name `` is not a DNS label: it is empty",
                "invalid argument: `--port` publishes an alias: give `--alias NAME` with it",
                "invalid argument: a sandbox id is required",
                "alias name `a.b` is not a DNS label: only lowercase letters, digits and `-` are allowed",
                "invalid argument: alias `api` needs at least one port (`--port N`)",
                "selector `tag:` is not valid: `tag:` needs a tag after the colon",
                "alias name `API` is not a DNS label: only lowercase letters, digits and `-` are allowed",
                "port 70000 is out of range: ports are 1-65535",
                "alias `api` not found in network `dev`",
                "network `ops` not found",
            ]
        );
        let statuses: Vec<tonic::Code> = errors
            .into_iter()
            .map(|e| tonic::Status::from(e).code())
            .collect();
        assert_eq!(statuses[0], tonic::Code::InvalidArgument);
        assert_eq!(statuses[9], tonic::Code::NotFound);
        assert_eq!(plane.store.topology_version().unwrap(), before);
        // A selector is stored in its canonical form.
        let (rule, _) = plane.allow_policy("dev", " local ", "*", 0).unwrap();
        assert_eq!(
            (rule.from.as_str(), rule.to.as_str(), rule.port),
            ("local", "*", 0)
        );
        assert!(rule.id.starts_with("pol_"));
    }

    #[test]
    fn the_source_under_test_is_modelled_like_the_agents_do() {
        use crate::store::network::{Alias, AttachedSandbox};
        let topology = crate::store::Topology {
            aliases: vec![Alias {
                network: "dev".into(),
                alias: "web".into(),
                sandbox_id: "sbx_web".into(),
                ports: vec![80],
                created_at_ms: 1,
            }],
            sandboxes: vec![AttachedSandbox {
                id: "sbx_web".into(),
                host_id: "hst_a".into(),
                status: "running".into(),
                addresses: vec![],
                tags: vec!["frontend".into()],
            }],
            ..Default::default()
        };
        let web = source_model(&Selector::Alias("web".into()), "dev", &topology);
        assert_eq!(web.sandbox_id.as_deref(), Some("sbx_web"));
        assert_eq!(web.aliases, ["web"]);
        assert_eq!(web.tags, ["frontend"]);
        let by_id = source_model(&Selector::Sandbox("sbx_web".into()), "dev", &topology);
        assert_eq!(by_id, web);
        // In another network the sandbox publishes no alias.
        let elsewhere = source_model(&Selector::Sandbox("sbx_web".into()), "ops", &topology);
        assert!(elsewhere.aliases.is_empty());
        assert!(source_model(&Selector::Local, "dev", &topology).local);
        let tag = source_model(&Selector::Tag("x".into()), "dev", &topology);
        assert_eq!(tag.tags, ["x"]);
    }
}
