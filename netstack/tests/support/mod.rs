//! An in-memory network for sans-IO `Node`s: a simulated link with latency
//! and loss, and a virtual clock. No sockets, no sleeps, no real time.

#![allow(dead_code)]

use std::collections::VecDeque;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use netstack::{ConnectState, Node, PeerConfig, PrivateKey, SocketId};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

pub const LATENCY: Duration = Duration::from_millis(1);

pub struct SimNode {
    pub node: Node,
    pub key: PrivateKey,
    /// The node's (simulated) UDP address.
    pub udp: SocketAddr,
    pub v4: IpAddr,
    pub v6: IpAddr,
    /// A node that is down neither runs nor receives.
    pub down: bool,
}

/// A datagram on the wire.
#[derive(Clone, Debug)]
pub struct Datagram {
    pub at: Instant,
    pub from: SocketAddr,
    pub to: SocketAddr,
    pub bytes: Vec<u8>,
}

impl Datagram {
    pub fn kind(&self) -> u8 {
        self.bytes.first().copied().unwrap_or(0)
    }

    /// A WireGuard transport message with an empty payload.
    pub fn is_keepalive(&self) -> bool {
        self.kind() == 4 && self.bytes.len() == 32
    }
}

pub struct Sim {
    pub start: Instant,
    pub now: Instant,
    pub nodes: Vec<SimNode>,
    in_flight: VecDeque<Datagram>,
    /// Every datagram any node sent, in order (lost ones included).
    pub log: Vec<Datagram>,
    pub loss: f64,
    /// Bytes per second each node's uplink carries (`None`: unlimited).
    /// Datagrams then leave one after another and arrive spread out, as on
    /// a real link, instead of all a step's datagrams arriving at once.
    pub bandwidth: Option<u64>,
    /// When each node's uplink is free again (with `bandwidth`).
    uplink_free: Vec<Instant>,
    rng: StdRng,
}

pub fn v4(n: u8) -> IpAddr {
    IpAddr::from([100, 64, 0, n])
}

pub fn v6(n: u8) -> IpAddr {
    IpAddr::from([0xfd00, 0, 0, 0, 0, 0, 0, u16::from(n)])
}

pub fn udp_addr(n: u8) -> SocketAddr {
    SocketAddr::from(([192, 0, 2, n], 51820))
}

impl Sim {
    /// `count` nodes numbered 1..=count, not yet peered.
    pub fn new(count: u8) -> Sim {
        let start = Instant::now();
        let nodes = (1..=count)
            .map(|n| {
                let key = PrivateKey::generate();
                SimNode {
                    node: Node::new(key.clone(), &[v4(n), v6(n)], vec![], start).unwrap(),
                    key,
                    udp: udp_addr(n),
                    v4: v4(n),
                    v6: v6(n),
                    down: false,
                }
            })
            .collect();
        Sim {
            start,
            now: start,
            nodes,
            in_flight: VecDeque::new(),
            log: Vec::new(),
            loss: 0.0,
            bandwidth: None,
            uplink_free: vec![start; usize::from(count)],
            rng: StdRng::seed_from_u64(7),
        }
    }

    /// Node `i` as a peer (with its endpoint).
    pub fn peer_of(&self, i: usize) -> PeerConfig {
        let n = &self.nodes[i];
        PeerConfig {
            public_key: n.key.public_key(),
            endpoint: Some(n.udp),
            allowed_ips: vec![
                format!("{}/32", n.v4).parse().unwrap(),
                format!("{}/128", n.v6).parse().unwrap(),
            ],
            persistent_keepalive: None,
            preshared_key: None,
        }
    }

    /// Peer every node with every other.
    pub fn full_mesh(&mut self) {
        for i in 0..self.nodes.len() {
            let peers = (0..self.nodes.len())
                .filter(|j| *j != i)
                .map(|j| self.peer_of(j))
                .collect();
            let now = self.now;
            self.nodes[i].node.set_peers(peers, now).unwrap();
        }
    }

    pub fn elapsed(&self) -> Duration {
        self.now - self.start
    }

    /// Inject a datagram as if `from` had sent it to node `to`.
    pub fn inject(&mut self, from: SocketAddr, to: usize, bytes: &[u8]) {
        let now = self.now;
        self.nodes[to].node.handle_udp(now, from, bytes);
    }

    /// Run every node at the current time and put what they send on the wire.
    /// Returns whether anything happened.
    pub fn step(&mut self) -> bool {
        let mut progress = false;
        let now = self.now;
        // Deliver what has arrived.
        while self.in_flight.front().is_some_and(|d| d.at <= now) {
            let d = self.in_flight.pop_front().unwrap();
            if let Some(node) = self.nodes.iter_mut().find(|n| n.udp == d.to && !n.down) {
                node.node.handle_udp(now, d.from, &d.bytes);
            }
            progress = true;
        }
        for i in 0..self.nodes.len() {
            if self.nodes[i].down {
                continue;
            }
            self.nodes[i].node.handle_timeout(now);
            while let Some(t) = self.nodes[i].node.poll_transmit() {
                progress = true;
                let mut at = now + LATENCY;
                if let Some(rate) = self.bandwidth {
                    let wire = Duration::from_nanos(
                        (t.contents.len() as u64 * 1_000_000_000).div_ceil(rate.max(1)),
                    );
                    let done = self.uplink_free[i].max(now) + wire;
                    self.uplink_free[i] = done;
                    at = done + LATENCY;
                }
                let d = Datagram {
                    at,
                    from: self.nodes[i].udp,
                    to: t.destination,
                    bytes: t.contents,
                };
                self.log.push(d.clone());
                if self.loss > 0.0 && self.rng.random_bool(self.loss) {
                    continue;
                }
                // Keep the wire ordered by arrival (uplinks differ in backlog).
                let slot = self.in_flight.partition_point(|x| x.at <= d.at);
                self.in_flight.insert(slot, d);
            }
        }
        progress
    }

