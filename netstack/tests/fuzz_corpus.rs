//! Runs the fuzz targets' inputs in a normal `cargo test`, so CI exercises
//! the receive path without a nightly toolchain: the committed corpus
//! (`netstack/fuzz/corpus/<target>/`), the seeds made fresh, and a few
//! thousand seeded random and mutated inputs.
//!
//! `GSTACKS_WRITE_FUZZ_CORPUS=1 cargo test -p netstack --test fuzz_corpus`
//! rewrites the seed files of the corpus.

#[path = "../fuzz/harness.rs"]
mod harness;

use std::path::PathBuf;

fn corpus_dir(target: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target)
}

fn run(target: &str, input: &[u8]) {
    match target {
        "receive" => harness::receive(input),
        "inner" => harness::inner(input),
        other => panic!("unknown fuzz target {other}"),
    }
}

#[test]
fn committed_corpus_replays_without_panic() {
    if std::env::var("GSTACKS_WRITE_FUZZ_CORPUS").as_deref() == Ok("1") {
        for (target, name, input) in harness::seeds() {
            let dir = corpus_dir(target);
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join(name), input).unwrap();
        }
    }
    for target in ["receive", "inner"] {
        let dir = corpus_dir(target);
        let mut count = 0;
        for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
            let path = entry.unwrap().path();
            let input = std::fs::read(&path).unwrap();
            run(target, &input);
            count += 1;
        }
        assert!(
            count >= 5,
            "corpus {} has only {count} inputs",
            dir.display()
        );
    }
}

#[test]
fn captured_initiation_still_completes_a_handshake() {
    // The corpus is only worth replaying if its handshake is still valid
    // for the fixed keys: the node must answer it with a response.
    let init = std::fs::read(corpus_dir("receive").join("handshake_initiation")).unwrap();
    let now = std::time::Instant::now();
    let mut node = harness::node(now);
    node.handle_udp(now, "192.0.2.1:51820".parse().unwrap(), &init[3..]);
    node.handle_timeout(now);
    let sent = harness::check_transmits(&mut node);
    assert!(
        sent.iter().any(|(_, d)| d[0] == 2),
        "no handshake response to the committed initiation"
    );
}

#[test]
fn packets_from_outside_allowed_ips_are_dropped_and_counted() {
    let mut session = harness::Session::establish();
    let before = session.node.status().total_drops().total();
    let spoofed = harness::ipv4_tcp(
        std::net::Ipv4Addr::new(10, 0, 0, 1),
        harness::NODE_V4,
        40000,
        harness::TCP_PORT,
        1,
        0,
        0x02,
        &[],
    );
    session.send_inner(&spoofed);
    assert!(
        session.deliver_to_peer().is_empty(),
        "node answered a spoofed source"
    );
    assert_eq!(session.node.status().total_drops().total(), before + 1);
    // The same SYN from the peer's own address is answered (SYN-ACK).
    let syn = harness::ipv4_tcp(
        harness::PEER_V4,
        harness::NODE_V4,
        40000,
        harness::TCP_PORT,
        1,
        0,
        0x02,
        &[],
    );
    session.send_inner(&syn);
    let answers = session.deliver_to_peer();
    assert!(
        answers
            .iter()
            .any(|p| p.len() >= 40 && p[33] & 0x12 == 0x12),
        "no SYN-ACK to the peer's SYN"
    );
}

#[test]
fn random_and_mutated_inputs_never_panic() {
    let mut rng = harness::Rng(0x005e_ed0f_f022);
    let seeds = harness::seeds();
    for round in 0..1_500 {
        let (target, _, seed) = &seeds[round % seeds.len()];
        let input = if round % 3 == 0 {
            let len = (rng.next() % 400) as usize;
            rng.bytes(len)
        } else {
            rng.mutate(seed)
        };
        run(target, &input);
    }
}
