//! The two ends of a proxied connection over the mesh.

use std::fmt::Display;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use netstack::{MeshNode, TcpListener, TcpStream};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::{splice_until, MeshHeader, ProxyError, Response};

/// The overlay TCP port every agent serves mesh connections on.
pub const MESH_PROXY_PORT: u16 = 4180;

/// What the target agent's `resolve` admits a connection with: where the
/// sandbox listens, and a token that ends the connection when it is
/// cancelled (its allow rule was removed). The proxy cancels the token itself
/// when the connection ends, so its owner can tell live connections from
/// finished ones.
#[derive(Debug, Clone)]
pub struct Admission {
    pub to: SocketAddr,
    pub revoked: CancellationToken,
}

impl From<SocketAddr> for Admission {
    fn from(to: SocketAddr) -> Self {
        Admission {
            to,
            revoked: CancellationToken::new(),
        }
    }
}

/// How long the target agent waits for the header of a new mesh connection.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// The default of the mesh connections one acceptor serves at once
/// (the agent's `GLOBALSTACKS_AGENT_MESH_MAX_MESH_CONNECTIONS`); further
/// ones wait in the listener's backlog.
pub const MAX_MESH_CONNECTIONS: usize = 4096;

/// Source side: connects to the target agent at `target` over the mesh and
/// sends `header`. It does not wait for the answer: the target sends a
/// refusal at once and its acceptance just before the sandbox's first byte
/// (a version 2 [`MeshHeader`]), and the returned [`MeshStream`] reads it
/// first.
pub async fn dial_over_mesh(
    node: &MeshNode,
    target: SocketAddr,
    header: &MeshHeader,
) -> Result<MeshStream, ProxyError> {
    let bytes = header.encode()?;
    let mut stream = node.dial_tcp(target).await?;
    stream.write_all(&bytes).await?;
    Ok(MeshStream {
        inner: stream,
        answer: Answer::Reading(Vec::new()),
    })
}

/// The source's end of a mesh connection. Its first read takes the target's
/// answer: after "accepted" it reads the sandbox's bytes; a refusal is an
/// error whose inner error is the [`ProxyError::Denied`] or
/// [`ProxyError::Unreachable`] with the target's reason (see [`refusal`]).
#[derive(Debug)]
pub struct MeshStream {
    inner: TcpStream,
    answer: Answer,
}

#[derive(Debug)]
enum Answer {
    /// The bytes of the answer so far.
    Reading(Vec<u8>),
    /// The whole answer.
    Received(Response),
}

impl MeshStream {
    /// Waits for the target's answer. Acceptance comes with the sandbox's
    /// first byte, so on a connection where the sandbox waits for the client
    /// to speak first, this returns only after the client has.
    pub async fn answer(&mut self) -> Result<(), ProxyError> {
        std::future::poll_fn(|cx| self.poll_answer(cx)).await
    }

    pub fn peer_addr(&self) -> SocketAddr {
        self.inner.peer_addr()
    }

    fn poll_answer(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        loop {
            let bytes = match &mut self.answer {
                Answer::Received(Response::Accepted) => return Poll::Ready(Ok(())),
                Answer::Received(Response::Denied { reason }) => {
                    let reason = reason.clone();
                    return Poll::Ready(Err(ProxyError::Denied { reason }));
                }
                Answer::Received(Response::Unreachable { reason }) => {
                    let reason = reason.clone();
                    return Poll::Ready(Err(ProxyError::Unreachable { reason }));
                }
                Answer::Reading(bytes) => bytes,
            };
            let needed = Response::needed(bytes)?;
            if bytes.len() == needed {
                self.answer = Answer::Received(Response::decode(bytes)?);
                continue;
            }
            // Exactly the rest of the answer, never a byte of the data.
            let mut part = [0u8; 64];
            let want = (needed - bytes.len()).min(part.len());
            let mut buf = ReadBuf::new(&mut part[..want]);
            ready!(Pin::new(&mut self.inner).poll_read(cx, &mut buf))?;
            if buf.filled().is_empty() {
                return Poll::Ready(Err(ProxyError::Truncated(if bytes.is_empty() {
                    "answer status (the target agent closed the connection)"
                } else {
                    "answer reason"
                })));
            }
            bytes.extend_from_slice(buf.filled());
        }
    }
}

