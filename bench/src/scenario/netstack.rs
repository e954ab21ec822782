//! `gstacks-bench netstack`: the mesh data path between two of our nodes on
//! loopback, beside direct loopback TCP, onetun and a wireguard-go pair, all
//! measured in the same run with the same [`workload`](crate::workload).
//!
//! Systems:
//! - `gstacks`: two `MeshNode`s in this process on 127.0.0.1.
//! - `loopback`: kernel TCP on 127.0.0.1, no tunnel.
//! - `onetun`: a local port forwarded by onetun to the far `MeshNode` (onetun
//!   needs a WireGuard peer; ours is the one that needs no root). Available
//!   when the binary is found.
//! - `wireguard-go`: two wireguard-go daemons on TUN devices in two network
//!   namespaces joined by a veth pair, kernel TCP on top. Available as root
//!   with wireguard-go and wireguard-tools installed.
//!
//! The memory figure is the RSS of one process holding 10,000 idle
//! connections: for `gstacks` and `loopback` a child `gstacks-bench
//! hold-idle` that dials them (through its own `MeshNode`, or kernel TCP); for
//! `onetun` and `wireguard-go` the daemon's process while the child's
//! connections pass through it (kernel socket memory is not in any RSS).

use std::io::{BufRead as _, BufReader};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _, Result};
use netstack::config::{Endpoint, Interface, Peer, WgQuickConfig};
use netstack::{MeshNode, PrivateKey};
use tests::netns::{ChildGuard, Netns, WireguardGo};
use tokio::runtime::Runtime;

use crate::results::{Metric, Results, System};
use crate::workload::{self, BoxStream, Dialer};

pub const SCENARIO: &str = "netstack";
pub const METRICS: [Metric; 6] = [
    Metric::ThroughputUp,
    Metric::ThroughputDown,
    Metric::RttP50,
    Metric::RttP99,
    Metric::ConnectRate,
    Metric::Rss10kIdle,
];

/// The overlay port of the workload service on every system.
const SERVICE_PORT: u16 = 5001;
const CONNECTS: usize = 1_000;
const CONNECT_PARALLEL: usize = 64;
const IDLE: usize = 10_000;
const IDLE_PARALLEL: usize = 256;
const RTT_SIZE: usize = 64;
const RTT_WARMUP: usize = 200;
const RTT_COUNT: usize = 5_000;
/// Longest wait for the idle connections to be opened.
const IDLE_DEADLINE: Duration = Duration::from_secs(180);
/// How long the connections stay idle before their RSS is read: a mesh
/// node parks a connection found idle by its once-a-second scan, and a
/// parked connection gives its send ring back. The figure when the last
/// connection opened is printed beside it.
const IDLE_SETTLE: Duration = Duration::from_millis(2500);

#[derive(clap::Args, Debug)]
pub struct Options {
    /// Also write the results as JSON to FILE.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// Seconds per throughput measurement.
    #[arg(long, value_name = "SECONDS", default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..=60))]
    pub seconds: u64,
    /// The onetun binary (`cargo install onetun --version 0.3.10 --root DIR`);
    /// default: `onetun` on PATH.
    #[arg(long, value_name = "PATH")]
    pub onetun: Option<PathBuf>,
}

/// Arguments of the hidden `hold-idle` child: dials idle connections, prints
/// `ready` and its RSS, and holds them until its stdin closes.
#[derive(clap::Args, Debug)]
pub struct HoldIdle {
    /// Dial with kernel TCP to this address.
    #[arg(long, value_name = "ADDR", conflicts_with = "mesh")]
    pub tcp: Option<SocketAddr>,
    /// Bind kernel TCP sockets to this local address first.
    #[arg(long, value_name = "IP", requires = "tcp")]
    pub bind: Option<IpAddr>,
    /// Dial through a MeshNode brought up from this wg-quick file.
    #[arg(long, value_name = "FILE", requires = "target")]
    pub mesh: Option<PathBuf>,
    /// The overlay address to dial through the mesh.
    #[arg(long, value_name = "ADDR")]
    pub target: Option<SocketAddr>,
    #[arg(long, default_value_t = IDLE)]
    pub count: usize,
}

