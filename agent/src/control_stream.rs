//! The ONE control-stream client: enrollment, and the `Session` stream that
//! every module talks through.
//!
//! Life of a session: connect, open `Session` with the stream credential in
//! `authorization: Bearer ...`, send `Hello` (telemetry), flush the events
//! buffered while disconnected, then heartbeat every interval, route
//! `Command`s to the [`Dispatcher`], publish `Netmap`s, and forward what
//! modules send through their [`Link`]. When the stream drops, reconnect
//! after a jittered exponential backoff (capped at 30 s).
//!
//! A refusal with `PERMISSION_DENIED` or `UNAUTHENTICATED` (or a `Goodbye`
//! with `ERROR_CODE_PERMISSION_DENIED`) means the host was revoked: the
//! client stops for good and returns [`AgentError::Revoked`], which says why.
//!
//! While disconnected, events are kept in a bounded buffer (oldest dropped
//! first, the number dropped is reported on reconnect); replies are dropped,
//! since their request belonged to the stream that died.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use proto::agent_service_client::AgentServiceClient;
use proto::{
    agent_message, control_message, AgentMessage, EnrollRequest, ErrorCode, Event, EventLevel,
    Heartbeat, Hello, MeshNodeInfo, Netmap, ProtocolVersion, Telemetry,
};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

use crate::backoff::Backoff;
use crate::config::{Secret, TlsTrust, CONTROL_CA_FILE};
use crate::dispatch::{event, Dispatcher, DispatcherBuilder, Link};
use crate::error::AgentError;
use crate::state::{self, Credential};
use crate::tls::PinnedTlsConnector;

/// Messages modules may queue before they wait for the client.
pub const OUTBOX_CAPACITY: usize = 1024;
/// Events kept while disconnected.
pub const EVENT_BUFFER: usize = 512;
const SESSION_QUEUE: usize = 64;
/// How often heartbeats carry telemetry by default.
pub const DEFAULT_TELEMETRY_INTERVAL: Duration = Duration::from_secs(30);
const SYSTEM_CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

/// How the connection to the control plane is verified.
#[derive(Clone)]
enum Trust {
    /// `http://`: no TLS (tests, a local control plane).
    Plain,
    /// CA certificates (PEM) that tonic's rustls verifies against.
    CaPem(Vec<u8>),
    /// The SHA-256 of the one certificate to accept.
    Pinned([u8; 32]),
}

/// How to reach the control plane.
#[derive(Clone)]
pub struct ControlEndpoint {
    url: String,
    trust: Trust,
}

impl std::fmt::Debug for ControlEndpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlEndpoint")
            .field("url", &self.url)
            .finish_non_exhaustive()
    }
}

