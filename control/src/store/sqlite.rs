//! The embedded store: one SQLite file in the data dir, WAL journal,
//! migrations by `PRAGMA user_version` with one function per step.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use prost::Message as _;
use rusqlite::{params, Connection, OptionalExtension as _, Row, Transaction};

mod mesh;
mod network;

use super::{Alias, AttachedSandbox, Attachment, MeshNode, Network, PolicyRule, Topology};
use super::{
    Cluster, Host, HostStatus, OperatorToken, ProvisioningToken, Sandbox, SandboxFilter,
    SandboxRepo, SandboxStatus, Store, StoredEvent, StoredSandboxEvent, TokenUsage, VolumeMount,
    DEFAULT_CLUSTER_ID,
};
use crate::error::{ControlError, Result};
use proto::{Event, Telemetry};

/// One step of the schema; step `i` (0-based) takes `user_version` from `i`
/// to `i + 1`. Steps are only appended; none can be undone.
type Migration = fn(&Transaction<'_>) -> rusqlite::Result<()>;

const MIGRATIONS: &[Migration] = &[
    migrate_1_schema,
    migrate_2_default_cluster,
    migrate_3_sandboxes,
    network::migrate_networks,
    mesh::migrate_mesh,
];

/// Host events kept per host; older ones are pruned.
pub const EVENTS_KEPT_PER_HOST: u64 = 10_000;
/// Pruning runs on every this-many-th event (store-wide sequence).
const PRUNE_EVERY: u64 = 64;

/// The schema version this build writes.
pub const SCHEMA_VERSION: u32 = MIGRATIONS.len() as u32;

fn migrate_1_schema(tx: &Transaction<'_>) -> rusqlite::Result<()> {
    tx.execute_batch(
        "CREATE TABLE clusters (
             id TEXT PRIMARY KEY,
             name TEXT NOT NULL UNIQUE,
             kind TEXT NOT NULL,
             is_default INTEGER NOT NULL,
             created_at_ms INTEGER NOT NULL
         );
         CREATE TABLE operator_tokens (
             id TEXT PRIMARY KEY,
             description TEXT NOT NULL,
             secret_hash TEXT NOT NULL,
             created_at_ms INTEGER NOT NULL,
             revoked_at_ms INTEGER NOT NULL DEFAULT 0
         );
         CREATE TABLE provisioning_tokens (
             id TEXT PRIMARY KEY,
             cluster_id TEXT NOT NULL REFERENCES clusters(id),
             description TEXT NOT NULL,
             long_living INTEGER NOT NULL,
             secret_hash TEXT NOT NULL,
             created_at_ms INTEGER NOT NULL,
             expires_at_ms INTEGER NOT NULL,
             revoked_at_ms INTEGER NOT NULL DEFAULT 0
         );
         CREATE TABLE hosts (
             id TEXT PRIMARY KEY,
             name TEXT NOT NULL,
             cluster_id TEXT NOT NULL REFERENCES clusters(id),
             token_id TEXT NOT NULL REFERENCES provisioning_tokens(id),
             credential_hash TEXT NOT NULL,
             status TEXT NOT NULL,
             telemetry BLOB NOT NULL,
             enrolled_at_ms INTEGER NOT NULL,
             last_seen_ms INTEGER NOT NULL,
             revoked_at_ms INTEGER NOT NULL DEFAULT 0,
             revoked_reason TEXT NOT NULL DEFAULT '',
             placeable INTEGER NOT NULL DEFAULT 1
         );
         CREATE INDEX hosts_by_token ON hosts(token_id);
         CREATE INDEX hosts_by_cluster ON hosts(cluster_id);
         CREATE TABLE host_events (
             seq INTEGER PRIMARY KEY AUTOINCREMENT,
             host_id TEXT NOT NULL REFERENCES hosts(id),
             kind TEXT NOT NULL,
             at_ms INTEGER NOT NULL,
             event BLOB NOT NULL
         );
         CREATE INDEX host_events_by_host ON host_events(host_id, seq);",
    )
}

fn migrate_2_default_cluster(tx: &Transaction<'_>) -> rusqlite::Result<()> {
    tx.execute(
        "INSERT INTO clusters (id, name, kind, is_default, created_at_ms) VALUES (?1, 'default', 'byo', 1, ?2)",
        params![DEFAULT_CLUSTER_ID, now_ms()],
    )?;
    Ok(())
}

/// Sandboxes and their activity history. Lists (addresses, tags, traits,
/// volumes) are JSON arrays; `status`, `host_id` and `cluster_id` are
/// indexed because the network model reads sandboxes by them.
fn migrate_3_sandboxes(tx: &Transaction<'_>) -> rusqlite::Result<()> {
    tx.execute_batch(
        "CREATE TABLE sandboxes (
             id TEXT PRIMARY KEY,
             cluster_id TEXT NOT NULL REFERENCES clusters(id),
             host_id TEXT NOT NULL REFERENCES hosts(id),
             name TEXT NOT NULL,
             image TEXT NOT NULL,
             image_digest TEXT NOT NULL DEFAULT '',
             blueprint_id TEXT NOT NULL DEFAULT '',
             status TEXT NOT NULL,
             status_message TEXT NOT NULL DEFAULT '',
             container_id TEXT NOT NULL DEFAULT '',
             container_name TEXT NOT NULL DEFAULT '',
             addresses TEXT NOT NULL DEFAULT '[]',
             docker_network TEXT NOT NULL DEFAULT '',
             tags TEXT NOT NULL DEFAULT '[]',
             traits TEXT NOT NULL DEFAULT '[]',
             volumes TEXT NOT NULL DEFAULT '[]',
             repo_url TEXT NOT NULL DEFAULT '',
             repo_branch TEXT NOT NULL DEFAULT '',
             repo_path TEXT NOT NULL DEFAULT '',
             repo_status TEXT NOT NULL DEFAULT '',
             repo_error TEXT NOT NULL DEFAULT '',
             memory_bytes INTEGER NOT NULL DEFAULT 0,
             millicpus INTEGER NOT NULL DEFAULT 0,
             created_by TEXT NOT NULL DEFAULT '',
             created_at_ms INTEGER NOT NULL,
             updated_at_ms INTEGER NOT NULL,
             archived_at_ms INTEGER NOT NULL DEFAULT 0
         );
         CREATE INDEX sandboxes_by_host ON sandboxes(host_id, status);
         CREATE INDEX sandboxes_by_cluster ON sandboxes(cluster_id, status);
         CREATE INDEX sandboxes_by_container ON sandboxes(container_id);
         CREATE TABLE sandbox_events (
             seq INTEGER PRIMARY KEY AUTOINCREMENT,
             sandbox_id TEXT NOT NULL REFERENCES sandboxes(id),
             kind TEXT NOT NULL,
             at_ms INTEGER NOT NULL,
             event BLOB NOT NULL
         );
         CREATE INDEX sandbox_events_by_sandbox ON sandbox_events(sandbox_id, seq);",
    )
}

fn now_ms() -> i64 {
    crate::clock::now_ms()
}

