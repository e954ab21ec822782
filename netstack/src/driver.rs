//! The tokio driver: one task owns the [`Node`], its UDP socket and one
//! timer. It processes everything that arrived, runs the node until it makes
//! no progress, then sleeps until the next datagram, the next socket
//! operation or `poll_timeout()` — never a zero or fixed-interval sleep.
//!
//! Handles (`TcpStream`, `TcpListener`, `UdpSocket`) lock the node for the
//! moment of one socket operation (a copy into or out of the smoltcp socket
//! buffer, which is the only buffer: backpressure is the TCP window) and
//! notify the driver task.

use std::future::poll_fn;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::Notify;
use tokio::task::JoinHandle;

use crate::node::{ConnectState, Node, NodeConfig, PeerConfig, SocketId, Transmit};
use crate::status::Status;
use crate::wire_socket::WireSocket;
use crate::{NetstackError, PublicKey};

/// Datagrams received per pass before the node processes them.
const RECV_BATCH: usize = 32;
/// Largest datagram accepted.
const MAX_DATAGRAM: usize = 65535;
/// How long `dial_tcp` waits for the connection (the WireGuard handshake
/// included) before giving up.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

struct Shared {
    node: Mutex<Node>,
    /// Wakes the driver task after a socket operation.
    wake: Notify,
    shutdown: AtomicBool,
}

impl Shared {
    fn node(&self) -> MutexGuard<'_, Node> {
        // A panic elsewhere cannot leave the node half-updated in a way that
        // matters more than stopping the whole mesh; keep serving.
        self.node.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn check_open(&self) -> io::Result<()> {
        if self.shutdown.load(Ordering::Acquire) {
            Err(io::Error::new(
                io::ErrorKind::NotConnected,
                NetstackError::Shutdown,
            ))
        } else {
            Ok(())
        }
    }
}

struct Inner {
    shared: Arc<Shared>,
    local_addr: SocketAddr,
    public_key: PublicKey,
    addresses: Vec<IpAddr>,
    task: Mutex<Option<JoinHandle<()>>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.shared.shutdown.store(true, Ordering::Release);
        self.shared.wake.notify_one();
    }
}

/// A running mesh node. Cheap to clone; the node stops when the last clone
/// is dropped or on [`MeshNode::shutdown`].
#[derive(Clone)]
pub struct MeshNode {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for MeshNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MeshNode")
            .field("public_key", &self.inner.public_key)
            .field("addresses", &self.inner.addresses)
            .field("local_addr", &self.inner.local_addr)
            .finish()
    }
}

impl MeshNode {
    /// Bind the UDP socket, build the node and start its driver task.
    pub async fn bind(
        config: NodeConfig,
        peers: Vec<PeerConfig>,
    ) -> Result<MeshNode, NetstackError> {
        let node = Node::new(config.private_key, &config.addresses, peers, Instant::now())?;
        let udp =
            WireSocket::bind(config.listen).map_err(|e| NetstackError::Bind(config.listen, e))?;
        let local_addr = udp
            .local_addr()
            .map_err(|e| NetstackError::Bind(config.listen, e))?;
        let public_key = node.public_key();
        let shared = Arc::new(Shared {
            node: Mutex::new(node),
            wake: Notify::new(),
            shutdown: AtomicBool::new(false),
        });
        let task = tokio::spawn(drive(shared.clone(), udp));
        Ok(MeshNode {
            inner: Arc::new(Inner {
                shared,
                local_addr,
                public_key,
                addresses: config.addresses,
                task: Mutex::new(Some(task)),
            }),
        })
    }

    /// The address of the node's UDP socket.
    pub fn local_addr(&self) -> SocketAddr {
        self.inner.local_addr
    }

    pub fn public_key(&self) -> PublicKey {
        self.inner.public_key
    }

    /// The node's overlay addresses.
    pub fn addresses(&self) -> &[IpAddr] {
        &self.inner.addresses
    }

    fn shared(&self) -> &Arc<Shared> {
        &self.inner.shared
    }

    /// Replace the peer set; sessions and connections of peers that stay
    /// are kept.
    pub fn set_peers(&self, peers: Vec<PeerConfig>) -> Result<(), NetstackError> {
        self.shared().node().set_peers(peers, Instant::now())?;
        self.shared().wake.notify_one();
        Ok(())
    }

    pub fn status(&self) -> Status {
        self.shared().node().status()
    }

