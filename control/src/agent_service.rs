//! `AgentService`: enrollment and the one control stream per host.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::clock::now_ms;
use crate::plane::{control_event, ControlPlane};
use crate::sessions::{CloseReason, HostSession, StreamFeed, TerminalFeed};
use proto::agent_message::Body;
use proto::agent_service_server::AgentService;
use proto::{event, AgentMessage, ControlMessage, EnrollRequest, EnrollResponse, EventLevel};

/// Outbound queue per stream: commands and netmaps waiting for the agent.
const OUTBOUND_QUEUE: usize = 256;
/// Heartbeats refresh the stored last-seen time at most this often (the
/// live value is kept in memory and shown by the API).
const LAST_SEEN_PERSIST_EVERY_MS: i64 = 10_000;

#[derive(Debug, Clone)]
pub struct AgentApi {
    plane: Arc<ControlPlane>,
}

impl AgentApi {
    pub fn new(plane: Arc<ControlPlane>) -> AgentApi {
        AgentApi { plane }
    }
}

type SessionStream = Pin<Box<dyn Stream<Item = Result<ControlMessage, Status>> + Send>>;

#[tonic::async_trait]
impl AgentService for AgentApi {
    async fn enroll(
        &self,
        request: Request<EnrollRequest>,
    ) -> Result<Response<EnrollResponse>, Status> {
        let request = request.into_inner();
        let enrolled = self
            .plane
            .enroll(&request.provisioning_token, request.facts.unwrap_or_default())
            .inspect_err(|status| {
                tracing::info!(code = ?status.code(), reason = %status.message(), "enrollment refused");
            })?;
        Ok(Response::new(EnrollResponse {
            host_id: enrolled.host.id,
            stream_credential: enrolled.credential.expose().to_owned(),
            cluster_id: enrolled.host.cluster_id,
            host_name: enrolled.host.name,
        }))
    }

    type SessionStream = SessionStream;

