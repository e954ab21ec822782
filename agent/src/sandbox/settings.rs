//! The sandbox settings of the agent (`GLOBALSTACKS_AGENT_RUNTIME_SCOPE`,
//! `_DOCKER_NETWORK`, `_DOCKER_SUBNET`, `_VOLUME_ROOTS`, `_MAX_SANDBOXES`).
//! Two agents may share one engine (tests) as long as their scopes,
//! networks and subnets differ.

use std::net::Ipv4Addr;
use std::path::PathBuf;

use ipnet::Ipv4Net;

use crate::config::{
    ConfigSource, DOCKER_NETWORK, DOCKER_SUBNET, MAX_SANDBOXES, RUNTIME_SCOPE, VOLUME_ROOTS,
};
use crate::error::AgentError;

/// The sandbox bridge's subnet unless configured.
pub const DEFAULT_DOCKER_SUBNET: &str = "10.213.0.0/24";
/// Sandboxes a host accepts at once unless configured.
pub const DEFAULT_MAX_SANDBOXES: u32 = 32;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SandboxSettings {
    /// Written as `io.globalstacks.scope` on every container; only
    /// containers of this scope are listed or touched. Default: the machine
    /// id, so a reinstalled agent on the same machine finds its containers.
    pub scope: String,
    /// The agent's bridge network that every sandbox joins.
    pub docker_network: String,
    pub docker_subnet: Ipv4Net,
    /// Host directories under which bind mounts are allowed (canonical
    /// paths). Empty: no volume is allowed.
    pub volume_roots: Vec<PathBuf>,
    pub max_sandboxes: u32,
}

impl SandboxSettings {
    pub fn from_source(source: &ConfigSource) -> Result<Self, AgentError> {
        let scope = match source.get(RUNTIME_SCOPE) {
            Some(scope) => {
                check_scope(scope)?;
                scope.to_owned()
            }
            None => default_scope(&crate::telemetry::machine_id()),
        };
        let docker_subnet = match source.get(DOCKER_SUBNET) {
            None => DEFAULT_DOCKER_SUBNET.parse().expect("valid default subnet"),
            Some(v) => parse_subnet(v)?,
        };
        let docker_network = match source.get(DOCKER_NETWORK) {
            None => default_network(&scope),
            Some(v) => {
                check_network_name(v)?;
                v.to_owned()
            }
        };
        let volume_roots = match source.get(VOLUME_ROOTS) {
            None => Vec::new(),
            Some(v) => parse_volume_roots(v)?,
        };
        let max_sandboxes = match source.get(MAX_SANDBOXES) {
            None => DEFAULT_MAX_SANDBOXES,
            Some(v) => v
                .parse::<u32>()
                .ok()
                .filter(|n| (1..=10_000).contains(n))
                .ok_or_else(|| {
                    AgentError::config(MAX_SANDBOXES, format!("`{v}` is not a number in 1..=10000"))
                })?,
        };
        Ok(Self {
            scope,
            docker_network,
            docker_subnet,
            volume_roots,
            max_sandboxes,
        })
    }

    /// The bridge's gateway: the subnet's first host address
    /// (`10.213.0.1`). Sandboxes use it as their DNS server; the agent's
    /// network module serves DNS there on port 53.
    pub fn docker_gateway(&self) -> Ipv4Addr {
        first_host(&self.docker_subnet)
    }
}

impl Default for SandboxSettings {
    fn default() -> Self {
        let scope = default_scope(&crate::telemetry::machine_id());
        Self {
            docker_network: default_network(&scope),
            scope,
            docker_subnet: DEFAULT_DOCKER_SUBNET.parse().expect("valid default subnet"),
            volume_roots: Vec::new(),
            max_sandboxes: DEFAULT_MAX_SANDBOXES,
        }
    }
}

fn default_scope(machine_id: &str) -> String {
    if machine_id.is_empty() {
        "default".to_owned()
    } else {
        machine_id.to_owned()
    }
}

/// `gstacks-<first 12 characters of the scope>`.
pub fn default_network(scope: &str) -> String {
    let prefix: String = scope
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '_')
        .take(12)
        .collect();
    format!("gstacks-{prefix}")
}

fn first_host(net: &Ipv4Net) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(net.network()).saturating_add(1))
}

fn check_scope(scope: &str) -> Result<(), AgentError> {
    let valid = scope.len() <= 128
        && scope
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if valid {
        Ok(())
    } else {
        Err(AgentError::config(
            RUNTIME_SCOPE,
            format!("`{scope}` must be at most 128 letters, digits, `-`, `_` or `.`"),
        ))
    }
}