/// Runs the scenario: every system in turn, each figure beside its baselines.
pub fn run(options: &Options) -> Result<Results> {
    raise_fd_limit();
    let mut results = Results::default();
    let seconds = Duration::from_secs(options.seconds);
    let work = tempfile::tempdir().context("create a temporary directory")?;

    eprintln!("netstack: loopback");
    if let Err(e) = loopback(seconds, &mut results) {
        results.unavailable(SCENARIO, System::Loopback, None, format!("{e:#}"));
    }
    eprintln!("netstack: gstacks and onetun");
    if let Err(e) = mesh_and_onetun(Some(options), seconds, work.path(), &mut results) {
        results.unavailable(SCENARIO, System::Gstacks, None, format!("{e:#}"));
    }
    eprintln!("netstack: wireguard-go");
    if let Err(e) = wireguard_go(seconds, work.path(), &mut results) {
        results.unavailable(SCENARIO, System::WireguardGo, None, format!("{e:#}"));
    }
    Ok(results)
}

/// The raw mesh figures alone (system `gstacks`: node A dials node B, and
/// the memory of 10,000 idle connections), recorded under this scenario's
/// name, for a scenario that compares itself with them in the same run.
pub(crate) fn run_mesh(seconds: Duration, results: &mut Results) {
    raise_fd_limit();
    eprintln!("netstack: gstacks");
    let outcome = tempfile::tempdir()
        .context("create a temporary directory")
        .and_then(|work| mesh_and_onetun(None, seconds, work.path(), results));
    if let Err(e) = outcome {
        results.unavailable(SCENARIO, System::Gstacks, None, format!("{e:#}"));
    }
}

pub(crate) fn runtime() -> Result<Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("build tokio runtime")
}

/// Runs `future` as a task (on the runtime's workers, which matters when
/// they live in a network namespace) and waits for it.
fn run_on<T: Send + 'static>(
    runtime: &Runtime,
    future: impl std::future::Future<Output = T> + Send + 'static,
) -> Result<T> {
    runtime
        .block_on(runtime.spawn(future))
        .map_err(|e| anyhow!("measurement task failed: {e}"))
}

/// Runs one measurement as a task (see [`run_on`]) with a deadline, so a
/// stalled transport is reported instead of hanging the run.
fn measured<T: Send + 'static>(
    runtime: &Runtime,
    scenario: &str,
    system: System,
    what: &str,
    deadline: Duration,
    future: impl std::future::Future<Output = std::io::Result<T>> + Send + 'static,
) -> Result<T> {
    eprintln!("{scenario}:   {} {what}", system.name());
    let outcome = run_on(runtime, async move {
        tokio::time::timeout(deadline, future).await
    })?;
    match outcome {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(e)) => Err(anyhow!("{e}")),
        Err(_) => Err(anyhow!(
            "no result within {} s (stalled)",
            deadline.as_secs()
        )),
    }
}

