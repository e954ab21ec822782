//! Sandbox logs, terminal, files and repository bootstrap, control side:
//! each operator call becomes typed commands on the sandbox's host stream
//! (`SandboxLogs`, `SandboxTerminalOpen`, `SandboxFilesList`,
//! `SandboxFileGet`, `SandboxFilePut*`, `SandboxRepoClone`), and the agent's
//! chunks come back as events routed by stream id. No shell anywhere.
//!
//! Flow control: outgoing streams (logs, downloads) are acknowledged to the
//! agent only after the chunk was handed to the operator's gRPC stream, so
//! a slow reader stops the agent after `window` chunks (see
//! `agent::sandbox_io::StreamWindow`). Uploads keep at most
//! [`UPLOAD_WINDOW`] chunks unanswered on the host stream. Memory at the
//! control plane is therefore bounded by a few windows of 64 KiB chunks
//! per transfer, whatever the file size.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tonic::{Status, Streaming};

use crate::error::ControlError;
use crate::plane::ControlPlane;
use crate::sessions::{HostSession, StreamFeed};
use crate::store::{Sandbox, SandboxStatus};
use crate::terminal::OpenTerminal;
use proto::{command, command_result, EventLevel};

/// Largest chunk sent to or accepted from the agent.
pub const CHUNK: usize = 64 * 1024;
/// Chunks the agent may send ahead of our acknowledgements.
pub const STREAM_WINDOW: u32 = 16;
/// Upload chunks in flight on the host stream.
pub const UPLOAD_WINDOW: usize = 8;
/// Time the agent has to open a stream, list a directory or take a chunk.
const OPEN_DEADLINE: Duration = Duration::from_secs(30);
/// Time the agent has to finish writing an upload after its last chunk.
const FINISH_DEADLINE: Duration = Duration::from_secs(300);
/// Time a repository clone may take.
pub const CLONE_DEADLINE: Duration = Duration::from_secs(15 * 60);
/// Messages queued towards an operator's stream.
const OUT_QUEUE: usize = 4;

/// An error for the operator: the agent's own message when it answered
/// one, with a gRPC code that matches it.
pub fn status_of(err: ControlError) -> Status {
    match err {
        ControlError::Agent { code, message, .. } => match code {
            proto::ErrorCode::NotFound => Status::not_found(message),
            proto::ErrorCode::PermissionDenied => Status::permission_denied(message),
            proto::ErrorCode::InvalidArgument => Status::invalid_argument(message),
            proto::ErrorCode::Unsupported => Status::unimplemented(message),
            proto::ErrorCode::Unavailable => Status::unavailable(message),
            _ => Status::failed_precondition(message),
        },
        other => other.into(),
    }
}

/// When to acknowledge: every half window, so the agent never idles.
pub fn should_ack(delivered: u64, acked: u64, window: u32) -> bool {
    delivered > acked && delivered - acked >= u64::from((window / 2).max(1))
}

/// The sandbox, its container and its host's open stream, or why not.
pub fn sandbox_target(
    plane: &ControlPlane,
    id: &str,
    action: &str,
) -> Result<(Sandbox, Arc<HostSession>), Status> {
    let sandbox = plane.sandbox_record(id)?;
    ControlPlane::refuse_archived(&sandbox, action)?;
    if sandbox.container_id.is_empty() {
        return Err(ControlError::SandboxNoContainer {
            id: sandbox.id.clone(),
            status: sandbox.status.as_str(),
        }
        .into());
    }
    let host = plane.sandbox_host(&sandbox, action)?;
    Ok((sandbox, host))
}

