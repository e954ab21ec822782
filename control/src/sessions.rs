//! Connected hosts: one [`HostSession`] per open `Session` stream. Through
//! it the control plane sends commands and awaits their replies (correlated
//! by request id, with a deadline), routes streamed terminal output, and
//! closes the stream on purpose (revocation).

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch};
use tonic::Status;

use crate::error::{ControlError, Result};
use proto::{command, reply, Command, CommandResult, ControlMessage, Reply, TerminalExit};

/// Messages the session task writes to the agent.
pub type Outbound = mpsc::Sender<Result<ControlMessage, Status>>;

/// Why the control plane ends a stream on purpose.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloseReason {
    pub code: proto::ErrorCode,
    pub message: String,
}

impl CloseReason {
    pub fn permission_denied(message: impl Into<String>) -> CloseReason {
        CloseReason {
            code: proto::ErrorCode::PermissionDenied,
            message: message.into(),
        }
    }

    /// The status that ends the stream after the goodbye.
    pub fn status(&self) -> Status {
        match self.code {
            proto::ErrorCode::PermissionDenied => Status::permission_denied(self.message.clone()),
            proto::ErrorCode::Timeout => Status::deadline_exceeded(self.message.clone()),
            proto::ErrorCode::Unavailable => Status::unavailable(self.message.clone()),
            _ => Status::aborted(self.message.clone()),
        }
    }

    pub fn goodbye(&self) -> ControlMessage {
        ControlMessage {
            body: Some(proto::control_message::Body::Goodbye(proto::Goodbye {
                reason: Some(proto::Error {
                    code: self.code as i32,
                    message: self.message.clone(),
                }),
            })),
        }
    }
}

/// What a terminal session hears from its host.
#[derive(Debug, Clone, PartialEq)]
pub enum TerminalFeed {
    Output(Vec<u8>),
    Exit(TerminalExit),
    /// The host's stream ended (revoked, disconnected, replaced).
    Closed(String),
}

/// What a sandbox stream (logs, a download) hears from its host.
#[derive(Debug, Clone, PartialEq)]
pub enum StreamFeed {
    Chunk(proto::SandboxStreamChunk),
    End(proto::SandboxStreamEnd),
    /// The host's stream ended (revoked, disconnected, replaced).
    Closed(String),
}

/// One open control stream of a host.
pub struct HostSession {
    pub host_id: String,
    conn_id: u64,
    outbound: Outbound,
    pending: Mutex<HashMap<String, oneshot::Sender<Reply>>>,
    terminals: Mutex<HashMap<String, mpsc::Sender<TerminalFeed>>>,
    streams: Mutex<HashMap<String, mpsc::Sender<StreamFeed>>>,
    next_request: AtomicU64,
    close: watch::Sender<Option<CloseReason>>,
    last_seen_ms: AtomicI64,
}

impl std::fmt::Debug for HostSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostSession")
            .field("host_id", &self.host_id)
            .field("conn_id", &self.conn_id)
            .finish_non_exhaustive()
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Maps stay consistent across a panic (single inserts and removes).
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Default time to wait for a reply when the caller names none.
pub const DEFAULT_COMMAND_DEADLINE: Duration = Duration::from_secs(30);

impl HostSession {
    /// This stream's number: a reconnect of the same host gets a new one.
    pub fn conn_id(&self) -> u64 {
        self.conn_id
    }

    /// Queues a message without waiting: false when the queue is full or
    /// the stream is gone (netmaps are superseded by the next one anyway).
    pub fn try_send(&self, message: ControlMessage) -> Result<(), TrySendError> {
        match self.outbound.try_send(Ok(message)) {
            Ok(()) => Ok(()),
            Err(mpsc::error::TrySendError::Full(_)) => Err(TrySendError::Full),
            Err(mpsc::error::TrySendError::Closed(_)) => Err(TrySendError::Closed),
        }
    }

    pub fn last_seen_ms(&self) -> i64 {
        self.last_seen_ms.load(Ordering::Relaxed)
    }

    pub fn touch(&self, now_ms: i64) {
        self.last_seen_ms.fetch_max(now_ms, Ordering::Relaxed);
    }

    /// Asks the session task to say goodbye and end the stream.
    pub fn close(&self, reason: CloseReason) {
        self.close.send_if_modified(|current| {
            if current.is_none() {
                *current = Some(reason);
                true
            } else {
                false
            }
        });
    }

    pub fn close_signal(&self) -> watch::Receiver<Option<CloseReason>> {
        self.close.subscribe()
    }

    fn next_request_id(&self) -> String {
        format!(
            "req-{}",
            self.next_request.fetch_add(1, Ordering::Relaxed) + 1
        )
    }