/// The SQLite store. One connection behind a mutex: every call is a short
/// transaction, and WAL lets other processes (`gstacks-control
/// operator-token create`) read and write beside a running server.
pub struct SqliteStore {
    path: PathBuf,
    conn: Mutex<Connection>,
    /// The latest committed topology version.
    topology: tokio::sync::watch::Sender<u64>,
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl SqliteStore {
    /// Opens (or creates) the store at `path` and migrates it to
    /// [`SCHEMA_VERSION`].
    pub fn open(path: &Path) -> Result<SqliteStore> {
        let open_err = |source| ControlError::StoreOpen {
            path: path.to_owned(),
            source,
        };
        let mut conn = Connection::open(path).map_err(open_err)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))
            .map_err(open_err)?;
        let mode: String = conn
            .pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get(0))
            .map_err(open_err)?;
        if !mode.eq_ignore_ascii_case("wal") {
            tracing::warn!(path = %path.display(), mode, "store is not in WAL mode");
        }
        conn.pragma_update(None, "synchronous", "NORMAL")
            .map_err(open_err)?;
        conn.pragma_update(None, "foreign_keys", true)
            .map_err(open_err)?;
        migrate(&mut conn, path)?;
        let version = network::topology_version(&conn)?;
        Ok(SqliteStore {
            path: path.to_owned(),
            conn: Mutex::new(conn),
            topology: tokio::sync::watch::Sender::new(version),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn with<T>(&self, f: impl FnOnce(&mut Connection) -> Result<T>) -> Result<T> {
        // A panic while holding the lock cannot leave a half-applied write
        // (every write is a transaction), so a poisoned lock is still usable.
        let mut conn = self
            .conn
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        f(&mut conn)
    }

    /// Runs a topology change in one transaction; after the commit, the
    /// new version is announced to subscribers.
    fn change<T>(&self, f: impl FnOnce(&Transaction<'_>) -> Result<T>) -> Result<T> {
        let (value, version) = self.with(|conn| {
            let tx = conn.transaction()?;
            let value = f(&tx)?;
            let version = network::topology_version(&tx)?;
            tx.commit()?;
            Ok((value, version))
        })?;
        self.topology.send_if_modified(|current| {
            if version > *current {
                *current = version;
                true
            } else {
                false
            }
        });
        Ok(value)
    }
}

/// Brings the schema to [`SCHEMA_VERSION`], one transaction per step.
fn migrate(conn: &mut Connection, path: &Path) -> Result<()> {
    let found: u32 = conn.pragma_query_value(None, "user_version", |row| row.get(0))?;
    if found > SCHEMA_VERSION {
        return Err(ControlError::StoreTooNew {
            path: path.to_owned(),
            found,
            known: SCHEMA_VERSION,
        });
    }
    for (step, migration) in MIGRATIONS.iter().enumerate().skip(found as usize) {
        let tx = conn.transaction()?;
        migration(&tx)?;
        tx.pragma_update(None, "user_version", step as u32 + 1)?;
        tx.commit()?;
        tracing::debug!(path = %path.display(), version = step + 1, "store migrated");
    }
    Ok(())
}

fn cluster_from_row(row: &Row<'_>) -> rusqlite::Result<Cluster> {
    Ok(Cluster {
        id: row.get(0)?,
        name: row.get(1)?,
        kind: row.get(2)?,
        is_default: row.get(3)?,
    })
}

const TOKEN_COLUMNS: &str = "id, cluster_id, description, long_living, secret_hash, created_at_ms, expires_at_ms, revoked_at_ms";

fn token_from_row(row: &Row<'_>) -> rusqlite::Result<ProvisioningToken> {
    Ok(ProvisioningToken {
        id: row.get(0)?,
        cluster_id: row.get(1)?,
        description: row.get(2)?,
        long_living: row.get(3)?,
        secret_hash: row.get(4)?,
        created_at_ms: row.get(5)?,
        expires_at_ms: row.get(6)?,
        revoked_at_ms: row.get(7)?,
    })
}

const OPERATOR_COLUMNS: &str = "id, description, secret_hash, created_at_ms, revoked_at_ms";

fn operator_from_row(row: &Row<'_>) -> rusqlite::Result<OperatorToken> {
    Ok(OperatorToken {
        id: row.get(0)?,
        description: row.get(1)?,
        secret_hash: row.get(2)?,
        created_at_ms: row.get(3)?,
        revoked_at_ms: row.get(4)?,
    })
}

const HOST_COLUMNS: &str = "id, name, cluster_id, token_id, credential_hash, status, telemetry, enrolled_at_ms, last_seen_ms, revoked_at_ms, revoked_reason, placeable";

/// A host row before its blobs and enums are checked.
struct RawHost {
    host: Host,
    status: String,
    telemetry: Vec<u8>,
}

fn raw_host_from_row(row: &Row<'_>) -> rusqlite::Result<RawHost> {
    Ok(RawHost {
        host: Host {
            id: row.get(0)?,
            name: row.get(1)?,
            cluster_id: row.get(2)?,
            token_id: row.get(3)?,
            credential_hash: row.get(4)?,
            status: HostStatus::Disconnected,
            telemetry: Telemetry::default(),
            enrolled_at_ms: row.get(7)?,
            last_seen_ms: row.get(8)?,
            revoked_at_ms: row.get(9)?,
            revoked_reason: row.get(10)?,
            placeable: row.get(11)?,
        },
        status: row.get(5)?,
        telemetry: row.get(6)?,
    })
}

impl RawHost {
    fn check(self) -> Result<Host> {
        let mut host = self.host;
        host.status =
            HostStatus::parse(&self.status).ok_or_else(|| ControlError::StoreCorrupt {
                what: "host status of",
                id: host.id.clone(),
                reason: format!("unknown status `{}`", self.status),
            })?;
        host.telemetry = Telemetry::decode(self.telemetry.as_slice()).map_err(|err| {
            ControlError::StoreCorrupt {
                what: "telemetry of host",
                id: host.id.clone(),
                reason: err.to_string(),
            }
        })?;
        Ok(host)
    }
}

fn host_in(conn: &Connection, id: &str) -> Result<Option<Host>> {
    conn.query_row(
        &format!("SELECT {HOST_COLUMNS} FROM hosts WHERE id = ?1"),
        [id],
        raw_host_from_row,
    )
    .optional()?
    .map(RawHost::check)
    .transpose()
}

const SANDBOX_COLUMNS: &str = "id, cluster_id, host_id, name, image, image_digest, blueprint_id, status, status_message, container_id, container_name, addresses, docker_network, tags, traits, volumes, repo_url, repo_branch, repo_path, repo_status, repo_error, memory_bytes, millicpus, created_by, created_at_ms, updated_at_ms, archived_at_ms";

/// A sandbox row before its enum and JSON columns are checked.
struct RawSandbox {
    sandbox: Sandbox,
    status: String,
    addresses: String,
    tags: String,
    traits: String,
    volumes: String,
}

fn raw_sandbox_from_row(row: &Row<'_>) -> rusqlite::Result<RawSandbox> {
    Ok(RawSandbox {
        sandbox: Sandbox {
            id: row.get(0)?,
            cluster_id: row.get(1)?,
            host_id: row.get(2)?,
            name: row.get(3)?,
            image: row.get(4)?,
            image_digest: row.get(5)?,
            blueprint_id: row.get(6)?,
            status: SandboxStatus::Provisioning,
            status_message: row.get(8)?,
            container_id: row.get(9)?,
            container_name: row.get(10)?,
            addresses: Vec::new(),
            docker_network: row.get(12)?,
            tags: Vec::new(),
            traits: Vec::new(),
            volumes: Vec::new(),
            repo: SandboxRepo {
                url: row.get(16)?,
                branch: row.get(17)?,
                path: row.get(18)?,
                status: row.get(19)?,
                error: row.get(20)?,
            },
            memory_bytes: row.get::<_, i64>(21)?.max(0) as u64,
            millicpus: row.get::<_, i64>(22)?.clamp(0, i64::from(u32::MAX)) as u32,
            created_by: row.get(23)?,
            created_at_ms: row.get(24)?,
            updated_at_ms: row.get(25)?,
            archived_at_ms: row.get(26)?,
        },
        status: row.get(7)?,
        addresses: row.get(11)?,
        tags: row.get(13)?,
        traits: row.get(14)?,
        volumes: row.get(15)?,
    })
}

impl RawSandbox {
    fn check(self) -> Result<Sandbox> {
        let mut sandbox = self.sandbox;
        let corrupt = |what: &'static str, id: &str, reason: String| ControlError::StoreCorrupt {
            what,
            id: id.to_owned(),
            reason,
        };
        sandbox.status = SandboxStatus::parse(&self.status).ok_or_else(|| {
            corrupt(
                "status of sandbox",
                &sandbox.id,
                format!("unknown status `{}`", self.status),
            )
        })?;
        let list = |what: &'static str, text: &str| -> Result<Vec<String>> {
            serde_json::from_str(text).map_err(|err| corrupt(what, &sandbox.id, err.to_string()))
        };
        sandbox.addresses = list("addresses of sandbox", &self.addresses)?;
        sandbox.tags = list("tags of sandbox", &self.tags)?;
        sandbox.traits = list("traits of sandbox", &self.traits)?;
        sandbox.volumes = serde_json::from_str::<Vec<VolumeMount>>(&self.volumes)
            .map_err(|err| corrupt("volumes of sandbox", &sandbox.id, err.to_string()))?;
        Ok(sandbox)
    }
}

