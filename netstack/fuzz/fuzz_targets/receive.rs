//! Arbitrary UDP datagrams into a `Node` (see `../harness.rs`).
#![no_main]

#[path = "../harness.rs"]
mod harness;

libfuzzer_sys::fuzz_target!(|data: &[u8]| harness::receive(data));
