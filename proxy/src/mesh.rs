//! The two ends of a proxied connection over the mesh.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use std::fmt::Display;

use netstack::{MeshNode, TcpListener, TcpStream};
use tokio::io::AsyncWriteExt;
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
/// How long the source agent waits for the target's answer (which comes
/// after the target has connected to the sandbox).
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(15);
/// The default of the mesh connections one acceptor serves at once
/// (the agent's `GLOBALSTACKS_AGENT_MESH_MAX_MESH_CONNECTIONS`); further
/// ones wait in the listener's backlog.
pub const MAX_MESH_CONNECTIONS: usize = 4096;

/// Source side: connects to the target agent at `target` over the mesh,
/// sends `header` and waits for the answer. On success the stream carries
/// the sandbox's bytes; a refusal is [`ProxyError::Denied`] with the target's
/// reason.
pub async fn dial_over_mesh(
    node: &MeshNode,
    target: SocketAddr,
    header: &MeshHeader,
) -> Result<TcpStream, ProxyError> {
    let bytes = header.encode()?;
    let mut stream = node.dial_tcp(target).await?;
    stream.write_all(&bytes).await?;
    let answer = tokio::time::timeout(ANSWER_TIMEOUT, Response::read_from(&mut stream))
        .await
        .map_err(|_| ProxyError::AnswerTimeout {
            target,
            after: ANSWER_TIMEOUT,
        })??;
    match answer {
        Response::Accepted => Ok(stream),
        Response::Denied { reason } => Err(ProxyError::Denied { reason }),
        Response::Unreachable { reason } => Err(ProxyError::Unreachable { reason }),
    }
}

/// Target side: serves every connection of `listener` until the listener
/// fails (the mesh node shut down), at most `max_connections` at once
/// (further ones wait in the listener's backlog). For each one: read the header (within
/// [`HEADER_TIMEOUT`]), ask `resolve` with the header and the source's
/// overlay address, then either answer the denial (the error's text) and
/// close, or connect to the admitted address, answer, and splice until
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
            Response::Denied {
                reason: reason.clone(),
            }
            .write_to(&mut stream)
            .await?;
            let _ = stream.shutdown().await;
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
            Response::Unreachable {
                reason: reason.clone(),
            }
            .write_to(&mut stream)
            .await?;
            let _ = stream.shutdown().await;
            return Err(ProxyError::Unreachable { reason });
        }
    };
    let _ = upstream.set_nodelay(true);
    Response::Accepted.write_to(&mut stream).await?;
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
