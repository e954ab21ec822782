//! The agent's control-stream client against a small in-test AgentService
//! (real sockets, real time): enrollment, hello, heartbeats, reconnection,
//! revocation, typed commands and the host terminal. The full end-to-end
//! with the real control plane lives in the control plane's tests.

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use agent::config::{self, AgentConfig, ConfigSource};
use proto::agent_service_server::{AgentService, AgentServiceServer};
use proto::{
    agent_message, command, command_result, control_message, event, reply, AgentMessage, Command,
    ControlMessage, EnrollRequest, EnrollResponse, ErrorCode, HostTerminalOpen, Ping,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tokio_stream::{Stream, StreamExt};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};

const TOKEN: &str = "gst_provisioning_SECRET_0451";
const CREDENTIAL: &str = "gsc_stream_SECRET_9d7e";
const WAIT: Duration = Duration::from_secs(20);

/// What the fake control plane saw, tagged with the session number.
#[derive(Debug)]
struct Seen {
    session: usize,
    message: AgentMessage,
}

#[derive(Default)]
struct State {
    enrolls: Vec<EnrollRequest>,
    sessions: usize,
    authorizations: Vec<String>,
    /// The open session's downstream; dropping it ends the stream.
    down: Option<mpsc::Sender<Result<ControlMessage, Status>>>,
    refuse_sessions: bool,
}

#[derive(Clone)]
struct FakeControl {
    state: Arc<Mutex<State>>,
    seen: mpsc::Sender<Seen>,
}

#[tonic::async_trait]
impl AgentService for FakeControl {
    async fn enroll(
        &self,
        request: Request<EnrollRequest>,
    ) -> Result<Response<EnrollResponse>, Status> {
        let request = request.into_inner();
        if request.provisioning_token != TOKEN {
            return Err(Status::permission_denied("provisioning token is not valid"));
        }
        self.state.lock().unwrap().enrolls.push(request);
        Ok(Response::new(EnrollResponse {
            host_id: "host_1".into(),
            stream_credential: CREDENTIAL.into(),
            cluster_id: "cls_default".into(),
            host_name: "test-host".into(),
        }))
    }

    type SessionStream = Pin<Box<dyn Stream<Item = Result<ControlMessage, Status>> + Send>>;

    async fn session(
        &self,
        request: Request<Streaming<AgentMessage>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        let auth = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned();
        let (number, down_rx) = {
            let mut state = self.state.lock().unwrap();
            state.authorizations.push(auth.clone());
            if state.refuse_sessions {
                return Err(Status::permission_denied(
                    "host host_1 was revoked by alice",
                ));
            }
            if auth != format!("Bearer {CREDENTIAL}") {
                return Err(Status::unauthenticated("unknown stream credential"));
            }
            state.sessions += 1;
            let (tx, rx) = mpsc::channel(64);
            state.down = Some(tx);
            (state.sessions, rx)
        };
        let mut inbound = request.into_inner();
        let seen = self.seen.clone();
        tokio::spawn(async move {
            while let Some(Ok(message)) = inbound.next().await {
                if seen
                    .send(Seen {
                        session: number,
                        message,
                    })
                    .await
                    .is_err()
                {
                    break;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(down_rx))))
    }
}

struct Harness {
    url: String,
    state: Arc<Mutex<State>>,
    seen: mpsc::Receiver<Seen>,
    _server: tokio::task::JoinHandle<()>,
}

impl Harness {
    async fn start() -> Harness {
        Self::start_with_tls(None).await
    }

    /// With `tls` (certificate PEM, key PEM) the server speaks https.
    async fn start_with_tls(tls: Option<(String, String)>) -> Harness {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let scheme = if tls.is_some() { "https" } else { "http" };
        let url = format!("{scheme}://{}", listener.local_addr().unwrap());
        let state = Arc::new(Mutex::new(State::default()));
        let (seen_tx, seen) = mpsc::channel(4096);
        let service = FakeControl {
            state: state.clone(),
            seen: seen_tx,
        };
        let mut builder = tonic::transport::Server::builder();
        if let Some((cert, key)) = tls {
            builder = builder
                .tls_config(
                    tonic::transport::ServerTlsConfig::new()
                        .identity(tonic::transport::Identity::from_pem(cert, key)),
                )
                .unwrap();
        }
        let server = tokio::spawn(async move {
            builder
                .add_service(AgentServiceServer::new(service))
                .serve_with_incoming(TcpListenerStream::new(listener))
                .await
                .unwrap();
        });
        Harness {
            url,
            state,
            seen,
            _server: server,
        }
    }

