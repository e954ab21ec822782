//! `gstacks token create|list|revoke` and `gstacks cluster list`.

use serde_json::{json, Value};

use crate::client::{status_error, Api};
use crate::output::{or_dash, print_table, rfc3339};
use proto::ProvisioningToken;

fn token_json(t: &ProvisioningToken) -> Value {
    json!({
        "id": t.id,
        "cluster_id": t.cluster_id,
        "description": t.description,
        "long_living": t.long_living,
        "created_at_ms": t.created_at_ms,
        "expires_at_ms": t.expires_at_ms,
        "revoked_at_ms": t.revoked_at_ms,
        "hosts_enrolled": t.hosts_enrolled,
    })
}

fn token_state(t: &ProvisioningToken, now: i64) -> &'static str {
    if t.revoked_at_ms != 0 {
        "revoked"
    } else if t.expires_at_ms != 0 && now >= t.expires_at_ms {
        "expired"
    } else {
        "valid"
    }
}

pub async fn create(
    api: &mut Api,
    cluster: String,
    description: String,
    long_living: bool,
    ttl_secs: u64,
    as_json: bool,
) -> anyhow::Result<()> {
    let created = api
        .create_provisioning_token(proto::CreateProvisioningTokenRequest {
            cluster_id: cluster,
            description,
            long_living,
            ttl_secs,
        })
        .await
        .map_err(status_error)?
        .into_inner();
    let token = created.token.unwrap_or_default();
    if as_json {
        let mut value = token_json(&token);
        value["secret"] = Value::String(created.secret);
        println!("{}", serde_json::to_string_pretty(&value)?);
        return Ok(());
    }
    let expiry = if token.expires_at_ms == 0 {
        "never expires (long-living)".to_owned()
    } else {
        format!("expires {}", rfc3339(token.expires_at_ms))
    };
    println!(
        "provisioning token {} for cluster {} ({expiry})",
        token.id, token.cluster_id
    );
    println!("secret (shown once, only its hash is stored; use it only to enroll hosts):");
    println!("{}", created.secret);
    Ok(())
}

pub async fn list(api: &mut Api, cluster: Option<String>, as_json: bool) -> anyhow::Result<()> {
    let tokens = api
        .list_provisioning_tokens(proto::ListProvisioningTokensRequest {
            cluster_id: cluster.unwrap_or_default(),
        })
        .await
        .map_err(status_error)?
        .into_inner()
        .tokens;
    if as_json {
        let all: Vec<Value> = tokens.iter().map(token_json).collect();
        println!("{}", serde_json::to_string_pretty(&all)?);
        return Ok(());
    }
    let now = crate::output::now_ms();
    let rows: Vec<Vec<String>> = tokens
        .iter()
        .map(|t| {
            vec![
                t.id.clone(),
                t.cluster_id.clone(),
                token_state(t, now).to_owned(),
                if t.long_living {
                    "long-living"
                } else {
                    "short-lived"
                }
                .to_owned(),
                rfc3339(t.created_at_ms),
                if t.expires_at_ms == 0 {
                    "never".to_owned()
                } else {
                    rfc3339(t.expires_at_ms)
                },
                t.hosts_enrolled.to_string(),
                or_dash(&t.description),
            ]
        })
        .collect();
    print_table(
        &[
            "ID",
            "CLUSTER",
            "STATE",
            "KIND",
            "CREATED",
            "EXPIRES",
            "HOSTS",
            "DESCRIPTION",
        ],
        &rows,
    );
    Ok(())
}

pub async fn revoke(api: &mut Api, id: String, as_json: bool) -> anyhow::Result<()> {
    let revoked = api
        .revoke_provisioning_token(proto::RevokeProvisioningTokenRequest { id })
        .await
        .map_err(status_error)?
        .into_inner();
    let token = revoked.token.unwrap_or_default();
    if as_json {
        let mut value = token_json(&token);
        value["revoked_host_ids"] = json!(revoked.revoked_host_ids);
        println!("{}", serde_json::to_string_pretty(&value)?);
        return Ok(());
    }
    println!(
        "provisioning token {} revoked at {}",
        token.id,
        rfc3339(token.revoked_at_ms)
    );
    if revoked.revoked_host_ids.is_empty() {
        println!("no host lost its credential (none enrolled with it, or all were revoked before)");
    } else {
        println!(
            "hosts now no_token: {}",
            revoked.revoked_host_ids.join(", ")
        );
    }
    Ok(())
}

pub async fn clusters(api: &mut Api, as_json: bool) -> anyhow::Result<()> {
    let clusters = api
        .list_clusters(proto::ListClustersRequest {})
        .await
        .map_err(status_error)?
        .into_inner()
        .clusters;
    if as_json {
        let all: Vec<Value> = clusters
            .iter()
            .map(
                |c| json!({"id": c.id, "name": c.name, "kind": c.kind, "is_default": c.is_default}),
            )
            .collect();
        println!("{}", serde_json::to_string_pretty(&all)?);
        return Ok(());
    }
    let rows: Vec<Vec<String>> = clusters
        .iter()
        .map(|c| {
            vec![
                c.id.clone(),
                c.name.clone(),
                c.kind.clone(),
                if c.is_default { "yes" } else { "" }.to_owned(),
            ]
        })
        .collect();
    print_table(&["ID", "NAME", "KIND", "DEFAULT"], &rows);
    Ok(())
}