fn json_list<T: serde::Serialize>(items: &[T]) -> String {
    // Serialising strings and plain structs cannot fail.
    serde_json::to_string(items).unwrap_or_else(|_| "[]".to_owned())
}

fn sandbox_in(conn: &Connection, id: &str) -> Result<Option<Sandbox>> {
    conn.query_row(
        &format!("SELECT {SANDBOX_COLUMNS} FROM sandboxes WHERE id = ?1"),
        [id],
        raw_sandbox_from_row,
    )
    .optional()?
    .map(RawSandbox::check)
    .transpose()
}

/// Writes a sandbox: `INSERT` (new) or `UPDATE` by id.
fn write_sandbox(conn: &Connection, sandbox: &Sandbox, insert: bool) -> Result<usize> {
    let sql = if insert {
        format!(
            "INSERT INTO sandboxes ({SANDBOX_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19, ?20, ?21, ?22, ?23, ?24, ?25, ?26, ?27)"
        )
    } else {
        "UPDATE sandboxes SET cluster_id = ?2, host_id = ?3, name = ?4, image = ?5, image_digest = ?6, blueprint_id = ?7, status = ?8, status_message = ?9, container_id = ?10, container_name = ?11, addresses = ?12, docker_network = ?13, tags = ?14, traits = ?15, volumes = ?16, repo_url = ?17, repo_branch = ?18, repo_path = ?19, repo_status = ?20, repo_error = ?21, memory_bytes = ?22, millicpus = ?23, created_by = ?24, created_at_ms = ?25, updated_at_ms = ?26, archived_at_ms = ?27 WHERE id = ?1".to_owned()
    };
    Ok(conn.execute(
        &sql,
        params![
            sandbox.id,
            sandbox.cluster_id,
            sandbox.host_id,
            sandbox.name,
            sandbox.image,
            sandbox.image_digest,
            sandbox.blueprint_id,
            sandbox.status.as_str(),
            sandbox.status_message,
            sandbox.container_id,
            sandbox.container_name,
            json_list(&sandbox.addresses),
            sandbox.docker_network,
            json_list(&sandbox.tags),
            json_list(&sandbox.traits),
            json_list(&sandbox.volumes),
            sandbox.repo.url,
            sandbox.repo.branch,
            sandbox.repo.path,
            sandbox.repo.status,
            sandbox.repo.error,
            i64::try_from(sandbox.memory_bytes).unwrap_or(i64::MAX),
            i64::from(sandbox.millicpus),
            sandbox.created_by,
            sandbox.created_at_ms,
            sandbox.updated_at_ms,
            sandbox.archived_at_ms,
        ],
    )?)
}

impl Store for SqliteStore {
    fn insert_mesh_api_token(&self, token: &super::mesh::MeshApiToken) -> Result<()> {
        self.with(|conn| mesh::insert_api_token(conn, token))
    }

    fn mesh_api_token(&self, id: &str) -> Result<Option<super::mesh::MeshApiToken>> {
        self.with(|conn| mesh::api_token(conn, id))
    }

    fn revoke_mesh_api_tokens_described(&self, description: &str, now_ms: i64) -> Result<usize> {
        self.with(|conn| {
            Ok(conn.execute(
                "UPDATE mesh_api_tokens SET revoked_at_ms = ?2 WHERE description = ?1 AND revoked_at_ms = 0",
                params![description, now_ms],
            )?)
        })
    }

    fn insert_pre_auth_key(&self, key: &super::mesh::PreAuthKey) -> Result<()> {
        self.with(|conn| mesh::insert_pre_auth_key(conn, key))
    }

    fn pre_auth_key(&self, id: &str) -> Result<Option<super::mesh::PreAuthKey>> {
        self.with(|conn| mesh::pre_auth_key(conn, id))
    }

    fn register_local_node(
        &self,
        registration: &super::mesh::LocalRegistration,
    ) -> Result<super::mesh::Registered> {
        self.change(|tx| mesh::register(tx, registration))
    }

    fn node_credential(&self, node_id: &str) -> Result<Option<super::mesh::NodeCredential>> {
        self.with(|conn| mesh::credential(conn, node_id))
    }

    fn remove_local_node(&self, node_id: &str, ended: Option<(&str, i64)>) -> Result<Option<u64>> {
        self.change(|tx| mesh::remove_local_node(tx, node_id, ended))
    }

    fn expired_local_nodes(&self, now_ms: i64) -> Result<Vec<String>> {
        self.with(|conn| mesh::expired(conn, now_ms))
    }

    fn clusters(&self) -> Result<Vec<Cluster>> {
        self.with(|conn| {
            let mut stmt = conn.prepare(
                "SELECT id, name, kind, is_default FROM clusters ORDER BY is_default DESC, name",
            )?;
            let rows = stmt.query_map([], cluster_from_row)?;
            Ok(rows.collect::<rusqlite::Result<_>>()?)
        })
    }

    fn cluster(&self, id: &str) -> Result<Option<Cluster>> {
        self.with(|conn| {
            Ok(conn
                .query_row(
                    "SELECT id, name, kind, is_default FROM clusters WHERE id = ?1",
                    [id],
                    cluster_from_row,
                )
                .optional()?)
        })
    }

