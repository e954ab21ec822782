//! Interop with a stock WireGuard peer: wireguard-go (with wireguard-tools)
//! on a TUN device in a network namespace, configured from a wg-quick file,
//! against our userspace node in the root namespace on the veth address.
//!
//! Both directions, each with a fresh pair, and each side initiating the
//! handshake once. Who initiates is not left to timing: the side that must
//! not initiate has no endpoint for its peer (a WireGuard peer without an
//! endpoint cannot send a handshake initiation), and learns it from the
//! authenticated initiation.
//! 1. The stock peer's kernel TCP client connects to our listener, sends
//!    16 MiB, then receives 16 MiB.
//! 2. Our node dials a kernel TCP server behind the stock peer.
//! 3. Full duplex: the stock peer's client sends 16 MiB to our echo
//!    listener while it reads the echo back.
//!
//! Each moves 16 MiB each way, checked with SHA-256.

use std::io::{Read as _, Write as _};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context as _, Result};
use netstack::config::WgQuickConfig;
use netstack::{MeshNode, PrivateKey};
use sha2::{Digest as _, Sha256};
use tests::netns::{root_or_skip, Netns, WireguardGo};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

const VOLUME: u64 = 16 * 1024 * 1024;
const ECHO_PORT: u16 = 7;
const SERVER_PORT: u16 = 9000;
const OURS: Ipv4Addr = Ipv4Addr::new(100, 64, 9, 1);
const STOCK: Ipv4Addr = Ipv4Addr::new(100, 64, 9, 2);
const OURS6: &str = "fd00:6773::1";
const STOCK6: &str = "fd00:6773::2";
const IO_TIMEOUT: Duration = Duration::from_secs(60);

/// A deterministic byte stream (xorshift64*) so both ends can hash what the
/// other should have sent without keeping 16 MiB around.
struct Pattern(u64);

impl Pattern {
    fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            let word = self.0.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes();
            chunk.copy_from_slice(&word[..chunk.len()]);
        }
    }

    fn digest(seed: u64, len: u64) -> [u8; 32] {
        let mut pattern = Pattern(seed);
        let mut hash = Sha256::new();
        let mut buf = vec![0u8; 64 * 1024];
        let mut left = len;
        while left > 0 {
            let n = left.min(buf.len() as u64) as usize;
            pattern.fill(&mut buf[..n]);
            hash.update(&buf[..n]);
            left -= n as u64;
        }
        hash.finalize().into()
    }
}

/// Writes `len` pattern bytes, then half-closes.
fn send_pattern(stream: &mut std::net::TcpStream, seed: u64, len: u64) -> Result<()> {
    let mut pattern = Pattern(seed);
    let mut buf = vec![0u8; 64 * 1024];
    let mut left = len;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        pattern.fill(&mut buf[..n]);
        stream.write_all(&buf[..n]).context("send")?;
        left -= n as u64;
    }
    stream
        .shutdown(std::net::Shutdown::Write)
        .context("half-close")?;
    Ok(())
}

/// Reads to EOF: (byte count, SHA-256).
fn receive_all(stream: &mut std::net::TcpStream) -> Result<(u64, [u8; 32])> {
    let mut hash = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = 0u64;
    loop {
        let n = stream
            .read(&mut buf)
            .with_context(|| format!("receive after {total} bytes"))?;
        if n == 0 {
            return Ok((total, hash.finalize().into()));
        }
        hash.update(&buf[..n]);
        total += n as u64;
    }
}

/// The stock peer: a namespace with wireguard-go configured from a wg-quick
/// file, its addresses assigned with `ip` as wg-quick would.
struct StockPeer {
    wg: WireguardGo,
    ns: Netns,
    key: PrivateKey,
}

