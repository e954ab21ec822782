//! The whole runtime-network path with real parts: the control plane (in
//! this process, to register sandbox records through the `Store`), two real
//! `gstacks-agent` processes on loopback, the `gstacks` CLI, and sandboxes
//! whose runtime address is a loopback address: `web` on host A is the
//! address the test connects from, `api` on host B is an echo server.
//!
//! Bytes go: test (as web) -> agent A's alias listener -> policy -> mesh ->
//! agent B -> policy -> echo server, driven only by what the control plane
//! computed and pushed (attach, policy allow/remove, restart of an agent).

mod network_support;

use std::net::{Ipv4Addr, SocketAddr};
use std::process::Command;
use std::time::Duration;

use network_support::{
    free_udp_port, loopback_agent_env, tests_wait, text, AgentProcess, Cluster, WAIT,
};
use serde_json::Value;
use sha2::{Digest as _, Sha256};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

/// The alias port of `api` (also the port the echo server listens on).
const API_PORT: u16 = 18_080;
const WEB_PORT: u16 = 18_081;

/// Echoes every connection until EOF, then closes.
async fn echo_server(addr: SocketAddr) {
    let listener = TcpListener::bind(addr).await.unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let (mut r, mut w) = stream.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
}

async fn connect_from(from: Ipv4Addr, to: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(from.into(), 0))?;
    socket.connect(to).await
}

/// Sends `data` and reads the echo back: its SHA-256.
async fn echo_checksum(stream: TcpStream, data: Vec<u8>) -> [u8; 32] {
    let (mut r, mut w) = stream.into_split();
    let writer = tokio::spawn(async move {
        w.write_all(&data).await.unwrap();
        w.shutdown().await.unwrap();
    });
    let mut back = Vec::new();
    tokio::time::timeout(WAIT, r.read_to_end(&mut back))
        .await
        .expect("echo within the deadline")
        .unwrap();
    writer.await.unwrap();
    Sha256::digest(&back).into()
}

