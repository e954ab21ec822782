//! `gstacks host terminal`: a break-glass PTY shell on a host, through the
//! control plane. Interactive on a TTY (raw mode, window size follows
//! SIGWINCH); otherwise stdin is sent as typed and the shell's exit status
//! becomes ours, so scripts and tests can drive it.

use std::io::{IsTerminal as _, Read as _, Write as _};
use std::os::fd::AsFd as _;

use anyhow::Context as _;
use nix::sys::termios::{self, SetArg, Termios};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::client::{status_error, Api};
use proto::terminal_client_message::Body as ClientBody;
use proto::terminal_server_message::Body as ServerBody;
use proto::{TerminalClientMessage, TerminalOpenRequest, TerminalSize};

/// Exit code when the control plane ends the session (not the shell).
pub const CLOSED_BY_CONTROL_PLANE: i32 = 75;

/// Restores the terminal when dropped (also on error paths).
struct RawMode {
    saved: Termios,
}

impl RawMode {
    fn enable() -> anyhow::Result<RawMode> {
        let stdin = std::io::stdin();
        let saved = termios::tcgetattr(stdin.as_fd()).context("reading terminal settings")?;
        let mut raw = saved.clone();
        termios::cfmakeraw(&mut raw);
        termios::tcsetattr(stdin.as_fd(), SetArg::TCSANOW, &raw)
            .context("switching the terminal to raw mode")?;
        Ok(RawMode { saved })
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        let _ = termios::tcsetattr(std::io::stdin().as_fd(), SetArg::TCSANOW, &self.saved);
    }
}

fn window_size() -> Option<TerminalSize> {
    let stdout = std::io::stdout();
    if !stdout.is_terminal() {
        return None;
    }
    let size = rustix::termios::tcgetwinsize(stdout.as_fd()).ok()?;
    // A pseudo-terminal nobody sized (0x0) gets the default instead.
    if size.ws_col == 0 || size.ws_row == 0 {
        return None;
    }
    Some(TerminalSize {
        cols: u32::from(size.ws_col),
        rows: u32::from(size.ws_row),
    })
}

fn message(body: ClientBody) -> TerminalClientMessage {
    TerminalClientMessage { body: Some(body) }
}

/// Where a terminal runs: a host (break-glass PTY) or a sandbox (docker exec).
#[derive(Debug, Clone)]
pub enum Target {
    Host(String),
    Sandbox(String),
}

impl Target {
    fn label(&self) -> &'static str {
        match self {
            Target::Host(_) => "host terminal",
            Target::Sandbox(_) => "sandbox terminal",
        }
    }

    fn id(&self) -> &str {
        match self {
            Target::Host(id) | Target::Sandbox(id) => id,
        }
    }
}

/// Runs the session; returns the exit code to leave with.
pub async fn run(
    api: &mut Api,
    target: Target,
    reason: String,
    command: Vec<String>,
    max_duration_secs: u32,
) -> anyhow::Result<i32> {
    let interactive = std::io::stdin().is_terminal();
    let (tx, rx) = mpsc::channel::<TerminalClientMessage>(64);
    let size = window_size().unwrap_or(TerminalSize { cols: 80, rows: 24 });
    let (host_id, sandbox_id) = match &target {
        Target::Host(id) => (id.clone(), String::new()),
        Target::Sandbox(id) => (String::new(), id.clone()),
    };
    let label = target.label();
    tx.send(message(ClientBody::Open(TerminalOpenRequest {
        host_id,
        reason,
        size: Some(size),
        command,
        max_duration_secs,
        sandbox_id,
    })))
    .await
    .context("queueing the open message")?;
    let mut inbound = api
        .host_terminal(ReceiverStream::new(rx))
        .await
        .map_err(status_error)?
        .into_inner();

    // The first answer says whether the host opened the PTY.
    match inbound.message().await.map_err(status_error)? {
        Some(proto::TerminalServerMessage {
            body: Some(ServerBody::Opened(opened)),
        }) => {
            if interactive {
                eprintln!(
                    "{label} {} on {} (recorded; exit the shell to end)\r",
                    opened.session_id,
                    target.id()
                );
            }
        }
        Some(proto::TerminalServerMessage {
            body: Some(ServerBody::Error(err)),
        }) => anyhow::bail!("{label} refused: {}", err.message),
        other => anyhow::bail!("{label}: unexpected first answer {other:?}"),
    }

    let raw = if interactive {
        Some(RawMode::enable()?)
    } else {
        None
    };

    // Stdin is read on a thread (blocking reads); at its end a script's
    // session gets an end-of-file (Ctrl-D) and the stream is half-closed.
    let input = tx.clone();
    std::thread::spawn(move || {
        let mut stdin = std::io::stdin();
        let mut buf = [0u8; 4096];
        loop {
            match stdin.read(&mut buf) {
                Ok(0) | Err(_) => {
                    if !interactive {
                        let _ = input.blocking_send(message(ClientBody::Input(vec![0x04])));
                    }
                    break;
                }
                Ok(n) => {
                    if input
                        .blocking_send(message(ClientBody::Input(buf[..n].to_vec())))
                        .is_err()
                    {
                        break;
                    }
                }
            }
        }
    });
    if interactive {
        let resize = tx.clone();
        let mut winch =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::window_change())
                .context("listening for window size changes")?;
        tokio::spawn(async move {
            while winch.recv().await.is_some() {
                if let Some(size) = window_size() {
                    if resize
                        .send(message(ClientBody::Resize(size)))
                        .await
                        .is_err()
                    {
                        break;
                    }
                }
            }
        });
    }
    drop(tx);

    let mut stdout = std::io::stdout();
    let outcome = loop {
        let next = match inbound.message().await {
            Ok(next) => next,
            Err(status) => break Err(status_error(status)),
        };
        let Some(next) = next else {
            break Err(anyhow::anyhow!(
                "the terminal stream ended without an exit status"
            ));
        };
        match next.body {
            Some(ServerBody::Output(data)) => {
                if stdout
                    .write_all(&data)
                    .and_then(|()| stdout.flush())
                    .is_err()
                {
                    break Ok(1);
                }
            }
            Some(ServerBody::Exit(exit)) => break Ok(exit.exit_code),
            Some(ServerBody::Closed(closed)) => {
                drop(raw);
                eprintln!(
                    "\r\nterminal session {} closed by the control plane: {}",
                    closed.session_id, closed.reason
                );
                return Ok(CLOSED_BY_CONTROL_PLANE);
            }
            Some(ServerBody::Error(err)) => break Err(anyhow::anyhow!("{label}: {}", err.message)),
            // A second `opened`, or a kind this CLI does not know yet.
            Some(ServerBody::Opened(_)) | None => {}
        }
    };
    drop(raw);
    outcome
}
