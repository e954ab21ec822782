//! The break-glass host terminal: a PTY shell (or a given command) on the
//! host, proxied over the control stream.
//!
//! `HostTerminalOpen` starts the process on a new PTY (`pty-process`, which
//! wraps the `setsid`/`TIOCSCTTY` pre-exec) and answers `TerminalOpened`.
//! Output travels as `Event`s with a `TerminalOutput` payload and the open
//! command's request id; `TerminalInput`, `TerminalResize` and
//! `TerminalClose` address the session by id. When the process ends (or the
//! session is closed, or it outlives `max_duration_secs` (default 15 min)
//! by [`EXPIRY_BACKSTOP`] without the control plane closing it)
//! a `TerminalExit` event carries the exit code (128 + signal when killed)
//! and the reason. The reason and requester of every session, and every
//! refusal, are recorded as events. With
//! `GLOBALSTACKS_AGENT_DISABLE_HOST_TERMINAL=1` every open is refused with
//! `ERROR_CODE_PERMISSION_DENIED`.

use std::collections::HashMap;
use std::os::unix::process::ExitStatusExt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The control plane ends a terminal (host or sandbox) at its time limit
/// and tells the operator so; the agent's own timer is a backstop for a
/// close that never arrives, so it fires this much later instead of racing
/// the control plane's (which made the operator see a bare exit 137 instead
/// of the time-limit message).
pub(crate) const EXPIRY_BACKSTOP: Duration = Duration::from_secs(5);

