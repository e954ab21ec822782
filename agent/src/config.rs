//! Agent configuration: the environment keys of the seeds, optionally from a
//! config file with the same keys.
//!
//! The file (`--config FILE`) uses `KEY=VALUE` lines, the format of a systemd
//! `EnvironmentFile`: blank lines and `#` comments are skipped, a value may be
//! wrapped in single or double quotes. An unknown key is an error naming it
//! (a typo must not silently fall back to a default).
//!
//! Precedence: **the environment wins over the file**, key by key, so a
//! service unit can ship a file and an operator can still override one key
//! for a single run. An empty value counts as unset.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::error::AgentError;

pub const CONTROL_URL: &str = "GLOBALSTACKS_CONTROL_URL";
pub const PROVISIONING_TOKEN: &str = "GLOBALSTACKS_PROVISIONING_TOKEN";
pub const STATE_DIR: &str = "GLOBALSTACKS_STATE_DIR";
pub const TRAITS: &str = "AGENT_TRAITS";
pub const TAGS: &str = "AGENT_TAGS";
pub const DISABLE_HOST_TERMINAL: &str = "GLOBALSTACKS_AGENT_DISABLE_HOST_TERMINAL";
pub const HEARTBEAT_MS: &str = "GLOBALSTACKS_AGENT_HEARTBEAT_MS";
/// PEM the agent trusts for an `https` control URL (the control plane's CA or
/// its `--dev` self-signed certificate). Unset: the system CA bundle.
pub const CONTROL_CA_FILE: &str = "GLOBALSTACKS_CONTROL_CA_FILE";
/// SHA-256 of the control plane's certificate, pinned instead of a CA.
pub const CONTROL_FINGERPRINT: &str = "GLOBALSTACKS_CONTROL_FINGERPRINT";
pub const MESH_DNS_ADDR: &str = "GLOBALSTACKS_AGENT_MESH_DNS_ADDR";
pub const MESH_PROXY_BIND: &str = "GLOBALSTACKS_AGENT_MESH_PROXY_BIND";
/// UDP address of the agent's mesh node (WireGuard).
pub const MESH_LISTEN: &str = "GLOBALSTACKS_AGENT_MESH_LISTEN";
/// `host:port` other nodes reach the mesh node on (sent in `Hello.mesh`).
pub const MESH_ENDPOINT: &str = "GLOBALSTACKS_AGENT_MESH_ENDPOINT";
/// The address containers reach the agent on (DNS on port 53 and the
/// container-side alias listeners).
pub const MESH_CONTAINER_ADDR: &str = "GLOBALSTACKS_AGENT_MESH_CONTAINER_ADDR";
/// Where container-side alias listeners bind (a range or one address).
pub const MESH_CONTAINER_PROXY_BIND: &str = "GLOBALSTACKS_AGENT_MESH_CONTAINER_PROXY_BIND";
/// Connections one alias listener serves at once (default 1024); more wait
/// in the kernel backlog.
pub const MESH_MAX_LISTENER_CONNECTIONS: &str = "GLOBALSTACKS_AGENT_MESH_MAX_LISTENER_CONNECTIONS";
/// Mesh connections the target side (overlay port 4180) serves at once
/// (default 4096); more wait in the mesh listener's backlog.
pub const MESH_MAX_MESH_CONNECTIONS: &str = "GLOBALSTACKS_AGENT_MESH_MAX_MESH_CONNECTIONS";
/// Written as `io.globalstacks.scope` on every sandbox container (default:
/// the machine id).
pub const RUNTIME_SCOPE: &str = "GLOBALSTACKS_AGENT_RUNTIME_SCOPE";
/// The agent's Docker bridge for sandboxes (default `gstacks-<scope prefix>`).
pub const DOCKER_NETWORK: &str = "GLOBALSTACKS_AGENT_DOCKER_NETWORK";
/// Its subnet (default `10.213.0.0/24`); the first host address is the
/// gateway, which sandboxes use as their DNS server.
pub const DOCKER_SUBNET: &str = "GLOBALSTACKS_AGENT_DOCKER_SUBNET";
/// Comma-separated host directories bind mounts may come from (default:
/// none, every volume is refused).
pub const VOLUME_ROOTS: &str = "GLOBALSTACKS_AGENT_VOLUME_ROOTS";
/// Sandboxes this host accepts at once (default 32), reported to placement.
pub const MAX_SANDBOXES: &str = "GLOBALSTACKS_AGENT_MAX_SANDBOXES";
/// Threads of the agent's async runtime (default 1, at most 64). The mesh
/// data path is one driver task per node, so more threads mostly add
/// cross-thread wakeups to every proxied round trip: measured with
/// `gstacks-bench proxy` on 2 cores, 1 thread gave p50 258 us, p99 804 us
/// and 1914 Mbit/s down where 2 gave 291 us, 2291 us and 1168 Mbit/s.
/// Blocking work runs on tokio's separate blocking pool either way.
pub const WORKER_THREADS: &str = "GLOBALSTACKS_AGENT_WORKER_THREADS";
pub const DEFAULT_WORKER_THREADS: usize = 1;

