//! Build identity of every GlobalStacks binary, printed by `--version` the way
//! `cs-agent -version` does: version, git commit, build date, target triple.

/// The workspace version (all crates share it).
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
/// Short git commit the binary was built from (`unknown` outside a git checkout).
pub const GIT_COMMIT: &str = env!("GSTACKS_GIT_COMMIT");
/// UTC build date (or `SOURCE_DATE_EPOCH` for reproducible builds).
pub const BUILD_DATE: &str = env!("GSTACKS_BUILD_DATE");
/// Rust target triple.
pub const TARGET: &str = env!("GSTACKS_TARGET");

/// The text after the binary name in `--version`.
pub const LONG_VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    "\ncommit: ",
    env!("GSTACKS_GIT_COMMIT"),
    "\nbuilt: ",
    env!("GSTACKS_BUILD_DATE"),
    "\ntarget: ",
    env!("GSTACKS_TARGET"),
);

/// Parses the command line of one of our binaries. `--help` and `--version`
/// print and exit 0; any other argument error prints one line that names the
/// offending argument (`error: unexpected argument '--frob' found`) and exits 2.
pub fn parse_args<T: clap::Parser>() -> T {
    match T::try_parse() {
        Ok(args) => args,
        Err(err) => exit_on_args_error(err),
    }
}

/// Same as [`parse_args`] for an explicit argument list (used by tests).
pub fn try_parse_args_from<T, I, S>(args: I) -> Result<T, String>
where
    T: clap::Parser,
    I: IntoIterator<Item = S>,
    S: Into<std::ffi::OsString> + Clone,
{
    T::try_parse_from(args).map_err(|err| one_line(&err))
}

fn exit_on_args_error(err: clap::Error) -> ! {
    use clap::error::ErrorKind;
    match err.kind() {
        ErrorKind::DisplayHelp
        | ErrorKind::DisplayVersion
        | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
            let code = if err.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand {
                2
            } else {
                0
            };
            // clap renders help and version itself.
            let _ = err.print();
            std::process::exit(code);
        }
        _ => {
            eprintln!("{}", one_line(&err));
            std::process::exit(2);
        }
    }
}

/// The first line of clap's message, without its tips and usage block.
fn one_line(err: &clap::Error) -> String {
    let rendered = err.render().to_string();
    rendered
        .lines()
        .map(str::trim)
        .find(|line| !line.is_empty())
        .unwrap_or("error: invalid arguments")
        .to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(clap::Parser, Debug)]
    #[command(name = "demo", version, long_version = LONG_VERSION)]
    struct Demo {
        #[arg(long)]
        flag: bool,
    }

    #[test]
    fn long_version_names_commit_date_and_target() {
        assert!(LONG_VERSION.starts_with(VERSION));
        assert!(LONG_VERSION.contains(&format!("commit: {GIT_COMMIT}")));
        assert!(LONG_VERSION.contains(&format!("target: {TARGET}")));
        assert!(
            TARGET.contains('-'),
            "target triple looks like a-b-c: {TARGET}"
        );
    }

    #[test]
    fn unknown_flag_is_one_line_that_names_it() {
        let err = try_parse_args_from::<Demo, _, _>(["demo", "--frob"]).unwrap_err();
        assert!(err.contains("--frob"), "{err}");
        assert!(!err.contains('\n'), "{err}");
    }
}
