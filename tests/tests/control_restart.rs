//! Restarts: the control plane killed and restarted on the same store, and
//! the agent killed (-9) and restarted, keep one host record and reconnect
//! by themselves.

mod control_support;

use control_support::{wait_for, Agent, ControlPlane, WAIT};

#[test]
fn control_plane_restart_keeps_everything_and_agent_reconnects() {
    let dir = tempfile::tempdir().unwrap();
    let mut cp = ControlPlane::start(&dir.path().join("control"));
    let (token_id, secret) = cp.token(&["--long-living"]);
    let _agent = Agent::start(&cp, &dir.path().join("agent"), Some(&secret), &[]);
    let host_id = _agent.host_id();
    cp.wait_status(&host_id, "connected", WAIT);
    let events_before = cp.event_kinds(&host_id).len();

    cp.kill_and_restart();

    // The agent comes back by itself to the same host record.
    cp.wait_status(&host_id, "connected", WAIT);
    let hosts = cp.hosts();
    assert_eq!(hosts.len(), 1, "{hosts:?}");
    assert_eq!(hosts[0]["id"], host_id.as_str());
    let tokens = cp.json(&["token", "list"]);
    assert_eq!(tokens[0]["id"], token_id.as_str());
    assert_eq!(tokens[0]["long_living"], true);
    assert_eq!(tokens[0]["hosts_enrolled"], 1);
    // Events from before the restart are still there, and it reconnected.
    wait_for("a second host.connected event", WAIT, || {
        let kinds = cp.event_kinds(&host_id);
        (kinds.len() > events_before
            && kinds.iter().filter(|k| *k == "host.connected").count() >= 2)
            .then_some(())
    });
}

#[test]
fn agent_killed_and_restarted_keeps_one_host_record() {
    let dir = tempfile::tempdir().unwrap();
    let cp = ControlPlane::start(&dir.path().join("control"));
    let (_, secret) = cp.token(&[]);
    let state = dir.path().join("agent");
    let mut agent = Agent::start(&cp, &state, Some(&secret), &[]);
    let host_id = agent.host_id();
    cp.wait_status(&host_id, "connected", WAIT);

    agent.kill9();
    // Heartbeats stop: disconnected after the window (3 s in these tests).
    cp.wait_status(&host_id, "disconnected", WAIT);

    // Restarted without a provisioning token: the stored credential serves.
    let agent = Agent::start(&cp, &state, None, &[]);
    assert_eq!(agent.host_id(), host_id);
    cp.wait_status(&host_id, "connected", WAIT);
    assert_eq!(cp.hosts().len(), 1);
}

#[test]
fn silent_agent_is_disconnected_after_the_heartbeat_window_and_comes_back() {
    let dir = tempfile::tempdir().unwrap();
    let cp = ControlPlane::start(&dir.path().join("control"));
    let (_, secret) = cp.token(&[]);
    let agent = Agent::start(&cp, &dir.path().join("agent"), Some(&secret), &[]);
    let host_id = agent.host_id();
    cp.wait_status(&host_id, "connected", WAIT);

    // Frozen, the agent keeps its TCP connection but sends nothing.
    agent.signal(nix::sys::signal::Signal::SIGSTOP);
    cp.wait_status(&host_id, "disconnected", WAIT);
    let kinds = cp.event_kinds(&host_id);
    assert!(kinds.contains(&"host.disconnected".to_owned()), "{kinds:?}");
    agent.signal(nix::sys::signal::Signal::SIGCONT);
    cp.wait_status(&host_id, "connected", WAIT);
    assert_eq!(cp.hosts().len(), 1);
}
