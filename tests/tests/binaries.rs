//! Every binary answers --help and --version, and refuses an unknown flag or
//! subcommand with exit code 2 and one line that names it.

use std::process::Command;

const BINARIES: [&str; 4] = [
    "gstacks-agent",
    "gstacks-control",
    "gstacks",
    "gstacks-bench",
];

#[test]
fn version_names_commit_build_date_and_target() {
    for name in BINARIES {
        let out = Command::new(tests::binary(name))
            .arg("--version")
            .output()
            .unwrap();
        assert!(out.status.success(), "{name} --version: {out:?}");
        let text = String::from_utf8(out.stdout).unwrap();
        assert!(
            text.starts_with(&format!("{name} {}", env!("CARGO_PKG_VERSION"))),
            "{text}"
        );
        for field in ["commit: ", "built: ", "target: "] {
            assert!(text.contains(field), "{name}: no `{field}` in {text}");
        }
    }
}

#[test]
fn help_exits_zero() {
    for name in BINARIES {
        let out = Command::new(tests::binary(name))
            .arg("--help")
            .output()
            .unwrap();
        assert!(out.status.success(), "{name} --help: {out:?}");
        assert!(String::from_utf8_lossy(&out.stdout).contains("Usage:"));
    }
}

#[test]
fn unknown_flag_and_subcommand_exit_two_with_one_line() {
    for name in BINARIES {
        for bad in ["--no-such-flag", "no-such-subcommand"] {
            let out = Command::new(tests::binary(name)).arg(bad).output().unwrap();
            assert_eq!(out.status.code(), Some(2), "{name} {bad}: {out:?}");
            let err = String::from_utf8(out.stderr).unwrap();
            assert_eq!(err.trim_end().lines().count(), 1, "{name} {bad}: {err}");
            assert!(err.contains(bad), "{name} {bad}: {err}");
        }
    }
}
