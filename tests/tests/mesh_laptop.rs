//! A developer laptop in a runtime network (issue 8), with real parts: the
//! control plane (in this process, so the test can register sandbox records
//! and set the mesh settings), a real `gstacks-agent` process on loopback,
//! a sandbox record whose runtime address is a plain TCP/HTTP server on a
//! loopback address, and the `gstacks` CLI as a subprocess for
//! `mesh join / status / forward / leave`.
//!
//! Bytes go: test -> 127.0.0.1:<local> (`gstacks mesh forward`) -> the
//! laptop's userspace mesh node -> agent's overlay port 4180 (policy with
//! source `local`) -> the sandbox's address and the alias port.

mod network_support;

use std::net::{Ipv4Addr, SocketAddr};
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use control::mesh::MeshSettings;
use network_support::{
    free_udp_port, loopback_agent_env, tests_wait, text, AgentProcess, Cluster, WAIT,
};
use serde_json::Value;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};

const API_PORT: u16 = 18_380;
const DB_PORT: u16 = 18_381;

fn free_tcp_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The sandbox: answers `GET` with a small HTTP response, echoes anything
/// else until EOF.
async fn sandbox_server(addr: SocketAddr, body: &'static str) {
    let listener = TcpListener::bind(addr).await.unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut first = [0u8; 4];
                if stream.read_exact(&mut first).await.is_err() {
                    return;
                }
                if &first == b"GET " {
                    let mut rest = [0u8; 1024];
                    let _ = stream.read(&mut rest).await;
                    let reply = format!(
                        "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = stream.write_all(reply.as_bytes()).await;
                    let _ = stream.shutdown().await;
                    return;
                }
                let _ = stream.write_all(&first).await;
                let (mut r, mut w) = stream.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
}

/// `gstacks mesh forward ...` running in the background, its output in files.
struct Forwarder {
    child: Child,
    stdout: PathBuf,
    stderr: PathBuf,
}

impl Forwarder {
    fn start(cluster: &Cluster, dir: &Path, args: &[&str]) -> Forwarder {
        let stdout = dir.join(format!("forward-{}.out", free_tcp_port()));
        let stderr = stdout.with_extension("err");
        let mut all = vec!["mesh", "forward"];
        all.extend_from_slice(args);
        let child = cluster
            .cli_command(&all)
            .stdout(std::fs::File::create(&stdout).unwrap())
            .stderr(std::fs::File::create(&stderr).unwrap())
            .spawn()
            .unwrap();
        Forwarder {
            child,
            stdout,
            stderr,
        }
    }

    fn stdout(&self) -> String {
        std::fs::read_to_string(&self.stdout).unwrap_or_default()
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    async fn ready(&self) {
        tests_wait(|| async { self.stdout().contains("Ctrl-C stops").then_some(()) }).await;
    }

    /// Waits for the process to exit; its exit code.
    async fn exit_code(&mut self) -> i32 {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code().unwrap_or(-1);
            }
            assert!(
                Instant::now() < deadline,
                "still running after {WAIT:?}: {}",
                self.stderr()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn interrupt(&self) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT).unwrap();
    }
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
            let _ = self.child.wait();
        }
    }
}

/// `GET /` through `addr`; the whole response.
async fn http_get(addr: SocketAddr) -> std::io::Result<String> {
    let mut stream = TcpStream::connect(addr).await?;
    stream
        .write_all(b"GET / HTTP/1.1\r\nhost: api\r\nconnection: close\r\n\r\n")
        .await?;
    let mut body = Vec::new();
    tokio::time::timeout(WAIT, stream.read_to_end(&mut body))
        .await
        .map_err(|_| std::io::Error::other("no answer"))??;
    Ok(String::from_utf8_lossy(&body).into_owned())
}

fn state_file(cluster: &Cluster) -> PathBuf {
    cluster.home().join(".config/gstacks/mesh.json")
}