use proto::{
    command, command_result, event, Command, ErrorCode, EventLevel, HostTerminalOpen, TerminalExit,
    TerminalOpened, TerminalOutput,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::dispatch::{
    event as make_event, CommandError, CommandKind, CommandOutcome, HandlerFuture, Link, Module,
};

/// Sessions end on their own after this long unless the open says otherwise.
pub const DEFAULT_MAX_DURATION: Duration = Duration::from_secs(15 * 60);
/// The command kinds this module owns.
pub const KINDS: &[CommandKind] = &[
    CommandKind::HostTerminalOpen,
    CommandKind::TerminalInput,
    CommandKind::TerminalResize,
    CommandKind::TerminalClose,
];
const INPUT_QUEUE: usize = 256;
const OUTPUT_CHUNK: usize = 16 * 1024;
/// After the process exits, how long to wait for the rest of its output
/// (a background job may keep the PTY open).
const DRAIN_AFTER_EXIT: Duration = Duration::from_millis(500);

struct SessionControl {
    input: mpsc::Sender<Vec<u8>>,
    resize: watch::Sender<pty_process::Size>,
    close: CancellationToken,
    /// Cancelled when the control stream drops.
    lost: CancellationToken,
}

/// The ends of a terminal session registered with
/// [`HostTerminal::register_session`]: keystrokes, window sizes, and the
/// two ways it is ended (closed by the control plane, or the stream lost).
pub struct SessionEnds {
    pub input: mpsc::Receiver<Vec<u8>>,
    pub resize: watch::Receiver<pty_process::Size>,
    pub close: CancellationToken,
    pub lost: CancellationToken,
}

/// The host terminal module.
pub struct HostTerminal {
    disabled: bool,
    sessions: Mutex<HashMap<String, SessionControl>>,
}

impl HostTerminal {
    pub fn new(disabled: bool) -> Arc<Self> {
        Arc::new(Self {
            disabled,
            sessions: Mutex::new(HashMap::new()),
        })
    }

    fn sessions(&self) -> std::sync::MutexGuard<'_, HashMap<String, SessionControl>> {
        // A poisoned map still holds valid senders: keep serving.
        self.sessions
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    async fn open(
        self: Arc<Self>,
        request_id: String,
        open: HostTerminalOpen,
        link: Link,
    ) -> CommandOutcome {
        let mut audit = make_event("terminal.opened", EventLevel::Warn, "");
        audit.request_id = request_id.clone();
        for (k, v) in [
            ("session_id", open.session_id.clone()),
            ("reason", open.reason.clone()),
            ("requested_by", open.requested_by.clone()),
            ("command", open.command.join(" ")),
        ] {
            audit.fields.insert(k.to_owned(), v);
        }
        if self.disabled {
            audit.kind = "terminal.refused".to_owned();
            audit.message = format!(
                "host terminal requested by `{}` (reason: {}) refused: disabled on this host",
                open.requested_by, open.reason
            );
            let _ = link.send_event(audit).await;
            return Err(CommandError::new(
                ErrorCode::PermissionDenied,
                "the host terminal is disabled on this host (GLOBALSTACKS_AGENT_DISABLE_HOST_TERMINAL=1)",
            ));
        }
        if open.session_id.trim().is_empty() {
            return Err(CommandError::new(
                ErrorCode::InvalidArgument,
                "host terminal open without a session id",
            ));
        }
        if self.sessions().contains_key(&open.session_id) {
            return Err(CommandError::new(
                ErrorCode::AlreadyExists,
                format!(
                    "host terminal session `{}` is already open",
                    open.session_id
                ),
            ));
        }
        let size = pty_size(open.rows, open.cols);
        let (pty, pts) = pty_process::open()
            .map_err(|e| internal(&open.session_id, format!("cannot open a PTY: {e}")))?;
        pty.resize(size)
            .map_err(|e| internal(&open.session_id, format!("cannot size the PTY: {e}")))?;
        let (program, cmd) = build_command(&open.command);
        let child = cmd.spawn(pts).map_err(|e| {
            CommandError::new(
                ErrorCode::FailedPrecondition,
                format!(
                    "host terminal session `{}`: cannot start `{program}`: {e}",
                    open.session_id
                ),
            )
        })?;
        let max_duration = match open.max_duration_secs {
            0 => DEFAULT_MAX_DURATION,
            secs => Duration::from_secs(u64::from(secs)),
        };
        let (input_tx, input_rx) = mpsc::channel(INPUT_QUEUE);
        let (resize_tx, resize_rx) = watch::channel(size);
        let close = CancellationToken::new();
        let lost = CancellationToken::new();
        self.sessions().insert(
            open.session_id.clone(),
            SessionControl {
                input: input_tx,
                resize: resize_tx,
                close: close.clone(),
                lost: lost.clone(),
            },
        );
        audit.message = format!(
            "host terminal `{}` opened for `{}` (reason: {}), expires in {}s",
            open.session_id,
            open.requested_by,
            open.reason,
            max_duration.as_secs()
        );
        audit.fields.insert(
            "max_duration_secs".into(),
            max_duration.as_secs().to_string(),
        );
        tracing::warn!(session_id = %open.session_id, requested_by = %open.requested_by, reason = %open.reason, "host terminal opened");
        let _ = link.send_event(audit).await;
        let session = Session {
            id: open.session_id.clone(),
            request_id,
            link,
            max_duration,
        };
        let module = self.clone();
        tokio::spawn(async move {
            let id = session.id.clone();
            // Output follows the TerminalOpened reply, never precedes it.
            session.link.reply_sent().await;
            session
                .run(child, pty, input_rx, resize_rx, close, lost)
                .await;
            module.sessions().remove(&id);
        });
        Ok(command_result::Kind::TerminalOpened(TerminalOpened {
            session_id: open.session_id,
        }))
    }

    /// Registers a terminal served elsewhere (a sandbox's docker exec) under
    /// `session_id`, so that `TerminalInput`, `TerminalResize` and
    /// `TerminalClose` reach it like a host terminal's. The caller serves
    /// the returned ends and calls [`HostTerminal::remove_session`] when done.
    pub fn register_session(
        &self,
        session_id: &str,
        size: pty_process::Size,
    ) -> Result<SessionEnds, CommandError> {
        if session_id.trim().is_empty() {
            return Err(CommandError::new(
                ErrorCode::InvalidArgument,
                "terminal open without a session id",
            ));
        }
        let mut sessions = self.sessions();
        if sessions.contains_key(session_id) {
            return Err(CommandError::new(
                ErrorCode::AlreadyExists,
                format!("terminal session `{session_id}` is already open"),
            ));
        }
        let (input_tx, input) = mpsc::channel(INPUT_QUEUE);
        let (resize_tx, resize) = watch::channel(size);
        let close = CancellationToken::new();
        let lost = CancellationToken::new();
        sessions.insert(
            session_id.to_owned(),
            SessionControl {
                input: input_tx,
                resize: resize_tx,
                close: close.clone(),
                lost: lost.clone(),
            },
        );
        Ok(SessionEnds {
            input,
            resize,
            close,
            lost,
        })
    }

    pub fn remove_session(&self, session_id: &str) {
        self.sessions().remove(session_id);
    }

    fn control<T>(
        &self,
        session_id: &str,
        act: impl FnOnce(&SessionControl) -> T,
    ) -> Result<T, CommandError> {
        let sessions = self.sessions();
        let control = sessions.get(session_id).ok_or_else(|| {
            CommandError::new(
                ErrorCode::NotFound,
                format!("no host terminal session `{session_id}` on this host"),
            )
        })?;
        Ok(act(control))
    }
}

fn internal(session_id: &str, message: String) -> CommandError {
    CommandError::new(
        ErrorCode::Internal,
        format!("host terminal session `{session_id}`: {message}"),
    )
}

fn ack() -> CommandOutcome {
    Ok(command_result::Kind::Ack(proto::Ack {}))
}

pub(crate) fn pty_size(rows: u32, cols: u32) -> pty_process::Size {
    let clamp = |v: u32, default: u16| match v {
        0 => default,
        v => u16::try_from(v).unwrap_or(u16::MAX),
    };
    pty_process::Size::new(clamp(rows, 24), clamp(cols, 80))
}

/// The given command, or the login shell of the user the agent runs as.
fn build_command(argv: &[String]) -> (String, pty_process::Command) {
    if let Some((program, args)) = argv.split_first() {
        let cmd = pty_process::Command::new(program)
            .args(args)
            .env("TERM", "xterm-256color")
            .kill_on_drop(true);
        return (program.clone(), cmd);
    }
    let user = nix::unistd::User::from_uid(nix::unistd::getuid())
        .ok()
        .flatten();
    let shell = user
        .as_ref()
        .map(|u| u.shell.clone())
        .filter(|s| s.exists())
        .unwrap_or_else(|| "/bin/sh".into());
    let home = user
        .map(|u| u.dir)
        .filter(|d| d.is_dir())
        .unwrap_or_else(|| "/".into());
    let name = shell
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "sh".to_owned());
    let cmd = pty_process::Command::new(&shell)
        // A leading dash makes it a login shell.
        .arg0(format!("-{name}"))
        .env("TERM", "xterm-256color")
        .env("HOME", &home)
        .current_dir(home)
        .kill_on_drop(true);
    (shell.display().to_string(), cmd)
}