/// Relays a stream's chunks to the operator's stream `out` (awaiting room
/// there), acknowledging them to the agent, until the end. Cancels the
/// stream on the agent when the operator goes away, also while no chunk
/// is flowing (an idle `--follow`).
async fn relay_stream<T>(
    host: Arc<HostSession>,
    stream_id: String,
    mut feed: mpsc::Receiver<StreamFeed>,
    out: &mpsc::Sender<Result<T, Status>>,
    wrap: impl Fn(proto::SandboxStreamChunk) -> T,
) -> Result<proto::SandboxStreamEnd, Status> {
    let mut acked = 0u64;
    let cancel = |host: Arc<HostSession>, stream_id: String| async move {
        let cancel = command::Kind::SandboxStreamCancel(proto::SandboxStreamCancel { stream_id });
        let _ = host.send_command(cancel).await;
    };
    let outcome = loop {
        let next = tokio::select! {
            next = feed.recv() => next,
            () = out.closed() => {
                cancel(host.clone(), stream_id.clone()).await;
                break Err(Status::cancelled("the reader went away"));
            }
        };
        match next {
            Some(StreamFeed::Chunk(chunk)) => {
                let seq = chunk.seq;
                if out.send(Ok(wrap(chunk))).await.is_err() {
                    cancel(host.clone(), stream_id.clone()).await;
                    break Err(Status::cancelled("the reader went away"));
                }
                if should_ack(seq, acked, STREAM_WINDOW) {
                    acked = seq;
                    let ack = command::Kind::SandboxStreamAck(proto::SandboxStreamAck {
                        stream_id: stream_id.clone(),
                        seq,
                    });
                    if host.send_command(ack).await.is_err() {
                        break Err(Status::unavailable("the host's stream closed"));
                    }
                }
            }
            Some(StreamFeed::End(end)) => break Ok(end),
            Some(StreamFeed::Closed(why)) => {
                break Err(Status::unavailable(format!(
                    "the host's stream closed: {why}"
                )))
            }
            None => break Err(Status::unavailable("the host's stream closed")),
        }
    };
    host.detach_stream(&stream_id);
    outcome
}

/// `SandboxLogs`: returns the receiving end of the operator's stream.
pub async fn logs(
    plane: &ControlPlane,
    request: proto::SandboxLogsRequest,
) -> Result<mpsc::Receiver<Result<proto::SandboxLogsChunk, Status>>, Status> {
    let (sandbox, host) = sandbox_target(plane, &request.id, "read")?;
    let stream_id = crate::secret::new_id("str");
    let (feed_tx, feed) = mpsc::channel(STREAM_WINDOW as usize + 2);
    host.attach_stream(&stream_id, feed_tx);
    let opened = host
        .request(
            command::Kind::SandboxLogs(proto::SandboxLogs {
                stream_id: stream_id.clone(),
                sandbox_id: sandbox.id.clone(),
                container_id: sandbox.container_id.clone(),
                follow: request.follow,
                tail: request.tail,
                window: STREAM_WINDOW,
            }),
            OPEN_DEADLINE,
        )
        .await;
    if let Err(err) = opened {
        host.detach_stream(&stream_id);
        return Err(status_of(err));
    }
    let (out_tx, out_rx) = mpsc::channel(OUT_QUEUE);
    tokio::spawn(async move {
        let ended = relay_stream(host, stream_id, feed, &out_tx, |chunk| {
            proto::SandboxLogsChunk {
                source: chunk.source,
                data: chunk.data,
            }
        })
        .await;
        match ended {
            Ok(end) if !end.error.is_empty() => {
                let _ = out_tx.send(Err(Status::aborted(end.error))).await;
            }
            Ok(_) => {}
            Err(status) if status.code() == tonic::Code::Cancelled => {}
            Err(status) => {
                let _ = out_tx.send(Err(status)).await;
            }
        }
    });
    Ok(out_rx)
}

/// `SandboxFilesList`.
pub async fn list(
    plane: &ControlPlane,
    request: proto::SandboxFilesListRequest,
) -> Result<proto::SandboxFilesListResponse, Status> {
    let (sandbox, host) = sandbox_target(plane, &request.id, "read")?;
    let result = host
        .request(
            command::Kind::SandboxFilesList(proto::SandboxFilesList {
                sandbox_id: sandbox.id,
                container_id: sandbox.container_id,
                path: request.path,
            }),
            OPEN_DEADLINE,
        )
        .await
        .map_err(status_of)?;
    match result.kind {
        Some(command_result::Kind::SandboxFileListing(listing)) => {
            Ok(proto::SandboxFilesListResponse {
                path: listing.path,
                entries: listing.entries,
            })
        }
        other => Err(Status::internal(format!(
            "the agent answered a listing with {other:?}"
        ))),
    }
}