async fn revoke(cluster: &Cluster, node_id: &str) {
    let mut client = proto::control_api_client::ControlApiClient::new(cluster.channel().await);
    let mut request = tonic::Request::new(proto::RevokeMeshNodeRequest {
        node_id: node_id.to_owned(),
    });
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {}", cluster.token).parse().unwrap(),
    );
    client.revoke_mesh_node(request).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn laptop_joins_forwards_and_is_cut_off_by_revocation_and_expiry() {
    let cluster = Cluster::start().await;
    let dirs = tempfile::tempdir().unwrap();
    let plane = cluster.running().plane.clone();
    cluster.json(&["network", "create", "dev"]).await;

    // Nothing configured: the join is refused, naming the variables.
    let err = cluster.fails(&["mesh", "join", "dev"]).await;
    for var in [
        "GLOBALSTACKS_MESH_CONTROL_URL",
        "GLOBALSTACKS_MESH_AUTH_KEY",
        "GLOBALSTACKS_MESH_API_URL",
        "GLOBALSTACKS_MESH_API_TOKEN",
        "GLOBALSTACKS_MESH_USER",
    ] {
        assert!(err.contains(var), "{var} not named: {err}");
    }
    assert!(!state_file(&cluster).exists());

    // Pointed at itself, as `gstacks-control dev` does: keys are minted
    // through its own MeshControl.CreatePreAuthKey with a mesh API token.
    let api_token = plane.create_mesh_api_token("mesh_laptop test").unwrap();
    plane.mesh.set(MeshSettings {
        control_url: Some(cluster.url()),
        api_url: Some(cluster.url()),
        api_token: Some(api_token.secret.expose().to_owned()),
        user: Some("dev@example.test".into()),
        ..MeshSettings::default()
    });

    // One agent; `api` and `db` run on it (loopback servers stand in for
    // the containers).
    let (_, provisioning) = plane
        .create_provisioning_token("cls_default", "mesh laptop", false, None)
        .unwrap();
    let agent = AgentProcess::start(
        &cluster,
        &dirs.path().join("agent"),
        provisioning.expose(),
        &loopback_agent_env(
            Ipv4Addr::new(127, 0, 71, 1),
            SocketAddr::new(Ipv4Addr::new(127, 0, 71, 1).into(), free_udp_port()),
            free_udp_port(),
        ),
    );
    let host = agent.host_id().await;
    tests_wait(|| async { plane.sessions.get(&host).map(drop) }).await;
    let (api_ip, db_ip) = (Ipv4Addr::new(127, 0, 71, 5), Ipv4Addr::new(127, 0, 71, 6));
    sandbox_server(SocketAddr::new(api_ip.into(), API_PORT), "hello from api").await;
    sandbox_server(SocketAddr::new(db_ip.into(), DB_PORT), "hello from db").await;
    cluster.add_sandbox("sbx_api", &host, &api_ip.to_string(), &[]);
    cluster.add_sandbox("sbx_db", &host, &db_ip.to_string(), &[]);
    let (api_port, db_port) = (API_PORT.to_string(), DB_PORT.to_string());
    cluster
        .json(&[
            "network", "attach", "dev", "sbx_api", "--alias", "api", "--port", &api_port,
        ])
        .await;
    cluster
        .json(&[
            "network", "attach", "dev", "sbx_db", "--alias", "db", "--port", &db_port,
        ])
        .await;
    cluster
        .json(&[
            "network", "policy", "allow", "dev", "--from", "local", "--to", "api",
        ])
        .await;

    // Join: a `local` node with overlay addresses, state 0600.
    let joined = cluster.json(&["mesh", "join", "dev", "--ttl", "1h"]).await;
    let node_id = joined["node_id"].as_str().unwrap().to_owned();
    assert!(node_id.starts_with("node_lcl_"), "{joined}");
    assert!(joined["addresses"][0]
        .as_str()
        .unwrap()
        .starts_with("100.64."));
    let expires = joined["expires_at_ms"].as_i64().unwrap();
    let hour = control::clock::now_ms() + 3_600_000;
    assert!((hour - 60_000..=hour).contains(&expires), "{joined}");
    let mode = std::fs::metadata(state_file(&cluster))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let node = plane.store.mesh_node(&node_id).unwrap().unwrap();
    assert_eq!(node.kind, control::store::NodeKind::Local);
    let credential = plane.store.node_credential(&node_id).unwrap().unwrap();
    assert_eq!(credential.user, "dev@example.test");
    let state_text = std::fs::read_to_string(state_file(&cluster)).unwrap();
    let state: Value = serde_json::from_str(&state_text).unwrap();
    let secret = state["node_credential"].as_str().unwrap();
    assert!(secret.starts_with("gsmn."));
    assert_ne!(
        credential.secret_hash, secret,
        "the store keeps only a hash"
    );

    // Status: network, addresses, expiry, the agent as a peer, version.
    let status = cluster.json(&["mesh", "status"]).await;
    assert_eq!(status["network"], "dev");
    assert_eq!(status["credential"], "valid", "{status}");
    assert_eq!(status["expires_at_ms"].as_i64().unwrap(), expires);
    assert!(status["topology_version"].as_u64().unwrap() > 0, "{status}");
    let peers = status["peers"].as_array().unwrap();
    assert_eq!(peers.len(), 1, "{status}");
    assert_eq!(peers[0]["kind"], "agent");
    assert_eq!(peers[0]["host_id"], host.as_str());

    // Forward two aliases in one process; the allowed one answers HTTP.
    let (l_api, l_db) = (free_tcp_port(), free_tcp_port());
    let (l_api_s, l_db_s) = (l_api.to_string(), l_db.to_string());
    let api_target = format!("api:{API_PORT}");
    let db_target = format!("db:{DB_PORT}");
    let mut forward = Forwarder::start(
        &cluster,
        dirs.path(),
        &[
            "dev",
            &api_target,
            &db_target,
            "--local",
            &l_api_s,
            "--local",
            &l_db_s,
        ],
    );
    forward.ready().await;
    let api_local = SocketAddr::from(([127, 0, 0, 1], l_api));
    let response = tests_wait(|| async { http_get(api_local).await.ok() }).await;
    assert!(response.starts_with("HTTP/1.1 200 OK"), "{response}");
    assert!(response.ends_with("hello from api"), "{response}");

    // `db` is not allowed for `local`: closed at once, one line on stderr.
    let db_local = SocketAddr::from(([127, 0, 0, 1], l_db));
    let refused = http_get(db_local).await.unwrap_or_default();
    assert!(!refused.contains("hello from db"), "{refused}");
    let line = tests_wait(|| async {
        forward
            .stderr()
            .lines()
            .find(|l| l.starts_with("denied "))
            .map(str::to_owned)
    })
    .await;
    assert!(line.contains("db.dev.gstacks"), "{line}");
    assert_eq!(
        forward
            .stderr()
            .lines()
            .filter(|l| l.contains("db.dev.gstacks"))
            .count(),
        1,
        "{}",
        forward.stderr()
    );

    // While forwarding, status shows the handshake with the agent.
    let status = tests_wait(|| async {
        let status = cluster.json(&["mesh", "status"]).await;
        (status["peers"][0]["last_handshake_ms"]
            .as_i64()
            .unwrap_or(0)
            > 0)
        .then_some(status)
    })
    .await;
    assert!(status["forwarding"]["pid"].as_u64().is_some(), "{status}");

    // Ctrl-C: exits 0.
    forward.interrupt();
    assert_eq!(forward.exit_code().await, 0, "{}", forward.stderr());

    // Revocation: an open connection and the forwarder stop within 2 s.
    let mut forward = Forwarder::start(
        &cluster,
        dirs.path(),
        &["dev", &api_target, "--local", &l_api_s],
    );
    forward.ready().await;
    let mut open = tests_wait(|| async {
        let mut s = TcpStream::connect(api_local).await.ok()?;
        s.write_all(b"ping").await.ok()?;
        let mut buf = [0u8; 4];
        tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut buf))
            .await
            .ok()?
            .ok()?;
        (&buf == b"ping").then_some(s)
    })
    .await;
    let revoked_at = Instant::now();
    revoke(&cluster, &node_id).await;
    let stopped = loop {
        let _ = open.write_all(b"ping").await;
        let mut buf = [0u8; 4];
        match tokio::time::timeout(Duration::from_millis(200), open.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break revoked_at.elapsed(),
            _ if revoked_at.elapsed() > WAIT => panic!("traffic still flows after revocation"),
            _ => continue,
        }
    };
    assert!(
        stopped < Duration::from_secs(2),
        "traffic stopped after {stopped:?}"
    );
    assert_eq!(forward.exit_code().await, 1);
    assert!(
        forward.stderr().contains("was revoked"),
        "{}",
        forward.stderr()
    );
    assert!(TcpStream::connect(api_local).await.is_err() || http_get(api_local).await.is_err());
    assert!(plane.store.mesh_node(&node_id).unwrap().is_none());
    let out = cluster.cli(&["mesh", "status", "--json"]).await;
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let status: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        status["problem"]
            .as_str()
            .unwrap()
            .contains("join dev` again"),
        "{status}"
    );

    // Leave: node gone on the control plane, state file deleted.
    let joined = cluster.json(&["mesh", "join", "dev"]).await;
    let second = joined["node_id"].as_str().unwrap().to_owned();
    assert_ne!(second, node_id);
    let left = cluster.json(&["mesh", "leave"]).await;
    assert_eq!(left["removed"], true, "{left}");
    assert!(!state_file(&cluster).exists());
    assert!(plane.store.mesh_node(&second).unwrap().is_none());

    // Expiry: a 10 s credential ends the forwarder with "join again".
    cluster.json(&["mesh", "join", "dev", "--ttl", "10s"]).await;
    let mut forward = Forwarder::start(
        &cluster,
        dirs.path(),
        &["dev", &api_target, "--local", &l_api_s],
    );
    forward.ready().await;
    let response = tests_wait(|| async { http_get(api_local).await.ok() }).await;
    assert!(response.ends_with("hello from api"), "{response}");
    assert_eq!(forward.exit_code().await, 1, "{}", forward.stderr());
    let err = forward.stderr();
    assert!(
        err.contains("credential expired at") && err.contains("run `gstacks mesh join dev` again"),
        "{err}"
    );
    // And again from the start: refused before anything is bound.
    let out = cluster
        .cli(&["mesh", "forward", "dev", &api_target, "--local", &l_api_s])
        .await;
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("credential expired at"));
    drop(agent);
}

