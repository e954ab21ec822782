//! `gstacks-agent`: the GlobalStacks host agent. All logic lives in the
//! library (`agent::command_line`).

fn main() -> std::process::ExitCode {
    agent::command_line::main(proto::build_info::parse_args())
}