impl StockPeer {
    fn start(
        work: &Path,
        ours: &PrivateKey,
        our_endpoint: Option<SocketAddr>,
    ) -> Result<StockPeer> {
        let ns = Netns::create("gsi")?;
        let wg = WireguardGo::start(&ns, &tests::netns::unique_name("gswg"))?;
        let key = PrivateKey::generate();
        // A full wg-quick file, with the wg-quick-only keys a real one has.
        let mut text = format!(
            "[Interface]\nPrivateKey = {}\nAddress = {STOCK}/24, {STOCK6}/64\nListenPort = 51820\n\
             MTU = 1420\nDNS = {OURS}\n\n[Peer]\nPublicKey = {}\nAllowedIPs = {OURS}/32, {OURS6}/128\n",
            key.to_base64(),
            ours.public_key()
        );
        if let Some(endpoint) = our_endpoint {
            text.push_str(&format!("Endpoint = {endpoint}\n"));
        }
        let file = work.join(format!("{}.conf", wg.interface()));
        std::fs::write(&file, text)?;
        let config = WgQuickConfig::load(&file)?;
        let stripped = work.join(format!("{}.setconf", wg.interface()));
        std::fs::write(&stripped, config.to_wg_setconf())?;
        wg.setconf(&stripped)?;
        for address in &config.interface.addresses {
            ns.ip(&["addr", "add", &address.to_string(), "dev", wg.interface()])?;
        }
        ns.ip(&["link", "set", wg.interface(), "up"])?;
        Ok(StockPeer { wg, ns, key })
    }

    /// Seconds since the epoch of the latest handshake (0: none yet).
    fn latest_handshake(&self) -> Result<u64> {
        let out = self.wg.show("latest-handshakes")?;
        let field = out
            .split_whitespace()
            .nth(1)
            .context("no peer in `wg show latest-handshakes`")?;
        Ok(field.parse()?)
    }

    fn endpoint(&self) -> Result<String> {
        let out = self.wg.show("endpoints")?;
        Ok(out.split_whitespace().nth(1).unwrap_or("").to_owned())
    }
}

/// Our node, configured from a wg-quick file too, bound on the veth address
/// of the root namespace so its traffic stays on the pair.
async fn our_node(
    work: &Path,
    key: &PrivateKey,
    stock: &StockPeer,
    stock_endpoint: Option<SocketAddr>,
) -> Result<MeshNode> {
    let mut text = format!(
        "[Interface]\nPrivateKey = {}\nAddress = {OURS}/32, {OURS6}/128\n\n[Peer]\nPublicKey = {}\n\
         AllowedIPs = {STOCK}/32, {STOCK6}/128\n",
        key.to_base64(),
        stock.key.public_key()
    );
    if let Some(endpoint) = stock_endpoint {
        text.push_str(&format!("Endpoint = {endpoint}\n"));
    }
    let file = work.join("ours.conf");
    std::fs::write(&file, text)?;
    let config = WgQuickConfig::load(&file)?;
    let mut node_config = config.node_config()?;
    node_config.listen = SocketAddr::new(IpAddr::V4(stock.ns.peer_addr()), 0);
    Ok(MeshNode::bind(node_config, config.peer_configs()?).await?)
}

async fn echo(mut stream: netstack::TcpStream) -> std::io::Result<()> {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            return stream.shutdown().await;
        }
        stream.write_all(&buf[..n]).await?;
    }
}

/// Direction 1: the stock peer initiates and its client talks to our echo.
/// What our listener does with the stock peer's connection.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Service {
    /// Reads the client's 16 MiB to EOF, then sends 16 MiB of its own.
    UploadThenDownload,
    /// Echoes while the client sends: both directions at once.
    Echo,
}

/// Our listener's side of [`Service::UploadThenDownload`]: (count, digest)
/// of what it read.
async fn upload_then_download(mut stream: netstack::TcpStream) -> std::io::Result<(u64, [u8; 32])> {
    let mut hash = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut count = 0u64;
    loop {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        hash.update(&buf[..n]);
        count += n as u64;
    }
    let mut pattern = Pattern(4);
    let mut left = VOLUME;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        pattern.fill(&mut buf[..n]);
        stream.write_all(&buf[..n]).await?;
        left -= n as u64;
    }
    stream.shutdown().await?;
    Ok((count, hash.finalize().into()))
}

