//! Copying bytes both ways between two connections.
//!
//! A proxied connection is idle most of its life, and an agent holds
//! thousands of them, so a direction holds no buffer while it waits: each
//! read lands in a buffer on the stack of the poll and goes straight to the
//! writer. Only bytes the writer cannot take yet are copied to the heap, and
//! that buffer is freed again once it has drained and the reader has nothing
//! more. (tokio's `copy_bidirectional` keeps one heap buffer per direction
//! for the whole life of the connection.)

use std::future::poll_fn;
use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_util::sync::CancellationToken;

/// Most bytes one read takes, and so most bytes a direction holds back
/// when its writer is slower than its reader.
pub const SPLICE_BUFFER: usize = 64 * 1024;

/// Bytes copied each way by [`splice`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Spliced {
    pub a_to_b: u64,
    pub b_to_a: u64,
}

/// Copies `a -> b` and `b -> a` until both directions end. When one side
/// reaches EOF the write half of the other is shut down (half-close) and the
/// other direction keeps going. A direction reads at most [`SPLICE_BUFFER`]
/// bytes ahead of its writer, so a slow reader slows the writer down, and it
/// holds no memory while idle. An error on either side ends both directions.
pub async fn splice<A, B>(a: &mut A, b: &mut B) -> io::Result<Spliced>
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let mut a_to_b = Direction::default();
    let mut b_to_a = Direction::default();
    poll_fn(|cx| {
        let forward = a_to_b.poll(cx, &mut *a, &mut *b)?;
        let backward = b_to_a.poll(cx, &mut *b, &mut *a)?;
        match (forward, backward) {
            (Poll::Ready(a_to_b), Poll::Ready(b_to_a)) => {
                Poll::Ready(Ok(Spliced { a_to_b, b_to_a }))
            }
            _ => Poll::Pending,
        }
    })
    .await
}

/// [`splice`] until both directions end (`Some`) or `revoked` is cancelled
/// (`None`: the caller drops both connections, which closes them).
pub async fn splice_until<A, B>(
    a: &mut A,
    b: &mut B,
    revoked: &CancellationToken,
) -> io::Result<Option<Spliced>>
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    tokio::select! {
        spliced = splice(a, b) => spliced.map(Some),
        _ = revoked.cancelled() => Ok(None),
    }
}

/// One direction of a splice.
#[derive(Debug, Default)]
struct Direction {
    /// Bytes read but not yet written (`held[written..]`); empty, with no
    /// allocation, whenever the writer has kept up.
    held: Vec<u8>,
    written: usize,
    /// Bytes written since the last flush.
    need_flush: bool,
    /// The reader reached EOF.
    read_done: bool,
    /// The writer has been shut down after EOF: this direction is over.
    done: bool,
    copied: u64,
}

impl Direction {
    fn poll<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        reader: &mut R,
        writer: &mut W,
    ) -> Poll<io::Result<u64>>
    where
        R: AsyncRead + Unpin + ?Sized,
        W: AsyncWrite + Unpin + ?Sized,
    {
        if self.done {
            return Poll::Ready(Ok(self.copied));
        }
        // Yield to the scheduler when this task has used its budget, as
        // tokio's own copy does, so that one busy splice cannot starve the
        // other tasks of its worker thread.
        let coop = ready!(tokio::task::coop::poll_proceed(cx));
        loop {
            // Held bytes first: nothing more is read until they are gone.
            while self.written < self.held.len() {
                let n = ready!(poll_write(cx, writer, &self.held[self.written..]))?;
                coop.made_progress();
                self.written += n;
                self.copied += n as u64;
                self.need_flush = true;
            }
            self.held.clear();
            self.written = 0;

            if self.read_done {
                if self.need_flush {
                    ready!(Pin::new(&mut *writer).poll_flush(cx))?;
                    self.need_flush = false;
                }
                ready!(Pin::new(&mut *writer).poll_shutdown(cx))?;
                coop.made_progress();
                self.done = true;
                // Nothing is held any more.
                self.held = Vec::new();
                return Poll::Ready(Ok(self.copied));
            }

            let mut stack = [MaybeUninit::<u8>::uninit(); SPLICE_BUFFER];
            let mut buf = ReadBuf::uninit(&mut stack);
            match poll_read(cx, reader, &mut buf) {
                Poll::Pending => {
                    // Idle: give the memory back, and flush what was
                    // written so that a buffered writer cannot sit on it.
                    self.held = Vec::new();
                    if self.need_flush {
                        ready!(Pin::new(&mut *writer).poll_flush(cx))?;
                        self.need_flush = false;
                    }
                    return Poll::Pending;
                }
                Poll::Ready(result) => {
                    result?;
                    coop.made_progress();
                }
            }
            let read = buf.filled();
            if read.is_empty() {
                self.read_done = true;
                continue;
            }
            // Straight to the writer; keep on the heap only what it
            // cannot take now.
            let mut sent = 0;
            while sent < read.len() {
                match poll_write(cx, writer, &read[sent..]) {
                    Poll::Ready(Ok(n)) => {
                        sent += n;
                        self.copied += n as u64;
                        self.need_flush = true;
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => {
                        self.held.extend_from_slice(&read[sent..]);
                        return Poll::Pending;
                    }
                }
            }
        }
    }
}

