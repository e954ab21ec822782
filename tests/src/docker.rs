//! The machine's real Docker engine for end-to-end tests, through the
//! `docker` CLI: a test image built locally (nothing is ever pulled), a
//! private runtime scope, network name and subnet per test agent, and
//! cleanup of everything labelled with that scope, even when the test fails.
//!
//! The test image ([`test_image`]) is a `docker import` of a root file
//! system made of Debian's static busybox (`/bin/busybox` from
//! busybox-static: `sh`, `httpd`, `nc`, ...) with `CMD ["/bin/sh"]`, tagged
//! `gstacks-test/busybox:p<pid>`: each test process has its own, built when
//! its first test asks for it and removed when its last holder drops it, so
//! the parallel tests of one binary share it and nothing stays behind.
//! Images of test processes that died without cleaning up are removed by
//! the next build. Tests remove every container and network they make.

use std::os::unix::fs::symlink;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;

/// The repository of the test images; the tag names the process.
pub const TEST_IMAGE_REPOSITORY: &str = "gstacks-test/busybox";
/// Label of every container and network an agent manages.
pub const LABEL_SCOPE: &str = "io.globalstacks.scope";

/// Whether a Docker engine answers. Sandbox tests skip with a message
/// when it does not, unless `GSTACKS_REQUIRE_DOCKER_TESTS=1`.
pub fn available() -> bool {
    let up = Command::new("docker")
        .args(["version", "--format", "{{.Server.Version}}"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !up {
        assert!(
            std::env::var("GSTACKS_REQUIRE_DOCKER_TESTS").as_deref() != Ok("1"),
            "GSTACKS_REQUIRE_DOCKER_TESTS=1 but no Docker engine answers"
        );
        eprintln!("skipping: no Docker engine answers `docker version`");
    }
    up
}

/// Runs `docker <args>`; returns its output whatever the exit status.
pub fn docker(args: &[&str]) -> Output {
    Command::new("docker")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run the docker CLI")
}

/// Runs `docker <args>`, which must succeed; returns its trimmed stdout.
pub fn docker_ok(args: &[&str]) -> String {
    let out = docker(args);
    assert!(
        out.status.success(),
        "docker {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// Holders of this process's test image (built while there are any).
static TEST_IMAGE_HOLDERS: Mutex<usize> = Mutex::new(0);

/// This process's test image: built on the first call, removed when the
/// last [`TestImage`] is dropped. Drop it after the containers made from
/// it are gone (declare it after the [`DockerScope`]).
pub fn test_image() -> TestImage {
    let reference = format!("{TEST_IMAGE_REPOSITORY}:p{}", std::process::id());
    let mut holders = TEST_IMAGE_HOLDERS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if *holders == 0 {
        remove_stale_test_images();
        if !docker(&["image", "inspect", &reference]).status.success() {
            build_image(&reference);
        }
    }
    *holders += 1;
    TestImage { reference }
}

/// A hold on this process's test image (see [`test_image`]).
#[derive(Debug)]
pub struct TestImage {
    reference: String,
}

impl TestImage {
    /// `gstacks-test/busybox:p<pid>`.
    pub fn reference(&self) -> &str {
        &self.reference
    }
}

impl Drop for TestImage {
    fn drop(&mut self) {
        let mut holders = TEST_IMAGE_HOLDERS
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *holders -= 1;
        if *holders == 0 {
            let out = docker(&["rmi", &self.reference]);
            if !out.status.success() {
                eprintln!(
                    "test image {} not removed: {}",
                    self.reference,
                    String::from_utf8_lossy(&out.stderr).trim()
                );
            }
        }
    }
}

/// Removes the test images of processes that no longer run.
fn remove_stale_test_images() {
    let out = docker(&["images", TEST_IMAGE_REPOSITORY, "--format", "{{.Tag}}"]);
    for tag in String::from_utf8_lossy(&out.stdout).lines() {
        let Some(pid) = tag
            .trim()
            .strip_prefix('p')
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = docker(&["rmi", &format!("{TEST_IMAGE_REPOSITORY}:{}", tag.trim())]);
        }
    }
}

fn build_image(tag: &str) {
    let busybox = Path::new("/bin/busybox");
    assert!(
        busybox.is_file(),
        "/bin/busybox is missing: install busybox-static to build the test image"
    );
    let root = tempfile::tempdir().expect("temp dir");
    for dir in ["bin", "etc", "tmp", "root", "proc", "sys", "dev", "data"] {
        std::fs::create_dir_all(root.path().join(dir)).unwrap();
    }
    std::fs::copy(busybox, root.path().join("bin/busybox")).unwrap();
    let applets = Command::new(busybox)
        .arg("--list")
        .output()
        .expect("busybox --list");
    for applet in String::from_utf8_lossy(&applets.stdout).lines() {
        let applet = applet.trim();
        if applet.is_empty() || applet == "busybox" || applet.contains('/') {
            continue;
        }
        let _ = symlink("busybox", root.path().join("bin").join(applet));
    }
    std::fs::write(
        root.path().join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n",
    )
    .unwrap();
    std::fs::write(
        root.path().join("etc/group"),
        "root:x:0:\nnogroup:x:65534:\n",
    )
    .unwrap();
    let mut tar = Command::new("tar")
        .arg("-C")
        .arg(root.path())
        .args(["-c", "."])
        .stdout(Stdio::piped())
        .spawn()
        .expect("run tar");
    let import = Command::new("docker")
        .args(["import", "--change", r#"CMD ["/bin/sh"]"#, "-", tag])
        .stdin(tar.stdout.take().unwrap())
        .output()
        .expect("run docker import");
    assert!(
        tar.wait().unwrap().success(),
        "tar of the test rootfs failed"
    );
    assert!(
        import.status.success(),
        "docker import failed: {}",
        String::from_utf8_lossy(&import.stderr)
    );
}

/// One test agent's private corner of the engine: a runtime scope, a
/// network name and a subnet no other network uses. Dropping it removes
/// every container and network labelled with the scope.
pub struct DockerScope {
    pub scope: String,
    pub network: String,
    pub subnet: String,
    /// The subnet's first host address (the agent's gateway).
    pub gateway: String,
}

impl DockerScope {
    pub fn new() -> DockerScope {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        static SUBNETS: Mutex<()> = Mutex::new(());
        let _one_at_a_time = SUBNETS
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let scope = format!("gstacks-test-{}-{n}", std::process::id());
        let used = used_subnets();
        // 10.230.0.0/16 - 10.249.255.0/24, starting from a point that
        // differs per process, skipping what the engine already uses.
        let start = (std::process::id().wrapping_mul(97).wrapping_add(n * 13)) % 5120;
        let (subnet, gateway) = (0..5120)
            .map(|i| {
                let k = (start + i) % 5120;
                let (b, c) = (230 + k / 256, k % 256);
                (format!("10.{b}.{c}.0/24"), format!("10.{b}.{c}.1"))
            })
            .find(|(s, _)| !used.iter().any(|u| overlaps(u, s)))
            .expect("a free /24 in 10.230.0.0-10.249.255.0");
        DockerScope {
            network: format!("gstacks-t{}-{n}", std::process::id()),
            scope,
            subnet,
            gateway,
        }
    }

    /// The agent environment that puts it in this scope.
    pub fn agent_env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("GLOBALSTACKS_AGENT_RUNTIME_SCOPE", self.scope.clone()),
            ("GLOBALSTACKS_AGENT_DOCKER_NETWORK", self.network.clone()),
            ("GLOBALSTACKS_AGENT_DOCKER_SUBNET", self.subnet.clone()),
        ]
    }

    /// Ids of the scope's containers (running or not).
    pub fn containers(&self) -> Vec<String> {
        let filter = format!("label={LABEL_SCOPE}={}", self.scope);
        docker_ok(&["ps", "-aq", "--no-trunc", "--filter", &filter])
            .lines()
            .map(str::to_owned)
            .collect()
    }

    /// Removes the scope's containers and networks.
    pub fn clean(&self) {
        let filter = format!("label={LABEL_SCOPE}={}", self.scope);
        let containers = self.containers();
        if !containers.is_empty() {
            let mut args = vec!["rm", "-f", "-v"];
            args.extend(containers.iter().map(String::as_str));
            let _ = docker(&args);
        }
        let networks = docker(&["network", "ls", "-q", "--filter", &filter]);
        for id in String::from_utf8_lossy(&networks.stdout).lines() {
            let _ = docker(&["network", "rm", id.trim()]);
        }
        // A network made before it was labelled, by name.
        if docker(&["network", "inspect", &self.network])
            .status
            .success()
        {
            let _ = docker(&["network", "rm", &self.network]);
        }
    }
}

impl Default for DockerScope {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for DockerScope {
    fn drop(&mut self) {
        self.clean();
    }
}

fn used_subnets() -> Vec<String> {
    let ids = docker(&["network", "ls", "-q"]);
    let ids: Vec<String> = String::from_utf8_lossy(&ids.stdout)
        .lines()
        .map(|l| l.trim().to_owned())
        .filter(|l| !l.is_empty())
        .collect();
    if ids.is_empty() {
        return Vec::new();
    }
    let mut args = vec![
        "network",
        "inspect",
        "--format",
        "{{range .IPAM.Config}}{{.Subnet}} {{end}}",
    ];
    args.extend(ids.iter().map(String::as_str));
    let out = docker(&args);
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .map(str::to_owned)
        .collect()
}

/// Whether two IPv4 CIDRs overlap (anything unparsable counts as not).
fn overlaps(a: &str, b: &str) -> bool {
    let parse = |s: &str| -> Option<(u32, u32)> {
        let (ip, len) = s.split_once('/')?;
        let ip: std::net::Ipv4Addr = ip.parse().ok()?;
        let len: u32 = len.parse().ok()?;
        let mask = if len == 0 {
            0
        } else {
            u32::MAX << (32 - len.min(32))
        };
        Some((u32::from(ip) & mask, mask))
    };
    match (parse(a), parse(b)) {
        (Some((na, ma)), Some((nb, mb))) => {
            let mask = ma & mb;
            na & mask == nb & mask
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::overlaps;

    #[test]
    fn cidr_overlap() {
        assert!(overlaps("10.230.0.0/16", "10.230.5.0/24"));
        assert!(overlaps("10.230.5.0/24", "10.230.5.0/24"));
        assert!(!overlaps("10.230.5.0/24", "10.230.6.0/24"));
        assert!(overlaps("0.0.0.0/0", "10.0.0.0/8"));
        assert!(!overlaps("fd00::/64", "10.0.0.0/8"));
    }
}