/// `SandboxFileGet`: the file's info, then its bytes.
pub async fn get(
    plane: &ControlPlane,
    request: proto::SandboxFileGetRequest,
) -> Result<mpsc::Receiver<Result<proto::SandboxFileData, Status>>, Status> {
    use proto::sandbox_file_data::Body;
    let (sandbox, host) = sandbox_target(plane, &request.id, "read")?;
    let stream_id = crate::secret::new_id("str");
    let (feed_tx, feed) = mpsc::channel(STREAM_WINDOW as usize + 2);
    host.attach_stream(&stream_id, feed_tx);
    let opened = host
        .request(
            command::Kind::SandboxFileGet(proto::SandboxFileGet {
                stream_id: stream_id.clone(),
                sandbox_id: sandbox.id.clone(),
                container_id: sandbox.container_id.clone(),
                path: request.path.clone(),
                window: STREAM_WINDOW,
            }),
            OPEN_DEADLINE,
        )
        .await;
    let info = match opened {
        Ok(proto::CommandResult {
            kind: Some(command_result::Kind::SandboxFileInfo(info)),
        }) => info,
        Ok(other) => {
            host.detach_stream(&stream_id);
            return Err(Status::internal(format!(
                "the agent answered a download with {other:?}"
            )));
        }
        Err(err) => {
            host.detach_stream(&stream_id);
            return Err(status_of(err));
        }
    };
    let (out_tx, out_rx) = mpsc::channel(OUT_QUEUE);
    tokio::spawn(async move {
        if out_tx
            .send(Ok(proto::SandboxFileData {
                body: Some(Body::Info(info)),
            }))
            .await
            .is_err()
        {
            let cancel = command::Kind::SandboxStreamCancel(proto::SandboxStreamCancel {
                stream_id: stream_id.clone(),
            });
            let _ = host.send_command(cancel).await;
            host.detach_stream(&stream_id);
            return;
        }
        let ended = relay_stream(host, stream_id, feed, &out_tx, |chunk| {
            proto::SandboxFileData {
                body: Some(Body::Data(chunk.data)),
            }
        })
        .await;
        let failure = match ended {
            Ok(end) if !end.error.is_empty() => Some(Status::aborted(end.error)),
            Ok(end) if end.reason == "cancelled" => {
                Some(Status::aborted("the download was cancelled on the host"))
            }
            Ok(_) => None,
            Err(status) if status.code() == tonic::Code::Cancelled => None,
            Err(status) => Some(status),
        };
        if let Some(status) = failure {
            let _ = out_tx.send(Err(status)).await;
        }
    });
    Ok(out_rx)
}

