//! The wg-quick configuration format (`wg0.conf`): parse it, write it back,
//! and strip it to what `wg setconf` accepts.
//!
//! ```text
//! [Interface]
//! PrivateKey = yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk=
//! Address = 100.64.0.1/10, fd7a:115c:a1e0::1/48
//! ListenPort = 51820
//!
//! [Peer]
//! PublicKey = xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg=
//! PresharedKey = ...
//! AllowedIPs = 100.64.0.2/32, fd7a:115c:a1e0::2/128
//! Endpoint = [2001:db8::1]:51820
//! PersistentKeepalive = 25
//! ```
//!
//! The grammar follows `wg(8)` and `wg-quick(8)`: section names and keys are
//! case-insensitive, `#` starts a comment anywhere on a line, `Address`,
//! `AllowedIPs`, `DNS` and the `Pre/PostUp/Down` hooks may repeat and
//! accumulate, every other key may appear once per section.
//!
//! **Keys for a host interface.** `DNS`, `MTU`, `Table`, `PreUp`, `PostUp`,
//! `PreDown`, `PostDown`, `SaveConfig` (wg-quick) and `FwMark` (wg) configure a
//! kernel interface, its routes, its resolver or its socket mark. A userspace
//! node has none of these, so they are accepted (a stock wg-quick file loads
//! as is), kept in [`Interface::host_settings`] so that writing the file back
//! loses nothing, and otherwise ignored: the node never runs the hooks.
//! Any other key is refused.
//!
//! A file that does not parse is refused with `file:line: what is wrong`; the
//! text of a secret key never appears in an error.

use std::fmt::{self, Write as _};
use std::io;
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::path::Path;
use std::str::FromStr;

use ipnet::IpNet;

use crate::key::{PresharedKey, PrivateKey, PublicKey};
use crate::{NodeConfig, PeerConfig};

/// A parsed wg-quick file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WgQuickConfig {
    pub interface: Interface,
    pub peers: Vec<Peer>,
}

/// The `[Interface]` section.
#[derive(Debug, Clone)]
pub struct Interface {
    pub private_key: PrivateKey,
    /// `Address`: the node's overlay addresses with their prefix lengths. A
    /// bare address means /32 or /128, as with `ip address add`.
    pub addresses: Vec<IpNet>,
    /// `ListenPort`; `None` or 0 lets the system choose.
    pub listen_port: Option<u16>,
    /// Keys that configure a host interface, in file order (see the module
    /// documentation): kept for writing back, ignored by the node.
    pub host_settings: Vec<HostSetting>,
}

// Private keys are compared through their public keys: the derivation is a
// bijection in practice and the comparison handles no secret bytes.
impl PartialEq for Interface {
    fn eq(&self, other: &Self) -> bool {
        self.private_key.public_key() == other.private_key.public_key()
            && self.addresses == other.addresses
            && self.listen_port == other.listen_port
            && self.host_settings == other.host_settings
    }
}

impl Eq for Interface {}

/// One `[Interface]` key that only a kernel interface uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostSetting {
    pub key: HostKey,
    pub value: String,
}

/// The keys of [`HostSetting`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HostKey {
    Dns,
    Mtu,
    Table,
    PreUp,
    PostUp,
    PreDown,
    PostDown,
    SaveConfig,
    FwMark,
}

impl HostKey {
    const ALL: [HostKey; 9] = [
        HostKey::Dns,
        HostKey::Mtu,
        HostKey::Table,
        HostKey::PreUp,
        HostKey::PostUp,
        HostKey::PreDown,
        HostKey::PostDown,
        HostKey::SaveConfig,
        HostKey::FwMark,
    ];

    /// The key as wg-quick spells it.
    pub fn name(self) -> &'static str {
        match self {
            HostKey::Dns => "DNS",
            HostKey::Mtu => "MTU",
            HostKey::Table => "Table",
            HostKey::PreUp => "PreUp",
            HostKey::PostUp => "PostUp",
            HostKey::PreDown => "PreDown",
            HostKey::PostDown => "PostDown",
            HostKey::SaveConfig => "SaveConfig",
            HostKey::FwMark => "FwMark",
        }
    }

    /// Whether the key may appear more than once (wg-quick accumulates them).
    fn repeats(self) -> bool {
        matches!(
            self,
            HostKey::Dns | HostKey::PreUp | HostKey::PostUp | HostKey::PreDown | HostKey::PostDown
        )
    }

    /// Whether `wg setconf` understands the key (the rest are wg-quick's).
    fn is_wg_key(self) -> bool {
        self == HostKey::FwMark
    }
}

/// A `[Peer]` section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    pub public_key: PublicKey,
    pub preshared_key: Option<PresharedKey>,
    /// `AllowedIPs`, as written (host bits are kept; [`IpNet::trunc`] gives
    /// the network).
    pub allowed_ips: Vec<IpNet>,
    pub endpoint: Option<Endpoint>,
    /// `PersistentKeepalive` in seconds; `None` for `off` or 0.
    pub persistent_keepalive: Option<u16>,
}

/// A peer's `Endpoint`: an IP address or a host name, and a port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub host: EndpointHost,
    pub port: u16,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EndpointHost {
    Ip(IpAddr),
    /// A DNS name, resolved by [`Endpoint::resolve`].
    Name(String),
}

