//! Protocol behaviour of sans-IO `Node`s over a simulated link with a
//! virtual clock: handshakes, data, rekeying, keepalives, roaming, peer
//! removal and packet loss. No sockets, no sleeps.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use netstack::{DropReason, REJECT_AFTER_TIME, REKEY_AFTER_TIME, REKEY_ATTEMPT_TIME};
use sha2::{Digest, Sha256};
use support::{udp_addr, Sim};

const HANDSHAKE_INIT: u8 = 1;

fn initiations_from(sim: &Sim, node: usize) -> usize {
    let from = sim.nodes[node].udp;
    sim.log
        .iter()
        .filter(|d| d.from == from && d.kind() == HANDSHAKE_INIT)
        .count()
}

fn pattern(len: usize, seed: u32) -> Vec<u8> {
    let mut x = seed.wrapping_mul(2_654_435_761).max(1);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

/// UDP datagram from node a to node b over the overlay, checked on arrival.
fn udp_exchange(sim: &mut Sim, a: usize, b: usize, port: u16, payload: &[u8]) {
    let sa = sim.nodes[a]
        .node
        .udp_bind(port)
        .unwrap_or_else(|_| panic!("bind {port}"));
    let sb = sim.nodes[b].node.udp_bind(port).unwrap();
    let dst = SocketAddr::new(sim.nodes[b].v4, port);
    sim.nodes[a]
        .node
        .udp_send_to(sa, payload, dst, None)
        .unwrap();
    let mut got = None;
    let ok = sim.run_until(Duration::from_secs(30), |s| {
        let mut buf = [0u8; 2048];
        if let Ok((n, from)) = s.nodes[b].node.udp_recv_from(sb, &mut buf, None) {
            got = Some((buf[..n].to_vec(), from));
        }
        got.is_some()
    });
    assert!(ok, "datagram from node {a} to node {b} never arrived");
    let (bytes, from) = got.unwrap();
    assert_eq!(bytes, payload);
    assert_eq!(from, SocketAddr::new(sim.nodes[a].v4, port));
    sim.nodes[a].node.udp_release(sa);
    sim.nodes[b].node.udp_release(sb);
}

#[test]
fn handshake_from_either_side_and_data_both_ways() {
    for initiator in [0, 1] {
        let responder = 1 - initiator;
        let mut sim = Sim::new(2);
        sim.full_mesh();
        udp_exchange(&mut sim, initiator, responder, 5000, b"hello");
        assert_eq!(
            initiations_from(&sim, initiator),
            1,
            "one handshake, from {initiator}"
        );
        assert_eq!(initiations_from(&sim, responder), 0);
        udp_exchange(&mut sim, responder, initiator, 5001, b"hello back");
        assert_eq!(
            initiations_from(&sim, responder),
            0,
            "the session is reused"
        );

        // TCP both ways over the same session, v4 and v6.
        let listener_port = 80;
        sim.nodes[responder].node.tcp_listen(listener_port).unwrap();
        let remote = SocketAddr::new(sim.nodes[responder].v6, listener_port);
        let client = sim.connect(initiator, remote);
        let server = sim.accept(responder, listener_port);
        let up = pattern(300_000, 1);
        let got = sim.transfer(
            (initiator, client),
            (responder, server),
            &up,
            Duration::from_secs(60),
        );
        assert_eq!(got, up);
        let down = pattern(200_000, 2);
        let got = sim.transfer(
            (responder, server),
            (initiator, client),
            &down,
            Duration::from_secs(60),
        );
        assert_eq!(got, down);

        for (me, other) in [(initiator, responder), (responder, initiator)] {
            let status = sim.nodes[me].node.status();
            let peer = status.peer(&sim.nodes[other].key.public_key()).unwrap();
            assert!(peer.last_handshake.is_some());
            assert!(
                peer.tx_bytes > 200_000 && peer.rx_bytes > 200_000,
                "{peer:?}"
            );
            assert_eq!(
                status.total_drops().total(),
                0,
                "{:?}",
                status.total_drops()
            );
        }
    }
}

#[test]
fn rekey_after_rekey_after_time_keeps_the_stream_going() {
    let mut sim = Sim::new(2);
    sim.full_mesh();
    sim.nodes[1].node.tcp_listen(80).unwrap();
    let remote = SocketAddr::new(sim.nodes[1].v4, 80);
    let client = sim.connect(0, remote);
    let server = sim.accept(1, 80);
    let first = sim.nodes[0].node.status().peers[0].last_handshake.unwrap();
    assert_eq!(initiations_from(&sim, 0), 1);

    // A message every 5 seconds for 150 seconds of virtual time.
    let mut buf = [0u8; 64];
    for i in 0..30u8 {
        sim.nodes[0].node.tcp_send(client, &[i; 10], None).unwrap();
        let ok = sim.run_until(Duration::from_secs(5), |s| {
            s.nodes[1]
                .node
                .tcp_recv(server, &mut buf, None)
                .is_ok_and(|n| n == 10)
        });
        assert!(ok, "message {i} lost at {:?}", sim.elapsed());
        assert_eq!(buf[..10], [i; 10]);
        let elapsed = sim.elapsed();
        sim.run_until(
            Duration::from_secs(5).saturating_sub(sim.elapsed() - elapsed),
            |_| false,
        );
    }
    assert!(sim.elapsed() > REKEY_AFTER_TIME + Duration::from_secs(20));
    assert_eq!(
        initiations_from(&sim, 0),
        2,
        "the initiator rekeys once after REKEY_AFTER_TIME"
    );
    assert_eq!(initiations_from(&sim, 1), 0, "the responder does not rekey");
    let rekey = sim
        .log
        .iter()
        .filter(|d| d.kind() == HANDSHAKE_INIT)
        .nth(1)
        .unwrap()
        .at;
    let rekey_after = rekey - sim.start;
    assert!(
        rekey_after >= REKEY_AFTER_TIME && rekey_after < REKEY_AFTER_TIME + Duration::from_secs(6),
        "rekeyed at {rekey_after:?}"
    );
    for node in 0..2 {
        let last = sim.nodes[node].node.status().peers[0]
            .last_handshake
            .unwrap();
        assert!(
            last - first >= REKEY_AFTER_TIME,
            "node {node} has the new session"
        );
        assert_eq!(sim.nodes[node].node.status().total_drops().total(), 0);
    }
}

#[test]
fn persistent_and_passive_keepalives() {
    let mut sim = Sim::new(2);
    let mut a_peer = sim.peer_of(1);
    a_peer.persistent_keepalive = Some(25);
    let b_peer = sim.peer_of(0);
    let now = sim.now;
    sim.nodes[0].node.set_peers(vec![a_peer], now).unwrap();
    sim.nodes[1].node.set_peers(vec![b_peer], now).unwrap();
    // With a persistent keepalive the node brings the session up by itself.
    sim.run_for(Duration::from_secs(1));
    assert_eq!(initiations_from(&sim, 0), 1);
    assert!(sim.nodes[1].node.status().peers[0].last_handshake.is_some());
    let a = sim.nodes[0].udp;
    let before = sim
        .log
        .iter()
        .filter(|d| d.from == a && d.is_keepalive())
        .count();
    sim.run_for(Duration::from_secs(100));
    let keepalives: Vec<_> = sim
        .log
        .iter()
        .filter(|d| d.from == a && d.is_keepalive())
        .map(|d| (d.at - sim.start).as_secs())
        .collect();
    assert_eq!(keepalives.len() - before, 4, "every 25 s: {keepalives:?}");

    // Passive keepalive: B sends data; A has nothing to say; within
    // KEEPALIVE_TIMEOUT A confirms receipt with a keepalive.
    let mut sim = Sim::new(2);
    sim.full_mesh();
    udp_exchange(&mut sim, 0, 1, 6000, b"ping");
    let b = sim.nodes[1].udp;
    let start = sim.now;
    sim.run_for(Duration::from_secs(11));
    let from_b: Vec<_> = sim
        .log
        .iter()
        .filter(|d| d.from == b && d.at > start && d.is_keepalive())
        .collect();
    assert_eq!(from_b.len(), 1, "one passive keepalive from the receiver");
    let at = from_b[0].at - start;
    assert!(
        at >= Duration::from_secs(9) && at <= Duration::from_secs(11),
        "{at:?}"
    );
    // And then silence: no traffic without data.
    let count = sim.log.len();
    sim.run_for(Duration::from_secs(300));
    assert_eq!(
        sim.log.len(),
        count,
        "an idle tunnel without persistent keepalive is silent"
    );
}

#[test]
fn roaming_follows_authenticated_packets() {
    let mut sim = Sim::new(2);
    sim.full_mesh();
    sim.nodes[0].node.tcp_listen(80).unwrap();
    let remote = SocketAddr::new(sim.nodes[0].v4, 80);
    let client = sim.connect(1, remote);
    let server = sim.accept(0, 80);
    // Node 1 moves to a new UDP address (NAT rebinding, new network).
    let moved = SocketAddr::from(([198, 51, 100, 7], 40000));
    sim.nodes[1].udp = moved;
    let data = pattern(100_000, 3);
    let got = sim.transfer((1, client), (0, server), &data, Duration::from_secs(60));
    assert_eq!(got, data);
    let back = pattern(100_000, 4);
    let got = sim.transfer((0, server), (1, client), &back, Duration::from_secs(60));
    assert_eq!(got, back);
    let status = sim.nodes[0].node.status();
    assert_eq!(status.peers[0].endpoint, Some(moved));
    // A forged packet from elsewhere does not move the endpoint.
    let mut forged = sim
        .log
        .iter()
        .rev()
        .find(|d| d.from == moved && d.kind() == 4)
        .unwrap()
        .bytes
        .clone();
    let last = forged.len() - 1;
    forged[last] ^= 1;
    sim.inject(udp_addr(66), 0, &forged);
    assert_eq!(sim.nodes[0].node.status().peers[0].endpoint, Some(moved));
}

#[test]
fn removing_a_peer_stops_its_traffic_and_keeps_the_others() {
    let mut sim = Sim::new(3);
    sim.full_mesh();
    sim.nodes[0].node.tcp_listen(80).unwrap();
    let to_a = SocketAddr::new(sim.nodes[0].v4, 80);
    let from_c = sim.connect(2, to_a);
    let at_a_c = sim.accept(0, 80);
    udp_exchange(&mut sim, 1, 0, 7000, b"from b");
    let inits_before = initiations_from(&sim, 2) + initiations_from(&sim, 0);

    // A drops B; C stays (same config).
    let keep = vec![sim.peer_of(2)];
    let now = sim.now;
    sim.nodes[0].node.set_peers(keep, now).unwrap();

    // A can no longer reach B.
    let (b_v4, a_v4) = (sim.nodes[1].v4, sim.nodes[0].v4);
    let sa = sim.nodes[0].node.udp_bind(7001).unwrap();
    let err = sim.nodes[0]
        .node
        .udp_send_to(sa, b"x", SocketAddr::new(b_v4, 7001), None)
        .unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::HostUnreachable);
    assert!(sim.nodes[0]
        .node
        .tcp_connect(SocketAddr::new(b_v4, 80))
        .is_err());
    // B's packets to A are dropped, never answered.
    let sb = sim.nodes[1].node.udp_bind(7002).unwrap();
    sim.nodes[1]
        .node
        .udp_send_to(sb, b"still there?", SocketAddr::new(a_v4, 7002), None)
        .unwrap();
    let b_addr = sim.nodes[1].udp;
    let a_addr = sim.nodes[0].udp;
    let log_start = sim.log.len();
    sim.run_for(Duration::from_secs(30));
    let a_drops = sim.nodes[0].node.status().drops;
    assert!(a_drops.get(DropReason::UnknownIndex) + a_drops.get(DropReason::UnknownPeer) > 0);
    assert!(
        !sim.log[log_start..]
            .iter()
            .any(|d| d.from == a_addr && d.to == b_addr),
        "A never answers the removed peer"
    );

    // C's connection was not disturbed: no new handshake, data still flows.
    let data = pattern(50_000, 5);
    let got = sim.transfer((2, from_c), (0, at_a_c), &data, Duration::from_secs(60));
    assert_eq!(got, data);
    let inits: Vec<_> = sim
        .log
        .iter()
        .filter(|d| d.kind() == HANDSHAKE_INIT)
        .map(|d| (d.from, d.to, d.at - sim.start))
        .collect();
    assert_eq!(
        initiations_from(&sim, 2) + initiations_from(&sim, 0),
        inits_before,
        "{inits:?}"
    );
}