struct Session {
    id: String,
    request_id: String,
    link: Link,
    max_duration: Duration,
}

impl Session {
    async fn run(
        self,
        mut child: tokio::process::Child,
        pty: pty_process::Pty,
        mut input: mpsc::Receiver<Vec<u8>>,
        mut resize: watch::Receiver<pty_process::Size>,
        close: CancellationToken,
        lost: CancellationToken,
    ) {
        let (mut reader, mut writer) = pty.into_split();
        let pgid = child
            .id()
            .and_then(|p| i32::try_from(p).ok())
            .map(nix::unistd::Pid::from_raw);
        let expire = tokio::time::sleep(self.max_duration + EXPIRY_BACKSTOP);
        tokio::pin!(expire);
        let drain = tokio::time::sleep(Duration::MAX / 4);
        tokio::pin!(drain);
        let mut buf = vec![0u8; OUTPUT_CHUNK];
        let mut output_open = true;
        let mut status = None;
        let mut end_reason: Option<String> = None;
        while output_open || status.is_none() {
            tokio::select! {
                read = reader.read(&mut buf), if output_open => match read {
                    // EIO once every holder of the PTY's other side is gone.
                    Ok(0) | Err(_) => output_open = false,
                    Ok(n) => self.output(buf[..n].to_vec()).await,
                },
                exited = child.wait(), if status.is_none() => {
                    status = Some(exited);
                    drain.as_mut().reset(tokio::time::Instant::now() + DRAIN_AFTER_EXIT);
                }
                _ = &mut drain, if status.is_some() => output_open = false,
                Some(data) = input.recv() => {
                    if let Err(e) = writer.write_all(&data).await {
                        tracing::debug!(session_id = %self.id, "terminal input not written: {e}");
                    }
                }
                Ok(()) = resize.changed() => {
                    let size = *resize.borrow_and_update();
                    if let Err(e) = writer.resize(size) {
                        tracing::debug!(session_id = %self.id, "terminal resize failed: {e}");
                    }
                }
                _ = close.cancelled(), if end_reason.is_none() => {
                    end_reason = Some("closed by the control plane".to_owned());
                    kill_group(pgid, &mut child);
                }
                _ = lost.cancelled(), if end_reason.is_none() => {
                    end_reason = Some("the control stream was lost".to_owned());
                    kill_group(pgid, &mut child);
                }
                _ = &mut expire, if end_reason.is_none() => {
                    end_reason = Some(format!("session expired after {}s", self.max_duration.as_secs()));
                    kill_group(pgid, &mut child);
                }
            }
        }
        let exit_code = match status {
            Some(Ok(s)) => s
                .code()
                .or_else(|| s.signal().map(|sig| 128 + sig))
                .unwrap_or(-1),
            _ => -1,
        };
        let reason = end_reason.unwrap_or_else(|| "exited".to_owned());
        tracing::info!(session_id = %self.id, exit_code, "host terminal ended: {reason}");
        let mut exit = make_event(
            "terminal.exit",
            EventLevel::Info,
            format!(
                "host terminal `{}` ended ({reason}), exit code {exit_code}",
                self.id
            ),
        );
        exit.request_id = self.request_id.clone();
        exit.fields.insert("session_id".into(), self.id.clone());
        exit.payload = Some(event::Payload::TerminalExit(TerminalExit {
            session_id: self.id.clone(),
            exit_code,
            reason,
        }));
        let _ = self.link.send_event(exit).await;
    }

