//! `gstacks`: Operate GlobalStacks: hosts, tokens, sandboxes, networks, the mesh.

#[derive(clap::Parser, Debug)]
#[command(
    name = "gstacks",
    about = "Operate GlobalStacks: hosts, tokens, sandboxes, networks, the mesh",
    version,
    long_version = proto::build_info::LONG_VERSION
)]
struct Args {}

fn main() {
    let _args: Args = proto::build_info::parse_args();
}
