//! `gstacks sandbox create|list|show|start|stop|reprovision|deprovision`.

use anyhow::bail;
use serde_json::{json, Value};

use crate::client::{status_error, Api};
use crate::output::{join_or_dash, or_dash, print_table, rfc3339};
use proto::{SandboxEvent, SandboxRecord, SandboxStatus, VolumeMount};

/// What `sandbox create` was given.
#[derive(Debug, Clone, Default)]
pub struct CreateArgs {
    pub cluster_id: Option<String>,
    pub host_id: Option<String>,
    pub tags: Vec<String>,
    pub traits: Vec<String>,
    pub image: Option<String>,
    pub blueprint: Option<String>,
    pub repo_url: Option<String>,
    pub repo_branch: Option<String>,
    pub repo_path: Option<String>,
    pub volumes: Vec<String>,
    pub name: Option<String>,
    pub memory_mib: Option<u64>,
    pub cpus: Option<f64>,
}

/// `HOST_PATH:CONTAINER_PATH[:ro]` (or `:rw`).
pub fn parse_volume(spec: &str) -> anyhow::Result<VolumeMount> {
    let parts: Vec<&str> = spec.split(':').collect();
    let (host, container, read_only) = match parts.as_slice() {
        [host, container] => (*host, *container, false),
        [host, container, "ro"] => (*host, *container, true),
        [host, container, "rw"] => (*host, *container, false),
        [_, _, mode] => bail!("volume `{spec}`: unknown mode `{mode}` (use ro or rw)"),
        _ => bail!("volume `{spec}` is not HOST_PATH:CONTAINER_PATH[:ro]"),
    };
    if !host.starts_with('/') {
        bail!("volume `{spec}`: host path `{host}` must be absolute");
    }
    if !container.starts_with('/') {
        bail!("volume `{spec}`: container path `{container}` must be absolute");
    }
    Ok(VolumeMount {
        host_path: host.to_owned(),
        container_path: container.to_owned(),
        read_only,
    })
}

pub fn status_name(code: i32) -> &'static str {
    match SandboxStatus::try_from(code) {
        Ok(SandboxStatus::Provisioning) => "provisioning",
        Ok(SandboxStatus::Running) => "running",
        Ok(SandboxStatus::Stopped) => "stopped",
        Ok(SandboxStatus::Failed) => "failed",
        Ok(SandboxStatus::Archived) => "archived",
        _ => "unknown",
    }
}

fn volume_text(v: &VolumeMount) -> String {
    format!(
        "{}:{}{}",
        v.host_path,
        v.container_path,
        if v.read_only { ":ro" } else { "" }
    )
}

pub fn sandbox_json(s: &SandboxRecord) -> Value {
    let repo = s.repo.clone().unwrap_or_default();
    let resources = s.resources.unwrap_or_default();
    json!({
        "id": s.id,
        "name": s.name,
        "cluster_id": s.cluster_id,
        "host_id": s.host_id,
        "status": status_name(s.status),
        "status_message": s.status_message,
        "image": s.image,
        "image_digest": s.image_digest,
        "blueprint_id": s.blueprint_id,
        "container": s.container_id,
        "container_name": s.container_name,
        "addresses": s.addresses,
        "docker_network": s.docker_network,
        "tags": s.tags,
        "traits": s.traits,
        "volumes": s.volumes.iter().map(|v| json!({
            "host_path": v.host_path,
            "container_path": v.container_path,
            "read_only": v.read_only,
        })).collect::<Vec<_>>(),
        "repo": {
            "url": repo.url,
            "branch": repo.branch,
            "path": repo.path,
            "status": repo.status,
            "error": repo.error,
        },
        "memory_bytes": resources.memory_bytes,
        "millicpus": resources.millicpus,
        "created_by": s.created_by,
        "created_at_ms": s.created_at_ms,
        "updated_at_ms": s.updated_at_ms,
        "archived_at_ms": s.archived_at_ms,
    })
}

fn event_json(e: &SandboxEvent) -> Value {
    let ev = e.event.clone().unwrap_or_default();
    json!({
        "seq": e.seq,
        "at_ms": ev.at_ms,
        "kind": ev.kind,
        "message": ev.message,
        "fields": ev.fields,
    })
}

