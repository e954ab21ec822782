//! Facts the host reports about itself at enrollment and in every hello:
//! agent version and commit, OS, kernel, arch, hostname, CPUs, memory,
//! machine id, traits (configured plus auto-detected) and tags.

use std::time::Duration;

use proto::Telemetry;

/// Trait reported when the Docker daemon answers a ping.
pub const DOCKER_TRAIT: &str = "docker";

/// Collects the host's facts. `docker_reachable` is probed separately
/// ([`docker_reachable`]) so that this part stays synchronous and testable.
pub fn collect(configured_traits: &[String], tags: &[String], docker_reachable: bool) -> Telemetry {
    let arch = arch_name(std::env::consts::ARCH);
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let (memory_bytes, memory_available_bytes) = parse_meminfo(&meminfo);
    let uname = nix::sys::utsname::uname().ok();
    Telemetry {
        agent_version: proto::build_info::VERSION.to_owned(),
        agent_commit: proto::build_info::GIT_COMMIT.to_owned(),
        os: os_name(),
        kernel: uname
            .as_ref()
            .map(|u| u.release().to_string_lossy().into_owned())
            .unwrap_or_default(),
        arch: arch.clone(),
        hostname: nix::unistd::gethostname()
            .map(|h| h.to_string_lossy().into_owned())
            .unwrap_or_default(),
        cpus: std::thread::available_parallelism()
            .map(|n| u32::try_from(n.get()).unwrap_or(u32::MAX))
            .unwrap_or(1),
        memory_bytes,
        traits: merge_traits(configured_traits, &arch, docker_reachable),
        tags: tags.to_vec(),
        machine_id: machine_id(),
        memory_available_bytes,
        running_sandboxes: 0,
        cached_images: Vec::new(),
        sandbox_capacity: 0,
    }
}

/// Go/Docker arch names: `amd64`, `arm64`; other machines keep their name.
pub fn arch_name(rust_arch: &str) -> String {
    match rust_arch {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
    .to_owned()
}

/// Configured traits first, then the auto-detected ones (arch, docker),
/// without duplicates.
pub fn merge_traits(configured: &[String], arch: &str, docker: bool) -> Vec<String> {
    let mut traits: Vec<String> = configured.to_vec();
    let mut add = |t: &str| {
        if !traits.iter().any(|x| x == t) {
            traits.push(t.to_owned());
        }
    };
    if arch == "amd64" || arch == "arm64" {
        add(arch);
    }
    if docker {
        add(DOCKER_TRAIT);
    }
    traits
}

/// `(MemTotal, MemAvailable)` in bytes from `/proc/meminfo`.
pub fn parse_meminfo(text: &str) -> (u64, u64) {
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| {
                rest.trim()
                    .trim_end_matches("kB")
                    .trim()
                    .parse::<u64>()
                    .ok()
            })
            .map_or(0, |kib| kib.saturating_mul(1024))
    };
    (field("MemTotal:"), field("MemAvailable:"))
}

/// `PRETTY_NAME` from os-release, or the OS family.
fn os_name() -> String {
    for path in ["/etc/os-release", "/usr/lib/os-release"] {
        if let Ok(text) = std::fs::read_to_string(path) {
            if let Some(name) = parse_os_release(&text) {
                return name;
            }
        }
    }
    std::env::consts::OS.to_owned()
}

pub fn parse_os_release(text: &str) -> Option<String> {
    text.lines()
        .find_map(|l| l.strip_prefix("PRETTY_NAME="))
        .map(|v| v.trim().trim_matches('"').to_owned())
        .filter(|v| !v.is_empty())
}

pub fn machine_id() -> String {
    ["/etc/machine-id", "/var/lib/dbus/machine-id"]
        .iter()
        .find_map(|p| {
            std::fs::read_to_string(p)
                .ok()
                .map(|s| s.trim().to_owned())
                .filter(|s| !s.is_empty())
        })
        .unwrap_or_default()
}

/// Whether the Docker daemon (DOCKER_HOST or the local socket) answers a
/// ping within `timeout`.
pub async fn docker_reachable(timeout: Duration) -> bool {
    let Ok(docker) = bollard::Docker::connect_with_defaults() else {
        return false;
    };
    matches!(
        tokio::time::timeout(timeout, docker.ping()).await,
        Ok(Ok(_))
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arch_uses_go_names() {
        assert_eq!(arch_name("x86_64"), "amd64");
        assert_eq!(arch_name("aarch64"), "arm64");
        assert_eq!(arch_name("riscv64"), "riscv64");
    }

    #[test]
    fn traits_are_configured_plus_detected() {
        let configured = vec!["public-ingress".to_owned(), "docker".to_owned()];
        assert_eq!(
            merge_traits(&configured, "amd64", true),
            ["public-ingress", "docker", "amd64"]
        );
        assert_eq!(merge_traits(&[], "arm64", false), ["arm64"]);
        assert!(merge_traits(&[], "riscv64", false).is_empty());
    }

    #[test]
    fn meminfo_parsing() {
        let text = "MemTotal:       16318340 kB\nMemFree:  1 kB\nMemAvailable:   8000000 kB\n";
        assert_eq!(parse_meminfo(text), (16_318_340 * 1024, 8_000_000 * 1024));
        assert_eq!(parse_meminfo("garbage"), (0, 0));
    }

    #[test]
    fn os_release_parsing() {
        let text = "NAME=\"Debian GNU/Linux\"\nPRETTY_NAME=\"Debian GNU/Linux 13 (trixie)\"\n";
        assert_eq!(
            parse_os_release(text).as_deref(),
            Some("Debian GNU/Linux 13 (trixie)")
        );
        assert_eq!(parse_os_release("NAME=x"), None);
    }

    #[test]
    fn collected_facts_are_filled() {
        let t = collect(&["trusted".to_owned()], &["env=dev".to_owned()], false);
        assert_eq!(t.agent_version, proto::build_info::VERSION);
        assert!(!t.kernel.is_empty() && !t.hostname.is_empty());
        assert!(t.cpus >= 1 && t.memory_bytes > 0);
        assert_eq!(t.traits[0], "trusted");
        assert!(t.traits.contains(&arch_name(std::env::consts::ARCH)) || t.traits.len() == 1);
        assert_eq!(t.tags, ["env=dev"]);
    }
}
