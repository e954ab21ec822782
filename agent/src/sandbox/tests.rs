//! The sandbox module over a fake [`Runtime`]: labels and scope, volumes,
//! error paths. The real engine is exercised in `tests/tests/sandbox_*.rs`.

use std::collections::HashMap;

use super::fake::FakeRuntime;
use super::*;

fn settings(scope: &str, roots: Vec<std::path::PathBuf>) -> SandboxSettings {
    SandboxSettings {
        scope: scope.to_owned(),
        docker_network: format!("gstacks-{scope}"),
        docker_subnet: "10.213.0.0/24".parse().unwrap(),
        volume_roots: roots,
        max_sandboxes: 8,
    }
}

fn module(fake: &Arc<FakeRuntime>, scope: &str, host: &str) -> Arc<SandboxModule> {
    SandboxModule::new(fake.clone(), settings(scope, Vec::new()), host.to_owned())
}

fn create_cmd(sandbox_id: &str, image: &str) -> proto::SandboxCreate {
    proto::SandboxCreate {
        sandbox_id: sandbox_id.to_owned(),
        cluster_id: "cls_default".into(),
        name: "web_1".into(),
        image: image.to_owned(),
        resources: Some(proto::SandboxResources {
            memory_bytes: 256 << 20,
            millicpus: 1500,
        }),
        labels: HashMap::from([
            ("team".to_owned(), "a".to_owned()),
            (LABEL_SCOPE.to_owned(), "forged".to_owned()),
        ]),
        ..Default::default()
    }
}

fn runtime_of(outcome: CommandOutcome) -> SandboxRuntime {
    match outcome {
        Ok(command_result::Kind::SandboxRuntime(rt)) => rt,
        other => panic!("expected a runtime, got {other:?}"),
    }
}

#[tokio::test]
async fn create_labels_the_container_and_joins_the_agent_network() {
    let fake = FakeRuntime::with_image("img:1");
    let m = module(&fake, "scope-a", "hst_a");
    let rt = runtime_of(m.create(create_cmd("sbx_1", "img:1")).await);
    assert!(rt.running);
    assert_eq!(rt.sandbox_id, "sbx_1");
    assert_eq!(rt.host_id, "hst_a");
    assert_eq!(rt.container_name, "gstacks-sbx_1");
    assert_eq!(rt.network, "gstacks-scope-a");
    assert_eq!(rt.addresses.len(), 1);
    assert_eq!(rt.image_digest, "sha256:img:1-id");
    let spec = fake.spec_of(&rt.container_id);
    assert_eq!(spec.labels[LABEL_MANAGED], "true");
    // The managed labels cannot be forged through the command's labels.
    assert_eq!(spec.labels[LABEL_SCOPE], "scope-a");
    assert_eq!(spec.labels[LABEL_SANDBOX_ID], "sbx_1");
    assert_eq!(spec.labels[LABEL_HOST_ID], "hst_a");
    assert_eq!(spec.labels[LABEL_CLUSTER_ID], "cls_default");
    assert_eq!(spec.labels["team"], "a");
    assert_eq!(spec.dns, [std::net::Ipv4Addr::new(10, 213, 0, 1)]);
    assert_eq!(spec.network, "gstacks-scope-a");
    assert_eq!(spec.hostname, "web-1");
    assert_eq!(spec.memory_bytes, 256 << 20);
    assert_eq!(spec.nano_cpus, 1_500_000_000);
    // Creating the same sandbox twice is refused, naming the container.
    let err = m.create(create_cmd("sbx_1", "img:1")).await.unwrap_err();
    assert_eq!(err.code, ErrorCode::AlreadyExists);
    assert!(err.message.contains(&rt.container_id), "{}", err.message);
}