/// Every key the agent reads; a config file may hold only these.
pub const KNOWN_KEYS: &[&str] = &[
    CONTROL_URL,
    PROVISIONING_TOKEN,
    STATE_DIR,
    TRAITS,
    TAGS,
    DISABLE_HOST_TERMINAL,
    HEARTBEAT_MS,
    CONTROL_CA_FILE,
    CONTROL_FINGERPRINT,
    MESH_DNS_ADDR,
    MESH_PROXY_BIND,
    MESH_LISTEN,
    MESH_ENDPOINT,
    MESH_CONTAINER_ADDR,
    MESH_CONTAINER_PROXY_BIND,
    MESH_MAX_LISTENER_CONNECTIONS,
    MESH_MAX_MESH_CONNECTIONS,
    RUNTIME_SCOPE,
    DOCKER_NETWORK,
    DOCKER_SUBNET,
    VOLUME_ROOTS,
    MAX_SANDBOXES,
    WORKER_THREADS,
];

pub const DEFAULT_STATE_DIR: &str = "/var/lib/gstacks-agent";
pub const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(10);

/// A secret string (provisioning token, stream credential). It has no
/// `Display`, and its `Debug` never shows the value.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The secret itself, for the one place that sends it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// How the agent trusts the control plane's certificate on `https` URLs.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TlsTrust {
    /// PEM file with the CA certificate(s) (or the server's self-signed one).
    pub ca_file: Option<PathBuf>,
    /// SHA-256 of the server certificate (DER), pinned instead of a CA.
    pub fingerprint: Option<[u8; 32]>,
}

/// The merged key/value view of the environment and the config file.
#[derive(Clone, Default)]
pub struct ConfigSource {
    values: BTreeMap<String, String>,
}