    async fn output(&self, data: Vec<u8>) {
        let mut ev = make_event("terminal.output", EventLevel::Debug, "");
        ev.request_id = self.request_id.clone();
        ev.payload = Some(event::Payload::TerminalOutput(TerminalOutput {
            session_id: self.id.clone(),
            data,
        }));
        let _ = self.link.send_event(ev).await;
    }
}

/// SIGKILL to the session's process group (the shell is its leader), so
/// that its children go too.
fn kill_group(pgid: Option<nix::unistd::Pid>, child: &mut tokio::process::Child) {
    if let Some(pgid) = pgid {
        let _ = nix::sys::signal::killpg(pgid, nix::sys::signal::Signal::SIGKILL);
    }
    let _ = child.start_kill();
}

impl Module for HostTerminal {
    fn name(&self) -> &'static str {
        "terminal"
    }

    /// A terminal's operator went with the stream: end every session.
    fn stream_lost(&self) {
        for control in self.sessions().values() {
            control.lost.cancel();
        }
    }

    fn handle(self: Arc<Self>, command: Command, link: Link) -> HandlerFuture {
        Box::pin(async move {
            match command.kind {
                Some(command::Kind::HostTerminalOpen(open)) => {
                    self.open(command.request_id, open, link).await
                }
                Some(command::Kind::TerminalInput(input)) => {
                    let sent = self.control(&input.session_id, |c| c.input.try_send(input.data))?;
                    match sent {
                        Ok(()) => ack(),
                        Err(mpsc::error::TrySendError::Full(_)) => Err(CommandError::new(
                            ErrorCode::Unavailable,
                            format!(
                                "host terminal session `{}`: input buffer full",
                                input.session_id
                            ),
                        )),
                        Err(mpsc::error::TrySendError::Closed(_)) => Err(CommandError::new(
                            ErrorCode::NotFound,
                            format!("host terminal session `{}` has ended", input.session_id),
                        )),
                    }
                }
                Some(command::Kind::TerminalResize(r)) => {
                    self.control(&r.session_id, |c| {
                        c.resize.send_replace(pty_size(r.rows, r.cols))
                    })?;
                    ack()
                }
                Some(command::Kind::TerminalClose(c)) => {
                    self.control(&c.session_id, |s| s.close.cancel())?;
                    ack()
                }
                _ => Err(CommandError::new(
                    ErrorCode::InvalidArgument,
                    "not a host terminal command",
                )),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dispatch::{Concurrency, DispatcherBuilder};
    use proto::{agent_message, reply, AgentMessage, Reply, TerminalClose};

    fn open_cmd(id: &str, session: &str, argv: &[&str], max_secs: u32) -> Command {
        Command {
            request_id: id.into(),
            deadline_ms: 0,
            kind: Some(command::Kind::HostTerminalOpen(HostTerminalOpen {
                session_id: session.into(),
                reason: "INC-42 disk full".into(),
                requested_by: "alice".into(),
                cols: 100,
                rows: 30,
                max_duration_secs: max_secs,
                command: argv.iter().map(|s| (*s).to_owned()).collect(),
            })),
        }
    }

    #[derive(Default, Debug)]
    struct Seen {
        replies: Vec<Reply>,
        output: Vec<u8>,
        exit: Option<TerminalExit>,
        kinds: Vec<String>,
        output_before_reply: bool,
    }

    async fn collect_until_exit(rx: &mut mpsc::Receiver<AgentMessage>) -> Seen {
        let mut seen = Seen::default();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while seen.exit.is_none() {
            let msg = tokio::time::timeout_at(deadline, rx.recv())
                .await
                .expect("terminal exit within 20 s")
                .unwrap();
            match msg.body {
                Some(agent_message::Body::Reply(r)) => seen.replies.push(r),
                Some(agent_message::Body::Event(e)) => {
                    seen.kinds.push(e.kind.clone());
                    match e.payload {
                        Some(event::Payload::TerminalOutput(o)) => {
                            seen.output_before_reply |= seen.replies.is_empty();
                            seen.output.extend(o.data)
                        }
                        Some(event::Payload::TerminalExit(x)) => seen.exit = Some(x),
                        _ => {}
                    }
                }
                _ => {}
            }
        }
        seen
    }

    #[tokio::test]
    async fn command_output_and_exit_code() {
        let (link, mut rx) = Link::channel(64);
        let d = DispatcherBuilder::new()
            .register(HostTerminal::new(false), KINDS, Concurrency::Sequential)
            .start(link);
        assert!(d
            .dispatch(open_cmd(
                "r1",
                "s1",
                &["sh", "-c", "echo hello-$((40+2)); exit 3"],
                0
            ))
            .is_none());
        let seen = collect_until_exit(&mut rx).await;
        assert!(
            String::from_utf8_lossy(&seen.output).contains("hello-42"),
            "{seen:?}"
        );
        let exit = seen.exit.unwrap();
        assert_eq!((exit.session_id.as_str(), exit.exit_code), ("s1", 3));
        assert!(matches!(
            seen.replies[0].outcome,
            Some(reply::Outcome::Result(_))
        ));
        assert_eq!(seen.kinds[0], "terminal.opened");
        assert!(
            !seen.output_before_reply,
            "output overtook the TerminalOpened reply"
        );
    }

    #[tokio::test]
    async fn close_and_expiry_kill_the_session() {
        let (link, mut rx) = Link::channel(64);
        let d = DispatcherBuilder::new()
            .register(HostTerminal::new(false), KINDS, Concurrency::Sequential)
            .start(link);
        assert!(d
            .dispatch(open_cmd("r1", "s1", &["sleep", "600"], 1))
            .is_none());
        let seen = collect_until_exit(&mut rx).await;
        let exit = seen.exit.unwrap();
        assert!(exit.reason.contains("expired"), "{exit:?}");
        assert_eq!(exit.exit_code, 128 + 9);

        assert!(d
            .dispatch(open_cmd("r2", "s2", &["sleep", "600"], 0))
            .is_none());
        // Wait until the session is open before closing it.
        loop {
            if let Some(agent_message::Body::Reply(r)) = rx.recv().await.unwrap().body {
                assert_eq!(r.request_id, "r2");
                break;
            }
        }
        assert!(d
            .dispatch(Command {
                request_id: "r3".into(),
                deadline_ms: 0,
                kind: Some(command::Kind::TerminalClose(TerminalClose {
                    session_id: "s2".into()
                })),
            })
            .is_none());
        let seen = collect_until_exit(&mut rx).await;
        assert!(seen
            .exit
            .unwrap()
            .reason
            .contains("closed by the control plane"));
    }

    #[tokio::test]
    async fn lost_stream_ends_open_sessions() {
        let (link, mut rx) = Link::channel(64);
        let terminal = HostTerminal::new(false);
        let d = DispatcherBuilder::new()
            .register(terminal.clone(), KINDS, Concurrency::Sequential)
            .start(link);
        assert!(d
            .dispatch(open_cmd("r1", "s1", &["sleep", "600"], 0))
            .is_none());
        loop {
            if let Some(agent_message::Body::Reply(r)) = rx.recv().await.unwrap().body {
                assert_eq!(r.request_id, "r1");
                break;
            }
        }
        d.stream_lost();
        let seen = collect_until_exit(&mut rx).await;
        assert!(seen
            .exit
            .unwrap()
            .reason
            .contains("control stream was lost"));
    }

    #[tokio::test]
    async fn disabled_terminal_refuses_with_permission_denied_and_records_it() {
        let (link, mut rx) = Link::channel(64);
        let d = DispatcherBuilder::new()
            .register(HostTerminal::new(true), KINDS, Concurrency::Sequential)
            .start(link);
        assert!(d.dispatch(open_cmd("r1", "s1", &["true"], 0)).is_none());
        let mut refused_event = None;
        let reply = loop {
            match rx.recv().await.unwrap().body {
                Some(agent_message::Body::Reply(r)) => break r,
                Some(agent_message::Body::Event(e)) => refused_event = Some(e),
                _ => {}
            }
        };
        let Some(reply::Outcome::Error(e)) = reply.outcome else {
            panic!("expected an error")
        };
        assert_eq!(e.code, ErrorCode::PermissionDenied as i32);
        let ev = refused_event.expect("refusal recorded");
        assert_eq!(ev.kind, "terminal.refused");
        assert_eq!(ev.fields["requested_by"], "alice");
        assert_eq!(ev.fields["reason"], "INC-42 disk full");
    }

    #[tokio::test]
    async fn input_to_unknown_session_is_not_found() {
        let terminal = HostTerminal::new(false);
        let (link, _rx) = Link::channel(4);
        let outcome = terminal
            .handle(
                Command {
                    request_id: "r".into(),
                    deadline_ms: 0,
                    kind: Some(command::Kind::TerminalInput(proto::TerminalInput {
                        session_id: "nope".into(),
                        data: b"ls\n".to_vec(),
                    })),
                },
                link,
            )
            .await;
        assert_eq!(outcome.unwrap_err().code, ErrorCode::NotFound);
    }

    #[tokio::test]
    async fn input_and_resize_reach_the_pty() {
        let (link, mut rx) = Link::channel(64);
        let d = DispatcherBuilder::new()
            .register(HostTerminal::new(false), KINDS, Concurrency::Sequential)
            .start(link);
        // Prints its size, waits for a line, prints the line and the new size.
        let script = "stty size; read line; echo got-$line; stty size";
        assert!(d
            .dispatch(open_cmd("r1", "s1", &["sh", "-c", script], 0))
            .is_none());
        let mut output = Vec::new();
        while !String::from_utf8_lossy(&output).contains("30 100") {
            if let Some(agent_message::Body::Event(e)) = rx.recv().await.unwrap().body {
                if let Some(event::Payload::TerminalOutput(o)) = e.payload {
                    output.extend(o.data);
                }
            }
        }
        for kind in [
            command::Kind::TerminalResize(proto::TerminalResize {
                session_id: "s1".into(),
                cols: 132,
                rows: 50,
            }),
            command::Kind::TerminalInput(proto::TerminalInput {
                session_id: "s1".into(),
                data: b"ping\n".to_vec(),
            }),
        ] {
            assert!(d
                .dispatch(Command {
                    request_id: "rx".into(),
                    deadline_ms: 0,
                    kind: Some(kind),
                })
                .is_none());
        }
        let seen = collect_until_exit(&mut rx).await;
        let text = String::from_utf8_lossy(&seen.output);
        assert!(
            text.contains("got-ping") && text.contains("50 132"),
            "{text}"
        );
        assert_eq!(seen.exit.unwrap().exit_code, 0);
    }
}