impl Endpoint {
    /// The socket address, resolving a host name with the system resolver
    /// (blocking) and taking its first address, as `wg` does.
    pub fn resolve(&self) -> io::Result<SocketAddr> {
        match &self.host {
            EndpointHost::Ip(ip) => Ok(SocketAddr::new(*ip, self.port)),
            EndpointHost::Name(name) => (name.as_str(), self.port)
                .to_socket_addrs()?
                .next()
                .ok_or_else(|| {
                    io::Error::new(
                        io::ErrorKind::NotFound,
                        format!("endpoint host `{name}` has no address"),
                    )
                }),
        }
    }
}

impl From<SocketAddr> for Endpoint {
    fn from(addr: SocketAddr) -> Self {
        Endpoint {
            host: EndpointHost::Ip(addr.ip()),
            port: addr.port(),
        }
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.host {
            EndpointHost::Ip(IpAddr::V6(ip)) => write!(f, "[{ip}]:{}", self.port),
            EndpointHost::Ip(IpAddr::V4(ip)) => write!(f, "{ip}:{}", self.port),
            EndpointHost::Name(name) => write!(f, "{name}:{}", self.port),
        }
    }
}

impl FromStr for Endpoint {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let (host, port) = if let Some(rest) = text.strip_prefix('[') {
            let (ip, after) = rest
                .split_once(']')
                .ok_or_else(|| format!("endpoint `{text}` has `[` without `]`"))?;
            let port = after
                .strip_prefix(':')
                .ok_or_else(|| format!("endpoint `{text}` has no `:port` after `]`"))?;
            let ip: std::net::Ipv6Addr = ip
                .parse()
                .map_err(|_| format!("endpoint `{text}`: `{ip}` is not an IPv6 address"))?;
            (EndpointHost::Ip(IpAddr::V6(ip)), port)
        } else {
            let (host, port) = text
                .rsplit_once(':')
                .ok_or_else(|| format!("endpoint `{text}` is not host:port"))?;
            if host.contains(':') {
                return Err(format!(
                    "endpoint `{text}`: an IPv6 address needs brackets, as in [{host}]:{port}"
                ));
            }
            let host = match host.parse::<IpAddr>() {
                Ok(ip) => EndpointHost::Ip(ip),
                Err(_) if is_host_name(host) => EndpointHost::Name(host.to_owned()),
                Err(_) => {
                    return Err(format!(
                        "endpoint `{text}`: `{host}` is neither an IP address nor a host name"
                    ))
                }
            };
            (host, port)
        };
        let port = port
            .parse::<u16>()
            .map_err(|_| format!("endpoint `{text}`: port `{port}` is not a number 0-65535"))?;
        Ok(Endpoint { host, port })
    }
}

fn is_host_name(text: &str) -> bool {
    !text.is_empty()
        && text.len() <= 253
        && text.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
        && !text
            .split('.')
            .all(|label| label.bytes().all(|b| b.is_ascii_digit()))
}

/// Why a wg-quick file was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The text is not a valid file: `file:line: what is wrong`.
    #[error("{file}:{line}: {problem}")]
    Invalid {
        file: String,
        line: usize,
        problem: String,
    },
    #[error("{file}: cannot read: {source}")]
    Read {
        file: String,
        #[source]
        source: io::Error,
    },
    /// The file parses, but the node cannot run it as written.
    #[error("{0}")]
    Unsupported(String),
    /// A peer's `Endpoint` host name does not resolve.
    #[error("peer {peer}: cannot resolve endpoint `{endpoint}`: {source}")]
    Resolve {
        peer: PublicKey,
        endpoint: String,
        #[source]
        source: io::Error,
    },
    #[error("{file}: cannot write: {source}")]
    Write {
        file: String,
        #[source]
        source: io::Error,
    },
}

impl ConfigError {
    /// The line number of an [`ConfigError::Invalid`] error.
    pub fn line(&self) -> Option<usize> {
        match self {
            ConfigError::Invalid { line, .. } => Some(*line),
            _ => None,
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Section {
    Interface,
    Peer,
}

/// Keys of one section with the line that set them, to refuse duplicates.
#[derive(Default)]
struct Seen(Vec<(String, usize)>);

impl Seen {
    fn first(&mut self, key: &str, line: usize) -> Result<(), String> {
        if let Some((_, earlier)) = self.0.iter().find(|(k, _)| k == key) {
            return Err(format!(
                "duplicate key `{key}` (already set on line {earlier})"
            ));
        }
        self.0.push((key.to_owned(), line));
        Ok(())
    }
}

struct InterfaceDraft {
    line: usize,
    private_key: Option<PrivateKey>,
    addresses: Vec<IpNet>,
    listen_port: Option<u16>,
    host_settings: Vec<HostSetting>,
    seen: Seen,
}

struct PeerDraft {
    line: usize,
    public_key: Option<(PublicKey, usize)>,
    preshared_key: Option<PresharedKey>,
    allowed_ips: Vec<IpNet>,
    endpoint: Option<Endpoint>,
    persistent_keepalive: Option<u16>,
    seen: Seen,
}

impl WgQuickConfig {
    /// Reads and parses a wg-quick file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            file: file.clone(),
            source,
        })?;
        Self::parse(&text, &file)
    }

