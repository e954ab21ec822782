//! The embedded mesh node: userspace WireGuard (boringtun) and a userspace
//! TCP/IP stack (smoltcp), with no TUN device, no root and no kernel module.
//!
//! This crate knows nothing about networks, aliases or the control plane: it
//! moves bytes between overlay addresses of authenticated peers.
//!
//! - [`Node`] is the sans-IO core: datagrams and the time in, datagrams and
//!   the next deadline out. Tests run several of them over a simulated link
//!   with a virtual clock.
//! - [`MeshNode`] is the tokio driver: one task owns the `Node`, its UDP
//!   socket and one timer; [`TcpStream`], [`TcpListener`] and [`UdpSocket`]
//!   are the handles applications use.

//!
//! Unsafe code is denied here, as everywhere in the workspace, except in
//! `buffers`: the socket rings live in memory the node maps itself, so that
//! an idle connection can give its pages back (smoltcp keeps a socket's
//! buffers for its whole life). That module states its invariants.

mod buffers;
pub mod config;
mod device;
mod driver;
mod key;
mod node;
mod status;
mod tunnel;
mod wire_socket;

use std::net::{IpAddr, SocketAddr};

pub use device::MTU;
pub use driver::{MeshNode, TcpListener, TcpStream, UdpSocket, CONNECT_TIMEOUT};
pub use key::{KeyError, PresharedKey, PrivateKey, PublicKey};
pub use node::{
    BufferMemory, ConnectState, Node, NodeConfig, PeerConfig, SocketId, Transmit, ACCEPT_BACKLOG,
    TCP_BUFFER,
};
pub use status::{DropReason, Drops, PeerStatus, Status};
pub use tunnel::{
    KEEPALIVE_TIMEOUT, REJECT_AFTER_TIME, REKEY_AFTER_TIME, REKEY_ATTEMPT_TIME, REKEY_TIMEOUT,
};

/// What went wrong in the mesh node, naming the input.
#[derive(Debug, thiserror::Error)]
pub enum NetstackError {
    #[error("node addresses {0:?}: need one IPv4 and/or one IPv6 address, at most one of each")]
    Addresses(Vec<IpAddr>),
    #[error("peer {0} is this node's own key")]
    PeerIsSelf(PublicKey),
    #[error("peer {0} is listed twice")]
    DuplicatePeer(PublicKey),
    #[error("no peer's allowed IPs contain {0}")]
    NoRoute(IpAddr),
    #[error("overlay port {0} is already in use")]
    PortInUse(u16),
    #[error("no free ephemeral port for a new connection")]
    PortsExhausted,
    #[error("cannot connect to {0}: {1}")]
    Connect(SocketAddr, String),
    #[error("connection to {0} refused or reset")]
    ConnectionRefused(SocketAddr),
    #[error("connection to {0} timed out")]
    ConnectTimeout(SocketAddr),
    #[error("cannot bind UDP socket {0}: {1}")]
    Bind(SocketAddr, #[source] std::io::Error),
    #[error("the mesh node has shut down")]
    Shutdown,
    #[error("cannot map memory for a TCP connection's buffers: {0}")]
    Memory(#[source] std::io::Error),
}
