//! Runtime networks across network namespaces (needs root; skipped
//! otherwise, and fails when `GSTACKS_REQUIRE_ROOT_TESTS=1`): the control
//! plane in this process, three real `gstacks-agent` processes, each in a
//! namespace of its own, and the real `gstacks` CLI.
//!
//! Layout: every agent namespace has a veth pair to the root namespace (the
//! control plane listens on the root end of A's, B and C route to it) and
//! one to a private bridge (in a hub namespace) that carries the mesh's UDP
//! between the agents. The agent DNS listens on the namespace's veth address,
//! reachable from the test; alias listeners are loopback addresses inside
//! the namespace, sandboxes are TCP servers on loopback addresses inside
//! theirs (sockets made on a thread that joined the namespace).
//!
//! Sandboxes: `web` (and `intruder`) on A are sources; `api` on B and
//! `db`/`worker` on C are echo servers. Bytes go: web (in A) -> A's alias
//! listener -> policy -> mesh -> B or C -> policy -> echo server.
//!
//! One scenario, in order: DNS through the agent (hickory's resolver and
//! `dig`, UDP and TCP); 16 MiB each way with SHA-256, then 16 MiB while an
//! nftables `numgen random` rule drops 1% of the mesh's UDP arriving in B's
//! namespace (this kernel has no netem); denied paths counted in `network show`; live
//! policy remove (the connection it allowed closes within 1 s, another
//! stays) and re-allow; live alias add and remove; B killed (-9) and
//! restarted re-applies its netmap; the control plane stopped (established
//! and new connections keep flowing meanwhile) and restarted on its store.

mod network_support;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::Command;
use std::time::Duration;

use hickory_resolver::config::{NameServerConfig, ResolveHosts, ResolverConfig};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::TokioResolver;
use network_support::{tests_wait, text, AgentProcess, Cluster, WAIT};
use serde_json::Value;
use sha2::{Digest as _, Sha256};
use tests::netns::{root_or_skip, Netns, NftTable, Segment};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::time::Instant;

const API_PORT: u16 = 18_080;
const DB_PORT: u16 = 15_432;
const WORKER_PORT: u16 = 19_090;
const WEB_PORT: u16 = 18_081;
/// A second port of `api`, served by a server that answers the SHA-256 of
/// what it received.
const BLOB_PORT: u16 = 18_082;
const MESH_PORT: u16 = 41_641;
const DNS_PORT: u16 = 1053;
/// Sandbox addresses: loopback addresses inside the namespaces.
const WEB_IP: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 5);
const INTRUDER_IP: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 6);
const STRANGER_IP: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 7);
const SERVER_IP: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 9);
/// The lossy transfer: long enough to cross many drops.
const BIG: usize = 16 << 20;
const BIG_WAIT: Duration = Duration::from_secs(60);

/// An echo server on `addr` inside `ns`: every connection until EOF.
async fn echo_server_in(ns: &Netns, addr: SocketAddr) {
    let listener = ns
        .run(move || -> std::io::Result<std::net::TcpListener> {
            let listener = std::net::TcpListener::bind(addr)?;
            listener.set_nonblocking(true)?;
            Ok(listener)
        })
        .unwrap()
        .unwrap();
    let listener = TcpListener::from_std(listener).unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = stream.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
}

/// A server on `addr` inside `ns` that reads each connection to EOF, then
/// answers the SHA-256 of what it read and closes.
async fn digest_server_in(ns: &Netns, addr: SocketAddr) {
    let listener = ns
        .run(move || -> std::io::Result<std::net::TcpListener> {
            let listener = std::net::TcpListener::bind(addr)?;
            listener.set_nonblocking(true)?;
            Ok(listener)
        })
        .unwrap()
        .unwrap();
    let listener = TcpListener::from_std(listener).unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut hash = Sha256::new();
                let mut buf = vec![0u8; 64 << 10];
                loop {
                    match stream.read(&mut buf).await {
                        Ok(0) => break,
                        Ok(n) => hash.update(&buf[..n]),
                        Err(_) => return,
                    }
                }
                let digest: [u8; 32] = hash.finalize().into();
                let _ = stream.write_all(&digest).await;
                let _ = stream.shutdown().await;
            });
        }
    });
}

