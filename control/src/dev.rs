//! `gstacks-control dev`: the control plane with its embedded store and one
//! local agent enrolled into the default cluster, for a first look on one
//! machine. The agent is the real `gstacks-agent` binary found next to this
//! one, run as a child process and stopped with it.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt as _, BufReader};
use tokio::process::{Child, Command};

use crate::error::{ControlError, Result};
use crate::server::{Running, ServeOptions};
use crate::store::{HostStatus, DEFAULT_CLUSTER_ID};

/// Description of the operator token each `dev` start makes (and the
/// previous one of which it revokes).
pub const DEV_OPERATOR_TOKEN: &str = "dev";

/// Description of the mesh API token each `dev` start makes (and the
/// previous one of which it revokes).
pub const DEV_MESH_API_TOKEN: &str = "gstacks-control dev";

#[derive(Debug, Clone)]
pub struct DevOptions {
    pub serve: ServeOptions,
    /// The agent binary; default: `gstacks-agent` next to the running binary.
    pub agent_binary: Option<PathBuf>,
}

/// The agent binary next to the running executable.
pub fn sibling_agent_binary() -> Result<PathBuf> {
    let exe = std::env::current_exe().map_err(|source| ControlError::Io {
        path: PathBuf::from("/proc/self/exe"),
        source,
    })?;
    let dir = exe.parent().unwrap_or(Path::new("."));
    Ok(dir.join("gstacks-agent"))
}

/// Runs until Ctrl-C (or the agent exits): prints what to type next.
pub async fn run(options: DevOptions) -> Result<()> {
    let agent_binary = match options.agent_binary.clone() {
        Some(path) => path,
        None => sibling_agent_binary()?,
    };
    if !agent_binary.is_file() {
        return Err(ControlError::LocalAgent(format!(
            "{} not found; build it first: cargo build --release --bins",
            agent_binary.display()
        )));
    }
    let data_dir = absolute(&options.serve.data_dir)?;
    let mut serve = options.serve.clone();
    serve.data_dir = data_dir.clone();
    serve.first_operator_token = false;
    let running = crate::server::start(serve).await?;
    let plane = running.plane.clone();

    // A fresh operator token per dev start; the previous one stops working.
    plane
        .store
        .revoke_operator_tokens_described(DEV_OPERATOR_TOKEN, crate::clock::now_ms())?;
    let operator = plane.create_operator_token(DEV_OPERATOR_TOKEN)?;
    let mesh_token = configure_mesh(&running)?;
    // Used only if the local agent has not enrolled yet; expires soon.
    let (token, provisioning) = plane.create_provisioning_token(
        DEFAULT_CLUSTER_ID,
        "local agent of gstacks-control dev",
        false,
        Some(Duration::from_secs(600)),
    )?;

    let state_dir = data_dir.join("agent");
    crate::tls::create_private_dir(&state_dir)?;
    let mut agent = Command::new(&agent_binary);
    agent
        .arg("run")
        .env("GLOBALSTACKS_CONTROL_URL", running.url())
        .env("GLOBALSTACKS_PROVISIONING_TOKEN", provisioning.expose())
        .env("GLOBALSTACKS_STATE_DIR", &state_dir)
        .env("GLOBALSTACKS_CONTROL_CA_FILE", &running.tls.cert_path)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = agent.spawn().map_err(|source| ControlError::Io {
        path: agent_binary.clone(),
        source,
    })?;
    forward_output(&mut child);
    tracing::info!(pid = child.id(), binary = %agent_binary.display(), "local agent started");

    let fingerprint = running.tls.fingerprint()?;
    let host = wait_for_local_host(&running, &token.id, &mut child).await?;
    println!();
    println!("GlobalStacks control plane: {}", running.url());
    println!(
        "  store:       {}",
        data_dir.join(crate::server::STORE_FILE).display()
    );
    println!(
        "  certificate: {} (SHA-256 {fingerprint})",
        running.tls.cert_path.display()
    );
    match &host {
        Some((id, name)) => {
            println!("  local agent: host {id} ({name}) connected to cluster {DEFAULT_CLUSTER_ID}")
        }
        None => println!("  local agent: not connected yet (see its log lines above)"),
    }
    println!();
    println!("Next, in another shell:");
    println!("  export GLOBALSTACKS_API_URL={}", running.url());
    println!(
        "  export GLOBALSTACKS_API_TOKEN={}",
        operator.secret.expose()
    );
    println!(
        "  export GLOBALSTACKS_API_CA_FILE={}",
        running.tls.cert_path.display()
    );
    let cli = agent_binary.with_file_name("gstacks");
    if cli.is_file() {
        println!("  {} host list", cli.display());
    } else {
        println!("  gstacks host list");
    }
    if let Some(token) = &mesh_token {
        println!();
        println!("Laptop joins (gstacks mesh join) register here; the control plane mints their keys through its own mesh API:");
        println!("  GLOBALSTACKS_MESH_CONTROL_URL={}", running.url());
        println!("  GLOBALSTACKS_MESH_API_URL={}", running.url());
        println!("  GLOBALSTACKS_MESH_API_TOKEN={}", token.expose());
    }
    println!();
    println!("The operator token is shown once and changes at every start. Ctrl-C stops the control plane and the agent.");

    let outcome = tokio::select! {
        signal = tokio::signal::ctrl_c() => {
            signal.map_err(|source| ControlError::Io { path: PathBuf::from("SIGINT"), source })?;
            eprintln!("stopping the local agent and the control plane");
            Ok(())
        }
        status = child.wait() => Err(ControlError::LocalAgent(match status {
            Ok(status) => format!("gstacks-agent exited ({status})"),
            Err(err) => format!("waiting for gstacks-agent: {err}"),
        })),
    };
    stop_child(&mut child).await;
    running.shutdown().await?;
    outcome
}

