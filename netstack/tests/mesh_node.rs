//! MeshNode over real UDP sockets on 127.0.0.1 with real time.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use anyhow::{Context, Result};
use netstack::{MeshNode, NodeConfig, PeerConfig, PrivateKey};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};

struct Pair {
    a: MeshNode,
    b: MeshNode,
    a_key: PrivateKey,
    b_key: PrivateKey,
}

fn v4(n: u8) -> IpAddr {
    IpAddr::from([100, 64, 0, n])
}

fn v6(n: u8) -> IpAddr {
    IpAddr::from([0xfd00, 0, 0, 0, 0, 0, 0, u16::from(n)])
}

fn peer(key: &PrivateKey, n: u8, endpoint: Option<SocketAddr>) -> PeerConfig {
    PeerConfig {
        public_key: key.public_key(),
        endpoint,
        allowed_ips: vec![
            format!("{}/32", v4(n)).parse().unwrap(),
            format!("{}/128", v6(n)).parse().unwrap(),
        ],
        persistent_keepalive: None,
        preshared_key: None,
    }
}

async fn pair() -> Result<Pair> {
    let a_key = PrivateKey::generate();
    let b_key = PrivateKey::generate();
    let a = MeshNode::bind(
        NodeConfig {
            private_key: a_key.clone(),
            addresses: vec![v4(1), v6(1)],
            listen: "127.0.0.1:0".parse()?,
        },
        vec![],
    )
    .await?;
    let b = MeshNode::bind(
        NodeConfig {
            private_key: b_key.clone(),
            addresses: vec![v4(2), v6(2)],
            listen: "127.0.0.1:0".parse()?,
        },
        vec![peer(&a_key, 1, Some(a.local_addr()))],
    )
    .await?;
    a.set_peers(vec![peer(&b_key, 2, Some(b.local_addr()))])?;
    Ok(Pair { a, b, a_key, b_key })
}