/// One read, retried on `Interrupted`.
fn poll_read<R: AsyncRead + Unpin + ?Sized>(
    cx: &mut Context<'_>,
    reader: &mut R,
    buf: &mut ReadBuf<'_>,
) -> Poll<io::Result<()>> {
    loop {
        match Pin::new(&mut *reader).poll_read(cx, buf) {
            Poll::Ready(Err(e)) if e.kind() == io::ErrorKind::Interrupted => continue,
            other => return other,
        }
    }
}

/// One write of a non-empty slice, retried on `Interrupted`; a writer that
/// accepts nothing is an error (as in tokio's copy), never a busy loop.
fn poll_write<W: AsyncWrite + Unpin + ?Sized>(
    cx: &mut Context<'_>,
    writer: &mut W,
    bytes: &[u8],
) -> Poll<io::Result<usize>> {
    loop {
        match Pin::new(&mut *writer).poll_write(cx, bytes) {
            Poll::Ready(Err(e)) if e.kind() == io::ErrorKind::Interrupted => continue,
            Poll::Ready(Ok(0)) => {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::WriteZero,
                    "the other side of the splice accepted no bytes",
                )))
            }
            other => return other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A writer that takes a few bytes at a time and is pending every other
    /// call: the held-bytes path, with the reader far ahead.
    struct Trickle {
        inner: tokio::io::DuplexStream,
        turn: bool,
    }

    impl AsyncRead for Trickle {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            Pin::new(&mut self.inner).poll_read(cx, buf)
        }
    }

    impl AsyncWrite for Trickle {
        fn poll_write(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            self.turn = !self.turn;
            if self.turn {
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            let n = buf.len().min(777);
            Pin::new(&mut self.inner).poll_write(cx, &buf[..n])
        }

        fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.inner).poll_flush(cx)
        }

        fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.inner).poll_shutdown(cx)
        }
    }

    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 31 % 251) as u8).collect()
    }

    #[tokio::test]
    async fn a_slow_writer_gets_every_byte_in_order_and_half_close_holds() {
        let (mut client, near) = tokio::io::duplex(100_000);
        let (far, mut server) = tokio::io::duplex(3_000);
        let mut near = near;
        let mut far = Trickle {
            inner: far,
            turn: false,
        };
        let proxy = tokio::spawn(async move { splice(&mut near, &mut far).await });
        let up = pattern(300_000);
        let down = pattern(5_000);
        let (up2, down2) = (up.clone(), down.clone());
        let client_side = tokio::spawn(async move {
            client.write_all(&up2).await?;
            client.shutdown().await?;
            let mut got = Vec::new();
            client.read_to_end(&mut got).await?;
            io::Result::Ok(got)
        });
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.unwrap();
        assert!(got == up, "upstream bytes differ");
        // Still writable after the client's EOF.
        server.write_all(&down2).await.unwrap();
        server.shutdown().await.unwrap();
        assert!(client_side.await.unwrap().unwrap() == down);
        let spliced = proxy.await.unwrap().unwrap();
        assert_eq!(
            spliced,
            Spliced {
                a_to_b: 300_000,
                b_to_a: 5_000
            }
        );
    }

    #[tokio::test]
    async fn an_idle_direction_holds_no_buffer() {
        let (_client, mut near) = tokio::io::duplex(1024);
        let (mut far, _server) = tokio::io::duplex(1024);
        let mut direction = Direction::default();
        let polled = poll_fn(|cx| Poll::Ready(direction.poll(cx, &mut near, &mut far))).await;
        assert!(polled.is_pending());
        assert_eq!(direction.held.capacity(), 0);
    }

    #[tokio::test]
    async fn a_writer_that_takes_nothing_is_an_error() {
        struct Zero;
        impl AsyncWrite for Zero {
            fn poll_write(
                self: Pin<&mut Self>,
                _: &mut Context<'_>,
                _: &[u8],
            ) -> Poll<io::Result<usize>> {
                Poll::Ready(Ok(0))
            }
            fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
                Poll::Ready(Ok(()))
            }
            fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
                Poll::Ready(Ok(()))
            }
        }
        let mut reader: &[u8] = b"hello";
        let mut direction = Direction::default();
        let err = poll_fn(|cx| direction.poll(cx, &mut reader, &mut Zero))
            .await
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::WriteZero);
    }
}