/// Removes the test's image, whatever happens.
struct ImageCleanup(String);

impl Drop for ImageCleanup {
    fn drop(&mut self) {
        let _ = tests::docker::docker(&["rmi", "-f", &self.0]);
    }
}

/// An image whose only file is busybox and a page, running httpd on `port`.
fn build_httpd_image(dir: &Path, tag: &str, page: &str, port: u16) {
    let root = dir.join("rootfs");
    std::fs::create_dir_all(root.join("bin")).unwrap();
    std::fs::create_dir_all(root.join("www")).unwrap();
    std::fs::copy("/bin/busybox", root.join("bin/busybox")).unwrap();
    std::fs::write(root.join("www/index.html"), page).unwrap();
    let tar = dir.join("rootfs.tar");
    let status = Command::new("tar")
        .arg("-C")
        .arg(&root)
        .arg("-cf")
        .arg(&tar)
        .arg(".")
        .status()
        .unwrap();
    assert!(status.success());
    let cmd = format!(r#"CMD ["/bin/busybox", "httpd", "-f", "-p", "{port}", "-h", "/www"]"#);
    let out = tests::docker::docker(&["import", "--change", &cmd, tar.to_str().unwrap(), tag]);
    assert!(out.status.success(), "docker import: {out:?}");
}

/// The seed's example end to end with a real container: `gstacks sandbox
/// create` runs busybox httpd (an image made here with `docker import`,
/// never pulled) on the agent, and `curl http://127.0.0.1:<local>` through
/// `gstacks mesh forward` gets its page. Skipped with a message when no
/// Docker engine answers (unless `GSTACKS_REQUIRE_DOCKER_TESTS=1`).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn laptop_reaches_a_real_container_through_mesh_forward() {
    if !tests::docker::available() {
        return;
    }
    const HTTPD_PORT: u16 = 8080;
    let dirs = tempfile::tempdir().unwrap();
    let unique = format!("{}-{}", std::process::id(), control::secret::new_id("t"));
    let engine = tests::docker::DockerScope::new();
    let image = ImageCleanup(format!("gstacks-test/mesh-httpd:{unique}"));
    let page = format!("hello from the container {unique}");
    build_httpd_image(dirs.path(), &image.0, &page, HTTPD_PORT);

    let cluster = Cluster::start().await;
    let plane = cluster.running().plane.clone();
    let api_token = plane.create_mesh_api_token("mesh_laptop test").unwrap();
    plane.mesh.set(MeshSettings {
        control_url: Some(cluster.url()),
        api_url: Some(cluster.url()),
        api_token: Some(api_token.secret.expose().to_owned()),
        ..MeshSettings::default()
    });
    let (_, provisioning) = plane
        .create_provisioning_token("cls_default", "mesh laptop", false, None)
        .unwrap();
    let mesh = format!("127.0.0.1:{}", free_udp_port());
    let listen_ip = Ipv4Addr::new(127, 0, 73, 1);
    let env: Vec<_> = [
        (
            "GLOBALSTACKS_AGENT_MESH_DNS_ADDR",
            format!("{listen_ip}:{}", free_udp_port()),
        ),
        ("GLOBALSTACKS_AGENT_MESH_PROXY_BIND", listen_ip.to_string()),
        ("GLOBALSTACKS_AGENT_MESH_LISTEN", mesh.clone()),
        ("GLOBALSTACKS_AGENT_MESH_ENDPOINT", mesh),
    ]
    .into_iter()
    .chain(engine.agent_env())
    .collect();
    let agent = AgentProcess::start(
        &cluster,
        &dirs.path().join("agent"),
        provisioning.expose(),
        &env,
    );
    let host = agent.host_id().await;
    tests_wait(|| async { plane.sessions.get(&host).map(drop) }).await;

    let created = cluster
        .json(&[
            "sandbox",
            "create",
            "--host-id",
            &host,
            "--image",
            &image.0,
            "--name",
            "api",
        ])
        .await;
    let api = created["id"].as_str().unwrap().to_owned();
    tests_wait(|| async {
        let shown = cluster.json(&["sandbox", "show", &api]).await;
        let shown = if shown["sandbox"].is_object() {
            shown["sandbox"].clone()
        } else {
            shown
        };
        (shown["status"] == "running" && !shown["addresses"].as_array()?.is_empty()).then_some(())
    })
    .await;
    cluster.json(&["network", "create", "dev"]).await;
    let port = HTTPD_PORT.to_string();
    cluster
        .json(&[
            "network", "attach", "dev", &api, "--alias", "api", "--port", &port,
        ])
        .await;
    cluster
        .json(&[
            "network", "policy", "allow", "dev", "--from", "local", "--to", "api",
        ])
        .await;

    cluster.json(&["mesh", "join", "dev"]).await;
    let local = free_tcp_port();
    let target = format!("api:{HTTPD_PORT}");
    let mut forward = Forwarder::start(
        &cluster,
        dirs.path(),
        &["dev", &target, "--local", &local.to_string()],
    );
    forward.ready().await;
    let addr = SocketAddr::from(([127, 0, 0, 1], local));
    let response = tests_wait(|| async {
        let mut stream = TcpStream::connect(addr).await.ok()?;
        stream
            .write_all(b"GET /index.html HTTP/1.0\r\nHost: api.dev.gstacks\r\n\r\n")
            .await
            .ok()?;
        let mut body = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut body))
            .await
            .ok()?
            .ok()?;
        let body = String::from_utf8_lossy(&body).into_owned();
        body.contains(&page).then_some(body)
    })
    .await;
    assert!(response.starts_with("HTTP/1."), "{response}");
    forward.interrupt();
    assert_eq!(forward.exit_code().await, 0, "{}", forward.stderr());
    cluster.json(&["mesh", "leave"]).await;
    let out = cluster.cli(&["sandbox", "deprovision", &api]).await;
    assert!(out.status.success(), "{}", text(&out));
    drop(agent);
    drop(image);
}
