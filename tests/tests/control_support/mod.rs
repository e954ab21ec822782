//! Real processes for the control-plane end-to-end tests: `gstacks-control
//! serve --dev`, `gstacks-agent run`, and the `gstacks` CLI, over real
//! sockets. Every wait polls a condition with a deadline.

#![allow(dead_code)]

use std::io::{BufRead as _, BufReader, Read};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

pub const WAIT: Duration = Duration::from_secs(30);

/// Polls `check` until it returns Some, or None once `deadline` passed.
pub fn poll<T>(deadline: Duration, mut check: impl FnMut() -> Option<T>) -> Option<T> {
    let start = Instant::now();
    loop {
        if let Some(value) = check() {
            return Some(value);
        }
        if start.elapsed() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Polls `check` until it returns Some, or panics naming `what`.
pub fn wait_for<T>(what: &str, deadline: Duration, mut check: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(value) = check() {
            return value;
        }
        assert!(
            start.elapsed() < deadline,
            "timed out after {deadline:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Everything a child printed, both streams, as it arrives.
#[derive(Clone, Default)]
pub struct Captured(Arc<Mutex<String>>);

impl Captured {
    pub fn text(&self) -> String {
        self.0.lock().unwrap().clone()
    }

    fn follow(&self, stream: impl Read + Send + 'static) {
        let sink = self.0.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stream).lines() {
                let Ok(line) = line else { break };
                let mut text = sink.lock().unwrap();
                text.push_str(&line);
                text.push('\n');
            }
        });
    }
}

fn spawn_captured(mut command: Command) -> (Child, Captured) {
    command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .env("RUST_LOG", "info");
    let mut child = command.spawn().expect("spawn");
    let captured = Captured::default();
    captured.follow(child.stdout.take().unwrap());
    captured.follow(child.stderr.take().unwrap());
    (child, captured)
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn kill(child: &mut Child, signal: nix::sys::signal::Signal) {
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    let _ = nix::sys::signal::kill(pid, signal);
}

/// A `gstacks-control serve --dev` process on its own data dir and port.
pub struct ControlPlane {
    pub data_dir: PathBuf,
    pub addr: SocketAddr,
    pub operator_token: String,
    child: Child,
    pub log: Captured,
    /// Logs of earlier runs on the same store (restarts).
    pub earlier_logs: String,
    home: tempfile::TempDir,
    tls_flags: Vec<String>,
    ca_file: PathBuf,
}

impl ControlPlane {
    pub fn start(data_dir: &Path) -> ControlPlane {
        Self::start_with(data_dir, &["--dev"], data_dir.join("tls/cert.pem"))
    }

    /// Starts with these TLS flags; clients trust `ca_file`.
    pub fn start_with(data_dir: &Path, tls_flags: &[&str], ca_file: PathBuf) -> ControlPlane {
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let tls_flags: Vec<String> = tls_flags.iter().map(|f| (*f).to_owned()).collect();
        let (child, log) = Self::spawn(data_dir, addr, &tls_flags);
        let token = wait_for("the first-start operator token", WAIT, || {
            log.text()
                .lines()
                .find_map(|l| l.trim().strip_prefix("export GLOBALSTACKS_API_TOKEN="))
                .map(str::to_owned)
        });
        ControlPlane {
            data_dir: data_dir.to_owned(),
            addr,
            operator_token: token,
            child,
            log,
            earlier_logs: String::new(),
            home: tempfile::tempdir().unwrap(),
            tls_flags,
            ca_file,
        }
    }

    fn spawn(data_dir: &Path, addr: SocketAddr, tls_flags: &[String]) -> (Child, Captured) {
        let mut command = Command::new(tests::binary("gstacks-control"));
        command.arg("serve").args(tls_flags);
        command.args([
            "--data-dir",
            data_dir.to_str().unwrap(),
            "--listen",
            &addr.to_string(),
            "--heartbeat-timeout",
            "3",
        ]);
        let (child, log) = spawn_captured(command);
        wait_for("the control plane to listen", WAIT, || {
            log.text()
                .contains("gstacks-control listening on")
                .then_some(())
        });
        (child, log)
    }

    /// SIGKILL, then start again on the same store and port.
    pub fn kill_and_restart(&mut self) {
        kill(&mut self.child, nix::sys::signal::Signal::SIGKILL);
        let _ = self.child.wait();
        self.earlier_logs.push_str(&self.log.text());
        let (child, log) = Self::spawn(&self.data_dir, self.addr, &self.tls_flags);
        assert!(
            !log.text().contains("GLOBALSTACKS_API_TOKEN="),
            "a restart must not make a new operator token"
        );
        self.child = child;
        self.log = log;
    }

    pub fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    /// The process id (to measure its memory).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn ca_file(&self) -> PathBuf {
        self.ca_file.clone()
    }

    /// Runs `gstacks` against this control plane, with a private HOME.
    pub fn cli(&self, args: &[&str]) -> Output {
        self.cli_with_stdin(args, None)
    }

    pub fn cli_with_stdin(&self, args: &[&str], stdin: Option<&str>) -> Output {
        let mut command = Command::new(tests::binary("gstacks"));
        command
            .args(args)
            .env("HOME", self.home.path())
            .env_remove("XDG_CONFIG_HOME")
            .env("GLOBALSTACKS_API_URL", self.url())
            .env("GLOBALSTACKS_API_TOKEN", &self.operator_token)
            .env("GLOBALSTACKS_API_CA_FILE", self.ca_file())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = command.spawn().expect("spawn gstacks");
        {
            use std::io::Write as _;
            let mut input = child.stdin.take().unwrap();
            if let Some(text) = stdin {
                input.write_all(text.as_bytes()).unwrap();
            }
        }
        child.wait_with_output().unwrap()
    }

    /// Starts `gstacks <args>` in the background (`host logs --follow`).
    pub fn cli_spawn(&self, args: &[&str]) -> (Child, Captured) {
        let mut command = Command::new(tests::binary("gstacks"));
        command
            .args(args)
            .env("HOME", self.home.path())
            .env_remove("XDG_CONFIG_HOME")
            .env("GLOBALSTACKS_API_URL", self.url())
            .env("GLOBALSTACKS_API_TOKEN", &self.operator_token)
            .env("GLOBALSTACKS_API_CA_FILE", self.ca_file());
        spawn_captured(command)
    }

    /// `gstacks <args> --json`, which must succeed.
    pub fn json(&self, args: &[&str]) -> Value {
        let mut all = args.to_vec();
        all.push("--json");
        let out = self.cli(&all);
        assert!(out.status.success(), "gstacks {all:?}: {out:?}");
        serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|err| panic!("gstacks {all:?}: {err}: {out:?}"))
    }

    /// A new provisioning token's (id, secret).
    pub fn token(&self, extra: &[&str]) -> (String, String) {
        let mut args = vec!["token", "create", "--cluster", "cls_default"];
        args.extend_from_slice(extra);
        let created = self.json(&args);
        (
            created["id"].as_str().unwrap().to_owned(),
            created["secret"].as_str().unwrap().to_owned(),
        )
    }

    pub fn hosts(&self) -> Vec<Value> {
        self.json(&["host", "list"]).as_array().unwrap().clone()
    }

    pub fn host(&self, id: &str) -> Value {
        self.json(&["host", "show", id])
    }

    /// Polls until the host has `status`.
    pub fn wait_status(&self, id: &str, status: &str, deadline: Duration) -> Value {
        wait_for(&format!("host {id} to be {status}"), deadline, || {
            let host = self.host(id);
            (host["status"] == status).then_some(host)
        })
    }

    /// Kinds of the host's stored events.
    pub fn event_kinds(&self, id: &str) -> Vec<String> {
        let out = self.cli(&["host", "logs", id, "--json"]);
        assert!(out.status.success(), "{out:?}");
        String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .map(|l| {
                serde_json::from_str::<Value>(l).unwrap()["kind"]
                    .as_str()
                    .unwrap()
                    .to_owned()
            })
            .collect()
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        kill(&mut self.child, nix::sys::signal::Signal::SIGKILL);
        let _ = self.child.wait();
    }
}

