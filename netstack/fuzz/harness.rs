//! What the fuzz targets run, shared with the corpus replay test
//! (`netstack/tests/fuzz_corpus.rs` includes this file with `#[path]`).
//!
//! - [`receive`]: arbitrary UDP datagrams, from the peer's endpoint or from a
//!   stranger, into a [`Node`] that knows one peer: the whole unauthenticated
//!   receive path (message parsing, handshakes, cookies, replay windows).
//! - [`inner`]: a real handshake with a boringtun peer first, then arbitrary
//!   inner IP packets that the peer encrypts: the authenticated path (inner
//!   packet parsing, allowed-IPs checks, smoltcp).
//!
//! Both check after every datagram that whatever the node sends is a
//! well-formed WireGuard message, and panic otherwise (a fuzz finding).
//! Keys are fixed so that captured handshakes in the corpus stay valid.

#![allow(dead_code)]

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use boringtun::noise::rate_limiter::RateLimiter;
use boringtun::noise::{Tunn, TunnResult};
use netstack::{Node, PeerConfig, PrivateKey};

/// The node under test.
pub const NODE_KEY: [u8; 32] = [0x11; 32];
/// Its one peer.
pub const PEER_KEY: [u8; 32] = [0x22; 32];
pub const NODE_V4: Ipv4Addr = Ipv4Addr::new(100, 64, 0, 2);
pub const PEER_V4: Ipv4Addr = Ipv4Addr::new(100, 64, 0, 1);
pub const TCP_PORT: u16 = 7;
pub const UDP_PORT: u16 = 53;

fn peer_endpoint() -> SocketAddr {
    SocketAddr::from(([192, 0, 2, 1], 51820))
}

fn senders() -> [SocketAddr; 3] {
    [
        peer_endpoint(),
        SocketAddr::from(([198, 51, 100, 7], 4444)),
        SocketAddr::from(([0x2001, 0xdb8, 0, 0, 0, 0, 0, 9], 51820)),
    ]
}

/// A node with its peer, a TCP listener and a UDP socket.
pub fn node(now: Instant) -> Node {
    let peer = PeerConfig {
        public_key: PrivateKey::from_bytes(PEER_KEY).public_key(),
        endpoint: Some(peer_endpoint()),
        allowed_ips: vec![
            "100.64.0.1/32".parse().unwrap(),
            "fd00::1/128".parse().unwrap(),
        ],
        persistent_keepalive: None,
        preshared_key: None,
    };
    let addresses = [IpAddr::V4(NODE_V4), "fd00::2".parse().unwrap()];
    let mut node = Node::new(
        PrivateKey::from_bytes(NODE_KEY),
        &addresses,
        vec![peer],
        now,
    )
    .expect("fixed node config is valid");
    node.tcp_listen(TCP_PORT).expect("listen");
    node.udp_bind(UDP_PORT).expect("udp bind");
    node
}

/// Panics unless every queued transmit is a well-formed WireGuard message;
/// returns them.
pub fn check_transmits(node: &mut Node) -> Vec<(SocketAddr, Vec<u8>)> {
    let mut out = Vec::new();
    while let Some(transmit) = node.poll_transmit() {
        let bytes = &transmit.contents;
        assert!(
            bytes.len() >= 4,
            "node sent a {}-byte datagram",
            bytes.len()
        );
        assert_eq!(&bytes[1..4], &[0, 0, 0], "reserved bytes set");
        match bytes[0] {
            1 => assert_eq!(bytes.len(), 148, "handshake initiation size"),
            2 => assert_eq!(bytes.len(), 92, "handshake response size"),
            3 => assert_eq!(bytes.len(), 64, "cookie reply size"),
            // 16-byte header and tag; boringtun does not pad the payload.
            4 => assert!(bytes.len() >= 32, "data message size {}", bytes.len()),
            other => panic!("node sent message type {other}"),
        }
        out.push((transmit.destination, transmit.contents));
    }
    out
}

/// Splits fuzz input into frames: a 2-byte big-endian length, then that
/// many bytes (or what is left).
fn frames(mut data: &[u8]) -> impl Iterator<Item = (u8, &[u8])> {
    std::iter::from_fn(move || {
        if data.len() < 3 {
            return None;
        }
        let tag = data[0];
        let len = usize::from(u16::from_be_bytes([data[1], data[2]]));
        let rest = &data[3..];
        let take = len.min(rest.len());
        let (frame, tail) = rest.split_at(take);
        data = tail;
        Some((tag, frame))
    })
}

