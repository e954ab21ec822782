//! Sandbox logs, terminal, files and repository bootstrap, proxied over the
//! control stream through the agent's container [`Runtime`] (bollard in
//! production, a fake in the unit tests): the container's logs, and
//! processes exec'd in it (a TTY for terminals; `stat`, `find`, `cat`, `dd`
//! and `git` in the container for files and clones). Nothing runs through a
//! shell on the host or the control plane.
//!
//! Streams out of the sandbox (logs, file downloads) are numbered chunks of
//! at most [`CHUNK`] bytes; at most `window` of them are unacknowledged at
//! any time ([`StreamWindow`]), so a slow reader holds the container's
//! output in the engine's pipe, not in the agent's memory. Uploads come as
//! numbered chunks through a bounded queue to the writer (`dd`), whose
//! replies pace the control plane.
//!
//! Three modules share one state: [`SandboxIo`] (opens, listings, clones:
//! parallel), [`SandboxStreamControl`] (acks and cancels: sequential and
//! never blocking) and [`SandboxUploads`] (upload chunks: sequential, so
//! they are written in order).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use futures::{Stream, StreamExt};
use proto::{
    command, command_result, event, Command, ErrorCode, EventLevel, SandboxFileEntry,
    SandboxFileInfo, SandboxFileListing, SandboxRepoStatus, SandboxStreamChunk, SandboxStreamEnd,
    TerminalExit, TerminalOpened, TerminalOutput,
};
use tokio::io::AsyncWriteExt;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;

use crate::dispatch::{
    event as make_event, CommandError, CommandKind, CommandOutcome, HandlerFuture, Link, Module,
};
use crate::sandbox::runtime::{
    Exec, ExecSpec, InputSink, LogsRequest, OutputChunk, OutputSource, OutputStream, Runtime,
    RuntimeError,
};
use crate::terminal::{pty_size, HostTerminal, SessionEnds, DEFAULT_MAX_DURATION, EXPIRY_BACKSTOP};

/// Largest chunk of a stream (logs, downloads, and what uploads should send).
pub const CHUNK: usize = 64 * 1024;
/// Chunks in flight when the request names no window.
pub const DEFAULT_WINDOW: u32 = 16;
/// Largest window a request may ask for (16 MiB in flight).
pub const MAX_WINDOW: u32 = 256;
/// Upload chunks queued between the stream and the writer.
const UPLOAD_QUEUE: usize = 8;
/// Bytes of an exec's stderr kept for an error message.
const ERROR_TAIL: usize = 2048;
/// Bytes of a listing's output accepted.
const MAX_LISTING: usize = 4 * 1024 * 1024;

/// Kinds owned by [`SandboxIo`].
pub const KINDS: &[CommandKind] = &[
    CommandKind::SandboxLogs,
    CommandKind::SandboxTerminalOpen,
    CommandKind::SandboxFilesList,
    CommandKind::SandboxFileGet,
    CommandKind::SandboxFilePutOpen,
    CommandKind::SandboxRepoClone,
];
/// Kinds owned by [`SandboxStreamControl`].
pub const STREAM_KINDS: &[CommandKind] = &[
    CommandKind::SandboxStreamAck,
    CommandKind::SandboxStreamCancel,
];
/// Kinds owned by [`SandboxUploads`].
pub const UPLOAD_KINDS: &[CommandKind] = &[CommandKind::SandboxFilePutChunk];

/// Flow control of one outgoing stream: chunks are numbered from 1, and the
/// sender may run at most `window` chunks ahead of the last acknowledged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamWindow {
    window: u64,
    sent: u64,
    acked: u64,
}

impl StreamWindow {
    /// `window` 0 means [`DEFAULT_WINDOW`]; larger than [`MAX_WINDOW`] is capped.
    pub fn new(window: u32) -> StreamWindow {
        let window = match window {
            0 => DEFAULT_WINDOW,
            w => w.min(MAX_WINDOW),
        };
        StreamWindow {
            window: u64::from(window),
            sent: 0,
            acked: 0,
        }
    }

    pub fn window(&self) -> u64 {
        self.window
    }

    /// Whether another chunk may go out now.
    pub fn may_send(&self) -> bool {
        self.sent - self.acked < self.window
    }

    /// Takes the number of the next chunk. Call only when [`may_send`](Self::may_send).
    pub fn next_seq(&mut self) -> u64 {
        debug_assert!(self.may_send());
        self.sent += 1;
        self.sent
    }

    /// Records an acknowledgement; stale or future numbers change nothing
    /// beyond what was sent.
    pub fn ack(&mut self, seq: u64) {
        self.acked = self.acked.max(seq.min(self.sent));
    }

    pub fn in_flight(&self) -> u64 {
        self.sent - self.acked
    }
}

/// Splits `data` into pieces of at most `max` bytes (at least one piece,
/// empty data gives none).
pub fn split_chunks(data: &[u8], max: usize) -> impl Iterator<Item = &[u8]> {
    data.chunks(max.max(1))
}

/// The last `limit` bytes written, for error messages.
#[derive(Debug, Default)]
pub struct Tail {
    bytes: Vec<u8>,
    limit: usize,
}

impl Tail {
    pub fn new(limit: usize) -> Tail {
        Tail {
            bytes: Vec::new(),
            limit,
        }
    }

    pub fn push(&mut self, data: &[u8]) {
        self.bytes.extend_from_slice(data);
        if self.bytes.len() > self.limit {
            let cut = self.bytes.len() - self.limit;
            self.bytes.drain(..cut);
        }
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.bytes).trim().to_owned()
    }
}

/// Why a file operation failed, from the message of the tool in the
/// container ("No such file or directory", "Is a directory", ...).
pub fn classify_file_error(path: &str, message: &str) -> CommandError {
    let lower = message.to_ascii_lowercase();
    let (code, what) = if lower.contains("no such file") || lower.contains("not found") {
        (ErrorCode::NotFound, "does not exist")
    } else if lower.contains("is a directory") {
        (ErrorCode::FailedPrecondition, "is a directory")
    } else if lower.contains("not a directory") {
        (
            ErrorCode::FailedPrecondition,
            "has a parent that is not a directory",
        )
    } else if lower.contains("permission denied")
        || lower.contains("read-only file system")
        || lower.contains("operation not permitted")
    {
        (ErrorCode::PermissionDenied, "is not accessible")
    } else {
        (ErrorCode::Internal, "failed")
    };
    CommandError::new(code, format!("`{path}` {what}: {}", message.trim()))
}

/// Parses one line of `stat -c '%F|%s|%a|%Y|%n'`.
pub fn parse_stat_line(line: &str) -> Option<SandboxFileEntry> {
    let mut parts = line.splitn(5, '|');
    let kind = parts.next()?;
    let size = parts.next()?.parse().ok()?;
    let mode = u32::from_str_radix(parts.next()?, 8).ok()?;
    let modified: i64 = parts.next()?.parse().ok()?;
    let name = parts.next()?.to_owned();
    let kind = match kind {
        "regular file" | "regular empty file" => "file",
        "directory" => "directory",
        "symbolic link" => "symlink",
        _ => "other",
    };
    Some(SandboxFileEntry {
        name,
        kind: kind.to_owned(),
        size,
        mode,
        modified_at_ms: modified.saturating_mul(1000),
    })
}

const STAT_FORMAT: &str = "%F|%s|%a|%Y|%n";

struct StreamControl {
    acked: watch::Sender<u64>,
    cancel: CancellationToken,
}

struct Upload {
    next_seq: u64,
    data: mpsc::Sender<Vec<u8>>,
    done: oneshot::Receiver<Result<u64, CommandError>>,
    path: String,
}

/// State shared by the three modules.
pub struct SandboxIoState {
    runtime: Arc<dyn Runtime>,
    terminals: Arc<HostTerminal>,
    streams: Mutex<HashMap<String, StreamControl>>,
    uploads: Mutex<HashMap<String, Upload>>,
    /// Cancelled (and replaced) when the control stream drops.
    lost: Mutex<CancellationToken>,
}

