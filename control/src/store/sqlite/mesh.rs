//! SQLite side of the laptop mesh records (see `store::mesh`).

use rusqlite::{params, Connection, OptionalExtension as _, Row, Transaction};

use super::network;
use crate::error::Result;
use crate::store::mesh::{LocalRegistration, MeshApiToken, NodeCredential, PreAuthKey, Registered};

pub(super) fn migrate_mesh(tx: &Transaction<'_>) -> rusqlite::Result<()> {
    tx.execute_batch(
        "CREATE TABLE mesh_api_tokens (
             id TEXT PRIMARY KEY,
             secret_hash TEXT NOT NULL,
             description TEXT NOT NULL,
             created_at_ms INTEGER NOT NULL,
             revoked_at_ms INTEGER NOT NULL DEFAULT 0
         );
         CREATE TABLE mesh_pre_auth_keys (
             id TEXT PRIMARY KEY,
             secret_hash TEXT NOT NULL,
             network TEXT NOT NULL,
             user TEXT NOT NULL,
             reusable INTEGER NOT NULL,
             node_ttl_ms INTEGER NOT NULL,
             created_at_ms INTEGER NOT NULL,
             expires_at_ms INTEGER NOT NULL,
             used_at_ms INTEGER NOT NULL DEFAULT 0
         );
         CREATE TABLE mesh_node_credentials (
             node_id TEXT PRIMARY KEY,
             secret_hash TEXT NOT NULL,
             network TEXT NOT NULL,
             hostname TEXT NOT NULL,
             user TEXT NOT NULL,
             created_at_ms INTEGER NOT NULL,
             expires_at_ms INTEGER NOT NULL,
             revoked_at_ms INTEGER NOT NULL DEFAULT 0,
             ended TEXT NOT NULL DEFAULT ''
         );
         CREATE INDEX mesh_node_credentials_live ON mesh_node_credentials(expires_at_ms) WHERE ended = '';",
    )
}

pub(super) fn insert_api_token(conn: &Connection, token: &MeshApiToken) -> Result<()> {
    conn.execute(
        "INSERT INTO mesh_api_tokens (id, secret_hash, description, created_at_ms, revoked_at_ms)
         VALUES (?1, ?2, ?3, ?4, ?5)",
        params![
            token.id,
            token.secret_hash,
            token.description,
            token.created_at_ms,
            token.revoked_at_ms
        ],
    )?;
    Ok(())
}

pub(super) fn api_token(conn: &Connection, id: &str) -> Result<Option<MeshApiToken>> {
    Ok(conn
        .query_row(
            "SELECT id, secret_hash, description, created_at_ms, revoked_at_ms
             FROM mesh_api_tokens WHERE id = ?1",
            params![id],
            |row| {
                Ok(MeshApiToken {
                    id: row.get(0)?,
                    secret_hash: row.get(1)?,
                    description: row.get(2)?,
                    created_at_ms: row.get(3)?,
                    revoked_at_ms: row.get(4)?,
                })
            },
        )
        .optional()?)
}

pub(super) fn insert_pre_auth_key(conn: &Connection, key: &PreAuthKey) -> Result<()> {
    conn.execute(
        "INSERT INTO mesh_pre_auth_keys (id, secret_hash, network, user, reusable, node_ttl_ms,
             created_at_ms, expires_at_ms, used_at_ms)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
        params![
            key.id,
            key.secret_hash,
            key.network,
            key.user,
            key.reusable,
            key.node_ttl_ms,
            key.created_at_ms,
            key.expires_at_ms,
            key.used_at_ms
        ],
    )?;
    Ok(())
}

pub(super) fn pre_auth_key(conn: &Connection, id: &str) -> Result<Option<PreAuthKey>> {
    Ok(conn
        .query_row(
            "SELECT id, secret_hash, network, user, reusable, node_ttl_ms, created_at_ms,
                 expires_at_ms, used_at_ms
             FROM mesh_pre_auth_keys WHERE id = ?1",
            params![id],
            |row| {
                Ok(PreAuthKey {
                    id: row.get(0)?,
                    secret_hash: row.get(1)?,
                    network: row.get(2)?,
                    user: row.get(3)?,
                    reusable: row.get(4)?,
                    node_ttl_ms: row.get(5)?,
                    created_at_ms: row.get(6)?,
                    expires_at_ms: row.get(7)?,
                    used_at_ms: row.get(8)?,
                })
            },
        )
        .optional()?)
}