#[test]
fn five_percent_loss_still_delivers_a_tcp_stream_intact() {
    let mut sim = Sim::new(2);
    sim.full_mesh();
    sim.loss = 0.05;
    sim.nodes[1].node.tcp_listen(443).unwrap();
    let remote = SocketAddr::new(sim.nodes[1].v4, 443);
    let client = sim.connect(0, remote);
    let server = sim.accept(1, 443);
    let data = pattern(4 << 20, 6);
    let got = sim.transfer((0, client), (1, server), &data, Duration::from_secs(600));
    assert_eq!(got.len(), data.len());
    assert_eq!(Sha256::digest(&got), Sha256::digest(&data));
    let lost = sim.log.len();
    assert!(
        lost > 3000,
        "the stream crossed the lossy link ({lost} datagrams)"
    );
}

#[test]
fn the_initiator_rekeys_before_reject_after_time_when_only_receiving() {
    let mut sim = Sim::new(2);
    sim.full_mesh();
    sim.nodes[1].node.tcp_listen(80).unwrap();
    let client = sim.connect(0, SocketAddr::new(sim.nodes[1].v4, 80));
    let server = sim.accept(1, 80);
    // Only the responder (node 1) sends, every 5 s, for 250 s.
    let mut buf = [0u8; 64];
    for i in 0..50u8 {
        sim.nodes[1].node.tcp_send(server, &[i; 8], None).unwrap();
        let ok = sim.run_until(Duration::from_secs(5), |s| {
            s.nodes[0]
                .node
                .tcp_recv(client, &mut buf, None)
                .is_ok_and(|n| n == 8)
        });
        assert!(ok, "message {i} lost at {:?}", sim.elapsed());
        let elapsed = sim.elapsed();
        sim.run_until(
            Duration::from_secs(5).saturating_sub(sim.elapsed() - elapsed),
            |_| false,
        );
    }
    assert!(sim.elapsed() > REJECT_AFTER_TIME + Duration::from_secs(60));
    assert_eq!(
        initiations_from(&sim, 1),
        0,
        "{:?}",
        sim.nodes[1].node.status()
    );
    assert!(initiations_from(&sim, 0) >= 2);
    for node in 0..2 {
        let drops = sim.nodes[node].node.status().total_drops();
        assert_eq!(drops.total(), 0, "node {node}: {drops:?}");
    }
}

