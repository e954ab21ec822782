//! `gstacks-control`: The GlobalStacks control plane.

#[derive(clap::Parser, Debug)]
#[command(
    name = "gstacks-control",
    about = "The GlobalStacks control plane",
    version,
    long_version = proto::build_info::LONG_VERSION
)]
struct Args {}

fn main() {
    let _args: Args = proto::build_info::parse_args();
}
