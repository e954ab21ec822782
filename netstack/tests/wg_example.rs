//! The `wg` example end to end: two instances on loopback, configured from
//! wg-quick files; echo, forward and expose across them; SIGTERM exits 0;
//! bad arguments and bad files exit 2 with a message naming the problem.

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use netstack::PrivateKey;

fn example() -> PathBuf {
    // target/<profile>/deps/<this test> -> target/<profile>/examples/wg
    let exe = std::env::current_exe().unwrap();
    let profile = exe.parent().and_then(Path::parent).unwrap();
    let path = profile.join("examples/wg");
    assert!(
        path.exists(),
        "{} not built (cargo test builds examples)",
        path.display()
    );
    path
}

fn free_udp_port() -> u16 {
    UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn free_tcp_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// An example process, killed on drop if still running.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
        }
        let _ = self.0.wait();
    }
}

fn start(config: &Path, args: &[String]) -> Running {
    let child = Command::new(example())
        .arg("--config")
        .arg(config)
        .args(args)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    Running(child)
}

/// Waits (with a deadline) until something accepts on `addr`.
fn wait_listening(addr: SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
        assert!(Instant::now() < deadline, "nothing listens on {addr}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Sends `data`, half-closes, reads to EOF.
fn exchange(addr: SocketAddr, data: &[u8]) -> Vec<u8> {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut writer = stream.try_clone().unwrap();
    let data = data.to_vec();
    let sender = std::thread::spawn(move || {
        writer.write_all(&data).unwrap();
        writer.shutdown(std::net::Shutdown::Write).unwrap();
    });
    let mut back = Vec::new();
    stream.read_to_end(&mut back).unwrap();
    sender.join().unwrap();
    back
}

#[test]
fn echo_forward_and_expose_between_two_instances() {
    let dir = tempfile::tempdir().unwrap();
    let (key_a, key_b) = (PrivateKey::generate(), PrivateKey::generate());
    let (udp_a, udp_b) = (free_udp_port(), free_udp_port());
    let file_a = dir.path().join("a.conf");
    let file_b = dir.path().join("b.conf");
    std::fs::write(
        &file_a,
        format!(
            "[Interface]\nPrivateKey = {}\nAddress = 100.64.0.1/32\nListenPort = {udp_a}\nDNS = 1.1.1.1\n\n\
             [Peer]\nPublicKey = {}\nAllowedIPs = 100.64.0.2/32\nEndpoint = 127.0.0.1:{udp_b}\n",
            key_a.to_base64(),
            key_b.public_key()
        ),
    )
    .unwrap();
    std::fs::write(
        &file_b,
        format!(
            "[Interface]\nPrivateKey = {}\nAddress = 100.64.0.2/32\nListenPort = {udp_b}\n\n\
             [Peer]\nPublicKey = {}\nAllowedIPs = 100.64.0.1/32\nEndpoint = 127.0.0.1:{udp_a}\n",
            key_b.to_base64(),
            key_a.public_key()
        ),
    )
    .unwrap();
    // A local service behind A, reached through A's --expose: it answers
    // "service:" and what it read.
    let service = TcpListener::bind("127.0.0.1:0").unwrap();
    let service_addr = service.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in service.incoming() {
            let mut stream = stream.unwrap();
            let mut got = Vec::new();
            stream.read_to_end(&mut got).unwrap();
            stream.write_all(b"service:").unwrap();
            stream.write_all(&got).unwrap();
        }
    });
    let a = start(
        &file_a,
        &[
            "--echo".into(),
            "7".into(),
            "--expose".into(),
            format!("8080={service_addr}"),
        ],
    );
    let (echo_local, expose_local) = (free_tcp_port(), free_tcp_port());
    let mut b = start(
        &file_b,
        &[
            "--forward".into(),
            format!("127.0.0.1:{echo_local}=100.64.0.1:7"),
            "--forward".into(),
            format!("127.0.0.1:{expose_local}=100.64.0.1:8080"),
        ],
    );
    let echo_addr: SocketAddr = format!("127.0.0.1:{echo_local}").parse().unwrap();
    let expose_addr: SocketAddr = format!("127.0.0.1:{expose_local}").parse().unwrap();
    wait_listening(echo_addr);
    wait_listening(expose_addr);

    let data: Vec<u8> = (0..1_000_000u32).map(|i| (i % 251) as u8).collect();
    assert_eq!(exchange(echo_addr, &data), data, "echo through forward");
    assert_eq!(
        exchange(expose_addr, b"hello"),
        b"service:hello",
        "forward then expose"
    );

    // SIGTERM: a clean exit 0.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(b.0.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let status = b.0.wait().unwrap();
    assert_eq!(
        status.code(),
        Some(0),
        "exit status after SIGTERM: {status}"
    );
    let mut log = String::new();
    b.0.stderr.take().unwrap().read_to_string(&mut log).unwrap();
    assert!(log.contains("shutting down"), "{log}");
    drop(a);
}

fn failure(args: &[&str]) -> (Option<i32>, String) {
    let out = Command::new(example()).args(args).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    (out.status.code(), stderr)
}

#[test]
fn bad_arguments_and_files_exit_2_naming_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.conf");
    std::fs::write(
        &good,
        format!(
            "[Interface]\nPrivateKey = {}\nAddress = 100.64.0.9/32\n",
            PrivateKey::generate().to_base64()
        ),
    )
    .unwrap();
    let good = good.to_str().unwrap();
    let bad = dir.path().join("bad.conf");
    std::fs::write(&bad, "[Interface]\nPrivateKey = AAAA\n").unwrap();
    let bad = bad.to_str().unwrap();

    let (code, err) = failure(&["--config", good, "--forward", "127.0.0.1:1"]);
    assert_eq!(code, Some(2));
    assert!(
        err.contains("`127.0.0.1:1` is not LOCAL_ADDR=OVERLAY_ADDR"),
        "{err}"
    );
    let (code, err) = failure(&["--config", good, "--expose", "99999=127.0.0.1:22"]);
    assert_eq!(code, Some(2));
    assert!(err.contains("`99999` is not a port number"), "{err}");
    let (code, err) = failure(&["--config", good, "--echo", "seven"]);
    assert_eq!(code, Some(2));
    assert!(err.contains("seven"), "{err}");
    let (code, err) = failure(&["--echo", "7"]);
    assert_eq!(code, Some(2));
    assert!(err.contains("--config"), "{err}");
    let (code, err) = failure(&["--config", bad]);
    assert_eq!(code, Some(2));
    assert!(
        err.contains(&format!("{bad}:2: bad PrivateKey: key decodes to 3 bytes")),
        "{err}"
    );
    let (code, err) = failure(&["--config", "/nonexistent/wg0.conf"]);
    assert_eq!(code, Some(2));
    assert!(err.contains("/nonexistent/wg0.conf: cannot read"), "{err}");
    let (code, err) = failure(&["--config", good, "--echo", "7", "--echo", "7"]);
    assert_eq!(code, Some(2));
    assert!(err.contains("--echo 7"), "{err}");
}