#[test]
fn a_vanished_peer_is_retried_within_limits_and_a_restarted_one_recovers() {
    let mut sim = Sim::new(2);
    sim.full_mesh();
    udp_exchange(&mut sim, 0, 1, 4000, b"before");
    // Node 1 crashes.
    sim.nodes[1].down = true;
    let sa = sim.nodes[0].node.udp_bind(4001).unwrap();
    let dst = SocketAddr::new(sim.nodes[1].v4, 4001);
    sim.nodes[0]
        .node
        .udp_send_to(sa, b"anyone?", dst, None)
        .unwrap();
    let inits_before = initiations_from(&sim, 0);
    sim.run_for(Duration::from_secs(300));
    let retries = initiations_from(&sim, 0) - inits_before;
    // After 15 s of silence a handshake, retried every 5-5.33 s, given up
    // after REKEY_ATTEMPT_TIME: then quiet.
    let max = (REKEY_ATTEMPT_TIME.as_secs() / 5 + 1) as usize;
    assert!((10..=max).contains(&retries), "{retries} initiations");
    let quiet_since = sim.log.len();
    sim.run_for(Duration::from_secs(300));
    assert_eq!(
        sim.log.len(),
        quiet_since,
        "no traffic once the handshake gave up"
    );

    // Node 1 comes back with no state; new traffic brings the session back.
    sim.restart(1);
    udp_exchange(&mut sim, 0, 1, 4002, b"after restart");
    udp_exchange(&mut sim, 1, 0, 4003, b"and back");
}

