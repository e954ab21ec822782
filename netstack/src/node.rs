//! The sans-IO mesh node: WireGuard peers (through the `tunnel` facade) and
//! a smoltcp interface with its sockets. No sockets, no clock, no tasks: the
//! caller feeds datagrams and the time in, and takes datagrams and the next
//! deadline out.
//!
//! ```text
//! handle_udp(now, from, bytes)  -> decrypt, check, queue the inner packet
//! handle_timeout(now)           -> run the IP stack and the WireGuard timers
//! poll_transmit()               -> the next datagram to send
//! poll_timeout()                -> when to call handle_timeout again
//! ```

use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::task::Waker;
use std::time::{Duration, Instant};

use boringtun::noise::rate_limiter::RateLimiter;
use boringtun::noise::{Packet, Tunn};
use ipnet::IpNet;
use smoltcp::iface::{
    Config, Interface, PollIngressSingleResult, PollResult, SocketHandle, SocketSet,
};
use smoltcp::socket::{tcp, udp};
use smoltcp::wire::{HardwareAddress, IpAddress, IpCidr, IpEndpoint, IpListenEndpoint};

use crate::buffers::{Slot, SocketBuffers};
use crate::device::{IpQueue, QUEUE_LIMIT};
use crate::key::{PresharedKey, PrivateKey, PublicKey};
use crate::status::{DropReason, Drops, PeerStatus, Status};
use crate::tunnel::{self, InitiationCheck, Received, Tunnel};
use crate::NetstackError;

/// Receive and send buffer of each TCP connection. Larger than 64 KiB so
/// that window scaling lets one stream fill a fast path. The rings live in
/// the node's own mappings (see `buffers`): a connection costs only the
/// pages it has touched, and a parked one gives its send ring's pages back.
pub const TCP_BUFFER: usize = 256 << 10;
/// How long an ACK waits for data going the other way to ride on.
const ACK_DELAY: Duration = Duration::from_millis(5);

/// A connection with nothing in flight for this long is parked: smoltcp
/// visits every socket in its set on each poll, so thousands of idle
/// connections would otherwise slow every active one.
const PARK_AFTER: Duration = Duration::from_secs(1);

/// Listening sockets kept ready per listener; the pool is refilled before
/// every SYN, so a burst never finds the port without a listening socket.
const LISTEN_POOL: usize = 2;
/// Connections received but not yet accepted, per listener. Beyond it new
/// SYNs are refused with a reset, like a full backlog.
pub const ACCEPT_BACKLOG: usize = 4096;
/// A connection whose handle was dropped is aborted if it has not finished
/// closing after this long.
const LINGER: Duration = Duration::from_secs(30);
const UDP_PACKETS: usize = 256;
const UDP_PAYLOAD: usize = 256 * 1024;
const EPHEMERAL_PORTS: std::ops::RangeInclusive<u16> = 32768..=60999;

/// This node: its key, its overlay addresses, its UDP listen address.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    pub private_key: PrivateKey,
    /// The node's overlay addresses: one IPv4, one IPv6 (either may be absent).
    pub addresses: Vec<IpAddr>,
    /// Where the UDP socket binds (used by the driver, not by `Node`).
    pub listen: SocketAddr,
}

/// One WireGuard peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerConfig {
    pub public_key: PublicKey,
    /// Where to send; when `None`, the node learns it from the peer's first
    /// authenticated packet.
    pub endpoint: Option<SocketAddr>,
    /// Inner addresses this peer may send from, and routes to it.
    pub allowed_ips: Vec<IpNet>,
    /// Seconds between keepalives (wg-quick `PersistentKeepalive`).
    pub persistent_keepalive: Option<u16>,
    pub preshared_key: Option<PresharedKey>,
}

/// See [`Node::tcp_buffer_memory`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BufferMemory {
    pub sockets: usize,
    pub resident_bytes: usize,
}

/// A datagram to send on the node's UDP socket.
#[derive(Debug)]
pub struct Transmit {
    pub destination: SocketAddr,
    pub contents: Vec<u8>,
}

/// A TCP or UDP socket of a [`Node`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SocketId(u64);

/// How far an outgoing TCP connection got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectState {
    Connecting,
    Established,
    /// Refused (reset) or timed out.
    Failed,
}

struct Peer {
    config: PeerConfig,
    endpoint: Option<SocketAddr>,
    tunnel: Tunnel,
    drops: Drops,
}

struct Listener {
    /// Sockets in the Listen state.
    pool: Vec<SocketId>,
    /// Sockets that left the Listen state and are not accepted yet.
    pending: VecDeque<SocketId>,
    /// Tasks waiting in `accept` (several may wait on one listener).
    wakers: Vec<Waker>,
}

#[derive(Default)]
struct SocketMeta {
    /// Where the socket sits in smoltcp's set; `None` while parked.
    handle: Option<SocketHandle>,
    /// The handle was dropped: remove the socket once it is closed.
    released: bool,
    local_port: Option<u16>,
    udp: bool,
    /// Received bytes saved from a socket about to close: smoltcp clears
    /// its receive buffer when a connection reaches Closed (after LAST-ACK
    /// or TIME-WAIT), even if the application has not read it yet.
    salvaged: VecDeque<u8>,
    /// The peer's FIN was seen: reads end with `Ok(0)`, not an error.
    eof: bool,
    /// We sent FIN first: watch for TIME-WAIT to salvage unread bytes.
    half_closed: bool,
    /// The pass in which the application last read bytes: until
    /// [`ACK_DELAY`] after it, an ACK may be pending and the connection is
    /// not parked.
    read_at: Option<Instant>,
    /// The slot holding a TCP socket's rings, freed with the socket.
    buffers: Option<Slot>,
}

pub struct Node {
    private: PrivateKey,
    public: PublicKey,
    x_public: x25519_dalek::PublicKey,
    addresses: Vec<IpAddr>,
    limiter: Arc<RateLimiter>,
    peers: HashMap<u32, Peer>,
    slots: HashMap<PublicKey, u32>,
    next_slot: u32,
    /// (allowed IP network, peer slot), longest prefix first.
    routes: Vec<(IpNet, u32)>,
    drops: Drops,
    iface: Interface,
    device: IpQueue,
    sockets: SocketSet<'static>,
    meta: HashMap<SocketId, SocketMeta>,
    next_socket_id: u64,
    listeners: HashMap<u16, Listener>,
    ephemeral_in_use: HashMap<u16, SocketId>,
    next_ephemeral: u16,
    released: Vec<SocketId>,
    /// Connections we sent FIN on first (see `salvage_half_closed`).
    half_closed: Vec<SocketId>,
    /// Idle connections, moved out of the socket set (see `park_idle`); a
    /// closed placeholder without buffers keeps their handle.
    parked: HashMap<SocketId, tcp::Socket<'static>>,
    parked_by_tuple: HashMap<(IpEndpoint, IpEndpoint), SocketId>,
    next_park_scan: Instant,
    /// Some connection may become idle: `poll_timeout` includes the next
    /// park scan, so that a node gone quiet still parks its connections
    /// (and gives back their send rings).
    park_due: bool,
    epoch: Instant,
    now: Instant,
    transmits: VecDeque<Transmit>,
    scratch: Vec<u8>,
    /// Memory of the TCP rings; dropped after every socket (see `Drop`).
    buffers: SocketBuffers,
}

impl Drop for Node {
    fn drop(&mut self) {
        // The sockets borrow their rings from `buffers`: they go first.
        self.parked.clear();
        self.sockets = SocketSet::new(Vec::new());
    }
}

fn smol_time(epoch: Instant, now: Instant) -> smoltcp::time::Instant {
    smoltcp::time::Instant::from_micros(now.saturating_duration_since(epoch).as_micros() as i64)
}

