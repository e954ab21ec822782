//! Sandboxes end to end on the machine's real Docker engine: the real
//! `gstacks-control serve`, `gstacks-agent run` and `gstacks` binaries, a
//! locally built busybox image (nothing is pulled), one private runtime
//! scope, network and subnet per agent, removed again on every exit path.
//! Skipped with a message when no engine answers (unless
//! `GSTACKS_REQUIRE_DOCKER_TESTS=1`).

mod control_support;

use std::path::{Path, PathBuf};
use std::time::Duration;

use control_support::{wait_for, Agent, ControlPlane, WAIT};
use serde_json::Value;
use tests::docker::{docker, docker_ok, test_image, DockerScope, TestImage};

/// A control plane with the test image as its default, and one agent in a
/// private Docker scope that allows volumes under `volume_root`.
struct Setup {
    _dir: tempfile::TempDir,
    cp: ControlPlane,
    agent: Agent,
    host_id: String,
    volume_root: PathBuf,
    // Dropped after the processes: removes the scope's containers and network.
    scope: DockerScope,
    // Dropped last, once no container uses it: this process's test image
    // goes with its last user.
    image: TestImage,
}

fn agent_env(scope: &DockerScope, volume_root: &Path) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = scope
        .agent_env()
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
    env.extend([
        (
            "GLOBALSTACKS_AGENT_VOLUME_ROOTS".to_owned(),
            volume_root.display().to_string(),
        ),
        // Keep the mesh and DNS of several test agents apart.
        (
            "GLOBALSTACKS_AGENT_MESH_LISTEN".to_owned(),
            "127.0.0.1:0".to_owned(),
        ),
        (
            "GLOBALSTACKS_AGENT_MESH_DNS_ADDR".to_owned(),
            "127.0.0.1:0".to_owned(),
        ),
        ("AGENT_TAGS".to_owned(), "eu".to_owned()),
    ]);
    env
}

fn start_agent(
    cp: &ControlPlane,
    state_dir: &Path,
    token: Option<&str>,
    env: &[(String, String)],
) -> Agent {
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    Agent::start(cp, state_dir, token, &env)
}

fn setup() -> Option<Setup> {
    if !tests::docker::available() {
        return None;
    }
    let image = test_image();
    let scope = DockerScope::new();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("control");
    let cp = ControlPlane::start_with(
        &data,
        &[
            "--dev",
            "--default-image",
            image.reference(),
            "--sandbox-resync",
            "1",
        ],
        data.join("tls/cert.pem"),
    );
    let volume_root = dir.path().join("volumes");
    std::fs::create_dir_all(volume_root.join("data")).unwrap();
    std::fs::write(volume_root.join("data/hello.txt"), "hello from the host\n").unwrap();
    let (_, secret) = cp.token(&[]);
    let agent = start_agent(
        &cp,
        &dir.path().join("agent"),
        Some(&secret),
        &agent_env(&scope, &volume_root),
    );
    let host_id = agent.host_id();
    cp.wait_status(&host_id, "connected", WAIT);
    // The hello carries the cached images once the engine answered.
    wait_for("the host to report the test image", WAIT, || {
        let host = cp.host(&host_id);
        host["traits"]
            .as_array()
            .is_some_and(|t| t.iter().any(|x| x == "docker"))
            .then_some(())
    });
    Some(Setup {
        _dir: dir,
        cp,
        agent,
        host_id,
        volume_root,
        scope,
        image,
    })
}

fn show(cp: &ControlPlane, id: &str) -> Value {
    cp.json(&["sandbox", "show", id])
}