    fn command(request_id: String, deadline: Duration, kind: command::Kind) -> ControlMessage {
        ControlMessage {
            body: Some(proto::control_message::Body::Command(Command {
                request_id,
                deadline_ms: u32::try_from(deadline.as_millis()).unwrap_or(u32::MAX),
                kind: Some(kind),
            })),
        }
    }

    /// Sends a command and waits up to `deadline` for its reply.
    pub async fn request(&self, kind: command::Kind, deadline: Duration) -> Result<CommandResult> {
        let request_id = self.next_request_id();
        let (tx, rx) = oneshot::channel();
        lock(&self.pending).insert(request_id.clone(), tx);
        let message = Self::command(request_id.clone(), deadline, kind);
        let outcome = tokio::time::timeout(deadline, async {
            self.outbound
                .send(Ok(message))
                .await
                .map_err(|_| ControlError::SessionClosed(self.host_id.clone()))?;
            rx.await
                .map_err(|_| ControlError::SessionClosed(self.host_id.clone()))
        })
        .await;
        lock(&self.pending).remove(&request_id);
        let reply = match outcome {
            Ok(reply) => reply?,
            Err(_) => {
                return Err(ControlError::CommandTimeout {
                    host: self.host_id.clone(),
                    request_id,
                    deadline_ms: deadline.as_millis() as u64,
                })
            }
        };
        self.reply_outcome(request_id, reply)
    }

    /// Sends a command now and returns the wait for its reply, so that a
    /// caller can keep several commands in flight while their order on the
    /// stream is the order of these calls (upload chunks).
    pub async fn send_request(
        self: &Arc<Self>,
        kind: command::Kind,
        deadline: Duration,
    ) -> Result<impl std::future::Future<Output = Result<CommandResult>> + Send + 'static> {
        let request_id = self.next_request_id();
        let (tx, rx) = oneshot::channel();
        lock(&self.pending).insert(request_id.clone(), tx);
        let message = Self::command(request_id.clone(), deadline, kind);
        if self.outbound.send(Ok(message)).await.is_err() {
            lock(&self.pending).remove(&request_id);
            return Err(ControlError::SessionClosed(self.host_id.clone()));
        }
        let session = self.clone();
        Ok(async move {
            let outcome = tokio::time::timeout(deadline, rx).await;
            lock(&session.pending).remove(&request_id);
            match outcome {
                Ok(Ok(reply)) => session.reply_outcome(request_id, reply),
                Ok(Err(_)) => Err(ControlError::SessionClosed(session.host_id.clone())),
                Err(_) => Err(ControlError::CommandTimeout {
                    host: session.host_id.clone(),
                    request_id,
                    deadline_ms: deadline.as_millis() as u64,
                }),
            }
        })
    }

    fn reply_outcome(&self, request_id: String, reply: Reply) -> Result<CommandResult> {
        match reply.outcome {
            Some(reply::Outcome::Result(result)) => Ok(result),
            Some(reply::Outcome::Error(err)) => Err(ControlError::Agent {
                host: self.host_id.clone(),
                request_id,
                code: proto::ErrorCode::try_from(err.code).unwrap_or(proto::ErrorCode::Unspecified),
                message: err.message,
            }),
            None => Err(ControlError::Agent {
                host: self.host_id.clone(),
                request_id,
                code: proto::ErrorCode::Unspecified,
                message: "reply carries neither a result nor an error".to_owned(),
            }),
        }
    }

    /// Sends a command without waiting for its reply (terminal input: the
    /// order of the stream is the order of the keystrokes).
    pub async fn send_command(&self, kind: command::Kind) -> Result<()> {
        let message = Self::command(self.next_request_id(), DEFAULT_COMMAND_DEADLINE, kind);
        self.outbound
            .send(Ok(message))
            .await
            .map_err(|_| ControlError::SessionClosed(self.host_id.clone()))
    }

    /// Hands a reply to whoever awaits it; false if nobody does.
    pub fn deliver_reply(&self, reply: Reply) -> bool {
        match lock(&self.pending).remove(&reply.request_id) {
            Some(waiter) => waiter.send(reply).is_ok(),
            None => false,
        }
    }

    /// Registers a terminal session to receive its output.
    pub fn attach_terminal(&self, session_id: &str, feed: mpsc::Sender<TerminalFeed>) {
        lock(&self.terminals).insert(session_id.to_owned(), feed);
    }

    pub fn detach_terminal(&self, session_id: &str) {
        lock(&self.terminals).remove(session_id);
    }

    /// Routes streamed terminal data to its session (awaiting room, so a
    /// slow client slows the agent down instead of growing a queue).
    pub async fn feed_terminal(&self, session_id: &str, feed: TerminalFeed) {
        let target = lock(&self.terminals).get(session_id).cloned();
        match target {
            Some(tx) => {
                if tx.send(feed).await.is_err() {
                    self.detach_terminal(session_id);
                }
            }
            None => {
                tracing::debug!(host = %self.host_id, session_id, "output for an unknown terminal session")
            }
        }
    }

    /// Registers a sandbox stream (logs, download) to receive its chunks.
    pub fn attach_stream(&self, stream_id: &str, feed: mpsc::Sender<StreamFeed>) {
        lock(&self.streams).insert(stream_id.to_owned(), feed);
    }

    pub fn detach_stream(&self, stream_id: &str) {
        lock(&self.streams).remove(stream_id);
    }

    /// Routes a stream's chunk or end to its reader. The reader's queue is
    /// larger than the agent's window, so this never waits long: the
    /// window, not this queue, bounds what is in flight.
    pub async fn feed_stream(&self, stream_id: &str, feed: StreamFeed) {
        let target = lock(&self.streams).get(stream_id).cloned();
        match target {
            Some(tx) => {
                if tx.send(feed).await.is_err() {
                    self.detach_stream(stream_id);
                }
            }
            None => {
                tracing::debug!(host = %self.host_id, stream_id, "chunk of an unknown sandbox stream")
            }
        }
    }

    /// The stream ended: waiters fail, terminals and sandbox streams hear why.
    fn finish(&self, reason: &str) {
        lock(&self.pending).clear();
        let streams: Vec<_> = lock(&self.streams).drain().map(|(_, tx)| tx).collect();
        for tx in streams {
            let _ = tx.try_send(StreamFeed::Closed(reason.to_owned()));
        }
        let terminals: Vec<_> = lock(&self.terminals).drain().map(|(_, tx)| tx).collect();
        for tx in terminals {
            // A full feed means the client is gone or stuck; it will notice
            // the closed channel instead.
            let _ = tx.try_send(TerminalFeed::Closed(reason.to_owned()));
        }
    }

    pub async fn send(&self, message: ControlMessage) -> Result<()> {
        self.outbound
            .send(Ok(message))
            .await
            .map_err(|_| ControlError::SessionClosed(self.host_id.clone()))
    }

    /// Ends the stream with `status` (after a goodbye was sent).
    pub async fn end_with(&self, status: Status) {
        let _ = self.outbound.send(Err(status)).await;
    }
}