fn locked<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn engine_error(what: &str, err: RuntimeError) -> CommandError {
    let code = match &err {
        RuntimeError::NotFound(_) => ErrorCode::NotFound,
        // "Container ... is not running", "is paused".
        RuntimeError::Conflict(_) => ErrorCode::FailedPrecondition,
        RuntimeError::Invalid(_) => ErrorCode::InvalidArgument,
        RuntimeError::Unavailable(_) => ErrorCode::Unavailable,
        RuntimeError::Engine(_) => ErrorCode::Internal,
    };
    CommandError::new(code, format!("{what}: {err}"))
}

/// How long [`SandboxIoState::exit_code`] waits for an exec to be reaped.
const EXIT_CODE_WAIT: Duration = Duration::from_secs(5);

/// What an exec printed and how it ended.
struct Captured {
    exit_code: i64,
    stdout: Vec<u8>,
    stderr: Tail,
}

impl SandboxIoState {
    /// Over the host's container runtime; without an engine every command
    /// answers why.
    pub fn new(terminals: Arc<HostTerminal>, runtime: Arc<dyn Runtime>) -> Arc<SandboxIoState> {
        Arc::new(SandboxIoState {
            runtime,
            terminals,
            streams: Mutex::new(HashMap::new()),
            uploads: Mutex::new(HashMap::new()),
            lost: Mutex::new(CancellationToken::new()),
        })
    }

    fn lost_token(&self) -> CancellationToken {
        locked(&self.lost).clone()
    }

    /// Starts `cmd` in the container, attached.
    async fn exec(
        &self,
        container: &str,
        cmd: Vec<String>,
        stdin: bool,
        tty: bool,
    ) -> Result<Exec, CommandError> {
        let program = cmd.first().cloned().unwrap_or_default();
        let spec = ExecSpec {
            cmd,
            stdin,
            tty,
            env: if tty {
                vec!["TERM=xterm-256color".to_owned()]
            } else {
                Vec::new()
            },
        };
        self.runtime
            .exec(container, &spec)
            .await
            .map_err(|e| engine_error(&format!("`{program}` in container `{container}`"), e))
    }

    /// The exit code of an exec whose output ended (-1 when unknown).
    async fn exit_code(&self, exec_id: &str) -> i64 {
        // The exit code is set once the process is reaped, just after its
        // output ends: poll briefly.
        let deadline = tokio::time::Instant::now() + EXIT_CODE_WAIT;
        loop {
            match self.runtime.inspect_exec(exec_id).await {
                Ok(state) if !state.running => return state.exit_code.unwrap_or(-1),
                Ok(_) if tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(20)).await
                }
                _ => return -1,
            }
        }
    }

    /// Runs `cmd` to its end, keeping at most `limit` bytes of stdout.
    async fn capture(
        &self,
        container: &str,
        cmd: Vec<String>,
        limit: usize,
    ) -> Result<Captured, CommandError> {
        let Exec {
            id: exec_id,
            mut output,
            ..
        } = self.exec(container, cmd, false, false).await?;
        let mut stdout = Vec::new();
        let mut stderr = Tail::new(ERROR_TAIL);
        while let Some(item) = output.next().await {
            match item {
                Ok(OutputChunk {
                    source: OutputSource::Stdout | OutputSource::Console,
                    data,
                }) => {
                    if stdout.len() + data.len() > limit {
                        return Err(CommandError::new(
                            ErrorCode::FailedPrecondition,
                            format!("the output is longer than {limit} bytes"),
                        ));
                    }
                    stdout.extend_from_slice(&data);
                }
                Ok(OutputChunk {
                    source: OutputSource::Stderr,
                    data,
                }) => stderr.push(&data),
                Err(e) => return Err(engine_error("exec output", e)),
            }
        }
        let exit_code = self.exit_code(&exec_id).await;
        Ok(Captured {
            exit_code,
            stdout,
            stderr,
        })
    }

    /// `stat` of one path.
    async fn stat(&self, container: &str, path: &str) -> Result<SandboxFileEntry, CommandError> {
        let out = self
            .capture(
                container,
                vec![
                    "stat".into(),
                    "-c".into(),
                    STAT_FORMAT.into(),
                    "--".into(),
                    path.into(),
                ],
                64 * 1024,
            )
            .await?;
        if out.exit_code != 0 {
            return Err(classify_file_error(path, &exec_message(&out)));
        }
        let text = String::from_utf8_lossy(&out.stdout);
        text.lines()
            .next()
            .and_then(parse_stat_line)
            .ok_or_else(|| {
                CommandError::new(
                    ErrorCode::Internal,
                    format!("`stat` in the container printed `{}`", text.trim()),
                )
            })
    }

    async fn list(&self, container: &str, path: &str) -> CommandOutcome {
        check_path(path)?;
        let entry = self.stat(container, path).await?;
        if entry.kind != "directory" {
            return Ok(command_result::Kind::SandboxFileListing(
                SandboxFileListing {
                    path: path.to_owned(),
                    entries: vec![entry],
                },
            ));
        }
        let out = self
            .capture(
                container,
                vec![
                    "find".into(),
                    path.into(),
                    "-mindepth".into(),
                    "1".into(),
                    "-maxdepth".into(),
                    "1".into(),
                    "-exec".into(),
                    "stat".into(),
                    "-c".into(),
                    STAT_FORMAT.into(),
                    "{}".into(),
                    "+".into(),
                ],
                MAX_LISTING,
            )
            .await?;
        if out.exit_code != 0 {
            return Err(classify_file_error(path, &exec_message(&out)));
        }
        let mut entries: Vec<SandboxFileEntry> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(parse_stat_line)
            .map(|mut e| {
                if let Some((_, name)) = e.name.rsplit_once('/') {
                    e.name = name.to_owned();
                }
                e
            })
            .collect();
        entries.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(command_result::Kind::SandboxFileListing(
            SandboxFileListing {
                path: path.to_owned(),
                entries,
            },
        ))
    }

    fn register_stream(&self, stream_id: &str) -> Result<StreamEnds, CommandError> {
        if stream_id.trim().is_empty() {
            return Err(CommandError::new(
                ErrorCode::InvalidArgument,
                "stream without an id",
            ));
        }
        let mut streams = locked(&self.streams);
        if streams.contains_key(stream_id) {
            return Err(CommandError::new(
                ErrorCode::AlreadyExists,
                format!("stream `{stream_id}` is already open"),
            ));
        }
        let (acked_tx, acked) = watch::channel(0);
        let cancel = self.lost_token().child_token();
        streams.insert(
            stream_id.to_owned(),
            StreamControl {
                acked: acked_tx,
                cancel: cancel.clone(),
            },
        );
        Ok(StreamEnds { acked, cancel })
    }

    fn remove_stream(&self, stream_id: &str) {
        locked(&self.streams).remove(stream_id);
    }
}

/// Rows and columns of a terminal size.
fn winsize(size: pty_process::Size) -> (u16, u16) {
    let w = rustix::termios::Winsize::from(size);
    (w.ws_row, w.ws_col)
}

fn exec_message(out: &Captured) -> String {
    let text = out.stderr.text();
    if text.is_empty() {
        format!("exit code {}", out.exit_code)
    } else {
        text
    }
}

fn check_path(path: &str) -> Result<(), CommandError> {
    if !path.starts_with('/') || path.contains('\0') {
        return Err(CommandError::new(
            ErrorCode::InvalidArgument,
            format!("`{path}` is not an absolute path in the sandbox"),
        ));
    }
    Ok(())
}

fn container_of<'a>(sandbox_id: &'a str, container_id: &'a str) -> Result<&'a str, CommandError> {
    if !container_id.is_empty() {
        return Ok(container_id);
    }
    Err(CommandError::new(
        ErrorCode::FailedPrecondition,
        format!("sandbox `{sandbox_id}` has no container"),
    ))
}

struct StreamEnds {
    acked: watch::Receiver<u64>,
    cancel: CancellationToken,
}

/// A piece of a stream's source: bytes (with "stdout"/"stderr" for logs),
/// or an error that ends it.
type Piece = Result<(String, Vec<u8>), String>;