/// `SandboxFilePut`: the first message names the target, the rest carry
/// the bytes; answers once the file is complete in the sandbox.
pub async fn put(
    plane: &ControlPlane,
    mut input: Streaming<proto::SandboxFilePutMessage>,
) -> Result<proto::SandboxFilePutResponse, Status> {
    use proto::sandbox_file_put_message::Body;
    let first = input
        .message()
        .await?
        .ok_or_else(|| Status::invalid_argument("upload closed before its target"))?;
    let Some(Body::Target(target)) = first.body else {
        return Err(Status::invalid_argument(
            "the first message of an upload must name the sandbox and path",
        ));
    };
    let (sandbox, host) = sandbox_target(plane, &target.id, "written to")?;
    let stream_id = crate::secret::new_id("put");
    host.request(
        command::Kind::SandboxFilePutOpen(proto::SandboxFilePutOpen {
            stream_id: stream_id.clone(),
            sandbox_id: sandbox.id.clone(),
            container_id: sandbox.container_id.clone(),
            path: target.path.clone(),
        }),
        OPEN_DEADLINE,
    )
    .await
    .map_err(status_of)?;
    let mut in_flight = VecDeque::new();
    let mut seq = 0u64;
    let cancel = |host: Arc<HostSession>, stream_id: String| async move {
        // Ends the writer early (what was written stays, as with any
        // interrupted copy).
        let last = command::Kind::SandboxFilePutChunk(proto::SandboxFilePutChunk {
            stream_id,
            seq: u64::MAX,
            data: Vec::new(),
            last: true,
        });
        let _ = host.send_command(last).await;
    };
    loop {
        let message = match input.message().await {
            Ok(Some(m)) => m,
            Ok(None) => break,
            Err(status) => {
                cancel(host.clone(), stream_id.clone()).await;
                return Err(status);
            }
        };
        let Some(Body::Data(data)) = message.body else {
            cancel(host.clone(), stream_id.clone()).await;
            return Err(Status::invalid_argument(
                "an upload names its target only once",
            ));
        };
        for part in data.chunks(CHUNK) {
            seq += 1;
            let pending = host
                .send_request(
                    command::Kind::SandboxFilePutChunk(proto::SandboxFilePutChunk {
                        stream_id: stream_id.clone(),
                        seq,
                        data: part.to_vec(),
                        last: false,
                    }),
                    OPEN_DEADLINE,
                )
                .await
                .map_err(status_of)?;
            in_flight.push_back(pending);
            if in_flight.len() >= UPLOAD_WINDOW {
                if let Some(oldest) = in_flight.pop_front() {
                    oldest.await.map_err(status_of)?;
                }
            }
        }
    }
    seq += 1;
    let last = host
        .send_request(
            command::Kind::SandboxFilePutChunk(proto::SandboxFilePutChunk {
                stream_id,
                seq,
                data: Vec::new(),
                last: true,
            }),
            FINISH_DEADLINE,
        )
        .await
        .map_err(status_of)?;
    while let Some(pending) = in_flight.pop_front() {
        pending.await.map_err(status_of)?;
    }
    match last.await.map_err(status_of)?.kind {
        Some(command_result::Kind::SandboxFileInfo(info)) => Ok(proto::SandboxFilePutResponse {
            path: info.path,
            bytes: info.size,
        }),
        other => Err(Status::internal(format!(
            "the agent answered an upload with {other:?}"
        ))),
    }
}

/// A terminal in a sandbox: `TerminalOpenRequest.sandbox_id` on the
/// `HostTerminal` call. Relayed like a host terminal afterwards.
pub async fn open_terminal(
    plane: &ControlPlane,
    who: String,
    open: proto::TerminalOpenRequest,
) -> Result<OpenTerminal, Status> {
    let (sandbox, host) = sandbox_target(plane, open.sandbox_id.trim(), "opened")?;
    if sandbox.status != SandboxStatus::Running {
        return Err(Status::failed_precondition(format!(
            "sandbox `{}` is {}; a terminal needs it running",
            sandbox.id,
            sandbox.status.as_str()
        )));
    }
    let limit = plane.settings.terminal_max_duration;
    let expires_in = match open.max_duration_secs {
        0 => limit,
        secs => Duration::from_secs(u64::from(secs)).min(limit),
    };
    let size = open.size.unwrap_or_default();
    let session_id = crate::secret::new_id("trm");
    let (feed_tx, feed) = mpsc::channel(64);
    host.attach_terminal(&session_id, feed_tx);
    let opened = host
        .request(
            command::Kind::SandboxTerminalOpen(proto::SandboxTerminalOpen {
                session_id: session_id.clone(),
                sandbox_id: sandbox.id.clone(),
                container_id: sandbox.container_id.clone(),
                cols: size.cols,
                rows: size.rows,
                command: open.command.clone(),
                max_duration_secs: u32::try_from(expires_in.as_secs()).unwrap_or(u32::MAX),
                requested_by: who.clone(),
            }),
            OPEN_DEADLINE,
        )
        .await;
    if let Err(err) = opened {
        host.detach_terminal(&session_id);
        return Err(status_of(err));
    }
    plane.record_sandbox_event(
        &sandbox,
        "sandbox.terminal.opened",
        EventLevel::Info,
        format!("terminal {session_id} opened by {who}"),
        &[("session_id", &session_id), ("requested_by", &who)],
    );
    Ok(OpenTerminal::new(
        session_id,
        host,
        feed,
        expires_in,
        who,
        format!("sandbox terminal of {}", sandbox.id),
    ))
}

