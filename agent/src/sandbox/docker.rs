//! [`Runtime`] on the Docker Engine API through bollard.
//!
//! The client is made on first use and its API version negotiated down to
//! the engine's (bollard 0.21 speaks 1.53; Debian's engine 20.10 speaks
//! 1.41), so an agent started before its engine still comes up, and a
//! failed connection is tried again on the next call.

use std::collections::HashMap;
use std::time::Duration;

use bollard::container::LogOutput;
use bollard::errors::Error as BollardError;
use bollard::exec::{CreateExecOptions, ResizeExecOptions, StartExecOptions, StartExecResults};
use bollard::models::{
    ContainerCreateBody, EndpointSettings, HostConfig, Ipam, IpamConfig, NetworkCreateRequest,
    NetworkingConfig,
};
use bollard::query_parameters::{
    CreateContainerOptions, InspectContainerOptions, InspectNetworkOptions, ListContainersOptions,
    ListImagesOptions, LogsOptions, RemoveContainerOptions, StopContainerOptions,
};
use bollard::Docker;
use futures::StreamExt;
use tokio::sync::Mutex;

use super::runtime::{
    ContainerInfo, ContainerSpec, Exec, ExecSpec, ExecState, ImageInfo, LogsRequest, NetworkSpec,
    OutputChunk, OutputSource, OutputStream, Runtime, RuntimeError,
};

/// Largest piece of an exec's output the engine hands over at once.
const OUTPUT_CAPACITY: usize = 64 * 1024;

/// Time for one engine call to answer (stop adds its own timeout); the
/// streams that follow an answer (logs, exec output) are not limited.
const CALL_TIMEOUT: Duration = Duration::from_secs(60);

/// The Docker engine of `DOCKER_HOST`, or the local socket.
#[derive(Default)]
pub struct DockerRuntime {
    client: Mutex<Option<Docker>>,
}

impl std::fmt::Debug for DockerRuntime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DockerRuntime").finish_non_exhaustive()
    }
}

fn classify(err: BollardError) -> RuntimeError {
    match err {
        BollardError::DockerResponseServerError {
            status_code,
            message,
        } => match status_code {
            404 => RuntimeError::NotFound(message),
            409 => RuntimeError::Conflict(message),
            400 => RuntimeError::Invalid(message),
            _ => RuntimeError::Engine(format!("{message} (HTTP {status_code})")),
        },
        BollardError::RequestTimeoutError => {
            RuntimeError::Unavailable("the engine did not answer in time".to_owned())
        }
        other => {
            let text = other.to_string();
            if matches!(
                other,
                BollardError::IOError { .. }
                    | BollardError::HyperResponseError { .. }
                    | BollardError::SocketNotFoundError(_)
            ) {
                RuntimeError::Unavailable(text)
            } else {
                RuntimeError::Engine(text)
            }
        }
    }
}

/// 304: the container was already in the asked state.
fn not_modified(err: &BollardError) -> bool {
    matches!(
        err,
        BollardError::DockerResponseServerError {
            status_code: 304,
            ..
        }
    )
}

/// Output of the engine as the runtime's chunks (stdin echoes dropped).
fn output_of(
    stream: impl futures::Stream<Item = Result<LogOutput, BollardError>> + Send + 'static,
) -> OutputStream {
    Box::pin(stream.filter_map(|item| {
        std::future::ready(match item {
            Ok(LogOutput::StdOut { message }) => Some(Ok(OutputChunk {
                source: OutputSource::Stdout,
                data: message.to_vec(),
            })),
            Ok(LogOutput::StdErr { message }) => Some(Ok(OutputChunk {
                source: OutputSource::Stderr,
                data: message.to_vec(),
            })),
            Ok(LogOutput::Console { message }) => Some(Ok(OutputChunk {
                source: OutputSource::Console,
                data: message.to_vec(),
            })),
            Ok(LogOutput::StdIn { .. }) => None,
            Err(err) => Some(Err(classify(err))),
        })
    }))
}