/// Sends `source` as chunks with flow control, then the end. Returns the
/// bytes sent.
async fn pump(
    link: &Link,
    request_id: &str,
    stream_id: &str,
    window: u32,
    source: impl Stream<Item = Piece>,
    mut ends: StreamEnds,
    end_reason: &str,
) -> (u64, Option<String>) {
    let mut flow = StreamWindow::new(window);
    let mut bytes = 0u64;
    let mut failure = None;
    let mut reason = end_reason.to_owned();
    tokio::pin!(source);
    'outer: loop {
        let piece = tokio::select! {
            piece = source.next() => piece,
            () = ends.cancel.cancelled() => { reason = "cancelled".to_owned(); break; }
        };
        let (origin, data) = match piece {
            None => break,
            Some(Err(e)) => {
                failure = Some(e);
                break;
            }
            Some(Ok(p)) => p,
        };
        for part in split_chunks(&data, CHUNK) {
            while !flow.may_send() {
                tokio::select! {
                    changed = ends.acked.changed() => {
                        if changed.is_err() { reason = "cancelled".to_owned(); break 'outer; }
                        flow.ack(*ends.acked.borrow_and_update());
                    }
                    () = ends.cancel.cancelled() => { reason = "cancelled".to_owned(); break 'outer; }
                }
            }
            let seq = flow.next_seq();
            bytes += part.len() as u64;
            let mut ev = make_event("sandbox.stream.chunk", EventLevel::Debug, "");
            ev.request_id = request_id.to_owned();
            ev.payload = Some(event::Payload::SandboxStreamChunk(SandboxStreamChunk {
                stream_id: stream_id.to_owned(),
                seq,
                data: part.to_vec(),
                source: origin.clone(),
            }));
            if link.send_event(ev).await.is_err() {
                break 'outer;
            }
        }
    }
    let chunks = flow.sent;
    let mut ev = make_event("sandbox.stream.end", EventLevel::Debug, "");
    ev.request_id = request_id.to_owned();
    ev.payload = Some(event::Payload::SandboxStreamEnd(SandboxStreamEnd {
        stream_id: stream_id.to_owned(),
        chunks,
        bytes,
        error: failure.clone().unwrap_or_default(),
        reason,
    }));
    let _ = link.send_event(ev).await;
    (bytes, failure)
}

/// Logs, terminals, listings, downloads, upload opens and clones.
pub struct SandboxIo {
    state: Arc<SandboxIoState>,
}

/// Stream acknowledgements and cancels.
pub struct SandboxStreamControl {
    state: Arc<SandboxIoState>,
}

/// Upload chunks, written in order.
pub struct SandboxUploads {
    state: Arc<SandboxIoState>,
}

/// The three modules over one state.
pub fn modules(
    terminals: Arc<HostTerminal>,
    runtime: Arc<dyn Runtime>,
) -> (
    Arc<SandboxIo>,
    Arc<SandboxStreamControl>,
    Arc<SandboxUploads>,
) {
    let state = SandboxIoState::new(terminals, runtime);
    (
        Arc::new(SandboxIo {
            state: state.clone(),
        }),
        Arc::new(SandboxStreamControl {
            state: state.clone(),
        }),
        Arc::new(SandboxUploads { state }),
    )
}

impl SandboxIo {
    async fn logs(
        &self,
        request_id: String,
        req: proto::SandboxLogs,
        link: Link,
    ) -> CommandOutcome {
        let container = container_of(&req.sandbox_id, &req.container_id)?.to_owned();
        // Fails at once on a container the engine does not know.
        let logs = self
            .state
            .runtime
            .logs(
                &container,
                LogsRequest {
                    follow: req.follow,
                    tail: u64::from(req.tail),
                },
            )
            .await
            .map_err(|e| engine_error(&format!("sandbox `{}`", req.sandbox_id), e))?;
        let ends = self.state.register_stream(&req.stream_id)?;
        let state = self.state.clone();
        tokio::spawn(async move {
            link.reply_sent().await;
            let source = logs.map(|item| match item {
                Ok(OutputChunk {
                    source: OutputSource::Stderr,
                    data,
                }) => Ok(("stderr".to_owned(), data)),
                Ok(OutputChunk { data, .. }) => Ok(("stdout".to_owned(), data)),
                Err(e) => Err(format!("container logs: {e}")),
            });
            let reason = if req.follow {
                "the container stopped"
            } else {
                "end of the logs"
            };
            pump(
                &link,
                &request_id,
                &req.stream_id,
                req.window,
                source,
                ends,
                reason,
            )
            .await;
            state.remove_stream(&req.stream_id);
        });
        Ok(command_result::Kind::Ack(proto::Ack {}))
    }

    async fn get(
        &self,
        request_id: String,
        req: proto::SandboxFileGet,
        link: Link,
    ) -> CommandOutcome {
        let container = container_of(&req.sandbox_id, &req.container_id)?.to_owned();
        check_path(&req.path)?;
        let entry = self.state.stat(&container, &req.path).await?;
        if entry.kind == "directory" {
            return Err(CommandError::new(
                ErrorCode::FailedPrecondition,
                format!(
                    "`{}` is a directory; give the path of a file (`files ls` lists it)",
                    req.path
                ),
            ));
        }
        let Exec {
            id: exec_id,
            output,
            ..
        } = self
            .state
            .exec(
                &container,
                vec!["cat".into(), "--".into(), req.path.clone()],
                false,
                false,
            )
            .await?;
        let ends = self.state.register_stream(&req.stream_id)?;
        let state = self.state.clone();
        let path = req.path.clone();
        let info_path = req.path.clone();
        tokio::spawn(async move {
            link.reply_sent().await;
            let stderr = Arc::new(Mutex::new(Tail::new(ERROR_TAIL)));
            let errors = stderr.clone();
            let source = output.filter_map(move |item| {
                let piece = match item {
                    Ok(OutputChunk {
                        source: OutputSource::Stdout | OutputSource::Console,
                        data,
                    }) => Some(Ok((String::new(), data))),
                    Ok(OutputChunk {
                        source: OutputSource::Stderr,
                        data,
                    }) => {
                        locked(&errors).push(&data);
                        None
                    }
                    Err(e) => Some(Err(format!("reading `{path}`: {e}"))),
                };
                std::future::ready(piece)
            });
            // The exit status decides whether a short read was an error:
            // it is checked before the end is sent.
            let checked = CheckedExit {
                state: state.clone(),
                exec_id,
                path: req.path.clone(),
                stderr,
            };
            let source = source
                .chain(futures::stream::once(checked.verdict()).filter_map(std::future::ready));
            pump(
                &link,
                &request_id,
                &req.stream_id,
                req.window,
                source,
                ends,
                "end of file",
            )
            .await;
            state.remove_stream(&req.stream_id);
        });
        Ok(command_result::Kind::SandboxFileInfo(SandboxFileInfo {
            path: info_path,
            size: entry.size,
            mode: entry.mode,
        }))
    }

    async fn put_open(&self, req: proto::SandboxFilePutOpen) -> CommandOutcome {
        let container = container_of(&req.sandbox_id, &req.container_id)?.to_owned();
        check_path(&req.path)?;
        if req.stream_id.trim().is_empty() {
            return Err(CommandError::new(
                ErrorCode::InvalidArgument,
                "upload without a stream id",
            ));
        }
        if locked(&self.state.uploads).contains_key(&req.stream_id) {
            return Err(CommandError::new(
                ErrorCode::AlreadyExists,
                format!("upload `{}` is already open", req.stream_id),
            ));
        }
        match self.state.stat(&container, &req.path).await {
            Ok(entry) if entry.kind == "directory" => {
                return Err(CommandError::new(
                    ErrorCode::FailedPrecondition,
                    format!(
                        "`{}` is a directory; give the path of the file to write",
                        req.path
                    ),
                ))
            }
            Ok(_) => {}
            Err(e) if e.code == ErrorCode::NotFound => {}
            Err(e) => return Err(e),
        }
        let Exec {
            id: exec_id,
            mut output,
            mut input,
        } = self
            .state
            .exec(
                &container,
                vec![
                    "dd".into(),
                    format!("of={}", req.path),
                    format!("bs={CHUNK}"),
                ],
                true,
                false,
            )
            .await?;
        let (data_tx, mut data_rx) = mpsc::channel::<Vec<u8>>(UPLOAD_QUEUE);
        let (done_tx, done) = oneshot::channel();
        let state = self.state.clone();
        let path = req.path.clone();
        let lost = self.state.lost_token();
        tokio::spawn(async move {
            // Writing and reading run side by side: when `dd` ends early
            // (it could not open the file) the engine stops reading its
            // input, so a pending write must not keep us from seeing the end.
            let writer = async move {
                let mut written = 0u64;
                while let Some(data) = data_rx.recv().await {
                    input.write_all(&data).await.map_err(|e| e.to_string())?;
                    written += data.len() as u64;
                }
                input.shutdown().await.map_err(|e| e.to_string())?;
                Ok::<u64, String>(written)
            };
            let reader = async move {
                let mut stderr = Tail::new(ERROR_TAIL);
                while let Some(item) = output.next().await {
                    match item {
                        Ok(OutputChunk {
                            source: OutputSource::Stderr,
                            data,
                        }) => stderr.push(&data),
                        Ok(_) => {}
                        Err(e) => {
                            stderr.push(e.to_string().as_bytes());
                            break;
                        }
                    }
                }
                stderr
            };
            tokio::pin!(writer, reader);
            let mut written = 0u64;
            let mut write_error = None;
            let stderr = tokio::select! {
                wrote = &mut writer => {
                    match wrote {
                        Ok(n) => written = n,
                        Err(e) => write_error = Some(e),
                    }
                    tokio::select! {
                        stderr = &mut reader => stderr,
                        () = lost.cancelled() => {
                            write_error = Some("the control stream was lost".into());
                            Tail::new(ERROR_TAIL)
                        }
                    }
                }
                // The process ended before its input did: dropping the
                // writer drops the queue, so the next chunk fails at once.
                stderr = &mut reader => {
                    write_error = Some("the writer ended before the end of the upload".into());
                    stderr
                }
                () = lost.cancelled() => {
                    write_error = Some("the control stream was lost".into());
                    Tail::new(ERROR_TAIL)
                }
            };
            let exit_code = state.exit_code(&exec_id).await;
            let outcome = if exit_code == 0 && write_error.is_none() {
                Ok(written)
            } else {
                let message = match (stderr.text(), write_error) {
                    (text, _) if !text.is_empty() => text,
                    (_, Some(e)) => e,
                    _ => format!("`dd` exited with code {exit_code}"),
                };
                Err(classify_file_error(&path, &message))
            };
            let _ = done_tx.send(outcome);
        });
        locked(&self.state.uploads).insert(
            req.stream_id.clone(),
            Upload {
                next_seq: 1,
                data: data_tx,
                done,
                path: req.path,
            },
        );
        Ok(command_result::Kind::Ack(proto::Ack {}))
    }

    async fn repo_clone(
        &self,
        request_id: String,
        req: proto::SandboxRepoClone,
        link: Link,
    ) -> CommandOutcome {
        let container = container_of(&req.sandbox_id, &req.container_id)?.to_owned();
        check_path(&req.path)?;
        if req.url.trim().is_empty() {
            return Err(CommandError::new(
                ErrorCode::InvalidArgument,
                "repository bootstrap without a url",
            ));
        }
        let mut ev = make_event(
            "sandbox.repo.cloning",
            EventLevel::Info,
            format!("cloning {} into {}", req.url, req.path),
        );
        ev.request_id = request_id;
        ev.payload = Some(event::Payload::SandboxRepoStatus(SandboxRepoStatus {
            sandbox_id: req.sandbox_id.clone(),
            status: "cloning".to_owned(),
            error: String::new(),
        }));
        let _ = link.send_event(ev).await;
        // A clone started again (its first run was cut off with the
        // control stream) finds the first one's work done.
        let probe = vec![
            "git".to_owned(),
            "-C".to_owned(),
            req.path.clone(),
            "config".to_owned(),
            "--get".to_owned(),
            "remote.origin.url".to_owned(),
        ];
        if let Ok(out) = self.state.capture(&container, probe, 64 * 1024).await {
            if out.exit_code == 0 && String::from_utf8_lossy(&out.stdout).trim() == req.url {
                tracing::info!(sandbox = %req.sandbox_id, path = %req.path, "repository already cloned");
                return Ok(command_result::Kind::SandboxRepoResult(SandboxRepoStatus {
                    sandbox_id: req.sandbox_id,
                    status: "ready".to_owned(),
                    error: String::new(),
                }));
            }
        }
        let mut cmd = vec!["git".to_owned(), "clone".to_owned()];
        if !req.branch.is_empty() {
            cmd.push("--branch".to_owned());
            cmd.push(req.branch.clone());
        }
        cmd.push("--".to_owned());
        cmd.push(req.url.clone());
        cmd.push(req.path.clone());
        let (status, error) = match self.state.capture(&container, cmd, 64 * 1024).await {
            Ok(out) if out.exit_code == 0 => ("ready", String::new()),
            Ok(out) => ("failed", format!("git clone: {}", exec_message(&out))),
            Err(e) => ("failed", e.message),
        };
        tracing::info!(sandbox = %req.sandbox_id, status, error, "repository bootstrap");
        Ok(command_result::Kind::SandboxRepoResult(SandboxRepoStatus {
            sandbox_id: req.sandbox_id,
            status: status.to_owned(),
            error,
        }))
    }

    async fn terminal(
        &self,
        request_id: String,
        req: proto::SandboxTerminalOpen,
        link: Link,
    ) -> CommandOutcome {
        let container = container_of(&req.sandbox_id, &req.container_id)?.to_owned();
        let command = if req.command.is_empty() {
            vec!["/bin/sh".to_owned()]
        } else {
            req.command.clone()
        };
        let size = pty_size(req.rows, req.cols);
        let Exec {
            id: exec_id,
            output,
            input,
        } = self.state.exec(&container, command, true, true).await?;
        let ends = self
            .state
            .terminals
            .register_session(&req.session_id, size)?;
        let (rows, cols) = winsize(size);
        if let Err(err) = self.state.runtime.resize_exec(&exec_id, rows, cols).await {
            tracing::debug!(session_id = %req.session_id, "sandbox terminal not resized: {err}");
        }
        let max_duration = match req.max_duration_secs {
            0 => DEFAULT_MAX_DURATION,
            s => Duration::from_secs(u64::from(s)),
        };
        tracing::info!(sandbox = %req.sandbox_id, session_id = %req.session_id, requested_by = %req.requested_by, "sandbox terminal opened");
        let state = self.state.clone();
        let session_id = req.session_id.clone();
        tokio::spawn(async move {
            link.reply_sent().await;
            let run = ExecTerminal {
                state: state.clone(),
                exec_id,
                session_id: session_id.clone(),
                request_id,
                link,
                max_duration,
            };
            run.run(output, input, ends).await;
            state.terminals.remove_session(&session_id);
        });
        Ok(command_result::Kind::TerminalOpened(TerminalOpened {
            session_id: req.session_id,
        }))
    }
}

/// The exit status of a download's `cat`, turned into the stream's error.
struct CheckedExit {
    state: Arc<SandboxIoState>,
    exec_id: String,
    path: String,
    stderr: Arc<Mutex<Tail>>,
}

impl CheckedExit {
    async fn verdict(self) -> Option<Piece> {
        let code = self.state.exit_code(&self.exec_id).await;
        if code == 0 {
            return None;
        }
        let text = locked(&self.stderr).text();
        let message = if text.is_empty() {
            format!("`cat` exited with code {code}")
        } else {
            text
        };
        Some(Err(classify_file_error(&self.path, &message).message))
    }
}

struct ExecTerminal {
    state: Arc<SandboxIoState>,
    exec_id: String,
    session_id: String,
    request_id: String,
    link: Link,
    max_duration: Duration,
}

impl ExecTerminal {
    async fn run(self, mut output: OutputStream, mut input: InputSink, mut ends: SessionEnds) {
        let expire = tokio::time::sleep(self.max_duration + EXPIRY_BACKSTOP);
        tokio::pin!(expire);
        let mut end_reason: Option<String> = None;
        loop {
            tokio::select! {
                item = output.next() => match item {
                    Some(Ok(OutputChunk { data, .. })) => {
                        let mut ev = make_event("terminal.output", EventLevel::Debug, "");
                        ev.request_id = self.request_id.clone();
                        ev.payload = Some(event::Payload::TerminalOutput(TerminalOutput {
                            session_id: self.session_id.clone(),
                            data,
                        }));
                        if self.link.send_event(ev).await.is_err() {
                            end_reason = Some("the control stream was lost".into());
                            break;
                        }
                    }
                    Some(Err(e)) => { end_reason = Some(format!("the engine's stream broke: {e}")); break; }
                    None => break,
                },
                Some(data) = ends.input.recv() => {
                    if let Err(e) = input.write_all(&data).await {
                        tracing::debug!(session_id = %self.session_id, "sandbox terminal input not written: {e}");
                    }
                }
                Ok(()) = ends.resize.changed() => {
                    let (rows, cols) = winsize(*ends.resize.borrow_and_update());
                    if let Err(err) = self.state.runtime.resize_exec(&self.exec_id, rows, cols).await {
                        tracing::debug!(session_id = %self.session_id, "sandbox terminal not resized: {err}");
                    }
                }
                () = ends.close.cancelled() => { end_reason = Some("closed by the control plane".into()); break; }
                () = ends.lost.cancelled() => { end_reason = Some("the control stream was lost".into()); break; }
                () = &mut expire => { end_reason = Some(format!("session expired after {}s", self.max_duration.as_secs())); break; }
            }
        }
        let exit_code = if end_reason.is_some() {
            // Ended from outside: the process must not outlive the session.
            if let Err(err) = self.state.runtime.kill_exec(&self.exec_id).await {
                tracing::warn!(session_id = %self.session_id, "sandbox terminal process not killed: {err}");
            }
            137
        } else {
            i32::try_from(self.state.exit_code(&self.exec_id).await).unwrap_or(-1)
        };
        let reason = end_reason.unwrap_or_else(|| "exited".to_owned());
        let mut exit = make_event(
            "terminal.exit",
            EventLevel::Info,
            format!(
                "sandbox terminal `{}` ended ({reason}), exit code {exit_code}",
                self.session_id
            ),
        );
        exit.request_id = self.request_id.clone();
        exit.fields
            .insert("session_id".into(), self.session_id.clone());
        exit.payload = Some(event::Payload::TerminalExit(TerminalExit {
            session_id: self.session_id.clone(),
            exit_code,
            reason,
        }));
        let _ = self.link.send_event(exit).await;
    }
}

impl Module for SandboxIo {
    fn name(&self) -> &'static str {
        "sandbox_io"
    }

    fn stream_lost(&self) {
        let fresh = CancellationToken::new();
        let old = std::mem::replace(&mut *locked(&self.state.lost), fresh);
        old.cancel();
        locked(&self.state.streams).clear();
        locked(&self.state.uploads).clear();
    }

    fn handle(self: Arc<Self>, command: Command, link: Link) -> HandlerFuture {
        Box::pin(async move {
            let request_id = command.request_id;
            match command.kind {
                Some(command::Kind::SandboxLogs(req)) => self.logs(request_id, req, link).await,
                Some(command::Kind::SandboxFileGet(req)) => self.get(request_id, req, link).await,
                Some(command::Kind::SandboxFilesList(req)) => {
                    let container = container_of(&req.sandbox_id, &req.container_id)?;
                    self.state.list(container, &req.path).await
                }
                Some(command::Kind::SandboxFilePutOpen(req)) => self.put_open(req).await,
                Some(command::Kind::SandboxRepoClone(req)) => {
                    self.repo_clone(request_id, req, link).await
                }
                Some(command::Kind::SandboxTerminalOpen(req)) => {
                    self.terminal(request_id, req, link).await
                }
                _ => Err(CommandError::new(
                    ErrorCode::InvalidArgument,
                    "not a sandbox io command",
                )),
            }
        })
    }
}

