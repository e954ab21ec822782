//! `gstacks sandbox logs|files`: the container's output and its files,
//! streamed through the control plane and the sandbox's host agent. Files
//! move in 64 KiB chunks in both directions, so neither end holds a whole
//! file in memory. (`sandbox terminal` is in `terminal`.)

use std::io::Write as _;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use tokio::io::AsyncReadExt as _;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::client::{status_error, Api};
use crate::output::{print_table, rfc3339};

/// Bytes per upload message.
const CHUNK: usize = 64 * 1024;

pub async fn logs(api: &mut Api, id: String, follow: bool, tail: u32) -> anyhow::Result<i32> {
    let mut stream = api
        .sandbox_logs(proto::SandboxLogsRequest { id, follow, tail })
        .await
        .map_err(status_error)?
        .into_inner();
    let mut stdout = std::io::stdout();
    let mut stderr = std::io::stderr();
    while let Some(chunk) = stream.message().await.map_err(status_error)? {
        let written = if chunk.source == "stderr" {
            stderr.write_all(&chunk.data).and_then(|()| stderr.flush())
        } else {
            stdout.write_all(&chunk.data).and_then(|()| stdout.flush())
        };
        if written.is_err() {
            // The reader of our output went away (a closed pipe).
            return Ok(0);
        }
    }
    Ok(0)
}

fn kind_letter(kind: &str) -> char {
    match kind {
        "directory" => 'd',
        "symlink" => 'l',
        "file" => '-',
        _ => '?',
    }
}

pub async fn list(api: &mut Api, id: String, path: String, json: bool) -> anyhow::Result<i32> {
    let listing = api
        .sandbox_files_list(proto::SandboxFilesListRequest { id, path })
        .await
        .map_err(status_error)?
        .into_inner();
    if json {
        let entries: Vec<serde_json::Value> = listing
            .entries
            .iter()
            .map(|e| {
                serde_json::json!({
                    "name": e.name,
                    "kind": e.kind,
                    "size": e.size,
                    "mode": format!("{:o}", e.mode),
                    "modified": rfc3339(e.modified_at_ms),
                })
            })
            .collect();
        println!(
            "{}",
            serde_json::json!({ "path": listing.path, "entries": entries })
        );
        return Ok(0);
    }
    let rows: Vec<Vec<String>> = listing
        .entries
        .iter()
        .map(|e| {
            vec![
                format!("{}{:04o}", kind_letter(&e.kind), e.mode),
                e.size.to_string(),
                rfc3339(e.modified_at_ms),
                e.name.clone(),
            ]
        })
        .collect();
    print_table(&["MODE", "SIZE", "MODIFIED", "NAME"], &rows);
    Ok(0)
}

/// Where a download goes when LOCAL is not given: the file's name here.
fn default_local(path: &str) -> anyhow::Result<PathBuf> {
    let name = path
        .trim_end_matches('/')
        .rsplit('/')
        .next()
        .filter(|n| !n.is_empty() && *n != "." && *n != "..")
        .with_context(|| format!("`{path}` names no file; give LOCAL"))?;
    Ok(PathBuf::from(name))
}

/// The partial file a download is written to before it is renamed.
fn partial_path(local: &Path) -> PathBuf {
    let name = local
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    local.with_file_name(format!(".{name}.gstacks-partial"))
}

