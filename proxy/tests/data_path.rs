//! splice, dial_over_mesh and accept_from_mesh over real loopback sockets:
//! plain tokio TCP and two netstack mesh nodes on 127.0.0.1.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use netstack::{MeshNode, NodeConfig, PeerConfig, PrivateKey};
use policy::{Decision, DenyReason, Source};
use proxy::{
    accept_from_mesh, dial_over_mesh, splice, MeshHeader, MeshStream, ProxyError, Spliced,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

type Result<T> = std::result::Result<T, Box<dyn std::error::Error + Send + Sync>>;

/// Generous bound for a whole exchange; only reached when something hangs.
const DEADLINE: Duration = Duration::from_secs(60);

const EIGHT_MIB: usize = 8 * 1024 * 1024;

fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// FNV-1a 64.
fn checksum(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

async fn read_all<R: AsyncRead + Unpin>(r: &mut R) -> std::io::Result<Vec<u8>> {
    let mut out = Vec::new();
    r.read_to_end(&mut out).await?;
    Ok(out)
}

/// `client` talks through `splice(near, far)` to `server`. The side named by
/// `client_first` sends `big` bytes and half-closes first; the other side
/// waits for that EOF, then sends `small` bytes back and closes. Checks both
/// payloads and the splice's counts.
async fn half_close_exchange<C, N, F, S>(
    client: C,
    mut near: N,
    mut far: F,
    server: S,
    client_first: bool,
    big: usize,
) -> Result<()>
where
    C: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    N: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    F: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let small = 1000;
    let proxy = tokio::spawn(async move { splice(&mut near, &mut far).await });
    let big_data = pattern(big, 7);
    let small_data = pattern(small, 11);
    let expect_big = checksum(&big_data);
    let expect_small = checksum(&small_data);

    // The first speaker writes everything and shuts down its write half,
    // then reads the answer; the second reads to EOF, then answers.
    async fn first<T: AsyncRead + AsyncWrite + Unpin>(
        mut s: T,
        data: Vec<u8>,
    ) -> std::io::Result<(Vec<u8>, T)> {
        s.write_all(&data).await?;
        s.shutdown().await?;
        Ok((read_all(&mut s).await?, s))
    }
    async fn second<T: AsyncRead + AsyncWrite + Unpin>(
        mut s: T,
        data: Vec<u8>,
    ) -> std::io::Result<(Vec<u8>, T)> {
        let got = read_all(&mut s).await?;
        // Still writable after the peer's FIN: that is the half-close.
        s.write_all(&data).await?;
        s.shutdown().await?;
        Ok((got, s))
    }

    let exchange = async {
        let (c, s) = if client_first {
            (
                tokio::spawn(first(client, big_data)),
                tokio::spawn(second(server, small_data)),
            )
        } else {
            (
                tokio::spawn(second(client, small_data)),
                tokio::spawn(first(server, big_data)),
            )
        };
        Ok::<_, Box<dyn std::error::Error + Send + Sync>>((c.await??, s.await??))
    };
    // The ends are kept open until the splice has finished.
    let ((client_got, _client), (server_got, _server)) =
        tokio::time::timeout(DEADLINE, exchange).await??;
    let (big_got, small_got) = if client_first {
        (server_got, client_got)
    } else {
        (client_got, server_got)
    };
    assert_eq!(big_got.len(), big);
    assert_eq!(checksum(&big_got), expect_big, "big payload corrupted");
    assert_eq!(
        checksum(&small_got),
        expect_small,
        "small payload corrupted"
    );
    let spliced = tokio::time::timeout(DEADLINE, proxy).await???;
    let (big, small) = (big as u64, small as u64);
    let expected = if client_first {
        Spliced {
            a_to_b: big,
            b_to_a: small,
        }
    } else {
        Spliced {
            a_to_b: small,
            b_to_a: big,
        }
    };
    assert_eq!(spliced, expected);
    Ok(())
}

async fn tcp_pair() -> Result<(TcpStream, TcpStream)> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let (a, b) = tokio::join!(
        TcpStream::connect(listener.local_addr()?),
        listener.accept()
    );
    Ok((a?, b?.0))
}

#[tokio::test]
async fn splice_tcp_half_close_client_first_8mib() -> Result<()> {
    let (client, near) = tcp_pair().await?;
    let (far, server) = tcp_pair().await?;
    half_close_exchange(client, near, far, server, true, EIGHT_MIB).await
}

#[tokio::test]
async fn splice_tcp_half_close_server_first_8mib() -> Result<()> {
    let (client, near) = tcp_pair().await?;
    let (far, server) = tcp_pair().await?;
    half_close_exchange(client, near, far, server, false, EIGHT_MIB).await
}