    fn config(&self, state_dir: &std::path::Path, extra: &[(&str, &str)]) -> AgentConfig {
        let mut env = vec![
            (config::CONTROL_URL.to_owned(), self.url.clone()),
            (config::PROVISIONING_TOKEN.to_owned(), TOKEN.to_owned()),
            (
                config::STATE_DIR.to_owned(),
                state_dir.display().to_string(),
            ),
            (
                config::TRAITS.to_owned(),
                "trusted,public-ingress".to_owned(),
            ),
            (config::TAGS.to_owned(), "env=test".to_owned()),
            (config::HEARTBEAT_MS.to_owned(), "100".to_owned()),
        ];
        env.extend(
            extra
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned())),
        );
        AgentConfig::from_source(&ConfigSource::from_parts(None, env).unwrap()).unwrap()
    }

    /// The next message the agent sent that matches, within [`WAIT`].
    async fn wait_for(&mut self, what: &str, mut matches: impl FnMut(&Seen) -> bool) -> Seen {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let seen = tokio::time::timeout_at(deadline, self.seen.recv())
                .await
                .unwrap_or_else(|_| panic!("no {what} within {WAIT:?}"))
                .expect("server alive");
            if matches(&seen) {
                return seen;
            }
        }
    }

    async fn send_down(&self, command: Command) {
        let down = self
            .state
            .lock()
            .unwrap()
            .down
            .clone()
            .expect("a session is open");
        down.send(Ok(ControlMessage {
            body: Some(control_message::Body::Command(command)),
        }))
        .await
        .unwrap();
    }
}

fn is_hello(s: &Seen) -> bool {
    matches!(s.message.body, Some(agent_message::Body::Hello(_)))
}

fn event_kind(s: &Seen) -> Option<&str> {
    match &s.message.body {
        Some(agent_message::Body::Event(e)) => Some(&e.kind),
        _ => None,
    }
}

