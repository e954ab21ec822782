//! Sandbox logs, terminal, files and repository bootstrap on the machine's
//! real Docker engine, through a real control plane and a real agent, driven
//! by the `gstacks` CLI. The image is built locally (busybox + the host's
//! git); the repository is served by `git daemon` on the agent's sandbox
//! bridge gateway. Containers, the bridge and the image are removed even
//! when the test fails.

mod control_support;

use std::io::{Read as _, Write as _};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use control_support::{wait_for, Agent, ControlPlane, WAIT};
use serde_json::Value;
use sha2::{Digest, Sha256};
use tests::docker::DockerScope;
use tests::git_image::GitImage;

/// Kills a process we started when dropped.
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `docker inspect --format <format> <id>`.
fn inspect(id: &str, format: &str) -> String {
    tests::docker::docker_ok(&["inspect", "--format", format, id])
}

fn stderr_of(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// Samples the peak RSS of some processes until stopped.
struct RssSampler {
    stop: Arc<AtomicBool>,
    peaks: Vec<Arc<AtomicU64>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl RssSampler {
    fn start(pids: &[u32]) -> RssSampler {
        let stop = Arc::new(AtomicBool::new(false));
        let peaks: Vec<Arc<AtomicU64>> = pids.iter().map(|_| Arc::default()).collect();
        let thread = {
            let stop = stop.clone();
            let peaks = peaks.clone();
            let pids = pids.to_vec();
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    for (pid, peak) in pids.iter().zip(&peaks) {
                        peak.fetch_max(rss_kib(*pid), Ordering::Relaxed);
                    }
                    // A sampling period, not a synchronisation.
                    std::thread::sleep(Duration::from_millis(20));
                }
            })
        };
        RssSampler {
            stop,
            peaks,
            thread: Some(thread),
        }
    }

    fn finish(mut self) -> Vec<u64> {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
        self.peaks
            .iter()
            .map(|p| p.load(Ordering::Relaxed))
            .collect()
    }
}

fn sha256_file(path: &Path) -> String {
    let mut file = std::fs::File::open(path).unwrap();
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    format!("{:x}", hasher.finalize())
}

/// Writes `size` bytes of a pseudo-random (xorshift) stream.
fn write_random(path: &Path, size: usize) {
    let mut file = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    let mut state = 0x9E37_79B9_7F4A_7C15u64 ^ u64::from(std::process::id());
    let mut buf = vec![0u8; 1 << 20];
    let mut left = size;
    while left > 0 {
        for word in buf.chunks_mut(8) {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            word.copy_from_slice(&state.to_le_bytes()[..word.len()]);
        }
        let n = left.min(buf.len());
        file.write_all(&buf[..n]).unwrap();
        left -= n;
    }
    file.flush().unwrap();
}

fn create_sandbox(cp: &ControlPlane, args: &[&str]) -> Value {
    let mut all = vec!["sandbox", "create"];
    all.extend_from_slice(args);
    all.push("--json");
    let out = cp.cli(&all);
    assert!(out.status.success(), "{out:?}");
    serde_json::from_slice(&out.stdout).unwrap()
}

fn show(cp: &ControlPlane, id: &str) -> Value {
    let out = cp.cli(&["sandbox", "show", id, "--json"]);
    assert!(out.status.success(), "{out:?}");
    let value: Value = serde_json::from_slice(&out.stdout).unwrap();
    value.get("sandbox").cloned().unwrap_or(value)
}

fn wait_repo(cp: &ControlPlane, id: &str, deadline: Duration) -> Value {
    wait_for(
        &format!("the repository of {id} to settle"),
        deadline,
        || {
            let s = show(cp, id);
            match s["repo"]["status"].as_str() {
                Some("ready") | Some("failed") => Some(s),
                _ => None,
            }
        },
    )
}

/// A bare repository `app.git` (branch `dev`, a README) under
/// `<dir>/repos`; returns that directory.
fn bare_repository(dir: &Path) -> std::path::PathBuf {
    let repos = dir.join("repos");
    std::fs::create_dir_all(&repos).unwrap();
    let work = dir.join("work");
    let git = |args: &[&str], cwd: &Path| {
        let out = Command::new("git")
            .args(args)
            .current_dir(cwd)
            .env("GIT_AUTHOR_NAME", "t")
            .env("GIT_AUTHOR_EMAIL", "t@example.invalid")
            .env("GIT_COMMITTER_NAME", "t")
            .env("GIT_COMMITTER_EMAIL", "t@example.invalid")
            .output()
            .unwrap();
        assert!(out.status.success(), "git {args:?}: {out:?}");
    };
    std::fs::create_dir_all(&work).unwrap();
    git(&["init", "-q", "-b", "main"], &work);
    std::fs::write(work.join("README"), "hello from the dev branch\n").unwrap();
    git(&["checkout", "-q", "-b", "dev"], &work);
    git(&["add", "README"], &work);
    git(&["commit", "-q", "-m", "first"], &work);
    git(
        &["clone", "-q", "--bare", work.to_str().unwrap(), "app.git"],
        &repos,
    );
    repos
}

