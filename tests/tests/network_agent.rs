//! The agent's network module, two or three at once on loopback with real
//! sockets, fed with hand-built netmaps through the same `watch` channel the
//! control stream uses: agent DNS over real UDP, a connection from a
//! sandbox address through the alias listener over the mesh to a plain TCP
//! server standing in for the sandbox, denials (counted and reported), live
//! policy and alias changes, and the target refusing forged source claims.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use agent::dispatch::Link;
use agent::network::{Network, NetworkSettings, ProxyBind};
use netstack::{MeshNode, NodeConfig, PeerConfig, PrivateKey};
use proto::{agent_message, AgentMessage, Netmap};
use proxy::{MeshHeader, ProxyError};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream, UdpSocket};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

/// Bound for anything that should happen promptly; only reached on a hang.
const WAIT: Duration = Duration::from_secs(20);

struct TestAgent {
    host_id: String,
    key: PrivateKey,
    overlay: Ipv4Addr,
    network: Network,
    netmaps: watch::Sender<Option<Netmap>>,
    events: mpsc::Receiver<AgentMessage>,
    applied: Arc<AtomicU64>,
    shutdown: CancellationToken,
}

impl TestAgent {
    /// `range` is the agent's own listener range, so agents and tests do
    /// not collide.
    async fn start(host_id: &str, overlay: Ipv4Addr, range: &str) -> TestAgent {
        Self::start_with(host_id, overlay, range, |_| {}).await
    }

    async fn start_with(
        host_id: &str,
        overlay: Ipv4Addr,
        range: &str,
        adjust: impl FnOnce(&mut NetworkSettings),
    ) -> TestAgent {
        let mut settings = NetworkSettings {
            mesh_listen: "127.0.0.1:0".parse().unwrap(),
            mesh_endpoint: None,
            dns_addr: "127.0.0.1:0".parse().unwrap(),
            proxy_bind: ProxyBind::Range(range.parse().unwrap()),
            container_addr: None,
            container_proxy_bind: ProxyBind::Range("100.127.77.0/24".parse().unwrap()),
            ..NetworkSettings::default()
        };
        adjust(&mut settings);
        let key = PrivateKey::generate();
        let (netmaps, rx) = watch::channel(None);
        let (link, events) = Link::channel(1024);
        let applied = Arc::new(AtomicU64::new(0));
        let shutdown = CancellationToken::new();
        let network = Network::start(
            settings,
            host_id.to_owned(),
            key.clone(),
            rx,
            link,
            applied.clone(),
            shutdown.clone(),
        )
        .await
        .unwrap();
        TestAgent {
            host_id: host_id.to_owned(),
            key,
            overlay,
            network,
            netmaps,
            events,
            applied,
            shutdown,
        }
    }

    /// Sends `netmap` and waits until the agent applied its version.
    async fn apply(&self, netmap: Netmap) {
        let version = netmap.topology_version;
        self.netmaps.send_replace(Some(netmap));
        wait_until("netmap applied", || {
            self.applied.load(Ordering::Relaxed) == version
        })
        .await;
    }

    /// Joins the mesh with an addresses-only netmap; returns the UDP address.
    async fn join(&self) -> SocketAddr {
        self.apply(Netmap {
            topology_version: 1,
            node_id: format!("node_{}", self.host_id),
            addresses: vec![format!("{}/32", self.overlay)],
            ..Netmap::default()
        })
        .await;
        wait_until("mesh bound", || self.network.mesh_addr().is_some()).await;
        self.network.mesh_addr().unwrap()
    }

    fn peer(&self, endpoint: SocketAddr) -> proto::Peer {
        proto::Peer {
            public_key: self.key.public_key().to_string(),
            endpoint: endpoint.to_string(),
            allowed_ips: vec![format!("{}/32", self.overlay)],
            persistent_keepalive_secs: 0,
            node_id: format!("node_{}", self.host_id),
            host_id: self.host_id.clone(),
            kind: "agent".into(),
            addresses: vec![self.overlay.to_string()],
        }
    }

    /// The next denial event.
    async fn denied_event(&mut self) -> proto::Event {
        loop {
            let message = tokio::time::timeout(WAIT, self.events.recv())
                .await
                .expect("a denial event in time")
                .expect("link open");
            if let Some(agent_message::Body::Event(ev)) = message.body {
                if ev.kind == agent::network::DENIED_EVENT {
                    return ev;
                }
            }
        }
    }

    async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(WAIT, self.network.stopped())
            .await
            .unwrap();
    }
}

/// Dials `header` over the mesh and returns the target's refusal, which
/// comes as the first bytes of the connection.
async fn refused(node: &MeshNode, target: SocketAddr, header: &MeshHeader) -> ProxyError {
    let mut stream = proxy::dial_over_mesh(node, target, header)
        .await
        .expect("dial over the mesh");
    stream.answer().await.expect_err("expected a refusal")
}