impl ControlEndpoint {
    /// For `https`: the CA file, or the pinned fingerprint, or (neither set)
    /// the system CA bundle. The CA file is read now, so a bad path fails at
    /// start with the key named.
    pub fn new(url: &http::Uri, tls: &TlsTrust) -> Result<Self, AgentError> {
        let url = url.to_string().trim_end_matches('/').to_owned();
        let trust = if !url.starts_with("https://") {
            Trust::Plain
        } else if let Some(fingerprint) = tls.fingerprint {
            Trust::Pinned(fingerprint)
        } else {
            let (key, path) = match &tls.ca_file {
                Some(path) => (CONTROL_CA_FILE, path.clone()),
                None => (CONTROL_CA_FILE, PathBuf::from(SYSTEM_CA_BUNDLE)),
            };
            let pem = std::fs::read(&path).map_err(|e| AgentError::Config {
                key: key.to_owned(),
                message: format!("cannot read {}: {e}", path.display()),
            })?;
            if !String::from_utf8_lossy(&pem).contains("-----BEGIN CERTIFICATE-----") {
                return Err(AgentError::Config {
                    key: key.to_owned(),
                    message: format!("{} holds no PEM certificate", path.display()),
                });
            }
            Trust::CaPem(pem)
        };
        Ok(Self { url, trust })
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    fn endpoint(&self, url: String) -> Result<Endpoint, AgentError> {
        Ok(Endpoint::from_shared(url)
            .map_err(|e| {
                AgentError::config(crate::config::CONTROL_URL, format!("`{}`: {e}", self.url))
            })?
            .connect_timeout(Duration::from_secs(5))
            .http2_keep_alive_interval(Duration::from_secs(15))
            .keep_alive_timeout(Duration::from_secs(10))
            .keep_alive_while_idle(true))
    }

    /// Connects (TLS as configured) and returns an `AgentService` client.
    pub async fn connect(&self) -> Result<AgentServiceClient<Channel>, AgentError> {
        let transport = |e: tonic::transport::Error| AgentError::Transport {
            url: self.url.clone(),
            message: format!("connect: {}", error_chain(&e)),
        };
        let channel = match &self.trust {
            Trust::Plain => self
                .endpoint(self.url.clone())?
                .connect()
                .await
                .map_err(transport)?,
            Trust::CaPem(pem) => self
                .endpoint(self.url.clone())?
                .tls_config(ClientTlsConfig::new().ca_certificate(Certificate::from_pem(pem)))
                .map_err(|e| AgentError::Tls {
                    message: e.to_string(),
                })?
                .connect()
                .await
                .map_err(transport)?,
            Trust::Pinned(fingerprint) => {
                // The connector does the TLS; tonic sees a plain-http URI.
                let uri: http::Uri = self.url.parse().map_err(|e| {
                    AgentError::config(crate::config::CONTROL_URL, format!("`{}`: {e}", self.url))
                })?;
                let connector =
                    PinnedTlsConnector::new(*fingerprint, uri.host().unwrap_or_default())?;
                self.endpoint(self.url.replacen("https://", "http://", 1))?
                    .connect_with_connector(connector)
                    .await
                    .map_err(transport)?
            }
        };
        Ok(AgentServiceClient::new(channel))
    }
}

/// Refusals that mean "this credential is not (or no longer) accepted".
fn is_refusal(code: tonic::Code) -> bool {
    matches!(
        code,
        tonic::Code::PermissionDenied | tonic::Code::Unauthenticated
    )
}

/// The stored credential, or a new one from enrolling with the provisioning
/// token. Transport failures are retried with backoff; a refusal is final.
pub async fn ensure_enrolled(
    endpoint: &ControlEndpoint,
    state_dir: &std::path::Path,
    provisioning_token: Option<&Secret>,
    facts: Telemetry,
    shutdown: &CancellationToken,
) -> Result<Option<Credential>, AgentError> {
    if let Some(credential) = state::load_credential(state_dir)? {
        tracing::info!(host_id = %credential.host_id, "using the stored stream credential");
        return Ok(Some(credential));
    }
    let token = provisioning_token.ok_or_else(|| AgentError::NotEnrolled {
        state_dir: state_dir.to_owned(),
    })?;
    let mut backoff = Backoff::default();
    loop {
        let attempt = async {
            let mut client = endpoint.connect().await?;
            client
                .enroll(EnrollRequest {
                    provisioning_token: token.expose().to_owned(),
                    facts: Some(facts.clone()),
                })
                .await
                .map(tonic::Response::into_inner)
                .map_err(|status| classify_enroll_error(endpoint.url(), &status))
        };
        let failure = tokio::select! {
            _ = shutdown.cancelled() => return Ok(None),
            result = attempt => match result {
                Ok(response) => {
                    if response.host_id.trim().is_empty() || response.stream_credential.trim().is_empty() {
                        return Err(AgentError::EnrollRefused {
                            url: endpoint.url().to_owned(),
                            message: "the response has no host id or no stream credential".to_owned(),
                        });
                    }
                    let credential = Credential {
                        host_id: response.host_id,
                        cluster_id: response.cluster_id,
                        host_name: response.host_name,
                        stream_credential: Secret::new(response.stream_credential),
                    };
                    state::store_credential(state_dir, &credential)?;
                    tracing::info!(host_id = %credential.host_id, cluster_id = %credential.cluster_id, "enrolled; stream credential stored in {}", state::credential_path(state_dir).display());
                    return Ok(Some(credential));
                }
                Err(err @ AgentError::EnrollRefused { .. }) => return Err(err),
                Err(err) => err,
            },
        };
        let delay = backoff.next_delay();
        tracing::warn!("enrollment failed: {failure}; retrying in {delay:?}");
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(None),
            _ = tokio::time::sleep(delay) => {}
        }
    }
}