/// Sends `data`, half-closes, and reads the 32-byte digest the server
/// answers, within `limit`.
async fn upload_digest(mut stream: TcpStream, data: &[u8], limit: Duration) -> Option<[u8; 32]> {
    tokio::time::timeout(limit, async {
        stream.write_all(data).await.ok()?;
        stream.shutdown().await.ok()?;
        let mut digest = [0u8; 32];
        stream.read_exact(&mut digest).await.ok()?;
        Some(digest)
    })
    .await
    .ok()?
}

/// Connects from `from` inside `ns` (a sandbox's address) to `to`.
async fn connect_in(ns: &Netns, from: Ipv4Addr, to: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = ns
        .run(move || -> std::io::Result<TcpSocket> {
            let socket = TcpSocket::new_v4()?;
            socket.bind(SocketAddr::new(from.into(), 0))?;
            Ok(socket)
        })
        .map_err(std::io::Error::other)??;
    tokio::time::timeout(WAIT, socket.connect(to))
        .await
        .map_err(|_| std::io::Error::other("connect timed out"))?
}

/// Sends `data`, half-closes and reads the echo until EOF within `limit`:
/// the SHA-256 of what came back and its length, or None on any failure.
async fn echo_digest(stream: TcpStream, data: &[u8], limit: Duration) -> Option<([u8; 32], usize)> {
    let (mut r, mut w) = stream.into_split();
    let write = async {
        w.write_all(data).await?;
        w.shutdown().await
    };
    let read = async {
        let mut hash = Sha256::new();
        let mut len = 0;
        let mut buf = vec![0u8; 64 << 10];
        loop {
            let n = r.read(&mut buf).await?;
            if n == 0 {
                return Ok::<_, std::io::Error>((hash.finalize().into(), len));
            }
            hash.update(&buf[..n]);
            len += n;
        }
    };
    let (wrote, read) = tokio::time::timeout(limit, async { tokio::join!(write, read) })
        .await
        .ok()?;
    wrote.ok()?;
    read.ok()
}

/// A round trip of a few bytes on an open connection.
async fn ping(stream: &mut TcpStream, msg: &[u8]) {
    stream.write_all(msg).await.unwrap();
    let mut back = vec![0u8; msg.len()];
    tokio::time::timeout(WAIT, stream.read_exact(&mut back))
        .await
        .expect("echo within the deadline")
        .unwrap();
    assert_eq!(back, msg);
}

/// Loss of the lossy transfer, per mille (`GSTACKS_NETNS_LOSS_PER_MILLE`,
/// default 10 = 1%).
fn loss_per_mille() -> u32 {
    match std::env::var("GSTACKS_NETNS_LOSS_PER_MILLE") {
        Ok(v) => v
            .parse()
            .unwrap_or_else(|_| panic!("GSTACKS_NETNS_LOSS_PER_MILLE=`{v}` is not a number")),
        Err(_) => 10,
    }
}

/// hickory's resolver asking only `server` (UDP, then TCP), no cache, no
/// hosts file.
fn resolver(server: SocketAddr, tcp_only: bool) -> TokioResolver {
    let mut name_server = if tcp_only {
        NameServerConfig::tcp(server.ip())
    } else {
        NameServerConfig::udp_and_tcp(server.ip())
    };
    for connection in &mut name_server.connections {
        connection.port = server.port();
    }
    let config = ResolverConfig::from_name_servers(vec![name_server]);
    let mut builder = TokioResolver::builder_with_config(config, TokioRuntimeProvider::default());
    let options = builder.options_mut();
    options.cache_size = 0;
    options.use_hosts_file = ResolveHosts::Never;
    options.timeout = Duration::from_secs(2);
    builder.build().unwrap()
}