    fn insert_operator_token(&self, token: &OperatorToken) -> Result<()> {
        self.with(|conn| {
            conn.execute(
                &format!(
                    "INSERT INTO operator_tokens ({OPERATOR_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5)"
                ),
                params![
                    token.id,
                    token.description,
                    token.secret_hash,
                    token.created_at_ms,
                    token.revoked_at_ms
                ],
            )?;
            Ok(())
        })
    }

    fn operator_token(&self, id: &str) -> Result<Option<OperatorToken>> {
        self.with(|conn| {
            Ok(conn
                .query_row(
                    &format!("SELECT {OPERATOR_COLUMNS} FROM operator_tokens WHERE id = ?1"),
                    [id],
                    operator_from_row,
                )
                .optional()?)
        })
    }

    fn active_operator_tokens(&self) -> Result<Vec<OperatorToken>> {
        self.with(|conn| {
            let mut stmt = conn.prepare(&format!(
                "SELECT {OPERATOR_COLUMNS} FROM operator_tokens WHERE revoked_at_ms = 0 ORDER BY created_at_ms"
            ))?;
            let rows = stmt.query_map([], operator_from_row)?;
            Ok(rows.collect::<rusqlite::Result<_>>()?)
        })
    }

    fn revoke_operator_tokens_described(&self, description: &str, now_ms: i64) -> Result<usize> {
        self.with(|conn| {
            Ok(conn.execute(
                "UPDATE operator_tokens SET revoked_at_ms = ?2 WHERE description = ?1 AND revoked_at_ms = 0",
                params![description, now_ms],
            )?)
        })
    }

    fn insert_provisioning_token(&self, token: &ProvisioningToken) -> Result<()> {
        self.with(|conn| {
            conn.execute(
                &format!(
                    "INSERT INTO provisioning_tokens ({TOKEN_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)"
                ),
                params![
                    token.id,
                    token.cluster_id,
                    token.description,
                    token.long_living,
                    token.secret_hash,
                    token.created_at_ms,
                    token.expires_at_ms,
                    token.revoked_at_ms
                ],
            )?;
            Ok(())
        })
    }

    fn provisioning_token(&self, id: &str) -> Result<Option<ProvisioningToken>> {
        self.with(|conn| {
            Ok(conn
                .query_row(
                    &format!("SELECT {TOKEN_COLUMNS} FROM provisioning_tokens WHERE id = ?1"),
                    [id],
                    token_from_row,
                )
                .optional()?)
        })
    }

    fn provisioning_tokens(&self, cluster_id: Option<&str>) -> Result<Vec<TokenUsage>> {
        self.with(|conn| {
            let mut stmt = conn.prepare(&format!(
                "SELECT {TOKEN_COLUMNS}, (SELECT COUNT(*) FROM hosts h WHERE h.token_id = t.id)
                 FROM provisioning_tokens t
                 WHERE ?1 IS NULL OR cluster_id = ?1
                 ORDER BY created_at_ms, id"
            ))?;
            let rows = stmt.query_map([cluster_id], |row| {
                Ok(TokenUsage {
                    token: token_from_row(row)?,
                    hosts_enrolled: row.get(8)?,
                })
            })?;
            Ok(rows.collect::<rusqlite::Result<_>>()?)
        })
    }

    fn revoke_provisioning_token(
        &self,
        id: &str,
        reason: &str,
        now_ms: i64,
    ) -> Result<Option<(ProvisioningToken, Vec<String>)>> {
        // A revoked host's mesh node leaves every netmap: same transaction.
        self.change(|tx| {
            tx.execute(
                "UPDATE provisioning_tokens SET revoked_at_ms = ?2 WHERE id = ?1 AND revoked_at_ms = 0",
                params![id, now_ms],
            )?;
            let Some(token) = tx
                .query_row(
                    &format!("SELECT {TOKEN_COLUMNS} FROM provisioning_tokens WHERE id = ?1"),
                    [id],
                    token_from_row,
                )
                .optional()?
            else {
                return Ok(None);
            };
            let hosts: Vec<String> = {
                let mut stmt = tx.prepare(
                    "UPDATE hosts SET status = 'no_token', placeable = 0, revoked_at_ms = ?2, revoked_reason = ?3
                     WHERE token_id = ?1 AND revoked_at_ms = 0
                     RETURNING id",
                )?;
                let rows = stmt.query_map(params![id, now_ms, reason], |row| row.get(0))?;
                rows.collect::<rusqlite::Result<_>>()?
            };
            network::after_hosts_revoked(tx, &hosts)?;
            Ok(Some((token, hosts)))
        })
    }

    fn insert_host(&self, host: &Host) -> Result<()> {
        self.with(|conn| {
            conn.execute(
                &format!(
                    "INSERT INTO hosts ({HOST_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)"
                ),
                params![
                    host.id,
                    host.name,
                    host.cluster_id,
                    host.token_id,
                    host.credential_hash,
                    host.status.as_str(),
                    host.telemetry.encode_to_vec(),
                    host.enrolled_at_ms,
                    host.last_seen_ms,
                    host.revoked_at_ms,
                    host.revoked_reason,
                    host.placeable
                ],
            )?;
            Ok(())
        })
    }

    fn host(&self, id: &str) -> Result<Option<Host>> {
        self.with(|conn| host_in(conn, id))
    }

    fn hosts(&self, cluster_id: Option<&str>) -> Result<Vec<Host>> {
        self.with(|conn| {
            let mut stmt = conn.prepare(&format!(
                "SELECT {HOST_COLUMNS} FROM hosts WHERE ?1 IS NULL OR cluster_id = ?1 ORDER BY enrolled_at_ms, id"
            ))?;
            let rows = stmt.query_map([cluster_id], raw_host_from_row)?;
            rows.map(|raw| raw.map_err(ControlError::from).and_then(RawHost::check))
                .collect()
        })
    }

    fn set_host_connected(&self, id: &str, telemetry: &Telemetry, now_ms: i64) -> Result<bool> {
        self.with(|conn| {
            let changed = conn.execute(
                "UPDATE hosts SET status = 'connected', telemetry = ?2, last_seen_ms = ?3
                 WHERE id = ?1 AND revoked_at_ms = 0",
                params![id, telemetry.encode_to_vec(), now_ms],
            )?;
            Ok(changed == 1)
        })
    }

    fn record_heartbeat(&self, id: &str, telemetry: Option<&Telemetry>, now_ms: i64) -> Result<()> {
        self.with(|conn| {
            match telemetry {
                Some(telemetry) => conn.execute(
                    "UPDATE hosts SET last_seen_ms = ?2, telemetry = ?3 WHERE id = ?1",
                    params![id, now_ms, telemetry.encode_to_vec()],
                )?,
                None => conn.execute(
                    "UPDATE hosts SET last_seen_ms = ?2 WHERE id = ?1",
                    params![id, now_ms],
                )?,
            };
            Ok(())
        })
    }

