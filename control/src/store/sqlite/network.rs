//! The network model's tables: networks, attachments, aliases, policy
//! rules, mesh nodes, and the topology version. Every write that changes
//! what a netmap shows bumps the version in its own transaction
//! ([`bump`]); the caller commits and then announces the new version.

use rusqlite::{params, Connection, OptionalExtension as _, Row, Transaction};

use crate::error::{ControlError, Result};
use crate::store::network::{
    agent_node_id, Alias, AttachedSandbox, Attachment, MeshNode, Network, NodeKind, PolicyRule,
    Topology, MAX_NODE_INDEX,
};

/// Schema step: the network model.
pub(super) fn migrate_networks(tx: &Transaction<'_>) -> rusqlite::Result<()> {
    tx.execute_batch(
        "CREATE TABLE topology (
             id INTEGER PRIMARY KEY CHECK (id = 1),
             version INTEGER NOT NULL,
             next_node_index INTEGER NOT NULL
         );
         INSERT INTO topology (id, version, next_node_index) VALUES (1, 0, 1);
         CREATE TABLE networks (
             name TEXT PRIMARY KEY,
             topology_version INTEGER NOT NULL,
             created_at_ms INTEGER NOT NULL,
             denied_connections INTEGER NOT NULL DEFAULT 0,
             last_denied_at_ms INTEGER NOT NULL DEFAULT 0
         );
         CREATE TABLE network_attachments (
             network TEXT NOT NULL REFERENCES networks(name),
             sandbox_id TEXT NOT NULL,
             attached_at_ms INTEGER NOT NULL,
             PRIMARY KEY (network, sandbox_id)
         );
         CREATE INDEX network_attachments_by_sandbox ON network_attachments(sandbox_id);
         CREATE TABLE network_aliases (
             network TEXT NOT NULL,
             alias TEXT NOT NULL,
             sandbox_id TEXT NOT NULL,
             ports TEXT NOT NULL,
             created_at_ms INTEGER NOT NULL,
             PRIMARY KEY (network, alias),
             FOREIGN KEY (network, sandbox_id) REFERENCES network_attachments(network, sandbox_id)
         );
         CREATE TABLE network_policy_rules (
             id TEXT PRIMARY KEY,
             network TEXT NOT NULL REFERENCES networks(name),
             from_selector TEXT NOT NULL,
             to_alias TEXT NOT NULL,
             port INTEGER NOT NULL,
             created_at_ms INTEGER NOT NULL
         );
         CREATE INDEX network_policy_rules_by_network ON network_policy_rules(network);
         CREATE TABLE mesh_nodes (
             id TEXT PRIMARY KEY,
             kind TEXT NOT NULL,
             host_id TEXT NOT NULL DEFAULT '',
             public_key TEXT NOT NULL DEFAULT '',
             endpoint TEXT NOT NULL DEFAULT '',
             node_index INTEGER NOT NULL UNIQUE,
             created_at_ms INTEGER NOT NULL,
             updated_at_ms INTEGER NOT NULL
         );
         CREATE UNIQUE INDEX mesh_nodes_by_host ON mesh_nodes(host_id) WHERE host_id != '';
         CREATE TABLE network_local_members (
             network TEXT NOT NULL REFERENCES networks(name),
             node_id TEXT NOT NULL REFERENCES mesh_nodes(id),
             joined_at_ms INTEGER NOT NULL,
             PRIMARY KEY (network, node_id)
         );",
    )
}

/// Bumps the cluster-wide topology version and stamps the changed
/// networks with it. Returns the new version.
pub(super) fn bump(tx: &Transaction<'_>, networks: &[&str]) -> Result<u64> {
    let version: i64 = tx.query_row(
        "UPDATE topology SET version = version + 1 WHERE id = 1 RETURNING version",
        [],
        |row| row.get(0),
    )?;
    for network in networks {
        tx.execute(
            "UPDATE networks SET topology_version = ?2 WHERE name = ?1",
            params![network, version],
        )?;
    }
    Ok(version as u64)
}

pub(super) fn topology_version(conn: &Connection) -> Result<u64> {
    let version: i64 = conn.query_row("SELECT version FROM topology WHERE id = 1", [], |row| {
        row.get(0)
    })?;
    Ok(version as u64)
}

const NETWORK_COLUMNS: &str =
    "name, topology_version, created_at_ms, denied_connections, last_denied_at_ms";

fn network_from_row(row: &Row<'_>) -> rusqlite::Result<Network> {
    Ok(Network {
        name: row.get(0)?,
        topology_version: row.get::<_, i64>(1)? as u64,
        created_at_ms: row.get(2)?,
        denied_connections: row.get::<_, i64>(3)?.max(0) as u64,
        last_denied_at_ms: row.get(4)?,
    })
}

pub(super) fn network(conn: &Connection, name: &str) -> Result<Option<Network>> {
    Ok(conn
        .query_row(
            &format!("SELECT {NETWORK_COLUMNS} FROM networks WHERE name = ?1"),
            [name],
            network_from_row,
        )
        .optional()?)
}

fn require_network(conn: &Connection, name: &str) -> Result<Network> {
    network(conn, name)?.ok_or_else(|| ControlError::NetworkNotFound(name.to_owned()))
}