impl Module for SandboxStreamControl {
    fn name(&self) -> &'static str {
        "sandbox_streams"
    }

    fn handle(self: Arc<Self>, command: Command, _link: Link) -> HandlerFuture {
        Box::pin(async move {
            let streams = locked(&self.state.streams);
            match command.kind {
                Some(command::Kind::SandboxStreamAck(ack)) => {
                    if let Some(stream) = streams.get(&ack.stream_id) {
                        stream.acked.send_if_modified(|acked| {
                            let moved = ack.seq > *acked;
                            *acked = (*acked).max(ack.seq);
                            moved
                        });
                    }
                    // An ack for a stream that just ended is not an error.
                    Ok(command_result::Kind::Ack(proto::Ack {}))
                }
                Some(command::Kind::SandboxStreamCancel(cancel)) => {
                    if let Some(stream) = streams.get(&cancel.stream_id) {
                        stream.cancel.cancel();
                    }
                    Ok(command_result::Kind::Ack(proto::Ack {}))
                }
                _ => Err(CommandError::new(
                    ErrorCode::InvalidArgument,
                    "not a sandbox stream command",
                )),
            }
        })
    }
}

impl Module for SandboxUploads {
    fn name(&self) -> &'static str {
        "sandbox_uploads"
    }

    fn handle(self: Arc<Self>, command: Command, _link: Link) -> HandlerFuture {
        Box::pin(async move {
            let Some(command::Kind::SandboxFilePutChunk(chunk)) = command.kind else {
                return Err(CommandError::new(
                    ErrorCode::InvalidArgument,
                    "not a sandbox upload command",
                ));
            };
            let (sender, expected) = {
                let mut uploads = locked(&self.state.uploads);
                let upload = uploads.get_mut(&chunk.stream_id).ok_or_else(|| {
                    CommandError::new(
                        ErrorCode::NotFound,
                        format!("no upload `{}` on this host", chunk.stream_id),
                    )
                })?;
                let expected = upload.next_seq;
                if chunk.seq == expected {
                    upload.next_seq += 1;
                }
                (upload.data.clone(), expected)
            };
            if chunk.seq != expected {
                locked(&self.state.uploads).remove(&chunk.stream_id);
                return Err(CommandError::new(
                    ErrorCode::InvalidArgument,
                    format!(
                        "upload `{}`: chunk {} arrived, {expected} was expected",
                        chunk.stream_id, chunk.seq
                    ),
                ));
            }
            if !chunk.data.is_empty() && sender.send(chunk.data).await.is_err() {
                // The writer ended early: its outcome says why.
                return match finish_upload(&self.state, &chunk.stream_id).await {
                    Err(e) => Err(e),
                    Ok(_) => Err(CommandError::new(
                        ErrorCode::Internal,
                        "the writer stopped before the end of the upload",
                    )),
                };
            }
            if !chunk.last {
                return Ok(command_result::Kind::Ack(proto::Ack {}));
            }
            drop(sender);
            finish_upload(&self.state, &chunk.stream_id).await
        })
    }
}

