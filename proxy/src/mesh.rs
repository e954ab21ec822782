//! The two ends of a proxied connection over the mesh.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use netstack::{MeshNode, TcpListener, TcpStream};
use policy::Decision;
use tokio::io::AsyncWriteExt;
use tokio::sync::Semaphore;

use crate::{splice, MeshHeader, ProxyError, Response};

/// How long the target agent waits for the header of a new mesh connection.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the source agent waits for the target's answer (which comes
/// after the target has connected to the sandbox).
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(15);
/// Mesh connections one acceptor serves at once; further ones wait in the
/// listener's backlog.
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
/// fails (the mesh node shut down). For each one: read the header (within
/// [`HEADER_TIMEOUT`]), ask `resolve` with the header and the source's
/// overlay address, then either answer the denial and close, or connect to
/// the returned address, answer, and splice.
///
/// `resolve` is where the agent applies `policy::decide` against its netmap
/// (and checks that the overlay address belongs to the claimed source).
pub async fn accept_from_mesh<F>(listener: TcpListener, resolve: F) -> Result<(), ProxyError>
where
    F: Fn(&MeshHeader, SocketAddr) -> Result<SocketAddr, Decision> + Send + Sync + 'static,
{
    let resolve = Arc::new(resolve);
    let slots = Arc::new(Semaphore::new(MAX_MESH_CONNECTIONS));
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

async fn serve<F>(mut stream: TcpStream, from: SocketAddr, resolve: &F) -> Result<(), ProxyError>
where
    F: Fn(&MeshHeader, SocketAddr) -> Result<SocketAddr, Decision>,
{
    let header = tokio::time::timeout(HEADER_TIMEOUT, MeshHeader::read_from(&mut stream))
        .await
        .map_err(|_| ProxyError::HeaderTimeout(HEADER_TIMEOUT))??;
    let to = match resolve(&header, from) {
        Ok(to) => to,
        Err(decision) => {
            let reason = decision.to_string();
            Response::Denied {
                reason: reason.clone(),
            }
            .write_to(&mut stream)
            .await?;
            let _ = stream.shutdown().await;
            return Err(ProxyError::Denied { reason });
        }
    };
    let mut upstream = match tokio::net::TcpStream::connect(to).await {
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
    let spliced = splice(&mut stream, &mut upstream).await?;
    tracing::debug!(
        %from, %to, network = %header.network, alias = %header.alias, port = header.port,
        source = %header.source, sent = spliced.a_to_b, received = spliced.b_to_a,
        "mesh connection closed"
    );
    Ok(())
}