    /// Parses the text of a wg-quick file; `file` names it in errors.
    pub fn parse(text: &str, file: &str) -> Result<Self, ConfigError> {
        let invalid = |line: usize, problem: String| ConfigError::Invalid {
            file: file.to_owned(),
            line,
            problem,
        };
        let mut interface: Option<InterfaceDraft> = None;
        let mut peers: Vec<PeerDraft> = Vec::new();
        let mut section: Option<Section> = None;

        for (index, raw) in text.lines().enumerate() {
            let line = index + 1;
            let content = raw.split('#').next().unwrap_or("").trim();
            if content.is_empty() {
                continue;
            }
            if content.starts_with('[') {
                let name = content
                    .strip_prefix('[')
                    .and_then(|rest| rest.strip_suffix(']'))
                    .map(str::trim)
                    .ok_or_else(|| {
                        invalid(line, format!("malformed section header `{content}`"))
                    })?;
                if name.eq_ignore_ascii_case("interface") {
                    if let Some(first) = &interface {
                        return Err(invalid(
                            line,
                            format!(
                                "second [Interface] section (the first is on line {})",
                                first.line
                            ),
                        ));
                    }
                    interface = Some(InterfaceDraft {
                        line,
                        private_key: None,
                        addresses: Vec::new(),
                        listen_port: None,
                        host_settings: Vec::new(),
                        seen: Seen::default(),
                    });
                    section = Some(Section::Interface);
                } else if name.eq_ignore_ascii_case("peer") {
                    peers.push(PeerDraft {
                        line,
                        public_key: None,
                        preshared_key: None,
                        allowed_ips: Vec::new(),
                        endpoint: None,
                        persistent_keepalive: None,
                        seen: Seen::default(),
                    });
                    section = Some(Section::Peer);
                } else {
                    return Err(invalid(
                        line,
                        format!("unknown section [{name}] (expected [Interface] or [Peer])"),
                    ));
                }
                continue;
            }
            let (key, value) = content
                .split_once('=')
                .map(|(k, v)| (k.trim(), v.trim()))
                .ok_or_else(|| {
                    invalid(line, format!("expected `Key = value`, found `{content}`"))
                })?;
            if key.is_empty() {
                return Err(invalid(line, "missing key before `=`".to_owned()));
            }
            let result = match section {
                None => Err(format!(
                    "key `{key}` outside a section (put it under [Interface] or [Peer])"
                )),
                Some(Section::Interface) => match interface.as_mut() {
                    Some(draft) => interface_key(draft, key, value, line),
                    None => Err("internal: interface section without draft".to_owned()),
                },
                Some(Section::Peer) => match peers.last_mut() {
                    Some(draft) => peer_key(draft, key, value, line),
                    None => Err("internal: peer section without draft".to_owned()),
                },
            };
            result.map_err(|problem| invalid(line, problem))?;
        }

        let end_line = text.lines().count().max(1);
        let interface =
            interface.ok_or_else(|| invalid(end_line, "no [Interface] section".to_owned()))?;
        let private_key = interface
            .private_key
            .ok_or_else(|| invalid(interface.line, "[Interface] has no PrivateKey".to_owned()))?;
        let mut done: Vec<Peer> = Vec::with_capacity(peers.len());
        let mut key_lines: Vec<(PublicKey, usize)> = Vec::with_capacity(peers.len());
        for draft in peers {
            let (public_key, key_line) = draft
                .public_key
                .ok_or_else(|| invalid(draft.line, "[Peer] has no PublicKey".to_owned()))?;
            if let Some((_, earlier)) = key_lines.iter().find(|(k, _)| *k == public_key) {
                return Err(invalid(
                    key_line,
                    format!("peer {public_key} is already defined (line {earlier})"),
                ));
            }
            if public_key == private_key.public_key() {
                return Err(invalid(
                    key_line,
                    "peer PublicKey is the interface's own public key".to_owned(),
                ));
            }
            key_lines.push((public_key, key_line));
            done.push(Peer {
                public_key,
                preshared_key: draft.preshared_key,
                allowed_ips: draft.allowed_ips,
                endpoint: draft.endpoint,
                persistent_keepalive: draft.persistent_keepalive,
            });
        }
        Ok(WgQuickConfig {
            interface: Interface {
                private_key,
                addresses: interface.addresses,
                listen_port: interface.listen_port,
                host_settings: interface.host_settings,
            },
            peers: done,
        })
    }

    /// The file in wg-quick format, every key in its canonical spelling.
    /// Parsing it gives back an equal config. It holds the private key: write
    /// it with [`WgQuickConfig::save`] (mode 0600), never log it.
    pub fn to_wg_quick(&self) -> String {
        self.render(true)
    }

    /// The file as `wg-quick strip` prints it, for `wg setconf`: without
    /// `Address` and the wg-quick-only keys.
    pub fn to_wg_setconf(&self) -> String {
        self.render(false)
    }

