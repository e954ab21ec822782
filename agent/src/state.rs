//! The agent's state dir: the stream credential it got at enrollment.
//!
//! `credential.json` holds the host id and the stream credential. It is
//! written atomically and never readable by anyone but its owner: a temp file
//! is created with mode 0600 (`O_CREAT|O_EXCL`), written, synced and renamed
//! over the old one, and the directory is synced. A crash leaves either the
//! old file or the new one, never half of one.

use std::fmt;
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::config::Secret;
use crate::error::AgentError;

pub const CREDENTIAL_FILE: &str = "credential.json";

/// What enrollment gave this host. `Debug` redacts the credential.
#[derive(Clone, PartialEq, Eq)]
pub struct Credential {
    pub host_id: String,
    pub cluster_id: String,
    pub host_name: String,
    pub stream_credential: Secret,
}

impl fmt::Debug for Credential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credential")
            .field("host_id", &self.host_id)
            .field("cluster_id", &self.cluster_id)
            .field("host_name", &self.host_name)
            .field("stream_credential", &self.stream_credential)
            .finish()
    }
}

#[derive(Serialize, Deserialize)]
struct CredentialFile {
    host_id: String,
    #[serde(default)]
    cluster_id: String,
    #[serde(default)]
    host_name: String,
    stream_credential: String,
}

/// Path of the credential file in a state dir.
pub fn credential_path(state_dir: &Path) -> PathBuf {
    state_dir.join(CREDENTIAL_FILE)
}

/// Creates the state dir (0700) if it does not exist.
pub fn ensure_state_dir(state_dir: &Path) -> Result<(), AgentError> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(state_dir)
        .map_err(|e| AgentError::io("creating state dir", state_dir, e))
}

/// The stored credential, or `None` when the host has not enrolled yet.
pub fn load_credential(state_dir: &Path) -> Result<Option<Credential>, AgentError> {
    let path = credential_path(state_dir);
    let text = match fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(AgentError::io("reading credential file", path, e)),
    };
    if let Ok(meta) = fs::metadata(&path) {
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            tracing::warn!(path = %path.display(), mode = format!("{mode:o}"), "credential file is readable by others; expected 0600");
        }
    }
    let file: CredentialFile =
        serde_json::from_str(&text).map_err(|e| AgentError::StateCorrupt {
            path: path.clone(),
            message: format!("not the JSON the agent writes: {e}"),
        })?;
    for (name, value) in [
        ("host_id", &file.host_id),
        ("stream_credential", &file.stream_credential),
    ] {
        if value.trim().is_empty() {
            return Err(AgentError::StateCorrupt {
                path,
                message: format!("`{name}` is empty"),
            });
        }
    }
    Ok(Some(Credential {
        host_id: file.host_id,
        cluster_id: file.cluster_id,
        host_name: file.host_name,
        stream_credential: Secret::new(file.stream_credential),
    }))
}

/// Writes the credential atomically with mode 0600.
pub fn store_credential(state_dir: &Path, credential: &Credential) -> Result<(), AgentError> {
    ensure_state_dir(state_dir)?;
    let path = credential_path(state_dir);
    let body = serde_json::to_vec_pretty(&CredentialFile {
        host_id: credential.host_id.clone(),
        cluster_id: credential.cluster_id.clone(),
        host_name: credential.host_name.clone(),
        stream_credential: credential.stream_credential.expose().to_owned(),
    })
    .map_err(|e| AgentError::StateCorrupt {
        path: path.clone(),
        message: format!("cannot encode: {e}"),
    })?;
    write_private_file(&path, &body)
}

/// Atomic replace of `path` with `body`, the file created 0600.
pub fn write_private_file(path: &Path, body: &[u8]) -> Result<(), AgentError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("state");
    let tmp = dir.join(format!(".{name}.tmp.{}", std::process::id()));
    // A temp file left by a crashed run of this same pid would block create_new.
    let _ = fs::remove_file(&tmp);
    let result = (|| {
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        file.write_all(body)?;
        file.sync_all()?;
        fs::rename(&tmp, path)?;
        fs::File::open(dir)?.sync_all()
    })();
    result.map_err(|e| {
        let _ = fs::remove_file(&tmp);
        AgentError::io("writing state file", path, e)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn credential() -> Credential {
        Credential {
            host_id: "host_1".into(),
            cluster_id: "cls_default".into(),
            host_name: "web-1".into(),
            stream_credential: Secret::new("gsc_streamsecret"),
        }
    }

    #[test]
    fn missing_file_means_not_enrolled() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(load_credential(dir.path()).unwrap(), None);
    }

    #[test]
    fn round_trip_with_mode_0600() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("nested/state");
        store_credential(&state, &credential()).unwrap();
        let path = credential_path(&state);
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "credential file mode {mode:o}");
        let dir_mode = fs::metadata(&state).unwrap().permissions().mode() & 0o777;
        assert_eq!(dir_mode, 0o700, "state dir mode {dir_mode:o}");
        assert_eq!(load_credential(&state).unwrap(), Some(credential()));
        // Overwriting keeps the mode and leaves no temp file behind.
        let mut other = credential();
        other.host_id = "host_2".into();
        store_credential(&state, &other).unwrap();
        assert_eq!(load_credential(&state).unwrap().unwrap().host_id, "host_2");
        let names: Vec<_> = fs::read_dir(&state)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names, [CREDENTIAL_FILE]);
    }

    #[test]
    fn corrupt_file_is_a_clear_error_and_is_not_touched() {
        let dir = tempfile::tempdir().unwrap();
        let path = credential_path(dir.path());
        fs::write(&path, "{\"host_id\": 3").unwrap();
        let err = load_credential(dir.path()).unwrap_err().to_string();
        assert!(err.contains("credential.json"), "{err}");
        assert_eq!(fs::read_to_string(&path).unwrap(), "{\"host_id\": 3");
        fs::write(&path, r#"{"host_id":"h","stream_credential":" "}"#).unwrap();
        let err = load_credential(dir.path()).unwrap_err().to_string();
        assert!(err.contains("stream_credential"), "{err}");
    }

    #[test]
    fn debug_redacts_the_credential() {
        let debug = format!("{:?}", credential());
        assert!(!debug.contains("streamsecret"), "{debug}");
        assert!(debug.contains("host_1"));
    }
}
