//! Shared support for the end-to-end tests in `tests/tests/`.

pub mod docker;
pub mod git_image;
pub mod netns;

use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;

/// Path of one of the workspace's binaries (`gstacks-agent`,
/// `gstacks-control`, `gstacks`, `gstacks-bench`) in the profile the tests
/// were built with. The first call runs `cargo build --workspace --bins` with
/// that profile, which is a no-op under `cargo test --workspace` and makes
/// `cargo test -p tests` work on its own.
pub fn binary(name: &str) -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    let profile_dir = BUILT.get_or_init(|| {
        let exe = std::env::current_exe().expect("test executable path");
        // target/<profile>/deps/<test> -> target/<profile>
        let profile_dir = exe
            .parent()
            .and_then(|deps| deps.parent())
            .expect("test executable lives in target/<profile>/deps")
            .to_path_buf();
        let profile = match profile_dir.file_name().and_then(|n| n.to_str()) {
            Some("debug") | None => "dev".to_owned(),
            Some(other) => other.to_owned(),
        };
        let mut build = Command::new(env!("CARGO"));
        // Variables that cargo sets for this test process (CARGO_MANIFEST_DIR,
        // CARGO_PKG_*) would look like a changed environment to the build
        // scripts of dependencies and force a rebuild; keep only the user's.
        for (key, _) in std::env::vars_os() {
            let key = key.to_string_lossy();
            let users = [
                "CARGO_HOME",
                "CARGO_TARGET_DIR",
                "CARGO_INCREMENTAL",
                "CARGO_BUILD_JOBS",
            ];
            if key.starts_with("CARGO_") && !users.contains(&key.as_ref()) {
                build.env_remove(key.as_ref());
            }
        }
        let status = build
            .args([
                "build",
                "--quiet",
                "--workspace",
                "--bins",
                "--profile",
                &profile,
            ])
            .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
            .status()
            .expect("run cargo build");
        assert!(status.success(), "cargo build --workspace --bins failed");
        profile_dir
    });
    let path = profile_dir.join(name);
    assert!(path.exists(), "no binary {}", path.display());
    path
}

/// `len` bytes of a xorshift sequence from `seed` (non-zero): data that a
/// lost, repeated or reordered block shows up in.
pub fn pattern(len: usize, seed: u32) -> Vec<u8> {
    let mut x = seed;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

/// Reads `stream` until EOF or an error (the peer closed or reset it) and
/// returns how long that took; panics if it is still open after `limit`.
pub async fn closed_within(
    stream: &mut tokio::net::TcpStream,
    limit: std::time::Duration,
) -> std::time::Duration {
    use tokio::io::AsyncReadExt as _;
    let start = tokio::time::Instant::now();
    let mut buf = [0u8; 1024];
    loop {
        match tokio::time::timeout_at(start + limit, stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return start.elapsed(),
            Ok(Ok(_)) => continue,
            Err(_) => panic!("the connection stayed open for {limit:?}"),
        }
    }
}
