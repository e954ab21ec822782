//! Enrollment end to end: a real control plane, a real agent, the CLI.
//! Heartbeats and telemetry reach `host list`; the credential file is 0600;
//! no secret shows up in any log; bad, expired, revoked and
//! reused-after-revoke provisioning tokens are refused with a clear error.

mod control_support;

use std::os::unix::fs::PermissionsExt as _;
use std::time::Duration;

use control_support::{wait_for, Agent, ControlPlane, WAIT};

#[test]
fn enroll_heartbeat_and_host_list() {
    let dir = tempfile::tempdir().unwrap();
    let cp = ControlPlane::start(&dir.path().join("control"));
    let (token_id, secret) = cp.token(&["--description", "e2e"]);
    let agent = Agent::start(
        &cp,
        &dir.path().join("agent"),
        Some(&secret),
        &[("AGENT_TRAITS", "gpu,trusted"), ("AGENT_TAGS", "team-a")],
    );
    let host_id = agent.host_id();
    let host = cp.wait_status(&host_id, "connected", WAIT);
    assert_eq!(host["cluster_id"], "cls_default");
    assert_eq!(host["token_id"], token_id.as_str());
    assert_eq!(host["placeable"], true);
    assert!(!host["version"].as_str().unwrap().is_empty(), "{host}");
    let arch = host["arch"].as_str().unwrap().to_owned();
    let traits: Vec<&str> = host["traits"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap())
        .collect();
    for expected in ["gpu", "trusted", arch.as_str()] {
        assert!(traits.contains(&expected), "{expected} not in {traits:?}");
    }
    assert_eq!(host["tags"], serde_json::json!(["team-a"]));

    // Heartbeats move last seen forward.
    let first_seen = host["last_seen_ms"].as_i64().unwrap();
    wait_for("a later heartbeat", WAIT, || {
        (cp.host(&host_id)["last_seen_ms"].as_i64().unwrap() > first_seen).then_some(())
    });

    // The table for people names the host and its columns.
    let out = cp.cli(&["host", "list"]);
    assert!(out.status.success(), "{out:?}");
    let table = String::from_utf8(out.stdout).unwrap();
    for column in [
        "ID",
        "NAME",
        "CLUSTER",
        "STATUS",
        "VERSION",
        "ARCH",
        "TRAITS",
        "TAGS",
        "LAST SEEN",
    ] {
        assert!(table.contains(column), "{table}");
    }
    assert!(
        table.contains(&host_id) && table.contains("connected"),
        "{table}"
    );
    let tokens = cp.json(&["token", "list"]);
    assert_eq!(tokens[0]["hosts_enrolled"], 1, "{tokens}");

    // The agent's operational events are stored as host logs.
    let kinds = cp.event_kinds(&host_id);
    assert!(kinds.contains(&"host.enrolled".to_owned()), "{kinds:?}");
    assert!(kinds.contains(&"host.connected".to_owned()), "{kinds:?}");

    // Credential file 0600, and no secret in any captured log.
    let mode = std::fs::metadata(agent.state_dir.join("credential.json"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let credential = agent.credential();
    assert!(credential.starts_with("gsth."));
    let logs = format!("{}\n{}", cp.log.text(), agent.log.text());
    for (name, secret) in [
        ("provisioning token", &secret),
        ("stream credential", &credential),
    ] {
        assert!(
            !logs.contains(secret.as_str()),
            "{name} in the logs:\n{logs}"
        );
        let random = secret.rsplit('.').next().unwrap();
        assert!(!logs.contains(random), "{name} in the logs:\n{logs}");
    }
}

/// Starts an agent that must be refused at enrollment; returns its output.
fn refused(cp: &ControlPlane, dir: &std::path::Path, token: &str) -> String {
    let mut agent = Agent::start(cp, dir, Some(token), &[]);
    let code = agent.wait_exit(WAIT);
    assert_ne!(code, Some(0), "a refused agent must fail");
    assert!(!dir.join("credential.json").exists());
    agent.log.text()
}

#[test]
fn bad_expired_revoked_and_reused_tokens_are_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let cp = ControlPlane::start(&dir.path().join("control"));

    let (id, secret) = cp.token(&[]);
    let forged = format!("gstp.{id}.{}", "A".repeat(43));
    let out = refused(&cp, &dir.path().join("bad"), &forged);
    assert!(out.contains("provisioning token is not valid"), "{out}");
    let out = refused(&cp, &dir.path().join("garbage"), "not-a-token");
    assert!(out.contains("provisioning token is malformed"), "{out}");

    let (expired_id, expired) = cp.token(&["--ttl", "1"]);
    wait_for("the short token to expire", Duration::from_secs(10), || {
        let list = cp.json(&["token", "list"]);
        let token = list
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["id"] == expired_id.as_str())?
            .clone();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as i64;
        (now >= token["expires_at_ms"].as_i64().unwrap()).then_some(())
    });
    let out = refused(&cp, &dir.path().join("expired"), &expired);
    assert!(
        out.contains(&format!("provisioning token `{expired_id}` expired")),
        "{out}"
    );
    let out = cp.cli(&["token", "list"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("expired"));

    // Enroll one host, revoke the token, and try it again.
    let first = Agent::start(&cp, &dir.path().join("first"), Some(&secret), &[]);
    let host_id = first.host_id();
    cp.wait_status(&host_id, "connected", WAIT);
    let revoked = cp.json(&["token", "revoke", &id]);
    assert_eq!(revoked["revoked_host_ids"], serde_json::json!([host_id]));
    let out = refused(&cp, &dir.path().join("reused"), &secret);
    assert!(
        out.contains(&format!("provisioning token `{id}` was revoked")),
        "{out}"
    );

    // Unknown ids are one clear line and a non-zero exit.
    let out = cp.cli(&["token", "revoke", "tok_nope"]);
    assert!(!out.status.success());
    assert_eq!(
        String::from_utf8(out.stderr).unwrap().trim(),
        "error: provisioning token `tok_nope` not found"
    );
    let out = cp.cli(&["token", "create", "--cluster", "cls_nope"]);
    assert_eq!(
        String::from_utf8(out.stderr).unwrap().trim(),
        "error: cluster `cls_nope` not found"
    );
}

#[test]
fn wrong_operator_token_and_login_file() {
    let dir = tempfile::tempdir().unwrap();
    let cp = ControlPlane::start(&dir.path().join("control"));
    let mut bad = cp.cli(&["cluster", "list"]);
    assert!(bad.status.success(), "{bad:?}");
    let table = String::from_utf8(bad.stdout.clone()).unwrap();
    assert!(
        table.contains("cls_default") && table.contains("byo"),
        "{table}"
    );

    // `login` checks the token with a real call and writes the file 0600.
    let home = tempfile::tempdir().unwrap();
    let login = |token: &str| {
        std::process::Command::new(tests::binary("gstacks"))
            .args(["login", "--url", &cp.url(), "--ca"])
            .arg(cp.ca_file())
            .args(["--token", token])
            .env("HOME", home.path())
            .env_remove("XDG_CONFIG_HOME")
            .env_remove("GLOBALSTACKS_API_TOKEN")
            .output()
            .unwrap()
    };
    bad = login("gsto.op_nope.AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA");
    assert!(!bad.status.success());
    let err = String::from_utf8(bad.stderr).unwrap();
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("operator token is not valid"), "{err}");
    let config = home.path().join(".config/gstacks/config.toml");
    assert!(!config.exists());
    let ok = login(&cp.operator_token);
    assert!(ok.status.success(), "{ok:?}");
    let mode = std::fs::metadata(&config).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    // With only the file (no env), the CLI works.
    let listed = std::process::Command::new(tests::binary("gstacks"))
        .args(["cluster", "list", "--json"])
        .env("HOME", home.path())
        .env_remove("XDG_CONFIG_HOME")
        .env_remove("GLOBALSTACKS_API_URL")
        .env_remove("GLOBALSTACKS_API_TOKEN")
        .env_remove("GLOBALSTACKS_API_CA_FILE")
        .output()
        .unwrap();
    assert!(listed.status.success(), "{listed:?}");
}

