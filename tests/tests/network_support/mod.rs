//! Shared by the runtime-network end-to-end tests: the control plane in
//! the test's process (so that a test can register sandbox records through
//! the `Store` trait), the `gstacks` CLI as a subprocess against it, and
//! enrollment through the real AgentService.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use control::plane::Settings;
use control::server::{Running, ServeOptions, TlsSource};
use control::store::{Sandbox, SandboxRepo, SandboxStatus};
use proto::agent_service_client::AgentServiceClient;
use proto::{EnrollRequest, Telemetry};
use serde_json::Value;
use tonic::transport::{Certificate, Channel, ClientTlsConfig};

pub const WAIT: Duration = Duration::from_secs(20);

/// The control plane in this process, and a private HOME for the CLI.
pub struct Cluster {
    pub data_dir: tempfile::TempDir,
    home: tempfile::TempDir,
    running: Option<Running>,
    /// Where it listens (kept across restarts).
    addr: SocketAddr,
    pub token: String,
}

impl Cluster {
    /// On a free loopback port.
    pub async fn start() -> Cluster {
        Cluster::start_on(SocketAddr::from(([127, 0, 0, 1], 0))).await
    }

    /// On `listen` (port 0: a free one). An address other than loopback
    /// (e.g. the root end of a test namespace's veth pair, for agents inside
    /// namespaces) is added to the dev certificate, made here before the
    /// first start.
    pub async fn start_on(listen: SocketAddr) -> Cluster {
        let data_dir = tempfile::tempdir().unwrap();
        if !listen.ip().is_loopback() {
            write_dev_certificate(data_dir.path(), listen.ip());
        }
        let running = serve_on(data_dir.path(), listen).await;
        let token = running
            .first_operator_token
            .as_ref()
            .expect("first start makes an operator token")
            .secret
            .expose()
            .to_owned();
        Cluster {
            data_dir,
            home: tempfile::tempdir().unwrap(),
            addr: running.addr,
            running: Some(running),
            token,
        }
    }

    pub fn running(&self) -> &Running {
        self.running.as_ref().expect("the control plane is stopped")
    }

    pub fn url(&self) -> String {
        self.running().url()
    }

    pub fn ca_file(&self) -> PathBuf {
        self.data_dir.path().join("tls/cert.pem")
    }

    /// Stops the control plane and starts it again on the same store and
    /// address.
    pub async fn restart(&mut self) {
        self.stop().await;
        self.resume().await;
    }

    /// Stops the control plane (agents lose their streams); [`Cluster::resume`]
    /// starts it again. Nothing that needs it may run in between.
    pub async fn stop(&mut self) {
        self.running.take().unwrap().shutdown().await.unwrap();
    }

    /// Starts the stopped control plane again on the same store and address.
    pub async fn resume(&mut self) {
        assert!(self.running.is_none(), "the control plane is running");
        let running = serve_on(self.data_dir.path(), self.addr).await;
        assert!(running.first_operator_token.is_none());
        self.running = Some(running);
    }

    /// The CLI's HOME (its config dir is `.config/gstacks` in it).
    pub fn home(&self) -> &std::path::Path {
        self.home.path()
    }