impl fmt::Debug for ConfigSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Values may be secrets: only the keys are shown.
        f.debug_struct("ConfigSource")
            .field("keys", &self.values.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl ConfigSource {
    /// Reads the optional config file, then lays the process environment over it.
    pub fn load(file: Option<&Path>) -> Result<Self, AgentError> {
        let file_text = match file {
            Some(path) => Some((
                path,
                std::fs::read_to_string(path)
                    .map_err(|e| AgentError::io("reading config file", path, e))?,
            )),
            None => None,
        };
        let source = Self::from_parts(
            file_text.as_ref().map(|(p, t)| (*p, t.as_str())),
            std::env::vars(),
        )?;
        if let Some(path) = file {
            warn_if_secret_is_exposed(path, &file_text.map(|(_, t)| t).unwrap_or_default());
        }
        Ok(source)
    }

    /// The merge itself, without touching the process: the file's text (if
    /// any) and environment pairs. Only [`KNOWN_KEYS`] are taken from the
    /// environment; empty values count as unset.
    pub fn from_parts(
        file: Option<(&Path, &str)>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, AgentError> {
        let mut values = BTreeMap::new();
        if let Some((path, text)) = file {
            values = parse_config_file(path, text)?;
        }
        for (key, value) in env {
            if KNOWN_KEYS.contains(&key.as_str()) && !value.trim().is_empty() {
                values.insert(key, value);
            }
        }
        values.retain(|_, v| !v.trim().is_empty());
        Ok(Self { values })
    }

    /// The value of a key, trimmed; `None` when unset or empty.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.values.get(key).map(|v| v.trim())
    }
}

/// A config file holding the provisioning token should be 0600 like the
/// credential file; say so (without the token) when others can read it.
fn warn_if_secret_is_exposed(path: &Path, text: &str) {
    use std::os::unix::fs::PermissionsExt;
    let holds_token =
        parse_config_file(path, text).is_ok_and(|v| v.contains_key(PROVISIONING_TOKEN));
    let mode = std::fs::metadata(path).map_or(0, |m| m.permissions().mode() & 0o777);
    if holds_token && mode & 0o077 != 0 {
        tracing::warn!(
            path = %path.display(),
            mode = format!("{mode:o}"),
            "config file holds {PROVISIONING_TOKEN} and is readable by others; chmod 600 it"
        );
    }
}

/// Parses `KEY=VALUE` lines. Errors name the file, the line and the key.
pub fn parse_config_file(path: &Path, text: &str) -> Result<BTreeMap<String, String>, AgentError> {
    let mut values = BTreeMap::new();
    for (index, raw) in text.lines().enumerate() {
        let line_no = index + 1;
        let err = |message: String| AgentError::ConfigFile {
            path: path.to_owned(),
            line: line_no,
            message,
        };
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let Some((key, value)) = line.split_once('=') else {
            return Err(err("expected KEY=VALUE".to_owned()));
        };
        let key = key.trim();
        if !KNOWN_KEYS.contains(&key) {
            return Err(err(format!(
                "unknown key `{key}` (known keys: {})",
                KNOWN_KEYS.join(", ")
            )));
        }
        let value = unquote(value.trim()).map_err(|m| err(format!("`{key}`: {m}")))?;
        if values.insert(key.to_owned(), value).is_some() {
            return Err(err(format!("`{key}` is set twice")));
        }
    }
    Ok(values)
}

fn unquote(value: &str) -> Result<String, String> {
    for quote in ['"', '\''] {
        if let Some(rest) = value.strip_prefix(quote) {
            return match rest.strip_suffix(quote) {
                Some(inner) => Ok(inner.to_owned()),
                None => Err(format!("unterminated {quote} quote")),
            };
        }
    }
    Ok(value.to_owned())
}

/// The configuration of `gstacks-agent run`.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// The control plane's agent endpoint (`http://` or `https://`).
    pub control_url: http::Uri,
    /// Only needed on the first start, to enroll.
    pub provisioning_token: Option<Secret>,
    pub state_dir: PathBuf,
    /// Configured traits (AGENT_TRAITS); auto-detected ones are added at runtime.
    pub traits: Vec<String>,
    pub tags: Vec<String>,
    pub disable_host_terminal: bool,
    pub heartbeat_interval: Duration,
    /// Threads of the async runtime (`GLOBALSTACKS_AGENT_WORKER_THREADS`).
    pub worker_threads: usize,
    /// How `https` is verified.
    pub tls: TlsTrust,
    /// Mesh node, agent DNS and alias listener addresses.
    pub network: crate::network::NetworkSettings,
    /// Runtime scope, the sandbox Docker network, volume roots, capacity.
    pub sandbox: crate::sandbox::SandboxSettings,
}