/// The A records of `name` from `resolver`; Err(true) for NXDOMAIN.
async fn lookup_a(resolver: &TokioResolver, name: &str) -> Result<Vec<Ipv4Addr>, bool> {
    match resolver.lookup_ip(name).await {
        Ok(lookup) => Ok(lookup
            .iter()
            .filter_map(|ip| match ip {
                IpAddr::V4(v4) => Some(v4),
                IpAddr::V6(_) => None,
            })
            .collect()),
        Err(e) => Err(e.is_nx_domain()),
    }
}

/// `dig` from Debian's dnsutils (required when root tests are required).
fn dig(server: SocketAddr, name: &str, tcp: bool) -> Option<String> {
    let mut command = Command::new("dig");
    command.args([
        &format!("@{}", server.ip()),
        "-p",
        &server.port().to_string(),
        name,
        "A",
        "+time=2",
        "+tries=2",
        "+noall",
        "+answer",
        "+comments",
    ]);
    if tcp {
        command.arg("+tcp");
    }
    match command.output() {
        Ok(out) => Some(String::from_utf8_lossy(&out.stdout).into_owned()),
        Err(e) => {
            assert!(
                std::env::var("GSTACKS_REQUIRE_ROOT_TESTS").as_deref() != Ok("1"),
                "dig (package dnsutils) is required: {e}"
            );
            println!("dig not run: {e}");
            None
        }
    }
}

/// Settings of an agent inside a namespace: DNS on the namespace's veth
/// address (reachable from the test), mesh on the bridge, alias listeners
/// on the default loopback range inside the namespace, no container engine.
fn agent_env(dns: SocketAddr, mesh: SocketAddr) -> Vec<(&'static str, String)> {
    vec![
        ("DOCKER_HOST", "unix:///nonexistent/docker.sock".to_owned()),
        ("GLOBALSTACKS_AGENT_MESH_DNS_ADDR", dns.to_string()),
        ("GLOBALSTACKS_AGENT_MESH_LISTEN", mesh.to_string()),
        ("GLOBALSTACKS_AGENT_MESH_ENDPOINT", mesh.to_string()),
    ]
}

/// `gstacks network test dev sandbox:sbx_web <target>` passes, both hosts'
/// checks included.
async fn network_test_passes(cluster: &Cluster, target: &str) -> Option<Value> {
    let out = cluster
        .cli(&[
            "network",
            "test",
            "dev",
            "sandbox:sbx_web",
            target,
            "--json",
        ])
        .await;
    let report: Value = serde_json::from_slice(&out.stdout).ok()?;
    (report["passed"] == true && out.status.success()).then_some(report)
}

async fn denied_count(cluster: &Cluster) -> u64 {
    let shown = cluster.json(&["network", "show", "dev"]).await;
    shown["denied_connections"].as_u64().unwrap()
}

/// Until the data path web -> `alias` works end to end (64 KiB echoed).
async fn wait_for_path(a: &Netns, dns: &TokioResolver, alias: &str, port: u16) {
    let name = format!("{alias}.dev.gstacks.");
    tests_wait(|| async {
        let addr = *lookup_a(dns, &name).await.ok()?.first()?;
        let stream = connect_in(a, WEB_IP, SocketAddr::new(addr.into(), port))
            .await
            .ok()?;
        let data = tests::pattern(64 << 10, 0x2545_f491);
        let expected: [u8; 32] = Sha256::digest(&data).into();
        let (digest, _) = echo_digest(stream, &data, Duration::from_secs(3)).await?;
        (digest == expected).then_some(())
    })
    .await;
}

/// The scenario's world: three namespaces on one bridge, three agents.
struct World {
    // Drop order: agents first, then the namespaces they run in.
    agents: Vec<AgentProcess>,
    hosts: Vec<String>,
    dns: Vec<SocketAddr>,
    _segment: Segment,
    ns: Vec<Netns>,
    _dirs: tempfile::TempDir,
}