/// Frames for [`receive`] and [`inner`]: `tag`, length, bytes.
pub fn frame(tag: u8, bytes: &[u8]) -> Vec<u8> {
    let len = u16::try_from(bytes.len()).expect("frame fits u16");
    let mut out = vec![tag];
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(bytes);
    out
}

/// Arbitrary datagrams into the node. Each frame's tag picks the sender
/// (low 2 bits) and how far the virtual clock moves first (the rest, in
/// seconds), so timers and expiry run too.
pub fn receive(data: &[u8]) {
    let start = Instant::now();
    let mut now = start;
    let mut node = node(now);
    let senders = senders();
    for (tag, datagram) in frames(data) {
        now += Duration::from_secs(u64::from(tag >> 2));
        let from = senders[usize::from(tag & 3) % senders.len()];
        node.handle_udp(now, from, datagram);
        node.handle_timeout(now);
        check_transmits(&mut node);
        let _ = node.status();
    }
}

/// A boringtun peer with a session established with a fresh node.
pub struct Session {
    pub node: Node,
    pub peer: Tunn,
    pub now: Instant,
}

impl Session {
    pub fn establish() -> Session {
        let now = Instant::now();
        let mut node = node(now);
        let peer_secret = x25519_dalek::StaticSecret::from(PEER_KEY);
        let node_public =
            x25519_dalek::PublicKey::from(&x25519_dalek::StaticSecret::from(NODE_KEY));
        let peer_public = x25519_dalek::PublicKey::from(&peer_secret);
        let limiter = Arc::new(RateLimiter::new(&peer_public, 1000));
        let mut peer = Tunn::new(peer_secret, node_public, None, None, 1, Some(limiter));
        let mut buf = vec![0u8; 2048];
        let init = match peer.format_handshake_initiation(&mut buf, false) {
            TunnResult::WriteToNetwork(init) => init.to_vec(),
            _ => panic!("boringtun made no initiation"),
        };
        node.handle_udp(now, peer_endpoint(), &init);
        node.handle_timeout(now);
        let mut session = Session { node, peer, now };
        session.deliver_to_peer();
        session
    }

    /// The node's datagrams to the peer, decrypted by it; what the peer sends
    /// back (keepalives, queued packets) goes to the node. Returns the inner
    /// packets the peer received.
    pub fn deliver_to_peer(&mut self) -> Vec<Vec<u8>> {
        let mut inner = Vec::new();
        let mut buf = vec![0u8; 65536 + 64];
        for _round in 0..8 {
            let transmits = check_transmits(&mut self.node);
            if transmits.is_empty() {
                break;
            }
            let mut back = Vec::new();
            for (_, datagram) in transmits {
                let mut first = true;
                loop {
                    let input: &[u8] = if first { &datagram } else { &[] };
                    first = false;
                    match self.peer.decapsulate(None, input, &mut buf) {
                        TunnResult::WriteToNetwork(out) => back.push(out.to_vec()),
                        TunnResult::WriteToTunnelV4(p, _) | TunnResult::WriteToTunnelV6(p, _) => {
                            inner.push(p.to_vec());
                            break;
                        }
                        TunnResult::Done | TunnResult::Err(_) => break,
                    }
                }
            }
            for datagram in back {
                self.node.handle_udp(self.now, peer_endpoint(), &datagram);
            }
            self.node.handle_timeout(self.now);
        }
        inner
    }

    /// Encrypts an inner packet as the peer and feeds it to the node.
    pub fn send_inner(&mut self, packet: &[u8]) {
        let mut buf = vec![0u8; packet.len() + 64];
        if let TunnResult::WriteToNetwork(datagram) = self.peer.encapsulate(packet, &mut buf) {
            let datagram = datagram.to_vec();
            self.node.handle_udp(self.now, peer_endpoint(), &datagram);
            self.node.handle_timeout(self.now);
        }
    }
}