/// A TCP port free on `address` right now.
fn free_port(address: &str) -> u16 {
    let listener = std::net::TcpListener::bind((address, 0)).expect("bind the bridge gateway");
    listener.local_addr().unwrap().port()
}

/// `git daemon` serving `repos` on `address:port`, listening on return.
fn git_daemon(address: &str, port: u16, repos: &Path) -> Killed {
    let daemon = Killed(
        Command::new("git")
            .args([
                "daemon",
                "--reuseaddr",
                "--export-all",
                &format!("--listen={address}"),
                &format!("--port={port}"),
                &format!("--base-path={}", repos.display()),
            ])
            .arg(repos)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("git daemon"),
    );
    wait_for("git daemon to listen", WAIT, || {
        std::net::TcpStream::connect((address, port))
            .ok()
            .map(|_| ())
    });
    daemon
}

/// A server that accepts connections and never answers: a clone from it
/// hangs until the server goes (dropping it closes every connection).
struct BlackHole {
    stop: Arc<AtomicBool>,
    accepted: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl BlackHole {
    fn start(address: &str) -> (BlackHole, u16) {
        let listener = std::net::TcpListener::bind((address, 0)).expect("bind the bridge gateway");
        let port = listener.local_addr().unwrap().port();
        listener.set_nonblocking(true).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let accepted = Arc::new(AtomicU64::new(0));
        let thread = {
            let (stop, accepted) = (stop.clone(), accepted.clone());
            std::thread::spawn(move || {
                let mut held = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((stream, _)) => {
                            held.push(stream);
                            accepted.fetch_add(1, Ordering::Relaxed);
                        }
                        // An accept loop's idle period, not a synchronisation.
                        Err(_) => std::thread::sleep(Duration::from_millis(10)),
                    }
                }
            })
        };
        (
            BlackHole {
                stop,
                accepted,
                thread: Some(thread),
            },
            port,
        )
    }
}

