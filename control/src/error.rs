//! The control plane's one error type.

use std::path::PathBuf;

/// Everything that can fail in the control plane, naming the input.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("store {path}: {source}")]
    StoreOpen {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    #[error("store: {0}")]
    Store(#[from] rusqlite::Error),
    #[error("store {path} has schema version {found}, newer than this gstacks-control knows ({known}); upgrade gstacks-control")]
    StoreTooNew {
        path: PathBuf,
        found: u32,
        known: u32,
    },
    #[error("store: stored {what} `{id}` cannot be decoded: {reason}")]
    StoreCorrupt {
        what: &'static str,
        id: String,
        reason: String,
    },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("TLS: {0}")]
    Tls(String),
    #[error("cluster `{0}` not found")]
    ClusterNotFound(String),
    #[error("cluster `{id}` is a {kind} cluster; only BYO clusters accept provisioning tokens")]
    ClusterNotByo { id: String, kind: String },
    #[error("provisioning token `{0}` not found")]
    TokenNotFound(String),
    #[error("host `{0}` not found")]
    HostNotFound(String),
    #[error("host `{id}` is not connected (status {status})")]
    HostNotConnected { id: String, status: &'static str },
    #[error("host `{host}` did not answer request {request_id} within {deadline_ms} ms")]
    CommandTimeout {
        host: String,
        request_id: String,
        deadline_ms: u64,
    },
    #[error("host `{host}` answered request {request_id} with an error: {message}")]
    Agent {
        host: String,
        request_id: String,
        code: proto::ErrorCode,
        message: String,
    },
    #[error("the stream of host `{0}` closed before it answered")]
    SessionClosed(String),
    #[error("sandbox `{0}` not found")]
    SandboxNotFound(String),
    #[error("sandbox `{id}` is archived and cannot be {action}")]
    SandboxArchived { id: String, action: String },
    #[error("sandbox `{id}` has no container (status {status}); reprovision it")]
    SandboxNoContainer { id: String, status: &'static str },
    #[error("sandbox `{sandbox}` cannot be {action}: its host `{host}` is {status}, so the runtime cannot confirm it; try again once the host is connected")]
    SandboxHostUnavailable {
        sandbox: String,
        host: String,
        status: &'static str,
        action: String,
    },
    #[error("no such blueprint `{0}`")]
    BlueprintNotFound(String),
    #[error("{0}")]
    NoHost(String),
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    #[error("listen address `{addr}`: {source}")]
    Listen {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("gRPC server: {0}")]
    Serve(String),
    #[error("local agent: {0}")]
    LocalAgent(String),
    #[error("{0}")]
    Model(#[from] policy::ModelError),
    #[error("network `{0}` not found")]
    NetworkNotFound(String),
    #[error("network `{0}` already exists")]
    NetworkExists(String),
    #[error(
        "sandbox `{sandbox}` is {status}; only a sandbox that is not archived can be attached"
    )]
    SandboxNotAttachable { sandbox: String, status: String },
    #[error("sandbox `{sandbox}` is not attached to network `{network}`; attach it first with `gstacks network attach {network} {sandbox}`")]
    SandboxNotAttached { sandbox: String, network: String },
    #[error("sandbox `{sandbox}` is already attached to network `{network}`; add more aliases with `gstacks network alias add`")]
    SandboxAlreadyAttached { sandbox: String, network: String },
    #[error(
        "alias `{alias}` already exists in network `{network}` (published by sandbox `{sandbox}`)"
    )]
    AliasExists {
        alias: String,
        network: String,
        sandbox: String,
    },
    #[error("alias `{alias}` not found in network `{network}`")]
    AliasNotFound { alias: String, network: String },
    #[error("policy rule `{id}` not found in network `{network}`")]
    PolicyRuleNotFound { id: String, network: String },
    #[error("rule `{id}` in network `{network}` already allows {what}")]
    PolicyRuleExists {
        id: String,
        network: String,
        what: String,
    },
    #[error("the overlay address range 100.64.0.0/10 is exhausted")]
    OverlayExhausted,
}

impl From<ControlError> for tonic::Status {
    fn from(err: ControlError) -> Self {
        let msg = err.to_string();
        match err {
            ControlError::ClusterNotFound(_)
            | ControlError::TokenNotFound(_)
            | ControlError::HostNotFound(_)
            | ControlError::SandboxNotFound(_)
            | ControlError::BlueprintNotFound(_) => tonic::Status::not_found(msg),
            ControlError::ClusterNotByo { .. }
            | ControlError::HostNotConnected { .. }
            | ControlError::SandboxArchived { .. }
            | ControlError::SandboxNoContainer { .. }
            | ControlError::SandboxHostUnavailable { .. }
            | ControlError::NoHost(_) => tonic::Status::failed_precondition(msg),
            ControlError::InvalidArgument(_) => tonic::Status::invalid_argument(msg),
            ControlError::Model(_) => tonic::Status::invalid_argument(msg),
            ControlError::NetworkNotFound(_)
            | ControlError::AliasNotFound { .. }
            | ControlError::PolicyRuleNotFound { .. } => tonic::Status::not_found(msg),
            ControlError::NetworkExists(_)
            | ControlError::AliasExists { .. }
            | ControlError::SandboxAlreadyAttached { .. }
            | ControlError::PolicyRuleExists { .. } => tonic::Status::already_exists(msg),
            ControlError::SandboxNotAttachable { .. }
            | ControlError::SandboxNotAttached { .. }
            | ControlError::OverlayExhausted => tonic::Status::failed_precondition(msg),
            ControlError::CommandTimeout { .. } => tonic::Status::deadline_exceeded(msg),
            ControlError::SessionClosed(_) => tonic::Status::unavailable(msg),
            ControlError::Agent { code, .. } => match code {
                proto::ErrorCode::PermissionDenied => tonic::Status::permission_denied(msg),
                proto::ErrorCode::InvalidArgument => tonic::Status::invalid_argument(msg),
                proto::ErrorCode::NotFound => tonic::Status::not_found(msg),
                proto::ErrorCode::Unsupported => tonic::Status::unimplemented(msg),
                _ => tonic::Status::failed_precondition(msg),
            },
            _ => {
                tracing::warn!(error = %msg, "internal error");
                tonic::Status::internal(msg)
            }
        }
    }
}

pub type Result<T, E = ControlError> = std::result::Result<T, E>;
