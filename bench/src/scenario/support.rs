//! What the scenarios with real processes share: the sibling binaries, a
//! child guard, free ports, setup deadlines, and the control plane (in this
//! process, so a scenario can register sandbox records) with real
//! `gstacks-agent` processes enrolled into it.

use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};

/// Bound for every setup step (agent connected, listener ready, ...).
pub const SETUP: Duration = Duration::from_secs(60);

/// A child process killed (SIGKILL) and reaped on drop.
pub struct Guard(pub Child);

impl Guard {
    pub fn pid(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            if let Ok(pid) = i32::try_from(self.0.id()) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            let _ = self.0.wait();
        }
    }
}

/// A binary built next to `gstacks-bench` (`cargo build --release --bins`).
pub fn sibling(name: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe().context("path of gstacks-bench")?;
    let path = exe.with_file_name(name);
    if !path.is_file() {
        bail!(
            "{} not found next to gstacks-bench; build it: cargo build --release --bins",
            path.display()
        );
    }
    Ok(path)
}

/// A free port on 127.0.0.1 (released before the caller binds it).
pub fn free_port(udp: bool) -> Result<u16> {
    let port = if udp {
        std::net::UdpSocket::bind("127.0.0.1:0")?
            .local_addr()?
            .port()
    } else {
        std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port()
    };
    Ok(port)
}

/// Polls `check` every 50 ms until it gives a value, for at most [`SETUP`].
pub async fn wait_for<T>(what: &str, mut check: impl FnMut() -> Option<T>) -> Result<T> {
    let deadline = Instant::now() + SETUP;
    loop {
        if let Some(value) = check() {
            return Ok(value);
        }
        if Instant::now() > deadline {
            bail!("{what} not within {SETUP:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The control plane in this process (`--dev` TLS, a first operator token),
/// with its data under `dir`.
pub async fn start_control(dir: &Path) -> Result<control::server::Running> {
    Ok(control::server::start(control::server::ServeOptions {
        data_dir: dir.to_path_buf(),
        listen: "127.0.0.1:0".parse()?,
        tls: control::server::TlsSource::Dev,
        settings: control::plane::Settings::default(),
        first_operator_token: true,
    })
    .await?)
}

/// Enrolls a real `gstacks-agent run` process into `running` with `env`
/// over the common settings (no container engine, so a sandbox record whose
/// address is a loopback server is served as is); its log is
/// `<state_dir>/agent.log`. Returns it once its control stream is open,
/// with its host id.
pub async fn start_agent(
    running: &control::server::Running,
    state_dir: &Path,
    env: &[(&str, String)],
) -> Result<(Guard, String)> {
    let (_, provisioning) =
        running
            .plane
            .create_provisioning_token("cls_default", "gstacks-bench", false, None)?;
    std::fs::create_dir_all(state_dir)?;
    let log = std::fs::File::create(state_dir.join("agent.log"))?;
    let mut command = Command::new(sibling("gstacks-agent")?);
    command
        .arg("run")
        .env("GLOBALSTACKS_CONTROL_URL", running.url())
        .env("GLOBALSTACKS_CONTROL_CA_FILE", &running.tls.cert_path)
        .env("GLOBALSTACKS_STATE_DIR", state_dir)
        .env("GLOBALSTACKS_PROVISIONING_TOKEN", provisioning.expose())
        .env_remove("GLOBALSTACKS_AGENT_MESH_CONTAINER_ADDR")
        // No container engine: the sandbox is a loopback server, and no
        // rediscovery marks its container-less record failed.
        .env("DOCKER_HOST", "unix:///nonexistent/docker.sock")
        .env("RUST_LOG", "warn");
    for (key, value) in env {
        command.env(key, value);
    }
    let agent = Guard(
        command
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("start gstacks-agent")?,
    );
    let credential = state_dir.join("credential.json");
    let host_id = wait_for("agent enrolled", || {
        let text = std::fs::read_to_string(&credential).ok()?;
        let value: serde_json::Value = serde_json::from_str(&text).ok()?;
        value["host_id"].as_str().map(str::to_owned)
    })
    .await?;
    let plane = &running.plane;
    wait_for("agent connected", || plane.sessions.get(&host_id).map(drop)).await?;
    Ok((agent, host_id))
}

/// The environment of an agent that binds only loopback: its DNS on a free
/// port, every alias listener on `proxy_ip`, its mesh node on a free UDP
/// port of 127.0.0.1.
pub fn loopback_agent_env(proxy_ip: Ipv4Addr) -> Result<Vec<(&'static str, String)>> {
    let mesh = format!("127.0.0.1:{}", free_port(true)?);
    Ok(vec![
        (
            "GLOBALSTACKS_AGENT_MESH_DNS_ADDR",
            format!("127.0.0.1:{}", free_port(true)?),
        ),
        ("GLOBALSTACKS_AGENT_MESH_PROXY_BIND", proxy_ip.to_string()),
        ("GLOBALSTACKS_AGENT_MESH_LISTEN", mesh.clone()),
        ("GLOBALSTACKS_AGENT_MESH_ENDPOINT", mesh),
    ])
}

/// Registers a running sandbox record on `host_id` whose runtime address is
/// `address` (a loopback server standing in for the container).
pub fn insert_sandbox(
    plane: &control::plane::ControlPlane,
    id: &str,
    host_id: &str,
    address: IpAddr,
) -> Result<()> {
    use control::store::{Sandbox, SandboxRepo, SandboxStatus};
    let now = control::clock::now_ms();
    plane.store.insert_sandbox(&Sandbox {
        id: id.to_owned(),
        cluster_id: "cls_default".to_owned(),
        host_id: host_id.to_owned(),
        name: id.to_owned(),
        image: "local/bench".to_owned(),
        image_digest: String::new(),
        blueprint_id: String::new(),
        status: SandboxStatus::Running,
        status_message: String::new(),
        container_id: String::new(),
        container_name: String::new(),
        addresses: vec![address.to_string()],
        docker_network: String::new(),
        tags: Vec::new(),
        traits: Vec::new(),
        volumes: Vec::new(),
        repo: SandboxRepo::default(),
        memory_bytes: 0,
        millicpus: 0,
        created_by: "gstacks-bench".to_owned(),
        created_at_ms: now,
        updated_at_ms: now,
        archived_at_ms: 0,
    })?;
    Ok(())
}