impl Drop for BlackHole {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The whole life of a sandbox on the real engine, in order: create ->
/// running -> exec (terminal: a command, its output and exit code) -> logs
/// -> files put/get (100 MiB each way, checksum equal, memory bounded) ->
/// stop (a `logs --follow` ends with it) -> start -> (listings, bad paths,
/// repository bootstrap) -> deprovision -> `archived`, the container gone.
#[test]
fn sandbox_full_flow_on_docker() {
    if !tests::docker::available() {
        return;
    }
    // Dropped last: the image outlives the containers.
    let image = GitImage::build(&format!("sbio-{}-flow", std::process::id()));
    // Containers and the bridge go with the scope, even on failure.
    let docker = DockerScope::new();
    let gateway = docker.gateway.clone();

    let dir = tempfile::tempdir().unwrap();
    let cp = ControlPlane::start(&dir.path().join("control"));
    let (_, secret) = cp.token(&[]);
    let agent = Agent::start(
        &cp,
        &dir.path().join("agent"),
        Some(&secret),
        &docker
            .agent_env()
            .iter()
            .map(|(k, v)| (*k, v.as_str()))
            .collect::<Vec<_>>(),
    );
    let host = agent.host_id();
    cp.wait_status(&host, "connected", WAIT);

    // --- create -> running.
    let sandbox = create_sandbox(&cp, &["--image", &image.reference, "--host-id", &host]);
    assert_eq!(sandbox["status"], "running", "{sandbox}");
    let id = sandbox["id"].as_str().unwrap().to_owned();
    let container = sandbox["container"].as_str().unwrap().to_owned();
    assert_eq!(inspect(&container, "{{.State.Running}}"), "true");
    assert_eq!(docker.containers(), std::slice::from_ref(&container));

    // --- terminal: output and exit code; the backend's time limit closes it.
    let out = cp.cli_with_stdin(
        &["sandbox", "terminal", &id],
        Some("echo hi-from-$((40 + 2)); exit 3\n"),
    );
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("hi-from-42"),
        "{out:?}"
    );
    let started = Instant::now();
    let out = cp.cli_with_stdin(
        &[
            "sandbox",
            "terminal",
            &id,
            "--max-duration",
            "1",
            "--",
            "sleep",
            "60",
        ],
        None,
    );
    assert_eq!(out.status.code(), Some(75), "{out:?}");
    assert!(stderr_of(&out).contains("time limit"), "{out:?}");
    assert!(started.elapsed() < Duration::from_secs(20));
    // The killed process does not linger in the container.
    let out = cp.cli_with_stdin(&["sandbox", "terminal", &id, "--", "ps"], None);
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("sleep 60"),
        "{out:?}"
    );

    // --- logs: stdout and stderr apart, --tail.
    let out = wait_for("the container's first lines", WAIT, || {
        let out = cp.cli(&["sandbox", "logs", &id]);
        assert!(out.status.success(), "{out:?}");
        String::from_utf8_lossy(&out.stdout)
            .contains("sandbox-hello-stdout")
            .then_some(out)
    });
    // The sandbox's container has a TTY, so the engine merges its stderr
    // into its output (a container without one keeps them apart).
    let both = |out: &std::process::Output| {
        format!("{}{}", String::from_utf8_lossy(&out.stdout), stderr_of(out))
    };
    assert!(both(&out).contains("sandbox-hello-stderr"), "{out:?}");
    let out = cp.cli(&["sandbox", "logs", &id, "--tail", "1"]);
    assert!(out.status.success(), "{out:?}");
    assert!(both(&out).contains("sandbox-hello-stderr"), "{out:?}");
    assert!(!both(&out).contains("sandbox-hello-stdout"), "{out:?}");
    // --- files: 100 MiB each way with equal sha256, memory bounded.
    let size = 100 * 1024 * 1024;
    let local = dir.path().join("big.bin");
    write_random(&local, size);
    let local_sum = sha256_file(&local);
    let pids = [agent.pid(), cp.pid()];
    let idle = [rss_kib(pids[0]), rss_kib(pids[1])];
    let sampler = RssSampler::start(&pids);
    let started = Instant::now();
    let out = cp.cli(&[
        "sandbox",
        "files",
        "put",
        &id,
        "/tmp/big.bin",
        local.to_str().unwrap(),
    ]);
    let put_secs = started.elapsed().as_secs_f64();
    assert!(out.status.success(), "{out:?}");
    assert!(
        stderr_of(&out).contains(&format!("({size} bytes)")),
        "{out:?}"
    );
    let back = dir.path().join("back.bin");
    let started = Instant::now();
    let out = cp.cli(&[
        "sandbox",
        "files",
        "get",
        &id,
        "/tmp/big.bin",
        back.to_str().unwrap(),
    ]);
    let get_secs = started.elapsed().as_secs_f64();
    let peaks = sampler.finish();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(sha256_file(&back), local_sum);
    let mib = size as f64 / (1024.0 * 1024.0);
    eprintln!(
        "sandbox files: put 100 MiB in {put_secs:.2} s ({:.1} MiB/s), get in {get_secs:.2} s ({:.1} MiB/s); \
         peak RSS agent {} KiB (idle {} KiB), control plane {} KiB (idle {} KiB)",
        mib / put_secs,
        mib / get_secs,
        peaks[0],
        idle[0],
        peaks[1],
        idle[1]
    );
    // Bounded: a copy of the file in either process would add 100 MiB.
    assert!(
        peaks[0] < idle[0] + 64 * 1024,
        "agent RSS {peaks:?} {idle:?}"
    );
    assert!(
        peaks[1] < idle[1] + 64 * 1024,
        "control RSS {peaks:?} {idle:?}"
    );

    // --- stop (a follow ends with it) -> start.
    let (mut follow, follow_out) = cp.cli_spawn(&["sandbox", "logs", &id, "--follow"]);
    wait_for("the follow to print", WAIT, || {
        follow_out
            .text()
            .contains("sandbox-hello-stdout")
            .then_some(())
    });
    let stopped = cp.json(&["sandbox", "stop", &id]);
    assert_eq!(stopped["status"], "stopped", "{stopped}");
    assert_eq!(inspect(&container, "{{.State.Running}}"), "false");
    let status = wait_for("logs --follow to end with the container", WAIT, || {
        follow.try_wait().unwrap()
    });
    assert!(status.success(), "{}", follow_out.text());
    let started = cp.json(&["sandbox", "start", &id]);
    assert_eq!(started["status"], "running", "{started}");
    assert_eq!(started["container"], container.as_str());
    assert_eq!(inspect(&container, "{{.State.Running}}"), "true");

    // ls: a directory's entries, and one file.
    let listing: Value = {
        let out = cp.cli(&["sandbox", "files", "ls", &id, "/tmp", "--json"]);
        assert!(out.status.success(), "{out:?}");
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let entry = listing["entries"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "big.bin")
        .cloned()
        .unwrap_or_else(|| panic!("{listing}"));
    assert_eq!(entry["kind"], "file");
    assert_eq!(entry["size"], size as u64);
    let out = cp.cli(&["sandbox", "files", "ls", &id, "/"]);
    assert!(out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("d0755"),
        "{out:?}"
    );

    // Bad paths: clear one-line errors and a non-zero exit.
    let cases: [(&[&str], &str); 6] = [
        (
            &["get", &id, "/nope/file", "-"],
            "`/nope/file` does not exist",
        ),
        (&["get", &id, "/etc", "-"], "`/etc` is a directory"),
        (&["ls", &id, "/nope"], "`/nope` does not exist"),
        (
            &["put", &id, "/nope/dir/x", local.to_str().unwrap()],
            "`/nope/dir/x` does not exist",
        ),
        (
            &["put", &id, "/tmp", local.to_str().unwrap()],
            "`/tmp` is a directory",
        ),
        (
            &["put", &id, "/sys/x", local.to_str().unwrap()],
            "`/sys/x` is not accessible",
        ),
    ];
    for (args, expected) in cases {
        let mut all = vec!["sandbox", "files"];
        all.extend_from_slice(args);
        let out = cp.cli(&all);
        assert!(!out.status.success(), "{args:?}: {out:?}");
        let err = stderr_of(&out);
        assert!(err.contains(expected), "{args:?}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{err}");
    }
    let out = cp.cli(&["sandbox", "files", "get", "sbx_nope", "/etc/passwd", "-"]);
    assert_eq!(
        stderr_of(&out).trim(),
        "error: sandbox `sbx_nope` not found"
    );
    let out = cp.cli(&[
        "sandbox",
        "files",
        "put",
        &id,
        "/tmp/x",
        dir.path().join("missing").to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    assert!(stderr_of(&out).contains("cannot read"), "{out:?}");

    // --- repository bootstrap from a local git daemon on the bridge gateway.
    let repos = bare_repository(dir.path());
    let port = free_port(&gateway);
    let daemon = git_daemon(&gateway, port, &repos);
    let url = format!("git://{gateway}:{port}/app.git");
    let with_repo = create_sandbox(
        &cp,
        &[
            "--image",
            &image.reference,
            "--host-id",
            &host,
            "--repo-url",
            &url,
            "--repo-branch",
            "dev",
            "--repo-path",
            "/work/app",
        ],
    );
    assert_eq!(with_repo["status"], "running", "{with_repo}");
    let repo_id = with_repo["id"].as_str().unwrap().to_owned();
    assert!(
        matches!(
            with_repo["repo"]["status"].as_str(),
            Some("pending") | Some("cloning") | Some("ready")
        ),
        "{with_repo}"
    );
    let settled = wait_repo(&cp, &repo_id, Duration::from_secs(60));
    assert_eq!(settled["repo"]["status"], "ready", "{settled}");
    let out = cp.cli(&["sandbox", "files", "get", &repo_id, "/work/app/README", "-"]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "hello from the dev branch\n"
    );
    let shown = cp.cli(&["sandbox", "show", &repo_id]);
    assert!(
        String::from_utf8_lossy(&shown.stdout).contains("ready"),
        "{shown:?}"
    );
    let history = serde_json::to_string(&cp.json(&["sandbox", "show", &repo_id])).unwrap();
    assert!(history.contains("sandbox.repo.cloning"), "{history}");
    assert!(history.contains("sandbox.repo.ready"), "{history}");

    // A bad repository fails the bootstrap, not the sandbox.
    let bad = create_sandbox(
        &cp,
        &[
            "--image",
            &image.reference,
            "--host-id",
            &host,
            "--repo-url",
            &format!("git://{gateway}:{port}/missing.git"),
            "--repo-path",
            "/work/app",
        ],
    );
    let bad_id = bad["id"].as_str().unwrap().to_owned();
    let settled = wait_repo(&cp, &bad_id, Duration::from_secs(60));
    assert_eq!(settled["repo"]["status"], "failed", "{settled}");
    assert!(
        settled["repo"]["error"]
            .as_str()
            .unwrap()
            .contains("git clone"),
        "{settled}"
    );
    assert_eq!(settled["status"], "running", "{settled}");
    drop(daemon);

    // --- deprovision: the container goes, the record stays, archived.
    let archived = cp.json(&["sandbox", "deprovision", &id]);
    assert_eq!(archived["status"], "archived", "{archived}");
    assert!(
        !tests::docker::docker(&["inspect", &container])
            .status
            .success(),
        "container {container} still exists"
    );
    let shown = show(&cp, &id);
    assert_eq!(shown["status"], "archived", "{shown}");
    for sandbox in [&repo_id, &bad_id] {
        let out = cp.cli(&["sandbox", "deprovision", sandbox]);
        assert!(out.status.success(), "{out:?}");
    }
    assert!(docker.containers().is_empty(), "{:?}", docker.containers());
}

/// A clone cut off by its host's disconnection goes back to `pending` and
/// starts again when the host reconnects (reconciliation), then succeeds.
#[test]
fn repository_clone_cut_off_by_a_disconnect_starts_again_on_reconnect() {
    use nix::sys::signal::Signal;
    if !tests::docker::available() {
        return;
    }
    let image = GitImage::build(&format!("sbio-{}-resume", std::process::id()));
    let docker = DockerScope::new();
    let gateway = docker.gateway.clone();
    let dir = tempfile::tempdir().unwrap();
    let cp = ControlPlane::start(&dir.path().join("control"));
    let (_, secret) = cp.token(&[]);
    let agent = Agent::start(
        &cp,
        &dir.path().join("agent"),
        Some(&secret),
        &docker
            .agent_env()
            .iter()
            .map(|(k, v)| (*k, v.as_str()))
            .collect::<Vec<_>>(),
    );
    let host = agent.host_id();
    cp.wait_status(&host, "connected", WAIT);
    // A first sandbox makes the agent's bridge, where the servers listen.
    let plain = create_sandbox(&cp, &["--image", &image.reference, "--host-id", &host]);
    assert_eq!(plain["status"], "running", "{plain}");

    // The clone hangs on a server that never answers.
    let (hole, port) = BlackHole::start(&gateway);
    let url = format!("git://{gateway}:{port}/app.git");
    let sandbox = create_sandbox(
        &cp,
        &[
            "--image",
            &image.reference,
            "--host-id",
            &host,
            "--repo-url",
            &url,
            "--repo-branch",
            "dev",
            "--repo-path",
            "/work/app",
        ],
    );
    let id = sandbox["id"].as_str().unwrap().to_owned();
    wait_for("the clone to reach the server", WAIT, || {
        (hole.accepted.load(Ordering::Relaxed) > 0 && show(&cp, &id)["repo"]["status"] == "cloning")
            .then_some(())
    });

    // The host goes away mid-clone: the clone is pending again, saying why.
    agent.signal(Signal::SIGSTOP);
    cp.wait_status(&host, "disconnected", WAIT);
    let pending = wait_for("the clone to be pending again", WAIT, || {
        let s = show(&cp, &id);
        (s["repo"]["status"] == "pending").then_some(s)
    });
    assert!(
        pending["repo"]["error"]
            .as_str()
            .unwrap()
            .contains("the clone starts again when the host reconnects"),
        "{pending}"
    );
    assert_eq!(pending["status"], "running", "{pending}");

    // The repository is served now on the same port; the host comes back.
    drop(hole);
    let repos = bare_repository(dir.path());
    let daemon = git_daemon(&gateway, port, &repos);
    agent.signal(Signal::SIGCONT);
    cp.wait_status(&host, "connected", WAIT);
    let settled = wait_repo(&cp, &id, Duration::from_secs(60));
    assert_eq!(settled["repo"]["status"], "ready", "{settled}");
    let out = cp.cli(&["sandbox", "files", "get", &id, "/work/app/README", "-"]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "hello from the dev branch\n"
    );
    let history = serde_json::to_string(&cp.json(&["sandbox", "show", &id])).unwrap();
    assert!(history.contains("sandbox.repo.pending"), "{history}");
    drop(daemon);

    for sandbox in [plain["id"].as_str().unwrap(), id.as_str()] {
        let out = cp.cli(&["sandbox", "deprovision", sandbox]);
        assert!(out.status.success(), "{out:?}");
    }
    assert!(docker.containers().is_empty());
}