fn start_agent(
    config: AgentConfig,
) -> (
    CancellationToken,
    tokio::task::JoinHandle<Result<(), agent::AgentError>>,
) {
    let shutdown = CancellationToken::new();
    let handle = tokio::spawn(agent::run::run(config, shutdown.clone()));
    (shutdown, handle)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_enrolls_says_hello_heartbeats_and_reuses_its_credential() {
    let mut h = Harness::start().await;
    let dir = tempfile::tempdir().unwrap();
    let state_dir = dir.path().join("state");
    let (shutdown, agent) = start_agent(h.config(&state_dir, &[]));

    let hello = h.wait_for("hello", is_hello).await;
    assert_eq!(hello.session, 1);
    let Some(agent_message::Body::Hello(hello)) = hello.message.body else {
        unreachable!()
    };
    assert_eq!(
        hello.protocol_version,
        proto::ProtocolVersion::ProtocolVersion1 as i32
    );
    let telemetry = hello.telemetry.unwrap();
    assert_eq!(telemetry.agent_version, proto::build_info::VERSION);
    assert!(
        telemetry
            .traits
            .starts_with(&["trusted".to_owned(), "public-ingress".to_owned()]),
        "{:?}",
        telemetry.traits
    );
    let arch = telemetry.arch.clone();
    if arch == "amd64" || arch == "arm64" {
        assert!(telemetry.traits.contains(&arch), "{:?}", telemetry.traits);
    }
    assert_eq!(telemetry.tags, ["env=test"]);
    assert!(!telemetry.hostname.is_empty() && telemetry.cpus > 0 && telemetry.memory_bytes > 0);

    h.wait_for("agent.started event", |s| {
        event_kind(s) == Some("agent.started")
    })
    .await;
    h.wait_for("stream.connected event", |s| {
        event_kind(s) == Some("stream.connected")
    })
    .await;
    let mut beats = Vec::new();
    while beats.len() < 2 {
        let s = h
            .wait_for("heartbeat", |s| {
                matches!(s.message.body, Some(agent_message::Body::Heartbeat(_)))
            })
            .await;
        let Some(agent_message::Body::Heartbeat(beat)) = s.message.body else {
            unreachable!()
        };
        beats.push(beat.seq);
    }
    assert_eq!(beats, [1, 2]);

    // Enrolled once, with the provisioning token and the host's facts.
    {
        let state = h.state.lock().unwrap();
        assert_eq!(state.enrolls.len(), 1);
        assert_eq!(state.enrolls[0].facts.as_ref().unwrap().tags, ["env=test"]);
    }
    let credential_file = state_dir.join(agent::state::CREDENTIAL_FILE);
    let mode = std::fs::metadata(&credential_file)
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600, "credential file mode {mode:o}");

    shutdown.cancel();
    tokio::time::timeout(WAIT, agent)
        .await
        .unwrap()
        .unwrap()
        .unwrap();

    // Restart: the stored credential is used, no second enrollment.
    let (shutdown, agent) = start_agent(h.config(&state_dir, &[]));
    let hello = h.wait_for("hello after restart", is_hello).await;
    assert_eq!(hello.session, 2);
    {
        let state = h.state.lock().unwrap();
        assert_eq!(state.enrolls.len(), 1, "a restart must not enroll again");
        assert_eq!(
            state.authorizations.last().unwrap(),
            &format!("Bearer {CREDENTIAL}")
        );
    }
    shutdown.cancel();
    tokio::time::timeout(WAIT, agent)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_reconnects_when_the_server_drops_the_stream() {
    let mut h = Harness::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (shutdown, agent) = start_agent(h.config(dir.path(), &[]));
    assert_eq!(h.wait_for("hello", is_hello).await.session, 1);

    for round in 2..=3 {
        // The control plane drops the stream (as when it restarts).
        drop(h.state.lock().unwrap().down.take());
        let hello = h.wait_for("hello on a new stream", is_hello).await;
        assert_eq!(hello.session, round);
        // What happened while disconnected is reported on the new stream.
        let ev = h
            .wait_for("stream.disconnected event", |s| {
                event_kind(s) == Some("stream.disconnected")
            })
            .await;
        assert_eq!(ev.session, round);
        h.wait_for("heartbeat on the new stream", |s| {
            s.session == round && matches!(s.message.body, Some(agent_message::Body::Heartbeat(_)))
        })
        .await;
    }
    assert_eq!(h.state.lock().unwrap().enrolls.len(), 1);
    shutdown.cancel();
    tokio::time::timeout(WAIT, agent)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_agent_stops_and_says_why() {
    let mut h = Harness::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (_shutdown, agent) = start_agent(h.config(dir.path(), &[]));
    h.wait_for("hello", is_hello).await;
    // Revocation: the stream ends and every new session is refused.
    h.state.lock().unwrap().refuse_sessions = true;
    drop(h.state.lock().unwrap().down.take());
    let err = tokio::time::timeout(WAIT, agent)
        .await
        .expect("agent stops after revocation")
        .unwrap()
        .unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, agent::AgentError::Revoked { .. }), "{text}");
    assert!(
        text.contains("revoked") && text.contains("Not retrying"),
        "{text}"
    );
    assert!(!text.contains(CREDENTIAL), "{text}");
    // It tried exactly once after the refusal: no retry loop.
    let refused = h.state.lock().unwrap().authorizations.len();
    assert_eq!(refused, 2, "one accepted session, one refused attempt");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_provisioning_token_is_refused_with_a_clear_error() {
    let h = Harness::start().await;
    let dir = tempfile::tempdir().unwrap();
    let config = h.config(dir.path(), &[(config::PROVISIONING_TOKEN, "gst_wrong")]);
    let (_shutdown, agent) = start_agent(config);
    let err = tokio::time::timeout(WAIT, agent)
        .await
        .unwrap()
        .unwrap()
        .unwrap_err();
    let text = err.to_string();
    assert!(
        matches!(err, agent::AgentError::EnrollRefused { .. }),
        "{text}"
    );
    assert!(
        text.contains("provisioning token is not valid") && !text.contains("gst_wrong"),
        "{text}"
    );
    assert!(!dir.path().join(agent::state::CREDENTIAL_FILE).exists());
}

fn reply_of(s: &Seen, id: &str) -> Option<reply::Outcome> {
    match &s.message.body {
        Some(agent_message::Body::Reply(r)) if r.request_id == id => r.outcome.clone(),
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typed_commands_and_the_host_terminal_over_the_stream() {
    let mut h = Harness::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (shutdown, agent) = start_agent(h.config(dir.path(), &[]));
    h.wait_for("hello", is_hello).await;

    // A kind this build does not know decodes as unset: UNSUPPORTED.
    h.send_down(Command {
        request_id: "req-unknown".into(),
        deadline_ms: 0,
        kind: None,
    })
    .await;
    let s = h
        .wait_for("reply to the unknown kind", |s| {
            reply_of(s, "req-unknown").is_some()
        })
        .await;
    match reply_of(&s, "req-unknown") {
        Some(reply::Outcome::Error(e)) => assert_eq!(e.code, ErrorCode::Unsupported as i32),
        other => panic!("expected UNSUPPORTED, got {other:?}"),
    }

    h.send_down(Command {
        request_id: "req-ping".into(),
        deadline_ms: 1000,
        kind: Some(command::Kind::Ping(Ping {
            payload: b"rtt".to_vec(),
        })),
    })
    .await;
    let s = h
        .wait_for("pong", |s| reply_of(s, "req-ping").is_some())
        .await;
    match reply_of(&s, "req-ping") {
        Some(reply::Outcome::Result(r)) => assert_eq!(
            r.kind,
            Some(command_result::Kind::Pong(proto::Pong {
                payload: b"rtt".to_vec()
            }))
        ),
        other => panic!("expected pong, got {other:?}"),
    }

    h.send_down(Command {
        request_id: "req-term".into(),
        deadline_ms: 0,
        kind: Some(command::Kind::HostTerminalOpen(HostTerminalOpen {
            session_id: "term-1".into(),
            reason: "INC-7 investigate".into(),
            requested_by: "alice".into(),
            cols: 80,
            rows: 24,
            max_duration_secs: 60,
            command: vec!["sh".into(), "-c".into(), "echo out-$((6*7)); exit 7".into()],
        })),
    })
    .await;
    let mut output = Vec::new();
    let mut opened = false;
    let mut audit: Option<HashMap<String, String>> = None;
    let exit = loop {
        let s = h.wait_for("terminal traffic", |_| true).await;
        match s.message.body {
            Some(agent_message::Body::Reply(r)) if r.request_id == "req-term" => {
                assert!(
                    matches!(r.outcome, Some(reply::Outcome::Result(ref res)) if matches!(res.kind, Some(command_result::Kind::TerminalOpened(_)))),
                    "{r:?}"
                );
                opened = true;
            }
            Some(agent_message::Body::Event(e)) => {
                if e.kind == "terminal.opened" {
                    audit = Some(e.fields.clone());
                }
                match e.payload {
                    Some(event::Payload::TerminalOutput(o)) => {
                        assert_eq!(e.request_id, "req-term");
                        output.extend(o.data);
                    }
                    Some(event::Payload::TerminalExit(x)) => break x,
                    _ => {}
                }
            }
            _ => {}
        }
    };
    assert!(opened, "TerminalOpened reply before the exit");
    assert!(
        String::from_utf8_lossy(&output).contains("out-42"),
        "{:?}",
        String::from_utf8_lossy(&output)
    );
    assert_eq!((exit.session_id.as_str(), exit.exit_code), ("term-1", 7));
    let audit = audit.expect("terminal.opened event with reason and requester");
    assert_eq!(audit["reason"], "INC-7 investigate");
    assert_eq!(audit["requested_by"], "alice");

    shutdown.cancel();
    tokio::time::timeout(WAIT, agent)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disabled_host_terminal_is_refused_over_the_stream() {
    let mut h = Harness::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (shutdown, agent) =
        start_agent(h.config(dir.path(), &[(config::DISABLE_HOST_TERMINAL, "1")]));
    h.wait_for("hello", is_hello).await;
    h.send_down(Command {
        request_id: "req-term".into(),
        deadline_ms: 0,
        kind: Some(command::Kind::HostTerminalOpen(HostTerminalOpen {
            session_id: "term-1".into(),
            reason: "curious".into(),
            requested_by: "mallory".into(),
            ..Default::default()
        })),
    })
    .await;
    let s = h
        .wait_for("refusal", |s| reply_of(s, "req-term").is_some())
        .await;
    match reply_of(&s, "req-term") {
        Some(reply::Outcome::Error(e)) => {
            assert_eq!(e.code, ErrorCode::PermissionDenied as i32);
            assert!(
                e.message
                    .contains("GLOBALSTACKS_AGENT_DISABLE_HOST_TERMINAL"),
                "{}",
                e.message
            );
        }
        other => panic!("expected PERMISSION_DENIED, got {other:?}"),
    }
    shutdown.cancel();
    tokio::time::timeout(WAIT, agent)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}

/// The binary: enrolls, gets revoked, exits 78 after saying why exactly
/// once, and never prints the provisioning token or the credential, even
/// at debug level.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_exits_78_on_revocation_says_why_once_and_logs_no_secret() {
    let mut h = Harness::start().await;
    let dir = tempfile::tempdir().unwrap();
    let mut child = tokio::process::Command::new(tests::binary("gstacks-agent"))
        .arg("run")
        .env(config::CONTROL_URL, &h.url)
        .env(config::PROVISIONING_TOKEN, TOKEN)
        .env(config::STATE_DIR, dir.path())
        .env(config::HEARTBEAT_MS, "100")
        .env("RUST_LOG", "debug")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    h.wait_for("hello", is_hello).await;
    h.state.lock().unwrap().refuse_sessions = true;
    drop(h.state.lock().unwrap().down.take());
    let out = tokio::time::timeout(WAIT, async {
        let mut stderr = child.stderr.take().unwrap();
        let mut text = String::new();
        tokio::io::AsyncReadExt::read_to_string(&mut stderr, &mut text)
            .await
            .unwrap();
        (child.wait().await.unwrap(), text)
    })
    .await
    .expect("agent exits after revocation");
    let (status, stderr) = out;
    assert_eq!(status.code(), Some(78), "{stderr}");
    assert_eq!(stderr.matches("Not retrying").count(), 1, "{stderr}");
    assert!(stderr.contains("was revoked by alice"), "{stderr}");
    for secret in [TOKEN, CREDENTIAL, "SECRET"] {
        assert!(
            !stderr.contains(secret),
            "`{secret}` in the agent's log:\n{stderr}"
        );
    }
}

/// https with the server's self-signed certificate: trusted through
/// GLOBALSTACKS_CONTROL_CA_FILE, or pinned by GLOBALSTACKS_CONTROL_FINGERPRINT;
/// a wrong pin is refused with both fingerprints named.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_with_a_ca_file_or_a_pinned_fingerprint() {
    use sha2::Digest;
    let certified =
        rcgen::generate_simple_self_signed(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
            .unwrap();
    let cert_pem = certified.cert.pem();
    let fingerprint = agent::tls::format_fingerprint(&sha2::Sha256::digest(certified.cert.der()));
    let mut h = Harness::start_with_tls(Some((
        cert_pem.clone(),
        certified.signing_key.serialize_pem(),
    )))
    .await;
    assert!(h.url.starts_with("https://"));
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("control-ca.pem");
    std::fs::write(&ca_file, &cert_pem).unwrap();

    let state = dir.path().join("state");
    let (shutdown, agent) = start_agent(h.config(
        &state,
        &[(config::CONTROL_CA_FILE, ca_file.to_str().unwrap())],
    ));
    assert_eq!(
        h.wait_for("hello over https (CA file)", is_hello)
            .await
            .session,
        1
    );
    shutdown.cancel();
    tokio::time::timeout(WAIT, agent)
        .await
        .unwrap()
        .unwrap()
        .unwrap();

    let (shutdown, agent) =
        start_agent(h.config(&state, &[(config::CONTROL_FINGERPRINT, &fingerprint)]));
    assert_eq!(
        h.wait_for("hello over https (pinned)", is_hello)
            .await
            .session,
        2
    );
    shutdown.cancel();
    tokio::time::timeout(WAIT, agent)
        .await
        .unwrap()
        .unwrap()
        .unwrap();

    let wrong = h.config(&state, &[(config::CONTROL_FINGERPRINT, &"00".repeat(32))]);
    let endpoint =
        agent::control_stream::ControlEndpoint::new(&wrong.control_url, &wrong.tls).unwrap();
    let err = endpoint.connect().await.unwrap_err().to_string();
    assert!(
        err.contains("not the pinned") && err.contains(&fingerprint),
        "{err}"
    );
}

fn agent_command(h: &Harness, state_dir: &std::path::Path) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(tests::binary("gstacks-agent"));
    cmd.env(config::CONTROL_URL, &h.url)
        .env(config::PROVISIONING_TOKEN, TOKEN)
        .env(config::STATE_DIR, state_dir)
        .env(config::HEARTBEAT_MS, "100")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    cmd
}

async fn lock_verb(
    h: &Harness,
    state_dir: &std::path::Path,
    args: &[&str],
) -> (Option<i32>, String) {
    let out = agent_command(h, state_dir)
        .args(["service", "lock"])
        .args(args)
        .output()
        .await
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code(), text)
}

/// One agent per host: a second one is refused naming the holder; after
/// `kill -9` the lock is reported stale, `clear` needs `--force`, and a
/// restarted agent takes the lock and reuses its credential.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_lock_and_restart_after_kill_9() {
    let mut h = Harness::start().await;
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path();
    let mut first = agent_command(&h, state).arg("run").spawn().unwrap();
    let pid = first.id().unwrap();
    assert_eq!(h.wait_for("hello", is_hello).await.session, 1);

    let (code, text) = lock_verb(&h, state, &["status"]).await;
    assert_eq!(code, Some(0), "{text}");
    assert!(
        text.contains(&format!("held by pid {pid}")) && text.contains("alive"),
        "{text}"
    );

    let second = agent_command(&h, state).arg("run").output().await.unwrap();
    let err = String::from_utf8_lossy(&second.stderr);
    assert_eq!(second.status.code(), Some(1), "{err}");
    assert!(err.contains(&format!("held by pid {pid}")), "{err}");

    let (code, text) = lock_verb(&h, state, &["clear", "--force"]).await;
    assert_eq!(code, Some(1), "{text}");
    assert!(
        text.contains("alive") && text.contains("refusing"),
        "{text}"
    );

    first.start_kill().unwrap();
    first.wait().await.unwrap();
    let (code, text) = lock_verb(&h, state, &["status"]).await;
    assert_eq!(code, Some(0), "{text}");
    assert!(
        text.contains("stale") && text.contains(&format!("pid {pid}")),
        "{text}"
    );
    let (code, text) = lock_verb(&h, state, &["clear"]).await;
    assert_eq!(code, Some(1), "{text}");
    assert!(text.contains("--force"), "{text}");

    // A stale lock does not keep the agent from starting again.
    let mut restarted = agent_command(&h, state).arg("run").spawn().unwrap();
    assert_eq!(h.wait_for("hello after kill -9", is_hello).await.session, 2);
    assert_eq!(
        h.state.lock().unwrap().enrolls.len(),
        1,
        "restart must not enroll again"
    );
    restarted.start_kill().unwrap();
    restarted.wait().await.unwrap();
    let (code, text) = lock_verb(&h, state, &["clear", "--force"]).await;
    assert_eq!(code, Some(0), "{text}");
    let (_, text) = lock_verb(&h, state, &["status"]).await;
    assert!(text.contains("free"), "{text}");
}