fn absolute(path: &Path) -> Result<PathBuf> {
    if path.is_absolute() {
        return Ok(path.to_owned());
    }
    let cwd = std::env::current_dir().map_err(|source| ControlError::Io {
        path: PathBuf::from("."),
        source,
    })?;
    Ok(cwd.join(path))
}

/// Prefixes the agent's output lines so they stand apart from ours.
fn forward_output(child: &mut Child) {
    if let Some(out) = child.stdout.take() {
        tokio::spawn(async move {
            let mut lines = BufReader::new(out).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                println!("agent | {line}");
            }
        });
    }
    if let Some(err) = child.stderr.take() {
        tokio::spawn(async move {
            let mut lines = BufReader::new(err).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                eprintln!("agent | {line}");
            }
        });
    }
}

/// Waits (up to 60 s) for the local agent's host to be connected: the host
/// enrolled with this start's token, or the one it enrolled earlier.
async fn wait_for_local_host(
    running: &Running,
    token_id: &str,
    child: &mut Child,
) -> Result<Option<(String, String)>> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    loop {
        let hosts = running.plane.store.hosts(Some(DEFAULT_CLUSTER_ID))?;
        let connected: Vec<_> = hosts
            .iter()
            .filter(|h| h.status == HostStatus::Connected)
            .collect();
        let pick = connected
            .iter()
            .find(|h| h.token_id == token_id)
            .or_else(|| connected.first());
        if let Some(host) = pick {
            return Ok(Some((host.id.clone(), host.name.clone())));
        }
        if tokio::time::Instant::now() >= deadline {
            return Ok(None);
        }
        tokio::select! {
            _ = tick.tick() => {}
            status = child.wait() => {
                return Err(ControlError::LocalAgent(match status {
                    Ok(status) => format!("gstacks-agent exited before it connected ({status})"),
                    Err(err) => format!("waiting for gstacks-agent: {err}"),
                }));
            }
        }
    }
}

/// SIGTERM, then SIGKILL if it has not exited within 5 s.
async fn stop_child(child: &mut Child) {
    if let Some(pid) = child.id() {
        let pid = nix::unistd::Pid::from_raw(pid as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        if tokio::time::timeout(Duration::from_secs(5), child.wait())
            .await
            .is_ok()
        {
            return;
        }
    }
    let _ = child.kill().await;
}

/// Points the laptop-mesh settings at this control plane, unless the
/// operator configured a source: a fresh mesh API token (returned to be
/// printed) and this server's URL as both the registration URL and the
/// mesh API.
fn configure_mesh(running: &Running) -> Result<Option<crate::secret::Secret>> {
    let mut settings = running.plane.mesh.get();
    if settings.source().is_ok() {
        return Ok(None);
    }
    // One live dev token at a time: the one the previous start printed stops working.
    running
        .plane
        .store
        .revoke_mesh_api_tokens_described(DEV_MESH_API_TOKEN, crate::clock::now_ms())?;
    let token = running.plane.create_mesh_api_token(DEV_MESH_API_TOKEN)?;
    let url = running.url();
    if settings
        .control_url
        .as_deref()
        .is_none_or(|u| u.trim().is_empty())
    {
        settings.control_url = Some(url.clone());
    }
    settings.api_url = Some(url);
    settings.api_token = Some(token.secret.expose().to_owned());
    settings.auth_key = None;
    running.plane.mesh.set(settings);
    Ok(Some(token.secret))
}