async fn wait_until(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// The network view, records, rules and sandboxes shared by every agent's
/// netmap in these tests: `web` (sbx_web on h1) and `api` (sbx_api on h2).
struct World {
    version: u64,
    web_addr: Ipv4Addr,
    api_addr: Ipv4Addr,
    api_port: u16,
    rules: Vec<proto::PolicyRule>,
    extra_aliases: Vec<proto::AliasView>,
}

impl World {
    fn netmap_for(&self, me: &TestAgent, peers: Vec<proto::Peer>, agents: &[&TestAgent]) -> Netmap {
        let node_of = |host: &str| {
            agents
                .iter()
                .find(|a| a.host_id == host)
                .map(|a| a.overlay.to_string())
                .unwrap_or_default()
        };
        let mut aliases = vec![
            proto::AliasView {
                alias: "api".into(),
                sandbox_id: "sbx_api".into(),
                ports: vec![u32::from(self.api_port)],
                host_id: "h2".into(),
            },
            proto::AliasView {
                alias: "web".into(),
                sandbox_id: "sbx_web".into(),
                ports: vec![80],
                host_id: "h1".into(),
            },
        ];
        aliases.extend(self.extra_aliases.iter().cloned());
        let dns_records = aliases
            .iter()
            .map(|a| proto::DnsRecord {
                name: format!("{}.dev.gstacks", a.alias),
                network: "dev".into(),
                alias: a.alias.clone(),
                ports: a.ports.clone(),
                target_node_address: node_of(&a.host_id),
                target_host_id: a.host_id.clone(),
                sandbox_id: a.sandbox_id.clone(),
            })
            .collect();
        Netmap {
            topology_version: self.version,
            node_id: format!("node_{}", me.host_id),
            addresses: vec![format!("{}/32", me.overlay)],
            peers,
            dns_records,
            policy_rules: self.rules.clone(),
            networks: vec![proto::NetworkView {
                name: "dev".into(),
                dns_suffix: "dev.gstacks".into(),
                topology_version: self.version,
                aliases,
            }],
            sandboxes: vec![
                proto::SandboxEndpoint {
                    sandbox_id: "sbx_web".into(),
                    host_id: "h1".into(),
                    addresses: vec![self.web_addr.to_string()],
                    tags: vec!["frontend".into()],
                    networks: vec!["dev".into()],
                },
                proto::SandboxEndpoint {
                    sandbox_id: "sbx_api".into(),
                    host_id: "h2".into(),
                    addresses: vec![self.api_addr.to_string()],
                    tags: vec![],
                    networks: vec!["dev".into()],
                },
            ],
        }
    }
}

fn rule(id: &str, from: &str, to: &str, port: u16) -> proto::PolicyRule {
    proto::PolicyRule {
        id: id.into(),
        network: "dev".into(),
        from: from.into(),
        to: to.into(),
        port: u32::from(port),
    }
}

/// A TCP echo server standing in for a sandbox.
async fn echo_server(ip: Ipv4Addr) -> SocketAddr {
    let listener = TcpListener::bind((ip, 0)).await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = stream.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    addr
}

/// Connects to `to` from the address `from` (a sandbox's address).
async fn connect_from(from: Ipv4Addr, to: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(IpAddr::V4(from), 0))?;
    socket.connect(to).await
}

/// Sends `data`, half-closes, reads everything back.
async fn echo_through(stream: &mut TcpStream, data: &[u8]) -> Vec<u8> {
    let (mut r, mut w) = stream.split();
    let write = async {
        w.write_all(data).await.unwrap();
        w.shutdown().await.unwrap();
    };
    let read = async {
        let mut out = Vec::new();
        r.read_to_end(&mut out).await.unwrap();
        out
    };
    let ((), echoed) = tokio::time::timeout(WAIT, async { tokio::join!(write, read) })
        .await
        .expect("echo in time");
    echoed
}

// --- a minimal DNS client (one question, class IN) ---