fn classify_enroll_error(url: &str, status: &tonic::Status) -> AgentError {
    use tonic::Code;
    match status.code() {
        Code::Unavailable
        | Code::DeadlineExceeded
        | Code::Unknown
        | Code::Internal
        | Code::Cancelled
        | Code::ResourceExhausted
        | Code::Aborted => AgentError::Transport {
            url: url.to_owned(),
            message: format!("{:?}: {}", status.code(), status.message()),
        },
        code => AgentError::EnrollRefused {
            url: url.to_owned(),
            message: format!("{code:?}: {}", status.message()),
        },
    }
}

/// Provides the facts for each `Hello` (re-probed on every connect, so a
/// Docker daemon started later shows up as the `docker` trait).
pub trait TelemetrySource: Send + Sync + 'static {
    fn current(
        &self,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Telemetry> + Send + '_>>;
}

/// Tuning of the client; the defaults are the production values.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    pub heartbeat_interval: Duration,
    /// A heartbeat carries fresh telemetry (running sandboxes, cached
    /// images, available memory) at most this often.
    pub telemetry_interval: Duration,
    pub backoff: Backoff,
}

impl Default for ClientOptions {
    fn default() -> Self {
        Self {
            heartbeat_interval: crate::config::DEFAULT_HEARTBEAT,
            telemetry_interval: DEFAULT_TELEMETRY_INTERVAL,
            backoff: Backoff::default(),
        }
    }
}

/// The control-stream client. Build it, hand [`ControlClient::link`] and
/// [`ControlClient::netmaps`] to modules, then [`ControlClient::run`].
pub struct ControlClient {
    endpoint: ControlEndpoint,
    credential_file: PathBuf,
    options: ClientOptions,
    link: Link,
    outbox: mpsc::Receiver<AgentMessage>,
    netmap_tx: watch::Sender<Option<Netmap>>,
    applied_topology_version: Arc<AtomicU64>,
    mesh: Option<MeshNodeInfo>,
}

impl ControlClient {
    /// `state_dir` is only named in the message given on revocation.
    pub fn new(
        endpoint: ControlEndpoint,
        state_dir: &std::path::Path,
        options: ClientOptions,
    ) -> Self {
        let (link, outbox) = Link::channel(OUTBOX_CAPACITY);
        let (netmap_tx, _) = watch::channel(None);
        Self {
            endpoint,
            credential_file: state::credential_path(state_dir),
            options,
            link,
            outbox,
            netmap_tx,
            applied_topology_version: Arc::new(AtomicU64::new(0)),
            mesh: None,
        }
    }

    /// The agent's mesh node (public key and endpoint), sent in every `Hello`.
    pub fn with_mesh_node(mut self, mesh: MeshNodeInfo) -> Self {
        self.mesh = Some(mesh);
        self
    }

    /// The handle modules send events through.
    pub fn link(&self) -> Link {
        self.link.clone()
    }

    /// The latest netmap from the control plane.
    pub fn netmaps(&self) -> watch::Receiver<Option<Netmap>> {
        self.netmap_tx.subscribe()
    }

    /// Where the network module records the topology version it applied;
    /// it is reported in every `Hello`.
    pub fn applied_topology_version(&self) -> Arc<AtomicU64> {
        self.applied_topology_version.clone()
    }