    fn next_event(&mut self) -> Option<Instant> {
        let mut next = self.in_flight.front().map(|d| d.at);
        for n in self.nodes.iter_mut().filter(|n| !n.down) {
            if let Some(t) = n.node.poll_timeout() {
                next = Some(next.map_or(t, |x: Instant| x.min(t)));
            }
        }
        next
    }

    /// Run until `done` holds (checked after every step) or `limit` of
    /// virtual time passes. Returns whether `done` held.
    pub fn run_until(&mut self, limit: Duration, mut done: impl FnMut(&mut Sim) -> bool) -> bool {
        let deadline = self.now + limit;
        let mut spins = 0;
        loop {
            let progress = self.step();
            if done(self) {
                return true;
            }
            let next = self.next_event();
            match next {
                Some(t) if t > self.now => {
                    if t > deadline {
                        self.now = deadline;
                        self.step();
                        return done(self);
                    }
                    self.now = t;
                    spins = 0;
                }
                Some(_) => {
                    spins += 1;
                    assert!(
                        spins < 100_000 || progress,
                        "a node keeps asking to be polled at {:?} without progress",
                        self.elapsed()
                    );
                    if spins >= 100_000 {
                        spins = 0;
                    }
                }
                None => {
                    if self.now >= deadline {
                        return done(self);
                    }
                    self.now = deadline;
                }
            }
        }
    }

    /// Restart node `i` from scratch (same key and peers, no state), as
    /// after a crash.
    pub fn restart(&mut self, i: usize) {
        let peers = (0..self.nodes.len())
            .filter(|j| *j != i)
            .map(|j| self.peer_of(j))
            .collect();
        let n = &self.nodes[i];
        self.nodes[i].node = Node::new(n.key.clone(), &[n.v4, n.v6], peers, self.now).unwrap();
        self.nodes[i].down = false;
    }

    /// Advance the virtual clock by `d`, running everything due meanwhile.
    pub fn run_for(&mut self, d: Duration) {
        self.run_until(d, |_| false);
    }

    /// Connect node `a` to `port` on `remote` and wait until established.
    pub fn connect(&mut self, a: usize, remote: SocketAddr) -> SocketId {
        let id = self.nodes[a].node.tcp_connect(remote).unwrap();
        let ok = self.run_until(Duration::from_secs(60), |s| {
            s.nodes[a].node.tcp_connect_state(id) != ConnectState::Connecting
        });
        assert!(ok, "connect to {remote} did not finish");
        assert_eq!(
            self.nodes[a].node.tcp_connect_state(id),
            ConnectState::Established
        );
        id
    }

    /// Accept one connection on node `b`, port `port`.
    pub fn accept(&mut self, b: usize, port: u16) -> SocketId {
        let mut got = None;
        let ok = self.run_until(Duration::from_secs(60), |s| {
            got = s.nodes[b].node.tcp_accept(port, None);
            got.is_some()
        });
        assert!(ok, "no connection accepted on port {port}");
        got.unwrap().0
    }

    /// Send `data` from (node a, socket sa) to (node b, socket sb), then FIN;
    /// return what b read until EOF.
    pub fn transfer(
        &mut self,
        (a, sa): (usize, SocketId),
        (b, sb): (usize, SocketId),
        data: &[u8],
        limit: Duration,
    ) -> Vec<u8> {
        let mut sent = 0;
        let mut closed = false;
        let mut received = Vec::new();
        let mut eof = false;
        let mut buf = vec![0u8; 65536];
        let ok = self.run_until(limit, |s| {
            while sent < data.len() {
                match s.nodes[a].node.tcp_send(sa, &data[sent..], None) {
                    Ok(n) => sent += n,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(e) => panic!("send failed: {e}"),
                }
            }
            if sent == data.len() && !closed {
                s.nodes[a].node.tcp_shutdown(sa);
                closed = true;
            }
            loop {
                match s.nodes[b].node.tcp_recv(sb, &mut buf, None) {
                    Ok(0) => {
                        eof = true;
                        break;
                    }
                    Ok(n) => received.extend_from_slice(&buf[..n]),
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(e) => panic!("recv failed after {} bytes: {e}", received.len()),
                }
            }
            eof
        });
        assert!(
            ok,
            "transfer stalled: sent {sent}, received {}",
            received.len()
        );
        received
    }

    /// Send `data` from (node a, socket sa) and read exactly that many
    /// bytes at (node b, socket sb), without closing.
    pub fn transfer_some(
        &mut self,
        (a, sa): (usize, SocketId),
        (b, sb): (usize, SocketId),
        data: &[u8],
    ) -> Vec<u8> {
        let mut sent = 0;
        let mut received = Vec::new();
        let mut buf = vec![0u8; 65536];
        let ok = self.run_until(Duration::from_secs(30), |s| {
            while sent < data.len() {
                match s.nodes[a].node.tcp_send(sa, &data[sent..], None) {
                    Ok(n) => sent += n,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(e) => panic!("send failed: {e}"),
                }
            }
            loop {
                match s.nodes[b].node.tcp_recv(sb, &mut buf, None) {
                    Ok(0) => panic!("unexpected EOF"),
                    Ok(n) => received.extend_from_slice(&buf[..n]),
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(e) => panic!("recv failed: {e}"),
                }
            }
            received.len() >= data.len()
        });
        assert!(ok, "stalled: sent {sent}, received {}", received.len());
        received
    }
}
