//! Break-glass host terminal, control side: relays an operator's
//! `HostTerminal` call to the host's stream as `HostTerminalOpen`,
//! `TerminalInput`, `TerminalResize`, `TerminalClose` commands, and the
//! agent's `TerminalOutput`/`TerminalExit` events back. Every session is
//! recorded (reason, who, when) and ends by itself at its time limit.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;
use tonic::{Status, Streaming};

use crate::error::ControlError;
use crate::plane::{control_event, ControlPlane};
use crate::sessions::{HostSession, TerminalFeed};
use proto::terminal_client_message::Body as ClientBody;
use proto::terminal_server_message::Body as ServerBody;
use proto::{command, EventLevel, TerminalClientMessage, TerminalServerMessage};

/// Time the agent has to open the PTY.
const OPEN_DEADLINE: Duration = Duration::from_secs(15);
/// Output chunks buffered between the host stream and the operator.
const FEED_QUEUE: usize = 64;
/// Longest accepted reason.
const MAX_REASON: usize = 1024;

pub type ServerSender = mpsc::Sender<Result<TerminalServerMessage, Status>>;

fn server(body: ServerBody) -> Result<TerminalServerMessage, Status> {
    Ok(TerminalServerMessage { body: Some(body) })
}

/// An opened session, ready to relay.
pub struct OpenTerminal {
    session_id: String,
    host: Arc<HostSession>,
    feed: mpsc::Receiver<TerminalFeed>,
    expires_in: Duration,
    who: String,
    /// "host terminal", or "sandbox terminal of sbx_..." (in recorded events).
    label: String,
}

impl OpenTerminal {
    /// A session opened elsewhere (a sandbox's terminal), relayed the same way.
    pub fn new(
        session_id: String,
        host: Arc<HostSession>,
        feed: mpsc::Receiver<TerminalFeed>,
        expires_in: Duration,
        who: String,
        label: String,
    ) -> OpenTerminal {
        OpenTerminal {
            session_id,
            host,
            feed,
            expires_in,
            who,
            label,
        }
    }
}

/// Reads the `open` message, checks it, and opens the PTY on the host.
pub async fn open(
    plane: &ControlPlane,
    who: String,
    client: &mut Streaming<TerminalClientMessage>,
) -> Result<OpenTerminal, Status> {
    let first = client.message().await?.ok_or_else(|| {
        Status::invalid_argument("terminal stream closed before its open message")
    })?;
    let Some(ClientBody::Open(open)) = first.body else {
        return Err(Status::invalid_argument(
            "the first message of a host terminal must be `open`",
        ));
    };
    if !open.sandbox_id.trim().is_empty() {
        return crate::sandbox_io::open_terminal(plane, who, open).await;
    }
    let reason = open.reason.trim().to_owned();
    if reason.is_empty() {
        return Err(Status::invalid_argument(
            "a reason is required (`--reason TEXT`): host terminals are break-glass and recorded",
        ));
    }
    if reason.len() > MAX_REASON {
        return Err(Status::invalid_argument(format!(
            "reason is {} bytes long; at most {MAX_REASON}",
            reason.len()
        )));
    }
    let record = plane
        .store
        .host(&open.host_id)?
        .ok_or_else(|| ControlError::HostNotFound(open.host_id.clone()))?;
    let host = plane.sessions.get(&record.id).ok_or_else(|| {
        Status::from(ControlError::HostNotConnected {
            id: record.id.clone(),
            status: record.status.as_str(),
        })
    })?;
    let limit = plane.settings.terminal_max_duration;
    let expires_in = match open.max_duration_secs {
        0 => limit,
        secs => Duration::from_secs(u64::from(secs)).min(limit),
    };
    let size = open.size.unwrap_or_default();
    let session_id = crate::secret::new_id("trm");
    let (feed_tx, feed) = mpsc::channel(FEED_QUEUE);
    host.attach_terminal(&session_id, feed_tx);
    let opened = host
        .request(
            command::Kind::HostTerminalOpen(proto::HostTerminalOpen {
                session_id: session_id.clone(),
                reason: reason.clone(),
                requested_by: who.clone(),
                cols: size.cols,
                rows: size.rows,
                max_duration_secs: u32::try_from(expires_in.as_secs()).unwrap_or(u32::MAX),
                command: open.command.clone(),
            }),
            OPEN_DEADLINE,
        )
        .await;
    if let Err(err) = opened {
        host.detach_terminal(&session_id);
        plane.record_event(
            &record.id,
            control_event(
                "terminal.refused",
                EventLevel::Warn,
                format!("host terminal for {who} not opened: {err}"),
            ),
        );
        return Err(err.into());
    }
    let mut event = control_event(
        "terminal.opened",
        EventLevel::Warn,
        format!("host terminal opened by {who}: {reason}"),
    );
    event.request_id = session_id.clone();
    event.fields = HashMap::from([
        ("session_id".to_owned(), session_id.clone()),
        ("reason".to_owned(), reason),
        ("requested_by".to_owned(), who.clone()),
        (
            "max_duration_secs".to_owned(),
            expires_in.as_secs().to_string(),
        ),
    ]);
    plane.record_event(&record.id, event);
    tracing::info!(host = %record.id, session_id, who, "host terminal opened");
    Ok(OpenTerminal {
        session_id,
        host,
        feed,
        expires_in,
        who,
        label: "host terminal".to_owned(),
    })
}