    fn set_host_disconnected(&self, id: &str, now_ms: i64) -> Result<()> {
        self.with(|conn| {
            conn.execute(
                "UPDATE hosts SET status = 'disconnected', last_seen_ms = MAX(last_seen_ms, ?2)
                 WHERE id = ?1 AND status = 'connected'",
                params![id, now_ms],
            )?;
            Ok(())
        })
    }

    fn revoke_host(&self, id: &str, reason: &str, now_ms: i64) -> Result<Option<Host>> {
        // A revoked host's mesh node leaves every netmap: same transaction.
        self.change(|tx| {
            let revoked = tx.execute(
                "UPDATE hosts SET status = 'no_token', placeable = 0, revoked_at_ms = ?2, revoked_reason = ?3
                 WHERE id = ?1 AND revoked_at_ms = 0",
                params![id, now_ms, reason],
            )?;
            if revoked == 1 {
                network::after_hosts_revoked(tx, &[id.to_owned()])?;
            }
            host_in(tx, id)
        })
    }

    fn disconnect_all(&self, now_ms: i64) -> Result<usize> {
        self.with(|conn| {
            Ok(conn.execute(
                "UPDATE hosts SET status = 'disconnected' WHERE status = 'connected'",
                [],
            )?)
        })
        .inspect(|n| {
            if *n > 0 {
                tracing::debug!(hosts = n, at = now_ms, "hosts marked disconnected at start");
            }
        })
    }