/// Measures throughput, round trips and connect rate of one system under
/// `scenario`; a failed measurement is reported unavailable with its error.
pub(crate) fn measure(
    runtime: &Runtime,
    scenario: &str,
    system: System,
    dial: &Dialer,
    seconds: Duration,
    results: &mut Results,
) {
    let deadline = seconds * 4 + Duration::from_secs(30);
    let d = dial.clone();
    match measured(
        runtime,
        scenario,
        system,
        "throughput up",
        deadline,
        async move { workload::throughput_up(&d, seconds).await },
    ) {
        Ok(v) => results.record(scenario, system, Metric::ThroughputUp, v),
        Err(e) => results.unavailable(
            scenario,
            system,
            Some(Metric::ThroughputUp),
            format!("{e:#}"),
        ),
    }
    let d = dial.clone();
    match measured(
        runtime,
        scenario,
        system,
        "throughput down",
        deadline,
        async move { workload::throughput_down(&d, seconds).await },
    ) {
        Ok(v) => results.record(scenario, system, Metric::ThroughputDown, v),
        Err(e) => results.unavailable(
            scenario,
            system,
            Some(Metric::ThroughputDown),
            format!("{e:#}"),
        ),
    }
    let d = dial.clone();
    match measured(
        runtime,
        scenario,
        system,
        "round trips",
        Duration::from_secs(120),
        async move { workload::round_trips(&d, RTT_SIZE, RTT_WARMUP, RTT_COUNT).await },
    ) {
        Ok((p50, p99)) => {
            results.record(scenario, system, Metric::RttP50, p50);
            results.record(scenario, system, Metric::RttP99, p99);
        }
        Err(e) => {
            results.unavailable(scenario, system, Some(Metric::RttP50), format!("{e:#}"));
            results.unavailable(scenario, system, Some(Metric::RttP99), format!("{e:#}"));
        }
    }
    let d = dial.clone();
    match measured(
        runtime,
        scenario,
        system,
        "connect rate",
        Duration::from_secs(120),
        async move { workload::connect_rate(&d, CONNECTS, CONNECT_PARALLEL).await },
    ) {
        Ok(v) => results.record(scenario, system, Metric::ConnectRate, v),
        Err(e) => results.unavailable(
            scenario,
            system,
            Some(Metric::ConnectRate),
            format!("{e:#}"),
        ),
    }
}

pub(crate) fn record_rss(scenario: &str, system: System, rss: Result<f64>, results: &mut Results) {
    eprintln!("{scenario}:   {} idle connections", system.name());
    match rss {
        Ok(mib) => results.record(scenario, system, Metric::Rss10kIdle, mib),
        Err(e) => results.unavailable(scenario, system, Some(Metric::Rss10kIdle), format!("{e:#}")),
    }
}

/// Serves the workload on every connection a kernel listener accepts.
pub(crate) async fn serve_kernel(listener: tokio::net::TcpListener) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let _ = stream.set_nodelay(true);
                tokio::spawn(workload::serve(stream));
            }
            Err(e) => {
                // EMFILE and the like: report once and stop serving.
                eprintln!("netstack: accept failed: {e}");
                return;
            }
        }
    }
}

pub(crate) fn kernel_dialer(target: SocketAddr, bind: Option<IpAddr>) -> Dialer {
    Arc::new(move || {
        Box::pin(async move {
            let socket = match target {
                SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
                SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
            };
            if let Some(ip) = bind {
                // Fails unless the socket lives where `ip` does: a socket in
                // the wrong namespace never sends anything.
                socket.bind(SocketAddr::new(ip, 0))?;
            }
            let stream = socket.connect(target).await?;
            stream.set_nodelay(true)?;
            Ok(Box::new(stream) as BoxStream)
        })
    })
}

fn loopback(seconds: Duration, results: &mut Results) -> Result<()> {
    let runtime = runtime()?;
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .context("bind loopback listener")?;
    let addr = listener.local_addr()?;
    runtime.spawn(serve_kernel(listener));
    let dial = kernel_dialer(addr, None);
    measure(
        &runtime,
        SCENARIO,
        System::Loopback,
        &dial,
        seconds,
        results,
    );
    let rss = hold_idle_rss(own_command(&["--tcp", &addr.to_string()]), RssOf::Child);
    record_rss(SCENARIO, System::Loopback, rss, results);
    Ok(())
}

fn overlay(host: u8) -> Ipv4Addr {
    Ipv4Addr::new(100, 64, 0, host)
}

fn mesh_peer(key: &PrivateKey, host: u8, endpoint: Option<SocketAddr>) -> Peer {
    Peer {
        public_key: key.public_key(),
        preshared_key: None,
        allowed_ips: vec![IpAddr::V4(overlay(host)).into()],
        endpoint: endpoint.map(Endpoint::from),
        persistent_keepalive: None,
    }
}

