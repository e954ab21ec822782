// Throwaway: RSS with 10k idle connections (not committed).
use netstack::*;
use std::net::{IpAddr, SocketAddr};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
fn rss() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    s.lines()
        .find(|l| l.starts_with("VmRSS"))
        .unwrap()
        .split_whitespace()
        .nth(1)
        .unwrap()
        .parse::<u64>()
        .unwrap()
        / 1024
}
fn peer(key: &PrivateKey, ip: IpAddr, endpoint: SocketAddr) -> PeerConfig {
    PeerConfig {
        public_key: key.public_key(),
        endpoint: Some(endpoint),
        allowed_ips: vec![format!("{ip}/32").parse().unwrap()],
        persistent_keepalive: None,
        preshared_key: None,
    }
}
#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
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
    let before = rss();
    let t = std::time::Instant::now();
    let acc = tokio::spawn(async move {
        let mut v = vec![];
        while v.len() < 10000 {
            let (mut s, _) = lis.accept().await.unwrap();
            let mut x = [0u8; 1];
            s.read_exact(&mut x).await.unwrap();
            s.write_all(&x).await.unwrap();
            v.push(s);
        }
        v
    });
    let mut cs = vec![];
    for i in 0..10000 {
        let mut c = a.dial_tcp(SocketAddr::new(ib, 9)).await.unwrap();
        c.write_all(&[1]).await.unwrap();
        let mut x = [0u8; 1];
        c.read_exact(&mut x).await.unwrap();
        cs.push(c);
        if i % 2000 == 0 {
            println!("{i} {:?} rss {} MiB", t.elapsed(), rss());
        }
    }
    let ss = acc.await.unwrap();
    println!(
        "10k conns (both ends in process): rss {} MiB (before {before}) in {:?}",
        rss(),
        t.elapsed()
    );
    drop((cs, ss));
}
