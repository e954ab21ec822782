//! Network namespaces for tests that need root: create one with a veth pair
//! to the root namespace, run stock processes (wireguard-go) inside it, open
//! sockets inside it from a thread of the test process, and remove it all on
//! drop, even when the test fails.
//!
//! Test traffic only ever goes to the namespace's own addresses.

use std::fs::File;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// Whether a `_root_netns` test can run: true as root. Otherwise it prints a
/// skip line and returns false, or panics when `GSTACKS_REQUIRE_ROOT_TESTS=1`
/// (CI), where a skipped root test would hide a failure.
pub fn root_or_skip(test: &str) -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    if std::env::var("GSTACKS_REQUIRE_ROOT_TESTS").as_deref() == Ok("1") {
        panic!("{test} needs root (GSTACKS_REQUIRE_ROOT_TESTS=1 forbids skipping it)");
    }
    println!("skipping {test}: needs root and network namespaces");
    false
}

/// Runs `ip` with the arguments; an error carries its stderr.
pub fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("run `ip` (package iproute2)")?;
    if !out.status.success() {
        bail!(
            "`ip {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// A network namespace with one end of a veth pair on a /30: this end has
/// [`Netns::addr`], the other end (the root namespace, or a second namespace
/// for [`Netns::pair`]) has [`Netns::peer_addr`]. Dropping it deletes the
/// namespace, which deletes the veth pair.
pub struct Netns {
    name: String,
    addr: Ipv4Addr,
    peer_addr: Ipv4Addr,
}

static NEXT: AtomicU32 = AtomicU32::new(0);

/// A short name unique to this process and call (interface names are at most
/// 15 bytes, and wireguard-go's control sockets share one directory across
/// namespaces, so names must be unique machine-wide).
pub fn unique_name(prefix: &str) -> String {
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    format!("{prefix}{}x{n}", std::process::id() % 100_000)
}

/// A /30 from 198.18.0.0/15 (reserved for benchmark networks, RFC 2544),
/// chosen from the process id and a counter so that concurrent tests do not
/// collide: its two host addresses.
fn slash30() -> (Ipv4Addr, Ipv4Addr) {
    let slot =
        (std::process::id().wrapping_mul(7919) + NEXT.fetch_add(1, Ordering::Relaxed)) % (1 << 15);
    let base = u32::from(Ipv4Addr::new(198, 18, 0, 0)) + slot * 4;
    (Ipv4Addr::from(base + 1), Ipv4Addr::from(base + 2))
}

impl Netns {
    /// An empty namespace with loopback up.
    fn bare(prefix: &str, addr: Ipv4Addr, peer_addr: Ipv4Addr) -> Result<Netns> {
        let name = unique_name(prefix);
        ip(&["netns", "add", &name])?;
        // From here on the guard owns the namespace and removes it on error.
        let ns = Netns {
            name,
            addr,
            peer_addr,
        };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    fn add_veth_end(&self, device: &str) -> Result<()> {
        self.ip(&["addr", "add", &format!("{}/30", self.addr), "dev", device])?;
        self.ip(&["link", "set", device, "up"])
    }

    /// A namespace joined to the root namespace by a veth pair.
    pub fn create(prefix: &str) -> Result<Netns> {
        let (root_addr, inside_addr) = slash30();
        let ns = Netns::bare(prefix, inside_addr, root_addr)?;
        let outer = format!("{}o", ns.name);
        let inner = format!("{}i", ns.name);
        ip(&[
            "link", "add", &outer, "type", "veth", "peer", "name", &inner,
        ])?;
        // Created in the root namespace: delete it explicitly if a later
        // step fails (moving `inner` into the namespace ties both ends to it).
        let result = (|| {
            ip(&["link", "set", &inner, "netns", &ns.name])?;
            ip(&["addr", "add", &format!("{root_addr}/30"), "dev", &outer])?;
            ip(&["link", "set", &outer, "up"])?;
            ns.add_veth_end(&inner)
        })();
        if result.is_err() {
            let _ = ip(&["link", "del", &outer]);
        }
        result.map(|()| ns)
    }

    /// Two namespaces joined to each other (not to the root namespace) by a
    /// veth pair.
    pub fn pair(prefix: &str) -> Result<(Netns, Netns)> {
        let (a_addr, b_addr) = slash30();
        let a = Netns::bare(prefix, a_addr, b_addr)?;
        let b = Netns::bare(prefix, b_addr, a_addr)?;
        let a_dev = format!("{}v", a.name);
        let b_dev = format!("{}v", b.name);
        a.ip(&[
            "link", "add", &a_dev, "type", "veth", "peer", "name", &b_dev,
        ])?;
        a.ip(&["link", "set", &b_dev, "netns", &b.name])?;
        a.add_veth_end(&a_dev)?;
        b.add_veth_end(&b_dev)?;
        Ok((a, b))
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// This namespace's end of the veth pair.
    pub fn addr(&self) -> Ipv4Addr {
        self.addr
    }

    /// The other end of the veth pair.
    pub fn peer_addr(&self) -> Ipv4Addr {
        self.peer_addr
    }

    /// Runs `ip -n <ns> args...`.
    pub fn ip(&self, args: &[&str]) -> Result<()> {
        let mut all = vec!["-n", self.name.as_str()];
        all.extend_from_slice(args);
        ip(&all)
    }

    /// A command that runs inside the namespace (`ip netns exec`), which
    /// execs the program: the child's pid is the program's.
    pub fn command(&self, program: &str) -> Command {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &self.name, program]);
        command
    }

    /// Moves the calling thread into the namespace (see [`enter_netns`]).
    pub fn enter(&self) -> Result<()> {
        enter_netns(&self.name)
    }

    /// Runs `f` on a new thread that has joined the namespace (see
    /// [`enter_netns`]) and waits for it, e.g. to bind a listener there and
    /// hand it to tokio with `from_std`.
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> Result<T> {
        self.spawn(f)
            .join()
            .map_err(|_| anyhow::anyhow!("thread in netns {} panicked", self.name))?
    }

    /// Starts `f` on a new thread that has joined the namespace. (A fresh
    /// thread, never one of a pool, which would stay in the namespace.)
    pub fn spawn<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> std::thread::JoinHandle<Result<T>> {
        let name = self.name.clone();
        std::thread::spawn(move || -> Result<T> {
            enter_netns(&name)?;
            Ok(f())
        })
    }
}

/// Moves the calling thread into the named namespace: sockets it creates from
/// then on live there (and stay there when handed to other threads). Other
/// threads of the process are not affected.
pub fn enter_netns(name: &str) -> Result<()> {
    let path = PathBuf::from("/run/netns").join(name);
    let file = File::open(&path).with_context(|| format!("open {}", path.display()))?;
    nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)
        .with_context(|| format!("setns into {}", path.display()))
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Err(e) = ip(&["netns", "del", &self.name]) {
            eprintln!("cleanup: {e}");
        }
    }
}

