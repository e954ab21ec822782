//! `gstacks-bench control`: N simulated agents (one process, one TLS
//! connection each) against a real `gstacks-control serve` process. Reports
//! the time to enroll them all, the time until all N streams are connected,
//! and the control plane's CPU and RSS while they heartbeat, beside the same
//! control plane idle (no agents) measured in the same run.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use futures::future::join_all;
use tokio::sync::{mpsc, watch, Semaphore};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

use super::support::{free_port, sibling};

use proto::agent_service_client::AgentServiceClient;
use proto::control_api_client::ControlApiClient;
use proto::{agent_message, AgentMessage, EnrollRequest, Heartbeat, Hello, Telemetry};

pub const SCENARIO: &str = "control";

#[derive(clap::Args, Debug)]
pub struct Options {
    /// Simulated agents.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..=20000))]
    pub agents: u32,
    /// Heartbeat interval of every simulated agent, in milliseconds.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(50..=60000))]
    pub heartbeat_ms: u64,
    /// Seconds over which CPU is measured (idle and with agents).
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=600))]
    pub window_secs: u64,
    /// The gstacks-control binary (default: next to this one).
    #[arg(long)]
    pub control_bin: Option<PathBuf>,
    /// Also write the results as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

/// One figure: (metric, system, value, unit).
#[derive(Debug, Clone, PartialEq)]
pub struct Figure {
    pub metric: &'static str,
    pub system: &'static str,
    pub value: f64,
    pub unit: &'static str,
}

/// The control plane process under test, killed on drop.
struct ControlProcess {
    child: Child,
    url: String,
    ca_pem: Vec<u8>,
    operator_token: String,
    _dir: tempfile::TempDir,
}

impl Drop for ControlProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_control(binary: &Path) -> anyhow::Result<ControlProcess> {
    use std::io::BufRead as _;
    let dir = tempfile::tempdir()?;
    let port = free_port(false)?;
    let mut child = Command::new(binary)
        .args(["serve", "--dev", "--listen", &format!("127.0.0.1:{port}")])
        .arg("--data-dir")
        .arg(dir.path())
        // Silence gives the agents time to miss a beat without flapping.
        .args(["--heartbeat-timeout", "30"])
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| format!("starting {}", binary.display()))?;
    let stdout = child.stdout.take().context("control plane stdout")?;
    let mut token = None;
    for line in std::io::BufReader::new(stdout).lines() {
        let line = line.context("reading the control plane's output")?;
        if let Some(t) = line.trim().strip_prefix("export GLOBALSTACKS_API_TOKEN=") {
            token = Some(t.to_owned());
            break;
        }
    }
    let Some(operator_token) = token else {
        let _ = child.kill();
        bail!("the control plane exited before printing its operator token");
    };
    let ca_pem =
        std::fs::read(dir.path().join("tls/cert.pem")).context("reading the dev certificate")?;
    Ok(ControlProcess {
        child,
        url: format!("https://127.0.0.1:{port}"),
        ca_pem,
        operator_token,
        _dir: dir,
    })
}

/// CPU seconds (user + system) and RSS (bytes) of a process, from /proc.
fn cpu_and_rss(pid: u32) -> anyhow::Result<(f64, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name, which is in parentheses.
    let rest = stat.rsplit_once(')').context("malformed /proc stat")?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100) as f64;
    let utime: f64 = fields.get(11).context("utime")?.parse()?;
    let stime: f64 = fields.get(12).context("stime")?.parse()?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let rss_kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .context("VmRSS")?
        .parse()?;
    Ok(((utime + stime) / ticks, rss_kib * 1024))
}

/// Cores used by `pid` over `window`.
async fn cpu_over(pid: u32, window: Duration) -> anyhow::Result<f64> {
    let (before, _) = cpu_and_rss(pid)?;
    let start = Instant::now();
    tokio::time::sleep(window).await;
    let (after, _) = cpu_and_rss(pid)?;
    Ok((after - before) / start.elapsed().as_secs_f64())
}

fn endpoint(control: &ControlProcess) -> anyhow::Result<Endpoint> {
    Ok(Channel::from_shared(control.url.clone())?
        .tls_config(ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&control.ca_pem)))?
        .connect_timeout(Duration::from_secs(20)))
}

fn facts(i: u32) -> Telemetry {
    Telemetry {
        agent_version: "bench".to_owned(),
        os: "linux".to_owned(),
        arch: "amd64".to_owned(),
        hostname: format!("sim-{i:05}"),
        cpus: 2,
        traits: vec!["amd64".to_owned()],
        ..Default::default()
    }
}

/// A simulated agent's life after enrollment: its own TLS connection, the
/// session stream with a hello, then heartbeats until `stop`.
async fn simulated_agent(
    endpoint: Endpoint,
    i: u32,
    credential: String,
    heartbeat: Duration,
    connected: mpsc::Sender<()>,
    mut stop: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let channel = endpoint.connect().await.context("connecting")?;
    let mut client = AgentServiceClient::new(channel);
    let (tx, rx) = mpsc::channel(4);
    tx.send(AgentMessage {
        body: Some(agent_message::Body::Hello(Hello {
            protocol_version: proto::ProtocolVersion::ProtocolVersion1 as i32,
            telemetry: Some(facts(i)),
            applied_topology_version: 0,
            // A simulated agent has no mesh node.
            mesh: None,
        })),
    })
    .await?;
    let mut request = tonic::Request::new(ReceiverStream::new(rx));
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {credential}").parse()?);
    let mut down = client.session(request).await?.into_inner();
    let _ = connected.send(()).await;
    let mut tick = tokio::time::interval(heartbeat);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut seq = 0;
    loop {
        tokio::select! {
            _ = tick.tick() => {
                seq += 1;
                let beat = AgentMessage {
                    body: Some(agent_message::Body::Heartbeat(Heartbeat { seq, sent_at_ms: 0, telemetry: None })),
                };
                if tx.send(beat).await.is_err() {
                    bail!("agent {i}: stream closed");
                }
            }
            message = down.message() => match message? {
                Some(_) => {}
                None => bail!("agent {i}: the control plane ended the stream"),
            },
            _ = stop.changed() => return Ok(()),
        }
    }
}

