//! Compiles the contract with protox (pure Rust, so no system `protoc`) and
//! records the build identity that every binary prints for `--version`.

use std::path::PathBuf;
use std::process::Command;

const PROTOS: &[&str] = &[
    "globalstacks/v1/common.proto",
    "globalstacks/v1/agent.proto",
    "globalstacks/v1/control_api.proto",
    "globalstacks/v1/mesh.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let fds = protox::compile(PROTOS, ["proto"])?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_fds(fds)?;

    emit_build_identity();
    Ok(())
}

fn emit_build_identity() {
    // Rebuild the identity when the commit moves (HEAD, or the branch it
    // names), not on every edit: the index is deliberately not watched.
    // `--git-dir` also works in a linked worktree, where `.git` is a file.
    if let Some(git_dir) = git(&["rev-parse", "--absolute-git-dir"]).map(PathBuf::from) {
        let common = git(&["rev-parse", "--path-format=absolute", "--git-common-dir"])
            .map(PathBuf::from)
            .unwrap_or_else(|| git_dir.clone());
        let head = git_dir.join("HEAD");
        println!("cargo:rerun-if-changed={}", head.display());
        if let Some(branch) = std::fs::read_to_string(&head)
            .ok()
            .and_then(|h| h.strip_prefix("ref: ").map(|r| r.trim().to_owned()))
        {
            for dir in [&git_dir, &common] {
                let reference = dir.join(&branch);
                if reference.exists() {
                    println!("cargo:rerun-if-changed={}", reference.display());
                }
            }
            let packed = common.join("packed-refs");
            if packed.exists() {
                println!("cargo:rerun-if-changed={}", packed.display());
            }
        }
    }
    println!("cargo:rerun-if-env-changed=GSTACKS_GIT_COMMIT");
    println!("cargo:rerun-if-env-changed=SOURCE_DATE_EPOCH");

    let commit = std::env::var("GSTACKS_GIT_COMMIT")
        .ok()
        .or_else(|| git(&["rev-parse", "--short=12", "HEAD"]))
        .unwrap_or_else(|| "unknown".to_owned());
    let date = match std::env::var("SOURCE_DATE_EPOCH") {
        Ok(epoch) => run(
            "date",
            &["-u", "-d", &format!("@{epoch}"), "+%Y-%m-%dT%H:%M:%SZ"],
        ),
        Err(_) => run("date", &["-u", "+%Y-%m-%dT%H:%M:%SZ"]),
    }
    .unwrap_or_else(|| "unknown".to_owned());
    let target = std::env::var("TARGET").unwrap_or_else(|_| "unknown".to_owned());

    println!("cargo:rustc-env=GSTACKS_GIT_COMMIT={commit}");
    println!("cargo:rustc-env=GSTACKS_BUILD_DATE={date}");
    println!("cargo:rustc-env=GSTACKS_TARGET={target}");
}

fn git(args: &[&str]) -> Option<String> {
    run("git", args)
}

fn run(program: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(program)
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
}
