//! `gstacks-agent`: The GlobalStacks host agent.

#[derive(clap::Parser, Debug)]
#[command(
    name = "gstacks-agent",
    about = "The GlobalStacks host agent",
    version,
    long_version = proto::build_info::LONG_VERSION
)]
struct Args {}

fn main() {
    let _args: Args = proto::build_info::parse_args();
}
