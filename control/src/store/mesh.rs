//! Laptop mesh records (`gstacks mesh join`): mesh API tokens, pre-auth
//! keys and node credentials. Only SHA-256 hashes of the secrets are kept.

/// A token for `MeshControl.CreatePreAuthKey` (`gstacks-control mesh-api-token`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MeshApiToken {
    /// `mat_...`
    pub id: String,
    pub secret_hash: String,
    pub description: String,
    pub created_at_ms: i64,
    /// 0 = not revoked.
    pub revoked_at_ms: i64,
}

/// A pre-auth key a node registers with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PreAuthKey {
    /// `pak_...`
    pub id: String,
    pub secret_hash: String,
    /// The network it may join; empty = any.
    pub network: String,
    /// GLOBALSTACKS_MESH_USER of whoever minted it; recorded with the node.
    pub user: String,
    /// Usable until it expires (a fleet key); otherwise once.
    pub reusable: bool,
    /// Lifetime of the credential of a node registered with it (0 = the
    /// node asks).
    pub node_ttl_ms: i64,
    pub created_at_ms: i64,
    pub expires_at_ms: i64,
    /// 0 = never used.
    pub used_at_ms: i64,
}

/// A laptop node's credential (one per node).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeCredential {
    pub node_id: String,
    pub secret_hash: String,
    pub network: String,
    pub hostname: String,
    pub user: String,
    pub created_at_ms: i64,
    pub expires_at_ms: i64,
    /// 0 = not revoked. A revoked or expired node is out of the mesh; its
    /// credential row stays so that its owner hears why.
    pub revoked_at_ms: i64,
    /// Why it was taken out of the mesh: "revoked" or "expired" ("" while live).
    pub ended: String,
}

/// What [`crate::store::Store::register_local_node`] writes in one transaction.
#[derive(Debug, Clone)]
pub struct LocalRegistration {
    pub key_id: String,
    pub node_id: String,
    pub network: String,
    pub public_key: String,
    pub endpoint: String,
    pub credential: NodeCredential,
}

/// The outcome of a registration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Registered {
    /// The node and the new topology version.
    Joined(super::MeshNode, u64),
    /// The single-use key was used in the meantime.
    KeyUsed,
}
