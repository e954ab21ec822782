//! What a node reports about itself: peers, traffic and dropped packets.

use std::fmt;
use std::net::SocketAddr;
use std::time::Instant;

use crate::key::PublicKey;

/// Why a packet was dropped. Received datagrams that fail any check are
/// dropped silently (never answered, except by a WireGuard cookie reply when
/// under load) and counted under one of these reasons.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DropReason {
    /// Not a WireGuard message: wrong type, wrong length, truncated.
    Malformed,
    /// A MAC, AEAD tag or key did not verify: forged or corrupted.
    Unauthenticated,
    /// A replayed transport counter or handshake timestamp.
    Replayed,
    /// A valid handshake from a key that is not one of our peers.
    UnknownPeer,
    /// A message for a receiver index that no peer holds.
    UnknownIndex,
    /// A transport message for a session we do not have.
    NoSession,
    /// A transport message for a session older than REJECT_AFTER_TIME.
    SessionExpired,
    /// A handshake response or cookie that matches no handshake in progress.
    UnexpectedMessage,
    /// Handshakes over the rate limit from a sender that gave no address.
    UnderLoad,
    /// An inner packet whose source is outside the sending peer's allowed IPs.
    SourceNotAllowed,
    /// An inner packet not addressed to one of this node's addresses.
    NotForUs,
    /// An inner packet that is not IPv4 or IPv6 or whose header is invalid.
    BadInnerPacket,
    /// The inner receive queue was full (the stack is not keeping up).
    QueueFull,
    /// Outbound: no peer's allowed IPs contain the destination.
    NoRoute,
    /// Outbound: the peer for the destination has no known endpoint.
    NoEndpoint,
}

impl DropReason {
    pub const ALL: [DropReason; 15] = [
        DropReason::Malformed,
        DropReason::Unauthenticated,
        DropReason::Replayed,
        DropReason::UnknownPeer,
        DropReason::UnknownIndex,
        DropReason::NoSession,
        DropReason::SessionExpired,
        DropReason::UnexpectedMessage,
        DropReason::UnderLoad,
        DropReason::SourceNotAllowed,
        DropReason::NotForUs,
        DropReason::BadInnerPacket,
        DropReason::QueueFull,
        DropReason::NoRoute,
        DropReason::NoEndpoint,
    ];

    /// A stable snake_case name for logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::Malformed => "malformed",
            DropReason::Unauthenticated => "unauthenticated",
            DropReason::Replayed => "replayed",
            DropReason::UnknownPeer => "unknown_peer",
            DropReason::UnknownIndex => "unknown_index",
            DropReason::NoSession => "no_session",
            DropReason::SessionExpired => "session_expired",
            DropReason::UnexpectedMessage => "unexpected_message",
            DropReason::UnderLoad => "under_load",
            DropReason::SourceNotAllowed => "source_not_allowed",
            DropReason::NotForUs => "not_for_us",
            DropReason::BadInnerPacket => "bad_inner_packet",
            DropReason::QueueFull => "queue_full",
            DropReason::NoRoute => "no_route",
            DropReason::NoEndpoint => "no_endpoint",
        }
    }
}

impl fmt::Display for DropReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Counters of dropped packets, one per [`DropReason`].
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Drops {
    counts: [u64; DropReason::ALL.len()],
}

impl Drops {
    pub fn get(&self, reason: DropReason) -> u64 {
        self.counts[reason as usize]
    }

    pub fn total(&self) -> u64 {
        self.counts.iter().sum()
    }

    /// The reasons with a non-zero count.
    pub fn iter(&self) -> impl Iterator<Item = (DropReason, u64)> + '_ {
        DropReason::ALL
            .iter()
            .map(|r| (*r, self.get(*r)))
            .filter(|(_, n)| *n > 0)
    }

    pub(crate) fn add(&mut self, reason: DropReason) {
        self.counts[reason as usize] += 1;
    }

    pub(crate) fn merge(&mut self, other: &Drops) {
        for (mine, theirs) in self.counts.iter_mut().zip(other.counts.iter()) {
            *mine += theirs;
        }
    }
}

impl fmt::Debug for Drops {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map()
            .entries(self.iter().map(|(reason, n)| (reason.as_str(), n)))
            .finish()
    }
}

/// One peer as the node sees it.
#[derive(Debug, Clone)]
pub struct PeerStatus {
    pub public_key: PublicKey,
    /// The configured endpoint, or the last one an authenticated packet came from.
    pub endpoint: Option<SocketAddr>,
    /// When the last handshake completed (in the node's clock).
    pub last_handshake: Option<Instant>,
    /// Inner bytes received from and sent to this peer.
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    /// Packets from or for this peer that were dropped, by reason.
    pub drops: Drops,
}

/// A snapshot of a node.
#[derive(Debug, Clone)]
pub struct Status {
    pub public_key: PublicKey,
    pub peers: Vec<PeerStatus>,
    /// Drops not attributable to a peer (malformed datagrams, unknown keys
    /// and indexes, outbound packets without a route).
    pub drops: Drops,
}

impl Status {
    pub fn peer(&self, key: &PublicKey) -> Option<&PeerStatus> {
        self.peers.iter().find(|p| &p.public_key == key)
    }

    /// All drops, node-level and per peer.
    pub fn total_drops(&self) -> Drops {
        let mut all = self.drops.clone();
        for peer in &self.peers {
            all.merge(&peer.drops);
        }
        all
    }
}
