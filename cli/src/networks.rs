//! `gstacks network create|list|show|attach|detach|alias|policy|resolve|test`.

use serde_json::{json, Value};

use crate::client::{status_error, Api};
use crate::output::{join_or_dash, or_dash, print_table, rfc3339};
use proto::{AliasView, NetworkChange, NetworkRecord, PolicyRule, TestNetworkResponse};

fn ports_text(ports: &[u32]) -> String {
    let ports: Vec<String> = ports.iter().map(u32::to_string).collect();
    join_or_dash(&ports)
}

fn rule_port(port: u32) -> String {
    match port {
        0 => "any".to_owned(),
        p => p.to_string(),
    }
}

fn alias_json(alias: &AliasView, network: &str) -> Value {
    json!({
        "alias": alias.alias,
        "name": format!("{}.{network}.gstacks", alias.alias),
        "sandbox_id": alias.sandbox_id,
        "host_id": alias.host_id,
        "ports": alias.ports,
    })
}

fn rule_json(rule: &PolicyRule) -> Value {
    json!({
        "id": rule.id,
        "network": rule.network,
        "from": rule.from,
        "to": rule.to,
        "port": rule.port,
    })
}

fn network_json(n: &NetworkRecord) -> Value {
    json!({
        "name": n.name,
        "dns_suffix": n.dns_suffix,
        "topology_version": n.topology_version,
        "cluster_topology_version": n.cluster_topology_version,
        "created_at_ms": n.created_at_ms,
        "members": n.members.iter().map(|m| json!({
            "sandbox_id": m.sandbox_id,
            "host_id": m.host_id,
            "status": m.status,
            "addresses": m.addresses,
            "aliases": m.aliases,
            "attached_at_ms": m.attached_at_ms,
        })).collect::<Vec<_>>(),
        "aliases": n.aliases.iter().map(|a| alias_json(a, &n.name)).collect::<Vec<_>>(),
        "policy_rules": n.policy_rules.iter().map(rule_json).collect::<Vec<_>>(),
        "denied_connections": n.denied_connections,
        "last_denied_at_ms": n.last_denied_at_ms,
    })
}

fn change_json(change: &NetworkChange) -> Value {
    let network = change.network.as_ref().map(network_json);
    json!({
        "topology_version": change.topology_version,
        "network": network,
    })
}

fn print_json(value: &Value) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

pub async fn create(api: &mut Api, name: String, as_json: bool) -> anyhow::Result<()> {
    let record = api
        .create_network(proto::CreateNetworkRequest { name })
        .await
        .map_err(status_error)?
        .into_inner();
    if as_json {
        return print_json(&network_json(&record));
    }
    println!(
        "network {} created: aliases are <alias>.{}, topology version {}",
        record.name, record.dns_suffix, record.topology_version
    );
    Ok(())
}

pub async fn list(api: &mut Api, as_json: bool) -> anyhow::Result<()> {
    let listed = api
        .list_networks(proto::ListNetworksRequest {})
        .await
        .map_err(status_error)?
        .into_inner();
    if as_json {
        let all: Vec<Value> = listed.networks.iter().map(network_json).collect();
        return print_json(&Value::Array(all));
    }
    let rows: Vec<Vec<String>> = listed
        .networks
        .iter()
        .map(|n| {
            vec![
                n.name.clone(),
                n.dns_suffix.clone(),
                n.topology_version.to_string(),
                n.members.len().to_string(),
                n.aliases.len().to_string(),
                n.policy_rules.len().to_string(),
                n.denied_connections.to_string(),
            ]
        })
        .collect();
    print_table(
        &[
            "NAME",
            "DNS SUFFIX",
            "VERSION",
            "MEMBERS",
            "ALIASES",
            "RULES",
            "DENIED",
        ],
        &rows,
    );
    Ok(())
}