fn overlay(n: u8) -> IpAddr {
    IpAddr::from([100, 64, 0, n])
}

fn peer(key: &PrivateKey, n: u8, endpoint: SocketAddr) -> PeerConfig {
    PeerConfig {
        public_key: key.public_key(),
        endpoint: Some(endpoint),
        allowed_ips: vec![format!("{}/32", overlay(n)).parse().unwrap()],
        persistent_keepalive: None,
        preshared_key: None,
    }
}

/// Two mesh nodes on 127.0.0.1 that know each other: (source, target).
async fn mesh_pair() -> Result<(MeshNode, MeshNode)> {
    let a_key = PrivateKey::generate();
    let b_key = PrivateKey::generate();
    let config = |key: &PrivateKey, n| NodeConfig {
        private_key: key.clone(),
        addresses: vec![overlay(n)],
        listen: "127.0.0.1:0".parse().unwrap(),
    };
    let a = MeshNode::bind(config(&a_key, 1), vec![]).await?;
    let b = MeshNode::bind(config(&b_key, 2), vec![peer(&a_key, 1, a.local_addr())]).await?;
    a.set_peers(vec![peer(&b_key, 2, b.local_addr())])?;
    Ok((a, b))
}

/// client (mesh node a) -> near (accepted on mesh node b) -> splice -> far
/// (loopback TCP) -> server.
async fn mesh_exchange(client_first: bool) -> Result<()> {
    let (a, b) = mesh_pair().await?;
    let listener = b.listen_tcp(7000)?;
    let (client, near) = tokio::join!(
        a.dial_tcp(SocketAddr::new(overlay(2), 7000)),
        listener.accept()
    );
    let (far, server) = tcp_pair().await?;
    half_close_exchange(client?, near?.0, far, server, client_first, EIGHT_MIB).await?;
    a.shutdown().await;
    b.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn splice_mesh_half_close_client_first_8mib() -> Result<()> {
    mesh_exchange(true).await
}

#[tokio::test]
async fn splice_mesh_half_close_server_first_8mib() -> Result<()> {
    mesh_exchange(false).await
}

async fn echo_server() -> Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = stream.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    Ok(addr)
}

fn header(alias: &str) -> MeshHeader {
    MeshHeader {
        network: "dev".into(),
        alias: alias.into(),
        port: 8080,
        source: Source {
            local: false,
            sandbox_id: Some("sbx_0123456789ab".into()),
            aliases: vec!["web".into()],
            tags: vec!["frontend".into()],
        },
    }
}

/// Dials and waits for the target's answer (a refusal comes at once).
async fn answered(
    node: &MeshNode,
    target: SocketAddr,
    header: &MeshHeader,
) -> std::result::Result<MeshStream, ProxyError> {
    let mut stream = dial_over_mesh(node, target, header).await?;
    stream.answer().await?;
    Ok(stream)
}

