//! Command dispatch: modules register for the command kinds they own; each
//! command goes to its module, and the module's answer goes back as a
//! `Reply` carrying the command's request id.
//!
//! - A command whose kind is unset (unknown to this build) or that no module
//!   registered for is answered `ERROR_CODE_UNSUPPORTED` at once.
//! - Each module has a bounded queue and one worker. By default a module sees
//!   its commands one at a time, in arrival order (terminal input must not be
//!   reordered); a module registered with [`Concurrency::Parallel`] runs up to
//!   `n` at once. A full queue is answered `ERROR_CODE_UNAVAILABLE` instead of
//!   stalling the stream for every other module.
//! - Each command runs in its own task. A handler that returns an error
//!   answers with it; one that panics answers `ERROR_CODE_INTERNAL` (the
//!   panic is caught through the task's `JoinError`); one that overruns the
//!   command's `deadline_ms` is aborted and answers `ERROR_CODE_TIMEOUT`.
//!   In every case the worker and the stream carry on.
//!
//! This module does no network IO: replies and events leave through a
//! [`Link`], a bounded channel that the control-stream client drains.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use proto::{
    agent_message, command, command_result, reply, AgentMessage, Command, CommandResult, ErrorCode,
    Event, EventLevel, Reply,
};
use tokio::sync::{mpsc, watch, Semaphore};

/// The kinds of commands, one per case of the `Command.kind` oneof.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CommandKind {
    Ping,
    HostTerminalOpen,
    TerminalInput,
    TerminalResize,
    TerminalClose,
    NetworkDiagnose,
    SandboxCreate,
    SandboxStart,
    SandboxStop,
    SandboxRemove,
    SandboxInspect,
    SandboxList,
    SandboxLogs,
    SandboxTerminalOpen,
    SandboxFilesList,
    SandboxFileGet,
    SandboxStreamAck,
    SandboxStreamCancel,
    SandboxFilePutOpen,
    SandboxFilePutChunk,
    SandboxRepoClone,
}

impl CommandKind {
    pub fn of(kind: &command::Kind) -> Self {
        match kind {
            command::Kind::Ping(_) => Self::Ping,
            command::Kind::HostTerminalOpen(_) => Self::HostTerminalOpen,
            command::Kind::TerminalInput(_) => Self::TerminalInput,
            command::Kind::TerminalResize(_) => Self::TerminalResize,
            command::Kind::TerminalClose(_) => Self::TerminalClose,
            command::Kind::NetworkDiagnose(_) => Self::NetworkDiagnose,
            command::Kind::SandboxCreate(_) => Self::SandboxCreate,
            command::Kind::SandboxStart(_) => Self::SandboxStart,
            command::Kind::SandboxStop(_) => Self::SandboxStop,
            command::Kind::SandboxRemove(_) => Self::SandboxRemove,
            command::Kind::SandboxInspect(_) => Self::SandboxInspect,
            command::Kind::SandboxList(_) => Self::SandboxList,
            command::Kind::SandboxLogs(_) => Self::SandboxLogs,
            command::Kind::SandboxTerminalOpen(_) => Self::SandboxTerminalOpen,
            command::Kind::SandboxFilesList(_) => Self::SandboxFilesList,
            command::Kind::SandboxFileGet(_) => Self::SandboxFileGet,
            command::Kind::SandboxStreamAck(_) => Self::SandboxStreamAck,
            command::Kind::SandboxStreamCancel(_) => Self::SandboxStreamCancel,
            command::Kind::SandboxFilePutOpen(_) => Self::SandboxFilePutOpen,
            command::Kind::SandboxFilePutChunk(_) => Self::SandboxFilePutChunk,
            command::Kind::SandboxRepoClone(_) => Self::SandboxRepoClone,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Ping => "ping",
            Self::HostTerminalOpen => "host_terminal_open",
            Self::TerminalInput => "terminal_input",
            Self::TerminalResize => "terminal_resize",
            Self::TerminalClose => "terminal_close",
            Self::NetworkDiagnose => "network_diagnose",
            Self::SandboxCreate => "sandbox_create",
            Self::SandboxStart => "sandbox_start",
            Self::SandboxStop => "sandbox_stop",
            Self::SandboxRemove => "sandbox_remove",
            Self::SandboxInspect => "sandbox_inspect",
            Self::SandboxList => "sandbox_list",
            Self::SandboxLogs => "sandbox_logs",
            Self::SandboxTerminalOpen => "sandbox_terminal_open",
            Self::SandboxFilesList => "sandbox_files_list",
            Self::SandboxFileGet => "sandbox_file_get",
            Self::SandboxStreamAck => "sandbox_stream_ack",
            Self::SandboxStreamCancel => "sandbox_stream_cancel",
            Self::SandboxFilePutOpen => "sandbox_file_put_open",
            Self::SandboxFilePutChunk => "sandbox_file_put_chunk",
            Self::SandboxRepoClone => "sandbox_repo_clone",
        }
    }
}

