//! `gstacks-agent`, the GlobalStacks host agent, as a library: `main.rs`
//! only parses the command line and calls [`command_line::main`].
//!
//! - [`config`]: the environment keys of the seeds, or a `KEY=VALUE` file.
//! - [`state`]: the state dir and its 0600 credential file.
//! - [`lock`]: the flock-held service lock (`service lock status/clear`).
//! - [`telemetry`]: the facts a host reports (version, arch, traits, tags).
//! - [`control_stream`]: enrollment and the ONE control-stream client.
//! - [`dispatch`]: command kinds, the module registry, typed replies.
//! - [`terminal`]: the break-glass host terminal module.
//! - [`sandbox`]: sandboxes on the container engine (the `Runtime` trait,
//!   its bollard implementation, labels, volumes, rediscovery inventory).
//! - [`network`]: mesh membership, agent DNS, alias listeners, policy.
//! - [`sandbox_io`]: sandbox logs, terminal, files, repository bootstrap.
//! - [`tls`]: a pinned-fingerprint TLS connector for the control plane.
//! - [`run`]: `gstacks-agent run`, tying the above together.

pub mod backoff;
pub mod command_line;
pub mod config;
pub mod control_stream;
pub mod dispatch;
pub mod error;
pub mod lock;
pub mod network;
pub mod run;
pub mod sandbox;
pub mod sandbox_io;
pub mod state;
pub mod telemetry;
pub mod terminal;
pub mod tls;

pub use error::AgentError;