/// Relays until the shell exits, the session expires, the host's stream
/// ends, or the operator goes away; then records how it ended.
pub async fn relay(
    plane: Arc<ControlPlane>,
    terminal: OpenTerminal,
    mut client: Streaming<TerminalClientMessage>,
    out: ServerSender,
) {
    let OpenTerminal {
        session_id,
        host,
        mut feed,
        expires_in,
        who,
        label,
    } = terminal;
    let _ = out
        .send(server(ServerBody::Opened(proto::TerminalOpened {
            session_id: session_id.clone(),
        })))
        .await;
    let expires_at = Instant::now() + expires_in;
    let mut client_open = true;
    let mut close_on_host = true;
    let outcome = loop {
        tokio::select! {
            item = feed.recv() => match item {
                Some(TerminalFeed::Output(data)) => {
                    if out.send(server(ServerBody::Output(data))).await.is_err() {
                        break "the operator went away".to_owned();
                    }
                }
                Some(TerminalFeed::Exit(exit)) => {
                    close_on_host = false;
                    let outcome = format!("shell exited with code {}", exit.exit_code);
                    let _ = out.send(server(ServerBody::Exit(exit))).await;
                    break outcome;
                }
                Some(TerminalFeed::Closed(why)) => {
                    close_on_host = false;
                    let reason = format!("the host's stream closed: {why}");
                    let _ = out.send(server(ServerBody::Closed(closed(&session_id, &reason)))).await;
                    break reason;
                }
                None => {
                    close_on_host = false;
                    let reason = "the host's stream closed".to_owned();
                    let _ = out.send(server(ServerBody::Closed(closed(&session_id, &reason)))).await;
                    break reason;
                }
            },
            message = client.message(), if client_open => match message {
                Ok(Some(TerminalClientMessage { body: Some(ClientBody::Input(data)) })) => {
                    let input = command::Kind::TerminalInput(proto::TerminalInput {
                        session_id: session_id.clone(),
                        data,
                    });
                    if host.send_command(input).await.is_err() {
                        close_on_host = false;
                        let _ = out.send(server(ServerBody::Closed(closed(&session_id, "the host's stream closed")))).await;
                        break "the host's stream closed".to_owned();
                    }
                }
                Ok(Some(TerminalClientMessage { body: Some(ClientBody::Resize(size)) })) => {
                    let resize = command::Kind::TerminalResize(proto::TerminalResize {
                        session_id: session_id.clone(),
                        cols: size.cols,
                        rows: size.rows,
                    });
                    let _ = host.send_command(resize).await;
                }
                Ok(Some(_)) => {
                    tracing::debug!(session_id, "ignored terminal message (second open or unknown kind)");
                }
                // Half-close: the operator has no more input (a script's
                // stdin ended); output and the exit status still come.
                Ok(None) => client_open = false,
                Err(status) => break format!("the operator's stream broke: {}", status.message()),
            },
            () = tokio::time::sleep_until(expires_at) => {
                let reason = format!("the session reached its time limit of {} s", expires_in.as_secs());
                let _ = out.send(server(ServerBody::Closed(closed(&session_id, &reason)))).await;
                break reason;
            }
            () = out.closed() => break "the operator went away".to_owned(),
        }
    };
    host.detach_terminal(&session_id);
    if close_on_host {
        let close = command::Kind::TerminalClose(proto::TerminalClose {
            session_id: session_id.clone(),
        });
        if let Err(err) = host.request(close, Duration::from_secs(5)).await {
            tracing::debug!(session_id, error = %err, "terminal close not confirmed");
        }
    }
    let mut event = control_event(
        "terminal.closed",
        EventLevel::Info,
        format!("{label} of {who} closed: {outcome}"),
    );
    event.request_id = session_id.clone();
    event.fields = HashMap::from([
        ("session_id".to_owned(), session_id.clone()),
        ("requested_by".to_owned(), who),
        ("outcome".to_owned(), outcome),
    ]);
    plane.record_event(&host.host_id, event);
}

fn closed(session_id: &str, reason: &str) -> proto::TerminalClosed {
    proto::TerminalClosed {
        session_id: session_id.to_owned(),
        reason: reason.to_owned(),
    }
}