fn mesh_config(key: &PrivateKey, host: u8, peers: Vec<Peer>) -> WgQuickConfig {
    WgQuickConfig {
        interface: Interface {
            private_key: key.clone(),
            addresses: vec![IpAddr::V4(overlay(host)).into()],
            listen_port: Some(0),
            host_settings: Vec::new(),
        },
        peers,
    }
}

async fn bind_mesh(config: &WgQuickConfig) -> Result<MeshNode> {
    let mut node_config = config.node_config()?;
    node_config.listen = SocketAddr::from((Ipv4Addr::LOCALHOST, 0));
    let peers = config.peer_configs()?;
    Ok(MeshNode::bind(node_config, peers).await?)
}

/// gstacks (node A dials node B) and, with `options`, onetun (onetun dials
/// node B).
fn mesh_and_onetun(
    options: Option<&Options>,
    seconds: Duration,
    work: &Path,
    results: &mut Results,
) -> Result<()> {
    let runtime = runtime()?;
    let key_child = PrivateKey::generate();
    let key_onetun = PrivateKey::generate();
    let RawMesh {
        dial,
        target,
        node_a,
        node_b,
        key_b,
    } = runtime.block_on(RawMesh::start(vec![
        mesh_peer(&key_child, 3, None),
        mesh_peer(&key_onetun, 4, None),
    ]))?;
    let b_endpoint = node_b.local_addr();
    measure(&runtime, SCENARIO, System::Gstacks, &dial, seconds, results);
    let child_file = work.join("hold-idle.conf");
    let config_child = mesh_config(&key_child, 3, vec![mesh_peer(&key_b, 2, Some(b_endpoint))]);
    let rss = config_child
        .save(&child_file)
        .map_err(anyhow::Error::from)
        .and_then(|()| {
            hold_idle_rss(
                own_command(&[
                    "--mesh",
                    &child_file.to_string_lossy(),
                    "--target",
                    &target.to_string(),
                ]),
                RssOf::Child,
            )
        });
    record_rss(SCENARIO, System::Gstacks, rss, results);

    if let Some(options) = options {
        if let Err(e) = onetun(
            options,
            &runtime,
            &key_onetun,
            &node_b,
            target,
            seconds,
            work,
            results,
        ) {
            results.unavailable(SCENARIO, System::Onetun, None, format!("{e:#}"));
        }
    }
    runtime.block_on(async {
        node_a.shutdown().await;
        node_b.shutdown().await;
    });
    Ok(())
}

/// The raw mesh: two `MeshNode`s in this process over loopback UDP, B
/// serving the workload on its overlay port, A dialing it.
pub(crate) struct RawMesh {
    pub dial: Dialer,
    pub target: SocketAddr,
    pub node_a: Arc<MeshNode>,
    pub node_b: MeshNode,
    /// B's key, for further peers' configurations.
    pub key_b: PrivateKey,
}

impl RawMesh {
    /// Brings both nodes up on the current runtime; `more_peers` are
    /// further peers of B (which learns every endpoint from authenticated
    /// packets).
    pub(crate) async fn start(more_peers: Vec<Peer>) -> Result<RawMesh> {
        let key_a = PrivateKey::generate();
        let key_b = PrivateKey::generate();
        let mut peers_b = vec![mesh_peer(&key_a, 1, None)];
        peers_b.extend(more_peers);
        let node_b = bind_mesh(&mesh_config(&key_b, 2, peers_b)).await?;
        let b_endpoint = node_b.local_addr();
        let config_a = mesh_config(&key_a, 1, vec![mesh_peer(&key_b, 2, Some(b_endpoint))]);
        let node_a = Arc::new(bind_mesh(&config_a).await?);
        let listener = node_b.listen_tcp(SERVICE_PORT)?;
        tokio::spawn(async move {
            // Until the node shuts down.
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(workload::serve(stream));
            }
        });
        let target = SocketAddr::from((overlay(2), SERVICE_PORT));
        let dial: Dialer = {
            let node_a = node_a.clone();
            Arc::new(move || {
                let node_a = node_a.clone();
                Box::pin(async move {
                    let stream = node_a
                        .dial_tcp(target)
                        .await
                        .map_err(std::io::Error::other)?;
                    Ok(Box::new(stream) as BoxStream)
                })
            })
        };
        Ok(RawMesh {
            dial,
            target,
            node_a,
            node_b,
            key_b,
        })
    }
}