    /// Connect to `remote` over the mesh (handshaking with the peer first if
    /// needed). Fails after [`CONNECT_TIMEOUT`].
    pub async fn dial_tcp(&self, remote: SocketAddr) -> Result<TcpStream, NetstackError> {
        let shared = self.shared().clone();
        shared.check_open().map_err(|_| NetstackError::Shutdown)?;
        let id = shared.node().tcp_connect(remote)?;
        shared.wake.notify_one();
        let established = poll_fn(|cx| {
            let mut node = shared.node();
            match node.tcp_connect_state(id) {
                ConnectState::Established => Poll::Ready(true),
                ConnectState::Failed => Poll::Ready(false),
                ConnectState::Connecting => {
                    node.tcp_register_waker(id, cx.waker());
                    Poll::Pending
                }
            }
        });
        let outcome = tokio::time::timeout(CONNECT_TIMEOUT, established).await;
        let endpoints = shared.node().tcp_endpoints(id);
        match (outcome, endpoints) {
            (Ok(true), Some((local, peer))) => Ok(TcpStream {
                shared,
                id,
                local,
                peer,
            }),
            (outcome, _) => {
                let mut node = shared.node();
                node.tcp_abort(id);
                node.tcp_release(id);
                drop(node);
                shared.wake.notify_one();
                if shared.shutdown.load(Ordering::Acquire) {
                    Err(NetstackError::Shutdown)
                } else if outcome.is_err() {
                    Err(NetstackError::ConnectTimeout(remote))
                } else {
                    Err(NetstackError::ConnectionRefused(remote))
                }
            }
        }
    }

    /// Listen on overlay TCP `port` (all node addresses).
    pub fn listen_tcp(&self, port: u16) -> Result<TcpListener, NetstackError> {
        self.shared().node().tcp_listen(port)?;
        let ip = self.inner.addresses[0];
        Ok(TcpListener {
            shared: self.shared().clone(),
            port,
            local: SocketAddr::new(ip, port),
        })
    }

    /// A UDP socket on overlay `port` (all node addresses).
    pub fn bind_udp(&self, port: u16) -> Result<UdpSocket, NetstackError> {
        let id = self.shared().node().udp_bind(port)?;
        let ip = self.inner.addresses[0];
        Ok(UdpSocket {
            shared: self.shared().clone(),
            id,
            local: SocketAddr::new(ip, port),
        })
    }

    /// Stop the driver: every connection is reset and every handle fails.
    pub async fn shutdown(&self) {
        self.shared().shutdown.store(true, Ordering::Release);
        self.shared().wake.notify_one();
        let task = self
            .inner
            .task
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(task) = task {
            if let Err(e) = task.await {
                tracing::warn!(error = %e, "mesh node driver ended abnormally");
            }
        }
    }
}

/// The driver task.
async fn drive(shared: Arc<Shared>, udp: WireSocket) {
    let mut buffers: Vec<Vec<u8>> = (0..RECV_BATCH).map(|_| vec![0u8; MAX_DATAGRAM]).collect();
    let mut received: Vec<(usize, SocketAddr, usize)> = Vec::with_capacity(RECV_BATCH);
    let mut out: Vec<Transmit> = Vec::new();
    while !shared.shutdown.load(Ordering::Acquire) {
        tokio::task::consume_budget().await;
        received.clear();
        while received.len() < RECV_BATCH {
            match udp.try_recv(&mut buffers[received.len()]) {
                Ok(got) => received.push((got.len, got.from, got.segment)),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    tracing::debug!(error = %e, "UDP receive error");
                    break;
                }
            }
        }
        let now = Instant::now();
        let deadline = {
            let mut node = shared.node();
            for transmit in out.drain(..) {
                node.recycle(transmit.contents);
            }
            for (buf, (len, from, segment)) in buffers.iter().zip(&received) {
                for datagram in buf[..*len].chunks(*segment) {
                    node.handle_udp(now, *from, datagram);
                }
            }
            node.handle_timeout(now);
            while let Some(transmit) = node.poll_transmit() {
                out.push(transmit);
            }
            node.poll_timeout()
        };
        udp.send_all(&out).await;
        if !received.is_empty() || !out.is_empty() {
            // Progress: go round again before sleeping.
            continue;
        }
        let sleep = async {
            match deadline {
                Some(at) => tokio::time::sleep_until(at.into()).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = udp.readable() => {}
            _ = shared.wake.notified() => {}
            _ = sleep => {}
        }
    }
    shared.node().close_all();
}

/// A TCP connection over the mesh. Reading and writing go straight to the
/// smoltcp socket's bounded buffers.
pub struct TcpStream {
    shared: Arc<Shared>,
    id: SocketId,
    local: SocketAddr,
    peer: SocketAddr,
}

impl std::fmt::Debug for TcpStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TcpStream")
            .field("local", &self.local)
            .field("peer", &self.peer)
            .finish()
    }
}

impl TcpStream {
    pub fn peer_addr(&self) -> SocketAddr {
        self.peer
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }
}