fn history_kinds(sandbox: &Value) -> Vec<String> {
    sandbox["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["kind"].as_str().unwrap().to_owned())
        .collect()
}

/// `docker inspect --format <format> <id>`.
fn inspect(id: &str, format: &str) -> String {
    docker_ok(&["inspect", "--format", format, id])
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn sandbox_lifecycle_on_the_docker_engine() {
    let Some(s) = setup() else { return };
    let cp = &s.cp;
    let volume = format!("{}:/data:ro", s.volume_root.join("data").display());

    // Create with the default image, a tag the host has, and a volume.
    let created = cp.json(&[
        "sandbox", "create", "--name", "web", "--tag", "eu", "--volume", &volume,
    ]);
    assert_eq!(created["status"], "running", "{created}");
    assert_eq!(created["host_id"], s.host_id.as_str());
    assert_eq!(created["image"], s.image.reference());
    assert!(created["image_digest"]
        .as_str()
        .unwrap()
        .starts_with("sha256:"));
    let id = created["id"].as_str().unwrap().to_owned();
    let container = created["container"].as_str().unwrap().to_owned();
    assert_eq!(created["container_name"], format!("gstacks-{id}"));
    assert_eq!(created["docker_network"], s.scope.network.as_str());
    let address = created["addresses"][0].as_str().unwrap().to_owned();
    let prefix = s.scope.gateway.trim_end_matches(".1");
    assert!(
        address.starts_with(prefix),
        "{address} not in {}",
        s.scope.subnet
    );

    // The real container: labels, DNS at the gateway, limits, the mount.
    assert_eq!(inspect(&container, "{{.State.Running}}"), "true");
    let labels: Value =
        serde_json::from_str(&inspect(&container, "{{json .Config.Labels}}")).unwrap();
    assert_eq!(labels["io.globalstacks.managed"], "true");
    assert_eq!(labels["io.globalstacks.scope"], s.scope.scope.as_str());
    assert_eq!(labels["io.globalstacks.sandbox-id"], id.as_str());
    assert_eq!(labels["io.globalstacks.host-id"], s.host_id.as_str());
    assert_eq!(
        inspect(&container, "{{.HostConfig.Dns}}"),
        format!("[{}]", s.scope.gateway)
    );
    assert_eq!(
        inspect(&container, "{{.HostConfig.Memory}}"),
        (512u64 << 20).to_string()
    );
    let read = docker_ok(&["exec", &container, "cat", "/data/hello.txt"]);
    assert_eq!(read, "hello from the host");
    let write = docker(&["exec", &container, "sh", "-c", "echo x > /data/new"]);
    assert!(!write.status.success(), "the volume is read-only");
    let ip = docker_ok(&["exec", &container, "sh", "-c", "ip -4 -o addr show eth0"]);
    assert!(ip.contains(&address), "{ip}");

    // The list shows it, with its address.
    let listed = cp.json(&["sandbox", "list"]);
    let row = listed
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["id"] == id.as_str())
        .expect("listed");
    assert_eq!(row["addresses"][0], address.as_str());
    let table = cp.cli(&["sandbox", "list"]);
    let table = String::from_utf8_lossy(&table.stdout);
    assert!(
        table.contains(&id) && table.contains("running") && table.contains(&address),
        "{table}"
    );

    // The placement preferred the host holding the image, and says so.
    let detail = show(cp, &id);
    let placed = detail["history"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["kind"] == "sandbox.created")
        .unwrap();
    assert_eq!(placed["fields"]["image_cached"], "true", "{placed}");

    // Networks and aliases show on the sandbox.
    let out = cp.cli(&["network", "create", "dev"]);
    assert!(out.status.success(), "{out:?}");
    let out = cp.cli(&[
        "network", "attach", "dev", &id, "--alias", "api", "--port", "8080",
    ]);
    assert!(out.status.success(), "{out:?}");
    let detail = show(cp, &id);
    assert_eq!(detail["networks"][0]["network"], "dev", "{detail}");
    assert_eq!(
        detail["networks"][0]["aliases"][0]["name"],
        "api.dev.gstacks"
    );
    assert_eq!(detail["networks"][0]["aliases"][0]["ports"][0], 8080);
    let people = cp.cli(&["sandbox", "show", &id]);
    let people = String::from_utf8_lossy(&people.stdout);
    assert!(people.contains("dev (api.dev.gstacks:8080)"), "{people}");

    // Stop, start.
    let stopped = cp.json(&["sandbox", "stop", &id]);
    assert_eq!(stopped["status"], "stopped", "{stopped}");
    assert!(stopped["addresses"].as_array().unwrap().is_empty());
    assert_eq!(inspect(&container, "{{.State.Running}}"), "false");
    let started = cp.json(&["sandbox", "start", &id]);
    assert_eq!(started["status"], "running", "{started}");
    assert_eq!(started["container"], container.as_str());
    assert_eq!(inspect(&container, "{{.State.Running}}"), "true");

    // Stopped behind the control plane's back: the record follows.
    docker_ok(&["stop", "-t", "1", &container]);
    let drifted = wait_for("the record to see the stop", WAIT, || {
        let sandbox = show(cp, &id);
        (sandbox["status"] == "stopped").then_some(sandbox)
    });
    assert!(history_kinds(&drifted)
        .iter()
        .any(|k| k == "sandbox.status.changed"));
    assert_eq!(cp.json(&["sandbox", "start", &id])["status"], "running");

    // Reprovision: a new container for the same record.
    let again = cp.json(&["sandbox", "reprovision", &id]);
    assert_eq!(again["status"], "running", "{again}");
    let new_container = again["container"].as_str().unwrap().to_owned();
    assert_ne!(new_container, container);
    assert!(
        !docker(&["inspect", &container]).status.success(),
        "old container removed"
    );
    assert_eq!(s.scope.containers(), std::slice::from_ref(&new_container));

    // Deprovision: the container goes, the record stays, archived.
    let archived = cp.json(&["sandbox", "deprovision", &id]);
    assert_eq!(archived["status"], "archived", "{archived}");
    assert!(archived["archived_at_ms"].as_i64().unwrap() > 0);
    assert!(!docker(&["inspect", &new_container]).status.success());
    assert!(s.scope.containers().is_empty());
    let detail = show(cp, &id);
    assert_eq!(detail["status"], "archived");
    let kinds = history_kinds(&detail);
    for kind in [
        "sandbox.created",
        "sandbox.running",
        "sandbox.stopped",
        "sandbox.started",
        "sandbox.reprovisioning",
        "sandbox.deprovisioned",
    ] {
        assert!(
            kinds.iter().any(|k| k == kind),
            "{kind} missing from {kinds:?}"
        );
    }
    let people = cp.cli(&["sandbox", "show", &id]);
    let people = String::from_utf8_lossy(&people.stdout);
    assert!(
        people.contains("archived") && people.contains("sandbox.deprovisioned"),
        "{people}"
    );
    let all = cp.json(&["sandbox", "list"]);
    assert!(all
        .as_array()
        .unwrap()
        .iter()
        .any(|r| r["id"] == id.as_str()));
    let live = cp.json(&["sandbox", "list", "--live"]);
    assert!(!live
        .as_array()
        .unwrap()
        .iter()
        .any(|r| r["id"] == id.as_str()));

    // An archived sandbox cannot be started or deprovisioned again.
    let out = cp.cli(&["sandbox", "start", &id]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("is archived"), "{}", stderr(&out));
}

#[test]
fn sandbox_bad_input_and_placement_refusals() {
    let Some(s) = setup() else { return };
    let cp = &s.cp;

    // A missing image fails the sandbox with Docker's message.
    let out = cp.cli(&[
        "sandbox",
        "create",
        "--image",
        "gstacks-test/missing:0",
        "--json",
    ]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let failed: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(failed["status"], "failed");
    let message = failed["status_message"].as_str().unwrap();
    assert!(message.contains("No such image"), "{message}");
    assert!(stderr(&out).contains("No such image"), "{}", stderr(&out));
    assert!(s.scope.containers().is_empty());

    // Volumes: missing host path, a path outside the roots, a bad spec.
    let missing = format!("{}:/x", s.volume_root.join("nope").display());
    let out = cp.cli(&["sandbox", "create", "--volume", &missing]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("does not exist"), "{}", stderr(&out));
    let out = cp.cli(&["sandbox", "create", "--volume", "/etc:/x"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("outside the volume roots"),
        "{}",
        stderr(&out)
    );
    let out = cp.cli(&["sandbox", "create", "--volume", "/etc"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("HOST_PATH:CONTAINER_PATH"),
        "{}",
        stderr(&out)
    );
    for (spec, expected) in [
        ("data:/x", "host path `data` must be absolute"),
        ("/etc:x", "container path `x` must be absolute"),
        ("/etc:/x:rx", "unknown mode `rx`"),
    ] {
        let out = cp.cli(&["sandbox", "create", "--volume", spec]);
        assert_eq!(out.status.code(), Some(1), "{spec}");
        assert!(stderr(&out).contains(expected), "{spec}: {}", stderr(&out));
    }
    assert!(s.scope.containers().is_empty());

    // Image and blueprint together, an unknown blueprint.
    let out = cp.cli(&["sandbox", "create", "--image", "x", "--blueprint", "y"]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("cannot be used with"),
        "{}",
        stderr(&out)
    );
    let out = cp.cli(&["sandbox", "create", "--blueprint", "dev-ready"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("no such blueprint `dev-ready`"),
        "{}",
        stderr(&out)
    );

    // An unknown sandbox id, for every verb that names one.
    for verb in [
        "show",
        "start",
        "stop",
        "reprovision",
        "deprovision",
        "logs",
        "terminal",
    ] {
        let out = cp.cli(&["sandbox", verb, "sbx_000000000000"]);
        assert_eq!(out.status.code(), Some(1), "{verb}");
        assert!(
            stderr(&out).contains("sandbox `sbx_000000000000` not found"),
            "{verb}: {}",
            stderr(&out)
        );
    }

    // Placement: each host and why it was left out.
    let out = cp.cli(&["sandbox", "create", "--tag", "gpu", "--trait", "trusted"]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(
        err.contains(&s.host_id)
            && err.contains("lacks tag `gpu`")
            && err.contains("lacks trait `trusted`"),
        "{err}"
    );
    let out = cp.cli(&["sandbox", "create", "--host-id", "hst_000000000000"]);
    assert!(
        stderr(&out).contains("host `hst_000000000000` not found"),
        "{}",
        stderr(&out)
    );
    let out = cp.cli(&["sandbox", "create", "--cluster-id", "cls_nope"]);
    assert!(
        stderr(&out).contains("cluster `cls_nope` not found"),
        "{}",
        stderr(&out)
    );
    assert!(s.scope.containers().is_empty());
}

#[test]
fn sandbox_rediscovered_after_agent_reinstall() {
    let Some(mut s) = setup() else { return };
    let env = agent_env(&s.scope, &s.volume_root);
    let created = s.cp.json(&["sandbox", "create", "--name", "keeper"]);
    assert_eq!(created["status"], "running", "{created}");
    let id = created["id"].as_str().unwrap().to_owned();
    let container = created["container"].as_str().unwrap().to_owned();
    // One whose container is gone (archived), and two containers nobody
    // knows: labelled with an archived sandbox's id, and with an unknown id.
    let gone = s.cp.json(&["sandbox", "create", "--name", "gone"]);
    let gone_id = gone["id"].as_str().unwrap().to_owned();
    s.cp.json(&["sandbox", "deprovision", &gone_id]);
    let label = |k: &str, v: &str| format!("io.globalstacks.{k}={v}");
    for (name, sandbox_id) in [
        ("stray-archived", gone_id.as_str()),
        ("stray-unknown", "sbx_ffffffffffff"),
    ] {
        docker_ok(&[
            "create",
            "--name",
            &format!("{}-{name}", s.scope.scope),
            "--label",
            &label("managed", "true"),
            "--label",
            &label("scope", &s.scope.scope),
            "--label",
            &label("sandbox-id", sandbox_id),
            s.image.reference(),
        ]);
    }

    // Reinstall: the agent goes, its state dir is wiped, a new enrollment
    // on the same machine (same scope) makes a new host.
    s.agent.kill9();
    std::fs::remove_dir_all(&s.agent.state_dir).unwrap();
    let (_, secret) = s.cp.token(&[]);
    let agent = start_agent(&s.cp, &s.agent.state_dir, Some(&secret), &env);
    let new_host = agent.host_id();
    assert_ne!(new_host, s.host_id);
    s.cp.wait_status(&new_host, "connected", WAIT);
    let rebound = wait_for("the sandbox to be rebound to the new host", WAIT, || {
        let sandbox = show(&s.cp, &id);
        (sandbox["host_id"] == new_host.as_str()).then_some(sandbox)
    });
    assert_eq!(rebound["status"], "running");
    assert_eq!(rebound["container"], container.as_str());
    assert_eq!(rebound["container_name"], format!("gstacks-{id}"));
    let kinds = history_kinds(&rebound);
    assert!(
        kinds.iter().any(|k| k == "sandbox.ownership.transferred"),
        "{kinds:?}"
    );
    assert!(
        kinds.iter().any(|k| k == "sandbox.rediscovered"),
        "{kinds:?}"
    );
    let transfer = rebound["history"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["kind"] == "sandbox.ownership.transferred")
        .unwrap();
    assert_eq!(transfer["fields"]["from_host"], s.host_id.as_str());
    assert_eq!(transfer["fields"]["to_host"], new_host.as_str());

    // The archived one stays archived; both strays are recorded as ignored.
    assert_eq!(show(&s.cp, &gone_id)["status"], "archived");
    let reasons = wait_for("two sandbox.rediscovery.ignored events", WAIT, || {
        let out = s.cp.cli(&["host", "logs", &new_host, "--json"]);
        let reasons: Vec<String> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|e| e["kind"] == "sandbox.rediscovery.ignored")
            .map(|e| {
                e["fields"]["reason"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned()
            })
            .collect();
        (reasons.len() >= 2).then_some(reasons)
    });
    assert!(reasons.iter().any(|r| r == "archived"), "{reasons:?}");
    assert!(reasons.iter().any(|r| r == "not_found"), "{reasons:?}");
    let gone_history = history_kinds(&show(&s.cp, &gone_id));
    assert!(
        gone_history
            .iter()
            .any(|k| k == "sandbox.rediscovery.ignored"),
        "{gone_history:?}"
    );

    // The new host operates the rebound sandbox.
    let stopped = s.cp.json(&["sandbox", "stop", &id]);
    assert_eq!(stopped["status"], "stopped", "{stopped}");
    let archived = s.cp.json(&["sandbox", "deprovision", &id]);
    assert_eq!(archived["status"], "archived");
    assert!(!docker(&["inspect", &container]).status.success());
    s.agent = agent;
}

#[test]
fn host_disconnected_during_create_is_reconciled_on_reconnect() {
    use nix::sys::signal::Signal;
    let Some(s) = setup() else { return };
    let cp = &s.cp;

    // The agent freezes: the create reaches its socket but no answer comes
    // before the control plane declares the host gone.
    s.agent.signal(Signal::SIGSTOP);
    let (mut create, output) = cp.cli_spawn(&["sandbox", "create", "--name", "late", "--json"]);
    let status = wait_for("the create to return", Duration::from_secs(60), || {
        create.try_wait().unwrap()
    });
    assert!(status.success(), "{}", output.text());
    let text = output.text();
    let start = text.find('{').expect("json output");
    let pending: Value = serde_json::from_str(&text[start..]).unwrap();
    assert_eq!(pending["status"], "provisioning", "{pending}");
    assert!(
        pending["status_message"]
            .as_str()
            .unwrap()
            .contains("reconciled when it reconnects"),
        "{pending}"
    );
    let id = pending["id"].as_str().unwrap().to_owned();
    cp.wait_status(&s.host_id, "disconnected", WAIT);

    // While the host is away, deprovision is refused with the reason.
    let out = cp.cli(&["sandbox", "deprovision", &id]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(
        err.contains("is disconnected") && err.contains(&s.host_id),
        "{err}"
    );

    // The agent wakes and reconnects: reconciled. Either the create reached
    // it (the container runs and is bound to the record) or the connection
    // was torn down before it was read (the record fails, saying so); in
    // both cases no container is left without its record.
    s.agent.signal(Signal::SIGCONT);
    let mut last = Value::Null;
    let settled = control_support::poll(WAIT, || {
        let sandbox = show(cp, &id);
        last = sandbox.clone();
        (sandbox["status"] == "running" || sandbox["status"] == "failed").then_some(sandbox)
    })
    .unwrap_or_else(|| panic!("the sandbox was not reconciled within {WAIT:?}: {last}"));
    assert!(history_kinds(&settled)
        .iter()
        .any(|k| k == "sandbox.create.interrupted"));
    if settled["status"] == "running" {
        let container = settled["container"].as_str().unwrap().to_owned();
        assert_eq!(
            s.scope.containers(),
            std::slice::from_ref(&container),
            "exactly one container, no orphan"
        );
    } else {
        let message = settled["status_message"].as_str().unwrap();
        assert!(message.contains("the create did not happen"), "{settled}");
        // The next listing would have rebound a late container: none exists.
        assert!(s.scope.containers().is_empty(), "{settled}");
    }

    let archived = cp.json(&["sandbox", "deprovision", &id]);
    assert_eq!(archived["status"], "archived");
    assert!(s.scope.containers().is_empty());
}

#[test]
fn two_agents_share_one_engine_and_placement_counts_capacity() {
    let Some(s) = setup() else { return };
    let cp = &s.cp;
    // A second agent on the same engine, in its own scope, with room for one.
    let other_scope = DockerScope::new();
    let mut env = agent_env(&other_scope, &s.volume_root);
    env.push((
        "GLOBALSTACKS_AGENT_MAX_SANDBOXES".to_owned(),
        "1".to_owned(),
    ));
    let (_, secret) = cp.token(&[]);
    let dir = tempfile::tempdir().unwrap();
    let small = start_agent(cp, &dir.path().join("agent"), Some(&secret), &env);
    let small_id = small.host_id();
    cp.wait_status(&small_id, "connected", WAIT);

    let first = cp.json(&["sandbox", "create", "--host-id", &small_id]);
    assert_eq!(first["status"], "running", "{first}");
    assert_eq!(first["docker_network"], other_scope.network.as_str());
    // Full: the explicit host is refused with the reason.
    let out = cp.cli(&["sandbox", "create", "--host-id", &small_id]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(
        err.contains(&small_id) && err.contains("full (1 of 1 sandboxes)"),
        "{err}"
    );
    // Without a host: the one with room.
    let second = cp.json(&["sandbox", "create"]);
    assert_eq!(second["host_id"], s.host_id.as_str(), "{second}");

    // Each agent sees and touches only its own scope.
    assert_eq!(
        other_scope.containers(),
        [first["container"].as_str().unwrap().to_owned()]
    );
    assert_eq!(
        s.scope.containers(),
        [second["container"].as_str().unwrap().to_owned()]
    );
    for sandbox in [&first, &second] {
        let id = sandbox["id"].as_str().unwrap();
        assert_eq!(
            cp.json(&["sandbox", "deprovision", id])["status"],
            "archived"
        );
    }
    assert!(other_scope.containers().is_empty() && s.scope.containers().is_empty());
    drop(small);
}