/// A private layer-2 segment: a bridge in a namespace of its own (the
/// "hub"), with namespaces joined to it by veth pairs. It and its addresses
/// exist only inside namespaces the test made, so the address range cannot
/// meet the host's. Dropping it deletes the hub, which deletes the bridge and
/// every veth pair to it.
pub struct Segment {
    hub: String,
    prefix: [u8; 3],
    next: AtomicU32,
}

impl Segment {
    /// An empty bridge; members get addresses in `a.b.c.0/24`.
    pub fn create(prefix: [u8; 3]) -> Result<Segment> {
        let hub = unique_name("gsh");
        ip(&["netns", "add", &hub])?;
        let segment = Segment {
            hub,
            prefix,
            next: AtomicU32::new(0),
        };
        segment.ip(&["link", "add", "br0", "type", "bridge"])?;
        segment.ip(&["link", "set", "br0", "up"])?;
        Ok(segment)
    }

    fn ip(&self, args: &[&str]) -> Result<()> {
        let mut all = vec!["-n", self.hub.as_str()];
        all.extend_from_slice(args);
        ip(&all)
    }

    /// Joins `ns` to the bridge with a veth pair whose end in `ns` is
    /// `device` with address `a.b.c.<host>/24`; returns that address.
    pub fn attach(&self, ns: &Netns, device: &str, host: u8) -> Result<Ipv4Addr> {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let port = format!("p{n}");
        self.ip(&[
            "link",
            "add",
            &port,
            "type",
            "veth",
            "peer",
            "name",
            device,
            "netns",
            ns.name(),
        ])?;
        self.ip(&["link", "set", &port, "master", "br0"])?;
        self.ip(&["link", "set", &port, "up"])?;
        let [a, b, c] = self.prefix;
        let addr = Ipv4Addr::new(a, b, c, host);
        ns.ip(&["addr", "add", &format!("{addr}/24"), "dev", device])?;
        ns.ip(&["link", "set", device, "up"])?;
        Ok(addr)
    }
}

impl Drop for Segment {
    fn drop(&mut self) {
        if let Err(e) = ip(&["netns", "del", &self.hub]) {
            eprintln!("cleanup: {e}");
        }
    }
}

/// An nftables table inside a namespace, made from a ruleset in `nft -f`
/// form (e.g. a `numgen random` drop rule: packet loss without netem).
/// Dropping it deletes the table (the namespace may be gone already).
pub struct NftTable {
    namespace: String,
    family: String,
    name: String,
}