pub async fn run(options: &Options) -> anyhow::Result<Vec<Figure>> {
    let binary = match &options.control_bin {
        Some(path) => path.clone(),
        None => sibling("gstacks-control")?,
    };
    anyhow::ensure!(
        binary.is_file(),
        "{} not found; build it: cargo build --release --bins",
        binary.display()
    );
    let control = start_control(&binary)?;
    let pid = control.child.id();
    let endpoint = endpoint(&control)?;
    let window = Duration::from_secs(options.window_secs);
    let n = options.agents;
    let mut figures = Vec::new();
    let mut record = |metric, system, value, unit| {
        figures.push(Figure {
            metric,
            system,
            value,
            unit,
        })
    };

    // Baseline: the same control plane, idle, in the same run.
    let idle_cpu = cpu_over(pid, window).await?;
    let (_, idle_rss) = cpu_and_rss(pid)?;
    record("cpu", "idle", idle_cpu, "cores");
    record("rss", "idle", idle_rss as f64 / (1024.0 * 1024.0), "MiB");

    // A provisioning token through the operator API.
    let mut auth: tonic::metadata::MetadataValue<_> =
        format!("Bearer {}", control.operator_token).parse()?;
    auth.set_sensitive(true);
    let channel = endpoint
        .connect()
        .await
        .context("connecting the operator API")?;
    let mut api =
        ControlApiClient::with_interceptor(channel.clone(), move |mut r: tonic::Request<()>| {
            r.metadata_mut().insert("authorization", auth.clone());
            Ok(r)
        });
    let secret = api
        .create_provisioning_token(proto::CreateProvisioningTokenRequest {
            cluster_id: "cls_default".to_owned(),
            description: "gstacks-bench control".to_owned(),
            long_living: true,
            ttl_secs: 0,
        })
        .await?
        .into_inner()
        .secret;

    // Enrollment of N hosts (64 at a time over a few shared connections).
    let started = Instant::now();
    let limit = Arc::new(Semaphore::new(64));
    let channels: Vec<Channel> = join_all((0..8).map(|_| endpoint.connect()))
        .await
        .into_iter()
        .collect::<Result<_, _>>()?;
    let enrolls = (0..n).map(|i| {
        let limit = limit.clone();
        let mut client = AgentServiceClient::new(channels[i as usize % channels.len()].clone());
        let secret = secret.clone();
        async move {
            let _permit = limit.acquire().await?;
            let enrolled = client
                .enroll(EnrollRequest {
                    provisioning_token: secret,
                    facts: Some(facts(i)),
                })
                .await?
                .into_inner();
            anyhow::Ok(enrolled.stream_credential)
        }
    });
    let credentials: Vec<String> = join_all(enrolls)
        .await
        .into_iter()
        .collect::<Result<_, _>>()
        .context("enrolling")?;
    drop(channels);
    record(
        "enroll_all",
        "gstacks",
        started.elapsed().as_secs_f64(),
        "s",
    );

    // N agents connect at once, each on its own TLS connection.
    let (stop_tx, stop_rx) = watch::channel(false);
    let (connected_tx, mut connected_rx) = mpsc::channel(n as usize);
    let heartbeat = Duration::from_millis(options.heartbeat_ms);
    let started = Instant::now();
    let mut agents = tokio::task::JoinSet::new();
    for (i, credential) in credentials.into_iter().enumerate() {
        agents.spawn(simulated_agent(
            endpoint.clone(),
            i as u32,
            credential,
            heartbeat,
            connected_tx.clone(),
            stop_rx.clone(),
        ));
    }
    drop(connected_tx);
    let mut count = 0;
    while count < n {
        tokio::select! {
            got = connected_rx.recv() => match got {
                Some(()) => count += 1,
                None => break,
            },
            Some(joined) = agents.join_next() => {
                joined?.context("a simulated agent failed")?;
            }
        }
    }
    anyhow::ensure!(count == n, "only {count} of {n} agents connected");
    let connect_all = started.elapsed();
    let hosts = api
        .list_hosts(proto::ListHostsRequest::default())
        .await?
        .into_inner()
        .hosts;
    let live = hosts
        .iter()
        .filter(|h| h.status == proto::HostStatus::Connected as i32)
        .count();
    anyhow::ensure!(
        live == n as usize,
        "the control plane lists {live} of {n} hosts connected"
    );
    record("connect_all", "gstacks", connect_all.as_secs_f64(), "s");

    // Steady heartbeats.
    let busy = tokio::select! {
        cpu = cpu_over(pid, window) => cpu?,
        Some(joined) = agents.join_next() => {
            joined?.context("a simulated agent failed while heartbeating")?;
            bail!("a simulated agent stopped early");
        }
    };
    let (_, rss) = cpu_and_rss(pid)?;
    record("cpu", "gstacks", busy, "cores");
    record("rss", "gstacks", rss as f64 / (1024.0 * 1024.0), "MiB");
    let _ = stop_tx.send(true);
    while let Some(joined) = agents.join_next().await {
        joined??;
    }
    Ok(figures)
}