/// Arbitrary inner packets, authenticated: each frame is one IP packet the
/// peer encrypts; the tag moves the virtual clock (milliseconds).
pub fn inner(data: &[u8]) {
    let mut session = Session::establish();
    for (tag, packet) in frames(data) {
        session.now += Duration::from_millis(u64::from(tag) * 10);
        session.send_inner(packet);
        session.deliver_to_peer();
        let _ = session.node.status();
    }
}

// ---- building packets for the corpus ----

fn checksum(chunks: &[&[u8]]) -> u16 {
    let mut sum: u32 = 0;
    for chunk in chunks {
        for pair in chunk.chunks(2) {
            let word = u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]);
            sum += u32::from(word);
        }
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An IPv4 TCP segment with valid checksums (every header field a test
/// varies is a parameter).
#[allow(clippy::too_many_arguments)]
pub fn ipv4_tcp(
    src: Ipv4Addr,
    dst: Ipv4Addr,
    sport: u16,
    dport: u16,
    seq: u32,
    ack: u32,
    flags: u8,
    payload: &[u8],
) -> Vec<u8> {
    let mut tcp = Vec::with_capacity(20 + payload.len());
    tcp.extend_from_slice(&sport.to_be_bytes());
    tcp.extend_from_slice(&dport.to_be_bytes());
    tcp.extend_from_slice(&seq.to_be_bytes());
    tcp.extend_from_slice(&ack.to_be_bytes());
    tcp.push(5 << 4);
    tcp.push(flags);
    tcp.extend_from_slice(&65535u16.to_be_bytes());
    tcp.extend_from_slice(&[0, 0, 0, 0]);
    tcp.extend_from_slice(payload);
    let len = u16::try_from(tcp.len()).expect("small segment");
    let pseudo = [
        &src.octets()[..],
        &dst.octets()[..],
        &[0, 6],
        &len.to_be_bytes()[..],
    ]
    .concat();
    let sum = checksum(&[&pseudo, &tcp]);
    tcp[16..18].copy_from_slice(&sum.to_be_bytes());
    ipv4(src, dst, 6, &tcp)
}

/// An IPv4 UDP datagram with valid checksums.
pub fn ipv4_udp(src: Ipv4Addr, dst: Ipv4Addr, sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let len = u16::try_from(8 + payload.len()).expect("small datagram");
    let mut udp = Vec::new();
    udp.extend_from_slice(&sport.to_be_bytes());
    udp.extend_from_slice(&dport.to_be_bytes());
    udp.extend_from_slice(&len.to_be_bytes());
    udp.extend_from_slice(&[0, 0]);
    udp.extend_from_slice(payload);
    let pseudo = [
        &src.octets()[..],
        &dst.octets()[..],
        &[0, 17],
        &len.to_be_bytes()[..],
    ]
    .concat();
    let sum = checksum(&[&pseudo, &udp]);
    udp[6..8].copy_from_slice(&sum.to_be_bytes());
    ipv4(src, dst, 17, &udp)
}

fn ipv4(src: Ipv4Addr, dst: Ipv4Addr, protocol: u8, payload: &[u8]) -> Vec<u8> {
    let total = u16::try_from(20 + payload.len()).expect("small packet");
    let mut ip = vec![0x45, 0];
    ip.extend_from_slice(&total.to_be_bytes());
    ip.extend_from_slice(&[0, 1, 0x40, 0, 64, protocol, 0, 0]);
    ip.extend_from_slice(&src.octets());
    ip.extend_from_slice(&dst.octets());
    let sum = checksum(&[&ip]);
    ip[10..12].copy_from_slice(&sum.to_be_bytes());
    ip.extend_from_slice(payload);
    ip
}

/// The seed corpus: `(target, name, input)`. The handshake messages are
/// made with the fixed keys, so they stay valid for [`receive`].
pub fn seeds() -> Vec<(&'static str, &'static str, Vec<u8>)> {
    let mut seeds = Vec::new();
    // A live exchange: the peer's initiation, then its keepalive and a data
    // packet under that session (a fresh node rejects the data: replayed
    // keys), and the node's response as if reflected back.
    let mut session = Session::establish();
    let peer_secret = x25519_dalek::StaticSecret::from(PEER_KEY);
    let node_public = x25519_dalek::PublicKey::from(&x25519_dalek::StaticSecret::from(NODE_KEY));
    let mut fresh = Tunn::new(peer_secret, node_public, None, None, 2, None);
    let mut buf = vec![0u8; 2048];
    let init = match fresh.format_handshake_initiation(&mut buf, false) {
        TunnResult::WriteToNetwork(init) => init.to_vec(),
        _ => unreachable!("boringtun makes an initiation"),
    };
    let syn = ipv4_tcp(PEER_V4, NODE_V4, 40000, TCP_PORT, 1000, 0, 0x02, &[]);
    let data = match session.peer.encapsulate(&syn, &mut buf) {
        TunnResult::WriteToNetwork(d) => d.to_vec(),
        _ => unreachable!("session is up"),
    };
    seeds.push(("receive", "handshake_initiation", frame(0, &init)));
    seeds.push((
        "receive",
        "initiation_then_data",
        [frame(0, &init), frame(0, &data)].concat(),
    ));
    seeds.push(("receive", "initiation_from_stranger", frame(1, &init)));
    seeds.push((
        "receive",
        "initiation_replayed_after_a_minute",
        [frame(0, &init), frame(60 << 2, &init)].concat(),
    ));
    seeds.push(("receive", "truncated_initiation", frame(0, &init[..100])));
    let mut forged = init.clone();
    forged[40] ^= 0x80;
    seeds.push(("receive", "forged_initiation", frame(0, &forged)));
    seeds.push((
        "receive",
        "data_unknown_index",
        frame(
            0,
            &[
                4, 0, 0, 0, 9, 9, 9, 9, 0, 0, 0, 0, 0, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11,
                12, 13, 14, 15, 16,
            ],
        ),
    ));
    seeds.push((
        "receive",
        "cookie_reply_garbage",
        frame(
            2,
            &[3, 0, 0, 0, 1, 0, 0, 0]
                .iter()
                .copied()
                .chain([0x5a; 56])
                .collect::<Vec<u8>>(),
        ),
    ));
    seeds.push((
        "receive",
        "garbage",
        frame(0, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"),
    ));
    seeds.push(("receive", "empty", frame(0, &[])));

    seeds.push(("inner", "tcp_syn_to_listener", frame(0, &syn)));
    let rst_payload = ipv4_tcp(PEER_V4, NODE_V4, 40000, TCP_PORT, 1001, 0, 0x04, &[]);
    seeds.push((
        "inner",
        "tcp_syn_data_reset",
        [
            frame(0, &syn),
            frame(
                1,
                &ipv4_tcp(PEER_V4, NODE_V4, 40000, TCP_PORT, 1001, 1, 0x18, b"hello"),
            ),
            frame(1, &rst_payload),
        ]
        .concat(),
    ));
    seeds.push((
        "inner",
        "udp_to_socket",
        frame(0, &ipv4_udp(PEER_V4, NODE_V4, 5353, UDP_PORT, b"query")),
    ));
    seeds.push((
        "inner",
        "source_outside_allowed_ips",
        frame(
            0,
            &ipv4_tcp(
                Ipv4Addr::new(10, 0, 0, 1),
                NODE_V4,
                40000,
                TCP_PORT,
                1,
                0,
                0x02,
                &[],
            ),
        ),
    ));
    seeds.push(("inner", "truncated_ip_header", frame(0, &syn[..12])));
    seeds.push((
        "inner",
        "ipv6_garbage",
        frame(0, &[0x60, 0, 0, 0, 0, 8, 17, 64]),
    ));
    seeds.push(("inner", "empty_keepalive", frame(0, &[])));
    seeds
}

/// Bytes from a seeded xorshift generator, for the random-input loops of the
/// replay test.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    pub fn bytes(&mut self, len: usize) -> Vec<u8> {
        (0..len).map(|_| self.next() as u8).collect()
    }

    /// A copy of `input` with a few bytes flipped, cut or repeated.
    pub fn mutate(&mut self, input: &[u8]) -> Vec<u8> {
        let mut out = input.to_vec();
        for _ in 0..1 + self.next() % 4 {
            if out.is_empty() {
                out = self.bytes(8);
            }
            let at = (self.next() as usize) % out.len();
            match self.next() % 4 {
                0 => out[at] ^= 1 << (self.next() % 8),
                1 => out[at] = self.next() as u8,
                2 => out.truncate(at),
                _ => {
                    let tail = out[at..].to_vec();
                    out.extend_from_slice(&tail);
                }
            }
        }
        out
    }
}