pub async fn show(api: &mut Api, name: String, as_json: bool) -> anyhow::Result<()> {
    let n = api
        .get_network(proto::GetNetworkRequest { name })
        .await
        .map_err(status_error)?
        .into_inner();
    if as_json {
        return print_json(&network_json(&n));
    }
    print_network(&n);
    Ok(())
}

fn print_network(n: &NetworkRecord) {
    println!("name              {}", n.name);
    println!("dns suffix        {}", n.dns_suffix);
    println!(
        "topology version  {} (cluster {})",
        n.topology_version, n.cluster_topology_version
    );
    println!("created           {}", rfc3339(n.created_at_ms));
    let denied = if n.denied_connections == 0 {
        "0".to_owned()
    } else {
        format!(
            "{} (last {})",
            n.denied_connections,
            rfc3339(n.last_denied_at_ms)
        )
    };
    println!("denied            {denied}");
    println!();
    println!("members:");
    if n.members.is_empty() {
        println!("  (none: `gstacks network attach {} <sandbox-id>`)", n.name);
    } else {
        let rows: Vec<Vec<String>> = n
            .members
            .iter()
            .map(|m| {
                vec![
                    m.sandbox_id.clone(),
                    or_dash(&m.host_id),
                    m.status.clone(),
                    join_or_dash(&m.addresses),
                    join_or_dash(&m.aliases),
                ]
            })
            .collect();
        print_table(
            &["SANDBOX", "HOST", "STATUS", "ADDRESSES", "ALIASES"],
            &rows,
        );
    }
    println!();
    println!("aliases:");
    if n.aliases.is_empty() {
        println!("  (none)");
    } else {
        print_aliases(&n.aliases, &n.name);
    }
    println!();
    println!("policy (default deny):");
    if n.policy_rules.is_empty() {
        println!("  (no rules: every connection is denied)");
    } else {
        print_rules(&n.policy_rules);
    }
}

fn print_aliases(aliases: &[AliasView], network: &str) {
    let rows: Vec<Vec<String>> = aliases
        .iter()
        .map(|a| {
            vec![
                a.alias.clone(),
                format!("{}.{network}.gstacks", a.alias),
                ports_text(&a.ports),
                a.sandbox_id.clone(),
                or_dash(&a.host_id),
            ]
        })
        .collect();
    print_table(&["ALIAS", "NAME", "PORTS", "SANDBOX", "HOST"], &rows);
}

fn print_rules(rules: &[PolicyRule]) {
    let rows: Vec<Vec<String>> = rules
        .iter()
        .map(|r| {
            vec![
                r.id.clone(),
                r.from.clone(),
                r.to.clone(),
                rule_port(r.port),
            ]
        })
        .collect();
    print_table(&["ID", "FROM", "TO", "PORT"], &rows);
}

fn report_change(change: &NetworkChange, what: String, as_json: bool) -> anyhow::Result<()> {
    if as_json {
        return print_json(&change_json(change));
    }
    println!("{what} (topology version {})", change.topology_version);
    Ok(())
}

pub async fn attach(
    api: &mut Api,
    network: String,
    sandbox_id: String,
    alias: Option<String>,
    ports: Vec<u32>,
    as_json: bool,
) -> anyhow::Result<()> {
    let alias = alias.unwrap_or_default();
    let change = api
        .attach_sandbox(proto::AttachSandboxRequest {
            network: network.clone(),
            sandbox_id: sandbox_id.clone(),
            alias: alias.clone(),
            ports: ports.clone(),
        })
        .await
        .map_err(status_error)?
        .into_inner();
    let what = if alias.is_empty() {
        format!("sandbox {sandbox_id} attached to network {network}")
    } else {
        format!(
            "sandbox {sandbox_id} attached to network {network} as {alias}.{network}.gstacks (ports {})",
            ports_text(&ports)
        )
    };
    report_change(&change, what, as_json)
}

