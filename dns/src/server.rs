//! One address served over UDP and TCP with a [`DnsHandler`]: TCP by
//! hickory's `Server`, UDP by a receive loop of our own that answers what the
//! fast path knows inline and hands every other datagram to the handler as
//! hickory's `Server` would.

use std::{
    io,
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use hickory_server::Server;
use socket2::{Domain, Protocol, Socket, Type};
use tokio::{
    net::{TcpListener, UdpSocket},
    task::JoinSet,
};
use tracing::{debug, info, warn};

use crate::{
    handler::{FastPath, UdpReply},
    DnsError, DnsHandler, DnsStats, Records, Upstream,
};

/// A TCP client that sends nothing for this long is disconnected.
const TCP_IDLE_TIMEOUT: Duration = Duration::from_secs(10);

/// Answers queued per TCP connection.
const TCP_RESPONSE_BUFFER: usize = 32;

/// How often an ephemeral port is retried when its TCP twin is taken.
const EPHEMERAL_ATTEMPTS: usize = 16;

/// Kernel receive buffer of the UDP socket (capped by net.core.rmem_max): a
/// burst of queries waits there instead of being dropped.
const UDP_RECEIVE_BUFFER: usize = 4 << 20;

/// Largest datagram read (longer ones are cut, as hickory's `UdpStream`
/// does).
const UDP_MAX_DATAGRAM: usize = 4096;

/// The agent DNS on one address, UDP and TCP on the same port.
pub struct DnsServer {
    /// TCP.
    server: Server<DnsHandler>,
    /// The UDP receive loop (one: several on one socket all wake for each
    /// datagram, which cost more CPU per query than they gained); it ends
    /// only on an unrecoverable socket error.
    udp: JoinSet<Result<(), DnsError>>,
    local_addr: SocketAddr,
    handler: DnsHandler,
}

impl std::fmt::Debug for DnsServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DnsServer")
            .field("local_addr", &self.local_addr)
            .field("upstream", &self.handler.upstream().servers())
            .finish()
    }
}

impl DnsServer {
    /// Binds UDP and TCP on `addr` (port 0: one ephemeral port free for
    /// both, see [`Self::local_addr`]) and starts serving `records`, with
    /// other names forwarded to `upstream` (minus this address itself).
    pub async fn bind(
        addr: SocketAddr,
        records: Records,
        upstream: Upstream,
    ) -> Result<DnsServer, DnsError> {
        Self::bind_handler(addr, DnsHandler::new(records, upstream)).await
    }

    /// As [`Self::bind`], sharing one handler (and its counters) between the
    /// addresses an agent serves.
    pub async fn bind_handler(
        addr: SocketAddr,
        handler: DnsHandler,
    ) -> Result<DnsServer, DnsError> {
        let (udp, tcp) = bind_sockets(addr).await?;
        let local_addr = udp
            .local_addr()
            .map_err(|source| DnsError::BindUdp { addr, source })?;
        let handler = handler.with_upstream(handler.upstream().without(local_addr));
        if handler.upstream().is_empty() {
            warn!(%local_addr, "agent DNS has no upstream server: names outside .gstacks get SERVFAIL");
        }
        let mut server = Server::new(handler.clone());
        server.register_listener(tcp, TCP_IDLE_TIMEOUT, TCP_RESPONSE_BUFFER);
        let mut udp_loops = JoinSet::new();
        udp_loops.spawn(serve_udp(Arc::new(udp), handler.clone(), local_addr));
        info!(%local_addr, upstream = ?handler.upstream().servers(), "agent DNS serving");
        Ok(DnsServer {
            server,
            udp: udp_loops,
            local_addr,
            handler,
        })
    }