fn check_network_name(name: &str) -> Result<(), AgentError> {
    let valid = !name.is_empty()
        && name.len() <= 64
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if valid {
        Ok(())
    } else {
        Err(AgentError::config(
            DOCKER_NETWORK,
            format!("`{name}` is not a Docker network name (letters, digits, `-`, `_`, `.`)"),
        ))
    }
}

fn parse_subnet(value: &str) -> Result<Ipv4Net, AgentError> {
    let net: Ipv4Net = value.parse().map_err(|_| {
        AgentError::config(
            DOCKER_SUBNET,
            format!("`{value}` is not an IPv4 subnet (e.g. 10.213.0.0/24)"),
        )
    })?;
    if net.prefix_len() > 29 {
        return Err(AgentError::config(
            DOCKER_SUBNET,
            format!("`{value}` is too small; give at least a /29"),
        ));
    }
    if net != net.trunc() {
        return Err(AgentError::config(
            DOCKER_SUBNET,
            format!("`{value}` has host bits set; did you mean {}?", net.trunc()),
        ));
    }
    Ok(net)
}

/// Comma-separated absolute directories; each must exist (it is made
/// canonical, so a symlinked root still matches its target).
fn parse_volume_roots(value: &str) -> Result<Vec<PathBuf>, AgentError> {
    let mut roots = Vec::new();
    for part in value.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        if !part.starts_with('/') {
            return Err(AgentError::config(
                VOLUME_ROOTS,
                format!("`{part}` is not an absolute path"),
            ));
        }
        let canonical = std::fs::canonicalize(part).map_err(|e| {
            AgentError::config(VOLUME_ROOTS, format!("`{part}` cannot be used: {e}"))
        })?;
        if !canonical.is_dir() {
            return Err(AgentError::config(
                VOLUME_ROOTS,
                format!("`{part}` is not a directory"),
            ));
        }
        roots.push(canonical);
    }
    Ok(roots)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn source(pairs: &[(&str, &str)]) -> ConfigSource {
        ConfigSource::from_parts(
            None,
            pairs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned())),
        )
        .unwrap()
    }

    #[test]
    fn defaults_follow_the_machine_id() {
        let s = SandboxSettings::from_source(&source(&[])).unwrap();
        assert_eq!(s.scope, default_scope(&crate::telemetry::machine_id()));
        assert_eq!(s.docker_network, default_network(&s.scope));
        assert_eq!(s.docker_subnet.to_string(), "10.213.0.0/24");
        assert_eq!(s.docker_gateway(), Ipv4Addr::new(10, 213, 0, 1));
        assert!(s.volume_roots.is_empty());
        assert_eq!(s.max_sandboxes, DEFAULT_MAX_SANDBOXES);
        assert_eq!(
            default_network("3d1219c7c4c5404aaa1f6d2a48adfda4"),
            "gstacks-3d1219c7c4c5"
        );
        assert_eq!(default_scope(""), "default");
    }

    #[test]
    fn configured_values() {
        let dir = tempfile::tempdir().unwrap();
        let roots = format!("{}, /tmp", dir.path().display());
        let s = SandboxSettings::from_source(&source(&[
            (RUNTIME_SCOPE, "test-a"),
            (DOCKER_SUBNET, "10.214.3.0/24"),
            (VOLUME_ROOTS, &roots),
            (MAX_SANDBOXES, "3"),
        ]))
        .unwrap();
        assert_eq!(s.scope, "test-a");
        assert_eq!(s.docker_network, "gstacks-test-a");
        assert_eq!(s.docker_gateway(), Ipv4Addr::new(10, 214, 3, 1));
        assert_eq!(s.volume_roots.len(), 2);
        assert_eq!(s.max_sandboxes, 3);
    }

    #[test]
    fn bad_values_name_their_key() {
        for (key, value, needle) in [
            (RUNTIME_SCOPE, "a b", "must be at most"),
            (DOCKER_SUBNET, "10.0.0.0/30", "too small"),
            (DOCKER_SUBNET, "10.0.0.1/24", "host bits"),
            (DOCKER_SUBNET, "fd00::/64", "not an IPv4 subnet"),
            (DOCKER_NETWORK, "-x", "not a Docker network name"),
            (VOLUME_ROOTS, "relative/dir", "not an absolute path"),
            (VOLUME_ROOTS, "/nonexistent-gstacks-root", "cannot be used"),
            (MAX_SANDBOXES, "0", "not a number"),
        ] {
            let err = SandboxSettings::from_source(&source(&[(key, value)]))
                .unwrap_err()
                .to_string();
            assert!(
                err.contains(key) && err.contains(needle),
                "{key}={value}: {err}"
            );
        }
    }
}