    /// Runs until `shutdown` (Ok) or revocation (Err). Starts the modules.
    pub async fn run(
        mut self,
        credential: &Credential,
        modules: DispatcherBuilder,
        telemetry: &dyn TelemetrySource,
        shutdown: CancellationToken,
    ) -> Result<(), AgentError> {
        let dispatcher = modules.start(self.link.clone());
        let mut buffer = EventBuffer::new(EVENT_BUFFER);
        buffer.push(event(
            "agent.started",
            EventLevel::Info,
            format!("gstacks-agent {} started", proto::build_info::VERSION),
        ));
        let mut backoff = self.options.backoff.clone();
        loop {
            let end = self
                .serve_session(
                    credential,
                    &dispatcher,
                    telemetry,
                    &mut buffer,
                    &mut backoff,
                    &shutdown,
                )
                .await;
            let reason = match end {
                SessionEnd::Shutdown => return Ok(()),
                SessionEnd::Refused(message) => {
                    return Err(AgentError::Revoked {
                        url: self.endpoint.url().to_owned(),
                        message,
                        state_file: self.credential_file.clone(),
                    })
                }
                SessionEnd::Dropped(reason) => reason,
            };
            dispatcher.stream_lost();
            let mut ev = event(
                "stream.disconnected",
                EventLevel::Warn,
                format!("control stream dropped: {reason}"),
            );
            ev.fields.insert("reason".into(), reason.clone());
            buffer.push(ev);
            let delay = backoff.next_delay();
            tracing::warn!(
                "control stream to {} dropped: {reason}; reconnecting in {delay:?}",
                self.endpoint.url()
            );
            let wake = tokio::time::sleep(delay);
            tokio::pin!(wake);
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return Ok(()),
                    _ = &mut wake => break,
                    Some(message) = self.outbox.recv() => buffer.keep(message),
                }
            }
        }
    }

    async fn serve_session(
        &mut self,
        credential: &Credential,
        dispatcher: &Dispatcher,
        telemetry: &dyn TelemetrySource,
        buffer: &mut EventBuffer,
        backoff: &mut Backoff,
        shutdown: &CancellationToken,
    ) -> SessionEnd {
        let mut client = tokio::select! {
            _ = shutdown.cancelled() => return SessionEnd::Shutdown,
            connected = self.endpoint.connect() => match connected {
                Ok(client) => client,
                Err(err) => return SessionEnd::Dropped(err.to_string()),
            },
        };
        let (tx, rx) = mpsc::channel::<AgentMessage>(SESSION_QUEUE);
        let hello = Hello {
            protocol_version: ProtocolVersion::ProtocolVersion1 as i32,
            telemetry: Some(telemetry.current().await),
            applied_topology_version: self.applied_topology_version.load(Ordering::Relaxed),
            mesh: self.mesh.clone(),
        };
        // The queue is empty: this cannot wait.
        let _ = tx.send(body(agent_message::Body::Hello(hello))).await;
        let mut request = tonic::Request::new(ReceiverStream::new(rx));
        match tonic::metadata::MetadataValue::try_from(format!(
            "Bearer {}",
            credential.stream_credential.expose()
        )) {
            Ok(mut value) => {
                value.set_sensitive(true);
                request.metadata_mut().insert("authorization", value);
            }
            Err(_) => {
                return SessionEnd::Refused(
                    "the stored stream credential is not a valid header value".to_owned(),
                )
            }
        }
        let opened = tokio::select! {
            _ = shutdown.cancelled() => return SessionEnd::Shutdown,
            opened = client.session(request) => opened,
        };
        let mut inbound = match opened {
            Ok(response) => response.into_inner(),
            Err(status) if is_refusal(status.code()) => {
                return SessionEnd::Refused(format!("{:?}: {}", status.code(), status.message()))
            }
            Err(status) => {
                return SessionEnd::Dropped(format!(
                    "opening the session: {:?}: {}",
                    status.code(),
                    status.message()
                ))
            }
        };
        backoff.reset();
        tracing::info!(host_id = %credential.host_id, "control stream connected to {}", self.endpoint.url());
        let mut connected = event(
            "stream.connected",
            EventLevel::Info,
            format!("control stream connected to {}", self.endpoint.url()),
        );
        connected
            .fields
            .insert("url".into(), self.endpoint.url().to_owned());
        if let Some(dropped) = buffer.take_dropped() {
            let mut ev = event(
                "events.dropped",
                EventLevel::Warn,
                format!("{dropped} events were dropped while disconnected"),
            );
            ev.fields.insert("count".into(), dropped.to_string());
            buffer.push(ev);
        }
        buffer.push(connected);
        for ev in buffer.drain() {
            if tx.send(body(agent_message::Body::Event(ev))).await.is_err() {
                return SessionEnd::Dropped("the stream closed while flushing events".to_owned());
            }
        }

        let period = self.options.heartbeat_interval;
        let mut heartbeat = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut seq = 0u64;
        let mut telemetry_sent = tokio::time::Instant::now();
        let mut goodbye: Option<proto::Error> = None;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => {
                    let _ = tx.try_send(body(agent_message::Body::Event(event("agent.stopping", EventLevel::Info, "gstacks-agent is shutting down"))));
                    return SessionEnd::Shutdown;
                }
                _ = heartbeat.tick() => {
                    seq += 1;
                    let fresh = if telemetry_sent.elapsed() >= self.options.telemetry_interval {
                        telemetry_sent = tokio::time::Instant::now();
                        Some(telemetry.current().await)
                    } else {
                        None
                    };
                    let beat = Heartbeat { seq, sent_at_ms: crate::lock::now_ms(), telemetry: fresh };
                    if tx.send(body(agent_message::Body::Heartbeat(beat))).await.is_err() {
                        return SessionEnd::Dropped("the stream closed".to_owned());
                    }
                }
                Some(message) = self.outbox.recv() => {
                    if let Err(mpsc::error::SendError(message)) = tx.send(message).await {
                        buffer.keep(message);
                        return SessionEnd::Dropped("the stream closed".to_owned());
                    }
                }
                received = inbound.message() => match received {
                    Ok(Some(message)) => match message.body {
                        Some(control_message::Body::Command(command)) => {
                            if let Some(reply) = dispatcher.dispatch(command) {
                                if tx.send(body(agent_message::Body::Reply(reply))).await.is_err() {
                                    return SessionEnd::Dropped("the stream closed".to_owned());
                                }
                            }
                        }
                        Some(control_message::Body::Netmap(netmap)) => {
                            tracing::debug!(topology_version = netmap.topology_version, "netmap received");
                            self.netmap_tx.send_replace(Some(netmap));
                        }
                        Some(control_message::Body::Goodbye(bye)) => {
                            let reason = bye.reason.unwrap_or_default();
                            if reason.code == ErrorCode::PermissionDenied as i32 {
                                // Said once, with the stop, by the caller.
                                tracing::debug!("control plane says goodbye: {}", reason.message);
                            } else {
                                tracing::info!("control plane says goodbye: {}", reason.message);
                            }
                            goodbye = Some(reason);
                        }
                        None => tracing::debug!("ignoring a control message of a kind unknown to this build"),
                    },
                    Ok(None) => {
                        return match goodbye {
                            Some(reason) if reason.code == ErrorCode::PermissionDenied as i32 => SessionEnd::Refused(format!("goodbye: {}", reason.message)),
                            Some(reason) => SessionEnd::Dropped(format!("the control plane closed the stream: {}", reason.message)),
                            None => SessionEnd::Dropped("the control plane closed the stream".to_owned()),
                        };
                    }
                    Err(status) if is_refusal(status.code()) => {
                        return SessionEnd::Refused(format!("{:?}: {}", status.code(), status.message()));
                    }
                    Err(status) => return SessionEnd::Dropped(format!("{:?}: {}", status.code(), status.message())),
                },
            }
        }
    }
}