    /// Writes the file in wg-quick format, created with mode 0600 (an
    /// existing file keeps its mode and is truncated).
    pub fn save(&self, path: &Path) -> Result<(), ConfigError> {
        use std::io::Write as _;
        use std::os::unix::fs::OpenOptionsExt as _;
        let write_error = |source| ConfigError::Write {
            file: path.display().to_string(),
            source,
        };
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(path)
            .map_err(write_error)?;
        file.write_all(self.to_wg_quick().as_bytes())
            .map_err(write_error)?;
        file.sync_all().map_err(write_error)
    }

    /// The node's own settings: its key, its overlay addresses (the
    /// `Address` lines: at most one IPv4 and one IPv6; their prefix lengths
    /// do not matter to a node without routes of its own), and its UDP
    /// listen address: `ListenPort` (0, any port, when absent) on all IPv4
    /// addresses, or on all addresses (dual stack) when a peer's endpoint is
    /// IPv6.
    pub fn node_config(&self) -> Result<NodeConfig, ConfigError> {
        let i = &self.interface;
        let v4: Vec<IpAddr> = i
            .addresses
            .iter()
            .map(IpNet::addr)
            .filter(IpAddr::is_ipv4)
            .collect();
        let v6: Vec<IpAddr> = i
            .addresses
            .iter()
            .map(IpNet::addr)
            .filter(IpAddr::is_ipv6)
            .collect();
        if v4.is_empty() && v6.is_empty() {
            return Err(ConfigError::Unsupported(
                "[Interface] has no Address: the node needs an overlay address".to_owned(),
            ));
        }
        for (family, list) in [("IPv4", &v4), ("IPv6", &v6)] {
            if list.len() > 1 {
                let shown: Vec<String> = list.iter().map(IpAddr::to_string).collect();
                return Err(ConfigError::Unsupported(format!(
                    "Address lists {} {family} addresses ({}): the node takes one IPv4 and one IPv6",
                    list.len(),
                    shown.join(", ")
                )));
            }
        }
        let v6_endpoint = self.peers.iter().any(|p| {
            matches!(
                p.endpoint,
                Some(Endpoint {
                    host: EndpointHost::Ip(IpAddr::V6(_)),
                    ..
                })
            )
        });
        let any: IpAddr = if v6_endpoint {
            std::net::Ipv6Addr::UNSPECIFIED.into()
        } else {
            std::net::Ipv4Addr::UNSPECIFIED.into()
        };
        Ok(NodeConfig {
            private_key: i.private_key.clone(),
            addresses: v4.into_iter().chain(v6).collect(),
            listen: SocketAddr::new(any, i.listen_port.unwrap_or(0)),
        })
    }

    /// The peers as the node takes them. Endpoint host names are resolved
    /// here (blocking, with the system resolver), once, as `wg setconf` does.
    pub fn peer_configs(&self) -> Result<Vec<PeerConfig>, ConfigError> {
        self.peers
            .iter()
            .map(|peer| {
                let endpoint = match &peer.endpoint {
                    None => None,
                    Some(endpoint) => {
                        Some(endpoint.resolve().map_err(|source| ConfigError::Resolve {
                            peer: peer.public_key,
                            endpoint: endpoint.to_string(),
                            source,
                        })?)
                    }
                };
                Ok(PeerConfig {
                    public_key: peer.public_key,
                    endpoint,
                    allowed_ips: peer.allowed_ips.iter().map(IpNet::trunc).collect(),
                    persistent_keepalive: peer.persistent_keepalive,
                    preshared_key: peer.preshared_key.clone(),
                })
            })
            .collect()
    }

    fn render(&self, wg_quick: bool) -> String {
        let mut out = String::new();
        let i = &self.interface;
        out.push_str("[Interface]\n");
        let _ = writeln!(out, "PrivateKey = {}", i.private_key.to_base64());
        if wg_quick && !i.addresses.is_empty() {
            let _ = writeln!(out, "Address = {}", join(&i.addresses));
        }
        if let Some(port) = i.listen_port {
            let _ = writeln!(out, "ListenPort = {port}");
        }
        for setting in &i.host_settings {
            if wg_quick || setting.key.is_wg_key() {
                let _ = writeln!(out, "{} = {}", setting.key.name(), setting.value);
            }
        }
        for peer in &self.peers {
            out.push_str("\n[Peer]\n");
            let _ = writeln!(out, "PublicKey = {}", peer.public_key);
            if let Some(psk) = &peer.preshared_key {
                let _ = writeln!(out, "PresharedKey = {}", psk.to_base64());
            }
            if !peer.allowed_ips.is_empty() {
                let _ = writeln!(out, "AllowedIPs = {}", join(&peer.allowed_ips));
            }
            if let Some(endpoint) = &peer.endpoint {
                let _ = writeln!(out, "Endpoint = {endpoint}");
            }
            if let Some(seconds) = peer.persistent_keepalive {
                let _ = writeln!(out, "PersistentKeepalive = {seconds}");
            }
        }
        out
    }
}

