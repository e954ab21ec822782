//! The sandbox module over a fake [`Runtime`]: labels and scope, volumes,
//! error paths. The real engine is exercised in `tests/tests/sandbox_*.rs`.

use std::collections::HashMap;
use std::sync::Mutex;

use super::*;

/// An in-memory engine: containers, images and networks.
#[derive(Default)]
struct FakeRuntime {
    state: Mutex<FakeState>,
}

#[derive(Default)]
struct FakeState {
    containers: HashMap<String, (ContainerSpec, ContainerInfo)>,
    images: Vec<ImageInfo>,
    networks: Vec<NetworkSpec>,
    /// Images whose containers fail to start.
    broken: Vec<String>,
    next: u32,
}

impl FakeRuntime {
    fn with_image(tag: &str) -> Arc<FakeRuntime> {
        let fake = FakeRuntime::default();
        fake.state.lock().unwrap().images.push(ImageInfo {
            id: format!("sha256:{tag}-id"),
            repo_tags: vec![tag.to_owned()],
            repo_digests: Vec::new(),
        });
        Arc::new(fake)
    }

    fn spec_of(&self, id: &str) -> ContainerSpec {
        self.state.lock().unwrap().containers[id].0.clone()
    }

    fn count(&self) -> usize {
        self.state.lock().unwrap().containers.len()
    }
}

#[async_trait::async_trait]
impl Runtime for FakeRuntime {
    async fn ensure_network(&self, spec: &NetworkSpec) -> Result<(), RuntimeError> {
        let mut state = self.state.lock().unwrap();
        if let Some(existing) = state.networks.iter().find(|n| n.name == spec.name) {
            if existing.subnet != spec.subnet {
                return Err(RuntimeError::Conflict("other subnet".into()));
            }
            return Ok(());
        }
        state.networks.push(spec.clone());
        Ok(())
    }

    async fn create_container(&self, spec: &ContainerSpec) -> Result<String, RuntimeError> {
        let mut state = self.state.lock().unwrap();
        let Some(image) = state
            .images
            .iter()
            .find(|i| i.repo_tags.contains(&spec.image))
            .cloned()
        else {
            return Err(RuntimeError::NotFound(format!(
                "No such image: {}",
                spec.image
            )));
        };
        if state.containers.values().any(|(s, _)| s.name == spec.name) {
            return Err(RuntimeError::Conflict(format!(
                "Conflict. The container name \"/{}\" is already in use",
                spec.name
            )));
        }
        state.next += 1;
        let id = format!("{:064x}", state.next);
        let info = ContainerInfo {
            id: id.clone(),
            name: spec.name.clone(),
            image: spec.image.clone(),
            image_id: image.id,
            state: "created".into(),
            labels: spec.labels.clone(),
            ..Default::default()
        };
        state.containers.insert(id.clone(), (spec.clone(), info));
        Ok(id)
    }

    async fn start_container(&self, id: &str) -> Result<(), RuntimeError> {
        let mut state = self.state.lock().unwrap();
        let broken = state.broken.clone();
        let next = state.next;
        let (spec, info) = state
            .containers
            .get_mut(id)
            .ok_or_else(|| RuntimeError::NotFound(format!("No such container: {id}")))?;
        if broken.contains(&spec.image) {
            return Err(RuntimeError::Invalid(
                "OCI runtime create failed: exec: \"sh\": not found".into(),
            ));
        }
        info.running = true;
        info.state = "running".into();
        info.addresses
            .insert(spec.network.clone(), format!("10.213.0.{}", next + 1));
        Ok(())
    }

    async fn stop_container(&self, id: &str, _timeout: Duration) -> Result<(), RuntimeError> {
        let mut state = self.state.lock().unwrap();
        let (_, info) = state
            .containers
            .get_mut(id)
            .ok_or_else(|| RuntimeError::NotFound(format!("No such container: {id}")))?;
        info.running = false;
        info.state = "exited".into();
        info.exit_code = 137;
        info.addresses.clear();
        Ok(())
    }

    async fn remove_container(&self, id: &str) -> Result<(), RuntimeError> {
        let mut state = self.state.lock().unwrap();
        state
            .containers
            .remove(id)
            .map(drop)
            .ok_or_else(|| RuntimeError::NotFound(format!("No such container: {id}")))
    }

    async fn inspect_container(&self, id: &str) -> Result<Option<ContainerInfo>, RuntimeError> {
        Ok(self
            .state
            .lock()
            .unwrap()
            .containers
            .get(id)
            .map(|(_, info)| info.clone()))
    }

    async fn list_containers(
        &self,
        labels: &[(&str, &str)],
    ) -> Result<Vec<ContainerInfo>, RuntimeError> {
        let state = self.state.lock().unwrap();
        let mut out: Vec<ContainerInfo> = state
            .containers
            .values()
            .map(|(_, info)| info.clone())
            .filter(|info| {
                labels
                    .iter()
                    .all(|(k, v)| info.labels.get(*k).map(String::as_str) == Some(*v))
            })
            .collect();
        out.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(out)
    }

    async fn list_images(&self) -> Result<Vec<ImageInfo>, RuntimeError> {
        Ok(self.state.lock().unwrap().images.clone())
    }
}

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
    fake.state.lock().unwrap().broken.push("img:1".into());
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