fn ms_of_rfc3339(text: Option<&str>) -> i64 {
    text.filter(|t| !t.starts_with("0001-"))
        .and_then(|t| humantime::parse_rfc3339_weak(t.trim_end_matches('Z')).ok())
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

impl DockerRuntime {
    pub fn new() -> Self {
        Self::default()
    }

    async fn docker(&self) -> Result<Docker, RuntimeError> {
        let mut client = self.client.lock().await;
        if let Some(docker) = client.as_ref() {
            return Ok(docker.clone());
        }
        let docker = Docker::connect_with_defaults()
            .map_err(|e| RuntimeError::Unavailable(e.to_string()))?
            .with_timeout(CALL_TIMEOUT);
        let docker = docker.negotiate_version().await.map_err(classify)?;
        *client = Some(docker.clone());
        Ok(docker)
    }

    fn info_of(inspect: bollard::models::ContainerInspectResponse) -> ContainerInfo {
        let state = inspect.state.unwrap_or_default();
        let config = inspect.config.unwrap_or_default();
        let addresses = inspect
            .network_settings
            .and_then(|n| n.networks)
            .unwrap_or_default()
            .into_iter()
            .filter_map(|(name, endpoint)| {
                endpoint
                    .ip_address
                    .filter(|ip| !ip.is_empty())
                    .map(|ip| (name, ip))
            })
            .collect();
        ContainerInfo {
            id: inspect.id.unwrap_or_default(),
            name: inspect
                .name
                .unwrap_or_default()
                .trim_start_matches('/')
                .to_owned(),
            image: config.image.unwrap_or_default(),
            image_id: inspect.image.unwrap_or_default(),
            state: state.status.map(|s| s.to_string()).unwrap_or_default(),
            running: state.running.unwrap_or(false),
            exit_code: state.exit_code.unwrap_or(0),
            error: state.error.unwrap_or_default(),
            labels: config.labels.unwrap_or_default(),
            addresses,
            created_at_ms: ms_of_rfc3339(inspect.created.as_deref()),
            started_at_ms: ms_of_rfc3339(state.started_at.as_deref()),
        }
    }
}

#[async_trait::async_trait]
impl Runtime for DockerRuntime {
    async fn ensure_network(&self, spec: &NetworkSpec) -> Result<(), RuntimeError> {
        let docker = self.docker().await?;
        match docker
            .inspect_network(&spec.name, None::<InspectNetworkOptions>)
            .await
        {
            Ok(existing) => {
                let subnets: Vec<String> = existing
                    .ipam
                    .and_then(|i| i.config)
                    .unwrap_or_default()
                    .into_iter()
                    .filter_map(|c| c.subnet)
                    .collect();
                if subnets.iter().any(|s| *s == spec.subnet.to_string()) {
                    return Ok(());
                }
                return Err(RuntimeError::Conflict(format!(
                    "Docker network `{}` exists with subnet {} instead of {}; remove it or set another name or subnet",
                    spec.name,
                    if subnets.is_empty() { "-".to_owned() } else { subnets.join(",") },
                    spec.subnet
                )));
            }
            Err(err) => match classify(err) {
                RuntimeError::NotFound(_) => {}
                other => return Err(other),
            },
        }
        let request = NetworkCreateRequest {
            name: spec.name.clone(),
            driver: Some("bridge".to_owned()),
            ipam: Some(Ipam {
                driver: Some("default".to_owned()),
                config: Some(vec![IpamConfig {
                    subnet: Some(spec.subnet.to_string()),
                    gateway: Some(spec.gateway.to_string()),
                    ..Default::default()
                }]),
                options: None,
            }),
            labels: Some(spec.labels.clone()),
            ..Default::default()
        };
        match docker.create_network(request).await {
            Ok(_) => Ok(()),
            // Made by a concurrent create of ours in the meantime.
            Err(err) => match classify(err) {
                RuntimeError::Conflict(_) => Ok(()),
                other => Err(other),
            },
        }
    }

    async fn create_container(&self, spec: &ContainerSpec) -> Result<String, RuntimeError> {
        let docker = self.docker().await?;
        let binds: Vec<String> = spec
            .binds
            .iter()
            .map(|b| {
                format!(
                    "{}:{}:{}",
                    b.host_path,
                    b.container_path,
                    if b.read_only { "ro" } else { "rw" }
                )
            })
            .collect();
        let host_config = HostConfig {
            binds: (!binds.is_empty()).then_some(binds),
            memory: (spec.memory_bytes > 0)
                .then(|| i64::try_from(spec.memory_bytes).unwrap_or(i64::MAX)),
            nano_cpus: (spec.nano_cpus > 0)
                .then(|| i64::try_from(spec.nano_cpus).unwrap_or(i64::MAX)),
            network_mode: Some(spec.network.clone()),
            // docker-init as PID 1: stop is a SIGTERM that works (a shell
            // as PID 1 ignores it) and orphans are reaped.
            init: Some(true),
            dns: (!spec.dns.is_empty()).then(|| spec.dns.iter().map(ToString::to_string).collect()),
            ..Default::default()
        };
        let body = ContainerCreateBody {
            hostname: (!spec.hostname.is_empty()).then(|| spec.hostname.clone()),
            image: Some(spec.image.clone()),
            labels: Some(spec.labels.clone()),
            env: (!spec.env.is_empty()).then(|| spec.env.clone()),
            // A sandbox stays up like an idle terminal: the image's shell
            // waits on an open stdin.
            tty: Some(true),
            open_stdin: Some(true),
            attach_stdin: Some(false),
            attach_stdout: Some(false),
            attach_stderr: Some(false),
            host_config: Some(host_config),
            networking_config: Some(NetworkingConfig {
                endpoints_config: Some(HashMap::from([(
                    spec.network.clone(),
                    EndpointSettings::default(),
                )])),
            }),
            ..Default::default()
        };
        let options = CreateContainerOptions {
            name: Some(spec.name.clone()),
            platform: String::new(),
        };
        let created = docker
            .create_container(Some(options), body)
            .await
            .map_err(classify)?;
        Ok(created.id)
    }

    async fn start_container(&self, id: &str) -> Result<(), RuntimeError> {
        let docker = self.docker().await?;
        match docker.start_container(id, None).await {
            Ok(()) => Ok(()),
            Err(err) if not_modified(&err) => Ok(()),
            Err(err) => Err(classify(err)),
        }
    }

    async fn stop_container(&self, id: &str, timeout: Duration) -> Result<(), RuntimeError> {
        let docker = self.docker().await?;
        let options = StopContainerOptions {
            signal: None,
            t: Some(i32::try_from(timeout.as_secs()).unwrap_or(i32::MAX)),
        };
        match docker.stop_container(id, Some(options)).await {
            Ok(()) => Ok(()),
            Err(err) if not_modified(&err) => Ok(()),
            Err(err) => Err(classify(err)),
        }
    }

    async fn remove_container(&self, id: &str) -> Result<(), RuntimeError> {
        let docker = self.docker().await?;
        let options = RemoveContainerOptions {
            v: false,
            force: true,
            link: false,
        };
        docker
            .remove_container(id, Some(options))
            .await
            .map_err(classify)
    }

    async fn inspect_container(&self, id: &str) -> Result<Option<ContainerInfo>, RuntimeError> {
        let docker = self.docker().await?;
        match docker
            .inspect_container(id, None::<InspectContainerOptions>)
            .await
        {
            Ok(inspect) => Ok(Some(Self::info_of(inspect))),
            Err(err) => match classify(err) {
                RuntimeError::NotFound(_) => Ok(None),
                other => Err(other),
            },
        }
    }

    async fn list_containers(
        &self,
        labels: &[(&str, &str)],
    ) -> Result<Vec<ContainerInfo>, RuntimeError> {
        let docker = self.docker().await?;
        let filters = HashMap::from([(
            "label".to_owned(),
            labels.iter().map(|(k, v)| format!("{k}={v}")).collect(),
        )]);
        let summaries = docker
            .list_containers(Some(ListContainersOptions {
                all: true,
                filters: Some(filters),
                ..Default::default()
            }))
            .await
            .map_err(classify)?;
        let mut out = Vec::with_capacity(summaries.len());
        for summary in summaries {
            let Some(id) = summary.id else { continue };
            // Removed between the list and the inspect: not listed.
            if let Some(info) = self.inspect_container(&id).await? {
                out.push(info);
            }
        }
        Ok(out)
    }

    async fn list_images(&self) -> Result<Vec<ImageInfo>, RuntimeError> {
        let docker = self.docker().await?;
        let images = docker
            .list_images(Some(ListImagesOptions {
                all: false,
                ..Default::default()
            }))
            .await
            .map_err(classify)?;
        Ok(images
            .into_iter()
            .map(|image| ImageInfo {
                id: image.id,
                repo_tags: image
                    .repo_tags
                    .into_iter()
                    .filter(|t| t != "<none>:<none>")
                    .collect(),
                repo_digests: image
                    .repo_digests
                    .into_iter()
                    .filter(|d| !d.starts_with("<none>@"))
                    .collect(),
            })
            .collect())
    }

    async fn logs(&self, id: &str, request: LogsRequest) -> Result<OutputStream, RuntimeError> {
        let docker = self.docker().await?;
        // The logs of an unknown container fail at once, not as a stream.
        docker
            .inspect_container(id, None::<InspectContainerOptions>)
            .await
            .map_err(classify)?;
        let options = LogsOptions {
            follow: request.follow,
            stdout: true,
            stderr: true,
            tail: if request.tail == 0 {
                "all".to_owned()
            } else {
                request.tail.to_string()
            },
            ..Default::default()
        };
        Ok(output_of(docker.logs(id, Some(options))))
    }

    async fn exec(&self, container: &str, spec: &ExecSpec) -> Result<Exec, RuntimeError> {
        let docker = self.docker().await?;
        let created = docker
            .create_exec(
                container,
                CreateExecOptions {
                    attach_stdin: Some(spec.stdin),
                    attach_stdout: Some(true),
                    attach_stderr: Some(true),
                    tty: Some(spec.tty),
                    env: (!spec.env.is_empty()).then(|| spec.env.clone()),
                    cmd: Some(spec.cmd.clone()),
                    ..CreateExecOptions::default()
                },
            )
            .await
            .map_err(classify)?;
        let started = docker
            .start_exec(
                &created.id,
                Some(StartExecOptions {
                    detach: false,
                    tty: spec.tty,
                    output_capacity: Some(OUTPUT_CAPACITY),
                }),
            )
            .await
            .map_err(classify)?;
        let StartExecResults::Attached { output, input } = started else {
            return Err(RuntimeError::Engine(
                "the engine started the exec detached".to_owned(),
            ));
        };
        Ok(Exec {
            id: created.id,
            output: output_of(output),
            input,
        })
    }

    async fn inspect_exec(&self, exec_id: &str) -> Result<ExecState, RuntimeError> {
        let docker = self.docker().await?;
        let inspect = docker.inspect_exec(exec_id).await.map_err(classify)?;
        let running = inspect.running == Some(true);
        Ok(ExecState {
            running,
            exit_code: if running { None } else { inspect.exit_code },
        })
    }

    async fn resize_exec(&self, exec_id: &str, rows: u16, cols: u16) -> Result<(), RuntimeError> {
        let docker = self.docker().await?;
        docker
            .resize_exec(
                exec_id,
                ResizeExecOptions {
                    height: rows,
                    width: cols,
                },
            )
            .await
            .map_err(classify)
    }

    /// Docker has no API to end an exec: its process is killed by its pid
    /// (the engine reports the host's pid), if it still runs.
    async fn kill_exec(&self, exec_id: &str) -> Result<(), RuntimeError> {
        let docker = self.docker().await?;
        let inspect = docker.inspect_exec(exec_id).await.map_err(classify)?;
        if inspect.running != Some(true) {
            return Ok(());
        }
        let Some(pid) = inspect
            .pid
            .and_then(|p| i32::try_from(p).ok())
            .filter(|p| *p > 1)
        else {
            return Ok(());
        };
        match nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        ) {
            Ok(()) | Err(nix::errno::Errno::ESRCH) => Ok(()),
            Err(err) => Err(RuntimeError::Engine(format!(
                "killing exec {exec_id} (pid {pid}): {err}"
            ))),
        }
    }
}