#[allow(clippy::too_many_arguments)]
fn onetun(
    options: &Options,
    runtime: &Runtime,
    key: &PrivateKey,
    node_b: &MeshNode,
    target: SocketAddr,
    seconds: Duration,
    work: &Path,
    results: &mut Results,
) -> Result<()> {
    let binary = match &options.onetun {
        Some(path) => path.clone(),
        None => find_on_path("onetun").ok_or_else(|| {
            anyhow!("onetun not installed (cargo install onetun --version 0.3.10 --root DIR; pass --onetun DIR/bin/onetun)")
        })?,
    };
    let key_file = work.join("onetun.key");
    write_secret(&key_file, &key.to_base64())?;
    let port = super::support::free_port(false)?;
    let mut command = Command::new(&binary);
    command
        .arg(format!(
            "127.0.0.1:{port}:{}:{}:TCP",
            target.ip(),
            target.port()
        ))
        .arg("--private-key-file")
        .arg(&key_file)
        .args(["--endpoint-public-key", &node_b.public_key().to_string()])
        .args(["--endpoint-addr", &node_b.local_addr().to_string()])
        .args(["--source-peer-ip", &overlay(4).to_string()])
        .args(["--log", "error"])
        .stdout(Stdio::null())
        .stderr(log_file(&work.join("onetun.log"))?);
    let mut process = ChildGuard::spawn(command, &format!("onetun ({})", binary.display()))?;
    let local = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    wait_listening(local, &mut process)?;
    let dial = kernel_dialer(local, None);
    measure(runtime, SCENARIO, System::Onetun, &dial, seconds, results);
    let pid = process.id();
    let rss = hold_idle_rss(
        own_command(&["--tcp", &local.to_string()]),
        RssOf::Pids(vec![pid]),
    );
    record_rss(SCENARIO, System::Onetun, rss, results);
    Ok(())
}