#[test]
fn a_restarted_node_handshakes_as_soon_as_a_stale_session_reaches_it() {
    let mut sim = Sim::new(2);
    sim.full_mesh();
    udp_exchange(&mut sim, 0, 1, 4000, b"before");
    // Node 1 restarts; node 0 still holds the old session and sends on it.
    sim.restart(1);
    let inits_before = initiations_from(&sim, 1);
    let sa = sim.nodes[0].node.udp_bind(4001).unwrap();
    let dst = SocketAddr::new(sim.nodes[1].v4, 4001);
    sim.nodes[0]
        .node
        .udp_send_to(sa, b"lost", dst, None)
        .unwrap();
    let start = sim.elapsed();
    // Node 1 cannot decrypt it and handshakes with node 0 at once, instead
    // of the path staying dead until node 0's 15 s silence timer.
    let ok = sim.run_until(Duration::from_secs(30), |s| {
        initiations_from(s, 1) > inits_before
    });
    assert!(ok, "node 1 never handshook");
    assert!(
        sim.elapsed() - start < Duration::from_secs(1),
        "handshake {:?} after the stale data",
        sim.elapsed() - start
    );
    sim.nodes[0].node.udp_release(sa);
    let start = sim.elapsed();
    // Let the handshake finish (a datagram sent meanwhile would still go
    // out on the stale session and be lost, as the first one was).
    sim.run_for(Duration::from_millis(100));
    udp_exchange(&mut sim, 0, 1, 4002, b"after restart");
    udp_exchange(&mut sim, 1, 0, 4003, b"and back");
    assert!(sim.elapsed() - start < Duration::from_secs(1));
    assert_eq!(initiations_from(&sim, 1) - inits_before, 1);
}

