//! Copying bytes both ways between two connections.

use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::sync::CancellationToken;

/// Bytes buffered per direction.
pub const SPLICE_BUFFER: usize = 64 * 1024;

/// Bytes copied each way by [`splice`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Spliced {
    pub a_to_b: u64,
    pub b_to_a: u64,
}

/// Copies `a -> b` and `b -> a` until both directions end. When one side
/// reaches EOF the write half of the other is shut down (half-close) and the
/// other direction keeps going. Each direction holds one buffer of
/// [`SPLICE_BUFFER`] bytes, so a slow reader slows the writer down. An error
/// on either side ends both directions.
pub async fn splice<A, B>(a: &mut A, b: &mut B) -> std::io::Result<Spliced>
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let (a_to_b, b_to_a) =
        tokio::io::copy_bidirectional_with_sizes(a, b, SPLICE_BUFFER, SPLICE_BUFFER).await?;
    Ok(Spliced { a_to_b, b_to_a })
}

/// [`splice`] until both directions end (`Some`) or `revoked` is cancelled
/// (`None`: the caller drops both connections, which closes them).
pub async fn splice_until<A, B>(
    a: &mut A,
    b: &mut B,
    revoked: &CancellationToken,
) -> std::io::Result<Option<Spliced>>
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    tokio::select! {
        spliced = splice(a, b) => spliced.map(Some),
        _ = revoked.cancelled() => Ok(None),
    }
}
