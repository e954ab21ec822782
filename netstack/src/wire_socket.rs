//! The node's outer UDP socket, where WireGuard datagrams travel, with the
//! kernel's UDP segmentation offload (GSO: one `sendmsg` carries up to 64
//! datagrams of one size to one destination) and receive offload (GRO: one
//! `recvmsg` returns several datagrams of one sender). Both cut the number of
//! system calls per packet, the main cost of a userspace data path. When the
//! kernel refuses GSO, the socket falls back to one datagram per call.

use std::io::{self, IoSlice, IoSliceMut};
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};

use nix::sys::socket::{
    recvmsg, sendmsg, setsockopt, sockopt, ControlMessage, ControlMessageOwned, MsgFlags,
    SockaddrStorage,
};
use tokio::io::Interest;

use crate::node::Transmit;

/// Kernel buffers of the socket: bursts of a fast stream must not overflow
/// them (the kernel caps them at net.core.[rw]mem_max).
const SOCKET_BUFFER: usize = 4 << 20;
/// Most datagrams one GSO send may carry.
const MAX_SEGMENTS: usize = 64;
/// Most bytes one GSO send may carry (an IPv4 UDP payload is at most 65507).
const MAX_GSO_BYTES: usize = 65000;

pub(crate) struct WireSocket {
    socket: tokio::net::UdpSocket,
    gso: AtomicBool,
}

/// One `recvmsg`: `len` bytes from `from`, made of datagrams of `segment`
/// bytes each (the last may be shorter).
pub(crate) struct Received {
    pub(crate) len: usize,
    pub(crate) from: SocketAddr,
    pub(crate) segment: usize,
}

fn to_std(addr: &SockaddrStorage) -> Option<SocketAddr> {
    if let Some(v4) = addr.as_sockaddr_in() {
        return Some(SocketAddr::V4((*v4).into()));
    }
    addr.as_sockaddr_in6()
        .map(|v6| SocketAddr::V6((*v6).into()))
}

impl WireSocket {
    pub(crate) fn bind(listen: SocketAddr) -> io::Result<WireSocket> {
        use socket2::{Domain, Protocol, Socket, Type};
        let socket = Socket::new(
            Domain::for_address(listen),
            Type::DGRAM,
            Some(Protocol::UDP),
        )?;
        if let Err(e) = socket.set_recv_buffer_size(SOCKET_BUFFER) {
            tracing::debug!(error = %e, "cannot enlarge the UDP receive buffer");
        }
        if let Err(e) = socket.set_send_buffer_size(SOCKET_BUFFER) {
            tracing::debug!(error = %e, "cannot enlarge the UDP send buffer");
        }
        socket.set_nonblocking(true)?;
        socket.bind(&listen.into())?;
        let socket = tokio::net::UdpSocket::from_std(socket.into())?;
        if let Err(e) = setsockopt(&socket, sockopt::UdpGroSegment, &true) {
            tracing::debug!(error = %e, "UDP receive offload unavailable");
        }
        Ok(WireSocket {
            socket,
            gso: AtomicBool::new(true),
        })
    }

    pub(crate) fn local_addr(&self) -> io::Result<SocketAddr> {
        self.socket.local_addr()
    }

    pub(crate) async fn readable(&self) -> io::Result<()> {
        self.socket.readable().await
    }

    pub(crate) async fn writable(&self) -> io::Result<()> {
        self.socket.writable().await
    }

    /// Receive without waiting (`WouldBlock` when nothing is there).
    pub(crate) fn try_recv(&self, buf: &mut [u8]) -> io::Result<Received> {
        self.socket.try_io(Interest::READABLE, || {
            let mut iov = [IoSliceMut::new(buf)];
            let mut control = nix::cmsg_space!(i32);
            let msg = recvmsg::<SockaddrStorage>(
                self.socket.as_raw_fd(),
                &mut iov,
                Some(&mut control),
                MsgFlags::empty(),
            )
            .map_err(io::Error::from)?;
            let mut segment = msg.bytes;
            if let Ok(cmsgs) = msg.cmsgs() {
                for cmsg in cmsgs {
                    if let ControlMessageOwned::UdpGroSegments(size) = cmsg {
                        segment = usize::try_from(size).unwrap_or(msg.bytes);
                    }
                }
            }
            let from = msg
                .address
                .as_ref()
                .and_then(to_std)
                .ok_or_else(|| io::Error::other("datagram without a sender address"))?;
            Ok(Received {
                len: msg.bytes,
                from,
                segment: segment.max(1),
            })
        })
    }

    /// Send datagrams of equal size (the last may be shorter) to one
    /// destination, in one call when the kernel supports GSO.
    fn try_send_segments(&self, to: SocketAddr, segments: &[&[u8]]) -> io::Result<()> {
        let addr = SockaddrStorage::from(to);
        if segments.len() == 1 {
            return self.socket.try_send_to(segments[0], to).map(|_| ());
        }
        let size = u16::try_from(segments[0].len())
            .map_err(|_| io::Error::other("segment larger than 64 KiB"))?;
        self.socket.try_io(Interest::WRITABLE, || {
            let iov: Vec<IoSlice<'_>> = segments.iter().map(|s| IoSlice::new(s)).collect();
            let cmsgs = [ControlMessage::UdpGsoSegments(&size)];
            sendmsg(
                self.socket.as_raw_fd(),
                &iov,
                &cmsgs,
                MsgFlags::empty(),
                Some(&addr),
            )
            .map(|_| ())
            .map_err(io::Error::from)
        })
    }

    /// Send every datagram, batching runs of equal-size datagrams to the
    /// same destination. Waits while the socket buffer is full.
    pub(crate) async fn send_all(&self, datagrams: &[Transmit]) {
        let mut i = 0;
        while i < datagrams.len() {
            let (to, first) = (&datagrams[i].destination, &datagrams[i].contents);
            let mut end = i + 1;
            if self.gso.load(Ordering::Relaxed) {
                let mut bytes = first.len();
                while end < datagrams.len() && end - i < MAX_SEGMENTS {
                    let (next_to, next) = (&datagrams[end].destination, &datagrams[end].contents);
                    if next_to != to
                        || next.len() > first.len()
                        || bytes + next.len() > MAX_GSO_BYTES
                    {
                        break;
                    }
                    bytes += next.len();
                    end += 1;
                    if next.len() < first.len() {
                        break;
                    }
                }
            }
            let segments: Vec<&[u8]> = datagrams[i..end]
                .iter()
                .map(|t| t.contents.as_slice())
                .collect();
            loop {
                match self.try_send_segments(*to, &segments) {
                    Ok(()) => break,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        if self.writable().await.is_err() {
                            break;
                        }
                    }
                    Err(e) if segments.len() > 1 => {
                        tracing::debug!(error = %e, "UDP segmentation offload refused: sending one datagram per call");
                        self.gso.store(false, Ordering::Relaxed);
                        for segment in &segments {
                            self.send_one(*to, segment).await;
                        }
                        break;
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, %to, "UDP send error");
                        break;
                    }
                }
            }
            i = end;
        }
    }

    async fn send_one(&self, to: SocketAddr, datagram: &[u8]) {
        loop {
            match self.socket.try_send_to(datagram, to) {
                Ok(_) => return,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if self.writable().await.is_err() {
                        return;
                    }
                }
                Err(e) => {
                    tracing::debug!(error = %e, %to, "UDP send error");
                    return;
                }
            }
        }
    }
}
