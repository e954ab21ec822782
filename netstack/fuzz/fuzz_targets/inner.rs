//! Arbitrary inner IP packets over an authenticated session (see
//! `../harness.rs`).
#![no_main]

#[path = "../harness.rs"]
mod harness;

libfuzzer_sys::fuzz_target!(|data: &[u8]| harness::inner(data));