impl World {
    async fn start() -> (World, Cluster) {
        let ns: Vec<Netns> = (0..3).map(|_| Netns::create("gsa").unwrap()).collect();
        let segment = Segment::create([10, 199, 7]).unwrap();
        let mut mesh = Vec::new();
        for (i, n) in ns.iter().enumerate() {
            let addr = segment.attach(n, "mesh0", 1 + i as u8).unwrap();
            mesh.push(SocketAddr::new(addr.into(), MESH_PORT));
        }
        // The control plane on the root end of A's veth pair; B and C reach
        // it through their own (the root namespace accepts packets for any
        // of its addresses on any interface, nothing is forwarded).
        let control_ip = ns[0].peer_addr();
        for n in &ns[1..] {
            n.ip(&[
                "route",
                "add",
                &format!("{control_ip}/32"),
                "via",
                &n.peer_addr().to_string(),
            ])
            .unwrap();
        }
        let cluster = Cluster::start_on(SocketAddr::new(control_ip.into(), 0)).await;
        let dirs = tempfile::tempdir().unwrap();
        let (_, secret) = cluster
            .running()
            .plane
            .create_provisioning_token("cls_default", "network netns", false, None)
            .unwrap();
        let mut agents = Vec::new();
        let mut dns = Vec::new();
        for (i, n) in ns.iter().enumerate() {
            let dns_addr = SocketAddr::new(n.addr().into(), DNS_PORT);
            dns.push(dns_addr);
            agents.push(AgentProcess::start_in(
                &cluster,
                &dirs.path().join(format!("agent{i}")),
                secret.expose(),
                &agent_env(dns_addr, mesh[i]),
                Some(n.name()),
            ));
        }
        let mut hosts = Vec::new();
        for agent in &agents {
            hosts.push(agent.host_id().await);
        }
        let world = World {
            agents,
            hosts,
            dns,
            _segment: segment,
            ns,
            _dirs: dirs,
        };
        world.wait_sessions(&cluster).await;
        (world, cluster)
    }

    /// Until every agent has a control stream.
    async fn wait_sessions(&self, cluster: &Cluster) {
        let plane = cluster.running().plane.clone();
        tests_wait(|| async {
            self.hosts
                .iter()
                .all(|h| plane.sessions.get(h).is_some())
                .then_some(())
        })
        .await;
    }

    fn logs(&self) -> String {
        self.agents
            .iter()
            .enumerate()
            .map(|(i, a)| format!("--- agent {i} ---\n{}", a.log()))
            .collect()
    }
}

impl Drop for World {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", self.logs());
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_agents_in_namespaces_resolve_connect_under_loss_and_survive_restarts_root_netns() {
    if !root_or_skip(
        "three_agents_in_namespaces_resolve_connect_under_loss_and_survive_restarts_root_netns",
    ) {
        return;
    }
    let started = Instant::now();
    let (mut world, mut cluster) = World::start().await;
    let (host_a, host_b, host_c) = (
        world.hosts[0].clone(),
        world.hosts[1].clone(),
        world.hosts[2].clone(),
    );
    let [ns_a, ns_b, ns_c] = [&world.ns[0], &world.ns[1], &world.ns[2]];
    echo_server_in(ns_b, SocketAddr::new(SERVER_IP.into(), API_PORT)).await;
    digest_server_in(ns_b, SocketAddr::new(SERVER_IP.into(), BLOB_PORT)).await;
    echo_server_in(ns_c, SocketAddr::new(SERVER_IP.into(), DB_PORT)).await;
    echo_server_in(ns_c, SocketAddr::new(SERVER_IP.into(), WORKER_PORT)).await;
    cluster.add_sandbox("sbx_web", &host_a, &WEB_IP.to_string(), &["frontend"]);
    cluster.add_sandbox("sbx_intruder", &host_a, &INTRUDER_IP.to_string(), &[]);
    cluster.add_sandbox("sbx_api", &host_b, &SERVER_IP.to_string(), &[]);
    cluster.add_sandbox("sbx_db", &host_c, &SERVER_IP.to_string(), &[]);
    cluster.json(&["network", "create", "dev"]).await;
    let (api_port, db_port, worker_port, web_port) = (
        API_PORT.to_string(),
        DB_PORT.to_string(),
        WORKER_PORT.to_string(),
        WEB_PORT.to_string(),
    );
    let blob_port = BLOB_PORT.to_string();
    cluster
        .json(&[
            "network", "attach", "dev", "sbx_api", "--alias", "api", "--port", &api_port, "--port",
            &blob_port,
        ])
        .await;
    for (sandbox, alias, port) in [
        ("sbx_db", "db", &db_port),
        ("sbx_web", "web", &web_port),
        ("sbx_intruder", "intruder", &web_port),
    ] {
        cluster
            .json(&[
                "network", "attach", "dev", sandbox, "--alias", alias, "--port", port,
            ])
            .await;
    }
    let allow = |to: &'static str, port: String| {
        let cluster = &cluster;
        async move {
            let rule = cluster
                .json(&[
                    "network", "policy", "allow", "dev", "--from", "web", "--to", to, "--port",
                    &port,
                ])
                .await;
            rule["rule"]["id"].as_str().unwrap().to_owned()
        }
    };
    let api_rule = allow("api", api_port.clone()).await;
    let db_rule = allow("db", db_port.clone()).await;
    allow("api", blob_port.clone()).await;

