//! The traffic every system carries, over any byte stream: a small service
//! (the far end) and the client measurements (the near end). The same code
//! drives kernel TCP, our mesh and the baselines, so only the transport
//! differs between their figures.
//!
//! A connection starts with a 9-byte request: a mode byte and a big-endian
//! u64 argument.
//! - `U` upload: the client sends blocks of [`CHUNK`] bytes whose first byte
//!   is 1 on the last block; the service then answers the byte count. (No
//!   half-close needed: onetun closes both ways at the first FIN.)
//! - `D` download: the service writes for the argument's milliseconds, then
//!   closes its side.
//! - `E` echo: the service echoes messages of the argument's size until EOF.
//! - `H` hold: the service answers one byte and holds the connection until
//!   EOF (connect rate, idle connections).

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// A connected byte stream of any system.
pub trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

pub type BoxStream = Box<dyn Stream>;
pub type DialFuture = Pin<Box<dyn Future<Output = io::Result<BoxStream>> + Send>>;

/// Opens a new connection to the service through the system under test.
pub type Dialer = Arc<dyn Fn() -> DialFuture + Send + Sync>;

pub const CHUNK: usize = 128 * 1024;

/// Serves one accepted connection; errors end it (the client reports them).
pub async fn serve<S: AsyncRead + AsyncWrite + Unpin>(mut stream: S) -> io::Result<()> {
    let mut request = [0u8; 9];
    stream.read_exact(&mut request).await?;
    let mut arg = [0u8; 8];
    arg.copy_from_slice(&request[1..]);
    let arg = u64::from_be_bytes(arg);
    match request[0] {
        b'U' => {
            let mut buf = vec![0u8; CHUNK];
            let mut total: u64 = 0;
            loop {
                stream.read_exact(&mut buf).await?;
                total += CHUNK as u64;
                if buf[0] == 1 {
                    break;
                }
            }
            stream.write_all(&total.to_be_bytes()).await?;
            stream.shutdown().await
        }
        b'D' => {
            let buf = vec![0x5au8; CHUNK];
            let until = Instant::now() + Duration::from_millis(arg);
            while Instant::now() < until {
                stream.write_all(&buf).await?;
            }
            stream.shutdown().await
        }
        b'E' => {
            let size = usize::try_from(arg)
                .ok()
                .filter(|s| (1..=65536).contains(s))
                .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "echo size"))?;
            let mut buf = vec![0u8; size];
            loop {
                match stream.read_exact(&mut buf).await {
                    Ok(_) => stream.write_all(&buf).await?,
                    Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
                    Err(e) => return Err(e),
                }
            }
        }
        b'H' => {
            stream.write_all(b"h").await?;
            let mut buf = [0u8; 64];
            while stream.read(&mut buf).await? != 0 {}
            Ok(())
        }
        other => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("unknown mode byte {other:#x}"),
        )),
    }
}

fn request(mode: u8, arg: u64) -> [u8; 9] {
    let mut out = [0u8; 9];
    out[0] = mode;
    out[1..].copy_from_slice(&arg.to_be_bytes());
    out
}

fn mbit_per_s(bytes: u64, elapsed: Duration) -> f64 {
    bytes as f64 * 8.0 / elapsed.as_secs_f64() / 1e6
}

/// One stream, client to service, for `duration`: Mbit/s counted by the
/// service (bytes it read), timed until its answer arrives.
pub async fn throughput_up(dial: &Dialer, duration: Duration) -> io::Result<f64> {
    let mut stream = dial().await?;
    stream.write_all(&request(b'U', 0)).await?;
    let mut buf = vec![0xa5u8; CHUNK];
    buf[0] = 0;
    let start = Instant::now();
    while start.elapsed() < duration {
        stream.write_all(&buf).await?;
    }
    buf[0] = 1;
    stream.write_all(&buf).await?;
    let mut answer = [0u8; 8];
    stream.read_exact(&mut answer).await?;
    Ok(mbit_per_s(u64::from_be_bytes(answer), start.elapsed()))
}

/// One stream, service to client, for `duration`: Mbit/s read by the client.
pub async fn throughput_down(dial: &Dialer, duration: Duration) -> io::Result<f64> {
    let mut stream = dial().await?;
    let millis = u64::try_from(duration.as_millis()).unwrap_or(u64::MAX);
    stream.write_all(&request(b'D', millis)).await?;
    let mut buf = vec![0u8; CHUNK];
    let mut total: u64 = 0;
    let mut start = None;
    loop {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        // Timed from the first byte, so the request's trip is not counted.
        start.get_or_insert_with(Instant::now);
        total += n as u64;
    }
    let elapsed = start.map(|s| s.elapsed()).unwrap_or_default();
    if elapsed.is_zero() {
        return Err(io::Error::other("download carried no data"));
    }
    Ok(mbit_per_s(total, elapsed))
}

