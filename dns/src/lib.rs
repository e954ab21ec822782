//! Agent DNS: answers `<alias>.<network>.gstacks` from a live record table
//! and forwards every other name to the host's resolvers.
//!
//! This crate owns no policy: it only says where an alias's local proxy
//! listener is.
//!
//! - [`Records`] is the live table: the agent builds a [`RecordTable`] from
//!   each netmap and swaps it in with [`Records::replace`]; every query reads
//!   the current table without waiting for a writer.
//! - [`DnsHandler`] is a hickory-server `RequestHandler` that owns no sockets:
//!   known names get A/AAAA (authoritative, TTL [`RECORD_TTL_SECS`]), unknown
//!   names under `.gstacks` get NXDOMAIN, other names go to the [`Upstream`]
//!   resolvers and their answer is relayed as it came (SERVFAIL if none
//!   answered).
//! - [`DnsServer`] serves the handler on one address over UDP and TCP with
//!   hickory's `Server`; the agent binds one per address it serves
//!   (`127.0.0.1:1053`, and port 53 of the container-reachable address).

mod fast;
mod handler;
mod records;
mod server;
mod upstream;

use std::{io, net::SocketAddr, path::PathBuf};

pub use handler::{DnsHandler, DnsStats, RECORD_TTL_SECS};
pub use records::{ListenerAddrs, RecordTable, Records, DNS_SUFFIX};
pub use server::DnsServer;
pub use upstream::{Upstream, DEFAULT_ATTEMPT_TIMEOUT, MAX_IN_FLIGHT};

/// Everything that can fail in the agent DNS.
#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    #[error("invalid {kind} `{label}` for a DNS name: {reason}")]
    InvalidLabel {
        kind: &'static str,
        label: String,
        reason: &'static str,
    },
    #[error("DNS record `{name}` is listed twice")]
    DuplicateRecord { name: String },
    #[error("DNS record `{name}` has neither an IPv4 nor an IPv6 address")]
    NoAddress { name: String },
    #[error("cannot bind the DNS UDP socket on {addr}: {source}")]
    BindUdp {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("cannot bind the DNS TCP listener on {addr}: {source}")]
    BindTcp {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("DNS server on {addr} stopped with an error: {message}")]
    Serve { addr: SocketAddr, message: String },
    #[error("cannot read resolver configuration {}: {source}", path.display())]
    ReadResolvConf {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("resolver configuration {} names no usable nameserver", path.display())]
    NoNameserver { path: PathBuf },
    #[error("upstream DNS server {server} did not answer within {timeout_ms} ms")]
    UpstreamTimeout {
        server: SocketAddr,
        timeout_ms: u128,
    },
    #[error("upstream DNS server {server}: {source}")]
    UpstreamIo {
        server: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("upstream DNS server {server} sent a bad response: {reason}")]
    UpstreamBadResponse { server: SocketAddr, reason: String },
    #[error("no upstream DNS server is configured")]
    NoUpstream,
    #[error("too many queries are waiting for upstream DNS servers ({limit})")]
    UpstreamBusy { limit: usize },
}