    // `network test` asks the real agents; it passes once A and the target
    // applied the netmap and joined the mesh.
    let api_target = format!("api:{API_PORT}");
    let db_target = format!("db:{DB_PORT}");
    for (target, host) in [(&api_target, &host_b), (&db_target, &host_c)] {
        let report = tests_wait(|| network_test_passes(&cluster, target)).await;
        let origins: Vec<&str> = report["checks"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|c| c["origin"].as_str())
            .collect();
        assert!(
            origins.contains(&host_a.as_str()) && origins.contains(&host.as_str()),
            "{report}"
        );
    }
    println!("three agents joined in {:?}", started.elapsed());

    // --- DNS through agent A, with hickory's resolver (UDP and TCP) and dig.
    let dns_a = world.dns[0];
    let udp = resolver(dns_a, false);
    let tcp = resolver(dns_a, true);
    let api_ip = lookup_a(&udp, "api.dev.gstacks.").await.unwrap();
    assert_eq!(api_ip.len(), 1, "{api_ip:?}");
    assert!(api_ip[0].is_loopback(), "a listener inside A: {api_ip:?}");
    assert_eq!(lookup_a(&tcp, "api.dev.gstacks.").await.unwrap(), api_ip);
    let db_ip = lookup_a(&udp, "db.dev.gstacks.").await.unwrap();
    assert_ne!(db_ip, api_ip, "one listener address per alias");
    assert_eq!(lookup_a(&udp, "nope.dev.gstacks.").await, Err(true));
    assert_eq!(lookup_a(&tcp, "api.prod.gstacks.").await, Err(true));
    // Every agent answers its own listener for the same name.
    let api_on_c = lookup_a(&resolver(world.dns[2], false), "api.dev.gstacks.")
        .await
        .unwrap();
    assert_eq!(api_on_c.len(), 1);
    for tcp in [false, true] {
        if let Some(answer) = dig(dns_a, "api.dev.gstacks", tcp) {
            assert!(answer.contains("status: NOERROR"), "{answer}");
            assert!(
                answer.contains(&format!("IN\tA\t{}", api_ip[0])),
                "{answer}"
            );
        }
        if let Some(answer) = dig(dns_a, "nope.dev.gstacks", tcp) {
            assert!(answer.contains("status: NXDOMAIN"), "{answer}");
        }
    }
    let api_listener = SocketAddr::new(api_ip[0].into(), API_PORT);
    let db_listener = SocketAddr::new(db_ip[0].into(), DB_PORT);

