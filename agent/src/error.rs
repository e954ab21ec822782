//! The agent crate's one error type. Every message names the input that was
//! wrong (the config key, the file, the lock holder) so that an operator can
//! act on it without reading the source.

use std::path::PathBuf;

/// Everything that can go wrong in the agent library.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// A configuration key has a bad value (or a required one is missing).
    #[error("config `{key}`: {message}")]
    Config { key: String, message: String },

    /// A line of the config file cannot be parsed.
    #[error("config file {}: line {line}: {message}", path.display())]
    ConfigFile {
        path: PathBuf,
        line: usize,
        message: String,
    },

    /// A file or directory could not be read or written.
    #[error("{what} {}: {source}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// The state file exists but does not hold what the agent wrote.
    #[error("state file {}: {message}", path.display())]
    StateCorrupt { path: PathBuf, message: String },

    /// Another process holds the service lock.
    #[error("service lock {} is held by {holder}; another gstacks-agent is running on this host", path.display())]
    LockHeld { path: PathBuf, holder: String },

    /// `service lock clear` refused to act.
    #[error("service lock {}: {message}", path.display())]
    LockClearRefused { path: PathBuf, message: String },

    /// The state dir has no credential and no provisioning token is configured.
    #[error("no stream credential in {} and no GLOBALSTACKS_PROVISIONING_TOKEN to enroll with", state_dir.display())]
    NotEnrolled { state_dir: PathBuf },

    /// The control plane refused the provisioning token.
    #[error("enrollment refused by the control plane at {url}: {message}")]
    EnrollRefused { url: String, message: String },

    /// The control plane revoked this host's credential; the agent stops.
    #[error("the control plane at {url} refused this host's stream credential ({message}); the host was revoked. Not retrying. To enroll again, remove {} and start with a new provisioning token", state_file.display())]
    Revoked {
        url: String,
        message: String,
        state_file: PathBuf,
    },

    /// The TLS trust configuration cannot be used.
    #[error("tls: {message}")]
    Tls { message: String },

    /// A request to the control plane failed in a way worth retrying.
    #[error("control plane at {url}: {message}")]
    Transport { url: String, message: String },

    /// Something in the host terminal executor failed.
    #[error("host terminal session `{session_id}`: {message}")]
    Terminal { session_id: String, message: String },
}

impl AgentError {
    pub(crate) fn config(key: &str, message: impl Into<String>) -> Self {
        Self::Config {
            key: key.to_owned(),
            message: message.into(),
        }
    }

    pub(crate) fn io(what: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            what,
            path: path.into(),
            source,
        }
    }
}