    async fn session(
        &self,
        request: Request<Streaming<AgentMessage>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        let host = self
            .plane
            .authenticate_host(request.metadata())
            .inspect_err(|status| {
                tracing::info!(code = ?status.code(), reason = %status.message(), "stream refused");
            })?;
        let mut inbound = request.into_inner();
        let hello = match tokio::time::timeout(self.plane.settings.hello_timeout, inbound.message())
            .await
        {
            Err(_) => {
                return Err(Status::deadline_exceeded(format!(
                    "no hello within {} s",
                    self.plane.settings.hello_timeout.as_secs()
                )))
            }
            Ok(Err(status)) => return Err(status),
            Ok(Ok(None)) => return Err(Status::cancelled("stream closed before its hello")),
            Ok(Ok(Some(AgentMessage {
                body: Some(Body::Hello(hello)),
            }))) => hello,
            Ok(Ok(Some(_))) => {
                return Err(Status::invalid_argument(
                    "the first message of a session must be a hello",
                ))
            }
        };
        let telemetry = hello.telemetry.unwrap_or_default();
        let (tx, rx) = mpsc::channel(OUTBOUND_QUEUE);
        let now = now_ms();
        let session = self.plane.sessions.register(&host.id, tx, now);
        let connected = match self
            .plane
            .store
            .set_host_connected(&host.id, &telemetry, now)
        {
            Ok(connected) => connected,
            Err(err) => {
                self.plane.sessions.unregister(&session, "store error");
                return Err(err.into());
            }
        };
        if !connected {
            // Revoked between the credential check and now.
            self.plane.sessions.unregister(&session, "revoked");
            let host = self.plane.store.host(&host.id).map_err(Status::from)?;
            return Err(Status::permission_denied(format!(
                "host `{}` was revoked{}",
                session.host_id,
                host.map(|h| format!(" ({})", h.revoked_reason))
                    .unwrap_or_default()
            )));
        }
        self.plane.record_event(
            &host.id,
            control_event(
                "host.connected",
                EventLevel::Info,
                format!(
                    "stream open (agent {}, {} {})",
                    telemetry.agent_version, telemetry.os, telemetry.arch
                ),
            ),
        );
        tracing::info!(host = %host.id, name = %host.name, "host connected");
        self.plane.agent_hello(&host.id, hello.mesh.as_ref());
        tokio::spawn(run_session(self.plane.clone(), session.clone(), inbound));
        // Rediscovery: the agent reports its managed containers, the
        // records are rebound (needs the session loop above for the reply);
        // then again every `sandbox_resync` while this stream is the host's.
        let plane = self.plane.clone();
        tokio::spawn(async move {
            let mut close = session.close_signal();
            loop {
                plane.reconcile_sandboxes(session.clone()).await;
                tokio::select! {
                    () = tokio::time::sleep(plane.settings.sandbox_resync) => {}
                    _ = close.changed() => return,
                }
                match plane.sessions.get(&session.host_id) {
                    Some(current) if Arc::ptr_eq(&current, &session) => {}
                    _ => return,
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// Why a session loop ended.
enum Ended {
    /// The agent closed its side or the connection broke.
    Agent(String),
    /// The control plane closed it on purpose.
    Closed(CloseReason),
}

async fn run_session(
    plane: Arc<ControlPlane>,
    session: Arc<HostSession>,
    mut inbound: Streaming<AgentMessage>,
) {
    let timeout = plane.settings.heartbeat_timeout;
    let mut close = session.close_signal();
    // A close asked for before this loop subscribed must not be missed.
    close.mark_changed();
    let mut silent_since = Instant::now();
    let mut persisted_ms = now_ms();
    let ended = loop {
        tokio::select! {
            biased;
            changed = close.changed() => {
                let reason = close.borrow().clone();
                match (changed, reason) {
                    (Ok(()), Some(reason)) => break Ended::Closed(reason),
                    (Ok(()), None) => continue,
                    // The session itself is gone; cannot happen while we hold it.
                    (Err(_), _) => break Ended::Agent("session dropped".to_owned()),
                }
            }
            () = tokio::time::sleep_until(silent_since + timeout) => {
                break Ended::Closed(CloseReason {
                    code: proto::ErrorCode::Timeout,
                    message: format!("no heartbeat from host `{}` within {} s", session.host_id, timeout.as_secs()),
                });
            }
            message = inbound.message() => match message {
                Ok(Some(message)) => {
                    silent_since = Instant::now();
                    let now = now_ms();
                    session.touch(now);
                    handle_message(&plane, &session, message, now, &mut persisted_ms).await;
                }
                Ok(None) => break Ended::Agent("stream closed by the agent".to_owned()),
                Err(status) => break Ended::Agent(format!("stream broke: {}", status.message())),
            },
        }
    };
    let reason = match ended {
        Ended::Closed(reason) => {
            // Say why, then end the stream with the matching status.
            let _ = session.send(reason.goodbye()).await;
            session.end_with(reason.status()).await;
            reason.message
        }
        Ended::Agent(reason) => reason,
    };
    let now = now_ms();
    if plane.sessions.unregister(&session, &reason) {
        if let Err(err) = plane.store.set_host_disconnected(&session.host_id, now) {
            tracing::warn!(host = %session.host_id, error = %err, "host not marked disconnected");
        }
        plane.record_event(
            &session.host_id,
            control_event("host.disconnected", EventLevel::Info, reason.clone()),
        );
    }
    tracing::info!(host = %session.host_id, reason, "host stream ended");
}

async fn handle_message(
    plane: &ControlPlane,
    session: &HostSession,
    message: AgentMessage,
    now: i64,
    persisted_ms: &mut i64,
) {
    match message.body {
        Some(Body::Heartbeat(heartbeat)) => {
            let telemetry = heartbeat.telemetry.as_ref();
            if telemetry.is_some() || now - *persisted_ms >= LAST_SEEN_PERSIST_EVERY_MS {
                match plane
                    .store
                    .record_heartbeat(&session.host_id, telemetry, now)
                {
                    Ok(()) => *persisted_ms = now,
                    Err(err) => {
                        tracing::warn!(host = %session.host_id, error = %err, "heartbeat not stored")
                    }
                }
            }
        }
        Some(Body::Event(event)) => match event.payload {
            Some(event::Payload::TerminalOutput(output)) => {
                session
                    .feed_terminal(&output.session_id, TerminalFeed::Output(output.data))
                    .await;
            }
            Some(event::Payload::TerminalExit(exit)) => {
                let id = exit.session_id.clone();
                session.feed_terminal(&id, TerminalFeed::Exit(exit)).await;
            }
            Some(event::Payload::SandboxStreamChunk(chunk)) => {
                let id = chunk.stream_id.clone();
                session.feed_stream(&id, StreamFeed::Chunk(chunk)).await;
            }
            Some(event::Payload::SandboxStreamEnd(end)) => {
                let id = end.stream_id.clone();
                session.feed_stream(&id, StreamFeed::End(end)).await;
            }
            Some(event::Payload::SandboxRepoStatus(status)) => {
                plane.sandbox_repo_reported(&session.host_id, status).await;
            }
            None => {
                let mut event = event;
                if event.at_ms == 0 {
                    event.at_ms = now;
                }
                if event.kind == crate::networks::DENIED_EVENT {
                    plane.count_denied_connection(&event);
                }
                plane.record_event(&session.host_id, event);
            }
        },
        Some(Body::Reply(reply)) => {
            let request_id = reply.request_id.clone();
            if !session.deliver_reply(reply) {
                tracing::debug!(host = %session.host_id, request_id, "reply nobody awaits");
            }
        }
        Some(Body::Hello(hello)) => {
            plane.agent_hello(&session.host_id, hello.mesh.as_ref());
            if let Some(telemetry) = hello.telemetry {
                if let Err(err) =
                    plane
                        .store
                        .record_heartbeat(&session.host_id, Some(&telemetry), now)
                {
                    tracing::warn!(host = %session.host_id, error = %err, "telemetry not stored");
                }
            }
        }
        None => {
            tracing::debug!(host = %session.host_id, "agent message of a kind this control plane does not know");
        }
    }
}

/// Default heartbeat window, exposed for the CLI's help text.
pub const DEFAULT_HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(30);
