//! Break-glass host terminal through the control plane: a command's output
//! and exit code come back; reason and who are recorded; the time limit
//! closes the session and the CLI says so; an agent can refuse terminals.

mod control_support;

use control_support::{Agent, ControlPlane, WAIT};
use serde_json::Value;

fn connected_agent(
    cp: &ControlPlane,
    dir: &std::path::Path,
    env: &[(&str, &str)],
) -> (Agent, String) {
    let (_, secret) = cp.token(&[]);
    let agent = Agent::start(cp, dir, Some(&secret), env);
    let id = agent.host_id();
    cp.wait_status(&id, "connected", WAIT);
    (agent, id)
}

#[test]
fn terminal_runs_a_command_and_returns_output_and_exit_code() {
    let dir = tempfile::tempdir().unwrap();
    let cp = ControlPlane::start(&dir.path().join("control"));
    let (_agent, id) = connected_agent(&cp, &dir.path().join("agent"), &[]);

    let out = cp.cli_with_stdin(
        &["host", "terminal", &id, "--reason", "e2e: check the pty"],
        Some("echo hi-from-$((40 + 2)); exit 3\n"),
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    assert!(stdout.contains("hi-from-42"), "{stdout}");

    // Reason, who and when are recorded as host events.
    let logs = cp.cli(&["host", "logs", &id, "--json"]);
    let events: Vec<Value> = String::from_utf8(logs.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let opened = events
        .iter()
        .find(|e| e["kind"] == "terminal.opened")
        .expect("terminal.opened event");
    assert_eq!(opened["fields"]["reason"], "e2e: check the pty");
    assert!(opened["fields"]["requested_by"]
        .as_str()
        .unwrap()
        .starts_with("op_"));
    assert!(opened["at_ms"].as_i64().unwrap() > 0);
    assert!(
        events.iter().any(|e| e["kind"] == "terminal.closed"
            && e["message"]
                .as_str()
                .unwrap()
                .contains("exited with code 3")),
        "{events:?}"
    );
}

#[test]
fn terminal_time_limit_closes_the_session_and_the_cli_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let cp = ControlPlane::start(&dir.path().join("control"));
    let (_agent, id) = connected_agent(&cp, &dir.path().join("agent"), &[]);
    let out = cp.cli_with_stdin(
        &[
            "host",
            "terminal",
            &id,
            "--reason",
            "limit",
            "--max-duration",
            "1",
            "--",
            "sleep",
            "60",
        ],
        None,
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(75), "{out:?}");
    assert!(stderr.contains("closed by the control plane"), "{stderr}");
    assert!(stderr.contains("time limit"), "{stderr}");
}

#[test]
fn terminal_needs_a_reason_a_connected_host_and_a_willing_agent() {
    let dir = tempfile::tempdir().unwrap();
    let cp = ControlPlane::start(&dir.path().join("control"));
    let (_agent, id) = connected_agent(
        &cp,
        &dir.path().join("agent"),
        &[("GLOBALSTACKS_AGENT_DISABLE_HOST_TERMINAL", "1")],
    );
    let out = cp.cli_with_stdin(
        &["host", "terminal", &id, "--reason", " "],
        Some("exit 0\n"),
    );
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("a reason is required"),
        "{out:?}"
    );

    let out = cp.cli_with_stdin(
        &["host", "terminal", &id, "--reason", "x"],
        Some("exit 0\n"),
    );
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("disabled") || stderr.contains("refused"),
        "{stderr}"
    );

    let out = cp.cli_with_stdin(&["host", "terminal", "hst_nope", "--reason", "x"], Some(""));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr).trim(),
        "error: host `hst_nope` not found"
    );
}

#[test]
fn terminal_on_a_tty_returns_output_and_the_exit_code() {
    let dir = tempfile::tempdir().unwrap();
    let cp = ControlPlane::start(&dir.path().join("control"));
    let (_agent, id) = connected_agent(&cp, &dir.path().join("agent"), &[]);
    // `script` gives the CLI a pseudo-terminal, as a person's shell would.
    let cli = format!(
        "{} host terminal {id} --reason 'tty e2e'",
        tests::binary("gstacks").display()
    );
    let mut child = std::process::Command::new("script")
        .args(["-qec", &cli, "/dev/null"])
        .env("HOME", dir.path())
        .env("GLOBALSTACKS_API_URL", cp.url())
        .env("GLOBALSTACKS_API_TOKEN", &cp.operator_token)
        .env("GLOBALSTACKS_API_CA_FILE", cp.ca_file())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("script (util-linux)");
    {
        use std::io::Write as _;
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(b"echo tty-$((6 * 7)); exit 7\n").unwrap();
        // Keep stdin open until the shell has exited: a person's terminal
        // does not end its input either.
        let out = child.wait_with_output().unwrap();
        drop(stdin);
        let text = String::from_utf8_lossy(&out.stdout);
        assert_eq!(out.status.code(), Some(7), "{out:?}");
        assert!(text.contains("tty-42"), "{text}");
        assert!(text.contains("host terminal trm_"), "{text}");
    }
}
