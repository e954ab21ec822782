//! The agent DNS on real sockets on 127.0.0.1: local answers, forwarding to a
//! small upstream DNS server on loopback (no traffic leaves the machine),
//! UDP and TCP, live table updates, garbage, shutdown, and `dig` as a peer.

use std::{
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
    process::Command,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use dns::{DnsServer, ListenerAddrs, RecordTable, Records, Upstream, RECORD_TTL_SECS};
use hickory_proto::{
    op::{Edns, Message, MessageType, OpCode, Query, ResponseCode},
    rr::{
        rdata::{A, SOA, TXT},
        Name, RData, Record, RecordType,
    },
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream, UdpSocket},
    task::JoinHandle,
    time::timeout,
};

/// Every wait in these tests is bounded by this deadline.
const DEADLINE: Duration = Duration::from_secs(10);

const API_V4: Ipv4Addr = Ipv4Addr::new(127, 77, 0, 1);
const API_V6: Ipv6Addr = Ipv6Addr::LOCALHOST;
const DB_V4: Ipv4Addr = Ipv4Addr::new(127, 77, 0, 2);
const UPSTREAM_ANSWER: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 7);

fn table() -> RecordTable {
    let mut table = RecordTable::new();
    table
        .insert("dev", "api", ListenerAddrs::v4(API_V4).with_ipv6(API_V6))
        .unwrap();
    table.insert("dev", "db", ListenerAddrs::v4(DB_V4)).unwrap();
    table
}

fn loopback() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

fn query(name: &str, query_type: RecordType, edns: bool) -> Message {
    let mut message = Message::new(rand_id(), MessageType::Query, OpCode::Query);
    message.metadata.recursion_desired = true;
    message.add_query(Query::query(Name::from_ascii(name).unwrap(), query_type));
    if edns {
        let mut edns = Edns::new();
        edns.set_max_payload(1232);
        message.set_edns(edns);
    }
    message
}

fn rand_id() -> u16 {
    static NEXT: AtomicUsize = AtomicUsize::new(1000);
    NEXT.fetch_add(1, Ordering::Relaxed) as u16
}

async fn ask_udp(server: SocketAddr, message: &Message) -> Message {
    let socket = UdpSocket::bind(loopback()).await.unwrap();
    socket.connect(server).await.unwrap();
    socket.send(&message.to_vec().unwrap()).await.unwrap();
    let mut buf = vec![0; 65_535];
    let len = timeout(DEADLINE, socket.recv(&mut buf))
        .await
        .expect("a UDP answer before the deadline")
        .unwrap();
    let answer = Message::from_vec(&buf[..len]).unwrap();
    assert_eq!(answer.metadata.id, message.metadata.id);
    assert_eq!(answer.metadata.message_type, MessageType::Response);
    answer
}

async fn ask_tcp_on(stream: &mut TcpStream, message: &Message) -> Message {
    let bytes = message.to_vec().unwrap();
    let mut framed = (bytes.len() as u16).to_be_bytes().to_vec();
    framed.extend_from_slice(&bytes);
    stream.write_all(&framed).await.unwrap();
    let answer = timeout(DEADLINE, async {
        let len = stream.read_u16().await.unwrap();
        let mut buf = vec![0; usize::from(len)];
        stream.read_exact(&mut buf).await.unwrap();
        buf
    })
    .await
    .expect("a TCP answer before the deadline");
    let answer = Message::from_vec(&answer).unwrap();
    assert_eq!(answer.metadata.id, message.metadata.id);
    answer
}

async fn ask_tcp(server: SocketAddr, message: &Message) -> Message {
    let mut stream = TcpStream::connect(server).await.unwrap();
    ask_tcp_on(&mut stream, message).await
}

fn addresses(answer: &Message) -> Vec<String> {
    answer.answers.iter().map(|r| r.data.to_string()).collect()
}

