//! Runtime networks, control side, end to end: the real control plane (in
//! this process, so that a test can register sandbox records through the
//! `Store` trait), the real `gstacks` CLI as a subprocess, and agents that
//! speak the real Session stream over TLS (enroll, hello with a mesh key,
//! netmaps, NetworkDiagnose answers, denied-connection events).

mod network_support;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use network_support::{tests_wait, text, Cluster, WAIT};
use proto::agent_service_client::AgentServiceClient;
use proto::{
    agent_message, command, command_result, control_message, reply, AgentMessage, CommandResult,
    ControlMessage, DiagnosticCheck, Event, Hello, MeshNodeInfo, Netmap, NetworkDiagnosis, Reply,
    Telemetry,
};
use serde_json::Value;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

/// What a fake agent's diagnose handler answers: its applied version.
#[derive(Default)]
struct Applied {
    version: u64,
    records: Vec<String>,
}

/// An agent speaking the Session stream: it records netmaps and answers
/// NetworkDiagnose from what it applied, as the real agent's handler does
/// (`topology_version` compares applied with expected, `dns_records` looks
/// for the alias).
struct FakeAgent {
    host_id: String,
    netmaps: mpsc::Receiver<Netmap>,
    up: mpsc::Sender<AgentMessage>,
    /// Every NetworkDiagnose it was sent.
    diagnoses: Arc<Mutex<Vec<proto::NetworkDiagnose>>>,
    /// Reader and heartbeat tasks; aborted on drop, which ends the stream.
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for FakeAgent {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

impl FakeAgent {
    async fn connect(cluster: &Cluster, host_id: &str, credential: &str, key: &str) -> FakeAgent {
        let (up, up_rx) = mpsc::channel::<AgentMessage>(64);
        up.send(AgentMessage {
            body: Some(agent_message::Body::Hello(Hello {
                protocol_version: proto::ProtocolVersion::ProtocolVersion1 as i32,
                telemetry: Some(Telemetry::default()),
                applied_topology_version: 0,
                mesh: Some(MeshNodeInfo {
                    public_key: key.to_owned(),
                    endpoint: format!("127.0.0.1:{}", 40000 + key.len()),
                }),
            })),
        })
        .await
        .unwrap();
        let mut client = AgentServiceClient::new(cluster.channel().await);
        let mut request = tonic::Request::new(ReceiverStream::new(up_rx));
        request.metadata_mut().insert(
            "authorization",
            format!("Bearer {credential}").parse().unwrap(),
        );
        let mut down = client.session(request).await.unwrap().into_inner();
        let (netmap_tx, netmaps) = mpsc::channel(64);
        let diagnoses = Arc::new(Mutex::new(Vec::new()));
        let applied = Arc::new(Mutex::new(Applied::default()));
        let replies = up.clone();
        let seen = diagnoses.clone();
        let me = host_id.to_owned();
        let beats = up.clone();
        let heartbeat = tokio::spawn(async move {
            let mut seq = 0;
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                seq += 1;
                let beat = AgentMessage {
                    body: Some(agent_message::Body::Heartbeat(proto::Heartbeat {
                        seq,
                        sent_at_ms: 0,
                        telemetry: None,
                    })),
                };
                if beats.send(beat).await.is_err() {
                    return;
                }
            }
        });
        let reader = tokio::spawn(async move {
            while let Ok(Some(ControlMessage { body: Some(body) })) = down.message().await {
                match body {
                    control_message::Body::Netmap(netmap) => {
                        {
                            let mut a = applied.lock().unwrap();
                            a.version = netmap.topology_version;
                            a.records = netmap.dns_records.iter().map(|r| r.name.clone()).collect();
                        }
                        if netmap_tx.send(netmap).await.is_err() {
                            break;
                        }
                    }
                    control_message::Body::Command(cmd) => {
                        let Some(command::Kind::NetworkDiagnose(ask)) = cmd.kind else {
                            continue;
                        };
                        seen.lock().unwrap().push(ask.clone());
                        let (version, has_record) = {
                            let a = applied.lock().unwrap();
                            let name = format!("{}.{}.gstacks", ask.alias, ask.network);
                            (a.version, a.records.contains(&name))
                        };
                        let checks = vec![
                            DiagnosticCheck {
                                name: "topology_version".into(),
                                passed: version == ask.expected_topology_version,
                                detail: format!(
                                    "applied {version}, control plane expects {}",
                                    ask.expected_topology_version
                                ),
                            },
                            DiagnosticCheck {
                                name: "dns_records".into(),
                                passed: has_record,
                                detail: format!("record for {} loaded: {has_record}", ask.alias),
                            },
                        ];
                        let result = CommandResult {
                            kind: Some(command_result::Kind::NetworkDiagnosis(NetworkDiagnosis {
                                host_id: me.clone(),
                                applied_topology_version: version,
                                checks,
                            })),
                        };
                        let _ = replies
                            .send(AgentMessage {
                                body: Some(agent_message::Body::Reply(Reply {
                                    request_id: cmd.request_id,
                                    outcome: Some(reply::Outcome::Result(result)),
                                })),
                            })
                            .await;
                    }
                    control_message::Body::Goodbye(_) => break,
                }
            }
        });
        FakeAgent {
            host_id: host_id.to_owned(),
            netmaps,
            up,
            diagnoses,
            tasks: vec![reader, heartbeat],
        }
    }

    /// The next netmap that satisfies `check`, skipping older ones.
    async fn netmap(&mut self, what: &str, check: impl Fn(&Netmap) -> bool) -> Netmap {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let netmap = tokio::time::timeout_at(deadline, self.netmaps.recv())
                .await
                .unwrap_or_else(|_| {
                    panic!("{}: no netmap with {what} within {WAIT:?}", self.host_id)
                })
                .expect("stream open");
            if check(&netmap) {
                return netmap;
            }
        }
    }