impl ControlPlane {
    /// Writes a repository status into the record (under the sandbox's
    /// lock, re-read so no other change is lost) and its history.
    async fn set_repo_status(&self, sandbox_id: &str, status: &str, error: &str) {
        let _guard = self.sandbox_locks.lock(sandbox_id).await;
        let mut sandbox = match self.sandbox_record(sandbox_id) {
            Ok(s) => s,
            Err(err) => {
                tracing::warn!(sandbox = sandbox_id, error = %err, "repository status not stored");
                return;
            }
        };
        if sandbox.repo.url.is_empty()
            || (sandbox.repo.status == status && sandbox.repo.error == error)
        {
            return;
        }
        sandbox.repo.status = status.to_owned();
        sandbox.repo.error = error.to_owned();
        if let Err(err) = self.save_sandbox(&mut sandbox) {
            tracing::warn!(sandbox = sandbox_id, error = %err, "repository status not stored");
            return;
        }
        let (level, message) = match status {
            "failed" => (
                EventLevel::Error,
                format!("repository {} failed: {error}", sandbox.repo.url),
            ),
            "ready" => (
                EventLevel::Info,
                format!(
                    "repository {} cloned into {}",
                    sandbox.repo.url, sandbox.repo.path
                ),
            ),
            _ => (
                EventLevel::Info,
                format!("repository {}: {status}", sandbox.repo.url),
            ),
        };
        self.record_sandbox_event(
            &sandbox,
            &format!("sandbox.repo.{status}"),
            level,
            message,
            &[("status", status), ("error", error)],
        );
    }

    /// A `SandboxRepoStatus` event of an agent (`cloning`): stored if the
    /// sandbox is this host's.
    pub async fn sandbox_repo_reported(&self, host_id: &str, status: proto::SandboxRepoStatus) {
        match self.store.sandbox(&status.sandbox_id) {
            Ok(Some(sandbox)) if sandbox.host_id == host_id => {
                self.set_repo_status(&status.sandbox_id, &status.status, &status.error)
                    .await
            }
            _ => tracing::debug!(
                host = host_id,
                sandbox = %status.sandbox_id,
                "repository status for a sandbox of another host"
            ),
        }
    }
}

/// The repository clones in flight on this control plane, by sandbox id:
/// one at a time per sandbox, whoever starts it (a create, a reprovision,
/// a reconnect's reconciliation).
#[derive(Debug, Default)]
pub struct RepoBootstraps(std::sync::Mutex<std::collections::HashSet<String>>);

impl RepoBootstraps {
    fn set(&self) -> std::sync::MutexGuard<'_, std::collections::HashSet<String>> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Whether a clone of the sandbox runs now.
    pub fn in_flight(&self, sandbox_id: &str) -> bool {
        self.set().contains(sandbox_id)
    }
}

/// Held while a clone runs; frees the sandbox's slot when dropped.
struct BootstrapClaim {
    plane: Arc<ControlPlane>,
    sandbox_id: String,
}

impl BootstrapClaim {
    fn take(plane: &Arc<ControlPlane>, sandbox_id: &str) -> Option<BootstrapClaim> {
        plane
            .repo_bootstraps
            .set()
            .insert(sandbox_id.to_owned())
            .then(|| BootstrapClaim {
                plane: plane.clone(),
                sandbox_id: sandbox_id.to_owned(),
            })
    }
}

impl Drop for BootstrapClaim {
    fn drop(&mut self) {
        self.plane.repo_bootstraps.set().remove(&self.sandbox_id);
    }
}

/// Whether the sandbox's repository is still to be cloned: it has one, it
/// runs, and the clone neither ended (`ready`, `failed`) nor runs now. A
/// `cloning` record that no clone of this control plane serves was cut off
/// (by a restart of the control plane) and is started again.
pub fn repo_bootstrap_due(sandbox: &Sandbox, in_flight: bool) -> bool {
    !sandbox.repo.url.is_empty()
        && sandbox.status == SandboxStatus::Running
        && matches!(sandbox.repo.status.as_str(), "pending" | "cloning")
        && !in_flight
}

