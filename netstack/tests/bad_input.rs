//! The receive path under hostile input: random datagrams, truncated,
//! replayed and forged WireGuard messages, unknown keys, inner packets from
//! outside a peer's allowed IPs. Everything is dropped and counted by
//! reason; nothing panics; nothing is answered.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use netstack::{DropReason, Node, PrivateKey};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use support::{udp_addr, v4, v6, Sim};

/// Two nodes with an established session and some traffic in the log.
fn established() -> Sim {
    let mut sim = Sim::new(2);
    sim.full_mesh();
    sim.nodes[1].node.tcp_listen(80).unwrap();
    let remote = SocketAddr::new(sim.nodes[1].v4, 80);
    let client = sim.connect(0, remote);
    let server = sim.accept(1, 80);
    let got = sim.transfer(
        (0, client),
        (1, server),
        &[9u8; 5000],
        Duration::from_secs(10),
    );
    assert_eq!(got.len(), 5000);
    sim
}

fn drops(sim: &Sim, node: usize) -> netstack::Drops {
    sim.nodes[node].node.status().total_drops()
}

/// Feed `datagrams` from `attacker` to node 1 and check nothing goes back.
fn feed_and_expect_silence(sim: &mut Sim, attacker: SocketAddr, datagrams: &[Vec<u8>]) {
    let now = sim.now;
    for d in datagrams {
        sim.nodes[1].node.handle_udp(now, attacker, d);
        sim.nodes[1].node.handle_timeout(now);
        while let Some(t) = sim.nodes[1].node.poll_transmit() {
            assert_ne!(
                t.destination, attacker,
                "answered an unauthenticated sender"
            );
        }
    }
}

#[test]
fn random_datagrams_are_dropped_as_malformed_or_unauthenticated() {
    let mut sim = established();
    let before = drops(&sim, 1).total();
    let mut rng = StdRng::seed_from_u64(1);
    let mut datagrams = Vec::new();
    for i in 0..20_000 {
        let len = match i % 4 {
            0 => rng.random_range(0..64),
            1 => [148, 92, 64, 32][rng.random_range(0..4)],
            _ => rng.random_range(0..1600),
        };
        let mut d: Vec<u8> = (0..len).map(|_| rng.random()).collect();
        if i % 2 == 0 && len >= 4 {
            // A plausible header: a valid type and zero reserved bytes.
            d[0] = rng.random_range(1..=4);
            d[1..4].fill(0);
        }
        datagrams.push(d);
    }
    let attacker = udp_addr(66);
    feed_and_expect_silence(&mut sim, attacker, &datagrams);
    let after = drops(&sim, 1);
    assert_eq!(after.total() - before, datagrams.len() as u64, "{after:?}");
    assert!(after.get(DropReason::Malformed) > 0);
    assert!(after.get(DropReason::UnknownIndex) + after.get(DropReason::Unauthenticated) > 0);
    // The session still works.
    let payload = b"still fine";
    let sa = sim.nodes[0].node.udp_bind(9).unwrap();
    let sb = sim.nodes[1].node.udp_bind(9).unwrap();
    let dst = SocketAddr::new(sim.nodes[1].v4, 9);
    sim.nodes[0]
        .node
        .udp_send_to(sa, payload, dst, None)
        .unwrap();
    let ok = sim.run_until(Duration::from_secs(5), |s| {
        let mut buf = [0u8; 64];
        s.nodes[1].node.udp_recv_from(sb, &mut buf, None).is_ok()
    });
    assert!(ok);
}

#[test]
fn truncated_replayed_and_forged_messages_are_dropped_by_reason() {
    let mut sim = established();
    let from_a = sim.nodes[0].udp;
    let to_b = sim.nodes[1].udp;
    let sent: Vec<Vec<u8>> = sim
        .log
        .iter()
        .filter(|d| d.from == from_a && d.to == to_b)
        .map(|d| d.bytes.clone())
        .collect();
    let init = sent.iter().find(|d| d[0] == 1).unwrap().clone();
    let data: Vec<Vec<u8>> = sent.iter().filter(|d| d[0] == 4).cloned().collect();
    assert!(data.len() > 3);

    // Truncated: every message cut at every length.
    let before = drops(&sim, 1);
    let mut truncated = Vec::new();
    for msg in [&init, &data[1]] {
        for len in 0..msg.len() {
            // Data messages stay well formed down to 32 bytes (then fail auth).
            truncated.push(msg[..len].to_vec());
        }
    }
    // Replayed through the real endpoint: the peer's own address must not
    // get answers to replays either (and they must not move anything).
    feed_and_expect_silence(&mut sim, from_a, &truncated);
    let after = drops(&sim, 1);
    let new = after.total() - before.total();
    assert_eq!(new, truncated.len() as u64, "{after:?}");
    assert!(after.get(DropReason::Malformed) > before.get(DropReason::Malformed));

    // Replayed transport messages and a replayed initiation.
    let before = drops(&sim, 1);
    feed_and_expect_silence(&mut sim, udp_addr(77), &data);
    feed_and_expect_silence(&mut sim, udp_addr(77), std::slice::from_ref(&init));
    let after = drops(&sim, 1);
    assert_eq!(
        after.get(DropReason::Replayed) - before.get(DropReason::Replayed),
        data.len() as u64 + 1,
        "{after:?}"
    );
    // A replay does not move the peer's endpoint.
    assert_eq!(sim.nodes[1].node.status().peers[0].endpoint, Some(from_a));

    // Forged: each data message with a fresh counter (old counters are
    // refused as replays before decryption) and one bit flipped.
    let before = drops(&sim, 1);
    let mut forged = Vec::new();
    let mut rng = StdRng::seed_from_u64(2);
    for (n, msg) in data.iter().enumerate() {
        let mut m = msg.clone();
        m[8..16].copy_from_slice(&(1_000_000 + n as u64).to_le_bytes());
        let i = rng.random_range(16..m.len());
        m[i] ^= 1 << rng.random_range(0..8);
        forged.push(m);
    }
    let mut bad_init = init.clone();
    bad_init[60] ^= 0x80;
    forged.push(bad_init);
    feed_and_expect_silence(&mut sim, udp_addr(78), &forged);
    let after = drops(&sim, 1);
    assert_eq!(
        after.get(DropReason::Unauthenticated) - before.get(DropReason::Unauthenticated),
        forged.len() as u64,
        "{after:?}"
    );
}

