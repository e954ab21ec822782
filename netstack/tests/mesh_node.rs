//! MeshNode over real UDP sockets on 127.0.0.1 with real time.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use anyhow::{Context, Result};
use netstack::{MeshNode, NodeConfig, PeerConfig, PrivateKey};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

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