pub async fn detach(
    api: &mut Api,
    network: String,
    sandbox_id: String,
    as_json: bool,
) -> anyhow::Result<()> {
    let change = api
        .detach_sandbox(proto::DetachSandboxRequest {
            network: network.clone(),
            sandbox_id: sandbox_id.clone(),
        })
        .await
        .map_err(status_error)?
        .into_inner();
    report_change(
        &change,
        format!("sandbox {sandbox_id} detached from network {network}; its aliases there are gone"),
        as_json,
    )
}

pub async fn alias_add(
    api: &mut Api,
    network: String,
    sandbox_id: String,
    alias: String,
    ports: Vec<u32>,
    as_json: bool,
) -> anyhow::Result<()> {
    let change = api
        .add_alias(proto::AddAliasRequest {
            network: network.clone(),
            sandbox_id: sandbox_id.clone(),
            alias: alias.clone(),
            ports: ports.clone(),
        })
        .await
        .map_err(status_error)?
        .into_inner();
    report_change(
        &change,
        format!(
            "alias {alias}.{network}.gstacks -> sandbox {sandbox_id} (ports {})",
            ports_text(&ports)
        ),
        as_json,
    )
}

pub async fn alias_list(api: &mut Api, network: String, as_json: bool) -> anyhow::Result<()> {
    let aliases = api
        .list_aliases(proto::ListAliasesRequest {
            network: network.clone(),
        })
        .await
        .map_err(status_error)?
        .into_inner()
        .aliases;
    if as_json {
        let all: Vec<Value> = aliases.iter().map(|a| alias_json(a, &network)).collect();
        return print_json(&Value::Array(all));
    }
    print_aliases(&aliases, &network);
    Ok(())
}

pub async fn alias_remove(
    api: &mut Api,
    network: String,
    alias: String,
    as_json: bool,
) -> anyhow::Result<()> {
    let change = api
        .remove_alias(proto::RemoveAliasRequest {
            network: network.clone(),
            alias: alias.clone(),
        })
        .await
        .map_err(status_error)?
        .into_inner();
    report_change(
        &change,
        format!("alias {alias}.{network}.gstacks removed"),
        as_json,
    )
}

pub async fn policy_allow(
    api: &mut Api,
    network: String,
    from: String,
    to: String,
    port: Option<u32>,
    as_json: bool,
) -> anyhow::Result<()> {
    let allowed = api
        .allow_policy(proto::AllowPolicyRequest {
            network,
            from,
            to,
            port: port.unwrap_or(0),
        })
        .await
        .map_err(status_error)?
        .into_inner();
    let rule = allowed.rule.unwrap_or_default();
    if as_json {
        return print_json(&json!({
            "rule": rule_json(&rule),
            "topology_version": allowed.topology_version,
        }));
    }
    let port = match rule.port {
        0 => "any port".to_owned(),
        p => format!("port {p}"),
    };
    println!(
        "rule {} in {}: allow {} -> {} on {port} (topology version {})",
        rule.id, rule.network, rule.from, rule.to, allowed.topology_version
    );
    Ok(())
}

pub async fn policy_list(api: &mut Api, network: String, as_json: bool) -> anyhow::Result<()> {
    let rules = api
        .list_policy_rules(proto::ListPolicyRulesRequest { network })
        .await
        .map_err(status_error)?
        .into_inner()
        .rules;
    if as_json {
        let all: Vec<Value> = rules.iter().map(rule_json).collect();
        return print_json(&Value::Array(all));
    }
    print_rules(&rules);
    Ok(())
}

pub async fn policy_remove(
    api: &mut Api,
    network: String,
    id: String,
    as_json: bool,
) -> anyhow::Result<()> {
    let change = api
        .remove_policy_rule(proto::RemovePolicyRuleRequest {
            network: network.clone(),
            id: id.clone(),
        })
        .await
        .map_err(status_error)?
        .into_inner();
    report_change(
        &change,
        format!("rule {id} removed from network {network}"),
        as_json,
    )
}