/// Creates a sandbox; a sandbox that ends `failed` prints why and exits 1.
pub async fn create(api: &mut Api, args: CreateArgs, as_json: bool) -> anyhow::Result<i32> {
    let volumes = args
        .volumes
        .iter()
        .map(|v| parse_volume(v))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let millicpus = match args.cpus {
        None => 0,
        Some(cpus) if cpus > 0.0 && cpus <= 1024.0 => (cpus * 1000.0).round() as u32,
        Some(cpus) => bail!("--cpus {cpus} is out of range (0 < cpus <= 1024)"),
    };
    let request = proto::CreateSandboxRequest {
        cluster_id: args.cluster_id.unwrap_or_default(),
        host_id: args.host_id.unwrap_or_default(),
        tags: args.tags,
        traits: args.traits,
        image: args.image.unwrap_or_default(),
        blueprint: args.blueprint.unwrap_or_default(),
        repo_url: args.repo_url.unwrap_or_default(),
        repo_branch: args.repo_branch.unwrap_or_default(),
        repo_path: args.repo_path.unwrap_or_default(),
        volumes,
        name: args.name.unwrap_or_default(),
        resources: Some(proto::SandboxResources {
            memory_bytes: args.memory_mib.unwrap_or(0) << 20,
            millicpus,
        }),
    };
    let sandbox = api
        .create_sandbox(request)
        .await
        .map_err(status_error)?
        .into_inner();
    print_one(&sandbox, as_json)?;
    Ok(exit_for(&sandbox))
}

/// 1 (with the reason on stderr) when the sandbox failed, else 0.
fn exit_for(sandbox: &SandboxRecord) -> i32 {
    if sandbox.status == SandboxStatus::Failed as i32 {
        eprintln!(
            "error: sandbox `{}` failed: {}",
            sandbox.id,
            or_dash(&sandbox.status_message)
        );
        return 1;
    }
    0
}

fn print_one(sandbox: &SandboxRecord, as_json: bool) -> anyhow::Result<()> {
    if as_json {
        println!("{}", serde_json::to_string_pretty(&sandbox_json(sandbox))?);
    } else {
        let mut line = format!(
            "sandbox {} ({}) on host {}: {}",
            sandbox.id,
            sandbox.name,
            or_dash(&sandbox.host_id),
            status_name(sandbox.status)
        );
        if !sandbox.container_id.is_empty() {
            line.push_str(&format!(", container {}", short(&sandbox.container_id)));
        }
        if !sandbox.status_message.is_empty() {
            line.push_str(&format!(" ({})", sandbox.status_message));
        }
        println!("{line}");
    }
    Ok(())
}

fn short(id: &str) -> &str {
    id.get(..12).unwrap_or(id)
}

pub async fn list(
    api: &mut Api,
    cluster: Option<String>,
    host: Option<String>,
    exclude_archived: bool,
    as_json: bool,
) -> anyhow::Result<()> {
    let sandboxes = api
        .list_sandboxes(proto::ListSandboxesRequest {
            cluster_id: cluster.unwrap_or_default(),
            host_id: host.unwrap_or_default(),
            exclude_archived,
        })
        .await
        .map_err(status_error)?
        .into_inner()
        .sandboxes;
    if as_json {
        let all: Vec<Value> = sandboxes.iter().map(sandbox_json).collect();
        println!("{}", serde_json::to_string_pretty(&all)?);
        return Ok(());
    }
    let rows: Vec<Vec<String>> = sandboxes
        .iter()
        .map(|s| {
            vec![
                s.id.clone(),
                or_dash(&s.name),
                status_name(s.status).to_owned(),
                or_dash(&s.host_id),
                or_dash(&s.image),
                or_dash(short(&s.container_id)),
                join_or_dash(&s.addresses),
                join_or_dash(&s.tags),
                rfc3339(s.created_at_ms),
            ]
        })
        .collect();
    print_table(
        &[
            "ID",
            "NAME",
            "STATUS",
            "HOST",
            "IMAGE",
            "CONTAINER",
            "ADDRESSES",
            "TAGS",
            "CREATED",
        ],
        &rows,
    );
    Ok(())
}

