//! Raw bytes as a UDP query to the agent DNS handler: it must never panic,
//! and whatever it answers must be a DNS message that fits the client's UDP
//! size.
//!
//! From dns/: `mkdir -p fuzz/corpus/handler && cargo +nightly fuzz run
//! handler fuzz/corpus/handler fuzz/seeds/handler` (new inputs go to the
//! first, ignored by git; the second holds hand-made queries, one per kind
//! of answer).

#![no_main]

use std::{
    net::{Ipv4Addr, SocketAddr},
    sync::OnceLock,
};

use dns::{DnsHandler, ListenerAddrs, RecordTable, Records, Upstream};
use libfuzzer_sys::fuzz_target;

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

fuzz_target!(|data: &[u8]| {
    let (runtime, handler) = handler();
    let src = SocketAddr::from((Ipv4Addr::LOCALHOST, 5353));
    if let Some(answer) = runtime.block_on(handler.answer_datagram(data.to_vec(), src)) {
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
});