#[test]
fn simultaneous_initiations_converge() {
    let mut sim = Sim::new(2);
    sim.full_mesh();
    let s0 = sim.nodes[0].node.udp_bind(3000).unwrap();
    let s1 = sim.nodes[1].node.udp_bind(3000).unwrap();
    let (v0, v1) = (sim.nodes[0].v4, sim.nodes[1].v4);
    // Both send before either has a session: the initiations cross.
    sim.nodes[0]
        .node
        .udp_send_to(s0, b"from 0", SocketAddr::new(v1, 3000), None)
        .unwrap();
    sim.nodes[1]
        .node
        .udp_send_to(s1, b"from 1", SocketAddr::new(v0, 3000), None)
        .unwrap();
    let mut got = [false, false];
    let ok = sim.run_until(Duration::from_secs(30), |s| {
        let mut buf = [0u8; 64];
        for (i, sock) in [(0, s0), (1, s1)] {
            if s.nodes[i].node.udp_recv_from(sock, &mut buf, None).is_ok() {
                got[i] = true;
            }
        }
        got == [true, true]
    });
    assert!(ok, "crossing handshakes did not converge: {got:?}");
    assert!(initiations_from(&sim, 0) >= 1 && initiations_from(&sim, 1) >= 1);
    // And the tunnel keeps working both ways afterwards.
    udp_exchange(&mut sim, 0, 1, 3001, b"later");
    udp_exchange(&mut sim, 1, 0, 3002, b"later back");
    let count = initiations_from(&sim, 0) + initiations_from(&sim, 1);
    let log: Vec<_> = sim
        .log
        .iter()
        .map(|d| {
            (
                d.from.ip().to_string(),
                d.kind(),
                d.bytes.len(),
                (d.at - sim.start).as_millis(),
            )
        })
        .collect();
    assert!(count <= 3, "{count} initiations: {log:?}");
}

