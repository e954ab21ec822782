//! Runtime networks with a real container: `gstacks sandbox create` runs a
//! busybox httpd container (an image made here with `docker import` from
//! `/bin/busybox`, never pulled) on agent B; a sandbox record on agent A whose
//! address is a loopback address is the source. The request goes: test (as
//! the source sandbox) -> agent A's alias listener -> policy -> mesh ->
//! agent B -> the container's address on B's Docker network.
//!
//! Skipped with a message when no Docker engine answers (unless
//! `GSTACKS_REQUIRE_DOCKER_TESTS=1`).

mod network_support;

use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use network_support::{free_udp_port, tests_wait, AgentProcess, Cluster};
use serde_json::Value;
use tests::docker::{docker, DockerScope};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpSocket, TcpStream};

const HTTPD_PORT: u16 = 8080;

/// An image whose only file is busybox and a page, running httpd.
fn build_httpd_image(dir: &Path, tag: &str, page: &str) {
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
    let cmd = format!(r#"CMD ["/bin/busybox", "httpd", "-f", "-p", "{HTTPD_PORT}", "-h", "/www"]"#);
    let out = docker(&["import", "--change", &cmd, tar.to_str().unwrap(), tag]);
    assert!(out.status.success(), "docker import: {out:?}");
}

/// Removes the test's image, whatever happens (the scope's containers and
/// network go with the [`DockerScope`]).
struct ImageCleanup(String);

impl Drop for ImageCleanup {
    fn drop(&mut self) {
        let _ = docker(&["rmi", "-f", &self.0]);
    }
}

async fn connect_from(from: Ipv4Addr, to: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(from.into(), 0))?;
    socket.connect(to).await
}