    /// Netmaps received so far and not yet read.
    fn pending(&mut self) -> Vec<Netmap> {
        let mut out = Vec::new();
        while let Ok(n) = self.netmaps.try_recv() {
            out.push(n);
        }
        out
    }

    async fn send_event(&self, event: Event) {
        self.up
            .send(AgentMessage {
                body: Some(agent_message::Body::Event(event)),
            })
            .await
            .unwrap();
    }
}

fn record_names(netmap: &Netmap) -> Vec<&str> {
    netmap.dns_records.iter().map(|r| r.name.as_str()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_list_show_and_every_validation_error() {
    let cluster = Cluster::start().await;
    let (host, _) = cluster.enroll("host-a").await;
    cluster.add_sandbox("sbx_api", &host, "127.0.0.2", &["web"]);
    cluster.add_sandbox("sbx_db", &host, "127.0.0.3", &[]);

    let created = cluster.json(&["network", "create", "dev"]).await;
    assert_eq!(created["name"], "dev");
    assert_eq!(created["dns_suffix"], "dev.gstacks");
    let v_create = created["topology_version"].as_u64().unwrap();
    assert_eq!(v_create, cluster.version().await);
    let out = cluster.cli(&["network", "create", "ops"]).await;
    assert!(out.status.success(), "{}", text(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("<alias>.ops.gstacks"));

    let listed = cluster.json(&["network", "list"]).await;
    let names: Vec<_> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["name"].clone())
        .collect();
    assert_eq!(names, ["dev", "ops"]);
    let table = cluster.cli(&["network", "list"]).await;
    let table = String::from_utf8(table.stdout).unwrap();
    assert!(table.starts_with("NAME"), "{table}");
    assert!(table.contains("dev.gstacks"), "{table}");

    // Attach with an alias and two ports; every change bumps by one.
    let change = cluster
        .json(&[
            "network", "attach", "dev", "sbx_api", "--alias", "api", "--port", "8080", "--port",
            "9090",
        ])
        .await;
    let v_attach = change["topology_version"].as_u64().unwrap();
    assert_eq!(v_attach, v_create + 2, "ops was created in between");
    assert_eq!(change["network"]["topology_version"], v_attach);
    cluster.json(&["network", "attach", "dev", "sbx_db"]).await;
    let added = cluster
        .json(&[
            "network", "alias", "add", "dev", "sbx_db", "db", "--port", "5432",
        ])
        .await;
    assert_eq!(added["topology_version"].as_u64().unwrap(), v_attach + 2);
    let rule = cluster
        .json(&[
            "network", "policy", "allow", "dev", "--from", "local", "--to", "api", "--port", "8080",
        ])
        .await;
    let rule_id = rule["rule"]["id"].as_str().unwrap().to_owned();
    assert!(rule_id.starts_with("pol_"), "{rule_id}");
    assert_eq!(rule["topology_version"].as_u64().unwrap(), v_attach + 3);

    let shown = cluster.json(&["network", "show", "dev"]).await;
    assert_eq!(shown["topology_version"].as_u64().unwrap(), v_attach + 3);
    let members: Vec<_> = shown["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["sandbox_id"].clone())
        .collect();
    assert_eq!(members, ["sbx_api", "sbx_db"]);
    assert_eq!(shown["members"][0]["host_id"], host.as_str());
    assert_eq!(shown["members"][0]["addresses"][0], "127.0.0.2");
    assert_eq!(shown["aliases"][0]["name"], "api.dev.gstacks");
    assert_eq!(
        shown["aliases"][0]["ports"],
        serde_json::json!([8080, 9090])
    );
    assert_eq!(shown["policy_rules"][0]["from"], "local");
    let show = cluster.cli(&["network", "show", "dev"]).await;
    let show = String::from_utf8(show.stdout).unwrap();
    for needle in [
        "dev.gstacks",
        "api.dev.gstacks",
        "8080,9090",
        &rule_id,
        "sbx_db",
    ] {
        assert!(show.contains(needle), "{needle} in\n{show}");
    }
    let aliases = cluster.json(&["network", "alias", "list", "dev"]).await;
    assert_eq!(aliases.as_array().unwrap().len(), 2);
    let rules = cluster.json(&["network", "policy", "list", "dev"]).await;
    assert_eq!(rules[0]["id"], rule_id.as_str());
    let resolved = cluster.json(&["network", "resolve", "dev", "api"]).await;
    assert_eq!(resolved["name"], "api.dev.gstacks");
    assert_eq!(resolved["sandbox_id"], "sbx_api");
    assert_eq!(resolved["host_id"], host.as_str());

    // Every validation error, each naming the thing.
    let version_before_errors = cluster.version().await;
    let cases: &[(&[&str], &str)] = &[
        (
            &["network", "create", "Dev"],
            "network name `Dev` is not a DNS label",
        ),
        (
            &["network", "create", "dev"],
            "network `dev` already exists",
        ),
        (
            &["network", "create", "a_b"],
            "network name `a_b` is not a DNS label",
        ),
        (&["network", "show", "nope"], "network `nope` not found"),
        (
            &["network", "attach", "nope", "sbx_api"],
            "network `nope` not found",
        ),
        (
            &["network", "attach", "dev", "sbx_ghost"],
            "sandbox `sbx_ghost` not found",
        ),
        (
            &["network", "attach", "dev", "sbx_api"],
            "sandbox `sbx_api` is already attached to network `dev`",
        ),
        (
            &[
                "network", "attach", "ops", "sbx_api", "--alias", "Api", "--port", "80",
            ],
            "alias name `Api` is not a DNS label",
        ),
        (
            &[
                "network", "attach", "ops", "sbx_api", "--alias", "api", "--port", "0",
            ],
            "port 0 is out of range: ports are 1-65535",
        ),
        (
            &[
                "network", "attach", "ops", "sbx_api", "--alias", "api", "--port", "70000",
            ],
            "port 70000 is out of range: ports are 1-65535",
        ),
        (
            &["network", "attach", "ops", "sbx_api", "--alias", "api"],
            "alias `api` needs at least one port",
        ),
        (
            &[
                "network", "alias", "add", "dev", "sbx_db", "api", "--port", "1",
            ],
            "alias `api` already exists in network `dev`",
        ),
        (
            &[
                "network", "alias", "add", "ops", "sbx_db", "x", "--port", "1",
            ],
            "sandbox `sbx_db` is not attached to network `ops`",
        ),
        (
            &["network", "alias", "remove", "dev", "ghost"],
            "alias `ghost` not found in network `dev`",
        ),
        (
            &["network", "detach", "ops", "sbx_db"],
            "sandbox `sbx_db` is not attached to network `ops`",
        ),
        (
            &[
                "network", "policy", "allow", "dev", "--from", "sandbox:", "--to", "api",
            ],
            "selector `sandbox:` is not valid",
        ),
        (
            &[
                "network", "policy", "allow", "dev", "--from", "Bad_Sel", "--to", "api",
            ],
            "selector `Bad_Sel` is not valid",
        ),
        (
            &[
                "network", "policy", "allow", "dev", "--from", "local", "--to", "ghost",
            ],
            "alias `ghost` not found in network `dev`",
        ),
        (
            &[
                "network", "policy", "allow", "dev", "--from", "local", "--to", "api", "--port",
                "65536",
            ],
            "port 65536 is out of range",
        ),
        (
            &[
                "network", "policy", "allow", "dev", "--from", "local", "--to", "api", "--port",
                "8080",
            ],
            &format!("rule `{rule_id}` in network `dev` already allows local -> api on port 8080"),
        ),
        (
            &["network", "policy", "remove", "dev", "pol_ghost"],
            "policy rule `pol_ghost` not found in network `dev`",
        ),
        (
            &["network", "resolve", "dev", "ghost"],
            "alias `ghost` not found in network `dev`",
        ),
        (
            &["network", "test", "dev", "local", "api"],
            "target `api` must read <alias>:<port>",
        ),
        (
            &["network", "test", "dev", "local", "api:99999"],
            "port 99999 is out of range",
        ),
    ];
    for (args, expected) in cases {
        let err = cluster.fails(args).await;
        assert!(err.contains(expected), "gstacks {args:?}: {err}");
    }
    // Clap refuses a port without an alias before any call.
    let out = cluster
        .cli(&["network", "attach", "dev", "sbx_db", "--port", "80"])
        .await;
    assert!(!out.status.success());
    assert_eq!(
        cluster.version().await,
        version_before_errors,
        "refused changes bump nothing"
    );

    // Removal paths, each a version.
    let removed = cluster
        .json(&["network", "policy", "remove", "dev", &rule_id])
        .await;
    assert_eq!(
        removed["topology_version"].as_u64().unwrap(),
        version_before_errors + 1
    );
    cluster
        .json(&["network", "alias", "remove", "dev", "db"])
        .await;
    let detached = cluster.json(&["network", "detach", "dev", "sbx_db"]).await;
    assert_eq!(
        detached["topology_version"].as_u64().unwrap(),
        version_before_errors + 3
    );
    let members = detached["network"]["members"].as_array().unwrap();
    assert_eq!(members.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_get_netmaps_on_hello_and_after_changes_that_concern_them() {
    let cluster = Cluster::start().await;
    let (host_a, cred_a) = cluster.enroll("host-a").await;
    let (host_b, cred_b) = cluster.enroll("host-b").await;
    let (host_c, cred_c) = cluster.enroll("host-c").await;
    let mut a = FakeAgent::connect(&cluster, &host_a, &cred_a, "KEY_A").await;
    let mut b = FakeAgent::connect(&cluster, &host_b, &cred_b, "KEY_BB").await;
    let mut c = FakeAgent::connect(&cluster, &host_c, &cred_c, "KEY_CCC").await;

    // Right after hello: node id and stable overlay addresses.
    let first_a = a.netmap("addresses", |n| !n.addresses.is_empty()).await;
    assert_eq!(first_a.node_id, format!("node_{host_a}"));
    assert!(
        first_a.addresses[0].starts_with("100.64.0."),
        "{:?}",
        first_a.addresses
    );
    assert!(first_a.addresses[0].ends_with("/32"));
    assert!(first_a.addresses[1].starts_with("fd7a:115c:a1e0::"));
    assert!(first_a.peers.is_empty());
    b.netmap("addresses", |n| !n.addresses.is_empty()).await;
    c.netmap("addresses", |n| !n.addresses.is_empty()).await;

    cluster.add_sandbox("sbx_api", &host_a, "127.0.0.2", &[]);
    cluster.add_sandbox("sbx_web", &host_b, "127.0.0.3", &["frontend"]);
    cluster.json(&["network", "create", "dev"]).await;
    cluster
        .json(&[
            "network", "attach", "dev", "sbx_api", "--alias", "api", "--port", "8080",
        ])
        .await;
    let with_api = a
        .netmap("api record", |n| record_names(n) == ["api.dev.gstacks"])
        .await;
    assert_eq!(with_api.topology_version, cluster.version().await);
    let record = &with_api.dns_records[0];
    assert_eq!(record.target_host_id, host_a);
    assert_eq!(record.ports, [8080]);
    assert_eq!(
        record.target_node_address,
        first_a.addresses[0].trim_end_matches("/32")
    );
    assert_eq!(with_api.sandboxes[0].addresses, ["127.0.0.2"]);

    // b joins dev: a and b become peers; c shares nothing.
    let change = cluster
        .json(&[
            "network", "attach", "dev", "sbx_web", "--alias", "web", "--port", "80",
        ])
        .await;
    let v = change["topology_version"].as_u64().unwrap();
    let a_peers = a.netmap("peer b", |n| n.topology_version == v).await;
    assert_eq!(a_peers.peers.len(), 1);
    let peer = &a_peers.peers[0];
    assert_eq!(peer.public_key, "KEY_BB");
    assert_eq!(peer.host_id, host_b);
    assert_eq!(peer.kind, "agent");
    assert_eq!(peer.persistent_keepalive_secs, 0);
    assert_eq!(peer.allowed_ips.len(), 2);
    let b_map = b.netmap("peer a", |n| n.topology_version == v).await;
    assert_eq!(b_map.peers[0].public_key, "KEY_A");
    assert_eq!(record_names(&b_map), ["api.dev.gstacks", "web.dev.gstacks"]);
    let web = b_map
        .sandboxes
        .iter()
        .find(|s| s.sandbox_id == "sbx_web")
        .unwrap();
    assert_eq!(web.tags, ["frontend"]);

    // A policy change reaches a and b.
    let rule = cluster
        .json(&[
            "network", "policy", "allow", "dev", "--from", "web", "--to", "api", "--port", "8080",
        ])
        .await;
    let v_rule = rule["topology_version"].as_u64().unwrap();
    let a_rule = a.netmap("the rule", |n| n.topology_version == v_rule).await;
    assert_eq!(a_rule.policy_rules[0].from, "web");
    b.netmap("the rule", |n| n.topology_version == v_rule).await;

    // A change in another network does not concern a or b: c's own
    // attachment reaches c, while a and b receive nothing in between.
    cluster.add_sandbox("sbx_c", &host_c, "127.0.0.4", &[]);
    cluster.json(&["network", "create", "ops"]).await;
    let c_change = cluster
        .json(&[
            "network", "attach", "ops", "sbx_c", "--alias", "job", "--port", "1",
        ])
        .await;
    let v_c = c_change["topology_version"].as_u64().unwrap();
    c.netmap("ops", |n| {
        n.topology_version == v_c && record_names(n) == ["job.ops.gstacks"]
    })
    .await;
    // A later change that concerns a proves a heard nothing about ops.
    let alias = cluster
        .json(&[
            "network", "alias", "add", "dev", "sbx_api", "admin", "--port", "9000",
        ])
        .await;
    let v_alias = alias["topology_version"].as_u64().unwrap();
    let next = a.netmap("admin", |_| true).await;
    assert_eq!(
        next.topology_version, v_alias,
        "a got a netmap for an unrelated change"
    );
    assert!(a.pending().is_empty());

    // A key change (agent restart with a new key) reaches the peers.
    drop(a);
    let mut a = FakeAgent::connect(&cluster, &host_a, &cred_a, "KEY_A_NEW").await;
    // The reconnect gets the current netmap right away.
    let again = a.netmap("current", |_| true).await;
    assert_eq!(again.addresses, first_a.addresses, "addresses are stable");
    assert!(again.topology_version >= v_alias);
    b.netmap("a's new key", |n| {
        n.peers.iter().any(|p| p.public_key == "KEY_A_NEW")
    })
    .await;

    // Detach empties a's view of dev, and a leaves b's peers.
    let detached = cluster.json(&["network", "detach", "dev", "sbx_api"]).await;
    let v_detach = detached["topology_version"].as_u64().unwrap();
    let a_alone = a.netmap("detach", |n| n.topology_version == v_detach).await;
    assert!(a_alone.networks.is_empty() && a_alone.peers.is_empty());
    let b_alone = b.netmap("detach", |n| n.topology_version == v_detach).await;
    assert!(b_alone.peers.is_empty());
    assert_eq!(record_names(&b_alone), ["web.dev.gstacks"]);

    // c joins dev, then its host is revoked: it leaves b's peers and its
    // alias leaves b's records, with a new version.
    cluster.json(&["network", "attach", "dev", "sbx_c"]).await;
    b.netmap("peer c", |n| n.peers.iter().any(|p| p.host_id == host_c))
        .await;
    cluster.json(&["host", "revoke", &host_c]).await;
    let after = b
        .netmap("c gone", |n| !n.peers.iter().any(|p| p.host_id == host_c))
        .await;
    assert_eq!(after.topology_version, cluster.version().await);
    assert!(after.peers.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn network_test_combines_control_and_agent_checks() {
    let cluster = Cluster::start().await;
    let (host_a, cred_a) = cluster.enroll("host-a").await;
    let (host_b, cred_b) = cluster.enroll("host-b").await;
    let mut a = FakeAgent::connect(&cluster, &host_a, &cred_a, "KEY_A").await;
    let mut b = FakeAgent::connect(&cluster, &host_b, &cred_b, "KEY_B").await;
    a.netmap("hello", |_| true).await;
    b.netmap("hello", |_| true).await;
    cluster.add_sandbox("sbx_api", &host_a, "127.0.0.2", &[]);
    cluster.add_sandbox("sbx_web", &host_b, "127.0.0.3", &[]);
    cluster.json(&["network", "create", "dev"]).await;
    cluster
        .json(&[
            "network", "attach", "dev", "sbx_api", "--alias", "api", "--port", "8080",
        ])
        .await;
    let last = cluster
        .json(&[
            "network", "attach", "dev", "sbx_web", "--alias", "web", "--port", "80",
        ])
        .await;
    let v = last["topology_version"].as_u64().unwrap();
    a.netmap("current", |n| n.topology_version == v).await;
    b.netmap("current", |n| n.topology_version == v).await;

    // No rule yet: the policy check fails and the CLI exits 1.
    let out = cluster
        .cli(&["network", "test", "dev", "local", "api:8080"])
        .await;
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let table = String::from_utf8(out.stdout).unwrap();
    assert!(table.contains("FAIL"), "{table}");
    assert!(table.contains("default deny"), "{table}");

    let rule = cluster
        .json(&[
            "network",
            "policy",
            "allow",
            "dev",
            "--from",
            "sandbox:sbx_web",
            "--to",
            "api",
        ])
        .await;
    let rule_id = rule["rule"]["id"].as_str().unwrap().to_owned();
    let v = rule["topology_version"].as_u64().unwrap();
    a.netmap("rule", |n| n.topology_version == v).await;
    b.netmap("rule", |n| n.topology_version == v).await;
    let out = cluster
        .cli(&[
            "network",
            "test",
            "dev",
            "sandbox:sbx_web",
            "api:8080",
            "--json",
        ])
        .await;
    assert!(out.status.success(), "{}", text(&out));
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["passed"], true);
    let checks = report["checks"].as_array().unwrap();
    let named = |origin: &str, name: &str| {
        checks
            .iter()
            .find(|c| c["origin"] == origin && c["name"] == name)
            .unwrap_or_else(|| panic!("no check {origin}/{name} in {checks:?}"))
            .clone()
    };
    for name in ["network_exists", "alias_exists", "port_published", "policy"] {
        assert_eq!(named("control", name)["passed"], true, "{name}");
    }
    assert!(named("control", "policy")["detail"]
        .as_str()
        .unwrap()
        .contains(&rule_id));
    // Both participating agents were asked (target a, source b) with the
    // version they were last sent, and their checks are in the report.
    assert_eq!(named(&host_a, "topology_version")["passed"], true);
    assert_eq!(named(&host_b, "topology_version")["passed"], true);
    assert_eq!(named(&host_a, "dns_records")["passed"], true);
    let asked = a.diagnoses.lock().unwrap().last().cloned().unwrap();
    assert_eq!(asked.source, "sandbox:sbx_web");
    assert_eq!((asked.alias.as_str(), asked.port), ("api", 8080));
    assert_eq!(asked.expected_topology_version, v);
    assert_eq!(b.diagnoses.lock().unwrap().len(), 1);
    // A source named by its alias is asked too; a sandbox that is not
    // attached is a failed check.
    let out = cluster
        .cli(&["network", "test", "dev", "web", "api:8080", "--json"])
        .await;
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        report["checks"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["origin"] == host_b.as_str()),
        "{report}"
    );
    assert_eq!(b.diagnoses.lock().unwrap().len(), 2);
    cluster.add_sandbox("sbx_loose", &host_b, "127.0.0.9", &[]);
    let out = cluster
        .cli(&["network", "test", "dev", "sandbox:sbx_loose", "api:8080"])
        .await;
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stdout)
        .contains("sandbox `sbx_loose` is not attached to network `dev`"));

    // A port the alias does not publish fails on the control plane's side.
    let out = cluster
        .cli(&["network", "test", "dev", "sandbox:sbx_web", "api:9999"])
        .await;
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stdout).contains("does not publish port 9999"));

    // The target host gone: said so, and nothing is asked of it.
    drop(a);
    cluster.running().plane.sessions.close(
        &host_a,
        control::sessions::CloseReason {
            code: proto::ErrorCode::Unavailable,
            message: "test".into(),
        },
    );
    let report = tests_wait(|| async {
        let out = cluster
            .cli(&["network", "test", "dev", "local", "api:8080", "--json"])
            .await;
        let report: Value = serde_json::from_slice(&out.stdout).ok()?;
        let gone = report["checks"]
            .as_array()?
            .iter()
            .any(|c| c["name"] == "target_host_connected" && c["passed"] == false);
        gone.then_some(report)
    })
    .await;
    assert_eq!(report["passed"], false);
    // An unknown network is a failed check too, not an error.
    let out = cluster
        .cli(&["network", "test", "ghost", "local", "api:1"])
        .await;
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stdout).contains("network `ghost` does not exist"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn denied_connections_are_host_events_and_counted_per_network() {
    let cluster = Cluster::start().await;
    let (host_a, cred_a) = cluster.enroll("host-a").await;
    let mut a = FakeAgent::connect(&cluster, &host_a, &cred_a, "KEY_A").await;
    a.netmap("hello", |_| true).await;
    cluster.json(&["network", "create", "dev"]).await;
    for port in ["8080", "8081"] {
        let mut event = Event {
            kind: "network.connection.denied".into(),
            level: proto::EventLevel::Warn as i32,
            message: format!("local -> api:{port} denied: no rule allows it"),
            ..Event::default()
        };
        event.fields.insert("network".into(), "dev".into());
        event.fields.insert("alias".into(), "api".into());
        event.fields.insert("port".into(), port.into());
        event.fields.insert("source".into(), "local".into());
        event
            .fields
            .insert("reason".into(), "no rule allows it (default deny)".into());
        a.send_event(event).await;
    }
    let shown = tests_wait(|| async {
        let shown = cluster.json(&["network", "show", "dev"]).await;
        (shown["denied_connections"] == 2).then_some(shown)
    })
    .await;
    assert!(shown["last_denied_at_ms"].as_i64().unwrap() > 0);
    let out = cluster.cli(&["host", "logs", &host_a, "--json"]).await;
    let logs = String::from_utf8(out.stdout).unwrap();
    let denied: Vec<Value> = logs
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|e| e["kind"] == "network.connection.denied")
        .collect();
    assert_eq!(denied.len(), 2, "{logs}");
    assert_eq!(denied[0]["fields"]["alias"], "api");
    let table = String::from_utf8(cluster.cli(&["network", "list"]).await.stdout).unwrap();
    assert!(
        table.lines().nth(1).unwrap().trim_end().ends_with('2'),
        "{table}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_plane_restart_keeps_networks_versions_and_addresses() {
    let mut cluster = Cluster::start().await;
    let (host_a, cred_a) = cluster.enroll("host-a").await;
    let mut a = FakeAgent::connect(&cluster, &host_a, &cred_a, "KEY_A").await;
    let first = a.netmap("hello", |_| true).await;
    cluster.add_sandbox("sbx_api", &host_a, "127.0.0.2", &[]);
    cluster.json(&["network", "create", "dev"]).await;
    cluster
        .json(&[
            "network", "attach", "dev", "sbx_api", "--alias", "api", "--port", "8080",
        ])
        .await;
    cluster
        .json(&[
            "network", "policy", "allow", "dev", "--from", "*", "--to", "*",
        ])
        .await;
    let before = cluster.json(&["network", "show", "dev"]).await;
    let version = cluster.version().await;
    drop(a);
    cluster.restart().await;
    assert_eq!(cluster.version().await, version);
    let after = cluster.json(&["network", "show", "dev"]).await;
    assert_eq!(after, before);
    // The agent reconnects (same key) and gets the same addresses and the
    // current version; nothing changed, so the version did not move.
    let mut a = FakeAgent::connect(&cluster, &host_a, &cred_a, "KEY_A").await;
    let again = a.netmap("hello", |_| true).await;
    assert_eq!(again.addresses, first.addresses);
    assert_eq!(again.topology_version, version);
    assert_eq!(record_names(&again), ["api.dev.gstacks"]);
    assert_eq!(again.policy_rules.len(), 1);
}
