//! A local test image with busybox and git, for sandbox tests that need a
//! shell, file tools and `git clone`. Nothing is pulled: the root file
//! system is made from the host's static `/bin/busybox` and the host's
//! `git` with the shared libraries `ldd` lists, then `docker import`ed.
//! Dropping the [`GitImage`] removes the image.

use std::path::{Path, PathBuf};
use std::process::Command;

/// What the image's containers run: a line on stdout and one on stderr
/// (for the logs tests), then they wait.
pub const GIT_IMAGE_CMD: &str = r#"CMD ["/bin/sh", "-c", "echo sandbox-hello-stdout; echo sandbox-hello-stderr >&2; exec sleep 2147483647"]"#;

/// A `docker import`ed image; removed on drop.
pub struct GitImage {
    pub reference: String,
}

fn run(command: &mut Command) -> std::process::Output {
    let out = command
        .output()
        .unwrap_or_else(|e| panic!("{command:?}: {e}"));
    assert!(
        out.status.success(),
        "{command:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn which(program: &str) -> PathBuf {
    let out = run(Command::new("sh").args(["-c", &format!("command -v {program}")]));
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

/// Copies `path` (following links) to the same place under `root`.
fn copy_into(root: &Path, path: &Path) {
    let target = root.join(path.strip_prefix("/").unwrap());
    std::fs::create_dir_all(target.parent().unwrap()).unwrap();
    std::fs::copy(path, &target).unwrap_or_else(|e| panic!("copy {}: {e}", path.display()));
}

/// The absolute paths `ldd` lists for `binary`.
fn shared_libraries(binary: &Path) -> Vec<PathBuf> {
    let out = run(Command::new("ldd").arg(binary));
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter(|word| word.starts_with('/'))
        .map(PathBuf::from)
        .collect()
}

impl GitImage {
    /// Builds `gstacks-test-git:<tag>`.
    pub fn build(tag: &str) -> GitImage {
        let reference = format!("gstacks-test-git:{tag}");
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("rootfs");
        for sub in ["bin", "tmp", "etc", "root", "work"] {
            std::fs::create_dir_all(root.join(sub)).unwrap();
        }
        std::fs::copy("/bin/busybox", root.join("bin/busybox")).expect("busybox-static");
        let applets = run(Command::new("/bin/busybox").arg("--list"));
        for applet in String::from_utf8_lossy(&applets.stdout).lines() {
            let link = root.join("bin").join(applet);
            if applet != "busybox" && !link.exists() {
                std::os::unix::fs::symlink("/bin/busybox", link).unwrap();
            }
        }
        let git = which("git");
        copy_into(&root, &git);
        for library in shared_libraries(&git) {
            copy_into(&root, &library);
        }
        // git runs its transports' other half by name from its exec path.
        let exec_path = run(Command::new(&git).arg("--exec-path"));
        let exec_path = PathBuf::from(String::from_utf8_lossy(&exec_path.stdout).trim());
        let in_root = root.join(exec_path.strip_prefix("/").unwrap());
        std::fs::create_dir_all(&in_root).unwrap();
        for helper in ["git-upload-pack", "git-receive-pack", "git-upload-archive"] {
            std::os::unix::fs::symlink(&git, in_root.join(helper)).unwrap();
        }
        if !git.starts_with("/bin") {
            std::os::unix::fs::symlink(&git, root.join("bin/git")).unwrap();
        }
        std::fs::write(
            root.join("etc/passwd"),
            "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/tmp:/bin/sh\n",
        )
        .unwrap();
        std::fs::write(root.join("etc/group"), "root:x:0:\nnobody:x:65534:\n").unwrap();
        let tar = dir.path().join("rootfs.tar");
        run(Command::new("tar")
            .arg("-C")
            .arg(&root)
            .arg("-cf")
            .arg(&tar)
            .arg("."));
        run(Command::new("docker")
            .args(["import", "--change", GIT_IMAGE_CMD, "--change"])
            .arg("ENV PATH=/bin:/usr/bin:/usr/local/bin")
            .arg(&tar)
            .arg(&reference));
        GitImage { reference }
    }
}

impl Drop for GitImage {
    fn drop(&mut self) {
        let _ = Command::new("docker")
            .args(["rmi", "-f", &self.reference])
            .output();
    }
}
