//! The embedded mesh node: userspace WireGuard (boringtun) and a userspace
//! TCP/IP stack (smoltcp), with no TUN device, no root and no kernel module.
//!
//! This crate knows nothing about networks, aliases or the control plane: it
//! moves bytes between overlay addresses of authenticated peers.

pub mod config;
mod key;

pub use key::{KeyError, PresharedKey, PrivateKey, PublicKey};
