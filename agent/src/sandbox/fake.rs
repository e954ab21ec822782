//! An in-memory [`Runtime`] for the unit tests of the sandbox modules:
//! containers, images, networks, logs, and execs whose behaviour a test
//! scripts. Faults are injected per operation.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use futures::future::BoxFuture;
use tokio::sync::mpsc;

use super::runtime::{
    ContainerInfo, ContainerSpec, Exec, ExecSpec, ExecState, ImageInfo, LogsRequest, NetworkSpec,
    OutputChunk, OutputSource, OutputStream, Runtime, RuntimeError,
};

/// One process started in a fake container, as its script sees it.
pub struct ExecCall {
    pub spec: ExecSpec,
    /// What the caller writes to its stdin (EOF when the caller shuts it).
    pub stdin: tokio::io::DuplexStream,
    out: mpsc::Sender<OutputChunk>,
}

impl ExecCall {
    pub async fn stdout(&self, data: &str) {
        let source = if self.spec.tty {
            OutputSource::Console
        } else {
            OutputSource::Stdout
        };
        let _ = self
            .out
            .send(OutputChunk {
                source,
                data: data.as_bytes().to_vec(),
            })
            .await;
    }

    pub async fn stderr(&self, data: &str) {
        let _ = self
            .out
            .send(OutputChunk {
                source: OutputSource::Stderr,
                data: data.as_bytes().to_vec(),
            })
            .await;
    }
}

/// What a started process does; its result is the exit code.
pub type ExecScript = Arc<dyn Fn(ExecCall) -> BoxFuture<'static, i64> + Send + Sync>;

/// An in-memory engine.
#[derive(Default)]
pub struct FakeRuntime {
    state: Mutex<FakeState>,
    /// Apart from the rest: the exec tasks write their exit codes here.
    execs: Arc<Mutex<HashMap<String, ExecState>>>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[derive(Default)]
pub struct FakeState {
    pub containers: HashMap<String, (ContainerSpec, ContainerInfo)>,
    pub images: Vec<ImageInfo>,
    pub networks: Vec<NetworkSpec>,
    /// Images whose containers fail to start.
    pub broken: Vec<String>,
    /// The next call of the named operation (`"create"`, `"stop"`,
    /// `"list"`, ...) fails with this error.
    pub faults: HashMap<&'static str, RuntimeError>,
    /// Every container's log lines.
    pub logs: HashMap<String, Vec<OutputChunk>>,
    /// The commands of the execs, in start order.
    pub exec_log: Vec<Vec<String>>,
    pub killed: Vec<String>,
    /// Every `resize_exec` that reached a known exec: (exec id, rows, cols).
    pub resized: Vec<(String, u16, u16)>,
    aborts: HashMap<String, tokio::task::AbortHandle>,
    script: Option<ExecScript>,
    next: u32,
}

impl FakeRuntime {
    pub fn with_image(tag: &str) -> Arc<FakeRuntime> {
        let fake = FakeRuntime::default();
        fake.state().images.push(ImageInfo {
            id: format!("sha256:{tag}-id"),
            repo_tags: vec![tag.to_owned()],
            repo_digests: Vec::new(),
        });
        Arc::new(fake)
    }

    pub fn state(&self) -> MutexGuard<'_, FakeState> {
        lock(&self.state)
    }

    /// What the execs of every container do from now on.
    pub fn script<F>(&self, script: F)
    where
        F: Fn(ExecCall) -> BoxFuture<'static, i64> + Send + Sync + 'static,
    {
        self.state().script = Some(Arc::new(script));
    }

    /// Makes the next `op` fail with `err`.
    pub fn fail_next(&self, op: &'static str, err: RuntimeError) {
        self.state().faults.insert(op, err);
    }

    pub fn spec_of(&self, id: &str) -> ContainerSpec {
        self.state().containers[id].0.clone()
    }

    pub fn count(&self) -> usize {
        self.state().containers.len()
    }

    /// A running container `id` with these labels, made behind the module's back.
    pub fn add_running(&self, id: &str, labels: &[(&str, &str)]) {
        let info = ContainerInfo {
            id: id.to_owned(),
            name: format!("c-{id}"),
            state: "running".into(),
            running: true,
            labels: labels
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            ..Default::default()
        };
        self.state()
            .containers
            .insert(id.to_owned(), (ContainerSpec::default(), info));
    }

    fn fault(&self, op: &'static str) -> Result<(), RuntimeError> {
        match self.state().faults.remove(op) {
            Some(err) => Err(err),
            None => Ok(()),
        }
    }
}

fn no_such_container(id: &str) -> RuntimeError {
    RuntimeError::NotFound(format!("No such container: {id}"))
}