pub async fn get(
    api: &mut Api,
    id: String,
    path: String,
    local: Option<PathBuf>,
) -> anyhow::Result<i32> {
    use proto::sandbox_file_data::Body;
    let local = match local {
        Some(l) => l,
        None => default_local(&path)?,
    };
    let to_stdout = local.as_os_str() == "-";
    let local = if !to_stdout && local.is_dir() {
        local.join(default_local(&path)?)
    } else {
        local
    };
    let mut stream = api
        .sandbox_file_get(proto::SandboxFileGetRequest {
            id,
            path: path.clone(),
        })
        .await
        .map_err(status_error)?
        .into_inner();
    let partial = partial_path(&local);
    let mut out: Box<dyn std::io::Write> = if to_stdout {
        Box::new(std::io::stdout().lock())
    } else {
        Box::new(std::io::BufWriter::with_capacity(
            CHUNK,
            std::fs::File::create(&partial)
                .with_context(|| format!("cannot write `{}`", partial.display()))?,
        ))
    };
    let mut received = 0u64;
    let mut expected = None;
    let result: anyhow::Result<()> = async {
        while let Some(message) = stream.message().await.map_err(status_error)? {
            match message.body {
                Some(Body::Info(info)) => expected = Some(info.size),
                Some(Body::Data(data)) => {
                    out.write_all(&data).context("writing the download")?;
                    received += data.len() as u64;
                }
                None => {}
            }
        }
        out.flush().context("writing the download")?;
        Ok(())
    }
    .await;
    drop(out);
    if let Err(err) = result {
        if !to_stdout {
            let _ = std::fs::remove_file(&partial);
        }
        return Err(err);
    }
    if !to_stdout {
        std::fs::rename(&partial, &local)
            .with_context(|| format!("cannot move the download to `{}`", local.display()))?;
        eprintln!(
            "{path} -> {} ({received} bytes{})",
            local.display(),
            match expected {
                Some(size) if size != received =>
                    format!("; the file was {size} bytes when the download began"),
                _ => String::new(),
            }
        );
    }
    Ok(0)
}

pub async fn put(api: &mut Api, id: String, path: String, local: PathBuf) -> anyhow::Result<i32> {
    use proto::sandbox_file_put_message::Body;
    let from_stdin = local.as_os_str() == "-";
    let mut reader: Box<dyn tokio::io::AsyncRead + Unpin + Send> = if from_stdin {
        Box::new(tokio::io::stdin())
    } else {
        let meta = std::fs::metadata(&local)
            .with_context(|| format!("cannot read `{}`", local.display()))?;
        anyhow::ensure!(
            !meta.is_dir(),
            "`{}` is a directory; give a file to upload",
            local.display()
        );
        Box::new(
            tokio::fs::File::open(&local)
                .await
                .with_context(|| format!("cannot read `{}`", local.display()))?,
        )
    };
    let (tx, rx) = mpsc::channel(4);
    tx.send(proto::SandboxFilePutMessage {
        body: Some(Body::Target(proto::SandboxFilePutTarget {
            id,
            path: path.clone(),
        })),
    })
    .await
    .context("queueing the upload")?;
    let shown = local.display().to_string();
    let reading = tokio::spawn(async move {
        loop {
            let mut buf = vec![0u8; CHUNK];
            let mut filled = 0;
            while filled < CHUNK {
                let n = reader.read(&mut buf[filled..]).await?;
                if n == 0 {
                    break;
                }
                filled += n;
            }
            if filled == 0 {
                return Ok::<(), std::io::Error>(());
            }
            buf.truncate(filled);
            let message = proto::SandboxFilePutMessage {
                body: Some(Body::Data(buf)),
            };
            if tx.send(message).await.is_err() {
                // The call ended (an error the control plane reports).
                return Ok(());
            }
        }
    });
    // A read error must not look like the end of the file: the call is
    // dropped (reset) instead, and the control plane ends the upload.
    let call = api.sandbox_file_put(ReceiverStream::new(rx));
    tokio::pin!(call);
    let mut reading = reading;
    let done = tokio::select! {
        done = &mut call => done,
        read = &mut reading => {
            match read.context("the upload's reader")? {
                Err(err) => return Err(anyhow::Error::new(err).context(format!("reading `{shown}`"))),
                Ok(()) => call.await,
            }
        }
    };
    let done = done.map_err(status_error)?.into_inner();
    eprintln!("{shown} -> {} ({} bytes)", done.path, done.bytes);
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_local_is_the_file_name() {
        assert_eq!(
            default_local("/etc/hostname").unwrap(),
            PathBuf::from("hostname")
        );
        assert!(default_local("/").is_err());
        assert!(default_local("/a/..").is_err());
        assert_eq!(
            partial_path(Path::new("dir/x.bin")),
            PathBuf::from("dir/.x.bin.gstacks-partial")
        );
    }
}
