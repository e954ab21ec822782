//! The checks of the `handler` fuzz target, shared with
//! `dns/tests/fuzz_seeds.rs` (which replays the seeds and mutations of them
//! in a normal `cargo test`).
//!
//! Raw bytes as a UDP query: the server's answer (the fast path where it
//! knows the query, else the hickory path) must be byte for byte the hickory
//! path's answer, must not panic, and must be a DNS answer that fits the
//! client's UDP size, with the query's id and the QR bit.

use std::{
    net::{Ipv4Addr, SocketAddr},
    sync::OnceLock,
};

use dns::{DnsHandler, ListenerAddrs, RecordTable, Records, Upstream};

fn handler() -> &'static (tokio::runtime::Runtime, DnsHandler) {
    static HANDLER: OnceLock<(tokio::runtime::Runtime, DnsHandler)> = OnceLock::new();
    HANDLER.get_or_init(|| {
        let mut table = RecordTable::new();
        table
            .insert(
                "dev",
                "api",
                ListenerAddrs::v4(Ipv4Addr::new(127, 77, 0, 1)),
            )
            .expect("valid record");
        table
            .insert(
                "dev",
                "db",
                ListenerAddrs::v4(Ipv4Addr::new(127, 77, 0, 2))
                    .with_ipv6("fd00::2".parse().expect("ipv6")),
            )
            .expect("valid record");
        table
            .insert(
                "dev",
                "six",
                ListenerAddrs::v6("fd00::6".parse().expect("ipv6")),
            )
            .expect("valid record");
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        // No upstream: forwarded names answer SERVFAIL without any traffic.
        (
            runtime,
            DnsHandler::new(Records::new(table), Upstream::none()),
        )
    })
}

/// Runs one input through both paths and checks the answer.
pub fn check_datagram(data: &[u8]) {
    let (runtime, handler) = handler();
    let src = SocketAddr::from((Ipv4Addr::LOCALHOST, 5353));
    let served = runtime.block_on(handler.answer_datagram(data.to_vec(), src));
    let hickory = runtime.block_on(handler.answer_datagram_hickory(data.to_vec(), src));
    assert_eq!(
        served, hickory,
        "the served answer differs from the hickory path's for {data:02x?}"
    );
    let Some(answer) = served else {
        return;
    };
    assert!(answer.len() >= 12, "answer shorter than a header");
    assert!(
        answer.len() <= 1232,
        "answer of {} bytes over UDP",
        answer.len()
    );
    assert_eq!(
        answer[..2],
        data[..2],
        "answer id differs from the query id"
    );
    assert_eq!(answer[2] & 0x80, 0x80, "answer without the QR bit");
}