/// The repository status an agent's answer to a clone gives: its own
/// verdict; `pending` again when the host went away before it answered
/// (the clone starts again when the host reconnects); `failed` otherwise.
pub fn clone_outcome(result: Result<proto::CommandResult, ControlError>) -> (String, String) {
    match result {
        Ok(proto::CommandResult {
            kind: Some(command_result::Kind::SandboxRepoResult(r)),
        }) => (r.status, r.error),
        Ok(other) => (
            "failed".to_owned(),
            format!("the agent answered the clone with {other:?}"),
        ),
        Err(ControlError::Agent { message, .. }) => ("failed".to_owned(), message),
        Err(err @ (ControlError::SessionClosed(_) | ControlError::CommandTimeout { .. })) => (
            "pending".to_owned(),
            format!("{err}; the clone starts again when the host reconnects"),
        ),
        Err(err) => ("failed".to_owned(), err.to_string()),
    }
}

/// Starts the repository bootstrap of a sandbox that was just created or
/// reprovisioned, if it has a repository and runs.
pub fn start_repo_bootstrap(plane: &Arc<ControlPlane>, sandbox: &Sandbox) {
    if repo_bootstrap_due(sandbox, plane.repo_bootstraps.in_flight(&sandbox.id)) {
        tokio::spawn(bootstrap_repo(plane.clone(), sandbox.id.clone()));
    }
}

/// After a host's reconnection (and on each resync): starts the clones of
/// its running sandboxes that are still due (cut off by the disconnection,
/// or of a create that was reconciled to `running`).
pub fn resume_repo_bootstraps(plane: &Arc<ControlPlane>, host_id: &str) {
    let running = plane.store.sandboxes(&crate::store::SandboxFilter {
        host_id: Some(host_id.to_owned()),
        statuses: vec![SandboxStatus::Running],
        ..Default::default()
    });
    match running {
        Ok(sandboxes) => {
            for sandbox in sandboxes {
                if repo_bootstrap_due(&sandbox, plane.repo_bootstraps.in_flight(&sandbox.id)) {
                    tracing::info!(sandbox = %sandbox.id, host = host_id, "repository bootstrap resumed");
                    start_repo_bootstrap(plane, &sandbox);
                }
            }
        }
        Err(err) => {
            tracing::warn!(host = host_id, error = %err, "repository bootstraps not resumed")
        }
    }
}