fn dns_query(id: u16, name: &str, qtype: u16) -> Vec<u8> {
    let mut q = Vec::new();
    q.extend_from_slice(&id.to_be_bytes());
    q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in name.split('.') {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.push(0);
    q.extend_from_slice(&qtype.to_be_bytes());
    q.extend_from_slice(&1u16.to_be_bytes());
    q
}

/// (rcode, IPv4 addresses of the A answers).
async fn resolve_a(server: SocketAddr, name: &str) -> (u8, Vec<Ipv4Addr>) {
    let (rcode, addrs) = resolve(server, name, 1).await;
    let v4 = addrs
        .into_iter()
        .filter_map(|ip| match ip {
            IpAddr::V4(v4) => Some(v4),
            IpAddr::V6(_) => None,
        })
        .collect();
    (rcode, v4)
}

/// (rcode, addresses of the A and AAAA answers) to a query of `qtype`.
async fn resolve(server: SocketAddr, name: &str, qtype: u16) -> (u8, Vec<IpAddr>) {
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    socket
        .send_to(&dns_query(0x4242, name, qtype), server)
        .await
        .unwrap();
    let mut buf = [0u8; 1500];
    let (n, _) = tokio::time::timeout(WAIT, socket.recv_from(&mut buf))
        .await
        .expect("a DNS answer")
        .unwrap();
    parse_answers(&buf[..n])
}

/// As [`resolve_a`], blocking (for a thread inside a namespace).
fn resolve_a_blocking(server: SocketAddr, name: &str) -> (u8, Vec<Ipv4Addr>) {
    let socket = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
    socket.set_read_timeout(Some(WAIT)).unwrap();
    socket.send_to(&dns_query(0x4242, name, 1), server).unwrap();
    let mut buf = [0u8; 1500];
    let (n, _) = socket.recv_from(&mut buf).expect("a DNS answer");
    parse_a(&buf[..n])
}

fn parse_a(msg: &[u8]) -> (u8, Vec<Ipv4Addr>) {
    let (rcode, addrs) = parse_answers(msg);
    let v4 = addrs
        .into_iter()
        .filter_map(|ip| match ip {
            IpAddr::V4(v4) => Some(v4),
            IpAddr::V6(_) => None,
        })
        .collect();
    (rcode, v4)
}

fn parse_answers(msg: &[u8]) -> (u8, Vec<IpAddr>) {
    assert_eq!(&msg[..2], &0x4242u16.to_be_bytes());
    let rcode = msg[3] & 0x0f;
    let answers = u16::from_be_bytes([msg[6], msg[7]]);
    // Skip the header and the question.
    let mut at = 12;
    while msg[at] != 0 {
        at += 1 + msg[at] as usize;
    }
    at += 5;
    let mut out = Vec::new();
    for _ in 0..answers {
        // Name: a pointer (2 bytes) or labels.
        if msg[at] & 0xc0 == 0xc0 {
            at += 2;
        } else {
            while msg[at] != 0 {
                at += 1 + msg[at] as usize;
            }
            at += 1;
        }
        let rtype = u16::from_be_bytes([msg[at], msg[at + 1]]);
        let len = u16::from_be_bytes([msg[at + 8], msg[at + 9]]) as usize;
        at += 10;
        if rtype == 1 && len == 4 {
            let octets: [u8; 4] = msg[at..at + 4].try_into().unwrap();
            out.push(IpAddr::from(octets));
        }
        if rtype == 28 && len == 16 {
            let octets: [u8; 16] = msg[at..at + 16].try_into().unwrap();
            out.push(IpAddr::from(octets));
        }
        at += len;
    }
    (rcode, out)
}

/// Two agents joined to each other: h1 runs `web` (its address is a
/// loopback address the test connects from), h2 runs `api` (an echo server).
async fn two_agents(test: u8) -> (TestAgent, TestAgent, World) {
    let a = TestAgent::start(
        "h1",
        Ipv4Addr::new(100, 64, 0, 1),
        &format!("127.{}.1.0/24", 80 + test),
    )
    .await;
    let b = TestAgent::start(
        "h2",
        Ipv4Addr::new(100, 64, 0, 2),
        &format!("127.{}.2.0/24", 80 + test),
    )
    .await;
    let a_udp = a.join().await;
    let b_udp = b.join().await;
    let api_addr = Ipv4Addr::new(127, 90 + test, 0, 12);
    let api = echo_server(api_addr).await;
    let world = World {
        version: 2,
        web_addr: Ipv4Addr::new(127, 90 + test, 0, 11),
        api_addr,
        api_port: api.port(),
        rules: vec![rule("pol_1", "web", "api", api.port())],
        extra_aliases: vec![],
    };
    let (pa, pb) = (b.peer(b_udp), a.peer(a_udp));
    a.apply(world.netmap_for(&a, vec![pa], &[&a, &b])).await;
    b.apply(world.netmap_for(&b, vec![pb], &[&a, &b])).await;
    (a, b, world)
}

async fn reapply(a: &TestAgent, b: &TestAgent, world: &mut World) {
    world.version += 1;
    let a_udp = a.network.mesh_addr().unwrap();
    let b_udp = b.network.mesh_addr().unwrap();
    a.apply(world.netmap_for(a, vec![b.peer(b_udp)], &[a, b]))
        .await;
    b.apply(world.netmap_for(b, vec![a.peer(a_udp)], &[a, b]))
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dns_answers_and_a_sandbox_reaches_another_over_the_mesh() {
    let (a, b, world) = two_agents(1).await;
    let listener = a
        .network
        .listener_addr("dev", "api", world.api_port)
        .unwrap();
    // The agent DNS answers the alias with the listener's address, over real UDP.
    let dns = a.network.dns_addr().unwrap();
    let (rcode, addrs) = resolve_a(dns, "api.dev.gstacks").await;
    assert_eq!(rcode, 0);
    assert_eq!(
        addrs,
        [match listener.ip() {
            IpAddr::V4(v4) => v4,
            IpAddr::V6(_) => unreachable!(),
        }]
    );
    let (rcode, addrs) = resolve_a(dns, "nope.dev.gstacks").await;
    assert_eq!((rcode, addrs.len()), (3, 0), "NXDOMAIN");
    // Aliases on one port do not collide: each has its own address.
    let web = a.network.listener_addr("dev", "web", 80).unwrap();
    assert_ne!(web.ip(), listener.ip());

    // sandbox web (h1) -> listener -> policy -> mesh -> h2 -> sandbox api.
    let data = tests::pattern(4 * 1024 * 1024, 0x1234_5678);
    let mut stream = connect_from(world.web_addr, listener).await.unwrap();
    let echoed = echo_through(&mut stream, &data).await;
    assert_eq!(echoed.len(), data.len());
    assert!(echoed == data, "the bytes came back changed");
    assert_eq!(a.network.stats().allowed.load(Ordering::Relaxed), 1);
    assert_eq!(b.network.stats().mesh_allowed.load(Ordering::Relaxed), 1);
    a.stop().await;
    b.stop().await;
}

/// A proxy bind that names an IPv6 address: the alias listens there and the
/// agent DNS answers AAAA with it, A with no data.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ipv6_proxy_bind_is_published_as_aaaa() {
    let Ok(probe) = std::net::TcpListener::bind("[::1]:0") else {
        eprintln!("skipped: this host has no IPv6 loopback");
        return;
    };
    let api_port = probe.local_addr().unwrap().port();
    drop(probe);
    let a = TestAgent::start_with("h1", Ipv4Addr::new(100, 64, 0, 1), "127.89.1.0/24", |s| {
        s.proxy_bind = ProxyBind::Single(IpAddr::V6(Ipv6Addr::LOCALHOST));
    })
    .await;
    a.join().await;
    let world = World {
        version: 2,
        web_addr: Ipv4Addr::new(127, 99, 0, 11),
        api_addr: Ipv4Addr::new(127, 99, 0, 12),
        api_port,
        rules: vec![],
        extra_aliases: vec![],
    };
    a.apply(world.netmap_for(&a, vec![], &[&a])).await;
    let listener = a.network.listener_addr("dev", "api", api_port).unwrap();
    assert_eq!(listener.ip(), IpAddr::V6(Ipv6Addr::LOCALHOST));
    let dns = a.network.dns_addr().unwrap();
    let (rcode, addrs) = resolve(dns, "api.dev.gstacks", 28).await;
    assert_eq!((rcode, addrs), (0, vec![listener.ip()]));
    let (rcode, addrs) = resolve(dns, "api.dev.gstacks", 1).await;
    assert_eq!((rcode, addrs.len()), (0, 0), "NODATA for A");
    a.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn denied_connections_are_closed_counted_and_reported() {
    let (mut a, b, mut world) = two_agents(2).await;
    let listener = a
        .network
        .listener_addr("dev", "api", world.api_port)
        .unwrap();

    // An address that is no sandbox of h1.
    let stranger = Ipv4Addr::new(127, 92, 0, 99);
    let mut stream = connect_from(stranger, listener).await.unwrap();
    tests::closed_within(&mut stream, WAIT).await;
    assert_eq!(a.network.stats().denied.load(Ordering::Relaxed), 1);
    let ev = a.denied_event().await;
    assert_eq!(ev.fields["network"], "dev");
    assert_eq!(ev.fields["alias"], "api");
    assert_eq!(ev.fields["port"], world.api_port.to_string());
    assert_eq!(ev.fields["source"], stranger.to_string());
    assert!(
        ev.fields["reason"].contains("not the address of a sandbox"),
        "{:?}",
        ev.fields
    );

    // The sandbox itself, but no rule allows it any more.
    world.rules.clear();
    reapply(&a, &b, &mut world).await;
    let mut stream = connect_from(world.web_addr, listener).await.unwrap();
    tests::closed_within(&mut stream, WAIT).await;
    assert_eq!(a.network.stats().denied.load(Ordering::Relaxed), 2);
    let ev = a.denied_event().await;
    assert_eq!(ev.fields["source"], "sandbox:sbx_web");
    assert!(
        ev.fields["reason"].contains("default deny"),
        "{:?}",
        ev.fields
    );
    // Nothing reached the target.
    assert_eq!(b.network.stats().mesh_allowed.load(Ordering::Relaxed), 0);
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removing_the_allow_rule_closes_the_connection_within_a_second() {
    let (mut a, b, mut world) = two_agents(3).await;
    let listener = a
        .network
        .listener_addr("dev", "api", world.api_port)
        .unwrap();
    let mut kept = connect_from(world.web_addr, listener).await.unwrap();
    let mut closing = connect_from(world.web_addr, listener).await.unwrap();
    for stream in [&mut kept, &mut closing] {
        stream.write_all(b"ping").await.unwrap();
        let mut buf = [0u8; 4];
        tokio::time::timeout(WAIT, stream.read_exact(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(&buf, b"ping");
    }
    // Another rule that still allows web -> api: the connections stay.
    world.rules.push(rule("pol_2", "tag:frontend", "api", 0));
    reapply(&a, &b, &mut world).await;
    world.rules.remove(0);
    reapply(&a, &b, &mut world).await;
    kept.write_all(b"pong").await.unwrap();
    let mut buf = [0u8; 4];
    tokio::time::timeout(WAIT, kept.read_exact(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&buf, b"pong");
    assert_eq!(a.network.stats().revoked.load(Ordering::Relaxed), 0);

    // The last allowing rule goes: both are closed within 1 s of the netmap.
    world.rules.clear();
    world.version += 1;
    let a_udp = a.network.mesh_addr().unwrap();
    let b_udp = b.network.mesh_addr().unwrap();
    let start = Instant::now();
    a.netmaps
        .send_replace(Some(world.netmap_for(&a, vec![b.peer(b_udp)], &[&a, &b])));
    b.netmaps
        .send_replace(Some(world.netmap_for(&b, vec![a.peer(a_udp)], &[&a, &b])));
    tests::closed_within(&mut kept, Duration::from_secs(1)).await;
    tests::closed_within(&mut closing, Duration::from_secs(1)).await;
    assert!(
        start.elapsed() < Duration::from_secs(1),
        "{:?}",
        start.elapsed()
    );
    wait_until("both revoked at the source", || {
        a.network.stats().revoked.load(Ordering::Relaxed) == 2
    })
    .await;
    let ev = a.denied_event().await;
    assert_eq!(ev.fields["rule"], "pol_2");
    assert!(
        ev.fields["reason"].contains("established connection closed"),
        "{:?}",
        ev.fields
    );
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aliases_are_added_and_removed_live() {
    let (a, b, mut world) = two_agents(4).await;
    let dns = a.network.dns_addr().unwrap();
    let db_server = echo_server(world.api_addr).await;
    world.extra_aliases.push(proto::AliasView {
        alias: "db".into(),
        sandbox_id: "sbx_api".into(),
        ports: vec![u32::from(db_server.port())],
        host_id: "h2".into(),
    });
    world.rules.push(rule("pol_db", "web", "db", 0));
    // An established connection to api must survive the change.
    let api_listener = a
        .network
        .listener_addr("dev", "api", world.api_port)
        .unwrap();
    let mut api = connect_from(world.web_addr, api_listener).await.unwrap();
    api.write_all(b"1").await.unwrap();
    let mut one = [0u8; 1];
    tokio::time::timeout(WAIT, api.read_exact(&mut one))
        .await
        .unwrap()
        .unwrap();
    reapply(&a, &b, &mut world).await;

    let (rcode, addrs) = resolve_a(dns, "db.dev.gstacks").await;
    assert_eq!((rcode, addrs.len()), (0, 1));
    let db = a
        .network
        .listener_addr("dev", "db", db_server.port())
        .unwrap();
    assert_eq!(IpAddr::V4(addrs[0]), db.ip());
    let mut stream = connect_from(world.web_addr, db).await.unwrap();
    assert_eq!(echo_through(&mut stream, b"to db").await, b"to db");

    // Removed: NXDOMAIN, the listener is gone, api still works.
    world.extra_aliases.clear();
    reapply(&a, &b, &mut world).await;
    let (rcode, _) = resolve_a(dns, "db.dev.gstacks").await;
    assert_eq!(rcode, 3);
    assert_eq!(a.network.listener_addr("dev", "db", db_server.port()), None);
    wait_until("db listener closed", || {
        std::net::TcpStream::connect_timeout(&db, Duration::from_secs(1)).is_err()
    })
    .await;
    api.write_all(b"2").await.unwrap();
    tokio::time::timeout(WAIT, api.read_exact(&mut one))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&one, b"2");
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_target_checks_the_claim_against_the_mesh_peer() {
    let (a, b, mut world) = two_agents(5).await;
    // A laptop node joins: a third mesh node known to h2 as kind `local`.
    let laptop_key = PrivateKey::generate();
    let laptop_ip = Ipv4Addr::new(100, 64, 0, 9);
    let b_udp = b.network.mesh_addr().unwrap();
    let laptop = MeshNode::bind(
        NodeConfig {
            private_key: laptop_key.clone(),
            addresses: vec![IpAddr::V4(laptop_ip)],
            listen: "127.0.0.1:0".parse().unwrap(),
        },
        vec![PeerConfig {
            public_key: b.key.public_key(),
            endpoint: Some(b_udp),
            allowed_ips: vec!["100.64.0.2/32".parse().unwrap()],
            persistent_keepalive: None,
            preshared_key: None,
        }],
    )
    .await
    .unwrap();
    world.rules.push(rule("pol_local", "local", "api", 0));
    world.version += 1;
    let a_udp = a.network.mesh_addr().unwrap();
    let laptop_peer = proto::Peer {
        public_key: laptop_key.public_key().to_string(),
        endpoint: laptop.local_addr().to_string(),
        allowed_ips: vec![format!("{laptop_ip}/32")],
        persistent_keepalive_secs: 25,
        node_id: "node_laptop".into(),
        host_id: String::new(),
        kind: "local".into(),
        addresses: vec![laptop_ip.to_string()],
    };
    b.apply(world.netmap_for(&b, vec![a.peer(a_udp), laptop_peer], &[&a, &b]))
        .await;
    let ev_before = b.network.stats().mesh_denied.load(Ordering::Relaxed);
    assert_eq!(ev_before, 0);
    let target = SocketAddr::new(IpAddr::V4(b.overlay), proxy::MESH_PROXY_PORT);
    let header = |source: policy::Source| MeshHeader {
        network: "dev".into(),
        alias: "api".into(),
        port: world.api_port,
        source,
    };

    // `local` from a laptop peer: allowed by pol_local, bytes flow.
    let mut stream = tokio::time::timeout(
        WAIT,
        proxy::dial_over_mesh(&laptop, target, &header(policy::Source::local())),
    )
    .await
    .unwrap()
    .unwrap();
    stream.write_all(b"laptop").await.unwrap();
    let mut buf = [0u8; 6];
    tokio::time::timeout(WAIT, stream.read_exact(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&buf, b"laptop");

    // A laptop claiming to be a sandbox (with the aliases of one): refused.
    let mut forged = policy::Source::sandbox("sbx_web");
    forged.aliases = vec!["web".into()];
    let err = tokio::time::timeout(WAIT, refused(&laptop, target, &header(forged)))
        .await
        .unwrap();
    match &err {
        ProxyError::Denied { reason } => {
            assert!(
                reason.contains("local node `node_laptop` claims"),
                "{reason}"
            )
        }
        other => panic!("expected a denial, got {other}"),
    }
    // A header naming an unknown network or alias: refused with the reason.
    let mut unknown = header(policy::Source::local());
    unknown.network = "prod".into();
    let err = tokio::time::timeout(WAIT, refused(&laptop, target, &unknown))
        .await
        .unwrap();
    assert!(
        err.to_string().contains("not attached to network `prod`")
            || err.to_string().contains("no such alias"),
        "{err}"
    );
    let mut unknown = header(policy::Source::local());
    unknown.alias = "nope".into();
    let err = tokio::time::timeout(WAIT, refused(&laptop, target, &unknown))
        .await
        .unwrap();
    assert!(err.to_string().contains("no such alias"), "{err}");
    // (An agent peer claiming `local` or another host's sandbox is refused
    // the same way: agent::network::topology's unit tests.)
    assert_eq!(b.network.stats().mesh_denied.load(Ordering::Relaxed), 3);
    assert_eq!(b.network.stats().mesh_allowed.load(Ordering::Relaxed), 1);
    drop(stream);
    laptop.shutdown().await;
    a.stop().await;
    b.stop().await;
}

async fn diagnose(
    agent: &TestAgent,
    source: &str,
    alias: &str,
    port: u16,
    expected: u64,
) -> proto::NetworkDiagnosis {
    use agent::dispatch::Module;
    let (link, _rx) = Link::channel(8);
    let command = proto::Command {
        request_id: "req_1".into(),
        deadline_ms: 0,
        kind: Some(proto::command::Kind::NetworkDiagnose(
            proto::NetworkDiagnose {
                network: "dev".into(),
                source: source.into(),
                alias: alias.into(),
                port: u32::from(port),
                expected_topology_version: expected,
            },
        )),
    };
    match agent.network.module().handle(command, link).await {
        Ok(proto::command_result::Kind::NetworkDiagnosis(d)) => d,
        other => panic!("expected a diagnosis, got {other:?}"),
    }
}

fn checks(d: &proto::NetworkDiagnosis) -> Vec<(String, bool)> {
    d.checks
        .iter()
        .map(|c| (c.name.clone(), c.passed))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn diagnose_reports_each_check_with_its_reason() {
    let (a, b, world) = two_agents(6).await;
    let port = world.api_port;
    // The source's agent: everything holds for `web`.
    let d = diagnose(&a, "web", "api", port, world.version).await;
    assert_eq!(d.host_id, "h1");
    assert_eq!(d.applied_topology_version, world.version);
    let all_pass: Vec<(String, bool)> = [
        "mesh_joined",
        "topology_version",
        "dns_records",
        "route",
        "policy",
    ]
    .iter()
    .map(|n| ((*n).to_owned(), true))
    .collect();
    assert_eq!(checks(&d), all_pass, "{:#?}", d.checks);
    assert!(
        d.checks[4].detail.contains("pol_1"),
        "{}",
        d.checks[4].detail
    );
    assert!(
        d.checks[3].detail.contains("100.64.0.2:4180"),
        "{}",
        d.checks[3].detail
    );
    // The target's agent probes the sandbox itself.
    let d = diagnose(&b, "web", "api", port, world.version).await;
    assert_eq!(checks(&d), all_pass, "{:#?}", d.checks);
    assert!(
        d.checks[3].detail.contains("accepts on"),
        "{}",
        d.checks[3].detail
    );
    // `local` is not allowed; a newer control-plane version is not applied;
    // an unexposed port has no route.
    let d = diagnose(&a, "local", "api", port, world.version + 1).await;
    assert!(
        !d.checks[1].passed && !d.checks[4].passed,
        "{:#?}",
        d.checks
    );
    assert!(
        d.checks[4].detail.contains("default deny"),
        "{}",
        d.checks[4].detail
    );
    let d = diagnose(&a, "web", "api", port.wrapping_add(1).max(1), world.version).await;
    assert!(!d.checks[3].passed, "{:#?}", d.checks);
    // A netmap whose peers the node refuses (one listed twice): said so.
    let b_udp = b.network.mesh_addr().unwrap();
    let mut twice = world.netmap_for(&a, vec![b.peer(b_udp), b.peer(b_udp)], &[&a, &b]);
    twice.topology_version = world.version + 1;
    a.apply(twice).await;
    let d = diagnose(&a, "web", "api", port, world.version + 1).await;
    assert!(!d.checks[0].passed, "{:#?}", d.checks);
    assert!(
        d.checks[0].detail.contains("peers not applied"),
        "{}",
        d.checks[0].detail
    );
    a.stop().await;
    b.stop().await;
}

/// A container stand-in: a network namespace whose default route is the
/// root-namespace end of its veth pair (the "bridge gateway", the agent's
/// container address). The agent makes its container proxy range local on
/// that interface; the container resolves the alias through the agent DNS on
/// port 53 of the gateway and connects from its own address.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_container_resolves_and_reaches_an_alias_through_the_gateway_root_netns() {
    if !tests::netns::root_or_skip(
        "a_container_resolves_and_reaches_an_alias_through_the_gateway_root_netns",
    ) {
        return;
    }
    let ns = tests::netns::Netns::create("gsn").unwrap();
    let gateway = ns.peer_addr();
    ns.ip(&["route", "add", "default", "via", &gateway.to_string()])
        .unwrap();
    // A range of our own, so parallel runs do not share it.
    let slot = std::process::id() % 250;
    let range = format!("100.127.{slot}.0/24");
    let container_range: ipnet::IpNet = range.parse().unwrap();
    let a = TestAgent::start_with("h1", Ipv4Addr::new(100, 64, 0, 1), "127.87.1.0/24", |s| {
        s.container_addr = Some(IpAddr::V4(gateway));
        s.container_proxy_bind = ProxyBind::Range(container_range);
    })
    .await;
    let b = TestAgent::start("h2", Ipv4Addr::new(100, 64, 0, 2), "127.87.2.0/24").await;
    let a_udp = a.join().await;
    let b_udp = b.join().await;
    let api_addr = Ipv4Addr::new(127, 97, 0, 12);
    let api = echo_server(api_addr).await;
    let world = World {
        version: 2,
        web_addr: ns.addr(),
        api_addr,
        api_port: api.port(),
        rules: vec![rule("pol_1", "web", "api", api.port())],
        extra_aliases: vec![],
    };
    a.apply(world.netmap_for(&a, vec![b.peer(b_udp)], &[&a, &b]))
        .await;
    b.apply(world.netmap_for(&b, vec![a.peer(a_udp)], &[&a, &b]))
        .await;
    let container_dns = a
        .network
        .container_dns_addr()
        .expect("container DNS served");
    assert_eq!(container_dns, SocketAddr::new(IpAddr::V4(gateway), 53));
    let listener = a
        .network
        .container_listener_addr("dev", "api", world.api_port)
        .expect("a container-side listener");
    assert!(container_range.contains(&listener.ip()), "{listener}");
    // The loopback DNS answers the loopback listener, not the container one.
    let (_, loopback_answer) = resolve_a(a.network.dns_addr().unwrap(), "api.dev.gstacks").await;
    assert_ne!(
        loopback_answer.first().map(|v4| IpAddr::V4(*v4)),
        Some(listener.ip())
    );

    let port = world.api_port;
    let data = tests::pattern(1024 * 1024, 0x1234_5678);
    let expected = data.clone();
    let (answer, echoed) = ns
        .run(move || {
            use std::io::{Read, Write};
            let (rcode, addrs) = resolve_a_blocking(container_dns, "api.dev.gstacks");
            assert_eq!(rcode, 0);
            let mut stream = std::net::TcpStream::connect_timeout(
                &SocketAddr::new(IpAddr::V4(addrs[0]), port),
                WAIT,
            )
            .unwrap();
            stream.set_read_timeout(Some(WAIT)).unwrap();
            let mut writer = stream.try_clone().unwrap();
            let sender = std::thread::spawn(move || {
                writer.write_all(&data).unwrap();
                writer.shutdown(std::net::Shutdown::Write).unwrap();
            });
            let mut echoed = Vec::new();
            stream.read_to_end(&mut echoed).unwrap();
            sender.join().unwrap();
            (addrs[0], echoed)
        })
        .unwrap();
    assert_eq!(IpAddr::V4(answer), listener.ip());
    assert!(echoed == expected, "the bytes came back changed");
    assert_eq!(a.network.stats().allowed.load(Ordering::Relaxed), 1);
    a.stop().await;
    b.stop().await;
    drop(ns);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_refused_connections_leaves_the_listener_serving() {
    let (a, b, world) = two_agents(7).await;
    let listener = a
        .network
        .listener_addr("dev", "api", world.api_port)
        .unwrap();
    let stranger = Ipv4Addr::new(127, 97, 0, 99);
    const FLOOD: usize = 2000;
    let mut batch = Vec::new();
    for _ in 0..FLOOD {
        batch.push(tokio::spawn(async move {
            let mut stream = connect_from(stranger, listener).await?;
            let mut buf = [0u8; 1];
            // Closed by the agent without a byte.
            match tokio::time::timeout(WAIT, stream.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => Ok(()),
                Ok(Ok(_)) => Err(std::io::Error::other("got bytes")),
                Err(_) => Err(std::io::Error::other("not closed")),
            }
        }));
        if batch.len() == 200 {
            for task in batch.drain(..) {
                task.await.unwrap().unwrap();
            }
        }
    }
    for task in batch.drain(..) {
        task.await.unwrap().unwrap();
    }
    assert_eq!(
        a.network.stats().denied.load(Ordering::Relaxed),
        FLOOD as u64
    );
    // Nobody drains this agent's outbox (1,024): the events beyond it are
    // dropped and counted, never waited for.
    assert_eq!(
        a.network.stats().events_dropped.load(Ordering::Relaxed),
        (FLOOD - 1024) as u64
    );
    // The sandbox is still served.
    let mut stream = connect_from(world.web_addr, listener).await.unwrap();
    assert_eq!(
        echo_through(&mut stream, b"still here").await,
        b"still here"
    );
    a.stop().await;
    b.stop().await;
}

/// More allowed connections than one alias listener serves at once
/// (`NetworkSettings::max_listener_connections`, default 1,024, from
/// `GLOBALSTACKS_AGENT_MESH_MAX_LISTENER_CONNECTIONS`): the extra one waits in the kernel backlog, neither
/// refused nor served, and is served as soon as an earlier one ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_beyond_the_listener_limit_waits_and_is_served_in_turn() {
    const LIMIT: usize = 1024;
    let (a, b, world) = two_agents(8).await;
    let listener = a
        .network
        .listener_addr("dev", "api", world.api_port)
        .unwrap();
    let mut open = Vec::with_capacity(LIMIT);
    for _ in 0..LIMIT {
        let mut stream = connect_from(world.web_addr, listener).await.unwrap();
        stream.write_all(b"p").await.unwrap();
        let mut one = [0u8; 1];
        tokio::time::timeout(WAIT, stream.read_exact(&mut one))
            .await
            .expect("served within the deadline")
            .unwrap();
        open.push(stream);
    }
    assert_eq!(
        a.network.stats().allowed.load(Ordering::Relaxed),
        LIMIT as u64
    );
    // One more: the kernel completes its handshake, the agent does not take
    // it while every slot is held.
    let mut extra = connect_from(world.web_addr, listener).await.unwrap();
    extra.write_all(b"x").await.unwrap();
    // Round trips on served connections: the agent is alive and busy (an
    // unbounded listener would have admitted the extra one meanwhile).
    let mut one = [0u8; 1];
    for stream in open.iter_mut().take(10) {
        stream.write_all(b"q").await.unwrap();
        tokio::time::timeout(WAIT, stream.read_exact(&mut one))
            .await
            .unwrap()
            .unwrap();
    }
    assert_eq!(
        a.network.stats().allowed.load(Ordering::Relaxed),
        LIMIT as u64
    );
    let mut nothing = [0u8; 1];
    assert!(
        matches!(extra.try_read(&mut nothing), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
        "the connection beyond the limit was served or closed"
    );
    // One ends: the waiting one is taken and served.
    drop(open.pop());
    tokio::time::timeout(WAIT, extra.read_exact(&mut one))
        .await
        .expect("served once a slot was free")
        .unwrap();
    assert_eq!(&one, b"x");
    assert_eq!(
        a.network.stats().allowed.load(Ordering::Relaxed),
        LIMIT as u64 + 1
    );
    assert_eq!(a.network.stats().denied.load(Ordering::Relaxed), 0);
    drop(open);
    drop(extra);
    a.stop().await;
    b.stop().await;
}