const CREDENTIAL_COLUMNS: &str = "node_id, secret_hash, network, hostname, user, created_at_ms, \
                                  expires_at_ms, revoked_at_ms, ended";

fn credential_from_row(row: &Row<'_>) -> rusqlite::Result<NodeCredential> {
    Ok(NodeCredential {
        node_id: row.get(0)?,
        secret_hash: row.get(1)?,
        network: row.get(2)?,
        hostname: row.get(3)?,
        user: row.get(4)?,
        created_at_ms: row.get(5)?,
        expires_at_ms: row.get(6)?,
        revoked_at_ms: row.get(7)?,
        ended: row.get(8)?,
    })
}

pub(super) fn credential(conn: &Connection, node_id: &str) -> Result<Option<NodeCredential>> {
    Ok(conn
        .query_row(
            &format!("SELECT {CREDENTIAL_COLUMNS} FROM mesh_node_credentials WHERE node_id = ?1"),
            params![node_id],
            credential_from_row,
        )
        .optional()?)
}

/// Consumes a single-use key (unless reusable), joins the node to its
/// network and stores its credential: all or nothing.
pub(super) fn register(tx: &Transaction<'_>, reg: &LocalRegistration) -> Result<Registered> {
    let now = reg.credential.created_at_ms;
    let consumed = tx.execute(
        "UPDATE mesh_pre_auth_keys SET used_at_ms = ?2
         WHERE id = ?1 AND (reusable = 1 OR used_at_ms = 0)",
        params![reg.key_id, now],
    )?;
    if consumed != 1 {
        return Ok(Registered::KeyUsed);
    }
    let (node, version) = network::join_local_node(
        tx,
        &reg.node_id,
        &reg.network,
        &reg.public_key,
        &reg.endpoint,
        now,
    )?;
    let c = &reg.credential;
    tx.execute(
        &format!(
            "INSERT OR REPLACE INTO mesh_node_credentials ({CREDENTIAL_COLUMNS})
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, 0, '')"
        ),
        params![
            c.node_id,
            c.secret_hash,
            c.network,
            c.hostname,
            c.user,
            c.created_at_ms,
            c.expires_at_ms
        ],
    )?;
    Ok(Registered::Joined(node, version))
}

/// Takes a laptop node out of the mesh: its memberships and its node row
/// (its overlay index is never handed out again). With `ended`, the
/// credential stays, marked (`revoked`/`expired`), so its owner hears why;
/// without, it is deleted too (`mesh leave`). Returns the new version, or
/// None when there was no such local node.
pub(super) fn remove_local_node(
    tx: &Transaction<'_>,
    node_id: &str,
    ended: Option<(&str, i64)>,
) -> Result<Option<u64>> {
    let Some(node) = network::node(tx, node_id)? else {
        return Ok(None);
    };
    if node.kind != crate::store::NodeKind::Local {
        return Ok(None);
    }
    let networks: Vec<String> = {
        let mut stmt =
            tx.prepare("SELECT network FROM network_local_members WHERE node_id = ?1")?;
        let rows = stmt.query_map(params![node_id], |row| row.get(0))?;
        rows.collect::<rusqlite::Result<_>>()?
    };
    tx.execute(
        "DELETE FROM network_local_members WHERE node_id = ?1",
        params![node_id],
    )?;
    tx.execute("DELETE FROM mesh_nodes WHERE id = ?1", params![node_id])?;
    match ended {
        Some((why, at_ms)) => {
            tx.execute(
                "UPDATE mesh_node_credentials SET ended = ?2, revoked_at_ms = ?3 WHERE node_id = ?1",
                params![node_id, why, at_ms],
            )?;
        }
        None => {
            tx.execute(
                "DELETE FROM mesh_node_credentials WHERE node_id = ?1",
                params![node_id],
            )?;
        }
    }
    let names: Vec<&str> = networks.iter().map(String::as_str).collect();
    Ok(Some(network::bump(tx, &names)?))
}

/// Live credentials that expired by `now_ms`.
pub(super) fn expired(conn: &Connection, now_ms: i64) -> Result<Vec<String>> {
    let mut stmt = conn.prepare(
        "SELECT node_id FROM mesh_node_credentials WHERE ended = '' AND expires_at_ms <= ?1",
    )?;
    let rows = stmt.query_map(params![now_ms], |row| row.get(0))?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}
