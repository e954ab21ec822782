//! The `agent_proxy` data path: per-alias listeners on the source agent, the
//! policy check at both ends, the dial over the mesh with a small header, and
//! the splice into the target sandbox.
//!
//! This crate parses no config and reads no environment: the agent hands it
//! addresses and tables.
//!
//! - [`MeshHeader`] / [`Response`]: the codec of the mesh header and the
//!   target's answer.
//! - [`splice`]: copy both ways with half-close.
//! - [`dial_over_mesh`] (source side) and [`accept_from_mesh`] (target side).

mod header;
mod mesh;
mod splice;

pub use header::{MeshHeader, Response, MAGIC, MAX_HEADER, MAX_NAME, MAX_REASON, VERSION};
pub use mesh::{
    accept_from_mesh, dial_over_mesh, refusal, Admission, MeshStream, HEADER_TIMEOUT,
    MAX_MESH_CONNECTIONS, MESH_PROXY_PORT,
};
pub use splice::{splice, splice_until, Spliced, SPLICE_BUFFER};

/// What went wrong on the proxy path, naming the input.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("bad mesh header magic {0:02x?} (expected \"GSMH\")")]
    BadMagic([u8; 4]),
    #[error("unsupported mesh header version {0} (this agent speaks 2)")]
    UnsupportedVersion(u8),
    #[error("mesh header of {len} bytes is longer than the limit of 4096")]
    HeaderTooLong { len: usize },
    #[error("mesh message truncated in the {0}")]
    Truncated(&'static str),
    #[error("mesh header has {0} bytes after its last field")]
    TrailingBytes(usize),
    #[error("mesh header: {0}")]
    BadLabel(#[from] policy::ModelError),
    #[error("mesh header: {field} `{value}` is not valid: {why}")]
    BadField {
        field: &'static str,
        value: String,
        why: &'static str,
    },
    #[error("mesh header: {count} {field}, at most 255 are allowed")]
    TooMany { field: &'static str, count: usize },
    #[error("unknown mesh answer status {0} (expected 0, 1 or 2)")]
    BadAnswer(u8),
    #[error("no mesh header within {0:?}")]
    HeaderTimeout(std::time::Duration),
    #[error("the target agent denied the connection: {reason}")]
    Denied { reason: String },
    #[error("the target agent could not reach the sandbox: {reason}")]
    Unreachable { reason: String },
    #[error("mesh: {0}")]
    Mesh(#[from] netstack::NetstackError),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}