pub async fn show(api: &mut Api, id: String, as_json: bool) -> anyhow::Result<()> {
    let response = api
        .get_sandbox(proto::GetSandboxRequest { id })
        .await
        .map_err(status_error)?
        .into_inner();
    let sandbox = response.sandbox.unwrap_or_default();
    if as_json {
        let mut value = sandbox_json(&sandbox);
        value["networks"] = response
            .networks
            .iter()
            .map(|n| {
                json!({
                    "network": n.network,
                    "aliases": n.aliases.iter().map(|a| json!({
                        "alias": a.alias,
                        "name": a.name,
                        "ports": a.ports,
                    })).collect::<Vec<_>>(),
                })
            })
            .collect();
        value["history"] = response.history.iter().map(event_json).collect();
        println!("{}", serde_json::to_string_pretty(&value)?);
        return Ok(());
    }
    let repo = sandbox.repo.clone().unwrap_or_default();
    let resources = sandbox.resources.unwrap_or_default();
    let mut fields = vec![
        ("id", sandbox.id.clone()),
        ("name", or_dash(&sandbox.name)),
        ("cluster", sandbox.cluster_id.clone()),
        ("host", or_dash(&sandbox.host_id)),
        ("status", status_name(sandbox.status).to_owned()),
    ];
    if !sandbox.status_message.is_empty() {
        fields.push(("status message", sandbox.status_message.clone()));
    }
    fields.extend([
        (
            "image",
            if sandbox.image_digest.is_empty() {
                or_dash(&sandbox.image)
            } else {
                format!("{} ({})", sandbox.image, sandbox.image_digest)
            },
        ),
        ("container", or_dash(&sandbox.container_id)),
        ("container name", or_dash(&sandbox.container_name)),
        (
            "docker network",
            if sandbox.docker_network.is_empty() {
                "-".to_owned()
            } else {
                format!(
                    "{} ({})",
                    sandbox.docker_network,
                    join_or_dash(&sandbox.addresses)
                )
            },
        ),
        ("networks", networks_text(&response.networks)),
        ("tags", join_or_dash(&sandbox.tags)),
        ("traits", join_or_dash(&sandbox.traits)),
        (
            "volumes",
            join_or_dash(&sandbox.volumes.iter().map(volume_text).collect::<Vec<_>>()),
        ),
        (
            "memory",
            match resources.memory_bytes {
                0 => "no limit".to_owned(),
                bytes => format!("{} MiB", bytes >> 20),
            },
        ),
        (
            "cpus",
            match resources.millicpus {
                0 => "no limit".to_owned(),
                m => format!("{}", f64::from(m) / 1000.0),
            },
        ),
    ]);
    if repo.url.is_empty() {
        fields.push(("repository", "-".to_owned()));
    } else {
        fields.push((
            "repository",
            format!(
                "{} branch {} at {}",
                repo.url,
                or_dash(&repo.branch),
                or_dash(&repo.path)
            ),
        ));
        let mut status = or_dash(&repo.status);
        if !repo.error.is_empty() {
            status.push_str(&format!(" ({})", repo.error));
        }
        fields.push(("repository status", status));
    }
    fields.extend([
        ("created", rfc3339(sandbox.created_at_ms)),
        ("created by", or_dash(&sandbox.created_by)),
        ("updated", rfc3339(sandbox.updated_at_ms)),
    ]);
    if sandbox.archived_at_ms != 0 {
        fields.push(("archived", rfc3339(sandbox.archived_at_ms)));
    }
    let width = fields.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    for (key, value) in fields {
        println!("{key:<width$}  {value}");
    }
    println!();
    println!("activity:");
    for entry in &response.history {
        let e = entry.event.clone().unwrap_or_default();
        println!("  {} {} {}", rfc3339(e.at_ms), e.kind, e.message);
    }
    Ok(())
}

/// `dev (api.dev.gstacks:8080), ops (-)`.
fn networks_text(networks: &[proto::SandboxNetworkView]) -> String {
    if networks.is_empty() {
        return "-".to_owned();
    }
    networks
        .iter()
        .map(|n| {
            let aliases: Vec<String> = n
                .aliases
                .iter()
                .map(|a| {
                    let ports: Vec<String> = a.ports.iter().map(ToString::to_string).collect();
                    format!("{}:{}", a.name, ports.join(","))
                })
                .collect();
            format!("{} ({})", n.network, join_or_dash(&aliases))
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// The operations on one sandbox.
#[derive(Debug, Clone, Copy)]
pub enum Action {
    Start,
    Stop,
    Reprovision,
    Deprovision,
}

pub async fn act(api: &mut Api, action: Action, id: String, as_json: bool) -> anyhow::Result<i32> {
    let request = proto::SandboxRequest { id };
    let sandbox = match action {
        Action::Start => api.start_sandbox(request).await,
        Action::Stop => api.stop_sandbox(request).await,
        Action::Reprovision => api.reprovision_sandbox(request).await,
        Action::Deprovision => api.deprovision_sandbox(request).await,
    }
    .map_err(status_error)?
    .into_inner();
    print_one(&sandbox, as_json)?;
    Ok(exit_for(&sandbox))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn volume_specs() {
        let v = parse_volume("/srv/data:/data:ro").unwrap();
        assert_eq!(
            (v.host_path.as_str(), v.container_path.as_str(), v.read_only),
            ("/srv/data", "/data", true)
        );
        assert!(!parse_volume("/a:/b").unwrap().read_only);
        assert!(!parse_volume("/a:/b:rw").unwrap().read_only);
        for bad in ["/a", "/a:/b:rx", "a:/b", "/a:b", "/a:/b:ro:x", ""] {
            assert!(parse_volume(bad).is_err(), "{bad}");
        }
        let err = parse_volume("/a:/b:rx").unwrap_err().to_string();
        assert!(err.contains("unknown mode `rx`"), "{err}");
    }
}