pub(super) fn networks(conn: &Connection) -> Result<Vec<Network>> {
    let mut stmt = conn.prepare(&format!(
        "SELECT {NETWORK_COLUMNS} FROM networks ORDER BY name"
    ))?;
    let rows = stmt.query_map([], network_from_row)?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

pub(super) fn create_network(tx: &Transaction<'_>, name: &str, now_ms: i64) -> Result<Network> {
    if network(tx, name)?.is_some() {
        return Err(ControlError::NetworkExists(name.to_owned()));
    }
    tx.execute(
        "INSERT INTO networks (name, topology_version, created_at_ms) VALUES (?1, 0, ?2)",
        params![name, now_ms],
    )?;
    bump(tx, &[name])?;
    require_network(tx, name)
}

fn ports_text(ports: &[u16]) -> String {
    ports
        .iter()
        .map(u16::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

fn parse_ports(network: &str, alias: &str, text: &str) -> Result<Vec<u16>> {
    text.split(',')
        .map(|p| p.parse::<u16>())
        .collect::<Result<Vec<u16>, _>>()
        .map_err(|err| ControlError::StoreCorrupt {
            what: "ports of alias",
            id: format!("{network}/{alias}"),
            reason: format!("`{text}`: {err}"),
        })
}

const ALIAS_COLUMNS: &str = "network, alias, sandbox_id, ports, created_at_ms";

fn alias_rows(conn: &Connection, sql: &str, args: impl rusqlite::Params) -> Result<Vec<Alias>> {
    let mut stmt = conn.prepare(sql)?;
    let rows = stmt.query_map(args, |row| {
        Ok((
            row.get::<_, String>(0)?,
            row.get::<_, String>(1)?,
            row.get::<_, String>(2)?,
            row.get::<_, String>(3)?,
            row.get::<_, i64>(4)?,
        ))
    })?;
    let mut out = Vec::new();
    for row in rows {
        let (network, alias, sandbox_id, ports, created_at_ms) = row?;
        let ports = parse_ports(&network, &alias, &ports)?;
        out.push(Alias {
            network,
            alias,
            sandbox_id,
            ports,
            created_at_ms,
        });
    }
    Ok(out)
}

pub(super) fn aliases(conn: &Connection, network: &str) -> Result<Vec<Alias>> {
    require_network(conn, network)?;
    alias_rows(
        conn,
        &format!("SELECT {ALIAS_COLUMNS} FROM network_aliases WHERE network = ?1 ORDER BY alias"),
        [network],
    )
}

pub(super) fn attachments(conn: &Connection, network: &str) -> Result<Vec<Attachment>> {
    require_network(conn, network)?;
    let mut stmt = conn.prepare(
        "SELECT network, sandbox_id, attached_at_ms FROM network_attachments
         WHERE network = ?1 ORDER BY attached_at_ms, sandbox_id",
    )?;
    let rows = stmt.query_map([network], attachment_from_row)?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

fn attachment_from_row(row: &Row<'_>) -> rusqlite::Result<Attachment> {
    Ok(Attachment {
        network: row.get(0)?,
        sandbox_id: row.get(1)?,
        attached_at_ms: row.get(2)?,
    })
}

fn json_list(what: &'static str, id: &str, text: &str) -> Result<Vec<String>> {
    serde_json::from_str(text).map_err(|err| ControlError::StoreCorrupt {
        what,
        id: id.to_owned(),
        reason: err.to_string(),
    })
}

const SANDBOX_FACTS: &str = "SELECT id, host_id, status, addresses, tags FROM sandboxes";

fn sandbox_facts_from_row(
    row: &Row<'_>,
) -> rusqlite::Result<(String, String, String, String, String)> {
    Ok((
        row.get(0)?,
        row.get(1)?,
        row.get(2)?,
        row.get(3)?,
        row.get(4)?,
    ))
}

fn sandbox_facts(raw: (String, String, String, String, String)) -> Result<AttachedSandbox> {
    let (id, host_id, status, addresses, tags) = raw;
    let addresses = json_list("addresses of sandbox", &id, &addresses)?;
    let tags = json_list("tags of sandbox", &id, &tags)?;
    Ok(AttachedSandbox {
        id,
        host_id,
        status,
        addresses,
        tags,
    })
}

/// The sandbox as the network model sees it.
pub(super) fn sandbox(conn: &Connection, id: &str) -> Result<Option<AttachedSandbox>> {
    conn.query_row(
        &format!("{SANDBOX_FACTS} WHERE id = ?1"),
        [id],
        sandbox_facts_from_row,
    )
    .optional()?
    .map(sandbox_facts)
    .transpose()
}

fn is_attached(conn: &Connection, network: &str, sandbox_id: &str) -> Result<bool> {
    Ok(conn
        .query_row(
            "SELECT 1 FROM network_attachments WHERE network = ?1 AND sandbox_id = ?2",
            params![network, sandbox_id],
            |_| Ok(()),
        )
        .optional()?
        .is_some())
}

/// Inserts an alias after checking that it is free in its network.
fn insert_alias(
    tx: &Transaction<'_>,
    network: &str,
    sandbox_id: &str,
    alias: &str,
    ports: &[u16],
    now_ms: i64,
) -> Result<()> {
    let owner: Option<String> = tx
        .query_row(
            "SELECT sandbox_id FROM network_aliases WHERE network = ?1 AND alias = ?2",
            params![network, alias],
            |row| row.get(0),
        )
        .optional()?;
    if let Some(sandbox) = owner {
        return Err(ControlError::AliasExists {
            alias: alias.to_owned(),
            network: network.to_owned(),
            sandbox,
        });
    }
    tx.execute(
        &format!("INSERT INTO network_aliases ({ALIAS_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5)"),
        params![network, alias, sandbox_id, ports_text(ports), now_ms],
    )?;
    Ok(())
}

pub(super) fn attach(
    tx: &Transaction<'_>,
    network: &str,
    sandbox_id: &str,
    alias: Option<(&str, &[u16])>,
    now_ms: i64,
) -> Result<u64> {
    require_network(tx, network)?;
    let sandbox = sandbox(tx, sandbox_id)?
        .ok_or_else(|| ControlError::SandboxNotFound(sandbox_id.to_owned()))?;
    if sandbox.status == "archived" {
        return Err(ControlError::SandboxNotAttachable {
            sandbox: sandbox_id.to_owned(),
            status: sandbox.status,
        });
    }
    if is_attached(tx, network, sandbox_id)? {
        return Err(ControlError::SandboxAlreadyAttached {
            sandbox: sandbox_id.to_owned(),
            network: network.to_owned(),
        });
    }
    tx.execute(
        "INSERT INTO network_attachments (network, sandbox_id, attached_at_ms) VALUES (?1, ?2, ?3)",
        params![network, sandbox_id, now_ms],
    )?;
    if let Some((alias, ports)) = alias {
        insert_alias(tx, network, sandbox_id, alias, ports, now_ms)?;
    }
    bump(tx, &[network])
}

/// Removes the attachment and the sandbox's aliases in the network.
pub(super) fn detach(tx: &Transaction<'_>, network: &str, sandbox_id: &str) -> Result<u64> {
    require_network(tx, network)?;
    if !is_attached(tx, network, sandbox_id)? {
        return Err(ControlError::SandboxNotAttached {
            sandbox: sandbox_id.to_owned(),
            network: network.to_owned(),
        });
    }
    tx.execute(
        "DELETE FROM network_aliases WHERE network = ?1 AND sandbox_id = ?2",
        params![network, sandbox_id],
    )?;
    tx.execute(
        "DELETE FROM network_attachments WHERE network = ?1 AND sandbox_id = ?2",
        params![network, sandbox_id],
    )?;
    bump(tx, &[network])
}

pub(super) fn add_alias(
    tx: &Transaction<'_>,
    network: &str,
    sandbox_id: &str,
    alias: &str,
    ports: &[u16],
    now_ms: i64,
) -> Result<u64> {
    require_network(tx, network)?;
    if !is_attached(tx, network, sandbox_id)? {
        return Err(ControlError::SandboxNotAttached {
            sandbox: sandbox_id.to_owned(),
            network: network.to_owned(),
        });
    }
    insert_alias(tx, network, sandbox_id, alias, ports, now_ms)?;
    bump(tx, &[network])
}

/// Removes an alias; returns the new version and the removed alias.
pub(super) fn remove_alias(tx: &Transaction<'_>, network: &str, alias: &str) -> Result<u64> {
    require_network(tx, network)?;
    let removed = tx.execute(
        "DELETE FROM network_aliases WHERE network = ?1 AND alias = ?2",
        params![network, alias],
    )?;
    if removed == 0 {
        return Err(ControlError::AliasNotFound {
            alias: alias.to_owned(),
            network: network.to_owned(),
        });
    }
    bump(tx, &[network])
}

const RULE_COLUMNS: &str = "id, network, from_selector, to_alias, port, created_at_ms";

fn rule_from_row(row: &Row<'_>) -> rusqlite::Result<PolicyRule> {
    Ok(PolicyRule {
        id: row.get(0)?,
        network: row.get(1)?,
        from: row.get(2)?,
        to: row.get(3)?,
        port: row.get::<_, i64>(4)?.clamp(0, i64::from(u16::MAX)) as u16,
        created_at_ms: row.get(5)?,
    })
}

pub(super) fn policy_rules(conn: &Connection, network: &str) -> Result<Vec<PolicyRule>> {
    require_network(conn, network)?;
    let mut stmt = conn.prepare(&format!(
        "SELECT {RULE_COLUMNS} FROM network_policy_rules WHERE network = ?1 ORDER BY created_at_ms, rowid"
    ))?;
    let rows = stmt.query_map([network], rule_from_row)?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

pub(super) fn add_policy_rule(tx: &Transaction<'_>, rule: &PolicyRule) -> Result<u64> {
    require_network(tx, &rule.network)?;
    let same: Option<String> = tx
        .query_row(
            "SELECT id FROM network_policy_rules
             WHERE network = ?1 AND from_selector = ?2 AND to_alias = ?3 AND port = ?4",
            params![rule.network, rule.from, rule.to, rule.port],
            |row| row.get(0),
        )
        .optional()?;
    if let Some(id) = same {
        let port = match rule.port {
            0 => "any port".to_owned(),
            p => format!("port {p}"),
        };
        return Err(ControlError::PolicyRuleExists {
            id,
            network: rule.network.clone(),
            what: format!("{} -> {} on {port}", rule.from, rule.to),
        });
    }
    tx.execute(
        &format!(
            "INSERT INTO network_policy_rules ({RULE_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6)"
        ),
        params![
            rule.id,
            rule.network,
            rule.from,
            rule.to,
            rule.port,
            rule.created_at_ms
        ],
    )?;
    bump(tx, &[&rule.network])
}

pub(super) fn remove_policy_rule(tx: &Transaction<'_>, network: &str, id: &str) -> Result<u64> {
    require_network(tx, network)?;
    let removed = tx.execute(
        "DELETE FROM network_policy_rules WHERE network = ?1 AND id = ?2",
        params![network, id],
    )?;
    if removed == 0 {
        return Err(ControlError::PolicyRuleNotFound {
            id: id.to_owned(),
            network: network.to_owned(),
        });
    }
    bump(tx, &[network])
}

const NODE_COLUMNS: &str =
    "id, kind, host_id, public_key, endpoint, node_index, created_at_ms, updated_at_ms";

fn node_from_row(row: &Row<'_>) -> rusqlite::Result<(MeshNode, String)> {
    Ok((
        MeshNode {
            id: row.get(0)?,
            kind: NodeKind::Agent,
            host_id: row.get(2)?,
            public_key: row.get(3)?,
            endpoint: row.get(4)?,
            index: row.get::<_, i64>(5)?.clamp(0, i64::from(u32::MAX)) as u32,
            created_at_ms: row.get(6)?,
            updated_at_ms: row.get(7)?,
        },
        row.get(1)?,
    ))
}

fn check_node((mut node, kind): (MeshNode, String)) -> Result<MeshNode> {
    node.kind = NodeKind::parse(&kind).ok_or_else(|| ControlError::StoreCorrupt {
        what: "kind of mesh node",
        id: node.id.clone(),
        reason: format!("unknown kind `{kind}`"),
    })?;
    Ok(node)
}

/// Nodes that may take part in the mesh: laptops, and agents of hosts that
/// are not revoked.
fn nodes(conn: &Connection) -> Result<Vec<MeshNode>> {
    let columns: Vec<String> = NODE_COLUMNS.split(", ").map(|c| format!("n.{c}")).collect();
    let mut stmt = conn.prepare(&format!(
        "SELECT {} FROM mesh_nodes n LEFT JOIN hosts h ON h.id = n.host_id
         WHERE n.host_id = '' OR COALESCE(h.revoked_at_ms, 0) = 0
         ORDER BY n.node_index",
        columns.join(", ")
    ))?;
    let rows = stmt.query_map([], node_from_row)?;
    rows.map(|row| row.map_err(ControlError::from).and_then(check_node))
        .collect()
}

pub(super) fn node(conn: &Connection, id: &str) -> Result<Option<MeshNode>> {
    conn.query_row(
        &format!("SELECT {NODE_COLUMNS} FROM mesh_nodes WHERE id = ?1"),
        [id],
        node_from_row,
    )
    .optional()?
    .map(check_node)
    .transpose()
}

/// Hands out the next overlay allocation index (never reused).
fn allocate_index(tx: &Transaction<'_>) -> Result<u32> {
    let index: i64 = tx.query_row(
        "UPDATE topology SET next_node_index = next_node_index + 1 WHERE id = 1
         RETURNING next_node_index - 1",
        [],
        |row| row.get(0),
    )?;
    u32::try_from(index)
        .ok()
        .filter(|i| *i >= 1 && *i <= MAX_NODE_INDEX)
        .ok_or(ControlError::OverlayExhausted)
}

/// The host agent's node from its Hello: created (addresses allocated) on
/// the first one, key and endpoint updated when they change. Returns the
/// node and the new topology version when anything changed.
pub(super) fn record_agent_node(
    tx: &Transaction<'_>,
    host_id: &str,
    public_key: &str,
    endpoint: &str,
    now_ms: i64,
) -> Result<(MeshNode, Option<u64>)> {
    let id = agent_node_id(host_id);
    match node(tx, &id)? {
        Some(existing) if existing.public_key == public_key && existing.endpoint == endpoint => {
            Ok((existing, None))
        }
        Some(_) => {
            tx.execute(
                "UPDATE mesh_nodes SET public_key = ?2, endpoint = ?3, updated_at_ms = ?4 WHERE id = ?1",
                params![id, public_key, endpoint, now_ms],
            )?;
            let version = bump(tx, &[])?;
            let node = node(tx, &id)?.ok_or_else(|| ControlError::StoreCorrupt {
                what: "mesh node",
                id: id.clone(),
                reason: "vanished inside its transaction".to_owned(),
            })?;
            Ok((node, Some(version)))
        }
        None => {
            let index = allocate_index(tx)?;
            tx.execute(
                &format!(
                    "INSERT INTO mesh_nodes ({NODE_COLUMNS}) VALUES (?1, 'agent', ?2, ?3, ?4, ?5, ?6, ?6)"
                ),
                params![id, host_id, public_key, endpoint, index, now_ms],
            )?;
            let version = bump(tx, &[])?;
            Ok((
                MeshNode {
                    id,
                    kind: NodeKind::Agent,
                    host_id: host_id.to_owned(),
                    public_key: public_key.to_owned(),
                    endpoint: endpoint.to_owned(),
                    index,
                    created_at_ms: now_ms,
                    updated_at_ms: now_ms,
                },
                Some(version),
            ))
        }
    }
}

/// A laptop node (`gstacks mesh join`): allocated once, joined to one
/// network. Returns the node and the new version.
pub(super) fn join_local_node(
    tx: &Transaction<'_>,
    node_id: &str,
    network: &str,
    public_key: &str,
    endpoint: &str,
    now_ms: i64,
) -> Result<(MeshNode, u64)> {
    require_network(tx, network)?;
    match node(tx, node_id)? {
        Some(_) => {
            tx.execute(
                "UPDATE mesh_nodes SET public_key = ?2, endpoint = ?3, updated_at_ms = ?4 WHERE id = ?1",
                params![node_id, public_key, endpoint, now_ms],
            )?;
        }
        None => {
            let index = allocate_index(tx)?;
            tx.execute(
                &format!(
                    "INSERT INTO mesh_nodes ({NODE_COLUMNS}) VALUES (?1, 'local', '', ?2, ?3, ?4, ?5, ?5)"
                ),
                params![node_id, public_key, endpoint, index, now_ms],
            )?;
        }
    }
    tx.execute(
        "INSERT OR IGNORE INTO network_local_members (network, node_id, joined_at_ms) VALUES (?1, ?2, ?3)",
        params![network, node_id, now_ms],
    )?;
    let version = bump(tx, &[network])?;
    let node = node(tx, node_id)?.ok_or_else(|| ControlError::StoreCorrupt {
        what: "mesh node",
        id: node_id.to_owned(),
        reason: "vanished inside its transaction".to_owned(),
    })?;
    Ok((node, version))
}

/// Counts a connection refused by policy in its network (no version bump:
/// nothing a netmap shows changed).
pub(super) fn record_denied_connection(conn: &Connection, network: &str, at_ms: i64) -> Result<()> {
    conn.execute(
        "UPDATE networks SET denied_connections = denied_connections + 1,
             last_denied_at_ms = MAX(last_denied_at_ms, ?2)
         WHERE name = ?1",
        params![network, at_ms],
    )?;
    Ok(())
}

/// Everything netmaps are made of, read in one transaction.
pub(super) fn topology(tx: &Transaction<'_>) -> Result<Topology> {
    let version = topology_version(tx)?;
    let networks = networks(tx)?;
    let attachments = {
        let mut stmt = tx.prepare(
            "SELECT network, sandbox_id, attached_at_ms FROM network_attachments
             ORDER BY network, attached_at_ms, sandbox_id",
        )?;
        let rows = stmt.query_map([], attachment_from_row)?;
        rows.collect::<rusqlite::Result<Vec<_>>>()?
    };
    let aliases = alias_rows(
        tx,
        &format!("SELECT {ALIAS_COLUMNS} FROM network_aliases ORDER BY network, alias"),
        [],
    )?;
    let rules = {
        let mut stmt = tx.prepare(&format!(
            "SELECT {RULE_COLUMNS} FROM network_policy_rules ORDER BY network, created_at_ms, rowid"
        ))?;
        let rows = stmt.query_map([], rule_from_row)?;
        rows.collect::<rusqlite::Result<Vec<_>>>()?
    };
    let nodes = nodes(tx)?;
    let local_members = {
        let mut stmt = tx.prepare(
            "SELECT network, node_id FROM network_local_members ORDER BY network, node_id",
        )?;
        let rows = stmt.query_map([], |row| Ok((row.get(0)?, row.get(1)?)))?;
        rows.collect::<rusqlite::Result<Vec<_>>>()?
    };
    let sandboxes = {
        let mut stmt = tx.prepare(&format!(
            "{SANDBOX_FACTS} WHERE id IN (SELECT sandbox_id FROM network_attachments) ORDER BY id"
        ))?;
        let rows = stmt.query_map([], sandbox_facts_from_row)?;
        let mut out = Vec::new();
        for row in rows {
            out.push(sandbox_facts(row?)?);
        }
        out
    };
    Ok(Topology {
        version,
        networks,
        attachments,
        aliases,
        rules,
        nodes,
        local_members,
        sandboxes,
    })
}

/// Hosts were revoked: those with a mesh node leave every netmap, which is
/// a topology change of the networks their sandboxes are attached to.
pub(super) fn after_hosts_revoked(
    tx: &Transaction<'_>,
    host_ids: &[String],
) -> Result<Option<u64>> {
    let mut with_node = false;
    let mut networks = std::collections::BTreeSet::new();
    for host in host_ids {
        with_node |= node(tx, &agent_node_id(host))?.is_some();
        let mut stmt = tx.prepare(
            "SELECT DISTINCT a.network FROM network_attachments a
             JOIN sandboxes s ON s.id = a.sandbox_id WHERE s.host_id = ?1",
        )?;
        let rows = stmt.query_map([host], |row| row.get::<_, String>(0))?;
        for row in rows {
            networks.insert(row?);
        }
    }
    if !with_node {
        return Ok(None);
    }
    let names: Vec<&str> = networks.iter().map(String::as_str).collect();
    bump(tx, &names).map(Some)
}

/// After a sandbox record was written: when what the network model sees of
/// it changed and it is attached somewhere, bumps the version and stamps
/// its networks. Returns the new version, if bumped.
pub(super) fn after_sandbox_write(
    tx: &Transaction<'_>,
    before: Option<&AttachedSandbox>,
    sandbox_id: &str,
) -> Result<Option<u64>> {
    let after = sandbox(tx, sandbox_id)?;
    if before == after.as_ref() {
        return Ok(None);
    }
    let networks: Vec<String> = {
        let mut stmt = tx.prepare(
            "SELECT network FROM network_attachments WHERE sandbox_id = ?1 ORDER BY network",
        )?;
        let rows = stmt.query_map([sandbox_id], |row| row.get(0))?;
        rows.collect::<rusqlite::Result<_>>()?
    };
    if networks.is_empty() {
        return Ok(None);
    }
    let names: Vec<&str> = networks.iter().map(String::as_str).collect();
    bump(tx, &names).map(Some)
}

#[cfg(test)]
mod tests {
    use crate::error::ControlError;
    use crate::store::sqlite::SqliteStore;
    use crate::store::{PolicyRule, Store};

    fn store() -> (tempfile::TempDir, SqliteStore) {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("control.db")).unwrap();
        (dir, store)
    }

    /// A sandbox record (and its host, once) through the sandbox model's
    /// Store methods.
    fn sandbox(store: &SqliteStore, id: &str, host: &str, status: &str) {
        use crate::store::{
            Host, HostStatus, ProvisioningToken, Sandbox, SandboxRepo, SandboxStatus,
            DEFAULT_CLUSTER_ID,
        };
        if store.provisioning_token("tok_t").unwrap().is_none() {
            store
                .insert_provisioning_token(&ProvisioningToken {
                    id: "tok_t".into(),
                    cluster_id: DEFAULT_CLUSTER_ID.into(),
                    description: String::new(),
                    long_living: true,
                    secret_hash: "ab".repeat(32),
                    created_at_ms: 1,
                    expires_at_ms: 0,
                    revoked_at_ms: 0,
                })
                .unwrap();
        }
        if store.host(host).unwrap().is_none() {
            store
                .insert_host(&Host {
                    id: host.into(),
                    name: host.into(),
                    cluster_id: DEFAULT_CLUSTER_ID.into(),
                    token_id: "tok_t".into(),
                    credential_hash: "cd".repeat(32),
                    status: HostStatus::Disconnected,
                    telemetry: proto::Telemetry::default(),
                    enrolled_at_ms: 1,
                    last_seen_ms: 1,
                    revoked_at_ms: 0,
                    revoked_reason: String::new(),
                    placeable: true,
                })
                .unwrap();
        }
        store
            .insert_sandbox(&Sandbox {
                id: id.into(),
                cluster_id: DEFAULT_CLUSTER_ID.into(),
                host_id: host.into(),
                name: id.into(),
                image: "img".into(),
                image_digest: String::new(),
                blueprint_id: String::new(),
                status: SandboxStatus::parse(status).unwrap(),
                status_message: String::new(),
                container_id: String::new(),
                container_name: String::new(),
                addresses: vec!["10.0.0.2".into()],
                docker_network: String::new(),
                tags: vec!["web".into()],
                traits: Vec::new(),
                volumes: Vec::new(),
                repo: SandboxRepo::default(),
                memory_bytes: 0,
                millicpus: 0,
                created_by: String::new(),
                created_at_ms: 1,
                updated_at_ms: 1,
                archived_at_ms: 0,
            })
            .unwrap();
    }

    #[test]
    fn attached_sandbox_address_or_status_changes_bump_the_version() {
        let (_dir, store) = store();
        sandbox(&store, "sbx_1", "hst_a", "running");
        sandbox(&store, "sbx_free", "hst_a", "running");
        store.create_network("dev", 1).unwrap();
        store.attach_sandbox("dev", "sbx_1", None, 1).unwrap();
        let v = store.topology_version().unwrap();
        let mut s = store.sandbox("sbx_1").unwrap().unwrap();
        // A field netmaps do not show: no bump.
        s.status_message = "fine".into();
        assert!(store.update_sandbox(&s).unwrap());
        assert_eq!(store.topology_version().unwrap(), v);
        s.addresses = vec!["10.0.0.9".into()];
        store.update_sandbox(&s).unwrap();
        assert_eq!(store.topology_version().unwrap(), v + 1);
        assert_eq!(
            store.network("dev").unwrap().unwrap().topology_version,
            v + 1
        );
        s.status = crate::store::SandboxStatus::Stopped;
        store.update_sandbox(&s).unwrap();
        assert_eq!(store.topology_version().unwrap(), v + 2);
        assert_eq!(store.topology().unwrap().sandboxes[0].status, "stopped");
        // A sandbox attached nowhere changes nothing.
        let mut free = store.sandbox("sbx_free").unwrap().unwrap();
        free.addresses = vec!["10.0.0.10".into()];
        store.update_sandbox(&free).unwrap();
        assert_eq!(store.topology_version().unwrap(), v + 2);
    }

    fn rule(id: &str, network: &str, from: &str, to: &str, port: u16) -> PolicyRule {
        PolicyRule {
            id: id.into(),
            network: network.into(),
            from: from.into(),
            to: to.into(),
            port,
            created_at_ms: 1,
        }
    }

    #[test]
    fn every_change_bumps_the_one_version_and_stamps_its_network() {
        let (_dir, store) = store();
        sandbox(&store, "sbx_1", "hst_a", "running");
        let mut versions = store.subscribe_topology();
        assert_eq!(store.topology_version().unwrap(), 0);
        let dev = store.create_network("dev", 1).unwrap();
        assert_eq!(dev.topology_version, 1);
        assert_eq!(dev.dns_suffix(), "dev.gstacks");
        assert!(versions.has_changed().unwrap());
        assert_eq!(*versions.borrow_and_update(), 1);
        store.create_network("ops", 1).unwrap();
        let v = store
            .attach_sandbox("dev", "sbx_1", Some(("api", &[8080, 9090])), 2)
            .unwrap();
        assert_eq!(v, 3);
        assert_eq!(
            store
                .add_alias("dev", "sbx_1", "worker", &[9090], 3)
                .unwrap(),
            4
        );
        assert_eq!(
            store
                .add_policy_rule(&rule("pol_1", "dev", "local", "api", 8080))
                .unwrap(),
            5
        );
        assert_eq!(store.remove_policy_rule("dev", "pol_1").unwrap(), 6);
        assert_eq!(store.remove_alias("dev", "worker").unwrap(), 7);
        assert_eq!(store.detach_sandbox("dev", "sbx_1").unwrap(), 8);
        assert_eq!(*versions.borrow_and_update(), 8);
        assert_eq!(store.network("dev").unwrap().unwrap().topology_version, 8);
        // ops was not touched since its creation.
        assert_eq!(store.network("ops").unwrap().unwrap().topology_version, 2);
        // Detach took the sandbox's aliases with it.
        assert!(store.network_aliases("dev").unwrap().is_empty());
        assert!(store.network_attachments("dev").unwrap().is_empty());
    }

    #[test]
    fn refused_changes_say_why_and_bump_nothing() {
        let (_dir, store) = store();
        sandbox(&store, "sbx_1", "hst_a", "running");
        sandbox(&store, "sbx_2", "hst_b", "running");
        sandbox(&store, "sbx_old", "hst_b", "archived");
        store.create_network("dev", 1).unwrap();
        store
            .attach_sandbox("dev", "sbx_1", Some(("api", &[8080])), 1)
            .unwrap();
        let before = store.topology_version().unwrap();
        let errors = [
            store.create_network("dev", 1).unwrap_err(),
            store.attach_sandbox("nope", "sbx_1", None, 1).unwrap_err(),
            store
                .attach_sandbox("dev", "sbx_none", None, 1)
                .unwrap_err(),
            store.attach_sandbox("dev", "sbx_old", None, 1).unwrap_err(),
            store.attach_sandbox("dev", "sbx_1", None, 1).unwrap_err(),
            store
                .attach_sandbox("dev", "sbx_2", Some(("api", &[1])), 1)
                .unwrap_err(),
            store
                .add_alias("dev", "sbx_2", "db", &[5432], 1)
                .unwrap_err(),
            store.add_alias("dev", "sbx_1", "api", &[1], 1).unwrap_err(),
            store.remove_alias("dev", "ghost").unwrap_err(),
            store.detach_sandbox("dev", "sbx_2").unwrap_err(),
            store.remove_policy_rule("dev", "pol_x").unwrap_err(),
        ];
        let texts: Vec<String> = errors.iter().map(ToString::to_string).collect();
        assert_eq!(
            texts,
            [
                "network `dev` already exists",
                "network `nope` not found",
                "sandbox `sbx_none` not found",
                "sandbox `sbx_old` is archived; only a sandbox that is not archived can be attached",
                "sandbox `sbx_1` is already attached to network `dev`; add more aliases with `gstacks network alias add`",
                "alias `api` already exists in network `dev` (published by sandbox `sbx_1`)",
                "sandbox `sbx_2` is not attached to network `dev`; attach it first with `gstacks network attach dev sbx_2`",
                "alias `api` already exists in network `dev` (published by sandbox `sbx_1`)",
                "alias `ghost` not found in network `dev`",
                "sandbox `sbx_2` is not attached to network `dev`; attach it first with `gstacks network attach dev sbx_2`",
                "policy rule `pol_x` not found in network `dev`",
            ]
        );
        // The failed attach with a taken alias left no attachment behind.
        assert_eq!(store.network_attachments("dev").unwrap().len(), 1);
        store
            .add_policy_rule(&rule("pol_1", "dev", "local", "api", 0))
            .unwrap();
        let dup = store
            .add_policy_rule(&rule("pol_2", "dev", "local", "api", 0))
            .unwrap_err();
        assert!(
            matches!(dup, ControlError::PolicyRuleExists { .. }),
            "{dup}"
        );
        assert_eq!(
            dup.to_string(),
            "rule `pol_1` in network `dev` already allows local -> api on any port"
        );
        assert_eq!(store.topology_version().unwrap(), before + 1);
        // The same alias name is free in another network.
        store.create_network("ops", 1).unwrap();
        store
            .attach_sandbox("ops", "sbx_2", Some(("api", &[8080])), 1)
            .unwrap();
    }

    #[test]
    fn agent_nodes_get_stable_addresses_and_bump_only_on_change() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("control.db");
        let store = SqliteStore::open(&path).unwrap();
        let (a, changed) = store.record_agent_node("hst_a", "KEY_A", "h:1", 1).unwrap();
        assert_eq!(changed, Some(1));
        assert_eq!(a.id, "node_hst_a");
        assert_eq!(a.ipv4().to_string(), "100.64.0.1");
        let (b, _) = store.record_agent_node("hst_b", "", "", 1).unwrap();
        assert_eq!(b.ipv4().to_string(), "100.64.0.2");
        assert_eq!(b.ipv6().to_string(), "fd7a:115c:a1e0::2");
        // Same key and endpoint: nothing changes.
        let (_, same) = store.record_agent_node("hst_a", "KEY_A", "h:1", 2).unwrap();
        assert_eq!(same, None);
        assert_eq!(store.topology_version().unwrap(), 2);
        // A new key keeps the addresses and bumps.
        let (a2, changed) = store
            .record_agent_node("hst_a", "KEY_A2", "h:1", 3)
            .unwrap();
        assert_eq!(changed, Some(3));
        assert_eq!(a2.index, a.index);
        drop(store);
        // Across a restart: same node, same addresses, next index continues.
        let store = SqliteStore::open(&path).unwrap();
        assert_eq!(*store.subscribe_topology().borrow(), 3);
        let (a3, same) = store
            .record_agent_node("hst_a", "KEY_A2", "h:1", 4)
            .unwrap();
        assert_eq!((a3.index, same), (1, None));
        let (c, _) = store.record_agent_node("hst_c", "KEY_C", "", 4).unwrap();
        assert_eq!(c.index, 3);
        store.create_network("dev", 1).unwrap();
        let (laptop, _) = store
            .join_local_node("node_lap", "dev", "KEY_L", "", 5)
            .unwrap();
        assert_eq!(laptop.index, 4);
        let topology = store.topology().unwrap();
        assert_eq!(topology.nodes.len(), 4);
        assert_eq!(
            topology.local_members,
            [("dev".to_owned(), "node_lap".to_owned())]
        );
    }

    #[test]
    fn a_revoked_host_leaves_the_mesh_in_the_revoking_transaction() {
        let (_dir, store) = store();
        sandbox(&store, "sbx_1", "hst_a", "running");
        sandbox(&store, "sbx_2", "hst_b", "running");
        store.record_agent_node("hst_a", "KEY_A", "", 1).unwrap();
        store.record_agent_node("hst_b", "KEY_B", "", 1).unwrap();
        store.create_network("dev", 1).unwrap();
        store.attach_sandbox("dev", "sbx_1", None, 1).unwrap();
        store.attach_sandbox("dev", "sbx_2", None, 1).unwrap();
        let v = store.topology_version().unwrap();
        store.revoke_host("hst_b", "test", 5).unwrap().unwrap();
        assert_eq!(store.topology_version().unwrap(), v + 1);
        assert_eq!(
            store.network("dev").unwrap().unwrap().topology_version,
            v + 1
        );
        let nodes: Vec<String> = store
            .topology()
            .unwrap()
            .nodes
            .into_iter()
            .map(|n| n.id)
            .collect();
        assert_eq!(nodes, ["node_hst_a"]);
        // Revoking again changes nothing.
        store.revoke_host("hst_b", "again", 6).unwrap();
        assert_eq!(store.topology_version().unwrap(), v + 1);
        // Through the token: hst_a goes too.
        let (_, hosts) = store
            .revoke_provisioning_token("tok_t", "x", 7)
            .unwrap()
            .unwrap();
        assert_eq!(hosts, ["hst_a"]);
        assert_eq!(store.topology_version().unwrap(), v + 2);
        assert!(store.topology().unwrap().nodes.is_empty());
    }

    #[test]
    fn topology_snapshot_and_denied_counts() {
        let (_dir, store) = store();
        sandbox(&store, "sbx_1", "hst_a", "running");
        sandbox(&store, "sbx_free", "hst_a", "running");
        store.create_network("dev", 1).unwrap();
        store
            .attach_sandbox("dev", "sbx_1", Some(("api", &[8080, 443])), 1)
            .unwrap();
        store
            .add_policy_rule(&rule("pol_1", "dev", "tag:web", "*", 0))
            .unwrap();
        let t = store.topology().unwrap();
        assert_eq!(t.version, 3);
        assert_eq!(t.aliases[0].ports, [8080, 443]);
        // Only attached sandboxes are in the snapshot.
        assert_eq!(t.sandboxes.len(), 1);
        assert_eq!(t.sandboxes[0].addresses, ["10.0.0.2"]);
        assert_eq!(t.sandboxes[0].tags, ["web"]);
        assert_eq!(t.rules[0].from, "tag:web");
        store.record_denied_connection("dev", 100).unwrap();
        store.record_denied_connection("dev", 50).unwrap();
        store.record_denied_connection("unknown", 50).unwrap();
        let dev = store.network("dev").unwrap().unwrap();
        assert_eq!((dev.denied_connections, dev.last_denied_at_ms), (2, 100));
        assert_eq!(store.topology_version().unwrap(), 3);
    }
}