/// Two wireguard-go daemons in two namespaces; kernel TCP between their
/// overlay addresses. The runtime's threads live in the first namespace.
fn wireguard_go(seconds: Duration, work: &Path, results: &mut Results) -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("needs root (network namespaces and TUN devices)");
    }
    for tool in ["wireguard-go", "wg", "ip"] {
        if find_on_path(tool).is_none() {
            bail!("`{tool}` not installed (packages wireguard-go, wireguard-tools, iproute2)");
        }
    }
    let (ns1, ns2) = Netns::pair("gsb")?;
    let wg1 = WireguardGo::start(&ns1, &tests::netns::unique_name("gsw"))?;
    let wg2 = WireguardGo::start(&ns2, &tests::netns::unique_name("gsw"))?;
    let key1 = PrivateKey::generate();
    let key2 = PrivateKey::generate();
    let inner1 = Ipv4Addr::new(100, 64, 77, 1);
    let inner2 = Ipv4Addr::new(100, 64, 77, 2);
    let setup = |wg: &WireguardGo,
                 ns: &Netns,
                 own: &PrivateKey,
                 other: &PrivateKey,
                 inner: Ipv4Addr,
                 peer_inner: Ipv4Addr,
                 name: &str|
     -> Result<()> {
        let config = WgQuickConfig {
            interface: Interface {
                private_key: own.clone(),
                addresses: vec![IpAddr::V4(inner).into()],
                listen_port: Some(51820),
                host_settings: Vec::new(),
            },
            peers: vec![Peer {
                public_key: other.public_key(),
                preshared_key: None,
                allowed_ips: vec![IpAddr::V4(peer_inner).into()],
                endpoint: Some(Endpoint::from(SocketAddr::from((ns.peer_addr(), 51820)))),
                persistent_keepalive: None,
            }],
        };
        let file = work.join(name);
        write_secret(&file, &config.to_wg_setconf())?;
        wg.setconf(&file)?;
        ns.ip(&["addr", "add", &format!("{inner}/30"), "dev", wg.interface()])?;
        ns.ip(&["link", "set", wg.interface(), "up"])
    };
    setup(&wg1, &ns1, &key1, &key2, inner1, inner2, "wg1.conf")?;
    setup(&wg2, &ns2, &key2, &key1, inner2, inner1, "wg2.conf")?;

    let ns1_name = ns1.name().to_owned();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .on_thread_start(move || {
            if let Err(e) = tests::netns::enter_netns(&ns1_name) {
                // Sockets are bound to the overlay address before they
                // connect, so a thread left outside sends nothing.
                eprintln!("netstack: {e:#}");
            }
        })
        .build()
        .context("build tokio runtime")?;
    let service = SocketAddr::from((inner2, SERVICE_PORT));
    let listener = ns2.run(move || -> std::io::Result<std::net::TcpListener> {
        let listener = std::net::TcpListener::bind(service)?;
        listener.set_nonblocking(true)?;
        Ok(listener)
    })??;
    let listener = {
        let _guard = runtime.enter();
        tokio::net::TcpListener::from_std(listener)?
    };
    runtime.spawn(serve_kernel(listener));
    let dial = kernel_dialer(service, Some(IpAddr::V4(inner1)));
    measure(
        &runtime,
        SCENARIO,
        System::WireguardGo,
        &dial,
        seconds,
        results,
    );
    let mut command = ns1.command(&std::env::current_exe()?.to_string_lossy());
    command.args([
        "hold-idle",
        "--tcp",
        &service.to_string(),
        "--bind",
        &inner1.to_string(),
    ]);
    let rss = hold_idle_rss(command, RssOf::Pids(vec![wg1.pid()]));
    record_rss(SCENARIO, System::WireguardGo, rss, results);
    drop(runtime);
    drop((wg1, wg2));
    drop((ns1, ns2));
    Ok(())
}

/// Whose memory the idle figure reports.
pub(crate) enum RssOf {
    /// The `hold-idle` child itself.
    Child,
    /// Other processes that the child's connections pass through (the sum
    /// of their resident sets).
    Pids(Vec<u32>),
}

pub(crate) fn own_command(args: &[&str]) -> Command {
    let exe = std::env::current_exe().unwrap_or_else(|_| PathBuf::from("gstacks-bench"));
    let mut command = Command::new(exe);
    command.arg("hold-idle").args(args);
    command
}