pub async fn resolve(
    api: &mut Api,
    network: String,
    alias: String,
    as_json: bool,
) -> anyhow::Result<()> {
    let r = api
        .resolve_alias(proto::ResolveAliasRequest { network, alias })
        .await
        .map_err(status_error)?
        .into_inner();
    if as_json {
        return print_json(&json!({
            "name": r.name,
            "network": r.network,
            "alias": r.alias,
            "ports": r.ports,
            "sandbox_id": r.sandbox_id,
            "sandbox_status": r.sandbox_status,
            "sandbox_addresses": r.sandbox_addresses,
            "host_id": r.host_id,
            "host_status": r.host_status,
            "node_id": r.node_id,
            "node_addresses": r.node_addresses,
        }));
    }
    let fields = [
        ("name", r.name),
        ("ports", ports_text(&r.ports)),
        (
            "sandbox",
            format!("{} ({})", r.sandbox_id, or_dash(&r.sandbox_status)),
        ),
        ("sandbox addresses", join_or_dash(&r.sandbox_addresses)),
        (
            "host",
            format!("{} ({})", or_dash(&r.host_id), or_dash(&r.host_status)),
        ),
        ("mesh node", or_dash(&r.node_id)),
        ("node addresses", join_or_dash(&r.node_addresses)),
    ];
    for (key, value) in fields {
        println!("{key:<17}  {value}");
    }
    Ok(())
}

/// Splits `api:8080`.
pub fn parse_target(text: &str) -> anyhow::Result<(String, u32)> {
    let (alias, port) = text.rsplit_once(':').ok_or_else(|| {
        anyhow::anyhow!("target `{text}` must read <alias>:<port>, e.g. api:8080")
    })?;
    let port: u32 = port
        .parse()
        .map_err(|_| anyhow::anyhow!("target `{text}`: port `{port}` is not a number (1-65535)"))?;
    anyhow::ensure!(!alias.is_empty(), "target `{text}` names no alias");
    Ok((alias.to_owned(), port))
}

/// Runs the checks; returns false when one failed.
pub async fn test(
    api: &mut Api,
    network: String,
    source: String,
    target: String,
    as_json: bool,
) -> anyhow::Result<bool> {
    let (alias, port) = parse_target(&target)?;
    let outcome: TestNetworkResponse = api
        .test_network(proto::TestNetworkRequest {
            network: network.clone(),
            source: source.clone(),
            alias: alias.clone(),
            port,
        })
        .await
        .map_err(status_error)?
        .into_inner();
    if as_json {
        print_json(&json!({
            "network": network,
            "source": source,
            "alias": alias,
            "port": port,
            "passed": outcome.passed,
            "topology_version": outcome.topology_version,
            "checks": outcome.checks.iter().map(|c| json!({
                "origin": c.origin,
                "name": c.name,
                "passed": c.passed,
                "detail": c.detail,
            })).collect::<Vec<_>>(),
        }))?;
        return Ok(outcome.passed);
    }
    println!(
        "network test {network}: {source} -> {alias}:{port} (topology version {})",
        outcome.topology_version
    );
    let rows: Vec<Vec<String>> = outcome
        .checks
        .iter()
        .map(|c| {
            vec![
                if c.passed { "pass" } else { "FAIL" }.to_owned(),
                c.origin.clone(),
                c.name.clone(),
                c.detail.clone(),
            ]
        })
        .collect();
    print_table(&["RESULT", "WHERE", "CHECK", "WHY"], &rows);
    let failed = outcome.checks.iter().filter(|c| !c.passed).count();
    if failed == 0 {
        println!("all {} checks passed", outcome.checks.len());
    } else {
        println!("{failed} of {} checks failed", outcome.checks.len());
    }
    Ok(outcome.passed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_parse() {
        assert_eq!(parse_target("api:8080").unwrap(), ("api".to_owned(), 8080));
        for bad in ["api", "api:", ":80", "api:http"] {
            assert!(parse_target(bad).is_err(), "{bad}");
        }
    }
}