/// One HTTP/1.0 GET through `to` from `from`; the whole response.
async fn http_get(from: Ipv4Addr, to: SocketAddr) -> Option<String> {
    let mut stream = connect_from(from, to).await.ok()?;
    stream
        .write_all(b"GET /index.html HTTP/1.0\r\nHost: api.dev.gstacks\r\n\r\n")
        .await
        .ok()?;
    let mut response = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut response))
        .await
        .ok()?
        .ok()?;
    Some(String::from_utf8_lossy(&response).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_sandbox_reaches_a_real_container_through_the_mesh() {
    if !tests::docker::available() {
        return;
    }
    let dirs = tempfile::tempdir().unwrap();
    let unique = format!("{}-{}", std::process::id(), control::secret::new_id("t"));
    let engine_b = DockerScope::new();
    let image = ImageCleanup(format!("gstacks-test/netcontrol-httpd:{unique}"));
    let page = format!("hello from the container {unique}");
    build_httpd_image(dirs.path(), &image.0, &page);

    let cluster = Cluster::start().await;
    let (_, secret) = cluster
        .running()
        .plane
        .create_provisioning_token("cls_default", "network container", false, None)
        .unwrap();
    let (ip_a, ip_b) = (Ipv4Addr::new(127, 0, 71, 1), Ipv4Addr::new(127, 0, 72, 1));
    let web_ip = Ipv4Addr::new(127, 0, 71, 5);
    let mesh = |port: u16| format!("127.0.0.1:{port}");
    let (mesh_a, mesh_b) = (free_udp_port(), free_udp_port());
    // A has no engine (the source sandbox is a loopback address); B runs
    // the container on a Docker network of its own.
    let a = AgentProcess::start(
        &cluster,
        &dirs.path().join("a"),
        secret.expose(),
        &[
            ("DOCKER_HOST", "unix:///nonexistent/docker.sock".to_owned()),
            (
                "GLOBALSTACKS_AGENT_MESH_DNS_ADDR",
                format!("{ip_a}:{}", free_udp_port()),
            ),
            ("GLOBALSTACKS_AGENT_MESH_PROXY_BIND", ip_a.to_string()),
            ("GLOBALSTACKS_AGENT_MESH_LISTEN", mesh(mesh_a)),
            ("GLOBALSTACKS_AGENT_MESH_ENDPOINT", mesh(mesh_a)),
            (
                "GLOBALSTACKS_AGENT_RUNTIME_SCOPE",
                format!("{}-a", engine_b.scope),
            ),
        ],
    );
    let b = AgentProcess::start(
        &cluster,
        &dirs.path().join("b"),
        secret.expose(),
        &[
            (
                "GLOBALSTACKS_AGENT_MESH_DNS_ADDR",
                format!("{ip_b}:{}", free_udp_port()),
            ),
            ("GLOBALSTACKS_AGENT_MESH_PROXY_BIND", ip_b.to_string()),
            ("GLOBALSTACKS_AGENT_MESH_LISTEN", mesh(mesh_b)),
            ("GLOBALSTACKS_AGENT_MESH_ENDPOINT", mesh(mesh_b)),
        ]
        .into_iter()
        .chain(engine_b.agent_env())
        .chain([(
            "GLOBALSTACKS_AGENT_MESH_CONTAINER_PROXY_BIND",
            format!("100.127.{}.0/24", std::process::id() % 250),
        )])
        .collect::<Vec<_>>(),
    );
    let host_a = a.host_id().await;
    let host_b = b.host_id().await;
    let plane = cluster.running().plane.clone();
    tests_wait(|| async {
        (plane.sessions.get(&host_a).is_some() && plane.sessions.get(&host_b).is_some())
            .then_some(())
    })
    .await;

    // The target: a real container on B, placed there by the control plane.
    let created = cluster
        .json(&[
            "sandbox",
            "create",
            "--host-id",
            &host_b,
            "--image",
            &image.0,
            "--name",
            "api",
        ])
        .await;
    let api = created["id"].as_str().unwrap().to_owned();
    let address = tests_wait(|| async {
        let shown = cluster.json(&["sandbox", "show", &api]).await;
        let shown = if shown["sandbox"].is_object() {
            shown["sandbox"].clone()
        } else {
            shown
        };
        let address = shown["addresses"].as_array()?.first()?.as_str()?.to_owned();
        (shown["status"] == "running").then_some(address)
    })
    .await;
    let prefix = engine_b.subnet.trim_end_matches("0/24");
    assert!(
        address.starts_with(prefix),
        "{address} in {}",
        engine_b.subnet
    );

    cluster.add_sandbox("sbx_web", &host_a, &web_ip.to_string(), &[]);
    cluster.json(&["network", "create", "dev"]).await;
    let port = HTTPD_PORT.to_string();
    cluster
        .json(&[
            "network", "attach", "dev", &api, "--alias", "api", "--port", &port,
        ])
        .await;
    cluster
        .json(&[
            "network", "attach", "dev", "sbx_web", "--alias", "web", "--port", "18091",
        ])
        .await;
    cluster
        .json(&[
            "network", "policy", "allow", "dev", "--from", "web", "--to", "api", "--port", &port,
        ])
        .await;

    let listener = SocketAddr::new(ip_a.into(), HTTPD_PORT);
    let response = tests_wait(|| async {
        let response = http_get(web_ip, listener).await?;
        response.contains(&page).then_some(response)
    })
    .await;
    assert!(response.starts_with("HTTP/1."), "{response}");

    // `network test` sees the container's route from agent B.
    let target = format!("api:{HTTPD_PORT}");
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
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["passed"], true, "{report}\n{}\n{}", a.log(), b.log());

    // A container as the source (netagent): a second container on B
    // resolves the alias through the agent DNS on its gateway (port 53) and
    // reaches it through B's container-side listener, identified by its own
    // address on the bridge.
    let created = cluster
        .json(&[
            "sandbox",
            "create",
            "--host-id",
            &host_b,
            "--image",
            &image.0,
            "--name",
            "client",
        ])
        .await;
    let client = created["id"].as_str().unwrap().to_owned();
    let container = tests_wait(|| async {
        let shown = cluster.json(&["sandbox", "show", &client]).await;
        let shown = if shown["sandbox"].is_object() {
            shown["sandbox"].clone()
        } else {
            shown
        };
        let container = shown["container"].as_str()?.to_owned();
        (shown["status"] == "running" && !container.is_empty()).then_some(container)
    })
    .await;
    cluster
        .json(&[
            "network", "attach", "dev", &client, "--alias", "client", "--port", "18092",
        ])
        .await;
    cluster
        .json(&[
            "network", "policy", "allow", "dev", "--from", "client", "--to", "api", "--port", &port,
        ])
        .await;
    // busybox's nslookup asks the container's resolver (Docker's, which
    // forwards to the agent on the gateway); the static busybox's wget
    // crashes in this image, so nc sends the request to the address the
    // agent DNS answered.
    let fetched = tests_wait(|| async {
        let out = docker(&[
            "exec",
            &container,
            "/bin/busybox",
            "nslookup",
            "api.dev.gstacks",
        ]);
        let answer = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.strip_prefix("Address: "))
            .map(str::trim)
            .find(|a| a.starts_with("100.127."))?
            .to_owned();
        let request = format!(
            "printf 'GET /index.html HTTP/1.0\\r\\n\\r\\n' | /bin/busybox nc {answer} {HTTPD_PORT}"
        );
        let out = docker(&["exec", &container, "/bin/busybox", "sh", "-c", &request]);
        let body = String::from_utf8_lossy(&out.stdout).into_owned();
        body.contains(&page).then_some(body)
    })
    .await;
    assert!(fetched.contains(&page), "{fetched}\n{}", b.log());
    let out = cluster.cli(&["sandbox", "deprovision", &client]).await;
    assert!(out.status.success(), "{}", network_support::text(&out));

    let out = cluster.cli(&["sandbox", "deprovision", &api]).await;
    assert!(out.status.success(), "{}", network_support::text(&out));
    drop(image);
}