    /// The `gstacks <args>` command against this control plane, not started.
    pub fn cli_command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(tests::binary("gstacks"));
        command
            .args(args)
            .env("HOME", self.home.path())
            .env_remove("XDG_CONFIG_HOME")
            .env("GLOBALSTACKS_API_URL", self.running().url())
            .env("GLOBALSTACKS_API_TOKEN", &self.token)
            .env("GLOBALSTACKS_API_CA_FILE", self.ca_file())
            .stdin(Stdio::null());
        command
    }

    /// `gstacks <args>` against this control plane.
    pub async fn cli(&self, args: &[&str]) -> Output {
        let mut command = self.cli_command(args);
        tokio::task::spawn_blocking(move || command.output().unwrap())
            .await
            .unwrap()
    }

    /// `gstacks <args> --json`, which must succeed.
    pub async fn json(&self, args: &[&str]) -> Value {
        let mut all = args.to_vec();
        all.push("--json");
        let out = self.cli(&all).await;
        assert!(out.status.success(), "gstacks {all:?}: {}", text(&out));
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{all:?}: {e}: {out:?}"))
    }

    /// `gstacks <args>`, which must fail with one line naming the problem.
    pub async fn fails(&self, args: &[&str]) -> String {
        let out = self.cli(args).await;
        assert!(
            !out.status.success(),
            "gstacks {args:?} succeeded: {}",
            text(&out)
        );
        let err = String::from_utf8(out.stderr).unwrap();
        assert!(err.starts_with("error: "), "{args:?}: {err}");
        err.trim().to_owned()
    }

    pub async fn version(&self) -> u64 {
        self.running().plane.store.topology_version().unwrap()
    }

    /// A sandbox record on `host_id` whose runtime address is `address`.
    pub fn add_sandbox(&self, id: &str, host_id: &str, address: &str, tags: &[&str]) {
        let now = control::clock::now_ms();
        let sandbox = Sandbox {
            id: id.to_owned(),
            cluster_id: "cls_default".to_owned(),
            host_id: host_id.to_owned(),
            name: id.to_owned(),
            image: "local/test".to_owned(),
            image_digest: String::new(),
            blueprint_id: String::new(),
            status: SandboxStatus::Running,
            status_message: String::new(),
            container_id: String::new(),
            container_name: String::new(),
            addresses: vec![address.to_owned()],
            docker_network: String::new(),
            tags: tags.iter().map(|t| (*t).to_owned()).collect(),
            traits: Vec::new(),
            volumes: Vec::new(),
            repo: SandboxRepo::default(),
            memory_bytes: 0,
            millicpus: 0,
            created_by: "test".to_owned(),
            created_at_ms: now,
            updated_at_ms: now,
            archived_at_ms: 0,
        };
        self.running().plane.store.insert_sandbox(&sandbox).unwrap();
    }

    /// Enrolls a host through the real AgentService.
    pub async fn enroll(&self, hostname: &str) -> (String, String) {
        let (_, secret) = self
            .running()
            .plane
            .create_provisioning_token("cls_default", "network test", false, None)
            .unwrap();
        let mut client = AgentServiceClient::new(self.channel().await);
        let enrolled = client
            .enroll(EnrollRequest {
                provisioning_token: secret.expose().to_owned(),
                facts: Some(Telemetry {
                    hostname: hostname.to_owned(),
                    ..Telemetry::default()
                }),
            })
            .await
            .unwrap()
            .into_inner();
        (enrolled.host_id, enrolled.stream_credential)
    }

    pub async fn channel(&self) -> Channel {
        let pem = std::fs::read(self.ca_file()).unwrap();
        Channel::from_shared(self.running().url())
            .unwrap()
            .tls_config(ClientTlsConfig::new().ca_certificate(Certificate::from_pem(pem)))
            .unwrap()
            .connect()
            .await
            .unwrap()
    }
}

pub async fn serve(data_dir: &std::path::Path) -> Running {
    serve_on(data_dir, SocketAddr::from(([127, 0, 0, 1], 0))).await
}

pub async fn serve_on(data_dir: &std::path::Path, listen: SocketAddr) -> Running {
    control::server::start(ServeOptions {
        data_dir: data_dir.to_path_buf(),
        listen,
        tls: TlsSource::Dev,
        settings: Settings::default(),
        first_operator_token: true,
    })
    .await
    .unwrap()
}

/// The `--dev` certificate (`<data_dir>/tls/`, which the control plane
/// loads when present) for loopback and `ip`, key 0600 in a 0700 directory.
fn write_dev_certificate(data_dir: &std::path::Path, ip: std::net::IpAddr) {
    use std::io::Write as _;
    use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _};
    let dir = data_dir.join("tls");
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir)
        .unwrap();
    let names = vec![
        "localhost".to_owned(),
        "127.0.0.1".to_owned(),
        ip.to_string(),
    ];
    let certified = rcgen::generate_simple_self_signed(names).unwrap();
    let mut key = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(dir.join("key.pem"))
        .unwrap();
    key.write_all(certified.signing_key.serialize_pem().as_bytes())
        .unwrap();
    std::fs::write(dir.join("cert.pem"), certified.cert.pem()).unwrap();
}