    // --- 16 MiB each way, echoed, SHA-256 kept.
    let data = tests::pattern(BIG, 0x2545_f491);
    let expected: [u8; 32] = Sha256::digest(&data).into();
    let t = Instant::now();
    let stream = connect_in(ns_a, WEB_IP, api_listener).await.unwrap();
    let (digest, len) = echo_digest(stream, &data, BIG_WAIT)
        .await
        .expect("16 MiB echoed through the mesh");
    let took = t.elapsed();
    assert_eq!(
        (len, digest),
        (BIG, expected),
        "the bytes came back changed"
    );
    println!(
        "16 MiB each way web -> A -> mesh -> B -> api in {took:?} ({:.1} MiB/s each way)",
        16.0 / took.as_secs_f64()
    );

    // --- 16 MiB to B while an nftables `numgen random` rule in B's
    // namespace drops a share of the mesh's UDP arriving there (this kernel
    // has no netem): the server's SHA-256 matches. The rule sees kernel
    // packets, and with UDP GSO one carries up to 64 datagrams, so a drop
    // is a burst and a transfer may see none: another 16 MiB goes until one
    // did (at most 4).
    let per_mille = loss_per_mille();
    let loss = NftTable::create(
        ns_b,
        "inet",
        "gstacks_loss",
        &format!(
            "chain input {{ type filter hook input priority 0; policy accept;
                 udp dport {MESH_PORT} numgen random mod 1000 < {per_mille} counter drop; }}"
        ),
    )
    .unwrap();
    let blob_listener = SocketAddr::new(api_ip[0].into(), BLOB_PORT);
    let mut dropped = 0;
    for round in 1..=4 {
        let t = Instant::now();
        let stream = connect_in(ns_a, WEB_IP, blob_listener).await.unwrap();
        let digest = upload_digest(stream, &data, BIG_WAIT)
            .await
            .expect("16 MiB through the mesh under loss, digest answered");
        let took = t.elapsed();
        assert_eq!(digest, expected, "the bytes arrived changed");
        let before = dropped;
        dropped = loss.counted_packets().unwrap();
        println!(
            "16 MiB web -> A -> mesh ({:.1}% loss at B) -> B -> blob in {took:?} \
             ({:.1} MiB/s), {} mesh packets dropped (round {round})",
            f64::from(per_mille) / 10.0,
            16.0 / took.as_secs_f64(),
            dropped - before,
        );
        if dropped > 0 {
            break;
        }
    }
    drop(loss);
    assert!(dropped > 0, "the loss rule dropped nothing in 4 x 16 MiB");

    // --- Denied: a sandbox with no rule (default deny) and an address that
    // is no sandbox (a source policy does not know): closed at once, counted
    // in `network show` from the agent's events.
    let denied_before = denied_count(&cluster).await;
    for from in [INTRUDER_IP, STRANGER_IP] {
        let mut denied = connect_in(ns_a, from, api_listener).await.unwrap();
        tests::closed_within(&mut denied, WAIT).await;
    }
    tests_wait(|| async { (denied_count(&cluster).await >= denied_before + 2).then_some(()) })
        .await;

    // --- Live policy: removing web -> api closes the open api connection
    // within 1 s; the db connection (another rule) stays.
    let mut to_api = connect_in(ns_a, WEB_IP, api_listener).await.unwrap();
    let mut to_db = connect_in(ns_a, WEB_IP, db_listener).await.unwrap();
    ping(&mut to_api, b"api?").await;
    ping(&mut to_db, b"db?").await;
    cluster
        .json(&["network", "policy", "remove", "dev", &api_rule])
        .await;
    let took = tests::closed_within(&mut to_api, Duration::from_secs(1)).await;
    println!("connection closed {took:?} after the rule removal returned");
    ping(&mut to_db, b"still db").await;
    let mut refused = connect_in(ns_a, WEB_IP, api_listener).await.unwrap();
    tests::closed_within(&mut refused, WAIT).await;
    let out = cluster
        .cli(&["network", "test", "dev", "sandbox:sbx_web", &api_target])
        .await;
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    // Allowed again by a tag rule.
    cluster
        .json(&[
            "network",
            "policy",
            "allow",
            "dev",
            "--from",
            "tag:frontend",
            "--to",
            "api",
        ])
        .await;
    wait_for_path(ns_a, &udp, "api", API_PORT).await;

    // --- Live alias: `worker` on sbx_db appears in A's DNS and serves;
    // removed, it is NXDOMAIN and its listener is gone; db stays.
    cluster
        .json(&[
            "network",
            "alias",
            "add",
            "dev",
            "sbx_db",
            "worker",
            "--port",
            &worker_port,
        ])
        .await;
    allow("worker", worker_port.clone()).await;
    wait_for_path(ns_a, &udp, "worker", WORKER_PORT).await;
    let worker_ip = lookup_a(&udp, "worker.dev.gstacks.").await.unwrap();
    let worker_listener = SocketAddr::new(worker_ip[0].into(), WORKER_PORT);
    cluster
        .json(&["network", "alias", "remove", "dev", "worker"])
        .await;
    tests_wait(|| async {
        (lookup_a(&udp, "worker.dev.gstacks.").await == Err(true)).then_some(())
    })
    .await;
    tests_wait(|| async {
        connect_in(ns_a, WEB_IP, worker_listener)
            .await
            .is_err()
            .then_some(())
    })
    .await;
    ping(&mut to_db, b"db after alias removal").await;

    // --- Agent B killed (-9) and restarted: it re-applies the current
    // netmap (network test passes on its side again) and serves.
    world.agents[1].restart(&cluster);
    let t = Instant::now();
    world.wait_sessions(&cluster).await;
    tests_wait(|| network_test_passes(&cluster, &api_target)).await;
    wait_for_path(ns_a, &udp, "api", API_PORT).await;
    println!("agent B back with its netmap in {:?}", t.elapsed());
    ping(&mut to_db, b"db after B restarted").await;

    // --- The control plane stops: established connections keep flowing and
    // new ones are made, all from what the agents have. Then it starts again
    // on its store and everything holds.
    let before = cluster.json(&["network", "show", "dev"]).await;
    let version = cluster.version().await;
    cluster.stop().await;
    ping(&mut to_db, b"db while the control plane is down").await;
    let stream = connect_in(ns_a, WEB_IP, api_listener).await.unwrap();
    let small = tests::pattern(256 << 10, 0x2545_f491);
    let (digest, _) = echo_digest(stream, &small, WAIT)
        .await
        .expect("a new connection while the control plane is down");
    assert_eq!(digest, <[u8; 32]>::from(Sha256::digest(&small)));
    cluster.resume().await;
    let t = Instant::now();
    world.wait_sessions(&cluster).await;
    println!("agents reconnected {:?} after the restart", t.elapsed());
    assert_eq!(cluster.version().await, version);
    let mut after = cluster.json(&["network", "show", "dev"]).await;
    // Member status and counters may move with the sessions; the model not.
    for key in ["aliases", "policy_rules", "topology_version", "dns_suffix"] {
        assert_eq!(after[key], before[key], "{key} changed over the restart");
    }
    after["members"]
        .as_array_mut()
        .unwrap()
        .sort_by_key(|m| m["sandbox_id"].as_str().unwrap().to_owned());
    assert_eq!(after["members"].as_array().unwrap().len(), 4);
    tests_wait(|| network_test_passes(&cluster, &api_target)).await;
    tests_wait(|| network_test_passes(&cluster, &db_target)).await;
    wait_for_path(ns_a, &udp, "api", API_PORT).await;
    ping(&mut to_db, b"db after the control plane restart").await;
    // Changes still reach the agents: db's rule goes, its connection closes.
    cluster
        .json(&["network", "policy", "remove", "dev", &db_rule])
        .await;
    tests::closed_within(&mut to_db, Duration::from_secs(1)).await;

    let exited: Vec<String> = world
        .agents
        .iter_mut()
        .filter_map(|agent| agent.check_running().err())
        .collect();
    assert!(exited.is_empty(), "{exited:?}\n{}", world.logs());
    println!("scenario took {:?}", started.elapsed());
}