async fn stock_peer_connects_to_our_listener(work: &Path, service: Service) -> Result<()> {
    let ours = PrivateKey::generate();
    // The stock peer needs our UDP port, known once our node is bound: start
    // it without an endpoint, bind our node (with no endpoint for the stock
    // peer: it must not initiate), then give the stock peer our endpoint.
    let stock = StockPeer::start(work, &ours, None)?;
    let node = our_node(work, &ours, &stock, None).await?;
    let our_endpoint = node.local_addr();
    // Now tell the stock peer where we are (a second `wg setconf` of the same
    // file with the Endpoint added), so that it, and only it, can initiate.
    let mut config = WgQuickConfig::load(&work.join(format!("{}.conf", stock.wg.interface())))?;
    config.peers[0].endpoint = Some(our_endpoint.into());
    let stripped = work.join("stock-with-endpoint.setconf");
    std::fs::write(&stripped, config.to_wg_setconf())?;
    stock.wg.setconf(&stripped)?;
    ensure!(
        stock.latest_handshake()? == 0,
        "handshake before any traffic"
    );

    let listener = node.listen_tcp(ECHO_PORT)?;
    let server = tokio::spawn(async move {
        let (stream, peer) = listener.accept().await?;
        let read = match service {
            Service::Echo => {
                echo(stream).await?;
                None
            }
            Service::UploadThenDownload => Some(upload_then_download(stream).await?),
        };
        std::io::Result::Ok((peer, read))
    });
    let client = stock.ns.spawn(move || -> Result<(u64, [u8; 32])> {
        let target = SocketAddr::from((OURS, ECHO_PORT));
        let mut stream = std::net::TcpStream::connect_timeout(&target, IO_TIMEOUT)
            .with_context(|| format!("connect to our listener at {target}"))?;
        stream.set_read_timeout(Some(IO_TIMEOUT))?;
        stream.set_write_timeout(Some(IO_TIMEOUT))?;
        let mut sender = stream.try_clone()?;
        let writer = std::thread::spawn(move || send_pattern(&mut sender, 1, VOLUME));
        if service == Service::UploadThenDownload {
            // All sent before anything comes back.
            writer
                .join()
                .map_err(|_| anyhow::anyhow!("sender panicked"))??;
            return receive_all(&mut stream);
        }
        let received = receive_all(&mut stream)?;
        writer
            .join()
            .map_err(|_| anyhow::anyhow!("sender panicked"))??;
        Ok(received)
    });
    let (count, digest) = tokio::task::spawn_blocking(move || client.join())
        .await?
        .map_err(|_| anyhow::anyhow!("client thread panicked"))??
        .with_context(|| format!("our node: {:?}", node.status()))?;
    let (peer, read) = server.await??;
    let expected = match service {
        Service::Echo => 1,
        Service::UploadThenDownload => 4,
    };
    ensure!(
        count == VOLUME,
        "client received {count} bytes, expected {VOLUME}"
    );
    ensure!(
        digest == Pattern::digest(expected, VOLUME),
        "bytes at the client differ from the ones sent"
    );
    if let Some((count, digest)) = read {
        ensure!(count == VOLUME, "our listener read {count} bytes");
        ensure!(
            digest == Pattern::digest(1, VOLUME),
            "bytes at our listener differ"
        );
    }
    ensure!(peer.ip() == IpAddr::V4(STOCK), "client came from {peer}");
    ensure!(
        stock.latest_handshake()? > 0,
        "stock peer reports no handshake"
    );
    let status = node.status();
    let ours_view = status
        .peer(&stock.key.public_key())
        .context("our node lost the stock peer")?;
    ensure!(
        ours_view.endpoint == Some(SocketAddr::from((stock.ns.addr(), 51820))),
        "our node learned endpoint {:?}",
        ours_view.endpoint
    );
    node.shutdown().await;
    Ok(())
}