/// Request/response round trips of `size` bytes on one connection: returns
/// (p50, p99) in microseconds, after `warmup` untimed round trips.
pub async fn round_trips(
    dial: &Dialer,
    size: usize,
    warmup: usize,
    count: usize,
) -> io::Result<(f64, f64)> {
    let mut stream = dial().await?;
    stream.write_all(&request(b'E', size as u64)).await?;
    let message = vec![0x42u8; size];
    let mut back = vec![0u8; size];
    let mut samples = Vec::with_capacity(count);
    for i in 0..warmup + count {
        let start = Instant::now();
        stream.write_all(&message).await?;
        stream.read_exact(&mut back).await?;
        if i >= warmup {
            samples.push(start.elapsed().as_secs_f64() * 1e6);
        }
    }
    stream.shutdown().await?;
    Ok((
        percentile(&mut samples, 50.0),
        percentile(&mut samples, 99.0),
    ))
}

/// The `p`th percentile (nearest rank) of the samples.
pub fn percentile(samples: &mut [f64], p: f64) -> f64 {
    if samples.is_empty() {
        return f64::NAN;
    }
    samples.sort_by(|a, b| a.total_cmp(b));
    let rank = ((p / 100.0) * samples.len() as f64).ceil() as usize;
    samples[rank.clamp(1, samples.len()) - 1]
}

/// How long one connection may take to open before the measurement fails.
pub const OPEN_TIMEOUT: Duration = Duration::from_secs(30);

/// Opens one held connection and waits for the service's answer byte, so
/// the connection is known to be established end to end.
pub async fn open_held(dial: &Dialer) -> io::Result<BoxStream> {
    let open = async {
        let mut stream = dial().await?;
        stream.write_all(&request(b'H', 0)).await?;
        let mut answer = [0u8; 1];
        stream.read_exact(&mut answer).await?;
        Ok(stream)
    };
    tokio::time::timeout(OPEN_TIMEOUT, open)
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connection not open within 30 s"))?
}

/// `total` connections, at most `parallel` in flight, each established end
/// to end and closed: connections per second.
pub async fn connect_rate(dial: &Dialer, total: usize, parallel: usize) -> io::Result<f64> {
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    let mut started = 0;
    let mut finished = 0;
    while finished < total {
        while started < total && tasks.len() < parallel {
            let dial = dial.clone();
            tasks.spawn(async move {
                let mut stream = open_held(&dial).await?;
                stream.shutdown().await
            });
            started += 1;
        }
        match tasks.join_next().await {
            Some(joined) => joined.map_err(io::Error::other)??,
            None => break,
        }
        finished += 1;
    }
    Ok(total as f64 / start.elapsed().as_secs_f64())
}

/// Opens `count` held connections (at most `parallel` at once being set up)
/// and returns them open.
pub async fn open_idle(dial: &Dialer, count: usize, parallel: usize) -> io::Result<Vec<BoxStream>> {
    let mut open = Vec::with_capacity(count);
    let mut tasks = tokio::task::JoinSet::new();
    let mut started = 0;
    while open.len() < count {
        while started < count && tasks.len() < parallel {
            let dial = dial.clone();
            tasks.spawn(async move { open_held(&dial).await });
            started += 1;
        }
        match tasks.join_next().await {
            Some(joined) => open.push(joined.map_err(io::Error::other)??),
            None => break,
        }
    }
    Ok(open)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentile_nearest_rank() {
        let mut samples: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&mut samples, 50.0), 50.0);
        assert_eq!(percentile(&mut samples, 99.0), 99.0);
        assert_eq!(percentile(&mut [7.0], 99.0), 7.0);
        assert!(percentile(&mut [], 50.0).is_nan());
    }

    #[tokio::test]
    async fn the_service_answers_each_mode_over_an_in_memory_pipe() {
        let dial: Dialer = Arc::new(|| {
            Box::pin(async {
                let (near, far) = tokio::io::duplex(64 * 1024);
                tokio::spawn(serve(far));
                Ok(Box::new(near) as BoxStream)
            })
        });
        let up = throughput_up(&dial, Duration::from_millis(20))
            .await
            .unwrap();
        assert!(up > 0.0);
        let down = throughput_down(&dial, Duration::from_millis(20))
            .await
            .unwrap();
        assert!(down > 0.0);
        let (p50, p99) = round_trips(&dial, 64, 2, 20).await.unwrap();
        assert!(p50 > 0.0 && p99 >= p50);
        let rate = connect_rate(&dial, 50, 8).await.unwrap();
        assert!(rate > 0.0);
        let held = open_idle(&dial, 30, 8).await.unwrap();
        assert_eq!(held.len(), 30);
    }

    #[tokio::test]
    async fn the_service_refuses_an_unknown_mode() {
        let (mut near, far) = tokio::io::duplex(1024);
        let server = tokio::spawn(serve(far));
        near.write_all(&request(b'Z', 0)).await.unwrap();
        let err = server.await.unwrap().unwrap_err();
        assert!(err.to_string().contains("unknown mode"), "{err}");
    }
}