#[test]
fn serve_needs_a_certificate_and_uses_the_given_files() {
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(tests::binary("gstacks-control"))
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path().join("none"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = String::from_utf8(out.stderr).unwrap();
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("--tls-cert") && err.contains("--dev"), "{err}");

    // A certificate from elsewhere (here: another control plane's dev
    // certificate) is served as given, and clients that trust it connect.
    let first = ControlPlane::start(&dir.path().join("first"));
    let cert = first.ca_file();
    let key = dir.path().join("first/tls/key.pem");
    drop(first);
    let second = ControlPlane::start_with(
        &dir.path().join("second"),
        &[
            "--tls-cert",
            cert.to_str().unwrap(),
            "--tls-key",
            key.to_str().unwrap(),
        ],
        cert.clone(),
    );
    assert!(!dir.path().join("second/tls").exists());
    let clusters = second.json(&["cluster", "list"]);
    assert_eq!(clusters[0]["id"], "cls_default");

    // A key file that is not a key is named.
    let out = std::process::Command::new(tests::binary("gstacks-control"))
        .args(["serve", "--listen", "127.0.0.1:0", "--tls-cert"])
        .arg(&cert)
        .arg("--tls-key")
        .arg(&cert)
        .arg("--data-dir")
        .arg(dir.path().join("third"))
        .output()
        .unwrap();
    let err = String::from_utf8(out.stderr).unwrap();
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("no private key"), "{err}");
}