    /// The bound address (the real port when 0 was asked for).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    pub fn records(&self) -> &Records {
        self.handler.records()
    }

    pub fn stats(&self) -> &Arc<DnsStats> {
        self.handler.stats()
    }

    /// Stops accepting queries and waits until both sockets are closed.
    pub async fn shutdown(mut self) -> Result<(), DnsError> {
        let addr = self.local_addr;
        self.udp.abort_all();
        while self.udp.join_next().await.is_some() {}
        self.server
            .shutdown_gracefully()
            .await
            .map_err(|error| DnsError::Serve {
                addr,
                message: error.to_string(),
            })
    }

    /// Runs until a socket fails (it never ends by itself otherwise).
    pub async fn wait(mut self) -> Result<(), DnsError> {
        let addr = self.local_addr;
        let result = tokio::select! {
            tcp = self.server.block_until_done() => tcp.map_err(|error| DnsError::Serve {
                addr,
                message: error.to_string(),
            }),
            Some(udp) = self.udp.join_next() => match udp {
                Ok(result) => result,
                Err(error) => Err(DnsError::Serve {
                    addr,
                    message: format!("UDP receive loop: {error}"),
                }),
            },
        };
        self.udp.abort_all();
        result
    }
}

/// The UDP receive loop: a query the fast path knows is answered inline; any other datagram goes to the hickory handler
/// in a task of its own (it may wait for an upstream server), as hickory's
/// `Server` does with every datagram.
async fn serve_udp(
    socket: Arc<UdpSocket>,
    handler: DnsHandler,
    addr: SocketAddr,
) -> Result<(), DnsError> {
    let mut fast = FastPath::new(&handler);
    let mut buf = vec![0; UDP_MAX_DATAGRAM];
    let mut slow = JoinSet::new();
    loop {
        let (len, src) = match socket.recv_from(&mut buf).await {
            Ok(received) => received,
            Err(error) if is_unrecoverable(&error) => {
                return Err(DnsError::Serve {
                    addr,
                    message: format!("UDP socket: {error}"),
                });
            }
            Err(error) => {
                debug!(%error, %addr, "error receiving on the DNS UDP socket");
                continue;
            }
        };
        if !can_answer(src) {
            debug!(%src, "DNS query from an address that cannot be answered");
            continue;
        }
        let query = &buf[..len];
        if let Some(answer) = fast.answer(query) {
            if let Err(error) = socket.send_to(answer, src).await {
                debug!(%error, %src, "cannot send the DNS answer");
            }
            continue;
        }
        let reply = UdpReply {
            socket: socket.clone(),
            dst: src,
        };
        let handler = handler.clone();
        let query = query.to_vec();
        slow.spawn(async move { handler.serve_datagram(query, src, reply).await });
        while slow.try_join_next().is_some() {}
    }
}

/// hickory's rule: no answer to port 0 or an unspecified or broadcast
/// address.
fn can_answer(src: SocketAddr) -> bool {
    src.port() != 0
        && match src.ip() {
            IpAddr::V4(ip) => !ip.is_unspecified() && !ip.is_broadcast(),
            IpAddr::V6(ip) => !ip.is_unspecified(),
        }
}

/// hickory's rule for giving up on a socket.
fn is_unrecoverable(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::NotConnected | io::ErrorKind::ConnectionAborted
    )
}

async fn bind_sockets(addr: SocketAddr) -> Result<(UdpSocket, TcpListener), DnsError> {
    let attempts = if addr.port() == 0 {
        EPHEMERAL_ATTEMPTS
    } else {
        1
    };
    let mut last_error = None;
    for _ in 0..attempts {
        let udp = bind_udp(addr).map_err(|source| DnsError::BindUdp { addr, source })?;
        let bound = udp
            .local_addr()
            .map_err(|source| DnsError::BindUdp { addr, source })?;
        match TcpListener::bind(bound).await {
            Ok(tcp) => return Ok((udp, tcp)),
            // The kernel's free UDP port may be a busy TCP port: take another.
            Err(source) if addr.port() == 0 && source.kind() == io::ErrorKind::AddrInUse => {
                last_error = Some(DnsError::BindTcp {
                    addr: bound,
                    source,
                });
            }
            Err(source) => return Err(DnsError::BindTcp { addr, source }),
        }
    }
    Err(last_error.unwrap_or(DnsError::BindTcp {
        addr,
        source: io::Error::from(io::ErrorKind::AddrInUse),
    }))
}

fn bind_udp(addr: SocketAddr) -> io::Result<UdpSocket> {
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if let Err(error) = socket.set_recv_buffer_size(UDP_RECEIVE_BUFFER) {
        debug!(%error, "cannot enlarge the DNS UDP receive buffer");
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    UdpSocket::from_std(socket.into())
}