impl Node {
    /// A node with its key and overlay addresses, and its first peers.
    pub fn new(
        private_key: PrivateKey,
        addresses: &[IpAddr],
        peers: Vec<PeerConfig>,
        now: Instant,
    ) -> Result<Node, NetstackError> {
        let v4 = addresses.iter().filter(|a| a.is_ipv4()).count();
        let v6 = addresses.iter().filter(|a| a.is_ipv6()).count();
        if addresses.is_empty() || v4 > 1 || v6 > 1 {
            return Err(NetstackError::Addresses(addresses.to_vec()));
        }
        let public = private_key.public_key();
        let x_public = public.to_x25519();
        let limiter = Arc::new(RateLimiter::new(&x_public, tunnel::HANDSHAKE_RATE_LIMIT));
        let mut device = IpQueue::default();
        let mut config = Config::new(HardwareAddress::Ip);
        config.random_seed = rand::random();
        let mut iface = Interface::new(config, &mut device, smol_time(now, now));
        iface.update_ip_addrs(|ips| {
            for addr in addresses {
                let prefix = if addr.is_ipv4() { 32 } else { 128 };
                // Two addresses always fit smoltcp's address table.
                let _ = ips.push(IpCidr::new(IpAddress::from(*addr), prefix));
            }
        });
        for addr in addresses {
            // Every other address is reached through a peer: a default
            // route via ourselves sends it to the device.
            let result = match addr {
                IpAddr::V4(v4) => iface.routes_mut().add_default_ipv4_route(*v4).map(|_| ()),
                IpAddr::V6(v6) => iface.routes_mut().add_default_ipv6_route(*v6).map(|_| ()),
            };
            if result.is_err() {
                return Err(NetstackError::Addresses(addresses.to_vec()));
            }
        }
        let mut node = Node {
            private: private_key,
            public,
            x_public,
            addresses: addresses.to_vec(),
            limiter,
            peers: HashMap::new(),
            slots: HashMap::new(),
            next_slot: rand::random::<u32>() & 0xff_ffff,
            routes: Vec::new(),
            drops: Drops::default(),
            iface,
            device,
            sockets: SocketSet::new(Vec::new()),
            meta: HashMap::new(),
            next_socket_id: 1,
            listeners: HashMap::new(),
            ephemeral_in_use: HashMap::new(),
            // A random start (RFC 6056): a node restarted with the same key
            // and address does not reuse the 4-tuples of connections its
            // peers still hold from before.
            next_ephemeral: rand::random_range(EPHEMERAL_PORTS),
            released: Vec::new(),
            half_closed: Vec::new(),
            parked: HashMap::new(),
            parked_by_tuple: HashMap::new(),
            next_park_scan: now + PARK_AFTER,
            park_due: false,
            epoch: now,
            now,
            transmits: VecDeque::new(),
            scratch: vec![0u8; 65536 + 256],
            buffers: SocketBuffers::new(TCP_BUFFER),
        };
        node.set_peers(peers, now)?;
        Ok(node)
    }

    pub fn public_key(&self) -> PublicKey {
        self.public
    }

    pub fn addresses(&self) -> &[IpAddr] {
        &self.addresses
    }

    /// Replace the peer set. Peers that stay keep their sessions, learned
    /// endpoints and counters; connections through them are not disturbed.
    pub fn set_peers(&mut self, peers: Vec<PeerConfig>, now: Instant) -> Result<(), NetstackError> {
        let mut seen = std::collections::HashSet::new();
        for peer in &peers {
            if peer.public_key == self.public {
                return Err(NetstackError::PeerIsSelf(peer.public_key));
            }
            if !seen.insert(peer.public_key) {
                return Err(NetstackError::DuplicatePeer(peer.public_key));
            }
        }
        let mut kept = HashMap::new();
        let mut slots = HashMap::new();
        for config in peers {
            let key = config.public_key;
            let existing = self
                .slots
                .get(&key)
                .and_then(|slot| self.peers.remove(slot));
            let peer = match existing {
                Some(mut peer) if peer.tunnel.same_keys(&config.preshared_key) => {
                    peer.tunnel
                        .set_persistent_keepalive(config.persistent_keepalive);
                    if config.endpoint.is_some() && config.endpoint != peer.config.endpoint {
                        peer.endpoint = config.endpoint;
                    }
                    peer.config = config;
                    peer
                }
                previous => {
                    let slot = previous
                        .as_ref()
                        .map(|p| p.tunnel.slot())
                        .unwrap_or_else(|| self.allocate_slot(&kept));
                    let endpoint = config
                        .endpoint
                        .or(previous.as_ref().and_then(|p| p.endpoint));
                    Peer {
                        tunnel: Tunnel::new(
                            &self.private,
                            key,
                            config.preshared_key.clone(),
                            config.persistent_keepalive,
                            slot,
                            self.limiter.clone(),
                            now,
                        ),
                        endpoint,
                        config,
                        drops: previous.map(|p| p.drops).unwrap_or_default(),
                    }
                }
            };
            slots.insert(key, peer.tunnel.slot());
            kept.insert(peer.tunnel.slot(), peer);
        }
        self.peers = kept;
        self.slots = slots;
        let mut routes: Vec<(IpNet, u32)> = Vec::new();
        for (slot, peer) in &self.peers {
            for net in &peer.config.allowed_ips {
                routes.push((net.trunc(), *slot));
            }
        }
        routes.sort_by(|a, b| b.0.prefix_len().cmp(&a.0.prefix_len()).then(a.1.cmp(&b.1)));
        self.routes = routes;
        Ok(())
    }

    fn allocate_slot(&mut self, taken: &HashMap<u32, Peer>) -> u32 {
        loop {
            let slot = self.next_slot & 0xff_ffff;
            self.next_slot = self.next_slot.wrapping_add(1);
            if !taken.contains_key(&slot) && !self.peers.contains_key(&slot) {
                return slot;
            }
        }
    }

    fn route(&self, addr: IpAddr) -> Option<u32> {
        self.routes
            .iter()
            .find(|(net, _)| net.contains(&addr))
            .map(|(_, slot)| *slot)
    }

    /// Feed one datagram received on the node's UDP socket.
    pub fn handle_udp(&mut self, now: Instant, from: SocketAddr, bytes: &[u8]) {
        self.advance(now);
        let mut scratch = std::mem::take(&mut self.scratch);
        self.receive(now, from, bytes, &mut scratch);
        self.scratch = scratch;
    }