#[test]
fn preshared_keys_must_match() {
    let psk = netstack::PresharedKey::generate();
    for matching in [true, false] {
        let mut sim = Sim::new(2);
        let mut to_1 = sim.peer_of(1);
        let mut to_0 = sim.peer_of(0);
        to_1.preshared_key = Some(psk.clone());
        to_0.preshared_key = Some(if matching {
            psk.clone()
        } else {
            netstack::PresharedKey::generate()
        });
        let now = sim.now;
        sim.nodes[0].node.set_peers(vec![to_1], now).unwrap();
        sim.nodes[1].node.set_peers(vec![to_0], now).unwrap();
        if matching {
            udp_exchange(&mut sim, 0, 1, 2000, b"with psk");
        } else {
            let s = sim.nodes[0].node.udp_bind(2000).unwrap();
            let dst = SocketAddr::new(sim.nodes[1].v4, 2000);
            sim.nodes[0].node.udp_send_to(s, b"x", dst, None).unwrap();
            sim.run_for(Duration::from_secs(20));
            for node in 0..2 {
                assert!(sim.nodes[node].node.status().peers[0]
                    .last_handshake
                    .is_none());
            }
            // The responder answered (it cannot know the PSK differs), the
            // initiator refused the answer.
            let drops = sim.nodes[0].node.status().total_drops();
            assert!(drops.get(DropReason::Unauthenticated) > 0, "{drops:?}");
        }
    }
}

#[test]
fn under_a_handshake_flood_only_cookie_replies_go_out_and_peers_still_connect() {
    let mut sim = Sim::new(2);
    sim.full_mesh();
    let target = sim.nodes[1].udp;
    // Strangers flood node 1 with valid initiations (MAC1 only needs node
    // 1's public key).
    let mut flood = Vec::new();
    let now = sim.now;
    for i in 0..300u32 {
        let mut stranger = netstack::Node::new(
            netstack::PrivateKey::generate(),
            &[support::v4(200)],
            vec![sim.peer_of(1)],
            now,
        )
        .unwrap();
        let s = stranger.udp_bind(1).unwrap();
        stranger
            .udp_send_to(s, b"x", SocketAddr::new(sim.nodes[1].v4, 1), None)
            .unwrap();
        stranger.handle_timeout(now);
        let t = stranger.poll_transmit().unwrap();
        assert_eq!(t.destination, target);
        flood.push((
            SocketAddr::from(([203, 0, 113, (i % 250) as u8], 1000 + i as u16)),
            t.contents,
        ));
    }
    let mut replies = Vec::new();
    for (from, bytes) in &flood {
        sim.nodes[1].node.handle_udp(now, *from, bytes);
        while let Some(t) = sim.nodes[1].node.poll_transmit() {
            replies.push(t);
        }
    }
    assert!(
        !replies.is_empty(),
        "a flood over the limit is answered with cookies"
    );
    for reply in &replies {
        assert_eq!(
            reply.contents[0], 3,
            "only cookie replies to unknown senders"
        );
        assert_eq!(reply.contents.len(), 64);
    }
    let drops = sim.nodes[1].node.status().drops;
    assert!(drops.get(DropReason::UnknownPeer) > 0, "{drops:?}");
    // The real peer still gets through: it is asked for a cookie, proves
    // its address with MAC2 on the retry, and the handshake completes.
    udp_exchange(&mut sim, 0, 1, 2100, b"through the flood");
}