    fn append_host_event(&self, host_id: &str, event: &Event) -> Result<u64> {
        self.with(|conn| {
            conn.execute(
                "INSERT INTO host_events (host_id, kind, at_ms, event) VALUES (?1, ?2, ?3, ?4)",
                params![host_id, event.kind, event.at_ms, event.encode_to_vec()],
            )?;
            let seq = conn.last_insert_rowid() as u64;
            // Now and then, drop what is beyond the host's retention.
            if seq.is_multiple_of(PRUNE_EVERY) {
                conn.execute(
                    "DELETE FROM host_events WHERE host_id = ?1 AND seq <= (
                         SELECT seq FROM host_events WHERE host_id = ?1
                         ORDER BY seq DESC LIMIT 1 OFFSET ?2)",
                    params![host_id, EVENTS_KEPT_PER_HOST as i64],
                )?;
            }
            Ok(seq)
        })
    }

    fn host_events(
        &self,
        host_id: &str,
        after_seq: u64,
        tail: Option<u32>,
    ) -> Result<Vec<StoredEvent>> {
        self.with(|conn| {
            let limit: i64 = tail.map_or(-1, i64::from);
            let mut stmt = conn.prepare(
                "SELECT seq, event FROM (
                     SELECT seq, event FROM host_events WHERE host_id = ?1 AND seq > ?2
                     ORDER BY seq DESC LIMIT ?3
                 ) ORDER BY seq",
            )?;
            let rows = stmt.query_map(params![host_id, after_seq as i64, limit], |row| {
                Ok((row.get::<_, i64>(0)?, row.get::<_, Vec<u8>>(1)?))
            })?;
            let mut events = Vec::new();
            for row in rows {
                let (seq, blob) = row?;
                let event =
                    Event::decode(blob.as_slice()).map_err(|err| ControlError::StoreCorrupt {
                        what: "host event",
                        id: seq.to_string(),
                        reason: err.to_string(),
                    })?;
                events.push(StoredEvent {
                    seq: seq as u64,
                    host_id: host_id.to_owned(),
                    event,
                });
            }
            Ok(events)
        })
    }

    fn topology_version(&self) -> Result<u64> {
        self.with(|conn| network::topology_version(conn))
    }

    fn subscribe_topology(&self) -> tokio::sync::watch::Receiver<u64> {
        self.topology.subscribe()
    }

    fn create_network(&self, name: &str, now_ms: i64) -> Result<Network> {
        self.change(|tx| network::create_network(tx, name, now_ms))
    }

    fn network(&self, name: &str) -> Result<Option<Network>> {
        self.with(|conn| network::network(conn, name))
    }

    fn networks(&self) -> Result<Vec<Network>> {
        self.with(|conn| network::networks(conn))
    }

    fn network_attachments(&self, name: &str) -> Result<Vec<Attachment>> {
        self.with(|conn| network::attachments(conn, name))
    }

    fn network_aliases(&self, name: &str) -> Result<Vec<Alias>> {
        self.with(|conn| network::aliases(conn, name))
    }

    fn attach_sandbox(
        &self,
        name: &str,
        sandbox_id: &str,
        alias: Option<(&str, &[u16])>,
        now_ms: i64,
    ) -> Result<u64> {
        self.change(|tx| network::attach(tx, name, sandbox_id, alias, now_ms))
    }

    fn detach_sandbox(&self, name: &str, sandbox_id: &str) -> Result<u64> {
        self.change(|tx| network::detach(tx, name, sandbox_id))
    }

    fn add_alias(
        &self,
        name: &str,
        sandbox_id: &str,
        alias: &str,
        ports: &[u16],
        now_ms: i64,
    ) -> Result<u64> {
        self.change(|tx| network::add_alias(tx, name, sandbox_id, alias, ports, now_ms))
    }

    fn remove_alias(&self, name: &str, alias: &str) -> Result<u64> {
        self.change(|tx| network::remove_alias(tx, name, alias))
    }

    fn policy_rules(&self, name: &str) -> Result<Vec<PolicyRule>> {
        self.with(|conn| network::policy_rules(conn, name))
    }

    fn add_policy_rule(&self, rule: &PolicyRule) -> Result<u64> {
        self.change(|tx| network::add_policy_rule(tx, rule))
    }

    fn remove_policy_rule(&self, name: &str, id: &str) -> Result<u64> {
        self.change(|tx| network::remove_policy_rule(tx, name, id))
    }

    fn record_agent_node(
        &self,
        host_id: &str,
        public_key: &str,
        endpoint: &str,
        now_ms: i64,
    ) -> Result<(MeshNode, Option<u64>)> {
        self.change(|tx| network::record_agent_node(tx, host_id, public_key, endpoint, now_ms))
    }

    fn join_local_node(
        &self,
        node_id: &str,
        name: &str,
        public_key: &str,
        endpoint: &str,
        now_ms: i64,
    ) -> Result<(MeshNode, u64)> {
        self.change(|tx| network::join_local_node(tx, node_id, name, public_key, endpoint, now_ms))
    }

    fn mesh_node(&self, id: &str) -> Result<Option<MeshNode>> {
        self.with(|conn| network::node(conn, id))
    }

    fn network_sandbox(&self, id: &str) -> Result<Option<AttachedSandbox>> {
        self.with(|conn| network::sandbox(conn, id))
    }

    fn record_denied_connection(&self, name: &str, at_ms: i64) -> Result<()> {
        self.with(|conn| network::record_denied_connection(conn, name, at_ms))
    }

    fn topology(&self) -> Result<Topology> {
        self.with(|conn| {
            let tx = conn.transaction()?;
            let topology = network::topology(&tx)?;
            tx.commit()?;
            Ok(topology)
        })
    }

    fn insert_sandbox(&self, sandbox: &Sandbox) -> Result<()> {
        self.with(|conn| write_sandbox(conn, sandbox, true).map(drop))
    }

    fn sandbox(&self, id: &str) -> Result<Option<Sandbox>> {
        self.with(|conn| sandbox_in(conn, id))
    }

    fn sandboxes(&self, filter: &SandboxFilter) -> Result<Vec<Sandbox>> {
        self.with(|conn| {
            // The indexed columns narrow in SQL; the rest (statuses, tag)
            // is checked on the decoded record by the filter itself.
            let mut stmt = conn.prepare(&format!(
                "SELECT {SANDBOX_COLUMNS} FROM sandboxes
                 WHERE (?1 IS NULL OR cluster_id = ?1) AND (?2 IS NULL OR host_id = ?2)
                   AND (?3 = 0 OR status != 'archived')
                 ORDER BY created_at_ms, id"
            ))?;
            let rows = stmt.query_map(
                params![filter.cluster_id, filter.host_id, filter.exclude_archived],
                raw_sandbox_from_row,
            )?;
            let mut out = Vec::new();
            for row in rows {
                let sandbox = row?.check()?;
                if filter.matches(&sandbox) {
                    out.push(sandbox);
                }
            }
            Ok(out)
        })
    }

    fn update_sandbox(&self, sandbox: &Sandbox) -> Result<bool> {
        // A change of what netmaps show (host, status, addresses, tags) of
        // an attached sandbox bumps the topology version in this transaction.
        self.change(|tx| {
            let before = network::sandbox(tx, &sandbox.id)?;
            let updated = write_sandbox(tx, sandbox, false)? == 1;
            if updated {
                network::after_sandbox_write(tx, before.as_ref(), &sandbox.id)?;
            }
            Ok(updated)
        })
    }

    fn sandbox_by_container(
        &self,
        container_id: &str,
        container_name: &str,
    ) -> Result<Option<Sandbox>> {
        self.with(|conn| {
            if !container_id.is_empty() {
                let id: Option<String> = conn
                    .query_row(
                        "SELECT id FROM sandboxes WHERE container_id = ?1
                         ORDER BY created_at_ms DESC LIMIT 1",
                        [container_id],
                        |row| row.get(0),
                    )
                    .optional()?;
                if let Some(id) = id {
                    return sandbox_in(conn, &id);
                }
            }
            if !container_name.is_empty() {
                let id: Option<String> = conn
                    .query_row(
                        "SELECT id FROM sandboxes WHERE container_name = ?1
                         ORDER BY created_at_ms DESC LIMIT 1",
                        [container_name],
                        |row| row.get(0),
                    )
                    .optional()?;
                if let Some(id) = id {
                    return sandbox_in(conn, &id);
                }
            }
            Ok(None)
        })
    }

    fn append_sandbox_event(&self, sandbox_id: &str, event: &Event) -> Result<u64> {
        self.with(|conn| {
            conn.execute(
                "INSERT INTO sandbox_events (sandbox_id, kind, at_ms, event) VALUES (?1, ?2, ?3, ?4)",
                params![sandbox_id, event.kind, event.at_ms, event.encode_to_vec()],
            )?;
            Ok(conn.last_insert_rowid() as u64)
        })
    }

    fn sandbox_events(
        &self,
        sandbox_id: &str,
        after_seq: u64,
        tail: Option<u32>,
    ) -> Result<Vec<StoredSandboxEvent>> {
        self.with(|conn| {
            let limit: i64 = tail.map_or(-1, i64::from);
            let mut stmt = conn.prepare(
                "SELECT seq, event FROM (
                     SELECT seq, event FROM sandbox_events WHERE sandbox_id = ?1 AND seq > ?2
                     ORDER BY seq DESC LIMIT ?3
                 ) ORDER BY seq",
            )?;
            let rows = stmt.query_map(params![sandbox_id, after_seq as i64, limit], |row| {
                Ok((row.get::<_, i64>(0)?, row.get::<_, Vec<u8>>(1)?))
            })?;
            let mut events = Vec::new();
            for row in rows {
                let (seq, blob) = row?;
                let event =
                    Event::decode(blob.as_slice()).map_err(|err| ControlError::StoreCorrupt {
                        what: "sandbox event",
                        id: seq.to_string(),
                        reason: err.to_string(),
                    })?;
                events.push(StoredSandboxEvent {
                    seq: seq as u64,
                    sandbox_id: sandbox_id.to_owned(),
                    event,
                });
            }
            Ok(events)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(id: &str, token_id: &str) -> Host {
        Host {
            id: id.to_owned(),
            name: format!("{id}-name"),
            cluster_id: DEFAULT_CLUSTER_ID.to_owned(),
            token_id: token_id.to_owned(),
            credential_hash: "ab".repeat(32),
            status: HostStatus::Disconnected,
            telemetry: Telemetry {
                arch: "amd64".into(),
                traits: vec!["docker".into()],
                ..Default::default()
            },
            enrolled_at_ms: 1,
            last_seen_ms: 0,
            revoked_at_ms: 0,
            revoked_reason: String::new(),
            placeable: true,
        }
    }

    fn token(id: &str) -> ProvisioningToken {
        ProvisioningToken {
            id: id.to_owned(),
            cluster_id: DEFAULT_CLUSTER_ID.to_owned(),
            description: "test".into(),
            long_living: false,
            secret_hash: "cd".repeat(32),
            created_at_ms: 10,
            expires_at_ms: 20,
            revoked_at_ms: 0,
        }
    }

    #[test]
    fn fresh_store_migrates_to_current_version_with_default_cluster() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("control.db");
        let store = SqliteStore::open(&path).unwrap();
        let clusters = store.clusters().unwrap();
        assert_eq!(clusters.len(), 1);
        assert_eq!(clusters[0].id, DEFAULT_CLUSTER_ID);
        assert_eq!(clusters[0].kind, "byo");
        assert!(clusters[0].is_default);
        let version: u32 = store
            .with(|c| Ok(c.pragma_query_value(None, "user_version", |r| r.get(0))?))
            .unwrap();
        assert_eq!(version, SCHEMA_VERSION);
        let mode: String = store
            .with(|c| Ok(c.pragma_query_value(None, "journal_mode", |r| r.get(0))?))
            .unwrap();
        assert_eq!(mode, "wal");
        drop(store);
        // Reopening runs no step twice (the default cluster insert would fail).
        let store = SqliteStore::open(&path).unwrap();
        assert_eq!(store.clusters().unwrap().len(), 1);
    }

    #[test]
    fn migration_resumes_from_an_older_version() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("control.db");
        {
            let mut conn = Connection::open(&path).unwrap();
            let tx = conn.transaction().unwrap();
            migrate_1_schema(&tx).unwrap();
            tx.pragma_update(None, "user_version", 1).unwrap();
            tx.commit().unwrap();
        }
        let store = SqliteStore::open(&path).unwrap();
        assert_eq!(store.clusters().unwrap().len(), 1);
    }

    #[test]
    fn newer_store_is_refused_and_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("control.db");
        {
            let conn = Connection::open(&path).unwrap();
            conn.pragma_update(None, "user_version", SCHEMA_VERSION + 5)
                .unwrap();
        }
        let err = SqliteStore::open(&path).unwrap_err().to_string();
        assert!(
            err.contains("newer than this gstacks-control knows"),
            "{err}"
        );
        let conn = Connection::open(&path).unwrap();
        let version: u32 = conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .unwrap();
        assert_eq!(version, SCHEMA_VERSION + 5);
    }

    #[test]
    fn host_state_transitions() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("control.db")).unwrap();
        store.insert_provisioning_token(&token("tok_a")).unwrap();
        store.insert_host(&host("hst_a", "tok_a")).unwrap();
        let telemetry = Telemetry {
            agent_version: "1.2.3".into(),
            ..Default::default()
        };
        assert!(store.set_host_connected("hst_a", &telemetry, 100).unwrap());
        let h = store.host("hst_a").unwrap().unwrap();
        assert_eq!(h.status, HostStatus::Connected);
        assert_eq!(h.telemetry.agent_version, "1.2.3");
        assert_eq!(h.last_seen_ms, 100);
        store.record_heartbeat("hst_a", None, 150).unwrap();
        assert_eq!(store.host("hst_a").unwrap().unwrap().last_seen_ms, 150);
        store.set_host_disconnected("hst_a", 160).unwrap();
        assert_eq!(
            store.host("hst_a").unwrap().unwrap().status,
            HostStatus::Disconnected
        );
        assert!(store.set_host_connected("hst_a", &telemetry, 170).unwrap());
        assert_eq!(store.disconnect_all(180).unwrap(), 1);
        assert_eq!(
            store.host("hst_a").unwrap().unwrap().status,
            HostStatus::Disconnected
        );

        let revoked = store
            .revoke_host("hst_a", "operator said so", 200)
            .unwrap()
            .unwrap();
        assert_eq!(revoked.status, HostStatus::NoToken);
        assert!(!revoked.placeable);
        assert_eq!(revoked.revoked_reason, "operator said so");
        // A revoked host can neither connect nor be marked disconnected.
        assert!(!store.set_host_connected("hst_a", &telemetry, 210).unwrap());
        store.set_host_disconnected("hst_a", 220).unwrap();
        let h = store.host("hst_a").unwrap().unwrap();
        assert_eq!(h.status, HostStatus::NoToken);
        // Revoking again keeps the first time and reason.
        let again = store.revoke_host("hst_a", "second", 300).unwrap().unwrap();
        assert_eq!(again.revoked_at_ms, 200);
        assert_eq!(again.revoked_reason, "operator said so");
        assert!(store.revoke_host("hst_none", "x", 1).unwrap().is_none());
    }

    #[test]
    fn token_revocation_takes_its_hosts_with_it() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("control.db")).unwrap();
        store.insert_provisioning_token(&token("tok_a")).unwrap();
        store.insert_provisioning_token(&token("tok_b")).unwrap();
        store.insert_host(&host("hst_1", "tok_a")).unwrap();
        store.insert_host(&host("hst_2", "tok_a")).unwrap();
        store.insert_host(&host("hst_3", "tok_b")).unwrap();
        let usage = store.provisioning_tokens(None).unwrap();
        assert_eq!(usage.len(), 2);
        assert_eq!(usage[0].hosts_enrolled, 2);

        let (tok, mut hosts) = store
            .revoke_provisioning_token("tok_a", "token revoked", 500)
            .unwrap()
            .unwrap();
        hosts.sort();
        assert_eq!(tok.revoked_at_ms, 500);
        assert_eq!(hosts, ["hst_1", "hst_2"]);
        assert_eq!(
            store.host("hst_3").unwrap().unwrap().status,
            HostStatus::Disconnected
        );
        for id in ["hst_1", "hst_2"] {
            let h = store.host(id).unwrap().unwrap();
            assert_eq!(h.status, HostStatus::NoToken);
            assert!(!h.placeable);
        }
        // Idempotent: the first revocation time stays, no host is revoked twice.
        let (tok, hosts) = store
            .revoke_provisioning_token("tok_a", "again", 900)
            .unwrap()
            .unwrap();
        assert_eq!(tok.revoked_at_ms, 500);
        assert!(hosts.is_empty());
        assert!(store
            .revoke_provisioning_token("tok_none", "x", 1)
            .unwrap()
            .is_none());
    }

    #[test]
    fn token_expiry() {
        let mut t = token("tok_a");
        assert!(!t.is_expired(19));
        assert!(t.is_expired(20));
        t.expires_at_ms = 0;
        assert!(!t.is_expired(i64::MAX));
    }

    #[test]
    fn events_append_and_tail() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("control.db")).unwrap();
        store.insert_provisioning_token(&token("tok_a")).unwrap();
        store.insert_host(&host("hst_1", "tok_a")).unwrap();
        let mut seqs = Vec::new();
        for i in 0..5 {
            let event = Event {
                kind: format!("k{i}"),
                at_ms: i,
                ..Default::default()
            };
            seqs.push(store.append_host_event("hst_1", &event).unwrap());
        }
        assert!(seqs.windows(2).all(|w| w[0] < w[1]));
        let all = store.host_events("hst_1", 0, None).unwrap();
        assert_eq!(all.len(), 5);
        assert_eq!(all[0].event.kind, "k0");
        let tail = store.host_events("hst_1", 0, Some(2)).unwrap();
        let kinds: Vec<_> = tail.iter().map(|e| e.event.kind.as_str()).collect();
        assert_eq!(kinds, ["k3", "k4"]);
        let after = store.host_events("hst_1", seqs[3], None).unwrap();
        assert_eq!(after.len(), 1);
        assert!(store.host_events("hst_other", 0, None).unwrap().is_empty());
    }

    #[test]
    fn events_beyond_retention_are_pruned_per_host() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("control.db")).unwrap();
        store.insert_provisioning_token(&token("tok_a")).unwrap();
        store.insert_host(&host("hst_1", "tok_a")).unwrap();
        store.insert_host(&host("hst_2", "tok_a")).unwrap();
        store.append_host_event("hst_2", &Event::default()).unwrap();
        let total = EVENTS_KEPT_PER_HOST + 2 * PRUNE_EVERY;
        for _ in 0..total {
            store.append_host_event("hst_1", &Event::default()).unwrap();
        }
        let kept = store.host_events("hst_1", 0, None).unwrap();
        assert!(
            kept.len() as u64 <= EVENTS_KEPT_PER_HOST + PRUNE_EVERY,
            "{}",
            kept.len()
        );
        assert!(kept.len() as u64 >= EVENTS_KEPT_PER_HOST, "{}", kept.len());
        // The newest survive; another host's are untouched.
        assert_eq!(kept.last().unwrap().seq, total + 1);
        assert_eq!(store.host_events("hst_2", 0, None).unwrap().len(), 1);
    }

    fn sandbox(id: &str, host_id: &str, status: SandboxStatus) -> Sandbox {
        Sandbox {
            id: id.to_owned(),
            cluster_id: DEFAULT_CLUSTER_ID.to_owned(),
            host_id: host_id.to_owned(),
            name: format!("{id}-name"),
            image: "gstacks-test/busybox:1".into(),
            image_digest: String::new(),
            blueprint_id: String::new(),
            status,
            status_message: String::new(),
            container_id: String::new(),
            container_name: String::new(),
            addresses: Vec::new(),
            docker_network: String::new(),
            tags: vec!["web".into()],
            traits: vec!["docker".into()],
            volumes: vec![VolumeMount {
                host_path: "/srv/data".into(),
                container_path: "/data".into(),
                read_only: true,
            }],
            repo: SandboxRepo::default(),
            memory_bytes: 512 << 20,
            millicpus: 1500,
            created_by: "op_1".into(),
            created_at_ms: 10,
            updated_at_ms: 10,
            archived_at_ms: 0,
        }
    }

    #[test]
    fn sandboxes_round_trip_filter_and_update() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("control.db")).unwrap();
        store.insert_provisioning_token(&token("tok_a")).unwrap();
        store.insert_host(&host("hst_1", "tok_a")).unwrap();
        store.insert_host(&host("hst_2", "tok_a")).unwrap();
        let mut a = sandbox("sbx_a", "hst_1", SandboxStatus::Running);
        a.addresses = vec!["10.213.0.2".into()];
        a.repo = SandboxRepo {
            url: "git://127.0.0.1/app.git".into(),
            branch: "main".into(),
            path: "/workspace/app".into(),
            status: "pending".into(),
            error: String::new(),
        };
        store.insert_sandbox(&a).unwrap();
        let mut b = sandbox("sbx_b", "hst_2", SandboxStatus::Archived);
        b.tags = vec!["db".into()];
        b.created_at_ms = 20;
        store.insert_sandbox(&b).unwrap();
        assert_eq!(store.sandbox("sbx_a").unwrap().unwrap(), a);
        assert!(store.sandbox("sbx_none").unwrap().is_none());
        // A duplicate id is refused.
        assert!(store.insert_sandbox(&a).is_err());

        let ids = |filter: SandboxFilter| -> Vec<String> {
            store
                .sandboxes(&filter)
                .unwrap()
                .into_iter()
                .map(|s| s.id)
                .collect()
        };
        assert_eq!(ids(SandboxFilter::default()), ["sbx_a", "sbx_b"]);
        assert_eq!(ids(SandboxFilter::live()), ["sbx_a"]);
        assert_eq!(ids(SandboxFilter::on_host("hst_2")), ["sbx_b"]);
        let tagged = SandboxFilter {
            tag: Some("db".into()),
            ..SandboxFilter::default()
        };
        assert_eq!(ids(tagged), ["sbx_b"]);
        let running = SandboxFilter {
            statuses: vec![SandboxStatus::Running],
            ..SandboxFilter::default()
        };
        assert_eq!(ids(running), ["sbx_a"]);
        let other_cluster = SandboxFilter {
            cluster_id: Some("cls_other".into()),
            ..SandboxFilter::default()
        };
        assert!(ids(other_cluster).is_empty());

        a.status = SandboxStatus::Stopped;
        a.container_id = "c0ffee".into();
        a.container_name = "gstacks-sbx_a".into();
        a.updated_at_ms = 30;
        assert!(store.update_sandbox(&a).unwrap());
        assert_eq!(store.sandbox("sbx_a").unwrap().unwrap(), a);
        let mut ghost = a.clone();
        ghost.id = "sbx_ghost".into();
        assert!(!store.update_sandbox(&ghost).unwrap());

        // Rediscovery's fallback: by container id, then by name.
        let by_id = store.sandbox_by_container("c0ffee", "").unwrap().unwrap();
        assert_eq!(by_id.id, "sbx_a");
        let by_name = store
            .sandbox_by_container("other", "gstacks-sbx_a")
            .unwrap()
            .unwrap();
        assert_eq!(by_name.id, "sbx_a");
        assert!(store
            .sandbox_by_container("nope", "nope")
            .unwrap()
            .is_none());
        assert!(store.sandbox_by_container("", "").unwrap().is_none());
    }

    #[test]
    fn sandbox_history_appends_and_tails() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("control.db")).unwrap();
        store.insert_provisioning_token(&token("tok_a")).unwrap();
        store.insert_host(&host("hst_1", "tok_a")).unwrap();
        store
            .insert_sandbox(&sandbox("sbx_a", "hst_1", SandboxStatus::Provisioning))
            .unwrap();
        for kind in ["sandbox.created", "sandbox.started", "sandbox.stopped"] {
            let event = Event {
                kind: kind.into(),
                ..Default::default()
            };
            store.append_sandbox_event("sbx_a", &event).unwrap();
        }
        let all = store.sandbox_events("sbx_a", 0, None).unwrap();
        let kinds: Vec<_> = all.iter().map(|e| e.event.kind.as_str()).collect();
        assert_eq!(
            kinds,
            ["sandbox.created", "sandbox.started", "sandbox.stopped"]
        );
        let last = store.sandbox_events("sbx_a", 0, Some(1)).unwrap();
        assert_eq!(last[0].event.kind, "sandbox.stopped");
        assert_eq!(
            store
                .sandbox_events("sbx_a", all[0].seq, None)
                .unwrap()
                .len(),
            2
        );
        // History belongs to an existing sandbox.
        assert!(store
            .append_sandbox_event("sbx_none", &Event::default())
            .is_err());
    }

    #[test]
    fn sandbox_status_names_round_trip() {
        for status in SandboxStatus::ALL {
            assert_eq!(SandboxStatus::parse(status.as_str()), Some(status));
        }
        assert_eq!(SandboxStatus::parse("deleted"), None);
        assert!(SandboxStatus::Provisioning.is_active());
        assert!(!SandboxStatus::Archived.is_active());
    }

    #[test]
    fn operator_tokens_by_description() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("control.db")).unwrap();
        for (id, desc) in [("op_1", "dev"), ("op_2", "first start")] {
            store
                .insert_operator_token(&OperatorToken {
                    id: id.into(),
                    description: desc.into(),
                    secret_hash: "ef".repeat(32),
                    created_at_ms: 1,
                    revoked_at_ms: 0,
                })
                .unwrap();
        }
        assert_eq!(store.active_operator_tokens().unwrap().len(), 2);
        assert_eq!(store.revoke_operator_tokens_described("dev", 5).unwrap(), 1);
        let active = store.active_operator_tokens().unwrap();
        assert_eq!(active.len(), 1);
        assert_eq!(active[0].id, "op_2");
        assert_eq!(
            store.operator_token("op_1").unwrap().unwrap().revoked_at_ms,
            5
        );
    }

    #[test]
    fn mesh_api_tokens_are_revoked_by_description() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("control.db")).unwrap();
        for (id, description) in [("mat_1", "dev"), ("mat_2", "dev"), ("mat_3", "ci")] {
            store
                .insert_mesh_api_token(&super::super::mesh::MeshApiToken {
                    id: id.into(),
                    secret_hash: "h".into(),
                    description: description.into(),
                    created_at_ms: 1,
                    revoked_at_ms: 0,
                })
                .unwrap();
        }
        assert_eq!(store.revoke_mesh_api_tokens_described("dev", 7).unwrap(), 2);
        // Already revoked tokens keep their first revocation time.
        assert_eq!(store.revoke_mesh_api_tokens_described("dev", 9).unwrap(), 0);
        assert_eq!(
            store
                .mesh_api_token("mat_1")
                .unwrap()
                .unwrap()
                .revoked_at_ms,
            7
        );
        assert_eq!(
            store
                .mesh_api_token("mat_3")
                .unwrap()
                .unwrap()
                .revoked_at_ms,
            0
        );
    }
}