    fn receive(&mut self, now: Instant, from: SocketAddr, bytes: &[u8], scratch: &mut [u8]) {
        let slot = match Tunn::parse_incoming_packet(bytes) {
            Err(_) => return self.drops.add(DropReason::Malformed),
            Ok(Packet::HandshakeInit(_)) => {
                match tunnel::check_initiation(
                    &self.limiter,
                    &self.private,
                    &self.x_public,
                    from.ip(),
                    bytes,
                    scratch,
                ) {
                    InitiationCheck::From(key) => match self.slots.get(&key) {
                        Some(slot) => *slot,
                        None => return self.drops.add(DropReason::UnknownPeer),
                    },
                    InitiationCheck::CookieReply(cookie) => {
                        // The one reply an unauthenticated sender may get.
                        self.transmits.push_back(Transmit {
                            destination: from,
                            contents: cookie.to_vec(),
                        });
                        return;
                    }
                    InitiationCheck::Dropped(reason) => return self.drops.add(reason),
                }
            }
            Ok(Packet::HandshakeResponse(p)) => tunnel::slot_of_receiver_index(p.receiver_idx),
            Ok(Packet::PacketCookieReply(p)) => tunnel::slot_of_receiver_index(p.receiver_idx),
            Ok(Packet::PacketData(p)) => tunnel::slot_of_receiver_index(p.receiver_idx),
        };
        let kind = bytes[0];
        let Some(peer) = self.peers.get_mut(&slot) else {
            if kind == tunnel::MSG_DATA {
                self.handshake_for_stale_session(now, from);
            }
            return self.drops.add(DropReason::UnknownIndex);
        };
        // Decrypt straight into a packet buffer for the stack (plaintext is
        // never longer than the datagram).
        let mut plain = self.device.buffer(bytes.len().max(tunnel::MIN_DST));
        let received = peer.tunnel.decapsulate(now, from.ip(), bytes, &mut plain);
        // boringtun holds packets queued while it had no session. Once a
        // session is usable for sending (we completed a handshake as
        // initiator, or, as responder, the initiator's first transport
        // message arrived), send them. Not after merely answering an
        // initiation: boringtun would start a handshake of its own.
        let flush = received.authenticated(kind) && (kind == 2 || kind == 4);
        let mut stale = false;
        if received.authenticated(kind) && peer.endpoint != Some(from) {
            // Roaming: follow the peer to where its authenticated packets come from.
            tracing::debug!(peer = %peer.config.public_key, %from, "peer endpoint changed");
            peer.endpoint = Some(from);
        }
        match received {
            Received::Ip(packet) => {
                let verdict = check_inner(packet, &peer.config.allowed_ips, &self.addresses);
                match verdict {
                    Err(reason) => peer.drops.add(reason),
                    Ok(()) if self.device.rx.len() >= QUEUE_LIMIT => {
                        peer.drops.add(DropReason::QueueFull)
                    }
                    Ok(()) => {
                        let len = packet.len();
                        plain.truncate(len);
                        self.device.rx.push_back(std::mem::take(&mut plain));
                    }
                }
            }
            Received::Reply(reply) => {
                self.transmits.push_back(Transmit {
                    destination: from,
                    contents: reply.to_vec(),
                });
            }
            Received::Nothing => {}
            Received::Dropped(reason) => {
                stale = kind == tunnel::MSG_DATA
                    && matches!(
                        reason,
                        DropReason::NoSession | DropReason::UnexpectedMessage
                    );
                peer.drops.add(reason);
            }
        }
        if plain.capacity() > 0 {
            self.device.recycle(plain);
        }
        if flush {
            if let Some(destination) = peer.endpoint {
                while let Some(out) = peer.tunnel.flush_queued(now, scratch) {
                    self.transmits.push_back(Transmit {
                        destination,
                        contents: out.to_vec(),
                    });
                }
            }
        }
        if stale {
            self.handshake_for_stale_session(now, from);
        }
    }

    /// Transport data from `from` that no session of ours can decrypt: if
    /// `from` is a peer's endpoint, that peer still uses a session this node
    /// lost (e.g. it restarted): handshake with it now (the timer sends the
    /// initiation) rather than leave the path dead until the peer's 15 s
    /// silence timer.
    fn handshake_for_stale_session(&mut self, now: Instant, from: SocketAddr) {
        if let Some(peer) = self
            .peers
            .values_mut()
            .find(|peer| peer.endpoint == Some(from))
        {
            if peer.tunnel.handshake_for_stale_session(now) {
                tracing::debug!(peer = %peer.config.public_key, %from, "data on a session we do not have: handshake");
            }
        }
    }

    fn advance(&mut self, now: Instant) {
        if now > self.now {
            self.now = now;
        }
    }