async fn finish_upload(state: &SandboxIoState, stream_id: &str) -> CommandOutcome {
    let upload = locked(&state.uploads).remove(stream_id).ok_or_else(|| {
        CommandError::new(ErrorCode::NotFound, format!("no upload `{stream_id}`"))
    })?;
    let Upload {
        data, done, path, ..
    } = upload;
    drop(data);
    let written = done
        .await
        .map_err(|_| CommandError::new(ErrorCode::Internal, "the upload's writer vanished"))??;
    Ok(command_result::Kind::SandboxFileInfo(SandboxFileInfo {
        path,
        size: written,
        mode: 0,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_bounds_chunks_in_flight() {
        let mut w = StreamWindow::new(3);
        assert_eq!(w.window(), 3);
        let seqs: Vec<u64> = (0..3).map(|_| w.next_seq()).collect();
        assert_eq!(seqs, [1, 2, 3]);
        assert!(!w.may_send());
        w.ack(1);
        assert!(w.may_send());
        assert_eq!(w.next_seq(), 4);
        assert!(!w.may_send());
        // A stale ack changes nothing; an ack beyond what was sent is capped.
        w.ack(0);
        assert_eq!(w.in_flight(), 3);
        w.ack(99);
        assert_eq!(w.in_flight(), 0);
        assert_eq!(w.next_seq(), 5);
        assert_eq!(w.in_flight(), 1);
    }

    #[test]
    fn window_defaults_and_caps() {
        assert_eq!(StreamWindow::new(0).window(), u64::from(DEFAULT_WINDOW));
        assert_eq!(StreamWindow::new(100_000).window(), u64::from(MAX_WINDOW));
    }

    #[test]
    fn chunks_are_at_most_the_limit_and_cover_the_data() {
        let data: Vec<u8> = (0..200_000u32).map(|i| i as u8).collect();
        let parts: Vec<&[u8]> = split_chunks(&data, CHUNK).collect();
        assert_eq!(parts.len(), 4);
        assert!(parts.iter().all(|p| p.len() <= CHUNK));
        assert_eq!(parts.concat(), data);
        assert_eq!(split_chunks(&[], CHUNK).count(), 0);
    }

    #[test]
    fn tail_keeps_the_last_bytes() {
        let mut t = Tail::new(5);
        t.push(b"abc");
        t.push(b"defgh");
        assert_eq!(t.text(), "defgh");
    }

    #[test]
    fn stat_lines_parse() {
        let e = parse_stat_line("regular file|12|644|1700000000|/etc/hostname").unwrap();
        assert_eq!(e.kind, "file");
        assert_eq!(e.size, 12);
        assert_eq!(e.mode, 0o644);
        assert_eq!(e.modified_at_ms, 1_700_000_000_000);
        assert_eq!(e.name, "/etc/hostname");
        let d = parse_stat_line("directory|4096|755|1|/a|b").unwrap();
        assert_eq!((d.kind.as_str(), d.name.as_str()), ("directory", "/a|b"));
        assert_eq!(
            parse_stat_line("regular empty file|0|600|1|/x")
                .unwrap()
                .kind,
            "file"
        );
        assert!(parse_stat_line("garbage").is_none());
        assert!(parse_stat_line("file|x|644|1|/a").is_none());
    }

    #[test]
    fn file_errors_are_classified() {
        let e = classify_file_error(
            "/nope",
            "cat: can't open '/nope': No such file or directory",
        );
        assert_eq!(e.code, ErrorCode::NotFound);
        assert!(
            e.message.contains("`/nope` does not exist"),
            "{}",
            e.message
        );
        let e = classify_file_error("/etc", "cat: read error: Is a directory");
        assert_eq!(e.code, ErrorCode::FailedPrecondition);
        let e = classify_file_error("/root/x", "dd: can't open '/root/x': Permission denied");
        assert_eq!(e.code, ErrorCode::PermissionDenied);
        let e = classify_file_error("/sys/x", "dd: can't open '/sys/x': Read-only file system");
        assert_eq!(e.code, ErrorCode::PermissionDenied);
        assert_eq!(classify_file_error("/x", "weird").code, ErrorCode::Internal);
    }

    #[test]
    fn paths_must_be_absolute() {
        assert!(check_path("/etc/hostname").is_ok());
        assert_eq!(
            check_path("etc").unwrap_err().code,
            ErrorCode::InvalidArgument
        );
        assert!(check_path("/a\0b").is_err());
    }

    /// The pump never has more than `window` chunks unacknowledged, and
    /// sends everything once acks come.
    #[tokio::test]
    async fn pump_waits_for_acknowledgements() {
        let (link, mut rx) = Link::channel(1024);
        let (acked_tx, acked) = watch::channel(0u64);
        let cancel = CancellationToken::new();
        let data = vec![7u8; CHUNK * 10 + 5];
        let source = futures::stream::iter(vec![Ok((String::new(), data.clone()))]);
        let task = tokio::spawn(async move {
            pump(
                &link,
                "req-1",
                "str-1",
                4,
                source,
                StreamEnds { acked, cancel },
                "end of file",
            )
            .await
        });
        let mut received = Vec::new();
        let mut highest = 0u64;
        loop {
            let message = rx.recv().await.unwrap();
            let Some(proto::agent_message::Body::Event(ev)) = message.body else {
                panic!()
            };
            match ev.payload {
                Some(event::Payload::SandboxStreamChunk(c)) => {
                    assert_eq!(c.seq, highest + 1);
                    highest = c.seq;
                    assert!(
                        highest - *acked_tx.borrow() <= 4,
                        "window overrun at {highest}"
                    );
                    received.extend_from_slice(&c.data);
                    // Ack every other chunk, late.
                    if highest.is_multiple_of(2) {
                        acked_tx.send_replace(highest - 1);
                    }
                    if rx.is_empty() && highest - *acked_tx.borrow() == 4 {
                        acked_tx.send_replace(highest);
                    }
                }
                Some(event::Payload::SandboxStreamEnd(end)) => {
                    assert_eq!(end.chunks, 11);
                    assert_eq!(end.bytes, data.len() as u64);
                    assert!(end.error.is_empty());
                    break;
                }
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(received, data);
        assert_eq!(task.await.unwrap(), (data.len() as u64, None));
    }

    #[tokio::test]
    async fn pump_stops_when_cancelled() {
        let (link, mut rx) = Link::channel(64);
        let (_acked_tx, acked) = watch::channel(0u64);
        let cancel = CancellationToken::new();
        let source = futures::stream::iter(vec![Ok((String::new(), vec![1u8; CHUNK * 8]))]);
        let stop = cancel.clone();
        let task = tokio::spawn(async move {
            pump(
                &link,
                "req-1",
                "str-1",
                2,
                source,
                StreamEnds { acked, cancel },
                "end",
            )
            .await
        });
        let mut chunks = 0;
        while chunks < 2 {
            if let Some(proto::agent_message::Body::Event(ev)) = rx.recv().await.unwrap().body {
                if matches!(ev.payload, Some(event::Payload::SandboxStreamChunk(_))) {
                    chunks += 1;
                }
            }
        }
        stop.cancel();
        let (bytes, _) = task.await.unwrap();
        assert_eq!(bytes, (CHUNK * 2) as u64);
        let Some(proto::agent_message::Body::Event(ev)) = rx.recv().await.unwrap().body else {
            panic!()
        };
        let Some(event::Payload::SandboxStreamEnd(end)) = ev.payload else {
            panic!()
        };
        assert_eq!(end.reason, "cancelled");
    }

    // ---- the modules over a fake runtime ----

    use crate::sandbox::fake::{ExecCall, FakeRuntime};
    use futures::FutureExt;
    use tokio::io::AsyncReadExt;

    struct Harness {
        fake: Arc<FakeRuntime>,
        terminals: Arc<HostTerminal>,
        io: Arc<SandboxIo>,
        uploads: Arc<SandboxUploads>,
    }

    fn harness() -> Harness {
        let fake = Arc::new(FakeRuntime::default());
        fake.add_running("c1", &[]);
        let terminals = HostTerminal::new(false);
        let (io, _, uploads) = modules(terminals.clone(), fake.clone());
        Harness {
            fake,
            terminals,
            io,
            uploads,
        }
    }

    fn cmd(kind: command::Kind) -> Command {
        Command {
            request_id: "req-1".into(),
            kind: Some(kind),
            ..Default::default()
        }
    }

    /// The events sent on `rx` up to and including the first that `last`
    /// accepts.
    async fn events_until(
        rx: &mut mpsc::Receiver<proto::AgentMessage>,
        last: impl Fn(&proto::Event) -> bool,
    ) -> Vec<proto::Event> {
        let mut events = Vec::new();
        loop {
            let message = tokio::time::timeout(Duration::from_secs(10), rx.recv())
                .await
                .expect("an event within 10 s")
                .expect("the link is open");
            if let Some(proto::agent_message::Body::Event(ev)) = message.body {
                let done = last(&ev);
                events.push(ev);
                if done {
                    return events;
                }
            }
        }
    }

    fn is_stream_end(ev: &proto::Event) -> bool {
        matches!(ev.payload, Some(event::Payload::SandboxStreamEnd(_)))
    }

    #[tokio::test]
    async fn logs_stream_from_the_runtime_with_their_source_and_tail() {
        let h = harness();
        let line = |source, text: &str| OutputChunk {
            source,
            data: text.as_bytes().to_vec(),
        };
        h.fake.state().logs.insert(
            "c1".into(),
            vec![
                line(OutputSource::Stdout, "one\n"),
                line(OutputSource::Stderr, "two\n"),
                line(OutputSource::Stdout, "three\n"),
            ],
        );
        let (link, mut rx) = Link::channel(64);
        let logs = |container: &str, tail| {
            cmd(command::Kind::SandboxLogs(proto::SandboxLogs {
                stream_id: "s1".into(),
                sandbox_id: "sbx_1".into(),
                container_id: container.into(),
                tail,
                ..Default::default()
            }))
        };
        let outcome = h.io.clone().handle(logs("c1", 2), link.clone()).await;
        assert!(
            matches!(outcome, Ok(command_result::Kind::Ack(_))),
            "{outcome:?}"
        );
        let events = events_until(&mut rx, is_stream_end).await;
        let chunks: Vec<(String, String)> = events
            .iter()
            .filter_map(|ev| match &ev.payload {
                Some(event::Payload::SandboxStreamChunk(c)) => Some((
                    c.source.clone(),
                    String::from_utf8_lossy(&c.data).into_owned(),
                )),
                _ => None,
            })
            .collect();
        assert_eq!(
            chunks,
            [
                ("stderr".to_owned(), "two\n".to_owned()),
                ("stdout".to_owned(), "three\n".to_owned())
            ]
        );
        let Some(event::Payload::SandboxStreamEnd(end)) = &events.last().unwrap().payload else {
            unreachable!()
        };
        assert_eq!((end.chunks, end.bytes), (2, 10));
        assert_eq!(end.reason, "end of the logs");
        assert!(end.error.is_empty());

        // A container the engine does not know: the engine's message, at once.
        let err =
            h.io.clone()
                .handle(logs("gone", 0), link)
                .await
                .unwrap_err();
        assert_eq!(err.code, ErrorCode::NotFound);
        assert_eq!(err.message, "sandbox `sbx_1`: No such container: gone");
        // No container at all in the record.
        let (link, _rx) = Link::channel(4);
        let err = h.io.clone().handle(logs("", 0), link).await.unwrap_err();
        assert_eq!(err.code, ErrorCode::FailedPrecondition);
    }

    /// A shell of sorts: answers each line of input, exits on `exit N`.
    fn shell(mut call: ExecCall) -> futures::future::BoxFuture<'static, i64> {
        async move {
            let mut typed = Vec::new();
            let mut buf = [0u8; 256];
            loop {
                let n = call.stdin.read(&mut buf).await.unwrap_or(0);
                if n == 0 {
                    return 0;
                }
                typed.extend_from_slice(&buf[..n]);
                while let Some(end) = typed.iter().position(|b| *b == b'\n') {
                    let line = String::from_utf8_lossy(&typed[..end]).trim().to_owned();
                    typed.drain(..=end);
                    if let Some(code) = line.strip_prefix("exit ") {
                        return code.parse().unwrap_or(1);
                    }
                    call.stdout(&format!("ran: {line}\r\n")).await;
                }
            }
        }
        .boxed()
    }

    fn open_terminal(session: &str, command: &[&str]) -> Command {
        cmd(command::Kind::SandboxTerminalOpen(
            proto::SandboxTerminalOpen {
                session_id: session.into(),
                sandbox_id: "sbx_1".into(),
                container_id: "c1".into(),
                rows: 30,
                cols: 100,
                command: command.iter().map(|c| (*c).to_owned()).collect(),
                ..Default::default()
            },
        ))
    }

    async fn terminal_input(h: &Harness, session: &str, data: &str) {
        let (link, _rx) = Link::channel(4);
        h.terminals
            .clone()
            .handle(
                cmd(command::Kind::TerminalInput(proto::TerminalInput {
                    session_id: session.into(),
                    data: data.as_bytes().to_vec(),
                })),
                link,
            )
            .await
            .unwrap();
    }

    fn terminal_exit(events: &[proto::Event]) -> &TerminalExit {
        match &events.last().unwrap().payload {
            Some(event::Payload::TerminalExit(exit)) => exit,
            other => panic!("{other:?}"),
        }
    }

    fn is_exit(ev: &proto::Event) -> bool {
        matches!(ev.payload, Some(event::Payload::TerminalExit(_)))
    }

    #[tokio::test]
    async fn a_terminal_runs_a_command_shows_its_output_and_exit_code() {
        let h = harness();
        h.fake.script(shell);
        let (link, mut rx) = Link::channel(64);
        let opened = h.io.clone().handle(open_terminal("t1", &[]), link).await;
        assert!(
            matches!(opened, Ok(command_result::Kind::TerminalOpened(_))),
            "{opened:?}"
        );
        assert_eq!(h.fake.state().exec_log, [["/bin/sh"]]);
        // The size the terminal opened with reaches the engine, and so does a resize.
        let resized = |h: &Harness| -> Vec<(u16, u16)> {
            h.fake
                .state()
                .resized
                .iter()
                .map(|(_, rows, cols)| (*rows, *cols))
                .collect()
        };
        assert_eq!(resized(&h), [(30, 100)]);
        let (link, _rx) = Link::channel(4);
        h.terminals
            .clone()
            .handle(
                cmd(command::Kind::TerminalResize(proto::TerminalResize {
                    session_id: "t1".into(),
                    rows: 50,
                    cols: 132,
                })),
                link,
            )
            .await
            .unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while resized(&h).len() < 2 && tokio::time::Instant::now() < deadline {
            tokio::task::yield_now().await;
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(resized(&h), [(30, 100), (50, 132)]);
        terminal_input(&h, "t1", "echo hi\nexit 3\n").await;
        let events = events_until(&mut rx, is_exit).await;
        let output: String = events
            .iter()
            .filter_map(|ev| match &ev.payload {
                Some(event::Payload::TerminalOutput(o)) => {
                    Some(String::from_utf8_lossy(&o.data).into_owned())
                }
                _ => None,
            })
            .collect();
        assert_eq!(output, "ran: echo hi\r\n");
        let exit = terminal_exit(&events);
        assert_eq!((exit.exit_code, exit.reason.as_str()), (3, "exited"));
        assert!(h.fake.state().killed.is_empty());

        // Closed by the control plane: the process is killed, not left behind.
        let (link, mut rx) = Link::channel(64);
        h.io.clone()
            .handle(open_terminal("t2", &["sleep", "60"]), link)
            .await
            .unwrap();
        let (close_link, _rx) = Link::channel(4);
        h.terminals
            .clone()
            .handle(
                cmd(command::Kind::TerminalClose(proto::TerminalClose {
                    session_id: "t2".into(),
                })),
                close_link,
            )
            .await
            .unwrap();
        let events = events_until(&mut rx, is_exit).await;
        let exit = terminal_exit(&events);
        assert_eq!(exit.exit_code, 137);
        assert_eq!(exit.reason, "closed by the control plane");
        assert_eq!(h.fake.state().killed.len(), 1);

        // A stopped container: the engine's refusal, and no session left.
        h.fake.state().containers.get_mut("c1").unwrap().1.running = false;
        let (link, _rx) = Link::channel(4);
        let err =
            h.io.clone()
                .handle(open_terminal("t3", &[]), link)
                .await
                .unwrap_err();
        assert_eq!(err.code, ErrorCode::FailedPrecondition);
        assert!(
            err.message.contains("Container c1 is not running"),
            "{}",
            err.message
        );
    }

    /// `stat`, `cat` and `dd` over one in-memory file system.
    fn files(
        fs: Arc<Mutex<HashMap<String, Vec<u8>>>>,
    ) -> impl Fn(ExecCall) -> futures::future::BoxFuture<'static, i64> + Send + Sync + 'static {
        move |mut call: ExecCall| {
            let fs = fs.clone();
            async move {
                let cmd = call.spec.cmd.clone();
                match cmd[0].as_str() {
                    "stat" => {
                        let path = cmd.last().unwrap();
                        let size = locked(&fs).get(path).map(Vec::len);
                        match size {
                            Some(size) => {
                                call.stdout(&format!(
                                    "regular file|{size}|644|1700000000|{path}\n"
                                ))
                                .await;
                                0
                            }
                            None if path == "/tmp" => {
                                call.stdout("directory|4096|1777|1700000000|/tmp\n").await;
                                0
                            }
                            None => {
                                call.stderr(&format!(
                                    "stat: can't stat '{path}': No such file or directory\n"
                                ))
                                .await;
                                1
                            }
                        }
                    }
                    "cat" => {
                        let path = cmd.last().unwrap();
                        let data = locked(&fs).get(path).cloned().unwrap_or_default();
                        for part in data.chunks(1000) {
                            call.stdout(&String::from_utf8_lossy(part)).await;
                        }
                        0
                    }
                    "dd" => {
                        let path = cmd[1].trim_start_matches("of=").to_owned();
                        let mut data = Vec::new();
                        call.stdin.read_to_end(&mut data).await.unwrap();
                        locked(&fs).insert(path, data);
                        0
                    }
                    other => {
                        call.stderr(&format!("{other}: not found")).await;
                        127
                    }
                }
            }
            .boxed()
        }
    }

    #[tokio::test]
    async fn files_go_in_and_out_through_execs() {
        let h = harness();
        let fs = Arc::new(Mutex::new(HashMap::new()));
        h.fake.script(files(fs.clone()));
        let content: Vec<u8> = (0..5000u32).map(|i| b'a' + (i % 26) as u8).collect();
        let (link, _rx) = Link::channel(4);
        let opened =
            h.io.clone()
                .handle(
                    cmd(command::Kind::SandboxFilePutOpen(
                        proto::SandboxFilePutOpen {
                            stream_id: "up1".into(),
                            sandbox_id: "sbx_1".into(),
                            container_id: "c1".into(),
                            path: "/tmp/f".into(),
                        },
                    )),
                    link,
                )
                .await;
        assert!(
            matches!(opened, Ok(command_result::Kind::Ack(_))),
            "{opened:?}"
        );
        let parts: Vec<&[u8]> = content.chunks(2048).collect();
        for (i, part) in parts.iter().enumerate() {
            let (link, _rx) = Link::channel(4);
            let outcome = h
                .uploads
                .clone()
                .handle(
                    cmd(command::Kind::SandboxFilePutChunk(
                        proto::SandboxFilePutChunk {
                            stream_id: "up1".into(),
                            seq: i as u64 + 1,
                            data: part.to_vec(),
                            last: i + 1 == parts.len(),
                        },
                    )),
                    link,
                )
                .await
                .unwrap();
            if i + 1 == parts.len() {
                let command_result::Kind::SandboxFileInfo(info) = outcome else {
                    panic!("{outcome:?}")
                };
                assert_eq!(info.size, content.len() as u64);
            }
        }
        assert_eq!(locked(&fs)["/tmp/f"], content);

        let (link, mut rx) = Link::channel(64);
        let info =
            h.io.clone()
                .handle(
                    cmd(command::Kind::SandboxFileGet(proto::SandboxFileGet {
                        stream_id: "down1".into(),
                        sandbox_id: "sbx_1".into(),
                        container_id: "c1".into(),
                        path: "/tmp/f".into(),
                        window: 0,
                    })),
                    link.clone(),
                )
                .await
                .unwrap();
        let command_result::Kind::SandboxFileInfo(info) = info else {
            panic!("{info:?}")
        };
        assert_eq!(info.size, 5000);
        let events = events_until(&mut rx, is_stream_end).await;
        let back: Vec<u8> = events
            .iter()
            .filter_map(|ev| match &ev.payload {
                Some(event::Payload::SandboxStreamChunk(c)) => Some(c.data.clone()),
                _ => None,
            })
            .flatten()
            .collect();
        assert_eq!(back, content);

        // The tool's own message, classified.
        let get = |path: &str| {
            cmd(command::Kind::SandboxFileGet(proto::SandboxFileGet {
                stream_id: "down2".into(),
                sandbox_id: "sbx_1".into(),
                container_id: "c1".into(),
                path: path.into(),
                window: 0,
            }))
        };
        let err =
            h.io.clone()
                .handle(get("/nope"), link.clone())
                .await
                .unwrap_err();
        assert_eq!(err.code, ErrorCode::NotFound);
        assert!(
            err.message
                .starts_with("`/nope` does not exist: stat: can't stat"),
            "{}",
            err.message
        );
        let err = h.io.clone().handle(get("/tmp"), link).await.unwrap_err();
        assert_eq!(err.code, ErrorCode::FailedPrecondition);
    }

    fn clone_cmd(url: &str) -> Command {
        cmd(command::Kind::SandboxRepoClone(proto::SandboxRepoClone {
            sandbox_id: "sbx_1".into(),
            container_id: "c1".into(),
            url: url.into(),
            branch: "dev".into(),
            path: "/work/app".into(),
        }))
    }

    fn repo_result(outcome: CommandOutcome) -> SandboxRepoStatus {
        match outcome {
            Ok(command_result::Kind::SandboxRepoResult(r)) => r,
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn repository_clone_ready_failed_and_already_done() {
        let h = harness();
        // The clone of `good` works and leaves a repository behind; `missing`
        // is refused by the server.
        let cloned = Arc::new(Mutex::new(None::<String>));
        let done = cloned.clone();
        h.fake.script(move |call: ExecCall| {
            let done = done.clone();
            async move {
                let cmd = call.spec.cmd.clone();
                match (cmd[0].as_str(), cmd[1].as_str()) {
                    ("git", "-C") => {
                        let cloned = locked(&done).clone();
                        match cloned {
                        Some(url) => {
                            call.stdout(&format!("{url}\n")).await;
                            0
                        }
                        None => {
                            call.stderr("fatal: cannot change to '/work/app': No such file or directory").await;
                            128
                        }
                    }
                    }
                    ("git", "clone") => {
                        let url = cmd[cmd.len() - 2].clone();
                        if url.contains("missing") {
                            call.stderr("Cloning into '/work/app'...\nfatal: remote error: access denied or repository not exported: /missing.git\n").await;
                            128
                        } else {
                            *locked(&done) = Some(url);
                            0
                        }
                    }
                    _ => 127,
                }
            }
            .boxed()
        });
        let (link, mut rx) = Link::channel(64);
        let failed = repo_result(
            h.io.clone()
                .handle(clone_cmd("git://10.0.0.1/missing.git"), link.clone())
                .await,
        );
        assert_eq!(failed.status, "failed");
        assert!(
            failed.error.starts_with("git clone: ")
                && failed.error.contains("repository not exported"),
            "{}",
            failed.error
        );
        let events = events_until(&mut rx, |_| true).await;
        assert_eq!(events[0].kind, "sandbox.repo.cloning");

        let url = "git://10.0.0.1/app.git";
        let ready = repo_result(h.io.clone().handle(clone_cmd(url), link.clone()).await);
        assert_eq!((ready.status.as_str(), ready.error.as_str()), ("ready", ""));
        let clones = |h: &Harness| {
            h.fake
                .state()
                .exec_log
                .iter()
                .filter(|c| c[1] == "clone")
                .cloned()
                .collect::<Vec<_>>()
        };
        assert_eq!(
            clones(&h).last().unwrap(),
            &["git", "clone", "--branch", "dev", "--", url, "/work/app"]
        );
        // Asked again (the first answer was lost with the stream): ready,
        // without a second clone into the same path.
        let again = repo_result(h.io.clone().handle(clone_cmd(url), link.clone()).await);
        assert_eq!(again.status, "ready");
        assert_eq!(clones(&h).len(), 2);

        // The container stopped: the bootstrap fails with the engine's word.
        h.fake.state().containers.get_mut("c1").unwrap().1.running = false;
        let stopped = repo_result(h.io.clone().handle(clone_cmd(url), link).await);
        assert_eq!(stopped.status, "failed");
        assert!(
            stopped.error.contains("is not running"),
            "{}",
            stopped.error
        );
    }
}