enum SessionEnd {
    Shutdown,
    Refused(String),
    Dropped(String),
}

fn body(body: agent_message::Body) -> AgentMessage {
    AgentMessage { body: Some(body) }
}

fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// Events kept while disconnected: bounded, oldest dropped first.
#[derive(Debug)]
pub struct EventBuffer {
    events: VecDeque<Event>,
    capacity: usize,
    dropped: u64,
}

impl EventBuffer {
    pub fn new(capacity: usize) -> Self {
        Self {
            events: VecDeque::new(),
            capacity: capacity.max(1),
            dropped: 0,
        }
    }

    pub fn push(&mut self, event: Event) {
        if self.events.len() == self.capacity {
            self.events.pop_front();
            self.dropped += 1;
        }
        self.events.push_back(event);
    }

    /// Keeps an outbox message while disconnected: events are buffered,
    /// replies dropped (their stream is gone).
    pub fn keep(&mut self, message: AgentMessage) {
        match message.body {
            // Output of a terminal whose reader went with the stream.
            Some(agent_message::Body::Event(Event {
                payload: Some(proto::event::Payload::TerminalOutput(_)),
                ..
            })) => {}
            Some(agent_message::Body::Event(event)) => self.push(event),
            Some(agent_message::Body::Reply(reply)) => {
                tracing::debug!(request_id = %reply.request_id, "dropping a reply: its stream is gone");
            }
            _ => {}
        }
    }