impl AsyncRead for TcpStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.shared.check_open()?;
        let mut node = this.shared.node();
        // Initialize (zero) only as much of `buf` as there is to read: a
        // reader may hand in a large uninitialized buffer for each read.
        let len = buf.remaining().min(node.tcp_recv_available(this.id).max(1));
        let result = node.tcp_recv(this.id, buf.initialize_unfilled_to(len), Some(cx.waker()));
        drop(node);
        match result {
            Ok(n) => {
                buf.advance(n);
                if n > 0 {
                    // The window opened: the driver may owe the peer an update.
                    this.shared.wake.notify_one();
                }
                Poll::Ready(Ok(()))
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Poll::Pending,
            Err(e) => Poll::Ready(Err(e)),
        }
    }
}

impl AsyncWrite for TcpStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.shared.check_open()?;
        let result = this.shared.node().tcp_send(this.id, data, Some(cx.waker()));
        match result {
            Ok(n) => {
                this.shared.wake.notify_one();
                Poll::Ready(Ok(n))
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Poll::Pending,
            Err(e) => Poll::Ready(Err(e)),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    /// Half-close: FIN after the queued bytes; reading continues.
    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.shared.check_open()?;
        this.shared.node().tcp_shutdown(this.id);
        this.shared.wake.notify_one();
        Poll::Ready(Ok(()))
    }
}

impl Drop for TcpStream {
    fn drop(&mut self) {
        self.shared.node().tcp_release(self.id);
        self.shared.wake.notify_one();
    }
}

/// Accepts TCP connections on one overlay port. smoltcp has no backlog: a
/// pool of listening sockets is refilled before every SYN, so bursts are
/// all accepted (up to [`crate::ACCEPT_BACKLOG`] waiting).
pub struct TcpListener {
    shared: Arc<Shared>,
    port: u16,
    local: SocketAddr,
}

impl std::fmt::Debug for TcpListener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TcpListener")
            .field("local", &self.local)
            .finish()
    }
}

impl TcpListener {
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    pub fn poll_accept(&self, cx: &mut Context<'_>) -> Poll<io::Result<(TcpStream, SocketAddr)>> {
        self.shared.check_open()?;
        let mut node = self.shared.node();
        match node.tcp_accept(self.port, Some(cx.waker())) {
            Some((id, peer)) => {
                let local = node
                    .tcp_endpoints(id)
                    .map_or(self.local, |(local, _)| local);
                drop(node);
                let stream = TcpStream {
                    shared: self.shared.clone(),
                    id,
                    local,
                    peer,
                };
                Poll::Ready(Ok((stream, peer)))
            }
            None => Poll::Pending,
        }
    }

    /// The next connection and its remote address.
    pub async fn accept(&self) -> io::Result<(TcpStream, SocketAddr)> {
        poll_fn(|cx| self.poll_accept(cx)).await
    }
}

impl Drop for TcpListener {
    fn drop(&mut self) {
        self.shared.node().tcp_unlisten(self.port);
        self.shared.wake.notify_one();
    }
}

/// A UDP socket over the mesh.
pub struct UdpSocket {
    shared: Arc<Shared>,
    id: SocketId,
    local: SocketAddr,
}

impl std::fmt::Debug for UdpSocket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UdpSocket")
            .field("local", &self.local)
            .finish()
    }
}

impl UdpSocket {
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// Send one datagram; waits while the send buffer is full.
    pub async fn send_to(&self, data: &[u8], to: SocketAddr) -> io::Result<usize> {
        poll_fn(|cx| {
            self.shared.check_open()?;
            let result = self
                .shared
                .node()
                .udp_send_to(self.id, data, to, Some(cx.waker()));
            match result {
                Ok(()) => {
                    self.shared.wake.notify_one();
                    Poll::Ready(Ok(data.len()))
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => Poll::Pending,
                Err(e) => Poll::Ready(Err(e)),
            }
        })
        .await
    }

    /// Receive one datagram (truncated to `buf`) and its sender.
    pub async fn recv_from(&self, buf: &mut [u8]) -> io::Result<(usize, SocketAddr)> {
        poll_fn(|cx| {
            self.shared.check_open()?;
            let result = self
                .shared
                .node()
                .udp_recv_from(self.id, buf, Some(cx.waker()));
            match result {
                Ok(got) => Poll::Ready(Ok(got)),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => Poll::Pending,
                Err(e) => Poll::Ready(Err(e)),
            }
        })
        .await
    }
}

impl Drop for UdpSocket {
    fn drop(&mut self) {
        self.shared.node().udp_release(self.id);
        self.shared.wake.notify_one();
    }
}