async fn echo_server(listener: netstack::TcpListener) {
    loop {
        let Ok((mut stream, _)) = listener.accept().await else {
            return;
        };
        tokio::spawn(async move {
            let mut buf = vec![0u8; 16384];
            loop {
                match stream.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if stream.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                    }
                }
            }
            let _ = stream.shutdown().await;
        });
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn echo_and_half_close_over_v4_and_v6() -> Result<()> {
    let p = pair().await?;
    let listener = p.b.listen_tcp(7)?;
    tokio::spawn(echo_server(listener));
    for ip in [v4(2), v6(2)] {
        let mut stream = tokio::time::timeout(
            Duration::from_secs(20),
            p.a.dial_tcp(SocketAddr::new(ip, 7)),
        )
        .await??;
        assert_eq!(stream.peer_addr(), SocketAddr::new(ip, 7));
        let data: Vec<u8> = (0..200_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let (mut r, mut w) = tokio::io::split(stream);
        let sent = data.clone();
        let writer = tokio::spawn(async move {
            w.write_all(&sent).await?;
            // Half-close: the echo server sees EOF, replies the rest, closes.
            w.shutdown().await?;
            anyhow::Ok(w)
        });
        let mut got = Vec::new();
        tokio::time::timeout(Duration::from_secs(20), r.read_to_end(&mut got))
            .await
            .context("echo timed out")??;
        assert_eq!(got, data);
        stream = r.unsplit(writer.await??);
        drop(stream);
    }
    let status = p.a.status();
    let b_seen = status
        .peer(&p.b_key.public_key())
        .context("peer b in status")?;
    assert!(b_seen.last_handshake.is_some());
    assert!(b_seen.tx_bytes > 400_000 && b_seen.rx_bytes > 400_000);
    assert_eq!(b_seen.endpoint, Some(p.b.local_addr()));
    assert_eq!(
        status.total_drops().total(),
        0,
        "{:?}",
        status.total_drops()
    );
    let _ = &p.a_key;
    p.a.shutdown().await;
    p.b.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_1000_connects_is_all_accepted() -> Result<()> {
    let p = pair().await?;
    let listener = p.b.listen_tcp(80)?;
    let accepted = tokio::spawn(async move {
        let mut streams = Vec::new();
        while streams.len() < 1000 {
            let (stream, from) = listener.accept().await?;
            assert_eq!(from.ip(), v4(1));
            streams.push(stream);
        }
        anyhow::Ok((listener, streams))
    });
    let mut dials = tokio::task::JoinSet::new();
    for _ in 0..1000 {
        let a = p.a.clone();
        dials.spawn(async move { a.dial_tcp(SocketAddr::new(v4(2), 80)).await });
    }
    let mut clients = Vec::new();
    while let Some(dial) = dials.join_next().await {
        clients.push(dial?.context("a connect of the burst failed")?);
    }
    let (_listener, mut servers) = tokio::time::timeout(Duration::from_secs(60), accepted)
        .await
        .context("not all 1000 connections were accepted")???;
    assert_eq!(clients.len(), 1000);
    // Every connection is alive: one byte each way on each.
    for (i, client) in clients.iter_mut().enumerate() {
        client.write_all(&[(i % 251) as u8]).await?;
    }
    let mut seen = Vec::new();
    for server in servers.iter_mut() {
        let mut byte = [0u8; 1];
        server.read_exact(&mut byte).await?;
        server.write_all(&byte).await?;
        seen.push(byte[0]);
    }
    seen.sort_unstable();
    let mut expected: Vec<u8> = (0..1000).map(|i| (i % 251) as u8).collect();
    expected.sort_unstable();
    assert_eq!(seen, expected);
    for (i, client) in clients.iter_mut().enumerate() {
        let mut byte = [0u8; 1];
        client.read_exact(&mut byte).await?;
        assert_eq!(byte[0], (i % 251) as u8);
    }
    p.a.shutdown().await;
    p.b.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn udp_send_and_receive_both_ways() -> Result<()> {
    let p = pair().await?;
    let ua = p.a.bind_udp(5353)?;
    let ub = p.b.bind_udp(5353)?;
    for i in 0..20u8 {
        ua.send_to(&[i; 100], SocketAddr::new(v6(2), 5353)).await?;
        let mut buf = [0u8; 2048];
        let (n, from) =
            tokio::time::timeout(Duration::from_secs(10), ub.recv_from(&mut buf)).await??;
        assert_eq!(&buf[..n], &[i; 100]);
        assert_eq!(from, SocketAddr::new(v6(1), 5353));
        ub.send_to(&buf[..n], from).await?;
        let (n, from) =
            tokio::time::timeout(Duration::from_secs(10), ua.recv_from(&mut buf)).await??;
        assert_eq!(&buf[..n], &[i; 100]);
        assert_eq!(from, SocketAddr::new(v6(2), 5353));
    }
    // Binding the same port twice is refused, naming the port.
    let err = p.a.bind_udp(5353).unwrap_err();
    assert!(err.to_string().contains("5353"), "{err}");
    // No route: a clear error.
    let err = ua.send_to(b"x", "100.64.9.9:1".parse()?).await.unwrap_err();
    assert!(err.to_string().contains("100.64.9.9"), "{err}");
    p.a.shutdown().await;
    p.b.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_peers_keeps_connections_of_peers_that_stay() -> Result<()> {
    let p = pair().await?;
    let c_key = PrivateKey::generate();
    let c = MeshNode::bind(
        NodeConfig {
            private_key: c_key.clone(),
            addresses: vec![v4(3), v6(3)],
            listen: "127.0.0.1:0".parse()?,
        },
        vec![peer(&p.b_key, 2, Some(p.b.local_addr()))],
    )
    .await?;
    let listener = p.b.listen_tcp(7)?;
    tokio::spawn(echo_server(listener));
    let mut from_a = p.a.dial_tcp(SocketAddr::new(v4(2), 7)).await?;
    let handshake =
        p.b.status()
            .peer(&p.a_key.public_key())
            .unwrap()
            .last_handshake;

    // B adds C, keeps A (same config).
    p.b.set_peers(vec![
        peer(&p.a_key, 1, Some(p.a.local_addr())),
        peer(&c_key, 3, Some(c.local_addr())),
    ])?;
    let mut from_c = c.dial_tcp(SocketAddr::new(v4(2), 7)).await?;
    for stream in [&mut from_a, &mut from_c] {
        stream.write_all(b"still here").await?;
        let mut buf = [0u8; 10];
        tokio::time::timeout(Duration::from_secs(10), stream.read_exact(&mut buf)).await??;
        assert_eq!(&buf, b"still here");
    }
    // A's session was kept, not renegotiated.
    assert_eq!(
        p.b.status()
            .peer(&p.a_key.public_key())
            .unwrap()
            .last_handshake,
        handshake
    );

    // B removes C: C's connection stops working, A's goes on.
    p.b.set_peers(vec![peer(&p.a_key, 1, Some(p.a.local_addr()))])?;
    from_a.write_all(b"after").await?;
    let mut buf = [0u8; 5];
    tokio::time::timeout(Duration::from_secs(10), from_a.read_exact(&mut buf)).await??;
    from_c.write_all(b"after").await?;
    // Wait until B has dropped C's packet, then check that nothing came back.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while p.b.status().drops.get(netstack::DropReason::UnknownIndex) == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "B never saw C's packet"
        );
        tokio::task::yield_now().await;
    }
    let mut byte = [0u8; 1];
    let mut read_buf = tokio::io::ReadBuf::new(&mut byte);
    let poll = std::future::poll_fn(|cx| {
        std::task::Poll::Ready(std::pin::Pin::new(&mut from_c).poll_read(cx, &mut read_buf))
    })
    .await;
    assert!(poll.is_pending(), "a removed peer still gets answers");
    c.shutdown().await;
    p.a.shutdown().await;
    p.b.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_fails_pending_operations() -> Result<()> {
    let p = pair().await?;
    let listener = p.b.listen_tcp(7)?;
    tokio::spawn(echo_server(listener));
    let mut stream = p.a.dial_tcp(SocketAddr::new(v4(2), 7)).await?;
    let reader = tokio::spawn(async move {
        let mut buf = [0u8; 16];
        stream.read(&mut buf).await
    });
    p.a.shutdown().await;
    let result = tokio::time::timeout(Duration::from_secs(10), reader).await??;
    assert!(result.is_err(), "{result:?}");
    assert!(matches!(
        p.a.dial_tcp(SocketAddr::new(v4(2), 7)).await,
        Err(netstack::NetstackError::Shutdown)
    ));
    p.b.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "current_thread")]
async fn works_on_a_current_thread_runtime() -> Result<()> {
    let p = pair().await?;
    let listener = p.b.listen_tcp(7)?;
    tokio::spawn(echo_server(listener));
    let stream = p.a.dial_tcp(SocketAddr::new(v4(2), 7)).await?;
    let data: Vec<u8> = (0..1_000_000u32).map(|i| (i % 253) as u8).collect();
    let (mut r, mut w) = tokio::io::split(stream);
    let sent = data.clone();
    let writer = tokio::spawn(async move {
        w.write_all(&sent).await?;
        w.shutdown().await?;
        anyhow::Ok(w)
    });
    let mut got = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), r.read_to_end(&mut got)).await??;
    writer.await??;
    assert_eq!(got, data);
    p.a.shutdown().await;
    p.b.shutdown().await;
    Ok(())
}