    pub fn take_dropped(&mut self) -> Option<u64> {
        (self.dropped > 0).then(|| std::mem::take(&mut self.dropped))
    }

    pub fn drain(&mut self) -> impl Iterator<Item = Event> + '_ {
        self.events.drain(..)
    }

    pub fn len(&self) -> usize {
        self.events.len()
    }

    pub fn is_empty(&self) -> bool {
        self.events.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_buffer_is_bounded_and_counts_drops() {
        let mut b = EventBuffer::new(3);
        for i in 0..5 {
            b.push(event(&format!("e{i}"), EventLevel::Info, ""));
        }
        assert_eq!(b.len(), 3);
        assert_eq!(b.take_dropped(), Some(2));
        assert_eq!(b.take_dropped(), None);
        let kinds: Vec<_> = b.drain().map(|e| e.kind).collect();
        assert_eq!(kinds, ["e2", "e3", "e4"]);
        b.keep(AgentMessage {
            body: Some(agent_message::Body::Reply(proto::Reply::default())),
        });
        let mut output = event("terminal.output", EventLevel::Debug, "");
        output.payload = Some(proto::event::Payload::TerminalOutput(
            proto::TerminalOutput::default(),
        ));
        b.keep(AgentMessage {
            body: Some(agent_message::Body::Event(output)),
        });
        assert!(b.is_empty());
    }

    #[test]
    fn refusal_codes() {
        assert!(is_refusal(tonic::Code::PermissionDenied));
        assert!(is_refusal(tonic::Code::Unauthenticated));
        assert!(!is_refusal(tonic::Code::Unavailable));
    }

    #[test]
    fn enroll_errors_are_split_into_retry_and_refusal() {
        let retry = classify_enroll_error("u", &tonic::Status::unavailable("down"));
        assert!(matches!(retry, AgentError::Transport { .. }));
        for status in [
            tonic::Status::permission_denied("token revoked"),
            tonic::Status::unauthenticated("bad token"),
            tonic::Status::invalid_argument("malformed"),
            tonic::Status::failed_precondition("expired"),
        ] {
            let err = classify_enroll_error("u", &status);
            assert!(matches!(err, AgentError::EnrollRefused { .. }), "{err}");
        }
    }

    #[test]
    fn https_needs_a_readable_pem() {
        let url: http::Uri = "https://127.0.0.1:1".parse().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let trust = |ca: &std::path::Path| TlsTrust {
            ca_file: Some(ca.to_owned()),
            fingerprint: None,
        };
        let missing = dir.path().join("nope.pem");
        let err = ControlEndpoint::new(&url, &trust(&missing))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(CONTROL_CA_FILE) && err.contains("nope.pem"),
            "{err}"
        );
        let garbage = dir.path().join("garbage.pem");
        std::fs::write(&garbage, "hello").unwrap();
        let err = ControlEndpoint::new(&url, &trust(&garbage))
            .unwrap_err()
            .to_string();
        assert!(err.contains("no PEM certificate"), "{err}");
        let plain: http::Uri = "http://127.0.0.1:1".parse().unwrap();
        assert!(ControlEndpoint::new(&plain, &TlsTrust::default()).is_ok());
        let pinned = TlsTrust {
            ca_file: None,
            fingerprint: Some([7; 32]),
        };
        assert!(ControlEndpoint::new(&url, &pinned).is_ok());
    }
}