/// A typed error a module answers with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandError {
    pub code: ErrorCode,
    pub message: String,
}

impl CommandError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }

    fn into_proto(self) -> proto::Error {
        proto::Error {
            code: self.code as i32,
            message: self.message,
        }
    }
}

pub type CommandOutcome = Result<command_result::Kind, CommandError>;
pub type HandlerFuture = Pin<Box<dyn Future<Output = CommandOutcome> + Send + 'static>>;

/// A module of the agent that owns some command kinds.
pub trait Module: Send + Sync + 'static {
    /// Short name used in logs and error messages ("terminal").
    fn name(&self) -> &'static str;
    /// Handles one command (its `kind` is one the module registered for).
    /// The returned value becomes the reply; streamed output goes through
    /// `link` as events carrying the command's request id.
    fn handle(self: Arc<Self>, command: Command, link: Link) -> HandlerFuture;
    /// The control stream ended: work tied to it (a terminal session whose
    /// reader is gone) should stop. Called before every reconnect.
    fn stream_lost(&self) {}
}

/// How many commands a module runs at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Concurrency {
    /// One at a time, in arrival order.
    Sequential,
    /// Up to `n` at once; replies may be sent in any order.
    Parallel(usize),
}

/// The handle modules use to send events (and the dispatcher to send
/// replies) up the control stream. Cloning is cheap; the channel is bounded.
#[derive(Clone, Debug)]
pub struct Link {
    outbox: mpsc::Sender<AgentMessage>,
    /// Set on the link a handler gets: flips to true once the reply to its
    /// command is queued.
    replied: Option<watch::Receiver<bool>>,
}

/// The control-stream client is gone (the agent is shutting down).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the control-stream client has stopped")]
pub struct LinkClosed;

impl Link {
    /// A link and the receiving end that the client (or a test) drains.
    pub fn channel(capacity: usize) -> (Link, mpsc::Receiver<AgentMessage>) {
        let (outbox, rx) = mpsc::channel(capacity);
        (
            Link {
                outbox,
                replied: None,
            },
            rx,
        )
    }

    /// Resolves once the reply to the command this link was handed with is
    /// queued, so that a module's streamed events (terminal output) never
    /// overtake the reply that announces them. Resolves at once on a link
    /// that belongs to no command, and if the reply is never sent.
    pub async fn reply_sent(&self) {
        if let Some(replied) = &self.replied {
            let mut replied = replied.clone();
            let _ = replied.wait_for(|sent| *sent).await;
        }
    }

    /// Sends an event, waiting while the outbox is full.
    pub async fn send_event(&self, event: Event) -> Result<(), LinkClosed> {
        self.outbox
            .send(AgentMessage {
                body: Some(agent_message::Body::Event(event)),
            })
            .await
            .map_err(|_| LinkClosed)
    }

    /// Sends an event unless the outbox is full; says whether it was queued.
    pub fn try_send_event(&self, event: Event) -> bool {
        self.outbox
            .try_send(AgentMessage {
                body: Some(agent_message::Body::Event(event)),
            })
            .is_ok()
    }