/// The target's refusal inside an error of a [`MeshStream`] read (or of a
/// splice over one).
pub fn refusal(error: &io::Error) -> Option<&ProxyError> {
    error
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<ProxyError>())
        .filter(|e| {
            matches!(
                e,
                ProxyError::Denied { .. } | ProxyError::Unreachable { .. }
            )
        })
}

impl MeshStream {
    /// The answer as an I/O error when it is a refusal (or malformed).
    fn poll_answer_io(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if matches!(self.answer, Answer::Received(Response::Accepted)) {
            return Poll::Ready(Ok(()));
        }
        let Err(e) = ready!(self.poll_answer(cx)) else {
            return Poll::Ready(Ok(()));
        };
        let kind = match e {
            ProxyError::Denied { .. } => io::ErrorKind::PermissionDenied,
            ProxyError::Unreachable { .. } => io::ErrorKind::ConnectionRefused,
            ProxyError::Io(e) => return Poll::Ready(Err(e)),
            _ => io::ErrorKind::InvalidData,
        };
        Poll::Ready(Err(io::Error::new(kind, e)))
    }

    /// A write failed: when the target refused the connection (and then
    /// closed it, which is why the write failed), the refusal is the error
    /// to report, not the write's.
    fn refusal_instead(&mut self, cx: &mut Context<'_>, error: io::Error) -> io::Error {
        match self.poll_answer_io(cx) {
            Poll::Ready(Err(refused)) if refusal(&refused).is_some() => refused,
            _ => error,
        }
    }
}

impl AsyncRead for MeshStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_answer_io(cx))?;
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for MeshStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        match ready!(Pin::new(&mut this.inner).poll_write(cx, data)) {
            Err(e) => Poll::Ready(Err(this.refusal_instead(cx, e))),
            written => Poll::Ready(written),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        match ready!(Pin::new(&mut this.inner).poll_shutdown(cx)) {
            Err(e) => Poll::Ready(Err(this.refusal_instead(cx, e))),
            done => Poll::Ready(done),
        }
    }
}

/// The target's end of an accepted connection: the "accepted" byte goes out
/// just before the sandbox's first byte, or before the FIN when the sandbox
/// closes without sending any.
struct AcceptedFirst {
    inner: TcpStream,
    owed: bool,
}

impl AcceptedFirst {
    fn poll_pay(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.owed {
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &ACCEPTED))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.owed = false;
        }
        Poll::Ready(Ok(()))
    }
}

const ACCEPTED: [u8; 1] = [0];