pub fn text(out: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Polls an async condition with a deadline.
pub async fn tests_wait<T, F, Fut>(check: F) -> T
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "condition not met within {WAIT:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A free UDP port on loopback (for an agent's mesh or DNS).
pub fn free_udp_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Settings of an agent with no container engine whose DNS and alias
/// listeners are on `listen_ip` and whose mesh is on loopback: its sandboxes
/// are loopback addresses the test registers, and no rediscovery marks their
/// container-less records failed.
pub fn loopback_agent_env(
    listen_ip: std::net::Ipv4Addr,
    dns: std::net::SocketAddr,
    mesh_port: u16,
) -> Vec<(&'static str, String)> {
    let mesh = format!("127.0.0.1:{mesh_port}");
    vec![
        ("DOCKER_HOST", "unix:///nonexistent/docker.sock".to_owned()),
        ("GLOBALSTACKS_AGENT_MESH_DNS_ADDR", dns.to_string()),
        ("GLOBALSTACKS_AGENT_MESH_PROXY_BIND", listen_ip.to_string()),
        ("GLOBALSTACKS_AGENT_MESH_LISTEN", mesh.clone()),
        ("GLOBALSTACKS_AGENT_MESH_ENDPOINT", mesh),
    ]
}

/// A `gstacks-agent run` process enrolled into the test's control plane;
/// stdout and stderr go to `agent.log` in its state dir.
pub struct AgentProcess {
    state_dir: PathBuf,
    child: std::process::Child,
    env: Vec<(&'static str, String)>,
    /// The network namespace it runs in (`ip netns exec`), if any.
    netns: Option<String>,
}

impl AgentProcess {
    /// Starts the agent with `env` over the common settings (control URL
    /// and CA, state dir, provisioning token, 500 ms heartbeats).
    pub fn start(
        cluster: &Cluster,
        state_dir: &std::path::Path,
        token: &str,
        env: &[(&'static str, String)],
    ) -> AgentProcess {
        AgentProcess::start_in(cluster, state_dir, token, env, None)
    }

    /// [`AgentProcess::start`] inside the network namespace `netns`
    /// (`ip netns exec`, which execs: the child's pid is the agent's).
    pub fn start_in(
        cluster: &Cluster,
        state_dir: &std::path::Path,
        token: &str,
        env: &[(&'static str, String)],
        netns: Option<&str>,
    ) -> AgentProcess {
        std::fs::create_dir_all(state_dir).unwrap();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(state_dir.join("agent.log"))
            .unwrap();
        let agent = tests::binary("gstacks-agent");
        let mut command = match netns {
            Some(name) => {
                let mut command = Command::new("ip");
                command.args(["netns", "exec", name]).arg(agent);
                command
            }
            None => Command::new(agent),
        };
        command
            .arg("run")
            .env("GLOBALSTACKS_CONTROL_URL", cluster.url())
            .env("GLOBALSTACKS_CONTROL_CA_FILE", cluster.ca_file())
            .env("GLOBALSTACKS_STATE_DIR", state_dir)
            .env("GLOBALSTACKS_PROVISIONING_TOKEN", token)
            .env("GLOBALSTACKS_AGENT_HEARTBEAT_MS", "500")
            .env_remove("GLOBALSTACKS_AGENT_MESH_CONTAINER_ADDR")
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        for (key, value) in env {
            command.env(key, value);
        }
        AgentProcess {
            state_dir: state_dir.to_owned(),
            child: command.spawn().unwrap(),
            env: env.to_vec(),
            netns: netns.map(str::to_owned),
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.state_dir.join("agent.log")).unwrap_or_default()
    }

    /// The host id the agent enrolled as (from its credential file).
    pub async fn host_id(&self) -> String {
        let path = self.state_dir.join("credential.json");
        tests_wait(|| async {
            let text = std::fs::read_to_string(&path).ok()?;
            let value: Value = serde_json::from_str(&text).ok()?;
            value["host_id"].as_str().map(str::to_owned)
        })
        .await
    }

    /// SIGKILL, then the same agent again (same state dir and settings).
    pub fn restart(&mut self, cluster: &Cluster) {
        self.stop();
        let again = AgentProcess::start_in(
            cluster,
            &self.state_dir,
            "",
            &self.env,
            self.netns.as_deref(),
        );
        *self = again;
    }

    /// Fails if the agent exited (e.g. crashed).
    pub fn check_running(&mut self) -> Result<(), String> {
        match self.child.try_wait() {
            Ok(None) => Ok(()),
            Ok(Some(status)) => Err(format!("the agent exited: {status}")),
            Err(e) => Err(e.to_string()),
        }
    }

    pub fn stop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
        let _ = self.child.wait();
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        self.stop();
    }
}