    /// Run the IP stack and the WireGuard timers up to `now`: process the
    /// queued inner packets, emit what the sockets have to send, send
    /// handshakes and keepalives that are due. Harmless to call early.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.advance(now);
        let now = self.now;
        let ts = smol_time(self.epoch, now);
        let mut changed = false;
        loop {
            if !self.parked.is_empty() {
                let parked = self
                    .device
                    .rx
                    .front()
                    .and_then(|head| tcp_tuple(head))
                    .and_then(|tuple| self.parked_by_tuple.get(&tuple).copied());
                if let Some(handle) = parked {
                    self.unpark(handle);
                }
            }
            if let Some(head) = self.device.rx.front() {
                if let Some((port, remote)) = tcp_syn(head) {
                    if self.listeners.contains_key(&port) && !self.prepare_listener(port, remote) {
                        // A retransmitted SYN for a connection already half open:
                        // that socket answers on its own timer.
                        if let Some(buf) = self.device.rx.pop_front() {
                            self.device.recycle(buf);
                        }
                        continue;
                    }
                }
            }
            match self
                .iface
                .poll_ingress_single(ts, &mut self.device, &mut self.sockets)
            {
                PollIngressSingleResult::None => break,
                PollIngressSingleResult::PacketProcessed => {}
                PollIngressSingleResult::SocketStateChanged => changed = true,
            }
        }
        if !self.half_closed.is_empty() {
            self.salvage_half_closed();
        }
        loop {
            match self
                .iface
                .poll_egress(ts, &mut self.device, &mut self.sockets)
            {
                PollResult::None => break,
                PollResult::SocketStateChanged => changed = true,
            }
            self.encrypt_outgoing(now);
        }
        self.encrypt_outgoing(now);
        if now >= self.next_park_scan {
            self.park_idle();
            self.next_park_scan = now + PARK_AFTER;
        }
        self.run_timers(now);
        if changed || !self.released.is_empty() {
            self.sweep_released();
        }
        self.wake_acceptors();
    }

    fn encrypt_outgoing(&mut self, now: Instant) {
        while let Some(mut packet) = self.device.tx.pop_front() {
            retract_receive_window(&mut packet);
            let Some(dst) = inner_destination(&packet) else {
                self.drops.add(DropReason::BadInnerPacket);
                self.device.recycle(packet);
                continue;
            };
            let Some(peer) = self.route(dst).and_then(|slot| self.peers.get_mut(&slot)) else {
                self.drops.add(DropReason::NoRoute);
                self.device.recycle(packet);
                continue;
            };
            let Some(destination) = peer.endpoint else {
                peer.drops.add(DropReason::NoEndpoint);
                self.device.recycle(packet);
                continue;
            };
            // Encrypt straight into the datagram buffer.
            let mut contents = self
                .device
                .buffer((packet.len() + tunnel::WG_OVERHEAD).max(tunnel::MIN_DST));
            match peer.tunnel.encapsulate(now, &packet, &mut contents) {
                Ok(Some(out)) => {
                    let len = out.len();
                    contents.truncate(len);
                    self.transmits.push_back(Transmit {
                        destination,
                        contents,
                    });
                }
                Ok(None) => self.device.recycle(contents),
                Err(reason) => {
                    peer.drops.add(reason);
                    self.device.recycle(contents);
                }
            }
            self.device.recycle(packet);
        }
    }

    fn run_timers(&mut self, now: Instant) {
        self.limiter.reset_count();
        let mut scratch = std::mem::take(&mut self.scratch);
        for peer in self.peers.values_mut() {
            let Some(destination) = peer.endpoint else {
                continue;
            };
            while let Some(out) = peer.tunnel.handle_timers(now, &mut scratch) {
                self.transmits.push_back(Transmit {
                    destination,
                    contents: out.to_vec(),
                });
            }
        }
        self.scratch = scratch;
    }

    /// Give a datagram buffer back after sending it, to be reused.
    pub fn recycle(&mut self, contents: Vec<u8>) {
        self.device.recycle(contents);
    }

    /// The next datagram to send.
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.transmits.pop_front()
    }

    /// When `handle_timeout` must be called next (`None`: only when a
    /// datagram arrives or a socket is used).
    pub fn poll_timeout(&mut self) -> Option<Instant> {
        if !self.device.rx.is_empty() || !self.device.tx.is_empty() {
            return Some(self.now);
        }
        let ts = smol_time(self.epoch, self.now);
        let stack = self
            .iface
            .poll_at(ts, &self.sockets)
            .map(|at| self.epoch + Duration::from_micros(at.total_micros().max(0) as u64));
        let timers = self
            .peers
            .values()
            .filter(|p| p.endpoint.is_some())
            .filter_map(|p| p.tunnel.next_timer())
            .min();
        let park = self.park_due.then_some(self.next_park_scan);
        [stack, timers, park].into_iter().flatten().min()
    }

    pub fn status(&self) -> Status {
        let mut peers: Vec<PeerStatus> = self
            .peers
            .values()
            .map(|p| PeerStatus {
                public_key: p.config.public_key,
                endpoint: p.endpoint,
                last_handshake: p.tunnel.last_handshake,
                rx_bytes: p.tunnel.rx_bytes,
                tx_bytes: p.tunnel.tx_bytes,
                drops: p.drops.clone(),
            })
            .collect();
        peers.sort_by_key(|p| p.public_key);
        Status {
            public_key: self.public,
            peers,
            drops: self.drops.clone(),
        }
    }

    // ---- TCP ----

    /// A new TCP socket with its rings, `prepare`d (connect or listen) and
    /// put in the set; if `prepare` fails, the rings' slot is freed.
    fn add_tcp_socket(
        &mut self,
        prepare: impl FnOnce(&mut tcp::Socket<'static>, &mut Interface) -> Result<(), NetstackError>,
        meta: SocketMeta,
    ) -> Result<SocketId, NetstackError> {
        let (slot, rings) = self.buffers.take().map_err(NetstackError::Memory)?;
        let mut socket = tcp::Socket::new(
            tcp::SocketBuffer::new(rings.rx),
            tcp::SocketBuffer::new(rings.tx),
        );
        socket.set_nagle_enabled(false);
        socket.set_congestion_control(tcp::CongestionControl::Cubic);
        // A short delayed ACK: an answer sent within it carries the ACK, so
        // a request/response exchange costs one datagram each way instead
        // of two (a pure ACK woke the other side for nothing). A stream is
        // still acknowledged every second segment. `park_idle` waits for a
        // pending ACK to go out.
        socket.set_ack_delay(Some(smoltcp::time::Duration::from_micros(
            ACK_DELAY.as_micros() as u64,
        )));
        if let Err(e) = prepare(&mut socket, &mut self.iface) {
            drop(socket);
            self.buffers.recycle(slot);
            return Err(e);
        }
        Ok(self.add_socket(
            smoltcp::socket::Socket::Tcp(socket),
            SocketMeta {
                buffers: Some(slot),
                ..meta
            },
        ))
    }

    fn local_address_for(&self, remote: IpAddr) -> Option<IpAddr> {
        self.addresses
            .iter()
            .copied()
            .find(|a| a.is_ipv4() == remote.is_ipv4())
    }

    /// Open a TCP connection to `remote` over the peer whose allowed IPs
    /// contain it. Progress is reported by [`Node::tcp_connect_state`].
    pub fn tcp_connect(&mut self, remote: SocketAddr) -> Result<SocketId, NetstackError> {
        if self.route(remote.ip()).is_none() {
            return Err(NetstackError::NoRoute(remote.ip()));
        }
        let local = self
            .local_address_for(remote.ip())
            .ok_or(NetstackError::NoRoute(remote.ip()))?;
        let port = self.ephemeral_port()?;
        let id = self.add_tcp_socket(
            |socket, iface| {
                socket
                    .connect(iface.context(), remote, SocketAddr::new(local, port))
                    .map_err(|e| NetstackError::Connect(remote, e.to_string()))
            },
            SocketMeta {
                local_port: Some(port),
                ..SocketMeta::default()
            },
        )?;
        self.ephemeral_in_use.insert(port, id);
        Ok(id)
    }

    /// Put a socket in smoltcp's set under a new, stable id.
    fn add_socket(
        &mut self,
        socket: smoltcp::socket::Socket<'static>,
        mut meta: SocketMeta,
    ) -> SocketId {
        let id = SocketId(self.next_socket_id);
        self.next_socket_id += 1;
        meta.handle = Some(self.sockets.add(socket));
        self.meta.insert(id, meta);
        self.park_due = true;
        id
    }

    /// Forget a socket entirely.
    fn remove_socket(&mut self, id: SocketId) -> Option<SocketMeta> {
        let mut meta = self.meta.remove(&id)?;
        if let Some(handle) = meta.handle {
            drop(self.sockets.remove(handle));
        }
        if let Some(socket) = self.parked.remove(&id) {
            if let (Some(local), Some(remote)) = (socket.local_endpoint(), socket.remote_endpoint())
            {
                self.parked_by_tuple.remove(&(local, remote));
            }
            drop(socket);
        }
        // The socket that used the slot's rings is gone.
        if let Some(slot) = meta.buffers.take() {
            self.buffers.recycle(slot);
        }
        Some(meta)
    }

    /// The state of a TCP socket (Closed if there is no such socket).
    fn tcp_state(&self, id: SocketId) -> tcp::State {
        self.tcp(id).map_or(tcp::State::Closed, |s| s.state())
    }

    fn ephemeral_port(&mut self) -> Result<u16, NetstackError> {
        let span = EPHEMERAL_PORTS.end() - EPHEMERAL_PORTS.start() + 1;
        for _ in 0..span {
            let port = self.next_ephemeral;
            self.next_ephemeral = if port >= *EPHEMERAL_PORTS.end() {
                *EPHEMERAL_PORTS.start()
            } else {
                port + 1
            };
            if !self.ephemeral_in_use.contains_key(&port) && !self.listeners.contains_key(&port) {
                return Ok(port);
            }
        }
        Err(NetstackError::PortsExhausted)
    }

    pub fn tcp_connect_state(&self, id: SocketId) -> ConnectState {
        self.tcp_state_of(id)
    }

    fn tcp_state_of(&self, id: SocketId) -> ConnectState {
        match self.tcp(id).map(|s| s.state()) {
            Some(tcp::State::SynSent | tcp::State::SynReceived) => ConnectState::Connecting,
            Some(tcp::State::Closed | tcp::State::Listen) | None => ConnectState::Failed,
            Some(_) => ConnectState::Established,
        }
    }

    fn tcp(&self, id: SocketId) -> Option<&tcp::Socket<'static>> {
        let meta = self.meta.get(&id).filter(|m| !m.udp)?;
        match meta.handle {
            Some(handle) => Some(self.sockets.get::<tcp::Socket>(handle)),
            None => self.parked.get(&id),
        }
    }

    /// The socket, back in the socket set if it was parked (every
    /// operation that may need to send wakes it).
    fn tcp_mut(&mut self, id: SocketId) -> Option<&mut tcp::Socket<'static>> {
        self.meta.get(&id).filter(|m| !m.udp)?;
        self.unpark(id);
        let handle = self.meta.get(&id)?.handle?;
        Some(self.sockets.get_mut::<tcp::Socket>(handle))
    }

    fn unpark(&mut self, id: SocketId) {
        if let Some(socket) = self.parked.remove(&id) {
            if let (Some(local), Some(remote)) = (socket.local_endpoint(), socket.remote_endpoint())
            {
                self.parked_by_tuple.remove(&(local, remote));
            }
            let handle = self.sockets.add(socket);
            if let Some(meta) = self.meta.get_mut(&id) {
                meta.handle = Some(handle);
            }
            self.park_due = true;
        }
    }

    /// Move established connections with nothing in flight out of smoltcp's
    /// socket set, which smoltcp walks on every poll. An inbound segment
    /// (found by its 4-tuple) or any socket operation brings them back.
    /// A connection read from less than [`ACK_DELAY`] ago may still owe
    /// the peer an ACK and stays; one parked owes nothing and has no timer
    /// running (the pass that parks has already sent every expired ACK).
    fn park_idle(&mut self) {
        let waiting: std::collections::HashSet<SocketId> = self
            .listeners
            .values()
            .flat_map(|l| l.pool.iter().chain(l.pending.iter()).copied())
            .collect();
        let parkable = |id: &SocketId, m: &SocketMeta| {
            !m.udp && !m.released && !m.half_closed && !waiting.contains(id)
        };
        let candidates: Vec<(SocketId, SocketHandle)> = self
            .meta
            .iter()
            .filter(|(id, m)| parkable(id, m))
            .filter(|(_, m)| m.read_at.is_none_or(|at| self.now >= at + ACK_DELAY))
            .filter_map(|(id, m)| m.handle.map(|h| (*id, h)))
            .collect();
        for (id, handle) in candidates {
            let socket = self.sockets.get::<tcp::Socket>(handle);
            let idle = socket.state() == tcp::State::Established
                && socket.send_queue() == 0
                && socket.recv_queue() == 0;
            let (Some(local), Some(remote)) = (socket.local_endpoint(), socket.remote_endpoint())
            else {
                continue;
            };
            if !idle {
                continue;
            }
            if let smoltcp::socket::Socket::Tcp(mut socket) = self.sockets.remove(handle) {
                // Nothing is queued to send or waiting to be acknowledged:
                // the send ring's pages go back to the kernel (an empty
                // ring hands out all of its space from offset 0).
                let _ = socket.send(|free| {
                    self.buffers.discard(free);
                    (0, ())
                });
                self.parked.insert(id, socket);
                self.parked_by_tuple.insert((local, remote), id);
                if let Some(meta) = self.meta.get_mut(&id) {
                    meta.handle = None;
                }
            }
        }
        self.park_due = self
            .meta
            .iter()
            .any(|(id, m)| m.handle.is_some() && parkable(id, m));
    }

    /// Memory behind the TCP connections' rings: slots in use (one per
    /// TCP socket, listening ones included) and the bytes resident now.
    /// Reading the resident figure walks every mapping: for diagnostics
    /// and tests, not for a hot path.
    pub fn tcp_buffer_memory(&self) -> BufferMemory {
        BufferMemory {
            sockets: self.buffers.in_use(),
            resident_bytes: self.buffers.resident(),
        }
    }

    /// Number of TCP connections currently parked (idle, outside the
    /// socket set).
    pub fn parked_connections(&self) -> usize {
        self.parked.len()
    }

    /// The (local, remote) addresses of a TCP connection.
    pub fn tcp_endpoints(&self, id: SocketId) -> Option<(SocketAddr, SocketAddr)> {
        let socket = self.tcp(id)?;
        Some((
            SocketAddr::from(socket.local_endpoint()?),
            SocketAddr::from(socket.remote_endpoint()?),
        ))
    }

    /// Start listening on `port` of every node address.
    pub fn tcp_listen(&mut self, port: u16) -> Result<(), NetstackError> {
        if port == 0
            || self.listeners.contains_key(&port)
            || self.ephemeral_in_use.contains_key(&port)
        {
            return Err(NetstackError::PortInUse(port));
        }
        let mut listener = Listener {
            pool: Vec::new(),
            pending: VecDeque::new(),
            wakers: Vec::new(),
        };
        for _ in 0..LISTEN_POOL {
            listener.pool.push(self.new_listen_socket(port)?);
        }
        self.listeners.insert(port, listener);
        Ok(())
    }

    fn new_listen_socket(&mut self, port: u16) -> Result<SocketId, NetstackError> {
        self.add_tcp_socket(
            |socket, _| {
                socket
                    .listen(IpListenEndpoint { addr: None, port })
                    .map_err(|_| NetstackError::PortInUse(port))
            },
            SocketMeta::default(),
        )
    }

    /// Before a SYN for `port` from `remote` reaches the stack: move pool
    /// sockets that took earlier SYNs to the pending queue and refill the
    /// pool. Returns false if the SYN repeats one a pending socket already
    /// answers (it must not reach a fresh listening socket).
    fn prepare_listener(&mut self, port: u16, remote: IpEndpoint) -> bool {
        let Some(mut listener) = self.listeners.remove(&port) else {
            return true;
        };
        let mut fresh = true;
        self.move_reached_to_pending(&mut listener);
        for handle in &listener.pending {
            if let Some(socket) = self.tcp(*handle) {
                if socket.state() == tcp::State::SynReceived
                    && socket.remote_endpoint() == Some(remote)
                {
                    fresh = false;
                }
            }
        }
        if fresh && listener.pending.len() < ACCEPT_BACKLOG {
            while listener.pool.len() < LISTEN_POOL {
                match self.new_listen_socket(port) {
                    Ok(handle) => listener.pool.push(handle),
                    Err(_) => break,
                }
            }
        }
        self.listeners.insert(port, listener);
        fresh
    }

    /// Moves the pool's sockets that a SYN has reached (no longer listening)
    /// to the listener's pending queue, in the order found.
    fn move_reached_to_pending(&self, listener: &mut Listener) {
        let mut i = 0;
        while i < listener.pool.len() {
            let handle = listener.pool[i];
            if self.tcp_state(handle) == tcp::State::Listen {
                i += 1;
            } else {
                listener.pool.swap_remove(i);
                listener.pending.push_back(handle);
            }
        }
    }

    /// The next established connection on `port`, with the remote address.
    /// With a waker, registers it to be woken when one arrives.
    pub fn tcp_accept(
        &mut self,
        port: u16,
        waker: Option<&Waker>,
    ) -> Option<(SocketId, SocketAddr)> {
        let mut listener = self.listeners.remove(&port)?;
        // Sockets still in the pool may have been reached by SYNs since.
        self.move_reached_to_pending(&mut listener);
        let mut found = None;
        let mut keep = VecDeque::with_capacity(listener.pending.len());
        while let Some(handle) = listener.pending.pop_front() {
            let state = self.tcp_state(handle);
            match state {
                tcp::State::SynReceived | tcp::State::Listen => keep.push_back(handle),
                tcp::State::Closed => {
                    self.remove_socket(handle);
                }
                _ if found.is_none() => {
                    let remote = self
                        .tcp(handle)
                        .and_then(|s| s.remote_endpoint())
                        .map(SocketAddr::from);
                    match remote {
                        Some(remote) => found = Some((handle, remote)),
                        None => keep.push_back(handle),
                    }
                }
                _ => keep.push_back(handle),
            }
        }
        listener.pending = keep;
        while listener.pool.len() < LISTEN_POOL {
            match self.new_listen_socket(port) {
                Ok(handle) => listener.pool.push(handle),
                Err(_) => break,
            }
        }
        if found.is_none() {
            if let Some(waker) = waker {
                if !listener.wakers.iter().any(|w| w.will_wake(waker)) {
                    listener.wakers.push(waker.clone());
                }
            }
        }
        self.listeners.insert(port, listener);
        found
    }

    /// Stop listening on `port`: pending connections are reset.
    pub fn tcp_unlisten(&mut self, port: u16) {
        if let Some(listener) = self.listeners.remove(&port) {
            for handle in listener.pool.into_iter().chain(listener.pending) {
                if let Some(socket) = self.tcp_mut(handle) {
                    socket.abort();
                }
                self.release_handle(handle);
            }
        }
    }

    fn wake_acceptors(&mut self) {
        let ready: Vec<u16> = self
            .listeners
            .iter()
            .filter(|(_, l)| !l.wakers.is_empty())
            .filter(|(_, l)| {
                l.pool.iter().chain(l.pending.iter()).any(|h| {
                    !matches!(
                        self.tcp_state(*h),
                        tcp::State::Listen | tcp::State::SynReceived
                    )
                })
            })
            .map(|(port, _)| *port)
            .collect();
        for port in ready {
            if let Some(listener) = self.listeners.get_mut(&port) {
                for waker in listener.wakers.drain(..) {
                    waker.wake();
                }
            }
        }
    }

    /// Bytes a [`Node::tcp_recv`] would return now (0 when none, at EOF, or
    /// for an unknown socket), so that a reader only prepares that much
    /// buffer.
    pub fn tcp_recv_available(&self, id: SocketId) -> usize {
        match self.meta.get(&id) {
            Some(meta) if !meta.salvaged.is_empty() => meta.salvaged.len(),
            _ => self.tcp(id).map_or(0, |s| s.recv_queue()),
        }
    }

    /// Read received bytes. `Ok(0)` is the end of the stream; `WouldBlock`
    /// means nothing yet (the waker, if given, is woken when there is).
    pub fn tcp_recv(
        &mut self,
        id: SocketId,
        buf: &mut [u8],
        waker: Option<&Waker>,
    ) -> io::Result<usize> {
        let meta = self
            .meta
            .get_mut(&id)
            .filter(|m| !m.udp)
            .ok_or_else(closed)?;
        if !meta.salvaged.is_empty() {
            let n = buf.len().min(meta.salvaged.len());
            for (slot, byte) in buf.iter_mut().zip(meta.salvaged.drain(..n)) {
                *slot = byte;
            }
            return Ok(n);
        }
        let eof = meta.eof;
        let socket = self.tcp_mut(id).ok_or_else(closed)?;
        let result = match socket.recv_slice(buf) {
            Ok(0) if !buf.is_empty() => {
                if socket.state() == tcp::State::Closed {
                    return if eof {
                        Ok(0)
                    } else {
                        Err(io::ErrorKind::ConnectionReset.into())
                    };
                }
                if let Some(waker) = waker {
                    socket.register_recv_waker(waker);
                }
                Err(io::ErrorKind::WouldBlock.into())
            }
            Ok(n) => Ok(n),
            Err(tcp::RecvError::Finished) => Ok(0),
            Err(tcp::RecvError::InvalidState) => match socket.state() {
                tcp::State::SynSent | tcp::State::SynReceived => {
                    if let Some(waker) = waker {
                        socket.register_recv_waker(waker);
                    }
                    Err(io::ErrorKind::WouldBlock.into())
                }
                _ if eof => Ok(0),
                _ => Err(io::ErrorKind::ConnectionReset.into()),
            },
        };
        match result {
            Ok(0) if !buf.is_empty() => {
                if let Some(meta) = self.meta.get_mut(&id) {
                    meta.eof = true;
                }
            }
            Ok(n) if n > 0 => {
                let now = self.now;
                if let Some(meta) = self.meta.get_mut(&id) {
                    meta.read_at = Some(now);
                }
            }
            _ => {}
        }
        result
    }

    /// Move the unread bytes of a connection whose peer has sent FIN out of
    /// the smoltcp socket, before smoltcp discards them on closing.
    fn salvage(&mut self, id: SocketId) {
        self.unpark(id);
        let Some(meta) = self.meta.get_mut(&id) else {
            return;
        };
        let Some(handle) = meta.handle else {
            return;
        };
        let socket = self.sockets.get_mut::<tcp::Socket>(handle);
        while let Ok(n) = socket.recv(|data| {
            meta.salvaged.extend(data.iter().copied());
            (data.len(), data.len())
        }) {
            if n == 0 {
                break;
            }
        }
        meta.eof = true;
        meta.half_closed = false;
    }

    /// After inbound packets: connections we half-closed that the peer has
    /// now closed too are in TIME-WAIT; keep their unread bytes.
    fn salvage_half_closed(&mut self) {
        let mut i = 0;
        while i < self.half_closed.len() {
            let handle = self.half_closed[i];
            let state = self
                .meta
                .get(&handle)
                .filter(|m| m.half_closed && !m.released)
                .map(|_| self.tcp_state(handle));
            match state {
                Some(tcp::State::TimeWait | tcp::State::Closing) => {
                    self.salvage(handle);
                    self.half_closed.swap_remove(i);
                }
                Some(tcp::State::FinWait1 | tcp::State::FinWait2) => i += 1,
                _ => {
                    self.half_closed.swap_remove(i);
                }
            }
        }
    }

    /// Queue bytes to send; returns how many fit. `WouldBlock` when the
    /// send buffer is full (the waker, if given, is woken when it drains).
    pub fn tcp_send(
        &mut self,
        id: SocketId,
        data: &[u8],
        waker: Option<&Waker>,
    ) -> io::Result<usize> {
        let socket = self.tcp_mut(id).ok_or_else(closed)?;
        match socket.send_slice(data) {
            Ok(0) if !data.is_empty() => {
                if let Some(waker) = waker {
                    socket.register_send_waker(waker);
                }
                Err(io::ErrorKind::WouldBlock.into())
            }
            Ok(n) => Ok(n),
            Err(tcp::SendError::InvalidState) => match socket.state() {
                tcp::State::SynSent | tcp::State::SynReceived => {
                    if let Some(waker) = waker {
                        socket.register_send_waker(waker);
                    }
                    Err(io::ErrorKind::WouldBlock.into())
                }
                tcp::State::Closed => Err(io::ErrorKind::ConnectionReset.into()),
                _ => Err(io::ErrorKind::BrokenPipe.into()),
            },
        }
    }

    /// Bytes queued but not yet acknowledged by the peer.
    pub fn tcp_send_queue(&self, id: SocketId) -> usize {
        self.tcp(id).map_or(0, |s| s.send_queue())
    }

    /// Register a waker for any change of the connection (used while connecting).
    pub fn tcp_register_waker(&mut self, id: SocketId, waker: &Waker) {
        if let Some(socket) = self.tcp_mut(id) {
            socket.register_send_waker(waker);
        }
    }

    /// Half-close: send FIN once the queued bytes are sent; reading continues.
    pub fn tcp_shutdown(&mut self, id: SocketId) {
        let Some(state) = self.tcp_mut(id).map(|s| s.state()) else {
            return;
        };
        if state == tcp::State::CloseWait {
            // The peer already sent FIN: once it acknowledges ours, smoltcp
            // closes the socket and drops what we have not read yet.
            self.salvage(id);
        } else if let Some(meta) = self.meta.get_mut(&id) {
            if !meta.half_closed {
                meta.half_closed = true;
                self.half_closed.push(id);
            }
        }
        if let Some(socket) = self.tcp_mut(id) {
            socket.close();
        }
    }

    /// Reset the connection.
    pub fn tcp_abort(&mut self, id: SocketId) {
        if let Some(socket) = self.tcp_mut(id) {
            socket.abort();
        }
    }

    /// The handle of a connection is gone: close it (reset if received bytes
    /// were never read, like a kernel socket) and forget it once closed.
    pub fn tcp_release(&mut self, id: SocketId) {
        let Some(socket) = self.tcp_mut(id) else {
            return;
        };
        if socket.recv_queue() > 0 {
            socket.abort();
        } else {
            socket.close();
        }
        socket.set_timeout(Some(smoltcp::time::Duration::from_micros(
            LINGER.as_micros() as u64,
        )));
        self.release_handle(id);
    }

    fn release_handle(&mut self, handle: SocketId) {
        if let Some(meta) = self.meta.get_mut(&handle) {
            if !meta.released {
                meta.released = true;
                self.released.push(handle);
            }
        }
    }

    fn sweep_released(&mut self) {
        let mut i = 0;
        while i < self.released.len() {
            let handle = self.released[i];
            let done = self.socket_finished(handle);
            if done {
                self.released.swap_remove(i);
                if let Some(port) = self.remove_socket(handle).and_then(|m| m.local_port) {
                    self.ephemeral_in_use.remove(&port);
                }
            } else {
                i += 1;
            }
        }
    }

    fn socket_finished(&self, handle: SocketId) -> bool {
        match self.meta.get(&handle) {
            Some(meta) if meta.udp => true,
            Some(_) => matches!(
                self.tcp_state(handle),
                tcp::State::Closed | tcp::State::TimeWait
            ),
            None => true,
        }
    }

    // ---- UDP ----

    /// A UDP socket on `port` of every node address.
    pub fn udp_bind(&mut self, port: u16) -> Result<SocketId, NetstackError> {
        let mut socket = udp::Socket::new(
            udp::PacketBuffer::new(
                vec![udp::PacketMetadata::EMPTY; UDP_PACKETS],
                vec![0u8; UDP_PAYLOAD],
            ),
            udp::PacketBuffer::new(
                vec![udp::PacketMetadata::EMPTY; UDP_PACKETS],
                vec![0u8; UDP_PAYLOAD],
            ),
        );
        let in_use = self.sockets.iter().any(|(_, s)| match s {
            smoltcp::socket::Socket::Udp(u) => u.endpoint().port == port,
            _ => false,
        });
        if port == 0 || in_use {
            return Err(NetstackError::PortInUse(port));
        }
        socket
            .bind(IpListenEndpoint { addr: None, port })
            .map_err(|_| NetstackError::PortInUse(port))?;
        Ok(self.add_socket(
            smoltcp::socket::Socket::Udp(socket),
            SocketMeta {
                udp: true,
                ..SocketMeta::default()
            },
        ))
    }

    fn udp_mut(&mut self, id: SocketId) -> Option<&mut udp::Socket<'static>> {
        let handle = self.meta.get(&id).filter(|m| m.udp)?.handle?;
        Some(self.sockets.get_mut::<udp::Socket>(handle))
    }

    /// Queue one datagram. `WouldBlock` when the send buffer is full.
    pub fn udp_send_to(
        &mut self,
        id: SocketId,
        data: &[u8],
        to: SocketAddr,
        waker: Option<&Waker>,
    ) -> io::Result<()> {
        if self.route(to.ip()).is_none() {
            return Err(io::Error::new(
                io::ErrorKind::HostUnreachable,
                NetstackError::NoRoute(to.ip()),
            ));
        }
        let socket = self.udp_mut(id).ok_or_else(closed)?;
        match socket.send_slice(data, to) {
            Ok(()) => Ok(()),
            Err(udp::SendError::BufferFull) => {
                if data.len() > UDP_PAYLOAD {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidInput,
                        format!(
                            "datagram of {} bytes is larger than the send buffer",
                            data.len()
                        ),
                    ));
                }
                if let Some(waker) = waker {
                    socket.register_send_waker(waker);
                }
                Err(io::ErrorKind::WouldBlock.into())
            }
            Err(udp::SendError::Unaddressable) => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("cannot send a UDP datagram to {to}"),
            )),
        }
    }

    /// Take one received datagram (truncated to `buf`).
    pub fn udp_recv_from(
        &mut self,
        id: SocketId,
        buf: &mut [u8],
        waker: Option<&Waker>,
    ) -> io::Result<(usize, SocketAddr)> {
        let socket = self.udp_mut(id).ok_or_else(closed)?;
        match socket.recv() {
            Ok((data, meta)) => {
                let n = data.len().min(buf.len());
                buf[..n].copy_from_slice(&data[..n]);
                Ok((n, SocketAddr::from(meta.endpoint)))
            }
            Err(_) => {
                if let Some(waker) = waker {
                    socket.register_recv_waker(waker);
                }
                Err(io::ErrorKind::WouldBlock.into())
            }
        }
    }

    pub fn udp_release(&mut self, id: SocketId) {
        if let Some(socket) = self.udp_mut(id) {
            socket.close();
            self.release_handle(id);
        }
    }

    /// Reset every connection and close every socket (the node is shutting down).
    pub fn close_all(&mut self) {
        for socket in self.parked.values_mut() {
            socket.abort();
        }
        for (_, socket) in self.sockets.iter_mut() {
            match socket {
                smoltcp::socket::Socket::Tcp(s) => s.abort(),
                smoltcp::socket::Socket::Udp(s) => s.close(),
                #[allow(unreachable_patterns)]
                _ => {}
            }
        }
        for listener in self.listeners.values_mut() {
            for waker in listener.wakers.drain(..) {
                waker.wake();
            }
        }
    }
}