#[async_trait::async_trait]
impl Runtime for FakeRuntime {
    async fn ensure_network(&self, spec: &NetworkSpec) -> Result<(), RuntimeError> {
        self.fault("network")?;
        let mut state = self.state();
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
        self.fault("create")?;
        let mut state = self.state();
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
        self.fault("start")?;
        let mut state = self.state();
        let broken = state.broken.clone();
        let next = state.next;
        let (spec, info) = state
            .containers
            .get_mut(id)
            .ok_or_else(|| no_such_container(id))?;
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
        self.fault("stop")?;
        let mut state = self.state();
        let (_, info) = state
            .containers
            .get_mut(id)
            .ok_or_else(|| no_such_container(id))?;
        info.running = false;
        info.state = "exited".into();
        info.exit_code = 137;
        info.addresses.clear();
        Ok(())
    }

    async fn remove_container(&self, id: &str) -> Result<(), RuntimeError> {
        self.fault("remove")?;
        self.state()
            .containers
            .remove(id)
            .map(drop)
            .ok_or_else(|| no_such_container(id))
    }

    async fn inspect_container(&self, id: &str) -> Result<Option<ContainerInfo>, RuntimeError> {
        self.fault("inspect")?;
        Ok(self
            .state()
            .containers
            .get(id)
            .map(|(_, info)| info.clone()))
    }

    async fn list_containers(
        &self,
        labels: &[(&str, &str)],
    ) -> Result<Vec<ContainerInfo>, RuntimeError> {
        self.fault("list")?;
        let state = self.state();
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
        self.fault("images")?;
        Ok(self.state().images.clone())
    }

    async fn logs(&self, id: &str, request: LogsRequest) -> Result<OutputStream, RuntimeError> {
        self.fault("logs")?;
        let state = self.state();
        if !state.containers.contains_key(id) {
            return Err(no_such_container(id));
        }
        let lines = state.logs.get(id).cloned().unwrap_or_default();
        let skip = match usize::try_from(request.tail) {
            Ok(0) | Err(_) => 0,
            Ok(tail) => lines.len().saturating_sub(tail),
        };
        let lines: Vec<_> = lines.into_iter().skip(skip).map(Ok).collect();
        Ok(Box::pin(futures::stream::iter(lines)))
    }

    async fn exec(&self, container: &str, spec: &ExecSpec) -> Result<Exec, RuntimeError> {
        self.fault("exec")?;
        let mut state = self.state();
        let (_, info) = state
            .containers
            .get(container)
            .ok_or_else(|| no_such_container(container))?;
        if !info.running {
            return Err(RuntimeError::Conflict(format!(
                "Container {container} is not running"
            )));
        }
        let script = state
            .script
            .clone()
            .ok_or_else(|| RuntimeError::Engine("the test scripted no exec".into()))?;
        state.next += 1;
        let id = format!("exec-{}", state.next);
        state.exec_log.push(spec.cmd.clone());
        lock(&self.execs).insert(
            id.clone(),
            ExecState {
                running: true,
                exit_code: None,
            },
        );
        let (ours, theirs) = tokio::io::duplex(64 * 1024);
        let (out, output) = mpsc::channel(16);
        let call = ExecCall {
            spec: spec.clone(),
            stdin: theirs,
            out,
        };
        let run = script(call);
        let execs = self.execs.clone();
        let exec_id = id.clone();
        let task = tokio::spawn(async move {
            let code = run.await;
            lock(&execs).insert(
                exec_id,
                ExecState {
                    running: false,
                    exit_code: Some(code),
                },
            );
        });
        state.aborts.insert(id.clone(), task.abort_handle());
        let output = futures::stream::unfold((output, Some(task)), |(mut rx, task)| async move {
            if let Some(chunk) = rx.recv().await {
                return Some((Ok(chunk), (rx, task)));
            }
            // The script ended (its sender is dropped): its exit code is
            // recorded before the output ends, as the engine does.
            if let Some(task) = task {
                let _ = task.await;
            }
            None
        });
        Ok(Exec {
            id,
            output: Box::pin(output),
            input: Box::pin(ours),
        })
    }

    async fn inspect_exec(&self, exec_id: &str) -> Result<ExecState, RuntimeError> {
        self.fault("inspect_exec")?;
        lock(&self.execs)
            .get(exec_id)
            .copied()
            .ok_or_else(|| RuntimeError::NotFound(format!("No such exec instance: {exec_id}")))
    }

    async fn resize_exec(&self, exec_id: &str, rows: u16, cols: u16) -> Result<(), RuntimeError> {
        self.fault("resize_exec")?;
        if lock(&self.execs).contains_key(exec_id) {
            self.state().resized.push((exec_id.to_owned(), rows, cols));
            Ok(())
        } else {
            Err(RuntimeError::NotFound(format!(
                "No such exec instance: {exec_id}"
            )))
        }
    }

    async fn kill_exec(&self, exec_id: &str) -> Result<(), RuntimeError> {
        self.fault("kill_exec")?;
        let mut state = self.state();
        if let Some(abort) = state.aborts.remove(exec_id) {
            abort.abort();
        }
        state.killed.push(exec_id.to_owned());
        if let Some(exec) = lock(&self.execs).get_mut(exec_id) {
            if exec.running {
                *exec = ExecState {
                    running: false,
                    exit_code: Some(137),
                };
            }
        }
        Ok(())
    }
}