/// Why [`HostSession::try_send`] did not queue a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TrySendError {
    Full,
    Closed,
}

/// The registry of open streams, by host id.
#[derive(Debug, Default)]
pub struct Sessions {
    hosts: Mutex<HashMap<String, Arc<HostSession>>>,
    next_conn: AtomicU64,
}

impl Sessions {
    /// Registers a new stream for `host_id`. An older stream of the same host
    /// (a reconnect before the old one timed out) is closed.
    pub fn register(&self, host_id: &str, outbound: Outbound, now_ms: i64) -> Arc<HostSession> {
        let (close, _) = watch::channel(None);
        let session = Arc::new(HostSession {
            host_id: host_id.to_owned(),
            conn_id: self.next_conn.fetch_add(1, Ordering::Relaxed),
            outbound,
            pending: Mutex::new(HashMap::new()),
            terminals: Mutex::new(HashMap::new()),
            streams: Mutex::new(HashMap::new()),
            next_request: AtomicU64::new(0),
            close,
            last_seen_ms: AtomicI64::new(now_ms),
        });
        let old = lock(&self.hosts).insert(host_id.to_owned(), session.clone());
        if let Some(old) = old {
            old.close(CloseReason {
                code: proto::ErrorCode::Unavailable,
                message: format!("host `{host_id}` opened a newer stream"),
            });
        }
        session
    }

    /// Removes the stream if it is still the current one of its host;
    /// returns whether it was (and so whether the host is now offline).
    pub fn unregister(&self, session: &HostSession, reason: &str) -> bool {
        session.finish(reason);
        let mut hosts = lock(&self.hosts);
        match hosts.get(&session.host_id) {
            Some(current) if current.conn_id == session.conn_id => {
                hosts.remove(&session.host_id);
                true
            }
            _ => false,
        }
    }

    pub fn get(&self, host_id: &str) -> Option<Arc<HostSession>> {
        lock(&self.hosts).get(host_id).cloned()
    }

    /// Closes the host's stream, if it has one.
    pub fn close(&self, host_id: &str, reason: CloseReason) -> bool {
        match self.get(host_id) {
            Some(session) => {
                session.close(reason);
                true
            }
            None => false,
        }
    }

    /// Closes every stream (shutdown).
    pub fn close_all(&self, reason: &CloseReason) {
        let all: Vec<_> = lock(&self.hosts).values().cloned().collect();
        for session in all {
            session.close(reason.clone());
        }
    }

    /// Every open stream.
    pub fn all(&self) -> Vec<Arc<HostSession>> {
        lock(&self.hosts).values().cloned().collect()
    }