#[test]
fn unknown_keys_get_no_answer() {
    let mut sim = established();
    // A stranger that knows node 1's public key (it is public) but is not
    // one of its peers: a perfectly valid initiation.
    let stranger_key = PrivateKey::generate();
    let now = sim.now;
    let mut stranger = Node::new(stranger_key, &[v4(9), v6(9)], vec![sim.peer_of(1)], now).unwrap();
    let stranger_udp = udp_addr(99);
    let sock = stranger.udp_bind(1).unwrap();
    stranger
        .udp_send_to(
            sock,
            b"let me in",
            SocketAddr::new(sim.nodes[1].v4, 1),
            None,
        )
        .unwrap();
    stranger.handle_timeout(now);
    let mut messages = Vec::new();
    while let Some(t) = stranger.poll_transmit() {
        assert_eq!(t.destination, sim.nodes[1].udp);
        messages.push(t.contents);
    }
    assert_eq!(messages.len(), 1);
    assert_eq!(messages[0][0], 1, "an initiation");
    let before = drops(&sim, 1);
    feed_and_expect_silence(&mut sim, stranger_udp, &messages);
    let after = drops(&sim, 1);
    assert_eq!(
        after.get(DropReason::UnknownPeer) - before.get(DropReason::UnknownPeer),
        1
    );
}

#[test]
fn inner_packets_outside_allowed_ips_are_dropped() {
    let mut sim = Sim::new(2);
    sim.full_mesh();
    // Node 1 only accepts 100.64.0.200/32 from node 0, which sends from
    // 100.64.0.1: authenticated, but not allowed.
    let mut narrow = sim.peer_of(0);
    narrow.allowed_ips = vec![
        "100.64.0.200/32".parse().unwrap(),
        "fd00::1/128".parse().unwrap(),
    ];
    let now = sim.now;
    sim.nodes[1].node.set_peers(vec![narrow], now).unwrap();
    let sa = sim.nodes[0].node.udp_bind(5).unwrap();
    let sb = sim.nodes[1].node.udp_bind(5).unwrap();
    let dst = SocketAddr::new(sim.nodes[1].v4, 5);
    for _ in 0..3 {
        sim.nodes[0]
            .node
            .udp_send_to(sa, b"spoofed", dst, None)
            .unwrap();
    }
    // Also a packet to an address that is not node 1's.
    let sc = sim.nodes[0].node.udp_bind(6).unwrap();
    let mut wide = sim.peer_of(1);
    wide.allowed_ips.push("fd99::/16".parse().unwrap());
    let now = sim.now;
    sim.nodes[0].node.set_peers(vec![wide], now).unwrap();
    sim.nodes[0]
        .node
        .udp_send_to(sc, b"elsewhere", "[fd99::1]:6".parse().unwrap(), None)
        .unwrap();
    sim.run_for(Duration::from_secs(5));
    let mut buf = [0u8; 64];
    assert!(sim.nodes[1].node.udp_recv_from(sb, &mut buf, None).is_err());
    let peer_drops = &sim.nodes[1].node.status().peers[0].drops;
    assert_eq!(
        peer_drops.get(DropReason::SourceNotAllowed),
        3,
        "{peer_drops:?}"
    );
    assert_eq!(peer_drops.get(DropReason::NotForUs), 1, "{peer_drops:?}");
    // The IPv6 address is allowed: that path still works.
    let dst6 = SocketAddr::new(sim.nodes[1].v6, 5);
    sim.nodes[0]
        .node
        .udp_send_to(sa, b"fine", dst6, None)
        .unwrap();
    let ok = sim.run_until(Duration::from_secs(5), |s| {
        s.nodes[1].node.udp_recv_from(sb, &mut buf, None).is_ok()
    });
    assert!(ok);
}
