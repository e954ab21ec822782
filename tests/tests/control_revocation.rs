//! Revocation: within 2 s the host is `no_token`, its stream is closed,
//! the agent stops for good, reconnects are refused, and it is never
//! placeable again.

mod control_support;

use std::time::{Duration, Instant};

use control_support::{wait_for, Agent, ControlPlane, WAIT};

/// The agent's exit status when the control plane refuses its credential.
const EXIT_REVOKED: i32 = 78;

#[test]
fn host_revoke_closes_the_stream_within_two_seconds_and_refuses_reconnects() {
    let dir = tempfile::tempdir().unwrap();
    let cp = ControlPlane::start(&dir.path().join("control"));
    let (_, secret) = cp.token(&[]);
    let state = dir.path().join("agent");
    let mut agent = Agent::start(&cp, &state, Some(&secret), &[]);
    let host_id = agent.host_id();
    cp.wait_status(&host_id, "connected", WAIT);

    let start = Instant::now();
    let revoked = cp.json(&["host", "revoke", &host_id]);
    assert_eq!(revoked["status"], "no_token");
    let host = cp.wait_status(&host_id, "no_token", Duration::from_secs(2));
    assert_eq!(host["placeable"], false);
    assert!(
        host["revoked_reason"]
            .as_str()
            .unwrap()
            .contains("revoked by op_"),
        "{host}"
    );
    let code = agent.wait_exit(Duration::from_secs(2));
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "{:?}",
        start.elapsed()
    );
    assert_eq!(code, Some(EXIT_REVOKED), "{}", agent.log.text());
    assert!(agent.log.text().contains("revoked"), "{}", agent.log.text());

    // A restart with the same credential is refused at once.
    let mut again = Agent::start(&cp, &state, None, &[]);
    assert_eq!(again.wait_exit(WAIT), Some(EXIT_REVOKED));
    assert!(again.log.text().contains("revoked"), "{}", again.log.text());
    let host = cp.host(&host_id);
    assert_eq!(host["status"], "no_token");
    let kinds = cp.event_kinds(&host_id);
    assert!(kinds.contains(&"host.revoked".to_owned()), "{kinds:?}");
}

#[test]
fn token_revoke_takes_every_host_enrolled_with_it() {
    let dir = tempfile::tempdir().unwrap();
    let cp = ControlPlane::start(&dir.path().join("control"));
    let (token_id, secret) = cp.token(&["--long-living"]);
    let (_, other_secret) = cp.token(&[]);
    let mut a = Agent::start(&cp, &dir.path().join("a"), Some(&secret), &[]);
    let mut b = Agent::start(&cp, &dir.path().join("b"), Some(&secret), &[]);
    let c = Agent::start(&cp, &dir.path().join("c"), Some(&other_secret), &[]);
    let ids = [a.host_id(), b.host_id(), c.host_id()];
    for id in &ids {
        cp.wait_status(id, "connected", WAIT);
    }

    let start = Instant::now();
    let out = cp.cli(&["token", "revoke", &token_id]);
    assert!(out.status.success(), "{out:?}");
    for id in &ids[..2] {
        cp.wait_status(id, "no_token", Duration::from_secs(2));
    }
    assert_eq!(a.wait_exit(Duration::from_secs(2)), Some(EXIT_REVOKED));
    assert_eq!(b.wait_exit(Duration::from_secs(2)), Some(EXIT_REVOKED));
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "{:?}",
        start.elapsed()
    );
    // The host of another token is untouched.
    assert_eq!(cp.host(&ids[2])["status"], "connected");
    let listed = cp.json(&["token", "list"]);
    let revoked = listed
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["id"] == token_id.as_str())
        .unwrap();
    assert!(revoked["revoked_at_ms"].as_i64().unwrap() > 0);
    wait_for("c to keep heartbeating", WAIT, || {
        (cp.host(&ids[2])["status"] == "connected").then_some(())
    });
}

#[test]
fn host_logs_follow_shows_the_revocation_as_it_happens() {
    let dir = tempfile::tempdir().unwrap();
    let cp = ControlPlane::start(&dir.path().join("control"));
    let (_, secret) = cp.token(&[]);
    let _agent = Agent::start(&cp, &dir.path().join("agent"), Some(&secret), &[]);
    let host_id = _agent.host_id();
    cp.wait_status(&host_id, "connected", WAIT);

    let (mut follower, output) = cp.cli_spawn(&["host", "logs", &host_id, "--follow"]);
    wait_for("the backlog", WAIT, || {
        output.text().contains("host.connected").then_some(())
    });
    assert!(!output.text().contains("host.revoked"));
    cp.json(&["host", "revoke", &host_id]);
    wait_for("the revocation to be followed", WAIT, || {
        output.text().contains("host.revoked").then_some(())
    });
    let _ = follower.kill();
    let _ = follower.wait();
}
