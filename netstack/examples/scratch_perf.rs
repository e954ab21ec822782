// Throwaway measurement (not committed).
use netstack::*;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn peer(key: &PrivateKey, ip: IpAddr, endpoint: SocketAddr) -> PeerConfig {
    PeerConfig {
        public_key: key.public_key(),
        endpoint: Some(endpoint),
        allowed_ips: vec![format!("{ip}/32").parse().unwrap()],
        persistent_keepalive: None,
        preshared_key: None,
    }
}

async fn run<
    R: tokio::io::AsyncRead + Unpin + Send + 'static,
    W: tokio::io::AsyncWrite + Unpin + Send + 'static,
>(
    mut w: W,
    mut r: R,
    label: &str,
    total: usize,
) {
    let t = Instant::now();
    let writer = tokio::spawn(async move {
        let buf = vec![7u8; 65536];
        let mut left = total;
        while left > 0 {
            let n = left.min(buf.len());
            w.write_all(&buf[..n]).await.unwrap();
            left -= n;
        }
        w.shutdown().await.unwrap();
        w
    });
    let mut buf = vec![0u8; 65536];
    let mut got = 0;
    loop {
        let n = r.read(&mut buf).await.unwrap();
        if n == 0 {
            break;
        }
        got += n;
    }
    let dt = t.elapsed();
    assert_eq!(got, total);
    let _w = writer.await.unwrap();
    println!(
        "{label}: {:.0} Mbit/s",
        got as f64 * 8.0 / dt.as_secs_f64() / 1e6
    );
}

async fn rtt<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(mut c: S, label: &str) {
    let mut v = Vec::new();
    let mut b = [0u8; 64];
    for i in 0..3000 {
        let t = Instant::now();
        c.write_all(&b).await.unwrap();
        c.read_exact(&mut b).await.unwrap();
        if i >= 500 {
            v.push(t.elapsed());
        }
    }
    v.sort();
    println!(
        "{label}: p50 {:?} p99 {:?}",
        v[v.len() / 2],
        v[v.len() * 99 / 100]
    );
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let total = 512 << 20;
    // loopback baseline
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let srv = tokio::spawn(async move {
        let (s, _) = l.accept().await.unwrap();
        s
    });
    let c = tokio::net::TcpStream::connect(addr).await.unwrap();
    c.set_nodelay(true).unwrap();
    let s = srv.await.unwrap();
    s.set_nodelay(true).unwrap();
    let (_cr, cw) = c.into_split();
    let (sr, _sw) = s.into_split();
    run(cw, sr, "loopback", total).await;
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut s, _) = l.accept().await.unwrap();
        s.set_nodelay(true).unwrap();
        let mut b = [0u8; 64];
        while s.read_exact(&mut b).await.is_ok() {
            s.write_all(&b).await.unwrap();
        }
    });
    let c = tokio::net::TcpStream::connect(addr).await.unwrap();
    c.set_nodelay(true).unwrap();
    rtt(c, "loopback rtt").await;

    let (ka, kb) = (PrivateKey::generate(), PrivateKey::generate());
    let (ia, ib): (IpAddr, IpAddr) = ("100.64.0.1".parse().unwrap(), "100.64.0.2".parse().unwrap());
    let a = MeshNode::bind(
        NodeConfig {
            private_key: ka.clone(),
            addresses: vec![ia],
            listen: "127.0.0.1:0".parse().unwrap(),
        },
        vec![],
    )
    .await
    .unwrap();
    let b = MeshNode::bind(
        NodeConfig {
            private_key: kb.clone(),
            addresses: vec![ib],
            listen: "127.0.0.1:0".parse().unwrap(),
        },
        vec![peer(&ka, ia, a.local_addr())],
    )
    .await
    .unwrap();
    a.set_peers(vec![peer(&kb, ib, b.local_addr())]).unwrap();
    let lis = b.listen_tcp(9).unwrap();
    let c = a.dial_tcp(SocketAddr::new(ib, 9)).await.unwrap();
    let (s, _) = lis.accept().await.unwrap();
    let (cr, cw) = tokio::io::split(c);
    let (sr, sw) = tokio::io::split(s);
    run(cw, sr, "mesh a->b", total).await;
    run(sw, cr, "mesh b->a", total).await;
    let lis2 = b.listen_tcp(10).unwrap();
    tokio::spawn(async move {
        let (mut s, _) = lis2.accept().await.unwrap();
        let mut b = [0u8; 64];
        while s.read_exact(&mut b).await.is_ok() {
            s.write_all(&b).await.unwrap();
        }
    });
    let c = a.dial_tcp(SocketAddr::new(ib, 10)).await.unwrap();
    rtt(c, "mesh rtt").await;
    println!("{:?}", a.status().total_drops());
    let _ = Duration::ZERO;
}
