//! `gstacks-bench`: Measure the GlobalStacks data path beside its baselines.

#[derive(clap::Parser, Debug)]
#[command(
    name = "gstacks-bench",
    about = "Measure the GlobalStacks data path beside its baselines",
    version,
    long_version = proto::build_info::LONG_VERSION
)]
struct Args {}

fn main() {
    let _args: Args = proto::build_info::parse_args();
}
