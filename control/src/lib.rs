//! `gstacks-control`: the GlobalStacks control plane.
//!
//! - [`store`]: the `Store` trait and its embedded SQLite implementation.
//! - [`plane`]: enrollment, credentials, revocation, host events.
//! - [`sessions`]: one handle per connected host; commands and replies.
//! - [`networks`]: runtime networks, aliases, policy, diagnostics;
//!   [`netmap`] computes a node's netmap, [`netmaps`] delivers them.
//! - [`placement`]: which host takes a new sandbox (pure logic).
//! - [`sandboxes`]: the sandbox lifecycle over the hosts' streams, history,
//!   rediscovery when an agent connects.
//! - [`agent_service`], [`api`], [`terminal`]: the gRPC services.
//! - [`server`]: TLS and the listener; [`dev`]: control plane plus a local agent.
//!
//! Invariants: no secret is stored in clear (hashes only, compared in
//! constant time); no `Debug` output shows one; this crate never reaches
//! into agent internals: it speaks the contract in `proto` only.

pub mod agent_service;
pub mod api;
pub mod clock;
pub mod dev;
pub mod error;
pub mod mesh;
pub mod netmap;
pub mod netmaps;
pub mod networks;
pub mod placement;
pub mod plane;
pub mod sandbox_io;
pub mod sandboxes;
pub mod secret;
pub mod server;
pub mod sessions;
pub mod store;
pub mod terminal;
pub mod tls;

pub use error::{ControlError, Result};