impl AgentConfig {
    /// Validates every key `run` needs; the first bad one is named.
    pub fn from_source(source: &ConfigSource) -> Result<Self, AgentError> {
        let control_url = parse_control_url(source.get(CONTROL_URL).ok_or_else(|| {
            AgentError::config(
                CONTROL_URL,
                "is required (e.g. https://control.example:7443)",
            )
        })?)?;
        let tls = TlsTrust {
            ca_file: source.get(CONTROL_CA_FILE).map(PathBuf::from),
            fingerprint: source
                .get(CONTROL_FINGERPRINT)
                .map(parse_fingerprint)
                .transpose()?,
        };
        if tls.ca_file.is_some() && tls.fingerprint.is_some() {
            return Err(AgentError::config(
                CONTROL_FINGERPRINT,
                format!("set either {CONTROL_CA_FILE} or {CONTROL_FINGERPRINT}, not both"),
            ));
        }
        if control_url.scheme_str() == Some("http")
            && (tls.ca_file.is_some() || tls.fingerprint.is_some())
        {
            return Err(AgentError::config(
                CONTROL_URL,
                "is http:// but TLS trust is configured; use https://",
            ));
        }
        let heartbeat_interval = match source.get(HEARTBEAT_MS) {
            None => DEFAULT_HEARTBEAT,
            Some(v) => {
                let ms: u64 = v.parse().map_err(|_| {
                    AgentError::config(
                        HEARTBEAT_MS,
                        format!("`{v}` is not a number of milliseconds"),
                    )
                })?;
                if !(50..=300_000).contains(&ms) {
                    return Err(AgentError::config(
                        HEARTBEAT_MS,
                        format!("{ms} is out of range (50..=300000 ms)"),
                    ));
                }
                Duration::from_millis(ms)
            }
        };
        let worker_threads = match source.get(WORKER_THREADS) {
            None => DEFAULT_WORKER_THREADS,
            Some(v) => match v.trim().parse::<usize>() {
                Ok(n) if (1..=64).contains(&n) => n,
                _ => {
                    return Err(AgentError::config(
                        WORKER_THREADS,
                        format!("`{v}` is not a number of threads from 1 to 64"),
                    ))
                }
            },
        };
        let sandbox = crate::sandbox::SandboxSettings::from_source(source)?;
        let mut network = crate::network::NetworkSettings::from_source(source)?;
        // Containers reach the agent on their bridge's gateway unless
        // GLOBALSTACKS_AGENT_MESH_CONTAINER_ADDR says otherwise.
        if network.container_addr.is_none() {
            network.container_addr = Some(std::net::IpAddr::V4(sandbox.docker_gateway()));
        }
        Ok(Self {
            control_url,
            provisioning_token: source.get(PROVISIONING_TOKEN).map(Secret::new),
            state_dir: state_dir(source),
            traits: parse_labels(TRAITS, source.get(TRAITS))?,
            tags: parse_labels(TAGS, source.get(TAGS))?,
            disable_host_terminal: match source.get(DISABLE_HOST_TERMINAL) {
                None => false,
                Some(v) => parse_bool(DISABLE_HOST_TERMINAL, v)?,
            },
            heartbeat_interval,
            worker_threads,
            tls,
            network,
            sandbox,
        })
    }

    /// The gateway of the agent's sandbox Docker network (its subnet's
    /// first host address): every sandbox's DNS server.
    pub fn docker_gateway(&self) -> std::net::Ipv4Addr {
        self.sandbox.docker_gateway()
    }

    /// The name of the agent's sandbox Docker network.
    pub fn docker_network(&self) -> &str {
        &self.sandbox.docker_network
    }
}

/// The state dir alone (what `service lock` needs).
pub fn state_dir(source: &ConfigSource) -> PathBuf {
    source
        .get(STATE_DIR)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR))
}

fn parse_control_url(value: &str) -> Result<http::Uri, AgentError> {
    let uri: http::Uri = value
        .parse()
        .map_err(|e| AgentError::config(CONTROL_URL, format!("`{value}` is not a URL: {e}")))?;
    match uri.scheme_str() {
        Some("http") | Some("https") => {}
        Some(other) => {
            return Err(AgentError::config(
                CONTROL_URL,
                format!("scheme `{other}` is not supported (use https:// or http://)"),
            ))
        }
        None => {
            return Err(AgentError::config(
                CONTROL_URL,
                format!("`{value}` has no scheme (use https:// or http://)"),
            ))
        }
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err(AgentError::config(
            CONTROL_URL,
            format!("`{value}` has no host"),
        ));
    }
    Ok(uri)
}

/// `sha256:` prefix optional, hex with or without `:` separators.
pub fn parse_fingerprint(value: &str) -> Result<[u8; 32], AgentError> {
    let hex_text: String = value
        .trim()
        .trim_start_matches("sha256:")
        .trim_start_matches("SHA256:")
        .chars()
        .filter(|c| *c != ':')
        .collect();
    let bytes = hex::decode(&hex_text).map_err(|e| {
        AgentError::config(
            CONTROL_FINGERPRINT,
            format!("`{value}` is not a hex SHA-256 fingerprint: {e}"),
        )
    })?;
    bytes.try_into().map_err(|b: Vec<u8>| {
        AgentError::config(
            CONTROL_FINGERPRINT,
            format!(
                "expected 32 bytes (64 hex digits) of SHA-256, got {}",
                b.len()
            ),
        )
    })
}