/// A tiny authoritative-looking server on loopback standing in for the
/// host's resolver. Names:
/// - `example.test` A: 192.0.2.7
/// - `missing.test`: NXDOMAIN with an SOA
/// - `refused.test`: REFUSED
/// - `big.test` TXT: 40 long strings; over UDP only a truncated (TC) answer
/// - `silent.test`: never answered
struct FakeUpstream {
    addr: SocketAddr,
    queries: Arc<AtomicUsize>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for FakeUpstream {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

fn upstream_answer(request: &Message, over_tcp: bool) -> Option<Message> {
    let question = request.queries.first()?;
    let name = question.name().to_ascii().to_ascii_lowercase();
    let mut answer = Message::new(request.metadata.id, MessageType::Response, OpCode::Query);
    answer.metadata.recursion_desired = request.metadata.recursion_desired;
    answer.metadata.recursion_available = true;
    answer.add_query(question.clone());
    if let Some(edns) = &request.edns {
        let mut ours = Edns::new();
        ours.set_max_payload(edns.max_payload());
        answer.set_edns(ours);
    }
    let owner = question.name().clone();
    match name.as_str() {
        "example.test." => {
            answer.add_answer(Record::from_rdata(owner, 300, RData::A(A(UPSTREAM_ANSWER))));
        }
        "missing.test." => {
            answer.metadata.response_code = ResponseCode::NXDomain;
            let apex = Name::from_ascii("test.").unwrap();
            let soa = SOA::new(apex.clone(), apex.clone(), 7, 60, 60, 60, 60);
            answer.add_authority(Record::from_rdata(apex, 60, RData::SOA(soa)));
        }
        "refused.test." => answer.metadata.response_code = ResponseCode::Refused,
        "big.test." if over_tcp => {
            for i in 0..40 {
                let text = format!("{i:03}-{}", "x".repeat(96));
                answer.add_answer(Record::from_rdata(
                    owner.clone(),
                    300,
                    RData::TXT(TXT::new(vec![text])),
                ));
            }
        }
        "big.test." => answer.metadata.truncation = true,
        "silent.test." => return None,
        _ => answer.metadata.response_code = ResponseCode::NXDomain,
    }
    Some(answer)
}

async fn start_upstream() -> FakeUpstream {
    let udp = UdpSocket::bind(loopback()).await.unwrap();
    let addr = udp.local_addr().unwrap();
    let tcp = TcpListener::bind(addr).await.unwrap();
    let queries = Arc::new(AtomicUsize::new(0));

    let counter = queries.clone();
    let udp_task = tokio::spawn(async move {
        let mut buf = vec![0; 65_535];
        loop {
            let Ok((len, from)) = udp.recv_from(&mut buf).await else {
                return;
            };
            let Ok(request) = Message::from_vec(&buf[..len]) else {
                continue;
            };
            counter.fetch_add(1, Ordering::Relaxed);
            if let Some(answer) = upstream_answer(&request, false) {
                let _ = udp.send_to(&answer.to_vec().unwrap(), from).await;
            }
        }
    });
    let counter = queries.clone();
    let tcp_task = tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = tcp.accept().await else {
                return;
            };
            let counter = counter.clone();
            tokio::spawn(async move {
                while let Ok(len) = stream.read_u16().await {
                    let mut buf = vec![0; usize::from(len)];
                    if stream.read_exact(&mut buf).await.is_err() {
                        return;
                    }
                    let Ok(request) = Message::from_vec(&buf) else {
                        return;
                    };
                    counter.fetch_add(1, Ordering::Relaxed);
                    if let Some(answer) = upstream_answer(&request, true) {
                        let bytes = answer.to_vec().unwrap();
                        let mut framed = (bytes.len() as u16).to_be_bytes().to_vec();
                        framed.extend_from_slice(&bytes);
                        if stream.write_all(&framed).await.is_err() {
                            return;
                        }
                    }
                }
            });
        }
    });
    FakeUpstream {
        addr,
        queries,
        tasks: vec![udp_task, tcp_task],
    }
}

async fn start(records: Records, upstream: Upstream) -> DnsServer {
    let server = DnsServer::bind(loopback(), records, upstream)
        .await
        .unwrap();
    assert_ne!(server.local_addr().port(), 0);
    server
}