    /// Sends a reply, waiting while the outbox is full.
    pub async fn send_reply(&self, reply: Reply) -> Result<(), LinkClosed> {
        self.outbox
            .send(AgentMessage {
                body: Some(agent_message::Body::Reply(reply)),
            })
            .await
            .map_err(|_| LinkClosed)
    }
}

/// An operational event stamped with the current time.
pub fn event(kind: &str, level: EventLevel, message: impl Into<String>) -> Event {
    Event {
        kind: kind.to_owned(),
        level: level as i32,
        message: message.into(),
        at_ms: crate::lock::now_ms(),
        ..Event::default()
    }
}

/// A reply carrying an error.
pub fn error_reply(request_id: &str, code: ErrorCode, message: impl Into<String>) -> Reply {
    Reply {
        request_id: request_id.to_owned(),
        outcome: Some(reply::Outcome::Error(proto::Error {
            code: code as i32,
            message: message.into(),
        })),
    }
}

const MODULE_QUEUE: usize = 256;

struct Registration {
    module: Arc<dyn Module>,
    kinds: Vec<CommandKind>,
    concurrency: Concurrency,
}

/// Collects module registrations before the dispatcher starts.
#[derive(Default)]
pub struct DispatcherBuilder {
    registrations: Vec<Registration>,
}

impl DispatcherBuilder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers `module` for `kinds`.
    ///
    /// # Panics
    /// When a kind is already registered: two owners of one command kind is
    /// a programming error caught at startup.
    pub fn register(
        mut self,
        module: Arc<dyn Module>,
        kinds: &[CommandKind],
        concurrency: Concurrency,
    ) -> Self {
        for kind in kinds {
            if let Some(owner) = self.registrations.iter().find(|r| r.kinds.contains(kind)) {
                panic!(
                    "command kind `{}` registered by both `{}` and `{}`",
                    kind.name(),
                    owner.module.name(),
                    module.name()
                );
            }
        }
        self.registrations.push(Registration {
            module,
            kinds: kinds.to_vec(),
            concurrency,
        });
        self
    }

    /// Starts one worker per module (needs a tokio runtime).
    pub fn start(self, link: Link) -> Dispatcher {
        let mut routes = HashMap::new();
        let mut modules = Vec::new();
        for registration in self.registrations {
            modules.push(registration.module.clone());
            let (tx, rx) = mpsc::channel(MODULE_QUEUE);
            let name = registration.module.name();
            tokio::spawn(module_worker(
                registration.module,
                registration.concurrency,
                rx,
                link.clone(),
            ));
            for kind in registration.kinds {
                routes.insert(
                    kind,
                    Route {
                        name,
                        queue: tx.clone(),
                    },
                );
            }
        }
        Dispatcher {
            routes,
            modules,
            link,
        }
    }
}

struct Route {
    name: &'static str,
    queue: mpsc::Sender<Command>,
}

/// Routes commands to module workers.
pub struct Dispatcher {
    routes: HashMap<CommandKind, Route>,
    modules: Vec<Arc<dyn Module>>,
    link: Link,
}

impl Dispatcher {
    /// Hands a command to its module. Returns the reply to send at once when
    /// the command cannot be routed (unknown or unregistered kind, full
    /// queue); otherwise the module's worker replies through the link.
    pub fn dispatch(&self, command: Command) -> Option<Reply> {
        let Some(kind) = command.kind.as_ref().map(CommandKind::of) else {
            return Some(error_reply(
                &command.request_id,
                ErrorCode::Unsupported,
                format!(
                    "command kind unknown to gstacks-agent {} (request `{}`)",
                    proto::build_info::VERSION,
                    command.request_id
                ),
            ));
        };
        let Some(route) = self.routes.get(&kind) else {
            return Some(error_reply(
                &command.request_id,
                ErrorCode::Unsupported,
                format!("no module of this agent handles `{}` commands", kind.name()),
            ));
        };
        let request_id = command.request_id.clone();
        match route.queue.try_send(command) {
            Ok(()) => None,
            Err(mpsc::error::TrySendError::Full(_)) => Some(error_reply(
                &request_id,
                ErrorCode::Unavailable,
                format!(
                    "module `{}` is busy ({MODULE_QUEUE} commands queued)",
                    route.name
                ),
            )),
            Err(mpsc::error::TrySendError::Closed(_)) => Some(error_reply(
                &request_id,
                ErrorCode::Internal,
                format!("module `{}` has stopped", route.name),
            )),
        }
    }