fn closed() -> io::Error {
    io::Error::new(io::ErrorKind::NotConnected, "socket is closed")
}

/// The destination of an inner packet the stack emitted.
fn inner_destination(packet: &[u8]) -> Option<IpAddr> {
    match packet.first()? >> 4 {
        4 => smoltcp::wire::Ipv4Packet::new_checked(packet)
            .ok()
            .map(|p| IpAddr::V4(p.dst_addr())),
        6 => smoltcp::wire::Ipv6Packet::new_checked(packet)
            .ok()
            .map(|p| IpAddr::V6(p.dst_addr())),
        _ => None,
    }
}

/// Advertise one window unit less than smoltcp computed, in every TCP
/// segment the stack sends except SYNs (whose window is never scaled).
///
/// smoltcp accepts a segment only up to the right edge of the window it
/// advertised last (last ACK + window << shift), and it computes the window
/// as its free buffer space rounded down to a multiple of 2^shift. When the
/// ACK moves by a few bytes, that rounding can pull the right edge left by
/// up to 2^shift - 1 bytes: the window shrinks (RFC 9293 3.8.6 says not to),
/// and bytes the peer already sent into the old window now lie beyond the
/// new one. Once the window is zero, smoltcp drops every segment whose
/// sequence number is not exactly the next expected one, ACK field included
/// (RFC 9293 3.10.7.4 asks receivers to still process the ACKs of such
/// segments). Linux (and smoltcp) send their pure ACKs with SND.NXT, which
/// after such a shrink is beyond our window: our send buffer never drains
/// and a full-duplex connection whose receiver is blocked writing deadlocks.
///
/// smoltcp's right edge is `R + C - (free mod 2^shift)`, where R is the
/// sequence number of the first unread byte (it only grows) and C the
/// buffer size; it never falls more than 2^shift - 1 below any edge it
/// computed before. Telling the peer one unit (2^shift bytes) less keeps
/// every byte the peer may send, and so its SND.NXT, strictly inside what
/// smoltcp accepts (a zero window stays zero: then the peer may send
/// nothing beyond the ACK, which smoltcp accepts exactly). The cost is
/// 2^shift bytes of window (8 with our buffers).
fn retract_receive_window(packet: &mut [u8]) {
    use smoltcp::wire::TcpPacket;
    let segment = match packet.first().map(|b| b >> 4) {
        Some(4) if packet.len() >= 20 && packet[9] == 6 => {
            let header = usize::from(packet[0] & 0x0f) * 4;
            let total = usize::from(u16::from_be_bytes([packet[2], packet[3]]));
            packet.get_mut(header..total.min(packet.len()))
        }
        // smoltcp puts no extension headers before TCP.
        Some(6) if packet.len() >= 40 && packet[6] == 6 => packet.get_mut(40..),
        _ => None,
    };
    let Some(mut tcp) = segment.and_then(|s| TcpPacket::new_checked(s).ok()) else {
        return;
    };
    let window = tcp.window_len();
    if window == 0 || tcp.syn() || tcp.rst() || !tcp.ack() {
        return;
    }
    tcp.set_window_len(window - 1);
    // RFC 1624 incremental update: HC' = ~(~HC + ~m + m').
    let sum = u32::from(!tcp.checksum()) + u32::from(!window) + u32::from(window - 1);
    let sum = (sum & 0xffff) + (sum >> 16);
    let sum = (sum & 0xffff) + (sum >> 16);
    tcp.set_checksum(!(sum as u16));
}

