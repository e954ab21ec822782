//! The agent's mesh node key: made on the host on first start, kept 0600 in
//! the state dir, reused on every restart. The private key never leaves the
//! host; only its public half goes into `Hello.mesh`.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use netstack::PrivateKey;

use crate::error::AgentError;
use crate::state::{ensure_state_dir, write_private_file};

pub const NODE_KEY_FILE: &str = "mesh-node.key";

pub fn node_key_path(state_dir: &Path) -> PathBuf {
    state_dir.join(NODE_KEY_FILE)
}

/// The stored key, or a new one written 0600 (atomically) when there is none.
pub fn load_or_create_node_key(state_dir: &Path) -> Result<PrivateKey, AgentError> {
    let path = node_key_path(state_dir);
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            let mode = std::fs::metadata(&path).map_or(0, |m| m.permissions().mode() & 0o777);
            if mode & 0o077 != 0 {
                tracing::warn!(path = %path.display(), mode = format!("{mode:o}"), "mesh node key is readable by others; expected 0600");
            }
            text.trim()
                .parse::<PrivateKey>()
                .map_err(|e| AgentError::StateCorrupt {
                    path: path.clone(),
                    message: format!("not a base64 x25519 private key: {e}"),
                })
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            ensure_state_dir(state_dir)?;
            let key = PrivateKey::generate();
            write_private_file(&path, format!("{}\n", key.to_base64()).as_bytes())?;
            tracing::info!(public_key = %key.public_key(), path = %path.display(), "made a new mesh node key");
            Ok(key)
        }
        Err(e) => Err(AgentError::io("reading mesh node key", path, e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_is_made_once_0600_and_reused() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let first = load_or_create_node_key(&state).unwrap();
        let mode = std::fs::metadata(node_key_path(&state))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600);
        let again = load_or_create_node_key(&state).unwrap();
        assert_eq!(first.public_key(), again.public_key());
    }

    #[test]
    fn a_corrupt_key_file_is_named_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(node_key_path(dir.path()), "not a key").unwrap();
        let err = load_or_create_node_key(dir.path()).unwrap_err().to_string();
        assert!(err.contains(NODE_KEY_FILE), "{err}");
        assert_eq!(
            std::fs::read_to_string(node_key_path(dir.path())).unwrap(),
            "not a key"
        );
    }
}