    /// Tells every module that the control stream ended.
    pub fn stream_lost(&self) {
        for module in &self.modules {
            module.stream_lost();
        }
    }

    pub fn link(&self) -> &Link {
        &self.link
    }
}

async fn module_worker(
    module: Arc<dyn Module>,
    concurrency: Concurrency,
    mut rx: mpsc::Receiver<Command>,
    link: Link,
) {
    let limit = match concurrency {
        Concurrency::Sequential => 1,
        Concurrency::Parallel(n) => n.max(1),
    };
    let permits = Arc::new(Semaphore::new(limit));
    while let Some(command) = rx.recv().await {
        let run = run_command(module.clone(), command, link.clone());
        if limit == 1 {
            run.await;
        } else {
            let Ok(permit) = permits.clone().acquire_owned().await else {
                return;
            };
            tokio::spawn(async move {
                run.await;
                drop(permit);
            });
        }
    }
}

/// Runs one command in its own task and sends the reply, whatever happens.
async fn run_command(module: Arc<dyn Module>, command: Command, link: Link) {
    let request_id = command.request_id.clone();
    let kind = command
        .kind
        .as_ref()
        .map_or("unset", |k| CommandKind::of(k).name());
    let deadline =
        (command.deadline_ms > 0).then(|| Duration::from_millis(u64::from(command.deadline_ms)));
    let name = module.name();
    let (replied_tx, replied_rx) = watch::channel(false);
    let handler_link = Link {
        outbox: link.outbox.clone(),
        replied: Some(replied_rx),
    };
    let mut task = tokio::spawn(module.handle(command, handler_link));
    let joined = match deadline {
        None => (&mut task).await,
        Some(d) => match tokio::time::timeout(d, &mut task).await {
            Ok(joined) => joined,
            Err(_) => {
                task.abort();
                tracing::warn!(
                    module = name,
                    request_id,
                    kind,
                    "command overran its deadline of {d:?}"
                );
                let _ = link
                    .send_reply(error_reply(
                        &request_id,
                        ErrorCode::Timeout,
                        format!("module `{name}` did not answer `{kind}` within {d:?}"),
                    ))
                    .await;
                return;
            }
        },
    };
    let outcome = match joined {
        Ok(Ok(result)) => reply::Outcome::Result(CommandResult { kind: Some(result) }),
        Ok(Err(error)) => {
            tracing::debug!(module = name, request_id, kind, code = ?error.code, "command failed: {}", error.message);
            reply::Outcome::Error(error.into_proto())
        }
        Err(join_error) => {
            let what = if join_error.is_panic() {
                let payload = join_error.into_panic();
                let text = payload
                    .downcast_ref::<&str>()
                    .map(|s| (*s).to_owned())
                    .or_else(|| payload.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "non-string panic".to_owned());
                format!("panicked: {text}")
            } else {
                "was cancelled".to_owned()
            };
            tracing::warn!(module = name, request_id, kind, "module {what}");
            reply::Outcome::Error(
                CommandError::new(
                    ErrorCode::Internal,
                    format!(
                        "module `{name}` {what} while handling `{kind}` request `{request_id}`"
                    ),
                )
                .into_proto(),
            )
        }
    };
    let _ = link
        .send_reply(Reply {
            request_id,
            outcome: Some(outcome),
        })
        .await;
    replied_tx.send_replace(true);
}

/// The built-in `ping` module: answers `Pong` with the same payload, so the
/// control plane can measure the round trip through the stream.
pub struct PingModule;