#[tokio::test]
async fn two_scopes_on_one_engine_never_touch_each_other() {
    let fake = FakeRuntime::with_image("img:1");
    let a = module(&fake, "scope-a", "hst_a");
    let b = module(&fake, "scope-b", "hst_b");
    let rt_a = runtime_of(a.create(create_cmd("sbx_a", "img:1")).await);
    let rt_b = runtime_of(b.create(create_cmd("sbx_b", "img:1")).await);
    let listed = |outcome: CommandOutcome| match outcome {
        Ok(command_result::Kind::SandboxInventory(inv)) => inv
            .containers
            .into_iter()
            .map(|c| c.sandbox_id)
            .collect::<Vec<_>>(),
        other => panic!("{other:?}"),
    };
    assert_eq!(listed(a.list().await), ["sbx_a"]);
    assert_eq!(listed(b.list().await), ["sbx_b"]);
    // B may not stop, start or remove A's container, even by its id.
    let err = b
        .stop(proto::SandboxStop {
            sandbox_id: "sbx_a".into(),
            container_id: rt_a.container_id.clone(),
            timeout_secs: 1,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code, ErrorCode::PermissionDenied);
    assert!(err.message.contains("scope-b"), "{}", err.message);
    let err = b
        .remove(proto::SandboxRemove {
            sandbox_id: "sbx_a".into(),
            container_id: rt_a.container_id.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code, ErrorCode::PermissionDenied);
    assert_eq!(fake.count(), 2);
    // A container id of another sandbox (same scope) is refused too.
    let err = b
        .start(proto::SandboxStart {
            sandbox_id: "sbx_other".into(),
            container_id: rt_b.container_id.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code, ErrorCode::FailedPrecondition);
}

#[tokio::test]
async fn stop_start_remove_and_a_gone_container() {
    let fake = FakeRuntime::with_image("img:1");
    let m = module(&fake, "s", "hst_a");
    let rt = runtime_of(m.create(create_cmd("sbx_1", "img:1")).await);
    let stopped = runtime_of(
        m.stop(proto::SandboxStop {
            sandbox_id: "sbx_1".into(),
            container_id: rt.container_id.clone(),
            timeout_secs: 0,
        })
        .await,
    );
    assert!(!stopped.running);
    assert_eq!(stopped.state, "exited");
    assert!(stopped.addresses.is_empty());
    // Found by the sandbox id label when the control plane has no id.
    let started = runtime_of(
        m.start(proto::SandboxStart {
            sandbox_id: "sbx_1".into(),
            container_id: String::new(),
        })
        .await,
    );
    assert!(started.running);
    let removed = runtime_of(
        m.remove(proto::SandboxRemove {
            sandbox_id: "sbx_1".into(),
            container_id: rt.container_id.clone(),
        })
        .await,
    );
    assert_eq!(removed.state, "removed");
    assert_eq!(fake.count(), 0);
    // Removing again is not an error; starting a gone one is NOT_FOUND.
    let again = runtime_of(
        m.remove(proto::SandboxRemove {
            sandbox_id: "sbx_1".into(),
            container_id: rt.container_id.clone(),
        })
        .await,
    );
    assert_eq!(again.state, "removed");
    let err = m
        .start(proto::SandboxStart {
            sandbox_id: "sbx_1".into(),
            container_id: rt.container_id.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code, ErrorCode::NotFound);
    assert!(
        err.message.contains("is gone from host hst_a"),
        "{}",
        err.message
    );
}

#[tokio::test]
async fn missing_image_and_failed_start_leave_nothing_behind() {
    let fake = FakeRuntime::with_image("img:1");
    let m = module(&fake, "s", "hst_a");
    let err = m.create(create_cmd("sbx_1", "nope:1")).await.unwrap_err();
    assert_eq!(err.code, ErrorCode::NotFound);
    assert_eq!(err.message, "No such image: nope:1");
    fake.state().broken.push("img:1".into());
    let err = m.create(create_cmd("sbx_2", "img:1")).await.unwrap_err();
    assert_eq!(err.code, ErrorCode::FailedPrecondition);
    assert!(
        err.message.contains("OCI runtime create failed"),
        "{}",
        err.message
    );
    assert_eq!(fake.count(), 0);
    let err = m
        .create(create_cmd("not-an-id", "img:1"))
        .await
        .unwrap_err();
    assert_eq!(err.code, ErrorCode::InvalidArgument);
}

#[tokio::test]
async fn engine_refusals_carry_the_engine_message_and_leave_nothing() {
    let fake = FakeRuntime::with_image("img:1");
    let m = module(&fake, "s", "hst_a");
    // The engine refuses the create itself.
    fake.fail_next(
        "create",
        RuntimeError::Invalid("Minimum memory limit allowed is 6MB".into()),
    );
    let err = m.create(create_cmd("sbx_1", "img:1")).await.unwrap_err();
    assert_eq!(err.code, ErrorCode::InvalidArgument);
    assert_eq!(err.message, "Minimum memory limit allowed is 6MB");
    assert_eq!(fake.count(), 0);
    // No engine at all.
    fake.fail_next(
        "network",
        RuntimeError::Unavailable("connect /var/run/docker.sock: no such file".into()),
    );
    let err = m.create(create_cmd("sbx_1", "img:1")).await.unwrap_err();
    assert_eq!(err.code, ErrorCode::Unavailable);
    assert_eq!(
        err.message,
        "the container engine is unavailable: connect /var/run/docker.sock: no such file"
    );
    // A start that fails after the create: the container is removed again,
    // and the create fails with the start's reason.
    fake.fail_next(
        "start",
        RuntimeError::Engine("driver failed programming external connectivity".into()),
    );
    let err = m.create(create_cmd("sbx_1", "img:1")).await.unwrap_err();
    assert_eq!(err.code, ErrorCode::FailedPrecondition);
    assert_eq!(
        err.message,
        "the container did not start: container engine: driver failed programming external connectivity"
    );
    assert_eq!(fake.count(), 0);
    // The sandbox can be created once the engine agrees.
    runtime_of(m.create(create_cmd("sbx_1", "img:1")).await);
}

#[tokio::test]
async fn operations_on_a_missing_container() {
    let fake = FakeRuntime::with_image("img:1");
    let m = module(&fake, "s", "hst_a");
    let stop = |container: &str| proto::SandboxStop {
        sandbox_id: "sbx_1".into(),
        container_id: container.into(),
        timeout_secs: 1,
    };
    let start = |container: &str| proto::SandboxStart {
        sandbox_id: "sbx_1".into(),
        container_id: container.into(),
    };
    // Never made: by its id, and by the sandbox id label.
    for container in ["f00", ""] {
        let err = m.stop(stop(container)).await.unwrap_err();
        assert_eq!(err.code, ErrorCode::NotFound, "{container}");
        assert!(
            err.message.contains("the container of sandbox sbx_1")
                && err.message.contains("is gone from host hst_a"),
            "{}",
            err.message
        );
        let err = m.start(start(container)).await.unwrap_err();
        assert_eq!(err.code, ErrorCode::NotFound);
        let err = m
            .inspect(proto::SandboxInspect {
                sandbox_id: "sbx_1".into(),
                container_id: container.into(),
            })
            .await
            .unwrap_err();
        assert_eq!(err.code, ErrorCode::NotFound);
    }
    // Removed between the lookup and the stop: the engine's 404 passes.
    let rt = runtime_of(m.create(create_cmd("sbx_1", "img:1")).await);
    fake.fail_next(
        "stop",
        RuntimeError::NotFound(format!("No such container: {}", rt.container_id)),
    );
    let err = m.stop(stop(&rt.container_id)).await.unwrap_err();
    assert_eq!(err.code, ErrorCode::NotFound);
    assert!(err.message.contains("No such container"), "{}", err.message);

    // Deprovision of a container that is already gone succeeds...
    fake.state().containers.clear();
    let remove = |container: &str| proto::SandboxRemove {
        sandbox_id: "sbx_1".into(),
        container_id: container.into(),
    };
    for container in [rt.container_id.as_str(), ""] {
        let gone = runtime_of(m.remove(remove(container)).await);
        assert_eq!(gone.state, "removed");
        assert_eq!(gone.container_id, container);
    }
    // ... also when it vanishes between the lookup and the removal.
    let rt = runtime_of(m.create(create_cmd("sbx_1", "img:1")).await);
    fake.fail_next(
        "remove",
        RuntimeError::NotFound(format!("No such container: {}", rt.container_id)),
    );
    assert_eq!(
        runtime_of(m.remove(remove(&rt.container_id)).await).state,
        "removed"
    );
    // A stale container id still removes the sandbox's container of this
    // scope (made by a create the control plane did not hear back from).
    let gone = runtime_of(m.remove(remove("0ld")).await);
    assert_eq!(gone.state, "removed");
    assert_eq!(fake.count(), 0);
    // An engine failure is not a removal: the caller must not archive.
    let rt = runtime_of(m.create(create_cmd("sbx_1", "img:1")).await);
    fake.fail_next(
        "remove",
        RuntimeError::Conflict("removal of container is already in progress".into()),
    );
    let err = m.remove(remove(&rt.container_id)).await.unwrap_err();
    assert_eq!(err.code, ErrorCode::AlreadyExists);
    assert_eq!(err.message, "removal of container is already in progress");
    assert_eq!(fake.count(), 1);
}

#[tokio::test]
async fn inventory_lists_only_this_scope_and_reports_engine_failures() {
    let fake = FakeRuntime::with_image("img:1");
    let m = module(&fake, "s", "hst_new");
    // A predecessor's container (same scope, another host id), one of
    // another scope, and an unmanaged one.
    fake.add_running(
        "a",
        &[
            (LABEL_MANAGED, "true"),
            (LABEL_SCOPE, "s"),
            (LABEL_SANDBOX_ID, "sbx_a"),
            (LABEL_HOST_ID, "hst_old"),
        ],
    );
    fake.add_running("b", &[(LABEL_MANAGED, "true"), (LABEL_SCOPE, "other")]);
    fake.add_running("c", &[(LABEL_SCOPE, "s")]);
    let Ok(command_result::Kind::SandboxInventory(inventory)) = m.list().await else {
        panic!()
    };
    assert_eq!(inventory.scope, "s");
    assert_eq!(inventory.containers.len(), 1);
    let found = &inventory.containers[0];
    assert_eq!(
        (
            found.sandbox_id.as_str(),
            found.host_id.as_str(),
            found.container_id.as_str()
        ),
        ("sbx_a", "hst_old", "a")
    );
    fake.fail_next("list", RuntimeError::Unavailable("engine down".into()));
    let err = m.list().await.unwrap_err();
    assert_eq!(err.code, ErrorCode::Unavailable);
    // Telemetry does without: nothing counted, nothing cached.
    fake.fail_next("list", RuntimeError::Unavailable("engine down".into()));
    fake.fail_next("images", RuntimeError::Unavailable("engine down".into()));
    assert_eq!(m.facts().await, RuntimeFacts::default());
}

#[tokio::test]
async fn volumes_must_exist_and_lie_under_a_root() {
    let root = tempfile::tempdir().unwrap();
    let outside = tempfile::tempdir().unwrap();
    let data = root.path().join("data");
    std::fs::create_dir(&data).unwrap();
    let escape = root.path().join("escape");
    std::os::unix::fs::symlink(outside.path(), &escape).unwrap();
    let fake = FakeRuntime::with_image("img:1");
    let canonical_root = std::fs::canonicalize(root.path()).unwrap();
    let m = SandboxModule::new(
        fake.clone(),
        settings("s", vec![canonical_root.clone()]),
        "hst_a".into(),
    );
    let vol = |host: &std::path::Path, ro: bool| proto::VolumeMount {
        host_path: host.display().to_string(),
        container_path: "/data".into(),
        read_only: ro,
    };
    let bind = m.check_volume(&vol(&data, true)).unwrap();
    assert_eq!(
        bind.host_path,
        canonical_root.join("data").display().to_string()
    );
    assert!(bind.read_only);

    let err = m
        .check_volume(&vol(&root.path().join("nope"), false))
        .unwrap_err();
    assert_eq!(err.code, ErrorCode::InvalidArgument);
    assert!(err.message.contains("does not exist"), "{}", err.message);
    let err = m.check_volume(&vol(outside.path(), false)).unwrap_err();
    assert_eq!(err.code, ErrorCode::PermissionDenied);
    assert!(
        err.message.contains("outside the volume roots"),
        "{}",
        err.message
    );
    // A symlink under the root that leads outside it is outside.
    let err = m.check_volume(&vol(&escape, false)).unwrap_err();
    assert_eq!(err.code, ErrorCode::PermissionDenied);

    // Without roots, no volume at all.
    let closed = module(&fake, "s2", "hst_a");
    let err = closed.check_volume(&vol(&data, false)).unwrap_err();
    assert_eq!(err.code, ErrorCode::PermissionDenied);
    assert!(
        err.message.contains(crate::config::VOLUME_ROOTS),
        "{}",
        err.message
    );

    // A refused volume fails the create before anything is made.
    let mut cmd = create_cmd("sbx_1", "img:1");
    cmd.volumes = vec![vol(outside.path(), false)];
    assert!(m.create(cmd).await.is_err());
    assert_eq!(fake.count(), 0);
    let mut cmd = create_cmd("sbx_1", "img:1");
    cmd.volumes = vec![vol(&data, true)];
    let rt = runtime_of(m.create(cmd).await);
    assert_eq!(fake.spec_of(&rt.container_id).binds, [bind]);
}

#[tokio::test]
async fn facts_count_running_containers_of_the_scope_and_name_images() {
    let fake = FakeRuntime::with_image("img:1");
    let a = module(&fake, "a", "hst_a");
    let b = module(&fake, "b", "hst_b");
    runtime_of(a.create(create_cmd("sbx_1", "img:1")).await);
    let rt = runtime_of(a.create(create_cmd("sbx_2", "img:1")).await);
    runtime_of(b.create(create_cmd("sbx_3", "img:1")).await);
    a.stop(proto::SandboxStop {
        sandbox_id: "sbx_2".into(),
        container_id: rt.container_id,
        timeout_secs: 1,
    })
    .await
    .unwrap();
    let facts = a.facts().await;
    assert_eq!(facts.running_sandboxes, 1);
    assert_eq!(facts.cached_images, ["sha256:img:1-id", "img:1"]);
}

#[test]
fn hostnames_from_names() {
    assert_eq!(hostname_of("web_1.dev"), "web-1-dev");
    assert_eq!(hostname_of("-x-"), "x");
    assert_eq!(hostname_of(&"a".repeat(80)).len(), 63);
}