/// Check a decrypted inner packet: a valid IP header, a source inside the
/// sending peer's allowed IPs, a destination that is one of ours.
fn check_inner(packet: &[u8], allowed: &[IpNet], ours: &[IpAddr]) -> Result<(), DropReason> {
    let (src, dst) = match packet.first().map(|b| b >> 4) {
        Some(4) => {
            let p = smoltcp::wire::Ipv4Packet::new_checked(packet)
                .map_err(|_| DropReason::BadInnerPacket)?;
            (IpAddr::V4(p.src_addr()), IpAddr::V4(p.dst_addr()))
        }
        Some(6) => {
            let p = smoltcp::wire::Ipv6Packet::new_checked(packet)
                .map_err(|_| DropReason::BadInnerPacket)?;
            (IpAddr::V6(p.src_addr()), IpAddr::V6(p.dst_addr()))
        }
        _ => return Err(DropReason::BadInnerPacket),
    };
    if !allowed.iter().any(|net| net.contains(&src)) {
        return Err(DropReason::SourceNotAllowed);
    }
    if !ours.contains(&dst) {
        return Err(DropReason::NotForUs);
    }
    Ok(())
}

/// The (local, remote) endpoints of an inbound TCP segment.
fn tcp_tuple(packet: &[u8]) -> Option<(IpEndpoint, IpEndpoint)> {
    use smoltcp::wire::{IpProtocol, Ipv4Packet, Ipv6Packet, TcpPacket};
    let (src, dst, payload) = match packet.first()? >> 4 {
        4 => {
            let p = Ipv4Packet::new_checked(packet).ok()?;
            if p.next_header() != IpProtocol::Tcp {
                return None;
            }
            let header = usize::from(p.header_len());
            let total = usize::from(p.total_len()).min(packet.len());
            (
                IpAddress::Ipv4(p.src_addr()),
                IpAddress::Ipv4(p.dst_addr()),
                packet.get(header..total)?,
            )
        }
        6 => {
            let p = Ipv6Packet::new_checked(packet).ok()?;
            if p.next_header() != IpProtocol::Tcp {
                return None;
            }
            (
                IpAddress::Ipv6(p.src_addr()),
                IpAddress::Ipv6(p.dst_addr()),
                packet.get(40..)?,
            )
        }
        _ => return None,
    };
    let tcp = TcpPacket::new_checked(payload).ok()?;
    Some((
        IpEndpoint::new(dst, tcp.dst_port()),
        IpEndpoint::new(src, tcp.src_port()),
    ))
}