/// Repository bootstrap: once the sandbox runs, its agent clones the
/// repository inside the container. The status goes `pending` ->
/// `cloning` -> `ready` or `failed` with the error. A failed clone fails
/// the bootstrap, never the sandbox. A host that is away leaves it
/// `pending` until it reconnects.
pub async fn bootstrap_repo(plane: Arc<ControlPlane>, sandbox_id: String) {
    let Some(_claim) = BootstrapClaim::take(&plane, &sandbox_id) else {
        return;
    };
    let sandbox = match plane.sandbox_record(&sandbox_id) {
        Ok(s) => s,
        Err(_) => return,
    };
    if !repo_bootstrap_due(&sandbox, false) {
        return;
    }
    let host = match plane.sandbox_host(&sandbox, "bootstrapped") {
        Ok(h) => h,
        Err(err @ ControlError::SandboxHostUnavailable { .. }) => {
            tracing::info!(sandbox = %sandbox_id, reason = %err, "repository bootstrap waits for the host");
            return;
        }
        Err(err) => {
            plane
                .set_repo_status(&sandbox_id, "failed", &err.to_string())
                .await;
            return;
        }
    };
    let path = if sandbox.repo.path.is_empty() {
        "/workspace".to_owned()
    } else {
        sandbox.repo.path.clone()
    };
    plane.set_repo_status(&sandbox_id, "cloning", "").await;
    let result = host
        .request(
            command::Kind::SandboxRepoClone(proto::SandboxRepoClone {
                sandbox_id: sandbox.id.clone(),
                container_id: sandbox.container_id.clone(),
                url: sandbox.repo.url.clone(),
                branch: sandbox.repo.branch.clone(),
                path,
            }),
            CLONE_DEADLINE,
        )
        .await;
    let (status, error) = clone_outcome(result);
    plane.set_repo_status(&sandbox_id, &status, &error).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn repo_sandbox(status: SandboxStatus, repo_status: &str) -> Sandbox {
        Sandbox {
            id: "sbx_a".into(),
            cluster_id: "cls_default".into(),
            host_id: "hst_a".into(),
            name: "a".into(),
            image: "img:1".into(),
            image_digest: String::new(),
            blueprint_id: String::new(),
            status,
            status_message: String::new(),
            container_id: "c1".into(),
            container_name: "gstacks-sbx_a".into(),
            addresses: Vec::new(),
            docker_network: String::new(),
            tags: Vec::new(),
            traits: Vec::new(),
            volumes: Vec::new(),
            repo: crate::store::SandboxRepo {
                url: "git://10.0.0.1/app.git".into(),
                status: repo_status.into(),
                ..Default::default()
            },
            memory_bytes: 0,
            millicpus: 0,
            created_by: String::new(),
            created_at_ms: 1,
            updated_at_ms: 1,
            archived_at_ms: 0,
        }
    }

    #[test]
    fn a_clone_is_due_while_pending_or_cut_off() {
        for (status, repo, in_flight, due) in [
            (SandboxStatus::Running, "pending", false, true),
            // Cut off by a restart of the control plane: nobody serves it.
            (SandboxStatus::Running, "cloning", false, true),
            (SandboxStatus::Running, "cloning", true, false),
            (SandboxStatus::Running, "pending", true, false),
            (SandboxStatus::Running, "ready", false, false),
            (SandboxStatus::Running, "failed", false, false),
            // Waits for the container to run.
            (SandboxStatus::Provisioning, "pending", false, false),
            (SandboxStatus::Stopped, "pending", false, false),
            (SandboxStatus::Archived, "pending", false, false),
        ] {
            assert_eq!(
                repo_bootstrap_due(&repo_sandbox(status, repo), in_flight),
                due,
                "{status:?} {repo} in flight {in_flight}"
            );
        }
        let mut without = repo_sandbox(SandboxStatus::Running, "");
        without.repo.url.clear();
        assert!(!repo_bootstrap_due(&without, false));
    }

    #[test]
    fn a_clone_cut_off_by_the_host_is_pending_again() {
        let (status, error) = clone_outcome(Err(ControlError::SessionClosed("hst_a".into())));
        assert_eq!(status, "pending");
        assert!(
            error.ends_with("the clone starts again when the host reconnects"),
            "{error}"
        );
        let (status, error) = clone_outcome(Err(ControlError::Agent {
            host: "hst_a".into(),
            request_id: "r".into(),
            code: proto::ErrorCode::FailedPrecondition,
            message: "container is not running".into(),
        }));
        assert_eq!(
            (status.as_str(), error.as_str()),
            ("failed", "container is not running")
        );
        let (status, error) = clone_outcome(Ok(proto::CommandResult {
            kind: Some(command_result::Kind::SandboxRepoResult(
                proto::SandboxRepoStatus {
                    sandbox_id: "sbx_a".into(),
                    status: "ready".into(),
                    error: String::new(),
                },
            )),
        }));
        assert_eq!((status.as_str(), error.as_str()), ("ready", ""));
    }

    #[test]
    fn acks_go_every_half_window() {
        assert!(!should_ack(0, 0, 16));
        assert!(!should_ack(7, 0, 16));
        assert!(should_ack(8, 0, 16));
        assert!(!should_ack(8, 8, 16));
        assert!(should_ack(16, 8, 16));
        // A window of 1 acks every chunk.
        assert!(should_ack(1, 0, 1));
    }

    #[test]
    fn agent_errors_keep_their_message_and_code() {
        let status = status_of(ControlError::Agent {
            host: "hst_a".into(),
            request_id: "req-1".into(),
            code: proto::ErrorCode::NotFound,
            message: "`/nope` does not exist".into(),
        });
        assert_eq!(status.code(), tonic::Code::NotFound);
        assert_eq!(status.message(), "`/nope` does not exist");
        let status = status_of(ControlError::SandboxNotFound("sbx_x".into()));
        assert_eq!(status.code(), tonic::Code::NotFound);
    }
}