fn join(nets: &[IpNet]) -> String {
    nets.iter()
        .map(IpNet::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

fn interface_key(
    draft: &mut InterfaceDraft,
    key: &str,
    value: &str,
    line: usize,
) -> Result<(), String> {
    let lower = key.to_ascii_lowercase();
    match lower.as_str() {
        "privatekey" => {
            draft.seen.first("PrivateKey", line)?;
            // Never echo the value: it is a secret.
            let parsed = value
                .parse::<PrivateKey>()
                .map_err(|e| format!("bad PrivateKey: {e}"))?;
            draft.private_key = Some(parsed);
        }
        "address" => {
            let nets = cidr_list(value, "Address")?;
            draft.addresses.extend(nets);
        }
        "listenport" => {
            draft.seen.first("ListenPort", line)?;
            let port = value
                .parse::<u16>()
                .map_err(|_| format!("bad ListenPort `{value}`: expected a port number 0-65535"))?;
            draft.listen_port = Some(port);
        }
        _ => {
            let host_key = HostKey::ALL
                .into_iter()
                .find(|k| k.name().eq_ignore_ascii_case(key))
                .ok_or_else(|| {
                    format!(
                        "unknown key `{key}` in [Interface] (expected PrivateKey, Address, \
                         ListenPort, or one of wg-quick's DNS, MTU, Table, PreUp, PostUp, \
                         PreDown, PostDown, SaveConfig, FwMark)"
                    )
                })?;
            if !host_key.repeats() {
                draft.seen.first(host_key.name(), line)?;
            }
            if value.is_empty() {
                return Err(format!("empty value for `{}`", host_key.name()));
            }
            draft.host_settings.push(HostSetting {
                key: host_key,
                value: value.to_owned(),
            });
        }
    }
    Ok(())
}

fn peer_key(draft: &mut PeerDraft, key: &str, value: &str, line: usize) -> Result<(), String> {
    let lower = key.to_ascii_lowercase();
    match lower.as_str() {
        "publickey" => {
            draft.seen.first("PublicKey", line)?;
            let parsed = value
                .parse::<PublicKey>()
                .map_err(|e| format!("bad PublicKey `{value}`: {e}"))?;
            draft.public_key = Some((parsed, line));
        }
        "presharedkey" => {
            draft.seen.first("PresharedKey", line)?;
            let parsed = value
                .parse::<PresharedKey>()
                .map_err(|e| format!("bad PresharedKey: {e}"))?;
            draft.preshared_key = Some(parsed);
        }
        "allowedips" => {
            let nets = cidr_list(value, "AllowedIPs")?;
            draft.allowed_ips.extend(nets);
        }
        "endpoint" => {
            draft.seen.first("Endpoint", line)?;
            if value.is_empty() {
                return Err("empty value for `Endpoint`".to_owned());
            }
            draft.endpoint = Some(value.parse::<Endpoint>()?);
        }
        "persistentkeepalive" => {
            draft.seen.first("PersistentKeepalive", line)?;
            let seconds = if value.eq_ignore_ascii_case("off") {
                0
            } else {
                value.parse::<u16>().map_err(|_| {
                    format!("bad PersistentKeepalive `{value}`: expected seconds 0-65535 or `off`")
                })?
            };
            draft.persistent_keepalive = (seconds != 0).then_some(seconds);
        }
        _ => {
            return Err(format!(
                "unknown key `{key}` in [Peer] (expected PublicKey, PresharedKey, AllowedIPs, \
                 Endpoint, PersistentKeepalive)"
            ))
        }
    }
    Ok(())
}

/// A comma-separated list of `addr/prefix` or bare addresses.
fn cidr_list(value: &str, key: &str) -> Result<Vec<IpNet>, String> {
    if value.is_empty() {
        return Err(format!("empty value for `{key}`"));
    }
    value
        .split(',')
        .map(str::trim)
        .map(|item| {
            if item.is_empty() {
                return Err(format!("empty entry in `{key}` list `{value}`"));
            }
            if item.contains('/') {
                item.parse::<IpNet>()
                    .map_err(|_| format!("bad CIDR `{item}` in {key}: expected address/prefix"))
            } else {
                item.parse::<IpAddr>()
                    .map(IpNet::from)
                    .map_err(|_| format!("bad CIDR `{item}` in {key}: not an IP address"))
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const PRIVATE: &str = "yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk=";
    const PEER: &str = "xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg=";
    const PEER2: &str = "TrMvSoP4jYQlY6RIzBgbssQqY3vxI2Pi+y71lOWWXX0=";
    const PSK: &str = "FpCyhws9cxwWoV4xELtfJvjJN+zQVRPISllRWgeopVE=";

    fn parse(text: &str) -> Result<WgQuickConfig, ConfigError> {
        WgQuickConfig::parse(text, "wg0.conf")
    }

    fn error(text: &str) -> String {
        parse(text).unwrap_err().to_string()
    }

    #[test]
    fn parses_a_full_wg_quick_file() {
        let text = format!(
            "# a comment line\n\
             [Interface]\n\
             PrivateKey = {PRIVATE}\n\
             Address = 100.64.0.1/10, fd7a:115c:a1e0::1/48 # trailing comment\n\
             ListenPort = 51820\n\
             DNS = 1.1.1.1\n\
             PostUp = iptables -A FORWARD -i %i -j ACCEPT; echo up\n\
             \n\
             [Peer]\n\
             PublicKey = {PEER}\n\
             PresharedKey = {PSK}\n\
             AllowedIPs = 100.64.0.2/32, fd7a:115c:a1e0::2/128\n\
             AllowedIPs = 10.0.0.0/8\n\
             Endpoint = [2001:db8::1]:51820\n\
             PersistentKeepalive = 25\n\
             \n\
             [peer]\n\
             publickey={PEER2}\n\
             endpoint = vpn.example.com:4500\n\
             persistentkeepalive = off\n"
        );
        let config = parse(&text).unwrap();
        let i = &config.interface;
        assert_eq!(i.private_key.to_base64(), PRIVATE);
        assert_eq!(
            i.addresses,
            vec![
                "100.64.0.1/10".parse::<IpNet>().unwrap(),
                "fd7a:115c:a1e0::1/48".parse().unwrap()
            ]
        );
        assert_eq!(i.listen_port, Some(51820));
        assert_eq!(
            i.host_settings,
            vec![
                HostSetting {
                    key: HostKey::Dns,
                    value: "1.1.1.1".into()
                },
                HostSetting {
                    key: HostKey::PostUp,
                    value: "iptables -A FORWARD -i %i -j ACCEPT; echo up".into()
                }
            ]
        );
        assert_eq!(config.peers.len(), 2);
        let p = &config.peers[0];
        assert_eq!(p.public_key.to_string(), PEER);
        assert_eq!(p.preshared_key.as_ref().unwrap().to_base64(), PSK);
        assert_eq!(p.allowed_ips.len(), 3);
        assert_eq!(
            p.endpoint.as_ref().unwrap().resolve().unwrap(),
            "[2001:db8::1]:51820".parse::<SocketAddr>().unwrap()
        );
        assert_eq!(p.persistent_keepalive, Some(25));
        let q = &config.peers[1];
        assert_eq!(
            q.endpoint,
            Some(Endpoint {
                host: EndpointHost::Name("vpn.example.com".into()),
                port: 4500
            })
        );
        assert_eq!(q.persistent_keepalive, None);
        assert!(q.allowed_ips.is_empty());
    }

    #[test]
    fn writer_round_trips() {
        let text = format!(
            "[Interface]\nPrivateKey={PRIVATE}\nAddress=10.9.0.1\nAddress = fd00::1/64\n\
             MTU = 1380\nFwMark = 0x1234\nDNS = 1.1.1.1, example.com\nSaveConfig = true\n\
             [Peer]\nPublicKey={PEER}\nPresharedKey={PSK}\nAllowedIPs=0.0.0.0/0,::/0\n\
             Endpoint=192.0.2.7:51820\nPersistentKeepalive=1\n\
             [Peer]\nPublicKey={PEER2}\n"
        );
        let config = parse(&text).unwrap();
        let written = config.to_wg_quick();
        let again = parse(&written).unwrap();
        assert_eq!(again, config);
        assert_eq!(again.to_wg_quick(), written);
        assert!(written.contains("Address = 10.9.0.1/32, fd00::1/64\n"));
        assert!(written.contains("Endpoint = 192.0.2.7:51820\n"));
    }

    #[test]
    fn setconf_form_drops_wg_quick_keys() {
        let text = format!(
            "[Interface]\nPrivateKey={PRIVATE}\nAddress=10.9.0.1/24\nListenPort=1\nMTU=1380\n\
             FwMark=7\nPostUp=echo hi\n[Peer]\nPublicKey={PEER}\nAllowedIPs=10.9.0.2/32\n"
        );
        let stripped = parse(&text).unwrap().to_wg_setconf();
        assert!(!stripped.contains("Address"));
        assert!(!stripped.contains("MTU"));
        assert!(!stripped.contains("PostUp"));
        assert!(stripped.contains("FwMark = 7\n"));
        assert!(stripped.contains("ListenPort = 1\n"));
        assert!(stripped.contains(&format!("PublicKey = {PEER}\n")));
    }

    #[test]
    fn errors_name_file_line_and_problem() {
        let head = format!("[Interface]\nPrivateKey = {PRIVATE}\n");
        let cases: Vec<(String, &str)> = vec![
            (
                "[Wireguard]\n".into(),
                "wg0.conf:1: unknown section [Wireguard]",
            ),
            (
                format!("{head}Colour = blue\n"),
                "wg0.conf:3: unknown key `Colour` in [Interface]",
            ),
            (
                format!("{head}privatekey = {PRIVATE}\n"),
                "wg0.conf:3: duplicate key `PrivateKey` (already set on line 2)",
            ),
            (
                "[Interface]\nPrivateKey = notbase64!!\n".into(),
                "wg0.conf:2: bad PrivateKey: key is not valid base64",
            ),
            (
                "[Interface]\nPrivateKey = AAAA\n".into(),
                "wg0.conf:2: bad PrivateKey: key decodes to 3 bytes, expected 32",
            ),
            (
                format!("{head}Address = 10.0.0.1/33\n"),
                "wg0.conf:3: bad CIDR `10.0.0.1/33` in Address",
            ),
            (
                format!("{head}Address = 10.0.0.1/24,\n"),
                "wg0.conf:3: empty entry in `Address` list",
            ),
            (
                format!("{head}[Peer]\nPublicKey = {PEER}\nAllowedIPs = 10.0.0.0/8, banana\n"),
                "wg0.conf:5: bad CIDR `banana` in AllowedIPs: not an IP address",
            ),
            (
                "\n[Interface]\nListenPort = 1\n".into(),
                "wg0.conf:2: [Interface] has no PrivateKey",
            ),
            (
                format!("PrivateKey = {PRIVATE}\n"),
                "wg0.conf:1: key `PrivateKey` outside a section",
            ),
            (
                format!("{head}[Peer]\nAllowedIPs = 10.0.0.1/32\n"),
                "wg0.conf:3: [Peer] has no PublicKey",
            ),
            (
                format!("{head}[Peer]\nPublicKey = {PEER}\n[Peer]\nPublicKey = {PEER}\n"),
                "wg0.conf:6: peer xTIB",
            ),
            (
                format!("{head}[Peer]\nPublicKey = {PEER}\nEndpoint = 2001:db8::1:51820\n"),
                "wg0.conf:5: endpoint `2001:db8::1:51820`: an IPv6 address needs brackets",
            ),
            (
                format!("{head}[Peer]\nPublicKey = {PEER}\nEndpoint = 1.2.3.4:99999\n"),
                "wg0.conf:5: endpoint `1.2.3.4:99999`: port `99999` is not a number",
            ),
            (
                format!("{head}[Peer]\nPublicKey = {PEER}\nEndpoint = 1.2.3.4\n"),
                "wg0.conf:5: endpoint `1.2.3.4` is not host:port",
            ),
            (
                format!("{head}[Peer]\nPublicKey = {PEER}\nEndpoint = [::1:5\n"),
                "wg0.conf:5: endpoint `[::1:5` has `[` without `]`",
            ),
            (
                format!("{head}[Peer]\nPublicKey = {PEER}\nPersistentKeepalive = soon\n"),
                "wg0.conf:5: bad PersistentKeepalive `soon`",
            ),
            (
                format!("{head}ListenPort = 70000\n"),
                "wg0.conf:3: bad ListenPort `70000`",
            ),
            (
                format!("{head}[Peer]\nPublicKey = {PEER}\nMTU = 1400\n"),
                "wg0.conf:5: unknown key `MTU` in [Peer]",
            ),
            (
                format!("{head}just words\n"),
                "wg0.conf:3: expected `Key = value`, found `just words`",
            ),
            (
                format!("{head}[Interface\n"),
                "wg0.conf:3: malformed section header `[Interface`",
            ),
            (
                format!("{head}[Interface]\n"),
                "wg0.conf:3: second [Interface] section (the first is on line 1)",
            ),
            (
                "# nothing\n[Peer]\n".into(),
                "wg0.conf:2: no [Interface] section",
            ),
            ("".into(), "wg0.conf:1: no [Interface] section"),
            (
                format!("{head}MTU = 1\nMTU = 2\n"),
                "wg0.conf:4: duplicate key `MTU`",
            ),
            (
                format!("{head}DNS =\n"),
                "wg0.conf:3: empty value for `DNS`",
            ),
            (format!("{head}= 5\n"), "wg0.conf:3: missing key before `=`"),
            (
                format!("{head}[Peer]\nPublicKey = HIgo9xNzJMWLKASShiTqIybxZ0U3wGLiUeJ1PKf8ykw=\n"),
                "wg0.conf:4: peer PublicKey is the interface's own public key",
            ),
        ];
        for (text, expected) in cases {
            let got = error(&text);
            assert!(
                got.starts_with(expected),
                "for\n{text}\nexpected `{expected}...`\n     got `{got}`"
            );
        }
    }

    #[test]
    fn secrets_never_appear_in_errors_or_debug() {
        // One character short: valid base64 alphabet, wrong length.
        let almost = &PRIVATE[..PRIVATE.len() - 4];
        let text = format!("[Interface]\nPrivateKey = {almost}\n");
        assert!(!error(&text).contains(almost));
        let text = format!("[Interface]\nPrivateKey = {PRIVATE}\n[Peer]\nPublicKey = {PEER}\nPresharedKey = {almost}\n");
        assert!(!error(&text).contains(almost));
        let text = format!("[Interface]\nPrivateKey = {PRIVATE}\n[Peer]\nPublicKey = {PEER}\nPresharedKey = {PSK}\n");
        let shown = format!("{:?}", parse(&text).unwrap());
        assert!(!shown.contains(PRIVATE) && !shown.contains(PSK), "{shown}");
    }

    #[test]
    fn load_and_save_use_the_file_name_and_mode_0600() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("wg7.conf");
        let config = parse(&format!("[Interface]\nPrivateKey = {PRIVATE}\n")).unwrap();
        config.save(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(WgQuickConfig::load(&path).unwrap(), config);
        std::fs::write(&path, "[Interface]\nBogus = 1\n").unwrap();
        let err = WgQuickConfig::load(&path).unwrap_err().to_string();
        assert_eq!(
            err,
            format!("{}:2: unknown key `Bogus` in [Interface] (expected PrivateKey, Address, ListenPort, or one of wg-quick's DNS, MTU, Table, PreUp, PostUp, PreDown, PostDown, SaveConfig, FwMark)", path.display())
        );
        let missing = dir.path().join("absent.conf");
        let err = WgQuickConfig::load(&missing).unwrap_err().to_string();
        assert!(
            err.starts_with(&format!("{}: cannot read:", missing.display())),
            "{err}"
        );
    }

    #[test]
    fn converts_into_node_and_peer_configs() {
        let text = format!(
            "[Interface]\nPrivateKey = {PRIVATE}\nAddress = 100.64.0.1/10, fd7a::1/48\nListenPort = 51820\n\
             [Peer]\nPublicKey = {PEER}\nPresharedKey = {PSK}\nAllowedIPs = 100.64.0.2/32, 10.1.2.3/8\n\
             Endpoint = 192.0.2.1:51821\nPersistentKeepalive = 25\n\
             [Peer]\nPublicKey = {PEER2}\nEndpoint = localhost:9\n"
        );
        let config = parse(&text).unwrap();
        let node = config.node_config().unwrap();
        assert_eq!(
            node.private_key.public_key(),
            config.interface.private_key.public_key()
        );
        assert_eq!(
            node.addresses,
            vec![
                "100.64.0.1".parse::<IpAddr>().unwrap(),
                "fd7a::1".parse().unwrap()
            ]
        );
        assert_eq!(node.listen, "0.0.0.0:51820".parse::<SocketAddr>().unwrap());
        let peers = config.peer_configs().unwrap();
        assert_eq!(peers[0].public_key.to_string(), PEER);
        assert_eq!(peers[0].endpoint, Some("192.0.2.1:51821".parse().unwrap()));
        assert_eq!(
            peers[0].allowed_ips,
            vec![
                "100.64.0.2/32".parse::<IpNet>().unwrap(),
                "10.0.0.0/8".parse().unwrap()
            ]
        );
        assert_eq!(peers[0].persistent_keepalive, Some(25));
        assert_eq!(peers[0].preshared_key.as_ref().unwrap().to_base64(), PSK);
        assert!(peers[1].endpoint.unwrap().ip().is_loopback());

        let v6 = parse(&format!(
            "[Interface]\nPrivateKey = {PRIVATE}\nAddress = fd7a::1\n[Peer]\nPublicKey = {PEER}\nEndpoint = [::1]:5\n"
        ))
        .unwrap();
        assert_eq!(
            v6.node_config().unwrap().listen,
            "[::]:0".parse::<SocketAddr>().unwrap()
        );
    }

    #[test]
    fn conversion_refuses_what_the_node_cannot_run() {
        let none = parse(&format!("[Interface]\nPrivateKey = {PRIVATE}\n")).unwrap();
        assert_eq!(
            none.node_config().unwrap_err().to_string(),
            "[Interface] has no Address: the node needs an overlay address"
        );
        let two = parse(&format!(
            "[Interface]\nPrivateKey = {PRIVATE}\nAddress = 10.0.0.1/24, 10.0.0.2/24\n"
        ))
        .unwrap();
        assert_eq!(
            two.node_config().unwrap_err().to_string(),
            "Address lists 2 IPv4 addresses (10.0.0.1, 10.0.0.2): the node takes one IPv4 and one IPv6"
        );
        let unresolvable = parse(&format!(
            "[Interface]\nPrivateKey = {PRIVATE}\n[Peer]\nPublicKey = {PEER}\nEndpoint = no-such-host.invalid:1\n"
        ))
        .unwrap();
        let err = unresolvable.peer_configs().unwrap_err().to_string();
        assert!(
            err.starts_with(&format!(
                "peer {PEER}: cannot resolve endpoint `no-such-host.invalid:1`"
            )),
            "{err}"
        );
    }

    #[test]
    fn endpoint_forms() {
        for (text, shown) in [
            ("1.2.3.4:5", "1.2.3.4:5"),
            ("[::1]:51820", "[::1]:51820"),
            ("[fe80::1]:0", "[fe80::1]:0"),
            ("host-1.example:7", "host-1.example:7"),
            ("localhost:9", "localhost:9"),
        ] {
            let endpoint: Endpoint = text.parse().unwrap();
            assert_eq!(endpoint.to_string(), shown);
        }
        for bad in [
            "",
            ":5",
            "[::1]5",
            "a b:1",
            "1.2.3:4",
            "ex..ample:1",
            "[1.2.3.4]:5",
        ] {
            assert!(bad.parse::<Endpoint>().is_err(), "accepted `{bad}`");
        }
    }

    #[test]
    fn arbitrary_text_never_panics() {
        // A small deterministic generator (xorshift) over characters that
        // matter to the grammar, so every run covers the same inputs.
        let alphabet: Vec<char> =
            "[]=#,/:.\n \t0123456789abcdefAPIKLNPRSTUVWXYZ+InterfacePeerAddressEndpoint"
                .chars()
                .collect();
        let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
        for _ in 0..5_000 {
            let mut text = String::new();
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let len = (state % 200) as usize;
            for _ in 0..len {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                text.push(alphabet[(state % alphabet.len() as u64) as usize]);
            }
            if let Err(ConfigError::Invalid { line, .. }) = parse(&text) {
                assert!(line >= 1 && line <= text.lines().count().max(1));
            }
        }
    }
}