impl Module for PingModule {
    fn name(&self) -> &'static str {
        "ping"
    }

    fn handle(self: Arc<Self>, command: Command, _link: Link) -> HandlerFuture {
        Box::pin(async move {
            match command.kind {
                Some(command::Kind::Ping(ping)) => Ok(command_result::Kind::Pong(proto::Pong {
                    payload: ping.payload,
                })),
                _ => Err(CommandError::new(
                    ErrorCode::InvalidArgument,
                    "ping module got a non-ping command",
                )),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::{HostTerminalOpen, Ping, TerminalInput};

    fn ping(id: &str, payload: &[u8]) -> Command {
        Command {
            request_id: id.into(),
            deadline_ms: 0,
            kind: Some(command::Kind::Ping(Ping {
                payload: payload.to_vec(),
            })),
        }
    }

    async fn next_reply(rx: &mut mpsc::Receiver<AgentMessage>) -> Reply {
        loop {
            match rx.recv().await.expect("link open").body {
                Some(agent_message::Body::Reply(r)) => return r,
                _ => continue,
            }
        }
    }

    fn error_code(reply: &Reply) -> Option<ErrorCode> {
        match &reply.outcome {
            Some(reply::Outcome::Error(e)) => ErrorCode::try_from(e.code).ok(),
            _ => None,
        }
    }

    /// Panics on `input` "boom", errors on "fail", sleeps forever on "hang",
    /// otherwise acks; records the order it saw inputs in.
    struct Flaky {
        seen: std::sync::Mutex<Vec<Vec<u8>>>,
    }

    impl Module for Flaky {
        fn name(&self) -> &'static str {
            "flaky"
        }
        fn handle(self: Arc<Self>, command: Command, _link: Link) -> HandlerFuture {
            Box::pin(async move {
                let Some(command::Kind::TerminalInput(input)) = command.kind else {
                    return Err(CommandError::new(ErrorCode::InvalidArgument, "not input"));
                };
                self.seen.lock().unwrap().push(input.data.clone());
                match input.data.as_slice() {
                    b"boom" => panic!("boom requested"),
                    b"fail" => Err(CommandError::new(
                        ErrorCode::NotFound,
                        "session `x` not found",
                    )),
                    b"hang" => std::future::pending().await,
                    _ => Ok(command_result::Kind::Ack(proto::Ack {})),
                }
            })
        }
    }

    fn input(id: &str, data: &[u8], deadline_ms: u32) -> Command {
        Command {
            request_id: id.into(),
            deadline_ms,
            kind: Some(command::Kind::TerminalInput(TerminalInput {
                session_id: "s".into(),
                data: data.to_vec(),
            })),
        }
    }

    #[tokio::test]
    async fn unset_kind_is_unsupported() {
        let (link, _rx) = Link::channel(8);
        let d = DispatcherBuilder::new().start(link);
        let reply = d
            .dispatch(Command {
                request_id: "r1".into(),
                deadline_ms: 0,
                kind: None,
            })
            .expect("immediate reply");
        assert_eq!(reply.request_id, "r1");
        assert_eq!(error_code(&reply), Some(ErrorCode::Unsupported));
    }

    #[tokio::test]
    async fn unregistered_kind_is_unsupported_and_named() {
        let (link, _rx) = Link::channel(8);
        let d = DispatcherBuilder::new()
            .register(
                Arc::new(PingModule),
                &[CommandKind::Ping],
                Concurrency::Sequential,
            )
            .start(link);
        let reply = d
            .dispatch(Command {
                request_id: "r2".into(),
                deadline_ms: 0,
                kind: Some(command::Kind::HostTerminalOpen(HostTerminalOpen::default())),
            })
            .unwrap();
        assert_eq!(error_code(&reply), Some(ErrorCode::Unsupported));
        let Some(reply::Outcome::Error(e)) = reply.outcome else {
            unreachable!()
        };
        assert!(e.message.contains("host_terminal_open"), "{}", e.message);
    }

    #[tokio::test]
    async fn ping_is_answered_with_its_payload() {
        let (link, mut rx) = Link::channel(8);
        let d = DispatcherBuilder::new()
            .register(
                Arc::new(PingModule),
                &[CommandKind::Ping],
                Concurrency::Sequential,
            )
            .start(link);
        assert!(d.dispatch(ping("p1", b"abc")).is_none());
        let reply = next_reply(&mut rx).await;
        assert_eq!(reply.request_id, "p1");
        match reply.outcome {
            Some(reply::Outcome::Result(CommandResult {
                kind: Some(command_result::Kind::Pong(p)),
            })) => assert_eq!(p.payload, b"abc"),
            other => panic!("expected pong, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn panic_and_error_become_typed_replies_and_the_worker_goes_on() {
        let (link, mut rx) = Link::channel(16);
        let flaky = Arc::new(Flaky {
            seen: Default::default(),
        });
        let d = DispatcherBuilder::new()
            .register(
                flaky.clone(),
                &[CommandKind::TerminalInput],
                Concurrency::Sequential,
            )
            .start(link);
        for (id, data) in [
            ("a", &b"boom"[..]),
            ("b", b"fail"),
            ("c", b"ok"),
            ("d", b"boom"),
            ("e", b"ok"),
        ] {
            assert!(d.dispatch(input(id, data, 0)).is_none());
        }
        let mut replies = HashMap::new();
        for _ in 0..5 {
            let r = next_reply(&mut rx).await;
            replies.insert(r.request_id.clone(), r);
        }
        assert_eq!(error_code(&replies["a"]), Some(ErrorCode::Internal));
        let Some(reply::Outcome::Error(e)) = &replies["a"].outcome else {
            unreachable!()
        };
        assert!(
            e.message.contains("flaky") && e.message.contains("boom requested"),
            "{}",
            e.message
        );
        assert_eq!(error_code(&replies["b"]), Some(ErrorCode::NotFound));
        assert_eq!(error_code(&replies["c"]), None);
        assert_eq!(error_code(&replies["d"]), Some(ErrorCode::Internal));
        assert_eq!(error_code(&replies["e"]), None);
        // Sequential: seen in arrival order.
        let seen = flaky.seen.lock().unwrap().clone();
        assert_eq!(seen, [&b"boom"[..], b"fail", b"ok", b"boom", b"ok"]);
    }

    #[tokio::test]
    async fn deadline_overrun_answers_timeout() {
        let (link, mut rx) = Link::channel(16);
        let d = DispatcherBuilder::new()
            .register(
                Arc::new(Flaky {
                    seen: Default::default(),
                }),
                &[CommandKind::TerminalInput],
                Concurrency::Sequential,
            )
            .start(link);
        assert!(d.dispatch(input("slow", b"hang", 20)).is_none());
        assert!(d.dispatch(input("next", b"ok", 0)).is_none());
        let first = next_reply(&mut rx).await;
        assert_eq!(
            (first.request_id.as_str(), error_code(&first)),
            ("slow", Some(ErrorCode::Timeout))
        );
        let second = next_reply(&mut rx).await;
        assert_eq!(
            (second.request_id.as_str(), error_code(&second)),
            ("next", None)
        );
    }

    #[tokio::test]
    async fn full_queue_answers_unavailable() {
        // The worker is stuck on a command without deadline; the queue fills.
        let (link, _rx) = Link::channel(4);
        let d = DispatcherBuilder::new()
            .register(
                Arc::new(Flaky {
                    seen: Default::default(),
                }),
                &[CommandKind::TerminalInput],
                Concurrency::Sequential,
            )
            .start(link);
        let mut busy = None;
        for i in 0..(MODULE_QUEUE + 10) {
            if let Some(r) = d.dispatch(input(&format!("r{i}"), b"hang", 0)) {
                busy = Some(r);
                break;
            }
        }
        let busy = busy.expect("a full queue is reported");
        assert_eq!(error_code(&busy), Some(ErrorCode::Unavailable));
    }

    #[test]
    #[should_panic(expected = "registered by both")]
    fn double_registration_is_refused() {
        let _ = DispatcherBuilder::new()
            .register(
                Arc::new(PingModule),
                &[CommandKind::Ping],
                Concurrency::Sequential,
            )
            .register(
                Arc::new(PingModule),
                &[CommandKind::Ping],
                Concurrency::Sequential,
            );
    }
}