impl AsyncRead for AcceptedFirst {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for AcceptedFirst {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        ready!(this.poll_pay(cx))?;
        Pin::new(&mut this.inner).poll_write(cx, data)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_pay(cx))?;
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

/// How long a refused connection is kept open for its refusal to arrive.
const REFUSAL_LINGER: Duration = Duration::from_secs(2);
/// Bytes of the source's data read and dropped meanwhile.
const REFUSAL_DRAIN: usize = 256 * 1024;

/// Sends a refusal and closes gracefully. The source does not wait for the
/// answer before sending its client's bytes, and closing a connection with
/// unread bytes resets it, which would throw away the refusal still queued:
/// so the bytes that arrive are read and dropped until the source closes
/// (it does on reading the refusal), for at most [`REFUSAL_LINGER`] and
/// [`REFUSAL_DRAIN`] bytes.
async fn refuse(stream: &mut TcpStream, answer: Response) -> Result<(), ProxyError> {
    answer.write_to(stream).await?;
    let _ = stream.shutdown().await;
    let drain = async {
        // On the heap: an array here would live in every connection's
        // future (4 KiB of each idle connection's task), refused or not.
        let mut sink = vec![0u8; 4096];
        let mut drained = 0;
        while drained < REFUSAL_DRAIN {
            match stream.read(&mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(n) => drained += n,
            }
        }
    };
    let _ = tokio::time::timeout(REFUSAL_LINGER, drain).await;
    Ok(())
}

/// Target side: serves every connection of `listener` until the listener
/// fails (the mesh node shut down), at most `max_connections` at once
/// (further ones wait in the listener's backlog). For each one: read the header (within
/// [`HEADER_TIMEOUT`]), ask `resolve` with the header and the source's
/// overlay address, then either answer the denial (the error's text) and
/// close, or connect to the admitted address and splice (the acceptance
/// going out before the sandbox's first byte) until
/// either side is done or the admission is revoked.
///
/// `resolve` is where the agent applies `policy::decide` against its netmap
/// (and checks that the overlay address belongs to the claimed source).
pub async fn accept_from_mesh<F, A, E>(
    listener: TcpListener,
    max_connections: usize,
    resolve: F,
) -> Result<(), ProxyError>
where
    F: Fn(&MeshHeader, SocketAddr) -> Result<A, E> + Send + Sync + 'static,
    A: Into<Admission>,
    E: Display,
{
    let resolve = Arc::new(resolve);
    let slots = Arc::new(Semaphore::new(max_connections.max(1)));
    loop {
        // The semaphore is never closed, so this always waits for a slot.
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return Ok(());
        };
        let (stream, from) = listener.accept().await?;
        let resolve = resolve.clone();
        tokio::spawn(async move {
            if let Err(e) = serve(stream, from, &*resolve).await {
                tracing::debug!(%from, error = %e, "mesh connection refused or failed");
            }
            drop(permit);
        });
    }
}

async fn serve<F, A, E>(
    mut stream: TcpStream,
    from: SocketAddr,
    resolve: &F,
) -> Result<(), ProxyError>
where
    F: Fn(&MeshHeader, SocketAddr) -> Result<A, E>,
    A: Into<Admission>,
    E: Display,
{
    let header = tokio::time::timeout(HEADER_TIMEOUT, MeshHeader::read_from(&mut stream))
        .await
        .map_err(|_| ProxyError::HeaderTimeout(HEADER_TIMEOUT))??;
    // Converted at once: `A` and `E` need not be `Send`.
    let resolved: Result<Admission, String> = resolve(&header, from)
        .map(Into::into)
        .map_err(|refusal| refusal.to_string());
    let admission = match resolved {
        Ok(admission) => admission,
        Err(reason) => {
            refuse(
                &mut stream,
                Response::Denied {
                    reason: reason.clone(),
                },
            )
            .await?;
            return Err(ProxyError::Denied { reason });
        }
    };
    // However this ends, the connection is over for the admission's owner.
    let _ended = admission.revoked.clone().drop_guard();
    let to = admission.to;
    let connect = tokio::select! {
        connect = tokio::net::TcpStream::connect(to) => connect,
        _ = admission.revoked.cancelled() => return Ok(()),
    };
    let mut upstream = match connect {
        Ok(upstream) => upstream,
        Err(e) => {
            let reason = format!("cannot connect to {to}: {e}");
            refuse(
                &mut stream,
                Response::Unreachable {
                    reason: reason.clone(),
                },
            )
            .await?;
            return Err(ProxyError::Unreachable { reason });
        }
    };
    let _ = upstream.set_nodelay(true);
    let mut stream = AcceptedFirst {
        inner: stream,
        owed: true,
    };
    let Some(spliced) = splice_until(&mut stream, &mut upstream, &admission.revoked).await? else {
        tracing::debug!(%from, %to, network = %header.network, alias = %header.alias, "mesh connection closed: revoked");
        return Ok(());
    };
    tracing::debug!(
        %from, %to, network = %header.network, alias = %header.alias, port = header.port,
        source = %header.source, sent = spliced.a_to_b, received = spliced.b_to_a,
        "mesh connection closed"
    );
    Ok(())
}