fn parse_bool(key: &str, value: &str) -> Result<bool, AgentError> {
    match value.to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" => Ok(true),
        "0" | "false" | "no" | "off" => Ok(false),
        _ => Err(AgentError::config(
            key,
            format!("`{value}` is not a boolean (use 1 or 0)"),
        )),
    }
}

/// Comma-separated traits or tags: trimmed, deduplicated, order kept.
/// Each is 1..=63 characters of `[A-Za-z0-9._:/=-]`.
pub fn parse_labels(key: &str, value: Option<&str>) -> Result<Vec<String>, AgentError> {
    let mut out: Vec<String> = Vec::new();
    for item in value.unwrap_or("").split(',') {
        let item = item.trim();
        if item.is_empty() {
            continue;
        }
        if item.len() > 63 {
            return Err(AgentError::config(
                key,
                format!("`{item}` is longer than 63 characters"),
            ));
        }
        if let Some(bad) = item
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || "._:/=-".contains(*c)))
        {
            return Err(AgentError::config(
                key,
                format!("`{item}` contains {bad:?}; allowed are letters, digits and . _ : / = -"),
            ));
        }
        if !out.iter().any(|o| o == item) {
            out.push(item.to_owned());
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    fn config(file: Option<&str>, pairs: &[(&str, &str)]) -> Result<AgentConfig, AgentError> {
        let path = Path::new("/etc/gstacks/agent.env");
        let source = ConfigSource::from_parts(file.map(|t| (path, t)), env(pairs))?;
        AgentConfig::from_source(&source)
    }

    #[test]
    fn minimal_env_gives_defaults() {
        let c = config(None, &[(CONTROL_URL, "http://127.0.0.1:7000")]).unwrap();
        assert_eq!(c.control_url.to_string(), "http://127.0.0.1:7000/");
        assert_eq!(c.state_dir, PathBuf::from(DEFAULT_STATE_DIR));
        assert_eq!(c.worker_threads, DEFAULT_WORKER_THREADS);
        assert_eq!(c.heartbeat_interval, DEFAULT_HEARTBEAT);
        assert!(c.traits.is_empty() && c.tags.is_empty());
        assert!(!c.disable_host_terminal);
        assert!(c.provisioning_token.is_none());
    }

    #[test]
    fn containers_reach_the_agent_on_the_sandbox_gateway_unless_told() {
        let c = config(None, &[(CONTROL_URL, "http://c:1")]).unwrap();
        assert_eq!(
            c.network.container_addr,
            Some(std::net::IpAddr::V4(c.docker_gateway()))
        );
        let c = config(
            None,
            &[
                (CONTROL_URL, "http://c:1"),
                (MESH_CONTAINER_ADDR, "172.31.0.1"),
            ],
        )
        .unwrap();
        assert_eq!(
            c.network.container_addr,
            Some("172.31.0.1".parse().unwrap())
        );
    }

    #[test]
    fn missing_control_url_names_the_key() {
        let err = config(None, &[]).unwrap_err().to_string();
        assert!(err.contains(CONTROL_URL), "{err}");
        let err = config(None, &[(CONTROL_URL, "  ")])
            .unwrap_err()
            .to_string();
        assert!(err.contains(CONTROL_URL), "{err}");
    }

    #[test]
    fn bad_values_name_their_key() {
        for (key, value) in [
            (CONTROL_URL, "ftp://x"),
            (CONTROL_URL, "not a url"),
            (DISABLE_HOST_TERMINAL, "maybe"),
            (HEARTBEAT_MS, "soon"),
            (HEARTBEAT_MS, "1"),
            (WORKER_THREADS, "0"),
            (WORKER_THREADS, "many"),
            (TRAITS, "public ingress"),
            (TAGS, "ok,bad!"),
            (CONTROL_FINGERPRINT, "abcd"),
        ] {
            let mut pairs = vec![(CONTROL_URL, "https://c:1")];
            pairs.retain(|(k, _)| *k != key);
            pairs.push((key, value));
            let err = config(None, &pairs).unwrap_err().to_string();
            assert!(err.contains(key), "{key}={value}: {err}");
        }
    }

    #[test]
    fn traits_and_tags_are_split_trimmed_and_deduplicated() {
        let c = config(
            None,
            &[
                (CONTROL_URL, "http://c:1"),
                (TRAITS, "public-ingress, private-network,,trusted,trusted"),
                (TAGS, "env=prod,team:core"),
                (DISABLE_HOST_TERMINAL, "1"),
            ],
        )
        .unwrap();
        assert_eq!(c.traits, ["public-ingress", "private-network", "trusted"]);
        assert_eq!(c.tags, ["env=prod", "team:core"]);
        assert!(c.disable_host_terminal);
    }

    #[test]
    fn file_is_read_and_env_wins() {
        let file = "# agent config\n\
                    GLOBALSTACKS_CONTROL_URL=\"https://file:7443\"\n\
                    AGENT_TAGS='a,b'\n\
                    \n\
                    GLOBALSTACKS_STATE_DIR=/srv/agent\n";
        let c = config(Some(file), &[(TAGS, "from-env")]).unwrap();
        assert_eq!(c.control_url.host(), Some("file"));
        assert_eq!(c.tags, ["from-env"]);
        assert_eq!(c.state_dir, PathBuf::from("/srv/agent"));
    }

    #[test]
    fn file_errors_name_line_and_key() {
        let err = config(
            Some("GLOBALSTACKS_CONTROL_URL=http://c:1\nAGENT_TRIATS=x\n"),
            &[],
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("line 2") && err.contains("AGENT_TRIATS"),
            "{err}"
        );
        let err = config(Some("just words"), &[]).unwrap_err().to_string();
        assert!(err.contains("line 1") && err.contains("KEY=VALUE"), "{err}");
        let err = config(Some("AGENT_TAGS=\"open\n"), &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("AGENT_TAGS") && err.contains("quote"), "{err}");
        let err = config(Some("AGENT_TAGS=a\nAGENT_TAGS=b\n"), &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("twice"), "{err}");
    }

    #[test]
    fn fingerprint_accepts_common_spellings() {
        let hex64 = "ab".repeat(32);
        let colons = vec!["AB"; 32].join(":");
        for v in [hex64.clone(), format!("sha256:{hex64}"), colons] {
            assert_eq!(parse_fingerprint(&v).unwrap(), [0xab; 32], "{v}");
        }
        let c = config(
            None,
            &[(CONTROL_URL, "http://c:1"), (CONTROL_FINGERPRINT, &hex64)],
        )
        .unwrap_err()
        .to_string();
        assert!(c.contains("https"), "{c}");
    }

    #[test]
    fn ca_file_and_fingerprint_exclude_each_other() {
        let hex64 = "cd".repeat(32);
        let err = config(
            None,
            &[
                (CONTROL_URL, "https://c:1"),
                (CONTROL_CA_FILE, "/ca.pem"),
                (CONTROL_FINGERPRINT, &hex64),
            ],
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("not both"), "{err}");
        let c = config(
            None,
            &[(CONTROL_URL, "https://c:1"), (CONTROL_CA_FILE, "/ca.pem")],
        )
        .unwrap();
        assert_eq!(c.tls.ca_file, Some(PathBuf::from("/ca.pem")));
    }

    #[test]
    fn secrets_never_show_in_debug() {
        let c = config(
            Some("GLOBALSTACKS_PROVISIONING_TOKEN=gst_supersecret\n"),
            &[(CONTROL_URL, "http://c:1")],
        )
        .unwrap();
        let debug = format!("{c:?}");
        assert!(!debug.contains("supersecret"), "{debug}");
        let source =
            ConfigSource::from_parts(None, env(&[(PROVISIONING_TOKEN, "gst_supersecret")]))
                .unwrap();
        assert!(!format!("{source:?}").contains("supersecret"));
    }

    #[test]
    fn unrelated_environment_is_ignored() {
        let source =
            ConfigSource::from_parts(None, env(&[("PATH", "/bin"), ("AGENT_FOO", "x")])).unwrap();
        assert_eq!(source.get("PATH"), None);
    }
}