/// Direction 2: our node initiates and dials a kernel server behind the
/// stock peer.
async fn our_node_dials_a_server_behind_the_stock_peer(work: &Path) -> Result<()> {
    let ours = PrivateKey::generate();
    let stock = StockPeer::start(work, &ours, None)?;
    let listener = stock
        .ns
        .run(|| std::net::TcpListener::bind((STOCK, SERVER_PORT)))??;
    let server = std::thread::spawn(move || -> Result<(u64, [u8; 32])> {
        let (mut stream, _) = listener.accept()?;
        stream.set_read_timeout(Some(IO_TIMEOUT))?;
        stream.set_write_timeout(Some(IO_TIMEOUT))?;
        let mut sender = stream.try_clone()?;
        let writer = std::thread::spawn(move || send_pattern(&mut sender, 2, VOLUME));
        let received = receive_all(&mut stream)?;
        writer
            .join()
            .map_err(|_| anyhow::anyhow!("sender panicked"))??;
        Ok(received)
    });
    let node = our_node(
        work,
        &ours,
        &stock,
        Some(SocketAddr::from((stock.ns.addr(), 51820))),
    )
    .await?;
    ensure!(
        stock.latest_handshake()? == 0,
        "handshake before any traffic"
    );

    let target = SocketAddr::from((STOCK, SERVER_PORT));
    let stream = tokio::time::timeout(IO_TIMEOUT, node.dial_tcp(target))
        .await
        .context("dial timed out")??;
    let (mut reader, mut writer) = tokio::io::split(stream);
    let sending = tokio::spawn(async move {
        let mut pattern = Pattern(3);
        let mut buf = vec![0u8; 64 * 1024];
        let mut left = VOLUME;
        while left > 0 {
            let n = left.min(buf.len() as u64) as usize;
            pattern.fill(&mut buf[..n]);
            writer.write_all(&buf[..n]).await?;
            left -= n as u64;
        }
        writer.shutdown().await?;
        std::io::Result::Ok(writer)
    });
    let mut hash = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut count = 0u64;
    let deadline = Instant::now() + IO_TIMEOUT;
    loop {
        let n = tokio::time::timeout_at(deadline.into(), reader.read(&mut buf))
            .await
            .context("receiving from the server timed out")??;
        if n == 0 {
            break;
        }
        hash.update(&buf[..n]);
        count += n as u64;
    }
    let _writer = sending.await??;
    let (server_count, server_digest) = tokio::task::spawn_blocking(move || server.join())
        .await?
        .map_err(|_| anyhow::anyhow!("server thread panicked"))??;
    ensure!(count == VOLUME, "received {count} bytes from the server");
    ensure!(
        <[u8; 32]>::from(hash.finalize()) == Pattern::digest(2, VOLUME),
        "bytes from the server differ"
    );
    ensure!(
        server_count == VOLUME,
        "server received {server_count} bytes"
    );
    ensure!(
        server_digest == Pattern::digest(3, VOLUME),
        "bytes at the server differ"
    );
    ensure!(
        stock.latest_handshake()? > 0,
        "stock peer reports no handshake"
    );
    // The stock peer had no endpoint for us: it learned it from our
    // initiation.
    let learned = stock.endpoint()?;
    ensure!(
        learned == node.local_addr().to_string(),
        "stock peer learned endpoint `{learned}`, our node is at {}",
        node.local_addr()
    );
    node.shutdown().await;
    Ok(())
}

fn tools_installed() {
    for tool in ["ip", "wg", "wireguard-go"] {
        let found = std::env::var_os("PATH")
            .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
            .unwrap_or(false);
        assert!(
            found,
            "`{tool}` is not installed (packages iproute2, wireguard-tools, wireguard-go)"
        );
    }
}

/// 16 MiB echoed while the client is still sending: our echo spends its
/// time blocked writing, so its receive window closes while the stock peer
/// keeps sending and keeps acknowledging the echoed bytes. This deadlocked
/// while smoltcp's window-scale rounding could pull the right edge of our
/// window back behind what Linux had already sent: Linux's ACKs then
/// carried a sequence number past our zero window and smoltcp dropped them
/// whole, ACK field included (see `retract_receive_window` in the netstack
/// core, which advertises one window unit less so that cannot happen).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wireguard_go_echo_full_duplex_root_netns() {
    if !root_or_skip("wireguard_go_echo_full_duplex_root_netns") {
        return;
    }
    tools_installed();
    let work = tempfile::tempdir().unwrap();
    if let Err(e) = stock_peer_connects_to_our_listener(work.path(), Service::Echo).await {
        panic!("{e:#}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wireguard_go_interop_both_directions_root_netns() {
    if !root_or_skip("wireguard_go_interop_both_directions_root_netns") {
        return;
    }
    tools_installed();
    let work = tempfile::tempdir().unwrap();
    let result: Result<()> = async {
        stock_peer_connects_to_our_listener(work.path(), Service::UploadThenDownload)
            .await
            .context("stock peer -> our listener")?;
        our_node_dials_a_server_behind_the_stock_peer(work.path())
            .await
            .context("our node -> server behind the stock peer")?;
        Ok(())
    }
    .await;
    if let Err(e) = result {
        panic!("{e:#}");
    }
}
