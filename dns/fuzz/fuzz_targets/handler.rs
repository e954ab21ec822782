//! Raw bytes as a UDP query to the agent DNS: the checks are in
//! `fuzz/harness.rs` (the fast path's answer equals the hickory path's, no
//! panic, a well-formed answer that fits the client's UDP size).
//!
//! From dns/: `mkdir -p fuzz/corpus/handler && cargo +nightly fuzz run
//! handler fuzz/corpus/handler fuzz/seeds/handler` (new inputs go to the
//! first, ignored by git; the second holds hand-made queries, one per kind
//! of answer, and malformed ones). `cargo test -p dns --test fuzz_seeds`
//! replays the seeds and mutations of them without nightly.

#![no_main]

#[path = "../harness.rs"]
mod harness;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| harness::check_datagram(data));