/// A `gstacks-agent run` process.
pub struct Agent {
    pub state_dir: PathBuf,
    child: Child,
    pub log: Captured,
}

impl Agent {
    /// Starts an agent; `token` is only needed on its first start.
    pub fn start(
        cp: &ControlPlane,
        state_dir: &Path,
        token: Option<&str>,
        env: &[(&str, &str)],
    ) -> Agent {
        let mut command = Command::new(tests::binary("gstacks-agent"));
        command
            .arg("run")
            .env("GLOBALSTACKS_CONTROL_URL", cp.url())
            .env("GLOBALSTACKS_STATE_DIR", state_dir)
            .env("GLOBALSTACKS_CONTROL_CA_FILE", cp.ca_file())
            .env("GLOBALSTACKS_AGENT_HEARTBEAT_MS", "500")
            .env_remove("GLOBALSTACKS_PROVISIONING_TOKEN");
        if let Some(token) = token {
            command.env("GLOBALSTACKS_PROVISIONING_TOKEN", token);
        }
        for (key, value) in env {
            command.env(key, value);
        }
        let (child, log) = spawn_captured(command);
        Agent {
            state_dir: state_dir.to_owned(),
            child,
            log,
        }
    }

    /// The host id from the agent's 0600 credential file, once enrolled.
    pub fn host_id(&self) -> String {
        let path = self.state_dir.join("credential.json");
        wait_for("the agent's credential file", WAIT, || {
            let text = std::fs::read_to_string(&path).ok()?;
            let value: Value = serde_json::from_str(&text).ok()?;
            value["host_id"].as_str().map(str::to_owned)
        })
    }

    pub fn credential(&self) -> String {
        let text = std::fs::read_to_string(self.state_dir.join("credential.json")).unwrap();
        let value: Value = serde_json::from_str(&text).unwrap();
        value["stream_credential"]
            .as_str()
            .or_else(|| value["credential"].as_str())
            .expect("credential field")
            .to_owned()
    }

    pub fn signal(&self, signal: nix::sys::signal::Signal) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        nix::sys::signal::kill(pid, signal).unwrap();
    }

    /// The process id (to measure its memory).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn kill9(&mut self) {
        kill(&mut self.child, nix::sys::signal::Signal::SIGKILL);
        let _ = self.child.wait();
    }

    /// Waits for the agent to exit on its own; returns its exit code.
    pub fn wait_exit(&mut self, deadline: Duration) -> Option<i32> {
        wait_for("the agent to exit", deadline, || {
            self.child.try_wait().unwrap().map(|status| status.code())
        })
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        kill(&mut self.child, nix::sys::signal::Signal::SIGKILL);
        let _ = self.child.wait();
    }
}