/// Starts a `hold-idle` child, waits (up to [`IDLE_DEADLINE`]) for its
/// `ready` line, reads the RSS once the connections have been idle for
/// [`IDLE_SETTLE`], then closes its stdin so it exits.
pub(crate) fn hold_idle_rss(mut command: Command, of: RssOf) -> Result<f64> {
    command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    let mut child = command.spawn().context("start hold-idle child")?;
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| anyhow!("no child stdout"))?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let read = BufReader::new(stdout).read_line(&mut line);
        let _ = tx.send(read.map(|_| line));
    });
    let read = |of: &RssOf| -> Result<f64> {
        match of {
            RssOf::Child => rss_mib(child.id()),
            RssOf::Pids(pids) => pids.iter().copied().map(rss_mib).sum(),
        }
    };
    let outcome = match rx.recv_timeout(IDLE_DEADLINE) {
        Ok(Ok(line)) if line.starts_with("ready") => {
            let opened = read(&of);
            std::thread::sleep(IDLE_SETTLE);
            let idle = read(&of);
            if let (Ok(opened), Ok(idle)) = (&opened, &idle) {
                eprintln!(
                    "  RSS {opened:.1} MiB when the last connection opened, {idle:.1} MiB after {:.1} s idle",
                    IDLE_SETTLE.as_secs_f64()
                );
            }
            idle
        }
        Ok(Ok(line)) if line.is_empty() => Err(anyhow!(
            "hold-idle child exited before opening its connections"
        )),
        Ok(Ok(line)) => Err(anyhow!("hold-idle child: {}", line.trim())),
        Ok(Err(e)) => Err(anyhow!("reading hold-idle child: {e}")),
        Err(_) => Err(anyhow!(
            "{IDLE} idle connections not open within {} s",
            IDLE_DEADLINE.as_secs()
        )),
    };
    // Closing stdin tells the child to close its connections and exit.
    drop(child.stdin.take());
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                break;
            }
        }
    }
    outcome
}

/// The resident set of a process, from `/proc/<pid>/status`, in MiB.
pub(crate) fn rss_mib(pid: u32) -> Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("read /proc/{pid}/status"))?;
    let kib: f64 = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| anyhow!("no VmRSS in /proc/{pid}/status"))?;
    Ok(kib / 1024.0)
}

/// The `hold-idle` child: open the connections, print `ready` with the RSS,
/// hold them until stdin closes.
pub fn hold_idle(args: &HoldIdle) -> Result<()> {
    raise_fd_limit();
    let runtime = runtime()?;
    runtime.block_on(async {
        let mut node = None;
        let dial: Dialer = if let Some(tcp) = args.tcp {
            kernel_dialer(tcp, args.bind)
        } else if let (Some(file), Some(target)) = (&args.mesh, args.target) {
            let config = WgQuickConfig::load(file)?;
            let mesh = Arc::new(bind_mesh(&config).await?);
            node = Some(mesh.clone());
            Arc::new(move || {
                let mesh = mesh.clone();
                Box::pin(async move {
                    let stream = mesh.dial_tcp(target).await.map_err(std::io::Error::other)?;
                    Ok(Box::new(stream) as BoxStream)
                })
            })
        } else {
            bail!("hold-idle needs --tcp ADDR or --mesh FILE --target ADDR");
        };
        let held = match workload::open_idle(&dial, args.count, IDLE_PARALLEL).await {
            Ok(held) => held,
            Err(e) => {
                // The parent reads one line: make it the reason.
                println!("failed while opening {} connections: {e}", args.count);
                return Ok(());
            }
        };
        println!("ready {} {:.1}", held.len(), rss_mib(std::process::id())?);
        let mut stdin = tokio::io::stdin();
        let mut buf = [0u8; 64];
        while tokio::io::AsyncReadExt::read(&mut stdin, &mut buf).await? != 0 {}
        drop(held);
        if let Some(node) = node {
            node.shutdown().await;
        }
        Ok(())
    })
}

/// 10,000 connections need more than the usual 1,024 descriptors: raise the
/// soft limit to the hard one.
pub(crate) fn raise_fd_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((_, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    }
}

fn find_on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}

fn write_secret(path: &Path, text: &str) -> Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("create {}", path.display()))?;
    file.write_all(text.as_bytes())
        .with_context(|| format!("write {}", path.display()))
}

/// A file for a baseline's own log (onetun logs every closed connection).
fn log_file(path: &Path) -> Result<Stdio> {
    let file = std::fs::File::create(path).with_context(|| format!("create {}", path.display()))?;
    Ok(Stdio::from(file))
}

/// Polls until something accepts on `addr` (with a deadline), failing early
/// if the process exits.
fn wait_listening(addr: SocketAddr, process: &mut ChildGuard) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        process.check_running()?;
        if std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("nothing listens on {addr} after 10 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
