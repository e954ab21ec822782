//! `gstacks-bench`: Measure the GlobalStacks data path beside its baselines.

mod results;
mod scenario;
mod workload;

use std::process::ExitCode;

#[derive(clap::Parser, Debug)]
#[command(
    name = "gstacks-bench",
    about = "Measure the GlobalStacks data path beside its baselines",
    version,
    long_version = proto::build_info::LONG_VERSION
)]
struct Args {
    #[command(subcommand)]
    command: BenchCommand,
}

#[derive(clap::Subcommand, Debug)]
enum BenchCommand {
    /// The control plane: N simulated agents connecting and heartbeating,
    /// beside the same control plane idle.
    Control(scenario::control::Options),
    /// The mesh node: throughput, round trips, connect rate and memory
    /// between two nodes on loopback, beside loopback TCP, onetun and
    /// wireguard-go.
    Netstack(scenario::netstack::Options),
    /// The agent DNS: queries per second (dnsperf) beside dnsmasq answering
    /// the same record.
    Dns(scenario::dns::Options),
    /// The laptop path: `gstacks mesh forward` (control plane, agent and
    /// CLI, all real) beside direct loopback TCP.
    Forward(scenario::forward::Options),
    /// The agent-to-agent path (alias listener -> policy -> mesh -> target
    /// agent, real agents) beside loopback and the raw mesh, with the agent
    /// DNS beside dnsmasq and the policy decision rate, against issue 6's
    /// targets.
    Proxy(scenario::proxy::Options),
    /// (internal) Hold idle connections open for the memory figure.
    #[command(hide = true)]
    HoldIdle(scenario::netstack::HoldIdle),
}

fn main() -> ExitCode {
    let args: Args = proto::build_info::parse_args();
    let outcome = match args.command {
        BenchCommand::Control(options) => run_control(&options),
        BenchCommand::Netstack(options) => scenario::netstack::run(&options).and_then(|results| {
            println!(
                "{}",
                results.table(scenario::netstack::SCENARIO, &scenario::netstack::METRICS)
            );
            write_json(options.json.as_deref(), &results)
        }),
        BenchCommand::Dns(options) => scenario::dns::run(&options).and_then(|results| {
            println!("{}", scenario::dns::table(&results));
            write_json(options.json.as_deref(), &results)
        }),
        BenchCommand::Forward(options) => scenario::forward::run(&options).and_then(|results| {
            println!("{}", scenario::forward::table(&results));
            write_json(options.json.as_deref(), &results)
        }),
        BenchCommand::Proxy(options) => scenario::proxy::run(&options).and_then(|results| {
            println!("{}", scenario::proxy::table(&results));
            write_json(options.json.as_deref(), &results)
        }),
        BenchCommand::HoldIdle(args) => scenario::netstack::hold_idle(&args),
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("gstacks-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn write_json(path: Option<&std::path::Path>, results: &results::Results) -> anyhow::Result<()> {
    if let Some(path) = path {
        std::fs::write(path, results.to_json() + "\n")
            .map_err(|e| anyhow::anyhow!("write {}: {e}", path.display()))?;
    }
    Ok(())
}

fn run_control(options: &scenario::control::Options) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Runtime::new()?;
    let figures = runtime.block_on(scenario::control::run(options))?;
    println!(
        "{:<12} {:>8} {:>12} {:>12}",
        "metric", "unit", "gstacks", "idle"
    );
    for metric in ["enroll_all", "connect_all", "cpu", "rss"] {
        let cell = |system: &str| {
            figures
                .iter()
                .find(|f| f.metric == metric && f.system == system)
                .map_or("n/a".to_owned(), |f| format!("{:.3}", f.value))
        };
        let unit = figures
            .iter()
            .find(|f| f.metric == metric)
            .map_or("", |f| f.unit);
        println!(
            "{metric:<12} {unit:>8} {:>12} {:>12}",
            cell("gstacks"),
            cell("idle")
        );
    }
    if let Some(path) = &options.json {
        let results: Vec<serde_json::Value> = figures
            .iter()
            .map(|f| {
                serde_json::json!({
                    "scenario": scenario::control::SCENARIO,
                    "metric": f.metric,
                    "system": f.system,
                    "value": f.value,
                    "unit": f.unit,
                })
            })
            .collect();
        let text = serde_json::to_string_pretty(&serde_json::json!({ "results": results }))?;
        std::fs::write(path, text + "\n")
            .map_err(|e| anyhow::anyhow!("write {}: {e}", path.display()))?;
    }
    Ok(())
}