/// `dig` from Debian's dnsutils against the agent's DNS, if installed.
fn dig(server: SocketAddr, name: &str) -> Option<String> {
    let out = Command::new("dig")
        .args([
            &format!("@{}", server.ip()),
            "-p",
            &server.port().to_string(),
            name,
            "A",
            "+short",
            "+time=2",
            "+tries=2",
        ])
        .output()
        .ok()?;
    Some(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sandbox_reaches_sandbox_through_two_real_agents_driven_by_the_control_plane() {
    let cluster = Cluster::start().await;
    let dirs = tempfile::tempdir().unwrap();
    let (_, secret) = cluster
        .running()
        .plane
        .create_provisioning_token("cls_default", "network e2e", false, None)
        .unwrap();
    // Distinct loopback addresses, so that this test does not meet another.
    let (ip_a, ip_b) = (Ipv4Addr::new(127, 0, 61, 1), Ipv4Addr::new(127, 0, 62, 1));
    let (web_ip, api_ip) = (Ipv4Addr::new(127, 0, 61, 5), Ipv4Addr::new(127, 0, 62, 5));
    let dns_a = SocketAddr::new(ip_a.into(), free_udp_port());
    let dns_b = SocketAddr::new(ip_b.into(), free_udp_port());
    let mut a = AgentProcess::start(
        &cluster,
        &dirs.path().join("a"),
        secret.expose(),
        &loopback_agent_env(ip_a, dns_a, free_udp_port()),
    );
    let b = AgentProcess::start(
        &cluster,
        &dirs.path().join("b"),
        secret.expose(),
        &loopback_agent_env(ip_b, dns_b, free_udp_port()),
    );
    let host_a = a.host_id().await;
    let host_b = b.host_id().await;
    let plane = cluster.running().plane.clone();
    tests_wait(|| async {
        (plane.sessions.get(&host_a).is_some() && plane.sessions.get(&host_b).is_some())
            .then_some(())
    })
    .await;

    echo_server(SocketAddr::new(api_ip.into(), API_PORT)).await;
    cluster.add_sandbox("sbx_web", &host_a, &web_ip.to_string(), &["frontend"]);
    cluster.add_sandbox("sbx_api", &host_b, &api_ip.to_string(), &[]);
    cluster.json(&["network", "create", "dev"]).await;
    let port = API_PORT.to_string();
    let web_port = WEB_PORT.to_string();
    cluster
        .json(&[
            "network", "attach", "dev", "sbx_api", "--alias", "api", "--port", &port,
        ])
        .await;
    cluster
        .json(&[
            "network", "attach", "dev", "sbx_web", "--alias", "web", "--port", &web_port,
        ])
        .await;
    let allowed = cluster
        .json(&[
            "network", "policy", "allow", "dev", "--from", "web", "--to", "api", "--port", &port,
        ])
        .await;
    let rule_id = allowed["rule"]["id"].as_str().unwrap().to_owned();

    // `network test` asks both real agents; it passes once they applied
    // the netmap and joined the mesh.
    let target = format!("api:{API_PORT}");
    let report = tests_wait(|| async {
        let out = cluster
            .cli(&[
                "network",
                "test",
                "dev",
                "sandbox:sbx_web",
                &target,
                "--json",
            ])
            .await;
        let report: Value = serde_json::from_slice(&out.stdout).ok()?;
        (report["passed"] == true && out.status.success()).then_some(report)
    })
    .await;
    let origins: Vec<&str> = report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["origin"].as_str().unwrap())
        .collect();
    assert!(
        origins.contains(&host_a.as_str()) && origins.contains(&host_b.as_str()),
        "{report}"
    );
    let names: Vec<&str> = report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["origin"] == host_b.as_str())
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    for check in [
        "mesh_joined",
        "topology_version",
        "dns_records",
        "route",
        "policy",
    ] {
        assert!(names.contains(&check), "{check} missing from {report}");
    }

    // The agent's DNS answers the local listener of the alias.
    if let Some(answer) = dig(dns_a, "api.dev.gstacks") {
        assert_eq!(answer, ip_a.to_string(), "dig api.dev.gstacks @{dns_a}");
    }

    // 4 MiB web -> listener on A -> mesh -> B -> echo, checksum kept.
    let listener_a = SocketAddr::new(ip_a.into(), API_PORT);
    let data = tests::pattern(4 << 20, 0x9e37_79b9);
    let expected: [u8; 32] = Sha256::digest(&data).into();
    let stream = connect_from(web_ip, listener_a).await.unwrap();
    assert_eq!(echo_checksum(stream, data).await, expected);

    // Denied: web -> web has no rule; closed at once, counted by the control
    // plane from the agent's event.
    let web_listener = SocketAddr::new(ip_a.into(), WEB_PORT);
    let mut denied = connect_from(web_ip, web_listener).await.unwrap();
    tests::closed_within(&mut denied, WAIT).await;
    tests_wait(|| async {
        let shown = cluster.json(&["network", "show", "dev"]).await;
        (shown["denied_connections"].as_u64()? >= 1).then_some(())
    })
    .await;

    // An open, allowed connection is closed when its rule is removed.
    let mut open = connect_from(web_ip, listener_a).await.unwrap();
    open.write_all(b"ping").await.unwrap();
    let mut four = [0u8; 4];
    tokio::time::timeout(WAIT, open.read_exact(&mut four))
        .await
        .unwrap()
        .unwrap();
    cluster
        .json(&["network", "policy", "remove", "dev", &rule_id])
        .await;
    let took = tests::closed_within(&mut open, WAIT).await;
    println!("connection closed {took:?} after the rule removal returned");
    let out = cluster
        .cli(&["network", "test", "dev", "sandbox:sbx_web", &target])
        .await;
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));

    // Allowed again, then agent A restarts: it re-applies the current netmap.
    cluster
        .json(&[
            "network",
            "policy",
            "allow",
            "dev",
            "--from",
            "tag:frontend",
            "--to",
            "*",
        ])
        .await;
    a.restart(&cluster);
    // Until A is back with its netmap applied, the connect or the echo fails.
    tests_wait(|| async {
        let stream = connect_from(web_ip, listener_a).await.ok()?;
        let data = tests::pattern(64 << 10, 0x9e37_79b9);
        let expected: [u8; 32] = Sha256::digest(&data).into();
        let (mut r, mut w) = stream.into_split();
        w.write_all(&data).await.ok()?;
        w.shutdown().await.ok()?;
        let mut back = Vec::new();
        tokio::time::timeout(Duration::from_secs(3), r.read_to_end(&mut back))
            .await
            .ok()?
            .ok()?;
        (<[u8; 32]>::from(Sha256::digest(&back)) == expected).then_some(())
    })
    .await;
    let shown = cluster.json(&["network", "show", "dev"]).await;
    assert_eq!(shown["policy_rules"][0]["from"], "tag:frontend");
    drop(b);
    assert!(a.log().contains("netmap"), "agent A logged its netmaps");
}