/// Read everything from (node, socket) until EOF.
fn read_to_end(sim: &mut Sim, node: usize, socket: netstack::SocketId) -> Vec<u8> {
    let mut out = Vec::new();
    let mut buf = vec![0u8; 4096];
    let ok = sim.run_until(Duration::from_secs(10), |s| loop {
        match s.nodes[node].node.tcp_recv(socket, &mut buf, None) {
            Ok(0) => return true,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return false,
            Err(e) => panic!("read failed after {} bytes: {e}", out.len()),
        }
    });
    assert!(ok, "no EOF after {} bytes", out.len());
    out
}

#[test]
fn unread_bytes_survive_the_connection_closing_on_both_sides() {
    // Passive close: the peer sent data and FIN; we close our side before
    // reading (LAST-ACK, then Closed).
    let mut sim = Sim::new(2);
    sim.full_mesh();
    sim.nodes[1].node.tcp_listen(80).unwrap();
    let client = sim.connect(0, SocketAddr::new(sim.nodes[1].v4, 80));
    let server = sim.accept(1, 80);
    let data = pattern(100_000, 9);
    let mut sent = 0;
    let ok = sim.run_until(Duration::from_secs(10), |s| {
        if let Ok(n) = s.nodes[0].node.tcp_send(client, &data[sent..], None) {
            sent += n;
        }
        sent == data.len()
    });
    assert!(ok);
    sim.nodes[0].node.tcp_shutdown(client);
    // Wait until the FIN has arrived (CLOSE-WAIT), without reading.
    let ok = sim.run_until(Duration::from_secs(10), |s| {
        s.nodes[0].node.tcp_send_queue(client) == 0
    });
    assert!(ok);
    sim.run_for(Duration::from_millis(50));
    sim.nodes[1].node.tcp_shutdown(server);
    sim.run_for(Duration::from_secs(30));
    assert_eq!(read_to_end(&mut sim, 1, server), data);
    assert_eq!(read_to_end(&mut sim, 0, client), b"");

    // Active close: we half-close first, the peer then sends data and FIN;
    // we read only after TIME-WAIT is over.
    let mut sim = Sim::new(2);
    sim.full_mesh();
    sim.nodes[1].node.tcp_listen(80).unwrap();
    let client = sim.connect(0, SocketAddr::new(sim.nodes[1].v4, 80));
    let server = sim.accept(1, 80);
    sim.nodes[0].node.tcp_shutdown(client);
    sim.run_for(Duration::from_millis(50));
    let reply = pattern(50_000, 10);
    let mut sent = 0;
    let ok = sim.run_until(Duration::from_secs(10), |s| {
        if let Ok(n) = s.nodes[1].node.tcp_send(server, &reply[sent..], None) {
            sent += n;
        }
        sent == reply.len()
    });
    assert!(ok);
    sim.nodes[1].node.tcp_shutdown(server);
    sim.run_for(Duration::from_secs(30));
    assert_eq!(read_to_end(&mut sim, 0, client), reply);
}

#[test]
fn changing_keepalive_keeps_the_session_and_changing_the_psk_renegotiates() {
    let mut sim = Sim::new(2);
    sim.full_mesh();
    udp_exchange(&mut sim, 0, 1, 1000, b"up");
    assert_eq!(initiations_from(&sim, 0), 1);
    let mut with_keepalive = sim.peer_of(1);
    with_keepalive.persistent_keepalive = Some(5);
    let now = sim.now;
    sim.nodes[0]
        .node
        .set_peers(vec![with_keepalive.clone()], now)
        .unwrap();
    let a = sim.nodes[0].udp;
    let start = sim.log.len();
    sim.run_for(Duration::from_secs(21));
    let keepalives = sim.log[start..]
        .iter()
        .filter(|d| d.from == a && d.is_keepalive())
        .count();
    assert_eq!(keepalives, 4, "every 5 s on the kept session");
    assert_eq!(initiations_from(&sim, 0), 1, "no new handshake");

    // A new preshared key (on both sides) needs a new handshake, which
    // happens on the next packet.
    let psk = netstack::PresharedKey::generate();
    with_keepalive.preshared_key = Some(psk.clone());
    let mut back = sim.peer_of(0);
    back.preshared_key = Some(psk);
    let now = sim.now;
    sim.nodes[0]
        .node
        .set_peers(vec![with_keepalive], now)
        .unwrap();
    sim.nodes[1].node.set_peers(vec![back], now).unwrap();
    udp_exchange(&mut sim, 0, 1, 1001, b"with the new key");
    assert_eq!(initiations_from(&sim, 0), 2);
}