impl NftTable {
    /// Loads `table <family> <name> { <body> }` into `ns`.
    pub fn create(ns: &Netns, family: &str, name: &str, body: &str) -> Result<NftTable> {
        use std::io::Write as _;
        let ruleset = format!("table {family} {name} {{\n{body}\n}}\n");
        let mut child = Command::new("ip")
            .args(["netns", "exec", ns.name(), "nft", "-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("run nft (package nftables)")?;
        child
            .stdin
            .take()
            .expect("piped stdin")
            .write_all(ruleset.as_bytes())?;
        let out = child.wait_with_output()?;
        if !out.status.success() {
            bail!(
                "nft -f failed: {}\n{ruleset}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(NftTable {
            namespace: ns.name().to_owned(),
            family: family.to_owned(),
            name: name.to_owned(),
        })
    }

    /// `nft list table` inside the namespace.
    pub fn list(&self) -> Result<String> {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.namespace, "nft", "list", "table"])
            .args([&self.family, &self.name])
            .output()
            .context("run nft (package nftables)")?;
        if !out.status.success() {
            bail!(
                "nft list table failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// The sum of the `counter packets N` of the table's rules.
    pub fn counted_packets(&self) -> Result<u64> {
        let listing = self.list()?;
        let mut total = 0;
        for line in listing.lines() {
            let mut words = line.split_whitespace();
            while let Some(word) = words.next() {
                if word == "packets" {
                    if let Some(n) = words.next().and_then(|n| n.parse::<u64>().ok()) {
                        total += n;
                    }
                }
            }
        }
        Ok(total)
    }
}

impl Drop for NftTable {
    fn drop(&mut self) {
        let path = PathBuf::from("/run/netns").join(&self.namespace);
        if !path.exists() {
            return;
        }
        let out = Command::new("ip")
            .args(["netns", "exec", &self.namespace, "nft", "delete", "table"])
            .args([&self.family, &self.name])
            .output();
        match out {
            Ok(out) if out.status.success() => {}
            Ok(out) => eprintln!(
                "cleanup: nft delete table: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ),
            Err(e) => eprintln!("cleanup: nft: {e}"),
        }
    }
}

/// A child process killed (SIGKILL, by its pid) and reaped on drop.
pub struct ChildGuard {
    child: Child,
    what: String,
}

impl ChildGuard {
    pub fn spawn(mut command: Command, what: &str) -> Result<ChildGuard> {
        let child = command
            .stdin(Stdio::null())
            .spawn()
            .with_context(|| format!("start {what}"))?;
        Ok(ChildGuard {
            child,
            what: what.to_owned(),
        })
    }

    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// Fails if the process has exited.
    pub fn check_running(&mut self) -> Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!("{} exited: {status}", self.what);
        }
        Ok(())
    }
}

impl ChildGuard {
    /// Kills (SIGKILL, by pid) and reaps the process; idempotent.
    pub fn stop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        self.stop();
    }
}

/// wireguard-go on a TUN device inside a namespace, in the foreground so the
/// guard owns its process. Dropping it stops the process and removes its
/// control socket.
pub struct WireguardGo {
    process: ChildGuard,
    interface: String,
    namespace: String,
}

impl WireguardGo {
    /// Starts `wireguard-go -f <interface>` in `ns` and waits (polling with a
    /// deadline) until its control socket and device exist.
    pub fn start(ns: &Netns, interface: &str) -> Result<WireguardGo> {
        let mut command = ns.command("wireguard-go");
        command
            .args(["-f", interface])
            .env("WG_PROCESS_FOREGROUND", "1")
            .env("LOG_LEVEL", "error");
        let process = ChildGuard::spawn(command, "wireguard-go (package wireguard-go)")?;
        let mut wg = WireguardGo {
            process,
            interface: interface.to_owned(),
            namespace: ns.name().to_owned(),
        };
        let socket = wg.socket_path();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            wg.process.check_running()?;
            if socket.exists() && ns.ip(&["link", "show", interface]).is_ok() {
                return Ok(wg);
            }
            if Instant::now() > deadline {
                bail!("wireguard-go did not create {interface} within 10 s");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn socket_path(&self) -> PathBuf {
        PathBuf::from("/var/run/wireguard").join(format!("{}.sock", self.interface))
    }

    pub fn interface(&self) -> &str {
        &self.interface
    }

    /// `wg setconf <interface> <file>` inside the namespace: the file is in
    /// `wg setconf` form (see `netstack::config::WgQuickConfig::to_wg_setconf`).
    pub fn setconf(&self, file: &std::path::Path) -> Result<()> {
        let out = Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.namespace,
                "wg",
                "setconf",
                &self.interface,
            ])
            .arg(file)
            .output()
            .context("run wg (package wireguard-tools)")?;
        if !out.status.success() {
            bail!(
                "wg setconf {} failed: {}",
                self.interface,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(())
    }

    /// `wg show <interface> <what>` inside the namespace.
    pub fn show(&self, what: &str) -> Result<String> {
        let out = Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.namespace,
                "wg",
                "show",
                &self.interface,
                what,
            ])
            .output()
            .context("run wg (package wireguard-tools)")?;
        if !out.status.success() {
            bail!(
                "wg show {} {what} failed: {}",
                self.interface,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    pub fn check_running(&mut self) -> Result<()> {
        self.process.check_running()
    }

    pub fn pid(&self) -> u32 {
        self.process.id()
    }
}

impl Drop for WireguardGo {
    fn drop(&mut self) {
        // A killed wireguard-go leaves its control socket behind.
        self.process.stop();
        let _ = std::fs::remove_file(self.socket_path());
    }
}