#[tokio::test]
async fn aliases_answer_a_and_aaaa_over_udp_and_tcp() {
    let server = start(Records::new(table()), Upstream::none()).await;
    let addr = server.local_addr();

    let answer = ask_udp(addr, &query("api.dev.gstacks.", RecordType::A, false)).await;
    assert_eq!(answer.metadata.response_code, ResponseCode::NoError);
    assert!(answer.metadata.authoritative);
    assert_eq!(addresses(&answer), vec![API_V4.to_string()]);
    assert_eq!(answer.answers[0].ttl, RECORD_TTL_SECS);

    let answer = ask_udp(addr, &query("Api.Dev.GSTACKS.", RecordType::AAAA, true)).await;
    assert_eq!(addresses(&answer), vec![API_V6.to_string()]);
    assert!(answer.edns.is_some());

    let answer = ask_tcp(addr, &query("db.dev.gstacks.", RecordType::A, false)).await;
    assert_eq!(addresses(&answer), vec![DB_V4.to_string()]);

    // Several queries on one TCP connection.
    let mut stream = TcpStream::connect(addr).await.unwrap();
    for name in ["api.dev.gstacks.", "db.dev.gstacks.", "api.dev.gstacks."] {
        let answer = ask_tcp_on(&mut stream, &query(name, RecordType::A, false)).await;
        assert_eq!(answer.answers.len(), 1, "{name}");
    }
    assert_eq!(server.stats().answered.load(Ordering::Relaxed), 6);
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn unknown_gstacks_names_get_nxdomain_and_existing_ones_nodata() {
    let server = start(Records::new(table()), Upstream::none()).await;
    let addr = server.local_addr();

    let answer = ask_udp(addr, &query("web.dev.gstacks.", RecordType::A, false)).await;
    assert_eq!(answer.metadata.response_code, ResponseCode::NXDomain);
    assert!(answer.metadata.authoritative);
    assert!(answer.answers.is_empty());
    assert_eq!(answer.authorities[0].record_type(), RecordType::SOA);

    let answer = ask_tcp(addr, &query("api.prod.gstacks.", RecordType::AAAA, false)).await;
    assert_eq!(answer.metadata.response_code, ResponseCode::NXDomain);

    // db has no IPv6 listener: the name exists, AAAA is empty (NODATA).
    let answer = ask_udp(addr, &query("db.dev.gstacks.", RecordType::AAAA, false)).await;
    assert_eq!(answer.metadata.response_code, ResponseCode::NoError);
    assert!(answer.metadata.authoritative);
    assert!(answer.answers.is_empty());
    assert_eq!(answer.authorities[0].record_type(), RecordType::SOA);
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_table_replaced_live_is_what_the_next_query_sees() {
    let records = Records::new(table());
    let server = start(records.clone(), Upstream::none()).await;
    let addr = server.local_addr();
    let answer = ask_udp(addr, &query("worker.dev.gstacks.", RecordType::A, false)).await;
    assert_eq!(answer.metadata.response_code, ResponseCode::NXDomain);

    let mut next = RecordTable::new();
    next.insert(
        "dev",
        "worker",
        ListenerAddrs::v4(Ipv4Addr::new(127, 77, 0, 3)),
    )
    .unwrap();
    records.replace(next);

    let answer = ask_udp(addr, &query("worker.dev.gstacks.", RecordType::A, false)).await;
    assert_eq!(addresses(&answer), vec!["127.77.0.3".to_string()]);
    let answer = ask_tcp(addr, &query("api.dev.gstacks.", RecordType::A, false)).await;
    assert_eq!(answer.metadata.response_code, ResponseCode::NXDomain);
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn other_names_are_relayed_from_the_upstream_as_they_came() {
    let upstream = start_upstream().await;
    let server = start(
        Records::new(table()),
        Upstream::new([upstream.addr]).with_attempt_timeout(Duration::from_millis(500)),
    )
    .await;
    let addr = server.local_addr();

    let answer = ask_udp(addr, &query("Example.TEST.", RecordType::A, true)).await;
    assert_eq!(answer.metadata.response_code, ResponseCode::NoError);
    assert!(!answer.metadata.authoritative);
    assert!(answer.metadata.recursion_available);
    assert_eq!(addresses(&answer), vec![UPSTREAM_ANSWER.to_string()]);
    assert_eq!(answer.answers[0].ttl, 300);
    assert_eq!(answer.queries[0].name().to_ascii(), "Example.TEST.");

    let answer = ask_tcp(addr, &query("example.test.", RecordType::A, false)).await;
    assert_eq!(addresses(&answer), vec![UPSTREAM_ANSWER.to_string()]);

    let answer = ask_udp(addr, &query("missing.test.", RecordType::A, false)).await;
    assert_eq!(answer.metadata.response_code, ResponseCode::NXDomain);
    assert_eq!(answer.authorities.len(), 1);
    assert_eq!(answer.authorities[0].name.to_ascii(), "test.");

    let answer = ask_udp(addr, &query("refused.test.", RecordType::A, false)).await;
    assert_eq!(answer.metadata.response_code, ResponseCode::Refused);

    // Truncated upstream over UDP: the agent asks again over TCP and gives
    // the client all of it over TCP, or a truncated answer over UDP.
    let answer = ask_tcp(addr, &query("big.test.", RecordType::TXT, false)).await;
    assert_eq!(answer.answers.len(), 40);
    assert!(!answer.metadata.truncation);
    let answer = ask_udp(addr, &query("big.test.", RecordType::TXT, false)).await;
    assert!(answer.metadata.truncation);
    assert!(answer.answers.len() < 40);

    // No answer: SERVFAIL once the attempt times out.
    let started = Instant::now();
    let answer = ask_udp(addr, &query("silent.test.", RecordType::A, false)).await;
    assert_eq!(answer.metadata.response_code, ResponseCode::ServFail);
    assert!(started.elapsed() >= Duration::from_millis(500));

    assert!(upstream.queries.load(Ordering::Relaxed) >= 8);
    assert_eq!(server.stats().upstream_failed.load(Ordering::Relaxed), 1);
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_dead_upstream_is_skipped_and_none_alive_gives_servfail() {
    // A port with nobody behind it: the kernel answers ICMP unreachable.
    let dead = UdpSocket::bind(loopback())
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    let upstream = start_upstream().await;
    let server = start(
        Records::new(table()),
        Upstream::new([dead, upstream.addr]).with_attempt_timeout(Duration::from_secs(3)),
    )
    .await;
    let answer = ask_udp(
        server.local_addr(),
        &query("example.test.", RecordType::A, false),
    )
    .await;
    assert_eq!(addresses(&answer), vec![UPSTREAM_ANSWER.to_string()]);
    server.shutdown().await.unwrap();

    let only_dead = start(
        Records::new(table()),
        Upstream::new([dead]).with_attempt_timeout(Duration::from_secs(3)),
    )
    .await;
    let answer = ask_udp(
        only_dead.local_addr(),
        &query("example.test.", RecordType::A, false),
    )
    .await;
    assert_eq!(answer.metadata.response_code, ResponseCode::ServFail);
    // The gstacks names still answer without any upstream.
    let answer = ask_udp(
        only_dead.local_addr(),
        &query("api.dev.gstacks.", RecordType::A, false),
    )
    .await;
    assert_eq!(addresses(&answer), vec![API_V4.to_string()]);
    only_dead.shutdown().await.unwrap();
}

#[tokio::test]
async fn garbage_does_not_kill_the_server() {
    let server = start(Records::new(table()), Upstream::none()).await;
    let addr = server.local_addr();
    let socket = UdpSocket::bind(loopback()).await.unwrap();
    socket.connect(addr).await.unwrap();

    let mut response_typed = query("api.dev.gstacks.", RecordType::A, false);
    response_typed.metadata.message_type = MessageType::Response;
    let mut bad_count = query("api.dev.gstacks.", RecordType::A, false)
        .to_vec()
        .unwrap();
    bad_count[5] = 9; // claims nine questions
    let mut garbage: Vec<Vec<u8>> = vec![
        vec![],
        vec![0],
        vec![0xff; 11],
        vec![0xff; 12],
        vec![0; 512],
        vec![0xab; 4096],
        b"GET / HTTP/1.1\r\n\r\n".to_vec(),
        response_typed.to_vec().unwrap(),
        bad_count,
    ];
    let mut state = 0x2545_f491_u32;
    for _ in 0..200 {
        let len = (state % 300) as usize;
        let packet = (0..len)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 17;
                state ^= state << 5;
                state as u8
            })
            .collect();
        garbage.push(packet);
    }
    for packet in &garbage {
        socket.send(packet).await.unwrap();
    }
    let answer = ask_udp(addr, &query("api.dev.gstacks.", RecordType::A, false)).await;
    assert_eq!(addresses(&answer), vec![API_V4.to_string()]);

    // Garbage over TCP ends that connection only.
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(&[0, 5, 1, 2, 3, 4, 5]).await.unwrap();
    stream.write_all(&[0xff; 64]).await.unwrap();
    drop(stream);
    let answer = ask_tcp(addr, &query("api.dev.gstacks.", RecordType::A, false)).await;
    assert_eq!(addresses(&answer), vec![API_V4.to_string()]);
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn shutdown_frees_the_address_and_bind_errors_name_it() {
    let server = start(Records::default(), Upstream::none()).await;
    let addr = server.local_addr();

    // Taken by the running server: the error names the address.
    let err = DnsServer::bind(addr, Records::default(), Upstream::none())
        .await
        .unwrap_err();
    assert!(
        err.to_string()
            .starts_with(&format!("cannot bind the DNS UDP socket on {addr}")),
        "{err}"
    );

    server.shutdown().await.unwrap();
    let again = DnsServer::bind(addr, Records::new(table()), Upstream::none())
        .await
        .unwrap();
    assert_eq!(again.local_addr(), addr);
    let answer = ask_tcp(addr, &query("api.dev.gstacks.", RecordType::A, false)).await;
    assert_eq!(addresses(&answer), vec![API_V4.to_string()]);
    again.shutdown().await.unwrap();

    // An address this host does not have.
    let foreign: SocketAddr = "192.0.2.1:53".parse().unwrap();
    let err = DnsServer::bind(foreign, Records::default(), Upstream::none())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("192.0.2.1:53"), "{err}");
}

#[tokio::test]
async fn a_server_never_forwards_to_itself() {
    // Find a free port, then name the server's own address as its upstream.
    let probe = DnsServer::bind(loopback(), Records::default(), Upstream::none())
        .await
        .unwrap();
    let addr = probe.local_addr();
    probe.shutdown().await.unwrap();
    let server = DnsServer::bind(addr, Records::new(table()), Upstream::new([addr]))
        .await
        .unwrap();
    let answer = ask_udp(addr, &query("example.test.", RecordType::A, false)).await;
    assert_eq!(answer.metadata.response_code, ResponseCode::ServFail);
    assert!(!answer.metadata.recursion_available);
    server.shutdown().await.unwrap();
}

fn dig(args: &[&str]) -> Option<String> {
    let output = match Command::new("dig").args(args).output() {
        Ok(output) => output,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return None,
        Err(error) => panic!("cannot run dig: {error}"),
    };
    assert!(
        output.status.success(),
        "dig {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    Some(String::from_utf8(output.stdout).unwrap())
}

/// `dig` (Debian's dnsutils) as a real peer, over UDP and TCP, for an alias,
/// an unknown name and a forwarded one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dig_resolves_aliases_and_forwarded_names() {
    let upstream = start_upstream().await;
    let server = start(Records::new(table()), Upstream::new([upstream.addr])).await;
    let port = server.local_addr().port().to_string();
    let base = ["@127.0.0.1", "-p", port.as_str(), "+time=5", "+tries=1"];

    let run = |extra: &'static [&'static str]| {
        let args: Vec<&str> = base.iter().copied().chain(extra.iter().copied()).collect();
        let args: Vec<String> = args.into_iter().map(String::from).collect();
        tokio::task::spawn_blocking(move || {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            dig(&args)
        })
    };

    let Some(short) = run(&["api.dev.gstacks", "+short"]).await.unwrap() else {
        assert!(
            std::env::var_os("CI").is_none(),
            "dig is not installed (Debian package dnsutils) but CI must run this test"
        );
        println!("skipping dig_resolves_aliases_and_forwarded_names: dig is not installed");
        return;
    };
    assert_eq!(short.trim(), API_V4.to_string());

    let short = run(&["API.DEV.GSTACKS.", "AAAA", "+short", "+tcp"])
        .await
        .unwrap()
        .unwrap();
    assert_eq!(short.trim(), API_V6.to_string());

    let full = run(&["nothing.dev.gstacks"]).await.unwrap().unwrap();
    assert!(full.contains("status: NXDOMAIN"), "{full}");
    assert!(full.contains(" aa "), "{full}");

    let short = run(&["example.test", "+short"]).await.unwrap().unwrap();
    assert_eq!(short.trim(), UPSTREAM_ANSWER.to_string());

    let full = run(&["big.test", "TXT", "+ignore"]).await.unwrap().unwrap();
    assert!(full.contains(" tc "), "{full}");
    let full = run(&["big.test", "TXT"]).await.unwrap().unwrap();
    assert!(full.contains("ANSWER: 40"), "dig retries over TCP: {full}");

    server.shutdown().await.unwrap();
}

/// A flood of forwarded queries to an upstream that never answers holds at
/// most MAX_IN_FLIGHT upstream sockets; the rest get SERVFAIL at once, and
/// `.gstacks` names keep answering meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_towards_a_silent_upstream_is_bounded() {
    let upstream = start_upstream().await;
    let server = start(
        Records::new(table()),
        Upstream::new([upstream.addr]).with_attempt_timeout(Duration::from_secs(3)),
    )
    .await;
    let addr = server.local_addr();
    let flood = 2 * dns::MAX_IN_FLIGHT;
    let socket = Arc::new(UdpSocket::bind(loopback()).await.unwrap());
    socket.connect(addr).await.unwrap();
    // Answers are read while the flood goes out, so none waits in our buffer.
    let reader = tokio::spawn({
        let socket = socket.clone();
        async move {
            let mut servfail = 0;
            let mut buf = vec![0; 65_535];
            while servfail < flood {
                // Past the attempt timeout with nothing more: done.
                let Ok(received) = timeout(Duration::from_secs(6), socket.recv(&mut buf)).await
                else {
                    break;
                };
                let answer = Message::from_vec(&buf[..received.unwrap()]).unwrap();
                assert_eq!(answer.metadata.response_code, ResponseCode::ServFail);
                servfail += 1;
            }
            servfail
        }
    });
    for _ in 0..flood {
        let message = query("silent.test.", RecordType::A, false);
        socket.send(&message.to_vec().unwrap()).await.unwrap();
    }
    // Local names answer while the upstream slots are all taken.
    let answer = ask_udp(addr, &query("api.dev.gstacks.", RecordType::A, false)).await;
    assert_eq!(addresses(&answer), vec![API_V4.to_string()]);

    let servfail = reader.await.unwrap();
    assert_eq!(servfail, flood, "every query of the flood is answered");
    let reached = upstream.queries.load(Ordering::Relaxed);
    println!("{servfail} of {flood} answered SERVFAIL, {reached} reached the upstream");
    assert!(
        reached <= dns::MAX_IN_FLIGHT,
        "{reached} queries reached the upstream"
    );
    // Answers the kernel dropped on our side were still counted.
    assert!(server.stats().upstream_failed.load(Ordering::Relaxed) as usize >= servfail);
    server.shutdown().await.unwrap();
}

/// REFUSED (like SERVFAIL and NOTIMP) from one upstream moves on to the
/// next; when all refuse, the last refusal is relayed as it came. NXDOMAIN is
/// an answer: it stops at the first server.
#[tokio::test]
async fn a_refusing_upstream_hands_over_to_the_next() {
    let first = start_upstream().await;
    let second = start_upstream().await;
    let server = start(
        Records::new(table()),
        Upstream::new([first.addr, second.addr]),
    )
    .await;
    let addr = server.local_addr();

    let answer = ask_udp(addr, &query("refused.test.", RecordType::A, false)).await;
    assert_eq!(answer.metadata.response_code, ResponseCode::Refused);
    assert_eq!(first.queries.load(Ordering::Relaxed), 1);
    assert_eq!(second.queries.load(Ordering::Relaxed), 1);

    let answer = ask_udp(addr, &query("missing.test.", RecordType::A, false)).await;
    assert_eq!(answer.metadata.response_code, ResponseCode::NXDomain);
    assert_eq!(first.queries.load(Ordering::Relaxed), 2);
    assert_eq!(second.queries.load(Ordering::Relaxed), 1);
    server.shutdown().await.unwrap();
}
