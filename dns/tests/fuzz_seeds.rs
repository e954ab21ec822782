//! Replays the `handler` fuzz target's seeds (`dns/fuzz/seeds/handler/`) and
//! a few thousand seeded mutations of them through the target's checks
//! (`dns/fuzz/harness.rs`) in a normal `cargo test`: no panic, and the fast
//! path's answers are byte for byte the hickory path's.

#[path = "../fuzz/harness.rs"]
mod harness;

use std::path::PathBuf;

use rand::{rngs::StdRng, Rng, SeedableRng};

fn seeds() -> Vec<(String, Vec<u8>)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds/handler");
    let mut seeds: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            (name, std::fs::read(&path).unwrap())
        })
        .collect();
    seeds.sort();
    seeds
}

#[test]
fn seeds_replay_through_both_paths() {
    let seeds = seeds();
    assert!(seeds.len() >= 15, "only {} seeds", seeds.len());
    for (name, input) in &seeds {
        eprintln!("seed {name}");
        harness::check_datagram(input);
    }
}

#[test]
fn mutated_seeds_replay_through_both_paths() {
    let seeds = seeds();
    let mut rng = StdRng::seed_from_u64(0xd05_f457);
    for round in 0..20_000 {
        let mut input = seeds[round % seeds.len()].1.clone();
        match round % 5 {
            0 => input.truncate(rng.random_range(0..=input.len())),
            1 => input.push(rng.random()),
            // Case flips keep most names known to the fast path.
            2 => {
                for byte in input.iter_mut().skip(12) {
                    if byte.is_ascii_alphabetic() && rng.random_bool(0.3) {
                        *byte ^= 0x20;
                    }
                }
            }
            _ => {
                for _ in 0..rng.random_range(1..4) {
                    if input.is_empty() {
                        break;
                    }
                    let at = rng.random_range(0..input.len());
                    input[at] = rng.random();
                }
            }
        }
        harness::check_datagram(&input);
    }
}