#[test]
fn idle_connections_are_parked_and_wake_on_traffic_from_either_side() {
    let mut sim = Sim::new(2);
    sim.full_mesh();
    sim.nodes[1].node.tcp_listen(80).unwrap();
    let remote = SocketAddr::new(sim.nodes[1].v4, 80);
    let mut pairs = Vec::new();
    for _ in 0..50 {
        let client = sim.connect(0, remote);
        let server = sim.accept(1, 80);
        pairs.push((client, server));
    }
    // One exchange each, then silence.
    for (i, (client, server)) in pairs.iter().enumerate() {
        let got = sim.transfer_some((0, *client), (1, *server), &[i as u8; 100]);
        assert_eq!(got, vec![i as u8; 100]);
    }
    // Each client has written one page of its send ring, each server one
    // page of its receive ring (and two listening sockets wait).
    let page = sim.nodes[0].node.tcp_buffer_memory().resident_bytes / 50;
    assert!(page >= 4096, "{:?}", sim.nodes[0].node.tcp_buffer_memory());
    assert_eq!(
        sim.nodes[1].node.tcp_buffer_memory(),
        netstack::BufferMemory {
            sockets: 52,
            resident_bytes: 50 * page
        }
    );
    sim.run_for(Duration::from_secs(5));
    assert_eq!(sim.nodes[0].node.parked_connections(), 50);
    assert_eq!(sim.nodes[1].node.parked_connections(), 50);
    // Parked, the send rings are given back; a receive ring keeps its page.
    assert_eq!(sim.nodes[0].node.tcp_buffer_memory().resident_bytes, 0);
    assert_eq!(
        sim.nodes[1].node.tcp_buffer_memory().resident_bytes,
        50 * page
    );
    // Parked sockets cost nothing: no traffic, no timers (after WireGuard's
    // own passive keepalive, 10 s after the last data).
    sim.run_for(Duration::from_secs(15));
    let quiet = sim.log.len();
    sim.run_for(Duration::from_secs(60));
    assert_eq!(sim.log.len(), quiet);
    // Traffic wakes them: half started by the client, half by the server.
    for (i, (client, server)) in pairs.iter().enumerate() {
        let payload = vec![(i * 3) as u8; 3000];
        let got = if i % 2 == 0 {
            sim.transfer_some((0, *client), (1, *server), &payload)
        } else {
            sim.transfer_some((1, *server), (0, *client), &payload)
        };
        assert_eq!(got, payload);
    }
    for node in 0..2 {
        assert_eq!(sim.nodes[node].node.status().total_drops().total(), 0);
    }
    // Closed on both sides, their slots come back, with nothing resident.
    for (client, server) in &pairs {
        sim.nodes[0].node.tcp_shutdown(*client);
        sim.nodes[0].node.tcp_release(*client);
        sim.nodes[1].node.tcp_shutdown(*server);
        sim.nodes[1].node.tcp_release(*server);
    }
    sim.run_for(Duration::from_secs(60));
    assert_eq!(
        sim.nodes[0].node.tcp_buffer_memory(),
        netstack::BufferMemory {
            sockets: 0,
            resident_bytes: 0
        }
    );
    assert_eq!(sim.nodes[1].node.tcp_buffer_memory().sockets, 2);
    assert_eq!(sim.nodes[1].node.tcp_buffer_memory().resident_bytes, 0);
}