#[tokio::test]
async fn mesh_dial_reaches_the_sandbox_or_is_denied_with_the_reason() -> Result<()> {
    let (source, target) = mesh_pair().await?;
    let echo = echo_server().await?;
    let listener = target.listen_tcp(4789)?;
    let acceptor = tokio::spawn(accept_from_mesh(
        listener,
        proxy::MAX_MESH_CONNECTIONS,
        move |h: &MeshHeader, from| {
            // The source's overlay address reaches the decision.
            assert_eq!(from.ip(), overlay(1));
            match (h.alias.as_str(), h.source.sandbox_id.as_deref()) {
                ("api", Some("sbx_0123456789ab")) if h.port == 8080 => Ok(echo),
                ("api", _) => Err(Decision::Deny(DenyReason::NoMatchingRule)),
                // A port where nothing listens: allowed, but unreachable.
                ("gone", _) => Ok(SocketAddr::from(([127, 0, 0, 1], 1))),
                _ => Err(Decision::Deny(DenyReason::UnknownAlias)),
            }
        },
    ));
    let target_addr = SocketAddr::new(overlay(2), 4789);

    // Allowed: bytes go source -> mesh -> target agent -> echo server and back,
    // and the source's half-close comes back as EOF.
    let mut stream = tokio::time::timeout(
        DEADLINE,
        dial_over_mesh(&source, target_addr, &header("api")),
    )
    .await??;
    let data = pattern(1024 * 1024, 3);
    let (mut r, mut w) = tokio::io::split(&mut stream);
    let write = async {
        w.write_all(&data).await?;
        w.shutdown().await
    };
    let (wrote, echoed) =
        tokio::time::timeout(DEADLINE, async { tokio::join!(write, read_all(&mut r)) }).await?;
    wrote?;
    let echoed = echoed?;
    assert_eq!(echoed.len(), data.len());
    assert_eq!(checksum(&echoed), checksum(&data));

    // Denied by policy: the reason comes back, nothing is connected.
    let mut other = header("api");
    other.source = Source::local();
    let err = tokio::time::timeout(DEADLINE, answered(&source, target_addr, &other))
        .await?
        .unwrap_err();
    match &err {
        ProxyError::Denied { reason } => {
            assert_eq!(reason, "denied: no rule allows it (default deny)")
        }
        other => panic!("expected a denial, got {other}"),
    }
    let err = tokio::time::timeout(DEADLINE, answered(&source, target_addr, &header("db")))
        .await?
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "the target agent denied the connection: denied: no such alias in the network"
    );

    // Allowed but the sandbox is not listening.
    let err = tokio::time::timeout(DEADLINE, answered(&source, target_addr, &header("gone")))
        .await?
        .unwrap_err();
    assert!(
        matches!(&err, ProxyError::Unreachable { reason } if reason.contains("127.0.0.1:1")),
        "{err}"
    );

    // Garbage instead of a header: the target closes without an answer
    // (the connection still works for the next, valid source).
    let mut raw = source.dial_tcp(target_addr).await?;
    raw.write_all(b"GET / HTTP/1.1\r\n\r\n").await?;
    let rest = tokio::time::timeout(DEADLINE, read_all(&mut raw)).await?;
    assert!(rest.map(|r| r.is_empty()).unwrap_or(true));

    let mut again = tokio::time::timeout(
        DEADLINE,
        dial_over_mesh(&source, target_addr, &header("api")),
    )
    .await??;
    again.write_all(b"ping").await?;
    let mut buf = [0u8; 4];
    tokio::time::timeout(DEADLINE, again.read_exact(&mut buf)).await??;
    assert_eq!(&buf, b"ping");

    acceptor.abort();
    source.shutdown().await;
    target.shutdown().await;
    Ok(())
}

/// Version 2 of the answer: "accepted" (status 0) goes out just before the
/// sandbox's first byte, or before its FIN when it sends none; a source
/// that reads the raw stream sees exactly that order.
#[tokio::test]
async fn acceptance_comes_just_before_the_sandbox_bytes_or_its_close() -> Result<()> {
    let (source, target) = mesh_pair().await?;
    // "greet" writes hello and closes; "mute" closes at once.
    let greet = TcpListener::bind("127.0.0.1:0").await?;
    let greet_addr = greet.local_addr()?;
    tokio::spawn(async move {
        while let Ok((mut s, _)) = greet.accept().await {
            let _ = s.write_all(b"hello").await;
        }
    });
    let mute = TcpListener::bind("127.0.0.1:0").await?;
    let mute_addr = mute.local_addr()?;
    tokio::spawn(async move { while mute.accept().await.is_ok() {} });
    let listener = target.listen_tcp(4790)?;
    let acceptor = tokio::spawn(accept_from_mesh(
        listener,
        proxy::MAX_MESH_CONNECTIONS,
        move |h: &MeshHeader, _from| match h.alias.as_str() {
            "greet" => Ok(greet_addr),
            "mute" => Ok(mute_addr),
            _ => Err("denied: no such alias in the network"),
        },
    ));
    let target_addr = SocketAddr::new(overlay(2), 4790);
    for (alias, expect) in [("greet", &b"\0hello"[..]), ("mute", &b"\0"[..])] {
        let mut raw = source.dial_tcp(target_addr).await?;
        raw.write_all(&header(alias).encode()?).await?;
        let got = tokio::time::timeout(DEADLINE, read_all(&mut raw)).await??;
        assert_eq!(got, expect, "{alias}");
    }
    // Through a MeshStream the answer is taken and only the data is read.
    let mut stream = dial_over_mesh(&source, target_addr, &header("greet")).await?;
    let got = tokio::time::timeout(DEADLINE, read_all(&mut stream)).await??;
    assert_eq!(got, b"hello");
    // A refusal is an error of the first read, with the reason inside.
    let mut stream = dial_over_mesh(&source, target_addr, &header("nope")).await?;
    let err = tokio::time::timeout(DEADLINE, read_all(&mut stream))
        .await?
        .unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::PermissionDenied);
    assert_eq!(
        proxy::refusal(&err).map(ToString::to_string).as_deref(),
        Some("the target agent denied the connection: denied: no such alias in the network")
    );
    acceptor.abort();
    source.shutdown().await;
    target.shutdown().await;
    Ok(())
}