    pub fn connected(&self) -> usize {
        lock(&self.hosts).len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::control_message::Body;

    fn take_command(rx: &mut mpsc::Receiver<Result<ControlMessage, Status>>) -> Command {
        match rx.try_recv().unwrap().unwrap().body {
            Some(Body::Command(c)) => c,
            other => panic!("expected a command, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn reply_is_correlated_by_request_id() {
        let sessions = Sessions::default();
        let (tx, mut rx) = mpsc::channel(8);
        let session = sessions.register("hst_a", tx, 0);
        let s2 = session.clone();
        let waiter = tokio::spawn(async move {
            s2.request(
                command::Kind::Ping(proto::Ping {
                    payload: b"x".to_vec(),
                }),
                Duration::from_secs(5),
            )
            .await
        });
        // Wait for the command to be written (an event, not a sleep).
        let cmd = loop {
            if let Ok(Ok(m)) = rx.try_recv() {
                match m.body {
                    Some(Body::Command(c)) => break c,
                    other => panic!("{other:?}"),
                }
            }
            tokio::task::yield_now().await;
        };
        assert!(!session.deliver_reply(Reply {
            request_id: "req-999".into(),
            outcome: None,
        }));
        assert!(session.deliver_reply(Reply {
            request_id: cmd.request_id.clone(),
            outcome: Some(reply::Outcome::Result(CommandResult {
                kind: Some(proto::command_result::Kind::Pong(proto::Pong {
                    payload: b"x".to_vec(),
                })),
            })),
        }));
        let result = waiter.await.unwrap().unwrap();
        assert!(matches!(
            result.kind,
            Some(proto::command_result::Kind::Pong(_))
        ));
    }

    #[tokio::test]
    async fn unanswered_request_times_out_and_error_reply_is_typed() {
        let sessions = Sessions::default();
        let (tx, mut rx) = mpsc::channel(8);
        let session = sessions.register("hst_a", tx, 0);
        let err = session
            .request(
                command::Kind::Ping(proto::Ping::default()),
                Duration::from_millis(20),
            )
            .await
            .unwrap_err();
        assert!(matches!(err, ControlError::CommandTimeout { .. }), "{err}");
        let _ = take_command(&mut rx);

        let s2 = session.clone();
        let waiter = tokio::spawn(async move {
            s2.request(
                command::Kind::Ping(proto::Ping::default()),
                Duration::from_secs(5),
            )
            .await
        });
        let cmd = loop {
            if let Ok(Ok(m)) = rx.try_recv() {
                if let Some(Body::Command(c)) = m.body {
                    break c;
                }
            }
            tokio::task::yield_now().await;
        };
        session.deliver_reply(Reply {
            request_id: cmd.request_id,
            outcome: Some(reply::Outcome::Error(proto::Error {
                code: proto::ErrorCode::PermissionDenied as i32,
                message: "host terminal disabled".into(),
            })),
        });
        let err = waiter.await.unwrap().unwrap_err();
        let status: Status = err.into();
        assert_eq!(status.code(), tonic::Code::PermissionDenied);
        assert!(status.message().contains("host terminal disabled"));
    }

    #[tokio::test]
    async fn closed_stream_fails_waiters_and_tells_terminals() {
        let sessions = Sessions::default();
        let (tx, rx) = mpsc::channel(8);
        let session = sessions.register("hst_a", tx, 0);
        let (feed_tx, mut feed_rx) = mpsc::channel(4);
        session.attach_terminal("trm_1", feed_tx);
        drop(rx);
        let err = session
            .request(
                command::Kind::Ping(proto::Ping::default()),
                Duration::from_secs(5),
            )
            .await
            .unwrap_err();
        assert!(matches!(err, ControlError::SessionClosed(_)), "{err}");
        assert!(sessions.unregister(&session, "host revoked"));
        assert_eq!(
            feed_rx.recv().await,
            Some(TerminalFeed::Closed("host revoked".into()))
        );
        assert!(sessions.get("hst_a").is_none());
    }

    #[tokio::test]
    async fn newer_stream_replaces_and_closes_the_older() {
        let sessions = Sessions::default();
        let (tx1, _rx1) = mpsc::channel(8);
        let (tx2, _rx2) = mpsc::channel(8);
        let first = sessions.register("hst_a", tx1, 0);
        let close = first.close_signal();
        let second = sessions.register("hst_a", tx2, 0);
        assert!(close.borrow().is_some());
        // The old stream ending does not take the new one offline.
        assert!(!sessions.unregister(&first, "replaced"));
        assert_eq!(sessions.connected(), 1);
        assert!(sessions.unregister(&second, "gone"));
        assert_eq!(sessions.connected(), 0);
    }
}
