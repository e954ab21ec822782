//! `gstacks host list|show|logs|revoke`.

use serde_json::{json, Value};

use crate::client::{status_error, Api};
use crate::output::{ago, join_or_dash, now_ms, or_dash, print_table, rfc3339};
use proto::{HostEvent, HostRecord, HostStatus};

pub fn status_name(code: i32) -> &'static str {
    match HostStatus::try_from(code) {
        Ok(HostStatus::Connected) => "connected",
        Ok(HostStatus::Disconnected) => "disconnected",
        Ok(HostStatus::NoToken) => "no_token",
        _ => "unknown",
    }
}

pub fn host_json(host: &HostRecord) -> Value {
    let t = host.telemetry.clone().unwrap_or_default();
    json!({
        "id": host.id,
        "name": host.name,
        "cluster_id": host.cluster_id,
        "status": status_name(host.status),
        "version": t.agent_version,
        "commit": t.agent_commit,
        "arch": t.arch,
        "os": t.os,
        "kernel": t.kernel,
        "hostname": t.hostname,
        "cpus": t.cpus,
        "memory_bytes": t.memory_bytes,
        "traits": t.traits,
        "tags": t.tags,
        "enrolled_at_ms": host.enrolled_at_ms,
        "last_seen_ms": host.last_seen_ms,
        "token_id": host.token_id,
        "placeable": host.placeable,
        "revoked_at_ms": host.revoked_at_ms,
        "revoked_reason": host.revoked_reason,
    })
}

pub async fn list(api: &mut Api, cluster: Option<String>, as_json: bool) -> anyhow::Result<()> {
    let hosts = api
        .list_hosts(proto::ListHostsRequest {
            cluster_id: cluster.unwrap_or_default(),
        })
        .await
        .map_err(status_error)?
        .into_inner()
        .hosts;
    if as_json {
        let all: Vec<Value> = hosts.iter().map(host_json).collect();
        println!("{}", serde_json::to_string_pretty(&all)?);
        return Ok(());
    }
    let now = now_ms();
    let rows: Vec<Vec<String>> = hosts
        .iter()
        .map(|h| {
            let t = h.telemetry.clone().unwrap_or_default();
            vec![
                h.id.clone(),
                or_dash(&h.name),
                h.cluster_id.clone(),
                status_name(h.status).to_owned(),
                or_dash(&t.agent_version),
                or_dash(&t.arch),
                join_or_dash(&t.traits),
                join_or_dash(&t.tags),
                ago(h.last_seen_ms, now),
            ]
        })
        .collect();
    print_table(
        &[
            "ID",
            "NAME",
            "CLUSTER",
            "STATUS",
            "VERSION",
            "ARCH",
            "TRAITS",
            "TAGS",
            "LAST SEEN",
        ],
        &rows,
    );
    Ok(())
}

pub async fn show(api: &mut Api, id: String, as_json: bool) -> anyhow::Result<()> {
    let host = api
        .get_host(proto::GetHostRequest { id })
        .await
        .map_err(status_error)?
        .into_inner();
    print_host(&host, as_json)
}

pub fn print_host(host: &HostRecord, as_json: bool) -> anyhow::Result<()> {
    if as_json {
        println!("{}", serde_json::to_string_pretty(&host_json(host))?);
        return Ok(());
    }
    let t = host.telemetry.clone().unwrap_or_default();
    let now = now_ms();
    let mut fields = vec![
        ("id", host.id.clone()),
        ("name", or_dash(&host.name)),
        ("cluster", host.cluster_id.clone()),
        ("status", status_name(host.status).to_owned()),
        (
            "placeable",
            if host.placeable { "yes" } else { "no" }.to_owned(),
        ),
        (
            "version",
            format!(
                "{} ({})",
                or_dash(&t.agent_version),
                or_dash(&t.agent_commit)
            ),
        ),
        ("arch", or_dash(&t.arch)),
        (
            "os",
            format!("{} {}", or_dash(&t.os), t.kernel).trim().to_owned(),
        ),
        ("hostname", or_dash(&t.hostname)),
        ("cpus", t.cpus.to_string()),
        ("memory", format!("{} MiB", t.memory_bytes / (1024 * 1024))),
        ("traits", join_or_dash(&t.traits)),
        ("tags", join_or_dash(&t.tags)),
        ("enrolled", rfc3339(host.enrolled_at_ms)),
        (
            "last seen",
            format!(
                "{} ({})",
                rfc3339(host.last_seen_ms),
                ago(host.last_seen_ms, now)
            ),
        ),
        ("token", host.token_id.clone()),
    ];
    if host.revoked_at_ms != 0 {
        fields.push(("revoked", rfc3339(host.revoked_at_ms)));
        fields.push(("revoked because", host.revoked_reason.clone()));
    }
    let width = fields.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    for (key, value) in fields {
        println!("{key:<width$}  {value}");
    }
    Ok(())
}

pub async fn revoke(api: &mut Api, id: String, as_json: bool) -> anyhow::Result<()> {
    let host = api
        .revoke_host(proto::RevokeHostRequest { id })
        .await
        .map_err(status_error)?
        .into_inner();
    if as_json {
        println!("{}", serde_json::to_string_pretty(&host_json(&host))?);
    } else {
        println!(
            "host {} revoked: status {}, its stream is closed and it will not be placed again",
            host.id,
            status_name(host.status)
        );
    }
    Ok(())
}

fn level_name(level: i32) -> &'static str {
    match proto::EventLevel::try_from(level) {
        Ok(proto::EventLevel::Debug) => "debug",
        Ok(proto::EventLevel::Info) => "info",
        Ok(proto::EventLevel::Warn) => "warn",
        Ok(proto::EventLevel::Error) => "error",
        _ => "-",
    }
}

fn event_json(event: &HostEvent) -> Value {
    let e = event.event.clone().unwrap_or_default();
    json!({
        "seq": event.seq,
        "host_id": event.host_id,
        "at_ms": e.at_ms,
        "level": level_name(e.level),
        "kind": e.kind,
        "message": e.message,
        "fields": e.fields,
        "request_id": e.request_id,
    })
}

fn event_line(event: &HostEvent) -> String {
    let e = event.event.clone().unwrap_or_default();
    let mut fields: Vec<_> = e.fields.iter().collect();
    fields.sort();
    let extra: String = fields.iter().map(|(k, v)| format!(" {k}={v:?}")).collect();
    format!(
        "{} {:<5} {} {}{}",
        rfc3339(e.at_ms),
        level_name(e.level),
        e.kind,
        e.message,
        extra
    )
}

pub async fn logs(
    api: &mut Api,
    id: String,
    follow: bool,
    tail: u32,
    as_json: bool,
) -> anyhow::Result<()> {
    let mut stream = api
        .host_logs(proto::HostLogsRequest {
            host_id: id,
            follow,
            tail,
        })
        .await
        .map_err(status_error)?
        .into_inner();
    use std::io::Write as _;
    let mut stdout = std::io::stdout();
    while let Some(event) = stream.message().await.map_err(status_error)? {
        let line = if as_json {
            serde_json::to_string(&event_json(&event))?
        } else {
            event_line(&event)
        };
        if writeln!(stdout, "{line}")
            .and_then(|()| stdout.flush())
            .is_err()
        {
            // The reader went away (`| head`): not an error.
            return Ok(());
        }
    }
    Ok(())
}