/// If `packet` is a TCP SYN (without ACK): its destination port and source.
fn tcp_syn(packet: &[u8]) -> Option<(u16, IpEndpoint)> {
    use smoltcp::wire::{IpProtocol, Ipv4Packet, Ipv6Packet, TcpPacket};
    let (src, payload) = match packet.first()? >> 4 {
        4 => {
            let p = Ipv4Packet::new_checked(packet).ok()?;
            if p.next_header() != IpProtocol::Tcp {
                return None;
            }
            let header = usize::from(p.header_len());
            let total = usize::from(p.total_len()).min(packet.len());
            (IpAddress::Ipv4(p.src_addr()), packet.get(header..total)?)
        }
        6 => {
            let p = Ipv6Packet::new_checked(packet).ok()?;
            if p.next_header() != IpProtocol::Tcp {
                return None;
            }
            (IpAddress::Ipv6(p.src_addr()), packet.get(40..)?)
        }
        _ => return None,
    };
    let tcp = TcpPacket::new_checked(payload).ok()?;
    if tcp.syn() && !tcp.ack() {
        Some((tcp.dst_port(), IpEndpoint::new(src, tcp.src_port())))
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::retract_receive_window;
    use smoltcp::phy::ChecksumCapabilities;
    use smoltcp::wire::{
        IpAddress, IpProtocol, Ipv4Address, Ipv4Packet, Ipv4Repr, Ipv6Address, Ipv6Packet,
        Ipv6Repr, TcpControl, TcpPacket, TcpRepr, TcpSeqNumber,
    };

    fn segment(control: TcpControl, ack: bool, window: u16, payload: &[u8]) -> TcpRepr<'_> {
        TcpRepr {
            src_port: 7,
            dst_port: 40000,
            control,
            seq_number: TcpSeqNumber(1_000),
            ack_number: ack.then_some(TcpSeqNumber(2_000)),
            window_len: window,
            window_scale: None,
            max_seg_size: None,
            sack_permitted: false,
            sack_ranges: [None, None, None],
            timestamp: None,
            payload,
        }
    }

    const SRC4: Ipv4Address = Ipv4Address::new(100, 64, 0, 1);
    const DST4: Ipv4Address = Ipv4Address::new(100, 64, 0, 2);
    const SRC6: Ipv6Address = Ipv6Address::new(0xfd00, 0, 0, 0, 0, 0, 0, 1);
    const DST6: Ipv6Address = Ipv6Address::new(0xfd00, 0, 0, 0, 0, 0, 0, 2);

    fn ipv4(tcp: &TcpRepr) -> Vec<u8> {
        let ip = Ipv4Repr {
            src_addr: SRC4,
            dst_addr: DST4,
            next_header: IpProtocol::Tcp,
            payload_len: tcp.buffer_len(),
            hop_limit: 64,
        };
        let mut buf = vec![0u8; ip.buffer_len() + tcp.buffer_len()];
        let checksums = ChecksumCapabilities::default();
        let mut packet = Ipv4Packet::new_unchecked(&mut buf);
        ip.emit(&mut packet, &checksums);
        tcp.emit(
            &mut TcpPacket::new_unchecked(packet.payload_mut()),
            &IpAddress::Ipv4(SRC4),
            &IpAddress::Ipv4(DST4),
            &checksums,
        );
        buf
    }

    fn ipv6(tcp: &TcpRepr) -> Vec<u8> {
        let ip = Ipv6Repr {
            src_addr: SRC6,
            dst_addr: DST6,
            next_header: IpProtocol::Tcp,
            payload_len: tcp.buffer_len(),
            hop_limit: 64,
        };
        let mut buf = vec![0u8; ip.buffer_len() + tcp.buffer_len()];
        let checksums = ChecksumCapabilities::default();
        let mut packet = Ipv6Packet::new_unchecked(&mut buf);
        ip.emit(&mut packet);
        tcp.emit(
            &mut TcpPacket::new_unchecked(packet.payload_mut()),
            &IpAddress::Ipv6(SRC6),
            &IpAddress::Ipv6(DST6),
            &checksums,
        );
        buf
    }

    /// (window, checksum valid) of an IPv4 or IPv6 packet's TCP segment.
    fn window_of(packet: &[u8]) -> (u16, bool) {
        if packet[0] >> 4 == 4 {
            let ip = Ipv4Packet::new_checked(packet).unwrap();
            let tcp = TcpPacket::new_checked(ip.payload()).unwrap();
            let ok = tcp.verify_checksum(&IpAddress::Ipv4(SRC4), &IpAddress::Ipv4(DST4));
            (tcp.window_len(), ok)
        } else {
            let ip = Ipv6Packet::new_checked(packet).unwrap();
            let tcp = TcpPacket::new_checked(ip.payload()).unwrap();
            let ok = tcp.verify_checksum(&IpAddress::Ipv6(SRC6), &IpAddress::Ipv6(DST6));
            (tcp.window_len(), ok)
        }
    }

    #[test]
    fn acks_advertise_one_window_unit_less_with_a_valid_checksum() {
        let payload: Vec<u8> = (0..1379u32).map(|i| (i * 7) as u8).collect();
        for window in [1u16, 2, 0x00ff, 0x0100, 0x8000, 0xfffe, 0xffff] {
            for data in [&[][..], &payload[..], &payload[..1]] {
                for control in [TcpControl::None, TcpControl::Psh, TcpControl::Fin] {
                    let tcp = segment(control, true, window, data);
                    for mut packet in [ipv4(&tcp), ipv6(&tcp)] {
                        let before = packet.clone();
                        retract_receive_window(&mut packet);
                        assert_eq!(window_of(&packet), (window - 1, true), "{tcp}");
                        // Nothing but the window and the checksum changed.
                        let changed: Vec<usize> = (0..packet.len())
                            .filter(|i| packet[*i] != before[*i])
                            .collect();
                        assert!(changed.len() <= 4, "{changed:?}");
                    }
                }
            }
        }
    }

    #[test]
    fn syns_resets_zero_windows_and_non_tcp_are_left_alone() {
        let untouched = [
            segment(TcpControl::Syn, false, 64240, &[]),
            segment(TcpControl::Syn, true, 64240, &[]),
            segment(TcpControl::Rst, true, 100, &[]),
            segment(TcpControl::Rst, false, 0, &[]),
            segment(TcpControl::None, true, 0, &[]),
            segment(TcpControl::None, true, 0, b"probe"),
        ];
        for tcp in &untouched {
            for mut packet in [ipv4(tcp), ipv6(tcp)] {
                let before = packet.clone();
                retract_receive_window(&mut packet);
                assert_eq!(packet, before, "{tcp}");
            }
        }
        // A UDP packet, truncated packets, garbage: unchanged, no panic.
        let mut udp = ipv4(&segment(TcpControl::None, true, 9, b"x"));
        udp[9] = 17;
        let before = udp.clone();
        retract_receive_window(&mut udp);
        assert_eq!(udp, before);
        let full = ipv4(&segment(TcpControl::None, true, 9, b"x"));
        for len in 0..full.len() {
            let mut cut = full[..len].to_vec();
            retract_receive_window(&mut cut);
        }
        let mut junk = vec![0x4f; 80];
        retract_receive_window(&mut junk);
        let mut junk6 = vec![0x60; 30];
        retract_receive_window(&mut junk6);
    }
}
